"""Known answers and invariants of Viviano et al.'s attribution-prior losses (card §2.0, §7)."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from study import config, data, losses, train
from study.experiments import viviano2021 as v
from study.models import SmallResNet18


def _images_and_masks(batch=3, channels=1, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, channels, size, size, generator=generator)
    masks = torch.zeros(batch, 1, size, size, dtype=torch.bool)
    masks[:, :, 2:5, 3:6] = True
    return images, masks


def _linear_model(size=6, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, 2))


# ------------------------------------------------------------------------------ §7.1 shuffle

def test_outside_shuffle_keeps_inside_and_the_multiset_outside():
    images, masks = _images_and_masks(channels=2)
    shuffled = losses.outside_shuffle(images, masks, torch.Generator().manual_seed(1))
    inside = masks.expand_as(images)
    assert torch.equal(shuffled[inside], images[inside])
    for i in range(len(images)):
        for c in range(2):
            outside = ~masks[i, 0]
            assert torch.equal(shuffled[i, c][outside].sort().values, images[i, c][outside].sort().values)
    assert not torch.equal(shuffled, images)
    # a pixel moves with all its channels: the channel pairs outside are the same multiset
    pairs = lambda x, i: sorted(map(tuple, x[i].reshape(2, -1)[:, (~masks[i, 0]).reshape(-1)].T.tolist()))  # noqa: E731
    assert pairs(shuffled, 0) == pairs(images, 0)


def test_outside_shuffle_identity_for_all_inside_and_deterministic():
    images, masks = _images_and_masks()
    full = torch.ones_like(masks)
    assert torch.equal(losses.outside_shuffle(images, full, torch.Generator().manual_seed(0)), images)
    first = losses.outside_shuffle(images, masks, torch.Generator().manual_seed(5))
    again = losses.outside_shuffle(images, masks, torch.Generator().manual_seed(5))
    other = losses.outside_shuffle(images, masks, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)


# ------------------------------------------------------------------------ §7.2 masked input

def test_masked_input_is_zero_outside_and_the_image_inside():
    images, masks = _images_and_masks(channels=3)
    out = losses.masked_input(images, masks)
    inside = masks.expand_as(images)
    assert torch.equal(out[inside], images[inside])
    assert (out[~inside] == 0).all()


# --------------------------------------------------------------------------- §7.10 dilation

@pytest.mark.parametrize("sigma, radius", [(0.64, 3), (0.818, 3), (1.0, 4), (0.1, 0)])
def test_dilation_equals_gaussian_blur_above_zero(sigma, radius):
    masks = torch.zeros(2, 1, 28, 28, dtype=torch.bool)
    masks[0, 0, 10, 5:10] = True
    masks[1, 0, 0, 27] = True
    dilated = losses.dilate_training_mask(masks, sigma)
    assert losses.dilation_radius(sigma) == radius
    for i in range(2):
        blurred = ndimage.gaussian_filter(masks[i, 0].numpy().astype(float), sigma, mode="constant")
        np.testing.assert_array_equal(dilated[i, 0].numpy(), blurred > 0)
    assert (dilated | ~masks).all()  # contains the original


def test_dilation_sigma_zero_is_identity():
    _, masks = _images_and_masks()
    assert torch.equal(losses.dilate_training_mask(masks, 0.0), masks)


# ------------------------------------------------------------------------- §7.3 RRR/GradMask

@pytest.mark.parametrize("loss", [losses.rrr_loss, losses.gradmask_loss])
def test_zero_when_the_mask_covers_the_image(loss):
    model = _linear_model()
    images = torch.rand(4, 1, 6, 6, requires_grad=True)
    outside = torch.zeros(4, 1, 6, 6, dtype=torch.bool)
    assert loss(images, model(images), outside, 10.0).item() == 0.0


@pytest.mark.parametrize("loss", [losses.rrr_loss, losses.gradmask_loss])
def test_zero_when_the_gradient_outside_is_zero(loss):
    model = _linear_model()
    inside = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    inside[..., 1:4, 2:5] = True
    with torch.no_grad():  # the model reads only the inside pixels
        model[1].weight.mul_(inside.reshape(1, -1).float())
    images = torch.rand(3, 1, 6, 6, requires_grad=True)
    assert loss(images, model(images), ~inside.expand(3, -1, -1, -1), 2.0).item() == 0.0


@pytest.mark.parametrize("loss", [losses.rrr_loss, losses.gradmask_loss])
def test_doubles_when_the_batch_is_duplicated(loss):
    model = SmallResNet18(1, 2, width=2).eval()
    images, masks = _images_and_masks(size=12)
    single = images.clone().requires_grad_(True)
    double = torch.cat([images, images]).requires_grad_(True)
    once = loss(single, model(single), ~masks, 0.5)
    twice = loss(double, model(double), ~torch.cat([masks, masks]), 0.5)
    assert once.item() > 0
    assert twice.item() == pytest.approx(2 * once.item(), rel=1e-5)


def test_rrr_and_gradmask_known_answers_on_a_linear_model():
    model = _linear_model()
    weights = model[1].weight.detach()
    images = torch.rand(2, 1, 6, 6, requires_grad=True)
    outside = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    outside[..., :2, :] = True
    logits = model(images)
    probs = torch.softmax(logits.detach(), 1)
    # ∂ Σ_k log p_k / ∂x = Σ_k w_k − 2 Σ_j p_j w_j for two classes
    gradient = weights.sum(0) - 2 * probs @ weights
    o = outside.reshape(2, -1).float()
    assert losses.rrr_loss(images, logits, outside, 3.0).item() == pytest.approx(3.0 * ((gradient * o) ** 2).sum().item(), rel=1e-4)
    # ∂|z0 − z1|/∂x = sign(z0 − z1)(w0 − w1)
    expected = 0.5 * ((weights[0] - weights[1]).abs() * o).sum().item()
    assert losses.gradmask_loss(images, model(images), outside, 0.5).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name, single", [("rrr", losses.rrr_loss), ("gradmask", losses.gradmask_loss)])
def test_many_run_input_gradient_loss_is_each_runs_own_loss(name, single):
    """Runs stacked (R, B, ...) through per-run linear models: run r's loss is the single-run loss
    of its own batch (no run's gradient leaks into another's)."""
    models = [_linear_model(seed=r) for r in range(3)]
    images = torch.rand(3, 2, 1, 6, 6)
    masks = torch.rand(3, 2, 1, 6, 6) > 0.5
    stacked = images.clone().requires_grad_(True)
    logits = torch.stack([model(stacked[r]) for r, model in enumerate(models)])
    got = losses.input_gradient_extra_loss_many(name, 2.0)(None, {"image": stacked, "mask": masks}, logits)
    assert got.shape == (3,)
    for r, model in enumerate(models):
        x = images[r].clone().requires_grad_(True)
        assert got[r].item() == pytest.approx(single(x, model(x), ~masks[r], 2.0).item(), rel=1e-5)
    extra = losses.input_gradient_extra_loss_many(name, 2.0)
    with pytest.raises(ValueError, match="input_grad=True"):
        extra(None, {"image": images, "mask": masks}, logits)  # images without grad
    with pytest.raises(ValueError, match="batch\\['mask'\\]"):
        extra(None, {"image": stacked, "mask": masks[:, :, 0]}, logits)
    with pytest.raises(ValueError, match="unknown input-gradient loss"):
        losses.input_gradient_extra_loss_many("actdiff", 1.0)
    with pytest.raises(ValueError, match="lambda|λ|lam"):
        losses.input_gradient_extra_loss_many(name, -1.0)


def _train(extra, input_grad, seed=0):
    arrays = data.make_crosses(32, seed=3)
    arrays["masks"] = losses.dilate_training_mask(torch.as_tensor(arrays["masks"]), 0.818).numpy()
    config.seed_everything(seed)
    model = SmallResNet18(1, 2, width=2)
    loader = v.make_loader(arrays, shuffle=True, seed=seed, input_grad=input_grad)
    if isinstance(extra, type):  # ActDiffExtraLoss needs the model
        with extra(model, lam=0.0, apply_lambda=True, seed=seed) as hook:
            train.fit(model, loader, epochs=1, lr=1e-2, extra_loss=hook, device="cpu")
    else:
        train.fit(model, loader, epochs=1, lr=1e-2, extra_loss=extra, device="cpu")
    return model


@pytest.mark.parametrize("factory", [losses.rrr_extra_loss, losses.gradmask_extra_loss])
def test_lambda_zero_reproduces_plain_training_exactly(factory):
    plain = _train(None, input_grad=True)
    regularised = _train(factory(0.0), input_grad=True)
    for (name, a), b in zip(plain.state_dict().items(), regularised.state_dict().values()):
        assert torch.equal(a, b), name
    trained = _train(factory(1.0), input_grad=True)
    assert not torch.equal(plain.fc.weight, trained.fc.weight)


def test_actdiff_lambda_zero_with_apply_lambda_leaves_the_weights():
    plain = _train(None, input_grad=False)
    actdiff = _train(losses.ActDiffExtraLoss, input_grad=False)
    for (name, a), b in zip(plain.named_parameters(), actdiff.parameters()):
        assert torch.equal(a, b), name  # only BatchNorm running statistics see the extra x̃ pass


# ------------------------------------------------------------------------------ §7.4 ActDiff

def test_actdiff_distance_of_identical_features_is_eps_sqrt_d():
    features = torch.randn(5, 512)
    value = losses.actdiff_loss(features, features.clone())
    assert value.item() == pytest.approx(1e-6 * math.sqrt(512), rel=1e-3)
    assert value.item() == pytest.approx(2.26e-5, rel=1e-2)


def test_actdiff_lambda_quirk_q1():
    a, b = torch.zeros(2, 4), torch.ones(2, 4)
    assert losses.actdiff_loss(a, b, lam=1e-16).item() == pytest.approx(2.0, rel=1e-5)  # λ not applied (default)
    assert losses.actdiff_loss(a, b, lam=0.5, apply_lambda=True).item() == pytest.approx(1.0, rel=1e-5)


def test_actdiff_extra_loss_through_the_model_with_an_all_inside_mask():
    model = SmallResNet18(1, 2, width=2).train()
    images = torch.rand(4, 1, 12, 12)
    batch = {"image": images, "mask": torch.ones(4, 1, 12, 12, dtype=torch.bool)}
    with losses.ActDiffExtraLoss(model, seed=0) as extra:
        logits = model(images)
        value = extra(model, batch, logits)
    assert value.item() == pytest.approx(1e-6 * math.sqrt(model.feature_dim), rel=1e-2)
    value.backward()  # gradients flow
    assert model.conv1.weight.grad is not None


def test_actdiff_in_fit_runs_the_shuffled_pass_before_x_card_q9():
    arrays = data.make_crosses(8, seed=1)
    config.seed_everything(0)
    model = SmallResNet18(1, 2, width=2)
    seen = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    loader = v.make_loader(arrays, shuffle=False, seed=0, input_grad=False)
    batch = next(iter(loader))
    with losses.ActDiffExtraLoss(model, seed=0) as extra:
        train.fit(model, [batch], epochs=1, lr=1e-3, extra_loss=extra, device="cpu")
    assert len(seen) == 2
    first, second = seen
    assert torch.equal(second, batch["image"])  # x comes second
    inside = batch["mask"].expand_as(first)
    assert torch.equal(first[inside], batch["image"][inside]) and not torch.equal(first, batch["image"])
    # BatchNorm saw x̃ first: replaying the two passes in that order gives the same running mean
    config.seed_everything(0)
    replay = SmallResNet18(1, 2, width=2).train()
    with torch.no_grad():
        replay(first), replay(second)
    assert torch.allclose(replay.bn1.running_mean, model.bn1.running_mean, atol=1e-6)


# ------------------------------------------------------------------------- §7.5 adversarial

def test_adversarial_gating_encoder_every_disc_iter_th_batch_discriminator_every_batch():
    torch.manual_seed(0)
    model = SmallResNet18(1, 2, width=2).train()
    disc = losses.FeatureDiscriminator(model.feature_dim, hidden=8)
    schedule = losses.AdversarialSchedule(disc, torch.optim.Adam(disc.parameters(), lr=1e-2), lam=1.0, disc_iter=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    images, masks = _images_and_masks(batch=4, size=12)
    labels = torch.tensor([0, 1, 0, 1])
    generator = torch.Generator().manual_seed(0)
    changed_encoder, changed_disc = [], []
    for _ in range(7):
        before_encoder = [p.detach().clone() for p in model.parameters()]
        before_disc = [p.detach().clone() for p in disc.parameters()]
        loss = v.adversarial_step(model, optimizer, schedule, images, masks, labels, generator)
        changed_encoder.append(any(not torch.equal(a, b) for a, b in zip(before_encoder, model.parameters())))
        changed_disc.append(any(not torch.equal(a, b) for a, b in zip(before_disc, disc.parameters())))
        assert (loss is not None) == changed_encoder[-1]
    assert changed_encoder == [False, False, True, False, False, True, False]
    assert all(changed_disc)


def test_encoder_loss_leaves_the_discriminator_without_gradients():
    disc = losses.FeatureDiscriminator(4, hidden=8)
    schedule = losses.AdversarialSchedule(disc, torch.optim.SGD(disc.parameters(), lr=0.1), lam=2.0, disc_iter=1)
    features = torch.randn(3, 4, requires_grad=True)
    schedule.encoder_loss(features, features * 0.5).backward()
    assert features.grad is not None
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())


def test_discriminator_losses_known_answer_at_zero_logit():
    class Zero(nn.Module):
        def forward(self, x):
            return x[:, :1] * 0
    features = torch.randn(2, 3)
    assert losses.discriminator_loss(Zero(), features, features, 3.0).item() == pytest.approx(3 * 2 * math.log(2))
    assert losses.adversarial_encoder_loss(Zero(), features, features, 0.5).item() == pytest.approx(0.5 * 2 * math.log(2))


# ---------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_value_error():
    images, masks = _images_and_masks()
    generator = torch.Generator()
    with pytest.raises(ValueError, match="shape"):
        losses.outside_shuffle(images, masks[:, :, :4], generator)
    with pytest.raises(ValueError, match="0 and 1"):
        losses.masked_input(images, masks.float() * 2)
    with pytest.raises(ValueError, match="generator"):
        losses.outside_shuffle(images, masks, 0)
    with pytest.raises(ValueError, match="NaN"):
        losses.masked_input(images * float("nan"), masks)
    with pytest.raises(ValueError, match="sigma"):
        losses.dilate_training_mask(masks, -1.0)
    with pytest.raises(ValueError, match="lam"):
        losses.actdiff_loss(torch.zeros(2, 3), torch.zeros(2, 3), lam=-1)
    with pytest.raises(ValueError, match="differ"):
        losses.actdiff_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    model = _linear_model(size=8)
    with pytest.raises(ValueError, match="require grad"):
        losses.rrr_loss(images, model(images), ~masks, 1.0)
    x = images.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="two logits"):
        losses.gradmask_loss(x, torch.cat([model(x), model(x)[:, :1]], 1), ~masks, 1.0)
    with pytest.raises(ValueError, match="disc_iter"):
        losses.AdversarialSchedule(nn.Linear(2, 1), torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=1), 1.0, 0)
    with pytest.raises(ValueError, match="hidden"):
        losses.FeatureDiscriminator(4, hidden=0)
    with pytest.raises(ValueError, match="layer"):
        losses.ActDiffExtraLoss(model, feature_layer="nope")
