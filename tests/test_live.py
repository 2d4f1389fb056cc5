"""Live sessions: the network follows strokes the user keeps adding, and its preview follows the network.

Headless: new strokes are taken in without a restart (same weights, same
optimiser) and learned first; refused drawings keep the old ones; a session
starts from a model only of the same method, classes and channels. In
napari, on the real DSB sample with strokes on one quadrant, more painted
there every 5 s for the first 55 s: the first preview within 5 s, every
stroke taken in, corrections painted through ``data_setitem`` lower the
errors where they were painted within 30 s, the event loop never stalls
300 ms, stop within 5 s, and the user's layers are never written; the "draw
here next" map's top 10 % hold at least twice the average error rate; the
whole image's Dice after 60 s is at least 0.85 and the corrections halve
the errors where they were painted within 30 s (benchmarks/live.py measures
the same on three annotators).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_coarseseg import predict
from napari_coarseseg.annotations import simulate, simulate_corrections
from napari_coarseseg.live import LivePreview, LiveTraining
from napari_coarseseg.methods.refineseg import LIVE_SETTINGS
from napari_coarseseg.metrics import dice

from conftest import disc_image, disc_mask

TINY = dict(base_channels=4, depth=2, patch_size=32, batch_size=2, device="cpu")
TINY_RECURSIVE = dict(base_channels=8, depth=2, patch_size=32, batch_size=4, device="cpu")


def test_new_strokes_are_taken_in_with_the_same_weights_and_optimiser_and_learned_first(discs, disc_drawings):
    image, mask = discs
    positive, negative = disc_drawings.positive, disc_drawings.negative
    session = LiveTraining(image, {"positive": [positive], "negative": [negative]}, **TINY)
    optimiser, network = session.loop.optimizer, session.loop.network
    more = positive.copy()
    more[(mask > 0) & (positive == 0) & (np.arange(64)[None, :] < 20)] = 1  # strokes added on the left discs
    offers = iter([None, {"positive": [more], "negative": [negative]}])
    events = []
    for event in session.run(lambda: next(offers, None), refresh_every=5, refresh_seconds=float("inf"),
                             first_preview=1e9):
        events.append(event)
        if event.step == 12:
            session.stop()
    assert [e.drawings_version for e in events][4:6] == [0, 0] and events[9].drawings_version == 1
    assert session.loop.optimizer is optimiser and session.loop.network is network and session.loop.step == 12
    changed = (more != positive)
    sampler = session.loop.sampler
    assert sampler.focus_fraction == 0.5 and sorted(sampler.focus_index) == sorted(np.flatnonzero(changed))
    # The new strokes are corrections: exact, they meet the network's p without a transition head.
    assert np.array_equal(session.loop.trusted[0], changed)
    # Half of the drawn-pixel patches centre on the new strokes (5 % of the drawn pixels).
    centres = sampler.centres(4000)
    on_new = changed[centres[:, 1], centres[:, 2]].mean()
    assert 0.3 < on_new < 0.5


def test_drawings_are_read_every_refresh_seconds_when_steps_are_slow(discs, disc_drawings):
    image, _ = discs
    layers = {"positive": [disc_drawings.positive], "negative": [disc_drawings.negative]}
    session = LiveTraining(image, layers, **TINY)
    reads = []
    for event in session.run(lambda: reads.append(session.loop.step) or None, refresh_every=1000, refresh_seconds=0.35,
                             first_preview=1e9):
        time.sleep(0.1)  # a slow step
        if event.step == 12:
            session.stop()
    # About every 3rd step (0.35 s of 0.1-s steps), never every step; the 1000 steps of the rule never come.
    gaps = np.diff(reads)
    assert 2 <= len(reads) <= 6 and gaps.min() >= 2, reads


def test_refused_drawings_are_reported_and_the_old_ones_kept(discs, disc_drawings):
    image, _ = discs
    layers = {"positive": [disc_drawings.positive], "negative": [disc_drawings.negative]}
    session = LiveTraining(image, layers, **TINY)
    erased = {"positive": [np.zeros_like(disc_drawings.positive)], "negative": [disc_drawings.negative]}
    for event in session.run(lambda: erased, refresh_every=2, first_preview=1e9):
        if event.step == 4:
            session.stop()
    assert event.drawings_version == 0 and "not taken in" in event.message and "positive" in event.message
    assert (session.loop.targets()[0][0] >= 0).sum() == (disc_drawings.positive > 0).sum()


def test_a_session_without_transition_heads_averages_the_network_alone(discs, disc_drawings):
    # Control (a) of the benchmarks: no heads, so the averaged head list is empty (it used to crash the average).
    image, _ = discs
    layers = {"positive": [disc_drawings.positive], "negative": [disc_drawings.negative]}
    session = LiveTraining(image, layers, transition_heads="none", **TINY)
    for event in session.run(first_preview=1e9):
        if event.step == 3:
            session.stop()
    assert len(session.averaged["heads"]) == 0 and session.model().card["training"]["steps"] == 3
    for mine, averaged in zip(session.model().network.state_dict().values(),
                              session.averaged["network"].state_dict().values(), strict=True):
        assert torch.equal(mine, averaged)

def test_a_session_learns_the_prior_itself_and_its_model_predicts_what_the_preview_showed(discs, disc_drawings):
    # Live settings: undrawn pixels as weak background and the smoothness term in the loss, no prior correction.
    image, _ = discs
    layers = {"positive": [disc_drawings.positive], "negative": [disc_drawings.negative]}
    session = LiveTraining(image, layers, **TINY)
    assert {name: getattr(session.config, name) for name in LIVE_SETTINGS} == LIVE_SETTINGS
    assert LiveTraining(image, layers, undrawn_weight=0, **TINY).config.undrawn_weight == 0  # the caller's wins
    for event in session.run(first_preview=0, preview_every=0):
        if isinstance(event, LivePreview) and event.step >= 3:
            session.stop()  # the last event: the model then is the preview's
    assert isinstance(event, LivePreview) and event.losses["undrawn"] > 0 and event.losses["smoothness"] > 0
    model = session.model()
    assert model.card["prior"]["strength"] == 0
    assert np.mean(predict(model, image, device="cpu").labels == event.labels) > 0.999


def test_a_session_starts_from_a_model_of_the_same_method_classes_and_channels(discs, disc_drawings,
                                                                              tiny_model, tiny_two_class_model):
    image, _ = discs
    layers = {"positive": [disc_drawings.positive], "negative": [disc_drawings.negative]}
    settings = {**TINY, "base_channels": tiny_model.card["network"]["base_channels"]}
    session = LiveTraining(image, layers, init=tiny_model, **settings)
    for mine, theirs in zip(session.loop.network.state_dict().values(), tiny_model.network.state_dict().values(),
                            strict=True):
        assert np.array_equal(mine.numpy(), theirs.numpy())
    with pytest.raises(ValueError, match="n_classes 2"):
        LiveTraining(image, layers, init=tiny_two_class_model, **settings)
    with pytest.raises(ValueError, match="base_channels"):
        LiveTraining(image, layers, init=tiny_model, **{**settings, "base_channels": 8})


def test_a_recursive_session_grows_its_regions_takes_in_new_ones_at_once_and_segments_an_undrawn_slice(discs):
    # A stack: slice 0 exact mask + partial regions, slice 1 partial regions on the left discs only (the right
    # ones are painted during the session), slice 2 another layout, undrawn: the preview scored there.
    image, mask = discs
    other = disc_mask(discs=[(14, 40, 8), (40, 14, 8), (46, 46, 9)])
    stack = np.stack([image, disc_image(mask, 1), disc_image(other, 2)])
    partial = simulate(mask, seed=0).partial
    left = partial * (np.arange(64)[None, :] < 32)
    strong = np.stack([mask, 0 * mask, 0 * mask])
    layers = {"partial": [np.stack([partial, left, 0 * mask])], "strong": [strong]}
    session = LiveTraining(stack, layers, "recursive", steps=15, **TINY_RECURSIVE)  # growths at 15, 30, ...
    optimiser, network = session.loop.optimizer, session.loop.network
    more = {"partial": [np.stack([partial, partial, 0 * mask])], "strong": [strong]}
    offers = iter([None] * 3 + [more])
    before = {}
    for event in session.run(lambda: next(offers, None), read_region=lambda: (2, np.s_[:, :]), refresh_every=10,
                             first_preview=0, preview_every=0):
        if event.step == 30:  # two growths done; the right regions of slice 1 come at the read of step 40
            before = {i: session.loop.masks.seeds[i].copy() for i in (0, 1)}
        if event.step == 40:
            assert event.drawings_version == 1
            masks = session.loop.masks
            # Slice 0's drawing did not change: it keeps its grown regions.
            assert np.array_equal(masks.seeds[0], before[0])
            right = (np.arange(64)[None, :] >= 32) & (partial > 0)
            # Slice 1's new regions grew at once (towards T1's foreground of the last growth), beyond the drawing.
            grown_right = (masks.seeds[1] > 0) & (np.arange(64)[None, :] >= 32)
            assert grown_right.sum() > 1.2 * right.sum() and (masks.seeds[1][right] > 0).all()
        if event.step >= 120 and isinstance(event, LivePreview):  # previews come at most every 4 x their cost
            session.stop()
    assert session.loop.optimizer is optimiser and session.loop.network is network
    assert len(session.loop.pixels_added) == event.step // 15 and sum(session.loop.pixels_added[:2]) > 0
    # Every region only grew, and the grown regions of slice 0 stay inside the exact mask's objects.
    assert np.all(session.loop.masks.seeds[0][partial > 0] > 0)
    assert np.mean(mask[session.loop.masks.seeds[0] > 0] > 0) > 0.95
    assert isinstance(event, LivePreview) and dice(event.labels > 0, other > 0) >= 0.85
    assert 0 <= event.draw_here.min() and event.draw_here.max() <= 1
    # Interface scribbles need a network with the interface task: refused, the old drawings kept.
    session = LiveTraining(stack, layers, "recursive", steps=10, **TINY_RECURSIVE)
    scribbles = {**layers, "separation": [np.stack([mask * 0, mask * 0, other])]}
    for event in session.run(lambda: scribbles, refresh_every=2, first_preview=1e9):
        if event.step == 4:
            session.stop()
    assert event.drawings_version == 0 and "interface" in event.message
    assert session.model().card["method"] == "recursive"


# ---------------------------------------------------------------------------------------------------- napari

pytest.importorskip("napari")


@pytest.fixture
def two_threads():
    """The user's 2 cores (the suite runs on one torch thread, see conftest)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.gui
