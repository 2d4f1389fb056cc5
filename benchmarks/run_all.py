"""Run every benchmark with its documented settings and gather the results in one place.

Runs, one after the other (each alone on the machine, so timings are clean):

1. ``accuracy.py`` (RefineSeg against its baselines, 4 folds, about 20 minutes);
2. ``recursive.py --seeds 3`` (the recursive method against its baselines, about 45 minutes);
3. ``curves.py`` (Dice against training seconds, budget sweep on fold 0, about 5 minutes);
4. ``speed.py`` (training steps, level-set update, prediction throughput, about 1 minute);
5. ``scale.py`` (peak memory and throughput on big images, about 4 minutes).

Then writes ``results.json`` (every script's JSON under its name) and
``results.md`` (every script's Markdown table under a heading) into the
output folder. About 75 minutes on 2 CPU cores.

Usage::

    python benchmarks/run_all.py [--threads 2] [--out benchmarks/results] [--only speed,scale]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from report import result_files

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "accuracy": ("accuracy.py", [], "RefineSeg accuracy"),
    "recursive": ("recursive.py", ["--seeds", "3"], "Recursive approximation accuracy"),
    "curves": ("curves.py", [], "Dice against training seconds"),
    "speed": ("speed.py", [], "Speed"),
    "scale": ("scale.py", [], "Scale"),
}


def gather(out: Path, names) -> tuple[dict, str]:
    """Merge the ``<name>.json`` and ``<name>.md`` files the benchmarks wrote in ``out``."""
    results, sections = {}, []
    for name in names:
        title = BENCHMARKS[name][2]
        md_file, json_file = result_files(out, name)
        if not json_file.is_file() or not md_file.is_file():
            raise FileNotFoundError(f"{name} wrote no {json_file.name} / {md_file.name} in {out}")
        results[name] = json.loads(json_file.read_text())
        sections.append(f"## {title} (`python benchmarks/{BENCHMARKS[name][0]}"
                        f"{' ' + ' '.join(BENCHMARKS[name][1]) if BENCHMARKS[name][1] else ''}`)\n\n"
                        f"{md_file.read_text().strip()}\n")
    return results, "\n".join(sections)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of "
                        + ", ".join(BENCHMARKS))
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; known: {list(BENCHMARKS)}")
    out = Path(args.out)
    for name in names:
        script, extra, _ = BENCHMARKS[name]
        command = [sys.executable, str(HERE / script), "--threads", str(args.threads), "--out", str(out), *extra]
        print(f"running {' '.join(command[1:])}", flush=True)
        if subprocess.run(command).returncode != 0:
            print(f"run_all: {script} failed; results.json not written", file=sys.stderr)
            return 1
    results, text = gather(out, names)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(text)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
