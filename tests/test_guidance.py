"""study.guidance: the invariants of the Rao et al. 2023 card (§7), hand-computed known answers on
tiny tensors, the defining properties of the toy model families, and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from study import attribution, metrics
from study import guidance as G


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)[None, None]


def _map(rows):
    return torch.tensor(rows, dtype=torch.float32)[None, None]



pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------- EPG (card §7.1)


def test_epg_of_a_uniform_map_is_the_box_area_fraction():
    masks = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    masks[0, :, :2, :2] = True          # 4/64
    masks[1, :, 2:6, 1:7] = True        # 24/64
    masks[2] = True                     # 64/64
    epg = G.energy_pointing_game(torch.full((3, 1, 8, 8), 0.7), masks)
    assert torch.allclose(epg, torch.tensor([4 / 64, 24 / 64, 1.0]))
    data = G.GuidanceData(torch.zeros(3, 3, 8, 8), torch.tensor([[1.0, 0], [1, 1], [0, 1]]),
                          torch.stack([masks[:, 0], masks[:, 0]], 1))
    # pairs: (0,0) 4/64, (1,0) 24/64, (1,1) 24/64, (2,1) 1
    assert G.uniform_map_epg(data) == pytest.approx((4 + 24 + 24 + 64) / 64 / 4)


def test_epg_is_scale_invariant_and_extreme_values():
    maps = torch.randn(4, 1, 6, 6)
    masks = torch.rand(4, 1, 6, 6) > 0.5
    assert torch.allclose(G.energy_pointing_game(maps, masks), G.energy_pointing_game(3.7 * maps, masks), atol=1e-6)
    box = _mask([[1, 1, 0], [0, 0, 0], [0, 0, 0]])
    assert G.energy_pointing_game(_map([[2, 1, -5], [0, -1, 0], [0, 0, 0]]), box).item() == 1.0
    assert G.energy_pointing_game(_map([[-2, 0, 5], [0, 1, 0], [0, 0, 3]]), box).item() == 0.0
    # hand-computed: positive mass 2 + 1 inside (of 2 + 1 + 1 + 4 = 8)
    assert G.energy_pointing_game(_map([[2, 1, 1], [0, -3, 4], [0, 0, 0]]), box).item() == pytest.approx(3 / 8)
    # card Q5: a map without positive energy scores 0 (and still counts)
    assert G.energy_pointing_game(_map([[-1, 0, 0], [0, 0, 0], [0, 0, -2]]), box).item() == 0.0


def test_epg_matches_the_engine_metric():
    maps = torch.randn(5, 1, 7, 7)
    masks = torch.rand(5, 1, 7, 7) > 0.6
    masks[:, :, 0, 0] = True
    expected = metrics.energy_pointing_game(maps, masks)
    assert np.allclose(G.energy_pointing_game(maps, masks).numpy(), expected, atol=1e-6)


# ----------------------------------------------------------------------------- losses (card §7.2–7.5)


def test_energy_loss_is_one_minus_epg_and_survives_dead_maps():
    box = _mask([[1, 1, 0], [0, 0, 0], [0, 0, 0]])
    assert G.energy_loss(_map([[2, 1, 1], [0, -3, 4], [0, 0, 0]]), box).item() == pytest.approx(1 - 3 / 8)
    dead = torch.full((1, 1, 3, 3), -0.5, requires_grad=True)        # every attribution <= 0
    loss = G.energy_loss(dead, box)
    loss.backward()
    assert loss.item() == 1.0 and torch.isfinite(dead.grad).all()
    tiny = torch.zeros(1, 1, 3, 3)
    tiny[0, 0, 0, 0] = 5e-8                                             # den < 1e-7: loss = 1 − num
    assert G.energy_loss(tiny, box).item() == pytest.approx(1 - 5e-8)


def test_l1_loss_zero_on_the_mask_and_hand_value():
    box = _mask([[1, 1], [0, 0]])
    assert G.l1_loss(_map([[3.0, 3.0], [-1.0, 0.0]]), box).item() == 0.0     # Â⁺ = mask after clamp and max
    # Â⁺ = [[1, .5], [0, .25]] → |1-1| + |1-.5| + 0 + |0-.25| = .75 over 4 pixels
    assert G.l1_loss(_map([[4.0, 2.0], [-8.0, 1.0]]), box).item() == pytest.approx(0.75 / 4)


def test_rrr_star_zero_outside_and_hand_value():
    box = _mask([[1, 0], [0, 0]])
    assert G.rrr_star_loss(_map([[-7.0, 0.0], [0.0, 0.0]]), box).item() == 0.0
    # Â = A / max|A| = [[1, -.5], [0, .5]]: outside squares .25 + 0 + .25 (a sum, sign kept)
    assert G.rrr_star_loss(_map([[2.0, -1.0], [0.0, 1.0]]), box).item() == pytest.approx(0.5)


def test_ppce_zero_when_box_is_saturated_and_100_when_empty():
    box = _mask([[1, 1], [0, 0]])
    assert G.ppce_loss(_map([[5.0, 5.0], [1.0, -2.0]]), box).item() == pytest.approx(0.0, abs=1e-6)
    assert G.ppce_loss(_map([[0.0, -1.0], [1.0, 2.0]]), box).item() == pytest.approx(100.0)   # log clamp (Q4)
    # Â⁺ = [[1, .5], ...]: −(log 1 + log .5) / 2
    assert G.ppce_loss(_map([[2.0, 1.0], [0.0, 0.0]]), box).item() == pytest.approx(np.log(2) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="non-empty mask"):
        G.ppce_loss(_map([[1.0, 1.0], [1.0, 1.0]]), _mask([[0, 0], [0, 0]]))


def test_losses_sum_over_the_batch_and_upsample_after_the_clamp():
    maps = torch.randn(3, 1, 4, 4)
    masks = torch.rand(3, 1, 8, 8) > 0.5
    for name in ("energy", "l1", "rrr"):
        per_image = G.guidance_loss(name, maps, masks, reduction="none")
        assert per_image.shape == (3,)
        assert G.guidance_loss(name, maps, masks).item() == pytest.approx(per_image.sum().item(), rel=1e-6)
    # clamp → upsample: a negative neighbour does not leak into the upsampled positive mass
    small = _map([[1.0, -3.0], [0.0, 0.0]])
    box = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    box[..., :2, :2] = True
    positive = F.interpolate(small.clamp(min=0), size=(4, 4), mode="bilinear", align_corners=False)
    expected = 1 - (positive * box).sum() / positive.sum()
    assert G.energy_loss(small, box).item() == pytest.approx(expected.item())
    wrong_order = F.interpolate(small, size=(4, 4), mode="bilinear", align_corners=False).clamp(min=0)
    assert (1 - (wrong_order * box).sum() / wrong_order.sum()).item() != pytest.approx(expected.item())


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, 2, 3, 3), "shape"),
    (torch.full((1, 1, 3, 3), float("nan")), "NaN"),
    (torch.zeros(1, 1, 3, 3, dtype=torch.int64), "float"),
])
def test_losses_reject_bad_maps(bad, match):
    with pytest.raises(ValueError, match=match):
        G.energy_loss(bad, torch.ones(1, 1, 3, 3, dtype=torch.bool))


def test_losses_reject_bad_masks_and_names():
    maps = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="binary"):
        G.l1_loss(maps, torch.full((1, 1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="at least as large"):
        G.l1_loss(maps, torch.ones(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="B = 1"):
        G.l1_loss(maps, torch.ones(2, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown loss"):
        G.guidance_loss("dice", maps, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction"):
        G.energy_loss(maps, torch.ones(1, 1, 4, 4, dtype=torch.bool), reduction="max")


# ----------------------------------------------------------------------------- F1, IoU (card §7.6–7.7)


def test_micro_f1_hand_computed():
    logits = torch.tensor([[1.0, -1, 0, -2], [-1, 2, -3, 0.5], [0.1, 0.2, -0.1, -5]])
    labels = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0], [1, 0, 0, 0]])
    # predictions (logit >= 0): [1,0,1,0], [0,1,0,1], [1,1,0,0] → TP 3, FP 3, FN 2
    assert G.micro_f1(logits, labels) == pytest.approx(6 / (6 + 3 + 2))
    assert G.micro_f1(logits, labels) == pytest.approx(f1_score(labels.numpy(), (logits >= 0).numpy(), average="micro"))
    assert G.micro_f1(torch.full((2, 3), -1.0), torch.zeros(2, 3)) == 0.0
    with pytest.raises(ValueError, match="both be"):
        G.micro_f1(logits, labels[:2])
    with pytest.raises(ValueError, match="multi-hot"):
        G.micro_f1(logits, labels * 2)


def test_iou_matches_a_brute_force_count_and_the_engine():
    rng = np.random.default_rng(0)
    maps = torch.tensor(rng.normal(size=(4, 1, 6, 6)), dtype=torch.float32)
    masks = torch.tensor(rng.random((4, 1, 6, 6)) > 0.5)
    thresholds = (0.1, 0.5, 0.9)
    curve = G.iou_curve(maps, masks, thresholds)
    for b in range(4):
        positive = maps[b, 0].clamp(min=0).numpy()
        normalised = (positive - positive.min()) / (positive.max() - positive.min())
        for t_index, t in enumerate(thresholds):
            pred = normalised >= t
            truth = masks[b, 0].numpy()
            expected = (pred & truth).sum() / (pred | truth).sum()
            assert curve[b, t_index].item() == pytest.approx(expected)
    engine = metrics.iou(metrics.binarise_min_max(maps, 0.5), masks)
    assert np.allclose(curve[:, 1].numpy(), engine)
    # empty union → 0: a map without positive values and an empty mask
    assert G.iou_curve(-torch.ones(1, 1, 3, 3), torch.zeros(1, 1, 3, 3, dtype=torch.bool)).eq(0).all()


def test_tuned_threshold_picks_the_best_validation_iou():
    curve = [0.1] * len(G.IOU_THRESHOLDS)
    curve[3] = 0.4
    assert G.tuned_iou(curve) == (G.IOU_THRESHOLDS[3], 0.4)


# ----------------------------------------------------------------------------- models (card §7.8–7.9)


def test_model_layers_have_the_card_resolutions():
    images = torch.rand(2, 3, 64, 64)
    for family in G.FAMILIES:
        model = G.build_model(family, 6).eval()
        expected = {"input": (6 if family == "bcos" else 3, 64), "mid": (32, 16), "final": (128, 8)}
        for layer, (channels, size) in expected.items():
            activation, logits = model.stages(images, layer)
            assert activation.shape == (2, channels, size, size) and logits.shape == (2, 6)
            maps, _ = G.layer_attribution(model, images, torch.tensor([0, 5]), layer)
            assert maps.shape == (2, 1, size, size)
        assert torch.allclose(model(images), logits, atol=1e-6)


def test_xdnn_ixg_equals_integrated_gradients_and_completeness():
    torch.manual_seed(0)
    model = G.build_model("xdnn", 3, (4, 8, 8, 8)).eval()
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    images = torch.rand(2, 3, 16, 16)
    targets = torch.tensor([0, 2])
    ixg, logits = G.layer_attribution(model, images, targets, "input", "ixg")
    intgrad = attribution.explain(model, images, targets, "integrated_gradients", baseline="zero", steps=256)
    assert (ixg - intgrad).abs().max() / ixg.abs().max() < 1e-3
    completeness = ixg.sum(dim=(1, 2, 3))
    assert torch.allclose(completeness, logits.gather(1, targets[:, None])[:, 0] - model.fc.bias[targets], atol=1e-4)
    assert torch.allclose(model(2.5 * images) - model.fc.bias, 2.5 * (model(images) - model.fc.bias), atol=1e-4)


def test_bcos_layer_is_abs_cos_times_linear():
    torch.manual_seed(1)
    layer = G.BcosConv2d(2, 3, kernel_size=3)
    x = torch.randn(1, 2, 5, 5)
    out = layer(x)
    patches = F.unfold(x, 3, padding=1)[0].T                      # (25 positions, 18)
    w_hat = layer.weight.flatten(1) / layer.weight.flatten(1).norm(dim=1, keepdim=True)
    linear = patches @ w_hat.T                                     # ŵᵀp
    cosine = linear / (patches.norm(dim=1, keepdim=True) + 1e-6)
    expected = (cosine.abs() * linear).T.reshape(1, 3, 5, 5)
    assert torch.allclose(out, expected, atol=1e-5)
    assert float(layer.unit_weight().detach().flatten(1).norm(dim=1).sub(1).abs().max()) < 1e-6


def test_bcos_contributions_sum_to_the_logit():
    torch.manual_seed(2)
    model = G.build_model("bcos", 4, (4, 8, 8, 8), logit_bias=-1.5, layer_scale="sqrt_fan_in").eval()
    images = torch.rand(3, 3, 16, 16)
    targets = torch.tensor([0, 3, 1])
    for layer in G.LAYERS:
        maps, logits = G.layer_attribution(model, images, targets, layer, "bcos")
        expected = logits.gather(1, targets[:, None])[:, 0] + 1.5
        assert torch.allclose(maps.sum(dim=(1, 2, 3)), expected, rtol=1e-4, atol=1e-4), layer
    # explanation mode changes the gradient, not the forward value
    with G.explanation_mode(model):
        assert torch.allclose(model(images), logits)
    assert not any(m.explain for m in model.modules() if isinstance(m, G.BcosConv2d))


def test_attribution_rejects_mismatched_methods_and_targets():
    vanilla, bcos = G.build_model("vanilla", 3, (4, 4, 4, 4)), G.build_model("bcos", 3, (4, 4, 4, 4))
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="does not fit"):
        G.layer_attribution(vanilla, images, torch.tensor([0, 1]), "input", "bcos")
    with pytest.raises(ValueError, match="does not fit"):
        G.layer_attribution(bcos, images, torch.tensor([0, 1]), "input", "ixg")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        G.layer_attribution(vanilla, images, torch.tensor([0, 3]), "input")
    with pytest.raises(ValueError, match="unknown layer"):
        G.layer_attribution(vanilla, images, torch.tensor([0, 1]), "layer9")
    with pytest.raises(ValueError, match="unknown family"):
        G.build_model("resnet", 3)
    gradcam, _ = G.layer_attribution(vanilla.eval(), images, torch.tensor([0, 1]), "final", "gradcam")
    assert (gradcam >= 0).all()


# ----------------------------------------------------------------------------- training step (card §7.10, §7.13)


def _batch():
    torch.manual_seed(3)
    images = torch.rand(6, 3, 16, 16)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1], [1, 0, 0], [0, 1, 1]])
    masks = torch.zeros(6, 3, 16, 16, dtype=torch.bool)
    masks[:, :, 4:12, 4:12] = True
    return images, labels, masks


@pytest.mark.parametrize("family", G.FAMILIES)
def test_lambda_zero_is_the_plain_classification_step(family):
    images, labels, masks = _batch()
    torch.manual_seed(4)
    model = G.freeze_batchnorm(G.build_model(family, 3, (4, 4, 8, 8)))
    params = list(model.parameters())
    plain = torch.autograd.grad(F.binary_cross_entropy_with_logits(model(images), labels), params)

    def step_gradients(lam):
        total, parts = G.guidance_step_loss(model, images, labels, masks, torch.ones(6, dtype=torch.bool), loss="energy",
                                            layer="input", method=None, lam=lam, generator=torch.Generator().manual_seed(0))
        return torch.autograd.grad(total, params), parts

    zero, parts = step_gradients(0.0)
    assert parts["annotated"] == 6 and parts["loc"] > 0
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))
    guided, _ = step_gradients(1.0)
    assert any(not torch.allclose(a, b) for a, b in zip(plain, guided))


def test_step_uses_only_annotated_images():
    images, labels, masks = _batch()
    model = G.freeze_batchnorm(G.build_model("vanilla", 3, (4, 4, 8, 8)))
    annotated = torch.tensor([True, False, False, False, False, False])
    _, parts = G.guidance_step_loss(model, images, labels, masks, annotated, loss="l1", layer="final", method=None,
                                    lam=1.0, generator=torch.Generator().manual_seed(0))
    assert parts["annotated"] == 1
    _, none = G.guidance_step_loss(model, images, labels, masks, torch.zeros(6, dtype=torch.bool), loss="l1",
                                   layer="final", method=None, lam=1.0, generator=torch.Generator().manual_seed(0))
    assert none["loc"] == 0.0


def test_loss_classes_are_positive_classes():
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 1]] * 50)
    generator = torch.Generator().manual_seed(0)
    drawn = torch.stack([G.sample_loss_classes(labels, generator) for _ in range(20)])
    assert (labels[torch.arange(150).expand(20, -1), drawn] == 1).all()
    assert set(drawn[:, 0].tolist()) == {0, 2}                      # both positives of image 0 get drawn
    with pytest.raises(ValueError, match="positive class"):
        G.sample_loss_classes(torch.zeros(2, 3), generator)


# ----------------------------------------------------------------------------- annotations (card §7.11–7.12)


def test_limited_annotation_keeps_exactly_int_f_n_deterministically():
    for n, f in ((2000, 0.01), (800, 0.1), (96, 0.1), (10, 1.0)):
        kept = G.limited_annotation(n, f, seed=5)
        assert kept.sum() == int(f * n)
        assert np.array_equal(kept, G.limited_annotation(n, f, seed=5))
    assert not np.array_equal(G.limited_annotation(800, 0.1, 5), G.limited_annotation(800, 0.1, 6))
    with pytest.raises(ValueError, match="fraction"):
        G.limited_annotation(10, 1.5, 0)


def test_dilated_boxes_contain_the_originals_and_stay_inside():
    boxes = np.array([[0, 10, 20, 30, 30], [1, 0, 0, 8, 4], [2, 50, 60, 64, 64]])
    assert np.array_equal(G.dilate_boxes(boxes, 0.0, 64, 64), boxes)
    grown = G.dilate_boxes(boxes, 0.25, 64, 64)
    assert grown[0].tolist() == [0, 5, 18, 35, 32]                  # w 20 → ±5, h 10 → ±2.5 → 2 (round half even)
    assert (grown[:, 1:3] <= boxes[:, 1:3]).all() and (grown[:, 3:] >= boxes[:, 3:]).all()
    assert (grown[:, 1:] >= 0).all() and (grown[:, 3:] <= 64).all() and (grown[:, 0] == boxes[:, 0]).all()
    with pytest.raises(ValueError, match="fraction"):
        G.dilate_boxes(boxes, -0.1, 64, 64)


def test_class_masks_are_unions_of_boxes_and_objects():
    boxes = [np.array([[0, 0, 0, 2, 2], [0, 3, 3, 4, 4], [2, 1, 1, 3, 3]])]
    masks = G.class_box_masks(boxes, 3, 4, 4)
    assert masks.shape == (1, 3, 4, 4)
    assert masks[0, 0].sum() == 5 and masks[0, 1].sum() == 0 and masks[0, 2].sum() == 4
    objects = [np.zeros((3, 4, 4), bool)]
    objects[0][0, 0, 0] = objects[0][1, 3, 3] = objects[0][2, 2, 2] = True
    seg = G.class_object_masks(objects, boxes, 3)
    assert seg[0, 0].sum() == 2 and seg[0, 2, 2, 2] and not seg[0, 1].any()
    with pytest.raises(ValueError, match="outside"):
        G.class_box_masks([np.array([[5, 0, 0, 1, 1]])], 3, 4, 4)


# ----------------------------------------------------------------------------- Pareto (card §7.14)


def test_pareto_front_keeps_only_non_dominated_binned_points():
    points = np.array([
        [0.80, 0.50, 0.30],   # front
        [0.70, 0.60, 0.20],   # front (trade-off)
        [0.79, 0.49, 0.29],   # dominated by the first on all three
        [0.802, 0.501, 0.301],  # same bins as the first: a tie, kept
        [0.60, 0.40, 0.40],   # front (best IoU)
        [0.60, 0.40, 0.10],   # dominated by the previous
    ])
    assert G.pareto_mask(points).tolist() == [True, True, False, True, True, False]
    assert G.pareto_mask(points[:1]).tolist() == [True]
    with pytest.raises(ValueError, match="NaN"):
        G.pareto_mask(np.array([[np.nan, 1.0]]))


def test_hypervolume_2d_known_answer():
    # staircase above (0, 0): (1, 1) and (0.5, 2) → 1·1 + 0.5·1
    assert G.hypervolume_2d([[1.0, 1.0], [0.5, 2.0], [0.4, 0.5]], (0.0, 0.0)) == pytest.approx(1.5)
    assert G.hypervolume_2d([[0.1, 0.1]], (0.2, 0.0)) == 0.0


def test_evaluate_reports_f1_epg_and_on_object_share():
    torch.manual_seed(0)
    model = G.build_model("vanilla", 2, (4, 4, 4, 4)).eval()
    images = torch.rand(3, 3, 16, 16)
    labels = torch.tensor([[1.0, 0], [1, 1], [0, 1]])
    boxes = torch.zeros(3, 2, 16, 16, dtype=torch.bool)
    boxes[:, :, 2:10, 2:10] = True
    data = G.GuidanceData(images, labels, boxes, object_masks=boxes.clone())
    scores = G.evaluate(model, data, "input")
    assert scores["pairs"] == 4 and len(scores["iou_curve"]) == len(G.IOU_THRESHOLDS)
    assert scores["on_object"] == pytest.approx(1.0)                # objects fill their boxes here
    maps, _ = G.layer_attribution(model, images[[0, 1, 1, 2]], torch.tensor([0, 0, 1, 1]), "input")
    assert scores["epg"] == pytest.approx(G.energy_pointing_game(maps, boxes[[0, 1, 1, 2], 0][:, None]).mean().item())
    with pytest.raises(ValueError, match="class_masks"):
        G.GuidanceData(images, labels, boxes[:, :1])


def test_finetune_evaluates_test_exactly_on_the_final_validation_front():
    torch.manual_seed(0)
    images, labels, masks = _batch()
    data = G.GuidanceData(images, labels, masks)
    model = G.build_model("vanilla", 3, (4, 4, 4, 4))
    calls = []
    result = G.guided_finetune(model, data, data, loss="energy", layer="input", lam=1.0, epochs=5, lr=1e-2,
                               batch_size=4, on_front=lambda m: calls.append(1) or {"f1": 0.5, "epg": 0.5, "iou_curve":
                                                                                   [0.1] * len(G.IOU_THRESHOLDS)})
    history = result["history"]
    points = [[h["valid_f1"], h["valid_epg"], h["valid_iou"]] for h in history]
    on_front = G.pareto_mask(points)
    assert [("test_epg" in h) for h in history] == on_front.tolist() and len(calls) == on_front.sum()
    assert all(h["test_iou"] == 0.1 for h in history if "test_epg" in h)
    assert set(result["state"]) == set(model.state_dict())
    with pytest.raises(ValueError, match="lam"):
        G.guided_finetune(model, data, data, loss="energy", layer="input", lam=-1.0, epochs=1)


@pytest.mark.parametrize("family", ["vanilla", "bcos"])
def test_guided_finetune_through_the_engine_is_the_plain_loop(family):
    """Stage 2 runs on `train.fit`: same weights and losses as a hand-written loop over seeded
    `randperm` batches that shares its generator with the loss-class draws."""
    images, labels, masks = _batch()
    annotated = torch.tensor([True, False, True, True, False, True])
    data = G.GuidanceData(images, labels, masks, annotated=annotated)
    torch.manual_seed(5)
    base = G.build_model(family, 3, (4, 4, 4, 4))
    reference = G.build_model(family, 3, (4, 4, 4, 4))
    reference.load_state_dict(base.state_dict())
    generator, opt, class_sums = torch.Generator().manual_seed(7), torch.optim.Adam(reference.parameters(), lr=1e-2), []
    for _ in range(2):
        G.freeze_batchnorm(reference)
        class_sums.append(0.0)
        for rows in G._batches(len(data), 4, generator):
            total, parts = G.guidance_step_loss(reference, images[rows], labels[rows], masks[rows], annotated[rows],
                                                loss="energy", layer="input", method=None, lam=1.0, generator=generator)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            class_sums[-1] += float(parts["class"]) * len(rows)
    result = G.guided_finetune(base, data, None, loss="energy", layer="input", lam=1.0, epochs=2, lr=1e-2,
                               batch_size=4, seed=7)
    for (name, a), b in zip(reference.state_dict().items(), result["state"].values()):
        assert torch.equal(a, b), name
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert [h["train_class"] for h in result["history"]] == [s / 6 for s in class_sums]


def test_train_baseline_keeps_the_validation_f1_best_epoch():
    images, labels, masks = _batch()
    data = G.GuidanceData(images, labels, masks)
    torch.manual_seed(6)
    model, history = G.train_baseline(G.build_model("vanilla", 3, (4, 4, 4, 4)), data, data, epochs=4, lr=5e-2,
                                      batch_size=4, seed=1)
    f1s = [h["valid_f1"] for h in history]
    assert G.micro_f1(G.predict_logits(model, images), labels) == pytest.approx(max(f1s))
    assert {"epoch", "train_loss", "valid_f1", "seconds", "cpu_seconds"} == set(history[0])


# ----------------------------------------------------------------------------- devices (issue 13)


def test_evaluation_moves_the_model_to_the_device_it_is_given():
    """A model loaded from the cache sits on the CPU; `predict_logits` and `evaluate` must move it to
    the device their inputs go to (on a GPU: 'Input type (torch.cuda.FloatTensor) and weight type
    (torch.FloatTensor) should be the same'). Checked on the CPU with a spy on `.to`."""
    torch.manual_seed(0)
    model = G.build_model("vanilla", 2, (4, 4, 4, 4)).eval()
    moved = []
    original = model.to
    model.to = lambda *args, **kwargs: (moved.append(torch.device(args[0]) if args else kwargs["device"]),
                                        original(*args, **kwargs))[1]
    images = torch.rand(3, 3, 16, 16)
    labels = torch.tensor([[1.0, 0], [1, 1], [0, 1]])
    boxes = torch.zeros(3, 2, 16, 16, dtype=torch.bool)
    boxes[:, :, 2:10, 2:10] = True
    G.predict_logits(model, images, device="cpu")
    assert moved == [torch.device("cpu")]
    moved.clear()
    G.evaluate(model, G.GuidanceData(images, labels, boxes), "input", device="cpu")
    assert moved and set(moved) == {torch.device("cpu")}


def test_attribution_rejects_a_model_on_another_device():
    model = G.build_model("vanilla", 2, (4, 4, 4, 4)).to("meta")
    with pytest.raises(ValueError, match="model is on meta but images are on cpu"):
        G.layer_attribution(model, torch.rand(2, 3, 16, 16), torch.tensor([0, 1]), "input")


def test_evaluate_per_pair_scores_match_the_means():
    torch.manual_seed(0)
    model = G.build_model("vanilla", 2, (4, 4, 4, 4)).eval()
    labels = torch.tensor([[1.0, 0], [1, 1], [0, 1]])
    boxes = torch.zeros(3, 2, 16, 16, dtype=torch.bool)
    boxes[:, :, 2:10, 2:10] = True
    scores = G.evaluate(model, G.GuidanceData(torch.rand(3, 3, 16, 16), labels, boxes), "input", per_pair=True)
    assert scores["pair_image"].tolist() == [0, 1, 1, 2]
    assert scores["pair_iou"].shape == (4, len(G.IOU_THRESHOLDS))
    assert scores["pair_iou"].mean(0).tolist() == pytest.approx(scores["iou_curve"])
    assert float(scores["pair_epg"].mean()) == pytest.approx(scores["epg"])
