"""Run every benchmark with its documented settings, gather the results, and write the README's figures.

Runs, one after the other (each alone on the machine, so timings are clean):

1. ``demo.py`` (``coarseseg demo``, the README's main job, about 1 minute);
2. ``speed.py`` (training steps, level-set update, prediction throughput, before and now, about 3 minutes);
3. ``scale.py`` (peak memory and throughput on big images, about 4 minutes);
4. ``curves.py`` (Dice against training seconds, budget sweep on fold 0, about 5 minutes);
5. ``accuracy.py`` (RefineSeg against its baselines, 4 folds x 3 seeds, about 45 minutes);
   ``realdata.py run`` (scribbles on the nuclei and the EM stack, every method and variant, 3 seeds; the
   runs already in ``realdata_runs.json`` are kept, so a first full run takes several hours on 2 cores);
   ``heads.py`` (what the heads and the network learn from a 4 px biased annotator, about 3 minutes);
   ``volume.py run`` (the 30-slice EM volume drawn on 5 slices: refineseg with and without heads, the forest
   and naive training, 3 seeds, about 40 minutes on 2 cores; runs already in ``volume_runs.json`` are kept);
   ``brain_mri.py run`` (a T1 brain MRI in 3-mm slices drawn on 6 slices: refineseg with and without heads
   and the forest, 3 seeds, about 25 minutes on 2 cores; needs nilearn, which ships the template);
6. ``recursive.py`` (the recursive method against its baselines, 4 folds x 3 seeds, about 40 minutes);
7. ``live.py`` and ``live_recursive.py`` (scripted live sessions of each method, 3 annotators, about 12
   minutes each); ``distributed_predict.py`` (a zarr volume on a local dask cluster, a few minutes);
8. ``acdc.py run`` (cardiac cine MRI with real scribbles: the anatomy preset and the forests, 3 seeds,
   about 2 hours on 2 cores; reads the ACDC folder, ``../shared/data/acdc_scribbles``; runs already in
   ``acdc_runs.json`` are kept).

Then writes ``results.json`` (every script's JSON under its name) and
``results.md`` (every script's Markdown under a heading) into the output
folder, and, when that folder is ``benchmarks/results``, rewrites each block
of the README between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``
with ``NAME.md``: every figure in the README comes from this one command.
About 100 minutes on 2 CPU cores.

Usage::

    python benchmarks/run_all.py [--threads 2] [--out benchmarks/results] [--only speed,scale] [--gather-only]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from report import result_files

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
# Quick ones first, so that a broken script stops the run in minutes, not after the long ones.
BENCHMARKS = {
    "demo": ("demo.py", [], "The demo"),
    "speed": ("speed.py", [], "Speed"),
    "scale": ("scale.py", [], "Scale"),
    "curves": ("curves.py", [], "Dice against training seconds"),
    "accuracy": ("accuracy.py", [], "RefineSeg accuracy"),
    "realdata": ("realdata.py", ["run"], "Real data with hand-like drawings"),
    "heads": ("heads.py", [], "What the transition heads learn from a biased annotator"),
    "recursive": ("recursive.py", [], "Recursive approximation accuracy"),
    "live": ("live.py", [], "Live sessions"),
    "live_recursive": ("live_recursive.py", [], "Live sessions of the recursive method"),
    "volume": ("volume.py", ["run", "--settings", "preset", "no heads", "preset per slice", "no heads per slice"],
               "Volumes"),
    "brain_mri": ("brain_mri.py", ["run", "--settings", "preset", "no heads"], "A brain MRI in thick slices"),
    "distributed_predict": ("distributed_predict.py", ["--shape", "8,1024,1024"],
                            "Distributed prediction of a zarr volume"),
    # Last: it needs the ACDC folder (``../shared/data/acdc_scribbles``, or skip it with --only).
    "acdc": ("acdc.py", ["run"], "Cardiac MRI with real scribbles"),
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


def update_readme(readme: Path, out: Path) -> list[str]:
    """Replace the body of every ``<!-- results:NAME -->`` block of ``readme`` with ``out/NAME.md``.

    Returns the names of the blocks written. A block whose ``NAME.md`` is
    missing is an error: the README must not keep figures no run produced.
    """
    text = readme.read_text()
    pattern = re.compile(r"(<!-- results:(\w+) -->\n)(.*?)(<!-- /results:\2 -->)", re.S)
    missing = [name for _, name, _, _ in pattern.findall(text) if not result_files(out, name)[0].is_file()]
    if missing:
        raise FileNotFoundError(f"no {', '.join(n + '.md' for n in missing)} in {out}; run those benchmarks first")
    names = []

    def body(match):
        names.append(match.group(2))
        return match.group(1) + result_files(out, match.group(2))[0].read_text().strip() + "\n" + match.group(4)

    readme.write_text(pattern.sub(body, text))
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of "
                        + ", ".join(BENCHMARKS))
    parser.add_argument("--gather-only", action="store_true",
                        help="run nothing; gather the results already in --out (and update the README)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; known: {list(BENCHMARKS)}")
    out = Path(args.out)
    for name in [] if args.gather_only else names:
        script, extra, _ = BENCHMARKS[name]
        command = [sys.executable, str(HERE / script), "--threads", str(args.threads), "--out", str(out), *extra]
        print(f"running {' '.join(command[1:])}", flush=True)
        if subprocess.run(command).returncode != 0:
            print(f"run_all: {script} failed; results.json not written", file=sys.stderr)
            return 1
    # Gather every benchmark with results in the folder, not only those just run, so that
    # results.json and results.md stay whole after --only.
    results, text = gather(out, [n for n in BENCHMARKS if all(f.is_file() for f in result_files(out, n))])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(text)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    if out.resolve() == (HERE / "results").resolve():
        written = update_readme(README, out)
        print(f"rewrote the README's blocks {', '.join(written)} from {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
