"""Annotation roles, validation and simulation of coarse drawings from full masks.

Label conventions (fixed: tests, benchmarks and users rely on them):

- positive layer: 0 = not annotated, k = "this pixel is class k";
- background layer: any non-zero value = "this pixel is background" (the
  positive mark for class 0, which a positive layer cannot hold because 0
  means "not annotated");
- negative layer: 0 = not annotated, k = "this pixel is NOT class k";
- partial layer: 0 = nothing, k = rough inner region of an object of class k;
- strong layer: a full mask (0 = background, k = class k);
- separation layer: non-zero = interface between touching objects.

Internally each drawing becomes a *target*: an ``int64`` array where ``-1``
means "not annotated" and ``0..K`` is a class (for negative targets, the class
the pixel is not).

References
----------
.. [1] A. Du, N. Aung, T. N. Arvanitis, S. K. Piechnik, J. A. C. Lima,
   S. E. Petersen, L. Zhang, "RefineSeg: Dual Coarse-to-Fine Learning for
   Medical Image Segmentation", MICCAI 2025.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "Role",
    "AnnotationError",
    "MAX_CLASSES",
    "ROLE_KEY",
    "validate_image",
    "validate_drawing",
    "check_class_values",
    "class_count",
    "spatial_shape",
    "label_dtype",
    "is_rgb",
    "is_lazy",
    "channels_last",
    "positive_target",
    "background_target",
    "negative_target",
    "simulate",
    "simulate_corrections",
    "SimulatedDrawings",
]

UNANNOTATED = -1

#: The largest class value a drawing or mask may hold (classes 1..MAX_CLASSES; labels fit in uint8). A model's
#: memory grows with the square of the class count (refineseg's transition heads), so a value beyond it is almost
#: always a wrong file (an image, a 0/255 mask) rather than that many classes.
MAX_CLASSES = 255
#: The most classes a run infers from its drawings' largest value alone; beyond it the caller says the count
#: (``n_classes``, ``--classes``). More is nearly always instance ids, an image or a stray value given as class
#: labels (each drawn value is a class: ids 1..150 of nuclei make a 150-class network).
MANY_CLASSES = 32


# The layer.metadata key under which napari layers carry their Role (set by the widgets and the samples).
ROLE_KEY = "coarseseg_role"


#: Roles whose drawings mark pixels with any non-zero value (no class): their values are never bounded.
MARK_ROLES = frozenset({"background", "separation"})


class Role(str, Enum):
    """What a drawing layer says about the pixels it marks."""

    POSITIVE = "positive"
    NEGATIVE = "negative"
    BACKGROUND = "background"
    PARTIAL = "partial"
    STRONG = "strong"
    SEPARATION = "separation"


class AnnotationError(ValueError):
    """An image or drawing that cannot be used; the message says how to fix it."""


def label_dtype(n_classes: int):
    """The smallest unsigned type for labels 0..n_classes."""
    return np.uint8 if n_classes < 256 else np.uint16


def spatial_shape(image, rgb: bool) -> tuple[int, ...]:
    """The shape of ``image`` without its colour axis: the shape its drawings must have."""
    return tuple(image.shape[:-1]) if rgb else tuple(image.shape)


def is_rgb(image: np.ndarray) -> bool:
    """Guess whether the last axis of ``image`` holds colour channels.

    A trailing axis of length 3 or 4 on a 3-D array is read as RGB(A); a stack
    of three or four slices must then be passed with ``rgb=False``.
    """
    return image.ndim == 3 and image.shape[-1] in (3, 4)


def is_lazy(array) -> bool:
    """Whether ``array`` is read on demand: a dask or zarr array, a NumPy memmap, anything array-like
    with a shape that is not an in-memory NumPy array."""
    if isinstance(array, np.memmap):
        return True
    return (not isinstance(array, np.ndarray) and hasattr(array, "shape") and hasattr(array, "dtype")
            and hasattr(array, "__getitem__") and hasattr(array, "ndim"))


def channels_last(image, channel_axis: int, name: str = "image"):
    """``image`` with its channel axis ``channel_axis`` moved to the end: (Y, X, C) or (Z, Y, X, C).

    The package reads several channels on the last axis (the ``rgb`` layout),
    so an explicit channel axis is moved there once and everything after
    (normalisation per channel, planes, the card's channel count) works as
    for colour images. Lazy arrays stay lazy where they can be transposed.

    Parameters
    ----------
    image : array_like
        The image with one channel axis.
    channel_axis : int
        The axis that holds the channels; negative counts from the end.
    name : str
        How to call the image in error messages.

    Returns
    -------
    image : array_like
        The channels on the last axis (a view where possible).

    Raises
    ------
    AnnotationError
        If ``channel_axis`` is not an integer, lies outside the image's axes,
        or the other axes are not (Y, X) or (Z, Y, X).

    Examples
    --------
    >>> import numpy as np
    >>> channels_last(np.zeros((2, 5, 6)), 0).shape
    (5, 6, 2)
    >>> channels_last(np.zeros((4, 2, 5, 6)), -3).shape
    (4, 5, 6, 2)
    """
    # bool is an int to Python, but True as an axis is surely a mistake.
    if isinstance(channel_axis, (bool, np.bool_)) or not isinstance(channel_axis, (int, np.integer)):
        raise AnnotationError(f"channel_axis must be an integer axis of {name}, got {channel_axis!r}")
    if not is_lazy(image):
        image = np.asarray(image)
    ndim = image.ndim
    if ndim not in (3, 4):
        raise AnnotationError(
            f"{name} has shape {tuple(image.shape)}; with a channel axis it needs 3 or 4 axes, the others "
            "(Y, X) or (Z, Y, X). Squeeze or select the axes you want to segment first."
        )
    if not -ndim <= channel_axis < ndim:
        raise AnnotationError(f"channel_axis {channel_axis} is not an axis of {name} (shape {tuple(image.shape)}, "
                              f"{ndim} axes); pass an axis from {-ndim} to {ndim - 1}")
    return np.moveaxis(image, int(channel_axis), -1)


def validate_image(image, name: str = "image", rgb: bool | None = None) -> np.ndarray:
    """Check that ``image`` is a 2-D image, a (Z, Y, X) stack or an RGB image.

    Lazy arrays (:func:`is_lazy`: dask, zarr, memmap) are returned as they
    are, without reading their pixels.

    Parameters
    ----------
    image : array_like
        The image.
    name : str
        How to call the image in error messages (a layer or file name).
    rgb : bool, optional
        Whether the last axis holds colour channels; guessed by :func:`is_rgb`
        when omitted.

    Returns
    -------
    image : ndarray
        The image as a NumPy array (no copy when possible).

    Raises
    ------
    AnnotationError
        If the image has the wrong number of dimensions, is empty or holds
        NaN or infinite values.
    """
    lazy = is_lazy(image)
    if not lazy:
        image = np.asarray(image)
    if rgb is None:
        rgb = is_rgb(image)
    spatial = image.ndim - (1 if rgb else 0)
    if spatial not in (2, 3):
        raise AnnotationError(
            f"{name} has shape {image.shape}; expected (Y, X), (Z, Y, X) or (Y, X, 3). "
            "Squeeze or select the axes you want to segment first."
        )
    if math.prod(image.shape) == 0:
        raise AnnotationError(f"{name} is empty (shape {image.shape}).")
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
        raise AnnotationError(f"{name} has dtype {image.dtype}; expected numbers.")
    if np.issubdtype(image.dtype, np.complexfloating):
        # Dropping the imaginary part silently would segment half of the data.
        raise AnnotationError(f"{name} has complex values ({image.dtype}); segment a real image made from it: its "
                              "magnitude (numpy.abs) or its real part")
    # Lazy arrays are checked slice by slice as they are read (data.iter_normalized_planes).
    if not lazy and np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise AnnotationError(
            f"{name} contains NaN or infinite values; replace them (e.g. with "
            "numpy.nan_to_num) before training or predicting."
        )
    return image


def validate_drawing(
    drawing,
    spatial_shape: tuple[int, ...],
    name: str = "drawing",
    role: Role | str = Role.POSITIVE,
    allow_empty: bool = False,
) -> np.ndarray:
    """Check one drawing layer against its image and return it as ``int64``.

    Parameters
    ----------
    drawing : array_like
        The Labels data.
    spatial_shape : tuple of int
        Shape of the image without its colour axis.
    name : str
        Layer or file name, used in messages.
    role : Role or str
        The layer's role (a method may define roles of its own), used in messages.
    allow_empty : bool
        Accept a layer with nothing drawn (a layer that is empty on one
        image of several); by default an empty layer is refused.

    Raises
    ------
    AnnotationError
        If the shape differs from the image's, the values are not
        non-negative integers, or nothing is drawn (unless ``allow_empty``).

    Examples
    --------
    >>> import numpy as np
    >>> validate_drawing(np.array([[0, 1], [2, 0]], np.uint8), (2, 2)).dtype
    dtype('int64')
    >>> bool(validate_drawing(np.zeros((2, 2), np.uint8), (2, 2), "layer", allow_empty=True).any())
    False
    """
    role = role.value if isinstance(role, Role) else str(role)
    drawing = np.asarray(drawing)
    if drawing.shape != tuple(spatial_shape):
        hint = ""
        if drawing.ndim == len(spatial_shape) - 1:
            hint = " It looks like a 2D drawing on a stack: draw in a Labels layer with the stack's shape."
        raise AnnotationError(
            f"{role} drawing {name!r} has shape {drawing.shape} but the image is "
            f"{tuple(spatial_shape)}; drawings must have the image's shape.{hint}"
        )
    if drawing.dtype == bool:
        drawing = drawing.astype(np.int64)
    elif np.issubdtype(drawing.dtype, np.floating):
        if not np.isfinite(drawing).all() or not np.array_equal(drawing, np.round(drawing)):
            raise AnnotationError(
                f"{role} drawing {name!r} holds non-integer values; labels are "
                "whole numbers 0..K. Save it as an integer (Labels) image."
            )
    elif not np.issubdtype(drawing.dtype, np.integer):
        raise AnnotationError(f"{role} drawing {name!r} has dtype {drawing.dtype}; expected integers.")
    drawing = drawing.astype(np.int64, copy=False)
    if drawing.size and drawing.min() < 0:
        raise AnnotationError(
            f"{role} drawing {name!r} holds negative values ({drawing.min()}); "
            "use 0 for 'not annotated' and 1..K for classes."
        )
    if role not in MARK_ROLES:
        check_class_values(drawing, f"{role} drawing {name!r}")
    if not allow_empty and not drawing.any():
        raise AnnotationError(
            f"{role} drawing {name!r} is empty: nothing is drawn. Paint some pixels "
            "or remove the layer from the training inputs."
        )
    return drawing


def check_class_values(labels: np.ndarray, what: str) -> None:
    """Refuse labels that cannot be classes 1..:data:`MAX_CLASSES`: larger values (an image given as a drawing)
    and a 0/255 binary mask, which would mean 255 classes.

    Examples
    --------
    >>> check_class_values(np.array([0, 1, 2]), "mask")
    >>> check_class_values(np.array([0, 255, 255]), "mask")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    napari_coarseseg.annotations.AnnotationError: mask holds only 0 and 255: a binary mask? ...
    """
    top = int(labels.max()) if labels.size else 0
    if top > MAX_CLASSES:
        raise AnnotationError(f"{what} holds values up to {top}, but labels are classes 1..{MAX_CLASSES} (0: none): "
                              "is it an image rather than a drawing or mask? Give the Labels file")
    if top == 255 and not np.any((labels > 0) & (labels < 255)):
        raise AnnotationError(f"{what} holds only 0 and 255: a binary mask? Classes are 1..K: save it as 0/1, or "
                              "on the command line pass --binary (every non-zero value is class 1)")


def class_count(n_classes, drawn: int, what: str = "a drawing") -> int:
    """The class count K of a run: ``n_classes`` if given (1..:data:`MAX_CLASSES`, at least the largest drawn
    class ``drawn``), else ``drawn`` (at least 1).

    More than :data:`MANY_CLASSES` are inferred only when ``n_classes``
    says so (an :class:`AnnotationError` otherwise).

    Examples
    --------
    >>> class_count(None, 3), class_count(5, 3), class_count(190, 190)
    (3, 5, 190)
    """
    if n_classes is None:
        if drawn > MANY_CLASSES:
            raise AnnotationError(
                f"{what} holds values up to {drawn}, which would make a {drawn}-class network: instance ids, an "
                f"image or a stray value rather than class labels? Give classes 1..K (on the command line "
                f"--binary makes every non-zero value class 1), or say the count: --classes {drawn} (n_classes="
                f"{drawn} in Python) if you mean {drawn} classes")
        return max(int(drawn), 1)
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) \
            or not 1 <= n_classes <= MAX_CLASSES:
        raise AnnotationError(f"the number of classes must be a whole number from 1 to {MAX_CLASSES}, got "
                              f"{n_classes!r}")
    if drawn > n_classes:
        raise AnnotationError(f"{what} holds class {drawn} but the number of classes is {n_classes}; raise it or "
                              "fix the drawing.")
    return int(n_classes)


def positive_target(drawing: np.ndarray) -> np.ndarray:
    """Target of a positive layer: class k where drawn, -1 elsewhere."""
    return np.where(drawing > 0, drawing, UNANNOTATED).astype(np.int64)


def background_target(drawing: np.ndarray) -> np.ndarray:
    """Target of a background layer: class 0 where drawn, -1 elsewhere."""
    return np.where(drawing > 0, 0, UNANNOTATED).astype(np.int64)


def negative_target(drawing: np.ndarray) -> np.ndarray:
    """Target of a negative layer: the excluded class k where drawn, -1 elsewhere."""
    return np.where(drawing > 0, drawing, UNANNOTATED).astype(np.int64)


@dataclass
class SimulatedDrawings:
    """Coarse drawings made from a full mask by :func:`simulate`."""

    positive: np.ndarray
    negative: np.ndarray
    partial: np.ndarray
    classes: np.ndarray  # class mask derived from the input (0..K)


def _instance_and_class_masks(labels: np.ndarray, instances: bool):
    """Return ``(instance_mask, class_mask)`` from a class or instance mask."""
    if instances:
        instance_mask = labels
        class_mask = (labels > 0).astype(np.int64)
    else:
        class_mask = labels
        # Objects are the connected regions of each class: label every class
        # at once by offsetting each class's component ids.
        instance_mask = np.zeros(labels.shape, dtype=np.int64)
        offset = 0
        for k in np.unique(labels[labels > 0]):  # loop over classes, not objects
            components, n = ndi.label(labels == k)
            instance_mask[components > 0] = components[components > 0] + offset
            offset += n
    return instance_mask, class_mask


def _distance_inside_objects(instance_mask: np.ndarray) -> np.ndarray:
    """Euclidean distance from each object pixel to the nearest pixel outside its object.

    Pixels where two objects touch count as outside for both, so touching
    objects are eroded apart. Background pixels get 0.
    """
    padded = np.pad(instance_mask, 1, mode="edge")
    inner = (slice(1, -1),) * instance_mask.ndim
    touches_other = np.zeros(instance_mask.shape, dtype=bool)
    for axis in range(instance_mask.ndim):
        for shift in (-1, 1):
            neighbour = np.roll(padded, shift, axis=axis)[inner]
            touches_other |= (neighbour > 0) & (neighbour != instance_mask)
    return ndi.distance_transform_edt((instance_mask > 0) & ~touches_other)


def _parse_range(value, name: str) -> tuple[float, float]:
    if np.isscalar(value):
        low = high = float(value)
    else:
        low, high = (float(v) for v in value)
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high < low:
        raise AnnotationError(f"{name} must be a non-negative number or a range low-high, got {value!r}")
    return low, high


#: The drawing styles of :func:`simulate`.
STYLES = ("eroded", "scribble")

#: Defaults of the scribble style's parameters (documented in :func:`simulate`).
SCRIBBLE_DEFAULTS = dict(coverage=0.3, brush_width=(3.0, 8.0), edge_noise=2.0, undrawn=0.15, sloppy=0.1,
                         negative_coverage=0.05, bias=0)
#: Default partial fraction of each style: one fraction (eroded) or a per-object range (scribble).
PARTIAL_DEFAULTS = {"eroded": 0.45, "scribble": (0.3, 0.6)}


def simulate(
    labels, erode=None, margin: float = 4, partial_fraction=None, instances: bool = False, seed: int | None = 0,
    *, style: str = "eroded", coverage: float | None = None, brush_width=None, edge_noise: float | None = None,
    undrawn: float | None = None, sloppy: float | None = None, negative_coverage: float | None = None,
    bias: int | None = None,
) -> SimulatedDrawings:
    """Simulate coarse drawings from a full mask: eroded masks (RefineSeg [1]_) or human-like scribbles.

    Parameters
    ----------
    labels : array_like of int
        Full mask, 2-D or 3-D: a class mask (0 = background, k = class k) or,
        with ``instances=True``, an instance mask whose objects are all class 1.
    erode : float or (float, float), optional
        Eroded style only. Positive drawing: every object eroded by a radius
        drawn per object from this range (pixels; default 2-4).
    margin : float
        Negative drawing: only pixels farther than ``margin`` (pixels) from
        class k, and not of class k, are marked "not k"; with several classes,
        the nearest class a pixel is not. Default 4.
    partial_fraction : float or (float, float), optional
        Partial masks: the innermost this fraction of each object's area (by
        distance to its border); a range draws one per object. Default 0.45
        (eroded) or 0.3-0.6 (scribble, with the rough edge of ``edge_noise``).
    instances : bool
        Read ``labels`` as an instance mask.
    seed : int, optional
        Seed of every random choice: the same seed gives the same drawings.
    style : {"eroded", "scribble"}
        ``"eroded"`` (default): eroded expert masks, clean and complete.
        ``"scribble"``: brush strokes as a person draws them, the parameters
        below, each of which the eroded style refuses (AnnotationError).
    coverage : float, optional
        Fraction of each drawn object's area covered by positive strokes,
        approximately (default 0.3; at most the area inside the rough edge).
    brush_width : float or (float, float), optional
        Brush diameter (pixels), drawn per stroke, rounded (default 3-8).
    edge_noise : float, optional
        Standard deviation (pixels) of the smooth noise (correlation about
        8 px) that makes strokes stop at a wobbly line 0 to about twice this
        inside the border, at most half an object's depth (default 2). It
        also roughens the negative margin and the partial masks' border.
    undrawn : float, optional
        Fraction of objects with no positive stroke and no partial mask
        (default 0.15).
    sloppy : float, optional
        Fraction of objects whose strokes may spill 2-3 px (per object) over
        their border into the background, with their class (default 0.1).
    negative_coverage : float, optional
        Fraction of each "not k" region (beyond ``margin`` and the rough
        edge) covered by negative strokes (default 0.05).
    bias : int, optional
        Systematic annotator error (pixels): every positive stroke dilated
        (> 0, unclipped: it spills) or eroded (< 0) by ``abs(bias)`` after
        drawing (default 0). Two annotators with opposite biases are two
        calls, e.g. ``seed=1, bias=2`` and ``seed=2, bias=-2``.

    Returns
    -------
    SimulatedDrawings
        ``positive``, ``negative`` and ``partial`` label arrays of the mask's
        shape, and the class mask used.

    Raises
    ------
    AnnotationError
        A parameter out of range or of the other style, or an unusable mask.

    Notes
    -----
    Eroded: distance transforms and per-label reductions, 3-D distances for
    a stack. Scribble: each round's strokes are random walks generated at
    once as arrays; a stack is drawn slice by slice (walks, brush, depths in
    the plane) with per-object choices shared by its slices and the
    negative regions measured in 3-D.
    """
    scribble = _style_options(style, erode, dict(
        coverage=coverage, brush_width=brush_width, edge_noise=edge_noise, undrawn=undrawn, sloppy=sloppy,
        negative_coverage=negative_coverage, bias=bias))
    fraction = _parse_fraction(PARTIAL_DEFAULTS[style] if partial_fraction is None else partial_fraction)
    radii = _parse_range((2.0, 4.0) if erode is None else erode, "erode")
    if not margin >= 0:
        raise AnnotationError(f"margin must be non-negative, got {margin}")
    labels = _checked_full_mask(labels, instances)

    instance_mask, class_mask = _instance_and_class_masks(labels, instances)
    rng = np.random.default_rng(seed)
    if scribble is None:
        positive, negative, partial = _eroded(instance_mask, class_mask, radii, margin, fraction, rng)
    else:
        positive, negative, partial = _scribbled(instance_mask, class_mask, margin, fraction, scribble, rng)
    dtype = label_dtype(int(class_mask.max()))
    return SimulatedDrawings(positive=positive.astype(dtype), negative=negative.astype(dtype),
                             partial=partial.astype(dtype), classes=class_mask.astype(dtype))


@dataclass(frozen=True)
class _Scribble:
    """The scribble style's parameters, checked (meanings in :func:`simulate`)."""

    coverage: float
    brush_width: tuple[float, float]
    edge_noise: float
    undrawn: float
    sloppy: float
    negative_coverage: float
    bias: int


