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
from scipy import stats
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
        classifiers = P.train_classifiers(d, s, device="cpu")
        clf = classifiers[0]
        baselines, maps = P.baseline_results(clf, d, s, device="cpu")
        tv, _ = P.tune_tv(clf, d, s)
        runs, grid = P.train_grid(classifiers, d, s, tv, device="cpu")
        _, again = P.train_grid(classifiers, d, s, tv, device="cpu")
        table = P.ablation_table(grid, baselines)
        curve = P.few_shot(classifiers, d, s, tv, grid, device="cpu")
        leak = P.leak_check({("S6", 0): runs[("S6", 0)]}, d, 0)
        randomisation = P.randomisation_checks(runs, d, s)
        yield {"s": s, "d": d, "clf": clf, "classifiers": classifiers, "baselines": baselines, "maps": maps,
               "runs": runs, "grid": grid, "again": again, "table": table, "curve": curve, "leak": leak,
               "randomisation": randomisation}
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


def test_a_larger_test_split_retrains_nothing(smoke_run):
    """The classifier and maskers train on the training split only, which does not depend on the
    test size; their keys must not either (a new n_test used to retrain every model of 03)."""
    d, s = smoke_run["d"], smoke_run["s"]
    more = {**s, "n_test": s["n_test"] + 8}
    bigger = P.load_data(more, 0)
    assert torch.equal(bigger["x_train"], d["x_train"]) and len(bigger["y_test"]) == s["n_test"] + 8
    assert P.classifier_params(bigger, more) == P.classifier_params(d, s)
    assert P.train_classifier(bigger, more, device="cpu")["from_cache"]
    assert P.classifier_params(d, {**s, "n_train": s["n_train"] + 8}) != P.classifier_params(d, s)


def test_a_classifier_replicate_retrains_on_the_same_data_from_its_own_seed(smoke_run):
    """Replicate 0 is the notebook's classifier (same key, from the cache); replicate k > 0 is another
    training run on the same data: another key, other weights."""
    d, s, clf = smoke_run["d"], smoke_run["s"], smoke_run["clf"]
    assert P.classifier_params(d, s, replicate=0) == P.classifier_params(d, s)
    assert P.classifier_seed(d["seed"], 0) == d["seed"]
    again = P.train_classifier(d, s, device="cpu", replicate=0)
    assert again["from_cache"] and again["key"] == clf["key"]
    other = P.train_classifier(d, s, device="cpu", replicate=1)
    assert other["key"] != clf["key"] and other["key"] == smoke_run["classifiers"][1]["key"]
    assert P.classifier_seed(d["seed"], 1) not in {d["seed"], P.masker_seed(d["seed"], 1)}
    first = dict(clf["model"].named_parameters())
    assert any(not torch.equal(p, first[name]) for name, p in other["model"].named_parameters())
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="replicate"):
            P.classifier_seed(d["seed"], bad)


def test_one_classifier_per_replicate_under_every_masker(smoke_run):
    """Replicate r's maskers sit on classifier r: the grid trains as many classifiers as its most
    replicated row (or claim 4's few-shot pair), and each masker's key and frozen classifier are its
    replicate's."""
    s, classifiers, runs = smoke_run["s"], smoke_run["classifiers"], smoke_run["runs"]
    assert P.n_classifiers(s) == len(classifiers) == 2  # S3 × 2 replicates, few_shot_seeds 2
    assert P.n_classifiers({**s, "rows": {"S3": 5, "S6": 3}}) == 5
    assert P.n_classifiers({**s, "rows": {"S3": 1}, "few_shot_seeds": 3}) == 3
    assert P.n_classifiers({**s, "rows": {"S3": 1}, "few_shot_rows": [], "few_shot_seeds": 3}) == 1
    assert classifiers[0]["key"] != classifiers[1]["key"]
    for (row, replicate), run in runs.items():
        own = classifiers[replicate]["model"].state_dict()
        if run.spec.fixed:
            assert all(torch.equal(v, own[k]) for k, v in run.classifier.state_dict().items())
    first, second = runs[("S3", 0)].classifier.state_dict(), runs[("S3", 1)].classifier.state_dict()
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert P.train_classifiers(smoke_run["d"], s, device="cpu")[1]["from_cache"]


