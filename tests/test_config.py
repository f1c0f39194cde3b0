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
        ("method.distance=lpipz", ["method.distance", "pseudo_huber", "lpips"]),
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


def test_edm_toy_then_cd_toy_build_and_train(tmp_path):
    # The shipped configs are not only parsed: edm_toy trains, and cd_toy distils that very run.
    import torch

    from cmkit.objectives import build_objective
    from cmkit.run import load
    from cmkit.train import train

    quick = ["train.steps=2", "train.threads=1", "run.progress=false", "run.tensorboard=false", "run.sample_n=8",
             "run.sample_steps=[1]"]
    edm = train(load_config("configs/edm_toy.yaml", [*quick, f"run.dir={tmp_path / 'edm'}"]))
    cfg = load_config("configs/cd_toy.yaml", [*quick, f"run.dir={tmp_path / 'cd'}", f"method.teacher={edm}"])
    assert cfg.method.init_from_teacher and cfg.net == load(edm).cfg.net
    student = build_objective(cfg, (2,)).model.net.state_dict()
    teacher = load(edm).model(ema=True).net.state_dict()
    assert student.keys() == teacher.keys() and all(torch.equal(student[k], teacher[k]) for k in teacher)
    run = load(train(cfg))
    assert run.nimg == 2 * cfg.train.batch_size and run.sample(4, steps=2).shape == (4, 2)


def test_ict_imagenet64_follows_ict_appendix_b():
    # iCT App. B: AdaGN removed, dropout 0.2, two-step σ_{i_2} = 1.526, ADM positional embedding (1000·¼·ln σ).
    cfg = load_config("configs/ict_imagenet64.yaml")
    assert (cfg.net.modulation, cfg.net.dropout, cfg.net.embedding) == ("add", 0.2, "positional")
    assert cfg.net.dropout_max_res == 16
    assert cfg.method.mid_sigmas == [1.526] and cfg.method.c_noise_scale == 250.0


@pytest.mark.parametrize("name", ["cmgan_imagenet64", "cmgan_bedroom256", "cmgan_mnist", "cd_imagenet64",
                                  "cd_bedroom256", "cd_mnist", "cd_toy"])
def test_presets_name_runs_that_a_config_produces_with_the_same_net_and_process(name):
    # method.init_from / method.teacher name run.dir of a config in configs/, trained on the same data with the
    # same network (dropout holds no weights) and the same process numbers (CM-GAN's init_from refuses others).
    import dataclasses
    import pathlib

    by_dir = {}
    for p in sorted(pathlib.Path("configs").glob("*.yaml")):
        other = load_config(p)
        by_dir[other.run.dir] = other
    cfg = load_config(f"configs/{name}.yaml")
    process = ("sigma_data", "sigma_min", "sigma_max", "rho", "c_noise_scale")
    named = [getattr(cfg.method, key) for key in ("init_from", "teacher") if getattr(cfg.method, key, "")]
    assert named
    for run_dir in named:
        assert run_dir in by_dir, f"{name} names {run_dir}, which no config in configs/ writes"
        src = by_dir[run_dir]
        assert src.data == cfg.data
        assert dataclasses.replace(src.net, dropout=0.0) == dataclasses.replace(cfg.net, dropout=0.0)
        assert [getattr(src.method, k) for k in process] == [getattr(cfg.method, k) for k in process]
    if getattr(cfg.method, "consistency", "") == "cd":  # CM-GAN's CD source was distilled from the same teacher
        assert by_dir[cfg.method.init_from].method.teacher == cfg.method.teacher


def test_step_time_benchmark_has_a_recipe_for_every_method():
    # benchmarks/step_time.py times each method's network passes; a method without a recipe would KeyError there.
    import importlib.util
    import pathlib

    from cmkit.objectives import METHODS

    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "step_time.py"
    spec = importlib.util.spec_from_file_location("step_time", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert sorted(set(METHODS) - set(module.RECIPES)) == []


def test_config_types_do_not_import_the_method_registry():
    # No import circle config <-> objectives: the types stand alone, load_config sits above both (cmkit.configure).
    import subprocess
    import sys

    code = ("import sys, cmkit.config as c; assert 'cmkit.objectives' not in sys.modules; "
            "from cmkit.config import load_config; assert load_config(None).method.name == 'ict'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib_root())


def pathlib_root():
    import pathlib

    return str(pathlib.Path(__file__).resolve().parent.parent)


@pytest.mark.parametrize("override, key", [
    ("train.ema=[1.0]", "train.ema"), ("train.ema_sample=3", "train.ema_sample"), ("train.device=gpu", "train.device"),
    ("train.betas=[0.9,1.5]", "train.betas"), ("run.log_every=0", "run.log_every"), ("run.sample_n=-1", "run.sample_n"),
    ("run.sample_every=-1", "run.sample_every"), ("data.workers=-1", "data.workers"),
])
def test_section_validation_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_an_empty_config_file_is_refused(tmp_path):
    (tmp_path / "e.yaml").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(tmp_path / "e.yaml")
