"""Tests of study.data: generators (cards' invariants), loaders, torch access and the disk cache."""

from __future__ import annotations

import colorsys
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

import study  # noqa: F401  (makes torchvision importable; must come first)
from study import cache, data

CONFIGS = sorted(data.SHAPES_CONFIGS)


def assert_same_arrays(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], list):
            assert len(a[key]) == len(b[key])
            for x, y in zip(a[key], b[key]):
                assert x.dtype == y.dtype and np.array_equal(x, y), key
        else:
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def labels_of(arrays: dict) -> list[set]:
    labels = arrays["labels"]
    return [set(np.flatnonzero(row)) if labels.ndim == 2 else {int(row)} for row in labels]


# ----------------------------------------------------------------------------- shapes generator

@pytest.mark.parametrize("name", CONFIGS)
def test_same_seed_same_arrays_and_other_seed_differs(name):
    first, again, other = data.make_shapes(6, 3, name), data.make_shapes(6, 3, name), data.make_shapes(6, 4, name)
    assert_same_arrays(first, again)
    assert not np.array_equal(first["images"], other["images"])


@pytest.mark.parametrize("image_size", [None, 28, 48])
@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_shapes_dtypes_and_ranges(name, image_size):
    overrides = {} if image_size is None else {"image_size": image_size}
    cfg = data.shapes_config(name, **overrides)
    n, size, k = 7, cfg.image_size, cfg.num_classes
    arrays = data.make_shapes(n, 0, name, **overrides)
    assert set(arrays) == {"images", "labels", "masks", "object_masks", "boxes", "group"}
    assert arrays["images"].shape == (n, 3, size, size) and arrays["images"].dtype == np.float32
    assert arrays["images"].min() >= 0.0 and arrays["images"].max() <= 1.0
    if cfg.multi_label:
        assert arrays["labels"].shape == (n, k) and arrays["labels"].dtype == np.float32
        assert set(np.unique(arrays["labels"])) <= {0.0, 1.0}
    else:
        assert arrays["labels"].shape == (n,) and arrays["labels"].dtype == np.int64
    assert arrays["masks"].shape == (n, 1, size, size) and arrays["masks"].dtype == bool
    assert arrays["group"].shape == (n,) and arrays["group"].dtype == np.int64
    assert len(arrays["boxes"]) == len(arrays["object_masks"]) == n
    for mask, objects, boxes, classes in zip(arrays["masks"], arrays["object_masks"], arrays["boxes"], labels_of(arrays)):
        assert objects.dtype == bool and objects.shape == (len(boxes), size, size)
        assert boxes.dtype == np.int64 and boxes.shape[1] == 5
        assert np.array_equal(mask[0], objects.any(axis=0))
        assert set(boxes[:, 0].tolist()) == classes
        assert np.all(boxes[:, 1] < boxes[:, 3]) and np.all(boxes[:, 2] < boxes[:, 4])
        assert boxes[:, 1:].min() >= 0 and boxes[:, 1:].max() <= size


@pytest.mark.parametrize("name", CONFIGS)
def test_visible_mask_pixels_lie_inside_their_box(name):
    arrays = data.make_shapes(20, 1, name)
    for objects, boxes in zip(arrays["object_masks"], arrays["boxes"]):
        for mask, (_, x0, y0, x1, y1) in zip(objects, boxes):
            assert mask.any()
            inside = np.zeros_like(mask)
            inside[y0:y1, x0:x1] = True
            assert not (mask & ~inside).any()


@pytest.mark.parametrize("name", ["synth_cifar", "synth_objects_64", "synth_parts_64", "synth_birds_100"])
def test_box_is_the_tight_box_of_an_unoccluded_object(name):
    arrays = data.make_shapes(20, 2, name)  # one object per image and no corner cue: nothing occludes it
    for objects, boxes in zip(arrays["object_masks"], arrays["boxes"]):
        rows, cols = np.flatnonzero(objects[0].any(1)), np.flatnonzero(objects[0].any(0))
        assert boxes[0, 1:].tolist() == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


