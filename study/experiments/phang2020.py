"""Steps of notebooks/03_masking_saliency_ablations.ipynb (Phang, Park & Geras 2020).

The protocol card is ../shared/papers/phang2020.md. The story of the notebook:

1. data and classifiers (`load_data`, `train_classifiers`): SynthParts-64 (three grating-textured
   discs per object, each alone identifies the class, plus clutter), and the card's §5.2 residual
   classifier pre-trained on clean images (cached), once per replicate: replicate r's maskers sit
   on classifier r, so every interval over replicates holds the classifier's training noise;
2. baselines (`baseline_results`, and `baseline_le` per classifier): full-image box, centre box,
   ground-truth box, CAM, Grad-CAM and per-image mask optimisation (Fong & Vedaldi);
3. the ablation grid S1–S10 of card §5.4 over several replicates (`train_grid`, cached maskers), all
   evaluated with the box protocol of card E7 (`evaluate_masks`: LE, OM, F1, SM, mask area …);
4. few-shot maskers (`few_shot`): k examples per class and all examples of N classes, evaluated
   on the full test set;
5. sanity controls: shuffled-mask leak check, cascading randomisation of the classifier, a
   masker trained on a shuffled-label classifier;
6. the card's numbers side by side, the scale used and the quirk choices, and findings whose
   verdicts are computed from this run's numbers;
7. the real-data path (ImageNet validation images with XML boxes + a ResNet-50 weights file),
   only when `data_root` and `weights_path` are given.
"""

from __future__ import annotations

import copy
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from tqdm import tqdm

from study import attribution, config, data, masking, metrics, parallel, plots, train
from study.findings import describe_interval, interval_verdict, mean_interval
from study.masking import MaskerSpec, PartsClassifier

SECTION = "phang2020"
NOTEBOOK = "03_masking_saliency_ablations"
IMAGE_SIZE = 64
CENTRE_BOX_64 = (9, 9, 55, 55)  # the paper's [33:191]² scaled to 64 px (card §5.4)
CENTRE_BOX_224 = (33, 33, 191, 191)

# Card §5.4: the ablation grid. λ_out 10 (FIX) / 15 (CA) as E3.
GRID_ROWS: dict[str, dict] = {
    "S1": {"label": "in only · FIX", "in_kind": "ce", "out_kind": None, "classifier_mode": "fix"},
    "S2": {"label": "out only · FIX", "in_kind": None, "out_kind": "entropy", "classifier_mode": "fix"},
    "S3": {"label": "in+out · FIX (Row I)", "in_kind": "ce", "out_kind": "entropy", "classifier_mode": "fix"},
    "S4": {"label": "in only · CA", "in_kind": "ce", "out_kind": None, "classifier_mode": "ca"},
    "S5": {"label": "out only · CA", "in_kind": None, "out_kind": "entropy", "classifier_mode": "ca"},
    "S6": {"label": "in+out · CA (Row J)", "in_kind": "ce", "out_kind": "entropy", "classifier_mode": "ca"},
    "S7": {"label": "out = max CE · CA", "in_kind": "ce", "out_kind": "ce", "classifier_mode": "ca"},
    "S8": {"label": "Gumbel τ=0.1 · CA", "in_kind": "ce", "out_kind": "entropy", "classifier_mode": "ca",
           "gumbel_tau": 0.1},
    "S9": {"label": "blur infill · CA", "in_kind": "ce", "out_kind": "entropy", "classifier_mode": "ca",
           "infiller": "blur"},
    "S10": {"label": "layers l0–l4 · CA", "in_kind": "ce", "out_kind": "entropy", "classifier_mode": "ca",
            "layers": ("l0", "l1", "l2", "l3", "l4")},
}
LAMBDA_OUT = {"fix": 10.0, "ca": 15.0}

# Card §3.1: the example evaluation output in the authors' README (probably Row J, unverified).
CARD_README = {"F1": 0.6202, "F1a": 0.5816, "OM": 0.4843, "LE": 0.3575, "SM": 0.5231, "SM1": -0.5532,
               "SM2": -1.0763, "top1": 75.222, "top5": 92.488, "sm_acc": 74.124, "binarized": 0.4487,
               "avg_mask": 0.4464, "std_mask": 0.1815, "entropy": 0.0348, "tv": 0.00684}
# Card §3.2 [fig≈]: LE (%) read off the few-shot plots of the overview figure.
CARD_FEW_SHOT_K = {"1": 44.2, "10": 38.5, "125": 37.3, "1 epoch": 37.75, "fully trained": 35.75}
CARD_FEW_SHOT_N = {"10": 65.8, "100": 40.6, "1 epoch": 37.8, "fully trained": 35.8}
CARD_REFERENCE_LE = {"CAM": 48.15, "Fong & Vedaldi": 43.15}
ABSTRACT_GAP = 0.7  # "0.7 LE points" at 10 examples per class
CLAIM_K = 10  # the abstract's "10 examples per class"

QUIRKS = [
    ("Q1", "historic classifier copy never used for masking", "historic_mode='gate_only' (what was run): "
     "prob_historic only skips the classifier's masked-image update; 'casme_confuser' available"),
    ("Q2", "TV in both L_in and L_out", "followed: effective weight 2·λ_tv"),
    ("Q3", "TV a pixel sum; 224 hard-coded in the area", "area = mean over the actual pixels; λ_tv rescaled "
     "(3.5e-3 = 1e-3·224/64)"),
    ("Q4", "inclusive box ends used as exclusive", "correct exclusive ends; flag reproduce_box_offbyone"),
    ("Q5", "IoU area(G) of the unclamped GT box", "study.metrics.box_iou follows it: LE/OM on real data use the boxes before clipping to the crop "
     "(no effect on synthetic boxes)"),
    ("Q6", "figure says softmax, code uses sigmoid", "sigmoid"),
    ("Q7", "CA classifier BN updated by masked images; FIX in eval mode", "followed"),
    ("Q8", "SM with the original pretrained classifier, OM with the checkpoint's", "followed: a frozen copy for SM"),
    ("Q9", "fixed_classifier store-true flag", "FIX / CA set explicitly per row"),
    ("Q10", "few-shot FIX vs CA and step budget n/a", "few-shot rows and a fixed step count from the profile"),
    ("Q11", "no trained CNN infiller; CA-GAN/DFNet need weights", "blur (σ≈5.7 px) and zeros only"),
]


# ============================================================================ settings and data


def experiment_settings(profile: str, historic_mode: str = "gate_only", **overrides) -> dict:
    """The profile's `phang2020` section with the notebook's overrides (None = the profile's value).

    `rows` may be given as a list of row names (each gets the profile's seed count, or 1) or as a
    dict row -> number of seeds. `historic_mode` is the Q1 choice for the CA rows.
    """
    if historic_mode not in masking.HISTORIC_MODES:
        raise ValueError(f"unknown historic_mode {historic_mode!r}; choose one of {list(masking.HISTORIC_MODES)}")
    rows = overrides.pop("rows", None)
    s = copy.deepcopy(config.settings(profile, SECTION, **overrides))
    s["historic_mode"] = historic_mode
    if rows is not None:
        if isinstance(rows, (list, tuple)):
            rows = {row: s["rows"].get(row, 1) for row in rows}
        if not isinstance(rows, dict) or not rows:
            raise ValueError(f"rows must be a non-empty list of row names or a dict row -> seeds, got {rows!r}")
        s["rows"] = dict(rows)
    unknown = sorted(set(s["rows"]) - set(GRID_ROWS))
    if unknown:
        raise ValueError(f"unknown grid rows {unknown}; the card's rows are {list(GRID_ROWS)}")
    for row, n in s["rows"].items():
        if not isinstance(n, int) or n <= 0:
            raise ValueError(f"row {row} needs a positive number of seeds, got {n!r}")
    for row in s["few_shot_rows"]:
        if row not in s["rows"]:
            raise ValueError(f"few-shot row {row} must also be in the grid rows {list(s['rows'])}")
    if not isinstance(s["few_shot_seeds"], int) or s["few_shot_seeds"] < 1:
        raise ValueError(f"few_shot_seeds must be a positive int, got {s['few_shot_seeds']!r}")
    return s


def setup(s: dict) -> None:
    """Thread count of the profile (one thread: small convolutions do not gain from two on a shared CPU)."""
    if s.get("threads"):
        torch.set_num_threads(int(s["threads"]))


def load_data(s: dict, seed: int, dataset: str = "synth_parts_64") -> dict:
    """Train / Train-Val / test splits of `dataset` (disk-cached), standardised with the training
    set's channel statistics, as tensors; ground-truth boxes of the label class per test image."""
    if dataset not in data.SHAPES_CONFIGS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(data.SHAPES_CONFIGS)}")
    sizes = {"train": s["n_train"], "test": s["n_test"]}
    if s["n_trainval"] and len(s["tv_grid"]) > 1:
        sizes["trainval"] = s["n_trainval"]
    splits = data.shapes_splits(seed, dataset, sizes=sizes, use_cache=True)
    if np.asarray(splits["train"]["labels"]).ndim != 1:
        raise ValueError(f"dataset {dataset!r} is multi-label; the box protocol needs one label per image")
    mean, std = data.channel_stats(splits["train"]["images"])
    out = {"dataset": dataset, "seed": seed, "mean": mean, "std": std, "splits": splits,
           "num_classes": int(np.max(splits["train"]["labels"])) + 1}
    for name, arrays in splits.items():
        out[f"x_{name}"] = torch.as_tensor(data.standardise(arrays["images"], mean, std))
        out[f"y_{name}"] = torch.as_tensor(np.asarray(arrays["labels"], np.int64))
        out[f"boxes_{name}"] = [own_class_boxes(b, label) for b, label in zip(arrays["boxes"], arrays["labels"])]
    return out


def own_class_boxes(boxes: np.ndarray, label: int) -> np.ndarray:
    """(n, 4) boxes [x0, y0, x1, y1) of the image's own class from (n, 5) rows [cls, x0, y0, x1, y1]."""
    boxes = np.asarray(boxes).reshape(-1, 5)
    own = boxes[boxes[:, 0] == label, 1:]
    if len(own) == 0:
        raise ValueError(f"an image of class {label} has no box of its class")
    return own


def data_key(d: dict, s: dict) -> dict:
    """What the classifier and the maskers train on: the training split. Every split is drawn with
    its own seed (`data.shapes_splits`), so the test and train-val sizes stay out of the key and
    changing them retrains nothing."""
    return {"dataset": d["dataset"], "seed": d["seed"], "n_train": s["n_train"]}


# ============================================================================ classifier


def classifier_params(d: dict, s: dict, shuffle_labels: bool = False, replicate: int = 0) -> dict:
    params = {"data": data_key(d, s), "widths": list(s["widths"]), "stem_stride": s["stem_stride"],
              "epochs": s["epochs"], "batch_size": 72, "lr": 1e-3, "shuffle_labels": shuffle_labels, "version": 1}
    classifier_seed(d["seed"], replicate)  # ValueError on a bad replicate
    if replicate:  # replicate 0 keeps the key it always had
        params["replicate"] = int(replicate)
    return params


def classifier_seed(data_seed: int, replicate: int) -> int:
    """The seed of classifier `replicate` on the data of `data_seed`: the data seed itself for
    replicate 0 (the notebook's classifier), else one derived from both by `np.random.SeedSequence`."""
    if isinstance(replicate, bool) or not isinstance(replicate, (int, np.integer)) or replicate < 0:
        raise ValueError(f"replicate must be a non-negative int, got {replicate!r}")
    if replicate == 0:
        return data_seed
    return int(np.random.SeedSequence([data_seed, 17, int(replicate)]).generate_state(1)[0])


