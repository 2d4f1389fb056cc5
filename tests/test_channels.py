"""An explicit channel axis: (C, Y, X) and (Z, C, Y, X) images in Python and on the command line.

The synthetic images have two channels: channel 0 shows decoy discs where
there is no object, channel 1 the objects. A model that learnt from the right
channel segments the objects of another image and not its decoys; fed the
channels swapped, it finds the decoys instead. The viewer side (several image
layers as the channels of one image) is tested in ``test_widgets.py``.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_coarseseg import (
    AnnotationError,
    dice,
    load_model,
    predict,
    read_card,
    run_to_end,
    simulate,
    train_recursive,
    train_refineseg,
)

from conftest import TINY, disc_image, disc_mask
from test_cli import assert_one_line_error, run

OBJECTS = [(16, 16, 8), (44, 20, 9), (24, 46, 7), (48, 48, 8)]
DECOYS = [(14, 40, 8), (40, 14, 8), (46, 44, 9)]


def two_channel(objects, decoys, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A (2, 64, 64) image, decoy discs in channel 0 and the objects in channel 1, and the objects' mask."""
    mask = disc_mask(discs=objects)
    return np.stack([disc_image(disc_mask(discs=decoys), seed), disc_image(mask, seed + 1)]), mask


@pytest.fixture(scope="module")
def training():
    """The training image (C, Y, X) and its simulated drawings (spatial shape only)."""
    image, mask = two_channel(OBJECTS, DECOYS, seed=0)
    return image, simulate(mask, erode=(2, 3), margin=3, seed=0)


@pytest.fixture(scope="module")
def channel_model(training):
    """A refineseg model trained 60 steps on the two-channel image given with channel_axis=0."""
    image, drawings = training
    settings = dict(TINY, steps=60, base_channels=8, batch_size=4, learning_rate=3e-3)
    return run_to_end(train_refineseg(image, [drawings.positive], [drawings.negative], seed=0, channel_axis=0,
                                      **settings))


def tiny(image, drawings, **layout):
    """A 5-step refineseg model (``layout``: channel_axis or rgb)."""
    return run_to_end(train_refineseg(image, [drawings.positive], [drawings.negative], seed=0, **TINY, **layout))


# --------------------------------------------------------------------------- Python


def test_a_model_trained_with_a_channel_axis_segments_another_image_from_the_right_channel(channel_model):
    # Objects where image 1 has its decoys and decoys where it has its objects: only channel 1 tells them apart.
    image, mask = two_channel(DECOYS, OBJECTS, seed=5)
    labels = predict(channel_model, image, device="cpu", channel_axis=0).labels
    assert labels.shape == mask.shape
    assert dice(labels, mask) > 0.85
    swapped = predict(channel_model, image[::-1], device="cpu", channel_axis=0).labels
    assert dice(swapped, mask) < 0.6  # it reads channel 1: swapped, it segments the decoys
    assert channel_model.card["channels"] == 2 and channel_model.card["channel_axis"] == 0
    assert channel_model.card["training"]["image_shapes"] == [[64, 64]]


def test_channels_first_and_last_give_identical_models_and_labels(training):
    image, drawings = training
    first = tiny(image, drawings, channel_axis=0)
    last_image = np.moveaxis(image, 0, -1)
    for layout in ({"channel_axis": -1}, {"channel_axis": 2}, {"rgb": True}):  # rgb: the colour path it builds on
        last = tiny(last_image, drawings, **layout)
        np.testing.assert_array_equal(predict(last, last_image, device="cpu").labels,
                                      predict(first, image, device="cpu", channel_axis=0).labels)
        for key, value in first.network.state_dict().items():
            np.testing.assert_array_equal(value.numpy(), last.network.state_dict()[key].numpy())


def test_a_stack_with_channels_on_its_second_axis_trains_and_predicts_slice_by_slice(training):
    image, drawings = training
    stack = np.stack([image, image[:, ::-1], image[:, :, ::-1]])  # (Z, C, Y, X)
    positive = np.stack([drawings.positive, drawings.positive[::-1], drawings.positive[:, ::-1]])
    negative = np.stack([drawings.negative, drawings.negative[::-1], drawings.negative[:, ::-1]])
    model = run_to_end(train_refineseg(stack, [positive], [negative], seed=0, channel_axis=1, **TINY))
    assert model.card["channels"] == 2 and model.card["training"]["image_shapes"] == [[3, 64, 64]]
    prediction = predict(model, stack, device="cpu", channel_axis=1)
    assert prediction.labels.shape == (3, 64, 64)
    assert prediction.probabilities.shape == (2, 3, 64, 64)  # classes first, as without a channel axis
    # Each slice is predicted as the 2-D image it is.
    np.testing.assert_array_equal(prediction.labels[1], predict(model, stack[1], device="cpu", channel_axis=0).labels)


