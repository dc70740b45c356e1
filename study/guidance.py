"""Model guidance with explanations (Rao et al., ICCV 2023), at toy scale.

* Three toy model families (card §5.3) with the layers `input`, `mid` and `final`:
  `VanillaNet` (Conv-BN-ReLU), `XDNNNet` (bias-free, positively homogeneous, so IxG equals
  Integrated Gradients with a zero baseline) and `BcosNet` (B-cos convolutions, b = 2,
  re-implemented from the card's description; `explanation_mode` detaches the |cos| factor).
* `layer_attribution`: IxG, Grad-CAM or B-cos contributions at a layer, differentiable
  (`create_graph=True`) so that a loss on the map can train the model.
* The guidance losses of card §2.0 as plain functions: `energy_loss`, `l1_loss`, `ppce_loss`,
  `rrr_star_loss` (per-image losses, summed over the batch by default). Post-processing order:
  clamp at 0 → divide by the per-image max|A| → bilinear upsampling to the mask's size.
* Metrics: `micro_f1` (logit ≥ 0), `energy_pointing_game` over (image, class) pairs, `iou_curve`
  (min–max normalise, threshold; 0 for an empty union), `evaluate` for a whole split.
* Selection: `pareto_mask` (values rounded to bins of 0.005), `hypervolume_2d`.
* Training: `train_baseline` (stage 1, F1-best on validation) and `guided_finetune` (stage 2,
  one random true class per image, losses summed over the batch, validation every epoch, test
  metrics for every epoch on the running validation Pareto front); `calibrate_lambda` (card §5.4).
* Annotation helpers: `class_box_masks`, `class_object_masks`, `dilate_boxes`,
  `limited_annotation`, `sample_loss_classes`.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import f1_score
import torch
import torch.nn.functional as F
from torch import nn

from study import config, train as engine
from study.metrics.localisation import rasterise_boxes

LAYERS = ("input", "mid", "final")
FAMILIES = ("vanilla", "xdnn", "bcos")
METHODS = ("ixg", "gradcam", "bcos")
WIDTHS = (16, 32, 64, 128)
MIN_ENERGY = 1e-7
BIN_WIDTH = 0.005
IOU_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 … 0.95


# ----------------------------------------------------------------------------- validation helpers

def _check_choice(name: str, value, choices: Sequence) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")
    return value


def _check_maps(maps, name: str = "maps") -> torch.Tensor:
    if not isinstance(maps, torch.Tensor) or not maps.is_floating_point():
        raise ValueError(f"{name} must be a float tensor (B,1,h,w), got {type(maps).__name__} "
                         f"{getattr(maps, 'dtype', '')}")
    if maps.ndim != 4 or maps.shape[1] != 1 or maps.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B,1,h,w) with B > 0, got {tuple(maps.shape)}")
    if not torch.isfinite(maps).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return maps


def _check_masks(masks, maps: torch.Tensor, name: str = "masks") -> torch.Tensor:
    if not isinstance(masks, torch.Tensor):
        raise ValueError(f"{name} must be a tensor (B,1,H,W), got {type(masks).__name__}")
    if masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[0] != maps.shape[0]:
        raise ValueError(f"{name} must have shape (B,1,H,W) with B = {maps.shape[0]}, got {tuple(masks.shape)}")
    if masks.shape[2] < maps.shape[2] or masks.shape[3] < maps.shape[3]:
        raise ValueError(f"{name} ({tuple(masks.shape[2:])}) must be at least as large as the maps "
                         f"({tuple(maps.shape[2:])}); maps are upsampled to the mask size")
    if masks.dtype != torch.bool:
        if not masks.is_floating_point() and masks.dtype not in (torch.uint8, torch.int32, torch.int64):
            raise ValueError(f"{name} must be bool or 0/1 numbers, got {masks.dtype}")
        if not ((masks == 0) | (masks == 1)).all():
            raise ValueError(f"{name} must be binary (0/1)")
    return masks.to(device=maps.device, dtype=maps.dtype)


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    _check_choice("reduction", reduction, ("sum", "mean", "none"))
    if reduction == "sum":
        return losses.sum()
    return losses.mean() if reduction == "mean" else losses


# ----------------------------------------------------------------------------- toy models

class BcosConv2d(nn.Module):
    """B-cos convolution (b = 2): out = |cos(p, ŵ)| · ŵᵀp for every input patch p.

    ŵ is the unit-norm weight of an output channel; ‖p‖ is taken over the whole k×k×C_in patch
    (zero padding included) plus eps. No bias. With `explain = True` the |cos| factor is detached,
    so the layer is linear in its input with the dynamic weight |cos|·ŵ (B-cos explanation mode).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, b: float = 2.0, eps: float = 1e-6,
                 scale: float = 1.0):
        super().__init__()
        self.kernel_size, self.b, self.eps, self.scale = kernel_size, b, eps, float(scale)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size)
                                   / (in_channels * kernel_size ** 2) ** 0.5)
        self.explain = False

    def unit_weight(self) -> torch.Tensor:
        return self.weight / self.weight.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = F.conv2d(x, self.unit_weight(), padding=self.padding)
        squares = x.pow(2).sum(1, keepdim=True)
        if self.kernel_size > 1:
            squares = F.avg_pool2d(squares, self.kernel_size, stride=1, padding=self.padding,
                                   count_include_pad=True) * self.kernel_size ** 2
        cosine = linear / (squares.sqrt() + self.eps)
        scale = cosine.abs().pow(self.b - 1)
        if self.explain:
            scale = scale.detach()
        return (self.scale * scale) * linear


