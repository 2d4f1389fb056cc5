"""Model files: weights in safetensors plus a JSON card, never unpickled.

A model file is one ``.safetensors`` file. Its header metadata holds the card
(method, classes, channels, normalisation, network, training summary) as JSON,
so a single file travels by e-mail and describes itself. Loading parses JSON
and raw tensors only: no code in the file is ever executed. Writes go to a
temporary file in the same folder, then are renamed over the target, so a
crash never leaves a half-written model.

This module is the file format and knows no method: which network a card
describes is the method's business, so :func:`napari_coarseseg.load_model`
lives with the method registry (``napari_coarseseg.methods``) and calls
:func:`read_card` and :func:`load_weights` here.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._version import __version__
from .annotations import MAX_CLASSES
from .training import MAX_BASE_CHANNELS, MAX_DEPTH, MAX_DOWNSAMPLE, MAX_SLICE_CONTEXT, models_dir

__all__ = ["Model", "ModelFileError", "make_card", "input_channels", "save_model", "read_card", "load_weights",
           "resolve_model_path", "atomic_write", "temporary_beside", "out_of_room", "publish", "list_shipped_models",
           "FORMAT_VERSION", "card_error", "card_whole", "card_number", "check_weight_shapes", "MAX_CHANNELS",
           "MAX_SLICE_CONTEXT", "MAX_BASE_CHANNELS", "MAX_DEPTH", "MAX_HEADS"]

FORMAT_NAME = "napari-coarseseg-model"
FORMAT_VERSION = 1

# Bounds of the card's fields (:func:`read_card` checks them before anything is built). A card beyond them was
# altered or is damaged: read as it is, it would allocate a network of any size, or normalise with nonsense. The
# network's own bounds (MAX_SLICE_CONTEXT, MAX_BASE_CHANNELS, MAX_DEPTH) are the training settings' (training.py).
#: Image channels. Training sets no limit, so this one lies above anything trained here: multiplexed
#: fluorescence (CyCIF, CODEX) reaches 60-100 markers and hyperspectral cubes a few hundred bands.
MAX_CHANNELS = 256
#: Refineseg transition heads, one per drawing layer: 64 layers is beyond any annotation session.
MAX_HEADS = 64

_DAMAGED = "the file was altered or is damaged: use the original model file or train again"


class ModelFileError(ValueError):
    """A model file that cannot be used; the message says why."""


@dataclass
class Model:
    """A trained network with everything needed to apply it.

    Attributes
    ----------
    network : nn.Module
        The segmentation network.
    heads : nn.ModuleList
        Extra modules of a method that are not part of the network, saved
        with it (refineseg: the transition heads, one per drawing layer, used
        for the annotation-reliability map); empty for other methods.
    card : dict
        The model card (see :func:`make_card`).
    """

    network: nn.Module
    heads: nn.ModuleList = field(default_factory=nn.ModuleList)
    card: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.card["method"]

    @property
    def n_classes(self) -> int:
        """Number of object classes K (background excluded)."""
        return int(self.card["n_classes"])

    @property
    def channels(self) -> int:
        return int(self.card["channels"])

    @property
    def rgb(self) -> bool:
        return bool(self.card.get("rgb", False))

    @property
    def slice_context(self) -> int:
        """Neighbouring slices on either side the network sees as channels (0: slice-wise 2-D)."""
        return int(self.card.get("slice_context", 0))

    @property
    def input_channels(self) -> int:
        return input_channels(self.card)

    @property
    def normalisation(self) -> str:
        """What the intensities are normalised over: "image" (also cards written before it was recorded) or
        "slice"."""
        return self.card.get("normalisation", {}).get("per", "image")

    def to(self, device) -> "Model":
        self.network.to(device)
        self.heads.to(device)
        return self

    def eval(self) -> "Model":
        self.network.eval()
        self.heads.eval()
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"network.{k}": v for k, v in self.network.state_dict().items()}
        state.update({f"heads.{k}": v for k, v in self.heads.state_dict().items()})
        return state


def make_card(method: str, n_classes: int, channels: int, rgb: bool, network: dict, normalisation: str = "image",
              **extra) -> dict:
    """A model card with the fields every model file carries, plus a method's ``extra`` fields.

    ``normalisation`` says what intensities were normalised over ("image" or "slice", the card's
    ``normalisation["per"]``; cards written before it existed mean "image")."""
    card = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": method,
        "n_classes": int(n_classes),
        "class_names": [f"class {k}" for k in range(1, n_classes + 1)],
        "channels": int(channels),
        "rgb": bool(rgb),
        "network": network,
        "normalisation": {"kind": "percentile-zscore", "low": 1.0, "high": 99.8, "per": normalisation},
        "package_version": __version__,
    }
    card.update(extra)
    return card


def input_channels(card: dict) -> int:
    """Channels of the network's input: the image's channels times ``2k + 1`` slices (k: the card's
    ``slice_context``, 0 for cards written before it existed)."""
    return int(card["channels"]) * (2 * int(card.get("slice_context", 0)) + 1)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def publish(tmp, path) -> None:
    """Rename a finished temporary file onto ``path`` with the usual permissions."""
    # mkstemp creates files readable by their owner only; give the result
    # the permissions a plain open() would.
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


def temporary_beside(path) -> str:
    """A new, empty temporary file in the folder of ``path`` (so that renaming it onto ``path`` is atomic).

    Raises one-line errors for a missing folder, a folder in the way and a
    folder this process may not write into."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(path.parent)!r} does not exist; create it first")
    if path.is_dir():
        raise IsADirectoryError(f"output {str(path)!r} is a folder; give a file name")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except PermissionError:
        raise PermissionError(f"cannot write into {str(path.parent)!r}: permission denied; choose a folder you can "
                              "write to") from None
    os.close(fd)
    return tmp


