"""Prepared latents (iLCT): ``cmkit prepare-data DIR --vae AE`` encodes the prepared images once, in
batches (on CUDA if present), to float16 ``DIR/latents/<weights hash>/latents.npy`` with the per-channel
mean and standard deviation iLCT Sec. 4.1 normalises by; ``data.vae=AE`` loads the latents of that
autoencoder's weights hash and refuses another's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cmkit.data.prepare import write_prepared
from cmkit.data.prepared import INDEX_FILE, PROGRESS_FILE, PreparedArray, PreparedDataset, open_prepared
from cmkit.dataset import DataError

LATENTS_DIR = "latents"


def latent_dir(root: Path, identity: str, pad_to: int) -> Path:
    return root / LATENTS_DIR / (identity[:16] + (f"-pad{pad_to}" if pad_to else ""))


def channel_statistics(mm: np.ndarray, rows: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and population std over (N, H, W) of the stored (float16) latents, in float64 (Chan's merge)."""
    c = mm.shape[1]
    count, mean, m2 = 0, np.zeros(c), np.zeros(c)
    for a in range(0, mm.shape[0], rows):
        z = np.asarray(mm[a:a + rows], dtype=np.float64).transpose(1, 0, 2, 3).reshape(c, -1)
        k = z.shape[1]
        mu = z.mean(1)
        d = mu - mean
        m2 += ((z - mu[:, None]) ** 2).sum(1) + d ** 2 * count * k / (count + k)
        mean += d * k / (count + k)
        count += k
    return mean.tolist(), np.maximum(np.sqrt(m2 / count), 1e-8).tolist()


def prepare_latents(root: str | Path, vae: str, *, pad_to: int = 0, batch_size: int = 256, device: str = "auto",
                    chunk: int = 0, force: bool = False, progress: bool = True,
                    on_chunk: Callable[[int], None] | None = None) -> dict:
    """Encode the prepared images in ``root`` with the autoencoder in ``vae`` to root/latents/<hash>/latents.npy."""
    from cmkit.latent import load_autoencoder
    from cmkit.latent.dataset import _match_channels

    root = Path(root).expanduser()
    root, index, _, _ = open_prepared(root, "full")
    if index.get("kind") != "image":
        raise DataError(f"'{root}' holds {index.get('kind')} data; --vae encodes a prepared image directory")
    ae = load_autoencoder(vae)
    identity = ae.identity()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pixels = PreparedArray(root / index["x"]["file"], pad_to=pad_to)
    x0 = pixels[[0]]
    ae.to(device)
    z0 = ae.encode(_match_channels(x0, ae.in_channels).to(device))
    shape = (len(pixels), *z0.shape[1:])

    @torch.no_grad()
    def produce(a: int, b: int) -> np.ndarray:
        out = []
        for s in range(a, b, batch_size):
            x = pixels[np.arange(s, min(b, s + batch_size))]
            z = ae.encode(_match_channels(x, ae.in_channels).to(device)).to(torch.float16)
            if not torch.isfinite(z).all():
                raise DataError(f"the autoencoder '{vae}' gave non-finite (or beyond float16) latents for images "
                                f"{s}..{min(b, s + batch_size) - 1} of '{root}'")
            out.append(z.cpu().numpy())
        return np.concatenate(out)

    def finish(mm) -> dict:
        mean, std = channel_statistics(mm)
        return {"latent_mean": mean, "latent_std": std}

    plan = {"pixels_sha256": index["sha256"], "autoencoder": identity, "pad_to": pad_to, "batch_size": batch_size}
    extra = {"autoencoder": identity, "autoencoder_type": type(ae).__name__, "autoencoder_path": str(vae),
             "pixels_sha256": index["sha256"], "pad_to": pad_to}
    try:
        return write_prepared(latent_dir(root, identity, pad_to), file="latents.npy", kind="latent", shape=shape,
                              dtype="float16", plan=plan, produce=produce, labels=None, num_classes=0, extra=extra,
                              chunk=chunk, force=force, progress=progress, on_chunk=on_chunk, finish=finish)
    finally:
        ae.to("cpu")


# ----------------------------------------------------------------------------
# Prepared latents (cmkit prepare-data DIR --vae AE): root/latents/<hash>/latents.npy.


def load_prepared_latents(pixels: PreparedDataset, vae: str, verify: str = "auto"):
    """The latents of ``pixels`` (same rows, same split) encoded by the autoencoder in ``vae``, as a LatentDataset.

    Refused with a DataError when no latents of this autoencoder (weights sha256) and padding exist, or
    when they were encoded from other images.
    """
    from cmkit.latent import load_autoencoder
    from cmkit.latent.dataset import LatentDataset

    ae = load_autoencoder(vae)
    identity, pad_to = ae.identity(), pixels.x.pad_to
    d = latent_dir(pixels.root, identity, pad_to)
    hint = (f"encode them once with 'cmkit prepare-data {pixels.root} --vae {vae}"
            + (f" --pad-to {pad_to}'" if pad_to else "'"))
    if not (d / INDEX_FILE).is_file() and not (d / PROGRESS_FILE).is_file():
        others = []
        for other in sorted((pixels.root / LATENTS_DIR).glob("*/" + INDEX_FILE)):
            try:
                info = json.loads(other.read_text())
                others.append(f"{info.get('autoencoder', '?')[:12]}… (pad_to={info.get('pad_to', 0)})")
            except (OSError, ValueError):
                continue
        found = (f"the latents there were encoded by another autoencoder: {', '.join(others)}" if others
                 else "none were encoded yet")
        raise DataError(f"'{pixels.root}' has no latents of the autoencoder in data.vae='{vae}' (weights sha256 "
                        f"{identity[:12]}…, data.pad_to={pad_to}); {found}. {hint}")
    root, index, mm, _ = open_prepared(d, verify)
    if index.get("autoencoder") != identity:
        raise DataError(f"latent file '{root / index['x']['file']}' was encoded by another autoencoder (weights sha256 "
                        f"{str(index.get('autoencoder'))[:12]}…) than the one in data.vae='{vae}' ({identity[:12]}…); {hint}")
    if index.get("pixels_sha256") != pixels.index["sha256"] or mm.shape[0] != pixels.x.file_shape[0]:
        raise DataError(f"latent file '{root / index['x']['file']}' was encoded from other images than '{pixels.root}' "
                        f"holds now; {hint} --force")
    mean = torch.tensor(index["latent_mean"], dtype=torch.float32)
    std = torch.tensor(index["latent_std"], dtype=torch.float32)
    x = PreparedArray(root / index["x"]["file"], rows=pixels.x.rows, mean=mean, std=std)
    return LatentDataset(f"{pixels.name}@latent", x, pixels.labels, "image", pixels.num_classes, autoencoder=ae,
                         pixels=pixels, latent_mean=mean, latent_std=std)
