"""The one training loop for every method (DESIGN.md: how data flows through one training step).

Each step runs the objective's phases in order; a phase draws ``repeats`` fresh batches, each
followed by backward and that phase's optimiser step. Progress is counted in images seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cmkit import distributed
from cmkit.checkpoint import CheckpointError, keep_milestone, latest_checkpoint, save_checkpoint
from cmkit.config import Config, ConfigError
from cmkit.data import load_dataset, batches
from cmkit.data.prepared import BatchLoader, check_batch_fits, is_on_disk, loader_workers
from cmkit.latent import autoencoder_identity, check_autoencoder
from cmkit.ema import EMA, save_snapshot
from cmkit.images import save_samples
from cmkit.nets.attention import attention_backend
from cmkit.objectives import build_objective
from cmkit.rundir import prepare_run_dir, stored_config, write_config
from cmkit.runlog import RunLog
from cmkit.sampling import cycled_labels, guided_model, sample_batched
from cmkit.objectives.consistency import resolve_sigma_data
from cmkit.optim import lr_multiplier, make_optimizer, phase_settings
from cmkit.schedules import Progress

def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA GPU is visible. Use train.device=cpu or auto.")
    return torch.device(name)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SPIKE_WINDOW, SPIKE_MIN = 100, 20  # running median over the last 100 good losses, judged after 20
STABILISERS = (
    "a lower train.lr (e.g. half), train.grad_clip=1.0, train.precision=fp32, train.optimizer=adam if the loss is "
    "large from the first steps (RAdam's first 5 steps are plain SGD steps that scale with the loss), and for sCM "
    "method.tangent_norm=normalize (tangent normalisation) with a longer method.tangent_warmup"
)


TOY_SETS = ("eight_gaussians", "two_moons", "swiss_roll", "checkerboard", "gaussian")  # data.n sets their size
MODEL_PHASE = "model"  # the phase that steps the consistency model (objectives name it so; see objectives/*.py)


def main_phase(phases) -> str:
    """Name of the phase whose loss is the run's ``loss`` and is watched for spikes: the model/generator phase.

    CM-GAN runs its discriminator phase first, so "the first phase" would watch the discriminator.
    """
    names = [p.name for p in phases]
    return MODEL_PHASE if MODEL_PHASE in names else names[0]


class DivergenceError(RuntimeError):
    """Training diverged (non-finite or spiking loss); the message names the step, checkpoint and remedies."""


def micro_seed(seed: int, draw: int, micro: int) -> int:
    """RNG seed of one micro-batch from (train.seed, global batch index, micro-batch index).

    Seeding from progress (EDM2-style, STYLE 8) makes noise, dropout and sampled times a function
    of the global position only: K ranks and one process accumulating K micro-batches draw the
    same numbers, and a resume with any number of ranks continues the same random stream.
    """
    return int(np.random.SeedSequence([seed, draw, micro]).generate_state(1, np.uint64)[0] >> 1)


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 in hardware: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX
    (torch.cpu's own checks). Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def resolve_precision(cfg: Config, device: torch.device) -> Config:
    """train.precision=auto: bf16 autocast where the device computes bf16 natively (native_bf16), else fp32;
    config.yaml records the choice. On this project's 2-core AVX512-BF16 host bf16 made the demo's step 1.33x
    faster (0.159 against 0.212 s) and its 400 s budget's samples better (docs/results.md, "bf16 on CPU")."""
    if cfg.train.precision != "auto":
        return cfg
    chosen = "bf16" if native_bf16(device) else "fp32"
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=chosen))


