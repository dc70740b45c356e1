"""Steps of notebooks/02_coherence_of_evaluation.ipynb: Vandersmissen & Oramas (CVIU 2024),
"On the coherency of quantitative evaluation of visual explanations" (protocol card
../shared/papers/vandersmissen2024.md).

The expensive step is `score_everything`: every map (six methods, the ground-truth box map, the
blurred / clipped / binarised IG and SmoothGrad maps and the four dummy maps) of every image is
graded by every metric, and the result is one long DataFrame (one row per architecture × image ×
map × metric) cached on disk, so that each analysis below is a pandas groupby.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm

from study import attribution, config, data, metrics, train
from study import cache as disk_cache
from study.models import ResNetLike, VGGLike

SECTION = "vandersmissen2024"
CACHE_VERSION = 3  # 2: LRP through zennit, now also on the ResNet-like; 3: zB on its first layer (card)
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
    return {"settings": s, "dataset": dataset, "data_seed": seed, "train": splits["train"], "test": splits["test"],
            "dropped_no_target_box": 0, "mean": mean, "std": std, "image_size": splits["train"]["images"].shape[-1],
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

        params = model_params(prepared, arch, seed)
        result = train.cached_fit(f"{SECTION}_{arch}", params, build, fit, device=device)
        runs[arch] = {"model": result.model.eval(), "test": train.evaluate(result.model, test_loader, device),
                      "history": pd.DataFrame(result.history), "from_cache": result.from_cache,
                      "model_key": train.model_key(f"{SECTION}_{arch}", params)}
    return runs


def model_params(prepared: dict, arch: str, seed: int) -> dict:
    """The cache key parameters of `arch` trained with `seed` on the training set of `prepared`,
    which `score_replicates` draws with another seed than the models' (so both seeds are in it)."""
    s = prepared["settings"]
    return {"arch": arch, "seed": seed, "data_seed": prepared["data_seed"], "dataset": prepared["dataset"],
            "n_train": s["n_train"], "epochs": s["epochs"], "num_classes": prepared["num_classes"], "version": 1}


def channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Keep weights and inputs channels-last (oneDNN's faster CPU convolutions, about 2.5× for
    training here); a forward pre-hook converts every input. Values are unchanged up to rounding."""
    model = model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(memory_format=torch.channels_last),
                                                            *args[1:]))
    return model


def supports_lrp(model: torch.nn.Module) -> bool:
    """Whether `study.attribution`'s LRP (zennit) can explain `model`; LRP α1β0 is skipped where it cannot."""
    try:
        attribution._lrp_layers(model)
    except ValueError:
        return False
    return True


def evaluation_set(prepared: dict, n_images: int, first_image: int = 0) -> dict:
    """`n_images` test images from index `first_image` on (the images of one trained model: model k
    of `score_replicates` grades images k·n … (k+1)·n − 1): pixel and standardised images, labels (= targets, card Q3),
    boxes and the target-class box masks. An image without a target-class box is left out (the
    loaders already drop and count them in `prepared["dropped_no_target_box"]`; this guards other
    sources of data). Data without boxes (`prepared["localisation"]` False: an image folder without
    XML files) keep every image and have `masks` None: the localisation metrics are skipped."""
    test = prepared["test"]
    if isinstance(first_image, bool) or not isinstance(first_image, (int, np.integer)) or first_image < 0:
        raise ValueError(f"first_image must be a non-negative integer, got {first_image!r}")
    if first_image >= len(test["labels"]):
        raise ValueError(f"first_image {first_image} is past the {len(test['labels'])} test images")
    part = slice(int(first_image), int(first_image) + int(n_images))
    images = torch.as_tensor(np.asarray(test["images"][part]), dtype=torch.float32)
    labels = torch.as_tensor(np.asarray(test["labels"][part]), dtype=torch.long)
    boxes = [np.asarray(b) for b in test["boxes"][part]]
    n = len(labels)
    if not prepared.get("localisation", True):
        return {"pixels": images, "images": data.standardise(images, prepared["mean"], prepared["std"]),
                "labels": labels, "boxes": boxes, "masks": None, **_input_range(prepared, len(images))}
    masks = attribution.boxes_to_masks(boxes, images.shape[-2], images.shape[-1], labels.tolist()) > 0
    keep = masks.flatten(1).any(dim=1)  # no target-class box in the image: the pointing game is undefined
    if not bool(keep.any()):
        raise ValueError(f"none of the {n} test images from index {first_image} on has a target-class box")
    if not bool(keep.all()):
        images, labels, masks = images[keep], labels[keep], masks[keep]
        boxes = [b for b, k in zip(boxes, keep.tolist()) if k]
    return {"pixels": images, "images": data.standardise(images, prepared["mean"], prepared["std"]),
            "labels": labels, "boxes": boxes, "masks": masks, **_input_range(prepared, len(images))}


def _input_range(prepared: dict, n: int) -> dict:
    """The lowest and highest standardised value of each channel ([0, 1] pixels through the
    normalisation), (n, C, 1, 1) like the images so that chunks slice them alike: the bounds of the
    zB rule on the first layer (card §3 LRP)."""
    channels = np.asarray(prepared["test"]["images"]).shape[1]
    ends = [data.standardise(torch.full((1, channels, 1, 1), value), prepared["mean"], prepared["std"]).expand(n, -1, -1, -1)
            for value in (0.0, 1.0)]
    return {"input_low": ends[0].clone(), "input_high": ends[1].clone()}


def prepare_imagenet(profile: str, seed: int, data_root, class_list=None, n_classes: int = 100, resize: int = 256,
                     crop: int = 224, mean=None, std=None, **overrides) -> dict:
    """The real-data path (card §6): ImageNet validation images with XML boxes under `data_root`,
    `n_classes` classes drawn with `seed` (or `class_list`) and ceil(n_images / n_classes) images
    per class, Resize(resize) → CenterCrop(crop) (the paper's 256 / 224), ImageNet mean/std
    normalisation. Images whose target-class boxes all fall outside the crop are dropped (the
    pointing game and the GT-box map need one) and counted in `dropped_no_target_box`. `mean` /
    `std`: the normalisation (None: ImageNet's)."""
    from study import imagenet

    if data_root is None:
        raise ValueError("dataset='imagenet' needs data_root (a folder with the validation JPEGs and their XML files)")
    s = config.settings(profile, SECTION, **overrides)
    n_classes = len(class_list) if class_list is not None else n_classes
    arrays = imagenet.load_imagenet_boxes(data_root, n_classes=None if class_list is not None else n_classes,
                                          per_class=math.ceil(s["n_images"] / n_classes), class_list=class_list,
                                          seed=seed, resize=resize, crop=crop, require_target_box=True)
    mean = imagenet.IMAGENET_MEAN if mean is None else mean
    std = imagenet.IMAGENET_STD if std is None else std
    return {"settings": s, "dataset": "imagenet", "train": None, "test": arrays, "class_list": arrays["class_list"],
            "dropped_no_target_box": arrays["dropped_no_target_box"], "localisation": True,
            "mean": np.array(mean, np.float64), "std": np.array(std, np.float64),
            "image_size": arrays["images"].shape[-1], "num_classes": len(arrays["wnids"]),
            "classes_from": "the ImageNet path has 1,000 classes",
            "data_key": f"{disk_cache.file_key(Path(data_root) / f for f in arrays['files'])}:{resize}:{crop}:"
                        f"{list(np.round(mean, 6))}:{list(np.round(std, 6))}"}


def prepare_folder(profile: str, seed: int, data_root, model: str, image_size: int | None = None, mean=None, std=None,
                   **overrides) -> dict:
    """Your own images (`dataset="folder"`): an ImageFolder tree under `data_root` (class
    sub-folders; optional Pascal-VOC XML boxes beside the images), the first
    ceil(n_images / classes) images of each class, resized, cropped and normalised as `model`
    expects (`imagenet.input_settings`: the architecture's torchvision preset, or `image_size`,
    `mean`, `std`). Without any XML file `localisation` is False and the pointing game and the
    GT-box map are skipped; with XML files, the images without a box of their class are dropped and
    counted in `dropped_no_target_box`."""
    from study import imagenet

    geometry = imagenet.input_settings(imagenet.check_folder_inputs(data_root, model), image_size, mean, std)
    s = config.settings(profile, SECTION, **overrides)
    arrays = imagenet.load_image_folder(data_root, n_images=s["n_images"], resize=geometry["resize"],
                                        crop=geometry["crop"])
    return {"settings": s, "dataset": "folder", "train": None, "test": arrays, "classes": arrays["classes"],
            "dropped_no_target_box": arrays["dropped_no_target_box"], "localisation": arrays["localisation"],
            "mean": np.array(geometry["mean"]), "std": np.array(geometry["std"]), "image_size": geometry["crop"],
            "num_classes": len(arrays["classes"]), "geometry": geometry,
            "classes_from": f"data_root has {len(arrays['classes'])} class folders",
            "data_key": f"{arrays['data_key']}:{geometry['mean']}:{geometry['std']}"}


