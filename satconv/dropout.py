"""Dropout whose random draws stay PyTorch's own kernels inside compiled graphs.

``nn.Dropout`` keeps each entry with probability ``1 - p`` and scales the survivors by ``1 / (1 - p)``.
Compiled by inductor, its draw becomes one Philox call per element inside the fused kernel around it
(a LayerNorm, the content attention's softmax), and on an H200 that integer work took a large share of
those kernels' time: the ``triton_per_fused_..._native_dropout_native_layer_norm`` kernels of a
position-only step ran well above the time their bytes need (``book/bench/h200_kernels.jsonl``).
PyTorch's own CUDA kernels draw four numbers per Philox call.

:func:`keep_mask` is a custom operator (``satconv::keep_mask``) that inductor does not look into: it
draws the Bernoulli mask with ``torch.Tensor.bernoulli_`` and returns it as ``bool``; the fused kernels
then read the mask instead of computing it.  The law is ``nn.Dropout``'s: independent keeps with
probability ``1 - p``.  The operator is tagged ``nondeterministic_seeded`` (a random draw: not to be
recomputed in the backward pass), and every call carries arguments of its own so that no compiled graph
merges two draws into one (:func:`keep_mask`).

:class:`Dropout` is ``nn.Dropout`` with its mask from :func:`keep_mask`; models use it for every dropout.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn


#: per-module call-site numbers (:class:`Dropout`), see :func:`keep_mask`
_SALTS = itertools.count(1)


@torch.library.custom_op("satconv::keep_mask", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _keep_mask(shape: Sequence[int], p: float, anchor: torch.Tensor, salt: int) -> torch.Tensor:
    mask = torch.empty(list(shape), dtype=torch.uint8, device=anchor.device).bernoulli_(1.0 - p)
    return mask.view(torch.bool)


@_keep_mask.register_fake
def _(shape, p, anchor, salt):
    return torch.empty(list(shape), dtype=torch.bool, device=anchor.device)


def _check_probability(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")


def keep_mask(shape: Sequence[int], p: float, anchor: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """A dropout mask: ``True`` (keep) with probability ``1 - p``, independently per entry.

    ``anchor`` and ``salt`` only tell calls apart: the mask is drawn on ``anchor``'s device and does not
    depend on either.  Compiled graphs of some torch releases (2.11 among them) merge calls of a custom
    operator whose arguments are the same, tag or not, so two dropout masks in one graph must differ in
    ``anchor`` (the tensor being dropped, already in memory) or in ``salt`` (:class:`Dropout` numbers its
    instances).  Only one module dropping the same tensor twice in one graph would share a mask there.

    Args:
        shape: the mask's shape.
        p: drop probability, ``0 <= p < 1``.
        anchor: a tensor of this call (its values are not read).
        salt: an integer of this call site.

    Returns:
        ``bool`` tensor of ``shape`` on ``anchor.device``, drawn from the device's default generator
        (``torch.manual_seed`` reproduces it).
    """
    _check_probability(p)
    return torch.ops.satconv.keep_mask(list(shape), float(p), anchor, int(salt))


def dropout(x: torch.Tensor, p: float, training: bool = True, salt: int = 0) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the mask of :func:`keep_mask` (anchored on ``x``).

    Args:
        x: any shape.
        p: drop probability, ``0 <= p < 1``.
        training: drop only when ``True``.
        salt: call-site number (:func:`keep_mask`).

    Returns:
        ``x * mask / (1 - p)`` (same shape and dtype as ``x``), or ``x`` itself when not training or ``p == 0``.
    """
    if not training or p == 0.0:
        return x
    return x * keep_mask(x.shape, p, x, salt) * (1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask comes from :func:`keep_mask` (same law, one opaque draw when compiled).

    Shapes: any ``(*)`` in, the same ``(*)`` out.  ``inplace`` is not supported.  Each instance has its
    own ``salt`` (:func:`keep_mask`).
    """

    def __init__(self, p: float = 0.5):
        _check_probability(p)  # at construction, not only at the first draw
        super().__init__(p)
        self.salt = next(_SALTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.salt)


__all__ = ["keep_mask", "dropout", "Dropout"]
