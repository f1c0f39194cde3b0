"""CT/iCT objective: teacher behaviour and shared dropout masks (iCT Sec. 3.1-3.2)."""

import pytest
import torch

from cmkit.config import load_config
from cmkit.objectives import build_objective
from cmkit.objectives.base import SharedDropout
from cmkit.schedules import Progress


def _objective(*overrides, shape=(2,)):
    cfg = load_config(None, ["net.name=mlp", "net.hidden=32", "net.depth=2", *overrides])
    torch.manual_seed(0)
    return build_objective(cfg, shape)


def test_shared_dropout_replays_masks():
    x = torch.ones(1000)
    sd = SharedDropout(torch.device("cpu"))
    with sd.record():
        a = torch.nn.functional.dropout(x, 0.5)
    with sd.replay():
        b = torch.nn.functional.dropout(x, 0.5)
    c = torch.nn.functional.dropout(x, 0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _equal_sigma_loss(obj):
    # Force sigma_i = sigma_{i+1}: with identical masks student and teacher see identical inputs.
    def same_pair(x0, progress):
        s = torch.full((x0.shape[0],), 1.0, dtype=torch.float64)
        return s, s, 11

    obj.sample_pairs = same_pair
    obj.weighting = lambda a, b: torch.ones_like(a)
    return obj.loss({"x": torch.randn(64, 2)}, Progress(0, 1000, 64))["loss"]


def test_identical_dropout_masks_in_student_and_teacher():
    obj = _objective("net.dropout=0.5", "method.distance=l2").train()
    assert torch.all(_equal_sigma_loss(obj) == 0)
    obj = _objective("net.dropout=0.5", "method.distance=l2", "method.shared_dropout=false").train()
    assert torch.any(_equal_sigma_loss(obj) > 0)  # the check above can fail


def test_ict_teacher_is_the_student():
    obj = _objective("method.name=ict")
    assert obj.teacher is None
    opt = torch.optim.SGD(obj.model.parameters(), lr=0.1)
    out = obj.loss({"x": torch.randn(32, 2)}, Progress(0, 1000, 32))
    out["loss"].mean().backward()
    opt.step()
    obj.after_phase("model", Progress(0, 1000, 32))
    # the teacher pass uses the current parameters: loss at sigma_i = sigma_{i+1} is zero
    assert torch.all(_equal_sigma_loss(obj) == 0)


def test_ct_teacher_lags_with_ema():
    obj = _objective("method.name=ct")
    assert obj.teacher is not None
    t0 = [p.clone() for p in obj.teacher.parameters()]
    opt = torch.optim.SGD(obj.model.parameters(), lr=0.1)
    prog = Progress(0, 1000, 32)
    obj.loss({"x": torch.randn(32, 2)}, prog)["loss"].mean().backward()
    opt.step()
    obj.after_phase("model", prog)
    mu = obj.cfg.mu0 ** (obj.cfg.s0 / obj.num_scales(prog))  # exp(s0 log mu0 / N)
    for pt, p0, ps in zip(obj.teacher.parameters(), t0, obj.model.parameters()):
        assert torch.allclose(pt, mu * p0 + (1 - mu) * ps, atol=1e-6)
    assert any(not torch.equal(pt, ps) for pt, ps in zip(obj.teacher.parameters(), obj.model.parameters()))


def test_ct_teacher_ema_with_mu0_zero_is_the_student():
    # validate accepts mu0 in [0, 1); mu0 = 0 means mu(k) = 0, so after a step the teacher equals the student.
    obj = _objective("method.name=ct", "method.mu0=0.0")
    assert obj.teacher is not None
    opt = torch.optim.SGD(obj.model.parameters(), lr=0.1)
    prog = Progress(0, 1000, 32)
    obj.loss({"x": torch.randn(32, 2)}, prog)["loss"].mean().backward()
    opt.step()
    obj.after_phase("model", prog)
    moved = [p for p in obj.model.parameters() if p.grad is not None and p.grad.abs().max() > 0]
    assert moved  # the student changed, so equality below is not the initial copy
    for pt, ps in zip(obj.teacher.parameters(), obj.model.parameters()):
        assert torch.equal(pt, ps)


def test_ict_loss_is_weighted_pseudo_huber():
    obj = _objective("method.name=ict")
    torch.manual_seed(1)
    x0 = torch.randn(16, 2)
    prog = Progress(0, 1000, 16)
    out = obj.loss({"x": x0}, prog)
    # recompute independently from the same random draws
    torch.manual_seed(1)
    _ = torch.randn(16, 2)
    si, sn, n = obj.sample_pairs(x0, prog)
    z = torch.randn_like(x0)
    with torch.no_grad():
        a = obj.model(x0 + sn.float()[:, None] * z, sn.float())
        b = obj.model(x0 + si.float()[:, None] * z, si.float())
    c = 0.00054 * 2 ** 0.5
    ref = (torch.sqrt(((a - b) ** 2).sum(1) + c * c) - c) / (sn - si).float()
    assert n == 11
    assert torch.allclose(out["loss"].detach(), ref, rtol=1e-5)


class _Spy(torch.nn.Module):
    """A 'consistency model' that records (input, σ) of each call and returns a fixed f."""

    def __init__(self, process, f):
        super().__init__()
        self.process, self.f, self.calls = process, f, []

    def forward(self, x, t, class_labels=None):
        self.calls.append((x.clone(), t.clone()))
        return self.f.expand_as(x).clone()


def test_two_step_sampler_uses_the_configured_mid_sigma():
    import math

    from cmkit.config import ConfigError, load_config
    from cmkit.sampling import consistency_sample

    # iCT App. B: σ_{i_2} = 1.526 for ImageNet 64 with iCT (0.821 for CIFAR-10, the default).
    assert load_config(None, ["method.name=ict"]).method.mid_sigmas == [0.821]
    cfg = load_config("configs/ict_imagenet64.yaml")
    assert cfg.method.mid_sigmas == [1.526]
    obj = _objective("method.name=ict", "method.mid_sigmas=[1.526]")
    times = obj.sample_times(2)
    assert times == [80.0, 1.526]
    f = torch.tensor([[0.25, -0.5]])
    spy = _Spy(obj.process, f)
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    consistency_sample(spy, noise, times, generator=torch.Generator().manual_seed(1))
    (x1, t1), (x2, t2) = spy.calls
    assert torch.equal(t1, torch.full((3,), 80.0)) and torch.equal(t2, torch.full((3,), 1.526))
    torch.testing.assert_close(x1, 80.0 * noise)  # x_T = σ_max·z
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))  # the sampler's first draw
    # Song et al. 2023 Alg. 1: x ← f + sqrt(τ² - σ_min²)·z, τ = 1.526, σ_min = 0.002.
    torch.testing.assert_close(x2, f + math.sqrt(1.526**2 - 0.002**2) * z)
    with pytest.raises(ConfigError, match="mid_sigmas"):
        load_config(None, ["method.name=ict", "method.mid_sigmas=[90.0]"])
    with pytest.raises(ConfigError, match="mid_sigmas"):
        load_config(None, ["method.name=cd", "method.teacher=analytic", "method.mid_sigmas=[0.5, 1.0]"])


