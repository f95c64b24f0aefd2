"""Data: CIFAR-10, image folders and a synthetic set, decoded once into uint8 tensors and split.

Sources (``data.source`` of :class:`satconv.config.DataConfig`):

* ``cifar10``: torchvision's CIFAR-10 under ``data.root`` (downloaded there once).
* ``imagefolder``: ``root/train/<class>/*`` and ``root/test/<class>/*`` (JPEG or PNG); reads the
  project's offline JPEG copy (``../shared/data/cifar10-jpeg``, once unpacked).
* ``synthetic``: seeded, class-dependent images generated in memory (tests and benchmarks).

Decoded images are cached as one ``.pt`` file of uint8 tensors whose name carries a hash of the
source's file list, sizes and modification times, so a changed source gets a new cache entry.
The validation split is held out of the training set (stratified, seeded by ``data.split_seed``);
the test set is never touched by it.  Batching and augmentation on the training device are
:mod:`satconv.augmentation`'s job.
"""
from __future__ import annotations

import colorsys
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig, ExperimentConfig, resolve_path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CACHE_VERSION = "satconv-cache-1"
DEFAULT_ROOT = "~/.cache/satconv"


class DataError(RuntimeError):
    """The data cannot be found or read; the message names the path and the ways out."""


@dataclass
class Split:
    """One split of a data set.

    Args:
        images: ``(N, 3, H, W)`` uint8.
        labels: ``(N,)`` int64 class indices.
        index: ``(N,)`` int64 positions in the source's pool (train pool for train/val, test pool for test).
    """

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device), self.index.to(device))


@dataclass
class DataBundle:
    """Train, validation and test splits plus where they came from.

    ``description`` is the label results must carry (e.g. "CIFAR-10 (JPEG q75 copy)").
    """

    train: Split
    val: Split
    test: Split
    classes: list
    source: str
    description: str
    is_jpeg_copy: bool = False
    root: str | None = None
    cache_file: str | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[-2:])

    def to(self, device) -> "DataBundle":
        return replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))

    def info(self) -> dict:
        """Plain provenance for ``run.json``."""
        return {"source": self.source, "description": self.description, "is_jpeg_copy": self.is_jpeg_copy,
                "root": self.root, "cache_file": self.cache_file, "classes": list(self.classes),
                "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
                "image_size": list(self.image_size)}


# ---------------------------------------------------------------------------------------------
# Locations and the cache
# ---------------------------------------------------------------------------------------------
def resolve_root(data: DataConfig) -> Path:
    """The data directory: ``data.root``, else ``~/.cache/satconv``.

    ``$SATCONV_DATA_ROOT`` is applied to ``data.root`` by :func:`satconv.experiment.resolve_config`
    (command line over environment over file), not here: a config's ``data.root`` is what it loads.
    """
    root = data.root or DEFAULT_ROOT
    return resolve_path(root).expanduser().resolve()


def cache_dir_for(data: DataConfig, root: Path) -> Path:
    """Where decoded tensors are cached: ``data.cache_dir``, else ``<root>/.satconv-cache``."""
    return resolve_path(data.cache_dir).expanduser() if data.cache_dir else root / ".satconv-cache"


