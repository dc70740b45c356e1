"""Model-parameter randomisation test (Adebayo et al. 2018, "Sanity checks for saliency maps").

Layers of a model are re-initialised, top-down and cumulatively ("cascading") or one at a time
("independent"), and the saliency maps of the randomised model are compared with the original
maps. A method that passes the test produces maps that lose their similarity to the original as
more of the model is randomised. Phang et al. 2020 run the same test on their masks (Spearman and
SSIM); Quantus calls it MPRT.

Randomisation always works on deep copies: the caller's model is never modified, and even the
original maps are computed on a copy so that an explainer with side effects cannot touch it.
Every draw is seeded: layer i of the list gets the seed ``SeedSequence([seed, i])``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats
from skimage.metrics import structural_similarity
from torch import nn

from study import config
from study.metrics.localisation import _flat, _maps

__all__ = [
    "spearman_similarity",
    "ssim",
    "randomise_layers",
    "parameter_randomisation",
    "cascading_randomisation",
    "independent_randomisation",
]

_SIMILARITIES = ("spearman", "spearman_abs", "ssim")
_MODES = ("cascading", "independent")
_INITS = ("reset", "normal")
_CONSTANT = ("zero", "raise")


# --------------------------------------------------------------------------------------------
# similarities between two batches of maps
# --------------------------------------------------------------------------------------------


def _pair_maps(a, b) -> tuple[np.ndarray, np.ndarray]:
    x, _ = _maps(a, "a")
    y, _ = _maps(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same shape; got {x.shape} and {y.shape} (B, H, W)")
    return x, y


def spearman_similarity(a, b, abs: bool = False, constant: str = "zero") -> np.ndarray:
    """Spearman rank correlation between two maps of each image, ``(B,)``.

    Pixels are ranked within each map (ties averaged) and Pearson's r of the ranks is taken.
    ``abs=True`` ranks |a| and |b| (Adebayo et al.'s "absolute value" variant). A constant map has
    no ranking: with ``constant="zero"`` (default) a pair with exactly one constant map scores 0
    and a pair of constant maps scores 1 (both are "all tied", the same degenerate ranking);
    ``constant="raise"`` raises ``ValueError`` instead.
    """
    if constant not in _CONSTANT:
        raise ValueError(f"unknown constant handling {constant!r}; choose one of {list(_CONSTANT)}")
    x, y = _pair_maps(a, b)
    x, y = _flat(x), _flat(y)
    if abs:
        x, y = np.abs(x), np.abs(y)
    rx = stats.rankdata(x, axis=1)
    ry = stats.rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    sx = np.sqrt((rx * rx).sum(axis=1))
    sy = np.sqrt((ry * ry).sum(axis=1))
    flat_x, flat_y = sx == 0, sy == 0
    if constant == "raise" and (flat_x | flat_y).any():
        raise ValueError(
            f"images {np.nonzero(flat_x | flat_y)[0][:10].tolist()} have a constant map; Spearman is undefined"
        )
    defined = ~(flat_x | flat_y)
    rho = (rx * ry).sum(axis=1) / np.where(defined, sx * sy, 1.0)
    return np.where(defined, np.clip(rho, -1.0, 1.0), np.where(flat_x & flat_y, 1.0, 0.0))


def ssim(a, b, window_size: int = 7, normalise: bool = True) -> np.ndarray:
    """Structural similarity (Wang et al. 2004) between two maps of each image, ``(B,)``:
    ``skimage.metrics.structural_similarity`` with its defaults (a uniform ``window_size`` ×
    ``window_size`` window, sample covariance, K1 = 0.01, K2 = 0.03) and data range 1.

    Maps are min-max normalised to [0, 1] per image first (``normalise=True``; a constant map
    becomes all zeros, and two constant maps score 1). Phang et al. used a window of 5.
    """
    if isinstance(window_size, bool) or not isinstance(window_size, (int, np.integer)) or window_size < 3 \
            or window_size % 2 == 0:
        raise ValueError(f"window_size must be an odd integer ≥ 3; got {window_size!r}")
    x, y = _pair_maps(a, b)
    if x.shape[1] < window_size or x.shape[2] < window_size:
        raise ValueError(f"maps of size {x.shape[1:]} are smaller than the {window_size}-px SSIM window")
    if normalise:
        x, y = _min_max(x), _min_max(y)
    elif min(x.min(), y.min()) < 0 or max(x.max(), y.max()) > 1:
        raise ValueError("with normalise=False the maps must already lie in [0, 1]")
    return np.array([structural_similarity(xi, yi, win_size=int(window_size), data_range=1.0) for xi, yi in zip(x, y)])


def _min_max(x: np.ndarray) -> np.ndarray:
    low = x.min(axis=(1, 2), keepdims=True)
    span = x.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (x - low) / np.where(span > 0, span, 1.0), 0.0)


# --------------------------------------------------------------------------------------------
# randomising layers
# --------------------------------------------------------------------------------------------


def _layer_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _check_layers(model: nn.Module, layers) -> list[str]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise ValueError("layers must be a list of module names (top-down order), e.g. ['fc', 'layer4']")
    layers = list(layers)
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown:
        known = [name for name in modules if name]
        raise ValueError(f"unknown layers {unknown}; the model's modules are {known[:40]}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat; got {layers}")
    empty = [name for name in layers if not any(True for _ in modules[name].parameters())]
    if empty:
        raise ValueError(f"layers {empty} have no parameters to randomise")
    return layers


def _randomise_module(module: nn.Module, seed: int, init: str) -> None:
    params = list(module.parameters())
    covered: set[int] = set()
    with torch.no_grad():
        if init == "reset":
            with config.seeded(seed):
                for sub in module.modules():
                    if callable(getattr(sub, "reset_parameters", None)):
                        sub.reset_parameters()
                        covered.update(id(p) for p in sub.parameters(recurse=False))
        generator = torch.Generator().manual_seed(seed)
        for p in params:
            if id(p) in covered:
                continue
            scale = float(p.detach().double().std()) if p.numel() > 1 else 0.0
            if not np.isfinite(scale) or scale == 0:
                scale = 0.01
            draw = torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale
            p.copy_(draw.to(device=p.device, dtype=p.dtype))


def randomise_layers(model: nn.Module, layers: Sequence[str], seed: int = 0, init: str = "reset") -> nn.Module:
    """A deep copy of ``model`` with the parameters of ``layers`` re-initialised (seeded).

    ``init="reset"`` calls each sub-module's own ``reset_parameters`` (PyTorch's default
    initialisation; BatchNorm also resets its running statistics) under a forked, seeded torch RNG,
    so the global RNG state is untouched. Parameters of modules without ``reset_parameters``, and
    every parameter under ``init="normal"``, are drawn from N(0, σ²) with σ the original tensor's
    standard deviation (0.01 if that is 0) using a ``torch.Generator``. Layer i of ``layers`` uses
    the seed ``SeedSequence([seed, i])``. The input model is not modified.
    """
    if init not in _INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {list(_INITS)}")
    layers = _check_layers(model, layers)
    copy_ = copy.deepcopy(model)
    modules = dict(copy_.named_modules())
    for index, name in enumerate(layers):
        _randomise_module(modules[name], _layer_seed(seed, index), init)
    return copy_


def _explainer(explain_fn, explain_options: dict) -> Callable:
    if isinstance(explain_fn, str):
        from study.attribution import explain  # imported lazily: optional at import time

        method = explain_fn
        return lambda model, images, targets: explain(model, images, targets, method, **explain_options)
    if not callable(explain_fn):
        raise ValueError("explain_fn must be a callable explain_fn(model, images, targets) -> maps, or a method name")
    return lambda model, images, targets: explain_fn(model, images, targets, **explain_options)


def parameter_randomisation(
    model: nn.Module,
    images: torch.Tensor,
    targets,
    explain_fn: Callable | str,
    layers: Sequence[str],
    seed: int = 0,
    similarity: Sequence[str] = ("spearman", "ssim"),
    mode: str = "cascading",
    init: str = "reset",
    include_original: bool = True,
    ssim_window: int = 7,
    explain_options: dict | None = None,
) -> pd.DataFrame:
    """Adebayo et al.'s model-parameter randomisation test; one row per (step, image).

    ``explain_fn(model, images, targets) -> maps`` (``(B, 1, H, W)`` or ``(B, H, W)``), or the name
    of a method of ``study.attribution.explain``; the dict ``explain_options`` is passed on as
    keyword arguments either way (e.g. the explainer's own noise seed).
    ``layers`` are module names in top-down order (output layer first).

    * ``mode="cascading"``: step i randomises layers[0..i] cumulatively;
    * ``mode="independent"``: step i randomises only layers[i].

    With ``include_original=True`` step 0 explains an unrandomised copy ("none"): similarity 1 for
    a deterministic explainer. ``similarity`` picks columns from "spearman", "spearman_abs" (ranks
    of |map|) and "ssim" (:func:`spearman_similarity`, :func:`ssim` with ``ssim_window``).

    Columns: ``mode``, ``step``, ``layer`` (the layer randomised at this step), ``randomised``
    (every randomised layer, comma-separated), ``image`` and one column per similarity.
    """
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {list(_MODES)}")
    if init not in _INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {list(_INITS)}")
    if isinstance(similarity, str):
        similarity = (similarity,)
    similarity = tuple(similarity)
    unknown = [s for s in similarity if s not in _SIMILARITIES]
    if unknown or not similarity:
        raise ValueError(f"unknown similarity {unknown or similarity!r}; choose from {list(_SIMILARITIES)}")
    layers = _check_layers(model, layers)
    if not layers and not include_original:
        raise ValueError("nothing to compare: give layers to randomise or include_original=True")
    if explain_options is not None and not isinstance(explain_options, dict):
        raise ValueError("explain_options must be a dict of keyword arguments for the explainer")
    explain = _explainer(explain_fn, dict(explain_options or {}))

    def run(randomised_model: nn.Module) -> np.ndarray:
        maps, _ = _maps(explain(randomised_model, images, targets), "explain_fn output")
        return maps

    original = run(copy.deepcopy(model))
    frames = []

    def record(step: int, name: str, randomised: list[str], step_model: nn.Module) -> None:
        maps = run(step_model)
        if maps.shape != original.shape:
            raise ValueError(f"explain_fn returned maps of shape {maps.shape} at step {step}; expected {original.shape}")
        columns = {}
        for kind in similarity:
            if kind == "ssim":
                columns[kind] = ssim(original, maps, window_size=ssim_window)
            else:
                columns[kind] = spearman_similarity(original, maps, abs=kind == "spearman_abs")
        frames.append(
            pd.DataFrame(
                {
                    "mode": mode,
                    "step": step,
                    "layer": name,
                    "randomised": ",".join(randomised) if randomised else "none",
                    "image": np.arange(original.shape[0]),
                    **columns,
                }
            )
        )

    if include_original:
        record(0, "none", [], copy.deepcopy(model))
    cumulative = copy.deepcopy(model) if mode == "cascading" else None
    for index, name in enumerate(layers):
        if mode == "cascading":
            target = cumulative
            randomised = layers[: index + 1]
        else:
            target = copy.deepcopy(model)
            randomised = [name]
        _randomise_module(dict(target.named_modules())[name], _layer_seed(seed, index), init)
        record(index + 1, name, randomised, target)
    return pd.concat(frames, ignore_index=True)


_OPTIONS = ("init", "include_original", "ssim_window", "explain_options")


def _check_wrapper_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"unknown options {unknown}; accepted: {list(_OPTIONS)}")
    return options


def cascading_randomisation(
    model: nn.Module,
    images: torch.Tensor,
    targets,
    explain_fn: Callable | str,
    layers: Sequence[str],
    seed: int = 0,
    similarity: Sequence[str] = ("spearman", "ssim"),
    **options,
) -> pd.DataFrame:
    """Cascading randomisation: layers re-initialised cumulatively, top-down (Adebayo et al. 2018).

    ``options``: ``init``, ``include_original``, ``ssim_window``, ``explain_options`` (see
    :func:`parameter_randomisation`, which also documents the returned table); others raise.
    """
    return parameter_randomisation(
        model, images, targets, explain_fn, layers, seed=seed, similarity=similarity, mode="cascading",
        **_check_wrapper_options(options)
    )


def independent_randomisation(
    model: nn.Module,
    images: torch.Tensor,
    targets,
    explain_fn: Callable | str,
    layers: Sequence[str],
    seed: int = 0,
    similarity: Sequence[str] = ("spearman", "ssim"),
    **options,
) -> pd.DataFrame:
    """Independent randomisation: one layer at a time (Adebayo et al. 2018).

    ``options``: ``init``, ``include_original``, ``ssim_window``, ``explain_options`` (see
    :func:`parameter_randomisation`, which also documents the returned table); others raise.
    """
    return parameter_randomisation(
        model, images, targets, explain_fn, layers, seed=seed, similarity=similarity, mode="independent",
        **_check_wrapper_options(options)
    )
