
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


def test_model_key_names_the_engine_and_the_data_generators(tmp_path, monkeypatch):
    """A model trained by older engine code, or on the output of an older data generator, is stale:
    bumping either version moves every model's key (and `cached_fit` trains again)."""
    from study import data
    key = train.model_key("toy", {"a": 1})
    assert train.fit_cache_path("toy", {"a": 1}, tmp_path) == tmp_path / "models" / f"toy-{key}.pt"
    assert key != train.model_key("toy", {"a": 2})
    monkeypatch.setattr(data, "GENERATOR_VERSION", data.GENERATOR_VERSION + 1)
    assert train.model_key("toy", {"a": 1}) != key
    monkeypatch.undo()
    monkeypatch.setattr(train, "ENGINE_VERSION", train.ENGINE_VERSION + 1)
    assert train.model_key("toy", {"a": 1}) != key
    calls = []

    def fit(model):
        calls.append(1)
        return train.fit(model, _batches(), epochs=1, device="cpu")

    train.cached_fit("toy", {"a": 1}, _model, fit, cache_dir=tmp_path)
    monkeypatch.setattr(train, "ENGINE_VERSION", train.ENGINE_VERSION + 1)
    assert not train.cached_fit("toy", {"a": 1}, _model, fit, cache_dir=tmp_path).from_cache and len(calls) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "epochs must be positive"),
    ({"epochs": 2, "select": "best"}, "unknown selection criterion"),
    ({"epochs": 2, "select": "valid_loss"}, "needs a valid_loader"),
    ({"epochs": 2, "burn_in": 2}, "burn_in"),
    ({"epochs": 1, "optimizer": "lbfgs"}, "unknown optimizer"),
    ({"epochs": 1, "step": lambda m, b, o: None, "extra_loss": lambda m, b, l: 0.0}, "step or extra_loss"),
    ({"epochs": 1, "valid_loader": _batches(1), "validate": lambda m: {}}, "not both"),
    ({"epochs": 1, "select": "valid_f1"}, "needs a valid_loader or a validate"),
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


# ----------------------------------------------------------------------------- the engine's hooks

def _plain_loop(model, batches, epochs, lr=1e-3):
    """The reference: a hand-written PyTorch loop (Adam, cross-entropy, one step per batch)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        for batch in batches:
            loss = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def test_default_step_is_the_plain_pytorch_loop_bit_for_bit():
    reference = _plain_loop(_model(), _batches(), epochs=2)
    fitted = train.fit(_model(), _batches(), epochs=2, device="cpu").model
    for (name, a), b in zip(reference.state_dict().items(), fitted.state_dict().values()):
        assert torch.equal(a, b), name


def test_custom_step_hooks_and_validate_drive_history_and_selection():
    calls, skipped = [], []

    def step(model, batch, opt):  # updates on every other batch only, and says so by returning None
        skipped.append(len(skipped) % 2 == 1)
        if skipped[-1]:
            return None
        loss = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return torch.tensor(float(len(skipped)))  # a known "loss": the batch's index + 1

    scores = iter([0.2, 0.9, 0.5, 0.9])
    result = train.fit(_model(), _batches(n=64), epochs=4, step=step, validate=lambda m: {"f1": next(scores)},
                       select="valid_f1", burn_in=0, before_epoch=lambda m, e: calls.append(("before", e, m.training)),
                       after_epoch=lambda m, r: (calls.append(("after", r["epoch"])), r.update(extra=1.0)), device="cpu")
    # 4 batches of 16 per epoch; epoch 0 returns losses 1 and 3 (batches 2 and 4 made no update)
    assert result.history[0]["train_loss"] == pytest.approx(2.0) and result.history[1]["train_loss"] == pytest.approx(6.0)
    assert [h["valid_f1"] for h in result.history] == [0.2, 0.9, 0.5, 0.9] and result.history[0]["extra"] == 1.0
    assert result.best_epoch == 1  # the first of the two best epochs
    assert calls[:2] == [("before", 0, True), ("after", 0)] and len(calls) == 8


def test_a_step_that_never_updates_records_nan_and_a_given_optimiser_is_used():
    result = train.fit(_model(), _batches(), epochs=1, step=lambda m, b, o: None, device="cpu")
    assert result.history[0]["train_loss"] != result.history[0]["train_loss"]  # NaN
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights cannot move
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train.fit(model, _batches(), epochs=1, optimizer=opt, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tensor_loader_with_a_shared_generator_draws_plain_permutations_per_epoch():
    data = {"image": torch.rand(10, 1, 2, 2), "label": torch.arange(10)}
    generator = torch.Generator().manual_seed(5)
    loader = train.TensorLoader(data, 4, generator=generator)
    epochs = [torch.cat([b["label"] for b in loader]) for _ in range(2)]
    reference = torch.Generator().manual_seed(5)
    assert [len(b["label"]) for b in loader] == [4, 4, 2]
    assert torch.equal(epochs[0], torch.randperm(10, generator=reference))
    assert torch.equal(epochs[1], torch.randperm(10, generator=reference))
    with pytest.raises(ValueError, match="generator"):
        train.TensorLoader(data, 4, generator=5)