def test_classifiers_trained_in_workers_are_not_reported_as_cached(smoke_run, monkeypatch):
    jobs = []

    def in_process(function, job_list, **kw):  # the worker path, run here
        jobs.extend(job_list)
        return [function(*job) for job in job_list]

    monkeypatch.setattr(P.parallel, "map_jobs", in_process)
    s = {**smoke_run["s"], "epochs": 1}  # new keys: nothing cached
    d = P.load_data(s, 0)
    fresh = P.train_classifiers(d, s, device="cpu", workers=2)
    assert len(jobs) == 2 and [c["from_cache"] for c in fresh] == [False, False]
    assert [c["from_cache"] for c in P.train_classifiers(d, s, device="cpu", workers=2)] == [True, True]
    assert len(jobs) == 2  # nothing left to train in workers


def test_baseline_le_gives_each_classifier_its_own_cam_and_fong(smoke_run):
    d, s, classifiers = smoke_run["d"], smoke_run["s"], smoke_run["classifiers"]
    table = P.baseline_le(classifiers, d, s, device="cpu", first=smoke_run["baselines"])
    assert sorted(zip(table["method"], table["replicate"])) == [("CAM", 0), ("CAM", 1), ("Fong & Vedaldi", 0),
                                                                  ("Fong & Vedaldi", 1)]
    summary = smoke_run["table"].set_index("method")["LE"]
    first = table[table["replicate"] == 0].set_index("method")["LE"]
    assert first["CAM"] == summary["CAM"] and first["Fong & Vedaldi"] == summary["Fong & Vedaldi"]
    own = P.baseline_results(classifiers[1], d, s, device="cpu")[0]
    second = table[table["replicate"] == 1].set_index("method")["LE"]
    assert second["CAM"] == P.summarise(own["CAM"])["LE"]


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
    assert sorted(set(randomisation["replicate"])) == [0, 1]  # both S3 maskers, each with its own draw
    last = randomisation[randomisation["layer"] == "l0"]
    assert not np.allclose(last[last.replicate == 0]["spearman"].to_numpy(), last[last.replicate == 1]["spearman"].to_numpy())


def test_worker_processes_fill_the_cache_with_the_same_maskers(smoke_run):
    from study import masking

    d = smoke_run["d"]
    s = P.experiment_settings("smoke", rows={"S3": 1, "S4": 1}, few_shot_k=[1], few_shot_classes=[2])
    tv = {"fix": 3.5e-3, "ca": 3.5e-3}
    assert P.prefill_maskers(s, d, tv, workers=1) == 0  # one worker: nothing in parallel
    assert P.prefill_maskers(s, d, tv, workers=2) == 1  # only S4 is new; the others are cached by the fixture
    assert P.prefill_maskers(s, d, tv, workers=2) == 0
    cached, _ = P.run_job(smoke_run["classifiers"], d, s, tv, ("S4", 0, "all", None), device="cpu")
    assert cached.from_cache
    fresh = masking.train_masker(smoke_run["clf"]["model"], d["x_train"], d["y_train"], P.row_spec("S4", s, 3.5e-3),
                                 seed=P.masker_seed(0, 0), device="cpu")
    for a, b in zip(cached.masker.state_dict().values(), fresh.masker.state_dict().values()):
        assert torch.equal(a, b)


def test_masker_workers_get_the_device_as_asked_for(smoke_run, monkeypatch):
    sent = []
    monkeypatch.setattr(P.parallel, "map_jobs", lambda function, jobs, **kw: sent.extend(jobs) or [0] * len(jobs))
    s = P.experiment_settings("smoke", rows={"S3": 1, "S5": 1}, few_shot_k=[1], few_shot_classes=[2])
    P.prefill_maskers(s, smoke_run["d"], {"fix": 3.5e-3, "ca": 3.5e-3}, workers=2, device="auto")
    assert sent and {job[-1] for job in sent} == {"auto"}


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


