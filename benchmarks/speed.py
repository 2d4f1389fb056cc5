"""Speed, side by side in one run: training steps, the level-set update, prediction throughput.

- a RefineSeg training step against a plain U-Net step of the same size (same
  network, batch, patches and augmentation; cross-entropy on dense masks):
  seconds per step from the difference of a long and a short run, so set-up
  costs cancel, median of three (target: RefineSeg <= 1.3 x the plain step);
- a recursive-method step (the multi-task network);
- each training step twice: in the default (contiguous) memory format, as
  before the speed work, and channels-last, as the package trains now;
- the level-set update (eq. 4-6) on the 512 x 512 sample, 125 nuclei seeded
  by their partial masks (target < 50 ms; median of 7);
- prediction throughput (megapixels per second) on the 512 x 512 sample with
  the shipped refineseg model: as before the speed work (contiguous, tiles
  of 256) and as now (batch norms folded, channels-last, tiles of 512).

Usage::

    python benchmarks/speed.py [--threads 2] [--device cpu] [--out benchmarks/results]

Writes ``speed.md`` and ``speed.json``. Peak memory is in ``scale.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from napari_coarseseg import (  # noqa: E402  # noqa: E402
    grow_regions,
    inference,
    label_regions,
    load_model,
    load_preset,
    predict,
    run_to_end,
    simulate,
    train_recursive,
    train_refineseg,
    training,
)
from napari_coarseseg.samples import load_dsb_nuclei  # noqa: E402
from napari_coarseseg.training import describe_device, select_device  # noqa: E402

from baselines import train_dense  # noqa: E402
from report import write_results  # noqa: E402

SHORT, LONG = 10, 40
REPEATS = 3


def seconds_per_step(run) -> float:
    """(time of LONG steps - time of SHORT steps) / (LONG - SHORT): set-up and first-step costs cancel."""
    times = {}
    for steps in (SHORT, LONG):
        start = time.perf_counter()
        run(steps)
        times[steps] = time.perf_counter() - start
    return (times[LONG] - times[SHORT]) / (LONG - SHORT)


@contextlib.contextmanager
def memory_format(channels_last: bool):
    """Train (and predict) in channels-last or the default contiguous format inside the block."""
    saved = training.CHANNELS_LAST
    training.CHANNELS_LAST = channels_last
    try:
        yield
    finally:
        training.CHANNELS_LAST = saved


@contextlib.contextmanager
def unfolded_batch_norm():
    """Predict with the network as trained, batch norms not folded (as before the speed work)."""
    saved = inference.fold_batch_norm
    inference.fold_batch_norm = lambda network: network.eval()
    try:
        yield
    finally:
        inference.fold_batch_norm = saved


def megapixels_per_second(model, image, device, tile_size: int, repeats: int = 3) -> float:
    """Prediction throughput, labels only (as napari and the command line predict), after a warm-up."""
    predict(model, image, device=device, tile_size=tile_size, keep_probabilities=False)
    start = time.perf_counter()
    for _ in range(repeats):
        predict(model, image, device=device, tile_size=tile_size, keep_probabilities=False)
    return repeats * image.size / 1e6 / (time.perf_counter() - start)


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

    strong = (labels > 0).astype(np.uint8)
    steps = {
        "refineseg": lambda n: run_to_end(train_refineseg(
            image, [drawings.positive], [drawings.negative], config=config, steps=n, device=args.device)),
        "unet": lambda n: train_dense([image], [labels > 0], config.replace(steps=n), device=args.device),
        "recursive": lambda n: run_to_end(train_recursive(
            image, drawings.partial, strong, steps=n // 2, iterations=2, device=args.device)),
    }
    # Formats alternate and each figure is the median of REPEATS, so a slow spell of the machine
    # cannot land on one side of the comparison only.
    samples = {}
    for _ in range(REPEATS):
        for layout, channels_last in (("contiguous", False), ("channels_last", True)):
            with memory_format(channels_last):
                for name, run in steps.items():
                    samples.setdefault(f"{name}_step_s_{layout}", []).append(seconds_per_step(run))
    for key, values in samples.items():
        figures[key] = float(np.median(values))
        figures[key.replace("_step_s_", "_step_s_all_")] = values
    for layout in ("contiguous", "channels_last"):
        figures[f"refineseg_over_unet_{layout}"] = (figures[f"refineseg_step_s_{layout}"]
                                                    / figures[f"unet_step_s_{layout}"])

    seeds, seed_classes = label_regions(drawings.partial)
    timings = []
    for _ in range(7):
        start = time.perf_counter()
        grow_regions(seeds, seed_classes, (labels > 0).astype(np.int64), 1.0)
        timings.append(time.perf_counter() - start)
    figures["levelset_update_ms"] = 1000 * float(np.median(timings))
    figures["levelset_objects"] = int(seeds.max())

    model = load_model("dsb2018-nuclei-refineseg")
    with memory_format(False), unfolded_batch_norm():
        figures["predict_megapixels_per_second_before"] = megapixels_per_second(model, image, args.device, 256)
    figures["predict_megapixels_per_second"] = megapixels_per_second(model, image, args.device,
                                                                     inference.TILE_SIZE)

    def ms(key):
        return f"{figures[key] * 1000:.0f} ms"

    lines = [
        f"{figures['device']}, {platform.processor() or platform.machine()}; the sample image (512 x 512); "
        f"steps of the refineseg preset (batch {config.batch_size}, patches {config.patch_size}), seconds per "
        f"step from runs of {LONG} and {SHORT} steps, median of {REPEATS} (formats alternating). *Before*: the "
        "default (contiguous) memory format and, for prediction, tiles of 256 with batch norms as trained; "
        "*now*: channels-last and, for prediction, "
        f"batch norms folded into the convolutions and tiles of {inference.TILE_SIZE}.", "",
        "| measure | before | now | target |", "|---|---|---|---|",
        f"| RefineSeg training step | {ms('refineseg_step_s_contiguous')} | {ms('refineseg_step_s_channels_last')} | |",
        f"| plain U-Net step, same size | {ms('unet_step_s_contiguous')} | {ms('unet_step_s_channels_last')} | |",
        f"| RefineSeg / U-Net | {figures['refineseg_over_unet_contiguous']:.2f} x | "
        f"{figures['refineseg_over_unet_channels_last']:.2f} x | <= 1.3 x |",
        f"| recursive (multi-task) step | {ms('recursive_step_s_contiguous')} | "
        f"{ms('recursive_step_s_channels_last')} | |",
        f"| level-set update, 512 x 512, {figures['levelset_objects']} objects | | "
        f"{figures['levelset_update_ms']:.0f} ms | < 50 ms |",
        f"| prediction, refineseg model | {figures['predict_megapixels_per_second_before']:.2f} MP/s | "
        f"{figures['predict_megapixels_per_second']:.2f} MP/s | |",
    ]
    text = "\n".join(lines) + "\n"
    write_results(args.out, "speed", text, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
