"""Steps of notebooks/01_sanity_checks_for_saliency_metrics.ipynb (Tomsett et al., AAAI 2020).

The protocol card is ../shared/papers/tomsett2020.md. The story of the notebook:

1. data and model (`setup`: `load_dataset` + `train_model`): scikit-learn digits + the pilot CNN by
   default, the synthetic 32×32 shapes or CIFAR-10 + the mini-VGG otherwise; or, with
   `dataset="folder"`, your own ImageFolder tree and torchvision classifier (`load_folder` +
   `load_model`, through the loaders of `study.imagenet` that notebook 02 uses), not trained here;
2. saliency maps of the card's methods for the predicted class (`compute_maps`);
3. the expensive step, every metric × implementation variant × method score per image, in one
   long table (`score_table`, cached on disk by `cached_score_table`);
4. analyses that are pandas group-bys of that table: mean scores and rankings, Krippendorff's α
   with leave-one-image-out jackknife CIs, inter-method and internal-consistency matrices, replacement sensitivity,
   class dependence;
5. figures, the comparison with the card's pilot numbers, and the findings with computed verdicts.

Faithfulness (Alvarez-Melis & Jaakkola) perturbs one feature at a time, so its score drops do not
depend on the saliency map: they are computed once per variant (`single_feature_scores`) and
correlated with every method's relevance (`faithfulness_from_scores`); the tests check that this
equals `study.metrics.faithfulness` method by method. The cumulative curves (AOPC, ABPC) depend on
the map's order and come from one batched `study.metrics.perturbation_curve` call per
(method, variant, order) over all images.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from scipy import stats
from torch import nn
from tqdm import tqdm

from study import attribution, config, data, imagenet, metrics, plots, train
from study.findings import bootstrap_units, correlation_interval, interval_verdict
from study.models import MiniVGG, SmallCNN

SECTION = "tomsett2020"
NOTEBOOK = "01_sanity_checks_for_saliency_metrics"
TRAINED_DATASETS = ("digits", "synth_cifar", "cifar10")  # the model is trained here
DATASETS = (*TRAINED_DATASETS, "folder")  # folder: your images and your model (weights_path), nothing trained
TRAINING_SETTINGS = ("epochs", "width", "n_train", "n_valid", "n_test")
MAP_BATCH_SIZE = 50  # images per attribution call (SmoothGrad's noise depends on the batch an image is in)
SCORE_CACHE_VERSION = 2  # 2: an undefined faithfulness value is stored as NaN (was 0)

METRICS = ("aopc_morf", "aopc_lerf", "abpc", "faithfulness")
METRIC_LABELS = {"aopc_morf": "AOPC-MoRF", "aopc_lerf": "AOPC-LeRF", "abpc": "ABPC", "faithfulness": "Faithfulness"}
HIGHER_IS_BETTER = {"aopc_morf": True, "aopc_lerf": False, "abpc": True, "faithfulness": True}
REPLACEMENTS = ("dataset_mean", "uniform", "zero", "blur")
REPLACEMENT_LABELS = {"dataset_mean": "mean", "uniform": "uniform", "zero": "zero", "blur": "blur"}
GRANULARITIES = ("pixel", "patch")
OUTPUTS = ("prob", "logit")
SIGNS = ("signed", "abs")

# Card §5.3 (+ the issue's extra methods). Options that depend on the profile are filled in by `method_plan`.
METHODS = ("random", "sobel", "gradient", "input_x_gradient", "integrated_gradients", "smoothgrad",
           "guided_backprop", "deeplift", "lrp_epsilon", "deep_taylor")
PILOT_METHODS = METHODS[:6]  # the project pilot's six methods (card §3)
NULL_METHODS = ("random", "sobel")
SIGNED_METHODS = ("input_x_gradient", "integrated_gradients", "deeplift", "lrp_epsilon", "deep_taylor")
ALL_METHODS, WITHOUT_RANDOM = "all methods", "without Random"  # the two method sets of the α analysis

# Card §3 [pilot]: inter-rater α (ordinal), all 6 methods / without Random, at digits, 4 px/step, L = 32, prob.
PILOT_ALPHA = {
    ("faithfulness", "dataset_mean"): (0.876, 0.874), ("faithfulness", "uniform"): (0.453, 0.370),
    ("aopc_morf", "dataset_mean"): (0.761, 0.668), ("aopc_morf", "uniform"): (0.464, 0.475),
    ("abpc", "dataset_mean"): (0.715, 0.622), ("abpc", "uniform"): (0.492, 0.537),
    ("aopc_lerf", "dataset_mean"): (0.441, 0.371), ("aopc_lerf", "uniform"): (0.529, 0.602),
}
CIFAR_MEAN, CIFAR_STD = (0.5243, 0.5432, 0.5266), (0.2801, 0.2780, 0.3089)  # card §2 E0 [code]


# ============================================================================ settings and variants

def _for_dataset(value, dataset: str):
    """Profile values may be one value or a dict dataset -> value."""
    return value.get(dataset) if isinstance(value, dict) else value


def experiment_settings(profile: str, dataset: str = "digits", **overrides) -> dict:
    """The profile's `tomsett2020` section resolved for `dataset`, with the notebook's overrides."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    given = [key for key in TRAINING_SETTINGS if overrides.get(key) is not None]
    if dataset == "folder" and given:
        raise ValueError(f"{', '.join(given)} set the model trained here; dataset='folder' trains nothing (it "
                         "evaluates your model from weights_path): leave them None")
    s = config.settings(profile, SECTION, **overrides)
    for key in TRAINING_SETTINGS:  # dataset="folder": no training, so none of them applies
        s[key] = None if dataset == "folder" else _for_dataset(s[key], dataset)
    s["n_images"] = _for_dataset(s["n_images"], dataset)
    s["map_batch_size"] = MAP_BATCH_SIZE
    if s["score"] not in OUTPUTS:
        raise ValueError(f"score must be one of {list(OUTPUTS)}, got {s['score']!r}")
    s["outputs"] = [s["score"]] + [o for o in s["outputs"] if o != s["score"]]
    primary_sign = "abs" if s["abs_map"] else "signed"
    s["signs"] = [primary_sign] + [x for x in s["signs"] if x != primary_sign]
    s["dataset"] = dataset
    return s


