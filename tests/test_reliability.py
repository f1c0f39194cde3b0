"""Reliability: divergence guard, disk full, milestones, kill -9, SIGTERM, bad inputs, safe loading, fuzzing."""

import errno
import hashlib
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cmkit.checkpoint as ckpt
from cmkit.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from cmkit.cli import build_parser, main
from cmkit.config import ConfigError, from_dict, load_config, parse_overrides
from cmkit.data import DataError, load_dataset
from cmkit.objectives.consistency import ConsistencyTraining
from cmkit.train import DivergenceError, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["configs/ict_toy.yaml", "net.hidden=32", "net.depth=2", "train.batch_size=32", "data.n=512",
        "run.progress=false", "run.tensorboard=false", "run.sample_n=8", "run.sample_steps=[1]", "train.ema=[0.9]",
        "net.dropout=0.1", "run.log_every=1"]


def cfg(tmp, *extra):
    return load_config(TINY[0], TINY[1:] + [f"run.dir={tmp}", *extra])


def _state_tensors(state):
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            elif torch.is_tensor(v):
                out[prefix + str(k)] = v
    walk({"objective": state["objective"], "ema": state["ema"], "optimizers": state["optimizers"]}, "")
    return out


def assert_same_state(a, b):
    ta, tb = _state_tensors(a), _state_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert a["progress"]["nimg"] == b["progress"]["nimg"]


# ----------------------------------------------------------------------------
# Divergence guard.


def _inject(monkeypatch, nan_loss=(), nan_grad=(), scale=None):
    """Make CT's loss NaN at the given k, or its gradients NaN (finite loss), or scaled by scale(k)."""
    original = ConsistencyTraining.loss

    def loss(self, batch, progress):
        out = original(self, batch, progress)
        if progress.k in nan_loss:
            out["loss"] = out["loss"] * float("nan")
        if progress.k in nan_grad:
            p = next(self.model.parameters())
            out["loss"] = out["loss"] + (p * 0).sum()
            handle = []

            def poison(g):
                handle[0].remove()  # one backward only
                return torch.full_like(g, float("nan"))
            handle.append(p.register_hook(poison))
        if scale is not None:
            out["loss"] = out["loss"] * scale(progress.k)
        return out

    monkeypatch.setattr(ConsistencyTraining, "loss", loss)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    clean = cfg(tmp_path / "clean", "train.steps=2")
    train(clean)
    _, before, _ = latest_checkpoint(tmp_path / "clean" / "checkpoints")
    _inject(monkeypatch, nan_loss={2}, nan_grad={3})
    run = cfg(tmp_path / "run", "train.steps=4")
    train(run)
    _, after, _ = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert after["progress"]["skipped"] == 2 and after["progress"]["bad_streak"] == 2
    # Steps 2 and 3 were skipped entirely: weights, EMA and optimiser state equal those after step 2.
    for k, v in _state_tensors(before).items():
        assert torch.equal(v, _state_tensors(after)[k]), k
    import json

    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in logs] == [0, 0, 1, 2]
    assert logs[2]["loss"] == "nan" and logs[3]["grad_norm"] == "nan"


