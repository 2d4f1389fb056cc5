"""Segmentation metrics: hand-computed cases, label conventions, stacks, bad inputs and the DSB nuclei sample."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

import napari_coarseseg
from napari_coarseseg import demo
from napari_coarseseg.metrics import (
    dice,
    hausdorff95,
    instances_of,
    iou_matrix,
    match_instances,
    mean_average_precision,
    merged_pairs,
    object_f1,
    touching_pairs,
)
from napari_coarseseg.samples import load_dsb_nuclei


def squares(shape, *boxes):
    """A label image with ``(id, y, x, height, width)`` rectangles painted in order."""
    labels = np.zeros(shape, np.int32)
    for label, y, x, height, width in boxes:
        labels[y:y + height, x:x + width] = label
    return labels


# --------------------------------------------------------------------------- Dice and the exports


def test_dice_by_hand_and_when_empty():
    prediction = squares((6, 6), (1, 0, 0, 2, 6))  # 12 px
    truth = squares((6, 6), (1, 1, 0, 2, 6))  # 12 px, 6 shared
    assert dice(prediction, truth) == pytest.approx(2 * 6 / 24)
    assert dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0
    assert dice(prediction, np.zeros((6, 6), bool)) == 0.0


def test_dice_moved_here_and_still_importable_from_demo_and_the_package():
    assert demo.dice is dice
    for name in ("dice", "match_instances", "mean_average_precision", "object_f1"):
        assert name in napari_coarseseg.__all__ and getattr(napari_coarseseg, name) is not None


# --------------------------------------------------------------------------- IoU matrix


def test_iou_of_two_overlapping_squares():
    truth = squares((8, 8), (1, 0, 0, 4, 4))
    prediction = squares((8, 8), (1, 2, 0, 4, 4))  # 2 x 4 = 8 px shared, union 16 + 16 - 8 = 24
    assert iou_matrix(prediction, truth) == pytest.approx(np.array([[8 / 24]]))


def test_iou_matrix_rows_and_columns_follow_sorted_non_consecutive_ids():
    truth = squares((10, 10), (7, 0, 0, 4, 4), (2, 6, 6, 4, 4))
    prediction = squares((10, 10), (10, 0, 0, 4, 2), (3, 6, 6, 4, 4))
    # rows: predicted 3, 10; columns: true 2, 7. Object 10 is half of object 7: IoU 8/16.
    assert iou_matrix(prediction, truth) == pytest.approx(np.array([[1.0, 0.0], [0.0, 0.5]]))


def test_iou_matrix_agrees_with_a_pair_by_pair_count():
    rng = np.random.default_rng(0)
    prediction = rng.integers(0, 30, (40, 40)) * 3  # many small, non-consecutive ids
    truth = ndi.zoom(rng.integers(0, 12, (8, 8)), 5, order=0)
    matrix = iou_matrix(prediction, truth)
    predicted_ids, true_ids = np.unique(prediction)[1:], np.unique(truth)[1:]
    assert matrix.shape == (len(predicted_ids), len(true_ids))
    for i, p in enumerate(predicted_ids):
        for j, t in enumerate(true_ids):
            a, b = prediction == p, truth == t
            assert matrix[i, j] == pytest.approx(np.sum(a & b) / np.sum(a | b))


# --------------------------------------------------------------------------- matching, F1, mAP


def test_f1_with_one_miss_and_one_false_positive():
    truth = squares((20, 20), (1, 0, 0, 4, 4), (2, 0, 10, 4, 4), (3, 10, 0, 4, 4))
    prediction = squares((20, 20), (1, 0, 0, 4, 4), (2, 0, 10, 4, 4), (3, 15, 15, 4, 4))
    scores = match_instances(prediction, truth)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (2, 1, 1)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert scores["accuracy"] == pytest.approx(2 / 4)
    assert object_f1(prediction, truth) == scores["f1"]


def test_map_of_a_square_shifted_by_one_pixel():
    truth = squares((14, 14), (1, 2, 2, 10, 10))
    prediction = squares((14, 14), (1, 2, 3, 10, 10))  # IoU = 90 / 110 = 0.818
    assert iou_matrix(prediction, truth)[0, 0] == pytest.approx(90 / 110)
    assert match_instances(prediction, truth, 0.8)["tp"] == 1
    assert match_instances(prediction, truth, 0.85)["tp"] == 0
    # Matched at 0.5, 0.55, ..., 0.8 (7 thresholds), not at 0.85 or 0.9.
    assert mean_average_precision(prediction, truth) == pytest.approx(7 / 9)
    assert mean_average_precision(prediction, truth, thresholds=[0.5]) == 1.0


def test_below_one_half_the_matching_is_optimal_not_greedy():
    # One row: true A = [0, 10), B = [10, 20); predicted Y = [0, 3), X = [3, 15).
    truth = np.zeros((1, 20), int)
    truth[0, :10], truth[0, 10:] = 1, 2
    prediction = np.zeros((1, 20), int)
    prediction[0, :3], prediction[0, 3:15] = 1, 2
    # IoU(X, A) = 7/15, IoU(X, B) = 5/17, IoU(Y, A) = 3/10: greedy pairs X-A first and
    # stops at one match; the optimum is Y-A and X-B.
    assert iou_matrix(prediction, truth) == pytest.approx(np.array([[3 / 10, 0], [7 / 15, 5 / 17]]))
    assert match_instances(prediction, truth, 0.25)["tp"] == 2
    assert match_instances(prediction, truth, 0.4)["tp"] == 1


def test_at_one_half_an_object_matches_only_once():
    truth = squares((4, 8), (1, 0, 0, 4, 4), (2, 0, 4, 4, 4))
    prediction = squares((4, 8), (1, 0, 0, 4, 8))  # IoU 1/2 with both halves
    scores = match_instances(prediction, truth, 0.5)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 0, 1)


def test_non_consecutive_ids_score_as_consecutive_ones():
    truth = squares((20, 20), (1, 0, 0, 5, 5), (2, 8, 8, 5, 5), (3, 14, 0, 5, 5))
    prediction = squares((20, 20), (1, 0, 1, 5, 5), (2, 8, 8, 5, 4), (3, 15, 15, 4, 4))
    relabelled_truth = np.array([0, 1000, 5, 77])[truth]
    relabelled_prediction = np.array([0, 9, 40000, 2])[prediction]
    assert match_instances(relabelled_prediction, relabelled_truth) == match_instances(prediction, truth)
    assert mean_average_precision(relabelled_prediction, relabelled_truth) == pytest.approx(
        mean_average_precision(prediction, truth))


def test_empty_prediction_and_empty_images():
    truth = squares((10, 10), (4, 0, 0, 3, 3), (9, 5, 5, 3, 3))
    empty = np.zeros_like(truth)
    scores = match_instances(empty, truth)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (0, 0, 2)
    assert scores["recall"] == scores["f1"] == scores["accuracy"] == 0.0
    assert scores["precision"] == 1.0  # nothing predicted, nothing wrong
    assert mean_average_precision(empty, truth) == 0.0
    assert iou_matrix(empty, truth).shape == (0, 2)
    assert merged_pairs(empty, truth) == 0
    assert object_f1(empty, empty) == mean_average_precision(empty, empty) == 1.0


def test_float_labels_with_whole_values_are_accepted():
    truth = squares((10, 10), (1, 0, 0, 4, 4))
    assert object_f1(truth.astype(np.float32), truth) == 1.0


# --------------------------------------------------------------------------- merges


def test_two_touching_true_squares_predicted_as_one_blob_is_one_merge():
    truth = squares((10, 12), (1, 2, 1, 5, 5), (2, 2, 6, 5, 5))
    blob = (truth > 0).astype(np.int32)
    assert merged_pairs(blob, truth) == 1
    assert touching_pairs(truth) == 1
    assert merged_pairs(blob, truth) - touching_pairs(truth) == 0
    assert match_instances(blob, truth)["tp"] == 1  # IoU 1/2 with each: matched to one of them at 0.5 ...
    assert match_instances(blob, truth, 0.55)["fn"] == 2  # ... and to none above


def test_a_gap_between_objects_is_no_merge():
    truth = squares((10, 13), (1, 2, 1, 5, 5), (2, 2, 7, 5, 5))  # column 6 is background
    assert touching_pairs(truth) == 0
    assert merged_pairs(instances_of(truth > 0), truth) == 0
    assert object_f1(instances_of(truth > 0), truth) == 1.0


def test_merges_count_only_objects_covered_at_least_half():
    truth = squares((4, 30), (1, 0, 0, 4, 10), (2, 0, 10, 4, 10), (3, 0, 20, 4, 10))
    prediction = squares((4, 30), (5, 0, 0, 4, 16),  # all of 1, 60 % of 2
                         (6, 0, 16, 4, 7), (7, 0, 23, 4, 7))  # 40 % of 2 and 40 % + 30 % of 3 (unassigned)
    assert merged_pairs(prediction, truth) == 1
    three_way = squares((4, 30), (5, 0, 0, 4, 25))  # 1, 2 and half of 3
    assert merged_pairs(three_way, truth) == 3


def test_instances_of_keeps_touching_classes_apart_and_follows_connectivity():
    mask = np.array([[1, 1, 2, 0],
                     [0, 0, 0, 1],
                     [0, 0, 1, 0]])
    assert instances_of(mask).max() == 4
    assert instances_of(mask, connectivity=2).max() == 3  # the diagonal pair joins
    assert np.array_equal(instances_of(mask)[0, :3], [1, 1, 2])


# --------------------------------------------------------------------------- 3-D stacks


def test_a_stack_sums_the_counts_of_its_slices():
    first = squares((20, 20), (1, 0, 0, 4, 4), (2, 0, 10, 4, 4), (3, 10, 0, 4, 4))
    first_prediction = squares((20, 20), (1, 0, 0, 4, 4), (2, 0, 10, 4, 4), (3, 15, 15, 4, 4))
    second = squares((20, 20), (1, 2, 2, 10, 10))
    second_prediction = squares((20, 20), (1, 2, 3, 10, 10))
    truth, prediction = np.stack([first, second]), np.stack([first_prediction, second_prediction])
    scores = match_instances(prediction, truth)
    # tp 2 + 1, fp 1 + 0, fn 1 + 0; the same id in two slices is two objects.
    assert (scores["tp"], scores["fp"], scores["fn"]) == (3, 1, 1)
    assert iou_matrix(prediction, truth).shape == (4, 4)
    # Per threshold the summed counts: tp 3 up to 0.8 (accuracy 3/5), then 2 (accuracy 2/6).
    assert mean_average_precision(prediction, truth) == pytest.approx((7 * 3 / 5 + 2 * 2 / 6) / 9)


def test_stack_merges_and_instances_stay_within_slices():
    touching = squares((10, 12), (1, 2, 1, 5, 5), (2, 2, 6, 5, 5))
    stack = np.stack([touching, touching, np.where(touching == 1, 1, 0)])
    instances = instances_of(stack > 0)
    assert instances.max() == 3 and all(len(np.unique(s)) == 2 for s in instances)
    assert touching_pairs(stack) == 2
    assert merged_pairs((stack > 0).astype(int), stack) == 2


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("call", [
    lambda a: match_instances(a, a[:, :-1]),
    lambda a: iou_matrix(a, a.T[:-1]),
    lambda a: dice(a, a[:-1]),
    lambda a: merged_pairs(a, a[:-1]),
    lambda a: object_f1(a + 0.5, a),
    lambda a: mean_average_precision(a, a * 0.3),
    lambda a: dice(a * 0.5, a),
    lambda a: match_instances(a, -a),
    lambda a: match_instances(a[0], a[0]),
    lambda a: match_instances(a[None, None], a[None, None]),
    lambda a: match_instances(a.astype(str), a),
    lambda a: match_instances(a, np.where(a > 0, np.nan, 0)),
    lambda a: match_instances(a, a, threshold=0),
    lambda a: match_instances(a, a, threshold=1.5),
    lambda a: match_instances(a, a, threshold="high"),
    lambda a: mean_average_precision(a, a, thresholds=()),
    lambda a: mean_average_precision(a, a, thresholds=(0.5, 2)),
    lambda a: instances_of(a, connectivity=3),
    lambda a: touching_pairs(a.astype(float) / 3),
])
def test_bad_inputs_raise_value_error(call):
    labels = squares((6, 7), (1, 0, 0, 3, 3), (2, 3, 3, 3, 3))
    with pytest.raises(ValueError):
        call(labels)


# --------------------------------------------------------------------------- real data


def test_dsb_nuclei_scores_and_touching_pairs():
    _, labels = load_dsb_nuclei()
    assert object_f1(labels, labels) == mean_average_precision(labels, labels) == 1.0

    # Touching pairs computed another way: pairs of true ids sharing a foreground component.
    components, _ = ndi.label(labels > 0)
    component_and_id = np.unique(np.stack([components[labels > 0], labels[labels > 0]]), axis=1)
    per_component = np.bincount(component_and_id[0])
    expected = int(np.sum(per_component * (per_component - 1) // 2))
    assert touching_pairs(labels) == expected > 0

    # Foreground components as instances merge the touching nuclei: fewer objects, so misses, F1 < 1.
    instances = instances_of(labels > 0)
    scores = match_instances(instances, labels)
    n_true, n_components = len(np.unique(labels)) - 1, instances.max()
    assert n_components < n_true and scores["fn"] >= n_true - n_components
    assert scores["f1"] < 1

    # Keep only nuclei alone in their component: nothing touches, and the components are the nuclei.
    alone = np.where(np.isin(components, np.flatnonzero(per_component == 1)), labels, 0)
    assert touching_pairs(alone) == 0
    assert object_f1(instances_of(alone > 0), alone) == 1.0


def _brute_force_hd95(prediction, truth, spacing=(1.0, 1.0)):
    """HD95 from every pair of surface pixels (the definition, O(n^2)): the reference for the fast one."""
    surfaces = [np.argwhere(m & ~ndi.binary_erosion(m, border_value=0)) * np.asarray(spacing)
                for m in (prediction, truth)]
    d = np.sqrt(((surfaces[0][:, None] - surfaces[1][None]) ** 2).sum(-1))
    return np.percentile(np.concatenate([d.min(1), d.min(0)]), 95)


def test_hausdorff95_matches_its_definition_on_random_shapes():
    rng = np.random.default_rng(3)
    for _ in range(5):
        prediction = ndi.gaussian_filter(rng.random((40, 50)), 4) > 0.5
        truth = ndi.gaussian_filter(rng.random((40, 50)), 4) > 0.5
        assert hausdorff95(prediction, truth) == pytest.approx(_brute_force_hd95(prediction, truth))
        assert hausdorff95(prediction, truth, spacing=(2.0, 0.5)) == pytest.approx(
            _brute_force_hd95(prediction, truth, (2.0, 0.5)))


def test_hausdorff95_of_a_shifted_disc_is_the_shift_and_empty_masks_are_explicit():
    yy, xx = np.mgrid[:64, :64]
    truth = (yy - 32) ** 2 + (xx - 30) ** 2 < 15**2
    shifted = (yy - 32) ** 2 + (xx - 36) ** 2 < 15**2
    # Most surface pixels move by at most the shift; the 95th percentile is close to it, never above.
    assert 4.0 <= hausdorff95(shifted, truth) <= 6.0
    assert hausdorff95(truth, truth) == 0.0
    assert hausdorff95(np.zeros_like(truth), np.zeros_like(truth)) == 0.0
    assert hausdorff95(np.zeros_like(truth), truth) == float("inf")
    with pytest.raises(ValueError, match="spacing"):
        hausdorff95(truth, truth, spacing=(1.0,))
