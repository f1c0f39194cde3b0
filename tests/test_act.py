"""ACT / ACT-Aug: λ_N schedule, λ=0 equals CT, lazy gradient penalty, p_aug rule, augmentation,
exact resume of the discriminator side, and learning on 2-D data (ACT Algorithms 1-2)."""

import math

import pytest
import torch

from cmkit.augment import DiffAugment
from cmkit.checkpoint import latest_checkpoint
from cmkit.config import load_config
from cmkit.data import load_dataset
from cmkit.objectives import build_objective
from cmkit.objectives.gan import GAN_LOSSES, gradient_penalty
from cmkit.schedules import Progress, act_adversarial_weight
from cmkit.train import train
from cmkit_testutils import assert_states_equal, sliced_wasserstein

MLP = ["net.name=mlp", "net.hidden=32", "net.depth=2"]
TINY_UNET = ["net.name=unet", "net.channels=8", "net.channel_mult=[1,2]", "net.num_blocks=1",
             "net.attn_resolutions=[]", "net.num_groups=4"]


def _objective(*overrides, shape=(2,), seed=0):
    cfg = load_config(None, [*MLP, *overrides])
    torch.manual_seed(seed)
    return build_objective(cfg, shape)


# ----------------------------------------------------------------------------
# λ_N(n) (Eq. 10).


@pytest.mark.parametrize("w,w_mid", [(0.6, 0.2), (0.3, 0.3), (0.5, 0.45)])
def test_lambda_at_end_and_middle(w, w_mid):
    n = 21  # (N-1)/2 = 10 is an integer
    lam = act_adversarial_weight(torch.tensor([n - 1, (n - 1) // 2, 4]), n, w, w_mid)
    assert lam[0].item() == pytest.approx(w, abs=1e-12)
    assert lam[1].item() == pytest.approx(w_mid, abs=1e-12)
    # hand-derived: w·(4/20)^{ln(w_mid/w)/ln(1/2)}
    assert lam[2].item() == pytest.approx(w * 0.2 ** (math.log(w_mid / w) / math.log(0.5)), rel=1e-12)


def test_lambda_zero_weight_and_clip():
    assert torch.all(act_adversarial_weight(torch.arange(1, 11), 11, 0.0, 0.0) == 0)
    # w_mid > w makes λ grow towards small n; it is clipped to 1
    assert act_adversarial_weight(torch.tensor([1]), 101, 0.2, 0.6).item() == 1.0


# ----------------------------------------------------------------------------
# Generator step.


def _model_grads(obj, loss_fn, batch, progress, seed=1):
    obj.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss_fn(batch, progress)["loss"].mean().backward()
    return [p.grad.clone() for p in obj.model.parameters()]


@pytest.mark.parametrize("base", ["ct", "ict"])
def test_lambda_zero_gives_the_ct_update(base):
    act_name = "act" if base == "ct" else "act_ict"
    ct = _objective(f"method.name={base}")
    batch, progress = {"x": torch.randn(64, 2)}, Progress(640, 6400, 64)
    reference = _model_grads(ct, ct.loss, batch, progress)
    for w, same in ((0.0, True), (0.5, False)):
        act = _objective(f"method.name={act_name}", f"method.w={w}", f"method.w_mid={w}")
        act.model.load_state_dict(ct.model.state_dict())
        if ct.teacher is not None:
            act.ct.teacher.load_state_dict(ct.teacher.state_dict())
        grads = _model_grads(act, act.generator_loss, batch, progress)
        equal = all(torch.equal(a, b) for a, b in zip(grads, reference))
        assert equal == same, (w, base)
        # the generator step never trains the discriminator
        assert all(p.grad is None for p in act.discriminator.parameters())


def test_generator_loss_mixes_ct_and_gan_terms():
    act = _objective("method.name=act", "method.w=0.4", "method.w_mid=0.4")
    torch.manual_seed(3)
    out = act.generator_loss({"x": torch.randn(32, 2)}, Progress(0, 3200, 32))
    expected = 0.6 * out["ct_loss"] + 0.4 * out["g_loss"]  # λ = 0.4 everywhere
    assert out["loss"].mean().item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["act", "act_ict"])
def test_generator_loss_is_on_the_student_output(name):
    # Alg. 1 lines 7-8 recomputed: L_f = (1-λ)·L_CT + λ·softplus(-D(f_θ(x + t_{n+1} z, t_{n+1}), t_{n+1})) with the
    # student output of the same L_CT pass (for act_ict the iCT target is the same network under no_grad)
    act = _objective(f"method.name={name}", "method.w=0.4", "method.w_mid=0.4")
    assert act.cfg.gan_loss == "non_saturating" and act.cfg.w_gp == 5.0  # the authors' code (kong13661/ACT)
    batch, progress = {"x": torch.randn(32, 2)}, Progress(640, 6400, 32)
    torch.manual_seed(3)
    out = act.generator_loss(batch, progress)
    torch.manual_seed(3)
    ct, student, t = act.ct.loss_with_output(batch, progress)
    assert student.requires_grad
    logits = act.discriminator(student, act.process.c_noise(t.float()))
    expected = 0.6 * ct["loss"] + 0.4 * torch.nn.functional.softplus(-logits)
    torch.testing.assert_close(out["loss"], expected, rtol=0, atol=1e-6)


def test_gan_losses_hand_values():
    real, fake = torch.tensor([2.0, -0.5]), torch.tensor([0.5, -3.0])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    sat, hinge = GAN_LOSSES["saturating"], GAN_LOSSES["hinge"]
    assert torch.allclose(sat.generator(fake), torch.tensor([-sp(0.5), -sp(-3.0)]))  # log(1 - sigmoid(l))
    assert torch.allclose(sat.discriminator(real, fake), torch.tensor([sp(-2.0) + sp(0.5), sp(0.5) + sp(-3.0)]))
    assert torch.allclose(hinge.discriminator(real, fake), torch.tensor([0.0 + 1.5, 1.5 + 0.0]))
    assert torch.allclose(hinge.generator(fake), torch.tensor([-0.5, 3.0]))
    # non-saturating -log D(fake) = log(1 + e^{-l}); its gradient -sigmoid(-l) does not vanish where D wins (l << 0)
    ns = GAN_LOSSES["non_saturating"]
    assert torch.allclose(ns.generator(fake), torch.tensor([sp(-0.5), sp(3.0)]))
    l = torch.tensor([-4.0], requires_grad=True)
    (g_ns,) = torch.autograd.grad(ns.generator(l).sum(), l)
    (g_sat,) = torch.autograd.grad(sat.generator(l).sum(), l)
    assert g_ns.item() == pytest.approx(-1 / (1 + math.exp(-4)), rel=1e-6)
    assert g_sat.item() == pytest.approx(-1 / (1 + math.exp(4)), rel=1e-6)  # 55x smaller at l = -4


# ----------------------------------------------------------------------------
# Discriminator step: penalty.


def test_gradient_penalty_matches_finite_differences():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1)).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    gp = gradient_penalty(net(x).squeeze(1), x)
    eps = 1e-6
    with torch.no_grad():
        fd = torch.zeros(5, 3, dtype=torch.float64)
        for j in range(3):
            e = torch.zeros(3, dtype=torch.float64)
            e[j] = eps
            fd[:, j] = (net(x + e) - net(x - e)).squeeze(1) / (2 * eps)
    assert torch.allclose(gp, fd.square().sum(1), rtol=1e-7)


