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
# # Self-attention and convolution, executable
#
# This book reproduces *On the Relationship between Self-Attention and Convolutional Layers*
# {cite:p}`cordonnier2020` with a small PyTorch package, `satconv`, and checks it against the
# reproduction published in ReScience C {cite:p}`rescience2021`, which we call "the [Re]".
# Every figure and every number in it is produced by code that runs when the book is built,
# or, for the long training runs, by notebooks executed on a GPU machine and committed with their
# outputs.
#
# **Where the reproduction stands.** The paper's Table 1 against the runs committed so far, read
# from them by the {doc}`results` chapter, where every run is listed with its schedule, seeds and
# GPU:
#
# ```{glue} headline_table
# :doc: /chapters/results.py
# ```
#
# ## What the paper claims
#
# Transformers {cite:p}`vaswani2017` replaced recurrence by attention in language models; in
# vision, attention was first added to convolutional networks {cite:p}`bello2019`, and then
# shown to replace convolutions altogether {cite:p}`ramachandran2019`. The paper asks whether
# attention layers trained on images *behave* like convolutions, and answers in two parts.
#
# 1. **Expressivity.** A multi-head self-attention layer with $N_h$ heads and a relative
#    positional encoding can express any convolutional layer with a kernel of
#    $\sqrt{N_h} \times \sqrt{N_h}$ pixels (Theorem 1 of the paper). The construction gives each
#    head $h$ a fixed shift $\Delta^{(h)}$ and makes it attend to the single pixel at that shift,
#    so that each head applies one slice of the convolution kernel. The quadratic encoding does
#    this with a Gaussian bump around the query $q$: for a key pixel $k$, with
#    $\delta = k - q$,
#
#    $$
#    A^{(h)}_{q,k} = -\alpha^{(h)} \left( \lVert \delta - \Delta^{(h)} \rVert^2
#                    - \lVert \Delta^{(h)} \rVert^2 \right),
#    $$
#
#    and as the precision grows the softmax over keys becomes an indicator of the one key at the shift:
#
#    $$
#    \operatorname{softmax}_k A^{(h)}_{q,k} \xrightarrow{\;\alpha^{(h)} \to \infty\;}
#    \mathbb{1}\left[ \delta = \Delta^{(h)} \right].
#    $$
#
# 2. **Behaviour.** A six-layer, attention-only network trained on CIFAR-10 with this encoding
#    learns centres $\Delta^{(h)}$ that form a grid around the query in its first layers, much
#    like a $3 \times 3$ convolution, while deeper layers attend more broadly. Learned relative
#    encodings, with and without content-based attention (in the style of
#    Transformer-XL {cite:p}`dai2019`), show similar local patterns. The classification accuracy
#    of the quadratic model is compared with a ResNet18 {cite:p}`he2016`.
#
# ## What the [Re] found
#
# The [Re] re-implemented the paper from scratch, reproduced the ranking of the models (ResNet18
# and the quadratic encoding ahead of the learned encodings, which are ahead of learned plus
# content), proposed a "hierarchical" weight-tied variant, and compared with SAN
# {cite:p}`zhao2020` and the Vision Transformer {cite:p}`dosovitskiy2021`. Reading its code we
# also found deviations that matter for a reproduction: the content path transposes the pixel
# grid for the scores but not for the values, weight decay pulls the Gaussian centres and widths
# towards zero, evaluation runs in training mode, and the model is selected on the test set.
# `satconv` fixes each of these, and its unit tests pin the corrected behaviour.
#
# ## What this book checks
#
# - **The construction, numerically.** Quadratic attention with $K^2$ heads at the shifts of a
#   $K \times K$ grid matches `torch.nn.Conv2d` on interior pixels, with an error that vanishes as
#   $\alpha$ grows, and differs on the border, where the softmax cannot put mass on padding.
# - **The mechanisms under one interface.** Quadratic, learned relative and content attention,
#   the local mechanisms of SAN and SASA {cite:p}`ramachandran2019`, and FCViT's token mixer
#   {cite:p}`ma2022` all take the same input and return their attention probabilities, so one
#   set of tests and plots covers them all.
# - **Training, visualisation and cost.** The training chapter runs on a small smoke
#   configuration when the book is built; the real training runs are executed on a GPU and
#   committed under *GPU results*, each page stating its data set, schedule, seed and GPU. The
#   figures of the paper (attention centres per layer and over training, attention maps of the
#   learned encodings) are drawn from those runs where they are committed, and otherwise from
#   small stand-in runs that the pages label as such. The {doc}`cost` chapter recounts Table 1's
#   parameters and FLOPs, compares training speed with the [Re] and projects the GPU time needed to
#   reproduce the paper; the {doc}`appendix_engineering` explains the fast training step behind it.
#
# The figure below shows the idea of the construction on a $7 \times 7$ image: nine heads, each
# centred on one shift of the $3 \times 3$ grid around the query pixel (marked with a cross).
# Together they see exactly the receptive field of a $3 \times 3$ convolution.

# %% mystnb={"figure": {"caption": "Attention probabilities of nine quadratic heads for the centre query of a 7 x 7 image, one panel per head, placed at the head's shift.", "name": "fig-intro-heads"}}
import matplotlib.pyplot as plt
import numpy as np

SIZE, ALPHA = 7, 1.0  # image side and head precision alpha; a larger ALPHA means harder attention
query = np.array([SIZE // 2, SIZE // 2])
rows, cols = np.mgrid[0:SIZE, 0:SIZE]
delta = np.stack([rows, cols], axis=-1) - query  # (SIZE, SIZE, 2): key minus query

fig, axes = plt.subplots(3, 3, figsize=(5, 5))
for shift_row in (-1, 0, 1):
    for shift_col in (-1, 0, 1):
        logits = -ALPHA * ((delta - (shift_row, shift_col)) ** 2).sum(-1)
        probs = np.exp(logits - logits.max())
        ax = axes[shift_row + 1, shift_col + 1]
        ax.imshow(probs / probs.sum(), cmap="Blues", vmin=0, vmax=1)
        ax.plot(query[1], query[0], "rx")
        ax.set_title(f"shift ({shift_row:+d}, {shift_col:+d})", fontsize=8)
        ax.set_axis_off()
fig.tight_layout()
plt.show()

# %% [markdown]
# The attention mechanisms of the package are registered by the name a configuration file uses
# (`model.attention.kind`):

# %%
from satconv.attention import ATTENTION

for kind, cls in sorted(ATTENTION.items()):
    print(f"{kind:18s} {cls.__name__}")

# %% [markdown]
# ## How to read and rerun it
#
# The chapters are Python files in the jupytext percent format (`chapters/<name>.py`), paired
# with notebooks (`chapters/<name>.ipynb`) for Jupyter and papermill users. They import the
# package instead of defining models, so the book and the tests exercise the same code. From a
# clone of the repository:
#
# ```bash
# make book    # install, execute the chapters (cached) and build _build/html, failing on warnings
# make test    # unit tests, strict nbval on the chapters, the book build and a browser check
# ```
#
# A training run takes one configuration file; on a GPU machine the training notebook writes a
# result page per configuration:
#
# ```bash
# python -m satconv train --config configs/<name>.yaml
# papermill chapters/train.ipynb out.ipynb -p config configs/<name>.yaml
# ```
#
# The execution status of every chapter, and the versions used to build this copy of the book,
# are on the {doc}`status` page.
#
# ## References
#
# ```{bibliography}
# ```
