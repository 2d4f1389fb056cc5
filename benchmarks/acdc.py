"""Cardiac cine MRI with real scribbles (ACDC): where shape and context, not texture, tell structures apart.

Data: the ``acdc_scribbles`` folder (default ``../shared/data/acdc_scribbles``
beside the repository, or ``--data``): short-axis cine MRI volumes of
patients 1-80, two frames each, with expert masks (1 right ventricle RV,
2 myocardium MYO, 3 left ventricle LV) and the manual scribbles of Valvano
et al. Never copied into the repository (research use only). Cite, when
reporting results on it: Bernard et al., IEEE TMI 37(11) 2018 (ACDC);
Valvano, Leo and Tsaftaris, IEEE TMI 40(8) 2021 (the scribbles); Luo et
al., MICCAI 2022 (HiLab-git/WSL4MIS, whose resampled slices these are).

Splits, by patient, fixed before any run: training patients 1-40,
validation 41-60 (the only volumes a setting is chosen on), test 61-80
(scored once per configuration and seed). Budgets: ``quick``, 20
training volumes (one frame of each odd-numbered training patient, end-
diastole and end-systole in turn), at most 15 minutes of training on 2 CPU
cores; ``full``, all 80 training volumes (both frames of patients 1-40) and
three times the steps (5,400, the CPU time it takes stated). ``--steps N``
trains a budget's networks for N steps instead, recorded as its own budget
(``full, 1800 steps``): the points of a learning curve. The full budget's
networks show no evolution while they train (``evolution_every`` 0: the
masks on 80 volumes every 300 steps would cost minutes and change nothing).

Drawing protocols:

- ``scribbles``: the real scribbles, classes 1-3 as the positive layer and
  scribble 0 as the background layer (the forest: the same four classes);
- ``coarse``: the RefineSeg paper's protocol, each slice's expert mask
  eroded by 2-4 px as the positive layer and "not class k" beyond 4 px of
  class k as the negative layer (``simulate(style="eroded")`` slice by
  slice: the slices are about 5-10 mm apart), and the background eroded
  the same way as the background layer (a coarse mask covers the
  background too);
- ``masks``: every slice's expert mask (classes 1-3 positive, the rest
  background): full supervision, the ceiling of a method's network.

Methods, with the same drawings and budget:

- ``anatomy``: refineseg with the ``refineseg-anatomy`` preset (half
  resolution, whole-heart patches, orientation-keeping augmentation, the
  strokes propagated by a random walker, no heads, no prior correction);
- ``anatomy, heads``: the same with a transition head per drawing layer
  (the paper's model; the verdict on the heads);
- ``anatomy, drawings only``: the same without the random walker (partial
  cross-entropy on the drawings as drawn: the naive baseline);
- ``refineseg``: the ``refineseg`` preset, the command line's default;
- ``forest (ilastik)``: the random forest as ilastik ships it (49
  features at sigma 0.3-10, 100 trees; ``baselines.ilastik_forest_fit``);
- ``forest (tuned)``: the same forest with class weights and training
  pixels chosen on validation: the strokes or the strokes and the random
  walker's propagated regions (the correction the network gets), plain or
  balanced class weights.

Scores, as in the papers: 3-D Dice per structure per volume, averaged over
the volumes, and their mean; and the 95 % Hausdorff distance in pixels (3-D,
unit spacing, as WSL4MIS computes it; a structure the prediction misses
counts as missing, reported as a count). Each prediction is scored as it
is and after keeping each structure's largest connected component
(:func:`napari_coarseseg.postprocess.largest_component_per_class`, as
WSL4MIS does), for every method alike; which of the two a method's row
reports is chosen on validation.

Usage::

    python benchmarks/acdc.py run [--data DIR] [--protocols scribbles] [--budget quick]
                                  [--methods anatomy "forest (ilastik)"] [--seeds 3] [--threads 2]
    python benchmarks/acdc.py report

Runs are kept in ``results/acdc_runs.json`` (one per protocol, budget,
method and seed; runs already there are skipped), the networks' models in
``results/acdc_models/`` (not in git: to look at or rescore a run);
writes ``acdc.md`` and ``acdc.json``.
"""

from __future__ import annotations

import argparse
import glob
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from realdata import keep_run, load_runs  # noqa: E402

