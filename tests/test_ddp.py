"""torchrun + DDP on CPU (gloo): 2 ranks stay bit-identical and match 1 process at the same global batch.

One torchrun launch trains iCT, CT (EMA teacher), sCT (JVP inside the DDP forward), ACT and ACT-Aug
(two optimisers, penalty EMA and p_aug), CM-GAN, CD (analytic teacher), sCD and iLCT (minibatch OT
per rank) for a few steps each; every rank dumps its objective, EMA and extra state at the end.
The reference is one process accumulating 2 micro-batches (the same global batch, the same
per-micro-batch seeds), run in this process. Ranks must agree exactly; ranks vs 1 process only up
to the rounding of the gradient averaging (a sum over ranks vs. an accumulated sum).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from cmkit.checkpoint import latest_checkpoint
from cmkit.config import load_config
from cmkit.train import train

UNET = ["net.name=unet", "net.channels=8", "net.channel_mult=[1,2]", "net.num_blocks=1", "net.attn_resolutions=[]",
        "net.num_groups=4"]
TEACHER = "{teacher}"  # replaced by the run directory of the TrigFlow teacher that the fixture trains
METHODS = {
    "ict": ["configs/ict_toy.yaml", "net.dropout=0.1"],
    "ct": ["configs/ict_toy.yaml", "method.name=ct"],
    "sct": ["configs/sct_toy.yaml", "method.tangent_warmup=2"],
    "act": ["configs/act_toy.yaml", "method.gp_interval=2", "method.aug_interval=2"],
    # ACT-Aug on digit images: the penalty EMA is the mean over ranks (as over 1 process's micro-batches),
    # τ = 0.001 keeps p_aug rising, so augmentation (kornia, seeded per micro-batch) runs on every rank.
    "act_aug": ["configs/act_aug_mnist.yaml", "data.name=digits", *UNET, "method.aug_ops=[flip,translate]",
                "method.gp_interval=1", "method.aug_interval=1", "method.aug_target=0.001"],
    # CM-GAN (D phase first, D without t, LeakyReLU) on iCT; no blur on 2-D data.
    "cmgan": ["configs/ict_toy.yaml", "method.name=cmgan", "method.blur_sigma0=0", "method.gan_weight=0.1"],
    # CD with the exact denoiser of the Gaussian toy set (no teacher run needed).
    "cd": ["configs/cd_toy.yaml", "data.name=gaussian", "method.teacher=analytic", "method.init_from_teacher=false"],
    # sCD from a TrigFlow teacher trained for a few steps by the fixture (the student starts from it).
    "scd": ["configs/sct_toy.yaml", "method.name=scd", f"method.teacher={TEACHER}", "method.tangent_warmup=2"],
    # iLCT: minibatch OT pairs noise and data within each rank's batch; the 1-process reference with
    # train.accumulate=2 pairs within each micro-batch, so this pins per-rank pairing.
    "ilct": ["configs/ict_toy.yaml", "method.name=ilct"],
}
TINY = ["net.hidden=32", "net.depth=2", "train.batch_size=32", "data.n=512", "train.steps=4", "train.lr=1e-2", "train.optimizer=adam",
        "run.progress=false", "run.tensorboard=false", "run.sample_n=8", "run.sample_steps=[1]",
        "train.ema=[0.9]", "train.threads=1"]


def _teacher_args(root) -> list[str]:
    """A TrigFlow diffusion model with the sCD student's network (sct_toy's positional MLP at TINY size)."""
    return ["data.name=eight_gaussians", "net.name=mlp", "net.embedding=positional", "method.name=trigflow", *TINY,
            f"run.dir={root / 'teacher'}"]


WORKER = textwrap.dedent('''
    import json, sys
    import torch
    from safetensors.torch import save_file
    import cmkit.train as T
    from cmkit import distributed
    from cmkit.config import load_config

    original = T.Trainer.save

    def save(self, run_dir, final=False):  # every rank dumps what must agree across ranks
        if final:
            flat = {f"objective/{k}": v for k, v in self.objective.state_dict().items()}
            for i, m in enumerate(self.ema.modules):
                flat.update({f"ema/{i}/{k}": v for k, v in m.state_dict().items()})
            save_file({k: v.detach().clone().contiguous() for k, v in flat.items()},
                      f"{run_dir}/rank{self.info.rank}.safetensors")
            with open(f"{run_dir}/rank{self.info.rank}.json", "w") as f:
                json.dump({"extra": self.objective.extra_state(), "step": self.step, "nimg": self.nimg}, f)
        return original(self, run_dir, final=final)

    T.Trainer.save = save
    info = distributed.init("cpu")
    specs = json.loads(sys.argv[1])
    for run_dir, args, *stop_after in specs:  # optional third item: stop after that many steps
        T._train(load_config(args[0], args[1:] + [f"run.dir={run_dir}"]), info, False, (stop_after or [None])[0])
    distributed.cleanup(info)
''')


def _torchrun(tmp_path, specs, nproc=2):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torchrun's default 1 thread
    cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", str(worker), json.dumps(specs)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.fixture(scope="module")
def method_args(tmp_path_factory):
    """METHODS with the sCD teacher trained (4 steps, 1 process) and its directory filled in."""
    root = tmp_path_factory.mktemp("teacher")
    train(load_config(None, _teacher_args(root)))
    return {m: [a.replace(TEACHER, str(root / "teacher")) for a in args] for m, args in METHODS.items()}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, method_args):
    tmp = tmp_path_factory.mktemp("ddp")
    specs = [(str(tmp / m), args + TINY) for m, args in method_args.items()]
    _torchrun(tmp, specs)
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_two_ranks_identical_and_match_one_process(ddp_runs, method_args, tmp_path, method):
    run, args = ddp_runs / method, method_args[method]
    r0, r1 = load_file(run / "rank0.safetensors"), load_file(run / "rank1.safetensors")
    assert r0.keys() == r1.keys() and any(k.startswith("ema/") for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{method}: {k} differs between ranks"
    e0, e1 = (json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1))
    assert e0 == e1 and e0["step"] == 4

    # The training must have moved the weights, or "identical" would be trivially true.
    _, start, _ = latest_checkpoint(run / "checkpoints")
    one = load_config(args[0], args[1:] + TINY + ["train.accumulate=2", f"run.dir={tmp_path}"])
    train(one)
    _, state, _ = latest_checkpoint(tmp_path / "checkpoints")
    single = {f"objective/{k}": v for k, v in state["objective"].items()}
    single.update({f"ema/0/{k}": v for k, v in state["ema"]["0"].items()})
    init = load_config(args[0], args[1:] + TINY + ["train.steps=0", f"run.dir={tmp_path / 'i'}"])
    train(init)
    _, zero, _ = latest_checkpoint(tmp_path / "i" / "checkpoints")
    moved = 0.0
    for k, v in single.items():
        assert v.shape == r0[k].shape, k
        if v.is_floating_point():
            torch.testing.assert_close(r0[k], v, rtol=1e-4, atol=1e-5, msg=f"{method}: {k} 2 ranks vs 1 process")
        if k.startswith("objective/") and "model.net." in k and "teacher" not in k:  # ACT: ct.model.net
            moved = max(moved, (v - zero["objective"][k[len("objective/"):]]).abs().max().item())
    assert moved > 1e-2, f"{method}: the student did not train ({moved})"
    assert start["progress"]["step"] == 4
    # Objective state outside the tensors (ACT's p_aug and penalty EMA, CM-GAN's diversity) as 1 process
    assert e0["extra"].keys() == state["extra"].keys()
    for k, v in state["extra"].items():
        if isinstance(v, dict):  # e.g. a distillation run's record of its teacher run
            assert e0["extra"][k] == v, f"{method}: extra state {k} 2 ranks vs 1 process"
        else:
            assert e0["extra"][k] == pytest.approx(v, rel=1e-4, abs=1e-7), f"{method}: extra state {k} 2 ranks vs 1 process"
    if method.startswith("act"):
        assert e0["extra"]["gp_ema"] != pytest.approx(0.55)  # the penalty EMA moved (L̄_gp starts at τ)
    if method == "act_aug":
        assert e0["extra"]["p_aug"] == pytest.approx(0.2)  # 4 updates of +p_r with τ below every penalty


@pytest.mark.slow
def test_resume_with_a_different_number_of_ranks(tmp_path):
    # 2 ranks train 2 of 4 steps and stop; 1 process (2 micro-batches) resumes. The data order, noise and
    # dropout seeds depend only on (seed, position, micro-batch), so it must match an uninterrupted 1-process run.
    args = METHODS["ict"] + TINY + ["run.log_every=1"]
    _torchrun(tmp_path, [(str(tmp_path / "run"), args, 2)])
    assert latest_checkpoint(tmp_path / "run" / "checkpoints")[2]["step"] == 2
    train(load_config(args[0], args[1:] + ["train.accumulate=2", f"run.dir={tmp_path / 'run'}"]))
    train(load_config(args[0], args[1:] + ["train.accumulate=2", f"run.dir={tmp_path / 'ref'}"]))
    _, got, meta = latest_checkpoint(tmp_path / "run" / "checkpoints")
    _, want, _ = latest_checkpoint(tmp_path / "ref" / "checkpoints")
    assert meta["step"] == 4
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # steps 1-2 from the 2 ranks, 3-4 resumed (not restarted) by 1 process
    for part in ("objective", "ema"):
        flat_got, flat_want = _flat(got[part]), _flat(want[part])
        assert flat_got.keys() == flat_want.keys()
        for k, v in flat_want.items():
            if v.is_floating_point():
                torch.testing.assert_close(flat_got[k], v, rtol=1e-4, atol=1e-5, msg=f"{part}/{k}")


def _flat(tree, prefix=""):
    if torch.is_tensor(tree):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}/{k}"))
    return out
