"""Anatomy settings: a network at a coarser grid, orientation-keeping augmentation, strokes propagated to regions.

What the ``refineseg-anatomy`` preset is made of, each rule as a test:
the network's output keeps the input's grid whatever its working resolution,
the card remembers that resolution, the affine augmentation never mirrors a
patch and moves labels with the image, and a random walker turns a ring of
background strokes and a dab inside an object into the object's region.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from napari_coarseseg import load_model, load_preset, predict, run_to_end, save_model, train_refineseg
from napari_coarseseg.data import augment
from napari_coarseseg.metrics import dice
from napari_coarseseg.model_io import ModelFileError
from napari_coarseseg.networks import UNet
from napari_coarseseg.propagation import propagate_strokes


def disc_image(seed: int, size: int = 64):
    """A bright disc with a darker ring around it (a ventricle in its wall) on noise; and its mask (1 disc)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.uniform(-6, 6, 2)
    r = np.hypot(yy - cy, xx - cx)
    radius = rng.uniform(9, 13)
    image = np.where(r < radius, 1.0, np.where(r < radius + 4, 0.3, 0.55)) + rng.normal(0, 0.08, (size, size))
    return image.astype(np.float32), (r < radius).astype(np.uint8), (cy, cx, radius)


def test_a_downsampling_unet_keeps_the_input_grid_and_works_on_block_means():
    net = UNet(1, 3, base_channels=4, depth=2, downsample=2).eval()
    assert net.divisor == 8
    x = torch.randn(2, 1, 32, 24)
    logits, features = net(x)
    assert logits.shape == (2, 3, 32, 24) and features.shape == (2, 4, 32, 24)
    # The same network at full resolution fed the 2 x 2 block means, then upsampled: the same logits.
    full = UNet(1, 3, base_channels=4, depth=2).eval()
    full.load_state_dict(net.state_dict())
    coarse, _ = full(torch.nn.functional.avg_pool2d(x, 2))
    expected = torch.nn.functional.interpolate(coarse, size=(32, 24), mode="bilinear", align_corners=False)
    assert torch.allclose(logits, expected, atol=1e-5)
    with pytest.raises(ValueError, match="downsample"):
        UNet(1, 2, downsample=0)


def test_settings_check_downsample_augmentation_and_propagation():
    preset = load_preset("refineseg-anatomy")
    assert (preset.downsample, preset.augmentation, preset.propagation) == (2, "affine", "random walker")
    with pytest.raises(ValueError, match="multiple of 2\\*\\*depth \\* downsample = 32"):
        preset.replace(patch_size=48).validate()
    for change, words in (({"downsample": 0}, "downsample"), ({"augmentation": "mirror"}, "augmentation"),
                          ({"propagation": "flood"}, "propagation")):
        with pytest.raises(ValueError, match=words):
            preset.replace(**change).validate()


def test_affine_augmentation_never_mirrors_and_moves_labels_with_the_image():
    # Left half bright and labelled 1, right half dark and labelled 2: a mirror would swap them.
    images = torch.zeros(16, 1, 48, 48)
    images[..., :24] = 1.0
    targets = torch.full((1, 16, 48, 48), 2, dtype=torch.int64)
    targets[..., :24] = 1
    out_images, out_targets = augment(images, targets, torch.Generator().manual_seed(0), jitter=0.0, kind="affine")
    assert out_targets.shape == targets.shape and out_targets.dtype == targets.dtype
    # Rotations of at most 20 degrees: of the labelled pixels, the left columns stay class 1 and the right ones
    # class 2, in every sample.
    left, right = out_targets[0, :, :, :4], out_targets[0, :, :, -4:]
    for side, label in ((left, 1), (right, 2)):
        share = (side == label).sum(dim=(1, 2)) / (side >= 0).sum(dim=(1, 2)).clamp_min(1)
        assert (share > 0.95).all(), share
    # Where a label survives, the image agrees with it (gamma keeps 0 and 1 apart).
    labelled = out_targets[0] >= 0
    bright = out_images[:, 0] > 0.5
    assert ((bright == (out_targets[0] == 1)) | ~labelled).float().mean() > 0.97
    # Corners turned in from outside the patch are unlabelled, never given a class.
    assert (out_targets == -1).any() and set(out_targets.unique().tolist()) <= {-1, 1, 2}
    # The dihedral kind does mirror and turn: some sample has class 2 on the left.
    _, turned = augment(images, targets, torch.Generator().manual_seed(0), jitter=0.0, kind="dihedral")
    assert (turned[0, :, :, :4] == 2).float().mean(dim=(1, 2)).max() > 0.9


