"""Check cmkit's NCSN++ against the authors' code (yang-song/score_sde_pytorch, commit cb1f359) on CPU.

    git clone https://github.com/yang-song/score_sde_pytorch /tmp/score_sde
    PYTHONPATH=. python scripts/ncsnpp_reference.py /tmp/score_sde

Prints (1) the parameter counts of their NCSNpp for configs/ve/cifar10_ncsnpp_continuous.py (4 blocks) and
cifar10_ncsnpp_deep_continuous.py (8 blocks), beside cmkit's, and (2) the golden outputs of
tests/test_ncsnpp.py: a tiny cmkit NCSNpp filled by `deterministic_fill`, its weights copied into theirs, their
output on a fixed input. Their CUDA `op` package and `sde_lib` are replaced by shims (their own pure-PyTorch
`upfirdn2d_native`, which their code uses on CPU); ml_collections configs by namespaces.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import torch

from cmkit.nets.ncsnpp import AttnBlock, BigGANBlock, FIRDownConv, NCSNpp


def deterministic_fill(net: torch.nn.Module) -> None:
    """Every parameter, in name order, set to 0.2·sin(0.37·j + i) (the same fill as tests/test_ncsnpp.py)."""
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(net.named_parameters())):
            p.copy_(0.2 * torch.sin(0.37 * torch.arange(p.numel(), dtype=torch.float64) + i).reshape(p.shape))


def import_reference(root: Path):
    """Import their models.ncsnpp with the CUDA op and sde_lib shimmed."""
    src = (root / "op" / "upfirdn2d.py").read_text()
    native = src[src.index("def upfirdn2d_native"):]
    op = types.ModuleType("op")
    exec("import torch\nimport torch.nn.functional as F\n" + native, op.__dict__)

    def upfirdn2d(x, kernel, up=1, down=1, pad=(0, 0)):  # their CPU branch, kernel cast to x's dtype
        return op.upfirdn2d_native(x, kernel.to(x.dtype), up, up, down, down, pad[0], pad[1], pad[0], pad[1])

    op.upfirdn2d = upfirdn2d
    sys.modules["op"], sys.modules["sde_lib"] = op, types.ModuleType("sde_lib")
    sys.path.insert(0, str(root))
    from models import ncsnpp  # noqa: E402

    return ncsnpp


def reference_config(root: Path, name: str, **over):
    """Their config file's model.* assignments (plus default_cifar10_configs' dropout/embedding) as a namespace."""
    model = dict(dropout=0.1, embedding_type="fourier", sigma_min=0.01, sigma_max=50, num_scales=1000)
    for key, value in re.findall(r"^\s*model\.(\w+) = (.+)$", (root / "configs" / "ve" / name).read_text(), re.M):
        model[key] = eval(value)  # literals only (numbers, strings, tuples, lists)
    model.update(over)
    ns = types.SimpleNamespace
    return ns(model=ns(**model), data=ns(image_size=32, num_channels=3, centered=True), training=ns(continuous=True))


def copy_into_reference(mine: NCSNpp, ref, progressive: str) -> None:
    """Copy cmkit's weights into their NCSNpp, layer by layer in their all_modules order."""
    nf = mine.conv_in.out_channels
    refm = list(ref.all_modules)

    def put(r, m):
        assert r.weight.shape == m.weight.shape, (r, m)
        r.weight.copy_(m.weight)
        r.bias.copy_(m.bias)

    refm[0].W.copy_(mine.embed.features.freqs)
    w = mine.embed.mlp[0].weight  # cmkit's features are [cos, sin], theirs [sin, cos]
    refm[1].weight.copy_(torch.cat([w[:, nf:], w[:, :nf]], 1))
    refm[1].bias.copy_(mine.embed.mlp[0].bias)
    put(refm[2], mine.embed.mlp[2])
    put(refm[3], mine.conv_in)
    units, pyr, heads = [], iter(mine.pyramid_down), iter(mine.heads)
    for layer in mine.enc:
        units.append(layer)
        if isinstance(layer, BigGANBlock) and layer.resample == "down":
            units.append(next(pyr))
    units += list(mine.mid)
    for layer in mine.dec:
        if isinstance(layer, BigGANBlock) and layer.resample == "up" and progressive == "output_skip":
            units += list(next(heads))[::2]
        units.append(layer)
    units += list(next(heads) if progressive == "output_skip" else mine.head_out)[::2]
    assert len(units) == len(refm) - 4
    for u, r in zip(units, refm[4:]):
        if isinstance(u, BigGANBlock):
            for a, b in [("norm1", "GroupNorm_0"), ("conv1", "Conv_0"), ("emb", "Dense_0"), ("norm2", "GroupNorm_1"),
                         ("conv2", "Conv_1")] + ([("skip", "Conv_2")] if u.skip is not None else []):
                put(getattr(r, b), getattr(u, a))
        elif isinstance(u, AttnBlock):
            put(r.GroupNorm_0, u.norm)
            C = u.qkv.in_channels
            for j in range(3):  # three NINs (x @ W + b) = one fused 1x1 conv
                getattr(r, f"NIN_{j}").W.copy_(u.qkv.weight[j * C:(j + 1) * C, :, 0, 0].t())
                getattr(r, f"NIN_{j}").b.copy_(u.qkv.bias[j * C:(j + 1) * C])
            r.NIN_3.W.copy_(u.proj.weight[:, :, 0, 0].t())
            r.NIN_3.b.copy_(u.proj.bias)
        elif isinstance(u, FIRDownConv):
            put(r.Conv2d_0, u.conv)
        else:
            assert isinstance(u, type(r)), (u, r)
            put(r, u)


