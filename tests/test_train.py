
import pytest
import torch

from study import config, train
from study.models import SmallCNN


def _batches(seed: int = 0, n: int = 96, batch: int = 16):
    """A learnable toy task: the label is which half of the image is bright."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    images = 0.1 * torch.rand(n, 1, 8, 8, generator=generator)
    images[labels == 0, :, :, :4] += 0.8
    images[labels == 1, :, :, 4:] += 0.8
    return [{"image": images[i:i + batch], "label": labels[i:i + batch]} for i in range(0, n, batch)]


def _model(seed: int = 0):
    config.seed_everything(seed)
    return SmallCNN(in_channels=1, num_classes=2, width=4, image_size=8)


def test_loss_decreases_and_task_is_learned():
    result = train.fit(_model(), _batches(), epochs=6, lr=3e-3, valid_loader=_batches(1), device="cpu")
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.history[-1]["valid_accuracy"] == 1.0
    assert result.history[-1]["valid_auc"] == 1.0


def test_same_seed_gives_identical_weights():
    first = train.fit(_model(3), _batches(), epochs=2, device="cpu").model.state_dict()
    second = train.fit(_model(3), _batches(), epochs=2, device="cpu").model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_extra_loss_is_added_and_receives_batch_and_model():
    seen = []

    def extra(model, batch, logits):
        seen.append((type(model).__name__, tuple(batch["image"].shape), tuple(logits.shape)))
        return 0.0 * logits.sum() + 1.0

    plain = train.fit(_model(), _batches(), epochs=1, device="cpu")
    extra_run = train.fit(_model(), _batches(), epochs=1, device="cpu", extra_loss=extra)
    assert seen[0] == ("SmallCNN", (16, 1, 8, 8), (16, 2)) and len(seen) == 6
    assert extra_run.history[0]["train_loss"] == pytest.approx(plain.history[0]["train_loss"] + 1.0, abs=1e-6)


def test_best_checkpoint_selection_skips_burn_in():
    result = train.fit(_model(), _batches(), epochs=4, valid_loader=_batches(1), select="valid_loss", burn_in=2, device="cpu")
    assert result.best_epoch >= 2
    best = min(row["valid_loss"] for row in result.history[2:])
    assert result.history[result.best_epoch]["valid_loss"] == best
    assert train.evaluate(result.model, _batches(1), "cpu")["loss"] == pytest.approx(best, rel=1e-5)


def test_cache_hit_skips_training(tmp_path):
    calls = []

    def fit(model):
        calls.append(1)
        return train.fit(model, _batches(), epochs=1, device="cpu")

    first = train.cached_fit("toy", {"a": 1}, _model, fit, cache_dir=tmp_path)
    second = train.cached_fit("toy", {"a": 1}, _model, fit, cache_dir=tmp_path)
    assert len(calls) == 1 and not first.from_cache and second.from_cache
    assert second.history == first.history
    assert all(torch.equal(v, second.model.state_dict()[k]) for k, v in first.model.state_dict().items())
    train.cached_fit("toy", {"a": 2}, _model, fit, cache_dir=tmp_path)
    assert len(calls) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "epochs must be positive"),
    ({"epochs": 2, "select": "best"}, "unknown selection criterion"),
    ({"epochs": 2, "select": "valid_loss"}, "needs a valid_loader"),
    ({"epochs": 2, "burn_in": 2}, "burn_in"),
    ({"epochs": 1, "optimizer": "lbfgs"}, "unknown optimizer"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train.fit(_model(), _batches(), device="cpu", **kwargs)


def test_progress_bars_follow_study_progress_and_show_in_a_notebook_kernel(monkeypatch):
    import sys

    from study.train import progress_enabled
    monkeypatch.setenv("STUDY_PROGRESS", "1")
    assert progress_enabled()
    monkeypatch.setenv("STUDY_PROGRESS", "0")
    assert not progress_enabled()
    monkeypatch.delenv("STUDY_PROGRESS")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    assert progress_enabled()  # JupyterLab: bars
    monkeypatch.delitem(sys.modules, "ipykernel")
    assert not progress_enabled()  # a log file: none
