"""Localisation metrics: hand-computed known answers, card invariants (hypothesis) and bad inputs."""

import study  # noqa: F401  (must precede torchvision/quantus imports)

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from study.metrics.localisation import (
    binarise_by_mask_area,
    binarise_min_max,
    box_area_fraction,
    box_iou,
    boxes_to_mask,
    energy_pointing_game,
    f1_mask,
    iop,
    iot,
    iou,
    localisation_error,
    official_metric,
    overlap_scores,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    saliency_box,
    saliency_metric,
)

PROPERTY = settings(max_examples=40, deadline=None)


def top_left_mask(size=4, k=2):
    m = np.zeros((1, size, size), dtype=bool)
    m[0, :k, :k] = True
    return m


def random_case(seed, size=None):
    """A random map batch and random non-empty masks."""
    rng = np.random.default_rng(seed)
    b = int(rng.integers(1, 4))
    h, w = (int(rng.integers(2, 9)), int(rng.integers(2, 9))) if size is None else size
    maps = rng.normal(size=(b, h, w))
    masks = rng.random((b, h, w)) < rng.uniform(0.1, 0.9)
    masks[:, 0, 0] = True  # never empty
    return maps, masks


# ----------------------------------------------------------------------------- EPG


def test_epg_three_quarters_of_positive_mass_inside():
    a = np.zeros((1, 1, 4, 4))
    a[0, 0, 0, 0], a[0, 0, 0, 1] = 2.0, 1.0  # inside the 2x2 top-left mask: 3
    a[0, 0, 3, 3] = 1.0  # outside: 1
    a[0, 0, 3, 0] = -5.0  # negative mass is ignored
    assert energy_pointing_game(a, top_left_mask()[:, None]) == pytest.approx([0.75], abs=1e-15)


def test_epg_extremes_and_dead_map():
    m = top_left_mask()
    inside = np.where(m, 1.0, 0.0)
    assert energy_pointing_game(inside, m) == pytest.approx([1.0])
    assert energy_pointing_game(1.0 - inside, m) == pytest.approx([0.0])
    # all energy below 1e-7 scores 0 (Rao card Q5), never NaN
    assert energy_pointing_game(-np.ones((1, 4, 4)), m).tolist() == [0.0]
    assert energy_pointing_game(np.full((1, 4, 4), 1e-10), m).tolist() == [0.0]


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), value=st.floats(1e-3, 1e3))
def test_epg_uniform_map_equals_mask_area_fraction(seed, value):
    maps, masks = random_case(seed)
    epg = energy_pointing_game(np.full(maps.shape, value), masks)
    np.testing.assert_allclose(epg, masks.reshape(len(masks), -1).mean(axis=1), rtol=1e-12)


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-3, 1e3))
def test_epg_invariant_to_positive_scaling(seed, scale):
    maps, masks = random_case(seed)
    maps[:, 0, 0] = 1.0  # keep some positive energy
    np.testing.assert_allclose(energy_pointing_game(scale * maps, masks), energy_pointing_game(maps, masks), rtol=1e-10)


# ----------------------------------------------------------------------------- pointing game


def test_pointing_game_hit_and_miss():
    m = np.concatenate([top_left_mask(), top_left_mask()])
    a = np.zeros((2, 4, 4))
    a[0, 1, 1] = 1.0  # max inside
    a[1, 3, 3] = 1.0  # max outside
    assert pointing_game(a, m).tolist() == [True, False]
    assert pointing_game(torch.from_numpy(a)[:, None], torch.from_numpy(m)[:, None]).tolist() == [True, False]


def test_pointing_game_tolerance_is_euclidean_distance_to_the_region():
    m = top_left_mask(size=6)  # rows/cols 0-1
    a = np.zeros((1, 6, 6))
    a[0, 1, 3] = 1.0  # two columns right of the region: distance 2
    assert pointing_game(a, m, tolerance=1).tolist() == [False]
    assert pointing_game(a, m, tolerance=2).tolist() == [True]


