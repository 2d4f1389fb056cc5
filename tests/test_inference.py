"""Tiled prediction, stacks, and the value ranges of ``predict``'s outputs.

Tiling blends overlapping tiles with a linear window (inference.py). For a
network whose output at a pixel depends on that pixel only (1 x 1
convolutions), tiled and whole-image predictions must agree to rounding:
that checks the tile layout, padding, cropping and blending arithmetic. A
U-Net sees a neighbourhood larger than the overlap, so near tile borders it
sees padding instead of the neighbours: for it the two agree only closely,
which is checked with a looser bound.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_coarseseg import AnnotationError, predict
from napari_coarseseg.data import TrainingImages
from napari_coarseseg.inference import blend_window, tile_starts
from napari_coarseseg.methods.refineseg import RefinesegDrawings, adjust_to_prior, prior_strength_for_gap
from napari_coarseseg.model_io import Model, make_card
from napari_coarseseg.networks import TransitionHead
from napari_coarseseg.training import TrainingConfig

WHOLE = dict(tile_size=512, overlap=16)  # one tile covers the image


class Pointwise(nn.Module):
    """A stand-in for the U-Net whose outputs depend on each pixel alone."""

    def __init__(self, n_labels: int, features: int = 4, divisor: int = 4):
        super().__init__()
        self.n_classes = n_labels
        self.divisor = divisor
        self.features = nn.Conv2d(1, features, 1)
        self.classifier = nn.Conv2d(features, n_labels, 1)

    def forward(self, x):
        f = torch.tanh(self.features(x)) * 3
        return self.classifier(f), f


def pointwise_model(n_classes: int = 2, n_heads: int = 2) -> Model:
    torch.manual_seed(0)
    n_labels = n_classes + 1
    network = Pointwise(n_labels)
    heads = nn.ModuleList([TransitionHead(4, n_labels) for _ in range(n_heads)])
    with torch.no_grad():
        for head in heads:
            head.conv.weight.normal_(std=1.0)  # reliability varies over the image
    card = make_card("refineseg", n_classes, 1, False, {"kind": "unet", "base_channels": 4, "depth": 2,
                                                        "n_heads": n_heads})
    return Model(network, heads, card).eval()


@pytest.mark.parametrize("shape", [(64, 64), (50, 37)])
@pytest.mark.parametrize("tile_size, overlap", [(16, 4), (20, 5), (24, 8), (32, 0), (33, 31)])
def test_tiled_equals_whole_for_a_pointwise_network(discs, shape, tile_size, overlap):
    image = discs[0][: shape[0], : shape[1]]
    model = pointwise_model()
    whole = predict(model, image, device="cpu", **WHOLE)
    tiled = predict(model, image, device="cpu", tile_size=tile_size, overlap=overlap, batch_size=3)
    assert len(tile_starts(shape[0], tile_size, overlap)) > 1, "the image should need several tiles"
    np.testing.assert_allclose(tiled.probabilities, whole.probabilities, atol=1e-5, rtol=0)
    np.testing.assert_allclose(tiled.reliability, whole.reliability, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(tiled.labels, whole.labels)
    assert len(np.unique(whole.labels)) > 1, "the stand-in should not predict a constant"


@pytest.mark.parametrize("prior_correction", [True, False])
@pytest.mark.parametrize("tile_size, overlap", [(32, 8), (32, 16), (48, 16), (40, 24)])
def test_tiled_close_to_whole_for_a_unet(discs, disc_model, tile_size, overlap, prior_correction):
    image, _ = discs
    whole = predict(disc_model, image, device="cpu", prior_correction=prior_correction, **WHOLE)
    tiled = predict(disc_model, image, device="cpu", tile_size=tile_size, overlap=overlap,
                    prior_correction=prior_correction)
    assert 0.05 < (whole.labels > 0).mean() < 0.5, "the model should segment the discs"
    difference = np.abs(tiled.probabilities - whole.probabilities)
    # no seams: close everywhere, essentially equal away from tile borders
    assert difference.max() < 0.2
    assert np.median(difference) < 5e-3
    assert (tiled.labels == whole.labels).mean() > 0.99
    assert np.abs(tiled.reliability - whole.reliability).max() < 0.1


def test_single_tile_of_the_image_size_equals_whole(discs, disc_model):
    image, _ = discs
    whole = predict(disc_model, image, device="cpu", **WHOLE)
    exact = predict(disc_model, image, device="cpu", tile_size=64, overlap=32)
    np.testing.assert_allclose(exact.probabilities, whole.probabilities, atol=1e-6, rtol=0)
    np.testing.assert_allclose(exact.reliability, whole.reliability, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(exact.labels, whole.labels)


def test_tile_layout_covers_the_image():
    for length, tile, overlap in [(64, 16, 4), (50, 20, 5), (37, 33, 31), (10, 16, 4), (100, 32, 0)]:
        starts = tile_starts(length, tile, overlap)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s : s + tile] = True
            assert 0 <= s and s + min(tile, length) <= length
        assert covered.all()
        if len(starts) > 1:
            assert min(b - a for a, b in zip(starts[:-1], starts[1:], strict=True)) > 0
            assert max(a + tile - b for a, b in zip(starts[:-1], starts[1:], strict=True)) >= overlap
    window = blend_window(16, 12, 3)
    assert window.shape == (16, 12) and (window > 0).all() and window.max() == 1.0
    assert window[0, 0] < window[1, 1] < window[2, 2] < window[3, 3] == 1.0  # linear ramp over the overlap
    np.testing.assert_allclose(window, window[::-1, ::-1])


def same_histogram_stack(image):
    """Three slices with the same intensities in other places: per-slice and whole-stack normalisation agree."""
    return np.stack([image, image.T, image[::-1, ::-1]])


@pytest.mark.parametrize("tiles", [WHOLE, dict(tile_size=32, overlap=8)])
def test_stack_equals_per_slice_prediction(discs, disc_model, tiles):
    stack = same_histogram_stack(discs[0])
    result = predict(disc_model, stack, device="cpu", **tiles)
    assert result.labels.shape == stack.shape
    assert result.probabilities.shape == (2,) + stack.shape
    assert result.reliability.shape == stack.shape
    for z in range(stack.shape[0]):
        single = predict(disc_model, stack[z], device="cpu", **tiles)
        np.testing.assert_allclose(result.probabilities[:, z], single.probabilities, atol=1e-5, rtol=0)
        np.testing.assert_allclose(result.reliability[z], single.reliability, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(result.labels[z], single.labels)
    # the slices are really different (slice order matters) and the labels match the geometry
    assert not np.allclose(result.probabilities[:, 0], result.probabilities[:, 1], atol=1e-3)
    # (the network is only roughly equivariant to the transposition)
    assert (result.labels[1] == result.labels[0].T).mean() > 0.95


def check_ranges(result, image_shape, n_classes):
    assert result.labels.shape == image_shape and result.labels.dtype == np.uint8
    assert result.labels.min() >= 0 and result.labels.max() <= n_classes
    assert result.probabilities.shape == (n_classes + 1,) + image_shape
    assert result.probabilities.dtype == np.float32
    assert (result.probabilities >= 0).all() and (result.probabilities <= 1 + 1e-6).all()
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(result.labels, result.probabilities.argmax(0))
    assert result.reliability.shape == image_shape
    assert (result.reliability >= 0).all() and (result.reliability <= 1).all()


@pytest.mark.parametrize("prior_correction", [True, False])
def test_output_ranges_two_classes(two_class, tiny_two_class_model, prior_correction):
    image, _ = two_class
    assert tiny_two_class_model.n_classes == 2
    result = predict(tiny_two_class_model, image, device="cpu", tile_size=32, overlap=8,
                     prior_correction=prior_correction)
    check_ranges(result, image.shape, 2)


@pytest.mark.parametrize("n_classes", [1, 2, 3])
def test_output_ranges_of_a_stand_in(discs, n_classes):
    image, _ = discs
    stack = np.stack([image, image[::-1]])
    for data in (image, stack):
        result = predict(pointwise_model(n_classes), data, device="cpu", tile_size=32, overlap=8)
        check_ranges(result, data.shape, n_classes)
        assert len(np.unique(result.labels)) > 1


def test_output_ranges_of_a_trained_model(discs, disc_model):
    result = predict(disc_model, discs[0], device="cpu", tile_size=32, overlap=8)
    check_ranges(result, discs[0].shape, 1)
    assert set(np.unique(result.labels)) == {0, 1}


def test_prior_correction_is_the_bayes_reweighting(discs, tiny_model):
    image, _ = discs
    prior = tiny_model.card["prior"]
    plain = predict(tiny_model, image, device="cpu", prior_correction=False)
    corrected = predict(tiny_model, image, device="cpu", prior_correction=True)
    expected = plain.probabilities * (np.array(prior["estimated"]) / np.array(prior["training"]))[:, None, None]
    expected /= expected.sum(0, keepdims=True)
    np.testing.assert_allclose(corrected.probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(adjust_to_prior(plain.probabilities, prior["estimated"], prior["training"]),
                               expected, atol=1e-5)
    np.testing.assert_array_equal(plain.reliability, corrected.reliability)


def test_prior_strength_raises_the_prior_ratio_to_its_power_and_defaults_to_the_card(discs, tiny_model):
    image, _ = discs
    prior = tiny_model.card["prior"]
    ratio = np.array(prior["estimated"]) / np.array(prior["training"])
    plain = predict(tiny_model, image, device="cpu", prior_correction=False)
    stronger = predict(tiny_model, image, device="cpu", prior_strength=3.0)
    expected = plain.probabilities * (ratio**3)[:, None, None]
    expected /= expected.sum(0, keepdims=True)
    np.testing.assert_allclose(stronger.probabilities, expected, atol=1e-5)
    # A card that records strength 3 predicts the same without being told.
    card = {**tiny_model.card, "prior": {**prior, "strength": 3.0}}
    from_card = predict(type(tiny_model)(tiny_model.network, tiny_model.heads, card), image, device="cpu")
    np.testing.assert_allclose(from_card.probabilities, expected, atol=1e-5)
    with pytest.raises(ValueError, match="prior strength"):
        adjust_to_prior(plain.probabilities, prior["estimated"], prior["training"], strength=-1)


def test_annotation_gap_is_the_median_distance_from_object_strokes_to_background_strokes():
    """Object strokes 10, 11, 12 px (by hand) from a negative stroke; a background layer's marks count too."""
    image = np.zeros((5, 40), np.float32)
    positive, negative, background = (np.zeros((5, 40), np.uint8) for _ in range(3))
    positive[2, 20:23] = 1
    negative[2, 10] = 1
    images = TrainingImages(image, False, None)
    assert RefinesegDrawings(images, [positive], [negative]).annotation_gap() == 11.0
    background[2, 25] = 1  # now 5, 4, 3 px from a background mark
    assert RefinesegDrawings(images, [positive], [negative], [background]).annotation_gap() == 4.0
    # Another class's strokes are object strokes, not background: with no background stroke at all, None.
    two_classes = positive + 2 * background
    assert RefinesegDrawings(images, [two_classes], n_classes=2).annotation_gap() is None


