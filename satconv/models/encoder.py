"""The paper's image encoder ("BertImage", epfml/attention-cnn ``models/transformer.py``, ``models/bert.py``).

arXiv 1911.03584 §4 and App. B: a 2x2 invertible down-sampling (space-to-depth) turns a
``32x32x3`` image into ``16x16x12`` tokens, ``Linear(12 -> D)`` embeds them, ``L`` post-norm
blocks follow (attention -> dense -> dropout -> LayerNorm(residual); FFN ``D -> 512 -> D`` with
GELU -> dropout -> LayerNorm(residual)), then a mean over all tokens and ``Linear(D -> classes)``.
No absolute position is added: position enters only through the attention scores.

The [Re]'s hierarchical variant (``hierarchical: true``) applies one block ``L`` times and reuses
the keys of the first pass in every later pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..dropout import Dropout
from .common import LayerNorm, make_attention


class FeedForward(nn.Module):
    """``Linear(D -> F) -> act -> Linear(F -> D) -> dropout``; input/output ``(..., D)``."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class EncoderBlock(nn.Module):
    """One post-norm block (BertLayer): ``x = LN(x + drop(dense(attn(x))))``, ``x = LN(x + FFN(x))``.

    ``dense`` directly follows the attention's ``W_out``; mechanisms that take ``then``
    (``folds_then``) multiply the two out on their fast paths, one GEMM instead of two.

    Args:
        attn: an attention module of :mod:`satconv.attention` mapping ``(B, H, W, D) -> (B, H, W, D)``.
        dim: model width ``D``.
        ffn_dim: FFN hidden size (512 in the paper).
        activation: ``"gelu"`` (paper) or ``"relu"`` (the [Re]).
        dropout: hidden dropout.
        eps: LayerNorm epsilon (1e-12 in the paper).
    """

    def __init__(self, attn: nn.Module, dim: int, ffn_dim: int, activation: str, dropout: float, eps: float):
        super().__init__()
        self.attn = attn
        self.dense = nn.Linear(dim, dim)  # BertSelfOutput.dense
        self.drop = Dropout(dropout)
        self.norm1 = LayerNorm(dim, eps=eps)
        self.ffn = FeedForward(dim, ffn_dim, activation, dropout)
        self.norm2 = LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, return_attention: bool = False, key_source: torch.Tensor | None = None):
        """``x: (B, H, W, D)`` -> ``(B, H, W, D)``, or ``(out, probs)`` with ``probs: (B or 1, heads, N, N)``."""
        fold = self.attn.folds_then  # dense folded into the attention's W_out on the fast paths: one GEMM fewer
        extra = {"then": self.dense} if fold else {}
        a = self.attn(x, return_attention=return_attention, key_source=key_source, **extra)
        a, probs = a if return_attention else (a, None)
        x = self.norm1(x + self.drop(a if fold else self.dense(a)))
        x = self.norm2(x + self.ffn(x))
        return (x, probs) if return_attention else x


def space_to_depth(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Invertible down-sampling: ``(B, C, H, W) -> (B, H/f, W/f, C*f*f)`` (channels-last tokens)."""
    return F.pixel_unshuffle(images, factor).permute(0, 2, 3, 1)


class AttentionEncoder(nn.Module):
    """The paper's self-attention classifier.

    Args:
        cfg: a :class:`satconv.config.ModelConfig` with ``arch: encoder``.

    Input ``images: (B, 3, 32, 32)`` normalised; output logits ``(B, num_classes)``.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.downsample = cfg.downsample
        self.embed = nn.Linear(cfg.in_channels * cfg.downsample ** 2, d)
        n_blocks = 1 if cfg.hierarchical else cfg.num_layers
        self.blocks = nn.ModuleList(
            EncoderBlock(make_attention(cfg.attention, d), d, cfg.ffn_dim, cfg.activation, cfg.dropout,
                         cfg.layer_norm_eps)
            for _ in range(n_blocks))
        self.hierarchical = cfg.hierarchical
        self.num_layers = cfg.num_layers
        self.classifier = nn.Linear(d, cfg.num_classes)

    def attention_layers(self) -> list[nn.Module]:
        """The attention modules, first to last (one module when hierarchical)."""
        return [b.attn for b in self.blocks]

    def features(self, images: torch.Tensor, return_attention: bool = False):
        """Token features ``(B, H/f, W/f, D)`` and, if asked, a list of probs per pass."""
        x = self.embed(space_to_depth(images, self.downsample))  # (B, h, w, D)
        probs = []
        if self.hierarchical:
            block, first = self.blocks[0], x
            for i in range(self.num_layers):
                out = block(x, return_attention, key_source=None if i == 0 else first)
                x, p = out if return_attention else (out, None)
                probs.append(p)
        else:
            for block in self.blocks:
                out = block(x, return_attention)
                x, p = out if return_attention else (out, None)
                probs.append(p)
        return x, probs

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        """``images: (B, C, H, W)`` -> logits ``(B, classes)``, or ``(logits, [probs per layer])``."""
        x, probs = self.features(images, return_attention)
        logits = self.classifier(x.mean(dim=(1, 2)))
        return (logits, probs) if return_attention else logits
