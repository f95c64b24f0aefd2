"""The interface of every attention mechanism and the explicit eq. (2) product, with the input-independent base class.

Every mechanism in :mod:`satconv.attention` maps an image-shaped token tensor
``x: (batch, height, width, dim)`` to ``(batch, height, width, out_dim)`` and, when asked,
also returns its attention probabilities as a dense ``(batch or 1, heads, N, N)`` tensor with
``N = height * width`` (row ``q`` = query pixel, column ``k`` = key pixel, both flattened row-major).

Multi-head self-attention of arXiv 1911.03584, eq. (2)::

    MHSA(X) = concat_h [ softmax(A^(h)) X W_val^(h) ] W_out + b_out

Heads are *concatenated*.  With ``head_dim == dim`` and no value projection (the paper's
choice, epfml/attention-cnn ``models/bert.py``) every head attends over the raw ``X`` and ``W_out``
stacks the per-head filters; with any other ``head_dim`` a value projection
``dim -> num_heads * head_dim`` gives each head its own values.

:class:`AttentionBase` computes eq. (2) explicitly (scores, softmax, ``P V`` per head, ``W_out``) and reaches the
fast paths through one hook, its :attr:`~AttentionBase.routes` attribute
(:class:`satconv.attention.routes.Routes`): the shared-probability products live in
:mod:`satconv.attention.shared`, the folded dense attention in :mod:`satconv.attention.folded`, relative
positions in :mod:`satconv.attention.positions` and the precision rules in :mod:`satconv.attention.precision`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..dropout import Dropout
from .precision import softmax_keys, wide
from .routes import Routes
from .shared import SharedProbabilityProduct
from .softmax_dropout import dropped_softmax


def fold_following(proj: nn.Linear, then: nn.Linear | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W_out`` and ``b_out`` of ``proj``, multiplied out with a linear layer ``then`` that follows it.

    ``then(proj(z)) = z (W_t W_out)^T + (W_t b_out + b_t)``: one GEMM of the heads' concatenated
    output instead of two (the encoder block's ``dense`` layer after eq. (2)'s ``W_out``).

    Args:
        proj: ``Linear(K -> D_out)``.
        then: ``Linear(D_out -> E)``, or ``None``.

    Returns:
        ``(weight, bias)``: ``proj``'s own ``(D_out, K)`` and ``(D_out,)`` (or ``None``) when ``then``
        is ``None``, else ``(E, K)`` and ``(E,)`` (or ``None`` when neither has a bias): float32 at least,
        or the autocast dtype under autocast (:func:`wide`).
    """
    if then is None:
        return proj.weight, proj.bias
    tw = wide(then.weight)  # (E, D_out)
    weight = tw @ wide(proj.weight)  # (E, K)
    bias = None if proj.bias is None else tw @ wide(proj.bias)  # (E,)
    if then.bias is not None:
        bias = wide(then.bias) if bias is None else bias + wide(then.bias)
    return weight, bias


