"""One training loop with an extra-loss hook, best-checkpoint selection and a disk cache."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from study import config

ExtraLoss = Callable[[nn.Module, dict, torch.Tensor], torch.Tensor]
# criterion -> True when higher is better
SELECTION_CRITERIA = {"valid_loss": False, "valid_accuracy": True, "valid_auc": True}


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    from_cache: bool = False


def progress_enabled() -> bool:
    """Bars only on a terminal (or STUDY_PROGRESS=1): notebooks under papermill stay quiet."""
    return os.environ.get("STUDY_PROGRESS") == "1" or sys.stderr.isatty()


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer labels, binary cross-entropy for multi-hot float labels."""
    if labels.dtype.is_floating_point:
        return F.binary_cross_entropy_with_logits(logits, labels)
    return F.cross_entropy(logits, labels)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def predict(model: nn.Module, loader, device: str | torch.device = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over a loader, in eval mode."""
    device = config.get_device(device)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in loader:
        batch = _to_device(batch, device)
        logits.append(model(batch["image"]).float().cpu())
        labels.append(batch["label"].cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, loader, device: str | torch.device = "auto") -> dict[str, float]:
    """Loss, accuracy and ROC-AUC (macro over the logit columns against one-hot labels, as Viviano)."""
    logits, labels = predict(model, loader, device)
    loss = classification_loss(logits, labels).item()
    if labels.dtype.is_floating_point:
        accuracy = ((logits > 0).float() == labels).float().mean().item()
        onehot = labels.numpy()
    else:
        accuracy = (logits.argmax(1) == labels).float().mean().item()
        onehot = F.one_hot(labels, logits.shape[1]).numpy()
    present = onehot.min(0) != onehot.max(0)
    auc = float(roc_auc_score(onehot[:, present], logits.numpy()[:, present], average="macro")) if present.any() else float("nan")
    return {"loss": loss, "accuracy": accuracy, "auc": auc}


def fit(
    model: nn.Module,
    train_loader,
    *,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    extra_loss: ExtraLoss | None = None,
    valid_loader=None,
    select: str | None = None,
    burn_in: int = 0,
    device: str | torch.device = "auto",
    progress: bool | None = None,
) -> FitResult:
    """Train `model` with cross-entropy (+ `extra_loss(model, batch, logits)` when given).

    An `extra_loss` object with a `before_forward(model, batch)` method has it called on every
    training batch before the model's forward pass.

    With a `valid_loader`, every epoch is evaluated; with `select` the weights of the best epoch
    after `burn_in` epochs (by lowest valid loss or highest valid accuracy/AUC) are restored.
    Seed with `config.seed_everything` before building the model and the loader for identical runs.
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if select is not None and select not in SELECTION_CRITERIA:
        raise ValueError(f"unknown selection criterion {select!r}; choose one of {sorted(SELECTION_CRITERIA)} or None")
    if select is not None and valid_loader is None:
        raise ValueError("select needs a valid_loader")
    if not 0 <= burn_in < epochs:
        raise ValueError(f"burn_in must be in [0, epochs), got {burn_in} with epochs={epochs}")
    device = config.get_device(device)
    model.to(device)
    optimisers = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    if optimizer not in optimisers:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(optimisers)}")
    opt = optimisers[optimizer](model.parameters(), lr=lr, weight_decay=weight_decay)
    show = progress_enabled() if progress is None else progress
    result = FitResult(model=model)
    best_value, best_state = None, None
    for epoch in tqdm(range(epochs), desc="epochs", disable=not show, leave=False):
        model.train()
        total, count = 0.0, 0
        for batch in train_loader:
            batch = _to_device(batch, device)
            if hasattr(extra_loss, "before_forward"):  # e.g. ActDiff's x̃ pass, which the authors run first
                extra_loss.before_forward(model, batch)
            logits = model(batch["image"])
            loss = classification_loss(logits, batch["label"])
            if extra_loss is not None:
                loss = loss + extra_loss(model, batch, logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(batch["label"])
            count += len(batch["label"])
        record = {"epoch": epoch, "train_loss": total / count}
        if valid_loader is not None:
            record.update({f"valid_{k}": v for k, v in evaluate(model, valid_loader, device).items()})
        result.history.append(record)
        if select is not None and epoch >= burn_in:
            value = record[select] if SELECTION_CRITERIA[select] else -record[select]
            if best_value is None or value > best_value:
                best_value, result.best_epoch = value, epoch
                best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


def cache_key(name: str, params: dict) -> str:
    """A stable hash of everything that affects a cached result."""
    canonical = json.dumps({"name": name, "params": params, "torch": torch.__version__.split("+")[0]},
                           sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def atomic_torch_save(obj, path: Path) -> None:
    """Write to a temporary file in the same directory, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cached_fit(
    name: str,
    params: dict,
    build: Callable[[], nn.Module],
    train: Callable[[nn.Module], FitResult],
    cache_dir: Path | None = None,
    device: str | torch.device = "auto",
) -> FitResult:
    """Train once per (name, params); later calls load the weights (`weights_only=True`)."""
    path = Path(cache_dir or config.CACHE_DIR) / "models" / f"{name}-{cache_key(name, params)}.pt"
    model = build()
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        model.to(config.get_device(device)).eval()
        return FitResult(model, saved["history"], saved["best_epoch"], from_cache=True)
    result = train(model)
    state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    history = [{k: float(v) for k, v in row.items()} for row in result.history]
    atomic_torch_save({"state_dict": state, "history": history, "best_epoch": result.best_epoch}, path)
    return result
