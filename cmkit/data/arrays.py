"""User data: image folders and .npy/.npz arrays, with errors that say what to change."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch

from cmkit.data import Dataset, DataError, standardise, uint8_to_unit

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
PARALLEL_MIN_FILES = 64  # smaller folders are decoded in this process (a pool costs more than it saves)
GREY_MODES = ("L", "1")  # every other PIL mode is read as RGB


# ----------------------------------------------------------------------------
# Image folders.


def _read_image(path: Path, resolution: int) -> tuple[np.ndarray, str]:
    """uint8 (H, W) or (H, W, 3) pixels of one file, centre-cropped and resized if resolution > 0."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = "L" if im.mode in GREY_MODES else "RGB"
            im = im.convert(mode)
            if resolution > 0:
                s = min(im.size)
                left, top = (im.width - s) // 2, (im.height - s) // 2
                im = im.crop((left, top, left + s, top + s))
                im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8), mode
    # PIL raises OSError for most broken files, but SyntaxError/ValueError from some decoders.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image '{path}' ({type(e).__name__}: {e}). Remove or replace the file.") from None


def _read_images(files: list[Path], resolution: int, workers: int):
    """Decode every file, in worker processes when there are many (data.workers; 0 = one per core, max 8)."""
    n = min(8, os.cpu_count() or 1) if workers == 0 else workers
    if n <= 1 or len(files) < PARALLEL_MIN_FILES:
        return [_read_image(p, resolution) for p in files]
    with ProcessPoolExecutor(n) as pool:  # results keep the sorted file order; a DataError re-raises here
        return list(pool.map(partial(_read_image, resolution=resolution), files, chunksize=max(1, len(files) // (4 * n))))


def folder(cfg) -> Dataset:
    """Every .png/.jpg/.jpeg/.bmp under cfg.path (recursively, sorted), scaled to [-1, 1]."""
    if not cfg.path:
        raise DataError("data.name=folder needs data.path=<folder of images>")
    if cfg.workers < 0:
        raise DataError(f"data.workers={cfg.workers} is negative. Use 0 (one process per core), 1 (none) or more")
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path='{cfg.path}' is not an existing folder. Set data.path to a folder of images.")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"no images in '{root}' (looked recursively for {', '.join(IMAGE_EXTENSIONS)} files)")
    pixels, first_of_size, first_of_mode = [], {}, {}
    for p, (a, mode) in zip(files, _read_images(files, cfg.resolution, cfg.workers)):
        pixels.append(a)
        first_of_mode.setdefault(mode, p)
        first_of_size.setdefault((a.shape[1], a.shape[0]), p)
    if len(first_of_mode) > 1:
        raise DataError(f"'{root}' mixes greyscale and colour images, e.g. '{first_of_mode['L']}' is greyscale and "
                        f"'{first_of_mode['RGB']}' is colour; convert them all to one mode")
    if len(first_of_size) > 1:
        (s1, f1), (s2, f2) = list(first_of_size.items())[:2]
        raise DataError(
            f"images in '{root}' have different sizes, e.g. '{f1}' is {s1[0]}x{s1[1]} and '{f2}' is "
            f"{s2[0]}x{s2[1]}. Set data.resolution=N to centre-crop and resize them all to N x N."
        )
    x = uint8_to_unit(np.stack(pixels))
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (n, C, H, W)
    return Dataset("folder", x.contiguous(), None, "image", 0)


# ----------------------------------------------------------------------------
# .npy / .npz arrays.


def _read_arrays(cfg) -> tuple[np.ndarray, np.ndarray | None]:
    """The data array and the labels array (or None) of cfg.path."""
    if not cfg.path:
        raise DataError("data.name=array needs data.path=<file.npy or file.npz>")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise DataError(f"data.path='{cfg.path}' does not exist. Point it at a .npy or .npz file.")
    if path.suffix.lower() not in (".npy", ".npz"):
        raise DataError(f"data.path='{cfg.path}' must end in .npy or .npz")
    try:
        loaded = np.load(path, allow_pickle=False)  # decides .npy vs .npz by content, not by name
        if isinstance(loaded, np.ndarray):
            return loaded, None
        with loaded as f:
            keys = list(f.keys())
            if not keys:
                raise DataError(f"'{path}' is an .npz file that holds no arrays. Save the data under key 'x' "
                                f"(labels under 'y'): numpy.savez(path, x=x, y=y)")
            if "x" in keys:
                xkey = "x"
            elif len(keys) == 1:
                xkey = keys[0]
            else:
                found = ", ".join(keys) if keys else "none"
                raise DataError(f"'{path}' holds several arrays ({found}) and none is named 'x'. "
                                f"Save the data under key 'x' (labels under 'y').")
            ykey = next((k for k in ("y", "labels") if k in keys and k != xkey), None)
            return f[xkey], (f[ykey] if ykey else None)
    except DataError:
        raise
    except Exception as e:  # numpy raises ValueError, OSError, EOFError, BadZipFile... for broken files
        raise DataError(not_numpy_message(path, e)) from None


def not_numpy_message(path, e: Exception) -> str:
    """Why a file is not a readable .npy/.npz, without numpy's advice to allow pickles (never do that)."""
    if "pickle" in str(e):  # numpy's guess for any file without a .npy/zip header
        why = "it is neither a .npy nor an .npz file (no NumPy or zip header; truncated, or another format)"
    else:
        why = f"{type(e).__name__}: {e}"
    return f"cannot read '{path}' as a numpy array ({why}). Save it with numpy.save or numpy.savez."


def _labels(y: np.ndarray | None, n: int, path: str) -> tuple[torch.Tensor | None, int]:
    if y is None:
        return None, 0
    y = np.asarray(y)
    if y.shape != (n,) or y.dtype.kind not in "iu" or (n and y.min() < 0):
        raise DataError(f"labels in '{path}' must be non-negative integers of shape ({n},), "
                        f"got shape {y.shape} dtype {y.dtype}; fix them or set data.labels=false")
    return torch.from_numpy(y.astype(np.int64)), int(y.max()) + 1


def _image_values(x: np.ndarray, path: str) -> np.ndarray:
    """float32 images in [-1, 1]: uint8 is divided by 255; floats must already be in [0, 1] or [-1, 1]."""
    if x.dtype == np.uint8:
        return uint8_to_unit(x).numpy()
    if x.dtype.kind in "iu":
        raise DataError(f"'{path}' holds {x.dtype} images; save them as uint8 (0..255) or as floats in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0 and hi <= 1:  # [0, 1] wins when both ranges fit (e.g. all values in [0, 1])
        return x.astype(np.float32) * 2 - 1
    if lo >= -1 and hi <= 1:
        return x.astype(np.float32)
    raise DataError(f"image values in '{path}' span [{lo:g}, {hi:g}]; save uint8 (0..255), "
                    f"or floats in [0, 1] or in [-1, 1]")


def array(cfg) -> Dataset:
    """(n, D) vectors (standardised), or (n, H, W), (n, C, H, W), (n, H, W, C) images with C in {1, 3}."""
    x, y = _read_arrays(cfg)
    path = cfg.path
    if x.dtype.kind == "b":
        x = x.astype(np.float32)  # booleans read as 0/1
    if x.dtype.kind not in "iuf":
        raise DataError(f"'{path}' has dtype {x.dtype}; cmkit needs numbers (integers or floats)")
    if x.ndim not in (2, 3, 4):
        raise DataError(f"'{path}' has shape {x.shape} (rank {x.ndim}); expected (n, D) vectors or "
                        f"(n, H, W), (n, C, H, W), (n, H, W, C) images with C in {{1, 3}}")
    if x.size == 0:
        raise DataError(f"'{path}' is empty (shape {x.shape}); it needs at least one sample with non-zero size")
    if x.dtype.kind == "f":
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        if bad:
            raise DataError(f"'{path}' holds {bad} NaN/inf values; remove or replace them first")
    labels, num_classes = _labels(y, x.shape[0], path) if cfg.labels else (None, 0)
    if x.ndim == 2:
        return standardise("array", torch.from_numpy(x.astype(np.float64)), labels, num_classes)
    if x.ndim == 3:
        x = x[:, None]
    elif x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # (n, H, W, C) -> (n, C, H, W)
    if x.shape[1] not in (1, 3):
        raise DataError(f"'{path}' has shape {x.shape}; images need 1 or 3 channels, as (n, C, H, W) or (n, H, W, C)")
    xf = np.ascontiguousarray(_image_values(x, path), dtype=np.float32)
    return Dataset("array", torch.from_numpy(xf), labels, "image", num_classes)
