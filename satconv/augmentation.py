"""On-device batching and augmentation: uint8 images in, normalised float batches out.

:class:`DeviceLoader` keeps a :class:`satconv.data.Split`'s uint8 images on the training device and
gathers batches there.  Training batches get the paper's augmentation (random crop after 4-pixel zero
padding, horizontal flip), the [Re]'s ResNet extras (rotation, colour jitter) and normalisation, all
batched on the device.  Every random number comes from a CPU generator, so CPU and GPU draw the same
augmentations and a run can be resumed exactly; those numbers reach the device without a host wait
(:func:`host_to_device`).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .config import AugmentConfig

if TYPE_CHECKING:
    from .data import Split


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` moved to ``device`` without making the host wait for the device.

    Copying pageable CPU memory to a GPU is synchronous: ``.to("cuda")`` returns only once the
    device's queue has drained, so a few random numbers moved that way per batch stall the pipeline
    at every training step (the GPU idles while the host prepares the next step).  Pinned memory
    copied with ``non_blocking=True`` is enqueued instead; PyTorch's caching host allocator keeps the
    pinned block until the copy has run, so ``t`` may be freed or reused at once.

    Args:
        t: any tensor (CPU tensors are pinned for a CUDA ``device``; anything else is a plain ``.to``).
        device: the target device.

    Returns:
        ``t`` on ``device``, same shape, dtype and values.
    """
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def channel_stats(values, device) -> torch.Tensor:
    """Per-channel constants as the ``(1, C, 1, 1)`` float32 tensor :func:`normalize` broadcasts.

    Args:
        values: ``C`` numbers, or a tensor of them.
        device: where the tensor is needed (moved there without a host wait, :func:`host_to_device`).
    """
    if isinstance(values, torch.Tensor) and values.device == torch.device(device):
        return values.to(torch.float32).view(1, -1, 1, 1)
    return host_to_device(torch.as_tensor(values, dtype=torch.float32).view(1, -1, 1, 1), device)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel, in float32.

    Args:
        x: ``(B, 3, H, W)`` uint8, or float on the same 0..255 scale.
        mean, std: 3 values each, for pixel values in [0, 1]; or :func:`channel_stats` tensors already
            on ``x``'s device (as :class:`DeviceLoader` keeps them: nothing is copied per batch).
    """
    return (x.float() / 255 - channel_stats(mean, x.device)) / channel_stats(std, x.device)


def _share(x: torch.Tensor, whole: int | None, rows: slice | None) -> tuple[int, slice]:
    """The number of images to draw random numbers for and the rows of them that ``x`` holds."""
    if whole is None:
        return x.shape[0], slice(None)
    share = range(whole)[rows]
    if len(share) != x.shape[0] or share.step != 1:
        raise ValueError(f"x holds {x.shape[0]} images, not the {len(share)} contiguous rows {rows} of {whole}")
    return whole, rows


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, g: torch.Generator, whole: int | None = None,
                     rows: slice | None = None) -> torch.Tensor:
    """torchvision ``RandomCrop(size, padding, fill=0)`` + ``RandomHorizontalFlip()``, batched.

    Args:
        x: ``(B, C, H, W)`` any dtype (uint8 here).
        padding: zero padding on each side before the crop (0: no crop).
        flip: flip each image horizontally with probability 1/2.
        g: CPU generator for the offsets and coins.
        whole, rows: ``x`` is rows ``rows`` of a batch of ``whole`` images (one rank's share): the random
            numbers of all ``whole`` are drawn and those of ``rows`` used, so the share is augmented as it is
            in the whole batch.  ``None``: ``x`` is the whole batch.

    Returns:
        ``(B, C, H, W)``, same dtype.
    """
    n, share = _share(x, whole, rows)
    b, c, h, w = x.shape
    if padding > 0:
        off = host_to_device(torch.randint(0, 2 * padding + 1, (n, 2), generator=g)[share], x.device)
        xp = F.pad(x, (padding,) * 4)  # (B, C, H+2p, W+2p)
        row_idx = off[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
        col_idx = off[:, 1:2] + torch.arange(w, device=x.device)  # (B, W)
        bi = torch.arange(b, device=x.device).view(b, 1, 1)
        x = xp.permute(0, 2, 3, 1)[bi, row_idx[:, :, None], col_idx[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)
    if flip:
        coin = host_to_device(torch.rand(n, generator=g)[share] < 0.5, x.device).view(b, 1, 1, 1)
        x = torch.where(coin, x.flip(-1), x)
    return x.contiguous()


def random_rotation(x: torch.Tensor, degrees: float, g: torch.Generator, whole: int | None = None,
                    rows: slice | None = None) -> torch.Tensor:
    """torchvision ``RandomRotation(degrees)`` (nearest, fill 0), batched; ``x: (B, C, H, W)`` float; ``whole``,
    ``rows``: as in :func:`random_crop_flip`."""
    n, share = _share(x, whole, rows)
    angle = host_to_device((torch.rand(n, generator=g)[share] * 2 - 1) * math.radians(degrees), x.device)
    cos, sin = angle.cos(), angle.sin()
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # (B, 1, H, W)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    dc = delta.clamp_min(1e-12)
    h = torch.where(maxc == r, (g - b) / dc, torch.where(maxc == g, 2 + (b - r) / dc, 4 + (r - g) / dc))
    h = torch.where(delta > 0, (h / 6) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6)
    f = h * 6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    table = torch.stack([torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v),
                                                      (v, p, q))], 0)  # (6, B, 3, H, W)
    return table.gather(0, i[None, :, None].expand(1, -1, 3, -1, -1))[0]


def color_jitter(x: torch.Tensor, jitter, p: float, g: torch.Generator, whole: int | None = None,
                 rows: slice | None = None) -> torch.Tensor:
    """``RandomApply([ColorJitter(b, c, s, h)], p)``, batched, in a fixed order (brightness, contrast,
    saturation, hue; torchvision shuffles the order per image).

    Args:
        x: ``(B, 3, H, W)`` float RGB in [0, 1].
        jitter: ``(brightness, contrast, saturation, hue)`` as in torchvision.
        whole, rows: as in :func:`random_crop_flip`.
    """
    n, share = _share(x, whole, rows)
    b = x.shape[0]
    bright, contrast, sat, hue = jitter
    apply = host_to_device(torch.rand(n, generator=g)[share] < p, x.device).view(b, 1, 1, 1)

    def factor(amount):
        return host_to_device((1 - amount + 2 * amount * torch.rand(n, generator=g)[share]).clamp_min(0),
                              x.device).view(b, 1, 1, 1)

    y = x
    if bright > 0:
        y = (y * factor(bright)).clamp(0, 1)
    if contrast > 0:
        f = factor(contrast)
        y = (f * y + (1 - f) * _gray(y).mean((2, 3), keepdim=True)).clamp(0, 1)
    if sat > 0:
        f = factor(sat)
        y = (f * y + (1 - f) * _gray(y)).clamp(0, 1)
    if hue > 0:
        shift = host_to_device((torch.rand(n, generator=g)[share] * 2 - 1) * hue, x.device).view(b, 1, 1)
        hsv = rgb_to_hsv(y)
        y = hsv_to_rgb(torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], 1))
    return torch.where(apply, y, x)


def augment(x: torch.Tensor, aug: AugmentConfig, mean, std, g: torch.Generator, whole: int | None = None,
            rows: slice | None = None) -> torch.Tensor:
    """The training transform: crop + flip (uint8), rotation, colour jitter, then normalisation.

    Args:
        x: ``(B, 3, H, W)`` uint8 on any device.
        aug: the augmentation config.
        mean, std: per-channel normalisation (of pixel values in [0, 1]).
        g: CPU generator; all randomness comes from it.
        whole, rows: ``x`` is rows ``rows`` of a batch of ``whole`` (:func:`random_crop_flip`); it is then
            augmented exactly as those rows of the whole batch, and ``g`` ends in the same state.

    Returns:
        ``(B, 3, H, W)`` float32, normalised.
    """
    x = random_crop_flip(x, aug.crop_padding, aug.flip, g, whole, rows)
    if aug.rotation == 0 and aug.color_jitter is None:
        return normalize(x, mean, std)
    y = x.float() / 255
    if aug.rotation > 0:
        y = random_rotation(y, aug.rotation, g, whole, rows)
    if aug.color_jitter is not None:
        y = color_jitter(y, aug.color_jitter, aug.color_jitter_p, g, whole, rows)
    return normalize(y * 255, mean, std)


class DeviceLoader:
    """Batches of one split, gathered from uint8 images held on a device.

    Args:
        split: the images and labels (on ``storage`` device).
        batch_size: images per batch; the last batch may be smaller.
        device: where batches are produced (the model's device).
        mean, std: normalisation.
        augment: the training augmentation, or ``None`` (evaluation).
    """

    def __init__(self, split: Split, batch_size: int, device, mean, std, augment: AugmentConfig | None = None):
        self.split, self.batch_size, self.device = split, batch_size, torch.device(device)
        self.mean, self.std, self.augment = tuple(mean), tuple(std), augment
        # on the device once, not copied at every batch
        self._stats = (channel_stats(self.mean, self.device), channel_stats(self.std, self.device))

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def batch(self, idx: torch.Tensor, g: torch.Generator | None = None, rows: slice | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(b, 3, H, W)`` float (augmented when configured, needs ``g``) and labels ``(b,)`` of the
        images ``idx``, or only of its rows ``rows`` (a rank's contiguous share of a global batch: those images
        alone are gathered and augmented, as they are in the whole batch; ``g`` ends as after the whole)."""
        whole = None if rows is None else len(idx)
        idx = host_to_device(idx if rows is None else idx[rows], self.split.images.device)
        x = host_to_device(self.split.images[idx], self.device)
        y = host_to_device(self.split.labels[idx], self.device)
        if self.augment is None:
            return normalize(x, *self._stats), y
        return augment(x, self.augment, *self._stats, g, whole, rows), y

    def __iter__(self):
        """Sequential, unaugmented batches (evaluation)."""
        return self.batches()

    def batches(self, first: int = 0, every: int = 1):
        """The sequential, unaugmented batches ``first, first + every, ...`` (one rank's share of an evaluation
        split over ``every`` processes); the others are never gathered."""
        n = len(self.split)
        for start in range(first * self.batch_size, n, every * self.batch_size):
            yield self.batch(torch.arange(start, min(start + self.batch_size, n), device=self.split.images.device))


__all__ = ["normalize", "random_crop_flip", "random_rotation", "color_jitter", "rgb_to_hsv", "hsv_to_rgb", "augment",
           "DeviceLoader", "host_to_device", "channel_stats"]
