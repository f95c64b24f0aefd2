"""The [Re]'s CIFAR SAN (paper.md §5.1; [Re] ``SAN/models/san_networks.py``, after hszhao/SAN ``model/san.py``).

Layout (defaults = the [Re]'s ``san_pairwise`` / ``san_patchwise``)::

    conv_in 1x1 (3 -> c_0, no bias) -> BN -> ReLU                          no spatial conv at all
    for stage i:  [maxpool 2x2] -> conv_i 1x1 (c_{i-1} -> c_i) -> Bottleneck x depth_i -> bn_i -> ReLU
    mean over pixels -> dropout -> Linear(c_last -> classes)

``Bottleneck`` (pre-activation, hszhao/SAN)::

    out = conv(ReLU(bn2(SAM(ReLU(bn1(x)))))) + x        SAM: planes -> planes/4, rel = planes/16

with SAM = :class:`~satconv.attention.SANPairwiseAttention` or
:class:`~satconv.attention.SANPatchwiseAttention` (``num_heads`` weight groups, so ``share_planes =
(planes/4) / num_heads``; the [Re] configs use 8 groups: 64 / 8 = 8 as in hszhao/SAN).  SAM reads
``ReLU(bn1(x))``: the [Re] passes the raw ``x`` and leaves ``bn1`` dead (B11).

Defaults: depths (2, 2, 2, 2), widths (256, 256, 256, 256), kernel ``attention.local.kernel_size``.
The maxpool before a stage is skipped when the map is smaller than 4x4, so any number of stages on a
32x32 image ends with a map of at least 2x2 (32 -> 16 -> 8 -> 4 -> 2 for the four default stages).

``hierarchical: true`` (the [Re]'s ``_hier``): one stage of ``depth_0`` bottlenecks of width ``c_0``
is applied ``len(stage_depths)`` times at full resolution (no maxpool), each pass with its own
``conv_i``/``bn_i`` (as the [Re]: 0.353M / 0.356M parameters used, paper.md §4.6).  Pass 0 runs
normally; in every later pass, block ``j`` computes its keys (SAN's psi) from the attention input it
had in pass 0 (``key_source``), i.e. it reuses its first-pass keys.  Widths and depths beyond the first
stage are ignored.  ``attention_layers()`` then lists each shared module once; ``return_attention``
returns one map per application (passes x blocks).
"""
from __future__ import annotations

import torch
from torch import nn

from ..dropout import Dropout
from .common import make_attention

#: SAN's channel ratios: attention output (mid) = planes / 4, relation channels (rel) = planes / 16
MID_RATIO, REL_RATIO = 4, 16


class Bottleneck(nn.Module):
    """Pre-activation SAN bottleneck; ``(B, planes, H, W) -> (B, planes, H, W)``.

    Args:
        attention: the attention config section (``kind`` san_pairwise or san_patchwise).
        planes: channels in and out.
    """

    def __init__(self, attention, planes: int):
        super().__init__()
        mid = max(planes // MID_RATIO, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.attn = make_attention(attention, planes, out_dim=mid, rel_dim=max(planes // REL_RATIO, 1))
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv = nn.Conv2d(mid, planes, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, return_attention: bool = False, key_source: torch.Tensor | None = None):
        """Apply the block.

        Args:
            x: ``(B, planes, H, W)``.
            return_attention: also return the attention's dense weights.
            key_source: ``(B, H, W, planes)`` attention input to compute the keys from, or ``None``.

        Returns:
            ``(out, attn_input, probs)``: ``out`` ``(B, planes, H, W)``, ``attn_input`` ``(B, H, W, planes)``
            = ``ReLU(bn1(x))`` (the hierarchical pass 0 keeps it), ``probs`` ``(B, G, N, N)`` or ``None``.
        """
        attn_input = self.relu(self.bn1(x)).permute(0, 2, 3, 1)  # (B, H, W, planes): SAM reads ReLU(bn1(x))
        a = self.attn(attn_input, return_attention=return_attention, key_source=key_source)
        a, probs = a if return_attention else (a, None)
        out = self.conv(self.relu(self.bn2(a.permute(0, 3, 1, 2))))  # (B, planes, H, W)
        return out + x, attn_input, probs


class SAN(nn.Module):
    """CIFAR SAN. ``images: (B, C, H, W)`` -> logits ``(B, num_classes)``.

    Args:
        cfg: :class:`satconv.config.ModelConfig` (``attention.kind`` san_pairwise or san_patchwise).
    """

    def __init__(self, cfg):
        super().__init__()
        if cfg.attention.kind not in ("san_pairwise", "san_patchwise"):
            raise ValueError(f"attention.kind must be san_pairwise or san_patchwise, got {cfg.attention.kind!r}")
        depths = tuple(cfg.stage_depths or (2, 2, 2, 2))
        widths = tuple(cfg.stage_widths or (256,) * len(depths))
        if len(widths) != len(depths):
            raise ValueError(f"stage_widths {widths} and stage_depths {depths} must have the same length")
        self.hierarchical = cfg.hierarchical
        if self.hierarchical:  # one shared stage, len(depths) passes at full resolution
            widths = (widths[0],) * len(depths)
            self.stages = nn.ModuleList([nn.ModuleList([Bottleneck(cfg.attention, widths[0])
                                                        for _ in range(depths[0])])])
        else:
            self.stages = nn.ModuleList([nn.ModuleList([Bottleneck(cfg.attention, w) for _ in range(d)])
                                         for d, w in zip(depths, widths)])
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 1, bias=False)
        self.bn_in = nn.BatchNorm2d(widths[0])
        ins = (widths[0],) + widths[:-1]
        self.convs = nn.ModuleList([nn.Conv2d(i, o, 1, bias=False) for i, o in zip(ins, widths)])  # conv_i
        self.norms = nn.ModuleList([nn.BatchNorm2d(w) for w in widths])  # bn_i
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2, 2)
        self.drop = Dropout(cfg.dropout)
        self.classifier = nn.Linear(widths[-1], cfg.num_classes)

    def attention_layers(self) -> list[nn.Module]:
        """The attention modules, first to last (the shared stage's, once, when hierarchical)."""
        return [block.attn for stage in self.stages for block in stage]

    def features(self, images: torch.Tensor, return_attention: bool = False):
        """Feature map ``(B, c_last, h, w)`` and a list of dense weights per attention application."""
        x = self.relu(self.bn_in(self.conv_in(images)))
        probs, first_inputs = [], []
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            if self.hierarchical:
                stage = self.stages[0]
            else:
                stage = self.stages[i]
                if min(x.shape[-2:]) >= 4:
                    x = self.pool(x)
            x = conv(x)
            for j, block in enumerate(stage):
                key_source = first_inputs[j] if self.hierarchical and i > 0 else None
                x, attn_input, p = block(x, return_attention, key_source)
                if self.hierarchical and i == 0:
                    first_inputs.append(attn_input)
                probs.append(p)
            x = self.relu(norm(x))
        return x, probs

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        """``images: (B, C, H, W)`` -> logits ``(B, classes)``, or ``(logits, [probs per application])``."""
        x, probs = self.features(images, return_attention)
        logits = self.classifier(self.drop(x.mean(dim=(2, 3))))
        return (logits, probs) if return_attention else logits


def build(cfg) -> SAN:
    """Build the SAN a :class:`satconv.config.ModelConfig` describes."""
    return SAN(cfg)


__all__ = ["SAN", "Bottleneck", "build"]