def simulate_corrections(prediction, truth, largest: int = 8, inset: float = 2.0):
    """Strokes a user would paint on a prediction's worst mistakes (binary: object vs background).

    The mistakes are the connected regions the prediction misses (truth
    object, predicted background) and invents (the reverse). Among those wide
    enough for a stroke (a pixel at least ``inset`` px inside), the ``largest``
    of each kind get a stroke: their pixels at least ``inset`` px inside. A
    user does not trace 1-px rims, and neither does this.

    Parameters
    ----------
    prediction, truth : ndarray
        (Y, X) label arrays; non-zero is object.
    largest : int
        Regions corrected per kind.
    inset : float
        Distance (px) of the strokes from the region's edge.

    Returns
    -------
    positive, negative, regions : ndarray of bool
        The positive strokes (on missed objects), the negative ones (on
        invented objects), and the corrected regions whole.

    Examples
    --------
    >>> truth = np.zeros((20, 20), int); truth[2:10, 2:10] = 1
    >>> prediction = np.zeros((20, 20), int); prediction[12:18, 12:18] = 1
    >>> positive, negative, regions = simulate_corrections(prediction, truth)
    >>> int(positive.sum()), int(negative.sum()), int(regions.sum())
    (36, 16, 100)
    """
    prediction, truth = np.asarray(prediction) > 0, np.asarray(truth) > 0
    positive, negative, regions = (np.zeros(truth.shape, bool) for _ in range(3))
    for wrong, stroke in ((truth & ~prediction, positive), (prediction & ~truth, negative)):
        components, n = ndi.label(wrong)
        if not n:
            continue
        index = np.arange(1, n + 1)
        sizes = ndi.sum_labels(wrong, components, index)
        core = ndi.distance_transform_edt(wrong) >= inset
        wide = ndi.maximum(core, components, index) > 0
        keep = index[wide][np.argsort(sizes[wide])[::-1][:largest]]
        chosen = np.isin(components, keep)
        stroke |= chosen & core
        regions |= chosen
    return positive, negative, regions


