"""iLCT (002_915a3e3a8597e2f0.txt): robust distances, early diffusion loss, OT coupling, adaptive c, norms."""

import itertools
import math

import numpy as np
import pytest
import torch

from cmkit.config import ConfigError, load_config
from cmkit.coupling import ot_pair, ot_permutation
from cmkit.losses import DISTANCES, cauchy, geman_mcclure, pseudo_huber
from cmkit.nets.layers import NORMS
from cmkit.objectives import build_objective
from cmkit.objectives.consistency import diffusion_mask
from cmkit.schedules import Progress, adaptive_c, karras_sigmas

# ----------------------------------------------------------------------------
# Robust distances (iLCT Eq. 6-8): values, gradients and large-residual behaviour.


def _residuals():
    x = torch.tensor([[3.0, 4.0], [0.3, -0.4], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    return x, torch.zeros_like(x)


def test_cauchy_value_and_gradient():
    c = 0.5
    x, y = _residuals()
    d = cauchy(x, y, c)
    r2 = torch.tensor([25.0, 0.25, 0.0], dtype=torch.float64)
    assert torch.allclose(d, torch.log(1 + r2 / (2 * c * c)))
    d.sum().backward()
    # ∂/∂x log(1 + ‖x‖²/(2c²)) = x / (c² + ‖x‖²/2)
    ref = x.detach() / (c * c + r2[:, None] / 2)
    assert torch.allclose(x.grad, ref)


def test_geman_mcclure_value_and_gradient():
    c = 0.5
    x, y = _residuals()
    d = geman_mcclure(x, y, c)
    r2 = torch.tensor([25.0, 0.25, 0.0], dtype=torch.float64)
    assert torch.allclose(d, 2 * r2 / (r2 + 4 * c * c))
    d.sum().backward()
    # ∂/∂x 2‖x‖²/(‖x‖² + 4c²) = 16 c² x / (‖x‖² + 4c²)²
    ref = 16 * c * c * x.detach() / (r2[:, None] + 4 * c * c) ** 2
    assert torch.allclose(x.grad, ref)


def test_distances_gradient_by_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 5, dtype=torch.float64)
    for name in ("cauchy", "geman_mcclure"):
        torch.autograd.gradcheck(lambda a: DISTANCES[name](a, y, 0.3), (x,))


def test_large_residual_behaviour():
    c = 1.0
    big = torch.tensor([[1e4], [2e4]], dtype=torch.float64)
    zero = torch.zeros_like(big)
    ph, ca, gm = pseudo_huber(big, zero, c), cauchy(big, zero, c), geman_mcclure(big, zero, c)
    # Pseudo-Huber grows linearly: doubling the residual doubles d (up to c).
    assert torch.allclose(ph[1] - ph[0], torch.tensor(1e4, dtype=torch.float64), rtol=1e-6)
    # Cauchy grows logarithmically: doubling the residual adds log 4.
    assert ca[1] - ca[0] == pytest.approx(math.log(4), rel=1e-6)
    # Geman-McClure saturates at 2 (iLCT Eq. 8; the text's "1" is Fig. 2's normalisation).
    assert torch.all(gm < 2) and torch.allclose(gm, torch.full_like(gm, 2.0), atol=1e-7)
    # Small residuals: all three are ∝ ‖r‖²: Cauchy ≈ r²/(2c²), Geman-McClure ≈ r²/(2c²), PH ≈ r²/(2c).
    r = torch.tensor([[1e-4]], dtype=torch.float64)
    for fn in (cauchy, geman_mcclure, pseudo_huber):
        assert fn(r, torch.zeros_like(r), c).item() == pytest.approx(0.5e-8, rel=1e-3)


# ----------------------------------------------------------------------------
# Adaptive c (iLCT Eq. 11), hand-computed.


@pytest.mark.parametrize(
    "n, c",
    [(11, 0.0321594), (21, 0.0141936), (41, 0.00626437), (81, 0.00276479), (161, 0.00122024),
     (321, 0.000538556), (641, 0.000237693)],
)
def test_adaptive_c_golden(n, c):
    assert adaptive_c(n) == pytest.approx(c, rel=1e-5)


def test_adaptive_c_halves_by_2_to_the_118_per_doubling():
    assert adaptive_c(21) / adaptive_c(11) == pytest.approx(2 ** -1.18, rel=1e-12)


# ----------------------------------------------------------------------------
# Diffusion loss at small timesteps (iLCT Eq. 9).


def test_diffusion_mask_selects_exactly_i_le_int_nr():
    for n, r in [(11, 0.25), (21, 0.25), (641, 0.25), (11, 0.0), (11, 1.0), (13, 0.5)]:
        sigmas = karras_sigmas(n, 0.002, 80.0, 7.0)
        index0 = torch.arange(n - 1)  # 0-based pair index: pair (t_i, t_{i+1}), paper's i = index0 + 1
        mask = diffusion_mask(sigmas[index0], sigmas, r)
        expected = torch.tensor([float(i + 1 <= int(n * r)) for i in range(n - 1)])
        assert torch.equal(mask, expected), (n, r)
    # N=11, r=0.25: int(2.75) = 2, so exactly the paper's i = 1, 2.
    s = karras_sigmas(11, 0.002, 80.0, 7.0)
    assert diffusion_mask(s[:10], s, 0.25).nonzero().flatten().tolist() == [0, 1]


def _objective(*overrides, shape=(2,)):
    cfg = load_config(None, ["net.name=mlp", "net.hidden=32", "net.depth=2", *overrides])
    torch.manual_seed(0)
    return build_objective(cfg, shape)


@pytest.mark.parametrize("at,shift", [("current", 0), ("next", 1)])
def test_diffusion_loss_term_added_only_at_small_indices(at, shift):
    # iLCT Eq. 9 on f_θ(x_{t_i}, t_i) (diffusion_at=current, as written) or on the student at t_{i+1} (next)
    n, batch = 11, 40
    obj = _objective("method.name=ilct", "method.coupling=none", "method.diffusion_weight=0.7",
                     f"method.diffusion_at={at}")
    sigmas = karras_sigmas(n, 0.002, 80.0, 7.0)
    index = torch.arange(batch) % (n - 1)
    obj.sample_pairs = lambda x0, progress: (sigmas[index], sigmas[index + 1], n)
    x0 = torch.randn(batch, 2, generator=torch.Generator().manual_seed(1))
    prog = Progress(0, 1000, batch)

    torch.manual_seed(5)
    with_diff = obj.loss({"x": x0}, prog)["loss"].detach()
    obj.cfg.diffusion_weight = 0.0
    torch.manual_seed(5)
    without = obj.loss({"x": x0}, prog)["loss"].detach()

    # Recompute ‖f_θ(x0 + σ z, σ) - x0‖² here (σ = σ_i or σ_{i+1}): z is the loss's first random draw.
    torch.manual_seed(5)
    z = torch.randn_like(x0)
    t = sigmas[index + shift].float()
    with torch.no_grad():
        student = obj.model(x0 + t[:, None] * z, t)
    sq = (student - x0).square().sum(1)
    small = (index + 1) <= int(n * 0.25)
    assert torch.allclose(with_diff - without, torch.where(small, 0.7 * sq, torch.zeros_like(sq)), atol=1e-5)
    assert small.sum() == 8 and (with_diff - without)[~small].abs().max() == 0


def test_adaptive_c_dimension_scaling():
    # method.c_dim_scale: Eq. 11's c times sqrt(d/4096); d = 4096 leaves it unchanged, d = 1024 halves it
    for shape, factor in (((4, 32, 32), 1.0), ((4, 16, 16), 0.5), ((2,), (2 / 4096) ** 0.5)):
        scaled = _objective("method.name=ilct", "method.c_dim_scale=true", shape=shape)
        assert scaled.robust_c(641) == pytest.approx(adaptive_c(641) * factor, rel=1e-12)
    assert _objective("method.name=ilct").robust_c(641) == adaptive_c(641)  # off by default: the paper's formula


def test_adaptive_c_is_used_by_the_loss():
    obj = _objective("method.name=ilct", "method.coupling=none", "method.diffusion_weight=0")
    sigmas = karras_sigmas(21, 0.002, 80.0, 7.0)
    obj.sample_pairs = lambda x0, p: (sigmas[:8], sigmas[1:9], 21)
    obj.weighting = lambda a, b: torch.ones_like(a)
    x0 = torch.randn(8, 2)
    torch.manual_seed(3)
    out = obj.loss({"x": x0}, Progress(0, 1000, 8))
    torch.manual_seed(3)
    z = torch.randn_like(x0)
    with torch.no_grad():
        s = obj.model(x0 + sigmas[1:9, None].float() * z, sigmas[1:9].float())
        t = obj.model(x0 + sigmas[:8, None].float() * z, sigmas[:8].float())
    c = math.exp(-1.18 * math.log(20) - 0.72)
    ref = torch.log1p((s - t).square().sum(1) / (2 * c * c))
    assert out["c"] == pytest.approx(c) and torch.allclose(out["loss"].detach(), ref, rtol=1e-5)


def test_ilct_preset_and_validation():
    cfg = load_config(None, ["method.name=ilct"])
    m = cfg.method
    assert (m.distance, m.c_schedule, m.coupling, m.s0, m.s1, m.diffusion_r) == ("cauchy", "adaptive", "ot", 10, 640, 0.25)
    assert m.diffusion_weight > 0 and m.curriculum == "exp" and not m.teacher_ema
    for bad in ("method.coupling=sinkhorn", "method.c_schedule=cosine", "method.diffusion_r=1.5", "method.distance=l3"):
        with pytest.raises(ConfigError):
            load_config(None, ["method.name=ilct", bad])


# ----------------------------------------------------------------------------
# Minibatch OT coupling (iLCT Sec. 4.4).


def _total_cost(x, z):
    return (x - z).flatten(1).square().sum().item()


def test_ot_pairing_is_a_permutation_and_never_worse():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 64):
        x = torch.randn(n, 3, 4, 4, generator=g) + 2
        z = torch.randn(n, 3, 4, 4, generator=g)
        perm = ot_permutation(x, z)
        assert sorted(perm.tolist()) == list(range(n))
        assert _total_cost(x, z[perm]) <= _total_cost(x, z) + 1e-9


