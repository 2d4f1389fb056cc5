"""Every command, given what a hostile but realistic user gives it (issue 30): one line, a non-zero exit, inputs
untouched, nothing left behind.

The rule, turned into a test: for each case below, ``coarseseg ARGS`` run in a
copy of a small workspace must

- exit with a non-zero status,
- print exactly one line on stderr, ``coarseseg COMMAND: error: ...``, that
  names the problem (the case's words), and no traceback,
- leave every file of the workspace byte-identical, and
- create no file or folder.

Cases run in-process (:func:`napari_coarseseg.cli.main`), with the free memory
capped at 4 GB as ``prlimit --as`` would. ``pytest tests/test_hostile_inputs.py
--cli-subprocess-memory 4G`` runs each one instead as its own ``python -m
napari_coarseseg.cli`` process under ``prlimit --as=4G``, which also shows that
none is killed or ends in a traceback under that cap (the cases that need a
patched ``os.access``, a permission a root user cannot lose, run in-process
only).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from napari_coarseseg import load_model, resources
from napari_coarseseg.cli import main
from napari_coarseseg.samples import load_dsb_nuclei

#: What the in-process cases may allocate, as under ``prlimit --as=4G``.
MEMORY_CAP = 4 * 2**30
TINY_PRESET = {"steps": 2, "patch_size": 32, "batch_size": 2, "base_channels": 4, "depth": 2, "evolution_every": 1}


# --------------------------------------------------------------------------- the workspace


def tampered(model: Path, out: Path, edit) -> None:
    """A copy of ``model`` whose card ``edit(card)`` changed, weights untouched (what a hand-edited file is)."""
    with safe_open(str(model), framework="pt") as f:
        card = json.loads(f.metadata()["coarseseg_card"])
    edit(card)
    save_file(load_file(str(model)), str(out), metadata={"coarseseg_card": json.dumps(card)})


def _set(path: str, value):
    """An ``edit`` for :func:`tampered`: ``card[a][b] = value`` for ``path`` ``"a.b"``."""
    def edit(card):
        *parents, key = path.split(".")
        node = card
        for parent in parents:
            node = node[parent]
        node[key] = value
    return edit


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A workspace of small real files: a 64 x 64 crop of the nuclei sample, its drawings, odd variants of them,
    a tiny model and tampered copies of it, a zarr store."""
    from napari_coarseseg import run_to_end, simulate, train_refineseg
    from napari_coarseseg.model_io import save_model

    root = tmp_path_factory.mktemp("hostile")
    image, labels = load_dsb_nuclei()
    image, mask = image[192:256, 64:128], (labels[192:256, 64:128] > 0).astype(np.uint8)
    drawings = simulate(mask, seed=0)
    files = {
        "img.tif": image, "labels.tif": mask, "pos.tif": drawings.positive.astype(np.uint8),
        "neg.tif": drawings.negative.astype(np.uint8),
        "pos255.tif": (drawings.positive > 0).astype(np.uint8) * 255, "mask255.tif": mask * 255,
        "pos300.tif": np.where(drawings.positive > 0, 300, 0).astype(np.uint16),
        "image8.tif": (image / max(image.max(), 1) * 255).astype(np.uint8),
        "complex.tif": (image + 1j * image).astype(np.complex64),
    }
    # A drawing of class 190 somewhere: 191 labels, a step of 160 GB with refineseg's transition heads.
    files["pos190.tif"] = drawings.positive.astype(np.uint8)
    files["pos190.tif"][0, 0] = 190
    for name, array in files.items():
        tifffile.imwrite(root / name, array)
    (root / "drawings").mkdir()
    for name in ("positive", "negative", "partial"):
        tifffile.imwrite(root / "drawings" / f"{name}.tif", getattr(drawings, name).astype(np.uint8))
    (root / "images").mkdir()
    tifffile.imwrite(root / "images" / "img.tif", image)
    (root / "tiny.json").write_text(json.dumps(TINY_PRESET))
    (root / "broken.json").write_text('{"steps": 2,\n')
    (root / "a_file").write_text("not a folder")
    model = run_to_end(train_refineseg(image, [drawings.positive], [drawings.negative], device="cpu", seed=0,
                                       **TINY_PRESET))
    save_model(model, root / "model.safetensors")
    for name, edit in {"prior_nan": _set("prior.estimated", [float("nan"), 0.5]),
                       "prior_zeros": _set("prior.estimated", [0.0, 0.0]),
                       "depth12": _set("network.depth", 12), "width1e7": _set("network.base_channels", 1e7),
                       "low_x": _set("normalisation.low", "x"), "high150": _set("normalisation.high", 150.0),
                       "classes1e5": _set("n_classes", 100000)}.items():
        tampered(root / "model.safetensors", root / f"{name}.safetensors", edit)
    import zarr

    store = zarr.create_array(str(root / "in.zarr"), shape=image.shape, chunks=(32, 32), dtype=image.dtype)
    store[...] = image
    return root


