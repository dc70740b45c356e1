"""Datasets with ground truth (masks, boxes, groups), torch loaders, and a disk cache.

* `make_shapes`: ONE procedural generator of RGB shapes on textured clutter. The cards' synthetic
  sets are named configurations of it (`SHAPES_CONFIGS`): SynthCIFAR (Tomsett D2),
  SynthObjects-64 (Vandersmissen), SynthParts-64 (Phang), SynthVOC-64 and SynthBirds-100 (Rao).
* `make_crosses` / `crosses_splits`: Viviano's "synth_hard" crosses, exactly as the card says.
* `load_digits_split` (Tomsett D1) and `load_cifar10` (real data on disk).
* `ArrayDataset`, `collate`, `make_loader`: torch access; items are dicts
  `image`, `label`, `mask`, `boxes`, `group`, `index`.
* `cached` / `shapes`: generated arrays stored on disk under a hash of their parameters.

Every array dict has `images` float32 (N,C,H,W) in [0,1], `labels` int64 (N,) (or float32
multi-hot (N,K)), `masks` bool (N,1,H,W), `boxes` a list of int64 (n_obj,5) arrays with rows
[cls, x0, y0, x1, y1] (pixels, end-exclusive) and `group` int64 (N,). Every random draw comes
from a `numpy.random.Generator` seeded by the `seed` argument: same arguments, same arrays.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
import pickle
import re
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import study.config
from study import cache

# Bump when a generator changes its output, so that cached arrays of the old code are not reused.
GENERATOR_VERSION = 1

SHAPE_NAMES = ("disc", "square", "triangle", "cross", "ring", "diamond", "frame")
TEXTURES = ("solid", "stripes")
OBJECT_KINDS = ("shape", "parts", "bird")
BACKGROUNDS = ("grid", "land_water")
SPURIOUS_CUES = ("none", "corner_patch", "box_marker", "background")
# Box-marker colours, by position of the class in `cue_classes` (the VOC card: red, then blue).
MARKER_COLOURS = ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0))
LAND_COLOUR = (0.35, 0.45, 0.20)
WATER_COLOUR = (0.10, 0.30, 0.70)
WATER_WAVE_PERIOD = 6.0


# ----------------------------------------------------------------------------- validation helpers

def _check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _check_range(name: str, value, integer: bool, low: float = 0.0, high: float = math.inf) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}")
    if integer:
        pair = (_check_int(f"{name}[0]", value[0]), _check_int(f"{name}[1]", value[1]))
    else:
        pair = (float(value[0]), float(value[1]))
    if not (low <= pair[0] <= pair[1] <= high):
        raise ValueError(f"{name} must satisfy {low} <= low <= high <= {high}, got {tuple(value)}")
    return pair


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")
    return value


def _round_half_up(x: float) -> int:
    """The integer count used for every exact fraction in this module: floor(x + 0.5)."""
    return int(math.floor(x + 0.5 + 1e-9))


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator, weights=None) -> np.ndarray:
    """A random permutation of labels whose class counts are exact.

    Without weights the counts differ by at most one (the first n mod K classes get the extra
    image). With weights the counts are the largest-remainder rounding of n·w/sum(w).
    """
    if weights is None:
        counts = np.full(num_classes, n // num_classes)
        counts[: n % num_classes] += 1
    else:
        share = n * np.asarray(weights, float) / float(np.sum(weights))
        counts = np.floor(share).astype(int)
        order = np.argsort(-(share - counts), kind="stable")
        counts[order[: n - counts.sum()]] += 1
    return rng.permutation(np.repeat(np.arange(num_classes), counts)).astype(np.int64)


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """[x0, y0, x1, y1) of the True pixels of a 2-D mask (end-exclusive)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("cannot box an empty mask")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@lru_cache(maxsize=32)
def _bilinear_matrix(size_out: int, size_in: int) -> np.ndarray:
    """(size_out, size_in) matrix of bilinear upsampling with half-pixel centres, clamped edges
    (the same as torch's interpolate(mode="bilinear", align_corners=False))."""
    source = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    weight = source - low
    matrix = np.zeros((size_out, size_in), np.float32)
    np.add.at(matrix, (np.arange(size_out), low), 1 - weight)
    np.add.at(matrix, (np.arange(size_out), high), weight)
    matrix.setflags(write=False)
    return matrix