class AttentionBase(nn.Module):
    """Base class: head bookkeeping, values, dropout on probabilities, output projection.

    Subclasses that are "dense" (every query may attend to every key) implement
    :meth:`scores`; the base class then does softmax, dropout, the weighted sum and the
    projection.  Local mechanisms override :meth:`forward` entirely but keep its signature.

    Args:
        dim: input channels ``D_in`` (last axis of ``x``).
        num_heads: number of heads ``N_h``.
        head_dim: per-head value size ``D_h``; ``None`` means ``dim`` (heads concatenated, the paper).
        out_dim: output channels ``D_out``; ``None`` means ``dim``.
        dropout: dropout on the attention probabilities.
        value_proj: apply a value projection ``dim -> num_heads * head_dim``.  ``None`` chooses
            the paper's convention: no projection when ``head_dim == dim``, one otherwise.
        bias: bias of the output projection ``W_out`` (``b_out``).
    """

    #: ``True`` when the probabilities are a softmax over keys (rows sum to 1).
    row_stochastic: bool = True
    #: ``True`` when the probabilities do not depend on the input (position-only attention).
    input_independent: bool = False
    #: ``True`` when :meth:`forward` takes ``then``, a linear layer applied to its output that the
    #: fast paths fold into ``W_out`` (:func:`fold_following`).
    folds_then: bool = True
    #: how this layer computes eq. (2) (:class:`~satconv.attention.routes.Routes`): set per layer by
    #: :func:`~satconv.attention.routes.set_routes` (``build_model`` does, from the config)
    routes: Routes = Routes()

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, out_dim: int | None = None,
                 dropout: float = 0.0, value_proj: bool | None = None, bias: bool = True):
        super().__init__()
        if dim < 1 or num_heads < 1:
            raise ValueError(f"dim and num_heads must be positive, got dim={dim}, num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim if head_dim is None else head_dim
        self.out_dim = dim if out_dim is None else out_dim
        if value_proj is None:
            value_proj = self.head_dim != dim
        if not value_proj and self.head_dim != dim:
            raise ValueError(f"without a value projection head_dim must equal dim ({dim}), got {self.head_dim}")
        self.value = nn.Linear(dim, num_heads * self.head_dim) if value_proj else None
        self.attn_drop = Dropout(dropout)
        self.proj = nn.Linear(num_heads * self.head_dim, self.out_dim, bias=bias)

    @property
    def route_family(self) -> str | None:
        """Which route choice this layer's fast path reads: ``"dense"`` (:attr:`Routes.dense`,
        ``train.attention_route``: the folded content attention), ``"shared"`` (:attr:`Routes.shared`,
        ``train.shared_route``: probabilities shared by the batch) or ``None`` (neither applies)."""
        return None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, routes={self.routes}"

    def check_input(self, x: torch.Tensor, key_source: torch.Tensor | None = None) -> None:
        """Raise a clear error for an input this layer cannot take.

        Args:
            x: must be ``(B, H, W, dim)``.
            key_source: ``None`` or the shape of ``x`` (the same batch and grid).

        Raises:
            ValueError: naming the expected and the given shape.
        """
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__} takes x of shape (batch, height, width, {self.dim}), "
                             f"got {tuple(x.shape)}")
        if key_source is not None and tuple(key_source.shape) != tuple(x.shape):
            raise ValueError(f"{type(self).__name__}: key_source must have the shape of x {tuple(x.shape)}, "
                             f"got {tuple(key_source.shape)}")

    # -- pieces subclasses reuse ---------------------------------------------------------------
    def values(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head values.

        Args:
            x: ``(B, N, dim)``.

        Returns:
            ``(B, num_heads, N, head_dim)``, or ``(B, 1, N, dim)`` shared by all heads when there is
            no value projection.
        """
        if self.value is None:
            return x[:, None]  # (B, 1, N, D): every head reads the raw input
        b, n, _ = x.shape
        return self.value(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)

    def project(self, z: torch.Tensor, then: nn.Linear | None = None) -> torch.Tensor:
        """``W_out`` on the heads' concatenated output, then ``then`` if given.

        Args:
            z: ``(..., num_heads * head_dim)``.
            then: ``Linear(out_dim -> E)`` applied after ``W_out``, or ``None``.  On the fast paths
                the two are one GEMM with the weights of :func:`fold_following`.

        Returns:
            ``(..., out_dim)``, or ``(..., E)`` with ``then``.
        """
        if then is None:
            return self.proj(z)
        if not self.routes.fast:
            return then(self.proj(z))
        return F.linear(z, *fold_following(self.proj, then))

    def combine(self, probs: torch.Tensor, v: torch.Tensor, then: nn.Linear | None = None) -> torch.Tensor:
        """Weighted sum of values per head, heads concatenated, then ``W_out`` (and ``then``, :meth:`project`).

        Args:
            probs: ``(B or 1, H, N, N)`` attention weights (after dropout).
            v: ``(B, H or 1, N, Dh)`` values.
            then: a ``Linear(out_dim -> E)`` that follows ``W_out``, or ``None``.

        Returns:
            ``(B, N, out_dim)``, or ``(B, N, E)`` with ``then``.
        """
        fast = self.routes.fast
        if fast and probs.shape[0] == 1 and v.shape[1] == 1 and v.shape[0] > 1:
            # probabilities shared by the batch and values shared by the heads (input-independent attention
            # without value projection, paper.md §6.4), by the route Routes.shared names
            b, _, n, d = v.shape
            h = probs.shape[1]
            route = self.routes.shared
            if route == "wfirst":  # sum_h P_h (x W_h^T): heads' W_out slices first, then keys and heads at once
                weight, bias = fold_following(self.proj, then)  # (E, H*D), (E,)
                e = weight.shape[0]
                w = weight.view(e, h, d).transpose(0, 1).reshape(h * e, d)  # (H*E, D): rows (head, e)
                y = F.linear(v[:, 0], w)  # (B, N, H*E) = (B, N*H, E): rows (key, head)
                p = probs[0].permute(1, 2, 0).reshape(n, n * h)  # (N, N*H): [query, (key, head)]
                out = torch.bmm(p.to(y.dtype).expand(b, -1, -1), y.view(b, n * h, e))  # (B, N, E)
                return out if bias is None else out + bias.to(out.dtype)
            if route in ("bmm", "bmm_gemm"):  # (B, N*H, D): W_out's layout
                p = probs[0].transpose(0, 1).reshape(n * h, n)  # (N*H, N): rows (query, head)
                out = (SharedProbabilityProduct.apply(p, v[:, 0]) if route == "bmm_gemm"
                       else torch.bmm(p.to(v.dtype).expand(b, -1, -1), v[:, 0]))
            else:  # one (H*N, N) @ (N, B*D) GEMM, then a copy into W_out's layout
                out = torch.einsum("hnm,bmd->bnhd", probs[0], v[:, 0])  # (B, N, H, D)
            return self.project(out.reshape(b, n, h * d), then)  # (B, N, H*D) -> (B, N, out_dim or E)
        if fast and v.shape[1] == 1 and probs.shape[0] == v.shape[0]:
            # values shared by the heads: one (H*N, N) @ (N, D) product per image, x is not expanded
            b, h, n, _ = probs.shape
            out = torch.bmm(probs.reshape(b, h * n, n), v[:, 0]).view(b, h, n, -1)  # (B, H, N, D)
        else:
            out = torch.matmul(probs, v)  # (B, H, N, Dh)
        b, h, n, d = out.shape
        return self.project(out.transpose(1, 2).reshape(b, n, h * d), then)  # (B, N, H*Dh) -> (B, N, out_dim or E)

    def scores(self, x: torch.Tensor, height: int, width: int, key_source: torch.Tensor | None = None) -> torch.Tensor:
        """Attention logits ``A``.

        Args:
            x: ``(B, N, dim)`` flattened tokens.
            height, width: grid size, ``N = height * width``.
            key_source: ``(B, N, dim)`` tokens to compute keys from (hierarchical sharing), or ``None``.

        Returns:
            ``(B or 1, num_heads, N, N)`` logits.
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor, return_attention: bool = False, key_source: torch.Tensor | None = None,
                then: nn.Linear | None = None):
        """Apply the attention layer.

        Args:
            x: ``(B, H, W, dim)``.
            return_attention: also return the probabilities (before dropout).
            key_source: ``(B, H, W, dim)`` input the keys are computed from (the [Re]'s hierarchical
                variant reuses the first pass's keys); ``None`` uses ``x``.  Ignored by mechanisms
                without keys.
            then: a ``Linear(out_dim -> E)`` applied to the output (the encoder block's ``dense``),
                folded into ``W_out`` on the fast paths (:meth:`project`); ``None``: none.

        Returns:
            ``(B, H, W, out_dim)`` (``E`` with ``then``), or ``(out, probs)`` with ``probs`` ``(B or 1, heads, N, N)``.
        """
        self.check_input(x, key_source)
        b, height, width, d = x.shape
        tokens = x.reshape(b, height * width, d)
        ks = None if key_source is None else key_source.reshape(b, height * width, -1)
        logits = self.scores(tokens, height, width, key_source=ks)
        probs = softmax_keys(logits).to(x.dtype)
        out = self.combine(self.attn_drop(probs), self.values(tokens), then)
        out = out.reshape(b, height, width, -1)
        return (out, probs) if return_attention else out


