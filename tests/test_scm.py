"""sCM (004_225d7b9daa3d4cfe.txt): TrigFlow, the JVP tangent, Eq. 2/8 gradients, sCT/sCD, samplers.

Ground truths are finite differences, formulas recomputed here, and the closed-form TrigFlow
consistency function of Gaussian data.
"""

import math

import pytest
import torch

from cmkit.config import ConfigError, load_config
from cmkit.model import Parameterized
from cmkit.objectives import build_objective
from cmkit.objectives.base import drop_labels
from cmkit.objectives.scm import normalize_tangent
from cmkit.processes import TrigFlow
from cmkit.sampling import consistency_sample, trigflow_ddim_sample, trigflow_ode_sample
from cmkit.schedules import Progress, tangent_warmup, trigflow_lognormal_times
from cmkit.trigflow_analytic import GaussianTrigFlowTeacher, gaussian_consistency

SD = 0.5
NO_STABILISERS = ["method.adaptive_weighting=false", "method.tangent_norm=none", "method.tangent_warmup=0"]


def _objective(*overrides, shape=(2,), dtype=torch.float32, seed=0):
    cfg = load_config(None, ["net.name=mlp", "net.hidden=32", "net.depth=2", "net.embedding=positional",
                             "method.name=sct", *overrides])
    torch.manual_seed(seed)
    obj = build_objective(cfg, shape).to(dtype)
    # A random (not zero-initialised) output layer, so F and all its derivatives are non-trivial.
    if hasattr(obj.model.net, "out"):
        torch.nn.init.normal_(obj.model.net.out.weight, std=0.3)
    return obj


def _draw(n=8, d=2, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=g, dtype=dtype)
    z = torch.randn(n, d, generator=g, dtype=dtype)
    t = torch.rand(n, generator=g, dtype=dtype) * 1.3 + 0.1
    return x0, z, t


# ----------------------------------------------------------------------------
# TrigFlow process and parameterisation.


