"""Notebook 02 (Vandersmissen & Oramas 2024): models, orderings, the scoring step at a tiny size,
the analyses with known answers, and the ImageNet loader on a fixture in the real format."""

import math

import krippendorff
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats

import study  # noqa: F401  (before torchvision)
from study import attribution, config, data, imagenet, train
from study.experiments import vandersmissen2024 as V
from study.findings import correlation_interval
from study.models import MODELS, ResNetLike, VGGLike, capture



pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- models


def test_model_shapes_last_conv_map_and_lrp_support():
    vgg, resnet = VGGLike(num_classes=6).eval(), ResNetLike(num_classes=6).eval()
    x = torch.zeros(2, 3, 64, 64)
    out, feats = capture(vgg, x, [VGGLike.gradcam_layer])
    assert out.shape == (2, 6) and feats["features.10"].shape == (2, 64, 8, 8)
    out, feats = capture(resnet, x, [ResNetLike.gradcam_layer])
    assert out.shape == (2, 6) and feats["layer3"].shape == (2, 64, 8, 8)
    assert resnet.conv1.stride == (2, 2) and [resnet.layer1[0].conv1.out_channels, resnet.layer2[0].conv1.stride] == [16, (2, 2)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in vgg.modules())
    assert V.supports_lrp(vgg) and V.supports_lrp(resnet)  # zennit canonizes the residual blocks (ed54d04)
    assert MODELS["vgg_like"] is VGGLike and MODELS["resnet_like"] is ResNetLike
    with pytest.raises(ValueError, match="multiple of 8"):
        VGGLike(image_size=60)


