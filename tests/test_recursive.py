"""The recursive method: multi-task network, training generator, prediction, model files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_coarseseg import load_model, load_preset, predict, run_to_end, save_model, simulate
from napari_coarseseg.annotations import AnnotationError
from napari_coarseseg.data import TrainingImages
from napari_coarseseg.demo import dice
from napari_coarseseg.methods.recursive import (
    RecursiveMasks,
    final_growth,
    prediction_seeds,
    train_recursive,
)
from napari_coarseseg.multitask import MultiTaskUNet

#: The recursive preset's prediction seed level (models/recursive.json).
SEED_LEVEL = load_preset("recursive").prediction_seed_level

TINY = dict(steps=20, iterations=4, base_channels=8, depth=2, patch_size=32, batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def partial_discs(discs):
    """The disc image twice: both with partial masks (inner 45 %), the first with the exact mask too."""
    image, mask = discs
    partial = simulate(mask, seed=0).partial
    return image, mask, partial


@pytest.fixture(scope="module")
def recursive_run(partial_discs):
    image, mask, partial = partial_discs
    events = []
    model = run_to_end(train_recursive([image, image], [partial, partial], [mask, None], seed=0, **TINY),
                       events.append)
    return model, events


# --------------------------------------------------------------------------- network


def test_multitask_outputs_and_shapes():
    network = MultiTaskUNet(1, 3, base_channels=4, depth=3, task_levels=2, separation=True)
    out = network(torch.randn(2, 1, 32, 32))
    assert set(out) == {"segmentation", "approximation", "separation"}
    assert out["segmentation"].shape == out["approximation"].shape == (2, 3, 32, 32)
    assert out["separation"].shape == (2, 2, 32, 32)
    assert "separation" not in MultiTaskUNet(1, 2, 4, 2)(torch.randn(1, 1, 16, 16))


def test_first_layer_of_t1_and_t2_paths_is_shared():
    network = MultiTaskUNet(1, 2, base_channels=4, depth=2, task_levels=1).eval()
    x = torch.randn(1, 1, 16, 16)
    before = network(x)
    block = network.task_blocks[0]
    # perturbing the shared first layer moves both outputs ...
    with torch.no_grad():
        block.shared[0].weight.add_(0.5)
    shared = network(x)
    assert not torch.allclose(shared["segmentation"], before["segmentation"])
    assert not torch.allclose(shared["approximation"], before["approximation"])
    # ... perturbing the residual unit of the segmentation path moves only T1
    with torch.no_grad():
        block.segmentation.body[0][0].weight.add_(0.5)
    residual = network(x)
    assert not torch.allclose(residual["segmentation"], shared["segmentation"])
    torch.testing.assert_close(residual["approximation"], shared["approximation"])


def test_bad_task_levels():
    with pytest.raises(ValueError, match="task_levels"):
        MultiTaskUNet(1, 2, 4, depth=2, task_levels=3)


# --------------------------------------------------------------------------- training


def test_evolution_has_k_plus_one_planes_starting_at_the_drawing(recursive_run, partial_discs):
    _, events = recursive_run
    _, _, partial = partial_discs
    evolution = [e for e in events if e.masks is not None]
    assert [e.iteration for e in evolution] == list(range(TINY["iterations"] + 1))
    np.testing.assert_array_equal(evolution[0].masks[0], partial)
    assert events[-1].step == events[-1].total_steps == TINY["steps"] * TINY["iterations"]


def test_approximations_only_grow_and_gain_dice(recursive_run, partial_discs):
    _, events = recursive_run
    _, mask, _ = partial_discs
    evolution = [e.masks[1] for e in events if e.masks is not None]  # the image without exact mask
    for before, after in zip(evolution[:-1], evolution[1:], strict=True):
        assert np.all(after[before > 0] == before[before > 0])
    scores = [dice(m > 0, mask > 0) for m in evolution]
    assert scores[-1] - scores[0] >= 0.2, scores
    assert scores[-1] > 0.9, scores


def test_prediction_and_model_file_round_trip(recursive_run, partial_discs, tmp_path):
    model, _ = recursive_run
    image, mask, _ = partial_discs
    prediction = predict(model, image, device="cpu")
    assert prediction.labels.shape == image.shape and prediction.labels.dtype == np.uint8
    assert prediction.probabilities.shape == (2, *image.shape) and prediction.reliability is None
    assert dice(prediction.labels > 0, mask > 0) > 0.85
    path = save_model(model, tmp_path / "recursive.safetensors")
    loaded = load_model(path)
    assert loaded.card["method"] == "recursive" and loaded.card["network"]["kind"] == "multitask"
    again = predict(loaded, image, device="cpu")
    np.testing.assert_array_equal(again.labels, prediction.labels)
    np.testing.assert_allclose(again.probabilities, prediction.probabilities, atol=1e-6)
    stack = predict(loaded, np.stack([image, image[::-1]]), device="cpu")
    np.testing.assert_array_equal(stack.labels[0], prediction.labels)


def test_seeded_runs_are_reproducible(partial_discs):
    image, mask, partial = partial_discs
    settings = dict(TINY, steps=3, iterations=2)
    runs = [run_to_end(train_recursive(image, partial, mask, seed=5, **settings)) for _ in range(2)]
    for a, b in zip(runs[0].network.state_dict().values(), runs[1].network.state_dict().values(),
                    strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_small_batches_mix_strong_and_partial_patches(partial_discs, batch_size, monkeypatch):
    """Every step draws from the strong planes and from all planes, except a batch of 1 (all planes only)."""
    from napari_coarseseg.data import PatchSampler

    image, mask, partial = partial_discs
    requests = []
    original = PatchSampler.batch

    def spy(self, n, planes=None):
        requests.append((n, planes))
        return original(self, n, planes)

    monkeypatch.setattr(PatchSampler, "batch", spy)
    settings = dict(TINY, steps=2, iterations=1, batch_size=batch_size)
    run_to_end(train_recursive([image, image], [partial, partial], [mask, None], seed=0, **settings))
    expected = [(1, None)] if batch_size == 1 else [(1, None), (1, [0])]
    assert requests == expected * 2


def test_separation_task_targets_and_head(partial_discs):
    image, mask, partial = partial_discs
    scribbles = np.zeros_like(mask)
    scribbles[30:34, 30:34] = 1
    inputs = RecursiveMasks(TrainingImages(image), partial, mask, scribbles)
    assert inputs.has_separation
    target = inputs.targets()[2][0]
    assert (target[scribbles > 0] == 1).all()
    assert (target[(partial > 0) & (scribbles == 0)] == 0).all()
    assert (target[(partial == 0) & (scribbles == 0)] == -1).all()
    model = run_to_end(train_recursive(image, partial, mask, scribbles, **dict(TINY, steps=2, iterations=1)))
    assert model.card["network"]["separation"] is True
    assert predict(model, image, device="cpu").labels.shape == image.shape


def test_closing_the_generator_stops_training(partial_discs):
    image, mask, partial = partial_discs
    training = train_recursive(image, partial, mask, **dict(TINY, steps=50, iterations=3))
    steps = [next(training).step for _ in range(5)]
    training.close()
    assert steps == [0, 1, 2, 3, 4]
    with pytest.raises(StopIteration):
        next(training)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (lambda im, m, p: (im, None, m), "no partial mask"),
        (lambda im, m, p: (im, p, None), "no exact mask"),
        (lambda im, m, p: (im, p[:10], m), "shape"),
        (lambda im, m, p: ([im, im], [p], [m, None]), "one array per image"),
        (lambda im, m, p: (im, p, m * 3), "class 3"),
    ],
)
def test_input_errors(partial_discs, arguments, message):
    image, mask, partial = partial_discs
    images, partial_layer, strong = arguments(image, mask, partial)
    with pytest.raises(AnnotationError, match=message):
        next(train_recursive(images, partial_layer, strong, n_classes=1 if message == "class 3" else None, **TINY))


def test_final_growth_keeps_a_sane_foreground_and_gates_a_flooded_one():
    yy, xx = np.mgrid[:64, :64]
    distance = np.hypot(yy - 32, xx - 32)
    region = (distance <= 5).astype(np.int64)  # T2's region
    nucleus = (distance <= 8).astype(np.int64)  # T1's foreground, 3 px beyond it
    sane = final_growth(nucleus, region, epsilon=2.0, gate=4)
    np.testing.assert_array_equal(sane, final_growth(nucleus, region, epsilon=2.0, gate=np.inf))
    assert (sane > region).any() and np.all(sane >= region) and np.all(sane <= nucleus)
    # T1 failing: everything is foreground. The result stays within 4 px of T2's region.
    flooded = final_growth(np.ones((64, 64), np.int64), region, epsilon=2.0, gate=4)
    assert np.all(flooded >= region) and distance[flooded > 0].max() <= 5 + 4
    # without the gate, the flood would have been followed
    ungated = final_growth(np.ones((64, 64), np.int64), region, epsilon=2.0, gate=np.inf)
    assert (ungated > 0).sum() > 5 * (distance <= 9).sum()


def test_certain_pixels_for_t1_follow_the_reach_measured_on_the_exact_masks():
    """Disc of radius 8 with a partial disc of radius 4: objects reach 4 px past their partial regions."""
    yy, xx = np.mgrid[:48, :48]
    radius = np.hypot(yy - 24, xx - 24)
    exact = (radius <= 8).astype(np.uint8)
    partial = (radius <= 4).astype(np.uint8)
    other_partial = np.zeros_like(partial)
    other_partial[2:5, 2:5] = 1  # an image with partial masks only, a 3 x 3 region in a corner
    inputs = RecursiveMasks(TrainingImages([exact.astype(np.float32)] * 2), [partial, other_partial], [exact, None])
    distance_to_partial = np.hypot(yy - 24, xx - 24)[exact > 0].max() - 4  # by hand: 8 - 4, up to the grid
    assert inputs.object_reach() == pytest.approx(distance_to_partial, abs=0.5)
    assert inputs.certain_target(0, 4.0) is None  # the exactly masked image keeps its exact mask
    target = inputs.certain_target(1, 4.0, margin=2.0)
    assert (target[2:5, 2:5] == 1).all()
    assert target[3, 7] == -1 and target[3, 10] == -1  # 3 and 6 px away: within reach + margin
    assert target[3, 11] == 0 and (target[20:, 20:] == 0).all()  # 7 px and more: certain background
    segmentation_targets = inputs.targets(certain_pixels=True)[0]
    np.testing.assert_array_equal(segmentation_targets[0], exact)
    np.testing.assert_array_equal(segmentation_targets[1], inputs.certain_target(1, inputs.object_reach()))
    assert (inputs.targets()[0][1] == -1).all()  # switched off: T1 sees nothing on partial-only images


def test_final_growth_keeps_touching_objects_of_one_class_apart():
    """Two touching nuclei are one component of T1's foreground; the prediction reads them as two objects."""
    from scipy import ndimage as ndi

    yy, xx = np.mgrid[:40, :60]
    foreground = ((np.hypot(yy - 20, xx - 20) <= 12) | (np.hypot(yy - 20, xx - 40) <= 12)).astype(np.int64)
    regions = ((np.hypot(yy - 20, xx - 16) <= 4) | (np.hypot(yy - 20, xx - 44) <= 4)).astype(np.int64)
    assert ndi.label(foreground)[1] == 1
    grown = final_growth(foreground, regions, epsilon=1e6, gate=np.inf)
    assert ndi.label(grown)[1] == 2 and ndi.label(grown, np.ones((3, 3)))[1] == 2
    assert np.all(grown >= regions) and np.all(grown <= foreground)
    assert (foreground > grown).sum() <= 2 * 40  # a 1 px line between them, nothing else lost
    without_gap = final_growth(foreground, regions, epsilon=1e6, gate=np.inf, gap=0)
    np.testing.assert_array_equal(without_gap, foreground)


