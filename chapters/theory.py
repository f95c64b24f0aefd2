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
# # Theory: attention can express convolution
#
# This chapter states the paper's expressivity result {cite:p}`cordonnier2020` and then runs it.
# We write down multi-head self-attention, the convolution it is compared with and the relative
# positional encodings that make the comparison possible; then the two lemmas and the theorem;
# then we build the attention layer that the proof describes, with `satconv.theory`, and measure
# how close it comes to `torch.nn.functional.conv2d`: as a function of the softmax sharpness
# $\alpha$, in two floating point formats, on the image border, with fewer heads than the theorem
# asks for, and with heads that are too narrow. Every number in the text below is computed when the
# page is built.
#
# **Axes.** Shape comments in the package and here use one vocabulary: `B` batch, `H` heads,
# `N = height * width` pixels (tokens, flattened row-major, `n = row * width + col`), `D` channels and
# `Dh` the size of one head. Attention layers take `x: (B, height, width, D)`; when asked, they return
# their probabilities as a `(B or 1, H, N, N)` tensor, one row per query pixel.

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import LogNorm
from myst_nb import glue
from torch import nn

from satconv import theory
from satconv.attention import QuadraticAttention
from satconv.report import below, shown
from satconv.viz import explorer, fig_to_png

torch.manual_seed(0)
torch.set_num_threads(2)

# %% [markdown]
# ## Multi-head self-attention
#
# The input is a matrix $X \in \mathbb{R}^{T \times D_{in}}$ of $T$ tokens; for an image of
# $W \times H$ pixels, $T = WH$ and row $q$ of $X$ holds the channels of pixel $q$. One
# self-attention head mixes the rows of $X$ with a row-stochastic matrix computed from $X$ itself:
#
# ```{math}
# :label: eq-sa
# \mathrm{SA}(X) = \operatorname{softmax}(A)\, X W_{val},
# \qquad A = X W_{qry} W_{key}^\top X^\top ,
# ```
#
# where the softmax acts on each row of the attention scores $A \in \mathbb{R}^{T \times T}$.
# Multi-head self-attention runs $N_h$ such heads, each with its own $W^{(h)}_{qry}, W^{(h)}_{key}$
# and $W^{(h)}_{val} \in \mathbb{R}^{D_{in} \times D_h}$, concatenates their outputs and projects:
#
# ```{math}
# :label: eq-mhsa
# \begin{aligned}
# \mathrm{MHSA}(X) &= \operatorname*{concat}_{h \in [N_h]} \bigl[\mathrm{SA}_h(X)\bigr] W_{out} + b_{out},\\
# W_{out} &\in \mathbb{R}^{N_h D_h \times D_{out}},\quad b_{out} \in \mathbb{R}^{D_{out}} .
# \end{aligned}
# ```
#
# Cutting $W_{out}$ into $N_h$ blocks of $D_h$ rows,
# $W_{out} = [W^{(1)}_{out}; \dots; W^{(N_h)}_{out}]$, turns the concatenation into a sum, which is
# the one algebraic step the whole construction rests on:
#
# ```{math}
# :label: eq-concat-sum
# \mathrm{MHSA}(X) = b_{out} + \sum_{h \in [N_h]} \operatorname{softmax}(A^{(h)})\, X\,
# \underbrace{W^{(h)}_{val} W^{(h)}_{out}}_{=: W^{(h)} \in \mathbb{R}^{D_{in} \times D_{out}}} .
# ```
#
# Each head contributes one $D_{in} \times D_{out}$ filter $W^{(h)}$, applied to a weighted
# average of the input pixels. In the package every mechanism inherits the weighted sum and the
# projection from one base class; with `head_dim=None` there is no value projection
# ($W^{(h)}_{val} = I$, $D_h = D_{in}$, the paper's choice) and `proj` holds the stacked filters:
#
# ```{literalinclude} ../satconv/attention/base.py
# :pyobject: AttentionBase.combine
# ```
#
# ## Convolution
#
# A $K \times K$ convolution with weights $W \in \mathbb{R}^{K \times K \times D_{in} \times D_{out}}$
# (a cross-correlation, as in PyTorch) sums one filter per shift of the kernel window
# $\Delta\!\!\!\Delta_K = \{-\lfloor K/2 \rfloor, \dots, \lfloor K/2 \rfloor\}^2$:
#
# ```{math}
# :label: eq-conv
# \mathrm{Conv}(X)_{q,:} = \sum_{\Delta \in \Delta\!\!\!\Delta_K} X_{q + \Delta,:}\, W_{\Delta,:,:} + b .
# ```
#
# Set side by side, {eq}`eq-concat-sum` and {eq}`eq-conv` are both sums of filters applied to
# input pixels. A convolution picks *one pixel per filter*, at a fixed shift from the query; an
# attention head picks a *weighted average* of pixels. If a head could put all its weight on the
# pixel at a fixed shift, it would be one term of the convolution. The query-key product of
# {eq}`eq-sa` cannot do that: it compares contents, and it does not know where a pixel is.
#
# ## Relative positional encodings
#
# Positional encodings tell attention where the pixels are. An *absolute* encoding adds a learned
# vector per position to the input, $A = (X + P) W_{qry} W_{key}^\top (X + P)^\top$. A *relative*
# encoding lets the score depend on the offset $\delta = k - q$ between key and query through an
# encoding $r_\delta \in \mathbb{R}^{D_p}$. In the content/position decomposition of
# Transformer-XL {cite:p}`dai2019`, the score of head $h$ for query $q$ and key $k$ has four terms,
# labelled (a) to (d) from left to right:
#
# ```{math}
# :label: eq-rel
# \begin{aligned}
# A^{rel}_{q,k} = {}
# & \underbrace{X_q^\top W_{qry}^\top W_{key} X_k}_{\text{(a) content--content}}
# + \underbrace{X_q^\top W_{qry}^\top \widehat{W}_{key}\, r_\delta}_{\text{(b) content--position}} \\
# & + \underbrace{u^\top W_{key} X_k}_{\text{(c) global content bias}}
# + \underbrace{v^\top \widehat{W}_{key}\, r_\delta}_{\text{(d) global position bias}} ,
# \end{aligned}
# ```
#
# with $u, v \in \mathbb{R}^{D_k}$ learned per head and $\widehat{W}_{key}$ a key matrix for
# positions. Term (d) depends on the offset alone: a head made of it attends the same way around
# every query, whatever the image shows. The mechanisms of the paper use different subsets of the
# terms (the {doc}`mechanisms` chapter shows each one):
#
# | mechanism | terms | score |
# |---|---|---|
# | quadratic (Gaussian) | (d) | $v^{(h)\top} r_\delta$ with a fixed 3-d $r_\delta$, eq. {eq}`eq-quadratic` below |
# | learned, position only | (d) | $w_{row}^{(h)\top} e^{row}_{\delta_1} + w_{col}^{(h)\top} e^{col}_{\delta_2}$, learned tables |
# | learned + content | (a) + (b) | $\bigl(q^\top k + q^\top r_\delta\bigr) / \sqrt{D_k}$, as in SASA {cite:p}`ramachandran2019` |
# | content only | (a) | $q^\top k / \sqrt{D_k}$ {cite:p}`vaswani2017` |

