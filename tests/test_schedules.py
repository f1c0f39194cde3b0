"""Curricula, EMA rate, noise-level distribution and weighting against the iCT paper's formulas."""

import math

import pytest
import torch
from scipy.stats import norm

from cmkit.schedules import (
    Progress,
    ct_teacher_ema,
    karras_sigmas,
    lognormal_index_probs,
    lr_warmup,
    n_exp,
    n_sqrt,
    pseudo_huber_c,
    reciprocal_weighting,
    uniform_index_probs,
)


def test_exp_curriculum_ict_k400k_by_hand():
    # iCT Eq. 9 with K = 400k, s0 = 10, s1 = 1280: log2(128) = 7, K' = 400000 // 8 = 50000,
    # N doubles (minus the +1) every 50k iterations: 11, 21, 41, ..., capped at 1281.
    K = 400_000
    expected = {0: 11, 49_999: 11, 50_000: 21, 100_000: 41, 150_000: 81, 200_000: 161,
                250_000: 321, 300_000: 641, 350_000: 1281, 399_999: 1281, 400_000: 1281}
    for k, n in expected.items():
        assert n_exp(k, K, 10, 1280) == n, k


def test_exp_curriculum_ilct_s1_640():
    # s1/s0 = 64 -> log2 = 6, K' = K // 7.
    K = 70_000
    assert [n_exp(k, K, 10, 640) for k in (0, 9_999, 10_000, 20_000, 60_000, 69_999)] == [11, 11, 21, 41, 641, 641]


def test_sqrt_curriculum_by_hand():
    # iCT Table 1 (left): N(k) = ceil(sqrt(k/K((s1+1)^2 - s0^2) + s0^2) - 1) + 1, s0 = 2, s1 = 150.
    K = 100
    assert n_sqrt(0, K, 2, 150) == 2  # ceil(2 - 1) + 1
    assert n_sqrt(K, K, 2, 150) == 151  # ceil(151 - 1) + 1
    # k = K/2: sqrt(0.5 * (22801 - 4) + 4) = sqrt(11402.5) = 106.78..., -1 -> 105.78, ceil 106, +1
    assert n_sqrt(50, K, 2, 150) == 107
    ns = [n_sqrt(k, K, 2, 150) for k in range(K + 1)]
    assert ns == sorted(ns)


def test_ct_teacher_ema():
    # mu(k) = exp(s0 log mu0 / N(k)); at N = s0 it equals mu0.
    assert ct_teacher_ema(2, 2, 0.9) == pytest.approx(0.9)
    assert ct_teacher_ema(151, 2, 0.9) == pytest.approx(0.9 ** (2 / 151))
    assert ct_teacher_ema(11, 2, 0.9) < ct_teacher_ema(101, 2, 0.9) < 1
    # mu0 = 0 (accepted by validate): the limit exp(s0 log mu0 / N) -> 0, no math domain error.
    assert ct_teacher_ema(11, 2, 0.0) == 0.0