class Trainer:
    """Everything stateful in a run, with one state_dict for checkpoints (STYLE 8)."""

    def __init__(self, cfg: Config, info: distributed.DistInfo, device: torch.device):
        cfg = resolve_precision(cfg, device)  # train.precision=auto, recorded as chosen
        self.cfg, self.info, self.device = cfg, info, device
        tc = cfg.train
        if tc.precision not in PRECISIONS:
            raise ConfigError(f"train.precision='{tc.precision}' is not valid. Choose one of: "
                              f"{', '.join(PRECISIONS)}, auto")
        if tc.precision == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision=fp16 (loss scaling) needs a CUDA device; on CPU use bf16 or fp32")
        if tc.accumulate < 1 or tc.batch_size % (info.world_size * tc.accumulate):
            raise ConfigError(
                f"train.batch_size={tc.batch_size} must be divisible by the {info.world_size} rank(s) times "
                f"train.accumulate={tc.accumulate} (the number of micro-batches per rank)")
        self.dataset = load_dataset(cfg.data, device=device)
        if is_on_disk(self.dataset):  # prepared data: fail before the run directory is touched
            check_batch_fits(self.dataset, tc.batch_size)
            loader_workers(cfg.data)
        if tc.batch_size > len(self.dataset):  # an epoch-free index stream cannot fill a batch larger than the data
            raise ConfigError(
                f"train.batch_size={tc.batch_size} is larger than the dataset ({len(self.dataset)} samples of "
                f"data.name={cfg.data.name}); set train.batch_size <= {len(self.dataset)}"
                + (" or draw more toy points with data.n" if cfg.data.name in TOY_SETS else ""))
        if cfg.net.class_cond and self.dataset.num_classes == 0:
            raise ConfigError("net.class_cond=true needs labelled data: set data.labels=true (digits, mnist, array with y)")
        num_classes = self.dataset.num_classes if cfg.net.class_cond else 0
        # method.sigma_data=auto: the data's measured std, recorded in the run's config.yaml (self.cfg)
        self.cfg = cfg = resolve_sigma_data(cfg, self.dataset.x)
        try:
            self.objective = build_objective(cfg, self.dataset.shape, num_classes).to(device)
        except (ConfigError, CheckpointError):
            raise
        except ValueError as e:  # networks and objectives reject impossible combinations with ValueError
            raise ConfigError(f"cannot build method.name={cfg.method.name} with net.name={cfg.net.name}: {e}") from None
        if device.type == "cuda":  # TF32 off by default (EDM/EDM2); sCM's tangent pass keeps it off (method.jvp_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tc.tf32
        if tc.channels_last and len(self.dataset.shape) == 3:  # NHWC convolutions (tensor cores); batches follow
            self.objective.to(memory_format=torch.channels_last)
        if tc.compile:  # in place: state_dict keys stay the same (MACHINE-NOTES: no CPU gain, JVP not compilable)
            if hasattr(self.objective, "compile_student"):  # sCM: the student pass only, the JVP stays eager
                self.objective.compile_student()
            else:
                self.objective.model.net.compile()
        distributed.broadcast_module(self.objective, info)  # one starting point for every rank
        try:
            self.ema = EMA.from_config(self.objective.model, tc)  # fixed rates (warm-up), power-function profiles
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.phases = self.objective.phases
        self.main_phase = main_phase(self.phases)
        try:
            self.settings = {p.name: phase_settings(tc, p.optim) for p in self.phases}
        except ValueError as e:
            raise ConfigError(f"method.name={cfg.method.name}: {e}") from None
        self.optimizers = {p.name: make_optimizer(p.module.parameters(), self.settings[p.name]) for p in self.phases}
        self.runners = {p.name: distributed.wrap_phase(p.module, p.loss, info, device) for p in self.phases}
        self.scalers = {p.name: torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16") for p in self.phases}
        self.nimg = self.step = self.data_pos = 0
        self.skipped = self.bad_streak = 0  # divergence guard: total skipped steps, current streak
        self.loss_window: list[float] = []
        self.last_checkpoint: Path | None = None

    # -- checkpoint state ----------------------------------------------------
    def state_dict(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "objective": self.objective.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "scalers": {k: s.state_dict() for k, s in self.scalers.items() if s.is_enabled()},
            "rng": rng,
            "progress": {"nimg": self.nimg, "step": self.step, "data_pos": self.data_pos, "skipped": self.skipped,
                         "bad_streak": self.bad_streak, "loss_window": list(self.loss_window)},
            "extra": self.objective.extra_state(),
            "world_size": self.info.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            self.objective.load_state_dict(state["objective"])
            self.ema.load_state_dict(state["ema"])
            for k, o in self.optimizers.items():
                o.load_state_dict(state["optimizers"][k])
            for k, s in state.get("scalers", {}).items():
                if self.scalers[k].is_enabled():
                    self.scalers[k].load_state_dict(s)
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"the checkpoint does not fit this config's networks or method: {e}") from None
        try:
            self.objective.load_extra_state(state.get("extra", {}))
            p = state["progress"]
            self.nimg, self.step, self.data_pos = int(p["nimg"]), int(p["step"]), int(p["data_pos"])
            self.skipped, self.bad_streak = int(p.get("skipped", 0)), int(p.get("bad_streak", 0))
            self.loss_window = [float(v) for v in p.get("loss_window", [])]
            if state.get("world_size", 1) == self.info.world_size:
                torch.set_rng_state(state["rng"]["cpu"])
                if "cuda" in state["rng"] and self.device.type == "cuda":
                    torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise CheckpointError(f"the checkpoint's progress, RNG or method state is missing or malformed "
                                  f"({type(e).__name__}: {e})") from None

    def save(self, run_dir: Path, *, final: bool = False) -> Path | None:
        """Checkpoint on rank 0. A failed write (disk full) keeps the previous checkpoint: a periodic
        save warns and training goes on; the final save raises CheckpointError."""
        if not self.info.is_main:
            return None
        meta = {"config": self.cfg.to_dict(), "nimg": self.nimg, "step": self.step, "version": _version()}
        if (ae := autoencoder_identity(self.dataset)) is not None:
            meta["autoencoder"] = ae  # a resumed or loaded latent run must decode with the same autoencoder
        try:
            path = save_checkpoint(run_dir / "checkpoints", self.nimg, self.state_dict(), meta,
                                   self.cfg.run.keep_checkpoints)
            every = self.cfg.run.milestone_every
            if every and self.step % every == 0:
                keep_milestone(path)
        except OSError as e:
            previous = self.last_checkpoint or "none (no checkpoint was written yet)"
            msg = (f"could not write the checkpoint of step {self.step} to {run_dir / 'checkpoints'} "
                   f"({e.strerror or e}); the previous checkpoint {previous} is intact")
            if final:
                raise CheckpointError(msg + ". Free disk space and re-run the same command to resume from it.") from None
            print(f"cmkit: warning: {msg}; training continues and the next checkpoint retries.", file=sys.stderr)
            return None
        self.last_checkpoint = path
        return path

    # -- one step ------------------------------------------------------------
    def streams(self):
        """One index stream per micro-batch of this rank: global micro-batch m = rank·A + a of ranks·A.

        Data on disk (data.name=prepared) get one BatchLoader per rank instead: the rank's slice of each
        global batch (the union of its A micro-batch slices, the same indices) read in one gather,
        prefetched, and split into the A micro-batches on the device by next_batches.
        """
        tc, info = self.cfg.train, self.info
        if is_on_disk(self.dataset):
            start, n = self.data_pos, len(self.dataset)
            return BatchLoader(self.dataset, lambda: batches(n, tc.batch_size, tc.seed, start=start, rank=info.rank,
                                                             world_size=info.world_size),
                               workers=loader_workers(self.cfg.data), device=self.device)
        parts = info.world_size * tc.accumulate
        return [batches(len(self.dataset), tc.batch_size, tc.seed, start=self.data_pos,
                        rank=info.rank * tc.accumulate + a, world_size=parts) for a in range(tc.accumulate)]

    def next_batches(self, streams) -> list[tuple[dict, int]]:
        """This rank's micro-batches of the next global batch, each with its RNG seed."""
        draw = self.data_pos // self.cfg.train.batch_size
        out = []
        if isinstance(streams, BatchLoader):  # prepared data: this rank's batch, already on the device
            x, labels = next(streams)
            micro = self.cfg.train.accumulate
            for a, xa in enumerate(x.chunk(micro)):
                batch = {"x": xa}
                if labels is not None and self.cfg.net.class_cond:
                    batch["labels"] = labels.chunk(micro)[a]
                out.append((batch, micro_seed(self.cfg.train.seed, draw, self.info.rank * micro + a)))
            self.data_pos += self.cfg.train.batch_size
            return out
        for a, stream in enumerate(streams):
            idx = next(stream)
            x = self.dataset.x[idx].to(self.device, non_blocking=True)
            if self.cfg.train.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            batch = {"x": x}
            if self.dataset.labels is not None and self.cfg.net.class_cond:
                batch["labels"] = self.dataset.labels[idx].to(self.device, non_blocking=True)
            out.append((batch, micro_seed(self.cfg.train.seed, draw, self.info.rank * len(streams) + a)))
        self.data_pos += self.cfg.train.batch_size
        return out

    def autocast(self):
        dtype = PRECISIONS[self.cfg.train.precision]
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def run_phase_once(self, phase, streams, progress) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Forward/backward over this rank's micro-batches (gradients all-reduced once, by DDP)."""
        run, scaler = self.runners[phase.name], self.scalers[phase.name]
        micro = self.next_batches(streams)
        total, out = torch.zeros((), device=self.device), {}
        for a, (batch, seed) in enumerate(micro):
            torch.manual_seed(seed)
            last = a == len(micro) - 1
            sync = run.no_sync() if (not last and hasattr(run, "no_sync")) else contextlib.nullcontext()
            with sync:
                with self.autocast(), attention_backend(self.cfg.net.attention):
                    out = run(batch, progress)
                loss = out["loss"].float().mean()
                scaler.scale(loss / len(micro)).backward()
            total = total + loss.detach()
        return total / len(micro), out

    def train_step(self, streams) -> dict:
        """Run every phase once; a non-finite loss or gradient skips the whole step (the guard).

        The skip, the spike test and the logged ``loss`` use the loss averaged over ranks, so every
        rank takes the same decision (a rank raising alone would leave the others hanging in DDP).
        """
        tc = self.cfg.train
        progress = Progress(self.nimg, tc.steps * tc.batch_size, tc.batch_size)
        lr_scale = lr_multiplier(self.nimg, tc)
        logs: dict = {}
        step_ok = True
        for phase in self.phases:
            if not step_ok:
                break  # a skipped phase skips the rest of the step (e.g. no discriminator step after a bad generator)
            opt, scaler = self.optimizers[phase.name], self.scalers[phase.name]
            prefix = "" if phase.name == self.main_phase else f"{phase.name}/"
            lr = self.settings[phase.name].lr * lr_scale  # each phase's own base lr (cmkit.optim), one schedule
            for group in opt.param_groups:
                group["lr"] = lr
            logs[prefix + "lr"] = lr
            for _ in range(phase.repeats):
                opt.zero_grad(set_to_none=True)
                loss, out = self.run_phase_once(phase, streams, progress)
                params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
                if scaler.is_enabled():
                    scaler.unscale_(opt)
                if tc.grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                else:
                    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params]))) \
                        if params else torch.zeros((), device=self.device)
                # One collective, one host sync: the mean over ranks is non-finite iff some rank's loss is;
                # gradients are all-reduced by DDP, so the norm is the same on every rank already.
                loss = distributed.mean_across_ranks(loss)
                loss_v, norm_v = torch.stack([loss, norm.float()]).tolist()
                bad = not math.isfinite(loss_v)
                overflow = not math.isfinite(norm_v)
                if phase.name == self.main_phase and not bad:
                    self.check_spike(loss_v)
                logs[prefix + "grad_norm"] = norm_v
                if bad or (overflow and not scaler.is_enabled()):
                    step_ok = False  # skip: no optimiser step, no after_phase, no later phase, no EMA update
                    opt.zero_grad(set_to_none=True)
                    if scaler.is_enabled():
                        scaler.update()
                    break
                scaler.step(opt)  # fp16: GradScaler itself skips overflowing steps and lowers the scale
                scaler.update()
            if step_ok:
                self.objective.after_phase(phase.name, progress)
            for k, v in out.items():
                logs[prefix + k] = loss.detach() if k == "loss" else (v.detach() if torch.is_tensor(v) else v)
        # Extra state (ACT's p_aug and penalty EMA, CM-GAN's diversity) needs no per-step broadcast: it is computed
        # from rank-averaged values or identical parameters, so every rank holds the same numbers (tests/test_ddp.py).
        if step_ok:
            self.ema.update(self.objective.model, self.nimg, tc.batch_size)  # β from progress (cmkit.ema)
            self.bad_streak = 0
        else:
            self.skipped += 1
            self.bad_streak += 1
        self.nimg += tc.batch_size
        self.step += 1
        logs["skipped_steps"] = self.skipped
        if tc.max_bad_steps and self.bad_streak >= tc.max_bad_steps:
            raise self.divergence(f"{self.bad_streak} consecutive steps had a non-finite loss or gradient "
                                  f"(each was skipped; {self.skipped} skipped in total)")
        return logs

    def check_spike(self, loss: float) -> None:
        """Stop before stepping on a loss above train.spike_factor × |running median| of recent good losses."""
        factor = self.cfg.train.spike_factor
        if factor > 0 and len(self.loss_window) >= SPIKE_MIN:
            median = statistics.median(self.loss_window)
            if median != 0 and loss > factor * abs(median):
                raise self.divergence(f"the loss {loss:.4g} exceeds train.spike_factor={factor:g} times its "
                                      f"running median {median:.4g} (the model was not updated with it)")
        self.loss_window = (self.loss_window + [loss])[-SPIKE_WINDOW:]

    def divergence(self, why: str) -> DivergenceError:
        ckpt = self.last_checkpoint or "none (no checkpoint was written; lower run.checkpoint_every)"
        return DivergenceError(
            f"training diverged at step {self.step} (nimg {self.nimg}): {why}. The last good checkpoint is {ckpt}; "
            f"training resumes from it when re-run. Stabilisers worth trying: {STABILISERS}.")

    # -- samples -------------------------------------------------------------
    def samples(self, steps: int, n: int, seed: int) -> torch.Tensor:
        model = guided_model(self.ema.modules[self.cfg.train.ema_sample], self.cfg, self.objective.sample_guidance,
                             self.dataset.num_classes)
        labels = None
        if self.cfg.net.class_cond:
            labels = cycled_labels(n, self.dataset.num_classes)
        x = sample_batched(
            model, n, self.dataset.shape, self.objective.sample_times(steps), sampler=self.objective.sampler,
            seed=seed, device=self.device, class_labels=labels,
        )
        return self.dataset.to_data_space(x)

    def write_samples(self, run_dir: Path, final: bool) -> None:
        rc = self.cfg.run
        for k in rc.sample_steps:
            x = self.samples(k, rc.sample_n, seed=self.cfg.train.seed)
            save_samples(x, run_dir / "samples" / f"{self.nimg:012d}_{k}step.png", self.dataset.kind,
                         reference=self.dataset)
            if final:
                save_samples(x, run_dir / f"samples_{k}step.png", self.dataset.kind, reference=self.dataset)