def test_auto_prior_strength_grows_one_step_per_eight_px_of_undrawn_band_from_fifteen_up_to_three():
    gaps = (None, 0, 15, 18.9, 19.1, 27, 35, 43, 100)
    assert [prior_strength_for_gap(g) for g in gaps] == [1, 1, 1, 1, 2, 3, 3, 3, 3]
    with pytest.raises(ValueError, match="gap"):
        prior_strength_for_gap(-1)
    with pytest.raises(ValueError, match="prior_strength"):
        TrainingConfig(prior_strength="strong").validate()


def test_the_card_records_the_strength_the_auto_rule_gave_and_predict_uses_it(discs, tiny_model):
    """The disc drawings' band (eroded discs, background 3 px beyond) is narrow: the Bayes rule, tau 1."""
    image, _ = discs
    prior = tiny_model.card["prior"]
    assert 0 < prior["annotation_gap"] < 15 and prior["strength"] == 1
    fixed = predict(tiny_model, image, device="cpu", prior_strength=1.0)
    np.testing.assert_allclose(predict(tiny_model, image, device="cpu").probabilities, fixed.probabilities)


def test_reliability_is_off_diagonal_mass_of_the_heads(discs):
    image, _ = discs
    model = pointwise_model(n_classes=1, n_heads=1)
    result = predict(model, image, device="cpu", **WHOLE)
    from napari_coarseseg.data import normalize

    x = torch.from_numpy(normalize(image))[None, None]
    with torch.no_grad():
        _, features = model.network(x)
        a = model.heads[0](features)[0]
    expected = 1 - (a[0, 0] + a[1, 1]).numpy() / 2
    np.testing.assert_allclose(result.reliability, expected, atol=1e-5)


