"""bioimage.io export: ``coarseseg export MODEL --format bioimageio --out MODEL.zip``, end to end and offline.

Both shipped models are exported once through the command line (module fixture). Each package is
validated by bioimageio.spec (format and files: status "valid-format", its word for a passed format
check), tested by bioimageio.core's ``test_model`` (what ``bioimageio test MODEL.zip`` runs: every weight
format reproduces the test output from the test input, and runs at three sizes and two batch sizes:
status "passed"), and bioimageio.core's prediction on another crop of the sample image (320 x 384) is
compared with ``napari_coarseseg.predict``'s probabilities. Measured on a 2-core machine, one torch thread:
largest difference 1.2e-06 (refineseg, argmax equal to predict's labels everywhere) and 1.3e-06
(recursive), against the 1e-3 allowed; the module took 96 s with four jobs sharing the two cores (export
3.5 s and test_model 9 s per model when the machine was quiet).
"""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from napari_coarseseg import load_model, predict
from napari_coarseseg.bioimageio_export import MIN_SIDE, TEST_SIDE, export_bioimageio, prior_logit_offset
from napari_coarseseg.cli import main
from napari_coarseseg.samples import load_dsb_nuclei

from test_cli import assert_one_line_error, run

pytest.importorskip("bioimageio.core")
pytest.importorskip("onnxruntime")
# bioimageio.core loads the TorchScript weights with torch.jit.load, which torch 2.13 calls deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

REFINESEG, RECURSIVE = "dsb2018-nuclei-refineseg", "dsb2018-nuclei-recursive"
SHIPPED = (REFINESEG, RECURSIVE)
WEIGHTS = {"onnx", "torchscript", "pytorch_state_dict"}
# A crop of the sample image other than the test tensor's (the centred 256 x 256), not square, of a valid
# size (64 + n * 16): bioimageio.core predicts it without padding, as napari-coarseseg does (one tile).
CROP = np.s_[16:336, 100:484]
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """Both shipped models exported through ``coarseseg export``: {name: (path, stdout)}."""
    folder = tmp_path_factory.mktemp("bioimageio")
    written = {}
    for name in SHIPPED:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["export", name, "--format", "bioimageio", "--out", str(folder / f"{name}.zip")])
        assert code == 0, err.getvalue()
        written[name] = (folder / f"{name}.zip", out.getvalue())
    return written


def rdf(path: Path) -> dict:
    with zipfile.ZipFile(path) as package:
        return yaml.safe_load(package.read("rdf.yaml"))


def readme(path: Path) -> str:
    with zipfile.ZipFile(path) as package:
        return package.read("README.md").decode()


@pytest.mark.parametrize("name", SHIPPED)
def test_the_package_is_valid_for_bioimageio_spec(packages, name):
    from bioimageio.spec import load_description
    from bioimageio.spec.model import v0_5

    path, stdout = packages[name]
    assert stdout.startswith(f"wrote {path} (bioimage.io model")
    description = load_description(path, perform_io_checks=True)
    assert isinstance(description, v0_5.ModelDescr), description.validation_summary.format()
    assert description.validation_summary.status == "valid-format"
    assert not [e for detail in description.validation_summary.details for e in detail.errors]
    assert {w for w, entry in description.weights if entry is not None} == WEIGHTS


@pytest.mark.parametrize("name", SHIPPED)
def test_bioimageio_core_test_model_passes_offline_with_every_weight_format(packages, name):
    from bioimageio.core import test_model

    summary = test_model(packages[name][0])
    failed = [(d.name, [e.msg for e in d.errors]) for d in summary.details if d.status != "passed"]
    assert summary.status == "passed", failed
    reproduced = {d.loc[1] for d in summary.details if d.name.startswith("Reproduce test outputs")}
    assert reproduced == WEIGHTS
    sizes = [d for d in summary.details if d.name.startswith("Run ") and "size parameter" in d.name]
    assert len(sizes) == 3 * 6  # every weight format at n = 0, 1, 2 and batch sizes 1 and 2


@pytest.mark.parametrize("name", SHIPPED)
def test_bioimageio_core_prediction_is_napari_coarseseg_predict(packages, name):
    """Another crop of the sample image through ``bioimageio.core.predict`` (its preprocessing, the weight format
    it picks) against napari-coarseseg's predict; test_model above checks every format on the test tensor."""
    from bioimageio.core import predict as core_predict

    image = load_dsb_nuclei()[0][CROP].astype(np.float32)
    ours = predict(load_model(name), image, device="cpu")
    result = core_predict(model=packages[name][0], inputs=image[None, None])
    theirs = result.members["probabilities"].data.to_numpy()[0]
    assert theirs.shape == ours.probabilities.shape
    assert np.abs(theirs - ours.probabilities).max() < TOLERANCE
    if name == REFINESEG:  # its labels are the argmax of the prior-corrected probabilities
        assert (theirs.argmax(0) == ours.labels).mean() > 0.9999