def _style_options(style, erode, scribble_given: dict) -> _Scribble | None:
    """The checked scribble parameters (None for the eroded style), or an AnnotationError naming the problem."""
    if style not in STYLES:
        raise AnnotationError(f"style must be one of {', '.join(STYLES)}; got {style!r}")
    given = [name for name, value in scribble_given.items() if value is not None]
    if style == "eroded":
        if given:
            raise AnnotationError(f"{given[0]} applies only to style 'scribble', not 'eroded'")
        return None
    if erode is not None:
        raise AnnotationError("erode applies only to style 'eroded', not 'scribble'")
    values = {**SCRIBBLE_DEFAULTS, **{name: scribble_given[name] for name in given}}
    for name in ("coverage", "undrawn", "sloppy", "negative_coverage"):
        if not 0 <= values[name] <= 1:
            raise AnnotationError(f"{name} must be a fraction in [0, 1], got {values[name]}")
    width = _parse_range(values["brush_width"], "brush_width")
    if width[0] < 1:
        raise AnnotationError(f"brush_width must be at least 1 pixel, got {values['brush_width']!r}")
    if not 0 <= values["edge_noise"] < np.inf:
        raise AnnotationError(f"edge_noise must be a non-negative number of pixels, got {values['edge_noise']}")
    if not (np.isfinite(values["bias"]) and float(values["bias"]).is_integer()):
        raise AnnotationError(f"bias must be a whole number of pixels, got {values['bias']}")
    return _Scribble(**{**values, "brush_width": width, "bias": int(values["bias"])})