#: errno values of a write that ran out of room: no space, a disk quota, a file-size limit.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def out_of_room(error: BaseException, path) -> OSError | None:
    """A one-line error for a write of ``path`` that failed for lack of disk space (None for any other error).

    Writers report a full disk in their own words: an ``OSError`` with errno
    ENOSPC, or safetensors' ``SafetensorError`` quoting Rust's ``StorageFull``."""
    text = str(error)
    if not ((isinstance(error, OSError) and error.errno in _NO_ROOM)
            or any(word in text for word in ("StorageFull", "No space left", "FileTooLarge", "Disk quota"))):
        return None
    folder = Path(path).parent
    try:
        free = f" ({shutil.disk_usage(folder).free / 1e6:.1f} MB free)"
    except OSError:
        free = ""
    return OSError(f"no space left on device writing {Path(path).name} in {str(folder)!r}{free}: free some space "
                   "or write elsewhere, then run again")


def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``: ``path`` is either left as it was or
    replaced whole; a full disk is reported in one line (:func:`out_of_room`)."""
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        write(tmp)
        publish(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        full = out_of_room(error, path)
        if full is not None:
            raise full from None
        raise
    return path


def save_model(model: Model, path, half: bool = False) -> Path:
    """Write ``model`` to ``path`` (a ``.safetensors`` file) atomically.

    With ``half``, floating-point tensors are stored as float16: half the
    size (the shipped checkpoints); loading casts them back to float32.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    metadata = {"coarseseg_card": json.dumps(model.card)}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def card_error(name: str, must: str, value) -> ModelFileError:
    """The one-line error for card field ``name`` (dotted: ``"normalisation.low"``) that is not what it ``must``
    be; the caller puts the file in front (``f"{path}: {error}"``).

    Examples
    --------
    >>> print(card_error("network.depth", "a whole number from 1 to 8", 12))
    card field 'network.depth' must be a whole number from 1 to 8, got 12; the file was altered or is damaged: use \
the original model file or train again
    """
    shown = repr(value)
    if len(shown) > 80:  # a tampered field may hold a megabyte; the message stays one readable line
        shown = shown[:77] + "..."
    return ModelFileError(f"card field {name!r} must be {must}, got {shown}; {_DAMAGED}")


def _is_whole(value) -> bool:
    # JSON true/false read as bool, which Python counts as int: never a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def card_whole(value, name: str, low: int, high: int) -> int:
    """``value`` if it is a whole number (not a bool) from ``low`` to ``high``, else :func:`card_error`."""
    if not _is_whole(value) or not low <= value <= high:
        raise card_error(name, f"a whole number from {low} to {high}", value)
    return value


def card_number(value, name: str, low: float = -math.inf, high: float = math.inf, *, above: bool = False,
                infinite: bool = False) -> float:
    """``value`` if it is a number (not a bool) in ``[low, high]`` (``(low, high]`` with ``above``), else
    :func:`card_error`. JSON's NaN and Infinity are refused, Infinity allowed with ``infinite``."""
    ok = _is_number(value) and (math.isfinite(value) or (infinite and value == math.inf))
    if not ok or not (value > low if above else value >= low) or not value <= high:
        if above:
            span = f"above {low:g}" + (f" and at most {high:g}" if math.isfinite(high) else "")
        elif math.isfinite(high):
            span = f"from {low:g} to {high:g}" if math.isfinite(low) else f"at most {high:g}"
        else:
            span = f"of at least {low:g}" + (" (Infinity allowed)" if infinite else "")
        raise card_error(name, f"a {'' if infinite else 'finite '}number {span}", value)
    return value


