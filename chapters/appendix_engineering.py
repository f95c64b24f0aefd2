# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Appendix: engineering of the fast training step
#
# The {doc}`cost` chapter reports how fast `satconv` trains the paper's models. This appendix says how:
# the benchmark protocol, the fast paths that compute the paper's attention with fewer FLOPs, bytes or
# kernel launches than the explicit formula, and the GPU measurements behind each choice. None of it
# changes what a model computes (tests compare every fast path with the explicit route), so none of it
# bears on the paper's claims.
#
# Every GPU table below comes from `python -m satconv bench` on one NVIDIA H200 at batch 100 in bf16
# autocast, on random CIFAR-10-shaped batches (no data set, schedule or seed enters a timing), and is
# read from a committed file under `book/bench/`; all rows of one table were measured with one version
# of the code, named by the `satconv` source digest the rows record
# (`satconv.provenance.source_digest`).

# %% tags=["hide-input"]
import json

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display
from myst_nb import glue
from torch.utils.flop_counter import FlopCounterMode

from satconv import config
from satconv.attention import LearnedRelativeAttention
from satconv.attention.fused import launch_shape
from satconv.attention.routes import EXPLICIT, Routes, using_routes
from satconv.bench import memory
from satconv.config import REPO_ROOT
from satconv.flops import flops_per_image
from satconv.models import build_model
from satconv.report import below, html_table

torch.manual_seed(0)
torch.set_num_threads(2)


def read_rows(filename, source):
    """The rows of `book/bench/<filename>` measured with the code of source digest `source` that ran."""
    lines = (REPO_ROOT / "book" / "bench" / filename).read_text().splitlines()
    rows = [r for r in map(json.loads, filter(str.strip, lines)) if r.get("satconv_source") == source]
    assert rows and all("error" not in r for r in rows), (filename, source)
    return rows


def measured(rows):
    """One sentence: the GPU, precision, batch (when the rows share one), torch, source digest and date."""
    keys = ("device", "precision", "torch", "satconv_source")
    (device, precision, torch_version, source), = {tuple(r[k] for k in keys) for r in rows}
    batches = {r["batch"] for r in rows}
    batch = f"batch {batches.pop()}, " if len(batches) == 1 else ""
    return (f"{device}, {precision}, {batch}torch {torch_version}, satconv source `{source}`, "
            f"{min(r['date'] for r in rows)[:10]}")


def faster(rows, config, slow, fast):
    """Whether `config`'s row picked by the predicate `fast` trains faster than the one picked by `slow`."""
    pick = lambda test: next(r["train_img_s"] for r in rows if r["config"] == config and test(r))
    return pick(fast) > pick(slow)


# %% [markdown]
# ## The benchmark protocol
#
# `satconv.bench.throughput.bench_model` builds a config's network with the paper's SGD and times three
# things on random input: a training step (forward, cross-entropy, backward, optimiser step), an
# evaluation forward pass under `inference_mode` at the same batch, and the latency of one image. It
# avoids the timing errors of the [Re]'s benchmark:
#
# - at least one untimed **warm-up** call before each timed phase (cuDNN autotuning and `torch.compile`
#   happen there);
# - **CUDA events** around every timed call and one synchronise after the last, so the host does not
#   stall the GPU between steps;
# - the **median** of the repeats, with the 10th and 90th percentiles;
# - `cudnn.benchmark = True`, **bf16 autocast** by default, a **fused SGD** step, and optionally
#   `torch.compile` (`reduce-overhead` also captures the step in CUDA graphs);
# - peak memory is `torch.cuda.max_memory_allocated` during training; MFU divides the achieved training
#   FLOP rate by the datasheet peak (`mfu`) and by a measured $8192^3$ GEMM (`mfu_measured`).
#
# Every row records the device, precision, batch, compile mode, routes, torch version, date and source
# digest.
#
# ```{literalinclude} ../satconv/bench/throughput.py
# :pyobject: bench_model
# ```
#
# ## Counting the backward pass of a grouped convolution
#
# The FLOP counts of the {doc}`cost` chapter come from `FlopCounterMode`. Its formula for the backward
# pass of a convolution (torch 2.14.1 and earlier) does not divide the weight-gradient product by the
# number of groups, so a depth-wise convolution, as in FCViT, is over-counted. One such convolution,
# counted by the stock counter:

# %%
x = torch.randn(1, 64, 16, 16, requires_grad=True)
for groups in (1, 64):
    conv = torch.nn.Conv2d(64, 64, 11, padding=5, groups=groups)
    with FlopCounterMode(display=False) as counter:
        conv(x).sum().backward()
    flops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    ratio = flops["aten.convolution_backward"] / flops["aten.convolution"]
    print(f"groups={groups:2d}: backward / forward = {ratio:.1f} (expected 2)")
glue("dw_backward_ratio", f"{ratio:.0f}", display=False)  # a ratio of integer counts

# %% [markdown]
# The depth-wise backward pass is counted {glue:text}`dw_backward_ratio` times its forward pass instead
# of 2. `satconv.flops` counts each gradient of a convolution as one forward pass, whatever its groups:
#
# ```{literalinclude} ../satconv/flops.py
# :pyobject: conv_backward_flops
# ```
#
# ## Fast paths
#
# The package computes eq. (2) of the paper two ways: the **explicit route** (scores, softmax,
# $P_h V_h$ per head, $W_{out}$), kept as the reference, and **fast paths** that compute the same
# function. Each attention layer carries its choice (`satconv.attention.routes.Routes`, shown in
# `repr(model)`), and `using_routes(model, EXPLICIT)` switches a model to the explicit route;
# `tests/test_fast_paths.py` compares the two (outputs, probabilities and every gradient, in float64 on
# the CPU, and in bf16 and compiled against float32 on a GPU).
#
# - **Folded query–key products.** With concatenated heads the query and key projections enter only
#   through $W^{(h)}_{qry}{}^\top W^{(h)}_{key}$, the product Lemma 1 reasons about. Multiplying it out
#   once per step removes the key projection; the bias terms constant along the keys cancel in the
#   softmax. The $q \cdot r$ tables of the learned relative encoding fold the same way, and so does a
#   value projection followed by $W_{out}$, and the encoder block's dense layer after $W_{out}$.
# - **One layout for all heads.** The folded queries of all heads form one $(N N_h) \times D$ matrix per
#   image, so the scores come out as $(B, N, N_h, N)$ and $P X$ lands in the layout $W_{out}$ reads.
# - **Relative logits per axis.** The row and column parts of $q \cdot r$ come from windows of the folded
#   tables, one batched GEMM per group of query rows (columns), and are broadcast-added to the content
#   logits, with no gather over the $(B, N, N_h, N)$ scores.
# - **Probabilities shared by the batch.** Quadratic and learned position-only attention do not depend on
#   the input: their $(N_h, N, N)$ probabilities are computed once per step and applied to the whole
#   batch (`train.shared_route`: `bmm_gemm`, the default, `einsum`, `bmm` or `wfirst`, compared below).
# - **Fused softmax and dropout.** The content attention's softmax, dropout and $\tilde P X$ form one
#   autograd function that keeps the probabilities in bf16 and the dropout mask packed eight entries to
#   a byte; on CUDA its element-wise work is one Triton kernel in each pass (`satconv.attention.fused`),
#   run at a launch shape measured per row length (below). Dropout masks are drawn by PyTorch's own
#   kernel (`satconv.dropout.keep_mask`) rather than inside inductor's fused kernels.
# - **Aligned key counts.** ViT's 257 tokens are padded to a multiple of 8 with keys whose logits are
#   $-\infty$, which keeps the batched products on fast tensor-core kernels.
# - **Compiled steps.** `torch.compile` with inductor's mixed-order LayerNorm reduction and its
#   comprehensive padding off (`satconv.steps.INDUCTOR_OPTIONS`), LayerNorm in the autocast dtype, and
#   for ResNet18 the whole step in one CUDA graph (`train.step_graph`, `satconv.steps.CapturedStep`).
# - **Compiled against eager.** `tests/test_compile_training.py` trains every attention config of the
#   campaign compiled and eager, from the same weights on the same batches, on a GPU. It caught a
#   compiler fault: with the attention dropout on, inductor (torch 2.11, H100) computed the first block's
#   gradients of the Gaussian centres and spreads far larger than eager did, and the 16-head model went
#   NaN early in training. The batch-shared softmax and its dropout now run as two operators that the
#   compiler calls without looking inside (`satconv.attention.softmax_dropout`); the test passes with them.
#   The same test then failed for SASA, trained in bf16 with dropout as the campaign trains it: its
#   compiled first-step gradients of the query and key weights came out 10 to 14 times eager's (H100).
#   SASA's windows and SAN's pairwise windows, the same softmax-then-mask expressions per image, now
#   go through those operators as well; whether that mends SASA on the GPU is for the test to show
#   before SASA's and SAN's runs start.
#   The two 30-epoch attention runs under *GPU results* were compiled before this mend, with an older
#   dropout (`nn.Dropout` on the shared probabilities) that the test never ran; the 300-epoch runs of the
#   campaign replace them. Training the learned + content model *eagerly*, on all three of its attention
#   routes, stayed as near chance in its first epochs as its compiled run did, so that model's trouble
#   is not this fault: it came from the per-epoch learning-rate steps of its short warm-up (results
#   chapter, "Per-epoch learning-rate steps on short schedules").
# - **The `sdpa` route** (`train.attention_route: sdpa`) sends the folded content attention through
#   `scaled_dot_product_attention`, which never stores the probabilities: a memory-lean option, not the
#   default.
#
# The FLOPs each route runs per training image (forward and backward, counted on the `meta` device):

