"""Batched perturbation metrics: AOPC / ABPC, deletion / insertion AUC, faithfulness, Average Drop.

Conventions shared by every function here (Tomsett card §2 E2, §4, §5.4; Vandersmissen card §2 E2):

* ``images`` are ``(B, C, H, W)`` floating tensors (anything ``torch.as_tensor`` accepts); they are
  cast to the dtype of the model's first floating parameter. ``maps`` are ``(B, 1, H, W)``,
  ``(B, H, W)`` or ``(B, C, H, W)``; a per-channel map is summed over its channels, so the
  relevance of a pixel is always the sum over channels. ``targets`` is one int or ``(B,)`` ints.
* A *feature* is a pixel (``patch=1``) or a non-overlapping ``patch × patch`` square laid out in
  raster order; its relevance is the sum of the map over the square, and perturbing it replaces
  all of its pixels in every channel.
* The score f(x) is the softmax probability (``output="prob"``) or the logit (``"logit"``) of the
  target class. Every forward pass runs under ``torch.inference_mode()`` on the device of the
  model's parameters (``device=`` may name it, and must then agree). The perturbed copies of a
  chunk of images × steps are written into one reused tensor, each image's copies at once by
  broadcasting its rank / feature map against the step counts (no Python loop over pixels or
  steps), and go through the model in batches of ``batch_size`` (``None`` = auto: 256 on an
  accelerator, 2¹⁵ / (H·W) on the CPU, see ``_auto_batch_size``). A ``nn.Module`` is put in
  ``eval()`` mode for the call and its previous mode is restored. On the CPU the copies are handed
  to the model ``channels_last`` (``channels_last=None`` = auto), for oneDNN's faster convolution
  kernels; values agree with NCHW up to float rounding. Results are float32 tensors on the CPU.
* Ordering (Tomsett Q8, Vandersmissen Q5): MoRF sorts the relevance in descending order and LeRF
  in ascending order with a *stable* sort, so tied features keep their raster order (a constant map
  deletes features in raster order for both MoRF and LeRF). ``ties="random"`` breaks ties with a
  seeded random permutation instead; ``order="random"`` is a seeded random permutation per image.
* Replacement values: ``"zero"`` (0); ``"dataset_mean"`` (the scalar or per-channel value given
  in ``dataset_mean``, required); ``"image_mean"`` (per-image, per-channel mean of the original
  image); ``"uniform"`` (one U(0,1) image per input image, ``torch.rand`` on a CPU generator seeded
  with ``seed``: image ``i`` of a call always gets the same noise image for the same seed, whatever
  the map, so it is shared by all methods and metrics; Tomsett §5.4); ``"blur"`` (Gaussian blur of
  the image, ``blur_kernel_size`` × ``blur_kernel_size``, ``blur_sigma``, reflect padding, via
  torchvision); or an explicit tensor broadcastable to ``images``. See :func:`make_replacement`.
* Seeds: ``seed`` feeds independent streams (uniform image; random order; random tie-break;
  feature sub-sampling; random subsets), so changing one option never shifts another's draws.
* Nothing returns NaN silently: invalid inputs raise ``ValueError``; correlations of a constant
  relevance or a constant score drop raise unless ``on_constant="nan"`` is asked for.

AOPC normalisation (Tomsett Q3): ``aopc`` averages ``f(x0) − f(xk)`` over k = 0..L, i.e. divides
by L+1 and includes the zero k = 0 term. Quantus' ``RegionPerturbation`` returns only the L post-step
drops (k = 1..L), so its per-image mean equals ``aopc · (L+1)/L``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import numpy as np
import scipy.stats
import torch
import torchvision.transforms.functional as TF
from torch import nn

__all__ = [
    "abpc",
    "abpc_score",
    "aopc",
    "aopc_lerf",
    "aopc_morf",
    "auc",
    "average_drop_increase",
    "class_scores",
    "deletion_auc",
    "faithfulness",
    "faithfulness_correlation",
    "insertion_auc",
    "make_replacement",
    "perturbation_curve",
]

ORDERS = ("morf", "lerf", "random")
MODES = ("deletion", "insertion")
REPLACEMENTS = ("zero", "dataset_mean", "image_mean", "uniform", "blur")
OUTPUTS = ("prob", "logit")
TIES = ("stable", "random")
CORRELATIONS = ("pearson", "spearman")
ON_CONSTANT = ("raise", "nan")

# Independent random streams derived from one `seed` (uniform replacement uses `seed` itself).
_STREAM_ORDER, _STREAM_TIES, _STREAM_FEATURES, _STREAM_SUBSETS = 1, 2, 3, 4


# ----------------------------------------------------------------------------------------------
# Validation and preparation
# ----------------------------------------------------------------------------------------------


def _check_choice(name: str, value, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; accepted: {list(allowed)}")
    return value


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def _model_device_dtype(model, device) -> tuple[torch.device, torch.dtype]:
    params = list(model.parameters()) + list(model.buffers()) if isinstance(model, nn.Module) else []
    floating = [p for p in params if p.is_floating_point()]
    model_device = params[0].device if params else None
    dtype = floating[0].dtype if floating else torch.float32
    if device is None:
        return (model_device or torch.device("cpu")), dtype
    device = torch.device(device)
    if model_device is not None and (device.type != model_device.type or
                                     (device.index is not None and device.index != model_device.index)):
        raise ValueError(f"device {device} differs from the device of the model's parameters ({model_device}); "
                         "move the model first or leave device=None")
    return device, dtype


def _as_images(images, device, dtype) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating tensor, got dtype {images.dtype}")
    if images.shape[0] == 0 or images.numel() == 0:
        raise ValueError(f"images must not be empty, got shape {tuple(images.shape)}")
    _check_finite("images", images)
    return images.to(device=device, dtype=dtype)


def _as_maps(maps, images: torch.Tensor) -> torch.Tensor:
    """Maps as (B, H, W) float32 on the images' device (channels summed)."""
    maps = torch.as_tensor(maps)
    b, c, h, w = images.shape
    if maps.ndim == 3:
        maps = maps[:, None]
    if maps.ndim != 4 or maps.shape[0] != b or maps.shape[2:] != (h, w) or maps.shape[1] not in (1, c):
        raise ValueError(f"maps must have shape ({b}, 1, {h}, {w}), ({b}, {h}, {w}) or ({b}, {c}, {h}, {w}) "
                         f"to match images {tuple(images.shape)}, got {tuple(maps.shape)}")
    if maps.dtype == torch.bool or not (maps.is_floating_point() or maps.dtype in
                                        (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"maps must be a real-valued tensor, got dtype {maps.dtype}")
    _check_finite("maps", maps)
    return maps.to(device=images.device, dtype=torch.float32).sum(1)


def _as_targets(targets, batch: int, device) -> torch.Tensor:
    if isinstance(targets, (int, np.integer)) and not isinstance(targets, bool):
        targets = torch.full((batch,), int(targets), dtype=torch.long)
    targets = torch.as_tensor(targets)
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if targets.ndim != 1 or targets.shape[0] != batch:
        raise ValueError(f"targets must have shape ({batch},) to match the images, got {tuple(targets.shape)}")
    if bool((targets < 0).any()):
        raise ValueError("targets must be non-negative class indices")
    return targets.to(device=device, dtype=torch.long)


def _check_patch(patch, h: int, w: int) -> int:
    patch = _check_int("patch", patch)
    if h % patch or w % patch:
        raise ValueError(f"patch {patch} does not divide the image size {h}×{w}")
    return patch


def _feature_grid(h: int, w: int, patch: int, device) -> torch.Tensor:
    """(H, W) long tensor: the raster index of the feature (patch) each pixel belongs to."""
    rows = torch.arange(h, device=device) // patch
    cols = torch.arange(w, device=device) // patch
    return rows[:, None] * (w // patch) + cols[None, :]


def _feature_relevance(maps: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, F) relevance of each feature = the sum of the (B, H, W) map over its patch."""
    b, h, w = maps.shape
    if patch == 1:
        return maps.reshape(b, h * w)
    return maps.reshape(b, h // patch, patch, w // patch, patch).sum((2, 4)).reshape(b, -1)


def _generator(seed: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _auto_channels_last(channels_last, device: torch.device, model=None, images: torch.Tensor | None = None) -> bool:
    """Auto (None): channels_last on the CPU, where oneDNN's convolutions are faster, but only when a
    one-image probe shows the model accepts it (a model that flattens with `.view` does not)."""
    if channels_last is None:
        if device.type != "cpu":
            return False
        if model is None or images is None:
            return True
        try:
            with torch.no_grad():
                model(images[:1].contiguous(memory_format=torch.channels_last))
        except RuntimeError:
            return False
        return True
    if not isinstance(channels_last, bool):
        raise ValueError(f"channels_last must be True, False or None (auto), got {channels_last!r}")
    return channels_last


class _Prepared:
    """Validated inputs on the model's device."""

    def __init__(self, model, images, maps, targets, device, channels_last):
        if not callable(model):
            raise ValueError(f"model must be a callable torch module, got {type(model).__name__}")
        self.model = model
        self.device, dtype = _model_device_dtype(model, device)
        self.images = _as_images(images, self.device, dtype)
        self.maps = _as_maps(maps, self.images) if maps is not None else None
        self.targets = _as_targets(targets, self.images.shape[0], self.device)
        self.channels_last = _auto_channels_last(channels_last, self.device, model, self.images)
        self.images = self.images.contiguous()


# ----------------------------------------------------------------------------------------------
# Replacement values
# ----------------------------------------------------------------------------------------------


def make_replacement(images, replacement="zero", *, dataset_mean=None, seed: int = 0,
                     blur_sigma: float = 5.0, blur_kernel_size: int = 11) -> torch.Tensor:
    """The replacement ("baseline") values for `images`, as a tensor broadcastable to them.

    ``"zero"`` → 0; ``"dataset_mean"`` → ``dataset_mean`` (a scalar, or one value per channel;
    required); ``"image_mean"`` → the per-image, per-channel mean of the original image, shape
    (B, C, 1, 1); ``"uniform"`` → ``torch.rand((B, C, H, W))`` from a CPU generator seeded with
    `seed` (so image i gets the same noise image for every map and metric); ``"blur"`` → torchvision's
    Gaussian blur of each image (kernel `blur_kernel_size`, `blur_sigma`, reflect padding; the
    Vandersmissen default is 11 / 5); a tensor → checked to be finite and broadcastable to `images`.
    The result is on the images' device and dtype.
    """
    images = torch.as_tensor(images)
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a floating (B, C, H, W) tensor, got {tuple(images.shape)} {images.dtype}")
    b, c, h, w = images.shape
    if isinstance(replacement, (torch.Tensor, np.ndarray)):
        value = torch.as_tensor(replacement)
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"a replacement tensor must be real-valued, got dtype {value.dtype}")
        value = value.to(device=images.device, dtype=images.dtype)
        try:
            shape = torch.broadcast_shapes(value.shape, images.shape)
        except RuntimeError:
            shape = None
        if shape != images.shape:
            raise ValueError(f"replacement tensor of shape {tuple(value.shape)} does not broadcast to the "
                             f"images' shape {tuple(images.shape)}")
        _check_finite("replacement", value)
        while value.ndim < 4:
            value = value[None]
        return value
    _check_choice("replacement", replacement, REPLACEMENTS)
    if replacement == "zero":
        return images.new_zeros(1, 1, 1, 1)
    if replacement == "dataset_mean":
        if dataset_mean is None:
            raise ValueError('replacement="dataset_mean" needs dataset_mean= (a scalar or one value per channel)')
        mean = torch.as_tensor(dataset_mean, dtype=images.dtype).flatten()
        if mean.numel() not in (1, c):
            raise ValueError(f"dataset_mean must be a scalar or have {c} values (one per channel), "
                             f"got {mean.numel()} values")
        _check_finite("dataset_mean", mean)
        return mean.to(images.device).reshape(1, -1, 1, 1)
    if replacement == "image_mean":
        return images.mean(dim=(2, 3), keepdim=True)
    if replacement == "uniform":
        seed = _check_int("seed", seed, 0)
        noise = torch.rand((b, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        return noise.to(device=images.device, dtype=images.dtype)
    # blur
    kernel = _check_int("blur_kernel_size", blur_kernel_size)
    if kernel % 2 == 0:
        raise ValueError(f"blur_kernel_size must be odd, got {kernel}")
    if kernel // 2 >= min(h, w):
        raise ValueError(f"blur_kernel_size {kernel} is too large for {h}×{w} images (reflect padding needs "
                         f"kernel_size // 2 < {min(h, w)})")
    if not isinstance(blur_sigma, (int, float)) or isinstance(blur_sigma, bool) or not blur_sigma > 0 \
            or not math.isfinite(blur_sigma):
        raise ValueError(f"blur_sigma must be a positive number, got {blur_sigma!r}")
    return TF.gaussian_blur(images, kernel_size=[kernel, kernel], sigma=[float(blur_sigma)] * 2)


def _prepared_replacement(prep: _Prepared, replacement, dataset_mean, seed, blur_sigma, blur_kernel_size):
    value = make_replacement(prep.images, replacement, dataset_mean=dataset_mean, seed=seed,
                             blur_sigma=blur_sigma, blur_kernel_size=blur_kernel_size)
    return value.contiguous()


def _row(value: torch.Tensor, image: int) -> torch.Tensor:
    """Image `image`'s replacement values from a per-image (B, …) or shared (1, …) tensor."""
    return value[image if value.shape[0] > 1 else 0]


def _single_feature_copies(image: torch.Tensor, replacement: torch.Tensor, grid: torch.Tensor,
                           features: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Copies of one (C, H, W) image, copy j with only feature `features[j]` replaced (−1: none).

    `grid` is the (H, W) feature index of each pixel. This is how :func:`faithfulness` builds its
    non-cumulative copies (written into `out` when given).
    """
    replaced = grid[None] == features[:, None, None]
    return torch.where(replaced[:, None], replacement, image, out=out)


# ----------------------------------------------------------------------------------------------
# Batched scoring
# ----------------------------------------------------------------------------------------------


# Copies are built a chunk at a time into one reused buffer of about 2 MiB (a whole number of model
# batches, at least one): it stays in cache, and neither the few kernels per chunk nor fresh
# allocations cost anything noticeable per copy.
_CHUNK_BYTES = 2 << 20

# piece(image, first_column, end_column, out): writes the copies of one image for those columns.
Piece = Callable[[int, int, int, torch.Tensor], object]


def _scores(prep: _Prepared, n_columns: int, piece: Piece, output: str, batch_size: int) -> torch.Tensor:
    """Scores of `n_columns` copies of every image, (B, n_columns) float32 on the device.

    Copy (b, c) is made by `piece` (vectorised over the columns of one image, broadcasting that
    image, so nothing is gathered per copy); a chunk of copies goes through the model in batches
    of `batch_size` under inference mode.
    """
    _check_choice("output", output, OUTPUTS)
    images = prep.images
    batch_size = _auto_batch_size(images, prep.device) if batch_size is None else _check_int("batch_size", batch_size)
    model = prep.model
    n_images = images.shape[0]
    n_items = n_images * n_columns
    max_target = int(prep.targets.max())
    per_copy = images[0].numel() * images.element_size()
    chunk = min(n_items, max(1, _CHUNK_BYTES // (per_copy * batch_size)) * batch_size)
    out = torch.empty(n_items, dtype=torch.float32, device=prep.device)
    was_training = isinstance(model, nn.Module) and bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            # The pieces are written in NCHW (broadcasting the mask over channels is then a plain
            # vectorised loop) and copied once into a channels_last twin, the faster route.
            buffer = torch.empty((chunk, *images.shape[1:]), dtype=images.dtype, device=prep.device)
            twin = torch.empty_like(buffer, memory_format=torch.channels_last) if prep.channels_last else None
            for start in range(0, n_items, chunk):
                stop = min(start + chunk, n_items)
                copies = buffer[: stop - start]
                flat = start
                while flat < stop:
                    image, column = divmod(flat, n_columns)
                    end = min(n_columns, column + stop - flat)
                    piece(image, column, end, copies[flat - start: flat - start + end - column])
                    flat += end - column
                if twin is not None:
                    copies = twin[: stop - start].copy_(copies)
                pieces = []
                for offset in range(0, stop - start, batch_size):
                    logits = model(copies[offset:offset + batch_size])
                    if start == 0 and offset == 0:
                        _check_logits(logits, min(batch_size, stop - start), max_target)
                    pieces.append(logits)
                logits = (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).float()
                if output == "prob":
                    logits = torch.softmax(logits, dim=1)
                owner = torch.arange(start, stop, device=prep.device) // n_columns
                out[start:stop] = logits.gather(1, prep.targets[owner][:, None])[:, 0]
    finally:
        if was_training:
            model.train(True)
    return out.reshape(n_images, n_columns)


def _auto_batch_size(images: torch.Tensor, device: torch.device) -> int:
    """``batch_size=None``: 256 copies per model call on an accelerator; on the CPU the largest power
    of two ≤ 256 with batch · H · W ≤ 2¹⁵ (32 at 32×32, 8 at 64×64, 128 at 16×16). Measured on the
    project's CNNs: once a batch's activations grow past a few MiB, every forward pass maps fresh
    memory from the kernel and page-faults it in, and a 256-copy batch costs 2–3× more per image."""
    if device.type != "cpu":
        return 256
    pixels = images.shape[2] * images.shape[3]
    return max(1, min(256, 2 ** max(0, math.floor(math.log2(2**15 / pixels)))))


def _check_logits(logits, rows: int, max_target: int) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != rows:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model must return (N, classes) scores, got {shape}")
    if max_target >= logits.shape[1]:
        raise ValueError(f"targets: {max_target} is out of range for a model with {logits.shape[1]} outputs")


def class_scores(model, images, targets, *, output: str = "prob", batch_size: int | None = None, device=None,
                 channels_last: bool | None = None) -> torch.Tensor:
    """f(x): the target-class probability or logit of each image, (B,) float32 on the CPU."""
    prep = _Prepared(model, images, None, targets, device, channels_last)
    images = prep.images
    scores = _scores(prep, 1, lambda image, _c0, _c1, out: out.copy_(images[image][None]), output, batch_size)
    return scores[:, 0].cpu()


# ----------------------------------------------------------------------------------------------
# Cumulative curves (AOPC, ABPC, deletion / insertion)
# ----------------------------------------------------------------------------------------------


def _step_counts(n_features: int, steps, pixels_per_step, patch: int) -> list[int]:
    """Number of features perturbed after each step k = 0..L."""
    if pixels_per_step is not None:
        pixels_per_step = _check_int("pixels_per_step", pixels_per_step)
        if pixels_per_step % (patch * patch):
            raise ValueError(f"pixels_per_step {pixels_per_step} must be a multiple of patch² = {patch * patch}")
        per_step = pixels_per_step // (patch * patch)
        if per_step > n_features:
            raise ValueError(f"pixels_per_step {pixels_per_step} is more than the image has "
                             f"({n_features} features of {patch * patch} pixels)")
        if steps is None:
            steps = math.ceil(n_features / per_step)
        steps = _check_int("steps", steps)
        if (steps - 1) * per_step >= n_features:
            raise ValueError(f"more steps than features: {steps} steps of {per_step} feature(s) need more than "
                             f"the {n_features} features of the image")
        return [min(k * per_step, n_features) for k in range(steps + 1)]
    if steps is None:
        steps = n_features
    steps = _check_int("steps", steps)
    if steps > n_features:
        raise ValueError(f"more steps than features: steps={steps} but the image has {n_features} features")
    return [k * n_features // steps for k in range(steps + 1)]


def _feature_order(relevance: torch.Tensor, order: str, ties: str, seed: int) -> torch.Tensor:
    """(B, F) feature indices, the first to be perturbed first."""
    b, f = relevance.shape
    if order == "random":
        gen = _generator(seed, _STREAM_ORDER)
        return torch.stack([torch.randperm(f, generator=gen) for _ in range(b)]).to(relevance.device)
    key = -relevance if order == "morf" else relevance
    if ties == "stable":
        return torch.argsort(key, dim=1, stable=True)
    gen = _generator(seed, _STREAM_TIES)
    shuffle = torch.stack([torch.randperm(f, generator=gen) for _ in range(b)]).to(relevance.device)
    within = torch.argsort(key.gather(1, shuffle), dim=1, stable=True)
    return shuffle.gather(1, within)


def perturbation_curve(model, images, maps, targets, *, order: str = "morf", mode: str = "deletion",
                       patch: int = 1, steps: int | None = None, pixels_per_step: int | None = None,
                       replacement="zero", dataset_mean=None, output: str = "prob", batch_size: int | None = None,
                       seed: int = 0, ties: str = "stable", blur_sigma: float = 5.0, blur_kernel_size: int = 11,
                       device=None, channels_last: bool | None = None) -> torch.Tensor:
    """Scores along cumulative perturbation, (B, steps + 1) float32 on the CPU.

    Features (pixels, or ``patch × patch`` squares with relevance = sum of the map) are ordered by
    `order` ("morf" descending, "lerf" ascending, both stable so ties keep raster order unless
    ``ties="random"``; "random" a seeded permutation per image). After step k the first n_k
    features are replaced (``mode="deletion"``) or, starting from the replacement image, inserted
    back from the original (``mode="insertion"``). Column 0 is f(x) for deletion and f(replacement)
    for insertion. Step schedule:

    * ``pixels_per_step`` given (a multiple of patch²): n_k = min(k · pixels_per_step / patch², F);
      ``steps`` defaults to enough steps to cover every feature (the last step may be partial);
    * only ``steps`` given: n_k = ⌊k · F / steps⌋ (steps ≤ F), so step L covers all F features
      (Vandersmissen: 100 steps of 1/100 of the image);
    * neither: one feature per step, L = F.

    A step that would add no new feature raises ValueError ("more steps than features").
    See the module docstring for `replacement`, `seed`, `output` and `channels_last`.
    """
    _check_choice("order", order, ORDERS)
    _check_choice("mode", mode, MODES)
    _check_choice("ties", ties, TIES)
    _check_choice("output", output, OUTPUTS)
    seed = _check_int("seed", seed, 0)
    prep = _Prepared(model, images, maps, targets, device, channels_last)
    b, _, h, w = prep.images.shape
    patch = _check_patch(patch, h, w)
    relevance = _feature_relevance(prep.maps, patch)
    n_features = relevance.shape[1]
    counts = torch.tensor(_step_counts(n_features, steps, pixels_per_step, patch), device=prep.device)
    n_columns = counts.numel()
    if n_features < 2**31:
        counts = counts.int()
    feature_order = _feature_order(relevance, order, ties, seed)
    rank = torch.empty_like(feature_order)
    rank.scatter_(1, feature_order, torch.arange(n_features, device=prep.device).expand(b, -1))
    rank = rank.to(counts.dtype)
    pixel_rank = rank[:, _feature_grid(h, w, patch, prep.device)]  # (B, H, W): when each pixel goes
    value = _prepared_replacement(prep, replacement, dataset_mean, seed, blur_sigma, blur_kernel_size)
    images_ = prep.images
    insertion = mode == "insertion"

    def piece(image, first, end, out):
        changed = (pixel_rank[image] < counts[first:end, None, None])[:, None]
        if insertion:
            torch.where(changed, images_[image], _row(value, image), out=out)
        else:
            torch.where(changed, _row(value, image), images_[image], out=out)

    return _scores(prep, n_columns, piece, output, batch_size).cpu()


def _as_curve(name: str, curve) -> torch.Tensor:
    curve = torch.as_tensor(curve)
    if curve.ndim != 2 or curve.shape[1] < 2:
        raise ValueError(f"{name} must have shape (B, L + 1) with L >= 1, got {tuple(curve.shape)}")
    if not curve.is_floating_point():
        curve = curve.float()
    _check_finite(name, curve)
    return curve


def aopc(curve) -> torch.Tensor:
    """Per-image AOPC of a deletion curve: 1/(L+1) Σ_{k=0..L} (f(x0) − f(xk)) (Tomsett Q3)."""
    curve = _as_curve("curve", curve)
    return (curve[:, :1] - curve).mean(dim=1)


def abpc(curve_lerf, curve_morf) -> torch.Tensor:
    """Per-image ABPC: 1/(L+1) Σ_{k=0..L} (f_LeRF(xk) − f_MoRF(xk)) = AOPC-MoRF − AOPC-LeRF."""
    curve_lerf = _as_curve("curve_lerf", curve_lerf)
    curve_morf = _as_curve("curve_morf", curve_morf)
    if curve_lerf.shape != curve_morf.shape:
        raise ValueError(f"curve_lerf {tuple(curve_lerf.shape)} and curve_morf {tuple(curve_morf.shape)} "
                         "must have the same shape")
    return (curve_lerf - curve_morf).mean(dim=1)


def auc(curve) -> torch.Tensor:
    """Per-image trapezoidal area under a curve on the x-axis k/L ∈ [0, 1] (Vandersmissen)."""
    curve = _as_curve("curve", curve)
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[1] - 1), dim=1)


def _fixed_curve(caller: str, model, images, maps, targets, kwargs: dict, order: str,
                 mode: str = "deletion") -> torch.Tensor:
    """`perturbation_curve` with the order and mode that the calling metric defines."""
    for key in ("order", "mode"):
        if key in kwargs:
            raise ValueError(f"{key!r} is fixed by this function ({caller}); call perturbation_curve to choose it")
    accepted = [name for name, parameter in inspect.signature(perturbation_curve).parameters.items()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("order", "mode")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{caller} got unknown keyword argument(s) {unknown}; accepted: {accepted}")
    return perturbation_curve(model, images, maps, targets, **kwargs, order=order, mode=mode)


def aopc_morf(model, images, maps, targets, **kwargs) -> torch.Tensor:
    """AOPC of the MoRF deletion curve, (B,); keyword arguments as in :func:`perturbation_curve`."""
    return aopc(_fixed_curve("aopc_morf", model, images, maps, targets, kwargs, "morf"))


def aopc_lerf(model, images, maps, targets, **kwargs) -> torch.Tensor:
    """AOPC of the LeRF deletion curve, (B,) (lower is better)."""
    return aopc(_fixed_curve("aopc_lerf", model, images, maps, targets, kwargs, "lerf"))


def abpc_score(model, images, maps, targets, **kwargs) -> torch.Tensor:
    """ABPC from the LeRF and MoRF deletion curves, (B,) (higher is better)."""
    return abpc(_fixed_curve("abpc_score", model, images, maps, targets, kwargs, "lerf"),
                _fixed_curve("abpc_score", model, images, maps, targets, kwargs, "morf"))


def deletion_auc(model, images, maps, targets, **kwargs) -> torch.Tensor:
    """Deletion AUC (MoRF deletion curve, x ∈ [0, 1]), (B,) (lower is better)."""
    return auc(_fixed_curve("deletion_auc", model, images, maps, targets, kwargs, "morf"))


def insertion_auc(model, images, maps, targets, **kwargs) -> torch.Tensor:
    """Insertion AUC (MoRF insertion curve, x ∈ [0, 1]), (B,) (higher is better)."""
    return auc(_fixed_curve("insertion_auc", model, images, maps, targets, kwargs, "morf", mode="insertion"))


# ----------------------------------------------------------------------------------------------
# Correlation metrics
# ----------------------------------------------------------------------------------------------


def _correlate(a: torch.Tensor, b: torch.Tensor, correlation: str, on_constant: str) -> torch.Tensor:
    """Row-wise Pearson or Spearman correlation of two (B, N) tensors, float32 (B,) on the CPU."""
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    # Exact test on the raw values: a constant row has no defined correlation.
    constant = (a.amax(dim=1) == a.amin(dim=1)) | (b.amax(dim=1) == b.amin(dim=1))
    if bool(constant.any()) and on_constant == "raise":
        images = constant.nonzero().flatten().tolist()
        raise ValueError(f"correlation undefined for image(s) {images[:10]}: the relevance or the score drop is "
                         "constant over the features (e.g. a constant map); pass on_constant='nan' to get NaN")
    if correlation == "spearman":
        a = torch.from_numpy(scipy.stats.rankdata(a.numpy(), axis=1, method="average"))
        b = torch.from_numpy(scipy.stats.rankdata(b.numpy(), axis=1, method="average"))
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    denominator = a.norm(dim=1) * b.norm(dim=1)
    r = (a * b).sum(dim=1) / torch.where(constant, torch.ones_like(denominator), denominator)
    r = r.clamp(-1.0, 1.0)
    r[constant] = float("nan")
    return r.float()


def faithfulness(model, images, maps, targets, *, patch: int = 1, replacement="zero", dataset_mean=None,
                 output: str = "logit", correlation: str = "pearson", features: int | None = None,
                 batch_size: int | None = None, seed: int = 0, on_constant: str = "raise", blur_sigma: float = 5.0,
                 blur_kernel_size: int = 11, device=None, channels_last: bool | None = None) -> torch.Tensor:
    """Alvarez-Melis & Jaakkola faithfulness (non-cumulative), (B,) float32 on the CPU.

    For each feature i (pixel, or ``patch × patch`` square with relevance r_i = sum of the map over
    it) the copy x^(i) has only feature i replaced; drop_i = f(x) − f(x^(i)); the score is the
    Pearson (or Spearman) correlation over features of (r_i, drop_i). ``features=None`` uses all
    features; an int uses that many features drawn at random per image (seeded, without
    replacement). A constant relevance or drop makes the correlation undefined: ValueError, or
    NaN for that image with ``on_constant="nan"``. Default score: the logit (as Quantus).
    """
    _check_choice("correlation", correlation, CORRELATIONS)
    _check_choice("on_constant", on_constant, ON_CONSTANT)
    _check_choice("output", output, OUTPUTS)
    seed = _check_int("seed", seed, 0)
    prep = _Prepared(model, images, maps, targets, device, channels_last)
    b, _, h, w = prep.images.shape
    patch = _check_patch(patch, h, w)
    relevance = _feature_relevance(prep.maps, patch)
    n_features = relevance.shape[1]
    if n_features < 2:
        raise ValueError(f"faithfulness needs at least 2 features, the image has {n_features} of patch {patch}")
    if features is None:
        chosen = torch.arange(n_features, device=prep.device).expand(b, -1)
    else:
        features = _check_int("features", features, 2)
        if features > n_features:
            raise ValueError(f"features={features} is more than the {n_features} features of the image")
        gen = _generator(seed, _STREAM_FEATURES)
        chosen = torch.stack([torch.randperm(n_features, generator=gen)[:features] for _ in range(b)])
        chosen = chosen.to(prep.device)
    n_columns = chosen.shape[1] + 1
    columns = torch.cat([chosen.new_full((b, 1), -1), chosen], dim=1)  # column 0: the unperturbed image
    value = _prepared_replacement(prep, replacement, dataset_mean, seed, blur_sigma, blur_kernel_size)
    grid = _feature_grid(h, w, patch, prep.device)
    images_ = prep.images

    def piece(image, first, end, out):
        _single_feature_copies(images_[image], _row(value, image), grid, columns[image, first:end], out=out)

    scores = _scores(prep, n_columns, piece, output, batch_size)
    drops = scores[:, :1] - scores[:, 1:]
    return _correlate(relevance.gather(1, chosen), drops, correlation, on_constant)


def faithfulness_correlation(model, images, maps, targets, *, n_runs: int = 100, subset_size: int | None = None,
                             patch: int = 1, replacement="zero", dataset_mean=None, output: str = "logit",
                             correlation: str = "pearson", subsets=None, batch_size: int | None = None, seed: int = 0,
                             on_constant: str = "raise", blur_sigma: float = 5.0, blur_kernel_size: int = 11,
                             device=None, channels_last: bool | None = None) -> torch.Tensor:
    """Bhatt et al. (2020) faithfulness correlation, (B,) float32 on the CPU.

    In each of `n_runs` runs a random subset of `subset_size` features (default ⌈F/10⌉, a project
    choice; Quantus' 224 is meant for 224×224 images) is replaced at once; the score is the
    correlation over runs between the subset's summed relevance and the drop f(x) − f(x_subset).
    Subsets are drawn per image and run from a generator seeded by `seed`; `subsets` (a (B, n_runs,
    subset_size) tensor of feature indices) replaces the draw, e.g. to replay another library's.
    """
    _check_choice("correlation", correlation, CORRELATIONS)
    _check_choice("on_constant", on_constant, ON_CONSTANT)
    _check_choice("output", output, OUTPUTS)
    seed = _check_int("seed", seed, 0)
    prep = _Prepared(model, images, maps, targets, device, channels_last)
    b, _, h, w = prep.images.shape
    patch = _check_patch(patch, h, w)
    relevance = _feature_relevance(prep.maps, patch)
    n_features = relevance.shape[1]
    if subsets is None:
        n_runs = _check_int("n_runs", n_runs, 2)
        subset_size = math.ceil(n_features / 10) if subset_size is None else _check_int("subset_size", subset_size)
        if subset_size > n_features:
            raise ValueError(f"subset_size={subset_size} is more than the {n_features} features of the image")
        gen = _generator(seed, _STREAM_SUBSETS)
        # One image at a time keeps the random keys small; the subset = the features with the
        # `subset_size` largest U(0,1) keys (a uniform draw without replacement).
        subsets = torch.stack([torch.rand(n_runs, n_features, generator=gen).topk(subset_size, dim=1).indices
                               for _ in range(b)])
    else:
        subsets = torch.as_tensor(subsets)
        if subsets.ndim != 3 or subsets.shape[0] != b or subsets.shape[1] < 2 or subsets.shape[2] < 1:
            raise ValueError(f"subsets must have shape ({b}, n_runs >= 2, subset_size), got {tuple(subsets.shape)}")
        if subsets.is_floating_point() or subsets.dtype == torch.bool:
            raise ValueError(f"subsets must hold integer feature indices, got dtype {subsets.dtype}")
        if bool((subsets < 0).any()) or bool((subsets >= n_features).any()):
            raise ValueError(f"subsets must index features 0..{n_features - 1}")
        ordered = subsets.sort(dim=2).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise ValueError("subsets must not repeat a feature within one subset")
        subsets = subsets.long()
    subsets = subsets.to(prep.device)
    n_runs = subsets.shape[1]
    n_columns = n_runs + 1  # column 0: the unperturbed image; column r: run r − 1
    value = _prepared_replacement(prep, replacement, dataset_mean, seed, blur_sigma, blur_kernel_size)
    grid = _feature_grid(h, w, patch, prep.device)
    images_ = prep.images

    def piece(image, first, end, out):
        member = torch.zeros(end - first, n_features, dtype=torch.bool, device=prep.device)
        skip = 1 if first == 0 else 0
        member[skip:].scatter_(1, subsets[image, first + skip - 1:end - 1], True)
        replaced = member[:, grid]  # (columns, H, W)
        torch.where(replaced[:, None], _row(value, image), images_[image], out=out)

    scores = _scores(prep, n_columns, piece, output, batch_size)
    drops = scores[:, :1] - scores[:, 1:]
    subset_relevance = relevance[:, None, :].expand(-1, n_runs, -1).gather(2, subsets).sum(dim=2)
    return _correlate(subset_relevance, drops, correlation, on_constant)


# ----------------------------------------------------------------------------------------------
# Average Drop / Increase in Confidence
# ----------------------------------------------------------------------------------------------


def _explanation_mask(maps: torch.Tensor, binarise) -> torch.Tensor:
    """(B, H, W) mask in [0, 1]: min-max normalised map, or the top-`binarise` fraction set to 1."""
    b, h, w = maps.shape
    flat = maps.reshape(b, -1)
    if binarise is None:
        low = flat.min(dim=1, keepdim=True).values
        high = flat.max(dim=1, keepdim=True).values
        spread = high - low
        scaled = (flat - low) / torch.where(spread > 0, spread, torch.ones_like(spread))
        soft = torch.where(spread > 0, scaled, flat.clamp(0.0, 1.0))
        return soft.reshape(b, h, w)
    if isinstance(binarise, bool) or not isinstance(binarise, (int, float)) or not 0 < binarise <= 1:
        raise ValueError(f"binarise must be None or a fraction in (0, 1], got {binarise!r}")
    keep = math.ceil(round(binarise * h * w, 9))
    top = torch.argsort(-flat, dim=1, stable=True)[:, :keep]
    mask = torch.zeros_like(flat)
    mask.scatter_(1, top, 1.0)
    return mask.reshape(b, h, w)


def average_drop_increase(model, images, maps, targets, *, binarise: float | None = None, output: str = "prob",
                          batch_size: int | None = None, device=None,
                          channels_last: bool | None = None) -> dict[str, torch.Tensor]:
    """Average Drop % and Increase in Confidence (Chattopadhay et al. 2018; Vandersmissen card E2).

    The explanation image is x ⊙ s in the space the model sees (for normalised inputs a masked pixel
    becomes 0 = the dataset mean colour, Vandersmissen Q4). Soft (``binarise=None``): s is the map
    min-max normalised per image to [0, 1]; a constant map cannot be min-max normalised and is used
    clipped to [0, 1] instead (so s ≡ 1 keeps the image and s ≡ 0 blanks it). ``binarise=q``: s = 1 on
    the top ⌈q·H·W⌉ pixels (stable ties: raster order; q = 0.1 is the card's "90" folder), 0 elsewhere.
    Returns per-image (B,) float32 CPU tensors: ``average_drop`` = max(0, y − o) / y · 100,
    ``increase_in_confidence`` = 1.0 where o > y else 0.0 (its mean × 100 is the % of the paper),
    ``score`` = y = f(x) and ``masked_score`` = o = f(x ⊙ s). y must be positive (ValueError otherwise).
    """
    _check_choice("output", output, OUTPUTS)
    prep = _Prepared(model, images, maps, targets, device, channels_last)
    mask = _explanation_mask(prep.maps, binarise).to(prep.images.dtype)[:, None]  # (B, 1, H, W)
    images_ = prep.images

    def piece(image, first, end, out):
        for column in range(first, end):  # column 0: x; column 1: x ⊙ s
            if column == 0:
                out[0].copy_(images_[image])
            else:
                torch.mul(images_[image], mask[image], out=out[column - first])

    scores = _scores(prep, 2, piece, output, batch_size).double()
    y, o = scores[:, 0], scores[:, 1]
    if bool((y <= 0).any()):
        bad = (y <= 0).nonzero().flatten().tolist()
        raise ValueError(f"Average Drop divides by f(x), which is <= 0 for image(s) {bad[:10]}; "
                         "use output='prob' or positive scores")
    drop = (y - o).clamp(min=0.0) / y * 100.0
    return {
        "average_drop": drop.float().cpu(),
        "increase_in_confidence": (o > y).float().cpu(),
        "score": y.float().cpu(),
        "masked_score": o.float().cpu(),
    }
