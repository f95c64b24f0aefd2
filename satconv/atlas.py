"""Small records of a run's attention, for the figures of the book.

* :func:`attention_snapshot`: per epoch, the attention parameters (Gaussian centres and spreads,
  learned relative embeddings) and each layer's map of the centre query for one test image
  (the "evolution during training" figures, paper Figs. 3 and 4);
* :func:`build_atlas`: at the end of a run, the attention probabilities of every layer and head for a
  fixed set of test images and query pixels, plus the paper's (fixed query averaged over 100 images,
  Fig. 6) and the [Re]'s (all queries of one image averaged) protocols, in float16, small enough to
  commit (:data:`ATLAS_MAX_BYTES`).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .analysis import fitting_radius, shift_profile
from .augmentation import normalize
from .data import DataBundle

#: parameter-name fragments recorded by :func:`attention_snapshot`
SNAPSHOT_NAMES = ("attention_centers", "attention_spreads", "embedding")
#: largest atlas file the training loop writes without a warning
ATLAS_MAX_BYTES = 5 * 2 ** 20
#: the radius of the shift profiles atlases and snapshots store (that of conv_likeness for K = 3)
PROFILE_RADIUS = 2


def attention_snapshot(model: nn.Module, image: torch.Tensor | None = None) -> dict:
    """Small per-epoch record of the attention: parameters named ``*attention_centers*``,
    ``*attention_spreads*`` or ``*embedding*`` (float32; float16 above 4096 elements) and, given a
    normalised ``image: (1, 3, H, W)``, each layer's attention of the centre query ``(heads, N)`` float16
    (``centre_probs``) and its :func:`satconv.analysis.shift_profile` over all interior queries
    ``(heads, 2R+1, 2R+1)`` float32 (``shift_profile``, ``R``: :data:`PROFILE_RADIUS`, less on a small grid): the
    layer's convolution-likeness at that epoch."""
    params = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if any(k in n for k in SNAPSHOT_NAMES)}
    params = {n: (p.half() if p.numel() > 4096 else p.float()) for n, p in params.items()}
    out = {"params": params, "centre_probs": [], "shift_profile": []}
    if image is not None:
        was = model.training
        model.eval()
        with torch.no_grad():
            _, probs = model(image, return_attention=True)
        model.train(was)
        for p in probs:
            side = _grid(p.shape[-1])
            out["centre_probs"].append(p[0, :, _query_pixels(*side, 1)[0]].half().cpu())  # (heads, N)
            profile, _ = shift_profile(p[0], *side, fitting_radius(*side, PROFILE_RADIUS))
            out["shift_profile"].append(torch.from_numpy(profile).float())  # (heads, 2R+1, 2R+1)
    return out


def _grid(n: int) -> tuple[int, int]:
    side = math.isqrt(n)
    return (side, side) if side * side == n else (1, n)