def build_evaluator(trainer: Trainer):
    from cmkit.evaluation import training_evaluator

    return training_evaluator(trainer)


def periodic_eval(trainer: Trainer, evaluator, log: RunLog) -> None:
    """Metrics during training (eval.every_nimg), logged to log.jsonl and TensorBoard; reuses one Evaluator."""
    from cmkit.evaluation import evaluate_during_training

    metrics = evaluate_during_training(trainer, evaluator)
    log.write(trainer.step, trainer.nimg, {f"eval/{k}": v for k, v in metrics.items()})


def set_threads(threads: int) -> None:
    """train.threads > 0 sets torch's CPU threads, unless the user chose OMP_NUM_THREADS (which then wins;
    `cmkit train` says so in its one-line summary)."""
    if threads > 0 and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(threads)


def _version() -> str:
    from cmkit import __version__

    return __version__


PROBE_WARMUP, PROBE_STEPS = 3, 12  # train.time_budget_s: untimed, then timed steps of a throwaway Trainer
# train.time_budget_s, once more mid-run: at REFIT_FRACTION of the fitted steps a fresh run re-times itself and,
# where the remaining budget buys a length more than REFIT_TOLERANCE away, re-fits train.steps once.
REFIT_FRACTION, REFIT_TOLERANCE = 0.1, 0.05
_clock = time.perf_counter  # the budget's clock (a test steers it)