def _check_spacing(value) -> None:
    """A pixel size: 2 or 3 positive finite numbers ((sy, sx) or (sz, sy, sx))."""
    if not (isinstance(value, list) and len(value) in (2, 3)
            and all(_is_number(s) and math.isfinite(s) and s > 0 for s in value)):
        raise card_error("spacing", "null, a pixel size of 2 or 3 positive finite numbers, or one such size (or "
                         "null) per training image", value)


def _validate_card(card, path) -> dict:
    """``card`` if every generic field the package reads has its type and range; a one-line
    :class:`ModelFileError` naming the first field that does not. Method fields are the method's
    (:attr:`~napari_coarseseg.methods.Method.check_card`)."""
    if not isinstance(card, dict) or card.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path} is not a napari-coarseseg model (its card has no {FORMAT_NAME!r} format)")
    version = card.get("format_version")
    if _is_whole(version) and version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model format version {version!r}; this napari-coarseseg reads up to "
            f"{FORMAT_VERSION}. Upgrade napari-coarseseg."
        )
    try:
        _check_generic_fields(card)
    except ModelFileError as error:
        raise ModelFileError(f"{path}: {error}") from None
    return card


def _check_generic_fields(card: dict) -> None:
    """The checks of :func:`_validate_card`, whose errors the caller prefixes with the file."""
    version = card.get("format_version")
    if not _is_whole(version) or version < 1:
        raise card_error("format_version", f"a whole number (this napari-coarseseg reads 1 to {FORMAT_VERSION})",
                         version)
    if not isinstance(card.get("method"), str):
        raise card_error("method", "the name of a method", card.get("method"))
    n_classes = card_whole(card.get("n_classes"), "n_classes", 1, MAX_CLASSES)
    if "class_names" in card:
        names = card["class_names"]
        if not (isinstance(names, list) and len(names) == n_classes and all(isinstance(n, str) for n in names)):
            raise card_error("class_names", f"a list of n_classes = {n_classes} names", names)
    card_whole(card.get("channels"), "channels", 1, MAX_CHANNELS)
    if "rgb" in card and not isinstance(card["rgb"], bool):
        raise card_error("rgb", "true or false", card["rgb"])
    card_whole(card.get("slice_context", 0), "slice_context", 0, MAX_SLICE_CONTEXT)
    if card.get("channel_axis") is not None and not _is_whole(card["channel_axis"]):
        raise card_error("channel_axis", "null or a whole number (an axis of the image)", card["channel_axis"])
    norm = card.get("normalisation")
    if not isinstance(norm, dict):
        raise card_error("normalisation", "a mapping with the percentiles 'low' and 'high'", norm)
    if norm.get("kind", "percentile-zscore") != "percentile-zscore":
        raise card_error("normalisation.kind", "'percentile-zscore'", norm["kind"])
    low, high = norm.get("low"), norm.get("high")
    if not (_is_number(low) and math.isfinite(low) and 0 <= low < 100 and (not _is_number(high) or low < high)):
        raise card_error("normalisation.low", "a number in [0, 100) below 'high'", low)
    card_number(high, "normalisation.high", low, 100, above=True)
    if norm.get("per", "image") not in ("image", "slice"):
        raise card_error("normalisation", "a mapping whose 'per' is 'image' or 'slice'", norm)
    network = card.get("network")
    if not isinstance(network, dict):
        raise card_error("network", "a mapping with the network's base_channels and depth", network)
    card_whole(network.get("base_channels"), "network.base_channels", 1, MAX_BASE_CHANNELS)
    card_whole(network.get("depth"), "network.depth", 1, MAX_DEPTH)
    if "n_heads" in network:
        card_whole(network["n_heads"], "network.n_heads", 0, MAX_HEADS)
    if "downsample" in network:
        card_whole(network["downsample"], "network.downsample", 1, MAX_DOWNSAMPLE)
    if "kind" in network and not isinstance(network["kind"], str):
        raise card_error("network.kind", "the name of a network", network["kind"])
    if "task_levels" in network and not _is_whole(network["task_levels"]):
        raise card_error("network.task_levels", "a whole number", network["task_levels"])
    spacing = card.get("spacing")
    # One [sy, sx] for all training images, or one (or null) per image (recursive's card_spacing).
    if isinstance(spacing, list) and spacing and all(s is None or isinstance(s, list) for s in spacing):
        for size in spacing:
            if size is not None:
                _check_spacing(size)
    elif spacing is not None:
        _check_spacing(spacing)
    if "training" in card and not isinstance(card["training"], dict):
        raise card_error("training", "a mapping (the run's summary)", card["training"])


