"""The bundled sample data: where it lives and how napari opens it.

The sample images live in the repository's ``sample_data/`` folder, which an
installation ships as ``napari_coarseseg/sample_data``. Nothing here imports
napari: the sample-data contribution only returns layer data tuples.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

DSB_NUCLEI = "dsb2018_nuclei"


def sample_data_dir() -> Path:
    """Folder of the sample data: the source tree's ``sample_data/`` or its installed copy."""
    source_tree = Path(__file__).resolve().parent.parent / "sample_data"
    if (source_tree / DSB_NUCLEI).is_dir():
        return source_tree
    return Path(str(resources.files("napari_coarseseg") / "sample_data"))


def load_dsb_nuclei() -> tuple[np.ndarray, np.ndarray]:
    """The DSB 2018 nuclei image (512 x 512, uint16) and its expert instance mask."""
    import tifffile

    folder = sample_data_dir() / DSB_NUCLEI
    return tifffile.imread(folder / "image.tif"), tifffile.imread(folder / "labels.tif")


def dsb_nuclei_layers() -> list[tuple]:
    """napari sample data: the image, simulated positive and negative drawings, the expert mask.

    The drawings are what ``coarseseg simulate --instances`` makes from the
    expert mask: a starting point to train on at once, or to edit by hand.
    """
    from .annotations import simulate

    image, labels = load_dsb_nuclei()
    drawings = simulate(labels, instances=True)
    return [
        (image, {"name": "nuclei (DSB 2018)", "colormap": "gray"}, "image"),
        (drawings.positive, {"name": "positive drawing", "opacity": 0.7}, "labels"),
        (drawings.negative, {"name": "negative drawing", "opacity": 0.4}, "labels"),
        (labels, {"name": "expert mask", "visible": False}, "labels"),
    ]