def steps_for_budget(steps: int, budget_s: float, sec_per_step: float) -> int:
    """The steps that budget_s seconds buy at sec_per_step, at most train.steps and at least one."""
    return max(1, min(steps, int(budget_s / sec_per_step)))


def fit_to_budget(cfg: Config, info: distributed.DistInfo, device: torch.device, run_dir: Path,
                  force: bool) -> Config:
    """cfg with train.steps fitted to train.time_budget_s (0 = cfg unchanged).

    A fresh run times PROBE_STEPS training steps (after PROBE_WARMUP untimed ones) of a throwaway Trainer
    built from the same config, on this machine with its present load, and trains
    min(train.steps, budget / median step time) steps; schedules (lr decay, curriculum) span those, and
    config.yaml records them, so the run equals one started with that train.steps. Under torchrun every
    rank probes (the steps all-reduce) and rank 0's time decides. A resume keeps the steps chosen at the
    start: it never probes again.

    A probe can misjudge a machine whose speed drifts (a shared host: 0.129 s probed, 0.181 s a step in the
    run that followed), so the training loop checks once more: at step refit_step(steps) (10% in) it re-fits
    the length to the pace of its own steps so far (refit_steps), if that differs by more than 5%. From there
    on every schedule spans the new length, which config.yaml and the checkpoints record; the steps before it
    ran under the probed length. The run equals one of the probed length stopped at that step and resumed
    with the new train.steps (tested). For the demo those first steps are its lr warm-up, its first
    curriculum stage (for a new length above 0.4x the probed one) and the start of its cosine decay, where
    the lr of the two lengths differs by under 2% for a re-fit to half the length.
    """
    tc = cfg.train
    if not tc.time_budget_s or not tc.steps:
        return cfg
    old = None if force else stored_config(run_dir)
    if old is not None:
        saved = old.get("train") or {}
        if saved.get("time_budget_s", 0.0) != tc.time_budget_s or "steps" not in saved:
            raise ConfigError(
                f"train.time_budget_s={tc.time_budget_s:g} on a resume of '{run_dir}', whose run was started with "
                f"train.time_budget_s={saved.get('time_budget_s', 0.0):g}: a budget fixes a run's length when it "
                f"starts. Resume with train.time_budget_s={saved.get('time_budget_s', 0.0):g}, or set "
                f"train.time_budget_s=0 and train.steps=N to give the length yourself")
        return dataclasses.replace(cfg, train=dataclasses.replace(tc, steps=int(saved["steps"])))
    probe = Trainer(cfg, info, device)  # validates config, data and networks: bad input fails here, before work
    streams = probe.streams()
    times = []
    for _ in range(PROBE_WARMUP + PROBE_STEPS):
        begin = _clock()
        probe.train_step(streams)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(_clock() - begin)
    del probe, streams
    sec = float(distributed.broadcast_json(statistics.median(times[PROBE_WARMUP:]), info, device))
    steps = steps_for_budget(tc.steps, tc.time_budget_s, sec)
    if info.is_main:
        print(f"cmkit: train.time_budget_s={tc.time_budget_s:g}: {sec:.3f} s per step on this machine (median of "
              f"{PROBE_STEPS} probe steps), so this run trains "
              + (f"{steps} of train.steps={tc.steps} steps; schedules span {steps}" if steps < tc.steps
                 else f"all train.steps={tc.steps} steps (the budget does not bind)"), file=sys.stderr)
    return dataclasses.replace(cfg, train=dataclasses.replace(tc, steps=steps))


