"""Steps of notebooks/02_coherence_of_evaluation.ipynb: Vandersmissen & Oramas (CVIU 2024),
"On the coherency of quantitative evaluation of visual explanations" (protocol card
../shared/papers/vandersmissen2024.md).

The expensive step is `score_everything`: every map (six methods, the ground-truth box map, the
blurred / clipped / binarised IG and SmoothGrad maps and the four dummy maps) of every image is
graded by every metric, and the result is one long DataFrame (one row per architecture × image ×
map × metric) cached on disk, so that each analysis below is a pandas groupby.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from study import attribution, config, data, metrics, train
from study.models import ResNetLike, VGGLike

SECTION = "vandersmissen2024"
CACHE_VERSION = 1
ARCHITECTURES = {"vgg_like": VGGLike, "resnet_like": ResNetLike}
ARCH_LABELS = {"vgg_like": "VGG-like", "resnet_like": "ResNet-like", "vgg16": "VGG16", "resnet50": "ResNet50"}

METHODS = ("gradcam", "integrated_gradients", "smoothgrad", "lrp_alpha1beta0", "occlusion", "rise")
REFERENCE = "ground_truth"
MANIPULATED = ("integrated_gradients", "smoothgrad")
MANIPULATIONS = ("blur", "clip", "binarised")
DUMMIES = ("random", "sobel", "constant", "centre_gaussian")
LABELS = {"gradcam": "Grad-CAM", "integrated_gradients": "IG", "smoothgrad": "SmoothGrad",
          "lrp_alpha1beta0": "LRP-α1β0", "occlusion": "Occlusion", "rise": "RISE", "ground_truth": "GT box",
          "random": "random*", "sobel": "Sobel*", "constant": "constant*", "centre_gaussian": "centre Gauss*"}
for _base in MANIPULATED:
    for _m in MANIPULATIONS:
        LABELS[f"{_base}+{_m}"] = f"{LABELS[_base]} (+{_m})"

# (mode, baseline, step variant) of the Ins/Del curves: the six results folders of the authors'
# code (card §2 E2) plus insertion / blur / pixel (card §5.4).
CURVES = (("deletion", "zero", "pixel"), ("deletion", "zero", "region"), ("deletion", "uniform", "region"),
          ("deletion", "blur", "region"), ("insertion", "uniform", "region"), ("insertion", "blur", "region"),
          ("insertion", "blur", "pixel"))
CURVE_METRICS = tuple(f"{mode}_{baseline}_{variant}" for mode, baseline, variant in CURVES)
# metric -> (higher is better, binary per-image score)
METRICS = {
    **{name: (name.startswith("insertion"), False) for name in CURVE_METRICS},
    "average_drop": (False, False),
    "increase_confidence": (True, True),
    "average_drop_binarised": (False, False),
    "increase_confidence_binarised": (True, True),
    "pointing_game": (True, True),
}
HIGHER_IS_BETTER = {name: flags[0] for name, flags in METRICS.items()}
DESCRIPTORS = ("gini", "frac_below", "mean", "median", "q25", "q75")
SPARSE, COARSE = ("integrated_gradients", "smoothgrad"), ("gradcam", "occlusion", "rise")


# ----------------------------------------------------------------------------- data and models

def scale_settings(image_size: int) -> dict:
    """The card's 224-px settings scaled to the image side (§5.3 / §5.4): blur σ = 5·size/224 with an
    odd kernel 2·ceil(σ)+1 (5 at 64 px, 11 at 224), region patch 2·round(4·size/224)+1 (3 / 9),
    occlusion window 4 below 224 px and 8 at 224 (the card's two choices)."""
    sigma = 5.0 * image_size / 224
    return {"blur_sigma": sigma, "blur_kernel": 2 * math.ceil(sigma) + 1,
            "region_patch": 2 * round(4 * image_size / 224) + 1, "occlusion_window": 8 if image_size >= 224 else 4}


def prepare_synthetic(profile: str, seed: int, dataset: str = "synth_objects_64", **overrides) -> dict:
    """Train / test splits of the shapes generator at the profile's size, standardised with the
    train per-channel mean and std (so 0 in normalised space is the mean colour, card §5.1.10)."""
    s = config.settings(profile, SECTION, **overrides)
    splits = data.shapes_splits(seed, dataset, sizes={"train": s["n_train"], "test": s["n_test"]}, use_cache=True)
    mean, std = data.channel_stats(splits["train"]["images"])
    return {"settings": s, "dataset": dataset, "train": splits["train"], "test": splits["test"],
            "mean": mean, "std": std, "image_size": splits["train"]["images"].shape[-1],
            "num_classes": int(splits["train"]["labels"].max()) + 1}


def _standardised(arrays: dict, mean, std) -> dict:
    return {**arrays, "images": data.standardise(arrays["images"], mean, std)}


def train_models(prepared: dict, seed: int, device: str = "auto", architectures=tuple(ARCHITECTURES)) -> dict:
    """Train (or load from the cache) each architecture with Adam lr 1e-3, batch 64 (card §5.2)."""
    s, mean, std = prepared["settings"], prepared["mean"], prepared["std"]
    train_set = _standardised(prepared["train"], mean, std)
    test_loader = data.make_loader(_standardised(prepared["test"], mean, std), 256, shuffle=False, seed=seed)
    runs = {}
    for arch in architectures:
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")

        def build(arch=arch):
            config.seed_everything(seed)
            return channels_last(ARCHITECTURES[arch](in_channels=3, num_classes=prepared["num_classes"]))

        def fit(model):
            config.seed_everything(seed)
            loader = data.make_loader(train_set, batch_size=64, shuffle=True, seed=seed)
            return train.fit(model, loader, epochs=s["epochs"], lr=1e-3, device=device)

        params = {"arch": arch, "seed": seed, "dataset": prepared["dataset"], "n_train": s["n_train"],
                  "epochs": s["epochs"], "num_classes": prepared["num_classes"]}
        result = train.cached_fit(f"{SECTION}_{arch}", params, build, fit, device=device)
        runs[arch] = {"model": result.model.eval(), "test": train.evaluate(result.model, test_loader, device),
                      "history": pd.DataFrame(result.history), "from_cache": result.from_cache,
                      "model_key": train.cache_key(f"{SECTION}_{arch}", params)}
    return runs


def channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Keep weights and inputs channels-last (oneDNN's faster CPU convolutions, about 2.5× for
    training here); a forward pre-hook converts every input. Values are unchanged up to rounding."""
    model = model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(memory_format=torch.channels_last),
                                                            *args[1:]))
    return model


def supports_lrp(model: torch.nn.Module) -> bool:
    """LRP α1β0 is run only on sequential networks without batch norm (captum's LRP rules)."""
    try:
        attribution._lrp_layers(model)
    except ValueError:
        return False
    return True


def evaluation_set(prepared: dict, n_images: int) -> dict:
    """The first `n_images` test images: pixel and standardised images, labels (= targets, card Q3),
    boxes and the target-class box masks."""
    test = prepared["test"]
    n = min(int(n_images), len(test["labels"]))
    images = torch.as_tensor(np.asarray(test["images"][:n]), dtype=torch.float32)
    labels = torch.as_tensor(np.asarray(test["labels"][:n]), dtype=torch.long)
    boxes = [np.asarray(b) for b in test["boxes"][:n]]
    masks = attribution.boxes_to_masks(boxes, images.shape[-2], images.shape[-1], labels.tolist()) > 0
    return {"pixels": images, "images": data.standardise(images, prepared["mean"], prepared["std"]),
            "labels": labels, "boxes": boxes, "masks": masks}


def prepare_imagenet(profile: str, seed: int, data_root, class_list=None, n_classes: int = 100, resize: int = 256,
                     crop: int = 224, **overrides) -> dict:
    """The real-data path (card §6): ImageNet validation images with XML boxes under `data_root`,
    `n_classes` classes drawn with `seed` (or `class_list`) and ceil(n_images / n_classes) images
    per class, Resize(resize) → CenterCrop(crop) (the paper's 256 / 224), ImageNet mean/std
    normalisation."""
    from study import imagenet

    if data_root is None:
        raise ValueError("dataset='imagenet' needs data_root (a folder with the validation JPEGs and their XML files)")
    s = config.settings(profile, SECTION, **overrides)
    n_classes = len(class_list) if class_list is not None else n_classes
    arrays = imagenet.load_imagenet_boxes(data_root, n_classes=None if class_list is not None else n_classes,
                                          per_class=math.ceil(s["n_images"] / n_classes), class_list=class_list,
                                          seed=seed, resize=resize, crop=crop)
    return {"settings": s, "dataset": "imagenet", "train": None, "test": arrays, "class_list": arrays["class_list"],
            "mean": np.array(imagenet.IMAGENET_MEAN), "std": np.array(imagenet.IMAGENET_STD),
            "image_size": arrays["images"].shape[-1], "num_classes": len(arrays["wnids"])}


def imagenet_runs(prepared: dict, weights_path, arch: str, device: str = "auto") -> dict:
    """{arch: run} for a torchvision VGG16 or ResNet50 with weights from `weights_path`, with its
    accuracy on the chosen images; the cache key includes the file's size and modification time."""
    from study import imagenet

    model = imagenet.imagenet_model(arch, weights_path, config.get_device(device))
    stat = Path(weights_path).stat()
    evaluation = _standardised(prepared["test"], prepared["mean"], prepared["std"])
    loader = data.make_loader({k: evaluation[k] for k in ("images", "labels", "masks", "boxes", "group")}, 16,
                              shuffle=False, seed=0)
    key = f"{Path(weights_path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return {arch: {"model": model, "test": train.evaluate(model, loader, device), "history": pd.DataFrame(),
                   "from_cache": True, "model_key": key}}


