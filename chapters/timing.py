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
# # Timing: parameters, FLOPs, throughput and memory
#
# Table 1 of the paper reports, next to each model's accuracy, its parameter count and its FLOPs
# {cite:p}`cordonnier2020`; the [Re] adds throughput measurements {cite:p}`rescience2021`. This chapter
# measures all of them for every main model of `configs/`:
#
# 1. **parameters and FLOPs** of the full-size networks, counted here with
#    `torch.utils.flop_counter.FlopCounterMode`, and Table 1's FLOP column recounted with the paper's own
#    counting convention, to see where its 6.2B, 15B and 0.56B come from;
# 2. **the benchmark protocol** of `satconv.bench`;
# 3. **CPU figures**, measured when the book is built, on tiny versions of the models;
# 4. **GPU figures** from a committed run on one GPU: training and evaluation throughput, batch-1
#    latency, peak memory and model FLOPs utilisation (MFU) at batch 100 and at the largest batch
#    that fits, the projected time of each full training schedule, and how throughput and memory
#    grow with the image side.
#
# The counts of part 1 do not depend on the machine; every timing says which device produced it.

# %%
import functools
import json
import os
import statistics
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.colors import LogNorm
import torch
from IPython.display import HTML, Markdown, display
from myst_nb import glue
from torch.utils.flop_counter import FlopCounterMode

from satconv import config
from satconv.attention import LearnedRelativeAttention
from satconv.attention.routes import EXPLICIT, Routes, using_routes
from satconv.bench import harness, memory, throughput
from satconv.bench.kernels import kernel_breakdown
from satconv.config import REPO_ROOT
from satconv.flops import flops_per_image, paper_convention_flops
from satconv.models import build_model, count_parameters
from satconv.report import below

torch.manual_seed(0)
torch.set_num_threads(2)

MAIN = ["paper_quadratic", "paper_quadratic_anisotropic", "paper_learned", "paper_learned_content",
        "paper_resnet18", "re_vit", "re_san_pairwise", "re_san_patchwise", "sasa", "fcvit", "vit_patch"]
CONFIGS = {name: config.load(REPO_ROOT / f"configs/{name}.yaml") for name in MAIN}

# Literature values, not run outputs: Table 1 of arXiv 1911.03584 (Cordonnier, Loukas & Jaggi, ICLR 2020),
# parameters in millions and the "# FLOPs" column in billions, as printed.
TABLE1 = {
    "paper_resnet18": {"label": "ResNet18", "params_m": 11.2, "flops_b": 0.56},
    "paper_quadratic": {"label": "SA quadratic emb.", "params_m": 12.1, "flops_b": 6.2},
    "paper_learned": {"label": "SA learned emb.", "params_m": 12.3, "flops_b": 6.2},
    "paper_learned_content": {"label": "SA learned emb. + content", "params_m": 29.5, "flops_b": 15},
}


def family(cfg_or_row):
    """Attention family of a config or a bench row: the attention kind, or the architecture for ResNet18."""
    if isinstance(cfg_or_row, dict):
        return cfg_or_row.get("attention") or cfg_or_row.get("arch", "?")
    m = cfg_or_row.model
    return m.arch if m.arch == "resnet18" else m.attention.kind


@functools.cache
def route_family(name):
    """Which route setting applies to config ``name``: "dense" (``train.attention_route``: the folded content
    attention), "shared" (``train.shared_route``: probabilities shared by the batch) or None, as its
    attention layers say (``route_family``, built on the meta device)."""
    path = REPO_ROOT / f"configs/{name}.yaml"
    cfg = CONFIGS.get(name) or (config.load(path) if path.is_file() else None)
    if cfg is None:
        return None
    with torch.device("meta"):
        layers = build_model(cfg).attention_layers()
    families = {getattr(layer, "route_family", None) for layer in layers} - {None}
    return families.pop() if len(families) == 1 else None


def routed(name):
    """Whether config ``name``'s attention takes the folded dense route (so ``train.attention_route`` matters)."""
    return route_family(name) == "dense"


def route_of(row):
    """The route of a bench row (the default before rows recorded it), or "–" where no route setting applies."""
    family_ = route_family(row["config"])
    if family_ == "dense":
        return row.get("attention_route", "folded")
    if family_ == "shared":
        return row.get("shared_route", "einsum")
    return "–"


def compile_of(row):
    """A bench row's compile mode, with inductor's coordinate-descent tuning and the whole-step CUDA graph
    when they were on."""
    mode = row.get("compile") or "no"
    mode = "default" if mode is True else mode
    tuned = (row.get("inductor") or {}).get("coordinate_descent_tuning")
    return mode + (" + coordinate-descent tuning" if tuned else "") + (" + step graph" if row.get("step_graph") else "")


def mixed_order(row) -> bool:
    """Whether a compiled row ran inductor's mixed-order LayerNorm reduction (torch's default; satconv now
    compiles with it off, `satconv.steps.INDUCTOR_OPTIONS`)."""
    return bool((row.get("inductor") or {}).get("triton.mix_order_reduction"))


def label_of(row):
    """A bench row's config name, with the route when it is not the default one."""
    route = route_of(row)
    fused_kernels = "+".join(k for k, key in (("fwd", "fused_forward"), ("bwd", "fused_backward")) if row.get(key))
    return (row["config"] + (f" ({route})" if route in ("sdpa", "einsum", "bmm", "wfirst") else "")
            + (f" (fused {fused_kernels})" if fused_kernels and route == "folded" else "")
            + (" (step graph)" if row.get("step_graph") else "")
            + (" (mixed-order LayerNorm)" if mixed_order(row) else ""))


