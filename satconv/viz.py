"""Attention visualisation: the figures of arXiv 1911.03584 §4 (Figs. 3-6) and a kernel-free explorer.

Everything returns a matplotlib ``Figure`` or an ipywidgets widget and never calls ``plt.show``.

* :func:`attention_grid` draws one query pixel's attention, layers x heads (paper Figs. 5/6, the
  [Re]'s ``viz_1``).  Its input comes from :func:`query_attention` (the paper's protocol: a fixed
  query averaged over images), :func:`query_averaged_attention` (the [Re]'s ``viz``: one image,
  averaged over queries) or :func:`position_attention` (input-independent layers).
* :func:`gaussian_mass_contours`, :func:`plot_gaussian_heads` and :func:`plot_center_evolution`
  draw the 50% / 90% mass contours of quadratic heads around the central query (Figs. 3 and 4;
  epfml/attention-cnn ``utils/plotting.py``), computed by :class:`QuadraticAttention` itself.
* :func:`query_irrelevance` measures FCViT's observation (Ma et al. 2022) that attention maps are
  nearly the same for every query.
* :func:`explorer` turns precomputed PNGs into nested ``widgets.Stack``\\ s switched by
  ``widgets.jslink``: the only interactivity that survives in the static book (no kernel).
* :func:`load_snapshots`, :func:`load_atlas`, :func:`atlas_views` read what
  :func:`satconv.train.train` writes into a run directory.

Axis vocabulary: ``L`` layers, ``H`` heads, ``N = height * width`` token pixels (row-major,
``n = row * width + col``), ``B`` images.
"""
from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterable, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec

#: PNG resolution of explorer views: small, because the static book embeds every one of them
EXPLORER_DPI = 70


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _numpy(x) -> np.ndarray:
    """A tensor or array-like as a float numpy array (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.double() if x.dtype == torch.float64 else x.float()
        return x.numpy()
    return np.asarray(x, dtype=float)


def fig_to_png(fig: Figure, dpi: int = EXPLORER_DPI) -> bytes:
    """Render a figure to PNG bytes and close it (``bbox_inches="tight"``)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _new_figure(figsize) -> Figure:
    """A pyplot-managed figure (so notebooks display it once) that callers may close."""
    import matplotlib.pyplot as plt

    return plt.figure(figsize=figsize)


def query_index(query, height: int, width: int) -> int:
    """Flat index ``row * width + col`` of a query given as an int or a ``(row, col)`` pair."""
    if isinstance(query, (int, np.integer)):
        q = int(query)
    else:
        try:
            row, col = (int(v) for v in query)
        except (TypeError, ValueError):
            raise ValueError(f"query must be an int or a (row, col) pair, got {query!r}") from None
        if not (0 <= row < height and 0 <= col < width):
            raise ValueError(f"query {query!r} lies outside the {height}x{width} grid")
        q = row * width + col
    if not 0 <= q < height * width:
        raise ValueError(f"query index {q} lies outside the {height}x{width} grid (N={height * width})")
    return q


def _square_side(n: int) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"cannot infer a square grid from N={n} tokens; pass grid=(height, width)")
    return side


