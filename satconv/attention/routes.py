"""How an attention layer computes eq. (2) of arXiv 1911.03584: the explicit product or a fast path.

Every mechanism computes ``MHSA(X) = concat_h [softmax(A^(h)) X W_val^(h)] W_out + b_out`` by an explicit
route (scores, softmax, ``P V`` per head, ``W_out``) and, where it has one, by a fast path that computes
the same function with fewer passes over memory: folded query/key weights, probabilities shared by the
batch multiplied in one GEMM, ``W_out`` folded with the following linear layer, fused Triton kernels.

Which route a layer takes is one attribute, :class:`Routes`, set on the layer when the model is built
(:func:`satconv.models.build_model` from ``train.attention_route``, ``train.shared_route``,
``train.fused_forward`` and ``train.fused_backward``) and shown in ``repr(model)``.  Nothing is read from
process-wide state: :func:`set_routes` changes the routes of one model's layers, and :func:`using_routes`
does so for a block and restores them (``tests/test_fast_paths.py`` compares the fast paths with the
explicit route this way).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

#: routes of the folded dense attention (:func:`satconv.attention.folded.folded_forward`), default first
DENSE_ROUTES = ("folded", "sdpa")
#: routes of probabilities shared by the batch (:meth:`satconv.attention.base.AttentionBase.combine`), default first
SHARED_ROUTES = ("bmm_gemm", "einsum", "bmm", "wfirst")


@dataclass(frozen=True)
class Routes:
    """The route choices of one layer.

    Attributes:
        fast: take the fast paths (``False``: the explicit eq. (2) product everywhere, the reference).
        dense: the folded dense attention's route: ``"folded"`` materialises the ``(B, N, heads, N)``
            logits and probabilities and multiplies them out with batched GEMMs; ``"sdpa"`` hands the folded
            queries, keys and values to ``F.scaled_dot_product_attention`` (fused kernels that never store
            the probabilities).  Same function; different dropout draws.
        shared: how probabilities shared by the batch meet the values (input-independent attention without
            value projection, paper.md §6.4).  ``"einsum"``: one GEMM of the ``(heads * N, N)`` probabilities
            with the ``(N, B * D)`` values, then a copy into ``W_out``'s ``(B, N, heads * D)`` layout.
            ``"bmm"``: a batched GEMM of the probabilities laid out ``(N * heads, N)`` and broadcast over the
            batch, landing in ``W_out``'s layout.  ``"wfirst"``: every head's slice of ``W_out`` first, then
            one batched GEMM over keys and heads.  ``"bmm_gemm"`` (default): ``"bmm"``'s forward pass, with
            the probabilities' gradient as one GEMM over batch and features
            (:class:`~satconv.attention.shared.SharedProbabilityProduct`).  Same function.
        fused_forward: on CUDA with Triton, the folded attention's softmax and dropout run as one kernel
            (:func:`satconv.attention.fused.softmax_dropout_forward`).
        fused_backward: likewise for the element-wise part of its backward pass.

    Raises:
        ValueError: an unknown ``dense`` or ``shared`` route.
    """

    fast: bool = True
    dense: str = DENSE_ROUTES[0]
    shared: str = SHARED_ROUTES[0]
    fused_forward: bool = True
    fused_backward: bool = True

    def __post_init__(self):
        if self.dense not in DENSE_ROUTES:
            raise ValueError(f"unknown dense attention route {self.dense!r}; choose one of {', '.join(DENSE_ROUTES)}")
        if self.shared not in SHARED_ROUTES:
            raise ValueError(f"unknown shared-probability route {self.shared!r}; choose one of "
                             f"{', '.join(SHARED_ROUTES)}")

    @classmethod
    def from_train(cls, train) -> "Routes":
        """The routes a :class:`satconv.config.TrainConfig` asks for (``attention_route``, ``shared_route``,
        ``fused_forward``, ``fused_backward``); the fast paths on."""
        return cls(fast=True, dense=train.attention_route, shared=train.shared_route,
                   fused_forward=train.fused_forward, fused_backward=train.fused_backward)

    def __str__(self) -> str:
        if not self.fast:
            return "explicit"
        return (f"fast(dense={self.dense}, shared={self.shared}, fused_forward={self.fused_forward}, "
                f"fused_backward={self.fused_backward})")


#: the explicit eq. (2) product everywhere (the reference every fast path is tested against)
EXPLICIT = Routes(fast=False)


def route_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` (itself included) whose computation a :class:`Routes` chooses: those with a
    ``routes`` attribute (the attention layers, and the fast LayerNorm of :mod:`satconv.models.common`)."""
    return [m for m in model.modules() if isinstance(getattr(m, "routes", None), Routes)]


def set_routes(model: nn.Module, routes: Routes) -> nn.Module:
    """Give every route-choosing layer of ``model`` the routes ``routes``; returns ``model``.

    A compiled model (``torch.compile``) traced its layers with the routes they had: set routes before
    compiling.
    """
    if not isinstance(routes, Routes):
        raise TypeError(f"routes must be a satconv.attention.routes.Routes, got {type(routes).__name__}")
    for m in route_modules(model):
        m.routes = routes
    return model


def routes_of(model: nn.Module) -> Routes | None:
    """The routes ``model``'s layers take, ``None`` when it has no route-choosing layer.

    Raises:
        ValueError: its layers take different routes.
    """
    found = {m.routes for m in route_modules(model)}
    if len(found) > 1:
        raise ValueError(f"the layers of this model take different routes: {sorted(map(str, found))}")
    return found.pop() if found else None


@contextlib.contextmanager
def using_routes(model: nn.Module, routes: Routes):
    """Within the block every route-choosing layer of ``model`` takes ``routes``; afterwards each has its
    own routes again.  Only ``model`` changes (no process-wide state)."""
    before = [(m, m.routes) for m in route_modules(model)]
    set_routes(model, routes)
    try:
        yield model
    finally:
        for m, r in before:
            m.routes = r


def fused_runs(on: bool, t: torch.Tensor) -> bool:
    """Whether a fused Triton kernel chosen by ``on`` (:attr:`Routes.fused_forward` or ``fused_backward``)
    runs on tensor ``t``: Triton is importable, ``t`` is in one of :data:`satconv.attention.fused.FLOATS`, and
    on CUDA, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``: how ``tests/test_fused.py``
    pins the kernels without a GPU)."""
    from . import fused
    here = t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return bool(on) and here and fused.available() and t.dtype in fused.FLOATS
