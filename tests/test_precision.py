"""Mixed precision on CPU (issue 9): bf16 autocast trains iCT, sCT and ACT with finite losses; fp16 (loss
scaling) needs CUDA and is refused on CPU with a ConfigError."""

import json
import math

import pytest
import torch

from cmkit.config import ConfigError, load_config
from cmkit.train import train

TINY = ["net.hidden=32", "net.depth=2", "data.n=256", "train.batch_size=32", "train.steps=4", "run.log_every=1",
        "run.progress=false", "run.tensorboard=false", "run.sample_n=8", "run.sample_steps=[1]", "train.ema=[0.9]",
        "train.threads=1", "train.device=cpu"]
CONFIGS = {
    "ict": ["configs/ict_toy.yaml"],
    "sct": ["configs/sct_toy.yaml", "method.tangent_warmup=2"],
    "act": ["configs/act_toy.yaml", "method.gp_interval=2"],  # the penalty's double backward under autocast too
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_bf16_autocast_trains_with_finite_losses(tmp_path, method):
    path, *args = CONFIGS[method]
    dtypes = set()  # output dtypes of every Linear layer: autocast must really run them in bf16

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Linear) and torch.is_tensor(output):
            dtypes.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        train(load_config(path, [*args, *TINY, "train.precision=bf16", f"run.dir={tmp_path}"]))
    finally:
        handle.remove()
    assert torch.bfloat16 in dtypes
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in logs] == [1, 2, 3, 4]
    keys = [k for k in logs[0] if k == "loss" or k.endswith("/loss") or k.endswith("grad_norm")]
    assert "loss" in keys and (method != "act" or "discriminator/loss" in keys)
    for rec in logs:
        assert rec["skipped_steps"] == 0
        for k in keys:
            # RunLog writes non-finite numbers as strings
            assert isinstance(rec[k], (int, float)) and math.isfinite(rec[k]), (method, rec["step"], k, rec[k])


def test_fp16_on_cpu_is_a_config_error(tmp_path):
    cfg = load_config("configs/ict_toy.yaml", [*TINY, "train.precision=fp16", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()  # refused before the run directory was touched


def _cpu_has(monkeypatch, bf16: bool, amx: bool = False):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize("bf16, amx, chosen", [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch, bf16, amx, chosen):
    from cmkit.train import resolve_precision

    _cpu_has(monkeypatch, bf16, amx)
    cpu = torch.device("cpu")
    assert resolve_precision(load_config("configs/ict_toy.yaml", ["train.precision=auto"]), cpu).train.precision == chosen
    for given in ("fp32", "bf16"):  # an explicit choice stands on any machine
        assert resolve_precision(load_config("configs/ict_toy.yaml", [f"train.precision={given}"]), cpu).train.precision == given


def test_auto_precision_trains_as_the_precision_it_chose_and_records_it(tmp_path, monkeypatch):
    """Ground truth: a run with train.precision=auto on a (pretended) AVX512-BF16 CPU equals one with bf16 given."""
    import yaml

    from test_train import _params, _walk

    _cpu_has(monkeypatch, True)
    train(load_config("configs/ict_toy.yaml", [*TINY, "train.precision=auto", f"run.dir={tmp_path / 'auto'}"]))
    train(load_config("configs/ict_toy.yaml", [*TINY, "train.precision=bf16", f"run.dir={tmp_path / 'bf16'}"]))
    assert yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["train"]["precision"] == "bf16"
    a, b = _params(tmp_path / "auto"), _params(tmp_path / "bf16")
    for k, v in _walk(a["objective"]):
        assert torch.equal(v, dict(_walk(b["objective"]))[k]), k
    _cpu_has(monkeypatch, False)  # resuming where bf16 is not native re-chooses: the run goes on in fp32
    train(load_config("configs/ict_toy.yaml", [*TINY, "train.steps=5", "train.precision=auto",
                                               f"run.dir={tmp_path / 'auto'}"]))
    assert yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["train"]["precision"] == "fp32"
