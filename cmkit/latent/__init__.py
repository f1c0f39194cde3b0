"""Latent space: an encoder/decoder interface, its two implementations, and latent datasets (iLCT).

An ``Autoencoder`` maps images in [-1, 1] to latents and back and names its weights by a hash
(for cache keys). Two kinds load from a local directory given as ``data.vae=PATH``:

* a cmkit KL autoencoder written by ``cmkit train-ae`` (``cmkit_ae.json`` + ``weights.safetensors``);
* a diffusers ``AutoencoderKL`` saved with ``save_pretrained`` (``config.json``; optional extra
  ``cmkit[latent]``), e.g. LDM's KL-f8 as iLCT uses (Sec. 5). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from cmkit.dataset import DataError
from cmkit.latent.autoencoder import CONFIG_FILE, load_autoencoder_dir


def weights_hash(module: nn.Module, extra: str = "") -> str:
    """sha256 hex of a module's state (names, shapes, dtypes, bytes) and an extra string."""
    h = hashlib.sha256(extra.encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        # reshape(-1) first: a 0-dim tensor (e.g. BatchNorm's num_batches_tracked) cannot be viewed as bytes.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Autoencoder:
    """The interface: encode images (n, C, H, W) in [-1, 1] to latents, decode latents to images."""

    in_channels: int

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def identity(self) -> str:
        """A hash of the weights: the latent cache is keyed by it."""
        raise NotImplementedError

    def to(self, device) -> Autoencoder:
        raise NotImplementedError


class OwnAutoencoder(Autoencoder):
    """cmkit's KL autoencoder (``cmkit train-ae``); encodes to the posterior mean."""

    def __init__(self, path: Path):
        self.module = load_autoencoder_dir(path)
        self.in_channels = self.module.cfg.in_channels
        self._id = weights_hash(self.module, json.dumps(self.module.cfg.__dict__, sort_keys=True))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self.module.encode(x)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.module.decode(z)

    def identity(self) -> str:
        return self._id

    def to(self, device) -> OwnAutoencoder:
        self.module.to(device)
        return self


class DiffusersAutoencoder(Autoencoder):
    """diffusers' AutoencoderKL from a local directory (safetensors only); encodes to the posterior mean (LDM).

    encode(x) = AutoencoderKL.encode(x).latent_dist.mean, decode(z) = AutoencoderKL.decode(z).sample.
    """

    def __init__(self, path: Path):
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise DataError(f"data.vae='{path}' is a diffusers AutoencoderKL; it needs diffusers: "
                            f"pip install 'cmkit[latent]'") from None
        try:
            # use_safetensors: never unpickle a diffusion_pytorch_model.bin; local_files_only: never download.
            self.module = AutoencoderKL.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                        low_cpu_mem_usage=False).eval()
        except OSError as e:
            raise DataError(f"cannot load the diffusers AutoencoderKL in data.vae='{path}' ({e}). cmkit reads "
                            f"safetensors weights only: re-save it with save_pretrained(dir, "
                            f"safe_serialization=True)") from None
        self.in_channels = int(self.module.config.in_channels)
        # The hash names the content, not where it lies: diffusers records the load path in _name_or_path.
        config = {k: v for k, v in dict(self.module.config).items() if k != "_name_or_path"}
        self._id = weights_hash(self.module, json.dumps(config, sort_keys=True, default=str))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self.module.encode(x).latent_dist.mean

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.module.decode(z).sample

    def identity(self) -> str:
        return self._id

    def to(self, device) -> DiffusersAutoencoder:
        self.module.to(device)
        return self


def load_autoencoder(path: str | Path) -> Autoencoder:
    """The autoencoder saved in a local directory: cmkit's own (cmkit_ae.json) or diffusers' (config.json)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(
            f"data.vae='{path}' is not a directory. Train one with "
            f"'cmkit train-ae data.name=mnist data.pad_to=32 --out {path}', or point data.vae at a "
            f"diffusers AutoencoderKL saved with save_pretrained"
        )
    if (p / CONFIG_FILE).is_file():
        return OwnAutoencoder(p)
    cfg = p / "config.json"
    if cfg.is_file():
        try:
            name = json.loads(cfg.read_text()).get("_class_name")
        except (OSError, ValueError):
            name = None
        if name == "AutoencoderKL":
            return DiffusersAutoencoder(p)
    raise DataError(f"data.vae='{path}' holds neither a cmkit autoencoder ({CONFIG_FILE}) nor a diffusers "
                    f"AutoencoderKL (config.json with _class_name AutoencoderKL)")


from cmkit.latent.dataset import LatentDataset, encode_dataset  # noqa: E402


def autoencoder_identity(dataset) -> str | None:
    """The weights hash of a latent dataset's autoencoder (None for pixel data): recorded in checkpoints."""
    ae = getattr(dataset, "autoencoder", None)
    return ae.identity() if ae is not None else None


def check_autoencoder(meta: dict, dataset, checkpoint) -> None:
    """Refuse a checkpoint whose latents came from another autoencoder than the one data.vae holds now."""
    from cmkit.checkpoint import CheckpointError

    saved, now = meta.get("autoencoder"), autoencoder_identity(dataset)
    if saved is not None and now is not None and saved != now:
        raise CheckpointError(
            f"checkpoint '{checkpoint}' was trained on latents of another autoencoder (weights sha256 "
            f"{saved[:12]}…) than the one in data.vae now ({now[:12]}…): its samples would be decoded wrongly. "
            f"Point data.vae at the autoencoder the run was trained with, or start a new run directory")

__all__ = ["Autoencoder", "LatentDataset", "autoencoder_identity", "check_autoencoder", "encode_dataset",
           "load_autoencoder", "weights_hash"]
