"""satconv.analysis: the convolution-likeness score against cases with known answers."""
import itertools
import math

import numpy as np
import pytest
import torch

from satconv.analysis import (atlas_conv_likeness, conv_likeness, conv_likeness_per_image, max_assignment, score_profile,
                              shift_profile)
from satconv.theory import attention_from_conv, kernel_shifts


def brute_force_best(mass):
    """The largest total of a one-to-one matching, by enumerating every matching (small sizes only)."""
    n, m = mass.shape
    if n <= m:
        return max(sum(mass[i, j] for i, j in enumerate(cols)) for cols in itertools.permutations(range(m), n))
    return max(sum(mass[i, j] for j, i in enumerate(rows)) for rows in itertools.permutations(range(n), m))


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (4, 6), (6, 4), (5, 5), (2, 7)])
def test_max_assignment_matches_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        mass = rng.random(shape)
        mass[rng.random(shape) < 0.3] = 0.5  # ties
        pairs = max_assignment(mass)
        assert len(pairs) == min(shape)
        assert len(set(pairs[:, 0])) == len(pairs) and len(set(pairs[:, 1])) == len(pairs)
        assert math.isclose(mass[pairs[:, 0], pairs[:, 1]].sum(), brute_force_best(mass), rel_tol=1e-12)


