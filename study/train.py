"""The training engine: `fit` (one run, with loss and step hooks, per-epoch evaluation and best-epoch
selection), `fit_many` (R runs of one architecture at once) and the model cache (`cached_fit`)."""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm

import study.data
from study import cache, config

ExtraLoss = Callable[[nn.Module, dict, torch.Tensor], torch.Tensor]
# step(model, batch, optimiser) -> the batch's mean loss (0-d tensor) when it made an update, else None
StepHook = Callable[[nn.Module, dict, torch.optim.Optimizer], "torch.Tensor | None"]
# criterion -> True when higher is better
SELECTION_CRITERIA = {"valid_loss": False, "valid_accuracy": True, "valid_auc": True, "valid_f1": True}


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    from_cache: bool = False


def progress_enabled() -> bool:
    """Progress bars on a terminal and in an interactive notebook (JupyterLab), never in logs.

    STUDY_PROGRESS=1 / 0 forces them on / off; the runner (papermill) and the test suite (nbval) set
    it to 0 for the kernels they start, so executed notebooks and CI logs stay clean."""
    forced = os.environ.get("STUDY_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty() or "ipykernel" in sys.modules


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
    return _classification_metrics(*predict(model, loader, device))


def fit(
    model: nn.Module,
    train_loader,
    *,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    optimizer: str | torch.optim.Optimizer = "adam",
    extra_loss: ExtraLoss | None = None,
    step: StepHook | None = None,
    valid_loader=None,
    validate: Callable[[nn.Module], dict] | None = None,
    select: str | None = None,
    burn_in: int = 0,
    before_epoch: Callable[[nn.Module, int], None] | None = None,
    after_epoch: Callable[[nn.Module, dict], None] | None = None,
    device: str | torch.device = "auto",
    progress: bool | None = None,
) -> FitResult:
    """The training engine of every study: train `model` on the batches (dicts with 'image' and
    'label') of `train_loader`, one optimiser (Adam or SGD over all parameters with `lr` and
    `weight_decay`, or a given torch.optim.Optimizer), per-epoch evaluation, best-epoch selection
    and a history of one record per epoch.

    Per batch, by default: cross-entropy (+ `extra_loss(model, batch, logits)`), one optimiser
    step. An `extra_loss` object with a `before_forward(model, batch)` method has it called on
    every training batch before the forward pass. A `step(model, batch, optimiser)` replaces the
    whole default step (an adversarial discriminator, a double-backprop guidance loss): it makes
    its own updates and returns the batch's mean loss (a 0-d tensor) or None when it made none.
    Records: {"epoch", "train_loss"} (mean over the items of the batches that returned a loss;
    accumulated on the device and read once per epoch, so the hot path has no host sync), then
    the validation metrics as "valid_<name>": of `evaluate(model, valid_loader)`, or of
    `validate(model)` (any dict of numbers). `before_epoch(model, epoch)` runs after
    `model.train()` at the start of every epoch; `after_epoch(model, record)` after the
    evaluation (it may add to the record, or keep the weights of this epoch).

    With `select` the weights of the best epoch after `burn_in` epochs (by the criterion's
    direction in SELECTION_CRITERIA; the first of equal values) are restored at the end.
    Seed with `config.seed_everything` before building the model and the loader for identical runs.
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if select is not None and select not in SELECTION_CRITERIA:
        raise ValueError(f"unknown selection criterion {select!r}; choose one of {sorted(SELECTION_CRITERIA)} or None")
    if valid_loader is not None and validate is not None:
        raise ValueError("give a valid_loader or a validate function, not both")
    if select is not None and valid_loader is None and validate is None:
        raise ValueError("select needs a valid_loader or a validate function")
    if step is not None and extra_loss is not None:
        raise ValueError("a custom step computes its own loss: give step or extra_loss, not both")
    if not 0 <= burn_in < epochs:
        raise ValueError(f"burn_in must be in [0, epochs), got {burn_in} with epochs={epochs}")
    device = config.get_device(device)
    model.to(device)
    optimisers = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    if isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    elif isinstance(optimizer, str) and optimizer in optimisers:
        opt = optimisers[optimizer](model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(optimisers)} or pass a torch.optim.Optimizer")
    step = step or _default_step(extra_loss)
    show = progress_enabled() if progress is None else progress
    result = FitResult(model=model)
    best_value, best_state = None, None
    for epoch in tqdm(range(epochs), desc="epochs", disable=not show, leave=False):
        model.train()
        if before_epoch is not None:
            before_epoch(model, epoch)
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        for batch in train_loader:
            batch = _to_device(batch, device)
            loss = step(model, batch, opt)
            if loss is not None:
                total += loss.detach().to(torch.float64) * len(batch["label"])
                count += len(batch["label"])
        record = {"epoch": epoch, "train_loss": total.item() / count if count else math.nan}
        if valid_loader is not None:
            record.update({f"valid_{k}": v for k, v in evaluate(model, valid_loader, device).items()})
        elif validate is not None:
            record.update({f"valid_{k}": v for k, v in validate(model).items()})
        if after_epoch is not None:
            after_epoch(model, record)
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


def _default_step(extra_loss: ExtraLoss | None) -> StepHook:
    """Cross-entropy (+ extra loss), backward, one optimiser step."""

    def step(model: nn.Module, batch: dict, opt: torch.optim.Optimizer) -> torch.Tensor:
        if hasattr(extra_loss, "before_forward"):  # e.g. ActDiff's x̃ pass, which the authors run first
            extra_loss.before_forward(model, batch)
        logits = model(batch["image"])
        loss = classification_loss(logits, batch["label"])
        if extra_loss is not None:
            loss = loss + extra_loss(model, batch, logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def cached_fit(
    name: str,
    params: dict,
    build: Callable[[], nn.Module],
    train: Callable[[nn.Module], FitResult],
    cache_dir: Path | None = None,
    device: str | torch.device = "auto",
) -> FitResult:
    """Train once per (name, params); later calls load the weights (`weights_only=True`)."""
    path = fit_cache_path(name, params, cache_dir)
    model = build()
    if path.exists():
        return load_fit(path, model, device)
    result = train(model)
    store_fit(path, result)
    return result


# Bump when `fit` / `fit_many` change the model a given setting trains, so that no cached model of
# the old code is reused.
ENGINE_VERSION = 1


def _model_params(params: dict) -> dict:
    """A model cache entry's full key parameters: the caller's, the engine's version and the version
    of the data generators (a model trained on old generated data is stale)."""
    return {"params": params, "engine": ENGINE_VERSION, "generator": study.data.GENERATOR_VERSION}


def model_key(name: str, params: dict) -> str:
    """The cache key of the model `cached_fit(name, params, ...)` stores; callers whose own results
    depend on that model put it into their keys."""
    return cache.key(name, _model_params(params))


def fit_cache_path(name: str, params: dict, cache_dir: Path | None = None) -> Path:
    """Where `cached_fit` keeps the model trained with (name, params)."""
    return cache.path("models", name, _model_params(params), ".pt", cache_dir)


def store_fit(path: Path, result: FitResult) -> None:
    """Save a FitResult's weights (on the CPU), history (floats) and selected epoch, atomically."""
    state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    history = [{k: float(v) for k, v in row.items()} for row in result.history]
    cache.save_torch({"state_dict": state, "history": history, "best_epoch": result.best_epoch}, path)


def load_fit(path: Path, model: nn.Module, device: str | torch.device = "auto") -> FitResult:
    """A stored FitResult, its weights loaded into `model` (moved to `device`, eval mode)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(saved["state_dict"])
    model.to(config.get_device(device)).eval()
    return FitResult(model, saved["history"], saved["best_epoch"], from_cache=True)


# ------------------------------------------------------------------ many runs at once (fit_many)
#
# R runs of one architecture and one loss, differing in initial weights, batch order and optionally
# in per-run lr / weight decay / extra-loss weight (and, with per-run data, in their training set),
# train together: `torch.func.stack_module_state` stacks the R models' parameters and buffers along
# a new leading dimension, `torch.vmap(functional_call(...))` runs the R forward passes as one
# (grouped) pass, ordinary autograd takes the gradient of the sum of the R losses (each run's
# parameters only reach its own loss, so that is every run's own gradient), and a vectorised Adam /
# SGD updates the stacked tensors.
#
# BatchNorm: the running statistics are stacked buffers passed to `functional_call` and mapped over
# by vmap (in_dims=0) like the parameters, so every run has its own statistics, and BatchNorm's
# in-place running-mean/var and `num_batches_tracked` updates land in that run's slice of the
# stacked buffer (vmap only refuses an in-place update of an *unbatched* tensor with a batched
# value, the case torch.func's "patching batch norm" note is about). No
# `replace_all_batch_norm_modules_` is needed, and the statistics match a per-run `fit` bit for bit
# (checked in tests/test_train_many.py).

ManyExtraLoss = Callable[[Callable[[torch.Tensor], torch.Tensor], dict, torch.Tensor], torch.Tensor]


def loader_epoch_order(generator: torch.Generator, n: int) -> torch.Tensor:
    """One epoch's item order, drawn from `generator` exactly as a `DataLoader(shuffle=True,
    generator=generator)` with its default RandomSampler draws it when iterated to the end (a base
    seed, the permutation, and the sampler's trailing empty draw). So `fit_many` with `seeds=[s]`
    sees the batches of `data.make_loader(arrays, batch_size, shuffle=True, seed=s)`."""
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # DataLoader's base seed
    order = torch.randperm(n, generator=generator)
    torch.randperm(n, generator=generator)  # RandomSampler's trailing `randperm(n)[:0]`
    return order


def batch_orders(n: int, seeds, epochs: int) -> torch.Tensor:
    """(R, epochs, n) int64: every run's item order per epoch (`loader_epoch_order`, one
    generator per run seeded with its seed). `fit_many` draws exactly these."""
    seeds = _check_seeds(seeds)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs <= 0:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return torch.stack([torch.stack([loader_epoch_order(g, n) for _ in range(epochs)]) for g in generators])


class TensorLoader:
    """A loader-like iterable over a dict of tensors (first dimension = items): every iteration is
    one epoch of batches (dicts of the same keys). With `shuffle` the order is drawn by
    `loader_epoch_order` from a generator seeded with `seed` — the order `fit_many` gives the run
    with that seed and a DataLoader with that generator gives — so `fit(model, TensorLoader(...))`
    is the per-run reference of `fit_many`. With a `generator` instead of a seed, each epoch's
    order is `torch.randperm(n, generator=generator)`, drawn when the epoch starts: a step that
    draws from the same generator (guidance's loss classes) sees the stream a hand-written loop
    over `randperm` batches would. Batches are index selections: no per-item Python; keep the
    tensors on the training device and no batch is copied between devices."""

    def __init__(self, data: dict, batch_size: int, seed: int | None = 0, shuffle: bool = True,
                 generator: torch.Generator | None = None):
        self.data, self.n = _check_data(data, "data")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if shuffle and generator is None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be a non-negative int when shuffling, got {seed!r}")
        self.batch_size, self.shuffle, self.shared = batch_size, bool(shuffle), generator is not None
        self.generator = generator if generator is not None else (torch.Generator().manual_seed(seed) if shuffle else None)

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        if self.shared:
            return torch.randperm(self.n, generator=self.generator)
        return loader_epoch_order(self.generator, self.n)

    def __iter__(self):
        order = self._order()
        for start in range(0, self.n, self.batch_size):
            index = order[start:start + self.batch_size]
            yield {key: value[index.to(value.device)] for key, value in self.data.items()}


def _check_seeds(seeds) -> list[int]:
    if isinstance(seeds, (int, str)) or not hasattr(seeds, "__len__") or len(seeds) == 0:
        raise ValueError(f"seeds must be a non-empty sequence of non-negative ints, got {seeds!r}")
    seeds = list(seeds)
    for seed in seeds:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seeds must be non-negative ints, got {seed!r} in {seeds}")
    return seeds


def _check_data(data, name: str, leading: int = 0) -> tuple[dict, int]:
    """A dict of tensors with an 'image' (float, (N, C, H, W) after `leading` run dims) and a
    'label' (int (N,) or float (N, K)), every tensor with the same N. Returns (data, N)."""
    if not isinstance(data, dict) or "image" not in data or "label" not in data:
        raise ValueError(f"{name} must be a dict of tensors with at least 'image' and 'label'")
    for key, value in data.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
    image, label = data["image"], data["label"]
    if image.ndim != 4 + leading or not image.is_floating_point():
        raise ValueError(f"{name}['image'] must be a float tensor (N, C, H, W), got {image.dtype} {tuple(image.shape)}")
    if not (label.ndim == 1 + leading and not label.is_floating_point()) and not (label.ndim == 2 + leading and label.is_floating_point()):
        raise ValueError(f"{name}['label'] must be int (N,) or multi-hot float (N, K), got {label.dtype} {tuple(label.shape)}")
    n = image.shape[leading]
    if n == 0:
        raise ValueError(f"{name} is empty")
    for key, value in data.items():
        if value.ndim <= leading or value.shape[leading] != n:
            raise ValueError(f"{name}[{key!r}] has shape {tuple(value.shape)}; every tensor needs the same {n} items")
    return data, n


def _stack_data(data, runs: int, name: str, device: torch.device) -> tuple[dict, int, bool]:
    """Shared data (one dict, items (N, ...)) or per-run data (R dicts of equal shapes, stacked
    to (R, N, ...)), moved to `device`. Returns (data, N, per_run)."""
    if isinstance(data, dict):
        data, n = _check_data(data, name)
        return {k: v.to(device) for k, v in data.items()}, n, False
    if not isinstance(data, (list, tuple)) or len(data) != runs:
        raise ValueError(f"{name} must be a dict of tensors (shared by the runs) or a list of {runs} such dicts (one per run)")
    checked = [_check_data(d, f"{name}[{r}]") for r, d in enumerate(data)]
    keys = set(checked[0][0])
    for r, (d, _) in enumerate(checked):
        if set(d) != keys or any(d[k].shape != checked[0][0][k].shape or d[k].dtype != checked[0][0][k].dtype for k in keys):
            raise ValueError(f"{name}[{r}] differs from {name}[0] in keys, shapes or dtypes; per-run data must match")
    return {k: torch.stack([d[k] for d, _ in checked]).to(device) for k in keys}, checked[0][1], True


def _per_run(value, runs: int, name: str, positive: bool = False) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * runs
    if len(values) != runs:
        raise ValueError(f"{name} must be a number or a sequence of {runs} numbers (one per run), got {len(values)}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise ValueError(f"{name} must be finite and {'positive' if positive else 'non-negative'}, got {v!r}")
        out.append(float(v))
    return out


def _check_models(models) -> list[nn.Module]:
    if isinstance(models, nn.Module) or not isinstance(models, (list, tuple)) or not models:
        raise ValueError("models must be a non-empty list of nn.Module (one per run, same architecture)")
    first = models[0]
    for r, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise ValueError(f"models[{r}] is a {type(model).__name__}, not an nn.Module")
        if type(model) is not type(first):
            raise ValueError(f"models[{r}] is a {type(model).__name__}, models[0] a {type(first).__name__}; one architecture per call")
        a, b = first.state_dict(), model.state_dict()
        if list(a) != list(b) or any(a[k].shape != b[k].shape or a[k].dtype != b[k].dtype for k in a):
            raise ValueError(f"models[{r}] differs from models[0] in its parameter/buffer names, shapes or dtypes")
    if len({id(m) for m in models}) != len(models):
        raise ValueError("models must be distinct module objects (the same module twice cannot hold two runs)")
    return list(models)


def _classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Loss, accuracy and macro ROC-AUC from float32 CPU logits and labels (`evaluate` and `fit_many`)."""
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


def _run_view(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-run numbers as a tensor shaped (R, 1, ..., 1) to broadcast over a stacked tensor."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.ndim - 1)))


class _StackedOptimiser:
    """torch.optim.Adam / SGD (defaults: betas (0.9, 0.999), eps 1e-8, no amsgrad; SGD without
    momentum), vectorised over the leading run dimension of stacked parameters, with per-run lr
    and weight decay. Same operations in the same order as torch's single-tensor implementations
    (`_single_tensor_adam`, `_single_tensor_sgd`); a parameter whose gradient is None is skipped,
    its step count not advanced, as torch does."""

    def __init__(self, params: list[torch.Tensor], kind: str, lr: list[float], weight_decay: list[float]):
        self.params, self.kind = params, kind
        self.uniform_lr = len(set(lr)) == 1
        self.lr, self.weight_decay = lr, weight_decay
        self.uniform_wd = len(set(weight_decay)) == 1
        self.lr_t = [_run_view(lr, p) for p in params]
        self.wd_t = [_run_view(weight_decay, p) for p in params]
        self.steps = [0] * len(params)
        if kind == "adam":
            self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
            self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]

    @torch.no_grad()
    def step(self, grads) -> None:
        active = [i for i, g in enumerate(grads) if g is not None]
        if not active:
            return
        params = [self.params[i] for i in active]
        grads = [grads[i] for i in active]
        if self.uniform_wd:
            if self.weight_decay[0] != 0:
                grads = torch._foreach_add(grads, params, alpha=self.weight_decay[0])
        else:
            grads = [g + self.wd_t[i] * p for i, g, p in zip(active, grads, params)]
        if self.kind == "sgd":
            if self.uniform_lr:
                torch._foreach_add_(params, grads, alpha=-self.lr[0])
            else:
                torch._foreach_add_(params, torch._foreach_mul(grads, [-self.lr_t[i] for i in active]))
            return
        for i in active:
            self.steps[i] += 1
        if len({self.steps[i] for i in active}) > 1:  # some parameter skipped steps: one group per count
            for i in active:
                self._adam([self.params[i]], [grads[active.index(i)]], [i])
            return
        self._adam(params, grads, active)

    def _adam(self, params: list, grads: list, index: list[int]) -> None:
        """torch's Adam update (the operations of `_single_tensor_adam`, as foreach ops) for
        parameters that share a step count."""
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        step = self.steps[index[0]]
        exp_avgs = [self.exp_avg[i] for i in index]
        exp_avg_sqs = [self.exp_avg_sq[i] for i in index]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2 ** 0.5)
        torch._foreach_add_(denom, eps)
        if self.uniform_lr:
            torch._foreach_addcdiv_(params, exp_avgs, denom, value=-(self.lr[0] / bias_correction1))
        else:
            update = torch._foreach_div(exp_avgs, denom)
            torch._foreach_mul_(update, [-(self.lr_t[i] / bias_correction1) for i in index])
            torch._foreach_add_(params, update)


def fit_many(
    models,
    train_data,
    *,
    seeds,
    epochs: int,
    batch_size: int,
    lr=1e-3,
    weight_decay=0.0,
    optimizer: str = "adam",
    extra_loss: ManyExtraLoss | None = None,
    extra_weight=1.0,
    input_grad: bool = False,
    valid_data=None,
    valid_batch_size: int = 256,
    select: str | None = None,
    burn_in: int = 0,
    device: str | torch.device = "auto",
    progress: bool | None = None,
) -> list[FitResult]:
    """Train R = len(models) runs of one architecture together (torch.func: stack_module_state +
    functional_call + vmap); each run as `fit(models[r], TensorLoader(train_data, batch_size,
    seeds[r]), ...)` would train it, with its own BatchNorm statistics, optimiser state, per-epoch
    evaluation and best-epoch selection. Returns one `FitResult` per run (histories in `fit`'s
    format); the models are updated in place (selected weights, eval mode), as `fit` does.

    models: R initialised modules of the same class and state-dict layout (seed before building
    each, as for `fit`); dropout, if any, draws different masks per run (vmap randomness
    "different"), so such models do not match `fit`'s random stream.
    train_data / valid_data: a dict of tensors ('image' (N, C, H, W) float, 'label' (N,) int or
    (N, K) multi-hot float, plus any per-item tensor such as 'mask'), shared by all runs, or a
    list of R such dicts of equal shapes (per-run data: shift severity, annotation subset, ...).
    Data are moved to `device` once; run r's batches are drawn by `loader_epoch_order` from a
    generator seeded with seeds[r] (the order of a DataLoader with that generator).
    lr, weight_decay, extra_weight: a number, or one per run.
    extra_loss(model_call, batch, logits) -> (R,) per-run loss, added as extra_weight[r]·extra[r]:
    `batch` holds the runs' batches stacked (R, B, ...), `logits` is (R, B, K), `model_call(images
    (R, B, ...)) -> (R, B, K)` runs the R current models (in train mode, so a call updates the
    BatchNorm statistics, as a second `model(x)` in a `fit` extra loss does). With `input_grad` the
    batch images require grad before the forward pass, so input-gradient losses can differentiate
    `logits` with respect to `batch["image"]` (each run's logits only depend on its own images).
    `before_forward` hooks (ActDiff) and forward hooks on the models are not supported.

    Hot path: no per-item Python and no host sync; train losses are summed on the device (float64)
    and read once per epoch, with the evaluation.
    """
    models = _check_models(models)
    runs = len(models)
    seeds = _check_seeds(seeds)
    if len(seeds) != runs:
        raise ValueError(f"need one seed per run: {runs} models, {len(seeds)} seeds")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    for name, value in (("batch_size", batch_size), ("valid_batch_size", valid_batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if select is not None and select not in SELECTION_CRITERIA:
        raise ValueError(f"unknown selection criterion {select!r}; choose one of {sorted(SELECTION_CRITERIA)} or None")
    if select is not None and valid_data is None:
        raise ValueError("select needs valid_data")
    if not isinstance(burn_in, int) or not 0 <= burn_in < epochs:
        raise ValueError(f"burn_in must be in [0, epochs), got {burn_in} with epochs={epochs}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of ['adam', 'sgd']")
    lrs = _per_run(lr, runs, "lr", positive=True)
    decays = _per_run(weight_decay, runs, "weight_decay")
    weights = _per_run(extra_weight, runs, "extra_weight")
    if extra_loss is not None and not callable(extra_loss):
        raise ValueError("extra_loss must be callable: extra_loss(model_call, batch, logits) -> (R,) losses")
    if hasattr(extra_loss, "before_forward"):
        raise ValueError("fit_many does not support extra losses with a before_forward hook (ActDiff); train those with fit")
    device = config.get_device(device)
    train, n, train_per_run = _stack_data(train_data, runs, "train_data", device)
    valid = None
    if valid_data is not None:
        valid, n_valid, valid_per_run = _stack_data(valid_data, runs, "valid_data", device)
    dtype = next((p.dtype for p in models[0].parameters()), torch.float32)
    if train["image"].dtype != dtype:
        raise ValueError(f"train_data['image'] is {train['image'].dtype} but the models' parameters are {dtype}")

    from torch.func import functional_call, stack_module_state

    for model in models:
        model.to(device)
    params, buffers = stack_module_state(models)  # params: leaves that require grad, (R, ...)
    base = copy.deepcopy(models[0])  # the module whose forward functional_call runs with each run's tensors

    def one_run(p, b, images):
        return functional_call(base, (p, b), (images,))

    stacked_forward = torch.vmap(one_run, in_dims=(0, 0, 0), randomness="different")
    shared_forward = torch.vmap(one_run, in_dims=(0, 0, None), randomness="different")

    def model_call(images: torch.Tensor) -> torch.Tensor:
        if images.ndim < 1 or images.shape[0] != runs:
            raise ValueError(f"model_call needs images stacked per run (R={runs}, B, ...), got {tuple(images.shape)}")
        return stacked_forward(params, buffers, images)

    per_item_loss = torch.vmap(classification_loss)
    names = list(params)
    leaves = [params[k] for k in names]
    opt = _StackedOptimiser(leaves, optimizer, lrs, decays)
    weight_t = torch.tensor(weights, device=device, dtype=dtype)
    use_weight = any(w != 1.0 for w in weights)
    run_index = torch.arange(runs, device=device).unsqueeze(1)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def gather(data: dict, per_run: bool, index: torch.Tensor) -> dict:
        return {k: (v[run_index, index] if per_run else v[index]) for k, v in data.items()}

    results = [FitResult(model=m) for m in models]
    best_value: list[float | None] = [None] * runs
    best_state: dict[str, torch.Tensor] | None = None
    show = progress_enabled() if progress is None else progress
    for epoch in tqdm(range(epochs), desc=f"epochs ({runs} runs)", disable=not show, leave=False):
        base.train()
        order = torch.stack([loader_epoch_order(g, n) for g in generators])
        order = order.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else order.to(device)
        total = torch.zeros(runs, dtype=torch.float64, device=device)
        for start in range(0, n, batch_size):
            batch = gather(train, train_per_run, order[:, start:start + batch_size])
            if input_grad:
                batch["image"] = batch["image"].detach().requires_grad_(True)
            logits = stacked_forward(params, buffers, batch["image"])
            loss = per_item_loss(logits, batch["label"])
            if extra_loss is not None:
                extra = extra_loss(model_call, batch, logits)
                if not isinstance(extra, torch.Tensor) or extra.shape != (runs,):
                    raise ValueError(f"extra_loss must return a tensor of shape ({runs},) (one loss per run), "
                                     f"got {getattr(extra, 'shape', type(extra).__name__)}")
                loss = loss + (weight_t * extra if use_weight else extra)
            grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
            opt.step(grads)
            total += loss.detach().to(torch.float64) * batch["label"].shape[1]
        train_losses = (total / n).tolist()  # the epoch's one read of the training losses
        metrics: list[dict] = [{} for _ in range(runs)]
        if valid is not None:
            base.eval()
            with torch.no_grad():
                chunks = []
                for start in range(0, n_valid, valid_batch_size):
                    images = valid["image"][:, start:start + valid_batch_size] if valid_per_run else valid["image"][start:start + valid_batch_size]
                    forward = stacked_forward if valid_per_run else shared_forward
                    chunks.append(forward(params, buffers, images).float().cpu())
                logits_all = torch.cat(chunks, dim=1)
            labels_all = valid["label"].cpu()
            for r in range(runs):
                metrics[r] = _classification_metrics(logits_all[r], labels_all[r] if valid_per_run else labels_all)
        improved = []
        for r in range(runs):
            record = {"epoch": epoch, "train_loss": train_losses[r]}
            record.update({f"valid_{k}": v for k, v in metrics[r].items()})
            results[r].history.append(record)
            if select is not None and epoch >= burn_in:
                value = record[select] if SELECTION_CRITERIA[select] else -record[select]
                if best_value[r] is None or value > best_value[r]:
                    best_value[r], results[r].best_epoch = value, epoch
                    improved.append(r)
        if improved:
            with torch.no_grad():
                if best_state is None:
                    best_state = {k: v.detach().clone() for k, v in {**params, **buffers}.items()}
                else:
                    index = torch.tensor(improved, device=device)
                    for k, v in {**params, **buffers}.items():
                        best_state[k][index] = v.detach()[index]
    final = {k: v.detach() for k, v in {**params, **buffers}.items()}
    for r, model in enumerate(models):
        source = best_state if (best_state is not None and results[r].best_epoch is not None) else final
        model.load_state_dict({k: source[k][r].clone() for k in model.state_dict()})
        model.eval()
    return results