def torchvision_runs(prepared: dict, weights_path, model: str, device: str = "auto") -> dict:
    """{model: run} for the torchvision classification architecture `model` with the state dict in
    `weights_path` (`imagenet.torchvision_model`: its outputs must match `prepared["num_classes"]`),
    with its accuracy on the chosen images; the cache key includes the architecture and the file's
    size and modification time."""
    from study import imagenet

    net = imagenet.torchvision_model(model, weights_path, prepared["num_classes"], config.get_device(device),
                                     image_size=prepared["image_size"], classes_from=prepared.get("classes_from"))
    stat = Path(weights_path).expanduser().stat()
    evaluation = _standardised(prepared["test"], prepared["mean"], prepared["std"])
    loader = data.make_loader({k: evaluation[k] for k in ("images", "labels")}, 16, shuffle=False, seed=0)
    key = f"{model}:{Path(weights_path).expanduser().resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return {model: {"model": net, "test": train.evaluate(net, loader, device), "history": pd.DataFrame(),
                    "from_cache": True, "model_key": key}}


def imagenet_runs(prepared: dict, weights_path, arch: str, device: str = "auto") -> dict:
    """`torchvision_runs` under its former name (the ImageNet path's VGG16 or ResNet50)."""
    return torchvision_runs(prepared, weights_path, arch, device)


def setup(profile: str, seed: int, dataset: str = "synth_objects_64", device: str = "auto", data_root=None,
          weights_path=None, model: str | None = None, image_size: int | None = None, mean=None, std=None,
          class_list=None, imagenet_arch: str | None = None, **overrides) -> tuple[dict, dict]:
    """(prepared data, {arch: run}).

    * a synthetic `dataset` (a key of `data.SHAPES_CONFIGS`): the notebook's VGG-like and
      ResNet-like, trained here (`model` and `weights_path` must be None);
    * `dataset="imagenet"`: ImageNet validation images with their XML boxes under `data_root` and
      the torchvision `model` (default "vgg16"; `imagenet_arch` is its former name) with 1,000
      outputs from `weights_path`;
    * `dataset="folder"`: your own ImageFolder tree under `data_root` (optional VOC XML boxes) and
      your torchvision `model` from `weights_path`, one output per class folder.

    Resize, crop and normalisation follow `model`'s torchvision preset unless `image_size`, `mean`
    or `std` are given. Bad input is a ValueError naming the parameter."""
    from study import imagenet

    if imagenet_arch is not None:
        if model is not None and model != imagenet_arch:
            raise ValueError(f"imagenet_arch is the former name of model; got both model={model!r} and "
                             f"imagenet_arch={imagenet_arch!r}")
        model = imagenet_arch
    if dataset in ("imagenet", "folder"):
        model = (imagenet.check_folder_inputs(data_root, model) if dataset == "folder"
                 else imagenet.check_architecture("vgg16" if model is None else model))
        if dataset == "imagenet":
            geometry = imagenet.input_settings(model, image_size, mean, std)
            prepared = prepare_imagenet(profile, seed, data_root, class_list, resize=geometry["resize"],
                                        crop=geometry["crop"], mean=geometry["mean"], std=geometry["std"], **overrides)
        else:
            prepared = prepare_folder(profile, seed, data_root, model, image_size, mean, std, **overrides)
        return prepared, torchvision_runs(prepared, weights_path, model, device)
    if model is not None or weights_path is not None:
        raise ValueError(f"model and weights_path apply to dataset='folder' (your images) or 'imagenet'; the "
                         f"synthetic dataset {dataset!r} trains the notebook's own models (got model={model!r}, "
                         f"weights_path={weights_path!r})")
    if image_size is not None or mean is not None or std is not None:
        raise ValueError("image_size, mean and std apply to dataset='folder' or 'imagenet'; the synthetic datasets "
                         "have their own size and are standardised with their training set's statistics")
    prepared = prepare_synthetic(profile, seed, dataset, **overrides)
    return prepared, train_models(prepared, seed, device)


def scale_table(prepared: dict, runs: dict) -> pd.DataFrame:
    """The scale of this run next to the paper's (card §2 E1, §5)."""
    s = prepared["settings"]
    synthetic = prepared.get("train") is not None
    train_size = f"{s['n_train']} train × {s['epochs']} epochs" if synthetic else "weights from weights_path"
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
    if not prepared.get("localisation", True):
        rows.append(("localisation (pointing game, GT-box map)", "computed from the ImageNet boxes",
                     "skipped: no bounding boxes (no Pascal-VOC XML beside the images)"))
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
        ("LRP", "the card's rule via zennit: zB on the first layer (bounds: the standardised range of [0, 1] "
                "pixels), α1β0 on every other Conv/Linear (BatchNorm merged into the preceding layer, residual "
                "sums split in proportion to the branches), both models (`deep_taylor`)"),
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
    plan = method_plan(model, settings, size, seed, rise_p)
    lrp = plan.pop("lrp_alpha1beta0", None)
    raw = attribution.explain_many(model, images, labels, plan, batch_size)
    if lrp is not None:  # the card's LRP: α1β0 (= z⁺) everywhere but zB on the first layer, i.e. Deep Taylor
        if "input_low" not in evaluation or "input_high" not in evaluation:
            raise ValueError("the evaluation set needs input_low / input_high (the standardised range of the "
                             "pixels) for LRP's zB first-layer rule; build it with evaluation_set")
        bounds = {"low": evaluation["input_low"][:1].to(images.device), "high": evaluation["input_high"][:1].to(images.device)}
        raw["lrp_alpha1beta0"] = attribution.explain_many(model, images, labels, {"deep_taylor": {**lrp, **bounds}},
                                                          batch_size)["deep_taylor"]
    maps = {name: ("method", attribution.postprocess(raw[name], steps["base"])) for name in METHODS if name in raw}
    if evaluation.get("masks") is not None:  # no boxes: no GT-box map
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
    if evaluation["masks"] is not None:  # no boxes: no pointing game
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
    part = {key: None if value is None else value[start:stop] for key, value in evaluation.items()}
    return {**part, "images": part["images"].to(device), "labels": part["labels"].to(device)}