from napari_coarseseg import load_preset, predict, run_to_end, save_model, simulate, train_refineseg  # noqa: E402
from napari_coarseseg.data import normalize  # noqa: E402
from napari_coarseseg.metrics import dice, hausdorff95  # noqa: E402
from napari_coarseseg.postprocess import largest_component_per_class  # noqa: E402
from napari_coarseseg.propagation import propagate_strokes  # noqa: E402

from baselines import ilastik_forest_fit, ilastik_forest_predict  # noqa: E402
from report import add_run_options, mean_and_spread, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS_FILE = HERE / "results" / "acdc_runs.json"
MODELS_DIR = HERE / "results" / "acdc_models"
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "acdc_scribbles"
STRUCTURES = {1: "RV", 2: "MYO", 3: "LV"}
NOT_DRAWN = 4  # the scribbles' value for undrawn pixels
SPLITS = {"train": range(1, 41), "validation": range(41, 61), "test": range(61, 81)}
PROTOCOLS = ("scribbles", "coarse", "masks")
BUDGETS = ("quick", "full")
#: Each budget's changes to a network's preset (the quick budget is the preset as it ships).
BUDGET_CHANGES = {"quick": {}, "full": {"steps": 5400, "evolution_every": 0}}
#: The forest's variants tried on validation (``forest (tuned)`` is the best of them there).
#: The propagated regions label nearly every pixel of a drawn slice (about 10 million in the quick budget), so those
#: variants draw each tree's bootstrap sample from 2 % of them (about as many pixels as the strokes hold): a forest
#: on all of them takes hours on one core.
FOREST_VARIANTS = {
    "strokes": {"propagated": False, "class_weight": None},
    "strokes, balanced": {"propagated": False, "class_weight": "balanced"},
    "propagated": {"propagated": True, "class_weight": None, "max_samples": 0.02},
    "propagated, balanced": {"propagated": True, "class_weight": "balanced", "max_samples": 0.02},
}
#: The networks: a preset and the settings changed from it.
NETWORKS = {
    "anatomy": ("refineseg-anatomy", {}),
    "anatomy, heads": ("refineseg-anatomy", {"transition_heads": "all"}),
    "anatomy, drawings only": ("refineseg-anatomy", {"propagation": "none"}),
    "refineseg": ("refineseg", {}),
}
METHODS = (*NETWORKS, "forest (ilastik)", "forest (tuned)")


def volume_files(folder: Path, patients) -> list[Path]:
    """The volumes of ``patients`` (both frames each), in order; a clear exit when the folder lacks them."""
    files = []
    for patient in patients:
        found = sorted(glob.glob(str(folder / f"patient{patient:03d}_frame*.npz")))
        if not found:
            raise SystemExit(f"no patient{patient:03d}_frame*.npz in {folder}: give the acdc_scribbles folder with "
                             "--data (ACDC: https://www.creatis.insa-lyon.fr/Challenge/acdc/, scribbles: "
                             "https://vios-s.github.io/multiscale-adversarial-attention-gates/data, converted "
                             "as HiLab-git/WSL4MIS's data/ACDC)")
        files += [Path(f) for f in found]
    return files


