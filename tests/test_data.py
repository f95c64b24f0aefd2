"""satconv.data: image folders and their cache, data errors, splits; satconv.augmentation: on-device
augmentation and batches."""
import colorsys
import hashlib
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from satconv import augmentation as A
from satconv import data as D
from satconv.config import AugmentConfig
from tests.helpers import CLASSES, make_image_folder, tiny_config

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
#: float32 normalisation vs the float64 numpy reference: a few ulps of values of order 3
NORM_TOL = 1e-5
#: float32 HSV conversion vs colorsys (float64)
HSV_TOL = 1e-5


def folder_config(root, *extra):
    return tiny_config("data.source=imagefolder", f"data.root={root}", "data.val_size=3", *extra)


def test_image_folder_pixels_labels_and_cache(tmp_path, monkeypatch):
    written = make_image_folder(tmp_path / "imgs", fmt="png")
    cache = tmp_path / "cache"
    blob = D.load_image_folder(tmp_path / "imgs", cache)
    assert blob["classes"] == sorted(CLASSES) and not blob["jpeg"]
    assert blob["train_images"].dtype == torch.uint8 and blob["train_images"].shape == (18, 3, 8, 8)
    # independent reference: the arrays written, in (class alphabetical, file name) order
    rels = sorted((r for r in written if r.startswith("train/")), key=lambda r: (r.split("/")[1], r))
    expect = torch.from_numpy(np.stack([written[r] for r in rels])).permute(0, 3, 1, 2)
    assert torch.equal(blob["train_images"], expect)
    assert blob["train_labels"].tolist() == [sorted(CLASSES).index(r.split("/")[1]) for r in rels]
    assert blob["cache_file"] is not None and os.path.isfile(blob["cache_file"])

    # a second load reads the cache: decoding is not called again
    def no_decode(path):
        raise AssertionError(f"decoded {path} despite the cache")
    monkeypatch.setattr(D, "_decode", no_decode)
    again = D.load_image_folder(tmp_path / "imgs", cache)
    assert torch.equal(again["train_images"], blob["train_images"]) and again["cache_file"] == blob["cache_file"]

    # a changed image invalidates the cache; the stale entry is removed
    monkeypatch.undo()
    new = np.full((8, 8, 3), 7, np.uint8)
    from PIL import Image
    Image.fromarray(new).save(tmp_path / "imgs" / rels[0])
    changed = D.load_image_folder(tmp_path / "imgs", cache)
    assert changed["cache_file"] != blob["cache_file"] and not os.path.exists(blob["cache_file"])
    assert torch.equal(changed["train_images"][0], torch.from_numpy(new).permute(2, 0, 1))


def test_mixed_jpeg_png_and_env_root(tmp_path, monkeypatch):
    from satconv.experiment import resolve_config
    make_image_folder(tmp_path / "mixed", fmt="mixed")
    monkeypatch.setenv("SATCONV_DATA_ROOT", str(tmp_path / "mixed"))
    written = tiny_config("data.source=imagefolder", "data.root=/nonexistent", "data.val_size=3")
    assert D.resolve_root(written.data) == Path("/nonexistent")  # satconv.data reads the config only
    cfg = resolve_config(written)  # the environment replaces the file's root
    assert D.resolve_root(cfg.data) == (tmp_path / "mixed").resolve()
    bundle = D.load_data(cfg)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (15, 3, 9)
    assert bundle.description == "image folder mixed" and not bundle.is_jpeg_copy


