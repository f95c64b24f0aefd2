"""Experiment configuration: the one documented schema, YAML loading and validation.

A config file has up to five top-level sections, each a frozen dataclass below::

    name: quadratic_9h            # optional; defaults to the file's stem
    description: "..."            # optional free text
    model:  {...}                 # ModelConfig
    train:  {...}                 # TrainConfig
    data:   {...}                 # DataConfig

Every field has a default (the paper's recipe, arXiv 1911.03584 App. B and epfml/attention-cnn),
so a config only states what differs.  :func:`load` refuses unknown keys, wrong types and
impossible values with a :class:`ConfigError` that names the file, the dotted key path, the bad
value and what is allowed (the generic type checks and field constraints live in
:mod:`satconv.config_types`; the cross-field checks of this schema live here).  :func:`override`
applies ``--set a.b=value`` overrides and :func:`apply_profile` applies named overlays such as ``quick``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .config_types import ConfigError, build, check, non_negative, odd_positive, positive, probability, type_name

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Attention options: one section per mechanism family.  The keys are the constructor keywords of
# the matching class in satconv.attention (besides dim, num_heads, head_dim, out_dim, dropout).
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuadraticOptions:
    """Gaussian (quadratic) positional attention, paper eq. (9) and its anisotropic form."""

    isotropic: bool = True  # one spread per head; False: a full 2x2 Sigma^{-1/2} per head
    init_center_std: float = non_negative(default=2.0)  # centres ~ N(0, std^2) per coordinate
    init_spread_std: float = non_negative(default=0.01)  # spread = 1 + N(0, std^2)


@dataclass(frozen=True)
class LearnedRelativeOptions:
    """Learned 2-D relative embeddings (epfml/attention-cnn Learned2DRelativeSelfAttention)."""

    # position_only: w.r (no content); query_position: q.r; content_query_position: q.k + q.r
    variant: Literal["position_only", "query_position", "content_query_position"] = "position_only"
    max_position: int = positive(default=16)  # 2*max_position-1 row and column embeddings


@dataclass(frozen=True)
class LocalOptions:
    """Local-footprint attention (SAN pairwise/patchwise, SASA): a k x k window around the query."""

    kernel_size: int = odd_positive(default=3)


@dataclass(frozen=True)
class FCViTOptions:
    """FCViT token mixer (ma-xu/FCViT models/fcvit.py)."""

    kernel_size: int = odd_positive(default=11)  # depth-wise conv size
    compete: bool = True  # competition-driven bottleneck in the global-context MLP


@dataclass(frozen=True)
class AttentionConfig:
    """The attention layer of the encoder, ViT, SAN and SASA networks.

    Only the options section named by ``kind`` is read; setting another is an error.
    """

    kind: Literal["quadratic", "learned_relative", "content", "san_pairwise", "san_patchwise", "sasa",
                  "fcvit"] = "quadratic"
    num_heads: int = positive(default=9)
    head_dim: Optional[int] = positive(default=None)  # null: = model width (heads concatenated, the paper)
    dropout: float = probability(default=0.1)  # on the attention probabilities
    quadratic: QuadraticOptions = field(default_factory=QuadraticOptions)
    learned_relative: LearnedRelativeOptions = field(default_factory=LearnedRelativeOptions)
    local: LocalOptions = field(default_factory=LocalOptions)
    fcvit: FCViTOptions = field(default_factory=FCViTOptions)


#: which options section each attention kind reads
OPTION_SECTION = {"quadratic": "quadratic", "learned_relative": "learned_relative", "content": None,
                  "san_pairwise": "local", "san_patchwise": "local", "sasa": "local", "fcvit": "fcvit"}


@dataclass(frozen=True)
class ViTOptions:
    """ViT trained from scratch: the [Re]'s hybrid (CNN stem + 2x2 patches) or a plain patch embedding."""

    stem: Literal["hybrid", "patch"] = "hybrid"
    patch_size: int = positive(default=2)  # on the stem's feature map (hybrid) or the image (patch)
    pool: Literal["cls", "mean"] = "cls"  # learned class token, or mean over patch tokens


