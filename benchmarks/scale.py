"""Scale: peak memory and throughput of prediction and training on big images and long stacks.

Each case runs in a fresh Python process, so its peak resident memory (RSS,
from ``resource.getrusage``) is its own. Images are the bundled DSB 2018
nuclei image tiled (mirrored) up to the size asked for, so the content is
real; the models are the checkpoints shipped in ``models/``.

Cases:

- ``predict-4096``: a 4096 x 4096 image, refineseg model;
- ``predict-4096-recursive``: the same with the recursive model;
- ``predict-stack``: a stack of 200 slices of 512 x 512, refineseg model;
- ``train-4096``: refineseg training on a 4096 x 4096 image with simulated
  drawings (made beforehand, in the parent process), 20 steps (patch
  sampling must not copy more than needed).

Prediction keeps labels only (``keep_probabilities=False``), as ``coarseseg
predict`` without ``--probabilities`` and napari do.

Usage::

    python benchmarks/scale.py [--threads 2] [--cases predict-4096,...] [--out benchmarks/results]

Writes ``scale.md`` and ``scale.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from report import write_results

CASES = ("predict-4096", "predict-4096-recursive", "predict-stack", "train-4096")


def big_image(side: int):
    """The sample image mirrored up to ``side`` x ``side`` (and its expert mask)."""
    import numpy as np

    from napari_coarseseg.samples import load_dsb_nuclei

    image, labels = load_dsb_nuclei()
    reps = -(-side // image.shape[0])
    return (np.pad(image, ((0, reps * 512 - 512),) * 2, mode="symmetric")[:side, :side],
            np.pad(labels, ((0, reps * 512 - 512),) * 2, mode="symmetric")[:side, :side])


def drawings_file(side: int) -> Path:
    import tempfile

    return Path(tempfile.gettempdir()) / f"coarseseg-scale-drawings-{side}.npz"


def write_drawings(side: int) -> None:
    """Simulated drawings of the big image, made once in the parent process."""
    import numpy as np

    from napari_coarseseg import simulate

    drawings = simulate(big_image(side)[1], instances=True)
    np.savez(drawings_file(side), positive=drawings.positive, negative=drawings.negative)


def run_case(case: str, threads: int) -> dict:
    """Run one case in this process; return its figures (peak RSS read by the caller's child process)."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from napari_coarseseg import load_model, predict, run_to_end, train_refineseg

    if case.startswith("predict"):
        model = load_model("dsb2018-nuclei-recursive" if case.endswith("recursive") else "dsb2018-nuclei-refineseg")
        if case == "predict-stack":
            image = np.repeat(big_image(512)[0][None], 200, axis=0)
        else:
            image = big_image(4096)[0]
        start = time.perf_counter()
        # What `coarseseg predict` and napari do: labels only, one slice of probabilities at a time.
        labels = predict(model, image, device="cpu", keep_probabilities=False).labels
        seconds = time.perf_counter() - start
        assert labels.shape == image.shape
        return {"case": case, "shape": list(image.shape), "seconds": round(seconds, 1),
                "megapixels_per_second": round(image.size / 1e6 / seconds, 2),
                "foreground_fraction": round(float((labels > 0).mean()), 3)}
    image, _ = big_image(4096)
    drawings = np.load(drawings_file(image.shape[0]))  # simulated by the parent: not part of this peak
    start = time.perf_counter()
    run_to_end(train_refineseg(image, [drawings["positive"]], [drawings["negative"]], steps=20,
                               evolution_every=0, device="cpu"))
    return {"case": case, "shape": list(image.shape), "seconds": round(time.perf_counter() - start, 1),
            "steps": 20}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        figures = run_case(args.child, args.threads)
        figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(figures))
        return 0

    results = []
    if "train-4096" in args.cases:
        write_drawings(4096)
    for case in args.cases.split(","):
        done = subprocess.run([sys.executable, __file__, "--child", case, "--threads", str(args.threads)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    lines = [f"CPU, {args.threads} torch threads, {platform.processor() or platform.machine()}; each case in its "
             "own process (peak RSS of that process).", "",
             "| case | shape | seconds | MP/s | peak RSS (MB) |", "|---|---|---|---|---|"]
    for r in results:
        rate = r.get("megapixels_per_second", "")
        lines.append(f"| {r['case']} | {' x '.join(map(str, r['shape']))} | {r['seconds']} | {rate} | "
                     f"{r['peak_rss_mb']} |")
    text = "\n".join(lines) + "\n"
    write_results(args.out, "scale", text, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
