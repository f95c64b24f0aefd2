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
# # Attention mechanisms under one interface
#
# The paper compares three ways of scoring a query pixel against a key pixel: a fixed quadratic
# function of their offset, learned embeddings of the offset, and learned embeddings combined with
# the pixels' contents {cite:p}`cordonnier2020`. The [Re] adds a weight-shared ("hierarchical")
# network and compares with SAN and the Vision Transformer {cite:p}`rescience2021`; we also include
# SASA and FCViT's token mixer. This chapter goes through them one by one, each in the same order:
# what its paper says, its equation, the `satconv` code that implements it, and an executed check.
#
# Every mechanism is a module with the interface of the {doc}`theory` chapter: it maps
# `x: (B, height, width, D)` to `(B, height, width, D_out)` and, with `return_attention=True`,
# also returns a dense `(B or 1, H, N, N)` matrix of attention weights, one row per query pixel.
# A configuration file names the mechanism by its key in `satconv.attention.ATTENTION`.
#
# **The representative layer.** To compare them we build every mechanism at the width of the paper's
# model, $D = 400$, on its $16 \times 16$ token grid (a $32 \times 32$ CIFAR image after the
# $2 \times 2$ space-to-depth step), with the head count and window size of the paper it comes from,
# and run it once on a random input. We plot the attention of the centre query (red dot), count the
# parameters, and count the forward FLOPs with `torch.utils.flop_counter.FlopCounterMode`, which
# counts matrix products and convolutions only, at 2 FLOPs per multiply-add. The layers are freshly
# initialised: the pictures show what each mechanism *can* express at the start of training, not what
# it learns (the trained maps come in later chapters).

# %%
import math

import matplotlib.pyplot as plt
import torch
from myst_nb import glue
from torch.utils.flop_counter import FlopCounterMode

from satconv import config
from satconv.attention import ATTENTION, relative_offsets
from satconv.config import REPO_ROOT
from satconv.flops import flops_per_image
from satconv.models import build_model, count_parameters
from satconv.report import below, html_table, shown

torch.manual_seed(0)
torch.set_num_threads(2)

