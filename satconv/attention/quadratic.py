"""Quadratic (Gaussian) positional attention, arXiv 1911.03584 §4 eq. (9) and its anisotropic form.

Every head ``h`` attends around a learned centre ``Delta^(h)`` (``attention_centers``) with a learned
precision, independently of the input (epfml/attention-cnn ``models/bert.py``,
``GaussianSelfAttention``).  Paper eq. (9) writes the logits as a target vector times a fixed
relative encoding; the anisotropic form of the reference code
(``get_heads_target_vectors``) uses::

    r_delta = (d1, d2, d1^2, d2^2, d1*d2),       Sigma^{-1} = S^T S = [[a, b], [b, c]]
    t_h     = -1/2 (-2(a mu1 + b mu2), -2(c mu2 + b mu1), a, c, 2b)
    t_h . r_delta = -1/2 (delta - mu)^T Sigma^{-1} (delta - mu) + 1/2 mu^T Sigma^{-1} mu

with ``delta = key - query`` and ``S = attention_spreads`` (``Sigma^{-1/2}``).  The constant
``1/2 mu^T Sigma^{-1} mu`` cancels in the softmax, so :meth:`QuadraticAttention.scores` uses the
equivalent closed form ``-1/2 ||S (delta - mu)||^2``: the same probabilities, without the
cancellation error of the expanded form when ``mu`` and ``Sigma^{-1}`` are large.
:meth:`QuadraticAttention.target_vectors` returns ``t_h`` (correct ``c*mu2`` term: not the
[Re]'s ``c+mu2`` typo, bug B1 of ``paper.md`` §4.2).  Isotropic heads have ``S = s I``, so
``alpha = s^2 / 2`` and the logits are ``-alpha ||delta - mu||^2`` (paper eq. (9)).

:class:`InputIndependentAttention` (shared with the position-only learned encoding) caches the
``(1, H, N, N)`` probabilities per grid shape in eval mode (bug B8) and
:func:`no_decay_param_groups` keeps weight decay off centres and spreads (bug B3).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import InputIndependentAttention
from .positions import relative_offsets

#: parameter-name fragments excluded from weight decay (epfml/attention-cnn ``train.py``, ``get_optimizer``)
NO_DECAY_NAMES = ("attention_centers", "attention_spreads")


class QuadraticAttention(InputIndependentAttention):
    """Gaussian positional multi-head attention (paper eq. (9); epfml/attention-cnn ``GaussianSelfAttention``).

    ``A[h, q, k] = -1/2 (delta - mu_h)^T Sigma_h^{-1} (delta - mu_h)``, ``delta = k - q``, no
    ``1/sqrt(d)``; isotropic heads: ``-alpha_h ||delta - mu_h||^2``.  Probabilities ``(1, H, N, N)``.

    Args:
        dim: input channels ``D_in``.
        num_heads: number of heads ``N_h``.
        head_dim: per-head value size; ``None`` = ``dim`` (no value projection, ``proj`` stacks
            the per-head filters, ``Linear(num_heads * dim -> out_dim)``).
        out_dim: output channels; ``None`` = ``dim``.
        dropout: dropout on the probabilities.
        value_proj: see :class:`AttentionBase`.
        bias: bias of ``proj``.
        isotropic: one spread ``s`` per head (``attention_spreads: (H,)``, ``alpha = s^2/2``);
            ``False``: a full ``S = Sigma^{-1/2}`` per head (``attention_spreads: (H, 2, 2)``).
        init_center_std: centres ``~ N(0, std^2)`` per coordinate.
        init_spread_std: ``s = 1 + N(0, std^2)``, or ``S = I + N(0, std^2)`` entrywise.

    Parameters:
        attention_centers: ``(H, 2)`` (row, col) offset ``key - query`` where head ``h`` peaks.
        attention_spreads: ``(H,)`` or ``(H, 2, 2)``.
    """

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, out_dim: int | None = None,
                 dropout: float = 0.0, value_proj: bool | None = None, bias: bool = True,
                 isotropic: bool = True, init_center_std: float = 2.0, init_spread_std: float = 0.01):
        super().__init__(dim, num_heads, head_dim=head_dim, out_dim=out_dim, dropout=dropout,
                         value_proj=value_proj, bias=bias)
        if init_center_std < 0 or init_spread_std < 0:
            raise ValueError(f"init_center_std and init_spread_std must be >= 0, got "
                             f"{init_center_std} and {init_spread_std}")
        self.isotropic = bool(isotropic)
        self.attention_centers = nn.Parameter(torch.randn(num_heads, 2) * init_center_std)  # (H, 2)
        if self.isotropic:
            spreads = 1.0 + torch.randn(num_heads) * init_spread_std  # (H,)
        else:
            spreads = torch.eye(2).repeat(num_heads, 1, 1) + torch.randn(num_heads, 2, 2) * init_spread_std  # (H, 2, 2)
        self.attention_spreads = nn.Parameter(spreads)
        self.register_buffer("relative_position_offsets", torch.empty(0, 0, 2), persistent=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, isotropic={self.isotropic}"

    def position_parameters(self) -> list[nn.Parameter]:
        return [self.attention_centers, self.attention_spreads]

    @property
    def alpha(self) -> torch.Tensor:
        """``(H,)`` precision ``alpha = s^2 / 2`` of isotropic heads (paper eq. (9))."""
        if not self.isotropic:
            raise ValueError("alpha is defined for isotropic heads only; use inverse_covariance() instead")
        return self.attention_spreads ** 2 / 2

    def inverse_covariance(self) -> torch.Tensor:
        """``Sigma^{-1} = S^T S`` per head, ``(H, 2, 2)`` (isotropic: ``s^2 I``)."""
        s = self.attention_spreads
        if self.isotropic:
            return (s ** 2)[:, None, None] * torch.eye(2, device=s.device, dtype=s.dtype)  # (H, 2, 2)
        return torch.einsum("hki,hkj->hij", s, s)  # (H, 2, 2)

    def target_vectors(self) -> torch.Tensor:
        """Target vectors ``t_h`` of the expanded form ``t_h . r_delta``, ``r_delta = (d1, d2, d1^2, d2^2, d1 d2)``.

        Returns:
            ``(H, 5)``: ``-1/2 (-2(a mu1 + b mu2), -2(c mu2 + b mu1), a, c, 2b)`` with
            ``Sigma^{-1} = [[a, b], [b, c]]`` (the correct ``c * mu2``, bug B1).
        """
        inv = self.inverse_covariance()
        a, b, c = inv[:, 0, 0], inv[:, 0, 1], inv[:, 1, 1]
        mu1, mu2 = self.attention_centers.unbind(-1)
        t = torch.stack([-2 * (a * mu1 + b * mu2), -2 * (c * mu2 + b * mu1), a, c, 2 * b], dim=-1)  # (H, 5)
        return -0.5 * t

    def position_scores(self, height: int, width: int) -> torch.Tensor:
        """Logits ``-1/2 ||S_h (delta - mu_h)||^2``, ``(1, H, N, N)`` (= ``t_h . r_delta`` + const per head)."""
        offsets = self._grid_table("relative_position_offsets", height, width,
                                   lambda h, w, dev: relative_offsets(h, w, device=dev))  # (N, N, 2)
        mu = self.attention_centers
        d = offsets.to(mu.dtype)[None] - mu[:, None, None, :]  # (H, N, N, 2): delta - mu_h
        s = self.attention_spreads
        if self.isotropic:
            logits = -0.5 * (s ** 2)[:, None, None] * (d ** 2).sum(-1)  # (H, N, N)
        else:
            sd = torch.einsum("hij,hnmj->hnmi", s, d)  # (H, N, N, 2): S_h (delta - mu_h)
            logits = -0.5 * (sd ** 2).sum(-1)  # (H, N, N)
        return logits[None]  # (1, H, N, N)

    @torch.no_grad()
    def degenerate_heads(self, cond_threshold: float = 1000.0, eig_threshold: float = 1e-5) -> torch.Tensor:
        """Heads whose Gaussian has collapsed (epfml/attention-cnn ``train.py``, prune/reset rule).

        A head is degenerate when the condition number of ``Sigma^{-1}`` exceeds ``cond_threshold``
        or its largest eigenvalue is below ``eig_threshold`` (almost uniform attention).

        Returns:
            ``(H,)`` bool.
        """
        eig = torch.linalg.eigvalsh(self.inverse_covariance().double())  # (H, 2), ascending
        smallest, largest = eig[:, 0], eig[:, 1]
        cond = torch.where(smallest > 0, largest / smallest.clamp_min(1e-300), torch.full_like(largest, math.inf))
        return (cond > cond_threshold) | (largest < eig_threshold)


def no_decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups with no weight decay on Gaussian centres and spreads (bug B3).

    Args:
        model: any module.
        weight_decay: decay of every other parameter.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]``;
        ``no_decay`` holds every parameter whose name contains ``attention_centers`` or
        ``attention_spreads``.  Both groups are always returned (either may be empty).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if any(k in name for k in NO_DECAY_NAMES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
