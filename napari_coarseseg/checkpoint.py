"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is one ``.safetensors`` file written atomically (a killed process
leaves the previous checkpoint intact): the tensors of the network, heads and
optimiser, the random generators' states, method state such as the recursive
method's current approximations, and a JSON header with the step reached and a
fingerprint of the run (method, settings, seed, images and drawings). Loading
parses JSON and raw tensors only, like model files.

Resuming restores every piece of state, so on the same device and thread
count a resumed run continues bit for bit like an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .model_io import atomic_write

__all__ = ["CheckpointError", "RunCheckpoint", "run_fingerprint", "save_checkpoint", "load_checkpoint",
           "restore_checkpoint", "checkpoint_step"]

CHECKPOINT_FORMAT = "napari-coarseseg-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


def run_fingerprint(method: str, config, seed, arrays) -> str:
    """A short hash of what defines a run: method, settings, seed, image and drawing contents."""
    # How often checkpoints are written does not change the run.
    settings = {k: v for k, v in vars(config).items() if k != "checkpoint_every"}
    digest = hashlib.sha256(json.dumps([method, settings, seed], sort_keys=True, default=str).encode())
    for array in arrays:
        if array is None:
            digest.update(b"none")
            continue
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The optimiser state split into raw tensors and a JSON-able rest."""
    state = optimizer.state_dict()
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        plain["state"][str(index)] = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain["state"][str(index)][key] = value
    return tensors, plain


def save_checkpoint(path, *, fingerprint: str, step: int, modules: dict, optimizer, schedule, rng, torch_rng,
                    state: dict | None = None, arrays: dict | None = None) -> Path:
    """Write a checkpoint atomically.

    Parameters
    ----------
    path : str or Path
        The checkpoint file.
    fingerprint : str
        :func:`run_fingerprint` of the run; resuming checks it.
    step : int
        Optimiser steps done.
    modules : dict of str to torch.nn.Module
        Networks and heads, by name.
    optimizer, schedule
        The optimiser and its learning-rate schedule.
    rng : numpy.random.Generator
        The patch sampler's generator.
    torch_rng : torch.Generator
        The augmentation's generator.
    state : dict, optional
        JSON-able method state (e.g. the iteration reached).
    arrays : dict of str to ndarray, optional
        Method arrays (e.g. the recursive approximations).
    """
    from safetensors.torch import save_file

    tensors = {f"module.{name}.{key}": value.detach().cpu().contiguous()
               for name, module in modules.items() for key, value in module.state_dict().items()}
    optimizer_tensors, optimizer_plain = _optimizer_tensors(optimizer)
    tensors.update(optimizer_tensors)
    tensors["rng.torch"] = torch_rng.get_state()
    tensors.update({f"array.{name}": torch.from_numpy(np.ascontiguousarray(a)) for name, a in (arrays or {}).items()})
    header = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "step": int(step),
        "optimizer": optimizer_plain,
        "schedule": schedule.state_dict(),
        "rng": rng.bit_generator.state,
        "state": state or {},
    }
    metadata = {"coarseseg_checkpoint": json.dumps(header, default=_json_number)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _json_number(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if torch.is_tensor(value):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint header")


def _read(path, tensors: bool) -> tuple[dict, dict]:
    """The JSON header (and, with ``tensors``, the raw tensors) of a checkpoint file.

    Raises one of :func:`_read_errors` on a file that is not one.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads((f.metadata() or {})["coarseseg_checkpoint"])
        return header, ({key: f.get_tensor(key) for key in f.keys()} if tensors else {})


def _read_errors() -> tuple:
    from safetensors import SafetensorError

    return SafetensorError, OSError, ValueError, KeyError, TypeError


def checkpoint_step(path) -> int | None:
    """The step a checkpoint file reached (header only), or None if there is no readable checkpoint."""
    try:
        return int(_read(path, tensors=False)[0]["step"])
    except _read_errors():
        return None


def load_checkpoint(path, fingerprint: str | None = None) -> dict:
    """Read a checkpoint: ``{"step", "tensors", "header"}``; refuse one of another run.

    Raises
    ------
    CheckpointError
        If the file is missing, unreadable, not a checkpoint, or (with
        ``fingerprint``) was written by a run with other settings or data.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}; start without --resume")
    try:
        header, tensors = _read(path, tensors=True)
    except _read_errors() as error:
        raise CheckpointError(f"{path} is not a readable napari-coarseseg checkpoint ({error}); delete it and "
                              "start without --resume") from None
    if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a napari-coarseseg checkpoint")
    if fingerprint is not None and header.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path} was written by another training run (other images, drawings, settings or seed); "
            "resume with the same inputs, or delete it to start afresh"
        )
    return {"step": int(header["step"]), "tensors": tensors, "header": header}


def restore_checkpoint(checkpoint: dict, *, modules: dict, optimizer, schedule, rng, torch_rng) -> dict:
    """Load a checkpoint's state into a freshly built run; return ``{"state", "arrays"}`` of the method."""
    tensors, header = checkpoint["tensors"], checkpoint["header"]
    try:
        for name, module in modules.items():
            prefix = f"module.{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        state = {"param_groups": header["optimizer"]["param_groups"], "state": {}}
        for index, plain in header["optimizer"]["state"].items():
            values = dict(plain)
            prefix = f"optimizer.{index}."
            values.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            state["state"][int(index)] = values
        optimizer.load_state_dict(state)
        schedule.load_state_dict(header["schedule"])
        rng.bit_generator.state = header["rng"]
        torch_rng.set_state(tensors["rng.torch"])
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"the checkpoint does not fit this run ({str(error).splitlines()[0]}); delete it "
                              "and start without --resume") from None
    arrays = {k[len("array."):]: v.numpy() for k, v in tensors.items() if k.startswith("array.")}
    return {"state": header["state"], "arrays": arrays}


class RunCheckpoint:
    """The checkpoints of one training run: written every ``every`` steps, and resumed from.

    Parameters
    ----------
    path : str or Path or None
        The checkpoint file; None switches checkpoints off.
    every : int
        Steps between two checkpoints.
    method, config, seed, arrays
        What defines the run (see :func:`run_fingerprint`).
    **parts
        ``modules``, ``optimizer``, ``schedule``, ``rng``, ``torch_rng`` of the run.
    """

    def __init__(self, path, every: int, method: str, config, seed, arrays, **parts):
        self.path = None if path is None else Path(path)
        self.every = int(every)
        self.parts = parts
        self.step = 0
        self.fingerprint = None if self.path is None else run_fingerprint(method, config, seed, arrays)

    def resume(self) -> dict:
        """Restore the run from the file; ``self.step`` becomes the step it had reached."""
        if self.path is None:
            raise CheckpointError("resuming needs a checkpoint file; give one")
        loaded = load_checkpoint(self.path, self.fingerprint)
        restored = restore_checkpoint(loaded, **self.parts)
        self.step = loaded["step"]
        return restored

    def maybe_save(self, step: int, state: dict | None = None, arrays: dict | None = None,
                   force: bool = False) -> bool:
        """Write the checkpoint if ``step`` is a multiple of ``every``, or always with ``force``."""
        if self.path is None or not (force or step % self.every == 0):
            return False
        save_checkpoint(self.path, fingerprint=self.fingerprint, step=step, state=state, arrays=arrays,
                        **self.parts)
        self.step = step
        return True
