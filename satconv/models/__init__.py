"""Every network of the book, built from a config by :func:`build_model`.

=========  ==============================================================  ===================
arch       network                                                         module
=========  ==============================================================  ===================
encoder    the paper's attention encoder (space-to-depth, post-norm)       ``encoder.py``
resnet18   CIFAR ResNet18 (3x3 stem, no max-pool)                          ``resnet.py``
vit        ViT from scratch: the [Re]'s hybrid stem, or plain patches      ``vit.py``
san        the [Re]'s CIFAR SAN (pairwise / patchwise)                     ``san.py``
sasa       a small stand-alone self-attention ResNet                       ``sasa.py``
fcvit      a small FCViT for CIFAR-size input                              ``fcvit.py``
=========  ==============================================================  ===================

All take normalised images ``(B, 3, H, W)`` and return logits ``(B, num_classes)``;
``model(images, return_attention=True)`` returns ``(logits, [probs per attention layer])`` and
``model.attention_layers()`` lists the attention modules.
"""
from __future__ import annotations

from torch import nn

from ..attention.routes import Routes, set_routes
from ..config import ExperimentConfig, ModelConfig
from .common import count_parameters, make_attention
from .encoder import AttentionEncoder
from .resnet import ResNet18
from .vit import ViT


def _staged(name: str):
    def build(cfg: ModelConfig) -> nn.Module:
        import importlib
        return importlib.import_module(f"{__name__}.{name}").build(cfg)
    return build


#: arch name -> builder taking a ModelConfig
BUILDERS = {
    "encoder": AttentionEncoder,
    "resnet18": ResNet18,
    "vit": ViT,
    "san": _staged("san"),
    "sasa": _staged("sasa"),
    "fcvit": _staged("fcvit"),
}


def build_model(cfg: ModelConfig | ExperimentConfig, routes: Routes | None = None) -> nn.Module:
    """Build the network a config describes, its attention layers set to take ``routes``.

    Args:
        cfg: a :class:`ModelConfig` or a whole :class:`ExperimentConfig`.
        routes: how the attention layers compute eq. (2) (:class:`~satconv.attention.routes.Routes`, shown in
            ``repr(model)``); ``None``: from ``cfg.train`` (``attention_route``, ``shared_route``,
            ``fused_forward``, ``fused_backward``) for an :class:`ExperimentConfig`, else the defaults.

    Returns:
        An ``nn.Module``: ``(B, 3, H, W) -> (B, num_classes)`` logits.
    """
    if routes is None:
        routes = Routes.from_train(cfg.train) if isinstance(cfg, ExperimentConfig) else Routes()
    if isinstance(cfg, ExperimentConfig):
        cfg = cfg.model
    return set_routes(BUILDERS[cfg.arch](cfg), routes)


__all__ = ["build_model", "count_parameters", "make_attention", "AttentionEncoder", "ResNet18", "ViT", "BUILDERS"]
