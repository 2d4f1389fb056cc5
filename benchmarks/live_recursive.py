"""Live sessions of the recursive method on the DSB tiles: first preview, held-out Dice over time, corrections.

The 512 x 512 DSB 2018 image as the tiles sample's stack (16 tiles of
128 x 128). A new annotator per seed paints partial masks (the inner part of
every nucleus, ``simulate(..., instances=True, seed=seed)``) on the 8 tiles of
the top half, and the expert mask of tile ``STRONG_TILE`` (the tiles sample's
exact tile); the bottom half is not drawn. The headless session
(``napari_coarseseg.live.LiveTraining``, what the Live button drives, with the
recursive preset) previews the held-out tiles in turn, one a second: what a
user paging through them sees. Figures per seed:

- seconds from the start (session built, first step included) to the first
  preview;
- Dice pooled over the held-out tiles, each at its latest preview, after 30,
  60 and 120 s, and the lowest such figure between 60 and 120 s;
- more drawings: at 120 s the user paints the partial masks of tiles 8 and 9
  (every nucleus, as the method asks of a slice with partial masks); the
  Dice of those tiles' previews and of the other held-out tiles at that
  moment and 30 s later;
- the "draw here next" map at 120 s: error rate of its top 10 % of pixels over
  the held-out tiles' error rate;
- stop: seconds from ``stop()`` to the session's end;
- the baselines on the same drawings and tiles: the random forest of
  ``benchmarks/recursive.py`` (foreground = partial masks and the exact
  tile's nuclei, background = the exact tile's rest), and a batch run of the
  recursive preset (``train_recursive``, 4 iterations of 50 steps) with its
  training seconds.

Usage: ``python benchmarks/live_recursive.py [--seeds 3] [--first-seed 0] [--threads 2] [--out DIR]``. Seeds
10 and up are the validation annotators settings are chosen on; 0-2 the test.
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

from napari_coarseseg import dice, predict, run_to_end, train_recursive  # noqa: E402
from napari_coarseseg.annotations import simulate  # noqa: E402
from napari_coarseseg.live import LivePreview, LiveTraining  # noqa: E402
from napari_coarseseg.samples import STRONG_TILE, as_tiles, load_dsb_nuclei  # noqa: E402

from report import mean_and_spread, write_results  # noqa: E402

DRAWN, HELD_OUT, CORRECTED = list(range(8)), list(range(8, 16)), [8, 9]
WHOLE = np.s_[:, :]


def drawings(truth_tiles: np.ndarray, seed: int) -> dict:
    """Partial masks on the top half's tiles and the exact mask of ``STRONG_TILE``, as (16, 128, 128) layers."""
    partial = np.zeros(truth_tiles.shape, np.uint8)
    for i in DRAWN:
        partial[i] = simulate(truth_tiles[i], instances=True, seed=seed).partial > 0
    strong = np.zeros(truth_tiles.shape, np.uint8)
    strong[STRONG_TILE] = truth_tiles[STRONG_TILE] > 0
    return {"partial": [partial], "strong": [strong]}


def pooled(labels: dict, truth_tiles, tiles) -> float:
    return dice(np.concatenate([labels[i].ravel() > 0 for i in tiles]),
                np.concatenate([truth_tiles[i].ravel() > 0 for i in tiles]))


def session_figures(image_tiles, truth_tiles, layers: dict, seed: int) -> dict:
    """One scripted session: previews of the held-out tiles in turn for 120 s, corrections, 30 s more, stop."""
    offered, turn = [], iter(np.tile(HELD_OUT, 10_000))
    start = time.perf_counter()
    session = LiveTraining(image_tiles, layers, "recursive", seed=seed, device="cpu", name="tiles")
    figures, latest, draw_here, history = {}, {}, {}, []
    corrected_at, stop_asked = None, None
    for event in session.run(lambda: offered.pop() if offered else None,
                             lambda: (int(next(turn)), WHOLE), preview_every=1.0):
        now = time.perf_counter() - start
        if not isinstance(event, LivePreview):
            continue
        figures.setdefault("first_preview_s", now)
        latest[event.plane], draw_here[event.plane] = event.labels, event.draw_here
        if len(latest) == len(HELD_OUT):
            history.append((now, pooled(latest, truth_tiles, HELD_OUT)))
        if corrected_at is None and now >= 120 and len(latest) == len(HELD_OUT):
            wrong = np.concatenate([(latest[i] > 0).ravel() != (truth_tiles[i] > 0).ravel() for i in HELD_OUT])
            doubt = np.concatenate([draw_here[i].ravel() for i in HELD_OUT])
            figures["draw_here_error_ratio"] = float(wrong[doubt >= np.quantile(doubt, 0.9)].mean() / wrong.mean())
            # The method's contract: a partial region in EVERY object of a slice that has any (elsewhere on it is
            # background), so the user paints all the nuclei of the two tiles.
            partial = layers["partial"][0].copy()
            for i in CORRECTED:
                partial[i] = simulate(truth_tiles[i], instances=True, seed=seed).partial > 0
            rest = [i for i in HELD_OUT if i not in CORRECTED]
            figures["dice_corrected_before"] = pooled(latest, truth_tiles, CORRECTED)
            figures["dice_rest_before"] = pooled(latest, truth_tiles, rest)
            offered.append({**layers, "partial": [partial]})
            corrected_at = now
            latest = {i: labels for i, labels in latest.items() if i not in CORRECTED}  # wait for new previews
        elif corrected_at is not None and now >= corrected_at + 30 and len(latest) == len(HELD_OUT):
            figures["dice_corrected_after"] = pooled(latest, truth_tiles, CORRECTED)
            figures["dice_rest_after"] = pooled(latest, truth_tiles, [i for i in HELD_OUT if i not in CORRECTED])
            stop_asked = time.perf_counter()
            session.stop()
    figures["stop_s"] = time.perf_counter() - stop_asked
    for t in (30, 60, 120):
        figures[f"dice_{t}s"] = next(d for s, d in reversed(history) if s <= t)
    figures["lowest_dice_60_120s"] = min(d for s, d in history if 60 <= s <= 120)
    figures["steps"] = session.loop.step
    figures["growths"] = len(session.loop.pixels_added)
    return figures


