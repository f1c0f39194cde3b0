"""Run logging: ``log.jsonl`` (one record per logged step), TensorBoard, and a progress bar.

A resumed run continues ``log.jsonl`` from its checkpoint's step: records past it (written by the
job that was killed after its last checkpoint) are dropped, so each step appears once. A full disk
never stops training from here: a failed log write or TensorBoard writer says so once and goes on.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from pathlib import Path

import torch


def _scalar(v):
    if torch.is_tensor(v):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no inf/nan; keep them readable
    return v


def truncate_log(path: Path, step: int) -> int:
    """Drop the records of ``path`` past ``step`` (and a torn last line); return how many were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    from cmkit.checkpoint import atomic_write_bytes

    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and int(record.get("step", 0)) <= step
        except (ValueError, TypeError):
            ok = False  # a line torn by a kill or a full disk
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
    return dropped


def _is_tensorboard_thread(thread) -> bool:
    return type(thread).__name__ == "_AsyncWriterThread"  # tensorboard's event-file writer thread


class RunLog:
    """Writes records on rank 0 only; every write is one host sync, so log every few steps.

    ``initial`` is the step the run starts (resumes) from: log.jsonl keeps only the records up to it.
    """

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True,
                 progress: bool = True, total: int = 0, initial: int = 0):
        self.enabled = enabled
        self.last: dict = {}
        self.run_dir = Path(run_dir)
        self._path = self.run_dir / "log.jsonl"
        self._file = None
        self._warned: set[str] = set()
        self._hook = None
        self._bar = None
        if enabled:
            dropped = truncate_log(self._path, initial)
            if dropped:
                self.note(f"cmkit: log.jsonl: dropped {dropped} record(s) past step {initial}, the checkpoint this "
                          f"run resumes from")
            self._file = open(self._path, "a")
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                SummaryWriter = None
            if SummaryWriter is not None:
                self._install_thread_hook()
                try:
                    self._tb = SummaryWriter(str(self.run_dir / "tb"))
                except OSError as e:
                    self._tb_failed(e)
        if enabled and progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True)

    # -- failures that must not stop training ------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.note("cmkit: warning: " + message)

    def _tb_failed(self, e: BaseException) -> None:
        self._tb = None
        self._warn_once("tb", f"TensorBoard could not write to {self.run_dir / 'tb'} ({type(e).__name__}: "
                              f"{getattr(e, 'strerror', None) or e}); TensorBoard logging is off for this job, "
                              f"log.jsonl and checkpoints go on. Free disk space and re-run to get it back.")

    def _install_thread_hook(self) -> None:
        """Report a failure of TensorBoard's writer thread (e.g. disk full) in one line instead of a traceback."""
        previous = threading.excepthook

        def hook(args):
            if _is_tensorboard_thread(args.thread):
                self._tb_failed(args.exc_value)
            else:
                previous(args)

        self._hook = (previous, hook)
        threading.excepthook = hook

    # -- writing -------------------------------------------------------------------
    def write(self, step: int, nimg: int, logs: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "nimg": nimg, **{k: _scalar(v) for k, v in logs.items()}}
        self.last = record
        self._append(json.dumps(record) + "\n")
        if self._tb is not None:
            try:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k not in ("step", "nimg"):
                        self._tb.add_scalar(k, v, nimg)
            except Exception as e:  # the writer thread failed earlier (full disk): it re-raises here
                self._tb_failed(e)
        self.show(record)

    def _append(self, line: str) -> None:
        """One record per write; a failed write (full disk) is cut back so that no torn line stays."""
        try:
            start = self._file.tell()
            self._file.write(line)
            self._file.flush()
        except OSError as e:
            try:
                self._file.seek(start)
                self._file.truncate()
            except (OSError, ValueError, UnboundLocalError):
                pass
            self._warn_once("jsonl", f"could not write {self._path} ({e.strerror or e}); records are skipped "
                                     f"until it works again, training goes on")

    def show(self, logs: dict) -> None:
        """Put the loss (and images per second, when known) on the progress bar."""
        if self._bar is None or "loss" not in logs:
            return
        loss = _scalar(logs["loss"])
        post = {"loss": f"{loss:.4g}" if isinstance(loss, (int, float)) else str(loss)}
        sps, step = logs.get("sec_per_step"), logs.get("step", 0)
        if sps:
            post["img_s"] = f"{logs.get('nimg', 0) / max(step, 1) / sps:.0f}"
        self._bar.set_postfix(post, refresh=False)

    def note(self, text: str) -> None:
        """A line on stderr that does not break the progress bar."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def retotal(self, total: int) -> None:
        """The run's length changed (train.time_budget_s re-fitted it): the progress bar counts to the new one."""
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        if self._tb is not None:
            try:
                self._tb.close()
            except Exception as e:  # a flush on a full disk
                self._tb_failed(e)
        if self._hook is not None and threading.excepthook is self._hook[1]:
            threading.excepthook = self._hook[0]
        if self._bar is not None:
            self._bar.close()
