"""Losses of the refineseg method [1]_ and the recursive method's tasks [2]_, batched, masked to drawn pixels.

Shape contract (B = batch, L = classes with background, H x W = pixels):

- ``probabilities``: (B, L, H, W), the segmentation softmax p(y|x);
- ``transition``: (B, L, L, H, W), ``A[b, m, k] = p(observed m | true k)``,
  columns summing to one;
- ``target``: (B, H, W) int64, ``-1`` where nothing is drawn.

Un-drawn pixels contribute nothing (not even a gradient); a batch with no
drawn pixel gives a loss of exactly 0.

References
----------
.. [1] A. Du, N. Aung, T. N. Arvanitis, S. K. Piechnik, J. A. C. Lima,
   S. E. Petersen, L. Zhang, "RefineSeg: Dual Coarse-to-Fine Learning for
   Medical Image Segmentation", MICCAI 2025.
.. [2] R. Ke et al., "Multi-task deep learning for image segmentation using
   recursive approximation tasks", IEEE Transactions on Image Processing 30,
   2021.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "coarse_distribution",
    "trust_pixels",
    "masked_cross_entropy",
    "masked_dice_loss",
    "positive_loss",
    "negative_loss",
    "transition_regulariser",
    "refineseg_loss",
    "masked_nll",
    "undrawn_background_loss",
    "edge_aware_smoothness",
    "gaussian_blur",
]

EPS = 1e-7


def coarse_distribution(transition: torch.Tensor | None, probabilities: torch.Tensor) -> torch.Tensor:
    """Predicted distribution of the drawn label, ``q = A p`` at every pixel; ``None`` is the identity (``q = p``).

    A layer without a head is ``None`` rather than an identity tensor: the product with an identity costs
    as much as any other, L**2 multiplications a pixel and as much memory for the backward pass.
    """
    if transition is None:
        return probabilities
    return torch.einsum("bmkhw,bkhw->bmhw", transition, probabilities)


def _gather(distribution: torch.Tensor, target: torch.Tensor):
    """Value of ``distribution`` at each pixel's target class, and the drawn mask."""
    drawn = target >= 0
    index = target.clamp(min=0).unsqueeze(1)
    return distribution.gather(1, index).squeeze(1), drawn


