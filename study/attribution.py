"""Saliency maps: one registry of attribution methods and controls, and composable post-processing.

`explain(model, images, targets, method, **options)` returns a (B, 1, H, W) float32 map on the
images' device for every name in `METHODS`. Captum computes the attributions wherever it can;
LRP and Deep Taylor use zennit (rules per layer, BatchNorm and ResNet canonizers);
RISE, the controls and the post-processing are small torch functions written here.

Targets are a python int, an integer tensor of shape (B,), or None, meaning the class the model
predicts (the Tomsett card's convention). Gradient-type methods explain the raw model output
(the pre-softmax logit); occlusion and RISE have a `score` option ("logit" | "softmax").

During a call the model is put in eval mode and its parameters stop requiring gradients, so no
parameter `.grad` is accumulated; each module's train/eval flag and each parameter's
`requires_grad` are restored afterwards, also when the method raises.

Channel reduction (option `reduce`) turns the raw (B, C, H, W) attribution into a pixel map:

============================  ======================  =================================================
method                        default `reduce`        why
============================  ======================  =================================================
gradient                      "max_abs"               Tomsett §5.3: max |∂logit/∂x| over colour channels
input_x_gradient              "sum"                   Tomsett §5.3 / Rao: signed x ⊙ grad summed over C
integrated_gradients          "sum"                   signed; keeps completeness (Σ map = f(x) − f(x'))
smoothgrad                    "max_abs" (gradient)    like `gradient`; "sum" when `base="integrated_gradients"`
guided_backprop               "max_abs"               a modified gradient, reduced like `gradient`
deeplift                      "sum"                   signed; keeps summation-to-delta
gradcam                       "sum"                   already one channel (identity)
occlusion                     "mean"                  every channel of a window gets the same drop, so the
                                                      mean is that drop (x ⊙ w per pixel on a linear model)
lrp_epsilon, lrp_alpha1beta0  "sum"                   signed; keeps relevance conservation
deep_taylor                   "sum"                   (zennit; BatchNorm and ResNet blocks canonized)
rise and every control        "sum"                   already one channel (identity)
============================  ======================  =================================================

`reduce` accepts "sum" | "mean" | "max_abs" (max over C of |a|, non-negative) | "abs_sum"
(Σ_C |a|) | None (keep the channels: (B, C, H, W)). The papers' own pipelines ask for
`reduce=None` and then apply `postprocess` with the order of `PAPER_POSTPROCESSING`.

Controls and references (the model is ignored and may be None): random, sobel, constant,
centre_gaussian, ground_truth.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from tqdm.auto import tqdm
from captum.attr import (
    DeepLift,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Occlusion,
    Saliency,
)
from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR as _DEEPLIFT_NONLINEAR
from captum.attr._utils.approximation_methods import SUPPORTED_METHODS as _IG_APPROXIMATIONS
from torch import nn
from zennit.canonizers import Canonizer, SequentialMergeBatchNorm
from zennit.core import Composite, collect_leaves
from zennit.layer import Sum
from zennit.rules import Epsilon, Norm, Pass, ZBox, ZPlus
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
from zennit.types import Activation, AvgPool
from zennit.types import BatchNorm as ZennitBatchNorm
from zennit.types import Convolution as ZennitConvolution
from zennit.types import Linear as ZennitLinear

from study import config
from study.metrics.localisation import rasterise_boxes
from study.models import get_layer
from study.train import progress_enabled

REDUCTIONS = ("sum", "mean", "max_abs", "abs_sum", None)
BASELINES = ("zero", "mean", "blur")
SCORES = ("logit", "softmax")


# --------------------------------------------------------------------------- validation helpers

def _check_images(images, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W) (4 dims), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {images.dtype}")
    if min(images.shape) == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contain NaN or Inf values")
    return images


def _check_maps(maps, name: str = "maps") -> torch.Tensor:
    return _check_images(maps, name)


def _check_options(name: str, function: Callable, options: Mapping, skip: int) -> None:
    """Raise ValueError for option keys that `function` does not take (its keyword-only parameters)."""
    parameters = list(inspect.signature(function).parameters.values())[skip:]
    known = [p.name for p in parameters]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {name!r}; accepted: {known}")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _positive_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(float(value)) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _choice(value, choices: Sequence, name: str):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return _positive_int(value[0], name), _positive_int(value[1], name)
    size = _positive_int(value, name)
    return size, size


def _require_model(model, method: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"method {method!r} needs a torch.nn.Module model, got {type(model).__name__}")
    return model


def _as_targets(targets, model, images: torch.Tensor) -> torch.Tensor | None:
    """Targets as a (B,) int64 tensor on the images' device; None means the predicted class."""
    batch = images.shape[0]
    if targets is None:
        if model is None:
            return None
        with torch.no_grad():
            output = model(images)
        if output.ndim != 2 or output.shape[0] != batch:
            raise ValueError(f"model output must have shape (B, classes) to pick the predicted class, got {tuple(output.shape)}")
        return output.argmax(dim=1)
    if isinstance(targets, bool):
        raise ValueError("targets must be an int, an integer tensor of shape (B,), or None; got a bool")
    if isinstance(targets, (int, np.integer)):
        targets = torch.full((batch,), int(targets), dtype=torch.long)
    elif isinstance(targets, (list, tuple, np.ndarray)):
        targets = torch.as_tensor(np.asarray(targets))
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be an int, an integer tensor of shape (B,), or None; got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integers, got dtype {targets.dtype}")
    if targets.ndim == 0:
        targets = targets.expand(batch)
    if targets.ndim != 1 or targets.shape[0] != batch:
        raise ValueError(f"targets must have shape ({batch},) to match the images, got {tuple(targets.shape)}")
    if (targets < 0).any():
        raise ValueError("targets must be non-negative class indices")
    return targets.to(device=images.device, dtype=torch.long)


@contextlib.contextmanager
def _frozen_eval(model: nn.Module | None):
    """Eval mode and no parameter gradients inside; every module's mode and flag restored after."""
    if model is None:
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
        for module, mode in modes:
            module.training = mode


def _reduce(maps: torch.Tensor, how) -> torch.Tensor:
    """Channel reduction without input checks (see `reduce_channels`)."""
    _choice(how, REDUCTIONS, "reduce")
    if how is None:
        return maps
    if how == "sum":
        return maps.sum(dim=1, keepdim=True)
    if how == "mean":
        return maps.mean(dim=1, keepdim=True)
    if how == "max_abs":
        return maps.abs().amax(dim=1, keepdim=True)
    return maps.abs().sum(dim=1, keepdim=True)


