"""Bring your own classifier and images to notebook 01 (issue "For researchers' own models").

As tests/test_byo_model.py does for notebook 02: a fixture ImageFolder tree (2 classes × 4 small
PNGs; two Pascal-VOC XML files beside them, which notebook 01 must ignore) and a randomly
initialised torchvision ResNet-18 with 2 outputs saved as a state dict. The steps of notebook 01
run on them at the smoke profile without training anything, the notebook runs end to end through
the runner, and bad input stops with a ValueError naming the parameter. No download anywhere:
every model is built with `weights=None`.
"""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from study import attribution, config, imagenet
from study.experiments import tomsett2020 as t
from study.findings import VERDICTS

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("cat", "dog")
SIDE = 16  # the crop the model sees (Resize(18) → CenterCrop(16)): small, so the smoke steps stay fast
# the primary mean / uniform pair first (what `analyse` compares), then a patch·logit and an abs variant
VARIANTS = [t.Variant("dataset_mean", "pixel", "prob"), t.Variant("uniform", "pixel", "prob"),
            t.Variant("uniform", "patch", "logit"), t.Variant("blur", "pixel", "prob", "abs")]


def _folder(root):
    """2 class folders × 4 PNGs (48 × 40 px): noise with a bright square in the class's colour
    channel. cat/img0.xml boxes its own class, dog/img0.xml names the other class only."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 80, (40, 48, 3), dtype=np.uint8)
            pixels[6 + 4 * c:22 + 4 * c, 4 + 6 * i:20 + 6 * i, c] = 255
            Image.fromarray(pixels).save(root / name / f"img{i}.png")
        box = CLASSES[c] if c == 0 else CLASSES[0]
        (root / name / "img0.xml").write_text(
            f"<annotation><filename>img0.png</filename><size><width>48</width><height>40</height><depth>3</depth>"
            f"</size><object><name>{box}</name><bndbox><xmin>4</xmin><ymin>6</ymin><xmax>20</xmax><ymax>22</ymax>"
            f"</bndbox></object></annotation>")
    return root


@pytest.fixture(scope="module")
def fixture(tmp_path_factory, random_weights):
    root = tmp_path_factory.mktemp("byo01")
    return {"folder": _folder(root / "images"), "weights": random_weights(root / "resnet18.pt", num_classes=2),
            "root": root}


@pytest.fixture(scope="module")
def steps(fixture):
    """Notebook 01's steps on the fixture at the smoke profile (its 8 images), four variants."""
    s = t.experiment_settings("smoke", "folder")
    bundle, model_run = t.setup("folder", 0, s, device="cpu", data_root=fixture["folder"], model="resnet18",
                                weights_path=fixture["weights"], image_size=SIDE)
    net = model_run["model"]
    selection = t.select_images(bundle, net, s["n_images"], "cpu")
    maps, skipped = t.compute_maps(net, selection["images"], selection["predicted"], t.method_plan(s, 0),
                                   s["map_batch_size"])
    geo = t.geometry(bundle["image_size"], s["steps"])
    scores, curves = t.score_table(net, selection["images"], selection["predicted"], selection["labels"], maps,
                                   VARIANTS, geo, dataset_mean=bundle["dataset_mean"], seed=0, progress=False)
    results = t.analyse(scores, VARIANTS, s["alpha_ci"], 0, model_run["units"])
    return {"s": s, "bundle": bundle, "model_run": model_run, "selection": selection, "maps": maps,
            "skipped": skipped, "geo": geo, "scores": scores, "curves": curves, "results": results}


# ----------------------------------------------------------------------------- the steps, asserted