def training_files(folder: Path, budget: str) -> list[Path]:
    """``quick``: one frame of each odd-numbered training patient, the frames in turn; ``full``: all 80."""
    if budget == "full":
        return volume_files(folder, SPLITS["train"])
    return [volume_files(folder, [p])[(p // 2) % 2] for p in range(1, 41, 2)]


def load(path: Path) -> dict:
    """One volume: ``image`` (Z, Y, X) float32 in 0..1, ``label`` and ``scribble`` uint8."""
    with np.load(path) as data:
        return {"image": data["image"].astype(np.float32) / 255, "label": data["label"],
                "scribble": data["scribble"], "name": path.stem}


def drawings(volume: dict, protocol: str, seed: int) -> dict:
    """refineseg's layers for a volume: ``positive``, ``negative`` and ``background`` arrays (0: not drawn)."""
    if protocol == "scribbles":
        scribble = volume["scribble"]
        positive = np.where((scribble > 0) & (scribble < NOT_DRAWN), scribble, 0).astype(np.uint8)
        return {"positive": positive, "negative": None, "background": (scribble == 0).astype(np.uint8)}
    if protocol == "masks":
        return {"positive": volume["label"].copy(), "negative": None,
                "background": (volume["label"] == 0).astype(np.uint8)}
    positive, negative, background = (np.zeros_like(volume["label"]) for _ in range(3))
    for z, mask in enumerate(volume["label"]):
        # Slice by slice: a 3-D erosion would reach across slices 5-10 mm apart. A slice without the heart
        # carries no drawing (nothing to erode, and "not k" everywhere says nothing of the heart's shape).
        if mask.any():
            drawn = simulate(mask, style="eroded", seed=seed * 1000 + z)
            positive[z], negative[z] = drawn.positive, drawn.negative
            background[z] = simulate((mask == 0).astype(np.uint8), style="eroded",
                                     seed=seed * 1000 + z + 500).positive
    return {"positive": positive, "negative": negative, "background": background}


def score(labels: np.ndarray, truth: np.ndarray) -> dict:
    """Per structure: 3-D Dice and HD95 (px, None where the prediction or the truth misses it); the same of
    the largest components under ``"largest"``."""
    return {**score_as_is(labels, truth), "largest": score_as_is(largest_component_per_class(labels), truth)}


def score_as_is(labels: np.ndarray, truth: np.ndarray) -> dict:
    out = {}
    for k, name in STRUCTURES.items():
        out[f"dice_{name}"] = dice(labels == k, truth == k)
        distance = hausdorff95(labels == k, truth == k)
        out[f"hd95_{name}"] = None if not np.isfinite(distance) else distance
    out["dice"] = float(np.mean([out[f"dice_{n}"] for n in STRUCTURES.values()]))
    return out


def summarise(scores: list[dict]) -> dict:
    """Mean over volumes of each Dice and of each finite HD95, and the count of missed structures."""
    out = {key: float(np.mean([s[key] for s in scores])) for key in scores[0] if key.startswith("dice")}
    for name in STRUCTURES.values():
        values = [s[f"hd95_{name}"] for s in scores if s[f"hd95_{name}"] is not None]
        out[f"hd95_{name}"] = float(np.mean(values)) if values else None
        out[f"missed_{name}"] = len(scores) - len(values)
    values = [out[f"hd95_{n}"] for n in STRUCTURES.values() if out[f"hd95_{n}"] is not None]
    out["hd95"] = float(np.mean(values)) if values else None
    return out


def train_network(volumes, protocol: str, network: str, seed: int, device: str, budget_changes: dict):
    """refineseg with ``network``'s preset, its settings and the budget's on the volumes' drawings:
    ``(model, seconds)``."""
    preset, changes = NETWORKS[network]
    changes = {**changes, **budget_changes}
    layers = [drawings(v, protocol, seed) for v in volumes]
    roles = {role: [[layer[role] for layer in layers]] for role in ("positive", "negative", "background")
             if layers[0][role] is not None}
    start = time.perf_counter()
    model = run_to_end(train_refineseg([v["image"] for v in volumes], roles.get("positive", ()),
                                       roles.get("negative", ()), roles.get("background", ()),
                                       config=replace(load_preset(preset), **changes), n_classes=3, seed=seed,
                                       device=device))
    return model, time.perf_counter() - start


def forest_strokes(volume: dict, protocol: str, seed: int, propagated: bool) -> np.ndarray:
    """The forest's training labels of a volume (0 unlabelled, class k as k + 1), per slice."""
    layers = drawings(volume, protocol, seed)
    strokes = np.full(volume["label"].shape, -1, np.int64)
    if layers["background"] is not None:
        strokes[layers["background"] > 0] = 0
    strokes = np.where(layers["positive"] > 0, layers["positive"].astype(np.int64), strokes)
    if propagated:
        image = normalize(volume["image"])
        strokes = np.stack([propagate_strokes(image[z], strokes[z]) for z in range(len(strokes))])
    return strokes + 1


def train_forest(volumes, protocol: str, seed: int, threads: int, propagated=False, class_weight=None,
                 max_samples=None):
    """The ilastik forest on every drawn slice of the volumes: ``(forest, seconds)``."""
    start = time.perf_counter()
    images, labels = [], []
    for volume in volumes:
        strokes = forest_strokes(volume, protocol, seed, propagated)
        for z in np.flatnonzero((strokes > 0).any(axis=(1, 2))):
            images.append(volume["image"][z])
            labels.append(strokes[z])
    forest = ilastik_forest_fit(images, labels, seed=seed, class_weight=class_weight, max_samples=max_samples,
                                n_jobs=threads)
    return forest, time.perf_counter() - start


def forest_labels(forest, image: np.ndarray) -> np.ndarray:
    return np.stack([ilastik_forest_predict(forest, plane) for plane in image]).astype(np.uint8)


def evaluate(predict_volume, files) -> list[dict]:
    """Per-volume scores of ``predict_volume(image) -> labels`` on ``files``."""
    scores = []
    for path in files:
        volume = load(path)
        scores.append({"volume": volume["name"], **score(predict_volume(volume["image"]), volume["label"])})
    return scores


def run(args) -> int:
    torch.set_num_threads(args.threads)
    runs = load_runs(args.runs)
    folder = Path(args.data)
    validation, test = volume_files(folder, SPLITS["validation"]), volume_files(folder, SPLITS["test"])
    for budget_name in args.budgets:
        volumes = [load(p) for p in training_files(folder, budget_name)]
        budget, budget_changes = budget_name, BUDGET_CHANGES[budget_name]
        if args.steps:
            budget, budget_changes = f"{budget_name}, {args.steps} steps", {**budget_changes, "steps": args.steps}
        for protocol in args.protocols:
            for seed in range(args.seeds):
                for method in args.methods:
                    key = f"{protocol}|{budget}|{method}|seed {seed}"
                    if key in runs and not args.force:
                        continue
                    record = {"protocol": protocol, "budget": budget, "method": method, "seed": seed}
                    if method.startswith("forest"):
                        first = runs.get(f"{protocol}|{budget}|{method}|seed 0", {})
                        record.update(run_forest(method, volumes, protocol, seed, args.threads, validation, test,
                                                 chosen=first.get("variant") if seed else None))
                    else:
                        model, seconds = train_network(volumes, protocol, method, seed, args.device,
                                                       budget_changes)
                        MODELS_DIR.mkdir(parents=True, exist_ok=True)
                        save_model(model, MODELS_DIR / (re.sub(r"[^a-z0-9]+", "-", key.lower()) + ".safetensors"))
                        record["seconds"] = seconds
                        record["steps"] = model.card.get("training", {}).get("steps")
                        for split, files in (("validation", validation), ("test", test)):
                            record[f"{split}_volumes"] = evaluate(
                                lambda image, m=model: predict(m, image, device=args.device).labels, files)
                    record["val"] = summarise(record["validation_volumes"])
                    record["test"] = summarise(record["test_volumes"])
                    for split, short in (("validation", "val"), ("test", "test")):
                        record[f"{short}_largest"] = summarise([v["largest"] for v in record[f"{split}_volumes"]])
                    runs = keep_run(key, record, args)
    return report(args)


def run_forest(method: str, volumes, protocol: str, seed: int, threads: int, validation, test, chosen=None) -> dict:
    """A forest run: ``forest (ilastik)`` as shipped; ``forest (tuned)`` the variant best on validation.

    The variants are compared on seed 0 (as the network's settings were chosen), on every other validation
    volume (a forest predicts a volume in seconds, a network in a fraction of one); ``chosen`` (the variant
    seed 0 chose) is what the other seeds run.
    """
    if method == "forest (ilastik)":
        variants = {"as shipped": FOREST_VARIANTS["strokes"]}
    else:
        variants = FOREST_VARIANTS if chosen is None else {chosen: FOREST_VARIANTS[chosen]}
    compared = {}
    best = None
    for name, settings in variants.items():
        forest, seconds = train_forest(volumes, protocol, seed, threads, **settings)
        if len(variants) > 1:
            scores = evaluate(lambda image, f=forest: forest_labels(f, image), validation[::2])
            as_is, largest = summarise(scores), summarise([s["largest"] for s in scores])
            # The variant is judged by its better reading, as the report's rows are.
            compared[name] = {**as_is, "dice": max(as_is["dice"], largest["dice"])}
            print(f"  forest {name}: validation Dice {compared[name]['dice']:.3f}", flush=True)
        if best is None or compared.get(name, {}).get("dice", 0) > compared.get(best[0], {}).get("dice", 0):
            best = (name, forest, seconds)
    name, forest, seconds = best
    return {"variant": name, "seconds": seconds, "compared_on_validation": compared,
            "validation_volumes": evaluate(lambda image: forest_labels(forest, image), validation),
            "test_volumes": evaluate(lambda image: forest_labels(forest, image), test)}


def reading(records) -> str:
    """``"largest"`` where the records' largest components score higher on validation (mean over seeds) than
    their predictions as they are, else ``"as is"`` (also for runs kept before both were scored)."""
    if not all("val_largest" in r for r in records):
        return "as is"
    better = np.mean([r["val_largest"]["dice"] for r in records]) > np.mean([r["val"]["dice"] for r in records])
    return "largest" if better else "as is"


def scores_read(record: dict, chosen: str) -> tuple[dict, dict]:
    """A run's (validation, test) summaries in the reading ``chosen``."""
    if chosen == "largest":
        return record["val_largest"], record["test_largest"]
    return record["val"], record["test"]


def report(args) -> int:
    runs = load_runs(args.runs)
    groups: dict = {}
    for record in runs.values():
        groups.setdefault((record["protocol"], record["budget"], record["method"]), []).append(record)
    lines = ["| protocol | budget | method | seeds | components | validation Dice | test Dice | test RV | test MYO "
             "| test LV | test HD95 (px) | training s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    figures, read = {}, {}
    for (protocol, budget, method), records in sorted(groups.items()):
        records = sorted(records, key=lambda r: r["seed"])
        chosen = read[protocol, budget, method] = reading(records)
        val, test = zip(*(scores_read(r, chosen) for r in records), strict=True)
        cells = [chosen, mean_and_spread([v["dice"] for v in val]), mean_and_spread([t["dice"] for t in test])]
        cells += [mean_and_spread([t[f"dice_{n}"] for t in test]) for n in STRUCTURES.values()]
        hd = [t["hd95"] for t in test if t["hd95"] is not None]
        cells.append(mean_and_spread(hd) if hd else "-")
        cells.append(f"{np.mean([r['seconds'] for r in records]):.0f}")
        lines.append(f"| {protocol} | {budget} | {method} | {len(records)} | " + " | ".join(cells) + " |")
        figures[f"{protocol}|{budget}|{method}"] = {
            "seeds": [r["seed"] for r in records], "components": chosen, "val": list(val), "test": list(test),
            "seconds": [r["seconds"] for r in records], "variants": [r.get("variant") for r in records]}
    margins = []
    for (protocol, budget, method), records in sorted(groups.items()):
        forest = {r["seed"]: r for r in groups.get((protocol, budget, "forest (tuned)"), [])}
        if method == "anatomy" and forest:
            forest_read = read[protocol, budget, "forest (tuned)"]
            per_seed = [scores_read(r, read[protocol, budget, method])[1]["dice"]
                        - scores_read(forest[r["seed"]], forest_read)[1]["dice"]
                        for r in sorted(records, key=lambda r: r["seed"]) if r["seed"] in forest]
            if per_seed:
                margins.append(f"{protocol}, {budget}: anatomy minus forest (tuned), test Dice: mean "
                               f"{np.mean(per_seed):+.3f}, per seed " + ", ".join(f"{m:+.3f}" for m in per_seed)
                               + ".")
    network_runs = [r for rs in groups.values() for r in rs if not r["method"].startswith("forest")] or [{}]
    missed = sum(scores_read(r, read[key])[1][f"missed_{n}"] for key, rs in groups.items() for r in rs
                 for n in STRUCTURES.values())
    text = ("Cardiac cine MRI (ACDC), training patients 1-40, validation 41-60, test 61-80; 3-D Dice per "
            "structure per volume averaged over the volumes (the papers' score); cells: mean over seeds "
            "(lowest-highest); components: the predictions as they are, or each structure's largest connected "
            "component, whichever scores higher on validation (the same choice for every method); "
            "HD95 in pixels, averaged over the structures a prediction found (structures "
            f"missed in all runs' test volumes: {missed}). Training s: drawings to model, the networks' on "
            f"{network_runs[0].get('threads', '?')} threads of a {network_runs[0].get('machine', '?')} CPU "
            "(the quick budget's alone; the full budget's beside other benchmarks for most of its time, an upper "
            "bound), the forests' on 1-2 threads (seed 0 beside other work).\n\n" + "\n".join(lines) + "\n"
            + "".join(f"\n{m}\n" for m in margins)) if groups else "No runs yet.\n"
    write_results(args.out, "acdc", text, figures)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the acdc_scribbles folder (default %(default)s)")
    parser.add_argument("--protocols", nargs="+", default=["scribbles"], choices=PROTOCOLS)
    parser.add_argument("--budgets", nargs="+", default=["quick"], choices=BUDGETS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None,
                        help="train the networks for this many steps instead of the budget's (a learning curve's "
                             "point, recorded as its own budget)")
    add_run_options(parser, RUNS_FILE, HERE / "results")
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
