"""Attribution-prior and guidance losses, and masking objectives.

One section per paper. Every loss is a small function of tensors (images, logits, features,
masks) so that it can be called from `study.train.fit`'s `extra_loss` hook, from a dedicated
loop, or from a test; the `*_extra_loss` factories adapt them to that hook.

Conventions: images (B, C, H, W) float; masks (B, 1, H, W) bool (or 0/1), 1 = inside the region
of interest; `outside = 1 − mask`. Bad inputs raise ValueError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# =============================================================================================
# Viviano et al. 2021, "Saliency is a possible red herring" (card ../shared/papers/viviano2021.md)
#
#   outside_shuffle, masked_input, dilate_training_mask      input transforms (card §2.0, §7)
#   rrr_loss, gradmask_loss, actdiff_loss                    training terms added to CE
#   FeatureDiscriminator, discriminator_loss,
#   adversarial_encoder_loss, AdversarialSchedule            the adversarial method (Q2 gating)
#   rrr_extra_loss, gradmask_extra_loss, ActDiffExtraLoss    adapters for study.train.fit
# =============================================================================================

RRR_LOG_EPS = 1e-11            # inside the log of RRR's log-probabilities (card §2.0)
ACTDIFF_DISTANCE_EPS = 1e-6    # torch.nn.functional.pairwise_distance's eps (card §7.4)


def _check_images(images, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a float tensor (B, C, H, W); got {got}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(images.detach()).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return images


def _check_masks(masks, images: torch.Tensor, name: str = "masks") -> torch.Tensor:
    """Masks as bool (B, 1, H, W) matching the images' batch and spatial size."""
    if not isinstance(masks, torch.Tensor):
        raise ValueError(f"{name} must be a tensor (B, 1, H, W), got {type(masks).__name__}")
    expected = (images.shape[0], 1, *images.shape[2:])
    if tuple(masks.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} to match images {tuple(images.shape)}; got {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        if not ((masks == 0) | (masks == 1)).all():
            raise ValueError(f"{name} must be boolean or hold only 0 and 1")
        masks = masks.bool()
    return masks.to(images.device)


def _check_lambda(lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    return float(lam)


def _check_input_gradient(images: torch.Tensor, logits: torch.Tensor) -> None:
    if not images.requires_grad:
        raise ValueError("images must require grad and logits must be computed from them (input-gradient loss)")
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != images.shape[0]:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must have shape ({images.shape[0]}, classes); got {got}")
    if logits.grad_fn is None:
        raise ValueError("logits carry no graph: compute them from the images inside autograd")


# --------------------------------------------------------------------------------- transforms

def outside_shuffle(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x̃: per image, the pixels outside the mask are randomly permuted among themselves.

    Inside pixels are unchanged; a pixel moves with all its channels. No gradient flows through
    the result. The permutation comes from `generator` only (card §7.1: deterministic given
    the seed; an all-inside mask gives the identity).
    """
    images = _check_images(images)
    masks = _check_masks(masks, images)
    if not isinstance(generator, torch.Generator):
        raise ValueError("generator must be a torch.Generator (every random draw is seeded)")
    batch, channels = images.shape[:2]
    flat = images.detach().reshape(batch, channels, -1).clone()
    outside = ~masks.reshape(batch, -1).cpu()
    for index in range(batch):
        positions = torch.nonzero(outside[index], as_tuple=True)[0]
        if len(positions) < 2:
            continue
        order = torch.randperm(len(positions), generator=generator)
        positions = positions.to(images.device)
        flat[index][:, positions] = flat[index][:, positions[order.to(images.device)]]
    return flat.reshape(images.shape)


def masked_input(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """x ⊙ m: zero outside the mask, the image inside (card §7.2; the `Masked` method)."""
    images = _check_images(images)
    return images * _check_masks(masks, images).to(images.dtype)


def dilation_radius(sigma: float) -> int:
    """The support radius of a Gaussian truncated at 4σ (scipy.ndimage's default): int(4σ + 0.5)."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    return int(4 * sigma + 0.5)


def dilate_training_mask(masks: torch.Tensor, sigma: float) -> torch.Tensor:
    """The synthetic training mask: Gaussian blur with σ, then `> 0` (card §2.0).

    A Gaussian truncated at 4σ is positive on a (2r+1)² square (r = int(4σ + 0.5)), so blur-then-
    threshold is a square dilation by r pixels, computed here as a max-pool. σ = 0 is the
    identity and the result always contains the original mask (card §7.10). Accepts (B, 1, H, W)
    bool or 0/1 tensors; returns bool of the same shape.
    """
    if not isinstance(masks, torch.Tensor) or masks.ndim != 4 or masks.shape[1] != 1:
        got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"masks must be a (B, 1, H, W) tensor, got {got}")
    if masks.dtype != torch.bool and not ((masks == 0) | (masks == 1)).all():
        raise ValueError("masks must be boolean or hold only 0 and 1")
    radius = dilation_radius(sigma)
    masks = masks.bool()
    if radius == 0:
        return masks.clone()
    pooled = F.max_pool2d(masks.float(), kernel_size=2 * radius + 1, stride=1, padding=radius)
    return pooled > 0


# ------------------------------------------------------------------------------- loss terms

def rrr_loss(images: torch.Tensor, logits: torch.Tensor, outside: torch.Tensor, lam: float) -> torch.Tensor:
    """Right for the Right Reasons (Ross et al. 2017), as in Viviano's code:

    λ · Σ_{batch, pixels} (∂(Σ_{i,k} log(softmax(z_i)_k + 1e-11)) / ∂x ⊙ o)²

    a **sum** (it doubles when the batch is duplicated). `images` must require grad and
    `logits` be computed from them; the input gradient is kept in the graph (double backprop).
    """
    lam = _check_lambda(lam)
    images = _check_images(images)
    _check_input_gradient(images, logits)
    outside = _check_masks(outside, images, "outside").to(images.dtype)
    return lam * _rrr_penalty(images, logits, outside).sum()


def gradmask_loss(images: torch.Tensor, logits: torch.Tensor, outside: torch.Tensor, lam: float) -> torch.Tensor:
    """GradMask (Simpson et al. 2019), as in Viviano's code, for two logits:

    λ · Σ_{batch, pixels} |∂|z₀ − z₁| / ∂x| ⊙ o        (a sum, with double backprop).
    """
    lam = _check_lambda(lam)
    images = _check_images(images)
    _check_input_gradient(images, logits)
    if logits.shape[1] != 2:
        raise ValueError(f"GradMask is defined for two logits, got {logits.shape[1]}")
    outside = _check_masks(outside, images, "outside").to(images.dtype)
    return lam * _gradmask_penalty(images, logits, outside).sum()


def _rrr_penalty(images: torch.Tensor, logits: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """RRR's per-pixel terms (∂ Σ log(softmax + 1e-11) / ∂x ⊙ o)², for (…, B, C, H, W) images."""
    log_probs = torch.log(torch.softmax(logits, dim=-1) + RRR_LOG_EPS)
    (gradient,) = torch.autograd.grad(log_probs.sum(), images, create_graph=True)
    return (gradient * outside).pow(2)


def _gradmask_penalty(images: torch.Tensor, logits: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """GradMask's per-pixel terms |∂ Σ|z₀ − z₁| / ∂x| ⊙ o, for (…, B, C, H, W) images."""
    contrast = (logits[..., 0] - logits[..., 1]).abs().sum()
    (gradient,) = torch.autograd.grad(contrast, images, create_graph=True)
    return gradient.abs() * outside


def _check_feature_pair(features, features_shuffled) -> None:
    """Both (B, D), non-empty, the same shape and finite (a NaN would spread through every later step)."""
    for name, value in (("features", features), ("features_shuffled", features_shuffled)):
        if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[0] == 0:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a non-empty (B, D) tensor, got {got}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or Inf")
    if features.shape != features_shuffled.shape:
        raise ValueError(f"feature shapes differ: {tuple(features.shape)} vs {tuple(features_shuffled.shape)}")
    if features.dtype != features_shuffled.dtype:
        raise ValueError(f"features and features_shuffled dtypes differ: {features.dtype} vs {features_shuffled.dtype}")


def actdiff_loss(features: torch.Tensor, features_shuffled: torch.Tensor, lam: float = 1.0,
                 apply_lambda: bool = False) -> torch.Tensor:
    """ActDiff: mean_i ‖f(x_i) − f(x̃_i)‖₂ (pairwise distance, p = 2, eps 1e-6).

    Quirk Q1: the authors' code never multiplies λ in; λ only switches the term on. The default
    `apply_lambda=False` reproduces what was run (effective weight 1); `apply_lambda=True`
    multiplies by `lam`. With x̃ = x the distance is eps·√d, not 0 (card §7.4).
    """
    lam = _check_lambda(lam)
    _check_feature_pair(features, features_shuffled)
    distance = F.pairwise_distance(features, features_shuffled, p=2, eps=ACTDIFF_DISTANCE_EPS).mean()
    return distance * (lam if apply_lambda else 1.0)


# ------------------------------------------------------------------------------ adversarial

class FeatureDiscriminator(nn.Sequential):
    """D: spectral-normalised MLP in_features → hidden → hidden → hidden → 1 with ReLU (card §2.0:
    512 → 1024 ×3 → 1). It returns the logit; the sigmoid sits inside the BCE-with-logits losses,
    which equals BCE on a sigmoid output."""

    def __init__(self, in_features: int, hidden: int = 1024, layers: int = 3):
        for name, value in (("in_features", in_features), ("hidden", hidden), ("layers", layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        sizes = [in_features] + [hidden] * layers
        modules: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            modules += [nn.utils.parametrizations.spectral_norm(nn.Linear(fan_in, fan_out)), nn.ReLU()]
        modules.append(nn.utils.parametrizations.spectral_norm(nn.Linear(sizes[-1], 1)))
        super().__init__(*modules)


def _check_disc(disc, features: torch.Tensor) -> None:
    if not isinstance(disc, nn.Module):
        raise ValueError(f"disc must be a torch.nn.Module, got {type(disc).__name__}")
    parameter = next((p for p in disc.parameters() if p.is_floating_point()), None)
    autocast = torch.is_autocast_enabled(features.device.type)  # mixed precision: dtypes may differ
    if parameter is not None and parameter.dtype != features.dtype and not autocast:
        raise ValueError(f"features have dtype {features.dtype} but disc's parameters {parameter.dtype}; "
                         "cast one of them")


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def discriminator_loss(disc: nn.Module, features: torch.Tensor, features_shuffled: torch.Tensor, lam: float) -> torch.Tensor:
    """L_D = λ · [BCE(D(f(x)), 1) + BCE(D(f(x̃)), 0)] on detached features (D learns to tell x from x̃)."""
    lam = _check_lambda(lam)
    _check_feature_pair(features, features_shuffled)
    _check_disc(disc, features)
    return lam * (_bce(disc(features.detach()), 1.0) + _bce(disc(features_shuffled.detach()), 0.0))


def adversarial_encoder_loss(disc: nn.Module, features: torch.Tensor, features_shuffled: torch.Tensor, lam: float) -> torch.Tensor:
    """L_G = λ · [BCE(D(f(x)), 0) + BCE(D(f(x̃)), 1)]: the encoder is pushed to make x and x̃ look
    alike to D. Call with D's parameters frozen (see `AdversarialSchedule`)."""
    lam = _check_lambda(lam)
    _check_feature_pair(features, features_shuffled)
    _check_disc(disc, features)
    return lam * (_bce(disc(features), 0.0) + _bce(disc(features_shuffled), 1.0))


@dataclass
class AdversarialSchedule:
    """Viviano's update schedule (quirk Q2): D steps on every batch; the encoder/classifier steps
    only on every `disc_iter`-th batch (batches disc_iter, 2·disc_iter, … counted from 1 over the
    whole run), with CE + L_G; on the other batches CE and L_G are dropped."""

    disc: nn.Module
    disc_optimizer: torch.optim.Optimizer
    lam: float
    disc_iter: int
    batches_seen: int = 0

    def __post_init__(self):
        _check_lambda(self.lam)
        if isinstance(self.disc_iter, bool) or not isinstance(self.disc_iter, int) or self.disc_iter < 1:
            raise ValueError(f"disc_iter must be an int >= 1, got {self.disc_iter!r}")

    def encoder_steps_now(self) -> bool:
        """Whether the batch about to be processed is an encoder batch."""
        return (self.batches_seen + 1) % self.disc_iter == 0

    def step_discriminator(self, features: torch.Tensor, features_shuffled: torch.Tensor) -> float:
        """One D step on detached features; counts the batch. Returns L_D."""
        loss = discriminator_loss(self.disc, features, features_shuffled, self.lam)
        self.disc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_optimizer.step()
        self.batches_seen += 1
        return float(loss.detach())

    def encoder_loss(self, features: torch.Tensor, features_shuffled: torch.Tensor) -> torch.Tensor:
        """L_G with D frozen (its parameters get no gradient)."""
        flags = [p.requires_grad for p in self.disc.parameters()]
        for p in self.disc.parameters():
            p.requires_grad_(False)
        try:
            return adversarial_encoder_loss(self.disc, features, features_shuffled, self.lam)
        finally:
            for p, flag in zip(self.disc.parameters(), flags):
                p.requires_grad_(flag)


# -------------------------------------------------------------- adapters for study.train.fit

def _input_and_logits(model: nn.Module, batch: dict, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's images and logits with an input-gradient graph.

    When the loader yields images that require grad (`requires_input_grad` in the experiment),
    fit's own forward pass already has the graph; otherwise the logits are recomputed once from
    a copy of the images that requires grad.
    """
    images = batch["image"]
    if images.requires_grad and logits.grad_fn is not None:
        return images, logits
    images = images.detach().requires_grad_(True)
    return images, model(images)


def _outside_mask_extra_loss(loss, lam: float):
    lam = _check_lambda(lam)

    def extra(model: nn.Module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        images, logits = _input_and_logits(model, batch, logits)
        return loss(images, logits, ~_check_masks(batch["mask"], images), lam)

    return extra


def rrr_extra_loss(lam: float):
    """`extra_loss(model, batch, logits)` for fit: RRR with outside = ~batch["mask"]."""
    return _outside_mask_extra_loss(rrr_loss, lam)


def gradmask_extra_loss(lam: float):
    """`extra_loss(model, batch, logits)` for fit: GradMask with outside = ~batch["mask"]."""
    return _outside_mask_extra_loss(gradmask_loss, lam)


def input_gradient_extra_loss_many(name: str, lam: float):
    """`extra_loss(model_call, batch, logits)` for `train.fit_many(..., input_grad=True)`: RRR
    (`name="rrr"`) or GradMask (`"gradmask"`) with outside = ~batch["mask"], one loss per run.

    The batch is stacked per run (images (R, B, C, H, W), logits (R, B, K)); run r's logits only
    depend on run r's images (its own BatchNorm batch included), so one input gradient of the
    summed score holds every run's own gradient, and run r's loss is `rrr_loss` / `gradmask_loss`
    of its batch."""
    penalties = {"rrr": _rrr_penalty, "gradmask": _gradmask_penalty}
    if name not in penalties:
        raise ValueError(f"unknown input-gradient loss {name!r}; choose one of {sorted(penalties)}")
    penalty, lam = penalties[name], _check_lambda(lam)

    def extra(model_call, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        images = batch["image"]
        if not isinstance(images, torch.Tensor) or images.ndim != 5 or not images.requires_grad:
            raise ValueError("the batch images must be stacked per run (R, B, C, H, W) and require grad: "
                             "train with fit_many(..., input_grad=True)")
        if logits.ndim != 3 or logits.shape[:2] != images.shape[:2] or logits.grad_fn is None:
            raise ValueError(f"logits must be (R, B, K) = {tuple(images.shape[:2])} + (K,), computed from the images")
        if name == "gradmask" and logits.shape[-1] != 2:
            raise ValueError(f"GradMask is defined for two logits, got {logits.shape[-1]}")
        masks = batch.get("mask")
        if not isinstance(masks, torch.Tensor) or tuple(masks.shape) != (*images.shape[:2], 1, *images.shape[3:]):
            raise ValueError(f"batch['mask'] must be (R, B, 1, H, W) to match images {tuple(images.shape)}")
        outside = (~masks.bool()).to(images.dtype)
        return lam * penalty(images, logits, outside).flatten(1).sum(1)

    return extra


class ActDiffExtraLoss:
    """`extra_loss(model, batch, logits)` for fit: ActDiff between f(x) and f(x̃).

    f is the pooled feature vector, read by a forward hook on `feature_layer` (its output,
    flattened). In fit, `before_forward` runs x̃ first (built without gradient with
    `outside_shuffle` from `seed`, in train mode, so it updates the BatchNorm statistics first:
    the authors' order, card Q9), then fit's own forward pass of x is captured, so x is not run
    twice; gradients flow through both passes. Called outside fit (no `before_forward`), the x̃
    pass runs after x. Use it as a context manager (`with ActDiffExtraLoss(model, ...) as extra:`)
    or call `close()` to remove the hook.
    """

    def __init__(self, model: nn.Module, lam: float = 1.0, apply_lambda: bool = False, seed: int = 0,
                 feature_layer: str = "avgpool"):
        self.lam = _check_lambda(lam)
        self.apply_lambda = bool(apply_lambda)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.generator = torch.Generator().manual_seed(seed)
        modules = dict(model.named_modules())
        if feature_layer not in modules or not feature_layer:
            raise ValueError(f"model has no layer {feature_layer!r} to read features from")
        self._features: torch.Tensor | None = None
        self._shuffled_features: torch.Tensor | None = None
        self._handle = modules[feature_layer].register_forward_hook(self._store)

    def _store(self, _module, _inputs, output) -> None:
        self._features = torch.flatten(output, 1)

    def _shuffled_pass(self, model: nn.Module, batch: dict) -> torch.Tensor:
        model(outside_shuffle(batch["image"], batch["mask"], self.generator))  # the hook stores f(x̃)
        features, self._features = self._features, None
        return features

    def before_forward(self, model: nn.Module, batch: dict) -> None:
        self._shuffled_features = self._shuffled_pass(model, batch)

    def __call__(self, model: nn.Module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        features, self._features = self._features, None
        if features is None or features.shape[0] != batch["image"].shape[0] or features.grad_fn is None:
            raise ValueError("no training-mode features of this batch were captured; is the hook on the model fit trains?")
        shuffled, self._shuffled_features = self._shuffled_features, None
        if shuffled is None:
            shuffled = self._shuffled_pass(model, batch)
        return actdiff_loss(features, shuffled, self.lam, self.apply_lambda)

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self) -> ActDiffExtraLoss:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Rao et al.'s guidance losses and Phang et al.'s masking objectives live beside the models they
# need (study.guidance, study.masking); they are re-exported here so every loss is study.losses.<name>.
from study.guidance import energy_loss, guidance_loss, l1_loss, ppce_loss, rrr_star_loss  # noqa: E402,F401
from study.masking import (  # noqa: E402,F401
    gated_area_penalty,
    masked_in_loss,
    masked_out_loss,
    masker_objective,
    total_variation,
)
