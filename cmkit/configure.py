"""Resolving a config: YAML file + ``key=value`` overrides + the method registry.

This module sits above both the config types (cmkit.config, which never imports the objectives)
and the objectives' registry (cmkit.objectives.METHODS, whose dataclasses use the config types),
so neither imports the other. ``from cmkit.config import load_config`` still works (a lazy alias).
"""

from __future__ import annotations

from pathlib import Path

from cmkit.config import Config, build_config, merge_overrides, read_config_file
from cmkit.objectives import METHODS


def from_dict(raw: dict | None) -> Config:
    """Build and validate a Config from a nested dict (a parsed YAML file, a checkpoint's config)."""
    return build_config(raw, METHODS)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults) and apply ``key=value`` overrides."""
    raw = read_config_file(path) if path is not None else {}
    return from_dict(merge_overrides(raw, overrides))
