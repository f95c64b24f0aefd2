"""FLOP counting, in two conventions kept apart.

- :func:`flops_per_image`: every matrix product the network really runs, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add; linear layers, convs,
  the attention einsums, and in ``"train"`` mode the backward pass too).  This is the count MFU uses.
- :func:`paper_convention_flops`: Table 1 of arXiv 1911.03584 recounted the way ``thop==0.0.31``
  (``profile(model, (1, 3, 32, 32))``, epfml/attention-cnn ``print_flops``) counts: forward hooks on
  ``nn.Linear`` (``(2 in - 1)`` ops per output element) and ``nn.Conv2d`` (multiply-adds), nothing
  else.  Paper doc §1.3: the SA models' 6.2B / 15B are ``2 x`` their linear MACs, the ResNet18's
  0.56B is its conv MACs: the column mixes FLOPs and MACs (hypothesis a) and misses the attention
  einsums (hypothesis b, returned as ``attention_einsum_macs``).

"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .attention.routes import EXPLICIT, using_routes
from .config import ExperimentConfig


# ---------------------------------------------------------------------------------------------
# FLOP counting
# ---------------------------------------------------------------------------------------------
def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: the forward count once for the input gradient and once
    for the weight gradient.

    PyTorch's own formula (``torch.utils.flop_counter.conv_backward_flop``, torch <= 2.14) ignores
    ``groups`` for the weight gradient, so a depth-wise conv's backward is counted ``groups`` times too
    high.  Both gradients cost as many multiply-adds as the forward pass, whose count
    (``conv_flop_count`` on the grouped weight shape ``(C_out, C_in / groups, k, k)``) is right.

    Args:
        grad_out_shape, x_shape, w_shape: shapes of the output gradient, input and weight.
        transposed: a transposed convolution.
        output_mask: which of (input, weight, bias) gradients are computed.
    """
    from torch.utils.flop_counter import conv_flop_count
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


#: formulas that replace PyTorch's in every count of this package
CUSTOM_FLOPS = {torch.ops.aten.convolution_backward: conv_backward_flops}


def counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` with :data:`CUSTOM_FLOPS` (grouped-conv backward counted right)."""
    return FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS)


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _in_channels(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None)
    return int(getattr(cfg, "in_channels", 3))


def flops_per_image(model: nn.Module, image_size: int = 32, mode: str = "train", device=None,
                    batch: int = 2, explicit: bool = True) -> int:
    """FLOPs per image of one forward (``"eval"``) or forward + backward (``"train"``) pass.

    Counted by ``FlopCounterMode`` (2 FLOPs per multiply-add of every mm/bmm/conv/SDPA op) on a
    batch of ``batch`` random images, divided by ``batch``.  ``"train"`` runs
    ``cross_entropy(model(x), y).backward()`` inside the counter, so the backward products are
    counted as autograd runs them (no gradient w.r.t. the input images).  Parameter gradients
    are reset afterwards and the module's train/eval mode is restored.

    Args:
        model: ``images (B, C, image_size, image_size) -> logits (B, classes)``.
        image_size: side of the square input.
        mode: ``"train"`` or ``"eval"``.
        device: where the input is made; ``None``: the model's device.  ``"meta"`` counts
            without computing (build the model under ``torch.device("meta")``).
        batch: images in the counted batch (>= 1).
        explicit: count the explicit formulation of eq. (2) (:data:`satconv.attention.routes.EXPLICIT`):
            the model's FLOPs, the convention of MFU.  ``False`` counts what the fast paths execute
            (the folded content attention skips the key projection, so it executes fewer).

    Returns:
        FLOPs per image (int).
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device = _model_device(model) if device is None else torch.device(device)
    x = torch.randn(batch, _in_channels(model), image_size, image_size, device=device)
    was_training = model.training
    had_grad = {p: p.grad for p in model.parameters()}
    model.train(mode == "train")
    try:
        with counter() as flop_counter, using_routes(model, EXPLICIT) if explicit else contextlib.nullcontext():
            if mode == "train":
                logits = model(x)
                y = torch.zeros(batch, dtype=torch.long, device=device)
                F.cross_entropy(logits, y).backward()
            else:
                with torch.no_grad():
                    model(x)
    finally:
        model.train(was_training)
        for p, g in had_grad.items():
            p.grad = g
    return int(flop_counter.get_total_flops()) // batch


def paper_convention_flops(model: nn.Module, image_size: int = 32, device=None) -> dict:
    """Table 1's FLOP column recounted the ``thop==0.0.31`` way, with the pieces kept apart.

    One eval forward of a single image (as ``thop.profile(model, (1, 3, 32, 32))``) with forward
    hooks on every ``nn.Linear`` and ``nn.Conv2d``, plus ``FlopCounterMode`` for every product.

    Args:
        model: ``images (1, C, image_size, image_size) -> logits``; on any device, ``meta`` included.
        image_size: side of the square input.
        device: where the input is made; ``None``: the model's device.

    Returns:
        dict with (all per image)

        - ``linear_macs``: ``sum in_features * out.numel()`` over ``nn.Linear`` calls;
        - ``conv_macs``: ``sum out.numel() * in_channels/groups * prod(kernel)`` over ``nn.Conv2d``;
        - ``attention_einsum_macs``: multiply-adds of products outside those modules (the attention
          einsums ``q k^T``, ``softmax(A) X``, ``q r``): ``FlopCounterMode total / 2 - linear - conv``;
        - ``total_macs``: ``FlopCounterMode total / 2``;
        - ``thop_like``: ``2 * linear_macs + conv_macs`` (Table 1's convention: FLOPs for Linear,
          MACs for conv, no einsums);
        - ``thop_exact``: thop 0.0.31's own formulas, ``(2 in - 1) * out.numel()`` per Linear and
          ``out.numel() * (in/groups * prod(kernel) + bias)`` per conv.  It differs from
          ``thop_like`` by one op per linear output element (``-1/(2 in)`` relative: -0.1% at
          ``in = 400``), negligible at Table 1's two significant digits.
    """
    device = _model_device(model) if device is None else torch.device(device)
    counts = {"linear_macs": 0, "conv_macs": 0, "thop_exact": 0}

    def linear_hook(m: nn.Linear, inputs, out):
        counts["linear_macs"] += m.in_features * out.numel()
        counts["thop_exact"] += (2 * m.in_features - 1) * out.numel()

    def conv_hook(m: nn.Conv2d, inputs, out):
        k = m.in_channels // m.groups * math.prod(m.kernel_size)
        counts["conv_macs"] += k * out.numel()
        counts["thop_exact"] += (k + (m.bias is not None)) * out.numel()

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
    was_training = model.training
    model.eval()
    x = torch.randn(1, _in_channels(model), image_size, image_size, device=device)
    try:
        with torch.no_grad(), counter() as flop_counter, using_routes(model, EXPLICIT):
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    total_macs = int(flop_counter.get_total_flops()) // 2
    return {
        "linear_macs": counts["linear_macs"],
        "conv_macs": counts["conv_macs"],
        "attention_einsum_macs": total_macs - counts["linear_macs"] - counts["conv_macs"],
        "total_macs": total_macs,
        "thop_like": 2 * counts["linear_macs"] + counts["conv_macs"],
        "thop_exact": counts["thop_exact"],
    }


def _count_model(cfg: ExperimentConfig) -> nn.Module:
    """The config's network on the ``meta`` device (no memory, no compute) for FLOP counting."""
    from .models import build_model
    with torch.device("meta"):
        return build_model(cfg)


def config_flops(cfg: ExperimentConfig, model: nn.Module, executed: bool = False) -> tuple[int, ...]:
    """Model FLOPs per image of ``cfg``'s network, as :func:`flops_per_image` counts them at
    ``cfg.model.image_size``.

    Counted on a meta copy, or on ``model`` if the meta run fails (a module that reads data).

    Returns:
        ``(train, eval)`` FLOPs per image of the explicit formulation (batch 2), plus the training FLOPs the
        fast paths execute (batch 100) if ``executed``.
    """
    size = cfg.model.image_size
    # the executed count uses batch 100: folded weights cost FLOPs per step, not per image
    passes = [("train", True, 2), ("eval", True, 2)] + ([("train", False, 100)] if executed else [])

    def count(net, device):
        return tuple(flops_per_image(net, size, mode, device=device, batch=b, explicit=ex) for mode, ex, b in passes)

    try:
        return count(_count_model(cfg), "meta")
    except Exception:  # e.g. ``.item()`` on meta tensors: count on the real model
        return count(model, None)


__all__ = ["flops_per_image", "paper_convention_flops", "config_flops"]