def _seed(value, name: str = "seed") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _default_blur_sigma(images: torch.Tensor) -> float:
    """σ = 5 px at 224 px scaled to the image side (Vandersmissen §5.3: 5·64/224 ≈ 1.43 at 64 px)."""
    return 5.0 * max(images.shape[-2:]) / 224.0


def _baseline(images: torch.Tensor, baseline, blur_sigma) -> torch.Tensor:
    """"zero" | "mean" (each image's per-channel spatial mean) | "blur" (Gaussian blur of the image,
    σ = `blur_sigma`, default `_default_blur_sigma`) | a number | a tensor broadcastable to the images."""
    images = images.detach()
    if isinstance(baseline, str):
        _choice(baseline, BASELINES, "baseline")
        if baseline == "zero":
            return torch.zeros_like(images)
        if baseline == "mean":
            return images.mean(dim=(2, 3), keepdim=True).expand_as(images).contiguous()
        sigma = _default_blur_sigma(images) if blur_sigma is None else _positive_float(blur_sigma, "blur_sigma")
        return gaussian_blur(images, sigma)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        if not math.isfinite(baseline):
            raise ValueError(f"baseline must be finite, got {baseline!r}")
        return torch.full_like(images, float(baseline))
    if isinstance(baseline, torch.Tensor):
        try:
            expanded = torch.broadcast_to(baseline.to(device=images.device, dtype=images.dtype), images.shape)
        except RuntimeError as error:
            raise ValueError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to the images' {tuple(images.shape)}") from error
        if not torch.isfinite(expanded).all():
            raise ValueError("baseline contains NaN or Inf values")
        return expanded.contiguous()
    raise ValueError(f"baseline must be one of {list(BASELINES)}, a number or a tensor; got {baseline!r}")


def _scored(model: nn.Module, score: str) -> Callable:
    _choice(score, SCORES, "score")
    if score == "logit":
        return model
    return lambda x: torch.softmax(model(x), dim=1)


# --------------------------------------------------------------------------- gradient methods

def _gradient(model, images, targets, *, abs=True, reduce="max_abs"):
    """Vanilla gradient ∂logit_t/∂x (captum Saliency); `abs` takes |·| per channel first."""
    attributions = Saliency(_require_model(model, "gradient")).attribute(images, target=targets, abs=bool(abs))
    return _reduce(attributions, reduce)


def _input_x_gradient(model, images, targets, *, reduce="sum"):
    """x ⊙ ∂logit_t/∂x (captum InputXGradient), signed."""
    attributions = InputXGradient(_require_model(model, "input_x_gradient")).attribute(images, target=targets)
    return _reduce(attributions, reduce)


def _integrated_gradients(model, images, targets, *, baseline="zero", steps=50, internal_batch_size=None,
                          approximation="gausslegendre", blur_sigma=None, reduce="sum"):
    """Integrated gradients (captum). `approximation` is captum's `method`: "gausslegendre" or
    "riemann_left|right|middle|trapezoid" (Tomsett's α = 1/32 … 1 is "riemann_right", steps=32)."""
    steps = _positive_int(steps, "steps")
    _choice(approximation, _IG_APPROXIMATIONS, "approximation")
    if internal_batch_size is not None:
        internal_batch_size = _positive_int(internal_batch_size, "internal_batch_size")
    attributions = IntegratedGradients(_require_model(model, "integrated_gradients")).attribute(
        images, baselines=_baseline(images, baseline, blur_sigma), target=targets, n_steps=steps,
        method=approximation, internal_batch_size=internal_batch_size)
    return _reduce(attributions, reduce)


def _smoothgrad(model, images, targets, *, samples=25, sigma=0.15, absolute=None, base="gradient", steps=32,
                baseline="zero", batch_size=None, seed=0, reduce="default"):
    """SmoothGrad (captum NoiseTunnel, nt_type "smoothgrad"): the mean attribution over `samples`
    copies of x + N(0, sigma²), sigma in input units. base "gradient" (Saliency; `absolute`
    defaults to True: mean of |grad|, Tomsett §5.3) or "integrated_gradients" (`steps`,
    `baseline`; `absolute` must stay off). The noise comes from torch's RNG seeded with `seed`
    inside a forked RNG state, so a call is deterministic and leaves the global RNG untouched;
    the noise of an image depends on the batch it is in."""
    model = _require_model(model, "smoothgrad")
    _choice(base, ("gradient", "integrated_gradients"), "base")
    samples = _positive_int(samples, "samples")
    sigma = _positive_float(sigma, "sigma")
    seed = _seed(seed)
    if batch_size is not None:
        batch_size = min(_positive_int(batch_size, "batch_size"), samples)
    if reduce == "default":
        reduce = "max_abs" if base == "gradient" else "sum"
    kwargs = {"nt_type": "smoothgrad", "nt_samples": samples, "nt_samples_batch_size": batch_size, "stdevs": sigma,
              "target": targets}
    if base == "gradient":
        explainer = NoiseTunnel(Saliency(model))
        kwargs["abs"] = True if absolute is None else bool(absolute)
    else:
        if absolute:
            raise ValueError("absolute applies to base='gradient' only; take absolute() of the map instead")
        explainer = NoiseTunnel(IntegratedGradients(model))
        kwargs.update(n_steps=_positive_int(steps, "steps"), baselines=_baseline(images, baseline, None))
    with config.seeded(seed):
        attributions = explainer.attribute(images, **kwargs)
    return _reduce(attributions, reduce)


def _guided_backprop(model, images, targets, *, reduce="max_abs"):
    """Guided backpropagation (captum GuidedBackprop; needs nn.ReLU modules, not functional relu)."""
    attributions = GuidedBackprop(_require_model(model, "guided_backprop")).attribute(images, target=targets)
    return _reduce(attributions, reduce)


def _nonlinearities_called_once(model: nn.Module, images: torch.Tensor) -> None:
    """ValueError when a nonlinearity module (captum DeepLift's list: ReLU, MaxPool2d, ...) is called
    more than once in one forward pass (torchvision's ResNet blocks call one ReLU twice): captum's
    DeepLift keeps one input and output per module and stops with a RuntimeError on such models."""
    calls: dict[str, int] = {}

    def count(name):
        return lambda _module, _inputs, _output: calls.__setitem__(name, calls.get(name, 0) + 1)

    handles = [module.register_forward_hook(count(name)) for name, module in model.named_modules()
               if type(module) in _DEEPLIFT_NONLINEAR]
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for handle in handles:
            handle.remove()
    reused = [name for name, count in calls.items() if count > 1]
    if reused:
        raise ValueError(f"deeplift needs every nonlinearity module called once per forward pass, but the model "
                         f"calls {', '.join(repr(n) for n in reused[:3])}{', ...' if len(reused) > 3 else ''} more "
                         f"than once (e.g. the shared ReLU of a torchvision ResNet block)")


