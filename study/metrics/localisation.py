"""Localisation metrics: does a saliency map point at the ground-truth region?

Every function takes a batch of maps, ``(B, 1, H, W)`` or ``(B, H, W)`` (torch tensors or numpy
arrays), and binary masks of the same spatial shape, and returns one value per image as a numpy
array of shape ``(B,)``. Inputs are checked: NaN/Inf values, shape mismatches, non-binary
masks, empty masks where a metric is undefined and unknown option values raise ``ValueError``.

Families, with the paper each definition follows:

* pointing game (Zhang et al. 2018; Quantus ``PointingGame``; Vandersmissen & Oramas 2024),
* energy pointing game, EPG (Rao et al. 2023, Eq. 2),
* relevance mass / rank accuracy (Arras et al. 2022, as Quantus 0.6.0 computes them),
* IoU / IoP / IoT with the mask-area percentile rule (Viviano et al. 2021) or a fixed threshold
  after min-max normalisation (Rao et al. 2023, authors' code),
* the box protocol of Phang et al. 2020: mean threshold -> largest connected component -> box,
  LE, OM, F1 and the saliency metric SM of Dabkowski & Gal 2017.

Boxes are ``[x0, y0, x1, y1)`` in pixels with exclusive ends, so a box's area is
``(x1 - x0) * (y1 - y0)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "pointing_game",
    "energy_pointing_game",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "binarise_by_mask_area",
    "binarise_min_max",
    "iou",
    "iop",
    "iot",
    "overlap_scores",
    "boxes_to_mask",
    "rasterise_boxes",
    "box_iou",
    "saliency_box",
    "localisation_error",
    "official_metric",
    "f1_mask",
    "box_area_fraction",
    "saliency_metric",
]

_POINTING_TIES = ("any", "first", "random", "fraction")
_RANK_TIES = ("expected", "random", "raster")


# --------------------------------------------------------------------------------------------
# input checks (shared with the other metric modules)
# --------------------------------------------------------------------------------------------


def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as error:  # pragma: no cover - numpy's own message is kept
        raise ValueError(f"{name} could not be converted to an array: {error}") from error


def _check_numeric(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype == bool:
        return a.astype(np.float64)
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name} must hold real numbers; got dtype {a.dtype}")
    return a.astype(np.float64)


def _check_finite(a: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        rows = np.unique(np.nonzero(bad.reshape(a.shape[0], -1) if a.ndim > 1 else bad)[0])
        raise ValueError(
            f"{name} contains NaN or Inf ({int(bad.sum())} values; images {rows[:10].tolist()}); "
            "metrics need finite values"
        )


def _maps(maps, name: str = "maps") -> tuple[np.ndarray, bool]:
    """``(B, 1, H, W)`` or ``(B, H, W)`` -> float64 ``(B, H, W)`` and whether the input was 4-D."""
    a = _check_numeric(_to_numpy(maps, name), name)
    four_d = a.ndim == 4
    if four_d:
        if a.shape[1] != 1:
            raise ValueError(
                f"{name} must have one channel, shape (B, 1, H, W); got {tuple(a.shape)}. "
                "Reduce the channels first (e.g. sum or max over C)."
            )
        a = a[:, 0]
    elif a.ndim != 3:
        raise ValueError(f"{name} must have shape (B, 1, H, W) or (B, H, W); got {tuple(a.shape)}")
    if a.size == 0:
        raise ValueError(f"{name} is empty: shape {tuple(a.shape)}")
    _check_finite(a, name)
    return a, four_d


def _masks(masks, shape: tuple[int, ...], name: str = "masks", allow_empty: bool = False) -> np.ndarray:
    """Binary masks of spatial ``shape`` ``(B, H, W)`` -> bool ``(B, H, W)``."""
    m = _to_numpy(masks, name)
    if m.ndim == 4:
        if m.shape[1] != 1:
            raise ValueError(f"{name} must have one channel, shape (B, 1, H, W); got {tuple(m.shape)}")
        m = m[:, 0]
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(m.shape)} but the maps have shape {tuple(shape)} (B, H, W)")
    if m.dtype != bool:
        mf = _check_numeric(m, name)
        _check_finite(mf, name)
        if not np.isin(mf, (0.0, 1.0)).all():
            raise ValueError(f"{name} must be binary (bool or 0/1 values)")
        m = mf.astype(bool)
    if not allow_empty:
        empty = ~m.reshape(m.shape[0], -1).any(axis=1)
        if empty.any():
            raise ValueError(
                f"{name} of images {np.nonzero(empty)[0][:10].tolist()} are empty; "
                "this metric is undefined for an empty ground-truth region"
            )
    return m


def _check_option(value, allowed: Sequence, name: str):
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(allowed)}")
    return value


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1)


def _restore(a: np.ndarray, four_d: bool) -> np.ndarray:
    return a[:, None] if four_d else a


# --------------------------------------------------------------------------------------------
# pointing game, EPG, relevance mass / rank
# --------------------------------------------------------------------------------------------


def _dilate(masks: np.ndarray, tolerance: float) -> np.ndarray:
    """Pixels within Euclidean distance ``tolerance`` of the mask (Zhang et al.'s tolerance)."""
    out = np.empty_like(masks)
    for i, m in enumerate(masks):
        out[i] = ndimage.distance_transform_edt(~m) <= tolerance
    return out


def pointing_game(maps, masks, tolerance: float = 0, ties: str = "any", seed: int = 0) -> np.ndarray:
    """Pointing game (Zhang et al. 2018): is the map's maximum inside the ground-truth region?

    ``masks`` are the target's region (Vandersmissen & Oramas 2024: the union of the target-class
    boxes). With ``tolerance > 0`` a point within that many pixels (Euclidean) of the region also
    counts as a hit (Zhang et al. used 15 px at ImageNet scale); 0 is the exact test used by
    Quantus and by Vandersmissen & Oramas.

    Tie handling when several pixels share the maximal value (e.g. a binary or constant map):

    * ``"any"`` (default): hit if *any* maximal pixel is inside, as Quantus 0.6.0 ``PointingGame``;
    * ``"first"``: the first maximal pixel in raster order, as ``argmax`` in Vandersmissen &
      Oramas' code (card §7 invariant 5);
    * ``"random"``: one maximal pixel drawn uniformly with ``numpy.random.default_rng(seed)``;
    * ``"fraction"``: the fraction of maximal pixels that are inside (the expected hit under a
      uniformly random tie-break); returns floats.

    A constant map therefore scores 1 under ``"any"`` for every non-empty mask: a known weakness of
    the Quantus definition. Empty masks raise ``ValueError`` (Quantus returns NaN).

    Returns a bool array ``(B,)`` (float for ``ties="fraction"``).
    """
    a, _ = _maps(maps)
    m = _masks(masks, a.shape)
    _check_option(ties, _POINTING_TIES, "ties")
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number >= 0 pixels; got {tolerance!r}")
    if tolerance > 0:
        m = _dilate(m, float(tolerance))
    af, mf = _flat(a), _flat(m)
    is_max = af == af.max(axis=1, keepdims=True)
    if ties == "any":
        return (is_max & mf).any(axis=1)
    if ties == "fraction":
        return (is_max & mf).sum(axis=1) / is_max.sum(axis=1)
    if ties == "first":
        index = af.argmax(axis=1)
    else:  # random: the maximal pixel with the largest uniform key
        keys = np.random.default_rng(seed).random(af.shape)
        index = np.where(is_max, keys, -1.0).argmax(axis=1)
    return mf[np.arange(af.shape[0]), index]


def energy_pointing_game(maps, masks, min_energy: float = 1e-7) -> np.ndarray:
    """Energy pointing game (Rao et al. 2023, Eq. 2): positive mass inside the mask / total.

    EPG = sum(M * A+) / sum(A+) with A+ = max(A, 0) on the raw map (no normalisation). As in the
    authors' code, an image whose total positive energy is below ``min_energy`` scores 0 (card Q5)
    rather than NaN. A uniform map scores the mask's area fraction (card Q6). Empty masks raise.
    """
    a, _ = _maps(maps)
    m = _masks(masks, a.shape)
    if not np.isfinite(min_energy) or min_energy < 0:
        raise ValueError(f"min_energy must be a finite number >= 0; got {min_energy!r}")
    positive = _flat(np.clip(a, 0.0, None))
    inside = (positive * _flat(m)).sum(axis=1)
    total = positive.sum(axis=1)
    dead = total < min_energy
    return np.where(dead, 0.0, inside / np.where(dead, 1.0, total))


def relevance_mass_accuracy(maps, masks) -> np.ndarray:
    """Relevance mass accuracy (Arras et al. 2022), exactly as Quantus 0.6.0 computes it.

    RMA = sum of the map inside the mask / sum of the whole map, on the values as given (Quantus
    applies no clamping; pass ``abs`` or positive-part maps yourself — on non-negative maps RMA
    equals :func:`energy_pointing_game`). A map whose total is 0 raises ``ValueError`` (Quantus
    returns NaN/Inf), as do empty masks.
    """
    a, _ = _maps(maps)
    m = _masks(masks, a.shape)
    af = _flat(a)
    total = af.sum(axis=1)
    zero = total == 0
    if zero.any():
        raise ValueError(
            f"the maps of images {np.nonzero(zero)[0][:10].tolist()} sum to 0; relevance mass "
            "accuracy is undefined (pass non-negative, non-zero maps)"
        )
    return (af * _flat(m)).sum(axis=1) / total


def relevance_rank_accuracy(maps, masks, ties: str = "expected", seed: int = 0) -> np.ndarray:
    """Relevance rank accuracy (Arras et al. 2022), as Quantus 0.6.0 defines it.

    With K = |mask|, RRA = |top-K pixels of the map ∩ mask| / K. Quantus orders the pixels with
    ``np.argsort(-a)`` (quicksort, so ties fall in an unspecified order); here ties at the K-th
    value are resolved by ``ties``:

    * ``"expected"`` (default): the expected count under a uniformly random tie-break, i.e. the
      tied pixels that are needed to fill K count in proportion to the share of the tie group
      inside the mask. Deterministic and seed-free.
    * ``"random"``: one random order drawn with ``numpy.random.default_rng(seed)``.
    * ``"raster"``: a stable sort, so tied pixels are taken in raster order.

    On tie-free maps all three agree with Quantus exactly. Empty masks raise ``ValueError``.
    """
    a, _ = _maps(maps)
    m = _masks(masks, a.shape)
    _check_option(ties, _RANK_TIES, "ties")
    af, mf = _flat(a), _flat(m)
    batch, n = af.shape
    k = mf.sum(axis=1)
    rows = np.arange(batch)
    if ties == "expected":
        kth = -np.sort(-af, axis=1)[rows, k - 1]
        above = af > kth[:, None]
        group = af == kth[:, None]
        needed = k - above.sum(axis=1)
        hits = (above & mf).sum(axis=1) + needed * (group & mf).sum(axis=1) / group.sum(axis=1)
        return hits / k
    if ties == "raster":
        order = np.argsort(-af, axis=1, kind="stable")
    else:
        keys = np.random.default_rng(seed).random(af.shape)
        order = np.lexsort((keys, -af), axis=1)
    taken = mf[rows[:, None], order]
    top = np.arange(n)[None, :] < k[:, None]
    return (taken & top).sum(axis=1) / k


# --------------------------------------------------------------------------------------------
# binarisation and IoU / IoP / IoT
# --------------------------------------------------------------------------------------------


def binarise_by_mask_area(maps, masks) -> np.ndarray:
    """Viviano et al. 2021 threshold rule: keep about |M| pixels of the map.

    Per image, values below the (100 − 100·|M|/(H·W))-th percentile are set to 0 and the result is
    binarised as ``> 0``. The percentile uses numpy's default linear interpolation, with the
    interpolation position computed exactly in integer arithmetic, so that a map with distinct,
    positive values yields exactly |M| pixels (card §7 invariant 7). Ties at the threshold keep
    every tied pixel (more than |M|); non-positive values never enter S. Empty masks raise.

    Returns a bool array in the maps' layout (``(B, 1, H, W)`` or ``(B, H, W)``).
    """
    a, four_d = _maps(maps)
    m = _masks(masks, a.shape)
    af = _flat(a)
    batch, n = af.shape
    k = _flat(m).sum(axis=1).astype(np.int64)
    ordered = np.sort(af, axis=1)
    # q/100 * (n - 1) with q = 100 - 100 k / n, i.e. (n - 1)(n - k) / n, exactly
    numerator = (n - 1) * (n - k)
    low = numerator // n
    fraction = (numerator % n) / n
    high = np.minimum(low + 1, n - 1)
    rows = np.arange(batch)
    threshold = ordered[rows, low] + (ordered[rows, high] - ordered[rows, low]) * fraction
    kept = (af >= threshold[:, None]) & (af > 0)
    return _restore(kept.reshape(a.shape), four_d)


def binarise_min_max(maps, threshold: float = 0.5) -> np.ndarray:
    """Rao et al. 2023 (authors' code): clamp at 0, min-max normalise per map, keep ``>= threshold``.

    A map that is constant after clamping normalises to all zeros (nothing kept), so its IoU is 0.
    Whether the authors compare with ``>`` or ``>=`` is not recorded (unverified); ``>=`` is used,
    which always keeps the maximal pixel of a non-constant map.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)):
        raise ValueError(f"threshold must be a number in [0, 1]; got {threshold!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1] (maps are min-max normalised); got {threshold!r}")
    a, four_d = _maps(maps)
    af = _flat(np.clip(a, 0.0, None))
    low = af.min(axis=1, keepdims=True)
    span = af.max(axis=1, keepdims=True) - low
    normalised = np.where(span > 0, (af - low) / np.where(span > 0, span, 1.0), 0.0)
    kept = (normalised >= float(threshold)) & (span > 0)
    return _restore(kept.reshape(a.shape), four_d)


def _pair(pred, masks, allow_empty_masks: bool) -> tuple[np.ndarray, np.ndarray]:
    p = _to_numpy(pred, "pred")
    if p.ndim == 4:
        if p.shape[1] != 1:
            raise ValueError(f"pred must have one channel, shape (B, 1, H, W); got {tuple(p.shape)}")
        p = p[:, 0]
    if p.ndim != 3 or p.size == 0:
        raise ValueError(f"pred must have shape (B, 1, H, W) or (B, H, W); got {tuple(p.shape)}")
    p = _masks(p, p.shape, name="pred", allow_empty=True)
    m = _masks(masks, p.shape, allow_empty=allow_empty_masks)
    return _flat(p), _flat(m)


def iou(pred, masks) -> np.ndarray:
    """Intersection over union |S ∩ M| / |S ∪ M| of binary predictions and masks.

    0 when the union is empty (Rao et al. 2023, authors' code).
    """
    p, m = _pair(pred, masks, allow_empty_masks=True)
    inter = (p & m).sum(axis=1)
    union = (p | m).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def iop(pred, masks) -> np.ndarray:
    """Intersection over prediction |S ∩ M| / |S| (Viviano et al. 2021); 0 for an empty S."""
    p, m = _pair(pred, masks, allow_empty_masks=True)
    size = p.sum(axis=1)
    return np.where(size > 0, (p & m).sum(axis=1) / np.maximum(size, 1), 0.0)


def iot(pred, masks) -> np.ndarray:
    """Intersection over target |S ∩ M| / |M| (Viviano et al. 2021); empty masks raise."""
    p, m = _pair(pred, masks, allow_empty_masks=False)
    return (p & m).sum(axis=1) / m.sum(axis=1)


def overlap_scores(maps, masks, threshold: float | str = "mask_area") -> dict[str, np.ndarray]:
    """IoU, IoP and IoT of a binarised map against the mask: ``{"iou", "iop", "iot"}`` -> ``(B,)``.

    ``threshold="mask_area"`` uses Viviano et al.'s percentile rule (:func:`binarise_by_mask_area`);
    a number t in [0, 1] uses Rao et al.'s code rule (:func:`binarise_min_max`). Masks must be
    non-empty (Viviano evaluates only images with a non-empty mask).
    """
    a, _ = _maps(maps)
    m = _masks(masks, a.shape)
    if isinstance(threshold, str):
        _check_option(threshold, ("mask_area",), "threshold")
        pred = binarise_by_mask_area(a, m)
    else:
        pred = binarise_min_max(a, threshold)
    return {"iou": iou(pred, m), "iop": iop(pred, m), "iot": iot(pred, m)}


# --------------------------------------------------------------------------------------------
# boxes (Phang et al. 2020)
# --------------------------------------------------------------------------------------------


def _boxes(boxes, name: str) -> np.ndarray:
    b = _check_numeric(_to_numpy(boxes, name), name)
    if b.ndim < 1 or b.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (..., 4) as [x0, y0, x1, y1); got {tuple(b.shape)}")
    _check_finite(b.reshape(-1, 4), name)
    if (b[..., 2] < b[..., 0]).any() or (b[..., 3] < b[..., 1]).any():
        raise ValueError(f"{name} has boxes with x1 < x0 or y1 < y0; boxes are [x0, y0, x1, y1) with x1 >= x0, y1 >= y0")
    return b


def _box_list(gt_boxes, batch: int, name: str = "gt_boxes") -> list[np.ndarray]:
    """Ground-truth boxes per image: a ``(B, 4)`` or ``(B, N, 4)`` array, or a length-B sequence."""
    if isinstance(gt_boxes, (list, tuple)):
        items = [_boxes(item, name).reshape(-1, 4) for item in gt_boxes]
    else:
        b = _boxes(gt_boxes, name)
        if b.ndim == 2:
            items = [row[None] for row in b]
        elif b.ndim == 3:
            items = list(b)
        else:
            raise ValueError(f"{name} must be (B, 4), (B, N, 4) or a list of (n_i, 4); got {tuple(b.shape)}")
    if len(items) != batch:
        raise ValueError(f"{name} holds boxes for {len(items)} images but there are {batch} predictions")
    empty = [i for i, item in enumerate(items) if len(item) == 0]
    if empty:
        raise ValueError(f"{name}: images {empty[:10]} have no ground-truth box; the metric is undefined")
    return items


def rasterise_boxes(boxes, height: int, width: int) -> np.ndarray:
    """The union of ``boxes`` (rows ``[x0, y0, x1, y1)`` in pixels, end-exclusive) as an ``(H, W)``
    bool mask: rows y0 ≤ y < y1, columns x0 ≤ x < x1. Fractional coordinates are widened outwards
    (floor of the start, ceil of the end); boxes are clipped to the image. The one box rasteriser of
    the project: every box-to-mask conversion goes through it."""
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive; got {height}, {width}")
    out = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in _boxes(boxes, "boxes").reshape(-1, 4):
        r0, r1 = max(math.floor(y0), 0), min(math.ceil(y1), height)
        c0, c1 = max(math.floor(x0), 0), min(math.ceil(x1), width)
        if r1 > r0 and c1 > c0:
            out[r0:r1, c0:c1] = True
    return out


def boxes_to_mask(boxes, height: int, width: int) -> np.ndarray:
    """Union masks ``(B, H, W)`` (bool) of each image's boxes (:func:`rasterise_boxes`).

    ``boxes`` as for the ground truth of :func:`localisation_error`: ``(B, 4)``, ``(B, N, 4)`` or a
    length-B list of ``(n_i, 4)``.
    """
    if isinstance(boxes, (list, tuple)):
        items = [_boxes(item, "boxes").reshape(-1, 4) for item in boxes]
    else:
        b = _boxes(boxes, "boxes")
        items = [row[None] for row in b] if b.ndim == 2 else list(b)
    return np.stack([rasterise_boxes(item, height, width) for item in items]) if items else \
        np.zeros((0, int(height), int(width)), dtype=bool)


def box_iou(a, b) -> np.ndarray:
    """IoU of boxes ``[x0, y0, x1, y1)``, broadcast over leading dimensions (``(..., 4)`` -> ``(...)``).

    For a pairwise matrix pass ``a[:, None]`` and ``b[None]``. Boxes are not clipped: this is the
    Phang et al. rule (card Q5) — for a predicted box inside the image, intersecting with the GT box
    clipped to the image is the same as intersecting with the unclipped box, while area(G) uses the
    unclipped box. Two empty boxes have IoU 0.
    """
    a = _boxes(a, "a")
    b = _boxes(b, "b")
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError as error:
        raise ValueError(f"box shapes {a.shape} and {b.shape} do not broadcast") from error
    width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = width * height
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def saliency_box(
    masks_or_maps, threshold: float | str = "mean", connectivity: int = 4, reproduce_offbyone: bool = False
) -> np.ndarray:
    """Phang et al. 2020 box protocol: binarise -> largest connected component -> tight box.

    1. Binarise: pixel ``> mean`` of its own map (``threshold="mean"``), or ``> threshold``.
    2. Keep the largest connected component by pixel count (``scipy.ndimage.label``; 4-connectivity
       by default, as assumed by the card; 8 is available). Equal sizes: the component met first in
       raster order.
    3. Return its tight box ``[x0, y0, x1, y1)`` (exclusive ends). An empty binarisation (e.g. a
       constant map) gives ``(0, 0, 0, 0)``.

    ``reproduce_offbyone=True`` mimics the authors' code, which used the inclusive last index as
    the exclusive end, so boxes are 1 px short (card Q4). Returns int64 ``(B, 4)``.
    """
    a, _ = _maps(masks_or_maps, "masks_or_maps")
    _check_option(connectivity, (4, 8), "connectivity")
    if isinstance(threshold, str):
        _check_option(threshold, ("mean",), "threshold")
        cut = a.reshape(a.shape[0], -1).mean(axis=1)
    else:
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be 'mean' or a finite number; got {threshold!r}")
        cut = np.full(a.shape[0], float(threshold))
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    end = 0 if reproduce_offbyone else 1
    out = np.zeros((a.shape[0], 4), dtype=np.int64)
    for i in range(a.shape[0]):
        labels, count = ndimage.label(a[i] > cut[i], structure=structure)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))
        out[i] = (xs.min(), ys.min(), xs.max() + end, ys.max() + end)
    return out


def _best_iou(pred_boxes, gt_boxes) -> np.ndarray:
    pred = _boxes(pred_boxes, "pred_boxes")
    if pred.ndim != 2:
        raise ValueError(f"pred_boxes must have shape (B, 4); got {tuple(pred.shape)}")
    gts = _box_list(gt_boxes, pred.shape[0])
    return np.array([box_iou(p[None], g).max() for p, g in zip(pred, gts)])


def _check_iou_threshold(iou_threshold: float) -> None:
    if not np.isfinite(iou_threshold) or not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1); got {iou_threshold!r}")


def _labels(labels, batch: int, name: str) -> np.ndarray:
    lab = _to_numpy(labels, name)
    if lab.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},); got {tuple(lab.shape)}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices; got dtype {lab.dtype}")
    return lab


def localisation_error(
    pred_boxes, gt_boxes, predicted_labels=None, true_labels=None, iou_threshold: float = 0.5
) -> np.ndarray:
    """Phang et al. 2020 "GT-known" localisation error per image: 1 − max_j 1[IoU(box, G_j) > 0.5].

    The comparison is strict (``>``), as in the authors' code, so a best IoU of exactly 0.5 is an
    error. ``gt_boxes`` are the boxes of the image's label class: ``(B, 4)``, ``(B, N, 4)`` or a
    length-B list of ``(n_i, 4)``. LE is class-agnostic ("GT-known"); the optional label arguments
    are only validated, for a signature symmetric with :func:`official_metric`, which uses them.
    Returns floats in {0, 1}; LE is their mean.
    """
    _check_iou_threshold(iou_threshold)
    best = _best_iou(pred_boxes, gt_boxes)
    if predicted_labels is not None:
        _labels(predicted_labels, best.shape[0], "predicted_labels")
    if true_labels is not None:
        _labels(true_labels, best.shape[0], "true_labels")
    return 1.0 - (best > iou_threshold).astype(np.float64)


def official_metric(pred_boxes, gt_boxes, predicted_labels, true_labels, iou_threshold: float = 0.5) -> np.ndarray:
    """Official ILSVRC top-1 localisation error (Phang et al. 2020 "OM") per image.

    OM_i = 1 − max_j 1[IoU(box, G_j) > 0.5] · 1[top-1 prediction == label]. Always ≥ LE_i, with
    equality when the classifier is right (card §7 invariant 11). Returns floats in {0, 1}.
    """
    _check_iou_threshold(iou_threshold)
    best = _best_iou(pred_boxes, gt_boxes)
    correct = _labels(predicted_labels, best.shape[0], "predicted_labels") == _labels(
        true_labels, best.shape[0], "true_labels"
    )
    return 1.0 - ((best > iou_threshold) & correct).astype(np.float64)


def f1_mask(masks, gt_masks_or_boxes, reduce: str = "max", eps: float = 1e-6) -> np.ndarray:
    """Phang et al. 2020 F1 of the *continuous* mask m ∈ [0, 1] against a ground-truth region g.

    P = Σ(m·g) / (Σm + eps), R = Σ(m·g) / Σg, F1 = 2PR / (P + R + eps), per GT box; ``reduce="max"``
    over the image's boxes is the paper's "F1", ``"mean"`` its "F1a". ``gt_masks_or_boxes`` is
    either binary masks of the maps' shape (one region per image) or boxes (``(B, 4)``,
    ``(B, N, 4)`` or a list of ``(n_i, 4)``), rasterised and clipped to the image. A GT region with
    no pixel in the image raises ``ValueError``.
    """
    m, _ = _maps(masks, "masks")
    _check_option(reduce, ("max", "mean"), "reduce")
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}")
    if m.min() < 0 or m.max() > 1:
        raise ValueError("masks must lie in [0, 1] (a continuous saliency mask)")
    batch, height, width = m.shape
    gt = gt_masks_or_boxes
    shape = tuple(_to_numpy(gt, "gt_masks_or_boxes").shape) if not isinstance(gt, (list, tuple)) else None
    if shape is not None and shape in ((batch, height, width), (batch, 1, height, width)):
        regions = [g[None] for g in _masks(gt, m.shape, name="gt_masks_or_boxes")]
    else:
        boxes = _box_list(gt, batch, "gt_masks_or_boxes")
        regions = [boxes_to_mask([b[None] for b in item], height, width) for item in boxes]
    scores = np.empty(batch)
    for i, region in enumerate(regions):
        g = region.reshape(region.shape[0], -1).astype(np.float64)
        area = g.sum(axis=1)
        if (area == 0).any():
            raise ValueError(f"gt_masks_or_boxes: image {i} has a ground-truth region with no pixel inside the image")
        mi = m[i].ravel()
        overlap = g @ mi
        precision = overlap / (mi.sum() + eps)
        recall = overlap / area
        f1 = 2 * precision * recall / (precision + recall + eps)
        scores[i] = f1.max() if reduce == "max" else f1.mean()
    return scores


def box_area_fraction(boxes, height: int, width: int) -> np.ndarray:
    """Area of each box ``(B, 4)`` as a fraction of the ``height × width`` image (Phang's a)."""
    if int(height) <= 0 or int(width) <= 0:
        raise ValueError(f"height and width must be positive; got {height}, {width}")
    b = _boxes(boxes, "boxes")
    if b.ndim != 2:
        raise ValueError(f"boxes must have shape (B, 4); got {tuple(b.shape)}")
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (float(height) * float(width))


def saliency_metric(area, prob, area_floor: float = 0.05, return_parts: bool = False):
    """Saliency metric SM of Dabkowski & Gal 2017, as Phang et al. 2020 compute it, per image.

    SM = log(max(a, 0.05)) − log p, where a is the predicted box's area fraction of the image and
    p the probability of the true class on the crop (classified by the *original* classifier,
    card Q8). Lower is better. With ``return_parts=True`` returns ``{"sm", "sm1", "sm2"}`` where
    SM1 = log(max(a, 0.05)), SM2 = log p and SM = SM1 − SM2. p must lie in (0, 1] (log 0 raises).
    """
    a = _check_numeric(np.atleast_1d(_to_numpy(area, "area")), "area")
    p = _check_numeric(np.atleast_1d(_to_numpy(prob, "prob")), "prob")
    if a.shape != p.shape or a.ndim != 1:
        raise ValueError(f"area and prob must be 1-D arrays of equal length; got {a.shape} and {p.shape}")
    _check_finite(a, "area")
    _check_finite(p, "prob")
    if (a < 0).any() or (a > 1).any():
        raise ValueError("area must be a fraction of the image in [0, 1]")
    if (p <= 0).any() or (p > 1).any():
        raise ValueError("prob must lie in (0, 1]; log(0) is undefined")
    if not 0 < area_floor <= 1:
        raise ValueError(f"area_floor must lie in (0, 1]; got {area_floor!r}")
    sm1 = np.log(np.maximum(a, area_floor))
    sm2 = np.log(p)
    if return_parts:
        return {"sm": sm1 - sm2, "sm1": sm1, "sm2": sm2}
    return sm1 - sm2