def html_table(header, rows):
    """An HTML table from a header list and a list of row lists (cells already formatted)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return HTML(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


# %% [markdown]
# ## Parameters and FLOPs
#
# `satconv.flops.flops_per_image` runs one batch inside `FlopCounterMode`, which adds up every matrix product
# and convolution PyTorch executes, at 2 FLOPs per multiply-add. In *eval* mode that is one forward
# pass; in *train* mode it is the forward pass, the cross-entropy and the backward pass as autograd
# runs it (this is the count MFU uses below). The networks are built on the `meta` device, where the
# counter sees every operation's shapes without computing anything. SAN and SASA look up their windows
# with a data-dependent index table (`nonzero`), which the meta device cannot run; they are counted on
# the CPU at batch 1. `satconv.flops.paper_convention_flops` runs one more forward pass of one image and splits
# the count by the module that issued it, which part 2 needs.

# %%
COUNTS = {}
for name, cfg in CONFIGS.items():
    on_meta = cfg.model.arch not in ("san", "sasa")  # nonzero() in their window tables has no meta kernel
    device = "meta" if on_meta else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg)
    size = cfg.model.image_size
    split = paper_convention_flops(model, size, device=device)
    COUNTS[name] = {
        "family": family(cfg), "device": device, "params": count_parameters(model),
        "train": flops_per_image(model, size, "train", device=device, batch=1),
        "eval": 2 * split["total_macs"],  # the same eval forward of one image, 2 FLOPs per MAC
        **split,
    }
    print(f"{name:28s} counted on {device:4s}: {COUNTS[name]['params'] / 1e6:6.2f} M parameters, "
          f"{COUNTS[name]['eval'] / 1e9:7.3f} GFLOPs forward, {COUNTS[name]['train'] / 1e9:7.3f} GFLOPs train")
    del model

# %%
header = ["config", "family", "parameters (M)", "Table 1 (M)", "GFLOPs forward", "GFLOPs train",
          "train / forward", "Table 1 (B)"]
rows = []
for name, c in COUNTS.items():
    t1 = TABLE1.get(name, {})
    rows.append([name, c["family"], f"{c['params'] / 1e6:.2f}", t1.get("params_m", ""), f"{c['eval'] / 1e9:.3f}",
                 f"{c['train'] / 1e9:.3f}", f"{c['train'] / c['eval']:.2f}", t1.get("flops_b", "")])
ratios = {name: c["train"] / c["eval"] for name, c in COUNTS.items()}
typical = statistics.median(ratios.values())
glue("ratio_typical", typical, display=False)
glue("ratio_fcvit", ratios["fcvit"], display=False)
agree = all(float(f"{COUNTS[n]['params'] / 1e6:.3g}") == t1["params_m"] for n, t1 in TABLE1.items())
glue("params_agree", "agree" if agree else "do not all agree", display=False)
glue("params_quadratic", COUNTS["paper_quadratic"]["params"] / 1e6, display=False)
glue("params_content", COUNTS["paper_learned_content"]["params"] / 1e6, display=False)
html_table(header, rows)

# %% [markdown]
# The parameter counts {glue:text}`params_agree` with Table 1 at its three significant digits (quadratic
# {glue:text}`params_quadratic:.2f` M, learned + content {glue:text}`params_content:.2f` M). A training
# step costs about {glue:text}`ratio_typical:.1f` times a forward pass, the usual rule: the backward pass
# computes two products (gradients with respect to the input and to the weights) for each product of
# the forward pass. FCViT, whose token mixer is an $11 \times 11$ depth-wise convolution (`groups` =
# channels), follows it too ({glue:text}`ratio_fcvit:.1f`), but only because `satconv.flops` replaces one
# of the counter's formulas: in torch 2.14.1 the formula for the backward pass of a grouped convolution
# does not divide the weight-gradient product by the number of groups (pytorch/pytorch pull request
# 183405 adds that division). One depth-wise convolution, counted by the stock `FlopCounterMode`,
# shows it:

# %%
x = torch.randn(1, 64, 16, 16, requires_grad=True)
for groups in (1, 64):
    conv = torch.nn.Conv2d(64, 64, 11, padding=5, groups=groups)
    with FlopCounterMode(display=False) as counter:
        conv(x).sum().backward()
    flops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    ratio = flops["aten.convolution_backward"] / flops["aten.convolution"]
    print(f"groups={groups:2d}: forward {flops['aten.convolution'] / 1e6:7.2f} MFLOPs, "
          f"backward {flops['aten.convolution_backward'] / 1e6:7.2f} MFLOPs ({ratio:.1f} x forward, expected 2)")
    if groups == 64:
        glue("dw_backward_ratio", ratio, display=False)

# %% [markdown]
# The stock counter counts the backward pass of the depth-wise convolution
# {glue:text}`dw_backward_ratio:.0f` times its forward pass instead of 2. `satconv.flops` counts each
# gradient of a convolution as one forward pass, whatever its groups, so FCViT's training FLOPs and the
# MFU computed from them are right in the tables below:
#
# ```{literalinclude} ../satconv/flops.py
# :pyobject: conv_backward_flops
# ```
#
# Two further limits of the counter: it sees matrix products and convolutions only, so SAN and
# SASA, which aggregate their windows with a broadcast multiply and a sum (faster than the equivalent
# `einsum` of many tiny products), get lower bounds; and normalisation, softmax and element-wise work
# are not counted for any model (they are not matrix FLOPs).
#
# ## The paper's FLOP convention
#
# The original code counts FLOPs with `thop` 0.0.31 (`profile(model, (1, 3, 32, 32))`), which hooks
# `nn.Linear` and `nn.Conv2d` modules and nothing else: a linear layer costs $2 d_{in} - 1$ operations
# per output element (FLOPs), a convolution costs one per multiply-add (MACs). Two hypotheses explain
# Table 1's column:
#
# (a) **the column mixes conventions**: the self-attention models are counted in FLOPs (twice their
#     linear multiply-adds), the ResNet18 in MACs, which makes it look twice as cheap;
#
# (b) **the attention products are missing**: the einsums $\mathrm{softmax}(A)\,X$ and, in the content
#     model, $q\,k^\top$ are not modules, so thop never sees them.
#
# `paper_convention_flops` keeps the pieces apart: `linear_macs`, `conv_macs`, `attention_einsum_macs`
# (everything `FlopCounterMode` counts outside those modules) and `thop_like = 2 linear_macs + conv_macs`.
# A count *matches* Table 1 when it rounds to the printed figure at the printed two significant digits.

# %%
def matches(value, printed):
    """True when `value` (in billions) rounds to Table 1's `printed` figure at two significant digits."""
    return float(f"{value:.2g}") == printed


header = ["model", "Table 1 (B)", "thop-like: 2 linear MACs + conv MACs", "matches", "linear MACs",
          "conv MACs", "einsum MACs", "FLOPs, all products (2 x MACs)", "matches"]
rows, verdicts = [], {}
for name, t1 in TABLE1.items():
    c = COUNTS[name]
    like, total = c["thop_like"] / 1e9, c["eval"] / 1e9
    verdicts[name] = {
        "thop_like": matches(like, t1["flops_b"]),
        "all_flops": matches(total, t1["flops_b"]),
        "all_macs": matches(c["total_macs"] / 1e9, t1["flops_b"]),
        "thop_like_plus_einsum": matches(like + 2 * c["attention_einsum_macs"] / 1e9, t1["flops_b"]),
        "macs_only": matches((c["linear_macs"] + c["conv_macs"]) / 1e9, t1["flops_b"]),
        "conv_flops": matches(2 * (c["linear_macs"] + c["conv_macs"]) / 1e9, t1["flops_b"]),
    }
    rows.append([t1["label"], t1["flops_b"], f"{like:.3f}", "yes" if verdicts[name]["thop_like"] else "no",
                 f"{c['linear_macs'] / 1e9:.3f}", f"{c['conv_macs'] / 1e9:.3f}",
                 f"{c['attention_einsum_macs'] / 1e9:.3f}", f"{total:.3f}",
                 "yes" if verdicts[name]["all_flops"] else "no"])
html_table(header, rows)

# %%
sa = [n for n in TABLE1 if n != "paper_resnet18"]
resnet = verdicts["paper_resnet18"]
# (a): one convention for every model would not reproduce the column; FLOPs for SA and MACs for ResNet do.
hyp_a = (all(verdicts[n]["thop_like"] and not verdicts[n]["macs_only"] for n in sa)
         and resnet["thop_like"] and not resnet["conv_flops"])
# (b): the SA figures match without the attention einsums and stop matching when they are added.
hyp_b = all(verdicts[n]["thop_like"] and not verdicts[n]["thop_like_plus_einsum"] for n in sa)
glue("hyp_a", "holds" if hyp_a else "does not hold", display=False)
glue("hyp_b", "holds" if hyp_b else "does not hold", display=False)
q, lc, rn = COUNTS["paper_quadratic"], COUNTS["paper_learned_content"], COUNTS["paper_resnet18"]
glue("q_thop", q["thop_like"] / 1e9, display=False)
glue("q_einsum", q["attention_einsum_macs"] / 1e9, display=False)
glue("q_all", q["eval"] / 1e9, display=False)
glue("lc_thop", lc["thop_like"] / 1e9, display=False)
glue("lc_einsum", lc["attention_einsum_macs"] / 1e9, display=False)
glue("lc_all", lc["eval"] / 1e9, display=False)
glue("rn_macs", rn["conv_macs"] / 1e9, display=False)
glue("rn_all", rn["eval"] / 1e9, display=False)
exact_diff = max(abs(COUNTS[n]["thop_exact"] / COUNTS[n]["thop_like"] - 1) for n in TABLE1)
glue("thop_exact_diff", exact_diff, display=False)
for label, holds in [("(a)", hyp_a), ("(b)", hyp_b)]:
    print(f"hypothesis {label} {'holds' if holds else 'does not hold'}")