def test_consecutive_bad_steps_stop_with_message(tmp_path, monkeypatch, capsys):
    _inject(monkeypatch, nan_loss=set(range(3, 100)))
    args = ["train", *TINY, f"run.dir={tmp_path}", "train.steps=20", "run.checkpoint_every=2", "train.max_bad_steps=3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "diverged at step 6" in err and "3 consecutive steps" in err
    # Skipped steps leave the weights untouched, so step 4's checkpoint (128 images) is still a good one.
    assert "last good checkpoint is " in err and "ckpt-000000000128.safetensors" in err
    assert "train.lr" in err and "tangent_norm" in err and "Traceback" not in err
    assert latest_checkpoint(tmp_path / "checkpoints")[2]["step"] == 4


def test_loss_spike_stops_before_the_step(tmp_path, monkeypatch):
    _inject(monkeypatch, scale=lambda k: 1e6 if k == 25 else 1.0)
    with pytest.raises(DivergenceError, match=r"step 25 .*exceeds train.spike_factor=50"):
        train(cfg(tmp_path, "train.steps=27", "train.spike_factor=50", "run.checkpoint_every=10"))
    with pytest.raises(ConfigError, match="spike_factor"):
        cfg(tmp_path, "train.spike_factor=-1")


# ----------------------------------------------------------------------------
# Disk full, milestones, safe loading.


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch, capsys):
    real_fdopen = os.fdopen
    calls = {"n": 0}

    def fdopen(fd, *a, **k):  # the second and later checkpoint writes run out of space half-way
        f = real_fdopen(fd, *a, **k)
        calls["n"] += 1
        if calls["n"] >= 3:  # write 1 is config.yaml (atomic too), write 2 the first checkpoint
            def write(data, f=f):
                f.buffer.write(data[: len(data) // 2]) if hasattr(f, "buffer") else real_write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_write = f.write
            f.write = write
        return f

    monkeypatch.setattr(ckpt.os, "fdopen", fdopen)
    rc = main(["train", *TINY, f"run.dir={tmp_path}", "train.steps=6", "run.checkpoint_every=2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "warning: could not write the checkpoint of step 4" in err and "training continues" in err
    assert "No space left on device" in err and "ckpt-000000000064.safetensors is intact" in err
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt-000000000064.safetensors"]
    assert latest_checkpoint(tmp_path / "checkpoints")[2]["step"] == 2
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))


def test_milestones_survive_pruning(tmp_path):
    train(cfg(tmp_path, "train.steps=6", "run.checkpoint_every=1", "run.keep_checkpoints=1", "run.milestone_every=2"))
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt-000000000192.safetensors"]
    miles = sorted(p.name for p in (tmp_path / "checkpoints" / "milestones").iterdir())
    assert miles == [f"ckpt-{n:012d}.safetensors" for n in (64, 128, 192)]
    ckpt.read_checkpoint(tmp_path / "checkpoints" / "milestones" / miles[0])


class Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_checkpoint_never_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    evil = tmp_path / "run" / "checkpoints" / "ckpt-000000000001.safetensors"
    evil.write_bytes(pickle.dumps({"state": Boom()}))
    torch.save({"x": Boom()}, tmp_path / "evil.pt")
    assert main(["sample", str(tmp_path / "run"), "--out", str(tmp_path / "s.png")]) == 2
    assert main(["sample", str(tmp_path / "run"), "--checkpoint", str(tmp_path / "evil.pt"),
                 "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert "not a readable cmkit checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "PWNED").exists()


def test_crafted_skeleton_is_a_user_error_in_the_cli(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    header = {"format": ckpt.FORMAT, "meta": {}, "state": {"__dict__": [["objective", {"__tensor__": "gone"}]]}}
    from safetensors.torch import save as st_save

    bad = tmp_path / "checkpoints" / "ckpt-000000000001.safetensors"
    bad.write_bytes(st_save({"s/w": torch.zeros(1)}, metadata={"cmkit": __import__("json").dumps(header)}))
    assert main(["sample", str(tmp_path), "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert "no readable checkpoint" in err and "names tensor 'gone', which the file lacks" in err, err
    assert "internal error" not in err and "Traceback" not in err


def test_checkpoint_meta_records_version_and_config(tmp_path, capsys):
    train(cfg(tmp_path, "train.steps=1", "train.lr=0.00123"))
    _, _, meta = latest_checkpoint(tmp_path / "checkpoints")
    version = next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version"))
    assert meta["version"] == version
    assert meta["config"] == cfg(tmp_path, "train.steps=1", "train.lr=0.00123").to_dict()
    assert meta["config"]["train"]["lr"] == 0.00123 and meta["config"]["net"]["hidden"] == 32
    assert meta["step"] == 1 and meta["nimg"] == 32  # train.batch_size=32
    # Another version's checkpoint: one warning line on stderr, and sampling still works.
    path = list_checkpoints(tmp_path / "checkpoints")[-1]
    state, meta = ckpt.read_checkpoint(path)
    ckpt.save_checkpoint(tmp_path / "checkpoints", meta["nimg"], state, {**meta, "version": "0.0.1-old"})
    assert main(["sample", str(tmp_path), "--n", "4", "--out", str(tmp_path / "s.npz")]) == 0
    out, err = capsys.readouterr()
    assert err.count("cmkit: warning: ") == 1 and f"written by cmkit 0.0.1-old, this is cmkit {version}" in err, err
    assert "0.0.1-old" not in out


def test_skipped_checkpoint_warns_once_on_stderr(tmp_path, capsys):
    args = ["train", *TINY, f"run.dir={tmp_path}", "train.steps=3", "run.checkpoint_every=1"]
    assert main([*args, "--stop-after", "2"]) == 0
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert newest.name == "ckpt-000000000064.safetensors"
    newest.write_bytes(newest.read_bytes()[:200])  # truncated, as by a crash of another tool
    capsys.readouterr()
    assert main(args) == 0  # resumes from step 1 (32 images)
    out, err = capsys.readouterr()
    assert err.count("skipped unreadable checkpoint") == 1, err
    assert "ckpt-000000000064.safetensors' is not a readable" in err and "using ckpt-000000000032" in err
    assert "skipped unreadable" not in out and "warning" not in out
    assert latest_checkpoint(tmp_path / "checkpoints")[2]["step"] == 3


@pytest.mark.parametrize("rank", [0, 1])
def test_train_prints_the_config_on_rank_0_only(tmp_path, monkeypatch, capsys, rank):
    import cmkit.distributed
    import cmkit.train

    monkeypatch.setattr(cmkit.distributed, "init", lambda device: cmkit.distributed.DistInfo(rank, 2, rank))
    monkeypatch.setattr(cmkit.train, "train", lambda c, **kw: Path(c.run.dir))
    assert main(["train", *TINY, f"run.dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert (out.startswith("cmkit: method ict, net mlp 32x2, data eight_gaussians") and out.count("\n") == 2
            and f"{tmp_path / 'config.yaml'}" in out and "cmkit: run written to" in out) if rank == 0 else out == ""
    assert main(["train", *TINY, f"run.dir={tmp_path}", "--verbose"]) == 0  # the whole resolved config
    out = capsys.readouterr().out
    assert (f"dir: {tmp_path}" in out and "fourier_scale" in out) if rank == 0 else out == ""


def test_sample_steps_help_mentions_nfe(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "diffusion runs (method edm, trigflow) the number of network evaluations (NFE)" in text


# ----------------------------------------------------------------------------
# Bad configs and data: a specific message each, exit code 2, run files untouched.


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("existing")
    run = d / "run"
    train(load_config(TINY[0], TINY[1:] + ["train.steps=2", f"run.dir={run}"]))
    (d / "bad.yaml").write_text("train: {steps: [1, 2\n")
    np.save(d / "nan.npy", np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]))
    np.save(d / "strings.npy", np.array([["a", "b"], ["c", "d"]]))
    np.save(d / "flat.npy", np.arange(5.0))
    np.save(d / "empty.npy", np.zeros((0, 2)))
    (d / "garbage.npy").write_bytes(b"not numpy at all")
    return d


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for a machine without a CUDA GPU")

BAD_CASES = [
    (["train.stepz=5"], "unknown key(s) train.stepz. Valid keys of 'train'"),
    (["train.steps=abc"], "train.steps: expected an integer"),
    (["train.lr=-1"], "train.lr must be > 0"),
    (["train.batch_size=0"], "train.batch_size and train.accumulate >= 1"),
    (["method.name=nope"], "unknown method.name 'nope'. Valid methods"),
    (["method.s0=0"], "method.s0 and method.s1 need 1 <= s0 <= s1"),
    (["trainsteps"], "is not of the form section.key=value"),
    (["bogus.key=1"], "must be section.key with section one of"),
    (["net.name=resnet"], "resnet"),
    pytest.param(["train.precision=fp16"], "needs a CUDA device", marks=NO_GPU),
    (["train.precision=int8"], "train.precision='int8' is not valid. Choose one of: fp32, bf16, fp16, auto"),
    (["train.accumulate=3"], "must be divisible by the 1 rank(s) times train.accumulate=3"),
    pytest.param(["train.device=cuda"], "no CUDA GPU is visible", marks=NO_GPU),
    (["net.class_cond=true"], "needs labelled data"),
    (["data.name=array", "data.path={d}/nan.npy"], "NaN/inf values"),
    (["data.name=array", "data.path={d}/strings.npy"], "cmkit needs numbers"),
    (["data.name=array", "data.path={d}/flat.npy"], "expected (n, D) vectors"),
    (["data.name=array", "data.path={d}/empty.npy"], "is empty"),
    (["data.name=array", "data.path={d}/garbage.npy"], "cannot read"),
    (["data.name=array", "data.path={d}/missing.npy"], "does not exist"),
    (["data.name=mnistt"], "unknown data.name 'mnistt'"),
    (["train.lr=0.5"], "holds a different run (checkpoint ckpt-000000000064.safetensors); differing keys: train.lr: "),
    (["train.lr=0.5"], "-> 0.5. Choose another run.dir"),
]


def _case_id(case) -> str:
    return (case.values[1] if hasattr(case, "values") else case[1])[:30]


@pytest.mark.parametrize("extra,message", BAD_CASES, ids=[_case_id(c) for c in BAD_CASES])
def test_bad_input_has_its_message_and_touches_nothing(existing_run, capsys, extra, message):
    run = existing_run / "run"
    before = _snapshot(run)
    rc = main(["train", *TINY, f"run.dir={run}", "train.steps=2", *[e.format(d=existing_run) for e in extra]])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err, err
    assert "Traceback" not in err and err.count("\n") == 1  # one paragraph
    assert _snapshot(run) == before


def test_eval_missing_inception_weights(existing_run, capsys):
    run = existing_run / "run"
    before = _snapshot(run)
    rc = main(["eval", str(run), "--features", "inception", "--inception-weights", "/nonexistent", "--n", "8"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "eval.inception_weights='/nonexistent' is not a file" in err and "--inception-weights PATH" in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert _snapshot(run) == before


def test_missing_or_corrupt_files(existing_run, tmp_path, capsys):
    assert main(["train", str(existing_run / "bad.yaml")]) == 2
    assert main(["train", str(tmp_path / "none.yaml")]) == 2
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "ckpt-000000000010.safetensors").write_bytes(b"\x00" * 50)
    assert main(["sample", str(tmp_path / "r"), "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "is not valid YAML" in err[0] and "does not exist" in err[1] and "no readable checkpoint" in err[2]
    with pytest.raises(CheckpointError):  # --debug shows the traceback instead
        main(["--debug", "sample", str(tmp_path / "r"), "--out", str(tmp_path / "s.png")])
    with pytest.raises(CheckpointError):
        main(["sample", str(tmp_path / "r"), "--out", str(tmp_path / "s.png"), "--debug"])


# ----------------------------------------------------------------------------
# Property-based: the parser and the array loader fail only with their own errors.

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=8))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=6)
keys = st.sampled_from(["steps", "lr", "batch_size", "ema", "name", "s0", "hidden", "dir", "precision", "x", ""])
sections = st.sampled_from(["data", "net", "method", "train", "run", "eval", "bogus"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(sections, st.one_of(values, st.dictionaries(keys, values, max_size=4)), max_size=4))
def test_config_parser_fails_only_with_config_error(raw):
    try:
        from_dict(raw)
    except ConfigError:
        pass


@pytest.mark.parametrize("method", [True, "ict", 3, ["ict"], {"name": ["ict"]}, {"name": 7}])
def test_a_method_section_that_is_not_a_mapping_is_a_config_error(method):
    with pytest.raises(ConfigError, match="method"):
        from_dict({"method": method})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=20), max_size=4))
def test_overrides_fail_only_with_config_error(items):
    try:
        parse_overrides(items)
        load_config(None, items)
    except ConfigError:
        pass


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=5),
       dtype=st.sampled_from(["float32", "float64", "int64", "uint8", "bool", "complex64", "U2"]),
       poison=st.sampled_from([None, np.nan, np.inf, 1e300]))
def test_array_loader_fails_only_with_data_error(tmp_path, shape, dtype, poison):
    x = np.ones(shape, dtype=dtype) if dtype != "U2" else np.full(shape, "a", dtype=dtype)
    if poison is not None and x.size and dtype.startswith("float"):
        x.flat[0] = poison
    np.save(tmp_path / "a.npy", x)
    c = load_config(None, ["data.name=array", f"data.path={tmp_path / 'a.npy'}", "data.split=all"]).data
    try:
        ds = load_dataset(c)
        assert torch.isfinite(ds.x).all() and ds.x.dtype == torch.float32
    except DataError:
        pass


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.lists(st.sampled_from(["x", "y", "images", "labels", "arr_0"]), max_size=3, unique=True),
       n=st.integers(0, 5), ydtype=st.sampled_from(["int64", "float32", "U1"]), ylen=st.integers(0, 6),
       labels=st.booleans())
def test_npz_loader_fails_only_with_data_error(tmp_path, keys, n, ydtype, ylen, labels):
    arrays = {k: (np.ones((n, 2), np.float32) if k not in ("y", "labels") else np.zeros(ylen, ydtype)) for k in keys}
    np.savez(tmp_path / "a.npz", **arrays)
    c = load_config(None, ["data.name=array", f"data.path={tmp_path / 'a.npz'}", "data.split=all",
                           f"data.labels={str(labels).lower()}"]).data
    try:
        ds = load_dataset(c)
        assert torch.isfinite(ds.x).all() and len(ds.x) > 0
    except DataError:
        pass


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.tuples(st.sampled_from(["png", "txt", "jpg"]), st.integers(1, 9), st.integers(1, 9),
                                st.sampled_from(["L", "RGB", "RGBA", "garbage"])), max_size=4),
       resolution=st.sampled_from([0, 4]))
