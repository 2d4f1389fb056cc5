"""Reading and writing images for batch mode: TIFF and NIfTI files, and folders of them.

A folder argument stands for all ``.tif``/``.tiff``/``.nii``/``.nii.gz`` files
in it; the files of an image folder and of its annotation folders are matched
by file name. TIFFs are read and written here; NIfTI volumes by
:mod:`napari_coarseseg.nifti`, which builds on this module (a NIfTI output is
staged with the writer it makes, see :meth:`StagedWrites.add`). Writes go
through :func:`napari_coarseseg.model_io.atomic_write` so that an interrupted
run never leaves a half-written file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .model_io import atomic_write, publish

TIFF_SUFFIXES = (".tif", ".tiff")
#: Read by :func:`napari_coarseseg.nifti.read_nifti`. ``.nii.gz`` is a double suffix: Path.suffix says ".gz".
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class InputError(ValueError):
    """A file or folder given on the command line cannot be used."""


def is_nifti(path) -> bool:
    """Whether ``path`` is named like a NIfTI file (``.nii`` or ``.nii.gz``, any case)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def folder_images(folder) -> list[Path]:
    """TIFF and NIfTI files of ``folder``, sorted by name."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and (p.suffix.lower() in TIFF_SUFFIXES or is_nifti(p)))
    if not files:
        raise InputError(f"folder {str(folder)!r} holds no .tif, .tiff, .nii or .nii.gz file")
    return files


def read_tiff(path) -> np.ndarray:
    """Read one TIFF file into an array, with a clear error if it cannot be read."""
    import tifffile

    path = Path(path)
    if not path.exists():
        raise InputError(f"file {str(path)!r} does not exist")
    try:
        return np.asarray(tifffile.imread(path))
    except Exception as error:  # tifffile raises many types for bad files
        raise InputError(f"cannot read {str(path)!r} as a TIFF image ({type(error).__name__}: {error})") from None


def resolve_inputs(path) -> list[Path]:
    """The image files a path stands for: itself, or the TIFF and NIfTI files of a folder."""
    path = Path(path)
    if path.is_dir():
        return folder_images(path)
    if not path.exists():
        raise InputError(f"{str(path)!r} does not exist")
    return [path]


def match_by_name(image_files: list[Path], annotation_path, role: str) -> list[Path | None]:
    """For each image, the annotation file of the same name (``None`` if absent).

    A single annotation file goes with a single image. In a folder, every
    file must match an image: a stray name is most likely a typo.
    """
    annotation_path = Path(annotation_path)
    if annotation_path.is_file() or not annotation_path.exists():
        if not annotation_path.exists():
            raise InputError(f"{role} annotation {str(annotation_path)!r} does not exist")
        if len(image_files) != 1:
            raise InputError(
                f"{role} annotation {str(annotation_path)!r} is one file but the images are a folder of "
                f"{len(image_files)}; pass a folder of {role} files named like the images"
            )
        return [annotation_path]
    by_name = {p.name: p for p in folder_images(annotation_path)}
    image_names = {p.name for p in image_files}
    stray = sorted(set(by_name) - image_names)
    if stray:
        raise InputError(
            f"{role} folder {str(annotation_path)!r} has files with no image of the same name: "
            f"{', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''}"
        )
    return [by_name.get(p.name) for p in image_files]


def _imwrite(path, array: np.ndarray) -> None:
    import tifffile

    # minisblack: a stack of 3 or 4 label planes is not an RGB picture.
    tifffile.imwrite(path, np.asarray(array), compression="zlib", photometric="minisblack")


def write_tiff(path, array: np.ndarray) -> Path:
    """Write ``array`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: _imwrite(tmp, array))


class StagedWrites:
    """Write several files so that either all of them appear or none does.

    Each :meth:`add` writes to a temporary file next to its target; leaving
    the ``with`` block without an error renames them all onto their targets,
    an error deletes them.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> folder = Path(tempfile.mkdtemp())
    >>> with StagedWrites() as staged:
    ...     staged.add(folder / "a.tif", np.zeros((4, 4), np.uint8))
    ...     staged.add(folder / "b.tif", np.ones((4, 4), np.uint8))
    >>> sorted(p.name for p in folder.iterdir())
    ['a.tif', 'b.tif']
    """

    def __init__(self):
        self.staged: list[tuple[str, Path]] = []

    def add(self, path, array=None, write=None) -> None:
        """Stage ``array`` as a TIFF at ``path``, or call ``write(temporary_name)`` to write another format.

        ``write`` is e.g. :func:`napari_coarseseg.nifti.nifti_writer`'s result,
        for a NIfTI output.
        """
        import tempfile

        path = Path(path)
        if not path.parent.is_dir():
            raise InputError(f"output folder {str(path.parent)!r} does not exist; create it first")
        if path.is_dir():
            raise InputError(f"output {str(path)!r} is a folder; give a file name")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        self.staged.append((tmp, path))
        if write is None:
            _imwrite(tmp, array)
        else:
            write(tmp)

    @property
    def paths(self) -> list[Path]:
        return [path for _, path in self.staged]

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        if error_type is None:
            for tmp, path in self.staged:
                publish(tmp, path)
        else:
            for tmp, _ in self.staged:
                Path(tmp).unlink(missing_ok=True)
        return False


def write_all(outputs: dict) -> list[Path]:
    """Write ``{path: array}`` so that either all files appear or none does."""
    with StagedWrites() as staged:
        for path, array in outputs.items():
            staged.add(path, array)
    return staged.paths
