"""train.time_budget_s: a run's length fitted to a wall-clock budget, then exactly a run of that many steps."""

import pytest
import torch
import yaml

from cmkit.cli import main
from cmkit.config import ConfigError, load_config
from cmkit.demo_summary import summarize
import cmkit.train as train_module
from cmkit.train import PROBE_STEPS, PROBE_WARMUP, Trainer, refit_step, refit_steps, steps_for_budget, train
from test_train import TINY, _params, _walk


class StepClock:
    """The budget's clock, advanced by each training step (probe or run) alone: ``probe_s`` for the probe's
    steps, ``run_s`` for the run's. Powers of two keep the sums exact."""

    def __init__(self, probe_s: float, run_s: float):
        self.t, self.calls, self.probe_s, self.run_s = 0.0, 0, probe_s, run_s

    def __call__(self) -> float:
        return self.t

    def advance(self) -> None:
        self.t += self.probe_s if self.calls < PROBE_WARMUP + PROBE_STEPS else self.run_s
        self.calls += 1


def steer(monkeypatch, probe_s: float, run_s: float) -> StepClock:
    clock = StepClock(probe_s, run_s)
    step = Trainer.train_step

    def timed_step(self, streams):
        out = step(self, streams)
        clock.advance()
        return out

    monkeypatch.setattr(train_module, "_clock", clock)
    monkeypatch.setattr(Trainer, "train_step", timed_step)
    return clock


@pytest.fixture
def steady(monkeypatch):
    """Every step takes 1/64 s on the budget's clock: the probe is right, so no run re-fits its length."""
    return steer(monkeypatch, 2.0**-6, 2.0**-6)


def test_steps_for_budget_closed_form():
    assert steps_for_budget(3600, 400.0, 0.3) == 1333  # floor(400 / 0.3) = floor(1333.3)
    assert steps_for_budget(3600, 400.0, 0.1) == 3600  # 4000 would fit: capped at train.steps
    assert steps_for_budget(3600, 0.01, 2.0) == 1  # not even one step fits: one step, never zero


def assert_same_training(run_a, run_b):
    """The two runs' final networks and EMAs are bit-identical."""
    a, b = _params(run_a), _params(run_b)
    for part in ("objective", "ema"):
        flat_a, flat_b = dict(_walk(a[part])), dict(_walk(b[part]))
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), k


def _steps_in(run_dir):
    return yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"]


def test_budgeted_run_equals_a_run_of_its_steps_and_resume_keeps_them(tmp_path, capsys, steady):
    base = ["configs/ict_toy.yaml", *TINY]
    budgeted = load_config(base[0], base[1:] + ["train.steps=100000", "train.time_budget_s=0.5",
                                                f"run.dir={tmp_path / 'a'}"])
    train(budgeted)
    err = capsys.readouterr().err
    n = _steps_in(tmp_path / "a")
    assert n == 32 and "re-fits" not in err and f"median of {PROBE_STEPS} probe steps" in err and f"trains {n} of" in err
    assert _params(tmp_path / "a")["progress"]["step"] == n
    assert f"fitted to train.time_budget_s=0.5 on this machine: {n} steps" in summarize(tmp_path / "a")

    # the same training as a plain run of n steps: the probe's random draws and steps leave no trace
    plain = load_config(base[0], base[1:] + [f"train.steps={n}", f"run.dir={tmp_path / 'b'}"])
    train(plain)
    assert_same_training(tmp_path / "a", tmp_path / "b")

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


def test_resume_of_an_interrupted_budgeted_run_keeps_its_steps(tmp_path, capsys, steady):
    args = ["configs/ict_toy.yaml", *TINY, "train.steps=100000", "train.time_budget_s=0.5", f"run.dir={tmp_path}"]
    cfg = load_config(args[0], args[1:])
    train(cfg, stop_after=2)
    n = _steps_in(tmp_path)
    capsys.readouterr()
    train(cfg)
    assert "probe steps" not in capsys.readouterr().err
    assert _params(tmp_path)["progress"]["step"] == n


