"""The level-set growth of the recursive method (METHODS.md B, eq. 4-6) and its multi-object rules."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_coarseseg.levelset import grow_regions, label_regions, separate_objects
from napari_coarseseg.samples import load_dsb_nuclei


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.fixture
def two_discs():
    """F: two separate discs of class 1; S: a small seed in the left disc only."""
    shape = (40, 80)
    prediction = (disc(shape, 20, 20, 12) | disc(shape, 20, 60, 12)).astype(np.int64)
    seeds = disc(shape, 20, 20, 3).astype(np.int64)
    return seeds, np.array([0, 1]), prediction


def test_by_hand_on_a_line():
    # F = pixels 1..7, S = pixel 4: d(i, B) = 1 2 3 4 3 2 1, d(i, S) = |i - 4|.
    prediction = np.zeros((1, 9), int)
    prediction[0, 1:8] = 1
    seeds = np.zeros((1, 9), int)
    seeds[0, 4] = 1
    # eps = 0.5: 0.5 * d(i, B) >= |i - 4| holds at i = 3, 4, 5 (1.5 >= 1), not at i = 2 (1 < 2).
    np.testing.assert_array_equal(grow_regions(seeds, [0, 1], prediction, 0.5)[0], [0, 0, 0, 1, 1, 1, 0, 0, 0])
    # eps = 1: also i = 2 and 6 (2 >= 2), not 1 and 7 (1 < 3).
    np.testing.assert_array_equal(grow_regions(seeds, [0, 1], prediction, 1.0)[0], [0, 0, 1, 1, 1, 1, 1, 0, 0])


def test_epsilon_zero_keeps_the_regions(two_discs):
    seeds, classes, prediction = two_discs
    np.testing.assert_array_equal(grow_regions(seeds, classes, prediction, 0.0), seeds)


def test_huge_epsilon_gives_f_union_s_for_seeded_components(two_discs):
    seeds, classes, prediction = two_discs
    # a part of the seed lies outside F: it stays (regions only grow)
    seeds = seeds.copy()
    seeds[20, 5:9] = 1
    grown = grow_regions(seeds, classes, prediction, 1e6)
    components, _ = ndi.label(prediction)
    seeded = components == components[20, 20]
    np.testing.assert_array_equal(grown > 0, seeded | (seeds > 0))
    # the right disc holds no seed: nothing of it is added
    assert not grown[components == components[20, 60]].any()


def test_growth_is_monotone_and_faster_for_larger_epsilon(two_discs):
    seeds, classes, prediction = two_discs
    current, sizes = seeds, [int((seeds > 0).sum())]
    for _ in range(6):
        grown = grow_regions(current, classes, prediction, 0.5)
        assert np.all(grown[current > 0] == current[current > 0]), "a pixel left its region"
        sizes.append(int((grown > 0).sum()))
        current = grown
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
    one_step = [int((grow_regions(seeds, classes, prediction, e) > 0).sum()) for e in (0.25, 0.5, 1, 2)]
    assert one_step == sorted(one_step) and one_step[-1] > one_step[0]


def test_two_seeds_in_one_component_never_merge():
    shape = (40, 60)
    # two overlapping discs: one component of F, as touching nuclei look to T1
    prediction = (disc(shape, 20, 20, 12) | disc(shape, 20, 40, 12)).astype(np.int64)
    assert ndi.label(prediction)[1] == 1
    seeds = np.zeros(shape, np.int64)
    seeds[disc(shape, 20, 16, 3)] = 1
    seeds[disc(shape, 20, 44, 3)] = 2
    current = seeds
    for _ in range(10):
        current = grow_regions(current, np.array([0, 1, 1]), prediction, 1.0)
    assert set(np.unique(current)) == {0, 1, 2}
    np.testing.assert_array_equal(current > 0, prediction > 0)  # F filled
    for object_id in (1, 2):
        assert ndi.label(current == object_id)[1] == 1, "each object stays one connected region"
    # split down the middle: each pixel went to its nearest seed
    assert (current[:, :29] != 2).all() and (current[:, 31:] != 1).all()


def test_classes_are_kept():
    shape = (30, 60)
    prediction = np.zeros(shape, np.int64)
    prediction[5:25, 5:28] = 1
    prediction[5:25, 32:55] = 2
    prediction[5:25, 28:32] = 2  # class 2 touching class 1
    seeds = np.zeros(shape, np.int64)
    seeds[14:16, 14:16] = 1  # class 1 seed
    seeds[14:16, 44:46] = 2  # class 2 seed
    seeds[2, 2] = 3  # a class 1 seed in the background: stays, grows nowhere
    classes = np.array([0, 1, 2, 1])
    grown = grow_regions(seeds, classes, prediction, 1e6)
    np.testing.assert_array_equal(classes[grown][prediction == 1], 1)
    np.testing.assert_array_equal(classes[grown][prediction == 2], 2)
    assert grown[2, 2] == 3 and (grown == 3).sum() == 1


def test_a_seed_does_not_grow_into_a_component_of_another_class():
    shape = (20, 20)
    prediction = np.full(shape, 2, np.int64)
    seeds = np.zeros(shape, np.int64)
    seeds[9:11, 9:11] = 1
    grown = grow_regions(seeds, np.array([0, 1]), prediction, 1e6)
    np.testing.assert_array_equal(grown, seeds)


def test_label_regions_splits_classes_and_components():
    mask = np.zeros((10, 10), np.int64)
    mask[1:3, 1:3] = 1
    mask[6:8, 1:3] = 1
    mask[1:3, 6:8] = 2
    mask[3, 6:8] = 1  # touches the class 2 square: still a separate object
    objects, classes = label_regions(mask)
    assert objects.max() == 4 and len(classes) == 5
    np.testing.assert_array_equal(classes[objects], mask)


def test_separate_objects_cuts_a_one_pixel_line_between_touching_objects():
    ids = np.zeros((12, 20), np.int32)
    ids[2:10, 2:10] = 1
    ids[2:10, 10:18] = 2  # touches object 1 along column 9 | 10
    ids[0, 19] = 3  # a single object far from the others
    keep = np.zeros(ids.shape, bool)
    keep[4:8, 4:8] = keep[4:8, 12:16] = True  # the seeds, inside
    separated = separate_objects(ids, keep=keep)
    assert separated.dtype == ids.dtype
    # a 1 px line: column 9 (object 1's side) becomes background, nothing else changes
    expected = ids.copy()
    expected[2:10, 9] = 0
    np.testing.assert_array_equal(separated, expected)
    assert (separated[keep] == ids[keep]).all()
    assert ndi.label(separated > 0, np.ones((3, 3)))[1] == 3  # apart even for 8-connectivity
    # a single object, or width 0, is untouched
    np.testing.assert_array_equal(separate_objects(np.where(ids == 1, 1, 0)), np.where(ids == 1, 1, 0))
    np.testing.assert_array_equal(separate_objects(ids, width=0), ids)
    # width 2: a 2 px gap
    assert (separate_objects(ids, width=2)[2:10, 8:10] == 0).all()


def test_separate_objects_never_cuts_the_seeds():
    ids = np.zeros((5, 8), np.int64)
    ids[:, :4], ids[:, 4:] = 1, 2
    keep = np.zeros(ids.shape, bool)
    keep[:, 3] = True  # object 1's seed reaches the interface: object 2 gives way
    separated = separate_objects(ids, keep=keep)
    assert (separated[:, 3] == 1).all() and (separated[:, 4] == 0).all() and (separated[:, 5:] == 2).all()
    keep[:, 4] = True  # two seeds touching directly: left as drawn
    np.testing.assert_array_equal(separate_objects(ids, keep=keep), ids)


def test_separate_objects_keeps_apart_objects_of_one_class_only():
    ids = np.zeros((5, 9), np.int64)
    ids[:, :3], ids[:, 3:6], ids[:, 6:] = 1, 2, 3
    classes = np.array([0, 1, 2, 2])  # object 1 is class 1, objects 2 and 3 class 2
    separated = separate_objects(ids, object_classes=classes)
    assert (separated[:, :5] == ids[:, :5]).all()  # classes 1 and 2 touch: told apart by their class
    assert (separated[:, 5] == 0).all() and (separated[:, 6:] == 3).all()


def test_touching_objects_of_one_class_grow_into_two_regions():
    """The nearest-seed split leaves no gap; with separate_objects the class map has two connected regions."""
    shape = (40, 60)
    prediction = (disc(shape, 20, 20, 12) | disc(shape, 20, 40, 12)).astype(np.int64)
    seeds = np.zeros(shape, np.int64)
    seeds[disc(shape, 20, 16, 3)] = 1
    seeds[disc(shape, 20, 44, 3)] = 2
    classes = np.array([0, 1, 1])
    grown = grow_regions(seeds, classes, prediction, 1e6)
    assert ndi.label(classes[grown])[1] == 1  # the split alone: one blob
    separated = classes[separate_objects(grown, keep=seeds > 0, object_classes=classes)]
    assert ndi.label(separated)[1] == 2
    assert ndi.label(separated, np.ones((3, 3)))[1] == 2
    assert ((prediction > 0) & (separated == 0)).sum() <= 2 * shape[0]  # a line, not a band


def test_separate_objects_on_the_real_image_separates_every_touching_pair():
    """Simulated partial masks grown into the expert foreground: the class map joins the expert's touching
    nuclei; with a 1 px gap, every nucleus holding a seed is its own connected region again."""
    _, instances = load_dsb_nuclei()
    inner = ndi.binary_erosion(instances > 0, iterations=3) * (instances > 0)
    seeds, classes = label_regions(inner.astype(np.int64))
    grown = grow_regions(seeds, classes, (instances > 0).astype(np.int64), 1e6)
    merged = ndi.label(classes[grown])[1]
    separated = separate_objects(grown, keep=seeds > 0, object_classes=classes)
    regions = ndi.label(classes[separated])[1]
    assert merged < seeds.max() <= regions  # touching objects were one region, now every seed has its own
    assert (separated > 0).sum() >= 0.98 * (grown > 0).sum()


def bar():
    """F: a bar 5 px wide (X) and 11 px tall (Y); S: its middle pixel (6, 3)."""
    prediction = np.zeros((13, 7), np.int64)
    prediction[1:12, 1:6] = 1
    seeds = np.zeros((13, 7), np.int64)
    seeds[6, 3] = 1
    return seeds, np.array([0, 1]), prediction


def test_spacing_changes_which_pixels_join_by_hand():
    """eps = 1 in the bar; d(i, B) <= 3 (to the sides, along X) everywhere near the seed.

    In pixels (1, 1): (6 +- k, 3) joins while 3 >= k, k <= 3; (5, 2): 2 >= sqrt(2), joins; (4, 2): 2 < sqrt(5).
    Pixels 2 units tall (2, 1): the same rows are 2 units apart, (6 +- k, 3) joins while 3 >= 2k, k <= 1; (6, 4)
    is 1 unit away as before (d_B = 2 >= 1); (5, 4): d_S = sqrt(4 + 1) = 2.24 > d_B = 2. (7, 3) and (6, 4) are
    one pixel from the seed both, but 2 and 1 units: only with the spacing does that tell them apart.
    """
    seeds, classes, prediction = bar()
    in_pixels = np.zeros((13, 7), np.int64)
    in_pixels[3:10, 3] = 1
    in_pixels[5:8, 2:5] = 1
    anisotropic = np.zeros((13, 7), np.int64)
    anisotropic[5:8, 3] = 1
    anisotropic[6, 2:5] = 1
    np.testing.assert_array_equal(grow_regions(seeds, classes, prediction, 1.0), in_pixels)
    assert (in_pixels > 0).sum() == 13 and (anisotropic > 0).sum() == 5
    np.testing.assert_array_equal(grow_regions(seeds, classes, prediction, 1.0, spacing=(2.0, 1.0)), anisotropic)
    # only the ratio sy / sx counts: 1 x 0.5 micron pixels give the same
    np.testing.assert_array_equal(grow_regions(seeds, classes, prediction, 1.0, spacing=(1.0, 0.5)), anisotropic)
    # the bar along X with pixels 2 units wide: the same result, transposed
    np.testing.assert_array_equal(grow_regions(seeds.T, classes, prediction.T, 1.0, spacing=(1.0, 2.0)),
                                  anisotropic.T)


def test_spacing_one_equals_no_spacing_and_one_scale_for_both_axes_changes_nothing(two_discs):
    """grow_regions compares two distances, so it is scale-invariant: (s, s) gives the result of no spacing,
    exactly (a power of two scales every distance without rounding), here on 125 real nuclei grown far."""
    _, instances = load_dsb_nuclei()
    inner = ndi.binary_erosion(instances > 0, iterations=3) * (instances > 0)
    seeds, classes = label_regions(inner.astype(np.int64))
    prediction = (instances > 0).astype(np.int64)
    for epsilon in (0.3, 1.0):
        plain = grow_regions(seeds, classes, prediction, epsilon)
        assert (plain > 0).sum() > (seeds > 0).sum()
        for spacing in ((1, 1), (2.0, 2.0), (0.25, 0.25)):
            np.testing.assert_array_equal(grow_regions(seeds, classes, prediction, epsilon, spacing=spacing), plain)
    seeds, classes, prediction = two_discs
    np.testing.assert_array_equal(grow_regions(seeds, classes, prediction, 0.5, spacing=[4, 4]),
                                  grow_regions(seeds, classes, prediction, 0.5))


@pytest.mark.parametrize("spacing", [(0, 1), (1, -2), (np.nan, 1), (1, np.inf), (1,), (1, 2, 3), "ab"])
def test_bad_spacing_is_refused_before_any_work(spacing):
    seeds, classes, prediction = bar()
    with pytest.raises(ValueError, match=r"spacing must be two positive finite numbers \(sy, sx\), got"):
        grow_regions(seeds, classes, prediction, 1.0, spacing=spacing)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: grow_regions(np.zeros((4, 4), int), [0], np.zeros((4, 5), int), 1.0), "one shape"),
        (lambda: grow_regions(np.zeros((4, 4), int), [0], np.zeros((4, 4), int), -1.0), "epsilon"),
        (lambda: grow_regions(np.full((4, 4), 3), [0, 1], np.ones((4, 4), int), 1.0), "seed_classes"),
        (lambda: separate_objects(np.zeros((4, 4), int), width=-1), "width"),
        (lambda: separate_objects(np.zeros((4, 4), int), keep=np.zeros((4, 5), bool)), "one shape"),
        (lambda: separate_objects(np.zeros(4, int)), "2-D"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_update_on_the_real_image_is_fast():
    """512 x 512, 125 nuclei: a few distance transforms, no loop over objects."""
    _, instances = load_dsb_nuclei()
    inner = ndi.binary_erosion(instances > 0, iterations=3) * (instances > 0)
    seeds, classes = label_regions(inner.astype(np.int64))
    prediction = (instances > 0).astype(np.int64)
    grow_regions(seeds, classes, prediction, 1.0)  # warm up
    start = time.perf_counter()
    grown = grow_regions(seeds, classes, prediction, 1.0)
    seconds = time.perf_counter() - start
    print(f"\nlevel-set update, 512 x 512, {seeds.max()} seeds: {seconds * 1000:.0f} ms")
    assert seconds < 2.0
    assert (grown > 0).sum() > (seeds > 0).sum()
    assert set(np.unique(grown)) == set(np.unique(seeds))
