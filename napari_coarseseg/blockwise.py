"""Blockwise prediction: a volume cut into blocks, each predicted on its own, the labels of the whole.

The labels of every block equal, bit for bit, those the whole image gets from
:func:`napari_coarseseg.predict` reading it lazily (a zarr or dask array, one
slice at a time). Two things make a block's result depend on more than its
pixels, and both are reproduced here rather than approximated:

- **Normalisation** uses statistics of the whole image (the card's
  percentiles ``low`` and ``high`` of a sample of slices, the mean and
  standard deviation of all of them; ``data.iter_normalized_planes``). They
  are gathered first, block by block (:func:`iter_normalisation`): per-slice
  sums in float64, added in slice order as the lazy path does, and the two
  percentiles as exact order statistics, found by counting the float32 bit
  patterns of the sample in two passes (a radix selection, memory 65536
  counts per channel) and interpolated by NumPy's own formula. The
  normalised pixels then equal the lazy path's.
- **Tiling.** The engine cuts each plane into tiles of ``tile_size`` on a
  grid of its own (:func:`~napari_coarseseg.inference.tile_starts`), every
  tile is predicted with zero padding at its edges and the tiles are
  blended. A pixel's value therefore depends on which tiles cover it, not
  on a fixed halo. A block is predicted on the *region* spanned by the
  tiles of the whole plane's grid that touch it (:meth:`BlockPlan.region`):
  the engine's own grid on that region is the same tiles, in the same
  order, with the same blending window, so every pixel of the block is the
  same weighted sum of the same tile outputs, added in the same order.

This holds when the network's output on a tile does not depend on the
other tiles in its batch (checked on CPU: the batch size changes no bit) and
on one kind of processor (another instruction set may round differently).
Methods whose labels are not per pixel (the recursive method's level-set
growth, :class:`~napari_coarseseg.methods._planes.PlaneRule`) get whole
planes as blocks.

Memory is bounded by the block: a block's region of input, one plane's maps
on it, one batch of tiles in the network. Blocks cover
:data:`BLOCK_PIXELS` pixels by default, planes up to :data:`WHOLE_PLANE` on
a side uncut; the statistics read at most :data:`STATISTICS_PIXELS` values
at a time.

:class:`BlockwisePrediction` runs all this in one process over a lazy array
(napari's dask layers, with progress per block);
:mod:`napari_coarseseg.zarr_predict` runs the same functions as tasks on a
dask cluster and writes zarr stores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from .annotations import AnnotationError, label_dtype
from .data import iter_slice_context
from .inference import TILE_SIZE, Prediction, check_image_for_model, iter_predict_planes, tile_starts
from .methods._planes import PlaneRule, plane_rule
from .model_io import Model
from .training import select_device

__all__ = ["BlockPlan", "Normalisation", "SliceNormalisation", "Settings", "ArraySource", "BlockwisePrediction",
           "default_block", "check_block", "whole_planes", "iter_normalisation", "predict_block", "exact_percentiles",
           "run_here", "BLOCK_PIXELS", "WHOLE_PLANE"]

#: Pixels of a block (Z x Y x X) by default: 4 M, one plane of 2048 x 2048 or four of 1024 x 1024 (a task of
#: a few seconds: work spreads over the workers, and a lost one costs little).
BLOCK_PIXELS = 2**22
#: Values (pixels x channels) of a slice the statistics pass still reads whole: its float64 sums are then the lazy
#: path's to the bit (64 MB of float32 and 128 MB of float64 at most).
STATISTICS_PIXELS = 2**24
#: Planes up to this side are not cut in Y or X by default (a block of 2048 recomputes a quarter of its tiles).
WHOLE_PLANE = 3072
#: The side of the blocks a larger plane is cut into by default.
BLOCK_SIDE = 2048
#: How many slices of a stack the lazy normalisation samples for its percentiles (``data.iter_normalized_planes``).
SAMPLED_SLICES = 16
_BINS = 1 << 16


@dataclass(frozen=True)
class Settings:
    """How blocks are predicted: the parameters of :func:`napari_coarseseg.predict` that are not method options."""

    device: str = "auto"
    tile_size: int = TILE_SIZE
    overlap: int = 64
    batch_size: int = 4
    flips: bool = False
    keep_probabilities: bool = False


@dataclass(frozen=True)
class BlockPlan:
    """A (Z, Y, X) volume cut into a grid of blocks, and the input region each block's tiles read.

    Attributes
    ----------
    shape : tuple of int
        (Z, Y, X); a 2-D image is one plane, Z = 1.
    block : tuple of int
        (bz, by, bx), the block's size (the last blocks along an axis may be
        smaller).
    tile_size, overlap : int
        The engine's tiling (:func:`~napari_coarseseg.inference.iter_predict_planes`).
    """

    shape: tuple[int, int, int]
    block: tuple[int, int, int]
    tile_size: int = TILE_SIZE
    overlap: int = 64

    def __post_init__(self):
        if len(self.shape) != 3 or len(self.block) != 3 or min(*self.shape, *self.block) < 1:
            raise ValueError(f"blocks need a (Z, Y, X) shape and a block of three sizes >= 1, got shape "
                             f"{self.shape} and block {self.block}")

    @property
    def grid(self) -> tuple[int, int, int]:
        """Blocks along Z, Y and X."""
        return tuple(-(-size // step) for size, step in zip(self.shape, self.block, strict=True))

    def __len__(self) -> int:
        return math.prod(self.grid)

    def indices(self) -> list[tuple[int, int, int]]:
        """Every block's grid index, Z slowest, X fastest."""
        return [tuple(int(i) for i in index) for index in np.ndindex(*self.grid)]

    def bounds(self, index) -> tuple[tuple[int, int], ...]:
        """((z0, z1), (y0, y1), (x0, x1)): the pixels the block ``index`` owns."""
        return tuple((i * step, min((i + 1) * step, size))
                     for i, step, size in zip(index, self.block, self.shape, strict=True))

    def span(self, axis: int, start: int, stop: int) -> tuple[int, int]:
        """The input an axis's [start, stop) needs: from the first to the end of the last tile touching it.

        The tiles are the whole plane's (``tile_starts`` on the axis's full
        length); on the span, the engine's own grid is these same tiles.
        """
        length = self.shape[axis]
        tile = min(self.tile_size, length)
        touching = [s for s in tile_starts(length, tile, self.overlap) if s < stop and s + tile > start]
        return touching[0], touching[-1] + tile

    def region(self, index) -> tuple[tuple[int, int], tuple[int, int]]:
        """((ry0, ry1), (rx0, rx1)): the in-plane input block ``index`` is predicted on."""
        _, (y0, y1), (x0, x1) = self.bounds(index)
        return self.span(1, y0, y1), self.span(2, x0, x1)