def _parse_fraction(value) -> tuple[float, float]:
    """A fraction in (0, 1] or a range of them, as (low, high)."""
    low, high = (value, value) if np.isscalar(value) else tuple(value)
    if not 0 < low <= high <= 1:
        raise AnnotationError(f"partial_fraction must be in (0, 1] (a number or a range low-high), got {value!r}")
    return float(low), float(high)


def _eroded(instance_mask, class_mask, radii, margin, fraction, rng):
    """The eroded style's (positive, negative, partial) (RefineSeg's protocol)."""
    distance = _distance_inside_objects(instance_mask)
    # Positive: pixels deeper than the object's own random radius.
    n_objects = int(instance_mask.max()) + 1
    radius_of_object = rng.uniform(*radii, size=n_objects)
    positive = np.where(distance > radius_of_object[instance_mask], class_mask, 0)
    # One fraction, or one per object drawn after the radii (so the radii do not depend on it).
    share = fraction[0] if fraction[0] == fraction[1] else rng.uniform(*fraction, size=n_objects)
    partial = _innermost_fraction(instance_mask, class_mask, distance, share)
    return positive, _negative_beyond(class_mask, margin), partial


# Scribble style: the walk turns by this many radians per one-pixel step (standard deviation), the
# rough edge's noise is smoothed with this sigma (a correlation length of about 8 px), and strokes
# are at most this many steps long (positive, negative).
TURN_PER_STEP = 0.35
EDGE_SIGMA = 4.0
MAX_STEPS = {"positive": 30, "negative": 80}
TOP_UP_ROUNDS = 6


