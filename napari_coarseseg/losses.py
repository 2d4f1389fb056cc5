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

import torch

__all__ = [
    "coarse_distribution",
    "masked_cross_entropy",
    "masked_dice_loss",
    "positive_loss",
    "negative_loss",
    "transition_regulariser",
    "refineseg_loss",
    "masked_nll",
]

EPS = 1e-7


def coarse_distribution(transition: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """Predicted distribution of the drawn label, ``q = A p`` at every pixel."""
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
    if not transitions:
        return torch.zeros(())
    n_classes = transitions[0].shape[1]
    identity = torch.eye(n_classes, device=transitions[0].device, dtype=transitions[0].dtype)
    identity = identity.view(1, n_classes, n_classes, 1, 1)
    total = 0
    for r, a in enumerate(transitions):  # one term per drawing layer (a handful), not per pixel
        deviation = ((a - identity) ** 2).sum(dim=(1, 2))
        if targets is None:
            total = total + deviation.mean()
        else:
            drawn = targets[r] >= 0
            total = total + torch.where(drawn, deviation, torch.zeros_like(deviation)).sum() / drawn.sum().clamp(min=1)
    return total


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
