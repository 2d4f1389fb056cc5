"""Volumes: the 30-slice EM stack with hand-like strokes on 5 slices, scored on every slice nobody drew on.

The volume: the whole ISBI 2012 serial-section EM stack
(``benchmarks/data/isbi2012_em``: 30 slices of 512 x 512 at 4 x 4 x 50 nm;
Cardona et al., PLoS Biology 2010; Arganda-Carreras et al., Frontiers in
Neuroanatomy 2015) at full resolution, one (Z, Y, X) image. Classes: 1 =
cell interior, 0 = membrane.

Protocol (fixed before any run):

- drawn slices: ``DRAWN`` = 2, 8, 14, 20, 26 (every sixth slice, spread
  through the volume); the other 25 slices carry no stroke at all;
- validation: ``VALIDATION`` = 11 and 17 (midway between drawn slices, around
  the middle of the stack), the only slices any setting is chosen on;
- test: the 23 remaining undrawn slices, scored once per run.

Drawings: ``simulate(..., style="scribble")`` on each drawn slice's expert
instance mask with the EM brush of ``realdata.py`` (``DRAWING``), seeded by
the run's seed: each seed is a new annotator and a new initialisation.

Methods (the same strokes):

- ``refineseg``: this package with its defaults (the ``refineseg`` preset),
  trained on the whole volume and its stroke volumes at once, as a user does
  (``--settings``: ``preset``, and ``no heads``, the same without transition
  heads, ``realdata.py``'s control (a); ``... per slice``: the same with
  each slice normalised on its own, as the forest's features are; ``heads
  held on drawn pixels per slice`` and ``positive heads per slice``: two
  ways of keeping transition heads, tried against ``no heads per slice``);
  ``--variant`` picks the network: ``slicewise-2d`` (the 2-D U-Net on the
  stack slice by slice), ``2.5-d`` (the same with the slices above and
  below as channels) or ``3-d`` (``network="unet3d"``: the anisotropic 3-D
  encoder of ``SlabUNet`` over those three slices);
- ``naive``: the same network with dense cross-entropy, each drawn slice's
  positive strokes taken as its full mask (everything else on that slice,
  negatives included, is membrane); undrawn slices are left out;
- ``random forest``: the ilastik-style pixel classifier of ``baselines.py``
  (2-D multiscale features per slice), fitted on the strokes of the drawn
  slices; its trees, depth, feature scales and samples chosen on validation
  from ``FOREST_VARIANTS`` (``realdata.py``'s EM choice and two others);
- ``forest (ilastik)``: the honest forest of ``realdata.py``
  (``baselines.ilastik_forest_fit``: ilastik's 49 default features per
  slice, 100 trees of unlimited depth) on the same strokes, as ilastik
  ships it (``as shipped``) or with balanced class weights (``balanced``),
  each read as it predicts and with the network's class-prior correction
  (``, prior auto``; ``, prior strength tau``); reported as shipped and as
  chosen on validation among all of these (``forest (tuned)``).

Scores, pooled over a split's slices: Dice of each class (cells, membranes)
and their mean, and object F1 at IoU 0.5 of the connected components of the
predicted cells (slice by slice) against the expert instances. Training time
is wall time on the given threads; the network's includes its one preview of
the volume at the end, which sets the prior correction (no previews in
between: ``evolution_every=0``, which changes no weight).

Every run is stored in ``volume_runs.json`` (one record per method, network
variant, setting and seed, and per reading of the honest forest; runs
already there are skipped). The report shows refineseg's settings as they
are (one row each: the preset is the package's defaults), the honest forest
as shipped and, for the baselines, the setting with the best mean
VALIDATION Dice, with their test scores; each refineseg row minus the forest
(tuned) per seed (the random forest where the honest one has not run).

Usage::

    python benchmarks/volume.py run [--methods ...] [--settings preset "no heads"] [--variant slicewise-2d]
                                    [--seeds 3] [--threads 1] [--steps N | --minutes M]
    python benchmarks/volume.py report [--out benchmarks/results]

``--steps`` trains refineseg (and naive) for N steps instead of the preset's;
``--minutes`` for as many steps as a short timed run says fit in M minutes on
these threads. Writes ``volume.md`` and ``volume.json`` into the output folder.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import tifffile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from realdata import ILASTIK_VARIANTS, PRIOR_STRENGTHS, keep_run, load_runs  # noqa: E402

from napari_coarseseg import load_preset, predict, run_to_end, simulate, train_refineseg  # noqa: E402
from napari_coarseseg.metrics import dice, instances_of, match_instances  # noqa: E402

from baselines import (  # noqa: E402
    feature_seconds,
    forest_prior_readings,
    ilastik_forest_timed,
    predict_dense,
    random_forest_fit,
    random_forest_predict,
    train_dense,
)
from report import add_run_options, mean_and_spread, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS_FILE = HERE / "results" / "volume_runs.json"
DATA = HERE / "data" / "isbi2012_em"

DRAWN = (2, 8, 14, 20, 26)
VALIDATION = (11, 17)
N_SLICES = 30
TEST = tuple(z for z in range(N_SLICES) if z not in DRAWN + VALIDATION)
# realdata.py's brush for the EM stack (DRAWING["isbi2012_em"]): 3-4 px dabs on the membranes, strokes over 15 %
# of each cell.
DRAWING = {"margin": 0, "edge_noise": 0.5, "brush_width": (3, 4), "coverage": 0.15, "negative_coverage": 0.3}
# realdata.py's forest chosen on its EM validation slices, a wider feature scale, and scikit-image's example.
FOREST_VARIANTS = {
    "trees 100, depth None, sigma 1-8, samples 0.5": {"n_estimators": 100, "max_depth": None, "sigma_max": 8,
                                                      "max_samples": 0.5},
    "trees 100, depth None, sigma 1-16, samples 0.5": {"n_estimators": 100, "max_depth": None, "sigma_max": 16,
                                                       "max_samples": 0.5},
    "trees 50, depth 10, sigma 1-16, samples 0.05": {"n_estimators": 50, "max_depth": 10, "sigma_max": 16,
                                                     "max_samples": 0.05},
}
# The honest forest's readings (baselines.forest_prior_readings' suffixes): one fit, read as it predicts, with the
# network's automatic prior correction and at each fixed strength realdata.py tries; each is a setting of its own.
ILASTIK_READINGS = ("", ", prior auto", *(f", prior strength {tau}" for tau in PRIOR_STRENGTHS))
FORESTS = ("random forest", "forest (ilastik)")
METHODS = ("refineseg", "random forest", "forest (ilastik)", "naive")
# RefineSeg's settings: its defaults, and the same without transition heads (realdata.py's control (a), which the
# README recommends for thin boundaries such as membranes); each also with every slice normalised on its own
# (normalisation="slice"), as the forest's features and realdata.py's EM split (one image per slice) always were:
# the sections' brightness drifts (slice medians 101-146 of 255).
# "preset" is the preset as these runs were made, with a transition head per drawing layer: it ships without them
# since issue 31 (the "no heads" rows), so the heads are pinned here to keep the records what their names say.
REFINESEG_SETTINGS = {"preset": {"transition_heads": "all"}, "no heads": {"transition_heads": "none"},
                      "preset per slice": {"transition_heads": "all", "normalisation": "slice"},
                      "no heads per slice": {"transition_heads": "none", "normalisation": "slice"},
                      "heads held on drawn pixels per slice": {"transition_heads": "all",
                                                               "regulariser_on": "drawn pixels",
                                                               "normalisation": "slice"},
                      "positive heads per slice": {"transition_heads": "positive", "normalisation": "slice"}}
# The rows of the report: (row, method, setting); None: the setting with the best validation Dice (the honest
# forest's among its class weights and readings, as realdata.py's "forest (tuned)").
ROWS = (*(("refineseg", "refineseg", name) for name in REFINESEG_SETTINGS), ("naive", "naive", None),
        ("random forest", "random forest", None), ("forest (ilastik)", "forest (ilastik)", "as shipped"),
        ("forest (tuned)", "forest (ilastik)", None))


@lru_cache(maxsize=None)
def load_volume() -> tuple[np.ndarray, np.ndarray]:
    """The EM stack (30, 512, 512) uint8 and its expert instance mask (ids per slice, 0 = membrane)."""
    return tifffile.imread(DATA / "image.tif"), tifffile.imread(DATA / "labels.tif")


def drawings_of(instances: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative stroke volumes: scribbles on the ``DRAWN`` slices (annotator ``seed``), 0 elsewhere."""
    positive, negative = np.zeros(instances.shape, np.uint8), np.zeros(instances.shape, np.uint8)
    for z in DRAWN:
        drawn = simulate(instances[z], instances=True, style="scribble", seed=1000 * seed + z, **DRAWING)
        positive[z], negative[z] = drawn.positive, drawn.negative
    return positive, negative