def test_shape_geometry_known_answers():
    # a disc of half-size s spans exactly 2s+1 pixels; the box is [c-s, c+s+1) whatever the shape
    arrays = data.make_shapes(12, 0, "synth_objects_64", half_size=(5, 5), n_segments=0, noise_std=0.0)
    for boxes in arrays["boxes"]:
        assert boxes[0, 3] - boxes[0, 1] == 11 and boxes[0, 4] - boxes[0, 2] == 11
    discs = [objs[0] for objs, label in zip(arrays["object_masks"], arrays["labels"]) if label == 0]
    assert discs and all(mask.sum() == 81 for mask in discs)  # lattice points with x²+y² <= 25


def test_single_label_classes_are_exactly_balanced():
    for n, k in [(50, 6), (7, 4), (100, 10)]:
        counts = np.bincount(data.make_shapes(n, 5, "synth_cifar", num_classes=k, image_size=28)["labels"], minlength=k)
        assert counts.sum() == n and counts.max() - counts.min() <= 1
    weighted = data.make_shapes(200, 0, "synth_birds_100")["labels"]
    assert np.bincount(weighted).tolist() == [154, 46]  # 77% / 23% of 200


def test_corner_cue_fraction_is_exact_and_encodes_the_label():
    n, q, k = 1000, 0.7, 6
    arrays = data.make_shapes(n, 0, "synth_objects_64", image_size=28, spurious_correlation=q, noise_std=0.0)
    cue = arrays["images"][:, :, :2, :2]  # a 4-px cue at 64 px is 2 px at 28 px
    colours = np.array([colorsys.hsv_to_rgb(c / k, 1.0, 1.0) for c in range(k)], np.float32)
    shows = (cue[:, None] == colours[None, :, :, None, None]).all(axis=(2, 3, 4))  # (N, K)
    decoded = np.where(shows.any(1), shows.argmax(1), -1)
    assert shows.sum(1).max() <= 1
    assert np.array_equal(decoded >= 0, arrays["group"] == 1)
    assert np.all(decoded[decoded >= 0] == arrays["labels"][decoded >= 0])
    assert (decoded == arrays["labels"]).mean() == q  # the measured cue-label agreement
    for mask in arrays["masks"][arrays["group"] == 1]:
        assert not mask[0, :2, :2].any()  # the cue lies outside every object mask


@pytest.mark.parametrize("q, n, expected", [(0.0, 10, 0), (1.0, 10, 10), (0.25, 10, 3), (0.35, 20, 7), (0.5, 9, 5)])
def test_corner_cue_count_uses_round_half_up(q, n, expected):
    arrays = data.make_shapes(n, 1, "synth_cifar", spurious_cue="corner_patch", spurious_correlation=q)
    assert arrays["group"].sum() == expected


def _marked(image: np.ndarray, box, colour, cue: int = 4) -> bool:
    """Whether a cue×cue block of exactly `colour` sits just outside one side of the box."""
    full = sliding_window_view(np.all(image == np.asarray(colour)[:, None, None], axis=0), (cue, cue)).all(axis=(2, 3))
    x0, y0, x1, y1 = box
    size = image.shape[-1]
    strips = []
    if y0 >= cue:
        strips.append(full[y0 - cue, x0: x1 - cue + 1])
    if y1 + cue <= size:
        strips.append(full[y1, x0: x1 - cue + 1])
    if x0 >= cue:
        strips.append(full[y0: y1 - cue + 1, x0 - cue])
    if x1 + cue <= size:
        strips.append(full[y0: y1 - cue + 1, x1])
    return any(strip.any() for strip in strips)


def test_voc_multi_object_multi_hot_and_marker_fraction():
    q = 0.85
    arrays = data.make_shapes(150, 0, "synth_voc_64", noise_std=0.0)
    counts = np.array([len(b) for b in arrays["boxes"]])
    assert counts.min() == 1 and counts.max() == 3 and len(set(counts)) == 3
    for label, boxes in zip(arrays["labels"], arrays["boxes"]):
        assert set(np.flatnonzero(label)) == set(boxes[:, 0].tolist())
    for objects in arrays["object_masks"]:  # visible masks after occlusion never share a pixel
        assert objects.sum(0).max() <= 1
    eligible = marked = 0
    for image, boxes, group in zip(arrays["images"], arrays["boxes"], arrays["group"]):
        flags = [_marked(image, box[1:], data.MARKER_COLOURS[box[0]]) for box in boxes if box[0] in (0, 1)]
        eligible, marked = eligible + len(flags), marked + sum(flags)
        assert group == int(any(flags))
    assert eligible > 50 and marked == math.floor(q * eligible + 0.5)