def test_predict_rejects_bad_arguments(discs, tiny_model):
    image, _ = discs
    with pytest.raises(ValueError, match="overlap must be in"):
        predict(tiny_model, image, device="cpu", tile_size=32, overlap=32)
    with pytest.raises(AnnotationError, match="colour image"):
        predict(tiny_model, np.repeat(image[..., None], 3, axis=-1), device="cpu")
    with pytest.raises(AnnotationError, match="NaN"):
        predict(tiny_model, np.full((16, 16), np.nan), device="cpu")


def test_streamed_stack_prediction_keeps_labels_and_one_slice_of_probabilities(discs, disc_model):
    """keep_probabilities=False: the same labels and reliability, and memory of one slice, not of the stack."""
    import tracemalloc

    image, _ = discs
    stack = np.stack([np.roll(image, 3 * i, axis=1) for i in range(24)])
    kept = predict(disc_model, stack, device="cpu", tile_size=32, overlap=8)
    tracemalloc.start()
    streamed = predict(disc_model, stack, device="cpu", tile_size=32, overlap=8, keep_probabilities=False)
    _, peak_streamed = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    predict(disc_model, stack, device="cpu", tile_size=32, overlap=8)
    _, peak_kept = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_array_equal(streamed.labels, kept.labels)
    np.testing.assert_array_equal(streamed.reliability, kept.reliability)
    assert streamed.probabilities is None and kept.probabilities.shape == (2, *stack.shape)
    probabilities_bytes = kept.probabilities.nbytes  # 2 x 24 x 64 x 64 float32
    assert peak_kept - peak_streamed > probabilities_bytes, (peak_kept, peak_streamed)


