"""Training (training.py, methods/_loop.py, methods/refineseg.py): reproducibility, cancelling, events, presets,
devices, a quality floor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_coarseseg import (
    AnnotationError,
    TrainingConfig,
    list_presets,
    load_preset,
    predict,
    run_to_end,
    select_device,
    train_refineseg,
)
from napari_coarseseg.data import TrainingImages
from napari_coarseseg.losses import edge_aware_smoothness
from napari_coarseseg.methods import _loop, refineseg
from napari_coarseseg.training import models_dir

from conftest import TINY


def train(discs, drawings, callback=None, **changes):
    image, _ = discs
    settings = dict(TINY, **changes)
    return run_to_end(train_refineseg(image, [drawings.positive], [drawings.negative], **settings), callback)


def dice(prediction, truth) -> float:
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    return 2 * np.logical_and(prediction, truth).sum() / (prediction.sum() + truth.sum())


# --------------------------------------------------------------------------- reproducibility


def test_same_seed_same_run_other_seed_other_run(discs, disc_drawings):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        events = []
        model = train(discs, disc_drawings, events.append, seed=seed, steps=6)
        runs[name] = ([e.losses for e in events], model.state_dict(), model.card)
    losses_a, state_a, card_a = runs["a"]
    losses_b, state_b, card_b = runs["b"]
    losses_c, state_c, _ = runs["c"]
    assert len(losses_a) == 7 and losses_a[0] == {}
    assert losses_a == losses_b
    assert card_a["training"]["final_losses"] == card_b["training"]["final_losses"] == losses_a[-1]
    assert card_a["prior"] == card_b["prior"]
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert losses_a[-1] != losses_c[-1]
    assert any(not torch.equal(state_a[k], state_c[k]) for k in state_a)


# --------------------------------------------------------------------------- cancelling


def test_closing_the_generator_stops_training(discs, disc_drawings, monkeypatch):
    batches, moved_to_cpu = [], []

    class CountingSampler(_loop.PatchSampler):
        def batch(self, n):
            batches.append(n)
            return super().batch(n)

    class RecordingUNet(refineseg.UNet):
        def cpu(self):
            moved_to_cpu.append(len(batches))
            return super().cpu()

    monkeypatch.setattr(_loop, "PatchSampler", CountingSampler)
    monkeypatch.setattr(refineseg, "UNet", RecordingUNet)
    image, _ = discs
    generator = train_refineseg(image, [disc_drawings.positive], [disc_drawings.negative],
                                **dict(TINY, steps=50, evolution_every=10))
    events = [next(generator) for _ in range(4)]
    assert [e.step for e in events] == [0, 1, 2, 3]
    loop = generator.gi_yieldfrom.gi_frame.f_locals["self"]  # the TrainingLoop that train_refineseg runs
    network, heads = loop.modules["network"], loop.modules["heads"]
    parameters_before = [p.detach().clone() for p in network.parameters()]
    assert moved_to_cpu == []
    generator.close()
    assert len(batches) == 3, "no step after the last event pulled"
    assert moved_to_cpu == [3], "the network goes back to the CPU when training is cancelled"
    with pytest.raises(StopIteration):
        next(generator)
    assert len(batches) == 3
    for before, after in zip(parameters_before, network.parameters(), strict=True):
        assert torch.equal(before, after)
    assert all(p.device.type == "cpu" for p in list(network.parameters()) + list(heads.parameters()))


def test_closing_before_the_first_step(discs, disc_drawings, monkeypatch):
    batches = []

    class CountingSampler(_loop.PatchSampler):
        def batch(self, n):
            batches.append(n)
            return super().batch(n)

    monkeypatch.setattr(_loop, "PatchSampler", CountingSampler)
    image, _ = discs
    generator = train_refineseg(image, [disc_drawings.positive], [disc_drawings.negative], **TINY)
    first = next(generator)
    assert first.step == 0 and first.masks is not None
    generator.close()
    assert batches == []


# --------------------------------------------------------------------------- events


@pytest.mark.parametrize(
    "steps, every, expected",
    [(7, 3, [0, 3, 6, 7]), (6, 3, [0, 3, 6]), (4, 0, [0, 4]), (1, 5, [0, 1]), (5, 1, [0, 1, 2, 3, 4, 5])],
)
def test_events_carry_masks_on_schedule(discs, disc_drawings, steps, every, expected):
    events = []
    train(discs, disc_drawings, events.append, steps=steps, evolution_every=every)
    assert [e.step for e in events] == list(range(steps + 1))
    assert all(e.total_steps == steps for e in events)
    with_masks = [e.step for e in events if e.masks is not None]
    assert with_masks == expected
    # iteration counts the mask checkpoints, 0 = the drawings
    checkpoint = 0
    for e in events:
        if e.masks is not None and e.step > 0:
            checkpoint += 1
        assert e.iteration == checkpoint
    first = events[0]
    assert first.losses == {} and first.iteration == 0
    assert len(first.masks) == 1
    np.testing.assert_array_equal(first.masks[0], disc_drawings.positive)
    for e in events[1:]:
        assert set(e.losses) == {"total", "positive", "negative", "regulariser"}
        assert all(np.isfinite(v) for v in e.losses.values())
        assert e.losses["total"] == pytest.approx(e.losses["positive"] + e.losses["negative"]
                                                  + 0.2 * e.losses["regulariser"], rel=1e-5)
        assert e.elapsed >= 0
    for e in events:
        if e.masks is not None:
            assert e.masks[0].shape == discs[0].shape
            assert e.masks[0].dtype == np.uint8
            assert set(np.unique(e.masks[0])) <= {0, 1}


def test_events_on_a_stack_and_two_images(discs, disc_drawings):
    image, _ = discs
    stack = np.stack([image[:32, :32], image[32:, 32:]])
    positive = np.stack([disc_drawings.positive[:32, :32], disc_drawings.positive[32:, 32:]])
    events = []
    run_to_end(train_refineseg([stack, image], [[positive, disc_drawings.positive]], [[None, disc_drawings.negative]],
                               **dict(TINY, steps=2)), events.append)
    masks = [e.masks for e in events if e.masks is not None]
    assert len(masks) == 2
    assert [m.shape for m in masks[0]] == [stack.shape, image.shape]
    np.testing.assert_array_equal(masks[0][0], positive)
    assert [m.shape for m in masks[-1]] == [stack.shape, image.shape]


def test_final_masks_are_what_predict_gives(discs, disc_drawings):
    events = []
    model = train(discs, disc_drawings, events.append, steps=8)
    prediction = predict(model, discs[0], device="cpu")
    np.testing.assert_array_equal(events[-1].masks[0], prediction.labels)


# --------------------------------------------------------------------------- quality floor


def test_learns_discs_from_coarse_drawings(discs, disc_drawings, disc_model):
    """150 steps of an 8-channel U-Net on the disc image (conftest.disc_model)."""
    image, mask = discs
    prediction = predict(disc_model, image, device="cpu")
    score = dice(prediction.labels > 0, mask > 0)
    assert score > 0.8, f"foreground Dice {score:.3f}"
    # better than the positive drawing itself (which misses every boundary band)
    assert score > dice(disc_drawings.positive > 0, mask > 0)
    card = disc_model.card
    assert card["training"]["steps"] == 150 and card["network"]["base_channels"] == 8
    assert card["heads"] == ["positive 1", "negative 1"]



# --------------------------------------------------------------------------- the no-heads control


def test_without_heads_the_loss_is_partial_cross_entropy_and_dice_of_p(discs, disc_drawings):
    """transition_heads="none": q = p, so the loss is alpha CE + beta Dice of p on the positive strokes plus
    -log(1 - p_k) on the "not k" strokes (two labels), and nothing else; the model has no head."""
    image, _ = discs
    images = TrainingImages(image)
    drawings = refineseg.RefinesegDrawings(images, [disc_drawings.positive], [disc_drawings.negative])
    settings = {k: v for k, v in TINY.items() if k != "device"}
    config = load_preset("refineseg").replace(transition_heads="none", **settings)
    loop = refineseg.RefinesegTraining(images, drawings, config, seed=0, device="cpu")
    assert len(loop.modules["heads"]) == 0
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, generator=generator)
    positive = torch.full((2, 8, 8), -1)
    positive[:, 2:5, 2:5] = 1
    positive[:, 0, :] = 0
    negative = torch.full((2, 8, 8), -1)
    negative[:, 6:, :] = 1  # "not class 1"
    terms = loop.loss_terms((logits, []), [positive, negative], torch.zeros(2, 1, 8, 8))

    p = torch.softmax(logits, dim=1)
    drawn = positive >= 0
    p_drawn = p.gather(1, positive.clamp(min=0)[:, None])[:, 0][drawn]
    cross_entropy = -torch.log(p_drawn).mean()
    dice_per_class = []
    for k in (0, 1):
        target_k = (positive == k) & drawn
        dice_per_class.append(2 * (p[:, k] * target_k).sum() / (p[:, k][drawn].sum() + target_k.sum()))
    expected_positive = 0.6 * cross_entropy + 0.4 * (1 - torch.stack(dice_per_class).mean())
    expected_negative = -torch.log(1 - p[:, 1][negative >= 0]).mean()
    assert torch.allclose(terms["positive"], expected_positive, atol=1e-5)
    assert torch.allclose(terms["negative"], expected_negative, atol=1e-5)
    assert float(terms["regulariser"]) == 0
    model = run_to_end(train_refineseg(image, [disc_drawings.positive], [disc_drawings.negative],
                                       transition_heads="none", **TINY))
    assert len(model.heads) == 0 and model.card["network"]["n_heads"] == 0
    assert predict(model, image, device="cpu").labels.shape == image.shape

# --------------------------------------------------------------------------- input errors


def test_training_input_errors(discs, disc_drawings):
    image, _ = discs
    with pytest.raises(AnnotationError, match="no positive drawing"):
        next(train_refineseg(image, [], [disc_drawings.negative], **TINY))
    with pytest.raises(AnnotationError, match="shape"):
        next(train_refineseg(image, [disc_drawings.positive[:10]], **TINY))
    with pytest.raises(AnnotationError, match="number of classes is 1"):
        next(train_refineseg(image, [disc_drawings.positive * 2], n_classes=1, **TINY))
    with pytest.raises(AnnotationError, match="from 1 to 255, got 256"):
        next(train_refineseg(image, [disc_drawings.positive], n_classes=256, **TINY))
    with pytest.raises(AnnotationError, match="0 and 255: a binary mask"):
        next(train_refineseg(image, [(disc_drawings.positive > 0) * 255], [disc_drawings.negative], **TINY))
    with pytest.raises(ValueError, match="patch_size 30 must be a multiple"):
        next(train_refineseg(image, [disc_drawings.positive], **dict(TINY, patch_size=30)))
    with pytest.raises(ValueError, match="unknown training settings"):
        next(train_refineseg(image, [disc_drawings.positive], learning_speed=3, **TINY))


# --------------------------------------------------------------------------- devices


def test_select_device_auto_and_cpu():
    if torch.cuda.is_available():
        expected = "cuda"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        expected = "mps"
    else:
        expected = "cpu"
    assert select_device("auto").type == expected
    assert select_device(None).type == expected
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("CPU") == torch.device("cpu")
    assert select_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_select_device_cuda_without_gpu(name):
    with pytest.raises(ValueError, match="no CUDA GPU is available; use --device cpu or auto"):
        select_device(name)


def test_select_device_unknown():
    with pytest.raises(ValueError, match="unknown device 'tpu'; use auto, cpu, cuda or mps"):
        select_device("tpu")


# --------------------------------------------------------------------------- presets


def test_presets():
    names = list_presets()
    assert "refineseg" in names and "refineseg-paper" in names
    for name in names:
        config = load_preset(name)
        settings = json.loads((models_dir() / f"{name}.json").read_text())
        for key, value in settings.items():
            if key not in ("description", "method"):
                assert getattr(config, key) == value, (name, key)
    default = load_preset("refineseg")
    assert isinstance(default, TrainingConfig)
    assert (default.alpha, default.beta, default.regulariser_weight) == (0.6, 0.4, 0.2)
    # The default trains without the paper's transition heads (they lost on validation); the paper's preset has them.
    assert default.transition_heads == "none" and load_preset("refineseg-paper").transition_heads == "all"
    # Serial sections: the same, each slice normalised on its own, nothing else changed.
    sections = load_preset("refineseg-sections")
    assert (sections.transition_heads, sections.normalisation) == ("none", "slice")
    assert sections.replace(normalisation="image") == default


def test_preset_from_a_json_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"steps": 7, "base_channels": 4, "depth": 2, "patch_size": 32}))
    config = load_preset(str(path))
    assert (config.steps, config.base_channels, config.depth, config.patch_size) == (7, 4, 2, 32)
    assert config.batch_size == TrainingConfig().batch_size


def test_unknown_preset_names_the_available_ones():
    with pytest.raises(ValueError, match="unknown preset 'fastest'") as info:
        load_preset("fastest")
    for name in list_presets():
        assert name in str(info.value)


def test_positive_heads_only_hold_negative_layers_at_the_identity(discs, disc_drawings):
    """transition_heads="positive": one head per positive layer; the negative loss is -log(1 - p_k) of p itself."""
    image, _ = discs
    images = TrainingImages(image)
    drawings = refineseg.RefinesegDrawings(images, [disc_drawings.positive], [disc_drawings.negative])
    settings = {k: v for k, v in TINY.items() if k != "device"}
    loop = refineseg.RefinesegTraining(images, drawings, load_preset("refineseg").replace(
        transition_heads="positive", **settings), seed=0, device="cpu")
    assert len(loop.modules["heads"]) == 1
    logits = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    positive = torch.full((2, 8, 8), -1)
    negative = torch.full((2, 8, 8), -1)
    negative[:, :3] = 1
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).view(1, 2, 2, 1, 1).expand(2, 2, 2, 8, 8)
    terms = loop.loss_terms((logits, [swapped]), [positive, negative], torch.zeros(2, 1, 8, 8))
    p = torch.softmax(logits, dim=1)
    assert torch.allclose(terms["negative"], -torch.log(1 - p[:, 1][negative >= 0]).mean(), atol=1e-5)
    with pytest.raises(ValueError, match="transition_heads"):
        load_preset("refineseg").replace(transition_heads="some").validate()


def test_smoothness_term_is_added_with_its_weight(discs, disc_drawings):
    """smoothness_weight w > 0: the total gains w times the edge-aware smoothness of p on the batch's images."""
    image, _ = discs
    images = TrainingImages(image)
    drawings = refineseg.RefinesegDrawings(images, [disc_drawings.positive], [disc_drawings.negative])
    settings = {k: v for k, v in TINY.items() if k != "device"}
    logits = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    batch = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    positive = torch.full((2, 8, 8), -1)
    positive[:, 2:5, 2:5] = 1
    negative = torch.full((2, 8, 8), -1)
    negative[:, 6:] = 1
    totals = {}
    for weight in (0.0, 2.5):
        config = load_preset("refineseg").replace(transition_heads="none", smoothness_weight=weight,
                                                  smoothness_sigma=0.3, **settings)
        loop = refineseg.RefinesegTraining(images, drawings, config, seed=0, device="cpu")
        totals[weight] = loop.loss_terms((logits, []), [positive, negative], batch)
    assert "smoothness" not in totals[0.0]
    expected = edge_aware_smoothness(torch.softmax(logits, 1), batch, sigma=0.3)
    assert torch.allclose(totals[2.5]["smoothness"], expected)
    assert torch.allclose(totals[2.5]["total"], totals[0.0]["total"] + 2.5 * expected)
    with pytest.raises(ValueError, match="smoothness"):
        load_preset("refineseg").replace(smoothness_sigma=0).validate()


