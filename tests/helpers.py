"""Small generated data and a tiny stand-in network for the data, training and CLI tests.

Nothing here comes from CIFAR: image folders are drawn with PIL from seeded noise and shapes.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from satconv.config import ExperimentConfig, ModelConfig, override

CLASSES = ("ant", "bee", "cow")


def make_image_folder(root: Path, classes=CLASSES, train_per_class: int = 6, test_per_class: int = 3,
                      size: int = 8, fmt: str = "png", seed: int = 0) -> dict:
    """Write ``root/{train,test}/<class>/<i>.<ext>`` of distinct seeded images.

    Args:
        fmt: ``"png"``, ``"jpg"`` or ``"mixed"`` (alternating).

    Returns:
        ``{relative path: (H, W, 3) uint8 array}`` of what was written (exact for PNG).
    """
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                img[: size // 2, : size // 2] = 40 * ci  # a class-dependent corner
                ext = fmt if fmt != "mixed" else ("png", "jpg")[i % 2]
                rel = f"{split}/{c}/{i:03d}.{ext}"
                Image.fromarray(img).save(root / rel)
                written[rel] = img
    return written


class ToyGaussianAttention(nn.Module):
    """Isotropic Gaussian positional attention over a ``side x side`` grid (written for the tests):
    ``logits[h, q, k] = -(s_h^2 / 2) * ||(k - q) - mu_h||^2``, heads averaged."""

    input_independent = True

    def __init__(self, num_heads: int, side: int):
        super().__init__()
        self.attention_centers = nn.Parameter(torch.randn(num_heads, 2))
        self.attention_spreads = nn.Parameter(torch.ones(num_heads))
        coords = torch.tensor([(r, c) for r in range(side) for c in range(side)], dtype=torch.float32)
        self.register_buffer("delta", coords[None, :, :] - coords[:, None, :], persistent=False)  # (N, N, 2)

    def probs(self) -> torch.Tensor:
        """``(1, heads, N, N)``."""
        diff = self.delta[None] - self.attention_centers[:, None, None, :]  # (heads, N, N, 2)
        logits = -(self.attention_spreads[:, None, None] ** 2 / 2) * diff.pow(2).sum(-1)
        return torch.softmax(logits, -1)[None]

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """``x: (B, N, C)`` -> ``(B, N, C)``."""
        p = self.probs()
        out = torch.einsum("hqk,bkc->bqc", p[0], x) / p.shape[1]
        return (out, p) if return_attention else out


class TinyNet(nn.Module):
    """conv 3->8 + BN + ReLU, 2x2 average pool, one toy attention layer, dropout, linear head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.attn = ToyGaussianAttention(2, cfg.image_size // 2)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(8, cfg.num_classes)

    def attention_layers(self):
        return [self.attn]

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        h = nn.functional.avg_pool2d(torch.relu(self.bn(self.conv(x))), 2)  # (B, 8, S/2, S/2)
        tokens = h.flatten(2).transpose(1, 2)  # (B, N, 8)
        a, p = self.attn(tokens, return_attention=True)
        logits = self.head(self.drop(tokens + a).mean(1))
        return (logits, [p]) if return_attention else logits


def tiny_config(*overrides: str) -> ExperimentConfig:
    """Synthetic 8x8 data, 128 training images (8 steps of 16 per epoch), 3 epochs, the tiny run."""
    base = ["name=tiny", "data.source=synthetic", "data.synthetic_train=160", "data.synthetic_test=40",
            "data.val_size=32", "model.image_size=8", "train.epochs=3", "train.batch_size=16",
            "train.eval_batch_size=64", "train.checkpoint_every=1", "train.test_every=2", "train.atlas_images=3",
            "train.atlas_queries=2", "train.lr=0.2", "train.warmup_ratio=0.1"]
    return override(ExperimentConfig(), base + list(overrides))


def epochs_written(out: Path) -> list[int]:
    """The epochs of the complete lines of ``out/metrics.jsonl``."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line)["epoch"])
        except ValueError:  # a line being written
            pass
    return rows


def wait_for_epoch(proc: subprocess.Popen, out: Path, epoch: int, timeout: float | None = None) -> bool:
    """Poll until ``out/metrics.jsonl`` shows ``epoch``, the process ends or ``timeout`` seconds pass (``None``:
    no limit); True when the epoch appeared first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while proc.poll() is None and (deadline is None or time.monotonic() < deadline):
        if epoch in epochs_written(out):
            return True
        time.sleep(0.005)
    return False
