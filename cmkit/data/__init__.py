"""Datasets held in memory as tensors, and a stateless batch-index stream (exact resume).

Images are scaled to [-1, 1]; vectors are standardised. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


class DataError(ValueError):
    """Bad data the user can fix; the message names the problem and the fix."""


@dataclass
class Dataset:
    name: str
    x: torch.Tensor  # float32 (n, C, H, W) in [-1, 1], or (n, D) standardised
    labels: torch.Tensor | None
    kind: str  # "image" | "vector"
    num_classes: int = 0
    mean: torch.Tensor | None = field(default=None, repr=False)  # vectors: the standardisation
    std: torch.Tensor | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def to_data_space(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation: images to [0, 1] (clamped), vectors to their original units."""
        x = x.detach().float().cpu()
        if self.kind == "image":
            return ((x + 1) / 2).clamp(0, 1)
        if self.mean is not None:
            return x * self.std + self.mean
        return x

    def fingerprint(self) -> str:
        """sha256 of the normalised data (and labels): keys caches of derived statistics."""
        h = hashlib.sha256(self.x.contiguous().numpy().tobytes())
        if self.labels is not None:
            h.update(self.labels.numpy().tobytes())
        h.update(str(tuple(self.x.shape)).encode())
        return h.hexdigest()


def standardise(name: str, x: torch.Tensor, labels, num_classes: int = 0) -> Dataset:
    """Vector dataset with zero mean and unit standard deviation per dimension."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    return Dataset(name, ((x - mean) / std).float().contiguous(), labels, "vector", num_classes, mean, std)


SPLITS = ("train", "test", "all")


def split(ds: Dataset, which: str, seed: int) -> Dataset:
    """Deterministic split: the last 10% of a seeded permutation is the test split."""
    if which not in SPLITS:
        raise DataError(f"data.split='{which}' is not valid. Choose one of: {', '.join(SPLITS)}")
    if which == "all":
        return ds
    n = len(ds)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, n // 10)
    idx = perm[n - n_test:] if which == "test" else perm[: n - n_test]
    idx, _ = torch.sort(idx)
    labels = ds.labels[idx] if ds.labels is not None else None
    return Dataset(ds.name, ds.x[idx].contiguous(), labels, ds.kind, ds.num_classes, ds.mean, ds.std)


def _registry() -> dict[str, Callable]:
    from cmkit.data import arrays, bundled, toy

    return {**toy.TOY_SETS, "digits": bundled.digits, "mnist": bundled.mnist,
            "folder": arrays.folder, "array": arrays.array}


DATASET_NAMES = ("eight_gaussians", "two_moons", "swiss_roll", "checkerboard", "gaussian",
                 "digits", "mnist", "folder", "array")


def load_dataset(cfg) -> Dataset:
    """Load the dataset named by cfg.name (a DataConfig), split and with labels as configured."""
    registry = _registry()
    if cfg.name not in registry:
        raise DataError(f"unknown data.name '{cfg.name}'. Valid datasets: {', '.join(sorted(registry))}")
    ds = registry[cfg.name](cfg)
    if len(ds) == 0:
        raise DataError(f"dataset '{cfg.name}' is empty")
    if not torch.isfinite(ds.x).all():
        bad = int((~torch.isfinite(ds.x)).sum())
        raise DataError(f"dataset '{cfg.name}' holds {bad} NaN/inf values; clean the data first")
    if not cfg.labels:
        ds = Dataset(ds.name, ds.x, None, ds.kind, 0, ds.mean, ds.std)
    return split(ds, cfg.split, cfg.seed)


def batches(n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0,
            world_size: int = 1) -> Iterator[torch.Tensor]:
    """Infinite stream of index batches: global position p maps to perm_e[p % n], e = p // n.

    Stateless given ``start`` (images drawn so far), so a resumed run continues the exact order;
    rank r takes the r-th contiguous slice of each global batch.
    """
    if batch_size % world_size:
        raise DataError(f"batch size {batch_size} is not divisible by {world_size} ranks")
    if n <= 0:
        raise DataError("cannot draw batches from an empty dataset")
    local = batch_size // world_size
    cache: dict[int, torch.Tensor] = {}

    def perm(epoch: int) -> torch.Tensor:
        if epoch not in cache:
            cache.clear()
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        return cache[epoch]

    pos = start
    while True:
        p = torch.arange(pos + rank * local, pos + (rank + 1) * local)
        epochs = p // n
        idx = torch.empty_like(p)
        for e in torch.unique(epochs).tolist():
            m = epochs == e
            idx[m] = perm(e)[p[m] % n]
        yield idx
        pos += batch_size