# %% [markdown]
# ## Two lemmas and a theorem
#
# The paper proves the result in two steps {cite:p}`cordonnier2020`. We paraphrase the statements;
# the paper has the exact wording and the proofs.
#
# :::{admonition} Lemma 1 (hard attention at fixed shifts gives a convolution)
# Let $N_h = K^2$, $D_h \ge D_{out}$, and let $f : [N_h] \to \Delta\!\!\!\Delta_K$ be a bijection
# from heads to kernel shifts. If every head attends to exactly one pixel, the one at its shift,
#
# ```{math}
# :label: eq-hard-attention
# \operatorname{softmax}\bigl(A^{(h)}_{q,:}\bigr)_k =
# \begin{cases} 1 & \text{if } f(h) = q - k, \\ 0 & \text{otherwise,} \end{cases}
# ```
#
# then for any $K \times K$ convolution with $D_{out}$ output channels there are value and output
# weights such that $\mathrm{MHSA}(X) = \mathrm{Conv}(X)$ for every input $X$.
# :::
#
# *Proof idea.* Under {eq}`eq-hard-attention`, $\operatorname{softmax}(A^{(h)}) X$ is the input
# shifted by $f(h)$, so by {eq}`eq-concat-sum` the layer computes
# $b_{out} + \sum_h X_{q - f(h),:} W^{(h)}$. Choosing $W^{(h)} = W_{-f(h),:,:}$, the slice of the
# kernel at that shift, and $b_{out} = b$ gives {eq}`eq-conv`. A product $W^{(h)}_{val} W^{(h)}_{out}$
# has rank at most $D_h$, so a generic slice needs $D_h \ge \min(D_{in}, D_{out})$: this is where
# the condition on $D_h$ comes from (tested below).
#
# :::{admonition} Lemma 2 (a 3-dimensional relative encoding realises the hard attention)
# There is a relative encoding $r_\delta \in \mathbb{R}^{D_p}$ with $D_p = 3$ such that for every
# shift $\Delta \in \Delta\!\!\!\Delta_K$ some choice of the head's parameters makes
# $\operatorname{softmax}(A_{q,:})_k \to 1$ if $k - q = \Delta$ and $\to 0$ otherwise.
# :::
#
# The paper's encoding (its eq. 9) keeps only term (d) of {eq}`eq-rel`: $W_{qry} = W_{key} = 0$,
# $\widehat{W}_{key} = I$, and
#
# ```{math}
# :label: eq-quadratic
# v^{(h)} = -\alpha^{(h)} \bigl(1,\, -2\Delta^{(h)}_1,\, -2\Delta^{(h)}_2\bigr),
# \qquad
# r_\delta = \bigl(\lVert \delta \rVert^2,\, \delta_1,\, \delta_2\bigr) .
# ```
#
# Their product completes a square:
#
# ```{math}
# :label: eq-quadratic-logits
# A^{(h)}_{q,k} = v^{(h)\top} r_\delta
# = -\alpha^{(h)} \bigl( \lVert \delta - \Delta^{(h)} \rVert^2 - \lVert \Delta^{(h)} \rVert^2 \bigr),
# \qquad \delta = k - q .
# ```
#
# The constant $\alpha^{(h)} \lVert \Delta^{(h)} \rVert^2$ cancels in the softmax, which is therefore a
# discretised isotropic Gaussian centred on the pixel $q + \Delta^{(h)}$, with precision $2\alpha^{(h)}$.
# The learned parameters of a head are its centre $\Delta^{(h)}$ and its sharpness $\alpha^{(h)}$. Every
# other pixel is at squared distance at least 1 from the centre, and the four nearest ones at exactly 1,
# so the mass a head leaks off its target is
#
# ```{math}
# :label: eq-leak
# 1 - \operatorname{softmax}\bigl(A^{(h)}_{q,:}\bigr)_{q + \Delta^{(h)}}
# = 4 e^{-\alpha} + O\bigl(e^{-2\alpha}\bigr) \xrightarrow{\;\alpha \to \infty\;} 0 .
# ```
#
# :::{admonition} Theorem 1
# A multi-head self-attention layer with $N_h$ heads of dimension $D_h$, output dimension $D_{out}$
# and a relative positional encoding of dimension $D_p \ge 3$ can express any convolutional layer
# of kernel size $\sqrt{N_h} \times \sqrt{N_h}$ and $\min(D_h, D_{out})$ output channels.
# :::
#
# *Proof.* Lemma 2 for each head, with the centre $\Delta^{(h)} = -f(h)$, gives the attention of
# Lemma 1 in the limit $\alpha \to \infty$; Lemma 1 then gives the convolution.
#
# The limit matters in practice. For a finite $\alpha$ the layer is a convolution up to the leak
# {eq}`eq-leak`, and in floating point the leak stops mattering once it drops below the rounding
# error of the softmax. The rest of this chapter measures both.