def default_block(shape, channels: int = 1, local: bool = True) -> tuple[int, int, int]:
    """The default block of a (Z, Y, X) volume: about :data:`BLOCK_PIXELS` pixels, whole planes where they fit.

    Planes up to :data:`WHOLE_PLANE` on a side (and every plane of a method
    that is not ``local``) are not cut; larger ones are cut into squares of
    :data:`BLOCK_SIDE`. Slices are then stacked up to :data:`BLOCK_PIXELS`
    (divided by the channels: the block's input holds them all).
    """
    z, y, x = shape
    by = y if (not local or y <= WHOLE_PLANE) else BLOCK_SIDE
    bx = x if (not local or x <= WHOLE_PLANE) else BLOCK_SIDE
    return max(1, min(z, BLOCK_PIXELS // (by * bx * max(channels, 1)))), by, bx


# --------------------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class Normalisation:
    """The whole image's normalisation, as ``data.iter_normalized_planes`` computes it for a lazy array.

    Attributes are float64 arrays of one value per channel: the percentiles
    ``lo`` and ``hi``, and the mean and standard deviation of the image after
    ``(x - lo) / (hi - lo)``.
    """

    lo: np.ndarray
    hi: np.ndarray
    scaled_mean: np.ndarray
    scaled_std: np.ndarray
    span: np.ndarray = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "span", np.maximum(self.hi - self.lo, 1e-6))

    @classmethod
    def from_statistics(cls, lo, hi, total, total_sq, count: int) -> "Normalisation":
        """From the percentiles, the per-channel sums of x and x**2 (float64) and the pixel count."""
        span = np.maximum(hi - lo, 1e-6)
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 0))
        # The lazy path's formula, in its order and dtypes: the float32 planes then match bit for bit.
        return cls(lo, hi, (mean - lo) / span, np.maximum(std / span, 1e-6))

    def plane(self, raw: np.ndarray) -> np.ndarray:
        """A (Y, X, C) float32 region of the image normalised: the (C, Y, X) float32 the engine reads."""
        scaled = (raw - self.lo.astype(np.float32)) / self.span.astype(np.float32)
        plane = ((scaled - self.scaled_mean.astype(np.float32)) / self.scaled_std.astype(np.float32)).astype(np.float32)
        return np.ascontiguousarray(np.moveaxis(plane, -1, 0))

    def to_record(self) -> dict:
        """Plain lists of floats (a JSON record; float64 values survive it exactly)."""
        return {key: [float(v) for v in getattr(self, key)] for key in ("lo", "hi", "scaled_mean", "scaled_std")}

    @classmethod
    def from_record(cls, record: dict) -> "Normalisation":
        return cls(*(np.asarray(record[key], dtype=np.float64) for key in ("lo", "hi", "scaled_mean", "scaled_std")))


