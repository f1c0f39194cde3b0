"""VE process and the consistency parameterisation (papers/README.md; iCT Eq. 2)."""

import math

import pytest
import torch
from torch import nn

from cmkit.model import Parameterized
from cmkit.processes import VEProcess


def test_consistency_scalings_by_hand():
    p = VEProcess()
    t = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, _ = p.scalings(t)
    # sigma = 1: (1 - 0.002)^2 = 0.996004; c_skip = 0.25 / 1.246004; c_out = 0.5*0.998/sqrt(1.25)
    assert c_skip[1].item() == pytest.approx(0.25 / 1.246004, rel=1e-12)
    assert c_out[1].item() == pytest.approx(0.499 / 1.25 ** 0.5, rel=1e-12)
    assert c_in[1].item() == pytest.approx(1 / 1.25 ** 0.5, rel=1e-12)
    # boundary: c_skip(sigma_min) = 1, c_out(sigma_min) = 0 exactly
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    # sigma = 80: c_skip ~ 0, c_out ~ sigma_data
    assert c_skip[2].item() == pytest.approx(0.25 / (79.998 ** 2 + 0.25), rel=1e-12)
    assert c_out[2].item() == pytest.approx(0.5 * 79.998 / (0.25 + 6400) ** 0.5, rel=1e-12)


def test_diffusion_scalings_edm():
    p = VEProcess()
    t = torch.tensor([2.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = p.scalings(t, "diffusion")
    assert c_skip.item() == pytest.approx(0.25 / 4.25)
    assert c_out.item() == pytest.approx(2 * 0.5 / 4.25 ** 0.5)
    assert c_noise.item() == pytest.approx(torch.log(t).item())  # default c_noise_scale 1: ln σ
    c_noise_adm = VEProcess(c_noise_scale=250.0).scalings(t, "diffusion")[3]
    assert c_noise_adm.item() == pytest.approx(250 * torch.log(t).item())  # ADM's 250·ln σ


class Wild(nn.Module):
    def forward(self, x, c_noise, class_labels=None):
        return 1e3 * torch.sin(x * 7 + c_noise.view(-1, *[1] * (x.ndim - 1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundary_condition_exact(dtype):
    f = Parameterized(Wild(), VEProcess())
    x = torch.randn(5, 1, 4, 4, dtype=dtype)
    t = torch.full((5,), 0.002, dtype=dtype)
    assert torch.equal(f(x, t), x)


def test_sigma_data_configurable():
    p = VEProcess(sigma_data=1.0)
    c_skip, *_ = p.scalings(torch.tensor([1.002], dtype=torch.float64))
    assert c_skip.item() == pytest.approx(0.5)


def test_renoise_and_sampling_times():
    p = VEProcess()
    x0 = torch.zeros(3, 2)
    z = torch.ones(3, 2)
    out = p.renoise(x0, torch.full((3,), 0.821), z)
    assert torch.allclose(out, torch.full((3, 2), (0.821 ** 2 - 0.002 ** 2) ** 0.5))
    assert p.sampling_times(1) == [80.0]
    assert p.sampling_times(2) == [80.0, 0.821]
    t3 = p.sampling_times(3)
    assert t3[0] == pytest.approx(80.0) and len(t3) == 3 and t3[1] > t3[2] > 0.002


def test_trigflow_edm_c_noise_is_finite_and_largest_at_float32_half_pi():
    """EDM c_noise = ¼ ln(σ_d tan t) (sCM App. B.2): float32(π/2) lies 4.4e-8 beyond π/2, where tan t < 0."""
    from cmkit.processes import TrigFlow

    p = TrigFlow(sigma_data=0.5, time_transform="edm")
    t_max = torch.tensor([p.t_max])  # float32(π/2), where the one-step and ODE samplers start
    assert t_max.double().item() > math.pi / 2  # the premise: tan(t_max) = -2.3e7
    below = torch.nextafter(t_max, torch.tensor([0.0]))  # the largest float32 under π/2
    t = torch.tensor([1.5, below.item(), t_max.item()])
    c = p.c_noise(t)
    assert torch.isfinite(c).all()
    assert c[0].item() == pytest.approx(0.25 * math.log(0.5 * math.tan(1.5)), rel=1e-6)  # 0.48826
    # σ at the largest float32 below π/2 is 0.5/cos(t) with cos(t) = π/2 - t = 7.55e-8 (to 1e-22)
    assert c[1].item() == pytest.approx(0.25 * math.log(0.5 / (math.pi / 2 - below.double().item())), rel=1e-5)
    assert c[2] > c[1] > c[0] > 0  # increasing up to the sampler's start, not the t ≈ 0 value ¼ ln(1e-20)
    # the float64 transform matches the closed form below π/2
    t64 = torch.tensor([0.3, 1.2, 1.57], dtype=torch.float64)
    ref = 0.25 * torch.log(0.5 * torch.tan(t64))
    torch.testing.assert_close(p.c_noise(t64), ref, rtol=1e-12, atol=0)
