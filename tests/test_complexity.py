"""Complexity metrics: Gini sparseness and entropy, known answers and invariants."""

import study  # noqa: F401

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from study.metrics.complexity import entropy, gini, sparsity_descriptors

PROPERTY = settings(max_examples=40, deadline=None)


def test_gini_known_answers():
    n = 16
    one_hot = np.zeros((1, 1, 4, 4))
    one_hot[0, 0, 2, 1] = 3.0
    assert gini(one_hot) == pytest.approx([1 - 1 / n])  # (n - 1)/n
    assert gini(np.full((1, 4, 4), 0.7)) == pytest.approx([0.0], abs=1e-15)
    # values 1, 2, 3, 4: Σ(2i − n − 1) x_i = −3 − 2 + 3 + 12 = 10; / (n Σx) = 10 / 40
    assert gini(np.array([[[4.0, 1.0], [3.0, 2.0]]])) == pytest.approx([0.25])
    # 4 equal ones among 16 pixels: (9 + 11 + 13 + 15) / (16 · 4) = 0.75
    assert gini(np.eye(4)[None]) == pytest.approx([0.75])
    assert gini(np.zeros((1, 3, 3))).tolist() == [0.0]  # all-zero map: the constant-map value


def test_entropy_known_answers():
    assert entropy(np.ones((1, 1, 4, 4))) == pytest.approx([np.log(16)])
    one_hot = np.zeros((1, 4, 4))
    one_hot[0, 3, 3] = -2.0
    assert entropy(one_hot) == pytest.approx([0.0], abs=1e-15)
    # p = (1/2, 1/4, 1/4, 0): H = ½ log 2 + 2 · ¼ log 4 = 1.5 log 2
    assert entropy(np.array([[[2.0, -1.0], [1.0, 0.0]]])) == pytest.approx([1.5 * np.log(2)])
    assert entropy(np.zeros((1, 3, 3))) == pytest.approx([np.log(9)])


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-3, 1e3))
def test_scale_and_sign_invariance_and_bounds(seed, scale):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(3, 5, 6))
    n = 30
    for f in (gini, entropy):
        np.testing.assert_allclose(f(scale * a), f(a), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(f(-a), f(a), rtol=1e-12)
        np.testing.assert_allclose(f(torch.from_numpy(a)[:, None]), f(a), rtol=1e-12)
    g, h = gini(a), entropy(a)
    assert ((0 <= g) & (g <= 1 - 1 / n + 1e-12)).all()
    assert ((0 <= h) & (h <= np.log(n) + 1e-12)).all()


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1))
def test_concentrating_mass_raises_gini_and_lowers_entropy(seed):
    rng = np.random.default_rng(seed)
    a = rng.random((1, 6, 6)) + 0.1
    sharper = a**4  # same order, more concentrated
    assert gini(sharper)[0] > gini(a)[0]
    assert entropy(sharper)[0] < entropy(a)[0]


def test_sparsity_descriptors():
    a = np.array([[[0.0, 0.01], [0.5, 1.0]]])
    d = sparsity_descriptors(a)
    assert d["frac_below"].tolist() == [0.5]
    assert d["mean"] == pytest.approx([1.51 / 4])
    assert d["median"] == pytest.approx([0.255])
    assert set(d) == {"gini", "frac_below", "mean", "median", "q25", "q75"}


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        gini(np.full((1, 2, 2), np.nan))
    with pytest.raises(ValueError, match="shape"):
        entropy(np.ones((4, 4)))
    with pytest.raises(ValueError, match="eps"):
        gini(np.ones((1, 2, 2)), eps=-1)
