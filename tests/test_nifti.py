"""NIfTI volumes: reading and writing (axis order, header kept), the command line on them, the napari reader/writer.

The command-line tests run ``coarseseg`` in-process on the bundled sample
``sample_data/isbi2012_em_volume`` (8 x 128 x 128 EM voxels of 4 x 4 x 50 nm,
scribbles on two slices) with test_cli's tiny network, a few steps and one
torch thread (conftest.py), and on a "clinical" file written here: an oblique
affine with different qform and sform codes, millimetres, int16 voxels stored
with a scale factor. Headers are compared field by field, not just the arrays.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_coarseseg import load_model, predict
from napari_coarseseg._nifti_napari import NIFTI_KEY, derived_layer_kwargs, get_reader, read_layers, write_labels
from napari_coarseseg.io import InputError
from napari_coarseseg.model_io import read_card
from napari_coarseseg.nifti import check_same_grid, grid_info, read_nifti, write_nifti
from napari_coarseseg.samples import sample_data_dir

from test_cli import TINY_PRESET, assert_one_line_error, expected_planes, files_under, run

SAMPLE = sample_data_dir() / "isbi2012_em_volume"
SAMPLE_SPACING = (0.05, 0.004, 0.004)  # (Z, Y, X) micron: 50 nm sections of 4 x 4 nm pixels
DRAWN_SLICES = [2, 5]
STEPS = 4
EVOLUTION_EVERY = 2
# A scanner's affine: x flipped, turned 10 degrees about z, voxels 0.9 x 1.1 x 2.5 mm, an origin in the room.
_TURN = np.radians(10)
OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = (np.diag([-1, 1, 1]) @ [[np.cos(_TURN), -np.sin(_TURN), 0], [np.sin(_TURN), np.cos(_TURN), 0],
                                          [0, 0, 1]] @ np.diag([0.9, 1.1, 2.5]))
OBLIQUE[:3, 3] = [12.5, -20.0, 31.0]


def clinical_file(path: Path, data_xyz: np.ndarray) -> Path:
    """A NIfTI as a converter writes a scan: qform code 1 (scanner) and a slightly different sform, code 4 (MNI),
    mm, real values stored as int16 with a scale factor (scl_slope, scl_inter)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_qform(OBLIQUE, code="scanner")
    sform = OBLIQUE.copy()
    sform[:3, 3] += 0.5
    header.set_sform(sform, code="mni")
    header.set_xyzt_units("mm", "sec")
    # The header's own best affine (the sform), so that nibabel keeps both transforms and their codes.
    nib.save(nib.Nifti1Image(np.asarray(data_xyz, np.float32), header.get_best_affine(), header), path)
    assert nib.load(path).dataobj.slope != 1  # nibabel scaled the values into int16
    return path


def assert_same_grid(written: Path, original: Path, shape_xyz=None):
    """The header fields that place voxels in space are those of ``original``: shape, affines, codes, units."""
    a, b = nib.load(written), nib.load(original)
    assert a.shape == (shape_xyz or b.shape)
    np.testing.assert_array_equal(a.affine, b.affine)
    np.testing.assert_array_equal(a.header.get_qform(), b.header.get_qform())
    np.testing.assert_array_equal(a.header.get_sform(), b.header.get_sform())
    assert int(a.header["qform_code"]) == int(b.header["qform_code"])
    assert int(a.header["sform_code"]) == int(b.header["sform_code"])
    assert a.header.get_zooms()[:3] == b.header.get_zooms()[:3]
    assert a.header.get_xyzt_units() == b.header.get_xyzt_units()
    return a


# --------------------------------------------------------------------------- reading and writing