def train_classifier(d: dict, s: dict, device: str = "auto", shuffle_labels: bool = False, replicate: int = 0) -> dict:
    """Pre-train the §5.2 classifier on clean images (Adam 1e-3, batch 72, cached).

    No flips or crops: a horizontal flip turns a grating of angle θ into 180° − θ, i.e. into
    another class of SynthParts-64. `shuffle_labels=True` trains on a seeded permutation of the
    labels (the data-randomisation control). `replicate` k > 0 trains another classifier on the same
    data from its own seed (initial weights and batch order; `classifier_seed`). Returns the model,
    its test accuracy and history.
    """
    params = classifier_params(d, s, shuffle_labels, replicate)
    seed = classifier_seed(d["seed"], replicate)
    labels = d["y_train"].numpy()
    if shuffle_labels:
        labels = np.random.default_rng([d["seed"], 7]).permutation(labels)
    arrays = {"images": d["x_train"].numpy(), "labels": labels}

    def build():
        config.seed_everything(seed)
        return PartsClassifier(d["num_classes"], tuple(s["widths"]), s["stem_stride"])

    def fit(model):
        config.seed_everything(seed)
        loader = data.make_loader(arrays, batch_size=72, shuffle=True, seed=seed)
        return train.fit(model, loader, epochs=s["epochs"], lr=1e-3, device=device)

    name = "phang2020_classifier" + ("_shuffled" if shuffle_labels else "")
    result = train.cached_fit(name, params, build, fit, device=device)
    model = result.model.eval()
    logits = _logits(model, d["x_test"])
    return {"model": model, "key": train.model_key(name, params), "from_cache": result.from_cache,
            "test_accuracy": float((logits.argmax(1) == d["y_test"]).float().mean()),
            "history": pd.DataFrame(result.history)}


def n_classifiers(s: dict) -> int:
    """How many classifiers a run trains: one per replicate, i.e. the most seeds of any grid row (and
    of the few-shot claims' points, `few_shot_seeds`). Replicate r's maskers all sit on classifier r, so an interval over
    replicates holds the classifier's training noise too (one shared classifier moved S2's LE from 18
    to 88 between classifier seeds; benchmarks/phang_classifier_variance.py)."""
    return max([*s["rows"].values(), s["few_shot_seeds"] if s["few_shot_rows"] else 1])


def _classifier_job(s: dict, seed: int, dataset: str, replicate: int, device: str) -> float:
    """Classifier `replicate` trained in a worker process (it only fills the disk cache)."""
    start = time.perf_counter()
    train_classifier(load_data(s, seed, dataset), s, device, replicate=replicate)
    return time.perf_counter() - start


def train_classifiers(d: dict, s: dict, device: str = "auto", workers: int = 1) -> list[dict]:
    """Classifiers 0 … `n_classifiers(s)` − 1 (`train_classifier(..., replicate=r)`, cached);
    classifier 0 is the notebook's. Those not cached yet train in `workers` CPU processes first
    (as `prefill_maskers`); results do not depend on the number of workers."""
    replicates = range(n_classifiers(s))
    todo = [r for r in replicates if not train.fit_cache_path(
        "phang2020_classifier", classifier_params(d, s, replicate=r)).exists()]
    if len(todo) > 1 and ((workers > 1 and config.get_device(device).type == "cpu")
                          or parallel.default_scheduler() is not None):
        parallel.map_jobs(_classifier_job, [(s, d["seed"], d["dataset"], r, str(device)) for r in todo],
                          workers=workers, threads=1)
    classifiers = [train_classifier(d, s, device, replicate=r) for r in replicates]
    for r in todo:  # trained by this call (in a worker or here), whatever the last load says
        classifiers[r]["from_cache"] = False
    return classifiers