def test_empty_folder_errors(tmp_path):
    (tmp_path / "a" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "a" / "test" / "cat").mkdir(parents=True)
    with pytest.raises(D.DataError, match=r"train/cat holds no images"):
        D.load_data(folder_config(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    with pytest.raises(D.DataError, match=r"b/train does not exist"):
        D.load_data(folder_config(tmp_path / "b"))
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_data(folder_config(tmp_path / "missing"))


def test_corrupt_jpeg_names_the_file(tmp_path):
    make_image_folder(tmp_path / "c", fmt="jpg")
    bad = tmp_path / "c" / "test" / "bee" / "001.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(D.DataError, match=r"cannot decode image .*test/bee/001\.jpg"):
        D.load_data(folder_config(tmp_path / "c", f"data.cache_dir={tmp_path / 'cache'}"))


def test_cifar_absent_offline(tmp_path, monkeypatch):
    def offline(root):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(D, "_download_cifar10", offline)
    cfg = tiny_config("data.source=cifar10", f"data.root={tmp_path / 'nocifar'}")
    with pytest.raises(D.DataError) as info:
        D.load_data(cfg)
    msg = str(info.value)
    assert str(tmp_path / "nocifar" / "cifar-10-batches-py") in msg  # where it looked
    assert "could not be downloaded" in msg and "no network" in msg
    assert "data.source=imagefolder" in msg and "download CIFAR-10 on a machine with internet" in msg


def test_stratified_split_partitions_and_keeps_proportions():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    rest, picked = D.stratified_split(labels, 10, seed=3)
    assert sorted(rest.tolist() + picked.tolist()) == list(range(100))
    assert [int((labels[picked] == c).sum()) for c in range(3)] == [5, 3, 2]
    assert torch.equal(D.stratified_split(labels, 10, seed=3)[1], picked)
    assert not torch.equal(D.stratified_split(labels, 10, seed=4)[1], picked)
    with pytest.raises(ValueError, match="size"):
        D.stratified_split(labels, 101, seed=0)


def test_val_and_test_are_disjoint(tmp_path):
    make_image_folder(tmp_path / "f", train_per_class=10, test_per_class=4)
    bundle = D.load_data(folder_config(tmp_path / "f", "data.val_size=6"))
    assert not set(bundle.train.index.tolist()) & set(bundle.val.index.tolist())
    assert [int((bundle.val.labels == c).sum()) for c in range(3)] == [2, 2, 2]

    def digests(split):
        return {hashlib.sha256(img.numpy().tobytes()).hexdigest() for img in split.images}
    # every generated image is distinct, so equal bytes would mean the same file
    assert not digests(bundle.val) & digests(bundle.test)
    assert not digests(bundle.val) & digests(bundle.train)
    with pytest.raises(ValueError, match="data.val_size"):
        D.load_data(folder_config(tmp_path / "f", "data.val_size=30"))


def test_synthetic_subsets_and_seed():
    cfg = tiny_config("data.train_subset=40", "data.test_subset=20")
    a, b = D.load_data(cfg), D.load_data(cfg)
    assert (len(a.train), len(a.val), len(a.test)) == (40, 32, 20)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.index, b.val.index)
    assert a.train.images.shape[1:] == (3, 8, 8)
    assert sorted(torch.bincount(a.val.labels).tolist()) == [3] * 8 + [4] * 2  # 32 of 10 x 16: 3.2 per class


def test_crop_and_flip_keep_shape_dtype_and_really_move_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 6, 5), dtype=torch.uint8)
    flipped = A.random_crop_flip(x, padding=0, flip=True, g=g)
    assert flipped.shape == x.shape and flipped.dtype == torch.uint8
    xn, fn = x.numpy(), flipped.numpy()
    mirror = [np.array_equal(fn[i], xn[i][:, :, ::-1]) for i in range(64)]
    same = [np.array_equal(fn[i], xn[i]) for i in range(64)]
    assert all(m or s for m, s in zip(mirror, same))
    assert 10 < sum(m and not s for m, s in zip(mirror, same)) < 54  # about half really flipped

    p = 2
    cropped = A.random_crop_flip(x, padding=p, flip=False, g=g).numpy()
    padded = np.pad(xn, ((0, 0), (0, 0), (p, p), (p, p)))
    offsets = []
    for i in range(64):
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if np.array_equal(cropped[i], padded[i, :, dy:dy + 6, dx:dx + 5])]
        assert hits, f"image {i} is not a window of the zero-padded input"
        offsets.append(hits[0])
    assert len(set(offsets)) > 5