# %% [markdown]
# ## The construction, executed
#
# `satconv.theory.attention_from_conv` builds the layer of the proof for a given `nn.Conv2d`:
# $K^2$ quadratic heads, head $h$ centred on the kernel shift $\Delta^{(h)}$ (a key-minus-query
# offset, so that it realises PyTorch's cross-correlation), all with the same $\alpha$, no value
# projection, and an output projection that stacks the kernel slices $W_{\Delta^{(h)}}$:
#
# ```{literalinclude} ../satconv/theory.py
# :pyobject: attention_from_conv
# ```
#
# We take a random $3 \times 3$ convolution from 4 to 5 channels and an $8 \times 8$ random input,
# in float64, and compare the two layers at $\alpha = 20$. Attention can only attend to pixels that
# exist, while the convolution pads with zeros, so `apply_padded` zero-pads the input by
# $\lfloor K/2 \rfloor$ pixels first and crops the output again (the border section below shows what
# happens without it).

# %%
K, C_IN, C_OUT, SIDE = 3, 4, 5, 8  # kernel, channels in and out, image side
ALPHA_DEMO = 20.0

torch.manual_seed(0)
conv = nn.Conv2d(C_IN, C_OUT, K, padding=K // 2).double()
x = torch.randn(2, C_IN, SIDE, SIDE, dtype=torch.float64)  # (B, C_in, H, W): the conv layout
x_nhwc = x.permute(0, 2, 3, 1)  # (B, H, W, C_in): the attention layout

attn = theory.attention_from_conv(conv, ALPHA_DEMO)
with torch.no_grad():
    out_attn = theory.apply_padded(attn, x_nhwc, K)  # (B, H, W, C_out)
    out_conv = conv(x).permute(0, 2, 3, 1)  # (B, H, W, C_out)

demo_error = (out_attn - out_conv).abs().max().item()
glue("demo_error", shown(demo_error, ".1e"), display=False)  # the leak at alpha = 20, far above rounding
glue("demo_scale", shown(out_conv.abs().max().item(), ".2f"), display=False)
glue("demo_heads", attn.num_heads, display=False)
print(f"{attn.num_heads} heads, alpha = {attn.alpha[0].item():g}, centres (row, col) = key - query:")
print(attn.attention_centers.detach().numpy().astype(int).tolist())
print(f"proj.weight {tuple(attn.proj.weight.shape)} = (C_out, heads * C_in)")

# %% [markdown]
# The {glue:text}`demo_heads` heads sit on the nine shifts of the $3 \times 3$ window, and the output
# projection has one $C_{in}$-column block per head: the kernel slices, stacked. The largest
# difference from the convolution is {glue:text}`demo_error`, for outputs of size up to
# {glue:text}`demo_scale`.
#
# The concatenation-versus-sum identity {eq}`eq-concat-sum` can be checked on its own. The loop
# below recomputes the layer head by head, from the probabilities the layer returns and the kernel
# slices of the convolution (not from the layer's projection), as $b + \sum_h P^{(h)} X W_{\Delta^{(h)}}$:

# %%
xp = F.pad(x_nhwc, (0, 0, 1, 1, 1, 1))  # (B, H+2, W+2, C_in): zero-padded as apply_padded does
with torch.no_grad():
    out_full, probs = attn(xp, return_attention=True)  # probs: (1, heads, Np, Np)
tokens = xp.reshape(2, -1, C_IN)  # (B, Np, C_in)
weight = conv.weight.detach()  # (C_out, C_in, K, K)
by_head = conv.bias.detach().clone()
for h, (dr, dc) in enumerate(theory.kernel_shifts(K).int().tolist()):
    slice_h = weight[:, :, dr + 1, dc + 1].T  # (C_in, C_out): W_Delta for Delta = (dr, dc)
    by_head = by_head + probs[0, h] @ tokens @ slice_h  # (B, Np, C_out)
concat_vs_sum = (by_head - out_full.reshape(2, -1, C_OUT)).abs().max().item()
glue("concat_vs_sum", below(concat_vs_sum, 1e-13), display=False)  # rounding: its digits differ by CPU
print(f"rows of probs sum to 1: {torch.allclose(probs.sum(-1), torch.ones_like(probs[..., 0]), atol=1e-12)}")

# %% [markdown]
# Sum and concatenation agree: their largest difference is {glue:text}`concat_vs_sum`, float64 rounding.
# (Errors at the level of rounding are stated as bounds in this book: their digits depend on the CPU that
# runs the page.) The figure shows the first output channel of both layers and their difference.

# %% mystnb={"figure": {"caption": "First output channel of a random 3 x 3 convolution (left) and of the attention layer built from it with alpha = 20 (middle), on the first input image; right: their absolute difference, on a log scale.", "name": "fig-theory-demo"}}
fig, axes = plt.subplots(1, 3, figsize=(9, 2.9), layout="constrained")
panels = [(out_conv[0, :, :, 0], "conv"), (out_attn[0, :, :, 0], f"attention, alpha = {ALPHA_DEMO:g}")]
lim = out_conv[0, :, :, 0].abs().max().item()
for ax, (img, title) in zip(axes[:2], panels):
    im = ax.imshow(img.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_title(title, fontsize=9)
fig.colorbar(im, ax=axes[:2], fraction=0.046)
diff = (out_attn - out_conv)[0, :, :, 0].abs().clamp_min(1e-20).numpy()
im = axes[2].imshow(diff, cmap="magma", norm=LogNorm(vmin=1e-12, vmax=1e-6))
axes[2].set_title("|attention - conv|", fontsize=9)
fig.colorbar(im, ax=axes[2], fraction=0.046)
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()

# %% [markdown]
# ## Error against $\alpha$
#
# `theory.construction_error` repeats the comparison over a range of $\alpha$, in float64 and in
# float32, and reports the largest error relative to the scale $\max |\mathrm{Conv}(X)|$ of the
# output. The leak {eq}`eq-leak` predicts $4 e^{-\alpha}$: the off-target mass multiplies a
# convolution of input *differences*, which has about the scale of the output. The function also
# returns a proven bound, the leak mass on the infinite lattice times $2 \max|X|$ times the largest
# absolute column sum of the kernel.

# %%
ALPHAS = np.arange(1.0, 61.0, 1.0)
errors = {name: theory.construction_error(conv, x, ALPHAS, dtype=dtype)
          for name, dtype in [("float64", torch.float64), ("float32", torch.float32)]}
scale = errors["float64"]["scale"]
rel = {name: np.array(r["relative"]) for name, r in errors.items()}
estimate = np.array(errors["float64"]["estimate"])
proven = np.array(errors["float64"]["rigorous_bound"]) / scale


def at(alpha, name="float64"):
    """Relative error of the construction at one alpha of the sweep."""
    return float(rel[name][np.searchsorted(ALPHAS, alpha)])


# up to alpha = 20 in float64 the leak dominates: the leading digits are the same on every machine
glue("err64_a1", shown(at(1), ".2f"), display=False)
for a in (5, 10, 20):
    glue(f"err64_a{a}", shown(at(a), ".1e"), display=False)
    glue(f"est_a{a}", shown(4 * math.exp(-a), ".1e"), display=False)
# past the rounding points below only rounding is left: bounds, and the unit roundoff they compare with
glue("err64_floor", below(rel["float64"][ALPHAS >= 40].max(), 1e-14), display=False)
glue("err32_tail", below(rel["float32"][ALPHAS >= 20].max(), 1e-5), display=False)
for name, dtype in [("32", torch.float32), ("64", torch.float64)]:
    glue(f"unit_roundoff{name}", shown(torch.finfo(dtype).eps / 2, ".1e"), display=False)
    # alpha at which the target's probability 1 / (1 + 4 e^-alpha) rounds to exactly 1: 4 e^-alpha < eps / 2
    glue(f"round_alpha{name}", shown(math.log(4 / (torch.finfo(dtype).eps / 2)), ".1f"), display=False)
# alpha at which e^-alpha itself underflows in float32: below the smallest normal, and below 2^-149
glue("underflow_normal", shown(-math.log(torch.finfo(torch.float32).tiny), ".1f"), display=False)
glue("underflow_subnormal", shown(149 * math.log(2), ".1f"), display=False)

# %% mystnb={"figure": {"caption": "Largest error of the construction relative to the output scale, against alpha, in float64 and float32, with the leak estimate 4 exp(-alpha) and the proven bound. Horizontal lines: the unit roundoff of each format. Errors that are exactly zero are drawn on the bottom axis.", "name": "fig-theory-alpha"}}
fig, ax = plt.subplots(figsize=(7, 4))
floor = 1e-18
for name, marker in [("float64", "o"), ("float32", "s")]:
    ax.semilogy(ALPHAS, np.maximum(rel[name], floor), marker, ms=3.5, label=f"measured, {name}")
ax.semilogy(ALPHAS, estimate, "k-", lw=1, label=r"estimate $4e^{-\alpha}$")
ax.semilogy(ALPHAS, proven, "k:", lw=1, label="proven bound")
for dtype, style in [(torch.float32, "--"), (torch.float64, "-.")]:
    ax.axhline(torch.finfo(dtype).eps / 2, color="grey", ls=style, lw=0.8)
    ax.text(ALPHAS[0], torch.finfo(dtype).eps / 2 * 2, f"{str(dtype)[6:]} roundoff", fontsize=8, color="grey")
ax.set_ylim(floor / 3, 1e2)
ax.set_xlabel(r"$\alpha$")
ax.set_ylabel(r"$\max |\mathrm{MHSA} - \mathrm{Conv}| \;/\; \max |\mathrm{Conv}|$")
ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 0.93))
fig.tight_layout()
plt.show()