@dataclass(frozen=True)
class SliceNormalisation:
    """Each slice normalised on its own (a card's ``normalisation["per"] == "slice"``): blocks are whole planes,
    and each goes through the package's own per-slice function, so no statistics pass is needed."""

    low: float = 1.0
    high: float = 99.8

    def plane(self, raw: np.ndarray) -> np.ndarray:
        """A whole (Y, X, C) float32 slice normalised, as the lazy path does it: (C, Y, X) float32."""
        from .data import normalize_plane

        return normalize_plane(np.moveaxis(raw, -1, 0), self.low, self.high)

    def to_record(self) -> dict:
        return {"per": "slice", "low": self.low, "high": self.high}


def normalised_per(model: Model) -> str:
    """What ``model``'s images are normalised over, as its prediction reads it: "image" or "slice"."""
    return getattr(model, "normalisation", "image")


def normalisation_from_record(record: dict):
    """The :class:`Normalisation` or :class:`SliceNormalisation` a ``to_record()`` describes."""
    if record.get("per") == "slice":
        return SliceNormalisation(record["low"], record["high"])
    return Normalisation.from_record(record)


def sampled_stride(n_slices: int) -> int:
    """Every how many slices the lazy normalisation takes one for its percentiles (slices 0, s, 2s, ...)."""
    return max(1, n_slices // SAMPLED_SLICES)


def _float_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned 32-bit keys that sort as the float32 ``values`` do (-0.0 counted as 0.0)."""
    bits = (values + np.float32(0.0)).view(np.uint32)  # adding 0.0 turns -0.0 into 0.0
    return np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def _key_value(key: int) -> np.float32:
    """The float32 whose key (:func:`_float_keys`) is ``key``."""
    bits = key ^ 0x80000000 if key >> 31 else ~key & 0xFFFFFFFF
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def _percentile_indexes(n: int, percentiles) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy's linear ``percentile`` on ``n`` values: the ranks it interpolates between and the weight."""
    quantiles = np.true_divide(np.asarray(percentiles, dtype=np.float64), 100)
    virtual = (n - 1) * quantiles
    previous = np.floor(virtual)
    following = previous + 1
    # As numpy.lib._function_base_impl._get_indexes: past the ends, both ranks are the last (-1) or first.
    previous[virtual >= n - 1] = following[virtual >= n - 1] = -1
    previous[virtual < 0] = following[virtual < 0] = 0
    previous, following = previous.astype(np.intp), following.astype(np.intp)
    gamma = np.asanyarray(virtual - previous, dtype=virtual.dtype)
    return previous % n, following % n, gamma


def exact_percentiles(n: int, percentiles, order_statistic: Callable[[int], np.ndarray]) -> np.ndarray:
    """``np.percentile(sample, percentiles, axis=0)`` of a float32 (n, C) sample from its order statistics.

    ``order_statistic(rank)`` is the (C,) float32 values of that rank
    (0 = smallest) per channel. The interpolation is NumPy's (``_lerp``),
    operation for operation, so the result is the same float64 bits;
    ``tests/test_zarr_predict.py`` checks it against ``np.percentile``.
    """
    previous, following, gamma = _percentile_indexes(n, percentiles)
    a = np.stack([order_statistic(int(rank)) for rank in previous]).astype(np.float32)
    b = np.stack([order_statistic(int(rank)) for rank in following]).astype(np.float32)
    t = gamma.reshape(-1, 1)
    difference = b - a
    result = np.add(a, difference * t)
    np.subtract(b, difference * (1 - t), out=result, where=t >= 0.5, casting="unsafe", dtype=result.dtype)
    return result


def _first_pass(source, plan: BlockPlan, stride: int, name: str, index) -> dict:
    """One block of the statistics: per slice, the float64 sums of x and x**2; the high-half key counts of
    the sampled slices; NaN and infinities refused as the lazy path refuses them."""
    (z0, z1), (y0, y1), (x0, x1) = plan.bounds(index)
    raw = source.read(z0, z1, y0, y1, x0, x1)
    channels = raw.shape[-1]
    # Counts only where a sampled slice is: a cluster sends every block's result back to one process.
    sums, histogram = [], np.zeros((channels, _BINS), dtype=np.int64) if (-z0) % stride < z1 - z0 else None
    for z, plane in zip(range(z0, z1), raw, strict=True):
        if not np.isfinite(plane).all():
            raise AnnotationError(f"{name} contains NaN or infinite values (slice {z}); replace them (e.g. with "
                                  "numpy.nan_to_num) before predicting.")
        values = plane.reshape(-1, channels).astype(np.float64)  # as iter_normalized_planes, for the same sums
        sums.append((z, values.sum(axis=0), (values**2).sum(axis=0)))
        if z % stride == 0:
            keys = _float_keys(plane.reshape(-1, channels))
            for c in range(channels):
                histogram[c] += np.bincount(keys[:, c] >> 16, minlength=_BINS)
    return {"index": index, "sums": sums, "histogram": histogram}


def _second_pass(source, plan: BlockPlan, stride: int, buckets: tuple, index) -> np.ndarray:
    """One block's counts of the low-half keys in the ``(channel, high half)`` buckets, sampled slices only."""
    (z0, z1), (y0, y1), (x0, x1) = plan.bounds(index)
    counts = np.zeros((len(buckets), _BINS), dtype=np.int64)
    sampled = [z for z in range(z0, z1) if z % stride == 0]
    for z in sampled:
        keys = _float_keys(source.read(z, z + 1, y0, y1, x0, x1)[0].reshape(-1, source.channels))
        for row, (c, bucket) in enumerate(buckets):
            inside = keys[:, c][(keys[:, c] >> 16) == bucket]
            counts[row] += np.bincount(inside & 0xFFFF, minlength=_BINS)
    return counts


def run_here(function: Callable, items: Iterable) -> Iterator:
    """Run ``function`` on every item in this process, in order: the runner of :func:`iter_normalisation` and
    :class:`BlockwisePrediction` without a cluster. A runner yields the results as they come, in any order."""
    return map(function, items)


def statistics_plan(shape, channels: int, block) -> BlockPlan:
    """Blocks for the statistics: whole slices where one holds at most :data:`STATISTICS_PIXELS` values (their
    float64 sums are then the lazy path's exactly), else the prediction's blocks in Y and X."""
    z, y, x = shape
    by, bx = (y, x) if y * x * channels <= STATISTICS_PIXELS else block[1:]
    return BlockPlan(tuple(shape), (max(1, min(z, STATISTICS_PIXELS // (by * bx * channels))), by, bx))


def _rank_buckets(histograms: np.ndarray, ranks) -> dict:
    """For each (channel, rank): the high-half bucket holding it and the rank within the bucket."""
    found = {}
    for c, histogram in enumerate(histograms):
        cumulative = np.cumsum(histogram)
        for rank in ranks:
            bucket = int(np.searchsorted(cumulative, rank, side="right"))
            found[c, rank] = bucket, rank - (int(cumulative[bucket - 1]) if bucket else 0)
    return found


def iter_normalisation(source, low: float = 1.0, high: float = 99.8, name: str = "image", runner=run_here,
                       block=None):
    """Generator of the whole image's :class:`Normalisation`, block by block; yields once per block done.

    Parameters
    ----------
    source : ArraySource or similar
        ``shape`` (Z, Y, X), ``channels`` and ``read(z0, z1, y0, y1, x0, x1)``
        -> float32 (z, y, x, C), the values the lazy path reads.
    low, high : float
        The card's percentiles.
    name : str
        How to call the image in error messages.
    runner : callable
        ``runner(function, items)`` -> the results as they come
        (:func:`run_here`, or a cluster's).
    block : tuple of int, optional
        The prediction's block, whose Y and X cut planes too large to read
        whole.

    Returns
    -------
    Normalisation
        As the generator's return value (``yield from``).

    Raises
    ------
    AnnotationError
        If a slice holds NaN or infinite values.
    """
    shape, channels = tuple(source.shape), source.channels
    plan = statistics_plan(shape, channels, block or default_block(shape, channels))
    stride = sampled_stride(shape[0])
    # Results come in any order and are added as they come (a few numbers per slice are kept): the counts are
    # exact in any order; the sums are added below in the lazy path's order.
    parts, histograms = {}, np.zeros((channels, _BINS), dtype=np.int64)
    for part in runner(partial(_first_pass, source, plan, stride, name), plan.indices()):
        for z, total, squares in part["sums"]:
            parts.setdefault(z, []).append((part["index"], total, squares))
        if part["histogram"] is not None:
            histograms += part["histogram"]
        yield
    total, total_sq = np.zeros(channels), np.zeros(channels)
    for z in range(shape[0]):  # slice after slice; a slice cut into blocks adds its parts in block order first
        ordered = sorted(parts.pop(z), key=lambda part: part[0])
        slice_total, slice_squares = ordered[0][1], ordered[0][2]
        for _, part_total, part_squares in ordered[1:]:
            slice_total, slice_squares = slice_total + part_total, slice_squares + part_squares
        total += slice_total
        total_sq += slice_squares
    n = len(range(0, shape[0], stride)) * shape[1] * shape[2]
    previous, following, _ = _percentile_indexes(n, [low, high])
    where = _rank_buckets(histograms, sorted({int(r) for r in (*previous, *following)}))
    buckets = tuple(sorted({(c, bucket) for (c, _), (bucket, _) in where.items()}))
    sampled = [index for index in plan.indices() if any(z % stride == 0 for z in range(*plan.bounds(index)[0]))]
    counts = np.zeros((len(buckets), _BINS), dtype=np.int64)
    for part in runner(partial(_second_pass, source, plan, stride, buckets), sampled):
        counts += part
        yield
    low_counts = dict(zip(buckets, counts, strict=True))

    def order_statistic(rank: int) -> np.ndarray:
        values = []
        for c in range(channels):
            bucket, within = where[c, rank]
            low_half = int(np.searchsorted(np.cumsum(low_counts[c, bucket]), within, side="right"))
            values.append(_key_value((bucket << 16) | low_half))
        return np.array(values, dtype=np.float32)

    lo, hi = exact_percentiles(n, [low, high], order_statistic)
    return Normalisation.from_statistics(lo, hi, total, total_sq, shape[0] * shape[1] * shape[2])


def normalisation_steps(shape, channels: int, block=None) -> int:
    """How many times :func:`iter_normalisation` yields (its blocks, then those holding sampled slices)."""
    plan = statistics_plan(tuple(shape), channels, block or default_block(shape, channels))
    stride = sampled_stride(shape[0])
    sampled = [i for i in plan.indices() if any(z % stride == 0 for z in range(*plan.bounds(i)[0]))]
    return len(plan) + len(sampled)


# --------------------------------------------------------------------------- blocks


def whole_planes(model: Model, rule: PlaneRule) -> str | None:
    """Why ``model``'s blocks must be whole planes (None if they need not): labels that are not per pixel, or
    each slice normalised on its own."""
    if not rule.local:
        return f"the {model.method} method grows regions across whole planes"
    if normalised_per(model) == "slice":
        return "the model normalises each slice on its own"
    return None


def check_block(plan: BlockPlan, model: Model, rule: PlaneRule) -> None:
    """Refuse blocks that cut planes where :func:`whole_planes` says they must not."""
    why = whole_planes(model, rule)
    if why and (plan.block[1] < plan.shape[1] or plan.block[2] < plan.shape[2]):
        raise ValueError(f"{why}: blocks of {plan.block[1]} x {plan.block[2]} would cut its planes of "
                         f"{plan.shape[1]} x {plan.shape[2]}; use blocks of whole planes")


class ArraySource:
    """A lazy (or in-memory) image read block by block as :func:`predict_block` reads it.

    Parameters
    ----------
    image : array_like
        (Y, X) or (Z, Y, X), with a last channel axis when ``rgb``: a dask,
        zarr or memmap array is read only where asked.
    rgb : bool
        Whether the last axis holds channels (the model's ``rgb``).
    """

    def __init__(self, image, rgb: bool = False):
        self.image, self.rgb = image, rgb
        spatial = image.shape[:-1] if rgb else image.shape
        self.planar = len(spatial) == 2
        self.shape = ((1,) if self.planar else ()) + tuple(int(s) for s in spatial)
        self.channels = int(image.shape[-1]) if rgb else 1

    def read(self, z0: int, z1: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Slices z0..z1-1 of the region, float32 (z, y, x, C), converted as the lazy path converts them."""
        part = self.image[y0:y1, x0:x1][None] if self.planar else self.image[z0:z1, y0:y1, x0:x1]
        values = np.asarray(part, dtype=np.float32)
        return values if self.rgb else values[..., None]


def predict_block(model: Model, rule: PlaneRule, source, normalisation: Normalisation, plan: BlockPlan, index,
                  settings: Settings = Settings()) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Predict one block: yields ``(z, labels, probabilities or None)`` per slice of the block.

    The block's region (:meth:`BlockPlan.region`) of its slices, and of
    ``model.slice_context`` slices on either side, is read once, normalised
    with the whole image's :class:`Normalisation`, given slice context as the
    lazy path gives it, predicted by the tiled engine and cut back to the
    block. Only the block's own slices go through the network.

    Returns
    -------
    iterator
        ``labels`` (by, bx) of the method's label dtype; ``probabilities``
        (K + 1, by, bx) float32 when ``settings.keep_probabilities``.
    """
    (z0, z1), (y0, y1), (x0, x1) = plan.bounds(index)
    (ry0, ry1), (rx0, rx1) = plan.region(index)
    check_block(plan, model, rule)
    k = model.slice_context
    first, last = max(0, z0 - k), min(plan.shape[0], z1 + k)
    raw = source.read(first, last, ry0, ry1, rx0, rx1)
    # The window holds the block's neighbours, so within it the context equals the whole stack's (the stack's
    # ends are the window's there); slices outside the block are read for context only.
    context = iter_slice_context((normalisation.plane(plane) for plane in raw), k)
    wanted = (planes for z, planes in zip(range(first, last), context, strict=True) if z0 <= z < z1)
    device = select_device(settings.device)
    model.to(device).eval()
    crop = np.s_[:, y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0]
    maps = iter_predict_planes(model.network, wanted, device, rule.maps, settings.tile_size, settings.overlap,
                               settings.batch_size, settings.flips)
    for z, plane_maps in zip(range(z0, z1), maps, strict=True):
        labels, probabilities = rule.finish(np.ascontiguousarray(plane_maps[crop]), settings.keep_probabilities)
        yield z, labels, probabilities


class BlockwisePrediction:
    """:func:`napari_coarseseg.predict` of a lazy array in one process, block by block, with progress.

    The labels equal ``predict(model, image, ...)``'s (module docstring).
    :meth:`run` is a generator that yields after every block of the
    statistics and of the prediction (:attr:`steps` times in all), so a
    napari thread worker can show progress and stop between blocks.

    Parameters
    ----------
    model : Model
    image : array_like
        As :func:`napari_coarseseg.predict` takes it (channels last for a
        multichannel model).
    device, tile_size, overlap, batch_size, flips, name, keep_probabilities
        As for :func:`napari_coarseseg.predict`.
    block : tuple of int, optional
        (bz, by, bx); default one slice of :func:`default_block`'s.
    **options
        The method's prediction options (``prior_strength``, ``spacing``, ...).
    """

    def __init__(self, model: Model, image, device="auto", tile_size: int = TILE_SIZE, overlap: int = 64,
                 batch_size: int = 4, flips: bool = False, name: str = "image", keep_probabilities: bool = False,
                 block=None, **options):
        if overlap < 0 or overlap >= tile_size:
            raise ValueError(f"overlap must be in [0, tile_size), got {overlap} with tile_size {tile_size}")
        self.model, self.name = model, name
        self.image = check_image_for_model(image, model, name)
        self.rule = plane_rule(model, **options)
        self.source = ArraySource(self.image, model.rgb)
        shape = self.source.shape
        # One slice deep by default: in one process a block costs nothing, and progress then counts slices.
        default = (1, *default_block(shape, self.source.channels, whole_planes(model, self.rule) is None)[1:])
        self.plan = BlockPlan(shape, tuple(block or default), tile_size, overlap)
        check_block(self.plan, model, self.rule)
        self.settings = Settings(str(device), tile_size, overlap, batch_size, flips, keep_probabilities)

    @property
    def steps(self) -> int:
        """How many times :meth:`run` yields."""
        if normalised_per(self.model) == "slice":
            return len(self.plan)
        return normalisation_steps(self.source.shape, self.source.channels, self.plan.block) + len(self.plan)

    def run(self):
        """Generator: yields ``None`` after each block; returns the :class:`~napari_coarseseg.inference.Prediction`
        (labels, probabilities when kept; no reliability)."""
        norm = self.model.card["normalisation"]
        if normalised_per(self.model) == "slice":
            normalisation = SliceNormalisation(norm["low"], norm["high"])
        else:
            normalisation = yield from iter_normalisation(self.source, norm["low"], norm["high"], self.name,
                                                          block=self.plan.block)
        labels = np.zeros(self.source.shape, dtype=label_dtype(self.model.n_classes))
        probabilities = None
        if self.settings.keep_probabilities:
            probabilities = np.zeros((self.model.n_classes + 1, *self.source.shape), dtype=np.float32)
        for index in self.plan.indices():
            _, (y0, y1), (x0, x1) = self.plan.bounds(index)
            for z, plane_labels, plane_probabilities in predict_block(self.model, self.rule, self.source,
                                                                       normalisation, self.plan, index,
                                                                       self.settings):
                labels[z, y0:y1, x0:x1] = plane_labels
                if probabilities is not None:
                    probabilities[:, z, y0:y1, x0:x1] = plane_probabilities
            yield
        if self.source.planar:
            labels = labels[0]
            probabilities = None if probabilities is None else probabilities[:, 0]
        return Prediction(labels=labels, probabilities=probabilities)

    def __call__(self) -> Prediction:
        """Run to the end without progress."""
        run = self.run()
        while True:
            try:
                next(run)
            except StopIteration as stop:
                return stop.value
