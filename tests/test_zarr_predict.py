"""Blockwise and distributed prediction of zarr volumes (``napari_coarseseg.blockwise``, ``zarr_predict``).

The claim under test: cut into blocks, in one process or on dask workers, a
volume gets the labels (and probabilities) of :func:`napari_coarseseg.predict`
on the same array read lazily, bit for bit: no seam, no normalisation drift.
Small models (4 channels, depth 2) and synthetic blobs keep it quick; the
cluster test predicts 40 x 1024 x 1024 on two ``dask worker`` processes, kills
one midway and measures the workers' peak memory (``VmHWM``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_coarseseg import blockwise, predict, run_to_end, save_model, simulate, train_recursive, train_refineseg
from napari_coarseseg.blockwise import (
    ArraySource,
    BlockPlan,
    BlockwisePrediction,
    exact_percentiles,
    iter_normalisation,
)
from napari_coarseseg.cli import main
from napari_coarseseg.data import iter_normalized_planes

from conftest import TINY, disc_image, disc_mask

zarr = pytest.importorskip("zarr")
da = pytest.importorskip("dask.array")

#: The cluster test's workers must stay under this peak resident memory each.
WORKER_MEMORY_LIMIT = 1.5e9


def blobs(shape, seed: int = 0) -> np.ndarray:
    """A (Z, Y, X) uint16 volume of bright blobs (120) on a dark background (20), noise sigma 10, drifting by slice."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    out = np.empty(shape, dtype=np.uint16)
    for z in range(shape[0]):
        inside = ((yy + 7 * z) % 40 - 20) ** 2 + ((xx - 3 * z) % 50 - 25) ** 2 < 120
        out[z] = np.clip(20 + 100 * inside + rng.normal(0, 10, inside.shape), 0, None).astype(np.uint16)
    return out


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:  # argparse's refusals (status 2)
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def blob_model(tmp_path_factory):
    """A refineseg model trained 150 steps on the disc image, and its file: it segments the blobs (a fifth of the
    pixels). Two channels, depth 2, no transition heads: 0.6 s per 1024 x 1024 slice on one thread, half the time
    of TINY's network (the heads' maps are blended like any other; test_slice_context_... keeps them)."""
    mask = disc_mask()
    drawings = simulate(mask, erode=(2, 3), margin=3, seed=0)
    settings = dict(TINY, steps=150, learning_rate=1e-2, base_channels=2, transition_heads="none")
    model = run_to_end(train_refineseg(disc_image(mask), [drawings.positive], [drawings.negative], seed=0,
                                       **settings))
    path = save_model(model, tmp_path_factory.mktemp("model") / "blobs.safetensors")
    return model, path


def write_zarr(path, volume, chunks, zarr_format: int = 3):
    array = zarr.create_array(str(path), shape=volume.shape, chunks=chunks, dtype=volume.dtype, zarr_format=zarr_format)
    array[...] = volume
    return zarr.open_array(str(path), mode="r")


# --------------------------------------------------------------------------- normalisation


def test_exact_percentiles_are_numpys_bit_for_bit():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n, channels = int(rng.integers(1, 3000)), int(rng.integers(1, 4))
        kind = trial % 4
        sample = (rng.normal(size=(n, channels)) if kind == 0 else rng.integers(-5, 5, (n, channels)) if kind == 1
                  else rng.random((n, channels)) * 1e6 if kind == 2 else rng.gamma(0.3, size=(n, channels)))
        sample = sample.astype(np.float32)
        percentiles = [1.0, 99.8] if trial % 3 == 0 else sorted(rng.uniform(0, 100, 2).tolist())
        ordered = np.sort(sample, axis=0)
        expected = np.percentile(sample, percentiles, axis=0)
        got = exact_percentiles(n, percentiles, lambda rank, ordered=ordered: ordered[rank])
        assert got.dtype == expected.dtype and np.array_equal(got.view(np.uint64), expected.view(np.uint64)), trial


@pytest.mark.parametrize("shape, dtype", [((40, 64, 48), np.uint16), ((3, 50, 70), np.float32),
                                          ((33, 20, 30), np.float64), ((1, 80, 60), np.uint8)])