def test_karras_grid_endpoints_and_formula():
    s = karras_sigmas(11, 0.002, 80.0, 7.0)
    assert s[0].item() == pytest.approx(0.002, rel=1e-12)
    assert s[-1].item() == pytest.approx(80.0, rel=1e-12)
    i = 3  # paper index i = 4
    ref = (0.002 ** (1 / 7) + i / 10 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(ref, rel=1e-12)
    assert torch.all(s[1:] > s[:-1])


@pytest.mark.parametrize("n", [11, 161, 1281])
def test_lognormal_probs_against_gaussian_cdf(n):
    sigmas = karras_sigmas(n, 0.002, 80.0, 7.0)
    p = lognormal_index_probs(sigmas, -1.1, 2.0)
    assert p.shape == (n - 1,)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    # erf((a - m)/(sqrt2 s)) differences are 2 * (Phi(b) - Phi(a)); normalised they coincide.
    cdf = norm.cdf((torch.log(sigmas).numpy() + 1.1) / 2.0)
    ref = cdf[1:] - cdf[:-1]
    ref = ref / ref.sum()
    assert torch.allclose(p, torch.from_numpy(ref), rtol=1e-9, atol=1e-14)
    assert torch.all(p > 0)


def test_uniform_probs():
    p = uniform_index_probs(karras_sigmas(5, 0.002, 80.0, 7.0))
    assert torch.allclose(p, torch.full((4,), 0.25, dtype=p.dtype))


def test_reciprocal_weighting_decreases():
    s = karras_sigmas(41, 0.002, 80.0, 7.0)
    lam = reciprocal_weighting(s[:-1], s[1:])
    assert torch.all(lam[1:] < lam[:-1])  # iCT Sec. 3.1: smaller weight at higher noise


def test_reciprocal_weighting_golden_values():
    # N = 2: the grid is [σ_min, σ_max], so λ(σ_1) = 1/(80 - 0.002) = 1/79.998.
    s = karras_sigmas(2, 0.002, 80.0, 7.0)
    assert reciprocal_weighting(s[:1], s[1:]).item() == pytest.approx(1 / 79.998, rel=1e-12)
    # N = 11, the pair (σ_1, σ_2) in the paper's 1-based indices, by hand from iCT Sec. 2's grid:
    # σ_i = (a + (i-1)/10·(b - a))^7 with a = 0.002^(1/7) = 0.41156, b = 80^(1/7) = 1.87012;
    # a + 0.1·(b - a) = 0.557416; its square 0.310713, 4th power 0.096543, 6th 0.029997, 7th 0.016721,
    # so λ = 1/(0.016721 - 0.002) = 1/0.014721 = 67.93.
    a, b = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    assert a == pytest.approx(0.41156, abs=1e-5) and b == pytest.approx(1.87012, abs=1e-5)
    sigma2 = (a + 0.1 * (b - a)) ** 7
    assert sigma2 == pytest.approx(0.016721, abs=1e-6)
    s = karras_sigmas(11, 0.002, 80.0, 7.0)
    lam = reciprocal_weighting(s[:-1], s[1:])
    assert lam[0].item() == pytest.approx(1 / (sigma2 - 0.002), rel=1e-10)
    assert lam[0].item() == pytest.approx(67.93, abs=0.01)
    # the last pair (σ_10, σ_11 = 80): σ_10 = (a + 0.9·(b - a))^7
    sigma10 = (a + 0.9 * (b - a)) ** 7
    assert lam[-1].item() == pytest.approx(1 / (80.0 - sigma10), rel=1e-10)


def test_pseudo_huber_c_cifar():
    # iCT Sec. 3.3: c = 0.00054 sqrt(d); CIFAR-10 (d = 3072) gives ~0.03.
    assert pseudo_huber_c(3072) == pytest.approx(0.00054 * math.sqrt(3072))
    assert pseudo_huber_c(3072) == pytest.approx(0.0299, abs=1e-4)


def test_progress_and_warmup():
    p = Progress(nimg=1280, total_nimg=12800, batch_size=128)
    assert (p.k, p.K, p.fraction) == (10, 100, 0.1)
    assert lr_warmup(50, 100) == 0.5 and lr_warmup(500, 100) == 1.0 and lr_warmup(0, 0) == 1.0


def test_lr_inv_sqrt_hand_values():
    from cmkit.schedules import lr_inv_sqrt

    # EDM2: lr = ref / sqrt(max(t / t_ref, 1)); flat before t_ref, 1/2 at 4 t_ref, 1/3 at 9 t_ref.
    assert lr_inv_sqrt(0, 100) == 1.0 and lr_inv_sqrt(100, 100) == 1.0
    assert lr_inv_sqrt(400, 100) == 0.5 and abs(lr_inv_sqrt(900, 100) - 1 / 3) < 1e-15
    assert lr_inv_sqrt(10**9, 0) == 1.0


def test_phase_settings_override_train_defaults_and_reach_the_optimiser():
    import torch

    from cmkit.config import TrainConfig
    from cmkit.optim import make_optimizer, phase_settings

    tc = TrainConfig(lr=3e-4, betas=[0.9, 0.99], eps=1e-6)
    s = phase_settings(tc, {"lr": 2e-3, "betas": [0.0, 0.99], "optimizer": "adam"})
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], s)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.Adam) and group["lr"] == 2e-3 and group["betas"] == (0.0, 0.99)
    assert group["eps"] == 1e-6  # not overridden: the train section's value
    assert phase_settings(tc).lr == 3e-4


def test_lr_anneal_hand_values():
    """Cosine and linear annealing: 1 at the start, the final fraction at the end, hand values between."""
    import math

    from cmkit.schedules import lr_anneal

    assert lr_anneal(0, 0, 100, "cosine") == 1.0 and lr_anneal(100, 0, 100, "cosine") == 0.0
    assert abs(lr_anneal(50, 0, 100, "cosine") - 0.5) < 1e-15
    assert abs(lr_anneal(25, 0, 100, "cosine") - (1 + math.sqrt(0.5)) / 2) < 1e-15  # ½(1 + cos(π/4))
    assert abs(lr_anneal(50, 0, 100, "cosine", final=0.2) - 0.6) < 1e-15
    assert lr_anneal(75, 50, 150, "linear") == 0.75 and lr_anneal(10, 50, 150, "linear") == 1.0
    assert abs(lr_anneal(150, 50, 150, "linear", final=0.1) - 0.1) < 1e-15 and lr_anneal(999, 50, 150, "linear") == 0.0
    assert lr_anneal(50, 0, 100, "none") == 1.0


def test_lr_multiplier_composes_warmup_and_anneal():
    """train.lr_decay anneals from the end of warm-up to steps × batch_size; warm-up still ramps before it."""
    from cmkit.config import TrainConfig
    from cmkit.optim import lr_multiplier

    tc = TrainConfig(steps=100, batch_size=10, warmup_nimg=200, lr_decay="linear", lr_final=0.0)
    assert lr_multiplier(100, tc) == 0.5  # half-way through warm-up, no decay yet
    assert lr_multiplier(200, tc) == 1.0
    assert abs(lr_multiplier(600, tc) - 0.5) < 1e-12  # (600 − 200) / (1000 − 200) = ½ of the way down
    assert lr_multiplier(1000, tc) == 0.0
    with pytest.raises(ValueError, match="train.lr_decay"):
        TrainConfig(lr_decay="step").validate()
    with pytest.raises(ValueError, match="train.lr_final"):
        TrainConfig(lr_final=1.5).validate()