@dataclass(frozen=True)
class _ObjectChoices:
    """What the annotator decided per object id (shared by all slices of a stack)."""

    class_of: np.ndarray  # class of each object id
    drawn: np.ndarray  # gets positive strokes and a partial mask
    spill: np.ndarray  # pixels a sloppy object's strokes may spill over its border (0: not sloppy)
    share: np.ndarray  # fraction of the object in its partial mask


def _scribbled(instance_mask, class_mask, margin, fraction, options: _Scribble, rng):
    """The scribble style's (positive, negative, partial); a stack is drawn slice by slice."""
    n_objects = int(instance_mask.max()) + 1
    class_of = np.zeros(n_objects, dtype=np.int64)
    class_of[instance_mask] = class_mask
    drawn = rng.random(n_objects) >= options.undrawn
    spill = np.where(rng.random(n_objects) < options.sloppy, rng.uniform(2, 3, n_objects), 0.0)
    drawn[0], spill[0] = False, 0.0  # id 0 is the background, not an object
    objects = _ObjectChoices(class_of, drawn, spill, rng.uniform(*fraction, n_objects))
    field = _rough_field(instance_mask.shape, options.edge_noise, rng)
    # 3-D distances for a stack: farther than the margin in 3-D is farther in every slice too.
    negative_region = _negative_beyond(class_mask, margin + np.abs(field))
    planes = [array.reshape((-1,) + instance_mask.shape[-2:]) for array in (instance_mask, negative_region, field)]
    drawings = [_scribble_plane(*plane, objects, options, rng)  # a loop over slices (one for 2-D)
                for plane in zip(*planes, strict=True)]
    return tuple(np.stack(role).reshape(instance_mask.shape) for role in zip(*drawings, strict=True))


