"""SAN self-attention (Zhao, Jia & Koltun, "Exploring Self-attention for Image Recognition", CVPR 2020).

Reference code: hszhao/SAN ``model/san.py`` (``SAM``) and ``lib/sa`` (CuPy ``subtraction``,
``subtraction2``, ``aggregation`` kernels); the [Re] copies it in ``SAN/models/san_networks.py``.
Pure PyTorch here: index gathers over a ``k x k`` footprint, no custom kernels.

Pairwise self-attention, eq. (2) and (3) of Zhao et al. 2020::

    y_i = sum_{j in R(i)} alpha(x_i, x_j) ⊙ beta(x_j),        alpha(x_i, x_j) = gamma(delta(x_i, x_j))

with the *subtraction* relation ``delta = phi(x_i) - psi(x_j)`` (``query``, ``key``), the position
encoding ``P(p_i) - P(p_j)`` (coordinates normalised to ``[-1, 1]``, ``P`` a trainable 2 -> 2 linear
map, ``position``) concatenated to it, ``gamma`` = BN-ReLU-Linear-BN-ReLU-Linear producing one weight
per weight group (``num_heads``), and a softmax over the footprint ``R(i)``.

Patchwise self-attention, eq. (4)::

    y_i = sum_{j in R(i)} alpha(x_R(i))_j ⊙ beta(x_j),          alpha(x_R(i)) = gamma(delta(x_R(i)))

with ``delta`` = concatenation of ``phi(x_i)`` and ``psi(x_j)`` for all ``k*k`` footprint positions and
``gamma`` producing ``k*k*num_heads`` weights; no softmax (as in hszhao/SAN).

"Shared planes": ``beta`` (``value``) gives ``out_dim`` channels, the weights exist per group and
value channel ``c`` uses group ``c % num_heads`` (the CuPy ``aggregation`` kernel's
``c % weight_channels``), i.e. every weight is shared by ``out_dim // num_heads`` channels
(``share_planes`` of hszhao/SAN).  ``num_heads`` plays the role of the head count in the dense
attention maps: ``probs[b, g, i, j]`` is group ``g``'s weight of key ``j`` for query ``i``.

**Borders (deviation from hszhao/SAN).**  The reference pads keys, positions and values by
*reflection* (``pad_mode=1``; the zero-pad kernels exist but are unused), so a border query attends
to mirrored copies of real pixels.  Here a footprint position outside the image is no key at all:

* pairwise: such (query, key) pairs are left out of ``gamma`` (so also out of its BatchNorm batch
  statistics) and out of the softmax; every row of the attention spans real pixels only and sums to 1.
* patchwise: ``gamma`` needs a fixed-size input, so keys outside the image enter its input as zeros
  (zero padding, as a convolution would), and their values are zero too, so their weights have no
  effect; the dense map contains real pixels only.

Not built: ``AttentionBase``'s ``value``/``proj`` layers.  SAN has no output projection (the SAN
bottleneck's 1x1 conv follows), and ``value`` is SAN's ``beta`` (``dim -> out_dim``, grouped as above).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn

from ..dropout import Dropout
from .base import AttentionBase
from .softmax_dropout import dropped_softmax


# ---------------------------------------------------------------------------------------------
# k x k footprints on a grid (shared with sasa.py and fcvit.py)
# ---------------------------------------------------------------------------------------------
class Footprint(NamedTuple):
    """Index tables of a ``k x k`` footprint on a ``height x width`` grid, ``K = k*k`` slots.

    Slot ``s = a*k + b`` of query ``n`` is the key at offset ``delta = (a - k//2, b - k//2)``
    (``key - query``, row then column), the order of ``F.unfold``.
    """

    index: torch.Tensor  # (N, K) long: key pixel of each slot; the query itself where outside the image
    valid: torch.Tensor  # (N, K) bool: slot inside the image
    pair_query: torch.Tensor  # (P,) long: query of each valid (query, key) pair, P = valid.sum()
    pair_key: torch.Tensor  # (P,) long: key of each valid pair
    pair_slot: torch.Tensor  # (P,) long: flat ``n*K + s`` position of each valid pair


@functools.lru_cache(maxsize=64)
def footprint(height: int, width: int, kernel_size: int, device: torch.device | None = None) -> Footprint:
    """The (cached) :class:`Footprint` tables of a grid; pixels are flattened row-major.

    Args:
        height, width: grid size, ``N = height * width``.
        kernel_size: odd footprint side ``k``.
        device: where the tables live.
    """
    with torch.inference_mode(False), torch.no_grad():  # cached tables must stay usable by autograd
        k, r = kernel_size, kernel_size // 2
        rows = torch.arange(height, device=device).repeat_interleave(width)  # (N,)
        cols = torch.arange(width, device=device).repeat(height)  # (N,)
        da = torch.arange(k, device=device).repeat_interleave(k) - r  # (K,) row offset per slot
        db = torch.arange(k, device=device).repeat(k) - r  # (K,) column offset per slot
        key_row, key_col = rows[:, None] + da, cols[:, None] + db  # (N, K)
        valid = (key_row >= 0) & (key_row < height) & (key_col >= 0) & (key_col < width)
        query = torch.arange(height * width, device=device)[:, None].expand_as(valid)
        index = torch.where(valid, key_row * width + key_col, query)  # (N, K)
        pair_slot = valid.flatten().nonzero().squeeze(1)  # (P,)
        return Footprint(index, valid, query.flatten()[pair_slot], index.flatten()[pair_slot], pair_slot)


def check_kernel_size(kernel_size: int) -> int:
    """Return ``kernel_size`` or raise ``ValueError`` unless it is a positive odd integer."""
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
    return kernel_size


def gather_footprint(t: torch.Tensor, fp: Footprint) -> torch.Tensor:
    """Footprint neighbours of every pixel, zeros outside the image.

    Args:
        t: ``(B, N, C)`` flattened pixels.
        fp: tables of the same grid.

    Returns:
        ``(B, N, K, C)``, ``[b, n, s] = t[b, fp.index[n, s]]`` where valid, else 0.
    """
    return t[:, fp.index] * fp.valid[None, :, :, None].to(t.dtype)  # (B, N, K, C)


def footprint_to_dense(weights: torch.Tensor, fp: Footprint) -> torch.Tensor:
    """Scatter per-slot weights into a dense attention matrix (slots outside the image dropped).

    Args:
        weights: ``(B, G, N, K)`` weight of slot ``s`` for query ``n``.
        fp: tables of the grid.

    Returns:
        ``(B, G, N, N)``, row = query, column = key.
    """
    b, g, n, k = weights.shape
    dense = weights.new_zeros(b, g, n, n)
    # valid slots of one query hit distinct keys; invalid ones add exactly 0 to the query's own entry
    return dense.scatter_add_(-1, fp.index.expand(b, g, n, k), weights * fp.valid.to(weights.dtype))


def grid_coordinates(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Pixel coordinates normalised to ``[-1, 1]`` (hszhao/SAN ``position``).

    Returns:
        ``(N, 2)``: (row, column) of each pixel, row-major; a side of length 1 sits at -1.
    """
    r = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    c = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(-1, 2)  # (N, 2)


# ---------------------------------------------------------------------------------------------
# SAN
# ---------------------------------------------------------------------------------------------
class _SANAttention(AttentionBase):
    """Shared bookkeeping of the two SAN forms: phi, psi, beta and the grouped aggregation.

    Args:
        dim: input channels ``in_planes``.
        num_heads: weight groups (``out_planes // share_planes`` of hszhao/SAN).
        head_dim: must be ``None`` (SAN has no per-head value size).
        out_dim: value channels ``out_planes`` (``None``: ``dim``); divisible by ``num_heads``.
        dropout: dropout on the footprint weights.
        value_proj: ``None`` or ``True`` (``beta`` is always a projection).
        bias: bias of ``beta`` (``value``).
        kernel_size: odd footprint side ``k``.
        rel_dim: channels of phi and psi, ``rel_planes`` (``None``: ``max(1, dim // 16)``, as SAN's
            bottleneck ``planes // 16``).
    """

    folds_then = False  # forward() takes no following layer to fold (its own output map)

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, out_dim: int | None = None,
                 dropout: float = 0.0, value_proj: bool | None = None, bias: bool = True, kernel_size: int = 3,
                 rel_dim: int | None = None):
        nn.Module.__init__(self)  # AttentionBase's value/proj do not exist in SAN (module docstring)
        if dim < 1 or num_heads < 1:
            raise ValueError(f"dim and num_heads must be positive, got dim={dim}, num_heads={num_heads}")
        if head_dim is not None:
            raise ValueError(f"head_dim must be None for SAN (weights are shared over channel groups), got {head_dim}")
        if value_proj is False:
            raise ValueError("value_proj must be None or True for SAN: beta is always a 1x1 projection")
        self.dim, self.num_heads = dim, num_heads
        self.out_dim = dim if out_dim is None else out_dim
        if self.out_dim % num_heads:
            raise ValueError(f"out_dim ({self.out_dim}) must be divisible by num_heads ({num_heads}): "
                             f"each weight group is shared by out_dim // num_heads value channels")
        self.head_dim = self.out_dim // num_heads  # channels sharing one weight ("share_planes")
        self.kernel_size = check_kernel_size(kernel_size)
        self.rel_dim = max(1, dim // 16) if rel_dim is None else rel_dim
        self.query = nn.Linear(dim, self.rel_dim)  # phi (SAM conv1)
        self.key = nn.Linear(dim, self.rel_dim)  # psi (SAM conv2)
        self.value = nn.Linear(dim, self.out_dim, bias=bias)  # beta (SAM conv3)
        self.attn_drop = Dropout(dropout)

    def weights(self, q, k, height, width, fp):
        """Footprint weights and their dropout (:attr:`attn_drop`); subclasses implement the relation and gamma.

        Args:
            q, k: ``(B, N, rel_dim)`` phi(x) and psi(x).
            height, width: grid size.
            fp: footprint tables.

        Returns:
            ``(weights, dropped)``, both ``(B, N, K, num_heads)``: the weight of footprint slot K for each query
            and head group, and the same after dropout (the weights themselves in evaluation).
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor, return_attention: bool = False, key_source: torch.Tensor | None = None):
        """Apply SAN attention.

        Args:
            x: ``(B, H, W, dim)``.
            return_attention: also return the dense weights (before dropout).
            key_source: ``(B, H, W, dim)`` input of psi (keys), or ``None`` for ``x``.

        Returns:
            ``(B, H, W, out_dim)``, or ``(out, probs)`` with ``probs`` ``(B, num_heads, N, N)``.
        """
        self.check_input(x, key_source)
        b, height, width, d = x.shape
        n = height * width
        tokens = x.reshape(b, n, d)
        ks = tokens if key_source is None else key_source.reshape(b, n, d)
        fp = footprint(height, width, self.kernel_size, x.device)
        w, dropped = self.weights(self.query(tokens), self.key(ks), height, width, fp)  # (B, N, K, G) each
        v = gather_footprint(self.value(tokens), fp)  # (B, N, K, C_out)
        v = v.view(b, n, -1, self.out_dim // self.num_heads, self.num_heads)  # (B, N, K, S, G): c = s*G + g
        out = (dropped[:, :, :, None] * v).sum(2)  # (B, N, S, G); mul-sum beats einsum's tiny GEMVs
        out = out.reshape(b, height, width, self.out_dim)
        if not return_attention:
            return out
        return out, footprint_to_dense(w.permute(0, 3, 1, 2), fp)  # (B, G, N, N)


class SANPairwiseAttention(_SANAttention):
    """SAN pairwise self-attention with the subtraction relation, eq. (2)-(3) of Zhao et al. 2020.

    ``w[i, j, g] = softmax_{j in R(i)} gamma([phi(x_i) - psi(x_j), P(p_i) - P(p_j)])_g`` over the real
    pixels of the ``k x k`` footprint; ``y_i[c] = sum_j w[i, j, c % G] * beta(x_j)[c]``.
    Constructor arguments: see ``_SANAttention``.  The bias of ``position`` cancels in ``P(p_i) - P(p_j)``
    (kept for parity with hszhao/SAN's ``conv_p``; its gradient is 0).
    """

    row_stochastic = True

    def __init__(self, dim: int, num_heads: int, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        r, g = self.rel_dim, self.num_heads
        self.position = nn.Linear(2, 2)  # P (SAM conv_p)
        self.gamma = nn.Sequential(nn.BatchNorm1d(r + 2), nn.ReLU(inplace=True), nn.Linear(r + 2, r, bias=False),
                                   nn.BatchNorm1d(r), nn.ReLU(inplace=True), nn.Linear(r, g))  # SAM conv_w

    def weights(self, q, k, height, width, fp):
        """Softmax footprint weights and their dropout (arguments and returns as :meth:`_SANAttention.weights`),
        0 outside the image, each (query, group) summing to 1 over K.  Softmax and dropout run as opaque
        operators (:func:`satconv.attention.softmax_dropout.dropped_softmax`)."""
        b, n, _ = q.shape
        kk = fp.index.shape[1]
        p = self.position(grid_coordinates(height, width, q.device, q.dtype))  # (N, 2)
        relation = q[:, fp.pair_query] - k[:, fp.pair_key]  # (B, P, rel): valid pairs only
        pos = (p[fp.pair_query] - p[fp.pair_key]).expand(b, -1, -1)  # (B, P, 2)
        feats = torch.cat([relation, pos], dim=-1)  # (B, P, rel + 2)
        logits = self.gamma(feats.flatten(0, 1)).view(b, -1, self.num_heads)  # (B, P, G)
        full = logits.new_full((b, n * kk, self.num_heads), float("-inf"))
        full = full.index_copy(1, fp.pair_slot, logits).view(b, n, kk, self.num_heads)  # (B, N, K, G)
        probs, dropped = dropped_softmax(full, self.attn_drop, dim=2, dtype=full.dtype)  # query valid: no NaN
        return probs.to(full.dtype), dropped


class SANPatchwiseAttention(_SANAttention):
    """SAN patchwise self-attention with the concatenation relation, eq. (4) of Zhao et al. 2020.

    ``w[i, :, :] = gamma([phi(x_i), psi(x_{j_1}), ..., psi(x_{j_K})])`` reshaped to ``(K, G)``, no
    softmax; keys outside the image enter as zeros and their values are zero (module docstring).
    Constructor arguments: see ``_SANAttention``.
    """

    row_stochastic = False

    def __init__(self, dim: int, num_heads: int, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        r, g, kk = self.rel_dim, self.num_heads, self.kernel_size ** 2
        self.gamma = nn.Sequential(nn.BatchNorm1d(r * (kk + 1)), nn.ReLU(inplace=True),
                                   nn.Linear(r * (kk + 1), g, bias=False), nn.BatchNorm1d(g),
                                   nn.ReLU(inplace=True), nn.Linear(g, kk * g))  # SAM conv_w

    def weights(self, q, k, height, width, fp):
        """Patchwise footprint weights and their dropout (arguments and returns as :meth:`_SANAttention.weights`),
        slot ``s`` and group ``g`` being ``gamma`` output ``s*G + g``."""
        b, n, _ = q.shape
        keys = gather_footprint(k, fp).flatten(2)  # (B, N, K*rel), zeros outside the image
        feats = torch.cat([q, keys], dim=-1).flatten(0, 1)  # (B*N, rel*(K+1))
        w = self.gamma(feats).view(b, n, -1, self.num_heads)  # (B, N, K, G)
        return w, self.attn_drop(w)


__all__ = ["SANPairwiseAttention", "SANPatchwiseAttention", "Footprint", "footprint", "gather_footprint",
           "footprint_to_dense", "grid_coordinates", "check_kernel_size"]
