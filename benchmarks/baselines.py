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
- :func:`ilastik_forest_fit` / :func:`ilastik_forest_probabilities` /
  :func:`ilastik_forest_predict`: "an honest forest", ilastik's pixel
  classifier as it ships: its 49 default features
  (:func:`napari_coarseseg.features.ilastik_features`: Gaussian, LoG,
  gradient magnitude, DoG, structure-tensor and Hessian eigenvalues at
  sigmas 0.3 ... 10) and a forest of 100 trees of unlimited depth.
- :func:`forest_prior_readings`: the class-prior handling the network gets,
  given to a forest: its probabilities re-weighted by
  ``methods.refineseg.adjust_to_prior`` from the prior it was trained under
  to the prior EM estimates on the training images, at the strength the
  network's ``prior_strength="auto"`` sets from the same drawings and at
  every fixed strength tried for the network.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
from torch.nn import functional as F

from napari_coarseseg.data import PatchSampler, TrainingImages, augment, normalize, to_planes
from napari_coarseseg.features import ILASTIK_SIGMAS, ilastik_features
from napari_coarseseg.inference import predict_planes
from napari_coarseseg.methods.refineseg import (
    RefinesegDrawings,
    adjust_to_prior,
    estimate_class_prior,
    prior_strength_for_gap,
)
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
    network = use_channels_last(UNet(1, max(n_labels, 2), config.base_channels, config.depth,
                                          config.downsample).to(device), device)
    sampler = PatchSampler(planes, [targets], config.patch_size, config.drawn_fraction, rng)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate,
                                                   total_steps=config.steps, pct_start=0.15)
    start = time.perf_counter()
    network.train()
    for _ in range(config.steps):
        x, y = sampler.batch(config.batch_size)
        x, y = augment(torch.from_numpy(x), torch.from_numpy(y), torch_rng, config.jitter, config.augmentation)
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


_ILASTIK_FEATURES: dict = {}
_ILASTIK_FEATURE_SECONDS: dict = {}


def _ilastik_key(image, sigmas):
    # The dtype too: the same bytes read as another dtype are another image.
    digest = hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest()
    return digest, image.shape, image.dtype.str, tuple(float(s) for s in sigmas)