def test_trigflow_scalings_by_hand():
    p = TrigFlow(sigma_data=0.5)
    t = torch.tensor([0.0, math.pi / 3], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = p.scalings(t)
    assert c_skip.tolist() == pytest.approx([1.0, 0.5], abs=1e-15)
    assert c_out.tolist() == pytest.approx([0.0, -0.5 * math.sqrt(3) / 2], abs=1e-15)
    assert c_in.tolist() == [2.0, 2.0] and torch.equal(c_noise, t)
    c_skip, c_out, c_in, _ = p.scalings(t, "diffusion")
    assert c_skip.tolist() == [0.0, 0.0] and c_out.tolist() == [0.5, 0.5]
    # EDM time transform (App. B.2): ¼ ln(σ_d tan t); at t = π/4, σ = σ_d.
    edm = TrigFlow(0.5, time_transform="edm", time_scale=2.0)
    assert edm.c_noise(torch.tensor([math.pi / 4], dtype=torch.float64)).item() == pytest.approx(2 * 0.25 * math.log(0.5))


def test_add_noise_renoise_and_velocity_target():
    p = TrigFlow(sigma_data=0.5)
    x0, z, t = _draw()
    tb = t[:, None]
    assert torch.allclose(p.add_noise(x0, z, t), torch.cos(tb) * x0 + torch.sin(tb) * 0.5 * z)
    assert torch.equal(p.renoise(x0, t, z), p.add_noise(x0, z, t))
    # v_t is the t-derivative of x_t (central difference).
    h = 1e-6
    fd = (p.add_noise(x0, z, t + h) - p.add_noise(x0, z, t - h)) / (2 * h)
    assert torch.allclose(p.velocity_target(x0, z, t), fd, atol=1e-8)
    assert torch.equal(p.from_noise(z), 0.5 * z)


def test_boundary_condition_f_x_0_is_x():
    obj = _objective(dtype=torch.float64)
    x = torch.randn(16, 2, dtype=torch.float64)
    assert torch.equal(obj.model(x, torch.zeros(16, dtype=torch.float64)), x)
    # and the parameterisation is Eq. 5 elsewhere
    t = torch.full((16,), 0.7, dtype=torch.float64)
    F = obj.model.net(x / SD, t)
    assert torch.allclose(obj.model(x, t), math.cos(0.7) * x - math.sin(0.7) * SD * F)


def test_proposal_is_lognormal_in_sigma_d_tan_t():
    torch.manual_seed(0)
    t = trigflow_lognormal_times(200_000, -1.0, 1.4, SD)
    assert 0 < t.min() and t.max() < math.pi / 2
    log_sigma = torch.log(SD * torch.tan(t.double()))
    assert log_sigma.mean().item() == pytest.approx(-1.0, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(1.4, abs=0.02)


# ----------------------------------------------------------------------------
# The tangent (Eq. 6 via the JVP of Sec. 5.1) and the gradients (Eq. 2, Eq. 8, Remark 10).


def _f(obj, x, t):
    return obj.model(x, t)


@pytest.mark.parametrize("transform", ["identity", "edm"])
def test_jvp_tangent_matches_finite_difference(transform):
    obj = _objective(f"method.time_transform={transform}", dtype=torch.float64)
    x0, z, t = _draw()
    x_t = obj.process.add_noise(x0, z, t)
    dxdt = obj.process.velocity_target(x0, z, t)
    F_minus, g = obj.tangent(x_t, t, dxdt, r=1.0)
    h = 1e-5
    fd = (_f(obj, x_t + h * dxdt, t + h) - _f(obj, x_t - h * dxdt, t - h)) / (2 * h)
    expected = torch.cos(t)[:, None] * fd  # g = cos(t)·df⁻/dt
    rel = (g - expected).norm() / expected.norm()
    assert rel < 1e-4, rel
    assert torch.allclose(F_minus, obj.model.net(x_t / SD, obj.process.c_noise(t)))


def test_tangent_warmup_scales_the_sin_term():
    assert [tangent_warmup(k, 10) for k in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert tangent_warmup(0, 0) == 1.0
    obj = _objective(dtype=torch.float64)
    x0, z, t = _draw()
    x_t, dxdt = obj.process.add_noise(x0, z, t), obj.process.velocity_target(x0, z, t)
    F, g0 = obj.tangent(x_t, t, dxdt, r=0.0)
    c = torch.cos(t)[:, None]
    assert torch.allclose(g0, -c**2 * (SD * F - dxdt))  # r = 0: only the cos term of Eq. 6
    _, g1 = obj.tangent(x_t, t, dxdt, r=1.0)
    _, gh = obj.tangent(x_t, t, dxdt, r=0.5)
    assert torch.allclose(gh, (g0 + g1) / 2)  # linear in r


def _grads(obj, loss):
    obj.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in obj.model.parameters()])


@pytest.mark.parametrize("weighting", ["prior", "uniform"])
def test_eq8_gradient_equals_eq2_gradient(weighting):
    """(D/2)·∇θ Eq. 8 = ∇θ E[w(t) f_θᵀ df⁻/dt] (Eq. 2), w = 1/(σ_d tan t) or 1; tangent by central FD."""
    obj = _objective(*NO_STABILISERS, f"method.weighting={weighting}", dtype=torch.float64)
    x0, z, t = _draw()
    D = x0.shape[1]
    g8 = _grads(obj, obj.consistency_loss(x0, z, t)["loss"].mean())
    x_t, dxdt = obj.process.add_noise(x0, z, t), obj.process.velocity_target(x0, z, t)
    h = 1e-5
    with torch.no_grad():
        tangent = (_f(obj, x_t + h * dxdt, t + h) - _f(obj, x_t - h * dxdt, t - h)) / (2 * h)
    w = 1 / (SD * torch.tan(t)) if weighting == "prior" else torch.ones_like(t)
    g2 = _grads(obj, (w * (_f(obj, x_t, t) * tangent).sum(1)).mean())
    assert torch.allclose(D / 2 * g8, g2, rtol=1e-5, atol=1e-9), (D / 2 * g8 - g2).abs().max()


def test_scm_gradient_is_limit_of_discrete_consistency_gradient():
    """Song et al. 2023 Remark 10 / sCM Eq. 2: ∇θ L_Δt / Δt → D·∇θ Eq. 8 (squared ℓ2, w = prior)."""
    obj = _objective(*NO_STABILISERS, dtype=torch.float64)
    x0, z, t = _draw()
    D = x0.shape[1]
    g8 = _grads(obj, obj.consistency_loss(x0, z, t)["loss"].mean())
    w = 1 / (SD * torch.tan(t))
    errors = []
    for dt in (1e-3, 1e-4):
        s = t - dt
        with torch.no_grad():
            target = _f(obj, obj.process.add_noise(x0, z, s), s)
        l_disc = (w * (_f(obj, obj.process.add_noise(x0, z, t), t) - target).square().sum(1)).mean()
        gd = _grads(obj, l_disc) / dt
        errors.append(((gd - D * g8).norm() / gd.norm()).item())
    assert errors[1] < 2e-3 and errors[1] < errors[0] / 5, errors  # O(Δt) convergence


def test_discrete_time_tangent_tends_to_the_jvp_tangent():
    obj = _objective(*NO_STABILISERS, "method.discrete_steps=100000", dtype=torch.float64)
    x0, z, t = _draw()
    step = (math.pi / 2) / 100000
    t = torch.ceil(t / step) * step
    disc = obj.consistency_loss(x0, z, t)
    obj.cfg.discrete_steps = 0
    cont = obj.consistency_loss(x0, z, t)
    assert torch.allclose(disc["loss"], cont["loss"], rtol=1e-3)


def test_tangent_normalisation_and_clipping():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(normalize_tangent(g, "normalize", 0.1), torch.tensor([[3 / 5.1, 4 / 5.1], [0.0, 0.0]]))
    assert torch.equal(normalize_tangent(g, "clip"), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert torch.equal(normalize_tangent(g, "none"), g)


def test_adaptive_weighting_loss_and_joint_training():
    obj = _objective("method.tangent_warmup=0")
    torch.nn.init.normal_(obj.weight_net.linear.weight, std=0.5)
    x0, z, t = (a.float() for a in _draw())
    out = obj.consistency_loss(x0, z, t)
    ref_obj_mse = obj.consistency_loss  # recompute e^{w}·mse - w from the pieces
    with torch.no_grad():
        w = obj.weight_net(t)
    mse = out["loss"].detach() + w  # loss = e^w mse - w  =>  e^w mse = loss + w
    assert torch.all(mse > 0)
    obj.cfg.adaptive_weighting = False
    weight_net, obj.weight_net = obj.weight_net, None
    plain = ref_obj_mse(x0, z, t)["loss"].detach()
    obj.weight_net = weight_net
    assert torch.allclose(out["loss"].detach(), torch.exp(w) * plain - w, rtol=1e-5)
    # one phase, one optimiser, both modules
    (phase,) = obj.phases
    names = {n.split(".")[0] for n, _ in phase.module.named_parameters()}
    assert names == {"model", "weight"}
    before = obj.weight_net.linear.weight.clone()
    opt = torch.optim.SGD(phase.module.parameters(), lr=0.1)
    phase.loss({"x": torch.randn(32, 2)}, Progress(0, 100, 32))["loss"].mean().backward()
    opt.step()
    assert not torch.equal(before, obj.weight_net.linear.weight)


def test_dropout_masks_shared_between_tangent_and_student_pass(monkeypatch):
    for shared, expect_zero in ((True, True), (False, False)):
        obj = _objective("net.dropout=0.5", *NO_STABILISERS, f"method.shared_dropout={str(shared).lower()}").train()
        real = obj.tangent
        monkeypatch.setattr(obj, "tangent", lambda *a, **k: (real(*a, **k)[0], torch.zeros(8, 2)))
        x0, z, t = (a.float() for a in _draw())
        out = obj.consistency_loss(x0, z, t)
        assert (out["residual_rms"] == 0) == expect_zero  # the literal F_θ - F_θ⁻ is zero iff the masks agree
        assert torch.all(out["loss"] == 0)  # the residual entering Eq. 8 is F_θ - sg(F_θ) = 0 (issue 15 item 5)


def test_scd_needs_a_teacher_and_validation_errors():
    with pytest.raises(ConfigError, match="teacher"):
        load_config(None, ["method.name=scd"])
    with pytest.raises(ConfigError, match="tangent_norm"):
        load_config(None, ["method.name=sct", "method.tangent_norm=bogus"])
    with pytest.raises(ConfigError, match="t_mid"):
        load_config(None, ["method.name=sct", "method.t_mid=[1.7]"])


# ----------------------------------------------------------------------------
# Samplers.


class _Spy(torch.nn.Module):
    """A TrigFlow consistency model f = cos t·x - sin t·σ_d·F with F(x) = 0.3 x + 1; records inputs."""

    def __init__(self):
        super().__init__()
        self.process = TrigFlow(0.5, mid_times=(1.1,))
        self.calls = []

    def forward(self, x, t, class_labels=None):
        self.calls.append((x.clone(), t.clone()))
        tb = t[:, None].double()
        return (torch.cos(tb) * x - torch.sin(tb) * 0.5 * (0.3 * x / 0.5 + 1)).to(x.dtype)


def test_sampling_times_and_two_step_sampler_renoises_at_t_mid():
    p = TrigFlow(0.5)
    assert p.sampling_times(1) == [math.pi / 2] and p.sampling_times(2) == [math.pi / 2, 1.1]
    assert TrigFlow(0.5, mid_times=(1.2, 0.6)).sampling_times(3) == [math.pi / 2, 1.2, 0.6]
    spy = _Spy()
    noise = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = consistency_sample(spy, noise, p.sampling_times(2), generator=torch.Generator().manual_seed(7))
    (x1, t1), (x2, t2) = spy.calls
    assert torch.equal(x1, 0.5 * noise) and torch.all(t1 == math.pi / 2)
    first = spy(x1, t1)
    z = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert torch.all(t2.double() == torch.tensor(1.1, dtype=torch.float32).double())
    tm = torch.tensor(1.1, dtype=torch.float32).double()
    assert torch.allclose(x2, torch.cos(tm) * first + torch.sin(tm) * 0.5 * z, atol=1e-12)
    assert torch.allclose(out, spy(x2, t2), atol=1e-12)


def test_ode_samplers_follow_the_analytic_gaussian_flow():
    """Integrating the exact PF-ODE of N(m, s²) from π/2 lands at m + s·z (closed form), for both solvers."""
    m, s = 0.7, 0.2
    teacher = GaussianTrigFlowTeacher(m, s, SD).double()
    noise = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = gaussian_consistency(SD * noise, torch.tensor(math.pi / 2, dtype=torch.float64), m, s, SD)
    assert torch.allclose(exact, m + s * noise, atol=1e-12)
    err = {}
    for name, sampler in (("heun", trigflow_ode_sample), ("ddim", trigflow_ddim_sample)):
        err[name] = [(sampler(teacher, noise, teacher.process.ode_times(n)) - exact).abs().max().item()
                     for n in (32, 128)]
    assert err["heun"][1] < 1e-3 and err["heun"][0] / err["heun"][1] > 10, err  # 2nd order: ~16x per 4x steps
    assert err["ddim"][1] < 2e-2 and err["ddim"][0] / err["ddim"][1] > 3, err  # 1st order: ~4x


# ----------------------------------------------------------------------------
# Learning.


@pytest.mark.slow
def test_scd_learns_the_closed_form_gaussian_consistency_function():
    """sCD with the analytic teacher of N(m, s²) data recovers f(x_t, t) = m + s(x_t - cos t m)/v_t.

    Plain Eq. 8 (no normalisation, no adaptive weighting): at this toy learning rate e^{w_φ} grows
    to ~1/mse and the normalised run overshoots; the stabilisers are exercised elsewhere.
    """
    m, s = 0.5, 0.25
    obj = _objective(*NO_STABILISERS, "net.hidden=64", "method.p_mean=0.0", "method.p_std=1.6", seed=3)
    obj.set_teacher(GaussianTrigFlowTeacher(m, s, SD))
    (phase,) = obj.phases
    opt = torch.optim.Adam(phase.module.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest
    try:
        for k in range(800):
            x = m + s * torch.randn(256, 2, generator=gen)
            loss = phase.loss({"x": x}, Progress(k * 256, 800 * 256, 256))["loss"].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(5)
    errs, untrained = [], []
    for tv in (0.2, 0.6, 1.0, 1.3, math.pi / 2):
        t = torch.full((2000,), tv)
        x_t = obj.process.add_noise(m + s * torch.randn(2000, 2), torch.randn(2000, 2), t)
        exact = gaussian_consistency(x_t, t, m, s, SD)
        with torch.no_grad():
            errs.append((obj.model(x_t, t) - exact).square().mean().sqrt().item())
        untrained.append((torch.cos(t)[:, None] * x_t - exact).square().mean().sqrt().item())  # F = 0
    assert max(errs) < 0.05, errs
    assert min(untrained[1:]) > 0.15, untrained  # away from t = 0 (where f ≈ x) F = 0 is far off


@pytest.mark.slow
def test_sct_on_eight_gaussians_beats_untrained(tmp_path):
    from cmkit.data import load_dataset
    from cmkit.run import load
    from cmkit.train import train
    from cmkit_testutils import sliced_wasserstein

    # All sCM stabilisers on (the config's defaults); a short EMA because the run is 400 steps.
    over = ["train.steps=400", "train.batch_size=128", "run.progress=false", "run.tensorboard=false",
            "run.sample_n=16", "data.n=4096", "run.sample_steps=[1]", "train.threads=1", "net.hidden=128",
            "net.depth=3", "train.ema=[0.99]"]
    cfg = load_config("configs/sct_toy.yaml", over + [f"run.dir={tmp_path / 'a'}"])
    untrained_cfg = load_config("configs/sct_toy.yaml", over + ["train.steps=1", f"run.dir={tmp_path / 'b'}"])
    train(cfg)
    train(untrained_cfg)
    data = load_dataset(cfg.data).x[:1000]
    swd = {k: [] for k in ("a", "b")}
    for k in swd:
        run = load(tmp_path / k)
        for steps in (1, 2):
            swd[k].append(sliced_wasserstein(run.sample(1000, steps, data_space=False), data))
    # measured once on a loaded CPU: 1-step 0.256 vs 0.888, 2-step 0.267 vs 0.739
    assert swd["a"][0] < 0.5 * swd["b"][0], swd
    assert swd["a"][1] < 0.5 * swd["b"][1], swd


# ----------------------------------------------------------------------------
# Network option and TrigFlow diffusion.


def test_adaptive_double_norm_unet_jvp_matches_finite_difference():
    from cmkit.nets.layers import pixel_norm

    x = torch.tensor([[[[3.0]], [[4.0]]]])  # channels (3, 4): RMS = sqrt(12.5)
    assert torch.allclose(pixel_norm(x).flatten(), torch.tensor([3.0, 4.0]) / math.sqrt(12.5))
    obj = _objective("net.name=unet", "net.channels=8", "net.channel_mult=[1,2]", "net.num_blocks=1",
                     "net.attn_resolutions=[4]", "net.num_groups=4", "net.modulation=double_norm",
                     shape=(1, 8, 8), dtype=torch.float64)
    assert obj.model.net.enc[0].modulation == "double_norm"
    for p in obj.model.net.parameters():  # zero-initialised convolutions would hide most of the network
        torch.nn.init.normal_(p, std=0.2)
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.4, 1.2], dtype=torch.float64)
    x_t, dxdt = obj.process.add_noise(x0, z, t), obj.process.velocity_target(x0, z, t)
    _, gt = obj.tangent(x_t, t, dxdt, r=1.0)
    h = 1e-5
    fd = (_f(obj, x_t + h * dxdt, t + h) - _f(obj, x_t - h * dxdt, t - h)) / (2 * h)
    expected = torch.cos(t)[:, None, None, None] * fd
    assert (gt - expected).norm() / expected.norm() < 1e-4


def test_trigflow_diffusion_loss_is_eq4():
    cfg = load_config(None, ["net.name=mlp", "net.hidden=32", "net.depth=2", "method.name=trigflow"])
    torch.manual_seed(0)
    obj = build_objective(cfg, (3,))
    assert obj.model.kind == "diffusion" and obj.sampler is trigflow_ode_sample
    assert obj.sample_times(8) == obj.process.ode_times(4)
    x0 = torch.randn(16, 3)
    torch.manual_seed(1)
    out = obj.loss({"x": x0}, Progress(0, 100, 16))["loss"]
    torch.manual_seed(1)
    t = trigflow_lognormal_times(16, -1.0, 1.4, SD)
    z = torch.randn_like(x0)
    x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * SD * z
    with torch.no_grad():
        v = SD * obj.model.net(x_t / SD, t)
    target = torch.cos(t)[:, None] * SD * z - torch.sin(t)[:, None] * x0
    assert torch.allclose(out.detach(), (v - target).square().mean(1), rtol=1e-5)


# ----------------------------------------------------------------------------
# sCD with a classifier-free-guided, class-conditional teacher (Sec. 5.2).

K = 3  # classes of the guided toy problems
TINY = ["net.name=mlp", "net.hidden=32", "net.depth=2", "net.embedding=positional"]


def _teacher(class_cond=True, seed=7):
    """A tiny (untrained, randomised) TrigFlow diffusion model, as load_teacher returns it."""
    cfg = load_config(None, [*TINY, "method.name=trigflow", f"net.class_cond={str(class_cond).lower()}"])
    torch.manual_seed(seed)
    teacher = build_objective(cfg, (2,), K).model.double()
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.3)
    teacher.class_cond = class_cond
    return teacher.eval().requires_grad_(False)