def _deeplift(model, images, targets, *, baseline="zero", blur_sigma=None, reduce="sum"):
    """DeepLIFT rescale rule (captum DeepLift), multiplied by (x − baseline). ValueError for a model
    that calls a nonlinearity module twice in one forward pass (e.g. torchvision's ResNets)."""
    _nonlinearities_called_once(_require_model(model, "deeplift"), images)
    attributions = DeepLift(_require_model(model, "deeplift")).attribute(
        images, baselines=_baseline(images, baseline, blur_sigma), target=targets)
    return _reduce(attributions, reduce)


def _last_conv_name(model: nn.Module) -> str:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not names:
        raise ValueError(f"model {type(model).__name__} has no nn.Conv2d; name the Grad-CAM layer with option layer=")
    return names[-1]


def _gradcam(model, images, targets, *, layer=None, relu=True, attribute_to_layer_input=False, reduce="sum"):
    """Grad-CAM (captum LayerGradCam) at `layer` (a name for study.models.get_layer; default: the
    last nn.Conv2d in registration order), channel weights = spatial mean of the gradients,
    optional ReLU, then bilinear upsampling to the input size (captum LayerAttribution.interpolate,
    align_corners=False). For a GAP → Linear head, Grad-CAM (relu=False) at the last feature map
    equals CAM / (h·w), so it also serves as Phang's CAM baseline."""
    model = _require_model(model, "gradcam")
    if layer is None:
        layer = _last_conv_name(model)
    if not isinstance(layer, str):
        raise ValueError(f"layer must be a layer name (str), got {type(layer).__name__}")
    module = get_layer(model, layer)
    cam = LayerGradCam(model, module).attribute(images, target=targets, relu_attributions=bool(relu),
                                                attribute_to_layer_input=bool(attribute_to_layer_input))
    if cam.ndim != 4:
        raise ValueError(f"Grad-CAM needs a layer with a (B, C, h, w) output; {layer!r} gives {tuple(cam.shape)}")
    cam = LayerAttribution.interpolate(cam, tuple(images.shape[-2:]), "bilinear")
    return _reduce(cam, reduce)


def _occlusion(model, images, targets, *, window=4, stride=None, baseline="zero", score="logit", batch_size=16,
               blur_sigma=None, reduce="mean"):
    """Occlusion (captum): a window × window patch over all channels is replaced by the baseline and
    each pixel gets the mean drop f(x) − f(x_occluded) of the windows covering it (captum truncates
    windows at the border, so every pixel is covered). `stride` defaults to `window`; `score` "logit" or "softmax" (Vandersmissen);
    `batch_size` is captum's perturbations_per_eval."""
    model = _require_model(model, "occlusion")
    channels, height, width = images.shape[1:]
    window_h, window_w = _pair(window, "window")
    stride_h, stride_w = _pair(window if stride is None else stride, "stride")
    if window_h > height or window_w > width:
        raise ValueError(f"window {(window_h, window_w)} is larger than the image {(height, width)}")
    attributions = Occlusion(_scored(model, score)).attribute(
        images, sliding_window_shapes=(channels, window_h, window_w), strides=(channels, stride_h, stride_w),
        baselines=_baseline(images, baseline, blur_sigma), target=targets,
        perturbations_per_eval=_positive_int(batch_size, "batch_size"))
    return _reduce(attributions, reduce)


# --------------------------------------------------------------------------- LRP and Deep Taylor (zennit)
#
# zennit registers one rule per layer as backward hooks; `_lrp` puts them on the model, computes the
# modified gradient of the target logit (the relevance starts as the logit itself, so with zero biases
# Σ map = logit_t), and takes every hook and canonizer off again in a `finally`. Rules by layer type:
#
#   Conv/Linear            the method's rule (ε, z⁺ = α1β0; Deep Taylor: zB on the first one, z⁺ elsewhere)
#   BatchNorm after a      merged into that layer (weights and bias rescaled) and made the identity, which
#     Conv/Linear          passes relevance unchanged (zennit's SequentialMergeBatchNorm, with ε = 0)
#   other BatchNorm        (MiniVGG's Conv–ReLU–BN) rewritten as the affine map it computes in eval mode and
#                          given the method's rule, like any layer with a weight and a bias (`_AffineBatchNorm`)
#   residual sum           torchvision BasicBlock/Bottleneck (torchvision ResNets, SmallResNet18, ResNetLike)
#                          get zennit's canonizers: the `identity + out` becomes a Sum module, which splits
#                          the relevance in proportion to the two terms (Norm rule)
#   AvgPool / Adaptive…    Norm (the ε rule without parameters, ε = 1e-6)
#   activations            Pass (the relevance goes through unchanged)
#   input normaliser       Pass: a parameter-free module with `mean` and `std` tensors (e.g. tomsett2020's
#                          Standardise in front of the CIFAR MiniVGG) is part of the input, not a layer
#   MaxPool, Dropout,      the plain gradient (max pooling sends the relevance to the maximum; the others
#     Flatten, Identity      are the identity in eval mode)

class _ExactMergeBatchNorm(SequentialMergeBatchNorm):
    """zennit's SequentialMergeBatchNorm (a BatchNorm right after a Conv/Linear, in module order, is folded
    into that layer and left computing x / √(1 + ε)), and also ε = 0 while merged, so that the left-over
    BatchNorm is exactly the identity; `remove` restores ε with the tensors."""

    def register(self, linears, batch_norm):
        self.eps = batch_norm.eps
        super().register(linears, batch_norm)
        batch_norm.eps = 0.0

    def remove(self):
        super().remove()
        self.batch_norm.eps = self.eps


