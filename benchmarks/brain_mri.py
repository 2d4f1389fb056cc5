"""A medical volume: a T1 brain MRI in thick slices, strokes on 6 slices, grey and white matter scored on the rest.

The volume: the MNI ICBM152 2009a symmetric T1 template with its grey- and
white-matter probability maps (Fonov et al., NeuroImage 2011 and 2009),
as the registry package ``nilearn`` ships them inside its wheel
(``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``,
1 mm isotropic, 197 x 233 x 189; read from the installed package, never
downloaded: ``pip install nilearn`` first; the template's licence allows
use and redistribution with its copyright notice). It is read with nibabel
and made a clinical thick-slice volume: every three axial 1-mm slices
averaged into one 3-mm slice (partial volume, as a thick-slice acquisition
records it), giving a (Z, Y, X) volume of 63 slices of 233 x 197 at
3 x 1 x 1 mm. Classes per voxel, from the averaged maps: 1 = grey matter,
2 = white matter where that tissue's probability is the highest of grey,
white and the rest (1 - grey - white: CSF and everything outside the
brain), 0 = the rest.

Protocol (fixed before any run):

- brain slices: those with at least 500 grey- or white-matter voxels;
- drawn slices: 6, evenly spaced through the brain slices (their first and
  last tenth left out); every other slice carries no stroke;
- validation: the 2 slices midway between the third and fourth, and the
  fourth and fifth, drawn slices; the only slices a setting is chosen on;
- test: every other brain slice, scored once per run.

Drawings: ``simulate(..., style="scribble")`` on each drawn slice's class
mask with "the rest" as a third drawn class (so the strokes say what is
grey matter, white matter and neither, as a clinician marks tissue and
background), seeded by the run's seed (a new annotator and a new
initialisation): the brush of ``volume.py`` for thin structures (3-4 px),
15 % of each region covered, no region left undrawn. Grey- and white-matter strokes are refineseg's
positive layer (1, 2); strokes on the rest its background layer; the forest
gets the same strokes as three classes.

Methods (the same strokes):

- ``refineseg`` with its defaults (``preset``) and without transition
  heads (``no heads``), each also with every slice normalised on its own
  (``... per slice``), slice-wise 2-D or (``--variant``) 2.5-D or 3-D;
- ``random forest``: the forest of ``baselines.py`` (2-D multiscale
  features per slice) with its variants from ``volume.py``, the one with
  the best validation Dice reported;
- ``forest (ilastik)``: the honest forest of ``realdata.py`` and
  ``volume.py`` (ilastik's 49 default features per slice, 100 trees of
  unlimited depth), as ilastik ships it (``as shipped``) or with balanced
  class weights (``balanced``), each read as it predicts and with the
  network's class-prior correction (``, prior auto``; ``, prior strength
  tau``); reported as shipped and as chosen on validation among all of
  these (``forest (tuned)``), which each refineseg setting is compared
  with per seed (the random forest where the honest one has not run).

Scores, pooled over a split's slices: Dice of grey and of white matter and
their mean (the rest, mostly air, would lift every mean alike and is left
out).

Usage::

    python benchmarks/brain_mri.py run [--methods refineseg "random forest" "forest (ilastik)"]
                                       [--settings preset "no heads"]
                                       [--variant slicewise-2d] [--seeds 3] [--threads 2]
    python benchmarks/brain_mri.py report

Runs are kept in ``results/brain_mri_runs.json`` (one per method, setting and
seed, and per reading of the honest forest; runs already there are
skipped); writes ``brain_mri.md`` and ``brain_mri.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from realdata import ILASTIK_VARIANTS, PRIOR_STRENGTHS, keep_run, load_runs  # noqa: E402
from volume import FOREST_VARIANTS, ILASTIK_READINGS, NETWORK_SETTINGS, REFINESEG_SETTINGS, read_slices  # noqa: E402

from napari_coarseseg import load_preset, predict, run_to_end, simulate, train_refineseg  # noqa: E402
from napari_coarseseg.metrics import dice  # noqa: E402

from baselines import (  # noqa: E402
    feature_seconds,
    forest_prior_readings,
    ilastik_forest_timed,
    random_forest_fit,
    random_forest_predict,
)
from report import add_run_options, mean_and_spread, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS_FILE = HERE / "results" / "brain_mri_runs.json"
TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
THICKNESS = 3  # 1-mm slices averaged into one
N_DRAWN = 6
DRAWING = {"margin": 0, "edge_noise": 0.5, "brush_width": (3, 4), "coverage": 0.15, "undrawn": 0.0}
#: refineseg's settings: ``volume.py``'s first four (the preset, no heads, each also per slice).
SETTINGS = ("preset", "no heads", "preset per slice", "no heads per slice")
METHODS = ("refineseg", "random forest", "forest (ilastik)")
FORESTS = ("random forest", "forest (ilastik)")


@lru_cache(maxsize=None)
def load_volume() -> tuple[np.ndarray, np.ndarray]:
    """The thick-slice T1 volume (Z, Y, X) float32 and its class mask (0 rest, 1 grey, 2 white matter)."""
    try:
        import nibabel as nib
        import nilearn
    except ImportError as error:
        raise SystemExit(f"{error}: this benchmark reads the MNI template nilearn ships; pip install nilearn") from None
    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    maps = {}
    for name in ("t1", "gm", "wm"):
        # RAS+ voxel axes (x, y, z): z is axial. Average THICKNESS slices in z, then put z first, y down.
        data = np.asarray(nib.load(folder / TEMPLATE.format(name)).dataobj, dtype=np.float32)
        depth = data.shape[2] // THICKNESS * THICKNESS
        thick = data[:, :, :depth].reshape(data.shape[0], data.shape[1], -1, THICKNESS).mean(-1)
        maps[name] = np.ascontiguousarray(np.transpose(thick, (2, 1, 0))[:, ::-1])
    grey, white = maps["gm"] / 255, maps["wm"] / 255
    classes = np.argmax(np.stack([1 - grey - white, grey, white]), axis=0).astype(np.uint8)
    return maps["t1"], classes


def split_slices(classes: np.ndarray) -> dict:
    """Drawn, validation and test slices (see the module docstring)."""
    brain = np.flatnonzero((classes > 0).sum((1, 2)) >= 500)
    inner = brain[len(brain) // 10: len(brain) - len(brain) // 10]
    drawn = inner[np.linspace(0, len(inner) - 1, N_DRAWN).round().astype(int)]
    validation = np.array([(drawn[2] + drawn[3]) // 2, (drawn[3] + drawn[4]) // 2])
    test = np.setdiff1d(brain, np.concatenate([drawn, validation]))
    return {"drawn": [int(z) for z in drawn], "validation": [int(z) for z in validation],
            "test": [int(z) for z in test]}


def drawings_of(classes: np.ndarray, drawn, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tissue strokes (1 grey, 2 white matter) and strokes on the rest, on the drawn slices only."""
    tissue, rest = np.zeros(classes.shape, np.uint8), np.zeros(classes.shape, np.uint8)
    for z in drawn:
        # The rest as class 3, so that it is drawn like the tissues.
        drawn_z = simulate(np.where(classes[z] == 0, 3, classes[z]), style="scribble", seed=1000 * seed + z,
                           **DRAWING).positive
        tissue[z] = np.where(drawn_z < 3, drawn_z, 0)
        rest[z] = drawn_z == 3
    return tissue, rest


