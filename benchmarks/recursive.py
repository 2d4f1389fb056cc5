"""Recursive approximation on the real DSB 2018 nuclei image, against its peers.

The 512 x 512 image is cut into 16 tiles of 128 x 128. In each of 4 folds the
4 tiles of one quadrant are held out; the 12 others carry partial masks (the inner ~45 % of
every nucleus, from ``coarseseg simulate --instances``) and ONE of them also
carries the expert mask as strong labels (the training tile whose nucleus
count is the median, a representative tile chosen without looking at results).
Compared, with the same information and the same number of optimiser steps:

- recursive: this package, DEFAULT settings (models/recursive.json);
- SL: a U-Net on the strong tile only (the paper's strong-label baseline);
- WL: a U-Net on the partial masks only, taken as full masks (weak-label baseline);
- RF: scikit-image's trainable segmentation (multiscale_basic_features + random
  forest) on the same information: foreground = partial masks and the strong
  tile's nuclei, background = the strong tile's background;
- for reference only, a U-Net fully supervised on the 12 training tiles' expert
  masks: the ceiling, not a baseline (it sees every exact mask).

Every trained method runs with seeds 0..N-1 (``--seeds``, default 3). Reports
the approximation Dice on the 12 training tiles at every iteration (like the
paper's Figure 7) and the Dice on the held-out tiles (pooled), per fold. About
14 minutes on 2 CPU cores.

Usage::

    python benchmarks/recursive.py [--threads 2] [--device cpu] [--quadrants 0,1,2,3] [--seeds 3] \
        [--out benchmarks/results]

Writes ``recursive.md``, ``recursive.json`` and ``recursive_iterations.png``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from napari_coarseseg import load_preset, predict, run_to_end, train_recursive  # noqa: E402
from napari_coarseseg.cli import main as coarseseg  # noqa: E402
from napari_coarseseg.demo import dice  # noqa: E402
from napari_coarseseg.samples import as_tiles, load_dsb_nuclei, sample_data_dir  # noqa: E402

from baselines import predict_dense, random_forest_segment, train_dense  # noqa: E402
from report import dice_rows, margins_over_baselines, mean_dice, write_results  # noqa: E402

TILE = 128


def tiles_of(array: np.ndarray) -> list[np.ndarray]:
    """The 16 tiles of a 512 x 512 array, row by row (the tiles sample's layout)."""
    return list(as_tiles(array, TILE))


def strong_tile_of(train: list[int], expert_tiles) -> int:
    """The training tile whose nucleus count is the median: the one that carries exact masks."""
    counts = [len(np.unique(expert_tiles[i])) - 1 for i in train]
    return train[int(np.argsort(counts)[len(counts) // 2])]


def random_forest_labels(train: list[int], strong_tile: int, expert_tiles, partial_tiles) -> list[np.ndarray]:
    """The same information for the random forest, in scikit-image's convention (0 unlabelled, 1 background,
    2 foreground): foreground = partial masks and the strong tile's nuclei, background = the strong tile's rest."""
    return [np.where(expert_tiles[i] > 0, 2, 1) if i == strong_tile else np.where(partial_tiles[i] > 0, 2, 0)
            for i in train]


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


def plot_iterations(dices: dict, held_out: dict, path: Path) -> None:
    """Left: approximation Dice per iteration, one line per fold. Right: held-out Dice per method and fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6), dpi=120, gridspec_kw={"width_ratios": [1, 1.1]})
    # One colour per held-out quadrant, one marker per seed: every run is drawn.
    quadrants = sorted({label.split(" held out")[0] for label in dices})
    for label, values in dices.items():
        quadrant = label.split(" held out")[0]
        seed = int(label.rsplit("seed ", 1)[1]) if "seed " in label else 0
        left.plot(np.arange(len(values)), values, marker="os^vD<>p"[seed % 8], ms=4, lw=1.0,
                  color=f"C{quadrants.index(quadrant)}", label=label.split(",")[0] if seed == 0 else None)
    n_iterations = max(len(v) for v in dices.values())
    left.set_xticks(range(n_iterations))
    left.set_xlabel("iteration k (0 = the partial masks)")
    left.set_ylabel("Dice against the expert mask")
    left.set_title("Approximations on the training tiles", fontsize=10)
    left.legend(fontsize=7, loc="lower right", title="markers: seeds 0, 1, 2 (o s ^)", title_fontsize=7)

    names = list(held_out)
    for row, name in enumerate(names):
        values = np.asarray(held_out[name], dtype=float)
        right.barh(row, values.mean(), color="tab:green" if name == "recursive" else "lightgrey", height=0.6)
        right.plot(values, np.full(len(values), row), "k.", ms=4)  # one dot per fold (mean over seeds)
        right.text(0.505, row, f"mean {values.mean():.3f}", va="center", ha="left", fontsize=8)
    right.set_yticks(range(len(names)), [name.replace(" (", "\n(") for name in names], fontsize=7)
    right.invert_yaxis()
    right.set_xlim(0.5, 1.0)
    right.set_xlabel("held-out Dice (bar: mean; dots: folds)")
    right.set_title("Held-out quadrants", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--quadrants", default="0,1,2,3", help="held-out quadrants, one fold each (default 0,1,2,3)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every trained method (default 3)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    image, expert = load_dsb_nuclei()
    partial = simulated_partial()
    image_tiles, expert_tiles, partial_tiles = tiles_of(image), tiles_of(expert), tiles_of(partial)
    config = load_preset("recursive")
    total_steps = config.steps * config.iterations
    dense = config.replace(steps=total_steps)
    seeds = list(range(args.seeds))
    quadrants = [int(q) for q in args.quadrants.split(",")]

    # method -> quadrant -> per-seed (held-out Dice, training seconds)
    results: dict[str, dict[int, list[tuple[float, float]]]] = {}
    iteration_dice: dict[str, list[float]] = {}
    strong_tiles = {}
    for quadrant in quadrants:
        held_out = quadrant_tiles(quadrant)
        train = [i for i in range(16) if i not in held_out]
        strong_tile = strong_tiles[quadrant] = strong_tile_of(train, expert_tiles)
        images = [image_tiles[i] for i in train]
        strong = [(expert_tiles[i] > 0).astype(np.uint8) if i == strong_tile else None for i in train]
        truths = [expert_tiles[i] for i in train]
        test_images, test_truths = [image_tiles[i] for i in held_out], [expert_tiles[i] for i in held_out]

        def record(name, value, seed, quadrant=quadrant):
            results.setdefault(name, {}).setdefault(quadrant, []).append(value)
            print(f"quadrant {quadrant} seed {seed}, {name}: held-out Dice {value[0]:.3f}, {value[1]:.0f} s",
                  flush=True)

        for seed in seeds:
            evolution = []
            start = time.perf_counter()
            model = run_to_end(
                train_recursive(images, [partial_tiles[i] for i in train], strong, config=config,
                                device=args.device, seed=seed),
                lambda event, evolution=evolution: evolution.append(event.masks) if event.masks is not None else None,
            )
            seconds = time.perf_counter() - start
            per_iteration = [pooled_dice(masks, truths) for masks in evolution]
            iteration_dice[f"quadrant {quadrant} held out, seed {seed}"] = per_iteration
            print(f"quadrant {quadrant} seed {seed}: approximation Dice per iteration "
                  f"{np.round(per_iteration, 3).tolist()}", flush=True)
            record("recursive", (pooled_dice([predict(model, t, device=args.device).labels for t in test_images],
                                             test_truths), seconds), seed)
            dense_runs = {
                "SL (U-Net, strong tile only)": ([image_tiles[strong_tile]], [strong[train.index(strong_tile)]]),
                "WL (U-Net, partial masks as full masks)": (images, [partial_tiles[i] > 0 for i in train]),
                "reference: U-Net on all 12 exact masks": (images, [t > 0 for t in truths]),
            }
            for name, (train_images, masks) in dense_runs.items():
                network, s = train_dense(train_images, masks, dense, seed=seed, device=args.device)
                record(name, (pooled_dice([predict_dense(network, t, args.device) for t in test_images],
                                          test_truths), s), seed)
            # scikit-image convention: 0 unlabelled, 1 background, 2 foreground.
            rf_labels = random_forest_labels(train, strong_tile, expert_tiles, partial_tiles)
            predictions, s = random_forest_segment(images, rf_labels, test_images, seed=seed)
            record("RF (same information)", (pooled_dice(predictions, test_truths), s), seed)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"DSB 2018 nuclei, 16 tiles of 128 x 128. Per fold one quadrant's 4 tiles are held out; the 12 "
              f"training tiles carry partial masks (`coarseseg simulate --instances`, inner 45 %) and one of them "
              f"(the median nucleus count; per quadrant {strong_tiles}) also the expert mask. Device {args.device}, "
              f"{args.threads} torch threads, {platform.processor() or platform.machine()}. Defaults: "
              f"{config.iterations} iterations of {config.steps} steps, epsilon {config.epsilon_train} (training) "
              f"and {config.epsilon_predict} (prediction); the U-Net baselines get the same {total_steps} steps and "
              f"augmentation. Seeds {seeds}. The last row is a ceiling for reference, not a baseline: it sees every "
              "exact mask.")
    n_iterations = max(len(v) for v in iteration_dice.values())
    lines = [f"Approximation Dice on the 12 training tiles, iteration 0 = the partial masks (mean over seeds {seeds}):",
             "", "| fold | " + " | ".join(f"k={k}" for k in range(n_iterations)) + " | gain |",
             "|---" * (n_iterations + 2) + "|"]
    for quadrant in quadrants:
        runs = np.array([values for label, values in iteration_dice.items()
                         if label.startswith(f"quadrant {quadrant} held out")])
        gains = runs[:, -1] - runs[:, 0]
        lines.append(f"| quadrant {quadrant} held out | " + " | ".join(f"{d:.3f}" for d in runs.mean(0))
                     + f" | {gains.mean():+.3f} |")
    lines += ["", "Held-out Dice (pooled over the 4 held-out tiles; mean over seeds):", "",
              "| method | " + " | ".join(f"quadrant {q}" for q in quadrants) + " | mean | train s |",
              "|---" * (len(quadrants) + 3) + "|"]

    lines += dice_rows(results, quadrants)
    if len(seeds) > 1:
        lines.append(f"\nCells: mean over seeds {seeds} (lowest-highest).")
    baselines = [name for name in results if name != "recursive" and not name.startswith("reference")]
    margins = margins_over_baselines(results, "recursive", baselines, quadrants)
    lines.append("\nRecursive minus the best baseline, per quadrant: "
                 + ", ".join(f"{m:+.3f}" for m in margins) + ".")
    gains = [values[-1] - values[0] for values in iteration_dice.values()]
    worst = {name: min(d for q in quadrants for d, _ in per_quadrant[q]) for name, per_quadrant in results.items()}
    lines.append(f"Gain of the approximations over the {len(gains)} runs: {min(gains):+.3f} to {max(gains):+.3f}. "
                 "Worst single held-out run: " + ", ".join(f"{name.split(' (')[0]} {d:.3f}"
                                                           for name, d in worst.items()) + ".")
    text = header + "\n\n" + "\n".join(lines) + "\n"
    write_results(out, "recursive", text, {
        "device": args.device, "threads": args.threads, "quadrants": quadrants, "seeds": seeds,
        "strong_tiles": strong_tiles, "config": vars(config), "approximation_dice": iteration_dice,
        "results": {name: {str(q): {"dice": [d for d, _ in runs], "seconds": [s for _, s in runs]}
                           for q, runs in per_quadrant.items()} for name, per_quadrant in results.items()}})
    plot_iterations(iteration_dice,
                    {name: [mean_dice(per_quadrant[q]) for q in quadrants] for name, per_quadrant in results.items()},
                    out / "recursive_iterations.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
