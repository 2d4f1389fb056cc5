"""The bundled sample data: where it lives and how napari opens it.

The sample images live in the repository's ``sample_data/`` folder, which an
installation ships as ``napari_coarseseg/sample_data``. Nothing here imports
napari: the sample-data contribution only returns layer data tuples.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from .annotations import ROLE_KEY

DSB_NUCLEI = "dsb2018_nuclei"
EM_VOLUME = "isbi2012_em_volume"


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


TILE = 128
STRONG_TILE = 2  # the tile whose exact mask the tiles sample gives (a median nucleus count, as in the benchmark)


def as_tiles(array: np.ndarray, tile: int = TILE) -> np.ndarray:
    """Cut a (Y, X) array into a (N, tile, tile) stack of its tiles, row by row.

    Y and X must be multiples of ``tile``.
    """
    rows, columns = array.shape[0] // tile, array.shape[1] // tile
    if (rows * tile, columns * tile) != array.shape:
        raise ValueError(f"shape {array.shape} is not a whole number of {tile} x {tile} tiles")
    return array.reshape(rows, tile, columns, tile).transpose(0, 2, 1, 3).reshape(rows * columns, tile, tile)


def dsb_nuclei_layers() -> list[tuple]:
    """napari sample data: the image, simulated positive and negative drawings, the expert mask.

    The drawings are what ``coarseseg simulate --instances`` makes from the
    expert mask: a starting point to train on at once (method refineseg), or
    to edit by hand. Their roles are set, so the Train widget preselects them.
    """
    from .annotations import simulate

    image, labels = load_dsb_nuclei()
    drawings = simulate(labels, instances=True)
    return [
        (image, {"name": "nuclei (DSB 2018)", "colormap": "gray"}, "image"),
        (drawings.positive, {"name": "positive drawing", "opacity": 0.7, "metadata": {ROLE_KEY: "positive"}},
         "labels"),
        (drawings.negative, {"name": "negative drawing", "opacity": 0.4, "metadata": {ROLE_KEY: "negative"}},
         "labels"),
        (labels, {"name": "expert mask", "visible": False}, "labels"),
    ]


def dsb_nuclei_tiles_layers() -> list[tuple]:
    """napari sample data for the recursive method: 16 tiles with partial masks, one tile with exact masks.

    The 512 x 512 image is cut into a stack of 16 tiles of 128 x 128 (each
    slice is one training image). Every tile carries partial masks (the inner
    part of every nucleus, from ``coarseseg simulate --instances``); tile
    ``STRONG_TILE`` also carries the expert mask as strong labels, the other
    slices of that layer are empty (unlabelled).
    """
    from .annotations import simulate

    image, labels = load_dsb_nuclei()
    partial = as_tiles(simulate(labels, instances=True).partial)
    expert = as_tiles(labels)
    strong = np.zeros(expert.shape, np.uint8)
    strong[STRONG_TILE] = expert[STRONG_TILE] > 0
    return [
        (as_tiles(image), {"name": "nuclei tiles (DSB 2018)", "colormap": "gray"}, "image"),
        (partial, {"name": "partial masks", "opacity": 0.6, "metadata": {ROLE_KEY: "partial"}}, "labels"),
        (strong, {"name": f"exact masks (tile {STRONG_TILE})", "visible": False, "metadata": {ROLE_KEY: "strong"}},
         "labels"),
        (expert, {"name": "expert mask", "visible": False}, "labels"),
    ]


def em_volume_layers() -> list[tuple]:
    """napari sample data: the EM volume (8 x 128 x 128 voxels of 50 x 4 x 4 nm) with scribbles on slices 2 and 5.

    The NIfTI files of ``sample_data/isbi2012_em_volume`` as the reader opens
    them (voxel size as scale, the file's grid in the metadata, so the layers
    made from them are saved on it), with the drawings' roles set for the
    Train widget: strokes on two slices of eight, the normal case of a volume.
    """
    from ._nifti_napari import layer_data

    folder = sample_data_dir() / EM_VOLUME
    image, positive, negative, labels = (layer_data(folder / f"{name}.nii.gz")
                                         for name in ("image", "positive", "negative", "labels"))
    image[1]["name"] = "EM volume (ISBI 2012)"
    for layer, role, opacity in ((positive, "positive", 0.7), (negative, "negative", 0.5)):
        layer[1].update(name=f"{role} drawing", opacity=opacity, metadata={**layer[1]["metadata"], ROLE_KEY: role})
    labels[1].update(name="expert mask", visible=False)
    return [image, (positive[0], positive[1], "labels"), (negative[0], negative[1], "labels"), labels]
