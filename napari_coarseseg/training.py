"""What every training method shares: configuration, presets, devices, events.

Training is a generator of :class:`TrainingEvent`: the caller (a terminal
progress bar, a napari thread worker, a benchmark) pulls events and decides
what to show; closing the generator cancels training. The trained
:class:`~napari_coarseseg.model_io.Model` is the generator's return value
(``StopIteration.value``; napari's ``thread_worker`` emits it as
``returned``). The loop that makes these events is
:class:`napari_coarseseg.methods.TrainingLoop`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .data import check_normalisation

__all__ = [
    "TrainingConfig",
    "TrainingEvent",
    "load_preset",
    "list_presets",
    "resolve_config",
    "select_device",
    "describe_device",
    "run_to_end",
    "random_seed",
    "seed_everything",
    "models_dir",
    "NETWORKS",
]

#: The networks a refineseg run can train (``TrainingConfig.network``), as model cards name them.
NETWORKS = ("unet", "unet3d")

#: The largest refineseg prior strength (``TrainingConfig.prior_strength``, ``--prior-strength``, a card's
#: ``prior.strength``): the exponent tau of the class-prior correction. The automatic rule picks at most 3
#: (``refineseg.STRENGTH_MAX``); beyond about 10 the correction only flips the pixels near p = 0.5, and the
#: prior ratio ** tau overflows float probabilities toward NaN or 0. Here, not in the method, so that the
#: configuration checks it without importing the methods; :mod:`~napari_coarseseg.methods.refineseg` exports it.
PRIOR_STRENGTH_MAX = 10.0

# The network's sizes a run may ask for; a model file beyond them is refused as damaged (model_io's card checks).
#: Neighbouring slices on either side (the input is 2k + 1 slices): 32 means 65 slices, far beyond the few that
#: carry information across anisotropic sections (the presets use 0-2).
MAX_SLICE_CONTEXT = 32
#: U-Net width of the first level: 16 is the default, 32 the paper's preset, and 256 already means about
#: 100 M parameters at depth 4 (each level doubles the width).
MAX_BASE_CHANNELS = 256
#: Down-sampling steps: 4 is the default; 2**8 = 256 px of down-sampling is beyond any patch the package trains on.
MAX_DEPTH = 8
#: Block size the network averages its input over (``TrainingConfig.downsample``): 8 turns a 512 px slice into 64 px,
#: about the coarsest grid on which a structure of a few pixels still exists.
MAX_DOWNSAMPLE = 8

#: Augmentations of a training batch (``TrainingConfig.augmentation``; :func:`~napari_coarseseg.data.augment`).
AUGMENTATIONS = ("dihedral", "affine")
#: How strokes become denser targets before training (``TrainingConfig.propagation``;
#: :mod:`~napari_coarseseg.propagation`).
PROPAGATIONS = ("none", "random walker")


@dataclass
class TrainingConfig:
    """Hyper-parameters of a training run (defaults: the ``refineseg`` preset).

    Attributes
    ----------
    steps : int
        Optimiser steps (refineseg) or steps per iteration (recursive).
    iterations : int
        Recursive method: number of recursive approximation iterations K.
    batch_size, patch_size : int
        Patches per step and their side in pixels.
    learning_rate, weight_decay : float
        AdamW settings; the learning rate follows a one-cycle schedule.
    base_channels, depth : int
        U-Net width and number of down-sampling steps.
    alpha, beta, regulariser_weight : float
        Refineseg loss weights (eq. 2-8).
    diagonal_bias : float
        Initial diagonal logit of the transition heads.
    regulariser_on : str
        Refineseg: where the heads are pulled towards the identity:
        ``"all pixels"`` (the paper's eq. 7: positive layers' heads, mean
        over every pixel) or ``"drawn pixels"`` (every head, negative ones
        too, mean over the pixels its layer marks).
    transition_heads : str
        Refineseg: which drawing layers get a learned transition head.
        ``"all"`` (the paper: every positive and negative layer),
        ``"positive"`` (negative layers' heads held at the identity: a "not
        k" stroke then always speaks about p itself) or ``"none"`` (every
        head held at the identity, which leaves a partial cross-entropy +
        Dice on the drawn pixels: the no-heads control the heads must beat).
    prior_strength : float or "auto"
        Refineseg: exponent ``tau`` of the class-prior correction at
        prediction (:func:`~napari_coarseseg.methods.refineseg.adjust_to_prior`;
        1: the Bayes rule); ``"auto"`` sets it from the width of the undrawn
        band between object and background strokes
        (:func:`~napari_coarseseg.methods.refineseg.prior_strength_for_gap`).
        The number used is stored in the model card.
    smoothness_weight, smoothness_sigma, smoothness_blur : float
        Refineseg: weight of the edge-aware smoothness term on every pixel of
        the patch (:func:`~napari_coarseseg.losses.edge_aware_smoothness`; 0:
        off), its intensity scale in units of the normalised image, and the
        Gaussian blur (px) of the image its pair weights are computed on.
    undrawn_weight : float
        Refineseg: weight of the term that takes the pixels no drawing marks
        as weak background (:func:`~napari_coarseseg.losses.undrawn_background_loss`;
        0: off). It teaches the network the class prior that strokes hide,
        in place of the prior correction: live sessions use it with
        ``prior_strength`` 0 (:data:`~napari_coarseseg.methods.refineseg.LIVE_SETTINGS`).
    drawn_fraction : float
        Fraction of patches centred on a drawn pixel.
    jitter : float
        Intensity jitter amplitude of the augmentation.
    evolution_every : int
        Refineseg: yield masks on the training images every this many steps
        (0: only at the end).
    task_levels : int
        Recursive method: how many of the last decoder levels are multi-task
        blocks.
    epsilon_train, epsilon_predict : float
        Recursive method: level-set growth speed during training and for the
        final growth at prediction.
    task_weights : dict
        Recursive method: loss weight of each task.
    checkpoint_every : int
        With a checkpoint file, write it every this many steps (and at the
        end of every recursive iteration): a killed run loses at most this many.
    certain_pixels : bool
        Recursive method: T1 also learns the certain pixels of the images
        that carry only partial masks (object inside the partial regions,
        background farther from every region than objects reach on the
        exactly masked images); see ``RecursiveMasks.certain_target``.
    prediction_gate : float
        Recursive method: at prediction, T1's foreground counts only within
        this many pixels of T2's regions (``final_growth``); stored in the
        model card.
    prediction_seed_level : float
        Recursive method: at prediction, T2's regions grow from their cores,
        the pixels where T2's object probability is at least this fraction
        of the region's highest (0: the whole region), so that touching
        objects whose T2 regions join are two seeds; stored in the model card.
    slice_context : int
        Stacks: the slices above and below each plane the network also sees,
        as extra input channels (2.5-D; :func:`~napari_coarseseg.data.with_slice_context`):
        0 is slice-wise 2-D, k gives ``C * (2k + 1)`` input channels, the
        ends of a stack repeating its edge slice. Drawings still supervise
        their own slice only. Stored in the model card; prediction builds
        the same context.
    network : {"unet", "unet3d"}
        Refineseg: the 2-D U-Net (slice-wise, or 2.5-D with a slice
        context), or the anisotropic 3-D encoder over the slab of ``2k + 1``
        slices that a slice context of k >= 1 gives
        (:class:`~napari_coarseseg.networks.SlabUNet`). Stored in the model
        card.
    normalisation : {"image", "slice"}
        What the intensities are normalised over: the whole image
        ("image", the default) or each slice of a stack on its own ("slice":
        serial sections whose brightness drifts from slice to slice;
        :data:`~napari_coarseseg.data.NORMALISATIONS`). Stored in the model
        card; prediction normalises the same way.
    downsample : int
        Refineseg: the network works at 1 / ``downsample`` of the image's
        resolution (:class:`~napari_coarseseg.networks.UNet`): for objects
        that are large in pixels, whose shape and surroundings decide (a heart
        in an MRI slice), a patch of ``patch_size`` px then costs as much as
        one of ``patch_size / downsample``. Stored in the model card.
    augmentation : {"dihedral", "affine"}
        "dihedral" (default): each patch takes one of the 8 flips and
        quarter turns of the square, for images with no up, down, left or
        right (cells, tissue). "affine": rotations up to 20 degrees, scaling
        by up to 15 % and gamma, no flips, for images whose orientation
        means something (anatomy in a standard view: the right ventricle is
        on the left of a short-axis slice). Both add the intensity ``jitter``.
    propagation : {"none", "random walker"}
        Refineseg: "random walker" adds one drawing layer made from the
        strokes: on every plane holding both object and background strokes,
        each pixel of the strokes' bounding box gets the class of the
        stroke a random walker from it most likely reaches first
        (:func:`~napari_coarseseg.propagation.propagate_strokes`), so that
        the network learns from whole regions rather than lines. For sparse
        scribbles; drawings that already cover objects gain nothing.
    """

    steps: int = 300
    iterations: int = 10
    batch_size: int = 12
    patch_size: int = 96
    learning_rate: float = 1e-3
    weight_decay: float = 2e-5
    base_channels: int = 16
    depth: int = 4
    alpha: float = 0.6
    beta: float = 0.4
    regulariser_weight: float = 0.2
    diagonal_bias: float = 4.0
    regulariser_on: str = "all pixels"
    transition_heads: str = "all"
    prior_strength: float | str = "auto"
    smoothness_weight: float = 0.0
    smoothness_sigma: float = 0.5
    smoothness_blur: float = 0.0
    undrawn_weight: float = 0.0
    drawn_fraction: float = 0.7
    jitter: float = 0.1
    evolution_every: int = 50
    task_levels: int = 2
    epsilon_train: float = 0.2
    epsilon_predict: float = 1.0
    task_weights: dict = field(default_factory=lambda: {"strong": 1.0, "partial": 1.0, "separation": 0.5})
    certain_pixels: bool = False
    prediction_gate: float = 4.0
    prediction_seed_level: float = 0.0
    slice_context: int = 0
    network: str = "unet"
    normalisation: str = "image"
    downsample: int = 1
    augmentation: str = "dihedral"
    propagation: str = "none"
    checkpoint_every: int = 50

    def replace(self, **changes) -> "TrainingConfig":
        """A copy with some fields changed; ``None`` values are ignored."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; known: {sorted(known)}")
        values = asdict(self)
        values.update({k: v for k, v in changes.items() if v is not None})
        return TrainingConfig(**values)

    def validate(self) -> "TrainingConfig":
        for name in ("steps", "iterations", "batch_size", "base_channels", "depth", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (isinstance(self.downsample, int) and not isinstance(self.downsample, bool)
                and 1 <= self.downsample <= MAX_DOWNSAMPLE):
            raise ValueError(f"downsample must be a whole number from 1 to {MAX_DOWNSAMPLE}, got {self.downsample!r}")
        divisor = 2**self.depth * self.downsample
        if self.patch_size < divisor or self.patch_size % divisor:
            raise ValueError(f"patch_size {self.patch_size} must be a multiple of 2**depth * downsample = {divisor}")
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {', '.join(map(repr, AUGMENTATIONS))}, "
                             f"got {self.augmentation!r}")
        if self.propagation not in PROPAGATIONS:
            raise ValueError(f"propagation must be one of {', '.join(map(repr, PROPAGATIONS))}, "
                             f"got {self.propagation!r}")
        if self.prior_strength != "auto" and not (isinstance(self.prior_strength, (int, float))
                                                  and not isinstance(self.prior_strength, bool)
                                                  and 0 <= self.prior_strength <= PRIOR_STRENGTH_MAX):
            raise ValueError(f"prior_strength must be 'auto' or a number from 0 to {PRIOR_STRENGTH_MAX:g} (the "
                             f"exponent of the class-prior correction; 1 is Bayes' rule), got {self.prior_strength!r}")
        # A model is refused on loading beyond these sizes: refuse the run rather than train it.
        for name, top in (("base_channels", MAX_BASE_CHANNELS), ("depth", MAX_DEPTH),
                          ("slice_context", MAX_SLICE_CONTEXT)):
            if isinstance(getattr(self, name), int) and getattr(self, name) > top:
                raise ValueError(f"{name} must be at most {top} (a model file beyond it is refused as damaged), "
                                 f"got {getattr(self, name)}")
        if not (self.smoothness_weight >= 0 and self.smoothness_sigma > 0 and self.smoothness_blur >= 0):
            raise ValueError(f"smoothness_weight and smoothness_blur must be >= 0 and smoothness_sigma > 0, got "
                             f"{self.smoothness_weight}, {self.smoothness_blur} and {self.smoothness_sigma}")
        if not self.undrawn_weight >= 0:
            raise ValueError(f"undrawn_weight must be >= 0 (0: off), got {self.undrawn_weight}")
        if not isinstance(self.slice_context, int) or isinstance(self.slice_context, bool) or self.slice_context < 0:
            raise ValueError(f"slice_context must be a whole number >= 0 (slices on either side), "
                             f"got {self.slice_context!r}")
        if self.network not in NETWORKS:
            raise ValueError(f"network must be one of {', '.join(NETWORKS)}, got {self.network!r}")
        if self.network == "unet3d" and self.slice_context < 1:
            raise ValueError("network 'unet3d' works on the slab of 2k + 1 slices around each slice: give a "
                             "slice_context k >= 1")
        check_normalisation(self.normalisation)
        if not 0 <= self.drawn_fraction <= 1:
            raise ValueError(f"drawn_fraction must be in [0, 1], got {self.drawn_fraction}")
        if not self.prediction_gate >= 0:
            raise ValueError(f"prediction_gate must be >= 0 pixels (inf: no gate), got {self.prediction_gate}")
        if self.transition_heads not in ("all", "positive", "none"):
            raise ValueError(f"transition_heads must be 'all', 'positive' or 'none', got {self.transition_heads!r}")
        if self.regulariser_on not in ("all pixels", "drawn pixels"):
            raise ValueError(f"regulariser_on must be 'all pixels' or 'drawn pixels', got {self.regulariser_on!r}")
        return self