def test_pointing_game_tie_rules():
    m = top_left_mask()
    a = np.zeros((1, 4, 4))
    a[0, 3, 0] = a[0, 0, 1] = 1.0  # two maxima: (3,0) outside, (0,1) inside; raster order finds (0,1) first
    assert pointing_game(a, m, ties="any").tolist() == [True]
    assert pointing_game(a, m, ties="first").tolist() == [True]
    assert pointing_game(a, m, ties="fraction").tolist() == [0.5]
    b = np.zeros((1, 4, 4))
    b[0, 0, 3] = b[0, 1, 0] = 1.0  # first maximum in raster order (0,3) is outside
    assert pointing_game(b, m, ties="first").tolist() == [False]
    assert pointing_game(b, m, ties="any").tolist() == [True]
    # a constant map: "any" always hits, "fraction" gives the area fraction
    c = np.ones((1, 4, 4))
    assert pointing_game(c, m).tolist() == [True]
    assert pointing_game(c, m, ties="fraction").tolist() == [0.25]
    draws = [pointing_game(c, m, ties="random", seed=s)[0] for s in range(200)]
    assert 0.1 < np.mean(draws) < 0.4  # 1 in 4 of the tied pixels is inside
    assert pointing_game(c, m, ties="random", seed=3).tolist() == pointing_game(c, m, ties="random", seed=3).tolist()


def test_pointing_game_box_map_scores_every_image():
    # Vandersmissen card §7.5: the ground-truth box map hits on every image, whichever tie rule
    masks = boxes_to_mask([[[1, 1, 3, 4]], [[0, 2, 4, 4]]], 5, 5)
    for ties in ("any", "first", "random"):
        assert pointing_game(masks.astype(float), masks, ties=ties).all()


# ----------------------------------------------------------------------------- relevance mass / rank


def test_relevance_mass_accuracy_hand_computed():
    a = np.array([[[1.0, 2.0], [3.0, 4.0]]])
    m = np.array([[[1, 1], [0, 0]]])
    assert relevance_mass_accuracy(a, m) == pytest.approx([0.3])


def test_relevance_rank_accuracy_hand_computed_and_ties():
    a = np.array([[[4.0, 3.0], [2.0, 1.0]]])
    m = np.array([[[1, 0], [0, 1]]])
    assert relevance_rank_accuracy(a, m) == pytest.approx([0.5])  # top-2 = {4, 3}: one inside
    tied = np.array([[[1.0, 1.0], [1.0, 0.0]]])
    m2 = np.array([[[0, 1], [0, 1]]])
    # expected tie-break: 2 of the 3 tied pixels are taken, 1 of the 3 is inside -> 2/3 hits of K=2
    assert relevance_rank_accuracy(tied, m2) == pytest.approx([1 / 3])
    assert relevance_rank_accuracy(tied, m2, ties="raster") == pytest.approx([0.5])
    random = [relevance_rank_accuracy(tied, m2, ties="random", seed=s)[0] for s in range(300)]
    assert set(random) <= {0.0, 0.5} and np.mean(random) == pytest.approx(1 / 3, abs=0.05)


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1))
def test_relevance_rank_accuracy_tie_rules_agree_without_ties(seed):
    maps, masks = random_case(seed)
    expected = relevance_rank_accuracy(maps, masks)
    np.testing.assert_allclose(relevance_rank_accuracy(maps, masks, ties="raster"), expected, atol=1e-12)
    np.testing.assert_allclose(relevance_rank_accuracy(maps, masks, ties="random"), expected, atol=1e-12)
    assert ((0 <= expected) & (expected <= 1)).all()


# ----------------------------------------------------------------------------- Viviano threshold rule, IoU/IoP/IoT


def reference_threshold_rule(a, m):
    """The card's rule written literally with np.percentile."""
    out = []
    for ai, mi in zip(a, m):
        q = 100 - 100 * mi.sum() / mi.size
        kept = np.where(ai < np.percentile(ai, q), 0, ai)
        out.append(kept > 0)
    return np.array(out)


