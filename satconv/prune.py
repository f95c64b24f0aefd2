"""Pruning degenerate Gaussian heads (arXiv 1911.03584 appendix, the generalised quadratic encoding).

The paper's appendix trains the anisotropic (generalised) quadratic model, finds that some heads have
collapsed, removes them and fine-tunes the rest: epfml/attention-cnn ``runs/quadratic-generalized-pruned``
loads the final checkpoint of ``runs/quadratic-generalized``, runs ``train.py``'s
``find_degenerated_heads`` and ``BertAttention.prune_heads`` (``models/bert.py``) once before the
optimizer is built (``--prune_degenerated_heads True``), and trains 100 epochs at lr 0.01.

A head ``h`` is *degenerate* when its inverse covariance ``Sigma_h^{-1} = S_h^T S_h`` (``S_h`` =
``attention_spreads[h]``) has condition number > 1000 (an elongated, almost one-dimensional Gaussian)
or largest eigenvalue < 1e-5 (almost uniform attention over the whole image); for isotropic heads
``Sigma^{-1} = s^2 I`` and the rule reduces to the original's ``s^2 < 1e-5``
(:meth:`~satconv.attention.quadratic.QuadraticAttention.degenerate_heads`).

Removing head ``h`` of a layer (:func:`prune_heads`) drops row ``h`` of ``attention_centers`` ``(H, 2)``
and of ``attention_spreads`` ``(H,)`` or ``(H, 2, 2)``, the head's ``head_dim`` columns
``h*Dh:(h+1)*Dh`` of the output projection ``W_out`` (``proj.weight``, ``(D_out, H*Dh)``) and, with a
value projection, its ``head_dim`` rows of ``value.weight`` ``(H*Dh, D)`` and ``value.bias``.  The
output bias ``b_out`` is kept, as in the original (``prune_linear_layer(..., dim=1)`` keeps the bias).
The layer then computes eq. (2) with the remaining heads only, i.e. the unpruned layer with the
removed heads' contributions ``softmax(A^(h)) X W_val^(h) W_out^(h)`` left out.

A layer whose heads are *all* degenerate: the original has no guard (it would build a value layer
with no inputs, leaving only the bias).  Here :func:`prune_heads` refuses to remove every head of a
layer and :func:`prune_degenerate_heads` raises a ``ValueError`` naming the layer before touching
any layer, so a model is either pruned as a whole or left as it was.

Pruning replaces the affected parameters by new, smaller ``nn.Parameter`` objects (in the same
registration slots, so ``model.parameters()`` keeps its order): build the optimizer after pruning.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .attention.quadratic import QuadraticAttention

#: the original's thresholds (epfml/attention-cnn ``train.py``, ``find_degenerated_heads``)
COND_THRESHOLD = 1000.0
EIG_THRESHOLD = 1e-5


def _keep_index(attn: QuadraticAttention, keep) -> list[int]:
    """``keep`` (indices or an ``(H,)`` bool mask) as sorted unique head indices, checked."""
    h = attn.num_heads
    if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool:
        if keep.shape != (h,):
            raise ValueError(f"a keep mask must have shape ({h},), got {tuple(keep.shape)}")
        idx = torch.nonzero(keep.cpu()).flatten().tolist()
    else:
        idx = sorted({int(i) for i in (keep.tolist() if isinstance(keep, torch.Tensor) else keep)})
        bad = [i for i in idx if not 0 <= i < h]
        if bad:
            raise ValueError(f"head indices {bad} out of range for a layer of {h} heads")
    if not idx:
        raise ValueError(f"cannot remove all {h} heads of a layer (a layer needs at least one head)")
    return idx


def _sliced(p: nn.Parameter, index: torch.Tensor, dim: int) -> nn.Parameter:
    """A new parameter holding ``p``'s entries ``index`` along ``dim`` (same dtype, device, requires_grad)."""
    return nn.Parameter(p.detach().index_select(dim, index.to(p.device)).clone(), requires_grad=p.requires_grad)


@torch.no_grad()
def prune_heads(attn: QuadraticAttention, keep: Sequence[int] | torch.Tensor) -> list[int]:
    """Remove heads from a quadratic attention layer in place, keeping the heads ``keep``.

    Args:
        attn: the layer, ``H`` heads of size ``Dh`` (``head_dim``).
        keep: indices of the heads to keep (any order; kept in increasing order), or an ``(H,)`` bool
            mask; at least one head.

    After the call, with ``K = len(keep)``: ``attention_centers (K, 2)``, ``attention_spreads (K,)`` or
    ``(K, 2, 2)``, ``proj.weight (D_out, K*Dh)`` (columns of the kept heads), ``value.weight (K*Dh, D)``
    and ``value.bias (K*Dh,)`` when the layer has a value projection, ``num_heads == K``; ``proj.bias``
    is unchanged and the cached eval-mode probabilities are cleared.

    Returns:
        The removed head indices (old numbering), increasing.

    Raises:
        ValueError: ``keep`` is empty, out of range, or a mask of the wrong shape.
    """
    if not isinstance(attn, QuadraticAttention):
        raise TypeError(f"prune_heads needs a QuadraticAttention layer, got {type(attn).__name__}")
    idx = _keep_index(attn, keep)
    h, dh = attn.num_heads, attn.head_dim
    kept = set(idx)
    removed = [i for i in range(h) if i not in kept]
    if not removed:
        return []
    heads = torch.tensor(idx, dtype=torch.long)
    cols = (heads[:, None] * dh + torch.arange(dh)).flatten()  # (K*Dh,): the kept heads' slices, in order
    attn.attention_centers = _sliced(attn.attention_centers, heads, 0)  # (K, 2)
    attn.attention_spreads = _sliced(attn.attention_spreads, heads, 0)  # (K,) or (K, 2, 2)
    attn.proj.weight = _sliced(attn.proj.weight, cols, 1)  # (D_out, K*Dh)
    attn.proj.in_features = len(cols)
    if attn.value is not None:
        attn.value.weight = _sliced(attn.value.weight, cols, 0)  # (K*Dh, D)
        if attn.value.bias is not None:
            attn.value.bias = _sliced(attn.value.bias, cols, 0)  # (K*Dh,)
        attn.value.out_features = len(cols)
    attn.num_heads = len(idx)
    attn.clear_cache()
    return removed