def grade_model(model, evaluation: dict, settings: dict, seed: int, tie_break: str, rise_p: float, mean, std,
                device, chunk: int = 32) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Maps and grades of one model, `chunk` images at a time: (wide scores, mean curves, densities)."""
    model = model.to(device).eval()
    frames, curve_sums, histograms = [], {}, {}
    n = len(evaluation["labels"])
    for start in tqdm(range(0, n, chunk), desc="grading", disable=not train.progress_enabled(), leave=False):
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
    return {part: disk_cache.path(SECTION, f"scores-{part}", key_params, ".csv.gz", cache_dir)
            for part in ("scores", "curves", "densities")}


def score_everything(runs: dict, prepared: dict, seed: int, tie_break: str = "raster", rise_p: float = 0.1,
                     device: str = "auto", cache: bool = True, cache_dir=None, first_image: int = 0) -> Evaluation:
    """Grade every map of n_images test images (from index `first_image` on) with every metric, for
    every model in `runs` ({arch: {"model", "model_key"}}). Cached on disk, keyed by every parameter
    that affects the numbers."""
    s = prepared["settings"]
    if tie_break not in ("raster", "random"):
        raise ValueError(f"tie_break must be 'raster' or 'random', got {tie_break!r}")
    # n_models says how many models are graded, not how one is: it stays out of the key
    key = {"version": CACHE_VERSION, "settings": {k: v for k, v in s.items() if k != "n_models"}, "seed": seed,
           "tie_break": tie_break, "rise_p": rise_p, "dataset": prepared["dataset"],
           "models": {a: r["model_key"] for a, r in runs.items()}}
    if first_image:
        key["first_image"] = int(first_image)
    if prepared.get("data_key"):  # data on disk (folder, ImageNet): the files, geometry and normalisation
        key["data"] = prepared["data_key"]
    paths = _cache_paths(key, cache_dir)
    if cache and all(p.is_file() for p in paths.values()):
        return Evaluation(*(pd.read_csv(paths[part]) for part in ("scores", "curves", "densities")), from_cache=True)
    device = config.get_device(device)
    evaluation = evaluation_set(prepared, s["n_images"], first_image)
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
            frame = getattr(result, part)
            disk_cache.atomic_write(paths[part], lambda tmp, frame=frame: frame.to_csv(tmp, index=False, compression="gzip"))
    return result


def score_replicates(prepared: dict, seed: int, tie_break: str = "raster", rise_p: float = 0.1,
                     device: str = "auto", cache: bool = True, cache_dir=None) -> list[Evaluation]:
    """The other trained models behind the verdicts: for k = 1 … n_models − 1, both architectures
    trained again with seed `seed + k` on the same training set and graded on their own test
    images k·n_images … (k+1)·n_images − 1, so that the models' verdict statistics are independent
    draws of (training run, images). Empty for a given model (ImageNet, your folder: nothing to
    retrain) or n_models = 1."""
    s = prepared["settings"]
    n_models = s.get("n_models", 1)
    if isinstance(n_models, bool) or not isinstance(n_models, (int, np.integer)) or n_models < 1:
        raise ValueError(f"n_models must be a positive integer, got {n_models!r}")
    if prepared.get("train") is None or n_models == 1:
        return []
    needed = n_models * s["n_images"]
    if needed > len(prepared["test"]["labels"]):
        raise ValueError(f"n_models={n_models} models × n_images={s['n_images']} need {needed} test images; the "
                         f"test split has {len(prepared['test']['labels'])} (raise n_test)")
    replicates = []
    for k in range(1, n_models):
        runs = train_models(prepared, seed + k, device)
        replicates.append(score_everything(runs, prepared, seed + k, tie_break, rise_p, device, cache, cache_dir,
                                           first_image=k * s["n_images"]))
    return replicates


# ----------------------------------------------------------------------------- analyses (groupbys)

METRIC_LABELS = {
    "deletion_zero_pixel": "Del zero px", "deletion_zero_region": "Del zero reg", "deletion_uniform_region":
    "Del unif reg", "deletion_blur_region": "Del blur reg", "insertion_uniform_region": "Ins unif reg",
    "insertion_blur_region": "Ins blur reg", "insertion_blur_pixel": "Ins blur px", "average_drop": "Drop %",
    "increase_confidence": "Inc %", "average_drop_binarised": "Drop % (bin)",
    "increase_confidence_binarised": "Inc % (bin)", "pointing_game": "Pointing game"}
BINARY_METRICS = [name for name, (_, binary) in METRICS.items() if binary]
PAPER_FAMILIES = ("method", "reference")


def present_metrics(scores: pd.DataFrame) -> list[str]:
    """The metrics of METRICS that `scores` holds (no pointing game without boxes), in METRICS order."""
    held = set(scores["metric"].unique())
    return [m for m in METRICS if m in held]


def localised(scores: pd.DataFrame) -> bool:
    """Whether the run computed the localisation metrics (the pointing game and the GT-box map):
    False for images without bounding boxes."""
    return "pointing_game" in set(scores["metric"].unique())


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
    primary = ordinal α on within-image ranks, with its 95% jackknife interval over images
    (`alpha_interval`: alpha_low, alpha_high); "authors' code variant" (Q2) = interval α on the
    argsort output. NaN where α is undefined (every image ties every method)."""
    rows = []
    scores = _metric_rows(scores, families)
    for arch in scores["arch"].unique():
        for metric in present_metrics(scores[scores["arch"] == arch]):
            matrix = per_image(scores, arch, metric, families)
            entry = {"arch": arch, "metric": metric, "n_images": len(matrix), "n_maps": matrix.shape[1]}
            try:
                entry["alpha"], entry["alpha_low"], entry["alpha_high"] = alpha_interval(
                    matrix.to_numpy(), HIGHER_IS_BETTER[metric])
            except ValueError:
                entry["alpha"] = entry["alpha_low"] = entry["alpha_high"] = float("nan")
            try:
                entry["alpha_authors_variant"] = metrics.krippendorff_alpha(
                    matrix.to_numpy(), level="interval", ranking="argsort", higher_is_better=HIGHER_IS_BETTER[metric])
            except ValueError:
                entry["alpha_authors_variant"] = float("nan")
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
    return _correlation_core(wide.to_numpy(np.float64), list(wide.columns))


def _aligned_values(values: np.ndarray, names) -> np.ndarray:
    """Lower-is-better metrics flipped to 1 − x (card E5)."""
    return np.where([HIGHER_IS_BETTER[m] for m in names], values, 1.0 - values)


def _correlation_core(values: np.ndarray, names) -> tuple[np.ndarray, np.ndarray]:
    values = _aligned_values(values, names)
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


def metric_correlations(scores: pd.DataFrame, families=PAPER_FAMILIES, level: float = 0.95) -> pd.DataFrame:
    """Per (arch, map): the correlation across images of every pair of metrics (Spearman;
    point-biserial with a binary metric; Pearson = phi for two binary ones), after flipping the
    lower-is-better metrics to 1 − x (card E5), with its `level` confidence interval
    (`findings.correlation_interval`: Fisher z, with Spearman's SE for Spearman). Metrics constant over
    the images of a map have no defined correlation and are left out. Long format: arch, map,
    metric_a, metric_b, r, r_low, r_high, correlation."""
    from study.findings import correlation_interval

    rows = []
    for (arch, name), group in _metric_rows(scores, families).groupby(["arch", "map"], sort=False):
        wide = group.pivot(index="image", columns="metric", values="score")
        varying = [m for m in METRICS if m in wide and wide[m].nunique() > 1]
        if len(varying) < 2 or len(wide) < 3:
            continue
        r, kind = correlation_matrix(wide[varying])
        low, high = np.ones_like(r), np.ones_like(r)
        for i in range(len(varying)):
            for j in range(i + 1, len(varying)):
                if len(wide) > 3:
                    low[i, j], high[i, j] = correlation_interval(r[i, j], len(wide), level,
                                                                 spearman=kind[i, j] == "spearman")
                else:  # Fisher's interval needs n > 3
                    low[i, j], high[i, j] = -1.0, 1.0
                low[j, i], high[j, i] = low[i, j], high[i, j]
        a, b = np.meshgrid(np.arange(len(varying)), np.arange(len(varying)), indexing="ij")
        rows.append(pd.DataFrame({"arch": arch, "map": name, "metric_a": np.array(varying)[a.ravel()],
                                  "metric_b": np.array(varying)[b.ravel()], "r": r.ravel(), "r_low": low.ravel(),
                                  "r_high": high.ravel(), "correlation": kind.ravel()}))
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
    x = np.asarray(table, dtype=np.float64)
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


