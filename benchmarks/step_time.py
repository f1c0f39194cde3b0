"""Training-step time against the compute floor of its network passes, per method (issue 9).

For each method: the median time of ``Trainer.train_step`` and of the network passes that step
contains, each measured in isolation in the same process on the same batch (student
forward+backward, no-grad teacher forward, JVP, discriminator passes). ratio = step / passes:
1.00 means the loop adds nothing around the networks. Also 1-step sampling throughput against
a bare backbone forward on the same batch. Run:

    python benchmarks/step_time.py --config configs/ict_mnist.yaml --batch 32
    python benchmarks/step_time.py --device cuda --precision bf16      # on a GPU
    python benchmarks/step_time.py --config configs/cd_toy.yaml --methods cd method.teacher=analytic \
        method.init_from_teacher=false                                 # CD / sCD need method.teacher
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import time

import torch
import yaml

from cmkit import distributed
from cmkit.config import _merge, from_dict, parse_overrides
from cmkit.objectives import METHODS
from cmkit.train import Trainer
from cmkit.schedules import Progress

# Network passes of one training step per method (what the objective's loss runs; see objectives/).
# "teacher_fwd" is a no-grad pass of the student's network (EMA teacher, target, fakes for D);
# "distill_teacher_fwd" one of the distillation teacher (CD's EDM denoiser, sCD's TrigFlow model).
RECIPES = {
    "ct": ["student_fwd_bwd", "teacher_fwd"],
    "ict": ["student_fwd_bwd", "teacher_fwd"],
    "ilct": ["student_fwd_bwd", "teacher_fwd"],
    "edm": ["student_fwd_bwd"],
    "trigflow": ["student_fwd_bwd"],
    "sct": ["jvp", "student_fwd_bwd"],
    "ct_trigflow": ["teacher_fwd", "teacher_fwd", "student_fwd_bwd"],  # discrete: F⁻(x_t), f⁻(x_s), F_θ
    # ACT: model phase = CT + D(fake) fwd+bwd to the input; disc phase = no-grad student + D fwd+bwd on real and fake.
    "act": ["student_fwd_bwd", "teacher_fwd", "disc_fwd_bwd", "teacher_fwd", "disc_fwd_bwd", "disc_fwd_bwd"],
    "act_ict": ["student_fwd_bwd", "teacher_fwd", "disc_fwd_bwd", "teacher_fwd", "disc_fwd_bwd", "disc_fwd_bwd"],
    # CD: the teacher's ODE step (Heun: 2 teacher calls, Euler: 1, see recipe), then the target f_θ⁻.
    "cd": ["student_fwd_bwd", "teacher_fwd"],
    # sCD: the teacher's velocity (2 calls with classifier-free guidance, see recipe), JVP, student.
    "scd": ["jvp", "student_fwd_bwd"],
    # CM-GAN: L_CM's passes + D(fake) fwd+bwd to the input; method.disc_steps discriminator passes (see recipe).
    "cmgan": ["student_fwd_bwd", "teacher_fwd", "disc_fwd_bwd"],
    "cmgan_ct": ["student_fwd_bwd", "teacher_fwd", "disc_fwd_bwd"],
    "cmgan_cd": ["student_fwd_bwd", "teacher_fwd", "disc_fwd_bwd"],
}
TEACHER_CALLS = {"heun": 2, "euler": 1}  # teacher evaluations per ODE step (cmkit.sampling.heun_step/euler_step)
DISC_PASS = ["teacher_fwd", "disc_fwd_bwd", "disc_fwd_bwd"]  # one D step: fakes f_θ (no grad), D on real and fake


def recipe(name: str, method) -> list[str]:
    """The network passes of one training step of method ``name`` with these method options."""
    passes = list(RECIPES[name])
    if name == "cd" or (name.startswith("cmgan") and method.consistency == "cd"):
        passes += ["distill_teacher_fwd"] * TEACHER_CALLS[method.solver]
    if name == "scd":
        passes += ["distill_teacher_fwd"] * (2 if method.guided else 1)
    if name.startswith("cmgan"):
        passes += DISC_PASS * method.disc_steps
    return passes


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median_time(fn, device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def distill_teacher(obj):
    """The frozen distillation teacher of CD, sCD or CM-GAN's CD loss (their ``teacher``)."""
    return getattr(obj, "cm", obj).teacher