def refit_step(steps: int) -> int | None:
    """The step at which a fresh budgeted run of ``steps`` steps re-times itself (None: too short to re-fit)."""
    r = max(math.ceil(REFIT_FRACTION * steps), PROBE_STEPS)
    return r if r < steps else None


def refit_steps(fitted: int, cap: int, budget_s: float, done: int, elapsed_s: float) -> int:
    """The length a budgeted run re-fits to after ``done`` steps took ``elapsed_s`` seconds of its loop: the
    steps the rest of the budget buys at that pace, added to ``done`` (at most ``cap``, the configured
    train.steps, and at least done + 1); ``fitted`` (the probe's length) where that is within REFIT_TOLERANCE."""
    steps = max(done + 1, min(cap, done + int((budget_s - elapsed_s) / (elapsed_s / done))))
    return fitted if abs(steps - fitted) <= REFIT_TOLERANCE * fitted else steps


def train(cfg: Config, *, force: bool = False, stop_after: int | None = None) -> Path:
    """Train cfg's method; resume from the run directory's latest checkpoint if it has one.

    ``stop_after`` ends this job after that many steps with a checkpoint (schedules still span
    train.steps), e.g. to fit a cluster's time limit; re-running resumes. SIGINT/SIGTERM finish
    the current step, write a checkpoint and return.
    """
    info = distributed.init(cfg.train.device)
    try:
        return _train(cfg, info, force, stop_after)
    finally:
        distributed.cleanup(info)