def test_approximation_carries_a_gap_where_two_objects_grew_together():
    from scipy import ndimage as ndi

    partial = np.zeros((20, 30), np.uint8)
    partial[8:12, 5:9] = partial[8:12, 21:25] = 1  # two objects of class 1
    exact = np.zeros_like(partial)
    exact[4:16, 3:27] = 1  # T1's foreground: one block holding both
    inputs = RecursiveMasks(TrainingImages([partial.astype(np.float32)] * 2), [partial, partial], [exact, None])
    inputs.grow([exact, exact], epsilon=1e6)
    for plane in (0, 1):
        seeds = inputs.seeds[plane]
        assert set(np.unique(seeds)) == {0, 1, 2} and ((seeds > 0) == (exact > 0)).all()  # ids carried, no gap
        approximation = inputs.approximation(plane)
        assert ndi.label(approximation, np.ones((3, 3)))[1] == 2
        assert (approximation[partial > 0] == 1).all()  # the drawn regions are never cut
        instances = inputs.instances(plane)
        np.testing.assert_array_equal(inputs.seed_classes[plane][instances], approximation)
        assert set(np.unique(instances)) == {0, 1, 2}
        assert (inputs.targets()[1][plane] == approximation).all()  # T2's target carries the gap
    assert inputs.masks()[0].max() == 1 and ndi.label(inputs.masks()[0])[1] == 2  # and so does the evolution
    no_gap = RecursiveMasks(TrainingImages(partial.astype(np.float32)), partial, exact, gap=0)
    no_gap.grow([exact], epsilon=1e6)
    assert ndi.label(no_gap.approximation(0))[1] == 1  # without the gap, the two objects read as one