def _guided(guidance=1.0, guidance_range=(), guidance_cond=True, teacher=None):
    """A class-conditional sCD student (guidance input on) with a tiny teacher attached in place of a run."""
    import dataclasses

    cfg = load_config(None, [*TINY, "method.name=sct", "net.class_cond=true",
                             f"net.guidance_cond={str(guidance_cond).lower()}", *NO_STABILISERS])
    cfg.method = dataclasses.replace(cfg.method, name="scd", guidance=guidance, guidance_range=list(guidance_range))
    torch.manual_seed(0)
    obj = build_objective(cfg, (2,), K).double()
    torch.nn.init.normal_(obj.model.net.out.weight, std=0.3)
    obj.set_teacher(_teacher() if teacher is None else teacher)
    return obj


def _guided_draw(n=8):
    x0, z, t = _draw(n)
    labels = torch.arange(n) % K
    w = torch.linspace(0.0, 3.0, n, dtype=torch.float64)
    return x0, z, t, labels, w


def test_cfg_teacher_velocity_is_the_guided_combination():
    obj = _guided(guidance_range=[0.0, 3.0])
    x0, z, t, labels, w = _guided_draw()
    x_t = obj.process.add_noise(x0, z, t)
    v = obj.velocity(x0, z, x_t, t, labels, w)
    # Recomputed from the teacher's backbone: F(·, c) with integer labels, F(·, ∅) with no label embedding at all.
    net = obj.teacher.net
    F_cond = net(x_t / SD, t, labels)
    label_table, net.embed.label = net.embed.label, None
    try:
        F_null = net(x_t / SD, t)
    finally:
        net.embed.label = label_table
    assert not torch.allclose(F_cond, F_null)  # the labels matter, so the check below has teeth
    expected = SD * (F_null + w[:, None] * (F_cond - F_null))  # dx_t/dt = σ_d·F (Eq. 3), F guided (Sec. 5.2)
    torch.testing.assert_close(v, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v[0], SD * F_null[0], rtol=1e-12, atol=1e-12)  # w = 0: the unconditional model