def _upsample(grids: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly upsample (..., G, G) grids to (..., size, size)."""
    matrix = _bilinear_matrix(size, grids.shape[-1])
    return matrix @ grids.astype(np.float32) @ matrix.T


# ----------------------------------------------------------------------------- shapes: configuration

@dataclass(frozen=True)
class ShapesConfig:
    """Every knob of `make_shapes`. Lengths are pixels at `reference_size`.

    When `image_size` differs from `reference_size`, every length (object sizes, part geometry,
    segment length and width, distractor size, bird axes and bar, cue size) is scaled by
    image_size / reference_size and rounded (at least 1 px); texture periods (stripes, gratings,
    water waves) and grid counts are not scaled. Override `reference_size` as well to keep the
    pixel sizes as given.

    Drawing order: background → clutter (segments, distractors) → objects (later ones on top;
    occluded pixels leave earlier masks) → spurious cue (on top; its pixels leave every mask)
    → Gaussian noise on every pixel → clip to [0,1].

    Classes (object_kind "shape"): class c is shape `shapes[c % S]` with texture
    `textures[c // S]`; "stripes" multiplies the colour by 0.5 on alternate 2-px rows.
    A shape of half-size s spans 2s+1 px; its box is exactly [cx-s, cx+s+1).
    Class (object_kind "parts"): `n_parts` discs on a regular polygon, each filled with the class
    grating t = 0.5 + 0.5·sin(2π(x cos θ_c + y sin θ_c)/λ_c + φ), with h = ceil(K/2),
    θ_c = (c mod h)·180°/h, λ_c = grating_periods[0] if c < h else grating_periods[1], φ per object.
    Class (object_kind "bird", K = 2): a grey ellipse with a darker bar at its centre, horizontal
    for class 0 ("landbird") and vertical for class 1 ("waterbird").

    Spurious cue (`spurious_correlation` = q, exact counts with floor(x + 0.5) rounding):
      * "corner_patch": exactly round(q·N) images (a seeded random subset) carry a cue_size²
        patch in the top-left corner whose colour is the hue c/K of the image's OWN class;
        the others carry no cue. group = 1 if the image carries the cue, else 0.
      * "box_marker": of all objects whose class is in `cue_classes`, exactly round(q·M) carry a
        cue_size² marker in a class colour (MARKER_COLOURS) just outside one random side of their
        box (a side where it fits). group = 1 if the image carries any marker, else 0.
      * "background" (birds): within every class c, exactly round(q·N_c) images get the background
        that matches the class (0 land, 1 water), the others the other one.
        group = 2·label + background (0 land/land, 1 landbird/water, 2 waterbird/land, 3 water/water).
      * "none": group 0.
    """

    image_size: int = 64
    reference_size: int = 64
    num_classes: int = 6
    object_kind: str = "shape"
    shapes: tuple[str, ...] = ("disc", "square", "triangle", "cross", "ring", "diamond")
    textures: tuple[str, ...] = ("solid", "stripes")
    half_size: tuple[int, int] = (8, 14)
    cross_arm: float = 0.5  # cross arm width ceil(cross_arm·s), rounded up to an odd pixel count
    object_colour: tuple[float, float] = (0.4, 1.0)
    n_objects: tuple[int, int] = (1, 1)  # objects per image, uniform on {low..high}
    multi_label: bool = False  # False: every object of an image has the image's class
    allow_overlap: bool = True  # False: object boxes never intersect (placement is resampled)
    min_visible: float = 0.25  # overlapping placements are resampled until each object keeps this fraction
    class_weights: tuple[float, ...] | None = None  # single-label class proportions (None: balanced)
    # object_kind "parts"
    n_parts: int = 3
    part_radius: tuple[int, int] = (4, 7)
    part_circumradius: tuple[int, int] = (6, 14)
    grating_periods: tuple[float, float] = (4.0, 6.0)
    # object_kind "bird"
    bird_semi_axis: tuple[int, int] = (8, 12)  # a; b = round(0.6·a)
    bird_body: tuple[float, float] = (0.6, 0.9)
    bird_bar: tuple[int, int] = (2, 6)  # (thickness, length)
    bird_bar_contrast: float = 0.3
    # background and clutter
    background: str = "grid"
    background_grid: int = 8
    background_range: tuple[float, float] = (0.0, 0.6)  # "land_water": the land's multiplicative noise range
    n_segments: int = 3
    segment_length: tuple[int, int] = (6, 12)
    segment_width: int = 2
    n_distractors: int = 0  # solid discs or squares
    distractor_size: tuple[int, int] = (3, 6)
    clutter_colour: tuple[float, float] = (0.4, 1.0)
    noise_std: float = 0.05
    # spurious cue
    spurious_cue: str = "corner_patch"
    spurious_correlation: float = 0.0
    cue_size: int = 4
    cue_classes: tuple[int, ...] = (0, 1)  # "box_marker" only
    # multi_label only: (anchor, companion, rate), the companion class is present in exactly
    # round(rate·m) of the m images that contain the anchor class, and in no other anchor image
    cooccur: tuple[int, int, float] | None = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        _check_int("image_size", self.image_size, minimum=28)
        _check_int("reference_size", self.reference_size, minimum=1)
        _check_choice("object_kind", self.object_kind, OBJECT_KINDS)
        _check_choice("background", self.background, BACKGROUNDS)
        _check_choice("spurious_cue", self.spurious_cue, SPURIOUS_CUES)
        if isinstance(self.shapes, str) or not self.shapes:
            raise ValueError(f"shapes must be a non-empty sequence of {list(SHAPE_NAMES)}, got {self.shapes!r}")
        if isinstance(self.textures, str) or not self.textures:
            raise ValueError(f"textures must be a non-empty sequence of {list(TEXTURES)}, got {self.textures!r}")
        set_("shapes", tuple(_check_choice("shape", s, SHAPE_NAMES) for s in self.shapes))
        set_("textures", tuple(_check_choice("texture", t, TEXTURES) for t in self.textures))
        k = _check_int("num_classes", self.num_classes, minimum=2)
        if self.object_kind == "shape" and k > len(self.shapes) * len(self.textures):
            raise ValueError(f"num_classes={k} needs more than len(shapes)·len(textures)="
                             f"{len(self.shapes) * len(self.textures)} distinct shape/texture pairs")
        if self.object_kind == "bird" and k != 2:
            raise ValueError(f"object_kind 'bird' has exactly 2 classes (landbird, waterbird), got num_classes={k}")
        for name in ("half_size", "part_radius", "part_circumradius", "bird_semi_axis", "bird_bar",
                     "segment_length", "distractor_size"):
            set_(name, _check_range(name, getattr(self, name), integer=True, low=1))
        set_("n_objects", _check_range("n_objects", self.n_objects, integer=True, low=1))
        for name in ("object_colour", "bird_body", "clutter_colour"):
            set_(name, _check_range(name, getattr(self, name), integer=False, low=0.0, high=1.0))
        set_("background_range", _check_range("background_range", self.background_range, integer=False, low=0.0))
        periods = tuple(self.grating_periods) if isinstance(self.grating_periods, (tuple, list)) else ()
        if len(periods) != 2 or not all(isinstance(p, (int, float)) and 0 < p < math.inf for p in periods):
            raise ValueError(f"grating_periods must be two positive numbers of pixels, got {self.grating_periods!r}")
        set_("grating_periods", tuple(float(p) for p in periods))
        for name in ("n_parts", "background_grid", "segment_width", "cue_size"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("n_segments", "n_distractors"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("cross_arm", "noise_std", "bird_bar_contrast"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        _check_fraction("min_visible", self.min_visible)
        _check_fraction("spurious_correlation", self.spurious_correlation)
        for name in ("multi_label", "allow_overlap"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.class_weights is not None:
            weights = tuple(float(w) for w in self.class_weights)
            if len(weights) != k or min(weights) < 0 or sum(weights) <= 0 or self.multi_label:
                raise ValueError(f"class_weights must be None or {k} non-negative numbers with a positive sum "
                                 f"(single-label only), got {self.class_weights!r}")
            set_("class_weights", weights)
        set_("cue_classes", tuple(_check_int("cue_classes[i]", c, 0, k - 1) for c in self.cue_classes))
        if len(self.cue_classes) > len(MARKER_COLOURS):
            raise ValueError(f"at most {len(MARKER_COLOURS)} cue_classes, got {len(self.cue_classes)}")
        if self.cooccur is not None:
            if not self.multi_label or self.n_objects[1] < 2 or len(self.cooccur) != 3:
                raise ValueError("cooccur=(anchor, companion, rate) needs multi_label and n_objects up to >= 2, "
                                 f"got cooccur={self.cooccur!r}")
            anchor, companion = (_check_int(f"cooccur[{i}]", c, 0, k - 1) for i, c in enumerate(self.cooccur[:2]))
            if anchor == companion or k < 3:
                raise ValueError(f"cooccur needs two different classes out of >= 3, got {self.cooccur!r}")
            set_("cooccur", (anchor, companion, _check_fraction("cooccur[2]", self.cooccur[2])))
        if self.spurious_cue == "corner_patch" and self.multi_label:
            raise ValueError("spurious_cue 'corner_patch' encodes one label; use 'box_marker' with multi_label")
        if self.spurious_cue == "background" and (self.object_kind != "bird" or self.multi_label):
            raise ValueError("spurious_cue 'background' needs object_kind 'bird' (single-label)")
        if self.object_kind == "bird" and self.background != "land_water":
            raise ValueError("object_kind 'bird' needs background 'land_water'")
        extent = self.max_object_extent()
        if extent > self.image_size:
            raise ValueError(f"objects span up to {extent} px, more than image_size={self.image_size}; "
                             "lower the object size knobs or raise image_size")

    # lengths at this image size
    def px(self, length: float) -> int:
        return max(1, int(round(length * self.image_size / self.reference_size)))

    def px_range(self, pair: tuple[int, int]) -> tuple[int, int]:
        return self.px(pair[0]), self.px(pair[1])

    def max_object_extent(self) -> int:
        if self.object_kind == "shape":
            return 2 * self.px(self.half_size[1]) + 1
        if self.object_kind == "parts":
            return 2 * (self.px(self.part_circumradius[1]) + self.px(self.part_radius[1])) + 1
        return 2 * self.px(self.bird_semi_axis[1]) + 1


SHAPES_CONFIGS: dict[str, ShapesConfig] = {
    # Tomsett §5.1 D2 "SynthCIFAR": 10 classes = 5 shapes × {solid, stripes}, s ~ U{6..10},
    # colour U(0.5,1), 4×4 U(0,0.5) background grid, noise 0.05. Card sizes 5,000 train / 1,000 test.
    # Deviation: none (no clutter and no cue, as in the card; the cue knob stays available).
    "synth_cifar": ShapesConfig(
        image_size=32, reference_size=32, num_classes=10,
        shapes=("disc", "square", "triangle", "cross", "ring"), half_size=(6, 10), cross_arm=1 / 3,
        object_colour=(0.5, 1.0), background_grid=4, background_range=(0.0, 0.5), n_segments=0,
        noise_std=0.05,
    ),
    # Vandersmissen §5.1 "SynthObjects-64": K = 6 (4..10; c >= 6 striped), s ~ U{8..14}, cross arm
    # ceil(s/2), 8×8 U(0,0.6) grid, 3 segments 2 px wide of length U{6..12}, colours U(0.4,1),
    # noise 0.05, optional top-left 4×4 cue of hue c/K (`spurious_correlation` = the card's
    # `spurious_frac`; SPLIT_RECIPES keeps the cue out of valid/test). Sizes 3,000/500/500.
    "synth_objects_64": ShapesConfig(),
    # Phang §5.1 "SynthParts-64": K = 10, three grating-textured discs (radius U{4..7}) on an
    # equilateral triangle of circumradius U{6..14}, colour U(0.5,1), 8×8 U(0,0.5) grid,
    # 4 solid disc/square distractors (U{3..6}, colour U(0.5,1)), noise 0.03.
    # Option n_instances = 2: override n_objects=(2, 2), allow_overlap=False.
    "synth_parts_64": ShapesConfig(
        num_classes=10, object_kind="parts", object_colour=(0.5, 1.0), background_range=(0.0, 0.5),
        n_segments=0, n_distractors=4, clutter_colour=(0.5, 1.0), noise_std=0.03, spurious_cue="none",
    ),
    # Rao §5.1 "SynthVOC-64": K = 6 shapes none of which fills its box, 1-3 objects with classes
    # uniform over K, colour U(0.5,1), 8×8 U(0,0.4) grid, noise 0.03, red/blue 4×4 markers next
    # to boxes of classes 0/1 with q = 0.85; multi-hot labels. Deviations: the box side is
    # 2s+1 with s ~ U{6..14} (odd sides 13..29 instead of U{12..28}); cross arm width
    # ceil(2s/3) ≈ a third of the side; frame width max(2, (2s+1)//4); the noise is added to the
    # whole image, not the background only; placements that would hide more than 75% of an
    # earlier object are redrawn. Option cooccur: override cooccur=(3, 2, 0.8).
    "synth_voc_64": ShapesConfig(
        shapes=("disc", "triangle", "ring", "cross", "frame", "diamond"), textures=("solid",),
        half_size=(6, 14), cross_arm=2 / 3, object_colour=(0.5, 1.0), n_objects=(1, 3), multi_label=True,
        background_range=(0.0, 0.4), n_segments=0, noise_std=0.03,
        spurious_cue="box_marker", spurious_correlation=0.85, cue_classes=(0, 1),
    ),
    # Rao §5.2 "SynthBirds-100": grey ellipse (a ~ U{8..12}, b = round(0.6a), body U(0.6,0.9)),
    # 2×6 bar darker by 0.3, horizontal = landbird (0), vertical = waterbird (1); land = colour ×
    # 4×4 U(0.7,1.3) grid, water = colour × horizontal waves of period 6 px. Training statistics:
    # 77% landbirds, background always matches (q = 1); SPLIT_RECIPES gives the balanced test set
    # (q = 0.5, 25% per group). No noise and no clutter, as in the card.
    "synth_birds_100": ShapesConfig(
        num_classes=2, object_kind="bird", background="land_water", background_grid=4,
        background_range=(0.7, 1.3), n_segments=0, noise_std=0.0, class_weights=(0.77, 0.23),
        spurious_cue="background", spurious_correlation=1.0,
    ),
}

# Per-split overrides of the cards (applied by `shapes_splits` when the config is given by name).
SPLIT_RECIPES: dict[str, dict[str, dict]] = {
    "synth_objects_64": {"valid": {"spurious_correlation": 0.0}, "test": {"spurious_correlation": 0.0}},
    "synth_birds_100": {"test": {"spurious_correlation": 0.5, "class_weights": None},
                        "select": {"spurious_correlation": 0.5, "class_weights": None}},
}


def shapes_config(config: str | ShapesConfig = "synth_objects_64", **overrides) -> ShapesConfig:
    """The named (or given) configuration with `overrides` replacing its fields."""
    if isinstance(config, str):
        if config not in SHAPES_CONFIGS:
            raise ValueError(f"unknown shapes config {config!r}; choose one of {sorted(SHAPES_CONFIGS)}")
        config = SHAPES_CONFIGS[config]
    elif not isinstance(config, ShapesConfig):
        raise ValueError(f"config must be a name in {sorted(SHAPES_CONFIGS)} or a ShapesConfig, got {config!r}")
    known = {f.name for f in dataclasses.fields(ShapesConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown shapes override(s) {unknown}; known fields: {sorted(known)}")
    return dataclasses.replace(config, **overrides) if overrides else config


# ----------------------------------------------------------------------------- shapes: drawing

def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, s: int, arm: int) -> np.ndarray:
    """Mask of a shape of half-size s; dx (1,W) and dy (H,1) are offsets from its centre."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "disc":
        return dx * dx + dy * dy <= s * s
    if shape == "square":
        return (ax <= s) & (ay <= s)
    if shape == "triangle":  # apex up, base on the bottom row
        return (dy >= -s) & (dy <= s) & (2 * ax <= dy + s)
    if shape == "cross":
        return ((ax <= s) & (2 * ay <= arm)) | ((ay <= s) & (2 * ax <= arm))
    if shape == "ring":
        r2 = dx * dx + dy * dy
        return (r2 <= s * s) & (4 * r2 >= s * s)
    if shape == "diamond":
        return ax + ay <= s
    width = max(2, (2 * s + 1) // 4)  # frame
    return (ax <= s) & (ay <= s) & (np.maximum(ax, ay) > s - width)


def _segment_mask(rows, cols, x, y, angle, length, width) -> np.ndarray:
    """Pixels closer than width/2 to a segment centred at (x, y)."""
    rx, ry = cols - x, rows - y
    c, s = math.cos(angle), math.sin(angle)
    t = np.clip(rx * c + ry * s, -length / 2, length / 2)
    return (rx - t * c) ** 2 + (ry - t * s) ** 2 < (width / 2) ** 2


class _Canvas:
    """One image being drawn: its pixels and the visible masks of its objects."""

    def __init__(self, image: np.ndarray):
        self.image = image  # (3,H,W) float32 view into the batch
        size = image.shape[-1]
        self.rows = np.arange(size)[:, None]
        self.cols = np.arange(size)[None, :]
        self.visible: list[np.ndarray] = []

    def paint(self, mask: np.ndarray, colour: np.ndarray, is_object: bool = False, occlude: bool = True):
        colour = colour if colour.ndim == 3 else colour[:, None, None]
        np.copyto(self.image, colour, where=mask[None], casting="unsafe")
        if occlude:
            for visible in self.visible:
                visible &= ~mask
        if is_object:
            self.visible.append(mask.copy())


def _draw_clutter(canvas: _Canvas, cfg: ShapesConfig, rng: np.random.Generator):
    size = cfg.image_size
    for _ in range(cfg.n_segments):
        length = rng.integers(*cfg.px_range(cfg.segment_length), endpoint=True)
        x, y = rng.uniform(0, size, 2)
        mask = _segment_mask(canvas.rows, canvas.cols, x, y, rng.uniform(0, math.pi), length, cfg.px(cfg.segment_width))
        canvas.paint(mask, rng.uniform(*cfg.clutter_colour, 3), occlude=False)
    for _ in range(cfg.n_distractors):
        s = rng.integers(*cfg.px_range(cfg.distractor_size), endpoint=True)
        x, y = rng.integers(s, size - s, 2)
        shape = "disc" if rng.random() < 0.5 else "square"
        mask = _shape_mask(shape, canvas.cols - x, canvas.rows - y, s, 0)
        canvas.paint(mask, rng.uniform(*cfg.clutter_colour, 3), occlude=False)


def _object_mask_and_colour(canvas: _Canvas, cls: int, cfg: ShapesConfig, rng: np.random.Generator):
    """Draw the random geometry and colour of one object of class `cls`: (mask, colour field)."""
    size = cfg.image_size
    rows, cols = canvas.rows, canvas.cols
    if cfg.object_kind == "shape":
        s = int(rng.integers(*cfg.px_range(cfg.half_size), endpoint=True))
        x, y = rng.integers(s, size - s, 2)
        shape = cfg.shapes[cls % len(cfg.shapes)]
        mask = _shape_mask(shape, cols - x, rows - y, s, math.ceil(cfg.cross_arm * s))
        colour = rng.uniform(*cfg.object_colour, 3).astype(np.float32)[:, None, None]
        if cfg.textures[cls // len(cfg.shapes)] == "stripes":
            colour = colour * np.where((rows - (y - s)) // 2 % 2 == 1, 0.5, 1.0).astype(np.float32)[None]
        return mask, colour
    if cfg.object_kind == "parts":
        radii = rng.integers(*cfg.px_range(cfg.part_radius), size=cfg.n_parts, endpoint=True)
        circumradius = int(rng.integers(*cfg.px_range(cfg.part_circumradius), endpoint=True))
        reach = circumradius + int(radii.max())
        x, y = rng.integers(reach, size - reach, 2)
        angles = rng.uniform(0, 2 * math.pi) + 2 * math.pi * np.arange(cfg.n_parts) / cfg.n_parts
        mask = np.zeros((size, size), bool)
        for r, a in zip(radii, angles):
            mask |= (cols - x - circumradius * math.cos(a)) ** 2 + (rows - y - circumradius * math.sin(a)) ** 2 <= r * r
        half = math.ceil(cfg.num_classes / 2)
        theta = (cls % half) * math.pi / half
        period = cfg.grating_periods[0] if cls < half else cfg.grating_periods[1]
        phase = rng.uniform(0, 2 * math.pi)
        grating = 0.5 + 0.5 * np.sin(2 * math.pi * (cols * math.cos(theta) + rows * math.sin(theta)) / period + phase)
        colour = rng.uniform(*cfg.object_colour, 3)[:, None, None] * grating[None]
        return mask, colour.astype(np.float32)
    # bird: grey ellipse with a darker bar, horizontal (class 0) or vertical (class 1)
    a = int(rng.integers(*cfg.px_range(cfg.bird_semi_axis), endpoint=True))
    b = max(1, int(round(0.6 * a)))
    x, y = rng.integers(a, size - a, 2)
    dx, dy = cols - x, rows - y
    mask = (dx / a) ** 2 + (dy / b) ** 2 <= 1.0
    body = rng.uniform(*cfg.bird_body)
    thickness, length = cfg.px_range(cfg.bird_bar)
    bar_w, bar_h = (length, thickness) if cls == 0 else (thickness, length)
    bar = (dx >= -(bar_w // 2)) & (dx < bar_w - bar_w // 2) & (dy >= -(bar_h // 2)) & (dy < bar_h - bar_h // 2)
    value = np.where(bar, max(body - cfg.bird_bar_contrast, 0.0), body).astype(np.float32)
    return mask, np.broadcast_to(value, (3, size, size))


def _acceptable(mask: np.ndarray, box: tuple, placed: list, visible: list, cfg: ShapesConfig) -> bool:
    """Whether a new object may join the placed ones (disjoint boxes, or enough left visible)."""
    if not cfg.allow_overlap:
        return not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for _, _, b in placed)
    return all(np.count_nonzero(seen & ~mask) >= cfg.min_visible * np.count_nonzero(full)
               for seen, (full, _, _) in zip(visible, placed))


def _draw_objects(canvas: _Canvas, classes: np.ndarray, cfg: ShapesConfig, rng: np.random.Generator) -> list:
    """Place the objects (an object is redrawn while it breaks the overlap rule, and the whole set
    is redrawn when one cannot be placed), then paint them in order; return their boxes."""
    for _restart in range(50):
        placed, visible = [], []
        for cls in classes:
            for _attempt in range(50):
                mask, colour = _object_mask_and_colour(canvas, int(cls), cfg, rng)
                box = _tight_box(mask)
                if _acceptable(mask, box, placed, visible, cfg):
                    visible = [seen & ~mask for seen in visible] + [mask]
                    placed.append((mask, colour, box))
                    break
            else:
                break  # start the whole set again
        else:
            for mask, colour, _ in placed:
                canvas.paint(mask, colour, is_object=True)
            return [box for _, _, box in placed]
    raise ValueError(f"could not place {len(classes)} objects as required (allow_overlap={cfg.allow_overlap}, "
                     f"min_visible={cfg.min_visible}); lower n_objects or the object size")


def _draw_marker(canvas: _Canvas, box: tuple, colour, cfg: ShapesConfig, rng: np.random.Generator):
    """A cue_size² marker just outside one random side of `box` where it fits (clipped if none does)."""
    size, cue = cfg.image_size, cfg.px(cfg.cue_size)
    x0, y0, x1, y1 = box
    sides = {"top": y0 >= cue, "bottom": y1 + cue <= size, "left": x0 >= cue, "right": x1 + cue <= size}
    fitting = [side for side, fits in sides.items() if fits] or list(sides)
    side = fitting[rng.integers(len(fitting))]
    if side in ("top", "bottom"):
        left = int(rng.integers(x0, max(x0, x1 - cue) + 1))
        top = y0 - cue if side == "top" else y1
    else:
        top = int(rng.integers(y0, max(y0, y1 - cue) + 1))
        left = x0 - cue if side == "left" else x1
    mask = np.zeros((size, size), bool)
    mask[max(top, 0): max(top + cue, 0), max(left, 0): max(left + cue, 0)] = True
    canvas.paint(mask, np.asarray(colour, np.float32))


def _backgrounds(cfg: ShapesConfig, n: int, rng: np.random.Generator, water: np.ndarray | None) -> np.ndarray:
    size, grid = cfg.image_size, cfg.background_grid
    if cfg.background == "grid":
        return _upsample(rng.uniform(*cfg.background_range, size=(n, 3, grid, grid)), size)
    land_field = _upsample(rng.uniform(*cfg.background_range, size=(n, 1, grid, grid)), size)
    land = np.asarray(LAND_COLOUR, np.float32)[:, None, None] * land_field
    phase = rng.uniform(0, 2 * math.pi, size=(n, 1, 1, 1))
    waves = 0.75 + 0.25 * np.sin(2 * math.pi * np.arange(size)[:, None] / WATER_WAVE_PERIOD + phase)
    water_image = np.asarray(WATER_COLOUR, np.float32)[:, None, None] * waves.astype(np.float32)
    return np.where(water[:, None, None, None], np.broadcast_to(water_image, land.shape), land).astype(np.float32)


def _exact_subset(count: int, total: int, rng: np.random.Generator) -> np.ndarray:
    chosen = np.zeros(total, bool)
    chosen[rng.permutation(total)[:count]] = True
    return chosen


def _impose_cooccurrence(classes: list, cfg: ShapesConfig, rng: np.random.Generator) -> list:
    """Edit the per-image object classes so that the companion class is present in exactly
    round(rate·m) of the m anchor images (see ShapesConfig.cooccur). A chosen image without the
    companion gets it by relabelling one non-anchor object, else by adding an object (when the
    count allows), else by relabelling one of several anchors; in the other anchor images every
    companion object is relabelled to a class uniform over the rest. Anchor membership never changes."""
    anchor, companion, rate = cfg.cooccur
    others = np.setdiff1d(np.arange(cfg.num_classes), [anchor, companion])
    holders = [i for i, cls in enumerate(classes) if anchor in cls]
    chosen = _exact_subset(_round_half_up(rate * len(holders)), len(holders), rng)
    classes = [cls.copy() for cls in classes]
    for i, wanted in zip(holders, chosen):
        cls = classes[i]
        if not wanted:
            hit = cls == companion
            cls[hit] = rng.choice(others, size=int(hit.sum()))
        elif companion not in cls:
            free = np.flatnonzero(cls != anchor)
            if free.size:
                cls[rng.choice(free)] = companion
            elif cls.size < cfg.n_objects[1]:
                classes[i] = np.append(cls, companion)
            else:  # all objects are anchors (at least two, as n_objects[1] >= 2)
                cls[rng.integers(cls.size)] = companion
    return classes


def _plan_cues(cfg: ShapesConfig, labels: np.ndarray, classes: list, rng: np.random.Generator):
    """Exact cue assignment (see ShapesConfig): (group, per-object marker flags, water backgrounds)."""
    n, q = len(labels), cfg.spurious_correlation
    group, markers, water = np.zeros(n, np.int64), None, None
    if cfg.spurious_cue == "corner_patch":
        group = _exact_subset(_round_half_up(q * n), n, rng).astype(np.int64)
    elif cfg.spurious_cue == "box_marker":
        eligible = [np.isin(cls, cfg.cue_classes) for cls in classes]
        total = int(sum(e.sum() for e in eligible))
        flags = _exact_subset(_round_half_up(q * total), total, rng)
        markers, start = [], 0
        for elig in eligible:  # hand the flags out to the eligible objects in order
            marked = np.zeros(len(elig), bool)
            marked[elig] = flags[start: start + elig.sum()]
            markers.append(marked)
            start += elig.sum()
        group = np.array([m.any() for m in markers], np.int64)
    elif cfg.spurious_cue == "background":
        water = np.zeros(n, bool)
        for c in (0, 1):
            members = np.flatnonzero(labels == c)
            matches = _exact_subset(_round_half_up(q * members.size), members.size, rng)
            water[members] = matches if c == 1 else ~matches
        group = 2 * labels + water
    return group, markers, water


def make_shapes(n: int, seed: int, config: str | ShapesConfig = "synth_objects_64", **overrides) -> dict:
    """Generate `n` images of a shapes configuration (see `ShapesConfig` and `SHAPES_CONFIGS`).

    Returns `images` float32 (N,3,H,W) in [0,1]; `labels` int64 (N,) or, with multi_label,
    float32 multi-hot (N,K); `masks` bool (N,1,H,W), the union of the visible object pixels;
    `object_masks` list of bool (n_obj,H,W), the visible pixels of each object (after occlusion
    by later objects and by the cue); `boxes` list of int64 (n_obj,5) rows [cls, x0, y0, x1, y1],
    the tight end-exclusive box of each object's FULL mask (before occlusion), so every visible
    pixel lies inside its box; `group` int64 (N,) as defined by the config's spurious cue.
    Single-label class counts are exact (balanced up to one image, or `class_weights`).
    """
    cfg = shapes_config(config, **overrides)
    n = _check_int("n", n, minimum=1)
    seed = _check_int("seed", seed, minimum=0)
    rng = np.random.default_rng(seed)
    k, size = cfg.num_classes, cfg.image_size

    counts = rng.integers(cfg.n_objects[0], cfg.n_objects[1], size=n, endpoint=True)
    if cfg.multi_label:
        classes = [rng.integers(0, k, size=c) for c in counts]
        if cfg.cooccur is not None:
            classes = _impose_cooccurrence(classes, cfg, rng)
        labels = np.zeros((n, k), np.float32)
        for i, cls in enumerate(classes):
            labels[i, cls] = 1.0
    else:
        labels = _balanced_labels(n, k, rng, cfg.class_weights)
        classes = [np.full(c, label) for c, label in zip(counts, labels)]

    group, markers, water = _plan_cues(cfg, labels, classes, rng)
    images = _backgrounds(cfg, n, rng, water)
    object_masks, boxes = [], []
    for i in range(n):
        canvas = _Canvas(images[i])
        _draw_clutter(canvas, cfg, rng)
        object_boxes = _draw_objects(canvas, classes[i], cfg, rng)
        if cfg.spurious_cue == "corner_patch" and group[i]:
            cue = np.zeros((size, size), bool)
            cue[: cfg.px(cfg.cue_size), : cfg.px(cfg.cue_size)] = True
            canvas.paint(cue, np.asarray(colorsys.hsv_to_rgb(labels[i] / k, 1.0, 1.0), np.float32))
        elif cfg.spurious_cue == "box_marker":
            for cls, box, marked in zip(classes[i], object_boxes, markers[i]):
                if marked:
                    _draw_marker(canvas, box, MARKER_COLOURS[cfg.cue_classes.index(cls)], cfg, rng)
        object_masks.append(np.stack(canvas.visible))
        boxes.append(np.array([(c, *b) for c, b in zip(classes[i], object_boxes)], np.int64).reshape(-1, 5))

    for chunk in np.array_split(images, max(1, n // 256)):  # chunks keep the temporary small
        if cfg.noise_std > 0:
            noise = rng.standard_normal(chunk.shape, dtype=np.float32)
            noise *= cfg.noise_std
            chunk += noise
        np.clip(chunk, 0.0, 1.0, out=chunk)
    masks = np.stack([m.any(axis=0) for m in object_masks])[:, None]
    return {"images": images, "labels": labels, "masks": masks, "object_masks": object_masks,
            "boxes": boxes, "group": group.astype(np.int64)}


def _split_seed(seed: int, split: str) -> int:
    """An independent seed per (seed, split name)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(split.encode())]).generate_state(1)[0])


def shapes_splits(seed: int, config: str | ShapesConfig = "synth_objects_64", sizes: dict[str, int] | None = None,
                  split_overrides: dict[str, dict] | None = None, use_cache: bool = False, cache_dir=None,
                  **overrides) -> dict[str, dict]:
    """Independent splits (e.g. train/valid/test) of one configuration, each with its own seed.

    `split_overrides[name]` are applied on top of `overrides` for that split; by default they are
    the card's `SPLIT_RECIPES[config]` (e.g. the balanced, decorrelated SynthBirds test set).
    """
    seed = _check_int("seed", seed, minimum=0)
    sizes = {"train": 1000, "valid": 200, "test": 200} if sizes is None else sizes
    if not isinstance(sizes, dict) or not sizes:
        raise ValueError(f"sizes must be a non-empty dict split name -> n, got {sizes!r}")
    if split_overrides is None:
        split_overrides = SPLIT_RECIPES.get(config, {}) if isinstance(config, str) else {}
    elif set(split_overrides) - set(sizes):
        raise ValueError(f"split_overrides names splits {sorted(set(split_overrides) - set(sizes))} "
                         f"that are not in sizes {sorted(sizes)}")
    generate = shapes if use_cache else make_shapes
    extra = {"cache_dir": cache_dir} if use_cache else {}
    return {
        split: generate(n, _split_seed(seed, split), config, **extra, **{**overrides, **split_overrides.get(split, {})})
        for split, n in sizes.items()
    }


# ----------------------------------------------------------------------------- Viviano's crosses

CROSS_IMAGE = 28
CROSS_DISTRACTOR_ROWS = (23, 25)  # rows 23-24
CROSS_DISTRACTOR_COLS = {0: (3, 6), 1: (22, 25)}  # columns 3-5 (class 0) and 22-24 (class 1)
CROSS_POOL_SEEDS = {"train": 1, "valid": 2, "test": 3}
CROSS_POOL_SIZE = 512


def _boxes_of(masks: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    return [np.array([[label, *_tight_box(mask[0])]], np.int64) for mask, label in zip(masks, labels)]


def _flip_crosses(arrays: dict, flip: np.ndarray) -> dict:
    """Flip the chosen images and masks horizontally; group = 1 for flipped images."""
    images, masks = arrays["images"].copy(), arrays["masks"].copy()
    images[flip] = images[flip][..., ::-1]
    masks[flip] = masks[flip][..., ::-1]
    return {**arrays, "images": images, "masks": masks, "boxes": _boxes_of(masks, arrays["labels"]),
            "group": flip.astype(np.int64)}


def make_crosses(n: int, seed: int, flip_prob: float = 0.0) -> dict:
    """Viviano et al.'s "synth_hard" (card §5.1): class 0 has one "+" cross, class 1 two.

    28×28 binary images, one channel. Arm half-length d ~ U{1,2} per image; centre rows and
    columns drawn without replacement from {d..27-d}. `masks` are the cross pixels (before the
    distractor); the distractor is a 2×3 block at rows 23-24, columns 3-5 (class 0) or 22-24
    (class 1). Exactly round(flip_prob·n) images (a seeded random subset) are flipped
    horizontally, image and mask; `group` = 1 for them. The unflipped content depends only on
    (n, seed), so the same seed with another flip_prob gives mirror images of the same crosses.
    `boxes` holds one row per image: the label and the tight box of the whole mask.
    """
    n = _check_int("n", n, minimum=1)
    seed = _check_int("seed", seed, minimum=0)
    flip_prob = _check_fraction("flip_prob", flip_prob)
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(n, 2, rng)
    masks = np.zeros((n, 1, CROSS_IMAGE, CROSS_IMAGE), bool)
    for mask, label in zip(masks[:, 0], labels):
        d = int(rng.integers(1, 3))
        centres = np.arange(d, CROSS_IMAGE - d)
        rows = rng.choice(centres, size=label + 1, replace=False)
        cols = rng.choice(centres, size=label + 1, replace=False)
        for r, c in zip(rows, cols):
            mask[r, c - d: c + d + 1] = True
            mask[r - d: r + d + 1, c] = True
    images = masks.astype(np.float32)
    for image, label in zip(images, labels):
        image[0, slice(*CROSS_DISTRACTOR_ROWS), slice(*CROSS_DISTRACTOR_COLS[int(label)])] = 1.0
    flip = _exact_subset(_round_half_up(flip_prob * n), n, rng)
    return _flip_crosses({"images": images, "labels": labels, "masks": masks}, flip)


def crosses_splits(run_seed: int, flip_prob_eval: float = 1.0, n_train: int = 500, n_valid: int = 128,
                   n_test: int = 128) -> dict[str, dict]:
    """The card's splits: pools of 512 images (256 per class) with seeds 1, 2, 3; per run seed a
    class-balanced draw without replacement from each pool; train unflipped, valid and test with
    exactly round(flip_prob_eval·n) images flipped. Each split also has `pool_index`.
    """
    run_seed = _check_int("run_seed", run_seed, minimum=0)
    flip_prob_eval = _check_fraction("flip_prob_eval", flip_prob_eval)
    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    splits = {}
    for number, (split, n) in enumerate(sizes.items()):
        n = _check_int(f"n_{split}", n, minimum=2, maximum=CROSS_POOL_SIZE)
        pool = make_crosses(CROSS_POOL_SIZE, CROSS_POOL_SEEDS[split])
        rng = np.random.default_rng([run_seed, number])
        per_class = [n // 2 + n % 2, n // 2]
        chosen = np.concatenate([rng.choice(np.flatnonzero(pool["labels"] == c), size=m, replace=False)
                                 for c, m in enumerate(per_class)])
        chosen = rng.permutation(chosen)
        subset = {"images": pool["images"][chosen], "labels": pool["labels"][chosen], "masks": pool["masks"][chosen],
                  "pool_index": chosen.astype(np.int64)}
        p = 0.0 if split == "train" else flip_prob_eval
        splits[split] = _flip_crosses(subset, _exact_subset(_round_half_up(p * n), n, rng))
    return splits


# ----------------------------------------------------------------------------- real data

def _full_image_truth(images: np.ndarray, labels: np.ndarray) -> dict:
    n, _, height, width = images.shape
    return {"images": images, "labels": labels.astype(np.int64), "masks": np.ones((n, 1, height, width), bool),
            "boxes": [np.array([[label, 0, 0, width, height]], np.int64) for label in labels],
            "group": np.zeros(n, np.int64)}


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (read once per process): images (1797,8,8) in 0..16 and targets."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images.copy(), digits.target.copy()
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets


def load_digits_split(seed: int = 0, upsample: int = 2, n_train: int = 1400) -> dict:
    """Tomsett §5.1 D1: scikit-learn digits /16, upsampled ×`upsample` with
    `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` (half-pixel centres;
    it keeps the mean at 0.305, the pilot's 0.30, where scipy's corner-aligned zoom gives 0.33),
    split by `numpy.random.default_rng(seed).permutation`: first `n_train` train, the rest test.

    Returns {"train": arrays, "test": arrays, "train_mean": float}; masks are all True, the box
    is the whole image, group 0.
    """
    seed = _check_int("seed", seed, minimum=0)
    upsample = _check_int("upsample", upsample, minimum=1)
    raw_images, targets = _digits()
    n_total = len(targets)
    n_train = _check_int("n_train", n_train, minimum=1, maximum=n_total - 1)
    images = torch.as_tensor(raw_images[:, None] / 16.0, dtype=torch.float32)
    if upsample > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=upsample, mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0).numpy()
    order = np.random.default_rng(seed).permutation(n_total)
    train, test = order[:n_train], order[n_train:]
    return {"train": _full_image_truth(images[train], targets[train]),
            "test": _full_image_truth(images[test], targets[test]),
            "train_mean": float(images[train].mean(dtype=np.float64))}


CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_SPLITS = ("train", "valid", "train_full", "test")


def load_cifar10(root=None, split: str = "test", n_valid: int = 5000, seed: int = 0, verify: bool = True) -> dict:
    """CIFAR-10 from the python pickles in `root/cifar-10-batches-py` (default root: the data dir).

    split: "train_full" (the 50,000 training images), "test" (10,000), or the Tomsett split of the
    training images into "train" and "valid" (`n_valid` images drawn with
    `default_rng(seed).permutation`; both kept in file order).

    The files are read here with `pickle` in the layout torchvision's `CIFAR10` reads (byte-string
    keys b"data" uint8 (n,3072) with R, G, B planes row-major, b"labels", and b"label_names" in
    batches.meta): torchvision's class always checks the files' md5 sums, so it cannot read
    anything but the original files. With `verify=True` the same md5 sums are checked (using
    torchvision's table); `verify=False` skips that (test fixtures). Pickle runs code from the
    file: only point this at the original CIFAR-10 files. Images are /255 float32 (N,3,32,32);
    `class_names` holds the label names.
    """
    _check_choice("split", split, CIFAR_SPLITS)
    folder = Path(study.config.DATA_DIR if root is None else root) / CIFAR_FOLDER
    if split == "test":
        files = ["test_batch"]
    else:
        files = [f"data_batch_{i}" for i in range(1, 6)]
    for name in [*files, "batches.meta"]:
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"CIFAR-10 file {folder / name} not found. Download cifar-10-python.tar.gz from "
                f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {folder.parent} so that "
                f"{folder} holds data_batch_1..5, test_batch and batches.meta")
    if verify:
        from study._torchvision_compat import import_torchvision

        tv = import_torchvision()
        cifar = tv.datasets.CIFAR10
        md5 = dict(cifar.train_list + cifar.test_list)
        md5["batches.meta"] = cifar.meta["md5"]
        for name in [*files, "batches.meta"]:
            if not tv.datasets.utils.check_integrity(str(folder / name), md5[name]):
                raise ValueError(f"{folder / name} does not have the md5 sum of the original CIFAR-10 file; "
                                 "re-extract it, or pass verify=False for a custom file in the same layout")
    data, labels = [], []
    for name in files:
        with open(folder / name, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data.append(np.asarray(batch[b"data"], np.uint8))
        labels.extend(batch[b"labels"])
    with open(folder / "batches.meta", "rb") as handle:
        names = [name.decode() for name in pickle.load(handle, encoding="bytes")[b"label_names"]]
    images = np.concatenate(data).reshape(-1, 3, 32, 32)
    labels = np.asarray(labels, np.int64)
    if split in ("train", "valid"):
        n_valid = _check_int("n_valid", n_valid, minimum=1, maximum=len(labels) - 1)
        order = np.random.default_rng(_check_int("seed", seed, minimum=0)).permutation(len(labels))
        keep = np.sort(order[:n_valid] if split == "valid" else order[n_valid:])
        images, labels = images[keep], labels[keep]
    arrays = _full_image_truth(images.astype(np.float32) / 255.0, labels)
    arrays["class_names"] = np.array(names)
    return arrays


# ----------------------------------------------------------------------------- torch access

class ArrayDataset(Dataset):
    """A torch Dataset over an array dict. Items are dicts: `image` float (C,H,W), `label` (int64
    scalar, or float (K,) multi-hot), `mask` bool (1,H,W), `boxes` int64 (n,5), `group` int64,
    `index` int64. Missing `masks`/`boxes`/`group` default to all-True / full image / 0.
    `transform(item) -> item` is applied to each item dict (so that geometric transforms can keep
    image, mask and boxes aligned).
    """

    def __init__(self, arrays: dict, transform: Callable[[dict], dict] | None = None):
        if not isinstance(arrays, dict) or "images" not in arrays or "labels" not in arrays:
            raise ValueError("arrays must be a dict with at least 'images' and 'labels'")
        images = torch.as_tensor(np.asarray(arrays["images"]))
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a float array (N,C,H,W), got {images.dtype} {tuple(images.shape)}")
        n, _, height, width = images.shape
        labels = torch.as_tensor(np.asarray(arrays["labels"]))
        masks = arrays.get("masks")
        masks = torch.ones((n, 1, height, width), dtype=torch.bool) if masks is None else torch.as_tensor(np.asarray(masks))
        boxes = arrays.get("boxes")
        if boxes is None:
            boxes = [np.array([[int(label) if labels.ndim == 1 else -1, 0, 0, width, height]]) for label in labels]
        group = arrays.get("group")
        group = torch.zeros(n, dtype=torch.int64) if group is None else torch.as_tensor(np.asarray(group))
        if masks.shape != (n, 1, height, width) or masks.dtype != torch.bool:
            raise ValueError(f"masks must be bool (N,1,H,W) = {(n, 1, height, width)}, got {masks.dtype} {tuple(masks.shape)}")
        for name, value in (("labels", labels), ("boxes", boxes), ("group", group)):
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries but images has {n}")
        self.images, self.labels, self.masks, self.group = images, labels, masks, group
        self.boxes = [torch.as_tensor(np.asarray(b, np.int64).reshape(-1, 5)) for b in boxes]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        item = {"image": self.images[index], "label": self.labels[index], "mask": self.masks[index],
                "boxes": self.boxes[index], "group": self.group[index], "index": torch.tensor(index)}
        return self.transform(item) if self.transform is not None else item


def collate(items: list[dict]) -> dict:
    """Stack every tensor field of the items; keep `boxes` as a list (their lengths differ)."""
    if not items:
        raise ValueError("collate needs at least one item")
    return {key: [item[key] for item in items] if key == "boxes" else torch.stack([item[key] for item in items])
            for key in items[0]}


def make_loader(arrays_or_dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """A DataLoader (num_workers=0) with `collate` and a torch.Generator seeded by `seed`."""
    dataset = arrays_or_dataset if isinstance(arrays_or_dataset, Dataset) else ArrayDataset(arrays_or_dataset)
    batch_size = _check_int("batch_size", batch_size, minimum=1)
    generator = torch.Generator().manual_seed(_check_int("seed", seed, minimum=0))
    return DataLoader(dataset, batch_size=batch_size, shuffle=bool(shuffle), generator=generator,
                      num_workers=0, collate_fn=collate)


def _check_pixels(images) -> None:
    """Real numbers without NaN/Inf, in a numpy array or a torch tensor."""
    tensor = isinstance(images, torch.Tensor)
    if images.is_complex() if tensor else images.dtype.kind not in "biuf":
        raise ValueError(f"images must hold real numbers, got dtype {images.dtype}")
    if not (torch.isfinite(images) if tensor else np.isfinite(images)).all():
        raise ValueError("images contain NaN or Inf values")


def channel_stats(images) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std of (N,C,H,W) images, as float64 arrays (C,).

    Integer images (e.g. uint8 0-255) give statistics on their own scale, the scale on which
    `standardise` uses them. NaN/Inf pixels raise ValueError."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim != 4 or images.size == 0:
        raise ValueError(f"images must be a non-empty (N,C,H,W) array, got shape {images.shape}")
    _check_pixels(images)
    mean = np.array([images[:, c].mean(dtype=np.float64) for c in range(images.shape[1])])
    std = np.array([images[:, c].std(dtype=np.float64) for c in range(images.shape[1])])
    return mean, std


def standardise(images, mean, std):
    """(images - mean) / std per channel, for (N,C,H,W) numpy arrays or torch tensors (type kept).

    Integer images (e.g. torchvision.io.read_image's uint8) are cast to float32 without rescaling:
    give mean/std on the 0-255 scale, or divide the images by 255 first. NaN/Inf pixels, a
    non-finite mean and a std that is not > 0 and finite raise ValueError."""
    if not isinstance(images, (np.ndarray, torch.Tensor)):
        raise ValueError(f"images must be a numpy array or a torch tensor, got {type(images).__name__}")
    channels = images.shape[1] if images.ndim == 4 else None
    mean, std = np.atleast_1d(np.asarray(mean, np.float64)), np.atleast_1d(np.asarray(std, np.float64))
    if channels is None or mean.ndim != 1 or std.ndim != 1 or len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise ValueError(f"need (N,C,H,W) images and a scalar or C values of mean/std; got images "
                         f"{tuple(images.shape)}, mean {mean.shape}, std {std.shape}")
    if not np.all(np.isfinite(mean)):
        raise ValueError(f"mean must be finite, got {mean}")
    if not np.all((std > 0) & np.isfinite(std)):
        raise ValueError(f"std must be > 0 and finite, got {std}")
    _check_pixels(images)
    if isinstance(images, torch.Tensor):
        if not images.is_floating_point():  # e.g. torchvision.io.read_image's uint8: cast, never round mean/std
            images = images.to(torch.float32)
        as_tensor = lambda v: torch.as_tensor(v, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)  # noqa: E731
        return (images - as_tensor(mean)) / as_tensor(std)
    dtype = images.dtype if np.issubdtype(images.dtype, np.floating) else np.float32
    return ((images - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)).astype(dtype)


# ----------------------------------------------------------------------------- disk cache

_RAGGED, _LENGTHS, _SCALAR, _KEY = "::ragged", "::lengths", "::scalar", "__cache_key__"


def _encode(arrays: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in arrays.items():
        if not isinstance(key, str) or not key or "/" in key or "::" in key:
            raise ValueError(f"cache keys must be non-empty strings without '/' or '::', got {key!r}")
        name = prefix + key
        if isinstance(value, dict):
            flat.update(_encode(value, name + "/"))
        elif isinstance(value, np.ndarray):
            if value.dtype == object:
                raise ValueError(f"{name}: object arrays cannot be cached without pickle")
            flat[name] = value
        elif isinstance(value, (list, tuple)):
            parts = [np.asarray(v) for v in value]
            if any(p.dtype == object or p.ndim == 0 for p in parts) or len({p.shape[1:] for p in parts}) > 1:
                raise ValueError(f"{name}: a list must hold arrays with equal trailing shapes")
            flat[name + _RAGGED] = np.concatenate(parts) if parts else np.zeros(0)
            flat[name + _LENGTHS] = np.array([len(p) for p in parts], np.int64)
        elif isinstance(value, (bool, int, float, str, np.generic)):
            flat[name + _SCALAR] = np.asarray(value)
        else:
            raise ValueError(f"{name}: cannot cache a {type(value).__name__}; use arrays, lists of arrays, "
                             "numbers, strings or dicts of these")
    return flat


def _decode(flat: dict[str, np.ndarray]) -> dict:
    arrays: dict = {}
    for name, value in flat.items():
        if name == _KEY or name.endswith(_LENGTHS):
            continue
        *parents, leaf = name.split("/")
        target = arrays
        for parent in parents:
            target = target.setdefault(parent, {})
        if leaf.endswith(_RAGGED):
            lengths = flat[name[: -len(_RAGGED)] + _LENGTHS]
            target[leaf[: -len(_RAGGED)]] = list(np.split(value, np.cumsum(lengths)[:-1])) if len(lengths) else []
        elif leaf.endswith(_SCALAR):
            target[leaf[: -len(_SCALAR)]] = value.item()
        else:
            target[leaf] = value
    return arrays


def cached(name: str, params: dict, build: Callable[[], dict], cache_dir=None) -> dict:
    """`build()` once, then reload it: arrays stored as `<cache_dir>/data/<name>-<key>.npz`
    (`study.cache`: the key hashes the canonical JSON of name and params, written atomically).

    The file also stores that JSON, which is checked on load; an unreadable or mismatching file is
    rebuilt. Lists of arrays (`boxes`,
    `object_masks`) are stored as concatenation + lengths, so loading needs no pickle.
    `cache_dir=None` means `study.config.CACHE_DIR`.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"name must be a non-empty string of letters, digits, '_', '.', '-', got {name!r}")
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict, got {type(params).__name__}")
    key = cache.canonical(name, params)
    path = cache.path("data", name, params, ".npz", cache_dir)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                flat = {k: stored[k] for k in stored.files}
            if flat.get(_KEY) is not None and str(flat[_KEY]) == key:
                return _decode(flat)
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
            pass  # unreadable: rebuild below
    arrays = build()
    if not isinstance(arrays, dict):
        raise ValueError(f"build() must return a dict of arrays, got {type(arrays).__name__}")
    flat = _encode(arrays)
    flat[_KEY] = np.asarray(key)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.savez would append ".npz" to a name
            np.savez(handle, **flat)

    cache.atomic_write(path, write)
    return arrays


def shapes(n: int, seed: int, config: str | ShapesConfig = "synth_objects_64", cache_dir=None, **overrides) -> dict:
    """`make_shapes` through the disk cache, keyed by n, seed and the full resolved configuration."""
    resolved = shapes_config(config, **overrides)
    params = {"n": n, "seed": seed, "config": resolved, "version": GENERATOR_VERSION}
    return cached("shapes", params, lambda: make_shapes(n, seed, resolved), cache_dir=cache_dir)