def test_threshold_rule_keeps_the_mask_area_hand_computed():
    a = np.arange(1, 17, dtype=float).reshape(1, 4, 4)
    m = np.zeros((1, 4, 4), bool)
    m[0, 0, :3] = m[0, 3, 0:2] = True  # |M| = 5
    s = binarise_by_mask_area(a, m)
    assert s.sum() == 5 and s[0].ravel()[-5:].all()  # the five largest values 12..16
    assert binarise_by_mask_area(a[:, None], m).shape == (1, 1, 4, 4)


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1))
def test_threshold_rule_gives_exactly_mask_area_without_ties(seed):
    rng = np.random.default_rng(seed)
    _, masks = random_case(seed)
    b, h, w = masks.shape
    maps = np.stack([rng.permutation(h * w).reshape(h, w) + 1.0 for _ in range(b)])  # distinct, positive
    s = binarise_by_mask_area(maps, masks)
    np.testing.assert_array_equal(s.reshape(b, -1).sum(axis=1), masks.reshape(b, -1).sum(axis=1))
    np.testing.assert_array_equal(s, reference_threshold_rule(maps, masks))


def test_iou_iop_iot_hand_computed():
    s = np.zeros((1, 4, 4), bool)
    s[0, 0:2, 0:3] = True  # 6 px
    m = np.zeros((1, 4, 4), bool)
    m[0, 1:3, 1:3] = True  # 4 px; intersection = row 1, cols 1-2 = 2 px; union 8
    assert iou(s, m) == pytest.approx([0.25])
    assert iop(s, m) == pytest.approx([2 / 6])
    assert iot(s, m) == pytest.approx([0.5])
    empty = np.zeros((1, 4, 4), bool)
    assert iou(empty, empty).tolist() == [0.0]  # empty union scores 0 (Rao code)
    assert iop(empty, m).tolist() == [0.0]


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1))
def test_alignment_score_invariants(seed):
    rng = np.random.default_rng(seed)
    _, masks = random_case(seed)
    pred = rng.random(masks.shape) < 0.5
    i, p, t = iou(pred, masks), iop(pred, masks), iot(pred, masks)
    assert (i <= np.minimum(p, t) + 1e-12).all()
    for f in (iou, iop, iot):
        np.testing.assert_array_equal(f(masks, masks), 1.0)
        np.testing.assert_array_equal(f(~masks, masks), 0.0)


def test_overlap_scores_both_rules():
    a = np.array([[[-1.0, 0.2], [0.6, 1.0]]])
    m = np.array([[[0, 1], [0, 1]]], bool)
    rao = overlap_scores(a, m, threshold=0.5)  # kept: 0.6 and 1.0 -> bottom row
    assert rao["iou"] == pytest.approx([1 / 3]) and rao["iop"] == pytest.approx([0.5]) and rao["iot"] == pytest.approx([0.5])
    viviano = overlap_scores(a, m)  # |M| = 2 -> the two largest values
    assert viviano["iou"] == pytest.approx([1 / 3])
    assert binarise_min_max(np.ones((1, 3, 3))).sum() == 0  # constant map keeps nothing
    assert overlap_scores(np.ones((1, 2, 2)), m, threshold=0.5)["iou"].tolist() == [0.0]


# ----------------------------------------------------------------------------- boxes (Phang)


def test_box_iou_known_values():
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert box_iou([0, 0, 2, 2], [0, 0, 2, 2]) == pytest.approx(1.0)
    assert box_iou([0, 0, 2, 2], [2, 2, 4, 4]) == pytest.approx(0.0)
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    a = np.array([[0, 0, 4, 4], [1, 1, 3, 3]])
    pairwise = box_iou(a[:, None], a[None])
    np.testing.assert_allclose(pairwise, pairwise.T)
    assert pairwise[0, 1] == pytest.approx(4 / 16)