def test_guidance_one_reproduces_the_unguided_tangent():
    x0, z, t, labels, _ = _guided_draw()
    ones = torch.ones(8, dtype=torch.float64)
    plain, guided = _guided(), _guided(guidance_range=[1.0, 2.0])  # same seed: identical weights
    x_t = plain.process.add_noise(x0, z, t)
    # method.guidance=1 (the default): the teacher is asked once, as before guidance existed.
    v_plain = plain.velocity(x0, z, x_t, t, labels, ones)
    assert torch.equal(v_plain, plain.teacher(x_t, t, labels))
    assert torch.equal(plain.sample_guidance_scales(8, "cpu", torch.float64), ones)
    # guidance at w = 1 in a guided run gives the same velocity, tangent and loss (to rounding).
    torch.testing.assert_close(guided.velocity(x0, z, x_t, t, labels, ones), v_plain, rtol=1e-12, atol=1e-13)
    _, g_plain = plain.tangent(x_t, t, v_plain, labels, 1.0, ones)
    _, g_guided = guided.tangent(x_t, t, guided.velocity(x0, z, x_t, t, labels, ones), labels, 1.0, ones)
    torch.testing.assert_close(g_guided, g_plain, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(guided.consistency_loss(x0, z, t, labels, guidance=ones)["loss"],
                               plain.consistency_loss(x0, z, t, labels, guidance=ones)["loss"], rtol=1e-10, atol=0)
    # a student without the guidance input and an unguided teacher: the sCD of before, unchanged
    bare = _guided(guidance_cond=False)
    assert bare.sample_guidance_scales(8, "cpu", torch.float64) is None and bare.sample_guidance is None
    assert torch.equal(bare.velocity(x0, z, x_t, t, labels), bare.teacher(x_t, t, labels))


def test_guided_student_depends_on_w_and_learns_through_it():
    from cmkit.sampling import sample_batched

    obj = _guided(guidance=1.5, guidance_range=[1.0, 2.0])
    x0, z, t, labels, _ = _guided_draw()
    x_t = obj.process.add_noise(x0, z, t)
    w1, w2 = torch.ones(8, dtype=torch.float64), torch.full((8,), 2.0, dtype=torch.float64)
    embed = obj.model.net.embed.guidance
    # The guidance embedding starts at zero (a student initialised from its teacher starts as the teacher)...
    assert torch.equal(obj.model(x_t, t, labels, guidance=w1), obj.model(x_t, t, labels, guidance=w2))
    # ...and the loss still reaches it: its last layer gets a gradient at once.
    w = obj.sample_guidance_scales(8, "cpu", torch.float64)
    assert w.min() >= 1.0 and w.max() <= 2.0 and w.unique().numel() == 8  # w ~ U[1, 2] per sample
    obj.zero_grad(set_to_none=True)
    obj.consistency_loss(x0, z, t, labels, guidance=w)["loss"].mean().backward()
    assert embed[2].weight.grad.abs().sum() > 0
    # Once trained away from zero the output depends on w, and every layer of the embedding learns.
    torch.nn.init.normal_(embed[2].weight, std=0.3)
    assert not torch.allclose(obj.model(x_t, t, labels, guidance=w1), obj.model(x_t, t, labels, guidance=w2))
    obj.zero_grad(set_to_none=True)
    obj.consistency_loss(x0, z, t, labels, guidance=w)["loss"].mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in embed.parameters())
    # The tangent's JVP holds w fixed: it matches the finite difference of f(·, ·; w) along the trajectory.
    dxdt = obj.velocity(x0, z, x_t, t, labels, w)
    _, g = obj.tangent(x_t, t, dxdt, labels, 1.0, w)
    h = 1e-5
    fd = (obj.model(x_t + h * dxdt, t + h, labels, guidance=w) - obj.model(x_t - h * dxdt, t - h, labels, guidance=w)) / (2 * h)
    assert (g - torch.cos(t)[:, None] * fd).norm() / g.norm() < 1e-4
    # Sampling passes w; the default (method.guidance) is what training-time samples use.
    assert obj.sample_guidance == 1.5
    model = obj.model.float()
    one_step = {s: sample_batched(model, 4, (2,), [math.pi / 2], class_labels=labels[:4], guidance=s) for s in (1.0, 2.0)}
    noise = torch.randn((4, 2), generator=torch.Generator().manual_seed(0))
    direct = model(SD * noise, torch.full((4,), math.pi / 2), labels[:4], guidance=2.0)
    torch.testing.assert_close(one_step[2.0], direct)
    assert not torch.allclose(one_step[1.0], one_step[2.0])
    with pytest.raises(ValueError, match="guidance"):
        model(SD * noise, torch.full((4,), math.pi / 2), labels[:4])  # a guidance-conditional net needs w


def test_guidance_config_errors():
    with pytest.raises(ConfigError, match="incompatible with consistency training"):
        load_config(None, ["method.name=sct", "method.guidance=2.0"])
    with pytest.raises(ConfigError, match="guidance_range"):
        load_config(None, ["method.name=scd", "method.teacher=x", "method.guidance_range=[2.0, 1.0]"])
    with pytest.raises(ConfigError, match="default sampling scale"):
        load_config(None, ["method.name=scd", "method.teacher=x", "method.guidance=3.0", "method.guidance_range=[1, 2]"])
    with pytest.raises(ConfigError, match="net.guidance_cond=true"):
        _guided(guidance=2.0, guidance_cond=False)
    with pytest.raises(ConfigError, match="class-conditional teacher"):
        _guided(guidance_range=[1.0, 2.0], teacher=_teacher(class_cond=False))
    with pytest.raises(ConfigError, match="class_cond"):
        _guided(teacher=_teacher(class_cond=False))  # unguided, but the student is class-conditional
    with pytest.raises(ConfigError, match="label_dropout"):
        load_config(None, ["method.name=trigflow", "method.label_dropout=1.0"])
    with pytest.raises(ConfigError, match="class-conditional"):
        build_objective(load_config(None, [*TINY, "method.name=trigflow", "method.label_dropout=0.1"]), (2,))


def test_trigflow_label_dropout_gives_the_null_label():
    cfg = load_config(None, [*TINY, "method.name=trigflow", "net.class_cond=true", "method.label_dropout=0.3"])
    obj = build_objective(cfg, (2,), K)
    labels = torch.arange(4000) % K
    torch.manual_seed(0)
    dropped = drop_labels(labels, K, obj.cfg.label_dropout)
    kept = dropped.sum(1) == 1
    assert torch.all(dropped.sum(1)[~kept] == 0)  # a dropped label is the zero vector (the null label)
    assert torch.equal(dropped[kept].argmax(1), labels[kept])
    assert (~kept).float().mean().item() == pytest.approx(0.3, abs=0.03)
    # the loss sees the dropped labels: with every label dropped it equals the loss of the null label
    obj.cfg.label_dropout = 0.999999
    x0 = torch.randn(16, 2)
    torch.manual_seed(1)
    out = obj.loss({"x": x0, "labels": labels[:16]}, Progress(0, 100, 16))["loss"]
    torch.manual_seed(1)
    torch.rand(16, 1)  # the dropout draw
    t = trigflow_lognormal_times(16, -1.0, 1.4, SD)
    z = torch.randn_like(x0)
    with torch.no_grad():
        v = obj.model(obj.process.add_noise(x0, z, t), t, torch.zeros(16, K))
    torch.testing.assert_close(out.detach(), (v - obj.process.velocity_target(x0, z, t)).square().mean(1))