def list_shipped_models() -> list[str]:
    """Names of the trained models shipped in ``models/`` (accepted wherever a model path is)."""
    return sorted(p.stem for p in models_dir().glob("*.safetensors"))


def resolve_model_path(path) -> Path:
    """``path`` itself, or the shipped model of that name; a clear error when neither exists."""
    path = Path(path)
    if path.is_file():
        if not os.access(path, os.R_OK):
            raise ModelFileError(f"cannot read model file {str(path)!r}: permission denied; give your user read "
                                 f"access (chmod u+r {str(path)!r}) or copy it somewhere you can")
        return path
    if path.is_dir():
        raise ModelFileError(f"model {str(path)!r} is a folder; give the .safetensors file 'coarseseg train' wrote")
    if str(path) in list_shipped_models():
        return models_dir() / f"{path}.safetensors"
    shipped = ", ".join(list_shipped_models()) or "none"
    raise ModelFileError(f"model file {str(path)!r} does not exist (models shipped with napari-coarseseg: {shipped})")


def read_card(path) -> dict:
    """Read and validate the card of a model file (or shipped model name) without loading weights.

    The card's format and every field the package reads whatever the method
    (type and range: :data:`MAX_CHANNELS`, :data:`MAX_DEPTH`, ...) are checked
    here; whether its method is one this napari-coarseseg knows, and that
    method's own fields, :func:`napari_coarseseg.load_model` checks.

    Raises
    ------
    ModelFileError
        In one line, naming the file and the first field that is wrong.
    """
    from safetensors import SafetensorError, safe_open

    path = resolve_model_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{path} is not a readable safetensors model file ({error})") from None
    try:
        card = json.loads(metadata["coarseseg_card"])
    except (KeyError, json.JSONDecodeError):
        raise ModelFileError(f"{path} carries no valid napari-coarseseg card") from None
    return _validate_card(card, path)


def check_weight_shapes(path, model: Model) -> None:
    """Refuse a file whose tensors are not, by name and shape, those of ``model``, reading only the file's header.

    ``model`` is meant to be built on the ``meta`` device (``with torch.device("meta"): build_model(card)``),
    which allocates nothing: the card's bounds still allow networks far larger than memory (width 256 doubling
    over 8 levels), so the network is allocated only once the file's tensors are known to fill it.

    Raises
    ------
    ModelFileError
        Naming the first tensor missing, unexpected or of another shape.
    """
    from safetensors import safe_open

    path = resolve_model_path(path)
    with safe_open(str(path), framework="pt") as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    wanted = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if found == wanted:
        return
    missing, unexpected = sorted(wanted.keys() - found.keys()), sorted(found.keys() - wanted.keys())
    if missing:
        detail = f"missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    elif unexpected:
        detail = f"unexpected tensor {unexpected[0]!r}" + (
            f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
    else:
        name = next(name for name in wanted if wanted[name] != found[name])
        detail = f"tensor {name!r} has shape {list(found[name])}, the card's network {list(wanted[name])}"
    raise ModelFileError(f"{path}: weights do not match the network its card describes ({detail})")


def load_weights(path, model: Model) -> Model:
    """Fill ``model``, built from the card of ``path``, with the file's tensors.

    Raises
    ------
    ModelFileError
        If the tensors do not match the network and modules the card
        describes, or hold NaN or infinite values.
    """
    from safetensors.torch import load_file

    path = resolve_model_path(path)
    state = load_file(str(path), device="cpu")
    network_state = {k[len("network.") :]: v for k, v in state.items() if k.startswith("network.")}
    heads_state = {k[len("heads.") :]: v for k, v in state.items() if k.startswith("heads.")}
    try:
        model.network.load_state_dict(network_state, strict=True)
        model.heads.load_state_dict(heads_state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise ModelFileError(f"{path}: weights do not match the network its card describes ({first})") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelFileError(f"{path}: tensor {name!r} holds NaN or infinite values; the file is corrupt")
    return model