def _two_nuclei_joined_by_a_neck():
    """Two touching discs (T1's foreground); T2's argmax region joins their cores by a 2 px neck."""
    yy, xx = np.mgrid[:40, :60]
    left, right = np.hypot(yy - 20, xx - 20), np.hypot(yy - 20, xx - 40)
    foreground = ((left <= 10) | (right <= 10)).astype(np.int64)
    truth = np.where(left <= 10, 1, np.where(right <= 10, 2, 0))
    truth[(left <= 10) & (right <= 10)] = 0
    neck = (np.abs(yy - 20) <= 1) & (xx >= 20) & (xx <= 40)
    cores = (left <= 8) | (right <= 8)
    regions = (cores | neck).astype(np.int64)
    # T2's probability: highest at the nuclei's centres, falling slowly towards their edges; T2 learned a
    # gap between touching objects, so the neck, though its argmax is object, is less probable.
    probability = np.where(cores, 0.95 - 0.01 * np.minimum(left, right), np.where(neck, 0.7, 0.0))
    return foreground, regions, probability, truth


def test_prediction_seeds_split_two_touching_nuclei_joined_by_a_neck():
    from scipy import ndimage as ndi

    foreground, regions, probability, truth = _two_nuclei_joined_by_a_neck()
    assert ndi.label(regions)[1] == 1
    whole = final_growth(foreground, regions, epsilon=2.0, gate=4)
    assert ndi.label(whole)[1] == 1  # today's seeds: the joined region is one seed, one object
    grown = final_growth(foreground, regions, epsilon=2.0, gate=4, probability=probability,
                         seed_level=SEED_LEVEL)
    instances, n = ndi.label(grown)
    assert n == 2 and ndi.label(grown, np.ones((3, 3)))[1] == 2
    assert len(np.unique(instances[(truth == 1) & (instances > 0)])) == 1
    assert len(np.unique(instances[(truth == 2) & (instances > 0)])) == 1
    # the 1 px gap between them is all the split costs
    assert dice(grown > 0, foreground > 0) > 0.95 and (whole > grown).sum() <= 2 * 20


