"""Model-parameter randomisation: similarities, seeding, and the caller's model left untouched."""

import study  # noqa: F401

import numpy as np
import pytest
from skimage.metrics import structural_similarity
import torch
from torch import nn

from study.metrics.randomisation import (
    cascading_randomisation,
    independent_randomisation,
    parameter_randomisation,
    randomise_layers,
    spearman_similarity,
    ssim,
)

LAYERS = ["head", "conv2", "conv1"]  # top-down


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(1, 4, 3, padding=1))
    model.add_module("relu1", nn.ReLU())
    model.add_module("conv2", nn.Conv2d(4, 4, 3, padding=1))
    model.add_module("bn", nn.BatchNorm2d(4))
    model.add_module("relu2", nn.ReLU())
    model.add_module("flatten", nn.Flatten())
    model.add_module("head", nn.Linear(4 * 12 * 12, 3))
    return model.eval()


def gradient_map(model, images, targets):
    """|∂ logit_target / ∂x|: a deterministic explainer for the tests."""
    x = images.clone().requires_grad_(True)
    logits = model(x)
    logits.gather(1, targets[:, None]).sum().backward()
    return x.grad.abs()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 1, 12, 12, generator=g), torch.tensor([0, 1, 2])


# ----------------------------------------------------------------------------- similarities


def test_spearman_similarity_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 1, 6, 6))
    np.testing.assert_allclose(spearman_similarity(a, a), 1.0)
    np.testing.assert_allclose(spearman_similarity(a, -a), -1.0)
    np.testing.assert_allclose(spearman_similarity(a, np.exp(3 * a)), 1.0)  # rank-only
    np.testing.assert_allclose(spearman_similarity(a, -a, abs=True), 1.0)
    from scipy.stats import spearmanr

    b = rng.normal(size=a.shape)
    assert spearman_similarity(a, b)[1] == pytest.approx(spearmanr(a[1].ravel(), b[1].ravel()).statistic)
    const = np.ones((2, 6, 6))
    assert spearman_similarity(a[:, 0], const).tolist() == [0.0, 0.0]
    assert spearman_similarity(const, const).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="constant"):
        spearman_similarity(a[:, 0], const, constant="raise")


def test_ssim_is_skimage_on_min_max_normalised_maps():
    rng = np.random.default_rng(1)
    a = rng.random((2, 1, 16, 16))
    b = a + 0.3 * rng.random(a.shape)
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-12)
    for window in (5, 7):
        ours = ssim(a, b, window_size=window)
        for i in range(2):
            x = (a[i, 0] - a[i, 0].min()) / np.ptp(a[i, 0])
            y = (b[i, 0] - b[i, 0].min()) / np.ptp(b[i, 0])
            assert ours[i] == structural_similarity(x, y, win_size=window, data_range=1.0)
    assert ssim(a, b, window_size=5).shape == (2,)
    assert ssim(np.ones((1, 12, 12)), np.ones((1, 12, 12))).tolist() == [1.0]  # constants -> zeros


