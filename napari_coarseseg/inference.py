"""Inference: tiled prediction with overlap blending, for any image size.

Large planes are cut into overlapping square tiles; each tile's class
probabilities are weighted by a window that falls off linearly over the
overlap, summed, and divided by the summed weights, so tile seams vanish.
Stacks are predicted slice by slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .annotations import AnnotationError, label_dtype, validate_image
from .data import iter_normalized_planes
from .networks import fold_batch_norm
from .training import autocast, select_device, use_channels_last

__all__ = [
    "Prediction",
    "predict",
    "predict_planes",
    "tile_starts",
    "blend_window",
    "estimate_class_prior",
    "adjust_to_prior",
]


@dataclass
class Prediction:
    """Result of :func:`predict`.

    Attributes
    ----------
    labels : ndarray of uint8 or uint16
        0 = background, 1..K = classes; the image's spatial shape.
    probabilities : ndarray of float32 or None
        Class probabilities, shape ``(K + 1, *spatial_shape)``; None when
        :func:`predict` was asked not to keep them.
    reliability : ndarray of float32 or None
        Refineseg models: the heads' off-diagonal mass ``1 - trace(A) / L``
        averaged over drawing layers, high where the model believes a coarse
        drawing would be wrong. ``None`` for other methods.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    reliability: np.ndarray | None = None


