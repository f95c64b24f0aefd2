"""A small stand-alone self-attention ResNet for CIFAR (Ramachandran et al. 2019, paper.md §5.3).

SASA replaces every spatial (3x3) conv of a ResNet by local window attention
(:class:`~satconv.attention.SASAAttention`) and downsamples with a 2x2 average pool.  CIFAR-size
version::

    stem: conv 3x3 (C_in -> w_0, no bias) -> BN -> ReLU                       32x32
    stage i: [AvgPool 2x2 for i > 0] -> Bottleneck x depth_i (width w_i)
    mean over pixels -> dropout -> Linear(w_last -> classes)

``Bottleneck``: ``1x1 (in -> m) -> BN -> ReLU -> SASA(m -> m) -> BN -> ReLU -> 1x1 (m -> w) -> BN``,
plus the shortcut (identity, or 1x1 conv + BN when the width changes), then ReLU; ``m = w / 2``
(:data:`EXPANSION`; the ImageNet ResNet-50 uses 4, but CIFAR widths would leave heads of size 1-2).
Deviations from the SASA paper: a conv stem instead of the attention stem, pooling between stages
instead of after the attention layer of each stage's first block.  Defaults: depths (2, 2, 2), widths
(64, 128, 256), window ``attention.local.kernel_size`` (7 in the paper), ``attention.num_heads`` heads
of size ``m / num_heads`` (``attention.head_dim`` null) with a value projection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..dropout import Dropout
from .common import make_attention, stage_sizes

#: block width / attention width
EXPANSION = 2


class Bottleneck(nn.Module):
    """ResNet bottleneck whose 3x3 conv is SASA attention; ``(B, in, H, W) -> (B, planes, H, W)``.

    Args:
        attention: the attention config section (``kind: sasa``).
        in_planes: input channels.
        planes: output channels; the attention runs at ``planes // EXPANSION``.
    """

    def __init__(self, attention, in_planes: int, planes: int):
        super().__init__()
        mid = max(planes // EXPANSION, 1)
        self.conv1 = nn.Conv2d(in_planes, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.attn = make_attention(attention, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """``x: (B, in, H, W)`` -> ``(out, probs)``: ``(B, planes, H, W)`` and ``(B, heads, N, N)`` or ``None``."""
        out = F.relu(self.bn1(self.conv1(x))).permute(0, 2, 3, 1)  # (B, H, W, mid)
        a = self.attn(out, return_attention=return_attention)
        a, probs = a if return_attention else (a, None)
        out = F.relu(self.bn2(a.permute(0, 3, 1, 2)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x)), probs


class SASANet(nn.Module):
    """CIFAR SASA ResNet. ``images: (B, C, H, W)`` -> logits ``(B, num_classes)``.

    Args:
        cfg: :class:`satconv.config.ModelConfig` (``attention.kind: sasa``).
    """

    def __init__(self, cfg):
        super().__init__()
        if cfg.attention.kind != "sasa":
            raise ValueError(f"attention.kind must be sasa for the SASA network, got {cfg.attention.kind!r}")
        depths, widths = stage_sizes(cfg, (2, 2, 2))
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, prev = [], widths[0]
        for d, w in zip(depths, widths):
            stages.append(nn.ModuleList([Bottleneck(cfg.attention, prev if j == 0 else w, w) for j in range(d)]))
            prev = w
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AvgPool2d(2, 2)
        self.drop = Dropout(cfg.dropout)
        self.classifier = nn.Linear(prev, cfg.num_classes)

    def attention_layers(self) -> list[nn.Module]:
        """The attention modules, first to last."""
        return [block.attn for stage in self.stages for block in stage]

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        """``images: (B, C, H, W)`` -> logits ``(B, classes)``, or ``(logits, [probs per layer])``."""
        x, probs = self.stem(images), []
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.pool(x)
            for block in stage:
                x, p = block(x, return_attention)
                probs.append(p)
        logits = self.classifier(self.drop(x.mean(dim=(2, 3))))
        return (logits, probs) if return_attention else logits


def build(cfg) -> SASANet:
    """Build the SASA network a :class:`satconv.config.ModelConfig` describes."""
    return SASANet(cfg)


__all__ = ["SASANet", "Bottleneck", "build", "EXPANSION"]