def baseline_figures(image_tiles, truth_tiles, layers: dict, seed: int, threads: int) -> dict:
    """The forest and a batch recursive run on the same drawings: held-out Dice, seconds."""
    from recursive import random_forest_labels

    from baselines import random_forest_fit, random_forest_predict

    partial, strong = layers["partial"][0], layers["strong"][0]
    start = time.perf_counter()
    forest = random_forest_fit([image_tiles[i] for i in DRAWN],
                               random_forest_labels(DRAWN, STRONG_TILE, truth_tiles, partial), seed=seed,
                               n_jobs=threads)
    forest_labels = {i: random_forest_predict(forest, image_tiles[i]) for i in HELD_OUT}
    figures = {"forest_dice": pooled(forest_labels, truth_tiles, HELD_OUT), "forest_s": time.perf_counter() - start}
    start = time.perf_counter()
    model = run_to_end(train_recursive(image_tiles, partial, strong, seed=seed, device="cpu"))
    figures["batch_s"] = time.perf_counter() - start
    labels = predict(model, image_tiles, device="cpu").labels
    figures["batch_dice"] = pooled({i: labels[i] for i in HELD_OUT}, truth_tiles, HELD_OUT)
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    image, truth = load_dsb_nuclei()
    image_tiles, truth_tiles = as_tiles(image), as_tiles(truth)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    runs = []
    for seed in seeds:
        layers = drawings(truth_tiles, seed)
        runs.append({**session_figures(image_tiles, truth_tiles, layers, seed),
                     **baseline_figures(image_tiles, truth_tiles, layers, seed, args.threads)})
        print(runs[-1], flush=True)

    def cells(key):
        return mean_and_spread([r[key] for r in runs])

    machine = f"{platform.processor() or platform.machine()}, cpu, {args.threads} threads"
    lines = [f"DSB 2018 sample as 16 tiles of 128 x 128; partial masks on the 8 top tiles and the exact mask of "
             f"tile {STRONG_TILE}, the 8 bottom tiles held out; seeds {seeds}; headless `LiveTraining` with the "
             f"recursive preset (regions grown every 50 steps), previewing one held-out tile a second; {machine}. "
             "Cells: mean (lowest-highest).", "",
             "| figure | value |", "|---|---|",
             f"| first preview, s from the start | {cells('first_preview_s')} |",
             f"| preview Dice, held-out tiles, after 30 s | {cells('dice_30s')} |",
             f"| preview Dice, held-out tiles, after 60 s | {cells('dice_60s')} |",
             f"| preview Dice, held-out tiles, after 120 s | {cells('dice_120s')} |",
             f"| lowest preview Dice between 60 and 120 s | {cells('lowest_dice_60_120s')} |",
             f"| random forest on the same drawings: Dice, held-out tiles | {cells('forest_dice')} |",
             f"| random forest: s to fit and predict (features included) | {cells('forest_s')} |",
             f"| batch run of the recursive preset (200 steps): Dice, held-out tiles | {cells('batch_dice')} |",
             f"| batch run: s of training | {cells('batch_s')} |",
             f"| preview Dice of tiles {CORRECTED} when their partial masks are painted (120 s) | "
             f"{cells('dice_corrected_before')} |",
             f"| the same 30 s later | {cells('dice_corrected_after')} |",
             f"| preview Dice of the other held-out tiles at 120 s | {cells('dice_rest_before')} |",
             f"| the same 30 s later | {cells('dice_rest_after')} |",
             f"| 'draw here next': error rate of its top 10 % / the tiles' | {cells('draw_here_error_ratio')} |",
             f"| stop(): s until the session ended | {cells('stop_s')} |",
             f"| steps done (growths) in 150 s | {cells('steps')} ({cells('growths')}) |"]
    write_results(args.out, "live_recursive", "\n".join(lines) + "\n", {"sessions": runs, "seeds": seeds,
                                                                        "machine": machine})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
