"""Baselines the benchmarks compare against.

- :func:`train_dense`: the same U-Net, same sampler, augmentation, optimiser
  and schedule as refineseg, trained with plain cross-entropy on a dense mask
  (used for the naive baseline, drawings taken as full masks, and for the
  fully supervised reference on the expert mask).
- :func:`random_forest_fit` / :func:`random_forest_predict` (and both in one
  call, :func:`random_forest_segment`): scikit-image's trainable segmentation
  (multiscale_basic_features + a random forest), the ilastik-style pixel
  classifier, trained on the same drawings; trees, depth and feature scales
  are parameters so that they can be tuned on validation like our settings.
"""

from __future__ import annotations

import hashlib
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


_FEATURES: dict = {}
_FEATURE_SECONDS: dict = {}


def _feature_key(image, sigma_max):
    return hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest(), image.shape, float(sigma_max)


def forest_features(image, sigma_max: float = 16) -> np.ndarray:
    """ilastik-style pixel features (intensity, edges, texture at scales 1..sigma_max), float32, cached per image."""
    from skimage.feature import multiscale_basic_features

    image = np.asarray(image)
    key = _feature_key(image, sigma_max)
    if key not in _FEATURES:
        start = time.perf_counter()
        _FEATURES[key] = multiscale_basic_features(normalize(image), intensity=True, edges=True, texture=True,
                                                   sigma_min=1, sigma_max=sigma_max).astype(np.float32)
        _FEATURE_SECONDS[key] = time.perf_counter() - start
    return _FEATURES[key]


def feature_seconds(image, sigma_max: float = 16) -> float:
    """Seconds :func:`forest_features` took to compute the (cached) features of ``image``."""
    image = np.asarray(image)
    forest_features(image, sigma_max)
    return _FEATURE_SECONDS[_feature_key(image, sigma_max)]


def random_forest_fit(train_images, train_labels, seed=0, n_estimators=50, max_depth=10, sigma_max=16,
                      max_samples=0.05, n_jobs=-1):
    """Fit scikit-image-style trainable segmentation on drawn pixels; returns the fitted forest.

    ``train_labels`` use scikit-image's convention: 0 = unlabelled, 1 =
    background, 2 = foreground (class k is k + 1). ``n_jobs``: the forest's
    threads for fitting and predicting (-1: every core).
    """
    from sklearn.ensemble import RandomForestClassifier

    xs, ys = [], []
    for image, labels in zip(train_images, train_labels, strict=True):
        drawn = labels > 0
        xs.append(forest_features(image, sigma_max)[drawn])
        ys.append(labels[drawn])
    forest = RandomForestClassifier(n_estimators=n_estimators, n_jobs=n_jobs, max_depth=max_depth,
                                    max_samples=max_samples, random_state=seed)
    forest.fit(np.concatenate(xs), np.concatenate(ys))
    forest.sigma_max = sigma_max
    return forest


def random_forest_predict(forest, image) -> np.ndarray:
    """Class map (0 = background, k = class k) of a forest from :func:`random_forest_fit` on one 2-D image."""
    features = forest_features(image, forest.sigma_max)
    return forest.predict(features.reshape(-1, features.shape[-1])).reshape(np.shape(image)) - 1


def random_forest_segment(train_images, train_labels, test_image, seed=0, n_estimators=50):
    """Fit and predict in one call: returns ``(labels, seconds)`` (seconds include the test features).

    ``test_image`` may be a list of images (one classifier, a list of label
    images back).
    """
    start = time.perf_counter()
    forest = random_forest_fit(train_images, train_labels, seed=seed, n_estimators=n_estimators)
    predictions = [random_forest_predict(forest, image)
                   for image in (test_image if isinstance(test_image, (list, tuple)) else [test_image])]
    seconds = time.perf_counter() - start
    return (predictions if isinstance(test_image, (list, tuple)) else predictions[0]), seconds
