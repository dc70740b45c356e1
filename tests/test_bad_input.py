"""Bad input users will hit gets a ValueError that names the argument (issue: researchers' own models)."""
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from study import attribution, config, data, losses, masking
from study.metrics import perturbation, reliability

CLASSES = 3
AOPC_WRAPPERS = [perturbation.aopc_morf, perturbation.aopc_lerf, perturbation.abpc_score,
                 perturbation.deletion_auc, perturbation.insertion_auc]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2, CLASSES))


# ----------------------------------------------------------------------------- cases already covered


def test_get_device_rejects_unknown_devices_with_a_value_error():
    with pytest.raises(ValueError, match="unknown device 'bogus'"):
        config.get_device("bogus")
    with pytest.raises(ValueError, match="device must be"):
        config.get_device(3)
    assert config.get_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("loss", [losses.discriminator_loss, losses.adversarial_encoder_loss])
def test_adversarial_losses_check_their_features(loss):
    disc = nn.Linear(4, 1)
    good = torch.rand(3, 4)
    assert torch.isfinite(loss(disc, good, good.flip(0), 1.0))
    with pytest.raises(ValueError, match="features must be a non-empty"):
        loss(disc, torch.rand(3), torch.rand(3), 1.0)
    with pytest.raises(ValueError, match="features_shuffled must be a non-empty"):
        loss(disc, good, torch.rand(3, 4, 1), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        loss(disc, torch.full((3, 4), float("nan")), good, 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        loss(disc, good, torch.rand(2, 4), 1.0)


@pytest.mark.parametrize("loss", [losses.discriminator_loss, losses.adversarial_encoder_loss])
def test_adversarial_losses_check_dtypes_and_the_discriminator(loss):
    disc = nn.Linear(4, 1)
    good = torch.rand(3, 4)
    with pytest.raises(ValueError, match="features must be a floating-point tensor"):
        loss(disc, good.long(), good.long(), 1.0)
    with pytest.raises(ValueError, match="dtypes differ"):
        loss(disc, good, good.double(), 1.0)
    with pytest.raises(ValueError, match="features have dtype torch.float64 but disc's parameters torch.float32"):
        loss(disc, good.double(), good.double(), 1.0)
    with pytest.raises(ValueError, match="disc must be a torch.nn.Module"):
        loss(None, good, good, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision: bf16 features on a float32 disc
        assert torch.isfinite(loss(disc, good.bfloat16(), good.bfloat16(), 1.0))


def test_actdiff_rejects_nan_features():
    with pytest.raises(ValueError, match="features_shuffled contains NaN"):
        losses.actdiff_loss(torch.rand(2, 3), torch.tensor([[0.0, float("nan"), 1.0], [1.0, 2.0, 3.0]]))


# ----------------------------------------------------------------------------- data.standardise / channel_stats


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_standardise_casts_integer_images_to_float32_without_rescaling(dtype):
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)  # what torchvision.io.read_image returns
    mean, std = [120.0, 110.0, 100.0], [60.0, 50.0, 40.0]
    out = data.standardise(pixels.to(dtype), mean, std)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, data.standardise(pixels.float(), mean, std))
    from_numpy = data.standardise(pixels.numpy(), mean, std)
    assert from_numpy.dtype == np.float32 and np.isfinite(from_numpy).all()
    stats_mean, stats_std = data.channel_stats(pixels)
    np.testing.assert_allclose(stats_mean, pixels.double().mean(dim=(0, 2, 3)).numpy())
    assert np.all(stats_std > 0)


@pytest.mark.parametrize("as_array", [False, True])
def test_standardise_and_channel_stats_reject_nan_and_inf_images(as_array):
    for bad in (float("nan"), float("inf")):
        images = torch.rand(2, 3, 4, 4)
        images[1, 2, 3, 0] = bad
        images = images.numpy() if as_array else images
        with pytest.raises(ValueError, match="images contain NaN or Inf"):
            data.standardise(images, 0.5, 0.25)
        with pytest.raises(ValueError, match="images contain NaN or Inf"):
            data.channel_stats(images)


def test_standardise_names_its_bad_arguments():
    images = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="mean must be finite"):
        data.standardise(images, [0.5, float("nan"), 0.5], 0.25)
    for std in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="std must be > 0 and finite"):
            data.standardise(images, 0.5, std)
    with pytest.raises(ValueError, match="images must be a numpy array or a torch tensor"):
        data.standardise(images.tolist(), 0.5, 0.25)
    with pytest.raises(ValueError, match="images must hold real numbers"):
        data.channel_stats(np.full((1, 1, 2, 2), "a"))


# ----------------------------------------------------------------------------- attribution.explain


@pytest.mark.parametrize("targets", [99, CLASSES, -1, [0, 99], torch.tensor([CLASSES, 0])])
def test_explain_rejects_out_of_range_targets(targets):
    with pytest.raises(ValueError, match="targets"):
        attribution.explain(tiny_model(), torch.rand(2, 3, 6, 6), targets, "gradient")


