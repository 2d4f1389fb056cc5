"""Networks: a configurable 2D U-Net and the per-pixel transition-matrix heads.

The U-Net returns both the class logits and the features of its last decoder
level, because the annotation heads of the refineseg method [1]_ are
small convolutions on those features.

References
----------
.. [1] A. Du, N. Aung, T. N. Arvanitis, S. K. Piechnik, J. A. C. Lima,
   S. E. Petersen, L. Zhang, "RefineSeg: Dual Coarse-to-Fine Learning for
   Medical Image Segmentation", MICCAI 2025.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["UNet", "TransitionHead", "conv_block", "fold_batch_norm"]


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 convolutions, each followed by batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def fold_batch_norm(network: nn.Module) -> nn.Module:
    """An evaluation-mode copy of ``network`` with each batch norm folded into the convolution before it.

    In evaluation mode a batch norm is an affine map per channel, so it merges
    into the preceding convolution's weights and bias: the same outputs up to
    float rounding, one pass over the activations fewer (``benchmarks/speed.py``
    measures the gain). Pairs are found inside ``nn.Sequential`` blocks,
    where both networks of this package keep them; ``network`` is unchanged.
    """
    folded = copy.deepcopy(network).eval()
    for block in folded.modules():
        if not isinstance(block, nn.Sequential):
            continue
        for i in range(len(block) - 1):
            if isinstance(block[i], nn.Conv2d) and isinstance(block[i + 1], nn.BatchNorm2d):
                block[i] = fuse_conv_bn_eval(block[i], block[i + 1])
                block[i + 1] = nn.Identity()
    return folded


class UNet(nn.Module):
    """A 2D U-Net with max-pool down-sampling and bilinear up-sampling.

    Parameters
    ----------
    in_channels : int
        Number of image channels (1 for grey images, 3 for RGB).
    n_classes : int
        Number of output classes, background included.
    base_channels : int
        Channels of the first level; each level below doubles them.
    depth : int
        Number of down-sampling steps. Inputs must have a height and width
        divisible by ``2 ** depth`` (:func:`napari_coarseseg.inference.predict`
        pads for you).

    Notes
    -----
    ``forward`` returns ``(logits, features)``: ``logits`` has shape
    ``(B, n_classes, H, W)`` and ``features`` ``(B, base_channels, H, W)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        base_channels: int = 16,
        depth: int = 4,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.base_channels = base_channels
        self.depth = depth
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList(
            [conv_block(in_channels, widths[0])]
            + [conv_block(widths[i], widths[i + 1]) for i in range(depth)]
        )
        # Each decoder level sees the up-sampled deeper features concatenated
        # with the skip connection of its own level.
        self.decoders = nn.ModuleList(
            [conv_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth))]
        )
        self.classifier = nn.Conv2d(widths[0], n_classes, 1)

    @property
    def divisor(self) -> int:
        """Height and width of inputs must be multiples of this number."""
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = F.max_pool2d(x, 2)
            x = encoder(x)
            skips.append(x)
        x = skips.pop()
        for decoder in self.decoders:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = decoder(torch.cat([x, skip], dim=1))
        return self.classifier(x), x


class TransitionHead(nn.Module):
    """Per-pixel column-stochastic transition matrix of one annotation strategy.

    ``A[b, m, k, y, x] = p(observed = m | true = k, image)``: a softmax over the
    ``m`` axis, so every column sums to one.

    Parameters
    ----------
    in_channels : int
        Channels of the decoder features the head reads.
    n_classes : int
        Number of classes L, background included.
    diagonal_bias : float
        Initial logit added on the diagonal. With near-zero weights, the
        matrices start close to the identity (0.98 on the diagonal for L=2 and
        the default 4), so training starts as plain partial-label learning.
    """

    def __init__(self, in_channels: int, n_classes: int, diagonal_bias: float = 4.0):
        super().__init__()
        self.n_classes = n_classes
        self.conv = nn.Conv2d(in_channels, n_classes * n_classes, 1)
        nn.init.normal_(self.conv.weight, std=1e-3)
        with torch.no_grad():
            self.conv.bias.copy_(diagonal_bias * torch.eye(n_classes).flatten())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, _, h, w = features.shape
        logits = self.conv(features).view(b, self.n_classes, self.n_classes, h, w)
        return torch.softmax(logits, dim=1)