class InputIndependentAttention(AttentionBase):
    """Base for attention whose probabilities depend only on the grid (and the parameters).

    Subclasses implement :meth:`position_scores`.  The probabilities are computed once per call
    and shared by the whole batch (``(1, H, N, N)`` @ ``(B, 1, N, D)``, one batched GEMM, §6.4).
    Dropout on them in training is therefore one mask for the whole batch, as in epfml/attention-cnn,
    which drops out its batch-free ``(W, H, heads, W, H)`` probabilities before the batch einsum.
    In eval mode they are cached per ``(height, width, device, dtype)``; an entry is reused while
    the ``_version`` counters (and storages) of :meth:`position_parameters` are unchanged, so an
    optimizer step or ``load_state_dict`` invalidates it.  Changes made behind autograd's back
    (``p.data.copy_(...)``) are not seen: call :meth:`clear_cache` after those.  The cache is
    bypassed when gradients to the positional parameters are being recorded, and cleared by
    :meth:`train`.

    Attributes:
        input_independent: ``True`` when :meth:`forward` takes the cached position-only path.
    """

    input_independent = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._probs_cache: dict = {}

    @property
    def route_family(self) -> str | None:
        """``"shared"`` when the heads read the raw input (no value projection): :meth:`combine` then
        applies the batch-shared probabilities by :attr:`Routes.shared`; ``None`` otherwise."""
        return "shared" if self.input_independent and self.value is None else None

    # -- to implement ----------------------------------------------------------------------------
    def position_scores(self, height: int, width: int) -> torch.Tensor:
        """Position-only logits ``(1, num_heads, N, N)`` on the parameters' device and dtype."""
        raise NotImplementedError

    def position_parameters(self) -> list[nn.Parameter]:
        """The parameters the probabilities depend on (default: all but values and projection)."""
        skip = {id(p) for m in (self.value, self.proj) if m is not None for p in m.parameters()}
        return [p for p in self.parameters() if id(p) not in skip]

    # -- shared machinery ------------------------------------------------------------------------
    def _grid_table(self, name: str, height: int, width: int, build) -> torch.Tensor:
        """A non-persistent buffer ``name`` built by ``build(height, width, device)`` for this grid."""
        table = getattr(self, name)
        device = self.proj.weight.device
        if torch.compiler.is_compiling():
            # inside torch.compile the table is a cheap constant of the graph; storing it on the module
            # from within the graph would make it a graph output (CUDA graphs would overwrite it)
            return build(height, width, device)
        if getattr(self, "_grid_" + name, None) != (height, width) or table.device != device:
            table = build(height, width, device)
            setattr(self, name, table)  # registered buffer: stays out of the state dict
            object.__setattr__(self, "_grid_" + name, (height, width))
        return table

    def clear_cache(self) -> None:
        """Forget the cached eval-mode probabilities."""
        self._probs_cache.clear()

    def train(self, mode: bool = True):
        """Switch train/eval mode and clear the probability cache."""
        self.clear_cache()
        return super().train(mode)

    def _full_precision_scores(self, height: int, width: int) -> torch.Tensor:
        """:meth:`position_scores` with autocast off (the logits need full precision)."""
        device_type = self.proj.weight.device.type
        if device_type in ("cuda", "cpu"):
            with torch.autocast(device_type=device_type, enabled=False):
                return self.position_scores(height, width)
        return self.position_scores(height, width)  # e.g. the meta device (shape-only FLOP counting): no autocast

    def _compute_probs(self, height: int, width: int, device, dtype) -> torch.Tensor:
        probs = softmax_keys(self._full_precision_scores(height, width))
        return probs.to(device=device, dtype=dtype or probs.dtype)

    def attention_probs(self, height: int, width: int, device=None, dtype=None) -> torch.Tensor:
        """Softmax of :meth:`position_scores`, cached in eval mode.

        Args:
            height, width: grid size, ``N = height * width``.
            device, dtype: of the result; ``None`` keeps the parameters' (at least float32).

        Returns:
            ``(1, num_heads, N, N)`` probabilities (rows sum to 1).  The cached tensor is shared:
            do not modify it in place.
        """
        params = self.position_parameters()
        recording = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if self.training or recording or torch.compiler.is_compiling():
            # (under torch.compile a cached tensor would be a graph output that CUDA graphs overwrite)
            return self._compute_probs(height, width, device, dtype)
        key = (height, width, str(device), dtype)
        version = tuple((p.data_ptr(), p._version) for p in params)
        hit = self._probs_cache.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        # a plain (non-inference) tensor without graph, usable later outside inference_mode
        with torch.inference_mode(False), torch.no_grad():
            probs = self._compute_probs(height, width, device, dtype)
        self._probs_cache[key] = (version, probs)
        return probs

    def dropped_probs(self, height: int, width: int, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training's probabilities and their dropout: one mask for the batch (:attr:`attn_drop`'s ``p``).

        The softmax, the mask and the backward pass run as opaque operators
        (:func:`satconv.attention.softmax_dropout.dropped_softmax`: inductor of torch 2.11 compiled the
        plain expressions wrong on the GPU).  The mask is :func:`satconv.dropout.keep_mask`'s, the law of
        :attr:`attn_drop`.

        Args:
            height, width: grid size, ``N = height * width``.
            dtype: of the dropped probabilities (the activations'); ``None``: float32 at least.

        Returns:
            ``(probs, dropped)``, both ``(1, num_heads, N, N)``: the probabilities (float32 at least, rows sum
            to 1) and ``probs * keep / (1 - p)`` in ``dtype``.
        """
        return dropped_softmax(self._full_precision_scores(height, width), self.attn_drop, dtype=dtype)

    def scores(self, x: torch.Tensor, height: int, width: int, key_source: torch.Tensor | None = None) -> torch.Tensor:
        """Position-only logits ``(1, num_heads, N, N)``; ``x`` and ``key_source`` are not used."""
        return self.position_scores(height, width)

    def forward(self, x: torch.Tensor, return_attention: bool = False, key_source: torch.Tensor | None = None,
                then: nn.Linear | None = None):
        """Apply the layer (same contract as :meth:`AttentionBase.forward`; ``key_source`` is ignored).

        Args:
            x: ``(B, H, W, dim)``.
            return_attention: also return the probabilities ``(1, heads, N, N)`` (before dropout).
            key_source: ignored (no keys).
            then: a ``Linear(out_dim -> E)`` applied to the output, folded into ``W_out`` on the fast paths.

        Returns:
            ``(B, H, W, out_dim)`` (``E`` with ``then``), or ``(out, probs)``.
        """
        self.check_input(x, key_source)
        b, height, width, d = x.shape
        tokens = x.reshape(b, height * width, d)  # (B, N, D)
        if self.training and self.attn_drop.p > 0:
            probs, dropped = self.dropped_probs(height, width, x.dtype)  # (1, H, N, N) each
        else:
            probs = dropped = self.attention_probs(height, width, device=x.device, dtype=x.dtype)  # (1, H, N, N)
        out = self.combine(dropped, self.values(tokens), then)  # (B, N, out_dim or E)
        out = out.reshape(b, height, width, -1)
        return (out, probs) if return_attention else out


def scaled(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Divide dot-product logits by ``sqrt(dim)`` (eq. 1 of Vaswani et al.)."""
    return logits / math.sqrt(dim)
