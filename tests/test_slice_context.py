"""2.5-D: each slice of a stack with its neighbouring slices as extra input channels (``slice_context``).

The synthetic volumes are tubes (discs repeated along Z) in noise, with two
blank slices (noise only, the object's signal missing there). A slice-wise
2-D model has nothing to go on in a blank slice; a model that sees the
slices above and below does.
"""

from __future__ import annotations

import dataclasses
import json
import weakref

import dask.array as da
import numpy as np
import pytest
import tifffile
from test_inference import SliceOnlyArray

from napari_coarseseg import (
    ModelFileError,
    TrainingConfig,
    dice,
    load_model,
    load_preset,
    predict,
    read_card,
    run_to_end,
    save_model,
    simulate,
    train_recursive,
    train_refineseg,
)
from napari_coarseseg.data import TrainingImages, iter_slice_context, normalize, with_slice_context
from napari_coarseseg.live import LivePreview, LiveTraining

from test_cli import assert_one_line_error, run

BLANK = [2, 5]  # slices whose object signal is missing
SETTINGS = dict(base_channels=8, depth=2, patch_size=32, batch_size=4, learning_rate=3e-3, evolution_every=0,
                device="cpu")


def tube_volume(seed: int, n: int = 8, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """An (n, size, size) stack of four discs through every slice (120 on 20, noise sigma 10) and its mask;
    the slices in BLANK hold noise only, though the mask (the object) goes through them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((n, size, size), np.int64)
    for (cy, cx), r in zip(rng.uniform(10, size - 10, (4, 2)), rng.uniform(5, 8, 4), strict=True):
        mask[:, (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    image = (20 + 100 * mask + rng.normal(0, 10, mask.shape)).astype(np.float32)
    image[BLANK] = 20 + rng.normal(0, 10, (len(BLANK), size, size))
    return image, mask


# --------------------------------------------------------------------------- the pure function


def test_with_slice_context_stacks_neighbours_slice_major_and_repeats_the_edges():
    # Three slices of two channels, 1 x 1 pixels: value 10 z + c.
    planes = [np.array([[[10 * z + c]] for c in range(2)], dtype=np.float32) for z in range(3)]
    context = with_slice_context(planes, 1)
    # Slice z sees (z-1: c0, c1), (z: c0, c1), (z+1: c0, c1); slice -1 is slice 0, slice 3 is slice 2.
    expected = [[0, 1, 0, 1, 10, 11], [0, 1, 10, 11, 20, 21], [10, 11, 20, 21, 20, 21]]
    assert [c[:, 0, 0].tolist() for c in context] == expected
    assert all(c.shape == (6, 1, 1) and c.dtype == np.float32 for c in context)
    # Two slices either side: the ends repeat twice.
    assert with_slice_context(planes, 2, at=[0])[0][::2, 0, 0].tolist() == [0, 0, 0, 10, 20]
    # A 2-D image (one plane) is that plane 2k + 1 times; k = 0 gives the planes themselves.
    assert with_slice_context(planes[:1], 1)[0][:, 0, 0].tolist() == [0, 1, 0, 1, 0, 1]
    assert with_slice_context(planes, 0)[1] is planes[1]


@pytest.mark.parametrize("k, planes, match", [(-1, [np.zeros((1, 2, 2))], "whole number >= 0"),
                                              (1.5, [np.zeros((1, 2, 2))], "whole number >= 0"),
                                              (1, [], "at least one plane"),
                                              (1, [np.zeros((1, 2, 2)), np.zeros((1, 3, 2))], "one shape")])
def test_with_slice_context_refuses_bad_input(k, planes, match):
    with pytest.raises(ValueError, match=match):
        with_slice_context(planes, k)


def test_the_sliding_window_equals_the_whole_stack_and_holds_at_most_2k_plus_1_planes():
    rng = np.random.default_rng(0)
    for n in range(1, 7):
        for k in range(4):
            planes = [rng.normal(size=(2, 3, 4)).astype(np.float32) for _ in range(n)]
            streamed = list(iter_slice_context(iter(planes), k))
            assert len(streamed) == n
            for a, b in zip(streamed, with_slice_context(planes, k), strict=True):
                np.testing.assert_array_equal(a, b)
    # Reading ahead: plane z comes out once plane z + k is read, and nothing older than z - k is kept alive.
    k, n, reads, alive = 2, 9, [], set()

    def source():
        for z in range(n):
            reads.append(z)
            plane = np.full((1, 2, 2), z, np.float32)
            alive.add(z)
            weakref.finalize(plane, alive.discard, z)  # counts the planes still held by anyone
            yield plane
            del plane

    for z, plane in enumerate(iter_slice_context(source(), k)):
        assert len(reads) == min(z + k + 1, n), (z, len(reads))
        assert len(alive) <= 2 * k + 1, (z, sorted(alive))
        assert plane[:, 0, 0].tolist() == [max(min(z + j, n - 1), 0) for j in range(-k, k + 1)]


def test_training_images_carry_the_context_of_their_own_image_only():
    stack = np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8)
    flat = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    images = TrainingImages([stack, flat], slice_context=1)
    normalised = normalize(stack)  # the whole stack at once, as prediction does
    assert images.input_channels == 3 and images.own_channels == slice(1, 2)
    assert [p.shape for p in images.planes] == [(3, 8, 8)] * 4
    np.testing.assert_array_equal(images.planes[0], normalised[[0, 0, 1]])
    np.testing.assert_array_equal(images.planes[2], normalised[[1, 2, 2]])  # not the next image's plane
    np.testing.assert_array_equal(images.planes[3], np.repeat(normalize(flat)[None], 3, axis=0))
    images.set_slice_context(0)
    assert images.input_channels == 1 and [p.shape for p in images.planes] == [(1, 8, 8)] * 4
    np.testing.assert_array_equal(images.planes[1][0], normalised[1])


def test_settings_take_a_slice_context_from_presets_and_refuse_a_negative_one(tmp_path):
    assert TrainingConfig().slice_context == 0 and load_preset("refineseg").slice_context == 0
    preset = tmp_path / "volume.json"
    preset.write_text(json.dumps({"method": "refineseg", "steps": 10, "slice_context": 2}))
    assert load_preset(str(preset)).slice_context == 2
    with pytest.raises(ValueError, match="slice_context"):
        TrainingConfig(slice_context=-1).validate()


# --------------------------------------------------------------------------- training and prediction


@pytest.fixture(scope="module")
def volumes():
    """Training volume with simulated drawings on every slice (blank ones too), and another volume."""
    image, mask = tube_volume(0)
    return image, simulate(mask, erode=(2, 3), margin=3, seed=0), tube_volume(1)


@pytest.fixture(scope="module")
def models(volumes):
    """Refineseg models trained 80 steps on the training volume: slice-wise (k = 0), 2.5-D (k = 1) and the 3-D
    encoder over the same three slices ("3d")."""
    image, drawings, _ = volumes
    kinds = {0: {"slice_context": 0}, 1: {"slice_context": 1}, "3d": {"slice_context": 1, "network": "unet3d"}}
    return {kind: run_to_end(train_refineseg(image, [drawings.positive], [drawings.negative], seed=0, steps=80,
                                             **settings, **SETTINGS)) for kind, settings in kinds.items()}


def test_a_context_model_segments_another_volume_even_where_a_slice_shows_nothing(volumes, models):
    _, _, (test, truth) = volumes
    scores = {}
    for k, model in models.items():
        if k == "3d":
            continue
        labels = predict(model, test, device="cpu").labels
        assert labels.shape == truth.shape
        rest = np.setdiff1d(np.arange(len(truth)), BLANK)
        scores[k] = dice(labels, truth), dice(labels[BLANK], truth[BLANK]), dice(labels[rest], truth[rest])
    # Measured (seed 0): 2-D 0.80 overall, 0.00 on the blank slices, 0.94 elsewhere; 2.5-D 0.92, 0.91, 0.92
    # (seeds 1-3: blank-slice Dice 0.00 against 0.90-0.97).
    assert scores[1][0] > 0.85 and scores[1][1] > 0.8 and scores[1][2] > 0.85, scores
    assert scores[0][1] < 0.2 and scores[0][2] > 0.85, scores


def test_the_3d_network_learns_across_slices_too_and_its_model_file_rebuilds_it(volumes, models, tmp_path):
    image, drawings, (test, truth) = volumes
    model = models["3d"]
    assert model.card["network"]["kind"] == "unet3d" and model.card["slice_context"] == 1
    labels = predict(model, test, device="cpu").labels
    rest = np.setdiff1d(np.arange(len(truth)), BLANK)
    # Measured (seeds 0-3): 0.92-0.95 on the blank slices, 0.87-0.94 elsewhere (2.5-D: 0.91 and 0.92, seed 0).
    assert dice(labels[BLANK], truth[BLANK]) > 0.8 and dice(labels[rest], truth[rest]) > 0.85
    path = save_model(model, tmp_path / "slab.safetensors")
    np.testing.assert_array_equal(predict(load_model(path), test, device="cpu").labels, labels)
    lazy = da.from_array(test, chunks=(1, *test.shape[1:]))
    np.testing.assert_array_equal(predict(model, lazy, device="cpu").labels, labels)
    # Started from it, a run takes its network (as it takes its base_channels and depth).
    again = run_to_end(train_refineseg(image, [drawings.positive], [drawings.negative], steps=1, slice_context=1,
                                       init=model, **SETTINGS))
    assert again.card["network"]["kind"] == "unet3d"
    # The 3-D network needs slices around each slice; the recursive method has its own network.
    with pytest.raises(ValueError, match="slice_context k >= 1"):
        run_to_end(train_refineseg(image, [drawings.positive], [drawings.negative], network="unet3d", **SETTINGS))
    with pytest.raises(ValueError, match="network must be one of unet, unet3d"):
        run_to_end(train_refineseg(image, [drawings.positive], [drawings.negative], network="3d", **SETTINGS))
    with pytest.raises(ValueError, match="refineseg network"):
        run_to_end(train_recursive(image, drawings.positive, drawings.positive, steps=1, slice_context=1,
                                   network="unet3d", **SETTINGS))


def test_the_card_records_the_context_and_prediction_needs_it(volumes, models, tmp_path):
    _, _, (test, _) = volumes
    model = models[1]
    assert model.card["slice_context"] == 1 and model.slice_context == 1 and model.card["channels"] == 1
    assert model.network.in_channels == 3 and models[0].card["slice_context"] == 0
    path = save_model(model, tmp_path / "context.safetensors")
    assert read_card(path)["slice_context"] == 1
    np.testing.assert_array_equal(predict(load_model(path), test, device="cpu").labels,
                                  predict(model, test, device="cpu").labels)
    # The field dropped from the card: prediction names it rather than feed one channel to a 3-channel network,
    # and a file whose card lacks it no longer matches its weights.
    stripped = {key: value for key, value in model.card.items() if key != "slice_context"}
    with pytest.raises(ValueError, match="slice_context 0"):
        predict(dataclasses.replace(model, card=stripped), test, device="cpu")
    save_model(dataclasses.replace(model, card=stripped), tmp_path / "stripped.safetensors")
    with pytest.raises(ModelFileError, match="weights do not match"):
        load_model(tmp_path / "stripped.safetensors")
    # Cards written before the field (the shipped models) read as slice-wise 2-D.
    assert "slice_context" not in read_card("dsb2018-nuclei-refineseg")
    assert load_model("dsb2018-nuclei-refineseg").slice_context == 0


def test_a_2d_image_is_predicted_by_a_context_model_as_its_plane_repeated(volumes, models):
    _, _, (test, truth) = volumes
    single = predict(models[1], test[0], device="cpu")
    assert single.labels.shape == truth[0].shape and dice(single.labels, truth[0]) > 0.85


def test_lazy_stacks_predict_as_in_memory_ones(volumes, models):
    _, _, (test, _) = volumes
    model = models[1]
    expected = predict(model, test, device="cpu")
    for lazy in (da.from_array(test, chunks=(1, *test.shape[1:])), SliceOnlyArray(test)):
        streamed = predict(model, lazy, device="cpu")
        np.testing.assert_array_equal(streamed.labels, expected.labels)
        np.testing.assert_allclose(streamed.probabilities, expected.probabilities, atol=1e-4)


def test_starting_from_a_model_of_another_slice_context_is_refused_naming_it(volumes, models):
    image, drawings, _ = volumes
    for init, k in ((models[0], 1), (models[1], 0)):
        with pytest.raises(ValueError, match=rf"slice_context {init.slice_context} \(this run: {k}\)"):
            run_to_end(train_refineseg(image, [drawings.positive], [drawings.negative], steps=1, slice_context=k,
                                       init=init, **SETTINGS))
    # The same context is taken.
    again = run_to_end(train_refineseg(image, [drawings.positive], [drawings.negative], steps=1, slice_context=1,
                                       init=models[1], **SETTINGS))
    assert again.slice_context == 1


def test_a_live_session_on_a_stack_trains_and_previews_with_the_context(volumes):
    image, drawings, _ = volumes
    session = LiveTraining(image, {"positive": [drawings.positive], "negative": [drawings.negative]},
                           slice_context=1, **SETTINGS)
    for event in session.run(read_region=lambda: (3, None), first_preview=0):
        if isinstance(event, LivePreview):
            session.stop()
    assert event.labels.shape == image.shape[1:]
    assert session.model().card["slice_context"] == 1 and session.model().network.in_channels == 3


def test_the_recursive_method_trains_and_predicts_with_a_context(volumes):
    image, _, (test, truth) = volumes
    _, mask = tube_volume(0)
    partial = simulate(mask, erode=(2, 3), margin=3, partial_fraction=(0.3, 0.6), seed=0).partial
    strong = np.zeros_like(mask)
    strong[[0, 6]] = mask[[0, 6]]  # exact masks on two slices
    model = run_to_end(train_recursive(image, partial, strong, seed=0, slice_context=1, iterations=3, steps=25,
                                       **SETTINGS))
    assert model.card["slice_context"] == 1 and model.network.in_channels == 3
    labels = predict(model, test, device="cpu").labels
    # Measured: 0.97 overall, 0.96 on the blank slices.
    assert labels.shape == truth.shape and dice(labels, truth) > 0.85 and dice(labels[BLANK], truth[BLANK]) > 0.8


# --------------------------------------------------------------------------- the command line


def test_cli_trains_and_predicts_a_stack_with_a_slice_context(volumes, models, tmp_path, capsys):
    image, drawings, (test, truth) = volumes
    for name, array in (("image", image), ("positive", drawings.positive), ("negative", drawings.negative),
                        ("test", test)):
        tifffile.imwrite(tmp_path / f"{name}.tif", array)
    model_path, out = tmp_path / "model.safetensors", tmp_path / "prediction.tif"
    preset = tmp_path / "tiny.json"  # the test's small network; the slice context comes from the flag
    preset.write_text(json.dumps({key: value for key, value in SETTINGS.items() if key != "device"}))
    code, _, err = run(capsys, "train", tmp_path / "image.tif", "--positive", tmp_path / "positive.tif",
                       "--negative", tmp_path / "negative.tif", "--out", model_path, "--preset", preset, "--steps", 80,
                       "--slice-context", 1, "--device", "cpu", "--quiet")
    assert code == 0, err
    assert read_card(model_path)["slice_context"] == 1
    code, _, err = run(capsys, "predict", model_path, tmp_path / "test.tif", "--out", out, "--device", "cpu",
                       "--quiet")
    assert code == 0, err
    labels = tifffile.imread(out)
    assert labels.shape == truth.shape and dice(labels[BLANK], truth[BLANK]) > 0.8
    # --init with a slice-wise model: one line naming the field, no model written.
    save_model(models[0], tmp_path / "flat.safetensors")
    code, out_text, err = run(capsys, "train", tmp_path / "image.tif", "--positive", tmp_path / "positive.tif",
                              "--negative", tmp_path / "negative.tif", "--out", tmp_path / "refused.safetensors",
                              "--preset", preset, "--steps", 2, "--slice-context", 1,
                              "--init", tmp_path / "flat.safetensors", "--device", "cpu", "--quiet")
    assert_one_line_error(code, out_text, err, "train", "slice_context 0 (this run: 1)")
    # The 3-D network without a slice context: one line naming the fix.
    code, out_text, err = run(capsys, "train", tmp_path / "image.tif", "--positive", tmp_path / "positive.tif",
                              "--negative", tmp_path / "negative.tif", "--out", tmp_path / "refused.safetensors",
                              "--preset", preset, "--steps", 2, "--network", "unet3d", "--device", "cpu", "--quiet")
    assert_one_line_error(code, out_text, err, "train", "give a slice_context k >= 1")
    assert not (tmp_path / "refused.safetensors").exists()
    assert not (tmp_path / "refused.safetensors").exists()
