"""How convolution-like is a layer of attention heads? A score from the theorem's own picture.

Theorem 1 of arXiv 1911.03584 builds a ``K x K`` convolution from ``N_h = K^2`` heads, head ``h`` putting all its
attention on one shift ``Delta^(h)`` of the grid ``{-p..p}^2`` (``p = (K - 1) / 2``, :func:`satconv.theory.kernel_shifts`).
This module measures how close a layer's attention is to that picture.

For head ``h`` with probabilities ``A^(h)_{q,k}`` (query ``q``, key ``k``, pixels of an ``H x W`` grid) the
**shift profile** is the mass on each relative shift ``delta = k - q``, averaged over the interior queries
``Q_r`` (those whose ``(2r + 1) x (2r + 1)`` neighbourhood lies inside the image, as in the theorem, which
ignores borders)::

    m_h(delta) = 1/|Q_r| sum_{q in Q_r} A^(h)_{q, q + delta},        |delta_row|, |delta_col| <= r

Each head's most-attended shift is ``argmax_delta m_h(delta)`` and its **concentration** the mass there.  The
**assignment** is the one-to-one matching ``sigma`` of heads to the ``K^2`` grid shifts that maximises
``sum_h m_h(sigma(h))`` (the Hungarian method), and the **score** is the fraction of a ``K x K`` convolution
the layer realises::

    score = 1/K^2 sum_{Delta in grid, matched} m_{sigma^-1(Delta)}(Delta)   in [0, 1]

It is 1 exactly when ``K^2`` heads each put all their (interior) mass on a distinct grid shift, the theorem's
layer; ``1/N`` for uniform attention (``N = H W``, with at least ``K^2`` heads); ``1/K^2`` when all heads share
one shift.  With fewer heads than ``K^2`` some shifts stay unmatched and count 0 (``heads_short`` says how
many).  Permuting the heads does not change it.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

__all__ = ["fitting_radius", "shift_profile", "score_profile", "conv_likeness", "conv_likeness_per_image",
           "atlas_conv_likeness", "snapshot_conv_likeness", "max_assignment", "quadratic_snapshot_scores"]


def max_assignment(mass: np.ndarray) -> np.ndarray:
    """The one-to-one assignment of rows to columns with the largest total (Hungarian method, O(n^2 m)).

    Args:
        mass: ``(n, m)`` finite weights.

    Returns:
        ``(min(n, m), 2)`` int array of ``(row, column)`` pairs, sorted by row: every row matched when
        ``n <= m``, every column when ``n > m``, no row or column twice, the sum of ``mass`` over the pairs
        maximal.

    Raises:
        ValueError: not a 2-D array, or a non-finite weight.
    """
    mass = np.asarray(mass, dtype=float)
    if mass.ndim != 2:
        raise ValueError(f"mass must be 2-D (rows, columns), got shape {mass.shape}")
    if not np.isfinite(mass).all():
        raise ValueError("mass must be finite")
    transposed = mass.shape[0] > mass.shape[1]
    cost = -(mass.T if transposed else mass)  # minimise the cost of matching every one of n <= m rows
    n, m = cost.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    match = np.zeros(m + 1, dtype=int)  # match[j] = row (1-based) matched to column j; 0: free
    way = np.zeros(m + 1, dtype=int)
    for i in range(1, n + 1):  # add row i along a shortest augmenting path (potentials u, v)
        match[0], j0 = i, 0
        minv, used = np.full(m + 1, np.inf), np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = match[j0]
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            better = ~used[1:] & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            free = np.where(~used[1:])[0] + 1
            j1 = free[np.argmin(minv[free])]
            delta = minv[j1]
            u[match[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:  # flip the path
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    pairs = np.array([(match[j] - 1, j - 1) for j in range(1, m + 1) if match[j]], dtype=int).reshape(-1, 2)
    if transposed:
        pairs = pairs[:, ::-1]
    return pairs[np.argsort(pairs[:, 0])]


def fitting_radius(height: int, width: int, radius: int) -> int:
    """``radius``, or less on a grid too small for it: the largest with an interior query, ``(min(h, w) - 1) // 2``
    (the radius the atlases and snapshots store their profiles at, and the estimates from older ones use)."""
    return min(radius, (min(height, width) - 1) // 2)


def shift_profile(probs, height: int, width: int, radius: int, queries=None) -> tuple[np.ndarray, int]:
    """Each head's mass on each relative shift, ``m_h(delta)`` of the module docstring, averaged over queries.

    Args:
        probs: ``(heads, N, N)`` attention probabilities (rows: queries, columns: keys, ``N = height * width``,
            pixels row-major), or ``(heads, Q, N)`` rows for the flat query pixels ``queries`` only (an atlas's
            ``probs``); a tensor or array; a leading batch axis of 1 is accepted.
        height, width: the grid.
        radius: ``r >= 0``, the largest shift in each axis.
        queries: ``None`` (all ``N`` rows given) or ``(Q,)`` flat indices of the given rows.

    Returns:
        ``(profile, count)``: ``profile`` ``(heads, 2r+1, 2r+1)`` float64, index ``[h, r + d_row, r + d_col]``,
        averaged over the ``count`` given queries that are interior (their ``(2r+1) x (2r+1)`` neighbourhood
        inside the grid).

    Raises:
        ValueError: a bad shape, a negative radius, or no interior query among those given.
    """
    p = torch.as_tensor(probs).detach().to("cpu", torch.float64)
    if p.dim() == 4 and p.shape[0] == 1:
        p = p[0]
    n = height * width
    q = torch.arange(n) if queries is None else torch.as_tensor(queries).long().flatten()
    if p.dim() != 3 or p.shape[1:] != (len(q), n):
        raise ValueError(f"probs must be (heads, {'N' if queries is None else 'Q'}, N) with N = {height} * {width} "
                         f"= {n}{'' if queries is None else f', Q = {len(q)}'}, got {tuple(p.shape)}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    row, col = q // width, q % width
    inside = (row >= radius) & (row < height - radius) & (col >= radius) & (col < width - radius)
    if not inside.any():
        raise ValueError(f"no query (of those given) of the {height}x{width} grid has its radius-{radius} "
                         f"neighbourhood inside it; lower radius or kernel_size")
    rows, qr, qc = p[:, inside].view(p.shape[0], -1, height, width), row[inside], col[inside]
    side = 2 * radius + 1
    profile = torch.empty(p.shape[0], side, side, dtype=torch.float64)
    picks = torch.arange(len(qr))
    for dr, dc in itertools.product(range(-radius, radius + 1), repeat=2):
        profile[:, dr + radius, dc + radius] = rows[:, picks, qr + dr, qc + dc].mean(dim=1)
    return profile.numpy(), int(inside.sum())


def score_profile(profile, kernel_size: int = 3) -> dict:
    """Shifts, concentration, assignment and score (module docstring) of a shift profile.

    Args:
        profile: ``(heads, 2r+1, 2r+1)`` from :func:`shift_profile`.
        kernel_size: ``K``, odd, >= 1, with ``(K - 1) / 2 <= r``.

    Returns:
        ``shifts`` ``(heads, 2)`` each head's most-attended shift ``(d_row, d_col)``; ``concentration`` ``(heads,)``
        its mass there; ``assignment`` ``(min(heads, K^2), 2)`` of ``(head, grid index)`` pairs, grid index
        ``a * K + c`` for the shift ``(a - p, c - p)`` (:func:`satconv.theory.kernel_shifts` order);
        ``assigned_mass`` ``(min(heads, K^2),)``; ``score`` (float in [0, 1]); ``heads_short``
        (``max(0, K^2 - heads)``); ``kernel_size``; ``radius``.
    """
    profile = np.asarray(profile, dtype=np.float64)
    if profile.ndim != 3 or profile.shape[1] != profile.shape[2] or profile.shape[1] % 2 == 0:
        raise ValueError(f"profile must be (heads, 2r+1, 2r+1), got {profile.shape}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
    heads, side = profile.shape[:2]
    radius, half = side // 2, (kernel_size - 1) // 2
    if radius < half:
        raise ValueError(f"radius must be >= (kernel_size - 1) / 2 = {half}, got {radius}")
    flat = profile.reshape(heads, -1)
    best = flat.argmax(1)
    shifts = np.stack([best // side - radius, best % side - radius], axis=1)
    taps = [(a - half + radius) * side + (c - half + radius) for a in range(kernel_size) for c in range(kernel_size)]
    on_grid = flat[:, taps]  # (heads, K^2): mass of each head on each grid shift
    pairs = max_assignment(on_grid)
    assigned = on_grid[pairs[:, 0], pairs[:, 1]]
    return {"shifts": shifts, "concentration": flat[np.arange(heads), best], "assignment": pairs,
            "assigned_mass": assigned, "score": float(assigned.sum() / kernel_size ** 2),
            "heads_short": max(0, kernel_size ** 2 - heads), "kernel_size": kernel_size, "radius": radius}


def conv_likeness(probs, height: int, width: int, kernel_size: int = 3, radius: int | None = None,
                  queries=None) -> dict:
    """The convolution-likeness of one layer's heads (module docstring): :func:`score_profile` of
    :func:`shift_profile`.

    Args:
        probs: ``(heads, N, N)`` attention probabilities, or ``(heads, Q, N)`` with ``queries`` (as in
            :func:`shift_profile`).
        height, width: the grid.
        kernel_size: ``K``, odd, >= 1: the convolution compared with (``K^2`` grid shifts).
        radius: ``r``, the largest shift the profile covers in each axis (``None``: ``K - 1``, twice the
            kernel's reach, so that a head centred just outside the grid is seen); ``r >= (K - 1) / 2``.
        queries: ``None`` or the flat query pixels of the rows of ``probs``.

    Returns:
        :func:`score_profile`'s dict plus ``shift_profile`` ``(heads, 2r+1, 2r+1)`` and ``queries`` (how many
        interior queries it averages).

    Raises:
        ValueError: a bad shape, an even or non-positive ``K``, a radius below ``(K - 1) / 2``, or no interior
            query for that radius.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
    radius = kernel_size - 1 if radius is None else radius
    if radius < (kernel_size - 1) // 2:
        raise ValueError(f"radius must be >= (kernel_size - 1) / 2 = {(kernel_size - 1) // 2}, got {radius}")
    profile, count = shift_profile(probs, height, width, radius, queries)
    return {"shift_profile": profile, "queries": count, **score_profile(profile, kernel_size)}


