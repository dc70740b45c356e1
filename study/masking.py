"""Masking-based saliency (Phang, Park & Geras 2020): classifier, masker, objectives and training.

Everything follows the protocol card `../shared/papers/phang2020.md` (§2 E1–E6, §4, §5.2–5.3);
the formulas are the card's, re-implemented here (the authors' code has no licence).

* `PartsClassifier` — the card's §5.2 stand-in for the pretrained ResNet-50: a stem ("l0") and
  four one-block residual stages ("l1" … "l4"), GAP → Linear ("fc"). `forward_features` returns
  the logits and the five hidden layers.
* `Masker` — the §5.3 decoder on the classifier's (detached) hidden layers: per layer Conv1×1 →
  BN → ReLU → bilinear resize to a `grid`×`grid` map (l0 concatenated raw when used with others),
  concatenation → Conv3×3 → 1 channel → sigmoid → nearest upsampling to the image size.
* The objective (E2), as plain functions: `masked_in_loss` (cross-entropy, or minimum entropy),
  `masked_out_loss` (maximum entropy, or the adversarial "maximise the cross-entropy" variant),
  `gated_area_penalty`, `total_variation` with its border term, combined by `masker_objective`.
* Mask variants (E5): `gumbel_sigmoid` (hard straight-through, τ = 0.1) and infilling by a
  Gaussian blur (`blur_images`, `infill_in`, `infill_out`); zeros are the default infiller.
* `MaskerSpec` + `train_masker` — the E4 training order for a fixed (FIX) or co-trained (CA)
  classifier with `prob_historic` and the Q1 choice (`historic_mode`), and `cached_train_masker`
  (atomic, hashed disk cache of the masker and the co-trained classifier).
* `optimise_masks` — per-image mask optimisation (Fong & Vedaldi 2017, deletion game), a baseline.
* Few-shot samplers `sample_per_class` and `sample_classes` (E6).

Images given to the classifier and the masks are `(B, C, H, W)` float32; masks are `(B, 1, H, W)`
in [0, 1]. Images are standardised (channel mean/std), so a masked-out pixel (0) is the dataset mean.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from study import cache, config, train as engine
from study.attribution import gaussian_blur
from study.models import init_conv_bn

LAYER_NAMES = ("l0", "l1", "l2", "l3", "l4")
BORDER_WEIGHT = 0.3  # E2: the TV border penalty
GUMBEL_MODES = ("hard", "soft")
IN_OBJECTIVES = ("ce", "entropy", None)
OUT_OBJECTIVES = ("entropy", "ce", None)
CLASSIFIER_MODES = ("fix", "ca")
INFILLERS = ("zero", "blur")
HISTORIC_MODES = ("gate_only", "casme_confuser")
ZOO_SIZE = 30  # E4: at most 30 historic copies


# ============================================================================ input checks


def _check_tensor(x, name: str, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def _check_masks(masks, name: str = "masks") -> torch.Tensor:
    masks = _check_tensor(masks, name, 4)
    if masks.shape[1] != 1 or not masks.is_floating_point():
        raise ValueError(f"{name} must be float (B, 1, H, W), got {masks.dtype} {tuple(masks.shape)}")
    if masks.numel() == 0:
        raise ValueError(f"{name} is empty")
    if masks.min() < 0 or masks.max() > 1:
        raise ValueError(f"{name} must lie in [0, 1]")
    return masks


def _check_images_masks(images, masks) -> tuple[torch.Tensor, torch.Tensor]:
    images = _check_tensor(images, "images", 4)
    masks = _check_masks(masks)
    if masks.shape[0] != images.shape[0] or masks.shape[2:] != images.shape[2:]:
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)} (B, ·, H, W)")
    return images, masks


def _check_logits_labels(logits, labels, name: str = "logits") -> tuple[torch.Tensor, torch.Tensor]:
    logits = _check_tensor(logits, name, 2)
    labels = _check_tensor(labels, "labels", 1)
    if labels.dtype not in (torch.int64, torch.int32) or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be integer (B,) matching {name} (B, K); got {labels.dtype} "
                         f"{tuple(labels.shape)} for {name} {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("empty batch")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]})")
    return logits, labels


def _check_gate(gate, batch: int, name: str = "gate") -> torch.Tensor:
    gate = _check_tensor(gate, name, 1)
    if gate.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(gate.shape)}")
    gate = gate.float()
    if not torch.all((gate == 0) | (gate == 1)):
        raise ValueError(f"{name} must hold 0/1 (or bool) values")
    return gate


def _check_nonnegative(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


# ============================================================================ classifier (§5.2)


class PartsClassifier(nn.Module):
    """The card's §5.2 classifier, standing in for the ImageNet ResNet-50 (E1).

    l0: Conv3×3(w0, stride `stem_stride`) → BN → ReLU; l1 … l4: one torchvision BasicBlock each
    with widths `widths` (the card: 16/32/64/128); every stage halves the resolution except l1 when
    `stem_stride` = 2 (then the stem halves it), so l1 … l4 are at image/2 … image/16 either way
    (32, 16, 8, 4 px at 64 px). Head: global average pooling → Linear ("fc"); CAM and Grad-CAM
    come from l4. He-normal convolutions, BN weight 1 and bias 0.
    """

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64, 128), stem_stride: int = 1,
                 in_channels: int = 3):
        super().__init__()
        widths = tuple(widths)
        if len(widths) != 4 or not all(isinstance(w, int) and w > 0 for w in widths):
            raise ValueError(f"widths must be four positive ints (l1..l4), got {widths!r}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 (the card) or 2 (a cheaper stem), got {stem_stride!r}")
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.l0 = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, stride=stem_stride, padding=1, bias=False),
                                nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        previous = widths[0]
        for index, width in enumerate(widths, start=1):
            stride = 1 if index == 1 and stem_stride == 2 else 2
            downsample = None
            if stride != 1 or previous != width:
                downsample = nn.Sequential(nn.Conv2d(previous, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))
            self.add_module(f"l{index}", BasicBlock(previous, width, stride, downsample))
            previous = width
        self.fc = nn.Linear(previous, num_classes)
        self.channels = {"l0": widths[0], **{f"l{i}": w for i, w in enumerate(widths, start=1)}}
        self.gradcam_layer = "l4"
        init_conv_bn(self)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        features = {}
        for name in LAYER_NAMES:
            x = getattr(self, name)(x)
            features[name] = x
        return self.fc(x.mean(dim=(2, 3))), features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


# ============================================================================ masker (E1, §5.3)


class Masker(nn.Module):
    """The masking model M: a light decoder on the classifier's hidden layers (card E1, §5.3).

    `channels` maps layer names to their channel counts (e.g. `PartsClassifier.channels`);
    `layers` picks the inputs (the card's final models: l3, l4). Per layer: Conv1×1 (→ `hidden`,
    no bias) → BN → ReLU → bilinear resize to `grid`×`grid` (antialiased when shrinking); layer
    l0 is concatenated raw when used together with others. Head: Conv3×3 → 1 channel (bias) →
    sigmoid → nearest upsampling ×(image_size / grid). Call it on a dict of features; the
    features are detached here, so no gradient reaches the classifier through the masker's input.
    """

    def __init__(self, channels: dict[str, int], layers: Sequence[str] = ("l3", "l4"), hidden: int = 32,
                 grid: int = 16, image_size: int = 64):
        super().__init__()
        layers = tuple(layers)
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be a non-empty sequence of distinct names, got {layers!r}")
        missing = [name for name in layers if name not in channels]
        if missing:
            raise ValueError(f"layers {missing} are not among the classifier's layers {sorted(channels)}")
        for name, value in (("hidden", hidden), ("grid", grid), ("image_size", image_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if image_size % grid:
            raise ValueError(f"image_size {image_size} must be a multiple of grid {grid} (nearest ×{image_size / grid})")
        self.layers, self.grid, self.image_size = layers, grid, image_size
        self.branches = nn.ModuleDict()
        concatenated = 0
        for name in layers:
            if name == "l0" and len(layers) > 1:
                self.branches[name] = nn.Identity()
                concatenated += channels[name]
            else:
                self.branches[name] = nn.Sequential(nn.Conv2d(channels[name], hidden, 1, bias=False),
                                                    nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
                concatenated += hidden
        self.head = nn.Conv2d(concatenated, 1, 3, padding=1)
        init_conv_bn(self, mode="fan_in")
        nn.init.zeros_(self.head.bias)

    def logits(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pre-sigmoid mask at grid resolution, (B, 1, grid, grid)."""
        maps = []
        for name in self.layers:
            if name not in features:
                raise ValueError(f"features lack layer {name!r}; got {sorted(features)}")
            x = self.branches[name](features[name].detach())
            if x.shape[-1] != self.grid or x.shape[-2] != self.grid:
                shrink = x.shape[-1] > self.grid
                x = F.interpolate(x, size=(self.grid, self.grid), mode="bilinear", align_corners=False, antialias=shrink)
            maps.append(x)
        return self.head(torch.cat(maps, dim=1))

    def upsample(self, grid_mask: torch.Tensor) -> torch.Tensor:
        return F.interpolate(grid_mask, scale_factor=self.image_size // self.grid, mode="nearest")

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.upsample(torch.sigmoid(self.logits(features)))


# ============================================================================ masking and infilling


def mask_in(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """x ⊙ m: keep the salient region (a masked pixel becomes 0, the dataset mean)."""
    images, masks = _check_images_masks(images, masks)
    return images * masks


def mask_out(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """x ⊙ (1 − m): remove the salient region. mask_in + mask_out = x (card §7.1)."""
    images, masks = _check_images_masks(images, masks)
    return images * (1 - masks)


def blur_images(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur per channel (`attribution.gaussian_blur`: reflect padding, the kernel clamped to
    the image size): the blur infiller.

    The card's σ = 20 px at 224 px becomes 20·64/224 ≈ 5.7 px at 64 px (§5.4 S9).
    """
    images = _check_tensor(images, "images", 4)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf:
        raise ValueError(f"sigma must be a positive number of pixels, got {sigma!r}")
    return gaussian_blur(images, float(sigma))


def infill_in(images: torch.Tensor, masks: torch.Tensor, filler: torch.Tensor | None = None) -> torch.Tensor:
    """Infilled masked-in image x ⊙ m + G ⊙ (1 − m) (E5.6); G = None is the zero infiller (= mask_in).

    Where m = 1 the pixel is x unchanged, whatever the infiller.
    """
    images, masks = _check_images_masks(images, masks)
    if filler is None:
        return images * masks
    if filler.shape != images.shape:
        raise ValueError(f"filler {tuple(filler.shape)} must match images {tuple(images.shape)}")
    return images * masks + filler * (1 - masks)


def infill_out(images: torch.Tensor, masks: torch.Tensor, filler: torch.Tensor | None = None) -> torch.Tensor:
    """Infilled masked-out image x ⊙ (1 − m) + G ⊙ m (E5.6); G = None is the zero infiller (= mask_out)."""
    images, masks = _check_images_masks(images, masks)
    if filler is None:
        return images * (1 - masks)
    if filler.shape != images.shape:
        raise ValueError(f"filler {tuple(filler.shape)} must match images {tuple(images.shape)}")
    return images * (1 - masks) + filler * masks


# ============================================================================ Gumbel masks (E5.5)


def gumbel_sigmoid(logits: torch.Tensor, tau: float = 0.1, generator: torch.Generator | None = None,
                   mode: str = "hard") -> torch.Tensor:
    """Binary-concrete mask: sigmoid((logits + log U − log(1 − U)) / τ), U ~ U(0, 1) from `generator`.

    mode "hard" (the code default): the forward value is 1[soft > 0.5] ∈ {0, 1} and the backward
    gradient is the soft sigmoid's (straight-through). mode "soft": the soft value. As τ → 0 the
    soft value approaches the hard one; as τ grows it approaches 0.5. At evaluation use
    `gumbel_eval_mask` (1[logit > 0]). The noise is drawn on the CPU so results do not depend on
    the device.
    """
    logits = _check_tensor(logits, "logits")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < math.inf:
        raise ValueError(f"tau must be a positive number, got {tau!r}")
    if mode not in GUMBEL_MODES:
        raise ValueError(f"unknown Gumbel mode {mode!r}; choose one of {list(GUMBEL_MODES)}")
    eps = torch.finfo(torch.float32).tiny
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float32).clamp(eps, 1 - 1e-7)
    noise = (torch.log(uniform) - torch.log1p(-uniform)).to(device=logits.device, dtype=logits.dtype)
    soft = torch.sigmoid((logits + noise) / tau)
    if mode == "soft":
        return soft
    return _StraightThrough.apply(soft)


class _StraightThrough(torch.autograd.Function):
    """Forward 1[x > 0.5] exactly (values in {0, 1}); backward passes the gradient unchanged."""

    @staticmethod
    def forward(ctx, soft):
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def gumbel_eval_mask(logits: torch.Tensor) -> torch.Tensor:
    """The evaluation mask of a Gumbel masker: 1[logit > 0] (E5.5)."""
    return (_check_tensor(logits, "logits") > 0).to(torch.float32)


# ============================================================================ objective (E2)


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax z) per row, in nats, (B,); at most log K, with equality for equal logits."""
    logits = _check_tensor(logits, "logits", 2)
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def masked_in_loss(logits_in: torch.Tensor, labels: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """Masked-in classification term: mean CE(F(x ⊙ m), y) ("ce", the default) or mean entropy ("entropy")."""
    logits_in, labels = _check_logits_labels(logits_in, labels, "logits_in")
    if kind == "ce":
        return F.cross_entropy(logits_in, labels)
    if kind == "entropy":
        return prediction_entropy(logits_in).mean()
    raise ValueError(f"unknown masked-in objective {kind!r}; choose 'ce' or 'entropy'")


def masked_out_loss(logits_out: torch.Tensor, labels: torch.Tensor, clean_correct: torch.Tensor,
                    kind: str = "entropy") -> torch.Tensor:
    """Masked-out term, −mean_i c_i · H(softmax F(x ⊙ (1 − m))) ("entropy", the default: maximise
    the entropy on images the classifier gets right when clean), or −mean_i c_i · CE(F(x ⊙ (1 − m)), y)
    ("ce": the adversarial "classification, minimise" variant; gated by c_i like the entropy, a
    project choice). Images with c_i = 0 contribute nothing (card §7.4)."""
    logits_out, labels = _check_logits_labels(logits_out, labels, "logits_out")
    gate = _check_gate(clean_correct, logits_out.shape[0], "clean_correct")
    if kind == "entropy":
        per_image = prediction_entropy(logits_out)
    elif kind == "ce":
        per_image = F.cross_entropy(logits_out, labels, reduction="none")
    else:
        raise ValueError(f"unknown masked-out objective {kind!r}; choose 'entropy' or 'ce'")
    return -(gate * per_image).mean()


def mask_area(masks: torch.Tensor) -> torch.Tensor:
    """m̄_i: the mean of each mask over its actual pixels, (B,) (Q3: not a hard-coded 224²)."""
    return _check_masks(masks).mean(dim=(1, 2, 3))


def gated_area_penalty(masks: torch.Tensor, gate: torch.Tensor, lam: float) -> torch.Tensor:
    """−λ · mean_i ReLU(g_i − m̄_i): λ·(m̄_i − 1) where g_i = 1, 0 where g_i = 0 (card E2, §7.3)."""
    lam = _check_nonnegative(lam, "lam")
    area = mask_area(masks)
    gate = _check_gate(gate, area.shape[0])
    return -lam * F.relu(gate - area).mean()


def total_variation(masks: torch.Tensor, lam: float, border: float = BORDER_WEIGHT) -> torch.Tensor:
    """λ_tv · [Σ (m_{h,w+1} − m_{h,w})² + Σ (m_{h+1,w} − m_{h,w})² + border · Σ_border m²] / (2B) (E2).

    A pixel sum (it scales with resolution). The border is the outermost rows and columns, each
    pixel counted once (2·H + 2·W − 4 pixels, `border_pixels`; the card leaves the definition
    open). TV(0) = 0; without the border term TV ignores a constant shift; TV(2m) = 4·TV(m); for
    all-ones masks TV = λ · border · n_border / 2 whatever B.
    """
    masks = _check_masks(masks)
    lam = _check_nonnegative(lam, "lam")
    border = _check_nonnegative(border, "border")
    dx = (masks[..., :, 1:] - masks[..., :, :-1]).pow(2).sum()
    dy = (masks[..., 1:, :] - masks[..., :-1, :]).pow(2).sum()
    return lam * (dx + dy + border * (masks.pow(2) * border_pixels(*masks.shape[-2:], masks.device)).sum()) / (
        2 * masks.shape[0])


def border_pixels(height: int, width: int, device=None) -> torch.Tensor:
    """A (H, W) float map that is 1 on the outermost rows and columns (2·H + 2·W − 4 pixels)."""
    ring = torch.zeros(height, width, device=device)
    ring[0, :] = ring[-1, :] = 1
    ring[:, 0] = ring[:, -1] = 1
    return ring


@dataclass
class ObjectiveTerms:
    total: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


def masker_objective(masks: torch.Tensor, labels: torch.Tensor, clean_logits: torch.Tensor,
                     logits_in: torch.Tensor | None, logits_out: torch.Tensor | None, *,
                     in_kind: str | None = "ce", out_kind: str | None = "entropy", lambda_in: float = 1.0,
                     lambda_out: float = 10.0, lambda_tv: float = 3.5e-3, w_in: float = 1.0,
                     w_out: float = 1.0) -> ObjectiveTerms:
    """L_M = w_in · L_in + w_out · L_out (card E2), with the gates computed from the predictions:

    L_in  = masked_in_loss − λ_in · mean ReLU(a_i − m̄_i) + TV(m),  a_i = 1[argmax F(x ⊙ m) = y];
    L_out = masked_out_loss − λ_out · mean ReLU(n_i − m̄_i) + TV(m),
            n_i = c_i · 1[argmax F(x ⊙ (1 − m)) ≠ y], c_i = 1[argmax F(x) = y].
    TV appears in both (Q2: effective weight 2·λ_tv). A side whose kind is None is switched off
    (its logits may then be None). The weights and λs must be finite numbers >= 0 (else ValueError).
    Returns the total and the detached parts for logging (device scalars: read them when needed).
    """
    if in_kind not in IN_OBJECTIVES or out_kind not in OUT_OBJECTIVES:
        raise ValueError(f"in_kind must be one of {IN_OBJECTIVES} and out_kind one of {OUT_OBJECTIVES}; "
                         f"got {in_kind!r}, {out_kind!r}")
    if in_kind is None and out_kind is None:
        raise ValueError("at least one of the masked-in and masked-out objectives must be on")
    _check_nonnegative(w_in, "w_in")
    _check_nonnegative(w_out, "w_out")
    clean_logits, labels = _check_logits_labels(clean_logits, labels, "clean_logits")
    correct = (clean_logits.argmax(1) == labels).float()
    tv = total_variation(masks, lambda_tv)
    total = masks.new_zeros(())
    parts = {"tv": tv.detach()}
    if in_kind is not None:
        if logits_in is None:
            raise ValueError("logits_in is needed when the masked-in objective is on")
        classify = masked_in_loss(logits_in, labels, in_kind)
        gate_in = (logits_in.argmax(1) == labels).float()
        area_in = gated_area_penalty(masks, gate_in, lambda_in)
        total = total + w_in * (classify + area_in + tv)
        parts.update(masked_in=classify.detach(), area_in=area_in.detach())
    if out_kind is not None:
        if logits_out is None:
            raise ValueError("logits_out is needed when the masked-out objective is on")
        confuse = masked_out_loss(logits_out, labels, correct, out_kind)
        gate_out = correct * (logits_out.argmax(1) != labels).float()
        area_out = gated_area_penalty(masks, gate_out, lambda_out)
        total = total + w_out * (confuse + area_out + tv)
        parts.update(masked_out=confuse.detach(), area_out=area_out.detach())
    parts["total"] = total.detach()
    parts["mask_mean"] = masks.detach().mean()
    return ObjectiveTerms(total, parts)


# ============================================================================ training (E3, E4, §5.3)


@dataclass(frozen=True)
class MaskerSpec:
    """One masker configuration: a row of the card's §5.4 grid plus the schedule.

    Defaults are the card's §5.3 (λ_out 10 is FIX's; CA uses 15). `steps` Adam steps of batch
    `batch_size`, both learning rates × 0.1 at 1/3 and 2/3 of the steps (`lr_decay`).
    """

    in_kind: str | None = "ce"
    out_kind: str | None = "entropy"
    classifier_mode: str = "fix"
    lambda_in: float = 1.0
    lambda_out: float = 10.0
    lambda_tv: float = 3.5e-3
    layers: tuple[str, ...] = ("l3", "l4")
    hidden: int = 32
    grid: int = 16
    gumbel_tau: float | None = None  # None: sigmoid masks; a number: hard Gumbel masks with that τ
    infiller: str = "zero"
    blur_sigma: float = 20 * 64 / 224
    steps: int = 3000
    batch_size: int = 72
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 10.0
    classifier_lr: float = 1e-3
    lr_decay: bool = True
    prob_historic: float | None = None  # None: the card's 0.5 for CA, 0.0 for FIX
    historic_mode: str = "gate_only"
    save_freq: int = 100

    def __post_init__(self):
        if self.in_kind not in IN_OBJECTIVES or self.out_kind not in OUT_OBJECTIVES:
            raise ValueError(f"in_kind ∈ {IN_OBJECTIVES}, out_kind ∈ {OUT_OBJECTIVES}; got {self.in_kind!r}, {self.out_kind!r}")
        if self.in_kind is None and self.out_kind is None:
            raise ValueError("a masker needs the masked-in or the masked-out objective (or both)")
        for name, value, allowed in (("classifier_mode", self.classifier_mode, CLASSIFIER_MODES),
                                     ("infiller", self.infiller, INFILLERS),
                                     ("historic_mode", self.historic_mode, HISTORIC_MODES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {list(allowed)}")
        object.__setattr__(self, "layers", tuple(self.layers))
        unknown = [name for name in self.layers if name not in LAYER_NAMES]
        if unknown or not self.layers:
            raise ValueError(f"layers must be a non-empty subset of {LAYER_NAMES}, got {self.layers!r}")
        for name in ("steps", "batch_size", "hidden", "grid", "save_freq"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("lambda_in", "lambda_out", "lambda_tv", "weight_decay", "grad_clip"):
            _check_nonnegative(getattr(self, name), name)
        for name in ("lr", "classifier_lr", "blur_sigma"):
            if not _check_nonnegative(getattr(self, name), name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.gumbel_tau is not None and not _check_nonnegative(self.gumbel_tau, "gumbel_tau") > 0:
            raise ValueError("gumbel_tau must be positive or None")
        if self.prob_historic is not None and not 0 <= _check_nonnegative(self.prob_historic, "prob_historic") <= 1:
            raise ValueError(f"prob_historic must lie in [0, 1] or be None, got {self.prob_historic!r}")

    @property
    def fixed(self) -> bool:
        return self.classifier_mode == "fix"

    @property
    def historic_probability(self) -> float:
        if self.prob_historic is not None:
            return float(self.prob_historic)
        return 0.0 if self.fixed else 0.5

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class MaskerRun:
    """A trained masker, the classifier that goes with it (the co-trained one for CA; the frozen
    pretrained one for FIX), the spec and the per-step history."""

    masker: Masker
    classifier: nn.Module
    spec: MaskerSpec
    history: list[dict]
    from_cache: bool = False


class HistoricZoo:
    """Historic copies of the classifier (E4): one every `save_freq` steps, at most `size`, oldest dropped."""

    def __init__(self, size: int = ZOO_SIZE, save_freq: int = 100):
        if not isinstance(size, int) or size <= 0 or not isinstance(save_freq, int) or save_freq <= 0:
            raise ValueError(f"size and save_freq must be positive ints, got {size!r}, {save_freq!r}")
        self.size, self.save_freq, self.copies = size, save_freq, []

    def maybe_add(self, step: int, classifier: nn.Module) -> None:
        if step % self.save_freq == 0:
            self.copies.append(copy.deepcopy(classifier).eval())
            del self.copies[:-self.size]

    def pick(self, rng: np.random.Generator) -> nn.Module | None:
        return self.copies[int(rng.integers(len(self.copies)))] if self.copies else None


def _masks_from_logits(masker: Masker, grid_logits: torch.Tensor, spec: MaskerSpec, generator: torch.Generator,
                       training: bool) -> torch.Tensor:
    if spec.gumbel_tau is None:
        grid_mask = torch.sigmoid(grid_logits)
    elif training:
        grid_mask = gumbel_sigmoid(grid_logits, spec.gumbel_tau, generator, mode="hard")
    else:
        grid_mask = gumbel_eval_mask(grid_logits)
    return masker.upsample(grid_mask)


def _lr_steps(optimizer: torch.optim.Optimizer, steps: int, enabled: bool) -> torch.optim.lr_scheduler.MultiStepLR:
    """× 0.1 from step ceil(steps/3) and again from ceil(2·steps/3) (stepped once per training step)."""
    milestones = [math.ceil(steps / 3), math.ceil(2 * steps / 3)] if enabled else []
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)


def train_masker(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, spec: MaskerSpec,
                 seed: int = 0, device: str | torch.device = "auto") -> MaskerRun:
    """Train a masker on (standardised) `images`, `labels` with the card's E4 order, per batch:

    1. F(x) and the clean CE; CA: an SGD step on the classifier with the clean CE (train mode);
       casme_confuser: every `save_freq` steps a copy goes to the historic zoo.
    2. m = M(detached features of step 1).
    3. With probability `prob_historic` the step is "historic": the classifier is not updated on
       the masked images (Q1 "gate_only", what the authors' code did) or, in "casme_confuser"
       mode, a random historic copy classifies the masked-out image.
    4. F(x ⊙ m), F(x ⊙ (1 − m)) (blur infilling if asked) → L_M (`masker_objective`) and the
       classifier's masked loss w_in · CE(F(x ⊙ m), y) + w_out · CE(F(x ⊙ (1 − m)), y).
    5. CA and not historic: SGD step on the classifier with the masked loss.
    6. Adam step on the masker (gradient norm clipped at `grad_clip`).

    Both gradients of steps 5 and 6 are taken from the same forward pass before either update
    (PyTorch cannot back-propagate through parameters that were changed in place). FIX: the
    classifier stays in eval mode with frozen parameters, but gradients flow through it to the
    mask. The input classifier is never modified (CA trains a deep copy). Batches cycle through
    seeded permutations of the data (`_cycling_batches`: one pass of `train.fit` with this step); all
    randomness comes from `seed`.
    """
    images = _check_tensor(images, "images", 4)
    labels = _check_tensor(labels, "labels", 1)
    if labels.shape[0] != images.shape[0] or labels.shape[0] == 0:
        raise ValueError(f"need as many labels as images (> 0); got {labels.shape[0]} and {images.shape[0]}")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be square, got {tuple(images.shape[-2:])}")
    device = config.get_device(device)
    torch_gen = torch.Generator().manual_seed(int(seed))
    rng = np.random.default_rng(int(seed))
    classifier = copy.deepcopy(classifier).to(device)
    with config.seeded(int(seed)):
        masker = Masker(classifier.channels, spec.layers, spec.hidden, spec.grid, images.shape[-1]).to(device)
    opt_m = torch.optim.Adam(masker.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.fixed:
        classifier.eval()
        classifier.requires_grad_(False)
        opt_c = None
    else:
        classifier.train()
        opt_c = torch.optim.SGD(classifier.parameters(), lr=spec.classifier_lr, momentum=0.9, weight_decay=1e-4)
    schedules = [_lr_steps(opt, spec.steps, spec.lr_decay) for opt in (opt_m, opt_c) if opt is not None]
    zoo = HistoricZoo(ZOO_SIZE, spec.save_freq) if spec.historic_mode == "casme_confuser" and not spec.fixed else None
    classifier_params = [p for p in classifier.parameters()]
    masker_params = list(masker.parameters())
    history = []

    def step(masker: Masker, batch: dict, opt_m: torch.optim.Optimizer) -> torch.Tensor:
        x, y, index = batch["image"], batch["label"], len(history)
        # 1. clean pass (and the CA clean step)
        if spec.fixed:
            with torch.no_grad():
                clean_logits, features = classifier.forward_features(x)
        else:
            clean_logits, features = classifier.forward_features(x)
            opt_c.zero_grad(set_to_none=True)
            F.cross_entropy(clean_logits, y).backward()
            opt_c.step()
            if zoo is not None:
                zoo.maybe_add(index, classifier)
            clean_logits = clean_logits.detach()
        # 2. masks from the detached features
        masks = _masks_from_logits(masker, masker.logits(features), spec, torch_gen, training=True)
        # 3. historic step?
        historic = bool(rng.random() < spec.historic_probability)
        update_classifier = not spec.fixed and not historic
        confuser = classifier
        if historic and zoo is not None and zoo.copies:
            confuser = zoo.pick(rng)
        # 4. masked passes with the current classifier (Q1)
        filler = blur_images(x, spec.blur_sigma) if spec.infiller == "blur" else None
        need_in = spec.in_kind is not None or update_classifier
        need_out = spec.out_kind is not None or update_classifier
        logits_in = classifier(infill_in(x, masks, filler)) if need_in else None
        logits_out = confuser(infill_out(x, masks, filler)) if need_out else None
        terms = masker_objective(masks, y, clean_logits, logits_in, logits_out, in_kind=spec.in_kind,
                                 out_kind=spec.out_kind, lambda_in=spec.lambda_in, lambda_out=spec.lambda_out,
                                 lambda_tv=spec.lambda_tv)
        masker_grads = torch.autograd.grad(terms.total, masker_params, retain_graph=update_classifier, allow_unused=True)
        # 5. classifier step on the masked images
        record = {"step": index, **terms.parts, "clean_accuracy": (clean_logits.argmax(1) == y).float().mean(),
                  "historic": float(historic)}
        if update_classifier:
            masked_loss = F.cross_entropy(logits_in, y) + F.cross_entropy(logits_out, y)
            grads = torch.autograd.grad(masked_loss, classifier_params, allow_unused=True)
            opt_c.zero_grad(set_to_none=True)
            for p, g in zip(classifier_params, grads):
                p.grad = g
            opt_c.step()
            record["classifier_masked_loss"] = masked_loss.detach()
        # 6. masker step
        opt_m.zero_grad(set_to_none=True)
        for p, g in zip(masker_params, masker_grads):
            p.grad = g
        nn.utils.clip_grad_norm_(masker_params, spec.grad_clip)
        opt_m.step()
        for schedule in schedules:
            schedule.step()
        history.append(record)
        return terms.total.detach()

    batches = _cycling_batches(images, labels, spec.batch_size, spec.steps, torch_gen)
    engine.fit(masker, batches, epochs=1, optimizer=opt_m, step=step, device=device, progress=False)
    classifier.eval()
    classifier.requires_grad_(True)
    return MaskerRun(masker, classifier, spec, _as_floats(history))


def _as_floats(history: list[dict]) -> list[dict]:
    """The step records with their device scalars read back in one transfer (the steps never wait
    for the device to log)."""
    tensors = [v for row in history for v in row.values() if isinstance(v, torch.Tensor)]
    values = iter(torch.stack([t.to(torch.float64) for t in tensors]).cpu().tolist() if tensors else [])
    return [{k: next(values) if isinstance(v, torch.Tensor) else v for k, v in row.items()} for row in history]


def _cycling_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, steps: int,
                     generator: torch.Generator):
    """`steps` batches {"image", "label"}: consecutive slices of permutations drawn from
    `generator` when needed; the items left over when fewer than a batch remain open the next
    permutation (E4's data order, one pass of `train.fit`)."""
    order, cursor = torch.randperm(len(labels), generator=generator), 0
    for _ in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.cat([order[cursor:], torch.randperm(len(labels), generator=generator)]), 0
        index = order[cursor: cursor + batch_size]
        cursor += batch_size
        yield {"image": images[index], "label": labels[index]}


def cached_train_masker(name: str, params: dict, classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        spec: MaskerSpec, seed: int = 0, device: str | torch.device = "auto",
                        cache_dir: Path | None = None) -> MaskerRun:
    """`train_masker` once per (name, params, spec, seed): the masker, the classifier that goes with
    it (saved for CA only) and the history are written atomically under `<cache>/maskers/` and
    loaded with `weights_only=True` afterwards. `params` must describe everything else that
    affects the result (data, subset, the classifier's own cache key)."""
    path = masker_cache_path(name, params, spec, seed, cache_dir)
    device = config.get_device(device)
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        masker = Masker(classifier.channels, spec.layers, spec.hidden, spec.grid, images.shape[-1])
        masker.load_state_dict(saved["masker"])
        trained = copy.deepcopy(classifier)
        if saved["classifier"] is not None:
            trained.load_state_dict(saved["classifier"])
        return MaskerRun(masker.to(device).eval(), trained.to(device).eval(), spec, saved["history"], from_cache=True)
    run = train_masker(classifier, images, labels, spec, seed=seed, device=device)
    state = {
        "masker": {k: v.detach().cpu() for k, v in run.masker.state_dict().items()},
        "classifier": None if spec.fixed else {k: v.detach().cpu() for k, v in run.classifier.state_dict().items()},
        "history": [{k: float(v) for k, v in row.items()} for row in run.history],
    }
    cache.save_torch(state, path)
    return run


def masker_cache_path(name: str, params: dict, spec: MaskerSpec, seed: int, cache_dir: Path | None = None) -> Path:
    """Where `cached_train_masker` keeps the masker of (name, params, spec, seed)."""
    return cache.path("maskers", name, {"params": params, "spec": spec.as_dict(), "seed": seed, "version": 2}, ".pt",
                      cache_dir)


@torch.no_grad()
def predict_masks(masker: Masker, classifier: nn.Module, images: torch.Tensor, spec: MaskerSpec | None = None,
                  batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation masks (B, 1, H, W) and the classifier's clean logits, in eval mode, batched.
    A Gumbel masker's evaluation mask is 1[logit > 0]."""
    images = _check_tensor(images, "images", 4)
    device = next(masker.parameters()).device
    masker.eval()
    was_training = classifier.training
    classifier.eval()
    masks, logits = [], []
    for start in range(0, len(images), batch_size):
        x = images[start: start + batch_size].to(device)
        out, features = classifier.forward_features(x)
        grid_logits = masker.logits(features)
        if spec is not None and spec.gumbel_tau is not None:
            masks.append(masker.upsample(gumbel_eval_mask(grid_logits)).cpu())
        else:
            masks.append(masker.upsample(torch.sigmoid(grid_logits)).cpu())
        logits.append(out.cpu())
    classifier.train(was_training)
    return torch.cat(masks), torch.cat(logits)


# ============================================================================ Fong & Vedaldi baseline


def optimise_masks(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, steps: int = 100,
                   lr: float = 0.1, grid: int = 8, lambda_area: float = 0.05, lambda_tv: float = 1.0,
                   blur_sigma: float = 20 * 64 / 224, batch_size: int = 256) -> torch.Tensor:
    """Per-image mask optimisation (Fong & Vedaldi 2017, the "deletion game"), a baseline.

    For each image a keep-mask k = sigmoid(θ) on a `grid`×`grid` grid (bilinear upsampling to the
    image) starts at k ≈ 1 and is optimised with Adam for `steps` steps to minimise
    p(y | x ⊙ k + blur(x) ⊙ (1 − k)) + λ_area · mean(1 − k) + λ_tv · mean squared neighbour
    difference of k on the grid. The saliency mask is 1 − k ∈ [0, 1], (B, 1, H, W). Settings are
    a project choice (the card leaves them open): the default 8 px cells match Fong & Vedaldi's
    28×28 mask at 224 px. Deterministic: no jitter, no noise.
    """
    images = _check_tensor(images, "images", 4)
    labels = _check_tensor(labels, "labels", 1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"need one label per image; got {labels.shape[0]} labels for {images.shape[0]} images")
    for name, value in (("steps", steps), ("grid", grid), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    _check_nonnegative(lambda_area, "lambda_area")
    _check_nonnegative(lambda_tv, "lambda_tv")
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    states = [p.requires_grad for p in classifier.parameters()]
    classifier.requires_grad_(False)
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = images[start: start + batch_size].to(device)
            y = labels[start: start + batch_size].to(device)
            blurred = blur_images(x, blur_sigma)
            theta = torch.full((len(x), 1, grid, grid), 3.0, device=device, requires_grad=True)
            opt = torch.optim.Adam([theta], lr=lr)
            for _ in range(steps):
                keep_grid = torch.sigmoid(theta)
                keep = F.interpolate(keep_grid, size=x.shape[-2:], mode="bilinear", align_corners=False)
                prob = F.softmax(classifier(x * keep + blurred * (1 - keep)), dim=1).gather(1, y[:, None]).squeeze(1)
                tv = ((keep_grid[..., 1:, :] - keep_grid[..., :-1, :]).pow(2).mean(dim=(1, 2, 3))
                      + (keep_grid[..., :, 1:] - keep_grid[..., :, :-1]).pow(2).mean(dim=(1, 2, 3)))
                loss = (prob + lambda_area * (1 - keep_grid).mean(dim=(1, 2, 3)) + lambda_tv * tv).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                keep = F.interpolate(torch.sigmoid(theta), size=x.shape[-2:], mode="bilinear", align_corners=False)
            out.append((1 - keep).clamp(0, 1).cpu())
    finally:
        for p, state in zip(classifier.parameters(), states):
            p.requires_grad_(state)
        classifier.train(was_training)
    return torch.cat(out)


# ============================================================================ few-shot samplers (E6)


def _labels_array(labels) -> np.ndarray:
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D integer array, got {labels.dtype} {labels.shape}")
    return labels


def sample_per_class(labels, k: int, seed: int = 0) -> np.ndarray:
    """Indices of exactly `k` images per class (seeded, sorted); ValueError if a class has fewer."""
    labels = _labels_array(labels)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    rng = np.random.default_rng(seed)
    picked = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < k:
            raise ValueError(f"class {cls} has {len(members)} images, fewer than k={k}")
        picked.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(picked))


def sample_classes(labels, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(indices of every image of `n_classes` classes drawn without replacement, the classes)."""
    labels = _labels_array(labels)
    classes = np.unique(labels)
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or not 0 < n_classes <= len(classes):
        raise ValueError(f"n_classes must be an int in [1, {len(classes)}], got {n_classes!r}")
    chosen = np.sort(np.random.default_rng(seed).choice(classes, size=n_classes, replace=False))
    return np.flatnonzero(np.isin(labels, chosen)), chosen
