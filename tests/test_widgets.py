"""The Train and Predict widgets, built through the plugin manifest as napari builds them."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy import ndimage

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from napari_coarseseg import load_preset, save_model  # noqa: E402
from napari_coarseseg._widgets import (  # noqa: E402
    ROLE_KEY,
    AnnotationsWidget,
    PredictWidget,
    TrainWidget,
)
from napari_coarseseg.methods import METHODS  # noqa: E402

PLUGIN = "napari-coarseseg"


@pytest.fixture
def viewer(drawn_viewer):
    return drawn_viewer


def drawn_train_widget(viewer, steps: int) -> TrainWidget:
    """A Train widget on the drawn viewer's positive and negative layers, on the CPU."""
    widget = TrainWidget(viewer)
    widget.roles["positive"].setCurrentText("positive")
    widget.roles["negative"].setCurrentText("negative")
    widget.steps.setValue(steps)
    widget.device.setCurrentText("cpu")
    return widget


@pytest.mark.parametrize(
    "name, kind", [("Coarse annotations", AnnotationsWidget), ("Train", TrainWidget), ("Predict", PredictWidget)]
)
def test_widgets_build_from_the_manifest(viewer, name, kind):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    assert isinstance(widget, kind)
    assert widget.image.currentText() == "discs"


def test_train_widget_lists_layers_roles_presets_and_device(viewer):
    widget = TrainWidget(viewer)
    assert widget.roles["positive"].names() == ["positive", "negative", "partial", "exact"]
    assert widget.preset.currentText() == "refineseg"
    assert widget.steps.value() == load_preset("refineseg").steps  # the preset's
    assert widget.device_found.text().startswith("CPU, ")
    assert widget.roles["partial"].isHidden() and not widget.roles["positive"].isHidden()
    widget.method.setCurrentText("recursive")
    assert widget.preset.currentText() == "recursive" and widget.iterations.value() == 4
    assert widget.roles["positive"].isHidden() and not widget.roles["partial"].isHidden()
    viewer.add_labels(np.zeros((64, 64), np.uint8), name="new drawing")
    assert "new drawing" in widget.roles["partial"].names()  # follows the layer list


def test_train_button_trains_shows_progress_and_saves(viewer, qtbot, errors, tmp_path):
    widget = drawn_train_widget(viewer, steps=4)
    with qtbot.waitSignal(widget.start_button.clicked):
        widget.start_button.click()
    assert widget.start_button.text() == "Cancel" and widget.running
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert errors == []
    assert widget.start_button.text() == "Start training"
    assert "discs prediction" in viewer.layers and "discs evolution" in viewer.layers
    assert "loss" in widget.status.text() or "done" in widget.status.text()
    assert widget.save_button.isEnabled()
    widget.save_model(tmp_path / "trained.safetensors")
    assert (tmp_path / "trained.safetensors").is_file()


def test_stack_settings_are_offered_for_stacks_and_reach_the_model(viewer, qtbot, errors, discs, disc_drawings):
    widget = drawn_train_widget(viewer, steps=3)
    assert not widget.settings.slice_context.isEnabled()  # the 2-D discs: no slices to see or normalise
    assert widget.settings.settings(METHODS["refineseg"]) == {"steps": 3}
    image, _ = discs
    drifting = np.stack([image, 2 * image + 50, image + 100]).astype(np.float32)  # a stack whose brightness drifts
    viewer.add_image(drifting, name="stack")
    viewer.add_labels(np.stack([disc_drawings.positive] * 3), name="stack positive")
    viewer.add_labels(np.stack([disc_drawings.negative] * 3), name="stack negative")
    widget.image.setCurrentText("stack")
    widget.roles["positive"].setCurrentText("stack positive")
    widget.roles["negative"].setCurrentText("stack negative")
    assert widget.settings.slice_context.isEnabled() and widget.settings.each_slice.isEnabled()
    assert widget.settings.slice_context.value() == 0 and not widget.settings.each_slice.isChecked()  # the preset's
    assert not widget.settings.network_3d.isEnabled()  # no slices around each slice to see in 3-D
    widget.settings.slice_context.setValue(1)
    assert widget.settings.network_3d.isEnabled() and not widget.settings.network_3d.isChecked()
    widget.settings.network_3d.setChecked(True)
    widget.settings.each_slice.setChecked(True)
    widget.start_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert errors == []
    assert widget.model.slice_context == 1 and widget.model.normalisation == "slice"
    assert widget.model.card["network"]["kind"] == "unet3d"
    assert viewer.layers["stack prediction"].data.shape == drifting.shape