@dataclass(frozen=True)
class ModelConfig:
    """Which network to build (``satconv.models.build_model``) and its sizes.

    ``encoder`` is the paper's model: 2x2 space-to-depth, Linear(12 -> hidden_dim), ``num_layers``
    post-norm blocks, mean-pool, Linear.  ``vit`` uses hidden_dim/num_layers/ffn_dim/attention too.
    ``resnet18``, ``san``, ``sasa`` and ``fcvit`` are staged networks sized by ``stage_depths`` and
    ``stage_widths`` (``null``: the architecture's default).
    """

    arch: Literal["encoder", "resnet18", "san", "vit", "sasa", "fcvit"] = "encoder"
    num_classes: int = positive(default=10)
    in_channels: int = positive(default=3)
    image_size: int = positive(default=32)
    hidden_dim: int = positive(default=400)
    num_layers: int = positive(default=6)
    ffn_dim: int = positive(default=512)
    activation: Literal["gelu", "relu"] = "gelu"
    dropout: float = probability(default=0.1)  # hidden dropout
    layer_norm_eps: float = positive(default=1e-12)
    downsample: int = positive(default=2)  # space-to-depth factor of the encoder's input
    hierarchical: bool = False  # one block applied num_layers times, first-pass keys reused ([Re])
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    vit: ViTOptions = field(default_factory=ViTOptions)
    stage_depths: Optional[tuple[int, ...]] = None  # staged networks: blocks per stage
    stage_widths: Optional[tuple[int, ...]] = None  # staged networks: channels per stage


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation, run batched on the data's device."""

    crop_padding: int = non_negative(default=4)  # random crop after zero padding (0: none)
    flip: bool = True  # random horizontal flip
    rotation: float = non_negative(default=0.0)  # max degrees of random rotation ([Re] ResNet: 5)
    color_jitter: Optional[tuple[float, float, float, float]] = None  # brightness, contrast, saturation, hue
    color_jitter_p: float = field(default=0.8, metadata=check(lambda v: 0 <= v <= 1, "must be in [0, 1]"))


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are split."""

    source: Literal["cifar10", "imagefolder", "synthetic"] = "cifar10"
    root: Optional[str] = None  # data directory (SATCONV_DATA_ROOT replaces the file's; --set wins); null: ~/.cache/satconv
    cache_dir: Optional[str] = None  # decoded uint8 tensor cache; null: <root>/.satconv-cache
    val_size: int = non_negative(default=5000)  # held out of train, stratified, seeded
    train_subset: Optional[int] = positive(default=None)  # use only this many training images
    test_subset: Optional[int] = positive(default=None)  # use only this many test images
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    device_resident: bool = True  # keep the uint8 dataset on the training device
    split_seed: int = 0  # seed of the validation split, the subsets and the synthetic images (fixed across runs)
    synthetic_train: int = positive(default=2000)  # source synthetic: generated training pool (val held out of it)
    synthetic_test: int = positive(default=500)  # source synthetic: generated test images


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and bookkeeping; defaults are the paper's recipe."""

    epochs: int = positive(default=300)
    batch_size: int = positive(default=100)
    eval_batch_size: int = positive(default=500)
    lr: float = positive(default=0.1)
    momentum: float = probability(default=0.9)
    nesterov: bool = False
    weight_decay: float = non_negative(default=1e-4)
    schedule: Literal["cosine", "multistep"] = "cosine"  # cosine: warm-up then per-step half-cosine to 0
    warmup_ratio: float = probability(default=0.05)  # fraction of all steps spent in linear warm-up
    milestones: tuple[int, ...] = (80, 150, 250)  # multistep: epochs at which lr is multiplied by gamma
    gamma: float = positive(default=0.1)
    # when the rate changes: "step" sets lr_at(step) before every batch; "epoch" holds lr_at(first step of
    # the epoch) for the whole epoch, as epfml/attention-cnn's train.py, which calls scheduler.step(global_step)
    # once per epoch (so its cosine warm-up gives 0 for all of epoch 0)
    lr_step: Literal["step", "epoch"] = "step"
    label_smoothing: float = probability(default=0.0)
    seed: int = 42
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the model (CUDA only)
    # torch.compile mode; reduce-overhead and max-autotune add CUDA graphs (fixed batch shapes)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    channels_last: bool = False  # channels_last memory format for convolutional networks (CUDA only)
    # fast path of the folded dense attention (content, q.k + q.r, ViT): folded GEMMs with stored
    # probabilities, or fused scaled_dot_product_attention kernels (same function, other dropout draws)
    attention_route: Literal["folded", "sdpa"] = "folded"
    # fast path of probabilities shared by the batch (quadratic, learned position-only): a batched GEMM
    # straight into W_out's layout with the probabilities' gradient as one GEMM over the batch, or one GEMM
    # and a layout copy, or bmm with autograd's gradient, or W_out's head slices first (same function)
    shared_route: Literal["bmm_gemm", "einsum", "bmm", "wfirst"] = "bmm_gemm"
    # the folded attention's softmax + dropout forward, and the element-wise part of its backward, as one
    # Triton kernel each (CUDA with Triton only; elsewhere, or false, PyTorch's/inductor's kernels)
    fused_forward: bool = True
    fused_backward: bool = True
    # capture the whole training step (forward, loss, backward, SGD step) in one CUDA graph and replay it
    # (CUDA only; not with a compile_mode that adds CUDA graphs of its own)
    step_graph: bool = False
    checkpoint_every: int = positive(default=10)  # epochs between checkpoints (and one at the end)
    test_every: int = positive(default=10)  # epochs between test evaluations (for curves)
    snapshot_attention: bool = True  # per-epoch snapshots of the attention parameters
    # which epochs get a snapshot: each of the first snapshot_every, then every snapshot_every-th, and the last
    # (records.snapshot_due). 10: 40 snapshots over 300 epochs; 1, every epoch, would give a 300-epoch learned-
    # embedding run about 100 MB of snapshots (331 kB each), over what a GPU call returns (64 MiB)
    snapshot_every: int = positive(default=10)
    atlas_images: int = non_negative(default=8)  # test images in the final attention atlas
    atlas_queries: int = non_negative(default=5)  # query pixels per image in the atlas
    out_dir: Optional[str] = None  # null: runs/<name>
    # a run directory whose final weights (last.pt, model state only) initialise the model; the optimizer and
    # the schedule start afresh (epfml/attention-cnn --load_checkpoint_file). Relative paths: as resolve_path
    init_from: Optional[str] = field(default=None, metadata=check(lambda v: v.strip() != "",
                                                                   "must be a run directory path or null"))
    # remove the degenerate Gaussian heads (Sigma^-1 with condition number > 1000 or largest eigenvalue < 1e-5)
    # of the initial model, after init_from is loaded (epfml/attention-cnn --prune_degenerated_heads; satconv.prune)
    prune_degenerate_heads: bool = False


