"""Profiles, device choice, seeding and paths.

A profile is data: for each part of the study (a section) the sizes it runs at. Notebooks take
`profile` as a papermill parameter and every experiment knob that is `None` falls back to the
profile's value through `settings(profile, section, **overrides)`.
"""

from __future__ import annotations

import contextlib
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

# Notebook 01 evaluates every test image of digits (397; the card's recipe says 200, the paper's number is
# n/a): twice the images for about 65 s more of the metric step, and intervals about 1/√2 as wide.
TOMSETT_IMAGES = {"digits": 397, "synth_cifar": 400, "cifar10": 400, "folder": 400}

PROFILES: dict[str, dict[str, dict]] = {
    "smoke": {
        "vandersmissen2024": {"n_train": 128, "n_test": 32, "epochs": 1, "n_images": 5, "steps": 4, "ig_steps": 8,
                              "smoothgrad_samples": 2, "rise_masks": 32, "batch_size": 256, "n_models": 2},
        "tour": {"n_train": 256, "n_test": 64, "image_size": 32, "epochs": 2, "width": 8, "n_explain": 4, "n_scored": 16},
        "phang2020": {"n_train": 160, "n_trainval": 48, "n_test": 48, "epochs": 2, "widths": [8, 16, 32, 64],
                      "stem_stride": 2, "hidden": 16, "steps": 3, "batch_size": 16, "lr": 1e-2, "classifier_lr": 1e-3,
                      "rows": {"S1": 1, "S2": 1, "S3": 1, "S4": 1, "S5": 1, "S6": 1, "S7": 1, "S8": 1, "S9": 1, "S10": 1},
                      "few_shot_k": [1, 5], "few_shot_classes": [2], "few_shot_rows": ["S3"], "epoch_reference": True,
                      "few_shot_seeds": 2,
                      "tv_grid": [3.5e-3], "n_fong": 8, "fong_steps": 3, "n_randomisation": 6, "random_label": True,
                      "n_gallery": 4, "n_images": 8, "real_k": 1, "real_steps": 2, "threads": 1,
                      "workers": 1},
        "engine": {"n_images": 8, "steps": 8, "batch_size": 64},
        "rao2023": {"image_size": 32, "widths": [4, 8, 16, 32], "n_train": 96, "n_valid": 32, "n_test": 32,
                    "baseline_epochs": 2, "baseline_lr": 1e-3, "biasfree_baseline_lr": 3e-3, "finetune_epochs": 1,
                    "finetune_lr": 1e-3, "batch_size": 64, "configs": ["vanilla_ixg", "bcos"], "layers": ["input", "final"],
                    "losses": ["energy", "l1"], "lambda_factors": [1], "seeds": [0], "ablation_config": "bcos",
                    "fractions": [0.1], "dilations": [0.5], "depth_layers": ["mid"], "birds_image_size": 32,
                    "birds_n_train": 64, "birds_n_valid": 32, "birds_n_test": 64, "birds_seeds": 1, "birds_config": "bcos",
                    "birds_layer": "input", "birds_fraction": 0.1, "birds_baseline_epochs": 2, "birds_finetune_epochs": 1,
                    "birds_tint": 0.1, "birds_contrast": 0.5, "birds_n_select": 16,
                    "birds_lambdas": {"energy": [10.0], "l1": [300.0]}, "cooccur": None, "workers": 1, "threads": 1},
        "viviano2021": {"n_seeds": 2, "methods": ["baseline", "masked", "shuffle", "maskall", "adversarial", "actdiff", "gradmask", "rrr"],
                        "width": 4, "epochs": 2, "burn_in": 1, "n_train": 48, "n_valid": 32, "n_test": 32,
                        "ig_steps": 4, "ig_batch": 512, "occlusion_window": 7, "n_explain": 8, "disc_hidden": 64,
                        "severity_ps": [0.0, 1.0], "severity_attributions": ["grad"], "severity_select": "fixed",
                        "xray_size": 32, "n_per_cell": 8, "workers": 1, "threads": None},
        "tomsett2020": {"n_images": 8, "epochs": 2, "width": 8, "n_train": 300, "n_valid": 100, "n_test": 100,
                        "steps": 8, "ig_steps": 4, "smoothgrad_samples": 4,
                        "replacements": ["dataset_mean", "uniform", "zero", "blur"], "granularities": ["pixel", "patch"],
                        "outputs": ["prob", "logit"], "score": "prob", "abs_map": False,
                        "signs": ["signed", "abs"], "full_grid": False, "alpha_ci": True, "batch_size": 512},
    },
    "quick": {
        "vandersmissen2024": {"n_train": 1500, "n_test": 300, "epochs": 8, "n_images": 24, "steps": 16, "ig_steps": 50,
                              "smoothgrad_samples": 10, "rise_masks": 300, "batch_size": 64, "n_models": 3},
        "tour": {"n_train": 2000, "n_test": 400, "image_size": 32, "epochs": 20, "width": 16, "n_explain": 6, "n_scored": 100},
        "phang2020": {"n_train": 3000, "n_trainval": 500, "n_test": 500, "epochs": 8, "widths": [8, 16, 32, 64],
                      "stem_stride": 2, "hidden": 32, "steps": 100, "batch_size": 16, "lr": 1e-2, "classifier_lr": 1e-3,
                      "rows": {"S1": 5, "S2": 5, "S3": 5, "S4": 5, "S5": 5, "S6": 5, "S7": 5, "S8": 5, "S9": 5, "S10": 5},
                      "few_shot_k": [1, 5, 10, 50], "few_shot_classes": [2, 5], "few_shot_rows": ["S3"],
                      "epoch_reference": True, "few_shot_seeds": 5, "tv_grid": [3.5e-3], "n_fong": 100, "fong_steps": 80,
                      "n_randomisation": 32, "random_label": True, "n_gallery": 6, "n_images": 1000, "real_k": 10,
                      "real_steps": 100, "threads": 1, "workers": 2},
        "engine": {"n_images": 64, "steps": 32, "batch_size": 256},
        "rao2023": {"image_size": 32, "widths": [8, 16, 32, 64], "n_train": 800, "n_valid": 150, "n_test": 300,
                    "baseline_epochs": 20, "baseline_lr": 1e-3, "biasfree_baseline_lr": 3e-3, "finetune_epochs": 6,
                    "finetune_lr": 1e-3, "batch_size": 64,
                    "configs": ["vanilla_ixg", "vanilla_gradcam", "xdnn_intgrad", "bcos"], "layers": ["input", "mid", "final"],
                    "losses": ["energy", "l1", "ppce", "rrr"], "lambda_factors": [1 / 3, 1, 3], "seeds": [0, 1, 2],
                    "ablation_config": "bcos",
                    "fractions": [0.01, 0.1], "dilations": [0.25, 0.5], "depth_layers": ["mid"],
                    "birds_image_size": 32, "birds_n_train": 800, "birds_n_valid": 100, "birds_n_test": 800,
                    "birds_seeds": 8, "birds_config": "bcos", "birds_layer": "input", "birds_fraction": 0.01,
                    "birds_baseline_epochs": 15, "birds_finetune_epochs": 8, "birds_tint": 0.1, "birds_contrast": 0.5,
                    "birds_n_select": 200, "birds_lambdas": {"energy": [3.0, 10.0, 30.0], "l1": [100.0, 300.0, 1000.0]},
                    "cooccur": None, "workers": 2, "threads": 1},
        "viviano2021": {"n_seeds": 5, "methods": ["baseline", "masked", "shuffle", "maskall", "adversarial", "actdiff", "gradmask", "rrr"],
                        "width": 8, "epochs": 8, "burn_in": 5, "n_train": 500, "n_valid": 128, "n_test": 128,
                        "ig_steps": 10, "ig_batch": 1024, "occlusion_window": 4, "n_explain": 24, "disc_hidden": 256,
                        "severity_ps": [0.0, 0.25, 0.5, 0.75, 1.0], "severity_attributions": ["grad"],
                        "severity_select": "fixed", "xray_size": 64, "n_per_cell": 200, "workers": 2, "threads": 1},
        "tomsett2020": {"n_images": TOMSETT_IMAGES, "epochs": {"digits": 15, "synth_cifar": 10, "cifar10": 10}, "width": 16,
                        "n_train": 5000, "n_valid": 500, "n_test": 1000, "steps": 32, "ig_steps": 32,
                        "smoothgrad_samples": 25,
                        "replacements": ["dataset_mean", "uniform", "zero", "blur"], "granularities": ["pixel", "patch"],
                        "outputs": ["prob", "logit"], "score": "prob", "abs_map": False,
                        "signs": ["signed"], "full_grid": False, "alpha_ci": True, "batch_size": 512},
    },
    "paper": {
        "vandersmissen2024": {"n_train": 3000, "n_test": 900, "epochs": 12, "n_images": 300, "steps": 100, "ig_steps": 50,
                              "smoothgrad_samples": 10, "rise_masks": 1000, "batch_size": 512, "n_models": 3},
        "tour": {"n_train": 10000, "n_test": 2000, "image_size": 64, "epochs": 20, "width": 32, "n_explain": 8, "n_scored": 500},
        "phang2020": {"n_train": 12000, "n_trainval": 2000, "n_test": 2000, "epochs": 12, "widths": [16, 32, 64, 128],
                      "stem_stride": 1, "hidden": 32, "steps": 3000, "batch_size": 72, "lr": 1e-3, "classifier_lr": 1e-3,
                      "rows": {"S1": 3, "S2": 3, "S3": 3, "S4": 3, "S5": 3, "S6": 3, "S7": 3, "S8": 3, "S9": 3, "S10": 3},
                      "few_shot_k": [1, 5, 10, 50], "few_shot_classes": [2, 5], "few_shot_rows": ["S3", "S6"],
                      "epoch_reference": True, "few_shot_seeds": 3, "tv_grid": [1e-3, 3.5e-3, 1e-2], "n_fong": 500, "fong_steps": 300,
                      "n_randomisation": 64, "random_label": True, "n_gallery": 8, "n_images": 1000, "real_k": 10,
                      "real_steps": 1000, "threads": None, "workers": 2},
        "engine": {"n_images": 500, "steps": 100, "batch_size": 512},
        "rao2023": {"image_size": 64, "widths": [16, 32, 64, 128], "n_train": 2000, "n_valid": 500, "n_test": 1000,
                    "baseline_epochs": 40, "baseline_lr": 1e-3, "biasfree_baseline_lr": 3e-3, "finetune_epochs": 20,
                    "finetune_lr": 1e-4, "batch_size": 64,
                    "configs": ["vanilla_ixg", "vanilla_gradcam", "xdnn_intgrad", "bcos"], "layers": ["input", "mid", "final"],
                    "losses": ["energy", "l1", "ppce", "rrr"], "lambda_factors": [1 / 3, 1, 3], "seeds": [0, 1, 2],
                    "ablation_config": "bcos", "fractions": [0.01, 0.1], "dilations": [0.1, 0.25, 0.5],
                    "depth_layers": ["mid"], "birds_image_size": 64, "birds_n_train": 2000, "birds_n_valid": 500,
                    "birds_n_test": 2000, "birds_seeds": 6, "birds_config": "bcos", "birds_layer": "input",
                    "birds_fraction": 0.01, "birds_baseline_epochs": 40, "birds_finetune_epochs": 20, "birds_tint": 0.1,
                    "birds_contrast": 0.5, "birds_n_select": 500,
                    "birds_lambdas": {"energy": [3.0, 10.0, 30.0], "l1": [100.0, 300.0, 1000.0]}, "cooccur": None,
                    "workers": 2, "threads": None},
        "viviano2021": {"n_seeds": 5, "methods": ["baseline", "masked", "shuffle", "maskall", "adversarial", "actdiff", "gradmask", "rrr", "rrr_trainable"],
                        "width": 16, "epochs": 40, "burn_in": 5, "n_train": 500, "n_valid": 128, "n_test": 128,
                        "ig_steps": 200, "ig_batch": 2048, "occlusion_window": 2, "n_explain": 128, "disc_hidden": 1024,
                        "severity_ps": [0.0, 0.25, 0.5, 0.75, 1.0], "severity_attributions": ["grad", "ig", "occlusion"],
                        "severity_select": "per_p", "xray_size": 64, "n_per_cell": 1000, "workers": 2, "threads": 1},
        "tomsett2020": {"n_images": TOMSETT_IMAGES, "epochs": {"digits": 15, "synth_cifar": 20, "cifar10": 20},
                        "width": {"digits": 16, "synth_cifar": 16, "cifar10": 32},
                        "n_train": {"digits": None, "synth_cifar": 5000, "cifar10": None},
                        "n_valid": {"digits": None, "synth_cifar": 500, "cifar10": 5000},
                        "n_test": {"digits": None, "synth_cifar": 1000, "cifar10": None}, "steps": 32, "ig_steps": 32,
                        "smoothgrad_samples": 25,
                        "replacements": ["dataset_mean", "uniform", "zero", "blur"], "granularities": ["pixel", "patch"],
                        "outputs": ["prob", "logit"], "score": "prob", "abs_map": False,
                        "signs": ["signed", "abs"], "full_grid": True, "alpha_ci": True, "batch_size": 1024},
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
    if not isinstance(device, str):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda[:N]' or a torch.device, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda[:N]' or another torch device string") from None


def seed_everything(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed Python, NumPy and torch, make torch deterministic, and return a seeded generator."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        exact_cuda_arithmetic()
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's global generators seeded by `seed` and restore them after it: for code
    that draws from the global generator and takes no generator of its own (captum's NoiseTunnel, a
    module's `reset_parameters`). `torch.manual_seed` reseeds every CUDA device, so every initialised
    one is restored too."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def exact_cuda_arithmetic() -> None:
    """On CUDA: deterministic cuDNN/cuBLAS algorithms and full float32 precision (cuDNN's convolutions
    default to TF32 on Ampere and later, a reduced precision no test here has checked). Called by
    `seed_everything` and in every parallel worker; no effect on CPU arithmetic. (Some CUDA kernels
    have no deterministic version, e.g. the backward of bilinear `interpolate`: in the notebook
    process `seed_everything` makes them warn, and their results may vary between GPU runs.)"""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
