"""Training augmentations and the rare-cell sampler, from the seeds' class-imbalance study.

Flips, random erasing ("black holes": rectangles set to zero), Gaussian noise on the normalised
pixels, and a sampler that draws images of rare cells more often (weight ∝ count^-power).
A horizontal flip mirrors the driving side; keep `hflip` low (or 0) when captions state it.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torchvision import transforms as T

from ..core.errors import UserError


class GaussianNoise:
    """Add N(0, std²) noise to a tensor image (after normalisation); a torchvision-style transform."""

    def __init__(self, std: float = 0.05, p: float = 0.5):
        self.std = float(std)
        self.p = float(p)

    def __call__(self, x):
        if self.std <= 0 or torch.rand(()) >= self.p:
            return x
        return x + torch.randn_like(x) * self.std

    def __repr__(self) -> str:
        return f"GaussianNoise(std={self.std}, p={self.p})"


def build_train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: tuple[float, float] = (0.6, 1.0),
    hflip: float = 0.5,
    erase: float = 0.25,
    noise: float = 0.03,
):
    """The augmenting transform PIL -> Tensor(3, S, S): random resized crop, flip, colour jitter,
    normalise, random erasing with zeros ("black holes"), Gaussian noise."""
    steps = [
        T.RandomResizedCrop(image_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
    ]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    steps += [
        T.ColorJitter(0.2, 0.2, 0.1),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ]
    if erase > 0:
        steps.append(T.RandomErasing(p=erase, scale=(0.02, 0.15), value=0))
    if noise > 0:
        steps.append(GaussianNoise(noise))
    return T.Compose(steps)


def rare_cell_weights(cell_ids: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Sampling weight of each sample, ∝ (its cell's count)^-power, summing to 1. power 0: uniform;
    1: every cell equally likely."""
    cell_ids = np.asarray(cell_ids)
    if cell_ids.ndim != 1 or len(cell_ids) == 0:
        raise UserError("rare-cell sampling needs a non-empty 1-D array of cell ids")
    _, inverse, counts = np.unique(cell_ids, return_inverse=True, return_counts=True)
    w = counts[inverse].astype(np.float64) ** (-float(power))
    return w / w.sum()


class EpochSampler:
    """The sample order of one epoch, the same on every process: a seeded permutation, or with
    `weights` a seeded draw with replacement (rare-cell oversampling). Each of `world_size`
    processes takes every world_size-th index, so that a global batch is the same whatever the
    number of processes; `skip` drops the first samples (resume in the middle of an epoch)."""

    def __init__(self, n: int, seed: int = 0, weights: np.ndarray | None = None, rank: int = 0, world_size: int = 1, drop_last_multiple: int = 1):
        self.n = int(n)
        self.seed = int(seed)
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.multiple = int(drop_last_multiple)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = int(epoch)
        self.skip = int(skip)

    def global_order(self) -> np.ndarray:
        """All indices of this epoch in order, cut to a multiple of `drop_last_multiple`."""
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is None:
            order = rng.permutation(self.n)
        else:
            order = rng.choice(self.n, size=self.n, replace=True, p=self.weights)
        keep = len(order) - len(order) % self.multiple
        return order[:keep]

    def indices(self) -> np.ndarray:
        """This process's indices of the epoch, as an array (no Python int per sample)."""
        return self.global_order()[self.skip :][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return (len(self.global_order()) - self.skip) // self.world_size
