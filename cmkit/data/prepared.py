"""Prepared datasets: one memory-mapped array file plus a JSON index, read batch by batch.

A prepared directory (written by ``cmkit prepare-data``, cmkit.data.prepare) holds

* ``images.npy``: uint8 (N, C, H, W) pixels (or ``latents.npy``: float16 (N, C, h, w) latents),
* ``labels.npy``: int64 (N,) class labels (optional),
* ``index.json``: format, shape, dtype, the sha256 of every chunk of rows and of the whole content,
  written last, so a directory without it never loads (a killed preparation is not a dataset).

Training reads the rows of each batch from the memmap (host memory per rank is the batch, not the
dataset) and converts them on the device: uint8 -> x/255·2 - 1 (``uint8_to_unit``, the quantisation
of the in-memory loaders too), float16 latents -> (z - m_c)/s_c (iLCT Sec. 4.1). The index stream
is ``cmkit.data.batches``, unchanged, so exact resume and rank independence hold as before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cmkit.dataset import Dataset, DataError, uint8_to_unit

FORMAT = "cmkit-prepared-v1"
INDEX_FILE = "index.json"
PROGRESS_FILE = "progress.json"  # present only while prepare-data runs (or after it was killed)
LABELS_FILE = "labels.npy"
VERIFY_MODES = ("auto", "full", "size")
AUTO_FULL_BYTES = 4 << 30  # verify=auto hashes every chunk of files up to 4 GiB, checks only sizes above


# ----------------------------------------------------------------------------
# Hashes (shared with the writer, cmkit.data.prepare).


def chunk_sha256(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows).reshape(-1).view(np.uint8)).hexdigest()


def content_sha256(dtype: str, shape: list[int], chunk: int, chunk_hashes: list[str], labels_hash: str | None) -> str:
    """The content hash of the index: dtype, shape, chunk size, every chunk's sha256 and the labels' sha256."""
    h = hashlib.sha256(f"{FORMAT}:{dtype}:{list(shape)}:{chunk}".encode())
    for c in chunk_hashes:
        h.update(bytes.fromhex(c))
    h.update((labels_hash or "no-labels").encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------
# Opening and checking a prepared directory.


def is_prepared(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and ((p / INDEX_FILE).is_file() or (p / PROGRESS_FILE).is_file())


def read_index(root: Path) -> dict:
    """The index.json of a prepared directory, or a DataError that says what the directory holds instead."""
    if not root.is_dir():
        raise DataError(f"data.path='{root}' is not a directory. Prepare one with "
                        f"'cmkit prepare-data SOURCE --out {root}' (SOURCE: image folder, .zip, .npy/.npz or mnist)")
    path = root / INDEX_FILE
    if not path.is_file():
        if (root / PROGRESS_FILE).is_file() or any(root.glob("*.partial")):
            raise DataError(f"'{root}' is an unfinished preparation (no {INDEX_FILE}, a {PROGRESS_FILE} or .partial "
                            f"file is there): cmkit prepare-data was stopped. Re-run the same prepare-data command to "
                            f"finish it")
        raise DataError(f"'{root}' has no {INDEX_FILE}; it is not a prepared dataset. Prepare one with "
                        f"'cmkit prepare-data SOURCE --out {root}'")
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read '{path}' ({type(e).__name__}: {e}); re-run cmkit prepare-data") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"'{path}' is not a {FORMAT} index (format {index.get('format') if isinstance(index, dict) else '?'}); "
                        f"re-run cmkit prepare-data with this cmkit version")
    return index


def open_array(root: Path, index: dict) -> np.memmap:
    """The memmap of index['x'], after checking the file's size, dtype and shape against the index."""
    spec = index["x"]
    path = root / spec["file"]
    shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
    if not path.is_file():
        raise DataError(f"'{path}' is missing, but '{root / INDEX_FILE}' lists it; re-run cmkit prepare-data")
    expected = int(np.prod(shape)) * dtype.itemsize
    try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # a truncated .npy: "mmap length is greater than file size"
        size = path.stat().st_size
        raise DataError(f"prepared file '{path}' is truncated or damaged ({size} bytes on disk, its index needs "
                        f"{expected} bytes of {dtype} {list(shape)} plus the header; {type(e).__name__}: {e}). "
                        f"Re-run cmkit prepare-data") from None
    if mm.shape != shape or mm.dtype != dtype:
        raise DataError(f"prepared file '{path}' holds {mm.dtype} {list(mm.shape)}, but its index says {dtype} "
                        f"{list(shape)}: the file and '{root / INDEX_FILE}' do not belong together. Re-run cmkit prepare-data")
    size = path.stat().st_size
    if size != mm.offset + expected:
        raise DataError(f"prepared file '{path}' has {size} bytes, {mm.offset + expected} expected for {dtype} "
                        f"{list(shape)}: it was truncated or appended to. Re-run cmkit prepare-data")
    return mm


