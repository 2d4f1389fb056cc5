"""Property-based tests (hypothesis): validators, simulate and the level-set update on random inputs.

Each property is an invariant the rest of the package relies on; hypothesis
shrinks any counter-example to a small array that reproduces it.
"""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

from napari_coarseseg.annotations import AnnotationError, simulate, validate_drawing, validate_image  # noqa: E402
from napari_coarseseg.levelset import grow_regions, label_regions  # noqa: E402

# derandomize: CI sees the same examples every run; a failure is a real one, not a new draw.
FAST = settings(max_examples=60, deadline=None, derandomize=True)
shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))


def class_maps(n_classes: int = 3, density: float = 0.5):
    """Random (Y, X) class maps 0..n_classes made of blocks, so objects of several pixels occur."""
    @st.composite
    def build(draw):
        height, width = draw(shapes)
        coarse = draw(arrays(np.int64, ((height + 3) // 4, (width + 3) // 4),
                             elements=st.integers(0, n_classes)))
        return np.kron(coarse, np.ones((4, 4), np.int64))[:height, :width]
    return build()


# --------------------------------------------------------------------------- validators


@FAST
@given(values=arrays(np.int64, shapes, elements=st.integers(-3, 5)),
       dtype=st.sampled_from([np.int8, np.int32, np.uint16, np.float32, np.bool_]),
       shift=st.sampled_from([0, 0, 1]))
def test_validate_drawing_returns_the_same_labels_or_one_clear_error(values, dtype, shift):
    drawing = values.astype(dtype)  # unsigned types wrap negatives around: large labels, beyond 255 classes
    shape = (drawing.shape[0], drawing.shape[1] + shift)
    try:
        out = validate_drawing(drawing, shape, "layer")
    except AnnotationError as error:
        message = str(error)
        assert "'layer'" in message  # names the layer
        assert any(word in message for word in ("shape", "negative", "empty", "non-integer", "classes 1..255",
                                                "0 and 255"))
        return
    assert shift == 0 and out.dtype == np.int64
    np.testing.assert_array_equal(out, drawing.astype(np.int64))
    assert out.min() >= 0 and out.any()


@FAST
@given(drawing=arrays(np.float64, shapes, elements=st.one_of(st.floats(-2, 4), st.integers(-2, 4).map(float),
                                                       st.sampled_from([np.nan, np.inf, -np.inf]))))
def test_validate_drawing_accepts_floats_only_when_they_are_whole_non_negative_numbers(drawing):
    whole = np.isfinite(drawing).all() and np.array_equal(drawing, np.round(drawing))
    valid = whole and drawing.min() >= 0 and drawing.any()
    if valid:
        np.testing.assert_array_equal(validate_drawing(drawing, drawing.shape), drawing.astype(np.int64))
    else:
        with pytest.raises(AnnotationError):
            validate_drawing(drawing, drawing.shape)


@FAST
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=5),
       poison=st.sampled_from([None, np.nan, np.inf, -np.inf]))
def test_validate_image_accepts_2d_3d_rgb_and_refuses_the_rest_clearly(shape, poison):
    image = np.ones(shape, np.float32)
    if poison is not None and image.size:
        image.flat[image.size // 2] = poison
    # The contract: a colour axis is guessed only on a 3-D array whose last axis has 3 or 4 entries
    # (annotations.is_rgb), so (Y, X), (Z, Y, X) and (Y, X, 3|4) pass, 4-D and more do not.
    spatial = image.ndim - (1 if image.ndim == 3 and image.shape[-1] in (3, 4) else 0)
    valid = spatial in (2, 3) and image.size > 0 and poison is None
    try:
        out = validate_image(image, "img")
    except AnnotationError as error:
        assert "img" in str(error)
        assert not valid
        return
    assert valid
    assert out.ndim in (2, 3) and out.size and np.isfinite(out).all()


# --------------------------------------------------------------------------- simulate


@FAST
@given(labels=class_maps(n_classes=3), instances=st.booleans(), seed=st.integers(0, 3))
def test_simulated_drawings_never_contradict_the_mask(labels, instances, seed):
    if instances:
        labels = (label_regions(labels)[0]).astype(np.int64)  # one value per object, all of class 1
    if not labels.any():
        with pytest.raises(AnnotationError, match="all zero"):
            simulate(labels, instances=instances, seed=seed)
        return
    drawings = simulate(labels, instances=instances, seed=seed)
    classes = drawings.classes.astype(np.int64)
    np.testing.assert_array_equal(classes > 0, labels > 0)
    for drawing in (drawings.positive, drawings.negative, drawings.partial):
        assert drawing.shape == labels.shape
    # Positive and partial marks carry the class of the object they lie in.
    for marks in (drawings.positive, drawings.partial):
        drawn = marks > 0
        np.testing.assert_array_equal(marks[drawn], classes[drawn])
    # "Not k" is never drawn on class k.
    negative = drawings.negative.astype(np.int64)
    assert not ((negative > 0) & (negative == classes)).any()
    # Every object keeps a partial region, at most its whole area.
    objects = label_regions(labels)[0] if not instances else labels
    assert set(np.unique(objects[drawings.partial > 0])) == set(np.unique(objects[objects > 0]))


# --------------------------------------------------------------------------- level-set update


@st.composite
def growth_cases(draw):
    prediction = draw(class_maps(n_classes=2))
    seed_mask = draw(arrays(np.bool_, prediction.shape))
    # Seeds: random pixels of random classes (some outside F, some of another class than F there).
    seed_classes_map = np.where(seed_mask, draw(arrays(np.int64, prediction.shape, elements=st.integers(1, 2))), 0)
    seeds, seed_classes = label_regions(seed_classes_map)
    return seeds, seed_classes, prediction


@FAST
@given(case=growth_cases(), epsilons=st.tuples(st.floats(0, 5), st.floats(0, 5)))
def test_growth_keeps_seeds_stays_in_f_keeps_classes_and_is_monotone_in_epsilon(case, epsilons):
    seeds, seed_classes, prediction = case
    low, high = sorted(epsilons)
    grown_low = grow_regions(seeds, seed_classes, prediction, low)
    grown_high = grow_regions(seeds, seed_classes, prediction, high)
    for grown in (grown_low, grown_high):
        assert grown.shape == seeds.shape and grown.dtype == seeds.dtype
        np.testing.assert_array_equal(grown[seeds > 0], seeds[seeds > 0])  # seeds are kept
        new = (grown > 0) & (seeds == 0)
        # New pixels lie in F, in the class of the seed they grew from.
        np.testing.assert_array_equal(prediction[new], seed_classes[grown[new]])
    assert not ((grown_low > 0) & (grown_high == 0)).any()  # a larger epsilon grows at least as far
    np.testing.assert_array_equal(grow_regions(seeds, seed_classes, prediction, 0.0), seeds)


@FAST
@given(case=growth_cases())
def test_a_huge_epsilon_fills_exactly_the_seeded_components_of_f(case):
    seeds, seed_classes, prediction = case
    grown = grow_regions(seeds, seed_classes, prediction, 1e6)
    components, _ = label_regions(prediction)
    # Components of F holding a seed of their own class.
    seeded = np.unique(components[(seeds > 0) & (components > 0) & (prediction == seed_classes[seeds])])
    filled = np.isin(components, seeded[seeded > 0])
    np.testing.assert_array_equal((grown > 0) & (seeds == 0), filled & (seeds == 0))
