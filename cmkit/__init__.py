"""cmkit: training few-step generators with consistency models (CT, iCT, sCM, iLCT, ACT, CM-GAN)."""

__version__ = "0.1.0"


def train(config, **kwargs):
    """Train from a Config (or a YAML path); see cmkit.train.train."""
    from cmkit.config import Config
    from cmkit.configure import load_config
    from cmkit.train import train as _train

    if not isinstance(config, Config):
        config = load_config(config)
    return _train(config, **kwargs)


def load(run_dir, checkpoint=None, device="cpu"):
    """Load a trained run for sampling; see cmkit.run.Run."""
    from cmkit.run import load as _load

    return _load(run_dir, checkpoint, device)