@torch.no_grad()
def _logits(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = torch.cat([model(images[i: i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])
    model.train(was)
    return out


# ============================================================================ evaluation (card E7, §5.5)


@torch.no_grad()
def crop_probabilities(classifier: nn.Module, images: torch.Tensor, boxes: np.ndarray, labels: torch.Tensor
                       ) -> tuple[np.ndarray, np.ndarray]:
    """SM's classification of the crops: each image cropped to its box [x0, y0, x1, y1), resized
    back to the image size (bicubic), classified by `classifier` (the frozen pretrained one, Q8).
    An empty box is classified as an all-zero (dataset-mean) image. Returns p(y | crop) and the
    crops' top-1 correctness."""
    size = images.shape[-2:]
    crops = torch.zeros_like(images)
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, np.int64)):
        if x1 > x0 and y1 > y0:
            patch = images[i: i + 1, :, max(y0, 0): y1, max(x0, 0): x1]
            crops[i] = F.interpolate(patch, size=size, mode="bicubic", align_corners=False)[0]
    logits = _logits(classifier, crops)
    prob = F.softmax(logits.double(), dim=1).gather(1, labels[:, None]).squeeze(1).numpy()
    return np.clip(prob, 1e-12, 1.0), (logits.argmax(1) == labels).numpy()


def evaluate_boxes(pred_boxes, masks: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor, gt_boxes: list,
                   images: torch.Tensor, sm_classifier: nn.Module, gt_masks=None, iou_gt_boxes: list | None = None
                   ) -> pd.DataFrame:
    """Per-image metrics of predicted boxes and continuous masks (card E7), one row per image:

    le / om (Phang LE and the official top-1 localisation error), f1 / f1a (continuous mask vs the
    GT boxes, max / mean over boxes), sm, sm1, sm2, sm_correct (crop classification), box_area,
    avg_mask, binarized (mean of m > its mean), entropy (−Σ m log₂ m / pixels over 0 < m < 1),
    tv (mean squared neighbour difference), pixel_iou (binarised mask vs the GT part mask, a
    project extra; NaN without `gt_masks`), correct (top-1 of the checkpoint's classifier).
    `iou_gt_boxes` (default `gt_boxes`) are the GT boxes of LE / OM: on real data the boxes before
    clipping to the crop, so that area(G) is the unclamped area (card Q5).
    """
    pred_boxes = np.asarray(pred_boxes, np.int64)
    masks = masks.detach().cpu().float()
    if masks.ndim != 4 or masks.shape[1] != 1 or len(masks) != len(pred_boxes) or len(gt_boxes) != len(masks):
        raise ValueError(f"need masks (B, 1, H, W) and B boxes / GT box sets; got masks {tuple(masks.shape)}, "
                         f"{len(pred_boxes)} boxes, {len(gt_boxes)} GT sets")
    height, width = masks.shape[-2:]
    predicted, labels = np.asarray(predicted, np.int64), np.asarray(labels, np.int64)
    iou_gt_boxes = gt_boxes if iou_gt_boxes is None else iou_gt_boxes
    if len(iou_gt_boxes) != len(gt_boxes):
        raise ValueError(f"need one IoU GT box set per image; got {len(iou_gt_boxes)} for {len(gt_boxes)} images")
    le = metrics.localisation_error(pred_boxes, iou_gt_boxes)
    om = metrics.official_metric(pred_boxes, iou_gt_boxes, predicted, labels)
    f1 = metrics.f1_mask(masks, gt_boxes, reduce="max")
    f1a = metrics.f1_mask(masks, gt_boxes, reduce="mean")
    area = metrics.box_area_fraction(pred_boxes, height, width)
    prob, crop_correct = crop_probabilities(sm_classifier, images, pred_boxes, torch.as_tensor(labels))
    sm = metrics.saliency_metric(area, prob, return_parts=True)
    m = masks.flatten(1).numpy().astype(np.float64)
    binary = m > m.mean(axis=1, keepdims=True)
    inside = (m > 0) & (m < 1)
    entropy = -(np.where(inside, m * np.log2(np.where(inside, m, 1.0)), 0.0)).sum(axis=1) / m.shape[1]
    grid = masks[:, 0].double()
    tv = (((grid[:, :, 1:] - grid[:, :, :-1]) ** 2).mean(dim=(1, 2))
          + ((grid[:, 1:, :] - grid[:, :-1, :]) ** 2).mean(dim=(1, 2))).numpy() / 2
    if gt_masks is not None:
        gt = np.asarray(gt_masks).reshape(len(m), -1).astype(bool)
        union = (binary | gt).sum(axis=1)
        pixel_iou = np.where(union > 0, (binary & gt).sum(axis=1) / np.maximum(union, 1), 0.0)
    else:
        pixel_iou = np.full(len(m), np.nan)
    return pd.DataFrame({"image": np.arange(len(m)), "le": le, "om": om, "f1": f1, "f1a": f1a, "sm": sm["sm"],
                         "sm1": sm["sm1"], "sm2": sm["sm2"], "sm_correct": crop_correct.astype(float),
                         "box_area": area, "avg_mask": m.mean(axis=1), "binarized": binary.mean(axis=1),
                         "entropy": entropy, "tv": tv, "pixel_iou": pixel_iou,
                         "correct": (predicted == labels).astype(float)})


def evaluate_masks(masks: torch.Tensor, predicted, labels, gt_boxes: list, images: torch.Tensor,
                   sm_classifier: nn.Module, gt_masks=None, reproduce_offbyone: bool = False,
                   iou_gt_boxes: list | None = None) -> pd.DataFrame:
    """The box protocol of card E7 on continuous masks: mean threshold → largest 4-connected
    component → box (`study.metrics.saliency_box`), then `evaluate_boxes`."""
    masks = torch.as_tensor(masks).detach().cpu().float()
    boxes = metrics.saliency_box(masks, reproduce_offbyone=reproduce_offbyone)
    return evaluate_boxes(boxes, masks, predicted, labels, gt_boxes, images, sm_classifier, gt_masks, iou_gt_boxes)


def box_masks(boxes, n: int, height: int, width: int) -> torch.Tensor:
    """A box as a binary 'continuous' mask (for F1 and the mask statistics of box baselines)."""
    boxes = np.broadcast_to(np.asarray(boxes, np.int64).reshape(-1, 4), (n, 4))
    return torch.as_tensor(metrics.boxes_to_mask(boxes, height, width)[:, None].astype(np.float32))


def summarise(per_image: pd.DataFrame) -> dict:
    """Card §5.5 summary of one evaluation: LE, OM, F1, F1a, SM, SM1, SM2, sm_acc, avg_mask,
    binarized, std_mask, entropy, tv, top1, pixel IoU (LE, OM, top1, sm_acc in %)."""
    if per_image.empty:
        raise ValueError("nothing to summarise: no images")
    mean = per_image.mean(numeric_only=True)
    return {"LE": 100 * mean["le"], "OM": 100 * mean["om"], "F1": mean["f1"], "F1a": mean["f1a"], "SM": mean["sm"],
            "SM1": mean["sm1"], "SM2": mean["sm2"], "sm_acc": 100 * mean["sm_correct"], "avg_mask": mean["avg_mask"],
            "binarized": mean["binarized"], "std_mask": float(per_image["avg_mask"].std(ddof=0)),
            "entropy": mean["entropy"], "tv": mean["tv"], "top1": 100 * mean["correct"],
            "pixel_iou": mean["pixel_iou"]}


# ============================================================================ baselines


def _gt_masks(d: dict):
    return d["splits"]["test"]["masks"]


def baseline_results(clf: dict, d: dict, s: dict, device: str = "auto"
                     ) -> tuple[dict[str, pd.DataFrame], dict[str, torch.Tensor]]:
    """Per-image evaluations of the card's baselines on the test set: full-image box, centre box
    [9, 55)², ground-truth box, CAM (l4, no ReLU), Grad-CAM (l4 and l3) for the label class
    (GT-known), min-max normalised, boxed by the same rule, and Fong & Vedaldi's per-image
    optimisation on the first `n_fong` test images. Returns (per-image tables, the saliency maps)."""
    model = clf["model"].to(config.get_device(device))
    x, y, gt = d["x_test"], d["y_test"], d["boxes_test"]
    n, _, height, width = x.shape
    predicted = _logits(model, x).argmax(1)
    common = {"predicted": predicted, "labels": y, "images": x, "sm_classifier": model}
    out, maps_out = {}, {}
    full = np.tile([0, 0, width, height], (n, 1))
    centre = np.tile(CENTRE_BOX_64, (n, 1)) if height == IMAGE_SIZE else np.tile(
        [round(9 * width / 64), round(9 * height / 64), round(55 * width / 64), round(55 * height / 64)], (n, 1))
    truth = np.stack([g[0] for g in gt])
    for name, boxes in (("full image", full), ("centre box", centre), ("ground truth", truth)):
        masks = torch.cat([box_masks(b, 1, height, width) for b in boxes])
        out[name] = evaluate_boxes(boxes, masks, gt_boxes=gt, gt_masks=_gt_masks(d), **common)
    for name, options in (("CAM", {"layer": "l4", "relu": False}), ("Grad-CAM", {"layer": "l4"}),
                          ("Grad-CAM (l3)", {"layer": "l3"})):
        maps = torch.cat([attribution.explain(model, x[i: i + 256].to(model.fc.weight.device), y[i: i + 256],
                                              "gradcam", **options).cpu() for i in range(0, n, 256)])
        maps_out[name] = attribution.normalise_minmax(maps)
        out[name] = evaluate_masks(maps_out[name], gt_boxes=gt, gt_masks=_gt_masks(d), **common)
    k = min(s["n_fong"], n)
    fong = masking.optimise_masks(model, x[:k], y[:k], steps=s["fong_steps"])
    maps_out["Fong & Vedaldi"] = fong
    out["Fong & Vedaldi"] = evaluate_masks(fong, predicted[:k], y[:k], gt[:k], x[:k], model,
                                           gt_masks=_gt_masks(d)[:k])
    return out, maps_out


BASELINE_METHODS = ("CAM", "Fong & Vedaldi")  # the baselines the trained masker must beat (fig≈)


def baseline_le(classifiers: list[dict], d: dict, s: dict, device: str = "auto",
                first: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """LE (%) of `BASELINE_METHODS` on each classifier (`baseline_results`), one row per (method,
    replicate): the references of the "beats the baselines" claim, paired with the maskers of the
    same classifier. `first`: classifier 0's `baseline_results` tables when already computed."""
    rows = []
    for replicate, clf in enumerate(classifiers):
        tables = first if replicate == 0 and first is not None else baseline_results(clf, d, s, device)[0]
        rows += [{"method": m, "replicate": replicate, "LE": summarise(tables[m])["LE"]} for m in BASELINE_METHODS]
    return pd.DataFrame(rows)


# ============================================================================ maskers: the grid


def row_spec(row: str, s: dict, lambda_tv: float = 3.5e-3, steps: int | None = None) -> MaskerSpec:
    """The MaskerSpec of grid row `row` at the profile's schedule."""
    if row not in GRID_ROWS:
        raise ValueError(f"unknown grid row {row!r}; the card's rows are {list(GRID_ROWS)}")
    options = {k: v for k, v in GRID_ROWS[row].items() if k != "label"}
    return MaskerSpec(lambda_out=LAMBDA_OUT[options["classifier_mode"]], lambda_tv=lambda_tv, hidden=s["hidden"],
                      steps=steps or s["steps"], batch_size=s["batch_size"], lr=s["lr"],
                      classifier_lr=s["classifier_lr"], historic_mode=s.get("historic_mode", "gate_only"), **options)


def masker_seed(run_seed: int, replicate: int) -> int:
    return 1000 * run_seed + replicate


def train_one(clf: dict, d: dict, s: dict, spec: MaskerSpec, replicate: int, subset: str = "all",
              indices: np.ndarray | None = None, device: str = "auto", split: str = "train"):
    """One cached masker on the training images (or the `indices` subset, described by `subset`)."""
    x, y = d[f"x_{split}"], d[f"y_{split}"]
    if indices is not None:
        x, y = x[torch.as_tensor(indices)], y[torch.as_tensor(indices)]
    params = {"data": data_key(d, s), "classifier": clf["key"], "subset": subset, "split": split}
    return masking.cached_train_masker("phang2020_masker", params, clf["model"], x, y, spec,
                                       seed=masker_seed(d["seed"], replicate), device=device)


def masker_jobs(s: dict, d: dict) -> list[tuple]:
    """Every masker of the grid and of the few-shot study as (row, replicate, subset kind, value):
    kind "all" (value None), "k" (examples per class), "classes" (N) or "epoch" (one pass). The
    few-shot points use replicate 0; claim 4's pair (k = `CLAIM_K` and one epoch) and the fewest
    classes N (the few-classes claim; its full-data reference is the grid's own replicate) are also
    trained with replicates 1 … few_shot_seeds − 1, so their intervals include training noise. A
    job's replicate r names both its masker seed and its classifier (r)."""
    jobs = [(row, r, "all", None) for row, n in s["rows"].items() for r in range(n)]
    k_all = int(np.bincount(d["y_train"].numpy()).min())
    few_classes = sorted(int(n) for n in s["few_shot_classes"] if n < d["num_classes"])
    for row in s["few_shot_rows"]:
        jobs += [(row, 0, "k", int(k)) for k in s["few_shot_k"] if k < k_all]
        jobs += [(row, 0, "classes", n) for n in few_classes]
        if s["epoch_reference"]:
            jobs.append((row, 0, "epoch", None))
        for replicate in range(1, s["few_shot_seeds"]):  # claim 4's pair, with more replicates (classifier r, masker seed r)
            if CLAIM_K in s["few_shot_k"] and CLAIM_K < k_all:
                jobs.append((row, replicate, "k", CLAIM_K))
            if s["epoch_reference"]:
                jobs.append((row, replicate, "epoch", None))
            if few_classes:
                jobs.append((row, replicate, "classes", few_classes[0]))
    return jobs


def run_job(classifiers: list[dict], d: dict, s: dict, lambda_tv: dict, job: tuple, device: str = "auto"):
    """Train (or load) the masker of one job of `masker_jobs` on the job's classifier
    (`classifiers[replicate]`); returns (MaskerRun, images used)."""
    row, replicate, kind, value = job
    clf = classifiers[replicate]
    spec = row_spec(row, s, lambda_tv[GRID_ROWS[row]["classifier_mode"]])
    labels = d["y_train"].numpy()
    if kind == "all":
        return train_one(clf, d, s, spec, replicate, device=device), len(labels)
    if kind == "epoch":
        steps = math.ceil(len(labels) / s["batch_size"])
        spec = row_spec(row, s, lambda_tv[GRID_ROWS[row]["classifier_mode"]], steps=steps)
        return train_one(clf, d, s, spec, replicate, device=device), len(labels)
    if kind == "k":
        indices, subset = masking.sample_per_class(labels, value, seed=d["seed"]), f"k={value}"
    elif kind == "classes":
        indices, chosen = masking.sample_classes(labels, value, seed=d["seed"])
        subset = f"classes={chosen.tolist()}"
    else:
        raise ValueError(f"unknown job kind {kind!r}; choose 'all', 'epoch', 'k' or 'classes'")
    return train_one(clf, d, s, spec, replicate, subset=subset, indices=indices, device=device), len(indices)


_WORKER_STATE: dict = {}


def _worker_job(s: dict, seed: int, dataset: str, lambda_tv: dict, job: tuple, device: str = "auto") -> float:
    """A masker trained in a worker process (it only fills the disk cache) on `device` as the caller
    asked for it ("auto": the worker's own); returns its seconds. The data and the (cached)
    classifiers are loaded once per worker process."""
    start = time.perf_counter()
    key = (seed, dataset, repr(sorted(s.items())), str(config.CACHE_DIR), device)
    if key not in _WORKER_STATE:
        d = load_data(s, seed, dataset)
        _WORKER_STATE.clear()
        _WORKER_STATE[key] = (d, [train_classifier(d, s, device, replicate=r) for r in range(n_classifiers(s))])
    d, classifiers = _WORKER_STATE[key]
    run_job(classifiers, d, s, lambda_tv, job, device=device)
    return time.perf_counter() - start


def prefill_maskers(s: dict, d: dict, lambda_tv: dict, workers: int, device: str = "auto") -> int:
    """Train the maskers of `masker_jobs` in `workers` CPU processes (one thread each,
    `parallel.map_jobs`, or on the Dask scheduler of STUDY_DASK_SCHEDULER) so that the steps that
    follow only load them from the disk cache. Nothing happens with one worker, on a GPU, or when
    every masker is cached already. The classifiers must be trained (cached) first. Results do not
    depend on the number of workers: each masker is seeded on its own. Returns the number of
    maskers trained."""
    if (workers <= 1 or config.get_device(device).type != "cpu") and parallel.default_scheduler() is None:
        return 0
    todo = [job for job in masker_jobs(s, d) if not _cached(job, s, d, lambda_tv)]
    if not todo:
        return 0
    heavy_first = sorted(todo, key=lambda job: GRID_ROWS[job[0]]["classifier_mode"] != "ca")
    parallel.map_jobs(_worker_job, [(s, d["seed"], d["dataset"], lambda_tv, job, str(device)) for job in heavy_first],
                      workers=workers, threads=1)
    return len(todo)


def _cached(job: tuple, s: dict, d: dict, lambda_tv: dict) -> bool:
    """Whether the masker of `job` is already in the disk cache (same key as `train_one`)."""
    row, replicate, kind, value = job
    clf_key = train.model_key("phang2020_classifier", classifier_params(d, s, replicate=replicate))
    mode = GRID_ROWS[row]["classifier_mode"]
    labels = d["y_train"].numpy()
    steps = math.ceil(len(labels) / s["batch_size"]) if kind == "epoch" else None
    spec = row_spec(row, s, lambda_tv[mode], steps=steps)
    if kind in ("all", "epoch"):
        subset = "all"
    elif kind == "k":
        subset = f"k={value}"
    else:
        subset = f"classes={masking.sample_classes(labels, value, seed=d['seed'])[1].tolist()}"
    params = {"data": data_key(d, s), "classifier": clf_key, "subset": subset, "split": "train"}
    return masking.masker_cache_path("phang2020_masker", params, spec, masker_seed(d["seed"], replicate)).exists()


def evaluate_run(run, clf: dict, d: dict, reproduce_offbyone: bool = False) -> pd.DataFrame:
    """A trained masker on the full test set: masks from the run's classifier features, OM with the
    run's classifier (the co-trained one for CA), SM with the frozen pretrained one (Q8)."""
    masks, logits = masking.predict_masks(run.masker, run.classifier, d["x_test"], run.spec)
    return evaluate_masks(masks, logits.argmax(1), d["y_test"], d["boxes_test"], d["x_test"], clf["model"],
                          gt_masks=_gt_masks(d), reproduce_offbyone=reproduce_offbyone)


def tune_tv(clf: dict, d: dict, s: dict, device: str = "auto") -> tuple[dict, pd.DataFrame]:
    """λ_tv per classifier mode: S3 (FIX) and S6 (CA) trained for each value of `tv_grid` and
    evaluated on the Train-Val split (lowest LE wins) on `clf` (classifier 0); the chosen values
    serve every replicate. One value: no tuning."""
    if len(s["tv_grid"]) == 1:
        value = float(s["tv_grid"][0])
        return {"fix": value, "ca": value}, pd.DataFrame([{"mode": m, "lambda_tv": value, "LE": np.nan,
                                                           "chosen": True} for m in ("fix", "ca")])
    rows = []
    held_out = {**d, "x_test": d["x_trainval"], "y_test": d["y_trainval"], "boxes_test": d["boxes_trainval"],
                "splits": {**d["splits"], "test": d["splits"]["trainval"]}}
    for mode, row in (("fix", "S3"), ("ca", "S6")):
        for value in s["tv_grid"]:
            run = train_one(clf, d, s, row_spec(row, s, float(value)), 0, device=device)
            rows.append({"mode": mode, "lambda_tv": float(value), "LE": summarise(evaluate_run(run, clf, held_out))["LE"]})
    table = pd.DataFrame(rows)
    best = table.loc[table.groupby("mode")["LE"].idxmin()]
    table["chosen"] = table.index.isin(best.index)
    return dict(zip(best["mode"], best["lambda_tv"].astype(float))), table


def train_grid(classifiers: list[dict], d: dict, s: dict, lambda_tv: dict, device: str = "auto",
               reproduce_offbyone: bool = False) -> tuple[dict, pd.DataFrame]:
    """Every grid row × its replicates (cached), replicate r's masker on classifier r (seed
    `masker_seed(seed, r)`), each evaluated on the test set with its own classifier.

    Returns ({(row, replicate): MaskerRun}, a per-image table with row, replicate and the metrics)."""
    runs, frames = {}, []
    jobs = [(row, r, "all", None) for row, n in s["rows"].items() for r in range(n)]
    for job in tqdm(jobs, desc="maskers", disable=not train.progress_enabled(), leave=False):
        row, replicate = job[:2]
        run, _ = run_job(classifiers, d, s, lambda_tv, job, device)
        runs[(row, replicate)] = run
        frames.append(evaluate_run(run, classifiers[replicate], d, reproduce_offbyone).assign(row=row, replicate=replicate))
    return runs, pd.concat(frames, ignore_index=True)


def summary_table(per_image: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """`summarise` per group of `by` (one row per group)."""
    rows = [{**dict(zip(by, key if isinstance(key, tuple) else (key,))), **summarise(group)}
            for key, group in per_image.groupby(by, sort=False)]
    return pd.DataFrame(rows)


def ablation_table(grid: pd.DataFrame, baselines: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Mean ± std over seeds of LE, OM, F1, SM and mask area per grid row, then the baselines."""
    per_seed = summary_table(grid, ["row", "replicate"])
    columns = ["LE", "OM", "F1", "SM", "avg_mask", "pixel_iou"]
    rows = []
    for row, group in per_seed.groupby("row", sort=False):
        entry = {"method": row, "label": GRID_ROWS[row]["label"], "seeds": len(group)}
        for c in columns:
            entry[c] = group[c].mean()
            entry[f"{c}_std"] = group[c].std(ddof=1) if len(group) > 1 else np.nan
        rows.append(entry)
    for name, frame in baselines.items():
        summary = summarise(frame)
        rows.append({"method": name, "label": f"baseline (classifier 0, {len(frame)} images)", "seeds": 1,
                     **{c: summary[c] for c in columns}, **{f"{c}_std": np.nan for c in columns}})
    return pd.DataFrame(rows)


def show_table(table: pd.DataFrame) -> pd.DataFrame:
    """LE/OM/F1/SM/Mask as 'mean ± std' strings for reading."""
    out = table[["method", "label", "seeds"]].copy()
    for c, digits in (("LE", 1), ("OM", 1), ("F1", 3), ("SM", 2), ("avg_mask", 3), ("pixel_iou", 3)):
        out[c] = [f"{m:.{digits}f}" + ("" if np.isnan(sd) else f" ± {sd:.{digits}f}")
                  for m, sd in zip(table[c], table[f"{c}_std"])]
    return out.rename(columns={"avg_mask": "Mask", "pixel_iou": "pixel IoU"})


# ============================================================================ few-shot (E6)


def few_shot(classifiers: list[dict], d: dict, s: dict, lambda_tv: dict, grid: pd.DataFrame, device: str = "auto",
             per_image: bool = False):
    """Few-shot maskers of the `few_shot_rows` (replicate 0: classifier 0), trained for the profile's fixed
    number of steps cycling through the subset, evaluated on the full test set:
    k examples per class (`few_shot_k`) and all examples of N classes (`few_shot_classes`). The
    full-data point ("all") is the grid's own masker; with `epoch_reference` a masker trained for
    exactly one pass over the training set is added ("1 epoch", the paper's 0.7-point comparison).

    With `per_image` also returns {(row, point): per-image evaluation}, point "all", "k=<k>",
    "N=<N>" or "1 epoch" (the paired image-level comparisons of the findings), and the extra
    replicates of the claims' points (and the grid's, as "all") as {(row, point, replicate):
    evaluation} (replicates ≥ 1, each on its own classifier; not in the curve)."""
    k_all = int(np.bincount(d["y_train"].numpy()).min())
    rows, frames = [], {}
    for row in s["few_shot_rows"]:
        seed0 = grid[(grid["row"] == row) & (grid["replicate"] == 0)]
        frames[(row, "all")] = seed0.reset_index(drop=True)
        for replicate in sorted(set(grid.loc[grid["row"] == row, "replicate"]) - {0}):
            frames[(row, "all", replicate)] = grid[(grid["row"] == row) & (grid["replicate"] == replicate)
                                                   ].reset_index(drop=True)
        full = summarise(seed0)
        base = {"row": row, "images": len(d["y_train"]), "k": k_all, "n_classes": d["num_classes"]}
        rows += [{**base, "kind": kind, "point": "all", **full} for kind in ("per class", "classes")]
        for job in masker_jobs(s, d):
            if job[0] != row or job[2] == "all":
                continue
            run, images = run_job(classifiers, d, s, lambda_tv, job, device)
            evaluation = evaluate_run(run, classifiers[job[1]], d)
            label = {"epoch": "1 epoch", "k": f"k={job[3]}", "classes": f"N={job[3]}"}[job[2]]
            if job[1] > 0:
                frames[(row, label, job[1])] = evaluation
                continue
            summary = summarise(evaluation)
            frames[(row, label)] = evaluation
            if job[2] == "epoch":
                rows += [{**base, "kind": kind, "point": "1 epoch", **summary} for kind in ("per class", "classes")]
            elif job[2] == "k":
                rows.append({**base, "kind": "per class", "k": job[3], "point": str(job[3]), "images": images,
                             **summary})
            else:
                rows.append({**base, "kind": "classes", "n_classes": job[3], "point": str(job[3]), "images": images,
                             **summary})
    curve = pd.DataFrame(rows)
    return (curve, frames) if per_image else curve


# ============================================================================ sanity controls


@torch.no_grad()
def leak_check(runs: dict, d: dict, seed: int) -> pd.DataFrame:  # runs: {(row, replicate): MaskerRun}
    """Shuffled-mask control (card §5.6): can the masking classifier read the mask's silhouette?

    For each masker, the test images are masked in with their own masks and with the masks of a
    seeded permutation of the images (only pairs of different classes are scored). A classifier
    that reads the silhouette predicts the mask source's class on shuffled masks more often than
    chance (1/K), and keeps its accuracy on own-mask images even where the content is gone.
    """
    x, y = d["x_test"], d["y_test"]
    perm = torch.as_tensor(np.random.default_rng([seed, 11]).permutation(len(y)))
    differ = y != y[perm]
    rows = []
    for (row, replicate), run in runs.items():
        masks, _ = masking.predict_masks(run.masker, run.classifier, x, run.spec)
        own = _logits(run.classifier, masking.mask_in(x, masks)).argmax(1)
        shuffled = _logits(run.classifier, masking.mask_in(x, masks[perm])).argmax(1)
        rows.append({"row": row, "replicate": replicate, "mode": GRID_ROWS[row]["classifier_mode"],
                     "acc_own_mask": float((own == y).float().mean()),
                     "acc_shuffled_mask": float((shuffled[differ] == y[differ]).float().mean()),
                     "follows_mask_source": float((shuffled[differ] == y[perm][differ]).float().mean()),
                     "n_pairs": int(differ.sum()), "chance": 1 / d["num_classes"]})
    return pd.DataFrame(rows)


def randomisation_check(run, d: dict, s: dict, seed: int | None = None) -> pd.DataFrame:
    """Cascading randomisation of the masker's own classifier under a trained masker (Adebayo et al.;
    card E7 sanity checks): layers fc, l4, …, l0 re-initialised top-down (seeded by `seed`, default the data
    seed), masks compared with the original masks by Spearman rank correlation and SSIM (window 5,
    as Phang et al.)."""
    n = min(s["n_randomisation"], len(d["y_test"]))
    masker, spec = run.masker, run.spec

    def explain(model, images, targets):
        return masking.predict_masks(masker, model, images, spec)[0]

    return metrics.cascading_randomisation(run.classifier, d["x_test"][:n], d["y_test"][:n], explain,
                                           ["fc", "l4", "l3", "l2", "l1", "l0"], seed=d["seed"] if seed is None else seed,
                                           similarity=("spearman", "ssim"), ssim_window=5)


def randomisation_checks(runs: dict, d: dict, s: dict, row: str = "S3") -> pd.DataFrame:
    """`randomisation_check` for every trained masker of `row` (one per seed), each classifier
    randomised with that masker's own seed; column `replicate` names the masker. The verdict's unit
    is the masker: one masker's images share its training run and its randomisation draw."""
    tables = [randomisation_check(run, d, s, seed=masker_seed(d["seed"], replicate)).assign(replicate=replicate)
              for (name, replicate), run in sorted(runs.items(), key=lambda item: item[0][1]) if name == row]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def random_label_control(d: dict, s: dict, lambda_tv: dict, device: str = "auto") -> dict:
    """Data-randomisation control: a classifier trained on shuffled labels and an S3 masker on it."""
    shuffled = train_classifier(d, s, device, shuffle_labels=True)
    run = train_one(shuffled, d, s, row_spec("S3", s, lambda_tv["fix"]), 0, device=device)
    return {"classifier": shuffled, "run": run, "summary": summarise(evaluate_run(run, shuffled, d))}


# ============================================================================ figures


def mask_gallery(runs: dict, baselines_maps: dict[str, torch.Tensor], d: dict, n_images: int
                 ) -> tuple[plt.Figure, pd.DataFrame]:
    """Masks of every grid row (replicate 0) and baseline for the first test images: GT box red,
    predicted box cyan."""
    images = d["splits"]["test"]["images"][:n_images]
    variants = {f"{row}: {GRID_ROWS[row]['label']}": run for (row, r), run in runs.items() if r == 0}
    panels = {"image": None}
    for name, run in variants.items():
        panels[name] = masking.predict_masks(run.masker, run.classifier, d["x_test"][:n_images], run.spec)[0]
    panels.update({name: maps[:n_images] for name, maps in baselines_maps.items()})
    fig, axes = plt.subplots(len(panels), n_images, figsize=(1.05 * n_images + 2.0, 1.05 * len(panels)),
                             squeeze=False)
    rows = []
    for r, (name, masks) in enumerate(panels.items()):
        boxes = None if masks is None else metrics.saliency_box(masks)
        for i in range(n_images):
            ax = axes[r, i]
            if masks is None:
                plots.show_image(ax, images[i])
            else:
                ax.imshow(masks[i, 0].numpy(), cmap="magma", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
            for x0, y0, x1, y1 in d["boxes_test"][i]:
                ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="red", lw=1))
            if boxes is not None:
                x0, y0, x1, y1 = boxes[i]
                ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="cyan", lw=1))
                iou = float(metrics.box_iou(boxes[i], d["boxes_test"][i]).max())
                rows.append({"variant": name, "image": i, "mask_mean": float(masks[i].mean()), "box_iou": iou,
                             "x0": int(x0), "y0": int(y0), "x1": int(x1), "y1": int(y1)})
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("Masks on test images (red: ground-truth box, cyan: box from the mask)", fontsize=9)
    fig.tight_layout()
    return fig, pd.DataFrame(rows)