def test_the_statistics_pass_normalises_as_the_lazy_path(shape, dtype):
    volume = np.random.default_rng(1).gamma(2, 300, size=shape).astype(dtype)
    lazy = da.from_array(volume, chunks=(4, 32, 32))
    expected = list(iter_normalized_planes(lazy, 1.0, 99.8))
    source = ArraySource(lazy)
    normalisation = drive(iter_normalisation(source, 1.0, 99.8, block=(4, 32, 32)))
    for z, plane in enumerate(expected):
        assert np.array_equal(normalisation.plane(source.read(z, z + 1, 0, shape[1], 0, shape[2])[0]), plane), z


def test_slices_too_large_to_read_whole_are_summed_in_parts_and_still_normalise_alike(monkeypatch):
    """Past STATISTICS_PIXELS a slice's sums are added block by block: float64 rounding only, gone in float32."""
    monkeypatch.setattr(blockwise, "STATISTICS_PIXELS", 500)
    volume = np.random.default_rng(2).gamma(2, 300, size=(9, 61, 77)).astype(np.float32)
    lazy = da.from_array(volume, chunks=(3, 20, 20))
    source = ArraySource(lazy)
    assert len(blockwise.statistics_plan(source.shape, 1, (2, 20, 30))) > volume.shape[0]  # slices cut in parts
    normalisation = drive(iter_normalisation(source, 1.0, 99.8, block=(2, 20, 30)))
    for z, plane in enumerate(iter_normalized_planes(lazy, 1.0, 99.8)):
        assert np.array_equal(normalisation.plane(source.read(z, z + 1, 0, 61, 0, 77)[0]), plane), z


def test_nan_is_refused_naming_the_slice():
    volume = np.ones((4, 16, 16), dtype=np.float32)
    volume[2, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"slice 2"):
        drive(iter_normalisation(ArraySource(da.from_array(volume)), name="vol"))


def drive(generator):
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value


# --------------------------------------------------------------------------- blocks equal the whole


def test_blocks_span_the_whole_planes_tiles():
    plan = BlockPlan((1, 1100, 700), (1, 300, 450))
    # Tiles of 512 start at 0, 448 and 588 along Y (1100), at 0 and 188 along X (700).
    assert plan.span(1, 0, 300) == (0, 512) and plan.span(1, 300, 580) == (0, 960)
    assert plan.span(1, 900, 1100) == (448, 1100) and plan.span(2, 450, 700) == (0, 700)
    assert BlockPlan((1, 300, 200), (1, 100, 100)).span(1, 100, 200) == (0, 300)  # one tile: the whole axis


@pytest.mark.parametrize("shape, block, flips", [((2, 600, 1000), (2, 256, 384), False),
                                                  ((2, 600, 1000), (1, 200, 1000), False),
                                                  ((1, 600, 700), (1, 300, 349), True)])
def test_blocks_give_the_labels_and_probabilities_of_the_whole_image(blob_model, shape, block, flips):
    """Tiles of 512 start at 0 and 88 along 600 px, at 0, 448 and 488 along 1000, at 0 and 188 along 700: the
    blocks cut through overlaps, single tiles and the irregular last tile."""
    model, _ = blob_model
    lazy = da.from_array(blobs(shape), chunks=(1, 256, 256))
    expected = predict(model, lazy, device="cpu", flips=flips)
    got = BlockwisePrediction(model, lazy, device="cpu", flips=flips, block=block, keep_probabilities=True)()
    assert 0 < expected.labels.mean() < 1  # blobs and background, not one class
    assert np.count_nonzero(got.labels != expected.labels) == 0
    assert np.array_equal(got.probabilities, expected.probabilities)  # bit for bit


def test_slice_context_models_see_the_same_neighbours_across_blocks():
    image = np.stack([disc_image(disc_mask(), seed=s) for s in range(3)])
    drawings = simulate(np.stack([disc_mask()] * 3), erode=(2, 3), margin=3, seed=0)
    model = run_to_end(train_refineseg(image, [drawings.positive], [drawings.negative], seed=0, slice_context=1,
                                       **TINY))
    assert model.slice_context == 1
    lazy = da.from_array(blobs((5, 130, 90)), chunks=(1, 130, 90))
    expected = predict(model, lazy, device="cpu")
    got = BlockwisePrediction(model, lazy, device="cpu", block=(2, 130, 90), keep_probabilities=True)()
    assert np.array_equal(got.probabilities, expected.probabilities) and np.array_equal(got.labels, expected.labels)


