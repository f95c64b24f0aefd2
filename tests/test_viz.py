"""satconv.viz: mass contours, the two averaging protocols, query-irrelevance, the kernel-free explorer.

References are independent: brute force over all pixel subsets, explicit loops over (query, key)
pairs, and single-image forward passes averaged by hand.
"""
import itertools

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.path import Path  # noqa: E402
from torch import nn  # noqa: E402

from satconv import viz  # noqa: E402

#: float64 sums of at most 256 terms; anything above this is a real difference
EXACT = 1e-10
#: float32 forward passes in different batch compositions (batched matmul may reorder sums)
FLOAT32 = 1e-5


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# ------------------------------------------------------------------ mass contours
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("level", [0.1, 0.5, 0.9])
def test_mass_region_is_the_smallest_set_holding_the_level(seed, level):
    rng = np.random.default_rng(seed)
    p = rng.exponential(size=(3, 3))
    p /= p.sum()  # distinct values a.s., so the optimal set is unique
    flat = p.ravel()
    best = None  # brute force: smallest subset with mass >= level, heaviest among those
    for mask in itertools.product([False, True], repeat=flat.size):
        mask = np.array(mask)
        mass = flat[mask].sum()
        if mass >= level and (best is None or mask.sum() < best[0] or (mask.sum() == best[0] and mass > best[1])):
            best = (mask.sum(), mass, mask)
    region = viz.mass_region(p, level)
    assert region.shape == p.shape
    assert p[region].sum() >= level - EXACT
    assert region.sum() == best[0]
    np.testing.assert_array_equal(region.ravel(), best[2])


def _gaussian_map(height, width, center, cov):
    rows, cols = np.mgrid[:height, :width]
    d = np.stack([rows - center[0], cols - center[1]], -1).astype(float)
    logits = -0.5 * np.einsum("...i,ij,...j->...", d, np.linalg.inv(cov), d)
    p = np.exp(logits - logits.max())
    return p / p.sum()


def test_mass_contours_enclose_exactly_the_region_pixels():
    p = _gaussian_map(11, 13, center=(4.3, 7.6), cov=np.array([[2.0, 0.7], [0.7, 1.2]]))
    fig, ax = plt.subplots()
    drawn = dict(viz.gaussian_mass_contours(ax, p, levels=(0.5, 0.9)))
    assert set(drawn) == {0.5, 0.9}
    rows, cols = np.mgrid[:11, :13]
    centres = np.stack([cols.ravel(), rows.ravel()], -1)  # contour coordinates are (x = col, y = row)
    for level, cs in drawn.items():
        (path,) = cs.get_paths()
        inside = np.zeros(p.size, bool)
        for poly in path.to_polygons():
            inside |= Path(poly).contains_points(centres)
        np.testing.assert_array_equal(inside.reshape(p.shape), viz.mass_region(p, level))


def test_gaussian_heads_contours_sit_at_the_head_centres():
    """A head centred at (row, col) offset (3, -4) from the central query (8, 8) encloses pixel (11, 4)."""
    centers = np.array([[[3.0, -4.0], [0.0, 0.0]]])  # (L=1, H=2, 2)
    spreads = np.array([[1.0, 1.5]])  # (L, H), alpha = s^2 / 2
    maps = viz.quadratic_center_maps(centers, spreads, side=16)
    assert maps.shape == (1, 2, 16, 16)
    assert np.unravel_index(maps[0, 0].argmax(), (16, 16)) == (11, 4)
    # independent formula: softmax(-alpha ||delta - mu||^2) over the grid, delta = key - (8, 8)
    rows, cols = np.mgrid[:16, :16]
    ref = np.exp(-0.5 * ((rows - 8 - 3.0) ** 2 + (cols - 8 + 4.0) ** 2))
    np.testing.assert_allclose(maps[0, 0], ref / ref.sum(), atol=EXACT)
    fig = viz.plot_gaussian_heads((centers, spreads), side=16)
    assert len(fig.axes) == 1
    snapshots = [(e, centers * e / 2, spreads) for e in range(3)]
    assert len(viz.plot_center_evolution(snapshots, layer=0).axes) == 3


