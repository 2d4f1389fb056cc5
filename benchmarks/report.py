"""How every benchmark script reports: ``<name>.md`` (what the README shows) and ``<name>.json`` (the figures).

``run_all.py`` gathers these files by the same names.
"""

from __future__ import annotations

import json
from pathlib import Path


def result_files(out, name: str) -> tuple[Path, Path]:
    """The Markdown and JSON files of benchmark ``name`` in folder ``out``."""
    return Path(out) / f"{name}.md", Path(out) / f"{name}.json"


def write_results(out, name: str, text: str, figures) -> None:
    """Write a benchmark's table and figures into ``out`` (created if missing) and print the table."""
    Path(out).mkdir(parents=True, exist_ok=True)
    markdown, data = result_files(out, name)
    markdown.write_text(text)
    data.write_text(json.dumps(figures, indent=2))
    print(text)


def mean_and_spread(values) -> str:
    """``"0.924 (0.922-0.927)"``: the mean of several seeds' results with the lowest and highest; one value alone."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    return f"{mean:.3f}" + (f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else "")
