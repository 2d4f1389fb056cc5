"""The npe2 manifest (napari.yaml) and the sample-data contribution it declares."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

import napari_coarseseg
from napari_coarseseg.annotations import ROLE_KEY
from napari_coarseseg.samples import DSB_NUCLEI, sample_data_dir

npe2 = pytest.importorskip("npe2")

DISTRIBUTION = "napari-coarseseg"
MANIFEST = Path(napari_coarseseg.__file__).parent / "napari.yaml"
SAMPLE_COMMAND = "napari_coarseseg.samples:dsb_nuclei_layers"


def resolve(python_name: str):
    module, _, attribute = python_name.partition(":")
    return getattr(importlib.import_module(module), attribute)


@pytest.fixture(scope="module")
def manifest():
    return npe2.PluginManifest.from_file(MANIFEST)


@pytest.fixture(scope="module")
def sample_layers():
    return resolve(SAMPLE_COMMAND)()


def test_manifest_file_is_valid(manifest):
    assert manifest.name == DISTRIBUTION
    assert manifest.display_name


def test_installed_distribution_exposes_a_valid_manifest(manifest):
    """What `npe2 validate napari-coarseseg --imports` checks: the entry point and every python_name."""
    installed = npe2.PluginManifest.from_distribution(DISTRIBUTION)
    assert installed.name == manifest.name
    installed.validate_imports()  # raises if a python_name cannot be imported
    assert installed.package_version == napari_coarseseg.__version__


def test_sample_data_contribution_points_to_the_loader(manifest):
    commands = {c.id: c for c in manifest.contributions.commands}
    samples = manifest.contributions.sample_data
    assert samples, "the manifest declares no sample data"
    by_key = {s.key: s for s in samples}
    assert DSB_NUCLEI in by_key
    command = commands[by_key[DSB_NUCLEI].command]
    assert command.python_name == SAMPLE_COMMAND
    assert resolve(command.python_name) is napari_coarseseg.samples.dsb_nuclei_layers


def test_nifti_reader_and_labels_writer_point_to_the_glue(manifest):
    commands = {c.id: c for c in manifest.contributions.commands}
    [reader] = manifest.contributions.readers
    assert set(reader.filename_patterns) == {"*.nii", "*.nii.gz"} and not reader.accepts_directories
    assert resolve(commands[reader.command].python_name) is napari_coarseseg._nifti_napari.get_reader
    [writer] = manifest.contributions.writers
    assert [str(t) for t in writer.layer_types] == ["labels"]
    assert writer.filename_extensions == [".nii.gz", ".nii"]  # compressed first: the default for a bare name
    assert resolve(commands[writer.command].python_name) is napari_coarseseg._nifti_napari.write_labels


def test_npe2_picks_the_nifti_reader_and_writer_by_file_name(manifest):
    plugins = npe2.PluginManager()
    plugins.register(manifest)
    for name in ("scan.nii.gz", "SCAN.NII"):
        assert [r.command for r in plugins.iter_compatible_readers([name])] == ["napari-coarseseg.read_nifti"]
    assert list(plugins.iter_compatible_readers(["image.tif"])) == []
    for name in ("prediction.nii.gz", "prediction.nii"):
        writer, path = plugins.get_writer(name, ["labels"])
        assert writer.command == "napari-coarseseg.write_nifti_labels" and path == name
    assert plugins.get_writer("prediction.nii.gz", ["image"])[0] is None  # labels only
    assert plugins.get_writer("prediction", ["labels"])[1] == "prediction.nii.gz"


def test_sample_layers_are_image_positive_negative_expert(sample_layers):
    assert isinstance(sample_layers, list) and len(sample_layers) == 4
    for layer in sample_layers:
        assert isinstance(layer, tuple) and len(layer) == 3
        data, meta, kind = layer
        assert isinstance(meta, dict) and meta.get("name")
        assert data.shape == (512, 512)
    assert [kind for _, _, kind in sample_layers] == ["image", "labels", "labels", "labels"]

    image, positive, negative, expert = (layer[0] for layer in sample_layers)
    folder = sample_data_dir() / DSB_NUCLEI
    np.testing.assert_array_equal(image, tifffile.imread(folder / "image.tif"))
    np.testing.assert_array_equal(expert, tifffile.imread(folder / "labels.tif"))
    for labels in (positive, negative, expert):
        assert np.issubdtype(labels.dtype, np.integer)
        assert labels.min() >= 0
    assert len(np.unique(expert)) - 1 == 125  # DESIGN.md: 125 nuclei
    # Drawings follow the label conventions: positive inside nuclei (class 1), negative outside.
    assert positive.any() and negative.any()
    assert set(np.unique(positive)) == {0, 1} and set(np.unique(negative)) == {0, 1}
    assert not (positive.astype(bool) & (expert == 0)).any()
    assert not (negative.astype(bool) & (expert > 0)).any()
    # Every name is distinct: napari would otherwise rename layers.
    assert len({meta["name"] for _, meta, _ in sample_layers}) == 4
    # The drawings carry their roles, so the Train widget preselects them.
    assert [meta.get("metadata", {}).get(ROLE_KEY) for _, meta, _ in sample_layers] == [
        None, "positive", "negative", None]


def test_tiles_sample_has_partial_masks_everywhere_and_exact_masks_on_one_tile(manifest):
    by_key = {s.key: s for s in manifest.contributions.sample_data}
    commands = {c.id: c for c in manifest.contributions.commands}
    layers = resolve(commands[by_key["dsb2018_nuclei_tiles"].command].python_name)()
    assert [kind for _, _, kind in layers] == ["image", "labels", "labels", "labels"]
    (image, _, _), (partial, partial_meta, _), (strong, strong_meta, _), (expert, _, _) = layers
    assert image.shape == partial.shape == strong.shape == expert.shape == (16, 128, 128)
    full_image, full_expert = napari_coarseseg.samples.load_dsb_nuclei()
    np.testing.assert_array_equal(image[5], full_image[128:256, 128:256])  # row 1, column 1
    np.testing.assert_array_equal(expert[5], full_expert[128:256, 128:256])
    assert partial_meta["metadata"][ROLE_KEY] == "partial" and strong_meta["metadata"][ROLE_KEY] == "strong"
    labelled = [i for i in range(16) if strong[i].any()]
    assert labelled == [napari_coarseseg.samples.STRONG_TILE]
    np.testing.assert_array_equal(strong[labelled[0]], expert[labelled[0]] > 0)
    # Partial masks: inside the nuclei, on every tile that has nuclei, well under the full area.
    assert not (partial.astype(bool) & (expert == 0)).any()
    assert all(partial[i].any() for i in range(16) if expert[i].any())
    assert 0.2 < (partial > 0).sum() / (expert > 0).sum() < 0.7


def test_volume_sample_opens_the_nifti_files_with_their_spacing_grid_and_roles(manifest):
    by_key = {s.key: s for s in manifest.contributions.sample_data}
    commands = {c.id: c for c in manifest.contributions.commands}
    layers = resolve(commands[by_key["isbi2012_em_volume"].command].python_name)()
    assert [kind for _, _, kind in layers] == ["image", "labels", "labels", "labels"]
    assert all(data.shape == (8, 128, 128) and meta["scale"] == pytest.approx((0.05, 0.004, 0.004))
               and meta["metadata"]["nifti"].shape == (8, 128, 128) for data, meta, _ in layers)
    assert [meta["metadata"].get(ROLE_KEY) for _, meta, _ in layers] == [None, "positive", "negative", None]
    drawn = [z for z in range(8) if layers[1][0][z].any() or layers[2][0][z].any()]
    assert drawn == [2, 5]  # strokes on two slices of eight

def test_as_tiles_rejects_a_ragged_shape():
    with pytest.raises(ValueError, match="not a whole number of 128 x 128 tiles"):
        napari_coarseseg.samples.as_tiles(np.zeros((300, 256)))


def test_sample_layers_are_accepted_by_napari(sample_layers):
    layers = pytest.importorskip("napari.layers")
    made = [layers.Layer.create(data, meta, kind) for data, meta, kind in sample_layers]
    assert [type(layer).__name__ for layer in made] == ["Image", "Labels", "Labels", "Labels"]
    assert [layer.name for layer in made] == [meta["name"] for _, meta, _ in sample_layers]


def test_sample_data_dir_exists():
    folder = sample_data_dir()
    assert folder.is_dir()
    for name in ("image.tif", "labels.tif"):
        assert (folder / DSB_NUCLEI / name).is_file(), name