def score(prediction: np.ndarray, instances: np.ndarray, slices) -> dict:
    """Dice of cells and membranes and their mean, and object F1 at IoU 0.5, pooled over ``slices``."""
    prediction, instances = prediction[list(slices)], instances[list(slices)]
    cells, truth = prediction > 0, instances > 0
    scores = {"dice_cells": dice(cells, truth), "dice_membranes": dice(~cells, ~truth)}
    scores["dice"] = (scores["dice_cells"] + scores["dice_membranes"]) / 2
    scores["f1"] = match_instances(instances_of(cells), instances, 0.5)["f1"]
    return scores


# ---------------------------------------------------------------------------------------------- the methods


def slicewise_2d(image, positive, negative, config, seed: int, device: str):
    """RefineSeg's 2-D U-Net on the stack slice by slice (the package today): ``(labels volume, seconds)``."""
    start = time.perf_counter()
    model = run_to_end(train_refineseg(image, [positive], [negative], config=config, seed=seed, device=device))
    seconds = time.perf_counter() - start
    return predict(model, image, device=device).labels, seconds


#: What each network variant changes in the configuration (``brain_mri.py`` runs the same ones).
NETWORK_SETTINGS = {"slicewise-2d": {}, "2.5-d": {"slice_context": 1},
                    "3-d": {"slice_context": 1, "network": "unet3d"}}