# %% [markdown]
# The measured error follows the estimate $4 e^{-\alpha}$ over fifteen orders of magnitude
# ({numref}`fig-theory-alpha`): relative errors of {glue:text}`err64_a5` at $\alpha = 5$
# (estimate {glue:text}`est_a5`), {glue:text}`err64_a10` at $\alpha = 10$ (estimate
# {glue:text}`est_a10`) and {glue:text}`err64_a20` at $\alpha = 20$ (estimate
# {glue:text}`est_a20`) in float64. At $\alpha = 1$ the heads are still broad and the layer is a
# blur rather than the convolution (relative error {glue:text}`err64_a1`).
#
# Floating point stops the decay. The probability of the target pixel,
# $1 / (1 + 4 e^{-\alpha} + \dots)$, rounds to exactly 1 once $4 e^{-\alpha}$ falls below half the
# machine epsilon: from $\alpha \approx$ {glue:text}`round_alpha32` in float32 and
# $\alpha \approx$ {glue:text}`round_alpha64` in float64. Past those points what is left is the
# arithmetic's own rounding, whose last digits depend on the CPU. In float64 the relative error stays
# {glue:text}`err64_floor` for every $\alpha \ge 40$, against a unit roundoff of
# {glue:text}`unit_roundoff64`; in float32 it stays {glue:text}`err32_tail` for every $\alpha \ge 20$,
# against a unit roundoff of {glue:text}`unit_roundoff32`. (Errors that are exactly zero sit on the
# figure's bottom axis: with one-hot probabilities, both layers added the same products in the same order
# and rounded them identically.) The leak $e^{-\alpha}$ itself only
# underflows much later, below the smallest normal float32 for $\alpha >$
# {glue:text}`underflow_normal` and to exactly zero for $\alpha >$
# {glue:text}`underflow_subnormal`; the softmax becomes one-hot long before that, because it
# adds the leak to 1. A finite $\alpha$ therefore gives an exact convolution *in floating point*,
# which is how the theorem's limit is reached in practice.