def setup(profile: str, seed: int, dataset: str = "synth_objects_64", device: str = "auto", data_root=None,
          weights_path=None, imagenet_arch: str = "vgg16", class_list=None, **overrides) -> tuple[dict, dict]:
    """(prepared data, {arch: run}): the two synthetic-data models trained here, or a pretrained
    torchvision model on ImageNet validation images when dataset == "imagenet"."""
    if dataset == "imagenet":
        prepared = prepare_imagenet(profile, seed, data_root, class_list, **overrides)
        return prepared, imagenet_runs(prepared, weights_path, imagenet_arch, device)
    prepared = prepare_synthetic(profile, seed, dataset, **overrides)
    return prepared, train_models(prepared, seed, device)


def scale_table(prepared: dict, runs: dict) -> pd.DataFrame:
    """The scale of this run next to the paper's (card §2 E1, §5)."""
    s = prepared["settings"]
    synthetic = prepared["dataset"] != "imagenet"
    train_size = f"{s['n_train']} train × {s['epochs']} epochs" if synthetic else "pretrained"
    rows = [
        ("data", "ImageNet val, 100 classes × 50 = 5,000 images, 224 px",
         f"{prepared['dataset']}, {s['n_images']} test images, {prepared['image_size']} px"),
        ("models", "VGG16, ResNet50 (ImageNet-pretrained)",
         ", ".join(_arch_label(a) for a in runs) + f" ({train_size})"),
        ("test accuracy", "n/a", ", ".join(f"{_arch_label(a)} {r['test']['accuracy']:.2f}" for a, r in runs.items())),
        ("Ins/Del steps", "100", str(s["steps"])),
        ("IG steps", "50", str(s["ig_steps"])),
        ("SmoothGrad samples (σ = 0.1)", "10", str(s["smoothgrad_samples"])),
        ("RISE masks (7×7, p = 0.1)", "5,000", str(s["rise_masks"])),
        ("occlusion window", "8×8 at 224 px", f"{scale_settings(prepared['image_size'])['occlusion_window']} px"),
        ("region patch / blur", "9×9 / kernel 11, σ 5 at 224 px",
         "{region_patch}×{region_patch} / kernel {blur_kernel}, σ {blur_sigma:.2f}".format(
             **scale_settings(prepared["image_size"]))),
    ]
    return pd.DataFrame(rows, columns=["quantity", "paper", "this run"])


def quirk_choices(tie_break: str, rise_p: float) -> pd.DataFrame:
    """The card's quirks (§4) and the choice this run makes."""
    rows = [
        ("Q1 class sample", "seeded draw, class list printed (ImageNet path); synthetic: all K classes"),
        ("Q2 α on argsort", "primary: ordinal α on within-image ranks; secondary: interval α on the argsort"),
        ("Q3 target = label", "followed (also when misclassified); correct-only ranks reported too"),
        ("Q4 soft mask", "x_norm ⊙ s in normalised space (masked pixel = mean colour)"),
        ("Q5 ties in Ins/Del", f"tie_break = {tie_break!r} (raster = stable sort)"),
        ("Q6 RISE p", f"p = {rise_p}"),
        ("Q7 binarised Drop", "top 10% of the map = 1 (ties in raster order), i.e. s ≥ 90th percentile"),
        ("Q8 re-normalisation", "ReLU + min–max once more after blur / clip"),
        ("Q9 region steps", "overlapping patches around the next most-salient unremoved pixel; one pass per "
                            "1/steps of the area"),
        ("uniform baseline", "U(0,1) in pixel space, then standardised (card: unverified which space)"),
        ("LRP", "α1β0 on every Conv/Linear via captum (no zB first-layer rule); VGG-like only — captum's LRP "
                "has no rule for residual additions, so it is skipped for the ResNet-like"),
    ]
    return pd.DataFrame(rows, columns=["quirk", "choice in this run"])


# ----------------------------------------------------------------------------- maps

def method_plan(model, settings: dict, image_size: int, seed: int, rise_p: float = 0.1) -> dict:
    """explain() options per method at the card's small-scale settings (§5.3), raw (reduce=None);
    LRP only where `supports_lrp`."""
    scale = scale_settings(image_size)
    window = scale["occlusion_window"]
    plan = {
        "gradcam": {"layer": getattr(model, "gradcam_layer", None), "reduce": None},
        "integrated_gradients": {"baseline": "zero", "steps": settings["ig_steps"], "internal_batch_size": 256,
                                 "reduce": None},
        "smoothgrad": {"samples": settings["smoothgrad_samples"], "sigma": 0.1, "absolute": False, "seed": seed,
                       "reduce": None},
        "lrp_alpha1beta0": {"reduce": None},
        "occlusion": {"window": window, "stride": window, "baseline": "zero", "score": "softmax", "batch_size": 64,
                      "reduce": None},
        "rise": {"n_masks": settings["rise_masks"], "grid": 7, "p": rise_p, "seed": seed, "score": "softmax",
                 "batch_size": settings["batch_size"], "reduce": None},
    }
    if not supports_lrp(model):
        del plan["lrp_alpha1beta0"]
    return plan


def postprocessing(image_size: int) -> dict:
    """The card's post-processing (ReLU → channel mean → min–max) and the manipulations of §5.3,
    each followed by ReLU + min–max once more (Q8); binarised = top 10% (Q7)."""
    scale = scale_settings(image_size)
    base = attribution.PAPER_POSTPROCESSING[SECTION]
    again = ["positive_part", "normalise_minmax"]
    return {
        "base": base,
        "blur": [*base, ("gaussian_blur", {"sigma": scale["blur_sigma"], "kernel_size": scale["blur_kernel"]}),
                 *again],
        "clip": [*base, ("clip_percentile", {"q": 99}), *again],
        "binarised": [*base, ("binarise_top_k", {"fraction": 0.1})],
    }