# %%
CONFIGS = {name: config.load(REPO_ROOT / f"configs/{name}.yaml")
           for name in ("paper_learned_content", "re_vit", "paper_learned", "paper_quadratic")}
rows = []
for name in ("paper_learned_content", "re_vit", "paper_learned"):
    with torch.device("meta"):
        net = build_model(CONFIGS[name])
    explicit = flops_per_image(net, 32, "train", device="meta", batch=100)
    fast = flops_per_image(net, 32, "train", device="meta", batch=100, explicit=False)
    dense = {getattr(layer, "route_family", None) for layer in net.attention_layers()} == {"dense"}
    sdpa = "–"
    if dense:
        with using_routes(net, Routes(dense="sdpa")):
            sdpa = f"{flops_per_image(net, 32, 'train', device='meta', batch=100, explicit=False) / 1e9:.2f}"
    rows.append([name, f"{explicit / 1e9:.2f}", f"{fast / 1e9:.2f}", f"{fast / explicit:.0%}", sdpa])
html_table(["config", "explicit GFLOP / image", "fast path GFLOP / image", "fast / explicit", "sdpa GFLOP / image"],
           rows, ["Training FLOPs per image at batch 100; MFU always uses the explicit count. "
                  "sdpa: only for the content attention (the fused CUDA backward also recomputes the logits, "
                  "not counted here)."])

# %% [markdown]
# What each route keeps for the backward pass decides most of the training memory. The next table
# counts it with `satconv.bench.memory.saved_activation_bytes`: one eager training forward pass on the
# CPU under bf16 autocast, with saved-tensor hooks recording every storage autograd keeps, at two batch
# sizes to separate the part that grows with the batch from the part that does not.