def test_cancel_button_stops_training(viewer, qtbot, errors):
    widget = drawn_train_widget(viewer, steps=100_000)
    widget.start_button.click()
    qtbot.waitUntil(lambda: "step" in widget.status.text(), timeout=60_000)
    widget.start_button.click()  # now "Cancel"
    qtbot.waitUntil(lambda: not widget.running, timeout=10_000)
    assert "cancelled" in widget.status.text()
    assert widget.start_button.text() == "Start training"
    assert "discs prediction" not in viewer.layers
    assert not widget.save_button.isEnabled()
    assert errors == []


def test_live_button_trains_until_pressed_again_then_the_model_can_be_saved(viewer, qtbot, errors, tmp_path):
    """Live (or its shortcut) adds the prediction layers and trains on; pressing again stops within 5 s."""
    widget = drawn_train_widget(viewer, steps=10)
    widget.live_button.click()
    assert widget.live is not None and widget.live_button.isChecked() and not widget.start_button.isEnabled()
    qtbot.waitUntil(lambda: widget.live.previews >= 1, timeout=60_000)
    assert "discs prediction" in viewer.layers and "discs draw here next" in viewer.layers
    assert "live: step" in widget.status.text()
    # A whole new drawing (layer.data = ...) is taken in too; the user's layer object is not written.
    negative = viewer.layers["negative"]
    negative.data = np.where(viewer.layers["discs"].data < 30, 1, 0).astype(np.uint8)
    qtbot.waitUntil(lambda: "taken in 1 times" in widget.status.text(), timeout=60_000)
    started = time.perf_counter()
    widget.toggle_live()  # what Shift-L does
    assert time.perf_counter() - started <= 5
    assert widget.live is None and not widget.live_button.isChecked() and widget.start_button.isEnabled()
    assert widget.model is not None and widget.model.card["training"]["live"] and widget.save_button.isEnabled()
    widget.save_model(tmp_path / "live.safetensors")
    assert (tmp_path / "live.safetensors").is_file() and errors == []
    assert any(key.endswith("L") and "Shift" in str(key) for key in map(str, viewer.keymap))  # the shortcut


def test_live_on_the_tiles_sample_takes_in_a_partial_region_painted_during_the_session(make_napari_viewer, qtbot,
                                                                                         errors):
    """The recursive method live: the tiles sample, Live, a partial region painted by the brush's route."""
    viewer = make_napari_viewer()
    widget = TrainWidget(viewer)
    viewer.open_sample(PLUGIN, "dsb2018_nuclei_tiles")
    partial = viewer.layers["partial masks"]
    # One nucleus of slice 5 has no partial region yet (the user has not got to it).
    regions = ndimage.label(partial.data[5] > 0)[0]
    later = regions == np.bincount(regions.ravel())[1:].argmax() + 1  # the largest region
    partial.data_setitem((np.full(later.sum(), 5), *np.nonzero(later)), 0)
    drawn = partial.data.copy()
    viewer.dims.set_current_step(0, 5)
    widget.live_button.click()
    assert widget.live is not None and widget.method.currentText() == "recursive"
    qtbot.waitUntil(lambda: widget.live is not None and widget.live.previews >= 1, timeout=60_000)
    partial.data_setitem((np.full(later.sum(), 5), *np.nonzero(later)), 1)  # now it is painted
    qtbot.waitUntil(lambda: "taken in 1 times" in widget.status.text(), timeout=60_000)
    session = widget.live
    qtbot.waitUntil(lambda: session.previews >= 3, timeout=60_000)
    started = time.perf_counter()
    widget.toggle_live()
    assert time.perf_counter() - started <= 5 and errors == []
    assert (session.training.loop.masks.seeds[5][later] > 0).all()  # one of slice 5's regions now
    assert widget.model.card["method"] == "recursive" and widget.model.card["training"]["live"]
    shown = viewer.layers["nuclei tiles (DSB 2018) prediction"].data
    assert shown.shape == drawn.shape and shown[5].any()  # the slice in view was previewed
    drawn[5][later] = 1
    assert np.array_equal(partial.data, drawn)  # the session wrote nothing