# %% [markdown]
# **Hypothesis (a) {glue:text}`hyp_a`.** The self-attention models' figures are twice their
# linear multiply-adds (quadratic {glue:text}`q_thop:.2f` B, learned + content {glue:text}`lc_thop:.2f` B),
# while the ResNet18's 0.56B is its convolution multiply-adds ({glue:text}`rn_macs:.3f` B); counted in
# FLOPs like the others, the ResNet18 costs {glue:text}`rn_all:.2f` GFLOPs per image. No single
# convention reproduces all four figures.
#
# **Hypothesis (b) {glue:text}`hyp_b`.** The quadratic model's $\mathrm{softmax}(A)\,X$ products add
# {glue:text}`q_einsum:.2f` G multiply-adds (6 layers, 9 heads, $256 \times 256$ weights applied to
# 400 channels), the content model's $q\,k^\top$ and $q\,r$ products bring its total to
# {glue:text}`lc_einsum:.2f` G. Counting every product in FLOPs gives {glue:text}`q_all:.1f` GFLOPs
# for the quadratic and learned models and {glue:text}`lc_all:.1f` GFLOPs for the content model,
# instead of 6.2B and 15B. thop's exact formula, $(2 d_{in} - 1)$ per linear output, differs from
# `thop_like` by at most {glue:text}`thop_exact_diff:.2%`, far below the printed precision.
#
# ## The benchmark protocol
#
# `satconv.bench.throughput.bench_model` builds a config's network with the paper's SGD (no weight decay on the Gaussian
# centres and spreads) and times three things on random CIFAR-shaped input: a training step (forward,
# cross-entropy, backward, optimiser step), an evaluation forward pass under `inference_mode` at the same
# batch, and the latency of a forward pass of one image. It follows the [Re]'s bug list (B9):
#
# - **warm-up**: at least one untimed call before each timed phase (cuDNN autotuning and
#   `torch.compile` happen there);
# - **CUDA events** around every timed call and **one synchronise** after the last, so the host does not
#   stall the GPU between steps; on the CPU, `time.perf_counter` (CPU operations are synchronous);
# - the **median of the repeats** is reported, with the 10th and 90th percentiles;
# - `cudnn.benchmark = True` (the [Re] timed with `deterministic=True`, which slows convolutions);
# - **bf16 autocast** on CUDA by default (fp32 on request; the CPU always runs fp32);
# - a **fused SGD** step (one kernel for all parameters);
# - optionally **`torch.compile`**: `reduce-overhead` and `max-autotune` also capture the step in CUDA
#   graphs, removing the launch overhead that dominates small models;
# - peak memory is `torch.cuda.max_memory_allocated` during training (parameters, gradients, optimiser
#   state and activations); FLOPs per image come from `flops_per_image` above, and MFU is the achieved
#   training FLOP rate divided by the datasheet's dense peak (`mfu`) and by a measured
#   $8192^3$ GEMM on the same GPU (`mfu_measured`).
#
# Every row stores the device name, precision, batch, compile mode, attention route and step graph (both
# below), torch version and date.
#
# ```{literalinclude} ../satconv/bench/throughput.py
# :pyobject: bench_model
# ```
#
# To rerun a measurement (one JSON line per config and batch; `max` is the largest batch that fits;
# `--sides 16 32 64` gives the scaling rows; `--out FILE.jsonl` appends them to a file):
#
# ```bash
# python -m satconv bench --config configs/paper_quadratic.yaml --batch 100 max --compile reduce-overhead
# python -m satconv bench --config configs/re_vit.yaml --compile reduce-overhead --set train.attention_route=sdpa
# python -m satconv bench --config configs/paper_resnet18.yaml --compile --channels-last   # its config's step graph
# ```
#
# ## Fast paths
#
# The package computes eq. (2) two ways: the **explicit route** (scores, softmax, $P_h V_h$ per head,
# $W_{out}$), kept as the reference, and **fast paths** that compute the same function with fewer FLOPs
# or fewer memory passes. Each attention layer carries its choice as an attribute set when the model is
# built (`satconv.attention.routes.Routes`, shown in `repr(model)`); `using_routes(model, EXPLICIT)` switches one
# model to the explicit route for a block of code; `tests/test_fast_paths.py` compares the two (outputs, probabilities and every gradient in float64
# on the CPU; bf16 and `torch.compile` against float32 on a GPU).
#
# - **Folded query–key products.** With concatenated heads ($D_h = D$, the paper's choice) the query and
#   key projections enter only through $W^{(h)}_{qry}{}^\top W^{(h)}_{key}$ (the product Lemma 1 reasons
#   about). Multiplying it out once per step, a $D \times D$ matrix per head whose cost does not grow with
#   the batch, removes the key projection. The bias terms that are constant along the keys cancel in the
#   softmax and are dropped. The $q \cdot r$ tables of the learned relative encoding fold the same way.
#   A value projection followed by $W_{out}$ (the [Re]'s ViT) folds into one matrix. Under autocast the
#   folds are bf16 GEMMs like every other product of the step (float32 accumulation): in float32 they
#   would run on the CUDA cores rather than the tensor cores.
#
# ```{literalinclude} ../satconv/attention/folded.py
# :pyobject: fold_query_key
# ```
#
# - **One layout for all heads.** The folded queries of all heads form one $(N \cdot N_h) \times D$ matrix
#   per image, so the scores come out as $(B, N, N_h, N)$ and $P\,X$ lands in the $(B, N, N_h D)$ layout
#   that $W_{out}$ reads: no head transposes.
# - **Less kept for the backward pass.** Softmax, dropout and $\tilde P X$ form one autograd function
#   (`satconv.attention.folded.SoftmaxDropoutMix`). It keeps the probabilities in bf16 and the dropout
#   mask packed eight entries to a byte, and recomputes the dropped probabilities in the backward pass,
#   where they are needed for one GEMM, instead of storing them: per layer of the content model that
#   keeps a $(B, N, N_h, N)$ bf16 tensor and a byte-per-entry mask out of memory.
# - **Probabilities shared by the batch.** Quadratic and learned position-only attention do not depend on
#   the input: their $(N_h, N, N)$ probabilities are computed once per step and applied to the whole batch
#   as one GEMM (`train.shared_route: einsum`), whose result is then copied into the layout $W_{out}$
#   reads, or as a batched GEMM that writes that layout directly (`bmm`: the probabilities laid out
#   $(N N_h) \times N$ and broadcast over the batch, their gradient a sum of per-image products), or
#   with $W_{out}$'s head slices applied first (`wfirst`: $\sum_h P_h (X W_h^\top)$, one GEMM for all
#   heads, then one batched GEMM over keys and heads at once, no layout copy), or by `bmm`'s forward pass
#   with the probabilities' gradient as one GEMM over the batch and features together (`bmm_gemm`,
#   `satconv.attention.base.SharedProbabilityProduct`: one layout copy per layer, in the backward pass,
#   where `einsum` has one in each pass). The learned logits are a
#   row term plus a column term, built as two small $(N_h, H, H)$ and $(N_h, W, W)$ tables and
#   broadcast-added: no $(N, N)$ index and, in the backward pass, no $N^2$ scatter.
# - **Relative logits per axis, from windows of the folded tables.** The row part of $q \cdot r$ for a query in
#   grid row $r_q$ and a key in row $r_k$ reads table entry $r_k - r_q + M - 1$: for one query row that
#   is a contiguous window of $H$ entries. Grouping the queries by row (and by column for the column
#   part), each group meets its window of the folded table weights in one batched GEMM, so the
#   $(B, N, N_h, H)$ and $(B, N, N_h, W)$ terms come straight from the tokens and are broadcast-added
#   to the content logits, with no gather over the $(B, N, N_h, N)$ scores.
# - **Aligned key counts.** ViT's class token makes 257 tokens; rows of 257 two-byte scores are not
#   16-byte aligned, which pushes the batched products onto old, slow tensor-core kernels. The keys and
#   values are padded to a multiple of 8 with zero rows whose logits are $-\infty$, so their
#   probabilities are exactly 0 and the function is unchanged.
# - **Fused attention (the `sdpa` route).** `train.attention_route: sdpa` (a model's layers then carry
#   `Routes(dense="sdpa")`) sends the folded content attention through
#   `torch.nn.functional.scaled_dot_product_attention`, whose fused kernels never store the
#   $(B, N, N_h, N)$ logits or probabilities. The heads share their keys (the raw tokens) and values (the
#   raw tokens again), so a layer is a single attention of $N \cdot N_h$ queries over $N$ keys. The
#   $q \cdot r$ term becomes extra features: a query carries its row logits for every key row and its
#   column logits for every key column, and each key carries the one-hot codes of its own row and column,
#   so the dot product adds exactly the key's row and column terms. With a value projection, a column of
#   ones in the values gives the $\mathrm{rowsum}(P_h)$ that the folded value bias needs. The function is
#   the same; the dropout masks are drawn by the kernel. At head dimension 400 only PyTorch's
#   memory-efficient kernel applies (the flash kernels stop at 256), and in a prototype measured for this
#   project on an H200 its backward pass was the costliest kernel of the step, so the default stays
#   `folded`: the route is a memory-lean option for large batches, and both are benchmarked.
# - **The whole step in one CUDA graph.** `torch.compile`'s `reduce-overhead` mode graphs the forward
#   and the backward pass separately; the loss, the optimiser step and the bookkeeping between them stay
#   on the host, and a small network such as ResNet18, whose kernels of a step are over quickly, waits on
#   it. `train.step_graph: true` captures forward, loss, backward and the fused SGD step in one graph
#   (`satconv.steps.CapturedStep`) after a few eager steps, and each later step copies the batch in and
#   replays it. The learning rate of the schedule reaches the replays through a one-element tensor that
#   the captured optimiser step reads; a batch of another shape (an epoch's last) runs eagerly. The
#   ResNet18 config turns it on (`configs/paper_resnet18.yaml`); compare its two `paper_resnet18` rows in
#   the batch-100 table below. A step graph replaces only the training step: evaluation and the batch-1
#   latency of that row run the model compiled in the `default` mode, without CUDA graphs, so its
#   evaluation figures are the ones to read from the `reduce-overhead` row.
# - **LayerNorm in the autocast dtype.** Autocast runs LayerNorm in float32 and returns float32, which
#   makes a post-norm residual stream float32 and every following linear layer re-cast it. The models'
#   `LayerNorm` reads and writes bf16 under autocast (statistics in float32), halving those bytes.
# - **LayerNorm's backward kernels, unfused.** By default inductor computes a LayerNorm's input gradient
#   (a reduction along each row) and its weight gradient (a reduction down the columns) in one
#   "mixed-order" kernel. On the H200 those kernels ran several times slower than the bytes they move
#   would take, so satconv compiles with `triton.mix_order_reduction` off
#   (`satconv.steps.compile_options`, used by training and by the benchmark; setting
#   `TORCHINDUCTOR_MIX_ORDER_REDUCTION` leaves the choice to inductor). The kernel breakdown below shows
#   the same models with and without it.
# - **The block's dense layer folded into $W_{out}$.** The encoder block applies its `dense` layer right
#   after the attention's $W_{out}$, with nothing in between, so the fast paths multiply the two out once
#   per step (`satconv.attention.base.fold_following`) and run one GEMM on the heads' output instead of
#   two; the explicit route applies them in turn, and a test compares the whole model both ways.
# - **Dropout masks drawn by PyTorch's own kernels.** Compiled, `nn.Dropout` and the attention's dropout
#   become one Philox call per element inside the fused kernel around them (a LayerNorm, the softmax),
#   and on the H200 that integer work took a large share of those kernels' time. Every dropout in satconv's models
#   draws its mask through `satconv.dropout.keep_mask` instead: a custom operator that inductor does not
#   look into, which draws the Bernoulli mask with `Tensor.bernoulli_` (PyTorch's CUDA kernel uses each
#   Philox call for four entries) and hands the fused kernels a `bool` mask to read. The law is
#   `nn.Dropout`'s. Compiled graphs of some torch releases merge calls of a custom operator with equal
#   arguments, so every call is anchored on a tensor of its own and numbered by its module; a test
#   checks that the masks of a model's forward pass cannot be merged, and another that a compiled
#   backward pass reuses the forward's mask. Rows whose source predates this change do not include it.
# - **The softmax-and-dropout backward in one Triton kernel.** The backward pass of the folded
#   attention's softmax and dropout is element-wise work on the $(B, N N_h, N)$ scores: the gradient
#   reaching the dropped probabilities, masked and scaled, through the softmax's backward, plus the
#   dropped probabilities again for the values' gradient. Inductor made three kernels of it, each
#   reading the scores' operands again; `satconv.attention.fused` reads the gradient, the
#   probabilities and the bit-packed mask once and writes both results (a custom operator, so compiled
#   graphs call it as it is). Tests compare it with the PyTorch expressions, on a CPU through
#   Triton's interpreter. Rows whose source predates it do not include it.
# - **The forward softmax and dropout in one Triton kernel.** The forward pass's kernel of the same kind
#   adds the per-axis relative terms to the content scores, masks padded keys (ViT's), takes the softmax,
#   applies the mask that `keep_mask` drew, and writes the probabilities, the dropped probabilities, the
#   bit-packed mask and their row sums in one pass, where inductor made two kernels. Both kernels run a
#   block of score rows per program; how many rows and warps is a table measured for the row lengths the
#   models use (`satconv.attention.fused.LAUNCH`, timed by `python -m satconv bench --fused-launch`,
#   below). Rows record both settings (`fused_forward`, `fused_backward`), and `bench
#   --no-fused-forward` / `--no-fused-backward` turn them off.
# - **Inductor's comprehensive padding off.** Inductor pads the row stride of long rows in the buffers it
#   lays out; the padded folded-query buffer is not contiguous, so `addmm` copied the broadcast query bias
#   into it instead of adding the bias in cuBLASLt's epilogue. satconv compiles with the padding off
#   (`satconv.steps.INDUCTOR_OPTIONS`); the rows with it on and off are compared below.
#
# Tried and dropped, because they measured no faster on the H200: applying $W_{out}$ before the shared
# probabilities through `torch.matmul` (whose 2-D by 3-D product, when gradients are recorded, transposes and
# copies the batch; the `wfirst` route above uses a batched GEMM instead), and a hand-written Triton kernel
# for the content model's softmax and dropout in the forward pass, a first one (inductor's fused kernel
# was as fast once the relative terms were computed per axis; the forward kernel above, which also packs the
# mask and sums the rows, did measure faster: see the fused-kernel rows below). Of the shared-probability
# routes, `bmm_gemm` is the default: in the batch-100 table it beats `einsum` (measured on the same machine
# with the same code), `bmm` and `wfirst` (in the kernel breakdown, `wfirst` trades einsum's layout copies
# for a costlier gradient of the batch-broadcast probabilities, and `bmm_gemm` spends less time on layout
# copies than einsum). The content
# attention stays `folded`, which the `sdpa` row does not beat either. The whole-step CUDA graph stays
# ResNet18's alone: the attention models keep the GPU busy for a whole step already (their kernel time is
# within a few percent of the step, in the breakdown below). Some `(step graph)` rows ran older code than
# the `reduce-overhead` rows (the rows' sources are listed under the table); measured with the same code,
# the two modes were within a few percent of each other.
#
# The table counts the FLOPs each route runs per training image (forward and backward, batch 100, counted
# on the `meta` device, where the fused attention is counted as its matrix products; the fused CUDA
# backward also recomputes the logits, which this count leaves out). MFU in this chapter always uses the
# explicit count, the model's FLOPs.