def _fingerprint(source: str, entries) -> str:
    """sha256 over the source kind and every file's relative path, size and mtime (ns).

    Args:
        entries: ``(relative path, size, mtime_ns)`` tuples.
    """
    h = hashlib.sha256(f"{CACHE_VERSION}\n{source}\n".encode())
    h.update("".join(f"{p}\t{size}\t{mtime}\n" for p, size, mtime in entries).encode())
    return h.hexdigest()


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _cached(cache_dir: Path, source: str, root: Path, key: str, decode):
    """Load ``decode()``'s dict of tensors from the cache, or decode and store it atomically.

    The file is ``<source>-<hash(root)>-<key>.pt``; older entries of the same source and root are
    removed when a new one is written.  An unwritable cache directory only costs the caching.
    """
    stem = f"{source}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"
    path = cache_dir / f"{stem}-{key[:20]}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True), path
        except Exception:  # a damaged cache file is rebuilt, never trusted
            pass
    blob = decode()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for old in cache_dir.glob(f"{stem}-*.pt"):
            old.unlink(missing_ok=True)
        _atomic_torch_save(blob, path)
    except OSError:
        return blob, None
    return blob, path


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
def _list_images(folder: Path) -> dict[str, list[tuple[str, int, int]]]:
    """``{class: [(file name, size, mtime_ns), ...] sorted}`` of ``folder/<class>/*.jpg|jpeg|png``.

    Raises DataError naming the folder when it, its class folders or their images are missing.
    """
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist; expected the layout "
                        f"<root>/train/<class>/*.jpg|png and <root>/test/<class>/*.jpg|png")
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {folder} has no class sub-folders; expected {folder}/<class>/*.jpg|png")
    out = {}
    for c in classes:
        files = []
        for e in os.scandir(folder / c):
            if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and not e.name.startswith("."):
                st = e.stat()
                files.append((e.name, st.st_size, st.st_mtime_ns))
        if not files:
            raise DataError(f"class folder {folder / c} holds no images (.jpg, .jpeg or .png)")
        out[c] = sorted(files)
    return out


def _decode(path: Path) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from None


def _decode_all(files: list[Path]) -> torch.Tensor:
    """Decode images (threads) into ``(N, 3, H, W)`` uint8; every image must have the first one's size."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(_decode, files, chunksize=256))
    shape = arrays[0].shape
    for f, a in zip(files, arrays):
        if a.shape != shape:
            raise DataError(f"image {f} is {a.shape[1]}x{a.shape[0]} but {files[0]} is {shape[1]}x{shape[0]}; "
                            f"all images must have the same size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)


def load_image_folder(root: Path, cache_dir: Path) -> dict:
    """Decode ``root/{train,test}/<class>/*`` (cached).

    Returns:
        ``{"train_images": (N, 3, H, W) uint8, "train_labels": (N,), "test_images", "test_labels",
        "classes": [names], "jpeg": bool}``; labels follow the alphabetical class order.
    """
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist (source imagefolder); set data.root or SATCONV_DATA_ROOT "
                        f"to a directory laid out as <root>/train/<class>/* and <root>/test/<class>/*")
    train, test = _list_images(root / "train"), _list_images(root / "test")
    if set(test) - set(train):
        raise DataError(f"{root / 'test'} has classes missing from {root / 'train'}: {sorted(set(test) - set(train))}")
    classes = list(train)
    # (split, relative path, size, mtime, label) for every file, in label order
    files = [(s, f"{s}/{c}/{name}", size, mtime, i) for s, tree in (("train", train), ("test", test))
             for i, c in enumerate(classes) for name, size, mtime in tree.get(c, [])]

    def decode():
        blob = {"classes": classes, "jpeg": all(f[1].lower().endswith((".jpg", ".jpeg")) for f in files)}
        for s in ("train", "test"):
            part = [(root / rel, i) for s2, rel, _, _, i in files if s2 == s]
            blob[f"{s}_images"] = _decode_all([f for f, _ in part])
            blob[f"{s}_labels"] = torch.tensor([i for _, i in part], dtype=torch.int64)
        return blob

    key = _fingerprint("imagefolder", [f[1:4] for f in files])
    blob, path = _cached(cache_dir, "imagefolder", root, key, decode)
    blob["cache_file"] = str(path) if path else None
    return blob


def _download_cifar10(root: Path) -> None:
    """Download CIFAR-10 into ``root`` with torchvision (tests replace this to simulate no network)."""
    import socket

    import torchvision
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    finally:
        socket.setdefaulttimeout(old)


def load_cifar10(root: Path, cache_dir: Path) -> dict:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (downloaded on first use, cached decoded).

    Returns:
        The same dict as :func:`load_image_folder`.
    """
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    if not all((folder / n).is_file() for n in names):
        try:
            root.mkdir(parents=True, exist_ok=True)
            _download_cifar10(root)
        except Exception as exc:
            raise DataError(
                f"CIFAR-10 is not in {folder} and could not be downloaded ({type(exc).__name__}: {exc}).\n"
                f"Two ways out:\n"
                f"  1. use a directory of images: --set data.source=imagefolder --set data.root=DIR "
                f"(or SATCONV_DATA_ROOT=DIR), laid out as DIR/train/<class>/*.png|jpg and DIR/test/<class>/*; "
                f"this project's offline JPEG copy unpacks with `python ../shared/data/cifar10-jpeg/unpack.py DIR`;\n"
                f"  2. download CIFAR-10 on a machine with internet "
                f"(torchvision.datasets.CIFAR10(ROOT, download=True)) "
                f"and copy its cifar-10-batches-py folder to {folder}.") from None

    def decode():
        import torchvision
        blob = {"classes": list(CIFAR10_CLASSES), "jpeg": False}
        for s, is_train in (("train", True), ("test", False)):
            try:
                ds = torchvision.datasets.CIFAR10(str(root), train=is_train, download=False)
            except Exception as exc:
                raise DataError(f"cannot read CIFAR-10 from {folder}: {exc}") from None
            blob[f"{s}_images"] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
            blob[f"{s}_labels"] = torch.tensor(ds.targets, dtype=torch.int64)
        return blob

    key = _fingerprint("cifar10", [(n, (folder / n).stat().st_size, (folder / n).stat().st_mtime_ns) for n in names])
    blob, path = _cached(cache_dir, "cifar10", root, key, decode)
    blob["cache_file"] = str(path) if path else None
    return blob


def synthetic_images(n: int, num_classes: int, image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded class-dependent images: a shape in the class colour on a noisy background.

    Class ``c`` draws a filled square (even ``c``) or disc (odd ``c``) of hue ``c / num_classes``
    at a random place and size, plus Gaussian noise; colour alone makes the task learnable.

    Returns:
        ``images: (n, 3, S, S)`` uint8, ``labels: (n,)`` int64 (balanced, shuffled).
    """
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    palette = torch.tensor([colorsys.hsv_to_rgb(c / num_classes, 0.85, 0.9) for c in range(num_classes)]) * 255
    s = image_size
    side = torch.randint(max(2, s // 2), max(3, 3 * s // 4 + 1), (n, 1, 1), generator=g).float()
    top = (torch.rand(n, 1, 1, generator=g) * (s - side)).floor()
    left = (torch.rand(n, 1, 1, generator=g) * (s - side)).floor()
    rows = torch.arange(s).view(1, s, 1).float()
    cols = torch.arange(s).view(1, 1, s).float()
    square = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)  # (n, S, S)
    r = side / 2
    disc = (rows + 0.5 - top - r) ** 2 + (cols + 0.5 - left - r) ** 2 <= r ** 2
    mask = torch.where((labels % 2 == 0).view(n, 1, 1), square, disc)[:, None]  # (n, 1, S, S)
    background = 60 + 40 * torch.rand(n, 3, 1, 1, generator=g)
    images = torch.where(mask, palette[labels].view(n, 3, 1, 1), background)
    images = images + 20 * torch.randn(n, 3, s, s, generator=g)
    return images.round().clamp(0, 255).to(torch.uint8), labels


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------
def stratified_split(labels: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``size`` indices with class proportions kept (largest-remainder quotas), seeded.

    Args:
        labels: ``(N,)`` int64.
        size: number of indices to pick, ``0 <= size <= N``.
        seed: the generator seed.

    Returns:
        ``(rest, picked)``: sorted int64 index tensors that partition ``range(N)``.
    """
    n = len(labels)
    if not 0 <= size <= n:
        raise ValueError(f"size must be in [0, {n}], got {size}")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * size / n
    quota = exact.floor().long()
    order = torch.argsort(-(exact - quota), stable=True)
    quota[order[: size - int(quota.sum())]] += 1
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c, q in zip(classes.tolist(), quota.tolist()):
        idx = torch.nonzero(labels == c).flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:q]])
    picked = torch.sort(torch.cat(picked)).values
    keep = torch.ones(n, dtype=torch.bool)
    keep[picked] = False
    return torch.nonzero(keep).flatten(), picked


def _subset(size: int | None, images, labels, index, seed: int):
    """A stratified seeded subset of ``size`` images (all of them when ``size`` is None or too large)."""
    if size is None or size >= len(labels):
        return images, labels, index
    _, pick = stratified_split(labels, size, seed)
    return images[pick], labels[pick], index[pick]


def load_data(cfg: ExperimentConfig) -> DataBundle:
    """Load (or generate) the data a config names and split it; tensors stay on the CPU.

    Order: the validation set (``data.val_size``, stratified, seed ``data.split_seed``) is held out of
    the training pool, then ``data.train_subset`` is drawn from what is left and ``data.test_subset``
    from the test pool.  Synthetic images have the model's ``image_size``.

    Raises:
        DataError: missing, empty or unreadable data (the message names the path).
        ValueError: ``data.val_size`` leaves no training images.
    """
    d = cfg.data
    root = cache = None
    if d.source == "synthetic":
        tr_x, tr_y = synthetic_images(d.synthetic_train, cfg.model.num_classes, cfg.model.image_size, d.split_seed)
        te_x, te_y = synthetic_images(d.synthetic_test, cfg.model.num_classes, cfg.model.image_size,
                                      d.split_seed + 1)
        classes = [f"class{c}" for c in range(cfg.model.num_classes)]
        description, jpeg_copy = "synthetic shapes (generated)", False
    else:
        root = resolve_root(d)
        loader = load_cifar10 if d.source == "cifar10" else load_image_folder
        blob = loader(root, cache_dir_for(d, root))
        tr_x, tr_y, te_x, te_y = blob["train_images"], blob["train_labels"], blob["test_images"], blob["test_labels"]
        classes, cache = list(blob["classes"]), blob["cache_file"]
        jpeg_copy = d.source == "imagefolder" and blob["jpeg"] and tuple(classes) == CIFAR10_CLASSES
        description = {"cifar10": "CIFAR-10"}.get(d.source, f"image folder {root.name}")
        if jpeg_copy:
            description = "CIFAR-10 (JPEG q75 copy)"
    if d.val_size >= len(tr_y):
        raise ValueError(f"data.val_size={d.val_size} must be smaller than the training pool ({len(tr_y)} images)")
    train_idx, val_idx = stratified_split(tr_y, d.val_size, d.split_seed)
    val = Split(tr_x[val_idx], tr_y[val_idx], val_idx)
    train = Split(*_subset(d.train_subset, tr_x[train_idx], tr_y[train_idx], train_idx, d.split_seed + 1))
    test = Split(*_subset(d.test_subset, te_x, te_y, torch.arange(len(te_y)), d.split_seed + 2))
    return DataBundle(train, val, test, classes, d.source, description, jpeg_copy,
                      None if root is None else str(root), cache)


__all__ = ["DataError", "Split", "DataBundle", "load_data", "resolve_root", "cache_dir_for", "load_image_folder",
           "load_cifar10", "synthetic_images", "stratified_split", "CIFAR10_CLASSES"]
