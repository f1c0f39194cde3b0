"""Run logging: ``log.jsonl`` (one record per logged step), TensorBoard, and a progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def _scalar(v):
    if torch.is_tensor(v):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no inf/nan; keep them readable
    return v


class RunLog:
    """Writes records on rank 0 only; every write is one host sync, so log every few steps."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True,
                 progress: bool = True, total: int = 0, initial: int = 0):
        self.enabled = enabled
        self.last: dict = {}
        self._file = open(Path(run_dir) / "log.jsonl", "a") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is an optional extra
                self._tb = None
        self._bar = None
        if enabled and progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True)

    def write(self, step: int, nimg: int, logs: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "nimg": nimg, **{k: _scalar(v) for k, v in logs.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.last = record
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "nimg"):
                    self._tb.add_scalar(k, v, nimg)
        if self._bar is not None and "sec_per_step" in record:
            sps = record["sec_per_step"]
            imgs = nimg / max(step, 1)
            loss = record.get("loss")
            self._bar.set_postfix(loss=f"{loss:.4g}" if isinstance(loss, (int, float)) else str(loss),
                                  img_s=f"{imgs / sps:.0f}" if sps else "-", refresh=False)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
