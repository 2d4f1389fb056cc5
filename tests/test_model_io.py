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
        (dict(format_version="1"), "'format_version' must be a whole number .*got '1'"),
        (dict(method="magic"), "unknown method 'magic'"),
        (dict(n_classes=0), "'n_classes' must be a whole number from 1 to 255"),
        (dict(channels="one"), "'channels' must be a whole number from 1"),
        (dict(network={"base_channels": 4}), "'network.depth' must be a whole number"),
        (dict(network={"kind": "transformer", "base_channels": 4, "depth": 2}),
         "'network.kind' must be one of 'unet', 'unet3d' for a refineseg model, got 'transformer'"),
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


# --------------------------------------------------------------------------- cards validated as data


def _set(card: dict, field: str, value) -> None:
    """Set the dotted ``field`` ("prior.estimated") of ``card``."""
    *parents, last = field.split(".")
    for key in parents:
        card = card[key]
    card[last] = value


def tamper(source, target, field: str, value):
    """A copy of model file ``source`` at ``target`` whose card's ``field`` is ``value`` (the tensors unchanged)."""
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata()
    card = json.loads(metadata["coarseseg_card"])
    _set(card, field, value)
    # json.dumps writes NaN and Infinity, as a hand-edited card may hold them (json.loads reads them back).
    safetensors.torch.save_file(safetensors.torch.load_file(str(source)), str(target),
                                metadata=dict(metadata, coarseseg_card=json.dumps(card)))
    return target


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_model):
    """Untampered model files by method: the tiny refineseg model, the shipped recursive one (tiny to load)."""
    from napari_coarseseg.training import models_dir

    folder = tmp_path_factory.mktemp("clean")
    return {"refineseg": save_model(tiny_model, folder / "refineseg.safetensors"),
            "recursive": models_dir() / "dsb2018-nuclei-recursive.safetensors"}


NAN, INF = float("nan"), float("inf")
TAMPERED = [
    # The refineseg prior: NaN or zeros predicted all background with exit 0.
    ("refineseg", "prior.estimated", [NAN, NAN], "prior.estimated"),
    ("refineseg", "prior.estimated", [0.0, 0.0], "prior.estimated"),
    ("refineseg", "prior.training", [0.0, 1.0], "prior.training"),
    ("refineseg", "prior.estimated", [0.5, 0.6], "prior.estimated"),
    ("refineseg", "prior.estimated", [0.2, 0.3, 0.5], "prior.estimated"),
    ("refineseg", "prior.estimated", "0.5", "prior.estimated"),
    ("refineseg", "prior", [0.5, 0.5], "prior"),
    ("refineseg", "prior.strength", INF, "prior.strength"),
    ("refineseg", "prior.strength", 11, "prior.strength"),
    ("refineseg", "prior.strength", -1, "prior.strength"),
    ("refineseg", "prior.annotation_gap", NAN, "prior.annotation_gap"),
    ("refineseg", "heads", "positive 1", "heads"),
    ("refineseg", "network.kind", "transformer", "network.kind"),
    ("refineseg", "network.kind", "unet3d", "slice_context"),
    # Sizes that allocated without bound before the weights were compared.
    ("refineseg", "network.depth", 12, "network.depth"),
    ("refineseg", "network.base_channels", 1e7, "network.base_channels"),
    ("refineseg", "network.base_channels", 10**7, "network.base_channels"),
    ("refineseg", "network.base_channels", True, "network.base_channels"),
    ("refineseg", "network.n_heads", 1000, "network.n_heads"),
    ("refineseg", "network", None, "network"),
    ("refineseg", "n_classes", 100000, "n_classes"),
    ("refineseg", "n_classes", True, "n_classes"),
    ("refineseg", "n_classes", 1.0, "n_classes"),
    ("refineseg", "channels", 0, "channels"),
    ("refineseg", "channels", 10**6, "channels"),
    ("refineseg", "slice_context", -1, "slice_context"),
    ("refineseg", "slice_context", 1000, "slice_context"),
    # Normalisation: a TypeError, numpy's percentile message, or nonsense before.
    ("refineseg", "normalisation.low", "x", "normalisation.low"),
    ("refineseg", "normalisation.low", NAN, "normalisation.low"),
    ("refineseg", "normalisation.low", -5, "normalisation.low"),
    ("refineseg", "normalisation.high", 150, "normalisation.high"),
    ("refineseg", "normalisation.high", None, "normalisation.high"),
    ("refineseg", "normalisation.low", 99.8, "normalisation.low"),  # low == high
    ("refineseg", "normalisation.kind", "min-max", "normalisation.kind"),
    ("refineseg", "normalisation", "percentile", "normalisation"),
    ("refineseg", "class_names", ["a", "b"], "class_names"),
    ("refineseg", "class_names", [1], "class_names"),
    ("refineseg", "rgb", "no", "rgb"),
    ("refineseg", "channel_axis", 0.5, "channel_axis"),
    ("refineseg", "format_version", 0, "format_version"),
    ("refineseg", "training", [], "training"),
    ("refineseg", "spacing", [0.0, 1.0], "spacing"),
    ("refineseg", "spacing", [[1.0, INF], None], "spacing"),
    # The recursive method's own fields.
    ("recursive", "epsilon_predict", NAN, "epsilon_predict"),
    ("recursive", "epsilon_predict", 0, "epsilon_predict"),
    ("recursive", "prediction_gate", -1, "prediction_gate"),
    ("recursive", "prediction_gate", NAN, "prediction_gate"),
    ("recursive", "prediction_seed_level", 2, "prediction_seed_level"),
    ("recursive", "network.task_levels", 5, "network.task_levels"),  # above the depth, 4
    ("recursive", "network.separation", "no", "network.separation"),
    ("recursive", "network.kind", "unet", "network.kind"),
    ("recursive", "spacing", [1.0], "spacing"),
]


