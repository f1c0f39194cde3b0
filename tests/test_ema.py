"""EMA: warm-up and EDM2 power-function profiles against closed forms, post-hoc reconstruction, exact resume."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from cmkit.cli import main
from cmkit.config import ConfigError, load_config
from cmkit.ema import (EMA, gamma_to_sigma_rel, list_snapshots, posthoc_coefficients, power_inner_product,
                       reconstruct, save_snapshot, sigma_rel_to_gamma)
from cmkit.train import train
from cmkit_testutils import assert_states_equal

B = 8  # images per step in the scalar sequences below


class Scalar(nn.Module):
    def __init__(self, dim: int = 1):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim, dtype=torch.float64))


def _run_sequence(ema: EMA, net: Scalar, values) -> list[float]:
    """θ after step k+1 is values[k]; the EMA after each update (index 0 module)."""
    out = []
    for k, v in enumerate(values):
        with torch.no_grad():
            net.w.copy_(torch.as_tensor(v, dtype=torch.float64))
        ema.update(net, nimg=k * B, batch_size=B)
        out.append(ema.modules[0].w.detach().clone())
    return out


def test_warmup_ema_equals_its_closed_form():
    # μ_k = (1+k)/(10+k) telescopes: after t updates θ_0 keeps 9!·t!/(t+9)! and θ_{k+1} gets
    # 9·(k+2)(k+3)…(k+9) / ((t+1)…(t+9)); once the ramp passes μ (k ≥ 170 for μ = 0.95) it is a plain EMA.
    net = Scalar()
    with torch.no_grad():
        net.w.fill_(5.0)  # θ_0, the initial weights
    ema = EMA(net, [0.95], warmup=True)
    theta = [math.sin(0.05 * k) + 0.01 * k for k in range(1, 301)]  # θ_1 … θ_300
    got = _run_sequence(ema, net, theta)
    for t in (1, 2, 10, 100, 170):
        w0 = math.factorial(9) * math.factorial(t) / math.factorial(t + 9)
        den = math.prod(t + m for m in range(1, 10))
        expected = w0 * 5.0 + sum(9 * math.prod(k + m for m in range(2, 10)) / den * theta[k] for k in range(t))
        assert got[t - 1].item() == pytest.approx(expected, rel=1e-12, abs=1e-12), t
    # the ramp reaches 0.95 at k = 170 ((1+k)/(10+k) >= 0.95 <=> k >= 170): from there on μ = 0.95
    k0 = 170
    value = got[k0 - 1].item()  # after updates 0..k0-1 (all ramped)
    for k in range(k0, 300):
        value = 0.95 * value + 0.05 * theta[k]
    assert got[-1].item() == pytest.approx(value, rel=1e-12)


def test_fixed_rate_without_warmup_is_unchanged():
    net = Scalar()
    ema = EMA(net, [0.9])
    got = _run_sequence(ema, net, [1.0] * 20)
    assert got[-1].item() == pytest.approx(1 - 0.9 ** 20, rel=1e-12)  # θ_0 = 0 keeps 0.9^20


def test_sigma_rel_gamma_conversion():
    # EDM2 Sec. 3.1 quotes γ = 16.97 and 6.94 for σ_rel = 0.05 and 0.10.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    # σ_rel is the standard deviation of p(τ) = (γ+1)τ^γ on [0, 1], integrated here numerically
    tau = (np.arange(2_000_000) + 0.5) / 2_000_000
    for gamma in (0.5, 4.0, 16.97):
        p = (gamma + 1) * tau ** gamma / len(tau)
        mean = (p * tau).sum()
        assert math.sqrt((p * (tau - mean) ** 2).sum()) == pytest.approx(gamma_to_sigma_rel(gamma), rel=1e-6)
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-10)
    with pytest.raises(ValueError):
        sigma_rel_to_gamma(0.3)


def test_power_function_ema_equals_its_closed_form():
    # β_t = (1 − 1/t)^(γ+1) gives θ_i the weight (i^(γ+1) − (i−1)^(γ+1)) / t^(γ+1): with θ_i = i the average is
    # Σ i·(i^(γ+1) − (i−1)^(γ+1)) / t^(γ+1), whatever the initial weights (β_1 = 0).
    net = Scalar()
    with torch.no_grad():
        net.w.fill_(123.0)
    ema = EMA(net, [], stds=[0.1])
    gamma = sigma_rel_to_gamma(0.1)
    t_max = 400
    got = _run_sequence(ema, net, [float(i) for i in range(1, t_max + 1)])
    for t in (1, 2, 7, 50, 400):
        expected = sum(i * (i ** (gamma + 1) - (i - 1) ** (gamma + 1)) for i in range(1, t + 1)) / t ** (gamma + 1)
        assert got[t - 1].item() == pytest.approx(expected, rel=1e-10), t
    # and the continuous profile's mean, (γ+1)/(γ+2)·t, up to the half-step of the discretisation
    assert got[-1].item() == pytest.approx((gamma + 1) / (gamma + 2) * t_max + 0.5 * (gamma + 1) / (gamma + 2), rel=1e-3)


def test_power_inner_product_matches_numerical_integration():
    tau = (np.arange(4_000_000) + 0.5) / 4_000_000 * 100.0
    dt = 100.0 / len(tau)

    def p(t, g):
        return np.where(tau <= t, (g + 1) * tau ** g / t ** (g + 1), 0.0)

    for (ta, ga, tb, gb) in [(100.0, 6.94, 60.0, 16.97), (30.0, 2.0, 100.0, 6.94), (80.0, 3.0, 80.0, 3.0)]:
        numeric = (p(ta, ga) * p(tb, gb)).sum() * dt
        assert power_inner_product(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-4)
        assert power_inner_product(ta, ga, tb, gb) == pytest.approx(power_inner_product(tb, gb, ta, ga), rel=1e-12)


def _trajectory(t: int, total: int) -> torch.Tensor:
    """A smooth 3-vector of weights at step t (the slow drift of a parameter during training)."""
    s = t / total
    return torch.tensor([math.sin(3 * s), math.exp(-2 * s), s ** 2 - 0.5 * s], dtype=torch.float64)


def test_posthoc_reconstruction_recovers_a_tracked_profile(tmp_path):
    # Track σ_rel 0.05 and 0.10 with snapshots every 20 steps, and σ_rel 0.07 directly; reconstruct 0.07.
    total, every = 1000, 20
    net = Scalar(3)
    stored = EMA(net, [], stds=[0.05, 0.10])
    direct = EMA(net, [], stds=[0.07])
    for k in range(total):
        with torch.no_grad():
            net.w.copy_(_trajectory(k + 1, total))
        stored.update(net, k * B, B)
        direct.update(net, k * B, B)
        if (k + 1) % every == 0:
            save_snapshot(tmp_path, (k + 1) * B, stored)
    assert len(list_snapshots(tmp_path)) == total // every
    weights, info = reconstruct(tmp_path, 0.07)
    assert info["nimg"] == total * B and len(info["inputs"]) == 2 * total // every
    target = direct.modules[0].w.double()
    err = (weights["w"].double() - target).abs().max().item()
    # the nearest stored profile (the last 0.05 snapshot) is what a user would get without reconstruction
    naive = (stored.modules[0].w.double() - target).abs().max().item()
    assert err < 5e-6 and naive > 1000 * err, (err, naive)
    # a stored profile at the last snapshot is reconstructed as itself (coefficient 1 on it)
    weights_05, _ = reconstruct(tmp_path, 0.05)
    torch.testing.assert_close(weights_05["w"].double(), stored.modules[0].w.double(), rtol=0, atol=1e-6)
    # and an earlier time: σ_rel 0.07 at half-way
    assert reconstruct(tmp_path, 0.07, nimg=total // 2 * B)[1]["nimg"] == total // 2 * B


def test_posthoc_coefficients_sum_to_one_and_pick_an_exact_match():
    x = posthoc_coefficients([10, 20, 20], [sigma_rel_to_gamma(0.05)] * 2 + [sigma_rel_to_gamma(0.1)],
                             20, sigma_rel_to_gamma(0.1))
    assert x.sum() == pytest.approx(1.0) and x[2] == pytest.approx(1.0, abs=1e-8)


TOY = ["configs/sct_toy.yaml", "net.hidden=32", "net.depth=2", "train.batch_size=32", "data.n=512",
       "run.progress=false", "run.tensorboard=false", "run.sample_n=16", "train.ema=[0.99]",
       "train.ema_warmup=true", "train.ema_std=[0.05,0.1]"]


def test_resume_is_exact_with_warmup_and_power_ema(tmp_path):
    full = load_config(TOY[0], TOY[1:] + ["train.steps=6", f"run.dir={tmp_path / 'a'}"])
    train(full)
    part = load_config(TOY[0], TOY[1:] + ["train.steps=6", f"run.dir={tmp_path / 'b'}"])
    train(part, stop_after=3)
    train(part)
    from cmkit.checkpoint import latest_checkpoint

    a, b = latest_checkpoint(tmp_path / "a" / "checkpoints")[1], latest_checkpoint(tmp_path / "b" / "checkpoints")[1]
    assert set(a["ema"]) == {"0", "1", "2"}
    assert_states_equal(a, b, parts=("objective", "ema"))


def test_cli_ema_reconstruct_then_sample_and_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TOY, "train.steps=8", "train.ema_snapshot_every=2", "train.ema_sample=2",
                 f"run.dir={run}"]) == 0
    assert [n for n, _ in list_snapshots(run)] == [64, 128, 192, 256]
    capsys.readouterr()
    assert main(["ema-reconstruct", str(run), "--sigma-rel", "0.1"]) == 0
    out = capsys.readouterr().out
    path = run / "ema_posthoc" / "ema-0.100-000000000256.safetensors"
    assert path.is_file() and "cmkit sample" in out
    # σ_rel 0.1 is stored at the last snapshot, so the reconstruction equals the run's tracked 0.1 EMA
    from cmkit.run import load

    tracked, rebuilt = load(run), load(run, checkpoint=path)
    for (k, a), b in zip(tracked.ema.modules[2].state_dict().items(), rebuilt.ema.modules[0].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    assert main(["sample", str(run), "--checkpoint", str(path), "--n", "8", "--out", str(tmp_path / "s.npz")]) == 0
    assert main(["eval", str(run), "--checkpoint", str(path), "--n", "64", "--steps", "1",
                 "--out", str(tmp_path / "m.json")]) == 0
    import json

    assert "post-hoc" in json.loads((tmp_path / "m.json").read_text())["protocol"]["weights"]


def test_run_sample_ema_index_draws_from_that_tracked_ema(tmp_path):
    from cmkit.run import load
    from cmkit.sampling import sample_batched

    train(load_config(TOY[0], TOY[1:] + ["train.steps=4", f"run.dir={tmp_path / 'r'}"]))
    run = load(tmp_path / "r")
    times = run.objective.sample_times(1)
    for i in range(3):
        direct = run.dataset.to_data_space(sample_batched(run.ema.modules[i], 32, run.dataset.shape, times,
                                                          sampler=run.objective.sampler, seed=5, device=run.device))
        torch.testing.assert_close(run.sample(32, 1, seed=5, ema_index=i), direct, rtol=0, atol=0)
    # the default is train.ema_sample (0), and the three EMAs differ, so the index is not ignored
    assert torch.equal(run.sample(32, 1, seed=5), run.sample(32, 1, seed=5, ema_index=0))
    assert not torch.equal(run.sample(32, 1, seed=5, ema_index=0), run.sample(32, 1, seed=5, ema_index=2))


def test_bad_ema_options_are_config_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="ema_std"):
        load_config(TOY[0], TOY[1:] + ["train.ema_std=[0.5]"])
    with pytest.raises(ConfigError, match="ema_snapshot_every"):
        load_config(TOY[0], TOY[1:] + ["train.ema_std=[]", "train.ema_snapshot_every=10"])
    with pytest.raises(ConfigError, match="ema_sample"):
        load_config(TOY[0], TOY[1:] + ["train.ema_sample=3"])
    with pytest.raises(ConfigError, match="both empty"):
        load_config(TOY[0], TOY[1:] + ["train.ema=[]", "train.ema_std=[]"])
    assert main(["ema-reconstruct", str(tmp_path), "--sigma-rel", "0.05"]) == 2
    assert "ema_snapshot_every" in capsys.readouterr().err
