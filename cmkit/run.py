"""Loading a trained run for sampling and evaluation: ``cmkit.load(run_dir).sample(n, steps=2)``."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from cmkit.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint
from cmkit.config import ConfigError
from cmkit.configure import from_dict
from cmkit.data import load_dataset
from cmkit.latent import check_autoencoder
from cmkit.ema import EMA
from cmkit.objectives import build_objective
from cmkit.sampling import cycled_labels, guidance_scale, guided_model, sample_batched


class Run:
    """A trained run: its config, dataset, objective (student and friends) and EMA weights."""

    def __init__(self, run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu"):
        self.dir = Path(run_dir)
        if checkpoint is not None:
            state, meta = read_checkpoint(Path(checkpoint))
        else:
            found = latest_checkpoint(self.dir / "checkpoints")
            if found is None:
                raise CheckpointError(
                    f"'{self.dir}' has no checkpoint (looked in {self.dir / 'checkpoints'}). "
                    f"Train first: cmkit train CONFIG run.dir={self.dir}"
                )
            _, state, meta = found
        if checkpoint is not None:
            check_checkpoint_belongs(self.dir, Path(checkpoint), meta)
        raw = meta.get("config") or yaml.safe_load((self.dir / "config.yaml").read_text())
        self.cfg = from_dict(raw)
        # The run may have moved since it was written: objectives that read their own checkpoint (a CD
        # teacher whose run is gone, CM-GAN's skipped init_from) look here.
        self.cfg.run.dir = str(self.dir)
        self.device = torch.device(device)
        self.dataset = load_dataset(self.cfg.data, device=self.device)
        check_autoencoder(meta, self.dataset, checkpoint or self.dir)
        num_classes = self.dataset.num_classes if self.cfg.net.class_cond else 0
        self.objective = build_objective(self.cfg, self.dataset.shape, num_classes)
        self.ema = EMA.from_config(self.objective.model, self.cfg.train)
        self.posthoc = meta.get("posthoc")  # set on the checkpoints cmkit ema-reconstruct writes
        try:
            self.objective.load_state_dict(state["objective"])
            self.ema.load_state_dict(state["ema"])
            self.nimg = int(state["progress"]["nimg"])
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint does not match the run's config: {e}") from None
        self.objective.to(self.device).eval()
        self.ema.to(self.device)

    def model(self, ema: bool = True, index: int | None = None):
        """The EMA model (default: the config's train.ema_sample) or the raw student."""
        if not ema:
            return self.objective.model
        return self.ema.modules[self.cfg.train.ema_sample if index is None else index]

    def guided(self, model, guidance: float | None = None):
        """``model`` with the run's CFG scale w applied (cmkit.sampling.guidance_scale: ``guidance`` if given,
        else the run's default; a guidance-conditional student takes it as an input, a model trained with
        method.label_dropout > 0 is guided on its output with two network evaluations a step)."""
        return guided_model(model, self.cfg, self.objective.sample_guidance, self.dataset.num_classes, guidance)

    def guidance_scale(self, guidance: float | None = None) -> float | None:
        """The CFG scale w this run samples with (None: unguided), as ``guided`` applies it."""
        return guidance_scale(self.cfg, self.objective.sample_guidance, guidance)

    def sample_labels(self, n: int) -> torch.Tensor | None:
        """The labels ``sample`` draws n samples for unless given: cycled_labels if class-conditional, else None."""
        return cycled_labels(n, self.dataset.num_classes) if self.cfg.net.class_cond else None

    def sample(self, n: int, steps: int = 1, *, times: list[float] | None = None, seed: int = 0,
               ema: bool = True, data_space: bool = True, batch_size: int = 256,
               class_labels: torch.Tensor | None = None, guidance: float | None = None,
               ema_index: int | None = None, temperature: float = 1.0) -> torch.Tensor:
        """n samples with a K-step sampler (times default to the method's), in data space by default.

        ``temperature``: the factor on the starting noise (cmkit.sampling.sample_batched); 1 = the model's own.

        ``guidance``: the CFG scale w (1 = none; default: the run's method.guidance). A guidance-conditional sCD
        student takes it as an input; a class-conditional model trained with method.label_dropout > 0 is guided
        on its output (cmkit.sampling.WithCFG: two network evaluations a step); any other model refuses it.
        ``ema_index``: which tracked EMA samples (default: train.ema_sample), as in ``model``.
        """
        times = times or self.objective.sample_times(steps)
        if class_labels is None:
            class_labels = self.sample_labels(n)
        model = self.guided(self.model(ema, ema_index), guidance)
        x = sample_batched(model, n, self.dataset.shape, times, sampler=self.objective.sampler,
                           seed=seed, device=self.device, batch_size=batch_size, class_labels=class_labels,
                           temperature=temperature)
        return self.dataset.to_data_space(x) if data_space else x


def check_checkpoint_belongs(run_dir: Path, checkpoint: Path, meta: dict) -> None:
    """Refuse a checkpoint whose config differs from the run directory's (config.yaml, else its latest checkpoint).

    Keys a resume may change (train.steps, run.*, ...) are ignored, as for a resumed run (cmkit.rundir).
    """
    from cmkit.rundir import config_differences

    own = None
    try:
        own = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        pass
    if not isinstance(own, dict):
        try:
            found = latest_checkpoint(run_dir / "checkpoints")
        except CheckpointError:
            found = None
        own = found[2].get("config") if found is not None else None
    if not isinstance(own, dict) or not isinstance(meta.get("config"), dict):
        return  # nothing to compare with: the checkpoint defines the run
    diffs = config_differences(own, meta["config"])
    if meta.get("posthoc"):  # cmkit ema-reconstruct rewrites the EMA settings to the one reconstructed profile
        diffs = [d for d in diffs if not d.startswith("train.ema")]
    if diffs:
        home = checkpoint.resolve().parent.parent
        home = home.parent if home.name == "checkpoints" else home  # checkpoints/milestones/ckpt-...
        raise CheckpointError(
            f"checkpoint '{checkpoint}' belongs to another run than '{run_dir}'; differing keys: {'; '.join(diffs)}. "
            f"Pass the checkpoint's own run directory (probably '{home}') or a checkpoint of '{run_dir}'")


def load(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu") -> Run:
    """Load a run directory (latest checkpoint unless one is named)."""
    return Run(run_dir, checkpoint, device)