#: ``train.compile_mode`` values in which ``torch.compile`` captures CUDA graphs itself
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: ``name``, ``description``, ``model``, ``train``, ``data``."""

    name: str = "experiment"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


# ---------------------------------------------------------------------------------------------
# Validation of plain YAML data into the dataclasses (satconv.config_types), with cross-field checks.
# ---------------------------------------------------------------------------------------------
def _validate(obj, data: dict, source: str, prefix: str) -> None:
    """Cross-field checks that a single field's type cannot express."""
    p = (prefix + ".") if prefix else ""
    if isinstance(obj, AttentionConfig):
        wanted = OPTION_SECTION[obj.kind]
        for section in ("quadratic", "learned_relative", "local", "fcvit"):
            # a section left at its defaults is harmless (to_dict writes every section back)
            default = type(getattr(obj, section))()
            if section in data and section != wanted and getattr(obj, section) != default:
                raise ConfigError(source, p + section, data[section],
                                  f"this section applies only when kind is one of "
                                  f"{[k for k, s in OPTION_SECTION.items() if s == section]} (kind is {obj.kind!r})")
    if isinstance(obj, ModelConfig):
        if obj.stage_depths is not None and obj.stage_widths is not None \
                and len(obj.stage_depths) != len(obj.stage_widths):
            raise ConfigError(source, p + "stage_widths", list(obj.stage_widths),
                              f"must have as many entries as stage_depths ({len(obj.stage_depths)})")
        if obj.arch == "encoder" and obj.image_size % obj.downsample:
            raise ConfigError(source, p + "downsample", obj.downsample,
                              f"must divide image_size ({obj.image_size})")
        if obj.arch == "vit" and obj.image_size % obj.vit.patch_size:
            raise ConfigError(source, p + "vit.patch_size", obj.vit.patch_size,
                              f"must divide image_size ({obj.image_size})")
        head_dim = obj.attention.head_dim
        if head_dim is not None and obj.attention.kind in ("san_pairwise", "san_patchwise", "fcvit"):
            raise ConfigError(source, p + "attention.head_dim", head_dim,
                              f"must be null for kind {obj.attention.kind!r}")
        if obj.arch == "encoder" and obj.attention.kind == "learned_relative":
            side = obj.image_size // obj.downsample
            if side > obj.attention.learned_relative.max_position:
                raise ConfigError(source, p + "attention.learned_relative.max_position",
                                  obj.attention.learned_relative.max_position,
                                  f"must be >= the token grid side {side} (image_size / downsample)")
        if obj.arch == "vit" and obj.attention.kind not in ("content", "learned_relative", "quadratic"):
            raise ConfigError(source, p + "attention.kind", obj.attention.kind,
                              "ViT allows content, learned_relative or quadratic")
        if obj.arch == "vit" and obj.vit.pool == "cls" and obj.attention.kind != "content":
            raise ConfigError(source, p + "attention.kind", obj.attention.kind,
                              "with vit.pool 'cls' the tokens are not a grid: only content attention is allowed "
                              "(use vit.pool: mean for positional attention)")
        if obj.arch == "san" and obj.attention.kind not in ("san_pairwise", "san_patchwise"):
            raise ConfigError(source, p + "attention.kind", obj.attention.kind,
                              "the SAN network allows san_pairwise or san_patchwise")
        if obj.arch == "sasa" and obj.attention.kind != "sasa":
            raise ConfigError(source, p + "attention.kind", obj.attention.kind, "the SASA network allows sasa")
        if obj.arch == "fcvit" and obj.attention.kind != "fcvit":
            raise ConfigError(source, p + "attention.kind", obj.attention.kind, "the FCViT network allows fcvit")
    if isinstance(obj, TrainConfig):
        if obj.step_graph and obj.compile and obj.compile_mode in CUDA_GRAPH_COMPILE_MODES:
            raise ConfigError(source, p + "step_graph", obj.step_graph,
                              f"cannot be combined with compile_mode {obj.compile_mode!r}, which adds CUDA graphs of "
                              f"its own; use compile_mode default or max-autotune-no-cudagraphs")
        if any(b <= a for a, b in zip(obj.milestones, obj.milestones[1:])) or any(m <= 0 for m in obj.milestones):
            raise ConfigError(source, p + "milestones", list(obj.milestones),
                              "must be positive and strictly increasing")
    if isinstance(obj, ExperimentConfig) and obj.train.prune_degenerate_heads \
            and obj.model.attention.kind != "quadratic":
        raise ConfigError(source, p + "train.prune_degenerate_heads", True,
                          f"needs quadratic attention (model.attention.kind is {obj.model.attention.kind!r}): "
                          f"only Gaussian heads can be degenerate")
    if isinstance(obj, DataConfig) and any(v <= 0 for v in obj.std):
        raise ConfigError(source, p + "std", list(obj.std), "must be > 0 in every channel (images are divided by it)")
    if isinstance(obj, DataConfig) and obj.source == "imagefolder" and obj.root is None:
        pass  # SATCONV_DATA_ROOT may still provide it (satconv.experiment); satconv.data raises if neither does