def test_patches_of_a_volume_drawn_on_some_slices_come_from_those_slices_only():
    # Strokes on slices 1 and 3 of 5: no patch is spent on a slice with nothing in the loss, the uniform ones too.
    from napari_coarseseg.data import PatchSampler

    planes = [np.zeros((1, 40, 40), np.float32) for _ in range(5)]
    target = np.full((5, 40, 40), -1)
    target[1, 10:12, 10:30] = 1
    target[3, 30, 5:9] = 0
    sampler = PatchSampler(planes, [list(target)], 16, drawn_fraction=0.5, rng=np.random.default_rng(0))
    centres = sampler.centres(2000)
    assert set(np.unique(centres[:, 0])) == {1, 3}
    # Half the centres are uniform over the two drawn slices (half each), half on drawn pixels (40 on slice 1, 4
    # on slice 3): slice 3 expects 0.5 * 0.5 + 0.5 * 4 / 44 = 0.295 of them (0.5 * 0.2 = 0.1 if uniform ones went
    # to all five slices).
    on_three = (centres[:, 0] == 3).mean()
    assert 0.26 < on_three < 0.33, on_three
    undrawn = PatchSampler(planes, [[np.full((40, 40), -1)] * 5], 16, 0.5, np.random.default_rng(0))
    assert set(np.unique(undrawn.centres(500)[:, 0])) == {0, 1, 2, 3, 4}  # nothing drawn: every slice
