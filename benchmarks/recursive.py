"""Recursive approximation on the real DSB 2018 nuclei image, against its peers.

The 512 x 512 image is cut into 16 tiles of 128 x 128. The 4 tiles of one
quadrant are held out; the 12 others carry partial masks (the inner ~45 % of
every nucleus, from ``coarseseg simulate --instances``) and ONE of them also
carries the expert mask as strong labels (the training tile whose nucleus
count is the median, a representative tile chosen without looking at results).
Compared, with the same information and the same number of optimiser steps:

- recursive: this package, DEFAULT settings (models/recursive.json);
- SL: a U-Net on the strong tile only (the paper's strong-label baseline);
- WL: a U-Net on the partial masks only, taken as full masks (weak-label baseline);
- RF: scikit-image's trainable segmentation (multiscale_basic_features + random
  forest) on the same information: foreground = partial masks and the strong
  tile's nuclei, background = the strong tile's background.

Reports the approximation Dice on the 12 training tiles at every iteration
(like the paper's Figure 7) and the Dice on the held-out tiles (pooled).

Usage::

    python benchmarks/recursive.py [--threads 2] [--device cpu] [--quadrant 3] [--out benchmarks/results]

Writes ``recursive.md``, ``recursive.json`` and ``recursive_iterations.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import predict_dense, random_forest_segment, train_dense  # noqa: E402

from napari_coarseseg import load_preset, predict, run_to_end  # noqa: E402
from napari_coarseseg.cli import main as coarseseg  # noqa: E402
from napari_coarseseg.demo import dice  # noqa: E402
from napari_coarseseg.recursive import train_recursive  # noqa: E402
from napari_coarseseg.samples import load_dsb_nuclei, sample_data_dir  # noqa: E402

TILE = 128


def tiles_of(array: np.ndarray) -> list[np.ndarray]:
    """The 16 tiles of a 512 x 512 array, row by row."""
    return [array[y : y + TILE, x : x + TILE] for y in range(0, 512, TILE) for x in range(0, 512, TILE)]


def quadrant_tiles(quadrant: int) -> list[int]:
    """Indices (row-major, 4 x 4 grid) of the tiles in a 256 x 256 quadrant (0 top-left ... 3 bottom-right)."""
    qy, qx = divmod(quadrant, 2)
    return [(2 * qy + dy) * 4 + 2 * qx + dx for dy in range(2) for dx in range(2)]


def simulated_partial() -> np.ndarray:
    """Partial masks exactly as ``coarseseg simulate LABELS --out-dir D --instances`` writes them."""
    with tempfile.TemporaryDirectory() as folder:
        labels = sample_data_dir() / "dsb2018_nuclei" / "labels.tif"
        if coarseseg(["simulate", str(labels), "--out-dir", folder, "--instances"]) != 0:
            raise SystemExit("coarseseg simulate failed")
        return tifffile.imread(Path(folder) / "partial.tif")


def pooled_dice(predictions, truths) -> float:
    return dice(np.concatenate([np.ravel(p > 0) for p in predictions]),
                np.concatenate([np.ravel(t > 0) for t in truths]))


def plot_iterations(dices: list[float], baselines: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.4), dpi=120)
    axis.plot(range(len(dices)), dices, "o-", color="tab:green", label="approximation (training tiles)")
    axis.axhline(dices[0], color="grey", lw=0.8, ls=":")
    axis.set_xlabel("iteration k")
    axis.set_ylabel("Dice against the expert mask")
    axis.set_title("Recursive approximation on DSB 2018 nuclei")
    axis.set_ylim(min(dices[0], *baselines.values()) - 0.05, 1.0)
    for (name, value), style in zip(baselines.items(), ["--", "-.", ":", "--"]):
        axis.axhline(value, ls=style, lw=1, color="tab:blue", alpha=0.7)
        axis.text(len(dices) - 1, value, f" held-out {name}", va="bottom", ha="right", fontsize=7)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--quadrant", type=int, default=3, choices=range(4), help="held-out quadrant (default 3)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    image, expert = load_dsb_nuclei()
    partial = simulated_partial()
    image_tiles, expert_tiles, partial_tiles = tiles_of(image), tiles_of(expert), tiles_of(partial)
    held_out = quadrant_tiles(args.quadrant)
    train = [i for i in range(16) if i not in held_out]
    counts = [len(np.unique(expert_tiles[i])) - 1 for i in train]
    strong_tile = train[int(np.argsort(counts)[len(counts) // 2])]

    config = load_preset("recursive")
    images = [image_tiles[i] for i in train]
    strong = [(expert_tiles[i] > 0).astype(np.uint8) if i == strong_tile else None for i in train]
    truths = [expert_tiles[i] for i in train]
    test_images, test_truths = [image_tiles[i] for i in held_out], [expert_tiles[i] for i in held_out]

    evolution = []
    start = time.perf_counter()
    model = run_to_end(
        train_recursive(images, [partial_tiles[i] for i in train], strong, config=config, device=args.device),
        lambda event: evolution.append(event.masks) if event.masks is not None else None,
    )
    seconds = time.perf_counter() - start
    iteration_dice = [pooled_dice(masks, truths) for masks in evolution]
    results = {"recursive": (pooled_dice([predict(model, t, device=args.device).labels for t in test_images],
                                         test_truths), seconds)}
    print(f"recursive: approximation Dice per iteration {np.round(iteration_dice, 3).tolist()}, held-out "
          f"{results['recursive'][0]:.3f}, {seconds:.0f} s", flush=True)

    total_steps = config.steps * config.iterations
    dense = config.replace(steps=total_steps)
    network, s = train_dense([image_tiles[strong_tile]], [strong[train.index(strong_tile)]], dense, seed=0,
                             device=args.device)
    results["SL (strong tile)"] = (pooled_dice([predict_dense(network, t, args.device) for t in test_images],
                                               test_truths), s)
    network, s = train_dense(images, [partial_tiles[i] > 0 for i in train], dense, seed=0, device=args.device)
    results["WL (partial masks)"] = (pooled_dice([predict_dense(network, t, args.device) for t in test_images],
                                                 test_truths), s)
    # scikit-image convention: 0 unlabelled, 1 background, 2 foreground.
    rf_labels = [np.where(expert_tiles[i] > 0, 2, 1) if i == strong_tile else np.where(partial_tiles[i] > 0, 2, 0)
                 for i in train]
    predictions, s = random_forest_segment(images, rf_labels, test_images, seed=0)
    results["RF (same information)"] = (pooled_dice(predictions, test_truths), s)
    for name, (d, s) in results.items():
        print(f"{name}: held-out Dice {d:.3f} ({s:.0f} s)", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"DSB 2018 nuclei, 16 tiles of 128 x 128; held out: quadrant {args.quadrant} (tiles {held_out}); "
              f"12 training tiles with partial masks (`coarseseg simulate --instances`, inner 45 %), tile "
              f"{strong_tile} also with the expert mask. Device {args.device}, {args.threads} torch threads, "
              f"{platform.processor() or platform.machine()}. Defaults: {config.iterations} iterations of "
              f"{config.steps} steps, epsilon {config.epsilon_train} (training) and {config.epsilon_predict} "
              f"(prediction); the U-Net baselines get the same {total_steps} steps.")
    lines = ["| iteration | " + " | ".join(str(k) for k in range(len(iteration_dice))) + " |",
             "|---" * (len(iteration_dice) + 1) + "|",
             "| approximation Dice (training tiles) | " + " | ".join(f"{d:.3f}" for d in iteration_dice) + " |",
             "", "| method | held-out Dice | train s |", "|---|---|---|"]
    lines += [f"| {name} | {d:.3f} | {s:.0f} |" for name, (d, s) in results.items()]
    text = header + "\n\n" + "\n".join(lines) + "\n"
    (out / "recursive.md").write_text(text)
    (out / "recursive.json").write_text(json.dumps(
        {"device": args.device, "threads": args.threads, "quadrant": args.quadrant, "strong_tile": strong_tile,
         "config": vars(config), "approximation_dice": iteration_dice,
         "results": {name: {"dice": d, "seconds": s} for name, (d, s) in results.items()}}, indent=2))
    plot_iterations(iteration_dice, {name: d for name, (d, _) in results.items()}, out / "recursive_iterations.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
