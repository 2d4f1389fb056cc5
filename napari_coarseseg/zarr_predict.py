"""Predict zarr volumes chunk by chunk, in this process or on a dask cluster, into a zarr store.

``coarseseg predict MODEL IN.zarr --out OUT.zarr [--scheduler ADDRESS | --workers N] [--resume]
[--probabilities] [--chunks Z,Y,X]`` and :func:`predict_zarr`:

- **Input**: a zarr array, or an OME-Zarr image (its level 0, its scale and
  axes; a channel axis is the image's channels, a time axis of one point is
  dropped). Zarr format 2 or 3.
- **Output**: ``OUT.zarr`` is an OME-Zarr labels image, of the input's
  zarr format (OME-Zarr 0.4 on format 2, 0.5 on format 3), with the input's
  spatial axes, scale and translation (1 for a plain array): labels in
  ``OUT.zarr/0``, with ``--probabilities`` the class probabilities in
  ``OUT.zarr/probabilities/0`` (classes first, float32), one done flag per
  chunk in ``OUT.zarr/done``, and in the attributes under ``coarseseg``
  what made it (model digest, options, normalisation, runs).
- **Chunks**: the output's chunks are the blocks of
  :mod:`napari_coarseseg.blockwise`, one task each; a task reads its block and
  the halo its tiles need straight from the input store, writes its labels
  (then its done flag) and returns. Not ``dask.array.map_overlap``: the halo
  a block needs is the tiles of the whole plane's grid that touch it, which
  differs from block to block, and reading it from the store moves no
  pixels between workers. The labels equal those of
  :func:`napari_coarseseg.predict` on the input read lazily, bit for bit (see
  :mod:`~napari_coarseseg.blockwise`); the whole image's normalisation is
  gathered first, by the same workers, block by block.
- **Workers** load the model once per process (a cache keyed by the model
  file's path and SHA-256), use ``cores / threads on the host`` torch threads,
  and need the input, the output and the model file on a filesystem they
  all see. A worker that dies costs the chunks it held: dask runs them again
  elsewhere. ``--resume`` skips the chunks whose done flag is set, after
  checking that the store was written for the same model, input and options.
- **Errors** in what the user gave (not a zarr, no array, wrong channels,
  no scheduler address, an unreachable scheduler, ``--out`` already there,
  or not named ``.zarr``, or the input, in it or holding it, ``--resume``
  with no store, an input that cannot be read, an output folder that
  cannot be written to) are refused before anything is written, in one
  line. A run that fails midway keeps its finished chunks; one that
  finished none removes the store it made.

``zarr`` is needed for zarr inputs, ``distributed`` for ``--scheduler`` and
``--workers``: ``pip install "napari-coarseseg[cluster]"``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import ipaddress
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from ._version import __version__
from .annotations import AnnotationError, label_dtype
from .blockwise import (
    BlockPlan,
    Normalisation,
    Settings,
    SliceNormalisation,
    check_block,
    default_block,
    iter_normalisation,
    normalisation_from_record,
    normalisation_steps,
    normalised_per,
    predict_block,
    whole_planes,
)
from .inference import TILE_SIZE, check_image_for_model
from .io import InputError, cannot_read, readable
from .methods import get_method, load_model
from .methods._planes import plane_rule
from .model_io import Model, ModelFileError, resolve_model_path

__all__ = ["predict_zarr", "predict_zarr_command", "check_zarr_arguments", "parse_scheduler", "is_zarr",
           "zarr_requested", "open_input", "ZarrInput", "RunError", "predict_chunk"]

#: Seconds to wait for a dask scheduler to answer, and for a first worker to join it.
CONNECT_TIMEOUT = 10.0
WORKER_TIMEOUT = 30.0
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")


class RunError(ValueError):
    """A chunk failed on a worker (its error, or the worker died too often); finished chunks are kept."""


def is_zarr(path) -> bool:
    """Whether ``path`` names a zarr store: a ``.zarr`` name, or a folder holding zarr metadata."""
    path = Path(path)
    if path.name.lower().endswith(".zarr"):
        return True
    try:
        return path.is_dir() and any((path / marker).is_file() for marker in _ZARR_MARKERS)
    except PermissionError:  # a folder this user cannot look into: unknown (zarr_requested reports it)
        return False


def zarr_requested(args) -> bool:
    """Whether ``coarseseg predict``'s arguments ask for this module: a zarr input or output, or a cluster.

    An input folder this user cannot read counts too: whatever it holds, :func:`predict_zarr_command` then says
    what to fix in one line.
    """
    return bool(is_zarr(args.image) or is_zarr(args.out) or args.scheduler or args.workers is not None
                or args.resume or args.chunks or (os.path.isdir(args.image) and not readable(args.image)))


def _store_root(path: Path) -> Path:
    """The outermost folder of the zarr hierarchy holding ``path`` (``IN.zarr`` for ``IN.zarr/raw``), resolved."""
    root = path.resolve()
    for parent in root.parents:
        try:
            if not any((parent / marker).is_file() for marker in _ZARR_MARKERS):
                break
        except OSError:
            break
        root = parent
    return root


def _within(inner: Path, outer: Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it: resolved paths compared, and where a folder on the way
    exists, ``os.path.samefile`` (a bind mount or another spelling of the same folder)."""
    inner, outer = inner.resolve(), outer.resolve()
    if inner == outer or outer in inner.parents:
        return True
    for candidate in (inner, *inner.parents):
        try:
            if candidate.exists() and outer.exists() and os.path.samefile(candidate, outer):
                return True
        except OSError:
            continue
    return False