@pytest.mark.parametrize("method, field, value, named", TAMPERED,
                         ids=[f"{m}-{f}={v!r}" for m, f, v, _ in TAMPERED])
def test_a_tampered_card_field_is_refused_in_one_line_naming_it(clean, tmp_path, method, field, value, named):
    path = tamper(clean[method], tmp_path / "tampered.safetensors", field, value)
    with pytest.raises(ModelFileError) as caught:
        load_model(path)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith(f"{path}: card field {named!r} must be "), message
    assert message.endswith("the file was altered or is damaged: use the original model file or train again")


@pytest.mark.parametrize("method", ["refineseg", "recursive"])
def test_the_untampered_copies_load(clean, tmp_path, method):
    # Rewritten the way the tampered ones are, with the field set to its own value.
    path = tamper(clean[method], tmp_path / "copy.safetensors", "n_classes", 1)
    assert load_model(path).method == method
    assert load_model(path).card == read_card(clean[method])


def test_gates_allow_infinity_and_old_cards_their_defaults(clean, tmp_path):
    path = tamper(clean["recursive"], tmp_path / "no-gate.safetensors", "prediction_gate", INF)
    assert load_model(path).card["prediction_gate"] == INF
    path = tamper(clean["refineseg"], tmp_path / "no-strength.safetensors", "prior.strength", 10)
    assert load_model(path).card["prior"]["strength"] == 10


def test_a_huge_network_in_range_is_refused_before_it_is_allocated(clean, tmp_path):
    """Width 256 doubling over 8 levels is some 10**11 parameters: compared with the file on the meta device."""
    path = tamper(clean["refineseg"], tmp_path / "huge.safetensors", "network",
                  {"kind": "unet", "base_channels": 256, "depth": 8, "n_heads": 64})
    with pytest.raises(ModelFileError, match=r"weights do not match the network its card describes \(") as caught:
        load_model(path)
    assert "\n" not in str(caught.value)


