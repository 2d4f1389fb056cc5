"""Make ``docs/live.gif`` from a real scripted live session in napari.

Opens the DSB sample in a napari viewer, adds scribble strokes on its
top-left quadrant only (``simulate(..., style="scribble")``), starts a live
session (``live_in_viewer``, what the Train widget's Live button does), and
records the prediction layer at every preview. After 60 s it paints
corrections on the preview's worst mistakes through ``Labels.data_setitem``
(as napari's brush does; ``simulate_corrections``), lets the session run 30 s
more, and stops it. Each frame: the image, the strokes (green: nucleus,
magenta: not nucleus), the prediction's outlines (yellow), captioned with
the time and the Dice of the whole image against the expert mask.

Usage (needs a screen or ``xvfb-run -a``; about 2 minutes on 2 CPU cores)::

    xvfb-run -a python docs/make_live_animation.py [--out docs]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

HALF = 2  # frames are the image at half size: 256 x 256


def frame(image, positive, negative, prediction, caption: str):
    """The image with strokes and prediction outlines, halved, captioned (a PIL image)."""
    from PIL import Image, ImageDraw
    from skimage.segmentation import find_boundaries

    low, high = np.percentile(image, (1, 99.8))
    rgb = np.repeat(np.clip((image - low) / (high - low), 0, 1)[..., None], 3, axis=-1)
    rgb[positive > 0] = (0.2, 0.9, 0.2)
    rgb[negative > 0] = (0.9, 0.2, 0.9)
    rgb[find_boundaries(prediction > 0, mode="inner")] = (1.0, 0.85, 0.1)
    picture = Image.fromarray((rgb[::HALF, ::HALF] * 255).astype(np.uint8))
    ImageDraw.Draw(picture).text((4, 3), caption, fill=(255, 255, 255))
    return picture.convert("P", palette=Image.ADAPTIVE)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_coarseseg import dice, live_in_viewer
    from napari_coarseseg.annotations import simulate, simulate_corrections
    from napari_coarseseg.live import LivePreview
    from napari_coarseseg.samples import load_dsb_nuclei

    torch.set_num_threads(2)
    image, truth = load_dsb_nuclei()
    quadrant = np.zeros(truth.shape, bool)
    quadrant[:256, :256] = True
    drawn = simulate(np.where(quadrant, truth, 0), instances=True, style="scribble", seed=0)
    viewer = napari.Viewer(show=False)
    viewer.add_image(image, name="dsb")
    nuclei = viewer.add_labels((drawn.positive * quadrant).astype(np.uint8), name="nuclei")
    not_nuclei = viewer.add_labels((drawn.negative * quadrant).astype(np.uint8), name="not nuclei")
    viewer.reset_view()
    app = QApplication.instance()
    frames, started, corrected = [], time.perf_counter(), None

    def record(event):
        if not isinstance(event, LivePreview):
            return
        prediction = viewer.layers["dsb prediction"].data
        now = time.perf_counter() - started
        note = "" if corrected is None else f", corrections at {corrected:.0f} s"
        frames.append(frame(image, nuclei.data, not_nuclei.data, prediction,
                            f"live: {now:.0f} s, Dice {dice(prediction > 0, truth > 0):.2f}{note}"))

    session = live_in_viewer(viewer, "dsb", positive="nuclei", negative="not nuclei", device="cpu", seed=0,
                             on_event=record)
    while time.perf_counter() - started < 60:
        app.processEvents()
        time.sleep(0.01)
    positive, negative, _ = simulate_corrections(viewer.layers["dsb prediction"].data, truth)
    nuclei.data_setitem(np.nonzero(positive), 1)
    not_nuclei.data_setitem(np.nonzero(negative), 1)
    corrected = time.perf_counter() - started
    while time.perf_counter() - started < 90:
        app.processEvents()
        time.sleep(0.01)
    session.stop()
    path = args.out / "live.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=[600] * (len(frames) - 1) + [2500],
                   loop=0)
    print(f"wrote {path} ({len(frames)} frames)")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