def _fixed_pairs(obj, n=11):
    """Replace the index sampling by a fixed set of on-grid levels (σ_{n+1} = σ_1..σ_10)."""

    def pairs(x0, progress):
        sigmas, _ = obj.ct.grid(n, x0.device)
        j = 1 + torch.arange(x0.shape[0]) % (n - 1)
        return sigmas[j - 1], sigmas[j], n

    obj.ct.sample_pairs = pairs


def test_penalty_is_lazy_and_equals_weighted_grad_norm():
    obj = _objective("method.name=act", "method.w=1", "method.w_mid=1", "method.gp_interval=3",
                     "method.w_gp=5").double()
    _fixed_pairs(obj)
    x = torch.randn(16, 2, dtype=torch.float64)
    seen = []
    for k in range(7):
        torch.manual_seed(k)
        out = obj.discriminator_loss({"x": x}, Progress(16 * k, 1600, 16))
        seen.append("gp" in out)
        if k == 3:
            loss_with = out["loss"].detach()
            d_loss = out["d_loss"]
    assert seen == [k % 3 == 0 for k in range(7)]
    # independent: w_gp·‖∇_x D(x, c_noise(σ_{n+1}))‖² by central differences, λ = 1
    sigmas, _ = obj.ct.grid(11, x.device)
    t = sigmas[1 + torch.arange(16) % 10]
    c = obj.process.c_noise(t.float()).double()
    eps, fd = 1e-6, torch.zeros(16, 2, dtype=torch.float64)
    with torch.no_grad():
        for j in range(2):
            e = torch.zeros(2, dtype=torch.float64)
            e[j] = eps
            fd[:, j] = (obj.discriminator(x + e, c) - obj.discriminator(x - e, c)) / (2 * eps)
    gp = 5 * fd.square().sum(1)
    # at k=3, the per-sample loss is L_D + gp; its mean minus d_loss's mean is gp's mean
    assert (loss_with.mean() - d_loss).item() == pytest.approx(gp.mean().item(), rel=1e-6)