def ablation_figure(grid: pd.DataFrame, table: pd.DataFrame) -> tuple[plt.Figure, pd.DataFrame]:
    """LE and F1 per grid row (points: seeds, bar: mean) with baseline reference lines."""
    per_seed = summary_table(grid, ["row", "replicate"])
    per_seed["label"] = [f"{r}: {GRID_ROWS[r]['label']}" for r in per_seed["row"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.42 * per_seed["row"].nunique() + 1.8), sharey=True)
    shown = [m for m in ("centre box", "CAM", "Grad-CAM (l3)", "Fong & Vedaldi") if m in set(table["method"])]
    references = table.set_index("method").loc[shown]
    styles = dict(zip(shown, [("tab:orange", "--"), ("tab:red", "-."), ("tab:purple", ":"), ("tab:green", "--")]))
    for ax, metric, title in ((axes[0], "LE", "LE (%) ↓, bar = mean, dots = seeds"), (axes[1], "F1", "F1 ↑")):
        sns.barplot(data=per_seed, y="label", x=metric, ax=ax, color="0.82", errorbar=None)
        sns.stripplot(data=per_seed, y="label", x=metric, ax=ax, color="black", size=4)
        for name, value in references[metric].items():
            colour, style = styles[name]
            ax.axvline(value, color=colour, ls=style, lw=1.5, label=f"{name} ({value:.1f})" if metric == "LE"
                       else f"{name} ({value:.2f})")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, title="baselines",
                  title_fontsize=7)
    fig.tight_layout()
    return fig, per_seed


