"""The README's figures are rewritten from the benchmark results (benchmarks/run_all.py)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def run_all(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    yield importlib.import_module("run_all")
    sys.modules.pop("run_all", None)
    sys.modules.pop("report", None)


README = """# Project

Set-up text.

<!-- results:demo -->
old demo figures
<!-- /results:demo -->

## Benchmarks

<!-- results:speed -->
<!-- /results:speed -->

Text after.
"""


def test_update_readme_replaces_each_block_with_its_results_file(tmp_path, run_all):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    (tmp_path / "demo.md").write_text("Demo: 70 s, Dice 0.939.\n")
    (tmp_path / "speed.md").write_text("| measure | now |\n|---|---|\n| step | 181 ms |\n\n")

    written = run_all.update_readme(readme, tmp_path)

    assert written == ["demo", "speed"]
    assert readme.read_text() == README.replace("old demo figures\n", "Demo: 70 s, Dice 0.939.\n").replace(
        "<!-- results:speed -->\n", "<!-- results:speed -->\n| measure | now |\n|---|---|\n| step | 181 ms |\n")
    # Running it again changes nothing: the blocks' markers stay in place.
    run_all.update_readme(readme, tmp_path)
    assert "Demo: 70 s" in readme.read_text() and readme.read_text().count("<!-- results:") == 2


def test_update_readme_refuses_a_block_no_benchmark_wrote_and_leaves_the_readme(tmp_path, run_all):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    (tmp_path / "demo.md").write_text("Demo figures.\n")

    with pytest.raises(FileNotFoundError, match="speed.md"):
        run_all.update_readme(readme, tmp_path)
    assert readme.read_text() == README


def test_every_figure_block_of_the_readme_names_a_benchmark_run_all_runs(run_all):
    import re

    names = re.findall(r"<!-- results:(\w+) -->\n", run_all.README.read_text())
    assert set(names) == set(run_all.BENCHMARKS), "each benchmark has one block in the README, and only those"


@pytest.fixture
def realdata(import_benchmark):
    return import_benchmark("realdata")


def test_realdata_chooses_each_variant_on_validation_never_on_test(realdata):
    """The variant with the best mean validation Dice is reported, whatever its test Dice."""

    def record(variant, seed, val, test):
        return {"dataset": "d", "method": "m", "variant": variant, "bias": 0, "annotators": 1, "seed": seed,
                "val": {"dice": val}, "test": {"dice": test}}

    runs = {str(i): r for i, r in enumerate([
        record("good on test", 0, 0.80, 0.99), record("good on test", 1, 0.82, 0.99),
        record("good on val", 0, 0.90, 0.70), record("good on val", 1, 0.88, 0.71),
        record("other bias", 0, 0.99, 0.99) | {"bias": 2},
    ])}
    variant, chosen = realdata.selected(runs, "d", "m")
    assert variant == "good on val"
    assert [r["seed"] for r in chosen] == [0, 1]
    assert realdata.selected(runs, "d", "m", bias=2)[0] == "other bias"
    assert realdata.selected(runs, "other", "m") == (None, [])


def test_best_fixed_prior_strength_is_the_smallest_within_half_a_hundredth_of_the_best_validation_mean(realdata):
    """Validation Dice only, averaged over seeds and data sets; test scores play no part; the preset is the auto row."""

    def record(dataset, tau, seed, val):
        variant = "preset" if tau == "auto" else f"preset, prior strength {tau}"
        return {"dataset": dataset, "method": "refineseg", "variant": variant, "bias": 0, "annotators": 1,
                "seed": seed, "val": {"dice": val}, "test": {"dice": 1.0 - val}}

    # Means over both sets: tau 1: 0.80, 2: 0.86, 3: 0.87, 4: 0.872 (best), 6: 0.50.
    values = {1: (0.80, 0.80), 2: (0.86, 0.86), 3: (0.87, 0.87), 4: (0.874, 0.870), 6: (0.5, 0.5),
              "auto": (0.9, 0.8)}
    runs = {f"{d}{tau}{seed}": record(d, tau, seed, values[tau][i] + (0.01 if seed else -0.01))
            for i, d in enumerate(("a", "b")) for tau in values for seed in (0, 1)}
    lines, figures = realdata.prior_strength_table(runs, ["a", "b"])
    assert figures["best_fixed"] == 3
    assert figures["val_dice"]["4"] == pytest.approx({"a": 0.874, "b": 0.870})
    assert figures["val_dice"]["auto (the default)"] == pytest.approx({"a": 0.9, "b": 0.8})
    assert any(line.startswith("| 3 (best fixed) |") for line in lines)
    assert any(line.startswith("| auto (the default) | 0.900 | 0.800 | 0.850 |") for line in lines)
    assert realdata.prior_strength_table({}, ["a"]) == ([], {})


def test_realdata_splits_share_no_image(realdata):
    """Train, validation and test hold different quadrants / slices, and EM slices are far apart."""
    for splits in (realdata.DSB_SPLITS, realdata.EM_SPLITS):
        seen = [item for split in ("train", "val", "test") for item in splits[split]]
        assert len(seen) == len(set(seen))
    em = realdata.EM_SPLITS
    assert min(em["val"]) - max(em["train"]) >= 5 and min(em["test"]) - max(em["val"]) >= 5


def test_seconds_to_final_is_the_first_time_within_a_hundredth_of_the_final_dice(realdata):
    truth = np.zeros((1, 10, 10), int)
    truth[0, :, :5] = 1

    def masks(columns):
        mask = np.zeros((10, 10), int)
        mask[:, :columns] = 1
        return [mask]

    # Dice 0.667 at 1 s, 0.889 at 2 s, 1.0 at 3 s and at 4 s: the first within 0.01 of the final is 3 s.
    evolution = [(1.0, masks(10)), (2.0, masks(4)), (3.0, masks(5)), (4.0, masks(5))]
    assert realdata.seconds_to_final(evolution, list(truth)) == 3.0
    assert realdata.seconds_to_final(evolution, list(truth), tolerance=0.12) == 2.0
    assert realdata.seconds_to_final([], list(truth)) is None


@pytest.fixture
def baselines(import_benchmark):
    return import_benchmark("baselines")


def test_annotation_gap_of_forest_labels_is_the_median_distance_from_object_to_background_strokes(baselines):
    labels = np.zeros((3, 12), int)
    labels[:, 0] = 1  # background strokes in column 0
    labels[0, 4] = labels[1, 6] = labels[2, 11] = 2  # object strokes 4, 6 and 11 px away
    only_objects = np.where(labels == 2, 2, 0)
    images = np.random.default_rng(0).random((2, *labels.shape)).astype(np.float32)
    assert baselines.annotation_gap(list(images), [labels, only_objects]) == 6.0
    assert baselines.annotation_gap(list(images[:1]), [only_objects]) is None


def test_forest_prior_readings_shrink_a_class_drawn_more_often_than_it_occurs(baselines):
    """Strokes drawn half on the bright blobs, which cover a tenth of the image: EM's prior puts the blobs below
    their drawn share, so every correction labels fewer pixels blob than the forest's own argmax, more so the
    stronger it is, and the automatic strength is the one prior_strength_for_gap gives the drawings' gap."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    blobs = ((yy % 32 - 16) ** 2 + (xx % 32 - 16) ** 2) < 36  # nine disks of radius 6: 11 % of the image
    image = gaussian_filter(blobs.astype(float), 2) + rng.normal(0, 0.15, blobs.shape)
    labels = np.zeros(blobs.shape, int)
    labels[(yy % 32 == 16) & (abs(xx % 32 - 16) < 3)] = 2  # short strokes through the blob centres
    labels[(yy % 32 == 0) & (xx % 4 == 0)] = 1  # as many background pixels, between the blobs
    forest = baselines.ilastik_forest_fit([image], [labels], n_estimators=20, n_jobs=1)
    readings = baselines.forest_prior_readings(forest, [image], [labels], strengths=(1, 4))
    assert set(readings) == {"", ", prior auto", ", prior strength 1", ", prior strength 4"}
    blob_pixels = {suffix: int(read(image).sum()) for suffix, read in readings.items()}
    assert blob_pixels[", prior strength 4"] < blob_pixels[", prior strength 1"] < blob_pixels[""]
    # The blob strokes lie about 16 px from the background rows: prior_strength_for_gap(16) is 1.
    assert baselines.annotation_gap([image], [labels]) == pytest.approx(16.0, abs=0.1)
    np.testing.assert_array_equal(readings[", prior auto"](image), readings[", prior strength 1"](image))