def test_the_folder_is_read_as_the_model_sees_it_and_its_boxes_are_ignored(steps, fixture):
    s, bundle = steps["s"], steps["bundle"]
    assert s["n_images"] == config.settings("smoke", "tomsett2020")["n_images"] == 8  # the profile's value
    images = bundle["test"]["images"]
    assert images.shape == (8, 3, SIDE, SIDE) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0  # pixels: the normalisation is inside the model
    assert bundle["test"]["labels"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert bundle["classes"] == list(CLASSES) and bundle["class_counts"] == [4, 4]
    assert bundle["train"] is None and bundle["valid"] is None  # nothing to train on
    # no training set: mean replacement uses the per-channel mean of the evaluated images
    np.testing.assert_allclose(bundle["dataset_mean"], images.astype(np.float64).mean(axis=(0, 2, 3)), atol=1e-6)
    # the same loader as notebook 02; with its boxes on, the XML files would drop 7 of the 8 images
    with_boxes = imagenet.load_image_folder(fixture["folder"], resize=18, crop=SIDE)
    assert with_boxes["localisation"] and len(with_boxes["labels"]) == 1 and with_boxes["dropped_no_target_box"] == 7
    text = t.describe_setup(bundle, steps["model_run"], s)
    assert "not trained here" in text and "cat (4), dog (4)" in text and f"CenterCrop({SIDE})" in text
    assert "resnet18.pt" in text and str(fixture["root"]) not in text  # the file's name, no machine path


def test_batch_sizes_shrink_with_the_image_area(fixture):
    s = t.experiment_settings("smoke", "folder")
    bundle = t.load_folder(s, fixture["folder"], "resnet18", image_size=64)
    assert bundle["image_size"] == 64 and bundle["input"]["resize"] == 73
    assert (s["batch_size"], s["map_batch_size"]) == (512 // 4, 50 // 4)  # (32/64)² of the 32-px budget
    small = t.experiment_settings("smoke", "folder")
    t.load_folder(small, fixture["folder"], "resnet18", image_size=SIDE)
    assert (small["batch_size"], small["map_batch_size"]) == (512, 50)  # never above the profile's


def test_your_model_is_loaded_not_trained(steps, fixture):
    model_run, selection = steps["model_run"], steps["selection"]
    net = model_run["model"]
    assert model_run["n_train"] is None and model_run["history"].empty and not model_run["from_cache"]
    assert isinstance(net[0], t.Standardise) and not net.training
    assert torch.allclose(net[0].mean.flatten(), torch.tensor(imagenet.IMAGENET_MEAN))
    saved = torch.load(fixture["weights"], weights_only=True)
    assert torch.equal(net[1].fc.weight, saved["fc.weight"])  # the file's weights, untouched
    with torch.no_grad():
        logits = net(selection["images"])
    assert logits.shape == (8, 2)
    accuracy = (selection["predicted"] == selection["labels"]).float().mean().item()
    assert model_run["test_accuracy"] == pytest.approx(accuracy)
    assert t.model_check(steps["bundle"], model_run).startswith("your model was not trained here")


def test_maps_and_scores_have_the_expected_shapes(steps):
    maps, skipped, scores = steps["maps"], steps["skipped"], steps["scores"]
    # torchvision's ResNet calls one ReLU module twice per block: DeepLift is skipped with the reason
    assert list(maps) == [m for m in t.METHODS if m != "deeplift"] and list(skipped) == ["deeplift"]
    assert "more than once" in skipped["deeplift"]
    assert all(m.shape == (8, 1, SIDE, SIDE) for m in maps.values())
    assert len(scores) == 8 * len(maps) * len(t.METRICS) * len(VARIANTS)
    assert set(scores["label"]) == {0, 1} and scores["variant"].nunique() == len(VARIANTS)
    wide = scores.pivot_table(index=["variant", "method", "image"], columns="metric", values="score")
    np.testing.assert_allclose(wide["abpc"], wide["aopc_morf"] - wide["aopc_lerf"], atol=1e-6)  # card §7.1
    first = steps["curves"][(steps["curves"]["step"] == 0)]  # k = 0: the unperturbed score, whatever the map
    assert first.groupby("variant")["mean_score"].agg(np.ptp).max() < 1e-5


def test_findings_are_computed_for_your_model(steps):
    results = steps["results"]
    units = "8 images, one model (resnet18 from weights_path, not trained here)"
    assert results["units"] == units
    rows = t.findings(results)
    assert len(rows) == 8 and all(r["verdict"] in VERDICTS and r["verdict"] != "n/a" for r in rows)
    assert all(r["n"] == units and r["paper"] == "n/a" for r in rows)
    classes = rows[3]
    assert classes["claim"] == t.CLAIMS["classes"] and classes["verdict"] != "not tested"  # 2 classes × 4 images
    assert results["summary"].groupby(["variant", "metric"])["rank"].apply(sorted).map(
        lambda r: r == list(range(1, len(steps["maps"]) + 1))).all()
    scale = t.scale_table(steps["s"], steps["bundle"], steps["model_run"], list(steps["maps"]), steps["skipped"],
                          VARIANTS, steps["geo"]).set_index("setting")["this run"]
    assert scale["training images"].startswith("n/a") and scale["epochs"] == "n/a"
    assert scale["model"] == "Standardise + resnet18 (resnet18.pt)" and "(skipped: deeplift)" in scale["methods"]
    quirks = t.quirk_choices(steps["s"], steps["geo"]).set_index("quirk")["choice in this run"]
    assert quirks["Q10"].startswith("not applicable") and "mean of the evaluated images" in quirks["Q4"]


def test_class_dependence_is_not_tested_without_two_classes_of_two_images(steps):
    scores = steps["scores"]
    one_each = scores[scores["image"].isin([0, 4])]  # one image of each class
    cells = t.class_dependence(one_each, VARIANTS[0].label)
    assert cells["excess"].isna().all()
    row = t.rule_class_dependence(cells[cells["method"] != "random"], "2 images")
    assert row["verdict"] == "not tested" and row["this_run"].startswith("not tested: no class effect")


# ----------------------------------------------------------------------------- the notebook, end to end

def _executed_text(out) -> str:
    import nbformat

    notebook = nbformat.read(next(out.rglob("01_sanity_checks_for_saliency_metrics*.ipynb")), as_version=4)
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", "") or str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(texts)


def test_notebook_01_runs_on_your_own_folder_and_model(fixture, tmp_path):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    env = {**os.environ, "STUDY_CACHE_DIR": str(cache), "STUDY_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "study", "run", "01_sanity_checks_for_saliency_metrics",
                           "-p", "profile", "smoke", "-p", "dataset", "folder",
                           "-p", "data_root", str(fixture["folder"]),
                           "-p", "model", "resnet18", "-p", "weights_path", str(fixture["weights"]),
                           "-p", "image_size", str(SIDE), "--output-dir", str(out)],
                          capture_output=True, text=True, cwd=config.ROOT, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = pd.read_csv(next(out.rglob("findings.csv")))
    assert len(table) == 8 and table["verdict"].isin(VERDICTS).all() and (table["verdict"] != "n/a").all()
    assert table["n"].str.contains("not trained here").all()
    assert {p.stem for p in out.rglob("*.png")} >= {"example_maps", "perturbation_curves", "alpha_ci"}
    assert not (cache / "models").exists()  # nothing was trained
    text = _executed_text(out)
    assert "your model was not trained here" in text and "8 images of 2 class folders" in text
    assert "deeplift" in text and "more than once" in text and t.FOLDER_PILOT_NOTE in text


# ----------------------------------------------------------------------------- bad input

def test_bad_input_names_the_parameter(fixture, tmp_path, random_weights):
    s_folder = t.experiment_settings("smoke", "folder")

    def setup(**kwargs):
        args = {"data_root": fixture["folder"], "model": "resnet18", "weights_path": fixture["weights"],
                "image_size": SIDE, **kwargs}
        return t.setup("folder", 0, dict(s_folder), device="cpu", **args)

    with pytest.raises(ValueError, match="dataset='folder' needs data_root"):
        setup(data_root=None)
    with pytest.raises(ValueError, match="dataset='folder' needs model"):
        setup(model=None)
    with pytest.raises(ValueError, match="data_root"):
        setup(data_root=tmp_path / "missing")
    with pytest.raises(ValueError, match="weights_path"):
        setup(weights_path=tmp_path / "none.pt")
    with pytest.raises(ValueError, match="weights_path"):
        setup(weights_path=None)
    with pytest.raises(ValueError, match="model='resnet_18' is not a torchvision"):
        setup(model="resnet_18")
    with pytest.raises(ValueError, match="mean must be three"):
        setup(mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std must be three"):
        setup(std=[0.2, 0.2, "x"])
    with pytest.raises(ValueError, match="std must be three finite numbers.*positive"):
        setup(std=(0.2, 0.2, 0.0))
    with pytest.raises(ValueError, match="image_size 30 .*L = 8"):
        setup(image_size=30)
    with pytest.raises(ValueError, match=r"weights_path .* is not a torchvision resnet34 state dict"):
        setup(model="resnet34")
    three = random_weights(tmp_path / "three.pt", num_classes=3)
    with pytest.raises(ValueError, match=r"data_root has 2 class folders.*3 outputs"):
        setup(weights_path=three)
    with pytest.raises(ValueError, match="epochs.*dataset='folder' trains nothing"):
        t.experiment_settings("smoke", "folder", epochs=3)
    s_digits = t.experiment_settings("smoke", "digits")
    with pytest.raises(ValueError, match="model, weights_path apply to dataset='folder'"):
        t.setup("digits", 0, s_digits, model="resnet18", weights_path=fixture["weights"])
    with pytest.raises(ValueError, match="experiment_settings"):
        t.setup("folder", 0, s_digits, data_root=fixture["folder"], model="resnet18")
    with pytest.raises(ValueError, match="setup"):
        t.load_dataset("folder", 0, s_folder)


def test_deeplift_refuses_a_model_that_calls_a_relu_twice():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.relu, self.head = nn.ReLU(), nn.Linear(4 * 8 * 8, 2)

        def forward(self, x):
            return self.head(self.relu(self.conv2(self.relu(self.conv1(x)))).flatten(1))

    torch.manual_seed(0)
    shared, images = Shared(), torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="deeplift needs every nonlinearity module called once.*'relu'"):
        attribution.explain(shared, images, 0, "deeplift")
    separate = nn.Sequential(shared.conv1, nn.ReLU(), shared.conv2, nn.ReLU(), nn.Flatten(), shared.head)
    maps = attribution.explain(separate, images, 0, "deeplift")
    assert maps.shape == (2, 1, 8, 8) and torch.isfinite(maps).all()