def _check_paths(model, image, out: str, resume: bool) -> None:
    """Refuse, before the model or the input is opened and before anything is written: an unreadable input, an
    ``out`` that is the input, lies in it or holds it, or is the model file, an ``out`` not named ``.zarr``, an
    ``out`` there without ``resume`` or missing with it, an output folder this user cannot write to."""
    name = str(image)
    if not readable(image) or not readable(_store_root(Path(image))):
        raise cannot_read(name, "the input")
    target = Path(out)
    if _within(target, _store_root(Path(image))):
        raise InputError(f"--out {out} is the input {name} (or inside it): it would be overwritten; give another "
                         "--out")
    if _within(Path(image), target):
        raise InputError(f"--out {out} holds the input {name}: it would be overwritten; give another --out")
    if not isinstance(model, Model):
        try:
            model_file = resolve_model_path(model)
        except (ModelFileError, OSError):  # loading the model says what is wrong with it
            model_file = None
        if model_file is not None and _within(model_file, target):
            raise InputError(f"--out {out} is the model file {model} (or holds it): it would be overwritten; give "
                             "another --out")
    if not target.name.lower().endswith(".zarr"):
        raise InputError(f"--out {out}: a zarr input is predicted into a zarr store: name --out OUT.zarr")
    exists = os.path.lexists(target)
    if exists and not resume:
        raise InputError(f"{out} exists; give another --out, or --resume to finish it")
    if resume and not exists:
        raise InputError(f"--resume: there is no {out} to finish; run without --resume to start it")
    if resume:
        if not os.access(target, os.W_OK | os.X_OK):
            raise InputError(f"cannot write into {out}: permission denied; give your user write access (chmod -R u+rwX "
                             f"{out}) or predict into another --out")
        return
    folder = target.resolve().parent
    if not folder.is_dir():
        raise InputError(f"output folder {str(target.parent)!r} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {out}: its folder {str(target.parent)!r} is not writable by your user; give "
                         "an --out in a folder you can write to")


def _import_zarr():
    try:
        import zarr
    except ImportError:
        raise InputError('zarr inputs need the zarr package: pip install "napari-coarseseg[cluster]"') from None
    return zarr


# --------------------------------------------------------------------------- input


class _OpenedInEachProcess:
    """A store's description that opens the store at most once per process: the opened handle (``_opened``)
    is left out of the pickle, so dask ships the description and each worker opens the store itself."""

    def __post_init__(self):
        self._opened = None

    def __getstate__(self):
        return {key: value for key, value in self.__dict__.items() if key != "_opened"}

    def __setstate__(self, state):
        self.__dict__.update(state, _opened=None)


