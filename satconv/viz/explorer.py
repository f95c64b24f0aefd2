"""A kernel-free explorer: precomputed PNGs in nested ``widgets.Stack``\\ s switched by ``jslink``.

A static book page has no kernel, so Python callbacks never run there; linking a slider's
``index`` to a stack's ``selected_index`` in the browser is the interactivity that survives
(``toolchain.md`` §7).  :func:`atlas_views` and :func:`snapshot_views` render a run's atlas
and snapshots into views.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np

from .common import to_numpy, square_side, fig_to_png
from .maps import attention_grid
from .runs import atlas_maps, atlas_query


def explorer(views: dict, axes: Sequence[tuple[str, Sequence]], dropdown: Iterable[str] = (),
             image_width: str | None = None):
    """A widget that switches precomputed PNGs with ``jslink`` only (works in the static book).

    The views form nested ``widgets.Stack``\\ s, one nesting level per axis (outermost = first):
    level ``j`` holds ``prod(len(values_i) for i < j)`` stacks, each with ``len(values_j)`` children;
    the innermost children are ``widgets.Image``\\ s.  Each axis gets one ``SelectionSlider`` (or a
    ``Dropdown`` for names in ``dropdown``), and its ``index`` is ``jslink``\\ ed to the
    ``selected_index`` of EVERY stack at its level, so the browser switches images without a kernel.

    Args:
        views: ``{(v0, v1, ...): png_bytes}`` for every combination of the axis values.
        axes: ``[(name, values), ...]``, e.g. ``[("layer", [1, 2]), ("query", ["(7, 8)", "(3, 3)"])]``.
        dropdown: axis names shown as a dropdown instead of a slider.
        image_width: CSS width of the images (e.g. ``"600px"``), ``None`` = natural size.

    Returns:
        ``widgets.VBox([controls..., stack])`` with attributes ``controls`` (one per axis),
        ``stacks`` (list per level) and ``links`` (the ``jslink`` objects).
    """
    import ipywidgets as widgets

    if not axes:
        raise ValueError("axes must name at least one (name, values) pair")
    names = [name for name, _ in axes]
    values = [list(vals) for _, vals in axes]
    if any(not v for v in values):
        raise ValueError(f"every axis needs at least one value, got {dict(zip(names, values))}")
    missing = [key for key in itertools.product(*values) if key not in views]
    if missing:
        raise ValueError(f"views lacks {len(missing)} of the axis combinations, e.g. {missing[:3]}")
    unknown = set(dropdown) - set(names)
    if unknown:
        raise ValueError(f"dropdown names unknown axes {sorted(unknown)}; axes are {names}")
    layout = {} if image_width is None else {"layout": widgets.Layout(width=image_width)}
    stacks: list[list] = [[] for _ in axes]

    def build(prefix: tuple, depth: int):
        if depth == len(axes):
            return widgets.Image(value=views[prefix], format="png", **layout)
        stack = widgets.Stack([build(prefix + (v,), depth + 1) for v in values[depth]], selected_index=0)
        stacks[depth].append(stack)
        return stack

    root = build((), 0)
    controls, links = [], []
    for depth, (name, vals) in enumerate(zip(names, values)):
        labels = [str(v) for v in vals]
        if len(set(labels)) != len(labels):
            raise ValueError(f"axis {name!r} has values with equal labels: {labels}")
        options = list(zip(labels, range(len(labels))))
        cls = widgets.Dropdown if name in dropdown else widgets.SelectionSlider
        control = cls(options=options, description=name, style={"description_width": "initial"})
        controls.append(control)
        links += [widgets.jslink((control, "index"), (stack, "selected_index")) for stack in stacks[depth]]
    box = widgets.VBox([*controls, root])
    box.controls, box.stacks, box.links = controls, stacks, links
    return box


def _evenly(items: Sequence, count: int) -> list:
    idx = np.unique(np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int))
    return [items[i] for i in idx]


def atlas_views(atlases: dict, images: int = 4, dpi: int = 60, panel_size: float = 0.8) -> tuple[dict, list]:
    """Explorer views of atlases: one layers x heads grid per (model, image, query pixel).

    Args:
        atlases: ``name -> atlas`` (:func:`load_atlas`) that share their first ``images`` images and
            their query pixels (runs on the same test set do; a CPU stand-in on generated images and
            a GPU run on CIFAR-10 do not: give them separate explorers); labels come from the first.
        images: at most this many images per model.
        dpi, panel_size: PNG resolution and inches per panel (the book embeds every PNG).

    Returns:
        ``(views, axes)`` for :func:`explorer`: axes ``model``, ``image``, ``query``.
    """
    if not atlases:
        raise ValueError("atlases is empty")
    first = next(iter(atlases.values()))
    n_img = min([images] + [len(a["images"]) for a in atlases.values()])
    n_q = min(len(a["query_index"][0]) for a in atlases.values())
    classes = first.get("classes")
    img_labels = [f"{i + 1}" + (f" ({classes[int(first['labels'][i])]})" if classes else "") for i in range(n_img)]
    q_labels = [str(atlas_query(first, j)) for j in range(n_q)]
    shown = {name: (tuple(to_numpy(a["test_index"][:n_img]).tolist()) if "test_index" in a else (),
                    tuple(atlas_query(a, j) for j in range(n_q))) for name, a in atlases.items()}
    if len(set(shown.values())) > 1:
        raise ValueError(f"the atlases do not share their images and query pixels ({shown}); "
                         "draw them in separate explorers")
    views = {}
    for name, atlas in atlases.items():
        height, width = atlas["grid"][0]
        for i, j in itertools.product(range(n_img), range(n_q)):
            fig = attention_grid(atlas_maps(atlas, "probs", i, j), height, width, query=atlas_query(atlas, j),
                                 image=atlas["images"][i], panel_size=panel_size)
            views[(name, img_labels[i], q_labels[j])] = fig_to_png(fig, dpi, colors=64)
    return views, [("model", list(atlases)), ("image", img_labels), ("query", q_labels)]


def snapshot_views(snapshots: dict, max_epochs: int = 8, zoom: int | None = None, dpi: int = 60,
                   panel_size: float = 0.8) -> tuple[dict, list]:
    """Explorer views of the centre query's attention over training: one grid per (model, epoch).

    Args:
        snapshots: ``name -> load_snapshots(run_dir)``; models without ``centre_probs`` are skipped.
            The models must end at the same epoch (runs of one schedule): a 2-epoch stand-in next to
            a 30-epoch run would leave only the run's first epochs; give such runs separate explorers.
        max_epochs: at most this many epochs (evenly spaced among those all models share).
        zoom: crop window around the query (``None``: whole grid).
        dpi, panel_size: see :func:`atlas_views`.

    Returns:
        ``(views, axes)`` for :func:`explorer`: axes ``model``, ``epoch``.
    """
    usable = {n: {s["epoch"]: s["centre_probs"] for s in snaps if s["centre_probs"] is not None}
              for n, snaps in snapshots.items()}
    usable = {n: e for n, e in usable.items() if e}
    if not usable:
        raise ValueError("no snapshot holds centre_probs")
    last = {n: max(e) for n, e in usable.items()}
    if len(set(last.values())) > 1:
        raise ValueError(f"the models' snapshots end at different epochs {last}; draw them in separate explorers")
    epochs = _evenly(sorted(set.intersection(*(set(e) for e in usable.values()))), max_epochs)
    if not epochs:
        raise ValueError("the models share no snapshot epoch")
    views = {}
    for name, by_epoch in usable.items():
        for epoch in epochs:
            maps = by_epoch[epoch]
            side = square_side(maps.shape[-1])
            fig = attention_grid(maps, side, side, query=(side // 2, side // 2), crop=zoom, panel_size=panel_size)
            views[(name, epoch)] = fig_to_png(fig, dpi, colors=64)
    return views, [("model", list(usable)), ("epoch", epochs)]