def test_prediction_seeds_keep_a_single_nucleus_one_object():
    from scipy import ndimage as ndi

    yy, xx = np.mgrid[:40, :40]
    distance = np.hypot(yy - 20, xx - 18)
    foreground = (distance <= 10).astype(np.int64)
    regions = (distance <= 8).astype(np.int64)
    probability = np.where(regions > 0, 0.95 - 0.015 * distance, 0.0)  # the seed: about 7.6 px around the centre
    seeds = prediction_seeds(regions, probability, SEED_LEVEL)
    assert ndi.label(seeds)[1] == 1 and np.all(seeds <= regions) and seeds[20, 18] == 1
    grown = final_growth(foreground, regions, epsilon=2.0, gate=4, probability=probability,
                         seed_level=SEED_LEVEL)
    # a shrunk seed grows less far (epsilon 2: about 2 px per px inside F), a small cost in Dice
    assert ndi.label(grown)[1] == 1 and dice(grown > 0, foreground > 0) > 0.9
    # level 0 or no probability: the whole regions are the seeds (today's behaviour)
    np.testing.assert_array_equal(prediction_seeds(regions, probability, 0.0), regions)
    np.testing.assert_array_equal(prediction_seeds(regions, None, 0.9), regions)


def test_prediction_seeds_keep_every_region():
    regions = np.zeros((10, 20), np.int64)
    regions[2:5, 2:5], regions[6:9, 12:18] = 1, 2
    probability = np.where(regions > 0, 0.3, 0.0)
    probability[3, 3], probability[7, 15] = 0.9, 0.5  # one region confident, the other not at all
    seeds = prediction_seeds(regions, probability, 0.99)
    assert seeds[3, 3] == 1 and seeds[7, 15] == 2 and (seeds > 0).sum() == 2