def test_ot_pairing_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(6, 5, generator=g, dtype=torch.float64)
        z = torch.randn(6, 5, generator=g, dtype=torch.float64)
        costs = {p: sum(((x[a] - z[b]) ** 2).sum().item() for a, b in enumerate(p))
                 for p in itertools.permutations(range(6))}
        best = min(costs, key=costs.get)
        assert ot_permutation(x, z).tolist() == list(best)
        assert _total_cost(x, ot_pair(x, z)) == pytest.approx(costs[best], rel=1e-12)


def test_pot_solver_agrees_with_scipy():
    pytest.importorskip("ot")
    g = torch.Generator().manual_seed(2)
    x, z = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)
    assert _total_cost(x, ot_pair(x, z, "ot_pot")) == pytest.approx(_total_cost(x, ot_pair(x, z, "ot")), rel=1e-9)


def test_ot_coupling_in_the_loss_permutes_noise_only():
    # With OT, the loss sees z[perm]: recompute the coupled student output independently.
    obj = _objective("method.name=ilct", "method.diffusion_weight=0")
    sigmas = karras_sigmas(11, 0.002, 80.0, 7.0)
    obj.sample_pairs = lambda x0, p: (sigmas[3].expand(16), sigmas[4].expand(16), 11)
    seen = []
    obj.model.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x0 = torch.randn(16, 2) * 3
    torch.manual_seed(4)
    obj.loss({"x": x0}, Progress(0, 1000, 16))
    torch.manual_seed(4)
    z = torch.randn_like(x0)
    perm = torch.from_numpy(__import__("scipy.optimize", fromlist=["x"]).linear_sum_assignment(
        torch.cdist(x0.double(), z.double()).square().numpy())[1])
    # the student sees x0 + σ_{i+1} z[perm] and the stop-grad target x0 + σ_i z[perm] (same coupled noise)
    assert len(seen) == 2
    assert any(torch.allclose(x, x0 + float(sigmas[4]) * z[perm]) for x in seen)
    assert any(torch.allclose(x, x0 + float(sigmas[3]) * z[perm]) for x in seen)


