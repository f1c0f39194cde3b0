"""One attention entry point for every cmkit network: softmax(q kᵀ/√d) v over (B, heads, tokens, head_dim).

Every network calls :func:`attention`; which kernel runs is decided here, not in the networks (DESIGN.md,
the scale phase). sCM's tangent pass takes a JVP through the network (sCM Sec. 5.1), and PyTorch's fused
SDPA kernels have no forward-mode AD (MACHINE-NOTES §1), while the math path stores the N×N matrix and
its tangent. sCM App. F's answer is a flash-style kernel that carries the JVP; here:

* ``blockwise``: a pure-PyTorch flash-style attention (online softmax over key blocks, query blocks of
  ``block`` rows), a ``torch.autograd.Function`` with a blockwise forward, a blockwise JVP rule (works
  under ``torch.func.jvp`` and ``torch.autograd.forward_ad``) and a blockwise backward. It never holds
  more than a block×block piece of the attention matrix. Runs on any device; the CPU reference.
* ``flash_jvp``: the Triton kernel of the ``jvp-flash-attention`` package (optional extra ``cmkit[flash]``,
  CUDA; verified on CPU under TRITON_INTERPRET=1 with triton 3.7.1, see docs/benchmarks.md).
* ``sdpa``: ``F.scaled_dot_product_attention`` (fused, no forward-mode AD).
* ``math``: the hand-written reference, JVP-safe everywhere.

``net.attention`` chooses (:data:`ATTENTION_BACKENDS`); ``auto`` means: on CUDA, SDPA outside the JVP and
inside it the Triton kernel when installed and the shape suits it, else ``blockwise``; on CPU, math.
"Inside the JVP" is said by :func:`attention_backend(jvp=True) <attention_backend>` (the sCM tangent pass
does) or seen from a functorch-wrapped/dual input. The backend is scoped with a context manager so that
the networks keep the one-line call ``attention(q, k, v)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ATTENTION_BACKENDS = ("auto", "math", "sdpa", "blockwise", "flash_jvp")
DEFAULT_BLOCK = 128
FLASH_HELP = ("pip install -c constraints.txt 'cmkit[flash]' (jvp-flash-attention==0.14.0 with triton<3.9, "
              "CUDA only; `make install` adds it where nvidia-smi is found)")


@dataclass(frozen=True)
class _Setting:
    backend: str = "auto"
    jvp: bool = False
    block: int = DEFAULT_BLOCK


_SETTING: contextvars.ContextVar[_Setting] = contextvars.ContextVar("cmkit_attention", default=_Setting())


def check_backend(name: str, key: str = "net.attention") -> str:
    """Return name if it is an attention backend, else raise ValueError naming the key and the choices."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"{key}='{name}' is not valid. Choose one of: {', '.join(ATTENTION_BACKENDS)}")
    return name


@contextlib.contextmanager
def attention_backend(backend: str | None = None, *, jvp: bool | None = None, block: int | None = None):
    """Scope the attention kernel: ``backend`` (net.attention), ``jvp=True`` inside a tangent pass, ``block`` size."""
    cur = _SETTING.get()
    new = _Setting(check_backend(backend) if backend is not None else cur.backend,
                   cur.jvp if jvp is None else bool(jvp), cur.block if block is None else int(block))
    if new.block < 1:
        raise ValueError(f"attention block size must be >= 1, got {new.block}")
    token = _SETTING.set(new)
    try:
        yield new
    finally:
        _SETTING.reset(token)


def current_backend() -> _Setting:
    """The attention setting in force (for logging and tests)."""
    return _SETTING.get()


# ----------------------------------------------------------------------------
# Reference kernels.


def _bool_mask(mask: Tensor | None) -> Tensor | None:
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"attention masks are boolean (True = attend), got dtype {mask.dtype}")
    return mask