# %%
rows = []
for name in ("paper_learned_content", "re_vit", "paper_learned"):
    with torch.device("meta"):
        net = build_model(CONFIGS[name])
    explicit = flops_per_image(net, 32, "train", device="meta", batch=100)
    fast = flops_per_image(net, 32, "train", device="meta", batch=100, explicit=False)
    cells = [name, f"{explicit / 1e9:.2f}", f"{fast / 1e9:.2f}", f"{fast / explicit:.0%}"]
    if routed(name):
        with using_routes(net, Routes(dense="sdpa")):
            fused = flops_per_image(net, 32, "train", device="meta", batch=100, explicit=False)
        cells.append(f"{fused / 1e9:.2f}")
    else:
        cells.append("same as the fast path")
    rows.append(cells)
html_table(["config", "explicit route GFLOP / training image", "fast path GFLOP / training image",
            "fast / explicit", "sdpa route GFLOP / training image"], rows)

# %% [markdown]
# What each route keeps for the backward pass decides most of the training memory. The next table counts
# it with `satconv.bench.memory.saved_activation_bytes`, measured during the book build: one training forward pass on
# the CPU under bf16 autocast, saved-tensor hooks recording every storage autograd keeps, at two batch
# sizes so that the part that grows with the batch (per image) separates from the part that does not
# (weights and folded weight products). This is what the code asks autograd to keep, eagerly;
# `torch.compile` may keep less, and the peak memory of the GPU figures also holds parameters,
# gradients, optimiser state and transient buffers.

# %%
rows = []
for name in ("paper_learned_content", "re_vit", "paper_learned", "paper_quadratic"):
    torch.manual_seed(0)
    net = build_model(CONFIGS[name])
    explicit_img, _ = memory.saved_activation_bytes(net, explicit=True)
    fast_img, fast_fixed = memory.saved_activation_bytes(net)
    at_100 = (100 * fast_img + fast_fixed) / 2**30
    rows.append([name, f"{explicit_img / 2**20:.1f}", f"{fast_img / 2**20:.1f}", f"{fast_img / explicit_img:.0%}",
                 f"{at_100:.2f}"])
html_table(["config", "explicit route MiB / image", "fast path MiB / image", "fast / explicit",
            "fast path at batch 100 (GiB, kept activations only)"], rows)

# %%
# the fast path and the explicit route on one layer of the content model (float64, random weights)
torch.manual_seed(0)
layer = LearnedRelativeAttention(16, 3, variant="content_query_position", max_position=8).double()
tokens = torch.randn(2, 6, 6, 16, dtype=torch.float64)
with torch.no_grad():
    fast_out = layer(tokens)
    with using_routes(layer, EXPLICIT):
        explicit_out = layer(tokens)
gap = (fast_out - explicit_out).abs().max().item()
print(f"largest difference between the routes: {below(gap, 1e-12)}")  # float64 rounding

# ## CPU figures (measured during the book build)
#
# The book is built on a CPU-only machine, so the figures measured here use the `quick` profile of each
# configuration (a tiny version of the model) at batch 8, with 1 warm-up call and 3 repeats.
# **CPU, quick profile (tiny models): only for relative comparison.** They show that the harness runs
# for every model; they say nothing about the full-size networks on a GPU. MFU on the CPU is reported
# against a measured $1024^3$ fp32 GEMM, since there is no datasheet peak for it.