def _train(cfg: Config, info: distributed.DistInfo, force: bool, stop_after: int | None) -> Path:
    device = resolve_device(cfg.train.device, info.local_rank)
    set_threads(cfg.train.threads)
    run_dir = Path(cfg.run.dir)
    torch.manual_seed(cfg.train.seed * 1_000_003 + info.rank)
    cap = cfg.train.steps  # the configured length, before a budget fits it
    cfg = fit_to_budget(cfg, info, device, run_dir, force)
    torch.manual_seed(cfg.train.seed * 1_000_003 + info.rank)  # the probe's draws leave no trace in the run
    trainer = Trainer(cfg, info, device)  # validates config, data and networks before any file is touched
    cfg = trainer.cfg  # with values resolved from the data (method.sigma_data=auto)
    evaluator = build_evaluator(trainer) if info.is_main and cfg.eval.every_nimg else None
    if info.is_main:
        prepare_run_dir(run_dir, cfg, force)
    distributed.barrier(info)
    found = latest_checkpoint(run_dir / "checkpoints")
    if found is not None:
        check_autoencoder(found[2], trainer.dataset, found[0])
        trainer.load_state_dict(found[1])
        trainer.last_checkpoint = found[0]
    tc, rc = cfg.train, cfg.run
    streams = trainer.streams()
    log = RunLog(run_dir, enabled=info.is_main, tensorboard=rc.tensorboard, progress=rc.progress,
                 total=tc.steps, initial=trainer.step)
    stop = {"signal": None, "handlers": None}

    def on_signal(signum, frame):  # finish the current step, checkpoint, exit cleanly
        stop["signal"] = signum
        _install(stop["handlers"])  # the previous (default) handlers again: a second Ctrl-C aborts at once
        if info.is_main:
            _note(f"cmkit: {signal.Signals(signum).name} received: stopping after the current step with a "
                  f"checkpoint; send it again to abort at once.\n")

    stop["handlers"] = _install(on_signal)
    start, t_last, steps_last = time.perf_counter(), time.perf_counter(), trainer.step
    first_step = trainer.step
    end = tc.steps if stop_after is None else min(tc.steps, trainer.step + stop_after)
    # the budget's mid-run check: a fresh budgeted run only (a resume keeps the recorded length)
    refit_at = refit_step(tc.steps) if tc.time_budget_s and first_step == 0 else None
    loop_start = _clock()
    try:
        while trainer.step < end:
            # every rank must stop at the same step (torchrun forwards signals at slightly different times)
            if distributed.any_across_ranks(stop["signal"] is not None, info, device):
                break
            logs = trainer.train_step(streams)
            if trainer.step == refit_at:
                pace = (_clock() - loop_start) / refit_at
                steps = refit_steps(tc.steps, cap, tc.time_budget_s, refit_at, pace * refit_at)
                steps = int(distributed.broadcast_json(steps, info, device))  # rank 0's pace decides
                if steps != tc.steps:
                    cfg = trainer.cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, steps=steps))
                    if info.is_main:
                        try:  # a resume reads the length from the newest checkpoint, which carries it, else from here
                            write_config(run_dir, cfg)
                        except OSError as e:
                            log.note(f"cmkit: warning: {e.filename} not rewritten ({e.strerror}); the next checkpoint "
                                     f"records the re-fitted length")
                        log.note(f"cmkit: train.time_budget_s={tc.time_budget_s:g}: its first {refit_at} steps took "
                                 f"{pace:.3f} s a step, so this run re-fits its length "
                                 f"from {tc.steps} to {steps} steps; schedules span {steps} from here on")
                        log.retotal(steps)
                    tc = cfg.train
                    end = tc.steps if stop_after is None else min(tc.steps, first_step + stop_after)
            last = trainer.step == tc.steps
            if trainer.step % rc.log_every == 0 or last:
                now = time.perf_counter()
                logs["sec_per_step"] = (now - t_last) / max(trainer.step - steps_last, 1)
                t_last, steps_last = now, trainer.step
                log.write(trainer.step, trainer.nimg, logs)
            elif trainer.step == first_step + 1:  # the first step of this job: show its loss at once
                log.show(logs)
            log.advance()
            due = rc.checkpoint_every and trainer.step % rc.checkpoint_every == 0
            milestone = rc.milestone_every and trainer.step % rc.milestone_every == 0
            if (due or milestone) and not last:
                trainer.save(run_dir)
            if info.is_main and tc.ema_snapshot_every and (trainer.step % tc.ema_snapshot_every == 0 or last):
                try:  # power-function EMAs for cmkit ema-reconstruct; a failed write (disk full) only warns
                    save_snapshot(run_dir, trainer.nimg, trainer.ema)
                except OSError as e:
                    print(f"cmkit: warning: EMA snapshot at step {trainer.step} not written ({e})", file=sys.stderr)
            if info.is_main and rc.sample_every and trainer.step % rc.sample_every == 0 and not last:
                trainer.write_samples(run_dir, final=False)
            every = cfg.eval.every_nimg
            if info.is_main and every and (trainer.nimg // every) > ((trainer.nimg - tc.batch_size) // every):
                periodic_eval(trainer, evaluator, log)
        if info.is_main:
            finishing = trainer.step == tc.steps and stop["signal"] is None
            log.note(f"cmkit: step {trainer.step}: writing the final checkpoint"
                     + (f" and samples ({', '.join(map(str, rc.sample_steps))}-step, n={rc.sample_n})" if finishing
                        else "") + f" to {run_dir}")
        trainer.save(run_dir, final=True)
        if stop["signal"] is not None and info.is_main:
            name = signal.Signals(stop["signal"]).name
            print(f"cmkit: {name} received: stopped after step {trainer.step}, checkpoint {trainer.last_checkpoint} "
                  f"written; run the same command again to resume.", file=sys.stderr)
        if info.is_main and stop["signal"] is None and trainer.step == tc.steps:
            trainer.write_samples(run_dir, final=True)
            summary = {"steps": trainer.step, "nimg": trainer.nimg, "wall_sec": time.perf_counter() - start,
                       "skipped_steps": trainer.skipped, "last_log": log.last}
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    finally:
        log.close()
        _install(stop["handlers"])
    return run_dir


def _note(text: str) -> None:
    """Write to stderr from a signal handler: os.write, as print could re-enter a buffered write in progress."""
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation (captured stderr) is both
        pass


def _install(handler):
    """Install handler for SIGINT/SIGTERM (main thread only); return the previous handlers.

    A signal the parent set to be ignored stays ignored: a job started in the background by a
    non-interactive shell (``cmkit train ... &`` in a script, many CI runners) inherits SIGINT = SIG_IGN,
    and Unix's convention, which Python itself follows at start-up, is that Ctrl-C in that terminal is not
    for it. Catching it anyway made such a job stop on a SIGINT that arrived after this point and lose
    one that arrived before (the kernel drops an ignored signal), so its reaction depended on timing.
    SIGTERM (torchrun, schedulers, ``kill``) is still caught unless it too is ignored.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    if handler is None:
        return None
    if isinstance(handler, dict):
        for s, h in handler.items():
            signal.signal(s, h)
        return None
    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(s) is not signal.SIG_IGN}