def passes(trainer: Trainer, batch: int):
    """Closures for each isolated network pass, on a batch of this trainer's data."""
    obj, dev = trainer.objective, trainer.device
    x = trainer.dataset.x[:batch].to(dev)
    labels = trainer.dataset.labels[:batch].to(dev) if trainer.cfg.net.class_cond else None
    t = torch.full((batch,), 1.0, device=dev)
    model = obj.model
    ac = trainer.autocast

    def student_fwd_bwd():
        with ac():
            out = model(x, t, labels)
        out.float().square().mean().backward()

    def teacher_fwd():
        with torch.no_grad(), ac():
            model(x, t, labels)

    def distill_teacher_fwd():
        with torch.no_grad(), ac():
            distill_teacher(obj)(x, t, labels)

    def jvp():
        c = model.process.c_noise(t)
        with torch.no_grad():
            torch.func.jvp(lambda a, b: model.net(a, b, labels), (x, c), (torch.ones_like(x), torch.ones_like(c)))

    def disc_fwd_bwd():
        d = obj.discriminator
        xr = x.detach().requires_grad_(True)
        with ac():
            out = d(xr, model.process.c_noise(t), labels)
        out.float().mean().backward()

    return {"student_fwd_bwd": student_fwd_bwd, "teacher_fwd": teacher_fwd, "distill_teacher_fwd": distill_teacher_fwd,
            "jvp": jvp, "disc_fwd_bwd": disc_fwd_bwd}


def config_for(path: str, name: str, overrides: list[str]):
    """The config at path with method.name=name; method keys this method lacks are dropped, from the file
    and from the overrides (so one command can time methods with different options), unless no method
    knows them (a typo still fails)."""
    raw = yaml.safe_load(open(path))
    fields = {f.name for f in dataclasses.fields(METHODS[name].config)}
    known = {f.name for spec in METHODS.values() for f in dataclasses.fields(spec.config)}
    raw["method"] = {k: v for k, v in (raw.get("method") or {}).items() if k in fields and k != "name"}
    raw["method"]["name"] = name
    extra = parse_overrides(overrides)
    if "method" in extra:
        extra["method"] = {k: v for k, v in extra["method"].items() if k in fields or k not in known}
    return from_dict(_merge(raw, extra))


def bench_method(name: str, args) -> dict:
    cfg = config_for(args.config, name, [f"train.batch_size={args.batch}", f"train.device={args.device}",
                                          f"train.precision={args.precision}", "run.progress=false",
                                          "run.tensorboard=false", *args.overrides])
    device = torch.device(args.device)
    trainer = Trainer(cfg, distributed.DistInfo(), device)
    streams = trainer.streams()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fns = passes(trainer, args.batch)
    steps = recipe(name, cfg.method)
    # Interleaved: each round times one step and then each of its passes once, so that drifts of
    # the machine's speed hit both sides of the ratio alike; the ratio is the median of per-round ratios.
    for _ in range(args.warmup):
        trainer.train_step(streams)
        for p in set(steps):
            fns[p]()
    step_t, pass_t, ratios = [], {p: [] for p in set(steps)}, []
    for _ in range(args.repeats):
        step_t.append(timed(lambda: trainer.train_step(streams), device))
        for p in pass_t:
            pass_t[p].append(timed(fns[p], device))
        ratios.append(step_t[-1] / sum(pass_t[p][-1] for p in steps))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step = statistics.median(step_t)
    each = {p: statistics.median(v) for p, v in pass_t.items()}
    network = sum(each[p] for p in steps)
    # 1-step sampling against a bare backbone forward on the same batch.
    ema = trainer.ema.modules[0]
    noise = torch.randn(args.batch, *trainer.dataset.shape, device=device)
    labels = trainer.dataset.labels[:args.batch].to(device) if cfg.net.class_cond else None
    times = trainer.objective.sample_times(1)
    sample = median_time(lambda: trainer.objective.sampler(ema, noise, times, class_labels=labels), device,
                         args.repeats, args.warmup)
    tt = torch.full((args.batch,), float(times[0]), device=device)
    c = ema.process.c_noise(tt) if hasattr(ema.process, "c_noise") else tt
    with torch.no_grad():
        bare = median_time(lambda: ema.net(noise, c, labels), device, args.repeats, args.warmup)
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [min(ratios), 0, max(ratios)]
    return {"method": name, "step_ms": 1e3 * step, "network_ms": 1e3 * network, "ratio": statistics.median(ratios),
            "ratio_iqr": [q[0], q[-1]],
            "passes_ms": {p: round(1e3 * v, 2) for p, v in each.items()}, "peak_mb": peak,
            "sample_1step_ms": 1e3 * sample, "bare_forward_ms": 1e3 * bare, "sampling_efficiency": bare / sample}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/ict_mnist.yaml")
    ap.add_argument("--methods", nargs="+", default=["ct", "ict", "sct"], help=f"any of {', '.join(RECIPES)}")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. net.channels=16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    print(f"{'method':12s} {'step ms':>9s} {'net ms':>9s} {'ratio':>6s} {'ratio IQR':>12s} {'peak MB':>8s} {'1-step ms':>9s} "
          f"{'bare ms':>8s} {'samp eff':>8s}  passes")
    for name in args.methods:
        r = bench_method(name, args)
        rows.append(r)
        print(f"{name:12s} {r['step_ms']:9.1f} {r['network_ms']:9.1f} {r['ratio']:6.3f} {r['ratio_iqr'][0]:5.3f}-{r['ratio_iqr'][1]:5.3f} {r['peak_mb']:8.0f} "
              f"{r['sample_1step_ms']:9.2f} {r['bare_forward_ms']:8.2f} {r['sampling_efficiency']:8.3f}  {r['passes_ms']}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
