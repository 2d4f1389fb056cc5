"""Training and prediction inside a napari viewer, without blocking it.

The widgets' buttons call these functions, and scripts may call them
directly. Work runs in a napari ``thread_worker`` that drives the core's
training generator; the GUI thread only copies results into layers. The
user's layers are read once (copied) when a run starts and never written.
"""

from __future__ import annotations

import gc
import inspect
import threading
from collections import deque
from collections.abc import Sequence

import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info

from ._nifti_napari import derived_layer_kwargs
from .annotations import AnnotationError, is_lazy, spatial_shape
from .blockwise import BlockwisePrediction
from .inference import check_image_for_model, move_channels_for_model
from .methods import DEFAULT_METHOD, check_roles, drawing_roles, get_method, load_model, predict
from .model_io import Model, ModelFileError

__all__ = ["train_in_viewer", "predict_in_viewer", "evolution_layer_name", "prediction_layer_name"]


def _import_torch_compiler():
    # torch builds its first optimiser only after importing torch._dynamo (2-3 s, once per process). Done by a
    # training worker, that import holds the GIL for up to half a second at a time and freezes the viewer
    # mid-run; done here, in the background when the plugin loads, it is over before anyone presses Start.
    try:
        import torch._dynamo  # noqa: F401
    except Exception:  # an optional speed-up: training imports it anyway
        pass


threading.Thread(target=_import_torch_compiler, name="coarseseg-import-torch", daemon=True).start()


_frozen_workers = 0


def hold_full_collections(worker) -> None:
    """While ``worker`` runs, leave the objects that exist when it starts out of Python's full garbage collections.

    With napari, Qt and torch loaded, one full pass of the collector over them takes about 0.3 s, and it runs
    in whichever thread happens to allocate: in the GUI thread it froze the viewer mid-run. ``gc.freeze`` moves
    them to a generation the collector skips; they are handed back (``gc.unfreeze``) when the last running
    worker ends, so nothing is kept for good.
    """
    def started():
        global _frozen_workers
        if _frozen_workers == 0:
            gc.freeze()
        _frozen_workers += 1

    def finished():
        global _frozen_workers
        _frozen_workers = max(_frozen_workers - 1, 0)
        if _frozen_workers == 0:
            gc.unfreeze()

    worker.started.connect(started)
    worker.finished.connect(finished)


def evolution_layer_name(image_name: str) -> str:
    return f"{image_name} evolution"


def prediction_layer_name(image_name: str) -> str:
    return f"{image_name} prediction"


def reliability_layer_name(image_name: str) -> str:
    return f"{image_name} annotation reliability"


class ViewerInputError(ValueError):
    """A layer named in a call does not exist or does not fit the image."""


_LAYER_TYPES = {"image": Image, "labels": Labels}


def is_kind(layer, kind: str) -> bool:
    """Whether a napari layer is an ``"image"`` or a ``"labels"`` layer."""
    return isinstance(layer, _LAYER_TYPES[kind])


def _layer_data(viewer, name, kind: str, image_shape: tuple | None = None, role: str = "",
                keep_lazy: bool = False) -> np.ndarray:
    """A private copy of a layer's data, checked against the image's shape.

    With ``keep_lazy``, lazy data (dask, zarr, memmap) is returned as it is,
    for readers that go slice by slice and never write.
    """
    layer = name if not isinstance(name, str) else None
    if layer is None:
        if name not in viewer.layers:
            raise ViewerInputError(f"there is no layer named {name!r}; pick one of "
                                   f"{[layer.name for layer in viewer.layers]}.")
        layer = viewer.layers[name]
    if not is_kind(layer, kind):
        raise ViewerInputError(f"layer {layer.name!r} is a {type(layer).__name__} layer; the {role or kind} "
                               f"must be a {kind} layer.")
    data = layer.data if keep_lazy and is_lazy(layer.data) else np.array(layer.data, copy=True)
    if image_shape is not None and data.shape != image_shape:
        hint = (" It is a 2D drawing on a 3D image: draw in a layer with the image's shape (napari: "
                "New Labels layer while the image is selected)." if data.ndim < len(image_shape) else "")
        raise ViewerInputError(f"{role} layer {layer.name!r} has shape {data.shape} but image has shape "
                               f"{image_shape}.{hint}")
    return data


def _names(value) -> list:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        return [value]
    return list(value)


def _image_layer(viewer, image):
    """The image layer named ``image`` (or ``image`` itself when it is a layer)."""
    if not isinstance(image, str):
        return image
    if image not in viewer.layers:
        raise ViewerInputError(f"there is no image layer named {image!r}; open an image first.")
    return viewer.layers[image]