def test_max_assignment_refuses_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        max_assignment(np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        max_assignment(np.array([[np.nan]]))


def one_hot_heads(shifts, height, width):
    """(heads, N, N): head h puts all its mass on key q + shifts[h] (clamped into the image at borders)."""
    n = height * width
    probs = torch.zeros(len(shifts), n, n, dtype=torch.float64)
    for h, (dr, dc) in enumerate(shifts):
        for r, c in itertools.product(range(height), range(width)):
            kr, kc = min(max(r + dr, 0), height - 1), min(max(c + dc, 0), width - 1)
            probs[h, r * width + c, kr * width + kc] = 1.0
    return probs


@pytest.mark.parametrize("k", [3, 5])
def test_a_convolution_scores_one_and_the_heads_order_does_not_matter(k):
    shifts = [tuple(int(v) for v in s) for s in kernel_shifts(k)]
    probs = one_hot_heads(shifts, 11, 12)
    out = conv_likeness(probs, 11, 12, kernel_size=k)
    assert out["score"] == 1.0 and out["heads_short"] == 0
    assert [tuple(s) for s in out["shifts"]] == shifts and (out["concentration"] == 1).all()
    assert out["assignment"].tolist() == [[h, h] for h in range(k * k)]
    perm = torch.randperm(k * k, generator=torch.Generator().manual_seed(0))
    permuted = conv_likeness(probs[perm], 11, 12, kernel_size=k)
    assert permuted["score"] == 1.0
    assert [tuple(s) for s in permuted["shifts"]] == [shifts[i] for i in perm.tolist()]


def test_uniform_attention_scores_one_over_n():
    out = conv_likeness(torch.full((9, 64, 64), 1 / 64, dtype=torch.float64), 8, 8)
    assert math.isclose(out["score"], 1 / 64, rel_tol=1e-12)
    assert np.allclose(out["shift_profile"], 1 / 64) and out["queries"] == 16  # radius 2: rows/cols 2..5


def test_all_heads_on_one_shift_score_one_over_k_squared():
    out = conv_likeness(one_hot_heads([(0, 1)] * 9, 9, 9), 9, 9)
    assert math.isclose(out["score"], 1 / 9, rel_tol=1e-12)
    assert (out["shifts"] == [0, 1]).all()


def test_fewer_heads_than_grid_shifts_are_said_and_count_zero():
    out = conv_likeness(one_hot_heads([(0, 0), (1, 1), (-1, 0)], 7, 7), 7, 7)
    assert out["heads_short"] == 6 and math.isclose(out["score"], 3 / 9, rel_tol=1e-12)
    more = conv_likeness(one_hot_heads([tuple(int(v) for v in s) for s in kernel_shifts(3)] + [(2, 2)] * 3, 7, 7), 7, 7)
    assert more["score"] == 1.0 and more["heads_short"] == 0 and len(more["assignment"]) == 9


def test_a_head_centred_off_the_grid_is_seen_by_the_profile():
    out = conv_likeness(one_hot_heads([(2, -2)], 9, 9), 9, 9)
    assert out["shifts"].tolist() == [[2, -2]] and out["concentration"][0] == 1.0 and out["score"] == 0.0


def test_the_theorem_construction_approaches_one_at_its_rate():
    """The quadratic layer of Theorem 1 leaks ~4 e^-alpha of each interior query's mass to the four nearest
    neighbours of its shift: 1 - score follows that rate as alpha grows."""
    conv = torch.nn.Conv2d(2, 3, 3).double()
    gaps = {}
    for alpha in (1.0, 3.0, 6.0, 10.0):
        layer = attention_from_conv(conv, alpha).double().eval()
        with torch.no_grad():
            probs = layer.attention_probs(12, 12)
        gaps[alpha] = 1 - conv_likeness(probs, 12, 12)["score"]
    assert gaps[1.0] > gaps[3.0] > gaps[6.0] > gaps[10.0] > 0
    for alpha in (6.0, 10.0):
        assert gaps[alpha] == pytest.approx(4 * math.exp(-alpha), rel=0.02)


def test_per_image_scores_and_their_mean_attention():
    """Images whose heads attend to different shifts: each image is a perfect convolution, their average is not."""
    shifts = [tuple(int(v) for v in s) for s in kernel_shifts(3)]
    a = one_hot_heads(shifts, 7, 7)
    b = one_hot_heads(shifts[1:] + shifts[:1], 7, 7)  # the same shifts, other heads
    c = one_hot_heads([(0, 0)] * 9, 7, 7)
    out = conv_likeness_per_image(torch.stack([a, b, c]), 7, 7)
    assert out["per_image"].tolist() == pytest.approx([1.0, 1.0, 1 / 9])
    assert out["per_image_mean"] == pytest.approx((2 + 1 / 9) / 3)
    assert out["per_image_std"] == pytest.approx(np.std([1.0, 1.0, 1 / 9]))
    assert 0 < out["mean_attention"]["score"] < 1
    with pytest.raises(ValueError, match="images, heads"):
        conv_likeness_per_image(a, 7, 7)


def test_bad_arguments_are_refused():
    probs = torch.full((9, 16, 16), 1 / 16)
    with pytest.raises(ValueError, match="heads, N, N"):
        conv_likeness(probs, 4, 5)
    with pytest.raises(ValueError, match="odd"):
        conv_likeness(probs, 4, 4, kernel_size=2)
    with pytest.raises(ValueError, match="radius must be"):
        conv_likeness(probs, 4, 4, kernel_size=3, radius=0)
    with pytest.raises(ValueError, match="no query"):
        conv_likeness(probs, 4, 4, kernel_size=3, radius=2)
    assert conv_likeness(probs[None], 4, 4, radius=1)["queries"] == 4  # a leading batch axis of 1


def test_quadratic_snapshot_scores_follow_the_parameters():
    """Snapshots of the theorem's construction (sharp heads on the grid) score near 1; random centres, broad
    heads, score low; a pruned (NaN-padded) layer is read with its own head count."""
    from satconv.analysis import quadratic_snapshot_scores
    grid = kernel_shifts(3).numpy()
    sharp = {"epoch": 2, "centers": np.stack([grid, grid]), "spreads": np.full((2, 9), math.sqrt(2 * 10.0)),
             "heads": np.array([9, 9])}
    broad = {"epoch": 1, "centers": np.random.default_rng(0).normal(0, 2, (2, 9, 2)), "spreads": np.full((2, 9), 0.3),
             "heads": np.array([9, 9])}
    padded = dict(sharp, centers=sharp["centers"].copy(), spreads=sharp["spreads"].copy(), heads=np.array([9, 8]))
    padded["centers"][1, 8], padded["spreads"][1, 8] = np.nan, np.nan
    scores = quadratic_snapshot_scores([broad, sharp, padded], side=10)
    assert scores.shape == (3, 2)
    assert (scores[0] < 0.3).all() and scores[1] == pytest.approx([1 - 4 * math.exp(-10)] * 2, rel=1e-3)
    assert scores[2, 0] == scores[1, 0] and scores[2, 1] == pytest.approx(8 / 9 * scores[1, 1], rel=1e-9)
    with pytest.raises(ValueError, match="no quadratic"):
        quadratic_snapshot_scores([{"epoch": 0, "centers": None}], side=10)


def test_a_subset_of_queries_gives_their_own_profile():
    """Rows for a few query pixels only (an atlas's probs): the profile is the mean over those of them that are
    interior, the same as the full matrix restricted to them; border queries are left out."""
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(4, 64, 64, dtype=torch.float64) * 3, -1)
    queries = torch.tensor([0, 9, 27, 36, 63])  # 0 and 63 are corners; 9, 27, 36 are interior for r = 1
    part, count = shift_profile(probs[:, queries], 8, 8, 1, queries)
    assert count == 3
    expected = np.zeros((4, 3, 3))
    for q in (9, 27, 36):
        r, c = divmod(q, 8)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                expected[:, dr + 1, dc + 1] += probs[:, q, (r + dr) * 8 + c + dc].numpy() / 3
    np.testing.assert_allclose(part, expected, rtol=0, atol=1e-15)
    full, n = shift_profile(probs, 8, 8, 1)
    assert n == 36 and not np.allclose(full, part)
    assert conv_likeness(probs[:, queries], 8, 8, queries=queries, radius=1)["score"] == pytest.approx(
        score_profile(part)["score"], abs=1e-15)
    with pytest.raises(ValueError, match=r"heads, Q, N"):
        shift_profile(probs[:, queries], 8, 8, 1, queries[:4])
    with pytest.raises(ValueError, match="no query"):
        shift_profile(probs[:, :1], 8, 8, 1, queries[:1])
    with pytest.raises(ValueError, match=r"\(heads, 2r\+1, 2r\+1\)"):
        score_profile(np.zeros((9, 4, 4)))


