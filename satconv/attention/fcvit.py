"""FCViT token mixer (Ma et al. 2022, "A Close Look at Spatial Modeling: From Attention to Convolution").

Reference code: ma-xu/FCViT ``models/fcvit.py`` (``GlobalContext``, ``TokenMixer``) with the settings
of every registered model (``weighted_gc=True``, ``head=8``, ``compete=True``, ``mix_size`` 11,
``useSecondTokenMix=True``, ``useSpatialAtt=False``).  The token mixer is (paper.md §5.4)::

    x <- x + GC_1(x);   x <- GELU(fc_1(DWConv_k(x)))        fc = 1x1 (d -> max(d/8, 16)), GELU, 1x1
    x <- x + GC_2(x);   x <- GELU(fc_2(DWConv_k(x)))        fc_2 ends in ``out_dim`` channels

Global context ``GC`` with token-global similarity over ``num_heads`` groups (8 in FCViT), for
``g = GAP(x)`` (mean over tokens) and groups of ``d_h = dim / num_heads`` contiguous channels::

    s_{h,i} = <x_{h,i}, g_h> / sqrt(d_h)                       token-global similarity
    s <- (s - mean(s)) / (std(s) + 1e-5)                       over all (groups, tokens), unbiased std
    s_{h,i} <- s_{h,i} * w_h + b_h                             per-group affine (rescale_weight/bias)
    GC(x)_{h,i} = s_{h,i} * MLP(g)_h                           broadcast over the group's channels

``MLP`` with ``compete=True`` is the competition-driven bottleneck ("Compete to compute"): ``fc1``
``d -> 2*(d/8)``, reshape ``(2, d/8)``, max over the 2 groups, ``fc2`` ``d/8 -> d``; with
``compete=False`` it is ``Linear-GELU-Linear`` through ``d/8``.

There are no queries or keys: ``key_source`` is ignored.  ``dropout`` is applied to the similarity map
``s`` (the mixer's only input-dependent "attention"), the analogue of dropout on attention probabilities.

``return_attention=True`` returns, as ``(1, num_heads, N, N)``, the spatial mixing of the first
depth-wise conv: ``probs[0, h, i, j]`` = the ``dw1`` kernel tap at offset ``j - i`` averaged over the
channels of group ``h`` (zero where ``j`` is outside the ``k x k`` window or the image).  It is
query-irrelevant by construction (the same kernel for every query, which is FCViT's point) and not
row-stochastic.  The global context adds ``s_{h,i} * MLP(mean_j x_j)``: a dense, input-dependent term
that this matrix leaves out.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..dropout import Dropout
from .base import AttentionBase
from .san import check_kernel_size, footprint, footprint_to_dense

#: bottleneck reduction of the global-context MLP and of the 1x1 convs (``gc_reduction``, ``fc_factor``)
REDUCTION = 8
#: smallest hidden width of the 1x1 bottleneck (``fc_min_value``)
FC_MIN = 16
#: added to the standard deviation when standardising similarities (``epsilon``)
EPS = 1e-5


class GlobalContext(nn.Module):
    """Weighted global context (ma-xu/FCViT ``GlobalContext`` with ``weighted_gc=True``).

    Args:
        dim: channels ``d``.
        num_heads: similarity groups (divides ``dim``).
        compete: competition-driven bottleneck (max over 2 groups) instead of Linear-GELU-Linear.
        dropout: dropout on the similarity map.
    """

    def __init__(self, dim: int, num_heads: int, compete: bool = True, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.compete = num_heads, compete
        hidden = max(dim // REDUCTION, 1)
        if compete:
            self.fc1 = nn.Linear(dim, 2 * hidden)
            self.fc2 = nn.Linear(hidden, dim)
        else:
            self.fc = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.scale = (dim // num_heads) ** -0.5
        self.rescale_weight = nn.Parameter(torch.ones(num_heads))
        self.rescale_bias = nn.Parameter(torch.zeros(num_heads))
        self.sim_drop = Dropout(dropout)

    def mlp(self, g: torch.Tensor) -> torch.Tensor:
        """``(B, d) -> (B, d)``: the bottleneck applied to the pooled features."""
        if not self.compete:
            return self.fc(g)
        z = self.fc1(g).view(g.shape[0], 2, -1)  # (B, 2, d/8)
        return self.fc2(z.max(dim=1).values)

    def similarity(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised, rescaled token-global similarity.

        Args:
            x: ``(B, d, N)``.

        Returns:
            ``(B, num_heads, N)``.
        """
        b, d, n = x.shape
        xh = x.view(b, self.num_heads, d // self.num_heads, n)  # (B, G, Dg, N)
        g = xh.mean(dim=-1, keepdim=True)  # (B, G, Dg, 1)
        sim = (xh * g).sum(dim=2) * self.scale  # (B, G, N)
        std, mean = torch.std_mean(sim, dim=(1, 2), keepdim=True, correction=1 if sim[0].numel() > 1 else 0)
        sim = (sim - mean) / (std + EPS)
        return sim * self.rescale_weight[:, None] + self.rescale_bias[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, d, N)`` -> global context ``(B, d, N)``."""
        b, d, n = x.shape
        sim = self.sim_drop(self.similarity(x))  # (B, G, N)
        gc = self.mlp(x.mean(dim=-1)).view(b, self.num_heads, -1, 1)  # (B, G, Dg, 1)
        return (sim[:, :, None, :] * gc).reshape(b, d, n)


def _bottleneck(dim: int, out_dim: int) -> nn.Sequential:
    """1x1 conv ``dim -> max(dim/8, 16)``, GELU, 1x1 conv ``-> out_dim`` (FCViT ``fc1``/``fc2``)."""
    hidden = max(dim // REDUCTION, FC_MIN)
    return nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, out_dim, 1))


class FCViTTokenMixer(AttentionBase):
    """FCViT's token mixer behind the attention interface (module docstring).

    Args:
        dim: channels (divisible by ``num_heads``).
        num_heads: global-context similarity groups (8 in FCViT).
        head_dim: must be ``None``.
        out_dim: output channels of the last 1x1 conv (``None``: ``dim``).
        dropout: dropout on the token-global similarity maps.
        value_proj: must be ``None`` (there are no values).
        bias: bias of the last 1x1 conv.
        kernel_size: odd side of both depth-wise convs (11 in FCViT).
        compete: competition-driven bottleneck in the global context.
    """

    folds_then = False  # forward() takes no following layer to fold (its own output map)

    row_stochastic = False
    input_independent = False  # the returned matrix is input-independent, the mixer is not (GC)

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, out_dim: int | None = None,
                 dropout: float = 0.0, value_proj: bool | None = None, bias: bool = True, kernel_size: int = 11,
                 compete: bool = True):
        nn.Module.__init__(self)  # no values, no AttentionBase value/proj layers
        if dim < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if head_dim is not None:
            raise ValueError(f"head_dim must be None for the FCViT token mixer, got {head_dim}")
        if value_proj is not None:
            raise ValueError(f"value_proj must be None for the FCViT token mixer (no values), got {value_proj}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.out_dim = dim if out_dim is None else out_dim
        self.kernel_size = check_kernel_size(kernel_size)
        conv = lambda: nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)  # noqa: E731
        self.gc1, self.dw1, self.fc1 = GlobalContext(dim, num_heads, compete, dropout), conv(), _bottleneck(dim, dim)
        self.gc2, self.dw2, self.fc2 = GlobalContext(dim, num_heads, compete, dropout), conv(), _bottleneck(dim, dim)
        self.fc2[-1] = nn.Conv2d(self.fc2[0].out_channels, self.out_dim, 1, bias=bias)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """FCViT ``TokenMixer._init_weights``: convs N(0, 2/fan_out), Linear trunc-normal(0.02), zero biases."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def mixing_matrix(self, height: int, width: int, conv: nn.Conv2d | None = None) -> torch.Tensor:
        """Dense spatial mixing of a depth-wise conv, kernel averaged over each group's channels.

        Args:
            height, width: grid size.
            conv: ``self.dw1`` (default) or ``self.dw2``.

        Returns:
            ``(1, num_heads, N, N)``; ``[0, h, i, j]`` = mean over group ``h`` of the tap at ``j - i``.
        """
        conv = self.dw1 if conv is None else conv
        k = self.kernel_size
        taps = conv.weight.view(self.num_heads, self.head_dim, k * k).mean(dim=1)  # (G, K), slot a*k + b
        fp = footprint(height, width, k, taps.device)
        return footprint_to_dense(taps[None, :, None, :].expand(1, -1, height * width, -1), fp)

    def forward(self, x: torch.Tensor, return_attention: bool = False, key_source: torch.Tensor | None = None):
        """Apply the token mixer.

        Args:
            x: ``(B, H, W, dim)``.
            return_attention: also return :meth:`mixing_matrix` of ``dw1``.
            key_source: ignored (no keys).

        Returns:
            ``(B, H, W, out_dim)``, or ``(out, probs)`` with ``probs`` ``(1, num_heads, N, N)``.
        """
        self.check_input(x, key_source)
        b, height, width, d = x.shape
        t = x.permute(0, 3, 1, 2)  # (B, d, H, W)
        t = t + self.gc1(t.reshape(b, d, -1)).view_as(t)
        t = F.gelu(self.fc1(self.dw1(t)))
        t = t + self.gc2(t.reshape(b, d, -1)).view_as(t)
        t = F.gelu(self.fc2(self.dw2(t)))
        out = t.permute(0, 2, 3, 1)  # (B, H, W, out_dim)
        return (out, self.mixing_matrix(height, width).to(x.dtype)) if return_attention else out


__all__ = ["FCViTTokenMixer", "GlobalContext"]
