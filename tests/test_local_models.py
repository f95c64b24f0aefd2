"""SAN, SASA and FCViT networks: shapes, gradients, eval hygiene (B5), the SAN bottleneck fix (B11), hierarchy."""
import pytest
import torch
import torch.nn.functional as F

from satconv import config as C
from satconv.models import build_model, count_parameters

SMALL = {"stage_depths": [1, 1], "stage_widths": [16, 16]}
VARIANTS = {
    "san_pairwise": {"arch": "san", "attention": {"kind": "san_pairwise", "local": {"kernel_size": 3}}},
    "san_patchwise": {"arch": "san", "attention": {"kind": "san_patchwise", "local": {"kernel_size": 3}}},
    "san_pairwise_hier": {"arch": "san", "hierarchical": True,
                          "attention": {"kind": "san_pairwise", "local": {"kernel_size": 3}}},
    "sasa": {"arch": "sasa", "attention": {"kind": "sasa", "local": {"kernel_size": 3}}},
    "fcvit": {"arch": "fcvit", "attention": {"kind": "fcvit", "fcvit": {"kernel_size": 5}}},
}


def model_cfg(variant, **over):
    m = {**SMALL, **VARIANTS[variant], **over}
    m["attention"] = {"num_heads": 2, **m["attention"]}
    return C.from_dict({"model": m}).model


def build(variant, seed=0, **over):
    torch.manual_seed(seed)
    return build_model(model_cfg(variant, **over))


