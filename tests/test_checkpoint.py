"""Training checkpoints: a run stopped and resumed ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_coarseseg import load_model, run_to_end, simulate, train_recursive, train_refineseg
from napari_coarseseg.checkpoint import CheckpointError, load_checkpoint
from napari_coarseseg.cli import checkpoint_path, main

TINY = dict(base_channels=4, depth=2, patch_size=32, batch_size=4, device="cpu", seed=0)
# Resumed runs restore every random generator and optimiser moment: on one machine they are
# bit-identical to uninterrupted ones; the tolerance only allows for a different float summation order.
TOLERANCE = 1e-6


def max_difference(a, b) -> float:
    first, second = a.state_dict(), b.state_dict()
    assert first.keys() == second.keys()
    return max(float((first[k].double() - second[k].double()).abs().max()) for k in first)


def stop_at(generator, step: int):
    """Run a training generator until ``step``, then stop it, as a killed process would."""
    for event in generator:
        if event.step >= step:
            break
    generator.close()


def train_drawn(crop, **settings):
    """A refineseg run on the crop's simulated positive and negative drawings, tiny network."""
    image, _, drawings = crop
    return train_refineseg(image, [drawings.positive], [drawings.negative], **TINY, **settings)


@pytest.fixture(scope="module")
def crop(dsb_crop):
    image, labels = dsb_crop
    return image, labels, simulate(labels, instances=True)


@pytest.mark.parametrize("stop", [5, 7])
def test_refineseg_resumed_run_matches_an_uninterrupted_one(crop, tmp_path, stop):
    def run(**extra):
        return train_drawn(crop, steps=10, checkpoint_every=3, evolution_every=4, **extra)

    uninterrupted = run_to_end(run())
    path = tmp_path / "run.checkpoint"
    stop_at(run(checkpoint=path), stop)
    assert load_checkpoint(path)["step"] == 3 * (stop // 3)  # at most checkpoint_every steps are lost
    events = []
    resumed = run_to_end(run(checkpoint=path, resume=True), events.append)
    assert events[0].step == 3 * (stop // 3) and "resumed" in events[0].message
    assert [e.step for e in events[1:]] == list(range(3 * (stop // 3) + 1, 11))
    assert max_difference(uninterrupted, resumed) <= TOLERANCE


def test_recursive_resumed_run_matches_with_its_approximations(crop, tmp_path):
    image, labels, drawings = crop
    settings = dict(TINY, steps=4, iterations=3, checkpoint_every=3)
    strong = (labels > 0).astype(np.uint8)

    def run(**extra):
        return train_recursive([image, image], [drawings.partial, drawings.partial], [strong, None],
                               **settings, **extra)

    masks = []
    uninterrupted = run_to_end(run(), lambda e: masks.append(e.masks) if e.masks is not None else None)
    path = tmp_path / "run.checkpoint"
    stop_at(run(checkpoint=path), 7)  # in iteration 2; checkpoints at 3, 4 (after growth) and 6
    assert load_checkpoint(path)["step"] == 6
    resumed_masks = []
    resumed = run_to_end(run(checkpoint=path, resume=True),
                         lambda e: resumed_masks.append(e.masks) if e.masks is not None else None)
    assert max_difference(uninterrupted, resumed) <= TOLERANCE
    assert len(resumed_masks) == 2  # iterations 2 and 3
    for a, b in zip(masks[-1], resumed_masks[-1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_refuses_a_checkpoint_of_another_run(crop, tmp_path):
    path = tmp_path / "run.checkpoint"
    stop_at(train_drawn(crop, checkpoint=path, steps=6, checkpoint_every=2), 3)
    with pytest.raises(CheckpointError, match="another training run"):
        run_to_end(train_drawn(crop, checkpoint=path, resume=True, steps=8, checkpoint_every=2))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable napari-coarseseg checkpoint"):
        run_to_end(train_drawn(crop, checkpoint=path, resume=True, steps=6, checkpoint_every=2))


def test_checkpoint_holds_no_pickle_and_is_written_atomically(crop, tmp_path):
    path = tmp_path / "run.checkpoint"
    stop_at(train_drawn(crop, checkpoint=path, steps=4, checkpoint_every=2), 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.checkpoint"]  # no temporary file left
    header = load_checkpoint(path)["header"]
    json.dumps(header)  # plain JSON next to raw tensors
    assert header["step"] == 4 and len(header["fingerprint"]) == 16


def test_cli_interrupted_then_resumed(crop, tmp_path, capsys, monkeypatch):
    """Ctrl-C in `coarseseg train` keeps the checkpoint and says how to resume; --resume finishes the run."""
    from napari_coarseseg import cli

    image, _, drawings = crop
    files = {}
    for name, array in {"image": image, "positive": drawings.positive, "negative": drawings.negative}.items():
        files[name] = tmp_path / f"{name}.tif"
        tifffile.imwrite(files[name], array)
    preset = tmp_path / "tiny.json"
    preset.write_text(json.dumps({k: v for k, v in TINY.items() if k not in ("device", "seed")}))
    arguments = ["train", str(files["image"]), "--positive", str(files["positive"]), "--negative",
                 str(files["negative"]), "--preset", str(preset), "--steps", "9", "--checkpoint-every", "3",
                 "--device", "cpu", "--quiet"]
    reference = tmp_path / "reference.safetensors"
    assert main(arguments + ["--out", str(reference)]) == 0
    assert not checkpoint_path(reference).exists()  # removed once the model is written

    model = tmp_path / "model.safetensors"
    original_call = cli._Progress.__call__

    def interrupt_at_step_7(self, event):
        if event.step == 7:
            raise KeyboardInterrupt
        original_call(self, event)

    monkeypatch.setattr(cli._Progress, "__call__", interrupt_at_step_7)
    capsys.readouterr()
    assert main(arguments + ["--out", str(model)]) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and len(err.strip().splitlines()) == 1
    assert not model.exists() and load_checkpoint(checkpoint_path(model))["step"] == 6
    monkeypatch.setattr(cli._Progress, "__call__", original_call)
    assert main(arguments + ["--out", str(model), "--resume"]) == 0
    assert not checkpoint_path(model).exists()
    assert max_difference(load_model(reference).network, load_model(model).network) <= TOLERANCE
    # --resume with nothing to resume from: one line, non-zero exit.
    capsys.readouterr()
    assert main(arguments + ["--out", str(tmp_path / "other.safetensors"), "--resume"]) == 1
    assert "there is no checkpoint" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_of_another_method(crop, tmp_path):
    image, labels, drawings = crop
    path = tmp_path / "run.checkpoint"
    stop_at(train_drawn(crop, checkpoint=path, steps=4, checkpoint_every=2), 2)
    with pytest.raises(CheckpointError, match="another training run"):
        run_to_end(train_recursive(image, drawings.partial, (labels > 0).astype(np.uint8), checkpoint=path,
                                   resume=True, steps=2, iterations=2, checkpoint_every=2, **TINY))
