"""Accuracy of RefineSeg against peers on the real DSB 2018 nuclei image, 4 folds.

Each fold trains on three 256 x 256 quadrants and tests on the fourth against
the expert mask. The drawings come from ``coarseseg simulate --instances``
with its default erosion (2-4 px) and negative margin (4 px). Compared, on
the same drawings and the same training budget:

- refineseg: this package, DEFAULT settings (models/refineseg.json);
- (a) naive: the same U-Net trained on the positive drawings as if they were
  full masks (everything undrawn counts as background);
- (b) random forest: scikit-image's trainable segmentation
  (multiscale_basic_features + random forest), positives vs negatives;
- (c) full: the same U-Net fully supervised on the expert mask.

Every method runs with seeds 0..N-1 (``--seeds``, default 3: training
order, augmentation and initialisation for the networks, the trees for the
random forest); cells give the mean over seeds and the lowest and highest.

Usage::

    python benchmarks/accuracy.py [--threads 2] [--device cpu] [--folds 0 1 2 3] [--seeds 3] [--out benchmarks/results]

Writes ``accuracy.md`` (table) and ``accuracy.json`` into the output folder.
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

from napari_coarseseg import load_preset, predict, run_to_end, train_refineseg  # noqa: E402
from napari_coarseseg.cli import main as coarseseg  # noqa: E402
from napari_coarseseg.demo import dice  # noqa: E402
from napari_coarseseg.samples import load_dsb_nuclei, sample_data_dir  # noqa: E402

from baselines import predict_dense, random_forest_segment, train_dense  # noqa: E402
from report import dice_rows, margins_over_baselines, write_results  # noqa: E402

QUADRANTS = [np.s_[:256, :256], np.s_[:256, 256:], np.s_[256:, :256], np.s_[256:, 256:]]
METHODS = ["refineseg", "naive (a)", "random forest (b)", "full (c)"]


def simulated_drawings():
    """Drawings exactly as ``coarseseg simulate LABELS --out-dir D --instances`` writes them."""
    with tempfile.TemporaryDirectory() as folder:
        labels = sample_data_dir() / "dsb2018_nuclei" / "labels.tif"
        status = coarseseg(["simulate", str(labels), "--out-dir", folder, "--instances"])
        if status != 0:
            raise SystemExit("coarseseg simulate failed")
        return tifffile.imread(Path(folder) / "positive.tif"), tifffile.imread(Path(folder) / "negative.tif")


def random_forest_labels(positive, negative, regions) -> list[np.ndarray]:
    """The drawings in scikit-image's convention (0 unlabelled, 1 background, 2 foreground), per region."""
    return [np.where(positive[q] > 0, 2, np.where(negative[q] > 0, 1, 0)) for q in regions]


def run_fold(fold: int, seed: int, image, expert, positive, negative, device: str) -> dict:
    """Train every method on the three other quadrants; ``{method: (held-out Dice, training seconds)}``."""
    test = QUADRANTS[fold]
    train = [q for i, q in enumerate(QUADRANTS) if i != fold]
    truth = expert[test] > 0
    config = load_preset("refineseg")
    result = {}

    start = time.perf_counter()
    model = run_to_end(train_refineseg([image[q] for q in train], [[positive[q] for q in train]],
                                       [[negative[q] for q in train]], config=config, seed=seed, device=device))
    seconds = time.perf_counter() - start
    result["refineseg"] = (dice(predict(model, image[test], device=device).labels > 0, truth), seconds)

    network, seconds = train_dense([image[q] for q in train], [positive[q] > 0 for q in train], config,
                                   seed=seed, device=device)
    result["naive (a)"] = (dice(predict_dense(network, image[test], device) > 0, truth), seconds)

    rf_labels = random_forest_labels(positive, negative, train)
    labels, seconds = random_forest_segment([image[q] for q in train], rf_labels, image[test], seed=seed)
    result["random forest (b)"] = (dice(labels > 0, truth), seconds)

    network, seconds = train_dense([image[q] for q in train], [expert[q] > 0 for q in train], config,
                                   seed=seed, device=device)
    result["full (c)"] = (dice(predict_dense(network, image[test], device) > 0, truth), seconds)
    return result


def table(results: dict, folds: list[int]) -> str:
    """Markdown table from ``results[method][fold] = [(dice, seconds) per seed]``."""
    lines = ["| method | " + " | ".join(f"fold {f}" for f in folds) + " | mean Dice | train s / fold |",
             "|---" * (len(folds) + 3) + "|"]
    lines += dice_rows(results, folds)
    margins = margins_over_baselines(results, "refineseg", ["naive (a)", "random forest (b)"], folds)
    lines += ["", "RefineSeg minus the best baseline (a, b), per fold: " + ", ".join(f"{m:+.3f}" for m in margins)
              + f"; worst single run of RefineSeg {min(d for f in folds for d, _ in results['refineseg'][f]):.3f}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every method (default 3)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    image, expert = load_dsb_nuclei()
    positive, negative = simulated_drawings()
    seeds = list(range(args.seeds))
    results = {method: {fold: [] for fold in args.folds} for method in METHODS}
    for fold in args.folds:
        for seed in seeds:
            runs = run_fold(fold, seed, image, expert, positive, negative, args.device)
            for method, run in runs.items():
                results[method][fold].append(run)
            print(f"fold {fold} seed {seed}: " + ", ".join(f"{m} {d:.3f} ({s:.0f} s)" for m, (d, s) in runs.items()),
                  flush=True)

    config = load_preset("refineseg")
    header = (f"DSB 2018 nuclei, 4-fold quadrants, drawings from `coarseseg simulate --instances` (defaults). "
              f"Device {args.device}, {args.threads} torch threads, {platform.processor() or platform.machine()}; "
              f"refineseg defaults: {config.steps} steps, batch {config.batch_size}, patch {config.patch_size}. "
              "Dice of the foreground on the held-out quadrant; random forest seconds include feature "
              f"computation on the test quadrant. Cells: mean over seeds {seeds} (lowest-highest).")
    text = header + "\n\n" + table(results, args.folds) + "\n"
    write_results(args.out, "accuracy", text, {
        "device": args.device, "threads": args.threads, "seeds": seeds, "config": vars(config),
        "results": {method: {str(f): {"dice": [d for d, _ in runs], "seconds": [s for _, s in runs]}
                             for f, runs in per_fold.items()} for method, per_fold in results.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
