"""satconv.attention.fused: the Triton softmax-and-dropout backward equals the PyTorch expressions.

Without a GPU the kernel runs in Triton's interpreter, which has to be switched on before the kernel is
defined, so those checks run in a fresh interpreter (``TRITON_INTERPRET=1``).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from satconv.attention import fused
from satconv.attention.folded import pack_mask

pytestmark = pytest.mark.skipif(not fused.available(), reason="Triton is not importable")

REFERENCE = textwrap.dedent("""
    import torch
    from satconv.attention import folded, fused

    def reference(g, probs, keep, g_rowsum, p):
        # the PyTorch expressions of SoftmaxDropoutMix.backward, in float32
        d = g.float() if g_rowsum is None else g.float() + g_rowsum[..., None]
        k = keep.float() / (1 - p)
        d = d * k
        pw = probs.float()
        return pw * (d - (d * pw).sum(-1, keepdim=True)), pw * k

    def case(b, r, n, p, with_rowsum, dtype, device="cpu"):
        probs = torch.softmax(torch.randn(b, r, n, device=device), -1).to(dtype)
        keep = torch.rand(b, r, n, device=device) >= p
        g = torch.randn(b, r, n, device=device).to(dtype)
        g_rowsum = torch.randn(b, r, device=device) if with_rowsum else None
        packed = folded.pack_mask(keep) if p else None
        got = fused.softmax_dropout_backward(g, probs, packed, g_rowsum, p, torch.float32, dtype)
        return got, reference(g, probs, keep, g_rowsum, p)