# %%
# NBVAL_IGNORE_OUTPUT
# Timings vary from run to run and from machine to machine: the output is not compared by nbval.
cpu_rows = []
for name in MAIN:
    quick = config.load(REPO_ROOT / f"configs/{name}.yaml", profile="quick")
    cpu_rows.append(throughput.bench_model(quick, batch=8, device="cpu", warmup=1, repeats=3))
cpu_gemm = harness.measure_matmul_peak("cpu", torch.float32, n=1024, warmup=1, repeats=3)
cpu_device = cpu_rows[0]["device"]
header = ["config", "family", "parameters", "train img/s", "eval img/s", "latency, batch 1 (ms)",
          "GFLOPs / train image", "achieved GFLOP/s", "MFU vs CPU GEMM"]
rows = [[r["config"], family(r), f"{r['params']:,}", f"{r['train_img_s']:.1f}", f"{r['eval_img_s']:.1f}",
         f"{r['latency_ms_b1']:.1f}", f"{r['flops_per_image_train'] / 1e9:.3f}",
         f"{r['achieved_tflops_train'] * 1e3:.2f}", f"{r['achieved_tflops_train'] / cpu_gemm:.1%}"]
        for r in cpu_rows]
glue("cpu_device", cpu_device, display=False)
glue("cpu_threads", cpu_rows[0]["cpu_threads"], display=False)
glue("cpu_gemm", cpu_gemm * 1e3, display=False)
first = cpu_rows[0]
display(Markdown(f"**CPU, quick profile (tiny models): only for relative comparison.** Device: **{cpu_device}**, "
                 f"{first['cpu_threads']} threads, {first['precision']}, torch {first['torch']}; "
                 f"1024³ fp32 GEMM: {cpu_gemm * 1e3:.1f} GFLOP/s."))
html_table(header, rows)

# %% [markdown]
# These rows were measured on {glue:text}`cpu_device` with {glue:text}`cpu_threads` threads, whose
# $1024^3$ fp32 GEMM reached {glue:text}`cpu_gemm:.1f` GFLOP/s. The tiny models are far too small to
# keep a processor busy: their MFU and their ranking say little about the full-size networks.
#
# ## GPU figures (committed run)
#
# The full-size figures come from `python -m satconv bench` run on a GPU machine and committed under
# `book/bench/` as JSON lines: `h200.jsonl` (batch 100), `h200_maxbatch.jsonl` (the largest batch that
# fits), `h200_scaling.jsonl` (image sides 16, 32, 64) and `h200_epochs.jsonl` (whole training epochs).
# The book reads these files and never times a GPU itself; a part whose file is missing says so.
#
# The [Re]'s reference figures were measured by the project owners with the [Re]'s code on the same
# H200 in fp32 at batch 100; the [Re]'s SAN does not run there. They are the baseline for the speed-ups.

# %%
# Literature values, not run outputs: reference figures of the performance issue, [Re] code on one H200,
# fp32, batch 100 (training images/s and peak GiB). The [Re]'s SAN does not run.
# "target": the performance issue's target training images/s on the same GPU at batch 100.
RE_REFERENCE = {
    "paper_learned_content": {"label": "learned + content", "img_s": 508, "gib": 13.3, "target": 5000,
                              "target_gib": 4.5},
    "paper_learned": {"label": "learned, position-only", "img_s": 1410, "gib": 5.4, "target": 11300},
    "paper_quadratic": {"label": "quadratic", "img_s": 1437, "gib": 4.5, "target": 11500},
    "re_vit": {"label": "ViT", "img_s": 425, "gib": 15.5, "target": 4250},
    "paper_resnet18": {"label": "ResNet18", "img_s": 16108, "gib": 1.4, "target": 40000},
}
RE_DOES_NOT_RUN = {"re_san_pairwise", "re_san_patchwise"}
BENCH_DIR = Path(os.environ.get("SATCONV_BENCH_DIR", REPO_ROOT / "book" / "bench"))


def read_rows(filename):
    """Rows of a committed JSON-lines file under book/bench/, or None when it does not exist yet."""
    path = BENCH_DIR / filename
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def not_measured(what, filename):
    """The sentence shown in place of a part whose committed file does not exist yet."""
    return Markdown(f"{what}: **not measured yet** (`book/bench/{filename}` is not committed).")


def fmt(value, spec, missing="–"):
    """`format(value, spec)`, or `missing` for None."""
    return missing if value is None else format(value, spec)


def device_line(rows):
    """One sentence naming the devices, precisions, torch versions and dates of some bench rows."""
    keys = ("device", "precision", "torch")
    seen = sorted({tuple(str(r.get(k)) for k in keys) for r in rows if "error" not in r})
    dates = sorted(r["date"][:10] for r in rows if r.get("date"))
    text = "; ".join(f"**{d}**, {p}, torch {t}" for d, p, t in seen)
    if dates:
        text += f"; measured {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else "")
    sources = [f"`{s}`" for s in sorted({r["satconv_source"] for r in rows if r.get("satconv_source")})]
    unrecorded = sum(1 for r in rows if "error" not in r and not r.get("satconv_source"))
    if unrecorded:
        sources.append(f"not recorded for {unrecorded} rows")
    if sources:
        text += "; satconv source " + ", ".join(sources)
    return text


gpu = read_rows("h200.jsonl")
gpu_max = read_rows("h200_maxbatch.jsonl")
gpu_scaling = read_rows("h200_scaling.jsonl")
gpu_epochs = read_rows("h200_epochs.jsonl")
for filename, rows in [("h200.jsonl", gpu), ("h200_maxbatch.jsonl", gpu_max), ("h200_scaling.jsonl", gpu_scaling),
                       ("h200_epochs.jsonl", gpu_epochs)]:
    print(f"book/bench/{filename}: {'not measured yet' if rows is None else f'{len(rows)} rows'}")
# whole epochs of the committed GPU training runs (book/runs/<config>/metrics.jsonl)
RUNS = config.REPO_ROOT / "book" / "runs"
run_epochs = [row for d in sorted(RUNS.iterdir() if RUNS.is_dir() else []) if (d / "metrics.jsonl").is_file()
              for row in [throughput.epochs_from_run(d)] if row is not None]
print(f"book/runs: {len(run_epochs)} training runs with whole-epoch timings")

# %% [markdown]
# ### Batch 100
#
# One row per measured configuration: training and evaluation throughput, batch-1 latency, peak training
# memory, the achieved training FLOP rate, MFU against the datasheet peak and against the measured GEMM,
# and the [Re]'s figures on the same GPU with our speed-up.

# %%
def gpu_table(rows):
    """Render the bench rows with MFU and the [Re]'s reference figures; returns the speed-up of each row."""
    header = ["config", "family", "batch", "compile", "route", "train img/s", "eval img/s", "latency b1 (ms)",
              "peak GiB", "TFLOP/s", "MFU (datasheet)", "MFU (GEMM)", "[Re] img/s", "[Re] GiB", "speed-up"]
    cells, speedups = [], {}
    for r in rows:
        if "error" in r:
            cells.append([r["config"], family(r), r.get("batch"), compile_of(r), route_of(r), r["error"]]
                         + [""] * 9)
            continue
        ref = RE_REFERENCE.get(r["config"])
        speed = r["train_img_s"] / ref["img_s"] if ref else None
        if speed is not None:
            speedups[r["config"]] = max(speed, speedups.get(r["config"], 0))
        re_img = "does not run" if r["config"] in RE_DOES_NOT_RUN else fmt(ref and ref["img_s"], ",")
        cells.append([r["config"], family(r), r["batch"], compile_of(r), route_of(r),
                      f"{r['train_img_s']:,.0f}",
                      fmt(r.get("eval_img_s"), ",.0f", "not timed"), fmt(r.get("latency_ms_b1"), ".2f", "not timed"),
                      fmt(r.get("peak_mem_gib"), ".2f"),
                      fmt(r.get("achieved_tflops_train"), ".1f"), fmt(r.get("mfu"), ".1%"),
                      fmt(r.get("mfu_measured"), ".1%"), re_img, fmt(ref and ref["gib"], ".1f"),
                      fmt(speed, ".1f") + ("x" if speed else "")])
    display(html_table(header, cells))
    return speedups


if gpu is None:
    speedups = {}
    display(not_measured("GPU figures at batch 100", "h200.jsonl"))
else:
    display(Markdown(f"Measured on {device_line(gpu)}. Datasheet peak: {gpu[0].get('peak_tflops_source')}."))
    speedups = gpu_table(gpu)