def context_25d(image, positive, negative, config, seed: int, device: str):
    """2.5-D: the same U-Net, each slice with the slices above and below as channels (``slice_context=1``)."""
    return slicewise_2d(image, positive, negative, config.replace(**NETWORK_SETTINGS["2.5-d"]), seed, device)


def slab_3d(image, positive, negative, config, seed: int, device: str):
    """3-D: the anisotropic 3-D encoder over the same three slices (``network="unet3d"``, ``slice_context=1``)."""
    return slicewise_2d(image, positive, negative, config.replace(**NETWORK_SETTINGS["3-d"]), seed, device)


#: The network variants ``--variant`` picks: ``train(image, positive, negative, config, seed, device)`` returns
#: the labels of the whole volume and the training seconds.
NETWORK_VARIANTS = {"slicewise-2d": slicewise_2d, "2.5-d": context_25d, "3-d": slab_3d}


def naive(image, positive, negative, config, seed: int, device: str):
    """The U-Net with dense cross-entropy on the drawn slices, positive strokes as the full mask: ``(labels,
    seconds)``. Slices are separate images here (normalised one by one, in training and prediction alike)."""
    masks = [(positive[z] > 0).astype(np.int64) for z in DRAWN]
    network, seconds = train_dense([image[z] for z in DRAWN], masks, config, seed=seed, device=device)
    return np.stack([predict_dense(network, plane, device) for plane in image]), seconds


def forest_strokes(positive, negative) -> list:
    """The forests' training labels, one per drawn slice: 1 = membrane (negative), 2 = cell (positive), 0 undrawn."""
    return [np.where(positive[z] > 0, 2, np.where(negative[z] > 0, 1, 0)) for z in DRAWN]


