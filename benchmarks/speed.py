"""Speed, side by side in one run: training steps, the level-set update, prediction throughput.

- a RefineSeg training step against a plain U-Net step of the same size (same
  network, batch, patches and augmentation; cross-entropy on dense masks):
  seconds per step from the difference of a long and a short run, so set-up
  costs cancel (target: RefineSeg <= 1.3 x the plain step);
- a recursive-method step (the multi-task network);
- the level-set update (eq. 4-6) on the 512 x 512 sample, 125 nuclei seeded
  by their partial masks (target < 50 ms; median of 7);
- prediction throughput (megapixels per second) on the 512 x 512 sample with
  the shipped refineseg model.

Usage::

    python benchmarks/speed.py [--threads 2] [--device cpu] [--out benchmarks/results]

Writes ``speed.md`` and ``speed.json``. Peak memory is in ``scale.py``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import train_dense  # noqa: E402
from report import write_results  # noqa: E402

from napari_coarseseg import (  # noqa: E402
    grow_regions, label_regions, load_model, load_preset, predict, run_to_end, simulate, train_recursive,
    train_refineseg,
)
from napari_coarseseg.samples import load_dsb_nuclei  # noqa: E402
from napari_coarseseg.training import describe_device, select_device  # noqa: E402

SHORT, LONG = 10, 40


def seconds_per_step(run) -> float:
    """(time of LONG steps - time of SHORT steps) / (LONG - SHORT): set-up and first-step costs cancel."""
    times = {}
    for steps in (SHORT, LONG):
        start = time.perf_counter()
        run(steps)
        times[steps] = time.perf_counter() - start
    return (times[LONG] - times[SHORT]) / (LONG - SHORT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = select_device(args.device)

    image, labels = load_dsb_nuclei()
    drawings = simulate(labels, instances=True)
    config = load_preset("refineseg").replace(evolution_every=0)
    figures = {"device": describe_device(device)}

    figures["refineseg_step_s"] = seconds_per_step(lambda steps: run_to_end(train_refineseg(
        image, [drawings.positive], [drawings.negative], config=config, steps=steps, device=args.device)))
    figures["unet_step_s"] = seconds_per_step(lambda steps: train_dense(
        [image], [labels > 0], config.replace(steps=steps), device=args.device))
    figures["refineseg_over_unet"] = figures["refineseg_step_s"] / figures["unet_step_s"]
    strong = (labels > 0).astype(np.uint8)
    figures["recursive_step_s"] = seconds_per_step(lambda steps: run_to_end(train_recursive(
        image, drawings.partial, strong, steps=steps // 2, iterations=2, device=args.device)))

    seeds, seed_classes = label_regions(drawings.partial)
    timings = []
    for _ in range(7):
        start = time.perf_counter()
        grow_regions(seeds, seed_classes, (labels > 0).astype(np.int64), 1.0)
        timings.append(time.perf_counter() - start)
    figures["levelset_update_ms"] = 1000 * float(np.median(timings))
    figures["levelset_objects"] = int(seeds.max())

    model = load_model("dsb2018-nuclei-refineseg")
    predict(model, image, device=args.device)  # warm-up
    start = time.perf_counter()
    for _ in range(3):
        predict(model, image, device=args.device, keep_probabilities=False)
    figures["predict_megapixels_per_second"] = 3 * image.size / 1e6 / (time.perf_counter() - start)

    lines = [
        f"{figures['device']}, {platform.processor() or platform.machine()}; the sample image (512 x 512); "
        f"steps of the refineseg preset (batch {config.batch_size}, patches {config.patch_size}), seconds per "
        f"step from runs of {LONG} and {SHORT} steps.", "",
        "| measure | value | target |", "|---|---|---|",
        f"| RefineSeg training step | {figures['refineseg_step_s'] * 1000:.0f} ms | |",
        f"| plain U-Net step, same size | {figures['unet_step_s'] * 1000:.0f} ms | |",
        f"| RefineSeg / U-Net | {figures['refineseg_over_unet']:.2f} x | <= 1.3 x |",
        f"| recursive (multi-task) step | {figures['recursive_step_s'] * 1000:.0f} ms | |",
        f"| level-set update, 512 x 512, {figures['levelset_objects']} objects | "
        f"{figures['levelset_update_ms']:.0f} ms | < 50 ms |",
        f"| prediction, refineseg model | {figures['predict_megapixels_per_second']:.2f} MP/s | |",
    ]
    text = "\n".join(lines) + "\n"
    write_results(args.out, "speed", text, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
