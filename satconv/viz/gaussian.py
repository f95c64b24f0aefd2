"""Gaussian (quadratic) heads as mass contours: paper Figs. 3 and 4 (epfml/attention-cnn ``utils/plotting.py``).

The probabilities always come from :class:`satconv.attention.quadratic.QuadraticAttention`
loaded with the given parameters, never from a re-derived formula.
"""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from .common import new_figure, to_numpy, query_index


def mass_threshold(probs_map, level: float) -> float:
    """Smallest probability ``t`` with ``sum(p[p >= t]) >= level`` (the "highest-density region").

    Args:
        probs_map: any shape, non-negative, summing to ~1.
        level: mass fraction in (0, 1].

    Returns:
        ``t``: ``{p >= t}`` is the smallest set of pixels holding at least ``level`` of the mass
        (up to ties at ``t``, which are all included).
    """
    if not 0.0 < level <= 1.0:
        raise ValueError(f"level must be in (0, 1], got {level}")
    p = np.sort(to_numpy(probs_map).ravel())[::-1]  # descending
    cum = np.cumsum(p)
    i = int(np.searchsorted(cum, level * cum[-1] * (1 - 1e-12)))  # first index with cum >= level
    return float(p[min(i, p.size - 1)])


def mass_region(probs_map, level: float) -> np.ndarray:
    """Boolean mask (same shape) of the smallest region holding ``level`` of the mass (see :func:`mass_threshold`)."""
    p = to_numpy(probs_map)
    return p >= mass_threshold(p, level)


def gaussian_mass_contours(ax, probs_map, levels: Sequence[float] = (0.5, 0.9), color="C0", **style):
    """Draw the contour of the smallest region holding each mass fraction (epfml ``utils/plotting.py``).

    Pixels are sorted by probability and accumulated until the mass reaches the level; the line is
    drawn between the region's weakest pixel and the next weaker one, so it encloses exactly the
    region's pixel centres (``ax.contour`` uses pixel centres at integer ``(col, row)``, like ``imshow``).
    Inner (smaller-mass) contours are more opaque.

    Args:
        ax: matplotlib axes.
        probs_map: ``(height, width)`` probabilities of one head for one query.
        levels: mass fractions in (0, 1].
        color: line colour; style: further ``ax.contour`` keywords (``linewidths``...).

    Returns:
        List of ``(level, QuadContourSet)``; a level whose region is the whole grid draws nothing.
    """
    p = to_numpy(probs_map)
    if p.ndim != 2:
        raise ValueError(f"probs_map must be (height, width), got shape {p.shape}")
    out = []
    values = np.unique(p)  # ascending
    for rank, level in enumerate(sorted(levels)):
        t = mass_threshold(p, level)
        below = values[values < t]
        if below.size == 0:
            continue
        alpha = 1.0 - 0.6 * rank / max(len(levels) - 1, 1)
        kw = {"colors": [matplotlib.colors.to_rgba(color, alpha)], "linewidths": 1.2, **style}
        out.append((level, ax.contour(p, levels=[(t + below[-1]) / 2], **kw)))
    return out


def quadratic_parameters(obj) -> tuple[np.ndarray, np.ndarray]:
    """Centres and spreads of quadratic attention layers, stacked over layers.

    Args:
        obj: a network with ``attention_layers()``, a list of :class:`QuadraticAttention`,
            a ``(centers, spreads)`` pair, a snapshot dict of :func:`load_snapshots`, or a dict
            with ``attention_centers``/``attention_spreads``.

    Returns:
        ``centers (L, H, 2)`` and ``spreads (L, H)`` (isotropic) or ``(L, H, 2, 2)`` (anisotropic).
    """
    if isinstance(obj, dict):
        names = ("centers", "spreads") if "centers" in obj else ("attention_centers", "attention_spreads")
        if obj.get(names[0]) is None:
            raise ValueError("the dict holds no quadratic parameters (centers / attention_centers)")
        obj = (obj[names[0]], obj[names[1]])
    if isinstance(obj, tuple) and len(obj) == 2 and not isinstance(obj[0], torch.nn.Module):
        centers, spreads = to_numpy(obj[0]), to_numpy(obj[1])
    else:
        layers = obj.attention_layers() if hasattr(obj, "attention_layers") else list(obj)
        layers = [m for m in layers if hasattr(m, "attention_centers")]
        if not layers:
            raise ValueError("no quadratic attention layer (with attention_centers) found")
        centers = np.stack([to_numpy(m.attention_centers) for m in layers])
        spreads = np.stack([to_numpy(m.attention_spreads) for m in layers])
    if centers.ndim != 3 or centers.shape[-1] != 2 or spreads.shape[:2] != centers.shape[:2] \
            or spreads.shape[2:] not in ((), (2, 2)):
        raise ValueError(f"centers must be (L, H, 2) and spreads (L, H) or (L, H, 2, 2); got "
                         f"{centers.shape} and {spreads.shape}")
    return centers, spreads