# %% [markdown]
# ## The border: padding
#
# The convolution sees zeros outside the image. The softmax of an attention head only spans the
# pixels that exist, so a border query whose target $q + \Delta^{(h)}$ lies outside the image does
# not attend to a zero: its Gaussian puts the mass on the nearest pixels inside the image instead.
# Without padding the construction is therefore wrong on a border of $\lfloor K/2 \rfloor$ pixels,
# however large $\alpha$ is; zero-padding the input and cropping the output
# (`theory.apply_padded`) removes the difference.

# %%
ALPHA_BORDER = 30.0
attn_border = theory.attention_from_conv(conv, ALPHA_BORDER)
with torch.no_grad():
    maps = {"zero-padded input, cropped output": theory.apply_padded(attn_border, x_nhwc, K),
            "no padding": attn_border(x_nhwc)}  # (B, H, W, C_out) each
err_maps = {name: (out - out_conv).abs().amax(dim=(0, 3)) for name, out in maps.items()}  # (H, W)

unpadded = theory.construction_error(conv, x, [ALPHA_BORDER], padded=False)
glue("border_err", shown(unpadded["border_max_abs"][0], ".2f"), display=False)
glue("border_rel", shown(unpadded["border_relative"][0], ".0%"), display=False)
# the leak 4 e^-30 of the interior, with a rounding error about 1e-3 times its size
glue("interior_err", shown(unpadded["interior_max_abs"][0], ".0e", rtol=1e-2), display=False)

