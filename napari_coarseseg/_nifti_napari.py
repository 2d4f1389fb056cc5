"""NIfTI in napari: the reader and the Labels writer of the manifest, and the grid of layers made from an image.

- :func:`get_reader` opens ``*.nii`` and ``*.nii.gz`` (napari-coarseseg.read_nifti
  in napari.yaml) as a layer in the package's (Z, Y, X) order
  (:mod:`napari_coarseseg.nifti`) with ``scale`` = the voxel sizes, so an
  anisotropic volume looks right, and the file's grid (affine, header) as
  ``layer.metadata["nifti"]`` (a :class:`~napari_coarseseg.nifti.NiftiInfo`;
  ``.affine`` is the file's 4 x 4 affine). A file whose intent is "label"
  (what :func:`~napari_coarseseg.nifti.write_nifti` writes for labels) opens
  as a Labels layer, any other as an Image layer. napari shows the voxel grid
  scaled by the voxel sizes: no rotation, no origin (every layer made from
  the image gets the same scale, so they overlay).
- :func:`write_labels` saves a Labels layer as ``.nii``/``.nii.gz``
  (napari-coarseseg.write_nifti_labels) on the grid in its metadata, never over
  a file that holds an image (:func:`holds_labels`): the
  prediction, evolution and drawing layers the plugin makes from a NIfTI image
  carry the image's grid (:func:`derived_layer_kwargs`), so they are written
  with its affine and header and overlay it in ITK-SNAP and Slicer. A layer
  without one (drawn from napari's own "New Labels layer" button, or from a
  TIFF) is written axis-aligned with its ``scale`` and ``translate`` as voxel
  sizes and origin (:func:`~napari_coarseseg.nifti.grid_info`), which matches a
  NIfTI image only if that image's affine is diagonal with that origin.

Why not a NIfTI plugin as a dependency: napari-nifti (MIC-DKFZ, 0.0.20 on
PyPI, "Pre-Alpha"; not installed here) is the maintained one, but it pulls in
medvol, SimpleITK and pynrrd, and reorients voxels to SAR+ with negative
scales, so its layers are not in the file's voxel order and a drawing on them
is not the array :func:`~napari_coarseseg.nifti.read_nifti` and the command
line read. With both installed napari asks which reader to use.

No napari import here: npe2 calls these functions with paths and layer data,
and the viewer functions pass layers in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import is_nifti
from .nifti import NiftiInfo, _nibabel, grid_info, read_nifti, write_nifti

__all__ = ["NIFTI_KEY", "get_reader", "read_layers", "write_labels", "derived_layer_kwargs"]

#: The layer.metadata key holding a layer's NIfTI grid (NiftiInfo).
NIFTI_KEY = "nifti"


def _paths(path) -> list[str]:
    return [str(path)] if isinstance(path, (str, Path)) else [str(p) for p in path]


def get_reader(path):
    """npe2 reader contribution: :func:`read_layers` for NIfTI files, ``None`` for anything else."""
    paths = _paths(path)
    return read_layers if paths and all(is_nifti(p) for p in paths) else None


def _has_channels(path) -> bool:
    """Whether the file has a fourth axis of length > 1 (X, Y, Z, C): read from the header, not the voxels."""
    shape = tuple(_nibabel().load(str(path)).shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return len(shape) == 4


def layer_data(path) -> tuple:
    """One NIfTI file as a napari layer data tuple ``(array, attributes, "image" or "labels")``.

    A 4-D file (X, Y, Z, C) opens as one grey image layer per channel
    (napari's ``channel_axis``), each on the file's 3-D grid: the layers the
    Train and Predict widgets take as "more channels".
    """
    channels = _has_channels(path)
    # NaN voxels are shown; training and prediction refuse them with their own message.
    array, info = read_nifti(path, check_finite=False, channels=channels)
    name = Path(path).name
    name = name[: -len(".nii.gz")] if name.lower().endswith(".gz") else Path(name).stem
    if channels:
        n = array.shape[-1]
        # Per-channel lists: a bare 3-value scale with 3 channels would be ambiguous to napari.
        return array, {"channel_axis": 3, "name": [f"{name} [{c}]" for c in range(n)],
                       "scale": [info.spacing] * n, "metadata": [{NIFTI_KEY: info} for _ in range(n)],
                       "colormap": ["gray"] * n, "blending": ["additive"] * n}, "image"
    labels = info.header.get_intent()[0] == "label" and array.dtype.kind in "biu"
    attributes = {"name": name, "scale": info.spacing, "metadata": {NIFTI_KEY: info}}
    if not labels:
        attributes["colormap"] = "gray"
    return array, attributes, "labels" if labels else "image"


def read_layers(path) -> list[tuple]:
    """The layers of one NIfTI file or of several (one layer each)."""
    return [layer_data(p) for p in _paths(path)]


def holds_labels(path) -> bool:
    """Whether the NIfTI file at ``path`` is a label map (intent "label", integer voxels): what :func:`layer_data`
    opens as a Labels layer; anything else opens as an image. Reads the header only."""
    header = _nibabel().load(str(path)).header
    return header.get_intent()[0] == "label" and header.get_data_dtype().kind in "biu"


def write_labels(path: str, data, attributes: dict) -> list[str]:
    """npe2 writer contribution: a Labels layer as ``.nii``/``.nii.gz`` on its grid (see the module docstring).

    An existing file that holds an image is never overwritten: a layer made from ``scan.nii.gz`` carries its grid
    and would otherwise be saved over the scan itself with one slip in the file dialog."""
    if is_nifti(path) and Path(path).is_file() and not holds_labels(path):
        raise ValueError(f"{Path(path).name} holds an image, not a label map: saving the labels over it would destroy "
                         "it; choose another file name")
    data = np.asarray(data)
    info = (attributes.get("metadata") or {}).get(NIFTI_KEY)
    if not isinstance(info, NiftiInfo) or data.shape[data.ndim - len(info.shape):] != info.shape:
        spatial = min(data.ndim, 3)  # a leading axis beyond (Z, Y, X) (iterations) becomes the file's fourth
        scale = attributes.get("scale", [1.0] * data.ndim)[data.ndim - spatial:]
        translate = attributes.get("translate", [0.0] * data.ndim)[data.ndim - spatial:]
        info = grid_info(data.shape[data.ndim - spatial:], spacing=np.abs(scale), origin=translate)
    return [str(write_nifti(path, data, like=info))]


def derived_layer_kwargs(image_layer, ndim: int) -> dict:
    """``scale``, ``translate`` and NIfTI grid for a layer of ``ndim`` axes made from ``image_layer``.

    The layer's last axes are the image's spatial axes; a leading axis more
    (the evolution's iterations) gets scale 1 and translate 0.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> image = SimpleNamespace(scale=(50.0, 4.0, 4.0), translate=(0.0, 0.0, 0.0), metadata={})
    >>> derived_layer_kwargs(image, 4)
    {'scale': (1.0, 50.0, 4.0, 4.0), 'translate': (0.0, 0.0, 0.0, 0.0)}
    """
    scale = tuple(float(s) for s in image_layer.scale)
    translate = tuple(float(t) for t in image_layer.translate)
    extra = ndim - len(scale)
    kwargs = {"scale": (1.0,) * extra + scale[-ndim:], "translate": (0.0,) * extra + translate[-ndim:]}
    info = (getattr(image_layer, "metadata", None) or {}).get(NIFTI_KEY)
    if isinstance(info, NiftiInfo):
        kwargs["metadata"] = {NIFTI_KEY: info}
    return kwargs