def test_recursive_models_predict_whole_planes_and_refuse_cut_ones():
    mask = disc_mask()
    drawings = simulate(mask, erode=(2, 3), margin=3, seed=0)
    model = run_to_end(train_recursive(disc_image(mask), drawings.partial, mask, seed=0, iterations=1, **TINY))
    lazy = da.from_array(blobs((3, 96, 80)), chunks=(1, 96, 80))
    expected = predict(model, lazy, device="cpu", spacing=(1.0, 2.0))
    got = BlockwisePrediction(model, lazy, device="cpu", spacing=(1.0, 2.0), keep_probabilities=True)()
    assert np.array_equal(got.labels, expected.labels) and np.array_equal(got.probabilities, expected.probabilities)
    with pytest.raises(ValueError, match="whole planes"):
        BlockwisePrediction(model, lazy, block=(1, 48, 80))


def test_a_model_that_normalises_each_slice_on_its_own_gets_whole_planes(blob_model, tmp_path):
    from napari_coarseseg.zarr_predict import predict_zarr

    model = copy.deepcopy(blob_model[0])
    model.card["normalisation"]["per"] = "slice"
    volume = (blobs((4, 300, 260)) * np.array([1, 2, 3, 5], dtype=np.uint16)[:, None, None]).astype(np.uint16)
    expected = predict(model, da.from_array(volume, chunks=(1, 300, 260)), device="cpu")
    got = BlockwisePrediction(model, da.from_array(volume), device="cpu", keep_probabilities=True)()
    assert np.array_equal(got.labels, expected.labels) and np.array_equal(got.probabilities, expected.probabilities)
    with pytest.raises(ValueError, match="normalises each slice on its own"):
        BlockwisePrediction(model, da.from_array(volume), block=(1, 150, 260))
    write_zarr(tmp_path / "in.zarr", volume, (2, 150, 260))
    summary = predict_zarr(model, tmp_path / "in.zarr", tmp_path / "out.zarr", device="cpu")
    assert summary["chunks"] == 1 and np.array_equal(zarr.open_array(str(tmp_path / "out.zarr/0"))[...],
                                                     expected.labels)


# --------------------------------------------------------------------------- zarr in, zarr out (one process)


def write_ome(path, volume, scale, version: str, five_d: bool = False):
    """An OME-Zarr image written by hand from the specification (0.4 on zarr format 2, 0.5 on format 3); with
    ``five_d`` its axes are t, c, z, y, x with one time point and one channel. Returns its level 0."""
    names = "tczyx" if five_d else "zyx"
    kinds = {"t": "time", "c": "channel"}
    axes = [{"name": n, "type": kinds.get(n, "space"), **({} if n in kinds else {"unit": "micrometer"})}
            for n in names]
    data = volume[None, None] if five_d else volume
    root = zarr.open_group(str(path), mode="w", zarr_format=3 if version == "0.5" else 2)
    root.create_array("s0", shape=data.shape, chunks=(1,) * (data.ndim - 2) + (128, 128), dtype=data.dtype)[...] = data
    full = [1.0] * (len(names) - 3) + list(scale)
    transforms = [{"type": "scale", "scale": full}, {"type": "translation", "translation": [0.0] * len(names)}]
    image = {"name": "image", "axes": axes, "datasets": [{"path": "s0", "coordinateTransformations": transforms}]}
    if version == "0.5":
        root.attrs["ome"] = {"version": "0.5", "multiscales": [image]}
    else:
        root.attrs["multiscales"] = [{"version": "0.4", **image}]
    return zarr.open_array(str(path / "s0"), mode="r")


@pytest.mark.parametrize("version, five_d", [("0.4", True), ("0.5", False)])
def test_ome_zarr_in_gives_ome_zarr_labels_out_with_the_scale(blob_model, tmp_path, capsys, version, five_d):
    model, path = blob_model
    scale = (2.0, 0.5, 0.25)
    level0 = write_ome(tmp_path / "in.zarr", blobs((4, 300, 260)), scale, version, five_d)
    out = tmp_path / "out.zarr"
    code, stdout, err = run(capsys, "predict", path, tmp_path / "in.zarr", "--out", out, "--chunks", "3,128,200",
                            "--probabilities", "--quiet")
    assert code == 0, err
    assert "wrote labels 4 x 300 x 260" in stdout
    expected = predict(model, da.from_zarr(level0)[0, 0] if five_d else level0, device="cpu")
    group = zarr.open_group(str(out), mode="r")
    assert group.metadata.zarr_format == (3 if version == "0.5" else 2)
    assert np.array_equal(group["0"][...], expected.labels)
    assert np.array_equal(group["probabilities/0"][...], expected.probabilities)
    assert group["0"].chunks == (3, 128, 200) and group["done"][...].all()
    attrs = group.attrs.asdict()
    ome = attrs["ome"] if version == "0.5" else attrs
    [image] = ome["multiscales"]
    assert "image-label" in ome and image["datasets"] == [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(scale)}]}]
    assert [(a["name"], a["unit"]) for a in image["axes"]] == [(n, "micrometer") for n in "zyx"]
    assert attrs["coarseseg"]["runs"][0]["predicted"] == len(BlockPlan((4, 300, 260), (3, 128, 200)))
    ome_zarr = pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url

    [labels] = [node for node in ome_zarr.Reader(parse_url(str(out)))() if node.load(ome_zarr.Label)]
    assert labels.metadata["coordinateTransformations"][0] == [{"type": "scale", "scale": list(scale)}]


