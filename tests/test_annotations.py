"""Simulated coarse drawings (``simulate``) and validation of images and drawings.

The invariants follow the RefineSeg protocol (METHODS.md A, annotations.py):
positive = each object eroded by a radius drawn per object from ``erode``;
negative = "not k" farther than ``margin`` from class k; the band around
every boundary stays unannotated; partial = innermost fraction of each object.
Distances are measured here with ``scipy.ndimage.distance_transform_edt``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_coarseseg import AnnotationError, simulate, validate_drawing, validate_image
from napari_coarseseg.annotations import Role

ERODE = (2.0, 4.0)
MARGIN = 4.0


def depth_in_own_object(instances: np.ndarray) -> np.ndarray:
    """Distance of each object pixel to the nearest pixel outside its own object (a loop over objects)."""
    depth = np.zeros(instances.shape)
    for i in np.unique(instances[instances > 0]):
        inside = instances == i
        depth[inside] = ndi.distance_transform_edt(inside)[inside]
    return depth


def objects_of(mask: np.ndarray, instances: bool) -> np.ndarray:
    """Instance ids: the mask itself, or the connected regions of each class."""
    if instances:
        return mask
    out = np.zeros(mask.shape, dtype=np.int64)
    for k in np.unique(mask[mask > 0]):
        components, n = ndi.label(mask == k)
        out[components > 0] = components[components > 0] + out.max()
    return out


def check_positive(drawings, mask, instances, low, high, touching_slack):
    classes = (mask > 0).astype(int) if instances else mask
    depth = depth_in_own_object(objects_of(mask, instances))
    positive = drawings.positive.astype(int)
    assert positive.any(), "some positive marks expected"
    # every mark is of its pixel's class ...
    np.testing.assert_array_equal(positive[positive > 0], classes[positive > 0])
    # ... at least the low erosion radius inside its object ...
    assert depth[positive > 0].min() > low
    # ... and everything deeper than the high radius is marked (touching
    # objects lose their common border first: one pixel of slack)
    deep = depth > high + touching_slack
    assert deep.any()
    np.testing.assert_array_equal(positive[deep], classes[deep])


def check_negative(drawings, classes, margin):
    negative = drawings.negative.astype(int)
    n_classes = int(classes.max())
    distance = {k: ndi.distance_transform_edt(classes != k) for k in range(1, n_classes + 1)}
    assert negative.any(), "some negative marks expected"
    for k in range(1, n_classes + 1):
        marked = negative == k
        assert not (classes[marked] == k).any(), f"'not {k}' drawn on class {k}"
        if marked.any():
            assert distance[k][marked].min() > margin
    # every pixel farther than margin from some class gets "not (nearest such class)"
    far = np.stack([np.where(distance[k] > margin, distance[k], np.inf) for k in range(1, n_classes + 1)])
    expected = np.where(np.isfinite(far).any(0), far.argmin(0) + 1, 0)
    np.testing.assert_array_equal(negative, expected)


def check_band_empty(drawings, classes, low, margin):
    """Within margin outside class k and within the low radius inside it: no mark about k."""
    for k in range(1, int(classes.max()) + 1):
        in_k = classes == k
        outside = (ndi.distance_transform_edt(~in_k) <= margin) & ~in_k
        rim = in_k & (ndi.distance_transform_edt(in_k) <= low)
        band = outside | rim
        assert band.sum() > 0
        assert not (drawings.negative[band] == k).any()
        assert not (drawings.positive[band] == k).any()
    if classes.max() == 1:  # one class: the band is entirely empty
        band = ((ndi.distance_transform_edt(classes == 0) <= margin) & (classes == 0)) | (
            (classes > 0) & (ndi.distance_transform_edt(classes > 0) <= low)
        )
        assert not drawings.positive[band].any()
        assert not drawings.negative[band].any()


def check_partial(drawings, mask, instances, fraction, check_innermost):
    classes = (mask > 0).astype(int) if instances else mask
    objects = objects_of(mask, instances)
    partial = drawings.partial.astype(int)
    np.testing.assert_array_equal(partial[partial > 0], classes[partial > 0])
    depth = depth_in_own_object(objects)
    for i in np.unique(objects[objects > 0]):
        inside = objects == i
        chosen = inside & (partial > 0)
        assert chosen.sum() == max(1, round(fraction * inside.sum())), f"object {i}"
        if check_innermost and (inside & ~chosen).any():
            assert depth[chosen].min() >= depth[inside & ~chosen].max()


def check_all_roles(drawings, labels, classes, instances, erode, margin):
    """Every invariant of the three roles, with the slack touching objects need."""
    check_positive(drawings, labels, instances, *erode, touching_slack=1.5)
    check_negative(drawings, classes, margin)
    check_band_empty(drawings, classes, erode[0], margin)
    check_partial(drawings, labels, instances, 0.45, check_innermost=False)


# --------------------------------------------------------------------------- on the real crop


def test_simulate_on_real_instances(dsb_crop):
    _, labels = dsb_crop
    drawings = simulate(labels, erode=ERODE, margin=MARGIN, instances=True, seed=0)
    assert drawings.positive.shape == drawings.negative.shape == drawings.partial.shape == labels.shape
    classes = (labels > 0).astype(int)
    np.testing.assert_array_equal(drawings.classes, classes)
    check_all_roles(drawings, labels, classes, True, ERODE, MARGIN)


def test_simulate_erodes_touching_instances_apart(dsb_crop):
    _, labels = dsb_crop
    drawings = simulate(labels, erode=1, margin=MARGIN, instances=True, seed=0)
    # a positive component never spans two instances
    components, n = ndi.label(drawings.positive > 0)
    for c in range(1, n + 1):
        assert len(np.unique(labels[components == c])) == 1, "positive marks of touching nuclei merged"
    # the crop really holds touching nuclei
    touching = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    assert touching.any()


# --------------------------------------------------------------------------- on a synthetic multi-class mask


@pytest.mark.parametrize("erode, margin", [((2.0, 4.0), 4.0), ((1.0, 1.0), 2.0), ((0.0, 3.0), 6.0)])
def test_simulate_on_two_classes(two_class, erode, margin):
    _, mask = two_class
    drawings = simulate(mask, erode=erode, margin=margin, seed=3)
    np.testing.assert_array_equal(drawings.classes, mask)
    assert set(np.unique(drawings.positive)) == {0, 1, 2}
    check_all_roles(drawings, mask, mask, False, erode, margin)


def test_simulate_separated_discs_exact(discs):
    _, mask = discs
    drawings = simulate(mask, erode=(2.0, 4.0), margin=3, partial_fraction=0.3, seed=0)
    check_positive(drawings, mask, False, 2.0, 4.0, touching_slack=0.0)
    check_partial(drawings, mask, False, 0.3, check_innermost=True)
    # one erosion radius per object: the marks of each disc are a disc of one radius
    depth = depth_in_own_object(objects_of(mask, False))
    components, n = ndi.label(mask)
    radii = []
    for c in range(1, n + 1):
        inside = components == c
        marked = inside & (drawings.positive > 0)
        # everything deeper than the shallowest mark is marked
        np.testing.assert_array_equal(marked[inside], depth[inside] >= depth[marked].min())
        radii.append(depth[marked].min())
    assert len(set(radii)) > 1, "radii should vary between objects"


def test_simulate_on_a_stack_uses_3d_distances(discs):
    _, mask = discs
    stack = np.stack([np.zeros_like(mask), mask, mask, mask, np.zeros_like(mask)])
    drawings = simulate(stack, erode=1.5, margin=2, seed=0)
    assert drawings.positive.shape == stack.shape
    # the first and last object slices are within 1.5 of the empty slices
    assert not drawings.positive[1].any() and not drawings.positive[3].any()
    assert drawings.positive[2].any()
    check_negative(drawings, stack, 2)


def test_simulate_is_seeded(dsb_crop):
    _, labels = dsb_crop
    a = simulate(labels, erode=(1, 5), instances=True, seed=1)
    b = simulate(labels, erode=(1, 5), instances=True, seed=1)
    c = simulate(labels, erode=(1, 5), instances=True, seed=2)
    np.testing.assert_array_equal(a.positive, b.positive)
    assert not np.array_equal(a.positive, c.positive)
    np.testing.assert_array_equal(a.negative, c.negative)  # negative does not depend on the seed


def test_simulate_output_dtype_and_instances_flag(dsb_crop):
    _, labels = dsb_crop
    drawings = simulate(labels, instances=True)
    for array in (drawings.positive, drawings.negative, drawings.partial, drawings.classes):
        assert array.dtype == np.uint8
        assert set(np.unique(array)) <= {0, 1}


# --------------------------------------------------------------------------- validation


def test_validate_image_accepts_2d_stack_and_rgb():
    assert validate_image(np.zeros((4, 5))).shape == (4, 5)
    assert validate_image(np.zeros((2, 4, 5))).shape == (2, 4, 5)
    assert validate_image(np.zeros((4, 5, 3), dtype=np.uint8)).shape == (4, 5, 3)


@pytest.mark.parametrize(
    "image, words",
    [
        (np.zeros(5), r"shape \(5,\).*expected \(Y, X\).*Squeeze"),
        (np.zeros((2, 3, 4, 5)), r"shape \(2, 3, 4, 5\).*Squeeze"),
        (np.zeros((0, 5)), "empty"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN or infinite.*nan_to_num"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), "NaN or infinite"),
        (np.array([["a", "b"], ["c", "d"]]), "dtype.*expected numbers"),
    ],
)
def test_validate_image_errors(image, words):
    with pytest.raises(AnnotationError, match=words):
        validate_image(image, name="my image")


def test_validate_image_error_names_the_layer():
    with pytest.raises(AnnotationError, match="^nuclei.tif has shape"):
        validate_image(np.zeros(3), name="nuclei.tif")


def test_validate_drawing_accepts_integers_bools_and_whole_floats():
    for drawing in (np.array([[0, 2], [1, 0]], dtype=np.uint16), np.array([[0, 1], [1, 0]], dtype=bool),
                    np.array([[0.0, 2.0], [1.0, 0.0]])):
        out = validate_drawing(drawing, (2, 2))
        assert out.dtype == np.int64
        np.testing.assert_array_equal(out, drawing.astype(np.int64))


@pytest.mark.parametrize(
    "drawing, shape, words",
    [
        (np.ones((3, 3), int), (4, 4), r"shape \(3, 3\) but the image is \(4, 4\).*must have the image's shape"),
        (np.ones((4, 4), int), (2, 4, 4), "2D drawing on a stack"),
        (np.array([[0.5, 1.0], [0.0, 0.0]]), (2, 2), "non-integer values.*integer"),
        (np.array([[np.nan, 1.0], [0.0, 0.0]]), (2, 2), "non-integer"),
        (np.array([[-1, 1], [0, 0]]), (2, 2), r"negative values \(-1\).*use 0 for 'not annotated'"),
        (np.zeros((2, 2), int), (2, 2), "is empty: nothing is drawn.*Paint some pixels"),
        (np.array([["a", "b"], ["c", "d"]]), (2, 2), "expected integers"),
    ],
)
def test_validate_drawing_errors(drawing, shape, words):
    with pytest.raises(AnnotationError, match=words):
        validate_drawing(drawing, shape, name="strokes", role=Role.NEGATIVE)


def test_validate_drawing_error_names_role_and_layer():
    with pytest.raises(AnnotationError, match="^negative drawing 'strokes'"):
        validate_drawing(np.zeros((2, 2), int), (2, 2), name="strokes", role="negative")


def many_values(n: int, background: bool = True) -> np.ndarray:
    """``n`` horizontal stripes of values 1..n, separated by background rows unless ``background=False``."""
    labels = np.repeat(np.arange(1, n + 1), 4).reshape(-1, 4)
    if background:
        labels = np.pad(labels, 1)
        labels = np.insert(labels, np.arange(2, n + 1), 0, axis=0)
    assert len(np.unique(labels)) == n + background
    return labels


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(labels=many_values(40)), "40 distinct values.*instances=True"),
        (dict(labels=np.zeros((4, 4), int)), "all zero"),
        (dict(labels=-np.ones((4, 4), int)), "negative values"),
        (dict(labels=np.full((4, 4), 0.5)), "dtype float64"),
        (dict(labels=np.ones(4, int)), "2-D or 3-D"),
        (dict(labels=np.ones((4, 4), int), erode=(4, 2)), "erode must be"),
        (dict(labels=np.ones((4, 4), int), erode=-1), "erode must be"),
        (dict(labels=np.ones((4, 4), int), margin=-1), "margin must be non-negative"),
        (dict(labels=np.ones((4, 4), int), partial_fraction=0), r"partial_fraction must be in \(0, 1\]"),
    ],
)
def test_simulate_errors(kwargs, words):
    with pytest.raises(AnnotationError, match=words):
        simulate(**kwargs)


def test_simulate_many_values_with_instances_flag():
    labels = many_values(40)
    drawings = simulate(labels, instances=True, erode=0)
    assert set(np.unique(drawings.positive)) <= {0, 1}
    np.testing.assert_array_equal(drawings.positive, labels > 0)  # separated stripes, erode 0


def test_simulate_accepts_32_classes():
    simulate(many_values(32), erode=0)


def test_simulate_counts_values_without_background():
    with pytest.raises(AnnotationError, match="33 distinct values.*instances=True"):
        simulate(many_values(33, background=False), erode=0)