def bn_buffers(model):
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n}


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_and_attention_maps(variant):
    model = build(variant).train()
    x = torch.randn(2, 3, 32, 32)
    logits, probs = model(x, return_attention=True)
    assert logits.shape == (2, 10)
    passes = 2 if variant.endswith("hier") else 1  # hierarchical: the shared stage runs len(stage_depths) times
    assert len(probs) == passes * len(model.attention_layers())
    n_first = 32 * 32 if variant in ("sasa", "fcvit", "san_pairwise_hier") else 16 * 16
    assert probs[0].shape == ((1 if variant == "fcvit" else 2), 2, n_first, n_first)
    loss = F.cross_entropy(logits, torch.tensor([1, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("variant", VARIANTS)
def test_eval_is_deterministic_and_leaves_batchnorm_stats_alone(variant):
    """B5: two eval forwards agree exactly; an eval pass does not touch BN running statistics."""
    model = build(variant, dropout=0.3, attention={**VARIANTS[variant]["attention"], "dropout": 0.3})
    model.train()
    model(torch.randn(4, 3, 16, 16))  # move running stats off their init
    model.eval()
    before = bn_buffers(model)
    x = torch.randn(2, 3, 12, 12)  # a grid size no other test uses: its footprint tables are built here
    with torch.inference_mode():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    after = bn_buffers(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model.train()
    model(x).sum().backward()  # tables first built under inference_mode must still work with autograd


def test_san_bottleneck_attends_to_relu_bn1_of_x():
    """B11: SAM reads ReLU(bn1(x)), not the raw x, so bn1 gets gradients."""
    model = build("san_pairwise")
    block = model.stages[0][0]
    seen = {}

    def keep_input(module, args, output):
        seen["input"] = args[0]  # returns None: the output is left unchanged

    block.attn.register_forward_hook(keep_input)
    x = torch.randn(2, 16, 8, 8)
    block.eval()
    block(x)
    expected = torch.relu(block.bn1(x)).permute(0, 2, 3, 1)
    assert torch.equal(seen["input"], expected)
    assert not torch.equal(seen["input"], x.permute(0, 2, 3, 1))
    block.train()
    out, _, _ = block(x)
    out.square().mean().backward()
    assert block.bn1.weight.grad.abs().max() > 0 and block.bn1.bias.grad.abs().max() > 0


def test_san_hierarchical_reuses_first_pass_keys():
    """Pass 0 runs normally; in later passes block j takes its keys from its pass-0 attention input."""
    model = build("san_pairwise_hier", stage_depths=[2, 2, 2], stage_widths=[16, 16, 16]).eval()
    blocks = model.stages[0]
    assert len(model.stages) == 1 and len(blocks) == 2 and len(model.convs) == 3
    with torch.no_grad():  # near-uniform at init: sharpen gamma so that the keys visibly matter
        for block in blocks:
            block.attn.gamma[-1].weight.mul_(30)

    def run(reuse):
        h, maps = torch.relu(model.bn_in(model.conv_in(x))), []
        first = []
        for i, (conv, norm) in enumerate(zip(model.convs, model.norms)):
            h = conv(h)  # full resolution: no pooling
            for j, block in enumerate(blocks):
                a_in = torch.relu(block.bn1(h)).permute(0, 2, 3, 1)
                if i == 0:
                    first.append(a_in)
                a, p = block.attn(a_in, return_attention=True, key_source=first[j] if reuse and i > 0 else None)
                h = block.conv(torch.relu(block.bn2(a.permute(0, 3, 1, 2)))) + h
                maps.append(p)
            h = torch.relu(norm(h))
        return h, maps

    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        got, probs = model.features(x, return_attention=True)
        assert len(probs) == 6  # 3 passes x 2 blocks
        ref, ref_probs = run(reuse=True)
        assert (got - ref).abs().max() < 1e-5
        assert max((p - q).abs().max() for p, q in zip(probs, ref_probs)) < 1e-5
        _, plain_probs = run(reuse=False)
        assert (probs[0] - plain_probs[0]).abs().max() < 1e-5  # pass 0 is the same either way
        assert max((p - q).abs().max() for p, q in zip(probs[2:], plain_probs[2:])) > 0.05  # later passes differ


def test_san_pools_down_to_a_usable_map():
    """32 -> 16 -> 8 -> 4 -> 2 for four stages; a fifth stage stays at 2x2 instead of pooling to 1x1."""
    for stages in (4, 5):
        model = build("san_patchwise", stage_depths=[1] * stages, stage_widths=[16] * stages).eval()
        with torch.no_grad():
            feats, _ = model.features(torch.randn(1, 3, 32, 32))
        assert feats.shape[-2:] == (2, 2)


def san_block_params(planes, kind, k=3, groups=8):
    """hszhao/SAN Bottleneck parameters, from its layer definitions (conv1/2/3 with bias)."""
    rel, mid = planes // 16, planes // 4
    sam = 2 * (planes * rel + rel) + planes * mid + mid  # conv1, conv2 (phi, psi), conv3 (beta)
    if kind == "pairwise":
        sam += 2 * (rel + 2) + (rel + 2) * rel + 2 * rel + rel * groups + groups + 2 * 2 + 2  # conv_w, conv_p
    else:
        c_in = rel * (k * k + 1)
        sam += 2 * c_in + c_in * groups + 2 * groups + groups * k * k * groups + k * k * groups
    return 2 * planes + sam + 2 * mid + mid * planes + planes  # bn1, SAM, bn2, conv


@pytest.mark.parametrize("kind", ["pairwise", "patchwise"])
def test_re_san_parameter_counts(kind):
    """The [Re] CIFAR SAN (4 x 2 blocks, c = 256, 8 groups): hszhao/SAN layer counts; hier ~ paper.md §4.6."""
    block = san_block_params(256, kind)
    stem, head, between = 3 * 256 + 2 * 256, 256 * 10 + 10, 256 * 256 + 2 * 256  # conv_in+bn_in, fc, conv_i+bn_i
    plain = build_model(C.load(C.REPO_ROOT / "configs" / f"re_san_{kind}.yaml"))
    hier = build_model(C.load(C.REPO_ROOT / "configs" / f"re_san_{kind}_hier.yaml"))
    assert count_parameters(plain) == stem + 4 * between + 8 * block + head
    assert count_parameters(hier) == stem + 4 * between + 2 * block + head
    reported = {"pairwise": 0.353e6, "patchwise": 0.356e6}[kind]  # "used by the hier forward", 3 digits
    assert abs(count_parameters(hier) - reported) < 500