def test_read_reverses_the_axes_and_write_restores_file_and_header(tmp_path):
    values = np.random.default_rng(0).uniform(-500, 2000, (7, 6, 5))  # (X, Y, Z)
    original = clinical_file(tmp_path / "scan.nii.gz", values)
    array, info = read_nifti(original)
    assert array.shape == (5, 6, 7) and info.file_shape == (7, 6, 5)
    np.testing.assert_allclose(array, values.T, atol=0.1)  # voxel (i, j, k) is array[k, j, i], scale applied
    assert array.flags.c_contiguous and array.dtype == np.float32  # scaled voxels: float32, not nibabel's float64
    assert int(info.header["qform_code"]) == 1 and int(info.header["sform_code"]) == 4
    np.testing.assert_array_equal(info.affine, nib.load(original).affine)
    zooms = nib.load(original).header.get_zooms()
    assert info.spacing == pytest.approx(zooms[::-1]) and info.units == "mm"

    labels = (array > 1000).astype(np.int64) + (array > 1500)
    for name in ("labels.nii.gz", "labels.nii"):
        written = assert_same_grid(write_nifti(tmp_path / name, labels, like=info), original)
        assert written.get_data_dtype() == np.uint8
        assert written.header.get_slope_inter() in ((None, None), (1.0, 0.0))  # no scaling
        assert written.header.get_intent()[0] == "label"
        np.testing.assert_array_equal(np.asarray(written.dataobj), labels.T)
        again, _ = read_nifti(tmp_path / name)
        np.testing.assert_array_equal(again, labels)
    assert (tmp_path / "labels.nii.gz").read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert gzip.decompress((tmp_path / "labels.nii.gz").read_bytes()) == (tmp_path / "labels.nii").read_bytes()
    # Labels above 255 take uint16; nothing but the two outputs is left in the folder.
    big = write_nifti(tmp_path / "many.nii.gz", labels * 300, like=info)
    assert nib.load(big).get_data_dtype() == np.uint16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii", "labels.nii.gz", "many.nii.gz", "scan.nii.gz"]


def test_a_leading_axis_becomes_the_fourth_and_a_trailing_axis_of_one_is_dropped(tmp_path):
    info = grid_info((3, 4, 5), spacing=(2.0, 1.0, 0.5), units="mm")
    stack = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5) % 7  # (iterations, Z, Y, X)
    written = nib.load(write_nifti(tmp_path / "evolution.nii.gz", stack, like=info))
    assert written.shape == (5, 4, 3, 2)
    np.testing.assert_array_equal(np.asarray(written.dataobj)[..., 1], stack[1].T)
    nib.save(nib.Nifti1Image(np.ones((5, 4, 3, 1), np.uint8), info.affine), tmp_path / "one.nii.gz")
    assert read_nifti(tmp_path / "one.nii.gz")[0].shape == (3, 4, 5)


def test_same_grid_check_allows_float32_rounding_and_refuses_a_shift(tmp_path):
    image = grid_info((8, 16, 16), spacing=SAMPLE_SPACING, units="micron", name="image")
    rounded = grid_info((8, 16, 16), spacing=[float(np.float32(s)) for s in SAMPLE_SPACING], name="drawing")
    check_same_grid(rounded, image)
    shifted = grid_info((8, 16, 16), spacing=SAMPLE_SPACING, origin=(0, 0, 0.004), name="drawing")
    with pytest.raises(InputError, match="another affine"):
        check_same_grid(shifted, image)
    with pytest.raises(InputError, match=r"\(X, Y, Z\) = \(16, 16, 4\)"):
        check_same_grid(grid_info((4, 16, 16), spacing=SAMPLE_SPACING, name="drawing"), image)


def test_the_sample_volume_is_small_on_one_grid_with_scribbles_on_two_slices():
    assert sum(p.stat().st_size for p in SAMPLE.iterdir()) < 1_000_000
    image, grid = read_nifti(SAMPLE / "image.nii.gz")
    assert image.shape == (8, 128, 128) and image.dtype == np.uint8
    assert grid.spacing == SAMPLE_SPACING and grid.units == "micron"
    labels, _ = read_nifti(SAMPLE / "labels.nii.gz")
    assert set(np.unique(labels)) == {0, 1} and 0.6 < labels.mean() < 0.8  # cell interior vs membrane
    for role in ("positive", "negative"):
        drawing, info = read_nifti(SAMPLE / f"{role}.nii.gz")
        check_same_grid(info, grid)
        assert [z for z in range(8) if drawing[z].any()] == DRAWN_SLICES, role
        # Positive strokes lie in cells (but for the sloppy ones, spilling 2-3 px), negative ones on membranes.
        assert (labels[drawing > 0] == (1 if role == "positive" else 0)).mean() > 0.95, role


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("preset") / "tiny.json"
    path.write_text(json.dumps(dict(TINY_PRESET, evolution_every=EVOLUTION_EVERY)))
    return path