def test_the_recursive_method_takes_a_channel_axis_too(training):
    image, drawings = training
    mask = disc_mask(discs=OBJECTS)
    model = run_to_end(train_recursive(image, drawings.partial, mask, seed=0, channel_axis=0, iterations=1, **TINY))
    assert model.card["channels"] == 2 and model.card["channel_axis"] == 0
    assert predict(model, image, device="cpu", channel_axis=0).labels.shape == (64, 64)


def test_one_channel_on_an_axis_is_a_grey_image(training):
    image, drawings = training
    model = tiny(image[1:], drawings, channel_axis=0)
    assert model.card["channels"] == 1 and not model.card["rgb"]
    grey = tiny(image[1], drawings)
    np.testing.assert_array_equal(predict(model, image[1:], device="cpu", channel_axis=0).labels,
                                  predict(grey, image[1], device="cpu").labels)


@pytest.mark.parametrize("shape, axis, words", [
    ((2, 64, 64), 3, ["channel_axis 3", "3 axes", "-3 to 2"]),
    ((2, 64, 64), -4, ["channel_axis -4", "-3 to 2"]),
    ((64, 64), 0, ["(64, 64)", "3 or 4 axes"]),
    ((2, 2, 3, 64, 64), 1, ["(2, 2, 3, 64, 64)", "3 or 4 axes"]),
    ((2, 64, 64), 0.0, ["integer", "0.0"]),
    ((2, 64, 64), True, ["integer", "True"]),
])
def test_a_bad_channel_axis_is_refused_naming_it(training, shape, axis, words):
    _, drawings = training
    with pytest.raises(AnnotationError) as raised:
        tiny(np.zeros(shape, np.float32), drawings, channel_axis=axis)
    for word in words:
        assert word in str(raised.value)


def test_drawings_with_the_channel_axis_and_a_contradicting_rgb_are_refused(training):
    image, drawings = training
    with_channels = np.stack([drawings.positive] * 2)
    with pytest.raises(AnnotationError, match=r"\(2, 64, 64\).*\(64, 64\)"):
        run_to_end(train_refineseg(image, [with_channels], [drawings.negative], channel_axis=0, **TINY))
    with pytest.raises(AnnotationError, match="rgb=False.*channel_axis"):
        tiny(image, drawings, channel_axis=0, rgb=False)
    with pytest.raises(AnnotationError, match="image 1 has 3 channels, image 0 has 2"):
        run_to_end(train_refineseg([image, np.concatenate([image, image[:1]])], [drawings.positive] * 2,
                                   channel_axis=0, **TINY))


def test_prediction_refuses_a_wrong_channel_count_naming_both(channel_model, training):
    image, _ = training
    three = np.concatenate([image, image[:1]])
    with pytest.raises(AnnotationError, match="has 3 channels on axis 0 but the model was trained on 2"):
        predict(channel_model, three, device="cpu", channel_axis=0)
    # Without the channel axis the last axis is read as channels; the message says how to pass the axis.
    with pytest.raises(AnnotationError, match=r"64 channels on its last axis .* trained on 2.*channel_axis=0"):
        predict(channel_model, image, device="cpu")
    with pytest.raises(AnnotationError, match=r"grey image \(1 channel\) .* trained on 2"):
        predict(channel_model, image[0], device="cpu")


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("preset") / "tiny.json"
    path.write_text(json.dumps({key: value for key, value in TINY.items() if key != "device"}))
    return path


@pytest.fixture(scope="module")
def tiff_run(tmp_path_factory, training, preset):
    """A (C, Y, X) TIFF, its drawings, and a model trained on them with ``--channel-axis 0``."""
    folder = tmp_path_factory.mktemp("tiff")
    image, drawings = training
    tifffile.imwrite(folder / "image.tif", image, photometric="minisblack")
    tifffile.imwrite(folder / "positive.tif", drawings.positive)
    tifffile.imwrite(folder / "negative.tif", drawings.negative)
    code = run_quietly("train", folder / "image.tif", "--positive", folder / "positive.tif", "--negative",
                       folder / "negative.tif", "--out", folder / "model.safetensors", "--preset", preset,
                       "--channel-axis", 0, "--device", "cpu", "--quiet")
    assert code == 0
    return folder


def run_quietly(*args) -> int:
    from napari_coarseseg.cli import main

    return main([str(a) for a in args])


def test_cli_trains_and_predicts_a_channels_first_tiff(tiff_run, tmp_path, capsys):
    card = read_card(tiff_run / "model.safetensors")
    assert card["channels"] == 2 and card["channel_axis"] == 0
    code, _, err = run(capsys, "predict", tiff_run / "model.safetensors", tiff_run / "image.tif", "--out",
                       tmp_path / "pred.tif", "--channel-axis", -3, "--device", "cpu", "--quiet")
    assert code == 0, err
    assert tifffile.imread(tmp_path / "pred.tif").shape == (64, 64)