class _AffineBatchNorm(Canonizer):
    """A BatchNorm that follows no Conv/Linear layer (MiniVGG's Conv–ReLU–BN order) cannot be merged into
    one. In eval mode it is the elementwise affine map y = a·x + b with a = γ/√(σ² + ε) and b = β − μ·a:
    this canonizer writes a and b into its weight and bias and sets μ = 0, σ² = 1, ε = 0 (same output),
    so that the ε / z⁺ rules see the map's own weight and bias; `remove` puts the original tensors and ε
    back. `modules` lists the BatchNorms it rewrote (they get the method's rule; merged ones get Pass)."""

    def __init__(self, modules: list | None = None):
        self.modules = [] if modules is None else modules
        self.batch_norm, self.saved = None, None

    def apply(self, root_module):
        instances, previous = [], None
        for leaf in collect_leaves(root_module):
            if isinstance(leaf, ZennitBatchNorm) and not isinstance(previous, ZennitLinear):
                instance = _AffineBatchNorm(self.modules)
                instance.register(leaf)
                instances.append(instance)
            previous = leaf
        return instances

    def register(self, batch_norm):
        self.batch_norm = batch_norm
        self.saved = {key: getattr(batch_norm, key).data for key in ("weight", "bias", "running_mean", "running_var")}
        self.saved["eps"] = batch_norm.eps
        scale = batch_norm.weight.data / (batch_norm.running_var.data + batch_norm.eps).sqrt()
        batch_norm.bias.data = batch_norm.bias.data - batch_norm.running_mean.data * scale
        batch_norm.weight.data = scale
        batch_norm.running_mean.data = torch.zeros_like(batch_norm.running_mean.data)
        batch_norm.running_var.data = torch.ones_like(batch_norm.running_var.data)
        batch_norm.eps = 0.0
        self.modules.append(batch_norm)

    def remove(self):
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(self.batch_norm, key).data = self.saved[key]
        self.batch_norm.eps = self.saved["eps"]
        self.modules.remove(self.batch_norm)

    def copy(self):
        return _AffineBatchNorm(self.modules)


def _is_normaliser(module: nn.Module) -> bool:
    return (not any(True for _ in module.parameters(recurse=False)) and not any(True for _ in module.children())
            and isinstance(getattr(module, "mean", None), torch.Tensor)
            and isinstance(getattr(module, "std", None), torch.Tensor))


def _lrp_layers(model: nn.Module) -> list[nn.Module]:
    """The layers that get the method's rule (Conv/Linear and BatchNorm), in module order, or ValueError
    for a model the LRP methods cannot explain (no Conv/Linear layer, a BatchNorm without affine
    parameters or running statistics)."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, ZennitBatchNorm):
            if module.weight is None or module.bias is None:
                raise ValueError(f"LRP needs BatchNorm layers with affine parameters; layer {name!r} has affine=False")
            if module.running_mean is None or module.running_var is None:
                raise ValueError(f"LRP needs BatchNorm layers with running statistics; layer {name!r} has "
                                 "track_running_stats=False (it normalises with batch statistics even in eval mode)")
            layers.append(module)
        elif isinstance(module, (ZennitConvolution, nn.Linear)):
            layers.append(module)
    if not any(isinstance(layer, (ZennitConvolution, nn.Linear)) for layer in layers):
        raise ValueError(f"LRP needs a model with Conv or Linear layers; {type(model).__name__} has none")
    return layers


def _bound(value, name: str) -> torch.Tensor:
    """`low` / `high` of Deep Taylor: a number, one number per channel, or a tensor broadcastable to the
    first layer's input; returned as a float tensor ((1, C, 1, 1) for a per-channel sequence)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, a per-channel sequence or a tensor, got a bool")
    if isinstance(value, (int, float, np.integer, np.floating)):
        tensor = torch.tensor(float(value))
    elif isinstance(value, (list, tuple, np.ndarray)):
        try:
            tensor = torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=torch.float32)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} must hold numbers, got {value!r}") from error
        if tensor.ndim != 1 or tensor.numel() == 0:
            raise ValueError(f"{name} as a sequence must be one number per channel, got shape {tuple(tensor.shape)}")
        tensor = tensor.view(1, -1, 1, 1)
    elif isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)) or value.numel() == 0:
            raise ValueError(f"{name} must be a non-empty real tensor, got dtype {value.dtype}")
        tensor = value.detach().float()
    else:
        raise ValueError(f"{name} must be a number, a per-channel sequence or a tensor, got {type(value).__name__}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must be finite, got {value!r}")
    return tensor


