"""Recursive approximation: partial masks that grow to the true boundaries.

A multi-task network learns T1 segmentation from exact masks on a few images
and T2 approximation from partial masks (rough inner regions of every object)
on the others, with the loss

    L = sum_t w_t mean_{i labelled for t} -log p_t(y_t(i) | x),

each task only on the pixels that carry its labels. After every iteration of
``steps`` optimiser steps, each training image's approximation regions S grow
towards T1's predicted foreground F by the level-set rule of
:mod:`napari_coarseseg.levelset`,

    phi(i) = epsilon * d(i, B) - d(i, S),      S_new = {i : phi(i) >= 0},

and the grown regions become T2's next targets. Every object keeps its id
through the evolution (:attr:`RecursiveMasks.seeds`); the class maps T2
learns and the evolution shows carry a gap of ``OBJECT_GAP`` px between
touching objects of one class (:func:`~napari_coarseseg.levelset.separate_objects`;
the drawn partial regions themselves are never cut), so that two touching
objects stay two connected regions instead of merging into one blob. The
approximations after every iteration are the mask evolution. Prediction
grows T2's predicted regions once more into T1's foreground near them, with
the same gap (:func:`final_growth`): the connected regions of the predicted
class map are the objects.

One addition to the paper (``certain_pixels``, on in the preset): T1 also
learns, on the images with partial masks only, the pixels whose class is
certain: inside a partial region (object) and farther from every region than
objects reach past their regions on the exactly masked images (background).
With a single exact tile T1 otherwise sees one tile's background only and can
call most of an unseen tile foreground; ``benchmarks/recursive.py`` measures
the effect.

Pixel size (``spacing``): on anisotropic pixels (sy != sx) every distance
here is physical, measured with the pixel size (sy, sx) of each training
image (the level set, :func:`~napari_coarseseg.levelset.grow_regions`; the
reach of objects and the certain background; the prediction's gate). The
lengths set in pixels (the certain background's 2 px margin, the prediction's
``prediction_gate``) become that many times the larger pixel size: at least
that many pixels along either axis. The gap between objects stays 1 px. With
square pixels nothing changes. The model card records the spacing of the
training images (``spacing``); prediction uses the caller's, else the card's.

References
----------
.. [1] R. Ke et al., "Multi-task deep learning for image segmentation using
   recursive approximation tasks", IEEE Transactions on Image Processing 30,
   2021.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from scipy.ndimage import label as connected_components
from scipy.ndimage import maximum as ndi_maximum

from ..annotations import AnnotationError, class_count, label_dtype
from ..data import TrainingImages, in_plane_spacing
from ..inference import (
    TILE_SIZE,
    Prediction,
    assemble_planes,
    iter_predict_planes,
    normalised_entropy,
    predict_planes,
    start_prediction,
)
from ..levelset import check_spacing, grow_regions, label_regions, separate_objects
from ..losses import masked_nll
from ..model_io import Model, ModelFileError, card_error, card_number, card_whole, input_channels
from ..multitask import MultiTaskUNet
from ..training import TrainingConfig, resolve_config
from ._loop import TrainingLoop, TrainingRun
from ._method import DrawingRole, Method, PlaneRule

__all__ = ["train_recursive", "predict_recursive", "final_growth", "prediction_seeds", "physical_length",
           "RecursiveMasks", "RecursiveTraining", "RECURSIVE", "check_card"]

# Share of every batch drawn from the strongly labelled planes (those patches
# also train T2 where they carry partial masks), so that T1 sees its few exact
# masks in every step however many partial images there are; with a quarter,
# T1 is under-trained and the approximations grow into the background
# (benchmarks/recursive.py).
STRONG_SHARE = 0.75

# Gap (px) kept between touching grown objects of one class in T2's targets, the evolution and the
# prediction. Without it the nearest-seed split leaves touching objects touching, and their class map reads
# as one region; 1 px is the least that separates them (benchmarks/realdata.py counts the merges).
OBJECT_GAP = 1


def physical_length(pixels: float, spacing) -> float:
    """A length set in pixels as a physical length: ``pixels`` times the larger pixel size (at least that many
    pixels along either axis); ``pixels`` itself without a spacing."""
    return pixels if spacing is None else pixels * max(spacing)


class RecursiveMasks:
    """The masks of a run, plane by plane: exact masks, the current approximations, interface scribbles.

    Parameters
    ----------
    images : TrainingImages
    partial, strong, separation
        One layer each (see :func:`train_recursive`).
    n_classes : int, optional
        Number of object classes K; default the largest value in the masks.
    gap : int, optional
        Gap (px) between touching objects of one class in the approximations
        (:meth:`instances`, :meth:`approximation`); the ids in ``seeds`` carry
        none.

    Attributes
    ----------
    strong : list of ndarray or None
        Per plane, the exact class mask, or None where the plane has none.
    seeds, seed_classes : list
        Per plane with partial masks, the object ids of the current
        approximation (every object keeps its id as it grows; no gap) and
        each id's class (None elsewhere).
    separation : list of ndarray or None
        Per plane, the interface scribbles (non-zero), or None.
    """

    def __init__(self, images: TrainingImages, partial, strong=None, separation=None, n_classes=None,
                 gap: int = OBJECT_GAP):
        self.images, self.gap = images, int(gap)
        checked = {role: images.check_layer(layer, role)
                   for role, layer in (("partial", partial), ("strong", strong), ("separation", separation))}
        if all(layer is None for layer in checked["partial"]):
            raise AnnotationError(
                "no partial mask was given: paint a rough inner region of each object (value k for class k) "
                "in a partial layer before training."
            )
        if all(layer is None for layer in checked["strong"]):
            raise AnnotationError(
                "no exact mask was given: the recursive method learns the boundaries from exact masks "
                "(strong layer) on at least one image or slice; add one, or use the refineseg method."
            )
        drawn_k = max(int(layer.max()) for role in ("partial", "strong") for layer in checked[role]
                      if layer is not None)
        self.n_classes = class_count(n_classes, drawn_k, "a mask")
        # A slice counts as labelled iff it has a non-zero pixel.
        self.strong = [s if s is not None and s.any() else None for s in images.per_plane(checked["strong"])]
        self.partial = [s if s is not None and s.any() else None for s in images.per_plane(checked["partial"])]
        self.separation = images.per_plane(checked["separation"])
        self.seeds, self.seed_classes = [], []
        for p in self.partial:
            objects, classes = (None, None) if p is None else label_regions(p)
            self.seeds.append(objects)
            self.seed_classes.append(classes)
        self.has_separation = any(s is not None and s.any() for s in self.separation)

    @property
    def strong_planes(self) -> list[int]:
        return [i for i, s in enumerate(self.strong) if s is not None]

    @property
    def seeded_planes(self) -> list[int]:
        return [i for i, seeds in enumerate(self.seeds) if seeds is not None]

    def instances(self, plane: int) -> np.ndarray | None:
        """Current approximation of a plane as object ids, with a gap of ``gap`` px between touching objects.

        Object ids are those of ``seeds`` (one per drawn partial region,
        carried through the evolution); where two grown objects of one class
        meet, the pixels of one within ``gap`` px of the other are 0
        (:func:`~napari_coarseseg.levelset.separate_objects`). The drawn
        partial regions are never cut.
        """
        if self.seeds[plane] is None:
            return None
        return separate_objects(self.seeds[plane], self.gap, keep=self.partial[plane] > 0,
                                object_classes=self.seed_classes[plane])

    def approximation(self, plane: int) -> np.ndarray | None:
        """Current approximation of a plane as a class map (0 outside the regions and in the gaps): T2's target.

        The class of :meth:`instances`: touching objects of one class are
        apart, so the connected regions of the class map are the objects.
        """
        instances = self.instances(plane)
        return None if instances is None else self.seed_classes[plane][instances]

    def object_reach(self) -> float | None:
        """How far objects reach beyond their partial regions, measured where both masks exist.

        The largest distance from a pixel of an exactly masked object that
        holds a partial region to the nearest partial region (objects without
        one say nothing), physical where the plane has a pixel size; None
        when no plane carries both masks.
        """
        reaches = []
        # The drawn regions, not the grown ones (a live session asks again after growths).
        for strong, seeds, spacing in zip(self.strong, self.partial, self.images.plane_spacing, strict=True):
            if strong is None or seeds is None:
                continue
            objects, _ = connected_components(strong > 0)
            seeded = np.isin(objects, np.unique(objects[seeds > 0]))
            seeded &= objects > 0
            if seeded.any():
                reaches.append(float(distance_transform_edt(seeds == 0, sampling=spacing)[seeded].max()))
        return max(reaches) if reaches else None

    def certain_target(self, plane: int, reach: float, margin: float = 2.0) -> np.ndarray | None:
        """T1 target on a plane with partial masks only: the pixels whose class is certain.

        Inside a partial region: its class. Farther than ``reach + margin``
        from every region: background, as long as every object carries a
        partial region (the method's input contract). Elsewhere -1: the
        boundaries stay what the exact masks teach. With a pixel size the
        distances are physical (as ``reach``, :meth:`object_reach`) and
        ``margin`` (px) is :func:`physical_length`.
        """
        drawn = self.partial[plane]  # the drawn regions, not the grown ones (a live session asks after growths)
        if drawn is None or self.strong[plane] is not None:
            return None
        spacing = self.images.plane_spacing[plane]
        target = np.full(drawn.shape, -1, dtype=np.int64)
        distance = distance_transform_edt(drawn == 0, sampling=spacing)
        target[distance > reach + physical_length(margin, spacing)] = 0
        target[drawn > 0] = drawn[drawn > 0]
        return target

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

    def targets(self, certain_pixels: bool = False) -> list[list[np.ndarray]]:
        """Per task (T1, T2[, T3]) and plane, the int target with -1 where unlabelled."""
        planes = self.images.planes

        def or_unlabelled(array, plane):
            return np.full(plane.shape[1:], -1, dtype=np.int64) if array is None else array.astype(np.int64)

        reach = self.object_reach() if certain_pixels else None
        segmentation = list(self.strong)
        if reach is not None:
            segmentation = [s if s is not None else self.certain_target(i, reach) for i, s in enumerate(self.strong)]
        tasks = [
            [or_unlabelled(s, plane) for s, plane in zip(segmentation, planes, strict=True)],
            [or_unlabelled(self.approximation(i), plane) for i, plane in enumerate(planes)],
        ]
        if self.has_separation:
            tasks.append([or_unlabelled(self.separation_target(i), plane) for i, plane in enumerate(planes)])
        return tasks

    def grow(self, foreground: list[np.ndarray], epsilon: float, planes: list[int] | None = None) -> int:
        """The recursive update: every approximation (of ``planes``, default all) grows towards T1's foreground
        ``foreground[plane]`` (distances physical where the plane has a pixel size); return the pixels added."""
        added = 0
        spacing = self.images.plane_spacing
        for i in self.seeded_planes if planes is None else planes:
            grown = grow_regions(self.seeds[i], self.seed_classes[i], foreground[i], epsilon, spacing=spacing[i])
            added += int((grown != self.seeds[i]).sum())
            self.seeds[i] = grown
        return added

    def masks(self, foreground: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """The evolution plane: each image's approximation (T1's ``foreground``, or 0, where it has none)."""
        dtype = label_dtype(self.n_classes)
        planes = []
        for i, plane in enumerate(self.images.planes):
            approximation = self.approximation(i)
            if approximation is None:
                approximation = np.zeros(plane.shape[1:], np.int64) if foreground is None else foreground[i]
            planes.append(approximation.astype(dtype))
        return self.images.masks_per_image(planes)


def _split_tasks(maps: np.ndarray, n_labels: int):
    """Split the blended maps into (segmentation, approximation, interface probability or None)."""
    segmentation, approximation = maps[:n_labels], maps[n_labels : 2 * n_labels]
    interface = maps[2 * n_labels + 1] if maps.shape[0] > 2 * n_labels else None
    return segmentation, approximation, interface


def _foreground(segmentation: np.ndarray, interface: np.ndarray | None) -> np.ndarray:
    """T1's class map, with predicted interfaces between objects cut out."""
    labels = segmentation.argmax(0)
    if interface is not None:
        labels = np.where(interface > 0.5, 0, labels)
    return labels