def math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / √d [masked]) v with q (B, H, N, d), k, v (B, H, M, d); JVP-safe everywhere.

    mask: boolean, broadcastable to (B, H, N, M), True where a query may attend to a key.
    """
    s = torch.einsum("bhqd,bhkd->bhqk", q, k / math.sqrt(q.shape[-1]))
    if _bool_mask(mask) is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(dim=-1), v)


class _SDPA(torch.autograd.Function):
    """Fused SDPA whose backward is itself differentiable (ACT / CM-GAN gradient penalties: create_graph=True).

    The fused kernels' backward has no derivative ("derivative for aten::_scaled_dot_product_flash_attention_
    backward is not implemented"), so the backward recomputes the attention: with the fused kernel for a plain
    backward (one extra attention forward, as activation checkpointing), with the math path when autograd
    records the backward for a double backward (grad mode is on inside backward exactly then).
    """

    @staticmethod
    def forward(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask = inputs
        ctx.mask = mask
        ctx.save_for_backward(q, k, v)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        double = torch.is_grad_enabled()
        with torch.enable_grad():
            qkv = [x if double else x.detach().requires_grad_() for x in (q, k, v)]
            fn = math_attention if double else (lambda a, b, c, m: F.scaled_dot_product_attention(a, b, c, attn_mask=m))
            o = fn(*qkv, ctx.mask)
            grads = torch.autograd.grad(o, qkv, do, create_graph=double)
        return (*grads, None)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """PyTorch's fused scaled_dot_product_attention (flash / memory-efficient on CUDA); no forward-mode AD.

    Under autograd its backward is twice differentiable (:class:`_SDPA`), so gradient penalties work through it.
    """
    # Not under torch.compile (the sCM student pass, no double backward): dynamo traces the plain kernel.
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)) and not torch.compiler.is_compiling():
        return _SDPA.apply(q, k, v, _bool_mask(mask))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_bool_mask(mask))


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulate half-precision inputs in float32 (as flash attention does); float32/64 as they are."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _mask_block(mask: Tensor | None, shape, i: slice, j: slice) -> Tensor | None:
    """The (i, j) block of a boolean mask broadcastable to shape (B, H, N, M); expand is a view (no copy)."""
    return None if mask is None else mask.expand(shape)[..., i, j]


def _scores(qi: Tensor, kj: Tensor, scale: float, mask: Tensor | None, i: slice, j: slice, shape) -> Tensor:
    s = torch.matmul(qi, kj.transpose(-1, -2)) * scale
    mb = _mask_block(mask, shape, i, j)
    return s if mb is None else s.masked_fill(~mb, float("-inf"))


def _blocks(n: int, block: int):
    return [slice(a, min(a + block, n)) for a in range(0, n, block)]


def blockwise_forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                      block: int = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """(O, logsumexp) by the online softmax over key blocks (flash attention; sCM App. F's forward).

    Per query block: m ← max(m, rowmax S_j), l ← l·e^{m_old - m} + Σ e^{S_j - m}, acc ← acc·e^{m_old - m}
    + e^{S_j - m} V_j; O = acc / l, L = m + ln l. A query that may attend to no key gives NaN, as softmax does.
    """
    dt, out_dt = _acc_dtype(q), q.dtype
    B, H, N, d = q.shape
    M = k.shape[-2]
    scale = 1.0 / math.sqrt(d)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    shape = (B, H, N, M)
    o = torch.empty(B, H, N, v.shape[-1], dtype=dt, device=q.device)
    lse = torch.empty(B, H, N, dtype=dt, device=q.device)
    for i in _blocks(N, block):
        qi = q[..., i, :]
        m = torch.full(qi.shape[:-1], torch.finfo(dt).min, dtype=dt, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(*qi.shape[:-1], v.shape[-1], dtype=dt, device=q.device)
        for j in _blocks(M, block):
            s = _scores(qi, k[..., j, :], scale, mask, i, j, shape)
            m_new = torch.maximum(m, s.amax(-1))
            alpha = torch.exp(m - m_new)
            p = torch.exp(s - m_new.unsqueeze(-1))
            l = l * alpha + p.sum(-1)
            acc = acc * alpha.unsqueeze(-1) + torch.matmul(p, v[..., j, :])
            m = m_new
        o[..., i, :] = acc / l.unsqueeze(-1)
        lse[..., i] = m + torch.log(l)
    return o.to(out_dt), lse


def blockwise_tangent(q, k, v, o, lse, tq, tk, tv, mask: Tensor | None = None,
                      block: int = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """(dO, dL): the JVP of attention along (tq, tk, tv), blockwise, with P rebuilt from the saved logsumexp.

    sCM App. F: with S = QKᵀ/√d, P = softmax(S), dS = (dQ Kᵀ + Q dKᵀ)/√d and μ_i = Σ_j P_ij dS_ij,
    dO = P dV + (P ⊙ (dS - μ)) V = Σ_j P_ij (dS_ij V_j + dV_j) - μ_i O_i, and dL_i = μ_i.
    """
    dt, out_dt = _acc_dtype(q), q.dtype
    B, H, N, d = q.shape
    M = k.shape[-2]
    scale = 1.0 / math.sqrt(d)
    zero = lambda x, like: torch.zeros_like(like) if x is None else x.to(dt)  # noqa: E731 (no tangent = 0)
    q, k, v, o, lse = q.to(dt), k.to(dt), v.to(dt), o.to(dt), lse.to(dt)
    tq, tk, tv = zero(tq, q), zero(tk, k), zero(tv, v)
    shape = (B, H, N, M)
    to = torch.empty_like(o)
    tl = torch.empty_like(lse)
    for i in _blocks(N, block):
        qi, tqi = q[..., i, :], tq[..., i, :]
        mu = torch.zeros(qi.shape[:-1], dtype=dt, device=q.device)
        acc = torch.zeros(*qi.shape[:-1], v.shape[-1], dtype=dt, device=q.device)
        for j in _blocks(M, block):
            kj = k[..., j, :]
            p = torch.exp(_scores(qi, kj, scale, mask, i, j, shape) - lse[..., i].unsqueeze(-1))
            ds = (torch.matmul(tqi, kj.transpose(-1, -2)) + torch.matmul(qi, tk[..., j, :].transpose(-1, -2))) * scale
            pds = p * ds
            mu = mu + pds.sum(-1)
            acc = acc + torch.matmul(pds, v[..., j, :]) + torch.matmul(p, tv[..., j, :])
        to[..., i, :] = acc - mu.unsqueeze(-1) * o[..., i, :]
        tl[..., i] = mu
    return to.to(out_dt), tl


def blockwise_attention_jvp(q, k, v, tq, tk, tv, mask: Tensor | None = None,
                            block: int = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """(O, dO) in ONE blockwise pass: the online softmax carries the tangent sums too (sCM App. F's kernel).

    Besides m, l and acc_O, each query block accumulates acc_T = Σ e^{S-m}(dS V + dV) and acc_μ = Σ e^{S-m} dS
    with the same rescaling; then O = acc_O/l, μ = acc_μ/l, dO = acc_T/l - μ O. This is what a fused kernel
    does; :class:`BlockwiseAttention` uses forward + :func:`blockwise_tangent` because an autograd.Function
    returns its output before its jvp rule runs.
    """
    dt, out_dt = _acc_dtype(q), q.dtype
    B, H, N, d = q.shape
    M = k.shape[-2]
    scale = 1.0 / math.sqrt(d)
    q, k, v, tq, tk, tv = (x.to(dt) for x in (q, k, v, tq, tk, tv))
    shape = (B, H, N, M)
    o = torch.empty(B, H, N, v.shape[-1], dtype=dt, device=q.device)
    to = torch.empty_like(o)
    for i in _blocks(N, block):
        qi, tqi = q[..., i, :], tq[..., i, :]
        m = torch.full(qi.shape[:-1], torch.finfo(dt).min, dtype=dt, device=q.device)
        l, mu = torch.zeros_like(m), torch.zeros_like(m)
        acc = torch.zeros(*qi.shape[:-1], v.shape[-1], dtype=dt, device=q.device)
        acc_t = torch.zeros_like(acc)
        for j in _blocks(M, block):
            kj, vj = k[..., j, :], v[..., j, :]
            s = _scores(qi, kj, scale, mask, i, j, shape)
            m_new = torch.maximum(m, s.amax(-1))
            alpha = torch.exp(m - m_new)
            p = torch.exp(s - m_new.unsqueeze(-1))
            ds = (torch.matmul(tqi, kj.transpose(-1, -2)) + torch.matmul(qi, tk[..., j, :].transpose(-1, -2))) * scale
            pds = p * ds
            l = l * alpha + p.sum(-1)
            mu = mu * alpha + pds.sum(-1)
            a = alpha.unsqueeze(-1)
            acc = acc * a + torch.matmul(p, vj)
            acc_t = acc_t * a + torch.matmul(pds, vj) + torch.matmul(p, tv[..., j, :])
            m = m_new
        li = l.unsqueeze(-1)
        o[..., i, :] = acc / li
        to[..., i, :] = acc_t / li - (mu.unsqueeze(-1) / li) * o[..., i, :]
    return o.to(out_dt), to.to(out_dt)


def blockwise_backward(q, k, v, o, lse, do, dlse, mask: Tensor | None = None, block: int = DEFAULT_BLOCK):
    """(dQ, dK, dV) blockwise (flash attention's backward): D_i = Σ dO_i·O_i, dS = P ⊙ (dO Vᵀ - D + dL)."""
    dt = _acc_dtype(q)
    B, H, N, d = q.shape
    M = k.shape[-2]
    scale = 1.0 / math.sqrt(d)
    q32, k32, v32, o32, lse = q.to(dt), k.to(dt), v.to(dt), o.to(dt), lse.to(dt)
    do = torch.zeros_like(o32) if do is None else do.to(dt)
    D = (do * o32).sum(-1)
    if dlse is not None:
        D = D - dlse.to(dt)
    shape = (B, H, N, M)
    dq, dk, dv = torch.zeros_like(q32), torch.zeros_like(k32), torch.zeros_like(v32)
    for i in _blocks(N, block):
        qi, doi = q32[..., i, :], do[..., i, :]
        for j in _blocks(M, block):
            kj, vj = k32[..., j, :], v32[..., j, :]
            p = torch.exp(_scores(qi, kj, scale, mask, i, j, shape) - lse[..., i].unsqueeze(-1))
            dv[..., j, :] += torch.matmul(p.transpose(-1, -2), doi)
            ds = p * (torch.matmul(doi, vj.transpose(-1, -2)) - D[..., i].unsqueeze(-1))
            dq[..., i, :] += torch.matmul(ds, kj) * scale
            dk[..., j, :] += torch.matmul(ds.transpose(-1, -2), qi) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class BlockwiseAttention(torch.autograd.Function):
    """Flash-style attention with blockwise forward, JVP and backward; outputs (O, logsumexp).

    Usable under torch.func.jvp / forward_ad (the tangent pass) and under autograd (the student pass).
    """

    generate_vmap_rule = True  # the blockwise loops are plain tensor ops, so torch.func.vmap can batch them

    @staticmethod
    def forward(q, k, v, mask, block):
        return blockwise_forward(q, k, v, mask, block)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, block = inputs
        o, lse = output
        ctx.mask, ctx.block = mask, block
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v, o, lse)  # the logsumexp has an exact tangent (μ) and gradient (P), no mark

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tmask, _tblock):
        q, k, v, o, lse = ctx.saved_tensors
        return blockwise_tangent(q, k, v, o, lse, tq, tk, tv, ctx.mask, ctx.block)

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = blockwise_backward(q, k, v, o, lse, do, dlse, ctx.mask, ctx.block)
        return dq, dk, dv, None, None


def blockwise_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                        block: int = DEFAULT_BLOCK) -> Tensor:
    """Memory-efficient attention with forward-mode and reverse-mode AD (see :class:`BlockwiseAttention`)."""
    if block < 1:
        raise ValueError(f"attention block size must be >= 1, got {block}")
    return BlockwiseAttention.apply(q, k, v, _bool_mask(mask), block)[0]