def seeds(masks=None, **rows):
    """A per-seed table (as per_seed_table) from row=[LE per seed]; mean mask 0.3 unless given per row."""
    masks = masks or {}
    return pd.DataFrame([{"row": row, "replicate": r, "LE": le, "avg_mask": masks.get(row, 0.3)}
                         for row, values in rows.items() for r, le in enumerate(values)])


TIGHT = [-0.5, 0.0, 0.5]  # a small spread, so that intervals are narrow


def around(centre, spread=TIGHT):
    return [centre + s for s in spread]


def verdicts(rows):
    return {r["claim"]: r["verdict"] for r in rows}


BOTH = "Masked-in + masked-out beats either alone (claim 2)"
CA = "Training the classifier alongside (CA) beats a fixed one (claim 3)"
GUMBEL = "Gumbel-sigmoid masks give no gain (claim 1)"
INFILL = "Counterfactual infilling gives no gain (claim 1; blur stand-in only)"
ENTROPY = "The max-entropy masked-out objective beats the adversarial max-CE one (S7)"
LAYERS = "Masker inputs l3+l4 suffice: l0–l4 give no gain (S10)"
BASELINES = "The trained masker localises better than CAM and Fong & Vedaldi"
K10 = "10 examples per class lose only a few LE points against a 1-epoch masker (S3; claim 4)"
FEW = "A masker trained on few classes generalises worse (S3)"


def test_row_difference_is_paired_by_replicate_and_rejects_bad_input():
    table = seeds(S1=[40.0, 42.0, 44.0], S3=[20.0, 21.0, 25.0, 90.0])  # S3's 4th replicate has no S1 pair
    diff = P.row_difference(table, "S1", "S3")
    # differences 20, 21, 19: mean 20, sd 1, half-width t(0.975, 2) · 1/√3 = 4.3027 · 0.57735
    assert diff["mean"] == pytest.approx(20.0)
    assert (diff["low"], diff["high"]) == pytest.approx((20 - 2.48419, 20 + 2.48419), abs=1e-4)
    assert diff["n"] == 3
    shuffled = table.sample(frac=1.0, random_state=0)  # pairs follow the replicate, not the row order
    assert P.row_difference(shuffled, "S1", "S3") == diff
    single = P.row_difference(seeds(S1=[40.0], S3=[20.0, 22.0]), "S1", "S3")
    assert single["low"] == single["high"] == single["mean"] == pytest.approx(20.0)  # one pair: the point
    constant = P.row_difference(seeds(S1=[40.0, 45.0], S3=[20.0, 25.0]), "S1", "S3")
    assert constant["low"] == constant["high"] == 20.0  # no spread in the differences: the point
    with pytest.raises(ValueError, match="replicate in common"):
        P.row_difference(pd.concat([seeds(S1=[40.0]), seeds(S3=[20.0, 21.0]).iloc[1:]]), "S1", "S3")
    with pytest.raises(ValueError, match="one LE per replicate"):
        P.row_difference(pd.concat([table, seeds(S1=[41.0])]), "S1", "S3")
    with pytest.raises(ValueError, match="S9"):
        P.row_difference(table, "S9", "S3")
    with pytest.raises(ValueError, match="per-seed table"):
        P.row_difference(pd.DataFrame({"row": ["S1"], "LE": [1.0]}), "S1", "S3")  # no replicate column
    with pytest.raises(ValueError, match="per_seed"):
        P.findings(pd.DataFrame(), pd.DataFrame({"row": ["S1"]}))


