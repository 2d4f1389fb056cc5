"""The inference engine: tiled prediction with overlap blending, for any image size, for every method.

Large planes are cut into overlapping square tiles; each tile's maps (class
probabilities, and whatever else a method asks the network for) are weighted
by a window that falls off linearly over the overlap, summed, and divided by
the summed weights, so tile seams vanish:

    M(i) = sum_t w_t(i) M_t(i) / sum_t w_t(i)

With ``flips=True`` every tile's maps are the mean over the four mirror
images of the tile (none, left-right, up-down, both), each mapped back:
test-time augmentation, four times the work, smoother maps.

Stacks are predicted slice by slice (with a model's slice context, each slice
with its neighbours as channels), lazy arrays (dask, zarr, memmap) read one
slice at a time. The engine knows no method: a method turns the blended
maps into labels (``napari_coarseseg.methods``), and
:func:`napari_coarseseg.predict` picks the method a model was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .annotations import AnnotationError, channels_last, validate_image
from .data import iter_normalized_planes, iter_slice_context
from .networks import fold_batch_norm
from .training import autocast, select_device, use_channels_last

__all__ = [
    "Prediction",
    "TILE_SIZE",
    "predict_planes",
    "iter_predict_planes",
    "softmax_maps",
    "tile_starts",
    "blend_window",
    "check_image_for_model",
    "move_channels_for_model",
    "is_colour_image",
    "assemble_planes",
    "start_prediction",
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
        A per-pixel map some methods add: for refineseg models the heads'
        off-diagonal mass ``1 - trace(A) / L`` averaged over drawing layers,
        high where the model believes a coarse drawing would be wrong.
        ``None`` for other methods.
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


def softmax_maps(output) -> torch.Tensor:
    """The class probabilities of a network that returns logits, or ``(logits, ...)``: the default maps."""
    logits = output[0] if isinstance(output, tuple) else output
    return torch.softmax(logits.float(), dim=1)


def normalised_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy of (M, Y, X) class probabilities over its maximum, log M: 0 where one class is certain, 1 where all
    are equal (the doubt in the live "draw here next" maps).

    >>> normalised_entropy(np.array([[[0.5, 0.9]], [[0.5, 0.1]]])).round(2)
    array([[1.  , 0.47]])
    """
    return -(probabilities * np.log(np.clip(probabilities, 1e-7, None))).sum(0) / np.log(probabilities.shape[0])


#: The mirror images test-time augmentation averages over: flipped axes of a (B, C, h, w) batch.
FLIPS = ((), (-1,), (-2,), (-2, -1))


