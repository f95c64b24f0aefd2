"""Config loading and validation: every shipped config loads; bad ones name file, key path and value."""


import pytest

from satconv import config as C

CONFIGS = sorted((C.REPO_ROOT / "configs").glob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 20


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads(path):
    cfg = C.load(path)
    assert cfg.name == path.stem
    quick = C.load(path, profile="quick")
    assert quick.model.arch == cfg.model.arch and quick.model.attention.kind == cfg.model.attention.kind
    assert quick.train.epochs <= 2 and quick.data.train_subset <= 1000


def test_paper_recipe_defaults():
    """B4/B6: the defaults are the paper's recipe field by field (paper.md §1.2)."""
    cfg = C.load(C.REPO_ROOT / "configs" / "paper_quadratic.yaml")
    m, t, d = cfg.model, cfg.train, cfg.data
    assert (m.num_layers, m.attention.num_heads, m.hidden_dim, m.ffn_dim) == (6, 9, 400, 512)
    assert (m.activation, m.dropout, m.attention.dropout, m.layer_norm_eps, m.downsample) == ("gelu", 0.1, 0.1,
                                                                                             1e-12, 2)
    assert m.attention.head_dim is None  # heads concatenated with D_h = D
    assert (t.epochs, t.batch_size, t.lr, t.momentum, t.nesterov, t.weight_decay) == (300, 100, 0.1, 0.9, False,
                                                                                      1e-4)
    assert (t.schedule, t.warmup_ratio, t.seed) == ("cosine", 0.05, 42)
    assert (d.augment.crop_padding, d.augment.flip) == (4, True)
    assert d.mean == (0.4914, 0.4822, 0.4465) and d.std == (0.2023, 0.1994, 0.2010)
    resnet = C.load(C.REPO_ROOT / "configs" / "paper_resnet18.yaml").train
    assert resnet.schedule == "multistep" and resnet.milestones == (80, 150, 250)


BAD = [
    ("train:\n  lrr: 0.1\n", "train.lrr", "unknown key"),
    ("train:\n  lr: -1\n", "train.lr", "must be > 0"),
    ("train:\n  epochs: ten\n", "train.epochs", "expected an integer"),
    ("train:\n  epochs: 2.5\n", "train.epochs", "expected an integer"),
    ("train:\n  nesterov: 1\n", "train.nesterov", "true or false"),
    ("model:\n  attention:\n    kind: gaussian\n", "model.attention.kind", "allowed"),
    ("model:\n  attention:\n    num_heads: 0\n", "model.attention.num_heads", "must be > 0"),
    ("model:\n  attention:\n    kind: quadratic\n    learned_relative: {variant: query_position}\n",
     "model.attention.learned_relative", "applies only when kind"),
    ("model:\n  attention:\n    kind: sasa\n    local: {kernel_size: 4}\n", "model.attention.local.kernel_size",
     "odd"),
    ("model:\n  max_position_embedding: 16\n", "model.max_position_embedding", "unknown key"),  # B14
    ("model:\n  arch: san\n  attention: {kind: quadratic}\n", "model.attention.kind", "SAN"),
    ("model:\n  stage_depths: [2, 2]\n  stage_widths: [8]\n", "model.stage_widths", "as many entries"),
    ("train:\n  milestones: [150, 80]\n", "train.milestones", "increasing"),
    ("data:\n  source: imagenet\n", "data.source", "allowed"),
    ("data:\n  augment:\n    color_jitter: [0.4, 0.4]\n", "data.augment.color_jitter", "list of 4"),
    ("train:\n  dropout: 0.1\n", "train.dropout", "unknown key"),
    ("model:\n  attention:\n    dropout: 1.5\n", "model.attention.dropout", "[0, 1)"),
    ("model:\n  arch: vit\n  attention: {kind: quadratic}\n", "model.attention.kind", "content"),
    ("- a\n- b\n", "<top level>", "mapping"),
]


@pytest.mark.parametrize("text,key,phrase", BAD, ids=[b[1] for b in BAD])
def test_bad_configs_name_the_key(tmp_path, text, key, phrase):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(C.ConfigError) as info:
        C.load(path)
    msg = str(info.value)
    assert str(path) in msg and key in msg and phrase in msg, msg
    assert info.value.key == key


def test_overrides_are_validated():
    cfg = C.load(C.REPO_ROOT / "configs" / "paper_learned.yaml", overrides=["train.epochs=2", "model.dropout=0.0"])
    assert cfg.train.epochs == 2 and cfg.model.dropout == 0.0
    with pytest.raises(C.ConfigError, match="train.epoch"):
        C.load(C.REPO_ROOT / "configs" / "paper_learned.yaml", overrides=["train.epoch=2"])
    with pytest.raises(C.ConfigError, match="KEY=VALUE"):
        C.load(C.REPO_ROOT / "configs" / "paper_learned.yaml", overrides=["train.epochs"])


def test_unknown_profile_and_missing_file(tmp_path):
    with pytest.raises(C.ConfigError, match="allowed: quick"):
        C.load(C.REPO_ROOT / "configs" / "paper_learned.yaml", profile="huge")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        C.load(tmp_path / "nope.yaml")


def test_round_trip_through_dict():
    cfg = C.load(C.REPO_ROOT / "configs" / "re_resnet18.yaml")
    assert C.from_dict(C.to_dict(cfg)) == cfg


def test_schema_documents_every_key():
    keys = {k for k, _, _ in C.config_keys()}
    assert {"model.attention.quadratic.isotropic", "train.lr", "data.augment.flip"} <= keys
