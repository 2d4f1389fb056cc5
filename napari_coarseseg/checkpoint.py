"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is one ``.safetensors`` file written atomically (a killed process
leaves the previous checkpoint intact): the tensors of the network, heads and
optimiser, the random generators' states, method state such as the recursive
method's current approximations, and a JSON header with the step reached and a
fingerprint of the run (method, settings, seed, images and drawings). Loading
parses JSON and raw tensors only, like model files.

Resuming restores every piece of state, so on the same device and thread
count a resumed run continues bit for bit like an uninterrupted one.

Several processes (:mod:`napari_coarseseg.data_parallel`): the modules and the
optimiser are the same on every process and rank 0 writes them; the
checkpoint also holds the random generators of every other rank (header
``rank_rng``, tensors ``rng.torch.rank<r>``: the same states as rank 0's,
since every process draws the same batches and keeps its own rows) and the
number of processes (``processes``). Only rank 0 reads and writes the file;
a resumed run needs as many processes as the interrupted one (each process's
losses are over its share of the batch, so the float results depend on the
split), and then continues as it would have.
One-process checkpoints are as they were.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .data_parallel import Ranks
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
                    state: dict | None = None, arrays: dict | None = None, other_ranks: list | None = None) -> Path:
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
    other_ranks : list, optional
        Several processes: ``(rng.bit_generator.state, torch_rng.get_state())``
        of ranks 1, 2, ... (``rng`` and ``torch_rng`` are rank 0's).
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
    if other_ranks:
        header["processes"] = 1 + len(other_ranks)
        header["rank_rng"] = [numpy_state for numpy_state, _ in other_ranks]
        tensors.update({f"rng.torch.rank{r}": torch_state for r, (_, torch_state) in enumerate(other_ranks, 1)})
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


def restore_checkpoint(checkpoint: dict, *, modules: dict, optimizer, schedule, rng, torch_rng, rank: int = 0,
                       world_size: int = 1) -> dict:
    """Load a checkpoint's state into a freshly built run; return ``{"state", "arrays"}`` of the method.

    ``rank`` of ``world_size`` processes takes its own random generators; a
    checkpoint of another number of processes is refused (``CheckpointError``).
    """
    tensors, header = checkpoint["tensors"], checkpoint["header"]
    written_by = int(header.get("processes", 1))
    if written_by != world_size:
        how = "on one process" if written_by == 1 else f"on {written_by} (torchrun --nproc-per-node {written_by})"
        raise CheckpointError(f"the checkpoint was written by a run on {written_by} process"
                              f"{'es' if written_by > 1 else ''} and this one has {world_size}: a run goes on "
                              f"exactly only on as many processes, so resume it {how}, or delete it and start "
                              "afresh")
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
        rng.bit_generator.state = header["rng"] if rank == 0 else header["rank_rng"][rank - 1]
        torch_rng.set_state(tensors["rng.torch" if rank == 0 else f"rng.torch.rank{rank}"])
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"the checkpoint does not fit this run ({str(error).splitlines()[0]}); delete it "
                              "and start without --resume") from None
    arrays = {k[len("array."):]: v.numpy() for k, v in tensors.items() if k.startswith("array.")}
    return {"state": header["state"], "arrays": arrays}


class RunCheckpoint:
    """The checkpoints of one training run: written every ``every`` steps, and resumed from.

    Guarantee: a run resumed from its file, on the same device and thread
    count and on as many processes, goes on bit for bit as if it had not
    stopped; a checkpoint of another run or of another number of processes
    is refused (:class:`CheckpointError`).

    Parameters
    ----------
    path : str or Path or None
        The checkpoint file; None switches checkpoints off.
    every : int
        Steps between two checkpoints.
    method, config, seed, arrays
        What defines the run (see :func:`run_fingerprint`).
    ranks : Ranks, optional
        The processes of the run (default one): every process calls
        :meth:`resume` and :meth:`maybe_save` at the same steps, rank 0 alone
        touches the file.
    **parts
        ``modules``, ``optimizer``, ``schedule``, ``rng``, ``torch_rng`` of the run.
    """

    def __init__(self, path, every: int, method: str, config, seed, arrays, ranks: Ranks | None = None, **parts):
        self.path = None if path is None else Path(path)
        self.every = int(every)
        self.ranks = ranks or Ranks()
        self.parts = parts
        self.step = 0
        self.fingerprint = None if self.path is None else run_fingerprint(method, config, seed, arrays)

    def resume(self) -> dict:
        """Restore the run from the file; ``self.step`` becomes the step it had reached."""
        if self.path is None:
            raise CheckpointError("resuming needs a checkpoint file; give one")
        loaded = self._load()
        restored = restore_checkpoint(loaded, rank=self.ranks.rank, world_size=self.ranks.world_size, **self.parts)
        self.step = loaded["step"]
        return restored

    def _load(self) -> dict:
        if not self.ranks.distributed:
            return load_checkpoint(self.path, self.fingerprint)
        # Rank 0 reads the file; every process gets its contents, or the same error to stop on.
        loaded = error = None
        if self.ranks.main:
            try:
                loaded = load_checkpoint(self.path, self.fingerprint)
            except CheckpointError as failure:
                error = str(failure)
        loaded, error = self.ranks.broadcast((loaded, error))
        if error is not None:
            raise CheckpointError(error)
        return loaded

    def maybe_save(self, step: int, state: dict | None = None, arrays: dict | None = None,
                   force: bool = False) -> bool:
        """Write the checkpoint if ``step`` is a multiple of ``every``, or always with ``force``; whether this
        process wrote it (rank 0 does, after gathering every process's random generators)."""
        if self.path is None or not (force or step % self.every == 0):
            return False
        other_ranks = None
        if self.ranks.distributed:
            generators = (self.parts["rng"].bit_generator.state, self.parts["torch_rng"].get_state())
            other_ranks = self.ranks.gather(generators)[1:]
        if self.ranks.main:
            save_checkpoint(self.path, fingerprint=self.fingerprint, step=step, state=state, arrays=arrays,
                            other_ranks=other_ranks, **self.parts)
        self.step = step
        return self.ranks.main
