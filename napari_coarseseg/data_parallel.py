"""Training one model on several processes or GPUs: torch DistributedDataParallel behind one small object.

``torchrun --nproc-per-node N -m napari_coarseseg.cli train ...`` starts N
processes; :func:`joined_processes` joins them into one process group (gloo
on CPUs, NCCL on GPUs) and every
:class:`~napari_coarseseg.methods.TrainingLoop` built while a group of
several processes is up trains data-parallel through :class:`Ranks`:

- every process builds the modules from the same seed (DDP also copies rank
  0's weights to the others at the start) and seeds its sampling and
  augmentation generators with it too (rank 0's random seed when none is
  given): each step, every process draws the same whole batch of
  ``batch_size`` patches, augments it alike, and keeps its own
  ``batch_size / N`` rows of it (rank r the r-th share), so that N processes
  make the steps of one process with ``batch_size`` patches, at the same
  learning rate (a batch that N does not divide is refused). Drawing and
  augmenting the whole batch on every process costs little beside the
  network's passes;
- one ``DistributedDataParallel`` holds every trained module under one root
  (the network, refineseg's transition heads, whatever a method builds), so
  the gradients of all of them are averaged over the processes before every
  optimiser step, and all processes take the same step;
- batch norm normalises over the patches of all processes
  (:class:`SyncedBatchNorm2d`, a ``SyncBatchNorm`` that also runs on CPUs,
  which torch's does not), the whole batch as one process does: normalised
  over each process's ``batch_size / N`` patches alone, the nuclei test's
  Dice fell from 0.909 to 0.841 and 0.889 (2 processes of 4 patches against
  one of 8, two seeds, measured when the processes still drew patches of
  their own), as low as one process with 4 patches (0.816, 0.870). It costs
  two all-reduces per layer
  and step (on 2 shared CPU cores the test's U-Net took 23.5 s for 200 steps
  on two processes against 13.7 s without it). Its statistics are the same
  on every process, so are the running statistics; rank 0's are sent to the
  others before every preview anyway (:meth:`Ranks.sync_buffers`), so that
  every process previews (and the recursive method grows its approximations
  with) the same network;
- what still differs from one process is the losses' normalisation: each
  process's loss terms are over its own rows (masked means over its drawn
  pixels, refineseg's soft Dice pooled over its rows), and DDP averages the
  N gradients, where one process normalises over the whole batch. With few
  drawn pixels in a share the first step's gradients can move by as much as
  some of them (the spawned test's 4-patch batches), yet the nuclei test's
  held-out Dice of 2 processes stays within 0.004 of one process's (0.9085 /
  0.9077, 0.9094 / 0.9056, 0.9282 / 0.9285, 0.9361 / 0.9329, 0.9412 /
  0.9413 for seeds 0 to 4; with patches of their own, seeded ``seed +
  rank``, it moved by the seed noise: -0.006, -0.006, +0.014 for seeds 0 to
  2). The losses stay the one-process functions; making them exact would
  take an all-reduce of every masked count and Dice sum inside them;
- only rank 0 writes (checkpoints here; the command line's model and
  evolution) and reports; a checkpoint holds every process's random
  generators, so a run resumed on as many processes goes on as it would have
  (:class:`~napari_coarseseg.checkpoint.RunCheckpoint`).

From Python, initialise the default process group yourself (as ``torchrun``
scripts do, e.g. with :func:`joined_processes`) before calling a ``train_*``
function: it picks the group up.

Guarantee: without a process group, or with a group of one process,
:class:`Ranks` is the identity or does nothing, and training is exactly the
one-process run.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .training import select_device

__all__ = ["Ranks", "LaunchError", "SyncedBatchNorm2d", "joined_processes", "launched_world_size",
           "launched_rank", "OTHER_RANKS_REPORT_AFTER_S"]

#: ``coarseseg train`` on ranks other than 0 waits this long before reporting an error: rank 0 meets the same
#: one (same inputs and settings) and reports it, and torchrun stops the others as soon as it fails, so the user
#: reads one line; an error of one process's own still gets reported, this much later.
OTHER_RANKS_REPORT_AFTER_S = 10.0


class LaunchError(ValueError):
    """Settings that cannot work on these processes (the batch split, the backend, the GPUs): the same verdict on
    every process, since it depends on the settings and the machine only."""


def launched_world_size() -> int:
    """The number of processes ``torchrun`` started (``WORLD_SIZE``; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launched_rank() -> int:
    """This process's rank among them (``RANK``; 0 without a launch of several processes)."""
    return int(os.environ.get("RANK", "0") or 0) if launched_world_size() > 1 else 0


def _several_processes() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _SumOverProcesses(torch.autograd.Function):
    """The sum of a tensor over the processes; its gradient is the sum of the processes' gradients."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, gradient):
        gradient = gradient.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(gradient)
        return gradient


class SyncedBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose training statistics are over the batches of all processes, on CPUs and GPUs.

    With several processes in training mode, each channel's mean and
    (biased) variance come from the sums of ``x`` and ``x**2`` over every
    process's batch (one all-reduce of ``2C + 1`` numbers; its backward
    all-reduces their gradients): the normalisation, the gradients and the
    running statistics are those of one process with the whole batch, up to
    float rounding. Otherwise it is ``nn.BatchNorm2d``. It adds no state, so
    :meth:`Ranks.parallel` turns a network's batch norms into it in place.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _several_processes()):
            return super().forward(x)
        self._check_input_dim(x)
        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        values = x.float()  # the statistics in float32, also under autocast
        local = torch.cat([values.sum(dims), (values * values).sum(dims), values.new_full((1,), x.numel() / channels)])
        total = _SumOverProcesses.apply(local)
        count = total[-1]
        mean = total[:channels] / count
        variance = (total[channels:-1] / count - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(variance.detach() * count / (count - 1), factor)  # unbiased, as torch's
        # (x - mean) / std * weight + bias as one scale and one shift per channel: two passes over x, not four.
        scale = torch.rsqrt(variance + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -mean * scale
        if self.affine:
            shift = shift + self.bias
        shape = (1, channels) + (1,) * (x.dim() - 2)
        return (values * scale.view(shape) + shift.view(shape)).to(x.dtype)


def _set_batch_norm_class(modules: dict, old: type, new: type) -> None:
    # The classes hold the same state: the layers change class in place, keeping parameters, buffers and the
    # optimiser's references to them.
    for module in modules.values():
        for layer in module.modules():
            if type(layer) is old:
                layer.__class__ = new


class _AllTrained(nn.Module):
    """Every trained module under one root, so that one DDP averages all their gradients; its forward is the
    method's (which reaches the same modules)."""

    def __init__(self, modules: dict, forward):
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self.method_forward = forward

    def forward(self, images):
        return self.method_forward(images)


@dataclass(frozen=True)
class Ranks:
    """The processes of one training run; one process (rank 0 of 1) when no process group is up.

    Attributes
    ----------
    rank, world_size : int
        This process's rank and the number of processes.
    backend : str
        The process group's backend (``"gloo"``, ``"nccl"``); empty for one process.
    """

    rank: int = 0
    world_size: int = 1
    backend: str = ""

    @classmethod
    def current(cls) -> Ranks:
        """The initialised default process group, if it has several processes; else one process."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))
        return cls()

    @property
    def main(self) -> bool:
        """Whether this process writes and reports (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def per_process(self, batch_size: int) -> int:
        """Each process's share of a step's ``batch_size`` patches; a ``ValueError`` if the processes cannot
        share it evenly."""
        if batch_size % self.world_size:
            raise LaunchError(f"batch_size {batch_size} is not a multiple of the {self.world_size} processes: each "
                             f"takes batch_size / {self.world_size} patches per step; pick a multiple of "
                             f"{self.world_size} (--batch-size)")
        return batch_size // self.world_size

    def parallel(self, modules: dict, forward):
        """``forward`` itself for one process; else a DDP of every module in ``modules`` whose forward calls
        ``forward``, so that the backward pass averages all their gradients over the processes, their batch
        norms made :class:`SyncedBatchNorm2d` (until :meth:`end_parallel`)."""
        if not self.distributed:
            return forward
        from torch.nn.parallel import DistributedDataParallel

        _set_batch_norm_class(modules, nn.BatchNorm2d, SyncedBatchNorm2d)
        root = _AllTrained(modules, forward)
        device = next(root.parameters()).device
        return DistributedDataParallel(root, device_ids=[device.index] if device.type == "cuda" else None)

    def end_parallel(self, modules: dict) -> None:
        """The batch norms back to ``nn.BatchNorm2d``: the trained modules run on one process from here."""
        if self.distributed:
            _set_batch_norm_class(modules, SyncedBatchNorm2d, nn.BatchNorm2d)

    def _tensor_device(self) -> torch.device:
        # NCCL moves CUDA tensors only.
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def average(self, values: dict[str, float]) -> dict[str, float]:
        """The mean of each value over the processes (the losses a progress bar shows, the divergence check)."""
        if not self.distributed:
            return values
        names = sorted(values)
        stacked = torch.tensor([values[name] for name in names], dtype=torch.float64, device=self._tensor_device())
        torch.distributed.all_reduce(stacked)
        return {name: float(value) / self.world_size for name, value in zip(names, stacked.tolist(), strict=True)}

    def sync_buffers(self, modules: dict) -> None:
        """Give every process rank 0's buffers (batch-norm running statistics)."""
        if not self.distributed:
            return
        for module in modules.values():
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, 0)

    def gather(self, value) -> list:
        """Every process's ``value`` (picklable), by rank, on every process."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value):
        """Rank 0's ``value`` (picklable) on every process."""
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def card(self) -> dict:
        """What a model card's training summary records about the processes (nothing for one)."""
        return {"processes": self.world_size, "backend": self.backend} if self.distributed else {}


def _launch_device(device, backend: str, world_size: int) -> tuple[torch.device, str]:
    """The device of this process and the backend of a launch of ``world_size`` processes; a :class:`LaunchError`
    in one line for a combination that cannot work."""
    dist = torch.distributed
    if world_size > 1 and not dist.is_available():
        raise LaunchError("this torch was built without torch.distributed: train on one process")
    try:
        resolved = select_device(device)
    except ValueError as error:
        raise LaunchError(str(error)) from None
    if resolved.type not in ("cpu", "cuda") and world_size > 1:
        raise LaunchError(f"training on several processes runs on CPUs or CUDA GPUs, not {resolved.type}; "
                         "use --device cpu or cuda")
    backend = (backend or "auto").lower()
    if backend == "auto":
        backend = "nccl" if resolved.type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise LaunchError(f"unknown backend {backend!r}; use auto, gloo or nccl")
    if backend == "nccl" and resolved.type != "cuda":
        where = "this machine has none" if not torch.cuda.is_available() else "this run is on the CPU (--device)"
        raise LaunchError(f"the nccl backend needs CUDA GPUs and {where}; use --dist-backend gloo (or auto)")
    if backend == "nccl" and world_size > 1 and not dist.is_nccl_available():
        raise LaunchError("this torch was built without NCCL; use --dist-backend gloo")
    if resolved.type == "cuda" and world_size > 1:
        on_machine, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), torch.cuda.device_count()
        if on_machine > gpus:
            raise LaunchError(f"{on_machine} processes on this machine but {gpus} GPU{'s' if gpus != 1 else ''}: each "
                             f"process needs a GPU of its own; start at most {gpus} per machine "
                             f"(--nproc-per-node {gpus}) or use --device cpu")
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return resolved, backend