def test_guided_scd_from_a_trigflow_run(tmp_path):
    """The shared teacher loader: a class-conditional TrigFlow run (with label dropout) guides an sCD student
    initialised from it; the student starts as the teacher for every w, and runs sample with a guidance scale."""
    import numpy as np

    from cmkit.run import load
    from cmkit.train import train

    g = np.random.default_rng(0)
    y = np.arange(600) % K
    np.savez(tmp_path / "d.npz", x=g.normal(size=(600, 2)) + y[:, None], y=y)
    base = [*TINY, "data.name=array", f"data.path={tmp_path / 'd.npz'}", "data.labels=true", "net.class_cond=true",
            "run.progress=false", "run.tensorboard=false", "run.sample_steps=[1]", "run.sample_n=6",
            "train.threads=1", "train.steps=2", "train.batch_size=16"]
    teacher_dir = train(load_config(None, [*base, "method.name=trigflow", "method.label_dropout=0.1",
                                           f"run.dir={tmp_path / 'teacher'}"]))
    scd = [*base, "method.name=scd", f"method.teacher={teacher_dir}", "net.guidance_cond=true"]
    cfg = load_config(None, [*scd, "method.guidance=1.5", "method.guidance_range=[1, 2]"])
    obj = build_objective(cfg, (2,), K)
    teacher = load(teacher_dir).model(ema=True)
    x, t, labels = torch.randn(6, 2), torch.full((6,), 0.8), torch.arange(6) % K
    for w in (1.0, 2.0):  # init_from_teacher: the teacher's backbone, a zero guidance embedding
        torch.testing.assert_close(obj.model.net(x, t, labels, guidance=w), teacher.net(x, t, labels))
    obj.train()
    assert not obj.teacher.training  # the teacher's dropout stays off while the student trains
    student = load(train(load_config(None, [*scd, "method.guidance_range=[1, 2]", f"run.dir={tmp_path / 'scd'}"])))
    assert student.objective.sample_guidance == 1.0
    a, b = student.sample(6, guidance=1.0), student.sample(6, guidance=2.0)
    assert a.shape == (6, 2) and torch.isfinite(b).all()
    assert torch.equal(student.sample(6), a)  # the default scale is method.guidance
    # zero-shot editing passes w too: interpolation ends are the plain guided samples of the two seeds
    from cmkit.editing import edit_run

    one = torch.ones(1, dtype=torch.long)
    with torch.no_grad():  # a guidance embedding that has moved away from its zero start, so w matters
        torch.nn.init.normal_(student.model().net.embed.guidance[-1].weight, std=0.5)
    for w in (1.0, 2.0):
        path, _ = edit_run(student, "interpolate", seeds=(3, 7), n=3, label=1, guidance=w)
        torch.testing.assert_close(path[0], student.sample(1, seed=3, class_labels=one, guidance=w)[0])
        torch.testing.assert_close(path[-1], student.sample(1, seed=7, class_labels=one, guidance=w)[0])
    # the teacher itself samples with CFG on its velocity, F(·,∅) + w·(F(·,c) − F(·,∅)) (Ho & Salimans 2021),
    # recomputed here from two separate passes inside the teacher's own ODE sampler
    from cmkit.sampling import cycled_labels, sample_batched

    teacher_run = load(teacher_dir)
    assert teacher_run.guidance_scale() is None and teacher_run.guidance_scale(2.0) == 2.0
    velocity = teacher_run.model(ema=True)
    with torch.no_grad():  # the label table starts small; make the conditional and unconditional halves differ
        for p in velocity.parameters():
            p.add_(0.3 * torch.randn_like(p))

    class ByHand(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w, self.process = w, velocity.process

        def forward(self, x, t, labels):
            c = velocity(x, t, torch.nn.functional.one_hot(labels, K).float())
            u = velocity(x, t, torch.zeros(x.shape[0], K))
            return u + self.w * (c - u)

    times = teacher_run.objective.sample_times(4)
    for w in (0.0, 2.0):
        expected = sample_batched(ByHand(w), 6, (2,), times, sampler=teacher_run.objective.sampler, seed=0,
                                  device="cpu", class_labels=cycled_labels(6, K))
        torch.testing.assert_close(teacher_run.sample(6, steps=4, guidance=w, data_space=False), expected)
    assert not torch.allclose(teacher_run.sample(6, steps=4, guidance=2.0), teacher_run.sample(6, steps=4), atol=1e-3)
    # an unconditional teacher run cannot be guided
    plain_dir = train(load_config(None, [*base, "net.class_cond=false", "data.labels=false", "train.steps=1",
                                         "method.name=trigflow", f"run.dir={tmp_path / 'plain'}"]))
    with pytest.raises(ConfigError, match="class-conditional teacher .classifier-free"):
        build_objective(load_config(None, [*scd, f"method.teacher={plain_dir}", "method.guidance=2.0"]), (2,), K)


# ----------------------------------------------------------------------------
# Audit follow-ups: π/2 numerics, warmup in discrete time, pinned formulas, config checks.


def _captured_tangent(monkeypatch, obj, *args, **kwargs):
    """Run consistency_loss and return the tangent g it passes to normalize_tangent."""
    import cmkit.objectives.scm as scm

    seen = {}
    real = scm.normalize_tangent

    def spy(g, kind, c=0.1, norm="l2"):
        seen["g"] = g.clone()
        return real(g, kind, c, norm)

    monkeypatch.setattr(scm, "normalize_tangent", spy)
    out = obj.consistency_loss(*args, **kwargs)
    return seen["g"], out


@pytest.mark.parametrize("discrete", [False, True])
def test_uniform_weighting_tangent_at_float32_half_pi(monkeypatch, discrete):
    """w = 1 (Eq. 2): g = σ_d sin t·df⁻/dt, also at float32(π/2) = π/2 + 4.4e-8 (the last grid point), where
    cos t < 0 and tan t = -2.3e7; a tan or clamped-cos factor would give the wrong sign or size there."""
    N = 8
    obj = _objective(*NO_STABILISERS, "method.weighting=uniform", f"method.discrete_steps={N if discrete else 0}",
                     dtype=torch.float64)
    x0, z, _ = _draw()
    t = torch.full((8,), torch.tensor(math.pi / 2, dtype=torch.float32).double().item(), dtype=torch.float64)
    assert torch.all(torch.cos(t) < 0)
    g, _ = _captured_tangent(monkeypatch, obj, x0, z, t)
    x_t = obj.process.add_noise(x0, z, t)
    with torch.no_grad():
        if discrete:  # CT: the same x0, z one grid step earlier; d f/dt by the plain difference
            s = t - (math.pi / 2) / N
            dfdt = (_f(obj, x_t, t) - _f(obj, obj.process.add_noise(x0, z, s), s)) / (t - s)[:, None]
        else:
            h, dxdt = 1e-5, obj.process.velocity_target(x0, z, t)
            dfdt = (_f(obj, x_t + h * dxdt, t + h) - _f(obj, x_t - h * dxdt, t - h)) / (2 * h)
    expected = SD * torch.sin(t)[:, None] * dfdt
    assert expected.norm() > 0.1  # a sign error would show
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-9)


