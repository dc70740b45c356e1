"""LRP and Deep Taylor through zennit (study.attribution: lrp_epsilon, lrp_alpha1beta0, deep_taylor):
conservation on bias-free models (also through merged BatchNorm and ResNet blocks), agreement with
captum's LRP where both apply, torchvision VGG/ResNet and the study's own models, the model left
exactly as it was, and ValueError on bad options. Tiny models and images, one thread."""

import pytest
import torch
from captum.attr import LRP
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule
from torch import nn

import study  # noqa: F401  (before torchvision)
import torchvision
from study import attribution as A
from study.models import MiniVGG, SmallCNN, SmallResNet18

LRP_METHODS = ("lrp_epsilon", "lrp_alpha1beta0", "deep_taylor")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def plain_cnn(seed=0, positive_head=False):
    """Bias-free Conv–ReLU–MaxPool–Conv–ReLU–AvgPool–Flatten–Linear on (2, 8, 8) images, 3 classes; the
    default init × 3, so that logits are O(1) and the rules' 1e-6 stabilisers stay small beside them."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(6 * 2 * 2, 3, bias=False)).eval()
    with torch.no_grad():
        for layer in (model[0], model[3], model[-1]):
            layer.weight.mul_(3.0)
        if positive_head:
            model[-1].weight.abs_()
    return model


def logits_of(model, images, targets):
    with torch.no_grad():
        return model(images).gather(1, targets[:, None])[:, 0]


def snapshot(model):
    """Everything `explain` must leave as it was: tensors, parameter objects and flags, modes, modules, hooks."""
    return {
        "state": {key: value.clone() for key, value in model.state_dict().items()},
        "parameters": [(name, id(p), p.requires_grad, p.shape) for name, p in model.named_parameters()],
        "modules": [(name, type(m), m.training, getattr(m, "eps", None)) for name, m in model.named_modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                     for m in model.modules()),
        "forward": [name for name, m in model.named_modules() if "forward" in vars(m)],
    }


def assert_unchanged(model, before, images, output_before):
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key in before["state"]:
        assert torch.equal(after["state"][key], before["state"][key]), key
    for key in ("parameters", "modules", "hooks", "forward"):
        assert after[key] == before[key], key
    with torch.no_grad():
        assert torch.equal(model(images), output_before)


# ----------------------------------------------------------------------------- (1) conservation


def test_lrp_epsilon_conserves_the_logit_on_a_bias_free_cnn():
    model = plain_cnn()
    images, targets = torch.rand(3, 2, 8, 8), torch.tensor([0, 1, 2])
    maps = A.explain(model, images, targets, "lrp_epsilon", epsilon=1e-9)
    # float32 rounding and the AvgPool's Norm stabiliser (1e-6): 1e-4 relative + 1e-6 absolute
    # (observed |Σ − logit| ≤ 1.3e-6 on logits from −1.3e-3 to 0.21)
    assert torch.allclose(maps.sum(dim=(1, 2, 3)), logits_of(model, images, targets), rtol=1e-4, atol=1e-6)


def test_lrp_alpha1beta0_and_deep_taylor_conserve_a_positive_logit_on_a_bias_free_relu_cnn():
    model = plain_cnn(positive_head=True)
    images = torch.rand(4, 2, 8, 8)  # ≥ 0, so x⁺·w⁺ > 0 for every active unit and the head output is > 0
    with torch.no_grad():
        targets = model(images).argmax(dim=1)
    logits = logits_of(model, images, targets)
    assert (logits > 0).all()
    for method in ("lrp_alpha1beta0", "deep_taylor"):  # deep_taylor: zB with [0, 1] bounds conserves as well
        maps = A.explain(model, images, targets, method)
        # the stabiliser 1e-6 in each denominator: 1e-4 relative (observed ~1.3e-5)
        assert torch.allclose(maps.sum(dim=(1, 2, 3)), logits, rtol=1e-4), method
        if method == "lrp_alpha1beta0":
            assert (maps >= -1e-7).all()  # z⁺ with non-negative inputs: non-negative relevance


# ----------------------------------------------------------------------------- (2) agreement with captum


def captum_lrp(model, images, targets, rule):
    """captum's LRP with `rule` on Conv/Linear, EpsilonRule(1e-6) on average pooling (zennit's Norm rule)
    and EpsilonRule(1e-12) on max pooling and Flatten: captum's ε rule on a max pool gives the maximum
    R·x/(x + ε), zennit's gradient gives it R, so only a vanishing ε makes the two the same rule."""
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            layer.rule = rule()
        elif isinstance(layer, nn.AvgPool2d):
            layer.rule = EpsilonRule(1e-6)
        elif isinstance(layer, (nn.MaxPool2d, nn.Flatten)):
            layer.rule = EpsilonRule(1e-12)
    try:
        return LRP(model).attribute(images.clone().requires_grad_(True), target=targets).detach()
    finally:
        for layer in model:
            if hasattr(layer, "rule"):
                del layer.rule


