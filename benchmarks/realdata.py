"""Accuracy on real data with hand-like (scribble) drawings: fixed splits, validation-chosen settings, 3 seeds.

Data sets (each with a fixed train / validation / test split; no image or
slice is in two splits):

- ``dsb2018_nuclei``: the DSB 2018 fluorescence nuclei image (512 x 512,
  CC0), cut into quadrants of 256 x 256: train = top-left and top-right,
  validation = bottom-left, test = bottom-right.
- ``isbi2012_em``: the ISBI 2012 serial-section EM stack (30 slices of
  512 x 512; Cardona et al., PLoS Biology 2010; Arganda-Carreras et al.,
  Frontiers in Neuroanatomy 2015; ``benchmarks/data/isbi2012_em``): train =
  slices 0-5, validation = 13-15, test = 24-29 (slices far apart, 50 nm each).
  Class 1 = cell interior, background = membranes.

Drawings: ``simulate(..., style="scribble")`` on the training images' expert
masks with the data set's brush settings (``DRAWING``), seeded by the run's
seed: each seed is a different annotator as well as a different network
initialisation. The bias sweep dilates (b > 0) or erodes every positive
stroke by b px; "two annotators" gives two positive layers with biases +b
and -b.

Methods (same drawings, same budget):

- ``refineseg``: this package, a variant of the ``refineseg`` preset;
- ``no heads (a)``: the same with ``transition_heads=False`` (a partial
  cross-entropy + Dice on positives and negatives);
- ``naive (b)``: the same U-Net with dense cross-entropy, the positive
  strokes taken as the full mask (everything else, negatives included, is
  background);
- ``random forest (c)``: multiscale_basic_features + a random forest
  (ilastik-style), positives vs negatives, its trees, depth and feature
  scales chosen on validation like our settings;
- ``full (d)``: the same U-Net on the expert masks of the training images
  (a ceiling, not a baseline).

Every run is scored on the validation AND the test split at once and stored
in ``realdata_runs.json`` (one record per data set, method, variant, bias
and seed; runs already there are skipped, so the script can be resumed).
The report picks, per method and data set, the variant with the best mean
VALIDATION Dice over the seeds, and shows its test scores: the test split
never chooses anything. Scores: foreground Dice pooled over the split's
images; object F1 at IoU 0.5 and mean average precision over IoU 0.5-0.9
(stardist-style matching) on connected components of the prediction.

Usage::

    python benchmarks/realdata.py run [--datasets ...] [--methods ...] [--variants ...] [--seeds 3] [--bias 0]
    python benchmarks/realdata.py report [--out benchmarks/results]

Writes ``realdata.md`` and ``realdata.json`` into the output folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import tifffile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from napari_coarseseg import load_preset, predict, run_to_end, simulate, train_refineseg  # noqa: E402
from napari_coarseseg.metrics import dice, instances_of, match_instances, mean_average_precision  # noqa: E402
from napari_coarseseg.samples import load_dsb_nuclei  # noqa: E402

from baselines import feature_seconds, predict_dense, random_forest_fit, random_forest_predict, train_dense  # noqa: E402
from report import mean_and_spread, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS_FILE = HERE / "results" / "realdata_runs.json"


@dataclass
class Dataset:
    """Images and expert instance masks of one data set, per split (lists of 2-D arrays)."""

    name: str
    images: dict
    labels: dict
    description: str


QUADRANTS = {"top-left": np.s_[:256, :256], "top-right": np.s_[:256, 256:], "bottom-left": np.s_[256:, :256],
             "bottom-right": np.s_[256:, 256:]}
DSB_SPLITS = {"train": ["top-left", "top-right"], "val": ["bottom-left"], "test": ["bottom-right"]}
EM_SPLITS = {"train": list(range(0, 6)), "val": list(range(13, 16)), "test": list(range(24, 30))}

# Brush settings of the simulated annotator per data set. Nuclei: the package's scribble defaults. EM: the
# membranes are 2-6 px wide, so the negative strokes are short 3-4 px dabs on the membrane itself (margin 0,
# little edge noise), and with ~100 cells per slice the positive strokes cover less of each cell (15 %).
DRAWING = {
    "dsb2018_nuclei": {},
    "isbi2012_em": {"margin": 0, "edge_noise": 0.5, "brush_width": (3, 4), "coverage": 0.15,
                    "negative_coverage": 0.3},
}


@lru_cache(maxsize=None)
def load_dataset(name: str) -> Dataset:
    """The data set ``name`` split into train, val and test."""
    if name == "dsb2018_nuclei":
        image, labels = load_dsb_nuclei()
        pick = {s: [QUADRANTS[q] for q in qs] for s, qs in DSB_SPLITS.items()}
        return Dataset(name, {s: [image[q] for q in qs] for s, qs in pick.items()},
                       {s: [labels[q] for q in qs] for s, qs in pick.items()},
                       "DSB 2018 nuclei, quadrants: train " + ", ".join(DSB_SPLITS["train"])
                       + f"; val {DSB_SPLITS['val'][0]}; test {DSB_SPLITS['test'][0]}")
    if name == "isbi2012_em":
        folder = HERE / "data" / "isbi2012_em"
        image, labels = tifffile.imread(folder / "image.tif"), tifffile.imread(folder / "labels.tif")
        return Dataset(name, {s: [image[i] for i in ix] for s, ix in EM_SPLITS.items()},
                       {s: [labels[i] for i in ix] for s, ix in EM_SPLITS.items()},
                       "ISBI 2012 EM, slices: train 0-5, val 13-15, test 24-29")
    raise SystemExit(f"unknown data set {name!r}; known: {', '.join(DRAWING)}")


def drawings_of(data: Dataset, seed: int, bias: int = 0, annotators: int = 1):
    """Scribble drawings on the training images: (positive layers, negative layers), each a list per image.

    With ``annotators=2`` the positive drawing is two layers, biases +bias
    and -bias, from two different annotator seeds.
    """
    settings = DRAWING[data.name]
    biases = [bias] if annotators == 1 else [bias, -bias]
    positive_layers, negative = [], None
    for a, b in enumerate(biases):
        per_image = [simulate(labels, instances=True, style="scribble", seed=1000 * seed + 10 * i + a, bias=b,
                              **settings) for i, labels in enumerate(data.labels["train"])]
        positive_layers.append([d.positive for d in per_image])
        if negative is None:
            negative = [d.negative for d in per_image]
    return positive_layers, [negative]


# Variants of our network's settings tried on validation (overrides of the preset). The first is the preset.
REFINESEG_VARIANTS = {
    "preset": {},
}
# The forest's grid: scikit-image's example uses 50 trees, depth 10 and 5 % of the drawn pixels per tree;
# ilastik grows 100 trees on all of them.
RF_VARIANTS = {f"trees {t}, depth {d}, sigma 1-{s}, samples {m}": {"n_estimators": t, "max_depth": d, "sigma_max": s,
                                                                  "max_samples": m}
               for t in (50, 100) for d in (10, None) for s in (4, 8, 16) for m in (0.05, 0.5)}
DENSE_VARIANTS = {"preset": {}}


def score(predictions, truths) -> dict:
    """Dice of the foreground pooled over the images; F1 at IoU 0.5 and mAP 0.5-0.9 of connected components."""
    prediction, truth = np.stack(predictions), np.stack(truths)
    instances = np.stack([instances_of(p > 0) for p in predictions])
    matched = match_instances(instances, truth, 0.5)
    return {"dice": dice(prediction > 0, truth > 0), "f1": matched["f1"],
            "map": mean_average_precision(instances, truth)}


def run_network(method: str, data: Dataset, positive, negative, seed: int, overrides: dict, device: str):
    """Train one network method; return ``(predict function, training seconds)``."""
    images = data.images["train"]
    config = load_preset("refineseg").replace(**overrides)
    start = time.perf_counter()
    if method in ("refineseg", "no heads (a)"):
        config = config.replace(transition_heads=method == "refineseg")
        model = run_to_end(train_refineseg(images, positive, negative, config=config, seed=seed, device=device))
        return (lambda image: predict(model, image, device=device).labels), time.perf_counter() - start
    if method == "naive (b)":
        masks = [sum(layer[i] > 0 for layer in positive) > 0 for i in range(len(images))]
    elif method == "full (d)":
        masks = [labels > 0 for labels in data.labels["train"]]
    else:
        raise ValueError(method)
    network, seconds = train_dense(images, masks, config, seed=seed, device=device)
    return (lambda image: predict_dense(network, image, device)), seconds


def run_random_forest(data: Dataset, positive, negative, seed: int, settings: dict):
    """Fit the forest on the strokes; return ``(predict function, fit seconds)``."""
    strokes = [np.where(sum(layer[i] > 0 for layer in positive) > 0, 2, np.where(negative[0][i] > 0, 1, 0))
               for i in range(len(data.images["train"]))]
    start = time.perf_counter()
    forest = random_forest_fit(data.images["train"], strokes, seed=seed, **settings)
    # The training images' features are cached across variants: count what they took when first computed.
    seconds = time.perf_counter() - start + sum(feature_seconds(image, settings["sigma_max"])
                                                 for image in data.images["train"])
    return (lambda image: random_forest_predict(forest, image)), seconds


METHODS = {"refineseg": REFINESEG_VARIANTS, "no heads (a)": REFINESEG_VARIANTS, "naive (b)": DENSE_VARIANTS,
           "random forest (c)": RF_VARIANTS, "full (d)": DENSE_VARIANTS}


def record_key(dataset, method, variant, bias, annotators, seed) -> str:
    return f"{dataset}|{method}|{variant}|bias {bias}|annotators {annotators}|seed {seed}"


def load_runs(path: Path = RUNS_FILE) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_runs(runs: dict, path: Path = RUNS_FILE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(runs, indent=1, sort_keys=True))
    temporary.replace(path)


def run(args) -> int:
    torch.set_num_threads(args.threads)
    runs = load_runs()
    for name in args.datasets:
        data = load_dataset(name)
        for seed in range(args.seeds):
            positive, negative = drawings_of(data, seed, args.bias, args.annotators)
            for method in args.methods:
                variants = METHODS[method]
                for variant in args.variants or list(variants):
                    if variant not in variants:
                        continue
                    key = record_key(name, method, variant, args.bias, args.annotators, seed)
                    if key in runs and not args.force:
                        continue
                    if method == "random forest (c)":
                        segment, seconds = run_random_forest(data, positive, negative, seed, variants[variant])
                    else:
                        segment, seconds = run_network(method, data, positive, negative, seed, variants[variant],
                                                       args.device)
                    scores = {split: score([segment(image) for image in data.images[split]], data.labels[split])
                              for split in ("val", "test")}
                    runs[key] = {"dataset": name, "method": method, "variant": variant, "bias": args.bias,
                                 "annotators": args.annotators, "seed": seed, "seconds": seconds, **scores,
                                 "device": args.device, "threads": args.threads,
                                 "machine": platform.processor() or platform.machine()}
                    save_runs(runs)
                    print(f"{key}: val Dice {scores['val']['dice']:.3f}, {seconds:.0f} s", flush=True)
    return 0


def selected(runs: dict, dataset: str, method: str, bias=0, annotators=1):
    """The variant of ``method`` with the best mean validation Dice over its seeds, and its runs."""
    by_variant = {}
    for record in runs.values():
        if (record["dataset"], record["method"], record["bias"], record["annotators"]) == (
                dataset, method, bias, annotators):
            by_variant.setdefault(record["variant"], []).append(record)
    if not by_variant:
        return None, []
    best = max(by_variant, key=lambda v: (np.mean([r["val"]["dice"] for r in by_variant[v]]), len(by_variant[v])))
    return best, sorted(by_variant[best], key=lambda r: r["seed"])


def report(args) -> int:
    runs = load_runs()
    sections = []
    figures = {}
    for name in args.datasets:
        data = load_dataset(name)
        lines = [f"**{data.description}.** Scribble drawings, seeds = annotators and initialisations.", "",
                 "| method | chosen on validation | val Dice | test Dice | test F1@0.5 | test mAP 0.5-0.9 | train s |",
                 "|---|---|---|---|---|---|---|"]
        figures[name] = {}
        for method in METHODS:
            variant, chosen = selected(runs, name, method)
            if not chosen:
                continue
            figures[name][method] = {"variant": variant, "runs": chosen}
            lines.append(f"| {method} | {variant} ({len(chosen)} seeds) | "
                         + mean_and_spread([r["val"]["dice"] for r in chosen]) + " | "
                         + " | ".join(mean_and_spread([r["test"][m] for r in chosen]) for m in ("dice", "f1", "map"))
                         + f" | {np.mean([r['seconds'] for r in chosen]):.0f} |")
        sections.append("\n".join(lines))
    text = "\n\n".join(sections) + "\n"
    write_results(args.out, "realdata", text, figures)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--datasets", nargs="+", default=list(DRAWING))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--variants", nargs="+", help="only these variants (default: all of each method)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--bias", type=int, default=0, help="annotator bias in px (default 0)")
    parser.add_argument("--annotators", type=int, default=1, choices=[1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--force", action="store_true", help="redo runs already recorded")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
