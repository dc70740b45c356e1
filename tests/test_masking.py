"""Masking objectives, masks and the masker (Phang et al. 2020): known answers, card §7 invariants, bad inputs."""

import study  # noqa: F401  (must precede torchvision imports)

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from study import masking
from study.masking import (
    HistoricZoo,
    Masker,
    MaskerSpec,
    PartsClassifier,
    blur_images,
    border_pixels,
    gated_area_penalty,
    gumbel_eval_mask,
    gumbel_sigmoid,
    infill_in,
    infill_out,
    mask_in,
    mask_out,
    masked_in_loss,
    masked_out_loss,
    masker_objective,
    prediction_entropy,
    total_variation,
)

PROPERTY = settings(max_examples=30, deadline=None)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_classifier(seed=0, num_classes=3):
    torch.manual_seed(seed)
    return PartsClassifier(num_classes, widths=(4, 4, 8, 8), stem_stride=2).eval()


def tiny_data(n=12, size=32, num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % num_classes


# ----------------------------------------------------------------------------- classification terms


def test_masked_in_ce_known_answer():
    logits = torch.log(torch.tensor([[1.0, 3.0], [1.0, 3.0]]))  # softmax (0.25, 0.75)
    labels = torch.tensor([1, 0])
    expected = (-math.log(0.75) - math.log(0.25)) / 2
    assert masked_in_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_masked_in_entropy_variant_is_mean_entropy():
    logits = torch.zeros(2, 5)
    assert masked_in_loss(logits, torch.tensor([0, 1]), kind="entropy").item() == pytest.approx(math.log(5), abs=1e-6)


def test_masked_out_entropy_is_minus_log_k_for_uniform_predictions():
    logits = torch.zeros(4, 10)
    labels = torch.tensor([0, 1, 2, 3])
    assert masked_out_loss(logits, labels, torch.ones(4)).item() == pytest.approx(-math.log(10), abs=1e-6)
    # images the classifier gets wrong when clean contribute nothing, but stay in the batch mean
    assert masked_out_loss(logits, labels, torch.tensor([1, 0, 1, 0])).item() == pytest.approx(-math.log(10) / 2,
                                                                                             abs=1e-6)
    assert masked_out_loss(logits, labels, torch.zeros(4)).item() == 0.0


def test_masked_out_ce_variant_known_answer():
    logits = torch.log(torch.tensor([[1.0, 3.0], [1.0, 1.0]]))
    labels = torch.tensor([1, 0])
    gate = torch.tensor([True, True])
    expected = -(-math.log(0.75) - math.log(0.5)) / 2
    assert masked_out_loss(logits, labels, gate, kind="ce").item() == pytest.approx(expected, abs=1e-6)


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(2, 12))
def test_entropy_at_most_log_k_with_equality_for_equal_logits(seed, k):
    logits = torch.randn(5, k, generator=torch.Generator().manual_seed(seed)) * 3
    assert (prediction_entropy(logits) <= math.log(k) + 1e-6).all()
    assert prediction_entropy(torch.full((2, k), 1.7)) == pytest.approx([math.log(k)] * 2, abs=1e-5)


# ----------------------------------------------------------------------------- area penalty


def test_gated_area_penalty_gating_and_value():
    masks = torch.zeros(2, 1, 4, 4)
    masks[:, :, :2, :2] = 1.0  # area 0.25 each
    assert gated_area_penalty(masks, torch.tensor([1, 1]), 2.0).item() == pytest.approx(2.0 * (0.25 - 1))
    assert gated_area_penalty(masks, torch.tensor([0, 0]), 2.0).item() == 0.0
    assert gated_area_penalty(masks, torch.tensor([1, 0]), 2.0).item() == pytest.approx(2.0 * (0.25 - 1) / 2)