glue("speedup_summary", ", ".join(f"{RE_REFERENCE[c]['label']} {s:.1f}x" for c, s in speedups.items())
     or "not measured yet", display=False)


def against_target(row):
    """``"<label> <img/s> of <target> img/s[ at <GiB> (target <= <GiB>)], met"`` (or the share reached) for a
    model's best batch-100 row."""
    ref, v = RE_REFERENCE[row["config"]], row["train_img_s"]
    met = v >= ref["target"]
    text = f"{ref['label']} {v:,.0f} of {ref['target']:,} img/s"
    if "target_gib" in ref:  # a memory target too
        met = met and row["peak_mem_gib"] <= ref["target_gib"]
        text += f" at {row['peak_mem_gib']:.2f} GiB peak (target at most {ref['target_gib']} GiB)"
    return text + (", met" if met else f", {v / ref['target']:.1%} of it" + ("" if v < ref["target"] else
                                                                            ", memory not met"))


# each model's best batch-100 row (training images/s): against the performance target here, and the
# model-only projection of a full schedule below
best_rows = {}
for r in gpu or []:
    if "error" not in r and r.get("batch") == 100:
        best_rows[r["config"]] = max(best_rows.get(r["config"], r), r, key=lambda row: row["train_img_s"])
glue("target_summary", "; ".join(against_target(best_rows[c]) for c in speedups if c in best_rows)
     or "not measured yet", display=False)

# %%
# the same rows as a picture: the [Re], this package and the performance target, per model
if gpu is not None and speedups:
    names = [c for c in RE_REFERENCE if c in speedups]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    ys = range(len(names))
    ax.barh([y + 0.27 for y in ys], [RE_REFERENCE[c]["img_s"] for c in names], height=0.27, color="tab:gray",
            label="[Re], fp32")
    ax.barh(list(ys), [best_rows[c]["train_img_s"] for c in names], height=0.27, color="tab:blue", label="satconv, bf16")
    ax.barh([y - 0.27 for y in ys], [RE_REFERENCE[c]["target"] for c in names], height=0.27, color="none",
            edgecolor="tab:red", linestyle="--", label="target")
    for y, c in zip(ys, names):
        ax.text(best_rows[c]["train_img_s"] * 1.05, y, f"{speedups[c]:.1f}x", va="center", fontsize=8)
    ax.set(xscale="log", yticks=list(ys), yticklabels=[RE_REFERENCE[c]["label"] for c in names],
           xlabel="training images / s at batch 100 (log scale)")
    ax.invert_yaxis()
    ax.set_xlim(200, None)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(f"Training throughput on {gpu[0]['device']}", fontsize=10)
    fig.tight_layout()
    plt.show()
else:
    print("no throughput chart: GPU figures not measured yet")

# %% [markdown]
# Speed-up over the [Re] at batch 100 (training images per second, best row per model):
# {glue:text}`speedup_summary`. Against the performance targets: {glue:text}`target_summary`.
# MFU is the training FLOPs per image (counted as in part 1) times the
# measured images per second, divided by the peak. The GEMM column says how far each model is from what
# the same GPU reaches on one large matrix product; these networks multiply small matrices (at most 256
# tokens of 400 channels per image, fewer in the local and convolutional networks), spend time in
# softmax, normalisation and gathers that are not matrix FLOPs, and so stay well below that rate.

# %% [markdown]
# ### Where the time goes
#
# `python -m satconv bench --kernels` profiles three training steps after the warm-up and adds up the
# time of every device kernel by category (`satconv.bench.kernels.categorise` reads the kernel names: matrix
# products, convolutions, softmax, normalisation, layout copies, optimizer, other element-wise work).
# Where the wall time of a step exceeds its summed kernel time, the difference is launch overhead and
# idle time. The committed GPU breakdown is `book/bench/h200_kernels.jsonl` (`make gpu-bench-kernels`).
# Profiled without CUDA graphs (`--compile default`), a row also names the aten operator that launched each
# kernel not written by inductor (`launched_by`, `satconv.bench.kernels.kernel_launchers`): that is how the
# bias copies inside `addmm` were found (see the padding section below).
# On a CPU the same breakdown sums the self time of the aten operators, which run on several threads,
# so it can exceed the wall time; the example below, tiny models measured during the book build, only
# shows what the tool reports.

# %%
KERNEL_COLOURS = {"matrix product": "tab:blue", "convolution": "tab:cyan", "softmax": "tab:orange",
                  "normalisation": "tab:green", "layout copy": "tab:red", "optimizer": "tab:purple",
                  "other element-wise": "tab:gray", "launch gaps and idle": "white"}


def kernel_chart(rows, title):
    """Stacked bars: milliseconds per training step by kernel category, one bar per config."""
    fig, ax = plt.subplots(figsize=(9, max(2.2, 0.8 + 0.45 * len(rows))))
    shown = set()
    for y, r in enumerate(rows):
        parts = dict(r["categories"])
        gap = r["step_ms"] - r["kernel_ms"]
        if gap > 0:
            parts["launch gaps and idle"] = gap
        left = 0.0
        for cat, colour in KERNEL_COLOURS.items():
            if parts.get(cat):
                ax.barh(y, parts[cat], left=left, color=colour, edgecolor="black", linewidth=0.4,
                        label=None if cat in shown else cat)
                shown.add(cat)
                left += parts[cat]
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    sources = [f", source {r['satconv_source'][:8]}" if r.get("satconv_source") else "" for r in rows]
    ax.set(yticks=range(len(rows)), yticklabels=[label_of(r) + s for r, s in zip(rows, sources)],
           xlabel="ms per training step")
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    plt.show()


def kernel_table(rows, top=5):
    """The most expensive kernels of each config, per step, with the aten operators that launched them
    where the rows record them (`satconv.bench.kernels.kernel_launchers`: profiles without CUDA graphs)."""
    shown = [(r, k) for r in rows for k in r["kernels"][:top]]
    launched = any(k.get("launched_by") for _, k in shown)
    cells = [[label_of(r), (r.get("satconv_source") or "–")[:8], k["category"], k["name"][:90], f"{k['ms']:.3f}",
              f"{k['calls']:g}"]
             + ([", ".join(f"{op} x{n:g}" for op, n in k.get("launched_by", {}).items()) or "–"] if launched else [])
             for r, k in shown]
    return html_table(["config", "source", "category", "kernel", "ms / step", "calls / step"]
                      + (["launched by (per step)"] if launched else []), cells)


gpu_kernels = read_rows("h200_kernels.jsonl")
if gpu_kernels is None:
    display(not_measured("Kernel time by category on the GPU", "h200_kernels.jsonl"))
else:
    display(Markdown(f"Measured on {device_line(gpu_kernels)}, batch {gpu_kernels[0]['batch']}."))
    kernel_chart(gpu_kernels, f"Training step by kernel category, {gpu_kernels[0]['device']}")
    pairs = []
    for name in dict.fromkeys(r["config"] for r in gpu_kernels):
        before = [r for r in gpu_kernels if r["config"] == name and mixed_order(r)]
        after = [r for r in gpu_kernels if r["config"] == name and r.get("inductor") and not mixed_order(r)]
        if before and after:
            b = before[-1]
            same = [r for r in after if r.get("satconv_source") == b.get("satconv_source")]
            a = (same or after)[0]  # the same code otherwise, else the first row without it
            sources = (f"source `{a['satconv_source']}`" if same else
                       f"sources `{b['satconv_source']}` → `{a['satconv_source']}`, so the later row also has "
                       "the changes landed between them")
            pairs.append(f"`{name}`: normalisation {b['categories'].get('normalisation', 0):.2f} → "
                         f"{a['categories'].get('normalisation', 0):.2f} ms, step {b['step_ms']:.2f} → "
                         f"{a['step_ms']:.2f} ms ({a['date'][:10]}, {sources})")
    if pairs:
        display(Markdown("Per training step, with inductor's mixed-order LayerNorm reduction and without: "
                         + "; ".join(pairs) + "."))
    old_rule = [r for r in gpu_kernels if not r.get("category_rule")]
    if old_rule:
        display(Markdown(f"{len(old_rule)} of these rows were categorised by an earlier rule, which filed an "
                         "inductor-fused kernel as a layout copy whenever its name held a cast, a transpose or a "
                         "clone, even when the kernel also computed (the packed dropout mask's backward, the q·r "
                         "terms' scatter): their layout-copy bars hold element-wise work too. `satconv.bench.kernels."
                         "categorise` now reads all the operators of a fused kernel."))
    noted = [r for r in gpu_kernels if r.get("inductor_note")]
    if noted:
        display(Markdown(f"The `inductor` entry of {len(noted)} of these rows was recorded after the run "
                         "(`inductor_note` says from where): the profiler rows did not record it before."))
    display(kernel_table(gpu_kernels))