# ---------------------------------------------------------------------------------------------
# layers x heads grids of attention maps
# ---------------------------------------------------------------------------------------------
def _crop(map2d: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    """``(size, size)`` window centred on ``(row, col)``; pixels outside the grid are NaN."""
    r = size // 2
    padded = np.pad(map2d, r, constant_values=np.nan)
    return padded[row:row + size, col:col + size]


def _image_hwc(image) -> np.ndarray:
    """``(3, H, W)`` or ``(H, W, 3)`` (any range, e.g. normalised) -> ``(H, W, 3)`` in [0, 1]."""
    img = _numpy(image)
    if img.ndim != 3:
        raise ValueError(f"image must be (3, H, W) or (H, W, 3), got shape {img.shape}")
    if img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.transpose(1, 2, 0)
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def attention_grid(probs, height: int, width: int, query=None, image=None, row_titles=None, col_titles=None,
                   crop: int | None = None, suptitle: str | None = None, cmap: str = "viridis",
                   panel_size: float = 1.0) -> Figure:
    """Heatmaps of one query pixel's attention for every layer (rows) and head (columns).

    Each panel is scaled to its own maximum, so broad and sharp heads are both visible.

    Args:
        probs: ``(L, H, N)`` attention of one query over the ``N = height * width`` keys
            (from :func:`query_attention`, :func:`query_averaged_attention` or :func:`position_attention`).
        height, width: token grid.
        query: int or ``(row, col)``; marked with a red dot (and a red box on ``image``), or ``None``.
        image: optional ``(3, H_img, W_img)`` or ``(H_img, W_img, 3)`` image drawn left of the first row.
        row_titles: ``L`` labels (default ``"layer 1"`` ...); col_titles: ``H`` labels (``"head 1"`` ...).
        crop: show only a ``crop x crop`` window centred on ``query`` (paper Fig. 5 zooms to 7x7).
        suptitle: figure title.
        cmap: colour map.
        panel_size: inches per panel.

    Returns:
        A figure with ``L * H`` heatmap axes (plus one for ``image``).
    """
    p = _numpy(probs)
    if p.ndim != 3 or p.shape[-1] != height * width:
        raise ValueError(f"probs must be (layers, heads, {height}*{width}), got shape {p.shape}")
    if crop is not None and (query is None or crop < 1):
        raise ValueError(f"crop needs a query and a positive size, got crop={crop}, query={query!r}")
    n_layers, n_heads, _ = p.shape
    q = None if query is None else query_index(query, height, width)
    qr, qc = (None, None) if q is None else divmod(q, width)
    extra = image is not None
    fig = _new_figure((panel_size * (n_heads + extra) + 0.6, panel_size * n_layers + 0.5))
    gs = GridSpec(n_layers, n_heads + extra, figure=fig, wspace=0.08, hspace=0.08)
    row_titles = row_titles or [f"layer {i + 1}" for i in range(n_layers)]
    col_titles = col_titles or [f"head {j + 1}" for j in range(n_heads)]
    if extra:
        img = _image_hwc(image)
        ax = fig.add_subplot(gs[0, 0])
        ax.imshow(img)
        if q is not None:
            sy, sx = img.shape[0] / height, img.shape[1] / width
            ax.add_patch(matplotlib.patches.Rectangle((qc * sx - 0.5, qr * sy - 0.5), sx, sy, fill=False,
                                                      edgecolor="red", linewidth=1.5))
        ax.set_axis_off()
    for i, j in itertools.product(range(n_layers), range(n_heads)):
        ax = fig.add_subplot(gs[i, j + extra])
        m = p[i, j].reshape(height, width)
        mark = (qr, qc)
        if crop is not None:
            m, mark = _crop(m, qr, qc, crop), (crop // 2, crop // 2)
        ax.imshow(m, cmap=cmap, vmin=0.0, vmax=max(np.nanmax(m), 1e-12), interpolation="nearest")
        if q is not None:
            ax.scatter([mark[1]], [mark[0]], s=6, c="red", marker="o", linewidths=0)
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
            ax.set_title(col_titles[j], fontsize=7)
        if j == 0:
            ax.set_ylabel(row_titles[i], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------
# attention of a trained model: the two averaging protocols
# ---------------------------------------------------------------------------------------------
def _attention_batches(model: torch.nn.Module, images: torch.Tensor, batch_size: int):
    """Yield ``(batch_len, [probs per layer])`` in eval mode under ``torch.inference_mode``.

    Args:
        model: ``model(images, return_attention=True) -> (logits, [probs (B or 1, H, N, N)])``.
        images: ``(B, C, H_img, W_img)``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch_size):
                batch = images[start:start + batch_size].to(device)
                _, probs = model(batch, return_attention=True)
                if any(pr is None for pr in probs):
                    raise ValueError("the model returned no probabilities for some layer")
                yield batch.shape[0], probs
    finally:
        model.train(was_training)


def query_attention(model: torch.nn.Module, images: torch.Tensor, query, grid: tuple[int, int] | None = None,
                    batch_size: int = 16) -> np.ndarray:
    """The paper's protocol (Fig. 6): attention of one FIXED query pixel, averaged over images.

    Heads that attend at a fixed shift keep a sharp peak at ``query + shift`` after averaging,
    while content-driven heads blur out; the average over 100 test images separates the two.

    Args:
        model: network with ``model(images, return_attention=True) -> (logits, [probs per layer])``,
            probs ``(B or 1, H, N, N)``; run in eval mode (restored afterwards), batched.
        images: ``(B, C, H_img, W_img)`` normalised images.
        query: flat index or ``(row, col)`` on the token grid.
        grid: ``(height, width)`` token grid; ``None`` = square, inferred from ``N``.
        batch_size: images per forward pass (the probabilities of all layers are held at once).

    Returns:
        ``(L, H, N)`` float array; each row sums to 1 for softmax attention.
    """
    total, count = None, 0
    for b, probs in _attention_batches(model, images, batch_size):
        n = probs[0].shape[-1]
        height, width = grid or (_square_side(n),) * 2
        q = query_index(query, height, width)
        rows = torch.stack([pr[:, :, q, :].float().expand(b, -1, -1).sum(0) for pr in probs])  # (L, H, N)
        total = rows if total is None else total + rows
        count += b
    return (total / count).cpu().numpy()


def query_averaged_attention(model: torch.nn.Module, image: torch.Tensor) -> np.ndarray:
    """The [Re]'s protocol (``viz``): attention of ONE image averaged over all its query pixels.

    Not the paper's Fig. 6.  Averaging over queries turns a fixed-shift (conv-like) head, whose
    map for query ``q`` is a peak at ``q + shift``, into an almost flat smear over the image
    (every key is hit by some query), so the localised structure the paper shows disappears;
    compare :func:`query_attention`.

    Args:
        model: as in :func:`query_attention`.
        image: ``(C, H_img, W_img)`` or ``(1, C, H_img, W_img)``.

    Returns:
        ``(L, H, N)``: ``mean_q probs[l][0, h, q, :]``.
    """
    images = image[None] if image.ndim == 3 else image
    if images.shape[0] != 1:
        raise ValueError(f"image must be a single image, got batch of {images.shape[0]}")
    (_, probs), = list(_attention_batches(model, images, 1))
    return torch.stack([pr[0].float().mean(dim=-2) for pr in probs]).cpu().numpy()  # (L, H, N)


def _position_layers(model) -> list:
    layers = model.attention_layers() if hasattr(model, "attention_layers") else list(model)
    fixed = [m for m in layers if getattr(m, "input_independent", False)]
    if not fixed:
        raise ValueError("no input-independent attention layer (quadratic or learned position_only) found")
    return fixed


def position_attention(model, side: int = 16, query=None) -> np.ndarray:
    """Position-only attention of one query for every input-independent layer (no image needed).

    Args:
        model: a network with ``attention_layers()`` or a list of layers with ``attention_probs``
            (quadratic, learned ``position_only``); other layers are skipped.
        side: square token grid side.
        query: flat index or ``(row, col)``; ``None`` = the centre ``(side // 2, side // 2)``.

    Returns:
        ``(L, H, side * side)``.
    """
    q = query_index((side // 2, side // 2) if query is None else query, side, side)
    with torch.no_grad():
        return np.stack([_numpy(m.attention_probs(side, side)[0, :, q, :]) for m in _position_layers(model)])


def learned_position_maps(model, side: int = 16, zoom: int | None = 7, reorder: bool = True, **grid_kw) -> Figure:
    """Paper Fig. 5: position-only attention of the centre query, layers x heads.

    Args:
        model: see :func:`position_attention` (learned relative ``position_only`` or quadratic).
        side: token grid side (16 for CIFAR-10 after 2x2 down-sampling).
        zoom: window size around the query (the paper zooms to 7x7), ``None`` = whole grid.
        reorder: sort each layer's heads by the offset of their peak (row, then column), as the
            paper reorders heads; column titles then give the head's original number.
        grid_kw: passed to :func:`attention_grid`.

    Returns:
        The figure of :func:`attention_grid`.
    """
    maps = position_attention(model, side)  # (L, H, N)
    if reorder:
        order = np.argsort(maps.argmax(-1), axis=-1, kind="stable")  # flat argmax sorts by (row, col)
        maps = np.take_along_axis(maps, order[..., None], axis=1)
        grid_kw.setdefault("col_titles", [""] * maps.shape[1])
    center = (side // 2, side // 2)
    return attention_grid(maps, side, side, query=center, crop=zoom, **grid_kw)


# ---------------------------------------------------------------------------------------------
# Gaussian (quadratic) heads: mass contours, Figs. 3 and 4
# ---------------------------------------------------------------------------------------------
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
    p = np.sort(_numpy(probs_map).ravel())[::-1]  # descending
    cum = np.cumsum(p)
    i = int(np.searchsorted(cum, level * cum[-1] * (1 - 1e-12)))  # first index with cum >= level
    return float(p[min(i, p.size - 1)])


def mass_region(probs_map, level: float) -> np.ndarray:
    """Boolean mask (same shape) of the smallest region holding ``level`` of the mass (see :func:`mass_threshold`)."""
    p = _numpy(probs_map)
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
    p = _numpy(probs_map)
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
            a ``(centers, spreads)`` pair, or a dict with ``attention_centers``/``attention_spreads``.

    Returns:
        ``centers (L, H, 2)`` and ``spreads (L, H)`` (isotropic) or ``(L, H, 2, 2)`` (anisotropic).
    """
    if isinstance(obj, dict):
        obj = (obj["attention_centers"], obj["attention_spreads"])
    if isinstance(obj, tuple) and len(obj) == 2 and not isinstance(obj[0], torch.nn.Module):
        centers, spreads = _numpy(obj[0]), _numpy(obj[1])
    else:
        layers = obj.attention_layers() if hasattr(obj, "attention_layers") else list(obj)
        layers = [m for m in layers if hasattr(m, "attention_centers")]
        if not layers:
            raise ValueError("no quadratic attention layer (with attention_centers) found")
        centers = np.stack([_numpy(m.attention_centers) for m in layers])
        spreads = np.stack([_numpy(m.attention_spreads) for m in layers])
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
        ``(L, H, side, side)``.
    """
    from .attention.quadratic import QuadraticAttention

    centers, spreads = quadratic_parameters((centers, spreads))
    q = query_index((side // 2, side // 2), side, side)
    maps = []
    for mu, s in zip(centers, spreads):
        layer = QuadraticAttention(1, mu.shape[0], isotropic=s.ndim == 1).double().eval()
        with torch.no_grad():
            layer.attention_centers.copy_(torch.from_numpy(mu))
            layer.attention_spreads.copy_(torch.from_numpy(s))
            maps.append(layer.attention_probs(side, side)[0, :, q, :].reshape(-1, side, side).numpy())
    return np.stack(maps)


def _draw_heads(ax, maps: np.ndarray, levels, title: str | None = None) -> None:
    """All heads' mass contours (colour ``C{h}``) on one square grid, with the query as a red dot."""
    side = maps.shape[-1]
    for h, m in enumerate(maps):
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


def _panel_figure(n: int, ncols: int, size: float):
    ncols = min(n, ncols)
    nrows = -(-n // ncols)
    fig = _new_figure((size * ncols, size * nrows + 0.3))
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
                          panel_size: float = 2.0) -> Figure:
    """Paper Fig. 3: one layer's Gaussian heads at several epochs.

    Args:
        snapshots: ``[(epoch, centers (L, H, 2), spreads (L, H) or (L, H, 2, 2)), ...]`` in epoch order.
        layer: 0-based layer index (the paper shows layer 4, index 3).
        side: grid side; levels: mass fractions.
        max_panels: at most this many epochs, evenly spaced, first and last included.
        panel_size: inches.

    Returns:
        A figure with one axes per shown epoch.
    """
    if not snapshots:
        raise ValueError("snapshots is empty")
    pick = np.unique(np.linspace(0, len(snapshots) - 1, min(max_panels, len(snapshots))).round().astype(int))
    fig, axes = _panel_figure(len(pick), len(pick), panel_size)
    for ax, i in zip(axes, pick):
        epoch, centers, spreads = snapshots[i]
        centers, spreads = quadratic_parameters((centers, spreads))
        if not 0 <= layer < len(centers):
            raise ValueError(f"layer must be in [0, {len(centers)}), got {layer}")
        maps = quadratic_center_maps(centers[layer:layer + 1], spreads[layer:layer + 1], side)[0]
        _draw_heads(ax, maps, levels, f"epoch {epoch}")
    fig.suptitle(f"layer {layer + 1}", fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------
# FCViT's query-irrelevance
# ---------------------------------------------------------------------------------------------
def _selected_queries(height: int, width: int, margin: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    keep = (rows >= margin) & (rows < height - margin) & (cols >= margin) & (cols < width - margin)
    if not keep.any():
        raise ValueError(f"margin={margin} leaves no query in a {height}x{width} grid")
    return keep.flatten().nonzero().squeeze(1)


def query_irrelevance(probs, aligned: bool = False, margin: int = 0, grid: tuple[int, int] | None = None) -> np.ndarray:
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

    Args:
        probs: ``(B or 1, H, N, N)`` probabilities, rows = queries (``N = height * width``).
        aligned: compare query-centred maps instead of raw maps.
        margin: skip queries closer than ``margin`` pixels to the border (both variants).
        grid: ``(height, width)``; ``None`` = square.

    Returns:
        ``(H,)`` scores in [0, 1].
    """
    p = probs if isinstance(probs, torch.Tensor) else torch.tensor(np.array(probs, dtype=float))
    p = p.detach().cpu().double()
    if p.ndim != 4 or p.shape[-1] != p.shape[-2]:
        raise ValueError(f"probs must be (B, H, N, N), got shape {tuple(p.shape)}")
    n = p.shape[-1]
    height, width = grid or (_square_side(n),) * 2
    if height * width != n:
        raise ValueError(f"grid {height}x{width} does not match N={n}")
    queries = _selected_queries(height, width, margin)
    if aligned:
        rows, cols = torch.arange(n) // width, torch.arange(n) % width
        d_row = rows[None, :] - rows[queries][:, None] + height - 1  # (Nq, N): key - query, shifted >= 0
        d_col = cols[None, :] - cols[queries][:, None] + width - 1
        index = d_row * (2 * width - 1) + d_col  # (Nq, N) flat offset index, injective per query
        n_offsets = (2 * height - 1) * (2 * width - 1)
    scores = []
    for pb in p:  # (H, N, N), one image at a time to bound memory
        maps = pb[:, queries, :]  # (H, Nq, N)
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
    for b, probs in _attention_batches(model, images, batch_size):
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
    fig = _new_figure((panel_size[0] * len(panels), panel_size[1]))
    rng = np.random.default_rng(0)  # jitter only
    for k, (title, data) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for c, (name, s) in enumerate(data.items()):
            s = _numpy(s)
            layers = np.arange(1, s.shape[0] + 1)
            x = layers[:, None] + rng.uniform(-0.12, 0.12, s.shape) + 0.06 * (c - (len(data) - 1) / 2)
            ax.scatter(x.ravel(), s.ravel(), s=8, color=f"C{c}", alpha=0.5, linewidths=0)
            ax.plot(layers, s.mean(1), "-o", color=f"C{c}", label=name, markersize=3)
        ax.set_xlabel("layer")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(title, fontsize=9)
        if k == 0:
            ax.set_ylabel("mean TV distance to the query-averaged map")
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# kernel-free explorer
# ---------------------------------------------------------------------------------------------
def explorer(views: dict, axes: Sequence[tuple[str, Sequence]], dropdown: Iterable[str] = (),
             image_width: str | None = None):
    """A widget that switches precomputed PNGs with ``jslink`` only (works in the static book).

    The views form nested ``widgets.Stack``\\ s, one nesting level per axis (outermost = first):
    level ``j`` holds ``prod(len(values_i) for i < j)`` stacks, each with ``len(values_j)`` children;
    the innermost children are ``widgets.Image``\\ s.  Each axis gets one ``SelectionSlider`` (or a
    ``Dropdown`` for names in ``dropdown``), and its ``index`` is ``jslink``\\ ed to the
    ``selected_index`` of EVERY stack at its level, so the browser switches images without a kernel.

    Args:
        views: ``{(v0, v1, ...): png_bytes}`` for every combination of the axis values.
        axes: ``[(name, values), ...]``, e.g. ``[("layer", [1, 2]), ("query", ["(7, 8)", "(3, 3)"])]``.
        dropdown: axis names shown as a dropdown instead of a slider.
        image_width: CSS width of the images (e.g. ``"600px"``), ``None`` = natural size.

    Returns:
        ``widgets.VBox([controls..., stack])`` with attributes ``controls`` (one per axis),
        ``stacks`` (list per level) and ``links`` (the ``jslink`` objects).
    """
    import ipywidgets as widgets

    if not axes:
        raise ValueError("axes must name at least one (name, values) pair")
    names = [name for name, _ in axes]
    values = [list(vals) for _, vals in axes]
    if any(not v for v in values):
        raise ValueError(f"every axis needs at least one value, got {dict(zip(names, values))}")
    missing = [key for key in itertools.product(*values) if key not in views]
    if missing:
        raise ValueError(f"views lacks {len(missing)} of the axis combinations, e.g. {missing[:3]}")
    unknown = set(dropdown) - set(names)
    if unknown:
        raise ValueError(f"dropdown names unknown axes {sorted(unknown)}; axes are {names}")
    layout = {} if image_width is None else {"layout": widgets.Layout(width=image_width)}
    stacks: list[list] = [[] for _ in axes]

    def build(prefix: tuple, depth: int):
        if depth == len(axes):
            return widgets.Image(value=views[prefix], format="png", **layout)
        stack = widgets.Stack([build(prefix + (v,), depth + 1) for v in values[depth]], selected_index=0)
        stacks[depth].append(stack)
        return stack

    root = build((), 0)
    controls, links = [], []
    for depth, (name, vals) in enumerate(zip(names, values)):
        labels = [str(v) for v in vals]
        if len(set(labels)) != len(labels):
            raise ValueError(f"axis {name!r} has values with equal labels: {labels}")
        options = list(zip(labels, range(len(labels))))
        cls = widgets.Dropdown if name in dropdown else widgets.SelectionSlider
        control = cls(options=options, description=name, style={"description_width": "initial"})
        controls.append(control)
        links += [widgets.jslink((control, "index"), (stack, "selected_index")) for stack in stacks[depth]]
    box = widgets.VBox([*controls, root])
    box.controls, box.stacks, box.links = controls, stacks, links
    return box
