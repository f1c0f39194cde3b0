"""User data: image folders and .npy/.npz arrays, with clear errors for what cannot be used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def folder(cfg):
    """Every image under cfg.path (recursively, sorted); resized to cfg.resolution if set."""
    from PIL import Image

    from cmkit.data import Dataset, DataError

    root = Path(cfg.path).expanduser()
    if not cfg.path or not root.is_dir():
        raise DataError(f"data.path='{cfg.path}' is not a folder. Set data.path to a folder of images.")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"no images in '{root}' (looked for {', '.join(IMAGE_EXTENSIONS)} files, recursively)")
    arrays, sizes, modes = [], {}, set()
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                mode = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
                modes.add(mode)
                im = im.convert(mode)
                if cfg.resolution > 0:
                    s = min(im.size)
                    left, top = (im.width - s) // 2, (im.height - s) // 2
                    im = im.crop((left, top, left + s, top + s)).resize((cfg.resolution,) * 2, Image.LANCZOS)
                sizes.setdefault(im.size, p)
                arrays.append(np.asarray(im))
        except OSError as e:
            raise DataError(f"cannot read image '{p}': {e}. Remove or fix the file.") from None
    if len(modes) > 1:
        raise DataError(f"'{root}' mixes greyscale and colour images; convert them to one mode")
    if len(sizes) > 1:
        (s1, f1), (s2, f2) = list(sizes.items())[:2]
        raise DataError(
            f"images in '{root}' have different sizes, e.g. '{f1}' is {s1[0]}x{s1[1]} and '{f2}' is "
            f"{s2[0]}x{s2[1]}. Set data.resolution=N to centre-crop and resize them all."
        )
    x = torch.from_numpy(np.stack(arrays)).float() / 255.0 * 2 - 1
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return Dataset("folder", x.contiguous(), None, "image", 0)


def _read_array(path: Path):
    from cmkit.data import DataError

    if not path.is_file():
        raise DataError(f"data.path='{path}' does not exist. Point it at a .npy or .npz file.")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                keys = list(f.keys())
                if "x" in keys:
                    xkey = "x"
                elif len(keys) == 1:
                    xkey = keys[0]
                else:
                    raise DataError(f"'{path}' holds several arrays ({', '.join(keys)}) and none is named 'x'. "
                                    f"Save the data under key 'x' (labels under 'y').")
                ykey = next((k for k in ("y", "labels") if k in keys and k != xkey), None)
                return f[xkey], (f[ykey] if ykey else None)
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read '{path}' as a numpy array: {e}") from None
    raise DataError(f"data.path='{path}' must end in .npy or .npz")


def array(cfg):
    """(n, D) vectors, or (n, H, W), (n, C, H, W), (n, H, W, C) images with C in {1, 3}."""
    from cmkit.data import Dataset, DataError, standardise

    x, y = _read_array(Path(cfg.path).expanduser())
    if x.dtype.kind not in "biuf":
        raise DataError(f"'{cfg.path}' has dtype {x.dtype}; cmkit needs numbers (integers or floats)")
    if x.ndim < 2 or x.shape[0] == 0 or x.size == 0:
        raise DataError(f"'{cfg.path}' has shape {x.shape}; expected (n, D) vectors or (n, [C,] H, W[, C]) images, n > 0")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"'{cfg.path}' holds {int((~np.isfinite(x)).sum())} NaN/inf values; clean the data first")
    labels = None
    if y is not None:
        y = np.asarray(y)
        if y.shape != (x.shape[0],) or y.dtype.kind not in "iu" or (y.size and y.min() < 0):
            raise DataError(f"labels in '{cfg.path}' must be non-negative integers of shape ({x.shape[0]},), got {y.shape} {y.dtype}")
        labels = torch.from_numpy(y.astype(np.int64))
    num_classes = int(labels.max()) + 1 if labels is not None and len(labels) else 0
    if x.ndim == 2:
        return standardise("array", torch.from_numpy(x.astype(np.float64)), labels, num_classes)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"'{cfg.path}' has shape {x.shape}; images need 1 or 3 channels (n, C, H, W) or (n, H, W, C)")
    if x.dtype == np.uint8:
        xf = x.astype(np.float32) / 255.0 * 2 - 1
    elif x.dtype.kind == "f" and x.min() >= 0 and x.max() <= 1:
        xf = x.astype(np.float32) * 2 - 1
    elif x.dtype.kind == "f" and x.min() >= -1 and x.max() <= 1:
        xf = x.astype(np.float32)
    else:
        raise DataError(f"image values in '{cfg.path}' span [{x.min()}, {x.max()}]; use uint8, floats in [0, 1] or in [-1, 1]")
    return Dataset("array", torch.from_numpy(np.ascontiguousarray(xf)), labels, "image", num_classes)
