"""The ``coarseseg`` command line (DESIGN.md, "Command line"), end to end on small real crops.

Most tests call :func:`napari_coarseseg.cli.main` in-process (it returns the
exit code); one test goes through the installed ``coarseseg`` executable to
check the console-script entry point. Training uses a tiny preset written to
a JSON file and 10 steps, so the whole module runs in a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version as distribution_version
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage as ndi

import napari_coarseseg
from napari_coarseseg import load_model, predict
from napari_coarseseg.cli import main
from napari_coarseseg.model_io import read_card
from napari_coarseseg.samples import sample_data_dir

STEPS = 10
EVOLUTION_EVERY = 5
TINY_PRESET = {
    "steps": STEPS,
    "patch_size": 32,
    "batch_size": 2,
    "base_channels": 4,
    "depth": 2,
    "evolution_every": EVOLUTION_EVERY,
}
# simulate's defaults (cli.py): the negative drawing starts this far outside objects.
DEFAULT_MARGIN = 4.0
DEFAULT_PARTIAL_FRACTION = 0.45


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One torch thread: on a small shared CPU, OpenMP threads spinning against
    other processes make tiny networks orders of magnitude slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run(capsys, *args) -> tuple[int, str, str]:
    """Run ``coarseseg ARGS`` in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()  # drop anything printed before
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:  # misuse of the command line: argparse's exit, status 2
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, command: str, *words: str) -> str:
    """Non-zero exit, exactly one stderr line ``coarseseg COMMAND: error: ...`` naming ``words``."""
    assert code != 0, f"expected a failure, got exit 0; stdout={out!r} stderr={err!r}"
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith(f"coarseseg {command}: error:"), line
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in {line!r}"
    assert "Traceback" not in err
    assert out == "", f"nothing should be reported as written on failure, stdout={out!r}"
    return line


def files_under(folder: Path) -> set[Path]:
    """Every file under ``folder`` (hidden temporary files included)."""
    return {p.relative_to(folder) for p in Path(folder).rglob("*") if p.is_file()}


