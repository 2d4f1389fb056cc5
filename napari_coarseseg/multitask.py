"""The multi-task network of the recursive method ([1]_, sec. 3.4).

A U-Net whose encoder and bottom decoder levels are shared by all tasks and
whose last decoder levels are multi-task blocks with one path per task:

- T1 ``segmentation`` (strong labels) and T2 ``approximation`` (partial masks)
  share the first convolution of every multi-task block; the T1 path then adds
  a residual unit, the T2 path a plain convolution;
- T3 ``separation`` (optional scribbles on interfaces between touching
  objects) has a path of its own.

Each task has its own 1x1 output layer. Convolutions use batch norm and leaky
ReLU, down-sampling max-pooling, up-sampling bilinear interpolation, with long
skip connections from the encoder.

References
----------
.. [1] R. Ke et al., "Multi-task deep learning for image segmentation using
   recursive approximation tasks", IEEE Transactions on Image Processing 30,
   2021.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MultiTaskUNet", "TASKS"]

TASKS = ("segmentation", "approximation", "separation")


def conv_unit(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution, batch norm, leaky ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.01, inplace=True),
    )


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(conv_unit(in_channels, out_channels), conv_unit(out_channels, out_channels))


class ResidualUnit(nn.Module):
    """``x + conv(conv(x))`` at constant width: the extra depth of the segmentation path."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_unit(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.body(x), 0.01)


class MultiTaskBlock(nn.Module):
    """One decoder level with a path per task.

    ``shared`` is the first layer of the segmentation and approximation paths
    (the same weights applied to each path's own input); the segmentation path
    continues with a residual unit, the approximation path with a convolution,
    the separation path (if any) with two convolutions of its own.
    """

    def __init__(self, in_channels: int, out_channels: int, separation: bool):
        super().__init__()
        self.shared = conv_unit(in_channels, out_channels)
        self.segmentation = ResidualUnit(out_channels)
        self.approximation = conv_unit(out_channels, out_channels)
        self.separation = double_conv(in_channels, out_channels) if separation else None

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {
            "segmentation": self.segmentation(self.shared(inputs["segmentation"])),
            "approximation": self.approximation(self.shared(inputs["approximation"])),
        }
        if self.separation is not None:
            out["separation"] = self.separation(inputs["separation"])
        return out


class MultiTaskUNet(nn.Module):
    """Shared encoder and bottom decoder, multi-task blocks on the last levels.

    Parameters
    ----------
    in_channels : int
        Image channels.
    n_classes : int
        Classes of the segmentation and approximation outputs, background
        included.
    base_channels : int
        Width of the first level; each level below doubles it.
    depth : int
        Number of down-sampling steps; inputs must be divisible by
        ``2 ** depth``.
    task_levels : int
        How many of the last decoder levels are multi-task blocks (at most
        ``depth``).
    separation : bool
        Whether to add the separation task T3 (2 classes: interface or not).

    Notes
    -----
    ``forward`` returns a dict of logits: ``segmentation`` and
    ``approximation`` of shape (B, n_classes, H, W) and, with ``separation``,
    ``separation`` of shape (B, 2, H, W).
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        base_channels: int = 16,
        depth: int = 4,
        task_levels: int = 2,
        separation: bool = False,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if not 1 <= task_levels <= depth:
            raise ValueError(f"task_levels must be between 1 and depth={depth}, got {task_levels}")
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.base_channels = base_channels
        self.depth = depth
        self.task_levels = task_levels
        self.has_separation = separation
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList(
            [double_conv(in_channels, widths[0])] + [double_conv(widths[i], widths[i + 1]) for i in range(depth)]
        )
        levels = list(reversed(range(depth)))  # decoder levels, deepest first
        shared_levels, task_levels_ = levels[: depth - task_levels], levels[depth - task_levels :]
        self.decoders = nn.ModuleList([double_conv(widths[i + 1] + widths[i], widths[i]) for i in shared_levels])
        self.task_blocks = nn.ModuleList(
            [MultiTaskBlock(widths[i + 1] + widths[i], widths[i], separation) for i in task_levels_]
        )
        self.heads = nn.ModuleDict(
            {"segmentation": nn.Conv2d(widths[0], n_classes, 1), "approximation": nn.Conv2d(widths[0], n_classes, 1)}
        )
        if separation:
            self.heads["separation"] = nn.Conv2d(widths[0], 2, 1)

    @property
    def divisor(self) -> int:
        """Height and width of inputs must be multiples of this number."""
        return 2**self.depth

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.heads.keys())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = F.max_pool2d(x, 2)
            x = encoder(x)
            skips.append(x)
        x = skips.pop()

        def up_and_skip(features: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
            features = F.interpolate(features, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            return torch.cat([features, skip], dim=1)

        for decoder in self.decoders:
            x = decoder(up_and_skip(x, skips.pop()))
        paths = {task: x for task in self.tasks}
        for block in self.task_blocks:
            skip = skips.pop()
            paths = block({task: up_and_skip(features, skip) for task, features in paths.items()})
        return {task: self.heads[task](features) for task, features in paths.items()}
