"""Kernel time by category (satconv.bench.kernels): kernel names, the CPU breakdown, the launching operators."""
import json

import pytest
import torch

from satconv import config as C

QUADRATIC_YAML = str(C.REPO_ROOT / "configs" / "paper_quadratic.yaml")


@pytest.mark.parametrize("name, category", [
    ("nvjet_sm90_tst_80x256_64x5_1x2_h_bz_coopA_bias_TNN", "matrix product"),
    ("void cutlass::Kernel2<cutlass_75_tensorop_bf16_s1688gemm_bf16_256x128_nt_align1>", "matrix product"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float>", "matrix product"),
    ("triton_red_fused__softmax__to_copy_add_exp_native_dropout_prepare_softmax_online_view_23", "softmax"),
    ("triton_per_fused__to_copy_add_native_dropout_backward_native_layer_norm_backward_view_9", "normalisation"),
    ("triton_poi_fused__unsafe_view_bmm_clone_permute_view_13", "layout copy"),
    ("triton_poi_fused__to_copy__unsafe_view_add_bmm_transpose_view_22", "other element-wise"),
    ("triton_per_fused___rshift____to_copy_add_arange_bitwise_and_clone_mul_permute_squeeze_sub_sum_view_16",
     "other element-wise"),
    ("triton_poi_fused_index_put_new_zeros_permute_transpose_view_22", "other element-wise"),
    ("triton_poi_fused__to_copy_7", "layout copy"),
    ("aten::copy_", "layout copy"),
    ("aten::_to_copy", "layout copy"),
    ("void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>", "layout copy"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("void at::native::multi_tensor_apply_kernel<TensorListMetadata<3>>", "optimizer"),
    ("triton_poi_fused_gelu_gelu_backward_view_6", "other element-wise"),
    ("aten::addmm", "matrix product"),
    ("aten::bmm", "matrix product"),
    ("aten::native_layer_norm_backward", "normalisation"),
    ("aten::mul", "other element-wise"),
])


def test_kernel_names_are_categorised(name, category):
    """Kernel names as an H200 profile of the models printed them (and CPU operator names)."""
    from satconv.bench.kernels import categorise
    assert categorise(name) == category


def test_kernel_breakdown_on_cpu_sums_its_categories():
    from satconv.bench.kernels import categorise, kernel_breakdown
    row = kernel_breakdown(C.load(QUADRATIC_YAML, profile="quick"), batch=4, device="cpu", warmup=1, steps=1, top=5)
    assert row["device_type"] == "cpu" and row["batch"] == 4 and row["step_ms"] > 0 and row["inductor"] is None
    assert abs(sum(row["categories"].values()) - row["kernel_ms"]) < 1e-9
    assert "matrix product" in row["categories"] and "softmax" in row["categories"]
    assert len(row["kernels"]) == 5 and row["kernels"][0]["ms"] >= row["kernels"][-1]["ms"]
    assert row["category_rule"] and all(k["category"] == categorise(k["name"]) for k in row["kernels"])
    json.dumps(row)  # JSON-ready
    with pytest.raises(ValueError, match="warmup, steps and batch"):
        kernel_breakdown(C.load(QUADRATIC_YAML, profile="quick"), batch=4, device="cpu", steps=0)


def test_kernel_launchers_name_the_outermost_aten_operator():
    """A copy kernel launched inside aten::baddbmm's aten::copy_ is baddbmm's, one launched by aten::addmm
    itself is addmm's; kernels with no aten operator above them (Triton, graph replays) are left out."""
    from types import SimpleNamespace as E
    from satconv.bench.kernels import kernel_launchers
    region = E(name="## Call CompiledFxGraph abc", cpu_parent=None, kernels=[])
    baddbmm = E(name="aten::baddbmm", cpu_parent=region, kernels=[E(name="gemm")])
    copy = E(name="aten::copy_", cpu_parent=baddbmm, kernels=[E(name="direct_copy")])
    addmm = E(name="aten::addmm", cpu_parent=region, kernels=[E(name="direct_copy"), E(name="gemm")])
    triton = E(name="triton_poi_fused_add_0", cpu_parent=region, kernels=[E(name="triton_poi_fused_add_0")])
    events = [region, baddbmm, copy, addmm, addmm, triton]
    assert kernel_launchers(events) == {"gemm": {"aten::baddbmm": 1, "aten::addmm": 2},
                                        "direct_copy": {"aten::baddbmm": 1, "aten::addmm": 2}}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA unavailable")
def test_kernel_launchers_find_the_bias_copy_of_addmm_into_padded_rows_on_gpu():
    """The case that cost the content models a copy per layer: addmm into an output whose rows are padded
    (not contiguous) cannot add the bias in cuBLASLt's epilogue and copies it into the output first; the
    profile attributes the copy kernels to aten::addmm.  Into a contiguous output there is no copy."""
    from satconv.bench.kernels import kernel_launchers
    x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(64, 96, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(96, device="cuda", dtype=torch.bfloat16)
    copies = {}
    for stride in (128, 96):  # padded rows, then contiguous
        out = torch.empty_strided((256, 96), (stride, 1), device="cuda", dtype=torch.bfloat16)
        torch.addmm(bias, x, w, out=out)  # warm-up
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.addmm(bias, x, w, out=out)
            torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), (x.float() @ w.float() + bias.float()), rtol=2e-2, atol=2e-1)
        copies[stride] = {k: v for k, v in kernel_launchers(prof.events()).items() if "copy" in k}
    # (ATen may copy more than once there, the bias in and a result buffer back: the H200 showed 2 launches)
    assert copies[128] and all(set(ops) == {"aten::addmm"} for ops in copies[128].values())
    assert not copies[96]
