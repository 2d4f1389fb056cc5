"""What the package asks of a training method: the :class:`Method` record the registry holds."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..annotations import AnnotationError
from ..inference import Prediction
from ..model_io import Model
from ..training import TrainingConfig
from ._loop import TrainingRun

__all__ = ["DrawingRole", "Method"]


@dataclass(frozen=True)
class PlaneRule:
    """How a method turns the network's output into one plane's labels.

    Attributes
    ----------
    maps : callable
        The ``maps`` argument of
        :func:`~napari_coarseseg.inference.iter_predict_planes`: the
        network's output on a batch of tiles -> (B, M, h, w) maps to blend.
    finish : callable
        ``finish(maps, keep_probabilities)`` -> ``(labels, probabilities)``:
        the blended (M, Y, X) maps of a plane (or of a block of it, when
        ``local``) -> labels of the method's label dtype and, if asked, the
        (K + 1, Y, X) float32 class probabilities the method reports (else
        None).
    local : bool
        Whether a pixel's label depends on that pixel's maps alone. A local
        rule may be applied to any block of a plane; the recursive method's
        level-set growth follows connected regions across the plane, so its
        planes are predicted whole.
    """

    maps: Callable
    finish: Callable[[np.ndarray, bool], tuple[np.ndarray, np.ndarray | None]]
    local: bool


@dataclass(frozen=True)
class DrawingRole:
    """A kind of drawing layer a method trains from.

    Attributes
    ----------
    name : str
        The role (a :class:`~napari_coarseseg.annotations.Role` value): the
        keyword of the method's ``train`` function, the ``--NAME`` option of
        ``coarseseg train`` and the role of a napari layer.
    meaning : str
        What the user paints in such a layer, for help texts and messages.
    several : bool
        Whether the method takes several layers of this role (one learned
        annotator model each) or at most one.
    required : bool
        Whether training needs a layer of this role.
    """

    name: str
    meaning: str
    several: bool = False
    required: bool = False


@dataclass(frozen=True)
class Method:
    """Everything the rest of the package asks about a training method.

    Attributes
    ----------
    name : str
        The name users type (``--method NAME``) and cards record.
    title : str
        One line saying what the method learns from.
    roles : tuple of DrawingRole
        The drawing layers it trains from, in the order forms show them.
    preset : str
        Its default preset in ``models/``.
    train : callable
        ``train(images, **layers_by_role, config=, n_classes=, seed=, device=,
        rgb=, names=, checkpoint=, resume=, channel_axis=, **overrides)``: the training
        generator (:data:`~napari_coarseseg.methods.TrainingRun`); an
        ``init=`` model to start from where the method can.
    predict : callable
        ``predict(model, image, device=, tile_size=, overlap=, batch_size=,
        name=, keep_probabilities=, flips=, **options)`` -> ``Prediction``.
    build_model : callable
        ``build_model(card)`` -> the untrained :class:`Model` a card
        describes (model loading fills in the weights).
    length : tuple of str
        The settings whose product is the number of optimiser steps, outer
        first: ``("steps",)`` or ``("iterations", "steps")``.
    loop : callable, optional
        ``loop(images, layers, config, seed, device)`` -> the method's
        :class:`~napari_coarseseg.methods.TrainingLoop` on
        :class:`~napari_coarseseg.data.TrainingImages` and drawing layers by
        role, for live sessions (:mod:`napari_coarseseg.live`); ``None`` for a
        method without them.
    live_settings : mapping
        The :class:`~napari_coarseseg.TrainingConfig` fields a live session
        changes from the preset (settings the caller passes win).
    networks : tuple of str
        The values of :attr:`~napari_coarseseg.TrainingConfig.network` it
        trains, the default first (empty: its own network only, the setting
        left at its default).
    check_card : callable, optional
        ``check_card(card)``: refuse a card whose method fields (those
        :func:`~napari_coarseseg.model_io.read_card` does not know, e.g.
        refineseg's ``prior``) have the wrong type or range, with a one-line
        :class:`~napari_coarseseg.ModelFileError` naming the field
        (:func:`~napari_coarseseg.model_io.card_error`; the loader puts the
        file in front). Called by :func:`~napari_coarseseg.load_model` before
        ``build_model``; ``None``: the method reads no field of its own.
    """

    name: str
    title: str
    roles: tuple[DrawingRole, ...]
    preset: str
    train: Callable[..., TrainingRun]
    predict: Callable[..., Prediction]
    build_model: Callable[[dict], Model]
    length: tuple[str, ...] = ("steps",)
    loop: Callable | None = None
    live_settings: Mapping = field(default_factory=dict)
    networks: tuple[str, ...] = ()
    check_card: Callable[[dict], None] | None = None

    @property
    def role_names(self) -> tuple[str, ...]:
        return tuple(role.name for role in self.roles)

    def total_steps(self, config: TrainingConfig) -> int:
        """Optimiser steps a configuration means for this method."""
        return math.prod(int(getattr(config, setting)) for setting in self.length)

    def describe_length(self, config: TrainingConfig) -> str:
        """The length of a run in words, e.g. ``"300 steps"`` or ``"4 iterations of 50 steps"``."""
        return " of ".join(f"{getattr(config, setting)} {setting}" for setting in self.length)

    def start(self, images, layers: Mapping[str, Sequence], **options) -> TrainingRun:
        """The training generator on drawing layers gathered per role.

        ``layers[role]`` is a list of layers (each an array, or a list of one
        array or None per image); a role that takes one layer gets the only
        entry. ``options`` go to ``train`` unchanged.
        """
        unknown = sorted(set(layers) - set(self.role_names))
        if unknown:
            raise AnnotationError(f"the {self.name} method takes no {' or '.join(unknown)} layer")
        arguments = {}
        for role in self.roles:
            given = list(layers.get(role.name) or [])
            if not role.several and len(given) > 1:
                raise AnnotationError(f"the {self.name} method takes one {role.name} layer, {len(given)} were given")
            arguments[role.name] = given if role.several else (given[0] if given else None)
        return self.train(images, **arguments, **options)
