"""One training loop for every method: the phases they share, in one place.

A run goes through the same phases whatever the method:

1. the images (:class:`~napari_coarseseg.data.TrainingImages`) and the
   method's targets, one per drawing strategy and plane;
2. device and seeds;
3. the method's modules on the device, the network in channels-last format;
4. the patch sampler over the targets;
5. AdamW over every module with a one-cycle schedule over all steps;
   with several processes (:mod:`napari_coarseseg.data_parallel`), one DDP over
   every module averages their gradients, each process on its own
   ``batch_size / N`` rows of the batch that every process draws alike;
6. checkpoint and resume (:class:`~napari_coarseseg.checkpoint.RunCheckpoint`);
7. the start event, then one event per optimiser step;
8. teardown (modules back on the CPU, GPU memory released), also when the
   run is cancelled or fails;
9. the model and its card.

A method subclasses :class:`TrainingLoop` and supplies only what is its own:
its modules, its targets, its batch, its loss terms and the masks of its
evolution (plus its card fields). This follows MONAI's engines: one loop,
a method overrides a step.

Guarantee (the protocol of every ``train_*`` function): the run is a
generator of :class:`~napari_coarseseg.training.TrainingEvent`, one at the
start and one after every optimiser step; closing it cancels the run before
the next step; the trained model is its return value. On the same device and
thread count, a run resumed from its checkpoint ends with the same weights,
bit for bit, as an uninterrupted one; with several processes, resumed on as
many processes.
"""

from __future__ import annotations

import time
from collections.abc import Generator

import numpy as np
import torch
from torch import nn

from ..checkpoint import RunCheckpoint
from ..data import PatchSampler, TrainingImages, augment
from ..data_parallel import Ranks
from ..inference import predict_planes, softmax_maps
from ..model_io import Model, make_card
from ..resources import check_free_space, check_memory
from ..training import (
    NETWORKS,
    TrainingConfig,
    TrainingEvent,
    autocast,
    describe_device,
    random_seed,
    release_device_memory,
    seed_everything,
    select_device,
    use_channels_last,
)

__all__ = ["TrainingLoop", "TrainingRun"]

#: What every ``train_*`` function returns: events out, the model as the return value.
TrainingRun = Generator[TrainingEvent, None, Model]


def _check_memory(loop: "TrainingLoop", batch_size: int) -> None:
    """Refuse a run whose step cannot fit, before anything is allocated: a class count read from a wrong file (an
    image given as a drawing) once had the kernel kill the process at 24 GB after 46 s."""
    size = loop.config.patch_size
    check_memory(loop.step_memory(batch_size), loop.device,
                 f"a training step with {loop.n_classes} class{'es' if loop.n_classes > 1 else ''} ({batch_size} "
                 f"patches of {size} x {size} px)",
                 "the class count is the drawings' largest value (do they hold classes 1..K, not image values?); "
                 "else lower the batch size or the patch size")


def _check_disk(folder, parameters, images: TrainingImages) -> None:
    """Refuse a run whose checkpoint and model cannot fit on the disk, before the first step rather than at the
    first checkpoint: a checkpoint holds the weights, AdamW's two moments and the method's per-pixel state (at most
    the images' size); the old one stays until the new one replaces it, and the model (the weights again) is
    written beside it at the end."""
    weights = sum(p.numel() * p.element_size() for p in parameters)
    needed = 2 * (3 * weights + sum(plane.nbytes for plane in images.planes)) + weights
    check_free_space(folder, needed, "the checkpoint and the model")