def score(labels: np.ndarray, classes: np.ndarray, slices) -> dict:
    """Dice of grey and white matter and their mean, pooled over ``slices``."""
    labels, classes = labels[list(slices)], classes[list(slices)]
    scores = {f"dice_{k}": dice(labels == k, classes == k) for k in (1, 2)}
    scores["dice"] = (scores["dice_1"] + scores["dice_2"]) / 2
    return scores


def refineseg(image, tissue, rest, config, seed: int, device: str):
    start = time.perf_counter()
    model = run_to_end(train_refineseg(image, [tissue], [], [rest], config=config, seed=seed, device=device))
    seconds = time.perf_counter() - start
    return predict(model, image, device=device).labels, seconds


def forest_strokes(tissue, rest, drawn) -> list:
    """The forests' training labels, one per drawn slice: 1 rest, 2 grey, 3 white matter, 0 undrawn."""
    return [np.where(rest[z] > 0, 1, np.where(tissue[z] > 0, tissue[z] + 1, 0)) for z in drawn]


def random_forest(image, tissue, rest, drawn, predicted, settings: dict, seed: int, threads: int):
    """The forest on the drawn slices' strokes (1 rest, 2 grey, 3 white matter): ``(labels, seconds)``, the
    seconds counting the drawn slices' features."""
    strokes = forest_strokes(tissue, rest, drawn)
    start = time.perf_counter()
    forest = random_forest_fit([image[z] for z in drawn], strokes, seed=seed, n_jobs=threads, **settings)
    seconds = time.perf_counter() - start + sum(feature_seconds(image[z], settings["sigma_max"]) for z in drawn)
    labels = np.zeros(image.shape, np.uint8)
    for z in predicted:
        labels[z] = random_forest_predict(forest, image[z])
    return labels, seconds


