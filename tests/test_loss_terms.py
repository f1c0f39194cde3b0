"""Contract over every method whose loss has more than one term: each extra term changes the student's
gradient by a non-trivial amount, i.e. it reaches the *student* parameters (issue 15).

For each method the full loss of the generator/model phase and its consistency term alone (weighted as it
enters the full loss) are computed on the same batch under the same RNG seed; the difference of their
θ-gradients is the extra term's gradient. It must be finite and at least 1% of the full gradient's norm.
On cmkit's code before issue 15, act_ict fed the discriminator the no-grad iCT target, so its difference
was exactly zero.
"""

import pytest
import torch

from cmkit.config import load_config
from cmkit.objectives import build_objective
from cmkit.schedules import Progress

MLP = ["net.name=mlp", "net.hidden=32", "net.depth=2"]
TINY_UNET = ["net.name=unet", "net.channels=8", "net.channel_mult=[1,2]", "net.num_blocks=1",
             "net.attn_resolutions=[]", "net.num_groups=4"]
DIGITS = (1, 8, 8)


def _objective(overrides, shape, seed=0):
    torch.manual_seed(seed)
    return build_objective(load_config(None, overrides), shape)


def _grad(obj, loss_fn, batch, progress, seed=1):
    obj.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss_fn(batch, progress)["loss"].mean().backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in obj.model.parameters()])


def _act_consistency(obj):
    """(1 - λ_N(n+1))·L_CT: ACT's L_f without its λ_N·L_G term (Alg. 1 line 8)."""
    def loss(batch, progress):
        out, _, t_next = obj.ct.loss_with_output(batch, progress)
        return {"loss": (1 - obj.adversarial_weight(t_next, int(out["N"]))) * out["loss"]}
    return loss


def _cmgan_consistency(obj):
    """L_CM alone (Eq. 7 without λ·L_GAN); gan_noise=uniform's extra student pass draws after it, so the
    RNG of the consistency part is the same in both calls."""
    return lambda batch, progress: obj.cm.loss_with_output(batch, progress)[0]


# (name, overrides, data shape, how to get the consistency term alone). The GAN weights are large enough that
# the extra term is several % of the gradient even next to iCT's 1/Δσ-weighted consistency gradient.
ACT_W = ["method.w=0.7", "method.w_mid=0.7"]
CASES = [
    ("act", [*MLP, "method.name=act", *ACT_W], (2,), _act_consistency),
    ("act_ict", [*MLP, "method.name=act_ict", *ACT_W], (2,), _act_consistency),
    ("act_saturating", [*MLP, "method.name=act_ict", "method.gan_loss=saturating", *ACT_W], (2,), _act_consistency),
    ("act_aug", ["data.name=digits", *TINY_UNET, "method.name=act", "method.augment=true", *ACT_W], DIGITS,
     _act_consistency),
    ("cmgan", ["data.name=digits", *MLP, "method.name=cmgan", "method.gan_weight=2"], DIGITS,
     _cmgan_consistency),
    ("cmgan_schedule", ["data.name=digits", *MLP, "method.name=cmgan", "method.gan_weight=2",
                        "method.gan_noise=schedule"], DIGITS, _cmgan_consistency),
    ("cmgan_ct", ["data.name=digits", *MLP, "method.name=cmgan_ct", "method.gan_weight=2"], DIGITS,
     _cmgan_consistency),
    ("cmgan_cd", ["data.name=gaussian", *MLP, "method.name=cmgan_cd", "method.teacher=analytic",
                  "method.blur_sigma0=0", "method.gan_weight=2"], (2,), _cmgan_consistency),
]


@pytest.mark.parametrize("name,overrides,shape,consistency", CASES, ids=[c[0] for c in CASES])
def test_adversarial_term_reaches_the_student(name, overrides, shape, consistency):
    obj = _objective(overrides, shape)
    batch, progress = {"x": 0.5 * torch.randn(32, *shape)}, Progress(640, 6400, 32)
    full = _grad(obj, obj.phases[[p.name for p in obj.phases].index("model")].loss, batch, progress)
    alone = _grad(obj, consistency(obj), batch, progress)
    extra = full - alone
    assert torch.isfinite(extra).all()
    assert extra.norm() > 0.01 * full.norm(), (name, extra.norm().item(), full.norm().item())


def _ilct(literal: str, weight: float):
    return _objective([*MLP, "method.name=ilct", "method.coupling=none", f"method.diffusion_weight={weight}",
                       "method.diffusion_r=1.0", f"method.diffusion_at={literal}"], (2,))


@pytest.mark.parametrize("literal", ["next", "current"])
def test_ilct_diffusion_term_reaches_the_student(literal):
    # iLCT Eq. 9's ‖f_θ(x_t, t) - x0‖² on top of the Cauchy consistency loss: the same weights with the
    # diffusion weight at 0 give the consistency term alone.
    full_obj, alone_obj = _ilct(literal, 1.0), _ilct(literal, 0.0)
    alone_obj.load_state_dict(full_obj.state_dict())
    batch, progress = {"x": 0.5 * torch.randn(32, 2)}, Progress(0, 6400, 32)
    full = _grad(full_obj, full_obj.loss, batch, progress)
    alone = _grad(alone_obj, alone_obj.loss, batch, progress)
    extra = full - alone
    assert torch.isfinite(extra).all() and extra.norm() > 0.01 * full.norm()
