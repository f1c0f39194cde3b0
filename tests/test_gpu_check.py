"""benchmarks/gpu_check.py --dry-run runs every stage at toy size on CPU and writes the table (issue 18)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_stage(tmp_path):
    res = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks/gpu_check.py"), "--dry-run",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["env", "methods", "attention (JVP, float32; errors against float64 math)",
                            "tf32 in the sCT tangent pass", "variants (sCT, bf16)", "sample"]
    methods = {(r["method"], r["precision"]): r for r in stages["methods"]}
    for m in ("ct", "ict", "sct", "scd", "act", "cmgan"):
        for p in ("fp32", "bf16"):
            assert methods[(m, p)]["status"] == "ok" and methods[(m, p)]["images_per_s"] > 0
    assert methods[("scd", "fp16")]["status"].startswith("n/a on CPU")  # said, not skipped
    assert methods[("sct", "fp32")]["passes_per_step"] == 2  # the JVP pass and the student pass
    kernels = {(r["N"], r["kernel"]): r for r in stages["attention (JVP, float32; errors against float64 math)"]}
    for N in (16, 64):
        assert kernels[(N, "blockwise")]["tangent_rel_err"] < 1e-5
        assert "status" in kernels[(N, "flash_jvp")]  # a row even where the kernel cannot run
    assert all(r["status"] == "ok" for r in stages["variants (sCT, bf16)"])
    assert stages["sample"][0]["status"] == "ok"
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| sct | bf16 |" in md and "sCT step ÷ iCT step (fp32)" in md and "failures: 0" in md


def test_gpu_check_refuses_cpu_without_dry_run(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path)]) == 2
