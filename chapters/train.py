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
# # Training a model
#
# This notebook trains one experiment from `configs/` and keeps everything the rest of the book
# reads: the resolved config, `metrics.jsonl`, checkpoints, the best-on-validation weights,
# per-epoch snapshots of the attention parameters and a final attention atlas.
# It is the page that papermill runs once per configuration on a GPU:
#
# ```bash
# papermill chapters/train.ipynb book/runs/paper_quadratic.ipynb \
#     -p config configs/paper_quadratic.yaml -p profile "" -p data /path/to/cifar10-images
# ```
#
# On a GPU it runs the experiment as configured, on the config's data (CIFAR-10 through torchvision,
# or the image folder named by `data` or `SATCONV_DATA_ROOT`). On a CPU, as in the committed copy
# that the tests re-execute, it uses the `quick` profile (a tiny model, a few hundred images, one
# epoch) on generated images, so that it runs on two cores in seconds; those numbers say nothing
# about CIFAR-10. The pages under *GPU results* are this notebook executed on real data.
#
# `overrides` takes any dotted config key, space-separated, for example
# `train.epochs=30 train.precision=bf16 train.compile=true`. `processes` trains the same experiment on
# several processes (one per GPU) through `torchrun`, as the README's *Several GPUs* section describes.

# %% tags=["parameters"]
config = "configs/paper_quadratic.yaml"  # any file in configs/
profile = "auto"  # "auto": as configured on a GPU, "quick" on a CPU; "quick" shrinks it; "" runs it as configured
data = "auto"  # "auto": the config's data on a GPU, "synthetic" on a CPU; "": the config's; or an image-folder root
overrides = ""  # space-separated dotted overrides, written as in the example above this cell
output_dir = ""  # "": runs/<config name> (or train.out_dir); a quick run goes to a fresh _build/train-quick/
device = ""  # "": CUDA when available, else CPU
processes = 1  # > 1: train on that many processes through torchrun, one per GPU (satconv.torchrun)

# %%
import json
import platform
import shutil
import warnings
from dataclasses import replace

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

import satconv
from satconv.config import REPO_ROOT, resolve_path
from satconv.models import build_model, count_parameters
from satconv.provenance import device_name, git_commit, source_digest
from satconv.torchrun import train_processes
from satconv.train import lr_at, read_metrics, resolve_config, train

on_gpu = torch.cuda.is_available() and device != "cpu"
if profile == "auto":
    profile = "" if on_gpu else "quick"
if data == "auto":
    data = "" if on_gpu else "synthetic"
sets = overrides.split()
if data == "synthetic":
    sets.append("data.source=synthetic")
elif data:
    sets += ["data.source=imagefolder", f"data.root={resolve_path(data).resolve()}"]
cfg = resolve_config(resolve_path(config), sets, profile or None)
# inductor's notice that it split a softmax reduction is about its own kernel choice, not this run
warnings.filterwarnings("ignore", message="Online softmax is disabled")
print(f"experiment {cfg.name}: {cfg.description.strip() or '(no description)'}")
attention = "" if cfg.model.arch.startswith("resnet") else f" / {cfg.model.attention.kind} attention"
print(f"model {cfg.model.arch}{attention}, {count_parameters(build_model(cfg)):,} parameters")
print(f"{cfg.train.epochs} epochs of batch {cfg.train.batch_size}, lr {cfg.train.lr}, {cfg.train.schedule} schedule, "
      f"seed {cfg.train.seed}, precision {cfg.train.precision}")

# %% [markdown]
# Where this notebook ran. The GPU pages of the book record their machine here.

# %%
# NBVAL_IGNORE_OUTPUT
# (versions and hardware differ between the machines that run this page.)
print("satconv", satconv.__version__, "| torch", torch.__version__, "| python", platform.python_version())
print("git commit", git_commit() or "unknown", "| source digest", source_digest())
print("device", device_name())

# %% [markdown]
# ## Train
#
# A run directory that already holds a checkpoint is resumed exactly where it stopped.

# %%
# NBVAL_IGNORE_OUTPUT
# (the progress bar shows timings.)
if not output_dir and profile == "quick":  # a smoke run starts from scratch every time
    output_dir = REPO_ROOT / "_build" / "train-quick" / cfg.name
    shutil.rmtree(output_dir, ignore_errors=True)
if processes > 1:  # the same experiment on several processes (README, "Several GPUs"); its output streams here
    result = train_processes(config, sets, profile or None, output_dir or None, processes, device or None)
else:
    result = train(cfg, out_dir=output_dir or None, device=device or None)
run_dir = result.run_dir

# %% [markdown]
# ## Curves

# %%
metrics = read_metrics(run_dir)
epochs = [m["epoch"] for m in metrics]
validated = [m for m in metrics if m.get("val_acc") is not None]  # none when data.val_size=0
fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(12, 3.2))
ax_loss.plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train")
ax_acc.plot(epochs, [m["train_acc"] for m in metrics], "o-", label="train")
if validated:
    ax_loss.plot([m["epoch"] for m in validated], [m["val_loss"] for m in validated], "o-", label="validation")
    ax_acc.plot([m["epoch"] for m in validated], [m["val_acc"] for m in validated], "o-", label="validation")
