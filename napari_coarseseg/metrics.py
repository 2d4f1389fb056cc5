"""Segmentation metrics: pixel Dice, boundary distance, object matching at an IoU threshold, merges.

For two masks P and T (sets of pixels) and two objects p and t:

    Dice(P, T) = 2 |P n T| / (|P| + |T|)          (1 when both are empty)
    IoU(p, t)  = |p n t| / |p u t|
    HD95(P, T) = 95th percentile of {d(x, dT) : x in dP} u {d(y, dP) : y in dT}

dP is the surface of P (its pixels with a neighbour outside P, the faces
of the array counting as outside) and d(x, dT) the Euclidean distance from
x to the nearest surface pixel of T, in pixels or in the units of
``spacing``: the symmetric 95 % Hausdorff distance of the medical
segmentation papers (as MedPy's ``hd95`` computes it).

Objects are matched one to one, a pair only when IoU(p, t) >= tau, with as
many pairs as possible (as StarDist's ``matching`` does [2]_); matched
predictions are true positives TP, the other predictions false positives FP,
the other true objects false negatives FN:

    precision = TP / (TP + FP),   recall = TP / (TP + FN)
    F1        = 2 TP / (2 TP + FP + FN)
    AP(tau)   = TP / (TP + FP + FN)               ("accuracy" in [2]_)
    mAP       = mean of AP(tau) over the thresholds tau

AP(tau) is the "average precision" of the 2018 Data Science Bowl [1]_. A
ratio whose denominator is 0 (nothing to get wrong) is 1.

A merge is a pair of true objects assigned to one predicted object, where a
true object is assigned to the predicted object (id > 0) that covers the
largest share of its pixels, if that share is at least 50 %:

    merged pairs = sum over predicted objects q of n_q (n_q - 1) / 2,

n_q the number of true objects assigned to q. ``touching_pairs(truth)`` is
the merged pairs of the connected components of the truth's own foreground,
so ``merged_pairs(prediction, truth) - touching_pairs(truth)`` counts the
merges beyond those any foreground-only method must make.

Label images hold ids >= 0 (0 = background); ids need not be consecutive.
A 3-D array is a stack of 2-D slices: ids are relabelled per slice (the same
id in two slices is two objects) and the counts are summed over slices.
Everything is computed from one sparse contingency table of (predicted id,
true id) pixel counts; there is no Python loop over objects or pixels.

References
----------
.. [1] J. C. Caicedo et al., "Nucleus segmentation across imaging
   experiments: the 2018 Data Science Bowl", Nature Methods 16, 2019.
.. [2] U. Schmidt, M. Weigert, C. Broaddus and G. Myers, "Cell Detection
   with Star-convex Polygons", MICCAI 2018.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment

__all__ = [
    "dice",
    "hausdorff95",
    "instances_of",
    "iou_matrix",
    "match_instances",
    "mean_average_precision",
    "merged_pairs",
    "object_f1",
    "touching_pairs",
]

#: IoU thresholds of :func:`mean_average_precision` (the DSB 2018 leaderboard went on to 0.95).
DEFAULT_THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


def _check_labels(array, name: str, ndims: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """``array`` as a bool or integer array of ids >= 0, or a ValueError saying what is wrong."""
    array = np.asarray(array)
    if ndims and array.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {array.shape}")
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        pass
    elif np.issubdtype(array.dtype, np.floating):
        # Labels saved as float are fine; fractions mean a probability map was passed by mistake.
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise ValueError(f"{name} must hold whole-number labels, got fractions or non-finite values")
        array = array.astype(np.int64)
    else:
        raise ValueError(f"{name} must be a bool or integer label array, got dtype {array.dtype}")
    if array.dtype != bool and array.size and array.min() < 0:
        raise ValueError(f"{name} must hold ids >= 0, got {array.min()}")
    return array


def _check_pair(prediction, truth, ndims: tuple[int, ...] = (2, 3)) -> tuple[np.ndarray, np.ndarray]:
    prediction = _check_labels(prediction, "prediction", ndims)
    truth = _check_labels(truth, "truth", ndims)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} must have one shape")
    return prediction, truth


def _check_threshold(threshold) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = np.nan
    # IoU 0 would pair objects that do not overlap at all, which the sparse table does not hold.
    if not 0 < value <= 1:
        raise ValueError(f"an IoU threshold must be a number in (0, 1], got {threshold!r}")
    return value


def _consecutive(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Ids 0..n in the order of the original ids (0 stays background) and the object count n."""
    ids, inverse = np.unique(labels.ravel(), return_inverse=True)
    has_background = ids.size > 0 and ids[0] == 0
    # np.unique sorts, so background (if present) is index 0; without it, shift so that ids start at 1.
    return inverse.reshape(labels.shape) + (0 if has_background else 1), ids.size - int(has_background)


