"""Profiles, device choice, seeding and paths.

A profile is data: for each part of the study (a section) the sizes it runs at. Notebooks take
`profile` as a papermill parameter and every experiment knob that is `None` falls back to the
profile's value through `settings(profile, section, **overrides)`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("STUDY_DATA_DIR", ROOT / "data"))
CACHE_DIR = Path(os.environ.get("STUDY_CACHE_DIR", DATA_DIR / "cache"))
FIGURES_DIR = ROOT / "figures"
NOTEBOOKS_DIR = ROOT / "notebooks"
RUNS_DIR = ROOT / "runs"

PROFILES: dict[str, dict[str, dict]] = {
    "smoke": {
        "tour": {"n_train": 256, "n_test": 64, "image_size": 32, "epochs": 2, "width": 8, "n_explain": 4},
        "engine": {"n_images": 8, "steps": 8, "batch_size": 64},
    },
    "quick": {
        "tour": {"n_train": 2000, "n_test": 400, "image_size": 32, "epochs": 6, "width": 16, "n_explain": 6},
        "engine": {"n_images": 64, "steps": 32, "batch_size": 256},
    },
    "paper": {
        "tour": {"n_train": 10000, "n_test": 2000, "image_size": 64, "epochs": 20, "width": 32, "n_explain": 8},
        "engine": {"n_images": 500, "steps": 100, "batch_size": 512},
    },
}


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    return profile


def settings(profile: str, section: str, **overrides) -> dict:
    """The profile's values for `section`, with every override that is not None applied."""
    values = dict(PROFILES[check_profile(profile)].get(section, {}))
    if not values:
        raise ValueError(f"profile {profile!r} has no section {section!r}; sections: {sorted(PROFILES[profile])}")
    for key, value in overrides.items():
        if key not in values:
            raise ValueError(f"unknown setting {key!r} for section {section!r}; known: {sorted(values)}")
        if value is not None:
            values[key] = value
    return values


def get_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when available, else the CPU; anything else is passed to torch."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(device)


def seed_everything(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed Python, NumPy and torch, make torch deterministic, and return a seeded generator."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)
