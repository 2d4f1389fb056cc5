"""What each method does with one plane's blended maps: the part of its prediction that blockwise prediction repeats.

A method's ``predict`` (``predict_refineseg``, ``predict_recursive``) streams
an image's normalised planes through the tiled engine
(:func:`~napari_coarseseg.inference.iter_predict_planes`) and turns each
plane's blended maps into labels. Blockwise prediction
(:mod:`napari_coarseseg.blockwise`: zarr volumes on a cluster, lazy napari
layers) feeds the engine itself, a block at a time, and needs that second
half on its own: a :class:`PlaneRule`. Each rule repeats its method's
per-plane code line for line (same operations, same dtypes), so a block's
labels equal the whole image's bit for bit; ``tests/test_zarr_predict.py``
compares both for every method.

These rules live here, next to the methods, because nothing outside
``methods/`` may tell methods apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..annotations import label_dtype
from ..data import in_plane_spacing
from ..model_io import Model
from .recursive import RECURSIVE, _card_pair, _foreground, _split_tasks, _task_maps, final_growth
from .refineseg import REFINESEG, _maps_with_reliability, adjust_to_prior

__all__ = ["PlaneRule", "plane_rule"]


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


def _refineseg_rule(model: Model, prior_correction: bool = True, prior_strength: float | None = None) -> PlaneRule:
    """``predict_refineseg``'s loop body: prior-corrected probabilities, their argmax."""
    n_labels, prior = model.n_classes + 1, model.card.get("prior")
    if prior_strength is None:
        # As predict_refineseg: cards written before the strength was a setting used the Bayes rule (1).
        prior_strength = float((prior or {}).get("strength", 1.0))
    dtype = label_dtype(model.n_classes)

    def finish(maps: np.ndarray, keep_probabilities: bool):
        probabilities = maps[:n_labels]
        if prior_correction and prior:
            probabilities = adjust_to_prior(probabilities, prior["estimated"], prior["training"], prior_strength)
        return probabilities.argmax(0).astype(dtype), probabilities if keep_probabilities else None

    return PlaneRule(_maps_with_reliability(model.heads), finish, local=True)


def _recursive_rule(model: Model, epsilon: float | None = None, gate: float | None = None,
                    seed_level: float | None = None, spacing=None) -> PlaneRule:
    """``predict_recursive``'s loop body: T1's foreground grown from T2's regions (not local)."""
    # The defaults exactly as predict_recursive resolves them.
    spacing = in_plane_spacing(spacing if spacing is not None else _card_pair(model.card.get("spacing")))
    epsilon = float(model.card.get("epsilon_predict", 1.0) if epsilon is None else epsilon)
    gate = float(model.card.get("prediction_gate", 4.0) if gate is None else gate)
    seed_level = float(model.card.get("prediction_seed_level", 0.0) if seed_level is None else seed_level)
    n_labels, dtype = model.n_classes + 1, label_dtype(model.n_classes)

    def finish(maps: np.ndarray, keep_probabilities: bool):
        probabilities, approximation, interface = _split_tasks(maps, n_labels)
        regions = approximation.argmax(0)
        probability = np.take_along_axis(approximation, regions[None], 0)[0]
        grown = final_growth(_foreground(probabilities, interface), regions, epsilon, gate,
                             probability=probability, seed_level=seed_level, spacing=spacing)
        return grown.astype(dtype), probabilities if keep_probabilities else None

    return PlaneRule(_task_maps, finish, local=False)


_RULES = {REFINESEG.name: _refineseg_rule, RECURSIVE.name: _recursive_rule}


def plane_rule(model: Model, **options) -> PlaneRule:
    """The :class:`PlaneRule` of ``model``'s method with its prediction ``options``.

    ``options`` are those of :func:`napari_coarseseg.predict` for the
    method (``prior_correction``, ``prior_strength``; ``epsilon``, ``gate``,
    ``seed_level``, ``spacing``); an option the method does not take raises
    ``TypeError``, as its ``predict`` would.

    Raises
    ------
    ValueError
        If the method has no plane rule (a method added to the registry
        without one here).
    """
    if model.method not in _RULES:
        raise ValueError(f"blockwise prediction does not know the {model.method} method yet; predict the image "
                         "whole (napari_coarseseg.predict)")
    return _RULES[model.method](model, **options)
