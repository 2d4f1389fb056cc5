"""The end-to-end demo behind ``coarseseg demo``: sample image in, outputs and a figure out.

It simulates coarse drawings from the expert mask of the bundled nuclei
image, trains RefineSeg on the LEFT half only, segments the whole image and
scores the RIGHT half (never seen in training) against the expert mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .annotations import simulate
from .io import StagedWrites, made_folder
from .methods import predict
from .methods.refineseg import train_refineseg
from .metrics import dice  # re-exported: the benchmarks import dice from here
from .model_io import save_model
from .samples import load_dsb_nuclei
from .training import load_preset, run_to_end

# Overlay colours (RGB, 0-255).
POSITIVE_COLOUR = (60, 220, 60)
NEGATIVE_COLOUR = (220, 60, 220)
PREDICTION_COLOUR = (255, 210, 0)
EXPERT_COLOUR = (0, 200, 255)


def _grey_rgb(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, (1, 99.8))
    grey = np.clip((image.astype(np.float32) - low) / max(high - low, 1e-6), 0, 1)
    return np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1)


def _paint(rgb: np.ndarray, mask: np.ndarray, colour, alpha: float) -> np.ndarray:
    out = rgb.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
    return out.astype(np.uint8)


def make_figure(image, positive, negative, prediction, expert, split_column: int | None = None) -> np.ndarray:
    """Three panels side by side: drawings, prediction vs expert outlines, prediction mask.

    Returns an RGB uint8 array (write it with any image writer).
    """
    from skimage.segmentation import find_boundaries

    base = _grey_rgb(image)
    drawings = _paint(_paint(base, positive > 0, POSITIVE_COLOUR, 0.6), negative > 0, NEGATIVE_COLOUR, 0.25)
    outlines = _paint(base, find_boundaries(expert > 0, mode="inner"), EXPERT_COLOUR, 1.0)
    outlines = _paint(outlines, find_boundaries(prediction > 0, mode="inner"), PREDICTION_COLOUR, 1.0)
    masks = _paint(base, prediction > 0, PREDICTION_COLOUR, 0.45)
    panels = [drawings, outlines, masks]
    if split_column is not None:
        for panel in panels:
            panel[:, split_column - 1 : split_column + 1] = 255
    gap = np.full((image.shape[0], 8, 3), 255, np.uint8)
    return np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)


def run_demo(out_dir="coarseseg-demo", steps: int | None = None, device="auto", quiet: bool = False,
             seed: int = 0) -> dict:
    """Run the demo; return a summary dict (also written as ``summary.json``).

    Outputs in ``out_dir``: ``positive.tif``, ``negative.tif`` (simulated
    drawings), ``model.safetensors``, ``prediction.tif``, ``evolution.tif``
    (masks on the training half, one plane per checkpoint), ``figure.png`` and
    ``summary.json``.
    """
    import imageio.v3 as iio
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    image, expert = load_dsb_nuclei()
    drawings = simulate(expert, instances=True, seed=seed)
    half = image.shape[1] // 2
    train = np.s_[:, :half]
    test = np.s_[:, half:]

    config = load_preset("refineseg")
    if steps is not None:
        config = config.replace(steps=steps).validate()
    evolution = []
    bar = tqdm(total=config.steps, desc="training", unit="step", disable=quiet or None)

    def on_event(event):
        bar.update(event.step - bar.n)
        if event.masks is not None:
            evolution.append(event.masks[0])

    try:
        model = run_to_end(
            train_refineseg(image[train], [drawings.positive[train]], [drawings.negative[train]],
                            config=config, seed=seed, device=device),
            on_event,
        )
    finally:
        bar.close()
    prediction = predict(model, image, device=device)
    score = dice(prediction.labels[test] > 0, expert[test] > 0)
    figure = make_figure(image, np.where(np.arange(image.shape[1]) < half, drawings.positive, 0),
                         np.where(np.arange(image.shape[1]) < half, drawings.negative, 0),
                         prediction.labels, expert, split_column=half)

    summary = {
        "dice_right_half": round(score, 4),
        "training_seconds": model.card["training"]["seconds"],
        "steps": config.steps,
        "device": model.card["training"]["device"],
        "evolution_planes": len(evolution),
    }
    # The folder is made now, not before two minutes of training; every output appears, or none and no folder.
    with made_folder(out_dir), StagedWrites() as staged:
        for name, array in {"positive.tif": drawings.positive[train], "negative.tif": drawings.negative[train],
                            "prediction.tif": prediction.labels, "evolution.tif": np.stack(evolution)}.items():
            staged.add(out_dir / name, array)
        staged.add(out_dir / "model.safetensors", write=lambda tmp: save_model(model, tmp))
        staged.add(out_dir / "figure.png", write=lambda tmp: iio.imwrite(tmp, figure, extension=".png"))
        staged.add(out_dir / "summary.json",
                   write=lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    return {"dice": score, "out_dir": str(out_dir), **summary}
