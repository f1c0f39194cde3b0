"""The run directory: refuse one that holds a different run, move an old run aside (--force), write config.yaml."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import yaml

from cmkit.checkpoint import CheckpointError, atomic_write_bytes, latest_checkpoint, remove_temporaries
from cmkit.config import Config, ConfigError

# Keys that may differ between a run directory's config and a resumed run's config.
RESUMABLE_SECTIONS = ("run", "eval")
RESUMABLE_KEYS = {("train", "steps"), ("train", "device"), ("train", "threads"), ("data", "cache_dir"),
                  ("data", "workers"),
                  ("train", "precision"), ("train", "compile"), ("train", "accumulate"), ("train", "grad_clip"),
                  ("train", "max_bad_steps"), ("train", "spike_factor"),
                  ("train", "time_budget_s")}  # only a fresh run applies it (cmkit.train.fit_to_budget)



def config_differences(a: dict, b: dict) -> list[str]:
    """Keys whose values differ between two config dicts, ignoring those a resume may change.

    Resolved configs hold every key, so a key on one side only was added to cmkit after the other
    was written; new options default to the old behaviour, so such a key is not a difference.
    """
    diffs = []
    for section in sorted(set(a) | set(b)):
        if section in RESUMABLE_SECTIONS:
            continue
        sa, sb = a.get(section) or {}, b.get(section) or {}
        for key in sorted(set(sa) | set(sb)):
            if key not in sa or key not in sb:
                continue
            if (section, key) not in RESUMABLE_KEYS and sa[key] != sb[key]:
                diffs.append(f"{section}.{key}: {sa.get(key)!r} -> {sb.get(key)!r}")
    return diffs


REPLACED_PREFIX = ".replaced-"  # --force moves an old run's files into RUN/.replaced-<time>/
RUN_MARKERS = ("config.yaml", "checkpoints", "log.jsonl")  # a directory holding any of these holds a run


def _force_hint(run_dir: Path) -> str:
    return f"pass --force to start over there (the old files are moved to {run_dir / (REPLACED_PREFIX + '<time>')})"


def _refuse(run_dir: Path, what: str, diffs: list[str]) -> None:
    if diffs:
        raise ConfigError(f"run directory '{run_dir}' holds a different run ({what}); differing keys: "
                          + "; ".join(diffs) + ". Choose another run.dir, resume with the same config, or "
                          + _force_hint(run_dir) + ".")


def check_same_run(run_dir: Path, cfg: Config) -> None:
    """Refuse a run directory whose checkpoint or config.yaml holds a config that differs from cfg."""
    new = yaml.safe_load(cfg.to_yaml())  # the form config.yaml holds
    if (run_dir / "checkpoints").is_dir():
        try:
            old = latest_checkpoint(run_dir / "checkpoints")
        except CheckpointError as e:
            raise CheckpointError(f"{e}. Restore a checkpoint there, choose another run.dir, or "
                                  + _force_hint(run_dir)) from None
        if old is not None:  # the checkpoint carries the config: an unreadable config.yaml beside it is rewritten
            _refuse(run_dir, f"checkpoint {old[0].name}", config_differences(old[2].get("config", {}), new))
            return
    path = run_dir / "config.yaml"
    if path.is_file():  # e.g. a run killed before its first checkpoint
        try:
            text = path.read_text()
            saved = yaml.safe_load(text)
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            text, saved = "x", None
        if not text.strip():  # a disk that filled up while the first config.yaml was written: nothing to keep
            print(f"cmkit: {path} is empty (a run interrupted while writing it); writing it again", file=sys.stderr)
            return
        if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
            raise ConfigError(f"run directory '{run_dir}' holds a config.yaml that is not a cmkit config. Choose "
                              f"another run.dir, or " + _force_hint(run_dir) + ".")
        _refuse(run_dir, "its config.yaml", config_differences(saved, new))


def stored_config(run_dir: Path) -> dict | None:
    """The config of the run in run_dir as a dict (its newest readable checkpoint's, else config.yaml's), or None
    where there is none or it cannot be read (check_same_run then says why)."""
    try:
        found = latest_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    except CheckpointError:
        return None
    if found is not None:
        return found[2].get("config") or None
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return None
    return saved if isinstance(saved, dict) and all(isinstance(v, dict) for v in saved.values()) else None


def move_old_run(run_dir: Path) -> Path | None:
    """--force: move everything a previous run left in run_dir into run_dir/.replaced-<time>/; nothing is deleted."""
    if not any((run_dir / m).exists() for m in RUN_MARKERS):
        return None
    old = [p for p in run_dir.iterdir() if not p.name.startswith(REPLACED_PREFIX)]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = run_dir / f"{REPLACED_PREFIX}{stamp}", 1
    while dest.exists():
        dest, n = run_dir / f"{REPLACED_PREFIX}{stamp}-{n}", n + 1
    dest.mkdir()
    for p in old:
        p.rename(dest / p.name)
    return dest


def prepare_run_dir(run_dir: Path, cfg: Config, force: bool) -> None:
    """Refuse a run directory holding a different run, unless force (then move the old run aside); write config.yaml.

    Called only once the config, data and networks are known to be valid, so a bad command
    never touches an existing run's files.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir='{run_dir}' is a file, not a directory. Choose another run.dir "
                          f"(e.g. run.dir={run_dir}_run) or move the file away")
    if force:
        moved = move_old_run(run_dir)  # without reading its checkpoints: they may all be corrupt
        if moved is not None:
            print(f"cmkit: --force: moved the previous run's files to {moved}", file=sys.stderr)
    else:
        check_same_run(run_dir, cfg)
    for p in remove_temporaries(run_dir / "checkpoints"):
        print(f"cmkit: removed {p.name}, left by a process killed during a save", file=sys.stderr)
    for p in remove_temporaries(run_dir, ".config.yaml.*.tmp"):
        print(f"cmkit: removed {p.name}, left by a process killed while writing config.yaml", file=sys.stderr)
    write_config(run_dir, cfg)


def write_config(run_dir: Path, cfg: Config) -> Path:
    """RUN/config.yaml, atomically (a full disk leaves the old file or none, never a truncated one).

    A failure names the path: OSError with filename set (cmkit's CLI prints it with the fix).
    """
    path = run_dir / "config.yaml"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, cfg.to_yaml().encode())
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    return path
