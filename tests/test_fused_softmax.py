"""The Triton softmax + dropout of the folded route (:mod:`satconv.attention.fused_softmax`) against torch.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, in a subprocess, because
the variable is read when the kernels are defined); on CUDA they run compiled.  The reference is the
float32 softmax of torch with the per-axis relative terms broadcast in, and, for dropout, the mask
read back from the kernel's output.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from satconv.attention.fused_softmax import attention_softmax, reference_attention_softmax, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton not installed")

CHECKS = textwrap.dedent("""
    import torch
    from satconv.attention.fused_softmax import attention_softmax, reference_attention_softmax

    def check(device, dtype, atol):
        torch.manual_seed(0)
        r, h, w = 37, 4, 5
        x = torch.randn(r, h * w, device=device).to(dtype).requires_grad_()
        row = torch.randn(r, h, device=device).to(dtype).requires_grad_()
        col = torch.randn(r, w, device=device).to(dtype).requires_grad_()
        out = attention_softmax(x, row, col, p=0.0, width=w)
        ref = reference_attention_softmax(x, row, col, h * w, 0.0, w)
        assert out.dtype == dtype and out.shape == (r, h * w)
        torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=atol)
        g = torch.randn(r, h * w, device=device).to(dtype)
        got = torch.autograd.grad((out.float() * g.float()).sum(), [x, row, col])
        want = torch.autograd.grad((ref.float() * g.float()).sum(), [x, row, col])
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=4 * atol)

        # padded keys and dropout: masked keys get 0, kept ones probs / (1 - p), gradient through the mask
        x2 = torch.randn(300, 21, device=device).to(dtype).requires_grad_()
        p = 0.25
        o2 = attention_softmax(x2, n_valid=17, p=p)
        probs = reference_attention_softmax(x2, None, None, 17, 0.0, 1).float()
        kept = o2 != 0
        assert o2[:, 17:].abs().max().item() == 0
        rate = 1 - kept[:, :17].float().mean().item()
        assert abs(rate - p) < 0.03, rate
        torch.testing.assert_close(o2.float()[kept], probs[kept] / (1 - p), rtol=0, atol=atol)
        g2 = torch.randn(300, 21, device=device)
        (d,) = torch.autograd.grad((o2.float() * g2).sum(), x2)
        gm = g2 * kept / (1 - p)
        expected = probs * (gm - (gm * probs).sum(-1, keepdim=True))
        torch.testing.assert_close(d.float(), expected, rtol=0, atol=4 * atol)
        # a fresh seed every call: two calls draw different masks
        assert not torch.equal(attention_softmax(x2, n_valid=17, p=p) != 0, kept)
""")


def test_kernels_match_torch_in_the_interpreter():
    """Forward (relative terms, float32 softmax), backward (logits, row and column terms), key mask and
    dropout (rate, scaling, gradient through the regenerated mask) in Triton's CPU interpreter."""
    code = CHECKS + "\ncheck('cpu', torch.float32, 1e-6)\nprint('ok')\n"
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_cpu_falls_back_to_torch():
    """Without the interpreter the CPU runs the torch reference (same values, torch's dropout)."""
    torch.manual_seed(0)
    x = torch.randn(6, 12)
    if os.environ.get("TRITON_INTERPRET") != "1":
        torch.testing.assert_close(attention_softmax(x, n_valid=9), reference_attention_softmax(x, None, None, 9, 0.0, 1))
    with pytest.raises(ValueError, match="row and col"):
        attention_softmax(x, row=torch.zeros(6, 3))
    with pytest.raises(ValueError, match="dropout"):
        attention_softmax(x, p=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA unavailable")
def test_kernels_match_torch_on_gpu():
    """The compiled kernels: float32 to rounding, bf16 to bf16 rounding of the stored probabilities."""
    namespace = {}
    exec(CHECKS, namespace)
    namespace["check"]("cuda", torch.float32, 1e-6)
    namespace["check"]("cuda", torch.bfloat16, 1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA unavailable")
def test_compiled_with_cuda_graphs():
    """Under torch.compile with CUDA graphs the op runs and still draws a new mask every step."""
    def f(x):
        return attention_softmax(x, p=0.5) * 2

    g = torch.compile(f, mode="reduce-overhead")
    x = torch.randn(64, 256, device="cuda")
    outs = [g(x).clone() for _ in range(4)]
    assert not torch.equal(outs[-1] != 0, outs[-2] != 0)
    kept = outs[-1] != 0
    expected = torch.softmax(x, -1) / 0.5 * 2
    torch.testing.assert_close(outs[-1][kept], expected[kept], rtol=0, atol=1e-6)
