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
def _tv_reference(probs, height, width, aligned, margin, queries=None):
    """Explicit loops: mean over batch and queries of 1/2 sum |p_q - mean_q p_q|, per head.

    ``probs[b, h, i]`` is the map of query ``queries[i]`` (all queries in order by default)."""
    b_, h_, _, n = probs.shape
    queries = list(range(n)) if queries is None else list(queries)
    rows = [i for i, q in enumerate(queries)
            if margin <= q // width < height - margin and margin <= q % width < width - margin]
    out = np.zeros(h_)
    for b, h in itertools.product(range(b_), range(h_)):
        maps = []
        for i in rows:
            q = queries[i]
            m = {}
            for k in range(n):
                key = (k // width - q // width, k % width - q % width) if aligned else k
                m[key] = probs[b, h, i, k]
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


@pytest.mark.parametrize("aligned", [False, True])
def test_query_irrelevance_on_a_subset_of_queries(aligned):
    """The atlas keeps a few query rows only: scores over those rows, margin applied to them."""
    rng = np.random.default_rng(2)
    queries = [7, 0, 12, 18, 6]  # grid 4x5: (1, 2), (0, 0), (2, 2), (3, 3), (1, 1)
    p = rng.exponential(size=(2, 3, len(queries), 20)) ** 3
    p /= p.sum(-1, keepdims=True)
    got = viz.query_irrelevance(p, aligned=aligned, margin=1, grid=(4, 5), queries=queries)
    np.testing.assert_allclose(got, _tv_reference(p, 4, 5, aligned, 1, queries), atol=EXACT)
    with pytest.raises(ValueError, match="queries"):
        viz.query_irrelevance(p, grid=(4, 5), queries=queries[:3])


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


def test_attention_grid_keeps_a_two_line_title_above_the_column_titles():
    p = np.random.default_rng(0).dirichlet(np.ones(36), size=(2, 3))
    fig = viz.attention_grid(p, 6, 6, query=(2, 3), suptitle="model\nGPU run: data, 3 epochs, seed 1, GPU")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title_bottom = fig._suptitle.get_window_extent(renderer).y0
    assert all(ax.title.get_window_extent(renderer).y1 <= title_bottom for ax in fig.axes)


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


# ------------------------------------------------------------------ run artefacts (formats of satconv.train)
class TinyQuadraticModel(nn.Module):
    """Two QuadraticAttention layers on 4x4 pixels, with the model interface train.py snapshots."""

    def __init__(self):
        super().__init__()
        from satconv.attention.quadratic import QuadraticAttention
        self.layers = nn.ModuleList(QuadraticAttention(3, 2) for _ in range(2))

    def forward(self, images, return_attention=False):
        x, probs = images.permute(0, 2, 3, 1), []  # (B, 4, 4, 3)
        for layer in self.layers:
            x, p = layer(x, return_attention=True)
            probs.append(p)
        return (x.mean((1, 2)), probs) if return_attention else x.mean((1, 2))


def test_load_snapshots_reads_what_train_writes(tmp_path):
    from satconv.atlas import attention_snapshot

    torch.manual_seed(0)
    model = TinyQuadraticModel()
    (tmp_path / "snapshots").mkdir()
    for epoch in (0, 1):
        snap = attention_snapshot(model, torch.randn(1, 3, 4, 4))
        torch.save({"epoch": epoch, **snap}, tmp_path / "snapshots" / f"epoch_{epoch:04d}.pt")
        with torch.no_grad():
            model.layers[1].attention_centers += 1.0
    snaps = viz.load_snapshots(tmp_path)
    assert [s["epoch"] for s in snaps] == [0, 1]
    assert snaps[0]["centers"].shape == (2, 2, 2) and snaps[0]["spreads"].shape == (2, 2)
    np.testing.assert_allclose(snaps[1]["centers"][1], model.layers[1].attention_centers.detach() - 1.0)
    assert snaps[0]["centre_probs"].shape == (2, 2, 16)
    # the centre query's row (2, 2) of the model's own probabilities, as train.py stores it (float16)
    with torch.no_grad():
        expected = model.layers[0].attention_probs(4, 4)[0, :, 2 * 4 + 2].numpy()
    np.testing.assert_allclose(snaps[0]["centre_probs"][0], expected, atol=1e-3)
    assert len(viz.plot_center_evolution(snaps, layer=1, side=4).axes) == 2
    assert len(viz.plot_center_trajectories(snaps, layer=0).axes) == 2
    assert viz.degenerate_heads(snaps[0]["centers"], snaps[0]["spreads"]).shape == (2, 2)


def _fake_atlas(images=2, heads=2, queries=3, seed=0):
    """The keys satconv.train.build_atlas writes, for a 2-layer model on a 4x4 token grid."""
    g = torch.Generator().manual_seed(seed)
    probs = lambda *s: torch.softmax(torch.randn(*s, 16, generator=g), -1).half()  # noqa: E731
    return {"images": torch.randint(0, 255, (images, 3, 8, 8), dtype=torch.uint8, generator=g),
            "labels": torch.arange(images), "classes": ["cat", "dog", "ship"], "grid": [(4, 4), (4, 4)],
            "probs": [probs(images, heads, queries) for _ in range(2)],
            "query_index": [torch.tensor([10, 5, 7])[:queries]] * 2,
            "centre_mean": [probs(heads) for _ in range(2)], "query_mean": [probs(images, heads) for _ in range(2)]}


def test_atlas_helpers_and_views():
    atlas = _fake_atlas()
    np.testing.assert_array_equal(viz.atlas_maps(atlas, "probs", image=1, query=2)[1], atlas["probs"][1][1, :, 2])
    np.testing.assert_array_equal(viz.atlas_maps(atlas, "query_mean", image=1)[0], atlas["query_mean"][0][1])
    assert viz.atlas_maps(atlas, "centre_mean").shape == (2, 2, 16)
    assert viz.atlas_query(atlas, 1) == (1, 1)
    views, axes = viz.atlas_views({"a": atlas, "b": _fake_atlas(seed=1)}, images=5)
    assert axes == [("model", ["a", "b"]), ("image", ["1 (cat)", "2 (dog)"]), ("query", ["(2, 2)", "(1, 1)", "(1, 3)"])]
    assert len(views) == 2 * 2 * 3 and all(v[:4] == b"\x89PNG" for v in views.values())
    # atlases of other images or query pixels (a stand-in next to a GPU run) never share an explorer
    other = _fake_atlas(seed=1)
    other["query_index"] = [torch.tensor([0, 5, 7])] * 2
    with pytest.raises(ValueError, match="separate explorers"):
        viz.atlas_views({"a": atlas, "b": other})
    with pytest.raises(ValueError, match="separate explorers"):
        viz.atlas_views({"a": {**atlas, "test_index": torch.tensor([0, 1])},
                         "b": {**_fake_atlas(seed=1), "test_index": torch.tensor([0, 2])}})
    # sampled-query irrelevance: the atlas rows with their query indices
    scores = viz.run_query_irrelevance("/nonexistent", atlas, margin=1)
    assert scores["source"] == "atlas" and scores["raw"].shape == (2, 2)
    np.testing.assert_allclose(scores["raw"][0], viz.query_irrelevance(atlas["probs"][0], queries=[10, 5, 7]))


def test_find_run_prefers_committed_gpu_runs_and_reuses_a_finished_stand_in(tmp_path):
    import json

    import yaml

    from satconv.config import to_dict

    gpu, quick = tmp_path / "book", tmp_path / "quick"
    (gpu / "paper_learned").mkdir(parents=True)
    (gpu / "paper_learned" / "atlas.pt").write_bytes(b"")
    (gpu / "paper_learned" / "config.yaml").write_text("name: paper_learned\n")
    assert viz.find_run("paper_learned", gpu, quick, train_quick=False) == (None, None)  # not a whole run yet
    (gpu / "paper_learned" / "run.json").write_text(json.dumps({"status": "completed"}))
    (gpu / "paper_learned" / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    assert viz.find_run("paper_learned", gpu, quick) == (gpu / "paper_learned", "gpu")
    assert viz.find_run("paper_quadratic", gpu, quick, train_quick=False) == (None, None)
    done = quick / "paper_quadratic"  # a completed stand-in of the same config is reused, not retrained
    done.mkdir(parents=True)
    (done / "config.yaml").write_text(yaml.safe_dump(to_dict(viz.quick_config("paper_quadratic"))))
    (done / "run.json").write_text(json.dumps({"status": "completed", "data": {"description": "synthetic"}}))
    assert viz.find_run("paper_quadratic", gpu, quick) == (done, "quick")
    assert sorted(p.name for p in done.iterdir()) == ["config.yaml", "run.json"]
    table = viz.runs_table({"q": (done, "quick"), "l": (gpu / "paper_learned", "gpu")})
    assert table.count("\n") == 3 and "CPU stand-in" in table and "GPU run" in table


def _fake_run(run_dir, name, seed, epochs_run, planned, status="completed", lr_step="epoch"):
    import json

    run_dir.mkdir(parents=True)
    rate = "" if lr_step is None else f", lr_step: {lr_step}"
    (run_dir / "config.yaml").write_text(f"name: {name}\ntrain: {{epochs: {planned}, seed: {seed}{rate}}}\n")
    (run_dir / "run.json").write_text(json.dumps({"status": status, "seed": seed, "device": "NVIDIA H100",
                                                  "data": {"description": "CIFAR-10 (JPEG q75 copy)"}}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(1, epochs_run + 1)))
    (run_dir / "atlas.pt").write_bytes(b"")
    return run_dir


def test_gpu_runs_match_by_config_name_and_put_the_full_lowest_seed_run_first(tmp_path):
    short = _fake_run(tmp_path / "paper_quadratic", "paper_quadratic", 42, 30, 30)
    s43 = _fake_run(tmp_path / "paper_quadratic_e300_s43", "paper_quadratic", 43, 300, 300)
    s42 = _fake_run(tmp_path / "paper_quadratic_e300_s42", "paper_quadratic", 42, 300, 300)
    broken = _fake_run(tmp_path / "zzz", "paper_quadratic", 41, 300, 300, status="interrupted")
    _fake_run(tmp_path / "paper_quadratic_16heads", "paper_quadratic_16heads", 42, 100, 100)
    assert viz.gpu_runs("paper_quadratic", tmp_path) == [s42, s43, short, broken]
    assert viz.find_run("paper_quadratic", tmp_path, tmp_path / "q", train_quick=False) == (s42, "gpu")
    assert viz.gpu_runs("paper_learned", tmp_path) == []


def test_retitle_run_page_names_config_seed_and_schedule(tmp_path):
    import json

    run = _fake_run(tmp_path / "r", "paper_quadratic", 43, 30, 30)
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# Training a model\n", "\n", "Text."]},
                    {"cell_type": "code", "metadata": {}, "source": "x = 1", "outputs": [], "execution_count": 1}],
          "metadata": {"papermill": {"parameters": {"seed": 1}}}, "nbformat": 4, "nbformat_minor": 5}
    page = tmp_path / "r.ipynb"
    page.write_text(json.dumps(nb))
    # 30 epochs run of a config whose file says 300
    assert viz.retitle_run_page(page, run) == "# Run: paper_quadratic, seed 43, 30 epochs (config: 300)"
    out = json.loads(page.read_text())
    assert "".join(out["cells"][0]["source"]) == "# Run: paper_quadratic, seed 43, 30 epochs (config: 300)\n\nText."
    assert out["cells"][1] == nb["cells"][1] and out["metadata"] == nb["metadata"]
    page.write_text(json.dumps({**nb, "cells": nb["cells"][1:]}))
    with pytest.raises(ValueError, match="heading"):
        viz.retitle_run_page(page, run)


def test_run_title_says_when_a_run_set_its_rate_otherwise_than_its_config(tmp_path):
    """paper_quadratic's file sets the rate per epoch; a run that set it per batch says so, and so does a run
    written before train.lr_step existed (it stepped per batch, the key's default); a matching run says nothing."""
    per_batch = _fake_run(tmp_path / "a", "paper_quadratic", 42, 100, 100, lr_step="step")
    older = _fake_run(tmp_path / "b", "paper_quadratic", 42, 30, 30, lr_step=None)
    same = _fake_run(tmp_path / "c", "paper_quadratic", 42, 300, 300, lr_step="epoch")
    assert viz.run_title(per_batch) == ("paper_quadratic, seed 42, 100 epochs (config: 300), "
                                        "rate set per batch (config: per epoch)")
    assert viz.run_info(older, "gpu")["lr_step"] == "step" and "rate set per batch" in viz.run_title(older)
    assert viz.run_title(same) == "paper_quadratic, seed 42, 300 epochs"
    assert "rate" not in viz.run_label(per_batch, "quick")  # a CPU stand-in is not compared with its config


def test_run_label_reads_data_schedule_seed_and_device_from_the_run(tmp_path):
    import json

    import yaml

    from satconv.config import REPO_ROOT, load, to_dict

    config = REPO_ROOT / "configs" / "paper_learned.yaml"
    run = tmp_path / "paper_learned"
    run.mkdir()
    raw = to_dict(load(config))
    raw["train"].update(epochs=3, seed=7)
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "val_acc": 0.5}) + "\n" for e in (1, 2)))
    (run / "run.json").write_text(json.dumps({"device": "Some GPU", "seed": 7, "status": "running",
                                              "data": {"description": "CIFAR-10 (JPEG q75 copy)"}}))
    full = load(config).train.epochs
    info = viz.run_info(run, "gpu")
    assert (info["epochs_run"], info["epochs_planned"], info["epochs_full"], info["seed"]) == (2, 3, full, 7)
    assert viz.run_label(run, "gpu") == (f"GPU run: CIFAR-10 (JPEG q75 copy), 2 epochs of 3 (config: {full}), "
                                         "seed 7, Some GPU")
    label = viz.run_label(run, "quick")
    assert label.startswith("CPU stand-in, not a result") and "config:" not in label
    assert "| 7 |" in viz.runs_table({"l": (run, "gpu")})