@pytest.fixture(scope="module")
def trained(preset, tmp_path_factory):
    """``coarseseg train`` on the sample volume: a model and a NIfTI evolution."""
    out = tmp_path_factory.mktemp("trained")
    from napari_coarseseg.cli import main

    code = main(["train", str(SAMPLE / "image.nii.gz"), "--positive", str(SAMPLE / "positive.nii.gz"),
                 "--negative", str(SAMPLE / "negative.nii.gz"), "--out", str(out / "model.safetensors"),
                 "--evolution", str(out / "evolution.nii.gz"), "--preset", str(preset), "--steps", str(STEPS),
                 "--device", "cpu", "--quiet"])
    assert code == 0
    return out


def test_train_on_the_sample_volume_writes_a_model_and_a_nifti_evolution(trained):
    card = read_card(trained / "model.safetensors")
    assert card["training"]["image_shapes"] == [[8, 128, 128]]  # (Z, Y, X): trained slice by slice
    assert card["training"]["steps"] == STEPS and card["channels"] == 1 and not card["rgb"]
    planes = expected_planes(STEPS, EVOLUTION_EVERY)
    evolution = assert_same_grid(trained / "evolution.nii.gz", SAMPLE / "image.nii.gz",
                                 shape_xyz=(128, 128, 8, planes))
    positive = np.asarray(nib.load(SAMPLE / "positive.nii.gz").dataobj)
    np.testing.assert_array_equal(np.asarray(evolution.dataobj)[..., 0], positive)  # iteration 0 = the drawing
    assert sorted(p.name for p in trained.iterdir()) == ["evolution.nii.gz", "model.safetensors"]


def test_predict_on_a_clinical_nifti_writes_labels_and_maps_on_its_grid(trained, tmp_path, capsys):
    volume = np.asarray(nib.load(SAMPLE / "image.nii.gz").dataobj)[:96, :80, :3].astype(np.int16)  # (X, Y, Z)
    scan = clinical_file(tmp_path / "scan.nii.gz", volume)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run(capsys, "predict", trained / "model.safetensors", scan, "--out", out / "pred.nii.gz",
                       "--probabilities", out / "prob.nii", "--reliability", out / "rel.nii.gz", "--device", "cpu")
    assert code == 0, err
    written = assert_same_grid(out / "pred.nii.gz", scan)
    assert written.get_data_dtype() == np.uint8 and written.header.get_intent()[0] == "label"
    image, _ = read_nifti(scan)
    expected = predict(load_model(trained / "model.safetensors"), image, device="cpu")
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected.labels.T)
    probabilities = assert_same_grid(out / "prob.nii", scan, shape_xyz=(96, 80, 3, 2))  # classes: fourth axis
    assert probabilities.get_data_dtype() == np.float32
    np.testing.assert_allclose(np.asarray(probabilities.dataobj).sum(axis=-1), 1.0, atol=1e-4)
    assert assert_same_grid(out / "rel.nii.gz", scan).get_data_dtype() == np.float32
    assert sorted(p.name for p in out.iterdir()) == ["pred.nii.gz", "prob.nii", "rel.nii.gz"]