def test_train_widget_without_drawings_notifies(viewer, errors):
    widget = TrainWidget(viewer)
    assert widget.start() is None
    assert "no drawing layer given" in errors[0]
    assert not widget.running and widget.start_button.text() == "Start training"


def test_predict_widget_adds_a_labels_layer(viewer, qtbot, errors, disc_model, tmp_path):
    path = tmp_path / "discs.safetensors"
    save_model(disc_model, path)
    widget = PredictWidget(viewer)
    widget.model_path.setEditText(str(path))
    widget.device.setCurrentText("cpu")
    widget.predict_button.click()
    qtbot.waitUntil(lambda: "discs prediction" in viewer.layers, timeout=60_000)
    assert viewer.layers["discs prediction"].data.shape == viewer.layers["discs"].data.shape
    qtbot.waitUntil(widget.predict_button.isEnabled, timeout=10_000)
    widget.model_path.setEditText(str(tmp_path / "missing.safetensors"))
    widget.predict_button.click()
    assert "does not exist" in errors[-1]


def test_annotations_widget_creates_one_empty_layer_per_role_once(viewer):
    widget = AnnotationsWidget(viewer)
    created = widget.create_layers()
    roles = ["positive", "negative", "background", "partial", "strong", "separation"]
    assert [layer.name for layer in created] == [f"discs {role}" for role in roles]
    for layer, role in zip(created, roles, strict=True):
        assert layer.data.shape == viewer.layers["discs"].data.shape and not layer.data.any()
        assert layer.metadata[ROLE_KEY] == role
    viewer.layers["discs positive"].data[10, 10] = 1
    n_layers = len(viewer.layers)
    widget.create_layers()  # again: nothing replaced, nothing added
    assert len(viewer.layers) == n_layers and viewer.layers["discs positive"].data[10, 10] == 1


def test_simulate_from_a_full_mask_adds_layers_and_keeps_the_mask(viewer, errors):
    widget = AnnotationsWidget(viewer)
    widget.full_mask.setCurrentText("exact")
    widget.instances.setChecked(False)
    mask_before = viewer.layers["exact"].data.tobytes()
    added = widget.simulate_from_mask()
    assert [layer.name for layer in added] == ["discs positive (simulated)", "discs negative (simulated)",
                                               "discs partial (simulated)"]
    exact = viewer.layers["exact"].data
    positive, negative, partial = (layer.data for layer in added)
    assert positive.any() and np.all(exact[positive > 0] == 1)  # inside the objects
    assert negative.any() and not np.any(exact[negative > 0])  # outside them
    assert 0 < (partial > 0).sum() < (exact > 0).sum()
    assert viewer.layers["exact"].data.tobytes() == mask_before
    assert errors == []


def test_counts_follow_painting_and_roles_reach_the_train_widget(viewer, qtbot):
    widget = AnnotationsWidget(viewer)
    widget.classes.item(0, 1).setText("nucleus")
    widget.assign_layer.setCurrentText("positive")
    widget.assign_role.setCurrentText("positive")
    widget.assign()
    expected = int((viewer.layers["positive"].data > 0).sum())
    assert f"positive (positive): nucleus: {expected} px" in widget.counts.text()
    layer = viewer.layers["positive"]
    layer.data = np.where(np.arange(layer.data.size).reshape(layer.data.shape) < 10, 1, layer.data).astype(
        layer.data.dtype)
    qtbot.waitUntil(lambda: f"nucleus: {int((layer.data > 0).sum())} px" in widget.counts.text(), timeout=2000)
    # a role assigned here is preselected in a new Train widget
    viewer.layers["partial"].metadata[ROLE_KEY] = "partial"
    train = TrainWidget(viewer)
    assert train.roles["partial"].currentText() == "partial"
    assert train.roles["strong"].currentText() == "(none)"


