"""Shared pieces of the ladder benchmarks (ilct_ladder.py, ict_ladder.py): train one rung, score it
with cmkit.evaluation, and print/record the row. Not a test; imported by the scripts in this folder."""

from __future__ import annotations

import json
import time
from pathlib import Path


def train_and_score(cfg, run_dir: Path, eval_steps: list[int], n_eval: int, overrides: list[str]) -> tuple[dict, dict]:
    """Train ``cfg`` into ``run_dir`` (force), then FD/precision/recall at each of ``eval_steps``.

    Returns the ladder entry (overrides, seconds, one dict per step count) and evaluate_run's report."""
    from cmkit.evaluation import evaluate_run
    from cmkit.train import train

    start = time.perf_counter()
    train(cfg, force=True)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    report = evaluate_run(run_dir, steps=list(eval_steps), n=n_eval)
    entry = {"overrides": overrides, "train_seconds": round(seconds, 1),
             "eval_seconds": round(time.perf_counter() - start, 1)}
    for k, row in report["steps"].items():
        entry[f"{k}step"] = {m: row[m] for m in ("fd", "precision", "recall", "nfe") if m in row}
    return entry, report


def format_row(name: str, entry: dict, eval_steps: list[int], width: int = 22) -> str:
    fds = "  ".join(f"FD({k} step) {entry[f'{k}step']['fd']:8.2f} P {entry[f'{k}step']['precision']:.3f} "
                    f"R {entry[f'{k}step']['recall']:.3f}" for k in eval_steps)
    return f"{name:{width}s} {fds}  (train {entry['train_seconds']:.0f} s, eval {entry['eval_seconds']:.0f} s)"


def write_json(path: Path, obj: dict) -> None:
    """Rewrite ``path`` atomically, so that an interrupted ladder leaves the last complete summary."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    tmp.replace(path)