def _lrp(model, images, targets, rule: Callable[[], object], reduce, first_rule: Callable[[], object] | None = None,
         first_check: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Relevance of the target logits under `rule` (and `first_rule` on the first Conv/Linear in module
    order), with the canonizers above; hooks and canonizers are removed afterwards, also on errors."""
    _lrp_layers(model)
    _reduce(images[:0], reduce)  # bad `reduce` fails before any work
    affine = []
    first = {}

    def module_map(ctx, name, module):
        if isinstance(module, ZennitBatchNorm):
            return rule() if any(module is bn for bn in affine) else Pass()
        if isinstance(module, Activation) or _is_normaliser(module):
            return Pass()
        if isinstance(module, (Sum, AvgPool)):
            return Norm(stabilizer=1e-6)
        if isinstance(module, (ZennitConvolution, nn.Linear)):
            if first_rule is not None and not first:
                first.update(name=name, module=module)
                return first_rule()
            return rule()
        return None

    canonizers = [_ExactMergeBatchNorm(), ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer(),
                  _AffineBatchNorm(affine)]
    composite = Composite(module_map=module_map, canonizers=canonizers)
    calls: dict[nn.Module, int] = {}
    handles = []
    try:
        composite.register(model)
        for name, module in model.named_modules():
            if isinstance(module, (ZennitConvolution, nn.Linear)) or any(module is bn for bn in affine):
                def count(module, args, name=name):
                    calls[module] = calls.get(module, 0) + 1
                    if calls[module] > 1:
                        raise ValueError(f"LRP: layer {name!r} is called more than once in a forward pass; a rule "
                                         "stores one input per layer, so shared layers are not supported")
                handles.append(module.register_forward_pre_hook(count))
        if first_check is not None and first:
            handles.append(first["module"].register_forward_pre_hook(
                lambda _module, args: first_check(first["name"], args[0])))
        output = model(images)
        if output.ndim != 2 or output.shape[0] != images.shape[0]:
            raise ValueError(f"LRP needs a model output of shape (B, classes), got {tuple(output.shape)}")
        if targets is None:
            targets = output.argmax(dim=1)
        start = torch.zeros_like(output).scatter_(1, targets[:, None], output.gather(1, targets[:, None]).detach())
        (relevance,) = torch.autograd.grad(output, images, grad_outputs=start)
    finally:
        for handle in handles:
            handle.remove()
        composite.remove()
    return _reduce(relevance, reduce)


def _lrp_epsilon(model, images, targets, *, epsilon=1e-6, reduce="sum"):
    """ε-LRP (zennit Epsilon(ε) on every Conv/Linear layer and unmerged BatchNorm; see the table above
    for the other layers and the canonizers).

    Works on torchvision VGG (with or without BatchNorm) and ResNet (BasicBlock / Bottleneck) models and
    on the study's own models: SmallCNN, MiniVGG (BatchNorm after ReLU), SmallResNet18, VGGLike,
    ResNetLike, also behind a parameter-free normaliser with `mean`/`std` tensors. ValueError for a model
    with no Conv/Linear layer, BatchNorm without affine parameters or running statistics, or a layer
    called twice in one forward. Relevance is conserved up to what biases and ε absorb: with zero
    biases Σ map ≈ logit_t. A residual addition written as `a + b` in a custom forward (not a
    torchvision block) is differentiated, not split: both terms receive the whole relevance.
    """
    epsilon = _positive_float(epsilon, "epsilon")
    return _lrp(_require_model(model, "lrp_epsilon"), images, targets, lambda: Epsilon(epsilon=epsilon), reduce)


def _lrp_alpha1beta0(model, images, targets, *, reduce="sum"):
    """LRP-α1β0 = z⁺ (zennit ZPlus: positive contributions x⁺·w⁺ + x⁻·w⁻ only, stabiliser 1e-6) on every
    Conv/Linear layer and unmerged BatchNorm, including the first layer; same models and canonizers as
    `lrp_epsilon`. Relevance is conserved where every layer's positive contributions are non-zero and
    the biases are zero (a positive bias joins the denominator and absorbs its share)."""
    return _lrp(_require_model(model, "lrp_alpha1beta0"), images, targets, lambda: ZPlus(stabilizer=1e-6), reduce)


def _deep_taylor(model, images, targets, *, low=0.0, high=1.0, reduce="sum"):
    """Deep Taylor decomposition (Montavon et al. 2017): the zB rule (zennit ZBox) on the first Conv/Linear
    layer in module order, z⁺ on every other Conv/Linear and unmerged BatchNorm; canonizers and the
    other layers as `lrp_epsilon`.

    `low` / `high`: the lowest and highest values the first layer's input can take — a number, one
    number per channel, or a tensor broadcastable to that input. Defaults 0 and 1 suit [0, 1] pixels;
    for standardised images pass (0 − mean)/std and (1 − mean)/std per channel. A model that
    standardises inside (a normaliser module in front) still needs the bounds of the standardised
    input, which is what the first layer sees. ValueError if low ≥ high anywhere or if the first
    layer's input leaves [low, high] (beyond a 1e-5 relative tolerance).
    """
    low_t, high_t = _bound(low, "low"), _bound(high, "high")
    try:
        torch.broadcast_shapes(low_t.shape, high_t.shape)
    except RuntimeError as error:
        raise ValueError(f"low and high must broadcast together, got shapes {tuple(low_t.shape)} and "
                         f"{tuple(high_t.shape)}") from error
    if not (low_t < high_t).all():
        raise ValueError(f"low must be below high everywhere, got low={low!r}, high={high!r}")

    def check(name, x):
        try:
            lo = low_t.to(x).expand_as(x) if low_t.ndim else low_t.to(x)
            hi = high_t.to(x).expand_as(x) if high_t.ndim else high_t.to(x)
        except RuntimeError as error:
            raise ValueError(f"deep_taylor: low/high of shapes {tuple(low_t.shape)}, {tuple(high_t.shape)} do not "
                             f"broadcast to the input of the first layer {name!r}, {tuple(x.shape)}") from error
        x = x.detach()
        tolerance = 1e-5 * max(1.0, float(low_t.abs().max()), float(high_t.abs().max()))
        if bool((x < lo - tolerance).any() or (x > hi + tolerance).any()):
            raise ValueError(f"deep_taylor: the input of the first layer {name!r} spans [{float(x.min()):.4g}, "
                             f"{float(x.max()):.4g}], outside [low, high]; pass low/high = that input's range "
                             "(0 and 1 for [0, 1] pixels, (0 − mean)/std and (1 − mean)/std per channel for "
                             "standardised images)")

    return _lrp(_require_model(model, "deep_taylor"), images, targets, lambda: ZPlus(stabilizer=1e-6), reduce,
                first_rule=lambda: ZBox(low=low_t, high=high_t, stabilizer=1e-6), first_check=check)


# --------------------------------------------------------------------------- RISE

def rise_masks(n_masks: int, grid: int, p: float, size: tuple[int, int], seed: int = 0,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(n_masks, H, W) RISE masks (Petsiuk et al. 2018): a grid × grid binary grid with keep
    probability p, bilinearly upsampled to (grid + 1) · cell with cell = ceil(side / grid), then
    cropped to H × W at a random shift in [0, cell) per axis. Drawn on the CPU from a
    torch.Generator seeded with `seed`, so the masks depend only on the arguments."""
    n_masks, grid = _positive_int(n_masks, "n_masks"), _positive_int(grid, "grid")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ValueError(f"p must be a keep probability in (0, 1], got {p!r}")
    height, width = _pair(size, "size")
    generator = torch.Generator().manual_seed(_seed(seed))
    cell_h, cell_w = math.ceil(height / grid), math.ceil(width / grid)
    coarse = (torch.rand(n_masks, 1, grid, grid, generator=generator) < p).float()
    upsampled = F.interpolate(coarse, size=((grid + 1) * cell_h, (grid + 1) * cell_w), mode="bilinear",
                              align_corners=False)[:, 0]
    shift_y = torch.randint(0, cell_h, (n_masks,), generator=generator)
    shift_x = torch.randint(0, cell_w, (n_masks,), generator=generator)
    rows = (shift_y[:, None] + torch.arange(height))[:, :, None]
    cols = (shift_x[:, None] + torch.arange(width))[:, None, :]
    masks = upsampled[torch.arange(n_masks)[:, None, None], rows, cols].clamp(0, 1)
    return masks.to(device)


def _rise(model, images, targets, *, n_masks=1000, grid=7, p=0.1, batch_size=256, seed=0, score="softmax",
          reduce="sum"):
    """RISE: saliency = Σ_i score_t(x ⊙ M_i) · M_i / (N · p), with the masks of `rise_masks`
    (shared by all images; defaults are Vandersmissen §5.3: 1,000 masks, 7 × 7, p = 0.1).
    The (image, mask) pairs are flattened and pushed through the model `batch_size` at a time."""
    model = _require_model(model, "rise")
    scorer = _scored(model, score)
    batch_size = _positive_int(batch_size, "batch_size")
    n_images, _, height, width = images.shape
    masks = rise_masks(n_masks, grid, p, (height, width), seed, images.device).to(images.dtype)
    n_masks = masks.shape[0]
    saliency = torch.zeros(n_images, height * width, dtype=images.dtype, device=images.device)
    flat_masks = masks.reshape(n_masks, -1)
    with torch.no_grad():
        for start in range(0, n_images * n_masks, batch_size):
            pair = torch.arange(start, min(start + batch_size, n_images * n_masks), device=images.device)
            image_index, mask_index = pair // n_masks, pair % n_masks
            outputs = scorer(images[image_index] * masks[mask_index, None])
            scores = outputs.gather(1, targets[image_index, None])
            saliency.index_add_(0, image_index, scores * flat_masks[mask_index])
    saliency = saliency / (n_masks * p)
    return _reduce(saliency.reshape(n_images, 1, height, width), reduce)


# --------------------------------------------------------------------------- controls

def _random(model, images, targets, *, seed=0, first_index=0, reduce="sum"):
    """U(0, 1) per pixel. Image j of the batch uses numpy's default_rng([seed, first_index + j]),
    so its map depends only on the seed and its index, not on the rest of the batch."""
    seed, first_index = _seed(seed), _seed(first_index, "first_index")
    n_images, _, height, width = images.shape
    maps = np.stack([np.random.default_rng([seed, first_index + j]).random((1, height, width), dtype=np.float32)
                     for j in range(n_images)])
    return _reduce(torch.from_numpy(maps).to(images.device), reduce)


_SOBEL_X = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])