# %%
# NBVAL_IGNORE_OUTPUT
# CPU timings vary from run to run: the output is not compared by nbval.
cpu_kernels = [kernel_breakdown(config.load(REPO_ROOT / f"configs/{name}.yaml", profile="quick"), batch=8,
                                device="cpu", warmup=1, steps=2)
               for name in ("paper_quadratic", "paper_learned_content")]
kernel_chart(cpu_kernels, f"CPU, quick profile (tiny models), {cpu_kernels[0]['device']}: aten operators by category")
display(kernel_table(cpu_kernels, top=3))

# %% [markdown]
# ### The fused softmax-dropout kernels
#
# The content attention's softmax and dropout (the learned + content model and ViT) with the fused
# backward kernel alone, then with the forward kernel as well, first at the launch shape of the kernels
# as first written and then at the measured table (`book/bench/h200_fused.jsonl`; `make gpu-bench-fused`
# measures all three settings again). The sources differ where the code changed between the rows; rows
# record the launch table since it exists (`fused_launch`: kernel/row block = rows per program x warps), and
# of the rows below, those of the latest source ran the table's shapes.

# %%
gpu_fused = read_rows("h200_fused.jsonl")
if gpu_fused is None:
    display(not_measured("The fused-kernel rows", "h200_fused.jsonl"))
else:
    display(Markdown(f"Measured on {device_line(gpu_fused)}, batch {gpu_fused[0]['batch']}, "
                     f"`--compile {gpu_fused[0]['compile']}`."))
    yes = {True: "yes", False: "no", None: "not recorded"}
    display(html_table(
        ["config", "fused forward", "fused backward", "launch table", "source", "train img/s", "step ms", "peak GiB",
         "date"],
        [[r["config"], yes[r.get("fused_forward")], yes[r.get("fused_backward")],
          r.get("fused_launch") or "not recorded", r.get("satconv_source", "–"),
          f"{r['train_img_s']:,.0f}", f"{r['train_step_ms']:.2f}", fmt(r.get("peak_mem_gib"), ".2f"), r["date"][:10]]
         for r in gpu_fused if "error" not in r]))

# %% [markdown]
# Each kernel at every launch shape, on the arguments of one training step of each model (the rows'
# `shape` is the scores' $(B, N N_h, N_{key})$): microseconds per call (colour on a log scale, the darkest
# the slowest), the circled cell the one that
# `launch_shape` picks, which is the table's entry (`book/bench/h200_fused_launch.jsonl`).

# %%
gpu_launch = read_rows("h200_fused_launch.jsonl")
if gpu_launch is None:
    display(not_measured("The fused kernels' launch shapes", "h200_fused_launch.jsonl"))
