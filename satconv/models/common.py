"""Helpers shared by the model builders: attention from its config section, parameter counts."""
from __future__ import annotations

import dataclasses

from torch import nn

from ..attention import ATTENTION
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