# ----------------------------------------------------------------------------
# The Triton kernel of the jvp-flash-attention package (optional extra).


def flash_jvp_available() -> bool:
    """Whether the jvp-flash-attention package and triton import."""
    try:
        import jvp_flash_attention.jvp_attention  # noqa: F401
    except Exception:  # ImportError, or triton failing to initialise
        return False
    return True


def flash_jvp_supports(q: Tensor, k: Tensor, mask: Tensor | None) -> str:
    """'' if the Triton kernel takes these shapes, else why not (the package's own asserts, v0.14.0)."""
    N, d = q.shape[-2], q.shape[-1]
    if k.shape[-2] != N:
        return f"needs as many keys as queries (self-attention), got {N} queries and {k.shape[-2]} keys"
    if d not in (16, 32, 64, 128, 256) or k.shape[-1] != d:
        return f"needs head_dim in 16/32/64/128/256, got {d}"
    if N % 2 or N < 32:
        return f"needs an even token count >= 32, got {N}"
    if mask is not None and tuple(mask.shape) != tuple(q.shape[:-1]) + (N,):
        return "needs a full (B, H, N, N) mask"
    return ""


def flash_jvp_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """jvp-flash-attention's Triton kernel (JVPAttn.fwd_dual: carries the tangent of a torch.func.jvp)."""
    try:
        from jvp_flash_attention.jvp_attention import JVPAttn
    except Exception as e:
        raise RuntimeError(f"net.attention=flash_jvp needs the jvp-flash-attention package ({type(e).__name__}: "
                           f"{e}); install it with {FLASH_HELP}, or use net.attention=blockwise") from None
    why = flash_jvp_supports(q, k, mask)
    if why:
        raise ValueError(f"net.attention=flash_jvp: the Triton kernel {why}; use net.attention=auto (falls back to "
                         f"blockwise for such shapes) or blockwise")
    return JVPAttn.fwd_dual(q, k, v, attn_mask=mask)


