"""Losses of the refineseg method (METHODS.md A) against hand computation on a few pixels.

Conventions (losses.py): probabilities (B, L, H, W); transitions (B, L, L, H, W)
with ``A[b, m, k] = p(observed m | true k)`` (columns sum to one); targets
(B, H, W) with -1 where nothing is drawn. Expected values are written out
from the formulas with ``math``, never with the package's code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_coarseseg.losses import (
    EPS,
    coarse_distribution,
    edge_aware_smoothness,
    gaussian_blur,
    masked_cross_entropy,
    masked_dice_loss,
    negative_loss,
    positive_loss,
    refineseg_loss,
    transition_regulariser,
    undrawn_background_loss,
)

SMOOTH = 1e-5  # masked_dice_loss's default smoothing


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def target(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def identity_transition(probabilities: torch.Tensor) -> torch.Tensor:
    b, n, h, w = probabilities.shape
    return torch.eye(n, dtype=probabilities.dtype).view(1, n, n, 1, 1).expand(b, n, n, h, w).clone()


# Two classes, four pixels in a row (B=1, H=1, W=4); columns are pixels.
Q4 = [[[[0.9, 0.2, 0.6, 0.5]], [[0.1, 0.8, 0.4, 0.5]]]]

# A column-stochastic 2 x 2 transition that is NOT symmetric, so that using
# rows instead of columns gives other numbers: q = A p with A[m, k].
A2 = [[0.9, 0.3], [0.1, 0.7]]


def constant_transition(matrix, h: int, w: int) -> torch.Tensor:
    a = t(matrix)
    n = a.shape[0]
    return a.view(1, n, n, 1, 1).expand(1, n, n, h, w).clone()


# --------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize(
    "distribution, labels, expected",
    [
        # pixel 2 not drawn: mean over pixels 0, 1, 3 of -log q[y]
        (Q4, [[[0, 1, -1, 1]]], -(math.log(0.9) + math.log(0.8) + math.log(0.5)) / 3),
        # a single drawn pixel
        (Q4, [[[-1, -1, 1, -1]]], -math.log(0.4)),
        # q[y] = 0 is clamped to EPS, not -log 0 = inf
        ([[[[1.0, 0.0]], [[0.0, 1.0]]]], [[[1, 1]]], -(math.log(EPS) + math.log(1.0)) / 2),
        # nothing drawn: exactly zero
        (Q4, [[[-1, -1, -1, -1]]], 0.0),
        # batch of two, three classes, pooled over the batch
        (
            [
                [[[0.2, 0.5]], [[0.3, 0.25]], [[0.5, 0.25]]],
                [[[0.6, 0.1]], [[0.1, 0.1]], [[0.3, 0.8]]],
            ],
            [[[2, -1]], [[0, 2]]],
            -(math.log(0.5) + math.log(0.6) + math.log(0.8)) / 3,
        ),
    ],
)
def test_masked_cross_entropy_by_hand(distribution, labels, expected):
    value = masked_cross_entropy(t(distribution), target(labels))
    assert value.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------- Dice


def dice_term(q_t: float, q: float, t_: float) -> float:
    return (2 * q_t + SMOOTH) / (q + t_ + SMOOTH)


@pytest.mark.parametrize(
    "labels, expected",
    [
        # drawn pixels 0, 1, 3 (q0 = .9 .2 .5, q1 = .1 .8 .5), y = 0 1 1:
        #   class 0: sum q0 t0 = .9, sum q0 = 1.6, sum t0 = 1
        #   class 1: sum q1 t1 = 1.3, sum q1 = 1.4, sum t1 = 2
        ([[[0, 1, -1, 1]]], 1 - (dice_term(0.9, 1.6, 1) + dice_term(1.3, 1.4, 2)) / 2),
        # only class 1 drawn (pixels 1, 2): class 0 is absent from the target and left out
        #   class 1: sum q1 t1 = .8 + .4, sum q1 = 1.2, sum t1 = 2
        ([[[-1, 1, 1, -1]]], 1 - dice_term(1.2, 1.2, 2)),
        # all four pixels drawn as class 0
        ([[[0, 0, 0, 0]]], 1 - dice_term(2.2, 2.2, 4)),
    ],
)
def test_masked_dice_loss_by_hand(labels, expected):
    value = masked_dice_loss(t(Q4), target(labels))
    assert value.item() == pytest.approx(expected, rel=1e-9)


def test_masked_dice_loss_pools_over_the_batch():
    # two images of one pixel pair each; class 1 drawn in image 0 only, class 0 in image 1 only
    q = t([[[[0.3, 0.6]], [[0.7, 0.4]]], [[[0.8, 0.1]], [[0.2, 0.9]]]])
    y = target([[[1, -1]], [[0, -1]]])
    # class 0: drawn pixels (b0,p0) q0=.3 t0=0, (b1,p0) q0=.8 t0=1 -> inter .8, sum q 1.1, sum t 1
    # class 1: (b0,p0) q1=.7 t1=1, (b1,p0) q1=.2 t1=0 -> inter .7, sum q .9, sum t 1
    expected = 1 - (dice_term(0.8, 1.1, 1) + dice_term(0.7, 0.9, 1)) / 2
    assert masked_dice_loss(q, y).item() == pytest.approx(expected, rel=1e-9)


def test_masked_dice_loss_perfect_prediction_is_zero():
    q = t([[[[1.0, 0.0, 0.3]], [[0.0, 1.0, 0.7]]]])
    assert masked_dice_loss(q, target([[[0, 1, -1]]])).item() == pytest.approx(0.0, abs=1e-9)


def test_masked_dice_loss_nothing_drawn_is_zero():
    assert masked_dice_loss(t(Q4), target([[[-1, -1, -1, -1]]])).item() == 0.0


# --------------------------------------------------------------------------- q = A p and the positive loss


def test_coarse_distribution_is_matrix_times_vector_over_columns():
    p = t([[[[0.6, 0.2]], [[0.4, 0.8]]]])
    q = coarse_distribution(constant_transition(A2, 1, 2), p)
    # q_m = sum_k A[m, k] p_k, pixel by pixel
    expected = [[0.9 * 0.6 + 0.3 * 0.4, 0.9 * 0.2 + 0.3 * 0.8], [0.1 * 0.6 + 0.7 * 0.4, 0.1 * 0.2 + 0.7 * 0.8]]
    np.testing.assert_allclose(q[0, :, 0].numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("alpha, beta", [(0.6, 0.4), (1.0, 0.0), (0.0, 1.0), (0.25, 2.0)])
def test_positive_loss_by_hand(alpha, beta):
    p = t([[[[0.6, 0.2, 0.5]], [[0.4, 0.8, 0.5]]]])
    a = constant_transition(A2, 1, 3)
    y = target([[[0, 1, -1]]])
    q0 = [0.9 * 0.6 + 0.3 * 0.4, 0.9 * 0.2 + 0.3 * 0.8]  # q class 0 at pixels 0, 1 = .66, .42
    q1 = [0.1 * 0.6 + 0.7 * 0.4, 0.1 * 0.2 + 0.7 * 0.8]  # q class 1 = .34, .58
    ce = -(math.log(q0[0]) + math.log(q1[1])) / 2
    dice = 1 - (dice_term(q0[0], q0[0] + q0[1], 1) + dice_term(q1[1], q1[0] + q1[1], 1)) / 2
    value = positive_loss(p, a, y, alpha=alpha, beta=beta)
    assert value.item() == pytest.approx(alpha * ce + beta * dice, rel=1e-9)


# --------------------------------------------------------------------------- negative (complementary) loss


@pytest.mark.parametrize(
    "p_columns, labels, expected",
    [
        # L = 2, identity: "not 0" -> v = 1 - p0; "not 1" -> v = 1 - p1
        ([[0.7, 0.3], [0.2, 0.8]], [0, 1], -(math.log(0.3) + math.log(0.2)) / 2),
        # L = 3, identity: v_k = (1 - p_k) / 2
        ([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], [1, 2], -(math.log(0.8 / 2) + math.log(0.4 / 2)) / 2),
        # L = 4, identity, one pixel not drawn: v_k = (1 - p_k) / 3
        ([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]], [3, -1], -math.log(0.6 / 3)),
    ],
)
def test_negative_loss_identity_by_hand(p_columns, labels, expected):
    # p_columns[i] is the distribution at pixel i
    p = t(np.array(p_columns).T[None, :, None, :])
    y = target([[labels]])
    value = negative_loss(p, identity_transition(p), y)
    assert value.item() == pytest.approx(expected, rel=1e-9)


def test_negative_loss_goes_through_the_transition():
    p = t([[[[0.6]], [[0.4]]]])
    a = constant_transition(A2, 1, 1)
    # u = A p = (.66, .34); "not 0" -> v = (1 - .66) / 1
    assert negative_loss(p, a, target([[[0]]])).item() == pytest.approx(-math.log(0.34), rel=1e-9)
    # "not 1" -> v = 1 - .34
    assert negative_loss(p, a, target([[[1]]])).item() == pytest.approx(-math.log(0.66), rel=1e-9)


@pytest.mark.parametrize("n_labels, k", [(2, 1), (3, 1), (3, 0), (4, 2)])
def test_negative_loss_steps_lower_the_excluded_class(n_labels, k):
    logits = torch.zeros(1, n_labels, 1, 1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.SGD([logits], lr=1.0)
    y = target([[[k]]])
    history = []
    for _ in range(10):
        p = torch.softmax(logits, dim=1)
        history.append(p[0, k, 0, 0].item())
        optimiser.zero_grad()
        negative_loss(p, identity_transition(p.detach()), y).backward()
        optimiser.step()
    final = torch.softmax(logits, dim=1)[0, :, 0, 0]
    assert all(b < a for a, b in zip(history[:-1], history[1:], strict=True)), history
    assert final[k].item() < 0.5 * history[0]
    # the other classes share what k lost: none of them went down
    others = [j for j in range(n_labels) if j != k]
    assert (final[others] >= 1 / n_labels - 1e-12).all()


# --------------------------------------------------------------------------- regulariser and total


def test_transition_regulariser_by_hand():
    # layer 1: two pixels; pixel 0 is the identity, pixel 1 = [[.8, .3], [.2, .7]]
    a1 = t(np.zeros((1, 2, 2, 1, 2)))
    a1[0, :, :, 0, 0] = t([[1.0, 0.0], [0.0, 1.0]])
    a1[0, :, :, 0, 1] = t([[0.8, 0.3], [0.2, 0.7]])
    # layer 2: constant A2 = [[.9, .3], [.1, .7]]
    a2 = constant_transition(A2, 1, 2)
    norm1 = [0.0, 0.2**2 + 0.3**2 + 0.2**2 + 0.3**2]
    norm2 = 0.1**2 + 0.3**2 + 0.1**2 + 0.3**2
    expected = sum(norm1) / 2 + norm2
    assert transition_regulariser([a1, a2]).item() == pytest.approx(expected, rel=1e-9)
    assert transition_regulariser([a1]).item() == pytest.approx(sum(norm1) / 2, rel=1e-9)
    assert transition_regulariser([]).item() == 0.0


def test_transition_regulariser_over_drawn_pixels_by_hand():
    """With targets, each layer's term is the mean over ITS drawn pixels: a sparse drawing holds its head as
    firmly as a dense one; a layer with nothing drawn adds 0."""
    a1 = t(np.zeros((1, 2, 2, 1, 2)))
    a1[0, :, :, 0, 0] = t([[1.0, 0.0], [0.0, 1.0]])
    a1[0, :, :, 0, 1] = t([[0.8, 0.3], [0.2, 0.7]])
    a2 = constant_transition(A2, 1, 2)
    norm1 = 0.2**2 + 0.3**2 + 0.2**2 + 0.3**2
    norm2 = 0.1**2 + 0.3**2 + 0.1**2 + 0.3**2
    only_pixel_1 = torch.tensor([[[-1, 1]]])
    nothing = torch.full((1, 1, 2), -1)
    assert transition_regulariser([a1], [only_pixel_1]).item() == pytest.approx(norm1, rel=1e-9)
    assert transition_regulariser([a1, a2], [only_pixel_1, nothing]).item() == pytest.approx(norm1, rel=1e-9)
    both = torch.tensor([[[0, 1]]])
    assert transition_regulariser([a1, a2], [both, both]).item() == pytest.approx(norm1 / 2 + norm2, rel=1e-9)


def test_drawn_pixel_regulariser_holds_negative_heads_too():
    p = t(np.full((1, 2, 1, 2), 0.5))
    y = torch.tensor([[[1, -1]]])
    a_neg = constant_transition(A2, 1, 2)
    paper = refineseg_loss(p, [identity_transition(p)], [y], [a_neg], [y], regulariser_on="all pixels")
    drawn = refineseg_loss(p, [identity_transition(p)], [y], [a_neg], [y], regulariser_on="drawn pixels")
    assert paper["regulariser"].item() == 0.0  # eq. 7 leaves negative heads free
    assert drawn["regulariser"].item() == pytest.approx(0.1**2 + 0.3**2 + 0.1**2 + 0.3**2, rel=1e-6)
    with pytest.raises(ValueError, match="regulariser_on"):
        refineseg_loss(p, [a_neg], [y], [], [], regulariser_on="everywhere")


def test_refineseg_loss_terms_and_weighted_total():
    p = t([[[[0.6, 0.2, 0.5]], [[0.4, 0.8, 0.5]]]])
    a_pos = constant_transition(A2, 1, 3)
    a_neg = constant_transition([[0.5, 0.5], [0.5, 0.5]], 1, 3)  # far from I: must not be regularised
    y_pos = target([[[0, 1, -1]]])
    y_neg = target([[[-1, -1, 1]]])
    alpha, beta, lam = 0.3, 0.7, 0.5
    terms = refineseg_loss(p, [a_pos], [y_pos], [a_neg], [y_neg], alpha, beta, lam)

    q0, q1 = [0.66, 0.42], [0.34, 0.58]  # A2 p at pixels 0, 1 (see test_positive_loss_by_hand)
    ce = -(math.log(q0[0]) + math.log(q1[1])) / 2
    dice = 1 - (dice_term(q0[0], sum(q0), 1) + dice_term(q1[1], sum(q1), 1)) / 2
    positive = alpha * ce + beta * dice
    negative = -math.log(1 - 0.5)  # u = (.5, .5) at pixel 2, "not 1"
    regulariser = 0.1**2 + 0.3**2 + 0.1**2 + 0.3**2  # ||A2 - I||^2, the same at every pixel
    assert terms["positive"].item() == pytest.approx(positive, rel=1e-9)
    assert terms["negative"].item() == pytest.approx(negative, rel=1e-9)
    assert terms["regulariser"].item() == pytest.approx(regulariser, rel=1e-9)
    assert terms["total"].item() == pytest.approx(positive + negative + lam * regulariser, rel=1e-9)


def test_refineseg_loss_sums_over_layers():
    p = t([[[[0.6, 0.2]], [[0.4, 0.8]]]])
    a = constant_transition(A2, 1, 2)
    eye = identity_transition(p)
    y1, y2 = target([[[0, -1]]]), target([[[-1, 1]]])
    both = refineseg_loss(p, [a, eye], [y1, y2], [a, eye], [y2, y1])
    parts = [positive_loss(p, a, y1), positive_loss(p, eye, y2), negative_loss(p, a, y2), negative_loss(p, eye, y1)]
    assert both["positive"].item() == pytest.approx(parts[0].item() + parts[1].item(), rel=1e-12)
    assert both["negative"].item() == pytest.approx(parts[2].item() + parts[3].item(), rel=1e-12)
    # ||A2 - I||^2 = .2 from the first positive layer; the identity adds nothing
    assert both["regulariser"].item() == pytest.approx(0.2, rel=1e-9)


def test_refineseg_loss_without_negative_layers():
    p = t([[[[0.6, 0.2]], [[0.4, 0.8]]]])
    y = target([[[0, 1]]])
    terms = refineseg_loss(p, [identity_transition(p)], [y], [], [])
    assert terms["negative"].item() == 0.0
    assert terms["regulariser"].item() == 0.0
    assert terms["total"].item() == pytest.approx(positive_loss(p, identity_transition(p), y).item(), rel=1e-12)


# --------------------------------------------------------------------------- un-drawn pixels get no gradient


def random_inputs(seed: int, n_labels: int = 3, shape=(2, 3, 4)):
    generator = torch.Generator().manual_seed(seed)
    b, h, w = shape
    logits = torch.randn(b, n_labels, h, w, generator=generator, dtype=torch.float64, requires_grad=True)
    transition_logits = torch.randn(b, n_labels, n_labels, h, w, generator=generator, dtype=torch.float64)
    transition = torch.softmax(transition_logits, dim=1)
    y = torch.randint(0, n_labels, (b, h, w), generator=generator)
    undrawn = torch.rand(b, h, w, generator=generator) < 0.5
    undrawn[0, 0, 0], undrawn[0, 0, 1] = True, False  # at least one of each
    y[undrawn] = -1
    return logits, transition, y, undrawn


LOSSES = {
    "cross_entropy": lambda p, a, y: masked_cross_entropy(coarse_distribution(a, p), y),
    "dice": lambda p, a, y: masked_dice_loss(coarse_distribution(a, p), y),
    "positive": positive_loss,
    "negative": negative_loss,
    "total": lambda p, a, y: refineseg_loss(p, [a], [y], [a], [y])["total"],
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(LOSSES))
def test_undrawn_pixels_get_exactly_zero_gradient(name, seed):
    logits, transition, y, undrawn = random_inputs(seed)
    probabilities = torch.softmax(logits, dim=1)
    probabilities.retain_grad()
    LOSSES[name](probabilities, transition, y).backward()
    for grad in (probabilities.grad, logits.grad):
        undrawn_grad = grad.permute(0, 2, 3, 1)[undrawn]
        drawn_grad = grad.permute(0, 2, 3, 1)[~undrawn]
        assert torch.all(undrawn_grad == 0), f"{name}: non-zero gradient at un-drawn pixels"
        assert drawn_grad.abs().max() > 1e-6, f"{name}: the drawn pixels should get a gradient"


@pytest.mark.parametrize("name", list(LOSSES))
def test_nothing_drawn_gives_zero_loss_and_finite_zero_gradient(name):
    logits, transition, y, _ = random_inputs(2)
    y = torch.full_like(y, -1)
    value = LOSSES[name](torch.softmax(logits, dim=1), transition, y)
    value.backward()
    regulariser = transition_regulariser([transition]).item() * 0.2 if name == "total" else 0.0
    assert value.item() == pytest.approx(regulariser, abs=1e-12)
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad == 0)


def test_edge_aware_smoothness_by_hand():
    # One row of three pixels, radius 1: the pairs (0, 1) and (1, 2), no vertical pair.
    p = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]).T.reshape(1, 2, 1, 3)
    image = torch.tensor([0.0, 0.3, 2.0]).reshape(1, 1, 1, 3)
    sigma = 0.5
    w01, w12 = math.exp(-(0.3**2) / (2 * sigma**2)), math.exp(-(1.7**2) / (2 * sigma**2))
    d01, d12 = 1 - (0.9 * 0.6 + 0.1 * 0.4), 1 - (0.6 * 0.2 + 0.4 * 0.8)
    expected = (w01 * d01 + w12 * d12) / 2
    assert math.isclose(float(edge_aware_smoothness(p, image, radius=1, sigma=sigma)), expected, rel_tol=1e-5)


def test_edge_aware_smoothness_pulls_an_undrawn_pixel_towards_its_like_neighbours():
    # A flat region of class 1 with one uncertain pixel in its middle, and a bright edge to its right: the
    # gradient raises the uncertain pixel's class-1 probability, and the pixels across the edge feel nothing.
    logits = torch.zeros(1, 2, 5, 6)
    logits[:, 1, :, :3] = 4.0
    logits[:, 1, 2, 1] = 0.0
    logits.requires_grad_(True)
    image = torch.zeros(1, 1, 5, 6)
    image[..., 3:] = 10.0
    edge_aware_smoothness(torch.softmax(logits, 1), image, radius=2).backward()
    assert logits.grad[0, 1, 2, 1] < 0  # descent raises the class-1 logit
    assert torch.all(logits.grad[..., 3:] == 0)
    with pytest.raises(ValueError, match="radius"):
        edge_aware_smoothness(torch.softmax(logits, 1), image, radius=0)


def test_gaussian_blur_matches_scipy():
    from scipy import ndimage as ndi

    images = torch.randn(2, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    expected = np.stack([[ndi.gaussian_filter(c, 1.5, mode="mirror", truncate=3.0) for c in im]
                         for im in images.numpy()])
    np.testing.assert_allclose(gaussian_blur(images, 1.5).numpy(), expected, atol=1e-5)
    assert gaussian_blur(images, 0) is images


def test_undrawn_background_loss_by_hand():
    # Two layers over one 1 x 3 image: pixel 0 drawn by the first, pixel 1 by the second, pixel 2 by neither.
    background = [0.9, 0.2, 0.7]
    p = t([[background, [1 - b for b in background]]]).unsqueeze(2)  # (1, 2, 1, 3)
    first, second = target([[[1, -1, -1]]]), target([[[-1, 0, -1]]])
    assert float(undrawn_background_loss(p, [first, second])) == pytest.approx(-math.log(0.7))
    # Without the second layer, pixel 1 is undrawn too: the mean over two pixels.
    assert float(undrawn_background_loss(p, [first])) == pytest.approx(-(math.log(0.2) + math.log(0.7)) / 2)


def test_undrawn_background_loss_pulls_only_undrawn_pixels_towards_background():
    logits = torch.zeros(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    drawn = target(np.where(np.arange(16).reshape(4, 4) < 6, 1, -1)[None].repeat(2, 0))
    undrawn_background_loss(torch.softmax(logits, 1), [drawn]).backward()
    grad = logits.grad
    assert torch.all(grad[:, :, drawn[0] >= 0] == 0)
    # A step against the gradient raises the background logit and lowers the others, where nothing is drawn.
    assert torch.all(grad[:, 0][:, drawn[0] < 0] < 0) and torch.all(grad[:, 1:][:, :, drawn[0] < 0] > 0)


def test_a_layer_without_a_head_none_gives_the_loss_of_an_identity_head():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 5, 6), dim=1)
    y = torch.randint(-1, 3, (2, 5, 6))
    not_k = torch.randint(-1, 3, (2, 5, 6))
    a = torch.softmax(torch.randn(2, 3, 3, 5, 6), dim=1)
    for on in ("all pixels", "drawn pixels"):
        explicit = refineseg_loss(p, [a, identity_transition(p)], [y, y], [identity_transition(p)], [not_k],
                                  regulariser_on=on)
        implicit = refineseg_loss(p, [a, None], [y, y], [None], [not_k], regulariser_on=on)
        for term in ("total", "positive", "negative", "regulariser"):
            assert torch.allclose(explicit[term], implicit[term]), (on, term)
    assert float(refineseg_loss(p, [None], [y], [], [])["regulariser"]) == 0.0