def compute_maps(model, evaluation: dict, settings: dict, seed: int, rise_p: float = 0.1,
                 batch_size: int = 16, first_index: int = 0) -> dict[str, tuple[str, torch.Tensor]]:
    """{map name: (family, (B, 1, H, W) map in [0, 1])} with family "method", "reference",
    "variant" or "dummy" (the Stassin et al. 2023 extension). `first_index` is the index of the
    first image in the whole evaluation set (the random dummy depends on it, not on the chunk)."""
    images, labels = evaluation["images"], evaluation["labels"]
    size = images.shape[-1]
    steps = postprocessing(size)
    raw = attribution.explain_many(model, images, labels, method_plan(model, settings, size, seed, rise_p), batch_size)
    maps = {name: ("method", attribution.postprocess(raw[name], steps["base"])) for name in METHODS if name in raw}
    gt = attribution.explain(None, images, labels, REFERENCE, boxes=evaluation["boxes"], match_target=True)
    maps[REFERENCE] = ("reference", attribution.postprocess(gt, steps["base"]))
    for base in MANIPULATED:
        for manipulation in MANIPULATIONS:
            maps[f"{base}+{manipulation}"] = ("variant", attribution.postprocess(raw[base], steps[manipulation]))
    for dummy in DUMMIES:
        source = evaluation["pixels"] if dummy == "sobel" else images
        options = {"seed": seed, "first_index": first_index} if dummy == "random" else {}
        maps[dummy] = ("dummy", attribution.postprocess(attribution.explain(None, source, labels, dummy, **options),
                                                        steps["base"]))
    return maps


# ----------------------------------------------------------------------------- orderings

def _pixel_order(saliency: np.ndarray, tie_break: str, rng: np.random.Generator) -> np.ndarray:
    """Flat pixel indices, most salient first; ties in raster order (stable) or at random (Q5)."""
    if tie_break == "raster":
        return np.argsort(-saliency, kind="stable")
    return np.lexsort((rng.random(saliency.size), -saliency))


def _patch_members(height: int, width: int, patch: int) -> list[list[int]]:
    """For every pixel, the flat indices of the patch × patch square centred on it (clipped)."""
    half = patch // 2
    members = []
    for y in range(height):
        rows = range(max(0, y - half), min(height, y + half + 1))
        for x in range(width):
            members.append([r * width + c for r in rows for c in range(max(0, x - half), min(width, x + half + 1))])
    return members


def region_order(saliency: np.ndarray, patch: int, tie_break: str = "raster", seed: int = 0,
                 members: list[list[int]] | None = None) -> np.ndarray:
    """Removal order of the region variant (card E2 / Q9): walk the pixels by saliency and, at each
    pixel not yet removed, remove the patch × patch square centred on it (overlapping earlier
    squares, so only its new pixels count). Returns the flat pixel indices in removal order;
    one forward pass is then made per 1/steps of the image area."""
    saliency = np.asarray(saliency, np.float64)
    if saliency.ndim != 2:
        raise ValueError(f"saliency must be an (H, W) map, got shape {saliency.shape}")
    height, width = saliency.shape
    members = members or _patch_members(height, width, patch)
    removed = bytearray(height * width)
    order = []
    for pixel in _pixel_order(saliency.ravel(), tie_break, np.random.default_rng(seed)).tolist():
        if removed[pixel]:
            continue
        for member in members[pixel]:
            if not removed[member]:
                removed[member] = 1
                order.append(member)
    return np.asarray(order, np.int64)


def ordering_maps(maps: torch.Tensor, variant: str, patch: int, tie_break: str, seed: int) -> torch.Tensor:
    """Maps whose strictly decreasing values encode the removal order of `variant` ("pixel" or
    "region"), so that `metrics.perturbation_curve` (stable descending sort) follows it exactly."""
    if tie_break not in ("raster", "random"):
        raise ValueError(f"tie_break must be 'raster' or 'random', got {tie_break!r}")
    if variant not in ("pixel", "region"):
        raise ValueError(f"variant must be 'pixel' or 'region', got {variant!r}")
    b, _, h, w = maps.shape
    flat = maps.detach().cpu().double().reshape(b, h * w).numpy()
    members = _patch_members(h, w, patch) if variant == "region" else None
    out = np.empty((b, h * w), np.float32)
    for i in range(b):
        if variant == "pixel":
            order = _pixel_order(flat[i], tie_break, np.random.default_rng([seed, i]))
        else:
            order = region_order(flat[i].reshape(h, w), patch, tie_break, seed + i, members)
        out[i, order] = np.arange(h * w, 0, -1, dtype=np.float32)
    return torch.from_numpy(out).reshape(b, 1, h, w)


# ----------------------------------------------------------------------------- the expensive step

def baselines(evaluation: dict, image_size: int, seed: int, mean, std) -> dict[str, torch.Tensor | str]:
    """Ins/Del baselines in normalised space: zero (= the mean colour), U(0,1) noise drawn in pixel
    space and then standardised (one noise image per image, shared by all maps), Gaussian blur of
    the normalised image (card §5.4: σ ≈ 1.43, 5×5 at 64 px)."""
    scale = scale_settings(image_size)
    images = evaluation["images"]
    noise = torch.rand(evaluation["pixels"].shape, generator=torch.Generator().manual_seed(seed))
    return {"zero": "zero", "uniform": data.standardise(noise, mean, std).float(),
            "blur": attribution.gaussian_blur(images, scale["blur_sigma"], scale["blur_kernel"])}


def _grade(model, evaluation, maps, settings, seed, tie_break, mean, std, device, first_index=0):
    """Per-image scores of every map (a wide frame: map, image, one column per metric and
    descriptor) and the summed Ins/Del curves {(map, metric): (steps + 1,) sum over images}."""
    names = list(maps)
    n, size = len(evaluation["labels"]), evaluation["images"].shape[-1]
    stacked = torch.cat([maps[name][1].cpu() for name in names])
    repeat = len(names)
    images = evaluation["images"].repeat(repeat, 1, 1, 1).to(device)
    targets = evaluation["labels"].repeat(repeat).to(device)
    patch = scale_settings(size)["region_patch"]
    order = {variant: ordering_maps(stacked, variant, patch, tie_break, seed + first_index)
             for variant in ("pixel", "region")}
    base = baselines(evaluation, size, seed + first_index, mean, std)
    scores, curve_sums = {}, {}
    for (mode, baseline, variant), metric in zip(CURVES, CURVE_METRICS):
        replacement = base[baseline] if isinstance(base[baseline], str) else base[baseline].repeat(repeat, 1, 1, 1)
        curve = metrics.perturbation_curve(model, images, order[variant].to(device), targets, mode=mode,
                                           steps=settings["steps"], replacement=replacement, output="prob",
                                           batch_size=settings["batch_size"], seed=seed)
        scores[metric] = metrics.auc(curve).numpy()
        for j, name in enumerate(names):
            curve_sums[name, metric] = curve[j * n:(j + 1) * n].double().sum(0).numpy()
    for suffix, fraction in (("", None), ("_binarised", 0.1)):
        drop = metrics.average_drop_increase(model, images, stacked.to(device), targets, binarise=fraction,
                                             batch_size=settings["batch_size"])
        scores[f"average_drop{suffix}"] = drop["average_drop"].numpy()
        scores[f"increase_confidence{suffix}"] = drop["increase_in_confidence"].numpy()
    gt_masks = evaluation["masks"].repeat(repeat, 1, 1, 1)
    scores["pointing_game"] = metrics.pointing_game(stacked, gt_masks, ties="first").astype(np.float64)
    for key, values in metrics.sparsity_descriptors(stacked).items():
        scores[key] = np.asarray(values, np.float64)
    frame = pd.DataFrame({key: np.asarray(value, np.float64) for key, value in scores.items()})
    frame.insert(0, "map", np.repeat(names, n))
    frame.insert(1, "image", np.tile(np.arange(n), repeat))
    return frame, curve_sums


