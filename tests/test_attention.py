"""cmkit.nets.attention: the blockwise (flash-style) attention against the math path, its JVP against
finite differences, the dispatch, and a U-Net's sCT loss and gradient under either kernel (issue 18)."""

import math

import pytest
import torch

from cmkit.config import ConfigError, load_config
from cmkit.nets import attention as att
from cmkit.nets.attention import (attention, attention_backend, blockwise_attention, blockwise_attention_jvp,
                                  math_attention, resolve)
from cmkit.objectives import build_objective
from cmkit.schedules import Progress


def _naive(q, k, v, mask=None):
    """softmax(QKᵀ/√d) V written out here with explicit exp/sum (independent of cmkit's math path)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = torch.where(mask, s, torch.full_like(s, -torch.inf))
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e / e.sum(-1, keepdim=True)) @ v


def _qkv(B, H, N, M, d, dtype, seed, tangents=True):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, N, d), (B, H, M, d), (B, H, M, d)] * (2 if tangents else 1)
    return [torch.randn(*s, generator=g, dtype=dtype) * 2 for s in shapes]


def _mask(B, N, M, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, 1, N, M, generator=g) > 0.4
    m[..., 0] = True  # every query attends to at least one key
    return m


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = [(2, 2, 37, 37, 32, 16), (1, 3, 64, 50, 64, 32), (2, 1, 100, 100, 32, 128), (1, 2, 19, 70, 64, 8)]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("B,H,N,M,d,block", CASES)
def test_blockwise_output_and_jvp_match_math_float32(B, H, N, M, d, block, masked):
    q, k, v, tq, tk, tv = _qkv(B, H, N, M, d, torch.float32, seed=N + d)
    mask = _mask(B, N, M, seed=M) if masked else None
    o_ref, t_ref = torch.func.jvp(lambda a, b, c: _naive(a, b, c, mask), (q, k, v), (tq, tk, tv))
    o_m, t_m = torch.func.jvp(lambda a, b, c: math_attention(a, b, c, mask), (q, k, v), (tq, tk, tv))
    o_b, t_b = torch.func.jvp(lambda a, b, c: blockwise_attention(a, b, c, mask, block), (q, k, v), (tq, tk, tv))
    o_1, t_1 = blockwise_attention_jvp(q, k, v, tq, tk, tv, mask, block)  # the one-pass form (App. F)
    for o, t in ((o_m, t_m), (o_b, t_b), (o_1, t_1)):
        assert _rel(o, o_ref) < 1e-5 and _rel(t, t_ref) < 1e-5
    assert _rel(t_b, torch.zeros_like(t_b) + t_b.mean()) > 0.5  # a non-trivial tangent


@pytest.mark.parametrize("masked", [False, True])
def test_blockwise_tangent_matches_float64_finite_difference(masked):
    q, k, v, tq, tk, tv = _qkv(2, 2, 45, 45, 32, torch.float64, seed=3)
    mask = _mask(2, 45, 45, seed=4) if masked else None
    _, t = torch.func.jvp(lambda a, b, c: blockwise_attention(a, b, c, mask, 16), (q, k, v), (tq, tk, tv))
    h = 1e-6
    fd = (_naive(q + h * tq, k + h * tk, v + h * tv, mask) - _naive(q - h * tq, k - h * tk, v - h * tv, mask)) / (2 * h)
    assert _rel(t, fd) < 1e-8
    # forward-mode AD through torch.autograd.forward_ad gives the same tangent
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        o = blockwise_attention(*(fwAD.make_dual(p, tp) for p, tp in ((q, tq), (k, tk), (v, tv))), mask, 16)
        assert _rel(fwAD.unpack_dual(o).tangent, fd) < 1e-8


@pytest.mark.parametrize("masked", [False, True])
def test_blockwise_backward_matches_gradcheck_and_math(masked):
    q, k, v = (x.requires_grad_() for x in _qkv(1, 2, 9, 7, 8, torch.float64, seed=5, tangents=False))
    mask = _mask(1, 9, 7, seed=6) if masked else None
    assert torch.autograd.gradcheck(lambda a, b, c: blockwise_attention(a, b, c, mask, 4), (q, k, v), fast_mode=True)
    g = torch.randn(1, 2, 9, 8, dtype=torch.float64)
    ref = torch.autograd.grad((_naive(q, k, v, mask) * g).sum(), (q, k, v))
    got = torch.autograd.grad((blockwise_attention(q, k, v, mask, 4) * g).sum(), (q, k, v))
    for a, b in zip(got, ref):
        assert _rel(a, b) < 1e-12


def test_blockwise_half_precision_accumulates_in_float32():
    q, k, v, tq, tk, tv = _qkv(1, 2, 64, 64, 32, torch.float32, seed=7)
    o_ref, t_ref = torch.func.jvp(_naive, (q, k, v), (tq, tk, tv))
    args = [x.bfloat16() for x in (q, k, v)]
    o, t = torch.func.jvp(lambda a, b, c: blockwise_attention(a, b, c, None, 16), tuple(args),
                          tuple(x.bfloat16() for x in (tq, tk, tv)))
    assert o.dtype == t.dtype == torch.bfloat16
    assert _rel(o.float(), o_ref) < 2e-2 and _rel(t.float(), t_ref) < 5e-2


def test_dispatch_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve("auto", cpu, False) == resolve("auto", cpu, True) == "math"
    assert resolve("auto", cuda, False) == "sdpa"
    assert resolve("auto", cuda, True) == ("flash_jvp" if att.flash_jvp_available() else "blockwise")
    assert resolve("blockwise", cpu, True) == "blockwise"
    with pytest.raises(ValueError, match="forward-mode AD"):
        resolve("sdpa", cpu, True)
    with pytest.raises(ValueError, match="net.attention='bogus'"):
        resolve("bogus", cpu, False)
    if not att._triton_interpreter():
        with pytest.raises(ValueError, match="CUDA"):
            resolve("flash_jvp", cpu, True)
    with pytest.raises(ValueError, match="block size"):
        with attention_backend(block=0):
            pass


def test_attention_entry_point_runs_the_chosen_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(att, "blockwise_attention", lambda *a: calls.append("blockwise") or math_attention(*a[:4]))
    q, k, v = _qkv(1, 1, 8, 8, 32, torch.float32, seed=8, tangents=False)
    attention(q, k, v)
    assert calls == []  # auto on CPU: math
    with attention_backend("blockwise"):
        attention(q, k, v)
        assert att.current_backend().backend == "blockwise"
    assert calls == ["blockwise"] and att.current_backend().backend == "auto"  # the scope is restored


def test_flash_jvp_missing_fails_clearly(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_package(name, *a, **k):
        if name.startswith("jvp_flash_attention"):
            raise ImportError("No module named 'jvp_flash_attention'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_package)
    assert not att.flash_jvp_available()
    q, k, v = _qkv(1, 1, 32, 32, 32, torch.float32, seed=9, tangents=False)
    with pytest.raises(RuntimeError, match=r"cmkit\[flash\]"):
        att.flash_jvp_attention(q, k, v)


def test_flash_jvp_shape_limits_are_named():
    q = torch.zeros(1, 1, 49, 32)
    assert "even token count" in att.flash_jvp_supports(q, q, None)
    assert "head_dim" in att.flash_jvp_supports(torch.zeros(1, 1, 64, 24), torch.zeros(1, 1, 64, 24), None)
    assert att.flash_jvp_supports(torch.zeros(1, 1, 64, 32), torch.zeros(1, 1, 64, 32), None) == ""


def test_config_key_is_validated():
    with pytest.raises(ConfigError, match="net.attention='flash'"):
        build_objective(load_config(None, ["method.name=ict", "net.attention=flash"]), (2,))
    with pytest.raises(ConfigError, match="net.attention=sdpa has no forward-mode AD"):
        build_objective(load_config(None, ["method.name=sct", "net.attention=sdpa"]), (2,))


UNET = ["method.name=sct", "net.name=unet", "net.channels=16", "net.channel_mult=[1,2]", "net.num_blocks=1",
        "net.attn_resolutions=[8]", "net.num_groups=4", "net.num_heads=1", "method.tangent_warmup=0"]


def _sct_loss_and_grads(backend):
    torch.manual_seed(0)
    obj = build_objective(load_config(None, UNET + [f"net.attention={backend}"]), (1, 8, 8))
    for p in obj.model.net.parameters():  # zero-initialised projections would hide the attention
        torch.nn.init.normal_(p, std=0.15)
    torch.manual_seed(1)
    x0 = torch.randn(2, 1, 8, 8)
    seen = []
    real = att.blockwise_attention
    att_calls = lambda *a: seen.append(1) or real(*a)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(att, "blockwise_attention", att_calls)
        loss = obj.loss({"x": x0}, Progress(0, 100, 2))["loss"].mean()
    grads = torch.autograd.grad(loss, [p for p in obj.parameters() if p.requires_grad])
    return loss, torch.cat([g.flatten() for g in grads]), len(seen)


def test_unet_sct_loss_and_gradient_same_with_blockwise_attention():
    loss_m, grad_m, n_m = _sct_loss_and_grads("math")
    loss_b, grad_b, n_b = _sct_loss_and_grads("blockwise")
    assert n_m == 0 and n_b >= 4  # tangent and student passes both ran the blockwise kernel (2 attention layers)
    assert abs(loss_b.item() - loss_m.item()) <= 1e-5 * abs(loss_m.item())
    assert _rel(grad_b, grad_m) < 1e-5 and grad_m.norm() > 0


INTERPRET = r"""
import math, torch
from cmkit.nets import attention as att
g = torch.Generator().manual_seed(0)
q, k, v, tq, tk, tv = (torch.randn(1, 2, 64, 32, generator=g) for _ in range(6))
with att.attention_backend("flash_jvp"):
    o, t = torch.func.jvp(att.attention, (q, k, v), (tq, tk, tv))