def test_channels_last_keeps_outputs():
    torch.manual_seed(0)
    model = VGGLike(num_classes=3, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    assert torch.allclose(V.channels_last(model)(x), expected, atol=1e-5)


# ----------------------------------------------------------------------------- scale and orderings


def test_scale_settings_follow_the_card():
    small, large = V.scale_settings(64), V.scale_settings(224)
    assert small["blur_sigma"] == pytest.approx(5 * 64 / 224) and small["blur_kernel"] == 5
    assert (small["region_patch"], small["occlusion_window"]) == (3, 4)
    assert (large["blur_sigma"], large["blur_kernel"], large["region_patch"], large["occlusion_window"]) == (5, 11, 9, 8)


def test_region_order_removes_overlapping_patches_around_the_most_salient_pixel():
    saliency = np.zeros((6, 6))
    saliency[3, 2] = 1.0
    order = V.region_order(saliency, patch=3)
    assert sorted(order.tolist()) == list(range(36))
    first = {(p // 6, p % 6) for p in order[:9]}
    assert first == {(r, c) for r in (2, 3, 4) for c in (1, 2, 3)}
    # next most salient not-yet-removed pixel in raster order is (0, 0): its clipped patch is 2×2
    assert {(p // 6, p % 6) for p in order[9:13]} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    constant = V.region_order(np.zeros((4, 4)), patch=3)
    assert constant[:4].tolist() == [0, 1, 4, 5]


def test_ordering_maps_encode_the_stable_pixel_order_and_seeded_random_ties():
    maps = torch.tensor([[0.5, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.5]]).reshape(2, 1, 2, 2)
    encoded = V.ordering_maps(maps, "pixel", 3, "raster", seed=0)
    assert torch.argsort(-encoded.reshape(2, 4), dim=1).tolist() == [[2, 0, 1, 3], [3, 0, 1, 2]]
    again = V.ordering_maps(maps, "pixel", 3, "random", seed=1)
    assert torch.equal(again, V.ordering_maps(maps, "pixel", 3, "random", seed=1))
    with pytest.raises(ValueError, match="tie_break"):
        V.ordering_maps(maps, "pixel", 3, "shuffled", seed=0)


def test_postprocessing_invariants():
    torch.manual_seed(0)
    raw = torch.randn(3, 3, 16, 16)
    steps = V.postprocessing(64)
    base = attribution.postprocess(raw, steps["base"])
    assert float(base.amin()) == 0 and torch.allclose(base.amax(dim=(1, 2, 3)), torch.ones(3))
    assert torch.equal(attribution.postprocess(base, steps["base"]), base)
    clipped = attribution.postprocess(raw, steps["clip"])
    assert ((clipped == 1).sum(dim=(1, 2, 3)) >= math.floor(0.01 * 256)).all()
    binary = attribution.postprocess(raw, steps["binarised"])
    assert (binary.sum(dim=(1, 2, 3)) == round(0.1 * 256)).all()
    blurred = attribution.postprocess(raw, steps["blur"])
    assert blurred.min() >= 0 and blurred.max() <= 1


# ----------------------------------------------------------------------------- the expensive step, tiny


SIZES = {"n_train": 16, "n_test": 6, "epochs": 1, "n_images": 4, "steps": 4, "ig_steps": 4, "smoothgrad_samples": 2,
         "rise_masks": 16, "batch_size": 128}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 32-px version of the synthetic set and two untrained models: every code path, a few seconds."""
    arrays = data.make_shapes(SIZES["n_test"], 3, "synth_objects_64", image_size=32)
    mean, std = data.channel_stats(arrays["images"])
    prepared = {"settings": dict(SIZES), "dataset": "synth_objects_64@32", "train": None, "test": arrays,
                "mean": mean, "std": std, "image_size": 32, "num_classes": 6}
    torch.manual_seed(0)
    runs = {"vgg_like": {"model": V.channels_last(VGGLike(num_classes=6, image_size=32)).eval(), "model_key": "v"},
            "resnet_like": {"model": ResNetLike(num_classes=6).eval(), "model_key": "r"}}
    cache = tmp_path_factory.mktemp("cache")
    evaluation = V.score_everything(runs, prepared, seed=0, device="cpu", cache_dir=cache)
    return {"prepared": prepared, "runs": runs, "evaluation": evaluation, "cache": cache,
            "tables": V.analyse(evaluation)}


def test_score_table_is_complete_and_in_range(tiny):
    scores = tiny["evaluation"].scores
    assert not scores.isna().any().any()
    maps = scores.groupby("arch")["map"].unique().apply(set)
    # LRP α1β0 on both since zennit (ed54d04) canonizes the ResNet-like's residual blocks
    assert "lrp_alpha1beta0" in maps["vgg_like"] and "lrp_alpha1beta0" in maps["resnet_like"]
    assert len(maps["vgg_like"]) == 6 + 1 + 6 + 4 and maps["resnet_like"] == maps["vgg_like"]
    assert set(scores["metric"]) == set(V.METRICS) | set(V.DESCRIPTORS)
    assert len(scores) == (17 + 17) * SIZES["n_images"] * (len(V.METRICS) + len(V.DESCRIPTORS))
    by_metric = scores.groupby("metric")["score"]
    assert by_metric.min()[list(V.CURVE_METRICS)].min() >= 0 and by_metric.max()[list(V.CURVE_METRICS)].max() <= 1
    assert by_metric.min()["average_drop"] >= 0 and by_metric.max()["average_drop"] <= 100
    for metric in V.BINARY_METRICS:
        assert set(scores.loc[scores["metric"] == metric, "score"]) <= {0.0, 1.0}
    gt = scores[(scores["map"] == "ground_truth") & (scores["metric"] == "pointing_game")]
    assert (gt["score"] == 1).all()  # the box contains the first maximal pixel of its own map
    constant = scores[(scores["map"] == "constant") & (scores["metric"] == "pointing_game")]
    assert (constant["score"] == 0).all()  # all-zero after min–max → argmax (0, 0), outside every box
    curves = tiny["evaluation"].curves
    assert set(curves["fraction"]) == {k / SIZES["steps"] for k in range(SIZES["steps"] + 1)}


def test_curve_endpoints_and_cache(tiny):
    curves = tiny["evaluation"].curves
    start = curves[curves["fraction"] == 0].groupby(["arch", "metric"])["score"].agg(["min", "max"])
    end = curves[curves["fraction"] == 1].groupby(["arch", "metric"])["score"].agg(["min", "max"])
    # deletion starts at p(x) and insertion ends at p(x), whatever the map
    assert np.allclose(start.loc[start.index.get_level_values(1).str.startswith("deletion")].diff(axis=1)["max"], 0,
                       atol=1e-6)
    assert np.allclose(end.loc[end.index.get_level_values(1).str.startswith("insertion")].diff(axis=1)["max"], 0,
                       atol=1e-6)
    again = V.score_everything(tiny["runs"], tiny["prepared"], seed=0, device="cpu", cache_dir=tiny["cache"])
    assert again.from_cache
    pd.testing.assert_frame_equal(again.scores, tiny["evaluation"].scores, check_dtype=False)


def test_method_ranks_known_answer_and_direction():
    index = pd.MultiIndex.from_tuples([("a", "deletion_zero_pixel"), ("a", "insertion_blur_region")],
                                      names=["arch", "metric"])
    means = pd.DataFrame([[0.3, 0.1, 0.2], [0.3, 0.1, 0.2]], index=index, columns=["gradcam", "rise", "occlusion"])
    ranks = V.method_ranks(means)
    assert ranks.loc[("a", "deletion_zero_pixel")].tolist() == [3, 1, 2]
    assert ranks.loc[("a", "insertion_blur_region")].tolist() == [1, 3, 2]


def test_ranks_of_the_run_are_permutations(tiny):
    ranks = tiny["tables"]["ranks"]
    for (arch, metric), row in ranks.iterrows():
        values = row.dropna()
        assert values.min() == 1 and values.max() <= len(values)
        if metric in V.CURVE_METRICS and tiny["tables"]["means"].loc[(arch, metric)].dropna().nunique() == len(values):
            assert sorted(values) == list(range(1, len(values) + 1))


def test_alpha_equals_recomputation_from_the_table(tiny):
    reliability = tiny["tables"]["reliability"]
    scores = tiny["evaluation"].scores
    checked = 0
    for row in reliability.itertuples():
        matrix = V.per_image(scores, row.arch, row.metric).to_numpy()
        aligned = matrix if V.HIGHER_IS_BETTER[row.metric] else -matrix
        ranks = stats.rankdata(aligned, axis=1)
        if np.isnan(row.alpha):
            assert np.ptp(ranks) == 0 or len(np.unique(ranks)) == 1
            continue
        expected = krippendorff.alpha(reliability_data=ranks, level_of_measurement="ordinal")
        assert row.alpha == pytest.approx(expected)
        checked += 1
    assert checked >= 10
    assert set(reliability["reading"]) <= {"reliable", "tentative", "unreliable", "undefined"}


def test_correlations_are_sign_aligned(tiny):
    correlations = tiny["tables"]["correlations"]
    scores = tiny["evaluation"].scores
    rows = correlations[(correlations["metric_a"] == "deletion_zero_pixel") &
                        (correlations["metric_b"] == "insertion_blur_pixel")]
    assert len(rows) > 0
    for row in rows.itertuples():
        part = scores[(scores["arch"] == row.arch) & (scores["map"] == row.map)]
        wide = part.pivot(index="image", columns="metric", values="score")
        raw = stats.spearmanr(wide["deletion_zero_pixel"], wide["insertion_blur_pixel"]).statistic
        assert row.r == pytest.approx(-raw)  # deletion flipped to 1 − x
        assert row.correlation == "spearman"
    kinds = set(correlations["correlation"])
    assert kinds <= {"identity", "spearman", "point-biserial", "pearson (phi)"}
    assert (correlations.loc[correlations["metric_a"] == correlations["metric_b"], "r"] == 1).all()


def test_grade_shift_and_findings(tiny):
    shift = tiny["tables"]["shift"]
    assert len(shift) == 2 * len(V.METRICS) * len(V.MANIPULATED) * len(V.MANIPULATIONS)
    assert (shift["rank_change"] == shift["rank_original"] - shift["rank_manipulated"]).all()
    row = shift[(shift["metric"] == "average_drop")].iloc[0]
    assert row["delta"] == pytest.approx(row["original"] - row["manipulated"])  # lower is better: sign flipped
    dummies = tiny["tables"]["dummy_ranks"]
    assert set(V.DUMMIES) <= set(dummies.columns) and dummies.max().max() <= 11
    rows = V.findings(tiny["tables"])
    assert len(rows) == 9
    assert {r["verdict"] for r in rows} <= {"reproduced", "partly reproduced", "not reproduced", "inconclusive"}
    assert all(r["n"] and r["uncertainty"] and "Rule: " in r["this_run"] for r in rows)
    pg_rank = tiny["tables"]["ranks"].xs("pointing_game", level="metric")["ground_truth"]
    assert (pg_rank == 1).all()
    from study.findings import findings_table

    assert len(findings_table(rows, profile="smoke")) == 9  # every row valid for the shared table


def test_train_models_at_smoke_size_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    prepared = V.prepare_synthetic("smoke", 0, n_train=32, n_test=8)
    assert prepared["train"]["images"].shape == (32, 3, 64, 64) and prepared["num_classes"] == 6
    assert np.allclose(data.standardise(prepared["train"]["images"], prepared["mean"], prepared["std"]).mean((0, 2, 3)),
                       0, atol=1e-4)
    runs = V.train_models(prepared, 0, "cpu", architectures=("vgg_like",))
    assert not runs["vgg_like"]["from_cache"] and 0 <= runs["vgg_like"]["test"]["accuracy"] <= 1
    again = V.train_models(prepared, 0, "cpu", architectures=("vgg_like",))
    assert again["vgg_like"]["from_cache"]
    assert all(torch.equal(a, b) for a, b in zip(runs["vgg_like"]["model"].state_dict().values(),
                                                again["vgg_like"]["model"].state_dict().values()))


def test_a_model_key_names_the_training_data_seed_as_well_as_the_model_seed():
    """`score_replicates` trains seed 1 on the data of seed 0; a run at seed 1 must not load it as
    its own seed-1 model (trained on the data of seed 1)."""
    settings = {"n_train": 32, "epochs": 1}
    on_data = {d: {"settings": settings, "dataset": "synth_objects_64", "data_seed": d, "num_classes": 6} for d in (0, 1)}
    replicate, own = V.model_params(on_data[0], "vgg_like", 1), V.model_params(on_data[1], "vgg_like", 1)
    assert replicate["seed"] == own["seed"] == 1 and (replicate["data_seed"], own["data_seed"]) == (0, 1)
    assert train.model_key("m", replicate) != train.model_key("m", own)
    assert V.model_params(on_data[0], "vgg_like", 1) == replicate
    assert V.prepare_synthetic("smoke", 3, n_train=8, n_test=4)["data_seed"] == 3


# ----------------------------------------------------------------------------- ImageNet loader

WNIDS = ["n01440764", "n01443537", "n01484850"]


def _xml(path, filename, width, height, objects):
    body = "".join(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0"
                   f"</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
                   "</bndbox></object>" for name, x0, y0, x1, y1 in objects)
    path.write_text(f"<annotation><folder>val</folder><filename>{filename}</filename><source><database>ILSVRC_2012"
                    f"</database></source><size><width>{width}</width><height>{height}</height><depth>3</depth>"
                    f"</size><segmented>0</segmented>{body}</annotation>")


@pytest.fixture
def imagenet_root(tmp_path):
    """ILSVRC2012-style fixture: class folders of JPEGs, a flat folder of bbox_val XMLs, a synset file."""
    (tmp_path / "val").mkdir()
    (tmp_path / "bbox").mkdir()
    (tmp_path / "LOC_synset_mapping.txt").write_text("\n".join(f"{w} some name, other" for w in reversed(WNIDS)))
    specs = [  # stem, wnid, width, height, objects
        ("ILSVRC2012_val_00000001", WNIDS[0], 500, 375, [(WNIDS[0], 0, 0, 500, 375)]),
        ("ILSVRC2012_val_00000002", WNIDS[2], 400, 600, [(WNIDS[2], 150, 250, 250, 350), (WNIDS[1], 0, 0, 40, 40)]),
        ("ILSVRC2012_val_00000003", WNIDS[2], 300, 300, [(WNIDS[2], 10, 10, 100, 100)]),
    ]
    for stem, wnid, width, height, objects in specs:
        folder = tmp_path / "val" / wnid
        folder.mkdir(exist_ok=True)
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[:, : width // 2, 0] = 255  # left half red, right half blue
        pixels[:, width // 2:, 2] = 255
        Image.fromarray(pixels).save(folder / f"{stem}.JPEG", quality=95)
        _xml(tmp_path / "bbox" / f"{stem}.xml", stem, width, height, objects)
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(tmp_path / "val" / WNIDS[0] / "no_annotation.JPEG")
    return tmp_path


def test_box_transform_invariants():
    full = imagenet.transform_boxes([0, 0, 500, 375], 500, 375)
    assert full.tolist() == [[0, 0, 224, 224]]
    centred = imagenet.transform_boxes([200, 137.5, 300, 237.5], 500, 375)[0]
    assert (centred[0] + centred[2]) / 2 == pytest.approx(112) and (centred[1] + centred[3]) / 2 == pytest.approx(112)
    r, sx, sy = imagenet.crop_geometry(500, 375)
    assert r == pytest.approx(256 / 375) and sx == pytest.approx((500 * r - 224) / 2) and sy == pytest.approx(16)


def test_parse_annotation_reads_size_and_objects(imagenet_root):
    note = imagenet.parse_annotation(imagenet_root / "bbox" / "ILSVRC2012_val_00000002.xml")
    assert (note["width"], note["height"]) == (400, 600)
    assert note["objects"] == [(WNIDS[2], 150.0, 250.0, 250.0, 350.0), (WNIDS[1], 0.0, 0.0, 40.0, 40.0)]
    bad = imagenet_root / "bad.xml"
    bad.write_text("<annotation><object><name>n01440764</name></object></annotation>")
    with pytest.raises(ValueError, match="size"):
        imagenet.parse_annotation(bad)


def test_load_imagenet_boxes_on_the_fixture(imagenet_root):
    out = imagenet.load_imagenet_boxes(imagenet_root, annotations=imagenet_root / "bbox")
    assert out["images"].shape == (3, 3, 224, 224) and out["images"].dtype == np.float32
    assert out["wnids"] == sorted(WNIDS) and out["labels"].tolist() == [0, 2, 2]
    assert out["files"][0].endswith("ILSVRC2012_val_00000001.JPEG")  # the file without an XML is skipped
    assert out["boxes"][0].tolist() == [[0, 0, 0, 224, 224]]
    # 400×600 image: r = 0.64, shift (16, 80); box (150, 250, 250, 350) → (80, 80, 144, 144)
    assert out["boxes"][1].tolist()[0] == [2, 80, 80, 144, 144]
    assert len(out["boxes"][1]) == 1  # the other class's box lies outside the crop: dropped
    # unclipped: 500×375, r = 256/375, shift (58.67, 16): (0, 0, 500, 375) → (−58.67, −16, 282.67, 240)
    assert out["boxes_unclipped"][0].tolist() == [[0, -59, -16, 283, 240]]
    assert out["boxes_unclipped"][1].tolist() == out["boxes"][1].tolist()  # inside the crop: unchanged
    assert out["masks"][1].sum() == 64 * 64 and out["masks"][0].all()
    image = out["images"][0]  # 500×375: centre crop keeps the red/blue split at the middle column
    assert image[0, 112, 20] > 0.9 and image[2, 112, 20] < 0.1 and image[2, 112, 200] > 0.9
    assert out["class_list"] == [WNIDS[0], WNIDS[2]]


def test_load_imagenet_boxes_selection_and_errors(imagenet_root):
    one = imagenet.load_imagenet_boxes(imagenet_root, n_classes=1, seed=0)
    again = imagenet.load_imagenet_boxes(imagenet_root, n_classes=1, seed=0)
    assert one["class_list"] == again["class_list"] and len(one["class_list"]) == 1
    picked = imagenet.load_imagenet_boxes(imagenet_root, class_list=[WNIDS[2]], per_class=1)
    assert picked["labels"].tolist() == [2] and len(picked["files"]) == 1
    with pytest.raises(ValueError, match="class_list"):
        imagenet.load_imagenet_boxes(imagenet_root, class_list=[WNIDS[1]])
    (imagenet_root / "LOC_synset_mapping.txt").unlink()
    with pytest.raises(ValueError, match="WordNet ids"):
        imagenet.load_imagenet_boxes(imagenet_root)
    flat = imagenet.load_imagenet_boxes(imagenet_root, wnids=WNIDS)
    assert flat["labels"].tolist() == [0, 2, 2]
    with pytest.raises(ValueError, match="not a folder"):
        imagenet.load_imagenet_boxes(imagenet_root / "missing")


def test_imagenet_model_rejects_missing_weights_and_unknown_architectures(tmp_path):
    with pytest.raises(ValueError, match="weights_path"):
        imagenet.imagenet_model("resnet50", tmp_path / "none.pth")
    with pytest.raises(ValueError, match="unknown ImageNet architecture"):
        imagenet.imagenet_model("vgg19", tmp_path / "none.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ValueError, match="not a torchvision resnet50"):
        imagenet.imagenet_model("resnet50", bad)


def test_vectorised_correlations_match_the_reference_implementations(tiny):
    from study import metrics

    scores = tiny["evaluation"].scores
    part = scores[(scores["arch"] == "vgg_like") & (scores["map"] == "integrated_gradients") & (scores["kind"] == "metric")]
    wide = part.pivot(index="image", columns="metric", values="score")
    varying = [m for m in V.METRICS if wide[m].nunique() > 1]
    r, kind = V.correlation_matrix(wide[varying])
    expected, kinds = metrics.metric_correlation_matrix({m: wide[m].to_numpy() for m in varying},
                                                        {m: V.HIGHER_IS_BETTER[m] for m in varying},
                                                        binary=[m for m in varying if m in V.BINARY_METRICS],
                                                        return_kinds=True)
    assert np.allclose(r, expected.to_numpy(), atol=1e-9)
    assert (kind == kinds.to_numpy()).all()
    table = pd.DataFrame([[0.3, 0.1, 0.2, 0.4], [0.1, 0.3, 0.2, 0.2], [1.0, 1.0, 1.0, 1.0]])
    tau = V.kendall_tau_matrix(table)
    assert tau[0, 1] == pytest.approx(stats.kendalltau(table.iloc[0], table.iloc[1]).statistic)
    assert tau[0, 0] == pytest.approx(1) and np.isnan(tau[0, 2])


def test_imagenet_path_end_to_end_on_the_fixture(imagenet_root, tmp_path, monkeypatch):
    """prepare_imagenet → evaluation set → maps and grades with a tiny conv net, at a 64-px crop
    (Resize(73) → CenterCrop(64); the pretrained VGG16 / ResNet50 at 224 px are too slow for a unit test)."""
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    prepared = V.prepare_imagenet("smoke", 0, imagenet_root, n_classes=2, n_images=4, steps=2, ig_steps=2,
                                  smoothgrad_samples=2, rise_masks=8, resize=73, crop=64)
    assert prepared["image_size"] == 64 and prepared["num_classes"] == 3 and len(prepared["class_list"]) == 2
    evaluation = V.evaluation_set(prepared, 4)
    assert evaluation["images"].shape == (3, 3, 64, 64)
    assert evaluation["masks"][0].all() and 0 < evaluation["masks"][1].sum() < 64 * 64
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    result = V.score_everything({"tiny": {"model": net, "model_key": "tiny"}}, prepared, seed=0, device="cpu")
    scores = result.scores
    assert not scores["score"].isna().any() and scores["image"].nunique() == 3
    assert "lrp_alpha1beta0" in set(scores["map"])  # a plain Sequential: LRP runs
    gt = scores[(scores["map"] == "ground_truth") & (scores["metric"] == "pointing_game")]
    assert (gt["score"] == 1).all()


# ----------------------------------------------------------------------------- uncertainty and verdict rules


def test_alpha_interval_jackknife_known_answers_and_errors():
    rng = np.random.default_rng(0)
    identical = np.tile(np.arange(6.0), (12, 1))
    assert V.alpha_interval(identical) == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0))
    random = rng.random((40, 6))
    alpha, low, high = V.alpha_interval(random)
    assert low < alpha < high and low < 0 < high  # chance agreement: the interval covers 0
    # the estimate is the ordinal α of the ranks, and the interval uses leave-one-image-out values only
    assert alpha == pytest.approx(krippendorff.alpha(reliability_data=stats.rankdata(random, axis=1),
                                                     level_of_measurement="ordinal"))
    n = 40
    pseudo = [n * alpha - (n - 1) * krippendorff.alpha(reliability_data=stats.rankdata(np.delete(random, i, 0), axis=1),
                                                       level_of_measurement="ordinal") for i in range(n)]
    ci = stats.ttest_1samp(pseudo, 0).confidence_interval()
    assert (low, high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    agree = np.tile(np.arange(6.0), (30, 1)) + rng.normal(0, 0.3, (30, 6))
    assert V.alpha_interval(agree)[1] > 0.667  # mostly identical rankings: the interval clears the threshold
    with pytest.raises(ValueError, match="images ≥ 3"):
        V.alpha_interval(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        V.alpha_interval(np.array([[1.0, np.nan], [1, 2], [2, 1]]))


def _per_map_correlation_medians(cube, names, index):
    """The correlation statistic by its definition: per map, the correlations of the metrics that vary."""
    with_pg, other = [], []
    for k in range(cube.shape[2]):
        wide = pd.DataFrame(cube[index, :, k], columns=names)
        varying = [m for m in names if wide[m].nunique() > 1]
        r, _ = V.correlation_matrix(wide[varying])
        for a in range(len(varying)):
            for b in range(a + 1, len(varying)):
                pg = "pointing_game" in (varying[a], varying[b])
                (with_pg if pg else other).append(abs(r[a, b]))
    return np.median(with_pg), np.median(with_pg) - np.median(other)


def test_correlation_statistic_matches_the_summary_and_the_per_map_definition(tiny):
    for arch in ("vgg_like", "resnet_like"):
        cube, names, _ = V.metric_cube(tiny["evaluation"].scores, arch)
        statistic = V._correlation_statistic(cube, names)
        summary = tiny["tables"]["correlation_summary"].set_index("arch").loc[arch]
        pg, gap = statistic(np.arange(cube.shape[0]))
        assert pg == pytest.approx(summary["median_abs_r_pointing_game"], abs=1e-12)
        assert gap == pytest.approx(summary["median_abs_r_pointing_game"] - summary["median_abs_r_other_pairs"],
                                    abs=1e-12)
        resample = np.random.default_rng(1).integers(0, cube.shape[0], cube.shape[0])  # repeated images: ties
        assert statistic(resample) == pytest.approx(_per_map_correlation_medians(cube, names, resample), abs=1e-12)


def test_correlations_carry_fisher_intervals(tiny):
    correlations = tiny["tables"]["correlations"]
    off = correlations[correlations["metric_a"] != correlations["metric_b"]]
    assert {"r_low", "r_high"} <= set(correlations.columns)
    assert ((off["r_low"] <= off["r"] + 1e-9) & (off["r"] <= off["r_high"] + 1e-9)).all()
    for kind, spearman in (("spearman", True), ("point-biserial", False)):  # Spearman's SE, Pearson's
        row = off[(off["correlation"] == kind) & (off["r"].abs() < 0.99)].iloc[0]
        expected = correlation_interval(row["r"], SIZES["n_images"], spearman=spearman)
        assert (row["r_low"], row["r_high"]) == pytest.approx(expected, abs=1e-12)


def test_reliability_and_tau_intervals_of_the_run(tiny):
    rel = tiny["tables"]["reliability"].dropna(subset=["alpha_low"])
    assert len(rel) > 0 and (rel["alpha_low"] <= rel["alpha_high"]).all()
    taus = tiny["tables"]["tau_intervals"]
    agreement = tiny["tables"]["agreement"]
    row = taus.dropna().iloc[0]
    full = agreement[(agreement["arch"] == row["arch"]) & (agreement["metric_a"] == row["metric_a"]) &
                     (agreement["metric_b"] == row["metric_b"])]["tau"].iloc[0]
    assert row["tau"] == pytest.approx(full)  # the bootstrap's estimate is the table's τ
    intervals = tiny["tables"]["intervals"]
    expected = {"mean_tau", "min_tau", "min_tau_baseline", "median_abs_r_pg", "pg_minus_other", "drop_gap_soft",
                "drop_gap_ratio", "gt_pg_margin", "sparsity_rho_drop", *(f"blur_drop_gain:{b}" for b in V.MANIPULATED)}
    assert set(intervals["statistic"]) == expected
    assert len(intervals) == 2 * len(expected)


def test_sparsity_vs_grades_is_within_method():
    """Two methods whose grades differ only between methods: pooled, Gini would predict Drop perfectly;
    within each method, Drop rises with Gini for one and falls for the other."""
    rows = []
    for name, offset, slope in (("integrated_gradients", 0.8, 1.0), ("gradcam", 0.2, -1.0)):
        for image in range(8):
            gini = offset + 0.01 * image
            rows += [{"arch": "a", "map": name, "image": image, "metric": "gini", "score": gini},
                     {"arch": "a", "map": name, "image": image, "metric": "frac_below", "score": gini},
                     {"arch": "a", "map": name, "image": image, "metric": "average_drop",
                      "score": 50 + 40 * (offset - 0.5) + slope * image}]
    scores = pd.DataFrame(rows)
    within = V.sparsity_vs_grades(scores, grades=("average_drop",))
    rho = within[within["descriptor"] == "gini"].set_index("map")["rho"]
    assert rho["integrated_gradients"] == pytest.approx(1) and rho["gradcam"] == pytest.approx(-1)
    summary = V.sparsity_grade_summary(within)
    row = summary[summary["descriptor"] == "gini"].iloc[0]
    assert row["mean_rho"] == pytest.approx(0) and row["n_methods"] == 2
    pooled = stats.spearmanr(scores.loc[scores["metric"] == "gini", "score"],
                             scores.loc[scores["metric"] == "average_drop", "score"]).statistic
    assert pooled > 0.5  # what the pooled version measured: the difference between the methods
    with pytest.raises(ValueError, match="no scores"):
        V.sparsity_vs_grades(scores, maps=("rise",))


def test_combine_verdicts():
    assert V.combine_verdicts(["reproduced", "reproduced"]) == "reproduced"
    assert V.combine_verdicts(["not reproduced"] * 3) == "not reproduced"
    assert V.combine_verdicts(["reproduced", "inconclusive"]) == "partly reproduced"
    assert V.combine_verdicts(["reproduced", "not reproduced"]) == "partly reproduced"
    assert V.combine_verdicts(["not reproduced", "inconclusive"]) == "inconclusive"
    with pytest.raises(ValueError, match="non-empty"):
        V.combine_verdicts([])
    with pytest.raises(ValueError, match="non-empty"):
        V.combine_verdicts(["partly reproduced"])


def _intervals(statistic, *bounds, n=24, unit="images"):
    """An intervals table with one row per (estimate, low, high) in `bounds`, one arch each."""
    return pd.DataFrame([{"arch": f"arch{k}", "statistic": statistic, "estimate": (low + high) / 2, "low": low,
                          "high": high, "n": n, "unit": unit, "method": "test"} for k, (low, high) in enumerate(bounds)])


def _verdict_of(step, tables):
    return step(tables)["verdict"]


def _cube(values_a, values_b):
    """One model's (images × 2 metrics × maps) cube: Deletion (zero, pixel) and soft Drop, lower is better."""
    return np.stack([np.asarray(values_a, float), np.asarray(values_b, float)], axis=1)


def test_method_reversals_known_answer():
    wiggle = np.tile([0.01, -0.01], 5)[:, None]
    # Grad-CAM deletes faster (0.2 vs 0.4: better) but drops more (60 vs 40 %: worse) on every image of both models
    cubes = [_cube(np.array([0.2, 0.4]) + wiggle, np.array([60.0, 40.0]) + 100 * wiggle * [1, -1])] * 2
    table = V.method_reversals(cubes, list(V.OPPOSING_PAIR), ["gradcam", "rise"], [V.OPPOSING_PAIR])
    row = table.iloc[0]
    assert row["reversed"] and row["point_reversed"] and row["models_agreeing"] == 2
    assert row["mean_a"] == pytest.approx(0.2) and row["mean_b"] == pytest.approx(-20.0)  # sign-aligned: higher better
    ci = stats.ttest_1samp(np.tile(cubes[0][:, 1, 1] - cubes[0][:, 1, 0], 2), 0).confidence_interval(0.95)
    assert (row["low_b"], row["high_b"]) == pytest.approx((ci.low, ci.high))
    assert row["n_images"] == 20 and row["n_models"] == 2 and row["comparisons"] == 1 and row["level"] == pytest.approx(0.95)
    with pytest.raises(ValueError, match="one .images"):
        V.method_reversals([cubes[0][:, :1]], list(V.OPPOSING_PAIR), ["gradcam", "rise"], [V.OPPOSING_PAIR])
    with pytest.raises(ValueError, match="metric pairs"):
        V.method_reversals(cubes, list(V.OPPOSING_PAIR), ["gradcam", "rise"], [("average_drop", "pointing_game")])
    with pytest.raises(ValueError, match="level"):
        V.method_reversals(cubes, list(V.OPPOSING_PAIR), ["gradcam", "rise"], [V.OPPOSING_PAIR], level=1.0)


def test_method_reversals_under_the_null_rarely_find_one():
    # one curve under two baselines that change nothing: equal method means, independent per-image noise
    rng = np.random.default_rng(0)
    names, maps = ["deletion_zero_region", "deletion_uniform_region"], ["gradcam", "occlusion", "rise"]
    found = [V.method_reversals([rng.normal(0.3, 0.05, size=(24, 2, 3)) for _ in range(3)], names, maps,
                                [tuple(names)])["reversed"].any() for _ in range(200)]
    assert np.mean(found) <= 0.02  # family-wise error at most 5% (the intersection–union test is conservative)
    shifted = [rng.normal(0.3, 0.05, size=(24, 2, 3)) + [[0.0] * 3, [0.1] * 3] for _ in range(3)]
    assert not V.method_reversals(shifted, names, maps, [tuple(names)])["reversed"].any()  # a shift is no reversal


def _reversals(*per_arch):
    """A reversal table: per architecture, a list of (reversed, point_reversed) comparisons."""
    return pd.DataFrame([{"arch": f"arch{k}", "metric_a": "deletion_zero_pixel", "metric_b": "average_drop",
                          "map_i": "gradcam", "map_j": "rise", "mean_a": 0.1, "low_a": 0.05, "high_a": 0.15,
                          "mean_b": -5.0 if point else 5.0, "low_b": -8.0 if flipped else -2.0,
                          "high_b": -2.0 if flipped else 8.0, "reversed": flipped, "point_reversed": point,
                          "models_agreeing": 3, "n_images": 72, "n_models": 3, "comparisons": len(rows),
                          "level": 0.99} for k, rows in enumerate(per_arch) for flipped, point in rows])


@pytest.mark.parametrize("case, expected", [("pass", "reproduced"), ("fail", "not reproduced"),
                                            ("straddle", "inconclusive"), ("mixed", "partly reproduced")])
def test_reversal_rules_of_baseline_and_opposing(case, expected):
    per_arch = {"pass": [[(False, True), (True, True)], [(True, True)]],
                "fail": [[(False, False)] * 2, [(False, False)]],          # no pair even reversed in its means
                "straddle": [[(False, True), (False, False)], [(False, True)]],
                "mixed": [[(True, True)], [(False, False)]]}[case]
    table = _reversals(*per_arch)
    summary = pd.DataFrame({"arch": ["arch0", "arch1"], "share_negative": [0.4, 0.3]})
    tau = {"intervals": pd.concat([_intervals("min_tau", (-0.5, 0.1), (-0.5, 0.1)),
                                   _intervals("min_tau_baseline", (0.1, 0.5), (0.1, 0.5))])}
    assert _verdict_of(V._baseline, {**tau, "reversals_baseline": table}) == expected
    assert _verdict_of(V._opposing, {**tau, "reversals_opposing": table, "correlation_summary": summary}) == expected
    row = V._baseline({**tau, "reversals_baseline": table})
    assert "Bonferroni" in row["uncertainty"] and "72 images (3 models)" in row["n"]
    if case == "pass":
        assert "arch0 1 of 2 reversed" in row["this_run"] and "same signs in 3 of 3 models" in row["this_run"]
    assert "Bonferroni" in V.RULES["baseline"] and "Deletion (zero, pixel)" in V.RULES["opposing"]


def _margins(*bounds):
    return pd.DataFrame([{"arch": "arch0", "metric": metric, "dummy": "random", "method": "gradcam",
                          "estimate": (low + high) / 2, "low": low, "high": high, "n": 24}
                         for metric, (low, high) in zip(V.METRICS, bounds)])


@pytest.mark.parametrize("case, expected", [("pass", "reproduced"), ("fail", "not reproduced"),
                                            ("straddle", "inconclusive")])
def test_dummies_rule_needs_a_margin(case, expected):
    rest = [(-0.3, -0.1)] * (len(V.METRICS) - 1)
    first = {"pass": (0.08, 0.2), "fail": (0.001, 0.04), "straddle": (0.02, 0.2)}[case]  # a tiny win fails
    assert _verdict_of(V._dummies, {"dummy_margins": _margins(first, *rest)}) == expected
    assert "0.05" in V.RULES["dummies"]


@pytest.mark.parametrize("case, expected", [("pass", "reproduced"), ("fail", "not reproduced"),
                                            ("straddle", "inconclusive")])
def test_sparsity_within_rule(case, expected):
    bounds = {"pass": [(0.3, 0.7)], "fail": [(-0.4, 0.1)], "straddle": [(0.0, 0.5)]}[case]
    within = pd.DataFrame([{"arch": "arch0", "map": "gradcam", "grade": "average_drop", "descriptor": "gini",
                            "rho": 0.4, "n_images": 24}])
    tables = {"intervals": _intervals("sparsity_rho_drop", *bounds, n=6, unit="methods"),
              "sparsity_vs_grades": within}
    assert _verdict_of(V._sparsity_within, tables) == expected


def _reliability(*bounds):
    return pd.DataFrame([{"arch": "arch0", "metric": metric, "n_images": 24, "n_maps": 7, "alpha": (low + high) / 2,
                          "alpha_low": low, "alpha_high": high} for metric, (low, high) in zip(V.METRICS, bounds)])


@pytest.mark.parametrize("case, expected", [("pass", "reproduced"), ("fail", "not reproduced"),
                                            ("straddle", "inconclusive")])
def test_coherence_rule_reads_alpha_intervals(case, expected):
    k = len(V.METRICS)
    bounds = {"pass": [(0.1, 0.5)] * (k // 2 + 1) + [(0.7, 0.9)] * (k - k // 2 - 1),
              "fail": [(0.7, 0.9)] * (k // 2) + [(0.1, 0.3)] * (k - k // 2),
              "straddle": [(0.5, 0.8)] * k}[case]
    tables = {"reliability": _reliability(*bounds), "intervals": _intervals("mean_tau", (0.1, 0.4))}
    assert _verdict_of(V._coherence, tables) == expected


@pytest.mark.parametrize("case, expected", [("pass", "reproduced"), ("fail", "not reproduced"),
                                            ("straddle", "inconclusive"), ("half", "partly reproduced")])
def test_pointing_game_rule(case, expected):
    pg, diff = {"pass": ((0.05, 0.25), (-0.3, -0.05)), "fail": ((0.35, 0.6), (0.05, 0.2)),
                "straddle": ((0.2, 0.4), (-0.1, 0.1)), "half": ((0.05, 0.25), (0.05, 0.2))}[case]
    intervals = pd.concat([_intervals("median_abs_r_pg", pg), _intervals("pg_minus_other", diff)])
    summary = pd.DataFrame({"arch": ["arch0"], "median_abs_r_other_pairs": [0.3]})
    assert _verdict_of(V._pointing_game, {"intervals": intervals, "correlation_summary": summary}) == expected


@pytest.mark.parametrize("case, expected", [("pass", "reproduced"), ("fail", "not reproduced"),
                                            ("straddle", "inconclusive")])
def test_interval_rules_of_the_other_claims(case, expected):
    """Blur gain (> 5 pp), Drop gap (> 10 pp and ratio < 0.5), GT-box margin (> 0.1)."""
    gain = {"pass": (8.0, 20.0), "fail": (-2.0, 4.0), "straddle": (3.0, 9.0)}[case]
    shift = pd.DataFrame({"rank_change": [0, 1]})
    intervals = pd.concat([_intervals(f"blur_drop_gain:{b}", gain) for b in V.MANIPULATED])
    assert _verdict_of(V._sparsity_sways, {"intervals": intervals, "shift": shift}) == expected
    gap, ratio = {"pass": ((15.0, 30.0), (0.1, 0.4)), "fail": ((-5.0, 8.0), (0.6, 0.9)),
                  "straddle": ((5.0, 20.0), (0.3, 0.7))}[case]
    intervals = pd.concat([_intervals("drop_gap_soft", gap), _intervals("drop_gap_ratio", ratio)])
    gaps = pd.DataFrame({"arch": ["arch0"], "gap_average_drop_binarised": [5.0]})
    assert _verdict_of(V._binarising, {"intervals": intervals, "drop_gaps": gaps}) == expected
    margin = {"pass": (0.2, 0.5), "fail": (0.0, 0.05), "straddle": (0.05, 0.3)}[case]
    ranks = pd.DataFrame({"ground_truth": [1.0, 3.0]},
                         index=pd.MultiIndex.from_tuples([("arch0", "pointing_game"), ("arch0", "deletion_zero_pixel")],
                                                         names=["arch", "metric"]))
    assert _verdict_of(V._reference, {"intervals": _intervals("gt_pg_margin", margin), "ranks": ranks}) == expected


def test_rule_helpers_reject_missing_statistics():
    with pytest.raises(ValueError, match="no statistic"):
        V._baseline({"intervals": _intervals("min_tau", (0.1, 0.2)), "reversals_baseline": _reversals([(True, True)])})
    with pytest.raises(ValueError, match="reversal table is empty"):
        V._baseline({"intervals": _intervals("min_tau_baseline", (0.1, 0.2)),
                     "reversals_baseline": _reversals([(True, True)]).iloc[:0]})


# ----------------------------------------------------------------------------- ImageNet: target box cropped away


@pytest.fixture
def imagenet_root_cropped(imagenet_root):
    """The fixture plus a wide 600×300 image whose only target-class box (x 0–40) lies left of the crop."""
    stem, wnid = "ILSVRC2012_val_00000004", WNIDS[1]
    folder = imagenet_root / "val" / wnid
    folder.mkdir(exist_ok=True)
    Image.fromarray(np.full((300, 600, 3), 128, np.uint8)).save(folder / f"{stem}.JPEG", quality=95)
    _xml(imagenet_root / "bbox" / f"{stem}.xml", stem, 600, 300, [(wnid, 0, 0, 40, 300)])
    return imagenet_root


def test_loader_drops_and_counts_images_whose_target_box_is_cropped_away(imagenet_root_cropped):
    kept = imagenet.load_imagenet_boxes(imagenet_root_cropped, annotations=imagenet_root_cropped / "bbox")
    assert len(kept["labels"]) == 4 and kept["dropped_no_target_box"] == 0  # default: unchanged (notebook 03)
    assert not kept["masks"][kept["labels"] == 1].any()  # the image that crashed the pointing game
    out = imagenet.load_imagenet_boxes(imagenet_root_cropped, annotations=imagenet_root_cropped / "bbox",
                                       require_target_box=True)
    assert out["dropped_no_target_box"] == 1 and out["dropped_files"][0].endswith("ILSVRC2012_val_00000004.JPEG")
    assert out["labels"].tolist() == [0, 2, 2] and len(out["boxes"]) == len(out["boxes_unclipped"]) == 3
    assert out["images"].shape[0] == out["masks"].shape[0] == 3 and out["masks"].any(axis=(1, 2, 3)).all()
    with pytest.raises(ValueError, match="require_target_box"):
        imagenet.load_imagenet_boxes(imagenet_root_cropped, require_target_box="yes")
    with pytest.raises(ValueError, match="none of the 1 picked images"):
        imagenet.load_imagenet_boxes(imagenet_root_cropped, class_list=[WNIDS[1]], require_target_box=True)


def test_imagenet_path_with_a_cropped_box_does_not_crash(imagenet_root_cropped, tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    prepared = V.prepare_imagenet("smoke", 0, imagenet_root_cropped, class_list=[WNIDS[0], WNIDS[1], WNIDS[2]],
                                  n_images=6, steps=2, ig_steps=2, smoothgrad_samples=2, rise_masks=8, resize=73,
                                  crop=64)
    assert prepared["dropped_no_target_box"] == 1 and len(prepared["test"]["labels"]) == 3
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    scores = V.score_everything({"tiny": {"model": net, "model_key": "tiny"}}, prepared, seed=0, device="cpu").scores
    pg = scores[(scores["map"] == "ground_truth") & (scores["metric"] == "pointing_game")]
    assert len(pg) == 3 and (pg["score"] == 1).all()
    # a dataset that still holds such an image (another source) is guarded in evaluation_set
    raw = imagenet.load_imagenet_boxes(imagenet_root_cropped, class_list=[WNIDS[0], WNIDS[1]], resize=73, crop=64)
    guarded = V.evaluation_set({**prepared, "test": raw}, 10)
    assert len(guarded["labels"]) == 1 and guarded["masks"].flatten(1).any(1).all()


def test_lrp_is_the_cards_rule_zb_on_the_first_layer_with_the_standardised_pixel_range(tiny):
    """Card §3: LRP α1β0 with the zB rule on the first layer, whose bounds are the lowest and highest
    standardised value a [0, 1] pixel can take, (0 − mean)/std and (1 − mean)/std per channel."""
    prepared = tiny["prepared"]
    evaluation = V.evaluation_set(prepared, 3)
    mean, std = np.asarray(prepared["mean"]), np.asarray(prepared["std"])
    assert torch.allclose(evaluation["input_low"][:, :, 0, 0], torch.as_tensor(-mean / std, dtype=torch.float32).expand(3, -1))
    assert torch.allclose(evaluation["input_high"][:, :, 0, 0], torch.as_tensor((1 - mean) / std, dtype=torch.float32).expand(3, -1))
    model = tiny["runs"]["vgg_like"]["model"]
    maps = V.compute_maps(model, evaluation, SIZES, seed=0)
    steps = V.postprocessing(evaluation["images"].shape[-1])["base"]
    zb = attribution.explain(model, evaluation["images"], evaluation["labels"], "deep_taylor", reduce=None,
                   low=evaluation["input_low"][:1], high=evaluation["input_high"][:1])
    plain = attribution.explain(model, evaluation["images"], evaluation["labels"], "lrp_alpha1beta0", reduce=None)
    assert torch.allclose(maps["lrp_alpha1beta0"][1], attribution.postprocess(zb, steps), atol=1e-6)
    assert not torch.allclose(maps["lrp_alpha1beta0"][1], attribution.postprocess(plain, steps), atol=1e-3)
    without = {k: v for k, v in evaluation.items() if k != "input_low"}
    with pytest.raises(ValueError, match="input_low"):
        V.compute_maps(model, without, SIZES, seed=0)


def test_an_undefined_interval_is_explained_and_inconclusive():
    undefined = _intervals("median_abs_r_pg", (np.nan, np.nan)).assign(estimate=0.19)
    intervals = pd.concat([undefined, _intervals("pg_minus_other", (-0.1, 0.1))])
    summary = pd.DataFrame({"arch": ["arch0"], "median_abs_r_other_pairs": [0.3]})
    row = V._pointing_game({"intervals": intervals, "correlation_summary": summary})
    assert row["verdict"] == "inconclusive"
    assert "[nan" not in row["this_run"] and "0.19 [undefined: the statistic is NaN in some resamples" in row["this_run"]
    assert "undefined" in row["uncertainty"]


# ----------------------------------------------------------------------------- verdicts over several trained models


def _model_tables(min_tau_baseline, margin, alpha, dummy="random"):
    """One model's verdict tables: one arch, one statistic, one dummy margin, one α."""
    return {"intervals": pd.DataFrame([{"arch": "arch0", "statistic": "min_tau_baseline", "estimate": min_tau_baseline,
                                        "low": -1.0, "high": 1.0, "n": 24, "unit": "images", "method": "basic"}]),
            "dummy_margins": pd.DataFrame([{"arch": "arch0", "metric": "average_drop", "dummy": dummy,
                                            "method": "smoothgrad", "estimate": margin, "low": 0.0, "high": 1.0,
                                            "n": 24}]),
            "reliability": pd.DataFrame([{"arch": "arch0", "metric": "average_drop", "n_images": 24, "n_maps": 7,
                                          "alpha": alpha, "alpha_low": 0.0, "alpha_high": 1.0,
                                          "alpha_authors_variant": alpha / 2}])}


def test_over_models_takes_the_t_interval_over_models():
    per_model = [_model_tables(0.1, 0.2, 0.5), _model_tables(0.3, 0.4, 0.9, dummy="sobel"),
                 _model_tables(0.2, np.nan, 0.7)]
    combined = V.over_models(per_model)
    row = combined["intervals"].iloc[0]
    expected = stats.ttest_1samp([0.1, 0.3, 0.2], 0).confidence_interval(0.95)
    # by hand: mean 0.2, sd 0.1, t(0.975, 2) = 4.303 → 0.2 ± 4.303 · 0.1 / √3 = [−0.048, 0.448]
    assert row["estimate"] == pytest.approx(0.2) and row["low"] == pytest.approx(-0.0484, abs=1e-3)
    assert (row["low"], row["high"]) == pytest.approx((expected.low, expected.high))
    assert row["n"] == 3 and row["unit"] == "models (24 images each)" and row["method"] == "t"
    margin = combined["dummy_margins"].iloc[0]  # the undefined margin of model 2 is left out, not read as 0
    assert margin["n"] == 2 and margin["estimate"] == pytest.approx(0.3)
    assert (margin["low"], margin["high"]) == pytest.approx(
        tuple(stats.ttest_1samp([0.2, 0.4], 0).confidence_interval(0.95)))
    assert margin["dummy"] in ("random", "sobel") and margin["method"] == "smoothgrad"
    alpha = combined["reliability"].iloc[0]
    assert alpha["alpha"] == pytest.approx(0.7) and alpha["n_models"] == 3 and alpha["reading"] == "tentative"
    assert alpha["alpha_authors_variant"] == pytest.approx(0.35)
    assert len(combined["per_model"]) == 9 and set(combined["per_model"]["model"]) == {0, 1, 2}


def test_over_models_with_one_defined_value_is_inconclusive_and_needs_two_models():
    combined = V.over_models([_model_tables(0.1, np.nan, 0.5), _model_tables(0.2, np.nan, 0.5)])
    margin = combined["dummy_margins"].iloc[0]
    assert margin["n"] == 0 and np.isnan(margin["low"]) and np.isnan(margin["high"])
    assert V._side(margin["low"], margin["high"], 0.05, True) == "inconclusive"
    with pytest.raises(ValueError, match="at least 2 models"):
        V.over_models([_model_tables(0.1, 0.2, 0.5)])


def test_over_models_keeps_tau_intervals_in_tau_range():
    row = V.over_models([_model_tables(v, 0.2, 0.5) for v in (-0.95, -0.2, 0.95)])["intervals"].iloc[0]
    assert row["statistic"] in V.TAU_STATISTICS and (row["low"], row["high"]) == (-1.0, 1.0)  # t: ±1.6 beyond


def test_findings_over_models_say_so(tiny):
    again = V.Evaluation(tiny["evaluation"].scores, tiny["evaluation"].curves, tiny["evaluation"].densities)
    tables = V.analyse(tiny["evaluation"], replicates=[again])
    assert set(tables["intervals_first_model"]["statistic"]) == set(tables["intervals"]["statistic"])
    assert (tables["intervals"]["n"] == 2).all()
    alpha = tables["reliability"]  # an α undefined for the (untrained) model is undefined for both copies
    assert (alpha["n_models"] == np.where(alpha["alpha"].isna(), 0, 2)).all()
    same = tables["intervals"].merge(tables["intervals_first_model"], on=["arch", "statistic"])
    # two identical models: the mean is the model's estimate (NaN where undefined in both)
    assert np.allclose(same["estimate_x"], same["estimate_y"], equal_nan=True)
    rows = V.findings(tables)
    assert len(rows) == 9 and all("t interval over the models" in r["this_run"] for r in rows
                                  if r["verdict"] != "not tested")
    assert "2 models × 4 images × 12 metrics" in rows[0]["n"]


def test_evaluation_set_takes_a_block_of_test_images(tiny):
    whole = V.evaluation_set(tiny["prepared"], 6)
    block = V.evaluation_set(tiny["prepared"], 2, first_image=3)
    assert len(whole["labels"]) == 6  # every image has its box: none dropped
    assert torch.equal(block["images"], whole["images"][3:5]) and torch.equal(block["masks"], whole["masks"][3:5])
    for bad in (-1, 6, 1.5, True):
        with pytest.raises(ValueError, match="first_image"):
            V.evaluation_set(tiny["prepared"], 2, first_image=bad)


def test_score_replicates_trains_other_seeds_on_other_images(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    prepared = V.prepare_synthetic("smoke", 0, n_train=32, n_test=8, n_images=3, n_models=2, rise_masks=8)
    replicates = V.score_replicates(prepared, 0, device="cpu", cache_dir=tmp_path)
    assert len(replicates) == 1
    scores = replicates[0].scores
    assert set(scores["arch"]) == set(V.ARCHITECTURES) and scores["image"].nunique() == 3
    first = V.score_everything(V.train_models(prepared, 0, "cpu"), prepared, 0, device="cpu", cache_dir=tmp_path)
    assert not np.allclose(first.scores["score"].to_numpy(), scores["score"].to_numpy())
    assert V.score_replicates({**prepared, "settings": {**prepared["settings"], "n_models": 1}}, 0) == []
    assert V.score_replicates({**prepared, "train": None}, 0) == []  # a given model: nothing to retrain
    with pytest.raises(ValueError, match="raise n_test"):
        V.score_replicates({**prepared, "settings": {**prepared["settings"], "n_models": 3}}, 0)
    with pytest.raises(ValueError, match="n_models"):
        V.score_replicates({**prepared, "settings": {**prepared["settings"], "n_models": 0}}, 0)