def test_explain_casts_float64_images_to_the_models_dtype():
    model, images = tiny_model(), torch.rand(2, 3, 6, 6, dtype=torch.float64)
    for method in ("gradient", "gradcam", "integrated_gradients"):
        maps = attribution.explain(model, images, [0, 2], method)
        assert maps.dtype == torch.float32
        assert torch.equal(maps, attribution.explain(model, images.float(), [0, 2], method))


# ----------------------------------------------------------------------------- reliability.off_diagonal_summary


def test_off_diagonal_summary_leaves_out_undefined_correlations_and_counts_them():
    scores = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "flat": [2.0] * 4, "c": [4.0, 1.0, 3.0, 2.0]})
    matrix = scores.corr()  # the constant column gives NaN correlations
    summary = reliability.off_diagonal_summary(matrix)
    rho = matrix.loc["a", "c"]
    assert summary == {"mean": rho, "min": rho, "max": rho, "n_pairs": 3, "n_undefined": 2}
    defined = scores[["a", "c"]].assign(d=[1.0, 3.0, 2.0, 5.0]).corr()
    upper = defined.to_numpy()[np.triu_indices(3, k=1)]
    assert reliability.off_diagonal_summary(defined) == {"mean": float(upper.mean()), "min": float(upper.min()),
                                                         "max": float(upper.max()), "n_pairs": 3, "n_undefined": 0}


def test_off_diagonal_summary_rejects_matrices_without_a_usable_pair():
    with pytest.raises(ValueError, match="matrix has no defined off-diagonal entry"):
        reliability.off_diagonal_summary(pd.DataFrame({"a": [1.0, 1.0], "b": [2.0, 2.0]}).corr())
    with pytest.raises(ValueError, match="matrix has infinite"):
        reliability.off_diagonal_summary(np.array([[1.0, np.inf], [np.inf, 1.0]]))
    with pytest.raises(ValueError, match="matrix must hold numbers"):
        reliability.off_diagonal_summary([["x", "y"], ["z", "w"]])


# ----------------------------------------------------------------------------- masking.masker_objective


@pytest.mark.parametrize("name", ["w_in", "w_out"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, "1", None])
def test_masker_objective_rejects_bad_weights(name, value):
    logits = torch.randn(2, CLASSES)
    with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
        masking.masker_objective(torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), logits, logits, logits, **{name: value})


# ----------------------------------------------------------------------------- perturbation wrappers


@pytest.mark.parametrize("wrapper", AOPC_WRAPPERS, ids=lambda f: f.__name__)
def test_aopc_wrappers_name_themselves_for_unknown_keywords(wrapper):
    images = torch.rand(2, 3, 6, 6)
    with pytest.raises(ValueError, match=rf"^{wrapper.__name__} got unknown keyword argument\(s\) \['bogus'\]"):
        wrapper(tiny_model(), images, torch.rand(2, 1, 6, 6), [0, 1], steps=3, bogus=1)
    with pytest.raises(ValueError, match=rf"fixed by this function \({wrapper.__name__}\)"):
        wrapper(tiny_model(), images, torch.rand(2, 1, 6, 6), [0, 1], order="random")


# ----------------------------------------------------------------------------- property: mutated arguments

# Each public function with valid tiny arguments (called by keyword).
def _valid_arguments(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 6, 6, generator=g)
    logits = torch.randn(2, CLASSES, generator=g)
    features = torch.randn(3, 4, generator=g)
    scores = pd.DataFrame(torch.randn(6, 3, generator=g).numpy(), columns=["a", "b", "c"])
    return {
        "standardise": (data.standardise, {"images": images, "mean": [0.4, 0.5, 0.6], "std": 0.25}),
        "channel_stats": (data.channel_stats, {"images": images}),
        "explain": (attribution.explain, {"model": tiny_model(), "images": images, "targets": [0, 2],
                                          "method": "gradient"}),
        "off_diagonal_summary": (reliability.off_diagonal_summary, {"matrix": scores.corr()}),
        "masker_objective": (masking.masker_objective, {"masks": torch.rand(2, 1, 6, 6, generator=g),
                                                        "labels": torch.tensor([0, 1]), "clean_logits": logits,
                                                        "logits_in": logits.flip(0), "logits_out": logits,
                                                        "w_in": 1.0, "w_out": 1.0}),
        "aopc_morf": (perturbation.aopc_morf, {"model": tiny_model(), "images": images,
                                               "maps": torch.rand(2, 1, 6, 6, generator=g), "targets": [0, 2],
                                               "steps": 3}),
        "get_device": (config.get_device, {"device": "cpu"}),
        "discriminator_loss": (losses.discriminator_loss, {"disc": nn.Linear(4, 1), "features": features,
                                                           "features_shuffled": features.flip(0), "lam": 1.0}),
    }