#: Side of the square tiles images are predicted in. 512 rather than 256: a 512 x 512 image is one
#: tile instead of nine overlapping ones, and a large image is computed 1.3 times over instead of 1.7.
TILE_SIZE = 512


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap``."""
    if length <= tile:
        return [0]
    stride = max(tile - overlap, 1)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def blend_window(tile_y: int, tile_x: int, overlap: int) -> np.ndarray:
    """Separable weights rising linearly over ``overlap`` pixels from each tile edge."""

    def ramp(n):
        position = np.arange(n, dtype=np.float32) + 0.5
        edge = np.minimum(position, n - position) / max(overlap, 1)
        return np.clip(edge, 1e-3, 1.0)

    return np.outer(ramp(tile_y), ramp(tile_x))


def _pad_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    pad_y, pad_x = height - x.shape[-2], width - x.shape[-1]
    if pad_y == 0 and pad_x == 0:
        return x
    mode = "reflect" if pad_y < x.shape[-2] and pad_x < x.shape[-1] else "replicate"
    return F.pad(x, (0, pad_x, 0, pad_y), mode=mode)


@torch.no_grad()
def _forward_tiles(network, heads, tiles: torch.Tensor, device):
    """Probabilities (B, L, h, w) and reliability (B, h, w) of a batch of tiles."""
    h, w = tiles.shape[-2:]
    divisor = network.divisor
    padded = _pad_to(tiles, -(-h // divisor) * divisor, -(-w // divisor) * divisor).to(device)
    with autocast(device):
        output = network(padded)
    if isinstance(output, dict):
        # A multi-task network: the softmax of every task (segmentation,
        # approximation, separation if any), one after the other along the class axis.
        probabilities = torch.cat([torch.softmax(logits.float(), dim=1) for logits in output.values()],
                                  dim=1)[..., :h, :w]
        return probabilities, None
    logits, features = output
    probabilities = torch.softmax(logits.float(), dim=1)[..., :h, :w]
    reliability = None
    if heads is not None and len(heads):
        n_labels = probabilities.shape[1]
        with autocast(device):
            traces = [torch.diagonal(head(features).float(), dim1=1, dim2=2).sum(-1) for head in heads]
        reliability = (1 - torch.stack(traces).mean(0) / n_labels)[..., :h, :w]
    return probabilities, reliability


def predict_planes(network, planes, device, heads=None, tile_size: int = TILE_SIZE, overlap: int = 64, batch_size: int = 4):
    """Blend tiled predictions over normalised (C, Y, X) planes.

    Returns
    -------
    probabilities : list of ndarray
        (L, Y, X) float32 per plane.
    reliability : list of ndarray or None
        (Y, X) float32 per plane when ``heads`` are given.
    """
    results = list(iter_predict_planes(network, planes, device, heads, tile_size, overlap, batch_size))
    probabilities = [p for p, _ in results]
    return probabilities, ([r for _, r in results] if heads is not None and len(heads) else None)


def iter_predict_planes(network, planes, device, heads=None, tile_size: int = TILE_SIZE, overlap: int = 64,
                        batch_size: int = 4):
    """:func:`predict_planes` one plane at a time: yields ``(probabilities, reliability or None)``.

    Only one plane's probabilities exist at a time, so a long stack costs the
    memory of one slice (plus what the caller keeps).
    """
    # A folded, channels-last copy: the caller's network (training asks for previews mid-run) is left as it came.
    network = use_channels_last(fold_batch_norm(network), device)
    was_training = heads.training if heads is not None else False
    if heads is not None:
        heads.eval()
    try:
        for plane in planes:
            _, height, width = plane.shape
            tile_y, tile_x = min(tile_size, height), min(tile_size, width)
            window = blend_window(tile_y, tile_x, overlap)
            corners = [(y, x) for y in tile_starts(height, tile_y, overlap) for x in tile_starts(width, tile_x, overlap)]
            n_labels = network.n_classes if hasattr(network, "n_classes") else None
            total = None
            weight = np.zeros((height, width), dtype=np.float32)
            reliability = np.zeros((height, width), dtype=np.float32) if heads is not None and len(heads) else None
            source = torch.from_numpy(plane)
            for first in range(0, len(corners), batch_size):
                chunk = corners[first : first + batch_size]
                tiles = torch.stack([source[:, y : y + tile_y, x : x + tile_x] for y, x in chunk])
                probabilities, tile_reliability = _forward_tiles(network, heads, tiles, device)
                probabilities = probabilities.cpu().numpy()
                if total is None:
                    n_labels = probabilities.shape[1]
                    total = np.zeros((n_labels, height, width), dtype=np.float32)
                for i, (y, x) in enumerate(chunk):
                    total[:, y : y + tile_y, x : x + tile_x] += probabilities[i] * window
                    weight[y : y + tile_y, x : x + tile_x] += window
                    if reliability is not None:
                        reliability[y : y + tile_y, x : x + tile_x] += tile_reliability[i].cpu().numpy() * window
            yield total / weight, (None if reliability is None else reliability / weight)
    finally:
        if heads is not None:
            heads.train(was_training)


def adjust_to_prior(probabilities: np.ndarray, class_prior, training_prior) -> np.ndarray:
    """Re-weight class probabilities from the training prior to ``class_prior``.

    ``p'(y|x) = p(y|x) * class_prior[y] / training_prior[y]``, renormalised
    over the class axis (axis 0). This is the Bayes rule for a change of class
    prior (logit adjustment).
    """
    ratio = np.asarray(class_prior, dtype=np.float64) / np.asarray(training_prior, dtype=np.float64)
    shape = (-1,) + (1,) * (probabilities.ndim - 1)
    adjusted = probabilities * ratio.reshape(shape).astype(np.float32)
    return adjusted / np.maximum(adjusted.sum(axis=0, keepdims=True), 1e-12)


def estimate_class_prior(probabilities, training_prior, iterations: int = 200, tol: float = 1e-6) -> np.ndarray:
    """Class frequencies of images, by EM on a classifier's posteriors (Saerens et al. 2002).

    Parameters
    ----------
    probabilities : list of ndarray
        (L, ...) posteriors of a classifier trained under ``training_prior``.
    training_prior : array_like
        The class prior the classifier's loss implies.

    Returns
    -------
    ndarray
        The class prior that makes the adjusted posteriors' mean equal to it.
    """
    n_labels = probabilities[0].shape[0]
    flat = np.concatenate([p.reshape(n_labels, -1) for p in probabilities], axis=1).astype(np.float64)
    training_prior = np.asarray(training_prior, dtype=np.float64)
    prior = training_prior.copy()
    for _ in range(iterations):
        adjusted = flat * (prior / training_prior)[:, None]
        adjusted /= np.maximum(adjusted.sum(axis=0, keepdims=True), 1e-12)
        new_prior = np.clip(adjusted.mean(axis=1), 1e-6, None)
        new_prior /= new_prior.sum()
        if np.abs(new_prior - prior).max() < tol:
            prior = new_prior
            break
        prior = new_prior
    return prior


def _check_image_for_model(image, model, name: str):
    image = validate_image(image, name, rgb=model.rgb if model.channels > 1 else False)
    channels = image.shape[-1] if model.rgb else 1
    if model.rgb and channels != model.channels:
        raise AnnotationError(
            f"{name} has {channels} channels but the model was trained on {model.channels}; "
            "use a model trained on images like this one."
        )
    if model.channels > 1 and not model.rgb:
        raise AnnotationError(f"the model expects {model.channels} channels; {name} has 1.")
    if not model.rgb and is_colour_image(image):
        raise AnnotationError(
            f"{name} looks like a colour image (shape {image.shape}) but the model was trained on "
            "grey images; convert it to grey or train on colour images."
        )
    return image


def is_colour_image(image) -> bool:
    """A 3-D array whose last axis has 3 or 4 entries and whose first is larger."""
    return image.ndim == 3 and image.shape[-1] in (3, 4) and image.shape[0] > 4


def predict(model, image, device="auto", tile_size: int = TILE_SIZE, overlap: int = 64, batch_size: int = 4,
            name: str = "image", prior_correction: bool = True, keep_probabilities: bool = True) -> Prediction:
    """Segment an image (2-D, a (Z, Y, X) stack slice by slice, or RGB).

    Parameters
    ----------
    model : Model
        A trained model (:func:`napari_coarseseg.load_model`).
    image : array_like
        The image, normalised here as during training.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
    tile_size, overlap : int
        Side of the square tiles and their overlap, in pixels.
    batch_size : int
        Tiles per forward pass.
    name : str
        How to call the image in error messages.
    prior_correction : bool
        Refineseg models: move the probabilities from the class prior the
        loss implies (each drawing layer weighs the same) to the class
        frequencies estimated on the training images (stored in the card).
        ``False`` gives the plain argmax of p(y|x).
    keep_probabilities : bool
        Return the class probabilities. ``False`` keeps only labels (and
        reliability) and streams the planes: memory stays at one slice's
        probabilities however long the stack.

    Returns
    -------
    Prediction
    """
    if overlap < 0 or overlap >= tile_size:
        raise ValueError(f"overlap must be in [0, tile_size), got {overlap} with tile_size {tile_size}")
    if model.method == "recursive":
        from .recursive import predict_recursive

        return predict_recursive(model, image, device=device, tile_size=tile_size, overlap=overlap,
                                 batch_size=batch_size, name=name, keep_probabilities=keep_probabilities)
    image = _check_image_for_model(image, model, name)
    device = select_device(device)
    model.to(device)
    norm = model.card["normalisation"]
    planes = iter_normalized_planes(image, norm["low"], norm["high"], model.rgb, name)
    prior = model.card.get("prior")
    labels, probabilities, reliability = [], [], []
    for plane_probabilities, plane_reliability in iter_predict_planes(model.network, planes, device, model.heads,
                                                                      tile_size, overlap, batch_size):
        if prior_correction and prior:
            plane_probabilities = adjust_to_prior(plane_probabilities, prior["estimated"], prior["training"])
        labels.append(plane_probabilities.argmax(0).astype(label_dtype(model.n_classes)))
        if keep_probabilities:
            probabilities.append(plane_probabilities)
        if plane_reliability is not None:
            reliability.append(plane_reliability)
    return _assemble(image, model, labels, probabilities or None, reliability or None)


def _assemble(image, model, labels, probabilities=None, reliability=None) -> Prediction:
    """Stack per-plane results (lists, one entry per plane) back into the image's layout."""
    single = image.ndim - (1 if model.rgb else 0) == 2
    labels = labels[0] if single else np.stack(labels)
    probs = None if probabilities is None else (probabilities[0] if single else np.stack(probabilities, axis=1))
    rel = None if reliability is None else (reliability[0] if single else np.stack(reliability))
    return Prediction(labels=labels, probabilities=probs, reliability=rel)
