"""Dice against wall-clock training seconds: how long each method needs to reach a given accuracy.

A budget sweep on one fold of each accuracy benchmark: every method is trained
from scratch with growing budgets, and each run gives one point (training
seconds, held-out Dice). This is the choice a user makes before pressing
Train, so each point is a complete run with its own one-cycle schedule.

- refineseg: fold ``--fold`` of ``accuracy.py`` (train on three quadrants,
  test on the fourth), 50 to 300 steps (the preset's 300 is the last point);
- recursive: quadrant ``--fold`` held out as in ``recursive.py``, 4
  iterations of 12 to 50 steps (the preset's 50 is the last point);
- random forest: the same information as the method it is compared with,
  5 to 50 trees.

Usage::

    python benchmarks/curves.py [--threads 2] [--fold 0] [--target 0.90] [--out benchmarks/results]

Writes ``curves.md`` (time to reach ``--target``), ``curves.json`` and ``curves.png``. About 5 minutes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402
import recursive as recursive_benchmark  # noqa: E402

from napari_coarseseg import load_preset, predict, run_to_end, train_recursive, train_refineseg  # noqa: E402
from napari_coarseseg.demo import dice  # noqa: E402
from napari_coarseseg.samples import load_dsb_nuclei  # noqa: E402

from baselines import random_forest_segment  # noqa: E402
from report import write_results  # noqa: E402

REFINESEG_STEPS = (50, 100, 200, 300)
RECURSIVE_STEPS = (12, 25, 50)  # per iteration, 4 iterations
TREES = (5, 20, 50)


def timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def refineseg_points(fold: int) -> dict:
    image, expert = load_dsb_nuclei()
    positive, negative = accuracy.simulated_drawings()
    test = accuracy.QUADRANTS[fold]
    train = [q for i, q in enumerate(accuracy.QUADRANTS) if i != fold]
    truth = expert[test] > 0
    points = {"refineseg": [], "random forest (drawings)": []}
    for steps in REFINESEG_STEPS:
        model, seconds = timed(lambda steps=steps: run_to_end(train_refineseg(
            [image[q] for q in train], [[positive[q] for q in train]], [[negative[q] for q in train]],
            config=load_preset("refineseg"), steps=steps, evolution_every=0, device="cpu")))
        points["refineseg"].append((seconds, dice(predict(model, image[test], device="cpu").labels > 0, truth)))
    rf_labels = accuracy.random_forest_labels(positive, negative, train)
    for trees in TREES:
        labels, seconds = random_forest_segment([image[q] for q in train], rf_labels, image[test], seed=0,
                                                n_estimators=trees)
        points["random forest (drawings)"].append((seconds, dice(labels > 0, truth)))
    return points


def recursive_points(quadrant: int) -> dict:
    image, expert = load_dsb_nuclei()
    partial = recursive_benchmark.simulated_partial()
    image_tiles, expert_tiles, partial_tiles = (recursive_benchmark.tiles_of(a) for a in (image, expert, partial))
    held_out = recursive_benchmark.quadrant_tiles(quadrant)
    train = [i for i in range(16) if i not in held_out]
    strong_tile = recursive_benchmark.strong_tile_of(train, expert_tiles)
    strong = [(expert_tiles[i] > 0).astype(np.uint8) if i == strong_tile else None for i in train]
    tests, truths = [image_tiles[i] for i in held_out], [expert_tiles[i] for i in held_out]
    points = {"recursive": [], "random forest (partial masks)": []}
    for steps in RECURSIVE_STEPS:
        model, seconds = timed(lambda steps=steps: run_to_end(train_recursive(
            [image_tiles[i] for i in train], [partial_tiles[i] for i in train], strong, steps=steps,
            device="cpu")))
        points["recursive"].append((seconds, recursive_benchmark.pooled_dice(
            [predict(model, t, device="cpu").labels for t in tests], truths)))
    rf_labels = recursive_benchmark.random_forest_labels(train, strong_tile, expert_tiles, partial_tiles)
    for trees in TREES:
        predictions, seconds = random_forest_segment([image_tiles[i] for i in train], rf_labels, tests, seed=0,
                                                     n_estimators=trees)
        points["random forest (partial masks)"].append((seconds, recursive_benchmark.pooled_dice(predictions,
                                                                                                 truths)))
    return points


def time_to_reach(points, target: float):
    """Seconds of the fastest run reaching ``target`` (None if none does)."""
    reached = [seconds for seconds, value in points if value >= target]
    return min(reached) if reached else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    curves = {**refineseg_points(args.fold), **recursive_points(args.fold)}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"Budget sweep, fold {args.fold}, CPU, {args.threads} threads; one complete run per point. "
             f"Time to reach Dice {args.target:.2f} on the held-out data:", "",
             "| method | runs (training s: Dice) | time to reach |", "|---|---|---|"]
    for name, points in curves.items():
        reach = time_to_reach(points, args.target)
        runs = ", ".join(f"{s:.1f}: {d:.3f}" for s, d in points)
        lines.append(f"| {name} | {runs} | {'not reached' if reach is None else f'{reach:.1f} s'} |")
    text = "\n".join(lines) + "\n"
    write_results(out, "curves", text, {"fold": args.fold, "target": args.target, "curves": curves})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=120, sharey=True)
    pairs = [("refineseg", "random forest (drawings)"), ("recursive", "random forest (partial masks)")]
    for axis, pair in zip(axes, pairs, strict=True):
        for name in pair:
            seconds, values = zip(*curves[name], strict=True)
            axis.plot(seconds, values, "o-", label=name)
        axis.axhline(args.target, color="grey", lw=0.8, ls="--")
        axis.set_xscale("log")
        axis.set_xlabel("training seconds (log)")
        axis.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("held-out Dice")
    figure.tight_layout()
    figure.savefig(out / "curves.png")
    plt.close(figure)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