tested = [m for m in metrics if m.get("test_acc") is not None]
ax_acc.plot([m["epoch"] for m in tested], [m["test_acc"] for m in tested], "s--", label="test")
ax_lr.plot(epochs, [m["lr"] for m in metrics], "o-")
for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy"), (ax_lr, "learning rate (end of epoch)")):
    ax.set_title(title)
    ax.set_xlabel("epoch")
ax_loss.legend()
ax_acc.legend()
fig.tight_layout()

# %% [markdown]
# ## The schedule, and two differences from the original code
#
# **When the learning rate changes.** The original `train.py` (epfml/attention-cnn) calls
# `scheduler.step(global_step)` once per epoch, not once per batch. Its rate is therefore constant
# within an epoch, and since its warm-up starts from 0, the whole first epoch trains at rate 0.
# With `train.lr_step: epoch`, which the paper's configs set, `satconv` does the same; with `step`
# it sets the rate before every batch. The figure draws this run's rate under both settings, over
# its first epochs and over the whole run. On a long schedule the two curves lie on top of each
# other; on a schedule of a few epochs the per-epoch rate jumps from 0 to nearly the full rate
# after one epoch, a warm-up in name only.
#
# **Training images.** `satconv` holds a validation split out of the training set and selects
# weights on it, never on the test set; the original trained on the whole training set and kept
# the checkpoint with the best *test* accuracy. The line under the figure gives this run's split
# sizes. `data.val_size=0` trains on the whole training set, as the paper did.

# %%
steps_per_epoch = metrics[0]["step"] // metrics[0]["epoch"]
total = cfg.train.epochs * steps_per_epoch
fig, axes = plt.subplots(1, 2, figsize=(11, 3), layout="constrained")
for ax, last in zip(axes, (min(total, 20 * steps_per_epoch), total)):
    steps = range(0, last, max(1, last // 2000))
    for setting, style in (("step", "-"), ("epoch", "--")):
        t = replace(cfg.train, lr_step=setting)
        ax.plot([s / steps_per_epoch for s in steps], [lr_at(s, steps_per_epoch, t) for s in steps], style,
                label=f"lr_step: {setting}" + (" (this run)" if setting == cfg.train.lr_step else ""))
    ax.set(xlabel="epoch", ylabel="learning rate")
axes[0].set_title("first epochs")
axes[1].set_title("whole run")
axes[1].legend()
plt.show()
data_info = json.loads((run_dir / "run.json").read_text())["data"]
print(f"{steps_per_epoch} steps of {cfg.train.batch_size} per epoch; {data_info['description']}: "
      + ", ".join(f"{split} {n:,}" for split, n in data_info.get("sizes", {}).items()) + " images")

# %% [markdown]
# ## Final numbers
#
# The model is selected on the validation split (held out of the training set); the test set is
# only reported. A run with `data.val_size=0` has no validation split, hence no selection: it
# reports the final weights only.

# %%
# NBVAL_IGNORE_OUTPUT
# (accuracies depend on the machine's floating-point arithmetic.)
run_info = json.loads((run_dir / "run.json").read_text())
rows = ["| weights | epoch | validation accuracy | test accuracy |", "|---|---|---|---|"]
for name, label in (("final", "final"), ("best", "best on validation")):
    r = result.results.get(name)
    if r:
        val = "none (no validation split)" if r["val_acc"] is None else f"{r['val_acc']:.2%}"
        rows.append(f"| {label} | {r['epoch']} | {val} | {r['test_acc']:.2%} |")
where = run_info["device"]
if "processes" in run_info:  # a torchrun job: its ranks' devices
    where = f"{run_info['processes']['world_size']} processes: " + ", ".join(run_info["processes"]["devices"])
display(Markdown(
    f"**{cfg.name}**, seed {cfg.train.seed}, {len(metrics)} of {cfg.train.epochs} epochs, on "
    f"{run_info['data']['description']} ({where}).\n\n" + "\n".join(rows)))

# %% [markdown]
# ## This run's attention
#
# For a model with attention, the run keeps an *atlas* (`atlas.pt`): every layer's and head's
# attention for a few test images and query pixels. The figure shows the first atlas image and its
# centre query pixel (marked): a row per layer, a column per head, each panel the head's attention
# over the key pixels on its own colour scale. Under it, the convolution-likeness score of each
# layer (1: the layer is a $3 \times 3$ convolution in the sense of the paper's theorem; the
# *Visualising the attention* chapter defines it and compares the runs).

# %%
# NBVAL_IGNORE_OUTPUT
# (the maps and scores of a trained model depend on the machine's arithmetic)
from satconv import viz
from satconv.analysis import atlas_conv_likeness

if (run_dir / "atlas.pt").is_file():
    atlas = viz.load_atlas(run_dir)
    height, width = atlas["grid"][0]
    viz.attention_grid(viz.atlas_maps(atlas, "probs", image=0, query=0), height, width,
                       query=viz.atlas_query(atlas, 0), image=atlas["images"][0],
                       suptitle=f"{cfg.name}, seed {cfg.train.seed}: test image {int(atlas['test_index'][0])}, "
                                "centre query")
    plt.show()
    scores = atlas_conv_likeness(atlas)
    estimate = "" if scores[0]["queries"] == "all" else f" (estimated from {scores[0]['queries']} query pixels)"
    print("convolution-likeness per layer:", ", ".join(f"{s['score']:.2f}" for s in scores) + estimate)
else:
    print("no atlas: the network has no attention layers, or train.atlas_images is 0")
