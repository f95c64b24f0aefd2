"""Vision Transformer trained from scratch (Dosovitskiy et al. 2021), as the [Re] compares it.

Two stems (``model.vit.stem``):

- ``hybrid``: the [Re]'s (``ViT/models/networks.py``): Conv3x3(3->64)+BN+ReLU and ResNet18's
  ``layer1`` (two basic blocks) at full resolution, then non-overlapping ``p x p`` patches of that
  feature map (``p = 2``: 256 tokens of ``64*4`` values) and ``Linear(64*p*p -> D)``;
- ``patch``: the plain ViT patch embedding, ``Conv2d(3, D, p, stride=p)``.

Fixed here ([Re] bug B12): the class token is a learned ``nn.Parameter`` (not fresh noise each
forward), and blocks are proper pre-norm residuals ``x = x + Attn(LN(x))``, ``x = x + MLP(LN(x))``.
Learned absolute position embeddings are added to the tokens.
"""
from __future__ import annotations

import torch
from torch import nn

from ..dropout import Dropout
from .common import LayerNorm, make_attention
from .encoder import FeedForward
from .resnet import make_stage


class PreNormBlock(nn.Module):
    """``x = x + drop(Attn(LN(x)))``; ``x = x + MLP(LN(x))``; tokens ``(B, h, w, D)``."""

    def __init__(self, attn: nn.Module, dim: int, ffn_dim: int, activation: str, dropout: float, eps: float):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn = attn
        self.drop = Dropout(dropout)
        self.norm2 = LayerNorm(dim, eps=eps)
        self.ffn = FeedForward(dim, ffn_dim, activation, dropout)

    def forward(self, x: torch.Tensor, return_attention: bool = False, key_source: torch.Tensor | None = None):
        """``x: (B, h, w, D)`` -> same shape, or ``(out, probs)``; keys from ``LN(key_source)`` if given."""
        ks = None if key_source is None else self.norm1(key_source)
        a = self.attn(self.norm1(x), return_attention=return_attention, key_source=ks)
        a, probs = a if return_attention else (a, None)
        x = x + self.drop(a)
        x = x + self.ffn(self.norm2(x))
        return (x, probs) if return_attention else x


class ViT(nn.Module):
    """ViT for CIFAR-size input. ``images: (B, 3, H, W)`` -> logits ``(B, num_classes)``.

    With ``pool: cls`` a learned class token is prepended and the sequence is handed to the attention
    as a ``(B, 1, N+1, D)`` row (only content attention is allowed then, as positions are not a grid);
    with ``pool: mean`` the tokens keep their ``(B, h, w, D)`` grid, so positional mechanisms work too.

    Args:
        cfg: :class:`satconv.config.ModelConfig` with ``arch: vit``.
    """

    def __init__(self, cfg):
        super().__init__()
        d, opts = cfg.hidden_dim, cfg.vit
        p = opts.patch_size
        if opts.stem == "hybrid":
            self.stem = nn.Sequential(nn.Conv2d(cfg.in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True), make_stage(64, 64, 2, 1))
            self.patch = nn.Linear(64 * p * p, d)
        else:
            self.stem = nn.Identity()
            self.patch = nn.Conv2d(cfg.in_channels, d, p, stride=p)
        if cfg.image_size % p:
            raise ValueError(f"vit.patch_size {p} must divide image_size {cfg.image_size}")
        self.patch_size, self.stem_kind = p, opts.stem
        self.grid = cfg.image_size // p
        self.use_cls = opts.pool == "cls"
        n_tokens = self.grid ** 2 + int(self.use_cls)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if self.use_cls else None
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, d) * 0.02)
        self.drop = Dropout(cfg.dropout)
        # the [Re]'s ViT gives every head its own q/k/v of the full width: value projection always on
        # hierarchical ([Re]): one block applied num_layers times, first-pass keys reused
        self.hierarchical, self.num_layers = cfg.hierarchical, cfg.num_layers
        self.blocks = nn.ModuleList(
            PreNormBlock(make_attention(cfg.attention, d, value_proj=True), d, cfg.ffn_dim, cfg.activation,
                         cfg.dropout, cfg.layer_norm_eps)
            for _ in range(1 if cfg.hierarchical else cfg.num_layers))
        self.norm = LayerNorm(d, eps=cfg.layer_norm_eps)
        self.classifier = nn.Linear(d, cfg.num_classes)

    def attention_layers(self) -> list[nn.Module]:
        """The attention modules, first to last."""
        return [b.attn for b in self.blocks]

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``(B, grid*grid, D)`` in row-major order."""
        f = self.stem(images)  # (B, C, H, W)
        if self.stem_kind == "hybrid":
            p = self.patch_size
            f = nn.functional.pixel_unshuffle(f, p).flatten(2).transpose(1, 2)  # (B, N, C*p*p)
            return self.patch(f)
        return self.patch(f).flatten(2).transpose(1, 2)  # (B, N, D)

    def forward(self, images: torch.Tensor, return_attention: bool = False):
        """``images: (B, C, H, W)`` -> logits ``(B, classes)``, or ``(logits, [probs per layer])``."""
        x = self.tokens(images)
        b, n, d = x.shape
        if self.use_cls:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = self.drop(x + self.pos_embed)
        x = x.view(b, 1, n + 1, d) if self.use_cls else x.view(b, self.grid, self.grid, d)
        probs, first = [], x
        for i in range(self.num_layers):
            block = self.blocks[0 if self.hierarchical else i]
            ks = first if self.hierarchical and i > 0 else None
            out = block(x, return_attention, key_source=ks)
            x, p = out if return_attention else (out, None)
            probs.append(p)
        x = self.norm(x).reshape(b, -1, d)
        pooled = x[:, 0] if self.use_cls else x.mean(dim=1)
        logits = self.classifier(pooled)
        return (logits, probs) if return_attention else logits
