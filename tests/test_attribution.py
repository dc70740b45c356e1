"""Known-answer, invariant and error tests of study.attribution (tiny models, 8×8–16×16 images)."""

import numpy as np
import pytest
import torch
from torch import nn

import study  # noqa: F401  (before torchvision)
from study import attribution as A
from study.models import SmallCNN


def linear_model(channels=2, size=8, classes=3, seed=0, positive=False):
    """f(x) = W · flatten(x), no bias: every attribution has a closed form."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, classes, bias=False))
    if positive:
        with torch.no_grad():
            model[1].weight.abs_()
    return model


def class_weights(model, targets, shape):
    return model[1].weight.detach()[targets].reshape(shape)


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.rand(4, 2, 8, 8), torch.tensor([0, 1, 2, 1])


def small_cnn():
    torch.manual_seed(0)
    return SmallCNN(in_channels=2, num_classes=3, width=4, image_size=8)


SHAPE_OPTIONS = {
    "integrated_gradients": {"steps": 8},
    "smoothgrad": {"samples": 4},
    "rise": {"n_masks": 32, "grid": 4},
    "occlusion": {"window": 2},
    "ground_truth": {"boxes": [np.array([[0, 1, 1, 4, 4]])] * 4},
}


# ----------------------------------------------------------------------------- registry

@pytest.mark.parametrize("method", sorted(A.METHODS))
def test_every_method_returns_b1hw_float32_and_restores_the_model(method, batch):
    images, targets = batch
    model = small_cnn().train()
    maps = A.explain(model, images.double().float(), targets, method, **SHAPE_OPTIONS.get(method, {}))
    assert maps.shape == (4, 1, 8, 8) and maps.dtype == torch.float32 and maps.device == images.device
    assert torch.isfinite(maps).all()
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_reduce_none_keeps_channels_and_targets_none_is_the_prediction(batch):
    images, _ = batch
    model = small_cnn()
    predicted = model.eval()(images).argmax(1)
    raw = A.explain(model, images, None, "input_x_gradient", reduce=None)
    assert raw.shape == (4, 2, 8, 8)
    assert torch.allclose(A.explain(model, images, predicted, "input_x_gradient"), raw.sum(1, keepdim=True), atol=1e-6)


# ----------------------------------------------------------------------------- known answers on f(x) = W·x

def test_gradient_is_max_abs_weight_over_channels(batch):
    images, targets = batch
    model = linear_model()
    w = class_weights(model, targets, images.shape)
    assert torch.allclose(A.explain(model, images, targets, "gradient"), w.abs().amax(1, keepdim=True))
    signed = A.explain(model, images, targets, "gradient", abs=False, reduce="sum")
    assert torch.allclose(signed, w.sum(1, keepdim=True), atol=1e-6)


def test_input_x_gradient_and_integrated_gradients_equal_x_times_w(batch):
    images, targets = batch
    model = linear_model()
    expected = images * class_weights(model, targets, images.shape)
    assert torch.allclose(A.explain(model, images, targets, "input_x_gradient", reduce=None), expected, atol=1e-6)
    for approximation in ("gausslegendre", "riemann_right"):
        ig = A.explain(model, images, targets, "integrated_gradients", reduce=None, steps=7, approximation=approximation)
        assert torch.allclose(ig, expected, atol=1e-6)


def test_integrated_gradients_completeness_on_a_smooth_cnn():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Softplus(), nn.Conv2d(4, 4, 3, padding=1), nn.Softplus(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    images = torch.rand(3, 1, 8, 8)
    targets = torch.tensor([0, 1, 0])
    maps = A.explain(model, images, targets, "integrated_gradients", steps=64)
    with torch.no_grad():
        gap = (model(images) - model(torch.zeros_like(images))).gather(1, targets[:, None])[:, 0]
    assert gap.abs().min() > 1e-3
    assert torch.allclose(maps.sum(dim=(1, 2, 3)), gap, atol=1e-4)


def test_occlusion_window_one_with_zero_baseline_is_x_times_w(batch):
    images, targets = batch
    model = linear_model()
    expected = (images * class_weights(model, targets, images.shape)).sum(1, keepdim=True)
    assert torch.allclose(A.explain(model, images, targets, "occlusion", window=1, batch_size=32), expected, atol=1e-5)


def test_lrp_epsilon_conserves_x_times_w_on_a_bias_free_linear_model(batch):
    images, targets = batch
    model = linear_model()
    expected = images * class_weights(model, targets, images.shape)
    lrp = A.explain(model, images, targets, "lrp_epsilon", reduce=None, epsilon=1e-9)
    assert torch.allclose(lrp, expected, atol=1e-5)


def test_lrp_alpha1beta0_equals_lrp0_when_every_contribution_is_positive(batch):
    images, targets = batch
    model = linear_model(positive=True)
    expected = images * class_weights(model, targets, images.shape)
    assert torch.allclose(A.explain(model, images, targets, "lrp_alpha1beta0", reduce=None), expected, atol=1e-5)


def test_lrp_epsilon_conserves_the_logit_on_a_bias_free_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 2, bias=False))
    images = torch.rand(3, 1, 8, 8)
    targets = torch.tensor([0, 1, 1])
    maps = A.explain(model, images, targets, "lrp_epsilon", epsilon=1e-9)
    with torch.no_grad():
        logits = model(images).gather(1, targets[:, None])[:, 0]
    assert torch.allclose(maps.sum(dim=(1, 2, 3)), logits, atol=1e-4)
    assert "rule" not in vars(model[0])  # the rules were removed again


def test_smoothgrad_on_a_linear_model_is_the_gradient_and_is_seeded(batch):
    images, targets = batch
    model = linear_model()
    w = class_weights(model, targets, images.shape)
    assert torch.allclose(A.explain(model, images, targets, "smoothgrad", samples=3), w.abs().amax(1, keepdim=True))
    cnn = small_cnn()
    first = A.explain(cnn, images, targets, "smoothgrad", samples=3, seed=5)
    assert torch.equal(first, A.explain(cnn, images, targets, "smoothgrad", samples=3, seed=5))
    assert not torch.equal(first, A.explain(cnn, images, targets, "smoothgrad", samples=3, seed=6))


def test_gradcam_is_cam_for_a_gap_head_and_nonnegative_with_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    images = torch.rand(2, 1, 8, 8)
    targets = torch.tensor([1, 0])
    with torch.no_grad():
        features = model[1](model[0](images))
        weights = model[4].weight[targets][:, :, None, None] / 64  # ∂logit/∂A_k(i, j) = w_k / (h·w)
        expected = (weights * features).sum(1, keepdim=True)
    assert (expected < 0).any()
    assert torch.allclose(A.explain(model, images, targets, "gradcam", layer="1"), expected.clamp(min=0), atol=1e-6)
    assert torch.allclose(A.explain(model, images, targets, "gradcam", layer="1", relu=False), expected, atol=1e-6)
    coarse = A.explain(small_cnn(), torch.rand(3, 2, 8, 8), 1, "gradcam", layer="pool3")  # 2×2 upsampled
    assert coarse.shape == (3, 1, 8, 8) and (coarse >= 0).all() and coarse[0].unique().numel() > 4


def test_rise_ranks_the_only_region_the_model_reads_highest():
    class CornerModel(nn.Module):
        def forward(self, x):
            score = 4 * x[:, :, :4, :4].mean(dim=(1, 2, 3))
            return torch.stack([score, torch.zeros_like(score)], dim=1)

    images = torch.ones(2, 1, 16, 16)
    maps = A.explain(CornerModel(), images, 0, "rise", n_masks=400, grid=4, p=0.5, batch_size=200, seed=1)
    inside, outside = maps[:, 0, :4, :4], maps[:, 0, 8:, 8:]
    assert inside.mean() > outside.mean() + 0.05
    flat_argmax = maps.flatten(1).argmax(1)
    assert ((flat_argmax // 16 < 4) & (flat_argmax % 16 < 4)).all()
    assert torch.equal(maps, A.explain(CornerModel(), images, 0, "rise", n_masks=400, grid=4, p=0.5, seed=1))


def test_rise_masks_have_the_keep_probability_and_the_image_size():
    masks = A.rise_masks(2000, 4, 0.25, (12, 12), seed=0)
    assert masks.shape == (2000, 12, 12) and masks.min() >= 0 and masks.max() <= 1
    assert abs(masks.mean().item() - 0.25) < 0.02


# ----------------------------------------------------------------------------- controls

def test_sobel_of_a_vertical_step_is_nonzero_only_next_to_the_edge():
    images = torch.zeros(1, 3, 8, 8)
    images[..., 4:] = 1.0
    maps = A.explain(None, images, 0, "sobel")[0, 0]
    nonzero_columns = sorted(set(torch.nonzero(maps)[:, 1].tolist()))
    assert nonzero_columns == [3, 4]
    assert torch.allclose(maps[:, 3:5], torch.full((8, 2), 4.0))
    assert torch.equal(A.explain(None, torch.full((2, 1, 8, 8), 0.7), 0, "sobel"), torch.zeros(2, 1, 8, 8))


def test_random_is_seeded_uniform_and_independent_of_batch_composition(batch):
    images, _ = batch
    first = A.explain(None, images, 0, "random", seed=3)
    assert torch.equal(first, A.explain(None, images, 0, "random", seed=3))
    assert not torch.equal(first, A.explain(None, images, 0, "random", seed=4))
    assert not torch.equal(first[0], first[1])
    assert torch.equal(first[2:3], A.explain(None, images[2:3], 0, "random", seed=3, first_index=2))
    assert first.min() >= 0 and first.max() < 1


def test_ground_truth_fills_exactly_the_box_and_passes_masks_through():
    images = torch.zeros(2, 3, 8, 8)
    boxes = [np.array([[0, 2, 3, 5, 7]]), torch.tensor([[1.0, 0, 0, 2, 2], [2.0, 6, 6, 8, 8]])]
    maps = A.explain(None, images, 0, "ground_truth", boxes=boxes)
    expected = torch.zeros(2, 1, 8, 8)
    expected[0, 0, 3:7, 2:5] = 1
    expected[1, 0, 0:2, 0:2] = 1
    expected[1, 0, 6:8, 6:8] = 1
    assert torch.equal(maps, expected)
    only_class_2 = A.explain(None, images, torch.tensor([0, 2]), "ground_truth", boxes=boxes, match_target=True)
    assert only_class_2[1].sum() == 4 and only_class_2[1, 0, 7, 7] == 1 and only_class_2[0].sum() == 12
    masks = torch.rand(2, 8, 8) > 0.5
    assert torch.equal(A.explain(None, images, 0, "ground_truth", masks=masks), masks[:, None].float())


def test_constant_and_centre_gaussian():
    images = torch.zeros(1, 1, 9, 9)
    assert torch.equal(A.explain(None, images, 0, "constant", value=2.0), torch.full((1, 1, 9, 9), 2.0))
    bump = A.explain(None, images, 0, "centre_gaussian", sigma=0.2)[0, 0]
    assert bump[4, 4] == 1 and bump.argmax() == 40
    assert torch.allclose(bump, bump.T) and torch.allclose(bump, bump.flip(0))
    assert torch.isclose(bump[4, 6], torch.exp(torch.tensor(-4 / (2 * 1.8**2))))


def test_explain_many_matches_explain_and_does_not_depend_on_batch_size(batch):
    images, targets = batch
    model = small_cnn()
    methods = {"gradient": {}, "random": {"seed": 1}, "ground_truth": {"masks": torch.rand(4, 1, 8, 8)}}
    whole = A.explain_many(model, images, targets, methods)
    chunked = A.explain_many(model, images, targets, methods, batch_size=3)
    for name in methods:
        assert torch.allclose(whole[name], chunked[name], atol=1e-6)
    assert torch.allclose(whole["gradient"], A.explain(model, images, targets, "gradient"))
    assert set(A.explain_many(model, images, 1, ["sobel", "gradient"])) == {"sobel", "gradient"}


# ----------------------------------------------------------------------------- post-processing

def test_minmax_known_answers_and_constant_map_gives_zeros():
    maps = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 1, 1, 3)
    assert torch.allclose(A.normalise_minmax(maps), torch.tensor([0.0, 0.5, 1.0]).reshape(1, 1, 1, 3))
    assert torch.equal(A.normalise_minmax(torch.full((2, 1, 3, 3), 5.0)), torch.zeros(2, 1, 3, 3))
    assert torch.allclose(A.normalise_max_abs(torch.tensor([-4.0, 2.0]).reshape(1, 1, 1, 2)),
                          torch.tensor([-1.0, 0.5]).reshape(1, 1, 1, 2))


def test_clip_percentile_matches_numpy():
    values = torch.arange(100, dtype=torch.float32).reshape(1, 1, 10, 10)
    clipped = A.clip_percentile(values, 90)
    threshold = np.percentile(np.arange(100), 90)
    assert torch.allclose(clipped, values.clamp(max=float(threshold)))
    assert (clipped == clipped.max()).sum() == 10


def test_binarise_top_k_count_is_exact_and_ties_go_to_raster_order():
    torch.manual_seed(0)
    maps = torch.rand(3, 1, 10, 10)
    binary = A.binarise_top_k(maps, 0.1)
    assert binary.sum(dim=(1, 2, 3)).tolist() == [10, 10, 10]
    assert torch.equal(binary.bool(), maps >= maps.flatten(1).kthvalue(91, dim=1).values[:, None, None, None])
    tied = A.binarise_top_k(torch.ones(1, 1, 4, 4), 0.25)
    assert tied.flatten().tolist() == [1.0] * 4 + [0.0] * 12


def test_gaussian_blur_preserves_an_interior_impulse_and_a_constant():
    impulse = torch.zeros(1, 1, 16, 16)
    impulse[0, 0, 8, 8] = 1.0
    blurred = A.gaussian_blur(impulse, sigma=1.0)
    assert abs(blurred.sum().item() - 1.0) < 1e-5 and blurred[0, 0, 8, 8] == blurred.max() < 0.2
    assert torch.allclose(blurred[0, 0], blurred[0, 0].T, atol=1e-7)
    constant = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(A.gaussian_blur(constant, sigma=1.43, kernel_size=5), constant, atol=1e-6)
    assert torch.allclose(A.gaussian_blur(constant, sigma=5.0), constant, atol=1e-6)  # kernel shrunk to fit 8×8


def test_postprocess_order_matters_and_paper_pipelines_run():
    maps = torch.tensor([1.0, -1.0]).reshape(1, 2, 1, 1)
    abs_then_sum = A.postprocess(maps, ["absolute", ("reduce_channels", {"how": "sum"})])
    sum_then_abs = A.postprocess(maps, [("reduce_channels", {"how": "sum"}), "absolute"])
    assert abs_then_sum.item() == 2.0 and sum_then_abs.item() == 0.0
    torch.manual_seed(0)
    raw = torch.randn(2, 3, 8, 8)
    vandersmissen = A.postprocess(raw, A.PAPER_POSTPROCESSING["vandersmissen2024"])
    expected = A.normalise_minmax(raw.clamp(min=0).mean(1, keepdim=True))
    assert torch.allclose(vandersmissen, expected)
    assert torch.allclose(A.postprocess(vandersmissen, A.PAPER_POSTPROCESSING["vandersmissen2024"]), vandersmissen)
    for name, steps in A.PAPER_POSTPROCESSING.items():
        assert torch.isfinite(A.postprocess(raw, steps)).all(), name


# ----------------------------------------------------------------------------- errors

def test_bad_inputs_raise_value_error(batch):
    images, targets = batch
    model = small_cnn()
    cases = {
        "unknown method": lambda: A.explain(model, images, targets, "saliency_magic"),
        "unknown option": lambda: A.explain(model, images, targets, "gradient", stepz=3),
        "bad reduce": lambda: A.explain(model, images, targets, "gradient", reduce="median"),
        "wrong ndim": lambda: A.explain(model, images[0], targets, "gradient"),
        "nan images": lambda: A.explain(model, images * float("nan"), targets, "gradient"),
        "targets length": lambda: A.explain(model, images, targets[:3], "gradient"),
        "float targets": lambda: A.explain(model, images, targets.float(), "gradient"),
        "gradcam layer": lambda: A.explain(model, images, targets, "gradcam", layer="conv9"),
        "baseline name": lambda: A.explain(model, images, targets, "integrated_gradients", baseline="noise"),
        "no model": lambda: A.explain(None, images, targets, "gradient"),
        "ground truth without masks": lambda: A.explain(None, images, 0, "ground_truth"),
        "nan map": lambda: A.normalise_minmax(torch.full((1, 1, 2, 2), float("nan"))),
        "map ndim": lambda: A.absolute(torch.zeros(2, 2)),
        "unknown step": lambda: A.postprocess(torch.zeros(1, 1, 2, 2), ["sharpen"]),
        "unknown step option": lambda: A.postprocess(torch.zeros(1, 1, 2, 2), [("gaussian_blur", {"sigmaa": 1})]),
        "even kernel": lambda: A.gaussian_blur(torch.zeros(1, 1, 8, 8), 1.0, kernel_size=4),
        "percentile": lambda: A.clip_percentile(torch.zeros(1, 1, 2, 2), 120),
        "methods type": lambda: A.explain_many(model, images, targets, "gradient"),
    }
    for label, call in cases.items():
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"no ValueError for {label}")


def test_explain_rejects_targets_beyond_the_models_classes_and_casts_float64_images():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=3, num_classes=4, width=4, image_size=16).eval()
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="below the model's 4 outputs, got 99"):
        A.explain(model, images, 99, "gradient")
    as_float64 = A.explain(model, images.double(), 1, "gradient")
    assert as_float64.dtype == torch.float32
    assert torch.allclose(as_float64, A.explain(model, images, 1, "gradient"), atol=1e-6)