def _histograms(maps: dict, bins: int = 1000) -> dict[str, np.ndarray]:
    """Pixel-value histograms on [0, 1] of the maps of the methods and the reference."""
    return {name: np.histogram(values.numpy().ravel(), bins=bins, range=(0, 1))[0]
            for name, (family, values) in maps.items() if family in ("method", "reference")}


def _densities(histograms: dict[str, np.ndarray], bandwidth: float = 0.05, grid: int = 201) -> pd.DataFrame:
    """Gaussian KDE (bandwidth 0.05, card E4) of all pixel values of each map, on [0, 1], from a
    fine histogram convolved with the kernel."""
    x = np.linspace(0, 1, grid)
    rows = []
    for name, counts in histograms.items():
        edges = np.linspace(0, 1, len(counts) + 1)
        centres = (edges[:-1] + edges[1:]) / 2
        weights = stats.norm.pdf((x[:, None] - centres[None, :]) / bandwidth) / bandwidth
        density = weights @ counts / counts.sum()
        rows += [{"map": name, "value": float(v), "density": float(d)} for v, d in zip(x, density)]
    return pd.DataFrame(rows)


def _chunk(evaluation: dict, start: int, stop: int, device) -> dict:
    part = {key: value[start:stop] for key, value in evaluation.items()}
    return {**part, "images": part["images"].to(device), "labels": part["labels"].to(device)}


def grade_model(model, evaluation: dict, settings: dict, seed: int, tie_break: str, rise_p: float, mean, std,
                device, chunk: int = 32) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Maps and grades of one model, `chunk` images at a time: (wide scores, mean curves, densities)."""
    model = model.to(device).eval()
    frames, curve_sums, histograms = [], {}, {}
    n = len(evaluation["labels"])
    for start in range(0, n, chunk):
        part = _chunk(evaluation, start, min(start + chunk, n), device)
        with torch.no_grad():
            correct = (model(part["images"]).argmax(1) == part["labels"]).cpu().numpy()
        maps = compute_maps(model, part, settings, seed, rise_p, first_index=start)
        maps = {name: (family, m.cpu()) for name, (family, m) in maps.items()}
        cpu_part = {**part, "images": part["images"].cpu(), "labels": part["labels"].cpu()}
        frame, sums = _grade(model, cpu_part, maps, settings, seed, tie_break, mean, std, device, first_index=start)
        frame["image"] += start
        frame["correct"] = correct[frame["image"].to_numpy() - start]
        frame["family"] = frame["map"].map({name: family for name, (family, _) in maps.items()})
        frames.append(frame)
        for key, value in sums.items():
            curve_sums[key] = curve_sums.get(key, 0) + value
        for key, value in _histograms(maps).items():
            histograms[key] = histograms.get(key, 0) + value
    curves = pd.DataFrame([{"map": name, "metric": metric, "fraction": k / (len(total) - 1), "score": v / n}
                           for (name, metric), total in curve_sums.items() for k, v in enumerate(total)])
    return pd.concat(frames, ignore_index=True), curves, _densities(histograms)


@dataclass
class Evaluation:
    """`scores`: one row per (arch, image, map, metric) with columns arch, map, image, family,
    correct (prediction = label), metric, score, kind ("metric" or a sparsity "descriptor"),
    base_method, manipulation ("none", "blur", "clip", "binarised"); `curves`: mean Ins/Del
    curves per (arch, map, metric, fraction); `densities`: pixel-value KDE per (arch, map)."""

    scores: pd.DataFrame
    curves: pd.DataFrame
    densities: pd.DataFrame
    from_cache: bool = False


def _long(frame: pd.DataFrame, arch: str) -> pd.DataFrame:
    long = frame.melt(id_vars=["map", "image", "family", "correct"], var_name="metric", value_name="score")
    long.insert(0, "arch", arch)
    long["kind"] = np.where(long["metric"].isin(list(METRICS)), "metric", "descriptor")
    long["base_method"] = long["map"].str.split("+").str[0]
    long["manipulation"] = long["map"].str.split("+").str[1].fillna("none")
    return long


def _cache_paths(key_params: dict, cache_dir) -> dict[str, Path]:
    digest = hashlib.sha256(json.dumps(key_params, sort_keys=True, default=str).encode()).hexdigest()[:20]
    folder = Path(cache_dir or config.CACHE_DIR) / SECTION
    return {part: folder / f"scores-{digest}-{part}.csv.gz" for part in ("scores", "curves", "densities")}


def _atomic_csv(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        frame.to_csv(tmp, index=False, compression="gzip")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def score_everything(runs: dict, prepared: dict, seed: int, tie_break: str = "raster", rise_p: float = 0.1,
                     device: str = "auto", cache: bool = True, cache_dir=None) -> Evaluation:
    """Grade every map of the first n_images test images with every metric, for every model in
    `runs` ({arch: {"model", "model_key"}}). Cached on disk, keyed by every parameter that
    affects the numbers."""
    s = prepared["settings"]
    if tie_break not in ("raster", "random"):
        raise ValueError(f"tie_break must be 'raster' or 'random', got {tie_break!r}")
    key = {"version": CACHE_VERSION, "settings": s, "seed": seed, "tie_break": tie_break, "rise_p": rise_p,
           "dataset": prepared["dataset"], "models": {a: r["model_key"] for a, r in runs.items()},
           "torch": torch.__version__.split("+")[0]}
    paths = _cache_paths(key, cache_dir)
    if cache and all(p.is_file() for p in paths.values()):
        return Evaluation(*(pd.read_csv(paths[part]) for part in ("scores", "curves", "densities")), from_cache=True)
    device = config.get_device(device)
    evaluation = evaluation_set(prepared, s["n_images"])
    parts = {"scores": [], "curves": [], "densities": []}
    for arch, run in runs.items():
        frame, curves, densities = grade_model(run["model"], evaluation, s, seed, tie_break, rise_p,
                                               prepared["mean"], prepared["std"], device)
        parts["scores"].append(_long(frame, arch))
        parts["curves"].append(curves.assign(arch=arch))
        parts["densities"].append(densities.assign(arch=arch))
    result = Evaluation(*(pd.concat(parts[p], ignore_index=True) for p in ("scores", "curves", "densities")))
    if cache:
        for part in ("scores", "curves", "densities"):
            _atomic_csv(getattr(result, part), paths[part])
    return result


# ----------------------------------------------------------------------------- analyses (groupbys)

METRIC_LABELS = {
    "deletion_zero_pixel": "Del zero px", "deletion_zero_region": "Del zero reg", "deletion_uniform_region":
    "Del unif reg", "deletion_blur_region": "Del blur reg", "insertion_uniform_region": "Ins unif reg",
    "insertion_blur_region": "Ins blur reg", "insertion_blur_pixel": "Ins blur px", "average_drop": "Drop %",
    "increase_confidence": "Inc %", "average_drop_binarised": "Drop % (bin)",
    "increase_confidence_binarised": "Inc % (bin)", "pointing_game": "Pointing game"}
BINARY_METRICS = [name for name, (_, binary) in METRICS.items() if binary]
PAPER_FAMILIES = ("method", "reference")


def map_order(names) -> list[str]:
    """Methods in the card's order, then the reference, variants and dummies."""
    order = [*METHODS, REFERENCE, *(f"{b}+{m}" for b in MANIPULATED for m in MANIPULATIONS), *DUMMIES]
    return [name for name in order if name in set(names)]