def test_predict_over_a_folder_of_niftis_names_outputs_like_the_images(trained, tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    out.mkdir()
    volume = np.asarray(nib.load(SAMPLE / "image.nii.gz").dataobj)
    clinical_file(images / "a.nii.gz", volume[:64, :64, :2].astype(np.int16))
    clinical_file(images / "b.nii", volume[64:, 32:, 5:].astype(np.int16))
    code, _, err = run(capsys, "predict", trained / "model.safetensors", images, "--out", out, "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii"]
    for name in ("a.nii.gz", "b.nii"):
        assert_same_grid(out / name, images / name)


def test_train_on_folders_of_niftis_matched_by_name(preset, tmp_path, capsys):
    """images/{a,b}.nii.gz and drawings named alike: b is a crop 32 voxels further along X (its own affine)."""
    folders = {name: tmp_path / name for name in ("image", "positive", "negative", "evolution")}
    for role, folder in folders.items():
        folder.mkdir()
        if role != "evolution":
            volume = nib.load(SAMPLE / f"{role}.nii.gz")
            nib.save(volume, folder / "a.nii.gz")
            nib.save(volume.slicer[32:96], folder / "b.nii.gz")  # nibabel shifts the affine's origin
    assert not np.array_equal(nib.load(folders["image"] / "b.nii.gz").affine, nib.load(SAMPLE / "image.nii.gz").affine)
    model = tmp_path / "model.safetensors"
    arguments = ["train", folders["image"], "--positive", folders["positive"], "--negative", folders["negative"],
                 "--out", model, "--evolution", folders["evolution"], "--preset", preset, "--steps", 2,
                 "--device", "cpu"]
    code, _, err = run(capsys, *arguments)
    assert code == 0, err
    assert read_card(model)["training"]["image_shapes"] == [[8, 128, 128], [8, 128, 64]]
    for name in ("a.nii.gz", "b.nii.gz"):
        assert_same_grid(folders["evolution"] / name, folders["image"] / name,
                         shape_xyz=(*nib.load(folders["image"] / name).shape, expected_planes(2, EVOLUTION_EVERY)))
    # b's positive drawing from a crop 2 voxels off: refused, naming it, before any training.
    nib.save(nib.load(SAMPLE / "positive.nii.gz").slicer[30:94], folders["positive"] / "b.nii.gz")
    model.unlink()
    before = files_under(tmp_path)
    code, out, err = run(capsys, *arguments)
    assert_one_line_error(code, out, err, "train", "positive drawing b.nii.gz", "another affine")
    assert files_under(tmp_path) == before


def test_train_recursive_on_a_nifti_takes_its_in_plane_voxel_size_and_the_card_records_it(preset, tmp_path,
                                                                                          capsys, monkeypatch):
    """Voxels 3 x 0.5 x 1 mm (Z, Y, X): the card records [0.5, 1.0] (Y, X) without any option; --spacing
    overrides the header; the same volume as TIFFs records null; predict grows each slice with the NIfTI's."""
    from napari_coarseseg.annotations import simulate
    from napari_coarseseg.methods import recursive

    yy, xx = np.mgrid[:48, :48]
    mask = (((yy - 24) / 2) ** 2 + (xx - 24) ** 2 <= 100).astype(np.uint8)  # a disc in mm: an ellipse in pixels
    volume = np.stack([mask, mask])
    arrays = {"image": (20 + 100 * volume + np.random.default_rng(0).normal(0, 5, volume.shape)).astype(np.float32),
              "partial": simulate(volume, seed=0).partial, "strong": np.stack([mask, 0 * mask])}
    grid = grid_info(volume.shape, spacing=(3.0, 0.5, 1.0), units="mm")
    nifti = {name: write_nifti(tmp_path / f"{name}.nii.gz", array, like=grid) for name, array in arrays.items()}
    tiff = {name: tmp_path / f"{name}.tif" for name in arrays}
    for name, array in arrays.items():
        tifffile.imwrite(tiff[name], array)
    settings = ["--method", "recursive", "--preset", preset, "--steps", 1, "--iterations", 1, "--device", "cpu",
                "--quiet"]
    for name, files, extra, expected in (("nifti", nifti, [], [0.5, 1.0]),
                                         ("override", nifti, ["--spacing", "9,2,1"], [2.0, 1.0]),
                                         ("tiff", tiff, [], None)):
        code, _, err = run(capsys, "train", files["image"], "--partial", files["partial"], "--strong",
                           files["strong"], *settings, "--out", tmp_path / f"{name}.safetensors", *extra)
        assert code == 0, err
        assert read_card(tmp_path / f"{name}.safetensors")["spacing"] == expected
    seen = []
    original = recursive.grow_regions
    monkeypatch.setattr(recursive, "grow_regions", lambda *a, spacing=None: seen.append(spacing) or original(
        *a, spacing=spacing))
    code, _, err = run(capsys, "predict", tmp_path / "tiff.safetensors", nifti["image"], "--out",
                       tmp_path / "prediction.nii.gz", "--device", "cpu", "--quiet")
    assert code == 0, err
    assert seen == [(0.5, 1.0), (0.5, 1.0)]  # one growth per slice, with the file's in-plane voxel size


def bad_input(case: str, folder: Path) -> tuple[dict, list[str]]:
    """Arguments replacing the good ones (image, positive), and the words the one-line error must contain."""
    image = nib.load(SAMPLE / "image.nii.gz")
    positive = nib.load(SAMPLE / "positive.nii.gz")
    path = folder / f"{case.replace(' ', '_')}.nii.gz"
    if case == "drawing of another shape":
        nib.save(nib.Nifti1Image(np.asarray(positive.dataobj)[..., :4], positive.affine, positive.header), path)
        return {"positive": path}, ["positive drawing", "(128, 128, 4)", "(128, 128, 8)"]
    if case == "drawing with another affine":
        shifted = positive.affine.copy()
        shifted[2, 3] += 0.05  # one section further
        nib.save(nib.Nifti1Image(np.asarray(positive.dataobj), shifted), path)
        return {"positive": path}, ["positive drawing", "another affine", "image.nii.gz"]
    if case == "4-D volume":
        channels = np.stack([np.asarray(image.dataobj)] * 3, axis=-1)
        nib.save(nib.Nifti1Image(channels, image.affine, image.header), path)
        return {"image": path}, ["(128, 128, 8, 3)", "--channel-axis 3"]
    if case == "NaN volume":
        voxels = np.asarray(image.dataobj).astype(np.float32)
        voxels[3, 4, 5] = np.nan
        nib.save(nib.Nifti1Image(voxels, image.affine), path)  # a float32 header: uint8 would make NaN 0
        return {"image": path}, ["1 NaN", "(3, 4, 5)", "nan_to_num"]
    if case == "not a NIfTI":
        path.write_text("these are my notes\n")
        return {"image": path}, ["cannot read", path.name, "NIfTI"]
    raise AssertionError(case)


BAD = ["drawing of another shape", "drawing with another affine", "4-D volume", "NaN volume", "not a NIfTI"]


@pytest.mark.parametrize("case", BAD)
def test_train_refuses_bad_niftis_in_one_line_and_writes_nothing(case, preset, tmp_path, capsys):
    given, words = bad_input(case, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    code, out, err = run(capsys, "train", given.get("image", SAMPLE / "image.nii.gz"), "--positive",
                         given.get("positive", SAMPLE / "positive.nii.gz"), "--negative", SAMPLE / "negative.nii.gz",
                         "--out", work / "model.safetensors", "--evolution", work / "evolution.nii.gz",
                         "--preset", preset, "--steps", 1, "--device", "cpu")
    assert_one_line_error(code, out, err, "train", *words)
    assert files_under(work) == set()


@pytest.mark.parametrize("case", ["4-D volume", "NaN volume", "not a NIfTI", "NIfTI output for a TIFF"])
def test_predict_refuses_bad_niftis_in_one_line_and_writes_nothing(case, trained, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    if case == "NIfTI output for a TIFF":
        image = tmp_path / "image.tif"
        tifffile.imwrite(image, read_nifti(SAMPLE / "image.nii.gz")[0])
        words = ["pred.nii.gz", "image.tif", "name it .tif"]
    else:
        given, words = bad_input(case, tmp_path)
        image = given["image"]
    code, out, err = run(capsys, "predict", trained / "model.safetensors", image, "--out", work / "pred.nii.gz",
                         "--device", "cpu")
    assert_one_line_error(code, out, err, "predict", *words)
    assert files_under(work) == set()


def test_simulate_on_a_nifti_mask_writes_drawings_on_its_grid(tmp_path, capsys):
    code, _, err = run(capsys, "simulate", SAMPLE / "labels.nii.gz", "--out-dir", tmp_path / "drawings",
                       "--style", "scribble", "--margin", 0)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "drawings").iterdir()) == [
        "negative.nii.gz", "partial.nii.gz", "positive.nii.gz"]
    for name in ("positive", "negative", "partial"):
        assert_same_grid(tmp_path / "drawings" / f"{name}.nii.gz", SAMPLE / "labels.nii.gz")


# --------------------------------------------------------------------------- napari reader and writer (no viewer)


def test_reader_gives_the_volume_with_its_spacing_as_scale_and_labels_as_labels():
    assert get_reader("volume.tif") is None and get_reader(["a.nii.gz", "b.tif"]) is None
    assert get_reader(str(SAMPLE / "image.nii.gz")) is read_layers and get_reader("A.NII") is read_layers
    (image, attributes, kind), (drawing, _, drawing_kind) = read_layers(
        [str(SAMPLE / "image.nii.gz"), str(SAMPLE / "positive.nii.gz")])
    assert kind == "image" and drawing_kind == "labels"  # intent "label"
    assert attributes["name"] == "image" and attributes["scale"] == SAMPLE_SPACING
    np.testing.assert_array_equal(attributes["metadata"][NIFTI_KEY].affine, nib.load(SAMPLE / "image.nii.gz").affine)
    np.testing.assert_array_equal(image, read_nifti(SAMPLE / "image.nii.gz")[0])


def test_writer_uses_the_layers_grid_or_else_its_scale(tmp_path):
    scan = clinical_file(tmp_path / "scan.nii.gz", np.random.default_rng(0).uniform(0, 100, (9, 8, 3)))
    _, info = read_nifti(scan)
    labels = np.zeros((3, 8, 9), np.uint8)
    labels[1, 2:5, 3:7] = 2
    image_layer = SimpleNamespace(scale=info.spacing, translate=(0, 0, 0), metadata={NIFTI_KEY: info})
    derived = derived_layer_kwargs(image_layer, 3)
    assert write_labels(str(tmp_path / "a.nii.gz"), labels, derived) == [str(tmp_path / "a.nii.gz")]
    np.testing.assert_array_equal(assert_same_grid(tmp_path / "a.nii.gz", scan).dataobj, labels.T)
    write_labels(str(tmp_path / "b.nii"), labels, {"scale": (3.0, 0.5, 0.25), "translate": (1.0, 2.0, 4.0)})
    np.testing.assert_allclose(nib.load(tmp_path / "b.nii").affine, [[0.25, 0, 0, 4], [0, 0.5, 0, 2], [0, 0, 3, 1],
                                                                      [0, 0, 0, 1]])



def test_writer_never_saves_labels_over_the_image_they_were_made_from(tmp_path):
    """A prediction layer carries its scan's grid; saving it onto the scan's own file is refused, byte for byte."""
    scan = clinical_file(tmp_path / "scan.nii.gz", np.random.default_rng(0).uniform(0, 100, (9, 8, 3)))
    _, info = read_nifti(scan)
    derived = derived_layer_kwargs(SimpleNamespace(scale=info.spacing, translate=(0, 0, 0),
                                                   metadata={NIFTI_KEY: info}), 3)
    before = scan.read_bytes()
    with pytest.raises(ValueError, match="scan.nii.gz holds an image, not a label map"):
        write_labels(str(scan), np.ones((3, 8, 9), np.uint8), derived)
    assert scan.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]
    # A label map is saved over as napari's "Save" means: the labels were opened from it.
    labels = tmp_path / "labels.nii.gz"
    write_labels(str(labels), np.ones((3, 8, 9), np.uint8), derived)
    write_labels(str(labels), np.full((3, 8, 9), 2, np.uint8), derived)
    assert read_nifti(labels)[0].max() == 2


