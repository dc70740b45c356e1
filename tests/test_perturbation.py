"""Known answers and invariants of study.metrics.perturbation (Tomsett card §7, Vandersmissen card §7)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import study  # noqa: F401
from study.metrics import perturbation as P
from study.models import SmallCNN


pytestmark = pytest.mark.usefixtures("one_thread")


def linear_model(weight: torch.Tensor) -> nn.Module:
    """f(x) = w · x as a one-output network (weight shaped like one image)."""
    layer = nn.Linear(weight.numel(), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(1, -1))
    return nn.Sequential(nn.Flatten(), layer).eval()


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = SmallCNN(3, 10, 4, 8).eval()
    images = torch.rand(3, 3, 8, 8)
    maps = torch.rand(3, 1, 8, 8)
    targets = torch.tensor([0, 3, 7])
    return model, images, maps, targets


@pytest.fixture(scope="module")
def linear():
    """A linear model with 3 channels, an image, a replacement b and the oracle map w ⊙ (x − b)."""
    torch.manual_seed(1)
    weight = torch.randn(3, 6, 6)
    images = torch.rand(2, 3, 6, 6)
    baseline = torch.rand(2, 3, 6, 6)
    oracle = (weight * (images - baseline)).sum(1, keepdim=True)
    return linear_model(weight), images, baseline, oracle


# ------------------------------------------------------------------------------------------------
# Hand-computed case
# ------------------------------------------------------------------------------------------------


def test_hand_computed_curves_on_four_pixel_linear_model():
    # f(x) = 4·x0 + 3·x1 + 2·x2 + 1·x3, x = 1, zero replacement: f(x) = 10.
    model = linear_model(torch.tensor([[[4.0, 3.0], [2.0, 1.0]]]))
    image = torch.ones(1, 1, 2, 2)
    relevance = torch.tensor([[[[0.1, 0.4], [0.3, 0.2]]]])  # MoRF order: x1, x2, x3, x0
    kwargs = dict(output="logit", replacement="zero")
    morf = P.perturbation_curve(model, image, relevance, 0, order="morf", **kwargs)
    lerf = P.perturbation_curve(model, image, relevance, 0, order="lerf", **kwargs)
    insertion = P.perturbation_curve(model, image, relevance, 0, mode="insertion", **kwargs)
    assert morf.tolist() == [[10.0, 7.0, 5.0, 4.0, 0.0]]
    assert lerf.tolist() == [[10.0, 6.0, 5.0, 3.0, 0.0]]
    assert insertion.tolist() == [[0.0, 3.0, 5.0, 6.0, 10.0]]
    # AOPC = (0 + 3 + 5 + 6 + 10) / 5 and (0 + 4 + 5 + 7 + 10) / 5; ABPC = 4.8 − 5.2.
    assert P.aopc(morf).item() == pytest.approx(4.8, abs=1e-6)
    assert P.aopc(lerf).item() == pytest.approx(5.2, abs=1e-6)
    assert P.abpc(lerf, morf).item() == pytest.approx(-0.4, abs=1e-6)
    assert P.aopc_morf(model, image, relevance, 0, **kwargs).item() == pytest.approx(4.8, abs=1e-6)
    assert P.abpc_score(model, image, relevance, 0, **kwargs).item() == pytest.approx(-0.4, abs=1e-6)
    # Trapezoid on k/4: (10/2 + 7 + 5 + 4 + 0/2) / 4 and (0/2 + 3 + 5 + 6 + 10/2) / 4.
    assert P.deletion_auc(model, image, relevance, 0, **kwargs).item() == pytest.approx(5.25, abs=1e-6)
    assert P.insertion_auc(model, image, relevance, 0, **kwargs).item() == pytest.approx(4.75, abs=1e-6)
    # Two pixels per step: [10, 5, 0].
    two = P.perturbation_curve(model, image, relevance, 0, pixels_per_step=2, **kwargs)
    assert two.tolist() == [[10.0, 5.0, 0.0]]


def test_auc_of_constant_curve_is_the_constant():
    assert torch.allclose(P.auc(torch.full((2, 11), 0.37)), torch.tensor([0.37, 0.37]))


def test_probability_aucs_lie_in_the_unit_interval(cnn):
    model, images, maps, targets = cnn
    for function in (P.deletion_auc, P.insertion_auc):
        value = function(model, images, maps, targets, pixels_per_step=8, replacement="blur", blur_kernel_size=3)
        assert value.shape == (3,) and bool(((value >= 0) & (value <= 1)).all())


def test_step_schedules():
    assert P._step_counts(10, None, None, 1) == list(range(11))
    assert P._step_counts(10, 4, None, 1) == [0, 2, 5, 7, 10]  # ⌊k · F / L⌋
    assert P._step_counts(10, None, 3, 1) == [0, 3, 6, 9, 10]  # last step partial
    assert P._step_counts(16, 2, 8, 2) == [0, 2, 4]  # 8 pixels = two 2×2 patches per step


# ------------------------------------------------------------------------------------------------
# Tomsett §7 invariants
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("replacement", ["zero", "uniform", "blur"])
def test_abpc_equals_aopc_morf_minus_aopc_lerf(cnn, replacement):
    model, images, maps, targets = cnn
    kwargs = dict(pixels_per_step=4, replacement=replacement, blur_kernel_size=3, blur_sigma=1.0)
    abpc = P.abpc_score(model, images, maps, targets, **kwargs)
    difference = P.aopc_morf(model, images, maps, targets, **kwargs) - P.aopc_lerf(model, images, maps, targets,
                                                                                    **kwargs)
    assert torch.allclose(abpc, difference, atol=1e-7, rtol=0)


@pytest.mark.parametrize("replacement", ["zero", "dataset_mean", "image_mean", "uniform", "blur"])
@pytest.mark.parametrize("patch", [1, 2])
def test_endpoints_reach_the_replacement_image(cnn, replacement, patch):
    model, images, maps, targets = cnn
    kwargs = dict(patch=patch, pixels_per_step=16, replacement=replacement, dataset_mean=[0.2, 0.4, 0.6], seed=5,
                  blur_kernel_size=3, blur_sigma=1.0, output="logit")
    value = P.make_replacement(images, replacement, dataset_mean=[0.2, 0.4, 0.6], seed=5, blur_kernel_size=3,
                               blur_sigma=1.0).expand_as(images)
    f_x = P.class_scores(model, images, targets, output="logit")
    f_b = P.class_scores(model, value, targets, output="logit")
    for order in ("morf", "lerf", "random"):
        curve = P.perturbation_curve(model, images, maps, targets, order=order, **kwargs)
        assert curve.shape == (3, 5)
        assert torch.allclose(curve[:, 0], f_x, atol=1e-6, rtol=0)  # k = 0 term of AOPC is 0
        assert torch.allclose(curve[:, -1], f_b, atol=1e-6, rtol=0)
        inserted = P.perturbation_curve(model, images, maps, targets, order=order, mode="insertion", **kwargs)
        assert torch.allclose(inserted[:, 0], f_b, atol=1e-6, rtol=0)
        assert torch.allclose(inserted[:, -1], f_x, atol=1e-6, rtol=0)


def test_linear_oracle_faithfulness_is_one(linear):
    model, images, baseline, oracle = linear
    for patch in (1, 2, 3):
        for correlation in ("pearson", "spearman"):
            kwargs = dict(patch=patch, replacement=baseline, correlation=correlation)
            plus = P.faithfulness(model, images, oracle, 0, **kwargs)
            minus = P.faithfulness(model, images, -oracle, 0, **kwargs)
            assert torch.allclose(plus, torch.ones(2), atol=1e-6, rtol=0), plus
            assert torch.allclose(minus, -torch.ones(2), atol=1e-6, rtol=0), minus
    # The per-channel form of the oracle (summed over channels) and a feature sub-sample agree.
    per_channel = P.faithfulness(model, images, oracle.expand(-1, 3, -1, -1) / 3, 0, replacement=baseline,
                                 features=10, seed=4)
    assert torch.allclose(per_channel, torch.ones(2), atol=1e-6, rtol=0)


def test_linear_oracle_has_best_morf_and_lerf(linear):
    model, images, baseline, oracle = linear
    kwargs = dict(replacement=baseline, output="logit", pixels_per_step=3)
    best = P.aopc_morf(model, images, oracle, 0, **kwargs)
    least = P.aopc_lerf(model, images, oracle, 0, **kwargs)
    for seed in range(5):
        random_order = P.perturbation_curve(model, images, oracle, 0, order="random", seed=seed, **kwargs)
        assert bool((best >= P.aopc(random_order) - 1e-5).all())
        assert bool((least <= P.aopc(random_order) + 1e-5).all())
        other_map = torch.rand(oracle.shape, generator=torch.Generator().manual_seed(seed))
        assert bool((best >= P.aopc_morf(model, images, other_map, 0, **kwargs) - 1e-5).all())
        assert bool((least <= P.aopc_lerf(model, images, other_map, 0, **kwargs) + 1e-5).all())


def test_faithfulness_invariant_under_positive_affine_maps(cnn):
    model, images, maps, targets = cnn
    reference = P.faithfulness(model, images, maps, targets, patch=2, replacement="uniform")
    for a, b in ((2.5, -1.0), (0.25, 2.0)):
        moved = P.faithfulness(model, images, a * maps + b, targets, patch=2, replacement="uniform")
        assert torch.allclose(moved, reference, atol=1e-5, rtol=0)


TRANSFORMS = {
    "exp": lambda v: torch.exp(3 * v),
    "cube": lambda v: v**3 + 2,
    "affine": lambda v: 5 * v - 1,
    "log1p": torch.log1p,
}


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), name=st.sampled_from(sorted(TRANSFORMS)))
def test_aopc_invariant_under_strictly_increasing_transforms(cnn, seed, name):
    model, images, _, targets = cnn
    # Tie-free map: a random permutation of 0, 1/64, …, 63/64 per image.
    generator = torch.Generator().manual_seed(seed)
    maps = torch.stack([torch.randperm(64, generator=generator) for _ in range(3)]).float().reshape(3, 1, 8, 8) / 64
    kwargs = dict(pixels_per_step=8, replacement="uniform", seed=seed)
    transformed = TRANSFORMS[name](maps)
    for function in (P.aopc_morf, P.aopc_lerf, P.abpc_score, P.deletion_auc, P.insertion_auc):
        assert torch.equal(function(model, images, maps, targets, **kwargs),
                           function(model, images, transformed, targets, **kwargs))


def test_determinism_and_uniform_replacement(cnn):
    model, images, maps, targets = cnn
    constant = torch.zeros_like(maps)  # all ties: exercises the seeded tie-break
    for use, kwargs in ((maps, dict(replacement="uniform")), (maps, dict(order="random")),
                        (constant, dict(ties="random"))):
        first = P.perturbation_curve(model, images, use, targets, pixels_per_step=4, seed=3, **kwargs)
        second = P.perturbation_curve(model, images, use, targets, pixels_per_step=4, seed=3, **kwargs)
        assert torch.equal(first, second)
    assert torch.equal(P.faithfulness(model, images, maps, targets, replacement="uniform", features=20),
                       P.faithfulness(model, images, maps, targets, replacement="uniform", features=20))
    assert torch.equal(P.faithfulness_correlation(model, images, maps, targets, n_runs=10),
                       P.faithfulness_correlation(model, images, maps, targets, n_runs=10))
    noise = P.make_replacement(images, "uniform", seed=7)
    assert noise.shape == images.shape
    assert torch.equal(noise, P.make_replacement(images, "uniform", seed=7))
    assert not torch.equal(noise, P.make_replacement(images, "uniform", seed=8))
    assert noise.unique().numel() > 0.99 * noise.numel()  # differs per pixel and channel
    assert float(noise.min()) >= 0 and float(noise.max()) < 1
    # Shared across methods: every map's full-deletion endpoint is the same noise image's score.
    ends = [P.perturbation_curve(model, images, m, targets, pixels_per_step=16, replacement="uniform", seed=7)[:, -1]
            for m in (maps, -maps, torch.rand_like(maps))]
    assert torch.equal(ends[0], ends[1]) and torch.equal(ends[0], ends[2])


def test_dataset_mean_is_the_given_statistic_not_the_image_mean(cnn):
    _, images, _, _ = cnn
    value = P.make_replacement(images, "dataset_mean", dataset_mean=[0.1, 0.2, 0.3])
    assert torch.equal(value.expand_as(images)[0, :, 0, 0], torch.tensor([0.1, 0.2, 0.3]))
    assert torch.equal(P.make_replacement(images, "dataset_mean", dataset_mean=0.3).expand_as(images),
                       torch.full_like(images, 0.3))
    assert torch.allclose(P.make_replacement(images, "image_mean").expand_as(images)[:, :, 3, 5],
                          images.mean((2, 3)))


def test_stable_ties_follow_raster_order(cnn):
    model, images, _, targets = cnn
    constant = torch.full((3, 1, 8, 8), 0.5)
    raster_first = -torch.arange(64.0).reshape(1, 1, 8, 8).expand(3, -1, -1, -1)  # MoRF = raster order
    kwargs = dict(pixels_per_step=4, replacement="uniform")
    morf = P.perturbation_curve(model, images, constant, targets, order="morf", **kwargs)
    lerf = P.perturbation_curve(model, images, constant, targets, order="lerf", **kwargs)
    assert torch.equal(morf, P.perturbation_curve(model, images, raster_first, targets, order="morf", **kwargs))
    assert torch.equal(lerf, P.perturbation_curve(model, images, -raster_first, targets, order="lerf", **kwargs))
    assert torch.equal(morf, lerf)
    shuffled = P.perturbation_curve(model, images, constant, targets, ties="random", seed=1, **kwargs)
    assert torch.equal(shuffled, P.perturbation_curve(model, images, constant, targets, ties="random", seed=1,
                                                      **kwargs))
    assert not torch.equal(shuffled, morf)
    # Random tie-breaking only reorders tied features: a tie-free map is unaffected.
    maps = torch.rand(3, 1, 8, 8)
    assert torch.equal(P.perturbation_curve(model, images, maps, targets, ties="random", **kwargs),
                       P.perturbation_curve(model, images, maps, targets, **kwargs))


def test_single_feature_copies_differ_in_exactly_one_feature(cnn):
    _, images, _, _ = cnn
    noise = P.make_replacement(images, "uniform", seed=0)  # differs from x everywhere
    patch, n_features = 2, 16
    grid = P._feature_grid(8, 8, patch, images.device)
    copies = P._single_feature_copies(images[1], noise[1], grid, torch.arange(-1, n_features))
    assert copies.shape == (n_features + 1, 3, 8, 8)
    changed = (copies != images[1]).any(1)  # (copies, H, W)
    assert not bool(changed[0].any())  # feature −1: the unperturbed image
    for i in range(n_features):
        expected = torch.zeros(8, 8, dtype=torch.bool)
        r, c = divmod(i, 4)
        expected[2 * r:2 * r + 2, 2 * c:2 * c + 2] = True
        assert torch.equal(changed[i + 1], expected), i
        assert torch.equal(copies[i + 1][:, expected], noise[1][:, expected])  # all channels replaced


def test_patch_relevance_is_the_sum_over_the_patch(cnn):
    model, images, maps, targets = cnn
    relevance = P._feature_relevance(maps[:, 0], 2)
    manual = torch.stack([maps[:, 0, 2 * r:2 * r + 2, 2 * c:2 * c + 2].sum((1, 2))
                          for r in range(4) for c in range(4)], 1)
    assert torch.allclose(relevance, manual)
    # Moving relevance around inside patches (same sums) changes nothing.
    shuffled = maps.reshape(3, 1, 4, 2, 4, 2).flip(3).flip(5).reshape(3, 1, 8, 8)
    kwargs = dict(patch=2, pixels_per_step=8, replacement="uniform")
    assert torch.equal(P.perturbation_curve(model, images, maps, targets, **kwargs),
                       P.perturbation_curve(model, images, shuffled, targets, **kwargs))
    assert torch.allclose(P.faithfulness(model, images, maps, targets, patch=2),
                          P.faithfulness(model, images, shuffled, targets, patch=2), atol=1e-6)


def test_faithfulness_of_a_constant_map(cnn):
    model, images, _, targets = cnn
    constant = torch.full((3, 1, 8, 8), 0.1)
    with pytest.raises(ValueError, match="constant"):
        P.faithfulness(model, images, constant, targets)
    assert bool(P.faithfulness(model, images, constant, targets, on_constant="nan").isnan().all())
    with pytest.raises(ValueError, match="constant"):
        P.faithfulness_correlation(model, images, constant, targets, n_runs=5)


def test_faithfulness_correlation_linear_oracle(linear):
    model, images, baseline, oracle = linear
    score = P.faithfulness_correlation(model, images, oracle, 0, n_runs=20, subset_size=5, replacement=baseline)
    assert torch.allclose(score, torch.ones(2), atol=1e-6, rtol=0)


def test_average_drop_and_increase(cnn):
    model, images, maps, targets = cnn
    ones = P.average_drop_increase(model, images, torch.ones_like(maps), targets)
    assert torch.equal(ones["average_drop"], torch.zeros(3))
    assert torch.equal(ones["increase_in_confidence"], torch.zeros(3))
    zeros = P.average_drop_increase(model, images, torch.zeros_like(maps), targets)
    assert torch.allclose(zeros["masked_score"], P.class_scores(model, torch.zeros_like(images), targets), atol=1e-6)
    for binarise in (None, 0.1, 0.5):
        result = P.average_drop_increase(model, images, maps, targets, binarise=binarise)
        y, o = result["score"], result["masked_score"]
        assert torch.allclose(result["average_drop"], (y - o).clamp(min=0) / y * 100, atol=1e-4)
        assert bool(((result["average_drop"] >= 0) & (result["average_drop"] <= 100)).all())
        assert torch.equal(result["increase_in_confidence"], (o > y).float())
    soft = P._explanation_mask(maps[:, 0] * 7 - 2, None)
    assert torch.allclose(soft.amin((1, 2)), torch.zeros(3)) and torch.allclose(soft.amax((1, 2)), torch.ones(3))
    binary = P._explanation_mask(maps[:, 0], 0.1)
    assert binary.sum((1, 2)).tolist() == [math.ceil(0.1 * 64)] * 3
    threshold = maps[:, 0].reshape(3, -1).sort(1, descending=True).values[:, 6]
    assert torch.equal(binary.bool(), maps[:, 0] >= threshold[:, None, None])


@pytest.mark.parametrize("chunk_copies, batch_size", [(5, 1), (7, 3), (64, 2)])
def test_results_do_not_depend_on_chunking(cnn, monkeypatch, chunk_copies, batch_size):
    """Chunks that split an image's copies at odd places give the same scores as one big chunk."""
    model, images, maps, targets = cnn
    calls = {
        "curve": lambda **k: P.perturbation_curve(model, images, maps, targets, pixels_per_step=4,
                                                  replacement="uniform", **k),
        "insertion": lambda **k: P.perturbation_curve(model, images, maps, targets, mode="insertion",
                                                      pixels_per_step=8, **k),
        "faithfulness": lambda **k: P.faithfulness(model, images, maps, targets, patch=2, **k),
        "correlation": lambda **k: P.faithfulness_correlation(model, images, maps, targets, n_runs=9, **k),
        "drop": lambda **k: P.average_drop_increase(model, images, maps, targets, **k)["masked_score"],
    }
    reference = {name: call(batch_size=256) for name, call in calls.items()}
    monkeypatch.setattr(P, "_CHUNK_BYTES", chunk_copies * images[0].numel() * 4)
    for name, call in calls.items():
        assert torch.allclose(call(batch_size=batch_size), reference[name], atol=1e-6, rtol=0), name