@pytest.mark.gui
def test_napari_opens_the_ome_zarr_labels_with_their_scale(make_napari_viewer, blob_model, tmp_path, capsys):
    """napari-ome-zarr (the ``cluster`` extra) opens ``OUT.zarr`` as a Labels layer on the input's grid."""
    pytest.importorskip("napari_ome_zarr")
    _, path = blob_model
    scale = (2.0, 0.5, 0.25)
    write_ome(tmp_path / "in.zarr", blobs((3, 200, 180)), scale, "0.4", False)
    out = tmp_path / "out.zarr"
    code, _, err = run(capsys, "predict", path, tmp_path / "in.zarr", "--out", out, "--quiet")
    assert code == 0, err
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(out), plugin="napari-ome-zarr")
    assert layer.__class__.__name__ == "Labels" and tuple(layer.scale) == scale
    assert np.array_equal(np.asarray(layer.data), zarr.open_group(str(out), mode="r")["0"][...])


def test_a_2d_array_and_a_channel_axis(blob_model, tmp_path, capsys):
    model, path = blob_model
    image = blobs((1, 200, 300))[0]
    write_zarr(tmp_path / "plane.zarr", image, (100, 100), zarr_format=2)
    code, _, err = run(capsys, "predict", path, tmp_path / "plane.zarr", "--out", tmp_path / "out.zarr", "--quiet",
                       "--chunks", "1,150,120")
    assert code == 0, err
    assert np.array_equal(zarr.open_array(str(tmp_path / "out.zarr/0"), mode="r")[...],
                          predict(model, zarr.open_array(str(tmp_path / "plane.zarr"), mode="r")).labels)
    # One channel on axis 0 of a (C, Z, Y, X) array: a grey image for a grey model.
    volume = blobs((2, 100, 120))[None]
    write_zarr(tmp_path / "czyx.zarr", volume, (1, 1, 100, 120))
    code, _, err = run(capsys, "predict", path, tmp_path / "czyx.zarr", "--out", tmp_path / "c.zarr", "--quiet",
                       "--channel-axis", "0")
    assert code == 0, err
    expected = predict(model, da.from_array(volume[0]), device="cpu").labels  # read lazily, as the store is
    assert np.array_equal(zarr.open_array(str(tmp_path / "c.zarr/0"), mode="r")[...], expected)