# --------------------------------------------------------------------------- napari viewer


@pytest.mark.gui
def test_napari_opens_the_sample_with_its_spacing_and_layers_made_from_it_keep_its_grid(
        make_napari_viewer, qtbot, tiny_model, tmp_path):
    pytest.importorskip("napari")
    from napari_coarseseg._viewer import predict_in_viewer
    from napari_coarseseg._widgets import ROLE_KEY, AnnotationsWidget

    viewer = make_napari_viewer()
    [layer] = viewer.open(str(SAMPLE / "image.nii.gz"), plugin="napari-coarseseg")
    assert type(layer).__name__ == "Image" and tuple(layer.scale) == pytest.approx(SAMPLE_SPACING)
    np.testing.assert_array_equal(layer.metadata[NIFTI_KEY].affine, nib.load(SAMPLE / "image.nii.gz").affine)
    drawings = AnnotationsWidget(viewer).create_layers()
    assert drawings and all(tuple(d.scale) == pytest.approx(SAMPLE_SPACING) for d in drawings)
    assert drawings[0].metadata[ROLE_KEY] and drawings[0].metadata[NIFTI_KEY] is layer.metadata[NIFTI_KEY]

    worker = predict_in_viewer(viewer, tiny_model, "image", device="cpu", start=False)
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        worker.start()
    prediction = viewer.layers["image prediction"]
    assert tuple(prediction.scale) == pytest.approx(SAMPLE_SPACING)  # it lies on the image
    assert prediction.metadata[NIFTI_KEY] is layer.metadata[NIFTI_KEY]
    saved = prediction.save(str(tmp_path / "prediction.nii.gz"), plugin="napari-coarseseg")
    assert saved == [str(tmp_path / "prediction.nii.gz")]
    assert_same_grid(tmp_path / "prediction.nii.gz", SAMPLE / "image.nii.gz")
    assert [type(layer).__name__ for layer in viewer.open(saved[0], plugin="napari-coarseseg")] == ["Labels"]