def ilastik_forest(image, tissue, rest, drawn, predicted, settings: dict, seed: int, threads: int):
    """The honest forest on the random forest's strokes, predicting ``predicted`` in each of its readings:
    ``({suffix of ILASTIK_READINGS: labels}, seconds)``, the seconds the fit's and the drawn slices' features'
    (cached across variants: what they took when first computed)."""
    planes, strokes = [image[z] for z in drawn], forest_strokes(tissue, rest, drawn)
    forest, seconds = ilastik_forest_timed(planes, strokes, seed=seed, n_jobs=threads, **settings)
    return read_slices(forest_prior_readings(forest, planes, strokes, PRIOR_STRENGTHS), image, predicted), seconds


def planned(args) -> list[tuple[str, str, dict]]:
    """The ``(method, setting, parameters)`` of every run asked for, per seed."""
    # Runs of a network other than slice-wise 2-D carry its name after the setting's.
    variant = "" if args.variant == "slicewise-2d" else f", {args.variant}"
    networks = {name + variant: {**REFINESEG_SETTINGS[name], **NETWORK_SETTINGS[args.variant]}
                for name in args.settings}
    settings = {"random forest": FOREST_VARIANTS, "forest (ilastik)": ILASTIK_VARIANTS}
    return [(m, s, p) for m in args.methods for s, p in settings.get(m, networks).items()]


def run(args) -> int:
    torch.set_num_threads(args.threads)
    image, classes = load_volume()
    slices = split_slices(classes)
    predicted = slices["validation"] + slices["test"]
    config = load_preset("refineseg").replace(evolution_every=0)
    runs = load_runs(args.runs)
    for seed in range(args.seeds):
        tissue, rest = drawings_of(classes, slices["drawn"], seed)
        drawn_pixels = {"tissue": int((tissue > 0).sum()), "rest": int((rest > 0).sum())}
        for method, setting, parameters in planned(args):
            # The honest forest's one fit gives a record per reading: it is fitted only if one of them is missing.
            suffixes = ILASTIK_READINGS if method == "forest (ilastik)" else ("",)
            if not args.force and all(f"{method}|{setting}{s}|seed {seed}" in runs for s in suffixes):
                continue
            if method == "forest (ilastik)":
                volumes, seconds = ilastik_forest(image, tissue, rest, slices["drawn"], predicted, parameters, seed,
                                                  args.threads)
            elif method == "random forest":
                labels, seconds = random_forest(image, tissue, rest, slices["drawn"], predicted, parameters, seed,
                                                args.threads)
                volumes = {"": labels}
            else:
                labels, seconds = refineseg(image, tissue, rest, config.replace(**parameters), seed, args.device)
                volumes = {"": labels}
            for suffix, labels in volumes.items():
                key = f"{method}|{setting}{suffix}|seed {seed}"
                if key in runs and not args.force:
                    continue
                record = {"method": method, "setting": setting + suffix, "seed": seed, "seconds": seconds,
                          "steps": None if method in FORESTS else config.steps,
                          "val": score(labels, classes, slices["validation"]),
                          "test": score(labels, classes, slices["test"]), "drawn_pixels": drawn_pixels}
                runs = keep_run(key, record, args)
    return report(args)


def best_setting(groups: dict, method: str) -> str | None:
    """The setting of ``method`` with the best mean VALIDATION Dice among those run with the most seeds."""
    settings = {s: records for (m, s), records in groups.items() if m == method}
    return max(settings, key=lambda s: (len(settings[s]), np.mean([r["val"]["dice"] for r in settings[s]])),
               default=None)