def random_forest(image, positive, negative, settings: dict, seed: int, threads: int):
    """The forest on the drawn slices' strokes (1 = membrane, 2 = cell), predicting every undrawn slice:
    ``(labels volume, seconds)``; the seconds count the drawn slices' features (cached across variants: what
    they took when first computed). Drawn slices are left 0 in the labels (never scored)."""
    strokes = forest_strokes(positive, negative)
    start = time.perf_counter()
    forest = random_forest_fit([image[z] for z in DRAWN], strokes, seed=seed, n_jobs=threads, **settings)
    seconds = time.perf_counter() - start + sum(feature_seconds(image[z], settings["sigma_max"]) for z in DRAWN)
    labels = np.zeros(image.shape, np.uint8)
    for z in VALIDATION + TEST:
        labels[z] = random_forest_predict(forest, image[z])
    return labels, seconds


def read_slices(readings: dict, image, slices) -> dict:
    """``{suffix: labels volume}``: each reading (labels of one 2-D image) applied to ``slices`` of ``image``; the
    other slices are left 0."""
    # forest_prior_readings caches each image's probabilities under its id(): every slice is held here for all the
    # readings, so one forest pass serves them all and no freed slice hands its id to another.
    planes = {z: image[z] for z in slices}
    volumes = {suffix: np.zeros(image.shape, np.uint8) for suffix in readings}
    for z, plane in planes.items():
        for suffix, reading in readings.items():
            volumes[suffix][z] = reading(plane)
    return volumes


def ilastik_forest(image, positive, negative, settings: dict, seed: int, threads: int):
    """The honest forest on the random forest's strokes, predicting every undrawn slice in each of its readings:
    ``({suffix of ILASTIK_READINGS: labels volume}, seconds)``. The seconds are the fit's and the drawn slices'
    features' (cached across variants: what they took when first computed)."""
    planes, strokes = [image[z] for z in DRAWN], forest_strokes(positive, negative)
    forest, seconds = ilastik_forest_timed(planes, strokes, seed=seed, n_jobs=threads, **settings)
    readings = forest_prior_readings(forest, planes, strokes, PRIOR_STRENGTHS)
    return read_slices(readings, image, VALIDATION + TEST), seconds


def steps_for_minutes(minutes: float, image, positive, negative, config, device: str) -> int:
    """As many steps as fit in ``minutes`` on these threads, from the time of steps 5-25 of a timed run."""
    times = {}
    start = time.perf_counter()
    run_to_end(train_refineseg(image, [positive], [negative], config=config.replace(steps=25), seed=0, device=device),
               lambda event: times.setdefault(event.step, time.perf_counter() - start))
    per_step = (times[25] - times[5]) / 20
    # Leave room for the final preview of the volume (about as long as 30 steps).
    return max(int(minutes * 60 / per_step) - 30, 1)


# ---------------------------------------------------------------------------------------------- runs and records


def record_key(method: str, network: str, setting: str, seed: int) -> str:
    return f"{method}|{network}|{setting}|seed {seed}"


def planned(args, preset_steps: int, steps: int) -> list[tuple[str, str, str, dict]]:
    """The ``(method, network, setting, overrides)`` of every run asked for, per seed."""
    budget = "" if steps == preset_steps else f", {steps} steps"
    plan = []
    for method in args.methods:
        if method == "random forest":
            plan += [(method, "2-D features", name, settings) for name, settings in FOREST_VARIANTS.items()]
        elif method == "forest (ilastik)":
            plan += [(method, "2-D ilastik features", name, settings) for name, settings in ILASTIK_VARIANTS.items()]
        elif method == "refineseg":
            plan += [(method, args.variant, name + budget, REFINESEG_SETTINGS[name]) for name in args.settings]
        else:
            plan.append((method, "slicewise-2d", "preset" + budget, {}))
    return plan