def test_augment_normalises_and_extras_keep_shape():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    plain = A.augment(x, AugmentConfig(crop_padding=0, flip=False), MEAN, STD, g)
    ref = (x.numpy().astype(np.float64) / 255 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    assert plain.dtype == torch.float32 and np.abs(plain.numpy() - ref).max() < NORM_TOL
    extras = A.augment(x, AugmentConfig(rotation=5.0, color_jitter=(0.4, 0.4, 0.4, 0.1)), MEAN, STD, g)
    assert extras.shape == x.shape and extras.dtype == torch.float32 and torch.isfinite(extras).all()


def test_a_share_of_a_batch_is_augmented_as_in_the_whole_batch():
    """A data-parallel rank gathers and augments only its rows of the global batch (DeviceLoader.batch's ``rows``):
    with every augmentation on ([Re] ResNet: crop, flip, rotation, colour jitter), each share equals those rows of the
    whole batch augmented at once, bit for bit, and the generator ends in the same state; a share that does not
    match its rows is refused."""
    aug = AugmentConfig(crop_padding=4, flip=True, rotation=5.0, color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_p=0.8)
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    loader = A.DeviceLoader(D.Split(images, torch.arange(20), torch.arange(20)), 12, "cpu", MEAN, STD, aug)
    idx = torch.tensor([3, 17, 0, 9, 12, 5, 8, 1, 19, 4, 11, 6])
    g = torch.Generator().manual_seed(7)
    whole_x, whole_y = loader.batch(idx, g)
    after = g.get_state()
    for rows in (slice(0, 4), slice(4, 8), slice(8, 12), slice(0, 6), slice(6, 12)):
        g = torch.Generator().manual_seed(7)
        x, y = loader.batch(idx, g, rows)
        assert torch.equal(x, whole_x[rows]) and torch.equal(y, whole_y[rows]) and torch.equal(y, idx[rows])
        assert torch.equal(g.get_state(), after)
    alone, _ = loader.batch(idx[4:8], torch.Generator().manual_seed(7))  # the share drawn as a batch of its own
    assert not torch.equal(alone, whole_x[4:8])
    with pytest.raises(ValueError, match="not the 4 contiguous rows"):
        A.augment(images[:3], aug, MEAN, STD, torch.Generator(), 12, slice(0, 4))


def test_hsv_matches_colorsys():
    rgb = torch.rand(1, 3, 4, 4, dtype=torch.float32)
    hsv = A.rgb_to_hsv(rgb)
    for r in range(4):
        for c in range(4):
            ref = colorsys.rgb_to_hsv(*rgb[0, :, r, c].double().tolist())
            assert np.allclose(hsv[0, :, r, c].double().numpy(), ref, atol=HSV_TOL)
    assert (A.hsv_to_rgb(hsv) - rgb).abs().max() < HSV_TOL


def test_device_loader_eval_order():
    split = D.Split(torch.arange(10 * 3 * 2 * 2, dtype=torch.uint8).view(10, 3, 2, 2), torch.arange(10),
                    torch.arange(10))
    loader = A.DeviceLoader(split, 4, "cpu", MEAN, STD)
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))
    # the loader's constants, made on the device once, normalise as the per-channel formula does
    x = split.images[:4].numpy().astype(np.float64)
    ref = (x / 255 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    assert np.abs(batches[0][0].numpy() - ref).max() < NORM_TOL



@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA unavailable")
def test_device_loader_never_makes_the_host_wait_for_the_gpu():
    """Per-batch indices, random draws and normalisation constants reach the GPU without a synchronising
    copy (the host would otherwise idle the GPU at every training step); crop + flip batches equal the
    CPU ones for the same generator state."""
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    split = D.Split(images, torch.arange(64) % 10, torch.arange(64))
    gpu_split = split.to("cuda")
    idx = torch.randperm(64)[:16]
    idx_gpu = idx.cuda()
    extras = AugmentConfig(rotation=5.0, color_jitter=(0.4, 0.4, 0.4, 0.1))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        xg, yg = A.DeviceLoader(gpu_split, 16, "cuda", MEAN, STD, AugmentConfig()).batch(
            idx_gpu, torch.Generator().manual_seed(3))
        A.DeviceLoader(gpu_split, 16, "cuda", MEAN, STD, extras).batch(idx_gpu, torch.Generator().manual_seed(4))
        evals = list(A.DeviceLoader(gpu_split, 16, "cuda", MEAN, STD))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    xc, yc = A.DeviceLoader(split, 16, "cpu", MEAN, STD, AugmentConfig()).batch(idx, torch.Generator().manual_seed(3))
    assert torch.equal(yg.cpu(), yc) and (xg.cpu() - xc).abs().max() < 1e-5
    assert len(evals) == 4 and torch.equal(torch.cat([y for _, y in evals]).cpu(), split.labels)