def test_loss_is_lambda_times_l_d_when_the_penalty_is_not_due():
    w, w_mid, n, B = 0.6, 0.2, 11, 16
    obj = _objective("method.name=act", f"method.w={w}", f"method.w_mid={w_mid}", "method.gp_interval=4",
                     "method.w_gp=5").double()
    _fixed_pairs(obj, n)
    x = torch.randn(B, 2, dtype=torch.float64)
    torch.manual_seed(11)
    out = obj.discriminator_loss({"x": x}, Progress(16 * 3, 1600, 16))  # k = 3: 3 mod 4 != 0
    assert "gp" not in out
    # independent: λ_N(n+1) = w·(j/(N-1))^{log_{1/2}(w_mid/w)} at σ_{n+1} = σ_j (Eq. 10), L_D of Eq. 9 on
    # D(x, t) and D(f(x_g + t z, t), t) with x_g = x rolled by B/2 and z the same draw
    j = (1 + torch.arange(B) % (n - 1)).double()
    lam = (w * (j / (n - 1)) ** (math.log(w_mid / w) / math.log(0.5))).float().double()
    sigmas, _ = obj.ct.grid(n, x.device)
    t = sigmas[1 + torch.arange(B) % (n - 1)].double()
    c = obj.process.c_noise(t.float()).double()
    torch.manual_seed(11)
    z = torch.randn_like(x)
    with torch.no_grad():
        fake = obj.model(x.roll(B // 2, 0) + t[:, None] * z, t)
        l_d = torch.nn.functional.softplus(-obj.discriminator(x, c)) + torch.nn.functional.softplus(
            obj.discriminator(fake, c))
    torch.testing.assert_close(out["loss"].detach(), lam * l_d, rtol=1e-6, atol=0)


def test_penalty_ema_averages_every_micro_batch():
    # train.accumulate=2: both micro-batches' penalties enter L̄_gp, not only the last one's
    obj = _objective("method.name=act", "method.gp_interval=1", "method.aug_interval=1", "method.w_gp=1",
                     "method.aug_ema=0.5").double()
    _fixed_pairs(obj)
    sigmas, _ = obj.ct.grid(11, "cpu")
    progress = Progress(0, 1600, 16)
    gps = []
    for seed in (1, 2):
        x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        obj.discriminator_loss({"x": x}, progress)
        # independent: ‖∇_x D(x, c)‖² by autograd on D alone, batch mean
        xr = x.clone().requires_grad_(True)
        c = obj.process.c_noise(sigmas[1 + torch.arange(8) % 10].float()).double()
        (g,) = torch.autograd.grad(obj.discriminator(xr, c).sum(), xr)
        gps.append(g.square().sum(1).mean().item())
    obj.after_phase("discriminator", progress)
    assert obj.gp_ema == pytest.approx(0.5 * 0.55 + 0.5 * (gps[0] + gps[1]) / 2, rel=1e-9)
    assert abs(gps[0] - gps[1]) > 1e-3 * gps[0]  # the two micro-batches differ, so "last only" would fail
    # the sum restarts at the next due iteration
    obj.record_penalty(torch.tensor(2.0), 1)
    before = obj.gp_ema
    obj.after_phase("discriminator", Progress(16, 1600, 16))
    assert obj.gp_ema == pytest.approx(0.5 * before + 0.5 * 2.0, rel=1e-12)


def test_a_batch_of_one_image_per_rank_is_rejected():
    from cmkit.config import ConfigError

    with pytest.raises(ConfigError, match="at least 2 images"):
        _objective("method.name=act", "train.batch_size=4", "train.accumulate=4")
    obj = _objective("method.name=act")
    with pytest.raises(ConfigError, match="at least 2 images"):  # e.g. 2 ranks x 2 micro-batches of batch 4
        obj.discriminator_loss({"x": torch.randn(1, 2)}, Progress(0, 100, 1))


def test_imagenet_preset_uses_mixed_precision():
    from cmkit.config import load_config as load

    # ACT Table 6: Mixed-Precision "Yes" for ImageNet 64x64, "No" for CIFAR-10
    assert load("configs/act_imagenet64.yaml", []).train.precision == "bf16"
    assert load("configs/act_cifar10.yaml", []).train.precision == "fp32"


# ----------------------------------------------------------------------------
# ACT-Aug (Algorithm 2).


def _aug_objective(*overrides):
    return _objective("method.name=act", "method.augment=true", "method.aug_ops=[flip]", *TINY_UNET,
                      *overrides, shape=(1, 8, 8))


def test_p_aug_follows_the_hand_computed_sequence():
    obj = _aug_objective("method.gp_interval=1", "method.aug_interval=1", "method.aug_target=0.55",
                         "method.aug_rate=0.6", "method.aug_ema=0.5")
    assert obj.p_aug == 0.0 and obj.gp_ema == 0.55  # Alg. 2 line 2
    gps = [1.0, 0.1, 0.1, 2.0, 0.0]
    # by hand: p ← clip(p + 2([ema ≥ 0.55] - 0.5)·0.6) with the EMA *before* its update, then ema ← (ema + gp)/2
    want_p = [0.6, 1.0, 0.4, 0.0, 0.6]
    want_ema = [0.775, 0.4375, 0.26875, 1.134375, 0.5671875]
    for k, gp in enumerate(gps):
        obj.record_penalty(torch.tensor(gp, dtype=torch.float64), k)
        obj.after_phase("discriminator", Progress(k * 8, 800, 8))
        assert obj.p_aug == pytest.approx(want_p[k], abs=1e-12), k
        assert obj.gp_ema == pytest.approx(want_ema[k], abs=1e-12), k


def test_p_aug_updates_only_every_interval():
    obj = _aug_objective("method.gp_interval=1", "method.aug_interval=2", "method.aug_rate=0.05")
    ps = []
    for k in range(5):
        obj.record_penalty(torch.tensor(10.0), k)
        obj.after_phase("discriminator", Progress(k * 8, 800, 8))
        ps.append(obj.p_aug)
    assert ps == pytest.approx([0.05, 0.05, 0.10, 0.10, 0.15])


def test_augmentation_probability_and_gradient():
    aug = DiffAugment(["flip"])
    x = torch.arange(64.0).reshape(1, 1, 8, 8).repeat(4000, 1, 1, 1)  # every image changes when flipped
    assert torch.equal(aug(x, 0.0), x)
    assert torch.equal(aug(x, 1.0), x.flip(-1))
    flipped = (aug(x, 0.3) != x).flatten(1).any(1).float().mean().item()
    assert abs(flipped - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)
    # gradients pass through: d/dx Σ w·flip(x) = flip(w)
    xs = torch.randn(3, 1, 8, 8, requires_grad=True)
    w = torch.randn(3, 1, 8, 8)
    (aug(xs, 1.0) * w).sum().backward()
    assert torch.equal(xs.grad, w.flip(-1))
    full = DiffAugment(["flip", "translate", "cutout"])
    xs.grad = None
    full(xs, 1.0).square().sum().backward()
    assert torch.isfinite(xs.grad).all() and xs.grad.abs().sum() > 0


def test_penalty_through_full_augmentation_has_finite_gradients():
    # p_aug = 1 with flip, translate and cutout: L_gp's gradient w.r.t. D's parameters is a double
    # backward through kornia's ops (ACT-Aug applies A(·) before D, also for the penalty)
    obj = _aug_objective("method.aug_ops=[flip,translate,cutout]", "method.gp_interval=2", "method.w=0.5",
                         "method.w_mid=0.5")
    obj.p_aug = 1.0
    _fixed_pairs(obj)
    x = torch.randn(8, 1, 8, 8)
    grads = {}
    for k in (2, 3):  # due, then not due; the same seed draws the same noise and augmentation
        obj.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        out = obj.discriminator_loss({"x": x}, Progress(8 * k, 800, 8))
        assert ("gp" in out) == (k == 2) and torch.isfinite(out["loss"]).all()
        out["loss"].mean().backward()
        grads[k] = [p.grad.clone() for p in obj.discriminator.parameters()]
        assert all(torch.isfinite(g).all() for g in grads[k])
    assert out["p_aug"] == 1.0 and out["gp_last"] > 0
    # the penalty's second-order term reached D's parameters
    assert max((a - b).abs().max().item() for a, b in zip(grads[2], grads[3])) > 1e-6


def test_augment_requires_images():
    from cmkit.config import ConfigError

    with pytest.raises(ConfigError, match="image data"):
        _objective("method.name=act", "method.augment=true")


# ----------------------------------------------------------------------------
# Loop integration.


RUN = ["data.name=eight_gaussians", "data.n=512", *MLP, "method.name=act", "method.gp_interval=1",
       "method.aug_interval=2", "train.batch_size=32", "train.steps=6", "run.progress=false",
       "run.tensorboard=false", "run.sample_n=4", "run.sample_steps=[1]", "train.ema=[0.9]"]


def test_extra_state_round_trip():
    a, b = _aug_objective(), _aug_objective()
    a.p_aug, a.gp_ema = 0.35, 0.123
    b.load_extra_state(a.extra_state())
    assert (b.p_aug, b.gp_ema) == (0.35, 0.123)


def test_resume_restores_the_discriminator_side_exactly(tmp_path):
    train(load_config(None, [*RUN, f"run.dir={tmp_path / 'a'}"]))
    cfg_b = load_config(None, [*RUN, f"run.dir={tmp_path / 'b'}"])
    train(cfg_b, stop_after=3)
    train(cfg_b)
    (_, a, _), (_, b, _) = latest_checkpoint(tmp_path / "a" / "checkpoints"), latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert any(k.startswith("discriminator.") for k in a["objective"])
    assert "discriminator" in a["optimizers"]
    assert a["extra"]["gp_ema"] != 0.55  # the penalty EMA moved (updated at k = 0, 2, 4)
    assert a["extra"] == b["extra"] and a["progress"] == b["progress"]
    assert_states_equal(a, b)


def test_resume_restores_p_aug_exactly(tmp_path):
    # ACT-Aug on tiny digit images with τ = 0.001: the penalty EMA stays above it, so p_aug rises by p_r
    # at every update (k = 0..5) and a resume that lost p_aug or L̄_gp would diverge from the full run.
    args = ["data.name=digits", *TINY_UNET, "method.name=act", "method.augment=true", "method.aug_ops=[flip,translate]",
            "method.gp_interval=1", "method.aug_interval=1", "method.aug_target=0.001", "train.batch_size=16",
            "train.steps=6", "run.progress=false", "run.tensorboard=false", "run.sample_n=4",
            "run.sample_steps=[1]", "train.ema=[0.9]", "train.threads=1"]
    train(load_config(None, [*args, f"run.dir={tmp_path / 'a'}"]))
    cfg_b = load_config(None, [*args, f"run.dir={tmp_path / 'b'}"])
    train(cfg_b, stop_after=3)
    _, mid, _ = latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert mid["extra"]["p_aug"] == pytest.approx(0.15, abs=1e-12)  # 3 updates of +0.05
    train(cfg_b)
    (_, a, _), (_, b, _) = latest_checkpoint(tmp_path / "a" / "checkpoints"), latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert a["extra"]["p_aug"] == pytest.approx(0.30, abs=1e-12)
    assert a["extra"] == b["extra"]
    assert_states_equal(a, b)


@pytest.mark.slow
def test_act_learns_eight_gaussians(tmp_path):
    from cmkit.run import load

    args = [*MLP[:1], "net.hidden=64", "net.depth=2", "train.steps=1000", "train.batch_size=128", "train.lr=3e-3",
            "run.progress=false", "run.tensorboard=false", "run.sample_steps=[1]", "train.ema=[0.95]",
            "method.gp_interval=4", "run.log_every=50", "train.threads=1"]
    data = load_dataset(load_config("configs/act_toy.yaml", args).data).x[:2000]
    train(load_config("configs/act_toy.yaml", [*args, "train.steps=0", f"run.dir={tmp_path / 'u'}"]))
    swd0 = sliced_wasserstein(load(tmp_path / "u").sample(2000, 1, data_space=False), data)
    train(load_config("configs/act_toy.yaml", [*args, f"run.dir={tmp_path / 'a'}"]))
    run = load(tmp_path / "a")
    x = run.sample(2000, 1, data_space=False)
    assert torch.isfinite(x).all()
    import json

    logs = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    for rec in logs:
        for k, v in rec.items():
            assert not isinstance(v, str), (k, v)  # RunLog writes non-finite values as strings
    assert any("discriminator/gp_last" in rec for rec in logs)
    swd1 = sliced_wasserstein(x, data)
    print(f"SWD untrained {swd0:.3f}  ACT 1-step {swd1:.3f}")
    assert swd1 < 0.9 * swd0  # measured: 0.888 -> 0.685 after 1000 steps