def few_shot_figure(curve: pd.DataFrame, references: dict[str, float], grid: pd.DataFrame | None = None
                    ) -> tuple[plt.Figure, pd.DataFrame]:
    """LE vs examples per class (a) and vs number of classes (b), with reference lines (this run),
    the full-data masker's seed range (band, from `grid`) and the paper's values read off its
    overview figure (grey squares, ImageNet scale, for orientation only)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    styles = dict(zip(references, [("tab:red", "-."), ("tab:green", "--"), ("0.3", ":"), ("0.5", "--")]))
    for ax, kind, x, card, title in ((axes[0], "per class", "k", CARD_FEW_SHOT_K, "(a) k examples per class"),
                                     (axes[1], "classes", "n_classes", CARD_FEW_SHOT_N, "(b) all examples of N classes")):
        part = curve[(curve["kind"] == kind) & (curve["point"] != "1 epoch")]
        for row, group in part.groupby("row"):
            group = group.sort_values(x)
            line = ax.plot(group[x], group["LE"], marker="o", label=f"{row} ({GRID_ROWS[row]['label']})")[0]
            last = group.iloc[-1]
            ax.annotate("all", (last[x], last["LE"]), textcoords="offset points", xytext=(4, 6), fontsize=8)
            if grid is not None and (grid["row"] == row).any():
                seeds = summary_table(grid[grid["row"] == row], ["replicate"])["LE"]
                if len(seeds) > 1:
                    ax.fill_between([group[x].min(), group[x].max()], seeds.min(),
                                    seeds.max(), color=line.get_color(), alpha=0.12,
                                    label=f"{row} full data, range over {len(seeds)} seeds")
        epoch = curve[(curve["kind"] == kind) & (curve["point"] == "1 epoch")]
        for _, r in epoch.iterrows():
            ax.axhline(r["LE"], color="tab:blue", lw=1, label=f"{r['row']} trained 1 epoch")
        for name, value in references.items():
            colour, style = styles[name]
            ax.axhline(value, color=colour, ls=style, lw=1.5, label=f"{name} (this run)")
        paper_x = [float(p) for p in card if p.isdigit()]
        ax.scatter(paper_x, [card[str(int(p))] for p in paper_x], marker="s", color="0.6", zorder=3,
                   label="paper, ImageNet [fig≈]")
        ax.set_xscale("log")
        ax.set_ylim(0, 105)
        ax.set_xlabel("examples per class" if kind == "per class" else "number of classes")
        ax.set_ylabel("LE (%) ↓")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    return fig, curve


def area_figure(grid: pd.DataFrame, baselines: dict[str, pd.DataFrame]) -> tuple[plt.Figure, pd.DataFrame]:
    """Distribution of the per-image mask area (mean of the continuous mask) per variant; the table
    holds the box-plot statistics (quartiles, 1.5·IQR whiskers, mean, count) of every variant."""
    frames = [grid.assign(variant=[f"{r}: {GRID_ROWS[r]['label']}" for r in grid["row"]])]
    for name in ("CAM", "Grad-CAM", "Fong & Vedaldi", "ground truth"):
        if name in baselines:
            frames.append(baselines[name].assign(variant=name))
    per_image = pd.concat(frames, ignore_index=True)[["variant", "avg_mask"]]
    fig, ax = plt.subplots(figsize=(8, 0.38 * per_image["variant"].nunique() + 1.5))
    sns.boxplot(data=per_image, y="variant", x="avg_mask", ax=ax, color="0.85", fliersize=1.5)
    ax.set_xlabel("mask area (mean of the mask per image)")
    ax.set_ylabel("")
    fig.tight_layout()
    rows = []
    for variant, values in per_image.groupby("variant", sort=False)["avg_mask"]:
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        reach = 1.5 * (q3 - q1)
        rows.append({"variant": variant, "n": len(values), "mean": values.mean(), "q1": q1, "median": median,
                     "q3": q3, "whisker_low": values[values >= q1 - reach].min(),
                     "whisker_high": values[values <= q3 + reach].max()})
    return fig, pd.DataFrame(rows).round(4)


def randomisation_figure(table: pd.DataFrame) -> tuple[plt.Figure, pd.DataFrame]:
    summary = table.groupby(["step", "layer"], sort=True)[["spearman", "ssim"]].mean().reset_index()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for column in ("spearman", "ssim"):
        ax.plot(summary["layer"], summary[column], marker="o", label=column)
    ax.set_xlabel("randomised down to layer (cascading, top-down)")
    ax.set_ylabel("similarity to the original masks")
    ax.set_ylim(-0.2, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig, summary


# ============================================================================ card comparison


def scale_table(s: dict, d: dict, classifiers: list[dict]) -> pd.DataFrame:
    """The scale of this run next to the paper's (card E3/E4, §5)."""
    rows = [
        ("data", f"{d['dataset']}: {s['n_train']} train / {s['n_test']} test, {IMAGE_SIZE}×{IMAGE_SIZE}, "
                 f"{d['num_classes']} classes", "ImageNet: 1.28M train, 50k val, 224×224, 1000 classes"),
        ("classifier", f"§5.2 residual net, widths {s['widths']}, stem stride {s['stem_stride']}, "
                       f"{s['epochs']} epochs, {len(classifiers)} seeds (one per replicate); test accuracy "
                       + "–".join(f"{100 * f(c['test_accuracy'] for c in classifiers):.1f}" for f in (min, max)) + "%",
         "ImageNet ResNet-50 (pretrained), top-1 ≈ 76%"),
        ("masker", f"layers l3+l4 → {s['hidden']} ch, 16×16 grid, nearest ×4", "layers 3+4 → 64 ch, 56×56 grid, ×4"),
        ("schedule", f"{s['steps']} steps × batch {s['batch_size']} (Adam lr {s['lr']:g}, ×0.1 at 1/3, 2/3)",
         "≈213k steps × batch 72 (Adam lr 1e-3, ×0.1 every 20 of 60 'epochs')"),
        ("grid", ", ".join(f"{r}×{n}" for r, n in s["rows"].items()) + " (row × seeds)", "Table 1 rows A–J (n/a)"),
        ("few-shot", f"k ∈ {s['few_shot_k']} + all; N ∈ {s['few_shot_classes']} + all",
         "k ∈ {1, 10, 125}, N ∈ {10, 100} (+ 1 epoch, fully trained)"),
        ("λ", f"λ_in 1, λ_out 10 (FIX) / 15 (CA), λ_tv {s['tv_grid']}", "λ_in 1, λ_out 10 / 15, λ_tv 1e-3 at 224 px"),
    ]
    return pd.DataFrame(rows, columns=["item", "this run", "paper"])


def readme_comparison(grid: pd.DataFrame, row: str = "S6") -> pd.DataFrame:
    """The authors' README evaluation output (card §3.1) next to this run's row (mean over seeds)."""
    per_seed = summary_table(grid[grid["row"] == row], ["replicate"])
    ours = per_seed.mean(numeric_only=True)
    scale = {"OM": 0.01, "LE": 0.01}  # the README reports OM and LE as fractions
    rows = []
    for key, paper in CARD_README.items():
        value = ours.get(key, np.nan) * scale.get(key, 1.0) if key in ours else np.nan
        rows.append({"metric": key, "paper (README, ImageNet)": paper,
                     f"this run ({row}, synthetic)": "n/a" if np.isnan(value) else round(float(value), 4)})
    return pd.DataFrame(rows)


def few_shot_comparison(curve: pd.DataFrame, references: dict[str, float], row: str = "S3") -> pd.DataFrame:
    """Card §3.2 [fig≈] values next to this run's few-shot LE (%)."""
    part = curve[curve["row"] == row]
    ours_k = {p: v for p, v in zip(part[part["kind"] == "per class"]["point"], part[part["kind"] == "per class"]["LE"])}
    ours_n = {p: v for p, v in zip(part[part["kind"] == "classes"]["point"], part[part["kind"] == "classes"]["LE"])}
    rows = []
    for point, paper in CARD_FEW_SHOT_K.items():
        rows.append({"plot": "(a) k per class", "point": point, "paper LE (ImageNet, fig≈)": paper})
    for point, value in ours_k.items():
        rows.append({"plot": "(a) k per class", "point": point, f"this run LE ({row})": round(value, 1)})
    for point, paper in CARD_FEW_SHOT_N.items():
        rows.append({"plot": "(b) N classes", "point": point, "paper LE (ImageNet, fig≈)": paper})
    for point, value in ours_n.items():
        rows.append({"plot": "(b) N classes", "point": point, f"this run LE ({row})": round(value, 1)})
    for name, paper in CARD_REFERENCE_LE.items():
        rows.append({"plot": "reference", "point": name, "paper LE (ImageNet, fig≈)": paper,
                     f"this run LE ({row})": round(references.get(name, np.nan), 1)})
    table = pd.DataFrame(rows)
    return table.groupby(["plot", "point"], sort=False).first().reset_index().fillna("n/a")


def quirk_table() -> pd.DataFrame:
    return pd.DataFrame(QUIRKS, columns=["quirk", "authors' code", "choice here"])


# ============================================================================ findings
#
# Each verdict is decided by `study.findings.interval_verdict` on a 95% interval, never on a point:
# `reproduced` when the whole interval is on the claimed side of the rule's threshold, `not
# reproduced` when it is wholly on the other side, `inconclusive` when it straddles it. The rules
# (threshold, statistic, unit) are the constants below and the docstrings of the `_claim_*` helpers.

FEW_POINTS = 5.0  # LE points: "a few LE points" (card §5.6); the margin of the few-shot and "no gain" rules
MASK_BAND = (0.05, 0.95)  # non-degenerate mask: every seed's mean mask in this band (0.05 = SM's area floor, E7)
SIMILARITY_LEVEL = 0.5  # cascading randomisation: the masks have changed when mean similarity < 0.5
LEAK_MARGIN = 0.10  # leak check: "reads the silhouette" when it follows the mask source > chance + 0.10
MIN_MASKED_PASSES = 1.0  # CA vs FIX: the co-trained classifier's masked updates must cover ≥ 1 pass over the training set


