"""Cut the NIfTI sample volume in this folder from the ISBI 2012 EM stack in ``benchmarks/data/isbi2012_em``.

Writes, all on one grid (8 x 128 x 128 voxels of 4 x 4 x 50 nm, stated as
0.004 x 0.004 x 0.05 micron in the header):

- ``image.nii.gz``: slices 0-7, rows 128-255, columns 256-383 of the stack (uint8);
- ``labels.nii.gz``: the expert mask as classes, 1 = cell interior, 0 = membrane;
- ``positive.nii.gz``, ``negative.nii.gz``: scribbles on slices 2 and 5 only
  (:func:`napari_coarseseg.annotations.simulate`, ``style="scribble"``, with the
  EM brush of ``benchmarks/realdata.py``: short 3-4 px dabs on the membranes,
  strokes over 15 % of each cell), zero (not annotated) on the other slices.

Usage::

    python sample_data/isbi2012_em_volume/make_volume.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from napari_coarseseg.annotations import simulate
from napari_coarseseg.nifti import grid_info, write_nifti

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent.parent / "benchmarks" / "data" / "isbi2012_em"
CROP = np.s_[0:8, 128:256, 256:384]
SPACING = (0.05, 0.004, 0.004)  # (Z, Y, X) in micron: 50 nm sections of 4 x 4 nm pixels
DRAWN_SLICES = (2, 5)
# benchmarks/realdata.py, DRAWING["isbi2012_em"]
BRUSH = {"margin": 0, "edge_noise": 0.5, "brush_width": (3, 4), "coverage": 0.15, "negative_coverage": 0.3}


def main() -> None:
    image = tifffile.imread(SOURCE / "image.tif")[CROP]
    instances = tifffile.imread(SOURCE / "labels.tif")[CROP]
    grid = grid_info(image.shape, spacing=SPACING, units="micron", name="image.nii.gz")
    positive, negative = np.zeros(image.shape, np.uint8), np.zeros(image.shape, np.uint8)
    for z in DRAWN_SLICES:
        drawings = simulate(instances[z], instances=True, style="scribble", seed=z, **BRUSH)
        positive[z], negative[z] = drawings.positive, drawings.negative
    write_nifti(HERE / "image.nii.gz", image, like=grid, as_labels=False)
    write_nifti(HERE / "labels.nii.gz", (instances > 0).astype(np.uint8), like=grid)
    write_nifti(HERE / "positive.nii.gz", positive, like=grid)
    write_nifti(HERE / "negative.nii.gz", negative, like=grid)
    print(f"wrote {HERE}: {image.shape} voxels, positive on {int((positive > 0).sum())}, negative on "
          f"{int((negative > 0).sum())}")


if __name__ == "__main__":
    main()
