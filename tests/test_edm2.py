"""EDM2's magnitude-preserving U-Net (cmkit/nets/edm2.py): published sizes, magnitude preservation, JVP, dropout
replay, forced weight normalisation, the logvar (w_φ) hook and a short sCT run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cmkit.config import load_config
from cmkit.nets import NETWORKS, build_network
from cmkit.nets.edm2 import EDM2UNet, MPConv, MPFourier, MPPositional, mp_cat, mp_silu, mp_sum, normalize
from cmkit.objectives import build_objective
from cmkit.objectives.base import SharedDropout
from cmkit.objectives.scm import NetLogvar
from cmkit.schedules import Progress

# A toy EDM2: 2 levels (8x8, 4x4), attention at 4x4, two heads per attention block.
TOY = dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), channels_per_head=8)
TOY_OVERRIDES = ["net.name=edm2", "net.channels=8", "net.channel_mult=[1,2]", "net.num_blocks=1",
                 "net.attn_resolutions=[4]", "net.channels_per_head=8"]


def _count(**kw) -> int:
    with torch.device("meta"):  # no memory: parameters exist only as shapes
        net = EDM2UNet((4, 64, 64), num_classes=1000, logvar_channels=128, **kw)
    return sum(p.numel() for p in net.parameters())


# ----------------------------------------------------------------------------
# Sizes.

# (model_channels, sCM Table 2 / EDM2 Table 2 figure, count of the authors' released code). The last column is
# sum(p.numel() for p in training.networks_edm2.Precond(64, 4, 1000, model_channels=C).parameters()) of
# NVlabs/edm2 (commit on 2026-12-02), run here on the meta device: a golden value from independent code. Both
# include EDM2's 128-wide log-variance head (an MPConv(128, 1): 128 weights; its features are fixed buffers).
EDM2_SIZES = {
    "S": (192, 280e6, 280_212_837),
    "M": (256, 498e6, 497_807_781),
    "L": (320, 778e6, 777_498_085),
    "XL": (384, 1.1e9, 1_119_283_749),
    "XXL": (448, 1.5e9, 1_523_164_773),
}


@pytest.mark.parametrize("size", list(EDM2_SIZES))
def test_parameter_counts_match_the_published_sizes(size):
    channels, published, released = EDM2_SIZES[size]
    n = _count(model_channels=channels)  # defaults: mult [1,2,3,4], 3 blocks, attention at 16 and 8
    assert n == released
    if published >= 1e9:  # "1.1B", "1.5B": two significant figures, so the count must round to them
        assert round(n / 1e9, 1) == published / 1e9
    else:
        assert abs(n - published) / published < 0.01


def test_state_dict_keys_are_edm2s():
    """Names and shapes of NVlabs/edm2's Precond state dict ('unet.' prefix dropped), read from its release:
    an EDM2 checkpoint's tensors load onto this net (checked once against the released code: strict load, the
    same output to 1.4e-6 in float32, in train and eval mode)."""
    with torch.device("meta"):
        sd = EDM2UNet((4, 64, 64), num_classes=1000, logvar_channels=128).state_dict()
    expected = {
        "out_gain": (), "emb_fourier.freqs": (192,), "emb_fourier.phases": (192,), "emb_noise.weight": (768, 192),
        "emb_label.weight": (768, 1000), "enc.64x64_conv.weight": (192, 5, 3, 3),
        "enc.32x32_down.conv_res0.weight": (192, 192, 3, 3), "enc.32x32_block0.conv_skip.weight": (384, 192, 1, 1),
        "enc.16x16_block2.attn_qkv.weight": (1728, 576, 1, 1), "dec.8x8_in0.attn_proj.weight": (768, 768, 1, 1),
        "dec.8x8_in0.emb_gain": (), "dec.8x8_in0.emb_linear.weight": (768, 768),
        "dec.64x64_block3.conv_skip.weight": (192, 384, 1, 1), "out_conv.weight": (4, 192, 3, 3),
        "logvar_fourier.freqs": (128,), "logvar_linear.weight": (1, 128),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert len(sd) == 203


def test_double_norm_adds_one_shift_projection_per_block():
    """sCM's adaptive double normalisation needs s(t) and b(t): one more emb→width projection per block, no gain.

    Blocks per level l of L (EDM2 Fig. 21): encoder num_blocks (+1 downsampling block for l > 0), decoder
    num_blocks + 1 (+2 middle blocks at the lowest resolution, +1 upsampling block elsewhere)."""
    nb, mult, mc = 3, (1, 2, 3, 4), 192
    cemb, L = mc * max(mult), len(mult)
    blocks = {l: nb + (l > 0) + (nb + 1) + (2 if l == L - 1 else 1) for l in range(L)}
    expected = sum(count * (cemb * mc * mult[l] - 1) for l, count in blocks.items())
    assert _count(model_channels=mc, modulation="double_norm") - _count(model_channels=mc) == expected


def test_registered_and_built_from_config():
    assert NETWORKS["edm2"] is EDM2UNet
    cfg = load_config(None, TOY_OVERRIDES + ["net.class_cond=true", "net.embedding=positional",
                                             "net.modulation=double_norm", "net.dropout=0.1"])
    net = build_network(cfg.net, (3, 8, 8), 10)
    assert isinstance(net.emb_fourier, MPPositional) and net.emb_label.weight.shape == (cfg.net.channels * 2, 10)
    assert net.enc["8x8_block0"].modulation == "double_norm" and net.enc["4x4_block0"].num_heads == 2
    y = net(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    assert y.shape == (2, 3, 8, 8)
    assert not net.has_logvar  # net.logvar_channels=0 (the default): no head, scm.py learns its own w_φ
    with pytest.raises(ValueError, match="net.logvar_channels"):
        net.logvar(torch.rand(2))
    with torch.device("meta"):
        headless = EDM2UNet((4, 64, 64), num_classes=1000, model_channels=192)
    assert _count(model_channels=192) - sum(p.numel() for p in headless.parameters()) == 128


@pytest.mark.parametrize("bad, match", [
    (dict(modulation="add"), "net.modulation"),
    (dict(embedding="bogus"), "net.embedding"),
    (dict(attn_resolutions=(5,)), "net.attn_resolutions"),
    (dict(channels_per_head=3), "net.channels_per_head"),
    (dict(channels_per_head=0), "net.channels_per_head"),
    (dict(logvar_channels=-1), "net.logvar_channels"),
])
def test_bad_options_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        EDM2UNet((3, 8, 8), **{**TOY, **bad})
    with pytest.raises(ValueError, match="not divisible"):
        EDM2UNet((3, 7, 7), **TOY)


# ----------------------------------------------------------------------------
# Magnitude preservation (EDM2 Sec. 2.3-2.5, App. B).


def test_mp_silu_has_unit_second_moment_for_a_standard_normal_input():
    # E[silu(z)²] by quadrature of the normal density, recomputed here: EDM2 Eq. 81 divides by its root, 0.596.
    z = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    density = torch.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi)
    second = torch.trapezoid(torch.nn.functional.silu(z) ** 2 * density, z).item()
    assert abs(math.sqrt(second) - 0.596) < 1e-3
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(mp_silu(x).square().mean().item() - second / 0.596 ** 2) < 0.01


@pytest.mark.parametrize("t", [0.3, 0.5, 0.8])
def test_mp_sum_and_mp_cat_preserve_unit_magnitude(t):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4000, 64, generator=g, dtype=torch.float64)
    b = torch.randn(4000, 96, generator=g, dtype=torch.float64)
    # Eq. 88: Var((1-t)a + t b) = (1-t)² + t² for independent unit-variance a, b.
    assert abs(mp_sum(a, b[:, :64], t).var().item() - 1) < 0.01
    # Eq. 103: total magnitude 1, with the fraction (1-t)²/((1-t)² + t²) of the energy carried by a.
    c = mp_cat(a, b, t=t)
    assert c.shape == (4000, 160) and abs(c.square().mean().item() - 1) < 0.01
    share = c[:, :64].square().sum() / c.square().sum()
    assert abs(share.item() - (1 - t) ** 2 / ((1 - t) ** 2 + t ** 2)) < 0.01


def test_mpconv_preserves_unit_variance_at_init():
    torch.manual_seed(0)
    for kernel, x in (((), torch.randn(20000, 256)), ((3, 3), torch.randn(64, 32, 24, 24))):
        conv = MPConv(x.shape[1], 48, kernel)
        w = normalize(conv.weight) / math.sqrt(conv.weight[0].numel())
        # Eq. 47: every output unit's weights have norm 1, so Var(w·x) = ‖w‖² = 1 for i.i.d. unit-variance x.
        assert torch.allclose(w.flatten(1).norm(dim=1), torch.ones(48), atol=1e-3)
        y = conv(x)
        if kernel:
            y = y[:, :, 1:-1, 1:-1]  # the zero padding shrinks only the border pixels
        assert abs(y.var().item() - 1) < 0.03


def test_embeddings_have_unit_magnitude():
    c = torch.linspace(-3, 3, 4001)
    assert torch.allclose(MPPositional(128)(c).square().mean(1), torch.ones(4001), atol=1e-5)  # (cos²+sin²)·2/2
    assert abs(MPFourier(512)(c).square().mean().item() - 1) < 0.03  # 2·E[cos²(random phase)] = 1


def test_encoder_activations_stay_near_unit_magnitude_at_init():
    torch.manual_seed(0)
    net = EDM2UNet((3, 16, 16), model_channels=32, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(4,),
                   channels_per_head=16).eval()
    rms = []
    hooks = [b.register_forward_hook(lambda m, i, o: rms.append(o.square().mean().sqrt().item()))
             for b in list(net.enc.values()) + list(net.dec.values())]
    net(torch.randn(16, 3, 16, 16), torch.randn(16))
    for h in hooks:
        h.remove()
    assert len(rms) == len(net.enc) + len(net.dec)
    # Encoder: pixel-normalised main path and independent-branch mp_sums (Eq. 88) keep the RMS near 1. Decoder:
    # no pixel norm, and its branches are correlated at init, so the magnitude sags but stays O(1) (measured
    # 0.69-0.96 here); without the √((1-t)² + t²) divisions it would grow block by block.
    enc, dec = rms[:len(net.enc)], rms[len(net.enc):]
    assert all(0.85 < r < 1.15 for r in enc), enc
    assert all(0.6 < r < 1.4 for r in dec), dec


# ----------------------------------------------------------------------------
# Forward-mode AD (sCM Eq. 6 needs it through the whole network).


def _randomised(modulation, embedding, dropout=0.0, seed=0):
    """A float64 toy net whose zero-initialised gains are made non-zero, so every path reaches the output."""
    torch.manual_seed(seed)
    net = EDM2UNet((3, 8, 8), num_classes=5, modulation=modulation, embedding=embedding, dropout=dropout,
                   logvar_channels=16, **TOY).double()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(0.8)
    return net


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    c = torch.rand(2, generator=g, dtype=torch.float64) * 1.5
    dx, dc = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    return x, c, dx, dc


@pytest.mark.parametrize("modulation, embedding", [("film", "fourier"), ("double_norm", "positional")])
def test_jvp_matches_central_finite_difference_and_the_vjp(modulation, embedding):
    net = _randomised(modulation, embedding).train()  # training mode: forced weight normalisation inside the jvp
    labels = torch.tensor([1, 3])
    x, c, dx, dc = _inputs()

    def f(x_, c_):
        return net(x_, c_, labels)

    y, jvp = torch.func.jvp(f, (x, c), (dx, dc))
    h = 1e-6
    fd = (f(x + h * dx, c + h * dc) - f(x - h * dx, c - h * dc)) / (2 * h)
    assert (jvp - fd).norm() / fd.norm() < 1e-4
    # Dot-product test: <u, J v> = <Jᵀ u, v>.
    u = torch.randn_like(y)
    _, vjp_fn = torch.func.vjp(f, x, c)
    ux, uc = vjp_fn(u)
    lhs, rhs = (u * jvp).sum(), (ux * dx).sum() + (uc * dc).sum()
    assert abs(lhs - rhs) / abs(lhs) < 1e-10


def test_logvar_head_is_jvp_safe_and_depends_on_c_noise():
    net = _randomised("film", "positional")
    c, dc = torch.tensor([0.2, 1.1], dtype=torch.float64), torch.tensor([1.0, -0.5], dtype=torch.float64)
    lv, jvp = torch.func.jvp(net.logvar, (c,), (dc,))
    h = 1e-6
    fd = (net.logvar(c + h * dc) - net.logvar(c - h * dc)) / (2 * h)
    assert lv.shape == (2,) and lv[0] != lv[1] and torch.allclose(jvp, fd, rtol=1e-6)


def test_jvp_primal_and_plain_forward_agree_with_replayed_dropout_masks():
    net = _randomised("double_norm", "positional", dropout=0.5).train()
    x, c, dx, dc = _inputs()
    labels = torch.tensor([0, 4])
    shared = SharedDropout(x.device)
    with shared.record():
        y_jvp, _ = torch.func.jvp(lambda a, b: net(a, b, labels), (x, c), (dx, dc))
    with shared.replay():
        y_plain = net(x, c, labels)
    assert torch.equal(y_jvp, y_plain)  # bit-identical: same masks, same (already force-normalised) weights
    assert not torch.equal(net(x, c, labels), y_plain)  # a fresh draw differs: the check above can fail


# ----------------------------------------------------------------------------
# Forced weight normalisation (EDM2 Eq. 66).


def _rms(w):
    return w.flatten(1).square().mean(1).sqrt()


def test_forced_weight_normalisation_after_each_optimiser_step_only():
    torch.manual_seed(0)
    net = EDM2UNet((3, 8, 8), **TOY).train()
    with torch.no_grad():
        net.out_gain.fill_(1.0)  # at 0 (its init) no weight but the gain would get a gradient
    w = net.enc["8x8_conv"].weight
    assert not torch.allclose(_rms(w), torch.ones(w.shape[0]), atol=0.05)  # randn init: rows are not unit
    x, c = torch.randn(4, 3, 8, 8), torch.rand(4)
    net.eval()(x, c)
    assert not torch.allclose(_rms(w), torch.ones(w.shape[0]), atol=0.05)  # eval mode leaves the weights alone
    net.train()
    # Two grad-enabled passes, then backward: the second pass must not overwrite a weight the first saved.
    loss = net(x, c).square().mean() + net(x, c + 0.1).square().mean()
    assert torch.allclose(_rms(w), torch.ones(w.shape[0]), atol=2e-4)  # normalize's fixed point: rms = 1 - 1e-4
    loss.backward()
    opt = torch.optim.Adam(net.parameters(), lr=0.05, foreach=True)
    opt.step()
    assert not torch.allclose(_rms(w), torch.ones(w.shape[0]), atol=2e-4)  # the step moved the rows off the sphere
    net(x, c)
    assert torch.allclose(_rms(w), torch.ones(w.shape[0]), atol=2e-4)  # and the next training forward puts them back


def test_forced_normalisation_changes_the_output_by_order_eps_once():
    """normalize(w) = w/(ε + rms w) is scale-invariant up to ε = 1e-4, so overwriting w with normalize(w) moves the
    output by O(ε) once (as in EDM2); later passes of the same step reuse the stored weights bit for bit."""
    net = _randomised("film", "fourier")
    x, c, _, _ = _inputs()
    labels = torch.tensor([0, 1])
    before = net.eval()(x, c, labels)
    first = net.train()(x, c, labels)  # overwrites every weight with its normalised copy
    assert 0 < (first - before).norm() / before.norm() < 1e-3
    assert torch.equal(net(x, c, labels), first) and torch.equal(net.eval()(x, c, labels), first)


# ----------------------------------------------------------------------------
# sCT with the EDM2 network: w_φ from the net's logvar head, and a short run.


def test_scm_uses_the_nets_logvar_head_as_w_phi():
    cfg = load_config(None, TOY_OVERRIDES + ["net.embedding=positional", "method.name=sct"])
    assert type(build_objective(cfg, (3, 8, 8)).weight_net).__name__ == "AdaptiveWeight"  # no head: scm's own
    cfg = load_config(None, TOY_OVERRIDES + ["net.embedding=positional", "method.name=sct", "net.logvar_channels=128"])
    obj = build_objective(cfg, (3, 8, 8))
    assert isinstance(obj.weight_net, NetLogvar)
    (phase,) = obj.phases
    params = dict(phase.module.named_parameters())
    assert "model.net.logvar_linear.weight" in params and not any(k.startswith("weight.") for k in params)
    t = torch.tensor([0.3, 1.0])
    assert torch.equal(obj.weight_net(t), obj.model.net.logvar(obj.process.c_noise(t)))
    before = obj.model.net.logvar_linear.weight.detach().clone()
    torch.manual_seed(0)
    out = phase.loss({"x": torch.randn(4, 3, 8, 8)}, Progress(0, 100, 4))
    assert torch.isfinite(out["loss"]).all()
    out["loss"].mean().backward()
    torch.optim.SGD(phase.module.parameters(), lr=0.1).step()
    assert not torch.equal(before, obj.model.net.logvar_linear.weight)


@pytest.mark.slow
def test_short_sct_run_with_edm2_is_finite_and_the_loss_decreases(tmp_path):
    from cmkit.train import train

    cfg = load_config(None, TOY_OVERRIDES + [
        "data.name=digits", "net.embedding=positional", "net.logvar_channels=128", "net.modulation=double_norm",
        "net.dropout=0.1",
        "method.name=sct", "method.tangent_warmup=20", "train.steps=24", "train.batch_size=16",
        "train.optimizer=adam", "train.lr=0.01", "train.betas=[0.9,0.99]", "train.threads=1",
        "run.log_every=4", f"run.dir={tmp_path}"])
    train(cfg)
    logs = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"loss"' in line]
    losses = [d["loss"] for d in logs]
    assert len(losses) >= 5 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.3, losses


def test_sct_imagenet64_preset_is_edm2_s_and_trains_at_small_size(tmp_path):
    import numpy as np

    from cmkit.train import train

    cfg = load_config("configs/sct_imagenet64.yaml")
    n, assumed = cfg.net, dict(channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8])
    assert n.name == "edm2" and all(getattr(n, k) == v for k, v in assumed.items())
    assert (n.embedding, n.modulation, n.logvar_channels, n.class_cond) == ("positional", "double_norm", 128, True)
    # EDM2's optimiser (train_edm2.py edm2-img64-s): lr 1e-2 decaying after 35k batches of 2048, β2 = 0.99.
    t = cfg.train
    assert (t.optimizer, t.lr, t.betas, t.lr_ref_nimg, t.batch_size) == ("adam", 0.01, [0.9, 0.99], 35000 * 2048, 2048)
    with torch.device("meta"):
        net = build_network(n, (3, 64, 64), 1000)
    count = sum(p.numel() for p in net.parameters())
    assert abs(count - 293.9e6) / 293.9e6 < 0.001  # EDM2-S (280.2M) + double normalisation's shift projections
    # The preset itself trains (at toy width, on 16 random labelled 16x16 images, 2 steps).
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "inet.npz", x=rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8), y=rng.integers(0, 10, 16))
    small = ["net.channels=8", "net.channel_mult=[1,2]", "net.num_blocks=1", "net.attn_resolutions=[8]",
             "net.channels_per_head=8", f"data.path={tmp_path / 'inet.npz'}", "train.steps=2", "train.batch_size=4",
             "train.threads=1", "train.device=cpu", f"run.dir={tmp_path / 'run'}", "run.sample_n=4",
             "run.progress=false", "run.tensorboard=false", "run.log_every=1"]
    train(load_config("configs/sct_imagenet64.yaml", small))
    logs = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl") if '"loss"' in line]
    assert len(logs) == 2 and all(math.isfinite(d["loss"]) for d in logs)


def test_guidance_input_starts_switched_off_and_works_under_bf16_autocast():
    """sCD with CFG (sCM Sec. 5.2): w enters through a gain that starts at 0, so a student initialised from its
    teacher starts as the teacher for every w; once the gain moves, w changes the output."""
    torch.manual_seed(0)
    net = EDM2UNet((3, 8, 8), num_classes=5, guidance_cond=True, modulation="double_norm", embedding="positional",
                   **TOY).eval()
    x, c, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        net.out_gain.fill_(1.0)
        assert torch.equal(net(x, c, y, guidance=1.0), net(x, c, y, guidance=2.0))
        net.guidance_gain.fill_(1.0)
        assert not torch.equal(net(x, c, y, guidance=1.0), net(x, c, y, guidance=torch.tensor([2.0, 1.5])))
    with pytest.raises(ValueError, match="guidance"):
        net(x, c, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # train.precision=bf16
        out, tangent = torch.func.jvp(lambda a, b: net.train()(a, b, y, guidance=1.5), (x, c), (x, torch.ones(2)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(tangent.float()).all()


@pytest.mark.slow
def test_torch_compile_graph_matches_eager_training_steps():
    """train.compile=true: forced normalisation runs once per forward outside the graph (EDM2UNet.force_normalize);
    dynamo's eager backend checks the tracing without inductor's compile time."""
    torch.manual_seed(0)
    nets = [EDM2UNet((3, 8, 8), **TOY).train() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    for net in nets:
        with torch.no_grad():
            net.out_gain.fill_(1.0)
    compiled = torch.compile(nets[0], backend="eager")
    opts = [torch.optim.Adam(n.parameters(), lr=0.01, foreach=True) for n in nets]
    x, c = torch.randn(2, 3, 8, 8), torch.rand(2)
    for _ in range(3):
        losses = []
        for f, opt in zip((compiled, nets[1]), opts):
            loss = f(x, c).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == losses[1]
    compiled(x, c)  # the compiled forward normalises the weights the last step moved off the sphere
    w = nets[0].enc["8x8_conv"].weight
    assert torch.allclose(_rms(w), torch.ones(w.shape[0]), atol=2e-4)


def test_forced_normalisation_survives_a_move_then_a_load():
    """After a dtype move (new storage) and a load of unnormalised weights, a training forward normalises them."""
    torch.manual_seed(0)
    net = EDM2UNet((3, 8, 8), **TOY).train()
    x, c = torch.randn(2, 3, 8, 8), torch.rand(2)
    net(x, c)
    net = net.double()
    raw = {k: torch.randn_like(v) * 3 if k.endswith("weight") else v for k, v in net.state_dict().items()}
    net.load_state_dict(raw)
    net(x.double(), c.double())
    w = net.enc["8x8_conv"].weight
    assert torch.allclose(_rms(w), torch.ones(w.shape[0], dtype=w.dtype), atol=2e-4)