def test_card_holds_the_prediction_seed_level(recursive_run):
    model, _ = recursive_run
    assert model.card["prediction_seed_level"] == load_preset("recursive").prediction_seed_level


# --------------------------------------------------------------------------- pixel size (spacing)


def bar_and_seed():
    """F: a bar 5 px wide (X), 11 px tall (Y); the partial mask: its middle pixel (6, 3)."""
    bar = np.zeros((13, 7), np.int64)
    bar[1:12, 1:6] = 1
    seed = np.zeros((13, 7), np.int64)
    seed[6, 3] = 1
    return bar, seed


def test_each_plane_grows_with_its_images_pixel_size():
    """A stack with voxels of 5 x 2 x 1 (Z, Y, X) and a 2-D image without a pixel size, one iteration (eps 1)
    into the bar (tests/test_levelset.py computes both growths by hand): in pixels the seed becomes 13 pixels
    (3 rows up and down), on the stack's planes 5 (1 row: a row is 2 units). The reach of the objects
    (measured on the stack's exact mask) is physical too: corner (1, 1) to (6, 3) is sqrt(10^2 + 2^2)."""
    bar, seed = bar_and_seed()
    images = TrainingImages([np.zeros((2, 13, 7), np.float32), np.zeros((13, 7), np.float32)],
                            spacing=[(5.0, 2.0, 1.0), None])
    assert images.plane_spacing == [(2.0, 1.0), (2.0, 1.0), None]
    masks = RecursiveMasks(images, [np.stack([seed, seed]), seed], [np.stack([bar, 0 * bar]), None])
    assert masks.object_reach() == pytest.approx(np.sqrt(104))  # 5.39 = sqrt(5^2 + 2^2) in pixels
    assert masks.grow([bar, bar, bar], epsilon=1.0) == 4 + 4 + 12
    anisotropic = np.zeros((13, 7), np.int64)
    anisotropic[5:8, 3] = anisotropic[6, 2:5] = 1
    in_pixels = np.zeros((13, 7), np.int64)
    in_pixels[3:10, 3] = in_pixels[5:8, 2:5] = 1
    for plane, expected in zip(masks.seeds, [anisotropic, anisotropic, in_pixels], strict=True):
        np.testing.assert_array_equal(plane, expected)


