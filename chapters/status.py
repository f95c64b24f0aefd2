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
# # Execution status
#
# The chapters are executed when the book is built (`make book`), on the build machine's CPU,
# with results cached in `_build/.jupyter_cache`: a chapter is re-run only when its code changes.
# The table lists every notebook the build executed, when, how long it took and whether it
# succeeded. The training runs under *GPU results* are not in it: they were executed on a GPU
# machine and are rendered as committed, and each of them records its own hardware and versions.
#
# ```{nb-exec-table}
# ```
#
# ## Software used for this build

# %%
# NBVAL_IGNORE_OUTPUT
import platform
import sys

import torch

import satconv
from satconv.provenance import source_digest

print(f"python   {sys.version.split()[0]} ({platform.python_implementation()})")
print(f"platform {platform.platform()}")
print(f"machine  {platform.machine()}, {torch.get_num_threads()} torch threads")
print(f"torch    {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
print(f"satconv  {satconv.__version__}, source digest {source_digest()}")

# %% [markdown]
# The versions of the book toolchain itself:

# %%
# NBVAL_IGNORE_OUTPUT
from importlib.metadata import PackageNotFoundError, version

for package in ("jupyter-book", "myst-nb", "sphinx", "jupytext", "papermill", "nbval", "ipywidgets",
                "numpy", "matplotlib", "torchvision"):
    try:
        print(f"{package:14s} {version(package)}")
    except PackageNotFoundError:
        print(f"{package:14s} not installed")
