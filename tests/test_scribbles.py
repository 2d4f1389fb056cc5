"""The scribble style of ``simulate``: human-like brush strokes drawn from a full mask.

Checked on the real DSB 2018 sample (a 256 x 256 quarter, 35 nuclei; the
whole 512 x 512 image, 125 nuclei, where a count of objects matters):
strokes stay in their objects, cover about ``coverage`` of each drawn one,
``undrawn`` objects get nothing, sloppy and biased strokes spill by at most
their pixels, negatives stay beyond ``margin``. Distances are measured with
``scipy.ndimage.distance_transform_edt``.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from napari_coarseseg import AnnotationError, simulate
from napari_coarseseg.cli import main
from napari_coarseseg.samples import load_dsb_nuclei

QUARTER = np.s_[:256, :256]
CLEAN = dict(instances=True, style="scribble", sloppy=0, bias=0)  # strokes that never leave their object


@pytest.fixture(scope="module")
def nuclei():
    """The whole sample's instance mask."""
    return load_dsb_nuclei()[1].astype(np.int64)


@pytest.fixture(scope="module")
def quarter(nuclei):
    labels = nuclei[QUARTER]
    assert len(np.unique(labels)) - 1 == 35
    return labels


@pytest.fixture(scope="module")
def clean(quarter):
    """Scribbles of the quarter with no sloppy object and no bias, seed 0."""
    return simulate(quarter, seed=0, **CLEAN)


def per_object(mask, labels):
    """(ids, fraction of each object's pixels where ``mask`` is set)."""
    ids = np.unique(labels[labels > 0])
    return ids, ndi.sum(mask, labels, ids) / ndi.sum(labels > 0, labels, ids)


def distance_outside(labels):
    return ndi.distance_transform_edt(labels == 0)


def test_clean_strokes_stay_in_the_objects_with_their_class(clean, quarter):
    positive = clean.positive
    assert positive.any() and set(np.unique(positive)) == {0, 1}
    assert not (positive[quarter == 0]).any()


@pytest.mark.parametrize("coverage", [0.2, 0.3, 0.5])
def test_strokes_cover_about_coverage_of_each_drawn_object(quarter, coverage):
    drawings = simulate(quarter, seed=0, coverage=coverage, **CLEAN)
    _, fraction = per_object(drawings.positive > 0, quarter)
    drawn = fraction[fraction > 0]
    # Overall within 0.05, and most objects within 0.1: a stroke is coarse on a small nucleus.
    assert abs(drawn.mean() - coverage) < 0.05, drawn.mean()
    assert np.mean(np.abs(drawn - coverage) < 0.1) > 0.8, np.sort(drawn)


def test_undrawn_leaves_about_that_fraction_of_objects_without_strokes(nuclei):
    drawings = simulate(nuclei, seed=0, undrawn=0.5, **CLEAN)
    ids, fraction = per_object(drawings.positive > 0, nuclei)
    assert abs(np.mean(fraction == 0) - 0.5) < 0.15, np.mean(fraction == 0)  # 125 objects: sd 0.045
    # an undrawn object has no partial mask either; a drawn one has
    _, partial = per_object(drawings.partial > 0, nuclei)
    np.testing.assert_array_equal(partial > 0, fraction > 0)


def test_default_leaves_some_objects_undrawn(nuclei):
    _, fraction = per_object(simulate(nuclei, instances=True, style="scribble", seed=0).positive > 0, nuclei)
    assert 0.05 < np.mean(fraction == 0) < 0.3


def test_sloppy_strokes_spill_at_most_3_pixels(quarter, clean):
    drawings = simulate(quarter, instances=True, style="scribble", sloppy=1.0, seed=0)
    outside = distance_outside(quarter)[drawings.positive > 0]
    assert outside.max() <= 3
    assert outside.max() >= 2, "sloppy strokes should spill"
    assert (outside > 0).sum() > 0.05 * (drawings.positive > 0).sum()
    assert not distance_outside(quarter)[clean.positive > 0].any()


def test_bias_dilates_or_erodes_the_annotators_strokes(quarter, clean):
    wide = simulate(quarter, seed=0, **{**CLEAN, "bias": 2})
    thin = simulate(quarter, seed=0, **{**CLEAN, "bias": -2})
    drawn, drawn_wide, drawn_thin = clean.positive > 0, wide.positive > 0, thin.positive > 0
    # +2: the same strokes 2 px wider, unclipped, so up to 2 px outside the objects
    np.testing.assert_array_equal(drawn_wide, ndi.distance_transform_edt(~drawn) <= 2)
    outside = distance_outside(quarter)[drawn_wide]
    assert outside.max() == pytest.approx(2) and (outside > 0).any()
    # -2: the same strokes 2 px thinner
    assert 0 < drawn_thin.sum() < 0.6 * drawn.sum()
    assert not (drawn_thin & ~drawn).any()


def test_same_seed_same_drawings_other_seed_others(quarter, clean):
    again = simulate(quarter, seed=0, **CLEAN)
    other = simulate(quarter, seed=1, **CLEAN)
    for role in ("positive", "negative", "partial"):
        np.testing.assert_array_equal(getattr(clean, role), getattr(again, role))
        assert not np.array_equal(getattr(clean, role), getattr(other, role)), role