def test_lrp_epsilon_and_alpha1beta0_match_captum_on_a_plain_bias_free_cnn():
    model = plain_cnn(seed=3)
    images, targets = torch.rand(3, 2, 8, 8), torch.tensor([2, 0, 1])
    ours = A.explain(model, images, targets, "lrp_epsilon", epsilon=1e-6, reduce=None)
    theirs = captum_lrp(model, images, targets, lambda: EpsilonRule(1e-6))
    scale = theirs.abs().max()
    # same rule, same ε: equal up to float32 rounding (observed max |Δ| / max |R| ≈ 1.4e-7)
    assert (ours - theirs).abs().max() <= 1e-5 * scale
    # α1β0: captum clamps the weights (w⁺), zennit splits x⁺w⁺ + x⁻w⁻ — the same for x ≥ 0 and no biases;
    # their stabilisers differ (captum 1e-9, zennit 1e-6): observed max |Δ| / max |R| ≈ 4e-6
    ours = A.explain(model, images, targets, "lrp_alpha1beta0", reduce=None)
    theirs = captum_lrp(model, images, targets, Alpha1_Beta0_Rule)
    assert (ours - theirs).abs().max() <= 5e-5 * theirs.abs().max()


# ----------------------------------------------------------------------------- (3) real architectures


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "mini_vgg", "small_resnet18", "small_cnn"])
def test_runs_on_torchvision_and_study_models_and_leaves_them_unchanged(name):
    torch.manual_seed(0)
    channels, size = 3, 32
    if name == "resnet18":
        model, methods = torchvision.models.resnet18(weights=None, num_classes=4), LRP_METHODS
    elif name == "vgg11_bn":  # a 100M-parameter head: one method (ε, no clamped weight copies) keeps it short
        model, methods = torchvision.models.vgg11_bn(weights=None, num_classes=4), ("lrp_epsilon",)
    elif name == "mini_vgg":
        model, methods, channels, size = MiniVGG(2, 4, width=2, image_size=16), LRP_METHODS, 2, 16
    elif name == "small_resnet18":
        model, methods, channels, size = SmallResNet18(2, 4, width=2), LRP_METHODS, 2, 16
    else:
        model, methods, channels, size = SmallCNN(2, 4, width=2, image_size=16), LRP_METHODS, 2, 16
    for module in model.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    model.train()  # explain switches to eval inside and restores the flags
    images, targets = torch.rand(2, channels, size, size), torch.tensor([1, 3])
    before = snapshot(model)
    model.eval()
    with torch.no_grad():
        output_before = model(images)
    model.train()
    for method in methods:
        maps = A.explain(model, images, targets, method)
        assert maps.shape == (2, 1, size, size) and maps.dtype == torch.float32, method
        assert torch.isfinite(maps).all() and maps.abs().sum() > 0, method
        if name != "vgg11_bn":
            assert A.explain(model, images, targets, method, reduce=None).shape == (2, channels, size, size)
    assert snapshot(model)["modules"] == before["modules"]  # training flags restored
    model.eval()
    before["modules"] = snapshot(model)["modules"]
    assert_unchanged(model, before, images, output_before)


# ----------------------------------------------------------------------------- (4) BatchNorm and residual canonizers