# ----------------------------------------------------------------------------
# Dispatch.


def _in_transform(x: Tensor) -> bool:
    """True when x carries a forward-mode tangent or is wrapped by a torch.func transform (jvp, vmap, grad).

    Under torch.compile (the sCM student pass, never the JVP pass) this is False without asking functorch,
    which dynamo cannot trace."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return True
    try:
        return torch.autograd.forward_ad.unpack_dual(x).tangent is not None
    except RuntimeError:
        return False


def resolve(backend: str, device: torch.device, in_jvp: bool) -> str:
    """The kernel :func:`attention` runs for a backend on a device, inside or outside a JVP."""
    check_backend(backend)
    if backend != "auto":
        if backend == "flash_jvp" and device.type != "cuda" and not _triton_interpreter():
            raise ValueError("net.attention=flash_jvp runs a Triton kernel: it needs a CUDA device "
                             "(or TRITON_INTERPRET=1 for a slow CPU check); use net.attention=blockwise on CPU")
        if backend == "sdpa" and in_jvp:
            raise ValueError("net.attention=sdpa has no forward-mode AD (MACHINE-NOTES §1) and cannot run in the "
                             "sCM tangent pass; use net.attention=auto, blockwise or math")
        return backend
    if device.type != "cuda":
        return "math"
    if not in_jvp:
        return "sdpa"
    return "flash_jvp" if flash_jvp_available() else "blockwise"


def _triton_interpreter() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention over (B, H, N, d) tensors, safe under torch.func.jvp (kernel: module doc)."""
    s = _SETTING.get()
    in_jvp = s.jvp or _in_transform(q)
    kernel = resolve(s.backend, q.device, in_jvp)
    if kernel == "flash_jvp" and s.backend == "auto" and flash_jvp_supports(q, k, mask):
        kernel = "blockwise"  # auto: shapes the Triton kernel refuses (e.g. 7×7 = 49 tokens) take the reference
    if kernel == "math":
        return math_attention(q, k, v, mask)
    if kernel == "sdpa":
        return sdpa_attention(q, k, v, mask)
    if kernel == "blockwise":
        return blockwise_attention(q, k, v, mask, s.block)
    return flash_jvp_attention(q, k, v, mask)