def test_folder_loader_fails_only_with_data_error(tmp_path_factory, files, resolution):
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    for i, (ext, w, h, mode) in enumerate(files):
        path = root / f"{i}.{ext}"
        if mode == "garbage" or ext == "txt":
            path.write_bytes(b"not an image")
        else:
            Image.new(mode, (w, h), color=0).save(path, format="PNG" if ext == "png" else "JPEG") \
                if not (mode == "RGBA" and ext == "jpg") else path.write_bytes(b"\x89PNG broken")
    c = load_config(None, ["data.name=folder", f"data.path={root}", "data.split=all",
                           f"data.resolution={resolution}"]).data
    try:
        ds = load_dataset(c)
        assert torch.isfinite(ds.x).all() and ds.x.ndim == 4
    except DataError:
        pass


# ----------------------------------------------------------------------------
# Processes killed with SIGKILL (also in the middle of a save) and stopped with SIGTERM.

SLOW_SAVE = """
import os, sys, time
import cmkit.checkpoint as C
original, count, active = C.atomic_write_bytes, [0], [""]
def stall():
    open(os.environ["CMKIT_TEST_MARKER"], "w").close()
    time.sleep(120)
def slow(path, data):
    count[0] += 1
    if count[0] == int(os.environ["CMKIT_TEST_SLOW_SAVE"]):
        tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".x.tmp")
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
        stall()
    # CMKIT_TEST_BLOCK=write|rename: stall cmkit's own atomic write of save 3 half-way through the data, or
    # with the temporary file complete but not yet renamed.
    active[0] = os.environ.get("CMKIT_TEST_BLOCK", "") if count[0] == 3 else ""
    result = original(path, data)
    time.sleep(float(os.environ.get("CMKIT_TEST_SAVE_DELAY", "0")))  # keeps a short run killable
    return result
real_fdopen, real_replace = os.fdopen, os.replace
def fdopen(fd, *a, **k):
    f = real_fdopen(fd, *a, **k)
    if active[0] == "write":
        real_write = f.write
        def write(data):
            real_write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno()); stall()
        f.write = write
    return f
def replace(src, dst):
    if active[0] == "rename":
        stall()
    return real_replace(src, dst)
C.atomic_write_bytes, os.fdopen, os.replace = slow, fdopen, replace
from cmkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _spawn(tmp_path, args, slow_save=0, save_delay=0.0, block=""):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CMKIT_TEST_SLOW_SAVE": str(slow_save), "CMKIT_TEST_BLOCK": block,
           "CMKIT_TEST_SAVE_DELAY": str(save_delay),
           "CMKIT_TEST_MARKER": str(tmp_path / "in_save")}
    # SIGINT as in a terminal's foreground job: a suite started in the background has it ignored, and so would
    # the child (cmkit keeps an inherited SIG_IGN; tests/test_bad_inputs.py tests that case).
    return subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(pred, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_kill9_at_random_moments_and_during_save_then_exact_resume(tmp_path):
    steps = 30
    args = [*TINY, "train.steps=%d" % steps, "run.checkpoint_every=1", "train.threads=1", "net.hidden=64"]
    ref = load_config(args[0], args[1:] + [f"run.dir={tmp_path / 'ref'}"])
    train(ref)
    _, want, _ = latest_checkpoint(tmp_path / "ref" / "checkpoints")

    run = tmp_path / "run"
    rng = random.Random(0)
    plan = ["random", "save", "random", "save", "write", "rename"]  # write/rename: inside the real atomic write
    for trial, kind in enumerate(plan):
        before = latest_checkpoint(run / "checkpoints") if (run / "checkpoints").is_dir() else None
        step0 = before[2]["step"] if before else 0
        (tmp_path / "in_save").unlink(missing_ok=True)
        # Each save then takes >= 0.1 s, so 30 steps outlast the random 0-0.3 s wait on a fast machine.
        proc = _spawn(tmp_path, args + [f"run.dir={run}"], slow_save=3 if kind == "save" else 0, save_delay=0.1,
                      block=kind if kind in ("write", "rename") else "")
        if kind != "random":
            assert _wait_for(lambda: (tmp_path / "in_save").exists()), proc.communicate()
        else:
            assert _wait_for(lambda: len(list_checkpoints(run / "checkpoints"))
                             and latest_checkpoint(run / "checkpoints")[2]["step"] > step0), proc.communicate()
            time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        found = latest_checkpoint(run / "checkpoints")  # raises if nothing readable is left
        assert found is not None and found[2]["step"] >= step0, trial
        assert found[2]["step"] < steps, "the run finished before it was killed; kill earlier"
        if kind != "random":
            assert list((run / "checkpoints").glob(".*.tmp")), "the kill did not happen mid-save"
    train(load_config(args[0], args[1:] + [f"run.dir={run}"]))  # resume to the end
    assert not list((run / "checkpoints").glob(".*.tmp"))
    _, got, _ = latest_checkpoint(run / "checkpoints")
    assert got["progress"]["step"] == steps
    assert_same_state(want, got)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_writes_checkpoint_and_exits_cleanly(tmp_path, sig):
    proc = _spawn(tmp_path, [*TINY, "train.steps=100000", f"run.dir={tmp_path}", "train.threads=1"])
    log = tmp_path / "log.jsonl"
    assert _wait_for(lambda: log.exists() and log.read_text().count("\n") >= 3), proc.communicate()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"{sig.name} received" in err and "Traceback" not in err
    _, state, meta = latest_checkpoint(tmp_path / "checkpoints")
    assert 3 <= meta["step"] < 100000 and math.isfinite(float(meta["nimg"]))
    assert not (tmp_path / "summary.json").exists()  # not a finished run


# ----------------------------------------------------------------------------
# Issue 19: disk full on a fresh run, TensorBoard on a full disk, edited checkpoints, checkpoints of
# another run, log.jsonl after a resume.


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_on_a_fresh_run_names_the_path_and_the_rerun_trains(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_fdopen = os.fdopen

    def full(fd, *a, **k):  # every atomic write runs out of space after the file was created
        f = real_fdopen(fd, *a, **k)
        f.write = _enospc
        return f

    monkeypatch.setattr(ckpt.os, "fdopen", full)
    rc = main(["train", *TINY, f"run.dir={run}", "train.steps=2"])
    err = capsys.readouterr().err
    assert rc == 1 and f"'{run / 'config.yaml'}'" in err and "No space left on device" in err, err
    assert "Free disk space, then re-run the same command" in err and "Traceback" not in err
    assert not (run / "config.yaml").exists() and not list(run.glob(".config.yaml.*"))  # no 0-byte config.yaml
    monkeypatch.undo()  # space freed: the same command trains
    assert main(["train", *TINY, f"run.dir={run}", "train.steps=2"]) == 0
    assert latest_checkpoint(run / "checkpoints")[2]["step"] == 2


def test_an_empty_or_unreadable_config_yaml_does_not_block_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("")  # left by an older cmkit that wrote it in place on a full disk
    assert main(["train", *TINY, f"run.dir={run}", "train.steps=2", "run.checkpoint_every=1"]) == 0
    assert "is empty" in capsys.readouterr().err
    (run / "config.yaml").write_bytes(b"\x00\xff garbage")  # the checkpoints carry the config: resume
    assert main(["train", *TINY, f"run.dir={run}", "train.steps=3"]) == 0
    assert latest_checkpoint(run / "checkpoints")[2]["step"] == 3
    assert load_config(run / "config.yaml").train.steps == 3  # rewritten


def test_tensorboard_on_a_full_disk_says_so_in_one_line(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.summary.writer import record_writer

    real = record_writer.RecordWriter.write
    record_writer.RecordWriter.write = _enospc  # the writer thread fails on its first record
    try:
        rc = main(["train", *TINY, f"run.dir={tmp_path}", "train.steps=3", "run.tensorboard=true"])
    finally:
        record_writer.RecordWriter.write = real
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "Traceback" not in err and err.count("TensorBoard could not write") == 1, err
    assert "No space left on device" in err and "log.jsonl and checkpoints go on" in err
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3


def _edit_header(path: Path, old: bytes, new: bytes) -> None:
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = bytes(raw[8 : 8 + n])
    assert old in header and len(old) == len(new)
    raw[8 : 8 + n] = header.replace(old, new, 1)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("edit", ["dtype", "payload"])
def test_an_edited_checkpoint_is_refused(existing_run, tmp_path, capsys, edit):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(existing_run / "run", run)
    path = list_checkpoints(run / "checkpoints")[-1]
    if edit == "dtype":  # F32 -> I32: same size, so safetensors itself reads it happily
        _edit_header(path, b'"dtype":"F32"', b'"dtype":"I32"')
        words = ["reads as int32", "was written as float32"]
    else:  # one flipped bit in the last tensor's bytes
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 1
        path.write_bytes(bytes(raw))
        words = ["do not match the digest"]
    with pytest.raises(CheckpointError) as e:
        ckpt.read_checkpoint(path)
    for w in words:
        assert w in str(e.value)
    rc = main(["sample", str(run), "--checkpoint", str(path), "--n", "4", "--out", str(tmp_path / "s.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and words[0] in err and not (tmp_path / "s.npz").exists(), err


def test_a_checkpoint_of_another_run_is_refused(existing_run, tmp_path, capsys):
    other = tmp_path / "other"
    train(load_config(TINY[0], TINY[1:] + ["train.steps=1", "net.hidden=16", f"run.dir={other}"]))
    theirs = list_checkpoints(other / "checkpoints")[-1]
    rc = main(["sample", str(existing_run / "run"), "--checkpoint", str(theirs), "--out", str(tmp_path / "s.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "belongs to another run" in err and "net.hidden: 32 -> 16" in err and str(other) in err, err
    ours = list_checkpoints(existing_run / "run" / "checkpoints")[-1]  # its own checkpoint still samples
    assert main(["sample", str(existing_run / "run"), "--checkpoint", str(ours), "--n", "4",
                 "--out", str(tmp_path / "s.npz")]) == 0


def test_a_resumed_run_continues_log_jsonl_from_its_checkpoint(tmp_path, capsys):
    import json

    train(cfg(tmp_path, "train.steps=6", "run.checkpoint_every=2"))
    # As if killed after step 6 was logged but before its checkpoint was written, with a torn last line.
    list_checkpoints(tmp_path / "checkpoints")[-1].unlink()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 7, "nimg"')
    train(cfg(tmp_path, "train.steps=6", "run.checkpoint_every=2"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "dropped 3 record(s) past step 4" in capsys.readouterr().err