def test_label_dropout_feeds_the_null_label_to_student_and_target():
    """method.label_dropout (classifier-free guidance's training half, Ho & Salimans 2021): a dropped label
    reaches both passes as the zero vector ∅, so the label table gets no gradient from those rows."""
    from cmkit.config import ConfigError

    K = 10
    def objective(p):
        cfg = load_config(None, ["net.name=mlp", "net.hidden=32", "net.depth=2", "net.class_cond=true",
                                 f"method.label_dropout={p}", "method.distance=l2"])
        torch.manual_seed(0)
        return build_objective(cfg, (2,), K)

    x0, labels = torch.randn(64, 2), torch.arange(64) % K
    grads = {}
    for p in (0.0, 0.999999):
        obj = objective(p)
        torch.manual_seed(1)
        loss = obj.loss({"x": x0, "labels": labels}, Progress(0, 1000, 64))["loss"]
        loss.mean().backward()
        grads[p] = obj.model.net.embed.label.weight.grad.abs().sum().item()
        # the same loss by hand with every label replaced by ∅: the dropout draw, then the pairs and the noise
        obj.zero_grad()
        torch.manual_seed(1)
        torch.rand(64, 1)
        sigma_i, sigma_next, _ = obj.sample_pairs(x0, Progress(0, 1000, 64))
        z = torch.randn_like(x0)
        null = torch.zeros(64, K) if p > 0 else labels
        with torch.no_grad():
            target = obj.model(obj.process.add_noise(x0, z, sigma_i.float()), sigma_i.float(), null)
            student = obj.model(obj.process.add_noise(x0, z, sigma_next.float()), sigma_next.float(), null)
        if p > 0:
            weight = 1 / (sigma_next - sigma_i)  # iCT's λ = 1/(σ_{i+1} - σ_i), d = ‖·‖² (method.distance=l2)
            by_hand = weight.float() * (student - target).square().sum(1)
            torch.testing.assert_close(loss.detach(), by_hand, rtol=1e-4, atol=1e-6)
    assert grads[0.0] > 0 and grads[0.999999] == 0  # dropped rows leave the label table alone
    with pytest.raises(ConfigError, match="label_dropout"):
        load_config(None, ["method.label_dropout=1.0"])
    with pytest.raises(ConfigError, match="class-conditional"):
        build_objective(load_config(None, ["net.name=mlp", "method.label_dropout=0.1"]), (2,))