def test_snapshot_views_refuse_runs_of_different_lengths():
    maps = np.full((1, 1, 16), 1 / 16, dtype=np.float32)
    snaps = lambda n: [{"epoch": e, "centre_probs": maps} for e in range(n + 1)]  # noqa: E731
    views, axes = viz.snapshot_views({"a": snaps(4), "b": snaps(4)}, max_epochs=3)
    assert axes == [("model", ["a", "b"]), ("epoch", [0, 2, 4])] and len(views) == 6
    with pytest.raises(ValueError, match="different epochs"):
        viz.snapshot_views({"gpu": snaps(30), "stand-in": snaps(2)})


def test_load_snapshots_of_a_pruned_run_pads_missing_heads_with_nan(tmp_path):
    """Layers with different head counts (pruned degenerate heads) stack into (L, max H, ...) with NaN where a
    layer has fewer heads; ``heads`` gives each layer's count; equal counts stack as before."""
    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    c0, c1 = torch.arange(6.0).view(3, 2), torch.arange(4.0).view(2, 2) + 10
    params = {"blocks.0.attn.attention_centers": c0, "blocks.0.attn.attention_spreads": torch.ones(3),
              "blocks.1.attn.attention_centers": c1, "blocks.1.attn.attention_spreads": torch.ones(2) * 2}
    torch.save({"epoch": 1, "params": params, "centre_probs": [torch.full((3, 4), 0.25), torch.full((2, 4), 0.25)]},
               snaps / "epoch_0001.pt")
    (snap,) = viz.load_snapshots(tmp_path)
    assert snap["centers"].shape == (2, 3, 2) and snap["spreads"].shape == (2, 3)
    np.testing.assert_array_equal(snap["centers"][0], c0.numpy())
    np.testing.assert_array_equal(snap["centers"][1, :2], c1.numpy())
    assert np.isnan(snap["centers"][1, 2]).all() and np.isnan(snap["spreads"][1, 2])
    assert snap["heads"].tolist() == [3, 2] and snap["centre_probs"].shape == (2, 3, 4)
    assert np.isnan(snap["centre_probs"][1, 2]).all() and snap["centre_probs"].dtype == np.float32
    with pytest.raises(ValueError, match="beyond the head axis"):
        viz.runs.stack_heads([np.zeros((2, 2)), np.zeros((2, 3))])


def test_gaussian_figures_of_a_pruned_run_skip_the_missing_heads():
    """NaN-padded heads (a pruned layer, from load_snapshots) get NaN maps, are never degenerate, and the
    figure draws the other heads; the present heads' maps are those of the unpadded layer."""
    from satconv.viz.gaussian import degenerate_heads, quadratic_center_maps
    centers = np.array([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [1.0, 1.0], [np.nan, np.nan]]])
    spreads = np.array([[1.0, 1.0, 1e-4], [1.0, 1.0, np.nan]])
    maps = quadratic_center_maps(centers, spreads, side=7)
    assert maps.shape == (2, 3, 7, 7) and np.isnan(maps[1, 2]).all() and not np.isnan(maps[1, :2]).any()
    np.testing.assert_allclose(maps[1, :2], quadratic_center_maps(centers[1:, :2], spreads[1:, :2], side=7)[0])
    assert degenerate_heads(centers, spreads).tolist() == [[False, False, True], [False, False, False]]
    fig = viz.plot_gaussian_heads({"epoch": 3, "centers": centers, "spreads": spreads}, side=7)
    plt.close(fig)
