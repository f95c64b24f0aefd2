"""Attention maps of one query pixel: layers x heads grids and the two averaging protocols.

:func:`attention_grid` draws paper Figs. 5/6 and the [Re]'s ``viz_1``; :func:`query_attention`
is the paper's protocol (a fixed query averaged over images, Fig. 6), :func:`query_averaged_attention`
the [Re]'s ``viz`` (one image averaged over queries); :func:`position_attention` and
:func:`learned_position_maps` read input-independent layers (Fig. 5).
"""
from __future__ import annotations

import itertools

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec

from .common import new_figure, to_numpy, square_side, query_index


def _crop(map2d: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    """``(size, size)`` window centred on ``(row, col)``; pixels outside the grid are NaN."""
    r = size // 2
    padded = np.pad(map2d, r, constant_values=np.nan)
    return padded[row:row + size, col:col + size]


def _image_hwc(image) -> np.ndarray:
    """``(3, H, W)`` or ``(H, W, 3)`` (any range, e.g. normalised) -> ``(H, W, 3)`` in [0, 1]."""
    img = to_numpy(image)
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
        query: int or ``(row, col)``; marked with a red dot (and a white box on ``image``), or ``None``.
        image: optional ``(3, H_img, W_img)`` or ``(H_img, W_img, 3)`` image drawn left of the first row.
        row_titles: ``L`` labels (default ``"layer 1"`` ...); col_titles: ``H`` labels (``"head 1"`` ...).
        crop: show only a ``crop x crop`` window centred on ``query`` (paper Fig. 5 zooms to 7x7).
        suptitle: figure title.
        cmap: colour map.
        panel_size: inches per panel.

    Returns:
        A figure with ``L * H`` heatmap axes (plus one for ``image``).
    """
    p = to_numpy(probs)
    if p.ndim != 3 or p.shape[-1] != height * width:
        raise ValueError(f"probs must be (layers, heads, {height}*{width}), got shape {p.shape}")
    if crop is not None and (query is None or crop < 1):
        raise ValueError(f"crop needs a query and a positive size, got crop={crop}, query={query!r}")
    n_layers, n_heads, _ = p.shape
    q = None if query is None else query_index(query, height, width)
    qr, qc = (None, None) if q is None else divmod(q, width)
    extra = 2 if image is not None else 0  # image column + a spacer for the row titles
    title_lines = suptitle.count("\n") + 1 if suptitle else 0
    height_in = panel_size * n_layers + 0.5 + 0.17 * title_lines  # a title line is ~0.17 in at 9 pt
    fig = new_figure((panel_size * (n_heads + 1.4 * (extra > 0)) + 0.6, height_in))
    # with a title, keep the column titles (~0.3 in) and the title's lines clear of each other
    top = {"top": 1.0 - (0.3 + 0.17 * title_lines) / height_in} if suptitle else {}
    gs = GridSpec(n_layers, n_heads + extra, figure=fig, wspace=0.08, hspace=0.08,
                  width_ratios=[1.0, 0.4][:extra] + [1.0] * n_heads, **top)
    row_titles = row_titles or [f"layer {i + 1}" for i in range(n_layers)]
    col_titles = col_titles or [f"head {j + 1}" for j in range(n_heads)]
    if extra:
        img = _image_hwc(image)
        ax = fig.add_subplot(gs[0, 0])
        ax.imshow(img)
        if q is not None:
            sy, sx = img.shape[0] / height, img.shape[1] / width
            for colour, lw in (("black", 2.5), ("white", 1.2)):  # visible on any image
                ax.add_patch(matplotlib.patches.Rectangle((qc * sx - 0.5, qr * sy - 0.5), sx, sy, fill=False,
                                                          edgecolor=colour, linewidth=lw))
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


def attention_batches(model: torch.nn.Module, images: torch.Tensor, batch_size: int):
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
    for b, probs in attention_batches(model, images, batch_size):
        n = probs[0].shape[-1]
        height, width = grid or (square_side(n),) * 2
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
    (_, probs), = list(attention_batches(model, images, 1))
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
        return np.stack([to_numpy(m.attention_probs(side, side)[0, :, q, :]) for m in _position_layers(model)])


def learned_position_maps(model, side: int = 16, zoom: int | None = 7, reorder: bool = True, **grid_kw) -> Figure:
    """Paper Fig. 5: position-only attention of the centre query, layers x heads.

    Args:
        model: see :func:`position_attention` (learned relative ``position_only`` or quadratic),
            or the maps themselves, ``(L, H, side * side)`` (e.g. a snapshot's ``centre_probs``).
        side: token grid side (16 for CIFAR-10 after 2x2 down-sampling).
        zoom: window size around the query (the paper zooms to 7x7), ``None`` = whole grid.
        reorder: sort each layer's heads by the offset of their peak (row, then column), as the
            paper reorders heads; column titles then give the head's original number.
        grid_kw: passed to :func:`attention_grid`.

    Returns:
        The figure of :func:`attention_grid`.
    """
    if isinstance(model, (np.ndarray, torch.Tensor)):
        maps = to_numpy(model)
    else:
        maps = position_attention(model, side)  # (L, H, N)
    if reorder:
        order = np.argsort(maps.argmax(-1), axis=-1, kind="stable")  # flat argmax sorts by (row, col)
        maps = np.take_along_axis(maps, order[..., None], axis=1)
        grid_kw.setdefault("col_titles", [""] * maps.shape[1])
    center = (side // 2, side // 2)
    return attention_grid(maps, side, side, query=center, crop=zoom, **grid_kw)