def test_model_mode_is_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(12, 3)).train()
    images, maps = torch.rand(2, 3, 2, 2), torch.rand(2, 1, 2, 2)
    first = P.perturbation_curve(model, images, maps, 1)
    assert model.training
    assert torch.equal(first, P.perturbation_curve(model, images, maps, 1))  # dropout off during the call


# ------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------


BAD_CURVE_CALLS = {
    "nan map": (dict(maps="nan"), "NaN"),
    "inf image": (dict(images="inf"), "NaN or Inf"),
    "map shape": (dict(maps=torch.rand(3, 1, 4, 4)), "maps must have shape"),
    "map batch": (dict(maps=torch.rand(2, 1, 8, 8)), "maps must have shape"),
    "targets shape": (dict(targets=torch.tensor([0, 1])), "targets must have shape"),
    "float targets": (dict(targets=torch.tensor([0.0, 1.0, 2.0])), "integer"),
    "target range": (dict(targets=torch.tensor([0, 1, 10])), "out of range"),
    "images rank": (dict(images=torch.rand(3, 8, 8)), r"\(B, C, H, W\)"),
    "too many steps": (dict(steps=65), "more steps than features"),
    "too many steps per pixel step": (dict(steps=17, pixels_per_step=4), "more steps than features"),
    "patch": (dict(patch=3), "does not divide"),
    "pixels per step vs patch": (dict(patch=2, pixels_per_step=6), "multiple of patch"),
    "order": (dict(order="best"), "unknown order"),
    "mode": (dict(mode="both"), "unknown mode"),
    "replacement": (dict(replacement="black"), "unknown replacement"),
    "output": (dict(output="softmax"), "unknown output"),
    "ties": (dict(ties="first"), "unknown ties"),
    "dataset mean missing": (dict(replacement="dataset_mean"), "needs dataset_mean"),
    "dataset mean channels": (dict(replacement="dataset_mean", dataset_mean=[0.1, 0.2]), "one per channel"),
    "replacement tensor shape": (dict(replacement=torch.zeros(3, 2, 8, 8)), "does not broadcast"),
    "replacement tensor nan": (dict(replacement=torch.full((1, 3, 1, 1), float("nan"))), "NaN"),
    "blur kernel even": (dict(replacement="blur", blur_kernel_size=4), "odd"),
    "blur kernel large": (dict(replacement="blur", blur_kernel_size=17), "too large"),
    "batch size": (dict(batch_size=0), "batch_size"),
    "seed": (dict(seed=-1), "seed"),
}


