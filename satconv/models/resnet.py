"""ResNet18 for CIFAR (He et al. 2016, kuangliu/pytorch-cifar layout): 3x3 stem, no max-pool.

The paper's baseline (epfml/attention-cnn ``runs/resnet``): 11,173,962 parameters at the default
widths (64, 128, 256, 512) and depths (2, 2, 2, 2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import stage_sizes


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN and a (projected) shortcut; ``(B, C_in, H, W) -> (B, C_out, H/s, W/s)``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def make_stage(in_planes: int, planes: int, depth: int, stride: int) -> nn.Sequential:
    """``depth`` basic blocks, the first with ``stride``."""
    return nn.Sequential(*[BasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                           for i in range(depth)])


class ResNet18(nn.Module):
    """CIFAR ResNet18. ``images: (B, 3, H, W)`` -> logits ``(B, num_classes)``.

    Args:
        cfg: :class:`satconv.config.ModelConfig`; ``stage_depths``/``stage_widths`` override (2,2,2,2)/(64,...,512).
    """

    def __init__(self, cfg):
        super().__init__()
        depths, widths = stage_sizes(cfg, (2, 2, 2, 2))
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, prev = [], widths[0]
        for i, (d, w) in enumerate(zip(depths, widths)):
            stages.append(make_stage(prev, w, d, 1 if i == 0 else 2))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(prev, cfg.num_classes)

    def attention_layers(self) -> list[nn.Module]:
        """ResNet has no attention layers."""
        return []

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        """``images: (B, C, H, W)`` -> logits ``(B, classes)``, or ``(logits, [])``."""
        x = self.stages(self.stem(images))
        logits = self.classifier(x.mean(dim=(2, 3)))
        return (logits, []) if return_attention else logits
