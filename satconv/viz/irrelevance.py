"""FCViT's query-irrelevance (Ma et al. 2022, ma-xu/FCViT), measured per head.

ViT attention maps were observed to be nearly the same for every query pixel.
:func:`query_irrelevance` scores it as a total-variation distance to the head's query-averaged
map, raw or after re-centring each map on its query (where conv-like heads score 0).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from matplotlib.figure import Figure

from .common import new_figure, to_numpy, square_side
from .maps import attention_batches
from .runs import load_atlas


def _selected_rows(queries: torch.Tensor, height: int, width: int, margin: int) -> torch.Tensor:
    """Positions (in ``queries``) of the queries at least ``margin`` pixels from the border."""
    rows, cols = queries // width, queries % width
    keep = (rows >= margin) & (rows < height - margin) & (cols >= margin) & (cols < width - margin)
    if not keep.any():
        raise ValueError(f"margin={margin} leaves no query in a {height}x{width} grid")
    return keep.nonzero().squeeze(1)


def query_irrelevance(probs, aligned: bool = False, margin: int = 0, grid: tuple[int, int] | None = None,
                      queries=None) -> np.ndarray:
    """How much a head's attention map changes with the query (FCViT: ViT maps are "query-irrelevant").

    Per head: the mean over queries ``q`` of the total-variation distance
    ``TV(p_q, m) = 1/2 sum_k |p_q[k] - m[k]|`` between the query's map ``p_q`` and the head's
    query-averaged map ``m = mean_q p_q``, then averaged over the batch.  0 = the same map for every
    query (what FCViT observed); near 1 = every query looks somewhere else.

    ``aligned=True`` first re-centres each map on its query, ``a_q[delta] = p_q[q + delta]`` on the
    ``(2h-1) x (2w-1)`` grid of offsets ``delta = key - query``.  A conv-like head that attends at a
    fixed shift is then query-IRRELEVANT (the same offset map everywhere, ~0), although in the raw
    sense it is very query-RELEVANT (its peak moves with the query, ~1); a map that is the same
    for every query is ~0 raw but not aligned.  Border queries see a truncated window, so use
    ``margin`` to score interior queries only.

    Given only some query rows (``queries``, e.g. the few query pixels of a run's atlas), the
    mean map and the distances use those queries: an estimate from a sample of queries.

    Args:
        probs: ``(B or 1, H, Q, N)`` probabilities, rows = queries, ``N = height * width``;
            ``Q = N`` (all queries, in order) unless ``queries`` is given.
        aligned: compare query-centred maps instead of raw maps.
        margin: skip queries closer than ``margin`` pixels to the border (both variants).
        grid: ``(height, width)``; ``None`` = square.
        queries: ``(Q,)`` flat pixel index of each row, or ``None`` for ``arange(N)``.

    Returns:
        ``(H,)`` scores in [0, 1].
    """
    p = probs if isinstance(probs, torch.Tensor) else torch.tensor(np.array(probs, dtype=float))
    p = p.detach().cpu().double()
    if p.ndim != 4:
        raise ValueError(f"probs must be (B, H, Q, N), got shape {tuple(p.shape)}")
    n = p.shape[-1]
    height, width = grid or (square_side(n),) * 2
    if height * width != n:
        raise ValueError(f"grid {height}x{width} does not match N={n}")
    queries = torch.arange(n) if queries is None else torch.as_tensor(queries).long().flatten().cpu()
    if len(queries) != p.shape[-2] or queries.min() < 0 or queries.max() >= n:
        raise ValueError(f"queries must hold the flat index (< {n}) of each of the {p.shape[-2]} rows of probs, "
                         f"got {len(queries)} indices")
    keep = _selected_rows(queries, height, width, margin)
    p, queries = p[:, :, keep], queries[keep]
    if aligned:
        rows, cols = torch.arange(n) // width, torch.arange(n) % width
        d_row = rows[None, :] - rows[queries][:, None] + height - 1  # (Nq, N): key - query, shifted >= 0
        d_col = cols[None, :] - cols[queries][:, None] + width - 1
        index = d_row * (2 * width - 1) + d_col  # (Nq, N) flat offset index, injective per query
        n_offsets = (2 * height - 1) * (2 * width - 1)
    scores = []
    for maps in p:  # (H, Nq, N), one image at a time to bound memory
        if aligned:
            out = maps.new_zeros(maps.shape[0], len(queries), n_offsets)  # (H, Nq, offsets)
            maps = out.scatter_(-1, index.expand(maps.shape[0], -1, -1), maps)
        mean = maps.mean(dim=1, keepdim=True)  # (H, 1, N or offsets)
        scores.append(0.5 * (maps - mean).abs().sum(-1).mean(-1))  # (H,)
    return torch.stack(scores).mean(0).numpy()


def model_query_irrelevance(model: torch.nn.Module, images: torch.Tensor, aligned: bool = False, margin: int = 0,
                            batch_size: int = 16) -> np.ndarray:
    """:func:`query_irrelevance` of every attention layer of a model, averaged over ``images``.

    Args:
        model: as in :func:`query_attention`.
        images: ``(B, C, H_img, W_img)``.
        aligned, margin: see :func:`query_irrelevance`.

    Returns:
        ``(L, H)``.
    """
    total, count = None, 0
    for b, probs in attention_batches(model, images, batch_size):
        s = np.stack([query_irrelevance(pr, aligned=aligned, margin=margin) for pr in probs])  # (L, H)
        total = s * b if total is None else total + s * b  # (1, H, N, N) layers score the same per batch
        count += b
    return total / count


def plot_query_irrelevance(scores: dict, aligned: dict | None = None, panel_size: tuple = (4.2, 3.0)) -> Figure:
    """Query-irrelevance per layer for several models: heads as dots, the head mean as a line.

    Args:
        scores: ``name -> (L, H)`` raw scores (:func:`query_irrelevance`).
        aligned: optional ``name -> (L, H)`` shift-aligned scores, drawn in a second panel.
        panel_size: inches per panel.

    Returns:
        A figure with one axes (two with ``aligned``).
    """
    panels = [("raw maps (FCViT)", scores)] + ([("query-centred maps", aligned)] if aligned else [])
    fig = new_figure((panel_size[0] * len(panels), panel_size[1]))
    rng = np.random.default_rng(0)  # jitter only
    for k, (title, data) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for c, (name, s) in enumerate(data.items()):
            s = to_numpy(s)
            layers = np.arange(1, s.shape[0] + 1)
            x = layers[:, None] + rng.uniform(-0.12, 0.12, s.shape) + 0.06 * (c - (len(data) - 1) / 2)
            ax.scatter(x.ravel(), s.ravel(), s=8, color=f"C{c}", alpha=0.5, linewidths=0)
            ax.plot(layers, s.mean(1), "-o", color=f"C{c}", label=name, markersize=3)
        ax.set_xlabel("layer")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(title, fontsize=9)
        if k == 0:
            ax.set_ylabel("TV distance to the mean map")
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def run_query_irrelevance(run_dir, atlas: dict | None = None, margin: int = 3) -> dict:
    """Raw and query-centred :func:`query_irrelevance` of every layer of a run.

    With a checkpoint (``best.pt`` or ``last.pt``) the model is run on the atlas images and every
    query counts (raw: all queries; aligned: queries ``margin`` pixels inside the border).  Without
    one, the atlas's few query pixels are used: an estimate from a sample of queries.

    Returns:
        ``{"raw": (L, H), "aligned": (L, H), "source": "model" or "atlas"}``.
    """
    run_dir = Path(run_dir)
    atlas = atlas if atlas is not None else load_atlas(run_dir)
    if (run_dir / "best.pt").is_file() or (run_dir / "last.pt").is_file():
        from ..augmentation import normalize
        from ..evaluation import load_model

        model, _ = load_model(run_dir)
        data = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
        mean, std = data["mean"], data["std"]
        images = normalize(atlas["images"], mean, std)
        return {"raw": model_query_irrelevance(model, images),
                "aligned": model_query_irrelevance(model, images, aligned=True, margin=margin), "source": "model"}
    scores = {"raw": [], "aligned": []}
    for probs, queries, grid in zip(atlas["probs"], atlas["query_index"], atlas["grid"]):
        scores["raw"].append(query_irrelevance(probs, grid=grid, queries=queries))
        scores["aligned"].append(query_irrelevance(probs, aligned=True, margin=margin, grid=grid, queries=queries))
    return {"raw": np.stack(scores["raw"]), "aligned": np.stack(scores["aligned"]), "source": "atlas"}