def run(args) -> int:
    torch.set_num_threads(args.threads)
    image, instances = load_volume()
    config = load_preset("refineseg").replace(evolution_every=0)
    steps = args.steps or config.steps
    if args.minutes:
        positive, negative = drawings_of(instances, 0)
        steps = steps_for_minutes(args.minutes, image, positive, negative, config, args.device)
        print(f"{args.minutes} min on {args.threads} threads: {steps} steps", flush=True)
    config = config.replace(steps=steps)
    runs = load_runs(args.runs)
    for seed in range(args.seeds):
        positive, negative = drawings_of(instances, seed)
        drawn_pixels = {"positive": int((positive > 0).sum()), "negative": int((negative > 0).sum())}
        for method, network, setting, parameters in planned(args, load_preset("refineseg").steps, steps):
            # The honest forest's one fit gives a record per reading: it is fitted only if one of them is missing.
            suffixes = ILASTIK_READINGS if method == "forest (ilastik)" else ("",)
            if not args.force and all(record_key(method, network, setting + s, seed) in runs for s in suffixes):
                continue
            volumes, seconds = train(method, network, parameters, image, positive, negative, config, seed, args)
            for suffix, labels in volumes.items():
                key = record_key(method, network, setting + suffix, seed)
                if key in runs and not args.force:
                    continue
                record = {"method": method, "network": network, "setting": setting + suffix, "seed": seed,
                          "steps": None if method in FORESTS else steps, "seconds": seconds,
                          "val": score(labels, instances, VALIDATION), "test": score(labels, instances, TEST),
                          "drawn_pixels": drawn_pixels}
                runs = keep_run(key, record, args)
    return report(args)


def train(method: str, network: str, parameters: dict, image, positive, negative, config, seed: int, args):
    """One run of ``method``: ``({setting suffix: labels volume}, seconds)``; the suffix is "" but for the honest
    forest's readings."""
    if method == "forest (ilastik)":
        return ilastik_forest(image, positive, negative, parameters, seed, args.threads)
    if method == "random forest":
        labels, seconds = random_forest(image, positive, negative, parameters, seed, args.threads)
    elif method == "naive":
        labels, seconds = naive(image, positive, negative, config, seed, args.device)
    else:
        labels, seconds = NETWORK_VARIANTS[network](image, positive, negative, config.replace(**parameters), seed,
                                                    args.device)
    return {"": labels}, seconds


# ---------------------------------------------------------------------------------------------- the report


def chosen(runs: dict, method: str, setting: str | None = None) -> list[tuple[str, list]]:
    """The rows of ``method`` in the report: ``[("network: setting", runs by seed), ...]``. With ``setting``, one
    row per network variant run with it; without, the one setting with the best mean VALIDATION Dice among
    those run with the most seeds."""
    groups = {name: records for (m, name), records in _groups(runs).items() if m == method
              and (setting is None or _is_setting(name, setting))}
    if setting is None and groups:
        best = max(groups, key=lambda s: (len(groups[s]), np.mean([r["val"]["dice"] for r in groups[s]])))
        groups = {best: groups[best]}
    return [(name, sorted(records, key=lambda r: r["seed"])) for name, records in sorted(groups.items())]


def _is_setting(name: str, setting: str) -> bool:
    """Whether ``name`` ("network: setting") ran ``setting``, alone or with a step budget (``", 1000 steps"``). The
    honest forest's readings (``"as shipped, prior auto"``) are settings of their own, not ``"as shipped"``."""
    ran = name.split(": ", 1)[1]
    return ran == setting or re.fullmatch(re.escape(setting) + r", \d+ steps", ran) is not None


def _cells(records, split: str, measures=("dice_cells", "dice_membranes", "dice", "f1")) -> str:
    return " | ".join(mean_and_spread([r[split][m] for r in records]) for m in measures)