class TrainingLoop:
    """The shared phases of a training run; subclasses supply a method's own parts.

    Parameters
    ----------
    images : TrainingImages
        The training images.
    config : TrainingConfig
        Validated settings.
    seed : int or None
        Seed of initialisation, sampling and augmentation.
    device : str or torch.device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
    checkpoint : str or Path, optional
        Checkpoint file, written every ``config.checkpoint_every`` steps and
        whenever :meth:`checkpoint_due` says so.
    init : Model, optional
        Start from this model's weights (:meth:`start_from`); the settings
        take over its network's shape (``base_channels``, ``depth``, ...).

    Notes
    -----
    To override (a subclass sets ``method`` and ``n_classes`` before calling
    ``super().__init__``): :meth:`build_modules`, :meth:`targets`,
    :meth:`loss_terms`, :meth:`initial_masks`, :meth:`evolve`,
    :meth:`card_fields`; where the default does not fit, :meth:`batch`,
    :meth:`forward`, :attr:`total_steps`, :meth:`checkpoint_due`,
    :meth:`method_state` and :meth:`restore_method_state`. :meth:`batch`
    returns the whole batch of a step, also with several processes:
    ``rows`` (a slice) is the share of it that this process trains on.
    """

    #: The method's name, as cards and checkpoints record it.
    method = ""
    #: Floats a step holds per patch pixel and network channel, an upper bound of what was measured: 55 for the
    #: refineseg preset (386 MB above the idle process: 12 patches of 96 px, 16 channels, 2 classes).
    floats_per_pixel_channel = 64

    def __init__(self, images: TrainingImages, config: TrainingConfig, seed: int | None, device,
                 checkpoint=None, init: Model | None = None):
        if init is not None:
            network = init.card.get("network", {})
            shape = {key: value for key, value in network.items()
                     if key in ("base_channels", "depth", "task_levels", "downsample")}
            if network.get("kind") in NETWORKS:  # refineseg's 2-D or 3-D U-Net (full resolution unless it says)
                shape["network"], shape["downsample"] = network["kind"], network.get("downsample", 1)
            config = config.replace(**shape)
        # The planes the network sees carry the run's normalisation and 2.5-D slice context (a live session's
        # images come without them).
        images = images.set_normalisation(config.normalisation).set_slice_context(config.slice_context)
        self.images, self.config, self.seed = images, config, seed
        self.device = select_device(device)
        # Several processes (an initialised process group): one model; every process draws and augments the whole
        # batch of each step and trains on its own rows of it (optimise), so that they take one process's steps.
        self.ranks = Ranks.current()
        share = self.ranks.per_process(config.batch_size)
        self.rows = slice(self.ranks.rank * share, (self.ranks.rank + 1) * share)
        _check_memory(self, share)
        # The same batches on every process: the same seed (rank 0's random one when none is given).
        self.rng, self.torch_rng = seed_everything(self.ranks.broadcast(random_seed() if seed is None else seed))
        self.modules = {name: module.to(self.device) for name, module in self.build_modules().items()}
        if init is not None:
            self.start_from(init)
        self.network = use_channels_last(self.modules["network"], self.device)
        targets = self.targets()
        self.sampler = PatchSampler(images.planes, targets, config.patch_size, config.drawn_fraction, self.rng)
        parameters = [p for module in self.modules.values() for p in module.parameters()]
        self.optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=config.learning_rate,
                                                            total_steps=self.total_steps, pct_start=0.15)
        # The method's forward, through one DDP of every module when there are several processes.
        self.parallel_forward = self.ranks.parallel(self.modules, self.forward)
        # The fingerprint covers the images and every target: a checkpoint resumes only the same run.
        self.checkpoint = RunCheckpoint(checkpoint, config.checkpoint_every, self.method, config, seed,
                                        [*images.planes, *(t for strategy in targets for t in strategy)],
                                        modules=self.modules, optimizer=self.optimizer, schedule=self.schedule,
                                        rng=self.rng, torch_rng=self.torch_rng, ranks=self.ranks)
        if self.checkpoint.path is not None and self.ranks.main:
            _check_disk(self.checkpoint.path.parent, parameters, images)
        self.step = 0  # optimiser steps done
        self.plane = 0  # evolution planes shown after the drawings (TrainingEvent.iteration)

    # ------------------------------------------------------------------ a method's parts

    def step_memory(self, batch_size: int) -> int:
        """Bytes a step on ``batch_size`` patches needs at most, known before anything is built (a method with
        more per-pixel tensors, refineseg's transition matrices, adds them)."""
        config = self.config
        slab = 2 * config.slice_context + 1 if config.network == "unet3d" else 1
        per_pixel = (self.floats_per_pixel_channel * config.base_channels * slab
                     + 16 * (self.n_classes + 1) + 4 * self.images.input_channels)
        return 4 * batch_size * config.patch_size**2 * per_pixel

    def build_modules(self) -> dict[str, nn.Module]:
        """The trained modules, by name: ``"network"`` (the segmentation network) and any others."""
        raise NotImplementedError

    def targets(self) -> list[list[np.ndarray]]:
        """``targets[s][plane]``: the (Y, X) int target of strategy ``s`` (-1 where unlabelled)."""
        raise NotImplementedError

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, C, P, P) and targets (S, B, P, P) of one step: the whole batch, ``B = config.batch_size``,
        also with several processes (each keeps its ``rows`` after augmenting it: :meth:`own_batch`)."""
        return self.sampler.batch(self.config.batch_size)

    def forward(self, images: torch.Tensor):
        """The modules' outputs on a batch (runs under the device's autocast)."""
        return self.network(images)

    def loss_terms(self, outputs, targets: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms of a batch (``images``: its augmented input); ``"total"`` is the one minimised."""
        raise NotImplementedError

    def initial_masks(self) -> list[np.ndarray]:
        """Evolution plane 0, one label array per image: what the user drew."""
        raise NotImplementedError

    def evolve(self, step: int) -> tuple[list[np.ndarray] | None, str]:
        """After optimiser step ``step``: the masks of a new evolution plane (or None), and a status message."""
        raise NotImplementedError

    def card_fields(self) -> tuple[dict, dict, dict]:
        """The card's ``network`` description, the method's extra card fields and its training summary."""
        raise NotImplementedError

    @property
    def total_steps(self) -> int:
        return self.config.steps

    def checkpoint_due(self, step: int) -> bool:
        """Whether to write the checkpoint after ``step`` whatever ``checkpoint_every`` says."""
        return step == self.total_steps

    def method_state(self) -> tuple[dict, dict]:
        """JSON-able state and arrays a checkpoint must keep besides the modules and optimiser."""
        return {}, {}

    def restore_method_state(self, state: dict, arrays: dict) -> None:
        """Take back what :meth:`method_state` gave to a checkpoint."""

    # ------------------------------------------------------------------ helpers for the parts

    def preview(self, maps=softmax_maps) -> list[np.ndarray]:
        """The network's blended ``maps`` on every training plane (the network stays in training mode); every
        process previews the same network (rank 0's batch-norm statistics)."""
        self.ranks.sync_buffers(self.modules)
        return predict_planes(self.network, self.images.planes, self.device, maps)

    # ------------------------------------------------------------------ live sessions (napari_coarseseg.live)

    def take_drawings(self, layers: dict) -> None:
        """Replace the drawings by ``layers`` (role -> list of arrays), keeping weights and optimiser; then
        :meth:`retarget`. Methods without live sessions do not override it."""
        raise NotImplementedError(f"the {self.method} method has no live sessions yet")

    def live_maps(self, planes: list[np.ndarray], modules: dict | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per normalised (C, Y, X) plane: the labels ``predict`` would give now and a [0, 1] "draw here next"
        map (where a stroke would help most), from ``modules`` (default the run's own; a live session passes
        their moving average)."""
        raise NotImplementedError(f"the {self.method} method has no live sessions yet")

    def retarget(self, focus_fraction: float = 0.5) -> None:
        """Rebuild the patch sampler on :meth:`targets`; centre ``focus_fraction`` of the patches that centre on
        drawn pixels on the pixels whose target changed since the last sampler (new or erased strokes)."""
        config, old = self.config, self.sampler
        targets = self.targets()
        self.sampler = PatchSampler(self.images.planes, targets, config.patch_size, config.drawn_fraction, self.rng)
        if len(old.targets) == len(targets):
            changed = [np.any([old_strategy[i] != new_strategy[i] for old_strategy, new_strategy
                               in zip(old.unpadded_targets(), targets, strict=True)], axis=0)
                       for i in range(len(self.images.planes))]
            self.sampler.focus_on(changed, focus_fraction)

    def live_update(self, step: int) -> None:
        """What a live session does after optimiser ``step`` besides optimising (the recursive method grows its
        approximations every ``steps`` steps); nothing by default."""

    def trust_new_strokes(self) -> None:
        """Take strokes painted from now on as exact, where the method models drawing errors (a live session
        calls this at its start; methods without an error model have nothing to do)."""

    def hold_rate(self, warmup_steps: int = 20) -> None:
        """Replace the one-cycle schedule (it needs an end) by a linear warm-up to the configured rate, then
        constant: the schedule of a run that goes on until stopped."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = self.config.learning_rate
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / max(warmup_steps, 1)))

    def start_from(self, model: Model) -> None:
        """Take the weights of a trained ``model`` of the same method, classes, channels and slice context
        (a ``ValueError`` saying which differs otherwise). Its transition heads or other modules come along
        where this run has the same number of them; new ones start fresh."""
        # Cards written before slice contexts and normalisations: slice-wise 2-D, whole images.
        card = {"slice_context": 0, **model.card, "normalisation": model.normalisation}
        wanted = {"method": self.method, "n_classes": self.n_classes, "channels": self.images.channels,
                  "slice_context": self.images.slice_context, "normalisation": self.images.normalisation}
        differ = [f"{key} {card.get(key)!r} (this run: {value!r})" for key, value in wanted.items()
                  if card.get(key) != value]
        if differ:
            raise ValueError("the model to start from does not fit this run: its " + ", ".join(differ)
                             + "; pick a model trained with the same method, classes, channels, "
                             "slice_context and normalisation")
        try:
            self.modules["network"].load_state_dict(model.network.state_dict())
        except RuntimeError as error:
            raise ValueError(f"the model to start from has another network shape ({card.get('network')}); "
                             f"train with its base_channels and depth") from error
        heads = self.modules.get("heads")
        if heads is not None and len(heads) == len(model.heads):
            heads.load_state_dict(model.heads.state_dict())

    # ------------------------------------------------------------------ the loop

    def run(self, resume: bool = False) -> TrainingRun:
        """The training generator (see the module docstring); ``resume`` continues from the checkpoint."""
        if resume:
            restored = self.checkpoint.resume()
            self.step, self.plane = self.checkpoint.step, restored["state"].get("plane", 0)
            self.restore_method_state(restored["state"], restored["arrays"])
        start = time.perf_counter()
        losses = {}
        try:
            yield self._first_event()
            for module in self.modules.values():
                module.train()
            for step in range(self.step + 1, self.total_steps + 1):
                losses = self.optimise(step)
                self.step = step
                masks, message = self.evolve(step)
                self.plane += masks is not None
                state, arrays = self.method_state()
                self.checkpoint.maybe_save(step, {"plane": self.plane, **state}, arrays,
                                           force=self.checkpoint_due(step))
                yield TrainingEvent(step, self.total_steps, losses, time.perf_counter() - start,
                                    iteration=self.plane, masks=masks, message=message)
            self.ranks.sync_buffers(self.modules)  # every process returns rank 0's model
        finally:
            self.ranks.end_parallel(self.modules)
            for module in self.modules.values():
                use_channels_last(module, self.device, on=False).cpu()
            release_device_memory(self.device)
        return self.make_model(time.perf_counter() - start, losses)

    def _first_event(self) -> TrainingEvent:
        if self.step == 0:
            return TrainingEvent(0, self.total_steps, {}, 0.0, iteration=0, masks=self.initial_masks(),
                                 message=f"training on {describe_device(self.device)}")
        return TrainingEvent(self.step, self.total_steps, {}, 0.0, iteration=self.plane,
                             message=f"resumed at step {self.step}/{self.total_steps}")

    def own_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next step's batch, augmented, on the CPU: this process's ``rows`` of it (all of it with one
        process), images (b, C, P, P) and targets (S, b, P, P)."""
        images, targets = self.batch()
        images, targets = augment(torch.from_numpy(images), torch.from_numpy(targets), self.torch_rng,
                                  self.config.jitter, self.config.augmentation)
        # Every process drew and augmented the same whole batch from the same generators (one process's draws,
        # whatever the number of processes); each keeps its own share.
        return images[self.rows], targets[:, self.rows].contiguous()

    def optimise(self, step: int) -> dict[str, float]:
        """One optimiser step on a fresh batch; the loss terms as floats (``step`` names it in errors)."""
        images, targets = self.own_batch()
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        with autocast(self.device):
            outputs = self.parallel_forward(images)
        # The losses take logs of probabilities: methods compute them in float32, outside autocast.
        terms = self.loss_terms(outputs, targets, images)
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        self.optimizer.step()
        self.schedule.step()
        # Averaged over the processes: the loss of the whole batch, and every process stops at the same step.
        losses = self.ranks.average({name: float(value.detach()) for name, value in terms.items()})
        if not np.isfinite(losses["total"]):
            raise FloatingPointError(
                f"training diverged at step {step} (loss {losses['total']}); lower the learning rate"
            )
        return losses

    def make_model(self, seconds: float, losses: dict) -> Model:
        """The modules as a :class:`Model` with its card (``seconds`` of training, the last ``losses``)."""
        network, extra, summary = self.card_fields()
        card = make_card(self.method, self.n_classes, self.images.channels, self.images.rgb, network,
                         patch_size=self.config.patch_size, channel_axis=self.images.channel_axis,
                         slice_context=self.images.slice_context, normalisation=self.images.normalisation,
                         **extra,
                         training={**summary, "seed": self.seed, "seconds": round(seconds, 2),
                                   "device": describe_device(self.device), "final_losses": losses,
                                   "image_shapes": [list(s) for s in self.images.image_shapes],
                                   "config": dict(vars(self.config)), **self.ranks.card()})
        return Model(self.modules["network"], self.modules.get("heads", nn.ModuleList()), card).eval()