@dataclass
class TrainingEvent:
    """Progress of a training run.

    Attributes
    ----------
    step, total_steps : int
        Optimiser steps done and planned.
    losses : dict of str to float
        Loss terms of the last step.
    elapsed : float
        Seconds since training started.
    iteration : int
        Index of the evolution plane ``masks`` belongs to (recursive: the
        approximation iteration; refineseg: the checkpoint number).
    masks : list of ndarray, optional
        Current masks on each training image (labels 0..K), present every
        ``evolution_every`` steps (refineseg) or after every iteration
        (recursive).
    message : str
        Short human-readable status.
    """

    step: int
    total_steps: int
    losses: dict
    elapsed: float
    iteration: int = 0
    masks: list | None = None
    message: str = ""


def models_dir() -> Path:
    """Folder of the presets and shipped models: the repository's ``models/`` or its installed copy."""
    source_tree = Path(__file__).resolve().parent.parent / "models"
    if (source_tree / "refineseg.json").is_file():
        return source_tree
    return Path(str(resources.files("napari_coarseseg") / "models"))


def _preset_method(path: Path) -> str | None:
    return json.loads(path.read_text()).get("method")


def list_presets(method: str | None = None) -> list[str]:
    """Names of the presets shipped in ``models/``; with ``method``, those of that method only."""
    paths = sorted(models_dir().glob("*.json"), key=lambda p: p.stem)
    return [p.stem for p in paths if method is None or _preset_method(p) == method]