def test_both_objectives_rule_pass_fail_partly_and_straddle():
    good = dict(S1=around(40), S2=around(35), S3=around(20), S4=around(40), S5=around(60), S6=around(15))
    assert verdicts(P.findings(None, seeds(**good)))[BOTH] == "reproduced"
    fix_fails = {**good, "S1": around(10)}  # masked-in only clearly better than both under FIX
    assert verdicts(P.findings(None, seeds(**fix_fails)))[BOTH] == "partly reproduced"
    both_fail = {**fix_fails, "S4": around(5)}
    assert verdicts(P.findings(None, seeds(**both_fail)))[BOTH] == "not reproduced"
    # the CUDA case of the issue: S2 58 ± 34 over 3 seeds straddles S3
    straddle = {**good, "S2": [20.0, 58.0, 96.0]}
    row = next(r for r in P.findings(None, seeds(**straddle)) if r["claim"] == BOTH)
    assert row["verdict"] == "inconclusive"
    assert "t CI over 3 paired replicate(s), one classifier each" in row["uncertainty"] and "S2: 3" in row["n"]
    assert verdicts(P.findings(None, seeds(S3=around(20), S6=around(15))))[BOTH] == "not tested"


def ca_table(passes=2.0, clean=15.0, n=3):
    n_train = 3000
    return pd.DataFrame({"row": "S6", "replicate": range(n), "masked_updates": int(passes * n_train / 16),
                         "masked_images": int(passes * n_train / 16) * 16, "n_train": n_train, "masked_ce": 0.8,
                         "LE": 15.0, "LE_clean_bn": around(clean)[:n]})


def test_ca_rule_needs_the_interval_and_the_masked_training_gate():
    better = seeds(S3=around(30), S6=around(15))
    worse = seeds(S3=around(15), S6=around(30))
    straddle = seeds(S3=[10.0, 30.0, 50.0], S6=around(28))
    assert verdicts(P.findings(None, better, ca=ca_table()))[CA] == "reproduced"
    assert verdicts(P.findings(None, worse, ca=ca_table()))[CA] == "not reproduced"
    assert verdicts(P.findings(None, straddle, ca=ca_table()))[CA] == "inconclusive"
    # too few masked updates (0.27 of a pass, the quick schedule): inconclusive whatever the interval
    row = next(r for r in P.findings(None, better, ca=ca_table(passes=0.27)) if r["claim"] == CA)
    assert row["verdict"] == "inconclusive" and "too short" in row["this_run"]
    assert "clean images 15.0" in row["this_run"] and "clean-BN LE S3−S6" in row["uncertainty"]
    assert verdicts(P.findings(None, better))[CA] == "inconclusive"  # no mechanism check: no verdict


def test_no_gain_rules_need_a_non_degenerate_mask():
    base = dict(S6=around(30))
    worse = seeds(**base, S8=around(60), S9=around(32), S10=around(31))
    found = verdicts(P.findings(None, worse))
    assert found[GUMBEL] == "reproduced" and found[LAYERS] == "reproduced"
    assert found[INFILL] == "partly reproduced"  # the blur is a stand-in: a pass counts as partly
    better = seeds(**base, S8=around(10), S9=around(10), S10=around(10))
    found = verdicts(P.findings(None, better))
    assert found[GUMBEL] == found[INFILL] == found[LAYERS] == "not reproduced"
    straddle = seeds(**base, S8=[5.0, 30.0, 55.0])
    assert verdicts(P.findings(None, straddle))[GUMBEL] == "inconclusive"
    collapsed = seeds(masks={"S8": 0.04}, **base, S8=around(85))
    row = next(r for r in P.findings(None, collapsed) if r["claim"] == GUMBEL)
    assert row["verdict"] == "inconclusive" and "degenerate" in row["this_run"]
    assert verdicts(P.findings(None, seeds(**base)))[GUMBEL] == "not tested"


