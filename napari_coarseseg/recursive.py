"""Recursive approximation: partial masks that grow to the true boundaries.

METHODS.md B. A multi-task network learns T1 segmentation from exact masks on
a few images and T2 approximation from partial masks (rough inner regions of
every object) on the others. After every iteration of ``steps`` optimiser
steps, each training image's approximation regions grow towards T1's
predicted foreground by the level-set rule of :mod:`napari_coarseseg.levelset`,
and the grown regions become T2's next targets. The approximations after every
iteration are the mask evolution.

One addition to the paper (``certain_pixels``, on in the preset): T1 also
learns, on the images with partial masks only, the pixels whose class is
certain: inside a partial region (object) and farther from every region than
objects reach past their regions on the exactly masked images (background).
With a single exact tile T1 otherwise sees one tile's background only and can
call most of an unseen tile foreground; measured on the DSB folds (4 folds x 2
seeds) this takes the held-out Dice from 0.921 to 0.930 on average and the
worst run from 0.907 to 0.922 (README, ``benchmarks/recursive.py``).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from scipy.ndimage import label as connected_components

from .annotations import AnnotationError, is_rgb, label_dtype, validate_drawing, validate_image
from .checkpoint import RunCheckpoint
from .data import PatchSampler, augment, iter_normalized_planes, normalize, to_planes, to_slices
from .inference import TILE_SIZE, Prediction, _assemble, _check_image_for_model, iter_predict_planes, predict_planes
from .levelset import grow_regions, label_regions
from .losses import masked_nll
from .model_io import Model, make_card
from .multitask import MultiTaskUNet
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

__all__ = ["train_recursive", "predict_recursive", "RecursiveInputs"]

# Share of every batch drawn from the strongly labelled planes (those patches
# also train T2 where they carry partial masks), so that T1 sees its few exact
# masks in every step however many partial images there are. Measured on the
# DSB tiles: with a quarter, T1 is under-trained, over-predicts on some
# quadrants and the approximations grow into the background (held-out Dice
# 0.50 on quadrant 1); with three quarters every quadrant grows from 0.62 to
# >= 0.93 while T2 still sees every partial image often enough.
STRONG_SHARE = 0.75

# Prediction: T1's foreground counts only within this many pixels of T2's
# regions (see final_growth).
PREDICTION_GATE_PX = 4.0


def _one_per_image(layer, n_images: int, role: str) -> list:
    """``layer`` as one array (or None) per image."""
    if layer is None:
        return [None] * n_images
    if isinstance(layer, np.ndarray):
        layer = [layer]
    layer = list(layer)
    if len(layer) != n_images:
        raise AnnotationError(
            f"the {role} layer gives {len(layer)} arrays for {n_images} images; "
            "give one array per image (None where an image has none)."
        )
    return layer


class RecursiveInputs:
    """Validated images and per-plane targets of the recursive method.

    Attributes
    ----------
    planes : list of ndarray
        (C, Y, X) normalised planes (the slices of all images, in order).
    strong : list of ndarray or None
        Per plane, the exact class mask, or None where the plane has none.
    seeds, seed_classes : list
        Per plane with partial masks, the object ids of the current
        approximation and each id's class (None elsewhere).
    separation : list of ndarray or None
        Per plane, the T3 target (1 interface, 0 inside objects, -1 unknown).
    """

    def __init__(self, images, partial, strong=None, separation=None, n_classes=None, rgb=None, names=None):
        if isinstance(images, np.ndarray) or not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise AnnotationError("no training image was given")
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        images = [validate_image(im, name, rgb) for im, name in zip(images, names)]
        self.rgb = is_rgb(images[0]) if rgb is None else bool(rgb)
        self.channels = images[0].shape[-1] if self.rgb else 1
        n = len(images)
        layers = {
            "partial": _one_per_image(partial, n, "partial"),
            "strong": _one_per_image(strong, n, "strong"),
            "separation": _one_per_image(separation, n, "separation"),
        }
        for im, name in zip(images, names):
            if (im.shape[-1] if self.rgb else 1) != self.channels:
                raise AnnotationError(f"{name} and {names[0]} have different channels; "
                                      "all training images need the same channels.")
        checked = {role: [] for role in layers}
        for role, per_image in layers.items():
            for im, name, layer in zip(images, names, per_image):
                shape = im.shape[:-1] if self.rgb else im.shape
                if layer is None:
                    checked[role].append(None)
                    continue
                try:
                    checked[role].append(validate_drawing(layer, shape, f"{role} of {name}", role))
                except AnnotationError as error:
                    if "is empty" not in str(error):
                        raise
                    checked[role].append(None)
        if not any(layer is not None for layer in checked["partial"]):
            raise AnnotationError(
                "no partial mask was given: paint a rough inner region of each object (value k for class k) "
                "in a partial layer before training."
            )
        if not any(layer is not None for layer in checked["strong"]):
            raise AnnotationError(
                "no exact mask was given: the recursive method learns the boundaries from exact masks "
                "(strong layer) on at least one image or slice; add one, or use the refineseg method."
            )
        drawn_k = max(int(layer.max()) for role in ("partial", "strong") for layer in checked[role]
                      if layer is not None)
        self.n_classes = int(n_classes) if n_classes is not None else max(drawn_k, 1)
        if drawn_k > self.n_classes:
            raise AnnotationError(f"a mask holds class {drawn_k} but n_classes is {self.n_classes}; "
                                  "raise n_classes or fix the mask.")

        self.planes, self.plane_of_image, self.image_shapes = [], [], []
        self.strong, self.partial, self.separation = [], [], []
        for index, im in enumerate(images):
            start = len(self.planes)
            new_planes = to_planes(normalize(im, rgb=self.rgb), self.rgb)
            self.planes.extend(new_planes)
            self.plane_of_image.append(list(range(start, len(self.planes))))
            spatial = tuple(im.shape[:-1] if self.rgb else im.shape)
            self.image_shapes.append(spatial)

            def slices(layer):
                return [None] * len(new_planes) if layer is None else to_slices(layer, len(spatial))

            # A slice counts as labelled iff it has a non-zero pixel (DESIGN.md).
            self.strong.extend(s if s is not None and s.any() else None for s in slices(checked["strong"][index]))
            self.partial.extend(s if s is not None and s.any() else None
                                for s in slices(checked["partial"][index]))
            self.separation.extend(slices(checked["separation"][index]))

        self.seeds, self.seed_classes = [], []
        for p in self.partial:
            if p is None:
                self.seeds.append(None)
                self.seed_classes.append(None)
            else:
                objects, classes = label_regions(p)
                self.seeds.append(objects)
                self.seed_classes.append(classes)
        self.has_separation = any(s is not None and s.any() for s in self.separation)

    @property
    def strong_planes(self) -> list[int]:
        return [i for i, s in enumerate(self.strong) if s is not None]

    def approximation(self, plane: int) -> np.ndarray | None:
        """Current approximation of a plane as a class map (0 outside the regions)."""
        if self.seeds[plane] is None:
            return None
        return self.seed_classes[plane][self.seeds[plane]]

    def object_reach(self) -> float | None:
        """How far objects reach beyond their partial regions, measured where both masks exist.

        The largest distance from a pixel of an exactly masked object that
        holds a partial region to the nearest partial region (objects without
        one say nothing); None when no plane carries both masks.
        """
        reaches = []
        for strong, seeds in zip(self.strong, self.seeds):
            if strong is None or seeds is None:
                continue
            objects, _ = connected_components(strong > 0)
            seeded = np.isin(objects, np.unique(objects[seeds > 0]))
            seeded &= objects > 0
            if seeded.any():
                reaches.append(float(distance_transform_edt(seeds == 0)[seeded].max()))
        return max(reaches) if reaches else None

    def certain_target(self, plane: int, reach: float, margin: float = 2.0) -> np.ndarray | None:
        """T1 target on a plane with partial masks only: the pixels whose class is certain.

        Inside a partial region: its class. Farther than ``reach + margin``
        from every region: background, as long as every object carries a
        partial region (the method's input contract). Elsewhere -1: the
        boundaries stay what the exact masks teach.
        """
        if self.seeds[plane] is None or self.strong[plane] is not None:
            return None
        target = np.full(self.seeds[plane].shape, -1, dtype=np.int64)
        target[distance_transform_edt(self.seeds[plane] == 0) > reach + margin] = 0
        inside = self.seeds[plane] > 0
        target[inside] = self.seed_classes[plane][self.seeds[plane]][inside]
        return target

    def targets(self, certain_pixels: bool = False) -> list[list[np.ndarray]]:
        """Per task (T1, T2[, T3]) and plane, the int target with -1 where unlabelled."""
        def or_unlabelled(array, plane):
            return np.full(plane.shape[1:], -1, dtype=np.int64) if array is None else array.astype(np.int64)

        reach = self.object_reach() if certain_pixels else None
        segmentation = list(self.strong)
        if reach is not None:
            segmentation = [s if s is not None else self.certain_target(i, reach) for i, s in enumerate(self.strong)]
        tasks = [
            [or_unlabelled(s, plane) for s, plane in zip(segmentation, self.planes)],
            [or_unlabelled(self.approximation(i), plane) for i, plane in enumerate(self.planes)],
        ]
        if self.has_separation:
            tasks.append([or_unlabelled(self.separation_target(i), plane) for i, plane in enumerate(self.planes)])
        return tasks

    def separation_target(self, plane: int) -> np.ndarray | None:
        """T3 target: 1 on interface scribbles, 0 inside the partial masks (not an interface), -1 elsewhere."""
        scribbles, partial = self.separation[plane], self.partial[plane]
        if scribbles is None or not scribbles.any():
            return None
        target = np.full(scribbles.shape, -1, dtype=np.int64)
        if partial is not None:
            target[partial > 0] = 0
        target[scribbles > 0] = 1
        return target

    def masks_per_image(self, plane_labels: list[np.ndarray]) -> list[np.ndarray]:
        """Regroup per-plane label arrays into one array per image."""
        out = []
        for planes, shape in zip(self.plane_of_image, self.image_shapes):
            stacked = np.stack([plane_labels[i] for i in planes])
            out.append(stacked[0] if len(shape) == 2 else stacked)
        return out


def _foreground(segmentation: np.ndarray, interface: np.ndarray | None) -> np.ndarray:
    """T1's class map, with predicted interfaces between objects cut out."""
    labels = segmentation.argmax(0)
    if interface is not None:
        labels = np.where(interface > 0.5, 0, labels)
    return labels


def train_recursive(
    images,
    partial,
    strong=None,
    separation=None,
    *,
    config: TrainingConfig | str | None = None,
    n_classes: int | None = None,
    seed: int | None = 0,
    device: str = "auto",
    rgb: bool | None = None,
    names=None,
    checkpoint=None,
    resume: bool = False,
    **overrides,
):
    """Train the multi-task network of the recursive method; a generator of progress events.

    Parameters
    ----------
    images : ndarray or list of ndarray
        Training images: (Y, X), (Z, Y, X) stacks (slice by slice) or RGB.
    partial : ndarray or list
        Per image, a partial mask (0 = nothing, k = rough inner region of an
        object of class k; objects are its connected regions), or None.
    strong : ndarray or list, optional
        Per image, an exact mask (0 = background, k = class k), or None. A
        slice counts as labelled iff it has a non-zero pixel. At least one
        labelled slice is needed.
    separation : ndarray or list, optional
        Per image, scribbles (non-zero) on interfaces between touching
        objects: the optional auxiliary task T3.
    config : TrainingConfig or str, optional
        Settings or a preset name; default the ``recursive`` preset.
        ``iterations`` (K) iterations of ``steps`` (N) optimiser steps each.
    n_classes : int, optional
        Number of object classes K; default the largest value in the masks.
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
        and after every iteration's growth (:mod:`napari_coarseseg.checkpoint`).
    resume : bool
        Continue from ``checkpoint`` (same inputs, settings and seed), with
        the approximations it had reached.
    **overrides
        Any :class:`TrainingConfig` field, e.g. ``iterations=5``.

    Yields
    ------
    TrainingEvent
        After every step. Iteration 0 (before training) and the end of every
        iteration carry ``masks``: the approximation of every training image
        (T1's prediction on images without partial masks).

    Returns
    -------
    Model
        The trained model (the generator's return value).
    """
    if config is None or isinstance(config, str):
        config = load_preset(config or "recursive")
    config = config.replace(**overrides).validate()
    inputs = RecursiveInputs(images, partial, strong, separation, n_classes, rgb, names)
    device = select_device(device)
    rng, torch_rng = seed_everything(seed)

    n_labels = inputs.n_classes + 1
    network = MultiTaskUNet(inputs.channels, n_labels, config.base_channels, config.depth,
                            task_levels=min(config.task_levels, config.depth), separation=inputs.has_separation)
    network = use_channels_last(network.to(device), device)
    targets = inputs.targets(config.certain_pixels)
    sampler = PatchSampler(inputs.planes, targets, config.patch_size, config.drawn_fraction, rng)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = config.steps * config.iterations
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate, total_steps=total_steps,
                                                   pct_start=0.15)
    weights = {"segmentation": config.task_weights.get("strong", 1.0),
               "approximation": config.task_weights.get("partial", 1.0),
               "separation": config.task_weights.get("separation", 0.5)}
    tasks = list(network.tasks)
    # At least one patch of each kind per step (with a batch of 1, draws from all planes).
    n_strong = min(max(1, round(STRONG_SHARE * config.batch_size)), config.batch_size - 1)

    def predict_training_planes():
        """T1's class map (interfaces cut) on every training plane."""
        probabilities, _ = predict_planes(network, inputs.planes, device)
        return [_foreground(*_split_tasks(p, n_labels)[::2]) for p in probabilities]

    def current_masks(foreground):
        dtype = label_dtype(inputs.n_classes)
        return inputs.masks_per_image([
            (inputs.approximation(i) if inputs.seeds[i] is not None else foreground[i]).astype(dtype)
            for i in range(len(inputs.planes))
        ])

    seeded = [i for i, seeds in enumerate(inputs.seeds) if seeds is not None]
    run = RunCheckpoint(checkpoint, config.checkpoint_every, "recursive", config, seed,
                        [*inputs.planes, *(t for task in targets for t in task)],
                        modules={"network": network}, optimizer=optimizer, schedule=schedule,
                        rng=rng, torch_rng=torch_rng)

    def save_checkpoint_at(step: int, force: bool = False):
        run.maybe_save(step, {"history": history}, {f"approximation.{i}": inputs.seeds[i] for i in seeded},
                       force=force)

    losses, step = {}, 0
    history = []
    if resume:
        restored = run.resume()
        step, history = run.step, list(restored["state"]["history"])
        for i in seeded:  # the approximations reached, T2's targets
            inputs.seeds[i] = restored["arrays"][f"approximation.{i}"].astype(inputs.seeds[i].dtype)
            sampler.replace_target(1, i, inputs.approximation(i))
    # A checkpoint at the end of an iteration is written after its growth.
    first_iteration, steps_done = divmod(step, config.steps)
    start = time.perf_counter()
    try:
        if step == 0:
            initial = [inputs.approximation(i) if inputs.seeds[i] is not None else np.zeros(p.shape[1:], np.int64)
                       for i, p in enumerate(inputs.planes)]
            yield TrainingEvent(0, total_steps, {}, 0.0, iteration=0,
                                masks=inputs.masks_per_image([m.astype(label_dtype(inputs.n_classes))
                                                              for m in initial]),
                                message=f"training on {describe_device(device)}")
        else:
            yield TrainingEvent(step, total_steps, {}, 0.0, iteration=first_iteration,
                                message=f"resumed at step {step}/{total_steps}")
        for iteration in range(first_iteration + 1, config.iterations + 1):
            network.train()
            for _ in range(config.steps - steps_done):
                step += 1
                parts = [sampler.batch(config.batch_size - n_strong)]
                if n_strong:
                    parts.append(sampler.batch(n_strong, planes=inputs.strong_planes))
                batch_images = torch.from_numpy(np.concatenate([images for images, _ in parts]))
                batch_targets = torch.from_numpy(np.concatenate([targets for _, targets in parts], axis=1))
                batch_images, batch_targets = augment(batch_images, batch_targets, torch_rng, config.jitter)
                batch_images = batch_images.to(device, non_blocking=True)
                batch_targets = batch_targets.to(device, non_blocking=True)
                with autocast(device):
                    outputs = network(batch_images)
                terms = {task: masked_nll(outputs[task], batch_targets[t]) for t, task in enumerate(tasks)}
                total = sum(weights[task] * terms[task] for task in tasks)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                schedule.step()
                losses = {"total": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
                if not np.isfinite(losses["total"]):
                    raise FloatingPointError(
                        f"training diverged at step {step} (loss {losses['total']}); lower the learning rate"
                    )
                if step < iteration * config.steps:
                    save_checkpoint_at(step)
                    yield TrainingEvent(step, total_steps, losses, time.perf_counter() - start,
                                        iteration=iteration - 1,
                                        message=f"iteration {iteration}/{config.iterations}, step {step}/{total_steps}")
            # The recursive update: every approximation grows towards T1's foreground.
            foreground = predict_training_planes()
            changed = 0
            for i in range(len(inputs.planes)):
                if inputs.seeds[i] is None:
                    continue
                grown = grow_regions(inputs.seeds[i], inputs.seed_classes[i], foreground[i], config.epsilon_train)
                changed += int((grown != inputs.seeds[i]).sum())
                inputs.seeds[i] = grown
                sampler.replace_target(1, i, inputs.approximation(i))
            history.append(changed)
            steps_done = 0
            save_checkpoint_at(step, force=True)
            yield TrainingEvent(step, total_steps, losses, time.perf_counter() - start, iteration=iteration,
                                masks=current_masks(foreground),
                                message=f"iteration {iteration}/{config.iterations}: {changed} pixels added")
    finally:
        use_channels_last(network, device, on=False)
        network.cpu()
        release_device_memory(device)

    card = make_card(
        "recursive",
        inputs.n_classes,
        inputs.channels,
        inputs.rgb,
        {"kind": "multitask", "base_channels": config.base_channels, "depth": config.depth,
         "task_levels": network.task_levels, "separation": inputs.has_separation},
        epsilon_predict=config.epsilon_predict,
        patch_size=config.patch_size,
        training={
            "iterations": config.iterations,
            "steps_per_iteration": config.steps,
            "seed": seed,
            "seconds": round(time.perf_counter() - start, 2),
            "device": describe_device(device),
            "final_losses": losses,
            "pixels_added_per_iteration": history,
            "image_shapes": [list(s) for s in inputs.image_shapes],
            "config": {k: v for k, v in vars(config).items()},
        },
    )
    return Model(network, torch.nn.ModuleList(), card).eval()


def _split_tasks(probabilities: np.ndarray, n_labels: int):
    """Split predict_planes' stacked output into (segmentation, approximation, interface probability or None)."""
    segmentation, approximation = probabilities[:n_labels], probabilities[n_labels : 2 * n_labels]
    interface = probabilities[2 * n_labels + 1] if probabilities.shape[0] > 2 * n_labels else None
    return segmentation, approximation, interface


def final_growth(foreground: np.ndarray, regions: np.ndarray, epsilon: float,
                 gate: float = PREDICTION_GATE_PX) -> np.ndarray:
    """The prediction's last growth: T2's regions grow into T1's foreground near them.

    Parameters
    ----------
    foreground : ndarray of int
        T1's class map F (0 = background).
    regions : ndarray of int
        T2's class map; its connected regions are the seeds.
    epsilon : float
        Growth speed of eq. 5.
    gate : float
        F is first cut to pixels within ``gate`` px of T2's regions. T1
        learns from a few exact masks and can fail on an unseen image
        (measured: 83 % of a tile called nucleus); the gate keeps such a
        failure from flooding the result, and changes nothing where F is sane
        (objects end within a few px of T2's regions).

    Returns
    -------
    ndarray of int
        Class map of the grown objects.
    """
    seeds, seed_classes = label_regions(regions)
    near = distance_transform_edt(regions == 0) <= gate
    return seed_classes[grow_regions(seeds, seed_classes, np.where(near, foreground, 0), epsilon)]


def predict_recursive(model: Model, image, device="auto", tile_size: int = TILE_SIZE, overlap: int = 64,
                      batch_size: int = 4, name: str = "image", epsilon: float | None = None,
                      keep_probabilities: bool = True) -> Prediction:
    """Segment an image with a recursive-method model.

    T1 gives the foreground F and T2 the approximation regions; one last
    level-set growth with the card's ``epsilon_predict`` (or ``epsilon``)
    grows the regions into F near them (:func:`final_growth`). Components of F that hold no region are left
    out; touching objects stay apart.

    Returns
    -------
    Prediction
        ``labels`` the grown classes, ``probabilities`` T1's class
        probabilities, ``reliability`` None.
    """
    image = _check_image_for_model(image, model, name)
    device = select_device(device)
    model.to(device)
    model.eval()
    norm = model.card["normalisation"]
    epsilon = float(model.card.get("epsilon_predict", 1.0) if epsilon is None else epsilon)
    planes = iter_normalized_planes(image, norm["low"], norm["high"], model.rgb, name)
    n_labels = model.n_classes + 1
    segmentation, labels = [], []
    for p, _ in iter_predict_planes(model.network, planes, device, None, tile_size, overlap, batch_size):
        probabilities, approximation, interface = _split_tasks(p, n_labels)
        grown = final_growth(_foreground(probabilities, interface), approximation.argmax(0), epsilon)
        labels.append(grown.astype(label_dtype(model.n_classes)))
        if keep_probabilities:
            segmentation.append(probabilities)
    return _assemble(image, model, labels, segmentation or None)