""")

INTERPRETED = REFERENCE + textwrap.dedent("""
    torch.manual_seed(0)
    # key counts: a power of two, ViT's padded 264-like odd sizes, fewer rows than a program takes
    for b, r, n, p, with_rowsum, dtype in [(2, 7, 16, 0.25, True, torch.float32),
                                           (1, 3, 13, 0.0, False, torch.float32),
                                           (2, 5, 40, 0.4, True, torch.bfloat16),
                                           (3, 33, 24, 0.1, False, torch.float32)]:
        (d_logits, dropped), (ref_logits, ref_dropped) = case(b, r, n, p, with_rowsum, dtype)
        assert d_logits.dtype == torch.float32 and dropped.dtype == dtype
        torch.testing.assert_close(d_logits, ref_logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(dropped, ref_dropped.to(dtype), rtol=0 if dtype == torch.float32 else 8e-3,
                                   atol=1e-7)

    # through SoftmaxDropoutMix: the fused backward has autograd's gradients for the mask drawn
    # CPU tensors run the interpreted kernel (TRITON_INTERPRET=1) where the fused flags ask for it
    launches = []
    launch = fused._launch
    fused._launch = lambda *args: launches.append(1) or launch(*args)  # counts the kernel's launches
    for p in (0.0, 0.3):
        torch.manual_seed(1)
        logits = torch.randn(2, 6, 13, requires_grad=True)
        values = torch.randn(2, 13, 5, requires_grad=True)
        g_mixed, g_rowsum = torch.randn(2, 6, 5), torch.randn(2, 6)
        torch.manual_seed(7)
        mixed, rowsum = folded.SoftmaxDropoutMix.apply(logits, values, p, torch.float32, 0, None, None, None,
                                                       False, True)  # the fused backward only
        got = torch.autograd.grad((mixed * g_mixed).sum() + (rowsum * g_rowsum).sum(), [logits, values])
        torch.manual_seed(7)
        keep = torch.empty(2, 6, 13, dtype=torch.uint8).bernoulli_(1 - p).bool()
        dropped = torch.softmax(logits, -1) * keep / (1 - p)
        loss = ((dropped @ values) * g_mixed).sum() + (dropped.sum(-1) * g_rowsum).sum()
        want = torch.autograd.grad(loss, [logits, values])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

        # compiled by inductor: the operator runs as it is, with the same mask (keep_mask is eager's draw)
        def loss_of(lg, vl):
            m, rs = folded.SoftmaxDropoutMix.apply(lg, vl, p, torch.float32, 0, None, None, None, False, True)
            return (m * g_mixed).sum() + (rs * g_rowsum).sum()

        torch.manual_seed(7)
        before = len(launches)
        compiled = torch.autograd.grad(torch.compile(loss_of, dynamic=False)(logits, values), [logits, values])
        assert len(launches) == before + 1  # the compiled backward ran the kernel
        for a, b in zip(compiled, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # the fused forward: relative terms, padded keys, softmax, dropout, packing and row sums in one kernel
    for b, r, hk, wk, n_valid, p, dtype in [(2, 7, 4, 4, 16, 0.25, torch.float32),
                                            (1, 5, 1, 13, 11, 0.0, torch.float32),
                                            (2, 6, 4, 4, 16, 0.4, torch.bfloat16),
                                            (2, 3, 1, 40, 37, 0.1, torch.bfloat16)]:
        n, rel = hk * wk, hk > 1
        scores = torch.randn(b, r, n)
        row, col = (torch.randn(b, r, hk), torch.randn(b, r, wk)) if rel else (None, None)
        keep = (torch.rand(b, r, n) >= p) if p else None
        probs, dropped, packed, rowsum = fused.softmax_dropout_forward(scores, row, col, n_valid, keep, p, dtype, dtype)
        full = scores if not rel else (scores.view(b, r, hk, wk) + row[..., None] + col[..., None, :]).view(b, r, n)
        full = full.masked_fill(torch.arange(n) >= n_valid, float("-inf"))
        ref = torch.softmax(full, -1).to(dtype)
        k = torch.ones(b, r, n) if keep is None else keep.float() / (1 - p)
        tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=4e-3)  # a bf16 step
        torch.testing.assert_close(probs.float(), ref.float(), **tol)
        assert (probs[..., n_valid:] == 0).all()
        torch.testing.assert_close(dropped.float(), probs.float() * k, **tol)
        torch.testing.assert_close(rowsum, (probs.float() * k).sum(-1), rtol=1e-5, atol=1e-5)
        assert (packed is None) == (keep is None) and (keep is None or torch.equal(packed, folded.pack_mask(keep)))

    # SoftmaxDropoutMix with relative terms and padding: fused forward and backward against the PyTorch path
    def run_mix(fwd, bwd, p):
        torch.manual_seed(3)
        lg = torch.randn(2, 6, 16, requires_grad=True)
        vl = torch.randn(2, 16, 5, requires_grad=True)
        rw = torch.randn(2, 6, 4, requires_grad=True)
        cl = torch.randn(2, 6, 4, requires_grad=True)
        gm, gs = torch.randn(2, 6, 5), torch.randn(2, 6)
        torch.manual_seed(9)
        m, rs = folded.SoftmaxDropoutMix.apply(lg, vl, p, torch.float32, 0, rw, cl, 14, fwd, bwd)
        grads = torch.autograd.grad((m * gm).sum() + (rs * gs).sum(), [lg, vl, rw, cl])
        return (m, rs) + grads

    for p in (0.0, 0.3):
        want = run_mix(False, False, p)
        for fwd, bwd in ((True, True), (True, False), (False, True)):
            for a, b in zip(run_mix(fwd, bwd, p), want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # whole models on both kernels (the folded forward hands them the relative terms and the padding)
    # against the explicit model, logits and gradients, float32, evaluation mode (no dropout drawn)
    from satconv import config as C
    from satconv.attention.routes import EXPLICIT, using_routes
    from satconv.models import build_model
    forwards = []
    forward = fused.softmax_dropout_forward
    fused.softmax_dropout_forward = lambda *args: forwards.append(args[1] is not None) or forward(*args)
    for name in ("paper_learned_content", "re_vit"):
        torch.manual_seed(0)
        model = build_model(C.load(C.REPO_ROOT / "configs" / f"{name}.yaml", ["model.num_layers=2"])).eval()
        x = torch.randn(2, 3, 32, 32)

        def run():
            out = model(x)
            return [out] + list(torch.autograd.grad(out.square().sum(), list(model.parameters()), allow_unused=True,
                                                     materialize_grads=True))
        before = len(launches)
        got = run()
        assert len(launches) == before + 2  # both blocks ran the fused backward
        assert forwards[-2:] == [name == "paper_learned_content"] * 2  # and the fused forward, relative terms in it
        with using_routes(model, EXPLICIT):
            want = run()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # a launch shape given per call (the launch sweep's way) changes how rows are split, not the results,
    # and leaves the LAUNCH table alone
    table = dict(fused.LAUNCH)
    torch.manual_seed(5)
    sc, kp, gg = torch.randn(2, 7, 24), torch.rand(2, 7, 24) >= 0.2, torch.randn(2, 7, 24)
    base_f = forward(sc, None, None, 24, kp, 0.2, torch.float32, torch.float32)  # the unpatched kernel
    base_b = fused.softmax_dropout_backward(gg, base_f[0], base_f[2], None, 0.2, torch.float32, torch.float32)
    for shape in ((1, 1), (4, 2), (16, 4)):
        f = forward(sc, None, None, 24, kp, 0.2, torch.float32, torch.float32, launch=shape)
        b = fused.softmax_dropout_backward(gg, f[0], f[2], None, 0.2, torch.float32, torch.float32, launch=shape)
        for x, y in zip((*f, *b), (*base_f, *base_b)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert fused.LAUNCH == table
    print("ok")
""")


def test_fused_kernels_equal_the_pytorch_expressions_interpreted():
    """Backward: float32 to rounding (bf16 inputs: the dropped probabilities to one bf16 step) for several key
    counts, with and without dropout and the row-sum gradient; SoftmaxDropoutMix's gradients with it equal
    plain autograd's for the same mask, eager and compiled by inductor.  Forward: the probabilities (zero on
    padded keys), dropped probabilities, packed mask and row sums for several shapes, with and without
    relative terms; and SoftmaxDropoutMix with relative terms and padding gives the same outputs and
    gradients (row and column terms included) with either kernel or both as with the PyTorch expressions."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_fused_kernels_run_only_where_they_apply(monkeypatch):
    """A fused kernel runs where its flag asks, on CUDA tensors in a float dtype (or CPU tensors under Triton's
    interpreter); never on plain CPU tensors or float64; the flags come from the config, into bench rows and
    onto the model's layers."""
    from satconv import config as C
    from satconv.attention.routes import fused_runs, routes_of
    from satconv.bench.harness import run_options
    from satconv.models import build_model
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused_runs(True, torch.zeros(1)) and not fused_runs(False, torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_runs(True, torch.zeros(1)) == fused.available() and not fused_runs(False, torch.zeros(1))
    assert not fused_runs(True, torch.zeros(1, dtype=torch.float64))
    cfg = C.load(C.REPO_ROOT / "configs" / "paper_learned_content.yaml")
    assert run_options(cfg, "cpu")["fused_backward"] is False  # bench rows record it
    assert run_options(cfg, "cpu")["fused_forward"] is False
    off = C.override(cfg, ["train.fused_forward=false", "train.fused_backward=false"])
    assert run_options(off, "cuda")["fused_backward"] is False and run_options(off, "cuda")["fused_forward"] is False
    assert run_options(cfg, "cuda")["fused_forward"] is fused.available()
    r = routes_of(build_model(C.override(cfg, ["train.fused_forward=false", "model.num_layers=1"])))
    assert r.fused_forward is False and r.fused_backward is True
    if torch.cuda.is_available():
        assert fused_runs(True, torch.zeros(1, device="cuda", dtype=torch.bfloat16))
        assert not fused_runs(True, torch.zeros(1, device="cuda", dtype=torch.float64))
        assert not fused_runs(False, torch.zeros(1, device="cuda"))


def test_bench_flags_turn_the_fused_kernels_off_through_the_config(monkeypatch):
    """``bench --no-fused-forward`` / ``--no-fused-backward`` become ``--set train.fused_*=false`` for every
    config of the command; ``--fused-launch`` refuses them."""
    from satconv.bench import cli
    seen = []
    monkeypatch.setattr(cli, "_bench", lambda parser, args: seen.append(list(args.set)) or 0)
    cfg = "configs/paper_quadratic.yaml"
    assert cli.bench_main(["--config", cfg, "--no-fused-forward"]) == 0
    assert cli.bench_main(["--config", cfg, "--no-fused-backward", "--set", "train.lr=0.2"]) == 0
    assert cli.bench_main(["--config", cfg]) == 0
    assert seen == [["train.fused_forward=false"], ["train.lr=0.2", "train.fused_backward=false"], []]
    with pytest.raises(SystemExit):
        cli.bench_main(["--config", cfg, "--fused-launch", "--no-fused-forward"])


def test_launch_shapes_come_from_the_table_or_the_rule():
    """Measured row blocks read :data:`fused.LAUNCH`; others get about 1024 entries per program, at least one
    row; an unknown kernel name is an error that names the allowed ones."""
    for (kernel, block), shape in fused.LAUNCH.items():
        assert fused.launch_shape(kernel, block) == shape
    assert fused.launch_shape("forward", 64) == (16, 4) and fused.launch_shape("backward", 128) == (8, 4)
    assert fused.launch_shape("backward", 4096) == (1, 4)
    with pytest.raises(ValueError, match="'forward' or 'backward'"):
        fused.launch_shape("sideways", 256)
    from satconv import config as C
    from satconv.bench.harness import run_options
    assert fused.launch_table() == "backward/256=8x4, backward/512=1x2, forward/256=8x2, forward/512=1x1"
    cfg = C.load(C.REPO_ROOT / "configs" / "paper_learned_content.yaml")
    assert run_options(cfg, "cpu")["fused_launch"] is None  # no fused kernel runs on a CPU
    off = C.override(cfg, ["train.fused_forward=false", "train.fused_backward=false"])
    assert run_options(off, "cuda")["fused_launch"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA unavailable")
def test_fused_launch_sweep_times_every_shape_and_restores_the_table_gpu():
    """The sweep records both kernels of a content model, times each launch pair on the recorded arguments,
    flags one fastest per kernel and leaves :data:`fused.LAUNCH` as it was."""
    from satconv import config as C
    from satconv.bench.fused_launch import fused_launch_sweep

    cfg = C.load(C.REPO_ROOT / "configs" / "paper_learned_content.yaml", ["model.num_layers=1"])
    table = dict(fused.LAUNCH)
    rows = fused_launch_sweep(cfg, batch=2, rows_per_program=(1, 4), warps=(1, 2), warmup=1, repeats=3)
    assert fused.LAUNCH == table
    assert sorted({r["kernel"] for r in rows}) == ["backward", "forward"] and len(rows) == 8
    for kernel in ("backward", "forward"):
        mine = [r for r in rows if r["kernel"] == kernel]
        assert sum(r["fastest"] for r in mine) == 1 and all(r["us"] > 0 for r in mine)
        assert mine[0]["shape"][-1] == 256 and mine[0]["block"] == 256


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA unavailable")
def test_fused_backward_equals_the_pytorch_expressions_gpu():
    """The compiled kernel on the GPU, at the content model's row length and ViT's padded one."""
    scope = {}
    exec(REFERENCE, scope)
    torch.manual_seed(0)
    for n, dtype in [(256, torch.bfloat16), (264, torch.bfloat16), (256, torch.float32)]:
        (d_logits, dropped), (ref_logits, ref_dropped) = scope["case"](4, 300, n, 0.1, True, dtype, "cuda")
        torch.testing.assert_close(d_logits, ref_logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(dropped.float(), ref_dropped.to(dtype).float(), rtol=8e-3, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA unavailable")
def test_fused_forward_equals_the_pytorch_expressions_gpu():
    """The compiled forward kernel on the GPU: the content model's relative layout (16 x 16 keys) and ViT's
    padded keys (257 of 264), in bf16 with dropout."""
    torch.manual_seed(0)
    for hk, wk, n_valid in [(16, 16, 256), (1, 264, 257)]:
        b, r, n = 4, 300, hk * wk
        scores = torch.randn(b, r, n, device="cuda").bfloat16()
        row, col = ((torch.randn(b, r, hk, device="cuda"), torch.randn(b, r, wk, device="cuda")) if hk > 1
                    else (None, None))
        keep = torch.rand(b, r, n, device="cuda") >= 0.1
        probs, dropped, packed, rowsum = fused.softmax_dropout_forward(scores, row, col, n_valid, keep, 0.1,
                                                                       torch.bfloat16, torch.bfloat16)
        full = scores.float()
        if row is not None:
            full = (full.view(b, r, hk, wk) + row[..., None] + col[..., None, :]).view(b, r, n)
        full = full.masked_fill(torch.arange(n, device="cuda") >= n_valid, float("-inf"))
        torch.testing.assert_close(probs.float(), torch.softmax(full, -1), rtol=1e-2, atol=4e-3)
        torch.testing.assert_close(dropped.float(), probs.float() * keep / 0.9, rtol=1e-2, atol=4e-3)
        torch.testing.assert_close(rowsum, (probs.float() * keep / 0.9).sum(-1), rtol=1e-4, atol=1e-4)
        assert torch.equal(packed, pack_mask(keep))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA unavailable")
@pytest.mark.parametrize("name", ["paper_learned_content", "re_vit"])
def test_compiled_training_gradients_with_and_without_the_fused_kernels_gpu(name):
    """A compiled bf16 training step (two blocks, dropout off so that none draws anything) has the same
    gradients with the fused backward, and with both fused kernels, as with the PyTorch expressions, to
    bf16 rounding."""
    from satconv import config as C
    from satconv.attention.routes import Routes, set_routes
    from satconv.models import build_model

    cfg = C.load(C.REPO_ROOT / "configs" / f"{name}.yaml",
                 ["model.num_layers=2", "model.dropout=0.0", "model.attention.dropout=0.0"])
    torch.manual_seed(0)
    model = build_model(cfg).cuda().train()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    grads = {}
    for fwd, bwd in ((False, False), (False, True), (True, True)):
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        set_routes(model, Routes(fused_forward=fwd, fused_backward=bwd))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            torch.compile(model)(x).float().square().mean().backward()
        grads[fwd, bwd] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    ref = grads[False, False]
    for key in ((False, True), (True, True)):
        assert ((grads[key] - ref).norm() / ref.norm()).item() < 1e-2, key


def test_first_calls_records_each_ops_first_arguments_forward_and_backward():
    """The launch sweep's recorder (a torch function mode, no patching): the first call of each op, the forward
    one and the one a custom autograd function makes in its backward, with its arguments cloned; results unchanged,
    later calls and other ops not recorded, nothing recorded once the mode is left; trailing arguments equal to
    their defaults are not passed on by the dispatcher, so not recorded either."""
    from satconv.bench.fused_launch import FirstCalls

    @torch.library.custom_op("satconv_test::scaled", mutates_args=())
    def scaled(x: torch.Tensor, k: float, launch: list[int] | None = None) -> torch.Tensor:
        return x * k

    @scaled.register_fake
    def _(x, k, launch=None):
        return torch.empty_like(x)

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.ops.satconv_test.scaled(x, 2.0, None)

        @staticmethod
        def backward(ctx, g):
            return torch.ops.satconv_test.scaled(g, 2.0, [1, 4]) + 0  # the op again, from the backward

    ops = {"op": torch.ops.satconv_test.scaled}
    x = torch.arange(3.0, requires_grad=True)
    with FirstCalls(ops) as recorder:
        y = Twice.apply(x)
        assert recorder.calls["op"][1:] == (2.0,) and recorder.calls["op"][0] is not x  # launch=None: the default
        torch.testing.assert_close(recorder.calls["op"][0], x.detach(), rtol=0, atol=0)
        first = recorder.calls["op"]
        seen = {}
        with FirstCalls({"backward": torch.ops.satconv_test.scaled}) as inner:
            (y * torch.tensor([1.0, 10.0, 100.0])).sum().backward()
            seen = dict(inner.calls)
        torch.ops.satconv_test.scaled(torch.ones(2), 5.0, None)  # a later call: not recorded
    assert recorder.calls["op"] is first and torch.equal(y.detach(), 2 * x.detach())
    assert seen["backward"][1:] == (2.0, [1, 4])
    torch.testing.assert_close(seen["backward"][0], torch.tensor([1.0, 10.0, 100.0]), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, torch.tensor([2.0, 20.0, 200.0]), rtol=0, atol=0)
    with FirstCalls(ops) as idle:
        torch.ones(2) * 3  # no op of ops
    assert idle.calls == {}
    torch.ops.satconv_test.scaled(torch.ones(2), 1.0, None)
    assert idle.calls == {}  # outside the mode