def test_live_session_on_the_sample_previews_fast_follows_corrections_and_never_blocks(make_napari_viewer, qtbot,
                                                                                      errors, two_threads):
    from qtpy.QtCore import QTimer

    from napari_coarseseg import live_in_viewer
    from napari_coarseseg._live_viewer import draw_here_layer_name
    from napari_coarseseg.samples import load_dsb_nuclei

    image, truth = load_dsb_nuclei()
    quadrant = np.zeros(truth.shape, bool)
    quadrant[:256, :256] = True
    drawn = simulate(np.where(quadrant, truth, 0), instances=True, style="scribble", seed=0)
    strokes = {"nuclei": (drawn.positive * quadrant).astype(np.uint8),
               "not nuclei": (drawn.negative * quadrant).astype(np.uint8)}
    # The user keeps drawing on the quadrant: a second annotator's strokes there, cut into 11 pieces (by
    # connected stroke), are painted one every 5 s from 5 to 55 s.
    more = simulate(np.where(quadrant, truth, 0), instances=True, style="scribble", seed=1)
    more = {"nuclei": (more.positive > 0) & quadrant & (strokes["nuclei"] == 0),
            "not nuclei": (more.negative > 0) & quadrant & (strokes["not nuclei"] == 0)}
    piece = {name: np.where(extra, ndimage.label(extra)[0] % 11, -1) for name, extra in more.items()}
    viewer = make_napari_viewer()
    viewer.add_image(image, name="dsb")
    for name, layer in strokes.items():
        viewer.add_labels(layer, name=name)
    before = {layer.name: layer.data.copy() for layer in viewer.layers}
    viewer.layers.selection.active = viewer.layers["nuclei"]
    viewer.reset_view()  # the whole image in view: the preview covers what is in view

    ticks, previews = [], []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    started = time.perf_counter()
    session = live_in_viewer(viewer, "dsb", positive="nuclei", negative="not nuclei", device="cpu", seed=0,
                             on_event=lambda e: previews.append((time.perf_counter() - started, e))
                             if isinstance(e, LivePreview) else None)
    assert session is not None and errors == []
    qtbot.waitUntil(lambda: "dsb evolution" in viewer.layers, timeout=5_000)  # the layers come one per loop turn
    layers_made = time.perf_counter()
    # The prediction over the image, the draw-here map below it and hidden; the user's selection kept.
    names = [layer.name for layer in viewer.layers]
    assert names.index("dsb") < names.index(draw_here_layer_name("dsb")) < names.index("dsb prediction")
    assert not viewer.layers[draw_here_layer_name("dsb")].visible
    assert viewer.layers.selection.active is viewer.layers["nuclei"]

    qtbot.waitUntil(lambda: bool(previews), timeout=10_000)
    first_preview = previews[0][0]
    for k in range(11):
        qtbot.wait(int(max(5 * (k + 1) - (time.perf_counter() - started), 0) * 1000))
        for name in strokes:
            if (here := piece[name] == k).any():
                viewer.layers[name].data_setitem(np.nonzero(here), 1)
    qtbot.wait(int(max(60 - (time.perf_counter() - started), 0) * 1000))
    # Every stroke painted by now, and taken in by the session (it re-reads the layers every 10 steps or 1 s).
    for strategy, name in enumerate(strokes):
        drawn_now = (strokes[name] > 0) | more[name]
        assert np.array_equal(viewer.layers[name].data > 0, drawn_now)
        assert (session.training.loop.targets()[strategy][0] >= 0).sum() == drawn_now.sum()
    prediction = viewer.layers["dsb prediction"].data.copy()
    after_60s = dice(prediction > 0, truth > 0)
    # "Draw here next" points at the errors: its top 10 % hold at least twice the error rate of the image.
    wrong, draw_here = (prediction > 0) != (truth > 0), viewer.layers[draw_here_layer_name("dsb")].data
    error_ratio = wrong[draw_here >= np.quantile(draw_here, 0.9)].mean() / wrong.mean()

    # Corrections on the preview's worst mistakes, painted as napari's brush does.
    positive, negative, regions = simulate_corrections(prediction, truth)
    errors_before = ((prediction > 0) != (truth > 0))[regions].sum()
    viewer.layers["nuclei"].data_setitem(np.nonzero(positive), 1)
    viewer.layers["not nuclei"].data_setitem(np.nonzero(negative), 1)
    painted = time.perf_counter()
    qtbot.wait(30_000)
    corrected = viewer.layers["dsb prediction"].data
    errors_after = ((corrected > 0) != (truth > 0))[regions].sum()
    last_preview = previews[-1][0] + started - painted

    print(f"first preview {first_preview:.1f} s, Dice after 60 s {after_60s:.3f}, draw-here error ratio "
          f"{error_ratio:.1f}, corrections {positive.sum()} + {negative.sum()} px, errors in corrected regions "
          f"{errors_before} -> {errors_after}, "
          f"steps {session.training.loop.step}, previews {len(previews)}")
    stop_started = time.perf_counter()
    assert session.stop(timeout=5)
    stop_seconds = time.perf_counter() - stop_started
    qtbot.waitUntil(lambda: not session.worker.is_running, timeout=5_000)
    timer.stop()

    assert errors == []
    assert previews[-1][1].box == (slice(0, 512), slice(0, 512))
    assert first_preview <= 5, f"first preview after {first_preview:.1f} s"
    # Issue 16: the whole image's Dice after 60 s >= 0.85, and the errors in the corrected regions halved within
    # 30 s. With the live settings (no prior correction, undrawn pixels as weak background) this test gave 0.892
    # and 0.910, errors 3296 -> 689 and 2413 -> 399 (idle 2 cores, 240 and 225 steps; 0.915 without the strokes
    # added every 5 s); benchmarks/live.py's three annotators 0.898-0.928 after 60 s and 0.877-0.892 after 30 s.
    # With the layers read every second as well: 0.898, errors 3152 -> 1219 (158 steps).
    assert after_60s >= 0.85, f"whole-image Dice after 60 s {after_60s:.3f}"
    assert errors_after <= errors_before / 2, f"errors in the corrected regions {errors_before} -> {errors_after}"
    assert error_ratio >= 2, f"the top 10 % of 'draw here next' hold {error_ratio:.1f} x the mean error rate"
    # The corrections go where the preview is wrong by a stroke's width or more. A preview that invents (or
    # misses) no object that wide gets corrections of the other kind only, as a user would paint them (this
    # failed a fresh-clone run once: three runs since painted 2-3 positive px and 436-788 negative); strokes of
    # both kinds painted mid-session are taken in above.
    assert positive.any() or negative.any(), "the preview had no mistake wide enough for a correction stroke"
    assert last_preview > 5, f"the last preview came {last_preview:.1f} s after the corrections"
    assert stop_seconds <= 5
    # Once its layers are made (napari's own 0.2-0.4 s per new layer, one per turn of the loop), the session
    # never stalls the viewer.
    ticks = np.array(ticks)
    stall = np.diff(ticks[ticks >= layers_made]).max()
    assert stall < 0.3, f"event loop blocked for {stall * 1000:.0f} ms"
    assert viewer.layers["dsb evolution"].data.shape[0] == len(previews) + 1
    model = session.model()
    assert model.card["training"]["live"] and model.card["training"]["steps"] == session.training.loop.step
    # The user's layers hold what was painted on them, nothing more: the session never writes them.
    painted_pixels = {"nuclei": more["nuclei"] | (positive > 0), "not nuclei": more["not nuclei"] | (negative > 0)}
    for name, data in before.items():
        unpainted = ~painted_pixels.get(name, np.zeros(data.shape, bool))
        np.testing.assert_array_equal(viewer.layers[name].data[unpainted], data[unpainted])