ro, rt = torch.func.jvp(att.math_attention, (q, k, v), (tq, tk, tv))
print(((o - ro).norm() / ro.norm()).item(), ((t - rt).norm() / rt.norm()).item())
"""


@pytest.mark.slow
def test_flash_jvp_kernel_under_triton_interpreter():
    """jvp-flash-attention's Triton kernel on CPU (TRITON_INTERPRET=1): output and tangent match math attention."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("jvp_flash_attention") is None or importlib.util.find_spec("triton") is None:
        pytest.skip("jvp-flash-attention is not installed (optional extra cmkit[flash], CUDA machines)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", INTERPRET], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    err_o, err_t = map(float, res.stdout.split())
    assert err_o < 1e-5 and err_t < 1e-5


def test_sdpa_backend_supports_the_double_backward_of_gradient_penalties():
    """ACT/CM-GAN's penalty differentiates ‖∇_x D‖² (create_graph=True); PyTorch's fused SDPA backward has no
    derivative (it raises on CPU), cmkit's sdpa path recomputes through math there and matches math exactly."""
    import torch.nn.functional as F

    q, k, v = (x.requires_grad_() for x in _qkv(1, 2, 16, 16, 32, torch.float64, seed=10, tangents=False))
    (g,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        g.square().sum().backward()
    out = {}
    for name, fn in (("math", math_attention), ("sdpa", att.sdpa_attention)):
        (g,) = torch.autograd.grad(fn(q, k, v).square().sum(), q, create_graph=True)
        out[name] = (g, torch.autograd.grad(g.square().sum(), (q, k, v)))
    torch.testing.assert_close(out["sdpa"][0], out["math"][0])
    for a, b in zip(out["sdpa"][1], out["math"][1]):
        torch.testing.assert_close(a, b)
    # a plain backward through the fused recompute equals math's too
    ga = torch.autograd.grad(att.sdpa_attention(q, k, v).sum(), (q, k, v))
    gb = torch.autograd.grad(math_attention(q, k, v).sum(), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)