else:
    display(Markdown(f"Measured on {device_line(gpu_launch)}."))
    panels = list(dict.fromkeys((r["config"], r["kernel"]) for r in gpu_launch))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8), squeeze=False)
    for ax, (name, kernel) in zip(axes[0], panels):
        mine = [r for r in gpu_launch if (r["config"], r["kernel"]) == (name, kernel)]
        per = sorted({r["rows_per_program"] for r in mine})
        warps = sorted({r["warps"] for r in mine})
        grid = [[next((r["us"] for r in mine if (r["rows_per_program"], r["warps"]) == (p, w)), float("nan"))
                 for w in warps] for p in per]
        low, high = min(r["us"] for r in mine), max(r["us"] for r in mine)
        ax.imshow(grid, cmap="viridis_r", aspect="auto", norm=LogNorm(low, high))  # log: outliers would hide the rest
        for r in mine:
            y, x = per.index(r["rows_per_program"]), warps.index(r["warps"])
            ax.text(x, y, f"{r['us']:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if r["us"] > (low * high) ** 0.5 else "black")
            if r["current"]:
                ax.scatter([x], [y], s=260, facecolors="none", edgecolors="red", linewidths=1.5)
        ax.set(xticks=range(len(warps)), xticklabels=warps, yticks=range(len(per)), yticklabels=per,
               xlabel="warps", ylabel="rows per program")
        ax.set_title(f"{name}\n{kernel}, {mine[0]['shape']}", fontsize=7)
    fig.tight_layout()
    plt.show()
    picked = [r for r in gpu_launch if r["current"]]
    display(Markdown("The table's entries are the fastest in " + ", ".join(
        f"`{r['config']}` {r['kernel']}: {'yes' if r['fastest'] else 'no'}" for r in picked) + "."))

# %% [markdown]
# ### Inductor's comprehensive padding
#
# By default inductor pads the row stride of the buffers it lays out, for rows longer than a threshold, to
# a multiple of its alignment (the values of this torch are computed below). The content models'
# folded-query buffer, $(B N, N_h D)$, then has a padded stride: it is no longer contiguous, so `addmm`
# cannot add the query bias in cuBLASLt's epilogue and first copies the broadcast bias into the whole
# buffer, one slow strided copy per layer (found with the profiler: aten `direct_copy_kernel` calls under
# `aten::addmm`). satconv compiles with the padding off (`satconv.steps.INDUCTOR_OPTIONS`; setting
# `TORCHINDUCTOR_COMPREHENSIVE_PADDING` leaves it to inductor). The rows below pair each model with the
# padding on (inductor's default; rows whose `inductor` settings do not record it ran before satconv set
# it) and off (`book/bench/h200_padding.jsonl`).

# %%
import torch._inductor.config as inductor_config

attention = next(m for m in build_model(CONFIGS["paper_learned_content"]).modules() if hasattr(m, "num_heads"))
width = attention.num_heads * attention.query.in_features  # the folded queries' row: heads x key width
entries = inductor_config.padding_alignment_bytes // torch.bfloat16.itemsize
padded_width = -(-width // entries) * entries if width > inductor_config.padding_stride_threshold else width
display(Markdown(f"This torch pads strides above {inductor_config.padding_stride_threshold} entries to a multiple "
                 f"of {inductor_config.padding_alignment_bytes} bytes: in bf16 the learned + content model's "
                 f"folded-query rows of {width} entries get stride {padded_width}."))

# %%
gpu_padding = read_rows("h200_padding.jsonl")
if gpu_padding is None:
    display(not_measured("The padding rows", "h200_padding.jsonl"))
else:
    display(Markdown(f"Measured on {device_line(gpu_padding)}, batch {gpu_padding[0]['batch']}."))
    padded = {True: "on", False: "off", None: "on (inductor's default, not recorded)"}
    display(html_table(
        ["config", "compile", "padding", "source", "train img/s", "step ms", "peak GiB", "date"],
        [[r["config"], compile_of(r), padded[(r.get("inductor") or {}).get("comprehensive_padding")],
          r.get("satconv_source", "–"), f"{r['train_img_s']:,.0f}", f"{r['train_step_ms']:.2f}",
          fmt(r.get("peak_mem_gib"), ".2f"), r["date"][:10]]
         for r in gpu_padding if "error" not in r]))

# %% [markdown]
# ### Batch 100 against the largest batch that fits
#
# `largest_batch` doubles the batch from 100 until a training step runs out of memory, then bisects.
# A larger batch amortises the per-step overhead over more images.

# %%
if gpu_max is None:
    display(not_measured("Largest-batch figures", "h200_maxbatch.jsonl"))
else:
    display(Markdown(f"Measured on {device_line(gpu_max)}."))
    at_100 = {}
    for r in gpu or []:
        if "error" not in r and r.get("batch") == 100:
            key = (r["config"], route_of(r))
            at_100[key] = max(at_100.get(key, r), r, key=lambda row: row["train_img_s"])
    header = ["config", "family", "route", "train img/s at 100", "peak GiB at 100", "largest batch", "train img/s",
              "peak GiB", "eval img/s", "MFU (datasheet)", "gain over batch 100"]
    cells = []
    for r in gpu_max:
        b100 = at_100.get((r["config"], route_of(r)))
        if "error" in r:
            detail = f" ({r['error_detail']})" if r.get("error_detail") else ""
            cells.append([r["config"], family(r), route_of(r), "", "", r.get("batch"), r["error"] + detail,
                          "", "", "", ""])
            continue
        gain = r["train_img_s"] / b100["train_img_s"] if b100 else None
        cells.append([r["config"], family(r), route_of(r), fmt(b100 and b100["train_img_s"], ",.0f"),
                      fmt(b100 and b100.get("peak_mem_gib"), ".2f"), f"{r['batch']:,}", f"{r['train_img_s']:,.0f}",
                      fmt(r.get("peak_mem_gib"), ".2f"), fmt(r.get("eval_img_s"), ",.0f", "not timed"),
                      fmt(r.get("mfu"), ".1%"),
                      fmt(gain, ".2f") + ("x" if gain else "")])
    display(html_table(header, cells))

# %% [markdown]
# ### Projected time of a full training schedule
#
# `satconv.bench.throughput.epoch_time_projection` turns a training throughput into hours for a schedule: the config's
# number of epochs over 45,000 images (CIFAR-10's training set less the 5,000 held out for validation).
# The model-only projection uses the fastest batch-100 row of each model; where a whole epoch was timed
# (data loading, augmentation and evaluation included, `h200_epochs.jsonl`), the projection from that
# epoch time is shown too, scaled to 45,000 images, with the date of that epoch row and the model-only
# figure measured with it (an epoch row of older code timed a slower model). The [Re]'s projection uses its
# reference throughput with the same schedule.

# %%
TRAIN_IMAGES = 45000
epochs_by_config = {r["config"]: r for r in run_epochs}
epochs_by_config.update({r["config"]: r for r in gpu_epochs or [] if "error" not in r})
header = ["config", "epochs", "model-only img/s", "projected h (model only)", "whole-epoch img/s",
          "projected h (measured epochs)", "epoch timed (model-only img/s then)", "[Re] img/s", "[Re] projected h"]
cells = []
for name in MAIN:
    epochs = CONFIGS[name].train.epochs
    r, e, ref = best_rows.get(name), epochs_by_config.get(name), RE_REFERENCE.get(name)
    epoch_img_s = e["images"] / e["epoch_time_s"] if e else None
    cells.append([name, epochs, fmt(r and r["train_img_s"], ",.0f", "not measured yet"),
                  fmt(r and throughput.epoch_time_projection(r["train_img_s"], epochs, TRAIN_IMAGES), ".2f", "–"),
                  fmt(epoch_img_s, ",.0f"),
                  fmt(epoch_img_s and throughput.epoch_time_projection(epoch_img_s, epochs, TRAIN_IMAGES), ".2f"),
                  # an epoch row of older code ran a slower model: its date and its own model-only figure
                  (f"{e['date'][:10]} ({fmt(e.get('model_only_img_s'), ',.0f', 'not recorded')})"
                   if e and e.get("date") else "–"),
                  "does not run" if name in RE_DOES_NOT_RUN else fmt(ref and ref["img_s"], ","),
                  fmt(ref and throughput.epoch_time_projection(ref["img_s"], epochs, TRAIN_IMAGES), ".2f")])
html_table(header, cells)

# %% [markdown]
# ### A whole epoch against the model alone
#
# The benchmark feeds the same random batch at every step; a real epoch also loads, augments and
# transfers images and evaluates the model on the validation split. Two sources compare the two for
# the same model: `bench --epoch` (`h200_epochs.jsonl`, two epochs, the second timed) and the committed
# GPU training runs under `book/runs/` (the median epoch after the first, epochs with a test pass left
# out), each next to the batch-100 model-only row of `h200.jsonl`. The ratio is the epoch time over the
# model-only time for as many images; the performance target is at most 1.15. Each `bench --epoch` row
# names its date and source, and compares with the model-only figure measured in the same command, so a
# row of older code (a slower model) is compared with that code's own model-only figure.
#
# The input pipeline never makes the host wait for the GPU. Copying pageable CPU memory to a GPU
# returns only once the GPU's queue has drained, so the few random numbers of each batch's augmentation,
# its indices and the normalisation constants, moved that way, would idle the GPU at every step while
# the host prepared the next one. They travel through pinned memory with non-blocking copies
# (`satconv.data.host_to_device`), the epoch's order moves to the GPU once, and evaluation indexes the
# images where they are stored; a CUDA test checks this with `torch.cuda.set_sync_debug_mode("error")`.
# Epoch rows measured before this change (the committed training runs among them) include those waits.

# %%
epoch_rows = [dict(e, source="bench --epoch") for e in gpu_epochs or [] if "error" not in e] + run_epochs
if not epoch_rows:
    display(not_measured("Whole-epoch timings", "h200_epochs.jsonl"))
else:
    header = ["config", "source", "images", "epoch time (s)", "whole-epoch img/s", "model-only img/s",
              "whole epoch / model only"]
    cells = []
    for e in epoch_rows:
        epoch_img_s = e["images"] / e["epoch_time_s"]
        model_only = e.get("model_only_img_s") or (best_rows.get(e["config"]) or {}).get("train_img_s")
        source = e["source"]
        if source == "bench --epoch" and "seed" in e:  # rows written before they named data and seed did not
            source = (f"bench --epoch: {e['data']}, {e['epochs']} epochs (the last timed), seed {e['seed']}, "
                      f"{e['device']}, {e['date'][:10]}"
                      + (f", source `{e['satconv_source'][:8]}`" if e.get("satconv_source") else ", source not recorded"))
        if source == "training run":
            source = (f"run {e['run']}: {e['data']}, {e['epochs']} epochs (median of {e['epochs_timed']}), "
                      f"seed {e['seed']}, {e['device']}")
        cells.append([e["config"], source, f"{e['images']:,}", f"{e['epoch_time_s']:.1f}", f"{epoch_img_s:,.0f}",
                      fmt(model_only, ",.0f"), fmt(model_only and model_only / epoch_img_s, ".2f")])
    display(html_table(header, cells))

# %% [markdown]
# ## Scaling with the image side
#
# How throughput and memory grow with the input for each attention family: the same networks at image
# sides 16, 32 and 64 (a side of 64 means 4 times the tokens of CIFAR-10 and 16 times the entries of a
# global attention matrix), at batch 100 and at the largest batch that fits. Learned relative embeddings
# are widened to cover the larger token grid (`satconv.bench.throughput.with_image_side`).

# %%
SIDES = (16, 32, 64)


def scaling_key(r):
    """(config, 'batch 100' or 'largest batch') of a scaling row."""
    largest = r.get("batch_mode") == "max" or r.get("batch") == "max"
    return r["config"], "largest batch" if largest else f"batch {r['batch']}"


if gpu_scaling is None:
    display(not_measured("Scaling with the image side", "h200_scaling.jsonl"))
else:
    series = {}
    for r in gpu_scaling:
        series.setdefault(scaling_key(r), {})[r.get("side", r.get("image_size"))] = r
    display(Markdown(f"Measured on {device_line(gpu_scaling)}."))
    header = ["config", "family", "batch"] + [f"side {s}: img/s, GiB" for s in SIDES]
    cells = []
    for (name, mode), by_side in series.items():
        first = next(iter(by_side.values()))
        row = [name, family(first), mode]
        for s in SIDES:
            r = by_side.get(s)
            if r is None:
                row.append("–")
            elif "error" in r:
                row.append(r["error"])
            else:
                batch = f" (batch {r['batch']:,})" if mode == "largest batch" else ""
                row.append(f"{r['train_img_s']:,.0f}, {fmt(r.get('peak_mem_gib'), '.2f')}{batch}")
        cells.append(row)
    display(html_table(header, cells))

# %%
if gpu_scaling is not None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({name for name, _ in series})
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    for (name, mode), by_side in series.items():
        ok = sorted((s, r) for s, r in by_side.items() if "error" not in r)
        if not ok:
            continue
        style = "--s" if mode == "largest batch" else "-o"
        label = None if mode == "largest batch" else f"{name} ({family(ok[0][1])})"
        axes[0].plot([s for s, _ in ok], [r["train_img_s"] for _, r in ok], style, color=colours[name])
        axes[1].plot([s for s, _ in ok], [r.get("peak_mem_gib") or float("nan") for _, r in ok], style,
                     color=colours[name], label=label)
    axes[1].plot([], [], "-o", color="black", label="batch 100")
    axes[1].plot([], [], "--s", color="black", label="largest batch")
    for ax, title in zip(axes, ["training images / s", "peak training memory (GiB)"]):
        ax.set(xscale="log", yscale="log", xticks=SIDES, xlabel="image side (pixels)", title=title)
        ax.set_xticklabels([str(s) for s in SIDES])
        ax.minorticks_off()
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Scaling with the image side (solid: batch 100, dashed: largest batch)")
    fig.tight_layout()
    plt.show()
else:
    print("no scaling plot: not measured yet")

# %% [markdown]
# Both axes are logarithmic, so a straight line is a power law. In the encoder models, global attention
# over $N = (s/2)^2$ tokens has $N^2$ score entries, so its memory and time per image grow up to $s^4$,
# while the local windows of SAN and SASA and the ResNet's convolutions grow as $s^2$, the number of
# pixels.
