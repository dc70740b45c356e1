import pytest
import torch

from study.models import MiniVGG, SmallCNN, SmallResNet18, build_model, capture, get_layer


@pytest.mark.parametrize("model, shape, classes", [
    (SmallCNN(in_channels=1, num_classes=10, width=16, image_size=16), (2, 1, 16, 16), 10),
    (SmallCNN(in_channels=3, num_classes=6, width=8, image_size=32), (2, 3, 32, 32), 6),
    (MiniVGG(in_channels=3, num_classes=10, width=16, image_size=32), (2, 3, 32, 32), 10),
    (SmallResNet18(in_channels=1, num_classes=2, width=8), (2, 1, 28, 28), 2),
])
def test_output_shapes(model, shape, classes):
    assert model.eval()(torch.zeros(shape)).shape == (shape[0], classes)


def test_resnet_variant_has_stride_one_stem_no_maxpool_and_scaled_widths():
    model = SmallResNet18(in_channels=1, num_classes=2, width=16)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert [model.layer1[0].conv1.out_channels, model.layer4[0].conv1.out_channels] == [16, 128]
    _, feats = capture(model.eval(), torch.zeros(1, 1, 28, 28), ["layer1", "layer2", "layer3", "layer4"])
    assert [feats[n].shape[-1] for n in ("layer1", "layer2", "layer3", "layer4")] == [28, 14, 7, 4]
    assert model.features(torch.zeros(3, 1, 28, 28)).shape == (3, 128)


def test_named_layers_and_capture():
    model = SmallCNN(in_channels=1, num_classes=10, width=4, image_size=16)
    out, feats = capture(model, torch.zeros(2, 1, 16, 16), ["conv1", "conv3"])
    assert out.shape == (2, 10)
    assert feats["conv1"].shape == (2, 4, 16, 16) and feats["conv3"].shape == (2, 8, 8, 8)
    assert get_layer(MiniVGG(), "block2.0").out_channels == 64
    assert not model.conv1._forward_hooks


@pytest.mark.parametrize("call, message", [
    (lambda: get_layer(SmallCNN(), "conv9"), "no layer 'conv9'"),
    (lambda: build_model("vgg99"), "unknown model"),
    (lambda: SmallCNN(image_size=18), "multiple of 4"),
    (lambda: SmallResNet18(width=0), "positive int"),
])
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