class ToyNet(nn.Module):
    """Four blocks (widths w1..w4), MaxPool2 after blocks 1–3, a head; named layers:
    `input` (the model's input tensor: the image, or [x, 1 − x] for B-cos), `mid` (block 2 after
    pooling, H/4) and `final` (block 4, H/8)."""

    family = ""

    def __init__(self, num_classes: int, widths: Sequence[int] = WIDTHS):
        super().__init__()
        widths = tuple(widths)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if len(widths) != 4 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be four positive ints, got {widths!r}")
        self.num_classes, self.widths = num_classes, widths
        self.pool = nn.MaxPool2d(2)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def stages(self, images: torch.Tensor, layer: str = "final") -> tuple[torch.Tensor, torch.Tensor]:
        """(activation at `layer`, logits). At `input` the activation is a fresh leaf that requires grad."""
        _check_choice("layer", layer, LAYERS)
        h = self.encode(images)
        if layer == "input":
            h = h.detach().requires_grad_(True)
        activation = h
        h = self.pool(self.blocks[1](self.pool(self.blocks[0](h))))
        if layer == "mid":
            activation = h
        h = self.blocks[3](self.pool(self.blocks[2](h)))
        if layer == "final":
            activation = h
        return activation, self.head(h)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.encode(images)
        h = self.pool(self.blocks[1](self.pool(self.blocks[0](h))))
        return self.head(self.blocks[3](self.pool(self.blocks[2](h))))


class VanillaNet(ToyNet):
    """Conv3×3 + BN + ReLU blocks; GAP; Linear head."""

    family = "vanilla"

    def __init__(self, num_classes: int, widths: Sequence[int] = WIDTHS, in_channels: int = 3):
        super().__init__(num_classes, widths)
        channels = (in_channels, *self.widths)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU()) for a, b in zip(channels, channels[1:]))
        self.fc = nn.Linear(self.widths[-1], num_classes)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h.mean((2, 3)))