def quadratic_layers(model: nn.Module) -> dict[str, QuadraticAttention]:
    """Every :class:`QuadraticAttention` of ``model`` by its module name (a shared module once)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuadraticAttention)}


@torch.no_grad()
def head_conditioning(attn: QuadraticAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """Condition number and largest eigenvalue of every head's ``Sigma^{-1}``, in float64.

    Returns:
        ``(cond, largest)``, each ``(H,)`` float64 on the CPU; ``cond`` is ``inf`` for a singular
        ``Sigma^{-1}`` (as :meth:`QuadraticAttention.degenerate_heads` computes it).
    """
    eig = torch.linalg.eigvalsh(attn.inverse_covariance().detach().double().cpu())  # (H, 2), ascending
    smallest, largest = eig[:, 0], eig[:, 1]
    cond = torch.where(smallest > 0, largest / smallest.clamp_min(1e-300), torch.full_like(largest, math.inf))
    return cond, largest


def find_degenerate_heads(model: nn.Module, cond_threshold: float = COND_THRESHOLD,
                          eig_threshold: float = EIG_THRESHOLD) -> dict[str, list[int]]:
    """The degenerate heads of every quadratic layer (epfml/attention-cnn ``find_degenerated_heads``).

    Returns:
        ``{layer name: [head indices]}`` for every :class:`QuadraticAttention` of ``model`` (an empty
        list for a layer without degenerate heads), in ``named_modules`` order.
    """
    return {name: torch.nonzero(m.degenerate_heads(cond_threshold, eig_threshold).cpu()).flatten().tolist()
            for name, m in quadratic_layers(model).items()}


def prune_degenerate_heads(model: nn.Module, cond_threshold: float = COND_THRESHOLD,
                           eig_threshold: float = EIG_THRESHOLD) -> dict[str, list[int]]:
    """Remove the degenerate heads of every quadratic layer of ``model`` in place.

    Args:
        model: any module; its :class:`QuadraticAttention` layers are pruned.
        cond_threshold: a head whose ``Sigma^{-1}`` has a larger condition number is degenerate.
        eig_threshold: a head whose ``Sigma^{-1}`` has a smaller largest eigenvalue is degenerate.

    Returns:
        ``{layer name: [removed head indices]}`` for every quadratic layer (old numbering; an empty list
        where nothing was removed).

    Raises:
        ValueError: every head of some layer is degenerate (nothing is pruned then; see the module docs).
    """
    found = find_degenerate_heads(model, cond_threshold, eig_threshold)
    layers = quadratic_layers(model)
    empty = [name for name, heads in found.items() if len(heads) == layers[name].num_heads]
    if empty:
        raise ValueError(f"every head of layer(s) {', '.join(empty)} is degenerate (condition number of "
                         f"Sigma^-1 > {cond_threshold:g} or largest eigenvalue < {eig_threshold:g}); pruning "
                         f"would leave a layer without heads, so nothing was pruned")
    for name, heads in found.items():
        if heads:
            gone = set(heads)
            prune_heads(layers[name], [i for i in range(layers[name].num_heads) if i not in gone])
    return found


def head_counts(model: nn.Module) -> dict[str, int]:
    """``{layer name: num_heads}`` of every quadratic layer."""
    return {name: m.num_heads for name, m in quadratic_layers(model).items()}


def fit_heads_to_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Shrink the quadratic layers of ``model`` to the head counts a state dict holds, before loading it.

    A pruned model's state dict has fewer rows in ``<layer>.attention_centers``; a model built from the
    config has the full count.  Which heads are removed here does not matter, since ``load_state_dict``
    then overwrites every value: only the shapes are matched.  Layers whose counts already agree, and
    layers the state does not mention, are left alone.

    Returns:
        ``{layer name: new head count}`` for the layers that were shrunk.

    Raises:
        ValueError: the state holds more heads than a layer has.
    """
    shrunk = {}
    for name, m in quadratic_layers(model).items():
        key = f"{name}.attention_centers" if name else "attention_centers"
        if key not in state:
            continue
        n = int(state[key].shape[0])
        if n > m.num_heads:
            raise ValueError(f"{key} holds {n} heads but the layer has {m.num_heads}")
        if n < m.num_heads:
            prune_heads(m, range(n))
            shrunk[name] = n
    return shrunk


__all__ = ["COND_THRESHOLD", "EIG_THRESHOLD", "prune_heads", "prune_degenerate_heads", "find_degenerate_heads",
           "head_conditioning", "head_counts", "quadratic_layers", "fit_heads_to_state"]