def ilastik_forest_features(image, sigmas=ILASTIK_SIGMAS) -> np.ndarray:
    """ilastik's features (:func:`~napari_coarseseg.features.ilastik_features`) of ``normalize(image)``, cached.

    ``image`` is one 2-D (Y, X) image; returns (Y, X, F) float32 (F = 49
    with the default sigmas). The cache key holds the image's bytes, shape,
    dtype and the sigmas.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"ilastik forest: each image must be 2-D (Y, X), got shape {image.shape}")
    key = _ilastik_key(image, sigmas)
    if key not in _ILASTIK_FEATURES:
        start = time.perf_counter()
        _ILASTIK_FEATURES[key] = ilastik_features(normalize(image), sigmas=sigmas)
        _ILASTIK_FEATURE_SECONDS[key] = time.perf_counter() - start
    return _ILASTIK_FEATURES[key]


def ilastik_feature_seconds(image, sigmas=ILASTIK_SIGMAS) -> float:
    """Seconds :func:`ilastik_forest_features` took to compute the (cached) features of ``image``."""
    image = np.asarray(image)
    ilastik_forest_features(image, sigmas)
    return _ILASTIK_FEATURE_SECONDS[_ilastik_key(image, sigmas)]


def ilastik_forest_fit(train_images, train_labels, seed=0, n_estimators=100, max_depth=None, sigmas=ILASTIK_SIGMAS,
                       class_weight=None, max_samples=None, n_jobs=-1):
    """Fit ilastik's pixel classifier on drawn pixels; returns the fitted forest.

    The defaults are the forest as ilastik ships it: all 49 features of
    :func:`napari_coarseseg.features.ilastik_features` (six families at the
    sigmas 0.3, 0.7, 1, 1.6, 3.5, 5, 10) on the normalised image, 100 trees
    of unlimited depth, each on a bootstrap sample of all drawn pixels
    (``max_samples=None``) and sqrt(F) features tried per split (scikit-learn's
    default, as vigra's forest in ilastik).

    Parameters
    ----------
    train_images : sequence of ndarray
        2-D (Y, X) images (a single 2-D array is taken as one image; a 3-D
        array as its 2-D slices).
    train_labels : sequence of ndarray of int
        One per image, same shape: :func:`random_forest_fit`'s convention,
        0 = unlabelled, 1 = background, class k is k + 1.
    seed : int
        The forest's random state.
    n_estimators, max_depth, max_samples
        Trees, their depth (None: unlimited) and bootstrap sample size
        (None: as many as drawn pixels; a float: that fraction), passed to
        ``sklearn.ensemble.RandomForestClassifier``.
    sigmas : sequence of float
        Feature scales (default ``ILASTIK_SIGMAS``); stored on the forest
        as ``forest.sigmas`` for prediction.
    class_weight : None, "balanced", "balanced_subsample" or dict
        Passed to scikit-learn (dict keys are labels, i.e. class + 1), so a
        benchmark can choose it on validation. None (ilastik): every drawn
        pixel counts once.
    n_jobs : int
        The forest's threads for fitting and predicting (-1: every core).

    Returns
    -------
    sklearn.ensemble.RandomForestClassifier
        Fitted, with ``sigmas`` added.
    """
    from sklearn.ensemble import RandomForestClassifier

    if isinstance(train_images, np.ndarray) and train_images.ndim == 2:
        train_images, train_labels = [train_images], [train_labels]
    xs, ys = [], []
    for image, labels in zip(train_images, train_labels, strict=True):
        labels = np.asarray(labels)
        if labels.shape != np.shape(image):
            raise ValueError(f"ilastik forest: labels of shape {labels.shape} for an image of shape "
                             f"{np.shape(image)}")
        drawn = labels > 0
        xs.append(ilastik_forest_features(image, sigmas)[drawn])
        ys.append(labels[drawn])
    y = np.concatenate(ys)
    if y.size == 0:
        raise ValueError("ilastik forest: no drawn pixels (labels > 0) to train on")
    forest = RandomForestClassifier(n_estimators=n_estimators, max_depth=max_depth, class_weight=class_weight,
                                    max_samples=max_samples, n_jobs=n_jobs, random_state=seed)
    forest.fit(np.concatenate(xs), y)
    forest.sigmas = tuple(float(s) for s in sigmas)
    return forest


def ilastik_forest_probabilities(forest, image) -> np.ndarray:
    """Class probabilities (n_classes, Y, X) float32 of a forest from :func:`ilastik_forest_fit` on one 2-D image.

    Channel k is class k (0 = background). n_classes is the highest class
    trained on plus one; a class with no drawn pixel below it gets 0.
    """
    # Not cached (the training images' features are): a benchmark predicts thousands of planes once each, whose
    # 49 features would hold gigabytes.
    features = ilastik_features(normalize(np.asarray(image)), sigmas=forest.sigmas)
    # forest.classes_ are the labels seen in training (class + 1), sorted; predict_proba's columns follow them.
    classes = forest.classes_.astype(np.int64) - 1
    probabilities = np.zeros((int(classes.max()) + 1, features.shape[0] * features.shape[1]), dtype=np.float32)
    probabilities[classes] = forest.predict_proba(features.reshape(-1, features.shape[-1])).T
    return probabilities.reshape(-1, *features.shape[:2])


def ilastik_forest_predict(forest, image) -> np.ndarray:
    """Class map (0 = background, k = class k) of a forest from :func:`ilastik_forest_fit` on one 2-D image."""
    return ilastik_forest_probabilities(forest, image).argmax(0)


def annotation_gap(train_images, train_labels) -> float | None:
    """``RefinesegDrawings.annotation_gap`` of forest labels (1 background, k + 1 class k): the median distance
    (px) from an object stroke to the nearest background stroke; None where no image holds both."""
    labels = [np.asarray(plane) for plane in train_labels]
    objects = [np.where(plane > 1, plane - 1, 0) for plane in labels]
    background = [(plane == 1).astype(np.uint8) for plane in labels]
    if not any(o.any() for o in objects) or not any(b.any() for b in background):
        return None  # RefinesegDrawings refuses a layer empty on every image
    images = TrainingImages(list(train_images))
    return RefinesegDrawings(images, [objects], background=[background]).annotation_gap()


def ilastik_forest_timed(train_images, train_labels, **options):
    """:func:`ilastik_forest_fit` and its seconds: the fit's and the training images' features'. The features
    are computed first, off the fit's clock, so that they are counted once (they are cached across the variants of
    a benchmark: what they took when first computed)."""
    features = sum(ilastik_feature_seconds(image) for image in train_images)
    start = time.perf_counter()
    forest = ilastik_forest_fit(train_images, train_labels, **options)
    return forest, time.perf_counter() - start + features


def forest_prior_readings(forest, train_images, train_labels, strengths=()) -> dict:
    """The forest's readings with and without the network's class-prior correction: ``{suffix: labels(image)}``.

    ``""``: the argmax of its probabilities; ``", prior auto"``: corrected at
    the strength ``prior_strength_for_gap`` gives these drawings (what the
    network's default does); ``", prior strength tau"`` for each of
    ``strengths``. The forest was trained under its drawn pixels' class shares
    (uniform with balanced class weights); the prior it is corrected to is
    EM's estimate from its own posteriors on the training images, as the
    network's is. One forest pass per image serves every reading.
    """
    train_labels = [np.asarray(labels) for labels in train_labels]
    counts = np.bincount(np.concatenate([labels[labels > 0] for labels in train_labels]) - 1,
                         minlength=len(forest.classes_)).astype(np.float64)
    balanced = forest.class_weight in ("balanced", "balanced_subsample")
    training = np.full(len(counts), 1 / len(counts)) if balanced else counts / counts.sum()
    estimated = estimate_class_prior([ilastik_forest_probabilities(forest, image) for image in train_images],
                                     training)
    cache: dict = {}

    def probabilities(image):
        # Keyed by identity: the benchmarks hold their images for the whole run.
        if id(image) not in cache:
            cache[id(image)] = ilastik_forest_probabilities(forest, image)
        return cache[id(image)]

    def at(strength):
        return lambda image: adjust_to_prior(probabilities(image), estimated, training, strength).argmax(0)

    return {"": lambda image: probabilities(image).argmax(0),
            ", prior auto": at(prior_strength_for_gap(annotation_gap(train_images, train_labels))),
            **{f", prior strength {tau}": at(tau) for tau in strengths}}