D, SIDE = 400, 16  # the paper's width and token grid
N = SIDE * SIDE
CENTRE = (SIDE // 2) * SIDE + SIDE // 2  # flat index of the centre query
x = torch.randn(1, SIDE, SIDE, D)  # (B, height, width, D)
x_other = torch.randn(1, SIDE, SIDE, D)  # a second input, to test input independence
ROWS = {}  # one row of the final table per mechanism

for kind, cls in ATTENTION.items():
    print(f"{kind:16s} -> {cls.__name__}")


# %% [markdown]
# Two helpers, used in every section. `profile` runs a layer on the random input inside the FLOP
# counter, records the row of the final comparison table and checks the layer's two declared
# properties against its probabilities: `input_independent` (the same weights for any input) and
# `row_stochastic` (non-negative rows that sum to 1). `show` draws the centre query's weights, one
# panel per head, each scaled to its own maximum; signed weights are drawn in red and blue.

# %%
def profile(name, layer, inputs=x, other=x_other, window="global"):
    """Run `layer`, record params / FLOPs / flags in ROWS, print the checks; return probs (B or 1, H, N, N)."""
    layer.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _, probs = layer(inputs, return_attention=True)
    with torch.no_grad():
        _, probs_other = layer(other, return_attention=True)
    same = torch.equal(probs, probs_other)
    stochastic = bool((probs >= 0).all()) and torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    ROWS[name] = {"heads": layer.num_heads, "window": window, "params": count_parameters(layer),
                  "gflops": counter.get_total_flops() / 1e9, "input_independent": layer.input_independent,
                  "row_stochastic": layer.row_stochastic, "same_for_other_input": same, "rows_sum_to_1": stochastic}
    print(f"{name}: {ROWS[name]['params']:,} parameters, {ROWS[name]['gflops']:.3f} GFLOPs (forward, one image)")
    print(f"  probs {tuple(probs.shape)}; same for another input: {same} (declared input_independent="
          f"{layer.input_independent}); row-stochastic: {stochastic} (declared {layer.row_stochastic})")
    return probs


def show(maps, height=SIDE, width=SIDE, query=CENTRE, crop=None):
    """Draw {label: (H, N) weights of one query}: one row per label, one panel per head; query=None: no mark."""
    cols = max(m.shape[0] for m in maps.values())
    fig, axes = plt.subplots(len(maps), cols, figsize=(1.05 * cols, 1.15 * len(maps) + 0.1), squeeze=False)
    qr, qc = divmod(query, width) if query is not None else (None, None)
    for axes_row, (label, m) in zip(axes, maps.items()):
        signed = bool((m < 0).any())
        for h, ax in enumerate(axes_row):
            ax.set_axis_off()
            if h < m.shape[0]:
                img, (r, c) = m[h].reshape(height, width), (qr, qc)
                if crop is not None:
                    img, (r, c) = img[qr - crop:qr + crop + 1, qc - crop:qc + crop + 1], (crop, crop)
                lim = float(img.abs().max()) or 1.0
                ax.imshow(img, cmap="RdBu_r" if signed else "viridis", vmin=-lim if signed else 0, vmax=lim)
                if query is not None:
                    ax.plot(c, r, "r.", ms=3)
        axes_row[0].set_title(label, fontsize=8, loc="left")
    fig.tight_layout()
    plt.show()


# %% [markdown]
# ## Quadratic attention, isotropic
#
# > The quadratic encoding of the paper gives each head a centre $\Delta^{(h)}$ and a sharpness
# > $\alpha^{(h)}$, both learned, and scores a key by its squared distance from the query shifted by the
# > centre; the scores do not depend on the pixels' contents. It is the encoding of the paper's
# > Theorem 1, and its best self-attention model on CIFAR-10 {cite:p}`cordonnier2020` (paraphrased).
#
# The logits are those of {eq}`eq-quadratic-logits`,
# $A^{(h)}_{q,k} = -\alpha^{(h)} \lVert \delta - \Delta^{(h)} \rVert^2$ up to a constant per head, with
# $\delta = k - q$. `QuadraticAttention` keeps $s = \sqrt{2\alpha}$ (`attention_spreads`) and computes
# the closed form, with no $1/\sqrt{d}$ scaling:
#
# ```{literalinclude} ../satconv/attention/quadratic.py
# :pyobject: QuadraticAttention.position_scores
# ```
#
# At initialisation the centres are drawn from $\mathcal{N}(0, 2^2)$ per coordinate and $\alpha \approx 0.5$:
# nine broad blobs scattered around the query.

# %%
torch.manual_seed(0)
quadratic = ATTENTION["quadratic"](D, 9)  # paper: 9 isotropic heads, no value projection
probs = profile("quadratic, isotropic", quadratic)
print("alpha per head:", [round(a, 2) for a in quadratic.alpha.tolist()])
glue("quadratic_score_params", sum(p.numel() for p in quadratic.position_parameters()) // 9, display=False)
show({"quadratic, isotropic, at initialisation": probs[0, :, CENTRE]})

# %% [markdown]
# The probabilities are `(1, 9, N, N)`: one matrix for the whole batch, which the layer caches in
# evaluation mode and applies to all images with a single matrix product.
#
# ## Quadratic attention, anisotropic
#
# > The paper's generalised quadratic encoding replaces the scalar sharpness by a full $2 \times 2$
# > precision matrix per head, so that a head can attend along an elongated, rotated Gaussian
# > {cite:p}`cordonnier2020` (paraphrased).
#
# With $S_h = \Sigma_h^{-1/2}$ learned (`attention_spreads`, shape `(H, 2, 2)`), the logits are
#
# ```{math}
# :label: eq-mech-anisotropic
# \begin{gathered}
# A^{(h)}_{q,k} = -\tfrac12 \bigl(\delta - \Delta^{(h)}\bigr)^\top \Sigma_h^{-1} \bigl(\delta - \Delta^{(h)}\bigr)
# = t_h^\top r_\delta + \text{const},
# \\
# r_\delta = \bigl(\delta_1, \delta_2, \delta_1^2, \delta_2^2, \delta_1 \delta_2\bigr),
# \end{gathered}
# ```
#
# a 5-dimensional relative encoding (term (d) of {eq}`eq-rel`) and a target vector $t_h$ per head.
# The package computes the closed form on the left; the expanded form, as the reference code writes
# it, is available as `target_vectors`:
#
# ```{literalinclude} ../satconv/attention/quadratic.py
# :pyobject: QuadraticAttention.target_vectors
# ```
#
# At initialisation $S_h = I + \text{noise}$ and the heads look isotropic, so we set nine
# illustrative heads by hand: centres on a $3 \times 3$ grid two pixels apart, each with a Gaussian
# stretched 4:1 and rotated by $20°$ more than the previous one. The check recomputes the probabilities
# from the expanded form $t_h^\top r_\delta$ with an explicit offset table.

# %%
torch.manual_seed(0)
anisotropic = ATTENTION["quadratic"](D, 9, isotropic=False)
angles = torch.arange(9) * math.radians(20)
rotation = torch.stack([torch.stack([angles.cos(), -angles.sin()], -1),
                        torch.stack([angles.sin(), angles.cos()], -1)], -2)  # (H, 2, 2)
with torch.no_grad():
    anisotropic.attention_centers.copy_(2.0 * torch.cartesian_prod(torch.arange(-1.0, 2), torch.arange(-1.0, 2)))
    anisotropic.attention_spreads.copy_(torch.diag(torch.tensor([1.2, 0.3])) @ rotation.transpose(1, 2))
probs = profile("quadratic, anisotropic", anisotropic)
glue("aniso_score_params", sum(p.numel() for p in anisotropic.position_parameters()) // 9, display=False)

delta = relative_offsets(SIDE, SIDE)  # (N, N, 2): key - query
d1, d2 = delta.unbind(-1)
r_delta = torch.stack([d1, d2, d1 ** 2, d2 ** 2, d1 * d2], dim=-1)  # (N, N, 5)
with torch.no_grad():
    expanded = torch.softmax(torch.einsum("hc,nmc->hnm", anisotropic.target_vectors(), r_delta), dim=-1)
glue("aniso_expanded_diff", below((expanded - probs[0]).abs().max().item(), 1e-5), display=False)  # rounding
show({"quadratic, anisotropic, set by hand": probs[0, :, CENTRE]})

# %% [markdown]
# The expanded form $t_h^\top r_\delta$ gives the same probabilities as the closed form: their largest
# difference is {glue:text}`aniso_expanded_diff`, float32 rounding. The [Re] wrote one coefficient of
# $t_h$ as $c + \mu_2$ instead of $c \mu_2$; the check above would catch that.
#
# ## Learned relative attention
#
# > Instead of fixing the form of the positional score, the paper learns an embedding per row
# > offset and per column offset, used alone (no content) or together with content-based attention,
# > and finds that heads without content learn to attend to fixed shifts around the query, like the
# > quadratic heads {cite:p}`cordonnier2020` (paraphrased).
#
# With row and column embedding tables $e^{row}$, $e^{col}$ indexed by the offset
# $\delta = (\delta_1, \delta_2)$, the three variants of the reference code, position only
# ($w \cdot r$), query-position ($q \cdot r$) and content plus query-position
# ($q \cdot k + q \cdot r$), are
#
# ```{math}
# :label: eq-mech-learned
# \begin{aligned}
# w \cdot r:\quad & A^{(h)}_{q,k} = w^{(h)\top}_{row}\, e^{row}_{\delta_1} + w^{(h)\top}_{col}\, e^{col}_{\delta_2}, \\
# q \cdot r:\quad & A^{(h)}_{q,k} = \bigl(q^{(h)\top}_{q,[:D_k/2]}\, e^{row}_{\delta_1} \\
# & \qquad\quad + q^{(h)\top}_{q,[D_k/2:]}\, e^{col}_{\delta_2}\bigr) / \sqrt{D_k}, \\
# q \cdot k + q \cdot r:\quad & A^{(h)}_{q,k} = \bigl(q^{(h)\top}_q k^{(h)}_k + q \cdot r\bigr) / \sqrt{D_k} .
# \end{aligned}
# ```
#
# The first is term (d) of {eq}`eq-rel` (input-independent, no $1/\sqrt{d}$), the second term (b), the
# third terms (a) and (b), as in SASA. The row half of each query scores the row offset, the column
# half the column offset:
#
# ```{literalinclude} ../satconv/attention/learned_relative.py
# :pyobject: LearnedRelativeAttention.scores
# ```

# %%
learned = {}
for variant in ("position_only", "query_position", "content_query_position"):
    torch.manual_seed(0)
    layer = ATTENTION["learned_relative"](D, 9, variant=variant, max_position=SIDE)
    learned[variant] = profile(f"learned relative, {variant}", layer)
show({f"learned, {variant}": p[0, :, CENTRE] for variant, p in learned.items()})

# %% [markdown]
# Only the position-only variant is input-independent, and it alone returns a single `(1, H, N, N)`
# matrix. With random embeddings its heads are noisy but already structured along rows and columns:
# the score is a sum of a row term and a column term. The variants with a query see a different map
# for every image.
#
# ## Content-only attention
#
# > Without any positional encoding, self-attention is the standard dot-product attention of the
# > Transformer {cite:p}`vaswani2017`: each query compares its content with the content of every key.
#
# ```{math}
# :label: eq-mech-content
# \begin{gathered}
# A^{(h)}_{q,k} = \frac{\bigl(X_q W^{(h)}_{qry}\bigr) \bigl(X_k W^{(h)}_{key}\bigr)^\top}{\sqrt{D_h}},
# \\
# \mathrm{MHSA}(\Pi X) = \Pi\, \mathrm{MHSA}(X) \text{ for every permutation } \Pi \text{ of the pixels.}
# \end{gathered}
# ```
#
# This is term (a) of {eq}`eq-rel` alone. Such a layer does not know where a pixel is: permuting
# the pixels permutes the output in the same way. A network of such layers followed by a mean over
# pixels sees the image as a bag of pixels.
#
# ```{literalinclude} ../satconv/attention/content.py
# :pyobject: ContentAttention.scores
# ```
#
# The check shuffles the pixels of the input with a random permutation and compares.

# %%
torch.manual_seed(0)
content = ATTENTION["content"](D, 9)
probs = profile("content only", content)
perm = torch.randperm(N)
with torch.no_grad():
    out = content(x).reshape(1, N, D)
    out_perm = content(x.reshape(1, N, D)[:, perm].reshape(1, SIDE, SIDE, D)).reshape(1, N, D)
glue("content_perm_diff", below((out_perm - out[:, perm]).abs().max().item(), 1e-5), display=False)  # rounding
glue("content_out_scale", shown(out.abs().max().item(), ".2f"), display=False)
show({"content only": probs[0, :, CENTRE]})

# %% [markdown]
# Shuffling the pixels shuffles the output, up to float32 rounding: the largest difference between the
# two is {glue:text}`content_perm_diff`, for outputs of size up to {glue:text}`content_out_scale`. At
# initialisation, on random input, the attention of the centre query is spread over the whole image, with
# no preference for its neighbourhood.
#
# ## Hierarchical attention: the [Re]'s weight sharing
#
# > The [Re] proposes a "hierarchical" variant: a single attention block is applied as many times as
# > the original network has layers, and every pass after the first computes its keys from the input
# > of the first pass. It reports that this raises the accuracy of learned + content attention with
# > about a sixth of the parameters, and lowers that of quadratic attention {cite:p}`rescience2021`
# > (paraphrased).
#
# With one set of block weights $\theta$ and $X^{(0)}$ the embedded image, pass $\ell$ computes
#
# ```{math}
# :label: eq-mech-hierarchical
# \begin{gathered}
# X^{(\ell + 1)} = \mathrm{Block}_\theta\bigl(X^{(\ell)}\bigr),
# \\
# A^{(\ell, h)} = X^{(\ell)} W^{(h)}_{qry} W^{(h)\top}_{key} X^{(0)\top} \quad (\ell \ge 1),
# \end{gathered}
# ```
#
# so queries evolve with depth while keys stay those of the input. The encoder passes the first
# input as `key_source`; mechanisms without keys (quadratic, position-only) ignore it, and for them
# the variant is pure weight tying.
#
# ```{literalinclude} ../satconv/models/encoder.py
# :pyobject: AttentionEncoder.features
# ```
#
# The full-size networks of the configuration files show the trade: the same computation, a sixth
# of the parameters. (FLOPs are counted for the quadratic pair by running one image; the learned +
# content pair is built on the `meta` device, where `FlopCounterMode` counts without computing.)

# %%
hier = {}
for name, meta in [("paper_quadratic", False), ("re_gaussian_hier", False),
                   ("re_learned2d_withcontent_9heads", True), ("re_learned2d_withcontent_9heads_hier", True)]:
    cfg = config.load(REPO_ROOT / f"configs/{name}.yaml")
    torch.manual_seed(0)
    with torch.device("meta" if meta else "cpu"):
        model = build_model(cfg)
    flops = flops_per_image(model, mode="eval", batch=1, device="meta" if meta else None)
    hier[name] = (count_parameters(model), flops)
    print(f"{name:38s} {hier[name][0] / 1e6:6.2f} M parameters, {flops / 1e9:6.2f} GFLOPs per image (forward)")
glue("hier_ratio_quadratic", hier["paper_quadratic"][0] / hier["re_gaussian_hier"][0], display=False)
glue("hier_ratio_content", hier["re_learned2d_withcontent_9heads"][0]
     / hier["re_learned2d_withcontent_9heads_hier"][0], display=False)
glue("quadratic_params_full", hier["paper_quadratic"][0] / 1e6, display=False)

# %% [markdown]
# The shared networks have {glue:text}`hier_ratio_quadratic:.1f` (quadratic) and
# {glue:text}`hier_ratio_content:.1f` (learned + content) times fewer parameters and run exactly as
# many FLOPs. (The paper's quadratic model has {glue:text}`quadratic_params_full:.2f` M parameters.)
# The figure shows the two passes of a small shared network (the `quick` profile of the same
# configuration: width 32, 4 heads, 2 passes), for the centre query of one random image: the
# queries of pass 2 are the features after pass 1, the keys are those of the input.

# %%
torch.manual_seed(0)
cfg = config.load(REPO_ROOT / "configs/re_learned2d_withcontent_9heads_hier.yaml", profile="quick")
small = build_model(cfg).eval()
with torch.no_grad():
    _, passes = small(torch.randn(1, 3, 32, 32), return_attention=True)  # one (1, H, N, N) per pass
print(f"{len(small.blocks)} block, {len(passes)} passes, probabilities {tuple(passes[0].shape)} per pass")
show({f"hierarchical, pass {i + 1}": p[0, :, CENTRE] for i, p in enumerate(passes)})

# %% [markdown]
# ## SAN: pairwise and patchwise self-attention
#
# SAN {cite:p}`zhao2020` generalises attention to $y_i = \sum_{j \in \mathcal{R}(i)} \alpha(x_{\mathcal{R}(i)})_j \odot \beta(x_j)$
# over a local footprint $\mathcal{R}(i)$, with weights $\alpha$ shared by groups of channels. Its
# abstract introduces the two forms it studies:
#
# > One is pairwise self-attention, which generalizes standard dot-product attention and is
# > fundamentally a set operator. The other is patchwise self-attention, which is strictly more
# > powerful than convolution. {cite:p}`zhao2020`
#
# With the subtraction relation and the position encoding of the reference code ($p_i$ the pixel
# coordinates normalised to $[-1, 1]$, $P$ a learned $2 \to 2$ map), and $\gamma$ a small
# BatchNorm-ReLU-linear network:
#
# ```{math}
# :label: eq-mech-san
# \begin{aligned}
# \text{pairwise:}\quad & \alpha_{ij} = \operatorname{softmax}_{j \in \mathcal{R}(i)}\, \gamma\bigl(\bigl[\varphi(x_i) - \psi(x_j),\; P(p_i) - P(p_j)\bigr]\bigr), \\
# \text{patchwise:}\quad & \alpha_{i,\cdot} = \gamma\bigl(\bigl[\varphi(x_i), \psi(x_{j_1}), \dots, \psi(x_{j_{k^2}})\bigr]\bigr) \quad \text{(no softmax).}
# \end{aligned}
# ```
#
# Pairwise weights depend on the pair $(i, j)$ only; patchwise weights see the whole footprint at
# once and are not normalised. `satconv` implements both with index gathers over the footprint
# instead of the reference's CUDA kernels; keys outside the image are left out (the reference pads by
# reflection).
#
# ```{literalinclude} ../satconv/attention/san.py
# :pyobject: SANPairwiseAttention.weights
# ```
#
# ```{literalinclude} ../satconv/attention/san.py
# :pyobject: SANPatchwiseAttention.weights
# ```
#
# The [Re] uses a $3 \times 3$ footprint and 8 weight groups. The pictures are cropped to the
# $7 \times 7$ pixels around the query.

# %%
san = {}
for kind, name in [("san_pairwise", "SAN pairwise"), ("san_patchwise", "SAN patchwise")]:
    torch.manual_seed(0)
    san[name] = profile(name, ATTENTION[kind](D, 8, kernel_size=3), window="3 x 3")
    print(f"  keys with non-zero weight for the centre query: {int((san[name][0, :, CENTRE] != 0).sum(-1).max())}")
show({name: p[0, :, CENTRE] for name, p in san.items()}, crop=3)

# %% [markdown]
# Both forms touch exactly the nine pixels of the footprint. Pairwise weights are a softmax over
# them, close to uniform at initialisation; patchwise weights are signed and unnormalised, a per-query, input-dependent convolution
# kernel, which is why SAN calls it more powerful than a convolution. The parameter counts are an
# order of magnitude below those of the global mechanisms: the relation works on $D/16$ channels and
# the weights are shared by $D/8$ channels each.
#
# ## Vision Transformer: patches and a class token
#
# > The Vision Transformer splits the image into fixed-size patches, embeds each linearly, adds
# > learned position embeddings, prepends a learnable classification token and feeds the sequence to
# > a standard Transformer encoder; the classifier reads the class token's final state
# > {cite:p}`dosovitskiy2021` (paraphrased).
#
# With patches $x_p^1, \dots, x_p^{N}$, embedding $E$ and position embeddings $E_{pos}$:
#
# ```{math}
# :label: eq-mech-vit
# \begin{gathered}
# z_0 = \bigl[x_{class};\, x_p^1 E;\, \dots;\, x_p^{N} E\bigr] + E_{pos},
# \\
# z_\ell = z_{\ell-1} + \mathrm{MHSA}\bigl(\mathrm{LN}(z_{\ell-1})\bigr) + \dots
# \end{gathered}
# ```
#
# The attention is content-only, {eq}`eq-mech-content`, over $N + 1$ tokens; position enters once, in
# $E_{pos}$, through the content. The class token is not a pixel, so the tokens no longer form a grid
# and the layer sees them as a `(B, 1, N + 1, D)` row. The [Re] gave each head the full width
# (9 heads of 400); the plain ViT splits it, as here ($D_h = D / N_h$).
#
# ```{literalinclude} ../satconv/models/vit.py
# :pyobject: ViT.forward
# ```

# %%
torch.manual_seed(0)
vit_layer = ATTENTION["content"](D, 8, head_dim=D // 8, value_proj=True)  # split heads, as in ViT
tokens = torch.randn(1, 1, N + 1, D)  # (B, 1, class token + N patches, D)
profile("ViT attention (class token, split heads)", vit_layer, inputs=tokens, other=torch.randn(1, 1, N + 1, D))

vit = {}
for name in ("vit_patch", "re_vit"):
    with torch.device("meta"):
        vit[name] = build_model(config.load(REPO_ROOT / f"configs/{name}.yaml"))
    flops = flops_per_image(vit[name], mode="eval", batch=1, device="meta")
    print(f"{name:10s} {count_parameters(vit[name]) / 1e6:6.2f} M parameters, {flops / 1e9:6.2f} GFLOPs per image")

# %% [markdown]
# Below, a small ViT (the `quick` profile of `configs/vit_patch.yaml`: $4 \times 4$ patches of a
# $32 \times 32$ image, so an $8 \times 8$ grid plus the class token, width 32, 4 heads) at
# initialisation: the attention of the class token (top) and of the centre patch (bottom) over the
# 64 patches. The class token's own column is left out.

# %%
torch.manual_seed(0)
small_vit = build_model(config.load(REPO_ROOT / "configs/vit_patch.yaml", profile="quick")).eval()
with torch.no_grad():
    _, layers = small_vit(torch.randn(1, 3, 32, 32), return_attention=True)
grid = small_vit.grid
first = layers[0][0, :, :, 1:]  # (H, N + 1, N): drop the class token's column
centre_patch = 1 + (grid // 2) * grid + grid // 2  # token index: the class token is token 0
print(f"tokens: 1 class + {grid} x {grid} patches; probabilities {tuple(layers[0].shape)} per layer")
show({"class token": first[:, 0]}, height=grid, width=grid, query=None)
show({"centre patch": first[:, centre_patch]}, height=grid, width=grid, query=centre_patch - 1)

# %% [markdown]
# ## SASA: stand-alone local self-attention
#
# > Stand-alone self-attention replaces every spatial convolution of a ResNet by attention over a
# > $k \times k$ neighbourhood of each pixel, with relative position embeddings for the row and column
# > offsets; the abstract reports that the fully attentional ResNet-50 "outperforms the baseline on
# > ImageNet classification with 12% fewer FLOPS and 29% fewer parameters" {cite:p}`ramachandran2019`.
#
# ```{math}
# :label: eq-mech-sasa
# y_{ij} = \sum_{a, b \in \mathcal{N}_k(i, j)} \operatorname{softmax}_{ab}\bigl(q_{ij}^\top k_{ab} + q_{ij}^\top r_{a-i,\, b-j}\bigr)\, v_{ab},
# ```
#
# with $r_{a-i, b-j}$ the concatenation of a row-offset and a column-offset embedding. These are
# terms (a) and (b) of {eq}`eq-rel`, the same as the learned + content variant
# {eq}`eq-mech-learned`, restricted to a window and without the $1/\sqrt{D_k}$:
#
# ```{literalinclude} ../satconv/attention/sasa.py
# :pyobject: SASAAttention.forward
# ```
#
# The paper's main models use $k = 7$ and 8 heads, which split the width ($D_h = D / 8$).

# %%
torch.manual_seed(0)
probs = profile("SASA", ATTENTION["sasa"](D, 8, kernel_size=7), window="7 x 7")
print(f"  keys with non-zero weight for the centre query: {int((probs[0, :, CENTRE] > 0).sum(-1).max())}")
show({"SASA, 7 x 7": probs[0, :, CENTRE]}, crop=5)

# %% [markdown]
# Every head keeps its weight inside the 49 pixels of the window. With unit-variance position
# embeddings and no $1/\sqrt{D_k}$, the logits are large and most heads are already sharp at
# initialisation. Unlike the global mechanisms, the cost grows with $k^2$ rather than with the number
# of pixels.
#
# ## FCViT: from attention to convolution
#
# > FCViT starts from the observation that the attention maps of trained vision transformers are
# > nearly the same for every query ("query-irrelevant") and replaces attention by a cheaper token
# > mixer: a global context term, computed from the similarity of each token to the image's average,
# > and large depth-wise convolutions {cite:p}`ma2022` (paraphrased).
#
# With $g = \frac1N \sum_i x_i$ and $h$ one of 8 channel groups of size $d_h$, the token mixer computes
#
# ```{math}
# :label: eq-mech-fcvit
# \begin{aligned}
# s_{h,i} &= \operatorname{standardise}\bigl(\langle x_{h,i}, g_h \rangle / \sqrt{d_h}\bigr)\, w_h + b_h, \\
# \mathrm{GC}(x)_{h,i} &= s_{h,i}\, \mathrm{MLP}(g)_h, \\
# x &\leftarrow x + \mathrm{GC}(x), \\
# x &\leftarrow \mathrm{GELU}\bigl(\mathrm{fc}(\mathrm{DWConv}_{11 \times 11}(x))\bigr),
# \end{aligned}
# ```
#
# twice. The only spatial mixing between tokens is the depth-wise convolution plus a rank-one global
# term; there are no queries or keys. As its "attention", `FCViTTokenMixer` returns the first
# depth-wise kernel as a dense matrix (averaged over each group's channels): the same kernel for
# every query, signed, not normalised.
#
# ```{literalinclude} ../satconv/attention/fcvit.py
# :pyobject: FCViTTokenMixer.forward
# ```

# %%
torch.manual_seed(0)
fcvit = ATTENTION["fcvit"](D, 8, kernel_size=11)
probs = profile("FCViT token mixer", fcvit, window="11 x 11 + global")
with torch.no_grad():
    changes = (fcvit(x) - fcvit(x_other)).abs().max().item()
print(f"  the output still depends on the input (global context): {changes > 0}")
show({"FCViT, depth-wise kernel": probs[0, :, CENTRE]})

# %% [markdown]
# The returned matrix is the same for every input, yet the layer declares `input_independent = False`:
# the global context makes the output depend on the input in a way this matrix does not show. It is
# the one mechanism whose declared flag and measured weights disagree, on purpose.
#
# ## Comparison
#
# The table collects the representative layers ($D = 400$ on a $16 \times 16$ grid, one image).
# *Input-independent* and *row-stochastic* are the flags each class declares; the checks above
# compared them with the returned weights.

# %%
mismatch = [name for name, r in ROWS.items() if r["input_independent"] != r["same_for_other_input"]
            or r["row_stochastic"] != r["rows_sum_to_1"]]
print(f"declared flags that differ from the measured weights: {mismatch}")

header = ["mechanism", "heads", "window", "parameters", "GFLOPs", "input-independent", "row-stochastic"]
cells = [[name, r["heads"], r["window"], f"{r['params']:,}", f"{r['gflops']:.3f}",
          "yes" if r["input_independent"] else "no", "yes" if r["row_stochastic"] else "no"]
         for name, r in ROWS.items()]
base = ROWS["quadratic, isotropic"]["gflops"]
local = [ROWS[name]["gflops"] / base for name in ("SAN pairwise", "SAN patchwise", "SASA", "FCViT token mixer")]
glue("local_min", min(local), display=False)
glue("local_max", max(local), display=False)
html_table(header, cells)

# %% [markdown]
# Three groups stand out. The *positional* mechanisms (quadratic, learned position-only) compute one
# attention matrix for all images; their cost is the shared matrix product and the output projection
# that stacks the nine per-head filters, and quadratic attention needs only
# {glue:text}`quadratic_score_params` (isotropic) or {glue:text}`aniso_score_params` (anisotropic)
# parameters per head for its scores. The *content* mechanisms (learned with a query, content-only, ViT) spend
# their extra parameters and FLOPs on queries and keys of the full width. The *local* mechanisms
# (SAN, SASA, FCViT) cost between {glue:text}`local_min:.0%` and {glue:text}`local_max:.0%` of the
# FLOPs of the quadratic layer at this size, because a window of $k^2$ keys replaces the $N$ keys of
# global attention; their weights cannot reach beyond the window, the same restriction that a
# convolution has (FCViT adds its rank-one global term).