def test_resume_predicts_only_the_chunks_not_done(blob_model, tmp_path, capsys, monkeypatch):
    from napari_coarseseg import zarr_predict

    model, path = blob_model
    write_zarr(tmp_path / "in.zarr", blobs((6, 200, 150)), (2, 100, 150))
    out = tmp_path / "out.zarr"
    args = ["predict", path, tmp_path / "in.zarr", "--out", out, "--chunks", "2,100,150", "--quiet"]
    assert run(capsys, *args)[0] == 0
    complete = zarr.open_array(str(out / "0"), mode="r")[...]
    # As if the run had stopped: two chunks lost their labels and flags.
    group = zarr.open_group(str(out), mode="r+")
    for z, y in ((0, 1), (2, 0)):
        group["0"][2 * z : 2 * z + 2, 100 * y : 100 * y + 100] = 0
        group["done"][z, y, 0] = 0
    calls = []
    real = zarr_predict.predict_block
    monkeypatch.setattr(zarr_predict, "predict_block", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    code, out_text, err = run(capsys, *args, "--resume")
    assert code == 0, err
    assert sorted(calls) == [(0, 1, 0), (2, 0, 0)] and "2 chunks predicted" in out_text and "4 already done" in out_text
    assert np.array_equal(zarr.open_array(str(out / "0"), mode="r")[...], complete)
    runs = zarr.open_group(str(out), mode="r").attrs.asdict()["coarseseg"]["runs"]
    assert [r["predicted"] for r in runs] == [6, 2] and runs[1]["skipped"] == 4
    # Another option than the store was written with: refused, nothing touched.
    code, _, err = run(capsys, *args, "--resume", "--flips")
    assert code == 1 and "written with another settings" in err


def test_a_local_cluster_loads_the_model_once_per_worker(blob_model, tmp_path, capsys):
    pytest.importorskip("distributed")
    model, path = blob_model
    write_zarr(tmp_path / "in.zarr", blobs((3, 128, 160)), (1, 128, 160))
    code, stdout, err = run(capsys, "predict", path, tmp_path / "in.zarr", "--out", tmp_path / "out.zarr", "--workers",
                            1, "--chunks", "1,128,160", "--quiet")
    assert code == 0, err
    assert "3 chunks predicted on 1 worker" in stdout
    expected = predict(model, zarr.open_array(str(tmp_path / "in.zarr"), mode="r"), device="cpu").labels
    assert np.array_equal(zarr.open_array(str(tmp_path / "out.zarr/0"), mode="r")[...], expected)
    [worker] = zarr.open_group(str(tmp_path / "out.zarr"), mode="r").attrs.asdict()["coarseseg"]["runs"][0][
        "workers"].values()
    assert worker["chunks"] == 3 and worker["model_loads"] == 1 and os.getpid() not in worker["pids"]


# --------------------------------------------------------------------------- errors


def one_line_error(capsys, args, out) -> str:
    """The one stderr line of a refused ``coarseseg`` call, after checking the exit status and that ``out`` is not
    there."""
    code, _, err = run(capsys, *args)
    lines = err.strip().splitlines()
    assert code in (1, 2) and len(lines) == 1 and lines[0].startswith("coarseseg predict: error:"), err
    assert not Path(out).exists()
    return lines[0]


def test_bad_input_is_refused_in_one_line_and_nothing_is_written(blob_model, tmp_path, capsys, monkeypatch):
    from napari_coarseseg import zarr_predict

    _, path = blob_model
    out = tmp_path / "out.zarr"
    (tmp_path / "folder.zarr").mkdir()
    group = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    group.create_array("raw", shape=(2, 32, 32), dtype="uint8")
    write_zarr(tmp_path / "two.zarr", np.zeros((2, 2, 32, 32), np.uint8), (1, 1, 32, 32))
    write_zarr(tmp_path / "ok.zarr", blobs((2, 64, 64)), (1, 64, 64))
    (tmp_path / "exists.zarr").mkdir()
    cases = {
        "missing.zarr does not exist": [tmp_path / "missing.zarr"],
        "is not a zarr store": [tmp_path / "folder.zarr"],
        "its arrays: raw": [tmp_path / "group.zarr"],
        "has 2 channels but the model was trained on 1": [tmp_path / "two.zarr", "--channel-axis", "0"],
        "exists; give another --out, or --resume": [tmp_path / "ok.zarr", "--out", tmp_path / "exists.zarr"],
        "cannot reach the dask scheduler at tcp://127.0.0.1:9": [tmp_path / "ok.zarr", "--scheduler",
                                                                 "tcp://127.0.0.1:9"],
        "--workers": [tmp_path / "ok.zarr", "--workers", "0"],  # argparse's refusal, or predict_zarr's
        "takes three whole numbers": [tmp_path / "ok.zarr", "--chunks", "4,a,2"],
        "takes no file name": [tmp_path / "ok.zarr", "--probabilities", "p.tif"],
    }
    monkeypatch.setattr(zarr_predict, "CONNECT_TIMEOUT", 2.0)
    for message, rest in cases.items():
        rest = rest if "--out" in rest else [*rest, "--out", out]
        line = one_line_error(capsys, ["predict", path, *rest, "--quiet"], out)
        assert message in line, line
    assert list((tmp_path / "exists.zarr").iterdir()) == []
    tiff = tmp_path / "image.tif"
    import tifffile

    tifffile.imwrite(tiff, blobs((1, 32, 32))[0])
    assert "need a zarr input" in one_line_error(capsys, ["predict", path, tiff, "--out", out, "--workers", "1"],
                                                 out)


def tree(root: Path) -> dict:
    """Every file and folder under ``root``: a file's SHA-256, None for a folder (a symbolic link: its target)."""
    return {str(p.relative_to(root)): os.readlink(p) if p.is_symlink() else
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None for p in sorted(root.rglob("*"))}


def refused(capsys, args, tmp_path, words) -> str:
    """Run ``coarseseg predict ARGS`` in this process and check it refused: a non-zero exit, one stderr line
    ``coarseseg predict: error: ...`` holding every one of ``words``, no traceback, and under ``tmp_path`` (the
    input store included) not a byte changed, no file or folder added or removed."""
    before = tree(tmp_path)
    code, _, err = run(capsys, "predict", *args)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("coarseseg predict: error:"), err
    assert "Traceback" not in err and all(word in lines[0] for word in words), (words, err)
    assert tree(tmp_path) == before
    return lines[0]


def _denied(monkeypatch, refuse):
    """``os.access`` saying no where ``refuse(path, mode)``: as root (the tests' machine) no permission bit stops a
    read or a write, so the permission checks are made to trigger this way."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: not refuse(str(path), mode) and real(path, mode, **kw))


def _copy(source, target: Path) -> Path:
    target.write_bytes(Path(source).read_bytes())
    return target


def _permission_error(*args, **kwargs):
    raise PermissionError(13, "Permission denied", "in.zarr/zarr.json")


#: Each refusal: (what to set up, given tmp_path, the model file and monkeypatch, returning the arguments after
#: ``predict``; words the error line must hold).
ADDRESS = "is not a dask scheduler address; give tcp://HOST:PORT"
REFUSALS = {
    "scheduler not a url": (lambda t, m, mp: [m, t / "in.zarr", "--out", t / "out.zarr", "--scheduler", "not a url"],
                            ["--scheduler 'not a url' " + ADDRESS]),
    "scheduler port 0": (lambda t, m, mp: [m, t / "in.zarr", "--out", t / "out.zarr", "--scheduler",
                                           "tcp://127.0.0.1:0"], [ADDRESS]),
    "scheduler port 70000": (lambda t, m, mp: [m, t / "in.zarr", "--out", t / "out.zarr", "--scheduler",
                                               "10.0.0.1:70000"], [ADDRESS]),
    "scheduler scheme": (lambda t, m, mp: [m, t / "in.zarr", "--out", t / "out.zarr", "--scheduler",
                                           "http://127.0.0.1:8787"], [ADDRESS, "dashboard"]),
    "scheduler host": (lambda t, m, mp: [m, t / "in.zarr", "--out", t / "out.zarr", "--scheduler", "tcp://a b:8786"],
                       [ADDRESS]),
    "resume without a store": (lambda t, m, mp: [m, t / "in.zarr", "--out", t / "out.zarr", "--resume"],
                               ["--resume: there is no", "out.zarr to finish", "run without --resume"]),
    "out named .tif": (lambda t, m, mp: [m, t / "in.zarr", "--out", t / "labels.tif"],
                       ["a zarr input is predicted into a zarr store: name --out OUT.zarr"]),
    "out is the input": (lambda t, m, mp: [m, t / "in.zarr", "--out", t / "in.zarr"],
                         ["is the input", "it would be overwritten; give another --out"]),
    "out inside the input": (lambda t, m, mp: [m, t / "in.zarr", "--out", t / "in.zarr" / "labels.zarr"],
                             ["is the input", "it would be overwritten"]),
    "out holds the input": (lambda t, m, mp: [m, t / "in.zarr", "--out", t], ["holds the input", "overwritten"]),
    "out is the input by a link": (lambda t, m, mp: (t / "link.zarr").symlink_to(t / "in.zarr") or [
        m, t / "in.zarr", "--out", t / "link.zarr"], ["is the input", "overwritten"]),
    "out is the model": (lambda t, m, mp: [_copy(m, t / "model.zarr"), t / "in.zarr", "--out", t / "model.zarr"],
                         ["is the model file", "overwritten"]),
    "input unreadable": (lambda t, m, mp: _denied(mp, lambda p, mode: p.endswith("in.zarr")) or [
        m, t / "in.zarr", "--out", t / "out.zarr"], ["cannot read", "permission denied", "chmod -R u+rX"]),
    "input metadata unreadable": (lambda t, m, mp: mp.setattr(zarr, "open", _permission_error) or [
        m, t / "in.zarr", "--out", t / "out.zarr"], ["cannot read", "in.zarr: permission denied"]),
    "output folder unwritable": (lambda t, m, mp: _denied(mp, lambda p, mode: mode & os.W_OK and p == str(
        t.resolve())) or [m, t / "in.zarr", "--out", t / "out.zarr"], ["cannot write", "is not writable"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refused_zarr_prediction_says_why_in_one_line_and_changes_nothing(blob_model, tmp_path, capsys,
                                                                            monkeypatch, case):
    """Refused before the input is read or a cluster started: a scheduler address, --resume with no store, --out
    not a .zarr, --out that is (or holds, or lies in) the input or the model, an unreadable input, an output folder
    that cannot be written to."""
    setup, words = REFUSALS[case]
    write_zarr(tmp_path / "in.zarr", blobs((2, 64, 64)), (1, 64, 64))
    args = [*setup(tmp_path, blob_model[1], monkeypatch), "--quiet"]
    began = time.perf_counter()
    refused(capsys, args, tmp_path, words)
    assert time.perf_counter() - began < 5  # no connection tried, nothing computed


def test_a_scheduler_that_fails_otherwise_than_by_oserror_leaves_no_client_open(blob_model, tmp_path, capsys,
                                                                                monkeypatch):
    """A connection that fails with another error than OSError (the ucx placeholder's TypeError, say) left
    ``distributed.Client`` half open, its event loop thread running: at interpreter exit its ``__del__`` waited
    20 s for that thread, then printed a TimeoutError traceback (and the next client in the process could
    deadlock, collecting it). Now it is closed, its thread ended, before the error line."""
    import threading

    client_module = pytest.importorskip("distributed.client")

    async def connect(*args, **kwargs):
        raise TypeError("no connector")

    monkeypatch.setattr(client_module, "connect", connect)
    loops = {thread for thread in threading.enumerate() if thread.name == "IO loop"}  # distributed's loop thread
    write_zarr(tmp_path / "in.zarr", blobs((2, 64, 64)), (1, 64, 64))
    refused(capsys, [blob_model[1], tmp_path / "in.zarr", "--out", tmp_path / "out.zarr", "--scheduler",
                     "tcp://127.0.0.1:1", "--quiet"], tmp_path,
            ["cannot reach the dask scheduler at tcp://127.0.0.1:1 (TypeError: no connector)"])
    assert {thread for thread in threading.enumerate() if thread.name == "IO loop"} <= loops


@pytest.mark.parametrize("failing", [0, 1])
def test_a_run_that_fails_keeps_its_finished_chunks_or_nothing(blob_model, tmp_path, capsys, monkeypatch, failing):
    """The chunk ``failing`` raises: before any chunk was finished, the store this run made is removed; after one,
    it is kept for --resume, which finishes it."""
    from napari_coarseseg import zarr_predict

    _, path = blob_model
    write_zarr(tmp_path / "in.zarr", blobs((2, 64, 64)), (1, 64, 64))
    args = [path, tmp_path / "in.zarr", "--out", tmp_path / "out.zarr", "--chunks", "1,64,64", "--quiet"]
    real, calls = zarr_predict.predict_block, []

    def predict_block(*args, **kwargs):
        calls.append(args[5])
        if len(calls) > failing:
            raise RuntimeError("a failing\nchunk")
        return real(*args, **kwargs)

    monkeypatch.setattr(zarr_predict, "predict_block", predict_block)
    if failing == 0:
        refused(capsys, args, tmp_path, ["block (0, 0, 0) failed (RuntimeError: a failing chunk)",
                                         "nothing was written"])
        return
    code, _, err = run(capsys, "predict", *args)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "block (1, 0, 0) failed" in lines[0], err
    assert "finished so far (1) are kept" in lines[0] and "--resume" in lines[0]
    assert zarr.open_array(str(tmp_path / "out.zarr" / "done"), mode="r")[...].ravel().tolist() == [1, 0]
    monkeypatch.setattr(zarr_predict, "predict_block", real)
    code, stdout, err = run(capsys, "predict", *args, "--resume")
    assert code == 0 and "1 chunks predicted" in stdout and "1 already done" in stdout, err


# --------------------------------------------------------------------------- napari


@pytest.mark.gui
def test_a_dask_layer_is_predicted_slice_by_slice_with_progress(make_napari_viewer, qtbot, errors, blob_model):
    from qtpy.QtCore import QTimer

    from napari_coarseseg._viewer import predict_in_viewer

    model, _ = blob_model
    stack = da.from_array(blobs((6, 200, 240)), chunks=(1, 200, 240))
    viewer = make_napari_viewer()
    viewer.add_image(stack, name="lazy")
    worker = predict_in_viewer(viewer, model, "lazy", device="cpu", start=False)
    steps, ticks = [], []
    worker.yielded.connect(lambda _: steps.append(time.perf_counter()))
    timer = QTimer()  # a 10 ms timer measures the longest stall of the event loop
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        worker.start()
    timer.stop()
    assert errors == []
    assert worker.pbar.total == len(steps) == 2 + 6  # two statistics passes over the 6 slices, then one per slice
    assert max(np.diff(ticks)) < 0.3, f"event loop blocked for {max(np.diff(ticks)) * 1000:.0f} ms"
    np.testing.assert_array_equal(viewer.layers["lazy prediction"].data, predict(model, stack, device="cpu").labels)


# --------------------------------------------------------------------------- a cluster


def peak_memory(pid: int) -> int:
    """The process's peak resident memory so far (Linux ``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def start(command, log):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", *command], stdout=log, stderr=subprocess.STDOUT, env=env)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc (Linux)")
def test_two_workers_one_killed_midway_give_the_labels_of_one_process(blob_model, tmp_path):
    """40 x 1024 x 1024 on a scheduler and two ``dask worker`` processes (one thread each); SIGKILL one after a few
    chunks; the other finishes. Labels identical to ``predict`` in this process; each worker under 1.5 GB."""
    distributed = pytest.importorskip("distributed")
    began = time.perf_counter()
    model, path = blob_model
    source = write_zarr(tmp_path / "in.zarr", blobs((40, 1024, 1024)), (8, 512, 512))
    out, scheduler_file = tmp_path / "out.zarr", tmp_path / "scheduler.json"
    log = open(tmp_path / "cluster.log", "w")
    processes = [start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                        "--scheduler-file", str(scheduler_file)], log)]
    try:
        for name in ("w0", "w1"):
            processes.append(start(["distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file),
                                    "--nthreads", "1", "--memory-limit", "1.5GB", "--no-nanny", "--no-dashboard",
                                    "--name", name], log))
        deadline = time.time() + 120
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        cli = subprocess.Popen([sys.executable, "-m", "napari_coarseseg.cli", "predict", str(path),
                                str(tmp_path / "in.zarr"), "--out", str(out), "--scheduler", address, "--chunks",
                                "4,512,1024", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
        total = len(BlockPlan((40, 1024, 1024), (4, 512, 1024)))
        done_at_kill = 0
        while cli.poll() is None and time.time() < deadline + 600:
            flags = out / "done" / "c"
            done_at_kill = sum(1 for p in flags.rglob("*") if p.is_file()) if flags.exists() else 0
            if done_at_kill >= 4:
                break
            time.sleep(0.2)
        victim = processes[1]
        peaks = {"killed": peak_memory(victim.pid)}
        victim.send_signal(signal.SIGKILL)
        stdout, stderr = cli.communicate(timeout=900)
        peaks["survivor"] = peak_memory(processes[2].pid)
    finally:
        for process in processes:
            process.kill()
            process.wait()
        log.close()
    assert cli.returncode == 0, stderr + (tmp_path / "cluster.log").read_text()[-3000:]
    assert 4 <= done_at_kill < total, done_at_kill
    seconds_cluster = time.perf_counter() - began
    expected = predict(model, source, device="cpu", keep_probabilities=False).labels
    got = zarr.open_array(str(out / "0"), mode="r")[...]
    differing = int(np.count_nonzero(got != expected))
    summary = zarr.open_group(str(out), mode="r").attrs.asdict()["coarseseg"]["runs"][-1]
    print(f"\ncluster test: {differing} pixels differ; peak memory {peaks}; chunks done at the kill {done_at_kill}/"
          f"{total}; workers {summary['workers']}; {seconds_cluster:.0f} s to the cluster's end, "
          f"{time.perf_counter() - began:.0f} s with the reference")
    assert differing == 0 and 0 < expected.mean() < 1
    assert all(peak < WORKER_MEMORY_LIMIT for peak in peaks.values()), peaks
    assert summary["predicted"] == total and all(w["model_loads"] == 1 for w in summary["workers"].values())
