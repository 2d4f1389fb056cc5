"""The method registry: a method added by one module and one registry line reaches the CLI, model files,
``predict`` and napari.

The test registers a tiny third method, ``dense`` (a U-Net trained with a masked cross-entropy on exact
masks), written only against ``napari_coarseseg.methods``' public parts, and drives it through
``coarseseg train`` / ``coarseseg predict``, ``load_model``, ``predict`` and ``train_in_viewer``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from napari_coarseseg import load_model, predict, read_card, run_to_end, save_model
from napari_coarseseg.annotations import AnnotationError
from napari_coarseseg.cli import main
from napari_coarseseg.data import TrainingImages
from napari_coarseseg.inference import assemble_planes, iter_predict_planes, start_prediction
from napari_coarseseg.losses import masked_nll
from napari_coarseseg.methods import (
    METHODS,
    DrawingRole,
    Method,
    TrainingLoop,
    check_roles,
    drawing_roles,
    get_method,
)
from napari_coarseseg.model_io import Model, ModelFileError
from napari_coarseseg.networks import UNet
from napari_coarseseg.training import load_preset, resolve_config

from conftest import disc_image, disc_mask

SETTINGS = dict(base_channels=8, depth=2, patch_size=32, batch_size=4, learning_rate=1e-2, evolution_every=0)


# --------------------------------------------------------------------------- the dummy method, one module's worth


class DenseTraining(TrainingLoop):
    method = "dense"

    def __init__(self, images, targets, n_classes, config, seed, device, checkpoint=None):
        self.dense_targets, self.n_classes = targets, n_classes
        super().__init__(images, config, seed, device, checkpoint)

    def build_modules(self):
        return {"network": UNet(self.images.channels, self.n_classes + 1, self.config.base_channels,
                                self.config.depth)}

    def targets(self):
        return [self.dense_targets]

    def loss_terms(self, outputs, targets, images):
        logits, _ = outputs
        return {"total": masked_nll(logits, targets[0])}

    def initial_masks(self):
        return self.images.masks_per_image([np.clip(t, 0, None).astype(np.uint8) for t in self.dense_targets])

    def evolve(self, step):
        masks = None
        if step == self.total_steps:
            masks = self.images.masks_per_image([p.argmax(0).astype(np.uint8) for p in self.preview()])
        return masks, f"step {step}/{self.total_steps}"

    def card_fields(self):
        network = {"kind": "unet", "base_channels": self.config.base_channels, "depth": self.config.depth}
        return network, {}, {"steps": self.config.steps}


def train_dense(images, strong, *, config=None, n_classes=None, seed=0, device="auto", rgb=None, names=None,
                checkpoint=None, resume=False, **overrides):
    config = resolve_config(config, "refineseg", overrides)
    training_images = TrainingImages(images, rgb, names)
    masks = training_images.check_layer(strong, "strong")
    targets = training_images.per_plane([np.full(shape, -1, np.int64) if m is None else m
                                         for m, shape in zip(masks, training_images.image_shapes, strict=True)])
    n_classes = n_classes or max(int(t.max()) for t in targets)
    return (yield from DenseTraining(training_images, targets, n_classes, config, seed, device, checkpoint)
            .run(resume))


def predict_dense(model, image, device="auto", tile_size=512, overlap=64, batch_size=4, name="image",
                  keep_probabilities=True, flips=False):
    image, device, planes = start_prediction(model, image, device, name)
    maps = list(iter_predict_planes(model.network, planes, device, tile_size=tile_size, overlap=overlap,
                                    batch_size=batch_size, flips=flips))
    return assemble_planes(image, model, [m.argmax(0).astype(np.uint8) for m in maps],
                           maps if keep_probabilities else None)


def build_dense(card):
    network = card["network"]
    return Model(UNet(card["channels"], card["n_classes"] + 1, network["base_channels"], network["depth"]),
                 nn.ModuleList(), card)


DENSE = Method(name="dense", title="exact masks, plain cross-entropy (a test method)",
               roles=(DrawingRole("strong", "exact masks", required=True),), preset="refineseg",
               train=train_dense, predict=predict_dense, build_model=build_dense)


@pytest.fixture
def dense(monkeypatch):
    """``dense`` in the registry for one test: the one line a new method adds."""
    monkeypatch.setitem(METHODS, DENSE.name, DENSE)
    return DENSE


@pytest.fixture(scope="module")
def two_disc_images():
    """A training image and a different test image (other discs, other noise), with their masks."""
    train_mask = disc_mask()
    test_mask = disc_mask(discs=[(20, 40, 9), (44, 16, 7), (46, 46, 6)])
    return (disc_image(train_mask, seed=0), train_mask), (disc_image(test_mask, seed=5), test_mask)


def dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2 * (a & b).sum() / (a.sum() + b.sum())


# --------------------------------------------------------------------------- the registry itself


def test_the_registry_holds_both_published_methods_and_what_the_package_asks_of_them():
    assert list(METHODS)[:2] == ["refineseg", "recursive"]
    refineseg, recursive = METHODS["refineseg"], METHODS["recursive"]
    assert refineseg.role_names == ("positive", "negative", "background")
    assert recursive.role_names == ("partial", "strong", "separation")
    assert [r.name for r in recursive.roles if r.required] == ["partial", "strong"]
    config = load_preset("recursive").replace(steps=7, iterations=3)
    assert recursive.total_steps(config) == 21 and recursive.describe_length(config) == "3 iterations of 7 steps"
    assert refineseg.total_steps(config) == 7 and refineseg.describe_length(config) == "7 steps"
    assert list(drawing_roles()) == ["positive", "negative", "background", "partial", "strong", "separation"]
    with pytest.raises(ValueError, match="unknown method 'magic'; use one of refineseg, recursive"):
        get_method("magic")


@pytest.mark.parametrize(
    "method, given, message",
    [
        ("refineseg", ["positive", "partial"], "a partial layer belongs to the recursive method, not refineseg"),
        ("recursive", ["partial"], "the recursive method needs a strong layer"),
        ("recursive", ["positive", "negative", "partial", "strong"], "a positive layer, a negative layer belong"),
    ],
)
def test_check_roles_names_the_owner_or_the_missing_role(method, given, message):
    with pytest.raises(AnnotationError, match=message):
        check_roles(METHODS[method], given)


def test_a_method_takes_one_layer_where_its_role_says_so(dense, two_disc_images):
    (image, mask), _ = two_disc_images
    with pytest.raises(AnnotationError, match="takes one strong layer, 2 were given"):
        dense.start(image, {"strong": [mask, mask]})


# --------------------------------------------------------------------------- a new method, end to end


def test_a_registered_method_trains_saves_loads_and_predicts_from_python(dense, two_disc_images, tmp_path):
    (image, mask), (test_image, test_mask) = two_disc_images
    events = []
    model = run_to_end(dense.start(image, {"strong": [mask]}, steps=60, seed=0, device="cpu", **SETTINGS),
                       events.append)
    assert [e.step for e in events] == list(range(61))
    np.testing.assert_array_equal(events[0].masks[0], mask)
    save_model(model, tmp_path / "dense.safetensors")
    assert read_card(tmp_path / "dense.safetensors")["method"] == "dense"
    loaded = load_model(tmp_path / "dense.safetensors")
    prediction = predict(loaded, test_image, device="cpu")
    assert dice(prediction.labels, test_mask) > 0.9, "a model trained on one image segments another"


def test_a_registered_method_runs_from_the_command_line(dense, two_disc_images, tmp_path, capsys):
    (image, mask), (test_image, test_mask) = two_disc_images
    for name, array in {"image": image, "mask": mask.astype(np.uint8), "test": test_image}.items():
        tifffile.imwrite(tmp_path / f"{name}.tif", array)
    model = tmp_path / "dense.safetensors"
    common = ["--out", model, "--steps", 60, "--device", "cpu", "--quiet"]
    assert main([str(a) for a in ["train", tmp_path / "image.tif", "--method", "dense", "--positive",
                                  tmp_path / "mask.tif", *common]]) == 1
    assert "--positive belongs to the refineseg method, not dense" in capsys.readouterr().err

    preset = tmp_path / "tiny.json"
    preset.write_text(json.dumps(dict(SETTINGS, method="dense")))
    code = main([str(a) for a in ["train", tmp_path / "image.tif", "--method", "dense", "--strong",
                                  tmp_path / "mask.tif", "--preset", preset, *common]])
    out = capsys.readouterr().out
    assert code == 0 and "(60 steps in" in out
    assert main([str(a) for a in ["predict", model, tmp_path / "test.tif", "--out", tmp_path / "p.tif",
                                  "--quiet"]]) == 0
    assert dice(tifffile.imread(tmp_path / "p.tif"), test_mask) > 0.9


def test_without_its_registry_line_the_method_is_unknown(tmp_path, capsys, two_disc_images):
    (image, mask), _ = two_disc_images
    tifffile.imwrite(tmp_path / "image.tif", image)
    tifffile.imwrite(tmp_path / "mask.tif", mask.astype(np.uint8))
    with pytest.raises(SystemExit) as usage:
        main(["train", str(tmp_path / "image.tif"), "--method", "dense", "--strong", str(tmp_path / "mask.tif"),
              "--out", str(tmp_path / "m.safetensors")])
    assert usage.value.code == 2 and "invalid choice: 'dense'" in capsys.readouterr().err
    model = run_to_end(DENSE.start(image, {"strong": [mask]}, steps=1, device="cpu", **SETTINGS))
    save_model(model, tmp_path / "m.safetensors")
    with pytest.raises(ModelFileError, match="unknown method 'dense'; this napari-coarseseg knows refineseg"):
        load_model(tmp_path / "m.safetensors")


@pytest.mark.gui
def test_a_registered_method_trains_in_the_viewer(dense, make_napari_viewer, qtbot, errors, two_disc_images):
    pytest.importorskip("napari")
    from napari_coarseseg._viewer import train_in_viewer

    (image, mask), _ = two_disc_images
    viewer = make_napari_viewer()
    viewer.add_image(image, name="discs")
    viewer.add_labels(mask.astype(np.uint8), name="exact")
    worker = train_in_viewer(viewer, "discs", method="dense", strong="exact", steps=40, start=False,
                             device="cpu", **SETTINGS)
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        worker.start()
    assert errors == []
    assert worker.model.card["method"] == "dense"
    assert viewer.layers["discs evolution"].data.shape == (2, *image.shape)  # the mask, then the end
    assert dice(viewer.layers["discs prediction"].data, mask) > 0.9
    assert "discs annotation reliability" not in viewer.layers  # dense gives none
    assert torch.equal(torch.as_tensor(viewer.layers["exact"].data), torch.as_tensor(mask.astype(np.uint8)))