@pytest.mark.parametrize("rate", [0.0, 0.8, 1.0])
def test_voc_cooccur_option_sets_the_exact_companion_rate(rate):
    plain = data.make_shapes(300, 1, "synth_voc_64", image_size=32)
    arrays = data.make_shapes(300, 1, "synth_voc_64", image_size=32, cooccur=(3, 2, rate))
    labels = arrays["labels"].astype(bool)
    holders = labels[:, 3]
    np.testing.assert_array_equal(holders, plain["labels"][:, 3].astype(bool))  # anchor membership kept
    assert labels[holders, 2].sum() == math.floor(rate * holders.sum() + 0.5)
    counts = np.array([len(b) for b in arrays["boxes"]])
    assert counts.min() >= 1 and counts.max() <= 3
    for label, boxes in zip(arrays["labels"], arrays["boxes"]):
        assert set(np.flatnonzero(label)) == set(boxes[:, 0].tolist())
    if rate == 0.8:  # the plain generator's co-occurrence is about 1 - (5/6)^2
        assert labels[holders, 2].mean() > plain["labels"][plain["labels"][:, 3] > 0, 2].mean() + 0.3


def test_parts_two_instances_have_disjoint_boxes_and_the_image_class():
    arrays = data.make_shapes(20, 0, "synth_parts_64", n_objects=(2, 2), allow_overlap=False)
    for label, boxes in zip(arrays["labels"], arrays["boxes"]):
        (_, ax0, ay0, ax1, ay1), (_, bx0, by0, bx1, by1) = boxes
        assert boxes[:, 0].tolist() == [label, label]
        assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0


def test_birds_groups_backgrounds_and_split_composition():
    splits = data.shapes_splits(0, "synth_birds_100", sizes={"train": 200, "valid": 100, "test": 200})
    assert np.bincount(splits["train"]["group"], minlength=4).tolist() == [154, 0, 0, 46]
    assert np.bincount(splits["valid"]["group"], minlength=4).tolist() == [77, 0, 0, 23]
    assert np.bincount(splits["test"]["group"], minlength=4).tolist() == [50, 50, 50, 50]
    for arrays in splits.values():
        outside = ~arrays["masks"][:, 0]
        blue = (arrays["images"][:, 2] * outside).sum((1, 2)) > (arrays["images"][:, 1] * outside).sum((1, 2))
        assert np.array_equal(arrays["group"], 2 * arrays["labels"] + blue)  # group = (bird, background)
        for image, mask, label, box in zip(arrays["images"], arrays["masks"], arrays["labels"], arrays["boxes"]):
            _, x0, y0, x1, y1 = box[0]
            body = image[0, (y0 + y1) // 2, x0 + 1]
            dark = (image[0] < body - 0.1) & mask[0]  # the bar
            rows, cols = np.flatnonzero(dark.any(1)), np.flatnonzero(dark.any(0))
            horizontal = cols.size > rows.size
            assert horizontal == (label == 0)
    assert not np.array_equal(splits["valid"]["images"][:10], splits["test"]["images"][:10])


def test_objects_split_recipe_keeps_the_cue_in_training_only():
    splits = data.shapes_splits(0, "synth_objects_64", sizes={"train": 40, "test": 20}, spurious_correlation=0.5,
                                image_size=28)
    assert splits["train"]["group"].sum() == 20 and splits["test"]["group"].sum() == 0


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(2, 10), size=st.integers(28, 36), seed=st.integers(0, 2**31))
def test_property_balance_and_masks_in_boxes(n, k, size, seed):
    arrays = data.make_shapes(n, seed, "synth_objects_64", num_classes=k, image_size=size)
    counts = np.bincount(arrays["labels"], minlength=k)
    assert counts.max() - counts.min() <= 1
    for objects, boxes in zip(arrays["object_masks"], arrays["boxes"]):
        rows, cols = np.nonzero(objects[0])
        _, x0, y0, x1, y1 = boxes[0]
        assert rows.min() >= y0 and rows.max() < y1 and cols.min() >= x0 and cols.max() < x1