# ----------------------------------------------------------------------------
# Normalisation layers (iLCT Eq. 12, Table 2d).


def test_nsln_has_no_trainable_scale_and_normalises():
    norm = NORMS["nsln"](8, 32)
    assert [n for n, _ in norm.named_parameters()] == ["bias"]
    with torch.no_grad():
        norm.bias.copy_(torch.arange(8.0))
    x = torch.randn(4, 8, 5, 5) * 7 + 3
    x[0, 2, 1, 1] = 500.0  # an impulsive outlier
    y = norm(x)
    mu = x.mean(dim=(1, 2, 3), keepdim=True)
    var = x.var(dim=(1, 2, 3), correction=0, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + 1e-5) + torch.arange(8.0)[None, :, None, None]
    assert torch.allclose(y, ref, atol=1e-5)
    norm.bias.data.zero_()
    y = norm(x)
    assert torch.allclose(y.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(y.var(dim=(1, 2, 3), correction=0), torch.ones(4), atol=1e-3)


def test_layer_instance_rms_norms_against_formulas():
    x = torch.randn(3, 4, 6, 6) * 2 + 1
    g = torch.linspace(0.5, 2.0, 4)[None, :, None, None]
    b = torch.linspace(-1.0, 1.0, 4)[None, :, None, None]
    for kind in ("layer", "instance", "rms"):
        norm = NORMS[kind](4, 32)
        with torch.no_grad():
            norm.weight.copy_(g.flatten())
            if hasattr(norm, "bias"):
                norm.bias.copy_(b.flatten())
        dims = (2, 3) if kind == "instance" else (1, 2, 3)
        if kind == "rms":
            ref = x / torch.sqrt(x.square().mean(dims, keepdim=True) + 1e-6) * g
        else:
            mu, var = x.mean(dims, keepdim=True), x.var(dims, correction=0, keepdim=True)
            ref = (x - mu) / torch.sqrt(var + 1e-5) * g + b
        assert torch.allclose(norm(x), ref, atol=1e-5), kind


@pytest.mark.parametrize("kind", ["group", "layer", "nsln", "instance", "rms"])
def test_unet_builds_with_each_norm(kind):
    cfg = load_config(None, ["net.name=unet", "net.channels=16", "net.channel_mult=[1]", "net.num_blocks=1",
                             "net.attn_resolutions=[]", f"net.norm={kind}", "net.num_groups=8"])
    from cmkit.nets import build_network

    net = build_network(cfg.net, (4, 8, 8), 0)
    out = net(torch.randn(2, 4, 8, 8), torch.zeros(2))
    assert out.shape == (2, 4, 8, 8)
    out.square().sum().backward()  # every norm's parameters get finite gradients
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in net.named_parameters() if "norm" in n)
    if kind == "nsln":
        norm_params = [n for n, _ in net.named_parameters() if "norm" in n]
        assert norm_params and all(n.endswith("bias") for n in norm_params)