def test_discrete_tangent_warmup_scales_the_discrete_sin_term():
    """r multiplies S = (cos t - cos s)x_s - σ_d sin t (F_t - F_s) of f_t - f_s = C + S (Eq. 5), and the
    discrete tangent with warmup r tends to the JVP tangent with the same r (Eq. 6 with r·sin t)."""
    from cmkit.objectives.base import SharedDropout

    obj = _objective(*NO_STABILISERS, dtype=torch.float64)
    x0, z, t = _draw()
    x_t, dxdt = obj.process.add_noise(x0, z, t), obj.process.velocity_target(x0, z, t)
    drop = SharedDropout(x0.device, False)
    s = t - 0.05
    x_s = obj.process.add_noise(x0, z, s)
    _, g0 = obj.finite_difference_tangent(x_t, t, x_s, s, None, drop, r=0.0)
    _, g1 = obj.finite_difference_tangent(x_t, t, x_s, s, None, drop, r=1.0)
    _, gh = obj.finite_difference_tangent(x_t, t, x_s, s, None, drop, r=0.25)
    with torch.no_grad():
        F_t, F_s = obj.model.net(x_t / SD, t), obj.model.net(x_s / SD, s)
        f_t, f_s = _f(obj, x_t, t), _f(obj, x_s, s)
    ct, st, cs_, ss = (fn(a)[:, None] for a in (t, s) for fn in (torch.cos, torch.sin))
    C = ct * (x_t - x_s) - SD * (st - ss) * F_s
    torch.testing.assert_close(g0, ct * C / 0.05, rtol=1e-9, atol=1e-12)  # r = 0: the cos term only
    torch.testing.assert_close(g1, ct * (f_t - f_s) / 0.05, rtol=1e-9, atol=1e-12)  # r = 1: plain difference
    torch.testing.assert_close(gh, 0.75 * g0 + 0.25 * g1, rtol=1e-9, atol=1e-12)  # linear in r
    assert (g1 - g0).abs().max() > 0.1  # the sin term is not negligible, so the checks above have teeth
    # continuous limit with r = 0.3, s → t
    _, g_jvp = obj.tangent(x_t, t, dxdt, r=0.3)
    errs = []
    for dt in (1e-3, 1e-4):
        s = t - dt
        _, g = obj.finite_difference_tangent(x_t, t, obj.process.add_noise(x0, z, s), s, None, drop, r=0.3)
        errs.append(((g - g_jvp).norm() / g_jvp.norm()).item())
    assert errs[1] < 1e-3 and errs[1] < errs[0] / 5, errs


def test_loss_logs_and_applies_warmup_in_discrete_time():
    N, H = 64, 100
    obj = _objective("method.adaptive_weighting=false", "method.tangent_norm=none", f"method.tangent_warmup={H}",
                     f"method.discrete_steps={N}", dtype=torch.float64)
    x0, z, t = _draw()
    step = (math.pi / 2) / N
    t = torch.ceil(t / step) * step
    half = obj.consistency_loss(x0, z, t, progress=Progress(50 * 8, 1000, 8))  # k = 50: r = 0.5
    assert half["r"] == 0.5
    from cmkit.objectives.base import SharedDropout

    x_t, s = obj.process.add_noise(x0, z, t), t - step
    _, g = obj.finite_difference_tangent(x_t, t, obj.process.add_noise(x0, z, s), s, None,
                                         SharedDropout(x0.device, False), r=0.5)
    # F_θ = F_θ⁻ (no dropout); Eq. 8's MSE is formed in float32
    torch.testing.assert_close(half["loss"], g.square().mean(1).float(), rtol=1e-6, atol=1e-9)
    full = obj.consistency_loss(x0, z, t, progress=Progress(200 * 8, 1000, 8))
    assert full["r"] == 1.0 and not torch.allclose(full["loss"], half["loss"])


@pytest.mark.parametrize("kind", ["normalize", "clip"])
def test_consistency_loss_mse_uses_the_stabilised_objective_tangent(kind):
    """Eq. 8 (no w_φ): ‖F_θ - F_θ⁻ - ĝ‖²/D with ĝ = g/(‖g‖ + 0.1) or clip(g, -1, 1), g = the objective's tangent."""
    obj = _objective("method.adaptive_weighting=false", "method.tangent_warmup=0", f"method.tangent_norm={kind}",
                     dtype=torch.float64)
    torch.nn.init.normal_(obj.model.net.out.weight, std=3.0)  # tangents well beyond the clip range
    x0, z, t = _draw()
    out = obj.consistency_loss(x0, z, t)
    x_t, dxdt = obj.process.add_noise(x0, z, t), obj.process.velocity_target(x0, z, t)
    F_minus, g = obj.tangent(x_t, t, dxdt, r=1.0)
    assert g.abs().max() > 1.5 and g.abs().min() < 1  # both clipped and unclipped entries
    if kind == "normalize":
        norm = torch.sqrt((g**2).sum(1, keepdim=True))
        g_hat = g / (norm + 0.1)
    else:
        g_hat = torch.where(g > 1, torch.ones_like(g), torch.where(g < -1, -torch.ones_like(g), g))
    F_theta = obj.model.net(x_t / SD, t)
    expected = ((F_theta - F_minus - g_hat) ** 2).sum(1) / x0.shape[1]
    torch.testing.assert_close(out["loss"], expected.float(), rtol=1e-6, atol=1e-9)  # the MSE is formed in float32
    torch.testing.assert_close(out["mse"], expected.mean().float(), rtol=1e-6, atol=1e-9)
    raw = torch.sqrt((g**2).sum(1)).mean()
    torch.testing.assert_close(out["tangent_norm"], raw, rtol=1e-12, atol=0)


def test_discrete_loss_times_lie_on_the_grid(monkeypatch):
    """discrete_steps = N: loss() evaluates at t_i = i·π/(2N), i = 1..N, t_i the ceiling of the proposal's t,
    so P(t_i) = P(t_{i-1} < t ≤ t_i) under ln(σ_d tan t) ~ N(P_mean, P_std²) (closed form)."""
    N, n = 4, 40000
    obj = _objective(*NO_STABILISERS, f"method.discrete_steps={N}")
    seen = {}
    monkeypatch.setattr(obj, "consistency_loss", lambda x0, z, t, *a, **k: seen.setdefault("t", t))
    torch.manual_seed(0)
    obj.loss({"x": torch.zeros(n, 2)}, Progress(0, 100, n))
    t = seen["t"].double()
    step = math.pi / (2 * N)
    i = torch.round(t / step)
    assert torch.all((t - i * step).abs() < 1e-6) and i.min() >= 1 and i.max() == N
    cdf = lambda a: 0.5 * (1 + math.erf((math.log(SD * math.tan(a)) + 1.0) / (1.4 * math.sqrt(2)))) if a > 0 else 0.0
    for k in range(1, N + 1):
        upper = 1.0 if k == N else cdf(k * step)
        expected = upper - cdf((k - 1) * step)
        assert (i == k).double().mean().item() == pytest.approx(expected, abs=0.01), k


def test_discrete_scd_with_gaussian_teacher_tends_to_continuous_scd():
    """Discrete sCD (one DDIM step of the analytic TrigFlow teacher, Fig. 5c) → continuous sCD (Eq. 8) as N grows."""
    obj = _objective(*NO_STABILISERS, dtype=torch.float64)
    obj.set_teacher(GaussianTrigFlowTeacher(0.5, 0.25, SD))
    x0, z, t0 = _draw(n=16)
    errs = []
    for N in (100, 1000, 10000):
        step = (math.pi / 2) / N
        t = torch.ceil(t0 / step) * step
        obj.cfg.discrete_steps = N
        disc = obj.consistency_loss(x0, z, t)["loss"]
        obj.cfg.discrete_steps = 0
        cont = obj.consistency_loss(x0, z, t)["loss"]
        errs.append(((disc - cont).abs().max() / cont.abs().max()).item())
    assert errs[2] < 1e-3 and errs[0] / errs[1] > 5 and errs[1] / errs[2] > 5, errs  # first order in Δt


