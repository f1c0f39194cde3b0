"""CM-GAN (000_6636be86a063c832.txt): λ = 0 is the CM update, hinge values by hand, the blur and its
σ schedule, where the blur applies, k discriminator steps per generator step, fine-tuning from a
run, the discriminator's init, the diversity monitor and exact resume."""

import math

import pytest
import torch

from cmkit.augment import gaussian_blur
from cmkit.checkpoint import latest_checkpoint
from cmkit.config import ConfigError, load_config
from cmkit.objectives import build_objective
from cmkit.objectives.cmgan import mean_pairwise_distance
from cmkit.objectives.gan import GAN_LOSSES
from cmkit.schedules import Progress, blur_sigma
from cmkit.train import train
from cmkit_testutils import assert_states_equal

MLP = ["net.name=mlp", "net.hidden=32", "net.depth=2"]
QUIET = ["run.progress=false", "run.tensorboard=false", "run.sample_n=4", "run.sample_steps=[1]", "train.ema=[0.9]"]
DIGITS = (1, 8, 8)


def _objective(*overrides, shape=DIGITS, data="digits", seed=0):
    cfg = load_config(None, [f"data.name={data}", *MLP, *overrides])
    torch.manual_seed(seed)
    return build_objective(cfg, shape)


def _grads(module, loss_fn, batch, progress, seed=1):
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = loss_fn(batch, progress)
    out["loss"].mean().backward()
    return [p.grad.clone() for p in module.parameters()], out


# ----------------------------------------------------------------------------
# λ = 0 is exactly the consistency-model update (Sec. 4).


@pytest.mark.parametrize("base,method", [("ct", "cmgan_ct"), ("ict", "cmgan")])
def test_lambda_zero_gives_the_cm_update(base, method):
    cm = _objective(f"method.name={base}", "method.s1=40")
    batch, progress = {"x": torch.randn(32, *DIGITS)}, Progress(320, 6400, 32)
    reference, ref_out = _grads(cm.model, cm.loss, batch, progress)
    for lam, same in ((0.0, True), (0.5, False)):
        gan = _objective(f"method.name={method}", "method.s1=40", f"method.gan_weight={lam}")
        gan.model.load_state_dict(cm.model.state_dict())
        if cm.teacher is not None:
            gan.cm.teacher.load_state_dict(cm.teacher.state_dict())
        grads, out = _grads(gan.model, gan.generator_loss, batch, progress)
        assert all(torch.equal(a, b) for a, b in zip(grads, reference)) == same, (base, lam)
        assert torch.equal(out["cm_loss"], ref_out["loss"].detach().mean())  # the same CM loss either way
        assert all(p.grad is None for p in gan.discriminator.parameters())  # G step never trains D


def test_lambda_zero_gives_the_cd_update():
    common = ["method.teacher=analytic", "method.blur_sigma0=0", "method.target_ema=0.9"]
    cd = _objective("method.name=cd", "method.teacher=analytic", "method.target_ema=0.9", shape=(2,), data="gaussian")
    batch, progress = {"x": torch.randn(32, 2) * 0.5}, Progress(0, 6400, 32)
    reference, _ = _grads(cd.model, cd.loss, batch, progress)
    for lam, same in ((0.0, True), (0.5, False)):
        gan = _objective("method.name=cmgan_cd", *common, f"method.gan_weight={lam}", shape=(2,), data="gaussian")
        gan.model.load_state_dict(cd.model.state_dict())
        gan.cm.target.load_state_dict(cd.target.state_dict())
        grads, _ = _grads(gan.model, gan.generator_loss, batch, progress)
        assert all(torch.equal(a, b) for a, b in zip(grads, reference)) == same, lam


