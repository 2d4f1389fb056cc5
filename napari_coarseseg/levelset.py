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

__all__ = ["grow_regions", "label_regions", "separate_objects"]


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


def _distance_to_other_class(prediction: np.ndarray) -> np.ndarray:
    """d(i, B): for every pixel of class k > 0, the distance to the nearest pixel not of class k."""
    distance = np.zeros(prediction.shape, dtype=np.float64)
    for k in np.unique(prediction[prediction > 0]):
        inside = prediction == k
        distance[inside] = ndi.distance_transform_edt(inside)[inside]
    return distance


def grow_regions(
    seeds: np.ndarray,
    seed_classes: np.ndarray,
    prediction: np.ndarray,
    epsilon: float,
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
    if epsilon == 0 or not seeds.any() or not prediction.any():
        return seeds.copy()

    distance_to_background = _distance_to_other_class(prediction)
    components, _ = label_regions(prediction)
    # Active seed pixels: those inside a component of their own class. A seed
    # owns the components it overlaps; seed pixels elsewhere grow nothing.
    active = (seeds > 0) & (components > 0)
    active &= prediction == np.asarray(seed_classes)[seeds]
    owned = np.isin(components, np.unique(components[active])) & (seeds == 0)
    if not owned.any():
        return seeds.copy()

    # d(i, S) to the seeds of i's own component, for every pixel at once: a
    # nearest-neighbour query in (y, x, component * far), where "far" exceeds
    # any distance in the image, so that other components' seeds never win.
    # Only the rim of the active seeds can be nearest to an outside pixel.
    rim = active & ~ndi.binary_erosion(active)
    far = float(sum(seeds.shape)) * 4
    rim_points = np.column_stack([*np.nonzero(rim), components[rim] * far])
    ys, xs = np.nonzero(owned)
    query_points = np.column_stack([ys, xs, components[owned] * far])
    distance_to_seeds, index = cKDTree(rim_points).query(query_points)
    nearest = seeds[rim][index]

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