def test_gated_area_penalty_gradient_is_lambda_over_b_pixels_where_gated():
    masks = torch.full((3, 1, 4, 5), 0.4, requires_grad=True)
    lam = 1.5
    gated_area_penalty(masks, torch.tensor([1.0, 0.0, 1.0]), lam).backward()
    expected = lam / (3 * 20)
    assert torch.allclose(masks.grad[0], torch.full((1, 4, 5), expected))
    assert torch.allclose(masks.grad[2], torch.full((1, 4, 5), expected))
    assert torch.count_nonzero(masks.grad[1]) == 0


# ----------------------------------------------------------------------------- total variation


def test_tv_of_constant_mask_is_zero_without_border_and_border_only_with_it():
    assert total_variation(torch.zeros(2, 1, 6, 6), 1.0).item() == 0.0
    assert total_variation(torch.full((2, 1, 6, 6), 0.7), 1.0, border=0.0).item() == 0.0
    for batch in (1, 3):
        ones = torch.ones(batch, 1, 8, 8)
        n_border = 2 * 8 + 2 * 8 - 4
        assert total_variation(ones, 0.01).item() == pytest.approx(0.01 * 0.3 * n_border / 2, rel=1e-6)


def test_tv_of_checkerboard_by_hand():
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    board = ((rows + cols) % 2).float()[None, None]
    # 12 horizontal + 12 vertical differences of 1; 6 of the 12 border pixels are 1
    assert total_variation(board, 1.0).item() == pytest.approx((24 + 0.3 * 6) / 2)
    assert total_variation(board, 1.0, border=0.0).item() == pytest.approx(12.0)
    assert border_pixels(4, 4).sum().item() == 12


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), shift=st.floats(0.0, 0.5))
def test_tv_scaling_and_shift_invariance(seed, shift):
    m = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(seed)) * 0.5
    assert total_variation(2 * m, 0.1).item() == pytest.approx(4 * total_variation(m, 0.1).item(), rel=1e-5, abs=1e-9)
    assert total_variation(m + shift, 0.1, border=0.0).item() == pytest.approx(
        total_variation(m, 0.1, border=0.0).item(), rel=1e-4, abs=1e-7)


# ----------------------------------------------------------------------------- objective


def test_masker_objective_combines_terms_as_e2():
    masks = torch.full((2, 1, 4, 4), 0.5)
    labels = torch.tensor([0, 1])
    clean = torch.tensor([[5.0, 0.0], [5.0, 0.0]])  # correct on image 0 only
    logits_in = torch.tensor([[3.0, 0.0], [0.0, 3.0]])  # both right
    logits_out = torch.zeros(2, 2)  # uniform: argmax 0, so image 0 is not "confused"; image 1 is not clean-correct
    terms = masker_objective(masks, labels, clean, logits_in, logits_out, lambda_in=1.0, lambda_out=10.0, lambda_tv=0.1)
    ce = torch.nn.functional.cross_entropy(logits_in, labels).item()
    tv = total_variation(masks, 0.1).item()
    entropy_term = -math.log(2) / 2
    expected = (ce + 1.0 * (0.5 - 1) + tv) + (entropy_term + 0.0 + tv)
    assert terms.total.item() == pytest.approx(expected, abs=1e-5)
    assert terms.parts["area_out"] == 0.0
    only_in = masker_objective(masks, labels, clean, logits_in, None, out_kind=None, lambda_tv=0.1)
    assert only_in.total.item() == pytest.approx(ce - 0.5 + tv, abs=1e-5)


# ----------------------------------------------------------------------------- masking and infilling


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1))
def test_mask_in_plus_mask_out_is_the_image(seed):
    g = torch.Generator().manual_seed(seed)
    x, m = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g)
    assert torch.allclose(mask_in(x, m) + mask_out(x, m), x, atol=1e-6)


def test_blur_infill_leaves_kept_pixels_unchanged():
    x, _ = tiny_data(2, 16)
    m = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    filler = blur_images(x, 5.7)
    inside = m.bool().expand_as(x)
    assert torch.equal(infill_in(x, m, filler)[inside], x[inside])
    assert torch.equal(infill_out(x, m, filler)[~inside], x[~inside])
    assert torch.allclose(infill_in(x, m, filler)[~inside], filler[~inside])
    assert torch.equal(infill_in(x, m, None), mask_in(x, m))
    assert torch.equal(infill_out(x, m, None), mask_out(x, m))