def test_refit_closed_form():
    assert refit_step(3111) == 312 and refit_step(64) == PROBE_STEPS  # 10% in, but never inside the probe's count
    assert refit_step(PROBE_STEPS) is None  # too short to re-time itself
    # 12 steps took 0.375 s of a 1 s budget: the other 0.625 s buy 20 more steps at 1/32 s
    assert refit_steps(64, 100000, 1.0, 12, 0.375) == 32
    assert refit_steps(64, 40, 0.5, 12, 0.0625) == 40  # twice as fast as probed: 96 would fit, capped at train.steps
    assert refit_steps(64, 100000, 1.0, 12, 12 * 0.0161) == 64  # 62 fit: within 5% of the probed 64, kept
    assert refit_steps(64, 100000, 1.0, 12, 2.0) == 13  # the budget is spent already: one more step, never fewer


def test_a_run_slower_than_its_probe_refits_once_and_equals_stop_and_resume(tmp_path, capsys, monkeypatch):
    """Probed at 1/64 s a step (1 s buys 64 steps), run at 1/32 s: at step 12 the run re-fits to 32 steps.
    Ground truth: a plain 64-step run stopped at step 12 and resumed with train.steps=32, the same by hand."""
    clock = steer(monkeypatch, 2.0**-6, 2.0**-5)
    base = ["configs/ict_toy.yaml", *TINY, "train.lr_decay=cosine"]
    budgeted = load_config(base[0], base[1:] + ["train.steps=100000", "train.time_budget_s=1",
                                                f"run.dir={tmp_path / 'a'}"])
    train(budgeted)
    err = capsys.readouterr().err
    assert "trains 64 of train.steps=100000" in err
    assert "its first 12 steps took 0.031 s a step, so this run re-fits its length from 64 to 32 steps" in err
    assert _steps_in(tmp_path / "a") == 32 and _params(tmp_path / "a")["progress"]["step"] == 32
    assert clock.t == pytest.approx((PROBE_WARMUP + PROBE_STEPS) / 64 + 32 / 32)  # the loop kept to the budget

    plain = ["train.time_budget_s=0", f"run.dir={tmp_path / 'b'}"]
    train(load_config(base[0], base[1:] + ["train.steps=64", *plain]), stop_after=12)
    train(load_config(base[0], base[1:] + ["train.steps=32", *plain]))
    assert_same_training(tmp_path / "a", tmp_path / "b")
    # a schedule that spans the length really changed at the re-fit: the plain 64-step run ends elsewhere
    train(load_config(base[0], base[1:] + ["train.steps=64", "train.time_budget_s=0", f"run.dir={tmp_path / 'c'}"]),
          stop_after=32)
    a, c = _params(tmp_path / "a"), _params(tmp_path / "c")
    assert c["progress"]["step"] == 32
    assert any(not torch.equal(v, dict(_walk(a["ema"]))[k]) for k, v in _walk(c["ema"]))


def test_resume_after_a_refit_keeps_the_refitted_length(tmp_path, capsys, monkeypatch):
    steer(monkeypatch, 2.0**-6, 2.0**-5)
    cfg = load_config("configs/ict_toy.yaml", [*TINY, "train.steps=100000", "train.time_budget_s=1",
                                               f"run.dir={tmp_path}"])
    train(cfg, stop_after=20)  # past the re-fit at step 12
    assert _steps_in(tmp_path) == 32 and _params(tmp_path)["progress"]["step"] == 20
    capsys.readouterr()
    train(cfg)
    err = capsys.readouterr().err
    assert "probe steps" not in err and "re-fits" not in err
    assert _params(tmp_path)["progress"]["step"] == 32


def test_cli_summary_says_the_length_is_a_cap(tmp_path):
    from cmkit.cli import config_summary

    cfg = load_config("configs/ict_mnist_demo.yaml")
    assert "up to 6000 steps (as many as fit train.time_budget_s=400) x batch 32" in config_summary(cfg)


@pytest.mark.parametrize("value", ["-1", "inf", "nan"])
def test_bad_budget_exits_2_naming_the_key(tmp_path, capsys, value):
    rc = main(["train", "configs/ict_toy.yaml", *TINY, f"train.time_budget_s={value}", f"run.dir={tmp_path / 'r'}"])
    assert rc == 2 and "train.time_budget_s" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
