"""Normalisation per slice (``normalisation="slice"``): each slice of a stack normalised on its own.

Serial sections are cut and imaged one by one, and their brightness drifts
(the 30 EM slices of the benchmark: medians from 101 to 146 of 255). The
synthetic stacks here drift far more: every slice has its own gain and
offset, so bright discs on one slice are darker than the background of
another. A model that normalises the whole stack at once sees other
intensities on every slice; one that normalises each slice on its own sees
the same discs everywhere.
"""

from __future__ import annotations

import dataclasses
import json

import dask.array as da
import numpy as np
import pytest
import tifffile

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
    train_refineseg,
)
from napari_coarseseg.data import NORMALISATIONS, TrainingImages, iter_normalized_planes, normalize, normalize_plane

from test_cli import run

SETTINGS = dict(base_channels=8, depth=2, patch_size=32, batch_size=4, learning_rate=3e-3, evolution_every=0,
                device="cpu")
DRAWN = [0, 1]  # the slices with strokes; the others carry none


def drifting_volume(seed: int, n: int = 6, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """An (n, size, size) stack of discs (100 above a background of 20, noise sigma 8) and its mask; slice z is
    then scaled by a gain in [0.5, 2] and shifted by an offset in [0, 300], so that intensities mean nothing
    across slices."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((n, size, size), np.int64)
    for z in range(n):
        for (cy, cx), r in zip(rng.uniform(10, size - 10, (3, 2)), rng.uniform(5, 8, 3), strict=True):
            mask[z, (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    image = 20 + 100 * mask + rng.normal(0, 8, mask.shape)
    gain, offset = rng.uniform(0.5, 2, (n, 1, 1)), rng.uniform(0, 300, (n, 1, 1))
    offset[DRAWN] = np.array([0, 20])[:, None, None]  # the drawn slices dark, most others brighter than their discs
    return (gain * image + offset).astype(np.float32), mask


def sparse_drawings(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative drawings on the DRAWN slices (each drawn in 2-D: the discs change from slice to
    slice), nothing elsewhere."""
    positive, negative = np.zeros_like(mask), np.zeros_like(mask)
    for z in DRAWN:
        drawn = simulate(mask[z], erode=(2, 3), margin=3, seed=z)
        positive[z], negative[z] = drawn.positive, drawn.negative
    return positive, negative


# --------------------------------------------------------------------------- the planes


def test_slice_normalisation_equals_normalising_each_raw_slice_and_keeps_the_context():
    image, _ = drifting_volume(0)
    expected = [normalize(plane) for plane in image]
    images = TrainingImages(image, normalisation="slice")
    assert images.normalisation == "slice"
    for plane, want in zip(images.planes, expected, strict=True):
        np.testing.assert_allclose(plane[0], want, atol=1e-4)
    # Set after the context (as a run's settings are): the middle channel is the slice, its neighbours theirs.
    context = TrainingImages(image, slice_context=1).set_normalisation("slice")
    np.testing.assert_allclose(context.planes[2], np.stack([expected[1], expected[2], expected[3]]), atol=1e-4)
    # Whole-image normalisation leaves the drift: slice means differ by several units.
    whole = TrainingImages(image)
    assert np.ptp([plane.mean() for plane in whole.planes]) > 1 and whole.normalisation == "image"
    assert np.ptp([plane.mean() for plane in images.planes]) < 1e-4


def test_each_channel_of_a_plane_is_normalised_on_its_own():
    rng = np.random.default_rng(1)
    plane = np.stack([rng.normal(5, 2, (16, 16)), rng.normal(-300, 40, (16, 16))]).astype(np.float32)
    normalised = normalize_plane(plane)
    for c in range(2):
        np.testing.assert_allclose(normalised[c], normalize(plane[c]), atol=1e-5)


def test_lazy_and_in_memory_stacks_give_the_same_slice_planes():
    image, _ = drifting_volume(2)
    in_memory = list(iter_normalized_planes(image, per="slice"))
    lazy = list(iter_normalized_planes(da.from_array(image, chunks=(1, 48, 48)), per="slice"))
    assert len(in_memory) == len(image)
    for a, b, raw in zip(in_memory, lazy, image, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_allclose(a[0], normalize(raw), atol=1e-5)


def test_bad_normalisations_are_refused_naming_the_choices():
    assert set(NORMALISATIONS) == {"image", "slice"}
    with pytest.raises(ValueError, match=r"\['image', 'slice'\]"):
        TrainingConfig(normalisation="volume").validate()
    with pytest.raises(ValueError, match="normalisation"):
        list(iter_normalized_planes(np.zeros((2, 4, 4)), per="stack"))
    with pytest.raises(ValueError, match="build them again"):
        TrainingImages(np.zeros((2, 4, 4)), normalisation="slice").set_normalisation("image")


# --------------------------------------------------------------------------- training and prediction


@pytest.fixture(scope="module")
def models():
    """Refineseg models trained 100 steps on a drifting stack drawn on two slices: per image and per slice."""
    image, mask = drifting_volume(0)
    positive, negative = sparse_drawings(mask)
    return {per: run_to_end(train_refineseg(image, [positive], [negative], seed=0, steps=100, normalisation=per,
                                            **SETTINGS)) for per in NORMALISATIONS}


def test_a_slice_normalised_model_segments_another_drifting_stack(models):
    test, truth = drifting_volume(1)
    scores = {per: dice(predict(model, test, device="cpu").labels, truth) for per, model in models.items()}
    # Measured (training seeds 0, 1, 2): slice 0.83, 0.82, 0.89; image 0.50, 0.43, 0.49 (without transition
    # heads: slice 0.80-0.89, image 0.42-0.50).
    assert scores["slice"] > 0.75 and scores["image"] < scores["slice"] - 0.25, scores


def test_the_card_records_the_normalisation_and_old_cards_read_image(models, tmp_path):
    model = models["slice"]
    assert model.card["normalisation"]["per"] == "slice" and model.normalisation == "slice"
    assert models["image"].normalisation == "image"
    path = save_model(model, tmp_path / "slice.safetensors")
    assert read_card(path)["normalisation"]["per"] == "slice"
    test, _ = drifting_volume(1)
    np.testing.assert_array_equal(predict(load_model(path), test, device="cpu").labels,
                                  predict(model, test, device="cpu").labels)
    # The shipped models' cards predate the field: whole images.
    assert "per" not in read_card("dsb2018-nuclei-refineseg")["normalisation"]
    assert load_model("dsb2018-nuclei-refineseg").normalisation == "image"
    card = {**model.card, "normalisation": {**model.card["normalisation"], "per": "stack"}}
    save_model(dataclasses.replace(model, card=card), tmp_path / "bad.safetensors")
    with pytest.raises(ModelFileError, match="'per' is 'image' or 'slice'"):
        load_model(tmp_path / "bad.safetensors")


def test_starting_from_a_model_of_another_normalisation_is_refused_naming_it(models):
    image, mask = drifting_volume(0)
    positive, negative = sparse_drawings(mask)
    with pytest.raises(ValueError, match=r"normalisation 'slice' \(this run: 'image'\)"):
        run_to_end(train_refineseg(image, [positive], [negative], steps=1, init=models["slice"], **SETTINGS))
    again = run_to_end(train_refineseg(image, [positive], [negative], steps=1, init=models["slice"],
                                       normalisation="slice", **SETTINGS))
    assert again.normalisation == "slice"


def test_settings_take_a_normalisation_from_presets(tmp_path):
    assert TrainingConfig().normalisation == "image" and load_preset("refineseg").normalisation == "image"
    preset = tmp_path / "sections.json"
    preset.write_text(json.dumps({"method": "refineseg", "normalisation": "slice"}))
    assert load_preset(str(preset)).normalisation == "slice"


def test_cli_trains_with_slice_normalisation_and_predict_follows_the_card(tmp_path, capsys):
    image, mask = drifting_volume(0)
    positive, negative = sparse_drawings(mask)
    for name, array in (("image", image), ("positive", positive), ("negative", negative)):
        tifffile.imwrite(tmp_path / f"{name}.tif", array)
    model_path = tmp_path / "model.safetensors"
    preset = tmp_path / "tiny.json"
    preset.write_text(json.dumps({key: value for key, value in SETTINGS.items() if key != "device"}))
    code, _, err = run(capsys, "train", tmp_path / "image.tif", "--positive", tmp_path / "positive.tif",
                       "--negative", tmp_path / "negative.tif", "--out", model_path, "--preset", preset, "--steps", 2,
                       "--normalisation", "slice", "--device", "cpu", "--quiet")
    assert code == 0, err
    assert read_card(model_path)["normalisation"]["per"] == "slice"