def test_objective_type_rule_for_s7():
    assert verdicts(P.findings(None, seeds(S6=around(20), S7=around(50))))[ENTROPY] == "reproduced"
    assert verdicts(P.findings(None, seeds(S6=around(50), S7=around(20))))[ENTROPY] == "not reproduced"
    assert verdicts(P.findings(None, seeds(S6=around(30), S7=[10.0, 30.0, 50.0])))[ENTROPY] == "inconclusive"


def test_baseline_rule_pairs_each_masker_with_its_classifiers_baselines():
    def table(cam, fong):
        return pd.DataFrame([{"method": m, "replicate": r, "LE": le[r]}
                             for m, le in (("CAM", cam), ("Fong & Vedaldi", fong)) for r in range(3)])

    per_seed = seeds(S3=[19.0, 22.0, 21.0], S6=around(40))  # S3 is the better row
    assert verdicts(P.findings(table([50] * 3, [45] * 3), per_seed))[BASELINES] == "reproduced"
    assert verdicts(P.findings(table([50] * 3, [10] * 3), per_seed))[BASELINES] == "partly reproduced"
    assert verdicts(P.findings(table([10] * 3, [10] * 3), per_seed))[BASELINES] == "not reproduced"
    assert verdicts(P.findings(table([50] * 3, [20] * 3), per_seed))[BASELINES] == "inconclusive"
    # the same levels, paired: each classifier's Fong & Vedaldi is 2 points worse than its masker
    row = next(r for r in P.findings(table([50] * 3, [21.0, 24.0, 23.0]), per_seed) if r["claim"] == BASELINES)
    assert row["verdict"] == "reproduced" and "S3−Fong & Vedaldi -2.0" in row["uncertainty"]
    assert verdicts(P.findings(None, per_seed))[BASELINES] == "not tested"
    with pytest.raises(ValueError, match="baseline_le"):
        P.findings(pd.DataFrame({"method": ["CAM"], "LE": [50.0]}), per_seed)


def per_image(le):
    return pd.DataFrame({"le": np.asarray(le, float)})


def test_few_shot_rules_compare_paired_images_with_the_right_reference():
    n = 200
    rng = np.random.default_rng(0)
    epoch = rng.random(n) < 0.3
    same = {("S3", "k=10"): per_image(epoch), ("S3", "1 epoch"): per_image(epoch), ("S3", "all"): per_image(epoch),
            ("S3", "N=2"): per_image(np.ones(n))}
    found = verdicts(P.findings(None, seeds(S3=around(20)), few_shot_images=same))
    assert found[K10] == "reproduced" and found[FEW] == "reproduced"
    far = {**same, ("S3", "k=10"): per_image(np.ones(n)), ("S3", "N=2"): per_image(np.zeros(n))}
    found = verdicts(P.findings(None, seeds(S3=around(20)), few_shot_images=far))
    assert found[K10] == "not reproduced" and found[FEW] == "not reproduced"
    flipped = epoch.copy()
    flipped[np.flatnonzero(~epoch)[:10]] = True  # gap of 5 points exactly, with noise: straddles the threshold
    near = {**same, ("S3", "k=10"): per_image(flipped)}
    assert verdicts(P.findings(None, seeds(S3=around(20)), few_shot_images=near))[K10] == "inconclusive"
    swapped = epoch.copy()  # as many images lost as gained: a gap of 0 with noise straddles the threshold 0
    swapped[np.flatnonzero(~epoch)[:5]] = True
    swapped[np.flatnonzero(epoch)[:5]] = False
    mixed = {**same, ("S3", "N=2"): per_image(swapped)}
    assert verdicts(P.findings(None, seeds(S3=around(20)), few_shot_images=mixed))[FEW] == "inconclusive"
    no_epoch = {key: value for key, value in same.items() if key[1] != "1 epoch"}
    row = next(r for r in P.findings(None, seeds(S3=around(20)), few_shot_images=no_epoch) if r["claim"] == K10)
    assert row["verdict"] == "not tested" and "1-epoch" in row["this_run"]
    with pytest.raises(ValueError, match="same images"):
        P.findings(None, seeds(S3=around(20)), few_shot_images={**same, ("S3", "1 epoch"): per_image(epoch[:10])})