def _row(name: str, records) -> str:
    return (f"| {name} | {len(records)} | {mean_and_spread([r['val']['dice'] for r in records])} | "
            + " | ".join(mean_and_spread([r["test"][m] for r in records]) for m in ("dice_1", "dice_2", "dice"))
            + f" | {np.mean([r['seconds'] for r in records]):.0f} |")


def tables(groups: dict, figures: dict) -> list[str]:
    """Every setting of refineseg and the random forest (its best on validation marked), the honest forest as
    shipped and tuned (chosen on validation among its class weights and readings), each refineseg setting minus
    the forest (tuned), or the random forest where the honest one has no records, per seed; then every reading
    of the honest forest."""
    header = ["| method: setting | seeds | val Dice | test Dice grey matter | test Dice white matter "
              "| test Dice, mean | train s |", "|---|---|---|---|---|---|---|"]
    best_forest, tuned = best_setting(groups, "random forest"), best_setting(groups, "forest (ilastik)")
    rows = [(f"{m}: {s}", " (chosen on validation)" if m == "random forest" and s == best_forest else "", records)
            for (m, s), records in sorted(groups.items()) if m != "forest (ilastik)"]
    if ("forest (ilastik)", "as shipped") in groups:
        rows.append(("forest (ilastik): as shipped", "", groups[("forest (ilastik)", "as shipped")]))
    if tuned:
        rows.append((f"forest (tuned): {tuned}", " (chosen on validation)", groups[("forest (ilastik)", tuned)]))
    lines = header + [_row(name + chosen, records) for name, chosen, records in rows]
    figures["rows"] = {name: records for name, _, records in rows}
    # Against the forest chosen on validation: the honest one (tuned) once it has run, else the random forest.
    against, forest = (("forest (tuned)", ("forest (ilastik)", tuned)) if tuned else
                       ("random forest", ("random forest", best_forest)))
    by_seed = {r["seed"]: r["test"]["dice"] for r in groups.get(forest, [])}
    if by_seed:
        figures["minus_forest_against"] = f"{against}: {forest[1]}"
    for (method, setting), records in sorted(groups.items()) if by_seed else []:
        differences = [r["test"]["dice"] - by_seed[r["seed"]] for r in records if r["seed"] in by_seed]
        if method == "refineseg" and differences:
            figures.setdefault("minus_forest", {})[setting] = differences
            lines += ["", f"refineseg ({setting}) minus the {against}, test Dice (mean of grey and white matter): "
                          f"mean {np.mean(differences):+.3f}, per seed {', '.join(f'{d:+.3f}' for d in differences)}."]
    readings = [_row(f"{m}: {s}", records) for (m, s), records in sorted(groups.items()) if m == "forest (ilastik)"]
    return lines + (["", "Every reading of the honest forest:", "", *header, *readings] if readings else [])


def report(args) -> int:
    runs = load_runs(args.runs)
    _, classes = load_volume()
    slices = split_slices(classes)
    groups: dict = {}
    for record in sorted(runs.values(), key=lambda r: r["seed"]):
        groups.setdefault((record["method"], record["setting"]), []).append(record)
    figures = {**slices}
    lines = tables(groups, figures)
    machines = sorted({f"{r['machine']}, {r['device']}, {r['threads']} threads" for r in runs.values()})
    text = (f"MNI ICBM152 2009a T1 template in {THICKNESS}-mm axial slices ({classes.shape[0]} slices of "
            f"{classes.shape[1]} x {classes.shape[2]}); strokes on slices {', '.join(map(str, slices['drawn']))}; "
            f"validation slices {', '.join(map(str, slices['validation']))}; test: the other "
            f"{len(slices['test'])} brain slices. Dice pooled over a split's slices; cells: mean over seeds "
            "(lowest-highest); seeds = annotators and initialisations. Machine: " + "; ".join(machines)
            + ".\n\n" + "\n".join(lines) + "\n")
    write_results(args.out, "brain_mri", text, figures)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--settings", nargs="+", default=["preset"], choices=SETTINGS)
    parser.add_argument("--variant", default="slicewise-2d", choices=list(NETWORK_SETTINGS),
                        help="refineseg's network (default slicewise-2d)")
    parser.add_argument("--seeds", type=int, default=3)
    add_run_options(parser, RUNS_FILE, HERE / "results")
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
