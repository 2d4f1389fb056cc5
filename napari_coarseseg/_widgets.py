"""napari widgets: thin Qt forms over :mod:`._viewer` (training and prediction in thread workers)."""

from __future__ import annotations

import os
from pathlib import Path

import napari
import numpy as np
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ._live_viewer import live_in_viewer
from ._nifti_napari import derived_layer_kwargs
from ._viewer import is_kind, predict_in_viewer, train_in_viewer
from .annotations import ROLE_KEY, Role, simulate, spatial_shape
from .checkpoint import checkpoint_step
from .methods import DEFAULT_METHOD, METHODS, drawing_roles, load_model
from .model_io import ModelFileError, list_shipped_models, save_model
from .training import describe_device, list_presets, load_preset, select_device

NONE = "(none)"
DEVICES = ("auto", "cpu", "cuda", "mps")


def checkpoint_folder() -> Path:
    """The folder of the Train widget's checkpoints: the user's cache folder (kept across restarts).

    The environment variable ``NAPARI_COARSESEG_CACHE`` moves it (tests use it).
    """
    from platformdirs import user_cache_dir

    return Path(os.environ.get("NAPARI_COARSESEG_CACHE") or user_cache_dir("napari-coarseseg")) / "checkpoints"


def describe_device_choice(choice: str) -> str:
    """What a device choice resolves to here, e.g. ``"CPU, 2 threads"``, or why it cannot be used."""
    try:
        return describe_device(select_device(choice))
    except ValueError as error:
        return f"not available: {error}"


class LayerChoice(QComboBox):
    """A combo box of the viewer's layers of one kind, kept in sync with the layer list."""

    def __init__(self, viewer: napari.Viewer, kind: str, optional: bool = False, role: str | None = None,
                 parent=None):
        super().__init__(parent)
        self.viewer, self.kind, self.optional, self.role = viewer, kind, optional, role
        viewer.layers.events.inserted.connect(self.refresh)
        viewer.layers.events.removed.connect(self.refresh)
        viewer.layers.events.reordered.connect(self.refresh)
        self.refresh()

    def names(self) -> list[str]:
        return [layer.name for layer in self.viewer.layers if is_kind(layer, self.kind)]

    def refresh(self, event=None):
        current = self.currentText()
        self.blockSignals(True)
        self.clear()
        self.addItems(([NONE] if self.optional else []) + self.names())
        if current and current != NONE and self.findText(current) >= 0:
            self.setCurrentText(current)
        elif self.role is not None:  # a layer assigned to this role in the Coarse annotations widget
            assigned = [layer.name for layer in self.viewer.layers
                        if is_kind(layer, self.kind) and layer.metadata.get(ROLE_KEY) == self.role]
            if assigned:
                self.setCurrentText(assigned[-1])
        self.blockSignals(False)

    def value(self) -> str | None:
        text = self.currentText()
        return None if not text or text == NONE else text


class MoreChannels(QListWidget):
    """Image layers to take as further channels of the chosen image: a checkable list of the viewer's images.

    napari opens a multichannel file (``channel_axis``) as one grey layer per
    channel; checking the other channels' layers here trains or predicts on all
    of them together, the chosen image's first, then the checked ones in the
    layer list's order. A model predicts images with the channels it was trained
    on, in the same order.
    """

    def __init__(self, viewer: napari.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.setMaximumHeight(72)
        self.setToolTip("Further channels of the image: grey layers of its shape (e.g. the layers napari makes from "
                        "a multichannel file). Predict with the same channels in the same order.")
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.reordered):
            event.connect(self.refresh)
        self.refresh()

    def refresh(self, event=None):
        checked = set(self.checked())
        self.clear()
        for layer in self.viewer.layers:
            if is_kind(layer, "image"):
                item = QListWidgetItem(layer.name)
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                item.setCheckState(Qt.Checked if layer.name in checked else Qt.Unchecked)
                self.addItem(item)

    def checked(self) -> list[str]:
        return [self.item(i).text() for i in range(self.count()) if self.item(i).checkState() == Qt.Checked]

    def check(self, names) -> None:
        """Check exactly the layers ``names`` (what clicking their boxes does)."""
        for i in range(self.count()):
            self.item(i).setCheckState(Qt.Checked if self.item(i).text() in set(names) else Qt.Unchecked)

    def image(self, first: str | None):
        """What the viewer functions take as the image: ``first`` alone, or ``[first, *checked others]``."""
        more = [name for name in self.checked() if name != first]
        return [first or "", *more] if more else first or ""