def _sobel(model, images, targets, *, reduce="sum"):
    """Sobel gradient magnitude √(Gx² + Gy²) of the grey-scale image (unweighted channel mean),
    3 × 3 kernels with replicate padding. The top-left grey value is subtracted first (the
    gradient does not change), so a constant image gives exactly 0 everywhere."""
    grey = images.mean(dim=1, keepdim=True)
    grey = F.pad(grey - grey[:, :, :1, :1], (1, 1, 1, 1), mode="replicate")
    kernels = torch.stack([_SOBEL_X, _SOBEL_X.T])[:, None].to(images)
    gradients = F.conv2d(grey, kernels)
    return _reduce(gradients.pow(2).sum(dim=1, keepdim=True).sqrt(), reduce)


def _constant(model, images, targets, *, value=1.0, reduce="sum"):
    """Every pixel = `value`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"value must be a finite number, got {value!r}")
    n_images, _, height, width = images.shape
    return _reduce(torch.full((n_images, 1, height, width), float(value), device=images.device), reduce)


def _centre_gaussian(model, images, targets, *, sigma=0.25, reduce="sum"):
    """exp(−r² / 2s²) around the image centre ((H−1)/2, (W−1)/2), s = sigma × the shorter side; peak 1."""
    n_images, _, height, width = images.shape
    spread = _positive_float(sigma, "sigma") * min(height, width)
    y = torch.arange(height, device=images.device, dtype=torch.float32) - (height - 1) / 2
    x = torch.arange(width, device=images.device, dtype=torch.float32) - (width - 1) / 2
    bump = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * spread**2))
    return _reduce(bump.expand(n_images, 1, height, width).contiguous(), reduce)


def boxes_to_masks(boxes: Sequence, height: int, width: int, classes: Sequence[int] | None = None) -> torch.Tensor:
    """(B, 1, H, W) float map, 1 inside the union of each image's boxes.

    `boxes[b]` is an (n, 5) array or tensor of [cls, x0, y0, x1, y1] in pixel coordinates,
    end-exclusive (as `study.plots`), rasterised by `study.metrics.rasterise_boxes` (fractional
    coordinates widened outwards, clipped to the image). With `classes`, only the boxes whose cls
    equals classes[b] are drawn.
    """
    if isinstance(boxes, (torch.Tensor, np.ndarray)) and np.ndim(boxes) != 3:
        raise ValueError("boxes must be a list with one (n, 5) array per image")
    masks = torch.zeros(len(boxes), 1, height, width)
    for b, image_boxes in enumerate(boxes):
        array = np.asarray(image_boxes.cpu() if isinstance(image_boxes, torch.Tensor) else image_boxes, dtype=np.float64)
        if array.size == 0:
            continue
        if array.ndim != 2 or array.shape[1] != 5:
            raise ValueError(f"boxes[{b}] must have shape (n, 5) [cls, x0, y0, x1, y1], got {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"boxes[{b}] contains NaN or Inf")
        if classes is not None:
            array = array[array[:, 0].astype(np.int64) == int(classes[b])]
        masks[b, 0] = torch.from_numpy(rasterise_boxes(array[:, 1:], height, width))
    return masks


def _ground_truth(model, images, targets, *, masks=None, boxes=None, match_target=False, reduce="sum"):
    """The reference map: `masks` ((B, 1, H, W) or (B, H, W), any dtype; returned as float) or the
    filled union of `boxes` (see `boxes_to_masks`; with match_target=True only the boxes of the
    target class). Exactly one of the two must be given."""
    n_images, _, height, width = images.shape
    if (masks is None) == (boxes is None):
        raise ValueError("ground_truth needs exactly one of the options masks= or boxes=")
    if masks is not None:
        masks = torch.as_tensor(masks)
        if masks.ndim == 3:
            masks = masks[:, None]
        if masks.shape != (n_images, 1, height, width):
            raise ValueError(f"masks must have shape ({n_images}, 1, {height}, {width}), got {tuple(masks.shape)}")
        maps = masks.to(device=images.device, dtype=torch.float32)
    else:
        if len(boxes) != n_images:
            raise ValueError(f"boxes must hold one (n, 5) array per image ({n_images}), got {len(boxes)}")
        if match_target and targets is None:
            raise ValueError("match_target=True needs targets")
        classes = targets.tolist() if match_target else None
        maps = boxes_to_masks(boxes, height, width, classes).to(images.device)
    if not torch.isfinite(maps).all():
        raise ValueError("masks contain NaN or Inf values")
    return _reduce(maps, reduce)


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "gradient": _gradient,
    "input_x_gradient": _input_x_gradient,
    "integrated_gradients": _integrated_gradients,
    "smoothgrad": _smoothgrad,
    "guided_backprop": _guided_backprop,
    "deeplift": _deeplift,
    "gradcam": _gradcam,
    "occlusion": _occlusion,
    "lrp_epsilon": _lrp_epsilon,
    "lrp_alpha1beta0": _lrp_alpha1beta0,
    "deep_taylor": _deep_taylor,
    "rise": _rise,
    "random": _random,
    "sobel": _sobel,
    "constant": _constant,
    "centre_gaussian": _centre_gaussian,
    "ground_truth": _ground_truth,
}
CONTROLS = ("random", "sobel", "constant", "centre_gaussian", "ground_truth")


def explain(model: nn.Module | None, images: torch.Tensor, targets, method: str, **options) -> torch.Tensor:
    """The `method` map of `images` for `targets`: (B, 1, H, W) float32 on the images' device
    ((B, C, H, W) with reduce=None). Options are the keyword parameters of `METHODS[method]`
    (see each function's docstring); unknown names, bad values, NaN/Inf images or maps and
    mismatched or out-of-range targets raise ValueError. Images are cast to the device and dtype
    of the model's parameters (e.g. float64 images on a float32 model), as the metrics do."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    function = METHODS[method]
    _check_options(method, function, options, skip=3)
    if "reduce" in options:
        _choice(options["reduce"], REDUCTIONS, "reduce")
    images = _check_images(images).detach()
    if method in CONTROLS:
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        model = None
    else:
        _require_model(model, method)
    home = images.device
    if model is not None:
        parameter = next(iter(model.parameters()), None)
        if parameter is not None and parameter.is_floating_point():
            # images meet the model on its device and dtype (e.g. float64 CPU images, float32 CUDA model), as the
            # metrics do; the maps come back where the images were
            images = images.to(device=parameter.device, dtype=parameter.dtype)
    with _frozen_eval(model), torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*Setting (forward, )?backward hooks", category=UserWarning)
        targets = _as_targets(targets, model, images)
        if model is not None and targets is not None:
            with torch.no_grad():
                output = model(images[:1])
            if output.ndim == 2 and int(targets.max()) >= output.shape[1]:
                raise ValueError(f"targets must be class indices below the model's {output.shape[1]} outputs, "
                                 f"got {int(targets.max())}")
        if model is not None:
            images = images.requires_grad_(True)  # a detached copy; saves captum's "did not require grad" warning
        maps = function(model, images, targets, **options)
    channels = (1, images.shape[1]) if "reduce" in options and options["reduce"] is None else (1,)
    if maps.ndim != 4 or maps.shape[1] not in channels or maps.shape[0] != images.shape[0] or maps.shape[2:] != images.shape[2:]:
        raise ValueError(f"method {method!r} returned shape {tuple(maps.shape)} for images {tuple(images.shape)}")
    if not torch.isfinite(maps).all():
        raise ValueError(f"method {method!r} produced NaN/Inf maps")
    return maps.detach().to(dtype=torch.float32, device=home)


def _slice_options(function: Callable, options: dict, start: int, stop: int, total: int) -> dict:
    """Per-image options cut to the images [start, stop): masks, boxes, (B, ...) baselines, first_index."""
    sliced = dict(options)
    for key in ("masks", "boxes"):
        if sliced.get(key) is not None:
            if len(sliced[key]) != total:
                raise ValueError(f"option {key} must hold one entry per image ({total}), got {len(sliced[key])}")
            sliced[key] = sliced[key][start:stop]
    baseline = sliced.get("baseline")
    if isinstance(baseline, torch.Tensor) and baseline.ndim == 4 and baseline.shape[0] == total:
        sliced["baseline"] = baseline[start:stop]
    if "first_index" in inspect.signature(function).parameters:
        sliced["first_index"] = sliced.get("first_index", 0) + start
    return sliced


def explain_many(model: nn.Module | None, images: torch.Tensor, targets, methods: Sequence[str] | Mapping[str, dict],
                 batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """{name: explain(...)} for several methods (a list of names, or {name: options}), computed
    `batch_size` images at a time (default: all at once). Per-image options (masks, boxes,
    (B, C, H, W) baselines) are sliced with the batch, and `random` gets the global image index,
    so the maps do not depend on batch_size (except SmoothGrad's noise)."""
    if isinstance(methods, Mapping):
        plan = {name: dict(options or {}) for name, options in methods.items()}
    elif isinstance(methods, Sequence) and not isinstance(methods, str):
        plan = {name: {} for name in methods}
    else:
        raise ValueError(f"methods must be a list of names or a dict name -> options, got {type(methods).__name__}")
    for name, options in plan.items():
        if not isinstance(name, str) or name not in METHODS:
            raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
        _check_options(name, METHODS[name], options, skip=3)
    images = _check_images(images)
    total = images.shape[0]
    batch_size = total if batch_size is None else _positive_int(batch_size, "batch_size")
    if isinstance(targets, (torch.Tensor, np.ndarray, list, tuple)):
        targets = _as_targets(targets, None, images)
    results = {}
    for name, options in tqdm(plan.items(), desc="attribution methods", disable=not progress_enabled() or len(plan) < 2,
                              leave=False):
        chunks = []
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            chunk_targets = targets[start:stop] if isinstance(targets, torch.Tensor) else targets
            chunk_options = _slice_options(METHODS[name], options, start, stop, total)
            chunks.append(explain(model, images[start:stop], chunk_targets, name, **chunk_options))
        results[name] = torch.cat(chunks)
    return results


# --------------------------------------------------------------------------- post-processing

def absolute(maps: torch.Tensor) -> torch.Tensor:
    """|maps|."""
    return _check_maps(maps).abs()


def positive_part(maps: torch.Tensor) -> torch.Tensor:
    """max(maps, 0) (the ReLU of Vandersmissen's and Rao's pipelines)."""
    return _check_maps(maps).clamp(min=0)


def reduce_channels(maps: torch.Tensor, how="sum") -> torch.Tensor:
    """(B, C, H, W) → (B, 1, H, W): "sum" | "mean" | "max_abs" (max_C |a|) | "abs_sum" (Σ_C |a|);
    None returns the maps unchanged."""
    return _reduce(_check_maps(maps), how)


def _per_map(maps: torch.Tensor) -> torch.Tensor:
    """(B, C·H·W) view: every statistic below is taken per image over all its channels and pixels."""
    return maps.reshape(maps.shape[0], -1)


def normalise_minmax(maps: torch.Tensor) -> torch.Tensor:
    """(m − min) / (max − min) per image (over C, H, W). A constant map becomes all zeros
    (Vandersmissen §5.3's project choice)."""
    flat = _per_map(_check_maps(maps))
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    spread = high - low
    scaled = torch.where(spread > 0, (flat - low) / torch.where(spread > 0, spread, 1), torch.zeros_like(flat))
    return scaled.reshape(maps.shape)


def normalise_max_abs(maps: torch.Tensor) -> torch.Tensor:
    """m / max|m| per image (Rao's Â); an all-zero map stays zero."""
    flat = _per_map(_check_maps(maps))
    peak = flat.abs().amax(dim=1, keepdim=True)
    return (flat / torch.where(peak > 0, peak, 1)).reshape(maps.shape)


def gaussian_blur(maps: torch.Tensor, sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """Gaussian blur of every channel (`torchvision.transforms.functional.gaussian_blur`: kernel
    normalised to sum 1, reflect padding).
    kernel_size (odd) defaults to 2·ceil(3σ) + 1, shrunk to the largest odd size that reflect
    padding allows (≤ 2·min(H, W) − 1); a larger explicit size raises ValueError."""
    maps = _check_maps(maps)
    sigma = _positive_float(sigma, "sigma")
    limit = 2 * min(maps.shape[-2:]) - 1
    if kernel_size is None:
        kernel_size = min(2 * math.ceil(3 * sigma) + 1, limit)
    elif _positive_int(kernel_size, "kernel_size") % 2 == 0 or kernel_size > limit:
        raise ValueError(f"kernel_size must be odd and ≤ {limit} for {tuple(maps.shape[-2:])} maps, got {kernel_size}")
    return TF.gaussian_blur(maps, kernel_size=[kernel_size, kernel_size], sigma=[sigma, sigma])


def clip_percentile(maps: torch.Tensor, q: float) -> torch.Tensor:
    """Values above the q-th percentile of each image's map (over C, H, W; linear interpolation as
    numpy.percentile) are set to that percentile."""
    maps = _check_maps(maps)
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 100:
        raise ValueError(f"q must be a percentile in [0, 100], got {q!r}")
    flat = _per_map(maps)
    threshold = torch.quantile(flat, q / 100, dim=1, keepdim=True)
    return torch.minimum(flat, threshold).reshape(maps.shape)


def binarise_top_k(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 for the k = floor(fraction · N + 1/2) highest values of each image's map (N = C·H·W;
    at least 1 when fraction > 0), 0 elsewhere. Ties are broken by raster order (stable sort,
    earlier pixels first), so exactly k ones per map."""
    maps = _check_maps(maps)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    flat = _per_map(maps)
    count = flat.shape[1]
    k = min(count, math.floor(fraction * count + 0.5))
    if fraction > 0:
        k = max(k, 1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
    binary = torch.zeros_like(flat).scatter_(1, order, 1.0)
    return binary.reshape(maps.shape)


POSTPROCESSORS: dict[str, Callable[..., torch.Tensor]] = {
    "absolute": absolute,
    "positive_part": positive_part,
    "reduce_channels": reduce_channels,
    "normalise_minmax": normalise_minmax,
    "normalise_max_abs": normalise_max_abs,
    "gaussian_blur": gaussian_blur,
    "clip_percentile": clip_percentile,
    "binarise_top_k": binarise_top_k,
}


def postprocess(maps: torch.Tensor, steps: Sequence[str | tuple[str, dict]]) -> torch.Tensor:
    """Apply the named steps in order, e.g.
    `postprocess(m, ["positive_part", ("reduce_channels", {"how": "mean"}), "normalise_minmax"])`."""
    maps = _check_maps(maps)
    if isinstance(steps, str) or not isinstance(steps, Sequence):
        raise ValueError(f"steps must be a list of names or (name, options) pairs, got {steps!r}")
    for step in steps:
        if isinstance(step, str):
            name, options = step, {}
        elif isinstance(step, (tuple, list)) and len(step) == 2 and isinstance(step[1], Mapping):
            name, options = step
        else:
            raise ValueError(f"a step must be a name or a (name, options dict) pair, got {step!r}")
        if name not in POSTPROCESSORS:
            raise ValueError(f"unknown post-processing step {name!r}; known: {sorted(POSTPROCESSORS)}")
        _check_options(name, POSTPROCESSORS[name], options, skip=1)
        maps = POSTPROCESSORS[name](maps, **options)
    return maps


_VANDERSMISSEN = ["positive_part", ("reduce_channels", {"how": "mean"}), "normalise_minmax"]
_RENORMALISE = ["positive_part", "normalise_minmax"]

PAPER_POSTPROCESSING: dict[str, list] = {
    # vandersmissen2024.md §2 E1 / §5.3: ReLU → channel mean → min–max (apply to reduce=None maps).
    "vandersmissen2024": _VANDERSMISSEN,
    # vandersmissen2024.md §5.3 extra maps + Q8: after blur / clip, ReLU + min–max once more.
    "vandersmissen2024_blur": [*_VANDERSMISSEN, ("gaussian_blur", {"sigma": 5 * 64 / 224, "kernel_size": 5}), *_RENORMALISE],
    "vandersmissen2024_clip": [*_VANDERSMISSEN, ("clip_percentile", {"q": 99}), *_RENORMALISE],
    "vandersmissen2024_binarised": [*_VANDERSMISSEN, ("binarise_top_k", {"fraction": 0.1})],
    # viviano2021.md "Saliency-alignment evaluation": grad and IG |·| then blur σ = 1; occlusion |·| only.
    "viviano2021_grad": ["absolute", ("gaussian_blur", {"sigma": 1.0})],
    "viviano2021_integrated_gradients": ["absolute", ("gaussian_blur", {"sigma": 1.0})],
    "viviano2021_occlusion": ["absolute"],
    # rao2023.md §2.0 post-processing order: clamp at 0, then divide by the per-image max.
    "rao2023": ["positive_part", "normalise_max_abs"],
    # rao2023.md IoU metric [code]: clamp at 0, min–max per map (then threshold 0.5 in the metric).
    "rao2023_iou": ["positive_part", "normalise_minmax"],
    # tomsett2020.md §5.3: no post-processing beyond each method's default channel reduction.
    "tomsett2020": [],
}
