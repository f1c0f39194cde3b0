"""train.time_budget_s: a run's length fitted to a wall-clock budget, then exactly a run of that many steps."""

import pytest
import torch
import yaml

from cmkit.cli import main
from cmkit.config import ConfigError, load_config
from cmkit.demo_summary import summarize
from cmkit.train import PROBE_STEPS, steps_for_budget, train
from test_train import TINY, _params, _walk


def test_steps_for_budget_closed_form():
    assert steps_for_budget(3600, 400.0, 0.3) == 1333  # floor(400 / 0.3) = floor(1333.3)
    assert steps_for_budget(3600, 400.0, 0.1) == 3600  # 4000 would fit: capped at train.steps
    assert steps_for_budget(3600, 0.01, 2.0) == 1  # not even one step fits: one step, never zero


def _steps_in(run_dir):
    return yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"]


def test_budgeted_run_equals_a_run_of_its_steps_and_resume_keeps_them(tmp_path, capsys):
    base = ["configs/ict_toy.yaml", *TINY]
    budgeted = load_config(base[0], base[1:] + ["train.steps=100000", "train.time_budget_s=0.2",
                                                f"run.dir={tmp_path / 'a'}"])
    train(budgeted)
    err = capsys.readouterr().err
    n = _steps_in(tmp_path / "a")
    assert 1 <= n < 100000 and f"median of {PROBE_STEPS} probe steps" in err and f"trains {n} of" in err
    assert _params(tmp_path / "a")["progress"]["step"] == n
    assert f"fitted to train.time_budget_s=0.2 on this machine: {n} steps" in summarize(tmp_path / "a")

    # the same training as a plain run of n steps: the probe's random draws and steps leave no trace
    plain = load_config(base[0], base[1:] + [f"train.steps={n}", f"run.dir={tmp_path / 'b'}"])
    train(plain)
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    for part in ("objective", "ema"):
        flat_a, flat_b = dict(_walk(a[part])), dict(_walk(b[part]))
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), k

    # re-running the same command resumes the finished run: no new probe, the recorded length stands
    train(budgeted)
    assert "probe steps" not in capsys.readouterr().err
    assert _steps_in(tmp_path / "a") == n and _params(tmp_path / "a")["progress"]["step"] == n

    # a different budget on a resume is refused with the fix, before anything is written
    before = (tmp_path / "a" / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match="train.time_budget_s=0 and train.steps=N"):
        train(load_config(base[0], base[1:] + ["train.steps=100000", "train.time_budget_s=5",
                                              f"run.dir={tmp_path / 'a'}"]))
    assert (tmp_path / "a" / "config.yaml").read_bytes() == before
    # budget 0 with explicit steps extends it (train.steps may change on a resume)
    train(load_config(base[0], base[1:] + [f"train.steps={n + 2}", f"run.dir={tmp_path / 'a'}"]))
    assert _params(tmp_path / "a")["progress"]["step"] == n + 2


def test_resume_of_an_interrupted_budgeted_run_keeps_its_steps(tmp_path, capsys):
    args = ["configs/ict_toy.yaml", *TINY, "train.steps=100000", "train.time_budget_s=0.2", f"run.dir={tmp_path}"]
    cfg = load_config(args[0], args[1:])
    train(cfg, stop_after=2)
    n = _steps_in(tmp_path)
    capsys.readouterr()
    train(cfg)
    assert "probe steps" not in capsys.readouterr().err
    assert _params(tmp_path)["progress"]["step"] == n


def test_cli_summary_says_the_length_is_a_cap(tmp_path):
    from cmkit.cli import config_summary

    cfg = load_config("configs/ict_mnist_demo.yaml")
    assert "up to 3600 steps (as many as fit train.time_budget_s=400) x batch 32" in config_summary(cfg)


@pytest.mark.parametrize("value", ["-1", "inf", "nan"])
def test_bad_budget_exits_2_naming_the_key(tmp_path, capsys, value):
    rc = main(["train", "configs/ict_toy.yaml", *TINY, f"train.time_budget_s={value}", f"run.dir={tmp_path / 'r'}"])
    assert rc == 2 and "train.time_budget_s" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
