"""The picture of the simulated drawing styles in the README: ``docs/scribbles.png``.

A 256 x 256 crop of the bundled DSB 2018 nuclei image with the drawings of
``coarseseg simulate --instances``: the eroded style (eroded expert masks),
the scribble style (brush strokes) and a second scribbling annotator who
draws 2 px too wide (``bias=2``). Green: positive, magenta: negative.

Usage::

    python benchmarks/drawings_figure.py [--out docs/scribbles.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from napari_coarseseg import simulate  # noqa: E402
from napari_coarseseg.samples import load_dsb_nuclei  # noqa: E402

CROP = np.s_[128:384, 0:256]
POSITIVE, NEGATIVE = (0.1, 0.9, 0.2), (1.0, 0.1, 0.9)


def overlay(axis, image, drawings, title: str) -> None:
    """The image in grey with the positive and negative drawings semi-transparent on top."""
    axis.imshow(image, cmap="gray", vmin=np.percentile(image, 1), vmax=np.percentile(image, 99.5))
    for mask, colour in ((drawings.negative > 0, NEGATIVE), (drawings.positive > 0, POSITIVE)):
        rgba = np.zeros(mask.shape + (4,))
        rgba[mask] = (*colour, 0.55)
        axis.imshow(rgba, interpolation="nearest")
    axis.contour(drawings.classes, levels=[0.5], colors="white", linewidths=0.4, alpha=0.6)
    axis.set_title(title, fontsize=10)
    axis.set_axis_off()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "scribbles.png"))
    args = parser.parse_args(argv)
    image, labels = load_dsb_nuclei()
    image, labels = image[CROP], labels[CROP]
    panels = [
        (simulate(labels, instances=True, seed=0), "eroded (default)"),
        (simulate(labels, instances=True, seed=0, style="scribble"), "scribble"),
        (simulate(labels, instances=True, seed=1, style="scribble", bias=2), "scribble, bias=2 (another annotator)"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3))
    for axis, (drawings, title) in zip(axes, panels, strict=True):
        overlay(axis, image, drawings, title)
    figure.suptitle("coarseseg simulate --instances: green positive, magenta negative, white: expert outline",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
