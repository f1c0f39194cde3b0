"""Checkpoints: one safetensors file per save, tensors plus a JSON description; never pickle.

Nested state (module and optimiser state dicts, RNG states, progress) is flattened: tensor
leaves go into the safetensors payload, everything else into a JSON skeleton stored in the
file's metadata. Loading therefore never executes code, and checks every tensor's dtype, shape
and bytes against the table and digest cmkit wrote beside them. Writes are atomic: temporary file,
flush, fsync, rename, fsync of the directory; the last K files are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not fit the config; the message says which."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped, or was written by another cmkit version (shown once per message)."""


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


def unflatten(skel: Any, tensors: dict[str, torch.Tensor], where: str = "state") -> Any:
    """Inverse of flatten; a skeleton flatten cannot have written raises CheckpointError naming the entry."""
    if isinstance(skel, dict):
        if len(skel) != 1 or next(iter(skel)) not in ("__tensor__", "__dict__", "__tuple__"):
            raise CheckpointError(f"unexpected entry in checkpoint skeleton at {where}: keys {sorted(map(str, skel))}")
        tag, body = next(iter(skel.items()))
        if tag == "__tensor__":
            if not isinstance(body, str) or body not in tensors:
                raise CheckpointError(f"checkpoint skeleton at {where} names tensor {body!r}, which the file lacks")
            return tensors[body]
        if not isinstance(body, list):
            raise CheckpointError(f"checkpoint skeleton at {where}: {tag} holds a {type(body).__name__}, not a list")
        if tag == "__tuple__":
            return tuple(unflatten(v, tensors, f"{where}/{i}") for i, v in enumerate(body))
        out = {}
        for item in body:  # __dict__: [[key, value], ...]; keys are JSON scalars (int keys of optimiser state)
            pair = isinstance(item, list) and len(item) == 2
            if not pair or not (item[0] is None or isinstance(item[0], (str, int, float))):
                raise CheckpointError(f"checkpoint skeleton at {where}: entry {str(item)[:60]} is not [key, value]")
            out[item[0]] = unflatten(item[1], tensors, f"{where}/{item[0]}")
        return out
    if isinstance(skel, list):
        return [unflatten(v, tensors, f"{where}/{i}") for i, v in enumerate(skel)]
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


def fsync_dir(directory: Path) -> None:
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
    fsync_dir(path.parent)


def payload_digest(tensors: dict[str, torch.Tensor]) -> str:
    """BLAKE2b over every tensor's name, dtype, shape and bytes: a changed header dtype or a flipped bit shows."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensor_table(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """{name: [dtype, shape]} as cmkit wrote them, kept in the JSON header beside safetensors' own table."""
    return {k: [str(t.dtype).removeprefix("torch."), list(t.shape)] for k, t in tensors.items()}


def _check_payload(info: dict, tensors: dict[str, torch.Tensor]) -> str | None:
    """What differs between the tensors read and those cmkit wrote (dtype, shape, bytes), or None.

    Checkpoints written before cmkit recorded the table and digest pass unchecked.
    """
    table = info.get("tensors")
    if table is not None:
        got = tensor_table(tensors)
        if not isinstance(table, dict) or set(table) != set(got):
            return "its tensor list differs from the one cmkit wrote"
        for k in sorted(table):
            if not isinstance(table[k], list) or table[k] != got[k]:
                return (f"tensor {k} reads as {got[k][0]} {got[k][1]} but was written as "
                        f"{table[k][0]} {table[k][1]} (the file's header was changed)")
    digest = info.get("digest")
    if digest is not None and digest != payload_digest(tensors):
        return "its tensor bytes do not match the digest written with them (the file was changed or corrupted)"
    return None


def save_checkpoint(directory: Path, nimg: int, state: dict, meta: dict, keep: int = 3) -> Path:
    """Save state (nested dicts of tensors and scalars) atomically; prune to the last ``keep`` files."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    header = {"format": FORMAT, "meta": meta, "state": skeleton, "tensors": tensor_table(tensors),
              "digest": payload_digest(tensors)}
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


def remove_temporaries(directory: Path, pattern: str = ".ckpt-*.tmp") -> list[Path]:
    """Delete the ``.ckpt-*.tmp`` files (or others matching pattern) a process killed during a save leaves behind."""
    directory = Path(directory)
    stale = sorted(directory.glob(pattern)) if directory.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# Types of the meta entries cmkit writes (cmkit.train.Trainer.save); others are passed through.
META_TYPES = {"config": dict, "nimg": int, "step": int, "version": str}


def _check_meta(meta: Any) -> str | None:
    """What is wrong with a checkpoint's meta dict, or None."""
    if not isinstance(meta, dict):
        return f"its meta is a {type(meta).__name__}, not a dict"
    for key, kind in META_TYPES.items():
        if key in meta and (not isinstance(meta[key], kind) or isinstance(meta[key], bool)):
            return f"meta['{key}'] is {str(meta[key])[:40]!r}, not a {kind.__name__}"
    bad = [k for k, v in meta.get("config", {}).items() if not isinstance(v, dict)]
    if bad:
        return f"meta['config'] section(s) {', '.join(map(str, bad))} are not mappings"
    return None


def _warn_version(path: Path, meta: dict) -> None:
    from cmkit import __version__

    written = meta.get("version")
    if written is not None and written != __version__:
        warnings.warn(f"'{path}' was written by cmkit {written}, this is cmkit {__version__}; loading it anyway. "
                      f"If resuming or sampling fails, use the cmkit version that wrote it.", CheckpointWarning)


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
    except (SafetensorError, ValueError, UnicodeDecodeError, OverflowError, RecursionError, AttributeError) as e:
        raise CheckpointError(
            f"'{path}' is not a readable cmkit checkpoint ({e}). It may be truncated or from another tool; "
            f"delete it to resume from the previous checkpoint."
        ) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is a safetensors file but not a cmkit checkpoint ({FORMAT})")
    damaged = ("state" not in info and "it has no state") or _check_meta(info.get("meta", {})) \
        or _check_payload(info, tensors)
    try:
        state = None if damaged else unflatten(info["state"], tensors)
    except CheckpointError as e:
        damaged = str(e)
    except RecursionError:
        damaged = "its state skeleton is nested too deeply"
    if not damaged and not isinstance(state, dict):
        damaged = f"its state is a {type(state).__name__}, not a dict"
    if damaged:
        raise CheckpointError(f"'{path}' has the cmkit checkpoint tag but is damaged: {damaged}. "
                              f"Delete it to resume from the previous checkpoint.")
    meta = info.get("meta", {})
    _warn_version(path, meta)
    return state, meta


def latest_checkpoint(directory: Path) -> tuple[Path, dict, dict] | None:
    """The newest readable checkpoint as (path, state, meta); unreadable newer ones are skipped with a warning."""
    errors = []
    for path in reversed(list_checkpoints(directory)):
        try:
            state, meta = read_checkpoint(path)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:  # a CheckpointWarning: on stderr, once per message (a resume looks twice)
            warnings.warn(f"skipped unreadable checkpoint(s): {'; '.join(errors)}; using {path.name}",
                          CheckpointWarning)
        return path, state, meta
    if errors:
        raise CheckpointError("no readable checkpoint in " + str(directory) + ": " + "; ".join(errors))
    return None
