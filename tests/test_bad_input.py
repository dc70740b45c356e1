"""Bad input users will hit gets a ValueError that names the argument (issue: researchers' own models)."""
import pytest
import torch
from torch import nn

from study import config, losses


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


def test_actdiff_rejects_nan_features():
    with pytest.raises(ValueError, match="features_shuffled contains NaN"):
        losses.actdiff_loss(torch.rand(2, 3), torch.tensor([[0.0, float("nan"), 1.0], [1.0, 2.0, 3.0]]))