# %%
rows = []
for name, cfg in CONFIGS.items():
    torch.manual_seed(0)
    net = build_model(cfg)
    explicit_img, _ = memory.saved_activation_bytes(net, explicit=True)
    fast_img, fast_fixed = memory.saved_activation_bytes(net)
    rows.append([name, f"{explicit_img / 2**20:.1f}", f"{fast_img / 2**20:.1f}", f"{fast_img / explicit_img:.0%}",
                 f"{(100 * fast_img + fast_fixed) / 2**30:.2f}"])
html_table(["config", "explicit MiB / image", "fast path MiB / image", "fast / explicit",
            "fast path at batch 100 (GiB)"], rows,
           ["Activations kept for the backward pass only; the GPU's peak also holds parameters, gradients, "
            "optimiser state and transient buffers, and torch.compile may keep less."])

# %%
# the fast path and the explicit route on one layer of the content model (float64, random weights)
torch.manual_seed(0)
layer = LearnedRelativeAttention(16, 3, variant="content_query_position", max_position=8).double()
tokens = torch.randn(2, 6, 6, 16, dtype=torch.float64)
with torch.no_grad():
    fast_out = layer(tokens)
    with using_routes(layer, EXPLICIT):
        explicit_out = layer(tokens)
gap = below((fast_out - explicit_out).abs().max().item(), 1e-12)  # float64 rounding
glue("route_gap", gap, display=False)
print(f"largest difference between the routes: {gap}")

# %% [markdown]
# On one layer of the content model in float64 the two routes differ by {glue:text}`route_gap`, that
# is by rounding error.
#
# ## Measured on the GPU
#
# ### Shared-probability routes
#
# The four ways of applying the position-only models' shared probabilities to the batch, and the
# compile mode:

# %%
routes = read_rows("h200.jsonl", "285575cf587ec7ee")
display(Markdown(f"Measured on {measured(routes)}."))
html_table(["config", "shared route", "compile", "train img/s", "step ms", "peak GiB"],
           [[r["config"], r["shared_route"], r["compile"] + (" + step graph" if r["step_graph"] else ""),
             f"{r['train_img_s']:,.0f}", f"{r['train_step_ms']:.2f}", f"{r['peak_mem_gib']:.2f}"]
            for r in sorted(routes, key=lambda r: (r["config"], -r["train_img_s"]))])

# %%
plain = lambda route: lambda r: r["shared_route"] == route and not r["step_graph"]
glue("bmm_gemm_verdict", "faster" if all(faster(routes, n, plain("einsum"), plain("bmm_gemm"))
                                         for n in ("paper_learned", "paper_quadratic")) else "not faster", display=False)

# %% [markdown]
# With the same code and compile mode, `bmm_gemm` (the default) is {glue:text}`bmm_gemm_verdict` than
# `einsum` for both models: it writes the layout $W_{out}$ reads directly and computes the
# probabilities' gradient as one GEMM over the batch.
#
# ### Inductor's comprehensive padding
#
# Inductor pads the row stride of long rows in the buffers it lays out. A padded folded-query buffer is
# not contiguous, so `addmm` copies the broadcast query bias into it instead of adding the bias in
# cuBLASLt's epilogue. `satconv` compiles with the padding off:

# %%
for tag, source in [("content", "df2cc976a629a64c"), ("position", "285575cf587ec7ee")]:
    padding = [r for r in read_rows("h200_padding.jsonl", source) if not r["step_graph"]]
    display(Markdown(f"Measured on {measured(padding)}."))
    display(html_table(["config", "padding", "train img/s", "step ms", "peak GiB"],
                       [[r["config"], "on" if r["inductor"]["comprehensive_padding"] else "off",
                         f"{r['train_img_s']:,.0f}", f"{r['train_step_ms']:.2f}", f"{r['peak_mem_gib']:.2f}"]
                        for r in sorted(padding, key=lambda r: (r["config"], not r["inductor"]["comprehensive_padding"]))]))
    pairs = []
    for name in sorted({r["config"] for r in padding}):
        by = {r["inductor"]["comprehensive_padding"]: r["train_img_s"] for r in padding if r["config"] == name}
        if len(by) == 2:
            pairs.append(f"{name} {by[False]:,.0f} img/s with it off, {by[True]:,.0f} with it on")
    glue(f"padding_{tag}", "; ".join(pairs), display=False)