def zero_shift_batch_norms(model, seed=0):
    """BatchNorm with μ = 0 and β = 0 but non-trivial σ² and γ: the merged (or affine) bias is exactly zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
                module.bias.zero_()
                module.running_var.copy_(0.5 + 1.5 * torch.rand(module.num_features, generator=generator))
                module.weight.copy_(0.5 + torch.rand(module.num_features, generator=generator))
    return model.eval()


def test_batch_norm_models_conserve_the_logit_when_the_merged_bias_is_zero():
    torch.manual_seed(0)
    merged = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                           nn.Flatten(), nn.Linear(4 * 4 * 4, 3, bias=False))  # Conv–BN: merged into the conv
    mini_vgg = MiniVGG(2, 3, width=2, image_size=8)  # Conv–ReLU–BN: the BN becomes an affine layer
    with torch.no_grad():
        for module in mini_vgg.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.bias.zero_()
    resnet = SmallResNet18(2, 3, width=2)  # BasicBlocks: merged BNs and the residual Sum
    with torch.no_grad():
        resnet.fc.bias.zero_()
    images, targets = torch.rand(3, 2, 8, 8), torch.tensor([0, 1, 2])
    for label, model in {"conv-bn": merged, "mini_vgg": mini_vgg, "small_resnet18": resnet}.items():
        zero_shift_batch_norms(model)
        logits = logits_of(model, images, targets)
        sums = A.explain(model, images, targets, "lrp_epsilon", epsilon=1e-9).sum(dim=(1, 2, 3))
        # ε = 1e-9 and zero biases: what is left is float32 rounding and the Norm stabiliser (1e-6) of the
        # residual sums and average pooling. Observed relative errors: conv-bn 4e-7, mini_vgg 1.2e-5,
        # small_resnet18 5.8e-5 (16 residual sums and the global average pool)
        rtol = 2e-4 if label == "small_resnet18" else 1e-4
        assert torch.allclose(sums, logits, rtol=rtol, atol=1e-6), (label, sums, logits)


def test_merged_batch_norm_gives_the_maps_of_the_hand_folded_model():
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    head = nn.Linear(4 * 4 * 4, 3)
    with_bn = nn.Sequential(conv, bn, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), head).eval()
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    folded_conv = nn.Conv2d(2, 4, 3, padding=1)
    with torch.no_grad():
        folded_conv.weight.copy_(conv.weight * scale[:, None, None, None])
        folded_conv.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
    folded = nn.Sequential(folded_conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), head).eval()
    images, targets = torch.rand(2, 2, 8, 8), torch.tensor([0, 2])
    for method in LRP_METHODS:
        ours = A.explain(with_bn, images, targets, method, reduce=None)
        reference = A.explain(folded, images, targets, method, reduce=None)
        assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-6 * reference.abs().max()), method


# ----------------------------------------------------------------------------- (5) bad options


def test_bad_options_and_models_raise_value_error_and_leave_the_model_unchanged():
    model = plain_cnn()
    images, targets = torch.rand(2, 2, 8, 8), torch.tensor([0, 1])
    before = snapshot(model)
    with torch.no_grad():
        output_before = model(images)
    no_affine = nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2, affine=False), nn.Flatten(), nn.Linear(72, 3))
    cases = {
        "epsilon zero": ("lrp_epsilon", {"epsilon": 0.0}, "epsilon"),
        "epsilon nan": ("lrp_epsilon", {"epsilon": float("nan")}, "epsilon"),
        "epsilon text": ("lrp_epsilon", {"epsilon": "small"}, "epsilon"),
        "alpha1beta0 takes no epsilon": ("lrp_alpha1beta0", {"epsilon": 1e-6}, "epsilon"),
        "unknown option": ("deep_taylor", {"lowest": 0.0}, "lowest"),
        "bad reduce": ("lrp_epsilon", {"reduce": "median"}, "reduce"),
        "low above high": ("deep_taylor", {"low": 1.0, "high": 0.0}, "low"),
        "low text": ("deep_taylor", {"low": "zero"}, "low"),
        "high nan": ("deep_taylor", {"high": float("nan")}, "high"),
        "per-channel length": ("deep_taylor", {"low": [0.0, 0.0, 0.0], "high": [1.0, 1.0, 1.0]}, "low/high"),
        "images outside the box": ("deep_taylor", {"low": 0.0, "high": 0.5}, "outside"),
    }
    for label, (method, options, word) in cases.items():
        with pytest.raises(ValueError, match=word):
            A.explain(model, images, targets, method, **options)
            pytest.fail(f"no ValueError for {label}")
    assert_unchanged(model, before, images, output_before)  # also after errors raised mid-way
    with pytest.raises(ValueError, match="affine"):
        A.explain(no_affine, images, targets, "lrp_epsilon")
    with pytest.raises(ValueError, match="Conv or Linear"):
        A.explain(nn.Sequential(nn.Flatten()), images, targets, "lrp_alpha1beta0")

    class Twice(nn.Module):  # one conv applied twice: a rule keeps one input per layer
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(2, 2, 3, padding=1), nn.Sequential(nn.Flatten(), nn.Linear(128, 3))

        def forward(self, x):
            return self.head(self.conv(torch.relu(self.conv(x))))

    twice = Twice()
    with pytest.raises(ValueError, match="more than once"):
        A.explain(twice, images, targets, "lrp_epsilon")
    assert not twice.conv._forward_pre_hooks and not twice.conv._forward_hooks
    # per-channel bounds that fit: standardised images
    mean, std = torch.tensor([0.5, 0.4]), torch.tensor([0.25, 0.2])
    standardised = (images - mean[:, None, None]) / std[:, None, None]
    maps = A.explain(model, standardised, targets, "deep_taylor", low=(-mean / std).tolist(),
                     high=((1 - mean) / std).tolist())
    assert torch.isfinite(maps).all()
