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
    from cmkit.rundir import config_differences

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
    args = ["train.steps=500", "train.batch_size=256", "run.progress=false", "run.tensorboard=false",
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


# ----------------------------------------------------------------------------
# Run directories: --force moves an old run aside; a config.yaml alone also identifies a run.

def _files(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _cfg(run, *extra):
    return load_config("configs/ict_toy.yaml", [*TINY, f"run.dir={run}", *extra])


def test_force_moves_the_old_run_aside(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, "train.steps=4", "run.log_every=1", "run.milestone_every=2", "run.sample_every=2",
               "run.tensorboard=true"))
    old = _files(run)
    assert "checkpoints/milestones/ckpt-000000000064.safetensors" in old and "summary.json" in old
    assert main(["train", "configs/ict_toy.yaml", *TINY, f"run.dir={run}", "train.steps=2", "run.log_every=1",
                 "train.lr=0.5", "--force"]) == 0
    replaced = [p for p in run.iterdir() if p.name.startswith(".replaced-")]
    assert len(replaced) == 1
    assert _files(replaced[0]) == old  # nothing lost, byte for byte
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2]  # the new run's records only
    assert not (run / "checkpoints" / "milestones").exists()
    assert "samples/000000000128_1step.png" in old  # the old run's last grid; the new run ends at nimg 64
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["000000000064_1step.png", "000000000064_2step.png"]
    assert not (run / "tb").exists()  # TINY has run.tensorboard=false: the old run's events are aside
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert load_config(run / "config.yaml").train.lr == 0.5