def test_quadratic_parameters_from_layers():
    from satconv.attention.quadratic import QuadraticAttention

    torch.manual_seed(0)
    layers = [QuadraticAttention(4, 3), QuadraticAttention(4, 3)]
    centers, spreads = viz.quadratic_parameters(layers)
    assert centers.shape == (2, 3, 2) and spreads.shape == (2, 3)
    np.testing.assert_allclose(centers[1], layers[1].attention_centers.detach().numpy())
    # position_attention asks the layers themselves; same maps as rebuilt from the parameters
    pos = viz.position_attention(layers, side=8)
    np.testing.assert_allclose(pos, viz.quadratic_center_maps(centers, spreads, 8).reshape(2, 3, 64), atol=FLOAT32)
    assert len(viz.learned_position_maps(layers, side=8, zoom=5).axes) == 6


# ------------------------------------------------------------------ query-irrelevance
def _tv_reference(probs, height, width, aligned, margin):
    """Explicit loops: mean over batch and queries of 1/2 sum |p_q - mean_q p_q|, per head."""
    b_, h_, n, _ = probs.shape
    queries = [r * width + c for r in range(margin, height - margin) for c in range(margin, width - margin)]
    out = np.zeros(h_)
    for b, h in itertools.product(range(b_), range(h_)):
        maps = []
        for q in queries:
            m = {}
            for k in range(n):
                key = (k // width - q // width, k % width - q % width) if aligned else k
                m[key] = probs[b, h, q, k]
            maps.append(m)
        keys = set().union(*maps)
        mean = {k: sum(m.get(k, 0.0) for m in maps) / len(maps) for k in keys}
        out[h] += np.mean([0.5 * sum(abs(m.get(k, 0.0) - mean[k]) for k in keys) for m in maps]) / b_
    return out


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("margin", [0, 1])
def test_query_irrelevance_matches_explicit_loops(aligned, margin):
    rng = np.random.default_rng(1)
    p = rng.exponential(size=(2, 3, 20, 20)) ** 3
    p /= p.sum(-1, keepdims=True)
    got = viz.query_irrelevance(torch.from_numpy(p), aligned=aligned, margin=margin, grid=(4, 5))
    np.testing.assert_allclose(got, _tv_reference(p, 4, 5, aligned, margin), atol=EXACT)


def _shift_head(side, shift):
    """(1, 1, N, N): every query attends to the single pixel query + shift (itself where that is outside)."""
    n = side * side
    p = np.zeros((1, 1, n, n))
    for r, c in itertools.product(range(side), range(side)):
        tr, tc = r + shift[0], c + shift[1]
        target = tr * side + tc if 0 <= tr < side and 0 <= tc < side else r * side + c
        p[0, 0, r * side + c, target] = 1.0
    return p


def test_query_irrelevance_separates_shared_maps_from_fixed_shifts():
    side, n = 8, 64
    rng = np.random.default_rng(0)
    shared = np.broadcast_to(rng.dirichlet(np.ones(n)), (1, 2, n, n))  # one distribution for every query
    uniform = np.full((1, 1, n, n), 1.0 / n)
    shift = _shift_head(side, (1, -2))
    assert viz.query_irrelevance(shared).max() < EXACT
    assert viz.query_irrelevance(uniform)[0] < EXACT
    # raw sense: a fixed-shift head moves with the query, TV(one-hot, mean of ~N one-hots) ~ 1
    assert viz.query_irrelevance(shift)[0] > 0.9
    assert viz.query_irrelevance(shift, margin=2)[0] > 0.9
    # aligned sense: the same offset map for every interior query; the shared map is not
    assert viz.query_irrelevance(shift, aligned=True, margin=2)[0] < EXACT
    assert viz.query_irrelevance(uniform, aligned=True)[0] > 0.3
    with pytest.raises(ValueError, match="margin"):
        viz.query_irrelevance(shift, margin=4)


# ------------------------------------------------------------------ averaging protocols on a tiny model
class TinyAttentionModel(nn.Module):
    """Stand-in for the encoder: content attention on 4x4 pixels (2 heads) + one position-only layer."""

    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(3, 2 * 4)
        self.pos = nn.Parameter(torch.randn(1, 2, 16, 16))
        self.drop = nn.Dropout(0.5)  # must be off in eval mode
        self.head = nn.Linear(3, 10)

    def forward(self, images, return_attention=False):
        x = self.drop(images.flatten(2).transpose(1, 2))  # (B, 16, 3)
        q = self.qk(x).view(x.shape[0], 16, 2, 4).transpose(1, 2)  # (B, 2, 16, 4)
        probs = [torch.softmax(q @ q.transpose(-1, -2), -1), torch.softmax(self.pos, -1)]
        logits = self.head(x.mean(1))
        return (logits, probs) if return_attention else logits


def test_query_attention_is_the_manual_average_over_images():
    torch.manual_seed(0)
    model, images = TinyAttentionModel(), torch.randn(5, 3, 4, 4)
    got = viz.query_attention(model, images, (2, 1), batch_size=3)  # batches of 3 and 2
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        per_image = [model(img[None], return_attention=True)[1] for img in images]
    q = 2 * 4 + 1
    manual = np.stack([[np.mean([pr[layer][0, h, q].numpy() for pr in per_image], 0) for h in range(2)]
                       for layer in range(2)])
    assert got.shape == (2, 2, 16)
    np.testing.assert_allclose(got, manual, atol=FLOAT32)
    np.testing.assert_allclose(viz.query_attention(model, images, q, batch_size=5), got, atol=FLOAT32)
    # the [Re]'s protocol: one image, mean over query rows
    avg = viz.query_averaged_attention(model, images[3])
    manual = np.stack([per_image[3][layer][0].numpy().mean(axis=1) for layer in range(2)])
    np.testing.assert_allclose(avg, manual, atol=FLOAT32)
    scores = viz.model_query_irrelevance(model, images, batch_size=2)
    assert scores.shape == (2, 2)
    ref = np.mean([viz.query_irrelevance(pr[0][0:1]) for pr in per_image], 0)
    np.testing.assert_allclose(scores[0], ref, atol=FLOAT32)


# ------------------------------------------------------------------ figures and widgets
def test_attention_grid_has_one_axes_per_layer_and_head():
    p = np.random.default_rng(0).dirichlet(np.ones(36), size=(2, 3))  # (L, H, N)
    assert len(viz.attention_grid(p, 6, 6, query=(2, 3)).axes) == 6
    assert len(viz.attention_grid(p, 6, 6, query=14, image=np.zeros((3, 12, 12)), crop=3).axes) == 7
    with pytest.raises(ValueError, match="probs"):
        viz.attention_grid(p, 5, 6)


def test_fig_to_png_closes_the_figure():
    fig = plt.figure()
    png = viz.fig_to_png(fig, dpi=20)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)