def test_ilct_trains_a_few_steps(tmp_path):
    from cmkit.train import train

    cfg = load_config(None, ["method.name=ilct", "net.name=mlp", "net.hidden=32", "net.depth=2",
                             "data.name=eight_gaussians", "data.n=512", "train.steps=6", "train.batch_size=32",
                             f"run.dir={tmp_path}", "run.tensorboard=false", "run.progress=false",
                             "run.sample_n=16", "run.log_every=2", "train.device=cpu"])
    train(cfg)
    lines = (tmp_path / "log.jsonl").read_text().strip().splitlines()
    assert lines and all(np.isfinite(__import__("json").loads(ln).get("loss", 0.0)) for ln in lines)


def test_sigma_data_auto_follows_the_data_and_is_recorded(tmp_path):
    # method.sigma_data=auto: σ_data = the (normalised) training data's std, as EDM sets it from the data
    import yaml

    from cmkit.data import load_dataset
    from cmkit.run import load
    from cmkit.train import train

    cfg = load_config("configs/ict_toy.yaml", ["method.sigma_data=auto", "net.hidden=16", "net.depth=1",
                                               "train.steps=2", "train.batch_size=16", "data.n=256",
                                               "run.progress=false", "run.tensorboard=false", "run.sample_n=4",
                                               f"run.dir={tmp_path / 'run'}"])
    assert cfg.method.sigma_data == "auto"
    x = load_dataset(cfg.data).x.double()
    expected = round(float(((x - x.mean()) ** 2).sum() / (x.numel() - 1)) ** 0.5, 6)
    train(cfg)
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["method"]["sigma_data"]
    assert recorded == pytest.approx(expected, abs=1e-12) and abs(expected - 0.5) > 0.05
    assert load(tmp_path / "run").model().process.sigma_data == recorded
    with pytest.raises(ConfigError, match="sigma_data"):
        load_config(None, ["method.name=ict", "method.sigma_data=half"])
    assert load_config(None, ["method.name=ict", "method.sigma_data=0.3"]).method.sigma_data == 0.3