def test_blur_keeps_constant_images_and_smooths():
    constant = torch.full((1, 3, 12, 12), 0.3)
    assert torch.allclose(blur_images(constant, 2.0), constant, atol=1e-6)
    x, _ = tiny_data(1, 16)
    assert blur_images(x, 3.0).std() < x.std()


# ----------------------------------------------------------------------------- Gumbel masks


def test_gumbel_is_seeded_in_unit_interval_and_hard_is_binary():
    logits = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = gumbel_sigmoid(logits, 0.1, torch.Generator().manual_seed(5))
    b = gumbel_sigmoid(logits, 0.1, torch.Generator().manual_seed(5))
    c = gumbel_sigmoid(logits, 0.1, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    soft = gumbel_sigmoid(logits, 0.1, torch.Generator().manual_seed(5), mode="soft")
    assert soft.min() >= 0 and soft.max() <= 1
    assert torch.equal((soft > 0.5).float(), a)


def test_gumbel_hard_gradient_is_the_soft_gradient():
    logits = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    grads = []
    for mode in ("hard", "soft"):
        z = logits.clone().requires_grad_(True)
        (gumbel_sigmoid(z, 0.5, torch.Generator().manual_seed(3), mode=mode) * weights).sum().backward()
        grads.append(z.grad)
    assert torch.allclose(grads[0], grads[1])


def test_gumbel_temperature_behaviour_and_eval_mask():
    logits = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def soft(tau):
        return gumbel_sigmoid(logits, tau, torch.Generator().manual_seed(2), mode="soft")

    hard = gumbel_sigmoid(logits, 1.0, torch.Generator().manual_seed(2))
    assert (soft(0.01) - hard).abs().mean() < (soft(1.0) - hard).abs().mean()  # low τ: nearly binary
    assert (soft(1000.0) - 0.5).abs().max() < 0.01  # high τ: flat at 0.5
    assert torch.equal(gumbel_eval_mask(torch.tensor([[-1.0, 0.0, 2.0]])), torch.tensor([[0.0, 0.0, 1.0]]))


# ----------------------------------------------------------------------------- classifier and masker


def test_classifier_layers_and_shapes():
    for stem_stride, l0 in ((1, 64), (2, 32)):
        model = PartsClassifier(10, (16, 32, 64, 128), stem_stride)
        logits, features = model.forward_features(torch.zeros(2, 3, 64, 64))
        assert logits.shape == (2, 10)
        sizes = {name: tuple(f.shape[1:]) for name, f in features.items()}
        assert sizes == {"l0": (16, l0, l0), "l1": (16, 32, 32), "l2": (32, 16, 16), "l3": (64, 8, 8),
                         "l4": (128, 4, 4)}


def test_masker_output_shape_range_and_blocks():
    model = PartsClassifier(10, (8, 16, 32, 64), 2)
    for layers in (("l3", "l4"), masking.LAYER_NAMES):
        masker = Masker(model.channels, layers, hidden=8, grid=16, image_size=64).eval()
        _, features = model.forward_features(torch.randn(3, 3, 64, 64))
        m = masker(features)
        assert m.shape == (3, 1, 64, 64)
        assert m.min() >= 0 and m.max() <= 1
        blocks = m.unfold(2, 4, 4).unfold(3, 4, 4)  # (3, 1, 16, 16, 4, 4)
        assert torch.equal(blocks, blocks[..., :1, :1].expand_as(blocks))


def test_masker_input_is_detached_from_the_classifier():
    model = PartsClassifier(3, (4, 4, 8, 8), 2)
    masker = Masker(model.channels, ("l3", "l4"), hidden=4, grid=8, image_size=32)
    _, features = model.forward_features(torch.randn(2, 3, 32, 32))
    masker(features).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert any(p.grad is not None for p in masker.parameters())


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_fix_training_leaves_classifier_unchanged_and_moves_masker():
    clf = tiny_classifier()
    x, y = tiny_data()
    before = _state(clf)
    spec = MaskerSpec(classifier_mode="fix", steps=3, batch_size=4, hidden=4, grid=8, lr=1e-2)
    run = masking.train_masker(clf, x, y, spec, seed=0, device="cpu")
    for k, v in _state(run.classifier).items():
        assert torch.equal(v, before[k]), k
    fresh = Masker(clf.channels, spec.layers, spec.hidden, spec.grid, 32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fresh = Masker(clf.channels, spec.layers, spec.hidden, spec.grid, 32)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.parameters(), run.masker.parameters()))
    assert len(run.history) == 3 and all(h["historic"] == 0.0 for h in run.history)
    # the steps keep their logs on the device; the run hands back plain numbers, read once
    assert all(type(v) in (int, float) for h in run.history for v in h.values())
    assert [h["step"] for h in run.history] == [0, 1, 2] and 0 <= run.history[-1]["mask_mean"] <= 1