@pytest.mark.gui
def test_training_on_the_volume_sample_shows_its_evolution_in_3d(make_napari_viewer, qtbot):
    pytest.importorskip("napari")
    from napari_coarseseg._viewer import train_in_viewer

    viewer = make_napari_viewer()
    viewer.open_sample("napari-coarseseg", "isbi2012_em_volume")
    image = viewer.layers["EM volume (ISBI 2012)"]
    viewer.dims.ndisplay = 3  # the user looks at the volume in 3-D while it trains
    worker = train_in_viewer(viewer, image.name, positive=["positive drawing"], negative=["negative drawing"],
                             steps=60, evolution_every=30, device="cpu", start=False, base_channels=16, depth=3,
                             patch_size=64, batch_size=4)
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        worker.start()
    evolution = viewer.layers["EM volume (ISBI 2012) evolution"]
    # One volume per checkpoint (the drawings, steps 30 and 60), on the image's grid with its voxel size.
    assert evolution.data.shape == (3, 8, 128, 128)
    assert tuple(evolution.scale) == pytest.approx((1.0, *SAMPLE_SPACING))
    np.testing.assert_array_equal(evolution.data[0] > 0, viewer.layers["positive drawing"].data > 0)
    # In 3-D the three spatial axes are displayed and the slider picks the newest volume.
    assert viewer.dims.ndisplay == 3 and list(viewer.dims.displayed) == [1, 2, 3]
    assert viewer.dims.current_step[0] == 2
    shown = viewer.screenshot(canvas_only=True, flash=False)
    assert shown.std() > 0  # something is drawn
    # The whole volume is segmented, the six slices without a stroke too: 0.82 of their voxels right (measured,
    # seed 0; cell interiors are 0.68 of the voxels, so calling all or nothing "cell" scores 0.68 or 0.32).
    truth = viewer.layers["expert mask"].data > 0
    undrawn = [0, 1, 3, 4, 6, 7]
    agreement = ((evolution.data[2] > 0) == truth)[undrawn].mean()
    assert agreement > 0.75 and "EM volume (ISBI 2012) prediction" in viewer.layers, agreement