def conv_likeness_per_image(probs, height: int, width: int, kernel_size: int = 3, radius: int | None = None) -> dict:
    """Content-based attention: the score of the attention averaged over images (the paper's Fig. 6 protocol)
    and of each image's own attention, and their spread.

    Args:
        probs: ``(images, heads, N, N)`` probabilities of one layer for a batch of images.
        height, width, kernel_size, radius: as in :func:`conv_likeness`.

    Returns:
        ``mean_attention``: :func:`conv_likeness` of the image-averaged probabilities; ``per_image``: ``(images,)``
        the score of each image; ``per_image_mean`` and ``per_image_std`` (population) of those scores.  A layer
        can be convolution-like on average while each image's attention is not (``per_image_mean`` well below
        the averaged score).
    """
    p = torch.as_tensor(probs).detach().to("cpu", torch.float64)
    if p.dim() != 4:
        raise ValueError(f"probs must be (images, heads, N, N), got {tuple(p.shape)}")
    per_image = np.array([conv_likeness(p[i], height, width, kernel_size, radius)["score"] for i in range(len(p))])
    return {"mean_attention": conv_likeness(p.mean(0), height, width, kernel_size, radius), "per_image": per_image,
            "per_image_mean": float(per_image.mean()), "per_image_std": float(per_image.std())}