@pytest.mark.parametrize("kwargs", [
    {"image_size": 27}, {"config": "nope"}, {"colour": 3}, {"spurious_correlation": -0.1},
    {"spurious_correlation": 1.5}, {"spurious_correlation": float("nan")}, {"n": 0}, {"n": -3}, {"seed": -1},
    {"num_classes": 13}, {"config": 3}, {"half_size": (20, 40)}, {"n_objects": (0, 2)},
    {"config": "synth_birds_100", "num_classes": 3}, {"class_weights": (1.0, 2.0)}, {"shapes": ("blob",)},
    {"config": "synth_voc_64", "spurious_cue": "corner_patch"},
    {"config": "synth_voc_64", "cooccur": (3, 3, 0.8)}, {"config": "synth_voc_64", "cooccur": (3, 2, 1.5)},
    {"config": "synth_voc_64", "cooccur": (3, 6, 0.8)}, {"config": "synth_objects_64", "cooccur": (3, 2, 0.8)},
    {"config": "synth_voc_64", "n_objects": (1, 1), "cooccur": (3, 2, 0.8)},
])
def test_shapes_bad_inputs_raise_value_error(kwargs):
    kwargs = {"n": 4, "seed": 0, "config": "synth_objects_64", **kwargs}
    with pytest.raises(ValueError):
        data.make_shapes(**kwargs)


def test_error_messages_name_the_problem_and_the_choices():
    with pytest.raises(ValueError, match="unknown shapes override.*colour.*known fields"):
        data.make_shapes(2, 0, colour=3)
    with pytest.raises(ValueError, match="unknown shapes config 'nope'.*synth_cifar"):
        data.make_shapes(2, 0, "nope")
    with pytest.raises(ValueError, match=r"image_size must be >= 28"):
        data.make_shapes(2, 0, image_size=16)


# ----------------------------------------------------------------------------- Viviano's crosses

@pytest.fixture(scope="module")
def pool():
    return data.make_crosses(512, 1), data.make_crosses(512, 1, flip_prob=1.0)


def test_crosses_format_balance_and_mask_sizes(pool):
    plain, _ = pool
    assert plain["images"].shape == (512, 1, 28, 28) and plain["images"].dtype == np.float32
    assert set(np.unique(plain["images"])) == {0.0, 1.0}
    assert np.bincount(plain["labels"]).tolist() == [256, 256]
    sizes = plain["masks"].sum((1, 2, 3))
    assert set(sizes[plain["labels"] == 0]) == {5, 9}
    assert set(sizes[plain["labels"] == 1]) == {8, 10, 16, 18}
    for mask, box, label in zip(plain["masks"], plain["boxes"], plain["labels"]):
        rows, cols = np.nonzero(mask[0])
        assert box.tolist() == [[label, cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]]
    assert plain["group"].sum() == 0


def test_crosses_distractor_before_and_after_flip(pool):
    plain, flipped = pool
    assert np.array_equal(flipped["images"], plain["images"][..., ::-1])
    assert np.array_equal(flipped["masks"], plain["masks"][..., ::-1])
    assert flipped["group"].tolist() == [1] * 512
    for arrays, sides in ((plain, {0: slice(3, 6), 1: slice(22, 25)}), (flipped, {0: slice(22, 25), 1: slice(3, 6)})):
        for image, mask, label in zip(arrays["images"], arrays["masks"], arrays["labels"]):
            expected = mask[0].copy()
            expected[23:25, sides[label]] = True  # the distractor, drawn over the crosses
            assert np.array_equal(image[0] > 0, expected)


def test_crosses_components_determine_the_label_after_flip(pool):
    plain, flipped = pool
    before = np.array([ndimage.label(m[0])[1] for m in plain["masks"]])
    after = np.array([ndimage.label(m[0])[1] for m in flipped["masks"]])
    labels, sizes = plain["labels"], plain["masks"].sum((1, 2, 3))
    assert np.array_equal(before, after)
    assert np.all(after[labels == 0] == 1)
    assert set(after[labels == 1]) <= {1, 2}
    assert np.all(after[(labels == 1) & np.isin(sizes, (8, 16))] == 1)  # overlapping crosses merge
    assert (after[labels == 1] == 2).mean() > 0.95  # otherwise two separate crosses


@pytest.mark.parametrize("p, expected", [(0.0, 0), (1.0, 50), (0.3, 15), (0.51, 26)])
def test_crosses_flip_knob_flips_round_p_n(p, expected):
    arrays = data.make_crosses(50, 7, flip_prob=p)
    assert arrays["group"].sum() == expected
    plain = data.make_crosses(50, 7)
    flipped = arrays["group"] == 1
    assert np.array_equal(arrays["images"][flipped], plain["images"][flipped][..., ::-1])
    assert np.array_equal(arrays["images"][~flipped], plain["images"][~flipped])