class TrainSettings(QWidget):
    """How long to train, and how a stack is seen: steps, iterations, slice context, 3-D network, normalisation.

    The values come from the chosen preset (:meth:`show_preset`); the stack
    rows are enabled for stacks only (:meth:`follow_image`). :meth:`settings`
    gives what the viewer functions take as keywords.
    """

    def __init__(self, parent=None):
        super().__init__(parent)
        self.method = None  # the method of the preset shown (show_preset)
        self.steps = QSpinBox()
        self.steps.setRange(1, 1_000_000)
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 1000)
        self.slice_context = QSpinBox()
        self.slice_context.setRange(0, 8)
        self.slice_context.setToolTip("Stacks, 2.5-D: each slice also sees this many slices above and below it "
                                      "(0: slice by slice). Predicting needs the same.")
        self.network_3d = QCheckBox("3-D network over those slices")
        self.network_3d.setToolTip("RefineSeg on stacks with a slice context: an anisotropic 3-D encoder over the "
                                   "slices in context instead of stacking them as channels of the 2-D U-Net.")
        self.slice_context.valueChanged.connect(self._enable_network_3d)
        self.each_slice = QCheckBox("normalise each slice on its own")
        self.each_slice.setToolTip("For sections imaged one by one, whose brightness changes from slice to slice "
                                   "(not for CT or MRI volumes, whose intensities mean the same on every slice).")
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("steps", self.steps)
        form.addRow("iterations", self.iterations)
        form.addRow("slice context", self.slice_context)
        form.addRow("", self.network_3d)
        form.addRow("", self.each_slice)
        self.follow_image(None)

    def show_preset(self, config, method) -> None:
        """Take the values of a preset's ``config``; iterations only for a method that has them."""
        self.steps.setValue(config.steps)
        self.iterations.setValue(config.iterations)
        self.iterations.setEnabled("iterations" in method.length)
        self.slice_context.setValue(config.slice_context)
        self.network_3d.setChecked(config.network == "unet3d")
        self.each_slice.setChecked(config.normalisation == "slice")
        self.method = method
        self._enable_network_3d()

    def follow_image(self, layer) -> None:
        """Enable the stack rows for an image layer with slices (neither a plane nor one colour plane)."""
        stack = layer is not None and layer.data.ndim - (1 if getattr(layer, "rgb", False) else 0) >= 3
        self.slice_context.setEnabled(stack)
        self.each_slice.setEnabled(stack)
        self._enable_network_3d()

    def _enable_network_3d(self, *_) -> None:
        """The 3-D network: for a method that trains it (refineseg), on a stack with a slice context of 1 or more."""
        offered = self.method is None or "unet3d" in self.method.networks
        self.network_3d.setEnabled(offered and self.slice_context.isEnabled() and self.slice_context.value() > 0)

    def settings(self, method, lengths: bool = True) -> dict:
        """Keywords for ``train_in_viewer``: the method's lengths, and the stack settings (alone for
        ``live_in_viewer``, ``lengths=False``: a live session goes on until stopped)."""
        chosen = {"steps": self.steps.value(), "iterations": self.iterations.value()} if lengths else {}
        chosen = {setting: value for setting, value in chosen.items() if setting in method.length}
        if self.slice_context.isEnabled():
            chosen.update(slice_context=self.slice_context.value(),
                          normalisation="slice" if self.each_slice.isChecked() else "image")
        if "unet3d" in method.networks and self.network_3d.isEnabled():
            chosen["network"] = "unet3d" if self.network_3d.isChecked() else "unet"
        return chosen