@dataclass(frozen=True)
class Case:
    """One hostile command: its arguments, the words its one line must hold, and the workspace it needs."""

    args: str
    words: tuple[str, ...]
    setup: str | None = None  # a name in SETUPS
    patches_access: bool = False  # needs os.access patched (a root user cannot lose a permission): in-process only


def _symlink(ws: Path) -> None:
    (ws / "link.tif").symlink_to(ws / "img.tif")


def _hardlink(ws: Path) -> None:
    os.link(ws / "img.tif", ws / "hard.tif")


def _out_folder(ws: Path) -> None:
    (ws / "model_out.safetensors").mkdir()


SETUPS = {"symlink": _symlink, "hardlink": _hardlink, "out_folder": _out_folder}

#: Which paths os.access denies in a case that patches it (relative to the workspace), and for what.
DENIED = {"unreadable model": ("model.safetensors", os.R_OK), "unreadable folder": ("images", os.R_OK),
          "read-only output folder": ("images", os.W_OK), "read-only --out-dir": ("images", os.W_OK)}

TRAIN = "train img.tif --positive pos.tif --negative neg.tif --preset tiny.json --quiet"
PREDICT = "predict model.safetensors img.tif --quiet"

CASES = {
    # Outputs never alias inputs: data lost with exit 0 before.
    "predict --out is the image": Case(f"{PREDICT} --out img.tif", ("--out", "img.tif", "input")),
    "predict --probabilities is the image": Case(f"{PREDICT} --out p.tif --probabilities img.tif",
                                                 ("--probabilities", "input")),
    "predict --reliability is the image": Case(f"{PREDICT} --out p.tif --reliability img.tif",
                                               ("--reliability", "input")),
    "predict --out is the model": Case(f"{PREDICT} --out model.safetensors", ("--out", ".tif")),
    "predict a folder into itself": Case("predict model.safetensors images --out images --quiet",
                                         ("--out", "input")),
    "predict --out into the image's folder": Case(f"{PREDICT} --out .", ("--out", "input")),
    "predict --out is a symlink to the image": Case(f"{PREDICT} --out link.tif", ("--out", "input"), "symlink"),
    "predict --out is a hard link to the image": Case(f"{PREDICT} --out hard.tif", ("--out", "input"), "hardlink"),
    "predict --out names the image another way": Case(f"{PREDICT} --out images/../img.tif", ("--out", "input")),
    "predict --out and --probabilities the same": Case(f"{PREDICT} --out p.tif --probabilities p.tif",
                                                       ("--out", "--probabilities", "same file")),
    "train --evolution is the image": Case(f"{TRAIN} --out m.safetensors --evolution img.tif",
                                           ("--evolution", "input")),
    "train --evolution is a drawing": Case(f"{TRAIN} --out m.safetensors --evolution pos.tif",
                                           ("--evolution", "input", "--positive")),
    "train --out is the --init model": Case(f"{TRAIN} --out model.safetensors --init model.safetensors",
                                            ("--out", "--init")),
    "train --out is the preset": Case(f"{TRAIN} --out tiny.json", ("--out", ".safetensors")),
    "train the image as its own drawing": Case(
        "train img.tif --positive img.tif --negative neg.tif --out m.safetensors", ("--positive", "image itself")),
    "simulate over its own input": Case("simulate drawings/partial.tif --out-dir drawings",
                                        ("--out-dir", "partial.tif", "input")),
    "export --out is the model": Case("export model.safetensors --out model.safetensors", ("--out", ".zip")),
    # Label values checked at the door: a traceback while allocating 16-640 GB, or the kernel's kill, before.
    "train a 0/255 drawing": Case(f"{TRAIN} --out m.safetensors".replace("pos.tif", "pos255.tif"),
                                  ("0 and 255", "--binary")),
    "train a drawing holding 300": Case(f"{TRAIN} --out m.safetensors".replace("pos.tif", "pos300.tif"),
                                        ("300", "image")),
    # As the tester ran them, with transition heads: 160-280 GB by the class count. Without heads the memory is no
    # guard: the count itself is (no more than MANY_CLASSES inferred from the drawings' largest value).
    "train an image as a drawing": Case("train img.tif --positive image8.tif --negative neg.tif --out m.safetensors",
                                        ("255-class", "--classes")),
    "train a drawing of class 190": Case("train img.tif --positive pos190.tif --negative neg.tif --out m.safetensors",
                                         ("190-class", "--classes 190")),
    "train --classes 100000": Case(f"{TRAIN} --out m.safetensors --classes 100000", ("--classes", "255")),
    "simulate a 0/255 mask": Case("simulate mask255.tif --out-dir out", ("0 and 255", "--binary")),
    # Model cards validated as data: all-background predictions with exit 0, or tracebacks, before.
    "predict with a NaN prior": Case("predict prior_nan.safetensors img.tif --out p.tif", ("prior",)),
    "predict with a zero prior": Case("predict prior_zeros.safetensors img.tif --out p.tif", ("prior",)),
    "predict with depth 12": Case("predict depth12.safetensors img.tif --out p.tif", ("depth",)),
    "predict with base_channels 1e7": Case("predict width1e7.safetensors img.tif --out p.tif", ("base_channels",)),
    "predict with 100000 classes": Case("predict classes1e5.safetensors img.tif --out p.tif", ("n_classes",)),
    "predict with normalisation.low 'x'": Case("predict low_x.safetensors img.tif --out p.tif", ("low",)),
    "predict with a percentile of 150": Case("predict high150.safetensors img.tif --out p.tif", ("high",)),
    "export a model with a NaN prior": Case("export prior_nan.safetensors --out x.zip", ("prior",)),
    "predict --prior-strength inf": Case(f"{PREDICT} --out p.tif --prior-strength inf", ("--prior-strength",)),
    "predict --prior-strength 1e6": Case(f"{PREDICT} --out p.tif --prior-strength 1e6", ("--prior-strength",)),
    # Formats by extension, complex images.
    "predict a complex image": Case("predict model.safetensors complex.tif --out p.tif", ("complex",)),
    "train on a complex image": Case(f"{TRAIN} --out m.safetensors".replace("img.tif", "complex.tif", 1),
                                     ("complex",)),
    "train --evolution as .png": Case(f"{TRAIN} --out m.safetensors --evolution evo.png", ("--evolution", ".tif")),
    "predict a zarr into a .tif": Case("predict model.safetensors in.zarr --out labels.tif", ("--out", ".zarr")),
    "predict --resume with nothing to resume": Case("predict model.safetensors in.zarr --out out.zarr --resume",
                                                    ("--resume",)),
    "predict --scheduler not a url": Case("predict model.safetensors in.zarr --out out.zarr --scheduler notaurl",
                                          ("--scheduler", "tcp://")),
    # Checks before work, nothing left behind.
    "train --out is a folder": Case(f"{TRAIN} --out model_out.safetensors", ("--out", "folder"), "out_folder"),
    "demo --steps 0": Case("demo --out-dir d --steps 0", ("--steps",)),
    "train --resume with no checkpoint": Case(f"{TRAIN} --out m.safetensors --resume", ("--resume", "checkpoint")),
    "read-only output folder": Case(f"{PREDICT} --out images/p.tif", ("images", "permission"), patches_access=True),
    "read-only --out-dir": Case("simulate labels.tif --out-dir images/sim", ("images", "permission"),
                                patches_access=True),
    # Messages that say what to fix.
    "unreadable model": Case(f"{PREDICT} --out p.tif", ("model.safetensors", "permission", "chmod"),
                             patches_access=True),
    "unreadable folder": Case("predict model.safetensors images --out . --quiet", ("images", "permission"),
                              patches_access=True),
    "huge --seed": Case(f"{TRAIN} --out m.safetensors --seed 99999999999999999999", ("--seed", "0 to")),
    "negative --seed": Case(f"{TRAIN} --out m.safetensors --seed -5", ("--seed", "0 to")),
    "broken preset JSON": Case(f"{TRAIN} --out m.safetensors".replace("tiny.json", "broken.json"),
                               ("broken.json", "JSON")),
    "an existing file as --out-dir": Case("simulate labels.tif --out-dir a_file", ("--out-dir", "file")),
    "demo --out-dir is a file": Case("demo --out-dir a_file --steps 1", ("--out-dir", "file")),
    "--spacing -1,1": Case("predict model.safetensors img.tif --out p.tif --spacing -1,1", ("--spacing", "positive")),
    "--steps abc": Case(f"{TRAIN} --out m.safetensors --steps abc", ("--steps", "abc")),
}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``: a file's SHA-256, a folder's "dir"."""
    state = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        state[key] = "dir" if path.is_dir() and not path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@pytest.fixture
def workspace(pristine, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the workspace, the current folder; free memory capped as ``prlimit --as=4G`` caps it."""
    ws = tmp_path / "ws"
    shutil.copytree(pristine, ws, symlinks=True)
    monkeypatch.chdir(ws)
    real = resources.free_memory
    monkeypatch.setattr(resources, "free_memory",
                        lambda device=None: min(real(device) or MEMORY_CAP, MEMORY_CAP))
    return ws


