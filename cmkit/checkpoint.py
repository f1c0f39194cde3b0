"""Checkpoints: one safetensors file per save, tensors plus a JSON description; never pickle.

Nested state (module and optimiser state dicts, RNG states, progress) is flattened: tensor
leaves go into the safetensors payload, everything else into a JSON skeleton stored in the
file's metadata. Loading therefore never executes code. Writes are atomic: temporary file,
flush, fsync, rename, fsync of the directory; the last K files are kept.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not fit the config; the message says which."""


FORMAT = "cmkit-checkpoint-v1"
_NAME = re.compile(r"^ckpt-(\d{12})\.safetensors$")


# ----------------------------------------------------------------------------
# Flattening nested state into (tensors, JSON skeleton).


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "s") -> Any:
    """Return a JSON-able skeleton of obj, moving every tensor into ``tensors`` under a key."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten(v, tensors, f"{prefix}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [flatten(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__tuple__": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix}")


def unflatten(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of flatten."""
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__dict__" in skel:
            return {k: unflatten(v, tensors) for k, v in skel["__dict__"]}
        if "__tuple__" in skel:
            return tuple(unflatten(v, tensors) for v in skel["__tuple__"])
        raise CheckpointError(f"unexpected entry in checkpoint skeleton: {sorted(skel)}")
    if isinstance(skel, list):
        return [unflatten(v, tensors) for v in skel]
    return skel


# ----------------------------------------------------------------------------
# Files.


def checkpoint_path(directory: Path, nimg: int) -> Path:
    return Path(directory) / f"ckpt-{nimg:012d}.safetensors"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in a directory, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path so that a crash at any moment leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def save_checkpoint(directory: Path, nimg: int, state: dict, meta: dict, keep: int = 3) -> Path:
    """Save state (nested dicts of tensors and scalars) atomically; prune to the last ``keep`` files."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    header = {"format": FORMAT, "meta": meta, "state": skeleton}
    data = st_save(tensors, metadata={"cmkit": json.dumps(header)})
    path = checkpoint_path(directory, nimg)
    atomic_write_bytes(path, data)
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def keep_milestone(path: Path) -> Path:
    """Keep a saved checkpoint forever in ``milestones/`` beside it (a hard link, else an atomic copy)."""
    path = Path(path)
    target = path.parent / "milestones" / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        try:
            os.link(path, target)  # atomic, no extra disk space
        except OSError:
            atomic_write_bytes(target, path.read_bytes())
    return target


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete the ``.ckpt-*.tmp`` files a process killed during a save leaves behind; return them."""
    directory = Path(directory)
    stale = sorted(directory.glob(".ckpt-*.tmp")) if directory.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """Load (state, meta) from one checkpoint file; raise CheckpointError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    raw = path.read_bytes()
    try:
        tensors = st_load(raw)
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        info = json.loads(header.get("__metadata__", {}).get("cmkit", "null"))
    except (SafetensorError, ValueError, UnicodeDecodeError, OverflowError) as e:
        raise CheckpointError(
            f"'{path}' is not a readable cmkit checkpoint ({e}). It may be truncated or from another tool; "
            f"delete it to resume from the previous checkpoint."
        ) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is a safetensors file but not a cmkit checkpoint ({FORMAT})")
    return unflatten(info["state"], tensors), info.get("meta", {})


def latest_checkpoint(directory: Path) -> tuple[Path, dict, dict] | None:
    """The newest readable checkpoint as (path, state, meta); unreadable newer ones are skipped."""
    errors = []
    for path in reversed(list_checkpoints(directory)):
        try:
            state, meta = read_checkpoint(path)
            if errors:
                print(f"cmkit: warning: skipped unreadable checkpoint(s): {'; '.join(errors)}")
            return path, state, meta
        except CheckpointError as e:
            errors.append(str(e))
    if errors:
        raise CheckpointError("no readable checkpoint in " + str(directory) + ": " + "; ".join(errors))
    return None