# where does the head centred on (-1, -1) look from the corner query (0, 0)?
with torch.no_grad():
    _, corner_probs = attn_border(x_nhwc, return_attention=True)  # (1, heads, N, N)
head_up_left = theory.kernel_shifts(K).tolist().index([-1.0, -1.0])
glue("corner_self", shown(corner_probs[0, head_up_left, 0, 0].item(), ".3f"), display=False)

# %% mystnb={"figure": {"caption": "Per-pixel error of the construction (alpha = 30, float64, worst over the batch and the output channels) against the zero-padded convolution. Left: input zero-padded and output cropped. Right: no padding; the error sits on the one-pixel border.", "name": "fig-theory-border"}}
fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.3))
norm = LogNorm(vmin=1e-17, vmax=10)
for ax, (name, err) in zip(axes, err_maps.items()):
    im = ax.imshow(err.clamp_min(1e-17).numpy(), cmap="magma", norm=norm)
    ax.set_title(name, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(im, ax=axes, fraction=0.03, label="|MHSA - Conv|")
plt.show()

# %% [markdown]
# Without padding the border pixels are off by up to {glue:text}`border_err`
# ({glue:text}`border_rel` of the output scale), while the interior matches to within
# {glue:text}`interior_err` ({numref}`fig-theory-border`). The reason is visible in the
# probabilities: from the top-left corner pixel, the head centred on the shift $(-1, -1)$ has no
# pixel to attend to, and puts a probability of {glue:text}`corner_self` on the corner pixel
# itself, the nearest one to its target. The zero of the convolution is replaced by a copy of an image
# pixel. The paper notes that attention keeps the image size, like a convolution with "SAME" padding
# {cite:p}`cordonnier2020`; the experiment shows what that implicit padding is made of, and that
# explicit zero padding of the input recovers the convolution exactly.

# %% [markdown]
# ## Fewer heads than $K^2$
#
# Lemma 1 uses one head per kernel shift. Can fewer heads do? With quadratic heads, the attention
# probabilities $P_h$ do not depend on the input, so a layer with $n$ heads computes
# $\sum_{h=1}^{n} P_h X W^{(h)}$: a sum of $n$ terms, each a fixed spatial mixing times one channel
# filter. The convolution is a sum of $K^2$ such terms with *disjoint* spatial patterns (the shifts),
# so generically it cannot be written with fewer. Eckart–Young makes this quantitative: whatever the
# centres and $\alpha$, the relative residual is at least the tail, beyond the $n$-th, of the singular
# values of the matrix whose rows are the (weighted) kernel slices:
#
# ```{literalinclude} ../satconv/theory.py
# :pyobject: head_count_lower_bound
# ```
#
# Measured: for a given set of centres and $\alpha$ the best value and output weights are a linear
# least-squares problem, which `theory.best_fit_error` solves on a batch of random images.
# With `alpha=math.inf` (hard attention) it chooses the centres among the nine kernel shifts by greedy
# backward elimination; we then keep those centres and vary $\alpha$.

# %%
torch.manual_seed(1)
x_fit = torch.randn(8, C_IN, SIDE, SIDE, dtype=torch.float64)  # 512 pixels for the least squares
HEADS = list(range(1, K * K + 1))
hard = {n: theory.best_fit_error(conv, x_fit, n, math.inf, max_subsets=1) for n in HEADS}
bound = {n: theory.head_count_lower_bound(conv, n, SIDE, SIDE) for n in HEADS}

FIT_ALPHAS = [0.3, 0.5, 1, 2, 3, 5, 10, 20, 40]
soft = {n: [theory.best_fit_error(conv, x_fit, n, a, centers=hard[n]["centers"])["residual"]
            for a in FIT_ALPHAS] for n in (4, 8, 9)}

glue("fit8_hard", shown(hard[8]["residual"], ".2f"), display=False)
glue("fit8_bound", shown(bound[8], ".2f"), display=False)
glue("fit4_hard", shown(hard[4]["residual"], ".2f"), display=False)
glue("fit9_hard", below(hard[9]["residual"], 1e-12), display=False)  # least-squares rounding
glue("fit8_min_soft", shown(min(soft[8]), ".2f"), display=False)

# %% mystnb={"figure": {"caption": "Best least-squares fit of the 3 x 3 convolution by n quadratic heads (relative residual). Left: hard attention (alpha infinite) against the number of heads, with the Eckart-Young lower bound for any input-independent attention. Right: against alpha, for 4, 8 and 9 heads with the centres found on the left; dashed: the lower bounds.", "name": "fig-theory-heads"}}
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
ax1.plot(HEADS, [hard[n]["residual"] for n in HEADS], "o-", label="best fit, hard attention")
ax1.plot(HEADS, [bound[n] for n in HEADS], "k--", label="lower bound (any centres, any alpha)")
ax1.set_xlabel("number of heads n")
ax1.set_ylabel("relative residual")
ax1.legend(fontsize=8)
for i, n in enumerate((4, 8, 9)):
    ax2.loglog(FIT_ALPHAS, np.maximum(soft[n], 1e-16), "o-", color=f"C{i}", label=f"{n} heads")
    if bound[n] > 0:  # the bound for 9 heads is 0
        ax2.axhline(bound[n], color=f"C{i}", ls="--", lw=0.8)
ax2.set_ylim(3e-17, 3)
ax2.set_xlabel(r"$\alpha$")
ax2.set_ylabel("relative residual")
ax2.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# With all nine heads the fit is exact up to rounding (residual {glue:text}`fit9_hard`). Dropping a
# single head leaves {glue:text}`fit8_hard` of the convolution unexplained with hard attention, above the
# lower bound {glue:text}`fit8_bound`; four heads leave {glue:text}`fit4_hard`. Making the
# heads softer does not rescue them: with eight heads, the best residual over the values of $\alpha$
# tried is {glue:text}`fit8_min_soft`. A broader Gaussian mixes the missing shift into a head,
# but with the weights of the neighbouring shifts, not with its own filter. The $K^2$ heads of the
# theorem are needed, not just sufficient, for a generic kernel.

# %% [markdown]
# ## Rank: split versus concatenated heads
#
# The second condition of Lemma 1 is $D_h \ge D_{out}$. Transformers usually *split* the model width
# among the heads, $D_h = D_{out} / N_h$; then each per-head filter
# $W^{(h)} = W^{(h)}_{val} W^{(h)}_{out}$ has rank at most $D_h$, while a generic kernel slice
# $W_\Delta$ has rank $\min(D_{in}, D_{out})$. The paper therefore concatenates heads of the full
# width, and so does `satconv` by default (`head_dim=None`). With `head_dim` set,
# `attention_from_conv` gives each head the best rank-$D_h$ approximation of its slice (a truncated
# SVD), and `theory.per_head_rank_deficiency` predicts the relative error that remains.
#
# A $3 \times 3$ convolution from 18 to 18 channels has nine slices of rank 18; with nine heads,
# the usual split is $D_h = 18 / 9 = 2$.

# %%
torch.manual_seed(2)
WIDTH = 18
conv_wide = nn.Conv2d(WIDTH, WIDTH, K, padding=K // 2).double()
x_wide = torch.randn(4, WIDTH, SIDE, SIDE, dtype=torch.float64)
ref_wide = conv_wide(x_wide).permute(0, 2, 3, 1).detach()  # (B, H, W, C_out)
linear_part = ref_wide - conv_wide.bias.detach()

HEAD_DIMS = list(range(1, WIDTH + 1))
predicted, measured = [], []
for dh in HEAD_DIMS:
    layer = theory.attention_from_conv(conv_wide, 40.0, head_dim=dh)
    with torch.no_grad():
        out = theory.apply_padded(layer, x_wide.permute(0, 2, 3, 1), K)
    measured.append(((out - ref_wide).norm() / linear_part.norm()).item())
    predicted.append(theory.per_head_rank_deficiency(conv_wide, dh)["relative_error"])

split = WIDTH // (K * K)
info = theory.per_head_rank_deficiency(conv_wide, split)
glue("slice_rank", max(info["slice_ranks"]), display=False)
glue("split_dh", split, display=False)
glue("split_measured", shown(measured[split - 1], ".0%"), display=False)
glue("split_predicted", shown(predicted[split - 1], ".0%"), display=False)
glue("concat_measured", below(measured[-1], 1e-13), display=False)  # rounding
print(f"ranks of the nine kernel slices: {info['slice_ranks']}")

# %% mystnb={"figure": {"caption": "Relative error of the construction (alpha = 40, float64) when every head has only D_h value dimensions, for a 3 x 3 convolution from 18 to 18 channels and nine heads: measured on random images, and predicted from the discarded singular values of the kernel slices.", "name": "fig-theory-rank"}}
fig, ax = plt.subplots(figsize=(6.5, 3.5))
ax.plot(HEAD_DIMS, measured, "o", label="measured")
ax.plot(HEAD_DIMS, predicted, "k-", lw=1, label="predicted (truncated SVD of each slice)")
ax.axvline(split, color="C1", ls="--", lw=1)
ax.text(split + 0.3, 0.8, r"split: $D_h = D_{out} / N_h$", color="C1", fontsize=8)
ax.axvline(WIDTH, color="C2", ls="--", lw=1)
ax.text(WIDTH - 0.3, 0.8, r"concatenated: $D_h = D_{in}$", color="C2", fontsize=8, ha="right")
ax.set_xticks(HEAD_DIMS[1::2])
ax.set_xlabel(r"head dimension $D_h$")
ax.set_ylabel(r"$\|\mathrm{MHSA} - \mathrm{Conv}\| \;/\; \|\mathrm{Conv} - b\|$")
ax.set_ylim(-0.03, 1)
ax.legend(fontsize=8, loc="center right")
fig.tight_layout()
plt.show()

# %% [markdown]
# The kernel slices have rank {glue:text}`slice_rank`. With split heads of dimension
# {glue:text}`split_dh` the layer misses {glue:text}`split_measured` of the convolution
# (predicted {glue:text}`split_predicted`); the error only vanishes once $D_h$ reaches the rank
# of the slices, and with concatenated heads it is {glue:text}`concat_measured`
# ({numref}`fig-theory-rank`). This is the $\min(D_h, D_{out})$ of Theorem 1.

# %% [markdown]
# ## Explore: one head's attention
#
# The widget below shows the attention probabilities of one quadratic head for the centre query
# of a $9 \times 9$ image (red cross), as the head's sharpness $\alpha$ and its centre $\Delta$ change.
# The nine integer centres are the heads of the $3 \times 3$ construction; the off-grid centres show
# that a head between pixels spreads its mass over the nearest ones, whatever $\alpha$. The images
# were computed when the page was built (by `QuadraticAttention` itself), so the sliders work in the
# static page.

# %%
GRID = 9
EXPLORE_ALPHAS = [0.1, 0.3, 1.0, 3.0, 10.0, 30.0]
CENTRES = [tuple(c) for c in theory.kernel_shifts(K).int().tolist()] + [(0.5, 0.0), (0.5, 0.5), (1.3, -0.6)]
query = (GRID // 2) * GRID + GRID // 2
head = QuadraticAttention(1, len(CENTRES), init_spread_std=0.0)
views = {}
for a in EXPLORE_ALPHAS:
    with torch.no_grad():
        head.attention_centers.copy_(torch.tensor(CENTRES, dtype=torch.float32))
        head.attention_spreads.fill_(math.sqrt(2 * a))  # alpha = s^2 / 2
        _, p = head(torch.zeros(1, GRID, GRID, 1), return_attention=True)  # (1, heads, N, N)
    for h, c in enumerate(CENTRES):
        fig, ax = plt.subplots(figsize=(2.6, 2.6))
        ax.imshow(p[0, h, query].reshape(GRID, GRID).numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.plot(GRID // 2, GRID // 2, "rx")
        ax.set_title(f"max prob {p[0, h, query].max():.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        views[(f"{a:g}", str(c))] = fig_to_png(fig)
explorer(views, [("alpha", [f"{a:g}" for a in EXPLORE_ALPHAS]), ("centre", [str(c) for c in CENTRES])])

# %% [markdown]
# ## Summary
#
# - **Construction (claim 1).** Nine quadratic heads on the $3 \times 3$ shifts reproduce a
#   $3 \times 3$ convolution with a relative error of about $4 e^{-\alpha}$
#   ({glue:text}`err64_a10` at $\alpha = 10$, {glue:text}`err64_a20` at $\alpha = 20$ in
#   float64), and exactly up to rounding once the softmax rounds to one-hot.
# - **Border (claim 2).** Without zero padding the border pixels differ by
#   {glue:text}`border_rel` of the output scale; the interior does not.
# - **Heads (claim 3).** With fewer than $K^2$ heads no choice of centres, $\alpha$ or weights fits
#   a generic kernel: eight heads leave {glue:text}`fit8_hard` of it.
# - **Rank (claim 4).** Split heads of dimension $D_{out} / N_h$ lose
#   {glue:text}`split_measured` of the convolution; concatenated heads lose nothing.
#
# The {doc}`mechanisms` chapter puts the quadratic encoding next to the other attention mechanisms
# of the paper and the [Re].