class _GainReLUConv(nn.Module):
    """Conv3×3 without bias → ReLU → one learnable positive scalar gain (exp of a parameter)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")
        self.log_gain = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x)) * self.log_gain.exp()


class XDNNNet(ToyNet):
    """Bias-free network: no biases, no BN shift; positively homogeneous of degree 1 up to the
    optional head bias (card Q7), so Σ IxG = logit − head bias and IxG = IntGrad (zero baseline)."""

    family = "xdnn"

    def __init__(self, num_classes: int, widths: Sequence[int] = WIDTHS, in_channels: int = 3, head_bias: bool = True):
        super().__init__(num_classes, widths)
        channels = (in_channels, *self.widths)
        self.blocks = nn.ModuleList(_GainReLUConv(a, b) for a, b in zip(channels, channels[1:]))
        self.fc = nn.Linear(self.widths[-1], num_classes, bias=head_bias)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h.mean((2, 3)))


class BcosNet(ToyNet):
    """B-cos-like network: input [x, 1 − x] (6 channels, no normalisation), B-cos conv blocks
    (no bias, no BN, no ReLU), a 1×1 B-cos head to K applied before global average pooling, and a
    constant logit bias (default 0)."""

    family = "bcos"

    def __init__(self, num_classes: int, widths: Sequence[int] = WIDTHS, in_channels: int = 3,
                 logit_bias: float = 0.0, b: float = 2.0, layer_scale: str = "fan_in"):
        super().__init__(num_classes, widths)
        channels = (2 * in_channels, *self.widths)
        scale = lambda fan_in: {"none": 1.0, "sqrt_fan_in": fan_in ** 0.5, "fan_in": float(fan_in)}[layer_scale]  # noqa: E731
        self.blocks = nn.ModuleList(BcosConv2d(a, c, 3, b=b, scale=scale(9 * a)) for a, c in zip(channels, channels[1:]))
        self.classifier = BcosConv2d(self.widths[-1], num_classes, 1, b=b)
        self.register_buffer("logit_bias", torch.tensor(float(logit_bias)))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([images, 1 - images], dim=1)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(h).mean((2, 3)) + self.logit_bias


MODEL_CLASSES = {"vanilla": VanillaNet, "xdnn": XDNNNet, "bcos": BcosNet}
DEFAULT_METHOD = {"vanilla": "ixg", "xdnn": "ixg", "bcos": "bcos"}


def build_model(family: str, num_classes: int, widths: Sequence[int] = WIDTHS, **kwargs) -> ToyNet:
    """A toy model of `family` (vanilla | xdnn | bcos)."""
    return MODEL_CLASSES[_check_choice("family", family, FAMILIES)](num_classes, widths, **kwargs)


@contextlib.contextmanager
def explanation_mode(model: nn.Module):
    """Detach the |cos| factor of every B-cos layer inside the block (no effect on other models)."""
    layers = [m for m in model.modules() if isinstance(m, BcosConv2d)]
    previous = [m.explain for m in layers]
    for m in layers:
        m.explain = True
    try:
        yield model
    finally:
        for m, flag in zip(layers, previous):
            m.explain = flag


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Train mode with BatchNorm layers in eval mode (running statistics), as in stage 2: every
    image's attribution then depends on that image only."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


# ----------------------------------------------------------------------------- attributions

def layer_attribution(model: ToyNet, images: torch.Tensor, targets: torch.Tensor, layer: str = "input",
                      method: str | None = None, create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attribution maps (B,1,h,w) at `layer` for class `targets` (B,), and the logits (B,K).

    * `ixg`: Σ_channels F ⊙ ∂y_k/∂F (the input or a feature map F). On XDNNNet this is IntGrad.
    * `gradcam`: ReLU(Σ_c mean_xy(∂y_k/∂F_c) · F_c).
    * `bcos`: IxG in explanation mode (the |cos| factors detached): B-cos contributions, summed
      over all channels (6 at the input).
    With `create_graph=True` the maps are differentiable w.r.t. the parameters (double backprop).
    The model's train/eval mode is left as it is. Maps are at the layer's resolution.
    """
    if not isinstance(model, ToyNet):
        raise ValueError(f"model must be a study.guidance.ToyNet, got {type(model).__name__}")
    method = DEFAULT_METHOD[model.family] if method is None else _check_choice("method", method, METHODS)
    if (method == "bcos") != (model.family == "bcos"):
        raise ValueError(f"method {method!r} does not fit a {model.family!r} model: B-cos models use 'bcos' "
                         "attributions and only B-cos models do (card Q8)")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor (B,C,H,W), got {getattr(images, 'shape', type(images))}")
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device != images.device:
        raise ValueError(f"model is on {parameter.device} but images are on {images.device}; move both to one device")
    targets = torch.as_tensor(targets, device=images.device)
    if targets.shape != (images.shape[0],) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be integer class indices of shape ({images.shape[0]},), got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if len(targets) and (targets.min() < 0 or targets.max() >= model.num_classes):
        raise ValueError(f"targets must lie in [0, {model.num_classes}), got {targets.tolist()}")
    mode = explanation_mode(model) if method == "bcos" else contextlib.nullcontext()
    with mode, torch.enable_grad():
        activation, logits = model.stages(images, layer)
        score = logits.gather(1, targets.long()[:, None]).sum()
        (gradient,) = torch.autograd.grad(score, activation, create_graph=create_graph)
    if method == "gradcam":
        maps = F.relu((gradient.mean((2, 3), keepdim=True) * activation).sum(1, keepdim=True))
    else:
        maps = (gradient * activation).sum(1, keepdim=True)
    if not create_graph:
        maps, logits = maps.detach(), logits.detach()
    return maps, logits


def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear upsampling to `size` (identity when the size already matches)."""
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def normalise_max_abs(maps: torch.Tensor) -> torch.Tensor:
    """Divide every map by its max |A| (maps that are all zero stay zero)."""
    peak = maps.abs().amax(dim=(1, 2, 3), keepdim=True)
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))


# ----------------------------------------------------------------------------- guidance losses

def energy_loss(maps: torch.Tensor, masks: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Energy loss (Eq. 6): 1 − Σ M·A⁺ / Σ A⁺ on the raw maps (clamp at 0, then upsample).

    When Σ A⁺ < 1e−7 the loss is 1 − Σ M·A⁺ (card Q3): finite, with a defined gradient.
    """
    maps = _check_maps(maps)
    masks = _check_masks(masks, maps)
    positive = upsample(maps.clamp(min=0), masks.shape[-2:])
    inside = (positive * masks).sum(dim=(1, 2, 3))
    total = positive.sum(dim=(1, 2, 3))
    losses = torch.where(total >= MIN_ENERGY, 1 - inside / total.clamp_min(MIN_ENERGY), 1 - inside)
    return _reduce(losses, reduction)


def _normalised_positive(maps: torch.Tensor, size) -> torch.Tensor:
    return upsample(normalise_max_abs(maps.clamp(min=0)), size)