def _scribble_plane(instance, negative_region, field, objects: _ObjectChoices, options: _Scribble, rng):
    """Positive, negative and partial scribbles of one 2-D plane."""
    distance = _distance_inside_objects(instance)
    n_objects = objects.class_of.size
    target = options.coverage * np.bincount(instance.ravel(), minlength=n_objects) * objects.drawn
    owner = _paint_strokes(_positive_region(instance, distance, field, objects.spill), target,
                           options.brush_width, MAX_STEPS["positive"], rng)
    positive = _biased(objects.class_of[owner], options.bias)
    n_classes = int(objects.class_of.max()) + 1
    negative_target = options.negative_coverage * np.bincount(negative_region.ravel(), minlength=n_classes)
    negative = _paint_strokes(negative_region, negative_target, options.brush_width, MAX_STEPS["negative"], rng)
    # Partial: the innermost share by a depth with a rough edge; undrawn objects have none.
    partial = _innermost_fraction(instance, objects.class_of[instance], distance - field, objects.share)
    return positive, negative, np.where(objects.drawn[instance], partial, 0)


def _rough_field(shape, amplitude: float, rng) -> np.ndarray:
    """Smooth noise in pixels (standard deviation ``amplitude``): white noise Gaussian-filtered in each plane."""
    noise = ndi.gaussian_filter(rng.standard_normal(shape), (0,) * (len(shape) - 2) + (EDGE_SIGMA,) * 2,
                                mode="wrap")
    return amplitude * noise / max(float(noise.std()), 1e-12)