def test_the_random_walker_fills_an_object_from_a_dab_inside_and_a_ring_outside():
    image, mask, (cy, cx, radius) = disc_image(0)
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - cy, xx - cx)
    strokes = np.full(image.shape, -1)
    strokes[r < 3] = 1  # a dab in the middle of the object
    strokes[np.abs(r - (radius + 9)) < 1] = 0  # a ring around it
    labels = propagate_strokes(image, strokes)
    assert dice(labels == 1, mask) > 0.9
    assert (labels[strokes >= 0] == strokes[strokes >= 0]).all()
    # The ring surrounds the dab: beyond it is background, to the image's corners.
    assert (labels[r > radius + 10] == 0).all()
    # Half a ring surrounds nothing: the walk labels the strokes' box only, the far corner stays undrawn.
    half = np.where((strokes == 0) & (xx > cx), -1, strokes)
    labels = propagate_strokes(image, half)
    assert dice(labels == 1, mask) > 0.8 and labels[0, -1] == -1
    # No background stroke on the plane: nothing to tell the object from, nothing propagated.
    assert (propagate_strokes(image, np.where(strokes == 1, 1, -1)) == -1).all()
    with pytest.raises(ValueError, match="same size"):
        propagate_strokes(image, strokes[:10])


def test_anatomy_settings_train_save_and_predict_a_shape_on_another_image(tmp_path):
    """Scribbles only (a dab and a ring per image), propagated; scored on images the network never saw."""
    train = [disc_image(seed) for seed in range(4)]
    positive, background = [], []
    for _, _, (cy, cx, radius) in train:
        r = np.hypot(*np.mgrid[:64, :64] - np.array([cy, cx])[:, None, None])
        positive.append((r < 3).astype(np.uint8))
        background.append((np.abs(r - (radius + 9)) < 1).astype(np.uint8))
    config = load_preset("refineseg-anatomy").replace(steps=60, patch_size=64, batch_size=4, evolution_every=0,
                                                        depth=2, base_channels=8)
    model = run_to_end(train_refineseg([t[0] for t in train], [positive], [], [background], config=config, seed=0,
                                       device="cpu"))
    assert model.card["network"]["downsample"] == 2 and model.card["heads"][-1] == "propagated"
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    scores = [dice(predict(loaded, image, device="cpu").labels == 1, mask)
              for image, mask, _ in (disc_image(seed) for seed in (10, 11))]
    assert min(scores) > 0.9, scores
    # A card that says downsample 0 is refused by name, before any network is built.
    tensors = load_file(tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", "pt") as handle:
        metadata = handle.metadata()
    card = json.loads(metadata["coarseseg_card"])
    card["network"]["downsample"] = 0
    save_file(tensors, tmp_path / "bad.safetensors", metadata={**metadata, "coarseseg_card": json.dumps(card)})
    with pytest.raises(ModelFileError, match="network.downsample"):
        load_model(tmp_path / "bad.safetensors")


def test_largest_component_per_class_removes_islands_in_3d_and_keeps_touching_slices():
    from napari_coarseseg.postprocess import largest_component_per_class

    labels = np.zeros((3, 20, 20), np.uint8)
    labels[0:3, 5:10, 5:10] = 1  # one object across three slices (75 px)
    labels[1, 15:17, 15:17] = 1  # an island of class 1 (4 px)
    labels[0, 0:2, 0:2] = 2  # class 2: two islands, the larger one is kept
    labels[2, 12:18, 0:3] = 2
    kept = largest_component_per_class(labels)
    assert kept.dtype == labels.dtype and labels[1, 15, 15] == 1  # the input is unchanged
    assert (kept == 1).sum() == 75 and kept[1, 15, 15] == 0
    assert (kept == 2).sum() == 18 and kept[0, 0, 0] == 0
    with pytest.raises(ValueError, match="integers"):
        largest_component_per_class(labels.astype(float))