def test_ssim_known_answer_for_a_uniform_window():
    # one 3x3 window: means 1/3 and 2/3 (x has 3 ones, y 6), sample variances 0.25 and 0.25,
    # sample covariance (9·mean(xy) − 9·μxμy)/8 = (9·(3/9) − 9·2/9)/8 = 0.125
    x = np.zeros((1, 3, 3))
    x[0, 0] = 1
    y = np.ones((1, 3, 3))
    y[0, 2] = 0
    c1, c2 = 0.01**2, 0.03**2
    mx, my, vx, vy, cov = 1 / 3, 2 / 3, 0.25, 0.25, 0.125
    expected = (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert ssim(x, y, window_size=3, normalise=False)[0] == pytest.approx(expected, rel=1e-12)


def test_ssim_rejects_bad_windows_and_ranges():
    a = np.random.default_rng(0).random((2, 1, 16, 16))
    with pytest.raises(ValueError, match="window"):
        ssim(a[:, :, :6, :6], a[:, :, :6, :6])
    with pytest.raises(ValueError, match="odd"):
        ssim(a, a, window_size=4)
    with pytest.raises(ValueError, match="normalise=False"):
        ssim(2 * a, a, normalise=False)


# ----------------------------------------------------------------------------- randomisation


def test_randomising_nothing_gives_similarity_one_and_caller_model_unchanged():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_state = torch.random.get_rng_state()
    images, targets = data()
    table = cascading_randomisation(model, images, targets, gradient_map, layers=[])
    assert table["step"].tolist() == [0, 0, 0] and (table["layer"] == "none").all()
    np.testing.assert_allclose(table["spearman"], 1.0)
    np.testing.assert_allclose(table["ssim"], 1.0)
    full = cascading_randomisation(model, images, targets, gradient_map, layers=LAYERS)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the global RNG is not consumed
    assert len(full) == 3 * (1 + len(LAYERS))


def test_cascading_table_and_similarity_drop():
    model = tiny_model()
    images, targets = data()
    table = cascading_randomisation(model, images, targets, gradient_map, layers=LAYERS, seed=0)
    assert table["randomised"].unique().tolist() == ["none", "head", "head,conv2", "head,conv2,conv1"]
    assert list(table.columns) == ["mode", "step", "layer", "randomised", "image", "spearman", "ssim"]
    last = table[table["step"] == len(LAYERS)]
    assert (last["spearman"] < 0.9).all()  # fully randomised maps are far from the original
    again = cascading_randomisation(model, images, targets, gradient_map, layers=LAYERS, seed=0)
    assert table.equals(again)  # seeded: bit-identical
    other = cascading_randomisation(model, images, targets, gradient_map, layers=LAYERS, seed=1)
    assert not np.allclose(other["spearman"].to_numpy()[3:], table["spearman"].to_numpy()[3:])


def test_independent_mode_randomises_one_layer_at_a_time():
    model = tiny_model()
    images, targets = data()
    table = independent_randomisation(model, images, targets, gradient_map, layers=LAYERS, similarity=("spearman_abs",))
    assert table["randomised"].unique().tolist() == ["none", "head", "conv2", "conv1"]
    assert "spearman_abs" in table and "ssim" not in table
    # the same seed per list position as the cascading first step
    cascade = cascading_randomisation(model, images, targets, gradient_map, layers=LAYERS, similarity="spearman_abs")
    np.testing.assert_array_equal(table[table["step"] == 1]["spearman_abs"], cascade[cascade["step"] == 1]["spearman_abs"])


def test_randomise_layers_changes_only_the_named_layers():
    model = tiny_model()
    randomised = randomise_layers(model, ["conv2", "bn"], seed=3)
    original, changed = model.state_dict(), randomised.state_dict()
    assert not torch.equal(original["conv2.weight"], changed["conv2.weight"])
    for key in ("conv1.weight", "conv1.bias", "head.weight", "head.bias"):
        assert torch.equal(original[key], changed[key]), key
    again = randomise_layers(model, ["conv2", "bn"], seed=3).state_dict()
    assert all(torch.equal(changed[k], again[k]) for k in changed)
    normal = randomise_layers(model, ["conv1"], seed=3, init="normal").state_dict()
    assert not torch.equal(original["conv1.weight"], normal["conv1.weight"])


def test_explainer_by_name_uses_study_attribution():
    pytest.importorskip("study.attribution")
    model = tiny_model()
    images, targets = data()
    table = parameter_randomisation(model, images, targets, "gradient", layers=["head"], similarity=("spearman",))
    np.testing.assert_allclose(table[table["step"] == 0]["spearman"], 1.0)


def test_bad_arguments():
    model = tiny_model()
    images, targets = data()
    with pytest.raises(ValueError, match="unknown layers"):
        cascading_randomisation(model, images, targets, gradient_map, layers=["fc"])
    with pytest.raises(ValueError, match="no parameters"):
        cascading_randomisation(model, images, targets, gradient_map, layers=["relu1"])
    with pytest.raises(ValueError, match="unknown similarity"):
        cascading_randomisation(model, images, targets, gradient_map, layers=["head"], similarity=("pearson",))
    with pytest.raises(ValueError, match="unknown mode"):
        parameter_randomisation(model, images, targets, gradient_map, layers=["head"], mode="joint")
    with pytest.raises(ValueError, match="unknown init"):
        randomise_layers(model, ["head"], init="xavier")
    with pytest.raises(ValueError, match="list of module names"):
        cascading_randomisation(model, images, targets, gradient_map, layers="head")
    with pytest.raises(ValueError, match="NaN"):
        cascading_randomisation(model, images, targets, lambda m, x, t: torch.full_like(x, float("nan")), layers=[])
    with pytest.raises(ValueError, match="shape"):
        spearman_similarity(np.ones((1, 4, 4)), np.ones((1, 4, 5)))
    with pytest.raises(ValueError, match="unknown options"):
        cascading_randomisation(model, images, targets, gradient_map, layers=["head"], similarty="ssim")


def test_explain_options_reach_the_explainer():
    model = tiny_model()
    images, targets = data()
    seen = []

    def explainer(model, images, targets, power=1):
        seen.append(power)
        return gradient_map(model, images, targets) ** power

    table = cascading_randomisation(model, images, targets, explainer, layers=["head"], explain_options={"power": 2})
    assert seen == [2, 2, 2] and len(table) == 6