@pytest.mark.gui
def test_a_stack_previews_the_slice_and_box_in_view_only(make_napari_viewer, qtbot, errors, discs, disc_drawings):
    from napari_coarseseg import live_in_viewer
    from napari_coarseseg._live_viewer import draw_here_layer_name

    image, _ = discs
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([image] * 3), name="stack")
    viewer.add_labels(np.stack([disc_drawings.positive] * 3), name="in")
    viewer.add_labels(np.stack([disc_drawings.negative] * 3), name="out")
    viewer.dims.set_current_step(0, 1)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9 : before
    camera.center, camera.zoom = (1, 16, 16), 40  # a corner of slice 1 fills the canvas
    previews = []
    session = live_in_viewer(viewer, "stack", positive="in", negative="out", first_preview=0, preview_every=0.1,
                             on_event=lambda e: previews.append(e) if isinstance(e, LivePreview) else None, **TINY)
    qtbot.waitUntil(lambda: len(previews) >= 2, timeout=60_000)
    # Removing the image (as closing the viewer does) ends the session; what it still yields is dropped.
    viewer.layers.remove("stack")
    qtbot.waitUntil(lambda: not session.worker.is_running, timeout=5_000)
    assert not session.running and session.training.stopped
    assert errors == [] and "stack evolution" not in viewer.layers  # the history of a stack is not kept
    box = previews[-1].box
    height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
    assert previews[-1].plane == 1 and 0 < height < 64 and 0 < width < 64
    # Only the slice and box in view were predicted: the rest of the draw-here layer is still empty.
    shown = viewer.layers[draw_here_layer_name("stack")].data
    assert (shown[(1, *box)] > 0).mean() > 0.9
    outside = np.ones(shown.shape, bool)
    outside[(1, *box)] = False
    assert not shown[outside].any()
    assert viewer.layers["stack prediction"].data.shape == (3, 64, 64)