def _metric_rows(scores: pd.DataFrame, families=PAPER_FAMILIES) -> pd.DataFrame:
    return scores[(scores["kind"] == "metric") & scores["family"].isin(families)]


def mean_scores(scores: pd.DataFrame, families=PAPER_FAMILIES) -> pd.DataFrame:
    """Mean score per (arch, metric) × map: AUCs in [0, 1]; Drop in %; Increase and pointing game
    as the fraction of images (× 100 = the papers' %)."""
    rows = _metric_rows(scores, families)
    table = rows.groupby(["arch", "metric", "map"], sort=False)["score"].mean().unstack("map")
    return table[map_order(table.columns)].reindex(list(METRICS), level="metric")


def method_ranks(means: pd.DataFrame) -> pd.DataFrame:
    """Rank of each map per (arch, metric) row of `mean_scores`: 1 = best (lower-is-better metrics
    reversed), ties share the best rank; maps missing for an arch (LRP on the ResNet) stay NaN."""
    sign = np.array([1.0 if HIGHER_IS_BETTER[m] else -1.0 for m in means.index.get_level_values("metric")])
    return means.mul(sign, axis=0).rank(axis=1, ascending=False, method="min")


def per_image(scores: pd.DataFrame, arch: str, metric: str, families=PAPER_FAMILIES) -> pd.DataFrame:
    """images × maps matrix of one metric for one architecture (maps present only)."""
    rows = _metric_rows(scores, families)
    rows = rows[(rows["arch"] == arch) & (rows["metric"] == metric)]
    matrix = rows.pivot(index="image", columns="map", values="score")
    return matrix[map_order(matrix.columns)]


def reliability(scores: pd.DataFrame, families=PAPER_FAMILIES) -> pd.DataFrame:
    """Krippendorff's α per (arch, metric) with every image a rater of the methods (card E5):
    primary = ordinal α on within-image ranks; "authors' code variant" (Q2) = interval α on the
    argsort output. NaN where α is undefined (every image ties every method)."""
    rows = []
    scores = _metric_rows(scores, families)
    for arch in scores["arch"].unique():
        for metric in METRICS:
            matrix = per_image(scores, arch, metric, families)
            entry = {"arch": arch, "metric": metric, "n_images": len(matrix), "n_maps": matrix.shape[1]}
            variants = (("alpha", "ordinal", "rank"), ("alpha_authors_variant", "interval", "argsort"))
            for column, level, ranking in variants:
                try:
                    entry[column] = metrics.krippendorff_alpha(matrix.to_numpy(), level=level, ranking=ranking,
                                                               higher_is_better=HIGHER_IS_BETTER[metric])
                except ValueError:
                    entry[column] = float("nan")
            rows.append(entry)
    table = pd.DataFrame(rows)
    alpha = table["alpha"]
    table["reading"] = np.select([alpha.isna(), alpha >= metrics.KRIPPENDORFF_RELIABLE,
                                  alpha >= metrics.KRIPPENDORFF_TENTATIVE], ["undefined", "reliable", "tentative"],
                                 "unreliable")
    return table