def test_annotations_widget_errors_notify(make_napari_viewer, errors):
    widget = AnnotationsWidget(make_napari_viewer())
    assert widget.create_layers() == [] and "image layer" in errors[-1]
    widget.viewer.add_image(np.zeros((16, 16)), name="im")
    widget.viewer.add_labels(np.zeros((8, 8), np.uint8), name="small mask")
    widget.full_mask.setCurrentText("small mask")
    assert widget.simulate_from_mask() == [] and "has shape (8, 8)" in errors[-1]


def test_train_widget_follows_the_roles_of_the_recursive_sample(make_napari_viewer):
    """Opening the tiles sample selects the recursive method and its layers: Train can start at once."""
    viewer = make_napari_viewer()
    widget = TrainWidget(viewer)
    assert widget.method.currentText() == "refineseg"
    viewer.open_sample(PLUGIN, "dsb2018_nuclei_tiles")
    assert widget.method.currentText() == "recursive"
    assert widget.image.value() == "nuclei tiles (DSB 2018)"
    assert widget.roles["partial"].value() == "partial masks"
    assert widget.roles["strong"].value().startswith("exact masks")
    viewer.open_sample(PLUGIN, "dsb2018_nuclei")  # a layer of the current method's roles exists: no switch
    assert widget.method.currentText() == "recursive"


def test_predict_widget_offers_the_shipped_models(viewer):
    from napari_coarseseg import list_shipped_models

    widget = PredictWidget(viewer)
    offered = [widget.model_path.itemText(i) for i in range(widget.model_path.count())]
    assert offered == list_shipped_models() and offered


def test_open_sample_train_watch_growth_cancel_predict_save(make_napari_viewer, qtbot, errors, tmp_path):
    """The user story of the plugin on the real tiles sample, with a short schedule.

    Open the sample, press Start: the partial masks of the evolution layer grow iteration by iteration;
    a second run is cancelled; the trained model is saved and applied by Predict to an unseen image.
    """
    from napari_coarseseg.samples import load_dsb_nuclei

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "dsb2018_nuclei_tiles")
    before = {layer.name: np.array(layer.data, copy=True) for layer in viewer.layers}
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    train.steps.setValue(6)
    train.iterations.setValue(3)
    train.device.setCurrentText("cpu")
    train.start_button.click()
    qtbot.waitUntil(lambda: not train.running, timeout=180_000)
    assert errors == []
    evolution = np.asarray(viewer.layers["nuclei tiles (DSB 2018) evolution"].data)
    assert evolution.shape == (4, 16, 128, 128)
    area = (evolution > 0).sum(axis=(1, 2, 3))
    assert (np.diff(area) >= 0).all() and area[-1] > 1.2 * area[0], area  # the masks grow
    for name, data in before.items():  # nothing the user had was written
        np.testing.assert_array_equal(viewer.layers[name].data, data)
    assert train.save_button.isEnabled()
    train.save_model(tmp_path / "nuclei.safetensors")

    train.steps.setValue(500)
    train.start_button.click()
    qtbot.waitUntil(lambda: "step" in train.status.text(), timeout=60_000)
    train.start_button.click()  # Cancel
    qtbot.waitUntil(lambda: not train.running, timeout=30_000)
    assert "cancelled" in train.status.text() and not train.save_button.isEnabled()

    image, _ = load_dsb_nuclei()
    viewer.add_image(image[::-1, ::-1].copy(), name="new image")  # a flipped copy: pixels it never saw in place
    _, predict_widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Predict")
    predict_widget.model_path.setEditText(str(tmp_path / "nuclei.safetensors"))
    predict_widget.image.setCurrentText("new image")
    predict_widget.device.setCurrentText("cpu")
    predict_widget.predict_button.click()
    qtbot.waitUntil(lambda: "new image prediction" in viewer.layers, timeout=60_000)
    assert viewer.layers["new image prediction"].data.shape == (512, 512)
    assert errors == []


