"""Notebook 05 (Rao et al. 2023): the experiment steps at smoke size, and the real-data loaders on
tiny fixtures written in the real formats (VOC2007 VOCDetection layout, Waterbirds metadata.csv +
CUB-200-2011 box files)."""

from __future__ import annotations

import csv

import numpy as np
from scipy import stats
import pandas as pd
import pytest
import torch
from PIL import Image

from study import config
from study import guidance as G
from study import voc_waterbirds as real
from study.experiments import rao2023 as R


pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------- fixtures


def _jpeg(path, width, height, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), colour).save(path, quality=95)


VOC_XML = """<annotation>
  <folder>VOC2007</folder><filename>{name}.jpg</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  <segmented>{seg}</segmented>
{objects}</annotation>
"""
VOC_OBJECT = """  <object><name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated>
    <difficult>{difficult}</difficult>
    <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>
"""


@pytest.fixture()
def voc_root(tmp_path):
    """Three VOC2007 images: 000001 (dog + person, segmented), 000002 (one difficult cat), 000003 (car)."""
    base = tmp_path / "VOCdevkit" / "VOC2007"
    specs = {
        "000001": (100, 50, [("dog", 1, 1, 50, 50, 0), ("person", 51, 11, 100, 40, 0)]),
        "000002": (80, 80, [("cat", 11, 21, 40, 60, 1)]),
        "000003": (64, 32, [("car", 1, 1, 64, 32, 0)]),
    }
    for name, (w, h, objects) in specs.items():
        _jpeg(base / "JPEGImages" / f"{name}.jpg", w, h, (200, 30, 30))
        body = "".join(VOC_OBJECT.format(cls=c, x0=a, y0=b, x1=x, y1=y, difficult=d) for c, a, b, x, y, d in objects)
        (base / "Annotations").mkdir(parents=True, exist_ok=True)
        (base / "Annotations" / f"{name}.xml").write_text(VOC_XML.format(name=name, w=w, h=h, seg=int(name == "000001"),
                                                                         objects=body))
    (base / "ImageSets" / "Main").mkdir(parents=True)
    for split in ("train", "val", "test"):
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("000001\n000002\n000003\n")
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("000001\n")
    instances = np.zeros((50, 100), np.uint8)
    instances[10:30, 5:25] = 1          # part of the dog
    instances[20:35, 60:90] = 2         # part of the person
    instances[0, :] = 255               # void border
    png = Image.fromarray(instances, mode="P")
    png.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 253))
    (base / "SegmentationObject").mkdir(parents=True)
    png.save(base / "SegmentationObject" / "000001.png")
    return tmp_path


