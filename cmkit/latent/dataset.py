"""Latent datasets: images encoded once, cached, normalised per channel; samples decoded back.

iLCT Sec. 4.1 trains on latents "normalized using mean and variance": z_n = (z - m_c)/s_c with the
mean m_c and standard deviation s_c of channel c over the encoded training set. The cache key is
the pixel data's fingerprint plus the autoencoder's weights hash, so new data or new weights
re-encode and anything else reuses the file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cmkit.dataset import Dataset, DataError, take_rows

CACHE_VERSION = "latent-v1"  # bump when the encoding (posterior mean, channel handling) changes


@dataclass
class LatentDataset(Dataset):
    """A Dataset whose x are normalised latents; to_data_space decodes to the pixels' data space."""

    autoencoder: Any = field(default=None, repr=False)
    pixels: Dataset | None = field(default=None, repr=False)  # the encoded images (reference data)
    latent_mean: Tensor | None = field(default=None, repr=False)  # (C,) per-channel m_c
    latent_std: Tensor | None = field(default=None, repr=False)  # (C,) per-channel s_c
    decode_batch: int = 256

    def denormalise(self, x: Tensor) -> Tensor:
        """z = x·s_c + m_c: the autoencoder's own latent units."""
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.latent_std.to(x).reshape(shape) + self.latent_mean.to(x).reshape(shape)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """Normalised latents to images in the pixel dataset's normalised space ([-1, 1]), on the CPU."""
        x = x.detach().float()
        device = x.device
        self.autoencoder.to(device)
        out = []
        for i in range(0, x.shape[0], self.decode_batch):
            y = self.autoencoder.decode(self.denormalise(x[i:i + self.decode_batch])).float()
            if y.shape[1] != self.pixels.x.shape[1]:  # an RGB autoencoder on greyscale data
                y = y.mean(dim=1, keepdim=True)
            out.append(y.cpu())
        return torch.cat(out) if out else torch.empty(0, *self.pixels.shape)

    def to_data_space(self, x: Tensor) -> Tensor:
        """Decode, then undo the pixel normalisation (images to [0, 1])."""
        return self.pixels.to_data_space(self.decode(x))

    def subset(self, idx: Tensor) -> LatentDataset:
        labels = self.labels[idx] if self.labels is not None else None
        return LatentDataset(self.name, take_rows(self.x, idx), labels, self.kind, self.num_classes,
                             autoencoder=self.autoencoder, pixels=self.pixels.subset(idx),
                             latent_mean=self.latent_mean, latent_std=self.latent_std)


def _match_channels(x: Tensor, in_channels: int) -> Tensor:
    if x.shape[1] == in_channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, in_channels, -1, -1)  # greyscale into an RGB autoencoder
    raise DataError(f"the autoencoder takes {in_channels}-channel images but the data has {x.shape[1]} channels")


@torch.no_grad()
def encode_images(ae, x: Tensor, batch_size: int = 256, device: str | torch.device = "cpu") -> Tensor:
    """Latents (posterior means) of images x in [-1, 1], in batches, as float32 on the CPU."""
    ae.to(device)
    out = [ae.encode(_match_channels(x[i:i + batch_size], ae.in_channels).to(device)).float().cpu()
           for i in range(0, x.shape[0], batch_size)]
    ae.to("cpu")
    return torch.cat(out)


def cache_key(pixels: Dataset, ae) -> str:
    """Key of a latent cache: the pixel data's fingerprint and the autoencoder's weights hash."""
    return hashlib.sha256(f"{CACHE_VERSION}:{pixels.fingerprint()}:{ae.identity()}".encode()).hexdigest()[:32]


def _read_cache(path: Path, n: int):
    try:
        with np.load(path, allow_pickle=False) as f:
            z, mean, std = f["z"], f["mean"], f["std"]
        if z.shape[0] == n and mean.shape == std.shape == (z.shape[1],):
            return torch.from_numpy(z), torch.from_numpy(mean), torch.from_numpy(std)
    except (OSError, KeyError, ValueError, EOFError):
        pass  # missing or damaged: re-encode
    return None


def _write_cache(path: Path, z: Tensor, mean: Tensor, std: Tensor) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".latents.", suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, z=z.numpy(), mean=mean.numpy(), std=std.numpy())
            os.replace(tmp, path)  # readers never see half a file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        warnings.warn(f"could not cache latents at '{path}' ({e}); set data.cache_dir to a writable folder")


def latent_cache_path(cache_dir: str, key: str) -> Path:
    return Path(cache_dir).expanduser() / "latents" / f"{key}.npz"


def encode_dataset(pixels: Dataset, vae: str, cache_dir: str, device: str | torch.device = "cpu") -> LatentDataset:
    """Encode an image dataset with the autoencoder in directory vae (once: cached), normalised per channel."""
    from cmkit.latent import load_autoencoder

    if pixels.kind != "image":
        raise DataError(f"data.vae applies to images, but '{pixels.name}' holds vectors; remove data.vae")
    ae = load_autoencoder(vae)
    path = latent_cache_path(cache_dir, cache_key(pixels, ae))
    cached = _read_cache(path, len(pixels))
    if cached is None:
        z = encode_images(ae, pixels.x, device=device)
        # iLCT Sec. 4.1: normalise the latents by their mean and standard deviation, here per channel.
        mean = z.double().mean(dim=(0, 2, 3))
        std = z.double().std(dim=(0, 2, 3), correction=0).clamp_min(1e-8)
        cached = (z, mean.float(), std.float())
        _write_cache(path, *cached)
    z, mean, std = cached
    x = ((z - mean[None, :, None, None]) / std[None, :, None, None]).float().contiguous()
    if not torch.isfinite(x).all():
        raise DataError(f"the autoencoder '{vae}' produced non-finite latents for '{pixels.name}'")
    return LatentDataset(f"{pixels.name}@latent", x, pixels.labels, "image", pixels.num_classes,
                         autoencoder=ae, pixels=pixels, latent_mean=mean, latent_std=std)