def test_few_shot_k10_rule_uses_the_spread_over_masker_seeds():
    n, zeros = 200, np.zeros(200)

    def gap(points):  # a k = 10 evaluation that loses `points` LE points against an all-zero reference
        le = np.zeros(n)
        le[:int(points * n / 100)] = 1.0
        return per_image(le)

    def images(gaps):
        found = {("S3", "k=10"): gap(gaps[0]), ("S3", "1 epoch"): per_image(zeros)}
        for r, g in enumerate(gaps[1:], start=1):
            found.update({("S3", "k=10", r): gap(g), ("S3", "1 epoch", r): per_image(zeros)})
        return found

    def k10_row(gaps):
        return next(r for r in P.findings(None, seeds(S3=around(20)), few_shot_images=images(gaps)) if r["claim"] == K10)

    # gaps 1, 2, 3: mean 2, t interval 2 ± 4.303 · 1/√3 = [−0.48, 4.48], below 5 → reproduced
    row = k10_row([1, 2, 3])
    assert row["verdict"] == "reproduced" and "3 replicates" in row["n"] and "[-0.5, 4.5]" in row["uncertainty"]
    assert k10_row([2, 3, 4])["verdict"] == "inconclusive"       # [0.52, 5.48] straddles 5
    assert k10_row([9, 10, 11])["verdict"] == "not reproduced"   # wholly above 5
    # one seed alone looks decided (gap 2 over 200 paired images) where its seeds disagree
    assert k10_row([2])["verdict"] == "reproduced" and k10_row([2, 12])["verdict"] == "inconclusive"


def test_few_classes_rule_uses_the_spread_over_replicates():
    n = 200

    def errors(points):  # per-image LE with (50 + points)% of the images wrong
        le = np.zeros(n)
        le[:int((50 + points) * n / 100)] = 1.0
        return per_image(le)

    def images(gaps):  # the full-data masker is wrong on 50% of the images, N = 2 on 50 + gap %
        found = {("S3", "N=2"): errors(gaps[0]), ("S3", "all"): errors(0), ("S3", "N=5"): errors(0)}
        for r, g in enumerate(gaps[1:], start=1):
            found.update({("S3", "N=2", r): errors(g), ("S3", "all", r): errors(0)})
        return found

    def few_row(gaps):
        return next(r for r in P.findings(None, seeds(S3=around(20)), few_shot_images=images(gaps)) if r["claim"] == FEW)

    # gaps 1, 2, 3: mean 2, t interval [−0.48, 4.48] straddles 0 → inconclusive; 5, 6, 7 wholly above 0
    row = few_row([1, 2, 3])
    assert row["verdict"] == "inconclusive" and "3 replicates" in row["n"] and "[-0.5, 4.5]" in row["uncertainty"]
    assert few_row([5, 6, 7])["verdict"] == "reproduced"
    assert few_row([-7, -6, -5])["verdict"] == "not reproduced"
    # one replicate alone looks decided (a gap of 40 over 200 paired images) where the replicates disagree
    assert few_row([40])["verdict"] == "reproduced" and few_row([40, 0, -30])["verdict"] == "inconclusive"


def test_claim_pairs_get_extra_replicates_in_the_jobs():
    s = P.experiment_settings("quick")
    d = {"y_train": torch.arange(400) % 10, "num_classes": 10}
    extra = [job for job in P.masker_jobs(s, d) if job[2] in ("k", "epoch", "classes") and job[1] > 0]
    assert sorted(extra, key=str) == sorted([("S3", r, "k", 10) for r in range(1, 5)]
                                            + [("S3", r, "epoch", None) for r in range(1, 5)]
                                            + [("S3", r, "classes", 2) for r in range(1, 5)], key=str)  # the fewest N only
    with pytest.raises(ValueError, match="few_shot_seeds"):
        P.experiment_settings("quick", few_shot_seeds=0)


