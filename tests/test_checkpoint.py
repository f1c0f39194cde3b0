"""Checkpoint format: round trip, atomic writes, pruning, refusal of non-checkpoints, pickles and crafted skeletons."""

import json
import pickle
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from cmkit.checkpoint import (
    FORMAT,
    CheckpointError,
    CheckpointWarning,
    checkpoint_path,
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
    with pytest.warns(CheckpointWarning, match="ckpt-000000000002.safetensors' is not a readable"):
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


# ----------------------------------------------------------------------------
# Crafted files: the right format tag, a skeleton or meta that flatten could not have written.


def _write_header(path: Path, header, tensors=None) -> Path:
    """A valid safetensors file whose cmkit metadata is ``header`` (any JSON value, or its text)."""
    tensors = {"s/w": torch.zeros(2)} if tensors is None else tensors
    text = header if isinstance(header, str) else json.dumps(header)
    path.write_bytes(st_save(tensors, metadata={"cmkit": text}))
    return path


def _deep(depth: int):
    skel = 1
    for _ in range(depth):
        skel = [skel]
    return skel


CRAFTED = [
    ({"format": FORMAT, "meta": {}}, "has no state"),
    ({"format": FORMAT, "meta": {}, "state": [1, 2]}, "state is a list, not a dict"),
    ({"format": FORMAT, "meta": {}, "state": 3}, "state is a int, not a dict"),
    ({"format": FORMAT, "meta": {}, "state": {"__tensor__": "s/missing"}}, "names tensor 's/missing'"),
    ({"format": FORMAT, "meta": {}, "state": {"__tensor__": ["s/w"]}}, "names tensor ['s/w']"),
    ({"format": FORMAT, "meta": {}, "state": {"__dict__": 5}}, "__dict__ holds a int, not a list"),
    ({"format": FORMAT, "meta": {}, "state": {"__dict__": [[["k"], 1]]}}, "is not [key, value]"),
    ({"format": FORMAT, "meta": {}, "state": {"__dict__": [["a", 1, 2]]}}, "is not [key, value]"),
    ({"format": FORMAT, "meta": {}, "state": {"__dict__": ["ab"]}}, "is not [key, value]"),
    ({"format": FORMAT, "meta": {}, "state": {"__tuple__": {"a": 1}}}, "__tuple__ holds a dict"),
    ({"format": FORMAT, "meta": {}, "state": {"nimg": 1}}, "unexpected entry in checkpoint skeleton at state"),
    ({"format": FORMAT, "meta": {}, "state": {"__dict__": [["a", {"__tensor__": "x", "y": 1}]]}},
     "unexpected entry in checkpoint skeleton at state/a"),
    ({"format": FORMAT, "meta": [], "state": {"__dict__": []}}, "meta is a list, not a dict"),
    ({"format": FORMAT, "meta": {"config": "x"}, "state": {"__dict__": []}}, "meta['config'] is 'x', not a dict"),
    ({"format": FORMAT, "meta": {"config": {"train": 5}}, "state": {"__dict__": []}}, "section(s) train"),
    ({"format": FORMAT, "meta": {"step": "3"}, "state": {"__dict__": []}}, "meta['step'] is '3', not a int"),
    ({"format": FORMAT, "meta": {"nimg": True}, "state": {"__dict__": []}}, "meta['nimg'] is 'True'"),
    ({"format": FORMAT, "meta": {"version": 1}, "state": {"__dict__": []}}, "meta['version'] is '1', not a str"),
    ({"format": FORMAT, "meta": {}, "state": {"__dict__": [["a", _deep(sys.getrecursionlimit() - 100)]]}},
     "nested too deeply"),
    (f'{{"format": "{FORMAT}", "meta": {{}}, "state": {"[" * 100_000}1{"]" * 100_000}}}',  # too deep for json.loads
     "not a readable cmkit checkpoint"),
]


@pytest.mark.parametrize("header,problem", CRAFTED, ids=[c[1][:28] for c in CRAFTED])
def test_crafted_skeleton_is_a_checkpoint_error_and_resume_falls_back(tmp_path, header, problem):
    good = save_checkpoint(tmp_path, 1, _state(), {"nimg": 1})
    bad = _write_header(checkpoint_path(tmp_path, 2), header)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(bad)
    assert str(bad) in str(e.value) and problem in str(e.value), str(e.value)[:300]
    with pytest.warns(CheckpointWarning, match="skipped unreadable checkpoint"):
        path, _, meta = latest_checkpoint(tmp_path)
    assert path == good and meta == {"nimg": 1}


# Random JSON, with the skeleton's own tags and tensor keys so that mutations reach deep into unflatten.
_tags = st.sampled_from(["__tensor__", "__dict__", "__tuple__", "format", "meta", "state", "config", "step"])
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**3) | st.floats(allow_nan=False) | st.text(max_size=4)
    | st.sampled_from(["s/w", "s/rng", FORMAT, "s/optim/state/0/exp_avg"]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(_tags | st.text(max_size=3), c, max_size=2),
    max_leaves=8)