def from_dict(data: dict, source: str = "<dict>") -> ExperimentConfig:
    """Validate a plain mapping (as read from YAML) into an :class:`ExperimentConfig`."""
    return build(ExperimentConfig, data, source, "", _validate)


def to_dict(cfg) -> dict:
    """The config as plain data (tuples become lists), ready for YAML or JSON."""
    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested plain config (as :func:`to_dict` returns it) as ``{"train.lr": 0.1, ...}``: dotted keys,
    the nested dicts' leaves as values."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def key_diff(old: dict, new: dict, free=(), prefix: str = "") -> list[str]:
    """``"<prefix><key>: old -> new"`` for every dotted key outside ``free`` in which the nested plain dicts
    ``old`` and ``new`` (sections of :func:`to_dict`) differ, sorted by key; a key one side lacks is ``None``
    there."""
    old, new = flatten(old), flatten(new)
    return [f"{prefix}{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in free and old.get(k) != new.get(k)]


def resolve_path(path: str | Path) -> Path:
    """Resolve a path given relative to the current directory or, failing that, the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = (), profile: str | None = None) -> ExperimentConfig:
    """Read and validate a YAML config.

    Args:
        path: the YAML file, relative to the current directory or the repository root.
        overrides: ``"a.b=value"`` strings applied after the file (values parsed as YAML).
        profile: a named overlay from :data:`PROFILES` applied last (``"quick"``).

    Returns:
        The validated :class:`ExperimentConfig`; ``name`` defaults to the file's stem.

    Raises:
        ConfigError: with the file, key path, bad value and what is allowed.
        FileNotFoundError: the file does not exist.
    """
    p = resolve_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {path} (also looked in {REPO_ROOT})")
    source = str(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(source, "<file>", None, f"cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "<file>", raw[exc.start:exc.end],
                          f"not UTF-8 text (undecodable byte at offset {exc.start}); a config is a YAML text "
                          f"file") from None
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer past Python's digit limit
        raise ConfigError(source, "<yaml>", None, f"not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, "<top level>", data, "expected a mapping with keys name, description, model, "
                                                      "train, data")
    data.setdefault("name", p.stem)
    cfg = from_dict(data, source)
    if profile is not None:  # the profile first, so that --set can still change what it shrinks
        cfg = apply_profile(cfg, profile, source)
    if overrides:
        cfg = from_dict(_apply_overrides(to_dict(cfg), overrides), f"{source} (--set)")
    return cfg


def _apply_overrides(data: dict, overrides) -> dict:
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", item, item, "expected KEY=VALUE with a dotted key, e.g. train.epochs=2")
        key, raw = item.split("=", 1)
        try:  # an argument that is not UTF-8 reaches Python as lone surrogates (os.fsdecode)
            item.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError("--set", key, raw, "not UTF-8 text; keys and values must be text") from None
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(raw)
        except (yaml.YAMLError, ValueError):
            value = raw
        node = data
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError("--set", key, raw, f"{part} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def _deepcopy(d):
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def override(cfg: ExperimentConfig, overrides, source: str = "--set") -> ExperimentConfig:
    """Apply ``"a.b=value"`` overrides to an already validated config and re-validate."""
    return from_dict(_apply_overrides(to_dict(cfg), overrides), source)


# ---------------------------------------------------------------------------------------------
# Profiles: overlays that shrink any config.
# ---------------------------------------------------------------------------------------------
def _quick(cfg: ExperimentConfig) -> dict:
    """Tiny width and depth, a few hundred images, one epoch: every config runs on 2 CPU cores in < 1 min."""
    m = cfg.model
    att = {"num_heads": min(m.attention.num_heads, 4)}
    if m.attention.head_dim is not None:
        att["head_dim"] = 8
    model = {"hidden_dim": 32, "num_layers": 2, "ffn_dim": 64, "attention": att}
    if m.arch in ("resnet18", "san", "sasa", "fcvit"):
        depths = m.stage_depths or (1, 1)
        model["stage_depths"] = [1] * min(len(depths), 2)
        model["stage_widths"] = [16, 32][:len(model["stage_depths"])]
    data = {"train_subset": 512, "test_subset": 256, "val_size": 128}
    train = {"epochs": 1, "batch_size": 64, "eval_batch_size": 128, "checkpoint_every": 1, "test_every": 1,
             "atlas_images": 2, "atlas_queries": 2, "compile": False}
    return {"model": model, "data": data, "train": train}


PROFILES = {"quick": _quick}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def apply_profile(cfg: ExperimentConfig, profile: str, source: str = "--profile") -> ExperimentConfig:
    """Overlay a named profile (see :data:`PROFILES`) on a validated config."""
    if profile not in PROFILES:
        raise ConfigError(source, "profile", profile, f"allowed: {', '.join(PROFILES)}")
    return from_dict(_merge(to_dict(cfg), PROFILES[profile](cfg)), f"{source} (profile {profile})")


def config_keys(cls=ExperimentConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """Every dotted key with its type description and default, for documentation."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if is_dataclass(tp):
            rows += config_keys(tp, key + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, type_name(tp), default))
    return rows


__all__ = ["ConfigError", "ExperimentConfig", "ModelConfig", "TrainConfig", "DataConfig", "AugmentConfig",
           "AttentionConfig", "QuadraticOptions", "LearnedRelativeOptions", "LocalOptions", "FCViTOptions",
           "ViTOptions", "load", "from_dict", "to_dict", "flatten", "override", "apply_profile", "PROFILES", "config_keys",
           "resolve_path", "REPO_ROOT", "replace"]