class _Shape:
    """Shape and dtype of an image without its pixels, for the package's image checks (which read none of a
    lazy array's)."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)

    def __getitem__(self, key):
        raise TypeError("shape only")


@dataclass
class ZarrInput(_OpenedInEachProcess):
    """An input array in the (Z, Y, X, C) order blocks read, and what the output copies from it.

    ``roles`` name each stored axis: ``"t"`` (one time point, dropped),
    ``"c"`` (channels), ``"z"``, ``"y"``, ``"x"``. Picklable: workers open the
    store themselves.
    """

    path: str
    array: str
    roles: tuple[str, ...]
    stored_shape: tuple[int, ...]
    dtype: str
    zarr_format: int
    ome: dict | None = None  # {"version", "axes" (spatial), "scale", "translation"} of an OME-Zarr image

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X); Z = 1 for a 2-D image."""
        spatial = [size for role, size in zip(self.roles, self.stored_shape, strict=True) if role in "zyx"]
        return tuple([1] * (3 - len(spatial)) + spatial)

    @property
    def planar(self) -> bool:
        return "z" not in self.roles

    @property
    def channels(self) -> int:
        return self.stored_shape[self.roles.index("c")] if "c" in self.roles else 1

    def read(self, z0: int, z1: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The region as float32 (z, y, x, C), converted from the stored dtype as the lazy path converts it."""
        if self._opened is None:
            self._opened = _import_zarr().open_array(self.path, path=self.array or None, mode="r")
        ranges = {"z": slice(z0, z1), "y": slice(y0, y1), "x": slice(x0, x1), "c": slice(None), "t": 0}
        kept = [role for role in self.roles if role != "t"]
        values = np.asarray(self._opened[tuple(ranges[role] for role in self.roles)], dtype=np.float32)
        order = [kept.index(role) for role in "zyxc" if role in kept]
        values = values.transpose(order)
        if "c" not in kept:
            values = values[..., None]
        return values[None] if self.planar else values


def _ome_image(group) -> dict | None:
    """Level 0 of an OME-Zarr image group: its path, axes, scale and translation; None for another group."""
    attrs = group.attrs.asdict()
    ome = attrs.get("ome", {})
    multiscales = ome.get("multiscales") or attrs.get("multiscales")
    if not multiscales:
        return None
    image = multiscales[0]
    version = str(ome.get("version") or image.get("version") or "0.4")
    axes = image.get("axes")
    if not isinstance(axes, list) or not all(isinstance(axis, dict) for axis in axes):
        return {"version": version, "axes": None}  # OME-Zarr before 0.4: refused by _locate_array
    level = image["datasets"][0]
    scale, translation = np.ones(len(axes)), np.zeros(len(axes))
    # The level's transformations, then the whole image's (OME-Zarr applies both, in this order).
    for transforms in (level.get("coordinateTransformations", []), image.get("coordinateTransformations", [])):
        for transform in transforms:
            if transform.get("type") == "scale":
                scale, translation = scale * transform["scale"], translation * transform["scale"]
            elif transform.get("type") == "translation":
                translation = translation + transform["translation"]
    return {"path": level["path"], "version": version, "axes": axes, "scale": scale.tolist(),
            "translation": translation.tolist()}


def _locate_array(zarr, path: str, name: str):
    """(array, path of the store, path of the array in it, OME level-0 description or None)."""
    try:
        if not Path(path).exists():
            raise InputError(f"{name} does not exist")
        node = zarr.open(path, mode="r")
    except PermissionError:  # a folder or metadata file of the store this user may not read
        raise cannot_read(name, "the input") from None
    except InputError:
        raise
    except Exception as error:  # zarr raises several kinds for a folder that is no store
        raise InputError(f"{name} is not a zarr store ({type(error).__name__}: {error})") from None
    if isinstance(node, zarr.Array):
        return node, path, "", None
    try:
        image = _ome_image(node)
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise InputError(f"{name}: cannot read its OME-Zarr multiscales metadata ({type(error).__name__}: "
                         f"{error})") from None
    if image is not None and image["axes"] is None:
        raise InputError(f"{name} is OME-Zarr {image['version']}, without typed axes; OME-Zarr 0.4 or later is read")
    if image is None:
        arrays = sorted(node.array_keys())
        hint = f"; its arrays: {', '.join(arrays)} (give one as {name}/NAME)" if arrays else ", and no array"
        raise InputError(f"{name} is a zarr group without OME-Zarr multiscales metadata{hint}")
    try:
        array = node[image["path"]]
    except KeyError:
        raise InputError(f"{name}: the OME-Zarr level 0 array {image['path']!r} is missing") from None
    return array, path, image["path"], image


def _roles(array, image, model: Model, channel_axis: int | None, name: str) -> list[str]:
    """The role of each stored axis (see :class:`ZarrInput`), checked against the model's channels."""
    ndim = array.ndim
    if image is not None:  # OME-Zarr says which axis is which
        kinds = {"time": "t", "channel": "c", "space": "s"}
        roles = [kinds.get(axis.get("type"), "?") for axis in image["axes"]]
        if "?" in roles or len(roles) != ndim:
            raise InputError(f"{name}: cannot read its OME-Zarr axes {[a.get('name') for a in image['axes']]}")
        if "t" in roles and array.shape[roles.index("t")] != 1:
            raise InputError(f"{name} has {array.shape[roles.index('t')]} time points; predict one at a time "
                             "(an image of one time point)")
    else:
        roles = ["s"] * ndim
        if channel_axis is not None:
            if not -ndim <= channel_axis < ndim:
                raise InputError(f"--channel-axis {channel_axis} is not an axis of {name} (shape {array.shape})")
            roles[channel_axis % ndim] = "c"
        elif model.rgb and ndim in (3, 4):
            roles[-1] = "c"  # as predict reads a multichannel model's image: channels last
    spatial = [i for i, role in enumerate(roles) if role == "s"]
    if len(spatial) not in (2, 3):
        raise AnnotationError(f"{name} has shape {tuple(array.shape)} with {len(spatial)} spatial axes; expected "
                              "(Y, X) or (Z, Y, X), with a channel axis if the model takes several channels")
    for role, i in zip("zyx"[3 - len(spatial):], spatial, strict=True):
        roles[i] = role
    channels = array.shape[roles.index("c")] if "c" in roles else 1
    if channels != model.channels:
        raise AnnotationError(f"{name} has {channels} channel{'s' if channels > 1 else ''} but the model was trained "
                              f"on {model.channels}; give an image with {model.channels} channel(s) or use a model "
                              "trained on images like this one")
    return roles


def open_input(path, model: Model, channel_axis: int | None = None) -> ZarrInput:
    """Open and check a zarr array or OME-Zarr image for ``model``; nothing is read but metadata.

    Raises
    ------
    InputError
        Not a zarr store, no array in it, an unreadable OME-Zarr axis list,
        several time points.
    AnnotationError
        Wrong number of spatial axes or channels, or an image the package
        refuses for this model (:func:`~napari_coarseseg.inference.check_image_for_model`).
    """
    zarr = _import_zarr()
    name = str(path)
    try:
        array, store, inside, image = _locate_array(zarr, str(path), name)
    except PermissionError:  # the metadata of the image's array, read after the store's
        raise cannot_read(name, "the input") from None
    roles = _roles(array, image, model, channel_axis, name)
    # An absolute path: workers started elsewhere have another working folder.
    source = ZarrInput(str(Path(store).resolve()), inside, tuple(roles), tuple(int(s) for s in array.shape),
                       str(array.dtype), int(array.metadata.zarr_format))
    if image is not None:
        spatial = [i for i, role in enumerate(roles) if role in "zyx"]
        source.ome = {"version": image["version"], "axes": [image["axes"][i] for i in spatial],
                      "scale": [image["scale"][i] for i in spatial],
                      "translation": [image["translation"][i] for i in spatial]}
    logical = (source.shape[1:] if source.planar else source.shape) + ((source.channels,) if model.rgb else ())
    check_image_for_model(_Shape(logical, array.dtype), model, name)
    return source


# --------------------------------------------------------------------------- output


def _multiscales(version: str, axes: list, scale: list, translation: list, name: str) -> dict:
    """One multiscales entry of one level, ``"0"``, for OME-Zarr ``version``."""
    transforms = [{"type": "scale", "scale": [float(s) for s in scale]}]
    if any(translation):
        transforms.append({"type": "translation", "translation": [float(t) for t in translation]})
    entry = {"name": name, "axes": axes, "datasets": [{"path": "0", "coordinateTransformations": transforms}]}
    return entry if version == "0.5" else {"version": "0.4", **entry}


def _ome_attributes(version: str, multiscales: dict, label: bool) -> dict:
    """The OME attributes of an image group (0.4: at the top level; 0.5: under ``"ome"``)."""
    ome = {"multiscales": [multiscales]}
    if label:
        ome["image-label"] = {} if version == "0.5" else {"version": "0.4"}
    return {"ome": {"version": "0.5", **ome}} if version == "0.5" else ome


@dataclass
class ZarrOutput(_OpenedInEachProcess):
    """The output store as tasks write it: labels and probabilities per block, then the block's done flag."""

    path: str
    planar: bool
    probabilities: bool

    def _open(self) -> dict:
        # A run that fails before any chunk is finished removes the store it created; a task of that run still
        # going on a worker of a scheduler (cancelling does not stop it) must not write parts of it back.
        if not any(os.path.isfile(os.path.join(self.path, marker)) for marker in _ZARR_MARKERS):
            raise RunError(f"the output store {self.path} is gone")
        if self._opened is None:
            group = _import_zarr().open_group(self.path, mode="r+")
            self._opened = {"labels": group["0"], "done": group["done"],
                            "probabilities": group["probabilities/0"] if self.probabilities else None}
        return self._opened

    def write(self, bounds, labels: np.ndarray) -> None:
        """The labels (bz, by, bx) of the block at ``bounds``: whole chunks, no read."""
        (z0, z1), (y0, y1), (x0, x1) = bounds
        if self.planar:
            self._open()["labels"][y0:y1, x0:x1] = labels[0]
        else:
            self._open()["labels"][z0:z1, y0:y1, x0:x1] = labels

    def write_probabilities(self, z: int, bounds, probabilities: np.ndarray) -> None:
        """One slice of a block's (K + 1, by, bx) probabilities (their chunks are one slice deep)."""
        _, (y0, y1), (x0, x1) = bounds
        where = np.s_[:, y0:y1, x0:x1] if self.planar else np.s_[:, z, y0:y1, x0:x1]
        self._open()["probabilities"][where] = probabilities

    def mark_done(self, index) -> None:
        self._open()["done"][tuple(index)] = 1

    def done(self) -> np.ndarray:
        return np.asarray(self._open()["done"][...]).astype(bool)


def create_output(out: str, source: ZarrInput, plan: BlockPlan, n_labels: int, dtype, record: dict,
                  probabilities: bool) -> ZarrOutput:
    """Create the output store (it must not exist): the arrays, empty, and all metadata."""
    zarr = _import_zarr()
    spatial = source.shape[1:] if source.planar else source.shape
    chunks = plan.block[1:] if source.planar else plan.block
    ome = source.ome or {"version": "0.5" if source.zarr_format == 3 else "0.4", "axes": [
        {"name": axis, "type": "space"} for axis in "zyx"[3 - len(spatial):]], "scale": [1.0] * len(spatial),
        "translation": [0.0] * len(spatial)}
    version = "0.5" if source.zarr_format == 3 else "0.4"
    group = zarr.open_group(out, mode="w-", zarr_format=source.zarr_format)
    group.create_array("0", shape=spatial, chunks=chunks, dtype=dtype, fill_value=0)
    group.create_array("done", shape=plan.grid, chunks=(1, 1, 1), dtype="uint8", fill_value=0)
    if probabilities:
        maps = group.create_group("probabilities")
        maps.create_array("0", shape=(n_labels, *spatial), chunks=(n_labels, *((1,) if not source.planar else ()),
                                                                   *plan.block[1:]), dtype="float32", fill_value=0)
        axes = [{"name": "c", "type": "channel"}, *ome["axes"]]
        maps.attrs.update(_ome_attributes(version, _multiscales(version, axes, [1.0, *ome["scale"]],
                                                                [0.0, *ome["translation"]], "probabilities"), False))
    group.attrs.update({**_ome_attributes(version, _multiscales(version, ome["axes"], ome["scale"],
                                                                ome["translation"], "labels"), True),
                        "coarseseg": record})
    return ZarrOutput(out, source.planar, probabilities)


def _fingerprint(record: dict) -> dict:
    """What must match for ``--resume`` to continue a store."""
    return {key: record.get(key) for key in ("model_sha256", "input_shape", "input_dtype", "block", "settings",
                                             "options", "probabilities")}


def _resume_record(out: str, record: dict) -> dict:
    """The stored record of ``out`` after checking it was written for the same job."""
    zarr = _import_zarr()
    try:
        stored = zarr.open_group(out, mode="r").attrs.asdict().get("coarseseg")
    except Exception:  # any unreadable store is refused the same way
        stored = None
    if not isinstance(stored, dict):
        raise InputError(f"--resume: {out} is not a prediction store written by coarseseg; give another --out")
    before, now = _fingerprint(stored), _fingerprint(json.loads(json.dumps(record)))
    differ = [key for key in now if before[key] != now[key]]
    if differ:
        raise InputError(f"--resume: {out} was written with another {', '.join(differ)}; run with the same model, "
                         "input and options, or give another --out")
    return stored


# --------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class ModelRef:
    """A model file as workers load it: path and SHA-256 (the cache key; a changed file is loaded again), and the
    name of a shipped model (found in the worker's own installation when the path is not there)."""

    path: str
    sha256: str
    shipped: str | None = None


@dataclass(frozen=True)
class Job:
    """Everything a chunk task needs; pickled to the workers once per map."""

    model: Model | ModelRef
    options: dict
    source: ZarrInput
    output: ZarrOutput
    plan: BlockPlan
    normalisation: Normalisation | SliceNormalisation | None
    settings: Settings
    threads: dict | int | None = None  # torch threads: per host's total worker threads (dict), fixed, or untouched


_cache: dict = {}
_cache_lock = threading.Lock()
_model_loads = 0


def _job_model(job: Job):
    """The job's model and plane rule, loaded once per process (``(model, rule, loads so far)``)."""
    global _model_loads
    if isinstance(job.model, Model):
        return job.model, plane_rule(job.model, **job.options), 0
    key = (job.model.path, job.model.sha256, job.settings.device)
    with _cache_lock:
        if key not in _cache:
            _cache.clear()  # one model at a time: a worker's memory holds one
            here = job.model.path if Path(job.model.path).is_file() or not job.model.shipped else job.model.shipped
            _cache[key] = load_model(here)
            _model_loads += 1
        return _cache[key], plane_rule(_cache[key], **job.options), _model_loads


def _worker_identity(threads) -> tuple[str, int | None]:
    """This task's worker address ("local" outside dask) and the torch threads it should use."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return "local", threads if isinstance(threads, int) else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if isinstance(threads, dict):  # workers sharing a host share its cores
        host = worker.address.rsplit(":", 1)[0]
        threads = max(1, cores // threads.get(host, worker.state.nthreads))
    return worker.address, threads


def predict_chunk(job: Job, index) -> dict:
    """The task: predict block ``index``, write its labels (and probabilities), then its done flag.

    Returns a report: the block, the worker, the process, the model loads
    of that process so far and the seconds it took.
    """
    start = time.perf_counter()
    address, threads = _worker_identity(job.threads)
    if threads:
        import torch

        torch.set_num_threads(threads)
    model, rule, loads = _job_model(job)
    bounds = job.plan.bounds(index)
    (z0, z1), (y0, y1), (x0, x1) = bounds
    labels = np.zeros((z1 - z0, y1 - y0, x1 - x0), dtype=label_dtype(model.n_classes))
    for z, plane, probabilities in predict_block(model, rule, job.source, job.normalisation, job.plan, index,
                                                 job.settings):
        labels[z - z0] = plane
        if probabilities is not None:
            job.output.write_probabilities(z, bounds, probabilities)
    job.output.write(bounds, labels)
    job.output.mark_done(index)  # last: a flag means the block's data are complete
    return {"index": list(index), "worker": address, "pid": os.getpid(), "model_loads": loads,
            "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------- cluster

#: A host name (labels of letters, digits, ``-``, ``_``, dot-separated); IP addresses are checked by ipaddress.
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise InputError('--scheduler and --workers need dask.distributed: pip install '
                         '"napari-coarseseg[cluster]"') from None
    return distributed


def parse_scheduler(text: str) -> str:
    """A dask scheduler's address, checked before anything is opened: ``SCHEME://HOST:PORT`` with a scheme
    dask.distributed has a transport for (``tcp``, ``tls``, ``ws``, ``wss``, ``ucx`` where distributed-ucxx is
    installed, an ``inproc`` address of this process), or ``HOST:PORT`` (tcp); a port in 1..65535.

    Returns
    -------
    str
        The address with its scheme.

    Raises
    ------
    InputError
        In one line, for anything else.

    Examples
    --------
    >>> parse_scheduler("tcp://10.0.0.5:8786"), parse_scheduler("localhost:8786"), parse_scheduler("tls://[::1]:1")
    ('tcp://10.0.0.5:8786', 'tcp://localhost:8786', 'tls://[::1]:1')
    >>> parse_scheduler("not a url")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    napari_coarseseg.io.InputError: --scheduler 'not a url' is not a dask scheduler address; give tcp://HOST:PORT ...
    """
    _import_distributed()
    from distributed.comm.addressing import parse_address, parse_host_port, unparse_address
    from distributed.comm.registry import get_backend

    dashboard = "; an http:// address is its dashboard's" if text.lower().startswith(("http:", "https:")) else ""
    refused = InputError(f"--scheduler {text!r} is not a dask scheduler address; give tcp://HOST:PORT (what `dask "
                         f"scheduler` prints){dashboard}")
    try:
        scheme, location = parse_address(text)  # HOST:PORT gets dask's default scheme, tcp
        backend = get_backend(scheme)  # a ValueError for a scheme no installed transport handles
        if scheme == "inproc":  # IP/PID/N of a scheduler in this very process
            backend.get_address_host(location)
            return text
        if not location.rpartition(":")[2].isdecimal():  # int() also takes " 80", "+80", "8_0"
            raise ValueError(location)
        host, port = parse_host_port(location)
    except (TypeError, ValueError):
        raise refused from None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not (len(host) <= 253 and _HOST_NAME.fullmatch(host)):
            raise refused from None
    if not 1 <= port <= 65535:
        raise refused
    if type(backend).__module__ == "distributed.comm.ucx":  # the placeholder left where the transport was removed
        raise InputError(f"--scheduler {text}: dask.distributed's ucx transport is now the distributed-ucxx package; "
                         "install it (pip install distributed-ucxx-cu12) or give a tcp:// address")
    return unparse_address(scheme, location)


def _discard(client) -> None:
    """Close a client whose start failed, now. ``Client.__init__`` closes it itself only after an OSError (a
    timeout included): after any other failure (a ValueError from an address, the TypeError of the removed ucx
    transport) its event loop thread runs on, unreferenced. The garbage collector then closes it at interpreter
    exit, where ``Client.__del__`` waits twice the connect timeout for that thread, frozen by then (a 20 s hang,
    then a ``TimeoutError`` traceback), or while the next client starts its loop, which deadlocks."""
    with contextlib.suppress(Exception):
        client.close(timeout=2)
    with contextlib.suppress(Exception):
        client._loop_runner.stop()
    client.status = "closed"  # nothing left for Client.__del__ to do


def open_cluster(scheduler: str | None, workers: int | None):
    """``(client, threads, close)``: a client of the scheduler at ``scheduler``, or of a new local cluster of
    ``workers`` processes with one thread each; ``threads`` for :class:`Job`; ``close()`` ends what was started."""
    _import_distributed()
    from distributed import Client, LocalCluster

    if scheduler is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR)
        client = Client(cluster, set_as_default=False)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

        def close():
            client.close()
            cluster.close()

        return client, max(1, cores // workers), close
    scheduler = parse_scheduler(scheduler)
    quiet = logging.getLogger("distributed")
    level, quiet.level = quiet.level, logging.CRITICAL  # its connection retries are not the user's business
    # Made before it starts, so that a client whose start fails is still at hand to close (see _discard).
    client = Client.__new__(Client)
    try:
        client.__init__(scheduler, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except BaseException as error:
        _discard(client)
        if not isinstance(error, Exception):  # Ctrl-C
            raise
        detail = " ".join(str(error).split())  # one line, whatever the transport's message
        raise InputError(f"cannot reach the dask scheduler at {scheduler} ({type(error).__name__}: {detail}); "
                         "check the address and that the scheduler runs") from None
    finally:
        quiet.level = level
    try:
        client.wait_for_workers(1, timeout=WORKER_TIMEOUT)
    except BaseException as error:
        _discard(client)  # also on Ctrl-C: a client left open hangs the interpreter's exit
        if not isinstance(error, (OSError, TimeoutError)):
            raise
        raise InputError(f"no dask worker joined the scheduler at {scheduler} within {WORKER_TIMEOUT:.0f} s; "
                         "start some (dask worker ADDRESS --nthreads 1)") from None
    per_host: dict[str, int] = {}
    for address, info in client.scheduler_info()["workers"].items():
        host = address.rsplit(":", 1)[0]
        per_host[host] = per_host.get(host, 0) + int(info.get("nthreads", 1))
    return client, per_host, client.close


def cluster_runner(client):
    """A runner (:func:`~napari_coarseseg.blockwise.run_here`'s contract) on a dask client: results as they
    come; the first failure cancels the rest and raises :class:`RunError` naming the item."""
    from distributed import as_completed

    def run(function, items):
        items = list(items)
        futures = client.map(function, items, pure=False)
        item_of = {future.key: item for future, item in zip(futures, items, strict=True)}
        try:
            for future in as_completed(futures, loop=client.loop):
                try:
                    yield future.result()
                except (AnnotationError, InputError):
                    raise
                except Exception as error:
                    raise _failed(item_of[future.key], error) from None
        finally:
            client.cancel([future for future in futures if not future.done()])

    return run


def _failed(item, error: BaseException) -> RunError:
    """A task's failure in one line (what is kept, :func:`predict_zarr` adds)."""
    return RunError(f"block {item} failed ({type(error).__name__}: {' '.join(str(error).split())})")


def _local_runner(function, items):
    """:func:`~napari_coarseseg.blockwise.run_here`, a failing item reported as :func:`cluster_runner` reports it."""
    for item in items:
        try:
            result = function(item)
        except (AnnotationError, InputError, MemoryError):
            raise
        except Exception as error:
            raise _failed(item, error) from error
        yield result


# --------------------------------------------------------------------------- the run


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for part in iter(lambda: file.read(1 << 20), b""):
            digest.update(part)
    return digest.hexdigest()


def _model_digest(model: Model) -> str:
    """A SHA-256 of a model in memory: its card and its tensors."""
    digest = hashlib.sha256(json.dumps(model.card, sort_keys=True).encode())
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _resolve_model(model, cluster: bool) -> tuple[Model, ModelRef | None, str]:
    """(the model, what workers load, its digest); a model in memory only runs in this process."""
    if isinstance(model, Model):
        if cluster:
            raise InputError("a model in memory cannot be sent to dask workers: save it (save_model) and give its "
                             "file")
        return model, None, _model_digest(model)
    path = resolve_model_path(model).resolve()
    digest = _file_sha256(path)
    shipped = str(model) if not Path(model).is_file() else None  # a name resolve_model_path found in models/
    return load_model(path), ModelRef(str(path), digest, shipped), digest


def _method_options(model: Model, options: dict, source: ZarrInput) -> dict:
    """The options, with an OME-Zarr image's scale as ``spacing`` for methods that measure distances."""
    takes = inspect.signature(get_method(model.method).predict).parameters
    if "spacing" in takes and options.get("spacing") is None and source.ome is not None:
        options = {**options, "spacing": tuple(source.ome["scale"])}
    try:
        plane_rule(model, **options)  # refuses options the method does not take, before any work
    except TypeError as error:
        raise InputError(f"an option the {model.method} method does not take: {error}") from None
    return options


def _bar(total: int, description: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="chunk", disable=quiet or None, leave=True, dynamic_ncols=True)


def _drive(generator, bar):
    """Run a progress generator to its return value, one bar step per yield."""
    with bar:
        while True:
            try:
                next(generator)
            except StopIteration as stop:
                return stop.value
            bar.update()


def _summary(out: str, plan: BlockPlan, reports: list, skipped: int, seconds: float) -> dict:
    workers: dict[str, dict] = {}
    for report in reports:
        entry = workers.setdefault(report["worker"], {"chunks": 0, "pids": [], "model_loads": 0})
        entry["chunks"] += 1
        entry["pids"] = sorted(set(entry["pids"]) | {report["pid"]})
        entry["model_loads"] = max(entry["model_loads"], report["model_loads"])
    return {"out": out, "shape": list(plan.shape), "block": list(plan.block), "chunks": len(plan),
            "predicted": len(reports), "skipped": skipped, "seconds": round(seconds, 3), "workers": workers}


def _run(job: Job, out: str, record: dict, stored: dict | None, runner, name: str, quiet: bool,
         created: list) -> dict:
    """The statistics (unless resumed), the output store (unless resumed; then ``out`` is added to ``created``),
    the missing chunks, the record."""
    start = time.perf_counter()
    plan, source, output = job.plan, job.source, job.output
    low, high = record["normalisation_percentiles"]
    if stored is not None:
        normalisation = normalisation_from_record(stored["normalisation"])
    elif record["normalised_per"] == "slice":
        normalisation = SliceNormalisation(low, high)  # no statistics: each slice on its own
    else:
        steps = normalisation_steps(plan.shape, source.channels, plan.block)
        normalisation = _drive(iter_normalisation(source, low, high, name, runner, plan.block),
                               _bar(steps, "statistics", quiet))
    if stored is None:
        record["normalisation"] = normalisation.to_record()
        if os.path.lexists(out):  # made by someone else meanwhile: neither this run's to fill nor to remove
            raise InputError(f"{out} exists; give another --out, or --resume to finish it")
        created.append(out)  # from here on, a failure removes what this run wrote unless chunks were finished
        create_output(out, source, plan, record["n_labels"], record["labels_dtype"], record,
                      job.settings.keep_probabilities)
    job = replace(job, normalisation=normalisation)
    done = output.done()
    todo = [index for index in plan.indices() if not done[index]]
    reports = []
    with _bar(len(todo), "predicting", quiet) as bar:
        for report in runner(partial(predict_chunk, job), todo):
            reports.append(report)
            bar.update()
    summary = _summary(out, plan, reports, len(plan) - len(todo), time.perf_counter() - start)
    group = _import_zarr().open_group(out, mode="r+")
    kept = group.attrs.asdict()["coarseseg"]
    group.attrs["coarseseg"] = {**kept, "runs": [*kept.get("runs", []), summary]}
    return summary


def predict_zarr(model, image, out, *, scheduler: str | None = None, workers: int | None = None,
                 resume: bool = False, probabilities: bool = False, channel_axis: int | None = None,
                 block: Sequence[int] | None = None, device: str = "auto", tile_size: int = TILE_SIZE,
                 overlap: int = 64, batch_size: int = 4, flips: bool = False, quiet: bool = True,
                 **options) -> dict:
    """Predict a zarr array or OME-Zarr image chunk by chunk into the zarr store ``out`` (module docstring).

    Parameters
    ----------
    model : str, Path or Model
        A model file or shipped model's name; a :class:`Model` in memory
        runs in this process only.
    image : str or Path
        The zarr array or OME-Zarr image (``IN.zarr``, ``IN.zarr/ARRAY``).
    out : str or Path
        The store to write; must not exist unless ``resume``.
    scheduler : str, optional
        A dask scheduler's address (``tcp://HOST:PORT``) whose workers run
        the chunks.
    workers : int, optional
        Start a local cluster of this many processes (one thread each)
        instead. Neither: the chunks run one after the other in this process.
    resume : bool
        Continue ``out``: skip the chunks whose done flag is set.
    probabilities : bool
        Also write the class probabilities (``out/probabilities/0``).
    channel_axis : int, optional
        A plain array's channel axis (an OME-Zarr image names its own).
    block : sequence of 3 int, optional
        (Z, Y, X) size of the chunks (blocks); default
        :func:`~napari_coarseseg.blockwise.default_block`.
    device, tile_size, overlap, batch_size, flips
        As for :func:`napari_coarseseg.predict`.
    quiet : bool
        No progress bars.
    **options
        The method's prediction options (``prior_strength``, ``spacing``,
        ...). An OME-Zarr image's scale is the default ``spacing``.

    Returns
    -------
    dict
        The run's summary (chunks predicted and skipped, per worker its
        chunks, processes and model loads, seconds); it is also appended to
        ``out``'s ``coarseseg`` attributes under ``runs``.

    Raises
    ------
    InputError, AnnotationError, ModelFileError
        Before anything is written, for what the user gave.
    RunError
        When a chunk fails (on a worker or here): the chunks finished are
        kept; a store this run made and finished no chunk of is removed.
    """
    # What the user gave is refused before the model or the input is opened, and before anything is written.
    if scheduler is not None:
        scheduler = parse_scheduler(scheduler)
    cluster = scheduler is not None or workers is not None
    if scheduler is not None and workers is not None:
        raise InputError("give --scheduler or --workers, not both")
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size), got {overlap} with tile_size {tile_size}")
    out = str(out)
    _check_paths(model, image, out, resume)
    model, ref, digest = _resolve_model(model, cluster)
    source = open_input(image, model, channel_axis)
    options = _method_options(model, dict(options), source)
    rule = plane_rule(model, **options)
    plan = BlockPlan(source.shape, _check_chunks(block) if block else default_block(
        source.shape, source.channels, whole_planes(model, rule) is None), tile_size, overlap)
    check_block(plan, model, rule)
    settings = Settings(str(device), tile_size, overlap, batch_size, flips, probabilities)
    record = _record(model, ref, digest, image, source, plan, settings, options)
    stored = _resume_record(out, record) if resume else None
    created: list = []
    try:
        client, threads, close = open_cluster(scheduler, workers) if cluster else (None, None, lambda: None)
        try:
            job = Job(ref if cluster else model, options, source,
                      ZarrOutput(str(Path(out).resolve()), source.planar, probabilities), plan, None, settings,
                      threads)
            return _run(job, out, record, stored, cluster_runner(client) if client else _local_runner, str(image),
                        quiet, created)
        finally:
            close()  # first: a local cluster's workers write no more once it is closed
    except BaseException as error:
        left = _after_failure(out, bool(created))
        if isinstance(error, RunError):
            raise RunError(f"{error}; {left}") from None
        raise


def _finished(out: str) -> int:
    """How many chunks of ``out`` have their done flag set; 0 where the flags cannot be read."""
    try:
        return int(np.count_nonzero(_import_zarr().open_array(out, path="done", mode="r")[...]))
    except Exception:  # a store whose creation failed midway has no flags to read
        return 0


def _after_failure(out: str, created: bool) -> str:
    """After a failed run: remove the store it created if no chunk was finished; say what is left."""
    finished = _finished(out) if os.path.isdir(out) else 0
    if finished:
        return f"the chunks finished so far ({finished}) are kept in {out}: run the same command with --resume"
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return "nothing was written"
    return f"{out} is kept for --resume" if os.path.isdir(out) else "nothing was written"


def _record(model: Model, ref: ModelRef | None, digest: str, image, source: ZarrInput, plan: BlockPlan,
            settings: Settings, options: dict) -> dict:
    """What the output's ``coarseseg`` attributes say made it; :func:`_fingerprint` is what resuming checks."""
    return {"made_by": f"napari-coarseseg {__version__}", "model": ref.path if ref else "(in memory)",
            "model_sha256": digest, "method": model.method, "input": str(image),
            "input_shape": list(source.stored_shape), "input_dtype": source.dtype, "block": list(plan.block),
            "probabilities": settings.keep_probabilities,
            "settings": {"tile_size": settings.tile_size, "overlap": settings.overlap, "flips": settings.flips},
            "options": json.loads(json.dumps(options, default=list)), "n_labels": model.n_classes + 1,
            "labels_dtype": np.dtype(label_dtype(model.n_classes)).name,
            "normalisation_percentiles": [model.card["normalisation"][key] for key in ("low", "high")],
            "normalised_per": normalised_per(model)}


def _check_chunks(block) -> tuple[int, int, int]:
    block = tuple(int(b) for b in block)
    if len(block) != 3 or min(block) < 1:
        raise InputError(f"--chunks must be three sizes >= 1, Z,Y,X (1,Y,X for a 2-D image), got {block}")
    return block


def parse_chunks(text: str) -> tuple[int, int, int]:
    """``"4,2048,2048"`` -> (4, 2048, 2048)."""
    try:
        return _check_chunks(int(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--chunks takes three whole numbers Z,Y,X, got {text!r}") from None


def check_zarr_arguments(args) -> tuple[int, int, int] | None:
    """Refuse what is wrong in ``coarseseg predict``'s arguments for a zarr input, reading nothing but the file
    system's names and permissions (no model, no store): a scheduler address first, then the options, the input,
    ``--out``; returns the ``--chunks`` asked for, if any.

    Raises
    ------
    InputError
        In one line, saying what to give instead.
    """
    if args.scheduler is not None:
        parse_scheduler(args.scheduler)
    if args.scheduler is not None and args.workers is not None:
        raise InputError("give --scheduler or --workers, not both")
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    if args.reliability:
        raise InputError("--reliability is not written for zarr inputs; leave it out")
    if isinstance(args.probabilities, str):
        raise InputError("for a zarr input, --probabilities takes no file name: the probabilities go into "
                         f"{args.out}/probabilities")
    if not readable(args.image):
        raise cannot_read(args.image, "the input")
    if not is_zarr(args.image):
        raise InputError(f"{args.image} is not a zarr store; --scheduler, --workers, --resume, --chunks and a .zarr "
                         "--out need a zarr input (a .zarr folder)")
    _check_paths(args.model, args.image, str(args.out), args.resume)
    return parse_chunks(args.chunks) if args.chunks else None


def predict_zarr_command(args, options: dict, block: tuple[int, int, int] | None) -> int:
    """``coarseseg predict`` for a zarr input (see :func:`zarr_requested`) whose arguments
    :func:`check_zarr_arguments` passed (``block``: the chunks it returned): :func:`predict_zarr`, one line saying
    what was written."""
    import sys

    try:
        summary = predict_zarr(args.model, args.image, args.out, scheduler=args.scheduler, workers=args.workers,
                               resume=args.resume, probabilities=bool(args.probabilities),
                               channel_axis=args.channel_axis, block=block, device=args.device, flips=args.flips,
                               quiet=args.quiet, **options)
    except KeyboardInterrupt:
        kept = ("the finished chunks are kept: run the same command with --resume to finish"
                if Path(args.out).exists() else "nothing was written")
        print(f"coarseseg predict: interrupted; {kept}", file=sys.stderr)
        return 130
    where = f"{len(summary['workers'])} worker{'s' if len(summary['workers']) != 1 else ''}"
    print(f"wrote labels {' x '.join(map(str, summary['shape']))} to {args.out}: {summary['predicted']} chunks "
          f"predicted on {where}, {summary['skipped']} already done")
    return 0