# %% [markdown]
# The padding matters for the content attention, whose folded-query rows it pads
# ({glue:text}`padding_content`). The position-only models have no such buffer, and there turning it off
# is slightly slower, measured with later code ({glue:text}`padding_position`); `satconv` keeps it off
# for every model.

# %% [markdown]
# ### The fused softmax-dropout kernels
#
# The content attention (learned + content model and ViT) with the fused backward kernel alone, and with
# the fused forward kernel as well:

# %%
fused = read_rows("h200_fused.jsonl", "c60d74e64dcce3f4")
display(Markdown(f"Measured on {measured(fused)}, `--compile {fused[0]['compile']}`."))
html_table(["config", "fused forward", "fused backward", "train img/s", "step ms", "peak GiB"],
           [[r["config"], "yes" if r["fused_forward"] else "no", "yes" if r["fused_backward"] else "no",
             f"{r['train_img_s']:,.0f}", f"{r['train_step_ms']:.2f}", f"{r['peak_mem_gib']:.2f}"]
            for r in sorted(fused, key=lambda r: (r["config"], r["fused_forward"]))])

# %%
glue("fused_verdict", "faster" if all(faster(fused, n, lambda r: not r["fused_forward"], lambda r: r["fused_forward"])
                                      for n in {r["config"] for r in fused}) else "not faster", display=False)

# %% [markdown]
# With the fused forward kernel added, both models train {glue:text}`fused_verdict` than with the fused
# backward kernel alone.

# %% [markdown]
# Both kernels run a block of score rows per program; how many rows and warps comes from a table
# (`satconv.attention.fused.LAUNCH`) measured with `python -m satconv bench --fused-launch` on the
# arguments of one training step. For each kernel the sweep's fastest shape, the shape the table gave
# when the sweep ran, and the one it gives now:

# %%
sweep = read_rows("h200_fused_launch.jsonl", "4c3079724a9fa3e9")
display(Markdown(f"Measured on {measured(sweep)}; microseconds per call."))
rows = []
for key in dict.fromkeys((r["config"], r["kernel"]) for r in sweep):
    mine = [r for r in sweep if (r["config"], r["kernel"]) == key]
    best, then = min(mine, key=lambda r: r["us"]), next(r for r in mine if r["current"])
    now = launch_shape(key[1], then["block"])
    rows.append([*key, "x".join(map(str, then["shape"])), len(mine),
                 f"{best['rows_per_program']} x {best['warps']}: {best['us']:.0f}",
                 f"{then['rows_per_program']} x {then['warps']}: {then['us']:.0f}", f"{now[0]} x {now[1]}"])
html_table(["config", "kernel", "scores (B, N N_h, N)", "shapes tried", "fastest (rows x warps: us)",
            "table then (us)", "table now"], rows)

# %% [markdown]
# ### Where the time goes
#
# `python -m satconv bench --kernels` profiles three training steps after the warm-up and adds up the
# time of every GPU kernel by category (`satconv.bench.kernels.categorise`, from the kernel names and,
# for inductor's fused kernels, the operators they contain). Where a step's wall time exceeds its
# summed kernel time, the difference is launch gaps and idle time.

# %%
COLOURS = {"matrix product": "tab:blue", "convolution": "tab:cyan", "softmax": "tab:orange",
           "normalisation": "tab:green", "layout copy": "tab:red", "optimizer": "tab:purple",
           "other element-wise": "tab:gray", "launch gaps and idle": "white"}
