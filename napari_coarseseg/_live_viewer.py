"""A live session in a napari viewer: the network trains while the user paints, and its preview follows.

The session (:class:`LiveSession`) runs :class:`~napari_coarseseg.live.LiveTraining`
in a napari ``thread_worker``. The GUI thread does three cheap things only:
it marks the drawing layers as changed when napari says they were painted,
filled, erased or replaced (the worker copies them at its next refresh, so a
brush stroke costs the GUI nothing); it copies each preview into the
prediction layer; and it keeps the layers in an order that shows the
prediction over the image, with the "draw here next" map hidden below it.
The user's layers are never written.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import QApplication

from ._nifti_napari import derived_layer_kwargs
from ._viewer import (
    ViewerInputError,
    _layer_data,
    _replace_layer,
    _show_evolution,
    add_below,
    hold_full_collections,
    later,
    prediction_layer_name,
    training_inputs,
)
from .annotations import AnnotationError, spatial_shape
from .live import LivePreview, LiveTraining
from .methods import DEFAULT_METHOD
from .model_io import save_model
from .training import resolve_config

__all__ = ["live_in_viewer", "LiveSession", "draw_here_layer_name"]

#: The napari events of a Labels layer that mean "the drawing changed": brush, fill and erase (and
#: ``data_setitem``) emit ``paint``; ``layer.data = ...`` emits ``data``; an in-place change + ``refresh()``
#: emits ``set_data``.
DRAWING_EVENTS = ("paint", "data", "set_data")


#: The evolution layer of a session holds at most this many bytes of previews (and at most 64 previews): a
#: session may run for hours, and the layer is restacked with every preview.
EVOLUTION_BYTES = 64 * 2**20


def thin_history(planes: list[np.ndarray], max_bytes: int = EVOLUTION_BYTES, most: int = 64) -> list[np.ndarray]:
    """``planes`` (oldest first), every second one dropped when over the budget, the newest always kept: the
    history then spans the whole session, sparser the further back it goes.

    >>> [int(p[0]) for p in thin_history([np.full(1, i) for i in range(9)], most=8)]
    [0, 2, 4, 6, 8]
    """
    limit = int(np.clip(max_bytes // max(planes[-1].nbytes, 1), 8, most)) if planes else most
    if len(planes) <= limit:
        return planes
    return planes[::-1][::2][::-1]


def draw_here_layer_name(image_name: str) -> str:
    return f"{image_name} draw here next"


class LiveSession:
    """A running live session in a viewer (made by :func:`live_in_viewer`).

    Attributes
    ----------
    worker : GeneratorWorker
        The napari worker that trains.
    training : LiveTraining
        The headless session it drives.
    previews : int
        Previews shown so far.
    """

    def __init__(self, viewer, make_training, shape: tuple, image_layer, drawing_layers: dict, on_event=None,
                 **run_options):
        # The session is built in the worker: its first optimiser imports torch's compiler stack (seconds, once
        # per process), which must not freeze the viewer.
        self.viewer, self._make_training, self.training, self.image_name = viewer, make_training, None, image_layer.name
        self.drawing_layers, self.on_event, self.previews = drawing_layers, on_event, 0
        self._changed = threading.Event()
        self._finished, self._stop_requested = threading.Event(), threading.Event()
        self._evolution: list[np.ndarray] = []
        self._shape = shape
        self._stack = len(self._shape) == 3
        self._image_layer = image_layer
        for layers in drawing_layers.values():
            for layer in layers:
                for name in DRAWING_EVENTS:
                    getattr(layer.events, name).connect(self._mark_changed)
        viewer.layers.events.removed.connect(self._on_layer_removed)
        self._make_layers()
        # run_options go to LiveTraining.run (preview_every, first_preview, refresh_every, ...).
        self.worker = thread_worker(self._work, start_thread=False, ignore_errors=True)(**run_options)
        self.worker.yielded.connect(self._on_yielded)
        self.worker.errored.connect(lambda error: show_error(f"Live training failed: {error}"))
        self.worker.finished.connect(self._disconnect)
        hold_full_collections(self.worker)

    # ------------------------------------------------------------------ GUI thread

    def _mark_changed(self, event=None):
        self._changed.set()

    def _on_layer_removed(self, event):
        """The image layer removed (or the viewer closed, which removes every layer): the session ends, and
        what it still yields is dropped, since its layers may be gone with the viewer."""
        if event.value is self._image_layer and not self._stop_requested.is_set():
            self._stop_requested.set()
            if self.training is not None:
                self.training.stop()
            show_info(f"Live training stopped: the image layer {self.image_name!r} was removed.")

    def _disconnect(self):
        self.viewer.layers.events.removed.disconnect(self._on_layer_removed)
        for layers in self.drawing_layers.values():
            for layer in layers:
                for name in DRAWING_EVENTS:
                    getattr(layer.events, name).disconnect(self._mark_changed)

    def _make_layers(self):
        """The prediction over the image, the draw-here map hidden below it, the evolution: made now, before
        training, since adding a layer costs the GUI 0.1-0.5 s that live updates must not; one per turn of the
        event loop, so that the costs do not add up."""
        viewer, name = self.viewer, self.image_name
        grid = derived_layer_kwargs(self._image_layer, len(self._shape))  # on the image's scale and grid
        _replace_layer(viewer, prediction_layer_name(name), np.zeros(self._shape, np.uint8), "labels", select=False,
                       opacity=0.5, **grid)
        later(viewer, lambda: add_below(viewer, draw_here_layer_name(name), np.zeros(self._shape, np.float32),
                                prediction_layer_name(name), colormap="inferno", contrast_limits=(0, 1),
                                opacity=0.6, visible=False, blending="additive", **grid))
        if not self._stack:
            later(viewer, self._show_evolution)

    def _show_evolution(self):
        """The evolution so far (plane 0: nothing yet), the user's selection kept."""
        _show_evolution(self.viewer, self.image_name, [np.zeros(self._shape, np.uint8), *self._evolution],
                        **derived_layer_kwargs(self._image_layer, len(self._shape) + 1))

    def _on_yielded(self, event):
        if not any(layer is self._image_layer for layer in self.viewer.layers):
            return  # the image was removed, or the viewer closed: the session is ending
        if isinstance(event, LivePreview):
            index = (event.plane, *event.box) if self._stack else event.box
            for layer_name, values in ((prediction_layer_name(self.image_name), event.labels),
                                       (draw_here_layer_name(self.image_name), event.draw_here)):
                if layer_name in self.viewer.layers:
                    layer = self.viewer.layers[layer_name]
                    layer.data[index] = values
                    layer.refresh()
            self.previews += 1
            if not self._stack:
                self._evolution.append(self.viewer.layers[prediction_layer_name(self.image_name)].data.copy()
                                       if prediction_layer_name(self.image_name) in self.viewer.layers
                                       else event.labels)
                self._evolution = thin_history(self._evolution)
                self._show_evolution()
            if event.message:
                show_warning(event.message)
        if self.on_event is not None:
            self.on_event(event)

    # ------------------------------------------------------------------ worker thread

    def _read_drawings(self):
        if not self._changed.is_set():
            return None
        self._changed.clear()
        # Copies: the GUI thread may paint on while the network trains on them.
        return {role: [np.array(layer.data, copy=True) for layer in layers]
                for role, layers in self.drawing_layers.items()}

    def _read_region(self):
        """What the user looks at: the current slice of a stack (2-D: the plane) and the visible box."""
        plane = 0
        if self._stack:
            plane = int(np.clip(self.viewer.dims.current_step[-3], 0, self._shape[0] - 1))
        corners = np.asarray(self._image_layer.corner_pixels)
        height, width = self._shape[-2:]
        y0, x0 = np.clip(corners[0, -2:], 0, (height, width)).astype(int)
        y1, x1 = np.clip(corners[1, -2:] + 1, 0, (height, width)).astype(int)
        if y1 <= y0 or x1 <= x0:  # nothing of the image in view: the whole plane
            return plane, None
        return plane, (slice(y0, y1), slice(x0, x1))

    def _work(self, **run_options):
        try:
            self.training = self._make_training()
            if self._stop_requested.is_set():
                return
            self._changed.clear()  # the session starts from the drawings as they are now
            yield from self.training.run(self._read_drawings, self._read_region, **run_options)
        finally:
            self._finished.set()

    # ------------------------------------------------------------------ the user's calls

    def start(self):
        """Start training."""
        self.worker.start()
        return self

    @property
    def running(self) -> bool:
        return self.worker.is_running and not self._finished.is_set()

    def stop(self, timeout: float = 5.0) -> bool:
        """End the session after its current step; wait up to ``timeout`` s. True when it has ended.

        The wait keeps the viewer's event loop turning (the current step and the clean-up take up to a few
        hundred ms on a CPU, which must not freeze the viewer).
        """
        # Not worker.quit(): napari's worker would then stop calling the generator, leaving it suspended (its
        # clean-up unrun); the stop flag makes the generator return by itself after the current step.
        self._stop_requested.set()
        if self.training is not None:
            self.training.stop()
        deadline = time.perf_counter() + timeout
        application = QApplication.instance()
        while self.worker.is_running and not self._finished.is_set() and time.perf_counter() < deadline:
            if application is not None:
                application.processEvents()
            self._finished.wait(0.005)
        ended = self._finished.is_set() or not self.worker.is_running
        if ended and not getattr(self, "_announced", False):
            self._announced = True
            steps = self.training.loop.step if self.training is not None else 0
            show_info(f"Live training stopped after {steps} steps.")
        return ended

    def model(self):
        """The session's model (after :meth:`stop`)."""
        if self.running or self.training is None:
            raise RuntimeError("the live session has not trained, or is still training: stop() it first")
        return self.training.model()

    def save(self, path):
        """Save the session's model like any trained model (after :meth:`stop`)."""
        return save_model(self.model(), path)


