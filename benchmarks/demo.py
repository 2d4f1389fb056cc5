"""The main job of the README: ``coarseseg demo`` timed as a user runs it.

Runs ``coarseseg demo --out-dir <temporary folder>`` in a fresh process with
``--threads`` torch threads and reports its wall time (imports and writing
included), the training seconds and the Dice on the unseen right half, from
the ``summary.json`` the demo writes.

Usage::

    python benchmarks/demo.py [--threads 2] [--out benchmarks/results]

Writes ``demo.md`` and ``demo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import write_results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    coarseseg = shutil.which("coarseseg")
    command = [coarseseg] if coarseseg else [sys.executable, "-m", "napari_coarseseg.cli"]
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        subprocess.run([*command, "demo", "--out-dir", folder], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        wall = time.perf_counter() - start
        summary = json.loads((Path(folder) / "summary.json").read_text())
    figures = {"threads": args.threads, "wall_seconds": wall, **summary}
    text = (f"`coarseseg demo` ({summary['device']}, {summary['steps']} steps): {wall:.0f} s from start to "
            f"finish, of which {summary['training_seconds']:.0f} s training; Dice "
            f"{summary['dice_right_half']:.3f} on the unseen right half.\n")
    write_results(args.out, "demo", text, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