def quadratic_center_maps(centers, spreads, side: int = 16) -> np.ndarray:
    """Attention of the central query ``(side // 2, side // 2)`` for given Gaussian parameters.

    Builds one :class:`satconv.attention.quadratic.QuadraticAttention` per layer, loads the
    parameters and asks it for its probabilities (float64), so the figure shows what the model computes.

    Args:
        centers: ``(L, H, 2)``; spreads: ``(L, H)`` or ``(L, H, 2, 2)``.
        side: square grid side.

    Returns:
        ``(L, H, side, side)``; a head a layer lacks (pruned: NaN parameters, :func:`load_snapshots`) is all NaN.
    """
    from ..attention.quadratic import QuadraticAttention

    centers, spreads = quadratic_parameters((centers, spreads))
    q = query_index((side // 2, side // 2), side, side)
    maps = np.full((*centers.shape[:2], side, side), np.nan)
    for i, (mu, s) in enumerate(zip(centers, spreads)):
        present = ~np.isnan(mu).any(axis=1)
        layer = QuadraticAttention(1, int(present.sum()), isotropic=s.ndim == 1).double().eval()
        with torch.no_grad():
            layer.attention_centers.copy_(torch.from_numpy(mu[present]))
            layer.attention_spreads.copy_(torch.from_numpy(s[present]))
            maps[i, present] = layer.attention_probs(side, side)[0, :, q, :].reshape(-1, side, side).numpy()
    return maps


def _draw_heads(ax, maps: np.ndarray, levels, title: str | None = None) -> None:
    """All heads' mass contours (colour ``C{h}``) on one square grid, with the query as a red dot."""
    side = maps.shape[-1]
    for h, m in enumerate(maps):
        if not np.isnan(m).all():  # a pruned head (load_snapshots pads it with NaN) draws nothing
            gaussian_mass_contours(ax, m, levels, color=f"C{h % 10}")
    ax.set_xlim(-0.5, side - 0.5)
    ax.set_ylim(side - 0.5, -0.5)  # row 0 on top, as in imshow
    ax.set_xticks(np.arange(side) - 0.5)
    ax.set_yticks(np.arange(side) - 0.5)
    ax.tick_params(length=0, labelbottom=False, labelleft=False)
    ax.grid(True, alpha=0.3, linewidth=0.5)
    ax.set_aspect(1)
    ax.scatter([side // 2], [side // 2], c="red", s=10, zorder=3)
    if title:
        ax.set_title(title, fontsize=8)


def _panel_figure(n: int, ncols: int, size: float, title_lines: int = 0):
    """A figure of ``n`` square panels; ``title_lines`` > 1 reserves room for a multi-line suptitle."""
    ncols = min(n, ncols)
    nrows = -(-n // ncols)
    extra = 0.17 * max(title_lines - 1, 0)  # ~0.17 in per 9 pt line beyond the first
    fig = new_figure((size * ncols, size * nrows + 0.3 + extra))
    if extra:
        fig.subplots_adjust(top=1.0 - (0.45 + extra) / (size * nrows + 0.3 + extra))
    return fig, [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]


def plot_gaussian_heads(attn_layers_or_params, side: int = 16, levels: Sequence[float] = (0.5, 0.9),
                        ncols: int = 3, panel_size: float = 2.4, suptitle: str | None = None) -> Figure:
    """Paper Fig. 4 (all layers): each head's 50% and 90% mass contours around the central query.

    Args:
        attn_layers_or_params: anything :func:`quadratic_parameters` accepts.
        side: grid side (16 for CIFAR-10 tokens).
        levels: mass fractions.
        ncols: panels per row; panel_size: inches.
        suptitle: figure title.

    Returns:
        A figure with one axes per layer.
    """
    maps = quadratic_center_maps(*quadratic_parameters(attn_layers_or_params), side=side)  # (L, H, s, s)
    fig, axes = _panel_figure(len(maps), ncols, panel_size)
    for i, (ax, m) in enumerate(zip(axes, maps)):
        _draw_heads(ax, m, levels, f"layer {i + 1}")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return fig


def plot_center_evolution(snapshots: Sequence[tuple], layer: int, side: int = 16,
                          levels: Sequence[float] = (0.5, 0.9), max_panels: int = 7,
                          panel_size: float = 2.0, suptitle: str | None = None) -> Figure:
    """Paper Fig. 3: one layer's Gaussian heads at several epochs.

    Args:
        snapshots: ``[(epoch, centers (L, H, 2), spreads (L, H) or (L, H, 2, 2)), ...]`` in epoch order,
            or the dicts of :func:`load_snapshots`.
        layer: 0-based layer index (the paper shows layer 4, index 3).
        side: grid side; levels: mass fractions.
        max_panels: at most this many epochs, evenly spaced, first and last included.
        panel_size: inches.
        suptitle: a line added under the figure title ``"layer <n>"`` (e.g. where the run comes from).

    Returns:
        A figure with one axes per shown epoch.
    """
    if not snapshots:
        raise ValueError("snapshots is empty")
    pick = np.unique(np.linspace(0, len(snapshots) - 1, min(max_panels, len(snapshots))).round().astype(int))
    title = f"layer {layer + 1}" + (f"\n{suptitle}" if suptitle else "")
    fig, axes = _panel_figure(len(pick), len(pick), panel_size, title_lines=title.count("\n") + 1)
    for ax, i in zip(axes, pick):
        snap = snapshots[i]
        epoch, centers, spreads = (snap["epoch"], snap["centers"], snap["spreads"]) if isinstance(snap, dict) else snap
        centers, spreads = quadratic_parameters((centers, spreads))
        if not 0 <= layer < len(centers):
            raise ValueError(f"layer must be in [0, {len(centers)}), got {layer}")
        maps = quadratic_center_maps(centers[layer:layer + 1], spreads[layer:layer + 1], side)[0]
        _draw_heads(ax, maps, levels, f"epoch {epoch}")
    fig.suptitle(title, fontsize=9)
    return fig


def plot_center_trajectories(snapshots: Sequence, layer: int, panel_size: tuple = (3.4, 3.0),
                             suptitle: str | None = None) -> Figure:
    """Per-head trajectories of one quadratic layer over training (claim 5: record (mu, alpha)).

    Left: each head's centre ``mu`` (offset from the query, column right, row down) from its first
    snapshot (small dot) to its last (large dot).  Right: each head's precision over the epochs:
    ``alpha = s^2 / 2`` (isotropic), or the largest eigenvalue of ``Sigma^{-1} / 2`` (anisotropic).

    Args:
        snapshots: the dicts of :func:`load_snapshots` (or ``(epoch, centers, spreads)`` tuples).
        layer: 0-based layer index.
        panel_size: inches per panel.
        suptitle: figure title.

    Returns:
        A figure with two axes.
    """
    rows = [(s["epoch"], s["centers"], s["spreads"]) if isinstance(s, dict) else s for s in snapshots]
    if not rows or rows[0][1] is None:
        raise ValueError("snapshots hold no quadratic parameters")
    epochs = np.array([r[0] for r in rows])
    centers = np.stack([quadratic_parameters((c, s))[0][layer] for _, c, s in rows])  # (E, H, 2)
    spreads = np.stack([quadratic_parameters((c, s))[1][layer] for _, c, s in rows])  # (E, H) or (E, H, 2, 2)
    if spreads.ndim == 2:
        precision = spreads ** 2 / 2  # alpha
    else:
        precision = np.linalg.eigvalsh(np.einsum("ehki,ehkj->ehij", spreads, spreads))[..., -1] / 2
    fig = new_figure((panel_size[0] * 2, panel_size[1]))
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for h in range(centers.shape[1]):
        colour = f"C{h % 10}"
        ax.plot(centers[:, h, 1], centers[:, h, 0], "-", color=colour, alpha=0.6, linewidth=1)
        ax.scatter(centers[0, h, 1], centers[0, h, 0], s=8, color=colour)
        ax.scatter(centers[-1, h, 1], centers[-1, h, 0], s=30, color=colour, edgecolors="black", linewidths=0.5)
        ax2.plot(epochs, precision[:, h], "-", color=colour, linewidth=1)
    ax.scatter([0], [0], marker="+", color="red", s=60, zorder=3)
    ax.invert_yaxis()
    ax.set_aspect(1)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("column offset")
    ax.set_ylabel("row offset")
    ax.set_title(f"layer {layer + 1}: centres", fontsize=9)
    ax2.set_yscale("log")
    ax2.set_xlabel("epoch")
    ax2.set_title("precision alpha", fontsize=9)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return fig


def degenerate_heads(centers, spreads, cond_threshold: float = 1000.0, eig_threshold: float = 1e-5) -> np.ndarray:
    """``(L, H)`` bool: heads :meth:`QuadraticAttention.degenerate_heads` calls degenerate (paper App., pruning);
    a head a layer lacks (pruned: NaN parameters, :func:`load_snapshots`) is ``False``."""
    from ..attention.quadratic import QuadraticAttention

    centers, spreads = quadratic_parameters((centers, spreads))
    out = np.zeros(centers.shape[:2], dtype=bool)
    for i, (mu, s) in enumerate(zip(centers, spreads)):
        present = ~np.isnan(mu).any(axis=1)
        layer = QuadraticAttention(1, int(present.sum()), isotropic=s.ndim == 1).double()
        with torch.no_grad():
            layer.attention_spreads.copy_(torch.from_numpy(s[present]))
        out[i, present] = layer.degenerate_heads(cond_threshold, eig_threshold).numpy()
    return out
