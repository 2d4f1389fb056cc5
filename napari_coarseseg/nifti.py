"""NIfTI volumes (``.nii``, ``.nii.gz``): reading images and drawings, writing label maps on their grid.

Axis order
----------
nibabel hands out a NIfTI's voxels in the file's index order ``(i, j, k)``,
usually called (X, Y, Z). This package works on stacks ``(Z, Y, X)``, trained
and segmented slice by slice along the first axis (DESIGN.md, "Images").
:func:`read_nifti` therefore reverses the axes, ``array[k, j, i]`` is the
file's voxel ``(i, j, k)``, and :func:`write_nifti` reverses them back. So a
slice ``array[k]`` is the file's k-th slice (the axial slice of a scan stored
the usual way, one section of a serial-section stack), and a prediction
written for an image has the image's ``(X, Y, Z)`` shape, affine and header:
it lies exactly on the image in ITK-SNAP, 3D Slicer and napari. Voxels are
never resampled or reoriented. The affine stays the file's own (it maps the
file's voxel indices ``(i, j, k, 1)`` to world coordinates), while
:attr:`NiftiInfo.spacing` is given in array order, (Z, Y, X), as napari's
layer ``scale`` wants it.

A NIfTI with a fourth axis of length > 1 (channels, time points, vector
components) is read only when the caller says it holds channels
(``read_nifti(path, channels=True)``, ``coarseseg --channel-axis 3``): the
spatial axes are reversed as above and the channels stay last, ``(Z, Y, X, C)``,
so the channel axis is 3 (or -1) both in the file and in the array. Label maps
written for it lie on its spatial grid (:attr:`NiftiInfo.shape` is (Z, Y, X)).
Without that, such a file is refused with a line saying so. A trailing axis of
length 1, which some tools write, is dropped.

Everything here raises :class:`napari_coarseseg.io.InputError` with one clear
line on bad input; writes are atomic
(:func:`napari_coarseseg.model_io.atomic_write`). nibabel is imported on first
use only.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import InputError, is_nifti
from .model_io import atomic_write

__all__ = ["NiftiInfo", "read_nifti", "write_nifti", "nifti_writer", "check_same_grid", "grid_info",
           "AFFINE_RTOL"]

#: Affines of two files count as equal within this relative tolerance (element-wise, with a floor of this
#: fraction of the largest voxel size for the entries that are zero in one of them).
AFFINE_RTOL = 1e-4


@dataclass
class NiftiInfo:
    """Where a NIfTI's voxels lie, and the header to write label maps on the same grid with.

    Attributes
    ----------
    affine : ndarray
        (4, 4) float64: the file's voxel indices ``(i, j, k, 1)`` to world
        coordinates (nibabel's best affine: the sform if its code is set, else
        the qform, else the voxel sizes alone).
    spacing : tuple of float
        Voxel sizes in array order: (Z, Y, X) for a volume, (Y, X) for a 2-D file.
    units : str
        The header's spatial unit: ``"mm"``, ``"micron"``, ``"meter"`` or
        ``"unknown"``.
    header : nibabel.Nifti1Header or nibabel.Nifti2Header
        A copy of the file's header.
    shape : tuple of int
        The array's spatial shape (array order, (Z, Y, X); without the channels
        of a file read with ``channels=True``).
    name : str
        The file name, for messages.
    """

    affine: np.ndarray
    spacing: tuple[float, ...]
    units: str
    header: object
    shape: tuple[int, ...]
    name: str = "NIfTI"

    @property
    def file_shape(self) -> tuple[int, ...]:
        """The shape as the file (and ITK-SNAP, Slicer, nibabel) states it: (X, Y, Z)."""
        return self.shape[::-1]


def _nibabel():
    import nibabel

    return nibabel


def read_nifti(path, check_finite: bool = True, channels: bool = False) -> tuple[np.ndarray, NiftiInfo]:
    """Read a ``.nii`` or ``.nii.gz`` file as a (Z, Y, X) array (a 2-D file as (Y, X)) and its grid.

    Parameters
    ----------
    path : str or Path
        The file.
    check_finite : bool
        Refuse floating-point voxels that are NaN or infinite (training and
        prediction cannot use them); the napari reader opens such files.
    channels : bool
        The file has four axes (X, Y, Z, C), the fourth its channels: read it
        as (Z, Y, X, C). A file with three axes is then refused.

    Returns
    -------
    array : ndarray
        The voxels, axes reversed (see the module docstring), in the file's
        type, or scaled to float32 by the header's ``scl_slope`` and
        ``scl_inter`` where they are set.
    info : NiftiInfo

    Raises
    ------
    InputError
        If the file does not exist, is not a readable NIfTI, has more than
        three axes (without ``channels``; with it, other than four), voxels
        that are not plain numbers, or NaN or infinite voxels (with
        ``check_finite``).

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> folder = Path(tempfile.mkdtemp())
    >>> info = grid_info((4, 6, 8), spacing=(2.0, 0.5, 0.5), units="mm")
    >>> path = write_nifti(folder / "labels.nii.gz", np.ones((4, 6, 8), np.uint8), like=info)
    >>> labels, read = read_nifti(path)
    >>> labels.shape, read.file_shape, read.spacing
    ((4, 6, 8), (8, 6, 4), (2.0, 0.5, 0.5))
    """
    nib = _nibabel()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file {str(path)!r} does not exist" if not path.exists()
                         else f"{str(path)!r} is a folder, not a NIfTI file")
    if not is_nifti(path):
        raise InputError(f"{str(path)!r} is not named .nii or .nii.gz")
    try:
        # mmap=False: a memory-mapped array would count as a lazy image (annotations.is_lazy) and skip the checks.
        image = nib.load(path, mmap=False)
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise TypeError(f"it is a {type(image).__name__}")
        proxy = image.dataobj
        # Scaled voxels (CT: int16 with scl_inter -1024) in float32, not nibabel's float64: half the memory,
        # and exact for values up to 2 ** 24.
        scaled = getattr(proxy, "slope", 1) != 1 or getattr(proxy, "inter", 0) != 0
        data = np.asarray(proxy, dtype=np.float32) if scaled else np.asarray(proxy)
    except Exception as error:  # nibabel, gzip and zlib raise many types for broken files
        raise InputError(f"cannot read {str(path)!r} as a NIfTI file ({type(error).__name__}: {error})") from None
    data = _spatial_axes(data, path.name, channels)
    if data.ndim < 2:
        raise InputError(f"{path.name} has shape {data.shape}; expected a 2-D image or a 3-D volume")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool) or np.iscomplexobj(data):
        raise InputError(f"{path.name} has voxels of type {data.dtype}; expected plain numbers (grey values "
                         "or labels), not colour or complex voxels")
    if check_finite and np.issubdtype(data.dtype, np.floating):
        _check_finite(data, path.name)
    header = image.header.copy()
    # The header holds float32: its shortest decimal (0.05, not 0.05000000074505806) is the size that was meant.
    spatial = data.ndim - (1 if channels else 0)
    zooms = tuple(float(str(z)) for z in header.get_zooms()[:spatial])
    info = NiftiInfo(affine=np.array(image.affine, dtype=np.float64), spacing=zooms[::-1],
                     units=str(header.get_xyzt_units()[0]), header=header, shape=data.shape[:spatial][::-1],
                     name=path.name)
    # nibabel's arrays are Fortran-ordered, so the reversed view is C-contiguous: no copy. Channels stay last.
    return (np.moveaxis(data.T, 0, -1) if channels else data.T), info


def _spatial_axes(data: np.ndarray, name: str, channels: bool) -> np.ndarray:
    """``data`` (file order) with trailing axes of length 1 dropped, refused unless it has the axes asked for."""
    wanted = 4 if channels else 3
    # A trailing axis of length 1 (X, Y, Z, 1) is a plain volume that some tools write with four axes.
    while data.ndim > wanted and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > wanted and channels:
        raise InputError(f"{name} has {data.ndim} axes {data.shape}; expected (X, Y, Z, C) with the channels fourth")
    if data.ndim > wanted:
        raise InputError(f"{name} has {data.ndim} axes {data.shape} (X, Y, Z, ...): pass --channel-axis 3 "
                         "(channel_axis=3) to read the fourth axis as channels; time points are not supported, "
                         "save one volume per file")
    if channels and data.ndim < wanted:
        raise InputError(f"{name} has {data.ndim} axes {data.shape} (X, Y, Z): no fourth (channel) axis; leave "
                         "--channel-axis out for a grey volume")
    return data


def _check_finite(data: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(data)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"{name} has {int(bad.sum())} NaN or infinite voxels (the first at voxel (i, j, k) = "
                         f"{first}); replace them (e.g. with numpy.nan_to_num) first")


def check_same_grid(info: NiftiInfo, image: NiftiInfo, role: str = "drawing") -> None:
    """Refuse a drawing whose shape or affine differs from its image's: it would lie elsewhere in space.

    Affines are compared element-wise within :data:`AFFINE_RTOL` (relative),
    with a floor of that fraction of the image's largest voxel size, so that
    float32 rounding in the header passes and a shift or a flip does not.

    Examples
    --------
    >>> image = grid_info((4, 6, 8), spacing=(2.0, 0.5, 0.5))
    >>> check_same_grid(grid_info((4, 6, 8), spacing=(2.0, 0.5, 0.5)), image)
    >>> check_same_grid(grid_info((4, 6, 8), spacing=(2.0, 0.5, 0.6)), image)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    napari_coarseseg.io.InputError: drawing NIfTI has another affine than image NIfTI ...
    """
    if info.shape != image.shape:
        raise InputError(f"{role} {info.name} has shape (X, Y, Z) = {info.file_shape} but image {image.name} has "
                         f"{image.file_shape}; draw on the image's grid")
    floor = AFFINE_RTOL * float(np.abs(image.affine[:3, :3]).max())
    if not np.allclose(info.affine, image.affine, rtol=AFFINE_RTOL, atol=floor):
        differs = np.abs(info.affine - image.affine).max()
        raise InputError(f"{role} {info.name} has another affine than image {image.name} (they differ by up to "
                         f"{differs:.3g}): it lies elsewhere in space; draw on the image's grid (same affine)")


def grid_info(shape, spacing=None, origin=None, units: str = "unknown", name: str = "NIfTI") -> NiftiInfo:
    """A grid without a file behind it: axis-aligned, ``spacing`` and ``origin`` in array order.

    For label maps whose image was not a NIfTI (e.g. a napari layer with only
    a ``scale``): the affine is diagonal, voxel sizes ``spacing`` (default 1),
    voxel 0 at ``origin`` (default 0), qform and sform code 2 ("aligned").
    """
    nib = _nibabel()
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in (spacing if spacing is not None else [1.0] * len(shape)))
    origin = tuple(float(o) for o in (origin if origin is not None else [0.0] * len(shape)))
    if not 2 <= len(shape) <= 3 or len(spacing) != len(shape) or len(origin) != len(shape):
        raise InputError(f"a NIfTI grid needs 2 or 3 axes with one spacing and origin each; got shape {shape}, "
                         f"spacing {spacing}, origin {origin}")
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"voxel sizes must be positive numbers, got {spacing}")
    affine = np.eye(4)
    # Array order (Z, Y, X) -> file order (X, Y, Z).
    affine[range(len(shape)), range(len(shape))] = spacing[::-1]
    affine[: len(shape), 3] = origin[::-1]
    header = nib.Nifti1Header()
    header.set_data_shape(shape[::-1])
    header.set_qform(affine, code="aligned")
    header.set_sform(affine, code="aligned")
    header.set_xyzt_units(xyz=units)
    return NiftiInfo(affine=affine, spacing=spacing, units=units, header=header, shape=shape, name=name)


def _data_type(array: np.ndarray) -> np.dtype:
    """The smallest unsigned type that holds label values, or float32 for maps of real numbers."""
    if np.issubdtype(array.dtype, np.floating):
        return np.dtype(np.float32)
    if array.size and array.min() < 0:
        raise InputError(f"labels must be >= 0 to be written as NIfTI, found {array.min()}")
    top = int(array.max()) if array.size else 0
    for candidate in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(candidate).max:
            return np.dtype(candidate)
    raise InputError(f"label value {top} does not fit the NIfTI label types (at most {np.iinfo(np.uint32).max})")


def nifti_writer(array, like: NiftiInfo, compressed: bool, as_labels: bool = True) -> Callable[[str | Path], None]:
    """Check ``array`` against ``like`` now; return ``write(filename)`` that writes it as a NIfTI file.

    ``array`` has ``like.shape``, or one leading axis more (iterations,
    classes), which becomes the file's fourth axis. The header is a copy of
    ``like``'s (affine, qform and sform codes, units, orientation fields kept)
    with the data type set to what the values need (uint8, uint16 or uint32
    for labels, float32 for real numbers), no scaling (``scl_slope`` 1,
    ``scl_inter`` 0), no display window, and the intent "label" for labels
    (the napari reader opens such a file as a Labels layer). With
    ``as_labels=False`` (grey values) integer voxels keep their type and the
    intent is none. The split lets a caller
    (:class:`napari_coarseseg.io.StagedWrites`) check every output before it
    creates any file.
    """
    nib = _nibabel()
    array = np.asarray(array)
    extra = array.ndim - len(like.shape)
    if array.shape[extra:] != like.shape or extra not in (0, 1):
        raise InputError(f"an array of shape {array.shape} cannot be written on the grid of {like.name}, shape "
                         f"(Z, Y, X) = {like.shape}")
    dtype = _data_type(array) if as_labels or array.dtype.kind not in "iu" else array.dtype
    # Back to the file's axis order; a leading (iterations or classes) axis becomes the fourth.
    data = array.T if not extra else np.transpose(array, (*range(array.ndim - 1, 0, -1), 0))
    if extra and len(like.shape) == 2:
        data = data[:, :, None, :]  # NIfTI's fourth axis needs a third
    header = like.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0, 0
    header.set_intent("label" if as_labels and dtype.kind == "u" else "none")
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    # The header's own best affine: nibabel then leaves its qform and sform (and their codes) untouched.
    image = image_class(data.astype(dtype, copy=False), header.get_best_affine(), header)

    def write(filename) -> None:
        with open(filename, "wb") as raw:
            if not compressed:
                image.to_file_map(image.make_file_map({"image": raw}))
                return
            # No file name and time in the gzip header: the same labels give the same bytes.
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as packed:
                image.to_file_map(image.make_file_map({"image": packed}))

    return write


def write_nifti(path, labels, like: NiftiInfo, as_labels: bool = True) -> Path:
    """Write ``labels`` (array order, ``like.shape``) as a NIfTI on the grid of ``like``, atomically.

    Parameters
    ----------
    path : str or Path
        Ends in ``.nii`` or ``.nii.gz`` (gzip-compressed).
    labels : ndarray
        A (Z, Y, X) label map (or a float map), or with one leading axis more
        (see :func:`nifti_writer`).
    like : NiftiInfo
        The image's grid, from :func:`read_nifti` or :func:`grid_info`.
    as_labels : bool
        ``False`` writes grey values (an image) instead of labels.

    Returns
    -------
    Path

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> folder = Path(tempfile.mkdtemp())
    >>> image, info = read_nifti(write_nifti(folder / "image.nii", np.zeros((2, 3, 4), np.float32),
    ...                                      like=grid_info((2, 3, 4))))
    >>> path = write_nifti(folder / "prediction.nii.gz", np.ones((2, 3, 4), np.int64), like=info)
    >>> import nibabel
    >>> nibabel.load(path).shape, nibabel.load(path).get_data_dtype()
    ((4, 3, 2), dtype('uint8'))
    """
    path = Path(path)
    if not is_nifti(path):
        raise InputError(f"{str(path)!r} should end in .nii or .nii.gz")
    write = nifti_writer(labels, like, compressed=path.name.lower().endswith(".gz"), as_labels=as_labels)
    return atomic_write(path, write)