@pytest.mark.parametrize("channels, axis, words", [
    (3, ["--channel-axis", "0"], ["3 channels on axis 0", "trained on 2"]),
    (2, [], ["64 channels", "trained on 2", "--channel-axis", "channel_axis=0"]),
])
def test_cli_refuses_a_wrong_channel_count_in_one_line_and_writes_nothing(tiff_run, tmp_path, capsys, training,
                                                                         channels, axis, words):
    image, _ = training
    tifffile.imwrite(tmp_path / "image.tif", np.concatenate([image, image])[:channels], photometric="minisblack")
    code, out, err = run(capsys, "predict", tiff_run / "model.safetensors", tmp_path / "image.tif", "--out",
                         tmp_path / "pred.tif", *axis, "--device", "cpu", "--quiet")
    assert_one_line_error(code, out, err, "predict", *words)
    assert not (tmp_path / "pred.tif").exists()


@pytest.fixture(scope="module")
def nifti_files(tmp_path_factory, training):
    """A 4-D NIfTI (X, Y, Z, C) of two channels and its 3-D drawings on the same grid (an anisotropic affine)."""
    folder = tmp_path_factory.mktemp("nifti")
    image, drawings = training
    stack = np.stack([image, image[:, ::-1]], axis=1)  # (Z, C, Y, X)
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    affine[:3, 3] = (-10, 4, 30)
    voxels = np.transpose(stack, (3, 2, 0, 1))  # (X, Y, Z, C)
    nib.save(nib.Nifti1Image(voxels, affine), folder / "image.nii.gz")
    for role in ("positive", "negative"):
        drawing = getattr(drawings, role)
        nib.save(nib.Nifti1Image(np.stack([drawing, drawing[::-1]]).T.astype(np.uint8), affine),
                 folder / f"{role}.nii.gz")
    return folder, affine


def test_cli_trains_and_predicts_a_4d_nifti_with_channel_axis_3(nifti_files, preset, tmp_path, capsys):
    folder, affine = nifti_files
    code, _, err = run(capsys, "train", folder / "image.nii.gz", "--positive", folder / "positive.nii.gz",
                       "--negative", folder / "negative.nii.gz", "--out", tmp_path / "model.safetensors",
                       "--evolution", tmp_path / "evolution.nii.gz", "--preset", preset, "--channel-axis", 3,
                       "--device", "cpu", "--quiet")
    assert code == 0, err
    card = read_card(tmp_path / "model.safetensors")
    assert card["channels"] == 2 and card["training"]["image_shapes"] == [[2, 64, 64]]
    code, _, err = run(capsys, "predict", tmp_path / "model.safetensors", folder / "image.nii.gz", "--out",
                       tmp_path / "pred.nii.gz", "--channel-axis", -1, "--device", "cpu", "--quiet")
    assert code == 0, err
    written = nib.load(tmp_path / "pred.nii.gz")
    assert written.shape == (64, 64, 2)  # the image's spatial grid, (X, Y, Z)
    np.testing.assert_allclose(written.affine, affine)
    # The file's channels are the model's, in order: the labels are those of the (Z, C, Y, X) stack in Python.
    stack = np.transpose(np.asarray(nib.load(folder / "image.nii.gz").dataobj), (2, 3, 1, 0))
    expected = predict(load_model(tmp_path / "model.safetensors"), stack, device="cpu", channel_axis=1).labels
    np.testing.assert_array_equal(np.asarray(written.dataobj).T, expected)
    assert nib.load(tmp_path / "evolution.nii.gz").shape[:3] == (64, 64, 2)


@pytest.mark.parametrize("command", ["train", "predict"])
@pytest.mark.parametrize("axis, words", [([], ["4 axes", "--channel-axis 3"]),
                                         (["--channel-axis", 0], ["--channel-axis 0", "fourth axis",
                                                                  "--channel-axis 3"])])
def test_cli_refuses_a_4d_nifti_without_channel_axis_3_in_one_line(nifti_files, tiff_run, preset, tmp_path, capsys,
                                                                   command, axis, words):
    folder, _ = nifti_files
    if command == "train":
        args = ["train", folder / "image.nii.gz", "--positive", folder / "positive.nii.gz", "--out",
                tmp_path / "model.safetensors", "--preset", preset]
    else:
        args = ["predict", tiff_run / "model.safetensors", folder / "image.nii.gz", "--out", tmp_path / "pred.nii.gz"]
    code, out, err = run(capsys, *args, *axis, "--device", "cpu", "--quiet")
    assert_one_line_error(code, out, err, command, *words)
    assert list(tmp_path.iterdir()) == []


def test_cli_help_explains_the_channel_axis(capsys):
    for command in ("train", "predict"):
        with pytest.raises(SystemExit):
            run_quietly(command, "--help")
        text = " ".join(capsys.readouterr().out.split())
        assert "--channel-axis N" in text and "(Z, Y, X, C): pass 3" in text