#: The viewer's key for the Train widget's Live button.
LIVE_SHORTCUT = "Shift-L"


def model_to_start_from(path: str, method):
    """The model a "start from" box names (None: random weights; False: unusable, a notification says why)."""
    path = path.strip()
    if not path:
        return None
    try:
        model = load_model(path, device="cpu")
    except (ModelFileError, OSError) as error:
        show_error(f"Cannot start from {path!r}: {error}")
        return False
    if model.method != method.name:
        show_error(f"Cannot start from {path!r}: it is a {model.method} model and this run trains "
                   f"{method.name}; pick a {method.name} model or that method.")
        return False
    return model


class TrainWidget(QWidget):
    """Method, preset, layers, steps, device; Start becomes Cancel; progress, loss readout, save.

    The methods, their drawing roles and presets come from the registry
    (:data:`napari_coarseseg.methods.METHODS`) when the widget is built.
    """

    def __init__(self, napari_viewer: napari.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self.model = None
        self._cancelled = False
        self._progress = None

        self.image = LayerChoice(napari_viewer, "image")
        self.channels = MoreChannels(napari_viewer)
        self.method = QComboBox()
        self.method.addItems(list(METHODS))
        self.method.setCurrentText(DEFAULT_METHOD)
        self.preset = QComboBox()
        self.roles = {}
        for role, takers in drawing_roles().items():
            self.roles[role] = LayerChoice(napari_viewer, "labels", optional=True, role=role)
            self.roles[role].setToolTip(takers[0][1].meaning)
        self.settings = TrainSettings()
        self.steps, self.iterations = self.settings.steps, self.settings.iterations
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        self.device_found = QLabel(describe_device_choice("auto"))
        # Editable like Predict's: empty = random weights; a shipped model's name or a file = start from it.
        self.init = QComboBox()
        self.init.setEditable(True)
        self.init.addItems(["", *list_shipped_models()])
        self.init.lineEdit().setPlaceholderText("random weights (or a model to start from)")
        self.init.setToolTip("Start from a trained model of the same method, classes and channels: on new images "
                             "or drawings it reaches a given accuracy in fewer steps.")
        self.start_button = QPushButton("Start training")
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue the last run on this image and method from its checkpoint "
                                      "(written every few steps), e.g. after napari or the computer stopped.")
        self.live_button = QPushButton("Live")
        self.live_button.setCheckable(True)
        self.live_button.setToolTip(f"Train while you paint (shortcut {LIVE_SHORTCUT}): the network takes in new "
                                    "strokes every few steps and the prediction follows; press again to stop.")
        self.live = None  # the running LiveSession
        self.save_button = QPushButton("Save model...")
        self.save_button.setEnabled(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("image", self.image)
        form.addRow("more channels", self.channels)
        form.addRow("method", self.method)
        form.addRow("preset", self.preset)
        self._role_rows = {}
        for role, choice in self.roles.items():
            label = QLabel(role)
            form.addRow(label, choice)
            self._role_rows[role] = (label, choice)
        form.addRow(self.settings)
        form.addRow("device", self.device)
        form.addRow("", self.device_found)
        form.addRow("start from", self.init)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.resume_button)
        buttons.addWidget(self.live_button)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.save_button)
        layout.addStretch()

        self.method.currentTextChanged.connect(self._method_changed)
        self.preset.currentTextChanged.connect(self._preset_changed)
        self.device.currentTextChanged.connect(lambda choice: self.device_found.setText(describe_device_choice(choice)))
        self.start_button.clicked.connect(self._start_or_cancel)
        self.resume_button.clicked.connect(lambda: self.start(resume=True))
        self.live_button.clicked.connect(lambda checked: self.start_live() if checked else self.stop_live())
        napari_viewer.bind_key(LIVE_SHORTCUT, lambda viewer: self.toggle_live(), overwrite=True)
        self.image.currentTextChanged.connect(self._update_resume)
        self.image.currentTextChanged.connect(lambda name: self.settings.follow_image(self._layer(name)))
        self.save_button.clicked.connect(self._save)
        napari_viewer.layers.events.inserted.connect(self._follow_roles)
        self._method_changed(self.method.currentText())
        self._follow_roles()
        self.settings.follow_image(self._layer(self.image.value() or ""))

    # ------------------------------------------------------------------ form

    def _method_changed(self, name: str):
        method = METHODS[name]
        for role, (label, choice) in self._role_rows.items():
            visible = role in method.role_names
            label.setVisible(visible)
            choice.setVisible(visible)
        self.live_button.setEnabled(method.loop is not None)
        self.preset.blockSignals(True)
        self.preset.clear()
        self.preset.addItems(list_presets(name))
        self.preset.setCurrentText(method.preset)
        self.preset.blockSignals(False)
        self._preset_changed(self.preset.currentText())
        self._update_resume()

    def checkpoint_file(self) -> Path | None:
        """Where runs on the chosen image with the chosen method keep their checkpoint (a user cache folder)."""
        image = self.image.value()
        if not image:
            return None
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in image)
        return checkpoint_folder() / f"{safe}.{self.method.currentText()}.checkpoint"

    def _update_resume(self, *_):
        path = self.checkpoint_file()
        step = None if path is None else checkpoint_step(path)
        self.resume_button.setEnabled(step is not None and not self.running)
        self.resume_button.setText("Resume" if step is None else f"Resume from step {step}")

    def _follow_roles(self, event=None):
        """Switch to the method whose roles the viewer's layers carry, if the current method has none.

        Opening the recursive sample (partial and strong layers) thus selects
        "recursive" without the user having to know which roles go with which method.
        """
        assigned = {layer.metadata.get(ROLE_KEY) for layer in self.viewer.layers}
        current = self.method.currentText()
        if self.running or assigned & set(METHODS[current].role_names):
            return
        for method in METHODS.values():
            if assigned & set(method.role_names):
                self.method.setCurrentText(method.name)
                return

    def _preset_changed(self, name: str):
        if name:
            self.settings.show_preset(load_preset(name), METHODS[self.method.currentText()])

    def _layer(self, name: str):
        return self.viewer.layers[name] if name in self.viewer.layers else None

    # ------------------------------------------------------------------ run

    @property
    def running(self) -> bool:
        return self.worker is not None

    def _start_or_cancel(self):
        if self.running:
            self.cancel()
        else:
            self.start()

    def start(self, resume: bool = False):
        """Start training with the form's settings (what the Start button does); return the worker.

        Every run writes a checkpoint (:meth:`checkpoint_file`); ``resume``
        continues from it (what the Resume button does).
        """
        method = METHODS[self.method.currentText()]
        checkpoint = self.checkpoint_file()
        if checkpoint is not None:
            try:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:  # a read-only home: train without a safety net rather than not at all
                show_info(f"No checkpoints for this run (cannot create {checkpoint.parent}: {error}).")
                checkpoint = None
        layers = {role: name for role in method.role_names if (name := self.roles[role].value())}
        settings = self.settings.settings(method)
        preset = self.preset.currentText() or method.preset
        init = model_to_start_from(self.init.currentText(), method)
        if init is False:
            return None
        worker = train_in_viewer(
            self.viewer, self.channels.image(self.image.value()), method=method.name, **layers, **settings,
            preset=preset, device=self.device.currentText(), start=False, on_event=self._on_event,
            checkpoint=checkpoint, resume=resume, **({"init": init} if init is not None else {}),
        )
        if worker is None:
            return None
        self.worker = worker
        self.model = None
        self._cancelled = False
        total = method.total_steps(load_preset(preset).replace(**settings))
        self._progress = progress(total=total, desc=f"Training {method.name}")
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self.start_button.setText("Cancel")
        self.resume_button.setEnabled(False)
        self.save_button.setEnabled(False)
        self.status.setText("starting...")
        worker.start()
        return worker

    def toggle_live(self):
        """Start a live session, or stop the running one (the Live button and its shortcut)."""
        return self.stop_live() if self.live is not None else self.start_live()

    def start_live(self):
        """Train live on the form's layers (:func:`~napari_coarseseg._live_viewer.live_in_viewer`)."""
        method = METHODS[self.method.currentText()]
        if self.running:
            show_error("A training run is going on: cancel it before going live.")
            self.live_button.setChecked(False)
            return None
        layers = {role: name for role in method.role_names if (name := self.roles[role].value())}
        init = model_to_start_from(self.init.currentText(), method)
        session = None if init is False else live_in_viewer(
            self.viewer, self.channels.image(self.image.value()), method=method.name, **layers,
            preset=self.preset.currentText() or method.preset, device=self.device.currentText(),
            on_event=self._on_live_event, init=init, **self.settings.settings(method, lengths=False))
        self.live = session
        self.live_button.setChecked(session is not None)
        self.start_button.setEnabled(session is None)
        if session is not None:
            self.save_button.setEnabled(False)
            self.status.setText("live: starting...")
            # A session that ends by itself (it failed: a notification says why) frees the buttons again.
            session.worker.finished.connect(lambda: self.stop_live() if self.live is session else None)
        return session

    def stop_live(self):
        """Stop the live session (within 5 s); its model can then be saved."""
        session, self.live = self.live, None
        self.live_button.setChecked(False)
        self.start_button.setEnabled(True)
        if session is None:
            return None
        if session.stop(timeout=5) and session.training is not None:
            self.model = session.model()
            self.save_button.setEnabled(True)
            self.status.setText(f"live session stopped after {self.model.card['training']['steps']} steps; "
                                "save its model or go live again.")
        return session

    def _on_live_event(self, event):
        if self.live is None:
            return
        losses = ", ".join(f"{name} {value:.3f}" for name, value in event.losses.items())
        previews = self.live.previews
        lines = [f"live: step {event.step}, {event.elapsed:.0f} s, {previews} previews, drawings taken in "
                 f"{event.drawings_version} times", f"loss: {losses}" if losses else "", event.message]
        self.status.setText("\n".join(line for line in lines if line))

    def cancel(self):
        if self.worker is not None:
            self._cancelled = True
            self.status.setText("cancelling...")
            self.worker.quit()

    def _on_event(self, event):
        if self._cancelled:  # events still queued when Cancel was pressed
            return
        if self._progress is not None:
            self._progress.update(event.step - self._progress.n)
        losses = ", ".join(f"{name} {value:.3f}" for name, value in event.losses.items())
        self.status.setText(f"{event.message}\nstep {event.step}/{event.total_steps}, {event.elapsed:.0f} s"
                            + (f"\nloss: {losses}" if losses else ""))

    def _on_returned(self, result):
        if result is not None:
            self.model = result[0]
            self.save_button.setEnabled(True)

    def _on_finished(self):
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.worker = None
        self.start_button.setText("Start training")
        self._update_resume()
        if self._cancelled:
            self.status.setText("cancelled; the evolution so far is kept.")
        elif self.model is not None:
            self.status.setText(f"done in {self.model.card['training']['seconds']:.0f} s on "
                                f"{self.model.card['training']['device']}.")

    def _save(self):
        path, _ = QFileDialog.getSaveFileName(self, "Save model", "model.safetensors", "Models (*.safetensors)")
        if path:
            self.save_model(path)

    def save_model(self, path):
        """Save the last trained model (a model file with its card, see :mod:`napari_coarseseg.model_io`)."""
        if self.model is None:
            show_error("No trained model yet: press Start training first.")
            return
        try:
            save_model(self.model, path)
        except OSError as error:
            show_error(f"Cannot save the model: {error}")
            return
        show_info(f"Model saved to {path}")