def test_saliency_box_largest_component_and_empty_map():
    m = np.zeros((2, 8, 8))
    m[0, 0:2, 0:2] = 1.0  # small blob (4 px)
    m[0, 4:7, 3:8] = 1.0  # large blob (15 px)
    # image 1 stays constant: empty binarisation -> (0, 0, 0, 0)
    boxes = saliency_box(m[:, None])
    assert boxes.tolist() == [[3, 4, 8, 7], [0, 0, 0, 0]]
    assert saliency_box(m, reproduce_offbyone=True)[0].tolist() == [3, 4, 7, 6]
    assert localisation_error(boxes[1:], [[0, 0, 8, 8]]).tolist() == [1.0]


def test_saliency_box_connectivity():
    m = np.zeros((1, 5, 5))
    m[0, 0, 0] = m[0, 1, 1] = m[0, 2, 2] = 1.0  # diagonal chain
    m[0, 4, 3:5] = 1.0  # a 2-px horizontal piece
    assert saliency_box(m, connectivity=4)[0].tolist() == [3, 4, 5, 5]
    assert saliency_box(m, connectivity=8)[0].tolist() == [0, 0, 3, 3]


def test_localisation_error_and_official_metric_hand_made():
    pred = np.array([[0, 0, 10, 10]] * 4)
    gts = [
        np.array([[0, 0, 10, 10]]),  # IoU 1
        np.array([[5, 5, 15, 15]]),  # IoU 25/175
        np.array([[20, 20, 30, 30], [0, 0, 10, 12]]),  # best IoU 100/120
        np.array([[0, 0, 10, 20]]),  # IoU exactly 0.5: not > 0.5, an error
    ]
    assert localisation_error(pred, gts).tolist() == [0.0, 1.0, 0.0, 1.0]
    predicted, true = np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])
    assert official_metric(pred, gts, predicted, true).tolist() == [0.0, 1.0, 1.0, 1.0]
    assert (official_metric(pred, gts, true, true) == localisation_error(pred, gts)).all()


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1))
def test_official_metric_never_below_localisation_error(seed):
    rng = np.random.default_rng(seed)
    corner = rng.integers(0, 10, size=(6, 2))
    pred = np.concatenate([corner, corner + rng.integers(1, 10, size=(6, 2))], axis=1)
    gt_corner = rng.integers(0, 10, size=(6, 2))
    gt = np.concatenate([gt_corner, gt_corner + rng.integers(1, 10, size=(6, 2))], axis=1)
    labels, predicted = rng.integers(0, 3, 6), rng.integers(0, 3, 6)
    assert (official_metric(pred, gt, predicted, labels) >= localisation_error(pred, gt)).all()
    assert localisation_error(gt, gt).tolist() == [0.0] * 6  # ground-truth boxes as predictions


def test_f1_mask_hand_computed():
    m = np.full((1, 4, 4), 0.5)  # Σm = 8
    box = [[[0, 0, 2, 2]]]  # area 4, Σ m·g = 2 -> P = 1/4, R = 1/2, F1 = 1/3
    assert f1_mask(m, box) == pytest.approx([1 / 3], abs=1e-5)
    two = [np.array([[0, 0, 2, 2], [0, 0, 4, 4]])]  # second box: P = 1, R = 1/2, F1 = 2/3
    assert f1_mask(m, two, reduce="max") == pytest.approx([2 / 3], abs=1e-5)
    assert f1_mask(m, two, reduce="mean") == pytest.approx([0.5], abs=1e-5)
    gt = boxes_to_mask([[1, 0, 3, 4]], 4, 4)
    assert f1_mask(gt.astype(float), gt) == pytest.approx([1.0], abs=1e-5)  # card §7.10: F1 ≈ 1


