"""Model files (model_io.py): round trip, atomic writes, clear errors, no unpickling."""

from __future__ import annotations

import json
import os
import pickle
import stat

import numpy as np
import pytest
import safetensors.torch
import torch

from napari_coarseseg import ModelFileError, list_shipped_models, load_model, predict, read_card, save_model
from napari_coarseseg.model_io import FORMAT_VERSION, Model


def leftovers(folder):
    """Anything in ``folder`` besides the expected files: temporary files of atomic writes."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


@pytest.fixture()
def saved(tmp_path, tiny_model):
    path = tmp_path / "model.safetensors"
    assert save_model(tiny_model, path) == path
    return path


def write_with_card(path, model: Model, card) -> None:
    """A safetensors file with the model's tensors and an arbitrary card (or none)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = None if card is None else {"coarseseg_card": card if isinstance(card, str) else json.dumps(card)}
    safetensors.torch.save_file(state, str(path), metadata=metadata)


# --------------------------------------------------------------------------- round trip


def test_save_load_gives_identical_predictions(saved, tiny_model, discs):
    image, _ = discs
    loaded = load_model(saved)
    assert loaded.card == json.loads(json.dumps(tiny_model.card))
    assert loaded.method == "refineseg" and loaded.n_classes == 1 and loaded.channels == 1
    assert len(loaded.heads) == len(tiny_model.heads) == 2
    assert not loaded.network.training, "a loaded model is in eval mode"
    original_state, loaded_state = tiny_model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for key in original_state:
        assert torch.equal(original_state[key], loaded_state[key]), key
    for kwargs in (dict(), dict(tile_size=32, overlap=8), dict(prior_correction=False)):
        a = predict(tiny_model, image, device="cpu", **kwargs)
        b = predict(loaded, image, device="cpu", **kwargs)
        np.testing.assert_array_equal(a.probabilities, b.probabilities)
        np.testing.assert_array_equal(a.reliability, b.reliability)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_half_precision_file_is_half_the_size_and_predicts_the_same(saved, tiny_model, discs, tmp_path):
    image, _ = discs
    half = save_model(tiny_model, tmp_path / "half.safetensors", half=True)
    weights = sum(v.numel() for v in tiny_model.state_dict().values() if v.is_floating_point())
    # 2 bytes less per floating-point value, the header (card) unchanged.
    assert saved.stat().st_size - half.stat().st_size == pytest.approx(2 * weights, abs=64)
    loaded = load_model(half)
    assert all(v.dtype != torch.float16 for v in loaded.state_dict().values())
    a, b = predict(tiny_model, image, device="cpu"), predict(loaded, image, device="cpu")
    assert np.abs(a.probabilities - b.probabilities).max() < 1e-2
    assert (a.labels != b.labels).mean() < 0.001


# --------------------------------------------------------------------------- shipped models


def test_shipped_models_load_by_name_and_segment_the_sample(dsb_crop):
    """The checkpoints in models/ (models/make_checkpoints.py) load by name and find the crop's nuclei.

    The crop is part of the image they were trained on: this guards the shipped files, not generalisation.
    """
    from napari_coarseseg.demo import dice

    assert list_shipped_models() == ["dsb2018-nuclei-recursive", "dsb2018-nuclei-refineseg"]
    image, labels = dsb_crop
    for name in list_shipped_models():
        card = read_card(name)
        assert card["method"] == name.rsplit("-", 1)[1] and card["n_classes"] == 1
        model = load_model(name)
        assert dice(predict(model, image, device="cpu").labels > 0, labels > 0) > 0.85, name