class PredictWidget(QWidget):
    """A model (file or shipped), an image layer (2D, stack or RGB; more channels), optional instances; adds
    "<image> prediction"."""

    def __init__(self, napari_viewer: napari.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        # Editable: the models shipped in models/ are listed, Browse... or typing gives a file.
        self.model_path = QComboBox()
        self.model_path.setEditable(True)
        self.model_path.addItems(list_shipped_models())
        self.model_path.lineEdit().setPlaceholderText("model.safetensors")
        browse = QPushButton("Browse...")
        browse.clicked.connect(self._browse)
        self.image = LayerChoice(napari_viewer, "image")
        self.channels = MoreChannels(napari_viewer)
        self.instances = QCheckBox("split into object instances (for counting)")
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        self.predict_button = QPushButton("Predict")
        self.predict_button.clicked.connect(self.predict)
        self.export_button = QPushButton("Export for bioimage.io...")
        self.export_button.setToolTip("Write the model as a bioimage.io package (.zip) for ilastik, deepImageJ, "
                                      "QuPath; its test image and cover come from the chosen image.")
        self.export_button.clicked.connect(self._export)

        row = QHBoxLayout()
        row.addWidget(self.model_path)
        row.addWidget(browse)
        form = QFormLayout()
        form.addRow("model", row)
        form.addRow("image", self.image)
        form.addRow("more channels", self.channels)
        form.addRow("device", self.device)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.instances)
        layout.addWidget(self.predict_button)
        layout.addWidget(self.export_button)
        layout.addStretch()

    def _browse(self):
        path, _ = QFileDialog.getOpenFileName(self, "Open model", "", "Models (*.safetensors)")
        if path:
            self.model_path.setEditText(path)

    def predict(self):
        """Run the prediction (what the Predict button does); return the worker."""
        path = self.model_path.currentText().strip()
        if not path:
            show_error("Choose a model first: a shipped one from the list, or a file (Browse...).")
            return None
        if not Path(path).is_file() and path not in list_shipped_models():
            show_error(f"Model file {path} does not exist; choose another one.")
            return None
        self.worker = predict_in_viewer(self.viewer, path, self.channels.image(self.image.value()),
                                        device=self.device.currentText(), instances=self.instances.isChecked())
        if self.worker is not None:
            self.predict_button.setEnabled(False)
            self.worker.finished.connect(lambda: self.predict_button.setEnabled(True))
        return self.worker

    def _export(self):
        path, _ = QFileDialog.getSaveFileName(self, "Export for bioimage.io", "model.zip",
                                              "bioimage.io packages (*.zip)")
        if path:
            self.export_bioimageio(path)

    def export_bioimageio(self, path):
        """Write the chosen model as a bioimage.io package in a thread (the Export button); return the worker.

        The package's test tensors and cover are cut from the chosen image (with
        its more channels), or from the bundled nuclei image when none is
        chosen (grey models); see :func:`napari_coarseseg.bioimageio_export.export_bioimageio`.
        """
        from napari.qt.threading import thread_worker

        from ._viewer import image_input
        from .bioimageio_export import export_bioimageio

        model = self.model_path.currentText().strip()
        if not model:
            show_error("Choose a model first: a shipped one from the list, or a file (Browse...).")
            return None
        image = self.channels.image(self.image.value())
        try:
            # Layer data as napari holds it (a lazy stack stays lazy: the export reads one slice of it).
            sample = image_input(self.viewer, image, keep_lazy=True)[1] if image else None
        except ValueError as error:
            show_error(f"Cannot export: {error}")
            return None
        channel_axis = -1 if isinstance(image, list) else None  # several channel layers, stacked last
        worker = thread_worker(export_bioimageio, start_thread=False, ignore_errors=True)(
            model, path, sample=sample, channel_axis=channel_axis)
        worker.returned.connect(lambda report: show_info(f"bioimage.io package written to {report.path}"))
        worker.errored.connect(lambda error: show_error(f"Export failed: {error}"))
        self.export_button.setEnabled(False)
        worker.finished.connect(lambda: self.export_button.setEnabled(True))
        worker.start()
        self.export_worker = worker
        return worker


