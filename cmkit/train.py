"""The one training loop for every method (DESIGN.md: how data flows through one training step).

Each step runs the objective's phases in order; a phase draws ``repeats`` fresh batches, each
followed by backward and that phase's optimiser step. Progress is counted in images seen.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch

from cmkit import distributed
from cmkit.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from cmkit.config import Config, ConfigError
from cmkit.data import load_dataset, batches
from cmkit.ema import EMA
from cmkit.images import save_samples
from cmkit.objectives import build_objective
from cmkit.runlog import RunLog
from cmkit.sampling import sample_batched
from cmkit.schedules import Progress, lr_warmup

# Keys that may differ between a run directory's config and a resumed run's config.
RESUMABLE_SECTIONS = ("run", "eval")
RESUMABLE_KEYS = {("train", "steps"), ("train", "device"), ("train", "threads"), ("data", "cache_dir")}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA GPU is visible. Use train.device=cpu or auto.")
    return torch.device(name)


def make_optimizer(params, tcfg) -> torch.optim.Optimizer:
    """RAdam (iCT App. B) or Adam over params."""
    opts = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}
    if tcfg.optimizer not in opts:
        raise ConfigError(f"train.optimizer='{tcfg.optimizer}' is not valid. Choose one of: {', '.join(opts)}")
    return opts[tcfg.optimizer](params, lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay)


def config_differences(a: dict, b: dict) -> list[str]:
    """Keys whose values differ between two config dicts, ignoring those a resume may change."""
    diffs = []
    for section in sorted(set(a) | set(b)):
        if section in RESUMABLE_SECTIONS:
            continue
        sa, sb = a.get(section) or {}, b.get(section) or {}
        for key in sorted(set(sa) | set(sb)):
            if (section, key) not in RESUMABLE_KEYS and sa.get(key) != sb.get(key):
                diffs.append(f"{section}.{key}: {sa.get(key)!r} -> {sb.get(key)!r}")
    return diffs


class Trainer:
    """Everything stateful in a run, with one state_dict for checkpoints (STYLE 8)."""

    def __init__(self, cfg: Config, info: distributed.DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        self.dataset = load_dataset(cfg.data)
        if cfg.net.class_cond and self.dataset.num_classes == 0:
            raise ConfigError("net.class_cond=true needs labelled data: set data.labels=true (digits, mnist, array with y)")
        num_classes = self.dataset.num_classes if cfg.net.class_cond else 0
        self.objective = build_objective(cfg, self.dataset.shape, num_classes).to(device)
        self.ema = EMA(self.objective.model, cfg.train.ema)
        self.phases = self.objective.phases
        self.optimizers = {p.name: make_optimizer(p.module.parameters(), cfg.train) for p in self.phases}
        self.nimg = self.step = self.data_pos = 0
        if cfg.train.batch_size % info.world_size:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the {info.world_size} ranks")
        if not 0 <= cfg.train.ema_sample < len(cfg.train.ema):
            raise ConfigError(f"train.ema_sample={cfg.train.ema_sample} must index train.ema (0..{len(cfg.train.ema) - 1})")

    # -- checkpoint state ----------------------------------------------------
    def state_dict(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "objective": self.objective.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "rng": rng,
            "progress": {"nimg": self.nimg, "step": self.step, "data_pos": self.data_pos},
            "extra": self.objective.extra_state(),
            "world_size": self.info.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            self.objective.load_state_dict(state["objective"])
            self.ema.load_state_dict(state["ema"])
            for k, o in self.optimizers.items():
                o.load_state_dict(state["optimizers"][k])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"the checkpoint does not fit this config's networks or method: {e}") from None
        self.objective.load_extra_state(state.get("extra", {}))
        p = state["progress"]
        self.nimg, self.step, self.data_pos = int(p["nimg"]), int(p["step"]), int(p["data_pos"])
        if state.get("world_size", 1) == self.info.world_size:
            torch.set_rng_state(state["rng"]["cpu"])
            if "cuda" in state["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        else:  # a different number of ranks: reseed from (seed, rank, nimg)
            torch.manual_seed(hash((self.cfg.train.seed, self.info.rank, self.nimg)) % 2**63)

    def save(self, run_dir: Path) -> Path | None:
        if not self.info.is_main:
            return None
        meta = {"config": self.cfg.to_dict(), "nimg": self.nimg, "step": self.step, "version": _version()}
        return save_checkpoint(run_dir / "checkpoints", self.nimg, self.state_dict(), meta, self.cfg.run.keep_checkpoints)

    # -- one step ------------------------------------------------------------
    def next_batch(self, stream) -> dict:
        idx = next(stream)
        self.data_pos += self.cfg.train.batch_size
        batch = {"x": self.dataset.x[idx].to(self.device, non_blocking=True)}
        if self.dataset.labels is not None and self.cfg.net.class_cond:
            batch["labels"] = self.dataset.labels[idx].to(self.device, non_blocking=True)
        return batch

    def train_step(self, stream) -> dict:
        """Run every phase once; return detached logging values (no host sync)."""
        tc = self.cfg.train
        progress = Progress(self.nimg, tc.steps * tc.batch_size, tc.batch_size)
        lr = tc.lr * lr_warmup(self.nimg, tc.warmup_nimg)
        logs: dict = {"lr": lr}
        for i, phase in enumerate(self.phases):
            opt = self.optimizers[phase.name]
            for group in opt.param_groups:
                group["lr"] = lr
            for _ in range(phase.repeats):
                out = phase.loss(self.next_batch(stream), progress)
                loss = out["loss"].mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                params = [p for g in opt.param_groups for p in g["params"]]
                distributed.average_gradients(params, self.info)
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                opt.step()
            self.objective.after_phase(phase.name, progress)
            prefix = "" if i == 0 else f"{phase.name}/"
            for k, v in out.items():
                logs[prefix + k] = loss.detach() if k == "loss" else (v.detach() if torch.is_tensor(v) else v)
        self.ema.update(self.objective.model)
        self.nimg += tc.batch_size
        self.step += 1
        return logs

    # -- samples -------------------------------------------------------------
    def samples(self, steps: int, n: int, seed: int) -> torch.Tensor:
        model = self.ema.modules[self.cfg.train.ema_sample]
        labels = None
        if self.cfg.net.class_cond:
            labels = torch.arange(n) % self.dataset.num_classes
        x = sample_batched(
            model, n, self.dataset.shape, self.objective.sample_times(steps), sampler=self.objective.sampler,
            seed=seed, device=self.device, class_labels=labels,
        )
        return self.dataset.to_data_space(x)

    def write_samples(self, run_dir: Path, final: bool) -> None:
        rc = self.cfg.run
        for k in rc.sample_steps:
            x = self.samples(k, rc.sample_n, seed=self.cfg.train.seed)
            save_samples(x, run_dir / "samples" / f"{self.nimg:012d}_{k}step.png", self.dataset.kind)
            if final:
                save_samples(x, run_dir / f"samples_{k}step.png", self.dataset.kind)


def periodic_eval(trainer: Trainer, run_dir: Path, log: RunLog) -> None:
    """Metrics during training (eval.every_nimg), logged to log.jsonl and TensorBoard."""
    from cmkit.evaluation import evaluate_during_training

    metrics = evaluate_during_training(trainer, run_dir)
    log.write(trainer.step, trainer.nimg, {f"eval/{k}": v for k, v in metrics.items()})


def _version() -> str:
    from cmkit import __version__

    return __version__


def prepare_run_dir(run_dir: Path, cfg: Config, force: bool) -> None:
    """Refuse a run directory holding a different run, unless force; write config.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    old = latest_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    if old is not None and not force:
        diffs = config_differences(old[2].get("config", {}), cfg.to_dict())
        if diffs:
            raise ConfigError(
                f"run directory '{run_dir}' holds a different run (checkpoint {old[0].name}); differing keys: "
                + "; ".join(diffs)
                + ". Choose another run.dir, resume with the same config, or pass --force to start over there."
            )
    if force and (run_dir / "checkpoints").is_dir():
        for p in (run_dir / "checkpoints").iterdir():
            p.unlink()
    (run_dir / "config.yaml").write_text(cfg.to_yaml())