def correlation_matrix(wide: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Card E5 correlations between the columns (metrics) of an images × metrics frame, vectorised:
    lower-is-better metrics flipped to 1 − x; Spearman (Pearson of ranks) for two continuous
    metrics, point-biserial (Pearson with the raw continuous score) for a binary one, Pearson (phi)
    for two binary ones — the definitions of `metrics.metric_correlation_matrix` (cross-checked in
    the tests), without its per-pair overhead. Returns (r, kind) matrices; columns must vary."""
    names = list(wide.columns)
    values = wide.to_numpy(np.float64)
    values = np.where([HIGHER_IS_BETTER[m] for m in names], values, 1.0 - values)
    binary = np.array([m in BINARY_METRICS for m in names])
    with np.errstate(invalid="ignore", divide="ignore"):
        raw = np.corrcoef(values, rowvar=False)
        ranked = np.corrcoef(stats.rankdata(values, axis=0), rowvar=False)
    both_continuous = ~binary[:, None] & ~binary[None, :]
    r = np.where(both_continuous, ranked, raw)
    kind = np.where(both_continuous, "spearman", np.where(binary[:, None] & binary[None, :], "pearson (phi)",
                                                           "point-biserial")).astype(object)
    np.fill_diagonal(r, 1.0)
    np.fill_diagonal(kind, "identity")
    return r, kind


def metric_correlations(scores: pd.DataFrame, families=PAPER_FAMILIES) -> pd.DataFrame:
    """Per (arch, map): the correlation across images of every pair of metrics (Spearman;
    point-biserial with a binary metric; Pearson = phi for two binary ones), after flipping the
    lower-is-better metrics to 1 − x (card E5). Metrics constant over the images of a map have no
    defined correlation and are left out. Long format: arch, map, metric_a, metric_b, r, correlation."""
    rows = []
    for (arch, name), group in _metric_rows(scores, families).groupby(["arch", "map"], sort=False):
        wide = group.pivot(index="image", columns="metric", values="score")
        varying = [m for m in METRICS if m in wide and wide[m].nunique() > 1]
        if len(varying) < 2 or len(wide) < 3:
            continue
        r, kind = correlation_matrix(wide[varying])
        a, b = np.meshgrid(np.arange(len(varying)), np.arange(len(varying)), indexing="ij")
        rows.append(pd.DataFrame({"arch": arch, "map": name, "metric_a": np.array(varying)[a.ravel()],
                                  "metric_b": np.array(varying)[b.ravel()], "r": r.ravel(),
                                  "correlation": kind.ravel()}))
    return pd.concat(rows, ignore_index=True)


def correlation_summary(correlations: pd.DataFrame) -> pd.DataFrame:
    """Per arch: median |r| of the pointing game with the other metrics vs among the other metrics,
    and the share of sign-aligned correlations below −0.1 (opposing notions)."""
    pairs = correlations[correlations["metric_a"] < correlations["metric_b"]].copy()
    pairs["with_pg"] = (pairs["metric_a"] == "pointing_game") | (pairs["metric_b"] == "pointing_game")
    return pairs.groupby("arch", sort=False).apply(lambda g: pd.Series({
        "median_abs_r_pointing_game": g.loc[g["with_pg"], "r"].abs().median(),
        "median_abs_r_other_pairs": g.loc[~g["with_pg"], "r"].abs().median(),
        "share_negative": float((g["r"] < -0.1).mean()),
        "n_pairs": len(g)}), include_groups=False).reset_index()


def kendall_tau_matrix(table: pd.DataFrame) -> np.ndarray:
    """Kendall τ-b between the rows of a (metrics × methods) table, vectorised over all method pairs."""
    x = table.to_numpy(np.float64)
    i, j = np.triu_indices(x.shape[1], k=1)
    signs = np.sign(x[:, i] - x[:, j])
    counts = (signs != 0).sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (signs @ signs.T) / np.sqrt(np.outer(counts, counts))


def ranking_agreement(means: pd.DataFrame) -> pd.DataFrame:
    """Project extra (card E5): Kendall τ-b between the method rankings of every pair of metrics,
    per arch (sign-aligned mean scores; NaN when a metric ties every method). Long format: arch,
    metric_a, metric_b, tau."""
    rows = []
    for arch, table in means.groupby(level="arch", sort=False):
        table = table.droplevel("arch").dropna(axis=1, how="all")
        sign = np.array([1.0 if HIGHER_IS_BETTER[m] else -1.0 for m in table.index])
        tau = kendall_tau_matrix(table.mul(sign, axis=0))
        names = np.array(table.index)
        a, b = np.meshgrid(np.arange(len(names)), np.arange(len(names)), indexing="ij")
        rows.append(pd.DataFrame({"arch": arch, "metric_a": names[a.ravel()], "metric_b": names[b.ravel()],
                                  "tau": tau.ravel()}))
    return pd.concat(rows, ignore_index=True)


def sparsity_table(scores: pd.DataFrame, families=PAPER_FAMILIES) -> pd.DataFrame:
    """Per (arch, map): the mean over images of each sparsity descriptor (card E4, §5.4)."""
    rows = scores[(scores["kind"] == "descriptor") & scores["family"].isin(families)]
    table = rows.groupby(["arch", "map", "metric"], sort=False)["score"].mean().unstack("metric")
    return table[list(DESCRIPTORS)]


def sparsity_vs_grades(scores: pd.DataFrame, grades=("average_drop", "insertion_blur_region", "deletion_zero_pixel"),
                       families=PAPER_FAMILIES) -> pd.DataFrame:
    """Spearman ρ, over all (image, method) pairs of an arch, between the Gini index of a map and
    its grade (card §5.5.5); raw grades, not sign-aligned."""
    rows = scores[scores["family"].isin(families)]
    wide = rows.pivot_table(index=["arch", "map", "image"], columns="metric", values="score")
    out = []
    for arch, group in wide.groupby(level="arch", sort=False):
        for grade in grades:
            rho = {key: float(stats.spearmanr(group[key], group[grade]).statistic) for key in ("gini", "frac_below")}
            out.append({"arch": arch, "grade": grade, "rho_gini": rho["gini"], "rho_frac_below": rho["frac_below"]})
    return pd.DataFrame(out)


def grade_shift(scores: pd.DataFrame) -> pd.DataFrame:
    """How IG's and SmoothGrad's grade and rank move when the map is blurred, clipped at the 99th
    percentile or binarised (card E4 / §5.5.6). `delta` is sign-aligned (positive = graded
    better); rank 1 = best among the paper's maps, with the variant taking the original's place;
    `rank_change` > 0 = moved up."""
    means = mean_scores(scores, families=("method", "reference", "variant"))
    rows = []
    for (arch, metric), row in means.iterrows():
        sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
        paper = [m for m in map_order(row.dropna().index) if m in METHODS or m == REFERENCE]
        for base in MANIPULATED:
            others = [m for m in paper if m != base]

            def rank_of(name):  # 1 + the number of maps graded strictly better (ties share the best rank)
                return 1 + int((sign * row[others].to_numpy() > sign * row[name]).sum())

            for manipulation in MANIPULATIONS:
                variant = f"{base}+{manipulation}"
                rows.append({"arch": arch, "metric": metric, "method": base, "manipulation": manipulation,
                             "original": row[base], "manipulated": row[variant],
                             "delta": sign * (row[variant] - row[base]), "rank_original": rank_of(base),
                             "rank_manipulated": rank_of(variant)})
    table = pd.DataFrame(rows)
    table["rank_change"] = table["rank_original"] - table["rank_manipulated"]
    return table


def dummy_ranks(scores: pd.DataFrame) -> pd.DataFrame:
    """Ranks (1 = best) of the methods, the reference and the four dummy maps per (arch, metric):
    the Stassin et al. 2023 extension, not part of Vandersmissen & Oramas."""
    return method_ranks(mean_scores(scores, families=("method", "reference", "dummy")))


def drop_gaps(means: pd.DataFrame) -> pd.DataFrame:
    """Average Drop (%) of the sparse gradient maps (IG, SmoothGrad) minus that of the coarse maps
    (Grad-CAM, occlusion, RISE), soft and binarised (card §5.6)."""
    rows = []
    for arch in means.index.get_level_values("arch").unique():
        entry = {"arch": arch}
        for metric in ("average_drop", "average_drop_binarised"):
            row = means.loc[(arch, metric)]
            entry[f"gap_{metric}"] = float(row[list(SPARSE)].mean() - row[list(COARSE)].mean())
        rows.append(entry)
    return pd.DataFrame(rows)


def winners(ranks: pd.DataFrame) -> pd.DataFrame:
    """The map(s) ranked first on each metric: metric × arch, names joined by " = " on ties."""
    best = ranks.apply(lambda row: " = ".join(_label(m) for m in row.index[row == 1]), axis=1)
    table = best.unstack("arch")
    table.index = [METRIC_LABELS[m] for m in table.index]
    return table.rename(columns=_arch_label)


def correct_only_ranks(scores: pd.DataFrame) -> pd.DataFrame:
    """Method ranks on the images the model classifies correctly (card Q3's second report)."""
    return method_ranks(mean_scores(scores[scores["correct"].astype(bool)]))


# ----------------------------------------------------------------------------- figures

def _label(name: str) -> str:
    return LABELS.get(name, name)


def _arch_label(arch: str) -> str:
    return ARCH_LABELS.get(arch, arch)


def figure_curves(curves: pd.DataFrame):
    """Mean deletion / insertion curves of the paper's maps: one panel per (arch, curve)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    table = curves[curves["map"].isin([*METHODS, REFERENCE])]
    archs = list(table["arch"].unique())
    fig, axes = plt.subplots(len(archs), len(CURVE_METRICS), figsize=(2.5 * len(CURVE_METRICS), 2.5 * len(archs)),
                             sharex=True, sharey="row", squeeze=False)
    colours = dict(zip([*METHODS, REFERENCE], sns.color_palette("tab10", len(METHODS) + 1)))
    for (arch, metric, name), part in table.groupby(["arch", "metric", "map"], sort=False):
        ax = axes[archs.index(arch), CURVE_METRICS.index(metric)]
        ax.plot(part["fraction"], part["score"], color=colours[name], label=_label(name),
                linestyle="--" if name == REFERENCE else "-", linewidth=1.2)
    for i, arch in enumerate(archs):
        for j, metric in enumerate(CURVE_METRICS):
            axes[i, j].set_title(f"{_arch_label(arch)}: {METRIC_LABELS[metric]}", fontsize=8)
            axes[i, j].tick_params(labelsize=7)
        axes[i, 0].set_ylabel("p(target class)", fontsize=8)
    for j in range(len(CURVE_METRICS)):
        axes[-1, j].set_xlabel("fraction perturbed", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, -0.05))
    fig.tight_layout()
    return fig, table


def display_scores(means: pd.DataFrame) -> pd.DataFrame:
    """Increase and pointing game as % (× 100) for reading; AUCs and Drop % as they are."""
    scale = np.array([100.0 if m in BINARY_METRICS else 1.0 for m in means.index.get_level_values("metric")])
    return means.mul(scale, axis=0)


def _annotations(values: pd.DataFrame) -> np.ndarray:
    """Cell texts: AUCs with 3 decimals, percentages with 1, ranks as integers; blank for NaN."""
    metric_names = list(values.index)
    text = np.empty(values.shape, dtype=object)
    for i, metric in enumerate(metric_names):
        for j, value in enumerate(values.iloc[i]):
            fmt = "{:.3f}" if metric in CURVE_METRICS else "{:.1f}"
            text[i, j] = "" if pd.isna(value) else fmt.format(value)
    return text


def _heat(ax, values: pd.DataFrame, colour: pd.DataFrame, fmt: str, cmap: str, title: str, **kwargs):
    import seaborn as sns

    annot = _annotations(values) if fmt == "auto" else values.to_numpy()
    sns.heatmap(colour, annot=annot, fmt="" if fmt == "auto" else fmt, cmap=cmap, cbar=False, ax=ax,
                annot_kws={"fontsize": 7}, **kwargs)
    ax.set_title(title, fontsize=9)
    ax.set_xticklabels([_label(t.get_text()) for t in ax.get_xticklabels()], rotation=45, ha="right", fontsize=7)
    ax.set_yticklabels([METRIC_LABELS.get(t.get_text(), t.get_text()) for t in ax.get_yticklabels()], rotation=0,
                       fontsize=7)
    ax.set_xlabel("")
    ax.set_ylabel("")


def figure_scores(means: pd.DataFrame):
    """Metric × method mean scores (annotated; Inc and PG in %), coloured by rank (dark = best)."""
    import matplotlib.pyplot as plt

    ranks = method_ranks(means)
    archs = list(means.index.get_level_values("arch").unique())
    fig, axes = plt.subplots(1, len(archs), figsize=(5.2 * len(archs), 4.6), squeeze=False)
    shown = display_scores(means)
    for ax, arch in zip(axes[0], archs):
        _heat(ax, shown.loc[arch], -ranks.loc[arch], "auto", "viridis", f"{_arch_label(arch)}: mean score "
              "(colour: rank, bright = best)")
    fig.tight_layout()
    return fig, shown.reset_index()


def figure_ranks(ranks: pd.DataFrame, title: str = "rank (1 = best)"):
    """Rank heat map per arch (1 = best)."""
    import matplotlib.pyplot as plt

    archs = list(ranks.index.get_level_values("arch").unique())
    width = 0.55 * ranks.shape[1] + 2
    fig, axes = plt.subplots(1, len(archs), figsize=(width * len(archs), 4.6), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        table = ranks.loc[arch]
        _heat(ax, table, table, ".0f", "viridis_r", f"{_arch_label(arch)}: {title}", vmin=1, vmax=ranks.shape[1])
    fig.tight_layout()
    return fig, ranks.reset_index()


def figure_correlations(correlations: pd.DataFrame):
    """Sign-aligned metric-vs-metric correlation matrices across images, one per (arch, method);
    blank = a metric constant over the images of that method."""
    import matplotlib.pyplot as plt

    archs = list(correlations["arch"].unique())
    names = map_order(correlations["map"].unique())
    labels = [METRIC_LABELS[m] for m in METRICS]
    fig, axes = plt.subplots(len(archs), len(names), figsize=(2.2 * len(names) + 1, 2.3 * len(archs) + 1.2),
                             squeeze=False, layout="constrained")
    image = None
    present = {(a, m) for a, m in correlations[["arch", "map"]].itertuples(index=False)}
    for i, arch in enumerate(archs):
        for j, name in enumerate(names):
            ax = axes[i, j]
            part = correlations[(correlations["arch"] == arch) & (correlations["map"] == name)]
            if part.empty:
                ax.axis("off")
                continue
            last = not any((a, name) in present for a in archs[i + 1:])
            ax.set_title(f"{_arch_label(arch)}: {_label(name)}", fontsize=8)
            ax.set_xticks(range(len(labels)), labels if last else [], rotation=90, fontsize=6)
            ax.set_yticks(range(len(labels)), labels if j == 0 else [], fontsize=6)
            ax.grid(False)
            matrix = part.pivot(index="metric_a", columns="metric_b", values="r").reindex(index=list(METRICS),
                                                                                          columns=list(METRICS))
            image = ax.imshow(matrix.to_numpy(), vmin=-1, vmax=1, cmap="coolwarm")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.5, label="r (sign-aligned)")
    return fig, correlations


def figure_density(densities: pd.DataFrame):
    """KDE (bandwidth 0.05) of the post-processed relevance values per method (card E4)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    table = densities[densities["map"].isin(METHODS)].copy()
    table["method"] = table["map"].map(_label)
    archs = list(table["arch"].unique())
    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs), 3.6), squeeze=False, sharey=True)
    palette = dict(zip([_label(m) for m in (*METHODS, REFERENCE)], sns.color_palette("tab10", len(METHODS) + 1)))
    for ax, arch in zip(axes[0], archs):
        sns.lineplot(table[table["arch"] == arch], x="value", y="density", hue="method", palette=palette, ax=ax)
        ax.set_yscale("log")
        ax.set_ylim(1e-3, None)
        ax.set_title(f"{_arch_label(arch)}: relevance values after ReLU + min–max", fontsize=9)
        ax.set_xlabel("relevance value")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, table.drop(columns="method")