def per_seed_table(grid: pd.DataFrame) -> pd.DataFrame:
    """`summarise` per (row, replicate) of the grid: one row per trained masker."""
    return summary_table(grid, ["row", "replicate"])


def row_difference(per_seed: pd.DataFrame, a: str, b: str, metric: str = "LE") -> dict:
    """metric(a) − metric(b) between two grid rows, paired by replicate: replicate r of every row sits
    on classifier r, so a per-replicate difference holds no classifier-to-classifier variation the
    two rows share. The mean of the differences over the replicates both rows have, and its 95%
    paired t interval (`scipy.stats.ttest_rel`). With fewer than two pairs, or no spread in the
    differences, the interval is the point itself (the reported n says so)."""
    if not isinstance(per_seed, pd.DataFrame) or not {"row", "replicate", metric} <= set(per_seed.columns):
        raise ValueError(f"need a per-seed table with columns 'row', 'replicate' and {metric!r} (see per_seed_table)")
    x = per_seed.loc[per_seed["row"] == a].dropna(subset=[metric]).set_index("replicate")[metric]
    y = per_seed.loc[per_seed["row"] == b].dropna(subset=[metric]).set_index("replicate")[metric]
    if not x.index.is_unique or not y.index.is_unique:
        raise ValueError(f"rows {a!r} and {b!r} need one {metric} per replicate")
    common = x.index.intersection(y.index).sort_values()
    if len(common) == 0:
        raise ValueError(f"rows {a!r} and {b!r} need a replicate in common with a {metric}; found replicates "
                         f"{sorted(x.index)} and {sorted(y.index)} (rows present: {sorted(set(per_seed['row']))})")
    x, y = x[common].to_numpy(float), y[common].to_numpy(float)
    mean = float(np.mean(x - y))
    low = high = mean
    if len(common) >= 2 and np.ptp(x - y) > 0:
        ci = stats.ttest_rel(x, y).confidence_interval(confidence_level=0.95)
        low, high = float(ci.low), float(ci.high)
    return {"a": a, "b": b, "mean": mean, "low": low, "high": high, "n": len(common)}


def _diff_text(diff: dict, name: str = "LE") -> str:
    pairs = f"{diff['n']} paired replicate(s), one classifier each"
    if diff["low"] == diff["high"]:
        return f"{name} {diff['a']}−{diff['b']} {diff['mean']:+.1f}, point estimate over {pairs} (no interval)"
    return (f"{name} {diff['a']}−{diff['b']} {diff['mean']:+.1f} [{diff['low']:+.1f}, {diff['high']:+.1f}], "
            f"95% t CI over {pairs}")


def _all_of(verdicts: list[str]) -> str:
    """A conjunction of interval verdicts: every part reproduced → reproduced; any part not
    reproduced → not reproduced; otherwise inconclusive."""
    if all(v == "reproduced" for v in verdicts):
        return "reproduced"
    if any(v == "not reproduced" for v in verdicts):
        return "not reproduced"
    return "inconclusive"


def _two_parts(first: str, second: str) -> str:
    """Two independent parts of one claim: both reproduced → reproduced, both not → not reproduced,
    one of each → partly reproduced, otherwise (a part inconclusive) inconclusive."""
    pair = {first, second}
    if pair == {"reproduced"}:
        return "reproduced"
    if pair == {"not reproduced"}:
        return "not reproduced"
    if pair == {"reproduced", "not reproduced"}:
        return "partly reproduced"
    return "inconclusive"


def _seeds(per_seed: pd.DataFrame, *rows: str) -> str:
    counts = per_seed.groupby("row")["replicate"].nunique()
    return "replicates (classifier + masker seed) " + ", ".join(f"{r}: {int(counts.get(r, 0))}" for r in rows)


def _le(per_seed: pd.DataFrame, *rows: str) -> str:
    parts = []
    for r in rows:
        values = per_seed.loc[per_seed["row"] == r, "LE"]
        parts.append(f"{r} {values.mean():.1f}" + (f"±{values.std(ddof=1):.1f}" if len(values) > 1 else ""))
    return ", ".join(parts)


def _has_rows(per_seed: pd.DataFrame, *rows: str) -> bool:
    return set(rows) <= set(per_seed["row"])


def _not_tested(claim: str, paper: str, why: str) -> dict:
    return {"claim": claim, "paper": paper, "this_run": why, "verdict": "not tested", "n": "", "uncertainty": ""}


def _claim_both_objectives(per_seed: pd.DataFrame) -> dict:
    """Claim 2. Statistic: ΔLE = LE(single objective) − LE(both) per classifier mode (FIX: S1, S2 vs
    S3; CA: S4, S5 vs S6), 95% paired t interval over replicates (`row_difference`); threshold 0 (both must be better: Δ > 0).
    A mode is reproduced when both its intervals are wholly above 0, not reproduced when either is
    wholly at or below 0, else inconclusive; the claim combines the two modes (`_two_parts`)."""
    claim, paper = "Masked-in + masked-out beats either alone (claim 2)", "abstract: 'the most important ingredient'; Table 1 n/a"
    if not _has_rows(per_seed, "S1", "S2", "S3", "S4", "S5", "S6"):
        return _not_tested(claim, paper, "rows S1–S6 not all run")
    diffs, modes = [], {}
    for mode, both, singles in (("FIX", "S3", ("S1", "S2")), ("CA", "S6", ("S4", "S5"))):
        parts = [row_difference(per_seed, single, both) for single in singles]
        modes[mode] = _all_of([interval_verdict(d["low"], d["high"], 0.0) for d in parts])
        diffs += parts
    return {"claim": claim, "paper": paper,
            "this_run": f"LE % {_le(per_seed, 'S1', 'S2', 'S3')}; {_le(per_seed, 'S4', 'S5', 'S6')}; "
                        f"FIX part {modes['FIX']}, CA part {modes['CA']} (rule: every ΔLE single − both > 0)",
            "verdict": _two_parts(modes["FIX"], modes["CA"]), "n": _seeds(per_seed, "S1", "S2", "S3", "S4", "S5", "S6"),
            "uncertainty": "; ".join(_diff_text(d) for d in diffs)}


def _claim_ca_beats_fix(per_seed: pd.DataFrame, ca: pd.DataFrame | None) -> dict:
    """Claim 3. Statistic: ΔLE = LE(S3, FIX) − LE(S6, CA), 95% paired t interval over replicates; threshold
    0 (CA better: Δ > 0). Mechanism gate: the co-trained classifier must have been trained on masked
    images for at least `MIN_MASKED_PASSES` pass over the training set (masked updates × batch ≥
    n_train) in every S6 seed; otherwise the schedule is too short for the mechanism and the verdict
    is inconclusive whatever the interval. The LE with BatchNorm statistics re-estimated on clean
    images (`ca_diagnostics`) is reported next to the faithful number; the verdict uses the faithful one."""
    claim, paper = "Training the classifier alongside (CA) beats a fixed one (claim 3)", "abstract; README LE 35.75 (Row J?), Row I n/a"
    if not _has_rows(per_seed, "S3", "S6"):
        return _not_tested(claim, paper, "rows S3 and S6 not both run")
    diff = row_difference(per_seed, "S3", "S6")
    verdict = interval_verdict(diff["low"], diff["high"], 0.0)
    uncertainty = _diff_text(diff)
    this_run = f"LE % {_le(per_seed, 'S3', 'S6')}"
    s6 = None if ca is None or ca.empty else ca[ca["row"] == "S6"]
    if s6 is None or s6.empty:
        verdict, this_run = "inconclusive", this_run + "; mechanism check (ca_diagnostics) not run"
    else:
        passes = s6["masked_images"] / s6["n_train"]
        clean = pd.concat([per_seed[per_seed["row"] == "S3"][["row", "replicate", "LE"]],
                           s6[["replicate"]].assign(row="S6", LE=s6["LE_clean_bn"].to_numpy())])
        clean_diff = row_difference(clean, "S3", "S6")
        this_run += (f"; S6 with BN statistics re-estimated on clean images {s6['LE_clean_bn'].mean():.1f}; "
                     f"co-trained classifier: {s6['masked_updates'].min():.0f}–{s6['masked_updates'].max():.0f} masked "
                     f"updates = {passes.min():.2f}–{passes.max():.2f} passes over the training set, masked CE "
                     f"(in + out, last 10 updates) {s6['masked_ce'].min():.2f}–{s6['masked_ce'].max():.2f}")
        uncertainty += "; clean-BN " + _diff_text(clean_diff)
        if passes.min() < MIN_MASKED_PASSES:
            verdict = "inconclusive"
            this_run += f" (< {MIN_MASKED_PASSES:g} pass: schedule too short for the mechanism → inconclusive)"
    return {"claim": claim, "paper": paper, "this_run": this_run, "verdict": verdict,
            "n": _seeds(per_seed, "S3", "S6"), "uncertainty": uncertainty}


def _paired_images(first: pd.DataFrame, second: pd.DataFrame) -> tuple[float, float, float, int]:
    """Per-test-image difference of LE (in points) between two maskers evaluated on the same images:
    mean and 95% t interval over images (`mean_interval`)."""
    if len(first) != len(second):
        raise ValueError(f"the two evaluations must cover the same images; got {len(first)} and {len(second)}")
    diff = 100 * (first["le"].to_numpy(float) - second["le"].to_numpy(float))
    mean, low, high = mean_interval(diff, method="t")
    return mean, low, high, len(diff)


def _replicates(images: dict, row: str, point: str) -> dict[int, pd.DataFrame]:
    """{replicate: per-image evaluation} of one few-shot point (replicate 0 is keyed (row, point))."""
    found = {key[2]: frame for key, frame in images.items() if len(key) == 3 and key[:2] == (row, point)}
    if (row, point) in images:
        found[0] = images[(row, point)]
    return dict(sorted(found.items()))


def _gap_over_replicates(images: dict, row: str, first: str, second: str, second_name: str | None = None) -> dict:
    """LE(first) − LE(second) in points between two few-shot points of `row` evaluated on the same
    test images: one gap per replicate both points have (the mean per-image difference; replicate r:
    classifier r, masker seed r), with a 95% t interval over those replicates; with one replicate,
    a paired 95% t interval over its test images (training noise not included). `second_name`: how
    the text names `second` (default: its point label)."""
    a, b = _replicates(images, row, first), _replicates(images, row, second)
    common = sorted(set(a) & set(b))
    gaps = [_paired_images(a[r], b[r])[0] for r in common]
    if len(common) > 1:
        mean, low, high = mean_interval(gaps, method="t")
        count, units = len(common), "replicates"
        n = f"{len(common)} replicates (classifier + masker seed) per point, {len(a[common[0]])} test images each"
    else:
        mean, low, high, count = _paired_images(a[common[0]], b[common[0]])
        units, n = "test images (paired)", f"{count} test images, 1 masker per point (replicate {common[0]})"
    text = (f"LE {first} {np.mean([100 * a[r]['le'].mean() for r in common]):.1f} vs {second_name or second} "
            f"{np.mean([100 * b[r]['le'].mean() for r in common]):.1f}: gap {mean:+.1f} points")
    if len(common) > 1:
        text += f" (mean of {len(common)} replicates; per replicate " + ", ".join(f"{g:+.1f}" for g in gaps) + ")"
    return {"mean": mean, "low": low, "high": high, "count": count, "units": units, "n": n, "text": text}