def _positive_region(instance, distance, field, spill) -> np.ndarray:
    """Where each object's strokes may go, as its id (0: nowhere).

    Inside the object deeper than the rough edge ``|field|`` (at most half
    the object's depth, so small objects keep their middle); a sloppy
    object's region is instead the object dilated by its spill, over the
    background only.
    """
    ids = np.arange(spill.size)
    depth = np.asarray(ndi.maximum(distance, instance, ids))
    threshold = np.minimum(np.abs(field), 0.5 * depth[instance])
    region = np.where(distance > threshold, instance, 0)
    sloppy = spill[instance] > 0
    if sloppy.any():
        outside, nearest = ndi.distance_transform_edt(~sloppy, return_indices=True)
        nearest_id = instance[tuple(nearest)]
        zone = (outside <= spill[nearest_id]) & ((instance == 0) | sloppy)
        region = np.where(zone, nearest_id, region)
    return region


def _paint_strokes(region, target, width_range, max_steps: int, rng) -> np.ndarray:
    """Brush strokes in each owner's ``region`` until about ``target[owner]`` of its pixels are painted.

    Returns the owner id of every painted pixel (0: unpainted). Strokes
    overlap and get cut where they leave their region, so a few rounds top
    up what is still missing, each round's strokes all generated at once.
    """
    n_owners = target.size
    flat = region.ravel()
    count = np.bincount(flat, minlength=n_owners)
    first = np.cumsum(count) - count  # where each owner's pixels start in `order`
    order = np.argsort(flat, kind="stable")
    target = np.where(count > 0, target, 0.0)
    target[0] = 0
    mean_width = float(np.mean(width_range))
    painted = np.zeros_like(region)
    for round_ in range(TOP_UP_ROUNDS):  # a loop over rounds, not strokes
        missing = target - np.bincount(painted.ravel(), minlength=n_owners)
        # Top-ups only where a real part is missing: a stroke is coarse, and overshoot is worse than a little less.
        missing[(missing <= 0) | ((missing < 0.1 * target) & (round_ > 0))] = 0
        n_strokes = np.ceil(missing / (mean_width * max_steps)).astype(np.int64)
        owner = np.repeat(np.arange(n_owners), n_strokes)
        if owner.size == 0:
            break
        width = np.maximum(1.0, np.round(rng.uniform(*width_range, owner.size)))
        # A stroke of length L covers about width * (L - 1) plus its two round caps (a disc).
        share = missing[owner] / n_strokes[owner] - np.pi * width**2 / 4
        length = np.clip(np.round(share / width) + 1, 1, max_steps).astype(np.int64)
        start = order[first[owner] + (rng.random(owner.size) * count[owner]).astype(np.int64)]
        points, valid = _brush_walks(np.stack(np.unravel_index(start, region.shape), axis=-1), length, rng)
        painted = _paint(painted, region, points, valid, owner, width)
    return painted


def _brush_walks(start, length, rng):
    """Random walks of one-pixel steps whose direction turns smoothly: (points (S, T, 2) int, valid (S, T)).

    The heading is a random start plus the cumulative sum of small random
    turns; stroke s is valid for its first ``length[s]`` points.
    """
    n_steps = int(length.max())
    turn = rng.normal(0.0, TURN_PER_STEP, (start.shape[0], n_steps))
    turn[:, 0] = rng.uniform(0, 2 * np.pi, start.shape[0])
    heading = np.cumsum(turn, axis=1)
    step = np.stack([np.sin(heading), np.cos(heading)], axis=-1)
    step[:, 0] = 0  # the first point is the start
    points = np.rint(start[:, None, :] + np.cumsum(step, axis=1)).astype(np.int64)
    return points, np.arange(n_steps) < length[:, None]