def test_scd_teacher_time_conditioning_must_match():
    obj = _objective("method.time_transform=edm")
    with pytest.raises(ConfigError, match="time_transform=edm must equal the teacher's .identity."):
        obj.set_teacher(GaussianTrigFlowTeacher(0.5, 0.25, SD))
    obj = _objective("method.time_scale=1000")
    teacher = GaussianTrigFlowTeacher(0.5, 0.25, SD)
    with pytest.raises(ConfigError, match="time_scale=1000.0 must equal the teacher's .1.0."):
        obj.set_teacher(teacher)
    teacher.process = TrigFlow(SD, time_scale=1000.0)
    obj.set_teacher(teacher)  # matching conditioning is accepted
    assert obj.teacher is teacher


def test_mlp_rejects_a_modulation_it_does_not_have():
    cfg = load_config(None, ["net.name=mlp", "net.modulation=double_norm", "method.name=sct"])
    with pytest.raises(ConfigError, match="net.modulation=double_norm is a U-Net ResBlock option"):
        build_objective(cfg, (2,))


def test_jvp_fp32_keeps_the_tangent_in_float32_under_bf16_autocast():
    obj = _objective()
    x0, z, t = (a.float() for a in _draw())
    x_t, dxdt = obj.process.add_noise(x0, z, t), obj.process.velocity_target(x0, z, t)
    F_ref, g_ref = obj.tangent(x_t, t, dxdt)  # pure float32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F_on, g_on = obj.tangent(x_t, t, dxdt)
    assert F_on.dtype == torch.float32 and torch.equal(F_on, F_ref) and torch.equal(g_on, g_ref)
    obj.cfg.jvp_fp32 = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F_off, g_off = obj.tangent(x_t, t, dxdt)
    assert F_off.dtype == torch.bfloat16  # the network ran under autocast
    err = ((g_off.float() - g_ref).norm() / g_ref.norm()).item()
    assert 1e-6 < err < 3e-2, err  # bf16 precision: different from float32, but the same tangent


def test_adaptive_double_norm_is_norm_times_pnorm_scale_plus_pnorm_shift():
    """sCM Sec. 4.1: y = norm(h)⊙pnorm(s(t)) + pnorm(b(t)), pnorm(v) = v/sqrt(mean_c v² + 1e-8) (Karras 2017, Eq. 2)."""
    from cmkit.nets.layers import ResBlock

    torch.manual_seed(0)
    blk = ResBlock(4, 4, emb_dim=6, num_groups=2, modulation="double_norm").double()
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x, emb = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    seen = {}
    blk.dropout.register_forward_pre_hook(lambda mod, inp: seen.setdefault("act", inp[0].clone()))
    blk(x, emb)
    with torch.no_grad():
        h = blk.conv1(torch.nn.functional.silu(blk.norm1(x)))
        s, b = (blk.emb(torch.nn.functional.silu(emb)) @ torch.eye(8, dtype=torch.float64)).split(4, dim=1)
        # GroupNorm by hand (2 groups of 2 channels, biased variance, eps 1e-5) with its affine γ, β
        hg = h.reshape(3, 2, -1)
        hn = ((hg - hg.mean(-1, keepdim=True)) / torch.sqrt(hg.var(-1, unbiased=False, keepdim=True) + 1e-5))
        hn = hn.reshape(3, 4, 5, 5) * blk.norm2.weight[:, None, None] + blk.norm2.bias[:, None, None]
        pn = lambda v: v / torch.sqrt((v**2).mean(1, keepdim=True) + 1e-8)
        y = hn * pn(s)[:, :, None, None] + pn(b)[:, :, None, None]
    torch.testing.assert_close(seen["act"], torch.nn.functional.silu(y), rtol=1e-10, atol=1e-12)
    film = torch.nn.functional.silu(hn * (1 + s[:, :, None, None]) + b[:, :, None, None])
    assert not torch.allclose(seen["act"], film)  # not AdaGN


def test_positional_embedding_hand_values():
    """[cos(c ω_i), sin(c ω_i)] with ω_i = 10000^(-i/(dim/2)), i = 0..dim/2-1 (Vaswani et al. 2017 Sec. 3.5)."""
    from cmkit.nets.layers import PositionalEmbedding

    c = torch.tensor([0.0, 2.0, -1.5])
    out = PositionalEmbedding(6)(c)
    omegas = [1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)]  # 1, 0.046416, 0.0021544
    for row, cv in zip(out, c.tolist()):
        expected = [math.cos(cv * w) for w in omegas] + [math.sin(cv * w) for w in omegas]
        assert row.tolist() == pytest.approx(expected, abs=1e-6)
    assert out[1, 1].item() == pytest.approx(math.cos(0.0928318), abs=1e-6)  # cos(2·0.0464159)


def test_scd_run_loads_and_resumes_without_its_teacher_run(tmp_path):
    # Like CD (tests/test_cd.py): the sCD checkpoint carries the TrigFlow teacher's weights and run config.
    import shutil

    from cmkit.checkpoint import latest_checkpoint
    from cmkit.run import load
    from cmkit.train import train

    base = [*TINY, "data.name=eight_gaussians", "run.progress=false", "run.tensorboard=false", "run.sample_steps=[]",
            "train.threads=1", "train.batch_size=16"]
    teacher_dir = train(load_config(None, [*base, "method.name=trigflow", "train.steps=2",
                                           f"run.dir={tmp_path / 'teacher'}"]))
    want = load(teacher_dir).model(ema=True).state_dict()
    scd = [*base, "method.name=scd", f"method.teacher={teacher_dir}", "method.tangent_warmup=0",
           f"run.dir={tmp_path / 'scd'}"]
    train(load_config(None, [*scd, "train.steps=2"]))
    before = load(tmp_path / "scd").sample(5, steps=2)
    shutil.move(str(teacher_dir), str(tmp_path / "moved"))
    with pytest.warns(UserWarning, match="saved in this run's checkpoint"):
        run = load(tmp_path / "scd")
    got = run.objective.teacher.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(run.sample(5, steps=2), before)
    with pytest.warns(UserWarning, match="saved in this run's checkpoint"):
        train(load_config(None, [*scd, "train.steps=3"]))
    assert latest_checkpoint(tmp_path / "scd" / "checkpoints")[1]["progress"]["step"] == 3


# ----------------------------------------------------------------------------
# Issue 15 item 5: under autocast the Eq. 8 residual F_θ - F_θ⁻ must be exactly zero.

BF16_UNET = ["net.name=unet", "net.channels=32", "net.channel_mult=[1,2]", "net.num_blocks=1",
             "net.attn_resolutions=[8]", "net.num_groups=8", "method.tangent_warmup=0",
             "method.adaptive_weighting=true"]