def test_force_reuses_a_directory_whose_checkpoints_are_all_corrupt(tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(run, "train.steps=2"))
    for p in (run / "checkpoints").glob("ckpt-*.safetensors"):
        p.write_bytes(b"\x00" * 64)
    args = ["train", "configs/ict_toy.yaml", *TINY, f"run.dir={run}", "train.steps=2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no readable checkpoint" in err and "--force" in err
    assert main(args + ["--force"]) == 0
    assert _params(run)["progress"]["step"] == 2


def test_config_yaml_without_checkpoint_is_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(_cfg(run, "train.steps=2").to_yaml())  # killed before its first save
    before = _files(run)
    assert main(["train", "configs/ict_toy.yaml", *TINY, f"run.dir={run}", "train.steps=2", "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "holds a different run (its config.yaml)" in err and "train.lr: 0.001 -> 0.5" in err
    assert _files(run) == before
    (run / "config.yaml").write_text("- not\n- a config\n")
    assert main(["train", "configs/ict_toy.yaml", *TINY, f"run.dir={run}", "train.steps=2"]) == 2
    assert "not a cmkit config" in capsys.readouterr().err
    (run / "config.yaml").write_text(_cfg(run, "train.steps=2").to_yaml())
    assert main(["train", "configs/ict_toy.yaml", *TINY, f"run.dir={run}", "train.steps=3"]) == 0  # same run


# ----------------------------------------------------------------------------
# The divergence guard and the log keys follow the model phase, and decide across ranks.

def _trainer(config, *extra):
    from cmkit import distributed
    from cmkit.train import Trainer

    cfg = load_config(config, [*TINY, "train.batch_size=16", *extra])
    return Trainer(cfg, distributed.DistInfo(), torch.device("cpu"))


def _tensors(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method,bad", [("act", "generator_loss"), ("cmgan", "discriminator_loss")])
def test_a_bad_phase_skips_the_whole_step(monkeypatch, method, bad):
    from cmkit.objectives import METHODS

    cls = METHODS[method].objective
    original = getattr(cls, bad)

    def poisoned(self, batch, progress):
        out = original(self, batch, progress)
        if progress.k == 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(cls, bad, poisoned)
    extra = ["method.blur_sigma0=0", "method.disc_steps=1"] if method == "cmgan" else []
    t = _trainer(f"configs/{method if method == 'act' else 'ict'}_toy.yaml", f"method.name={method}", *extra)
    streams = t.streams()
    t.train_step(streams)
    before = {"model": _tensors(t.objective.model), "disc": _tensors(t.objective.discriminator),
              "ema": _tensors(t.ema.modules[0])}
    opt_steps = {k: [s["step"].item() for s in o.state_dict()["state"].values()] for k, o in t.optimizers.items()}
    t.train_step(streams)  # k = 1: one phase is non-finite
    assert t.skipped == 1
    after = {"model": _tensors(t.objective.model), "disc": _tensors(t.objective.discriminator),
             "ema": _tensors(t.ema.modules[0])}
    for part in before:
        for k in before[part]:
            assert torch.equal(before[part][k], after[part][k]), (part, k)
    assert opt_steps == {k: [s["step"].item() for s in o.state_dict()["state"].values()]
                         for k, o in t.optimizers.items()}
    t.train_step(streams)  # k = 2 steps again
    now = _tensors(t.objective.model)
    assert t.skipped == 1 and any(not torch.equal(before["model"][k], now[k]) for k in now)


def test_loss_key_and_spike_guard_follow_the_generator_phase(monkeypatch):
    # CM-GAN runs its discriminator phase first; `loss` and the spike guard must still be the generator's.
    from cmkit.objectives.cmgan import CMGAN

    gen, disc = CMGAN.generator_loss, CMGAN.discriminator_loss
    seen = []

    def generator_loss(self, batch, progress):
        out = gen(self, batch, progress)
        seen.append(float(out["loss"].detach().float().mean()))
        return out

    def discriminator_loss(self, batch, progress):
        out = disc(self, batch, progress)
        if progress.k >= 22:  # a discriminator "spike" the guard must not mistake for the model's
            out["loss"] = out["loss"] * 0 + 1e6
        return out

    monkeypatch.setattr(CMGAN, "generator_loss", generator_loss)
    monkeypatch.setattr(CMGAN, "discriminator_loss", discriminator_loss)
    t = _trainer("configs/ict_toy.yaml", "method.name=cmgan", "method.blur_sigma0=0", "method.disc_steps=1",
                 "train.spike_factor=5")
    streams = t.streams()
    for _ in range(24):
        logs = t.train_step(streams)
    assert float(logs["loss"]) == pytest.approx(seen[-1], rel=1e-6)
    assert float(logs["discriminator/loss"]) == 1e6 and "discriminator/d_loss" in logs and "d_loss" not in logs
    assert t.loss_window == pytest.approx(seen[-len(t.loss_window):], rel=1e-6)


def test_spike_is_decided_on_the_loss_of_all_ranks(monkeypatch):
    # Another rank's spiking loss must stop this rank too (else the other ranks hang in DDP): the guard
    # judges the mean over ranks. Emulate a second rank whose loss is 1000x this one's from step 25 on.
    from cmkit import train as train_module
    from cmkit.train import DivergenceError

    t = _trainer("configs/ict_toy.yaml", "train.spike_factor=50")
    calls = {"n": 0}

    def mean_of_two_ranks(x):
        calls["n"] += 1
        other = x * (1000.0 if t.step >= 24 else 1.0)
        return (x + other) / 2

    monkeypatch.setattr(train_module.distributed, "mean_across_ranks", mean_of_two_ranks)
    streams = t.streams()
    for _ in range(24):
        t.train_step(streams)
    with pytest.raises(DivergenceError, match="step 24 .*exceeds train.spike_factor=50"):
        t.train_step(streams)
    assert calls["n"] == 25


# ----------------------------------------------------------------------------
# Periodic evaluation: one Evaluator, built (and checked) before step 1.

def test_periodic_eval_builds_one_evaluator_before_step_one(tmp_path, monkeypatch):
    import cmkit.evaluation as evaluation
    from cmkit.config import ConfigError
    from cmkit.train import Trainer

    built, steps = [], []
    real_evaluator, real_step = evaluation.Evaluator, Trainer.train_step

    class Counting(real_evaluator):
        def __init__(self, *a, **k):
            built.append(len(steps))
            super().__init__(*a, **k)

    def step(self, streams):
        steps.append(self.step)
        return real_step(self, streams)

    monkeypatch.setattr(evaluation, "Evaluator", Counting)
    monkeypatch.setattr(Trainer, "train_step", step)
    ev = ["eval.every_nimg=32", "eval.n=64", "eval.steps=[1]", "train.steps=3", "run.log_every=100"]
    train(_cfg(tmp_path / "run", *ev))
    assert built == [0] and steps == [0, 1, 2]  # one Evaluator, built before the first step
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "eval/fd_1step" in r] == [1, 2, 3]
    steps.clear()
    with pytest.raises(ConfigError, match="is not a file"):
        train(_cfg(tmp_path / "bad", *ev, "eval.features=inception", f"eval.inception_weights={tmp_path}/none.pth"))
    assert steps == [] and not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------
# Signals: the first SIGINT finishes the step and checkpoints, a second one aborts at once.

@pytest.mark.parametrize("count", [1, 2])
def test_second_sigint_aborts_at_once(tmp_path, monkeypatch, count):
    import os
    import signal

    from cmkit.train import Trainer

    real_step = Trainer.train_step

    def step(self, streams):
        logs = real_step(self, streams)
        if self.step == 3:
            for _ in range(count):
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # let the handler run (at the next bytecode boundaries)
                    pass
        return logs

    monkeypatch.setattr(Trainer, "train_step", step)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cfg = _cfg(tmp_path, "train.steps=50")
        if count == 1:
            train(cfg)
            assert _params(tmp_path)["progress"]["step"] == 3  # finished the step, checkpointed
        else:
            with pytest.raises(KeyboardInterrupt):
                train(cfg)
            assert not list((tmp_path / "checkpoints").glob("ckpt-*"))  # aborted before any save
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------
# distributed.init pins each NCCL rank to its GPU; gloo on CPU is unchanged.

@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_distributed_init_pins_the_rank_to_its_gpu(monkeypatch, device):
    import torch.distributed as dist

    from cmkit import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    info = distributed.init(device)
    assert info == distributed.DistInfo(1, 2, 1)
    if device == "auto":
        assert calls == [("set_device", 1), ("init", "nccl", {"device_id": torch.device("cuda", 1)})]
    else:
        assert calls == [("init", "gloo", {})]


# ----------------------------------------------------------------------------
# Method/network combinations that cannot work are refused with the fix.

def test_impossible_combinations_are_refused(tmp_path, capsys):
    from cmkit.config import ConfigError
    from cmkit.objectives import build_objective

    with pytest.raises(ConfigError, match="net.attention=sdpa has no forward-mode AD"):
        build_objective(load_config("configs/sct_toy.yaml", [*TINY, "net.attention=sdpa"]), (2,))
    # sCT + train.compile builds: the student pass is compiled, the JVP stays eager (tests/test_scm.py)
    build_objective(load_config("configs/sct_toy.yaml", [*TINY, "train.compile=true"]), (2,))
    build_objective(load_config("configs/sct_toy.yaml", [*TINY, "method.name=ct_trigflow", "train.compile=true"]), (2,))
    with pytest.raises(ConfigError, match="net.guidance_cond=false"):
        build_objective(load_config("configs/ict_toy.yaml", [*TINY, "net.guidance_cond=true"]), (2,))
    build_objective(load_config("configs/sct_toy.yaml", [*TINY, "net.guidance_cond=true"]), (2,))
    assert main(["train", "configs/edm_toy.yaml", *TINY, f"run.dir={tmp_path}", "net.guidance_cond=true"]) == 2
    err = capsys.readouterr().err
    assert "only trained by sCD/sCT" in err and "Traceback" not in err and not tmp_path.joinpath("config.yaml").exists()


# ----------------------------------------------------------------------------
# Loop options: TensorBoard, learning-rate warm-up, gradient clipping, Adam.

def test_loop_options_tensorboard_warmup_clip_adam(tmp_path):
    run = tmp_path / "run"
    opts = ["train.optimizer=adam", "train.lr=0.001", "train.warmup_nimg=128", "train.grad_clip=0.01",
            "train.steps=6", "run.log_every=1"]
    train(_cfg(run, *opts, "run.tensorboard=true"))
    assert list((run / "tb").glob("events.out.tfevents.*"))
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # lr = lr0·min(nimg/warmup_nimg, 1) at the step's nimg = 32·(step-1): 0, 1/4, 1/2, 3/4, 1, 1 (× 1e-3)
    assert [r["lr"] for r in logs] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3], abs=1e-12)
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    groups = _params(run)["optimizers"]["model"]["param_groups"]
    assert "amsgrad" in groups[0]  # Adam's option; RAdam has none
    # Clipping: the gradients the optimiser stepped with have global norm grad_clip; the logged norm is the raw one.
    t = _trainer("configs/ict_toy.yaml", *opts)
    logs = t.train_step(t.streams())
    stepped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.objective.model.parameters()
                                                    if p.grad is not None]))
    assert logs["grad_norm"] > 0.01 and float(stepped) == pytest.approx(0.01, rel=1e-4)


@pytest.mark.slow
def test_train_compile_matches_eager(tmp_path):
    # train.compile=true compiles the backbone in place (inductor; ~40 s here): same checkpoint keys, and
    # after a few steps the same weights as the eager run to float32 rounding.
    from cmkit.checkpoint import latest_checkpoint

    base = ["net.hidden=32", "net.depth=2", "train.steps=3", "train.batch_size=32", "run.progress=false",
            "run.tensorboard=false", "run.sample_steps=[]", "train.threads=1"]
    from torch._dynamo.utils import counters

    states = {}
    for flag in ("false", "true"):
        counters.clear()
        train(load_config("configs/ict_toy.yaml", [*base, f"train.compile={flag}", f"run.dir={tmp_path / flag}"]))
        states[flag] = latest_checkpoint(tmp_path / flag / "checkpoints")[1]["objective"]
        assert (counters["stats"]["unique_graphs"] > 0) == (flag == "true")  # dynamo traced only the compiled run
    assert states["true"].keys() == states["false"].keys()
    for k, v in states["false"].items():
        torch.testing.assert_close(states["true"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert any(k.startswith("model.net.") for k in states["true"])
