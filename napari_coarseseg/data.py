"""Training data: the training images as planes, normalisation, patch sampling, augmentation.

Images enter as (Y, X), (Z, Y, X), (Y, X, C) or (Z, Y, X, C) NumPy arrays and
leave as lists of (C, Y, X) float32 planes: stacks are handled slice by slice.
:class:`TrainingImages` does this once for every method, and checks each
drawing layer against the image it belongs to. With a slice context k
(2.5-D, :func:`with_slice_context`) every plane also carries the k slices
above and below it as further channels.

Intensities are normalised per channel (:func:`normalize`) over the whole
image, or over each slice on its own (``normalisation="slice"``,
:data:`NORMALISATIONS`): serial sections and z-stacks whose brightness drifts
from slice to slice look alike to the network only after the second.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from .annotations import (
    AnnotationError,
    channels_last,
    is_lazy,
    is_rgb,
    spatial_shape,
    validate_drawing,
    validate_image,
)
from .levelset import check_spacing

#: What one percentile pair and one mean and deviation per channel are taken over (the card's
#: ``normalisation["per"]``): the whole image (a volume's intensities keep their meaning across slices, as CT's
#: Hounsfield units must), or each slice on its own (sections cut and imaged one by one, whose brightness drifts).
NORMALISATIONS = {"image": "the whole image", "slice": "each slice on its own"}


def check_normalisation(per: str) -> str:
    """``per`` if it is one of :data:`NORMALISATIONS`, else a ``ValueError`` naming them."""
    if per not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {sorted(NORMALISATIONS)} (what the intensities are "
                         f"normalised over), got {per!r}")
    return per

__all__ = [
    "NORMALISATIONS",
    "TrainingImages",
    "one_per_image",
    "in_plane_spacing",
    "spacing_per_image",
    "normalize",
    "normalize_plane",
    "check_normalisation",
    "iter_normalized_planes",
    "with_slice_context",
    "iter_slice_context",
    "to_planes",
    "to_slices",
    "PatchSampler",
    "augment",
]


def one_per_image(layer, n_images: int, role: str) -> list:
    """One drawing layer as one array (or None) per training image.

    ``layer`` is None (no layer), an array (the layer of a single image) or a
    list with one array or None per image.
    """
    if layer is None:
        return [None] * n_images
    per_image = [layer] if isinstance(layer, np.ndarray) or not isinstance(layer, (list, tuple)) else list(layer)
    if len(per_image) != n_images:
        raise AnnotationError(
            f"the {role} layer gives {len(per_image)} arrays for {n_images} images; "
            "give one array per image (None where an image has none)."
        )
    return per_image


def in_plane_spacing(spacing) -> tuple[float, float] | None:
    """The in-plane pixel size (sy, sx) of a (sy, sx) or (sz, sy, sx) voxel size; None stays None.

    Stacks are handled slice by slice, so only the last two sizes (Y, X) are
    used; Z is dropped. ``ValueError`` in one line unless the sizes are 2 or 3
    positive finite numbers.

    Examples
    --------
    >>> in_plane_spacing((50.0, 4.0, 4.0))
    (4.0, 4.0)
    """
    if spacing is None:
        return None
    try:
        values = np.asarray(spacing, dtype=np.float64)
    except (TypeError, ValueError):
        values = np.array([])  # not numbers: refused below with the value as given
    if values.ndim != 1 or values.size not in (2, 3):
        raise ValueError(f"spacing must be 2 numbers (sy, sx) or 3 (sz, sy, sx), got {spacing!r}")
    if not (np.isfinite(values) & (values > 0)).all():
        raise ValueError(f"spacing must be positive finite numbers, (sy, sx) or (sz, sy, sx), got {spacing!r}")
    return check_spacing(values[-2:])


def spacing_per_image(spacing, n_images: int) -> list[tuple[float, float] | None]:
    """One in-plane pixel size (or None) per image from ``spacing``: None, one voxel size for all images, or
    a list with one voxel size (or None) per image (:func:`in_plane_spacing` each)."""
    if spacing is None:
        return [None] * n_images
    per_image = isinstance(spacing, (list, tuple)) and any(s is None or np.ndim(s) == 1 for s in spacing)
    if not per_image:
        return [in_plane_spacing(spacing)] * n_images
    if len(spacing) != n_images:
        raise ValueError(f"{len(spacing)} spacings for {n_images} images; give one spacing for all images or one "
                         "per image (None where an image has none)")
    return [in_plane_spacing(s) for s in spacing]


class TrainingImages:
    """The training images of a run: validated, normalised, cut into (C, Y, X) planes.

    Parameters
    ----------
    images : ndarray or list of ndarray
        (Y, X) images, (Z, Y, X) stacks (slice by slice) or colour images.
    rgb : bool, optional
        Whether the last axis holds colour channels (guessed when omitted).
    names : list of str, optional
        Image names used in messages.
    channel_axis : int, optional
        The axis of every image that holds its channels (microscopy: (C, Y, X),
        (Z, C, Y, X)); it is moved to the end, so ``rgb`` is implied. Drawings
        have the images' shape without it. One channel is a grey image.
    slice_context : int, optional
        2.5-D: every plane also carries the ``slice_context`` slices above
        and below it (of its own image) as channels
        (:func:`with_slice_context`); 0 (the default): slice-wise 2-D. The
        training loop sets the run's (:meth:`set_slice_context`).
    spacing : sequence, optional
        Pixel size of the images, for the methods that measure distances (the
        recursive method's level set): one (sy, sx) or (sz, sy, sx) for all
        images, or a list of one (or None) per image; only (sy, sx) is kept
        (:func:`in_plane_spacing`). Default None: distances in pixels.
    normalisation : {"image", "slice"}, optional
        What intensities are normalised over (:data:`NORMALISATIONS`); the
        training loop sets the run's (:meth:`set_normalisation`).

    Attributes
    ----------
    planes : list of ndarray
        (C * (2k + 1), Y, X) normalised planes (k the slice context; (C, Y, X)
        without one), the slices of all images in order. Each image is
        normalised as a whole before its slices are cut, as in prediction.
    plane_of_image : list of list of int
        Indices into ``planes`` of each image's slices.
    image_shapes : list of tuple
        Spatial shape of each image.
    rgb : bool
    channels : int
    channel_axis : int or None
        The ``channel_axis`` given (recorded in the model card).
    slice_context : int
    normalisation : str
    input_channels : int
        Channels of every plane, what the network takes: ``channels * (2k + 1)``.
    names : list of str
    spacing : list of tuple or None
        Per image, its in-plane pixel size (sy, sx), or None.
    plane_spacing : list of tuple or None
        Per plane (the order of ``planes``), its image's (sy, sx) or None.

    Examples
    --------
    >>> import numpy as np
    >>> images = TrainingImages([np.zeros((4, 8, 8)), np.ones((8, 8))])
    >>> len(images.planes), images.plane_of_image
    (5, [[0, 1, 2, 3], [4]])
    >>> images.set_slice_context(1).input_channels, images.planes[0].shape
    (3, (3, 8, 8))
    """

    def __init__(self, images, rgb: bool | None = None, names=None, channel_axis: int | None = None,
                 slice_context: int = 0, spacing=None, normalisation: str = "image"):
        if isinstance(images, np.ndarray) or not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise AnnotationError("no training image was given")
        self.spacing = spacing_per_image(spacing, len(images))
        self.names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        if len(self.names) != len(images):
            raise AnnotationError(f"{len(self.names)} names for {len(images)} images; give one name per image.")
        self.channel_axis = channel_axis
        if channel_axis is not None:
            if rgb is False:
                raise AnnotationError("rgb=False says the images have no channels but a channel_axis was given; "
                                      "give one of them")
            images = [channels_last(im, channel_axis, name) for im, name in zip(images, self.names, strict=True)]
            rgb = True
        images = [validate_image(im, name, rgb) for im, name in zip(images, self.names, strict=True)]
        self.rgb = is_rgb(images[0]) if rgb is None else bool(rgb)
        self.channels = images[0].shape[-1] if self.rgb else 1
        for im, name in zip(images, self.names, strict=True):
            channels = im.shape[-1] if self.rgb else 1
            if channels != self.channels:
                raise AnnotationError(f"{name} has {channels} channels, {self.names[0]} has {self.channels}; "
                                      "all training images need the same channels.")
        if self.rgb and self.channels == 1:
            # One channel is a grey image: the card then says so, and grey images predict without a channel axis.
            images, self.rgb = [im[..., 0] for im in images], False
        self.planes, self.plane_of_image, self.image_shapes = [], [], []
        for im in images:
            start = len(self.planes)
            self.planes.extend(to_planes(normalize(im, rgb=self.rgb), self.rgb))
            self.plane_of_image.append(list(range(start, len(self.planes))))
            self.image_shapes.append(spatial_shape(im, self.rgb))
        self.slice_context, self.normalisation = 0, "image"
        self.set_normalisation(normalisation).set_slice_context(slice_context)

    def __len__(self) -> int:
        return len(self.image_shapes)

    @property
    def plane_spacing(self) -> list[tuple[float, float] | None]:
        return [self.spacing[i] for i, planes in enumerate(self.plane_of_image) for _ in planes]

    @property
    def input_channels(self) -> int:
        return self.channels * (2 * self.slice_context + 1)

    @property
    def own_channels(self) -> slice:
        """The channels of ``planes`` that hold a plane's own slice (the middle ones with a slice context)."""
        return slice(self.slice_context * self.channels, (self.slice_context + 1) * self.channels)

    def set_slice_context(self, k: int) -> "TrainingImages":
        """Rebuild ``planes`` with ``k`` neighbouring slices on either side (see :func:`with_slice_context`).

        The per-slice planes are not kept beside the context planes: they are
        the context planes' middle channels (:attr:`own_channels`), so memory
        grows by the context only.
        """
        if k == self.slice_context:
            return self
        own = [plane[self.own_channels] for plane in self.planes]
        self.planes = [plane for indices in self.plane_of_image
                       for plane in with_slice_context([own[i] for i in indices], k)]
        self.slice_context = k
        return self

    def set_normalisation(self, per: str) -> "TrainingImages":
        """Normalise each slice on its own (``per="slice"``) instead of the whole image (see :data:`NORMALISATIONS`).

        The planes were normalised per image, an affine map of each channel
        (:func:`normalize` clips nothing), so normalising each of them again
        gives what normalising each raw slice would. The way back needs the
        raw images: a ``ValueError``.
        """
        if check_normalisation(per) == self.normalisation:
            return self
        if per == "image":
            raise ValueError("these training images are normalised slice by slice; build them again with "
                             "normalisation='image'")
        own = [normalize_plane(plane[self.own_channels]) for plane in self.planes]
        self.planes = [plane for indices in self.plane_of_image
                       for plane in with_slice_context([own[i] for i in indices], self.slice_context)]
        self.normalisation = per
        return self

    def check_layer(self, layer, role: str, label: str | None = None) -> list[np.ndarray | None]:
        """One layer validated against every image: an int64 array per image, None where nothing is drawn.

        ``layer`` as :func:`one_per_image` takes it; ``label`` names the
        layer in messages (default: the role).
        """
        checked = []
        for drawing, shape, name in zip(one_per_image(layer, len(self), role), self.image_shapes, self.names,
                                        strict=True):
            if drawing is not None:
                drawing = validate_drawing(drawing, shape, f"{label or role} of {name}", role, allow_empty=True)
            checked.append(drawing if drawing is not None and drawing.any() else None)
        return checked

    def per_plane(self, per_image: list) -> list:
        """Per-image arrays (or None) cut into per-plane arrays (or None), in the order of ``planes``."""
        out = []
        for array, planes, shape in zip(per_image, self.plane_of_image, self.image_shapes, strict=True):
            out.extend([None] * len(planes) if array is None else to_slices(array, len(shape)))
        return out

    def masks_per_image(self, plane_labels: list[np.ndarray]) -> list[np.ndarray]:
        """Regroup per-plane label arrays into one array per image."""
        out = []
        for planes, shape in zip(self.plane_of_image, self.image_shapes, strict=True):
            stacked = np.stack([plane_labels[i] for i in planes])
            out.append(stacked[0] if len(shape) == 2 else stacked)
        return out


def normalize(image: np.ndarray, low: float = 1.0, high: float = 99.8, rgb: bool = False) -> np.ndarray:
    """Robust intensity normalisation to roughly zero mean, unit variance.

    Each channel is mapped so that its ``low`` and ``high`` percentiles become
    0 and 1 (robust min-max), then centred and scaled by its mean and standard
    deviation, as in the RefineSeg setup. Outliers are not clipped.

    Parameters
    ----------
    image : ndarray
        Image; with ``rgb=True`` the last axis holds channels and each channel
        is normalised on its own.
    low, high : float
        Percentiles mapped to 0 and 1.
    rgb : bool
        Whether the last axis holds channels.

    Returns
    -------
    ndarray of float32
        Same shape as ``image``.
    """
    image = np.asarray(image, dtype=np.float32)
    axes = tuple(range(image.ndim - 1)) if rgb else None
    lo, hi = np.percentile(image, [low, high], axis=axes, keepdims=True)
    # In place on one float32 copy: a 4096 x 4096 image needs 64 MB per copy.
    scaled = np.subtract(image, lo, dtype=np.float32)
    scaled /= np.maximum(hi - lo, 1e-6)
    mean = scaled.mean(axis=axes, keepdims=True)
    std = scaled.std(axis=axes, keepdims=True)
    scaled -= mean
    scaled /= np.maximum(std, 1e-6)
    return scaled


def normalize_plane(plane: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """:func:`normalize` of one (C, Y, X) plane, each channel on its own."""
    return np.ascontiguousarray(np.moveaxis(normalize(np.moveaxis(plane, 0, -1), low, high, rgb=True), -1, 0))


def iter_normalized_planes(image, low: float = 1.0, high: float = 99.8, rgb: bool = False, name: str = "image",
                           per: str = "image"):
    """:func:`normalize` then :func:`to_planes`, one plane at a time for lazy arrays.

    With ``per="slice"`` each plane is normalised on its own
    (:func:`normalize_plane`), read one at a time whatever the array. With
    ``per="image"``, in-memory NumPy arrays go through :func:`normalize` as in training. A
    lazy array (dask, zarr, memmap; see ``annotations.is_lazy``) is read twice
    slice by slice, never whole: a first pass gathers the mean and standard
    deviation (float64) and a subsample for the percentiles, a second pass
    yields each normalised (C, Y, X) plane. Same formula as :func:`normalize`,
    so the results agree to float rounding.

    Raises
    ------
    AnnotationError
        If a slice holds NaN or infinite values.
    """
    if check_normalisation(per) == "image" and not is_lazy(image):
        yield from to_planes(normalize(image, low, high, rgb), rgb)
        return
    spatial_ndim = image.ndim - (1 if rgb else 0)
    n_slices = 1 if spatial_ndim == 2 else image.shape[0]

    def read(z):
        plane = np.asarray(image if spatial_ndim == 2 else image[z], dtype=np.float32)
        if not np.isfinite(plane).all():
            raise AnnotationError(f"{name} contains NaN or infinite values (slice {z}); replace them (e.g. with "
                                  "numpy.nan_to_num) before predicting.")
        return plane if rgb else plane[..., None]  # (Y, X, C)

    if per == "slice":
        for z in range(n_slices):
            yield normalize_plane(np.moveaxis(read(z), -1, 0), low, high)
        return
    channels = image.shape[-1] if rgb else 1
    total, total_sq, count, sample = np.zeros(channels), np.zeros(channels), 0, []
    stride = max(1, n_slices // 16)  # percentiles from at most ~16 slices
    for z in range(n_slices):
        plane = read(z).reshape(-1, channels).astype(np.float64)
        total += plane.sum(axis=0)
        total_sq += (plane**2).sum(axis=0)
        count += plane.shape[0]
        if z % stride == 0:
            sample.append(plane.astype(np.float32))
    lo, hi = np.percentile(np.concatenate(sample), [low, high], axis=0)
    span = np.maximum(hi - lo, 1e-6)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0))
    scaled_mean, scaled_std = (mean - lo) / span, np.maximum(std / span, 1e-6)
    for z in range(n_slices):
        scaled = (read(z) - lo.astype(np.float32)) / span.astype(np.float32)
        plane = ((scaled - scaled_mean.astype(np.float32)) / scaled_std.astype(np.float32)).astype(np.float32)
        yield np.ascontiguousarray(np.moveaxis(plane, -1, 0))


def to_planes(image: np.ndarray, rgb: bool) -> list[np.ndarray]:
    """Split an image into a list of (C, Y, X) planes (one per slice of a stack)."""
    spatial_ndim = image.ndim - (1 if rgb else 0)
    if not rgb:
        image = image[..., None]
    if spatial_ndim == 2:
        image = image[None]
    return [np.ascontiguousarray(np.moveaxis(plane, -1, 0)) for plane in image]


def to_slices(array: np.ndarray, spatial_ndim: int) -> list[np.ndarray]:
    """Split a (Y, X) or (Z, Y, X) label array into a list of (Y, X) slices."""
    return [array] if spatial_ndim == 2 else list(array)


def with_slice_context(planes, k: int, at=None) -> list[np.ndarray]:
    """Each (C, Y, X) plane of one image with its ``k`` neighbouring slices on either side as extra channels.

    The 2.5-D input: plane ``z`` becomes the (C * (2k + 1), Y, X) array of
    slices ``z - k, ..., z, ..., z + k`` one after the other, each with its
    C channels in order, so channel ``(j + k) * C + c`` is channel ``c`` of
    slice ``z + j`` and the plane's own channels are ``k * C ... (k + 1) * C - 1``.
    Past either end of the stack the edge slice stands in for the missing
    ones (replicate), so a one-plane (2-D) image becomes its plane repeated
    ``2k + 1`` times: a model trained with context also predicts 2-D images.

    Parameters
    ----------
    planes : sequence of ndarray
        The (C, Y, X) planes of one image, in slice order, all of one shape.
    k : int
        Slices on either side, >= 0; 0 returns the planes themselves.
    at : sequence of int, optional
        Indices of the planes to build (default all): the sliding window of
        :func:`iter_slice_context` asks for one.

    Returns
    -------
    list of ndarray
        One (C * (2k + 1), Y, X) array per index of ``at``.

    Examples
    --------
    >>> planes = [np.full((1, 1, 2), z, dtype=np.float32) for z in range(3)]
    >>> [p[:, 0, 0].tolist() for p in with_slice_context(planes, 1)]  # ends repeat the edge slice
    [[0.0, 0.0, 1.0], [0.0, 1.0, 2.0], [1.0, 2.0, 2.0]]
    >>> rgb = [np.arange(2, dtype=np.float32).reshape(2, 1, 1) + 10 * z for z in range(2)]
    >>> with_slice_context(rgb, 1, at=[0])[0][:, 0, 0].tolist()  # slice-major: (z-1: c0, c1), (z: c0, c1), ...
    [0.0, 1.0, 0.0, 1.0, 10.0, 11.0]
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
        raise ValueError(f"the slice context must be a whole number >= 0, got {k!r}")
    if len(planes) == 0:
        raise ValueError("with_slice_context needs at least one plane")
    shapes = {np.shape(plane) for plane in planes}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"the planes must be (C, Y, X) arrays of one shape, got shapes {sorted(shapes)}")
    at = np.arange(len(planes)) if at is None else np.asarray(at, dtype=np.int64)
    if k == 0:
        return [planes[i] for i in at]
    # Row i: the slices plane at[i] sees; clipping the indices to the stack is the edge replication.
    neighbours = np.clip(at[:, None] + np.arange(-k, k + 1), 0, len(planes) - 1)
    used = np.unique(neighbours)
    stack = np.stack([planes[i] for i in used])  # only the slices asked for: a window stays a window
    context = stack[np.searchsorted(used, neighbours)]  # (len(at), 2k + 1, C, Y, X), one gather
    return list(context.reshape(len(at), -1, *context.shape[-2:]))


def iter_slice_context(planes, k: int):
    """:func:`with_slice_context` on a stream of one image's planes, holding at most ``2k + 1`` of them.

    Prediction reads lazy stacks one plane at a time
    (:func:`iter_normalized_planes`); this keeps that bounded: plane ``z`` is
    yielded once plane ``z + k`` (or the last) has been read, and planes no
    longer anyone's neighbour are dropped. The results equal
    ``with_slice_context(list(planes), k)``: a window is cut short only at
    the ends of the stack, where replication within the window is
    replication within the stack.

    Examples
    --------
    >>> planes = [np.full((1, 1, 1), z, dtype=np.float32) for z in range(4)]
    >>> [p.ravel().tolist() for p in iter_slice_context(iter(planes), 1)]
    [[0.0, 0.0, 1.0], [0.0, 1.0, 2.0], [1.0, 2.0, 3.0], [2.0, 3.0, 3.0]]
    """
    if k == 0:
        yield from planes
        return
    window, first, z, read = [], 0, 0, 0  # window holds planes first .. read - 1; z is the next to yield
    for plane in planes:
        window.append(plane)
        read += 1
        while z + k < read:
            yield with_slice_context(window, k, at=[z - first])[0]
            z += 1
            drop = max(z - k - first, 0)  # plane z - k - 1 is no longer a neighbour of anything to come
            del window[:drop]
            first += drop
    for last in range(z, read):  # the last k planes: the window reaches the end of the stack
        yield with_slice_context(window, k, at=[last - first])[0]


class PatchSampler:
    """Draw random training patches, biased towards drawn pixels.

    Parameters
    ----------
    planes : list of ndarray
        Normalised (C, Y, X) planes.
    targets : list of list of ndarray
        ``targets[s][i]`` is the (Y, X) int target of strategy ``s`` on plane
        ``i`` (-1 where not annotated).
    patch_size : int
        Side of the square patches.
    drawn_fraction : float
        Fraction of patches centred on a drawn pixel (any strategy); the rest
        are centred uniformly at random so that un-drawn regions are seen too,
        on the planes that carry drawings: a plane without any (the usual
        slice of a volume drawn on a few slices) has no pixel in the loss.
    rng : numpy.random.Generator
        Source of randomness (seeded runs are reproducible).

    Notes
    -----
    Planes are padded by half a patch (reflect for the image, -1 for targets),
    so every centre yields a full patch and small images work too.
    """

    def __init__(self, planes, targets, patch_size: int, drawn_fraction: float, rng):
        self.patch_size = patch_size
        self.drawn_fraction = drawn_fraction
        self.rng = rng
        half = patch_size // 2
        pad = ((half, patch_size - half),) * 2
        self.images = [np.pad(p, ((0, 0),) + pad, mode="reflect" if min(p.shape[1:]) > 1 else "edge") for p in planes]
        self.targets = [
            [np.pad(t, pad, constant_values=-1).astype(np.int16) for t in strategy] for strategy in targets
        ]
        self.shapes = [p.shape[1:] for p in planes]
        # Flat indices of drawn pixels per plane, concatenated, so that one
        # vectorised draw picks a drawn pixel uniformly over all planes.
        drawn_per_plane = []
        for i, shape in enumerate(self.shapes):
            drawn = np.zeros(shape, dtype=bool)
            for strategy in targets:
                drawn |= strategy[i] >= 0
            drawn_per_plane.append(np.flatnonzero(drawn))
        self.drawn_plane = np.concatenate(
            [np.full(d.size, i, dtype=np.int64) for i, d in enumerate(drawn_per_plane)]
        )
        self.drawn_index = np.concatenate(drawn_per_plane)
        sizes = np.array([s[0] * s[1] for s in self.shapes], dtype=np.float64)
        # Uniform patches on undrawn planes would carry no supervised pixel: in a volume drawn on 5 slices of 30,
        # a quarter of every batch was spent on nothing. They stay on the drawn planes (all of them if none is).
        drawn_planes = np.zeros(len(self.shapes), bool)
        drawn_planes[self.drawn_plane] = True
        if drawn_planes.any():
            sizes = sizes * drawn_planes
        self.plane_weights = sizes / sizes.sum()
        self.focus_fraction, self.focus_plane, self.focus_index = 0.0, self.drawn_plane[:0], self.drawn_index[:0]

    def focus_on(self, masks, fraction: float) -> None:
        """Centre ``fraction`` of the drawn-pixel patches on the pixels of ``masks`` (one (Y, X) bool per plane):
        a live session's new or erased strokes are learned first."""
        per_plane = [np.flatnonzero(mask) for mask in masks]
        self.focus_plane = np.concatenate([np.full(f.size, i, dtype=np.int64) for i, f in enumerate(per_plane)])
        self.focus_index = np.concatenate(per_plane)
        self.focus_fraction = float(fraction) if self.focus_index.size else 0.0

    def unpadded_targets(self) -> list[list[np.ndarray]]:
        """The targets as given (the padding cut off again)."""
        half = self.patch_size // 2
        return [[t[half:half + shape[0], half:half + shape[1]] for t, shape in zip(strategy, self.shapes, strict=True)]
                for strategy in self.targets]

    def replace_target(self, strategy: int, plane: int, target: np.ndarray) -> None:
        """Swap the target of one strategy on one plane (the recursive method's T2 changes every iteration)."""
        half = self.patch_size // 2
        pad = ((half, self.patch_size - half),) * 2
        self.targets[strategy][plane] = np.pad(target, pad, constant_values=-1).astype(np.int16)

    def uniform_centres(self, n: int, planes) -> np.ndarray:
        """``n`` rows of (plane, y, x) centres drawn uniformly over the given planes."""
        planes = np.asarray(planes, dtype=np.int64)
        sizes = np.array([self.shapes[i][0] * self.shapes[i][1] for i in planes], dtype=np.float64)
        rows = np.empty((n, 3), dtype=np.int64)
        rows[:, 0] = planes[self.rng.choice(len(planes), size=n, p=sizes / sizes.sum())]
        rows[:, 1] = (self.rng.random(n) * np.array([self.shapes[i][0] for i in rows[:, 0]])).astype(np.int64)
        rows[:, 2] = (self.rng.random(n) * np.array([self.shapes[i][1] for i in rows[:, 0]])).astype(np.int64)
        return rows

    def centres(self, n: int) -> np.ndarray:
        """``n`` rows of (plane, y, x) patch centres."""
        rows = np.empty((n, 3), dtype=np.int64)
        on_drawn = self.rng.random(n) < self.drawn_fraction
        if self.drawn_index.size == 0:
            on_drawn[:] = False
        k = int(on_drawn.sum())
        if k:
            pick = self.rng.integers(0, self.drawn_index.size, size=k)
            plane, index = self.drawn_plane[pick], self.drawn_index[pick]
            if self.focus_fraction:
                # Some of them on the focus pixels instead (no draw from the generator otherwise: seeded runs
                # without a focus stay as they were).
                focused = self.rng.random(k) < self.focus_fraction
                chosen = self.rng.integers(0, self.focus_index.size, size=int(focused.sum()))
                plane[focused], index[focused] = self.focus_plane[chosen], self.focus_index[chosen]
            widths = np.array([s[1] for s in self.shapes])[plane]
            rows[on_drawn, 0] = plane
            rows[on_drawn, 1] = index // widths
            rows[on_drawn, 2] = index % widths
        m = n - k
        if m:
            plane = self.rng.choice(len(self.shapes), size=m, p=self.plane_weights)
            heights = np.array([s[0] for s in self.shapes])[plane]
            widths = np.array([s[1] for s in self.shapes])[plane]
            rows[~on_drawn, 0] = plane
            rows[~on_drawn, 1] = (self.rng.random(m) * heights).astype(np.int64)
            rows[~on_drawn, 2] = (self.rng.random(m) * widths).astype(np.int64)
        return rows

    def batch(self, n: int, planes=None) -> tuple[np.ndarray, np.ndarray]:
        """A batch: images (n, C, P, P) float32 and targets (S, n, P, P) int64.

        With ``planes`` (plane indices), the centres are drawn uniformly over
        those planes only.
        """
        p = self.patch_size
        rows = self.centres(n) if planes is None else self.uniform_centres(n, planes)
        # Centre (y, x) in plane coordinates is (y + half, x + half) in padded
        # coordinates, so the patch starts at (y, x).
        images = np.stack([self.images[i][:, y : y + p, x : x + p] for i, y, x in rows])
        targets = np.stack(
            [np.stack([strategy[i][y : y + p, x : x + p] for i, y, x in rows]) for strategy in self.targets]
        ) if self.targets else np.zeros((0, n, p, p))
        return images, targets.astype(np.int64)


#: The ``affine`` augmentation's ranges: rotation (degrees, either way), scaling (a factor within 1 / (1 + s) to
#: 1 + s) and gamma (an exponent within exp(-g) to exp(g)); what the scribble papers on cardiac MRI use, within
#: the variation of a standard view between patients.
AFFINE_ROTATION, AFFINE_SCALING, AFFINE_GAMMA = 20.0, 0.15, 0.4


def _uniform(n: int, generator: torch.Generator, half_width: float) -> torch.Tensor:
    """``n`` draws uniform in ``[-half_width, half_width]``."""
    return (torch.rand(n, generator=generator) * 2 - 1) * half_width


def _dihedral(images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator):
    """Each sample in one of the 8 symmetries of the square."""
    draws = torch.randint(0, 8, (images.shape[0],), generator=generator).tolist()
    out_images, out_targets = [], []
    # A loop over the few samples of a batch, not over pixels.
    for i, code in enumerate(draws):
        image, target = images[i], targets[:, i]
        if code & 4:
            image, target = image.flip(-1), target.flip(-1)
        out_images.append(torch.rot90(image, code & 3, dims=(-2, -1)))
        out_targets.append(torch.rot90(target, code & 3, dims=(-2, -1)))
    return torch.stack(out_images), torch.stack(out_targets, dim=1)


def _affine(images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator):
    """Each sample rotated, scaled and gamma-corrected about the patch centre; no flips (orientation is kept).

    One ``grid_sample`` per tensor for the whole batch: bilinear for the
    images (mirrored at the patch border), nearest for the targets, which
    are -1 (unlabelled) where the rotated patch reaches beyond the original.
    """
    b = images.shape[0]
    angle = _uniform(b, generator, AFFINE_ROTATION * np.pi / 180)
    scale = torch.exp(_uniform(b, generator, float(np.log1p(AFFINE_SCALING))))
    gamma = torch.exp(_uniform(b, generator, AFFINE_GAMMA))
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / scale, -torch.sin(angle) / scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / scale, torch.cos(angle) / scale
    theta = theta.to(images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # Targets as floats shifted by one, so that the zeros padding reads back as -1 (unlabelled).
    shifted = targets.permute(1, 0, 2, 3).float() + 1
    shifted = F.grid_sample(shifted, grid.to(shifted.device), mode="nearest", padding_mode="zeros",
                            align_corners=False)
    targets = (shifted.round().long() - 1).to(targets.dtype).permute(1, 0, 2, 3).contiguous()
    # Gamma on each sample's own [min, max] range, so that it bends the contrast but keeps the range.
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    span = images.amax(dim=(1, 2, 3), keepdim=True) - low
    unit = ((images - low) / span.clamp_min(1e-6)).clamp(0, 1)
    images = unit ** gamma.view(b, 1, 1, 1).to(images.device) * span + low
    return images, targets


def augment(images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator, jitter: float = 0.1,
            kind: str = "dihedral"):
    """Random geometry and mild intensity jitter, per sample.

    Parameters
    ----------
    images : Tensor
        (B, C, P, P) batch.
    targets : Tensor
        (S, B, P, P) targets, transformed with the same geometry.
    generator : torch.Generator
        Seeded source of randomness (on the CPU).
    jitter : float
        Intensities become ``x * (1 + a) + b`` with ``a, b`` uniform in
        ``[-jitter, jitter]`` per sample.
    kind : {"dihedral", "affine"}
        The geometry: one of the 8 flips and quarter turns of the square
        (images without an orientation), or a rotation of up to
        :data:`AFFINE_ROTATION` degrees, a scaling by up to
        :data:`AFFINE_SCALING` and a gamma (images whose orientation means
        something; ``TrainingConfig.augmentation``).

    Returns
    -------
    images, targets : Tensor
    """
    if kind == "dihedral":
        images, targets = _dihedral(images, targets, generator)
    elif kind == "affine":
        images, targets = _affine(images, targets, generator)
    else:
        raise ValueError(f"kind must be 'dihedral' or 'affine', got {kind!r}")
    b = images.shape[0]
    if jitter:
        scale = 1 + (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * jitter
        shift = (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * jitter
        images = images * scale.to(images.device) + shift.to(images.device)
    return images, targets
