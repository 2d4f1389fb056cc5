"""Refineseg: learn a segmentation network from positive and negative coarse drawings.

METHODS.md A: every drawing layer is an annotation strategy with its own
per-pixel transition head; the network's softmax ``p`` is pushed through the
head (``q = A p``) before it meets the drawing, so the heads can absorb
systematic drawing errors while ``p`` learns the true classes.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from .annotations import (
    AnnotationError,
    background_target,
    is_rgb,
    label_dtype,
    negative_target,
    positive_target,
    validate_drawing,
    validate_image,
)
from .checkpoint import RunCheckpoint
from .data import PatchSampler, augment, normalize, to_planes, to_slices
from .inference import adjust_to_prior, estimate_class_prior, predict_planes
from .losses import refineseg_loss
from .model_io import Model, make_card
from .networks import TransitionHead, UNet
from .training import (
    TrainingConfig,
    TrainingEvent,
    autocast,
    describe_device,
    load_preset,
    release_device_memory,
    seed_everything,
    select_device,
    use_channels_last,
)

__all__ = ["train_refineseg", "prepare_inputs", "TrainingInputs"]


def _per_image(layers, n_images: int, role: str) -> list[list]:
    """Normalise drawing arguments to ``strategies[s][image]`` (``None`` = no drawing)."""
    if layers is None:
        return []
    if isinstance(layers, np.ndarray):
        layers = [layers]
    strategies = []
    for layer in layers:
        per_image = [layer] if n_images == 1 and not isinstance(layer, (list, tuple)) else list(layer)
        if len(per_image) != n_images:
            raise AnnotationError(
                f"a {role} drawing gives {len(per_image)} arrays for {n_images} images; "
                "give one array per image (None where an image has no drawing)."
            )
        strategies.append(per_image)
    return strategies


class TrainingInputs:
    """Validated, normalised images and per-strategy targets, slice by slice.

    Attributes
    ----------
    planes : list of ndarray
        (C, Y, X) normalised planes, the slices of all images in order.
    plane_of_image : list of list of int
        Indices into ``planes`` of each image's slices.
    positive_targets, negative_targets : list of list of ndarray
        ``targets[s][plane]``: -1 = not drawn, else a class.
    positive_names, negative_names : list of str
        Strategy names (for the card).
    """

    def __init__(self, images, positive=(), negative=(), background=(), n_classes=None, rgb=None, names=None):
        if isinstance(images, np.ndarray) or not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise AnnotationError("no training image was given")
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        images = [validate_image(im, name, rgb) for im, name in zip(images, names)]
        self.rgb = is_rgb(images[0]) if rgb is None else bool(rgb)
        self.channels = images[0].shape[-1] if self.rgb else 1
        for im, name in zip(images, names):
            channels = im.shape[-1] if self.rgb else 1
            if channels != self.channels:
                raise AnnotationError(f"{name} has {channels} channels, {names[0]} has {self.channels}; "
                                      "all training images need the same channels.")
        n = len(images)
        raw = {
            "positive": _per_image(positive, n, "positive"),
            "negative": _per_image(negative, n, "negative"),
            "background": _per_image(background, n, "background"),
        }
        if not raw["positive"] and not raw["background"]:
            raise AnnotationError(
                "no positive drawing was given: draw inside objects in a positive layer "
                "(value k for class k) before training."
            )
        validated = {}
        for role, strategies in raw.items():
            validated[role] = []
            for s, per_image in enumerate(strategies):
                checked = []
                for im, name, drawing in zip(images, names, per_image):
                    shape = im.shape[:-1] if self.rgb else im.shape
                    if drawing is None:
                        checked.append(np.zeros(shape, dtype=np.int64))
                        continue
                    try:
                        checked.append(validate_drawing(drawing, shape, f"{role} {s + 1} of {name}", role))
                    except AnnotationError as error:
                        # An empty drawing on one image is fine if the layer
                        # has marks on another image.
                        if "is empty" not in str(error):
                            raise
                        checked.append(np.zeros(shape, dtype=np.int64))
                if not any(d.any() for d in checked):
                    raise AnnotationError(
                        f"{role} drawing {s + 1} is empty on every image; paint some pixels or remove it."
                    )
                validated[role].append(checked)

        drawn_k = max([int(d.max()) for role in ("positive", "negative") for st in validated[role] for d in st],
                      default=0)
        self.n_classes = int(n_classes) if n_classes is not None else max(drawn_k, 1)
        if drawn_k > self.n_classes:
            raise AnnotationError(
                f"a drawing holds class {drawn_k} but n_classes is {self.n_classes}; "
                "raise n_classes or fix the drawing."
            )
        if not any(d.any() for st in validated["positive"] for d in st) and not validated["background"]:
            raise AnnotationError("the positive drawings are empty: paint inside some objects.")
        positive_classes = np.unique(np.concatenate([np.unique(d) for st in validated["positive"] for d in st]))
        positive_classes = positive_classes[positive_classes > 0]
        if len(positive_classes) == 1 and not validated["negative"] and not validated["background"]:
            k = int(positive_classes[0])
            raise AnnotationError(
                f"only class {k} is drawn: nothing tells the network what is not class {k}, so it would call "
                f"everything class {k}. Add a negative drawing ('not class {k}') or background marks."
            )

        self.planes, self.plane_of_image, self.image_shapes = [], [], []
        for im in images:
            start = len(self.planes)
            self.planes.extend(to_planes(normalize(im, rgb=self.rgb), self.rgb))
            self.plane_of_image.append(list(range(start, len(self.planes))))
            self.image_shapes.append(tuple(im.shape[:-1] if self.rgb else im.shape))

        def planes_of(strategy, make_target):
            return [t for d in strategy for t in to_slices(make_target(d), d.ndim)]

        self.positive_targets = [planes_of(st, positive_target) for st in validated["positive"]] + [
            planes_of(st, background_target) for st in validated["background"]
        ]
        self.negative_targets = [planes_of(st, negative_target) for st in validated["negative"]]
        self.positive_names = [f"positive {i + 1}" for i in range(len(validated["positive"]))] + [
            f"background {i + 1}" for i in range(len(validated["background"]))
        ]
        self.negative_names = [f"negative {i + 1}" for i in range(len(validated["negative"]))]

    def training_prior(self) -> np.ndarray:
        """Class prior implied by the loss: every drawing layer weighs the same.

        A positive layer spreads its unit weight over the classes it marks in
        proportion to their drawn pixels; a negative "not k" layer spreads its
        weight evenly over the other classes.
        """
        n_labels = self.n_classes + 1
        prior = np.zeros(n_labels)
        for strategy in self.positive_targets:
            counts = sum(np.bincount(t[t >= 0], minlength=n_labels) for t in strategy)
            prior += counts / max(counts.sum(), 1)
        for strategy in self.negative_targets:
            counts = sum(np.bincount(t[t >= 0], minlength=n_labels) for t in strategy)
            counts = counts / max(counts.sum(), 1)
            # "not k" supports each of the other L - 1 classes equally.
            prior += (counts.sum() - counts) / max(n_labels - 1, 1)
        prior = np.clip(prior, 1e-3, None)
        return prior / prior.sum()

    def drawn_masks(self) -> list[np.ndarray]:
        """The positive drawings as a label mask per image (iteration 0 of the evolution).

        Where layers overlap, the first layer wins; undrawn pixels are 0.
        """
        merged = []
        for plane in range(len(self.planes)):
            labels = np.full(self.planes[plane].shape[1:], -1, dtype=np.int64)
            for strategy in self.positive_targets:
                labels = np.where(labels < 0, strategy[plane], labels)
            merged.append(np.clip(labels, 0, None).astype(label_dtype(self.n_classes)))
        return self.masks_per_image(merged)

    def masks_per_image(self, plane_labels: list[np.ndarray]) -> list[np.ndarray]:
        """Regroup per-plane label arrays into one array per image."""
        out = []
        for planes, shape in zip(self.plane_of_image, self.image_shapes):
            stacked = np.stack([plane_labels[i] for i in planes])
            out.append(stacked[0] if len(shape) == 2 else stacked)
        return out


def prepare_inputs(images, positive=(), negative=(), background=(), n_classes=None, rgb=None, names=None):
    """Validate and normalise training inputs (see :class:`TrainingInputs`)."""
    return TrainingInputs(images, positive, negative, background, n_classes, rgb, names)


def train_refineseg(
    images,
    positive=(),
    negative=(),
    background=(),
    *,
    config: TrainingConfig | str | None = None,
    n_classes: int | None = None,
    seed: int | None = 0,
    device="auto",
    rgb: bool | None = None,
    names=None,
    checkpoint=None,
    resume: bool = False,
    **overrides,
):
    """Train a network from coarse drawings; a generator of :class:`TrainingEvent`.

    Parameters
    ----------
    images : ndarray or list of ndarray
        Training images: (Y, X), (Z, Y, X) stacks or (Y, X, C) colour.
    positive : list
        Positive drawing layers (0 = not drawn, k = class k). For one image,
        a list of arrays; for several, a list of per-image lists (``None``
        where an image has no drawing). Each layer gets its own head.
    negative : list
        Negative drawing layers (0 = not drawn, k = "not class k").
    background : list
        Background drawing layers (non-zero = background).
    config : TrainingConfig or str, optional
        Settings or a preset name; default the ``refineseg`` preset.
    n_classes : int, optional
        Number of object classes K; default the largest drawn value.
    seed : int, optional
        Seed of initialisation, sampling and augmentation.
    device : str
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"mps"``.
    rgb : bool, optional
        Whether the last axis holds colour channels (guessed when omitted).
    names : list of str, optional
        Image names used in messages.
    checkpoint : str or Path, optional
        A checkpoint file written atomically every ``checkpoint_every`` steps
        (:mod:`napari_coarseseg.checkpoint`).
    resume : bool
        Continue from ``checkpoint`` (same inputs, settings and seed);
        the run then matches an uninterrupted one.
    **overrides
        Any :class:`TrainingConfig` field, e.g. ``steps=200``.

    Yields
    ------
    TrainingEvent
        After every step; every ``evolution_every`` steps and at the end the
        event carries the current masks on the training images. A resumed
        run starts with an event at the step it resumes from.

    Returns
    -------
    Model
        The trained model (the generator's return value).

    Examples
    --------
    >>> from napari_coarseseg import run_to_end, train_refineseg
    >>> model = run_to_end(train_refineseg(image, [positive], [negative], steps=50))  # doctest: +SKIP
    """
    if config is None or isinstance(config, str):
        config = load_preset(config or "refineseg")
    config = config.replace(**overrides).validate()
    inputs = prepare_inputs(images, positive, negative, background, n_classes, rgb, names)
    device = select_device(device)
    rng, torch_rng = seed_everything(seed)

    n_labels = inputs.n_classes + 1
    network = UNet(inputs.channels, n_labels, config.base_channels, config.depth).to(device)
    n_positive, n_negative = len(inputs.positive_targets), len(inputs.negative_targets)
    heads = nn.ModuleList(
        [TransitionHead(config.base_channels, n_labels, config.diagonal_bias) for _ in range(n_positive + n_negative)]
    ).to(device)
    network = use_channels_last(network, device)
    sampler = PatchSampler(
        inputs.planes, inputs.positive_targets + inputs.negative_targets, config.patch_size,
        config.drawn_fraction, rng,
    )
    parameters = list(network.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.steps, pct_start=0.15
    )

    training_prior = inputs.training_prior()
    estimated_prior = training_prior

    def current_masks():
        # Masks as `predict` will give them: prior-corrected argmax.
        nonlocal estimated_prior
        probabilities, _ = predict_planes(network, inputs.planes, device)
        estimated_prior = estimate_class_prior(probabilities, training_prior)
        return inputs.masks_per_image(
            [adjust_to_prior(p, estimated_prior, training_prior).argmax(0).astype(np.uint8) for p in probabilities]
        )

    run = RunCheckpoint(checkpoint, config.checkpoint_every, "refineseg", config, seed,
                        [*inputs.planes, *(t for strategy in inputs.positive_targets + inputs.negative_targets
                                           for t in strategy)],
                        modules={"network": network, "heads": heads}, optimizer=optimizer, schedule=schedule,
                        rng=rng, torch_rng=torch_rng)
    first_step, plane = 1, 0
    if resume:
        restored = run.resume()
        first_step, plane = run.step + 1, restored["state"].get("plane", 0)

    start = time.perf_counter()
    losses = {}
    try:
        if first_step == 1:
            yield TrainingEvent(0, config.steps, {}, 0.0, iteration=0, masks=inputs.drawn_masks(),
                                message=f"training on {describe_device(device)}")
        else:
            yield TrainingEvent(run.step, config.steps, {}, 0.0, iteration=plane,
                                message=f"resumed at step {run.step}/{config.steps}")
        network.train()
        heads.train()
        for step in range(first_step, config.steps + 1):
            batch_images, batch_targets = sampler.batch(config.batch_size)
            batch_images, batch_targets = augment(
                torch.from_numpy(batch_images), torch.from_numpy(batch_targets), torch_rng, config.jitter
            )
            batch_images = batch_images.to(device, non_blocking=True)
            batch_targets = batch_targets.to(device, non_blocking=True)
            with autocast(device):
                logits, features = network(batch_images)
                transitions = [head(features) for head in heads]
            # The losses take logs of probabilities: compute them in float32.
            probabilities = torch.softmax(logits.float(), dim=1)
            transitions = [a.float() for a in transitions]
            terms = refineseg_loss(
                probabilities,
                transitions[:n_positive],
                list(batch_targets[:n_positive]),
                transitions[n_positive:],
                list(batch_targets[n_positive:]),
                config.alpha,
                config.beta,
                config.regulariser_weight,
            )
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            schedule.step()
            losses = {name: float(value.detach()) for name, value in terms.items()}
            if not np.isfinite(losses["total"]):
                raise FloatingPointError(
                    f"training diverged at step {step} (loss {losses['total']}); lower the learning rate"
                )
            masks = None
            if step == config.steps or (config.evolution_every and step % config.evolution_every == 0):
                plane += 1
                masks = current_masks()
            run.maybe_save(step, {"plane": plane}, force=step == config.steps)
            yield TrainingEvent(step, config.steps, losses, time.perf_counter() - start,
                                iteration=plane, masks=masks, message=f"step {step}/{config.steps}")
    finally:
        use_channels_last(network, device, on=False)
        network.cpu()
        heads.cpu()
        release_device_memory(device)

    card = make_card(
        "refineseg",
        inputs.n_classes,
        inputs.channels,
        inputs.rgb,
        {"kind": "unet", "base_channels": config.base_channels, "depth": config.depth, "n_heads": len(heads)},
        heads=inputs.positive_names + inputs.negative_names,
        prior={"training": training_prior.tolist(), "estimated": estimated_prior.tolist()},
        patch_size=config.patch_size,
        training={
            "steps": config.steps,
            "seed": seed,
            "seconds": round(time.perf_counter() - start, 2),
            "device": describe_device(device),
            "final_losses": losses,
            "image_shapes": [list(s) for s in inputs.image_shapes],
            "config": {k: v for k, v in vars(config).items()},
        },
    )
    return Model(network, heads, card).eval()