def _nan(value, draw):
    if isinstance(value, pd.DataFrame):  # every entry undefined
        return value * np.nan
    if isinstance(value, torch.Tensor):
        value = value.clone()
        value.view(-1)[draw(st.integers(0, value.numel() - 1))] = float("nan")
        return value
    if isinstance(value, list):
        return [float("nan")] + value[1:]
    return float("nan")


def _undefined_pair(value, draw):
    """A NaN correlation (what DataFrame.corr gives for a constant column), kept symmetric."""
    i, j = draw(st.sampled_from([(0, 1), (0, 2), (1, 2)]))
    value = value.copy()
    value.iloc[i, j] = value.iloc[j, i] = np.nan
    return value


def _integers(value, draw):
    if isinstance(value, torch.Tensor):
        return (value * 255).to(draw(st.sampled_from([torch.uint8, torch.int32, torch.int64])))
    return 3 if isinstance(value, str) else str(value)


def _float64(value, draw):
    return value.double()


def _drop_dim(value, draw):
    return value.to_numpy().ravel() if isinstance(value, pd.DataFrame) else value[0]


def _out_of_range(value, draw):
    bad = draw(st.integers(CLASSES, 10**6) | st.integers(-10**6, -1))
    return [0, bad] if draw(st.booleans()) else bad


def _unknown(value, draw):
    return 1


# (function, argument, mutation, outcome): "error" wants a ValueError naming the argument,
# "finite" the documented, finite result.
CASES = [
    ("standardise", "images", _nan, "error"), ("standardise", "images", _integers, "finite"),
    ("standardise", "images", _drop_dim, "error"), ("standardise", "mean", _nan, "error"),
    ("standardise", "std", _nan, "error"),
    ("channel_stats", "images", _nan, "error"), ("channel_stats", "images", _integers, "finite"),
    ("channel_stats", "images", _drop_dim, "error"),
    ("explain", "images", _nan, "error"), ("explain", "images", _float64, "finite"),
    ("explain", "images", _integers, "error"), ("explain", "images", _drop_dim, "error"),
    ("explain", "targets", _out_of_range, "error"), ("explain", "bogus", _unknown, "error"),
    ("off_diagonal_summary", "matrix", _undefined_pair, "finite"), ("off_diagonal_summary", "matrix", _nan, "error"),
    ("off_diagonal_summary", "matrix", _drop_dim, "error"),
    ("masker_objective", "w_in", _nan, "error"), ("masker_objective", "w_out", _nan, "error"),
    ("masker_objective", "w_in", _integers, "error"), ("masker_objective", "masks", _nan, "error"),
    ("masker_objective", "labels", _float64, "error"), ("masker_objective", "clean_logits", _drop_dim, "error"),
    ("aopc_morf", "images", _nan, "error"), ("aopc_morf", "images", _float64, "finite"),
    ("aopc_morf", "maps", _nan, "error"), ("aopc_morf", "targets", _out_of_range, "error"),
    ("aopc_morf", "bogus", _unknown, "error"),
    ("get_device", "device", _nan, "error"), ("get_device", "device", _integers, "error"),
    ("discriminator_loss", "features", _nan, "error"), ("discriminator_loss", "features", _integers, "error"),
    ("discriminator_loss", "features", _float64, "error"),
    ("discriminator_loss", "features_shuffled", _drop_dim, "error"),
    ("discriminator_loss", "lam", _nan, "error"),
]


def _finite(result) -> bool:
    if isinstance(result, masking.ObjectiveTerms):
        return _finite(result.total)
    if isinstance(result, torch.Tensor):
        return bool(torch.isfinite(result).all())
    if isinstance(result, np.ndarray):
        return bool(np.isfinite(result).all())
    if isinstance(result, (tuple, list)):
        return all(map(_finite, result))
    if isinstance(result, dict):
        return all(map(_finite, result.values()))
    return math.isfinite(result)


@pytest.mark.parametrize("name", sorted(_valid_arguments(0)))
def test_every_driven_function_accepts_its_valid_arguments(name):
    function, arguments = _valid_arguments(0)[name]
    result = function(**arguments)
    assert isinstance(result, torch.device) or _finite(result)


@pytest.mark.parametrize("name, argument, mutate, outcome", CASES,
                         ids=[f"{n}-{a}-{m.__name__[1:]}" for n, a, m, _ in CASES])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), draws=st.data())
def test_property_mutated_arguments_raise_a_named_value_error_or_give_a_finite_result(name, argument, mutate, outcome,
                                                                                     seed, draws):
    function, arguments = _valid_arguments(seed)[name]
    arguments[argument] = mutate(arguments.get(argument), draws.draw)
    if outcome == "error":
        with pytest.raises(ValueError) as error:
            function(**arguments)
        assert re.search(rf"\b{argument}\b", str(error.value)), str(error.value)
    else:
        result = function(**arguments)
        assert _finite(result)
        if name == "off_diagonal_summary":
            assert result["n_undefined"] == 1