def image_input(viewer, image, keep_lazy: bool = False) -> tuple:
    """The image layer, a private copy of its data and whether that has channels on its last axis.

    ``image`` is a layer or its name, or a list of them: the channels of one
    image, in order (napari opens a multichannel file with ``channel_axis`` as
    one layer per channel). Several grey layers of one shape are stacked on a
    last axis, and the first layer stands for the image (the result layers
    are named after it and lie on its grid). ``keep_lazy`` as for one layer's
    data; several layers are read into memory.
    """
    names = _names(image)
    if len(names) <= 1:
        layer = _image_layer(viewer, names[0] if names else "")
        data = _layer_data(viewer, layer, "image", role="image", keep_lazy=keep_lazy)
        return layer, data, bool(getattr(layer, "rgb", False))
    layers = [_image_layer(viewer, name) for name in names]
    if len({id(layer) for layer in layers}) < len(layers):
        raise ViewerInputError(f"a layer is given twice among the channels {[layer.name for layer in layers]}.")
    channels = [_layer_data(viewer, layer, "image", role="channel") for layer in layers]
    for layer, data in zip(layers, channels, strict=True):
        if getattr(layer, "rgb", False):
            raise ViewerInputError(f"layer {layer.name!r} is a colour (RGB) layer; channels must be grey layers.")
        if data.shape != channels[0].shape:
            raise ViewerInputError(f"channel layer {layer.name!r} has shape {data.shape} but {layers[0].name!r} has "
                                   f"{channels[0].shape}; the channels of an image must have one shape.")
    return layers[0], np.stack(channels, axis=-1), True


def train_in_viewer(viewer, image, method: str = DEFAULT_METHOD, *, steps: int | None = None,
                    iterations: int | None = None, preset: str | None = None, device: str = "auto",
                    seed: int | None = 0, start: bool = True, on_event=None, **layers_and_settings):
    """Train on layers of ``viewer`` in a background thread; return the worker.

    Parameters
    ----------
    viewer : napari.Viewer
    image : str or Layer, or a list of them
        The image layer (name or layer), or several grey layers of one shape:
        the channels of one image, in order (see :func:`image_input`).
    method : str
        A method of :data:`napari_coarseseg.methods.METHODS`: ``"refineseg"``
        or ``"recursive"``.
    steps, iterations : int, optional
        Optimiser steps (per iteration where the method has iterations) and
        iterations; default from the preset.
    preset : str, optional
        A preset of ``models/``; default the method's.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
    seed : int, optional
    start : bool
        Start the worker (set False to connect more signals first).
    on_event : callable, optional
        Called in the GUI thread with every :class:`TrainingEvent`.
    **layers_and_settings
        Drawing layers by role (names or layers; a list for a role that
        takes several), e.g. ``positive=["strokes"], negative=["not"]`` for
        refineseg, ``partial="regions", strong="exact"`` for recursive; every
        other keyword goes to the method's ``train`` (a
        :class:`TrainingConfig` field, ``checkpoint``, ``resume``,
        ``spacing``). For a method that measures distances (recursive:
        its level set) the image layer's ``scale`` (its last two axes) is the
        pixel size ``spacing`` unless one is given: a layer from the NIfTI
        reader carries the voxel size as its scale. napari's default scale
        (all 1) means pixels.

    Returns
    -------
    worker : GeneratorWorker or None
        Yields the core's events; returns ``(model, prediction)``. ``None``
        when the inputs are wrong (a notification says why).

    Notes
    -----
    Creates the Labels layer ``"<image> evolution"`` (a leading iteration
    axis, filled live, the dims slider following the newest plane), and at
    the end ``"<image> prediction"`` and, where the method gives one (refineseg),
    ``"<image> annotation reliability"``. Existing layers of those names are
    replaced; user layers are never written.
    """
    lengths = {key: value for key, value in (("steps", steps), ("iterations", iterations)) if value is not None}
    try:
        chosen, image_layer, image_data, rgb, given, settings = training_inputs(viewer, image, method,
                                                                                layers_and_settings)
        settings = {**layer_spacing(chosen, image_layer), **settings}
        name, shape = image_layer.name, spatial_shape(image_data, rgb)
        layers = {role: [_layer_data(viewer, n, "labels", shape, role) for n in names] for role, names in given.items()}
        generator = chosen.start(image_data, layers, config=preset, seed=seed, device=device, rgb=rgb, names=[name],
                                 **settings, **lengths)
    except (ViewerInputError, AnnotationError, ValueError, KeyError) as error:
        show_error(f"Cannot train: {error}")
        return None

    def work():
        model = yield from generator
        if model is None:  # closed early
            return None
        return model, predict(model, image_data, device=device, name=name, keep_probabilities=False)

    worker = _training_worker(viewer, work, name, shape, on_event, image_layer)
    if start:
        worker.start()
    return worker


