"""Every bad input is a clear error: exit code 2, a message that names the key (or option) and the fix, and
no work done (no run directory written). One parametrised test per family of issue 19's list."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cmkit.cli import main

TOY = ["configs/ict_toy.yaml", "net.hidden=16", "net.depth=2", "data.n=256", "train.batch_size=32",
       "run.progress=false", "run.tensorboard=false", "run.sample_n=8", "run.sample_steps=[1]", "train.threads=0"]


def cli(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_clear(rc: int, err: str, *words: str) -> None:
    assert rc == 2, err
    assert "cmkit: error: " in err, err
    assert "internal error" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, f"{w!r} not in: {err}"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """A 2-step toy run (2-D points) to sample from."""
    from cmkit.configure import load_config
    from cmkit.train import train

    d = tmp_path_factory.mktemp("bad") / "toy"
    return train(load_config(TOY[0], [*TOY[1:], "train.steps=2", f"run.dir={d}"]))


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """A 2-step 8x8 digits run (a tiny U-Net) to edit with."""
    from cmkit.configure import load_config
    from cmkit.train import train

    d = tmp_path_factory.mktemp("bad") / "digits"
    cfg = load_config("configs/ict_digits.yaml", [
        "net.channels=8", "net.channel_mult=[1]", "net.attn_resolutions=[]", "train.steps=2", "train.batch_size=8",
        "run.progress=false", "run.tensorboard=false", "run.sample_n=4", "run.sample_steps=[1]", f"run.dir={d}"])
    return train(cfg)


# ----------------------------------------------------------------------------
# Config values: refused before any work (no run directory is written).


@pytest.mark.parametrize("override, key", [
    ("train.ema=[1.5]", "train.ema"),
    ("train.ema=[]", "train.ema"),
    ("train.device=tpu7", "train.device"),
    ("train.threads=-1", "train.threads"),
    ("train.betas=[0.9]", "train.betas"),
    ("run.log_every=0", "run.log_every"),
    ("run.sample_steps=[0]", "run.sample_steps"),
    ("run.sample_n=0", "run.sample_n"),
    ("run.checkpoint_every=-1", "run.checkpoint_every"),
    ("run.keep_checkpoints=-1", "run.keep_checkpoints"),
    ("run.milestone_every=-5", "run.milestone_every"),
    ("run.dir=", "run.dir"),
    ("data.n=0", "data.n"),
    ("data.pad_to=-2", "data.pad_to"),
    ("train.batch_size=10000000", "train.batch_size"),  # larger than the 256 toy points: refused, not drawn
])
def test_bad_config_values_exit_2_before_any_work(capsys, tmp_path, override, key):
    run_dir = tmp_path / "run"
    rc, err = cli(capsys, "train", *TOY, f"run.dir={run_dir}", "train.steps=2", override)
    assert_clear(rc, err, key)
    assert not run_dir.exists()


def test_batch_larger_than_the_dataset_names_its_size(capsys, tmp_path):
    rc, err = cli(capsys, "train", *TOY, f"run.dir={tmp_path / 'r'}", "train.batch_size=512")
    assert_clear(rc, err, "train.batch_size=512", "231 samples", "data.n")  # the train split of 256 points


# ----------------------------------------------------------------------------
# Files: config, data, run directory.


def _random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


@pytest.mark.parametrize("case, words", [
    ("empty_config", ["is empty", "configs/ict_toy.yaml"]),
    ("random_npz", ["data.npz", "numpy.savez"]),
    ("empty_npz", ["holds no arrays", "'x'"]),
    ("run_dir_is_a_file", ["run.dir=", "is a file"]),
])
def test_bad_files_exit_2_with_the_fix(capsys, tmp_path, case, words):
    run_dir = tmp_path / "run"
    if case == "empty_config":
        (tmp_path / "empty.yaml").write_text("")
        argv = ["train", tmp_path / "empty.yaml", f"run.dir={run_dir}"]
    elif case in ("random_npz", "empty_npz"):
        path = tmp_path / "data.npz"
        _random_bytes(path) if case == "random_npz" else np.savez(path)
        argv = ["train", *TOY, "data.name=array", f"data.path={path}", f"run.dir={run_dir}"]
    else:
        run_dir.write_text("not a directory")
        argv = ["train", *TOY, f"run.dir={run_dir}", "train.steps=1"]
    rc, err = cli(capsys, *argv)
    assert_clear(rc, err, *words)
    assert "pickle" not in err  # never advise a user to unpickle a file
    assert not (run_dir / "config.yaml").exists()


# ----------------------------------------------------------------------------
# Command-line options of train, sample and edit.


@pytest.mark.parametrize("value", ["0", "-3"])
def test_stop_after_must_be_positive(capsys, tmp_path, value):
    rc, err = cli(capsys, "train", *TOY, f"run.dir={tmp_path / 'r'}", "--stop-after", value)
    assert_clear(rc, err, "--stop-after")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("options, flag", [
    (["--steps", "0"], "--steps"),
    (["--steps", "-2"], "--steps"),
    (["--n", "0"], "--n"),
    (["--n", "-1"], "--n"),
    (["--times", "1", "80"], "must decrease strictly"),
    (["--times", "80", "-1"], "must be > 0"),
    (["--times", "1000"], "largest time"),
    (["--device", "tpu"], "--device"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA GPU")]))
def test_bad_sample_options(capsys, tmp_path, toy_run, options, flag):
    out = tmp_path / "s.png"
    rc, err = cli(capsys, "sample", toy_run, "--out", out, *options)
    assert_clear(rc, err, flag)
    assert not out.exists()


def test_sample_reports_explicit_times_as_they_are(capsys, tmp_path, toy_run):
    rc = main(["sample", str(toy_run), "--times", "80", "0.821", "--n", "4", "--out", str(tmp_path / "s.npz")])
    out = capsys.readouterr().out
    assert rc == 0 and "times 80 0.821" in out and "1-step" not in out


def _png(path: Path, value: float, shape=(8, 8)) -> Path:
    np.save(path, np.full(shape, value, np.float32))
    return path


@pytest.mark.parametrize("case, words", [
    ("mask_3", ["mask", "[0, 1]"]),
    ("input_5", ["input", "[0, 1]"]),
    ("input_nan", ["NaN"]),
    ("sigma_negative", ["--sigma", "> 0"]),
    ("sigma_missing", ["--sigma", "> 0"]),
    ("interpolate_n_0", ["--n", ">= 2"]),
    ("steps_0", ["--steps"]),
])
def test_bad_edit_inputs(capsys, tmp_path, image_run, case, words):
    good = _png(tmp_path / "good.npy", 0.5)
    argv = ["edit", image_run, "--out", tmp_path / "e.png"]
    if case == "mask_3":
        argv += ["--task", "inpaint", "--input", good, "--mask", _png(tmp_path / "m.npy", 3.0)]
    elif case == "input_5":
        argv += ["--task", "superres", "--input", _png(tmp_path / "x.npy", 5.0)]
    elif case == "input_nan":
        argv += ["--task", "superres", "--input", _png(tmp_path / "x.npy", float("nan"))]
    elif case == "sigma_negative":
        argv += ["--task", "denoise", "--input", good, "--sigma", "-1"]
    elif case == "sigma_missing":
        argv += ["--task", "denoise", "--input", good]
    elif case == "interpolate_n_0":
        argv += ["--task", "interpolate", "--n", "0"]
    else:
        argv += ["--task", "superres", "--input", good, "--steps", "0"]
    rc, err = cli(capsys, *argv)
    assert_clear(rc, err, *words)
    assert not (tmp_path / "e.png").exists()


def test_interpolate_lays_the_path_out_as_one_row(capsys, tmp_path, image_run):
    from PIL import Image

    rc = main(["edit", str(image_run), "--task", "interpolate", "--n", "8", "--out", str(tmp_path / "i.png")])
    assert rc == 0
    w, h = Image.open(tmp_path / "i.png").size
    side = 32 + 1  # 8x8 digits are drawn 4x larger (image_grid's min_size 32), plus a 1-pixel gap
    assert (w, h) == (8 * side + 1, side + 1)  # 8 cells in a row, not a 3x3 grid with an empty cell


# ----------------------------------------------------------------------------
# Ctrl-C during start-up.


@pytest.mark.parametrize("where", ["cmkit.cli.build_parser", "cmkit.configure.load_config",
                                   "cmkit.train.Trainer.__init__", "cmkit.rundir.prepare_run_dir"])
def test_ctrl_c_during_start_up_prints_no_traceback(capsys, monkeypatch, tmp_path, where):
    import importlib

    module, _, name = where.rpartition(".")
    owner = importlib.import_module(module) if not name[0].isupper() and "__" not in name else None
    if owner is None:  # a method: cmkit.train.Trainer.__init__
        module, _, cls = module.rpartition(".")
        owner = getattr(importlib.import_module(module), cls)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, name, interrupted)
    if where == "cmkit.rundir.prepare_run_dir":
        monkeypatch.setattr("cmkit.train.prepare_run_dir", interrupted)
    rc = main(["train", *TOY, f"run.dir={tmp_path / 'r'}", "train.steps=2"])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted" in err and "Traceback" not in err, err


def _toy_child(tmp_path, sigint):
    """A real `cmkit train` process whose SIGINT disposition at exec is sigint (SIG_DFL or SIG_IGN).

    Set explicitly: a test process started in the background by a non-interactive shell (a CI runner,
    `make test &`) has SIGINT = SIG_IGN, which a child inherits through exec.
    """
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cmkit", "train", *TOY, f"run.dir={tmp_path / 'r'}", "train.steps=100000"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


def _finish(p, timeout=120):
    try:
        return p.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        p.kill()
        raise


@pytest.mark.slow
def test_ctrl_c_right_after_start_in_a_real_process(tmp_path):
    # SIGINT once the config is read (the one-line summary is out): building data and networks, or the first steps.
    p = _toy_child(tmp_path, signal.SIG_DFL)
    assert p.stdout.readline().startswith("cmkit: method ict")
    p.send_signal(signal.SIGINT)
    err = _finish(p)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert p.returncode in (0, 130), (p.returncode, err)  # 0: stopped after a step with a checkpoint


@pytest.mark.slow
def test_a_background_job_keeps_ignoring_sigint_and_still_stops_on_sigterm(tmp_path):
    # Started with SIGINT ignored (`cmkit train ... &` from a script): Ctrl-C in that terminal is not for it,
    # at any moment; SIGTERM still gives the clean stop with a checkpoint.
    p = _toy_child(tmp_path, signal.SIG_IGN)
    assert p.stdout.readline().startswith("cmkit: method ict")
    ckpts = tmp_path / "r" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (tmp_path / "r" / "log.jsonl").is_file() and time.monotonic() < deadline:  # training has started
        time.sleep(0.05)
    for _ in range(3):
        p.send_signal(signal.SIGINT)
        time.sleep(0.3)
    assert p.poll() is None, _finish(p)  # still training
    p.send_signal(signal.SIGTERM)
    err = _finish(p)
    assert p.returncode == 0 and "SIGTERM received: stopped after step" in err and "SIGINT" not in err, err
    assert list(ckpts.glob("ckpt-*.safetensors"))


# ----------------------------------------------------------------------------
# What a new user sees.


def test_toy_samples_are_drawn_over_the_data_with_axes(toy_run):
    from PIL import Image

    img = np.asarray(Image.open(toy_run / "samples_1step.png").convert("RGB")).astype(int)
    # matplotlib (the `plot` extra): data in 0.75 grey (191), samples in tab:blue, a black frame with ticks
    grey = (np.abs(img - 191).max(-1) <= 2).sum()  # reference data points
    blue = (np.abs(img - np.array([31, 119, 180])).max(-1) <= 2).sum()  # samples
    dark = (img.max(-1) <= 40).sum()  # frame, ticks, tick labels
    assert grey > 100 and blue > 10 and dark > 4 * 300, (grey, blue, dark)


def test_progress_bar_shows_the_loss_from_the_first_step_and_the_end_is_announced(tmp_path, capsys, monkeypatch):
    from cmkit.runlog import RunLog

    shown, real_show = [], RunLog.show

    def show(self, logs):
        real_show(self, logs)
        if self._bar is not None:
            shown.append((self._bar.n, dict(self._bar.postfix and [kv.split("=") for kv in self._bar.postfix.split(", ")])))

    monkeypatch.setattr(RunLog, "show", show)
    rc, err = cli(capsys, "train", *TOY, "run.progress=true", "run.log_every=100", "train.steps=3",
                  f"run.dir={tmp_path}")
    assert rc == 0
    assert shown and shown[0][0] == 0 and "loss" in shown[0][1], shown  # step 1, long before the first record
    assert "step 3: writing the final checkpoint and samples (1-step, n=8)" in err


def test_train_threads_leaves_a_users_omp_num_threads_alone(tmp_path, capsys, monkeypatch):
    from cmkit.train import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        set_threads(2)
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        set_threads(2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from cmkit.cli import config_summary
    from cmkit.configure import load_config

    line = config_summary(load_config("configs/ict_toy.yaml"))
    assert "OMP_NUM_THREADS=1 (train.threads=2 not applied)" in line and line.count("\n") == 0
