"""EDM diffusion: coefficients, loss, Heun/Euler samplers, and the closed-form Gaussian reference."""

import math

import pytest
import torch
from torch import nn

from cmkit.analytic import GaussianTeacher, GaussianVE
from cmkit.config import load_config
from cmkit.model import Parameterized
from cmkit.objectives import build_objective
from cmkit.processes import VEProcess
from cmkit.sampling import euler_sample, euler_step, heun_sample, heun_step, ode_times
from cmkit.schedules import Progress


class ConstNet(nn.Module):
    """Backbone that records its inputs and returns a constant."""

    def __init__(self, value=1.0):
        super().__init__()
        self.value = value
        self.seen = None

    def forward(self, x, c_noise, class_labels=None):
        self.seen = (x.clone(), c_noise.clone())
        return torch.full_like(x, self.value)


class CountingDenoiser(nn.Module):
    """Wraps a denoiser and counts network evaluations (samples per call)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        return self.inner(x, sigma, class_labels)


# ----------------------------------------------------------------------------
# EDM coefficients, hand-computed.


def test_edm_coefficients_hand_values():
    # σ = 0.5, σ_d = 0.5: c_skip = 0.25/0.5 = 0.5, c_out = 0.25/sqrt(0.5), c_in = 1/sqrt(0.5), c_noise = ¼ ln 0.5 (EDM)
    net = ConstNet(1.0)
    D = Parameterized(net, VEProcess(c_noise_scale=0.25), kind="diffusion")
    x = torch.tensor([[2.0, -4.0]])
    out = D(x, torch.tensor([0.5]))
    expected = 0.5 * x + (0.25 / math.sqrt(0.5)) * 1.0
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(net.seen[0], x / math.sqrt(0.5), atol=1e-6)
    assert torch.allclose(net.seen[1], torch.tensor([0.25 * math.log(0.5)]), atol=1e-4)
    # σ = 2: c_skip = 0.25/4.25, c_out = 1/sqrt(4.25); no σ_min offset (unlike the consistency kind)
    out = D(x, torch.tensor([2.0]))
    assert torch.allclose(out, x * 0.25 / 4.25 + 1 / math.sqrt(4.25), atol=1e-6)


def test_edm_loss_is_weighted_l2_with_lognormal_sigma():
    cfg = load_config(None, ["method.name=edm", "net.hidden=32", "net.depth=2"])
    torch.manual_seed(0)
    obj = build_objective(cfg, (2,))
    x0 = torch.randn(16, 2)
    torch.manual_seed(3)
    out = obj.loss({"x": x0}, Progress(0, 100, 16))["loss"]
    torch.manual_seed(3)  # recompute from the same draws, independently of the objective's code
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(16))
    z = torch.randn(16, 2)
    with torch.no_grad():
        d = obj.model(x0 + sigma[:, None] * z, sigma)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert torch.allclose(out.detach(), weight * ((d - x0) ** 2).sum(1), rtol=1e-5)
    # the proposal is lognormal(-1.2, 1.2)
    log_sigma = torch.log(obj.sample_sigmas(200_000, "cpu"))
    assert abs(log_sigma.mean().item() + 1.2) < 0.02 and abs(log_sigma.std().item() - 1.2) < 0.02


def test_edm_weight_is_one_over_c_out_squared():
    from cmkit.objectives.diffusion import edm_weight

    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    _, c_out, _, _ = VEProcess().scalings(sigma, "diffusion")
    assert torch.allclose(edm_weight(sigma, 0.5), 1 / c_out**2)


# ----------------------------------------------------------------------------
# Samplers against hand-computed values. Denoiser of N(0, 1): D(x, σ) = x/(1 + σ²).

STD_NORMAL = GaussianTeacher(torch.zeros(1), 1.0)


def test_euler_and_heun_step_hand_values():
    # x = 1 at σ = 2 -> σ = 1: d = x·σ/(1+σ²) = 0.4; Euler 1 - 0.4 = 0.6;
    # d' = 0.6·1/2 = 0.3; Heun 1 - (0.4 + 0.3)/2 = 0.65 (exact: sqrt(2/5) = 0.6325)
    x = torch.ones(1, 1)
    assert torch.allclose(euler_step(STD_NORMAL, x, 2.0, 1.0), torch.tensor([[0.6]]))
    assert torch.allclose(heun_step(STD_NORMAL, x, 2.0, 1.0), torch.tensor([[0.65]]))


def test_heun_sampler_hand_value_and_last_step_euler():
    # grid [2, 1, 0], noise 0.5 -> x = 1; Heun to σ=1 gives 0.65; Euler to 0: 0.65 - 0.65/2 = 0.325
    out = heun_sample(STD_NORMAL, torch.full((1, 1), 0.5), [2.0, 1.0, 0.0])
    assert torch.allclose(out, torch.tensor([[0.325]]))
    out = euler_sample(STD_NORMAL, torch.full((1, 1), 0.5), [2.0, 1.0, 0.0])
    assert torch.allclose(out, torch.tensor([[0.3]]))  # 1 -> 0.6 -> 0.6 - 0.6/2


@pytest.mark.parametrize("solver", ["heun", "euler"])
@pytest.mark.parametrize("nfe", [1, 2, 3, 10, 35])
def test_ode_times_give_exact_nfe(solver, nfe):
    times = ode_times(nfe, 0.002, 80.0, 7.0, solver)
    counter = CountingDenoiser(STD_NORMAL)
    (heun_sample if solver == "heun" else euler_sample)(counter, torch.randn(4, 2), times)
    assert counter.calls == nfe
    assert times[0] == 80.0 and (times[-1] == 0.0 or abs(times[-1] - 0.002) < 1e-12)
    if solver == "heun" and nfe == 35:
        assert len(times) == 19  # EDM's 18 Karras points then 0


def test_edm_objective_sample_times_are_nfe():
    cfg = load_config(None, ["method.name=edm", "net.hidden=32", "net.depth=2"])
    obj = build_objective(cfg, (2,))
    assert obj.sampler is heun_sample
    assert obj.sample_times(35) == ode_times(35, 0.002, 80.0, 7.0, "heun")
    cfg = load_config(None, ["method.name=edm", "method.sampler=euler", "net.hidden=32", "net.depth=2"])
    assert build_objective(cfg, (2,)).sampler is euler_sample


# ----------------------------------------------------------------------------
# The closed-form Gaussian reference (cmkit.analytic) against independent computations.

G = GaussianVE(torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5)


def test_score_is_gradient_of_log_density():
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 80.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(G.log_density(x, sigma).sum(), x)
    assert torch.allclose(G.score(x.detach(), sigma), grad, rtol=1e-10)
    # Tweedie: D = x + σ² score
    xd = x.detach()
    assert torch.allclose(G.denoiser(xd, sigma), xd + sigma[:, None] ** 2 * G.score(xd, sigma))


def test_trajectory_solves_pf_ode_by_finite_differences():
    x = torch.randn(4, 2, dtype=torch.float64)
    for s in (0.05, 0.7, 10.0):
        h = 1e-5 * s
        fd = (G.trajectory(x, 1.0, s + h) - G.trajectory(x, 1.0, s - h)) / (2 * h)
        xs = G.trajectory(x, 1.0, s)
        # dx/dσ = -σ ∇ log p_σ(x) (iCT Eq. 1)
        assert torch.allclose(fd, -s * G.score(xs, s), rtol=1e-6, atol=1e-9)


def test_consistency_function_boundary_and_self_consistency():
    x = torch.randn(6, 2, dtype=torch.float64)
    assert torch.allclose(G.consistency(x, 0.002), x)
    # constant along a trajectory: f*(x(σ), σ) = f*(x(σ'), σ')
    for s, s2 in [(0.1, 3.0), (5.0, 80.0)]:
        assert torch.allclose(G.consistency(G.trajectory(x, 1.0, s), s), G.consistency(G.trajectory(x, 1.0, s2), s2))
    # the teacher module is the same denoiser
    teacher = GaussianTeacher(torch.tensor([1.0, -0.5]), 0.5)
    sig = torch.tensor([0.2, 1.0, 3.0, 9.0, 20.0, 80.0])
    assert torch.allclose(teacher(x.float(), sig), G.denoiser(x, sig.double()).float(), atol=1e-6)


def test_heun_and_euler_steps_have_their_order():
    """Local error of one step from σ to σ - h: O(h²) for Euler, O(h³) for Heun (global orders 1 and 2)."""
    teacher = GaussianTeacher(torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5).double()
    x = torch.randn(64, 2, dtype=torch.float64)
    sigma = 1.0
    errs = {"euler": [], "heun": []}
    hs = [0.2, 0.1, 0.05]
    for h in hs:
        exact = G.trajectory(x, sigma, sigma - h)
        errs["euler"].append((euler_step(teacher, x, sigma, sigma - h) - exact).abs().max().item())
        errs["heun"].append((heun_step(teacher, x, sigma, sigma - h) - exact).abs().max().item())
    for a, b in zip(errs["euler"], errs["euler"][1:]):
        assert 3.3 < a / b < 4.7, errs
    for a, b in zip(errs["heun"], errs["heun"][1:]):
        assert 6.5 < a / b < 9.5, errs


def test_heun_sampler_follows_closed_form_trajectory():
    """Full Heun solves from σ_max = 80 converge to the exact x(0) at global order 2."""
    teacher = GaussianTeacher(torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5).double()
    noise = torch.randn(128, 2, dtype=torch.float64)
    exact = G.trajectory(noise * 80.0, 80.0, 0.0)
    err = {}
    for nfe in (35, 199, 399):
        out = heun_sample(teacher, noise, ode_times(nfe, 0.002, 80.0, 7.0, "heun"))
        err[nfe] = (out - exact).abs().mean().item()
    assert err[35] < 0.05  # EDM's 35-NFE budget: within 10% of the data std s = 0.5
    assert 3.3 < err[199] / err[399] < 4.7, err  # doubling the steps quarters the error


# ----------------------------------------------------------------------------
# End to end: EDM on eight Gaussians, Heun sampling, and `cmkit sample` on the run.


@pytest.mark.slow
def test_edm_eight_gaussians_beats_untrained(tmp_path):
    from cmkit.cli import main
    from cmkit.data import load_dataset
    from cmkit.run import load
    from cmkit.train import train
    from cmkit_testutils import sliced_wasserstein

    cfg = load_config("configs/edm_toy.yaml", [
        f"run.dir={tmp_path / 'edm'}", "train.steps=1200", "net.hidden=64", "net.depth=3", "train.lr=2e-3", "train.ema=0.99",
        "run.progress=false", "run.tensorboard=false", "run.sample_steps=[9]", "run.sample_n=64",
        "train.threads=1",
    ])
    torch.manual_seed(0)
    untrained = build_objective(cfg, (2,))
    run_dir = train(cfg)
    run = load(run_dir)
    data = load_dataset(cfg.data).x[:2000]
    gen = run.sample(2000, steps=35, data_space=False, seed=1)
    times = untrained.sample_times(35)
    from cmkit.sampling import sample_batched

    base = sample_batched(untrained.model, 2000, (2,), times, sampler=untrained.sampler, seed=1)
    sw_trained, sw_untrained = sliced_wasserstein(gen, data), sliced_wasserstein(base, data)
    assert sw_trained < 0.1 and sw_trained < sw_untrained / 4, (sw_trained, sw_untrained)
    # `cmkit sample` on a diffusion run: --steps is the NFE budget
    out = tmp_path / "s.npz"
    assert main(["sample", str(run_dir), "--steps", "3", "--n", "16", "--out", str(out)]) == 0
    import numpy as np

    assert np.load(out)["samples"].shape == (16, 2)


def test_edm_c_noise_default_is_ln_sigma_and_documented():
    # cmkit keeps c_noise = 1·ln σ for EDM teachers (not EDM's ¼·ln σ); the config's docstring says so and why.
    from cmkit.objectives.diffusion import EDMConfig

    assert EDMConfig().c_noise_scale == 1.0
    assert "¼·ln σ" in EDMConfig.__doc__ and "init_from_teacher" in EDMConfig.__doc__
    obj = build_objective(load_config(None, ["method.name=edm", "net.name=mlp", "net.hidden=8", "net.depth=1"]), (2,))
    sigma = torch.tensor([0.5, 2.0, 80.0])
    assert torch.allclose(obj.process.scalings(sigma, "diffusion")[3], torch.log(sigma))