def _bf16_step(autocast: bool, monkeypatch, dtype=torch.bfloat16, loss_scale: float = 1.0):
    import cmkit.objectives.scm as scm

    torch.manual_seed(0)
    obj = build_objective(load_config(None, ["method.name=sct", *BF16_UNET]), (3, 16, 16))
    for p in obj.model.net.parameters():  # a trained-looking network: F and its tangent far from zero
        torch.nn.init.normal_(p, std=0.1)
    torch.nn.init.normal_(obj.weight_net.linear.weight, std=0.3)
    seen = {}
    real = scm.normalize_tangent
    monkeypatch.setattr(scm, "normalize_tangent", lambda *a, **k: seen.setdefault("g", real(*a, **k)))
    g = torch.Generator().manual_seed(1)
    x0, z = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    t = torch.rand(8, generator=g) * 1.3 + 0.1
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        out = obj.consistency_loss(x0, z, t)
    params = list(obj.model.net.parameters())  # F_θ's gradient (w_φ's, O(1), would dominate the norm)
    grads = torch.autograd.grad(out["loss"].mean() * loss_scale, params)
    return out, seen["g"], torch.cat([gr.flatten() for gr in grads]) / loss_scale


def test_bf16_autocast_sct_residual_is_exactly_zero_and_gradient_matches_fp32(monkeypatch):
    out16, g16, grad16 = _bf16_step(True, monkeypatch)
    out32, g32, grad32 = _bf16_step(False, monkeypatch)
    assert g16.dtype == torch.float32  # the tangent pass ran in fp32 (method.jvp_fp32)
    assert out16["loss"].dtype == torch.float32  # w_φ and the loss in fp32
    # The residual entering the loss is zero, though the bf16 student output differs from the fp32 F_θ⁻:
    # Eq. 8's mse is exactly ‖g‖²/D.
    torch.testing.assert_close(out16["mse"], g16.flatten(1).square().mean(1).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out32["mse"], g32.flatten(1).square().mean(1).mean(), rtol=1e-6, atol=0)
    # The θ-gradient -2 g·∇F_θ/D (+ w_φ's) equals the fp32 step's to bf16 backward precision.
    rel = ((grad16 - grad32).norm() / grad32.norm()).item()
    assert rel < 0.02, rel
    assert out16["residual_rms"] > 1e-4 and out32["residual_rms"] == 0  # the literal F_θ - F_θ⁻, logged


def test_compile_student_compiles_the_student_pass_only():
    """train.compile on sCM: dynamo traces the student pass; the tangent pass runs the eager network (its JVP
    would fail compiled, MACHINE-NOTES §1); loss and gradients equal the uncompiled objective's."""
    from torch._dynamo.utils import counters

    results = []
    for compiled in (False, True):
        obj = _objective("method.tangent_warmup=0")
        if compiled:
            counters.clear()
            obj.compile_student(backend="eager")  # dynamo only (inductor takes minutes on this CPU)
            assert "_compiled" not in dict(obj.named_children()) and obj.state_dict().keys() == \
                _objective("method.tangent_warmup=0").state_dict().keys()
            calls, real = [], obj._compiled
            obj.__dict__["_compiled"] = lambda *a, **k: calls.append(1) or real(*a, **k)
        x0, z, t = (a.float() for a in _draw())
        loss = obj.consistency_loss(x0, z, t)["loss"].mean()
        grads = torch.autograd.grad(loss, list(obj.model.net.parameters()))
        results.append((loss, grads))
        if compiled:
            assert counters["stats"]["unique_graphs"] >= 1  # the student pass went through dynamo ...
            assert calls == [1]  # ... and only the student pass: the JVP ran the eager network
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b)


def test_channels_last_sct_step_matches_contiguous():
    """train.channels_last: NHWC conv weights and batches; the sCT step (JVP through GroupNorm and attention
    included) gives the contiguous step's loss and gradient norm."""
    from cmkit import distributed
    from cmkit.train import Trainer

    logs = {}
    for cl in ("false", "true"):
        cfg = load_config(None, ["data.name=digits", "method.name=sct", "net.name=unet", "net.channels=16",
                                 "net.channel_mult=[1,2]", "net.num_blocks=1", "net.attn_resolutions=[4]",
                                 "net.num_groups=4", "train.batch_size=8", "train.device=cpu", "train.threads=1",
                                 f"train.channels_last={cl}", "run.progress=false", "run.tensorboard=false"])
        torch.manual_seed(0)
        trainer = Trainer(cfg, distributed.DistInfo(), torch.device("cpu"))
        conv = trainer.objective.model.net.conv_out.weight  # (1, 16, 3, 3): NCHW and NHWC strides differ
        assert conv.is_contiguous(memory_format=torch.channels_last) == (cl == "true")
        torch.manual_seed(1)
        logs[cl] = trainer.train_step(trainer.streams())
    assert math.isfinite(float(logs["true"]["loss"]))
    assert float(logs["true"]["loss"]) == pytest.approx(float(logs["false"]["loss"]), rel=1e-5)
    assert logs["true"]["grad_norm"] == pytest.approx(logs["false"]["grad_norm"], rel=1e-4)


def test_tangent_norm_kind_rms_divides_by_the_per_element_rms():
    g = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # ‖g‖₂ = 5 and 2; D = 4, so RMS = 2.5 and 1
    assert torch.allclose(normalize_tangent(g, "normalize", 0.1, "rms"), g / torch.tensor([[2.6], [1.1]]))
    assert torch.allclose(normalize_tangent(g, "normalize", 0.1, "l2"), g / torch.tensor([[5.1], [2.1]]))
    with pytest.raises(ConfigError, match="tangent_norm_kind"):
        load_config(None, ["method.name=sct", "method.tangent_norm_kind=linf"])
    obj = _objective("method.tangent_norm_kind=rms")
    assert obj.cfg.tangent_norm_kind == "rms"


def test_fp16_autocast_sct_residual_is_zero_and_gradient_matches_fp32(monkeypatch):
    """sCD's precision (fp16, the paper's): the same guarantees under fp16 autocast (CPU autocast; the loss
    scaling of train.precision=fp16 is CUDA-only; here the loss is scaled by hand as GradScaler does, 2^16)."""
    out32, _, grad32 = _bf16_step(False, monkeypatch)
    rel = {}
    for scale in (1.0, 2.0**16):
        out16, g16, grad16 = _bf16_step(True, monkeypatch, torch.float16, scale)
        assert out16["residual_rms"] > 0 and out16["loss"].dtype == torch.float32
        torch.testing.assert_close(out16["mse"], g16.flatten(1).square().mean(1).mean(), rtol=1e-6, atol=0)
        rel[scale] = ((grad16 - grad32).norm() / grad32.norm()).item()
    assert rel[2.0**16] < 0.005, rel  # with loss scaling the fp16 gradient is the fp32 one ...
    assert rel[1.0] > 0.1, rel  # ... without it, fp16 gradients of ~1e-4/D underflow (why sCD fp16 needs scaling)


def test_guidance_term_reaches_the_student_gradient(monkeypatch):
    """Issue 15's contract for sCD with guidance: the CFG part of the teacher velocity, F(·,∅) + w·(F(·,c) − F(·,∅))
    instead of F(·,c), changes the student's θ-gradient by a non-trivial amount. The student sees the same w in
    both calls; only the teacher's guided combination is switched off in the second (w = 1 in the velocity)."""
    obj = _guided(guidance_range=[1.0, 3.0])
    x0, z, t, labels, _ = _guided_draw()
    w = torch.full((8,), 2.5, dtype=torch.float64)
    params = [p for p in obj.model.parameters() if p.requires_grad]

    def grad():
        obj.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        obj.consistency_loss(x0, z, t, labels, guidance=w)["loss"].mean().backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])

    guided = grad()
    velocity = obj.velocity
    monkeypatch.setattr(obj, "velocity", lambda x0_, z_, x_t, t_, labels_, w_: velocity(
        x0_, z_, x_t, t_, labels_, torch.ones_like(w_)))
    conditional_only = grad()
    assert torch.isfinite(guided).all() and all(p.grad is None for p in obj.teacher.parameters())
    assert (guided - conditional_only).norm() > 0.01 * guided.norm()
