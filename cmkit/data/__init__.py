"""Datasets held in memory as tensors, and a stateless batch-index stream (exact resume).

Images are scaled to [-1, 1]; vectors are standardised per dimension (except the ``gaussian``
toy set, which keeps raw units for closed-form tests). Nothing is downloaded.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from cmkit.dataset import Dataset, DataError, take_rows, uint8_to_unit  # noqa: F401  (re-exported)


def standardise(name: str, x: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int = 0) -> Dataset:
    """Vector dataset with zero mean and unit (population) standard deviation per dimension."""
    x = x.double()
    mean, std = x.mean(0), x.std(0, correction=0)
    # A constant dimension has std 0 (or rounding noise): leave it unscaled rather than divide by ~0.
    std = torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))
    z = ((x - mean) / std).float().contiguous()
    return Dataset(name, z, labels, "vector", num_classes, mean.float(), std.float())


def pad_images(x: torch.Tensor, pad_to: int) -> torch.Tensor:
    """Pad (n, C, H, W) images with -1 (black) on all sides, centred, to pad_to × pad_to."""
    h, w = x.shape[-2:]
    if pad_to < max(h, w):
        raise DataError(f"data.pad_to={pad_to} is smaller than the images ({h}x{w}); use 0 or >= {max(h, w)}")
    ph, pw = pad_to - h, pad_to - w
    return torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=-1.0).contiguous()


SPLITS = ("train", "test", "all")


def split_indices(n: int, which: str, seed: int) -> torch.Tensor:
    """Sorted indices of a split: the last 10% (at least one) of a seeded permutation is "test"."""
    if which not in SPLITS:
        raise DataError(f"data.split='{which}' is not valid. Choose one of: {', '.join(SPLITS)}")
    if which == "all":
        return torch.arange(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, n // 10)
    idx = perm[n - n_test:] if which == "test" else perm[: n - n_test]
    return torch.sort(idx).values  # keep the file order within a split


# The loaders import Dataset, DataError and standardise from this module, so they come after them.
from cmkit.data import arrays, bundled, prepared, toy  # noqa: E402

DATASETS: dict[str, Callable] = {
    "eight_gaussians": toy.eight_gaussians,
    "two_moons": toy.two_moons,
    "swiss_roll": toy.swiss_roll,
    "checkerboard": toy.checkerboard,
    "gaussian": toy.gaussian,
    "digits": bundled.digits,
    "mnist": bundled.mnist,
    "folder": arrays.folder,
    "array": arrays.array,
    "prepared": prepared.load_prepared,  # a directory written by cmkit prepare-data: uint8 memmap, read per batch
}


def load_dataset(cfg, device: str | torch.device = "cpu") -> Dataset:
    """Load DATASETS[cfg.name] from a DataConfig: padded, labelled and split as configured.

    ``device`` is where a data.vae autoencoder encodes the images (once, then cached); the data
    themselves stay on the CPU.
    """
    if getattr(cfg, "vae", ""):  # latent space (iLCT): encode the pixel dataset once, cached
        from dataclasses import replace

        pixels = load_dataset(replace(cfg, vae=""))
        if prepared.is_on_disk(pixels):  # latents encoded by cmkit prepare-data --vae, float16 on disk
            from cmkit.data.latents import load_prepared_latents

            return load_prepared_latents(pixels, cfg.vae, getattr(cfg, "verify", "auto"))
        from cmkit.latent import encode_dataset

        return encode_dataset(pixels, cfg.vae, cfg.cache_dir, device=device)
    if cfg.name not in DATASETS:
        raise DataError(f"unknown data.name '{cfg.name}'. Valid datasets: {', '.join(DATASETS)}")
    if cfg.split not in SPLITS:  # checked before a slow load
        raise DataError(f"data.split='{cfg.split}' is not valid. Choose one of: {', '.join(SPLITS)}")
    ds = DATASETS[cfg.name](cfg)
    if len(ds) == 0:
        raise DataError(f"dataset '{cfg.name}' is empty")
    if not prepared.is_on_disk(ds) and not torch.isfinite(ds.x).all():  # uint8 on disk is finite
        bad = int((~torch.isfinite(ds.x)).sum())
        raise DataError(f"dataset '{cfg.name}' has {bad} non-finite values after normalisation; "
                        f"its values are too large to standardise, rescale them first")
    if cfg.pad_to:
        if ds.kind != "image":
            raise DataError(f"data.pad_to={cfg.pad_to} applies to images, but '{cfg.name}' holds vectors; set data.pad_to=0")
        ds.x = ds.x.padded(cfg.pad_to) if prepared.is_on_disk(ds) else pad_images(ds.x, cfg.pad_to)
    if not cfg.labels:
        ds.labels, ds.num_classes = None, 0
    if cfg.split == "all":
        return ds
    part = ds.subset(split_indices(len(ds), cfg.split, cfg.seed))
    if len(part) == 0:
        raise DataError(f"data.split={cfg.split} of the {len(ds)} samples of '{cfg.name}' is empty; use data.split=all")
    return part


def batches(n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0,
            world_size: int = 1) -> Iterator[torch.Tensor]:
    """Infinite stream of index batches: global position p maps to perm_e[p % n], e = p // n.

    Stateless given ``start`` (images drawn so far), so a resumed run continues the exact order;
    rank r takes the r-th contiguous slice of each global batch of batch_size positions.
    """
    if n <= 0:
        raise DataError("cannot draw batches from an empty dataset")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, {world_size}); check the distributed launch")
    if batch_size <= 0 or batch_size % world_size:
        raise DataError(f"train.batch_size={batch_size} must be a positive multiple of the {world_size} ranks")
    if start < 0:
        raise DataError(f"start position {start} must be >= 0")
    local = batch_size // world_size
    cached_epoch, cached_perm = -1, torch.empty(0, dtype=torch.long)  # only the current epoch is kept
    pos = start
    while True:
        p = torch.arange(pos + rank * local, pos + (rank + 1) * local)
        epochs = p // n
        idx = torch.empty_like(p)
        for e in range(int(epochs[0]), int(epochs[-1]) + 1):  # positions are increasing
            if e != cached_epoch:
                g = torch.Generator().manual_seed(seed * 1_000_003 + e)
                cached_epoch, cached_perm = e, torch.randperm(n, generator=g)
            m = epochs == e
            idx[m] = cached_perm[p[m] % n]
        yield idx
        pos += batch_size
