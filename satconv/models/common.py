"""Helpers shared by the model builders: attention from its config section, parameter counts."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import ATTENTION
from ..attention.precision import autocast_dtype
from ..attention.routes import Routes
from ..config import OPTION_SECTION, AttentionConfig


def attention_options(att: AttentionConfig) -> dict:
    """The mechanism-specific constructor keywords for ``att.kind`` (its options section as a dict)."""
    section = OPTION_SECTION[att.kind]
    return {} if section is None else dataclasses.asdict(getattr(att, section))


def make_attention(att: AttentionConfig, dim: int, out_dim: int | None = None, **extra) -> nn.Module:
    """Build ``ATTENTION[att.kind]`` for width ``dim``: input ``(B, H, W, dim)``, output ``(B, H, W, out_dim)``.

    Args:
        att: the attention config section.
        dim: input channels.
        out_dim: output channels (``None``: ``dim``).
        extra: further constructor keywords (e.g. ``value_proj=True`` for ViT).
    """
    return ATTENTION[att.kind](dim, att.num_heads, head_dim=att.head_dim, out_dim=out_dim, dropout=att.dropout,
                               **attention_options(att), **extra)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; buffers never count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def stage_sizes(cfg, default_depths: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(depths, widths)`` of a staged network: ``cfg.stage_depths``/``stage_widths`` or the defaults
    (widths double per stage from 64).

    Args:
        cfg: a :class:`satconv.config.ModelConfig`.
        default_depths: blocks per stage when the config gives none.
    """
    depths = tuple(cfg.stage_depths or default_depths)
    widths = tuple(cfg.stage_widths or tuple(64 * 2 ** i for i in range(len(depths))))
    if len(widths) != len(depths):
        raise ValueError(f"stage_widths {widths} and stage_depths {depths} must have the same length")
    return depths, widths


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last axis, ``(..., D) -> (..., D)``, that keeps autocast's dtype.

    Autocast runs LayerNorm in float32 and returns float32, so a post-norm residual stream is
    float32 and every linear layer re-casts it.  On the fast paths, under autocast, this layer
    takes and returns the autocast dtype (bf16) while the statistics and the affine map are
    computed in float32 (the kernel's accumulation type): half the bytes for every residual
    tensor and the activations saved for the backward pass.  Outside autocast, or inside
    the explicit route (``routes.fast`` false, :mod:`satconv.attention.routes`), it is ``nn.LayerNorm``.  Same parameters and
    state dict as ``nn.LayerNorm``.
    """

    #: the fast path runs when ``routes.fast`` (:func:`~satconv.attention.routes.set_routes` sets it per model)
    routes: Routes = Routes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = autocast_dtype(x)
        if low is None or not self.routes.fast:
            return super().forward(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            weight, bias = (None if p is None else p.to(low) for p in (self.weight, self.bias))
            return F.layer_norm(x.to(low), self.normalized_shape, weight, bias, self.eps)