def training_inputs(viewer, image, method: str, layers_and_settings: dict):
    """The method, image layer (the first of several channels), its private copy, whether it has channels last
    (:func:`image_input`), the drawing layers given per role (names or layers; at least one) and the other
    keywords (settings) of a training call; ``ViewerInputError`` (or the method's errors) say what is wrong."""
    roles = set(drawing_roles())
    named = {role: _names(value) for role, value in layers_and_settings.items() if role in roles}
    settings = {key: value for key, value in layers_and_settings.items() if key not in roles}
    chosen = get_method(method)
    image_layer, image_data, rgb = image_input(viewer, image)
    given = {role: names for role, names in named.items() if names}
    check_roles(chosen, given)
    if not given:
        raise ViewerInputError(f"no drawing layer given: pick at least one {' or '.join(chosen.role_names)} layer.")
    return chosen, image_layer, image_data, rgb, given, settings


def layer_spacing(method, image_layer) -> dict:
    """``{"spacing": (sy, sx)}`` from the last two axes of the image layer's scale, for a method whose training
    measures distances (its ``train`` takes ``spacing``); ``{}`` for other methods and for napari's default scale
    (all 1: pixels, the result of no spacing)."""
    scale = tuple(float(s) for s in getattr(image_layer, "scale", ())[-2:])
    if "spacing" not in inspect.signature(method.train).parameters or all(s == 1.0 for s in scale):
        return {}
    return {"spacing": scale}


def _training_worker(viewer, work, name: str, shape: tuple, on_event, image_layer=None):
    """A thread worker running ``work``, its events shown in ``"<name> evolution"`` and its result as layers
    (on the grid of ``image_layer``: its scale, translate and NIfTI grid)."""
    # ignore_errors: our handler shows one notification instead of napari re-raising in the GUI thread.
    worker = thread_worker(work, start_thread=False, ignore_errors=True)()
    evolution: list[np.ndarray] = []

    def grid(ndim: int) -> dict:
        return {} if image_layer is None else derived_layer_kwargs(image_layer, ndim)

    def on_yielded(event):
        if event.masks is not None:
            evolution.append(np.asarray(event.masks[0]))
            _show_evolution(viewer, name, evolution)
        if on_event is not None:
            on_event(event)

    def on_returned(result):
        if result is None:
            return
        model, prediction = result
        _replace_layer(viewer, prediction_layer_name(name), prediction.labels, "labels", select=False, opacity=0.5,
                       **grid(prediction.labels.ndim))
        if prediction.reliability is not None:
            # Below the prediction and hidden: a map to turn on, not a field that hides the image. Added in the
            # next turn of the event loop: each new layer costs the GUI 0.1-0.5 s, and two at once stall it.
            later(viewer, lambda: add_below(viewer, reliability_layer_name(name), prediction.reliability,
                                    prediction_layer_name(name), colormap="magma", opacity=0.6, visible=False,
                                    **grid(prediction.reliability.ndim)))
        worker.model = model
        show_info(f"Training done: {model.card['training']['seconds']:.0f} s on "
                  f"{model.card['training']['device']}.")

    def on_errored(error):
        # Inputs refused before the first step: take the empty placeholder layer away again.
        if not evolution and evolution_layer_name(name) in viewer.layers:
            viewer.layers.remove(evolution_layer_name(name))
        show_error(f"Training failed: {error}")

    # Adding a layer with a new (iteration) axis costs a few hundred ms of GUI
    # time; pay it now, before training, so that live updates only set data.
    _show_evolution(viewer, name, [np.zeros(shape, dtype=np.uint8)], **grid(len(shape) + 1))
    worker.model = None
    hold_full_collections(worker)
    worker.yielded.connect(on_yielded)
    worker.returned.connect(on_returned)
    worker.errored.connect(on_errored)
    return worker


LATER_MS = 1
_later_queue: deque = deque()


def later(viewer, function) -> None:
    """Run ``function`` in a later turn of the Qt event loop, one such function per turn, so that slow GUI updates
    (adding a layer costs napari 0.1-0.5 s) never add up to one stall.

    Each runs on a ``LATER_MS`` timer started when the previous one ends: a 0 ms timer is a posted event, served
    before the timers and paint events already due, which made two updates one stall. A function whose viewer
    has been closed meanwhile is dropped.
    """
    _later_queue.append((viewer, function))
    if len(_later_queue) == 1:
        _run_later_soon()


def _run_later_soon():
    from qtpy.QtCore import QTimer

    QTimer.singleShot(LATER_MS, _run_one_later)


def _run_one_later():
    viewer, function = _later_queue[0]
    try:
        if viewer_is_open(viewer):
            function()
    finally:
        _later_queue.popleft()
        if _later_queue:
            _run_later_soon()


