"""Networks: a configurable 2D U-Net, its 3-D sibling on a slab of slices, and the transition-matrix heads.

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

__all__ = ["UNet", "SlabUNet", "TransitionHead", "conv_block", "fold_batch_norm"]


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


def conv_block_3d(in_channels: int, out_channels: int, z_kernel: int) -> nn.Sequential:
    """Two convolutions of a slab, each followed by batch norm and ReLU.

    The first spans ``z_kernel`` slices without padding along z (the slab
    loses ``z_kernel - 1`` slices), the second is in-plane (1 x 3 x 3).
    """
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, (z_kernel, 3, 3), padding=(0, 1, 1), bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv3d(out_channels, out_channels, (1, 3, 3), padding=(0, 1, 1), bias=False),
        nn.BatchNorm3d(out_channels),
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
            if isinstance(block[i], (nn.Conv2d, nn.Conv3d)) and isinstance(block[i + 1],
                                                                      (nn.BatchNorm2d, nn.BatchNorm3d)):
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
        divisible by :attr:`divisor` (:func:`napari_coarseseg.inference.predict`
        pads for you).
    downsample : int
        The network works at 1 / ``downsample`` of the input's resolution:
        the input is averaged over ``downsample x downsample`` blocks first,
        and the logits and features are interpolated back (bilinear) to the
        input's size. For objects large in pixels (a heart in a cine MRI
        slice): the receptive field covers ``downsample`` times more of the
        image at ``1 / downsample**2`` of the cost, while inputs, outputs and
        drawings keep the image's own grid. 1 (default): full resolution.

    Notes
    -----
    ``forward`` returns ``(logits, features)``: ``logits`` has shape
    ``(B, n_classes, H, W)`` and ``features`` ``(B, base_channels, H, W)``.

    Examples
    --------
    >>> net = UNet(in_channels=1, n_classes=3, base_channels=4, depth=2, downsample=2)
    >>> net.divisor
    8
    >>> logits, features = net(torch.zeros(1, 1, 24, 16))
    >>> tuple(logits.shape), tuple(features.shape)
    ((1, 3, 24, 16), (1, 4, 24, 16))
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        base_channels: int = 16,
        depth: int = 4,
        downsample: int = 1,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if int(downsample) != downsample or downsample < 1:
            raise ValueError(f"downsample must be a whole number >= 1, got {downsample}")
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.base_channels = base_channels
        self.depth = depth
        self.downsample = int(downsample)
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
        return 2**self.depth * self.downsample

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.downsample == 1:
            return self.decode(self.encode(x))
        size = x.shape[-2:]
        # Block means: the anti-aliased down-sampling (one pixel of the coarse grid is the mean of its block).
        logits, features = self.decode(self.encode(F.avg_pool2d(x, self.downsample)))
        return (F.interpolate(logits, size=size, mode="bilinear", align_corners=False),
                F.interpolate(features, size=size, mode="bilinear", align_corners=False))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The (B, width, H / 2**level, W / 2**level) features of every encoder level, the deepest last."""
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = F.max_pool2d(x, 2)
            x = encoder(x)
            skips.append(x)
        return skips

    def decode(self, skips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, features)`` from the encoder's levels (``skips`` is used up)."""
        x = skips.pop()
        for decoder in self.decoders:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = decoder(torch.cat([x, skip], dim=1))
        return self.classifier(x), x


class SlabUNet(UNet):
    """A U-Net whose encoder is 3-D, over a slab of ``slices`` slices, and which segments the middle one.

    The input is the 2.5-D one (:func:`~napari_coarseseg.data.with_slice_context`:
    slices ``z - k ... z + k`` as channels, slice-major), read back as a
    (B, C, 2k + 1, H, W) volume. Serial sections and clinical volumes are
    anisotropic (EM 2012: 4 x 4 x 50 nm), so the network is too:

    - pooling is in-plane only, (1, 2, 2): the slab keeps its slices;
    - the first level filters each slice on its own (1 x 3 x 3, weights shared
      across slices), where a 3-D kernel would mix sections 12 pixels apart;
    - each level below begins with a 3 x 3 x 3 convolution without z padding,
      which merges three slices into one, until one is left: by then pixels
      are 2**level times coarser in-plane and closer to the slice spacing;
    - the skips and the 2-D decoder carry the middle slice.

    So only the first level and one convolution per merge work on several
    slices, and the cost stays near the 2-D U-Net's, where a full
    3 x 3 x 3 U-Net on three slices does nine times its work at every level.

    Parameters
    ----------
    in_channels : int
        Channels of one slice (the attribute ``in_channels`` is those of the
        whole input, ``in_channels * slices``).
    n_classes, base_channels, depth
        As :class:`UNet`.
    slices : int
        Slices of the slab, odd (2k + 1 for a slice context of k).
    downsample : int
        As :class:`UNet`: the in-plane block size the slab is averaged over first.

    Examples
    --------
    >>> net = SlabUNet(in_channels=1, n_classes=2, base_channels=4, depth=2, slices=3)
    >>> logits, features = net(torch.zeros(2, 3, 16, 16))  # 3 slices of 1 channel
    >>> tuple(logits.shape), tuple(features.shape)
    ((2, 2, 16, 16), (2, 4, 16, 16))
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 2, base_channels: int = 16, depth: int = 4,
                 slices: int = 3, downsample: int = 1):
        super().__init__(in_channels, n_classes, base_channels, depth, downsample)
        if slices < 1 or slices % 2 == 0:
            raise ValueError(f"slices must be odd and at least 1 (2k + 1), got {slices}")
        # in_channels: what the input tensor has, as for every network here (the model card checks it).
        self.slices, self.slice_channels, self.in_channels = slices, in_channels, in_channels * slices
        widths = [base_channels * 2**level for level in range(depth + 1)]
        blocks, remaining = [conv_block_3d(in_channels, widths[0], 1)], slices
        for level in range(depth):
            z_kernel = 3 if remaining > 1 else 1
            blocks.append(conv_block_3d(widths[level], widths[level + 1], z_kernel))
            remaining -= z_kernel - 1
        self.encoders = nn.ModuleList(blocks)  # the 2-D decoders and classifier of UNet stay

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The middle slice's features at every encoder level, as :meth:`UNet.encode` gives them."""
        batch, _, height, width = x.shape
        x = x.view(batch, self.slices, self.slice_channels, height, width).transpose(1, 2)
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = F.max_pool3d(x, (1, 2, 2))
            x = encoder(x)
            skips.append(x[:, :, x.shape[2] // 2])  # the middle slice
        return skips


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