def test_check_prior_strength_and_a_strong_correction_stays_finite():
    from napari_coarseseg.methods.refineseg import PRIOR_STRENGTH_MAX, adjust_to_prior, check_prior_strength

    assert PRIOR_STRENGTH_MAX == 10
    for value in (INF, NAN, -1, 11, "x", None, True):
        with pytest.raises(ValueError, match=r"^--prior-strength must be a number from 0 to 10 .*got") as caught:
            check_prior_strength(value)
        assert "\n" not in str(caught.value)
    assert [check_prior_strength(v) for v in (0, 1, 10, "2.5")] == [0.0, 1.0, 10.0, 2.5]
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet([0.3, 0.3, 0.3], size=(16, 16)).transpose(2, 0, 1).astype(np.float32)
    probabilities[:, 0, 0] = [1, 0, 0]  # p = 0 somewhere: log p = -inf
    for strength in (0, 1, 3, 10):
        adjusted = adjust_to_prior(probabilities, [0.98, 0.015, 0.005], [0.001, 0.499, 0.5], strength)
        assert adjusted.dtype == np.float32 and np.isfinite(adjusted).all(), strength
        np.testing.assert_allclose(adjusted.sum(0), 1, atol=1e-5)
    # tau = 10 multiplies odds by (980 * 500) ** 10 = 1e57: float32 ratios overflow, log space does not.
    assert adjusted[0].min() > 0.99
    with pytest.raises(ValueError, match="the prior strength must be a number from 0 to 10"):
        adjust_to_prior(probabilities, [0.5, 0.25, 0.25], [0.5, 0.25, 0.25], INF)


def test_training_refuses_a_prior_strength_or_size_it_could_not_load():
    from napari_coarseseg import TrainingConfig

    for value in (INF, NAN, 11, -1):
        with pytest.raises(ValueError, match="prior_strength must be 'auto' or a number from 0 to 10"):
            TrainingConfig(prior_strength=value).validate()
    TrainingConfig(prior_strength=10).validate()
    with pytest.raises(ValueError, match="base_channels must be at most 256"):
        TrainingConfig(base_channels=512).validate()


@pytest.fixture()
def crop_tif(tmp_path, dsb_crop):
    import tifffile

    path = tmp_path / "crop.tif"
    tifffile.imwrite(path, dsb_crop[0])
    return path


def _one_error_line(capsys, command: str, named: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"coarseseg {command}: error: ") and f"'{named}'" in err[0], err
    return err[0]


@pytest.mark.parametrize("field, value", [("prior.estimated", [NAN, NAN]), ("normalisation.low", "x"),
                                          ("network.depth", 12)])
def test_cli_predict_with_a_tampered_card_fails_in_one_line_and_writes_nothing(clean, tmp_path, crop_tif, capsys,
                                                                                 field, value):
    from napari_coarseseg.cli import main

    tampered = tamper(clean["refineseg"], tmp_path / "tampered.safetensors", field, value)
    out = tmp_path / "out" / "labels.tif"
    out.parent.mkdir()
    assert main(["predict", str(tampered), str(crop_tif), "--out", str(out)]) != 0
    _one_error_line(capsys, "predict", field)
    assert list(out.parent.iterdir()) == []


def test_cli_export_of_a_nan_prior_fails_in_one_line(clean, tmp_path, capsys):
    from importlib.util import find_spec

    # find_spec, not importorskip: importing bioimageio.spec takes seconds, and a refused card never needs it.
    for module in ("bioimageio", "onnx", "onnxruntime"):
        if find_spec(module) is None:
            pytest.skip(f"the bioimage.io extra is not installed ({module})")
    from napari_coarseseg.cli import main

    tampered = tamper(clean["refineseg"], tmp_path / "tampered.safetensors", "prior.estimated", [NAN, NAN])
    assert main(["export", str(tampered), "--out", str(tmp_path / "x.zip")]) != 0
    _one_error_line(capsys, "export", "prior.estimated")
    assert not (tmp_path / "x.zip").exists()