def test_sanity_rules_leak_randomisation_and_random_label():
    def leak(rate, n=500):
        return pd.DataFrame({"mode": ["ca"], "follows_mask_source": [rate], "n_pairs": [n], "chance": [0.1]})

    def randomisation(spearman, ssim):  # three maskers, one image each
        return pd.DataFrame({"step": [0] * 3 + [1] * 3, "layer": ["none"] * 3 + ["l0"] * 3, "replicate": [0, 1, 2] * 2,
                             "spearman": [1, 1, 1] + spearman, "ssim": [1, 1, 1] + ssim})

    per_seed = seeds(S3=around(20))
    leak_claim = "Sanity: the co-trained classifier does not read the mask silhouette"
    assert verdicts(P.findings(None, per_seed, leak=leak(0.03)))[leak_claim] == "reproduced"
    assert verdicts(P.findings(None, per_seed, leak=leak(0.5)))[leak_claim] == "not reproduced"
    assert verdicts(P.findings(None, per_seed, leak=leak(0.2, n=30)))[leak_claim] == "inconclusive"
    random_claim = "Sanity: masks change when the classifier is randomised (cascading)"
    assert verdicts(P.findings(None, per_seed, randomisation=randomisation([0.1, 0.2, 0.3], [0.2, 0.3, 0.25])))[
        random_claim] == "reproduced"
    assert verdicts(P.findings(None, per_seed, randomisation=randomisation([0.1, 0.2, 0.3], [0.6, 0.62, 0.61])))[
        random_claim] == "partly reproduced"  # SSIM now counts: Spearman alone no longer passes
    assert verdicts(P.findings(None, per_seed, randomisation=randomisation([0.9, 0.95, 0.92], [0.6, 0.62, 0.61])))[
        random_claim] == "not reproduced"
    assert verdicts(P.findings(None, per_seed, randomisation=randomisation([0.1, 0.5, 0.9], [0.2, 0.3, 0.25])))[
        random_claim] == "inconclusive"
    one_masker = randomisation([0.1, 0.2, 0.3], [0.2, 0.3, 0.25]).assign(replicate=0)  # three images of one masker
    assert verdicts(P.findings(None, per_seed, randomisation=one_masker))[random_claim] == "inconclusive"
    label_claim = "Sanity: a shuffled-label classifier yields worse masks (data randomisation)"
    assert verdicts(P.findings(None, per_seed, random_label={"summary": {"LE": 90.0}}))[label_claim] == "reproduced"
    assert verdicts(P.findings(None, per_seed, random_label={"summary": {"LE": 5.0}}))[label_claim] == "not reproduced"
    assert verdicts(P.findings(None, seeds(S3=[5.0, 20.0, 35.0]), random_label={"summary": {"LE": 22.0}}))[
        label_claim] == "inconclusive"


def test_randomisation_interval_is_over_maskers_not_images():
    """Two maskers of three images each: the unit is the masker (its images share its training run
    and its randomisation draw), so the interval is Student's t over the two masker means."""
    images = {"spearman": [0.10, 0.20, 0.30, 0.35, 0.40, 0.45], "ssim": [0.20, 0.20, 0.20, 0.30, 0.30, 0.30]}
    table = pd.DataFrame({"step": 1, "layer": "l0", "replicate": [0, 0, 0, 1, 1, 1], **images})
    row = next(r for r in P.findings(None, seeds(S3=around(20)), randomisation=table) if "cascading" in r["claim"])
    means = np.array([0.2, 0.4])
    half = stats.t.ppf(0.975, 1) * means.std(ddof=1) / np.sqrt(2)
    assert f"spearman 0.30 [{0.3 - half:.2f}, {0.3 + half:.2f}], 95% t CI over 2 maskers" in row["uncertainty"]
    assert row["n"] == "2 masker(s) × 3 test images" and row["verdict"] == "inconclusive"  # t(0.975, 1) = 12.7


