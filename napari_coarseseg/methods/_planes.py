"""Each method's plane rule, found by the model's method: what blockwise prediction applies to every block.

A method's ``predict`` (``predict_refineseg``, ``predict_recursive``) streams
an image's normalised planes through the tiled engine
(:func:`~napari_coarseseg.inference.iter_predict_planes`) and turns each
plane's blended maps into labels with its :class:`PlaneRule`
(``refineseg_plane_rule``, ``recursive_plane_rule``). Blockwise prediction
(:mod:`napari_coarseseg.blockwise`: zarr volumes on a cluster, lazy napari
layers) feeds the engine itself, a block at a time, and applies the same
rule, so a block's labels equal the whole image's bit for bit;
``tests/test_zarr_predict.py`` compares both for every method.

The lookup lives here, next to the methods, because nothing outside
``methods/`` may tell methods apart.
"""

from __future__ import annotations

from ..model_io import Model
from ._method import PlaneRule
from .recursive import RECURSIVE, recursive_plane_rule
from .refineseg import REFINESEG, refineseg_plane_rule

__all__ = ["PlaneRule", "plane_rule"]


_RULES = {REFINESEG.name: refineseg_plane_rule, RECURSIVE.name: recursive_plane_rule}


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