def atlas_conv_likeness(atlas: dict, kernel_size: int = 3) -> list[dict]:
    """The score of every layer of a trained run, from its atlas (:func:`satconv.atlas.build_atlas`).

    An atlas with ``shift_profile`` holds each layer's profile over all interior queries, per image for a
    content-based layer; an older atlas holds only the rows of its few query pixels (``probs``,
    ``query_index``), and the profile is then averaged over those of them that are interior: an estimate.

    Args:
        atlas: :func:`satconv.atlas.load_atlas` of a run.
        kernel_size: ``K`` of :func:`score_profile`.

    Returns:
        Per layer a dict: ``score`` (the attention averaged over the atlas's images, the paper's Fig. 6
        protocol; for an input-independent layer, its one attention), ``per_image`` (``(A,)`` scores, ``None``
        for an input-independent layer), ``images`` (``A``), ``queries`` (``"all"``, or how many interior atlas
        queries), ``input_independent``, and the :func:`score_profile` dict of the averaged profile as ``detail``.
    """
    out = []
    for layer, independent in enumerate(atlas["input_independent"]):
        if "shift_profile" in atlas:
            profiles, queries = atlas["shift_profile"][layer].double().numpy(), "all"
        else:
            (h, w), probs = atlas["grid"][layer], atlas["probs"][layer]
            radius = fitting_radius(h, w, kernel_size - 1)
            rows = probs[:1] if independent else probs  # (A, heads, Q, N)
            found = [shift_profile(p, h, w, radius, atlas["query_index"][layer]) for p in rows]
            profiles, queries = np.stack([f[0] for f in found]), found[0][1]
        detail = score_profile(profiles.mean(0), kernel_size)
        per_image = None if independent else np.array([score_profile(p, kernel_size)["score"] for p in profiles])
        out.append({"score": detail["score"], "per_image": per_image, "images": len(profiles), "queries": queries,
                    "input_independent": bool(independent), "detail": detail})
    return out