def test_the_description_says_what_the_network_computes(packages):
    refineseg, recursive = rdf(packages[REFINESEG][0]), rdf(packages[RECURSIVE][0])
    image, probabilities = refineseg["inputs"][0], refineseg["outputs"][0]
    # The normalisation is one bioimage.io step (its percentile mapping cancels in the z-score).
    assert [p["id"] for p in image["preprocessing"] if p["id"] != "ensure_dtype"] == ["zero_mean_unit_variance"]
    sizes = {axis["id"]: axis["size"] for axis in image["axes"] if axis.get("id") in ("y", "x")}
    assert sizes == {"y": {"min": MIN_SIDE, "step": 16}, "x": {"min": MIN_SIDE, "step": 16}}  # depth 4: 2 ** 4
    assert [axis["size"] for axis in probabilities["axes"] if axis.get("id") in ("y", "x")] == [
        {"tensor_id": "image", "axis_id": "y"}, {"tensor_id": "image", "axis_id": "x"}]
    assert probabilities["axes"][1]["channel_names"] == ["background", "class_1"]
    architecture = refineseg["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]
    assert architecture["logit_offset"] == pytest.approx(prior_logit_offset(load_model(REFINESEG).card))
    assert "logit_offset" not in recursive["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]
    assert refineseg["license"] == "BSD-3-Clause"
    assert {c["url"] for c in refineseg["cite"]} == {"https://github.com/AnghongDu/RefineSeg-MICCAI2025",
                                                     "https://arxiv.org/abs/2005.13053"}
    assert all("github_user" not in author for author in refineseg["authors"])  # it needs the network
    with zipfile.ZipFile(packages[REFINESEG][0]) as package:
        names = set(package.namelist())
        card = json.loads(package.read("coarseseg_card.json"))
        assert np.load(io.BytesIO(package.read("test_input.npy"))).shape == (1, 1, TEST_SIDE, TEST_SIDE)
    assert {"cover.png", "README.md", "weights.onnx", "weights_torchscript.pt", "weights.pt",
            "coarseseg_network.py", "sample_input.tif", "sample_output.tif"} <= names
    assert card["method"] == "refineseg"


def test_the_documentation_has_validation_training_citations_and_says_what_is_exported(packages):
    refineseg, recursive = readme(packages[REFINESEG][0]), readme(packages[RECURSIVE][0])
    for text in (refineseg, recursive):
        for section in ("## Validation", "## Training summary", "## Citations", "## Licence", "## Model card"):
            assert section in text
        assert "RefineSeg" in text and "recursive approximation tasks" in text and "BSD-3-Clause" in text
    assert "Prior correction, folded into the network" in refineseg
    assert "Dice against the expert mask: **0.941**" in refineseg  # the figure of the shipped model card
    assert "T1's class probabilities" in recursive and "0.930" in recursive


def test_a_model_with_a_slice_context_is_refused_in_one_line(tmp_path):
    model = load_model(REFINESEG)
    model.card["slice_context"] = 1
    with pytest.raises(ValueError, match="slice_context"):
        export_bioimageio(model, tmp_path / "model.zip")
    assert list(tmp_path.iterdir()) == []


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: a read-only one, or /sys for root (who ignores the mode)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    for candidate in (folder, Path("/sys")):
        try:
            (candidate / "probe").touch()
        except OSError:
            return candidate
        (candidate / "probe").unlink()
    pytest.skip("no folder this user cannot write to")


@pytest.mark.parametrize("case, words", [
    ("unknown model", ["no-such-model", "does not exist"]),
    ("not a zip", [".zip"]),
    ("missing folder", ["does not exist"]),
    ("unwritable folder", ["cannot write"]),
    ("unknown format", ["--format", "onnx"]),
    ("a folder as out", ["folder"]),
    ("unknown licence", ["--license", "SPDX"]),
])
def test_bad_input_gets_one_line_and_nothing_is_written(case, words, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    model, out, extra = REFINESEG, work / "model.zip", []
    if case == "unknown model":
        model = "no-such-model"
    elif case == "not a zip":
        out = work / "model.tar"
    elif case == "missing folder":
        out = work / "missing" / "model.zip"
    elif case == "unwritable folder":
        out = unwritable_folder(tmp_path) / "model.zip"
    elif case == "unknown format":
        extra = ["--format", "onnx"]
    elif case == "a folder as out":
        out = work
    elif case == "unknown licence":
        extra = ["--license", "Not-A-Licence"]
    code, stdout, stderr = run(capsys, "export", model, "--out", out, *extra)
    assert_one_line_error(code, stdout, stderr, "export", *words)
    assert list(work.iterdir()) == [] and not out.is_file()


@pytest.mark.gui
def test_the_predict_widget_exports_the_chosen_model_with_the_chosen_image(make_napari_viewer, qtbot, errors,
                                                                           tmp_path):
    from bioimageio.spec import load_description

    from napari_coarseseg._widgets import PredictWidget

    viewer = make_napari_viewer()
    image = load_dsb_nuclei()[0][100:300, 50:230]  # 200 x 180: the package's test crop is 192 x 176
    viewer.add_image(image, name="nuclei")
    widget = PredictWidget(viewer)
    widget.model_path.setCurrentText(REFINESEG)
    assert widget.export_button.text() == "Export for bioimage.io..."
    worker = widget.export_bioimageio(tmp_path / "widget.zip")
    assert worker is not None and not widget.export_button.isEnabled()
    qtbot.waitUntil(widget.export_button.isEnabled, timeout=120_000)  # enabled again when the worker finished
    assert errors == []
    description = load_description(tmp_path / "widget.zip", perform_io_checks=True)
    assert description.validation_summary.status == "valid-format"
    with zipfile.ZipFile(tmp_path / "widget.zip") as package:
        test_input = np.load(io.BytesIO(package.read("test_input.npy")))
        test_output = np.load(io.BytesIO(package.read("test_output.npy")))
    crop = image[4:196, 2:178].astype(np.float32)  # centred
    np.testing.assert_array_equal(test_input[0, 0], crop)
    expected = predict(load_model(REFINESEG), crop, device="cpu").probabilities
    assert np.abs(test_output[0] - expected).max() < 1e-5