def train(cfg: Config, *, force: bool = False, stop_after: int | None = None) -> Path:
    """Train cfg's method; resume from the run directory's latest checkpoint if it has one.

    ``stop_after`` ends this job after that many steps with a checkpoint (schedules still span
    train.steps), e.g. to fit a cluster's time limit; re-running resumes.
    """
    info = distributed.init(cfg.train.device)
    device = resolve_device(cfg.train.device, info.local_rank)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed * 1_000_003 + info.rank)
    run_dir = Path(cfg.run.dir)
    if info.is_main:
        prepare_run_dir(run_dir, cfg, force)
    distributed.barrier(info)
    trainer = Trainer(cfg, info, device)
    found = latest_checkpoint(run_dir / "checkpoints")
    if found is not None:
        trainer.load_state_dict(found[1])
    else:
        distributed.broadcast_module(trainer.objective, info)
        trainer.ema = EMA(trainer.objective.model, cfg.train.ema)
    tc, rc = cfg.train, cfg.run
    stream = batches(len(trainer.dataset), tc.batch_size, tc.seed, start=trainer.data_pos,
                     rank=info.rank, world_size=info.world_size)
    log = RunLog(run_dir, enabled=info.is_main, tensorboard=rc.tensorboard, progress=rc.progress,
                 total=tc.steps, initial=trainer.step)
    stop = {"signal": None}

    def on_signal(signum, frame):  # finish the current step, checkpoint, exit cleanly
        stop["signal"] = signum

    old_handlers = _install(on_signal)
    start, t_last, steps_last = time.perf_counter(), time.perf_counter(), trainer.step
    end = tc.steps if stop_after is None else min(tc.steps, trainer.step + stop_after)
    try:
        while trainer.step < end and stop["signal"] is None:
            logs = trainer.train_step(stream)
            last = trainer.step == tc.steps
            if trainer.step % rc.log_every == 0 or last:
                now = time.perf_counter()
                logs["sec_per_step"] = (now - t_last) / max(trainer.step - steps_last, 1)
                t_last, steps_last = now, trainer.step
                log.write(trainer.step, trainer.nimg, logs)
            log.advance()
            if rc.checkpoint_every and trainer.step % rc.checkpoint_every == 0 and not last:
                trainer.save(run_dir)
            if info.is_main and rc.sample_every and trainer.step % rc.sample_every == 0 and not last:
                trainer.write_samples(run_dir, final=False)
            every = cfg.eval.every_nimg
            if info.is_main and every and (trainer.nimg // every) > ((trainer.nimg - tc.batch_size) // every):
                periodic_eval(trainer, run_dir, log)
        trainer.save(run_dir)
        if info.is_main and stop["signal"] is None and trainer.step == tc.steps:
            trainer.write_samples(run_dir, final=True)
            summary = {"steps": trainer.step, "nimg": trainer.nimg, "wall_sec": time.perf_counter() - start,
                       "last_log": log.last}
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    finally:
        log.close()
        _install(old_handlers)
        distributed.cleanup(info)
    return run_dir


def _install(handler):
    """Install handler for SIGINT/SIGTERM (main thread only); return the previous handlers."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    if handler is None:
        return None
    if isinstance(handler, dict):
        for s, h in handler.items():
            signal.signal(s, h)
        return None
    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
