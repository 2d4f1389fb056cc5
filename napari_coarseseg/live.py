"""Live training: one run that goes on until stopped, takes in new strokes, and previews what is in view.

A live session keeps one training loop (:class:`~napari_coarseseg.methods.TrainingLoop`) going:

- every ``refresh_every`` optimiser steps, or ``refresh_seconds`` seconds
  when that comes first (a step of the preset takes about 0.5 s on 2 CPU
  cores: ten of them kept a stroke waiting 5 s), it asks
  ``read_drawings()`` for the drawing layers; when they changed (strokes
  added or erased), the method's targets and patch sampler are rebuilt
  while the weights, the optimiser state and the transition heads are
  kept, and half of the patches that centre on drawn pixels centre on the
  changed pixels for a while, so new strokes are learned first; strokes
  painted during the session are the user's corrections and are taken as
  exact (no transition head explains them away,
  :meth:`TrainingLoop.trust_new_strokes`); after every step the method
  does what else it does between steps (:meth:`TrainingLoop.live_update`:
  the recursive method grows its regions every ``steps`` steps);
- the learning rate warms up over ``warmup_steps`` steps and then stays
  constant (a one-cycle schedule needs an end, a live session has none);
  previews and the session's model use an exponential moving average of the
  weights over about ``1 / (1 - average)`` steps (33), since at a constant
  rate the weights themselves wander from step to step (previews on the DSB
  sample jumped between Dice 0.73 and 0.93 from one to the next without it),
  and after corrections they overshoot: on validation annotators the whole
  image's Dice fell to 0.61-0.86 within 25 steps of them with an average over
  10 steps, to 0.84-0.88 with 33;
- a preview of the region ``read_region()`` names (a plane and a box: what the
  user is looking at) is made ``first_preview`` seconds after the start and
  then every ``preview_every`` seconds, so its cost is that of the region,
  whatever the size of the data. It holds the labels ``predict`` would give
  now and the "draw here next" map (:meth:`TrainingLoop.live_maps`).

Guarantee: :meth:`LiveTraining.run` yields a :class:`LiveStep` after every
optimiser step (a :class:`LivePreview` when one is due) until :meth:`stop`
is called or the generator is closed, then releases the device; the
drawings it reads are copied, never written; :meth:`model` gives the
session's model at any time after it stopped, to save like any other.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np
import torch

from .annotations import AnnotationError
from .data import TrainingImages
from .methods import get_method
from .model_io import Model
from .training import TrainingConfig, release_device_memory, resolve_config, use_channels_last

__all__ = ["LiveTraining", "LiveStep", "LivePreview"]


@dataclass
class LiveStep:
    """Progress of a live session after one optimiser step.

    Attributes
    ----------
    step : int
        Optimiser steps done.
    elapsed : float
        Seconds since the session started.
    losses : dict of str to float
        Loss terms of the step.
    drawings_version : int
        How many times new drawings were taken in.
    message : str
        Why the last drawings were refused, if they were ("" otherwise).
    """

    step: int
    elapsed: float
    losses: dict
    drawings_version: int = 0
    message: str = ""


@dataclass
class LivePreview(LiveStep):
    """A :class:`LiveStep` with the preview of a region.

    Attributes
    ----------
    plane : int
        Index of the previewed plane (0 for a 2-D image; the slice of a stack).
    box : tuple of slice
        The previewed (Y, X) box of the plane.
    labels : ndarray
        The box's labels (what ``predict`` would give now).
    draw_here : ndarray
        The box's "draw here next" map in [0, 1]: high where a stroke would
        help most.
    """

    plane: int = 0
    box: tuple = ()
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))
    draw_here: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))


def _no_change():
    return None


class LiveTraining:
    """A training session that follows the user's drawings (see the module docstring).

    Parameters
    ----------
    image : ndarray
        The image: (Y, X), a (Z, Y, X) stack or (Y, X, C) colour.
    layers : dict
        The drawing layers by role (role -> list of arrays with the image's
        shape), as the method's ``train`` takes them, e.g. ``{"positive":
        [strokes], "negative": [not_strokes]}``.
    method : str
        A registered method with live sessions: ``"refineseg"`` (strokes) or
        ``"recursive"`` (partial regions and exact masks on a few slices of a
        stack; its regions grow every ``steps`` steps, as in a run, and a
        slice's regions painted during the session grow at once).
    config : TrainingConfig or str, optional
        Settings or a preset name; default the method's preset. The method's
        ``live_settings`` go on top (refineseg: undrawn pixels as weak
        background instead of the prior correction, see
        :data:`~napari_coarseseg.methods.refineseg.LIVE_SETTINGS`), then
        ``overrides``.
    seed, device, rgb, name
        As for the method's ``train``.
    init : Model, optional
        Start from this model's weights (same method, classes and channels).
    **overrides
        :class:`~napari_coarseseg.TrainingConfig` fields.

    Examples
    --------
    >>> import numpy as np
    >>> from napari_coarseseg import simulate
    >>> mask = np.zeros((32, 32), int); mask[8:24, 8:24] = 1
    >>> drawings = simulate(mask, erode=2, margin=3)
    >>> image = (20 + 100 * mask).astype(np.float32)
    >>> session = LiveTraining(image, {"positive": [drawings.positive], "negative": [drawings.negative]},
    ...                        base_channels=4, depth=2, patch_size=16, batch_size=2, device="cpu")
    >>> for event in session.run(first_preview=0):
    ...     if isinstance(event, LivePreview):
    ...         session.stop()
    >>> event.labels.shape, session.model().card["method"]
    ((32, 32), 'refineseg')
    """

    def __init__(self, image, layers: dict, method: str = "refineseg", *, config: TrainingConfig | str | None = None,
                 seed: int | None = 0, device="auto", rgb: bool | None = None, name: str = "image",
                 init: Model | None = None, **overrides):
        chosen = get_method(method)
        if chosen.loop is None:
            raise ValueError(f"the {method} method has no live sessions yet; train it with Start instead")
        self.config = resolve_config(config, chosen.preset, {**chosen.live_settings, **overrides})
        self.images = TrainingImages(image, rgb, [name])
        self.loop = chosen.loop(self.images, layers, self.config, seed, device)
        if init is not None:
            self.loop.start_from(init)
        self.loop.trust_new_strokes()  # strokes painted during the session correct the preview: exact
        self._stop = threading.Event()
        self.seconds = 0.0
        self.losses: dict = {}

    def stop(self) -> None:
        """Ask the session to end after the current step (thread-safe; :meth:`run` then returns)."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run(self, read_drawings: Callable[[], dict | None] = _no_change,
            read_region: Callable[[], tuple[int, tuple] | None] = lambda: None, *, refresh_every: int = 10,
            refresh_seconds: float = 1.0, preview_every: float = 3.0, first_preview: float = 1.5,
            warmup_steps: int = 20, context: int = 32, average: float = 0.97) -> Generator[LiveStep, None, None]:
        """The session's generator (see the module docstring).

        Parameters
        ----------
        read_drawings : callable
            Returns the drawing layers (as ``layers`` in the constructor) when
            they changed since the last call, else ``None``. Drawings the
            method refuses (every stroke erased, say) are reported in
            :attr:`LiveStep.message` and the previous ones kept.
        read_region : callable
            Returns ``(plane, (y slice, x slice))`` to preview, or ``None`` for
            the whole first plane.
        refresh_every, refresh_seconds : int, float
            Steps, or seconds when they pass first, between calls of
            ``read_drawings`` (a call that finds nothing changed costs
            nothing; taking in changed drawings costs about 0.05 s on a
            512 x 512 image).
        preview_every, first_preview : float
            Seconds between previews (at least four times what the last one
            took), and before the first one.
        warmup_steps : int
            Steps of the learning-rate warm-up.
        context : int
            Pixels of image around the box the network sees (and that are cut
            off again), so the box's edges are predicted like its middle.
        average : float
            Decay of the moving average of the weights that previews and the
            model use (0: the weights of the last step).
        """
        loop, start = self.loop, time.perf_counter()
        loop.hold_rate(warmup_steps)
        for module in loop.modules.values():
            module.train()
        version, message, next_preview, last_read = 0, "", first_preview, start
        self.averaged = {name: copy.deepcopy(module) for name, module in loop.modules.items()}
        try:
            while not self._stop.is_set():
                step = loop.step + 1
                self.losses = loop.optimise(step)
                loop.step = step
                loop.live_update(step)
                # Bias-corrected as in TensorFlow's moving averages: early on, the random start weighs little.
                self._update_average(min(average, (1 + step) / (10 + step)))
                if step % refresh_every == 0 or time.perf_counter() - last_read >= refresh_seconds:
                    layers, last_read = read_drawings(), time.perf_counter()
                    if layers is not None:
                        try:
                            loop.take_drawings(layers)
                            version, message = version + 1, ""
                        except (AnnotationError, ValueError) as error:
                            message = f"drawings not taken in: {error}"
                elapsed = time.perf_counter() - start
                if elapsed < next_preview:
                    yield LiveStep(step, elapsed, self.losses, version, message)
                    continue
                plane, box, labels, draw_here = self._preview(read_region(), context)
                cost, elapsed = time.perf_counter() - start - elapsed, time.perf_counter() - start
                # Previews take at most a fifth of the time, so a large box slows them, not the training.
                next_preview = elapsed + max(preview_every, 4 * cost)
                yield LivePreview(step, elapsed, self.losses, version, message, plane, box, labels, draw_here)
        finally:
            self.seconds = time.perf_counter() - start
            for module in (*loop.modules.values(), *self.averaged.values()):
                use_channels_last(module, loop.device, on=False).cpu()
            release_device_memory(loop.device)

    @torch.no_grad()
    def _update_average(self, decay: float) -> None:
        """``averaged = decay * averaged + (1 - decay) * current`` for every weight and batch-norm statistic."""
        for name, module in self.loop.modules.items():
            current = [t for t in module.state_dict().values() if t.is_floating_point()]
            kept = [t for t in self.averaged[name].state_dict().values() if t.is_floating_point()]
            if kept:  # a run without transition heads has an empty head list
                torch._foreach_lerp_(kept, current, 1.0 - decay)

    def _preview(self, region, context: int):
        """Labels and draw-here map of ``region`` (the whole first plane when None), with ``context`` px around."""
        plane, box = region if region is not None else (0, None)
        image = self.images.planes[plane]
        height, width = image.shape[1:]
        if box is None:
            box = (slice(0, height), slice(0, width))
        box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, (height, width), strict=True))
        outer = tuple(slice(max(s.start - context, 0), min(s.stop + context, n))
                      for s, n in zip(box, (height, width), strict=True))
        inner = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(box, outer, strict=True))
        labels, draw_here = self.loop.live_maps([image[(slice(None), *outer)]], self.averaged)[0]
        return plane, box, labels[inner], draw_here[inner]

    def model(self) -> Model:
        """The session's model as it is now, with its card (save it with ``save_model``); call after :meth:`stop`."""
        model = self.loop.make_model(self.seconds, self.losses)
        if getattr(self, "averaged", None):  # the averaged weights are the session's model
            model.network.load_state_dict(self.averaged["network"].state_dict())
            if "heads" in self.averaged:
                model.heads.load_state_dict(self.averaged["heads"].state_dict())
        model.card["training"].update(steps=self.loop.step, live=True)
        return model