def test_explorer_nests_stacks_and_links_every_stack_of_a_level():
    import ipywidgets as widgets

    axes = [("image", [0, 1]), ("layer", [1, 2, 3]), ("head", ["a", "b"])]
    views = {key: repr(key).encode() for key in itertools.product(*(v for _, v in axes))}
    box = viz.explorer(views, axes, dropdown=["head"])
    assert [len(level) for level in box.stacks] == [1, 2, 6]
    assert isinstance(box.controls[0], widgets.SelectionSlider) and isinstance(box.controls[2], widgets.Dropdown)
    # every leaf image holds the view of its path through the nesting
    for i, j, k in itertools.product(range(2), range(3), range(2)):
        leaf = box.stacks[0][0].children[i].children[j].children[k]
        assert isinstance(leaf, widgets.Image)
        assert leaf.value == views[(axes[0][1][i], axes[1][1][j], axes[2][1][k])]
    assert len(box.links) == 1 + 2 + 6
    for control, level in zip(box.controls, box.stacks):
        targets = [ln.target[0] for ln in box.links if ln.source == (control, "index")]
        assert {id(t) for t in targets} == {id(s) for s in level}
        assert all(ln.target[1] == "selected_index" for ln in box.links if ln.source[0] is control)
    with pytest.raises(ValueError, match="lacks"):
        viz.explorer({k: v for k, v in list(views.items())[1:]}, axes)