class SliceOnlyArray:
    """A lazy stack that serves single slices only and refuses to be read whole (like a huge zarr store)."""

    def __init__(self, data):
        self.data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, data.ndim
        self.reads = []

    def __getitem__(self, index):
        if not isinstance(index, int):
            raise AssertionError(f"read more than one slice: {index!r}")
        self.reads.append(index)
        return self.data[index]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole stack was read into memory")


def test_lazy_stacks_are_read_slice_by_slice_and_predict_the_same(discs, disc_model, tmp_path):
    image, _ = discs
    stack = np.stack([np.roll(image, 5 * i, axis=0) for i in range(6)])
    expected = predict(disc_model, stack, device="cpu")
    lazy = SliceOnlyArray(stack)
    streamed = predict(disc_model, lazy, device="cpu")
    assert sorted(set(lazy.reads)) == list(range(6)) and len(lazy.reads) == 12  # two passes, one slice at a time
    np.testing.assert_array_equal(streamed.labels, expected.labels)
    np.testing.assert_allclose(streamed.probabilities, expected.probabilities, atol=1e-5)
    memmap = np.memmap(tmp_path / "stack.raw", dtype=stack.dtype, mode="w+", shape=stack.shape)
    memmap[:] = stack
    np.testing.assert_array_equal(predict(disc_model, memmap, device="cpu").labels, expected.labels)


def test_a_nan_slice_of_a_lazy_stack_is_named(discs, disc_model):
    image, _ = discs
    stack = np.stack([image, image, image]).astype(np.float32)
    stack[2, 10, 10] = np.nan
    with pytest.raises(AnnotationError, match=r"NaN or infinite values \(slice 2\)"):
        predict(disc_model, SliceOnlyArray(stack), device="cpu", name="stack")


def test_flips_average_the_four_mirror_images(discs, disc_model):
    """flips=True: the probabilities are the mean of the four mirrored predictions, mapped back, so mirroring
    the image mirrors the result exactly (up to float rounding) and the maps differ from a single pass."""
    image, _ = discs
    image = image[:, :60]  # not a multiple of the network's divisor: the padding must land right
    plain = dict(device="cpu", prior_correction=False)  # the prior correction is not linear: compare before it
    once = predict(disc_model, image, **plain).probabilities
    averaged = predict(disc_model, image, flips=True, **plain).probabilities
    by_hand = np.mean([np.flip(predict(disc_model, np.flip(image, axes), **plain).probabilities,
                               tuple(a + 1 for a in axes)) for axes in [(), (1,), (0,), (0, 1)]], axis=0)
    assert np.abs(averaged - by_hand).max() < 1e-4
    assert np.abs(averaged - once).max() > 1e-3
    mirrored = predict(disc_model, image[:, ::-1], flips=True, **plain).probabilities
    assert np.abs(mirrored[:, :, ::-1] - averaged).max() < 1e-4