def test_resume_button_continues_from_the_checkpoint(viewer, qtbot, errors):
    widget = drawn_train_widget(viewer, steps=4)
    assert not widget.resume_button.isEnabled()  # nothing to resume yet
    widget.start_button.click()
    assert not widget.resume_button.isEnabled()  # not while running
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert widget.checkpoint_file().is_file()
    assert widget.resume_button.isEnabled() and widget.resume_button.text() == "Resume from step 4"
    first = widget.model.network.state_dict()
    viewer.layers.remove("discs prediction")
    widget.resume_button.click()  # the run had ended: resuming gives the same model at once
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert errors == [] and "discs prediction" in viewer.layers
    for key, value in widget.model.network.state_dict().items():
        assert torch.equal(value, first[key]), key
    widget.method.setCurrentText("recursive")  # another method: its own checkpoint, none yet
    assert not widget.resume_button.isEnabled()
    widget.method.setCurrentText("refineseg")
    widget.steps.setValue(6)  # other settings: the checkpoint is refused with a notification
    widget.resume_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert len(errors) == 1 and "another training run" in errors[0]


def test_start_from_a_model_of_another_method_notifies_and_trains_nothing(viewer, errors, tmp_path, tiny_model):
    """The "start from" chooser takes a file or a shipped model; a model of another method is refused at once."""
    widget = drawn_train_widget(viewer, steps=5)
    widget.method.setCurrentText("recursive")
    path = tmp_path / "refineseg.safetensors"
    save_model(tiny_model, path)
    widget.init.setEditText(str(path))
    assert widget.start() is None and not widget.running
    assert "refineseg model" in errors[-1] and "recursive" in errors[-1]
    widget.init.setEditText(str(tmp_path / "missing.safetensors"))
    assert widget.start_live() is None and widget.live is None
    assert "Cannot start from" in errors[-1]


def test_several_image_layers_train_and_predict_as_the_channels_of_one_image(viewer, qtbot, errors, discs, tmp_path):
    """napari opens a multichannel file as one layer per channel: "more channels" takes them as one image."""
    image, _ = discs
    viewer.add_image(image[::-1].copy(), name="mirrored")  # a second channel: the image upside down
    widget = drawn_train_widget(viewer, steps=3)
    assert [widget.channels.item(i).text() for i in range(widget.channels.count())] == ["discs", "mirrored"]
    widget.channels.check(["mirrored"])
    assert widget.channels.image(widget.image.value()) == ["discs", "mirrored"]
    assert widget.start() is not None
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert errors == [] and widget.model.card["channels"] == 2
    assert viewer.layers["discs prediction"].data.shape == image.shape  # the labels have no channel axis
    save_model(widget.model, tmp_path / "two.safetensors")

    predictor = PredictWidget(viewer)
    predictor.model_path.setEditText(str(tmp_path / "two.safetensors"))
    predictor.device.setCurrentText("cpu")
    viewer.layers.remove("discs prediction")
    assert predictor.predict() is None  # one channel for a two-channel model
    assert "1 channel" in errors[-1] and "trained on 2" in errors[-1]
    predictor.channels.check(["mirrored"])
    predictor.predict_button.click()
    qtbot.waitUntil(lambda: "discs prediction" in viewer.layers, timeout=60_000)
    assert viewer.layers["discs prediction"].data.shape == image.shape
    qtbot.waitUntil(predictor.predict_button.isEnabled, timeout=10_000)

    viewer.add_image(np.zeros((32, 32), np.float32), name="small")
    predictor.channels.check(["small"])
    assert predictor.predict() is None
    assert "'small' has shape (32, 32)" in errors[-1] and "one shape" in errors[-1]