def test_crosses_splits_follow_the_card():
    splits = data.crosses_splits(0)
    again = data.crosses_splits(0)
    other = data.crosses_splits(1)
    for name, n, group in (("train", 500, 0), ("valid", 128, 1), ("test", 128, 1)):
        split = splits[name]
        assert len(split["labels"]) == n and np.bincount(split["labels"]).tolist() == [n // 2, n // 2]
        assert np.all(split["group"] == group)
        assert len(np.unique(split["pool_index"])) == n
        pool = data.make_crosses(512, data.CROSS_POOL_SEEDS[name])
        source = pool["images"][split["pool_index"]]
        assert np.array_equal(split["images"], source[..., ::-1] if group else source)
        assert np.array_equal(split["labels"], pool["labels"][split["pool_index"]])
        assert_same_arrays(split, again[name])
        assert not np.array_equal(split["pool_index"], other[name]["pool_index"])
    half = data.crosses_splits(0, flip_prob_eval=0.5)
    assert half["valid"]["group"].sum() == 64 and half["train"]["group"].sum() == 0
    assert data.crosses_splits(0, flip_prob_eval=0.0)["test"]["group"].sum() == 0


@pytest.mark.parametrize("call", [
    lambda: data.make_crosses(10, 0, flip_prob=-0.1), lambda: data.make_crosses(10, 0, flip_prob=1.1),
    lambda: data.make_crosses(0, 0), lambda: data.crosses_splits(0, n_train=600),
    lambda: data.crosses_splits(0, flip_prob_eval=2.0),
])
def test_crosses_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


# ----------------------------------------------------------------------------- digits and CIFAR-10

def test_digits_split_sizes_mean_and_determinism():
    split = data.load_digits_split()
    train, test = split["train"], split["test"]
    assert train["images"].shape == (1400, 1, 16, 16) and test["images"].shape == (397, 1, 16, 16)
    assert train["images"].dtype == np.float32 and 0 <= train["images"].min() and train["images"].max() <= 1
    assert split["train_mean"] == pytest.approx(train["images"].mean(dtype=np.float64))
    assert split["train_mean"] == pytest.approx(0.305, abs=0.005)
    assert train["masks"].all() and train["boxes"][0].tolist() == [[train["labels"][0], 0, 0, 16, 16]]
    assert np.array_equal(split["test"]["images"], data.load_digits_split()["test"]["images"])
    assert not np.array_equal(test["labels"], data.load_digits_split(seed=1)["test"]["labels"])
    assert data.load_digits_split(upsample=1)["train"]["images"].shape == (1400, 1, 8, 8)


def _write_cifar_fixture(root, per_batch=4, n_test=3):
    folder = root / data.CIFAR_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, size=n).tolist(), b"batch_label": name.encode()}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
        batches[name] = batch
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}, handle)
    return batches


def test_cifar_loader_reads_the_pickle_layout(tmp_path):
    batches = _write_cifar_fixture(tmp_path)
    test = data.load_cifar10(tmp_path, "test", verify=False)
    raw = batches["test_batch"]
    assert test["images"].shape == (3, 3, 32, 32) and test["images"].dtype == np.float32
    # pixel (channel c, row y, column x) is byte c·1024 + y·32 + x of the row
    for i, c, y, x in [(0, 0, 0, 0), (1, 1, 5, 7), (2, 2, 31, 30)]:
        assert test["images"][i, c, y, x] == np.float32(raw[b"data"][i, c * 1024 + y * 32 + x] / 255.0)
    assert test["labels"].tolist() == raw[b"labels"] and test["labels"].dtype == np.int64
    assert test["class_names"].tolist()[:2] == ["class0", "class1"]
    full = data.load_cifar10(tmp_path, "train_full", verify=False)
    train = data.load_cifar10(tmp_path, "train", n_valid=5, verify=False)
    valid = data.load_cifar10(tmp_path, "valid", n_valid=5, verify=False)
    assert len(full["labels"]) == 20 and len(train["labels"]) == 15 and len(valid["labels"]) == 5
    combined = np.concatenate([train["images"], valid["images"]]).reshape(20, -1)
    assert sorted(map(bytes, combined)) == sorted(map(bytes, full["images"].reshape(20, -1)))
    with pytest.raises(ValueError, match="md5"):
        data.load_cifar10(tmp_path, "test")  # a fixture is not the original file


