"""Shared fixtures of the core unit tests: tiny synthetic images, a real 64 x 64 crop, tiny models.

Everything here is sized for a small shared CPU: 64 x 64 images, U-Nets of
4-8 channels and depth 2, a handful of training steps.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_coarseseg import run_to_end, simulate, train_refineseg
from napari_coarseseg.samples import load_dsb_nuclei

SIZE = 64
# (centre y, centre x, radius) of the bright discs of the synthetic image.
DISCS = [(16, 16, 8), (44, 20, 9), (24, 46, 7), (48, 48, 8)]
# Top-left corner of the 64 x 64 crop of the DSB 2018 sample: seven nuclei,
# several of them touching (exercises the instance erosion).
DSB_CROP = np.s_[192:256, 64:128]


def pytest_addoption(parser):
    parser.addoption("--cli-subprocess-memory", default=None, metavar="SIZE",
                     help="tests/test_hostile_inputs.py: run each command as its own process under "
                          "'prlimit --as=SIZE' (e.g. 4G) instead of in-process")


@pytest.fixture(scope="session", autouse=True)
def _few_torch_threads():
    """One torch thread.

    Measured on this 2-core machine while another process was busy: 150
    training steps of an 8-channel U-Net take 4.6 s with one thread and
    246 s with two (OpenMP threads spinning against the other process).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def disc_mask(size: int = SIZE, discs=DISCS) -> np.ndarray:
    """Class mask (int64) with value 1 inside each disc."""
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), dtype=np.int64)
    for cy, cx, r in discs:
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    return mask


def disc_image(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """Bright objects (120) on a dark background (20) with Gaussian noise (sigma 10)."""
    rng = np.random.default_rng(seed)
    return (20 + 100 * (mask > 0) + rng.normal(0, 10, mask.shape)).astype(np.float32)


@pytest.fixture(scope="session")
def discs():
    """A 64 x 64 float32 image of four bright discs and its 0/1 mask."""
    mask = disc_mask()
    return disc_image(mask), mask


@pytest.fixture(scope="session")
def disc_drawings(discs):
    """Simulated coarse drawings of the disc image (positive = eroded discs, negative = far background)."""
    _, mask = discs
    return simulate(mask, erode=(2, 3), margin=3, seed=0)


@pytest.fixture(scope="session")
def two_class():
    """A 64 x 64 image with class 1 discs and class 2 squares (one square touching a disc) and its mask."""
    mask = disc_mask(discs=[(16, 16, 8), (46, 46, 9)])
    mask[4:20, 36:56] = 2  # a square far from the discs
    mask[38:56, 8:24] = 2  # a square between the discs
    mask[28:38, 40:52] = 2  # a square overlapping (so touching) the disc at (46, 46)
    image = (20 + 60 * (mask == 1) + 120 * (mask == 2)).astype(np.float32)
    image += np.random.default_rng(1).normal(0, 5, mask.shape).astype(np.float32)
    return image, mask


@pytest.fixture(scope="session")
def dsb_crop():
    """A 64 x 64 crop of the DSB 2018 nuclei sample: (uint16 image, instance mask)."""
    image, labels = load_dsb_nuclei()
    image, labels = image[DSB_CROP], labels[DSB_CROP]
    assert image.shape == labels.shape == (SIZE, SIZE)
    assert len(np.unique(labels)) > 4, "the crop should hold several nuclei"
    return image, labels


TINY = dict(steps=5, base_channels=4, depth=2, patch_size=32, batch_size=2, evolution_every=0, device="cpu")


@pytest.fixture(scope="session")
def tiny_model(discs, disc_drawings):
    """A one-class refineseg model trained 5 steps on the disc image (one positive, one negative layer), with the
    paper's transition heads (the preset has none): the heads' files, reliability map and checks get exercised."""
    image, _ = discs
    return run_to_end(train_refineseg(image, [disc_drawings.positive], [disc_drawings.negative], seed=0,
                                      transition_heads="all", **TINY))


@pytest.fixture(scope="session")
def disc_model(discs, disc_drawings):
    """A refineseg model trained 150 steps on the disc image: small (8 channels, depth 2) but good."""
    image, _ = discs
    # A faster learning rate than the default 1e-3: 150 steps of a tiny network.
    settings = dict(TINY, steps=150, base_channels=8, batch_size=4, learning_rate=3e-3, transition_heads="all")
    return run_to_end(train_refineseg(image, [disc_drawings.positive], [disc_drawings.negative], seed=0, **settings))


@pytest.fixture(scope="session")
def tiny_two_class_model(two_class):
    """A two-class refineseg model trained 5 steps on the disc-and-square image, with transition heads."""
    image, mask = two_class
    drawings = simulate(mask, erode=(1, 2), margin=3, seed=0)
    return run_to_end(train_refineseg(image, [drawings.positive], [drawings.negative], seed=0, transition_heads="all",
                                      **TINY))


# --------------------------------------------------------------------------- napari (GUI tests only)

#: Fixtures that open a napari window or drive Qt: a test using one needs a (virtual) screen.
GUI_FIXTURES = {"make_napari_viewer", "qtbot", "drawn_viewer"}


def pytest_collection_modifyitems(config, items):
    """Every test that opens a viewer or drives Qt carries the ``gui`` marker, so ``-m "not gui"`` runs headless."""
    unmarked = [item.nodeid for item in items
                if GUI_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("gui") is None]
    if unmarked:
        raise pytest.UsageError(f"tests that open a viewer need @pytest.mark.gui: {unmarked}")



@pytest.fixture
def errors(monkeypatch):
    """Messages of the error notifications the viewer functions and widgets show."""
    from napari_coarseseg import _live_viewer, _viewer, _widgets

    shown = []
    monkeypatch.setattr(_viewer, "show_error", shown.append)
    monkeypatch.setattr(_widgets, "show_error", shown.append)
    monkeypatch.setattr(_live_viewer, "show_error", shown.append)
    monkeypatch.setattr(_live_viewer, "show_warning", shown.append)
    return shown


@pytest.fixture(autouse=True)
def _private_checkpoint_folder(tmp_path, monkeypatch):
    """The Train widget's checkpoints go to the test's folder, never to the user's cache."""
    monkeypatch.setenv("NAPARI_COARSESEG_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def drawn_viewer(make_napari_viewer, discs, disc_drawings):
    """A viewer with the disc image ("discs") and layers "positive", "negative", "partial", "exact"."""
    viewer = make_napari_viewer()
    image, mask = discs
    viewer.add_image(image, name="discs")
    viewer.add_labels(disc_drawings.positive.copy(), name="positive")
    viewer.add_labels(disc_drawings.negative.copy(), name="negative")
    viewer.add_labels(disc_drawings.partial.copy(), name="partial")
    viewer.add_labels(mask.astype(np.uint8), name="exact")
    return viewer


@pytest.fixture
def import_benchmark(monkeypatch):
    """``import_benchmark(name)`` imports a script of benchmarks/ (not a package) as a module; the test's
    imports of benchmark modules are forgotten afterwards, so each test reads them afresh."""
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    before = set(sys.modules)
    yield importlib.import_module
    for name in set(sys.modules) - before:
        if Path(getattr(sys.modules[name], "__file__", None) or "").parent == benchmarks:
            sys.modules.pop(name, None)
