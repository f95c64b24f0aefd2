"""Attention visualisation: the figures of arXiv 1911.03584 §4 (Figs. 3-6) and a kernel-free explorer.

Everything returns a matplotlib ``Figure`` or an ipywidgets widget and never calls ``plt.show``.

==================  ==================================================================================
module              contents
==================  ==================================================================================
``maps``            :func:`attention_grid` (one query, layers x heads: Figs. 5/6, the [Re]'s ``viz_1``);
                    :func:`query_attention` (the paper's protocol: a fixed query averaged over images),
                    :func:`query_averaged_attention` (the [Re]'s ``viz``: one image, averaged over
                    queries), :func:`position_attention`, :func:`learned_position_maps` (Fig. 5)
``gaussian``        :func:`mass_threshold`, :func:`gaussian_mass_contours` (50% / 90% mass contours,
                    epfml/attention-cnn ``utils/plotting.py``), :func:`plot_gaussian_heads` (Fig. 4),
                    :func:`plot_center_evolution` (Fig. 3), :func:`plot_center_trajectories`,
                    :func:`degenerate_heads`; probabilities from :class:`QuadraticAttention` itself
``irrelevance``     :func:`query_irrelevance` (FCViT, Ma et al. 2022: maps nearly the same for every
                    query), :func:`model_query_irrelevance`, :func:`run_query_irrelevance`,
                    :func:`plot_query_irrelevance`
``explorer``        :func:`explorer` (nested ``widgets.Stack`` switched by ``widgets.jslink``: works in
                    the static book), :func:`atlas_views`, :func:`snapshot_views`
``runs``            :func:`find_run` (committed GPU run or a quick CPU stand-in), :func:`run_info`,
                    :func:`run_label` (where a figure's panels come from), :func:`runs_table`,
                    :func:`load_atlas`, :func:`atlas_maps`, :func:`atlas_query`, :func:`load_snapshots`
``common``          :func:`fig_to_png`, :func:`query_index`
==================  ==================================================================================

Axis vocabulary: ``L`` layers, ``H`` heads, ``N = height * width`` token pixels (row-major,
``n = row * width + col``), ``B`` images.
"""
from .common import EXPLORER_DPI, fig_to_png, query_index
from .explorer import atlas_views, explorer, snapshot_views
from .gaussian import (degenerate_heads, gaussian_mass_contours, mass_region, mass_threshold, plot_center_evolution,
                       plot_center_trajectories, plot_gaussian_heads, quadratic_center_maps, quadratic_parameters)
from .irrelevance import model_query_irrelevance, plot_query_irrelevance, query_irrelevance, run_query_irrelevance
from .maps import attention_grid, learned_position_maps, position_attention, query_attention, query_averaged_attention
from .runs import (GPU_RUNS_DIR, QUICK_OVERRIDES, QUICK_RUNS_DIR, atlas_maps, atlas_query, find_run, gpu_runs,
                   load_atlas, load_snapshots, quick_config, retitle_run_page, run_info, run_label, run_title,
                   runs_table)

__all__ = [
    "EXPLORER_DPI", "fig_to_png", "query_index",
    "attention_grid", "query_attention", "query_averaged_attention", "position_attention", "learned_position_maps",
    "mass_threshold", "mass_region", "gaussian_mass_contours", "quadratic_parameters", "quadratic_center_maps",
    "plot_gaussian_heads", "plot_center_evolution", "plot_center_trajectories", "degenerate_heads",
    "query_irrelevance", "model_query_irrelevance", "run_query_irrelevance", "plot_query_irrelevance",
    "explorer", "atlas_views", "snapshot_views",
    "GPU_RUNS_DIR", "QUICK_RUNS_DIR", "QUICK_OVERRIDES", "quick_config", "find_run", "gpu_runs", "run_info", "run_label",
    "run_title", "retitle_run_page",
    "runs_table", "load_atlas",
    "atlas_maps", "atlas_query", "load_snapshots",
]