@pytest.mark.gui
def test_napari_opens_a_4d_nifti_as_one_layer_per_channel_on_its_grid(make_napari_viewer, tmp_path):
    pytest.importorskip("napari")
    from napari_coarseseg._viewer import image_input

    scan = tmp_path / "two-stains.nii.gz"
    voxels = np.random.default_rng(0).random((16, 12, 5, 3)).astype(np.float32)  # (X, Y, Z, C)
    nib.save(nib.Nifti1Image(voxels, np.diag([0.5, 0.7, 3.0, 1.0])), scan)
    viewer = make_napari_viewer()
    layers = viewer.open(str(scan), plugin="napari-coarseseg")
    assert [layer.name for layer in layers] == ["two-stains [0]", "two-stains [1]", "two-stains [2]"]
    assert all(type(layer).__name__ == "Image" and layer.data.shape == (5, 12, 16)
               and tuple(layer.scale) == pytest.approx((3.0, 0.7, 0.5))
               and layer.metadata[NIFTI_KEY].shape == (5, 12, 16) for layer in layers)
    # As "more channels" of the first, they are the array the command line reads with --channel-axis 3.
    first, stacked, has_channels = image_input(viewer, [layer.name for layer in layers])
    assert first is layers[0] and has_channels
    np.testing.assert_array_equal(stacked, read_nifti(scan, channels=True)[0])