def _claim_few_shot_k10(images: dict | None, row: str) -> dict:
    """Claim 4. Statistic: gap = LE(k = 10 per class) − LE(masker trained for one pass over the full
    training set), the card's reference for the abstract's 0.7 points (§3.2), both evaluated on the
    same test images. With several replicates (few_shot_seeds; replicate r: classifier r and masker
    seed r for both points): one gap per replicate (the mean per-image difference), 95% t interval
    over the replicates, so that the interval holds the training noise of maskers and classifiers (a
    single masker's gap moved by 7.6 points under another CPU's arithmetic). With one replicate: 95%
    t interval over the test images, paired. Threshold `FEW_POINTS`: reproduced when the
    interval is wholly below it, not reproduced when wholly above. Not tested without a 1-epoch
    masker (`epoch_reference` off) or without k = 10."""
    claim = f"10 examples per class lose only a few LE points against a 1-epoch masker ({row}; claim 4)"
    paper = f"abstract: {ABSTRACT_GAP} points (fig≈ 38.5 at k=10 vs 37.8 at 1 epoch)"
    images = images or {}
    if (row, "k=10") not in images:
        return _not_tested(claim, paper, "no k = 10 masker at this profile")
    if (row, "1 epoch") not in images:
        return _not_tested(claim, paper, "no 1-epoch reference masker at this profile (epoch_reference off)")
    gap = _gap_over_replicates(images, row, "k=10", "1 epoch")
    this_run = gap["text"]
    if (row, "all") in images:
        this_run += f" (full-data masker, replicate 0: {100 * images[(row, 'all')]['le'].mean():.1f})"
    return {"claim": claim, "paper": paper, "this_run": this_run,
            "verdict": interval_verdict(gap["low"], gap["high"], FEW_POINTS, above=False), "n": gap["n"],
            "uncertainty": describe_interval(gap["mean"], gap["low"], gap["high"], gap["count"], gap["units"], digits=1)
                           + f"; threshold {FEW_POINTS:g} points"}


def _claim_few_classes(images: dict | None, row: str) -> dict:
    """Few classes generalise worse (fig≈). Statistic: gap = LE(all examples of the fewest N classes)
    − LE(full-data masker of the same replicate), one gap per replicate, 95% t interval over the
    replicates (`_gap_over_replicates`; with one replicate, paired over its test images); threshold 0
    (worse)."""
    claim, paper = f"A masker trained on few classes generalises worse ({row})", "fig≈: 10 classes LE ≈65.8 vs 100 classes ≈40.6"
    points = sorted(int(key[1].split("=")[1]) for key in (images or {}) if key[0] == row and key[1].startswith("N=")
                    and len(key) == 2)
    if not points or (row, "all") not in images:
        return _not_tested(claim, paper, "no few-class masker at this profile")
    gap = _gap_over_replicates(images, row, f"N={points[0]}", "all", second_name="all classes")
    return {"claim": claim, "paper": paper, "this_run": gap["text"],
            "verdict": interval_verdict(gap["low"], gap["high"], 0.0), "n": gap["n"],
            "uncertainty": describe_interval(gap["mean"], gap["low"], gap["high"], gap["count"], gap["units"], digits=1)
                           + "; threshold 0"}


def _claim_no_gain(per_seed: pd.DataFrame, variant: str, claim: str, paper: str, stand_in: bool = False) -> dict:
    """"<variant> gives no gain over S6". Statistic: gain = LE(S6) − LE(variant), 95% paired t
    interval over replicates; "no gain" is reproduced when the interval is wholly below `FEW_POINTS`, not
    reproduced when wholly at or above it. Gate: every seed of the variant has a non-degenerate mask
    (mean mask in `MASK_BAND`); a collapsed or flooded masker makes "no gain" trivially true, so the
    verdict is then inconclusive. `stand_in`: the variant only stands in for the paper's (blur for a
    learned infiller), so a pass counts as partly reproduced."""
    if not _has_rows(per_seed, "S6", variant):
        return _not_tested(claim, paper, f"rows S6 and {variant} not both run")
    diff = row_difference(per_seed, "S6", variant)
    verdict = interval_verdict(diff["low"], diff["high"], FEW_POINTS, above=False)
    masks = per_seed.loc[per_seed["row"] == variant, "avg_mask"]
    this_run = (f"LE % {_le(per_seed, 'S6', variant)}; {variant} mean mask {masks.min():.3f}–{masks.max():.3f} over replicates "
                f"(non-degenerate band {MASK_BAND[0]:g}–{MASK_BAND[1]:g})")
    if not masks.between(*MASK_BAND).all():
        verdict = "inconclusive"
        this_run += f": degenerate {variant} masker → inconclusive"
    if stand_in and verdict == "reproduced":
        verdict = "partly reproduced"
        this_run += " (stand-in only → partly)"
    return {"claim": claim, "paper": paper, "this_run": this_run, "verdict": verdict,
            "n": _seeds(per_seed, "S6", variant),
            "uncertainty": _diff_text(diff, "gain LE") + f"; no gain when < {FEW_POINTS:g} points"}


def _claim_entropy_vs_ce(per_seed: pd.DataFrame) -> dict:
    """S7 (card §5.4, objective type). Statistic: ΔLE = LE(S7, masked-out = maximise CE) − LE(S6,
    masked-out = maximise entropy), 95% paired t interval over replicates; threshold 0 (entropy better)."""
    claim = "The max-entropy masked-out objective beats the adversarial max-CE one (S7)"
    paper = "code: the final models use the entropy objective (E3); Table 1 n/a"
    if not _has_rows(per_seed, "S6", "S7"):
        return _not_tested(claim, paper, "rows S6 and S7 not both run")
    diff = row_difference(per_seed, "S7", "S6")
    return {"claim": claim, "paper": paper, "this_run": f"LE % {_le(per_seed, 'S6', 'S7')}",
            "verdict": interval_verdict(diff["low"], diff["high"], 0.0), "n": _seeds(per_seed, "S6", "S7"),
            "uncertainty": _diff_text(diff) + "; threshold 0"}


def _claim_beats_baselines(per_seed: pd.DataFrame, baselines: pd.DataFrame | None) -> dict:
    """The trained masker (the better of S3 / S6 by mean LE) against CAM and Fong & Vedaldi.
    Statistic: per replicate r, LE(masker r) − LE(baseline on classifier r) (`baseline_le`: one
    deterministic map per image and classifier), 95% paired t interval over the replicates
    (`row_difference`); reproduced for a baseline when the interval is wholly below 0; the two
    baselines combine as `_two_parts`."""
    claim, paper = "The trained masker localises better than CAM and Fong & Vedaldi", "fig≈: masker 35.8, F&V ≈43.1, CAM ≈48.1"
    rows = [r for r in ("S3", "S6") if r in set(per_seed["row"])]
    if baselines is not None and not {"method", "replicate", "LE"} <= set(baselines.columns):
        raise ValueError("baselines must be baseline_le(...): a DataFrame with method, replicate, LE")
    methods = set() if baselines is None else set(baselines["method"])
    if not rows or not set(BASELINE_METHODS) <= methods:
        return _not_tested(claim, paper, "S3/S6 or the CAM / Fong & Vedaldi baselines not run")
    best = min(rows, key=lambda r: per_seed.loc[per_seed["row"] == r, "LE"].mean())
    both = pd.concat([per_seed.loc[per_seed["row"] == best, ["row", "replicate", "LE"]],
                      baselines.rename(columns={"method": "row"})[["row", "replicate", "LE"]]])
    diffs = [row_difference(both, best, method) for method in BASELINE_METHODS]
    verdict = _two_parts(*(interval_verdict(d["low"], d["high"], 0.0, above=False) for d in diffs))
    le = baselines.groupby("method")["LE"].mean()
    return {"claim": claim, "paper": paper,
            "this_run": f"LE % {_le(per_seed, best)}, Fong & Vedaldi {le['Fong & Vedaldi']:.1f}, CAM {le['CAM']:.1f} "
                        f"(means over {baselines['replicate'].nunique()} classifiers; rule: masker − baseline < 0)",
            "verdict": verdict, "n": _seeds(per_seed, best) + "; baselines one map per image and classifier",
            "uncertainty": "; ".join(_diff_text(d) for d in diffs)}


def _claim_no_leak(leak: pd.DataFrame | None) -> dict:
    """Leak check (card §5.6). Statistic: the share of shuffled-mask images (pairs of different
    classes) on which the co-trained classifier predicts the mask source's class, pooled over the
    CA maskers checked, exact binomial 95% interval (`scipy.stats.binomtest`); threshold chance +
    `LEAK_MARGIN`; reproduced (no leak) when the interval is wholly below it."""
    claim, paper = "Sanity: the co-trained classifier does not read the mask silhouette", "n/a (risk named by the card, §5.6)"
    ca = None if leak is None or leak.empty else leak[leak["mode"] == "ca"]
    if ca is None or ca.empty:
        return _not_tested(claim, paper, "no CA masker checked")
    n = int(ca["n_pairs"].sum())
    k = int(round(float((ca["follows_mask_source"] * ca["n_pairs"]).sum())))
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    chance = float(ca["chance"].iloc[0])
    return {"claim": claim, "paper": paper,
            "this_run": f"shuffled masks: predicts the mask source's class {100 * k / n:.0f}% (chance {100 * chance:.0f}%)",
            "verdict": interval_verdict(ci.low, ci.high, chance + LEAK_MARGIN, above=False),
            "n": f"{n} image pairs, {len(ca)} CA masker(s)",
            "uncertainty": f"{k / n:.3f} [{ci.low:.3f}, {ci.high:.3f}], 95% exact binomial CI over {n} image pairs; "
                           f"threshold {chance + LEAK_MARGIN:.2f}"}


def _claim_randomisation(randomisation: pd.DataFrame | None) -> dict:
    """Cascading randomisation (card E7 sanity checks). Statistic: per masker (column `replicate`,
    one per seed; a table without it is one masker), the mean over images of the Spearman and of the
    SSIM (window 5) between the masks of the fully randomised classifier and the original masks;
    each similarity's mean over maskers with its 95% t interval over maskers; threshold
    `SIMILARITY_LEVEL`: a similarity passes when its interval is wholly below it (with one masker
    there is no interval: inconclusive); Spearman and SSIM combine as `_two_parts`."""
    claim, paper = "Sanity: masks change when the classifier is randomised (cascading)", "n/a (sanity-check results not available)"
    if randomisation is None or randomisation.empty:
        return _not_tested(claim, paper, "randomisation check not run")
    last = randomisation[randomisation["step"] == randomisation["step"].max()]
    per_masker = last.assign(replicate=last.get("replicate", 0)).groupby("replicate")[["spearman", "ssim"]].mean()
    n_maskers = len(per_masker)
    parts, texts = [], []
    for column in ("spearman", "ssim"):
        mean, low, high = mean_interval(per_masker[column], method="t")
        if n_maskers < 2:
            parts.append("inconclusive")
            texts.append(f"{column} {mean:.2f}, one masker: no interval over maskers")
            continue
        parts.append(interval_verdict(low, high, SIMILARITY_LEVEL, above=False))
        texts.append(f"{column} " + describe_interval(mean, low, high, n_maskers, "maskers"))
    return {"claim": claim, "paper": paper,
            "this_run": f"fully randomised vs original masks: Spearman {per_masker['spearman'].mean():.2f} ({parts[0]}), "
                        f"SSIM {per_masker['ssim'].mean():.2f} ({parts[1]}), means over {n_maskers} masker(s); "
                        f"rule: both < {SIMILARITY_LEVEL:g}",
            "verdict": _two_parts(*parts), "n": f"{n_maskers} masker(s) × {len(last) // max(n_maskers, 1)} test images",
            "uncertainty": "; ".join(texts)}


