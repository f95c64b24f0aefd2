"""A small FCViT for CIFAR-size input (Ma et al. 2022; ma-xu/FCViT ``models/fcvit.py``, paper.md §5.4).

MetaFormer layout with FCViT's token mixer (:class:`~satconv.attention.FCViTTokenMixer`)::

    stem: conv 3x3 (C_in -> w_0, stride 1) -> BN                      (FCViT: 7x7 / stride 4 for 224²)
    stage i: [conv 3x3 stride 2 (w_{i-1} -> w_i) -> BN for i > 0] -> Block x depth_i
    GroupNorm(1) -> mean over pixels -> Linear(w_last -> classes)

    Block:  x = x + ls_1 * TokenMixer(GN(x));   x = x + ls_2 * ChannelMixer(GN(x))

GN = GroupNorm with one group; layer-scale ``ls`` initialised to 1e-5; ``ChannelMixer`` = 1x1
``(w -> r*w)`` -> depth-wise 3x3 -> GELU -> dropout -> 1x1 ``(r*w -> w)`` -> dropout, ``r`` =
:data:`MLP_RATIO` (FCViT uses 8, 8, 4, 4 per stage), dropout = ``model.dropout``.  No drop-path.
Initialisation as FCViT: convs ``N(0, 2/fan_out)``, Linear trunc-normal(0.02), zero biases.
Defaults: depths (2, 2, 2), widths (64, 128, 256); mixer options from ``attention.fcvit``, similarity
groups = ``attention.num_heads`` (8 in FCViT).
"""
from __future__ import annotations

import torch
from torch import nn

from ..attention.fcvit import FCViTTokenMixer
from ..dropout import Dropout
from .common import make_attention, stage_sizes

#: hidden width of the channel mixer / block width
MLP_RATIO = 4
#: initial value of the layer-scale parameters
LAYER_SCALE_INIT = 1e-5


class ChannelMixer(nn.Module):
    """FCViT ``ChannelMixer`` (``useDWconv=True``, no channel attention); ``(B, d, H, W) -> (B, d, H, W)``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.dwconv(self.fc1(x))))))


class Block(nn.Module):
    """MetaFormer block with layer scale; ``(B, d, H, W) -> (B, d, H, W)``.

    Args:
        attention: the attention config section (``kind: fcvit``).
        dim: channels.
        dropout: channel-mixer dropout.
    """

    def __init__(self, attention, dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.token_mixer = make_attention(attention, dim)
        self.norm2 = nn.GroupNorm(1, dim)
        self.channel_mixer = ChannelMixer(dim, dim * MLP_RATIO, dropout)
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """``x: (B, d, H, W)`` -> ``(out, probs)``, ``probs`` ``(1, groups, N, N)`` or ``None``."""
        a = self.token_mixer(self.norm1(x).permute(0, 2, 3, 1), return_attention=return_attention)
        a, probs = a if return_attention else (a, None)
        x = x + self.layer_scale_1[:, None, None] * a.permute(0, 3, 1, 2)
        x = x + self.layer_scale_2[:, None, None] * self.channel_mixer(self.norm2(x))
        return x, probs


class FCViT(nn.Module):
    """CIFAR FCViT. ``images: (B, C, H, W)`` -> logits ``(B, num_classes)``.

    Args:
        cfg: :class:`satconv.config.ModelConfig` (``attention.kind: fcvit``).
    """

    def __init__(self, cfg):
        super().__init__()
        if cfg.attention.kind != "fcvit":
            raise ValueError(f"attention.kind must be fcvit for the FCViT network, got {cfg.attention.kind!r}")
        depths, widths = stage_sizes(cfg, (2, 2, 2))
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_channels, widths[0], 3, 1, 1), nn.BatchNorm2d(widths[0]))
        self.downsamples = nn.ModuleList([nn.Identity()] + [
            nn.Sequential(nn.Conv2d(i, o, 3, 2, 1), nn.BatchNorm2d(o)) for i, o in zip(widths, widths[1:])])
        self.stages = nn.ModuleList([nn.ModuleList([Block(cfg.attention, w, cfg.dropout) for _ in range(d)])
                                     for d, w in zip(depths, widths)])
        self.norm = nn.GroupNorm(1, widths[-1])
        self.classifier = nn.Linear(widths[-1], cfg.num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            FCViTTokenMixer._init_weights(m)

    def attention_layers(self) -> list[nn.Module]:
        """The token mixers, first to last."""
        return [block.token_mixer for stage in self.stages for block in stage]

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        """``images: (B, C, H, W)`` -> logits ``(B, classes)``, or ``(logits, [probs per mixer])``."""
        x, probs = self.stem(images), []
        for down, stage in zip(self.downsamples, self.stages):
            x = down(x)
            for block in stage:
                x, p = block(x, return_attention)
                probs.append(p)
        logits = self.classifier(self.norm(x).mean(dim=(2, 3)))
        return (logits, probs) if return_attention else logits


def build(cfg) -> FCViT:
    """Build the FCViT a :class:`satconv.config.ModelConfig` describes."""
    return FCViT(cfg)


__all__ = ["FCViT", "Block", "ChannelMixer", "build"]
