"""Config parsing: presets, overrides, type checking and error messages."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmkit.config import ConfigError, load_config, parse_overrides


def test_presets_ct_and_ict():
    ict = load_config(None, ["method.name=ict"]).method
    assert (ict.curriculum, ict.s0, ict.s1, ict.distance, ict.teacher_ema) == ("exp", 10, 1280, "pseudo_huber", False)
    assert (ict.noise_schedule, ict.p_mean, ict.p_std, ict.weighting) == ("lognormal", -1.1, 2.0, "reciprocal")
    ct = load_config(None, ["method.name=ct"]).method
    assert (ct.curriculum, ct.s0, ct.s1, ct.distance, ct.teacher_ema, ct.mu0) == ("sqrt", 2, 150, "l2", True, 0.9)
    assert (ct.noise_schedule, ct.weighting) == ("uniform", "uniform")


def test_overrides_combine_techniques():
    cfg = load_config("configs/ict_toy.yaml", ["method.distance=l2", "method.teacher_ema=true", "train.steps=7"])
    assert cfg.method.distance == "l2" and cfg.method.teacher_ema and cfg.train.steps == 7
    assert cfg.method.s1 == 80  # from the YAML file


def test_numbers_and_lists():
    cfg = load_config(None, ["train.steps=2e3", "train.ema=[0.99,0.999]", "net.channel_mult=1"])
    assert cfg.train.steps == 2000 and cfg.train.ema == [0.99, 0.999] and cfg.net.channel_mult == [1]


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.stepz=5", ["unknown key", "train.stepz", "steps"]),
        ("train.steps=many", ["train.steps", "integer"]),
        ("method.distance=lpips", ["method.distance", "pseudo_huber"]),
        ("method.name=nope", ["unknown method.name", "ict"]),
        ("bogus.x=1", ["section"]),
        ("train.steps", ["section.key=value"]),
        ("net.class_cond=maybe", ["true or false"]),
    ],
)
def test_bad_overrides_name_the_problem(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/none.yaml")


def test_all_configs_load():
    import pathlib

    for p in sorted(pathlib.Path("configs").glob("*.yaml")):
        load_config(p)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_override_parser_never_crashes_unexplained(text):
    try:
        load_config(None, [text])
    except ConfigError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["train.steps", "train.lr", "net.hidden", "method.s0", "train.ema", "run.dir", "net.class_cond"]),
       st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=8), st.booleans()))
def test_typed_values_never_crash_unexplained(key, value):
    try:
        load_config(None, [f"{key}={value}"])
    except ConfigError:
        pass


def test_parse_overrides():
    assert parse_overrides(["train.lr=0.001", "run.dir=runs/x", "train.ema=[0.9, 0.99]"]) == {
        "train": {"lr": 0.001, "ema": [0.9, 0.99]},
        "run": {"dir": "runs/x"},
    }