def verify_content(root: Path, index: dict, mm: np.memmap, labels: np.ndarray | None) -> None:
    """Recompute every chunk's sha256 (and the labels') and compare with the index; name the first bad rows."""
    chunk, hashes = int(index["chunk"]), index["chunk_sha256"]
    n = mm.shape[0]
    if len(hashes) != -(-n // chunk):
        raise DataError(f"'{root / INDEX_FILE}' lists {len(hashes)} chunk hashes for {n} rows in chunks of {chunk}; "
                        f"re-run cmkit prepare-data")
    for i, expected in enumerate(hashes):
        if chunk_sha256(mm[i * chunk:(i + 1) * chunk]) != expected:
            a, b = i * chunk, min(n, (i + 1) * chunk)
            raise DataError(f"prepared file '{root / index['x']['file']}' does not match the sha256 in its index at rows "
                            f"{a}..{b - 1} (chunk {i}): the file was changed or damaged after preparation. "
                            f"Re-run cmkit prepare-data")
    if labels is not None and chunk_sha256(labels) != index["labels"]["sha256"]:
        raise DataError(f"labels file '{root / LABELS_FILE}' does not match the sha256 in its index; "
                        f"re-run cmkit prepare-data")
    got = content_sha256(index["x"]["dtype"], index["x"]["shape"], chunk, hashes,
                         index["labels"]["sha256"] if index.get("labels") else None)
    if got != index["sha256"]:
        raise DataError(f"'{root / INDEX_FILE}' is inconsistent (its content sha256 does not match its chunk "
                        f"hashes); re-run cmkit prepare-data")


def _read_labels(root: Path, index: dict, n: int) -> np.ndarray | None:
    spec = index.get("labels")
    if not spec:
        return None
    path = root / spec["file"]
    try:
        y = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read labels file '{path}' ({type(e).__name__}: {e}); re-run cmkit prepare-data") from None
    if y.shape != (n,) or y.dtype != np.int64:
        raise DataError(f"labels file '{path}' holds {y.dtype} {list(y.shape)}, int64 [{n}] expected; "
                        f"re-run cmkit prepare-data")
    return y


def check_verify_mode(verify: str) -> None:
    if verify not in VERIFY_MODES:
        raise DataError(f"data.verify='{verify}' is not valid. Choose one of: {', '.join(VERIFY_MODES)} "
                        f"(full: sha256 of every chunk at start; size: shapes and sizes only; auto: full up to 4 GiB)")


def open_prepared(root: str | Path, verify: str = "auto") -> tuple[Path, dict, np.memmap, np.ndarray | None]:
    """(root, index, memmap, labels) of a prepared directory, checked per ``verify`` (see VERIFY_MODES)."""
    check_verify_mode(verify)
    root = Path(root).expanduser()
    index = read_index(root)
    mm = open_array(root, index)
    labels = _read_labels(root, index, mm.shape[0])
    if verify == "full" or (verify == "auto" and mm.nbytes <= AUTO_FULL_BYTES):
        verify_content(root, index, mm, labels)
    return root, index, mm, labels


# ----------------------------------------------------------------------------
# A lazy view: rows are read (and converted) only when indexed.


class PreparedArray:
    """(n, C, H, W) float32 rows of a memmap, read and converted when indexed (``x[idx]``, like a tensor).

    ``rows`` selects and orders rows of the file (a split); ``pad_to`` pads with -1 after conversion
    (as ``pad_images``); ``mean``/``std`` (latents) normalise per channel. ``raw(idx)`` gives the rows
    as stored (uint8 or float16) for a transfer to the device, ``convert(raw)`` converts them there.
    """

    def __init__(self, path: Path, *, rows: np.ndarray | None = None, pad_to: int = 0,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        self.path, self.pad_to, self.mean, self.std = Path(path), pad_to, mean, std
        self._mm = None
        mm = self.memmap()
        self.file_shape, self.stored_dtype = tuple(mm.shape), mm.dtype
        self.rows = np.arange(mm.shape[0], dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        c, h, w = self.file_shape[1:]
        if pad_to and pad_to < max(h, w):
            raise DataError(f"data.pad_to={pad_to} is smaller than the images ({h}x{w}); use 0 or >= {max(h, w)}")
        side = (pad_to, pad_to) if pad_to else (h, w)
        self.shape = torch.Size((len(self.rows), c, *side))
        self.dtype = torch.float32

    def memmap(self) -> np.memmap:
        if self._mm is None:  # opened lazily, so that DataLoader workers each map the file themselves
            self._mm = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return self._mm

    def __getstate__(self):
        return {**self.__dict__, "_mm": None}

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return 4

    def _file_rows(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            return self.rows[idx]
        idx = idx.cpu().numpy() if torch.is_tensor(idx) else np.asarray(idx)
        if idx.dtype == bool:
            return self.rows[idx]
        return self.rows[idx.astype(np.int64).reshape(-1)]

    def select_rows(self, idx) -> PreparedArray:
        """A view of the rows idx (a split, a subset), still on disk."""
        out = PreparedArray.__new__(PreparedArray)
        out.__dict__.update(self.__dict__)
        out.rows = self._file_rows(idx)
        out.shape = torch.Size((len(out.rows), *self.shape[1:]))
        return out

    def padded(self, pad_to: int) -> PreparedArray:
        out = PreparedArray(self.path, rows=self.rows, pad_to=pad_to, mean=self.mean, std=self.std)
        out._mm = self._mm
        return out

    def raw(self, idx) -> torch.Tensor:
        """The stored rows idx (uint8 or float16) as a CPU tensor: one gather from the memmap."""
        rows = self._file_rows(idx)
        mm = self.memmap()
        if rows.size and rows.size == rows[-1] - rows[0] + 1 and np.all(np.diff(rows) == 1):
            out = np.array(mm[rows[0]:rows[-1] + 1])  # contiguous rows: one sequential read
        else:
            out = mm[rows]  # fancy indexing copies the rows out of the page cache
        return torch.from_numpy(np.ascontiguousarray(out))

    def convert(self, raw: torch.Tensor) -> torch.Tensor:
        """Stored rows to float32 model inputs, on raw's device (the GPU in training)."""
        if raw.dtype == torch.uint8:
            x = uint8_to_unit(raw)
        else:  # latents: z_n = (z - m_c)/s_c (iLCT Sec. 4.1), as cmkit.latent.dataset.encode_dataset
            x = raw.float()
            if self.mean is not None:
                m, s = self.mean.to(x.device), self.std.to(x.device)
                x = ((x - m[None, :, None, None]) / s[None, :, None, None]).float()
        if self.pad_to:
            h, w = x.shape[-2:]
            ph, pw = self.pad_to - h, self.pad_to - w
            x = torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=-1.0)
        return x.contiguous()

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, (int, np.integer)):
            return self.convert(self.raw([idx]))[0]
        return self.convert(self.raw(idx))

    def __iter__(self):
        raise TypeError("a PreparedArray is read by index batches (x[idx]), not iterated row by row")

    def __array__(self, *args, **kwargs):
        raise DataError(f"'{self.path}' is read batch by batch (data.name=prepared); this command needs the whole "
                        f"dataset in memory: point it at the source images (data.name=folder or array) instead")


@dataclass
class PreparedDataset(Dataset):
    """A Dataset whose x is a PreparedArray (on disk) and whose labels are an int64 tensor (in memory)."""

    root: Path | None = field(default=None, repr=False)
    index: dict = field(default_factory=dict, repr=False)

    def fingerprint(self) -> str:
        """The index's content sha256 with the selected rows and the padding (no pass over the data)."""
        h = hashlib.sha256(f"prepared:{self.index['sha256']}:{self.x.pad_to}:{tuple(self.x.shape)}".encode())
        h.update(self.x.rows.tobytes())
        if self.labels is not None:
            h.update(self.labels.cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def subset(self, idx) -> PreparedDataset:
        labels = self.labels[idx] if self.labels is not None else None
        return PreparedDataset(self.name, self.x.select_rows(idx), labels, self.kind, self.num_classes,
                               root=self.root, index=self.index)


def load_prepared(cfg) -> PreparedDataset:
    """data.name=prepared: the pixel dataset of the prepared directory data.path (checked per data.verify)."""
    if not cfg.path:
        raise DataError("data.name=prepared needs data.path=<directory written by cmkit prepare-data>")
    root, index, mm, labels = open_prepared(cfg.path, getattr(cfg, "verify", "auto"))
    if index.get("kind") != "image":
        raise DataError(f"'{root}' holds {index.get('kind')} data; data.path must be a prepared image directory "
                        f"(latents are chosen by data.vae, from its latents/ subdirectory)")
    y = torch.from_numpy(labels) if labels is not None else None
    num_classes = int(index["labels"]["num_classes"]) if labels is not None else 0
    plan = index.get("plan", {})
    # The bundled MNIST at its own size keeps its name, so evaluation picks its classifier features.
    source = plan.get("source") if isinstance(plan, dict) else None
    native_mnist = isinstance(source, dict) and source.get("source") == "mnist" and not plan.get("resolution")
    return PreparedDataset("mnist" if native_mnist else "prepared", PreparedArray(root / index["x"]["file"]), y, "image", num_classes,
                           root=root, index=index)


def is_on_disk(dataset) -> bool:
    """True when the dataset's x is a memmap view (read per batch), False for tensors in memory."""
    return isinstance(getattr(dataset, "x", None), PreparedArray)


# ----------------------------------------------------------------------------
# The batch loader of the training loop.


class _BatchReader(torch.utils.data.Dataset):
    """Map-style dataset whose keys are index tensors: one key = one rank's batch, read in one gather."""

    def __init__(self, x: PreparedArray, labels: torch.Tensor | None):
        self.x, self.labels = x, labels

    def __getitem__(self, idx: torch.Tensor):
        return self.x.raw(idx), (self.labels[idx] if self.labels is not None else torch.empty(0, dtype=torch.long))


class _IndexStream(torch.utils.data.Sampler):
    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return self.make()


class BatchLoader:
    """This rank's batches of the index stream ``indices`` read from a memmap, converted on ``device``.

    workers = 0 reads in this process; workers > 0 uses a torch DataLoader (worker processes, pinned
    memory on CUDA, prefetch). Either way the host-to-device copy of batch k+1 is issued (non_blocking)
    before batch k is returned, so on a GPU it overlaps the step that consumes batch k.
    """

    def __init__(self, dataset, indices, *, workers: int = 0, device: torch.device | str = "cpu"):
        self.x, self.device = dataset.x, torch.device(device)
        pin = self.device.type == "cuda"
        reader = _BatchReader(dataset.x, dataset.labels)
        if workers > 0:
            loader = torch.utils.data.DataLoader(reader, batch_size=None, sampler=_IndexStream(indices),
                                                 num_workers=workers, pin_memory=pin, prefetch_factor=2,
                                                 persistent_workers=False)
            self._source: Iterator = iter(loader)
        else:
            def read():
                for idx in indices():
                    raw, y = reader[idx]
                    yield (raw.pin_memory(), y.pin_memory()) if pin else (raw, y)
            self._source = read()
        # CUDA: copies run on a side stream, so the copy of batch k+1 overlaps the kernels of step k.
        self._stream = torch.cuda.Stream(self.device) if pin else None
        self._next = self._transfer(next(self._source))

    def _transfer(self, item):
        raw, y = item
        if self._stream is None:
            return raw.to(self.device), y.to(self.device)
        with torch.cuda.stream(self._stream):
            return raw.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x float32 on the device, labels or None) of the next batch; starts the copy of the one after."""
        raw, y = self._next
        if self._stream is not None:  # the compute stream waits for the copy; the allocator keeps the memory alive
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._stream)
            raw.record_stream(current)
            y.record_stream(current)
        self._next = self._transfer(next(self._source))
        return self.x.convert(raw), (y if y.numel() else None)


def check_batch_fits(dataset, batch_size: int) -> None:
    """A prepared dataset smaller than one global batch is almost surely the wrong file or split."""
    if len(dataset) < batch_size:
        root = getattr(dataset, "root", None) or getattr(getattr(dataset, "pixels", None), "root", "?")
        raise DataError(f"the prepared dataset '{root}' has {len(dataset)} samples in data.split, fewer than one "
                        f"global batch (train.batch_size={batch_size}). Lower train.batch_size, use data.split=all, "
                        f"or point data.path at the full dataset")


def loader_workers(cfg) -> int:
    w = int(getattr(cfg, "loader_workers", 0))
    if w < 0:
        raise DataError(f"data.loader_workers={w} is negative. Use 0 (read in the training process) or more")
    return w