def test_a_missing_model_names_the_shipped_ones(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist .*shipped with napari-coarseseg: dsb2018-nuclei"):
        load_model("dsb2018-nuclei-unet")


def test_read_card_without_weights(saved, tiny_model):
    card = read_card(saved)
    assert card["format"] == "napari-coarseseg-model" and card["format_version"] == FORMAT_VERSION
    assert card["network"] == tiny_model.card["network"]
    assert card["prior"] == tiny_model.card["prior"]


# --------------------------------------------------------------------------- atomic writes


def test_save_leaves_no_temporary_file_and_usual_permissions(saved):
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o666 & ~umask


def test_overwrite_replaces_the_file(saved, tiny_model, tmp_path):
    other = Model(tiny_model.network, tiny_model.heads, dict(tiny_model.card, class_names=["nucleus"]))
    save_model(other, saved)
    assert read_card(saved)["class_names"] == ["nucleus"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_the_previous_file(saved, tiny_model, tmp_path, monkeypatch, error):
    before = saved.read_bytes()
    seen = []

    def failing_save_file(tensors, filename, metadata=None):
        seen.append(filename)
        with open(filename, "wb") as f:  # half a file, then the crash
            f.write(b"\x00" * 100)
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    other = Model(tiny_model.network, tiny_model.heads, dict(tiny_model.card, class_names=["changed"]))
    with pytest.raises(type(error)):
        save_model(other, saved)
    assert seen and os.path.dirname(seen[0]) == str(tmp_path), "writes go to a temporary file next to the target"
    assert seen[0] != str(saved)
    assert saved.read_bytes() == before
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    assert read_card(saved)["class_names"] == ["class 1"]


def test_failed_first_write_leaves_nothing(tmp_path, tiny_model, monkeypatch):
    def failing_save_file(tensors, filename, metadata=None):
        raise OSError("no space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="no space"):
        save_model(tiny_model, tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_into_a_missing_folder_is_a_clear_error(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        save_model(tiny_model, tmp_path / "missing" / "model.safetensors")


# --------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n", b"\x89PNG\r\n\x1a\n" + bytes(200),
                                     (20).to_bytes(8, "little") + b'{"a": not json at all'])
def test_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="not a readable safetensors model file"):
        load_model(path)
    with pytest.raises(ModelFileError, match="not a readable safetensors model file"):
        read_card(path)


@pytest.mark.parametrize("keep", [4, 8, 50, 0.5, -1])
def test_truncated_file(saved, keep):
    data = saved.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    saved.write_bytes(data[:n])
    with pytest.raises(ModelFileError, match="not a readable safetensors model file"):
        load_model(saved)


@pytest.mark.parametrize("card", [None, "{not json", json.dumps({"other": "metadata"})])
def test_file_without_card(tmp_path, tiny_model, card):
    path = tmp_path / "model.safetensors"
    if card is not None and card.startswith('{"other'):
        write_with_card(path, tiny_model, json.loads(card))
        match = "is not a napari-coarseseg model"
    else:
        write_with_card(path, tiny_model, card)
        match = "carries no valid napari-coarseseg card"
    with pytest.raises(ModelFileError, match=match):
        load_model(path)


def test_future_format_version(tmp_path, tiny_model):
    path = tmp_path / "model.safetensors"
    write_with_card(path, tiny_model, dict(tiny_model.card, format_version=FORMAT_VERSION + 1))
    with pytest.raises(ModelFileError, match=rf"format version {FORMAT_VERSION + 1}.*reads up to "
                                             rf"{FORMAT_VERSION}.*Upgrade napari-coarseseg"):
        load_model(path)


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(format_version="1"), "format version '1'"),
        (dict(method="magic"), "unknown method 'magic'"),
        (dict(n_classes=0), "'n_classes' must be a positive integer"),
        (dict(channels="one"), "'channels' must be a positive integer"),
        (dict(network={"base_channels": 4}), "integer base_channels and depth"),
        (dict(network={"kind": "transformer", "base_channels": 4, "depth": 2}), "unknown network kind"),
    ],
)
def test_invalid_card_fields(tmp_path, tiny_model, change, words):
    path = tmp_path / "model.safetensors"
    write_with_card(path, tiny_model, dict(tiny_model.card, **change))
    with pytest.raises(ModelFileError, match=words):
        load_model(path)


@pytest.mark.parametrize("network", [{"base_channels": 8, "depth": 2, "n_heads": 2},
                                     {"base_channels": 4, "depth": 3, "n_heads": 2},
                                     {"base_channels": 4, "depth": 2, "n_heads": 1}])
def test_weights_that_do_not_match_the_card(tmp_path, tiny_model, network):
    path = tmp_path / "model.safetensors"
    write_with_card(path, tiny_model, dict(tiny_model.card, network=dict(network, kind="unet")))
    with pytest.raises(ModelFileError, match="weights do not match the network its card describes"):
        load_model(path)


def test_non_finite_weights(tmp_path, tiny_model):
    state = {k: v.detach().clone().contiguous() for k, v in tiny_model.state_dict().items()}
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key].view(-1)[0] = float("nan")
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(state, str(path), metadata={"coarseseg_card": json.dumps(tiny_model.card)})
    with pytest.raises(ModelFileError, match="NaN or infinite"):
        load_model(path)


# --------------------------------------------------------------------------- never unpickle


class _LeavesAMark:
    """Unpickling this object creates a file: proof that a loader unpickled it."""

    def __init__(self, mark):
        self.mark = str(mark)

    def __reduce__(self):
        return (open, (self.mark, "w"))


def test_pickle_renamed_to_safetensors_is_rejected_unexecuted(tmp_path):
    mark = tmp_path / "executed"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"weights": _LeavesAMark(mark)}))
    with pytest.raises(ModelFileError, match="not a readable safetensors model file"):
        load_model(path)
    assert not mark.exists(), "loading a model file ran code from the file"


def test_torch_save_file_is_rejected_unexecuted(tmp_path, tiny_model):
    mark = tmp_path / "executed"
    path = tmp_path / "model.safetensors"
    torch.save({"state": tiny_model.state_dict(), "evil": _LeavesAMark(mark)}, path)
    with pytest.raises(ModelFileError, match="not a readable safetensors model file"):
        load_model(path)
    assert not mark.exists()


def test_loading_never_calls_pickle(saved, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("model loading used pickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model = load_model(saved)
    assert read_card(saved)["method"] == "refineseg"
    assert len(model.heads) == 2