@pytest.fixture()
def waterbirds_root(tmp_path):
    """Four Waterbirds images (train: landbird/land, waterbird/water; test: waterbird/land and one
    image without a CUB box) and the CUB files."""
    root = tmp_path / "waterbird_1.0_forest2water2"
    cub = tmp_path / "CUB_200_2011"
    rows = [
        (1, "001.Black_footed_Albatross/a.jpg", 1, 0, 1, "water/a.jpg", (0, 40, 200)),
        (2, "002.Laysan_Albatross/b.jpg", 1, 2, 0, "land/b.jpg", (40, 160, 40)),
        (3, "010.Red_winged_Blackbird/c.jpg", 0, 0, 0, "land/c.jpg", (40, 160, 40)),
        (4, "011.Rusty_Blackbird/d.jpg", 0, 0, 1, "water/d.jpg", (0, 40, 200)),
        (5, "010.Red_winged_Blackbird/e.jpg", 0, 1, 0, "land/e.jpg", (40, 160, 40)),
    ]
    root.mkdir(parents=True)
    with (root / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(real.WATERBIRDS_COLUMNS)
        for img_id, name, y, split, place, place_name, colour in rows:
            writer.writerow([img_id, name, y, split, place, place_name])
            _jpeg(root / name, 120, 60, colour)
    cub.mkdir()
    (cub / "images.txt").write_text("1 001.Black_footed_Albatross/a.jpg\n2 002.Laysan_Albatross/b.jpg\n"
                                    "3 010.Red_winged_Blackbird/c.jpg\n5 010.Red_winged_Blackbird/e.jpg\n")
    (cub / "bounding_boxes.txt").write_text("1 12.0 6.0 60.0 30.0\n2 0.0 0.0 120.0 60.0\n3 60.0 30.0 30.0 15.0\n"
                                            "5 0.0 0.0 60.0 60.0\n")
    _jpeg(cub / "images" / "002.Laysan_Albatross/b.jpg", 240, 120, (1, 2, 3))  # CUB copy at twice the size
    return root, cub


# ----------------------------------------------------------------------------- loaders


def test_voc_loader_reads_the_vocdetection_layout(voc_root):
    arrays = real.load_voc2007(voc_root, "train", image_size=32)
    assert arrays["ids"] == ["000001", "000002", "000003"]
    assert arrays["images"].shape == (3, 3, 32, 32) and arrays["images"].dtype == np.float32
    assert np.allclose(arrays["images"][:, 0], 200 / 255, atol=0.02)       # decoded colour, [0,1]
    dog, person = real.VOC_CLASSES.index("dog"), real.VOC_CLASSES.index("person")
    assert arrays["labels"][0].nonzero()[0].tolist() == sorted([dog, person])
    # dog: pixels 1..50 of 100 → [0, 50) → [0, 16) at 32 px; person x 51..100 → [50, 100) → [16, 32)
    assert arrays["boxes"][0].tolist() == [[dog, 0, 0, 16, 32], [person, 16, 6, 32, 26]]
    assert arrays["boxes"][2].tolist() == [[real.VOC_CLASSES.index("car"), 0, 0, 32, 32]]
    assert arrays["masks"][2].all() and arrays["masks"].dtype == bool


def test_voc_loader_difficult_limit_and_segmentation(voc_root):
    easy = real.load_voc2007(voc_root, "train", image_size=32, keep_difficult=False)
    assert easy["ids"] == ["000001", "000003"] and easy["skipped"] == ["000002"]
    assert len(real.load_voc2007(voc_root, "train", image_size=16, n_max=1)["ids"]) == 1
    seg = real.load_voc2007(voc_root, "train", image_size=50, segmentation=True)
    assert seg["ids"] == ["000001"]
    objects = seg["object_masks"][0]
    assert objects.shape == (2, 50, 50)
    assert objects[0, 10:30, 2:12].all() and not objects[0, :, 30:].any()  # the dog's instance, squeezed in x
    assert objects[1, 20:35, 31:44].all() and not objects[1, 0].any()      # the person's; void is no object


def test_voc_loader_rejects_bad_input(voc_root, tmp_path):
    with pytest.raises(ValueError, match="image_set"):
        real.load_voc2007(voc_root, "training")
    with pytest.raises(ValueError, match="no VOC2007"):
        real.load_voc2007(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="image_size"):
        real.load_voc2007(voc_root, "train", image_size=0)


def test_waterbirds_loader_joins_cub_boxes(waterbirds_root):
    root, cub = waterbirds_root
    train = real.load_waterbirds(root, "train", image_size=30)          # CUB_200_2011 found beside the folder
    # image 4 has no CUB box and is skipped; image 2 is in the test split
    assert train["ids"] == ["001.Black_footed_Albatross/a.jpg", "010.Red_winged_Blackbird/c.jpg"]
    assert train["skipped"] == ["011.Rusty_Blackbird/d.jpg"]
    assert train["y"].tolist() == [1, 0] and train["place"].tolist() == [1, 0]
    assert train["group"].tolist() == [3, 0]
    assert train["labels"].tolist() == [[0, 1], [1, 0]]
    # box x 12..72 of 120 → [3, 18) at 30 px; y 6..36 of 60 → [3, 18)
    assert train["boxes"][0].tolist() == [[1, 3, 3, 18, 18]]
    test = real.load_waterbirds(root, "test", image_size=30, cub_root=cub)
    # the CUB copy is twice as large: its box (0, 0, 120, 60) is the left-top quarter of the Waterbirds image
    assert test["boxes"][0].tolist() == [[1, 0, 0, 15, 15]] and test["group"].tolist() == [2]


def test_waterbirds_loader_rejects_bad_input(waterbirds_root, tmp_path):
    root, cub = waterbirds_root
    with pytest.raises(ValueError, match="split"):
        real.load_waterbirds(root, "validation", cub_root=cub)
    with pytest.raises(ValueError, match="metadata"):
        real.load_waterbirds(tmp_path, "train", cub_root=cub)
    with pytest.raises(ValueError, match="CUB"):
        real.load_waterbirds(root, "train", cub_root=tmp_path / "nocub")


def test_real_data_recipes_build_guidance_splits(voc_root, waterbirds_root, monkeypatch, tmp_path):
    s = R.settings("smoke", n_train=3, n_valid=3, n_test=3, birds_n_train=2, birds_n_valid=1, birds_n_test=1)
    voc = R.load_voc(s, 0, "voc2007", voc_root)
    assert voc["train"].class_masks.shape == (3, 20, 32, 32) and len(voc["test"]) == 3
    dog = real.VOC_CLASSES.index("dog")
    assert voc["train"].class_masks[0, dog, :, :16].all() and not voc["train"].class_masks[0, dog, :, 16:].any()
    root, _cub = waterbirds_root
    conventional = R.load_birds(s, 0, "conventional", "waterbirds", root)
    reversed_ = R.load_birds(s, 0, "reversed", "waterbirds", root)
    # train: waterbird on water, landbird on land → identical labels in both tasks; masks inside vs outside
    assert torch.equal(conventional["train"].labels, reversed_["train"].labels)
    assert torch.equal(conventional["train"].class_masks.any(1), ~reversed_["train"].class_masks[:, 0])
    assert conventional["test"].group.tolist() == [2] and conventional["test"].labels.tolist() == [[0.0, 1.0]]
    assert reversed_["test"].labels.tolist() == [[1.0, 0.0]]              # reversed: the label is the place (land)
    with pytest.raises(ValueError, match="data_root"):
        R.load_voc(s, 0, "voc2007", None)


# ----------------------------------------------------------------------------- experiment steps (smoke size)


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Generated data and trained runs go to a temporary cache, not data/cache."""
    previous = config.CACHE_DIR
    config.CACHE_DIR = tmp_path_factory.mktemp("cache")
    yield config.CACHE_DIR
    config.CACHE_DIR = previous


@pytest.fixture(scope="module")
def smoke(private_cache):
    """The whole pipeline at the smoke profile (trained once per test module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = R.settings("smoke")
        baselines = R.train_baselines(s, 0, "cpu")
        calibration = R.calibrate(s, baselines, "cpu")
        runs = R.run_finetunes(s, 0, baselines, calibration, "cpu")
        again = R.run_finetunes(s, 0, baselines, calibration, "cpu")
        yield {"s": s, "baselines": baselines, "calibration": calibration, "runs": runs, "again": again}
    finally:
        torch.set_num_threads(threads)


def test_settings_reject_unknown_configurations():
    with pytest.raises(ValueError, match="unknown configs"):
        R.settings("smoke", configs=["resnet"])
    with pytest.raises(ValueError, match="unknown setting"):
        R.settings("smoke", lambda_grid=[1])
    with pytest.raises(ValueError, match="energy"):
        R.settings("smoke", losses=["ppce"])


def test_cooccur_setting_reaches_the_generator_and_leaves_the_default_recipe_alone():
    plain = R.settings("smoke")
    assert "cooccur" not in R.voc_recipe(plain, 0)  # cached default runs keep their keys
    s = R.settings("smoke", cooccur=0.8, n_train=60)
    assert R.voc_recipe(s, 0)["cooccur"] == 0.8
    labels = R.load_voc(s, 0)["train"].labels.bool()
    holders = labels[:, 3]
    assert int(labels[holders, 2].sum()) == int(0.8 * int(holders.sum()) + 0.5)
    with pytest.raises(ValueError, match="cooccur"):
        R.settings("smoke", cooccur=1.5)
    with pytest.raises(ValueError, match="cooccur"):
        R.voc_recipe(s, 0, dataset="voc2007")


def test_annotate_keeps_int_f_n_images_and_dilates_within_the_image():
    s = R.settings("smoke")
    train = R.load_voc(s, 0)["train"]
    limited = R.annotate(train, 0.1, 0.0, seed=3)
    assert int(limited.annotated.sum()) == int(0.1 * len(train)) == len(limited.info["kept"])
    assert torch.equal(limited.class_masks, train.class_masks)
    assert R.annotate(train, 0.1, 0.0, seed=3).info["kept"] == limited.info["kept"]
    dilated = R.annotate(train, 1.0, 0.5, seed=3)
    assert bool(dilated.annotated.all())
    assert bool((dilated.class_masks | ~train.class_masks).all())        # dilated masks contain the true boxes
    assert dilated.class_masks.sum() > train.class_masks.sum()


def test_synthbirds_tint_changes_only_the_background():
    s = R.settings("smoke")
    birds = R.load_birds(s, 0, "conventional")
    reversed_ = R.load_birds(s, 0, "reversed")
    train = birds["train"]
    assert (train.group == 0).sum() + (train.group == 3).sum() == len(train)   # 100% correlated training set
    assert torch.equal(train.labels, reversed_["train"].labels)               # hence one shared baseline
    test = birds["test"]
    assert [int((test.group == g).sum()) for g in range(4)] == [16, 16, 16, 16]
    assert torch.equal(reversed_["test"].labels.argmax(1), test.group % 2)     # reversed label = place
    box = birds["test"].class_masks.any(1)                                   # the true class's box (other channel empty)
    assert torch.equal(birds["test"].class_masks.sum(1), box.long())
    assert torch.equal(reversed_["test"].class_masks[:, 0], ~box) and torch.equal(reversed_["test"].class_masks[:, 1], ~box)
    arrays = {"images": np.full((2, 3, 8, 8), 0.9, np.float32), "masks": np.zeros((2, 1, 8, 8), bool),
              "group": np.array([0, 3])}
    arrays["masks"][:, :, 2:4, 2:4] = True
    tinted = R.tint_background(arrays, 0.5, seed=0)["images"]
    assert np.allclose(tinted[:, :, 2:4, 2:4], 0.9)                           # bird pixels kept
    blue_minus_red = tinted[:, 2].mean((1, 2)) - tinted[:, 0].mean((1, 2))
    assert blue_minus_red[1] > blue_minus_red[0]                              # water is bluer than land


def test_smoke_pipeline_tables(smoke):
    s, baselines, runs = smoke["s"], smoke["baselines"], smoke["runs"]
    table = baselines["table"]
    assert set(zip(table.config, table.layer)) == {(c, layer) for c in s["configs"] for layer in G.LAYERS}
    assert (table.uniform_epg > 0).all() and (table.uniform_epg < 1).all()
    test = R.load_voc(s, 0)["test"]
    pairs = torch.nonzero(test.labels > 0.5)
    area = test.class_masks[pairs[:, 0], pairs[:, 1]].float().mean((1, 2)).mean()
    assert table.uniform_epg.iloc[0] == pytest.approx(float(area))
    calibration = smoke["calibration"]
    assert np.isfinite(calibration.lambda_mid).all() and (calibration.lambda_mid > 0).all()
    assert np.allclose(calibration.lambda_card, 0.3 * calibration.L_class / calibration.sum_L_loc)
    assert {k: len(v) for k, v in runs["plan"].items()} == {"E1": 8, "E3": 2, "E4": 2, "E5": 1, "E6": 6}  # smoke: one λ per loss
    assert smoke["again"]["timing"]["computed"] == 0                           # every run came from the cache
    pd.testing.assert_frame_equal(runs["E1"], smoke["again"]["E1"])


def test_smoke_pipeline_analysis_and_findings(smoke):
    s, baselines, runs = smoke["s"], smoke["baselines"], smoke["runs"]
    front = R.pareto_checkpoints(runs["E1"])
    assert front.test_f1.notna().all() and len(front) >= 8
    summary = R.loss_summary(front, baselines["table"])
    assert len(summary) == 8 and (summary.hv_epg >= 0).all()
    fractions = R.fraction_table(runs["E3"], runs["E1"], baselines["table"], s["ablation_config"])
    assert sorted(fractions.annotated.unique()) == [9.0, 96.0]                # int(0.1 · 96) and all
    e3 = runs["plan"]["E3"][0]
    assert e3["lam"] == pytest.approx(10 * next(sp["lam"] for sp in runs["plan"]["E1"] if sp["config"] == "bcos"
                                                and sp["layer"] == "input" and sp["loss"] == e3["loss"]))
    dilation = R.dilation_table(runs["E4"], runs["E1"], baselines["table"], s["ablation_config"])
    assert sorted(dilation.dilation.unique()) == [0.0, 0.5]
    depth = R.depth_table(runs["E5"], runs["E1"], baselines["table"], s["ablation_config"])
    assert list(depth.layer) == ["input", "mid", "final"] and depth.input_epg.between(0, 1).all()
    birds = R.birds_runs(runs["E6"], R.birds_baseline_rows(s, baselines, "cpu"))
    assert sorted(birds.model.unique()) == ["baseline", "control", "energy", "l1"]
    assert ((birds.overall >= 0) & (birds.overall <= 100)).all()
    table = R.birds_table(birds)
    assert table.loc[table.model == "Energy", "paper_conv_worst"].item() == "56.1 ± 4.0"
    third = R.third_party_table(baselines["table"], front)
    assert len(third) == 7 and third.loc[0, "3rd-party EPG"] == "0.301" and third["this run EPG"].ne("n/a").all()
    assert list(R.quirks_table().quirk) == [f"Q{i}" for i in range(1, 13)]
    pairs = R.pair_scores(s, 0, baselines, runs["plan"], "cpu")
    assert {key[0] for key in pairs} == {"baseline", "E1", "E3", "E4", "E5"}
    rows = R.findings(s, baselines["table"], summary, R.on_object_table(front, baselines["table"]), fractions, dilation,
                      depth, birds, front, pairs, runs)
    assert len(rows) == 11
    assert all(r["verdict"] in ("reproduced", "partly reproduced", "not reproduced", "inconclusive", "not tested", "n/a")
               for r in rows)
    assert all(r["n"] and r["uncertainty"] for r in rows)


def test_explorer_opens_on_the_energy_guided_model_with_the_target_class_boxes(smoke):
    from study.explore import explorer

    s, runs = smoke["s"], smoke["runs"]
    inputs = R.explorer_inputs(s, runs["plan"], 0, n_images=4, device="cpu")
    assert inputs["images"].shape[0] == 4 and inputs["masks"].shape == (4, 1, *inputs["images"].shape[-2:])
    for i in range(4):  # the mask is the target class's box union, and the target is a true class
        assert inputs["masks"][i, 0].any()
    test = R.load_splits(runs["plan"]["E1"][0]["base"]["recipe"])["test"]
    assert bool((test.labels[torch.arange(4), inputs["targets"]] == 1).all())
    table = explorer(inputs["model"], inputs["images"], inputs["targets"], masks=inputs["masks"], steps=4)
    assert set(table.index) >= {"pointing game", "EPG"} and table["score"].notna().all()
    with pytest.raises(ValueError, match="no λ_mid input-layer 'ppce' run"):
        R.explorer_inputs(s, runs["plan"], 0, loss="ppce")


def test_paper_grid_runs_end_to_end_at_toy_size(private_cache):
    """Every configuration, layer and loss of the paper profile (card §5.4 full grid) trains and is
    analysed; the paper profile itself needs a GPU, so its grid is exercised here at toy size."""
    paper = config.PROFILES["paper"]["rao2023"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = R.settings("smoke", configs=paper["configs"], layers=paper["layers"], losses=paper["losses"],
                       n_train=24, n_valid=16, n_test=16, birds_n_train=16, birds_n_valid=8, birds_n_test=16)
        baselines = R.train_baselines(s, 0, "cpu")
        calibration = R.calibrate(s, baselines, "cpu")
        runs = R.run_finetunes(s, 0, baselines, calibration, "cpu")
    finally:
        torch.set_num_threads(threads)
    grid = {(c, layer, loss) for c in paper["configs"] for layer in (["final"] if c == "vanilla_gradcam" else paper["layers"])
            for loss in paper["losses"]}
    assert len(grid) == 40 and set(zip(runs["E1"].config, runs["E1"].layer, runs["E1"].loss)) == grid
    front = R.pareto_checkpoints(runs["E1"])
    assert set(zip(front.config, front.layer, front.loss)) == grid and front.test_f1.notna().all()
    summary = R.loss_summary(front, baselines["table"])
    assert len(summary) == 40 and np.isfinite(summary.hv_epg).all()


# ----------------------------------------------------------------------------- devices (issue 13)


def test_cached_models_meet_their_inputs_on_the_device(smoke, monkeypatch):
    """Fake device check: every ToyNet must have been moved with `.to(device)` before it runs. Before
    the fix, `train_baselines` evaluated a model loaded from the cache (CPU) on CUDA inputs."""
    s, baselines, runs = smoke["s"], smoke["baselines"], smoke["runs"]
    placed_to, original_to = [], G.ToyNet.to

    def to(self, *args, **kwargs):
        self._placed = True
        placed_to.append(str(args[0]) if args else str(kwargs.get("device")))
        return original_to(self, *args, **kwargs)

    def checked(method):
        def run(self, *args, **kwargs):
            assert getattr(self, "_placed", False), f"{type(self).__name__}.{method.__name__} ran before .to(device)"
            return method(self, *args, **kwargs)
        return run

    monkeypatch.setattr(G.ToyNet, "to", to)
    monkeypatch.setattr(G.ToyNet, "forward", checked(G.ToyNet.forward))
    monkeypatch.setattr(G.ToyNet, "stages", checked(G.ToyNet.stages))
    again = R.train_baselines(s, 0, "cpu")                  # every run cached: only the evaluations run
    pd.testing.assert_frame_equal(again["table"].drop(columns="seconds"), baselines["table"].drop(columns="seconds"))
    R.calibrate(s, baselines, "cpu")
    R.birds_baseline_rows(s, baselines, "cpu")
    R.attribution_gallery(s, baselines, runs["plan"], 0, device="cpu")
    R.pair_scores(s, 0, baselines, runs["plan"], "cpu")
    assert placed_to and set(placed_to) == {"cpu"}


def test_run_workers_get_the_device_as_asked_for(smoke, monkeypatch):
    sent = []
    monkeypatch.setattr(R.parallel, "map_jobs", lambda function, jobs, **kw: sent.extend(jobs) or [0] * len(jobs))
    s = smoke["s"]
    spec = R.baseline_spec(s, R.voc_recipe(s, 0), "bcos", seed=987)  # not trained by the fixture
    R.ensure([spec], device="auto", workers=2)
    assert [job[1] for job in sent] == ["auto"]


# ----------------------------------------------------------------------------- verdict rules


def test_combine_parts_of_a_claim():
    assert R.combine(["reproduced", "reproduced"]) == "reproduced"
    assert R.combine(["reproduced", "not reproduced"]) == "partly reproduced"
    assert R.combine(["not reproduced", "inconclusive"]) == "not reproduced"
    assert R.combine(["reproduced", "inconclusive"]) == "inconclusive"
    assert R.combine(["not tested", "reproduced"]) == "reproduced"
    assert R.combine(["not tested"]) == "not tested"
    with pytest.raises(ValueError, match="part verdicts"):
        R.combine(["partly reproduced"])
    with pytest.raises(ValueError, match="part verdicts"):
        R.combine([])


def _summary(energy, l1, config="bcos", seed=None):
    """One panel per value pair: of one model (`seed` given: layers of that seed's model) or, by default,
    of a model per panel (the i-th pair at the input layer of seed i)."""
    rows = []
    for i, (e, l) in enumerate(zip(energy, l1)):
        for loss, value in (("energy", e), ("l1", l)):
            rows.append({"config": config, "layer": "input" if seed is None else f"layer{i}", "loss": loss,
                         "hv_epg": value, "hv_iou": value, "seed": i if seed is None else seed})
    return pd.DataFrame(rows)


def test_r1_r2_hypervolume_ratio_rule():
    passing = _summary([1.0, 1.1, 1.2, 1.0], [0.5, 0.5, 0.6, 0.5])
    failing = _summary([0.5, 0.5, 0.6, 0.5], [1.0, 1.1, 1.2, 1.0])
    straddle = _summary([0.6, 1.4, 0.7, 1.3], [1.0, 1.0, 1.0, 1.0])        # mean ratio 1.0, wide interval around 0.95
    assert R._r1_energy_best_epg(passing)["verdict"] == "reproduced"
    assert R._r1_energy_best_epg(failing)["verdict"] == "not reproduced"
    assert R._r1_energy_best_epg(straddle)["verdict"] == "inconclusive"
    assert R._r2_l1_best_iou(failing)["verdict"] == "reproduced"
    assert R._r2_l1_best_iou(passing)["verdict"] == "not reproduced"
    row = R._r1_energy_best_epg(passing)
    assert row["n"].startswith("4 stage-1 models (4 panel × seed values; 1 configs × 1 layers × 2 losses × 4 seeds)")
    assert "95% t CI over 4 stage-1 models" in row["uncertainty"]


def _full_grid_summary(losses=("energy", "l1", "ppce", "rrr")):
    paper = config.PROFILES["paper"]["rao2023"]
    return pd.DataFrame([{"config": c, "layer": layer, "loss": loss, "hv_epg": 1.0, "hv_iou": 1.0}
                         for c in paper["configs"] for layer in R.guided_layers(c, paper["layers"]) for loss in losses])


def test_r1_r2_say_whether_they_were_decided_on_the_papers_full_grid():
    full = _full_grid_summary()
    assert len(full) == 40 and set(full[full.config == "vanilla_gradcam"].layer) == {"final"}
    for rule in (R._r1_energy_best_epg, R._r2_l1_best_iou):
        assert "decided on the paper's full grid (4 configs × 3 layers × 4 losses)" in rule(full)["this_run"]
        for part in (_summary([1.0, 1.1], [0.5, 0.5]), _full_grid_summary(("energy", "l1")),
                     full[full.config != "xdnn_intgrad"], full[full.layer != "mid"]):
            text = rule(part)["this_run"]
            assert "not the paper's full grid" in text and "decided on the paper's full grid" not in text


def test_r1_r2_take_each_stage1_model_as_a_unit():
    # The panels of one stage-1 model (family, seed) share its training run and reference F1: their ratios are
    # averaged into one unit. Vanilla I×G and Vanilla Grad-CAM share the vanilla baseline (`baseline_spec` keys
    # by family), so their panels of one seed are one unit.
    vanilla = pd.concat([_summary([2.0, 1.0], [1.0, 1.0], "vanilla_ixg", seed=0),
                         _summary([1.5], [1.0], "vanilla_gradcam", seed=0).assign(layer="final")])
    summary = pd.concat([vanilla, _summary([1.2], [1.0], "bcos", seed=0)], ignore_index=True)
    row = R._r1_energy_best_epg(summary)
    # units: vanilla (2.0 + 1.0 + 1.5) / 3 = 1.5 and B-cos 1.2; mean 1.35, t(1) interval 1.35 ± 12.706 × 0.15
    assert row["uncertainty"].startswith("1.350 [-0.556, 3.256], 95% t CI over 2 stage-1 models")
    assert row["n"].startswith("2 stage-1 models (4 panel values;") and "2.00, 1.00, 1.50, 1.20" in row["this_run"]
    assert row["verdict"] == "inconclusive"
    # three layers of one model whose ratios all clear 0.95 are still one unit: its mean, no interval
    one_model = _summary([1.0, 1.1, 1.2], [0.5, 0.5, 0.5], seed=0)
    assert R._r1_energy_best_epg(one_model)["n"].startswith("1 stage-1 models")
    seeds = [_summary(e, l, seed=k) for k, (e, l) in enumerate([([1.0, 1.1], [0.5, 0.5]), ([1.2, 1.0], [0.6, 0.5]),
                                                                ([1.1, 1.3], [0.5, 0.6])])]
    passing = pd.concat(seeds, ignore_index=True)
    row = R._r1_energy_best_epg(passing)
    assert row["verdict"] == "reproduced" and row["n"].startswith("3 stage-1 models (6 panel × seed values") \
        and "3 seeds" in row["n"]
    assert "per panel and seed" in row["this_run"] and "over 3 stage-1 models" in row["uncertainty"]
    failing = passing.assign(loss=passing.loss.map({"energy": "l1", "l1": "energy"}))
    assert R._r1_energy_best_epg(failing)["verdict"] == "not reproduced"
    # one seed whose ratio flips: the interval over 3 models straddles 0.95
    mixed = pd.concat([seeds[0], seeds[1], seeds[2].assign(loss=seeds[2].loss.map({"energy": "l1", "l1": "energy"}))])
    assert R._r1_energy_best_epg(mixed)["verdict"] == "inconclusive"
    means = R.over_seeds(passing)
    assert len(means) == 4 and means.loc[(means.layer == "layer0") & (means.loss == "energy"), "hv_epg"].item() == \
        pytest.approx((1.0 + 1.2 + 1.1) / 3)


def test_stage1_model_means_pool_the_panels_of_one_model():
    frame = pd.DataFrame({"config": ["vanilla_ixg", "vanilla_gradcam", "bcos", "vanilla_ixg", "xdnn_intgrad"],
                          "seed": [0, 0, 0, 1, 1]})
    np.testing.assert_allclose(R.stage1_model_means(frame, [1.0, 3.0, 5.0, np.nan, 7.0]), [2.0, 5.0, 7.0])
    np.testing.assert_allclose(R.stage1_model_means(frame.drop(columns="seed"), [1.0, 3.0, 5.0, 2.0, 7.0]),
                               [2.0, 5.0, 7.0])  # no seed column: one seed
    with pytest.raises(ValueError, match="one value per row"):
        R.stage1_model_means(frame, [1.0, 2.0])
    with pytest.raises(ValueError, match="unknown configuration"):
        R.stage1_model_means(frame.assign(config="resnet"), [1.0] * 5)


def test_pareto_fronts_are_per_seed_never_pooled():
    # seed 1 dominates seed 0 everywhere; pooled fronts would drop every seed-0 checkpoint
    rows = pd.DataFrame([{"config": "bcos", "layer": "input", "loss": "energy", "seed": seed, "epoch": epoch,
                          "valid_f1": 0.5 + 0.3 * seed + 0.01 * epoch, "valid_epg": 0.5 + 0.3 * seed - 0.01 * epoch,
                          "valid_iou": 0.2, "test_f1": 0.5, "test_epg": 0.5} for seed in (0, 1) for epoch in range(3)])
    front = R.pareto_checkpoints(rows)
    assert sorted(front.seed.unique()) == [0, 1] and len(front) == 6


def _on_object(difference):
    """One panel per difference, each of its own stage-1 model (seed i)."""
    difference = np.asarray(difference, float)
    return pd.DataFrame({"config": "bcos", "layer": "input", "seed": np.arange(len(difference)), "uniform_map": 0.5,
                         "baseline": 0.6, "energy": 0.6 + difference, "l1": 0.6})


def test_r3_on_object_rule_and_nan_share():
    assert R._r3_energy_on_object(_on_object([0.10, 0.12, 0.09, 0.11]))["verdict"] == "reproduced"
    assert R._r3_energy_on_object(_on_object([-0.10, -0.12, -0.09, -0.11]))["verdict"] == "not reproduced"
    assert R._r3_energy_on_object(_on_object([0.10, -0.10, 0.05, -0.04]))["verdict"] == "inconclusive"
    missing = _on_object([0.1, 0.1]).assign(energy=np.nan, l1=np.nan)  # VOC2007 without segmentation masks
    row = R._r3_energy_on_object(missing)
    assert row["verdict"] == "not tested" and "segmentation" in row["this_run"]
    # two layers of each of two models: the interval is over the 2 model means (+0.11, +0.10), not the 4 panels
    two_models = _on_object([0.10, 0.12, 0.09, 0.11]).assign(seed=[0, 0, 1, 1])
    row = R._r3_energy_on_object(two_models)
    assert row["n"] == "2 stage-1 models (4 panel × seed values)"
    assert row["uncertainty"].startswith("0.105 [0.041, 0.169], 95% t CI over 2 stage-1 models")


def _front_panel(lose, keep):
    base = pd.DataFrame([{"config": "bcos", "layer": "input", "test_f1": 0.8, "test_epg": 0.5, "test_iou": 0.2,
                          "test_iou05": 0.1, "test_on_object": 0.5, "uniform_epg": 0.3}])
    front = pd.DataFrame([{"config": "bcos", "layer": "input", "test_epg": 0.7, "test_f1": 0.7}] * lose
                         + [{"config": "bcos", "layer": "input", "test_epg": 0.7, "test_f1": 0.85}] * keep,
                         columns=["config", "layer", "test_epg", "test_f1"])
    return base, front


def test_r6_compares_each_checkpoint_with_its_own_seeds_baseline():
    base, front = _front_panel(0, 10)  # 10 checkpoints at F1 0.85, EPG 0.7
    base = pd.concat([base.assign(seed=0), base.assign(seed=1, test_f1=0.9)], ignore_index=True)
    front = pd.concat([front.assign(seed=0), front.assign(seed=1)], ignore_index=True)
    row = R._r6_localisation_vs_f1(base, front)  # seed 0: F1 kept (0.85 ≥ 0.8); seed 1: F1 lost (0.85 < 0.9)
    assert "10 lose F1 and 10 keep" in row["this_run"]


def _front_units(counts):
    """Baselines and front checkpoints of several (configuration, seed) units, one per (lose, keep) pair."""
    bases, fronts = [], []
    for seed, (lose, keep) in enumerate(counts):
        base, front = _front_panel(lose, keep)
        bases.append(base.assign(seed=seed))
        fronts.append(front.assign(seed=seed))
    return pd.concat(bases, ignore_index=True), pd.concat(fronts, ignore_index=True)


def test_r6_trade_off_rule():
    assert R._r6_localisation_vs_f1(*_front_units([(30, 5)] * 3))["verdict"] == "reproduced"
    assert R._r6_localisation_vs_f1(*_front_units([(3, 30)] * 3))["verdict"] == "partly reproduced"   # usually improves both
    assert R._r6_localisation_vs_f1(*_front_units([(18, 17), (17, 18), (19, 16)]))["verdict"] == "inconclusive"
    assert R._r6_localisation_vs_f1(*_front_panel(0, 0))["verdict"] == "not tested"


def test_r6_counts_units_not_correlated_checkpoints():
    # 3 units lose F1 at 35 of 40 front checkpoints, 2 units at 5 of 40: 115 of 200 checkpoints (Wilson [0.51, 0.64],
    # "usually" if checkpoints were independent), but a resample of the 5 units has <= 2 of the first kind in 32% of draws
    passing = _front_units([(35, 5)] * 5)
    failing = _front_units([(35, 5)] * 3 + [(5, 35)] * 2)
    assert R._r6_localisation_vs_f1(*passing)["verdict"] == "reproduced"
    row = R._r6_localisation_vs_f1(*failing)
    assert row["verdict"] == "inconclusive"
    assert row["n"] == "200 front checkpoints in 5 stage-1 models"
    assert "share losing F1 0.57 [" in row["uncertainty"] and "bootstrap over 5 stage-1 models" in row["uncertainty"]


def test_r6_pools_the_configurations_of_one_stage1_model():
    # Vanilla I×G and Vanilla Grad-CAM fine-tune one vanilla baseline: one unit (7 of 10 lose F1), with B-cos's
    base, front = _front_panel(3, 2)
    bases = [base.assign(config=c, seed=0) for c in ("vanilla_ixg", "vanilla_gradcam", "bcos")]
    fronts = [front.assign(config="vanilla_ixg", seed=0), _front_panel(4, 1)[1].assign(config="vanilla_gradcam", seed=0),
              _front_panel(1, 4)[1].assign(config="bcos", seed=0)]
    row = R._r6_localisation_vs_f1(pd.concat(bases, ignore_index=True), pd.concat(fronts, ignore_index=True))
    assert row["n"] == "15 front checkpoints in 2 stage-1 models" and "8 lose F1 and 7 keep" in row["this_run"]


def test_cluster_share_is_scipys_bca_interval_over_paired_units():
    # The BCa interval, chosen by benchmarks/ratio_interval_coverage.py (its worst coverage over the
    # simulated rows is the highest of percentile, BCa and the linearised ratio t at 12 units).
    counts, totals = np.array([3, 9, 0, 14, 5, 7.0]), np.array([30, 28, 25, 40, 33, 36.0])
    share, low, high = R.cluster_share(counts, totals, seed=3)
    ci = stats.bootstrap((counts, totals), lambda c, t, axis=-1: c.sum(axis) / t.sum(axis), paired=True,
                         vectorized=True, n_resamples=2000, method="BCa",
                         random_state=np.random.default_rng(3)).confidence_interval
    assert share == pytest.approx(38 / 192, abs=1e-12)
    assert (low, high) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert low < share < high


def test_cluster_share_interval_known_answer_and_bad_input():
    # two units (1 of 2, 3 of 4): resamples give 2/4, 4/6 or 6/8, so the 95% interval (BCa, as percentile) is [0.5, 0.75]
    share, low, high = R.cluster_share([1, 3], [2, 4])
    assert share == pytest.approx(4 / 6) and low == pytest.approx(0.5) and high == pytest.approx(0.75)
    assert R.cluster_share([3], [4]) == (0.75, 0.75, 0.75)  # one unit: nothing to resample
    with pytest.raises(ValueError, match="count"):
        R.cluster_share([5], [4])
    with pytest.raises(ValueError, match="count"):
        R.cluster_share([1, 2], [2])
    with pytest.raises(ValueError, match="count"):
        R.cluster_share([0], [0])


def _pairs(values: dict, n: int = 40) -> dict:
    """Per-pair score frames, one pair per image, for the keys of `values` (seed 0 appended)."""
    out = {}
    for key, value in values.items():
        epg = np.broadcast_to(np.asarray(value, float), (n,))
        out[(*key, 0)] = pd.DataFrame({"image": np.arange(n), "epg": epg, "iou": epg})
    return out


def _r7(base, few, some, full):
    s = {"fractions": [0.01, 0.1], "ablation_config": "bcos"}
    fractions = pd.DataFrame({"loss": "energy", "fraction": [0.01, 0.1, 1.0], "epg_gain": [0.0, 0.0, 0.0]})
    pairs = _pairs({("baseline", "bcos", "input"): base, ("E3", "energy", 0.01): few, ("E3", "energy", 0.1): some,
                    ("E1", "bcos", "input", "energy"): full})
    return R._r7_few_boxes(s, fractions, pairs)


def test_per_image_units_count_image_seed_pairs():
    pairs = _pairs({("baseline", "bcos", "input"): 0.3, ("E3", "energy", 0.01): 0.5})
    pairs.update({(*key[:-1], 1): frame for key, frame in list(pairs.items())})  # a second seed, 40 more images
    values = R.per_image_contrast(pairs, {("E3", "energy", 0.01): 1, ("baseline", "bcos", "input"): -1})
    assert values.shape == (80,) and np.allclose(values, 0.2)
    assert R._unit(pairs) == "test image × seed pairs (2 seeds)"  # "80 test image × seed pairs", not 80 × 2


def test_r7_few_boxes_rule_on_per_image_differences():
    assert _r7(0.3, 0.5, 0.55, 0.58)["verdict"] == "reproduced"
    # the text's gains are dataset means over (image, class) pairs; the intervals' means weigh every image once
    assert "pairs" in R.PAIR_MEANS and R.PAIR_MEANS in _r7(0.3, 0.5, 0.55, 0.58)["this_run"]
    assert _r7(0.3, 0.3, 0.3, 0.58)["verdict"] == "not reproduced"
    noise = np.tile([0.3, -0.3], 20)                      # gain at 1%: mean exactly the 0.02 threshold, wide interval
    row = _r7(0.3, 0.32 + noise, 0.35, 0.33)
    assert row["verdict"] == "inconclusive" and row["n"] == "40 test images (1 seed)"
    with pytest.raises(ValueError, match="no per-pair scores"):
        R.per_image_contrast({}, {("E3", "energy", 0.01): 1})
    with pytest.raises(ValueError, match="at least one"):
        R.per_image_contrast({}, {})


def test_r8_dilation_rule():
    s = {"dilations": [0.25, 0.5], "ablation_config": "bcos"}
    dilation = pd.DataFrame({"loss": ["energy", "energy", "l1", "l1"], "dilation": [0.0, 0.5, 0.0, 0.5],
                             "test_epg": [0.6, 0.6, 0.6, 0.5]})
    values = lambda e0, e5, l0, l5: _pairs({("E1", "bcos", "input", "energy"): e0, ("E4", "energy", 0.5): e5,  # noqa: E731
                                            ("E1", "bcos", "input", "l1"): l0, ("E4", "l1", 0.5): l5})
    assert R._r8_coarse_boxes(s, dilation, values(0.6, 0.6, 0.6, 0.5))["verdict"] == "reproduced"
    assert R.PAIR_MEANS in R._r8_coarse_boxes(s, dilation, values(0.6, 0.6, 0.6, 0.5))["this_run"]
    assert R._r8_coarse_boxes(s, dilation, values(0.6, 0.4, 0.6, 0.6))["verdict"] == "not reproduced"


def _birds(energy_minus_control):
    rows = []
    for seed, delta in enumerate(energy_minus_control):
        for task in ("conventional", "reversed"):
            for model, worst in (("baseline", 5.0), ("control", 5.0), ("energy", 5.0 + delta), ("l1", 5.0 + delta / 2)):
                if task == "reversed":
                    worst = 100.0
                rows.append({"task": task, "seed": seed, "model": model, "worst": worst, "min_group": worst - 1,
                             "overall": 50 + worst / 2})
    return pd.DataFrame(rows)


def test_table1_rule_is_a_paired_comparison_over_seeds():
    s = {"birds_seeds": 8}
    passing = R._table1_shift(s, _birds([20, 22, 18, 25, 19, 21, 23, 20]))
    assert passing["verdict"] == "reproduced" and passing["n"] == "8 seeds"
    assert "ceiling" in passing["this_run"] and "minimum over groups" in passing["this_run"]
    assert "rev. minimum over groups 99.0 → 99.0 / 99.0" in passing["this_run"]  # the card: report both, both tasks
    assert "paired t CI over 8 seeds" in passing["uncertainty"]
    assert R._table1_shift(s, _birds([-20, -22, -18, -25, -19, -21, -23, -20]))["verdict"] == "not reproduced"
    assert R._table1_shift(s, _birds([30, -30] * 4))["verdict"] == "inconclusive"
    with pytest.raises(ValueError, match="equal-length"):
        R._paired([1.0, 2.0], [1.0])


def _grid_rows(select_min, select_overall=None, test_worst=None):
    """E6 final rows of one (task, loss, seed) at λ = 3, 10, 30 plus its λ = 0 control."""
    lams = [3.0, 10.0, 30.0]
    select_overall = select_overall or [50.0] * 3
    test_worst = test_worst or [0.0, 0.0, 0.0]
    rows = [{"task": "conventional", "loss": "energy", "seed": 0, "lam": lam, "select_min_group": m,
             "select_overall": o, "worst": w} for lam, m, o, w in zip(lams, select_min, select_overall, test_worst)]
    rows.append({"task": "conventional", "loss": "energy", "seed": 0, "lam": 0.0, "select_min_group": 99.0,
                 "select_overall": 99.0, "worst": 99.0})
    return pd.DataFrame(rows)


def test_birds_lambda_is_chosen_on_the_selection_split_never_on_test():
    chosen = R.select_birds_lambda(_grid_rows([10.0, 40.0, 20.0], test_worst=[90.0, 0.0, 0.0]))
    assert chosen[chosen.chosen].lam.tolist() == [10.0, 0.0]                 # best selection min-group; control kept
    flipped = R.select_birds_lambda(_grid_rows([10.0, 20.0, 40.0], test_worst=[90.0, 0.0, 0.0]))
    assert flipped[flipped.chosen].lam.tolist() == [30.0, 0.0]               # the choice follows the selection split
    tie = R.select_birds_lambda(_grid_rows([40.0, 40.0, 40.0], select_overall=[60.0, 70.0, 70.0]))
    assert tie[tie.chosen].lam.tolist() == [10.0, 0.0]                       # tie → higher overall → smaller λ
    table = R.birds_lambda_table(_grid_rows([10.0, 40.0, 20.0]))
    assert table.chosen_by_seeds.tolist() == [0, 1, 0] and table.seeds.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="select_min_group"):
        R.select_birds_lambda(_grid_rows([1.0, 2.0, 3.0]).drop(columns="select_min_group"))


def test_birds_lambda_grid_keeps_guidance_per_training_set_constant():
    s = R.settings("quick")
    assert R.birds_lambdas(s, "energy") == pytest.approx([3.0, 10.0, 30.0])      # at 1% of the boxes
    assert R.birds_lambdas({**s, "birds_fraction": 0.1}, "l1") == pytest.approx([10.0, 30.0, 100.0])
    with pytest.raises(ValueError, match="ppce"):
        R.birds_lambdas(s, "ppce")


def test_synthbirds_selection_split_is_balanced_and_disjoint_from_test():
    s = R.settings("smoke")
    birds = R.load_birds(s, 0, "conventional")
    select = R.selection_split(birds)
    assert len(select) == s["birds_n_select"]
    assert [int((select.group == g).sum()) for g in range(4)] == [4, 4, 4, 4]   # balanced like test
    assert not any(torch.equal(a, b) for a in select.images[:4] for b in birds["test"].images)
    assert R.selection_split({"valid": birds["valid"]}) is birds["valid"]        # real Waterbirds: validation


def test_adding_the_selection_split_leaves_the_other_splits_data_alone():
    s = R.settings("smoke")
    with_select, without = R.load_birds(s, 0), R.load_birds({**s, "birds_n_select": 0}, 0)
    assert "select" in with_select and "select" not in without
    for split in ("train", "valid", "test"):
        assert torch.equal(with_select[split].images, without[split].images)


def test_a_run_stored_on_older_generated_data_is_not_reused(monkeypatch):
    """A run's key holds its whole spec (baseline inside a fine-tune) and the generators' version."""
    from study import data
    s = R.settings("smoke")
    base = R.baseline_spec(s, R.voc_recipe(s, 0), "bcos", 0)
    tune = R.finetune_spec(s, base, "bcos", "input", "energy", 1.0)
    paths = (R._path(base), R._path(tune))
    assert R._path(R.baseline_spec(s, R.voc_recipe(s, 1), "bcos", 0)) != paths[0]
    assert R._path({**tune, "base": R.baseline_spec(s, R.voc_recipe(s, 1), "bcos", 0)}) != paths[1]
    monkeypatch.setattr(data, "GENERATOR_VERSION", data.GENERATOR_VERSION + 1)
    assert R._path(base) != paths[0] and R._path(tune) != paths[1]
