"""The core imports and runs with no Qt binding, napari, magicgui or superqt installed.

A fresh interpreter gets a meta-path finder that makes every import of those
packages fail, as on a server without them; then it imports the package and
all its core modules, runs a tiny simulate-train-predict round trip, and
checks that none of the blocked packages was loaded.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
import textwrap

import napari_coarseseg

BLOCKED = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "superqt", "vispy", "npe2")
#: The napari side: the only modules that may import napari and Qt.
NAPARI_SIDE = ("_viewer", "_live_viewer", "_widgets")
#: Every other module of the package, found on disk (a new module is covered without editing this test).
MODULES = sorted(info.name.removeprefix("napari_coarseseg.")
                 for info in pkgutil.walk_packages(napari_coarseseg.__path__, "napari_coarseseg."))
CORE = tuple(name for name in MODULES if name not in NAPARI_SIDE)

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, sys

    BLOCKED = set({blocked!r})


    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: this test simulates a machine without a GUI")
            return None


    sys.meta_path.insert(0, Blocker())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]

    # the blocker works
    for name in sorted(BLOCKED):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"could import {{name}} despite the blocker")

    import napari_coarseseg
    for module in {core!r}:
        importlib.import_module("napari_coarseseg." + module)

    # a tiny headless round trip: simulate, train, save, load, predict
    import numpy as np, torch, tempfile, os
    torch.set_num_threads(1)
    from napari_coarseseg import simulate, train_refineseg, run_to_end, save_model, load_model, predict
    yy, xx = np.mgrid[:32, :32]
    mask = ((yy - 16) ** 2 + (xx - 16) ** 2 <= 64).astype(np.int64)
    image = (20 + 100 * mask).astype(np.float32)
    drawings = simulate(mask, erode=1, margin=2)
    model = run_to_end(train_refineseg(image, [drawings.positive], [drawings.negative], steps=2, base_channels=4,
                                       depth=2, patch_size=16, batch_size=2, device="cpu"))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.safetensors")
        save_model(model, path)
        assert predict(load_model(path), image, device="cpu").labels.shape == image.shape
    from napari_coarseseg.cli import build_parser
    build_parser().parse_args(["simulate", "labels.tif", "--out-dir", "out"])

    loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    if loaded:
        raise SystemExit(f"blocked GUI modules were loaded: {{loaded}}")
    print("HEADLESS-OK", len([m for m in sys.modules if m.startswith("napari_coarseseg")]))
    """
).format(blocked=BLOCKED, core=CORE)


def run_script(source: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_core_is_every_module_but_the_napari_side():
    assert {"methods", "methods._loop", "methods.refineseg", "methods.recursive", "inference", "cli"} <= set(CORE)
    assert not set(NAPARI_SIDE) & set(CORE)


def test_core_imports_and_runs_without_gui_packages():
    result = run_script(SCRIPT)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "HEADLESS-OK" in result.stdout
    n_modules = int(result.stdout.split("HEADLESS-OK")[1].split()[0])
    assert n_modules >= len(CORE) + 1


def test_the_blocker_catches_a_gui_import():
    """The harness is able to fail: an import of qtpy (here before the package's) makes the script exit non-zero."""
    source = SCRIPT.replace("import napari_coarseseg\n", "import qtpy\nimport napari_coarseseg\n", 1)
    assert source != SCRIPT
    result = run_script(source)
    assert result.returncode != 0
    assert "qtpy is blocked" in result.stderr
