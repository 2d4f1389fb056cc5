"""Baselines the benchmarks compare against.

- :func:`train_dense`: the same U-Net, same sampler, augmentation, optimiser
  and schedule as refineseg, trained with plain cross-entropy on a dense mask
  (used for the naive baseline, drawings taken as full masks, and for the
  fully supervised reference on the expert mask).
- :func:`random_forest_segment`: scikit-image's trainable segmentation
  (multiscale_basic_features + a random forest), the ilastik-style pixel
  classifier, trained on the same drawings.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.nn import functional as F

from napari_coarseseg.data import PatchSampler, augment, normalize, to_planes
from napari_coarseseg.inference import predict_planes
from napari_coarseseg.networks import UNet
from napari_coarseseg.training import (
    TrainingConfig,
    autocast,
    load_preset,
    seed_everything,
    select_device,
    use_channels_last,
)


def train_dense(images, masks, config: TrainingConfig | None = None, seed=0, device="auto", ignore=None):
    """Train the U-Net with cross-entropy on dense masks; return ``(network, seconds)``.

    ``ignore`` (optional, per image) marks pixels left out of the loss.
    """
    config = config or load_preset("refineseg")
    device = select_device(device)
    rng, torch_rng = seed_everything(seed)
    planes = [p for im in images for p in to_planes(normalize(im), False)]
    targets = [np.asarray(m, dtype=np.int64) for m in masks]
    if ignore is not None:
        targets = [np.where(ig, -1, t) for t, ig in zip(targets, ignore, strict=True)]
    n_labels = int(max(t.max() for t in targets)) + 1
    # The same memory format as the package's training, so step times compare like with like.
    network = use_channels_last(UNet(1, max(n_labels, 2), config.base_channels, config.depth).to(device), device)
    sampler = PatchSampler(planes, [targets], config.patch_size, config.drawn_fraction, rng)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate,
                                                   total_steps=config.steps, pct_start=0.15)
    start = time.perf_counter()
    network.train()
    for _ in range(config.steps):
        x, y = sampler.batch(config.batch_size)
        x, y = augment(torch.from_numpy(x), torch.from_numpy(y), torch_rng, config.jitter)
        x, y = x.to(device), y[0].to(device)
        with autocast(device):
            logits, _ = network(x)
        loss = F.cross_entropy(logits.float(), y, ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return use_channels_last(network, device, on=False).eval(), time.perf_counter() - start


def predict_dense(network, image, device="auto"):
    """Labels of a network from :func:`train_dense` on one 2-D image."""
    device = select_device(device)
    probabilities = predict_planes(network, to_planes(normalize(image), False), device)
    return probabilities[0].argmax(0)


def random_forest_segment(train_images, train_labels, test_image, seed=0, n_estimators=50):
    """scikit-image trainable segmentation: returns ``(labels, seconds)``.

    ``train_labels`` use scikit-image's convention: 0 = unlabelled, 1 =
    background, 2 = foreground (class k is k + 1). ``test_image`` may be a
    list of images (one classifier, a list of label images back).
    """
    from functools import partial

    from skimage.feature import multiscale_basic_features
    from sklearn.ensemble import RandomForestClassifier

    features = partial(multiscale_basic_features, intensity=True, edges=True, texture=True, sigma_min=1,
                       sigma_max=16)
    start = time.perf_counter()
    xs, ys = [], []
    for image, labels in zip(train_images, train_labels, strict=True):
        f = features(normalize(image))
        drawn = labels > 0
        xs.append(f[drawn])
        ys.append(labels[drawn])
    classifier = RandomForestClassifier(n_estimators=n_estimators, n_jobs=-1, max_depth=10, max_samples=0.05,
                                        random_state=seed)
    classifier.fit(np.concatenate(xs), np.concatenate(ys))
    predictions = []
    for image in test_image if isinstance(test_image, (list, tuple)) else [test_image]:
        f = features(normalize(image))
        predictions.append(classifier.predict(f.reshape(-1, f.shape[-1])).reshape(image.shape) - 1)
    seconds = time.perf_counter() - start
    return (predictions if isinstance(test_image, (list, tuple)) else predictions[0]), seconds