@pytest.mark.parametrize("case", sorted(BAD_CURVE_CALLS))
def test_bad_curve_inputs_raise(cnn, case):
    model, images, maps, targets = cnn
    overrides, message = BAD_CURVE_CALLS[case]
    args = dict(images=images, maps=maps, targets=targets)
    for key in ("images", "maps", "targets"):
        if key in overrides:
            value = overrides.pop(key)
            if isinstance(value, str):  # "nan" / "inf": one bad value in the fixture's tensor
                value, bad = args[key].clone(), value
                value[0, 0, 1, 1] = float(bad)
            args[key] = value
    with pytest.raises(ValueError, match=message):
        P.perturbation_curve(model, args["images"], args["maps"], args["targets"], **overrides)


def test_bad_metric_inputs_raise(cnn):
    model, images, maps, targets = cnn
    with pytest.raises(ValueError, match="unknown correlation"):
        P.faithfulness(model, images, maps, targets, correlation="kendall")
    with pytest.raises(ValueError, match="more than"):
        P.faithfulness(model, images, maps, targets, features=65)
    with pytest.raises(ValueError, match="unknown on_constant"):
        P.faithfulness(model, images, maps, targets, on_constant="zero")
    with pytest.raises(ValueError, match="subset_size"):
        P.faithfulness_correlation(model, images, maps, targets, subset_size=65)
    with pytest.raises(ValueError, match="repeat"):
        P.faithfulness_correlation(model, images, maps, targets, subsets=torch.zeros(3, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="binarise"):
        P.average_drop_increase(model, images, maps, targets, binarise=1.5)
    negative = linear_model(-torch.ones(3, 8, 8))  # f(x) = −Σx < 0
    with pytest.raises(ValueError, match="<= 0"):
        P.average_drop_increase(negative, images, maps, 0, output="logit")
    with pytest.raises(ValueError, match="fixed by this function"):
        P.aopc_morf(model, images, maps, targets, order="lerf")
    with pytest.raises(ValueError, match="curve"):
        P.aopc(torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        P.auc(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="same shape"):
        P.abpc(torch.ones(2, 3), torch.ones(2, 4))


class _ViewFlattenNet(nn.Module):
    """A model written the common way: conv, then `.view` to flatten (fails on channels_last inputs)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.head(y.view(y.shape[0], -1))


def test_auto_channels_last_falls_back_for_models_that_flatten_with_view():
    torch.manual_seed(0)
    model = _ViewFlattenNet().eval()
    images = torch.rand(3, 3, 8, 8)
    maps = torch.rand(3, 1, 8, 8)
    with pytest.raises(RuntimeError, match="view"):  # the failure the auto default must avoid
        P.aopc_morf(model, images, maps, torch.tensor([0, 1, 2]), steps=4, channels_last=True)
    auto = P.aopc_morf(model, images, maps, torch.tensor([0, 1, 2]), steps=4)
    plain = P.aopc_morf(model, images, maps, torch.tensor([0, 1, 2]), steps=4, channels_last=False)
    assert torch.equal(auto, plain)