def _claim_random_label(per_seed: pd.DataFrame, random_label: dict | None) -> dict:
    """Data randomisation. Statistic: LE(S3 masker on the shuffled-label classifier, one masker) −
    LE(S3), the interval from S3's 95% t interval over seeds; threshold 0 (worse masks)."""
    claim, paper = "Sanity: a shuffled-label classifier yields worse masks (data randomisation)", "n/a (sanity-check results not available)"
    if random_label is None or "S3" not in set(per_seed["row"]):
        return _not_tested(claim, paper, "data-randomisation control or S3 not run")
    value = float(random_label["summary"]["LE"])
    values = per_seed.loc[per_seed["row"] == "S3", "LE"]
    mean, low, high = mean_interval(values, method="t")
    return {"claim": claim, "paper": paper, "this_run": f"LE % shuffled-label S3 {value:.1f} vs S3 {mean:.1f}",
            "verdict": interval_verdict(value - high, value - low, 0.0),
            "n": f"{len(values)} S3 replicates; 1 shuffled-label masker",
            "uncertainty": describe_interval(value - mean, value - high, value - low, len(values), "S3 replicates", digits=1)
                           + " (LE shuffled − S3)"}


def findings(baselines: pd.DataFrame | None, per_seed: pd.DataFrame, few_shot_images: dict | None = None,
             leak: pd.DataFrame | None = None,
             randomisation: pd.DataFrame | None = None, random_label: dict | None = None,
             ca: pd.DataFrame | None = None) -> list[dict]:
    """The findings rows (claims of card §1 and §5.6), each with the verdict of its interval rule
    (see the `_claim_*` helpers), n and the interval as text.

    `baselines`: `baseline_le` (per classifier); `per_seed`: `per_seed_table(grid)`;
    `few_shot_images`: the per-image evaluations of `few_shot(..., per_image=True)`; `ca`:
    `ca_diagnostics`. Missing inputs give `not tested` rows."""
    if not isinstance(per_seed, pd.DataFrame) or not {"row", "replicate", "LE", "avg_mask"} <= set(per_seed.columns):
        raise ValueError("per_seed must be per_seed_table(grid): a DataFrame with row, replicate, LE, avg_mask")
    rows = [_claim_both_objectives(per_seed), _claim_ca_beats_fix(per_seed, ca)]
    few_rows = sorted({key[0] for key in (few_shot_images or {})}) or ["S3"]
    for row in few_rows:
        rows += [_claim_few_shot_k10(few_shot_images, row), _claim_few_classes(few_shot_images, row)]
    rows += [
        _claim_no_gain(per_seed, "S8", "Gumbel-sigmoid masks give no gain (claim 1)", "abstract; Table 1 n/a"),
        _claim_no_gain(per_seed, "S9", "Counterfactual infilling gives no gain (claim 1; blur stand-in only)",
                       "abstract; Table 1 n/a (CA-GAN, DFNet not runnable here)", stand_in=True),
        _claim_entropy_vs_ce(per_seed),
        _claim_no_gain(per_seed, "S10", "Masker inputs l3+l4 suffice: l0–l4 give no gain (S10)",
                       "code: the final models use layers 3 and 4 (README); Table 1 n/a"),
        _claim_beats_baselines(per_seed, baselines),
        _claim_no_leak(leak),
        _claim_randomisation(randomisation),
        _claim_random_label(per_seed, random_label),
    ]
    return rows


# ============================================================================ CA mechanism check (BatchNorm)


@torch.no_grad()
def clean_bn_classifier(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """A copy of `model` whose BatchNorm running statistics are re-estimated on clean `images` (reset,
    then a cumulative average over batches in train mode); weights unchanged. In CA mode the
    co-trained classifier's statistics are a mix of clean and masked images (card Q7); this undoes
    that for the diagnostic. The input model is not modified."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) < 2:
        raise ValueError(f"need clean images (B ≥ 2, C, H, W); got {getattr(images, 'shape', type(images))}")
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int ≥ 2, got {batch_size!r}")
    out = copy.deepcopy(model)
    norms = [m for m in out.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError("the model has no BatchNorm layer to re-estimate")
    device = next(out.parameters()).device
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    out.train()
    for start in range(0, len(images), batch_size):
        batch = images[start: start + batch_size]
        if len(batch) >= 2:
            out(batch.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return out.eval()


def ca_diagnostics(runs: dict, classifiers: list[dict], d: dict, rows: tuple[str, ...] = ("S6",)) -> pd.DataFrame:
    """For each CA masker of `rows`: how much the co-trained classifier trained on masked images
    (masked updates, images, passes over the training set; masked CE = CE(in) + CE(out) of its last
    10 masked updates), and the test LE with its BatchNorm statistics as trained (faithful) and
    re-estimated on clean training images (`clean_bn_classifier`; masks, OM both from that copy); SM
    with the replicate's pretrained classifier."""
    out = []
    for (row, replicate), run in runs.items():
        if row not in rows or run.spec.fixed:
            continue
        clf = classifiers[replicate]
        masked = [h["classifier_masked_loss"] for h in run.history if "classifier_masked_loss" in h]
        clean = clean_bn_classifier(run.classifier, d["x_train"])
        masks, logits = masking.predict_masks(run.masker, clean, d["x_test"], run.spec)
        le_clean = summarise(evaluate_masks(masks, logits.argmax(1), d["y_test"], d["boxes_test"], d["x_test"],
                                            clf["model"]))["LE"]
        out.append({"row": row, "replicate": replicate, "masked_updates": len(masked),
                    "masked_images": len(masked) * run.spec.batch_size, "n_train": len(d["y_train"]),
                    "masked_ce": float(np.mean(masked[-10:])) if masked else np.nan,
                    "LE": summarise(evaluate_run(run, clf, d))["LE"], "LE_clean_bn": le_clean})
    return pd.DataFrame(out, columns=["row", "replicate", "masked_updates", "masked_images", "n_train", "masked_ce",
                                      "LE", "LE_clean_bn"])


# ============================================================================ real data (card §6)


class TorchvisionResNetFeatures(nn.Module):
    """A torchvision ResNet seen as the card's E1 classifier: l0 after conv1/BN/ReLU/max-pool,
    l1 … l4 = layer1 … layer4, and the logits; `channels` for the masker."""

    def __init__(self, net: nn.Module):
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "fc"):
            if not hasattr(net, name):
                raise ValueError(f"expected a torchvision ResNet; the model has no {name!r}")
        self.l0 = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)  # the net's own modules, shared
        self.l1, self.l2, self.l3, self.l4, self.fc = net.layer1, net.layer2, net.layer3, net.layer4, net.fc
        last = [layer[-1] for layer in (net.layer1, net.layer2, net.layer3, net.layer4)]
        widths = [(block.bn3 if hasattr(block, "bn3") else block.bn2).num_features for block in last]
        self.channels = {"l0": net.conv1.out_channels, **{f"l{i}": w for i, w in enumerate(widths, start=1)}}
        self.gradcam_layer = "l4"

    def forward_features(self, x):
        features = {}
        for name in masking.LAYER_NAMES:
            x = getattr(self, name)(x)
            features[name] = x
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)), features

    def forward(self, x):
        return self.forward_features(x)[0]


def real_data_run(data_root, weights_path, s: dict, seed: int = 0, device: str = "auto", model: nn.Module | None = None,
                  crop: int = 224) -> dict:
    """The card's §6 CPU path on ImageNet validation images with XML boxes.

    Images come from the shared loader `study.imagenet.load_imagenet_boxes` with Resize(crop) +
    CenterCrop(crop) (the card's 224, not 256): `n_images` // 20 classes drawn with `seed`, each
    with `real_k` + 20 images. The first `real_k` images of each class train a FIX masker
    (layers 3+4, 64 channels, crop/4 grid, λ_out 10, λ_tv 1e-3, `real_steps` steps); the other
    images evaluate it next to the full-image box, the centre box [33, 191)² and CAM. `model`
    (a torchvision ResNet) replaces the weights file, for tests. Images without a box of their
    own class after cropping are skipped.
    """
    from study import imagenet

    device = config.get_device(device)
    if model is None:
        model = imagenet.imagenet_model("resnet50", weights_path, device)
    net = TorchvisionResNetFeatures(model).to(device).eval()
    per_class = s["real_k"] + 20
    options = {"per_class": per_class, "seed": seed, "resize": crop, "crop": crop}
    try:
        arrays = imagenet.load_imagenet_boxes(data_root, n_classes=max(1, s["n_images"] // 20), **options)
    except ValueError as error:
        if "n_classes" not in str(error):
            raise
        arrays = imagenet.load_imagenet_boxes(data_root, **options)  # fewer classes on disk: take them all
    own = [(b[:, 0] == y).any() for b, y in zip(arrays["boxes"], arrays["labels"])]
    labels_all = np.asarray(arrays["labels"])
    rank = np.array([np.sum(labels_all[:i] == labels_all[i]) for i in range(len(labels_all))])
    train_idx = np.flatnonzero((rank < s["real_k"]) & np.asarray(own))
    test_idx = np.flatnonzero((rank >= s["real_k"]) & np.asarray(own))
    if len(train_idx) < 2 or len(test_idx) == 0:
        raise ValueError(f"need images with boxes for masker training (first {s['real_k']} per class, at least 2 "
                         f"for batch norm) and for evaluation; found {len(train_idx)} and {len(test_idx)}")
    images = torch.as_tensor(data.standardise(arrays["images"], imagenet.IMAGENET_MEAN, imagenet.IMAGENET_STD))
    labels = torch.as_tensor(labels_all)
    x, y = images[test_idx], labels[test_idx]
    gt = [own_class_boxes(arrays["boxes"][i], labels_all[i]) for i in test_idx]
    unclamped = {"iou_gt_boxes": [own_class_boxes(arrays["boxes_unclipped"][i], labels_all[i]) for i in test_idx]}
    n = len(test_idx)
    predicted = _logits(net, x).argmax(1)
    results = {}
    c0, c1 = round(33 * crop / 224), round(191 * crop / 224)
    for name, box in (("full image", [0, 0, crop, crop]), ("centre box", [c0, c0, c1, c1])):
        boxes = np.tile(box, (n, 1))
        results[name] = evaluate_boxes(boxes, box_masks(box, n, crop, crop), predicted, y, gt, x, net, **unclamped)
    cam = torch.cat([attribution.explain(net, x[i: i + 64].to(device), y[i: i + 64].to(device), "gradcam",
                                         layer="l4", relu=False).cpu() for i in range(0, n, 64)])
    results["CAM"] = evaluate_masks(attribution.normalise_minmax(cam), predicted, y, gt, x, net, **unclamped)
    spec = MaskerSpec(classifier_mode="fix", lambda_out=10.0, lambda_tv=1e-3, hidden=64, grid=crop // 4,
                      steps=s["real_steps"], batch_size=min(72, len(train_idx)), lr=1e-3)
    run = masking.train_masker(net, images[train_idx], labels[train_idx], spec, seed=seed, device=device)
    masks, logits = masking.predict_masks(run.masker, run.classifier, x, spec, batch_size=64)
    results[f"FIX masker (k={s['real_k']}, {s['real_steps']} steps)"] = evaluate_masks(masks, logits.argmax(1), y, gt,
                                                                                     x, net, **unclamped)
    table = pd.DataFrame([{"method": name, "images": len(frame), **summarise(frame)} for name, frame in results.items()])
    return {"table": table, "n_eval": n, "n_train_masker": len(train_idx), "classes": len(arrays["class_list"])}


def timer() -> callable:
    """A stopwatch: `t = timer(); …; t()` → (wall seconds, CPU seconds of this process and its
    finished children, e.g. the masker workers) since creation."""
    import resource

    def cpu() -> float:
        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                      resource.getrusage(resource.RUSAGE_CHILDREN)))

    start, start_cpu = time.perf_counter(), cpu()
    return lambda: (time.perf_counter() - start, cpu() - start_cpu)