def masked_cross_entropy(distribution: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log q[y]`` over drawn pixels (``q`` is a probability, not a logit)."""
    value, drawn = _gather(distribution, target)
    n = drawn.sum()
    nll = -torch.log(value.clamp(min=EPS))
    return torch.where(drawn, nll, torch.zeros_like(nll)).sum() / n.clamp(min=1)


def masked_dice_loss(distribution: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss over drawn pixels, pooled over the batch, averaged over drawn classes.

    For each class c: ``D_c = (2 sum q_c t_c + s) / (sum q_c + sum t_c + s)``,
    sums over drawn pixels of the whole batch, ``t`` the one-hot target. The
    loss is ``1 - mean D_c`` over the classes that occur in the target: a
    class nobody drew (e.g. background in a layer of inside strokes) would
    otherwise score ``D_c = 0`` whatever the network does. No drawn pixel
    gives 0.
    """
    drawn = (target >= 0).unsqueeze(1).to(distribution.dtype)
    if not bool(drawn.any()):
        return distribution.sum() * 0
    one_hot = torch.zeros_like(distribution).scatter_(1, target.clamp(min=0).unsqueeze(1), 1.0) * drawn
    q = distribution * drawn
    dims = (0, 2, 3)
    intersection = (q * one_hot).sum(dims)
    denominator = q.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    present = one_hot.sum(dims) > 0
    return 1 - dice[present].mean()


def positive_loss(
    probabilities: torch.Tensor,
    transition: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.6,
    beta: float = 0.4,
) -> torch.Tensor:
    """``alpha * CE_R(q, y) + beta * Dice_R(q, y)`` with ``q = A p`` (eq. 2-4)."""
    q = coarse_distribution(transition, probabilities)
    return alpha * masked_cross_entropy(q, target) + beta * masked_dice_loss(q, target)


def negative_loss(probabilities: torch.Tensor, transition: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Complementary-label loss of a "not k" drawing.

    With ``u = A p`` and the uniform complementary transition, the probability
    of observing "not k" is ``v_k = (1 - u_k) / (L - 1)``; the loss is the
    mean of ``-log v_k`` over drawn pixels.
    """
    n_classes = probabilities.shape[1]
    u = coarse_distribution(transition, probabilities)
    v = (1 - u) / max(n_classes - 1, 1)
    return masked_cross_entropy(v, target)


def transition_regulariser(transitions: list[torch.Tensor], targets: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``sum_r ||A_r - I||_F^2``, averaged over every pixel (eq. 7) or over the pixels layer r marks.

    Without ``targets``: the mean over all pixels of the batch (the paper).
    With ``targets`` (one per transition, -1 where not drawn): each layer's
    term is the mean over its own drawn pixels, so the pull towards the
    identity weighs as much as that layer's loss however sparse its drawing
    (averaged over every pixel, a drawing that covers 5 % of the image holds
    its head with a twentieth of the weight). A layer with no drawn pixel
    adds 0.
    """
    headed = [a for a in transitions if a is not None]  # None: a layer held at the identity, a term of 0
    if not headed:
        return torch.zeros(())
    n_classes = headed[0].shape[1]
    identity = torch.eye(n_classes, device=headed[0].device, dtype=headed[0].dtype)
    identity = identity.view(1, n_classes, n_classes, 1, 1)
    total = 0
    for r, a in enumerate(transitions):  # one term per drawing layer (a handful), not per pixel
        if a is None:
            continue
        deviation = ((a - identity) ** 2).sum(dim=(1, 2))
        if targets is None:
            total = total + deviation.mean()
        else:
            drawn = targets[r] >= 0
            total = total + torch.where(drawn, deviation, torch.zeros_like(deviation)).sum() / drawn.sum().clamp(min=1)
    return total


def trust_pixels(transition: torch.Tensor, trusted: torch.Tensor) -> torch.Tensor:
    """The transition with the identity at ``trusted`` (B, H, W) pixels: there the drawing is taken as exact.

    >>> a = torch.full((1, 2, 2, 1, 2), 0.5)
    >>> trust_pixels(a, torch.tensor([[[True, False]]]))[0, :, :, 0, 0]
    tensor([[1., 0.],
            [0., 1.]])
    """
    identity = torch.eye(transition.shape[1], dtype=transition.dtype, device=transition.device)
    return torch.where(trusted[:, None, None], identity[None, :, :, None, None], transition)


def refineseg_loss(
    probabilities: torch.Tensor,
    positive_transitions: list[torch.Tensor],
    positive_targets: list[torch.Tensor],
    negative_transitions: list[torch.Tensor],
    negative_targets: list[torch.Tensor],
    alpha: float = 0.6,
    beta: float = 0.4,
    regulariser_weight: float = 0.2,
    regulariser_on: str = "all pixels",
) -> dict[str, torch.Tensor]:
    """Total loss of eq. 8 and its terms.

    ``regulariser_on``: ``"all pixels"`` (eq. 7: the positive layers' heads,
    averaged over every pixel) or ``"drawn pixels"`` (every layer's head,
    negative ones included, averaged over the pixels that layer marks; see
    :func:`transition_regulariser`).

    Returns
    -------
    dict
        ``total``, ``positive``, ``negative`` and ``regulariser`` tensors.
    """
    zero = probabilities.sum() * 0
    positive_pairs = zip(positive_transitions, positive_targets, strict=True)
    positive = sum((positive_loss(probabilities, a, t, alpha, beta) for a, t in positive_pairs), zero)
    negative = sum(
        (negative_loss(probabilities, a, t) for a, t in zip(negative_transitions, negative_targets, strict=True)), zero
    )
    if regulariser_on == "all pixels":
        regulariser = transition_regulariser(positive_transitions) if positive_transitions else zero
    elif regulariser_on == "drawn pixels":
        regulariser = transition_regulariser(positive_transitions + negative_transitions,
                                             positive_targets + negative_targets)
    else:
        raise ValueError(f"regulariser_on must be 'all pixels' or 'drawn pixels', got {regulariser_on!r}")
    total = positive + negative + regulariser_weight * regulariser
    return {"total": total, "positive": positive, "negative": negative, "regulariser": regulariser}


def masked_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of ``softmax(logits)`` over annotated pixels (target >= 0).

    The per-task loss of the recursive method ([2]_, eq. 1-2):
    ``logits`` (B, L, H, W), ``target`` (B, H, W) with -1 where a task has
    no label. No annotated pixel gives exactly 0 (and a zero gradient).
    """
    log_p = torch.log_softmax(logits.float(), dim=1)
    value, drawn = _gather(log_p, target)
    return -torch.where(drawn, value, torch.zeros_like(value)).sum() / drawn.sum().clamp(min=1)


def undrawn_background_loss(probabilities: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
    """Mean of ``-log p_0`` (background) over the pixels that no target marks: undrawn pixels as weak background.

    The biased positive-unlabelled loss [4]_: where the drawings say nothing,
    most pixels are background, so a small weight on "undrawn is background"
    teaches the network the class prior that partial drawings hide (strokes
    on nuclei and on a ring around them say nothing of how much of the
    image is nucleus). The drawn pixels outweigh it where they are, and
    objects nobody drew still look like the drawn ones. ``targets``: the
    drawing layers' (B, H, W) targets; an undrawn pixel is -1 in all.

    References
    ----------
    .. [4] C. Elkan, K. Noto, "Learning classifiers from only positive and
       unlabeled data", KDD 2008.

    Examples
    --------
    >>> p = torch.tensor([0.8, 0.5]).view(1, 1, 1, 2)
    >>> p = torch.cat([p, 1 - p], dim=1)  # background 0.8 and 0.5
    >>> drawn = torch.tensor([[[-1, 1]]])  # the second pixel is drawn: only the first counts
    >>> round(float(undrawn_background_loss(p, [drawn])), 4) == round(-float(np.log(0.8)), 4)
    True
    """
    undrawn = torch.stack(targets).lt(0).all(0)
    return masked_cross_entropy(probabilities, torch.where(undrawn, 0, -1))


def edge_aware_smoothness(probabilities: torch.Tensor, images: torch.Tensor, radius: int = 2,
                          sigma: float = 0.5, blur: float = 0.0) -> torch.Tensor:
    """Potts relaxation with intensity-gated pair weights: label changes are cheap only across image edges.

    ``S = sum_{i~j} w_ij (1 - sum_k p_ik p_jk) / sum_{i~j} 1`` over the pixel
    pairs ``i ~ j`` of a ``(2 radius + 1)``-square window, with
    ``w_ij = exp(-||I_i - I_j||^2 / (2 sigma^2))`` on the (normalised)
    image channels. ``1 - sum_k p_ik p_jk`` is the chance that two pixels
    drawn from their softmaxes disagree. This is the local ("gated") CRF loss
    of scribble-supervised segmentation [3]_: it reaches the pixels nobody
    drew, which the partial losses leave free, and pulls the boundary onto
    the image's edges.

    ``images``: (B, C, H, W), the batch the probabilities were computed on.

    References
    ----------
    .. [3] A. Obukhov, S. Georgoulis, D. Dai, L. Van Gool, "Gated CRF Loss for
       Weakly Supervised Semantic Image Segmentation", arXiv:1906.04651, 2019;
       M. Tang et al., "On Regularized Losses for Weakly-supervised CNN
       Segmentation", ECCV 2018.

    Examples
    --------
    >>> p = torch.zeros(1, 2, 4, 4); p[:, 0, :, :2] = 1; p[:, 1, :, 2:] = 1
    >>> flat = torch.zeros(1, 1, 4, 4)
    >>> edge = torch.zeros(1, 1, 4, 4); edge[..., 2:] = 10
    >>> bool(edge_aware_smoothness(p, flat, 1) > 0), float(edge_aware_smoothness(p, edge, 1))
    (True, 0.0)
    """
    if radius < 1 or sigma <= 0 or blur < 0:
        raise ValueError(f"radius must be >= 1, sigma > 0 and blur >= 0, got {radius}, {sigma} and {blur}")
    images = gaussian_blur(images.to(probabilities.dtype), blur)
    height, width = probabilities.shape[-2:]
    total, pairs = probabilities.sum() * 0, 0
    # Half of the window's offsets: the pair (i, j) and (j, i) count once. A loop over
    # the (2 r + 1)^2 / 2 offsets, each a vectorised pass over all pixels.
    offsets = [(dy, dx) for dy in range(0, radius + 1) for dx in range(-radius, radius + 1) if (dy, dx) > (0, 0)]
    for dy, dx in offsets:
        here = np.s_[..., : height - dy, max(-dx, 0): width - max(dx, 0)]
        there = np.s_[..., dy:, max(dx, 0): width - max(-dx, 0)]
        weight = torch.exp(-((images[here] - images[there]) ** 2).sum(1) / (2 * sigma**2))
        disagree = 1 - (probabilities[here] * probabilities[there]).sum(1)
        total = total + (weight * disagree).sum()
        pairs += weight.numel()
    return total / max(pairs, 1)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each channel of (B, C, H, W) ``images`` blurred by a Gaussian of ``sigma`` px (reflected edges); 0: a no-op."""
    if sigma <= 0:
        return images
    radius = max(int(3 * sigma + 0.5), 1)  # scipy.ndimage.gaussian_filter's truncation at 3 sigma
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    # Separable: a row pass then a column pass, one depthwise convolution each.
    padded = torch.nn.functional.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = torch.nn.functional.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1).contiguous(),
                                      groups=channels)
    return torch.nn.functional.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1).contiguous(),
                                      groups=channels)