@torch.no_grad()
def _forward_tiles(network, tiles: torch.Tensor, device, maps, flips: bool = False) -> torch.Tensor:
    """The (B, C, h, w) float32 maps of a batch of (B, channels, h, w) tiles (averaged over FLIPS if ``flips``)."""
    h, w = tiles.shape[-2:]
    divisor = network.divisor
    total = None
    for axes in FLIPS if flips else ((),):
        # Each mirror image is padded and predicted as if it were the tile itself, then mirrored back.
        mirrored = tiles.flip(axes) if axes else tiles
        padded = _pad_to(mirrored, -(-h // divisor) * divisor, -(-w // divisor) * divisor).to(device)
        with autocast(device):
            tile_maps = maps(network(padded)).float()[..., :h, :w]
        tile_maps = tile_maps.flip(axes) if axes else tile_maps
        total = tile_maps if total is None else total + tile_maps
    return total / (len(FLIPS) if flips else 1)


def predict_planes(network, planes, device, maps=softmax_maps, tile_size: int = TILE_SIZE, overlap: int = 64,
                   batch_size: int = 4, flips: bool = False) -> list[np.ndarray]:
    """Blended tiled maps of normalised (C, Y, X) planes: a list of (M, Y, X) float32 arrays.

    See :func:`iter_predict_planes`.
    """
    return list(iter_predict_planes(network, planes, device, maps, tile_size, overlap, batch_size, flips))


def iter_predict_planes(network, planes, device, maps=softmax_maps, tile_size: int = TILE_SIZE, overlap: int = 64,
                        batch_size: int = 4, flips: bool = False):
    """Yield, plane by plane, the network's per-pixel maps blended over overlapping tiles.

    Parameters
    ----------
    network : torch.nn.Module
        A network with a ``divisor`` attribute (inputs are padded to a
        multiple of it). Prediction runs on a copy with its batch norms folded
        and in channels-last format, so the caller's network is left as it
        came (training asks for previews mid-run).
    planes : iterable of ndarray
        Normalised (C, Y, X) planes.
    device : torch.device
    maps : callable
        Turns the network's output on a batch of tiles into (B, M, h, w)
        per-pixel maps to blend, e.g. class probabilities (the default,
        :func:`softmax_maps`) with further maps stacked after them. Runs
        under the device's autocast.
    tile_size, overlap, batch_size : int
        Square tiles of this side overlapping by at least ``overlap`` pixels,
        ``batch_size`` tiles per forward pass.
    flips : bool
        Test-time augmentation: average the maps over the four mirror
        images of every tile (four forward passes per tile).

    Yields
    ------
    ndarray
        (M, Y, X) float32 per plane. Only one plane's maps exist at a time,
        so a long stack costs the memory of one slice (plus what the caller
        keeps).
    """
    network = use_channels_last(fold_batch_norm(network), device)
    for plane in planes:
        _, height, width = plane.shape
        tile_y, tile_x = min(tile_size, height), min(tile_size, width)
        window = blend_window(tile_y, tile_x, overlap)
        corners = [(y, x) for y in tile_starts(height, tile_y, overlap) for x in tile_starts(width, tile_x, overlap)]
        total = None
        weight = np.zeros((height, width), dtype=np.float32)
        source = torch.from_numpy(plane)
        for first in range(0, len(corners), batch_size):
            chunk = corners[first : first + batch_size]
            tiles = torch.stack([source[:, y : y + tile_y, x : x + tile_x] for y, x in chunk])
            tile_maps = _forward_tiles(network, tiles, device, maps, flips).cpu().numpy()
            if total is None:
                total = np.zeros((tile_maps.shape[1], height, width), dtype=np.float32)
            # A loop over the tiles of a batch (a few), each added in one vectorised operation.
            for i, (y, x) in enumerate(chunk):
                total[:, y : y + tile_y, x : x + tile_x] += tile_maps[i] * window
                weight[y : y + tile_y, x : x + tile_x] += window
        yield total / weight


def _channel_hint(model) -> str:
    """How to pass channels that lie on another axis, naming the axis the model was trained with if known."""
    axis = model.card.get("channel_axis")  # None in cards of models trained without one, and before it existed
    given = f" (the model was trained with channel_axis={axis})" if axis is not None else ""
    return f"if its channels lie on another axis, pass channel_axis (--channel-axis){given}"


def check_image_for_model(image, model, name: str = "image"):
    """``image`` validated (:func:`~napari_coarseseg.annotations.validate_image`) and checked against the
    channels ``model`` was trained on; raises :class:`~napari_coarseseg.annotations.AnnotationError`."""
    if model.channels > 1 and np.ndim(image) == 2:
        raise AnnotationError(f"{name} is a grey image (1 channel) but the model was trained on {model.channels} "
                              f"channels; give an image with {model.channels} channels")
    image = validate_image(image, name, rgb=model.rgb if model.channels > 1 else False)
    channels = image.shape[-1] if model.rgb else 1
    if model.rgb and channels != model.channels:
        raise AnnotationError(
            f"{name} has {channels} channels on its last axis but the model was trained on {model.channels}; "
            f"{_channel_hint(model)}, or use a model trained on images like this one."
        )
    if model.channels > 1 and not model.rgb:
        raise AnnotationError(f"the model expects {model.channels} channels; {name} has 1.")
    if not model.rgb and is_colour_image(image):
        raise AnnotationError(
            f"{name} looks like a colour image (shape {image.shape}) but the model was trained on "
            "grey images; convert it to grey or train on colour images."
        )
    return image


def move_channels_for_model(image, model, channel_axis: int | None, name: str = "image"):
    """``image`` with its channel axis ``channel_axis`` moved last, as the model's prediction reads it.

    Refuses, naming both counts, an image whose channel count differs from
    the model's; one channel becomes a grey image (a one-channel model is a
    grey model). ``None`` returns ``image`` as it is.
    """
    if channel_axis is None:
        return image
    image = channels_last(image, channel_axis, name)
    if image.shape[-1] != model.channels:
        raise AnnotationError(f"{name} has {image.shape[-1]} channels on axis {channel_axis} but the model was "
                              f"trained on {model.channels}; give an image with {model.channels} channels or "
                              "use a model trained on images like this one")
    return image[..., 0] if model.channels == 1 else image


def is_colour_image(image) -> bool:
    """A 3-D array whose last axis has 3 or 4 entries and whose first is larger."""
    return image.ndim == 3 and image.shape[-1] in (3, 4) and image.shape[0] > 4


def assemble_planes(image, model, labels, probabilities=None, reliability=None) -> Prediction:
    """A :class:`Prediction` from per-plane results (lists, one entry per plane) in the image's layout."""
    single = image.ndim - (1 if model.rgb else 0) == 2
    labels = labels[0] if single else np.stack(labels)
    probs = None if probabilities is None else (probabilities[0] if single else np.stack(probabilities, axis=1))
    rel = None if reliability is None else (reliability[0] if single else np.stack(reliability))
    return Prediction(labels=labels, probabilities=probs, reliability=rel)


def start_prediction(model, image, device="auto", name: str = "image"):
    """What every method's prediction starts with: ``(image, device, planes)``.

    The image checked against the model (:func:`check_image_for_model`), the
    device resolved with the model moved there in evaluation mode, and the
    image's (C, Y, X) planes normalised as in training (the card's
    normalisation: the whole image at once, or each slice on its own), read one at a time; with the
    card's ``slice_context`` k, each plane with its k neighbouring slices
    on either side as channels (:func:`~napari_coarseseg.data.iter_slice_context`:
    at most 2k + 1 normalised planes held at a time).
    """
    image = check_image_for_model(image, model, name)
    takes = getattr(model.network, "in_channels", model.input_channels)
    if takes != model.input_channels:
        # A card edited by hand (or its slice_context dropped): a clear message instead of a convolution error.
        raise ValueError(f"the model's network takes {takes} input channels but its card says {model.channels} "
                         f"channel(s) with slice_context {model.slice_context} ({model.input_channels}); the card "
                         "does not describe this network")
    device = select_device(device)
    model.to(device).eval()
    norm = model.card["normalisation"]
    planes = iter_normalized_planes(image, norm["low"], norm["high"], model.rgb, name, per=model.normalisation)
    return image, device, iter_slice_context(planes, model.slice_context)