def snapshot_conv_likeness(snapshots, height: int, width: int, kernel_size: int = 3) -> tuple[np.ndarray, object]:
    """The score of every layer at every snapshot of a run, for any attention (the snapshots' image).

    A snapshot with ``shift_profile`` (:func:`satconv.atlas.attention_snapshot`) holds each layer's profile over
    all interior queries; an older one holds only the centre query's attention (``centre_probs``, the pixel
    ``(height // 2, width // 2)``), and the score is then estimated from that one query (NaN-padded heads of a
    pruned layer dropped).

    Args:
        snapshots: :func:`satconv.viz.load_snapshots` of a run.
        height, width: the layers' grid.
        kernel_size: ``K`` of :func:`score_profile`.

    Returns:
        ``(scores, queries)``: ``(epochs, L)`` scores, and ``"all"``, or ``1`` when any snapshot gave only its
        centre query.

    Raises:
        ValueError: a snapshot with neither record.
    """
    rows, queries = [], "all"
    centre = (height // 2) * width + width // 2
    radius = fitting_radius(height, width, kernel_size - 1)
    for snap in snapshots:
        if snap.get("shift_profile") is not None:
            rows.append([score_profile(p, kernel_size)["score"] for p in snap["shift_profile"]])
        elif snap.get("centre_probs") is not None:
            queries, row = 1, []
            for layer in np.asarray(snap["centre_probs"], dtype=np.float64):  # (H, N)
                layer = layer[~np.isnan(layer).any(axis=1)]
                row.append(score_profile(shift_profile(layer[:, None, :], height, width, radius, [centre])[0],
                                         kernel_size)["score"])
            rows.append(row)
        else:
            raise ValueError(f"the snapshot of epoch {snap.get('epoch')} holds neither shift profiles nor the centre "
                             f"query's attention")
    return np.array(rows), queries


def quadratic_snapshot_scores(snapshots, side: int, kernel_size: int = 3) -> np.ndarray:
    """The score of every quadratic layer at every snapshot of a run (the position-only attention of
    eq. (9) depends on the parameters alone, so the snapshots hold all of it).

    Args:
        snapshots: :func:`satconv.viz.load_snapshots` of a quadratic run: dicts with ``centers`` ``(L, H, 2)``,
            ``spreads`` ``(L, H)`` or ``(L, H, 2, 2)`` and ``heads`` ``(L,)`` (pruned layers NaN-padded).
        side: the layers' square grid side (``N = side^2``).
        kernel_size: ``K`` of :func:`conv_likeness`.

    Returns:
        ``(epochs, L)`` scores, from a float64 :class:`~satconv.attention.quadratic.QuadraticAttention` loaded with
        each layer's parameters.

    Raises:
        ValueError: a snapshot without quadratic parameters.
    """
    from .attention.quadratic import QuadraticAttention

    out = []
    for snap in snapshots:
        if snap.get("centers") is None:
            raise ValueError(f"the snapshot of epoch {snap.get('epoch')} holds no quadratic attention parameters")
        heads = snap.get("heads")
        row = []
        for layer_index, (mu, s) in enumerate(zip(snap["centers"], snap["spreads"])):
            h = int(heads[layer_index]) if heads is not None else len(mu)
            layer = QuadraticAttention(1, h, isotropic=np.ndim(s) == 1).double().eval()
            with torch.no_grad():
                layer.attention_centers.copy_(torch.as_tensor(np.asarray(mu[:h]), dtype=torch.float64))
                layer.attention_spreads.copy_(torch.as_tensor(np.asarray(s[:h]), dtype=torch.float64))
                row.append(conv_likeness(layer.attention_probs(side, side), side, side, kernel_size)["score"])
        out.append(row)
    return np.array(out)
