"""Live sessions on the DSB sample: first preview, Dice over time, corrections, stop, draw-here, --init.

The headless session (``napari_coarseseg.live.LiveTraining``, the engine the
napari Live button drives) on the 512 x 512 DSB 2018 image, with scribble
strokes (``simulate(..., style="scribble")``) on the top-left quadrant only,
a new annotator per seed:

- seconds from the start (session built, first step included) to the first
  preview, and the preview's Dice on the WHOLE image after 15, 30 and 60 s;
- corrections: after 60 s, strokes on the preview's worst mistakes
  (``simulate_corrections``: the 8 largest missed and 8 largest invented
  regions), then the errors inside the corrected regions 30 s later, the
  whole image's Dice then and its lowest preview in between;
- the "draw here next" map after 60 s: error rate of its top 10 % of pixels
  over the image's error rate;
- stop: seconds from ``stop()`` to the session's end;
- ``init``: steps until the preview of the held-out bottom-right quadrant
  reaches a Dice of ``--target`` with strokes on the bottom-left quadrant,
  from scratch against from a model trained (300 steps, with a live
  session's settings: the model such a session would have saved) on the
  top-left quadrant's strokes.

Usage: ``python benchmarks/live.py [--seeds 3] [--threads 2] [--out benchmarks/results]``.
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

from napari_coarseseg import dice, run_to_end, train_refineseg  # noqa: E402
from napari_coarseseg.annotations import simulate, simulate_corrections  # noqa: E402
from napari_coarseseg.live import LivePreview, LiveTraining  # noqa: E402
from napari_coarseseg.methods.refineseg import LIVE_SETTINGS  # noqa: E402
from napari_coarseseg.samples import load_dsb_nuclei  # noqa: E402

from report import mean_and_spread, write_results  # noqa: E402

QUADRANTS = {"top-left": np.s_[:256, :256], "bottom-left": np.s_[256:, :256], "bottom-right": np.s_[256:, 256:]}


def strokes_on(truth: np.ndarray, quadrant: str, seed: int) -> dict:
    """Scribble layers drawn on one quadrant only (empty elsewhere)."""
    inside = np.zeros(truth.shape, bool)
    inside[QUADRANTS[quadrant]] = True
    drawn = simulate(np.where(inside, truth, 0), instances=True, style="scribble", seed=seed)
    return {"positive": [(drawn.positive * inside).astype(np.uint8)],
            "negative": [(drawn.negative * inside).astype(np.uint8)]}


def session_figures(image, truth, layers: dict, seed: int) -> dict:
    """One scripted session from the drawing ``layers``: previews for 60 s, corrections, 30 s more, stop."""
    offered = []
    start = time.perf_counter()
    session = LiveTraining(image, layers, seed=seed, device="cpu", name="dsb")
    figures, previews, corrected_at, stop_asked = {}, [], None, None
    figures["drawn_nucleus_px"] = int((layers["positive"][0] > 0).sum())
    figures["drawn_background_px"] = int((layers["negative"][0] > 0).sum())
    for event in session.run(lambda: offered.pop() if offered else None, preview_every=3.0):
        now = time.perf_counter() - start
        if isinstance(event, LivePreview):
            previews.append((now, dice(event.labels > 0, truth > 0)))
            figures.setdefault("first_preview_s", now)
            if corrected_at is None and now >= 60:
                wrong = (event.labels > 0) != (truth > 0)
                draw_here = event.draw_here
                figures["draw_here_error_ratio"] = float(
                    wrong[draw_here >= np.quantile(draw_here, 0.9)].mean() / wrong.mean())
                positive, negative, regions = simulate_corrections(event.labels, truth)
                figures["errors_before"] = int(wrong[regions].sum())
                layers = {"positive": [np.maximum(layers["positive"][0], positive.astype(np.uint8))],
                          "negative": [np.maximum(layers["negative"][0], negative.astype(np.uint8))]}
                offered.append(layers)
                corrected_at, figures["regions"] = now, regions
            elif corrected_at is not None and now >= corrected_at + 30:
                figures["errors_after"] = int(((event.labels > 0) != (truth > 0))[figures["regions"]].sum())
                figures["dice_after_corrections"] = previews[-1][1]
                stop_asked = time.perf_counter()
                session.stop()
    figures["stop_s"] = time.perf_counter() - stop_asked
    figures.pop("regions")
    for t in (15, 30, 60):
        figures[f"dice_{t}s"] = next(d for s, d in reversed(previews) if s <= t)
    # Flicker: the worst preview of the second half-minute, when the preview should already hold; and the dip
    # after the corrections: the worst preview of the 30 s after them.
    figures["lowest_dice_30_60s"] = min(d for s, d in previews if 30 <= s <= 60)
    figures["lowest_dice_after_corrections"] = min(d for s, d in previews if corrected_at < s)
    figures["steps"] = session.loop.step
    return figures


def forest_figures(image, truth, layers: dict, seed: int, threads: int) -> dict:
    """The baseline on the same strokes: the random forest of ilastik-like features, whole-image Dice and seconds."""
    from baselines import random_forest_fit, random_forest_predict

    labels = np.where(layers["positive"][0] > 0, 2, np.where(layers["negative"][0] > 0, 1, 0)).astype(np.uint8)
    start = time.perf_counter()
    forest = random_forest_fit([image], [labels], seed=seed, n_jobs=threads)
    predicted = random_forest_predict(forest, image)
    return {"forest_dice": dice(predicted > 0, truth > 0), "forest_s": time.perf_counter() - start}


LIMIT_S = 150.0


def steps_to_target(image, truth, seed: int, target: float, init=None, limit_s: float = LIMIT_S) -> int | None:
    """Optimiser steps until the held-out quadrant's preview reaches ``target`` Dice (None: not within limit_s)."""
    session = LiveTraining(image, strokes_on(truth, "bottom-left", seed), seed=seed, device="cpu", init=init)
    held_out = QUADRANTS["bottom-right"]
    reached, start = None, time.perf_counter()
    for event in session.run(read_region=lambda: (0, held_out), preview_every=1.0, first_preview=0.5):
        if isinstance(event, LivePreview) and dice(event.labels > 0, truth[held_out] > 0) >= target:
            reached = event.step
            session.stop()
        if time.perf_counter() - start > limit_s:
            session.stop()
    return reached


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    image, truth = load_dsb_nuclei()
    runs, init_runs = [], []
    for seed in range(args.seeds):
        layers = strokes_on(truth, "top-left", seed)
        runs.append({**session_figures(image, truth, layers, seed),
                     **forest_figures(image, truth, layers, seed, args.threads)})
        # The model a session on the top-left quadrant would have saved: the live settings, 300 steps.
        related = run_to_end(train_refineseg(image, **layers, seed=seed, device="cpu", steps=300, **LIVE_SETTINGS))
        init_runs.append({"scratch": steps_to_target(image, truth, seed, args.target),
                          "init": steps_to_target(image, truth, seed, args.target, init=related)})
        print(runs[-1], init_runs[-1], flush=True)

    def cells(key):
        return mean_and_spread([r[key] for r in runs])

    def steps(key):
        values = [r[key] for r in init_runs]
        return ", ".join(f"not within {LIMIT_S:.0f} s" if v is None else str(v) for v in values)

    machine = f"{platform.processor() or platform.machine()}, cpu, {args.threads} threads"
    lines = [f"DSB 2018 sample (512 x 512), scribbles on the top-left quadrant, seeds {list(range(args.seeds))}; "
             f"headless `LiveTraining` with its defaults (refineseg preset with the live settings, preview every 3 "
             f"s); {machine}. "
             "Cells: mean (lowest-highest).", "",
             "| figure | value |", "|---|---|",
             f"| first preview, s from the start | {cells('first_preview_s')} |",
             f"| preview Dice, whole image, after 15 s | {cells('dice_15s')} |",
             f"| preview Dice, whole image, after 30 s | {cells('dice_30s')} |",
             f"| preview Dice, whole image, after 60 s | {cells('dice_60s')} |",
             f"| lowest preview Dice between 30 and 60 s | {cells('lowest_dice_30_60s')} |",
             f"| random forest on the same strokes: Dice, whole image | {cells('forest_dice')} |",
             f"| random forest: s to fit and predict (features included) | {cells('forest_s')} |",
             f"| errors in the corrected regions at the corrections | {cells('errors_before')} |",
             f"| the same 30 s later | {cells('errors_after')} |",
             f"| preview Dice, whole image, 30 s after the corrections | {cells('dice_after_corrections')} |",
             f"| lowest preview Dice in those 30 s | {cells('lowest_dice_after_corrections')} |",
             f"| 'draw here next': error rate of its top 10 % / the image's | {cells('draw_here_error_ratio')} |",
             f"| stop(): s until the session ended | {cells('stop_s')} |",
             f"| steps done in 90 s | {cells('steps')} |", "",
             "Per annotator (seed): what it drew on the quadrant, the whole image's Dice before the corrections "
             "(60 s) and 30 s after them, and the errors inside the corrected regions.", "",
             "| seed | nucleus px drawn | background px drawn | Dice 60 s | forest Dice | "
             "Dice 30 s after corrections | errors in corrected regions |", "|---|---|---|---|---|---|---|",
             *[f"| {seed} | {r['drawn_nucleus_px']} | {r['drawn_background_px']} | {r['dice_60s']:.3f} | "
               f"{r['forest_dice']:.3f} | {r['dice_after_corrections']:.3f} | {r['errors_before']} -> "
               f"{r['errors_after']} |"
               for seed, r in enumerate(runs)], "",
             f"Steps until the held-out bottom-right quadrant reaches Dice {args.target} (strokes on the bottom-left "
             "quadrant; per seed): from scratch "
             f"{steps('scratch')}; from a model trained (300 steps, live settings) on the top-left quadrant's strokes "
             f"{steps('init')}."]
    write_results(args.out, "live", "\n".join(lines) + "\n", {"sessions": runs, "init": init_runs,
                                                              "machine": machine, "target": args.target})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
