"""How every benchmark script reports: ``<name>.md`` (what the README shows) and ``<name>.json`` (the figures).

``run_all.py`` gathers these files by the same names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


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


def mean_dice(runs) -> float:
    """Mean held-out Dice of ``[(dice, seconds), ...]``, one entry per seed."""
    return float(np.mean([d for d, _ in runs]))


def dice_rows(results, folds) -> list[str]:
    """Table rows ``| method | per fold: mean (lowest-highest) | mean over folds | training s |``.

    ``results[method][fold]`` lists ``(dice, seconds)``, one entry per seed.
    """
    rows = []
    for method, per_fold in results.items():
        seconds = np.mean([s for f in folds for _, s in per_fold[f]])
        rows.append(f"| {method} | " + " | ".join(mean_and_spread([d for d, _ in per_fold[f]]) for f in folds)
                    + f" | {np.mean([mean_dice(per_fold[f]) for f in folds]):.3f} | {seconds:.0f} |")
    return rows


def margins_over_baselines(results, method: str, baselines, folds) -> list[float]:
    """Per fold, the mean Dice of ``method`` minus that of the best of ``baselines``."""
    return [mean_dice(results[method][f]) - max(mean_dice(results[b][f]) for b in baselines) for f in folds]


def add_run_options(parser, runs_file, out) -> None:
    """The options every records-keeping benchmark takes: threads, device, --force, --out and --runs."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--force", action="store_true", help="redo runs already recorded")
    parser.add_argument("--out", default=str(out))
    parser.add_argument("--runs", type=Path, default=runs_file, help="the records file (default %(default)s)")