def hidden_leftovers(folder: Path) -> list[Path]:
    """Temporary files of atomic writes (``.NAME.XXXX.tmp``) left in ``folder``."""
    return [p for p in Path(folder).rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def sample_crops():
    folder = sample_data_dir() / "dsb2018_nuclei"
    image = tifffile.imread(folder / "image.tif")
    labels = tifffile.imread(folder / "labels.tif")
    return image, labels


def expected_planes(steps: int, every: int) -> int:
    """Evolution planes of a refineseg run: iteration 0, every ``every`` steps, and the last step."""
    checkpoints = {s for s in range(1, steps + 1) if every and s % every == 0} | {steps}
    return 1 + len(checkpoints)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two crops of the DSB 2018 nuclei sample (image + instance labels) and a tiny preset."""
    root = tmp_path_factory.mktemp("data")
    image, labels = sample_crops()
    crops = {
        "a": np.s_[:128, :128],  # the main training / test image
        "b": np.s_[256:352, 128:256],  # a second, differently shaped image for folder runs
    }
    paths = {}
    for name, crop in crops.items():
        tifffile.imwrite(root / f"{name}_image.tif", image[crop])
        tifffile.imwrite(root / f"{name}_labels.tif", labels[crop])
        paths[name] = (root / f"{name}_image.tif", root / f"{name}_labels.tif")
    assert len(np.unique(labels[crops["a"]])) > 3, "the crop should hold several nuclei"
    preset = root / "tiny.json"
    preset.write_text(json.dumps(TINY_PRESET))
    return {"root": root, "image": paths["a"][0], "labels": paths["a"][1], "b": paths["b"], "preset": preset}


@pytest.fixture(scope="module")
def simulated(data, tmp_path_factory):
    """``coarseseg simulate --instances`` on crop a (also checked in test_simulate_*)."""
    out_dir = tmp_path_factory.mktemp("simulated")
    code = main(["simulate", str(data["labels"]), "--out-dir", str(out_dir), "--instances"])
    assert code == 0
    return out_dir


@pytest.fixture(scope="module")
def trained(data, simulated, tmp_path_factory):
    """``coarseseg train`` on crop a with positive and negative drawings and an evolution stack."""
    out = tmp_path_factory.mktemp("trained")
    model, evolution = out / "model.safetensors", out / "evolution.tif"
    code = main([
        "train", str(data["image"]), "--positive", str(simulated / "positive.tif"),
        "--negative", str(simulated / "negative.tif"), "--out", str(model), "--preset", str(data["preset"]),
        "--steps", str(STEPS), "--evolution", str(evolution), "--device", "cpu", "--quiet",
    ])
    assert code == 0
    return {"folder": out, "model": model, "evolution": evolution}


# --------------------------------------------------------------------------- end to end


def test_simulate_writes_drawings_consistent_with_the_labels(data, tmp_path, capsys):
    labels = tifffile.imread(data["labels"])
    out_dir = tmp_path / "drawings"  # created by simulate
    code, out, err = run(capsys, "simulate", data["labels"], "--out-dir", out_dir, "--instances", "--seed", 3)
    assert code == 0, err
    assert "positive.tif" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["negative.tif", "partial.tif", "positive.tif"]

    drawings = {name: tifffile.imread(out_dir / f"{name}.tif") for name in ("positive", "negative", "partial")}
    objects = labels > 0
    for name, drawing in drawings.items():
        assert drawing.shape == labels.shape, name
        assert np.issubdtype(drawing.dtype, np.integer), name
        # An instance mask is one class: every drawing holds only 0 and 1.
        assert set(np.unique(drawing)) == {0, 1}, name

    # Positive marks lie inside objects, at least 2 px (the smallest default erosion) from their
    # borders; the edge of the crop is not an object border.
    positive = drawings["positive"] > 0
    assert positive.any()
    assert not (positive & ~ndi.binary_erosion(objects, iterations=2, border_value=1)).any()
    # Negative marks are exactly the pixels farther than the margin from every object.
    np.testing.assert_array_equal(drawings["negative"] > 0, ndi.distance_transform_edt(~objects) > DEFAULT_MARGIN)
    # Partial masks: inside objects, a fixed fraction of each object's area.
    partial = drawings["partial"] > 0
    assert not (partial & ~objects).any()
    ids = np.unique(labels[objects])
    area = ndi.sum(objects, labels, ids)
    kept = ndi.sum(partial, labels, ids)
    np.testing.assert_array_equal(kept, np.maximum(1, np.round(DEFAULT_PARTIAL_FRACTION * area)))
    assert hidden_leftovers(out_dir) == []


def test_train_writes_model_and_evolution(data, simulated, trained):
    image = tifffile.imread(data["image"])
    positive = tifffile.imread(simulated / "positive.tif")
    assert positive.any()

    card = read_card(trained["model"])
    assert card["method"] == "refineseg"
    assert card["n_classes"] == int(positive.max()) == 1
    assert card["training"]["steps"] == STEPS
    assert card["training"]["image_shapes"] == [list(image.shape)]
    assert card["network"]["base_channels"] == TINY_PRESET["base_channels"]  # --preset was used
    assert card["network"]["depth"] == TINY_PRESET["depth"]

    evolution = tifffile.imread(trained["evolution"])
    assert evolution.shape == (expected_planes(STEPS, EVOLUTION_EVERY), *image.shape)
    assert np.issubdtype(evolution.dtype, np.integer)
    np.testing.assert_array_equal(evolution[0], positive)  # iteration 0 = the positive drawing
    assert evolution.min() >= 0 and evolution.max() <= card["n_classes"]
    assert sorted(p.name for p in trained["folder"].iterdir()) == ["evolution.tif", "model.safetensors"]


def test_predict_writes_labels_probabilities_and_reliability(data, trained, tmp_path, capsys):
    image = tifffile.imread(data["image"])
    k = read_card(trained["model"])["n_classes"]
    pred, prob, rel = tmp_path / "pred.tif", tmp_path / "prob.tif", tmp_path / "rel.tif"
    code, out, err = run(capsys, "predict", trained["model"], data["image"], "--out", pred,
                         "--probabilities", prob, "--reliability", rel, "--device", "cpu")
    assert code == 0, err

    labels = tifffile.imread(pred)
    assert labels.shape == image.shape
    assert np.issubdtype(labels.dtype, np.integer)
    assert labels.min() >= 0 and labels.max() <= k

    probabilities = tifffile.imread(prob)
    assert probabilities.shape == (k + 1, *image.shape)
    assert np.isfinite(probabilities).all() and probabilities.min() >= 0
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(probabilities.argmax(axis=0), labels)  # the labels are the argmax

    reliability = tifffile.imread(rel)
    assert reliability.shape == image.shape
    assert np.isfinite(reliability).all()
    assert reliability.min() >= 0 and reliability.max() <= 1
    assert files_under(tmp_path) == {Path("pred.tif"), Path("prob.tif"), Path("rel.tif")}


def test_coarseseg_executable_entry_point(data, trained, tmp_path):
    """The installed console script runs the same command line and passes on its exit code."""
    executable = shutil.which("coarseseg") or str(Path(sys.executable).parent / "coarseseg")
    assert Path(executable).exists(), "the 'coarseseg' console script is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pred = tmp_path / "pred.tif"
    done = subprocess.run([executable, "predict", str(trained["model"]), str(data["image"]), "--out", str(pred),
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert tifffile.imread(pred).shape == tifffile.imread(data["image"]).shape
    assert str(pred.name) in done.stdout

    missing = tmp_path / "missing.tif"
    failed = subprocess.run([executable, "predict", str(trained["model"]), str(missing), "--out",
                             str(tmp_path / "never.tif")], capture_output=True, text=True, env=env, timeout=120)
    assert failed.returncode != 0
    assert failed.stderr.splitlines()[0].startswith("coarseseg predict: error:")
    assert "missing.tif" in failed.stderr
    assert not (tmp_path / "never.tif").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert napari_coarseseg.__version__ in out
    assert distribution_version("napari-coarseseg") in out


def test_evolution_is_stored_as_grey_planes_not_as_rgb(trained):
    with tifffile.TiffFile(trained["evolution"]) as tif:
        assert tif.series[0].shape[0] == expected_planes(STEPS, EVOLUTION_EVERY) == 3
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK
        assert "S" not in tif.series[0].axes  # no colour-sample axis


def test_outputs_get_ordinary_file_permissions(data, trained, tmp_path, capsys):
    """Outputs are readable like any file the user creates (the umask applies), not private 0600 files."""
    reference = tmp_path / "reference.txt"
    reference.write_text("x")
    pred = tmp_path / "pred.tif"
    code, _, err = run(capsys, "predict", trained["model"], data["image"], "--out", pred, "--device", "cpu")
    assert code == 0, err
    assert oct(pred.stat().st_mode & 0o777) == oct(reference.stat().st_mode & 0o777)
    assert oct(trained["model"].stat().st_mode & 0o777) == oct(reference.stat().st_mode & 0o777)


# --------------------------------------------------------------------------- folders


@pytest.fixture
def image_folder(data, tmp_path):
    """images/{a,b}.tif and positive/{a,b}.tif (simulated), negative/a.tif only."""
    folders = {name: tmp_path / name for name in ("images", "positive", "negative", "sim")}
    for folder in folders.values():
        folder.mkdir()
    for name, (image, labels) in {"a": (data["image"], data["labels"]), "b": data["b"]}.items():
        shutil.copy(image, folders["images"] / f"{name}.tif")
        assert main(["simulate", str(labels), "--out-dir", str(folders["sim"] / name), "--instances"]) == 0
        shutil.copy(folders["sim"] / name / "positive.tif", folders["positive"] / f"{name}.tif")
    shutil.copy(folders["sim"] / "a" / "negative.tif", folders["negative"] / "a.tif")  # b has no negative
    return folders


def test_train_on_folders_matched_by_name(data, image_folder, tmp_path, capsys):
    model, evolution = tmp_path / "model.safetensors", tmp_path / "evolution"
    evolution.mkdir()
    code, out, err = run(capsys, "train", image_folder["images"], "--positive", image_folder["positive"],
                         "--negative", image_folder["negative"], "--out", model, "--preset", data["preset"],
                         "--steps", STEPS, "--evolution", evolution, "--device", "cpu")
    assert code == 0, err
    shapes = {name: tifffile.imread(image_folder["images"] / name).shape for name in ("a.tif", "b.tif")}
    assert shapes["a.tif"] != shapes["b.tif"]
    card = read_card(model)
    assert card["training"]["image_shapes"] == [list(shapes["a.tif"]), list(shapes["b.tif"])]
    assert card["heads"] == ["positive 1", "negative 1"]
    # One evolution stack per training image, named like it, iteration 0 = its positive drawing.
    assert sorted(p.name for p in evolution.iterdir()) == ["a.tif", "b.tif"]
    for name, shape in shapes.items():
        stack = tifffile.imread(evolution / name)
        assert stack.shape == (expected_planes(STEPS, EVOLUTION_EVERY), *shape)
        np.testing.assert_array_equal(stack[0], tifffile.imread(image_folder["positive"] / name))


def test_stray_annotation_file_is_rejected(data, image_folder, tmp_path, capsys):
    shutil.copy(image_folder["positive"] / "a.tif", image_folder["positive"] / "c_typo.tif")
    model = tmp_path / "model.safetensors"
    before = files_under(tmp_path)
    code, out, err = run(capsys, "train", image_folder["images"], "--positive", image_folder["positive"],
                         "--out", model, "--preset", data["preset"], "--steps", STEPS)
    assert code == 1
    assert_one_line_error(code, out, err, "train", "c_typo.tif")
    assert not model.exists()
    assert files_under(tmp_path) == before


def test_evolution_of_a_folder_needs_a_folder(data, image_folder, tmp_path, capsys):
    model, evolution = tmp_path / "model.safetensors", tmp_path / "evolution.tif"
    before = files_under(tmp_path)
    code, out, err = run(capsys, "train", image_folder["images"], "--positive", image_folder["positive"],
                         "--out", model, "--preset", data["preset"], "--evolution", evolution)
    assert_one_line_error(code, out, err, "train", "--evolution", "folder")
    assert not model.exists() and not evolution.exists()
    assert files_under(tmp_path) == before


def test_predict_with_flips_is_the_python_predict_with_flips(data, trained, tmp_path, capsys):
    """--flips gives what predict(..., flips=True) gives (tests/test_inference.py checks what that is)."""
    image = tifffile.imread(data["image"])
    pred, prob = tmp_path / "pred.tif", tmp_path / "prob.tif"
    code, _, err = run(capsys, "predict", trained["model"], data["image"], "--out", pred, "--probabilities", prob,
                       "--device", "cpu", "--flips")
    assert code == 0, err
    model = load_model(trained["model"])
    expected = predict(model, image, device="cpu", flips=True).probabilities
    np.testing.assert_allclose(tifffile.imread(prob), expected, atol=1e-5)


def test_predict_with_prior_strength_is_the_python_predict_with_it(data, trained, tmp_path, capsys):
    """--prior-strength 3 gives predict(..., prior_strength=3); a negative one is one line, nothing written."""
    image = tifffile.imread(data["image"])
    pred, prob = tmp_path / "pred.tif", tmp_path / "prob.tif"
    code, _, err = run(capsys, "predict", trained["model"], data["image"], "--out", pred, "--probabilities", prob,
                       "--device", "cpu", "--prior-strength", "3")
    assert code == 0, err
    expected = predict(load_model(trained["model"]), image, device="cpu", prior_strength=3.0)
    np.testing.assert_allclose(tifffile.imread(prob), expected.probabilities, atol=1e-5)
    np.testing.assert_array_equal(tifffile.imread(pred), expected.labels)
    before = files_under(tmp_path)
    code, out, err = run(capsys, "predict", trained["model"], data["image"], "--out", tmp_path / "p2.tif",
                         "--prior-strength", "-1")
    assert_one_line_error(code, out, err, "predict", "--prior-strength", "from 0 to 10")
    assert files_under(tmp_path) == before


def test_predict_over_a_folder_writes_one_output_per_image(trained, image_folder, tmp_path, capsys):
    out_dir = tmp_path / "predictions"
    out_dir.mkdir()
    code, out, err = run(capsys, "predict", trained["model"], image_folder["images"], "--out", out_dir,
                         "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.tif", "b.tif"]  # no temporary files either
    for name in ("a.tif", "b.tif"):
        labels = tifffile.imread(out_dir / name)
        assert labels.shape == tifffile.imread(image_folder["images"] / name).shape
        assert np.issubdtype(labels.dtype, np.integer) and labels.max() <= 1


def test_predict_over_a_folder_with_a_bad_image_writes_nothing(trained, image_folder, tmp_path, capsys):
    (image_folder["images"] / "z_broken.tif").write_text("not a tiff")  # sorted after a.tif and b.tif
    out_dir = tmp_path / "predictions"
    out_dir.mkdir()
    code, out, err = run(capsys, "predict", trained["model"], image_folder["images"], "--out", out_dir)
    assert_one_line_error(code, out, err, "predict", "z_broken.tif")
    assert list(out_dir.iterdir()) == []


# --------------------------------------------------------------------------- bad inputs


def _write(path: Path, array) -> Path:
    tifffile.imwrite(path, np.asarray(array))
    return path


BAD_TRAIN_INPUTS = {
    # name: (how to make the bad positive drawing / arguments, words the message must contain)
    "missing image file": ("missing_image", ["missing.tif", "does not exist"]),
    "drawing of another shape": ("small_drawing", ["shape", "(64, 64)"]),
    "float-valued drawing": ("float_drawing", ["non-integer"]),
    "empty positive drawing": ("empty_drawing", ["positive", "empty"]),
    "missing output folder": ("missing_out_folder", ["no_such_folder", "does not exist"]),
    "unknown device": ("bad_device", ["device", "tpu"]),
    "negative label values": ("negative_values", ["negative values", "0 for 'not annotated'"]),
    "NaN in the image": ("nan_image", ["NaN", "nan_to_num"]),
    "5-D image": ("five_d_image", ["(2, 2, 2", "expected (Y, X)"]),
    "only one class drawn": ("only_positive", ["only class 1 is drawn", "negative drawing"]),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN_INPUTS), ids=list(BAD_TRAIN_INPUTS))
def test_train_rejects_bad_input_and_writes_nothing(case, data, simulated, tmp_path, capsys):
    kind, words = BAD_TRAIN_INPUTS[case]
    image_path = data["image"]
    image = tifffile.imread(image_path)
    positive = tifffile.imread(simulated / "positive.tif")
    work = tmp_path / "work"
    work.mkdir()
    model = work / "model.safetensors"
    evolution = work / "evolution.tif"
    extra = []
    drawing = positive
    if kind == "missing_image":
        image_path = work / "missing.tif"
    elif kind == "small_drawing":
        drawing = positive[:64, :64]
    elif kind == "float_drawing":
        drawing = positive.astype(np.float32) * 0.5  # 0.5 is not a class
    elif kind == "empty_drawing":
        drawing = np.zeros_like(positive)
    elif kind == "missing_out_folder":
        model = work / "no_such_folder" / "model.safetensors"
    elif kind == "bad_device":
        extra = ["--device", "tpu"]
    elif kind == "negative_values":
        drawing = -positive.astype(np.int16)
    elif kind == "nan_image":
        image = image.astype(np.float32)
        image[5, 5] = np.nan
        image_path = _write(tmp_path / "nan.tif", image)
    elif kind == "five_d_image":
        image_path = _write(tmp_path / "five_d.tif", np.zeros((2, 2, 2, *image.shape), np.uint16))
        drawing = np.zeros((2, 2, 2, *image.shape), np.uint8)
        drawing[..., 10, 10] = 1
    if kind != "only_positive":
        extra += ["--negative", simulated / "negative.tif"]
    assert (drawing.shape[-2:] == image.shape[-2:]) == (kind != "small_drawing")
    positive_path = _write(tmp_path / "positive.tif", drawing)

    before = files_under(work)
    code, out, err = run(capsys, "train", image_path, "--positive", positive_path, "--out", model,
                         "--evolution", evolution, "--preset", data["preset"], "--steps", STEPS, *extra)
    assert_one_line_error(code, out, err, "train", *words)
    assert not model.exists() and not evolution.exists()
    assert files_under(work) == before  # no temporary files either


@pytest.fixture
def not_a_model(tmp_path) -> Path:
    path = tmp_path / "notes.safetensors"
    path.write_text("these are my notes, not a model\n")
    return path


@pytest.fixture
def safetensors_without_card(tmp_path) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    return path


@pytest.mark.parametrize(
    "case, words",
    [
        ("text file as model", ["notes.safetensors", "safetensors"]),
        ("safetensors without card", ["foreign.safetensors", "card"]),
        ("missing model", ["nothing.safetensors", "does not exist"]),
        ("missing image", ["missing.tif", "does not exist"]),
        ("missing output folder", ["no_such_folder", "does not exist"]),
        ("unknown device", ["device", "tpu"]),
    ],
)
def test_predict_rejects_bad_input_and_writes_nothing(case, words, data, trained, not_a_model,
                                                       safetensors_without_card, tmp_path, capsys):
    model, image = trained["model"], data["image"]
    work = tmp_path / "work"
    work.mkdir()
    out = work / "pred.tif"
    probabilities = work / "prob.tif"
    extra = []
    if case == "text file as model":
        model = not_a_model
    elif case == "safetensors without card":
        model = safetensors_without_card
    elif case == "missing model":
        model = tmp_path / "nothing.safetensors"
    elif case == "missing image":
        image = tmp_path / "missing.tif"
    elif case == "missing output folder":
        out = work / "no_such_folder" / "pred.tif"
    elif case == "unknown device":
        extra = ["--device", "tpu"]
    code, err_out, err = run(capsys, "predict", model, image, "--out", out, "--probabilities", probabilities,
                             *extra)
    assert_one_line_error(code, err_out, err, "predict", *words)
    assert not out.exists() and not probabilities.exists()
    assert files_under(work) == set()


def test_predict_out_is_an_existing_folder_for_a_single_image(data, trained, tmp_path, capsys):
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    code, out, err = run(capsys, "predict", trained["model"], data["image"], "--out", out_dir)
    # Either a clear one-line error or a prediction inside the folder is acceptable.
    if code == 0:
        assert tifffile.imread(out_dir / Path(data["image"]).name).shape == tifffile.imread(data["image"]).shape
    else:
        assert_one_line_error(code, out, err, "predict", "results")
    assert hidden_leftovers(tmp_path) == []


def test_simulate_rejects_an_instance_mask_without_instances(tmp_path, capsys):
    _, labels = sample_crops()  # the whole expert mask: 125 nuclei, one value each
    assert len(np.unique(labels)) - 1 > 32
    labels_path = _write(tmp_path / "labels.tif", labels)
    out_dir = tmp_path / "drawings"
    code, out, err = run(capsys, "simulate", labels_path, "--out-dir", out_dir)
    assert_one_line_error(code, out, err, "simulate", "--instances")
    assert not out_dir.exists()
    assert files_under(tmp_path) == {Path("labels.tif")}


def test_simulate_rejects_a_float_mask(tmp_path, capsys):
    labels_path = _write(tmp_path / "labels.tif", np.full((32, 32), 0.5, np.float32))
    out_dir = tmp_path / "drawings"
    code, out, err = run(capsys, "simulate", labels_path, "--out-dir", out_dir)
    assert_one_line_error(code, out, err, "simulate", "float32")
    assert not out_dir.exists()


def test_simulate_rejects_a_missing_labels_file(tmp_path, capsys):
    out_dir = tmp_path / "drawings"
    code, out, err = run(capsys, "simulate", tmp_path / "nope.tif", "--out-dir", out_dir)
    assert_one_line_error(code, out, err, "simulate", "nope.tif", "does not exist")
    assert not out_dir.exists()


# --------------------------------------------------------------------------- recursive method


def test_train_recursive_writes_model_and_k_plus_one_evolution_planes(data, simulated, tmp_path, capsys):
    labels = tifffile.imread(data["labels"])
    strong = tmp_path / "strong.tif"
    tifffile.imwrite(strong, (labels > 0).astype(np.uint8))
    model, evolution = tmp_path / "recursive.safetensors", tmp_path / "evolution.tif"
    code, out, err = run(capsys, "train", data["image"], "--method", "recursive",
                         "--partial", simulated / "partial.tif", "--strong", strong, "--out", model,
                         "--preset", data["preset"], "--steps", 3, "--iterations", 2, "--evolution", evolution,
                         "--device", "cpu", "--quiet")
    assert code == 0, err
    assert "2 iterations of 3 steps" in out
    card = read_card(model)
    assert card["method"] == "recursive" and card["training"]["iterations"] == 2
    stack = tifffile.imread(evolution)
    assert stack.shape == (3, *labels.shape)
    np.testing.assert_array_equal(stack[0], tifffile.imread(simulated / "partial.tif"))
    assert np.all(stack[2][stack[1] > 0] == stack[1][stack[1] > 0])  # regions only grow

    prediction = tmp_path / "prediction.tif"
    code, out, err = run(capsys, "predict", model, data["image"], "--out", prediction, "--device", "cpu", "--quiet")
    assert code == 0, err
    assert tifffile.imread(prediction).shape == labels.shape


@pytest.mark.parametrize(
    "method, option, words",
    [
        ("recursive", "--positive", ["--positive", "refineseg"]),
        ("refineseg", "--partial", ["--partial", "recursive"]),
    ],
)
def test_train_rejects_drawings_of_the_other_method(method, option, words, data, simulated, tmp_path, capsys):
    layer = simulated / ("positive.tif" if option == "--positive" else "partial.tif")
    extra = ["--partial", simulated / "partial.tif"] if method == "recursive" else \
        ["--positive", simulated / "positive.tif"]
    code, out, err = run(capsys, "train", data["image"], "--method", method, option, layer, *extra,
                         "--out", tmp_path / "m.safetensors", "--device", "cpu", "--quiet")
    assert_one_line_error(code, out, err, "train", *words)
    assert files_under(tmp_path) == set()


@pytest.mark.parametrize("command", ["train", "predict"])
def test_disk_full_while_writing_is_one_line_and_leaves_nothing(command, data, simulated, trained, tmp_path,
                                                                capsys, monkeypatch):
    """ENOSPC in the middle of writing a TIFF or a model: one clear line, exit 1, no partial file."""
    import errno

    import safetensors.torch

    from napari_coarseseg import io

    def disk_full(path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 100)  # what a write got down before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "_imwrite", disk_full)
    monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, path, **kwargs: disk_full(path))
    out = tmp_path / "out"
    out.mkdir()
    if command == "train":
        arguments = ["train", data["image"], "--positive", simulated / "positive.tif", "--negative",
                     simulated / "negative.tif", "--out", out / "model.safetensors", "--evolution",
                     out / "evolution.tif", "--preset", data["preset"], "--steps", STEPS, "--device", "cpu"]
    else:
        arguments = ["predict", trained["model"], data["image"], "--out", out / "prediction.tif"]
    code, stdout, err = run(capsys, *arguments)
    assert_one_line_error(code, stdout, err, command, "No space left on device")
    assert list(out.iterdir()) == []  # neither the outputs nor temporary files nor a checkpoint


def test_train_init_starts_from_the_model_and_refuses_another_method_or_a_missing_file(data, simulated, trained,
                                                                                       tmp_path, capsys):
    """One step from --init MODEL stays next to MODEL's weights; one step from scratch is far from them."""
    common = [data["image"], "--positive", simulated / "positive.tif", "--negative", simulated / "negative.tif",
              "--preset", data["preset"], "--steps", "1", "--device", "cpu", "--quiet"]
    for name, extra in (("init", ["--init", trained["model"]]), ("scratch", [])):
        code, _, err = run(capsys, "train", *common, "--out", tmp_path / f"{name}.safetensors", *extra)
        assert code == 0, err
    start = dict(load_model(trained["model"]).network.named_parameters())

    def distance(name):  # over the weights (batch-norm statistics move with every batch either way)
        weights = dict(load_model(tmp_path / f"{name}.safetensors").network.named_parameters())
        return sum(float((weights[k] - start[k]).detach().norm()) for k in start)

    assert distance("init") < 0.1 * distance("scratch")
    code, out, err = run(capsys, "train", data["image"], "--method", "recursive", "--partial",
                         simulated / "partial.tif", "--strong", data["labels"], "--init", trained["model"],
                         "--out", tmp_path / "r.safetensors",
                         "--device", "cpu", "--steps", "1", "--iterations", "1")
    assert_one_line_error(code, out, err, "train", "--init", "refineseg model", "recursive")
    code, out, err = run(capsys, "train", *common, "--out", tmp_path / "m.safetensors", "--init", tmp_path / "none")
    assert_one_line_error(code, out, err, "train", "--init")
    assert not (tmp_path / "r.safetensors").exists() and not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("spacing, words", [
    ("0,1", ["--spacing", "positive numbers", "'0,1'"]),
    ("-1,1", ["--spacing", "'-1,1'"]),
    ("nan,1", ["--spacing", "'nan,1'"]),
    ("1", ["--spacing", "SY,SX or Z,Y,X", "'1'"]),
    ("1,2,3,4", ["--spacing", "'1,2,3,4'"]),
    ("a,b", ["--spacing", "'a,b'"]),
])
def test_train_recursive_refuses_a_bad_spacing_in_one_line_and_writes_nothing(spacing, words, data, simulated,
                                                                              tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    code, out, err = run(capsys, "train", data["image"], "--method", "recursive", "--partial",
                         simulated / "partial.tif", "--strong", data["labels"], "--out", work / "m.safetensors",
                         "--evolution", work / "evolution.tif", "--preset", data["preset"],
                         f"--spacing={spacing}", "--device", "cpu")
    assert code == 1
    assert_one_line_error(code, out, err, "train", *words)
    assert files_under(work) == set()


def test_spacing_is_refused_for_refineseg_which_measures_no_distances(data, simulated, trained, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    code, out, err = run(capsys, "train", data["image"], "--positive", simulated / "positive.tif", "--negative",
                         simulated / "negative.tif", "--out", work / "m.safetensors", "--preset", data["preset"],
                         "--spacing", "0.5,1", "--device", "cpu")
    assert_one_line_error(code, out, err, "train", "--spacing", "refineseg", "no level set")
    code, out, err = run(capsys, "predict", trained["model"], data["image"], "--out", work / "p.tif",
                         "--spacing", "0.5,1", "--device", "cpu")
    assert_one_line_error(code, out, err, "predict", "--spacing", "refineseg")
    assert files_under(work) == set()