kernels = read_rows("h200_kernels.jsonl", "ddc3d0f3c492fce2")
display(Markdown(f"Measured on {measured(kernels)}, `--compile {kernels[0]['compile']}`."))
labels = [f"{r['config']} ({r['shared_route']})" if r["shared_route"] != "einsum" else r["config"] for r in kernels]
fig, ax = plt.subplots(figsize=(8, 0.8 + 0.45 * len(kernels)))
drawn = set()
for y, r in enumerate(kernels):
    parts = dict(r["categories"], **{"launch gaps and idle": max(r["step_ms"] - r["kernel_ms"], 0)})
    left = 0.0
    for cat, colour in COLOURS.items():
        if parts.get(cat):
            ax.barh(y, parts[cat], left=left, color=colour, edgecolor="black", linewidth=0.4,
                    label=None if cat in drawn else cat)
            drawn.add(cat)
            left += parts[cat]
ax.set(yticks=range(len(kernels)), yticklabels=labels, xlabel="ms per training step")
ax.invert_yaxis()
ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
ax.set_title(f"Training step by kernel category, {kernels[0]['device']}", fontsize=10)
fig.tight_layout()
plt.show()
share = [r["categories"]["matrix product"] / r["step_ms"] for r in kernels]
busy = [r["kernel_ms"] / r["step_ms"] for r in kernels]
glue("matmul_share", f"{min(share):.0%} to {max(share):.0%}", display=False)
glue("busy_share", f"{min(busy):.0%}", display=False)

# %% [markdown]
# Each bar is one training step of a model, split by what its kernels do. Matrix products take
# {glue:text}`matmul_share` of a step; the rest is normalisation, layout copies, softmax and other
# element-wise work, which is why the MFU of the {doc}`cost` chapter stays well below the GEMM's.
# Kernels keep the GPU busy for at least {glue:text}`busy_share` of every step, so launch overhead is
# not what limits these models once compiled with CUDA graphs. The paper says nothing about where the
# time goes; this is an engineering measurement only. The most expensive kernels of each step:

# %%
html_table(["config", "category", "kernel", "ms / step", "calls / step"],
           [[label, k["category"], k["name"][:60], f"{k['ms']:.3f}", f"{k['calls']:g}"]
            for label, r in zip(labels, kernels) for k in r["kernels"][:3]])

# %% [markdown]
# ### A whole epoch against the model alone
#
# `bench --epoch` trains two epochs through `satconv.train.train` on the CIFAR-10 copy and times the
# second (data loading, augmentation and the validation pass included), next to the model-only
# throughput measured in the same command. The ratio is the epoch time over the model-only time for as
# many images.

# %%
epochs = read_rows("h200_epochs.jsonl", "285575cf587ec7ee")
display(Markdown(f"Measured on {measured(epochs)}."))
html_table(["config", "data, seed", "batch", "epoch s", "whole-epoch img/s", "model-only img/s", "ratio"],
           [[r["config"], f"{r['data']}, seed {r['seed']}", r["batch"], f"{r['epoch_time_s']:.2f}",
             f"{r['images'] / r['epoch_time_s']:,.0f}", f"{r['model_only_img_s']:,.0f}", f"{r['ratio']:.2f}"]
            for r in epochs])

# %% [markdown]
# The input pipeline keeps the GPU fed: augmentation parameters travel through pinned memory with
# non-blocking copies (`satconv.augmentation.host_to_device`), and a CUDA test checks that an epoch
# never makes the host wait for the GPU.
#
# ## Not shown
#
# The committed files also hold rows measured before the rows recorded their code (SAN, SASA and FCViT
# at batch 100, the largest batch that fits, and scaling with the image side, all uncompiled and
# without the fast paths above), and rows of older code for the same comparisons. They are left out
# rather than compared with today's code; `make gpu-bench` on a GPU machine measures all of them again
# (`gpu-bench-scale` the image sides, `gpu-bench-speed` the largest batch).