def test_ca_training_updates_a_copy_of_the_classifier_and_is_seeded():
    clf = tiny_classifier()
    x, y = tiny_data()
    before = _state(clf)
    spec = MaskerSpec(classifier_mode="ca", lambda_out=15.0, steps=3, batch_size=4, hidden=4, grid=8)
    run = masking.train_masker(clf, x, y, spec, seed=1, device="cpu")
    again = masking.train_masker(clf, x, y, spec, seed=1, device="cpu")
    assert all(torch.equal(v, before[k]) for k, v in _state(clf).items())  # the input is untouched
    assert any(not torch.equal(v, before[k]) for k, v in _state(run.classifier).items())
    assert all(torch.equal(a, b) for a, b in zip(run.masker.parameters(), again.masker.parameters()))


def test_gumbel_blur_and_confuser_modes_train():
    clf = tiny_classifier()
    x, y = tiny_data()
    for options in ({"gumbel_tau": 0.1}, {"infiller": "blur"}, {"historic_mode": "casme_confuser", "save_freq": 1},
                    {"in_kind": None}, {"out_kind": "ce"}):
        spec = MaskerSpec(classifier_mode="ca", steps=2, batch_size=4, hidden=4, grid=8, **options)
        run = masking.train_masker(clf, x, y, spec, seed=0, device="cpu")
        masks, logits = masking.predict_masks(run.masker, run.classifier, x, spec)
        assert masks.shape == (12, 1, 32, 32) and logits.shape == (12, 3)
        if "gumbel_tau" in options:
            assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_historic_zoo_keeps_at_most_thirty_copies_one_every_save_freq():
    zoo = HistoricZoo(30, save_freq=5)
    model = torch.nn.Linear(2, 2)
    for step in range(200):
        zoo.maybe_add(step, model)
        assert len(zoo.copies) == min(30, step // 5 + 1)
    assert zoo.pick(np.random.default_rng(0)) is not None


def test_cached_masker_loads_identical_weights(tmp_path):
    clf = tiny_classifier()
    x, y = tiny_data()
    spec = MaskerSpec(classifier_mode="ca", steps=2, batch_size=4, hidden=4, grid=8)
    first = masking.cached_train_masker("t", {"d": 1}, clf, x, y, spec, seed=0, device="cpu", cache_dir=tmp_path)
    second = masking.cached_train_masker("t", {"d": 1}, clf, x, y, spec, seed=0, device="cpu", cache_dir=tmp_path)
    assert not first.from_cache and second.from_cache
    assert all(torch.equal(a, b) for a, b in zip(first.masker.state_dict().values(), second.masker.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(first.classifier.state_dict().values(),
                                                 second.classifier.state_dict().values()))
    assert len(list((tmp_path / "maskers").glob("*.pt"))) == 1


def test_optimise_masks_shape_range_and_classifier_untouched():
    clf = tiny_classifier()
    x, y = tiny_data(4)
    before = _state(clf)
    masks = masking.optimise_masks(clf, x, y, steps=3, grid=8)
    assert masks.shape == (4, 1, 32, 32) and masks.min() >= 0 and masks.max() <= 1
    assert all(torch.equal(v, before[k]) for k, v in _state(clf).items())
    assert all(p.requires_grad for p in clf.parameters())


# ----------------------------------------------------------------------------- few-shot samplers


def test_few_shot_samplers_are_exact_and_deterministic():
    labels = np.repeat(np.arange(5), 20)
    picked = masking.sample_per_class(labels, 3, seed=4)
    assert np.bincount(labels[picked]).tolist() == [3] * 5
    assert np.array_equal(picked, masking.sample_per_class(labels, 3, seed=4))
    assert not np.array_equal(picked, masking.sample_per_class(labels, 3, seed=5))
    indices, classes = masking.sample_classes(labels, 2, seed=1)
    assert len(classes) == 2 and set(labels[indices]) == set(classes) and len(indices) == 40
    assert np.array_equal(indices, masking.sample_classes(labels, 2, seed=1)[0])


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("call", [
    lambda: mask_in(torch.zeros(1, 3, 4, 4), torch.full((1, 1, 4, 4), 1.5)),
    lambda: mask_out(torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 5, 4)),
    lambda: mask_in(torch.zeros(1, 3, 4, 4), torch.full((1, 1, 4, 4), float("nan"))),
    lambda: total_variation(torch.zeros(1, 2, 4, 4), 1.0),
    lambda: total_variation(torch.zeros(1, 1, 4, 4), -1.0),
    lambda: gated_area_penalty(torch.zeros(2, 1, 4, 4), torch.tensor([0.5, 1.0]), 1.0),
    lambda: gated_area_penalty(torch.zeros(2, 1, 4, 4), torch.tensor([1.0]), 1.0),
    lambda: masked_in_loss(torch.zeros(2, 3), torch.tensor([0, 3])),
    lambda: masked_in_loss(torch.zeros(2, 3), torch.tensor([0, 1]), kind="kl"),
    lambda: masked_out_loss(torch.zeros(2, 3), torch.tensor([0, 1]), torch.ones(2), kind="kl"),
    lambda: masked_out_loss(torch.zeros(2, 3), torch.tensor([0.0, 1.0]), torch.ones(2)),
    lambda: gumbel_sigmoid(torch.zeros(2), tau=0.0),
    lambda: gumbel_sigmoid(torch.zeros(2), mode="logits"),
    lambda: blur_images(torch.zeros(1, 3, 8, 8), 0.0),
    lambda: masker_objective(torch.zeros(1, 1, 4, 4), torch.tensor([0]), torch.zeros(1, 2), None, None,
                             in_kind=None, out_kind=None),
    lambda: MaskerSpec(in_kind=None, out_kind=None),
    lambda: MaskerSpec(classifier_mode="frozen"),
    lambda: MaskerSpec(layers=("l5",)),
    lambda: MaskerSpec(steps=0),
    lambda: MaskerSpec(prob_historic=1.5),
    lambda: Masker({"l3": 4}, ("l4",)),
    lambda: Masker({"l3": 4}, ("l3",), grid=24, image_size=64),
    lambda: PartsClassifier(10, (8, 16, 32)),
    lambda: PartsClassifier(10, stem_stride=3),
    lambda: masking.sample_per_class(np.repeat(np.arange(3), 2), 3),
    lambda: masking.sample_classes(np.arange(3), 4),
    lambda: masking.train_masker(tiny_classifier(), torch.zeros(4, 3, 32, 32), torch.zeros(3, dtype=torch.int64),
                                 MaskerSpec(steps=1, grid=8), device="cpu"),
])
def test_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_learning_rate_steps_down_at_a_third_and_two_thirds():
    from study.masking import _lr_steps

    for steps, enabled, expected in [(6, True, [1, 1, 0.1, 0.1, 0.01, 0.01]), (7, True, [1, 1, 1, 0.1, 0.1, 0.01, 0.01]),
                                     (4, False, [1, 1, 1, 1])]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule, seen = _lr_steps(optimizer, steps, enabled), []
        for _ in range(steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        assert seen == pytest.approx(expected, rel=1e-12)