def live_in_viewer(viewer, image, method: str = DEFAULT_METHOD, *, preset: str | None = None, device: str = "auto",
                   seed: int | None = 0, init=None, start: bool = True, on_event=None, preview_every: float = 3.0,
                   first_preview: float = 1.5, refresh_every: int = 10, refresh_seconds: float = 1.0,
                   **layers_and_settings):
    """Train on the drawing layers of ``viewer`` live: the network follows new strokes until stopped.

    Parameters
    ----------
    viewer : napari.Viewer
    image : str or Layer
        The image layer (name or layer).
    method : str
        A method with live sessions: ``"refineseg"`` or ``"recursive"``.
    preset, device, seed
        As for :func:`~napari_coarseseg._viewer.train_in_viewer`.
    init : Model, optional
        Start from this model's weights (same method, classes and channels).
    start : bool
        Start the worker now.
    on_event : callable, optional
        Called in the GUI thread with every :class:`~napari_coarseseg.live.LiveStep`.
    preview_every, first_preview, refresh_every, refresh_seconds
        Seconds between previews and before the first; steps, or seconds
        when they pass first, between reads of the drawing layers.
    **layers_and_settings
        Drawing layers by role (names or layers; lists where a role takes
        several), e.g. ``positive=["strokes"], negative=["not"]``; every other
        keyword is a :class:`~napari_coarseseg.TrainingConfig` field.

    Returns
    -------
    LiveSession or None
        ``None`` when the inputs are wrong (a notification says why).

    Notes
    -----
    Adds ``"<image> prediction"`` (labels, over the image, refreshed with
    every preview for the slice and box in view), ``"<image> draw here
    next"`` (hidden, below the prediction: where a stroke would help most)
    and, for a 2-D image, ``"<image> evolution"`` (every preview). The
    drawing layers are read, never written; edits by brush, fill, erase,
    ``data_setitem`` or ``layer.data = ...`` are taken in within
    ``refresh_every`` steps or ``refresh_seconds`` seconds, whichever comes
    first.
    """
    try:
        chosen, image_layer, image_data, rgb, named, settings = training_inputs(viewer, image, method,
                                                                                layers_and_settings)
        shape = spatial_shape(image_data, rgb)
        layers = {role: [viewer.layers[n] if isinstance(n, str) and n in viewer.layers else n for n in names]
                  for role, names in named.items()}
        copies = {role: [_layer_data(viewer, layer, "labels", shape, role) for layer in role_layers]
                  for role, role_layers in layers.items()}
        if chosen.loop is None:
            raise ViewerInputError(f"the {method} method has no live sessions yet; train it with Start instead")
        resolve_config(preset, chosen.preset, settings)  # settings checked now, not in the worker
    except (ViewerInputError, AnnotationError, ValueError, KeyError) as error:
        show_error(f"Cannot train live: {error}")
        return None

    def make_training():
        # Drawings the method refuses (nothing drawn, say) fail here, in the worker: a notification says why.
        return LiveTraining(image_data, copies, method, config=preset, seed=seed, device=device, rgb=rgb,
                            name=image_layer.name, init=init, **settings)

    session = LiveSession(viewer, make_training, shape, image_layer, layers, on_event, preview_every=preview_every,
                          first_preview=first_preview, refresh_every=refresh_every,
                          refresh_seconds=refresh_seconds)
    return session.start() if start else session