def load_preset(name: str) -> TrainingConfig:
    """Load a preset from ``models/`` by name (e.g. ``"refineseg"``) or from a JSON path.

    Examples
    --------
    >>> load_preset("refineseg").steps
    500
    """
    path = Path(name)
    if not path.is_file():
        path = models_dir() / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    # A preset file is the user's: each way it can be wrong says so in one line naming it.
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"preset {str(path)!r} is not valid JSON ({error.msg} at line {error.lineno}, column "
                         f"{error.colno}); fix it, or name a shipped preset: {', '.join(list_presets())}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read preset {str(path)!r} ({error}); name a shipped preset: "
                         f"{', '.join(list_presets())}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"preset {str(path)!r} must hold a JSON object of settings ({{\"steps\": 300, ...}}), not "
                         f"a {type(settings).__name__}")
    settings.pop("description", None)
    settings.pop("method", None)
    try:
        return TrainingConfig().replace(**settings).validate()
    except (TypeError, ValueError) as error:
        raise ValueError(f"preset {str(path)!r}: {error}") from None


def resolve_config(config: TrainingConfig | str | None, preset: str, overrides: dict) -> TrainingConfig:
    """The settings of a run: ``config`` (settings, a preset name, or None for ``preset``) with ``overrides``."""
    if config is None or isinstance(config, str):
        config = load_preset(config or preset)
    return config.replace(**overrides).validate()


def select_device(device: str | torch.device = "auto") -> torch.device:
    """Resolve ``"auto"`` to CUDA, then Apple MPS, then CPU; check explicit requests."""
    if isinstance(device, torch.device):
        return device
    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' was requested but Apple MPS is not available; use cpu or auto")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or mps")
    return torch.device(device)


def describe_device(device: torch.device) -> str:
    """A short human description, e.g. ``"CUDA: NVIDIA H100"`` or ``"CPU, 2 threads"``."""
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "Apple MPS"
    n = torch.get_num_threads()
    return f"CPU, {n} thread{'' if n == 1 else 's'}"


def random_seed() -> int:
    """A fresh seed from the operating system's entropy (what ``seed=None`` means), in ``[0, 2**31)``."""
    return int(np.random.SeedSequence().entropy % 2**31)


def seed_everything(seed: int | None) -> tuple[np.random.Generator, torch.Generator]:
    """Seed torch with ``seed`` and return NumPy and torch generators for data sampling, seeded ``seed``.

    Torch's global generator initialises the networks; the two returned
    generators draw the patches and their augmentation. ``None``: a
    :func:`random_seed`. In data-parallel training
    (:mod:`napari_coarseseg.data_parallel`) every process passes the same
    seed (rank 0's random one for ``None``), so that all draw the same
    batches and each keeps its own rows of them.
    """
    seed = random_seed() if seed is None else int(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed), torch.Generator().manual_seed(seed)


def autocast(device: torch.device):
    """Mixed precision (bfloat16) on CUDA, a no-op elsewhere."""
    # float16 would need a gradient scaler; GPUs without bfloat16 run in float32.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type if device.type != "mps" else "cpu", enabled=False)


#: Train and predict in channels-last memory format on CPU and CUDA. Results differ by float
#: rounding only; ``benchmarks/speed.py`` turns it off to measure the contiguous format beside it.
CHANNELS_LAST = True


def use_channels_last(module: torch.nn.Module, device: torch.device, on: bool = True) -> torch.nn.Module:
    """Channels-last weights on CPU and CUDA (faster convolutions), back to the default with ``on=False``.

    ``benchmarks/speed.py`` measures both formats. Saved weights do not
    depend on it (``state_dict`` gives the same values).
    """
    if device.type in ("cpu", "cuda"):
        channels_last = on and CHANNELS_LAST
        # Per convolution: Module.to(memory_format=...) refuses the 5-D weights of a 3-D one (SlabUNet).
        formats = {4: torch.channels_last, 5: torch.channels_last_3d} if channels_last else {}
        for layer in module.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Conv3d)):
                layer.to(memory_format=formats.get(layer.weight.dim(), torch.contiguous_format))
    return module


def release_device_memory(device: torch.device) -> None:
    """Give cached GPU memory back to the driver after training."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_to_end(generator, callback=None):
    """Exhaust a training generator, calling ``callback(event)``; return its model."""
    while True:
        try:
            event = next(generator)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(event)

