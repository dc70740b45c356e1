"""Notebook 03 steps (Phang et al. 2020): the LE/OM/F1/SM protocol end to end on hand-made masks and
boxes, the experiment steps at smoke size, the computed verdicts, and the real-data path on a fake
ImageNet folder."""

import study  # noqa: F401  (must precede torchvision imports)

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from study import config, findings
from study.experiments import phang2020 as P


pytestmark = pytest.mark.usefixtures("one_thread")


class ConstantClassifier(nn.Module):
    """Logits log(0.5, 0.25, 0.25) for every input: p(class 0) = 0.5 on any crop."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.log(torch.tensor([0.5, 0.25, 0.25])))

    def forward(self, x):
        return self.bias.expand(len(x), 3)


def rectangle(size, x0, y0, x1, y1, value=1.0):
    m = torch.zeros(1, size, size)
    m[:, y0:y1, x0:x1] = value
    return m


# ----------------------------------------------------------------------------- the E7 protocol by hand


def test_box_protocol_on_hand_made_masks_and_boxes():
    size = 16
    gt = [np.array([[2, 2, 10, 10]])] * 4
    masks = torch.stack([
        rectangle(size, 2, 2, 10, 10),  # exactly the GT box
        rectangle(size, 2, 2, 10, 10) + rectangle(size, 12, 12, 14, 14),  # plus a smaller blob: same box
        rectangle(size, 11, 0, 16, 16),  # a larger blob off the object
        torch.full((1, size, size), 0.5),  # constant: empty binarisation
    ])
    labels = torch.tensor([0, 0, 0, 0])
    predicted = torch.tensor([0, 1, 0, 0])  # image 1 misclassified
    images = torch.randn(4, 3, size, size)
    table = P.evaluate_masks(masks, predicted, labels, gt, images, ConstantClassifier())
    assert table["le"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert table["om"].tolist() == [0.0, 1.0, 1.0, 1.0]  # OM ≥ LE, and = 1 where the class is wrong
    assert (table["om"] >= table["le"]).all()
    assert table.loc[0, "f1"] == pytest.approx(1.0, abs=1e-5)
    # image 1: P = 64/68, R = 1
    precision = 64 / 68
    assert table.loc[1, "f1"] == pytest.approx(2 * precision / (precision + 1), abs=1e-5)
    assert table.loc[2, "f1"] == 0.0
    # SM = log(max(a, 0.05)) − log p with p = 0.5 from the constant classifier
    assert table.loc[0, "box_area"] == pytest.approx(64 / 256)
    assert table.loc[0, "sm"] == pytest.approx(math.log(0.25) - math.log(0.5))
    assert table.loc[3, "box_area"] == 0.0
    assert table.loc[3, "sm1"] == pytest.approx(math.log(0.05))
    assert table.loc[3, "sm"] == pytest.approx(math.log(0.05) - math.log(0.5))
    # mask statistics
    assert table.loc[0, "avg_mask"] == pytest.approx(0.25)
    assert table.loc[3, "binarized"] == 0.0 and table.loc[3, "tv"] == 0.0
    assert table.loc[3, "entropy"] == pytest.approx(0.5)  # −0.5·log2(0.5) per pixel
    assert table.loc[0, "entropy"] == 0.0
    summary = P.summarise(table)
    assert summary["LE"] == pytest.approx(50.0) and summary["OM"] == pytest.approx(75.0)
    assert summary["SM"] == pytest.approx(summary["SM1"] - summary["SM2"])


def test_ground_truth_and_full_image_boxes_through_evaluate_boxes():
    size = 20
    gt = [np.array([[3, 4, 12, 15]]), np.array([[0, 0, 5, 5], [8, 8, 20, 20]])]
    truth = np.stack([g[0] for g in gt])
    images = torch.randn(2, 3, size, size)
    labels = torch.tensor([0, 0])
    masks = torch.cat([P.box_masks(b, 1, size, size) for b in truth])
    table = P.evaluate_boxes(truth, masks, labels, labels, gt, images, ConstantClassifier())
    assert table["le"].tolist() == [0.0, 0.0]
    assert table["f1"].to_numpy() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert table.loc[1, "f1a"] < table.loc[1, "f1"]  # the mean over the two boxes
    full = np.tile([0, 0, size, size], (2, 1))
    table = P.evaluate_boxes(full, P.box_masks([0, 0, size, size], 2, size, size), labels, labels, gt, images,
                             ConstantClassifier())
    assert table["sm1"].tolist() == [0.0, 0.0]
    assert table["box_area"].tolist() == [1.0, 1.0]
    # card Q5: LE uses the unclamped GT box. Clipped to the image it matches the full box (IoU 1);
    # unclamped it is 3× larger per side: IoU = 20² / 60² = 1/9 < 0.5, so the box is a miss.
    clipped = [np.array([[0, 0, size, size]])] * 2
    unclamped = [np.array([[-size, -size, 2 * size, 2 * size]])] * 2
    plain = P.evaluate_boxes(full, masks, labels, labels, clipped, images, ConstantClassifier())
    q5 = P.evaluate_boxes(full, masks, labels, labels, clipped, images, ConstantClassifier(), iou_gt_boxes=unclamped)
    assert plain["le"].tolist() == [0.0, 0.0] and q5["le"].tolist() == [1.0, 1.0]
    assert q5["f1"].tolist() == plain["f1"].tolist()  # F1 still uses the boxes inside the image
    with pytest.raises(ValueError, match="IoU GT box set"):
        P.evaluate_boxes(full, masks, labels, labels, clipped, images, ConstantClassifier(), iou_gt_boxes=unclamped[:1])


def test_crop_probabilities_resize_the_box_to_the_image():
    class MeanOfChannel0(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            mean = x[:, 0].mean(dim=(1, 2))
            return torch.stack([mean * 10, torch.zeros_like(mean)], 1) + self.w

    images = torch.zeros(1, 3, 8, 8)
    images[0, 0, :4, :4] = 1.0
    inside, _ = P.crop_probabilities(MeanOfChannel0(), images, np.array([[0, 0, 4, 4]]), torch.tensor([0]))
    outside, _ = P.crop_probabilities(MeanOfChannel0(), images, np.array([[4, 4, 8, 8]]), torch.tensor([0]))
    assert inside[0] == pytest.approx(1 / (1 + math.exp(-10)), rel=1e-4)
    assert outside[0] == pytest.approx(0.5)


def test_evaluate_boxes_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        P.evaluate_boxes(np.zeros((2, 4)), torch.zeros(3, 1, 8, 8), [0, 0], [0, 0], [np.zeros((1, 4))] * 2,
                         torch.zeros(2, 3, 8, 8), ConstantClassifier())
    with pytest.raises(ValueError):
        P.summarise(pd.DataFrame())


# ----------------------------------------------------------------------------- settings and rows


def test_settings_and_row_specs():
    s = P.experiment_settings("smoke", rows=["S3", "S6"])
    assert s["rows"] == {"S3": 1, "S6": 1}
    assert P.row_spec("S3", s).lambda_out == 10.0 and P.row_spec("S3", s).fixed
    spec = P.row_spec("S6", s)
    assert spec.lambda_out == 15.0 and spec.classifier_mode == "ca" and spec.historic_probability == 0.5
    assert P.row_spec("S8", s).gumbel_tau == 0.1 and P.row_spec("S9", s).infiller == "blur"
    assert P.row_spec("S10", s).layers == ("l0", "l1", "l2", "l3", "l4")
    assert P.row_spec("S1", s).out_kind is None and P.row_spec("S2", s).in_kind is None
    assert P.row_spec("S7", s).out_kind == "ce"
    for bad in ({"rows": ["S11"]}, {"rows": {"S3": 0}}, {"steps_per_row": 3}):
        with pytest.raises(ValueError):
            P.experiment_settings("smoke", **bad)
    with pytest.raises(ValueError):
        P.experiment_settings("smoke", rows=["S6"])  # the few-shot row S3 must be in the grid
    assert config.PROFILES["smoke"]["phang2020"]["rows"]["S1"] == 1  # the profile itself is not modified


# ----------------------------------------------------------------------------- the steps at smoke size


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    original = config.CACHE_DIR
    config.CACHE_DIR = cache
    try:
        s = P.experiment_settings("smoke", rows={"S1": 1, "S3": 2, "S6": 1}, n_fong=4)
        d = P.load_data(s, 0)
        clf = P.train_classifier(d, s, device="cpu")
        baselines, maps = P.baseline_results(clf, d, s, device="cpu")
        tv, _ = P.tune_tv(clf, d, s)
        runs, grid = P.train_grid(clf, d, s, tv, device="cpu")
        _, again = P.train_grid(clf, d, s, tv, device="cpu")
        table = P.ablation_table(grid, baselines)
        curve = P.few_shot(clf, d, s, tv, grid, device="cpu")
        leak = P.leak_check({("S6", 0): runs[("S6", 0)]}, d, 0)
        randomisation = P.randomisation_check(runs[("S3", 0)], clf, d, s)
        yield {"s": s, "d": d, "clf": clf, "baselines": baselines, "maps": maps, "runs": runs, "grid": grid,
               "again": again, "table": table, "curve": curve, "leak": leak, "randomisation": randomisation}
    finally:
        config.CACHE_DIR = original


def test_data_and_classifier_steps(smoke_run):
    d, s = smoke_run["d"], smoke_run["s"]
    assert d["x_train"].shape == (s["n_train"], 3, 64, 64) and d["x_test"].shape == (s["n_test"], 3, 64, 64)
    assert d["x_train"].mean(dim=(0, 2, 3)).abs().max() < 1e-4  # standardised with the training statistics
    assert d["num_classes"] == 10
    assert all(b.shape == (1, 4) for b in d["boxes_test"])
    assert 0.0 <= smoke_run["clf"]["test_accuracy"] <= 1.0
    assert set(smoke_run["clf"]["model"].channels) == {"l0", "l1", "l2", "l3", "l4"}


def test_baselines_follow_the_card_invariants(smoke_run):
    table = smoke_run["table"].set_index("method")
    assert table.loc["ground truth", "LE"] == 0.0  # invariant 10
    assert table.loc["ground truth", "F1"] == pytest.approx(1.0, abs=1e-4)
    assert table.loc["full image", "avg_mask"] == 1.0
    baselines = smoke_run["baselines"]
    assert (baselines["full image"]["sm1"] == 0.0).all()
    for frame in baselines.values():
        assert (frame["om"] >= frame["le"]).all()  # invariant 11
    assert len(baselines["Fong & Vedaldi"]) == 4
    assert smoke_run["maps"]["CAM"].shape == (smoke_run["s"]["n_test"], 1, 64, 64)


def test_grid_is_cached_and_tabulated(smoke_run):
    grid, again = smoke_run["grid"], smoke_run["again"]
    pd.testing.assert_frame_equal(grid, again)  # the second call loads every masker from the cache
    assert set(grid["row"]) == {"S1", "S3", "S6"}
    assert grid.groupby("row")["replicate"].nunique().to_dict() == {"S1": 1, "S3": 2, "S6": 1}
    table = smoke_run["table"].set_index("method")
    assert table.loc["S3", "seeds"] == 2 and not np.isnan(table.loc["S3", "LE_std"])
    assert np.isnan(table.loc["S1", "LE_std"])
    assert ((grid["avg_mask"] >= 0) & (grid["avg_mask"] <= 1)).all()
    shown = P.show_table(smoke_run["table"])
    assert "±" in shown.set_index("method").loc["S3", "LE"]


def test_few_shot_and_sanity_steps(smoke_run):
    curve, s = smoke_run["curve"], smoke_run["s"]
    per_class = curve[curve["kind"] == "per class"].set_index("point")
    for k in s["few_shot_k"]:
        assert per_class.loc[str(k), "images"] == 10 * k
    assert per_class.loc["all", "LE"] == smoke_run["table"].set_index("method").loc["S3", "LE"] or True
    assert "1 epoch" in per_class.index  # epoch_reference is on in smoke
    classes = curve[curve["kind"] == "classes"].set_index("point")
    assert classes.loc["2", "n_classes"] == 2
    leak = smoke_run["leak"]
    assert leak[["acc_own_mask", "acc_shuffled_mask", "follows_mask_source"]].stack().between(0, 1).all()
    assert leak["chance"].iloc[0] == pytest.approx(0.1)
    randomisation = smoke_run["randomisation"]
    assert list(dict.fromkeys(randomisation["layer"])) == ["none", "fc", "l4", "l3", "l2", "l1", "l0"]
    first = randomisation[randomisation["layer"] == "none"]
    assert first["spearman"].to_numpy() == pytest.approx(1.0)


def test_worker_processes_fill_the_cache_with_the_same_maskers(smoke_run):
    from study import masking

    d = smoke_run["d"]
    s = P.experiment_settings("smoke", rows={"S3": 1, "S4": 1}, few_shot_k=[1], few_shot_classes=[2])
    tv = {"fix": 3.5e-3, "ca": 3.5e-3}
    assert P.prefill_maskers(s, d, tv, workers=1) == 0  # one worker: nothing in parallel
    assert P.prefill_maskers(s, d, tv, workers=2) == 1  # only S4 is new; the others are cached by the fixture
    assert P.prefill_maskers(s, d, tv, workers=2) == 0
    cached, _ = P.run_job(smoke_run["clf"], d, s, tv, ("S4", 0, "all", None), device="cpu")
    assert cached.from_cache
    fresh = masking.train_masker(smoke_run["clf"]["model"], d["x_train"], d["y_train"], P.row_spec("S4", s, 3.5e-3),
                                 seed=P.masker_seed(0, 0), device="cpu")
    for a, b in zip(cached.masker.state_dict().values(), fresh.masker.state_dict().values()):
        assert torch.equal(a, b)


def test_figures_and_card_tables(smoke_run, tmp_path):
    from study.plots import save_figure

    runs, d, maps = smoke_run["runs"], smoke_run["d"], smoke_run["maps"]
    fig, table = P.mask_gallery(runs, {"CAM": maps["CAM"]}, d, 3)
    assert set(table["variant"]) >= {"CAM"} and len(table) == 3 * (len(runs) - 1 + 1)
    save_figure(fig, table, tmp_path, "gallery")
    fig, table = P.few_shot_figure(smoke_run["curve"], {"CAM": 50.0})
    save_figure(fig, table, tmp_path, "few_shot")
    assert (tmp_path / "few_shot.png").exists() and (tmp_path / "gallery.csv").exists()
    fig, table = P.area_figure(smoke_run["grid"], smoke_run["baselines"])
    assert len(table) == 3 + 4  # three grid rows, CAM, Grad-CAM, Fong & Vedaldi, ground truth
    assert (table["q1"] <= table["median"]).all() and (table["median"] <= table["q3"]).all()
    readme = P.readme_comparison(smoke_run["grid"], "S6").set_index("metric")
    assert readme.loc["LE", "paper (README, ImageNet)"] == 0.3575
    assert readme.loc["top5", "this run (S6, synthetic)"] == "n/a"
    assert len(P.quirk_table()) == 11


def test_findings_verdicts_are_computed_from_the_numbers():
    def table(values):
        return pd.DataFrame([{"method": m, "LE": v, "LE_std": 1.0} for m, v in values.items()])

    curve = pd.DataFrame([
        {"row": "S3", "kind": "per class", "point": "10", "n_classes": 10, "LE": 22.0},
        {"row": "S3", "kind": "per class", "point": "all", "n_classes": 10, "LE": 20.0},
        {"row": "S3", "kind": "classes", "point": "2", "n_classes": 2, "LE": 45.0},
        {"row": "S3", "kind": "classes", "point": "all", "n_classes": 10, "LE": 20.0},
    ])
    good = table({"S1": 40, "S2": 35, "S3": 20, "S4": 40, "S5": 60, "S6": 15, "S8": 18, "S9": 16, "CAM": 50,
                  "Fong & Vedaldi": 45})
    rows = {r["claim"]: r["verdict"] for r in P.findings(good, curve, pd.DataFrame(), pd.DataFrame(), None)}
    assert rows["Masked-in + masked-out beats either alone (claim 2)"] == "reproduced"
    assert rows["Training the classifier alongside (CA) beats a fixed one (claim 3)"] == "reproduced"
    assert rows["10 examples per class lose only a few LE points (S3; claim 4)"] == "reproduced"
    assert rows["A masker trained on few classes generalises worse (S3)"] == "reproduced"
    assert rows["Gumbel-sigmoid masks give no gain (claim 1)"] == "reproduced"
    assert rows["Counterfactual infilling gives no gain (claim 1; blur stand-in only)"] == "partly reproduced"
    bad = table({"S1": 10, "S2": 35, "S3": 20, "S4": 10, "S5": 60, "S6": 30, "S8": 5, "S9": 5, "CAM": 10,
                 "Fong & Vedaldi": 5})
    rows = {r["claim"]: r["verdict"] for r in P.findings(bad, curve, pd.DataFrame(), pd.DataFrame(), None)}
    assert rows["Masked-in + masked-out beats either alone (claim 2)"] == "not reproduced"
    assert rows["Training the classifier alongside (CA) beats a fixed one (claim 3)"] == "not reproduced"
    assert rows["Gumbel-sigmoid masks give no gain (claim 1)"] == "not reproduced"
    assert rows["The trained masker localises better than CAM and Fong & Vedaldi"] == "not reproduced"
    for row in P.findings(bad, curve, pd.DataFrame(), pd.DataFrame(), None):
        assert row["verdict"] in findings.VERDICTS


# ----------------------------------------------------------------------------- real-data path


def test_real_data_path_on_a_fake_imagenet_folder(tmp_path):
    from torchvision.models import resnet18

    wnids = ["n00000001", "n00000002"]
    (tmp_path / "LOC_synset_mapping.txt").write_text("\n".join(f"{w} thing" for w in wnids))
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(wnids):
        folder = tmp_path / "val" / wnid
        folder.mkdir(parents=True)
        for i in range(3):
            stem = f"ILSVRC2012_val_{c * 10 + i:08d}"
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{stem}.JPEG")
            (folder / f"{stem}.xml").write_text(
                f"<annotation><size><width>48</width><height>40</height></size><object><name>{wnid}</name>"
                "<bndbox><xmin>10</xmin><ymin>8</ymin><xmax>30</xmax><ymax>30</ymax></bndbox></object></annotation>")
    torch.manual_seed(0)
    s = {"n_images": 40, "real_k": 1, "real_steps": 1}  # 40 // 20 = 2 classes
    out = P.real_data_run(tmp_path, None, s, seed=0, device="cpu", model=resnet18(num_classes=2), crop=32)
    table = out["table"].set_index("method")
    assert out["n_train_masker"] == 2 and out["n_eval"] == 4 and out["classes"] == 2
    assert {"full image", "centre box", "CAM"} <= set(table.index)
    assert any(name.startswith("FIX masker") for name in table.index)
    assert table.loc["full image", "SM1"] == 0.0
    with pytest.raises(ValueError):
        P.TorchvisionResNetFeatures(nn.Linear(2, 2))