def viewer_is_open(viewer) -> bool:
    """Whether ``viewer``'s window (if it has one) is still open: napari's ``Window.close`` drops its Qt window."""
    window = getattr(viewer, "window", None)
    return window is None or hasattr(window, "_qt_window")


def keep_selection(viewer):
    """Remember the user's layer selection; the returned function restores it (adding a layer selects it)."""
    selection, active = set(viewer.layers.selection), viewer.layers.selection.active

    def restore():
        viewer.layers.selection.clear()
        viewer.layers.selection.update(selection & set(viewer.layers))
        viewer.layers.selection.active = active if active in viewer.layers else None

    return restore


def add_below(viewer, name: str, data, above: str, **kwargs):
    """Add or replace the image layer ``name`` just below the layer ``above``, keeping the user's selection."""
    layer = _replace_layer(viewer, name, data, "image", select=False, **kwargs)
    layers = viewer.layers
    if above in layers and layers.index(layer) > layers.index(above):
        layers.move(layers.index(layer), layers.index(above))
    return layer


def _replace_layer(viewer, name: str, data, kind: str, select: bool = True, **kwargs):
    """Set the data of layer ``name``, or add it (``select=False``: the user's selection stays as it was; napari
    selects a new layer)."""
    if name in viewer.layers:
        layer = viewer.layers[name]
        if is_kind(layer, kind) and layer.data.ndim == np.ndim(data):
            layer.data = data
            return layer
        viewer.layers.remove(name)
    add = viewer.add_labels if kind == "labels" else viewer.add_image
    if select:
        return add(data, name=name, **kwargs)
    restore = keep_selection(viewer)
    layer = add(data, name=name, **kwargs)
    restore()
    return layer


def _show_evolution(viewer, image_name: str, planes: list[np.ndarray], **kwargs):
    """Show planes 0..n as one Labels layer with a leading iteration axis; follow the newest.

    ``kwargs`` (scale, translate, metadata) go to the layer when it is made.
    """
    stack = np.stack(planes)
    # Not selected: a new layer would take the selection from the user's drawing layer.
    layer = _replace_layer(viewer, evolution_layer_name(image_name), stack, "labels", select=False, **kwargs)
    viewer.dims.set_current_step(0, len(planes) - 1)
    return layer


def predict_in_viewer(viewer, model, image, device: str = "auto", instances: bool = False, start: bool = True):
    """Segment an image layer with a model (object or file path) in a background thread.

    Adds or replaces ``"<image> prediction"`` (Labels); with ``instances``,
    touching objects of a class become separate labels for counting.
    ``image`` is a layer or its name, or a list of them: the channels of one
    image, in the order the model was trained on (see :func:`image_input`).
    Returns the worker, or ``None`` when the inputs are wrong (a notification
    says why).
    """
    try:
        # Prediction reads a dask, zarr or memmap layer slice by slice, never whole.
        image_layer, image_data, _ = image_input(viewer, image, keep_lazy=True)
        if not isinstance(model, Model):
            model = load_model(model)
        if len(_names(image)) > 1:  # channel layers, stacked last: as many as the model's (one is a grey image)
            image_data = move_channels_for_model(image_data, model, -1, repr(image_layer.name))
        check_image_for_model(image_data, model, repr(image_layer.name))  # before any thread starts
        # A dask, zarr or memmap layer goes block by block (the same labels as predict): napari's progress bar
        # counts the blocks, and the worker can stop between two of them.
        blocks = (BlockwisePrediction(model, image_data, device=device, name=image_layer.name,
                                      **layer_spacing(get_method(model.method), image_layer))
                  if is_lazy(image_data) else None)
    except (ViewerInputError, ModelFileError, OSError, ValueError) as error:
        show_error(f"Cannot predict: {error}")
        return None
    name = image_layer.name

    def work():
        if blocks is not None:
            labels = (yield from blocks.run()).labels
        else:
            # A recursive model grows its masks by the level set: in the layer's pixel size (else the card's).
            spacing = layer_spacing(get_method(model.method), image_layer)
            labels = predict(model, image_data, device=device, name=name, keep_probabilities=False, **spacing).labels
        if instances:
            from skimage.measure import label

            # Connected regions of equal class become separate objects.
            labels = label(labels, background=0).astype(np.uint32)
        return labels

    progress = None if blocks is None else {"total": blocks.steps, "desc": f"Predicting {name}"}
    worker = thread_worker(work, start_thread=False, ignore_errors=True, progress=progress)()
    worker.returned.connect(lambda labels: _replace_layer(viewer, prediction_layer_name(name), labels, "labels",
                                                          **derived_layer_kwargs(image_layer, labels.ndim)))
    worker.errored.connect(lambda error: show_error(f"Prediction failed: {error}"))
    hold_full_collections(worker)
    if start:
        worker.start()
    return worker
