"""Make the README's widget screenshots and the mask-evolution strip from a real run.

Opens the bundled sample in napari as a stack of its 16 tiles of 128 x 128,
docks the three widgets, trains the recursive method with its defaults from
partial masks of every nucleus and the expert mask of ONE tile (the other
slices of the exact-mask layer stay empty, so they count as unlabelled),
pressing Start in the Train widget, and saves:

- ``docs/widget_annotations.png``, ``docs/widget_train.png``,
  ``docs/widget_predict.png``: the docked widgets after the run;
- ``docs/viewer.png``: the whole napari window with the evolution layer;
- ``docs/evolution.png``: the approximations at every iteration on a tile
  without exact masks (outlines over the image), iteration 0 being the
  partial masks.

Usage (needs a screen or ``xvfb-run -a``; about 2 minutes on 2 CPU cores)::

    xvfb-run -a python docs/make_screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


TILE = 128
STRONG_TILE = 2  # the benchmark's strong tile
SHOWN_TILE = 9


def as_tiles(array: np.ndarray) -> np.ndarray:
    """(512, 512) -> (16, 128, 128), tiles row by row."""
    n = array.shape[0] // TILE
    return array.reshape(n, TILE, n, TILE).transpose(0, 2, 1, 3).reshape(n * n, TILE, TILE)


def evolution_strip(image: np.ndarray, planes: np.ndarray, truth: np.ndarray, crop, path: Path) -> None:
    """One panel per iteration: the crop with the approximation (yellow) and expert (cyan) outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    from napari_coarseseg.demo import dice

    view = image[crop].astype(np.float32)
    low, high = np.percentile(view, (1, 99.8))
    view = np.clip((view - low) / (high - low), 0, 1)
    figure, axes = plt.subplots(1, len(planes), figsize=(2.4 * len(planes), 2.7), dpi=110)
    for k, (axis, plane) in enumerate(zip(axes, planes)):
        rgb = np.repeat(view[..., None], 3, axis=-1)
        rgb[find_boundaries(truth[crop] > 0, mode="inner")] = (0.2, 0.8, 1.0)
        rgb[find_boundaries(plane[crop] > 0, mode="inner")] = (1.0, 0.85, 0.1)
        axis.imshow(rgb)
        axis.set_title(f"k={k}: Dice {dice(plane[crop] > 0, truth[crop] > 0):.2f}", fontsize=9)
        axis.axis("off")
    figure.suptitle("Recursive approximation: partial masks (k=0) grow to the nuclei boundaries "
                    "(yellow; expert: cyan)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_coarseseg import simulate
    from napari_coarseseg._viewer import train_in_viewer

    viewer = napari.Viewer(title="napari-coarseseg")
    viewer.window.resize(1400, 900)
    from napari_coarseseg.samples import load_dsb_nuclei

    full_image, full_expert = load_dsb_nuclei()
    # Simulated on the whole 2-D image, then tiled: each slice is a separate image.
    partial = as_tiles(simulate(full_expert, instances=True).partial)
    image, expert = as_tiles(full_image), as_tiles(full_expert)
    image_name = "nuclei tiles"
    viewer.add_image(image, name=image_name, colormap="gray")
    viewer.add_labels(partial, name="partial masks", opacity=0.6)
    strong = np.zeros(expert.shape, np.uint8)
    strong[STRONG_TILE] = expert[STRONG_TILE] > 0  # exact masks on one tile only
    viewer.add_labels(strong, name="exact masks (one tile)", visible=False)

    docks = {}
    for name in ("Coarse annotations", "Train", "Predict"):
        _, docks[name] = viewer.window.add_plugin_dock_widget("napari-coarseseg", name, tabify=True)
    train = docks["Train"]
    train.method.setCurrentText("recursive")
    train.roles["partial"].setCurrentText("partial masks")
    train.roles["strong"].setCurrentText("exact masks (one tile)")
    docks["Coarse annotations"].assign_layer.setCurrentText("partial masks")
    docks["Coarse annotations"].assign_role.setCurrentText("partial")
    docks["Coarse annotations"].assign()

    application = QApplication.instance()
    worker = train.start()
    if worker is None:
        print("training did not start", file=sys.stderr)
        return 1
    start = time.perf_counter()
    while train.running:
        application.processEvents()
        time.sleep(0.02)
    print(f"trained in {time.perf_counter() - start:.0f} s", flush=True)
    for _ in range(20):
        application.processEvents()

    for name, widget in docks.items():
        widget.parentWidget().raise_()
        application.processEvents()
        widget.grab().save(str(out / f"widget_{name.split()[-1].lower()}.png"))
    viewer.layers.selection.active = viewer.layers[f"{image_name} evolution"]
    viewer.layers["partial masks"].visible = False
    viewer.layers[f"{image_name} prediction"].visible = False
    viewer.dims.set_current_step(1, SHOWN_TILE)
    application.processEvents()
    viewer.screenshot(str(out / "viewer.png"), canvas_only=False)

    planes = np.asarray(viewer.layers[f"{image_name} evolution"].data)
    evolution_strip(image, planes, expert, (SHOWN_TILE, slice(None), slice(None)), out / "evolution.png")
    print(f"wrote {', '.join(sorted(p.name for p in out.glob('*.png')))} in {out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