@pytest.mark.parametrize("margin", [4.0, 8.0])
def test_negative_strokes_stay_beyond_margin(quarter, margin):
    drawings = simulate(quarter, margin=margin, seed=0, **CLEAN)
    negative = drawings.negative > 0
    assert set(np.unique(drawings.negative)) == {0, 1}
    assert distance_outside(quarter)[negative].min() > margin
    # a small share of the far background, as long strokes
    far = distance_outside(quarter) > margin + 6  # beyond the rough edge almost everywhere
    assert 0.02 < (negative & far).sum() / far.sum() < 0.1


def test_negative_of_two_classes_names_the_nearest_class_beyond_margin(two_class):
    _, mask = two_class
    drawings = simulate(mask, margin=3, style="scribble", sloppy=0, negative_coverage=0.3, seed=0)
    assert set(np.unique(drawings.positive)) == {0, 1, 2}
    np.testing.assert_array_equal(drawings.positive[drawings.positive > 0], mask[drawings.positive > 0])
    for k in (1, 2):
        marked = drawings.negative == k
        assert marked.any()
        assert ndi.distance_transform_edt(mask != k)[marked].min() > 3


def test_partial_masks_are_rough_inner_parts_of_the_drawn_objects(clean, quarter):
    partial = clean.partial
    assert partial.any() and not partial[quarter == 0].any()
    _, fraction = per_object(partial > 0, quarter)
    drawn = fraction[fraction > 0]
    assert drawn.min() > 0.3 - 0.05 and drawn.max() < 0.6 + 0.05  # the default range, rounding slack
    assert drawn.std() > 0.03, "one fraction per object"


def test_partial_fraction_range_of_scribbles(quarter):
    drawings = simulate(quarter, seed=0, partial_fraction=(0.7, 0.8), **CLEAN)
    _, fraction = per_object(drawings.partial > 0, quarter)
    assert 0.65 < fraction[fraction > 0].min() and fraction.max() < 0.85


def test_a_stack_is_drawn_slice_by_slice_with_shared_choices(quarter):
    stack = np.stack([quarter[:64, :64]] * 3)
    drawings = simulate(stack, seed=0, undrawn=0.3, **CLEAN)
    assert drawings.positive.shape == stack.shape
    assert not drawings.positive[stack == 0].any()
    drawn = [set(np.unique(plane[positive > 0])) for plane, positive in zip(stack, drawings.positive, strict=True)]
    assert drawn[0] == drawn[1] == drawn[2], "an object is drawn or undrawn in every slice"
    assert not np.array_equal(drawings.positive[0], drawings.positive[1]), "strokes differ between slices"


def test_eroded_stays_the_default(quarter):
    default = simulate(quarter, instances=True, seed=0)
    eroded = simulate(quarter, instances=True, seed=0, style="eroded", erode=(2, 4), partial_fraction=0.45)
    for role in ("positive", "negative", "partial"):
        np.testing.assert_array_equal(getattr(default, role), getattr(eroded, role))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(style="pencil"), "style must be one of eroded, scribble"),
        (dict(coverage=0.3), "coverage applies only to style 'scribble'"),
        (dict(style="scribble", erode=2), "erode applies only to style 'eroded'"),
        (dict(style="scribble", coverage=2), r"coverage must be a fraction in \[0, 1\], got 2"),
        (dict(style="scribble", undrawn=-0.1), r"undrawn must be a fraction in \[0, 1\]"),
        (dict(style="scribble", sloppy=1.5), r"sloppy must be a fraction in \[0, 1\]"),
        (dict(style="scribble", negative_coverage=float("nan")), r"negative_coverage must be a fraction"),
        (dict(style="scribble", brush_width=(6, 3)), "brush_width must be a non-negative number or a range"),
        (dict(style="scribble", brush_width=0.5), "brush_width must be at least 1 pixel"),
        (dict(style="scribble", edge_noise=-1), "edge_noise must be a non-negative number"),
        (dict(style="scribble", bias=1.5), "bias must be a whole number"),
        (dict(style="scribble", partial_fraction=(0.6, 0.3)), r"partial_fraction must be in \(0, 1\]"),
        (dict(style="scribble", partial_fraction=(0, 0.3)), r"partial_fraction must be in \(0, 1\]"),
    ],
)
def test_scribble_parameter_errors(kwargs, words):
    with pytest.raises(AnnotationError, match=words):
        simulate(np.ones((8, 8), int), **kwargs)


def test_cli_writes_scribbles_and_refuses_bad_values(quarter, tmp_path, capsys):
    labels = tmp_path / "labels.tif"
    tifffile.imwrite(labels, quarter.astype(np.uint16))
    out_dir = tmp_path / "drawings"
    assert main(["simulate", str(labels), "--out-dir", str(out_dir), "--instances", "--style", "scribble",
                 "--sloppy", "0", "--coverage", "0.3", "--brush-width", "3-5", "--bias", "0", "--seed", "2"]) == 0
    expected = simulate(quarter, seed=2, coverage=0.3, brush_width=(3, 5), **CLEAN)
    for role in ("positive", "negative", "partial"):
        np.testing.assert_array_equal(tifffile.imread(out_dir / f"{role}.tif"), getattr(expected, role))

    capsys.readouterr()
    for bad in (["--style", "scribble", "--coverage", "2"], ["--undrawn", "0.5"]):
        refused = tmp_path / "refused"
        try:
            code = main(["simulate", str(labels), "--out-dir", str(refused), "--instances", *bad])
        except SystemExit as exit:  # a fraction out of [0, 1]: argparse's exit, status 2
            code = exit.code
        err = capsys.readouterr().err
        assert code != 0 and not refused.exists()
        assert len(err.splitlines()) == 1 and err.startswith("coarseseg simulate: error:"), err