def main(root: Path) -> None:
    ref_ncsnpp = import_reference(root)
    for name in ("cifar10_ncsnpp_continuous.py", "cifar10_ncsnpp_deep_continuous.py"):
        cfg = reference_config(root, name)
        ref = ref_ncsnpp.NCSNpp(cfg)
        trainable = sum(p.numel() for p in ref.parameters() if p.requires_grad)
        with torch.device("meta"):
            mine = NCSNpp((3, 32, 32), num_blocks=cfg.model.num_res_blocks)
        print(f"{name}: Score SDE {sum(p.numel() for p in ref.parameters()):,} parameters, {trainable:,} trainable "
              f"(their Fourier W is a frozen Parameter); cmkit {sum(p.numel() for p in mine.parameters()):,}")

    i = torch.arange(2 * 3 * 16 * 16, dtype=torch.float64)
    x, sigma = torch.sin(0.1 * i).reshape(2, 3, 16, 16), torch.tensor([0.5, 20.0], dtype=torch.float64)
    for progressive in ("none", "output_skip"):
        cfg = reference_config(root, "cifar10_ncsnpp_continuous.py", nf=16, num_res_blocks=1, ch_mult=(1, 2, 2),
                               attn_resolutions=(8,), dropout=0.0, scale_by_sigma=False, progressive=progressive)
        cfg.data.image_size = 16
        ref = ref_ncsnpp.NCSNpp(cfg).double().eval()
        mine = NCSNpp((3, 16, 16), channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,),
                      dropout=0.0, progressive=progressive).double().eval()
        deterministic_fill(mine)
        with torch.no_grad():
            copy_into_reference(mine, ref, progressive)
            a, b = ref(x, sigma), mine(x, sigma.log())  # their Fourier layer takes σ and applies log itself
        print(f"{progressive}: max |theirs - cmkit| = {(a - b).abs().max().item():.2e}")
        print(f'    "{progressive}": ({a.sum().item()!r}, {a.abs().sum().item()!r}, {a[0, :, 0, 0].tolist()!r}, '
              f"{a[1, :, 5, 7].tolist()!r}),")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
