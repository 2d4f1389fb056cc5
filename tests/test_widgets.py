"""The Train and Predict widgets, built through the plugin manifest as napari builds them."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_coarseseg import save_model  # noqa: E402
from napari_coarseseg._widgets import PredictWidget, TrainWidget  # noqa: E402

PLUGIN = "napari-coarseseg"


@pytest.fixture
def viewer(drawn_viewer):
    return drawn_viewer


@pytest.mark.parametrize("name, kind", [("Train", TrainWidget), ("Predict", PredictWidget)])
def test_widgets_build_from_the_manifest(viewer, name, kind):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    assert isinstance(widget, kind)
    assert widget.image.currentText() == "discs"


def test_train_widget_lists_layers_roles_presets_and_device(viewer):
    widget = TrainWidget(viewer)
    assert widget.roles["positive"].names() == ["positive", "negative", "partial", "exact"]
    assert widget.preset.currentText() == "refineseg"
    assert widget.steps.value() == 300  # the preset's
    assert widget.device_found.text().startswith("CPU, ")
    assert widget.roles["partial"].isHidden() and not widget.roles["positive"].isHidden()
    widget.method.setCurrentText("recursive")
    assert widget.preset.currentText() == "recursive" and widget.iterations.value() == 4
    assert widget.roles["positive"].isHidden() and not widget.roles["partial"].isHidden()
    viewer.add_labels(np.zeros((64, 64), np.uint8), name="new drawing")
    assert "new drawing" in widget.roles["partial"].names()  # follows the layer list


def test_train_button_trains_shows_progress_and_saves(viewer, qtbot, errors, tmp_path):
    widget = TrainWidget(viewer)
    widget.roles["positive"].setCurrentText("positive")
    widget.roles["negative"].setCurrentText("negative")
    widget.steps.setValue(4)
    widget.device.setCurrentText("cpu")
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


def test_cancel_button_stops_training(viewer, qtbot, errors):
    widget = TrainWidget(viewer)
    widget.roles["positive"].setCurrentText("positive")
    widget.steps.setValue(100_000)
    widget.device.setCurrentText("cpu")
    widget.start_button.click()
    qtbot.waitUntil(lambda: "step" in widget.status.text(), timeout=60_000)
    widget.start_button.click()  # now "Cancel"
    qtbot.waitUntil(lambda: not widget.running, timeout=10_000)
    assert "cancelled" in widget.status.text()
    assert widget.start_button.text() == "Start training"
    assert "discs prediction" not in viewer.layers
    assert not widget.save_button.isEnabled()
    assert errors == []


def test_train_widget_without_drawings_notifies(viewer, errors):
    widget = TrainWidget(viewer)
    assert widget.start() is None
    assert "no drawing layer given" in errors[0]
    assert not widget.running and widget.start_button.text() == "Start training"


def test_predict_widget_adds_a_labels_layer(viewer, qtbot, errors, disc_model, tmp_path):
    path = tmp_path / "discs.safetensors"
    save_model(disc_model, path)
    widget = PredictWidget(viewer)
    widget.model_path.setText(str(path))
    widget.device.setCurrentText("cpu")
    widget.predict_button.click()
    qtbot.waitUntil(lambda: "discs prediction" in viewer.layers, timeout=60_000)
    assert viewer.layers["discs prediction"].data.shape == viewer.layers["discs"].data.shape
    qtbot.waitUntil(widget.predict_button.isEnabled, timeout=10_000)
    widget.model_path.setText(str(tmp_path / "missing.safetensors"))
    widget.predict_button.click()
    assert "does not exist" in errors[-1]