@contextmanager
def joined_processes(device="auto", backend: str = "auto"):
    """The process group of a ``torchrun`` launch, for the length of a run: yields ``(Ranks, device)``.

    Parameters
    ----------
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"`` (``"mps"`` for one process only).
        With several processes on GPUs, each takes the GPU of its local rank.
    backend : str
        ``"auto"`` (NCCL on GPUs, gloo on CPUs), ``"gloo"`` or ``"nccl"``.

    Notes
    -----
    Without a launch of several processes (``WORLD_SIZE`` absent or 1)
    nothing is initialised and ``device`` comes back as it was given: the run
    is the one-process run. A backend named there is still checked, so one
    that cannot work fails on a laptop rather than on a cluster.

    Raises
    ------
    LaunchError
        In one line, before any process waits for another: NCCL without
        GPUs, more processes on a machine than GPUs, an MPS device, a torch
        without ``torch.distributed`` or NCCL.
    """
    world_size = launched_world_size()
    if world_size <= 1 and (backend or "auto") == "auto":
        yield Ranks(), device  # the one-process run, untouched
        return
    resolved, backend = _launch_device(device, backend, world_size)
    if world_size <= 1:
        yield Ranks(), device
        return
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    torch.distributed.init_process_group(backend)
    try:
        yield Ranks.current(), resolved
    finally:
        torch.distributed.destroy_process_group()
