"""The training loop end to end: exact resume, CLI train -> sample, learning on 2-D data."""

import json

import numpy as np
import pytest
import torch

from cmkit.cli import main
from cmkit.config import load_config
from cmkit.data import load_dataset
from cmkit.train import train
from cmkit_testutils import sliced_wasserstein

TINY = ["net.hidden=32", "net.depth=2", "train.batch_size=32", "data.n=512", "run.progress=false",
        "run.tensorboard=false", "run.sample_n=16", "train.ema=[0.9,0.99]"]


def _params(run_dir):
    from safetensors.torch import load_file  # noqa: F401  (format check below)
    from cmkit.checkpoint import latest_checkpoint

    _, state, _ = latest_checkpoint(run_dir / "checkpoints")
    return state


@pytest.mark.parametrize("method", ["ict", "ct"])
def test_resume_is_bit_exact(tmp_path, method):
    base = ["configs/ict_toy.yaml", f"method.name={method}", "net.dropout=0.2", *TINY]
    full = load_config(base[0], base[1:] + ["train.steps=6", f"run.dir={tmp_path/'a'}"])
    train(full)
    interrupted = load_config(base[0], base[1:] + ["train.steps=6", f"run.dir={tmp_path/'b'}"])
    train(interrupted, stop_after=3)
    assert _params(tmp_path / "b")["progress"]["step"] == 3
    train(interrupted)
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert a["progress"] == b["progress"] and a["progress"]["step"] == 6
    for part in ("objective", "ema"):
        flat_a = {k: v for k, v in _walk(a[part])}
        flat_b = {k: v for k, v in _walk(b[part])}
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), k
    logs = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert {"step", "nimg", "loss", "sec_per_step"} <= set(logs[-1])


def _walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def test_different_run_in_directory_is_refused(tmp_path):
    args = ["configs/ict_toy.yaml", *TINY, "train.steps=2", f"run.dir={tmp_path}"]
    train(load_config(args[0], args[1:]))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    rc = main(["train", *args, "train.lr=0.5"])
    assert rc == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_config_differences_ignore_keys_added_since():
    from cmkit.train import config_differences

    new = {"train": {"lr": 1e-3, "steps": 9}, "net": {"hidden": 32, "guidance_cond": False}, "data": {"workers": 0}}
    old = {"train": {"lr": 1e-3, "steps": 5}, "net": {"hidden": 32}, "data": {"workers": 4}}  # an older cmkit's config
    assert config_differences(old, new) == []  # steps and workers may change; guidance_cond did not exist then
    old["net"]["hidden"] = 64
    assert config_differences(old, new) == ["net.hidden: 64 -> 32"]


def test_cli_train_then_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "configs/ict_toy.yaml", *TINY, "train.steps=5", f"run.dir={run}"]) == 0
    for f in ("config.yaml", "log.jsonl", "summary.json", "samples_1step.png", "samples_2step.png"):
        assert (run / f).is_file(), f
    assert main(["sample", str(run), "--steps", "2", "--n", "10", "--out", str(tmp_path / "s.npz")]) == 0
    s = np.load(tmp_path / "s.npz")["samples"]
    assert s.shape == (10, 2) and np.isfinite(s).all()
    assert main(["sample", str(run), "--n", "9", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    assert main(["sample", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_cli_overrides_may_follow_options(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "configs/ict_toy.yaml", "--force", *TINY, "train.steps=3", f"run.dir={run}"]) == 0
    assert json.loads((run / "log.jsonl").read_text().splitlines()[-1])["step"] == 3
    with pytest.raises(SystemExit):  # an unknown option is still an error, not an override
        main(["train", "configs/ict_toy.yaml", "--forse", f"run.dir={run}"])
    assert "unrecognized arguments: --forse" in capsys.readouterr().err


@pytest.mark.slow
def test_ict_learns_eight_gaussians(tmp_path):
    # A short iCT run: one-step samples must be much closer to the data than the untrained model's.
    args = ["train.steps=1000", "train.batch_size=256", "run.progress=false", "run.tensorboard=false",
            f"run.dir={tmp_path}", "run.sample_steps=[1]", "train.ema=[0.99]"]
    cfg = load_config("configs/ict_toy.yaml", args)
    from cmkit.run import load

    data = load_dataset(cfg.data).x[:2000]
    untrained = load_config("configs/ict_toy.yaml", args[:-1] + ["train.steps=0", f"run.dir={tmp_path/'u'}"] )
    train(untrained)
    swd0 = sliced_wasserstein(load(tmp_path / "u").sample(2000, 1, data_space=False), data)
    train(cfg)
    swd1 = sliced_wasserstein(load(tmp_path).sample(2000, 1, data_space=False), data)
    swd2 = sliced_wasserstein(load(tmp_path).sample(2000, 2, data_space=False), data)
    print(f"SWD untrained {swd0:.3f}  iCT 1-step {swd1:.3f}  2-step {swd2:.3f}")
    assert swd1 < 0.25 * swd0
    assert swd2 < 0.25 * swd0