def test_the_atlas_keeps_every_images_shift_profile_over_all_queries():
    """build_atlas records, per layer, the shift profile over all interior queries of each of the first
    ``average_over`` test images (content-based layer) or once (input-independent layer); the profile of the
    image-averaged attention (Fig. 6) is their mean, since the profile is linear in the probabilities."""
    from types import SimpleNamespace

    from torch import nn

    from satconv.atlas import build_atlas

    side, heads = 6, 3
    torch.manual_seed(1)
    logits = torch.randn(heads, side * side, side * side, dtype=torch.float64)

    def layer_probs(x):  # content-based: the images' mean value scales the logits
        return torch.softmax(logits * (1 + x.mean(dim=(1, 2, 3)))[:, None, None, None], -1)

    class Fake(nn.Module):
        def forward(self, x, return_attention=False):
            fixed = torch.softmax(logits[None] * 2, -1)  # input-independent: batch axis of 1
            return x.mean(dim=(1, 2, 3))[:, None].expand(-1, 2), [layer_probs(x.double()), fixed]

    images = torch.randint(0, 256, (7, 3, side, side), dtype=torch.uint8)
    class Split(SimpleNamespace):
        def __len__(self):
            return len(self.images)

    test = Split(images=images, labels=torch.tensor([0, 1, 0, 1, 0, 1, 0]), index=torch.arange(7))
    atlas = build_atlas(Fake(), SimpleNamespace(test=test, classes=["a", "b"]), (0.5,) * 3, (0.25,) * 3, 2, 2,
                        "cpu", average_over=5, chunk=2)
    content, fixed = atlas["shift_profile"]
    assert content.shape == (5, heads, 5, 5) and fixed.shape == (1, heads, 5, 5) and content.dtype == torch.float32
    x = (images[:5].double() / 255 - 0.5) / 0.25
    per_image = layer_probs(x)
    for i in range(5):
        np.testing.assert_allclose(content[i].numpy(), shift_profile(per_image[i], side, side, 2)[0], atol=1e-6)
    np.testing.assert_allclose(content.double().mean(0).numpy(), shift_profile(per_image.mean(0), side, side, 2)[0],
                               atol=1e-6)
    np.testing.assert_allclose(fixed[0].numpy(), shift_profile(torch.softmax(logits * 2, -1), side, side, 2)[0],
                               atol=1e-6)
    small = build_atlas(Fake(), SimpleNamespace(test=test, classes=["a", "b"]), (0.5,) * 3, (0.25,) * 3, 1, 1, "cpu",
                        average_over=2, profile_radius_max=9)
    assert small["shift_profile"][0].shape == (2, heads, 5, 5)  # capped at the 6x6 grid's largest radius, 2

    scores = atlas_conv_likeness(atlas)
    assert [s["input_independent"] for s in scores] == [False, True] and scores[1]["per_image"] is None
    assert scores[0]["score"] == pytest.approx(conv_likeness(per_image.mean(0), side, side)["score"], abs=1e-6)
    np.testing.assert_allclose(scores[0]["per_image"], [conv_likeness(p, side, side)["score"] for p in per_image],
                               atol=1e-6)
    assert (scores[0]["images"], scores[0]["queries"], scores[1]["images"]) == (5, "all", 1)
    older = {k: v for k, v in atlas.items() if k != "shift_profile"}  # an atlas written before the profiles
    estimate = atlas_conv_likeness(older)
    q = atlas["query_index"][0]
    interior = [int(v) for v in q if 2 <= v // side < side - 2 and 2 <= v % side < side - 2]
    assert estimate[0]["queries"] == len(interior) > 0 and estimate[0]["images"] == 2
    two = layer_probs((images[:2].double() / 255 - 0.5) / 0.25)
    assert estimate[0]["score"] == pytest.approx(
        conv_likeness(two.mean(0)[:, q], side, side, queries=q)["score"], abs=2e-3)  # float16 rows


def test_snapshots_score_every_epoch_from_their_profiles_or_the_centre_query():
    """attention_snapshot stores each layer's profile over all interior queries; snapshot_conv_likeness scores
    it, and for an older snapshot estimates the score from the centre query's attention alone (a pruned layer's
    NaN-padded heads dropped)."""
    from torch import nn

    from satconv.analysis import snapshot_conv_likeness
    from satconv.atlas import attention_snapshot

    side, heads = 7, 9
    torch.manual_seed(2)
    probs = torch.softmax(torch.randn(1, heads, side * side, side * side, dtype=torch.float64) * 4, -1)

    class Fake(nn.Module):
        def forward(self, x, return_attention=False):
            return x.mean(dim=(1, 2, 3))[:, None], [probs, probs ** 2 / (probs ** 2).sum(-1, keepdim=True)]

    snap = attention_snapshot(Fake(), torch.zeros(1, 3, 14, 14))
    assert [tuple(p.shape) for p in snap["shift_profile"]] == [(heads, 5, 5)] * 2
    np.testing.assert_allclose(snap["shift_profile"][0].numpy(), shift_profile(probs[0], side, side, 2)[0], atol=1e-6)
    centre = (side // 2) * side + side // 2
    stored = {"epoch": 3, "shift_profile": [p.double().numpy() for p in snap["shift_profile"]]}
    older = {"epoch": 3, "centre_probs": torch.stack([p.float() for p in snap["centre_probs"]]).numpy()}
    scores, queries = snapshot_conv_likeness([stored], side, side)
    assert queries == "all" and scores.shape == (1, 2)
    assert scores[0, 0] == pytest.approx(conv_likeness(probs[0], side, side)["score"], abs=1e-6)
    estimate, queries = snapshot_conv_likeness([stored, older], side, side)
    assert queries == 1 and estimate.shape == (2, 2)
    assert estimate[1, 0] == pytest.approx(
        conv_likeness(probs[0][:, [centre]], side, side, queries=[centre])["score"], abs=1e-3)  # float16 rows
    padded = dict(older, centre_probs=np.concatenate([older["centre_probs"],
                                                      np.full((2, 1, side * side), np.nan, np.float32)], axis=1))
    np.testing.assert_allclose(snapshot_conv_likeness([padded], side, side)[0], estimate[1:], atol=1e-12)
    with pytest.raises(ValueError, match="epoch 3 holds neither"):
        snapshot_conv_likeness([{"epoch": 3}], side, side)
