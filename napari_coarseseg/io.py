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
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from .model_io import atomic_write, out_of_room, publish, temporary_beside

TIFF_SUFFIXES = (".tif", ".tiff")
#: Read by :func:`napari_coarseseg.nifti.read_nifti`. ``.nii.gz`` is a double suffix: Path.suffix says ".gz".
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class InputError(ValueError):
    """A file or folder given on the command line cannot be used."""


#: What a label-map output may be named: the formats :class:`StagedWrites` writes (TIFF, NIfTI on a NIfTI's grid).
LABEL_SUFFIXES = (*TIFF_SUFFIXES, *NIFTI_SUFFIXES)


def same_file(a, b) -> bool:
    """Whether two paths name one file: the same path once symlinks, ``.`` and ``..`` are resolved, or (both
    existing) the same file on disk under two names (a hard link).

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> (folder / "a.tif").write_bytes(b"")
    0
    >>> same_file(folder / "a.tif", folder / "sub" / ".." / "a.tif"), same_file(folder / "a.tif", folder / "b.tif")
    (True, False)
    """
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): then only the names can agree
        return False


def _identities(path: Path) -> list:
    """What names ``path``'s file: its resolved path, and (when it exists) its device and inode (a hard link)."""
    identities = [path.resolve()]
    try:
        status = path.stat()
        identities.append((status.st_dev, status.st_ino))
    except OSError:  # not there (yet): only the names can agree
        pass
    return identities


def check_paths(inputs, outputs) -> None:
    """Refuse, before anything is read or written, an output that would overwrite an input or another output.

    ``inputs`` and ``outputs`` are ``(what, path)`` pairs, ``what`` naming the
    argument in the message (``"--out"``, ``"IMAGE"``). Outputs are the files a
    command will write (a folder output stands for the files it will hold), so
    an output folder holding an input of the same name is caught too. Paths are
    compared as :func:`same_file` does, through one lookup each (a folder of
    thousands of images is checked in milliseconds).
    """
    seen = {}  # identity -> (what, path, is an input)
    for what, path in inputs:
        for identity in _identities(Path(path)):
            seen.setdefault(identity, (what, Path(path), True))
    for what, path in outputs:
        path = Path(path)
        identities = _identities(path)
        for identity in identities:
            if identity not in seen:
                continue
            other_what, other, is_input = seen[identity]
            if is_input:
                named = "" if other == path else f" ({str(other)!r})"
                raise InputError(f"{what} {str(path)!r} is the input {other_what}{named}: writing it would destroy "
                                 f"that input; give {what} another name")
            raise InputError(f"{other_what} and {what} name the same file {str(path)!r}: one would overwrite the "
                             "other; give each its own name")
        for identity in identities:
            seen[identity] = (what, path, False)


def check_suffix(path, suffixes, what: str, writes: str) -> Path:
    """``path`` when its name ends in one of ``suffixes`` (any case); else one line saying what ``what`` writes."""
    path = Path(path)
    if not path.name.lower().endswith(tuple(suffixes)):
        raise InputError(f"{what} {str(path)!r}: {writes} is written as {', '.join(suffixes)}; name it so "
                         f"(e.g. {path.name.split('.')[0] or 'out'}{suffixes[0]})")
    return path


def readable(path) -> bool:
    """Whether this process may read ``path`` (a folder: list and enter it); True for a path that does not exist,
    which the input checks refuse in their own words."""
    try:
        if not os.path.lexists(path):
            return True
    except OSError:
        return False
    return os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0))


def cannot_read(path, what: str) -> InputError:
    """The one-line error for ``path`` (``what``: "file", "folder", "the input") that this process may not read,
    whether found by :func:`readable` or met as a ``PermissionError``."""
    folder = os.path.isdir(path)
    return InputError(f"cannot read {what} {path}: permission denied; give your user read access "
                      f"(chmod {'-R u+rX' if folder else 'u+r'} {path}) or copy it somewhere you can")


def check_readable(path, what: str) -> Path:
    """``path`` when this process may read it (:func:`readable`); :func:`cannot_read`'s line otherwise."""
    if not readable(path):
        raise cannot_read(path, what)
    return Path(path)


def check_output_folder(path, what: str, create: bool = False) -> Path:
    """The folder an output ``path`` goes into, checked before any work: it exists and this process may write
    there. With ``create`` the folder may be missing (it is made when the outputs are written); its nearest
    existing parent must then be writable, and ``path`` itself must not be a file."""
    path = Path(path)
    folder = path if create else path.parent
    if create and folder.exists() and not folder.is_dir():
        raise InputError(f"{what} {str(folder)!r} is a file, not a folder; give a folder name (it is created if "
                         "missing)")
    existing = folder
    while not existing.exists():
        if not create:
            raise InputError(f"output folder {str(folder)!r} of {what} does not exist; create it first")
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write into {str(existing)!r} ({what}): permission denied; choose a folder you can "
                         "write to")
    return folder


def is_nifti(path) -> bool:
    """Whether ``path`` is named like a NIfTI file (``.nii`` or ``.nii.gz``, any case)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def folder_images(folder) -> list[Path]:
    """TIFF and NIfTI files of ``folder``, sorted by name."""
    folder = check_readable(folder, "folder")
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
    check_readable(path, "file")
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
        path = Path(path)
        try:
            tmp = temporary_beside(path)
        except OSError as error:
            raise InputError(str(error)) from None
        self.staged.append((tmp, path))  # removed on leaving the block with an error
        try:
            if write is None:
                _imwrite(tmp, array)
            else:
                write(tmp)
        except OSError as error:
            full = out_of_room(error, path)
            if full is not None:
                raise full from None
            raise

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


@contextmanager
def made_folder(folder: Path):
    """Make ``folder`` (and missing parents) for the outputs written in the block; remove what was made here if
    the block fails, so that a failed command leaves no empty folder behind.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp()) / "a" / "b"
    >>> try:
    ...     with made_folder(folder):
    ...         raise OSError("disk full")
    ... except OSError:
    ...     pass
    >>> folder.parent.exists()
    False
    """
    missing = []
    parent = folder
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for made in missing:  # innermost first; rmdir leaves a folder someone else filled meanwhile
            with suppress(OSError):
                made.rmdir()
        raise
