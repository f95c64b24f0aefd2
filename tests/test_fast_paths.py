"""Fast paths pinned to explicit ones (paper.md §6; performance issue).

On CPU: the batched routes of ``AttentionBase.combine`` and the per-axis q.r gather against plain
broadcast products in float64.  On CUDA (skipped elsewhere): bf16 autocast and ``torch.compile``
against the float32 eager model, with stated tolerances.
"""
import pytest
import torch

from satconv import config as C
from satconv.attention import ContentAttention, LearnedRelativeAttention, QuadraticAttention
from satconv.models import build_model

EXACT = dict(rtol=0, atol=1e-12)  # float64, same arithmetic up to summation order
#: bf16 has an 8-bit mantissa; logits of 6 layers compound it: relative L2 error of the logits
BF16_REL = 3e-2
#: inductor reorders float32 reductions and fuses kernels
COMPILE_REL = 1e-3


def _explicit_combine(module, probs, v):
    """``softmax(A) V`` per head by broadcasting, heads concatenated, then ``W_out``."""
    b = v.shape[0]
    out = (probs.expand(b, -1, -1, -1) @ v.expand(-1, probs.shape[1], -1, -1))  # (B, H, N, D)
    return module.proj(out.transpose(1, 2).reshape(b, out.shape[2], -1))


@pytest.mark.parametrize("shared_probs", [True, False])
def test_combine_routes_equal_broadcast_product(shared_probs):
    torch.manual_seed(0)
    m = QuadraticAttention(6, 3).double()
    b, n = 4, 12
    probs = torch.softmax(torch.randn(1 if shared_probs else b, 3, n, n, dtype=torch.float64), -1)
    v = torch.randn(b, 1, n, 6, dtype=torch.float64)
    torch.testing.assert_close(m.combine(probs, v), _explicit_combine(m, probs, v), **EXACT)


def test_query_position_gather_equals_full_index():
    """The per-axis gather of q.r equals indexing the (N, N) relative-offset table directly."""
    torch.manual_seed(0)
    m = LearnedRelativeAttention(8, 2, variant="content_query_position", max_position=6).double()
    h, w = 4, 5
    q = torch.randn(3, 2, h * w, 8, dtype=torch.float64)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    d_row = rows[None, :] - rows[:, None] + 5  # key - query, shifted into the table
    d_col = cols[None, :] - cols[:, None] + 5
    e_row, e_col = m.row_embeddings.weight, m.col_embeddings.weight
    expected = (torch.einsum("bhqc,qkc->bhqk", q[..., :4], e_row[d_row])
                + torch.einsum("bhqc,qkc->bhqk", q[..., 4:], e_col[d_col]))
    torch.testing.assert_close(m.query_position_scores(q, h, w), expected, **EXACT)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA unavailable")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@cuda
@pytest.mark.parametrize("name", ["paper_quadratic", "paper_learned", "paper_learned_content"])
def test_bf16_and_compile_match_fp32_on_gpu(name):
    torch.manual_seed(0)
    model = build_model(C.load(C.REPO_ROOT / "configs" / f"{name}.yaml")).cuda().eval()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.inference_mode():
        ref = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x)
        fast = torch.compile(model)(x)
    assert _rel(low, ref) < BF16_REL
    assert _rel(fast, ref) < COMPILE_REL


@cuda
def test_return_attention_is_exact_on_gpu():
    """Probabilities returned under autocast are the float32 softmax (rows sum to 1)."""
    m = ContentAttention(16, 2).cuda()
    x = torch.randn(2, 4, 4, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, probs = m(x, return_attention=True)
    torch.testing.assert_close(probs.float().sum(-1), torch.ones(2, 2, 16, device="cuda"), rtol=0, atol=1e-2)
