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
    "ROLE_KEY",
    "validate_image",
    "validate_drawing",
    "spatial_shape",
    "label_dtype",
    "is_rgb",
    "is_lazy",
    "positive_target",
    "background_target",
    "negative_target",
    "simulate",
    "SimulatedDrawings",
]

UNANNOTATED = -1


# The layer.metadata key under which napari layers carry their Role (set by the widgets and the samples).
ROLE_KEY = "coarseseg_role"


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
    if not allow_empty and not drawing.any():
        raise AnnotationError(
            f"{role} drawing {name!r} is empty: nothing is drawn. Paint some pixels "
            "or remove the layer from the training inputs."
        )
    return drawing


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
    if low < 0 or high < low:
        raise AnnotationError(f"{name} must be a non-negative number or a range low-high, got {value!r}")
    return low, high


def simulate(
    labels,
    erode=(2, 4),
    margin: float = 4,
    partial_fraction: float = 0.45,
    instances: bool = False,
    seed: int | None = 0,
) -> SimulatedDrawings:
    """Simulate coarse drawings from a full mask (the protocol of RefineSeg [1]_).

    Parameters
    ----------
    labels : array_like of int
        Full mask, 2-D or 3-D: a class mask (0 = background, k = class k)
        or, with ``instances=True``, an instance mask whose objects are all
        of class 1.
    erode : float or (float, float)
        Positive drawing: every object is eroded by a radius drawn uniformly
        per object from this range (pixels). Objects thinner than their
        radius leave no positive mark.
    margin : float
        Negative drawing: pixels farther than ``margin`` from class k (and
        not of class k) are marked "not k". For several classes, each pixel
        gets the nearest class it is not.
    partial_fraction : float
        Partial masks: the innermost ``partial_fraction`` of each object's
        area (by distance to its border).
    instances : bool
        Read ``labels`` as an instance mask.
    seed : int, optional
        Seed of the per-object erosion radii.

    Returns
    -------
    SimulatedDrawings
        ``positive``, ``negative`` and ``partial`` label arrays of the mask's
        shape, and the class mask used.

    Notes
    -----
    Everything is computed with a few Euclidean distance transforms and
    per-label reductions: no loop over objects or pixels.
    """
    labels = _checked_full_mask(labels, instances)
    if not 0 < partial_fraction <= 1:
        raise AnnotationError(f"partial_fraction must be in (0, 1], got {partial_fraction}")
    low, high = _parse_range(erode, "erode")
    if margin < 0:
        raise AnnotationError(f"margin must be non-negative, got {margin}")

    instance_mask, class_mask = _instance_and_class_masks(labels, instances)
    distance = _distance_inside_objects(instance_mask)
    # Positive: pixels deeper than the object's own random radius.
    rng = np.random.default_rng(seed)
    radius_of_object = rng.uniform(low, high, size=int(instance_mask.max()) + 1)
    positive = np.where(distance > radius_of_object[instance_mask], class_mask, 0)

    dtype = label_dtype(int(class_mask.max()))
    return SimulatedDrawings(
        positive=positive.astype(dtype),
        negative=_negative_beyond(class_mask, margin).astype(dtype),
        partial=_innermost_fraction(instance_mask, class_mask, distance, partial_fraction).astype(dtype),
        classes=class_mask.astype(dtype),
    )


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


def _innermost_fraction(instance_mask, class_mask, distance, fraction: float) -> np.ndarray:
    """The innermost ``fraction`` of each object's area (by ``distance`` inside it), labelled by class.

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
    keep = rank < np.maximum(1, np.round(fraction * counts[sorted_ids]))
    partial = np.zeros(instance_mask.size, dtype=np.int64)
    partial[order[keep]] = class_mask.ravel()[order[keep]]
    return partial.reshape(instance_mask.shape)