def _children(node):
    if isinstance(node, dict):
        return list(node)
    if isinstance(node, list):
        return list(range(len(node)))
    return []


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_mutated_checkpoints_fail_only_with_checkpoint_error(data):
    """Replace or delete one node anywhere in a real header; loading succeeds or raises CheckpointError."""
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        good = save_checkpoint(d, 1, _state(), {"nimg": 1, "step": 1, "version": "0.1.0", "config": {"train": {}}})
        tensors = {}
        header = {"format": FORMAT, "meta": {"nimg": 2, "step": 2, "config": {"train": {"lr": 1.0}}},
                  "state": flatten(_state(), tensors)}
        parent, key, node = None, None, header
        while _children(node) and data.draw(st.integers(0, 3), label="descend") > 0:
            parent, key = node, data.draw(st.sampled_from(_children(node)), label="child")
            node = parent[key]
        if parent is None:
            header = data.draw(_json, label="header")
        elif isinstance(parent, dict) and data.draw(st.booleans(), label="delete"):
            del parent[key]
        else:
            parent[key] = data.draw(_json, label="value")
        bad = _write_header(checkpoint_path(d, 2), header, tensors)
        try:
            read_checkpoint(bad)
            loadable = True
        except CheckpointError as e:
            assert str(bad) in str(e)
            loadable = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            path, _, _ = latest_checkpoint(d)
        assert path == (bad if loadable else good)


@settings(max_examples=100, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_corrupted_header_bytes_fail_only_with_checkpoint_error(flips):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        good = save_checkpoint(d, 1, _state(), {"nimg": 1})
        bad = save_checkpoint(d, 2, _state(), {"nimg": 2})
        raw = bytearray(bad.read_bytes())
        n = 8 + int.from_bytes(raw[:8], "little")  # the length prefix and the JSON header
        for pos, byte in flips:
            raw[pos % n] = byte
        bad.write_bytes(bytes(raw))
        try:
            read_checkpoint(bad)
            loadable = True
        except CheckpointError:
            loadable = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            path, _, _ = latest_checkpoint(d)
        assert path == (bad if loadable else good)


# ----------------------------------------------------------------------------
# Version recorded in meta: a mismatch warns once, loading goes on.


def _pyproject_version() -> str:
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    return next(line.split("=")[1].strip().strip('"') for line in text.splitlines() if line.startswith("version"))


def test_version_mismatch_warns_and_loads(tmp_path):
    here = _pyproject_version()
    p = save_checkpoint(tmp_path, 1, _state(), {"nimg": 1, "version": "0.0.1-old"})
    with pytest.warns(CheckpointWarning, match=f"written by cmkit 0.0.1-old, this is cmkit {here}") as rec:
        _, meta = read_checkpoint(p)
    assert meta["version"] == "0.0.1-old" and str(p) in str(rec[0].message)
    save_checkpoint(tmp_path, 2, _state(), {"nimg": 2, "version": here})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the running version, or none recorded: no warning
        latest_checkpoint(tmp_path)
        read_checkpoint(save_checkpoint(tmp_path, 3, _state(), {"nimg": 3}))