def test_saliency_metric_known_values():
    assert saliency_metric([0.25], [0.5]) == pytest.approx([np.log(0.5)])
    assert saliency_metric([1.0], [1.0]).tolist() == [0.0]  # full box, p = 1
    parts = saliency_metric([0.01, 0.5], [0.2, 0.9], return_parts=True)
    assert parts["sm1"][0] == pytest.approx(np.log(0.05))  # area floor
    np.testing.assert_allclose(parts["sm"], parts["sm1"] - parts["sm2"])
    assert box_area_fraction([[0, 0, 32, 16]], 64, 64) == pytest.approx([0.125])


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_value_error():
    m = top_left_mask()
    good = np.ones((1, 4, 4))
    nan = good.copy()
    nan[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        energy_pointing_game(nan, m)
    with pytest.raises(ValueError, match="Inf"):
        pointing_game(np.full((1, 4, 4), np.inf), m)
    with pytest.raises(ValueError, match="shape"):
        energy_pointing_game(good, np.ones((1, 4, 5), bool))
    with pytest.raises(ValueError, match="empty"):
        energy_pointing_game(good, np.zeros((1, 4, 4), bool))
    with pytest.raises(ValueError, match="empty"):
        iot(good.astype(bool), np.zeros((1, 4, 4), bool))
    with pytest.raises(ValueError, match="binary"):
        iou(good, np.full((1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="one channel"):
        pointing_game(np.ones((1, 3, 4, 4)), m)
    with pytest.raises(ValueError, match="unknown ties"):
        pointing_game(good, m, ties="last")
    with pytest.raises(ValueError, match="unknown threshold"):
        overlap_scores(good, m, threshold="median")
    with pytest.raises(ValueError, match="sum to 0"):
        relevance_mass_accuracy(np.zeros((1, 4, 4)), m)
    with pytest.raises(ValueError, match="x1 < x0"):
        box_iou([2, 0, 1, 1], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="no ground-truth box"):
        localisation_error([[0, 0, 1, 1]], [np.zeros((0, 4))])
    with pytest.raises(ValueError, match="prob"):
        saliency_metric([0.5], [0.0])
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(good, m, tolerance=-1)


# ----------------------------------------------------------------------------- box rasteriser


def test_rasterise_boxes_known_answer_widening_and_clipping():
    from study.metrics.localisation import rasterise_boxes

    mask = rasterise_boxes([[1, 0, 3, 2]], 4, 5)  # columns 1-2, rows 0-1
    expected = np.zeros((4, 5), bool)
    expected[0:2, 1:3] = True
    assert (mask == expected).all()
    # fractional: floor the start, ceil the end; the second box is clipped to the image
    mask = rasterise_boxes(np.array([[0.5, 1.2, 1.5, 1.8], [3.5, 3.5, 9.0, 9.0]]), 4, 5)
    expected = np.zeros((4, 5), bool)
    expected[1:2, 0:2] = True
    expected[3:4, 3:5] = True
    assert (mask == expected).all()
    assert not rasterise_boxes(np.zeros((0, 4)), 3, 3).any()
    assert not rasterise_boxes([[-5, -5, -1, -1]], 3, 3).any()  # wholly outside
    with pytest.raises(ValueError, match="height and width"):
        rasterise_boxes([[0, 0, 1, 1]], 0, 3)
    with pytest.raises(ValueError, match="x1 < x0"):
        rasterise_boxes([[2, 0, 1, 1]], 3, 3)
    with pytest.raises(ValueError, match="finite|NaN"):
        rasterise_boxes([[0, 0, np.nan, 1]], 3, 3)


def test_every_box_to_mask_conversion_agrees():
    # the three public converters (localisation, attribution, guidance) go through one rasteriser
    from study import attribution, guidance

    rows = np.array([[2, 0.5, 1.2, 3.5, 2.1], [1, 2, 2, 6, 6], [2, 4.7, 0, 5.2, 1.0]])
    by_class = guidance.class_box_masks([rows], 3, 5, 6)[0]
    for cls in (1, 2):
        reference = boxes_to_mask([rows[rows[:, 0] == cls, 1:]], 5, 6)[0]
        assert (by_class[cls].numpy() == reference).all()
        drawn = attribution.boxes_to_masks([rows], 5, 6, classes=[cls])[0, 0].numpy().astype(bool)
        assert (drawn == reference).all()
    assert not by_class[0].any()