def alpha_interval(matrix, higher_is_better: bool = True, level: float = 0.95) -> tuple[float, float, float]:
    """Ordinal Krippendorff α of an (images × maps) score matrix on within-image ranks, and its
    `level` jackknife interval over the images (the raters): α without image i for every i,
    pseudo-values n·α − (n − 1)·α₍₋ᵢ₎, and the t interval of their mean
    (`scipy.stats.ttest_1samp`, via `study.findings.mean_interval`). Leaving raters out never
    duplicates one; a bootstrap over images would copy raters, whose perfect agreement with their
    copies biases α upward. A leave-one-out α that is undefined (all ties) is dropped.
    Returns (α, low, high)."""
    from study.findings import mean_interval

    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 3 or a.shape[1] < 2:
        raise ValueError(f"alpha_interval needs an (images ≥ 3) × (maps ≥ 2) matrix; got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("alpha_interval got NaN or Inf scores; every map needs a score on every image")
    alpha = metrics.krippendorff_alpha(a, level="ordinal", higher_is_better=higher_is_better)
    n = a.shape[0]
    pseudo = []
    for i in range(n):
        try:
            left_out = metrics.krippendorff_alpha(np.delete(a, i, axis=0), level="ordinal",
                                                  higher_is_better=higher_is_better)
        except ValueError:
            continue
        pseudo.append(n * alpha - (n - 1) * left_out)
    if len(pseudo) < 2:
        return alpha, float("nan"), float("nan")
    _, low, high = mean_interval(pseudo, level, "t")
    return float(alpha), float(low), float(high)


def sparsity_vs_grades(scores: pd.DataFrame, grades=("average_drop", "insertion_blur_region", "deletion_zero_pixel"),
                       descriptors=("gini", "frac_below"), maps=METHODS) -> pd.DataFrame:
    """Within each method (card §5.5.5): Spearman ρ over the images of one (arch, map) between a
    sparsity descriptor of the map and its grade (raw grades, not sign-aligned), so that the
    differences between methods do not enter. Long format: arch, map, grade, descriptor, rho,
    n_images; ρ is NaN where either is constant over the images."""
    rows = scores[scores["map"].isin(list(maps))]
    if rows.empty:
        raise ValueError(f"no scores for the maps {list(maps)}")
    wide = rows.pivot_table(index=["arch", "map", "image"], columns="metric", values="score")
    out = []
    for (arch, name), group in wide.groupby(level=["arch", "map"], sort=False):
        for grade in grades:
            for key in descriptors:
                x, y = group[key].to_numpy(), group[grade].to_numpy()
                constant = len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0
                rho = float("nan") if constant else float(stats.spearmanr(x, y).statistic)
                out.append({"arch": arch, "map": name, "grade": grade, "descriptor": key, "rho": rho,
                            "n_images": len(x)})
    return pd.DataFrame(out)


def sparsity_grade_summary(within: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per (arch, grade, descriptor): the mean over methods of the within-method ρ of
    `sparsity_vs_grades`, with its `level` t interval over the methods (NaN ρ dropped)."""
    from study.findings import mean_interval

    out = []
    for (arch, grade, key), group in within.groupby(["arch", "grade", "descriptor"], sort=False):
        rho = group["rho"].dropna()
        mean, low, high = mean_interval(rho, level, "t") if len(rho) else (float("nan"),) * 3
        out.append({"arch": arch, "grade": grade, "descriptor": key, "mean_rho": mean, "low": low, "high": high,
                    "n_methods": len(rho)})
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


# ----------------------------------------------------------------------------- uncertainty

LEVEL = 0.95
N_BOOT = 1000
BASELINE_GROUPS = (("deletion_zero_region", "deletion_uniform_region", "deletion_blur_region"),
                   ("insertion_uniform_region", "insertion_blur_region"))


def metric_cube(scores: pd.DataFrame, arch: str, families=PAPER_FAMILIES) -> tuple[np.ndarray, list[str], list[str]]:
    """One arch's scores as an (images × metrics × maps) array, metrics in METRICS order and maps in
    `map_order`; maps without scores for this arch (LRP on the ResNet-like) are left out."""
    rows = _metric_rows(scores, families)
    rows = rows[rows["arch"] == arch]
    if rows.empty:
        raise ValueError(f"no metric scores for arch {arch!r}")
    table = rows.pivot_table(index="image", columns=["metric", "map"], values="score")
    names = [m for m in METRICS if m in set(rows["metric"])]
    maps = map_order(rows["map"].unique())
    cube = np.stack([table[m].reindex(columns=maps).to_numpy(np.float64) for m in names], axis=1)
    return cube, names, maps


OPPOSING_PAIR = ("deletion_zero_pixel", "average_drop")  # fixed before the test (card §5.6: pixel vs soft mask)
BASELINE_PAIRS = tuple((a, b) for group in BASELINE_GROUPS for k, a in enumerate(group) for b in group[k + 1:])


def method_reversals(cubes: list[np.ndarray], names: list[str], maps: list[str], metric_pairs,
                     level: float = LEVEL) -> pd.DataFrame:
    """Whether two metrics (or one curve under two baselines) order a pair of methods oppositely.

    For each metric pair (a, b) in `metric_pairs` and each map pair (i, j): the per-image differences
    s(i) − s(j), sign-aligned so that higher is better, under a and under b, over the images of every
    model in `cubes` (each (images × metrics × maps), as `metric_cube`; the models' images pooled, so
    the test is conditional on the trained models), with t intervals at the Bonferroni level
    1 − (1 − level) / m for the m comparisons. `reversed`: the two intervals lie on opposite sides
    of 0 (an intersection–union test, family-wise error at most 1 − level); `point_reversed`: the two
    mean differences have opposite signs; `models_agreeing`: the models whose own two mean
    differences have the signs of the pooled ones."""
    from study.findings import mean_interval

    if not cubes or any(np.ndim(c) != 3 or np.shape(c)[1:] != (len(names), len(maps)) for c in cubes):
        raise ValueError(f"method_reversals needs one (images × {len(names)} metrics × {len(maps)} maps) array per "
                         f"model; got shapes {[np.shape(c) for c in cubes]}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    unknown = sorted({m for pair in metric_pairs for m in pair} - set(names))
    if unknown or not metric_pairs or len(maps) < 2:
        raise ValueError(f"method_reversals needs metric pairs of {names} and at least two maps; "
                         f"unknown {unknown}, {len(metric_pairs)} pairs, maps {maps}")
    signs = np.array([1.0 if HIGHER_IS_BETTER[m] else -1.0 for m in names])
    aligned = [np.asarray(c, float) * signs[None, :, None] for c in cubes]
    map_pairs = [(i, j) for i in range(len(maps)) for j in range(i + 1, len(maps))]
    corrected = 1 - (1 - level) / (len(metric_pairs) * len(map_pairs))
    rows = []
    for a, b in metric_pairs:
        ia, ib = names.index(a), names.index(b)
        for i, j in map_pairs:
            per_model = [(c[:, ia, i] - c[:, ia, j], c[:, ib, i] - c[:, ib, j]) for c in aligned]
            row = {"metric_a": a, "metric_b": b, "map_i": maps[i], "map_j": maps[j]}
            for side, k in (("a", 0), ("b", 1)):
                values = np.concatenate([pair[k] for pair in per_model])
                row[f"mean_{side}"], row[f"low_{side}"], row[f"high_{side}"] = mean_interval(values, corrected, "t")
            signs_ab = np.sign([row["mean_a"], row["mean_b"]])
            row["reversed"] = bool((row["low_a"] > 0 and row["high_b"] < 0) or (row["high_a"] < 0 and row["low_b"] > 0))
            row["point_reversed"] = bool(signs_ab[0] * signs_ab[1] < 0)
            row["models_agreeing"] = int(sum(np.array_equal(np.sign([np.nanmean(x), np.nanmean(y)]), signs_ab)
                                             for x, y in per_model))
            rows.append(row)
    table = pd.DataFrame(rows)
    return table.assign(n_images=sum(len(c) for c in cubes), n_models=len(cubes), comparisons=len(table),
                        level=corrected)


def reversal_table(model_scores: list[pd.DataFrame], metric_pairs, level: float = LEVEL) -> pd.DataFrame:
    """`method_reversals` per architecture over the real methods (the GT box and the dummies are
    references, not methods) of every model's scores (each model its own images)."""
    tables = []
    for arch in dict.fromkeys(model_scores[0]["arch"]):
        cubes = [metric_cube(scores, arch, families=("method",)) for scores in model_scores]
        names, maps = cubes[0][1], cubes[0][2]
        if any(c[1] != names or c[2] != maps for c in cubes):
            raise ValueError(f"the models' scores of {arch} have different metrics or maps")
        pairs = [pair for pair in metric_pairs if set(pair) <= set(names)]
        tables.append(method_reversals([c[0] for c in cubes], names, maps, pairs, level).assign(arch=arch))
    return pd.concat(tables, ignore_index=True)


def _tau_statistics(cube: np.ndarray, names: list[str]):
    """statistic(indices) -> [mean τ, min τ, min τ between baselines, τ of every metric pair]."""
    signs = np.array([1.0 if HIGHER_IS_BETTER[m] else -1.0 for m in names])
    upper = np.triu_indices(len(names), k=1)
    position = {m: k for k, m in enumerate(names)}
    baseline_pairs = [(position[a], position[b]) for group in BASELINE_GROUPS for a in group for b in group
                      if a < b and a in position and b in position]

    def statistic(index):
        tau = kendall_tau_matrix(cube[index].mean(axis=0) * signs[:, None])
        pairs = tau[upper]
        between = np.array([tau[a, b] for a, b in baseline_pairs]) if baseline_pairs else np.array([np.nan])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN, as wanted
            summary = [np.nanmean(pairs), np.nanmin(pairs), np.nanmin(between)]
        return np.concatenate([summary, pairs])

    return statistic, [(names[i], names[j]) for i, j in zip(*upper)]


def _pairwise_correlations(values: np.ndarray) -> np.ndarray:
    """Pearson r of every column pair of (images × columns × maps) values, (maps × columns × columns);
    NaN where a column is constant."""
    centred = values - values.mean(axis=0)
    covariance = np.einsum("imk,ijk->kmj", centred, centred)
    scale = np.sqrt(np.einsum("kmm->km", covariance))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip(covariance / scale[:, :, None] / scale[:, None, :], -1, 1)


def _correlation_statistic(cube: np.ndarray, names: list[str]):
    """statistic(indices) -> [median |r| of the pointing game with the other metrics, that minus the
    median |r| among the other pairs], over every (map, metric pair) of one arch whose two metrics vary
    over the images (as `correlation_summary`); the correlations of `_correlation_core`, all maps at once."""
    aligned = _aligned_values(cube.transpose(0, 2, 1), names).transpose(0, 2, 1)
    binary = np.array([m in BINARY_METRICS for m in names])
    i, j = np.triu_indices(len(names), k=1)
    pg = (np.array(names)[i] == "pointing_game") | (np.array(names)[j] == "pointing_game")
    spearman = ~binary[i] & ~binary[j]

    def statistic(index):
        values = aligned[index]
        varying = np.ptp(values, axis=0).T > 0  # (maps, metrics)
        r = np.where(spearman, _pairwise_correlations(stats.rankdata(values, axis=0))[:, i, j],
                     _pairwise_correlations(values)[:, i, j])
        kept = varying[:, i] & varying[:, j]
        with_pg, other = np.abs(r[kept & pg]), np.abs(r[kept & ~pg])
        pg_median = np.median(with_pg) if with_pg.size else np.nan
        other_median = np.median(other) if other.size else np.nan
        return np.array([pg_median, pg_median - other_median])

    return statistic


def uncertainty(scores: pd.DataFrame, seed: int = 0, n_boot: int = N_BOOT, level: float = LEVEL) -> dict:
    """The intervals behind the findings, per arch (long table `intervals`: arch, statistic,
    estimate, low, high, n, unit, method) plus the Kendall τ of every metric pair with its
    percentile bootstrap interval (`tau_intervals`) and the per-metric dummy margins
    (`dummy_margins`). Resampling is over images; nothing is resampled that would copy a rater of α."""
    from study.findings import bootstrap_units, mean_interval

    rows, tau_rows, dummy_rows = [], [], []

    def add(arch, statistic, values, n, unit, method):
        estimate, low, high = values
        rows.append({"arch": arch, "statistic": statistic, "estimate": float(estimate), "low": float(low),
                     "high": float(high), "n": int(n), "unit": unit, "method": method})

    within = sparsity_grade_summary(sparsity_vs_grades(scores, grades=("average_drop",), descriptors=("gini",)),
                                    level)
    for arch in scores["arch"].unique():
        cube, names, maps = metric_cube(scores, arch)
        n = cube.shape[0]
        tau_stat, pairs = _tau_statistics(cube, names)
        estimate, low, high = bootstrap_units(tau_stat, n, n_resamples=n_boot, level=level, seed=seed)
        _, basic_low, basic_high = bootstrap_units(lambda i: tau_stat(i)[1:3], n, method="basic",
                                                   n_resamples=n_boot, level=level, seed=seed)
        basic_low, basic_high = np.clip(basic_low, -1, 1), np.clip(basic_high, -1, 1)  # τ's range
        add(arch, "mean_tau", (estimate[0], low[0], high[0]), n, "images", "percentile bootstrap")
        add(arch, "min_tau", (estimate[1], basic_low[0], basic_high[0]), n, "images", "basic bootstrap")
        add(arch, "min_tau_baseline", (estimate[2], basic_low[1], basic_high[1]), n, "images", "basic bootstrap")
        tau_rows += [{"arch": arch, "metric_a": a, "metric_b": b, "tau": t, "low": lo, "high": hi}
                     for (a, b), t, lo, hi in zip(pairs, estimate[3:], low[3:], high[3:])]
        if "pointing_game" in names:  # no boxes: no pointing game
            corr = bootstrap_units(_correlation_statistic(cube, names), n, n_resamples=n_boot, level=level,
                                   seed=seed)
            add(arch, "median_abs_r_pg", (corr[0][0], corr[1][0], corr[2][0]), n, "images", "percentile bootstrap")
            add(arch, "pg_minus_other", (corr[0][1], corr[1][1], corr[2][1]), n, "images", "percentile bootstrap")
        # soft / binarised Drop gap, sparse (IG, SmoothGrad) minus coarse (Grad-CAM, occlusion, RISE), per image
        gaps = {}
        for metric in ("average_drop", "average_drop_binarised"):
            matrix = per_image(scores, arch, metric, PAPER_FAMILIES)
            gaps[metric] = (matrix[list(SPARSE)].mean(axis=1) - matrix[list(COARSE)].mean(axis=1)).to_numpy()
        add(arch, "drop_gap_soft", mean_interval(gaps["average_drop"], level, "t"), n, "images", "t")
        soft, binary = gaps["average_drop"], gaps["average_drop_binarised"]
        add(arch, "drop_gap_ratio", bootstrap_units(lambda i: binary[i].mean() / soft[i].mean(), n,
                                                    n_resamples=n_boot, level=level, seed=seed),
            n, "images", "percentile bootstrap")
        # blurring IG / SmoothGrad: per-image improvement of the soft Drop (percentage points)
        drop = per_image(scores, arch, "average_drop", ("method", "variant"))
        for base in MANIPULATED:
            add(arch, f"blur_drop_gain:{base}", mean_interval(drop[base] - drop[f"{base}+blur"], level, "t"), n,
                "images", "t")
        # GT box on the pointing game: per-image hit minus that of the best other map
        if "pointing_game" in names:
            pg = per_image(scores, arch, "pointing_game", PAPER_FAMILIES)
            others = [m for m in pg.columns if m != REFERENCE]
            best = pg[others].mean().idxmax()
            add(arch, "gt_pg_margin", mean_interval(pg[REFERENCE] - pg[best], level, "t"), n, "images", "t")
        # within-method sparsity vs soft Drop
        part = within[(within["arch"] == arch)].iloc[0]
        add(arch, "sparsity_rho_drop", (part["mean_rho"], part["low"], part["high"]), part["n_methods"], "methods",
            "t")
        # dummies: best dummy minus worst real method per metric, per image, sign-aligned, in [0, 1] units
        for metric in names:
            matrix = per_image(scores, arch, metric, ("method", "dummy"))
            sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
            scale = 100.0 if metric.startswith("average_drop") else 1.0
            aligned = sign * matrix / scale
            real = [m for m in METHODS if m in aligned]
            dummy, method = aligned[list(DUMMIES)].mean().idxmax(), aligned[real].mean().idxmin()
            mean, low, high = mean_interval(aligned[dummy] - aligned[method], level, "t")
            dummy_rows.append({"arch": arch, "metric": metric, "dummy": dummy, "method": method, "estimate": mean,
                               "low": low, "high": high, "n": n})
    return {"intervals": pd.DataFrame(rows), "tau_intervals": pd.DataFrame(tau_rows),
            "dummy_margins": pd.DataFrame(dummy_rows)}


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
    shown = [m for m in METRICS if m in set(correlations["metric_a"])]
    labels = [METRIC_LABELS[m] for m in shown]
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
            matrix = part.pivot(index="metric_a", columns="metric_b", values="r").reindex(index=shown, columns=shown)
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
        columns = [m for m in METRICS if m in set(part["metric"])]
        matrix = part.pivot(index="variant", columns="metric", values="rank_change").reindex(index=rows,
                                                                                           columns=columns)
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

    part = {key: None if value is None else value[:n] for key, value in evaluation.items()}
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

TAU_STATISTICS = ("mean_tau", "min_tau", "min_tau_baseline")


def _verdict_tables(scores: pd.DataFrame, seed: int, n_boot: int) -> dict[str, pd.DataFrame]:
    """The tables the verdicts read, for one model per architecture."""
    return {"reliability": reliability(scores), **uncertainty(scores, seed, n_boot)}


def _t_over_models(values: pd.Series, level: float) -> dict:
    """Mean of one statistic's per-model values and its t interval over the models (NaN: left out)."""
    from study.findings import mean_interval

    finite = values.dropna()
    if len(finite) < 2:
        return {"estimate": float(finite.mean()) if len(finite) else np.nan, "low": np.nan, "high": np.nan,
                "n": len(finite)}
    estimate, low, high = mean_interval(finite.to_numpy(), level, "t")
    return {"estimate": estimate, "low": low, "high": high, "n": len(finite)}


def over_models(per_model: list[dict], level: float = LEVEL) -> dict[str, pd.DataFrame]:
    """The verdict tables of several trained models (one `_verdict_tables` dict per model, each
    graded on its own images) combined: every statistic's estimate is its mean over the models and
    its interval the `level` t interval over the models (a model where it is undefined is left
    out; fewer than two defined: NaN interval, read as inconclusive). Returns `intervals`,
    `dummy_margins` and `reliability` shaped as one model's (n = models), and `per_model`: every
    model's estimates (model, arch, statistic, estimate)."""
    if len(per_model) < 2:
        raise ValueError(f"over_models needs the tables of at least 2 models, got {len(per_model)}")
    n_images = {}
    long = []
    for k, tables in enumerate(per_model):
        for r in tables["intervals"].itertuples():
            long.append({"model": k, "arch": r.arch, "statistic": r.statistic, "estimate": r.estimate})
            if r.unit == "images":
                n_images.setdefault(r.arch, set()).add(int(r.n))
        for r in tables["dummy_margins"].itertuples():
            long.append({"model": k, "arch": r.arch, "statistic": f"dummy_margin:{r.metric}", "estimate": r.estimate,
                         "dummy": r.dummy, "method": r.method})
        for r in tables["reliability"].itertuples():
            long.append({"model": k, "arch": r.arch, "statistic": f"alpha:{r.metric}", "estimate": r.alpha,
                         "authors_variant": r.alpha_authors_variant, "n_maps": r.n_maps})
    long = pd.DataFrame(long)
    images = {arch: "/".join(str(n) for n in sorted(sizes)) for arch, sizes in n_images.items()}
    unit = {arch: f"models ({images.get(arch, '?')} images each)" for arch in long["arch"].unique()}
    intervals, margins, alphas = [], [], []
    for (arch, statistic), group in long.groupby(["arch", "statistic"], sort=False):
        combined = _t_over_models(group["estimate"], level)
        kind, _, metric = statistic.partition(":")
        if kind == "dummy_margin":
            pair = group[["dummy", "method"]].value_counts().idxmax()  # the pair most models picked
            margins.append({"arch": arch, "metric": metric, "dummy": pair[0], "method": pair[1], **combined})
        elif kind == "alpha":
            alphas.append({"arch": arch, "metric": metric, "n_images": images.get(arch), "n_maps": group["n_maps"].max(),
                           "n_models": combined["n"], "alpha": combined["estimate"], "alpha_low": combined["low"],
                           "alpha_high": combined["high"], "alpha_authors_variant": group["authors_variant"].mean()})
        else:
            if statistic in TAU_STATISTICS:  # τ's range, as the one-model interval
                combined["low"], combined["high"] = np.clip([combined["low"], combined["high"]], -1, 1)
            intervals.append({"arch": arch, "statistic": statistic, **combined, "unit": unit[arch], "method": "t"})
    reliability_table = pd.DataFrame(alphas)
    alpha = reliability_table["alpha"]
    reliability_table["reading"] = np.select(
        [alpha.isna(), alpha >= metrics.KRIPPENDORFF_RELIABLE, alpha >= metrics.KRIPPENDORFF_TENTATIVE],
        ["undefined", "reliable", "tentative"], "unreliable")
    margins = pd.DataFrame(margins)
    return {"intervals": pd.DataFrame(intervals), "dummy_margins": margins.assign(n=margins.pop("n")),
            "reliability": reliability_table, "per_model": long[["model", "arch", "statistic", "estimate"]]}


def analyse(evaluation: Evaluation, seed: int = 0, n_boot: int = N_BOOT, replicates=()) -> dict[str, pd.DataFrame]:
    """Every table of the notebook from the long score table (each a groupby of it), with the
    intervals behind the findings (`uncertainty`, `n_boot` resamples of the images).

    `replicates`: the Evaluations of the other trained models (`score_replicates`). With any, the
    verdicts' tables (`intervals`, `dummy_margins`, `reliability`) are `over_models` of this
    model's and theirs, so the intervals include what retraining moves; the descriptive tables stay
    this model's, and its image-level intervals are kept as `intervals_first_model`."""
    scores = evaluation.scores
    means = mean_scores(scores)
    correlations = metric_correlations(scores)
    within = sparsity_vs_grades(scores)
    verdict_tables = _verdict_tables(scores, seed, n_boot)
    tables = {
        "means": means, "ranks": method_ranks(means),
        "correlations": correlations, "correlation_summary": correlation_summary(correlations),
        "agreement": ranking_agreement(means), "sparsity": sparsity_table(scores),
        "sparsity_vs_grades": within, "sparsity_grade_summary": sparsity_grade_summary(within),
        "shift": grade_shift(scores), "dummy_ranks": dummy_ranks(scores), "drop_gaps": drop_gaps(means),
        "correct_only_ranks": correct_only_ranks(scores), **verdict_tables,
    }
    model_scores = [scores] + [r.scores for r in replicates]
    tables["reversals_opposing"] = reversal_table(model_scores, [OPPOSING_PAIR])
    tables["reversals_baseline"] = reversal_table(model_scores, BASELINE_PAIRS)
    if replicates:
        per_model = [verdict_tables] + [_verdict_tables(r.scores, seed + k, n_boot)
                                        for k, r in enumerate(replicates, start=1)]
        tables["intervals_first_model"] = verdict_tables["intervals"]
        tables.update(over_models(per_model))
    return tables


ALPHA_THRESHOLD = metrics.KRIPPENDORFF_TENTATIVE
# Each rule: statistic(s) of `uncertainty`, threshold, side, and its text (printed by the notebook).
RULES = {
    "coherence": "per metric, the 95% jackknife t CI (over images) of the ordinal α: incoherent when wholly below "
                 "0.667, coherent when wholly at or above; reproduced for an architecture when more than half of the "
                 "metrics are incoherent, not reproduced when at least half are coherent, inconclusive otherwise",
    "sparsity_sways": "per (architecture, IG / SmoothGrad), the per-image improvement of the soft Drop % when the "
                      "map is blurred: reproduced when its 95% t CI over images lies above 5 percentage points",
    "sparsity_within": "within each method, Spearman ρ over images between the Gini index and the soft Drop %; "
                       "reproduced when the 95% t CI over methods of the mean ρ lies above 0.2 (sparser maps of the "
                       "same method dropped more)",
    "opposing": "a pair of metrics fixed before the test, Deletion (zero, pixel) and soft Average Drop: for every "
                "pair of real methods, the per-image difference under each metric (sign-aligned), with t intervals "
                "over the images of every model (pooled) at a Bonferroni level over the method pairs; reproduced for "
                "an architecture when some method pair is ordered oppositely by the two metrics with both intervals "
                "on opposite sides of 0, not reproduced when no pair's two mean differences even differ in sign, "
                "inconclusive otherwise (the lowest Kendall τ between rankings is descriptive)",
    "pointing_game": "the median |r| between the pointing game and the other metrics (per-method correlations): "
                     "its 95% percentile bootstrap CI over images below 0.3, and that of its difference to the "
                     "median |r| among the other metric pairs below 0",
    "binarising": "the per-image soft Drop % gap (IG / SmoothGrad minus Grad-CAM / occlusion / RISE): 95% t CI "
                  "above 10 percentage points; and the binarised / soft gap ratio: 95% percentile bootstrap CI "
                  "below 0.5",
    "reference": "the per-image pointing-game hit of the GT box minus that of the best other map: reproduced when "
                 "its 95% t CI lies above 0.1 (10 percentage points)",
    "baseline": "every Ins/Del curve under every pair of its baselines, and every pair of real methods: the "
                "per-image difference under each baseline, with t intervals over the images of every model (pooled) "
                "at a Bonferroni level over all those comparisons; reproduced for an architecture when some method "
                "pair is ordered oppositely under two baselines with both intervals on opposite sides of 0, not "
                "reproduced when no pair's two mean differences even differ in sign, inconclusive otherwise (the "
                "lowest Kendall τ between rankings is descriptive)",
    "dummies": "per metric, the best dummy minus the worst real method, per image, sign-aligned, in [0, 1] units "
               "(Drop / 100): a metric counts when its 95% t CI lies above 0.05; reproduced for an architecture "
               "when some metric counts, not reproduced when every CI lies at or below 0.05",
}
RULES["models"] = ("with several trained models per architecture (n_models; the synthetic default, each model with "
                   "its own training seed and its own test images), every statistic above is computed per model and "
                   "its interval is the 95% t interval over the models instead of the one over images or methods "
                   "named in the rule; thresholds and sides unchanged")
# every architecture-level verdict of the rules above is combined by `combine_verdicts`
COMBINED = ("reproduced", "not reproduced", "inconclusive")


def combine_verdicts(verdicts) -> str:
    """One verdict from several interval verdicts (architectures, conditions): all reproduced →
    reproduced; all not reproduced → not reproduced; some reproduced → partly reproduced; none
    reproduced and some inconclusive → inconclusive."""
    verdicts = list(verdicts)
    if not verdicts or any(v not in COMBINED for v in verdicts):
        raise ValueError(f"combine_verdicts needs a non-empty list of {COMBINED}; got {verdicts!r}")
    if all(v == "reproduced" for v in verdicts):
        return "reproduced"
    if all(v == "not reproduced" for v in verdicts):
        return "not reproduced"
    return "partly reproduced" if "reproduced" in verdicts else "inconclusive"


def _per_arch(values: dict, fmt: str) -> str:
    return "; ".join(f"{_arch_label(a)} {fmt.format(v)}" for a, v in values.items())


def _side(low: float, high: float, threshold: float, above: bool) -> str:
    """`interval_verdict`, with an undefined (NaN) interval read as inconclusive."""
    from study.findings import interval_verdict

    if not (np.isfinite(low) and np.isfinite(high)):
        return "inconclusive"
    return interval_verdict(float(low), float(high), threshold, above=above)


def _rows(intervals: pd.DataFrame, statistic: str) -> pd.DataFrame:
    rows = intervals[intervals["statistic"] == statistic]
    if rows.empty:
        raise ValueError(f"the intervals table has no statistic {statistic!r}")
    return rows


def _judge(intervals: pd.DataFrame, statistic: str, threshold: float, above: bool) -> list[str]:
    return [_side(r.low, r.high, threshold, above) for r in _rows(intervals, statistic).itertuples()]


def _bounds(low: float, high: float, fmt: str) -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return "[undefined: the statistic is NaN in some resamples, e.g. a metric constant over the resampled images]"
    return f"[{fmt.format(low)}, {fmt.format(high)}]"


def _text(intervals: pd.DataFrame, statistic: str, fmt: str = "{:.2f}", label=None) -> str:
    return "; ".join(f"{_arch_label(r.arch)}{' ' + label if label else ''} {fmt.format(r.estimate)} "
                     f"{_bounds(r.low, r.high, fmt)}" for r in _rows(intervals, statistic).itertuples())


def _n(intervals: pd.DataFrame, statistic: str) -> str:
    rows = _rows(intervals, statistic)
    return "; ".join(f"{_arch_label(r.arch)} {r.n} {r.unit}" for r in rows.itertuples())


def _uncertainty(intervals: pd.DataFrame, statistics, fmt: str = "{:.2f}") -> str:
    parts = []
    for statistic in statistics:
        rows = _rows(intervals, statistic)
        parts.append(f"{statistic}: " + "; ".join(
            f"{_arch_label(r.arch)} {fmt.format(r.estimate)} {_bounds(r.low, r.high, fmt)}, "
            f"95% {r.method} CI over {r.n} {r.unit}" for r in rows.itertuples()))
    return " | ".join(parts)


def _row(claim: str, paper: str, rule: str, this_run: str, verdict: str, n: str, uncertainty: str) -> dict:
    return {"claim": claim, "paper": paper, "this_run": f"{this_run}. Rule: {RULES[rule]}", "verdict": verdict,
            "n": n, "uncertainty": uncertainty}


def _coherence(t: dict) -> dict:
    rel = t["reliability"].dropna(subset=["alpha"])
    verdicts, counts = [], {}
    for arch, group in rel.groupby("arch", sort=False):
        sides = [_side(r.alpha_low, r.alpha_high, ALPHA_THRESHOLD, False) for r in group.itertuples()]
        below, above = sides.count("reproduced"), sides.count("not reproduced")
        counts[arch] = (below, above, len(sides))
        verdicts.append("reproduced" if below > len(sides) / 2 else
                        "not reproduced" if above >= len(sides) / 2 else "inconclusive")
    intervals = t["intervals"]
    this_run = ("metrics whose α CI lies wholly below 0.667 / wholly at or above / of all with a defined α: "
                + "; ".join(f"{_arch_label(a)} {b} / {c} / {n}" for a, (b, c, n) in counts.items())
                + f"; mean Kendall τ between the metrics' method rankings: {_text(intervals, 'mean_tau')}")
    alpha_text = "; ".join(f"{_arch_label(r.arch)} {METRIC_LABELS[r.metric]} {r.alpha:.2f} "
                           f"[{r.alpha_low:.2f}, {r.alpha_high:.2f}]" for r in rel.itertuples())
    n_images = rel.groupby("arch", sort=False)["n_images"].first()
    if "n_models" in rel:  # over_models: mean α of the models, t interval over them
        n_models = rel.groupby("arch", sort=False)["n_models"].max()
        n = "; ".join(f"{_arch_label(a)} {n_models[a]} models × {k} images × {len(rel[rel['arch'] == a])} metrics"
                      for a, k in n_images.items())
        method = "mean ordinal α over the models, 95% t CI over models"
    else:
        n = "; ".join(f"{_arch_label(a)} {k} images × {len(rel[rel['arch'] == a])} metrics" for a, k in n_images.items())
        method = "ordinal α, 95% jackknife t CI over images"
    return _row("Some metrics grade explanations without coherency [abstract]",
                "n/a (claim only; no number available)", "coherence", this_run,
                combine_verdicts(verdicts) if verdicts else "inconclusive", n, f"{method}: {alpha_text}")


def _sparsity_sways(t: dict) -> dict:
    intervals, shift = t["intervals"], t["shift"]
    statistics = [f"blur_drop_gain:{base}" for base in MANIPULATED]
    verdicts = [v for s in statistics for v in _judge(intervals, s, 5.0, True)]
    moved = float((shift["rank_change"] != 0).mean())
    gains = "; ".join(f"{_label(s.split(':')[1])}: {_text(intervals, s, '{:+.1f}')}" for s in statistics)
    this_run = (f"soft Drop % improvement when the map is blurred (no new model information), percentage points: "
                f"{gains}; blur / clip / binarise move the method's rank in {moved:.0%} of the (arch, method, "
                "manipulation, metric) cells (descriptive)")
    return _row("Characteristics of the maps (sparsity, coarseness) sway their grades [abstract]",
                "n/a (claim only; no number available)", "sparsity_sways", this_run, combine_verdicts(verdicts),
                _n(intervals, statistics[0]), _uncertainty(intervals, statistics, "{:+.1f}"))


def _sparsity_within(t: dict) -> dict:
    intervals = t["intervals"]
    verdicts = _judge(intervals, "sparsity_rho_drop", 0.2, True)
    within = t["sparsity_vs_grades"]
    part = within[(within["grade"] == "average_drop") & (within["descriptor"] == "gini")]
    per_method = "; ".join(f"{_arch_label(r.arch)} {_label(r.map)} {r.rho:+.2f}" for r in part.itertuples())
    this_run = (f"mean over methods of the within-method Spearman ρ(Gini, soft Drop %): "
                f"{_text(intervals, 'sparsity_rho_drop', '{:+.2f}')}; per method: {per_method}")
    return _row("Within a method, sparser maps get a worse soft Average Drop [abstract claim 2; card §5.5.5, "
                "within method]", "n/a (claim only; no number available)", "sparsity_within", this_run,
                combine_verdicts(verdicts), _n(intervals, "sparsity_rho_drop") + (
                    f" ({part['n_images'].max()} images each)" if (_rows(intervals, "sparsity_rho_drop")["unit"]
                                                                   == "methods").all() else ""),
                _uncertainty(intervals, ["sparsity_rho_drop"], "{:+.2f}"))


def _reversal_verdicts(table: pd.DataFrame) -> list[str]:
    """Per architecture: reproduced when some comparison is reversed, not reproduced when none is even
    reversed in its point estimates, else inconclusive."""
    if table.empty:
        raise ValueError("the reversal table is empty: the run lacks the metrics the rule compares")
    return ["reproduced" if part["reversed"].any() else "inconclusive" if part["point_reversed"].any()
            else "not reproduced" for _arch, part in table.groupby("arch", sort=False)]


def _reversal_text(table: pd.DataFrame) -> str:
    parts = []
    for arch, part in table.groupby("arch", sort=False):
        found = part[part["reversed"]]
        text = (f"{_arch_label(arch)} {len(found)} of {len(part)} reversed ({int(part['point_reversed'].sum())} in "
                f"their means)")
        if len(found):
            margin = found[["low_a", "high_a", "low_b", "high_b"]].abs().min(axis=1)  # each interval excludes 0
            top = found.loc[margin.idxmax()]
            text += (f", e.g. {_label(top.map_i)} − {_label(top.map_j)} (sign-aligned, + when the first is "
                     f"better): {top.mean_a:+.3f} under "
                     f"{METRIC_LABELS.get(top.metric_a, top.metric_a)}, {top.mean_b:+.3f} under "
                     f"{METRIC_LABELS.get(top.metric_b, top.metric_b)} (same signs in {top.models_agreeing} of "
                     f"{top.n_models} models)")
        parts.append(text)
    return "; ".join(parts)


def _reversal_n(table: pd.DataFrame) -> str:
    return "; ".join(f"{_arch_label(arch)} {part['n_images'].iloc[0]} images ({part['n_models'].iloc[0]} models) × "
                     f"{len(part)} comparisons" for arch, part in table.groupby("arch", sort=False))


def _reversal_uncertainty(table: pd.DataFrame) -> str:
    return "; ".join(f"{_arch_label(arch)}: t intervals over images at {100 * part['level'].iloc[0]:.3f}% "
                     f"(Bonferroni for 95% over {len(part)} comparisons), reversed when the two lie on opposite "
                     f"sides of 0" for arch, part in table.groupby("arch", sort=False))


def _opposing(t: dict) -> dict:
    table, intervals, summary = t["reversals_opposing"], t["intervals"], t["correlation_summary"].set_index("arch")
    this_run = (f"method pairs that {METRIC_LABELS.get(OPPOSING_PAIR[0], OPPOSING_PAIR[0])} and "
                f"{METRIC_LABELS.get(OPPOSING_PAIR[1], OPPOSING_PAIR[1])} order oppositely: {_reversal_text(table)}; "
                f"descriptive: lowest Kendall τ between two metrics' method rankings {_text(intervals, 'min_tau')}, "
                f"share of per-image correlations < −0.1 after sign alignment "
                f"{_per_arch(summary['share_negative'].to_dict(), '{:.2f}')}")
    return _row("Metrics capture distinct, sometimes opposing notions of quality [summary]",
                "n/a (claim only; no number available)", "opposing", this_run,
                combine_verdicts(_reversal_verdicts(table)), _reversal_n(table), _reversal_uncertainty(table))


NO_BOXES = ("not tested: the images have no bounding boxes (no Pascal-VOC XML file beside them), so the pointing "
            "game and the GT-box map were skipped")


def _not_tested(claim: str, paper: str, rule: str) -> dict:
    return _row(claim, paper, rule, NO_BOXES, "not tested", "0 images with boxes", "not estimated (no boxes)")


def _has(t: dict, statistic: str) -> bool:
    """Whether the intervals hold `statistic` (the pointing-game ones are absent without boxes)."""
    return statistic in set(t["intervals"]["statistic"])


def _pointing_game(t: dict) -> dict:
    claim = "The pointing game correlates only weakly with the other metrics [summary]"
    if not _has(t, "median_abs_r_pg"):
        return _not_tested(claim, "n/a (claim only; no number available)", "pointing_game")
    intervals, summary = t["intervals"], t["correlation_summary"].set_index("arch")
    verdicts = _judge(intervals, "median_abs_r_pg", 0.3, False) + _judge(intervals, "pg_minus_other", 0.0, False)
    this_run = (f"median |r| with the pointing game: {_text(intervals, 'median_abs_r_pg')}; minus the median |r| "
                f"among the other metrics ({_per_arch(summary['median_abs_r_other_pairs'].to_dict(), '{:.2f}')}): "
                f"{_text(intervals, 'pg_minus_other', '{:+.2f}')}")
    return _row(claim, "n/a (claim only; no number available)", "pointing_game", this_run, combine_verdicts(verdicts),
                _n(intervals, "median_abs_r_pg"), _uncertainty(intervals, ["median_abs_r_pg", "pg_minus_other"]))


def _binarising(t: dict) -> dict:
    intervals, gaps = t["intervals"], t["drop_gaps"].set_index("arch")
    verdicts = _judge(intervals, "drop_gap_soft", 10.0, True) + _judge(intervals, "drop_gap_ratio", 0.5, False)
    this_run = (f"Drop % of IG/SmoothGrad minus Grad-CAM/occlusion/RISE, soft: "
                f"{_text(intervals, 'drop_gap_soft', '{:+.1f}')}; binarised: "
                f"{_per_arch(gaps['gap_average_drop_binarised'].to_dict(), '{:+.1f}')}; ratio binarised / soft: "
                f"{_text(intervals, 'drop_gap_ratio')}")
    return _row("Soft Average Drop penalises sparse maps; binarising removes most of the gap [summary; card §3 "
                "mechanics, unverified]", "n/a (claim only; no number available)", "binarising", this_run,
                combine_verdicts(verdicts), _n(intervals, "drop_gap_soft"),
                _uncertainty(intervals, ["drop_gap_soft", "drop_gap_ratio"]))


def _reference(t: dict) -> dict:
    claim = "The GT-box map wins the pointing game but need not win deletion [card §3, unverified]"
    if not _has(t, "gt_pg_margin"):
        return _not_tested(claim, "n/a (expectation from the metric mechanics)", "reference")
    ranks, intervals = t["ranks"], t["intervals"]
    pg = ranks.xs("pointing_game", level="metric")[REFERENCE]
    deletion = ranks.xs("deletion_zero_pixel", level="metric")[REFERENCE]
    verdicts = _judge(intervals, "gt_pg_margin", 0.1, True)
    best = ""
    if "means" in t:
        hits = t["means"].xs("pointing_game", level="metric").drop(columns=REFERENCE)
        best = " (best other map: " + "; ".join(f"{_arch_label(a)} {_label(row.idxmax())} {row.max():.0%} of images"
                                                 for a, row in hits.iterrows()) + ")"
    this_run = (f"GT-box pointing-game hit rate minus the best other map's, per image: "
                f"{_text(intervals, 'gt_pg_margin', '{:+.2f}')}{best}; GT-box rank on the pointing game: "
                f"{_per_arch(pg.to_dict(), '{:.0f}')}; on Del (zero, pixel): {_per_arch(deletion.to_dict(), '{:.0f}')} "
                "(1 = best; descriptive)")
    return _row(claim, "n/a (expectation from the metric mechanics)", "reference", this_run, combine_verdicts(verdicts),
                _n(intervals, "gt_pg_margin"), _uncertainty(intervals, ["gt_pg_margin"], "{:+.2f}"))


def _baseline(t: dict) -> dict:
    table, intervals = t["reversals_baseline"], t["intervals"]
    this_run = (f"method pairs that one Ins/Del curve orders oppositely under two baselines: {_reversal_text(table)}; "
                f"descriptive: lowest Kendall τ between the method rankings of one curve under two baselines "
                f"{_text(intervals, 'min_tau_baseline')}")
    return _row("The Ins/Del baseline can reorder the methods [card §5.6, unverified]", "n/a (expectation)",
                "baseline", this_run, combine_verdicts(_reversal_verdicts(table)), _reversal_n(table),
                _reversal_uncertainty(table))


def _dummies(t: dict) -> dict:
    margins = t["dummy_margins"]
    verdicts, counts = [], {}
    for arch, group in margins.groupby("arch", sort=False):
        sides = [_side(r.low, r.high, 0.05, True) for r in group.itertuples()]
        counts[arch] = (sides.count("reproduced"), len(sides))
        verdicts.append("reproduced" if "reproduced" in sides else
                        "not reproduced" if all(s == "not reproduced" for s in sides) else "inconclusive")
    top = margins.loc[margins.groupby("arch", sort=False)["low"].idxmax()]
    best = "; ".join(f"{_arch_label(r.arch)} {METRIC_LABELS[r.metric]}: {_label(r.dummy)} − {_label(r.method)} "
                     f"{r.estimate:+.2f} [{r.low:+.2f}, {r.high:+.2f}]" for r in top.itertuples())
    this_run = ("metrics on which the best dummy beats the worst real method by a CI wholly above 0.05: "
                + "; ".join(f"{_arch_label(a)} {k} of {n}" for a, (k, n) in counts.items())
                + f"; the largest margin (by CI low end): {best}")
    unit = "models" if "per_model" in t else "images"
    return _row("Dummy maps (random, Sobel, constant, centre Gaussian) outrank real methods on some metrics "
                "[Stassin et al. 2023 extension, not this paper]", "n/a (Stassin et al. abstract; no number)",
                "dummies", this_run, combine_verdicts(verdicts),
                "; ".join(f"{_arch_label(a)} {int(g['n'].iloc[0])} {unit} × {len(g)} metrics"
                          for a, g in margins.groupby("arch", sort=False)),
                f"per-metric margin, 95% t CI over {unit}: " + "; ".join(
                    f"{_arch_label(r.arch)} {METRIC_LABELS[r.metric]} {r.estimate:+.2f} [{r.low:+.2f}, {r.high:+.2f}]"
                    for r in margins.itertuples()))


def findings(tables: dict) -> list[dict]:
    """The Findings rows, every verdict computed from this run's intervals by the rule in `RULES`."""
    rows = [step(tables) for step in (_coherence, _sparsity_sways, _sparsity_within, _opposing, _pointing_game,
                                      _binarising, _reference, _baseline, _dummies)]
    if "per_model" in tables:
        for row in rows:
            if row["verdict"] != "not tested":
                row["this_run"] += f"; interval: {RULES['models']}"
    return rows


def save_and_show(fig, table: pd.DataFrame, figures_dir, name: str):
    """Save the figure (PNG + CSV via study.plots.save_figure), close it, and return the saved PNG
    for display, so a notebook renders each figure once instead of twice."""
    import matplotlib.pyplot as plt
    from IPython.display import Image

    from study.plots import save_figure

    path = save_figure(fig, table, figures_dir, name)
    plt.close(fig)
    return Image(filename=str(path))