def figure_grade_shift(shift: pd.DataFrame):
    """Rank change (annotated; > 0 = moved up) of IG / SmoothGrad under blur, clip and binarise."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    archs = list(shift["arch"].unique())
    fig, axes = plt.subplots(1, len(archs), figsize=(6.2 * len(archs), 3.6), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        part = shift[shift["arch"] == arch].copy()
        part["variant"] = part["method"].map(_label) + " +" + part["manipulation"]
        rows = [f"{_label(b)} +{m}" for b in MANIPULATED for m in MANIPULATIONS]
        matrix = part.pivot(index="variant", columns="metric", values="rank_change").reindex(index=rows,
                                                                                           columns=list(METRICS))
        sns.heatmap(matrix.rename(columns=METRIC_LABELS), annot=True, fmt=".0f", cmap="coolwarm_r", center=0,
                    vmin=-6, vmax=6, ax=ax, cbar=False, annot_kws={"fontsize": 7})
        ax.set_title(f"{_arch_label(arch)}: rank change when the map is manipulated (+ = up)", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("")
        ax.set_ylabel("")
    fig.tight_layout()
    return fig, shift


def figure_examples(model, evaluation: dict, settings: dict, seed: int, n: int = 3, rise_p: float = 0.1):
    """The image with its target box and every method's / reference's post-processed map for the
    first `n` evaluation images."""
    import matplotlib.pyplot as plt

    from study import plots

    part = {key: value[:n] for key, value in evaluation.items()}
    device = next(model.parameters()).device
    maps = compute_maps(model, {**part, "images": part["images"].to(device), "labels": part["labels"].to(device)},
                        settings, seed, rise_p)
    names = [name for name in map_order(maps) if maps[name][0] in ("method", "reference", "variant")]
    fig, axes = plt.subplots(n, len(names) + 1, figsize=(1.25 * (len(names) + 1), 1.35 * n), squeeze=False)
    rows = []
    for i in range(n):
        plots.show_image(axes[i, 0], part["pixels"][i].numpy())
        plots.outline_mask_and_boxes(axes[i, 0], None, part["boxes"][i])
        for j, name in enumerate(names, start=1):
            saliency = maps[name][1][i, 0].cpu().numpy()
            plots.show_map(axes[i, j], saliency)
            rows.append({"image": i, "map": name, "mean": float(saliency.mean()), "max_row": int(saliency.argmax() //
                         saliency.shape[1]), "max_col": int(saliency.argmax() % saliency.shape[1])})
            if i == 0:
                axes[0, j].set_title(_label(name).replace(" (+", "\n(+"), fontsize=6)
    fig.tight_layout()
    return fig, pd.DataFrame(rows)


# ----------------------------------------------------------------------------- findings

def analyse(evaluation: Evaluation) -> dict[str, pd.DataFrame]:
    """Every table of the notebook from the long score table (each a groupby of it)."""
    scores = evaluation.scores
    means = mean_scores(scores)
    correlations = metric_correlations(scores)
    return {
        "means": means, "ranks": method_ranks(means), "reliability": reliability(scores),
        "correlations": correlations, "correlation_summary": correlation_summary(correlations),
        "agreement": ranking_agreement(means), "sparsity": sparsity_table(scores),
        "sparsity_vs_grades": sparsity_vs_grades(scores), "shift": grade_shift(scores),
        "dummy_ranks": dummy_ranks(scores), "drop_gaps": drop_gaps(means),
        "correct_only_ranks": correct_only_ranks(scores),
    }


def _per_arch(values: dict, fmt: str) -> str:
    return "; ".join(f"{_arch_label(a)} {fmt.format(v)}" for a, v in values.items())


def _coherence(t: dict) -> dict:
    rel, agreement = t["reliability"], t["agreement"]
    low = rel.dropna(subset=["alpha"]).groupby("arch", sort=False)["alpha"].apply(
        lambda a: float((a < metrics.KRIPPENDORFF_TENTATIVE).mean()))
    pairs = agreement[agreement["metric_a"] < agreement["metric_b"]]
    mean_tau = pairs.groupby("arch", sort=False)["tau"].mean()
    return {"claim": "Some metrics grade explanations without coherency [abstract]",
            "paper": "n/a (claim only; no number available)",
            "this_run": f"share of metrics whose per-image rankings have ordinal α < 0.667: "
                        f"{_per_arch(low.to_dict(), '{:.2f}')}; mean Kendall τ between metrics' method rankings: "
                        f"{_per_arch(mean_tau.to_dict(), '{:.2f}')}",
            "verdict": findings_verdict(bool((low > 0.5).all()), bool((low > 0.5).any()))}


def _sparsity_sways(t: dict) -> dict:
    shift = t["shift"]
    blur = shift[shift["manipulation"] == "blur"]
    drop = blur[blur["metric"] == "average_drop"]
    curves = blur[blur["metric"].isin(["insertion_blur_region", "deletion_zero_region"])]
    moved = float((shift["rank_change"] != 0).mean())
    drop_text = "; ".join(f"{_arch_label(r.arch)} {_label(r.method)} {r.original:.0f} → {r.manipulated:.0f}"
                          for r in drop.itertuples())
    passed = [bool((drop["delta"] > 0).all()), moved >= 0.25]
    return {"claim": "Characteristics of the maps (sparsity, coarseness) sway their grades [abstract]",
            "paper": "n/a (claim only; no number available)",
            "this_run": f"blurring (no new model information) changes the soft Drop %: {drop_text}; it improves Ins "
                        f"(blur, region) and Del (zero, region) in {(curves['delta'] > 0).mean():.0%} of "
                        f"{len(curves)} cases; blur/clip/binarise move the method's rank in {moved:.0%} of the "
                        "(arch, method, manipulation, metric) cells",
            "verdict": findings_verdict(all(passed), any(passed))}


def _opposing(t: dict) -> dict:
    agreement, summary = t["agreement"], t["correlation_summary"].set_index("arch")
    pairs = agreement[agreement["metric_a"] < agreement["metric_b"]]
    min_tau = pairs.groupby("arch", sort=False)["tau"].min()
    negative = summary["share_negative"]
    return {"claim": "Metrics capture distinct, sometimes opposing notions of quality [summary]",
            "paper": "n/a (claim only; no number available)",
            "this_run": "lowest Kendall τ between two metrics' method rankings: "
                        f"{_per_arch(min_tau.to_dict(), '{:.2f}')}; "
                        f"share of per-image correlations < −0.1 after sign alignment: "
                        f"{_per_arch(negative.to_dict(), '{:.2f}')}",
            "verdict": findings_verdict(bool((min_tau < 0).all()), bool((min_tau < 0).any() or (negative > 0).any()))}


def _pointing_game(t: dict) -> dict:
    summary = t["correlation_summary"].set_index("arch")
    pg, other = summary["median_abs_r_pointing_game"], summary["median_abs_r_other_pairs"]
    weak = bool((pg < 0.3).all())
    return {"claim": "The pointing game correlates only weakly with the other metrics [summary]",
            "paper": "n/a (claim only; no number available)",
            "this_run": f"median |r| with the pointing game: {_per_arch(pg.to_dict(), '{:.2f}')}; "
                        f"among the other metrics: {_per_arch(other.to_dict(), '{:.2f}')}",
            "verdict": findings_verdict(weak and bool((pg <= other).all()), weak or bool((pg <= other).all()))}


def _binarising(t: dict) -> dict:
    gaps = t["drop_gaps"].set_index("arch")
    soft, binary = gaps["gap_average_drop"], gaps["gap_average_drop_binarised"]
    shrinks = (soft > 0) & (binary.abs() < 0.5 * soft.abs())
    return {"claim": "Soft Average Drop penalises sparse maps; binarising removes most of the gap [summary; "
                     "card §3 mechanics, unverified]",
            "paper": "n/a (claim only; no number available)",
            "this_run": "Drop % of IG/SmoothGrad minus Grad-CAM/occlusion/RISE, soft: "
                        f"{_per_arch(soft.to_dict(), '{:+.1f}')}; "
                        f"binarised: {_per_arch(binary.to_dict(), '{:+.1f}')}",
            "verdict": findings_verdict(bool(shrinks.all()), bool((binary.abs() < soft.abs()).any()))}


def _reference(t: dict) -> dict:
    ranks = t["ranks"]
    pg = ranks.xs("pointing_game", level="metric")[REFERENCE]
    deletion = ranks.xs("deletion_zero_pixel", level="metric")[REFERENCE]
    return {"claim": "The GT-box map wins the pointing game but need not win deletion [card §3, unverified]",
            "paper": "n/a (expectation from the metric mechanics)",
            "this_run": f"GT-box rank on the pointing game: {_per_arch(pg.to_dict(), '{:.0f}')}; "
                        f"on Del (zero, pixel): {_per_arch(deletion.to_dict(), '{:.0f}')} (1 = best)",
            "verdict": findings_verdict(bool((pg == 1).all()), bool((pg == 1).any()))}


def _baseline(t: dict) -> dict:
    agreement = t["agreement"]
    groups = [["deletion_zero_region", "deletion_uniform_region", "deletion_blur_region"],
              ["insertion_uniform_region", "insertion_blur_region"]]
    rows = pd.concat([agreement[agreement["metric_a"].isin(g) & agreement["metric_b"].isin(g) &
                                (agreement["metric_a"] < agreement["metric_b"])] for g in groups])
    lowest = rows.groupby("arch", sort=False)["tau"].min()
    return {"claim": "The Ins/Del baseline can reorder the methods [card §5.6, unverified]",
            "paper": "n/a (expectation)",
            "this_run": f"lowest Kendall τ between the rankings of the same curve with different baselines: "
                        f"{_per_arch(lowest.to_dict(), '{:.2f}')}",
            "verdict": findings_verdict(bool((lowest < 1).all()), bool((lowest < 1).any()))}


def _dummies(t: dict) -> dict:
    ranks = t["dummy_ranks"]
    real = [m for m in METHODS if m in ranks]
    beats = (ranks[list(DUMMIES)].min(axis=1) < ranks[real].max(axis=1)).groupby(level="arch", sort=False).mean()
    return {"claim": "Dummy maps (random, Sobel, constant, centre Gaussian) outrank real methods on some metrics "
                     "[Stassin et al. 2023 extension, not this paper]",
            "paper": "n/a (Stassin et al. abstract; no number)",
            "this_run": f"share of metrics on which a dummy beats at least one real method: "
                        f"{_per_arch(beats.to_dict(), '{:.2f}')}",
            "verdict": findings_verdict(bool((beats > 0).all()), bool((beats > 0).any()))}


def findings_verdict(passed: bool, partly: bool) -> str:
    from study.findings import verdict

    return verdict(bool(passed), partly=bool(partly))


def findings(tables: dict) -> list[dict]:
    """The Findings rows, every verdict computed from this run's tables."""
    return [step(tables) for step in (_coherence, _sparsity_sways, _opposing, _pointing_game, _binarising,
                                      _reference, _baseline, _dummies)]


def save_and_show(fig, table: pd.DataFrame, figures_dir, name: str):
    """Save the figure (PNG + CSV via study.plots.save_figure), close it, and return the saved PNG
    for display, so a notebook renders each figure once instead of twice."""
    import matplotlib.pyplot as plt
    from IPython.display import Image

    from study.plots import save_figure

    path = save_figure(fig, table, figures_dir, name)
    plt.close(fig)
    return Image(filename=str(path))
