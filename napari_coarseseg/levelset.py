"""The level-set growth of the recursive method ([1]_, eq. 4-6).

After every iteration the approximation regions S (the current partial
masks) grow towards the segmentation network's foreground F:

    phi(i) = epsilon * d(i, B) - d(i, S),      S_new = {i : phi(i) >= 0}

with B the complement of F and d the Euclidean distance to a set (0 inside
it). ``epsilon = 0`` keeps S, a huge ``epsilon`` gives F union S; regions only
grow. With many objects the rule is applied per object, and these rules keep
objects apart:

- each connected component of F (of one class) belongs to the seeds it
  contains: a component without a seed is never added;
- a component holding several seeds is split between them, each pixel going
  to its nearest seed, so touching objects never merge;
- a seed only grows into components of its own class;
- a gap of ``w`` px (default 1) is kept between grown objects of one class
  (:func:`separate_objects`): a grown pixel i of object a becomes background
  when an object b != a of a's class lies within ``w`` px (Chebyshev),

      i -> 0   if  exists j, ||i - j||_inf <= w:  b(j) > a,  or  b(j) < a and j is a seed pixel,

  and seed pixels (the drawn partial regions) never do. The split above
  leaves no gap, and without one the class map of two touching objects
  reads as one connected region; with it, the connected regions of the
  class map are the objects again.

Everything is a distance transform per class, one nearest-neighbour query
per image and two grey-level filters per class; there is no Python loop over
objects or pixels.

Physical distances. The distances of the rule, d(i, B) and d(i, S), are in
pixels by default. With ``spacing=(sy, sx)`` (the pixel size along Y and X,
in any unit: :func:`check_spacing`) they are physical: a step along Y counts
``sy``, along X ``sx``, so on anisotropic pixels (sy != sx) a region grows
as far in microns (or mm) along Y as along X, not as far in pixels. The rule
compares two distances, so it is scale-invariant: one spacing for both axes,
(s, s), gives exactly the result of no spacing (:func:`grow_regions` is
scale-invariant; only the ratio sy / sx matters). What stays in pixels: the
gap of :func:`separate_objects` (``width`` px, Chebyshev: a 1 px line is the
least that keeps two objects apart on the pixel grid, whatever the pixel
size), and the connectivity of :func:`label_regions`.

References
----------
.. [1] R. Ke et al., "Multi-task deep learning for image segmentation using
   recursive approximation tasks", IEEE Transactions on Image Processing 30,
   2021.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

__all__ = ["grow_regions", "label_regions", "separate_objects", "check_spacing"]


def check_spacing(spacing) -> tuple[float, float] | None:
    """A pixel size ``(sy, sx)`` checked: two positive finite numbers (``None`` stays ``None``: pixels).

    Parameters
    ----------
    spacing : sequence of 2 float, or None
        Size of a pixel along Y and along X, in any one unit (micron, mm).

    Returns
    -------
    tuple of 2 float, or None

    Raises
    ------
    ValueError
        One line naming the value, if it is not two positive finite numbers.

    Examples
    --------
    >>> check_spacing([0.5, 1])
    (0.5, 1.0)
    >>> check_spacing((0.5, 0))
    Traceback (most recent call last):
    ...
    ValueError: spacing must be two positive finite numbers (sy, sx), got (0.5, 0)
    """
    if spacing is None:
        return None
    try:
        values = np.asarray(spacing, dtype=np.float64)
    except (TypeError, ValueError):
        values = np.array([np.nan])  # not numbers: refused below with the value as given
    if values.shape != (2,) or not (np.isfinite(values) & (values > 0)).all():
        raise ValueError(f"spacing must be two positive finite numbers (sy, sx), got {spacing!r}")
    return float(values[0]), float(values[1])


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a class mask into objects: the connected regions of each class.

    Parameters
    ----------
    mask : ndarray of int
        (Y, X) class mask, 0 = background, k = class k.

    Returns
    -------
    objects : ndarray of int32
        (Y, X) object ids 1..N (0 = none).
    object_classes : ndarray of int64
        ``object_classes[n]`` is the class of object ``n``; entry 0 is 0.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (Y, X), got shape {mask.shape}")
    objects = np.zeros(mask.shape, dtype=np.int32)
    classes = [0]
    # A loop over classes (a handful), each labelled in one C call.
    for k in np.unique(mask[mask > 0]):
        regions, n = ndi.label(mask == k)
        objects[regions > 0] = regions[regions > 0] + len(classes) - 1
        classes.extend([int(k)] * n)
    return objects, np.asarray(classes, dtype=np.int64)


def _distance_to_other_class(prediction: np.ndarray, spacing=None) -> np.ndarray:
    """d(i, B): for every pixel of class k > 0, the distance (physical with ``spacing``) to the nearest pixel not
    of class k."""
    distance = np.zeros(prediction.shape, dtype=np.float64)
    for k in np.unique(prediction[prediction > 0]):
        inside = prediction == k
        distance[inside] = ndi.distance_transform_edt(inside, sampling=spacing)[inside]
    return distance


def _nearest_seeds(seeds, active, owned, components, spacing):
    """For every ``owned`` pixel (y, x), d(i, S) to the ``active`` seed pixels of its own component and the id of
    the nearest one: one nearest-neighbour query in (y * sy, x * sx, component * far), where "far" exceeds any
    distance in the image, so that other components' seeds never win.

    Only the rim of the active seeds can be nearest to an outside pixel, for any (sy, sx): from an inner seed
    pixel, its 4-neighbour towards the query pixel is a seed pixel and strictly closer.
    """
    scale = np.ones(2) if spacing is None else np.asarray(spacing)
    rim = active & ~ndi.binary_erosion(active)
    far = float(np.dot(seeds.shape, scale)) * 4
    rim_points = np.column_stack([*(np.nonzero(rim) * scale[:, None]), components[rim] * far])
    ys, xs = np.nonzero(owned)
    query_points = np.column_stack([ys * scale[0], xs * scale[1], components[owned] * far])
    distance, index = cKDTree(rim_points).query(query_points)
    return ys, xs, distance, seeds[rim][index]


def grow_regions(
    seeds: np.ndarray,
    seed_classes: np.ndarray,
    prediction: np.ndarray,
    epsilon: float,
    spacing=None,
) -> np.ndarray:
    """One level-set growth of the approximation regions towards the prediction.

    Parameters
    ----------
    seeds : ndarray of int
        (Y, X) object ids of the current approximation regions S (0 = none).
    seed_classes : ndarray of int
        ``seed_classes[n]`` is the class of object ``n`` (entry 0 unused);
        see :func:`label_regions`.
    prediction : ndarray of int
        (Y, X) class map of the segmentation task (0 = background): F is
        its foreground, split into connected components per class.
    epsilon : float
        Growth speed, >= 0. 0 keeps the regions; a large value fills every
        component of F that holds a seed.
    spacing : sequence of 2 float, optional
        Pixel size (sy, sx): d(i, B) and d(i, S) are physical distances
        (see the module docstring). Default None: pixels, as (1, 1). The
        result depends on the ratio sy / sx only: (s, s) gives the result
        of no spacing.

    Returns
    -------
    ndarray
        The grown object ids, same dtype as ``seeds``: every seed pixel keeps
        its id, new pixels take the id of the seed they grew from.

    Notes
    -----
    A pixel of F takes the id of the nearest seed of its own component
    (Euclidean), found for all pixels at once by one nearest-neighbour query
    in which other components are pushed far away; ``d(i, S)`` is measured to
    the part of S inside the pixel's component.

    Examples
    --------
    >>> import numpy as np
    >>> prediction = np.zeros((1, 9), int); prediction[0, 1:8] = 1
    >>> seeds = np.zeros((1, 9), int); seeds[0, 4] = 1
    >>> grow_regions(seeds, np.array([0, 1]), prediction, epsilon=0.5)[0]
    array([0, 0, 0, 1, 1, 1, 0, 0, 0])
    >>> grow_regions(seeds, np.array([0, 1]), prediction, epsilon=100.0)[0]
    array([0, 1, 1, 1, 1, 1, 1, 1, 0])

    Pixels twice as tall as wide (sy = 2, sx = 1) in a bar 5 px wide: d(i, B)
    is 3 at most (to the bar's sides, along X), while d(i, S) along the bar
    grows by 2 per pixel instead of 1, so the region reaches 1 px up and down
    instead of 3 (3 units either way):

    >>> prediction = np.zeros((13, 7), int); prediction[1:12, 1:6] = 1
    >>> seeds = np.zeros((13, 7), int); seeds[6, 3] = 1
    >>> grow_regions(seeds, np.array([0, 1]), prediction, epsilon=1.0)[:, 3]
    array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    >>> grow_regions(seeds, np.array([0, 1]), prediction, epsilon=1.0, spacing=(2.0, 1.0))[:, 3]
    array([0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0])
    """
    seeds = np.asarray(seeds)
    prediction = np.asarray(prediction)
    seed_classes = np.asarray(seed_classes)
    if seeds.ndim != 2 or seeds.shape != prediction.shape:
        raise ValueError(
            f"seeds {seeds.shape} and prediction {prediction.shape} must be 2-D images of one shape"
        )
    if not np.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}")
    if seeds.size and seeds.max() >= len(seed_classes):
        raise ValueError(f"seeds hold id {seeds.max()} but seed_classes has only {len(seed_classes)} entries")
    spacing = check_spacing(spacing)
    if epsilon == 0 or not seeds.any() or not prediction.any():
        return seeds.copy()

    distance_to_background = _distance_to_other_class(prediction, spacing)
    components, _ = label_regions(prediction)
    # Active seed pixels: those inside a component of their own class. A seed
    # owns the components it overlaps; seed pixels elsewhere grow nothing.
    active = (seeds > 0) & (components > 0)
    active &= prediction == np.asarray(seed_classes)[seeds]
    owned = np.isin(components, np.unique(components[active])) & (seeds == 0)
    if not owned.any():
        return seeds.copy()

    ys, xs, distance_to_seeds, nearest = _nearest_seeds(seeds, active, owned, components, spacing)
    grows = epsilon * distance_to_background[owned] >= distance_to_seeds
    grown = seeds.copy()
    grown[ys[grows], xs[grows]] = nearest[grows]
    return grown


def separate_objects(
    ids: np.ndarray,
    width: int = 1,
    keep: np.ndarray | None = None,
    object_classes: np.ndarray | None = None,
) -> np.ndarray:
    """Cut a gap of ``width`` px between touching objects: where two objects meet, one side becomes background.

    A pixel i of object a (not in ``keep``) becomes 0 when a pixel j of
    another object b lies within ``width`` px of it (``||i - j||_inf <=
    width``, so 8-neighbours for ``width=1``) and either b > a, or b < a and
    j is kept:

        i -> 0   if  exists j, ||i - j||_inf <= w:  b(j) > a,  or  b(j) < a and keep(j).

    Afterwards no two pixels of different objects lie within ``width`` px of
    each other, unless both are kept (kept pixels, e.g. the drawn partial
    regions, are never erased, so two kept regions that touch stay touching).
    Every object keeps its kept pixels; single objects are untouched. Two
    grey-level filters per class: no loop over objects or pixels.

    Parameters
    ----------
    ids : ndarray of int
        (Y, X) object ids (0 = background), e.g. from :func:`grow_regions`.
    width : int
        Gap width in pixels, >= 0 (0 returns a copy).
    keep : ndarray of bool, optional
        Pixels never erased (the seeds); default none.
    object_classes : ndarray of int, optional
        ``object_classes[n]`` is the class of object ``n``: only objects of
        one class are kept apart (objects of different classes are told apart
        by their class already). Default: all objects are kept apart.

    Returns
    -------
    ndarray
        The ids, same dtype, with the gaps set to 0.

    Examples
    --------
    >>> ids = np.array([[1, 1, 1, 2, 2, 2]])
    >>> separate_objects(ids)[0]
    array([1, 1, 0, 2, 2, 2])
    >>> separate_objects(ids, keep=ids == 1)[0]  # the kept side stays, the other gives way
    array([1, 1, 1, 0, 2, 2])
    >>> separate_objects(ids, width=2)[0]
    array([1, 0, 0, 2, 2, 2])
    """
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be 2-D (Y, X), got shape {ids.shape}")
    if width < 0 or int(width) != width:
        raise ValueError(f"width must be a whole number >= 0, got {width}")
    keep = np.zeros(ids.shape, bool) if keep is None else np.asarray(keep, bool)
    if keep.shape != ids.shape:
        raise ValueError(f"keep {keep.shape} and ids {ids.shape} must have one shape")
    if width == 0 or not ids.any():
        return ids.copy()
    size = 2 * int(width) + 1
    work = ids.astype(np.int64)
    top = int(work.max()) + 1  # above every id (ndimage passes cval as a double: no dtype maximum)
    if object_classes is None:
        groups = [work]
    else:
        classes = np.asarray(object_classes)[work]
        # A loop over classes (a handful); other classes' objects count as background.
        groups = [np.where(classes == k, work, 0) for k in np.unique(classes[work > 0])]
    erase = np.zeros(ids.shape, bool)
    for group in groups:
        larger_near = ndi.maximum_filter(group, size=size, mode="constant", cval=0) > group
        kept_ids = np.where(keep & (group > 0), group, top)
        kept_smaller_near = ndi.minimum_filter(kept_ids, size=size, mode="constant", cval=top) < group
        erase |= (group > 0) & (larger_near | kept_smaller_near)
    separated = ids.copy()
    separated[erase & ~keep] = 0
    return separated
