"""Small networks of the protocol cards, and access to their named intermediate layers."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet


def _conv_relu(in_channels: int, out_channels: int, batch_norm: bool = False) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    return layers


class SmallCNN(nn.Sequential):
    """The Tomsett card's pilot CNN (§5.2 D1), with a width parameter.

    Conv3×3(w)–ReLU → Conv3×3(2w)–ReLU–MaxPool2 → Conv3×3(2w)–ReLU–MaxPool2 → Linear(→ classes).
    Width 16 is the card's network. Named layers: conv1, conv2, conv3, fc.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, image_size: int = 16):
        _check_positive(in_channels=in_channels, num_classes=num_classes, width=width, image_size=image_size)
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two 2× poolings), got {image_size}")
        c1, c2 = width, 2 * width
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(c2, c2, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c2 * (image_size // 4) ** 2, num_classes)


class MiniVGG(nn.Sequential):
    """The Tomsett card's mini-VGG (`VGG16Richard`, §2 E0); width 32 is full, 16 is the half width.

    Three blocks of [Conv3×3–ReLU–BN]×2, MaxPool2, Dropout(0.2/0.3/0.4), then Flatten → Linear.
    Named layers: block1 … block3 (each an nn.Sequential), fc.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32, image_size: int = 32):
        _check_positive(in_channels=in_channels, num_classes=num_classes, width=width, image_size=image_size)
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 (three 2× poolings), got {image_size}")
        widths = (width, 2 * width, 4 * width)
        super().__init__()
        previous = in_channels
        for index, (channels, dropout) in enumerate(zip(widths, (0.2, 0.3, 0.4)), start=1):
            block = nn.Sequential(
                *_conv_relu(previous, channels, batch_norm=True),
                *_conv_relu(channels, channels, batch_norm=True),
                nn.MaxPool2d(2),
                nn.Dropout(dropout),
            )
            self.add_module(f"block{index}", block)
            previous = channels
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[-1] * (image_size // 8) ** 2, num_classes)


def init_conv_bn(model: nn.Module, mode: str = "fan_out") -> None:
    """torchvision's ResNet initialisation: Kaiming-normal convolutions (ReLU gain, `mode`),
    BatchNorm scale 1 and shift 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode=mode, nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class SmallResNet18(ResNet):
    """The Viviano card's ResNet-18 variant built on torchvision's ResNet.

    3×3 stride-1 stem, no max-pool, stage widths (w, 2w, 4w, 8w) with w = `width`
    (64 is torchvision's and the paper's; the card's CPU default is 16), Kaiming init.
    Named layers: conv1, layer1 … layer4, avgpool, fc. `features(x)` is the pooled vector.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 64):
        _check_positive(in_channels=in_channels, num_classes=num_classes, width=width)
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, width, 2)
        self.layer2 = self._make_layer(BasicBlock, 2 * width, 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, 4 * width, 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, 8 * width, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        self.feature_dim = 8 * width
        init_conv_bn(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


MODELS = {"small_cnn": SmallCNN, "mini_vgg": MiniVGG, "resnet18_small": SmallResNet18}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a model of the registry by name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called `name` (dotted path as in `model.named_modules()`)."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        known = [n for n in modules if n]
        raise ValueError(f"model {type(model).__name__} has no layer {name!r}; layers: {known}")
    return modules[name]


def capture(model: nn.Module, images: torch.Tensor, layers: Iterable[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run `model(images)` and return (output, {layer name: that layer's output})."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:
        module = get_layer(model, name)
        handles.append(module.register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out)))
    try:
        output = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return output, captured


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class VGGLike(nn.Sequential):
    """The Vandersmissen card's VGG-like network (§5.2), standing in for VGG16; no batch norm.

    features: [Conv3×3(16)–ReLU–MaxPool2] → [Conv3×3(32)–ReLU–MaxPool2] → [Conv3×3(64)–ReLU–MaxPool2]
    → Conv3×3(64)–ReLU (the last conv map is image_size/8, 8×8 at 64 px); classifier: Linear(→128)–ReLU
    → Linear(→ classes). torchvision-style names (features.N, classifier.N); an nn.Sequential of
    plain layers, so LRP applies. Grad-CAM layer: "features.10" (the ReLU after the last conv).
    """

    gradcam_layer = "features.10"

    def __init__(self, in_channels: int = 3, num_classes: int = 6, image_size: int = 64):
        _check_positive(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 (three 2× poolings), got {image_size}")
        layers: list[nn.Module] = []
        previous = in_channels
        for channels in (16, 32, 64):
            layers += [nn.Conv2d(previous, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            previous = channels
        layers += [nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()]
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Linear(64 * (image_size // 8) ** 2, 128), nn.ReLU(), nn.Linear(128, num_classes))


class ResNetLike(ResNet):
    """The Vandersmissen card's ResNet-like network (§5.2), standing in for ResNet50.

    Stem Conv3×3(16, stride 2)–BN–ReLU; three stages of 2 torchvision BasicBlocks with 16 / 32 / 64
    channels and strides 1 / 2 / 2 (last conv map image_size/8, 8×8 at 64 px); global average
    pooling; Linear(64 → classes). Named layers: conv1, bn1, layer1 … layer3, avgpool, fc
    (layer4 is an Identity). Grad-CAM layer: "layer3". LRP through zennit: its ResNet canonizer splits
    each residual sum in proportion to the two branches.
    """

    gradcam_layer = "layer3"

    def __init__(self, in_channels: int = 3, num_classes: int = 6):
        _check_positive(in_channels=in_channels, num_classes=num_classes)
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = 16, 1, 1, 64
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, 16, 2)
        self.layer2 = self._make_layer(BasicBlock, 32, 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, 64, 2, stride=2)
        self.layer4 = nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


MODELS.update(vgg_like=VGGLike, resnet_like=ResNetLike)