def test_generator_loss_is_cm_plus_lambda_times_gan():
    lam = 0.25
    obj = _objective("method.name=cmgan", f"method.gan_weight={lam}", "method.s1=40", "method.gan_noise=schedule")
    batch, progress = {"x": torch.randn(16, *DIGITS)}, Progress(0, 6400, 16)
    torch.manual_seed(3)
    out = obj.generator_loss(batch, progress)
    torch.manual_seed(3)
    cm_loss, student, t = obj.cm.loss_with_output(batch, progress)
    logits = obj.discriminator(gaussian_blur(student, 10.0), obj.process.c_noise(t.float()))
    expected = cm_loss["loss"] + lam * (-logits)  # hinge generator loss: -D(blur(fake))
    torch.testing.assert_close(out["loss"], expected, rtol=0, atol=1e-6)


def test_uniform_gan_noise_fakes_come_from_their_own_student_pass():
    # gan_noise=uniform on iCT (Eq. 8): the GAN term's fake is f_θ(x + σ_{n+1} z', σ_{n+1}) with a fresh n and z'.
    lam = 0.25
    obj = _objective("method.name=cmgan", f"method.gan_weight={lam}", "method.s1=40")
    assert obj.cfg.gan_noise == "uniform" and obj.uniform_fakes()
    batch, progress = {"x": torch.randn(16, *DIGITS)}, Progress(0, 6400, 16)
    torch.manual_seed(3)
    out = obj.generator_loss(batch, progress)
    torch.manual_seed(3)
    cm_loss, _, _ = obj.cm.loss_with_output(batch, progress)
    t = obj.gan_sigmas(batch["x"], progress)
    x_t = batch["x"] + t.view(-1, 1, 1, 1) * torch.randn_like(batch["x"])
    logits = obj.discriminator(gaussian_blur(obj.model(x_t, t), 10.0), obj.process.c_noise(t.float()))
    torch.testing.assert_close(out["loss"], cm_loss["loss"] + lam * (-logits), rtol=0, atol=1e-6)


def test_uniform_gan_noise_draws_n_uniformly_on_the_grid():
    obj = _objective("method.name=cmgan", "method.curriculum=const", "method.s1=10")
    progress = Progress(0, 6400, 16)
    sigmas = obj.process.karras_sigmas(11)  # N = s1 + 1 = 11 points
    torch.manual_seed(0)
    t = obj.gan_sigmas(torch.zeros(20000, 2, dtype=torch.float64), progress)
    index = torch.searchsorted(sigmas, t)
    assert torch.equal(sigmas[index], t)  # on the grid
    counts = torch.bincount(index, minlength=11).double() / t.numel()
    assert counts[0] == 0  # σ_{n+1} with n >= 1: never σ_1 = σ_min
    torch.testing.assert_close(counts[1:], torch.full((10,), 0.1, dtype=torch.float64), atol=0.01, rtol=0)
    # iCT's lognormal draw (gan_noise=schedule) puts most fakes at σ <= 1; the uniform one does not
    sched = _objective("method.name=cmgan", "method.curriculum=const", "method.s1=10", "method.gan_noise=schedule")
    t_s = sched.gan_sigmas(torch.zeros(20000, 2, dtype=torch.float64), progress)
    assert (t_s <= 1).double().mean() > 0.6 > (t <= 1).double().mean()
    # CT's uniform draw already is Eq. 8's: no extra student pass
    assert not _objective("method.name=cmgan_ct").uniform_fakes()


# ----------------------------------------------------------------------------
# Hinge loss (Sec. 5.1) by hand.


def test_hinge_losses_hand_values():
    real = torch.tensor([-2.0, 0.0, 0.5, 3.0])
    fake = torch.tensor([-3.0, -0.5, 0.0, 2.0])
    hinge = GAN_LOSSES["hinge"]
    # -ψ1(r) + ψ2(f) = max(0, 1 - r) + max(0, 1 + f): [3 + 0, 1 + 0.5, 0.5 + 1, 0 + 3]
    assert hinge.discriminator(real, fake).tolist() == [3.0, 1.5, 1.5, 3.0]
    assert hinge.generator(fake).tolist() == [3.0, 0.5, 0.0, -2.0]  # -D(fake)
    ns = GAN_LOSSES["non_saturating"]
    assert ns.generator(torch.tensor([0.0])).item() == pytest.approx(math.log(2))  # -log sigmoid(0)