@dataclass(frozen=True)
class Variant:
    """One implementation choice of the metrics (card §2 E2 "degrees of freedom")."""

    replacement: str
    granularity: str
    output: str
    sign: str = "signed"

    def __post_init__(self):
        for name, value, allowed in (("replacement", self.replacement, REPLACEMENTS),
                                     ("granularity", self.granularity, GRANULARITIES),
                                     ("output", self.output, OUTPUTS), ("sign", self.sign, SIGNS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; accepted: {list(allowed)}")

    @property
    def label(self) -> str:
        parts = [REPLACEMENT_LABELS[self.replacement], self.granularity, self.output]
        return "·".join(parts + (["abs"] if self.sign == "abs" else []))


def variant_grid(replacements, granularities, outputs, signs, full_grid: bool = False) -> list[Variant]:
    """The variants to score. The main grid is replacements × granularities at the first output and
    sign; each further output / sign is crossed with the first two replacements at the first
    granularity (enough to show its effect), or with everything when `full_grid` (the paper profile)."""
    for name, values in (("replacements", replacements), ("granularities", granularities),
                         ("outputs", outputs), ("signs", signs)):
        if not values:
            raise ValueError(f"{name} must not be empty")
    if full_grid:
        return [Variant(r, g, o, s) for s in signs for o in outputs for g in granularities for r in replacements]
    grid = [Variant(r, g, outputs[0], signs[0]) for g in granularities for r in replacements]
    grid += [Variant(r, granularities[0], o, signs[0]) for o in outputs[1:] for r in replacements[:2]]
    grid += [Variant(r, granularities[0], outputs[0], s) for s in signs[1:] for r in replacements[:2]]
    return grid


def settings_variants(s: dict) -> list[Variant]:
    return variant_grid(s["replacements"], s["granularities"], s["outputs"], s["signs"], s["full_grid"])


def primary_variants(variants: list[Variant]) -> list[Variant]:
    """The variants of the first granularity, output and sign, one per replacement (mean first)."""
    first = variants[0]
    chosen = [v for v in variants if (v.granularity, v.output, v.sign) == (first.granularity, first.output, first.sign)]
    return sorted(chosen, key=lambda v: REPLACEMENTS.index(v.replacement))


@dataclass(frozen=True)
class Geometry:
    """Step sizes of card §5.4, derived from the image side and L."""

    image_size: int
    steps: int
    pixels_per_step: int
    patch: int
    faithfulness_pixel_patch: int
    blur_sigma: float
    blur_kernel_size: int


def geometry(image_size: int, steps: int) -> Geometry:
    """L steps removing 50% of the pixels: pixels_per_step = H·W / (2L) (4 px at 16×16, 16 px at
    32×32 with L = 32); patch granularity removes one square of that many pixels per step;
    faithfulness's "pixel" features are single pixels up to 16×16 and 2×2 groups at 32×32 (card §5.4);
    blur σ = side / 8 with a kernel of 2⌈2σ⌉ + 1."""
    if image_size <= 0 or steps <= 0:
        raise ValueError(f"image_size and steps must be positive, got {image_size}, {steps}")
    pixels = image_size * image_size
    if pixels % (2 * steps):
        raise ValueError(f"L = {steps} steps cannot remove 50% of a {image_size}×{image_size} image in equal steps")
    per_step = pixels // (2 * steps)
    patch = math.isqrt(per_step)
    if patch * patch != per_step or image_size % patch:
        raise ValueError(f"{per_step} pixels per step is not a square patch that tiles {image_size} px; choose another L")
    sigma = image_size / 8
    return Geometry(image_size, steps, per_step, patch, max(1, image_size // 16), sigma, 2 * math.ceil(2 * sigma) + 1)


def variant_settings_table(variants: list[Variant], geo: Geometry) -> pd.DataFrame:
    """What every variant does, printed next to the results (card Q1)."""
    rows = []
    for v in variants:
        patch = 1 if v.granularity == "pixel" else geo.patch
        faith = geo.faithfulness_pixel_patch if v.granularity == "pixel" else geo.patch
        features = (geo.image_size // faith) ** 2
        rows.append({"variant": v.label, "replacement": v.replacement, "AOPC feature": f"{patch}×{patch}",
                     "pixels per step": geo.pixels_per_step, "L": geo.steps,
                     "faithfulness features": f"{features} of {faith}×{faith}", "score": v.output,
                     "map": v.sign})
    return pd.DataFrame(rows)


# ============================================================================ data and model

class Standardise(nn.Module):
    """(x − mean) / std per channel, so the model takes [0,1] pixels (CIFAR-10 path, card §6)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def _take(arrays: dict, n: int | None) -> dict:
    if n is None:
        return arrays
    return {k: (v[:n] if isinstance(v, (np.ndarray, list)) and len(v) == len(arrays["labels"]) else v)
            for k, v in arrays.items()}


def load_dataset(dataset: str, seed: int, s: dict, data_root=None, verify_cifar: bool = True) -> dict:
    """Train / valid / test arrays (pixels in [0,1]) and the train-set mean used by mean replacement."""
    if dataset == "digits":
        split = data.load_digits_split(seed)
        bundle = {"train": split["train"], "valid": None, "test": split["test"],
                  "dataset_mean": [split["train_mean"]]}
    elif dataset == "synth_cifar":
        sizes = {"train": s["n_train"], "valid": s["n_valid"], "test": s["n_test"]}
        bundle = data.shapes_splits(seed, "synth_cifar", sizes=sizes, use_cache=True)
    elif dataset == "cifar10":
        def load(split):  # the valid images are a seeded draw of n_valid training images (card §6: 5,000)
            return data.load_cifar10(data_root, split, n_valid=s["n_valid"], seed=seed, verify=verify_cifar)

        bundle = {"train": _take(load("train"), s["n_train"]), "valid": load("valid"),
                  "test": _take(load("test"), s["n_test"])}
    elif dataset == "folder":
        raise ValueError("dataset='folder' goes with your model: load it with setup(...) or load_folder(...)")
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    if "dataset_mean" not in bundle:
        bundle["dataset_mean"] = data.channel_stats(bundle["train"]["images"])[0].round(6).tolist()
    images = bundle["train"]["images"]
    bundle.update(name=dataset, channels=int(images.shape[1]), image_size=int(images.shape[-1]),
                  num_classes=int(max(bundle["train"]["labels"].max(), bundle["test"]["labels"].max()) + 1))
    return bundle


def build_model(dataset: str, channels: int, num_classes: int, image_size: int, width: int) -> nn.Module:
    """Card §5.2: the pilot CNN on digits, the mini-VGG elsewhere (with a standardising first layer on CIFAR-10)."""
    if dataset == "digits":
        return SmallCNN(channels, num_classes, width, image_size)
    vgg = MiniVGG(channels, num_classes, width, image_size)
    return nn.Sequential(Standardise(CIFAR_MEAN, CIFAR_STD), vgg) if dataset == "cifar10" else vgg


def train_model(bundle: dict, s: dict, seed: int, device: str = "auto") -> dict:
    """Train once (cached) with the card's recipe: Adam 1e-3, batch 64; the mini-VGG with L2 1e-4 and
    the best-validation-loss checkpoint. Returns the model and its test accuracy."""
    dataset = bundle["name"]
    shape = (bundle["channels"], bundle["num_classes"], bundle["image_size"])

    def build():
        config.seed_everything(seed)
        return build_model(dataset, *shape, width=s["width"])

    def fit(model):
        config.seed_everything(seed)
        loader = data.make_loader(bundle["train"], batch_size=64, shuffle=True, seed=seed)
        valid = None if bundle["valid"] is None else data.make_loader(bundle["valid"], 256, False, seed)
        return train.fit(model, loader, epochs=s["epochs"], lr=1e-3, weight_decay=0.0 if valid is None else 1e-4,
                         valid_loader=valid, select=None if valid is None else "valid_loss", device=device)

    n_valid = 0 if bundle["valid"] is None else len(bundle["valid"]["labels"])
    params = {"dataset": dataset, "seed": seed, "epochs": s["epochs"], "width": s["width"],
              "n_train": len(bundle["train"]["labels"]), "n_valid": n_valid, "version": 1}
    result = train.cached_fit(f"tomsett2020_{dataset}", params, build, fit, device=device)
    test = train.evaluate(result.model, data.make_loader(bundle["test"], 256, False, seed), device)
    architecture = "Standardise + MiniVGG" if dataset == "cifar10" else type(result.model).__name__
    return {"model": result.model.eval(), "test_accuracy": test["accuracy"], "history": pd.DataFrame(result.history),
            "from_cache": result.from_cache, "architecture": architecture, "n_train": params["n_train"],
            "units": f"one trained model (seed {seed})"}


def load_folder(s: dict, data_root, model: str | None, image_size: int | None = None, mean=None, std=None) -> dict:
    """Your own images (`dataset="folder"`) as `model` sees them, in the bundle of `load_dataset`.

    `data_root` is an ImageFolder tree (one sub-folder of images per class; class index = position
    of the folder name in sorted order), read by `study.imagenet.load_image_folder` (XML files
    beside the images are ignored: no metric here needs boxes) with the first ⌈n_images / classes⌉
    images of each class, then the first `s["n_images"]` of those (lowered to the images found).
    Resize / crop / normalisation: `study.imagenet.input_settings` (the architecture's torchvision
    preset, or `image_size`, `mean`, `std`); the pixels stay in [0, 1] and the normalisation goes
    into the model (`load_model`), as on the CIFAR-10 path.

    No training set exists, so the "mean" replacement value is the per-channel mean of these images
    (a dataset statistic, fixed for every image and method: card §7.10), and there is no train /
    valid split. The batch sizes shrink with the image area (the profile's are for 32-px images).
    ValueError naming the parameter: data_root or model None, an unknown architecture, image_size
    / mean / std malformed, an image size whose L steps are not equal squares, fewer than 2 images."""
    arch = imagenet.check_folder_inputs(data_root, model)
    preset = imagenet.input_settings(arch, image_size, mean, std)
    side = preset["crop"]
    try:
        geometry(side, s["steps"])
    except ValueError as error:
        raise ValueError(f"image_size {side} ({'given' if image_size else f'the {arch} preset'}) does not split "
                         f"into L = {s['steps']} equal square steps ({error}); pass image_size= a multiple of 8, "
                         f"e.g. 32, 64, 128 or 224") from None
    arrays = imagenet.load_image_folder(data_root, n_images=s["n_images"], resize=preset["resize"], crop=side,
                                        boxes=False)
    found = len(arrays["labels"])
    if found < 2:
        raise ValueError(f"data_root holds {found} image; the reliability analyses need at least 2 images "
                         f"(the profile asks for {s['n_images']})")
    s["n_images"] = n = min(int(s["n_images"]), found)
    area = (32 / side) ** 2  # memory of one batch ~ batch × side²: keep the profile's budget at 32 px
    s["batch_size"] = max(16, int(s["batch_size"] * min(1.0, area)))
    s["map_batch_size"] = max(1, int(MAP_BATCH_SIZE * min(1.0, area)))
    test = {"images": arrays["images"][:n], "labels": arrays["labels"][:n]}
    counts = np.bincount(test["labels"], minlength=len(arrays["classes"]))
    return {"name": "folder", "train": None, "valid": None, "test": test,
            "dataset_mean": data.channel_stats(test["images"])[0].round(6).tolist(), "channels": 3,
            "image_size": side, "num_classes": len(arrays["classes"]), "classes": list(arrays["classes"]),
            "class_counts": counts.tolist(), "files": arrays["files"][:n], "architecture": arch, "input": preset}


def load_model(bundle: dict, weights_path, device: str = "auto", batch_size: int = 16) -> dict:
    """The torchvision `bundle["architecture"]` with the state dict in `weights_path`
    (`study.imagenet.torchvision_model`: torch.load(weights_only=True), its outputs checked against
    the class folders), behind a `Standardise` layer with the folder's `mean` / `std`, in eval mode;
    nothing is trained. Returns the keys of `train_model`; `test_accuracy` is the accuracy on the
    evaluated images (predicted class vs class folder), `n_train` is None."""
    device = config.get_device(device)
    arch, preset = bundle["architecture"], bundle["input"]
    net = imagenet.torchvision_model(arch, weights_path, bundle["num_classes"], device, image_size=bundle["image_size"],
                                     classes_from=f"data_root has {bundle['num_classes']} class folders")
    model = nn.Sequential(Standardise(preset["mean"], preset["std"]), net).to(device).eval()
    test = train.evaluate(model, data.make_loader(bundle["test"], batch_size, False, 0), device)
    return {"model": model, "test_accuracy": test["accuracy"], "history": pd.DataFrame(), "from_cache": False,
            "architecture": f"Standardise + {arch}", "n_train": None, "weights": Path(weights_path).name,
            "units": f"one model ({arch} from weights_path, not trained here)"}


def setup(dataset: str, seed: int, s: dict, device: str = "auto", data_root=None, model: str | None = None,
          weights_path=None, image_size: int | None = None, mean=None, std=None) -> tuple[dict, dict]:
    """(bundle, model_run) of the notebook's first step: `load_dataset` + `train_model` for the built-in
    datasets, `load_folder` + `load_model` for `dataset="folder"` (your images and weights; nothing
    trained). `model`, `weights_path`, `image_size`, `mean` and `std` apply to the folder only."""
    if dataset != "folder":
        given = [name for name, value in (("model", model), ("weights_path", weights_path), ("image_size", image_size),
                                          ("mean", mean), ("std", std)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to dataset='folder' (your images and model); dataset="
                             f"{dataset!r} trains the notebook's own model on its own data")
        bundle = load_dataset(dataset, seed, s, data_root=data_root)
        return bundle, train_model(bundle, s, seed, device=device)
    if s.get("dataset") != "folder":
        raise ValueError("for dataset='folder' make the settings with experiment_settings(profile, 'folder', ...)")
    bundle = load_folder(s, data_root, model, image_size, mean, std)
    return bundle, load_model(bundle, weights_path, device, s["batch_size"])


def describe_setup(bundle: dict, model_run: dict, s: dict) -> str:
    """What the first step loaded or trained, in a few printed lines."""
    if bundle["name"] != "folder":
        return (f"{model_run['architecture']} on {bundle['name']}: {model_run['n_train']} training images, "
                f"{len(bundle['test']['labels'])} test images, {s['epochs']} epochs (from cache: "
                f"{model_run['from_cache']})\ntest accuracy {model_run['test_accuracy']:.3f}; mean-replacement value "
                f"(train-set mean) {[round(x, 3) for x in bundle['dataset_mean']]}")
    preset = bundle["input"]
    classes = ", ".join(f"{c} ({k})" for c, k in zip(bundle["classes"], bundle["class_counts"]))
    return (f"{model_run['architecture']} from weights_path {model_run['weights']} (not trained here) on your "
            f"images: {s['n_images']} images of {bundle['num_classes']} class folders: {classes}\n"
            f"Resize({preset['resize']}) → CenterCrop({preset['crop']}), normalised inside the model with mean "
            f"{[round(x, 3) for x in preset['mean']]}, std {[round(x, 3) for x in preset['std']]}\n"
            f"accuracy on these images (predicted class vs class folder) {model_run['test_accuracy']:.3f}; "
            f"mean-replacement value (no training set: the per-channel mean of these images) "
            f"{[round(x, 3) for x in bundle['dataset_mean']]}")


def model_check(bundle: dict, model_run: dict) -> str:
    """The printed check of the model: the trained model learned its task; your model is only reported."""
    if bundle["name"] != "folder":
        return f"the model learned the task (test accuracy > 0.9): {model_run['test_accuracy'] > 0.9}"
    return (f"your model was not trained here; its accuracy on the evaluated images is "
            f"{model_run['test_accuracy']:.2f} (the metrics explain the predicted class, right or wrong)")


FOLDER_PILOT_NOTE = ("note: the project pilot column is the card's digits pilot (16×16 digits, its pilot CNN), a "
                     "reference point, not an expectation for your model and images")


def select_images(bundle: dict, model: nn.Module, n_images: int, device: str = "auto") -> dict:
    """The first `n_images` test images, their labels and the model's predicted class (the explained class)."""
    test = bundle["test"]
    if not 2 <= n_images <= len(test["labels"]):
        raise ValueError(f"n_images must be in [2, {len(test['labels'])}] (the test set), got {n_images}")
    device = config.get_device(device)
    images = torch.as_tensor(test["images"][:n_images], device=device)
    with torch.no_grad():
        predicted = model.to(device).eval()(images).argmax(1)
    return {"images": images, "labels": torch.as_tensor(test["labels"][:n_images]), "predicted": predicted}


# ============================================================================ saliency maps

def method_plan(s: dict, seed: int) -> dict[str, dict]:
    """Card §5.3 settings: IG with a zero baseline and α = 1/L … 1 (right Riemann sum), SmoothGrad
    mean |gradient| over noisy copies with σ = 0.15, Random seeded per image; Deep Taylor's input
    bounds come from the model in `compute_maps`."""
    return {
        "random": {"seed": seed}, "sobel": {}, "gradient": {}, "input_x_gradient": {},
        "integrated_gradients": {"steps": s["ig_steps"], "approximation": "riemann_right"},
        "smoothgrad": {"samples": s["smoothgrad_samples"], "sigma": 0.15, "seed": seed},
        "guided_backprop": {}, "deeplift": {}, "lrp_epsilon": {}, "deep_taylor": {},
    }


def pixel_bounds(model: nn.Module) -> dict:
    """Deep Taylor's zB bounds: the range of the first layer's input when pixels lie in [0, 1], i.e.
    (0 − mean)/std and (1 − mean)/std per channel behind a `Standardise` front, else 0 and 1."""
    front = model[0] if isinstance(model, nn.Sequential) and len(model) else None
    if isinstance(front, Standardise):
        return {"low": (0 - front.mean) / front.std, "high": (1 - front.mean) / front.std}
    return {"low": 0.0, "high": 1.0}


def compute_maps(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, plan: dict[str, dict],
                 batch_size: int = 50) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """{method: (B,1,H,W) map} for the predicted class, and {method: reason} for methods the model
    does not allow (e.g. LRP on batch norm). Deep Taylor gets `pixel_bounds(model)` unless the plan
    gives its bounds."""
    maps, skipped = {}, {}
    for name, options in plan.items():
        if name == "deep_taylor":
            options = {**pixel_bounds(model), **options}
        try:
            with warnings.catch_warnings():  # captum's max-unpooling has no deterministic kernel; harmless here
                warnings.filterwarnings("ignore", message="max_unpooling2d_forward_out does not have a deterministic")
                maps[name] = attribution.explain_many(model, images, targets, {name: options}, batch_size)[name]
        except ValueError as error:
            if name not in ("lrp_epsilon", "deep_taylor", "guided_backprop", "deeplift"):
                raise
            skipped[name] = str(error).split(";")[0]
    return maps, skipped


# ============================================================================ the expensive step

def _feature_grid(size: int, patch: int, device) -> torch.Tensor:
    cells = torch.arange(size, device=device) // patch
    return cells[:, None] * (size // patch) + cells[None, :]


def single_feature_scores(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, patch: int,
                          replacement: torch.Tensor, output: str, batch_size: int = 512) -> torch.Tensor:
    """(B, F + 1) class scores: column 0 is f(x), column 1 + i is f(x with only feature i replaced)
    (card §7 invariant 11: each copy differs from x in exactly one feature). Features are
    non-overlapping patch × patch squares in raster order, as in `study.metrics`."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {list(OUTPUTS)}, got {output!r}")
    b, _, h, w = images.shape
    if h != w or h % patch:
        raise ValueError(f"patch {patch} must tile the square image, got {h}×{w}")
    grid = _feature_grid(h, patch, images.device)
    columns = (h // patch) ** 2 + 1
    scores = torch.empty(b * columns, device=images.device)
    per_image = replacement.shape[0] == b and b > 1
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, b * columns, batch_size):
            flat = torch.arange(start, min(start + batch_size, b * columns), device=images.device)
            image, feature = flat // columns, flat % columns - 1  # feature −1 = the unperturbed image
            replaced = (grid[None] == feature[:, None, None])[:, None]
            value = replacement[image] if per_image else replacement
            logits = model(torch.where(replaced, value, images[image])).float()
            if output == "prob":
                logits = torch.softmax(logits, dim=1)
            scores[flat] = logits.gather(1, targets[image][:, None])[:, 0]
    model.train(was_training)
    return scores.reshape(b, columns).cpu()


def feature_relevance(maps: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, F) relevance per feature = the map summed over each patch × patch square."""
    b, _, h, w = maps.shape
    return maps.sum(1).reshape(b, h // patch, patch, w // patch, patch).sum((2, 4)).reshape(b, -1)


def faithfulness_from_scores(maps: torch.Tensor, scores: torch.Tensor, patch: int) -> torch.Tensor:
    """Pearson r over features between relevance and the drop f(x) − f(x with feature i replaced);
    NaN where either is constant over the features (e.g. a saturated probability)."""
    relevance = feature_relevance(maps.cpu().double(), patch)
    drops = (scores[:, :1] - scores[:, 1:]).double()
    a = relevance - relevance.mean(1, keepdim=True)
    d = drops - drops.mean(1, keepdim=True)
    denominator = a.norm(dim=1) * d.norm(dim=1)
    r = (a * d).sum(1) / denominator
    constant = (relevance.amax(1) == relevance.amin(1)) | (drops.amax(1) == drops.amin(1))
    return torch.where(constant, torch.nan, r.clamp(-1, 1)).float()


def _transform(maps: torch.Tensor, sign: str) -> torch.Tensor:
    return maps.abs() if sign == "abs" else maps


def score_table(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, labels, maps: dict[str, torch.Tensor],
                variants: list[Variant], geo: Geometry, *, dataset_mean, seed: int, batch_size: int = 512,
                progress: bool | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every (image, method, metric, variant) score as a long table, and the mean MoRF / LeRF curves.

    Per variant: one replacement tensor (the uniform noise image of image i is the same for every
    method and metric, card §7.10), the single-feature scores for faithfulness (map-independent),
    then per method one batched MoRF and one LeRF curve over all images. A faithfulness value that
    is undefined (constant relevance or constant drops) is stored as NaN, i.e. missing, and flagged
    in `undefined`; every analysis leaves it out (storing 0 would tie every method on that image).
    """
    model = model.eval()
    labels = np.asarray(labels)
    n = images.shape[0]
    rows, curves = [], []
    show = train.progress_enabled() if progress is None else progress
    for v in tqdm(variants, desc="variants", disable=not show, leave=False):
        value = metrics.make_replacement(images, v.replacement, dataset_mean=dataset_mean, seed=seed,
                                         blur_sigma=geo.blur_sigma, blur_kernel_size=geo.blur_kernel_size)
        patch = 1 if v.granularity == "pixel" else geo.patch
        faith_patch = geo.faithfulness_pixel_patch if v.granularity == "pixel" else geo.patch
        single = single_feature_scores(model, images, targets, patch=faith_patch, replacement=value,
                                       output=v.output, batch_size=batch_size)
        curve_options = dict(patch=patch, steps=geo.steps, pixels_per_step=geo.pixels_per_step, replacement=value,
                             output=v.output, batch_size=batch_size, seed=seed)
        for method, raw in maps.items():
            saliency = _transform(raw, v.sign)
            morf = metrics.perturbation_curve(model, images, saliency, targets, order="morf", **curve_options)
            lerf = metrics.perturbation_curve(model, images, saliency, targets, order="lerf", **curve_options)
            faith = faithfulness_from_scores(saliency, single, faith_patch)
            values = {"aopc_morf": metrics.aopc(morf), "aopc_lerf": metrics.aopc(lerf),
                      "abpc": metrics.abpc(lerf, morf), "faithfulness": faith}
            for metric, scores in values.items():
                rows.append(pd.DataFrame({
                    "image": np.arange(n), "label": labels, "method": method, "metric": metric,
                    "variant": v.label, "replacement": v.replacement, "granularity": v.granularity,
                    "output": v.output, "sign": v.sign, "score": scores.double().numpy(),
                    "undefined": torch.isnan(faith).numpy() if metric == "faithfulness" else False}))
            for order, curve in (("morf", morf), ("lerf", lerf)):
                curves.append(pd.DataFrame({
                    "method": method, "variant": v.label, "order": order, "step": np.arange(geo.steps + 1),
                    "fraction_removed": np.arange(geo.steps + 1) * geo.pixels_per_step / geo.image_size**2,
                    "mean_score": curve.double().mean(0).numpy(), "sem": curve.double().std(0).numpy() / math.sqrt(n)}))
    return pd.concat(rows, ignore_index=True), pd.concat(curves, ignore_index=True)


def _fingerprint(*tensors: torch.Tensor, model: nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in [*tensors, *model.state_dict().values()]:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def _frame_to_arrays(frame: pd.DataFrame) -> dict:
    return {column: (frame[column].to_numpy().astype(str) if frame[column].dtype == object or
                     pd.api.types.is_string_dtype(frame[column]) else frame[column].to_numpy())
            for column in frame.columns}


def cached_score_table(model, images, targets, labels, maps, variants, geo, *, dataset_mean, seed,
                       batch_size=512, cache_dir=None, progress=None) -> tuple[pd.DataFrame, pd.DataFrame, bool]:
    """`score_table` through the disk cache (study.data.cached, atomic .npz), keyed by a hash of the
    model weights, images, targets and maps and by every setting. Returns (scores, curves, from_cache)."""
    params = {"version": SCORE_CACHE_VERSION, "variants": [v.label for v in variants], "geometry": geo.__dict__,
              "dataset_mean": [float(x) for x in np.atleast_1d(dataset_mean)], "seed": seed,
              "methods": sorted(maps), "fingerprint": _fingerprint(images, targets, torch.as_tensor(np.asarray(labels)),
                                                                  *[maps[m] for m in sorted(maps)], model=model)}
    built = []

    def build():
        scores, curves = score_table(model, images, targets, labels, maps, variants, geo, dataset_mean=dataset_mean,
                                     seed=seed, batch_size=batch_size, progress=progress)
        built.append(True)
        return {"scores": _frame_to_arrays(scores), "curves": _frame_to_arrays(curves)}

    stored = data.cached("tomsett2020_scores", params, build, cache_dir=cache_dir)
    return pd.DataFrame(stored["scores"]), pd.DataFrame(stored["curves"]), not built


# ============================================================================ analyses (group-bys of the table)

def with_aligned(table: pd.DataFrame) -> pd.DataFrame:
    """Adds `aligned` = score, negated for lower-is-better metrics (AOPC-LeRF; card Q7)."""
    sign = table["metric"].map({m: 1.0 if up else -1.0 for m, up in HIGHER_IS_BETTER.items()})
    return table.assign(aligned=table["score"] * sign)


def score_matrix(table: pd.DataFrame, metric: str, variant: str, methods=None) -> pd.DataFrame:
    """(images × methods) raw scores of one metric and variant."""
    part = table[(table["metric"] == metric) & (table["variant"] == variant)]
    if part.empty:
        raise ValueError(f"no scores for metric {metric!r} and variant {variant!r}")
    matrix = part.pivot(index="image", columns="method", values="score")
    order = methods or sorted(matrix.columns, key=lambda m: (METHODS.index(m) if m in METHODS else len(METHODS), m))
    return matrix[[m for m in order if m in matrix.columns]]


def method_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean (and s.e.m.) score per (variant, metric, method) over the images where it is defined (NaN
    left out) and the rank by mean, 1 = best after sign alignment; exact ties (e.g. ε-LRP and Input×Gradient, identical on a ReLU network) are broken by the method order."""
    grouped = with_aligned(table).groupby(["variant", "metric", "method"], sort=False)
    summary = grouped.agg(mean=("score", "mean"), sem=("score", "sem"), aligned=("aligned", "mean")).reset_index()
    # NaN (undefined) scores are left out of the means; a method with no defined score ranks last
    summary["rank"] = summary.groupby(["variant", "metric"])["aligned"].rank(
        ascending=False, method="first", na_option="bottom").astype(int)
    return summary.drop(columns="aligned")


def per_image_ranks(table: pd.DataFrame) -> pd.DataFrame:
    """Rank of each method within each image (1 = best after sign alignment, ties averaged; an undefined
    (NaN) score has no rank and the others are ranked among themselves)."""
    aligned = with_aligned(table)
    ranks = aligned.groupby(["variant", "metric", "image"])["aligned"].rank(ascending=False, method="average")
    return aligned.assign(rank=ranks)


def _alpha(matrix: np.ndarray, higher_is_better: bool) -> float:
    try:
        return metrics.krippendorff_alpha(matrix, level="ordinal", higher_is_better=higher_is_better, missing="omit")
    except ValueError:
        return float("nan")


def _rated(matrix: np.ndarray) -> np.ndarray:
    """The images (rows) with at least two defined scores: the only ones α can use."""
    return matrix[(~np.isnan(matrix)).sum(axis=1) >= 2]


def alpha_table(table: pd.DataFrame, method_sets: dict[str, list[str]] | None = None, ci: bool = True) -> pd.DataFrame:
    """Krippendorff's α (ordinal; raters = images, units = methods, values = within-image ranks) per
    metric × variant × method set, with a leave-one-image-out jackknife 95% t CI (`ci=False`: none).
    An undefined (NaN) score is a missing value: the image ranks its other methods, and an image
    with fewer than two defined scores is left out (`n_images` counts the images used). The
    jackknife replaces the earlier percentile bootstrap, which resampled images with replacement:
    a duplicated image is a rater agreeing perfectly with itself, which biased α's interval upwards."""
    methods = sorted(table["method"].unique(), key=lambda m: METHODS.index(m) if m in METHODS else 99)
    if method_sets is None:
        method_sets = {ALL_METHODS: methods, WITHOUT_RANDOM: [m for m in methods if m != "random"]}
    rows = []
    for (metric, variant), part in table.groupby(["metric", "variant"], sort=False):
        for set_name, chosen in method_sets.items():
            matrix = _rated(score_matrix(part, metric, variant, chosen).to_numpy())
            up = HIGHER_IS_BETTER[metric]
            row = {"metric": metric, "variant": variant, "methods": set_name, "n_methods": matrix.shape[1],
                   "n_images": matrix.shape[0], "alpha": _alpha(matrix, up), "low": np.nan, "high": np.nan}
            if ci and np.isfinite(row["alpha"]) and matrix.shape[0] >= 3:
                # ranks are within images, so an image left out of the ranks is one left out of the scores
                ranks = metrics.rank_within_images(matrix, up, missing="omit")
                try:
                    interval = metrics.jackknife_ci(
                        lambda r: metrics.krippendorff_alpha(r, ranking="none", missing="omit"), ranks)
                    row.update(low=interval.low, high=interval.high)
                except ValueError:
                    pass
            rows.append(row)
    return pd.DataFrame(rows)


def _variant_order(table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(table["variant"]))


def inter_method_matrices(table: pd.DataFrame, variants: list[str] | None = None) -> dict[tuple[str, str], pd.DataFrame]:
    """{(variant, metric): Spearman ρ across images between every pair of methods} (computed per pair)."""
    variants = variants or _variant_order(table)
    return {(variant, metric): score_matrix(table, metric, variant).corr(method="spearman")
            for variant in variants for metric in METRICS}


def _off_diagonal(matrix: pd.DataFrame) -> np.ndarray:
    values = matrix.to_numpy()
    return values[np.triu_indices(len(values), k=1)]


def inter_method_summary(table: pd.DataFrame, exclude=()) -> pd.DataFrame:
    """Mean / min / max off-diagonal inter-method ρ per variant and metric (card §5.5 item 3)."""
    rows = []
    for (variant, metric), matrix in inter_method_matrices(table).items():
        keep = [m for m in matrix.index if m not in exclude]
        upper = _off_diagonal(matrix.loc[keep, keep])
        rows.append({"variant": variant, "metric": metric, "mean": np.nanmean(upper), "min": np.nanmin(upper),
                     "max": np.nanmax(upper)})
    return pd.DataFrame(rows)


def spearman_ci(x, y, level: float = 0.95) -> tuple[float, float, float, int]:
    """Spearman ρ of the images where both are defined (NaN pairs left out), its Fisher-z CI
    (`findings.correlation_interval`, Spearman's SE) and n; NaNs when undefined."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length; got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(keep.sum())
    if n < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan, np.nan, np.nan, n
    rho = float(stats.spearmanr(x, y).statistic)
    return rho, *correlation_interval(rho, n, level, spearman=True), n


def internal_consistency_table(table: pd.DataFrame) -> pd.DataFrame:
    """Spearman ρ across images between every pair of sign-aligned metrics, per variant and method (Q6, Q7),
    with its 95% Fisher-z CI; images where either metric is undefined (NaN) are left out of the pair."""
    aligned = with_aligned(table)
    rows = []
    for (variant, method), part in aligned.groupby(["variant", "method"], sort=False):
        wide = part.pivot(index="image", columns="metric", values="aligned")[list(METRICS)]
        for i, a in enumerate(METRICS):
            for b in METRICS[i + 1:]:
                rho, low, high, n = spearman_ci(wide[a].to_numpy(), wide[b].to_numpy())
                rows.append({"variant": variant, "method": method, "metric_a": a, "metric_b": b, "rho": rho,
                             "low": low, "high": high, "n": n})
    return pd.DataFrame(rows)


def replacement_sensitivity(table: pd.DataFrame, reference: str = "dataset_mean") -> pd.DataFrame:
    """Spearman ρ across images between the per-image scores under `reference` replacement and under
    each other replacement, everything else equal (card E4), per metric and method."""
    keys = ["granularity", "output", "sign", "metric", "method"]
    wide = table.pivot_table(index=[*keys, "image"], columns="replacement", values="score").reset_index()
    if reference not in wide:
        raise ValueError(f"reference replacement {reference!r} is not in the table")
    rows = []
    for key, part in wide.groupby(keys, sort=False):
        for other in [r for r in REPLACEMENTS if r in part and r != reference]:
            pair = part[[reference, other]].dropna()
            if len(pair) > 2:
                rho = stats.spearmanr(pair[reference], pair[other]).statistic if pair.nunique().min() > 1 else np.nan
                rows.append({**dict(zip(keys, key)), "reference": reference, "replacement": other, "rho": rho})
    return pd.DataFrame(rows)


def class_effect(scores, labels) -> float:
    """Kruskal–Wallis ε² = H / (n − 1) of the scores across classes (0: no class effect, 1: the class
    orders the images completely); NaN scores are left out, NaN when undefined."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels)
    keep = np.isfinite(scores)
    scores, labels = scores[keep], labels[keep]
    classes, index, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    keep = sizes[index] > 1  # as `class_dependence`: a class needs two images
    scores, index = scores[keep], index[keep]
    n = scores.size
    if (sizes > 1).sum() < 2 or np.ptp(scores) == 0:
        return np.nan
    # H as in scipy.stats.kruskal (tie-corrected), computed directly: it runs thousands of times in the jackknife
    ranks = stats.rankdata(scores)
    counts = np.bincount(index, minlength=classes.size)
    sums = np.bincount(index, weights=ranks, minlength=classes.size)
    used = counts > 0
    h = 12.0 / (n * (n + 1)) * np.sum(sums[used] ** 2 / counts[used]) - 3.0 * (n + 1)
    return float(h / stats.tiecorrect(ranks)) / (n - 1)


def class_effect_leave_one_out(scores, labels) -> np.ndarray:
    """`class_effect` with each image left out in turn, (n,): the numbers of
    ``[class_effect(np.delete(scores, i), np.delete(labels, i)) for i in range(n)]``, bit for bit,
    without ranking n times. Leaving out image i lowers the average rank of every image scored above
    it by 1 and of every image tied with it by ½ (all ranks stay exact halves), and shrinks its tie
    group by one. A missing score or a one-image class changes nothing; images whose removal drops
    a class or leaves too few distinct scores are computed directly."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels)
    if scores.ndim != 1:
        raise ValueError(f"scores must hold one score per image (1-D); got shape {scores.shape}")
    if labels.shape != scores.shape:
        raise ValueError(f"scores and labels must have the same length; got {scores.size} and {labels.size}")
    result = np.full(scores.size, class_effect(scores, labels))  # leaving out an unused image changes nothing
    finite = np.flatnonzero(np.isfinite(scores))
    classes, index, sizes = np.unique(labels[finite], return_inverse=True, return_counts=True)
    used = sizes[index] > 1
    position, x, group = finite[used], scores[finite][used], index[used]
    direct = sizes[group] == 2  # leaving one out drops its class
    if np.unique(x).size < 3 or (sizes > 1).sum() < 2:
        direct[:] = True
    for i in position[direct]:
        result[i] = class_effect(np.delete(scores, i), np.delete(labels, i))
    if direct.all():
        return result
    n = x.size - 1  # images left
    ranks = stats.rankdata(x)
    member = group[:, None] == np.arange(classes.size)  # (images, classes)
    equal = x[None, :] == x[:, None]
    above = (x[None, :] > x[:, None]).astype(np.int64) @ member
    tied = equal.astype(np.int64) @ member - member
    sums = np.bincount(group, weights=ranks, minlength=classes.size) - above - 0.5 * tied - member * ranks[:, None]
    counts = np.bincount(group, minlength=classes.size) - member
    tie_sizes = equal.sum(axis=1).astype(np.float64)
    _, full_ties = np.unique(x, return_counts=True)
    full_ties = full_ties.astype(np.float64)
    ties = (full_ties**3 - full_ties).sum() - (tie_sizes**3 - tie_sizes) + ((tie_sizes - 1) ** 3 - (tie_sizes - 1))
    size = np.float64(n)
    for k in np.flatnonzero(~direct):
        keep = counts[k] > 0
        h = 12.0 / (n * (n + 1)) * np.sum(sums[k, keep] ** 2 / counts[k, keep]) - 3.0 * (n + 1)
        result[position[k]] = float(h / (1.0 - ties[k] / (size**3 - size))) / (n - 1)
    return result


def class_dependence(table: pd.DataFrame, variant: str, ci: bool = True) -> pd.DataFrame:
    """Per metric and method: Kruskal–Wallis H test of the per-image score across true classes, its
    effect size ε² = H/(n − 1), the per-image coefficient of variation (card §3, workshop claim), and
    ε² minus the Random map's ε² on the same metric and images with a leave-one-image-out jackknife
    95% t CI (`excess`, `excess_low`, `excess_high`): the Random map's score is class-dependent too
    (the image drives it), so a method's class dependence counts only beyond Random's. NaN scores
    are left out."""
    part = table[table["variant"] == variant]
    # one row per image (pivot_table(dropna=False) would add every image × label pair: rows with no
    # score that the jackknife would count as images)
    wide = part.pivot(index=["image", "label"], columns=["metric", "method"], values="score")
    labels = wide.index.get_level_values("label").to_numpy()
    rows, random_effects = [], {}  # per metric: Random's ε² and its leave-one-out values, computed once
    for (metric, method), one in part.groupby(["metric", "method"], sort=False):
        values = one["score"].to_numpy(dtype=float)
        groups = [g.dropna().to_numpy() for _, g in one.groupby("label")["score"]]
        groups = [g for g in groups if g.size > 1]
        h, p = np.nan, np.nan
        if len(groups) >= 2 and np.ptp(np.concatenate(groups)) > 0:
            test = stats.kruskal(*groups)
            h, p = float(test.statistic), float(test.pvalue)
        mean = np.nanmean(values)
        row = {"metric": metric, "method": method, "kruskal_h": h, "p_value": p,
               "epsilon2": class_effect(wide[(metric, method)].to_numpy(), labels),
               "cv": np.nanstd(values, ddof=1) / abs(mean) if mean else np.nan,
               "excess": np.nan, "excess_low": np.nan, "excess_high": np.nan}
        if ci and method != "random" and (metric, "random") in wide:
            if metric not in random_effects:
                random = wide[(metric, "random")].to_numpy()
                random_effects[metric] = class_effect(random, labels), class_effect_leave_one_out(random, labels)
            random_effect, random_leave_out = random_effects[metric]
            leave_out = class_effect_leave_one_out(wide[(metric, method)].to_numpy(), labels) - random_leave_out
            try:
                interval = metrics.jackknife_interval(row["epsilon2"] - random_effect, leave_out)
                row.update(excess=interval.estimate, excess_low=interval.low, excess_high=interval.high)
            except ValueError:
                pass
        rows.append(row)
    return pd.DataFrame(rows)


# ============================================================================ figures

def _method_palette(methods) -> dict:
    colours = sns.color_palette("tab10", n_colors=10)
    return {m: colours[METHODS.index(m) % 10] if m in METHODS else "grey" for m in methods}


def _heatmap(ax, frame: pd.DataFrame, *, vmin: float, vmax: float, cmap: str, fmt: str = ".2f", fontsize: int = 7,
             xrotation: int = 0, colorbar: str | None = None):
    """An annotated heatmap of a DataFrame (imshow + text: much faster than seaborn's for many panels)."""
    values = frame.to_numpy(dtype=float)
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            red, green, blue, _ = image.cmap(image.norm(value))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=fontsize,
                    color="white" if dark else "black")
    ax.set_xticks(range(values.shape[1]), [str(c) for c in frame.columns], rotation=xrotation,
                  ha="right" if xrotation else "center", rotation_mode="anchor")
    ax.set_yticks(range(values.shape[0]), [str(i) for i in frame.index])
    ax.tick_params(labelsize=8)
    ax.grid(False)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=colorbar, fraction=0.03, pad=0.02)
    return image


def plot_example_maps(selection: dict, maps: dict[str, torch.Tensor], n_examples: int = 4):
    """Image and every method's map for the first images (signed maps on a diverging scale)."""
    n_examples = min(n_examples, selection["images"].shape[0])
    names = list(maps)
    fig, axes = plt.subplots(n_examples, len(names) + 1, figsize=(1.45 * (len(names) + 1), 1.55 * n_examples),
                             squeeze=False)
    rows = []
    for i in range(n_examples):
        plots.show_image(axes[i, 0], selection["images"][i].cpu().numpy())
        axes[i, 0].set_ylabel(f"label {int(selection['labels'][i])}\npred {int(selection['predicted'][i])}", fontsize=8)
        for j, name in enumerate(names, start=1):
            saliency = maps[name][i].cpu().numpy()
            plots.show_map(axes[i, j], saliency, signed=name in SIGNED_METHODS)
            rows.append({"image": i, "method": name, "map_min": float(saliency.min()),
                         "map_max": float(saliency.max()), "map_abs_sum": float(np.abs(saliency).sum())})
    for j, name in enumerate(["image", *names]):
        axes[0, j].set_title(name.replace("_", "\n"), fontsize=8)
    fig.suptitle("signed maps (I×G, IG, DeepLift, LRP): blue < 0 < red; others: magma", fontsize=8, y=0.0)
    fig.tight_layout()
    return fig, pd.DataFrame(rows)


def plot_curves(curves: pd.DataFrame, variants: list[str]):
    """Mean MoRF (top) and LeRF (bottom) deletion curves per method, one column per variant."""
    part = curves[curves["variant"].isin(variants)]
    palette = _method_palette(part["method"].unique())
    fig, axes = plt.subplots(2, len(variants), figsize=(3.2 * len(variants), 5.8), sharex=True, squeeze=False)
    for row, order in enumerate(("morf", "lerf")):
        for col, variant in enumerate(variants):
            ax = axes[row, col]
            for method, line in part[(part["order"] == order) & (part["variant"] == variant)].groupby("method", sort=False):
                ax.plot(line["fraction_removed"], line["mean_score"], color=palette[method], label=method,
                        linestyle="--" if method in SIGNED_METHODS else "-", linewidth=1.3)
            ax.set_title(f"{order.upper()} · {variant}", fontsize=9)
            ax.set_xlabel("fraction of pixels replaced" if row == 1 else "")
            ax.set_ylabel("mean class score" if col == 0 else "")
            ax.tick_params(labelsize=8)
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.tight_layout()
    return fig, part.reset_index(drop=True)


MANY_VARIANTS = 12  # above this many variants the variant axis gets a figure row (or the y axis) of its own


def plot_rank_shift(summary: pd.DataFrame):
    """Each method's rank (by mean score) in every variant, one panel per metric: crossing lines = rankings move."""
    variants = list(dict.fromkeys(summary["variant"]))
    palette = _method_palette(summary["method"].unique())
    stacked = len(variants) > MANY_VARIANTS
    shape, size = ((len(METRICS), 1), (0.34 * len(variants) + 3, 3.0 * len(METRICS) + 1.5)) if stacked else \
        ((1, len(METRICS)), (0.42 * len(variants) * len(METRICS) + 3, 4.4))
    fig, axes = plt.subplots(*shape, figsize=size, sharey=True, sharex=stacked)
    for ax, metric in zip(axes, METRICS):
        part = summary[summary["metric"] == metric]
        for method, rows in part.groupby("method", sort=False):
            rows = rows.set_index("variant").loc[variants]
            ax.plot(range(len(variants)), rows["rank"], marker="o", ms=4, color=palette[method], label=method,
                    linestyle="--" if method in SIGNED_METHODS else "-", linewidth=1.3)
        ax.set_xticks(range(len(variants)), variants, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_title(METRIC_LABELS[metric])
        if stacked or ax is axes[0]:
            ax.set_ylabel("rank by mean score\n(1 = best)")
    axes[0].set_yticks(range(1, summary["method"].nunique() + 1))
    axes[0].invert_yaxis()
    axes[0 if stacked else -1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.tight_layout()
    return fig, summary[["variant", "metric", "method", "mean", "rank"]]


def plot_rank_frequency(summary: pd.DataFrame):
    """How often each method takes each rank across the variants, per metric (a row sums to the number of
    variants; a ranking that does not depend on the implementation puts a whole row into one cell)."""
    counts = summary.groupby(["metric", "method", "rank"]).size().rename("count").reset_index()
    methods = [m for m in METHODS if m in set(summary["method"])]
    ranks = range(1, len(methods) + 1)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.5 * len(METRICS) + 1.5, 3.6), sharey=True)
    for ax, metric in zip(axes, METRICS):
        grid = (counts[counts["metric"] == metric].pivot(index="method", columns="rank", values="count")
                .reindex(index=methods, columns=ranks).fillna(0))
        _heatmap(ax, grid, vmin=0, vmax=summary["variant"].nunique(), cmap="Blues", fmt=".0f")
        ax.set_title(METRIC_LABELS[metric], fontsize=10)
        ax.set_xlabel("rank by mean score (1 = best)", fontsize=9)
    fig.tight_layout()
    return fig, counts


def plot_alpha_heatmap(alphas: pd.DataFrame):
    """α per metric × variant, with all methods and without Random (variants as rows when there are many)."""
    sets = list(dict.fromkeys(alphas["methods"]))
    variants = list(dict.fromkeys(alphas["variant"]))
    many = len(variants) > MANY_VARIANTS
    shape, size = ((1, len(sets)), (5.2 * len(sets), 0.3 * len(variants) + 1.8)) if many else \
        ((len(sets), 1), (0.8 * len(variants) + 3, 2.3 * len(sets) + 1.0))
    fig, axes = plt.subplots(*shape, figsize=size, squeeze=False)
    for ax, name in zip(axes.flat, sets):
        grid = (alphas[alphas["methods"] == name].pivot(index="metric", columns="variant", values="alpha")
                .reindex(index=list(METRICS), columns=variants).rename(index=METRIC_LABELS))
        _heatmap(ax, grid.T if many else grid, vmin=0, vmax=1, cmap="RdYlGn", xrotation=30 if many else 45,
                 colorbar="α", fontsize=8)
        ax.set_title(f"Krippendorff's α (ordinal, ranks within images), {name}\n"
                     f"(≥ {metrics.KRIPPENDORFF_RELIABLE} reliable, ≥ {metrics.KRIPPENDORFF_TENTATIVE} tentative)",
                     fontsize=9)
    fig.tight_layout()
    return fig, alphas


def plot_alpha_ci(alphas: pd.DataFrame):
    """α with its jackknife CI per variant (x) and metric (colour), with Krippendorff's 0.667 and 0.8 lines;
    one row per method set."""
    sets = list(dict.fromkeys(alphas["methods"]))
    variants = list(dict.fromkeys(alphas["variant"]))
    fig, axes = plt.subplots(len(sets), 1, figsize=(0.5 * len(variants) + 4, 3.6 * len(sets) + 0.8), sharex=True,
                             squeeze=False)
    colours = dict(zip(METRICS, sns.color_palette("deep", len(METRICS))))
    offsets = dict(zip(METRICS, np.linspace(-0.27, 0.27, len(METRICS))))
    for ax, name in zip(axes[:, 0], sets):
        part = alphas[alphas["methods"] == name]
        for metric in METRICS:
            rows = part[part["metric"] == metric].set_index("variant").reindex(variants)
            # the jackknife interval is centred on the bias-corrected estimate, so it may miss α itself: clip at 0
            err = np.vstack([rows["alpha"] - rows["low"], rows["high"] - rows["alpha"]]).clip(min=0)
            ax.errorbar(np.arange(len(variants)) + offsets[metric], rows["alpha"], yerr=np.nan_to_num(err), fmt="o",
                        ms=4, capsize=2, color=colours[metric], label=METRIC_LABELS[metric])
        for level, style in ((metrics.KRIPPENDORFF_TENTATIVE, ":"), (metrics.KRIPPENDORFF_RELIABLE, "--")):
            ax.axhline(level, color="black", linestyle=style, linewidth=1)
            ax.annotate(f"{level}", (1.0, level), xycoords=("axes fraction", "data"), xytext=(2, 0),
                        textcoords="offset points", va="center", fontsize=8)
        ax.set_xticks(range(len(variants)), variants, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("Krippendorff's α\n(95% jackknife CI)")
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.06, 1), fontsize=8)
    fig.tight_layout()
    return fig, alphas


def plot_inter_method(table: pd.DataFrame, variants: list[str]):
    """Spearman ρ between methods across images, one matrix per variant (rows) and metric (columns)."""
    matrices = inter_method_matrices(table, variants)
    fig, axes = plt.subplots(len(variants), len(METRICS), figsize=(4.0 * len(METRICS), 3.9 * len(variants)),
                             squeeze=False)
    rows = []
    for (variant, metric), matrix in matrices.items():
        ax = axes[variants.index(variant), METRICS.index(metric)]
        short = [m.replace("integrated_gradients", "IG").replace("input_x_gradient", "I×G").replace("_", " ")
                 for m in matrix.index]
        _heatmap(ax, matrix.set_axis(short, axis=0).set_axis(short, axis=1), vmin=-1, vmax=1, cmap="vlag",
                 fmt=".1f", fontsize=6, xrotation=60)
        ax.set_title(f"{METRIC_LABELS[metric]} · {variant}\nmean off-diagonal ρ = {np.nanmean(_off_diagonal(matrix)):.2f}",
                     fontsize=9)
        long = matrix.rename_axis(index="method_a", columns="method_b").stack().rename("rho").reset_index()
        rows.append(long.assign(variant=variant, metric=metric))
    fig.tight_layout()
    return fig, pd.concat(rows, ignore_index=True)


def plot_internal_consistency(consistency: pd.DataFrame, variants: list[str]):
    """Spearman ρ between every pair of sign-aligned metrics (rows) per method (columns), one panel per variant."""
    methods = [m for m in METHODS if m in set(consistency["method"])]
    part = consistency[consistency["variant"].isin(variants)].reset_index(drop=True)
    pair = part["metric_a"].map(METRIC_LABELS) + " vs " + part["metric_b"].map(METRIC_LABELS)
    part = part.assign(pair=pair)
    fig, axes = plt.subplots(1, len(variants), figsize=(0.75 * len(methods) * len(variants) + 3.5, 3.8),
                             squeeze=False, sharey=True)
    for ax, variant in zip(axes[0], variants):
        grid = part[part["variant"] == variant].pivot(index="pair", columns="method", values="rho")
        grid = grid.reindex(index=list(dict.fromkeys(part["pair"])), columns=methods)
        _heatmap(ax, grid, vmin=-1, vmax=1, cmap="vlag", xrotation=60, fontsize=7)
        ax.set_title(f"internal consistency (Spearman ρ) · {variant}", fontsize=9)
    fig.tight_layout()
    return fig, part


def plot_replacement_sensitivity(sensitivity: pd.DataFrame, granularity: str, output: str, sign: str):
    """ρ between each metric's per-image scores under mean replacement and under each other replacement."""
    part = sensitivity[(sensitivity["granularity"] == granularity) & (sensitivity["output"] == output)
                       & (sensitivity["sign"] == sign)]
    others = list(dict.fromkeys(part["replacement"]))
    methods = [m for m in METHODS if m in set(part["method"])]
    fig, axes = plt.subplots(1, len(others), figsize=(0.6 * len(methods) * len(others) + 2.5, 3.4), squeeze=False,
                             sharey=True)
    for ax, other in zip(axes[0], others):
        grid = (part[part["replacement"] == other].pivot(index="metric", columns="method", values="rho")
                .reindex(index=list(METRICS), columns=methods).rename(index=METRIC_LABELS))
        _heatmap(ax, grid, vmin=-1, vmax=1, cmap="vlag", xrotation=60, fontsize=7)
        ax.set_title(f"per-image ρ, mean vs {REPLACEMENT_LABELS[other]} ({granularity}, {output})", fontsize=9)
    fig.tight_layout()
    return fig, part.reset_index(drop=True)


def plot_class_dependence(table: pd.DataFrame, variant: str, metric: str = "aopc_morf"):
    """Mean per-image score by true class (columns) and method (rows): class-dependent fidelity shows as columns."""
    part = table[(table["variant"] == variant) & (table["metric"] == metric)]
    grid = part.pivot_table(index="method", columns="label", values="score", aggfunc="mean")
    grid = grid.reindex([m for m in METHODS if m in grid.index])
    fig, ax = plt.subplots(figsize=(0.6 * grid.shape[1] + 3.5, 0.4 * grid.shape[0] + 1.3))
    _heatmap(ax, grid, vmin=float(np.nanmin(grid.to_numpy())), vmax=float(np.nanmax(grid.to_numpy())), cmap="mako",
             colorbar=f"mean {METRIC_LABELS[metric]}")
    ax.set_title(f"{METRIC_LABELS[metric]} by true class · {variant}", fontsize=10)
    ax.set_xlabel("true class")
    fig.tight_layout()
    return fig, grid.reset_index()


# ============================================================================ all analyses at once

def analyse(table: pd.DataFrame, variants: list[Variant], alpha_ci: bool = True, seed: int = 0,
            model_units: str | None = None) -> dict:
    """Every analysis of card §5.5 on the long table (each one a group-by of it), and the intervals
    the findings' rules read. `seed` is the seed of the one trained model and `model_units` the
    model's part of `units` (default "one trained model (seed …)"; `model_run["units"]`)."""
    primary = {v.replacement: v.label for v in primary_variants(variants)}
    if not {"dataset_mean", "uniform"} <= set(primary):
        raise ValueError(f"the analyses compare mean and uniform replacement at the first granularity, score and "
                         f"sign ({variants[0].label}); these variants have only {sorted(primary)}")
    methods = [m for m in METHODS if m in set(table["method"])]
    real = [m for m in methods if m not in NULL_METHODS]
    pilot = [m for m in PILOT_METHODS if m in methods]
    pair = (primary["dataset_mean"], primary["uniform"])
    n_images = int(table["image"].nunique())
    return {
        "summary": method_summary(table),
        "alphas": alpha_table(table, ci=alpha_ci),
        "inter_method": inter_method_summary(table),
        "inter_method_pilot": inter_method_summary(table, exclude=[m for m in methods if m not in pilot]),
        "consistency": internal_consistency_table(table),
        "sensitivity": replacement_sensitivity(table),
        "classes": class_dependence(table, primary["dataset_mean"]),
        "ranking_shift": ranking_shift(table, *pair, seed=seed),
        "alpha_shift": alpha_shift(table, *pair),
        "inter_method_ci": inter_method_ci(table, {"mean": pair[0], "uniform": pair[1]}, pilot),
        "random_vs_real": random_vs_real(table, real),
        "primary": primary,
        "real_methods": real,
        "pilot_methods": pilot,
        "methods": methods,
        "n_images": n_images,
        "units": f"{n_images} images, {model_units or f'one trained model (seed {seed})'}",
    }


# ============================================================================ intervals behind the findings

def _stacked(table: pd.DataFrame, metric: str, variants, methods=None) -> tuple[np.ndarray, list[str]]:
    """(n_images, n_methods, len(variants)) scores of one metric; NaN where undefined."""
    frames = [score_matrix(table, metric, v, methods) for v in variants]
    columns = list(frames[0].columns)
    images = frames[0].index
    return np.stack([f.reindex(index=images, columns=columns).to_numpy(dtype=float) for f in frames], axis=2), columns


def _jackknife(statistic, data) -> tuple[float, float, float]:
    try:
        interval = metrics.jackknife_ci(statistic, data)
        return interval.estimate, interval.low, interval.high
    except ValueError:
        return np.nan, np.nan, np.nan


def ranking_shift(table: pd.DataFrame, reference: str, other: str, seed: int = 0, n_resamples: int = 1000) -> pd.DataFrame:
    """Per metric: Spearman ρ between the methods' mean scores under two variants (the agreement of the
    two rankings; 1 = same order), with a 95% percentile bootstrap CI over images
    (`findings.bootstrap_units`, images resampled with both variants' scores together). Not a jackknife:
    ρ of a handful of means is a step function of the data, and leave-one-out pseudo-values of a
    non-smooth statistic give intervals that can miss the estimate."""
    rows = []
    for metric in METRICS:
        data, _ = _stacked(table, metric, (reference, other))

        def rho(images):  # scipy resamples the image indices; each index carries its image's scores
            d = data[images.astype(int)]
            return stats.spearmanr(np.nanmean(d[:, :, 0], axis=0), np.nanmean(d[:, :, 1], axis=0)).statistic

        estimate = float(rho(np.arange(data.shape[0])))
        low = high = np.nan
        if np.isfinite(estimate):
            _, low, high = bootstrap_units(rho, data.shape[0], n_resamples=n_resamples, seed=seed)
        rows.append({"metric": metric, "rho": estimate, "low": low, "high": high, "n": data.shape[0]})
    return pd.DataFrame(rows)


def alpha_shift(table: pd.DataFrame, reference: str, other: str, methods=None) -> pd.DataFrame:
    """Per metric: α(reference variant) − α(other variant) on the same images (those with ≥ 2 defined
    scores in both), with a leave-one-image-out jackknife 95% t CI."""
    rows = []
    for metric in METRICS:
        data, _ = _stacked(table, metric, (reference, other), methods)
        data = data[((~np.isnan(data)).sum(axis=1) >= 2).all(axis=1)]
        up = HIGHER_IS_BETTER[metric]

        def difference(d):
            return (metrics.krippendorff_alpha(d[:, :, 0], higher_is_better=up, missing="omit")
                    - metrics.krippendorff_alpha(d[:, :, 1], higher_is_better=up, missing="omit"))

        estimate, low, high = _jackknife(difference, data)
        rows.append({"metric": metric, "diff": estimate, "low": low, "high": high, "n": data.shape[0]})
    return pd.DataFrame(rows)


def mean_off_diagonal_rho(matrix: np.ndarray) -> float:
    """Mean over method pairs of the Spearman ρ across images (pairwise-complete; NaN pairs left out)."""
    rho = pd.DataFrame(matrix).corr(method="spearman").to_numpy()
    return float(np.nanmean(rho[np.triu_indices(rho.shape[0], k=1)]))


def inter_method_ci(table: pd.DataFrame, variants: dict[str, str], methods) -> pd.DataFrame:
    """Per replacement: AOPC-MoRF's mean off-diagonal inter-method ρ (over `methods`), and its excess
    over Faithfulness's on the same images, each with a leave-one-image-out jackknife 95% t CI."""
    rows = []
    for name, variant in variants.items():
        morf, _ = _stacked(table, "aopc_morf", [variant], methods)
        faith, _ = _stacked(table, "faithfulness", [variant], methods)
        data = np.concatenate([morf, faith], axis=2)
        for quantity, statistic in (
            ("morf", lambda d: mean_off_diagonal_rho(d[:, :, 0])),
            ("morf_minus_faithfulness", lambda d: mean_off_diagonal_rho(d[:, :, 0]) - mean_off_diagonal_rho(d[:, :, 1])),
        ):
            estimate, low, high = _jackknife(statistic, data)
            rows.append({"replacement": name, "variant": variant, "quantity": quantity, "estimate": estimate,
                         "low": low, "high": high, "n": data.shape[0], "n_methods": data.shape[1]})
    return pd.DataFrame(rows)


def random_vs_real(table: pd.DataFrame, real_methods, level: float = 0.95) -> pd.DataFrame:
    """Per metric × variant × real method: the mean per-image difference of sign-aligned scores, Random
    minus the method (> 0: Random is better), with the paired t CI (`scipy.stats.ttest_rel`) at level
    1 − (1 − level)/k, Bonferroni over the k real methods of the cell; NaN pairs left out."""
    aligned = with_aligned(table)
    wide = aligned.pivot_table(index=["metric", "variant", "image"], columns="method", values="aligned", dropna=False)
    confidence = 1 - (1 - level) / max(1, len(real_methods))
    rows = []
    for (metric, variant), part in wide.groupby(level=["metric", "variant"], sort=False):
        for method in real_methods:
            pair = part[["random", method]].dropna()
            row = {"metric": metric, "variant": variant, "method": method, "diff": np.nan, "low": np.nan,
                   "high": np.nan, "n": len(pair), "level": confidence}
            if len(pair) >= 3:
                difference = pair["random"].to_numpy() - pair[method].to_numpy()
                row["diff"] = float(difference.mean())
                if np.ptp(difference) == 0:
                    row.update(low=row["diff"], high=row["diff"])
                else:
                    ci = stats.ttest_rel(pair["random"], pair[method]).confidence_interval(confidence_level=confidence)
                    row.update(low=float(ci.low), high=float(ci.high))
            rows.append(row)
    return pd.DataFrame(rows)


def ranking_table(summary: pd.DataFrame, variants: list[str]) -> pd.DataFrame:
    """Method ranks (1 = best) per metric under the given variants, side by side."""
    part = summary[summary["variant"].isin(variants)]
    wide = part.pivot_table(index="method", columns=["metric", "variant"], values="rank")
    order = [(m, v) for m in METRICS for v in variants]
    wide = wide.reindex(columns=pd.MultiIndex.from_tuples(order, names=["metric", "variant"]))
    wide = wide.rename(columns=METRIC_LABELS, level=0)
    return wide.reindex([m for m in METHODS if m in wide.index]).astype(int)


# ============================================================================ comparison with the card and findings

def pilot_alpha_comparison(table: pd.DataFrame, variants: list[Variant]) -> pd.DataFrame:
    """The card's [pilot] α table next to this run's α at the same settings (mean / uniform, first
    granularity and score), with the pilot's six methods and with all of this run's methods, each as
    "all / without Random". The paper has no numbers."""
    chosen = {v.replacement: v.label for v in primary_variants(variants) if v.replacement in ("dataset_mean", "uniform")}
    methods = [m for m in METHODS if m in set(table["method"])]
    pilot = [m for m in PILOT_METHODS if m in methods]
    sets = {"pilot": pilot, "pilot-": [m for m in pilot if m != "random"],
            "all": methods, "all-": [m for m in methods if m != "random"]}
    alphas = alpha_table(table[table["variant"].isin(chosen.values())], sets, ci=False)
    alpha = alphas.set_index(["metric", "variant", "methods"])["alpha"]
    rows = []
    for metric in ("faithfulness", "aopc_morf", "abpc", "aopc_lerf"):
        for replacement, label in chosen.items():
            rows.append({"metric": METRIC_LABELS[metric], "replacement": REPLACEMENT_LABELS[replacement], "paper": "n/a",
                         "project pilot": "{:.3f} / {:.3f}".format(*PILOT_ALPHA[(metric, replacement)]),
                         f"this run, pilot's {len(pilot)} methods":
                             f"{alpha[(metric, label, 'pilot')]:.3f} / {alpha[(metric, label, 'pilot-')]:.3f}",
                         f"this run, all {len(methods)} methods":
                             f"{alpha[(metric, label, 'all')]:.3f} / {alpha[(metric, label, 'all-')]:.3f}"})
    return pd.DataFrame(rows)


def _range(values) -> str:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return "n/a" if values.size == 0 else f"{values.min():.2f} to {values.max():.2f}"


def _pair_rho(results: dict, a: str, b: str, variants: list[str]) -> pd.Series:
    c = results["consistency"]
    chosen = (c["metric_a"] == a) & (c["metric_b"] == b) & c["method"].isin(results["real_methods"])
    return c[chosen & c["variant"].isin(variants)]["rho"]


def pilot_numbers_comparison(results: dict, variants: list[Variant], accuracy: float, n_images: int,
                             seconds: tuple[float, float] | None = None) -> pd.DataFrame:
    """The card's other [pilot] numbers (§3) next to this run's; the paper column is n/a throughout.
    `seconds` = (wall, CPU) seconds of the metric step, None when it came from the cache."""
    mean_label, uniform_label = results["primary"]["dataset_mean"], results["primary"]["uniform"]
    inter = results.get("inter_method_pilot", results["inter_method"]).set_index(["variant", "metric"])["mean"]
    first = variants[0]
    sens = results["sensitivity"]
    sens = sens[(sens["replacement"] == "uniform") & (sens["granularity"] == first.granularity)
                & (sens["output"] == first.output) & (sens["sign"] == first.sign)]
    summary = results["summary"].set_index(["variant", "metric", "method"])["rank"]
    n_methods = len(results["methods"])
    rows = [
        ("test accuracy", "0.990", f"{accuracy:.3f}"),
        ("images evaluated", "200", str(n_images)),
        ("replacement sensitivity: per-image ρ mean vs uniform, metrics × methods", "0.28 to 0.77", _range(sens["rho"])),
        ("inter-method ρ of AOPC-MoRF, mean off-diagonal, pilot's six methods (mean / uniform)", "0.64 / 0.57",
         f"{inter[(mean_label, 'aopc_morf')]:.2f} / {inter[(uniform_label, 'aopc_morf')]:.2f}"),
        ("inter-method ρ of Faithfulness and ABPC, mean off-diagonal, pilot's six methods", "0.14 to 0.31",
         _range([inter[(v, m)] for v in (mean_label, uniform_label) for m in ("faithfulness", "abpc")])),
        ("internal consistency MoRF vs aligned LeRF (real methods)", "-0.15 to 0.19",
         _range(_pair_rho(results, "aopc_morf", "aopc_lerf", [mean_label, uniform_label]))),
        ("internal consistency MoRF vs Faithfulness (real methods)", "0.46 to 0.63",
         _range(_pair_rho(results, "aopc_morf", "faithfulness", [mean_label, uniform_label]))),
        ("internal consistency MoRF vs ABPC, mean replacement (real methods)", "0.93 to 0.99",
         _range(_pair_rho(results, "aopc_morf", "abpc", [mean_label]))),
        ("rank of Random on ABPC / AOPC-LeRF, uniform replacement", "3 / 3 of 6",
         f"{summary[(uniform_label, 'abpc', 'random')]} / {summary[(uniform_label, 'aopc_lerf', 'random')]} of {n_methods}"),
        ("wall time of the metric step", "572 s (unbatched, 200 images, 2 cores)",
         "n/a (cached)" if seconds is None else f"{seconds[0]:.0f} s ({seconds[1]:.0f} s CPU), all variants"),
    ]
    table = pd.DataFrame(rows, columns=["quantity", "project pilot", "this run"])
    return table.assign(paper="n/a")[["quantity", "paper", "project pilot", "this run"]]


def scale_table(s: dict, bundle: dict, model_run: dict, methods: list[str], skipped: dict, variants: list[Variant],
                geo: Geometry) -> pd.DataFrame:
    """The scale of this run next to the card's recipe (§5) and the paper (§2, mostly n/a)."""
    side = bundle["image_size"]
    used = ", ".join(methods) + (f" (skipped: {', '.join(skipped)})" if skipped else "")
    trained = model_run["n_train"] is not None  # dataset="folder": your weights, nothing trained here
    rows = [
        ("data", "CIFAR-10 (unverified)", "digits 16×16 (D1); SynthCIFAR / CIFAR-10 32×32",
         f"{bundle['name']} {side}×{side}×{bundle['channels']}"),
        ("training images", "45,000 [code]", "1,400 (D1) / 5,000 / 45,000",
         f"{model_run['n_train']:,}" if trained else "n/a (not trained here: weights from weights_path)"),
        ("model", "mini-VGG 32-64-128 [code]", "pilot CNN width 16 (D1) / mini-VGG 16-32-64",
         f"{model_run['architecture']}, width {s['width']}" if trained else
         f"{model_run['architecture']} ({model_run.get('weights', 'weights_path')})"),
        ("epochs", "early stopping, patience 50 [code]", "15 (D1) / ≤ 20", str(s["epochs"]) if trained else "n/a"),
        ("test accuracy", "n/a", "≈ 0.99 (D1)", f"{model_run['test_accuracy']:.3f}"
         + ("" if trained else " (the evaluated images)")),
        ("images evaluated", "n/a", "200", str(s["n_images"])),
        ("methods", "n/a (unverified: Random, Sobel, Gradient, I×G, SmoothGrad, Deep Taylor, ε-LRP)",
         "Random, Sobel, Gradient, I×G, IG, SmoothGrad (+ optional LRP)", used),
        ("IG steps / SmoothGrad samples", "n/a", "32 / 25", f"{s['ig_steps']} / {s['smoothgrad_samples']}"),
        ("AOPC: L, pixels per step", "n/a (Samek: 100 steps of 9×9, unverified)", "32, 4 px (D1) / 16 px",
         f"{geo.steps}, {geo.pixels_per_step} px"),
        ("metric variants", "n/a (at least mean vs uniform, unverified)",
         "replacement × granularity × prob/logit (× abs)", str(len(variants))),
        ("α CI", "n/a", "optional (bootstrap BCa)",
         "leave-one-image-out jackknife t interval" if s["alpha_ci"] else "none"),
    ]
    return pd.DataFrame(rows, columns=["setting", "paper", "card recipe", "this run"])


def quirk_choices(s: dict, geo: Geometry) -> pd.DataFrame:
    """The card's quirks Q1–Q10 and the choice this run makes."""
    folder = s.get("dataset") == "folder"
    mean = ("mean = the per-channel mean of the evaluated images (dataset='folder' has no training set)" if folder
            else "mean = train-set mean")
    rows = [
        ("Q1", "no metric code released",
         "every metric re-implemented from the card's formulas (study.metrics); variant settings printed"),
        ("Q2", "probability vs logit: n/a",
         f"primary score: {s['score']} of the predicted class; the other as extra variants"),
        ("Q3", "AOPC normalisation", "1/(L+1) with the k = 0 term"),
        ("Q4", "Quantus' replacement semantics differ",
         f"own perturbation loop; {mean}, uniform = one U(0,1) image per test image shared by all "
         f"methods and metrics, zero = black, blur = Gaussian σ {geo.blur_sigma:g} px (kernel {geo.blur_kernel_size})"),
        ("Q5", "argsort is not a rank",
         "α on scipy rankdata ranks within each image (ties averaged); mean-score rankings break exact ties by method order"),
        ("Q6", "a 2-D Spearman call mixes in the diagonal", "ρ computed per pair"),
        ("Q7", "AOPC-LeRF is lower-is-better", "negated before ranking and before correlating"),
        ("Q8", "tied saliency values", "stable sort: tied features go in raster order"),
        ("Q9", "maps of the pre-softmax model, predicted class", "gradients of the predicted class's logit"),
        ("Q10", "mini-VGG variant: n/a",
         "not applicable: your model from weights_path, not trained here" if folder else
         "with bias, hard labels; L2 1e-4 as Adam weight decay on all weights (card: convolutions only)"),
        ("extra", "faithfulness is undefined when no single-feature replacement moves the score",
         "stored as NaN (missing) and counted; left out of means, ranks, α and correlations"),
    ]
    return pd.DataFrame(rows, columns=["quirk", "issue", "choice in this run"])


TENTATIVE = metrics.KRIPPENDORFF_TENTATIVE


def _require(frame, columns, what: str) -> pd.DataFrame:
    if not isinstance(frame, pd.DataFrame) or frame.empty:
        raise ValueError(f"{what} needs a non-empty DataFrame with columns {list(columns)}")
    missing = [c for c in columns if c not in frame]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}; it needs {list(columns)}")
    return frame


def count_verdict(certain: int, possible: int, needed: int) -> str:
    """Verdict of a rule that needs `needed` cells to pass, from the cells whose interval passes
    wholly (`certain`) and those whose interval at least reaches the passing side (`possible` ≥
    `certain`): reproduced when certain ≥ needed, not reproduced when possible < needed, else
    inconclusive (the count's own interval [certain, possible] straddles the requirement)."""
    if needed < 1 or not 0 <= certain <= possible:
        raise ValueError(f"need 0 <= certain <= possible and needed >= 1; got {certain}, {possible}, {needed}")
    return interval_verdict(float(certain), float(possible), needed - 0.5)


def all_of(verdicts) -> str:
    """A conjunction of interval verdicts: reproduced when every part is; not reproduced when some part
    is not and none is (partly reproduced when others are); otherwise inconclusive."""
    verdicts = list(verdicts)
    if not verdicts:
        raise ValueError("all_of needs at least one verdict")
    if all(v == "reproduced" for v in verdicts):
        return "reproduced"
    if "not reproduced" in verdicts:
        return "partly reproduced" if "reproduced" in verdicts else "not reproduced"
    return "inconclusive"


def _majority(total: int) -> int:
    return total // 2 + 1


def _ci(estimate, low, high) -> str:
    return "undefined" if not np.isfinite(estimate) else f"{estimate:.2f} [{low:.2f}, {high:.2f}]"


def _row(claim: str, this_run: str, verdict: str, rule: str, n: str, uncertainty: str) -> dict:
    return {"claim": claim, "paper": "n/a", "this_run": f"{this_run} [rule: {rule}]", "verdict": verdict, "n": n,
            "uncertainty": uncertainty}


def _cells(frame, low: str, high: str, passes, reaches) -> tuple[int, int, int]:
    finite = frame[np.isfinite(frame[low]) & np.isfinite(frame[high])]
    certain = int(sum(passes(a, b) for a, b in zip(finite[low], finite[high])))
    possible = int(sum(reaches(a, b) for a, b in zip(finite[low], finite[high])))
    return certain, possible, len(finite)


def _not_tested(claim: str, units: str) -> dict:
    """A count rule none of whose cells has a defined interval (e.g. `alpha_ci=False`): nothing to count."""
    return _row(claim, "not tested: no cell has a defined 95% interval (alpha_ci=False skips α's; too few images "
                "leave correlations undefined)", "not tested", "counts cells by their intervals", units,
                "not estimated (no cell with a defined interval)")


def _share_text(certain: int, possible: int, total: int, what: str) -> str:
    return f"{certain} of {total} cells wholly {what}, {possible - certain} straddle"


CLAIMS = {
    "ranking": "(abstract) Implementation choices change the measured fidelity and the method ranking",
    "alpha": "(abstract) Saliency metrics can be statistically unreliable (read: low inter-rater α)",
    "consistency": "(abstract) Saliency metrics can be inconsistent (read: low internal consistency)",
    "classes": "(workshop) A method's per-image fidelity depends on the image class, beyond the Random map's",
    "alpha_shift": "(unverified recollection) α differs markedly between mean and random (uniform) replacement",
    "inter_method": "(unverified recollection) AOPC-MoRF has a high inter-method ρ with the card's six methods "
                    "(the image, not the method, drives it)",
    "morf_lerf": "(unverified recollection) MoRF and LeRF are weakly correlated (|ρ| < 0.5)",
    "random": "[pilot] The Random map outranks a real method under some variants",
}


def rule_ranking_shift(cells: pd.DataFrame, units: str) -> dict:
    """Rule 1: the ranking ρ (mean vs uniform replacement) has its 95% CI wholly below 0.8 for ≥ 2 of the metrics."""
    _require(cells, ["metric", "rho", "low", "high"], "rule_ranking_shift")
    certain, possible, total = _cells(cells, "low", "high", lambda lo, hi: hi < 0.8, lambda lo, hi: lo < 0.8)
    if total == 0:
        return _not_tested(CLAIMS["ranking"], units)
    needed = min(2, total)
    text = "ranking ρ of the method means, mean vs uniform: " + ", ".join(
        f"{METRIC_LABELS.get(m, m)} {_ci(r, lo, hi)}" for m, r, lo, hi in
        zip(cells["metric"], cells["rho"], cells["low"], cells["high"]))
    return _row(CLAIMS["ranking"], text, count_verdict(certain, possible, needed),
                f"reproduced if the 95% CI of the ranking ρ lies wholly below 0.8 for ≥ {needed} of {len(cells)} metrics; "
                f"not reproduced if fewer CIs than that reach below 0.8", units,
                f"95% percentile bootstrap CI over images per metric; {certain} of {total} metrics wholly below 0.8, "
                f"{possible - certain} straddle")


def rule_low_alpha(alphas: pd.DataFrame, units: str) -> dict:
    """Rule 2: α's CI lies wholly below 0.667 in more than half of the metric × variant cells."""
    _require(alphas, ["metric", "variant", "alpha", "low", "high"], "rule_low_alpha")
    certain, possible, total = _cells(alphas, "low", "high", lambda lo, hi: hi < TENTATIVE, lambda lo, hi: lo < TENTATIVE)
    if total == 0:
        return _not_tested(CLAIMS["alpha"], units)
    needed = _majority(total)
    text = (f"α from {alphas['alpha'].min():.2f} to {alphas['alpha'].max():.2f} over {len(alphas)} metric × variant "
            f"cells (all methods); {int((alphas['alpha'] < TENTATIVE).sum())} point estimates below {TENTATIVE}")
    return _row(CLAIMS["alpha"], text, count_verdict(certain, possible, needed),
                f"reproduced if α's 95% CI lies wholly below {TENTATIVE} in more than half ({needed}) of the "
                f"{total} cells; not reproduced if fewer than {needed} CIs reach below it", units,
                "95% jackknife t CI over images per cell; " + _share_text(certain, possible, total, f"below {TENTATIVE}"))


def rule_inconsistent(cells: pd.DataFrame, units: str) -> dict:
    """Rule 3: internal-consistency ρ has its CI wholly below 0.5 in more than half of the cells."""
    _require(cells, ["rho", "low", "high"], "rule_inconsistent")
    certain, possible, total = _cells(cells, "low", "high", lambda lo, hi: hi < 0.5, lambda lo, hi: lo < 0.5)
    if total == 0:
        return _not_tested(CLAIMS["consistency"], units)
    needed = _majority(total)
    text = (f"ρ between sign-aligned metric pairs, real methods × variants × pairs: median {cells['rho'].median():.2f} "
            f"(range {_range(cells['rho'])})")
    return _row(CLAIMS["consistency"], text, count_verdict(certain, possible, needed),
                f"reproduced if ρ's 95% CI lies wholly below 0.5 in more than half ({needed}) of the {total} cells "
                f"(then the median is below 0.5); not reproduced if fewer than {needed} reach below it", units,
                "95% Fisher-z CI of Spearman ρ per cell; " + _share_text(certain, possible, total, "below 0.5"))


def rule_class_dependence(cells: pd.DataFrame, units: str) -> dict:
    """Rule 4: a real method's class effect ε² exceeds Random's (CI of the excess > 0) in more than half of the cells."""
    _require(cells, ["metric", "method", "excess", "excess_low", "excess_high"], "rule_class_dependence")
    certain, possible, total = _cells(cells, "excess_low", "excess_high", lambda lo, hi: lo > 0, lambda lo, hi: hi > 0)
    if total == 0:  # e.g. your folder with one evaluated image per class: no class effect can be measured
        return _row(CLAIMS["classes"], "not tested: no class effect could be measured (it needs at least two classes "
                    "with two or more evaluated images each, and scores that vary); raise n_images or evaluate fewer "
                    "classes", "not tested", "class effect ε² − ε²(Random) with a defined interval", units,
                    "not estimated (no cell with a defined interval)")
    needed = _majority(total)
    text = (f"class effect ε² (Kruskal–Wallis H/(n−1)) minus the Random map's, real method × metric cells at mean "
            f"replacement: median {cells['excess'].median():.3f} (range {_range(cells['excess'])})")
    return _row(CLAIMS["classes"], text, count_verdict(certain, possible, needed),
                f"reproduced if the 95% CI of ε² − ε²(Random) lies wholly above 0 in more than half ({needed}) of the "
                f"{total} cells; not reproduced if fewer than {needed} reach above 0", units,
                "95% jackknife t CI over images per cell; " + _share_text(certain, possible, total, "above 0"))


def rule_alpha_shift(cells: pd.DataFrame, units: str) -> dict:
    """Rule 5: |α(mean) − α(uniform)| has its CI wholly beyond 0.1 for ≥ 2 metrics."""
    _require(cells, ["metric", "diff", "low", "high"], "rule_alpha_shift")
    certain, possible, total = _cells(cells, "low", "high", lambda lo, hi: lo > 0.1 or hi < -0.1,
                                      lambda lo, hi: hi > 0.1 or lo < -0.1)
    if total == 0:
        return _not_tested(CLAIMS["alpha_shift"], units)
    needed = min(2, total)
    text = "α(mean) − α(uniform): " + ", ".join(
        f"{METRIC_LABELS.get(m, m)} {_ci(d, lo, hi)}" for m, d, lo, hi in
        zip(cells["metric"], cells["diff"], cells["low"], cells["high"]))
    return _row(CLAIMS["alpha_shift"], text, count_verdict(certain, possible, needed),
                f"reproduced if the 95% CI of α(mean) − α(uniform) lies wholly beyond ±0.1 for ≥ {needed} of "
                f"{len(cells)} metrics; not reproduced if fewer CIs than that reach beyond ±0.1", units,
                f"95% jackknife t CI over images per metric; {certain} of {total} wholly beyond ±0.1, "
                f"{possible - certain} straddle")


def rule_inter_method(cells: pd.DataFrame, units: str, context: str = "") -> dict:
    """Rule 6: with the card's six methods, AOPC-MoRF's mean off-diagonal ρ has its CI above 0.5 and above
    Faithfulness's (CI of the difference above 0), under mean and under uniform replacement."""
    _require(cells, ["replacement", "quantity", "estimate", "low", "high"], "rule_inter_method")
    thresholds = {"morf": 0.5, "morf_minus_faithfulness": 0.0}
    unknown = sorted(set(cells["quantity"]) - set(thresholds))
    if unknown:
        raise ValueError(f"rule_inter_method: unknown quantities {unknown}; expected {sorted(thresholds)}")
    verdicts = [interval_verdict(lo, hi, thresholds[q]) if np.isfinite(lo) and np.isfinite(hi) else "inconclusive"
                for q, lo, hi in zip(cells["quantity"], cells["low"], cells["high"])]
    names = {"morf": "AOPC-MoRF mean off-diagonal ρ", "morf_minus_faithfulness": "minus Faithfulness's"}
    methods = int(cells["n_methods"].iloc[0]) if "n_methods" in cells else None
    text = (f"{methods} methods: " if methods else "") + "; ".join(
        f"{names[q]} ({r}) {_ci(e, lo, hi)}" for r, q, e, lo, hi in
        zip(cells["replacement"], cells["quantity"], cells["estimate"], cells["low"], cells["high"])) + context
    return _row(CLAIMS["inter_method"], text, all_of(verdicts),
                "reproduced if, under mean and under uniform replacement, the 95% CI of AOPC-MoRF's mean off-diagonal ρ "
                "lies wholly above 0.5 and that of its excess over Faithfulness's wholly above 0; not reproduced if "
                "a part fails and none passes (partly if some pass)", units,
                "95% jackknife t CIs over images; parts: " + ", ".join(verdicts))


def rule_morf_lerf(cells: pd.DataFrame, units: str) -> dict:
    """Rule 7: ρ(MoRF, aligned LeRF) has its CI wholly inside (−0.5, 0.5) in more than half of the cells."""
    _require(cells, ["rho", "low", "high"], "rule_morf_lerf")
    certain, possible, total = _cells(cells, "low", "high", lambda lo, hi: lo > -0.5 and hi < 0.5,
                                      lambda lo, hi: lo < 0.5 and hi > -0.5)
    if total == 0:
        return _not_tested(CLAIMS["morf_lerf"], units)
    needed = _majority(total)
    text = (f"ρ(MoRF, aligned LeRF), real method × variant cells: median {cells['rho'].median():.2f}, "
            f"range {_range(cells['rho'])}")
    return _row(CLAIMS["morf_lerf"], text, count_verdict(certain, possible, needed),
                f"reproduced if ρ's 95% CI lies wholly inside (−0.5, 0.5) in more than half ({needed}) of the {total} "
                f"cells; not reproduced if fewer than {needed} CIs reach inside", units,
                "95% Fisher-z CI of Spearman ρ per cell; " + _share_text(certain, possible, total, "inside (−0.5, 0.5)"))


def rule_random_outranks(cells: pd.DataFrame, units: str, share: float = 0.1) -> dict:
    """Rule 8: in at least `share` of the metric × variant cells Random beats some real method with a paired CI > 0."""
    _require(cells, ["metric", "variant", "method", "diff", "low", "high"], "rule_random_outranks")
    if not 0 < share <= 1:
        raise ValueError(f"share must lie in (0, 1]; got {share}")
    finite = cells[np.isfinite(cells["low"]) & np.isfinite(cells["high"])]
    per_cell = finite.groupby(["metric", "variant"], sort=False).agg(low=("low", "max"), high=("high", "max"))
    total = len(per_cell)
    certain, possible = int((per_cell["low"] > 0).sum()), int((per_cell["high"] > 0).sum())
    if total == 0:
        return _not_tested(CLAIMS["random"], units)
    needed = max(1, math.ceil(share * total))
    beaten = finite[finite["low"] > 0]
    text = (f"Random beats a real method (paired CI wholly above 0) in {certain} of {total} metric × variant cells"
            + (": " + ", ".join(f"{METRIC_LABELS.get(m, m)}·{v}" for m, v in dict.fromkeys(zip(beaten['metric'],
                                                                                                 beaten['variant'])))
               if certain else ""))
    level = float(cells["level"].iloc[0]) if "level" in cells else 0.95
    return _row(CLAIMS["random"], text, count_verdict(certain, possible, needed),
                f"reproduced if in ≥ {share:.0%} ({needed}) of the {total} cells Random's mean sign-aligned score exceeds "
                f"a real method's with the paired CI of the difference wholly above 0; not reproduced if fewer than "
                f"{needed} cells have a CI reaching above 0", units,
                f"paired t CI (ttest_rel) over images at {level:.2%} (95% Bonferroni over the real methods); "
                f"{certain} of {total} cells wholly above 0, {possible - certain} straddle")


def findings(results: dict) -> list[dict]:
    """Each §3 hypothesis of the card with this run's numbers, its interval and a verdict computed by the
    rule printed in the row (the project's reading of the qualitative claims)."""
    units, real = results["units"], results["real_methods"]
    alphas = results["alphas"]
    consistency = results["consistency"][results["consistency"]["method"].isin(real)]
    classes = results["classes"][results["classes"]["method"].isin(real)]
    inter_all = results["inter_method"].set_index(["variant", "metric"])["mean"]
    mean_label, uniform_label = results["primary"]["dataset_mean"], results["primary"]["uniform"]
    context = (f"; for contrast, all {len(results['methods'])} methods: AOPC-MoRF {inter_all[(mean_label, 'aopc_morf')]:.2f}"
               f" / {inter_all[(uniform_label, 'aopc_morf')]:.2f} (point estimates)")
    morf_lerf = consistency[(consistency["metric_a"] == "aopc_morf") & (consistency["metric_b"] == "aopc_lerf")]
    return [
        rule_ranking_shift(results["ranking_shift"], units),
        rule_low_alpha(alphas[alphas["methods"] == ALL_METHODS], units),
        rule_inconsistent(consistency, units),
        rule_class_dependence(classes, units),
        rule_alpha_shift(results["alpha_shift"], units),
        rule_inter_method(results["inter_method_ci"], units, context),
        rule_morf_lerf(morf_lerf, units),
        rule_random_outranks(results["random_vs_real"], units),
    ]