def _objects(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Flat consecutive object ids; a 3-D stack gets separate ids per slice."""
    consecutive, count = _consecutive(labels)
    if labels.ndim == 3:
        # The key (slice, id) as one integer, < slices * (count + 1) <= pixels, so it cannot overflow.
        slices = np.arange(labels.shape[0], dtype=np.int64).reshape(-1, 1, 1)
        consecutive, count = _consecutive(np.where(consecutive > 0, slices * (count + 1) + consecutive, 0))
    return consecutive.ravel(), count


def _overlaps(prediction: np.ndarray, truth: np.ndarray):
    """The contingency table of two checked label images, as its non-zero cells.

    Returns the object counts (P, T), the pixel count of every predicted
    (0..P) and true (0..T) id, and the cells: predicted id, true id and pixel
    count of every pair that overlaps.
    """
    pred, n_pred = _objects(prediction)
    true, n_true = _objects(truth)
    # Sparse, so memory stays O(pixels) for stacks with many objects; COO -> CSR sums the duplicate cells.
    table = sparse.coo_matrix((np.ones(pred.size, np.int64), (pred, true)), shape=(n_pred + 1, n_true + 1))
    table = table.tocsr().tocoo()
    sizes_pred = np.bincount(pred, minlength=n_pred + 1)
    sizes_true = np.bincount(true, minlength=n_true + 1)
    return (n_pred, n_true), sizes_pred, sizes_true, (table.row, table.col, table.data)


def _object_pairs(prediction: np.ndarray, truth: np.ndarray):
    """Object counts and (predicted id, true id, IoU) of every overlapping pair of objects (ids >= 1)."""
    counts, sizes_pred, sizes_true, (rows, cols, shared) = _overlaps(prediction, truth)
    objects = (rows > 0) & (cols > 0)
    rows, cols, shared = rows[objects], cols[objects], shared[objects]
    iou = shared / (sizes_pred[rows] + sizes_true[cols] - shared)
    return counts, rows, cols, iou


def _true_positives(rows: np.ndarray, cols: np.ndarray, iou: np.ndarray, threshold: float) -> int:
    """The largest number of one-to-one pairs with IoU >= threshold."""
    keep = iou >= threshold
    if threshold > 0.5:
        # IoU > 1/2 means t covers over half of p and p over half of t, which no
        # other (disjoint) object can also do: the pairs are already one to one.
        return int(np.count_nonzero(keep))
    if not keep.any():
        return 0
    # Below (or at) 1/2 an object may pass with several others: a maximum
    # matching, found by the assignment solver on the candidate pairs only.
    _, row_index = np.unique(rows[keep], return_inverse=True)
    _, col_index = np.unique(cols[keep], return_inverse=True)
    candidate = np.zeros((row_index.max() + 1, col_index.max() + 1))
    candidate[row_index, col_index] = 1.0
    chosen = linear_sum_assignment(candidate, maximize=True)
    return int(candidate[chosen].sum())


def _ratio(numerator: float, denominator: float) -> float:
    # Nothing to get wrong (e.g. both images empty) scores 1, as Dice does.
    return 1.0 if denominator == 0 else float(numerator / denominator)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two masks.

    Parameters
    ----------
    prediction, truth : ndarray of bool or int
        Masks of one shape (any number of dimensions); every non-zero pixel
        is foreground.

    Returns
    -------
    float
        ``2 |P n T| / (|P| + |T|)``, 1.0 when both masks are empty.

    Examples
    --------
    >>> import numpy as np
    >>> prediction = np.zeros((4, 4), bool); prediction[:2] = True
    >>> truth = np.zeros((4, 4), bool); truth[:1] = True
    >>> round(dice(prediction, truth), 4)
    0.6667
    """
    prediction, truth = _check_pair(prediction, truth, ndims=())
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    total = np.count_nonzero(prediction) + np.count_nonzero(truth)
    return 1.0 if total == 0 else float(2 * np.count_nonzero(prediction & truth) / total)


def _surface(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` with a face neighbour outside it (the array's faces count as outside)."""
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask, border_value=0)


def hausdorff95(prediction: np.ndarray, truth: np.ndarray, spacing=None) -> float:
    """Symmetric 95 % Hausdorff distance between the surfaces of two masks.

    Parameters
    ----------
    prediction, truth : ndarray of bool or int
        Masks of one shape (2-D or 3-D); every non-zero pixel is foreground.
    spacing : sequence of float, optional
        Pixel size along each axis (default 1: distances in pixels).

    Returns
    -------
    float
        The 95th percentile of the distances from each surface pixel of one
        mask to the other mask's surface, both directions pooled; 0.0 when
        both masks are empty and ``inf`` when only one is (no surface to
        measure to: a benchmark decides how to count it).

    Examples
    --------
    >>> import numpy as np
    >>> truth = np.zeros((20, 20), bool); truth[5:15, 5:15] = True
    >>> prediction = np.zeros((20, 20), bool); prediction[5:15, 5:18] = True
    >>> hausdorff95(prediction, truth)
    3.0
    """
    from scipy.ndimage import distance_transform_edt

    prediction, truth = _check_pair(prediction, truth, ndims=(2, 3))
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    if spacing is not None and (len(spacing) != prediction.ndim or not all(float(s) > 0 for s in spacing)):
        raise ValueError(f"spacing must give one positive size per axis ({prediction.ndim}), got {spacing!r}")
    if not prediction.any() and not truth.any():
        return 0.0
    if not prediction.any() or not truth.any():
        return float("inf")
    surface_p, surface_t = _surface(prediction), _surface(truth)
    # One distance map per surface (the distance of every pixel to it), read at the other surface's pixels.
    to_t = distance_transform_edt(~surface_t, sampling=spacing)[surface_p]
    to_p = distance_transform_edt(~surface_p, sampling=spacing)[surface_t]
    return float(np.percentile(np.concatenate([to_t, to_p]), 95))


def iou_matrix(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU between every predicted object and every true object.

    Parameters
    ----------
    prediction, truth : ndarray of int
        Instance label images of one shape, 2-D or a 3-D stack of 2-D slices
        (ids per slice, see the module notes); 0 is background.

    Returns
    -------
    ndarray of float64
        Shape (P, T), background left out: row i is the i-th predicted object
        and column j the j-th true object in increasing id order (in a stack,
        ordered by slice, then id).

    Examples
    --------
    >>> import numpy as np
    >>> prediction = np.array([[1, 1, 0, 0], [0, 0, 7, 7]])
    >>> truth = np.array([[2, 2, 2, 0], [0, 0, 0, 5]])
    >>> iou_matrix(prediction, truth)
    array([[0.66666667, 0.        ],
           [0.        , 0.5       ]])
    """
    prediction, truth = _check_pair(prediction, truth)
    (n_pred, n_true), rows, cols, iou = _object_pairs(prediction, truth)
    matrix = np.zeros((n_pred, n_true))
    matrix[rows - 1, cols - 1] = iou
    return matrix


def _scores(tp: int, n_pred: int, n_true: int) -> dict:
    fp, fn = n_pred - tp, n_true - tp
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp, tp + fp + fn),
    }


def match_instances(prediction: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> dict:
    """Match predicted to true objects one to one at an IoU threshold and score the result.

    Parameters
    ----------
    prediction, truth : ndarray of int
        Instance label images of one shape, 2-D or a 3-D stack of 2-D slices
        (matched per slice, counts summed); 0 is background.
    threshold : float
        A pair may match when its IoU is >= ``threshold``, in (0, 1].

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn`` (int) and ``precision``, ``recall``, ``f1``,
        ``accuracy`` = TP / (TP + FP + FN) (float), as defined in the module
        notes.

    Notes
    -----
    The matching has the most pairs possible, as in StarDist [2]_. Above
    0.5 the pairs are unique anyway; at or below it the maximum matching is
    found with ``scipy.optimize.linear_sum_assignment``.

    Examples
    --------
    >>> import numpy as np
    >>> truth = np.array([[1, 1, 0, 2, 2, 0, 3]])
    >>> prediction = np.array([[5, 5, 0, 0, 9, 0, 0]])
    >>> scores = match_instances(prediction, truth, threshold=0.5)
    >>> scores["tp"], scores["fp"], scores["fn"], scores["f1"]
    (2, 0, 1, 0.8)
    """
    prediction, truth = _check_pair(prediction, truth)
    threshold = _check_threshold(threshold)
    (n_pred, n_true), rows, cols, iou = _object_pairs(prediction, truth)
    return _scores(_true_positives(rows, cols, iou, threshold), n_pred, n_true)


def object_f1(prediction: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> float:
    """Object F1 at an IoU threshold: ``match_instances(prediction, truth, threshold)["f1"]``.

    Parameters
    ----------
    prediction, truth : ndarray of int
        Instance label images of one shape (2-D, or a 3-D stack of slices).
    threshold : float
        IoU threshold in (0, 1].

    Returns
    -------
    float
        2 TP / (2 TP + FP + FN), 1.0 when neither image holds an object.

    Examples
    --------
    >>> import numpy as np
    >>> labels = np.array([[1, 1, 0, 2]])
    >>> object_f1(labels, labels)
    1.0
    """
    return match_instances(prediction, truth, threshold)["f1"]


def mean_average_precision(prediction: np.ndarray, truth: np.ndarray, thresholds=DEFAULT_THRESHOLDS) -> float:
    """Mean over IoU thresholds of TP / (TP + FP + FN), as in the DSB 2018 [1]_ and StarDist [2]_.

    Parameters
    ----------
    prediction, truth : ndarray of int
        Instance label images of one shape (2-D, or a 3-D stack of slices
        whose counts are summed per threshold).
    thresholds : sequence of float
        IoU thresholds in (0, 1]; by default 0.5, 0.55, ..., 0.9. The Kaggle
        leaderboard of the DSB 2018 used 0.5, 0.55, ..., 0.95.

    Returns
    -------
    float
        The mean of ``match_instances(prediction, truth, t)["accuracy"]``
        over ``t`` in ``thresholds``; the IoUs are computed once.

    Examples
    --------
    >>> import numpy as np
    >>> truth = np.zeros((10, 10), int); truth[2:8, 2:8] = 1
    >>> prediction = np.zeros((10, 10), int); prediction[2:8, 3:9] = 4
    >>> mean_average_precision(prediction, truth, thresholds=(0.5, 0.7, 0.9))  # IoU 30/42
    0.6666666666666666
    """
    prediction, truth = _check_pair(prediction, truth)
    thresholds = [_check_threshold(t) for t in np.ravel(thresholds).tolist()]
    if not thresholds:
        raise ValueError("thresholds must hold at least one IoU threshold")
    (n_pred, n_true), rows, cols, iou = _object_pairs(prediction, truth)
    # A loop over the thresholds only (a handful), each one sparse matching.
    accuracies = [_scores(_true_positives(rows, cols, iou, t), n_pred, n_true)["accuracy"] for t in thresholds]
    return float(np.mean(accuracies))


def instances_of(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Connected components of a class (or boolean) mask, as instance ids.

    Each class is labelled on its own, so touching objects of two classes
    stay two objects: use it to score a semantic prediction as instances.

    Parameters
    ----------
    mask : ndarray of bool or int
        2-D class mask (0 = background), or a 3-D stack of 2-D slices
        labelled slice by slice (ids stay unique over the stack).
    connectivity : int
        1: pixels touching by an edge are connected; 2: by a corner too.

    Returns
    -------
    ndarray of int
        Instance ids 1..N, 0 = background, in the shape of ``mask``.

    Examples
    --------
    >>> import numpy as np
    >>> instances_of(np.array([[1, 1, 2, 0, 1]]))
    array([[1, 1, 2, 0, 3]])
    """
    from skimage.measure import label

    mask = _check_labels(mask, "mask")
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 (edges) or 2 (edges and corners), got {connectivity!r}")
    if mask.ndim == 2:
        # skimage's label joins neighbours of equal value: every class at once, in one C call.
        return label(mask, background=0, connectivity=connectivity)
    # A stack: slices one under the other with a background row between them, so that nothing
    # connects across slices, labelled as one 2-D image.
    slices, height, width = mask.shape
    padded = np.zeros((slices, height + 1, width), dtype=mask.dtype)
    padded[:, :height] = mask
    labelled = label(padded.reshape(slices * (height + 1), width), background=0, connectivity=connectivity)
    return labelled.reshape(slices, height + 1, width)[:, :height]


def merged_pairs(components: np.ndarray, truth: np.ndarray) -> int:
    """How many pairs of true objects fall into one predicted object.

    Parameters
    ----------
    components : ndarray of int
        Predicted instance ids (0 = background), 2-D or a 3-D stack of slices
        (counts summed over slices).
    truth : ndarray of int
        True instance ids of the same shape.

    Returns
    -------
    int
        The sum over predicted objects of n (n - 1) / 2, n the number of true
        objects assigned to it: each true object goes to the predicted object
        covering the largest share of its pixels, if that share is >= 50 %.

    Examples
    --------
    >>> import numpy as np
    >>> truth = np.array([[1, 1, 2, 2, 0, 3, 3]])
    >>> merged_pairs(np.array([[4, 4, 4, 4, 0, 4, 0]]), truth)  # half of object 3 is enough
    3
    >>> merged_pairs(np.array([[4, 4, 4, 4, 0, 0, 0]]), truth)
    1
    """
    components, truth = _check_pair(components, truth)
    _, _, sizes_true, (rows, cols, shared) = _overlaps(components, truth)
    # Cells of a predicted object and a true object covering at least half of the true object.
    keep = (rows > 0) & (cols > 0) & (2 * shared >= sizes_true[cols])
    rows, cols, shared = rows[keep], cols[keep], shared[keep]
    # The largest cover per true object (two can tie at exactly 50 %): sort by
    # true id, then largest cover first, and take the first of each true id.
    order = np.lexsort((rows, -shared, cols))
    _, first = np.unique(cols[order], return_index=True)
    per_object = np.bincount(rows[order][first])
    return int(np.sum(per_object * (per_object - 1) // 2))


def touching_pairs(truth: np.ndarray, connectivity: int = 1) -> int:
    """Pairs of true objects that touch: ``merged_pairs(instances_of(truth > 0, connectivity), truth)``.

    Parameters
    ----------
    truth : ndarray of int
        True instance ids, 2-D or a 3-D stack of slices.
    connectivity : int
        1 (edges) or 2 (corners too), as in :func:`instances_of`.

    Returns
    -------
    int
        The merges any method that predicts only the foreground must make;
        ``merged_pairs(prediction, truth) - touching_pairs(truth)`` are the
        merges beyond the expert's own.

    Examples
    --------
    >>> import numpy as np
    >>> touching_pairs(np.array([[1, 1, 2, 0, 3, 3, 3]]))
    1
    """
    truth = _check_labels(truth, "truth")
    return merged_pairs(instances_of(truth > 0, connectivity), truth)