class Recorder(torch.nn.Module):
    """A discriminator with known logits, D(x) = 2·mean(x) - 0.5, that records its inputs."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))
        self.inputs = []

    def forward(self, x, c_noise, labels=None):
        self.inputs.append(x.detach().clone())
        return self.scale * x.flatten(1).mean(1) - 0.5


def test_discriminator_step_is_hinge_of_blurred_real_and_fake():
    obj = _objective("method.name=cmgan", "method.s1=40", "method.blur_nimg=1000")
    obj.discriminator = Recorder()
    x = torch.randn(8, *DIGITS)
    progress = Progress(500, 6400, 8)  # σ = 10·(1 - 500/1000) = 5
    torch.manual_seed(5)
    out = obj.discriminator_loss({"x": x}, progress)
    # the fakes, recomputed: fresh t = σ_{n+1}, n ~ U[1, N-1] (Eq. 8), f_θ(x_g + t z, t) with x_g rolled by half
    torch.manual_seed(5)
    sigmas = obj.process.karras_sigmas(obj.cm.num_scales(progress))
    t = sigmas[torch.multinomial(torch.full((sigmas.numel() - 1,), 1.0), 8, replacement=True) + 1].float()
    x_g = x.roll(4, 0)
    with torch.no_grad():
        fake = obj.model(x_g + t[:, None, None, None] * torch.randn_like(x_g), t)
    real_in, fake_in = obj.discriminator.inputs
    torch.testing.assert_close(real_in, gaussian_blur(x, 5.0), rtol=0, atol=0)
    torch.testing.assert_close(fake_in, gaussian_blur(fake, 5.0), rtol=0, atol=1e-6)
    assert not torch.allclose(real_in, x, atol=1e-3)  # the blur did something
    d_r = 2 * real_in.flatten(1).mean(1) - 0.5
    d_f = 2 * fake_in.flatten(1).mean(1) - 0.5
    torch.testing.assert_close(out["loss"], torch.relu(1 - d_r) + torch.relu(1 + d_f))
    assert out["blur_sigma"] == 5.0


def test_generator_blurs_only_the_discriminator_input():
    obj = _objective("method.name=cmgan", "method.s1=40", "method.gan_weight=0.1", "method.blur_nimg=1000",
                     "method.gan_noise=schedule")
    obj.discriminator = Recorder()
    x = torch.randn(8, *DIGITS)
    progress = Progress(250, 6400, 8)  # σ = 7.5
    seen = []
    # the student's pass is the one with a graph (the iCT target, the same network, runs under no_grad)
    handle = obj.model.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()) if o.requires_grad else None)
    torch.manual_seed(2)
    out = obj.generator_loss({"x": x}, progress)
    handle.remove()
    (d_in,) = obj.discriminator.inputs
    assert len(seen) == 1
    torch.testing.assert_close(d_in, gaussian_blur(seen[0], 7.5), rtol=0, atol=1e-6)  # D sees blur(student)
    torch.manual_seed(2)
    torch.testing.assert_close(out["cm_loss"], obj.cm.loss({"x": x}, progress)["loss"].mean(), rtol=0, atol=0)


# ----------------------------------------------------------------------------
# The blur and its schedule (Algorithm 1, Sec. 5.1: σ0 = 10 -> 0 over the first 300K images).


@pytest.mark.parametrize("nimg,sigma", [(0, 10.0), (150_000, 5.0), (75_000, 7.5), (300_000, 0.0), (900_000, 0.0)])
def test_blur_sigma_schedule(nimg, sigma):
    assert blur_sigma(nimg, 10.0, 300_000) == pytest.approx(sigma, abs=1e-12)
    assert blur_sigma(nimg, 10.0, 0) == 0.0  # M = 0: no blur


def test_blur_of_an_impulse_is_the_gaussian_kernel():
    sigma, size = 1.5, 31
    x = torch.zeros(1, 1, size, size, dtype=torch.float64)
    x[0, 0, 15, 15] = 1.0
    y = gaussian_blur(x, sigma)[0, 0]
    r = torch.arange(size, dtype=torch.float64) - 15
    g = torch.exp(-r**2 / (2 * sigma**2))
    kernel = torch.outer(g, g)
    kernel[(r.abs() > 3 * sigma + 1)[:, None] | (r.abs() > 3 * sigma + 1)[None, :]] = 0  # support ±ceil(3σ)
    kernel /= kernel.sum()
    torch.testing.assert_close(y, kernel, rtol=0, atol=1e-6)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-9)  # mass preserved away from the border


def test_blur_identity_at_zero_and_differentiable():
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    assert gaussian_blur(x, 0.0) is x
    assert torch.autograd.gradcheck(lambda v: gaussian_blur(v, 0.8), (x,), fast_mode=True)
    big = gaussian_blur(x, 10.0)  # kernel capped at 2·5-1 for reflect padding
    assert big.shape == x.shape and torch.isfinite(big).all()


def test_blur_needs_images():
    with pytest.raises(ConfigError, match="image data"):
        _objective("method.name=cmgan", shape=(2,), data="eight_gaussians")
    _objective("method.name=cmgan", "method.blur_sigma0=0", shape=(2,), data="eight_gaussians")


def test_config_validation():
    for bad in ("method.consistency=lpips", "method.gan_loss=wgan", "method.disc_steps=0", "method.gan_weight=-1",
                "method.init_weights=best", "method.diversity_features=clip"):
        with pytest.raises(ConfigError):
            load_config(None, ["method.name=cmgan", bad])
    with pytest.raises(ConfigError, match="teacher"):
        load_config(None, ["method.name=cmgan_cd"])  # CD's own validation applies


@pytest.mark.parametrize("name", ["mnist", "imagenet64", "bedroom256"])
def test_configs_load(name):
    cfg = load_config(f"configs/cmgan_{name}.yaml")
    assert cfg.method.init_from and cfg.train.optimizer == "radam" and len(cfg.train.ema) == 3


# ----------------------------------------------------------------------------
# The loop: k discriminator steps per generator step, fine-tuning, resume.


def _digits_run(tmp_path, name, *extra):
    return load_config(None, ["data.name=digits", *MLP, *QUIET, "train.batch_size=16", f"run.dir={tmp_path / name}",
                              *extra])


def test_k_discriminator_steps_per_generator_step(tmp_path):
    cfg = _digits_run(tmp_path, "k", "method.name=cmgan", "method.disc_steps=3", "train.steps=2",
                      "method.diversity_every=0")
    train(cfg)
    _, state, _ = latest_checkpoint(tmp_path / "k" / "checkpoints")
    d_opt, g_opt = state["optimizers"]["discriminator"], state["optimizers"]["model"]
    assert {float(s["step"]) for s in d_opt["state"].values()} == {6.0}  # k = 3 per step, 2 steps
    assert {float(s["step"]) for s in g_opt["state"].values()} == {2.0}
    assert state["progress"]["data_pos"] == 2 * (3 + 1) * 16  # a fresh batch per repeat


def test_fine_tuning_loads_the_source_weights_exactly(tmp_path):
    from cmkit.run import load

    train(_digits_run(tmp_path, "src", "method.name=ict", "train.steps=3", "train.ema=[0.5]", "train.lr=1e-2"))
    source = load(tmp_path / "src")
    for which, src_model in (("ema", source.model(ema=True)), ("student", source.model(ema=False))):
        cfg = _digits_run(tmp_path, f"ft_{which}", "method.name=cmgan", f"method.init_from={tmp_path / 'src'}",
                          f"method.init_weights={which}", "train.steps=0", "train.ema=[0.9,0.99]")
        train(cfg)
        run = load(tmp_path / f"ft_{which}")
        want = src_model.state_dict()
        for model in (run.model(ema=False), run.model(ema=True, index=0), run.model(ema=True, index=1)):
            got = model.state_dict()
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # the source's EMA and student differ here, so the two choices are distinguishable
    assert not all(torch.equal(a, b) for a, b in zip(source.model(True).parameters(), source.model(False).parameters()))


@pytest.mark.parametrize("method,source,copy", [("cmgan_ct", "ct", "teacher"), ("cmgan_cd", "cd", "target")])
def test_fine_tuning_sets_the_ema_target_to_the_source_weights(tmp_path, method, source, copy):
    # CT's EMA teacher θ⁻ / CD's target θ⁻ start at the source's weights too, not at a fresh init.
    from cmkit.run import load

    teacher = ["method.teacher=analytic"] if source == "cd" else []
    train(_digits_run(tmp_path, "src", f"method.name={source}", *teacher, "train.steps=3", "train.ema=[0.5]",
                      "train.lr=1e-2"))
    want = load(tmp_path / "src").model(ema=True).state_dict()
    obj = _objective(f"method.name={method}", *teacher, f"method.init_from={tmp_path / 'src'}", seed=1)
    ema_copy = getattr(obj.cm, copy)
    assert ema_copy is not None and ema_copy is not obj.model
    for module in (obj.model, ema_copy):
        got = module.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    fresh = getattr(_objective(f"method.name={method}", *teacher, seed=1).cm, copy).state_dict()
    assert not all(torch.equal(fresh[k], want[k]) for k in want)  # the check above can fail


def test_fine_tuning_refuses_a_different_noise_process(tmp_path):
    train(_digits_run(tmp_path, "src", "method.name=ict", "train.steps=1", "method.c_noise_scale=250"))
    with pytest.raises(ConfigError, match="method.c_noise_scale: 250.0 there, 1.0 here"):
        _objective("method.name=cmgan", f"method.init_from={tmp_path / 'src'}")
    with pytest.raises(ConfigError, match="method.rho: 7.0 there, 5.0 here"):
        _objective("method.name=cmgan", f"method.init_from={tmp_path / 'src'}", "method.c_noise_scale=250",
                   "method.rho=5")
    # mid_sigmas only choose sampling times: a different one is fine
    _objective("method.name=cmgan", f"method.init_from={tmp_path / 'src'}", "method.c_noise_scale=250",
               "method.mid_sigmas=[1.5]")


def test_cmgan_cd_run_loads_and_resumes_without_its_source_runs(tmp_path):
    import shutil

    from cmkit.run import load

    train(_digits_run(tmp_path, "edm", "method.name=edm", "train.steps=2"))
    cd = [f"method.teacher={tmp_path / 'edm'}", "method.init_from_teacher=true"]
    train(_digits_run(tmp_path, "cd", "method.name=cd", *cd, "train.steps=2"))
    run = ["method.name=cmgan_cd", f"method.teacher={tmp_path / 'edm'}", f"method.init_from={tmp_path / 'cd'}",
           "method.diversity_every=0", "method.blur_nimg=64"]
    train(_digits_run(tmp_path, "ft", *run, "train.steps=2"))
    before = load(tmp_path / "ft").sample(4, steps=2)
    for name in ("edm", "cd"):  # both runs the config names are gone
        shutil.move(str(tmp_path / name), str(tmp_path / f"{name}_moved"))
    with pytest.warns(UserWarning, match="saved in this run's checkpoint"):
        assert torch.equal(load(tmp_path / "ft").sample(4, steps=2), before)
    with pytest.warns(UserWarning):
        train(_digits_run(tmp_path, "ft", *run, "train.steps=3"))
    assert latest_checkpoint(tmp_path / "ft" / "checkpoints")[1]["progress"]["step"] == 3
    # starting over (--force) cannot skip the initialisation: a clear error, not a random generator
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="init_from.*no checkpoint of it was restored"):
        train(_digits_run(tmp_path, "ft", *run, "train.steps=3"), force=True)


def test_fine_tuning_refuses_a_different_network(tmp_path):
    train(_digits_run(tmp_path, "src", "method.name=ict", "train.steps=1"))
    cfg = _digits_run(tmp_path, "ft", "method.name=cmgan", f"method.init_from={tmp_path / 'src'}", "net.hidden=48")
    with pytest.raises(ConfigError, match="net"):
        train(cfg)


def test_discriminator_init_from_checkpoint(tmp_path):
    train(_digits_run(tmp_path, "a", "method.name=cmgan", "train.steps=2", "train.lr=1e-2"))
    _, state, _ = latest_checkpoint(tmp_path / "a" / "checkpoints")
    obj = _objective("method.name=cmgan", f"method.disc_init={tmp_path / 'a'}")
    for k, v in obj.discriminator.state_dict().items():
        assert torch.equal(v, state["objective"][f"discriminator.{k}"]), k


def test_resume_restores_both_sides_exactly(tmp_path):
    run = ["method.name=cmgan", "method.gan_weight=0.1", "method.disc_steps=2", "method.blur_nimg=64",
           "method.diversity_every=2", "method.diversity_n=8", "method.w_gp=1", "method.gp_interval=2",
           "train.steps=4"]
    train(_digits_run(tmp_path, "a", *run))
    cfg_b = _digits_run(tmp_path, "b", *run)
    train(cfg_b, stop_after=2)
    train(cfg_b)
    (_, a, _), (_, b, _) = latest_checkpoint(tmp_path / "a" / "checkpoints"), latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert any(k.startswith("discriminator.") for k in a["objective"]) and "discriminator" in a["optimizers"]
    assert "diversity" in a["extra"] and a["extra"] == b["extra"] and a["progress"] == b["progress"]
    assert_states_equal(a, b)


# ----------------------------------------------------------------------------
# Mode-collapse monitor.


def test_mean_pairwise_distance_by_hand():
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])
    # pairs: 5, 4, 3 -> mean over the 3 unordered pairs = 4
    assert mean_pairwise_distance(f) == pytest.approx(4.0)
    assert mean_pairwise_distance(torch.ones(5, 7)) == 0.0


def test_diversity_is_pixel_distance_of_one_step_samples_and_draws_no_rng():
    obj = _objective("method.name=cmgan", "method.diversity_features=pixel", "method.diversity_n=6",
                     "net.dropout=0.5")
    obj.train()
    state = torch.get_rng_state()
    value = obj.measure_diversity()
    assert torch.equal(torch.get_rng_state(), state) and obj.model.training
    z = obj.diversity_noise
    t = torch.full((6,), 80.0)
    obj.model.eval()
    with torch.no_grad():
        x = obj.model(80.0 * z, t).flatten(1).double()
    pairs = [(x[i] - x[j]).norm().item() for i in range(6) for j in range(6) if i != j]
    assert value == pytest.approx(sum(pairs) / len(pairs), rel=1e-6)
    # a backbone with F = 0 leaves f = c_skip(σ_max)·σ_max·z, c_skip(σ) = σ_d²/((σ - σ_min)² + σ_d²)
    torch.nn.init.zeros_(obj.model.net.out.weight)
    torch.nn.init.zeros_(obj.model.net.out.bias)
    skip = 0.25 / ((80 - 0.002) ** 2 + 0.25) * 80 * z.flatten(1).double()
    pairs = [(skip[i] - skip[j]).norm().item() for i in range(6) for j in range(6) if i != j]
    assert obj.measure_diversity() == pytest.approx(sum(pairs) / len(pairs), rel=1e-5)


def test_diversity_logged_every_n_steps():
    obj = _objective("method.name=cmgan", "method.diversity_every=5", "method.s1=40")
    batch = {"x": torch.randn(4, *DIGITS)}
    calls = []
    obj.measure_diversity = lambda: calls.append(1) or float(len(calls))
    logs = [obj.generator_loss(batch, Progress(4 * k, 400, 4))["diversity"] for k in range(11)]
    assert len(calls) == 3  # k = 0, 5, 10
    assert logs == [1.0] * 5 + [2.0] * 5 + [3.0]


# ----------------------------------------------------------------------------
# The discriminator's own optimiser settings and warm-up (issue 15).

TOY = ["net.hidden=32", "net.depth=2", "train.batch_size=16", "data.n=256", "run.progress=false",
       "run.tensorboard=false", "run.sample_n=4", "train.ema=[0.9]"]


def _trainer(config, *extra):
    from cmkit import distributed
    from cmkit.train import Trainer

    return Trainer(load_config(config, [*TOY, *extra]), distributed.DistInfo(), torch.device("cpu"))


@pytest.mark.parametrize("method", ["cmgan", "act"])
def test_each_phase_steps_with_its_own_optimiser_settings(method):
    extra = ["method.blur_sigma0=0"] if method == "cmgan" else []
    t = _trainer("configs/ict_toy.yaml", f"method.name={method}", "train.lr=1e-5", "train.optimizer=adam",
                 "train.betas=[0.9,0.999]", "method.disc_lr=3e-3", "method.disc_betas=[0.0,0.99]",
                 "method.disc_optimizer=radam", *extra)
    t.train_step(t.streams())
    model, disc = t.optimizers["model"], t.optimizers["discriminator"]
    assert type(model) is torch.optim.Adam and type(disc) is torch.optim.RAdam
    assert [g["lr"] for g in model.param_groups] == [1e-5] and [g["lr"] for g in disc.param_groups] == [3e-3]
    assert model.param_groups[0]["betas"] == (0.9, 0.999) and disc.param_groups[0]["betas"] == (0.0, 0.99)
    # the discriminator's optimiser holds exactly D's parameters, the model's exactly the student's
    assert {id(p) for p in disc.param_groups[0]["params"]} == {id(p) for p in t.objective.discriminator.parameters()}
    assert {id(p) for p in model.param_groups[0]["params"]} == {id(p) for p in t.objective.model.parameters()}


def test_disc_settings_default_to_train_for_cmgan_and_to_the_authors_for_act():
    t = _trainer("configs/ict_toy.yaml", "method.name=cmgan", "method.blur_sigma0=0", "train.lr=2e-5")
    assert t.settings["discriminator"] == t.settings["model"]
    a = _trainer("configs/act_toy.yaml", "train.lr=2e-5", "train.optimizer=adam")
    # kong13661/ACT train_cifar10.py: D's RAdam with betas (0, 0.99·16/17) and lr = G's lr
    assert a.settings["discriminator"].optimizer == "radam" and a.settings["discriminator"].lr == 2e-5
    assert a.settings["discriminator"].betas == pytest.approx((0.0, 0.99 * 16 / 17), abs=1e-15)


@pytest.mark.parametrize("bad", ["method.disc_lr=-1", "method.disc_betas=[0.5]", "method.disc_betas=[0.0,1.0]",
                                 "method.disc_optimizer=sgd", "method.disc_warmup_nimg=-1", "method.gan_noise=x"])
def test_disc_settings_validation(bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_config(None, ["method.name=cmgan", bad])


def test_sigma_data_auto_is_refused_for_cd():
    with pytest.raises(ConfigError, match="sigma_data"):
        load_config(None, ["method.name=cmgan_cd", "method.teacher=analytic", "method.sigma_data=auto"])
    assert load_config(None, ["method.name=cmgan", "method.sigma_data=auto"]).method.sigma_data == "auto"


def test_discriminator_warm_up_keeps_lambda_zero_then_switches_on():
    obj = _objective("method.name=cmgan", "method.gan_weight=0.5", "method.disc_warmup_nimg=1000", "method.s1=40")
    cm = _objective("method.name=ict", "method.s1=40")
    cm.model.load_state_dict(obj.model.state_dict())
    batch = {"x": torch.randn(16, *DIGITS)}
    before, after = Progress(992, 6400, 16), Progress(1008, 6400, 16)
    assert obj.gan_weight(before) == 0.0 and obj.gan_weight(after) == 0.5
    warm, out = _grads(obj.model, obj.generator_loss, batch, before)
    reference, _ = _grads(cm.model, cm.loss, batch, before)
    assert all(torch.equal(a, b) for a, b in zip(warm, reference)) and out["gan_weight"] == 0.0  # the CM update
    on, out = _grads(obj.model, obj.generator_loss, batch, after)
    reference, _ = _grads(cm.model, cm.loss, batch, after)
    assert not all(torch.allclose(a, b) for a, b in zip(on, reference)) and out["gan_weight"] == 0.5