def l1_loss(maps: torch.Tensor, masks: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """L1 loss (Eq. 3): mean over pixels of |M − Â⁺| (clamp, divide by max, upsample)."""
    maps = _check_maps(maps)
    masks = _check_masks(masks, maps)
    normalised = _normalised_positive(maps, masks.shape[-2:])
    return _reduce((masks - normalised).abs().mean(dim=(1, 2, 3)), reduction)


def ppce_loss(maps: torch.Tensor, masks: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """PPCE (Eq. 4): −1/‖M‖₁ Σ M·log Â⁺, computed as BCE against 1 on the in-box pixels, with the
    log clamped at −100 (card Q4). Empty masks raise ValueError."""
    maps = _check_maps(maps)
    masks = _check_masks(masks, maps)
    area = masks.sum(dim=(1, 2, 3))
    if (area == 0).any():
        raise ValueError("ppce_loss needs a non-empty mask for every image (it averages over the mask)")
    normalised = _normalised_positive(maps, masks.shape[-2:]).clamp(0, 1)
    cross_entropy = F.binary_cross_entropy(normalised, torch.ones_like(normalised), reduction="none")
    return _reduce((cross_entropy * masks).sum(dim=(1, 2, 3)) / area, reduction)


def rrr_star_loss(maps: torch.Tensor, masks: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """RRR* (Eq. 5): Σ (1 − M)·Â² with Â = A / max|A| (signed, no clamp), a sum over the pixels."""
    maps = _check_maps(maps)
    masks = _check_masks(masks, maps)
    normalised = upsample(normalise_max_abs(maps), masks.shape[-2:])
    return _reduce(((1 - masks) * normalised.pow(2)).sum(dim=(1, 2, 3)), reduction)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "energy": energy_loss, "l1": l1_loss, "ppce": ppce_loss, "rrr": rrr_star_loss,
}


def guidance_loss(name: str, maps: torch.Tensor, masks: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """The localisation loss `name` (energy | l1 | ppce | rrr)."""
    return LOSSES[_check_choice("loss", name, LOSSES)](maps, masks, reduction=reduction)


# ----------------------------------------------------------------------------- annotations

def class_box_masks(boxes: Sequence, num_classes: int, height: int, width: int) -> torch.Tensor:
    """(N,K,H,W) bool: M_k = the union of the boxes [cls, x0, y0, x1, y1) of class k in each image
    (`study.metrics.rasterise_boxes`)."""
    masks = torch.zeros((len(boxes), num_classes, height, width), dtype=torch.bool)
    for i, rows in enumerate(boxes):
        rows = np.asarray(rows, np.float64).reshape(-1, 5)
        for cls in np.unique(rows[:, 0]).astype(np.int64):
            if not 0 <= cls < num_classes:
                raise ValueError(f"box class {cls} of image {i} is outside [0, {num_classes})")
            masks[i, cls] = torch.from_numpy(rasterise_boxes(rows[rows[:, 0] == cls, 1:], height, width))
    return masks


def class_object_masks(object_masks: Sequence, boxes: Sequence, num_classes: int) -> torch.Tensor:
    """(N,K,H,W) bool: the union of the visible (segmentation) masks of the objects of class k."""
    if len(object_masks) != len(boxes):
        raise ValueError(f"object_masks ({len(object_masks)}) and boxes ({len(boxes)}) must have one entry per image")
    height, width = np.asarray(object_masks[0]).shape[-2:]
    masks = torch.zeros((len(boxes), num_classes, height, width), dtype=torch.bool)
    for i, (objects, rows) in enumerate(zip(object_masks, boxes)):
        classes = np.asarray(rows, np.int64).reshape(-1, 5)[:, 0]
        objects = torch.as_tensor(np.asarray(objects, bool))
        if len(objects) != len(classes):
            raise ValueError(f"image {i}: {len(objects)} object masks but {len(classes)} boxes")
        for cls, mask in zip(classes, objects):
            masks[i, cls] |= mask
    return masks


def dilate_boxes(boxes: np.ndarray, fraction: float, height: int, width: int) -> np.ndarray:
    """Grow boxes [cls, x0, y0, x1, y1) by `fraction` of their width/height on each side, clipped
    to the image. fraction 0 returns the boxes unchanged."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < np.inf:
        raise ValueError(f"fraction must be a finite number >= 0, got {fraction!r}")
    boxes = np.asarray(boxes, np.int64).reshape(-1, 5).copy()
    dx = np.rint(fraction * (boxes[:, 3] - boxes[:, 1])).astype(np.int64)
    dy = np.rint(fraction * (boxes[:, 4] - boxes[:, 2])).astype(np.int64)
    boxes[:, 1] = np.maximum(boxes[:, 1] - dx, 0)
    boxes[:, 2] = np.maximum(boxes[:, 2] - dy, 0)
    boxes[:, 3] = np.minimum(boxes[:, 3] + dx, width)
    boxes[:, 4] = np.minimum(boxes[:, 4] + dy, height)
    return boxes


def limited_annotation(n: int, fraction: float, seed: int) -> np.ndarray:
    """Bool (n,): exactly int(fraction·n) images keep their boxes, a seeded random choice (card Q12)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    keep = np.zeros(n, bool)
    keep[np.random.default_rng(seed).choice(n, int(fraction * n), replace=False)] = True
    return keep


def sample_loss_classes(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One class per image, uniform over its positive classes (card Q11)."""
    if not isinstance(labels, torch.Tensor) or labels.ndim != 2:
        raise ValueError(f"labels must be a multi-hot tensor (B,K), got {getattr(labels, 'shape', type(labels))}")
    positive = (labels > 0.5).float()
    if (positive.sum(1) == 0).any():
        raise ValueError("every image needs at least one positive class to draw a loss class from")
    return torch.multinomial(positive.cpu(), 1, generator=generator)[:, 0].to(labels.device)


# ----------------------------------------------------------------------------- metrics

def micro_f1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Micro F1 over all (image, class) decisions at logit ≥ 0: 2TP / (2TP + FP + FN) (0 if undefined;
    `sklearn.metrics.f1_score`)."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    if logits.shape != labels.shape or logits.ndim != 2:
        raise ValueError(f"logits and labels must both be (N,K), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if not torch.isfinite(logits.float()).all():
        raise ValueError("logits contain NaN or Inf")
    if not ((labels == 0) | (labels == 1)).all():
        raise ValueError("labels must be multi-hot 0/1")
    return float(f1_score((labels > 0.5).cpu().numpy(), (logits >= 0).cpu().numpy(), average="micro", zero_division=0))


def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """EPG per map (Eq. 2): Σ M·A⁺ / Σ A⁺; 0 when Σ A⁺ < 1e−7 (card Q5). Maps are upsampled to the
    mask size after the clamp."""
    maps = _check_maps(maps)
    masks = _check_masks(masks, maps)
    positive = upsample(maps.clamp(min=0), masks.shape[-2:])
    inside = (positive * masks).sum(dim=(1, 2, 3))
    total = positive.sum(dim=(1, 2, 3))
    return torch.where(total >= MIN_ENERGY, inside / total.clamp_min(MIN_ENERGY), torch.zeros_like(total))


def iou_curve(maps: torch.Tensor, masks: torch.Tensor, thresholds: Sequence[float] = IOU_THRESHOLDS) -> torch.Tensor:
    """(B,T) IoU of the binarised maps with the masks: clamp at 0, min–max normalise per map,
    keep pixels ≥ t; IoU = |pred ∧ M| / |pred ∨ M|, 0 when the union is empty. A map that is
    constant after the clamp keeps nothing."""
    maps = _check_maps(maps)
    masks = _check_masks(masks, maps).bool()
    thresholds = torch.as_tensor(list(thresholds), dtype=maps.dtype, device=maps.device)
    if thresholds.ndim != 1 or len(thresholds) == 0 or (thresholds < 0).any() or (thresholds > 1).any():
        raise ValueError(f"thresholds must be a non-empty list of numbers in [0, 1], got {thresholds.tolist()}")
    positive = upsample(maps.clamp(min=0), masks.shape[-2:]).flatten(1)
    low = positive.amin(1, keepdim=True)
    span = positive.amax(1, keepdim=True) - low
    normalised = torch.where(span > 0, (positive - low) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
    truth = masks.flatten(1)
    curve = []
    for threshold in thresholds:  # one threshold at a time keeps memory at O(B·H·W)
        kept = (normalised >= threshold) & (span > 0)
        intersection = (kept & truth).sum(-1).to(maps.dtype)
        union = (kept | truth).sum(-1).to(maps.dtype)
        curve.append(torch.where(union > 0, intersection / union.clamp_min(1), torch.zeros_like(union)))
    return torch.stack(curve, dim=1)


# ----------------------------------------------------------------------------- data for guidance

@dataclass
class GuidanceData:
    """One split: images (N,C,H,W) float, multi-hot labels (N,K), the per-class guidance masks
    (N,K,H,W) bool used by the loss and the metrics, which images carry annotations (N,) bool,
    optional per-class segmentation masks (N,K,H,W) and groups (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_masks: torch.Tensor
    annotated: torch.Tensor | None = None
    object_masks: torch.Tensor | None = None
    group: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.images)
        if self.images.ndim != 4 or not self.images.is_floating_point():
            raise ValueError(f"images must be float (N,C,H,W), got {tuple(self.images.shape)}")
        if self.labels.ndim != 2 or len(self.labels) != n:
            raise ValueError(f"labels must be multi-hot (N,K) with N = {n}, got {tuple(self.labels.shape)}")
        expected = (n, self.labels.shape[1], *self.images.shape[-2:])
        if tuple(self.class_masks.shape) != expected:
            raise ValueError(f"class_masks must have shape {expected}, got {tuple(self.class_masks.shape)}")
        if self.annotated is None:
            self.annotated = torch.ones(n, dtype=torch.bool)
        if self.annotated.shape != (n,):
            raise ValueError(f"annotated must be bool (N,) with N = {n}")
        if self.object_masks is not None and tuple(self.object_masks.shape) != expected:
            raise ValueError(f"object_masks must have shape {expected}, got {tuple(self.object_masks.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index) -> "GuidanceData":
        index = torch.as_tensor(index)
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return GuidanceData(self.images[index], self.labels[index], self.class_masks[index], self.annotated[index],
                            pick(self.object_masks), pick(self.group), dict(self.info))

    def replace(self, **changes) -> "GuidanceData":
        values = {name: getattr(self, name) for name in
                  ("images", "labels", "class_masks", "annotated", "object_masks", "group", "info")}
        values.update(changes)
        return GuidanceData(**values)


def uniform_map_epg(data: GuidanceData) -> float:
    """The EPG of a uniform map: the mean mask-area fraction over all (image, true class) pairs (card Q6)."""
    images, classes = torch.nonzero(data.labels > 0.5, as_tuple=True)
    return float(data.class_masks[images, classes].float().mean(dim=(1, 2)).mean())


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 256, device="cpu") -> torch.Tensor:
    """Logits (on the CPU) of `images`, computed in batches on `device`; the model is moved there
    first (a model loaded from the cache is on the CPU, issue 13)."""
    device = config.get_device(device)
    model.to(device)
    was_training = model.training
    model.eval()
    logits = torch.cat([model(images[i:i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return logits


def evaluate(model: ToyNet, data: GuidanceData, layer: str = "input", method: str | None = None,
             batch_size: int = 256, device="cpu", thresholds: Sequence[float] = IOU_THRESHOLDS,
             per_pair: bool = False) -> dict:
    """F1 (micro, logit ≥ 0), and over every (image, true class) pair the EPG, the IoU at every
    threshold, and (with segmentation masks) the share of the in-box positive energy that lies on
    the object. The model is evaluated in eval mode; maps are upsampled to the image size."""
    device = config.get_device(device)
    model.to(device)
    was_training = model.training
    model.eval()
    logits = predict_logits(model, data.images, batch_size, device)
    images_idx, classes = torch.nonzero(data.labels > 0.5, as_tuple=True)
    epg, ious, on_object = [], [], []
    for start in range(0, len(images_idx), batch_size):
        rows, cls = images_idx[start:start + batch_size], classes[start:start + batch_size]
        maps, _ = layer_attribution(model, data.images[rows].to(device), cls.to(device), layer, method)
        maps = upsample(maps.clamp(min=0), data.images.shape[-2:]).cpu()
        boxes = data.class_masks[rows, cls][:, None]
        epg.append(energy_pointing_game(maps, boxes))
        ious.append(iou_curve(maps, boxes, thresholds))
        if data.object_masks is not None:
            objects = data.object_masks[rows, cls][:, None].float()
            in_box = (maps * boxes).sum(dim=(1, 2, 3))
            on_object.append(torch.where(in_box > MIN_ENERGY, (maps * objects * boxes).sum(dim=(1, 2, 3))
                                         / in_box.clamp_min(MIN_ENERGY), torch.zeros_like(in_box)))
    model.train(was_training)
    epg, ious = torch.cat(epg), torch.cat(ious)
    curve = ious.mean(0)
    result = {"f1": micro_f1(logits, data.labels), "epg": float(epg.mean()), "iou_curve": curve.tolist(),
              "iou05": float(curve[list(thresholds).index(0.5)]) if 0.5 in thresholds else float("nan"),
              "pairs": len(epg)}
    if on_object:
        result["on_object"] = float(torch.cat(on_object).mean())
    if per_pair:
        result["pair_epg"] = epg
        result["pair_image"] = images_idx
        result["pair_iou"] = ious
        result["logits"] = logits
    return result


def tuned_iou(curve: Sequence[float], thresholds: Sequence[float] = IOU_THRESHOLDS) -> tuple[float, float]:
    """(best threshold, IoU there) of an IoU-vs-threshold curve (the validation-tuning rule, card Q1)."""
    index = int(np.argmax(curve))
    return float(thresholds[index]), float(curve[index])


# ----------------------------------------------------------------------------- Pareto fronts

def pareto_mask(points, bin_width: float = BIN_WIDTH) -> np.ndarray:
    """Bool (n,): True for points not dominated by another point, after rounding every value to
    bins of `bin_width` (higher is better in every column). Equal binned points do not dominate
    each other, so both are kept."""
    points = np.asarray(points, dtype=float)
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(f"points must be a non-empty (n, d) array, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("points contain NaN or Inf")
    if not bin_width > 0:
        raise ValueError(f"bin_width must be positive, got {bin_width}")
    binned = np.round(points / bin_width).astype(np.int64)
    at_least = (binned[:, None, :] >= binned[None, :, :]).all(-1)   # [j, i]: j ≥ i everywhere
    better = (binned[:, None, :] > binned[None, :, :]).any(-1)      # [j, i]: j > i somewhere
    return ~(at_least & better).any(0)


def hypervolume_2d(points, reference) -> float:
    """Area dominated by `points` (n,2) (higher is better) above the `reference` point."""
    points = np.asarray(points, dtype=float).reshape(-1, 2)
    ref = np.asarray(reference, dtype=float)
    points = points[(points > ref).all(1)]
    if len(points) == 0:
        return 0.0
    points = points[np.argsort(-points[:, 0])]
    area, best_y = 0.0, ref[1]
    for x, y in points:
        if y > best_y:
            area += (x - ref[0]) * (y - best_y)
            best_y = y
    return float(area)


# ----------------------------------------------------------------------------- training

def _batches(n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True):
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _loader(data: GuidanceData, batch_size: int, generator: torch.Generator, device) -> engine.TensorLoader:
    """The training batches of `data` on `device`, an epoch's order `randperm(n, generator)`."""
    tensors = {"image": data.images, "label": data.labels, "class_masks": data.class_masks, "annotated": data.annotated}
    return engine.TensorLoader({k: v.to(device) for k, v in tensors.items()}, batch_size, generator=generator)


class _EpochTimer:
    """`train.fit` hooks that time an epoch's training (evaluation excluded): `before` is the
    `before_epoch` hook; `lap()`, called first by whichever hook runs after the training batches,
    returns the epoch's {"seconds", "cpu_seconds"} (the same dict on later calls)."""

    def before(self, model: nn.Module, epoch: int) -> None:
        self.start, self.cpu, self.split = time.perf_counter(), time.process_time(), None

    def lap(self) -> dict:
        if self.split is None:
            self.split = {"seconds": time.perf_counter() - self.start, "cpu_seconds": time.process_time() - self.cpu}
        return self.split


def train_baseline(model: ToyNet, train: GuidanceData, valid: GuidanceData, *, epochs: int, lr: float = 1e-3,
                   batch_size: int = 64, seed: int = 0, device="cpu") -> tuple[ToyNet, list[dict]]:
    """Stage 1: BCE only, Adam; keeps the validation-F1-best epoch (`train.fit`). Returns (model, history)."""
    if epochs < 1:
        raise ValueError(f"epochs must be positive, got {epochs}")
    device = config.get_device(device)
    timer = _EpochTimer()

    def validate(m: nn.Module) -> dict:
        timer.lap()
        return {"f1": micro_f1(predict_logits(m, valid.images, device=device), valid.labels)}

    result = engine.fit(model, _loader(train, batch_size, torch.Generator().manual_seed(seed), device), epochs=epochs,
                        lr=lr, validate=validate, select="valid_f1", before_epoch=timer.before,
                        after_epoch=lambda m, record: record.update(timer.lap()), device=device, progress=False)
    return result.model, result.history


def guidance_step_loss(model: ToyNet, images: torch.Tensor, labels: torch.Tensor, class_masks: torch.Tensor,
                       annotated: torch.Tensor, *, loss: str, layer: str, method: str | None, lam: float,
                       generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """L = BCE + λ · Σ_annotated-images L_loc(one random true class per image) (card Eq. 1, Q2, Q11).

    Attributions are computed only for annotated images, with double backprop. Vanilla and X-DNN
    reuse the classification forward pass when most of the batch is annotated (BatchNorm must be
    frozen, see `freeze_batchnorm`); B-cos runs a second forward pass in explanation mode."""
    _check_choice("loss", loss, LOSSES)
    method = DEFAULT_METHOD[model.family] if method is None else method
    act, logits = model.stages(images, layer)
    classification = F.binary_cross_entropy_with_logits(logits, labels)
    rows = torch.nonzero(annotated, as_tuple=True)[0]
    localisation = torch.zeros((), device=images.device)
    if len(rows):
        targets = sample_loss_classes(labels[rows], generator)
        masks = class_masks[rows, targets][:, None]
        if method != "bcos" and 2 * len(rows) >= len(images):
            score = logits[rows].gather(1, targets[:, None]).sum()
            (gradient,) = torch.autograd.grad(score, act, create_graph=True)
            gradient, activation = gradient[rows], act[rows]
            if method == "gradcam":
                maps = F.relu((gradient.mean((2, 3), keepdim=True) * activation).sum(1, keepdim=True))
            else:
                maps = (gradient * activation).sum(1, keepdim=True)
        else:
            maps, _ = layer_attribution(model, images[rows], targets, layer, method, create_graph=True)
        localisation = guidance_loss(loss, maps, masks, reduction="sum")
    total = classification + lam * localisation
    return total, {"class": classification.detach(), "loc": localisation.detach(), "annotated": len(rows)}


def calibrate_lambda(model: ToyNet, data: GuidanceData, *, loss: str, layer: str, method: str | None = None,
                     batch_size: int = 64, seed: int = 0, device="cpu", factor: float = 0.3) -> dict:
    """Card §5.4: on one training batch at the stage-1 checkpoint (all its images annotated),
    λ_mid = factor · L_class / Σ L_loc; the grid is λ_mid × {1/3, 1, 3}."""
    device = config.get_device(device)
    model.to(device)
    freeze_batchnorm(model)
    generator = torch.Generator().manual_seed(seed)
    rows = _batches(len(data), batch_size, generator)[0]
    _, parts = guidance_step_loss(model, data.images[rows].to(device), data.labels[rows].to(device),
                                  data.class_masks[rows].to(device), torch.ones(len(rows), dtype=torch.bool, device=device),
                                  loss=loss, layer=layer, method=method, lam=0.0, generator=generator)
    model.eval()
    class_loss, loc_sum = float(parts["class"]), float(parts["loc"])
    middle = factor * class_loss / max(loc_sum, 1e-12)
    return {"class": class_loss, "loc_sum": loc_sum, "batch": len(rows), "lambda_mid": middle,
            "grid": [middle / 3, middle, middle * 3]}


def gradient_ratio(model: ToyNet, data: GuidanceData, *, loss: str, layer: str, method: str | None = None,
                   batch_size: int = 64, seed: int = 0, device="cpu") -> dict:
    """‖∇θ L_class‖ / ‖∇θ Σ L_loc‖ on one fully annotated training batch: the λ at which both
    terms pull the parameters equally hard."""
    device = config.get_device(device)
    model.to(device)
    freeze_batchnorm(model)
    generator = torch.Generator().manual_seed(seed)
    rows = _batches(len(data), batch_size, generator)[0]
    images, labels = data.images[rows].to(device), data.labels[rows].to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    classification = F.binary_cross_entropy_with_logits(model(images), labels)
    class_grad = torch.autograd.grad(classification, params, allow_unused=True)
    targets = sample_loss_classes(labels, generator)
    maps, _ = layer_attribution(model, images, targets, layer, method, create_graph=True)
    localisation = guidance_loss(loss, maps, data.class_masks[rows].to(device)[torch.arange(len(rows)), targets][:, None])
    loc_grad = torch.autograd.grad(localisation, params, allow_unused=True)
    norm = lambda grads: float(torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None)))  # noqa: E731
    model.eval()
    return {"class_grad": norm(class_grad), "loc_grad": norm(loc_grad), "ratio": norm(class_grad) / max(norm(loc_grad), 1e-12)}


def _test_row(scores: dict, threshold: float) -> dict:
    """Scalar test metrics of a checkpoint; the tuned IoU uses the validation threshold."""
    row = {f"test_{k}": v for k, v in scores.items() if isinstance(v, (int, float))}
    if "iou_curve" in scores:
        row["test_iou"] = float(scores["iou_curve"][IOU_THRESHOLDS.index(threshold)])
    return row


def guided_finetune(model: ToyNet, train: GuidanceData, valid: GuidanceData | None, *, loss: str, layer: str,
                    lam: float, epochs: int, method: str | None = None, lr: float = 1e-4, batch_size: int = 64,
                    seed: int = 0, device="cpu", eval_batch_size: int = 256,
                    on_front: Callable[[ToyNet], dict] | None = None) -> dict:
    """Stage 2 (`train.fit` with the guidance step): fine-tune with BCE + λ·L_loc (BatchNorm
    frozen), evaluate validation after every epoch (unless `valid` is None), and, after training,
    call `on_front(model)` (e.g. test metrics) with the weights of every epoch on the run's
    validation Pareto front on (F1, EPG, tuned IoU). (A checkpoint on the front over several runs
    is on its own run's front, so this suffices.) History rows count epochs from 1.
    Returns {"history": rows, "state": final weights}."""
    if epochs < 1:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    device = config.get_device(device)
    generator = torch.Generator().manual_seed(seed)
    timer, front_points, candidates, sums = _EpochTimer(), [], {}, {}

    def before_epoch(m: nn.Module, epoch: int) -> None:
        freeze_batchnorm(m)
        timer.before(m, epoch)
        sums.update({part: torch.zeros((), dtype=torch.float64, device=device) for part in ("class", "loc")})

    def step(m: nn.Module, batch: dict, opt: torch.optim.Optimizer) -> torch.Tensor:
        total, parts = guidance_step_loss(m, batch["image"], batch["label"], batch["class_masks"], batch["annotated"],
                                          loss=loss, layer=layer, method=method, lam=lam, generator=generator)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sums["class"] += parts["class"].to(torch.float64) * len(batch["label"])
        sums["loc"] += parts["loc"].to(torch.float64)
        return total

    def validate(m: nn.Module) -> dict:
        timer.lap()
        scores = evaluate(m, valid, layer, method, eval_batch_size, device)
        threshold, iou_tuned = tuned_iou(scores["iou_curve"])
        return {"f1": scores["f1"], "epg": scores["epg"], "iou05": scores["iou05"], "iou": iou_tuned, "threshold": threshold}

    def after_epoch(m: nn.Module, record: dict) -> None:
        epoch, scores = record["epoch"], {k: v for k, v in record.items() if k.startswith("valid_")}
        record.clear()
        record.update({"epoch": epoch + 1, "train_class": sums["class"].item() / len(train),
                       "train_loc": sums["loc"].item(), **timer.lap(), **scores})
        if valid is not None:
            record["threshold"] = record.pop("valid_threshold")
            point = [record["valid_f1"], record["valid_epg"], record["valid_iou"]]
            if on_front is not None and pareto_mask(front_points + [point])[-1]:
                candidates[epoch] = copy.deepcopy(m.state_dict())
            front_points.append(point)

    result = engine.fit(model, _loader(train, batch_size, generator, device), epochs=epochs, lr=lr, step=step,
                        validate=validate if valid is not None else None, before_epoch=before_epoch,
                        after_epoch=after_epoch, device=device, progress=False)
    history = result.history
    final_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if candidates:
        on_final_front = pareto_mask(front_points)
        for epoch, state in candidates.items():
            if on_final_front[epoch]:
                model.load_state_dict(state)
                history[epoch].update(_test_row(on_front(model), history[epoch]["threshold"]))
        model.load_state_dict(final_state)
    model.eval()
    return {"history": history, "state": final_state}