def test_final_growth_measures_the_gate_and_the_growth_physically():
    """gate 2 px, eps 1e6 (fill F within the gate). In pixels: |dy|, |dx| with dy^2 + dx^2 <= 4, 13 pixels.
    Pixels 2 units tall: the gate is 2 px times the larger size, 4 units: (2 dy)^2 + dx^2 <= 16 gives rows
    6 +- 1 across the whole bar (|dx| <= 2 < sqrt(12)) and (4, 3), (8, 3): 17 pixels. The same in units of 2 x 2
    is the result in pixels."""
    bar, seed = bar_and_seed()
    in_pixels = final_growth(bar, seed, epsilon=1e6, gate=2)
    anisotropic = final_growth(bar, seed, epsilon=1e6, gate=2, spacing=(2.0, 1.0))
    assert in_pixels.sum() == 13 and anisotropic.sum() == 17
    np.testing.assert_array_equal(anisotropic[5:8], bar[5:8])
    np.testing.assert_array_equal(anisotropic[[4, 8]].nonzero()[1], [3, 3])
    np.testing.assert_array_equal(final_growth(bar, seed, epsilon=1e6, gate=2, spacing=(2.0, 2.0)), in_pixels)


def test_training_grows_with_the_spacing_and_the_card_records_it(partial_discs, monkeypatch, tmp_path):
    """A voxel size (sz, sy, sx) for all images: every level-set call of the run gets (sy, sx), the card records
    it, prediction takes the card's unless given another; cards without it predict in pixels."""
    from napari_coarseseg.methods import recursive

    image, mask, partial = partial_discs
    seen = []

    def spy(*arguments, spacing=None):
        seen.append(spacing)
        return original(*arguments, spacing=spacing)

    original = recursive.grow_regions
    monkeypatch.setattr(recursive, "grow_regions", spy)
    settings = dict(TINY, steps=2, iterations=2)
    model = run_to_end(train_recursive([image, image], [partial, partial], [mask, None], seed=0,
                                       spacing=(3.0, 2.0, 1.0), **settings))
    assert seen == [(2.0, 1.0)] * 4  # 2 iterations x 2 images
    loaded = load_model(save_model(model, tmp_path / "m.safetensors"))
    assert loaded.card["spacing"] == [2.0, 1.0]
    seen.clear()
    predict(loaded, image, device="cpu")
    predict(loaded, image, device="cpu", spacing=(1, 1))
    del loaded.card["spacing"]  # a card from before the field
    predict(loaded, image, device="cpu")
    assert seen == [(2.0, 1.0), (1.0, 1.0), None]
    # one pixel size per image: the card lists them, and prediction without one measures in pixels
    mixed = run_to_end(train_recursive([image, image], [partial, partial], [mask, None], seed=0,
                                       spacing=[(2.0, 1.0), None], **dict(settings, iterations=1)))
    assert mixed.card["spacing"] == [[2.0, 1.0], None]
    seen.clear()
    predict(mixed, image, device="cpu")
    assert seen == [None]
    plain = run_to_end(train_recursive(image, partial, mask, seed=0, **dict(settings, iterations=1)))
    assert plain.card["spacing"] is None


@pytest.mark.parametrize("spacing, words", [
    ((0, 1), "positive finite"), ((1, -2), "positive finite"), ((float("nan"), 1), "positive finite"),
    ((1,), "2 numbers"), ((1, 2, 3, 4), "2 numbers"), ([(1, 1), (1, 1), (1, 1)], "3 spacings for 2 images"),
])
def test_a_bad_spacing_is_refused_before_training(partial_discs, spacing, words):
    image, mask, partial = partial_discs
    run = train_recursive([image, image], [partial, partial], [mask, None], spacing=spacing, **TINY)
    with pytest.raises(ValueError, match="spacing") as error:
        next(run)
    assert words in str(error.value) and len(str(error.value).splitlines()) == 1
