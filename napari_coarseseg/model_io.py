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

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._version import __version__
from .training import models_dir

__all__ = ["Model", "ModelFileError", "make_card", "input_channels", "save_model", "read_card", "load_weights",
           "resolve_model_path", "atomic_write", "publish", "list_shipped_models", "FORMAT_VERSION"]

FORMAT_NAME = "napari-coarseseg-model"
FORMAT_VERSION = 1


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


def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(path.parent)!r} does not exist; create it first")
    if path.is_dir():
        raise IsADirectoryError(f"output {str(path)!r} is a folder; give a file name")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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


def _validate_card(card, path) -> dict:
    if not isinstance(card, dict) or card.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path} is not a napari-coarseseg model (its card has no {FORMAT_NAME!r} format)")
    version = card.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model format version {version!r}; this napari-coarseseg reads up to "
            f"{FORMAT_VERSION}. Upgrade napari-coarseseg."
        )
    if not isinstance(card.get("method"), str):
        raise ModelFileError(f"{path}: card field 'method' must name a method, got {card.get('method')!r}")
    for key in ("n_classes", "channels"):
        if not isinstance(card.get(key), int) or card[key] < 1:
            raise ModelFileError(f"{path}: card field {key!r} must be a positive integer, got {card.get(key)!r}")
    context = card.get("slice_context", 0)
    if not isinstance(context, int) or isinstance(context, bool) or context < 0:
        raise ModelFileError(f"{path}: card field 'slice_context' must be a whole number >= 0, got {context!r}")
    per = card.get("normalisation", {}).get("per", "image") if isinstance(card.get("normalisation"), dict) else None
    if per not in ("image", "slice"):
        raise ModelFileError(f"{path}: card field 'normalisation' must be a mapping whose 'per' is 'image' or "
                             f"'slice', got {card.get('normalisation')!r}")
    net = card.get("network")
    if not isinstance(net, dict) or not all(isinstance(net.get(k), int) for k in ("base_channels", "depth")):
        raise ModelFileError(f"{path}: card field 'network' must give integer base_channels and depth")
    return card


def list_shipped_models() -> list[str]:
    """Names of the trained models shipped in ``models/`` (accepted wherever a model path is)."""
    return sorted(p.stem for p in models_dir().glob("*.safetensors"))


def resolve_model_path(path) -> Path:
    """``path`` itself, or the shipped model of that name; a clear error when neither exists."""
    path = Path(path)
    if path.is_file():
        return path
    if str(path) in list_shipped_models():
        return models_dir() / f"{path}.safetensors"
    shipped = ", ".join(list_shipped_models()) or "none"
    raise ModelFileError(f"model file {str(path)!r} does not exist (models shipped with napari-coarseseg: {shipped})")


def read_card(path) -> dict:
    """Read and validate the card of a model file (or shipped model name) without loading weights.

    The card's format is checked here; whether its method is one this
    napari-coarseseg knows, :func:`napari_coarseseg.load_model` checks.
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