def deny(monkeypatch, ws: Path, relative: str, mode: int) -> None:
    """``os.access`` says no to ``mode`` on ``ws/relative``, as for a user without that permission."""
    denied = (ws / relative).resolve()
    real = os.access

    def access(path, wanted, *args, **kwargs):
        if Path(path).resolve() == denied and wanted & mode:
            return False
        return real(path, wanted, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def run_case(case: Case, ws: Path, capsys, memory: str | None) -> tuple[int, str, str]:
    """Run one case in-process, or as its own process under ``prlimit --as=MEMORY``."""
    args = case.args.split()
    if memory is None:
        capsys.readouterr()
        try:
            code = main(args)
        except SystemExit as exit:  # misuse of the command line: argparse's exit, status 2
            code = exit.code
        out, err = capsys.readouterr()
        return code, out, err
    # prlimit reads "4G" as 4 bytes: give it bytes.
    limit = int(float(memory.rstrip("KMGkmg")) * 1024 ** " KMG".index(memory[-1].upper() if memory[-1].isalpha()
                                                                       else " "))
    done = subprocess.run(["prlimit", f"--as={limit}", sys.executable, "-m", "napari_coarseseg.cli", *args],
                          cwd=ws, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_refused_in_one_line_and_leaves_everything_as_it_was(name, workspace, capsys, monkeypatch,
                                                                              request):
    case = CASES[name]
    memory = request.config.getoption("--cli-subprocess-memory")
    if memory is not None and case.patches_access:
        pytest.skip("needs os.access patched in this process")
    if case.setup:
        SETUPS[case.setup](workspace)
    if name in DENIED:
        deny(monkeypatch, workspace, *DENIED[name])
    before = snapshot(workspace)
    start = time.perf_counter()
    code, out, err = run_case(case, workspace, capsys, memory)
    seconds = time.perf_counter() - start
    command = case.args.split()[0]
    lines = [line for line in err.splitlines() if not line.startswith("done in")]
    assert code not in (0, -9, 137), f"exit {code}; stdout={out!r} stderr={err!r}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith(f"coarseseg {command}: error:"), lines[0]
    for word in case.words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"
    assert out == "", f"nothing may be reported as written: {out!r}"
    assert snapshot(workspace) == before, "a file was changed, created or removed"
    if memory is None:
        assert seconds < 5, f"refused after {seconds:.1f} s: the checks come before the work"


# --------------------------------------------------------------------------- what works instead


def test_a_0_255_drawing_trains_as_a_binary_mask_with_binary(workspace, capsys):
    """The advice works: ``--binary`` reads 0/255 as class 1, and the model is the one 0/1 drawings give."""
    start = time.perf_counter()
    code = main(f"{TRAIN} --out m255.safetensors --binary".replace("pos.tif", "pos255.tif").split())
    assert code == 0, capsys.readouterr().err
    assert load_model("m255.safetensors").n_classes == 1
    code = main(f"{TRAIN} --out m01.safetensors".split())
    assert code == 0
    assert time.perf_counter() - start < 30
    binary, plain = load_file("m255.safetensors"), load_file("m01.safetensors")
    assert binary.keys() == plain.keys()
    assert all(np.array_equal(binary[key].numpy(), plain[key].numpy()) for key in plain)  # same seed, same targets


def test_simulate_binary_reads_a_0_255_mask_as_class_1(workspace, capsys):
    assert main("simulate mask255.tif --out-dir sim --binary".split()) == 0
    assert main("simulate labels.tif --out-dir ref".split()) == 0
    for name in ("positive", "negative", "partial"):
        assert np.array_equal(tifffile.imread(f"sim/{name}.tif"), tifffile.imread(f"ref/{name}.tif"))
    assert tifffile.imread("sim/positive.tif").max() == 1


def test_the_0_255_refusal_comes_within_a_second(workspace, capsys):
    start = time.perf_counter()
    code = main(f"{TRAIN} --out m.safetensors".replace("pos.tif", "pos255.tif").split())
    assert code == 1 and time.perf_counter() - start < 1.0


def test_a_full_disk_during_training_is_one_line_and_leaves_no_checkpoint(workspace, capsys, monkeypatch):
    """safetensors reports a full disk as ``SafetensorError: ... StorageFull``: one line, no model, no checkpoint."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    before = snapshot(workspace)
    code = main(f"{TRAIN} --out m.safetensors --checkpoint-every 1".split())
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("done in")]
    assert code == 1 and len(lines) == 1 and "no space left on device" in lines[0] and "Traceback" not in err, err
    assert snapshot(workspace) == before


def test_too_little_disk_for_the_checkpoint_is_refused_before_training(workspace, capsys, monkeypatch):
    """The checkpoint and model are estimated from the network before the first step, not met at step 50."""
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda folder: usage(10**9, 10**9 - 1000, 1000))
    before = snapshot(workspace)
    code = main(f"{TRAIN} --out m.safetensors".split())
    err = capsys.readouterr().err
    assert code == 1 and "the checkpoint and the model" in err and "Traceback" not in err, err
    assert snapshot(workspace) == before