class AnnotationsWidget(QWidget):
    """Drawing layers per role, a class table, simulation from a full mask, live counts of drawn pixels."""

    def __init__(self, napari_viewer: napari.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.image = LayerChoice(napari_viewer, "image")
        self.create_button = QPushButton("Create empty drawing layers")
        self.create_button.clicked.connect(self.create_layers)

        self.classes = QTableWidget(1, 2)
        self.classes.setHorizontalHeaderLabels(["value", "name"])
        self.classes.setItem(0, 0, QTableWidgetItem("1"))
        self.classes.setItem(0, 1, QTableWidgetItem("object"))
        add_class = QPushButton("Add class")
        add_class.clicked.connect(self.add_class)

        self.assign_layer = LayerChoice(napari_viewer, "labels")
        self.assign_role = QComboBox()
        self.assign_role.addItems(list(drawing_roles()))
        assign = QPushButton("Assign role")
        assign.clicked.connect(self.assign)

        self.full_mask = LayerChoice(napari_viewer, "labels")
        self.instances = QCheckBox("the mask holds instances (all of class 1)")
        self.instances.setChecked(True)
        simulate_button = QPushButton("Simulate coarse drawings from this mask")
        simulate_button.clicked.connect(self.simulate_from_mask)

        self.counts = QLabel("")
        self.counts.setWordWrap(True)
        # Painting emits many events: recount at most every 200 ms.
        self._recount = QTimer(self)
        self._recount.setSingleShot(True)
        self._recount.setInterval(200)
        self._recount.timeout.connect(self.update_counts)

        layout = QVBoxLayout(self)
        form = QFormLayout()
        form.addRow("image", self.image)
        layout.addLayout(form)
        layout.addWidget(self.create_button)
        layout.addWidget(QLabel("Classes (value painted, name shown)"))
        layout.addWidget(self.classes)
        layout.addWidget(add_class)
        assign_row = QHBoxLayout()
        assign_row.addWidget(self.assign_layer)
        assign_row.addWidget(self.assign_role)
        assign_row.addWidget(assign)
        layout.addWidget(QLabel("Use an existing Labels layer as"))
        layout.addLayout(assign_row)
        layout.addWidget(QLabel("Full mask"))
        layout.addWidget(self.full_mask)
        layout.addWidget(self.instances)
        layout.addWidget(simulate_button)
        layout.addWidget(QLabel("Drawn pixels"))
        layout.addWidget(self.counts)
        layout.addStretch()

        napari_viewer.layers.events.inserted.connect(self._watch)
        napari_viewer.layers.events.removed.connect(lambda event: self._recount.start())
        for layer in napari_viewer.layers:
            self._watch_layer(layer)
        self.update_counts()

    # ------------------------------------------------------------------ classes

    def add_class(self):
        row = self.classes.rowCount()
        self.classes.insertRow(row)
        self.classes.setItem(row, 0, QTableWidgetItem(str(row + 1)))
        self.classes.setItem(row, 1, QTableWidgetItem(f"class {row + 1}"))

    def class_names(self) -> dict[int, str]:
        names = {}
        for row in range(self.classes.rowCount()):
            value, name = self.classes.item(row, 0), self.classes.item(row, 1)
            if value is not None and value.text().strip().isdigit():
                names[int(value.text())] = name.text() if name is not None else value.text()
        return names

    # ------------------------------------------------------------------ layers

    def _image_layer(self):
        name = self.image.value()
        if name is None:
            show_error("Open or pick an image layer first.")
            return None
        return self.viewer.layers[name]

    def _add_role_layer(self, image_layer, role: str, data=None):
        shape = spatial_shape(image_layer.data, image_layer.rgb)
        name = f"{image_layer.name} {role}"
        if data is None and name in self.viewer.layers:
            return self.viewer.layers[name]  # never replace what the user drew
        if data is None:
            data = np.zeros(shape, dtype=np.uint8)
        # On the image's grid: its scale, and its NIfTI grid, with which a drawing is saved as NIfTI.
        grid = derived_layer_kwargs(image_layer, len(shape))
        layer = self.viewer.add_labels(data, name=name, metadata={ROLE_KEY: role, **grid.pop("metadata", {})},
                                       opacity=0.4 if role in ("negative", "background") else 0.7, **grid)
        return layer

    def create_layers(self):
        """One empty Labels layer per role, named "<image> <role>", unless it exists."""
        image_layer = self._image_layer()
        if image_layer is None:
            return []
        return [self._add_role_layer(image_layer, role) for role in drawing_roles()]

    def assign(self):
        name = self.assign_layer.value()
        if name is None:
            show_error("There is no Labels layer to assign; draw one or create the drawing layers.")
            return
        self.viewer.layers[name].metadata[ROLE_KEY] = self.assign_role.currentText()
        self.update_counts()

    def simulate_from_mask(self):
        """New positive, negative and partial layers simulated from the chosen full mask (left unchanged)."""
        image_layer, name = self._image_layer(), self.full_mask.value()
        if image_layer is None:
            return []
        if name is None:
            show_error("Pick the Labels layer that holds a full mask to simulate from.")
            return []
        mask = np.asarray(self.viewer.layers[name].data)
        shape = spatial_shape(image_layer.data, image_layer.rgb)
        if mask.shape != shape:
            show_error(f"The mask {name!r} has shape {mask.shape} but the image has {shape}; pick a mask of the "
                       "image's shape.")
            return []
        drawings = simulate(mask, instances=self.instances.isChecked())
        added = [self._add_role_layer(image_layer, f"{role} (simulated)", getattr(drawings, role))
                 for role in ("positive", "negative", "partial")]
        for layer, role in zip(added, ("positive", "negative", "partial"), strict=True):
            layer.metadata[ROLE_KEY] = role
        self.update_counts()
        return added

    # ------------------------------------------------------------------ counts

    def _watch(self, event):
        self._watch_layer(event.value)
        self._recount.start()

    def _watch_layer(self, layer):
        if is_kind(layer, "labels"):
            layer.events.data.connect(lambda event: self._recount.start())
            if hasattr(layer.events, "paint"):
                layer.events.paint.connect(lambda event: self._recount.start())

    def update_counts(self):
        """Drawn pixels per role and class of the layers assigned to a role."""
        names = self.class_names()
        lines = []
        for layer in self.viewer.layers:
            role = layer.metadata.get(ROLE_KEY) if is_kind(layer, "labels") else None
            if role is None:
                continue
            data = np.asarray(layer.data)
            counts = np.bincount(data[data > 0].astype(np.int64, copy=False))
            drawn = [(value, int(n)) for value, n in enumerate(counts) if value and n]
            if role == Role.BACKGROUND.value:
                text = f"{sum(n for _, n in drawn)} px"
            else:
                text = ", ".join(f"{names.get(value, value)}: {n} px" for value, n in drawn) or "nothing drawn"
            lines.append(f"{layer.name} ({role}): {text}")
        self.counts.setText("\n".join(lines) or "No drawing layer yet: create them or assign a role.")