def test_cifar_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        data.load_cifar10(tmp_path, "test")
    with pytest.raises(ValueError, match="unknown split"):
        data.load_cifar10(tmp_path, "validation")


# ----------------------------------------------------------------------------- torch access

def test_dataset_items_and_seeded_loader():
    arrays = data.make_shapes(10, 0, "synth_voc_64", image_size=32)
    dataset = data.ArrayDataset(arrays)
    item = dataset[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"].shape == (6,) and item["mask"].dtype == torch.bool and item["mask"].shape == (1, 32, 32)
    assert torch.equal(item["boxes"], torch.as_tensor(arrays["boxes"][3])) and int(item["index"]) == 3
    batches = list(data.make_loader(arrays, batch_size=4, shuffle=True, seed=1))
    assert [len(b["boxes"]) for b in batches] == [4, 4, 2]
    assert batches[0]["image"].shape == (4, 3, 32, 32) and batches[0]["group"].dtype == torch.int64
    order = torch.cat([b["index"] for b in batches])
    assert sorted(order.tolist()) == list(range(10))
    again = torch.cat([b["index"] for b in data.make_loader(dataset, 4, True, 1)])
    other = torch.cat([b["index"] for b in data.make_loader(dataset, 4, True, 2)])
    assert torch.equal(order, again) and not torch.equal(order, other)
    plain = torch.cat([b["index"] for b in data.make_loader(dataset, 4, False, 0)])
    assert plain.tolist() == list(range(10))
    first = batches[0]
    assert torch.equal(first["image"][0], dataset[int(first["index"][0])]["image"])


def test_dataset_defaults_transform_and_errors():
    images = np.zeros((3, 1, 8, 8), np.float32)
    dataset = data.ArrayDataset({"images": images, "labels": np.array([2, 0, 1])},
                                transform=lambda item: {**item, "image": item["image"] + 1})
    item = dataset[0]
    assert item["mask"].all() and item["boxes"].tolist() == [[2, 0, 0, 8, 8]] and int(item["group"]) == 0
    assert float(item["image"].min()) == 1.0
    with pytest.raises(ValueError, match="labels has 2 entries"):
        data.ArrayDataset({"images": images, "labels": np.array([0, 1])})
    with pytest.raises(ValueError, match="images"):
        data.ArrayDataset({"labels": np.array([0])})
    with pytest.raises(ValueError, match="batch_size"):
        data.make_loader(dataset, 0, False, 0)


def test_channel_stats_and_standardise():
    images = np.stack([np.full((2, 4, 4), 0.2), np.full((2, 4, 4), 0.6)], axis=1).astype(np.float32)
    images[0, 1] = 1.0  # channel 1 holds 0.6 and 1.0 in equal numbers
    mean, std = data.channel_stats(images)
    assert mean == pytest.approx([0.2, 0.8]) and std == pytest.approx([0.0, 0.2], abs=1e-7)
    noisy = np.random.default_rng(0).uniform(size=(5, 3, 6, 6)).astype(np.float32)
    mean, std = data.channel_stats(noisy)
    out = data.standardise(noisy, mean, std)
    assert out.dtype == np.float32 and data.channel_stats(out)[0] == pytest.approx(0, abs=1e-6)
    assert data.channel_stats(out)[1] == pytest.approx(1, abs=1e-6)
    tensor_out = data.standardise(torch.from_numpy(noisy), mean, std)
    assert isinstance(tensor_out, torch.Tensor) and np.allclose(tensor_out.numpy(), out, atol=1e-6)
    assert np.allclose(data.standardise(noisy, 0.5, 0.25), (noisy - 0.5) / 0.25)
    with pytest.raises(ValueError, match="std must be > 0"):
        data.standardise(noisy, mean, [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="mean/std"):
        data.standardise(noisy, [0.1, 0.2], [1.0, 1.0])


# ----------------------------------------------------------------------------- disk cache

def _counting_build(result):
    calls = []

    def build():
        calls.append(1)
        return result

    return build, calls


def test_cache_builds_once_and_round_trips_ragged_and_nested(tmp_path):
    result = {"images": np.arange(12, dtype=np.float32).reshape(3, 4),
              "boxes": [np.zeros((1, 5), np.int64), np.ones((3, 5), np.int64), np.zeros((0, 5), np.int64)],
              "empty": [], "split": {"labels": np.array([1, 2]), "mean": 0.25, "name": "x"}}
    build, calls = _counting_build(result)
    params = {"n": 3, "config": data.shapes_config("synth_cifar"), "sizes": (1, 2)}
    first = data.cached("toy", params, build, cache_dir=tmp_path)
    second = data.cached("toy", params, build, cache_dir=tmp_path)
    assert len(calls) == 1
    assert first is result and np.array_equal(second["images"], result["images"])
    assert [b.shape for b in second["boxes"]] == [(1, 5), (3, 5), (0, 5)] and second["boxes"][1].sum() == 15
    assert second["empty"] == [] and second["split"]["mean"] == 0.25 and second["split"]["name"] == "x"
    assert np.array_equal(second["split"]["labels"], [1, 2])
    data.cached("toy", {**params, "n": 4}, build, cache_dir=tmp_path)
    assert len(calls) == 2
    assert len(list((tmp_path / "data").glob("toy-*.npz"))) == 2


def test_cache_default_dir_is_config_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(study.config, "CACHE_DIR", tmp_path)
    data.cached("toy", {"a": 1}, lambda: {"x": np.zeros(2)})
    assert len(list((tmp_path / "data").glob("toy-*.npz"))) == 1


def test_cache_never_reads_temp_files_or_interrupted_writes(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    np.savez(folder / ".toy-leftover.tmp", x=np.full(2, 9.0))  # what a killed writer leaves behind
    build, calls = _counting_build({"x": np.zeros(2)})
    assert np.array_equal(data.cached("toy", {"a": 1}, build, cache_dir=tmp_path)["x"], [0, 0])
    assert len(calls) == 1

    def crash(*args):
        raise KeyboardInterrupt  # the process dies between writing and renaming

    before = sorted(folder.iterdir())
    monkeypatch.setattr(cache.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        data.cached("toy", {"a": 2}, build, cache_dir=tmp_path)
    monkeypatch.undo()
    assert sorted(folder.iterdir()) == before  # neither a result nor a temp file was left
    data.cached("toy", {"a": 2}, build, cache_dir=tmp_path)
    assert len(calls) == 3  # rebuilt, not read from a half-written file


def test_cache_rebuilds_corrupt_or_mismatching_files(tmp_path):
    build, calls = _counting_build({"x": np.ones(3)})
    data.cached("toy", {"a": 1}, build, cache_dir=tmp_path)
    (path,) = (tmp_path / "data").glob("toy-*.npz")
    path.write_bytes(b"not a zip file")
    assert np.array_equal(data.cached("toy", {"a": 1}, build, cache_dir=tmp_path)["x"], np.ones(3))
    np.savez(path, x=np.zeros(3), __cache_key__=np.asarray("some other key"))
    assert np.array_equal(data.cached("toy", {"a": 1}, build, cache_dir=tmp_path)["x"], np.ones(3))
    assert len(calls) == 3


def test_cache_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="name"):
        data.cached("bad name/..", {}, dict, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="cache key"):
        data.cached("toy", {"x": object()}, dict, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="cannot cache"):
        data.cached("toy", {}, lambda: {"x": object()}, cache_dir=tmp_path)


def test_shapes_helper_is_cached_make_shapes(tmp_path, monkeypatch):
    first = data.shapes(5, 0, "synth_voc_64", cache_dir=tmp_path, image_size=32)
    calls = []
    monkeypatch.setattr(data, "make_shapes", lambda *a, **k: calls.append(1))
    second = data.shapes(5, 0, "synth_voc_64", cache_dir=tmp_path, image_size=32)
    assert not calls
    assert_same_arrays(first, second)
    monkeypatch.undo()
    assert_same_arrays(second, data.make_shapes(5, 0, "synth_voc_64", image_size=32))


def test_standardise_casts_integer_images_instead_of_rounding_mean_and_std():
    import torch

    from study import data as D
    images = torch.full((2, 3, 4, 4), 200, dtype=torch.uint8)  # what torchvision.io.read_image returns
    out = D.standardise(images, [100.0, 100.0, 100.0], [50.0, 50.0, 50.0])
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full_like(out, 2.0))
