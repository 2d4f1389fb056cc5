"""The U-Net and the per-pixel transition heads (networks.py).

The axis convention is ``A[b, m, k, y, x] = p(observed m | true k)``: a
softmax over ``m`` (dim 1), so each column ``k`` sums to one, which is what
``losses.coarse_distribution`` (``q_m = sum_k A[m, k] p_k``) needs for ``q``
to be a distribution.
"""

from __future__ import annotations

import math

import pytest
import torch

from napari_coarseseg.losses import coarse_distribution
from napari_coarseseg.multitask import MultiTaskUNet
from napari_coarseseg.networks import SlabUNet, TransitionHead, UNet, fold_batch_norm


def features(b=2, c=4, h=5, w=7, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_labels", [2, 3, 4])
def test_transition_head_columns_sum_to_one(n_labels):
    torch.manual_seed(0)
    head = TransitionHead(4, n_labels)
    # Large random weights, so the matrices are far from the (symmetric) identity
    # and rows do NOT sum to one: only the normalised axis does.
    with torch.no_grad():
        head.conv.weight.normal_(std=2.0)
    a = head(features())
    assert a.shape == (2, n_labels, n_labels, 5, 7)
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(dim=1), torch.ones(2, n_labels, 5, 7))
    row_sums = a.sum(dim=2)
    assert (row_sums - 1).abs().max() > 0.1, "rows should not be normalised, columns are"
    # so A p is a distribution for any distribution p
    p = torch.softmax(features(c=n_labels, seed=1), dim=1)
    q = coarse_distribution(a, p)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(2, 5, 7))
    assert (q >= 0).all()


@pytest.mark.parametrize("n_labels", [2, 3, 4])
@pytest.mark.parametrize("bias", [4.0, 2.0])
def test_transition_head_starts_near_identity(n_labels, bias):
    torch.manual_seed(0)
    a = TransitionHead(8, n_labels, diagonal_bias=bias)(features(c=8))
    # zero weights would give exp(b) / (exp(b) + L - 1) on the diagonal,
    # 1 / (exp(b) + L - 1) off it; the std 1e-3 initial weights barely move that
    diagonal = math.exp(bias) / (math.exp(bias) + n_labels - 1)
    off = 1 / (math.exp(bias) + n_labels - 1)
    eye = torch.eye(n_labels, dtype=torch.bool).view(1, n_labels, n_labels, 1, 1).expand_as(a)
    assert a[eye].sub(diagonal).abs().max() < 1e-2
    assert a[~eye].sub(off).abs().max() < 1e-2
    if bias == 4.0:
        assert a[eye].min() > 0.9


def test_transition_head_default_bias_gives_0_98_for_two_classes():
    torch.manual_seed(0)
    a = TransitionHead(4, 2)(features())
    assert a[:, 0, 0].mean().item() == pytest.approx(0.982, abs=2e-3)
    assert a[:, 1, 1].mean().item() == pytest.approx(0.982, abs=2e-3)


@pytest.mark.parametrize(
    "depth, in_channels, n_classes, base, size",
    [
        (1, 1, 2, 4, (6, 10)),
        (2, 1, 2, 4, (32, 32)),
        (2, 3, 3, 8, (12, 20)),
        (3, 1, 4, 4, (16, 40)),
        (3, 2, 2, 4, (8, 8)),
    ],
)
def test_unet_output_shapes(depth, in_channels, n_classes, base, size):
    torch.manual_seed(0)
    net = UNet(in_channels, n_classes, base, depth).eval()
    assert net.divisor == 2**depth
    h, w = size
    assert h % net.divisor == 0 and w % net.divisor == 0
    with torch.no_grad():
        logits, feats = net(torch.randn(2, in_channels, h, w))
    assert logits.shape == (2, n_classes, h, w)
    assert feats.shape == (2, base, h, w)
    assert torch.isfinite(logits).all()
    # the heads read these features
    a = TransitionHead(base, n_classes)(feats)
    assert a.shape == (2, n_classes, n_classes, h, w)


def test_unet_is_fully_convolutional_per_sample():
    """Samples of a batch do not mix (eval mode): a batch gives each sample's own output."""
    torch.manual_seed(0)
    net = UNet(1, 2, 4, 2).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        batch, _ = net(x)
        single, _ = net(x[1:2])
    torch.testing.assert_close(batch[1:2], single, atol=1e-5, rtol=1e-5)


def test_unet_rejects_depth_zero():
    with pytest.raises(ValueError, match="depth"):
        UNet(depth=0)


@pytest.mark.parametrize("make", [lambda: UNet(1, 3, base_channels=4, depth=2),
                                  lambda: MultiTaskUNet(1, 2, base_channels=4, depth=2),
                                  lambda: SlabUNet(1, 3, base_channels=4, depth=2, slices=3)],
                         ids=["unet", "multitask", "slab"])
def test_fold_batch_norm_gives_the_same_outputs_and_leaves_the_network_alone(make):
    torch.manual_seed(0)
    network = make()
    channels = network.in_channels
    # Train a few batches so the running statistics are far from the initial 0 / 1.
    optimiser = torch.optim.SGD(network.parameters(), lr=0.1)
    for _ in range(3):
        output = network(3 * torch.randn(2, channels, 32, 32) + 5)
        loss = sum(o.mean() for o in (output.values() if isinstance(output, dict) else output))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    batch_norm = torch.nn.modules.batchnorm._BatchNorm  # 2-D and 3-D
    batch_norms = sum(isinstance(m, batch_norm) for m in network.modules())
    assert batch_norms > 0

    folded = fold_batch_norm(network)

    assert network.training and sum(isinstance(m, batch_norm) for m in network.modules()) == batch_norms
    assert not folded.training
    assert not any(isinstance(m, batch_norm) for m in folded.modules())
    x = 3 * torch.randn(2, channels, 32, 32) + 5
    network.eval()
    with torch.no_grad():
        expected, actual = network(x), folded(x)
    if isinstance(expected, dict):
        expected, actual = list(expected.values()), list(actual.values())
    pairs = zip(expected, actual, strict=True)
    for e, a in pairs:
        assert e.abs().max() > 0.01  # not a trivial all-zero output
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_the_slab_unet_segments_the_middle_slice_from_all_three_and_pools_in_plane_only():
    torch.manual_seed(0)
    network = SlabUNet(in_channels=2, n_classes=3, base_channels=4, depth=3, slices=3).eval()
    x = torch.randn(1, 6, 32, 32, requires_grad=True)  # slices z-1, z, z+1, two channels each (slice-major)
    logits, features = network(x)
    assert logits.shape == (1, 3, 32, 32) and features.shape == (1, 4, 32, 32)
    logits[0, :, 16, 16].sum().backward()
    # Every slice of the slab reaches the middle slice's output: it is learned across slices.
    reach = x.grad[0].abs().sum(dim=(1, 2))
    assert (reach > 0).all(), reach
    # Pooling is in-plane: the deepest level still has 3 slices in, one out of the 3 x 3 x 3 convolution,
    # and the first level filters slices one by one (a 1 x 3 x 3 kernel).
    kernels = [encoder[0].kernel_size for encoder in network.encoders]
    assert kernels == [(1, 3, 3), (3, 3, 3), (1, 3, 3), (1, 3, 3)]
    with pytest.raises(ValueError, match="odd"):
        SlabUNet(slices=2)