def _paint(painted, region, points, valid, owner, width) -> np.ndarray:
    """Add the strokes to ``painted``: each stroke ends where it first leaves its owner's region (a pen lifted
    at the edge, so a stroke stays one piece), is widened to its brush (one distance transform per brush width)
    and clipped to the owner's region."""
    in_image = np.all((points >= 0) & (points < np.array(region.shape)), axis=-1)
    y, x = np.where(in_image[..., None], points, 0).transpose(2, 0, 1)
    ahead = valid & in_image & (region[y, x] == owner[:, None])
    drawn = np.cumprod(ahead, axis=1).astype(bool)
    y, x = y[drawn], x[drawn]
    point_owner = np.broadcast_to(owner[:, None], valid.shape)[drawn]
    point_width = np.broadcast_to(width[:, None], valid.shape)[drawn]
    for brush in np.unique(point_width):  # a handful of brush widths
        chosen = point_width == brush
        seeds = np.zeros(region.shape, dtype=np.int64)
        seeds[y[chosen], x[chosen]] = point_owner[chosen]
        distance, nearest = ndi.distance_transform_edt(seeds == 0, return_indices=True)
        nearest_owner = seeds[tuple(nearest)]
        painted = np.where((distance <= brush / 2) & (region == nearest_owner), nearest_owner, painted)
    return painted


def _biased(positive, bias: int) -> np.ndarray:
    """``positive`` dilated (bias > 0, not clipped to anything) or eroded (bias < 0) by ``abs(bias)`` pixels."""
    if bias == 0 or not positive.any():
        return positive
    if bias > 0:
        distance, nearest = ndi.distance_transform_edt(positive == 0, return_indices=True)
        return np.where(distance <= bias, positive[tuple(nearest)], 0)
    return np.where(ndi.distance_transform_edt(positive > 0) > -bias, positive, 0)


def _checked_full_mask(labels, instances: bool) -> np.ndarray:
    """``labels`` as an int64 class or instance mask, or an :class:`AnnotationError` saying what is wrong."""
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise AnnotationError(f"labels must be 2-D or 3-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if labels.dtype == bool:
            labels = labels.astype(np.int64)
        else:
            raise AnnotationError(f"labels have dtype {labels.dtype}; a mask holds integers.")
    if labels.min() < 0:
        raise AnnotationError("labels hold negative values; a mask holds 0 (background) and 1..K.")
    if not labels.any():
        raise AnnotationError("labels are all zero: there is no object to simulate drawings from.")
    if not instances:
        check_class_values(labels, "the mask")
    # Count object values only: a mask need not contain background.
    n_values = len(np.unique(labels[labels > 0]))
    if not instances and n_values > 32:
        raise AnnotationError(
            f"labels hold {n_values} distinct values; if this is an instance mask "
            "(one value per object), pass instances=True (--instances on the command line)."
        )
    return labels.astype(np.int64)


def _negative_beyond(class_mask: np.ndarray, margin: float) -> np.ndarray:
    """"Not k" wherever a pixel is farther than ``margin`` from class k, naming the nearest such class.

    Per class, the complement of its dilation by ``margin``: one Euclidean
    distance transform per class.
    """
    nearest_distance = np.full(class_mask.shape, np.inf)
    negative = np.zeros(class_mask.shape, dtype=np.int64)
    for k in range(1, int(class_mask.max()) + 1):  # loop over classes, not objects
        in_class = class_mask == k
        if not in_class.any():
            continue
        distance_to_class = ndi.distance_transform_edt(~in_class)
        eligible = (distance_to_class > margin) & (distance_to_class < nearest_distance)
        negative[eligible] = k
        nearest_distance = np.where(eligible, distance_to_class, nearest_distance)
    return negative


def _innermost_fraction(instance_mask, class_mask, distance, fraction) -> np.ndarray:
    """The innermost ``fraction`` of each object's area (by ``distance`` inside it), labelled by class.

    ``fraction`` is one number or an array of one per object id.

    Pixels are ranked by depth within their object: one lexicographic sort
    groups them by object, deepest first, with no loop over objects.
    """
    flat_ids = instance_mask.ravel()
    object_pixels = np.flatnonzero(flat_ids)
    order = object_pixels[np.lexsort((-distance.ravel()[object_pixels], flat_ids[object_pixels]))]
    sorted_ids = flat_ids[order]
    first_of_object = np.searchsorted(sorted_ids, sorted_ids, side="left")
    rank = np.arange(order.size) - first_of_object
    counts = np.bincount(flat_ids, minlength=int(flat_ids.max()) + 1)
    share = fraction[sorted_ids] if np.ndim(fraction) else fraction
    keep = rank < np.maximum(1, np.round(share * counts[sorted_ids]))
    partial = np.zeros(instance_mask.size, dtype=np.int64)
    partial[order[keep]] = class_mask.ravel()[order[keep]]
    return partial.reshape(instance_mask.shape)