def _query_pixels(height: int, width: int, count: int) -> list[int]:
    """Flat indices of ``count`` query pixels: the centre ``(H//2, W//2)`` first, then the four
    quarter points, then seeded random pixels."""
    points = [(height // 2, width // 2), (height // 4, width // 4), (height // 4, 3 * width // 4),
              (3 * height // 4, width // 4), (3 * height // 4, 3 * width // 4)]
    flat = list(dict.fromkeys(r * width + c for r, c in points))
    extra = torch.randperm(height * width, generator=torch.Generator().manual_seed(0)).tolist()
    flat += [q for q in extra if q not in flat]
    return flat[:count]


def _atlas_images(labels: torch.Tensor, count: int) -> list[int]:
    """The first test image of each class in turn (class 0, 1, ..., then again), ``count`` in all."""
    labels = labels.cpu()
    per_class = [torch.nonzero(labels == c).flatten().tolist() for c in torch.unique(labels).tolist()]
    out, k = [], 0
    while len(out) < min(count, len(labels)):
        for idx in per_class:
            if k < len(idx) and len(out) < count:
                out.append(idx[k])
        k += 1
    return out


@torch.no_grad()
def build_atlas(model: nn.Module, data: DataBundle, mean, std, images: int, queries: int, device,
                average_over: int = 100, chunk: int = 10, profile_radius_max: int = PROFILE_RADIUS) -> dict | None:
    """Attention probabilities of every layer and head for fixed test images and query pixels.

    Returns ``None`` for networks without attention, else a dict of:
        ``images``: ``(I, 3, H, W)`` uint8 test images, ``labels``, ``test_index``, ``classes``;
        ``probs``: per layer ``(I, heads, Q, N)`` float16, rows = the query pixels ``query_index[l]``;
        ``query_index``: per layer ``(Q,)`` flat pixel indices (centre first); ``grid``: per layer ``(h, w)``;
        ``centre_mean``: per layer ``(heads, N)`` float16, the centre query averaged over the first
        ``average_over`` test images (the paper's Fig. 6 protocol);
        ``query_mean``: per layer ``(I, heads, N)`` float16, the map averaged over all queries ([Re] ``viz``);
        ``input_independent``: per layer bool;
        ``shift_profile``: per layer ``(A, heads, 2R+1, 2R+1)`` float32 (``R``:
        :func:`satconv.analysis.fitting_radius` of ``profile_radius_max``), :func:`satconv.analysis.shift_profile`
        over *all* interior queries of each of the first ``average_over`` test images (``A`` of them; 1 for an
        input-independent layer): the convolution-likeness of every head, per image and, averaged, of the
        Fig. 6 protocol (the profile is linear in the probabilities).
    """
    model.eval()
    test = data.test
    idx = _atlas_images(test.labels, images)
    if not idx:
        return None
    x = normalize(test.images[torch.tensor(idx, device=test.images.device)].to(device), mean, std)
    _, probs = model(x, return_attention=True)
    if not probs:
        return None
    atlas = {"images": test.images[idx].cpu(), "labels": test.labels[idx].cpu(), "test_index": test.index[idx].cpu(),
             "classes": list(data.classes), "probs": [], "query_index": [], "grid": [], "centre_mean": [],
             "query_mean": [], "input_independent": []}
    for p in probs:
        grid = _grid(p.shape[-1])
        q = torch.tensor(_query_pixels(*grid, queries), device=p.device)
        full = p.float().expand(len(idx), -1, -1, -1)  # (I, heads, N, N)
        atlas["probs"].append(full[:, :, q].half().cpu())  # (I, heads, Q, N)
        atlas["query_index"].append(q.cpu())
        atlas["grid"].append(grid)
        atlas["query_mean"].append(full.mean(-2).half().cpu())  # (I, heads, N)
        atlas["input_independent"].append(p.shape[0] == 1)
    n_avg = min(average_over, len(test))
    sums, profiles = None, [[] for _ in probs]
    for start in range(0, n_avg, chunk):
        xs = normalize(test.images[start:min(n_avg, start + chunk)].to(device), mean, std)
        _, probs = model(xs, return_attention=True)
        centre = [p[:, :, _query_pixels(*_grid(p.shape[-1]), 1)[0]].float().expand(len(xs), -1, -1).sum(0)
                  for p in probs]  # per layer (heads, N)
        sums = centre if sums is None else [a + b for a, b in zip(sums, centre)]
        for layer, p in enumerate(probs):
            if not (atlas["input_independent"][layer] and profiles[layer]):  # an input-independent layer once
                grid = _grid(p.shape[-1])
                radius = fitting_radius(*grid, profile_radius_max)
                profiles[layer] += [torch.from_numpy(shift_profile(one, *grid, radius)[0]) for one in p]
    atlas["centre_mean"] = [(s / n_avg).half().cpu() for s in sums]
    atlas["shift_profile"] = [torch.stack(layer).float() for layer in profiles]
    return atlas


def load_atlas(run_dir: str | Path) -> dict:
    """``atlas.pt`` of a run; adds ``probs_stacked: (I, layers, heads, Q, N)`` when all layers agree in shape."""
    atlas = torch.load(Path(run_dir) / "atlas.pt", weights_only=True)
    if len({tuple(p.shape) for p in atlas["probs"]}) == 1:
        atlas["probs_stacked"] = torch.stack(atlas["probs"], 1)
    return atlas


__all__ = ["SNAPSHOT_NAMES", "ATLAS_MAX_BYTES", "PROFILE_RADIUS", "attention_snapshot", "build_atlas",
           "load_atlas"]
