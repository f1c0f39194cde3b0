"""Write RUN/summary.txt: a short human-readable account of a finished run (used by `make demo`)."""

from __future__ import annotations

import json
import sys

import yaml
from pathlib import Path


def summarize(run_dir: str | Path) -> str:
    run = Path(run_dir)
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    sec = [r["sec_per_step"] for r in records if isinstance(r.get("sec_per_step"), (int, float))]
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    budget = ((cfg or {}).get("train") or {}).get("time_budget_s") or 0
    lines = [
        f"run: {run}",
        f"length fitted to train.time_budget_s={budget:g} on this machine: {summary['steps']} steps" if budget else "",
        f"steps: {summary['steps']}   images seen: {summary['nimg']}   wall time: {summary['wall_sec']:.0f} s",
        f"median seconds per step: {sorted(sec)[len(sec) // 2]:.3f}" if sec else "",
        f"final loss: {records[-1].get('loss')}" if records else "",
    ]
    metrics = run / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        w = m.get("protocol", {}).get("guidance")
        if w is not None:
            lines.append(f"sampled with classifier-free guidance w = {w:g} (method.guidance; nfe counts both passes)")
        for k, v in m.get("steps", {}).items():
            vals = ", ".join(f"{name} {val:.4g}" for name, val in v.items() if isinstance(val, (int, float)))
            lines.append(f"{k}-step: {vals}")
    samples = sorted(p.name for p in run.glob("samples_*step.png"))
    lines.append("samples: " + ", ".join(samples))
    return "\n".join(line for line in lines if line) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m cmkit.demo_summary RUN_DIR", file=sys.stderr)
        return 2
    text = summarize(argv[0])
    (Path(argv[0]) / "summary.txt").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
