"""FD (or any logged metric) versus images seen, for several runs in one PNG (``cmkit plot``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from cmkit.config import ConfigError


def read_curve(run_dir: str | Path, key: str) -> tuple[list[int], list[float]]:
    """(nimg, value) of every log.jsonl record of run_dir that holds ``key`` (e.g. "eval/fd_1step")."""
    log = Path(run_dir) / "log.jsonl"
    if not log.is_file():
        raise ConfigError(f"'{run_dir}' has no log.jsonl; is it a run directory?")
    nimg, values = [], []
    for line in log.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by a crash
        v = record.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            nimg.append(int(record["nimg"]))
            values.append(float(v))
    return nimg, values


def logged_eval_keys(run_dir: str | Path) -> list[str]:
    keys: set[str] = set()
    log = Path(run_dir) / "log.jsonl"
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            keys |= {k for k in json.loads(line) if k.startswith("eval/")}
        except json.JSONDecodeError:
            pass
    return sorted(keys)


def plot_curves(runs: list[str | Path], out: str | Path, metric: str = "fd", steps: list[int] | None = None,
                labels: list[str] | None = None, logy: bool = False, title: str | None = None) -> Path:
    """One line per (run, step count) of eval/<metric>_<K>step against images seen; written to out (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("cmkit plot needs matplotlib: pip install -c constraints.txt 'cmkit[plot]'") from None
    steps = steps or [1, 2]
    labels = labels or [Path(r).name for r in runs]
    if len(labels) != len(runs):
        raise ConfigError(f"--labels gives {len(labels)} names for {len(runs)} runs")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    drawn = 0
    styles = ["-", "--", ":", "-."]
    for i, (run, label) in enumerate(zip(runs, labels)):
        colour = f"C{i % 10}"
        for j, k in enumerate(steps):
            nimg, values = read_curve(run, f"eval/{metric}_{k}step")
            if nimg:
                ax.plot(nimg, values, styles[j % len(styles)], color=colour, marker="o", markersize=3,
                        label=f"{label}, {k}-step")
                drawn += 1
    if drawn == 0:
        found = sorted({k for r in runs for k in logged_eval_keys(r)})
        raise ConfigError(
            f"no eval/{metric}_<K>step values for steps {steps} in the logs of {', '.join(map(str, runs))}"
            + (f" (logged: {', '.join(found)})" if found else
               "; train with eval.every_nimg=M to evaluate every M images")
        )
    ax.set_xlabel("images seen")
    ax.set_ylabel(metric)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{metric} vs images seen")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