def test_every_finding_carries_n_and_uncertainty():
    per_seed = seeds(S1=around(40), S2=around(35), S3=around(20), S4=around(40), S5=around(60), S6=around(15),
                     S7=around(30), S8=around(30), S9=around(30), S10=around(30))
    rows = P.findings(None, per_seed, ca=ca_table())
    table = findings.findings_table(rows, profile="quick")
    assert table["verdict"].isin(findings.VERDICTS).all()
    tested = table[table["verdict"] != "not tested"]
    assert (tested["n"] != "").all() and not (tested["uncertainty"] == findings.NOT_ESTIMATED).any()


def test_clean_bn_classifier_re_estimates_statistics_only():
    from study.masking import PartsClassifier

    torch.manual_seed(0)
    model = PartsClassifier(3, (4, 4, 4, 4), 2)
    model.train()
    with torch.no_grad():
        model(torch.zeros(8, 3, 16, 16))  # "masked" statistics: all-zero images
    model.eval()
    images = torch.randn(20, 3, 16, 16) * 2 + 1
    clean = P.clean_bn_classifier(model, images, batch_size=20)
    stem_bn = next(m for m in clean.modules() if isinstance(m, nn.BatchNorm2d))
    conv = next(m for m in clean.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        pre = conv(images)
    assert torch.allclose(stem_bn.running_mean, pre.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not clean.training and model.training is False
    for (name, a), b in zip(model.state_dict().items(), clean.state_dict().values()):
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(a, b), name  # weights unchanged
    original = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert not torch.allclose(original.running_mean, stem_bn.running_mean)  # the input model is untouched
    with pytest.raises(ValueError, match="BatchNorm"):
        P.clean_bn_classifier(nn.Sequential(nn.Conv2d(3, 1, 1)), images)
    with pytest.raises(ValueError, match="clean images"):
        P.clean_bn_classifier(model, images[:1])


def test_ca_diagnostics_and_per_image_few_shot_on_the_smoke_run(smoke_run):
    ca = P.ca_diagnostics(smoke_run["runs"], smoke_run["classifiers"], smoke_run["d"])
    assert list(ca["row"]) == ["S6"] and ca["masked_updates"].between(0, smoke_run["s"]["steps"]).all()
    assert (ca["masked_images"] == ca["masked_updates"] * smoke_run["s"]["batch_size"]).all()
    assert ca[["LE", "LE_clean_bn"]].stack().between(0, 100).all()
    grid = smoke_run["grid"]
    assert ca["LE"].iloc[0] == pytest.approx(P.summarise(grid[(grid["row"] == "S6") & (grid["replicate"] == 0)])["LE"])
    d, s = smoke_run["d"], smoke_run["s"]
    curve, images = P.few_shot(smoke_run["classifiers"], d, s, {"fix": 3.5e-3, "ca": 3.5e-3}, grid, device="cpu",
                               per_image=True)
    assert {("S3", "all"), ("S3", "1 epoch"), ("S3", "k=1"), ("S3", "N=2"), ("S3", "1 epoch", 1), ("S3", "N=2", 1),
            ("S3", "all", 1)} <= set(images)
    s3 = grid[grid["row"] == "S3"]
    pd.testing.assert_frame_equal(images[("S3", "all", 1)], s3[s3["replicate"] == 1].reset_index(drop=True))
    assert all(len(frame) == s["n_test"] for frame in images.values())
    assert "n_pairs" in smoke_run["leak"] and (smoke_run["leak"]["n_pairs"] > 0).all()
    baselines = P.baseline_le(smoke_run["classifiers"], d, s, device="cpu", first=smoke_run["baselines"])
    rows = P.findings(baselines, P.per_seed_table(grid), images, smoke_run["leak"],
                      smoke_run["randomisation"], None, ca)
    assert all(r["verdict"] in findings.VERDICTS for r in rows)


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
