"""Checkpoint format: round trip, atomic writes, pruning, refusal of non-checkpoints and pickles."""

import pickle

import pytest
import torch

from cmkit.checkpoint import (
    CheckpointError,
    flatten,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    save_checkpoint,
    unflatten,
)


def _state():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    return {"w": torch.randn(2, 2), "optim": opt.state_dict(), "progress": {"nimg": 128, "step": 1},
            "rng": torch.get_rng_state(), "tup": (1, 2.5, "a"), "none": None}


def test_flatten_roundtrip_keeps_int_keys_and_tuples():
    s = _state()
    tensors = {}
    back = unflatten(flatten(s, tensors), tensors)
    assert torch.equal(back["w"], s["w"]) and torch.equal(back["rng"], s["rng"])
    assert back["tup"] == (1, 2.5, "a") and back["none"] is None
    assert set(back["optim"]["state"]) == set(s["optim"]["state"])  # int keys survive
    assert back["optim"]["param_groups"] == s["optim"]["param_groups"]


def test_save_load_prune(tmp_path):
    for n in (100, 200, 300, 400):
        save_checkpoint(tmp_path, n, _state(), {"nimg": n}, keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt-000000000300.safetensors", "ckpt-000000000400.safetensors"]
    path, state, meta = latest_checkpoint(tmp_path)
    assert meta["nimg"] == 400 and path.name.endswith("400.safetensors")
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_newest_falls_back_to_previous(tmp_path):
    save_checkpoint(tmp_path, 1, _state(), {"nimg": 1})
    p2 = save_checkpoint(tmp_path, 2, _state(), {"nimg": 2})
    p2.write_bytes(p2.read_bytes()[:100])  # truncated, as by a crash of another tool
    path, _, meta = latest_checkpoint(tmp_path)
    assert meta["nimg"] == 1
    with pytest.raises(CheckpointError, match="not a readable cmkit checkpoint"):
        read_checkpoint(p2)


class Boom:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickle_checkpoint_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "ckpt-000000000001.safetensors"
    evil.write_bytes(pickle.dumps({"state": Boom()}))
    torch.save({"x": Boom()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        read_checkpoint(evil)
    with pytest.raises(CheckpointError):
        latest_checkpoint(tmp_path)
    assert not (tmp_path / "PWNED").exists()