def _task_maps(output: dict) -> torch.Tensor:
    """The softmax of every task (segmentation, approximation, separation if any), stacked along the classes."""
    return torch.cat([torch.softmax(logits.float(), dim=1) for logits in output.values()], dim=1)


class RecursiveTraining(TrainingLoop):
    """The recursive run: a multi-task U-Net, its approximations grown after every iteration."""

    method = "recursive"
    floats_per_pixel_channel = 96  # two task decoders: measured 75 (TrainingLoop.floats_per_pixel_channel)

    def __init__(self, images: TrainingImages, masks: RecursiveMasks, config: TrainingConfig, seed, device,
                 checkpoint=None, init: Model | None = None):
        self.masks, self.n_classes = masks, masks.n_classes
        self.pixels_added: list[int] = []
        self.foreground: list[np.ndarray | None] = [None] * len(images.planes)  # T1's class maps of the last growth
        super().__init__(images, config, seed, device, checkpoint, init)
        self.tasks = list(self.network.tasks)
        weights = config.task_weights
        self.weights = {"segmentation": weights.get("strong", 1.0), "approximation": weights.get("partial", 1.0),
                        "separation": weights.get("separation", 0.5)}
        # At least one patch of each kind per step (with a batch of 1, draws from all planes); of the whole batch,
        # also when several processes train (each keeps its rows of it: TrainingLoop.own_batch).
        size = self.config.batch_size
        self.n_strong = min(max(1, round(STRONG_SHARE * size)), size - 1)

    def build_modules(self):
        config = self.config
        if config.network != "unet":
            raise ValueError(f"network {config.network!r} is a refineseg network; the recursive method trains its "
                             "multi-task U-Net (leave network at 'unet')")
        network = MultiTaskUNet(self.images.input_channels, self.n_classes + 1, config.base_channels, config.depth,
                                task_levels=min(config.task_levels, config.depth),
                                separation=self.masks.has_separation)
        return {"network": network}

    def targets(self):
        return self.masks.targets(self.config.certain_pixels)

    @property
    def total_steps(self) -> int:
        return self.config.steps * self.config.iterations

    def batch(self):
        size = self.config.batch_size
        parts = [self.sampler.batch(size - self.n_strong)]
        if self.n_strong:
            parts.append(self.sampler.batch(self.n_strong, planes=self.masks.strong_planes))
        return np.concatenate([images for images, _ in parts]), np.concatenate([t for _, t in parts], axis=1)

    def loss_terms(self, outputs, targets, images):
        terms = {task: masked_nll(outputs[task], targets[t]) for t, task in enumerate(self.tasks)}
        total = sum(self.weights[task] * terms[task] for task in self.tasks)
        return {"total": total, **terms}

    def initial_masks(self):
        return self.masks.masks()

    def evolve(self, step):
        steps, iterations = self.config.steps, self.config.iterations
        iteration = -(-step // steps)
        if step % steps:
            return None, f"iteration {iteration}/{iterations}, step {step}/{self.total_steps}"
        # The recursive update: T1's class map (interfaces cut) on every plane, then every region grows.
        n_labels = self.n_classes + 1
        foreground = [_foreground(*_split_tasks(maps, n_labels)[::2]) for maps in self.preview(_task_maps)]
        added = self.masks.grow(foreground, self.config.epsilon_train)
        self.foreground = foreground
        self._approximations_to_sampler()
        self.pixels_added.append(added)
        return self.masks.masks(foreground), f"iteration {iteration}/{iterations}: {added} pixels added"

    def checkpoint_due(self, step):
        # After every iteration's growth, so that a resumed run starts from the grown approximations.
        return step % self.config.steps == 0

    def method_state(self):
        arrays = {f"approximation.{i}": self.masks.seeds[i] for i in self.masks.seeded_planes}
        return {"history": list(self.pixels_added)}, arrays

    def restore_method_state(self, state, arrays):
        self.pixels_added = list(state["history"])
        for i in self.masks.seeded_planes:  # the approximations reached
            self.masks.seeds[i] = arrays[f"approximation.{i}"].astype(self.masks.seeds[i].dtype)
        self._approximations_to_sampler()

    def _approximations_to_sampler(self):
        """The current approximations become T2's targets (task 1 of the sampler)."""
        for i in self.masks.seeded_planes:
            self.sampler.replace_target(1, i, self.masks.approximation(i))

    # ------------------------------------------------------------------ live sessions (napari_coarseseg.live)

    def live_update(self, step):
        # The recursive update every `steps` steps, as in a run, on the planes with partial masks only: a live
        # session's evolution is its previews.
        if step % self.config.steps == 0:
            planes = self.masks.seeded_planes
            self.ranks.sync_buffers(self.modules)
            maps = predict_planes(self.network, [self.images.planes[i] for i in planes], self.device, _task_maps)
            for i, plane_maps in zip(planes, maps, strict=True):
                self.foreground[i] = _foreground(*_split_tasks(plane_maps, self.n_classes + 1)[::2])
            self.pixels_added.append(self.masks.grow(self.foreground, self.config.epsilon_train, planes))
            self._approximations_to_sampler()

    def take_drawings(self, layers):
        """New partial, strong and separation layers (role -> list of one array) for a live session.

        A plane whose partial mask did not change keeps its grown
        approximation; a plane whose partial mask changed starts again from
        the new drawing and grows at once towards T1's foreground of the last
        growth (when there was one), so that new regions do not wait for the
        next update.
        """
        masks = RecursiveMasks(self.images, *_role_layers(layers), n_classes=self.n_classes, gap=self.masks.gap)
        if masks.has_separation != self.masks.has_separation:
            raise AnnotationError("the network of a live session has its interface task or not from the start: "
                                  "stop the session and start a new one to add or remove interface scribbles")
        changed = []
        for i in masks.seeded_planes:
            old = self.masks.partial[i]
            if old is not None and np.array_equal(old, masks.partial[i]):
                masks.seeds[i], masks.seed_classes[i] = self.masks.seeds[i], self.masks.seed_classes[i]
            elif self.foreground[i] is not None:
                changed.append(i)
        masks.grow(self.foreground, self.config.epsilon_train, changed)
        self.masks = masks
        self.retarget()

    def live_maps(self, planes, modules=None):
        modules = modules or self.modules
        config, n_labels = self.config, self.n_classes + 1
        # A live session trains on one image: its planes share one pixel size.
        rule = growth_rule(self.n_classes, config.epsilon_predict, config.prediction_gate,
                           config.prediction_seed_level, self.images.plane_spacing[0])
        results = []
        for maps in predict_planes(modules["network"], planes, self.device, _task_maps):
            labels, _ = rule.finish(maps, False)
            segmentation, approximation, _ = _split_tasks(maps, n_labels)
            results.append((labels, draw_here_map(segmentation, approximation)))
        return results

    def card_fields(self):
        config = self.config
        network = {"kind": "multitask", "base_channels": config.base_channels, "depth": config.depth,
                   "task_levels": self.network.task_levels, "separation": self.masks.has_separation}
        extra = {"epsilon_predict": config.epsilon_predict, "prediction_gate": config.prediction_gate,
                 "prediction_seed_level": config.prediction_seed_level, "spacing": card_spacing(self.images.spacing)}
        summary = {"iterations": config.iterations, "steps_per_iteration": config.steps,
                   "pixels_added_per_iteration": list(self.pixels_added)}
        return network, extra, summary


def draw_here_map(segmentation: np.ndarray, approximation: np.ndarray) -> np.ndarray:
    """Where a stroke would help the recursive method most, in [0, 1]: the mean of T1's doubt and of T1's
    disagreement with T2.

        draw(i) = ( H(p1(i)) / log M  +  1/2 sum_m |p1_m(i) - p2_m(i)| ) / 2

    with ``p1``, ``p2`` the (M, Y, X) class probabilities of T1 (segmentation)
    and T2 (approximation). Where T1 sees an object that T2 does not, the
    prediction's growth from T2's regions drops it: a partial region painted
    there brings it back.

    >>> p1 = np.array([[[0.5, 0.0]], [[0.5, 1.0]]]); p2 = np.array([[[0.5, 1.0]], [[0.5, 0.0]]])
    >>> draw_here_map(p1, p2).round(2)  # doubt, then T2's disagreement
    array([[0.5, 0.5]], dtype=float32)
    """
    doubt = normalised_entropy(segmentation)
    disagreement = 0.5 * np.abs(segmentation - approximation).sum(0)
    return np.clip(0.5 * (doubt + disagreement), 0, 1).astype(np.float32)


def recursive_loop(images: TrainingImages, layers: dict, config: TrainingConfig, seed, device) -> RecursiveTraining:
    """The recursive training loop on drawing layers by role (a live session's, :mod:`napari_coarseseg.live`):
    ``partial``, ``strong`` and ``separation``, each a list of (at most) one array."""
    return RecursiveTraining(images, RecursiveMasks(images, *_role_layers(layers)), config, seed, device)


def _role_layers(layers: dict) -> list:
    """The partial, strong and separation layers of a live session's ``layers`` (role -> list of at most one
    array), None where a role has none."""
    return [(layers.get(role) or [None])[0] for role in ("partial", "strong", "separation")]


def card_spacing(spacing: list) -> list | None:
    """The card's ``spacing``: [sy, sx] when every image has that pixel size, None when none has one, else one
    [sy, sx] (or None) per image."""
    if all(s is None for s in spacing):
        return None
    if len(set(spacing)) == 1:
        return list(spacing[0])
    return [None if s is None else list(s) for s in spacing]


def train_recursive(images, partial, strong=None, separation=None, *, config: TrainingConfig | str | None = None,
                    n_classes: int | None = None, seed: int | None = 0, device="auto", rgb: bool | None = None,
                    names=None, checkpoint=None, resume: bool = False, init: Model | None = None,
                    channel_axis: int | None = None, spacing=None, **overrides) -> TrainingRun:
    """Train the multi-task network of the recursive method; a generator of progress events.

    Parameters
    ----------
    images : ndarray or list of ndarray
        Training images: (Y, X), (Z, Y, X) stacks (slice by slice), RGB, or
        channels on any axis with ``channel_axis``.
    partial : ndarray or list
        Per image, a partial mask (0 = nothing, k = rough inner region of an
        object of class k; objects are its connected regions), or None.
    strong : ndarray or list, optional
        Per image, an exact mask (0 = background, k = class k), or None. A
        slice counts as labelled iff it has a non-zero pixel; at least one is
        needed.
    separation : ndarray or list, optional
        Per image, scribbles (non-zero) on interfaces between touching
        objects: the optional auxiliary task T3.
    config : TrainingConfig or str, optional
        Settings or a preset name; default the ``recursive`` preset:
        ``iterations`` iterations of ``steps`` optimiser steps each.
    n_classes, seed, device, rgb, names, checkpoint, resume, init, channel_axis, **overrides
        As for :func:`~napari_coarseseg.methods.refineseg.train_refineseg`
        (``init``: a recursive model to start from); the checkpoint is also
        written after every iteration's growth.
    spacing : sequence, optional
        Pixel size: one (sy, sx) for all images, or one per image (None where
        an image has none); a voxel size (sz, sy, sx), e.g. a NIfTI's, is
        taken too and its last two used (stacks are grown slice by slice).
        The level set then measures physical distances (see the module
        docstring); the card records it (``spacing``). Default None: pixels.

    Yields
    ------
    TrainingEvent
        One at the start and one after every step; the start and the end of
        every iteration carry ``masks``: the approximation of every training
        image (T1's prediction on images without partial masks).

    Returns
    -------
    Model
        The trained model (the generator's return value).
    """
    config = resolve_config(config, RECURSIVE.preset, overrides)
    training_images = TrainingImages(images, rgb, names, channel_axis, spacing=spacing)
    masks = RecursiveMasks(training_images, partial, strong, separation, n_classes)
    return (yield from RecursiveTraining(training_images, masks, config, seed, device, checkpoint, init).run(resume))


def prediction_seeds(regions: np.ndarray, probability: np.ndarray | None, level: float) -> np.ndarray:
    """The seeds of the prediction's last growth: the core of each of T2's regions, as a class map.

    A pixel of a connected region R of T2's class map is a seed when T2's
    probability of its class is at least ``level`` times the highest in R:

        seed(i)  iff  p(i) >= level * max_{j in R} p(j),      i in R.

    T2 learns a ``OBJECT_GAP`` px gap between touching objects but draws it
    weakly: two touching nuclei often share one argmax region joined by a
    neck of lower probability, which this rule cuts. Every region keeps its
    most probable pixel, so no object is lost; ``level = 0`` (or no
    probability) keeps the regions whole.

    Examples
    --------
    >>> regions = np.array([[1, 1, 1, 1, 1]])
    >>> probability = np.array([[0.6, 0.9, 0.7, 0.95, 0.8]])
    >>> prediction_seeds(regions, probability, 0.85)[0]  # the neck at 0.7 splits the region in two
    array([0, 1, 0, 1, 0])
    """
    regions = np.asarray(regions)
    if probability is None or level <= 0 or not regions.any():
        return regions.copy()
    objects, _ = label_regions(regions)
    highest = np.zeros(int(objects.max()) + 1)
    highest[1:] = ndi_maximum(probability, objects, np.arange(1, objects.max() + 1))
    return np.where((objects > 0) & (probability >= level * highest[objects]), regions, 0)


def final_growth(foreground: np.ndarray, regions: np.ndarray, epsilon: float, gate: float,
                 gap: int = OBJECT_GAP, probability: np.ndarray | None = None, seed_level: float = 0.0,
                 spacing=None) -> np.ndarray:
    """The prediction's last growth: T2's regions grow into T1's foreground near them, apart from each other.

    Parameters
    ----------
    foreground : ndarray of int
        T1's class map F (0 = background).
    regions : ndarray of int
        T2's class map; its connected regions are the seeds.
    epsilon : float
        Growth speed of the level-set rule.
    gate : float
        F is first cut to pixels within ``gate`` px of T2's regions
        (``numpy.inf``: no gate). T1 learns from a few exact masks and can
        fail on an unseen image, calling most of it foreground; the gate
        keeps such a failure from flooding the result, and changes nothing
        where F is sane (objects end within a few px of T2's regions).
    gap : int
        Where two grown objects of one class meet, the pixels of one within
        ``gap`` px of the other become background (T2's regions themselves
        stay), as in T2's targets: the connected regions of the result are
        the objects (:func:`~napari_coarseseg.levelset.separate_objects`).
    probability : ndarray of float, optional
        (Y, X) T2's probability of each pixel's class in ``regions``.
    seed_level : float
        The growth starts from the cores of T2's regions,
        :func:`prediction_seeds` (probability, seed_level), not from the
        whole regions; 0 (the default) keeps them whole. The gate stays
        measured from the whole regions.
    spacing : sequence of 2 float, optional
        Pixel size (sy, sx): the growth measures physical distances and the
        gate is ``gate`` times the larger pixel size (:func:`physical_length`);
        ``gap`` stays in pixels. Default None: pixels.

    Returns
    -------
    ndarray of int
        Class map of the grown objects, touching objects ``gap`` px apart.

    Examples
    --------
    >>> foreground = np.zeros((1, 12), int); foreground[0, 2:10] = 1
    >>> regions = np.zeros((1, 12), int); regions[0, 5] = 1
    >>> final_growth(foreground, regions, epsilon=100.0, gate=2)[0]
    array([0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    >>> regions[0, 8] = 1  # a second region: the two objects meet, a 1 px gap keeps them apart
    >>> final_growth(foreground, regions, epsilon=100.0, gate=2)[0]
    array([0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0])
    """
    spacing = check_spacing(spacing)
    seeds, seed_classes = label_regions(prediction_seeds(regions, probability, seed_level))
    near = distance_transform_edt(regions == 0, sampling=spacing) <= physical_length(gate, spacing)
    grown = grow_regions(seeds, seed_classes, np.where(near, foreground, 0), epsilon, spacing=spacing)
    return seed_classes[separate_objects(grown, gap, keep=seeds > 0, object_classes=seed_classes)]


def recursive_plane_rule(model: Model, epsilon: float | None = None, gate: float | None = None,
                         seed_level: float | None = None, spacing=None) -> PlaneRule:
    """One plane's labels from its blended maps: T1's foreground grown from T2's regions (not local: the level
    set follows regions across the plane). What :func:`predict_recursive` does with every plane."""
    spacing = in_plane_spacing(spacing if spacing is not None else _card_pair(model.card.get("spacing")))
    epsilon = float(model.card.get("epsilon_predict", 1.0) if epsilon is None else epsilon)
    # Models written before the gate was a setting used 4 px.
    gate = float(model.card.get("prediction_gate", 4.0) if gate is None else gate)
    # Models written before the seed level was stored grew from T2's whole regions (level 0).
    seed_level = float(model.card.get("prediction_seed_level", 0.0) if seed_level is None else seed_level)
    return growth_rule(model.n_classes, epsilon, gate, seed_level, spacing)


def growth_rule(n_classes: int, epsilon: float, gate: float, seed_level: float, spacing) -> PlaneRule:
    """The plane rule of :func:`recursive_plane_rule` from its settings (a live session's come from its run)."""
    n_labels, dtype = n_classes + 1, label_dtype(n_classes)

    def finish(maps: np.ndarray, keep_probabilities: bool):
        probabilities, approximation, interface = _split_tasks(maps, n_labels)
        regions = approximation.argmax(0)
        probability = np.take_along_axis(approximation, regions[None], 0)[0]
        grown = final_growth(_foreground(probabilities, interface), regions, epsilon, gate,
                             probability=probability, seed_level=seed_level, spacing=spacing)
        return grown.astype(dtype), probabilities if keep_probabilities else None

    return PlaneRule(_task_maps, finish, local=False)


def predict_recursive(model: Model, image, device="auto", tile_size: int = TILE_SIZE, overlap: int = 64,
                      batch_size: int = 4, name: str = "image", keep_probabilities: bool = True,
                      flips: bool = False, epsilon: float | None = None, gate: float | None = None,
                      seed_level: float | None = None, spacing=None) -> Prediction:
    """Segment an image with a recursive-method model.

    T1 gives the foreground F and T2 the approximation regions; one last
    level-set growth with the card's ``epsilon_predict`` (or ``epsilon``)
    grows the regions into F within the card's ``prediction_gate`` (or
    ``gate``) pixels of them (:func:`final_growth`), starting from the
    regions' cores, where T2's probability reaches the card's
    ``prediction_seed_level`` (or ``seed_level``; 0 for cards without it)
    times the region's highest (:func:`prediction_seeds`). Components of F that
    hold no region are left out; touching objects of one class stay
    ``OBJECT_GAP`` px apart, so the connected regions of ``labels`` are the
    objects. ``spacing``, the image's pixel size ((sy, sx) or (sz, sy, sx),
    the last two used), makes that growth measure physical distances
    (:func:`final_growth`); default the card's ``spacing`` when it is one
    pair (the training images' pixel size), else pixels. The other
    parameters are those of :func:`napari_coarseseg.predict`.

    Returns
    -------
    Prediction
        ``labels`` the grown classes, ``probabilities`` T1's class
        probabilities, ``reliability`` None.
    """
    image, device, planes = start_prediction(model, image, device, name)
    rule = recursive_plane_rule(model, epsilon, gate, seed_level, spacing)
    segmentation, labels = [], []
    for maps in iter_predict_planes(model.network, planes, device, rule.maps, tile_size, overlap, batch_size, flips):
        plane_labels, probabilities = rule.finish(maps, keep_probabilities)
        labels.append(plane_labels)
        if keep_probabilities:
            segmentation.append(probabilities)
    return assemble_planes(image, model, labels, segmentation or None)


def _card_pair(spacing):
    """A card's ``spacing`` when it is one [sy, sx] pair (cards before it, or of runs on images of different or no
    pixel size, give None)."""
    if isinstance(spacing, list) and len(spacing) == 2 and all(isinstance(s, (int, float)) for s in spacing):
        return spacing
    return None


def check_card(card: dict) -> None:
    """Refuse a recursive card whose own fields have the wrong type or range (:attr:`Method.check_card`).

    ``epsilon_predict`` (the growth's speed) is a finite number above 0, ``prediction_gate`` a number of pixels
    >= 0 (Infinity: no gate), ``prediction_seed_level`` a share from 0 to 1, the network ``'multitask'`` with
    ``task_levels`` from 1 to its depth and a true/false ``separation``. The generic fields are already checked
    (:func:`~napari_coarseseg.read_card`).

    Raises
    ------
    ModelFileError
        One line naming the field (without the file, which the loader puts in front).
    """
    if "epsilon_predict" in card:
        card_number(card["epsilon_predict"], "epsilon_predict", 0, above=True)
    if "prediction_gate" in card:
        card_number(card["prediction_gate"], "prediction_gate", 0, infinite=True)
    if "prediction_seed_level" in card:
        card_number(card["prediction_seed_level"], "prediction_seed_level", 0, 1)
    network = card["network"]
    if network.get("kind") != "multitask":
        raise card_error("network.kind", "'multitask' for a recursive model", network.get("kind"))
    if "task_levels" in network:
        card_whole(network["task_levels"], "network.task_levels", 1, network["depth"])
    if "separation" in network and not isinstance(network["separation"], bool):
        raise card_error("network.separation", "true or false", network["separation"])


def build_model(card: dict) -> Model:
    """The untrained multi-task U-Net a recursive card describes."""
    network = card["network"]
    if network.get("kind") != "multitask":
        raise ModelFileError(f"unknown network kind {network.get('kind')!r} for a recursive model; "
                             "expected 'multitask'")
    return Model(MultiTaskUNet(input_channels(card), card["n_classes"] + 1, int(network["base_channels"]),
                               int(network["depth"]), task_levels=int(network.get("task_levels", 2)),
                               separation=bool(network.get("separation", False))), torch.nn.ModuleList(), card)


RECURSIVE = Method(
    name="recursive",
    title="partial masks on many images plus exact masks on a few, grown by a level-set rule "
          "(recursive approximation, IEEE TIP 2021)",
    roles=(
        DrawingRole("partial", "a rough inner region of every object: k = an object of class k", required=True),
        DrawingRole("strong", "exact masks on a few images or slices (a slice counts if it has a non-zero pixel)",
                    required=True),
        DrawingRole("separation", "scribbles (non-zero) on interfaces between touching objects"),
    ),
    preset="recursive",
    train=train_recursive,
    predict=predict_recursive,
    build_model=build_model,
    length=("iterations", "steps"),
    loop=recursive_loop,
    check_card=check_card,
)
