"""Make the README's widget screenshots and the mask-evolution strip and animation from a real run.

Opens the plugin's sample "Nuclei tiles with partial masks" in napari (the
bundled image as a stack of its 16 tiles of 128 x 128, partial masks of every
nucleus, the expert mask of ONE tile; the other slices of the exact-mask layer
stay empty, so they count as unlabelled), docks the three widgets, presses
Start in the Train widget (which has switched to the recursive method and
preselected the sample's layers by their roles) with the defaults, and saves:

- ``docs/widget_annotations.png``, ``docs/widget_train.png``,
  ``docs/widget_predict.png``: the docked widgets after the run;
- ``docs/viewer.png``: the whole napari window with the evolution layer;
- ``docs/evolution.png``: the approximations at every iteration on a tile
  without exact masks (outlines over the image), iteration 0 being the
  partial masks; ``docs/evolution.gif``: the same as an animation.

Usage (needs a screen or ``xvfb-run -a``; about 2 minutes on 2 CPU cores)::

    xvfb-run -a python docs/make_screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

SHOWN_TILE = 9  # a tile without exact masks


def overlays(image: np.ndarray, planes: np.ndarray, truth: np.ndarray) -> list[np.ndarray]:
    """Per iteration, the image (RGB, 0-1) with the approximation (yellow) and expert (cyan) outlines."""
    from skimage.segmentation import find_boundaries

    view = image.astype(np.float32)
    low, high = np.percentile(view, (1, 99.8))
    view = np.clip((view - low) / (high - low), 0, 1)
    frames = []
    for plane in planes:
        rgb = np.repeat(view[..., None], 3, axis=-1)
        rgb[find_boundaries(truth > 0, mode="inner")] = (0.2, 0.8, 1.0)
        rgb[find_boundaries(plane > 0, mode="inner")] = (1.0, 0.85, 0.1)
        frames.append(rgb)
    return frames


def evolution_gif(image: np.ndarray, planes: np.ndarray, truth: np.ndarray, path: Path, zoom: int = 3) -> None:
    """The overlays as an animated GIF, each frame captioned with its iteration and Dice."""
    from PIL import Image, ImageDraw

    from napari_coarseseg.demo import dice

    frames = []
    for k, (rgb, plane) in enumerate(zip(overlays(image, planes, truth), planes, strict=True)):
        big = np.kron((rgb * 255).astype(np.uint8), np.ones((zoom, zoom, 1), np.uint8))
        frame = Image.fromarray(big)
        ImageDraw.Draw(frame).text((6, 4), f"iteration {k}: Dice {dice(plane > 0, truth > 0):.2f}",
                                   fill=(255, 255, 255))
        frames.append(frame.convert("P", palette=Image.ADAPTIVE))
    # Hold the last frame longer so the final masks can be read.
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=[900] * (len(frames) - 1) + [2500],
                   loop=0)


def evolution_strip(image: np.ndarray, planes: np.ndarray, truth: np.ndarray, path: Path) -> None:
    """One panel per iteration: the image with the approximation (yellow) and expert (cyan) outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_coarseseg.demo import dice

    figure, axes = plt.subplots(1, len(planes), figsize=(2.4 * len(planes), 2.7), dpi=110)
    for k, (axis, plane, rgb) in enumerate(zip(axes, planes, overlays(image, planes, truth), strict=True)):
        axis.imshow(rgb)
        axis.set_title(f"k={k}: Dice {dice(plane > 0, truth > 0):.2f}", fontsize=9)
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

    viewer = napari.Viewer(title="napari-coarseseg")
    viewer.window.resize(1400, 900)
    viewer.open_sample("napari-coarseseg", "dsb2018_nuclei_tiles")
    image_layer = next(layer for layer in viewer.layers if isinstance(layer, napari.layers.Image))
    image_name, image = image_layer.name, np.asarray(image_layer.data)
    expert = np.asarray(viewer.layers["expert mask"].data)

    docks = {}
    for name in ("Coarse annotations", "Train", "Predict"):
        _, docks[name] = viewer.window.add_plugin_dock_widget("napari-coarseseg", name, tabify=True)
    train = docks["Train"]
    if train.method.currentText() != "recursive" or train.roles["partial"].value() != "partial masks":
        print("the Train widget did not pick up the sample's roles", file=sys.stderr)
        return 1

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
    train.parentWidget().raise_()  # the window shot shows the Train tab with its result
    application.processEvents()
    viewer.screenshot(str(out / "viewer.png"), canvas_only=False)

    planes = np.asarray(viewer.layers[f"{image_name} evolution"].data)[:, SHOWN_TILE]
    evolution_strip(image[SHOWN_TILE], planes, expert[SHOWN_TILE], out / "evolution.png")
    evolution_gif(image[SHOWN_TILE], planes, expert[SHOWN_TILE], out / "evolution.gif")
    print(f"wrote {', '.join(sorted(p.name for p in out.glob('*.png'))) + ', evolution.gif'} in {out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