def main_table(runs: dict, figures: dict) -> list[str]:
    """Refineseg's settings and the baselines (theirs chosen on validation; the honest forest also as shipped):
    test scores, time and steps; then each refineseg row minus the forest (tuned) per seed, or minus the random
    forest where the honest one has no records."""
    lines = ["| method | network: setting | val Dice | test Dice cells | test Dice membranes "
             "| test Dice, mean of classes | test F1@0.5 | train s | steps |", "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for row, method, setting in ROWS:
        for name, records in chosen(runs, method, setting):
            rows.append((row, method, name, records))
            steps = records[0]["steps"]
            how = "" if setting else ", chosen on validation"
            lines.append(f"| {row} | {name} ({len(records)} seeds{how}) | {_cells(records, 'val', ('dice',))} | "
                         f"{_cells(records, 'test')} | {np.mean([r['seconds'] for r in records]):.0f} | "
                         f"{steps if steps is not None else '-'} |")
    figures["rows"] = [{"row": row, "method": m, "setting": n, "runs": r} for row, m, n, r in rows]
    # Against the forest chosen on validation: the honest one (tuned) once it has run, else the random forest.
    against = "forest (tuned)" if any(row == "forest (tuned)" for row, *_ in rows) else "random forest"
    forest = next(((name, records) for row, _, name, records in rows if row == against), None)
    by_seed = {r["seed"]: r["test"]["dice"] for r in forest[1]} if forest else {}
    if by_seed:
        figures["minus_forest_against"] = f"{against}: {forest[0]}"
    for _, method, name, records in rows if by_seed else []:
        differences = [r["test"]["dice"] - by_seed[r["seed"]] for r in records if r["seed"] in by_seed]
        if method == "refineseg" and differences:
            figures.setdefault("minus_forest", {})[name] = differences
            lines += ["", f"{method} ({name}) minus the {against}, test Dice (mean of classes): mean "
                          f"{np.mean(differences):+.3f}, per seed {', '.join(f'{d:+.3f}' for d in differences)}."]
    return lines


def report(args) -> int:
    runs = load_runs(args.runs)
    figures = {"drawn_slices": list(DRAWN), "validation_slices": list(VALIDATION), "test_slices": list(TEST)}
    lines = main_table(runs, figures)
    lines += ["", "Every setting run:", "", "| method | network: setting | seeds | val Dice | test Dice | train s |",
              "|---|---|---|---|---|---|"]
    for (method, name), records in sorted(_groups(runs).items()):
        lines.append(f"| {method} | {name} | {len(records)} | {_cells(records, 'val', ('dice',))} | "
                     f"{_cells(records, 'test', ('dice',))} | {np.mean([r['seconds'] for r in records]):.0f} |")
    machines = sorted({f"{r['machine']}, {r['device']}, {r['threads']} threads" for r in runs.values()})
    text = (f"Strokes on slices {', '.join(map(str, DRAWN))} of 30; validation slices "
            f"{', '.join(map(str, VALIDATION))}; test: the other {len(TEST)} slices. Dice pooled over the slices of a "
            "split; cells: mean over seeds (lowest-highest); seeds = annotators and initialisations. Machine: "
            + "; ".join(machines) + ".\n\n" + "\n".join(lines) + "\n")
    write_results(args.out, "volume", text, figures)
    return 0


def _groups(runs: dict) -> dict:
    """Records by ``(method, "network: setting")``; networks this script does not define (another branch's, in
    the same records file) are left out."""
    groups = {}
    for record in runs.values():
        if record["method"] not in FORESTS and record["network"] not in NETWORK_VARIANTS:
            continue
        groups.setdefault((record["method"], f"{record['network']}: {record['setting']}"), []).append(record)
    return groups


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--variant", default="slicewise-2d", choices=list(NETWORK_VARIANTS),
                        help="refineseg's network (default slicewise-2d)")
    parser.add_argument("--settings", nargs="+", default=["preset"], choices=list(REFINESEG_SETTINGS),
                        help="refineseg's settings to run (default: preset)")
    parser.add_argument("--seeds", type=int, default=3)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="training steps of the networks (default: the preset's)")
    budget.add_argument("--minutes", type=float, help="train the networks for as many steps as fit in this time")
    add_run_options(parser, RUNS_FILE, HERE / "results")
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
