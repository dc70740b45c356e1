"""Bring your own classifier and images to notebook 02 (issue 15, item 3).

A fixture ImageFolder tree (3 classes × 3 small PNGs, Pascal-VOC XML boxes beside some of them) and
a randomly initialised torchvision ResNet-18 with 3 outputs saved as a state dict: notebook 02 runs
end to end on them at the smoke profile through the runner, with and without boxes, and every bad
input stops with a ValueError naming the parameter.
"""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from study import config, imagenet
from study.experiments import vandersmissen2024 as V

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("cat", "dog", "fox")
SIZE = 48  # the fixture's images: 48 × 40 px


def _xml(path, filename, width, height, objects):
    body = "".join(f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
                   f"<ymax>{y1}</ymax></bndbox></object>" for name, x0, y0, x1, y1 in objects)
    path.write_text(f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}"
                    f"</height><depth>3</depth></size>{body}</annotation>")


def _folder(root, boxes: bool):
    """3 class folders × 3 PNGs with a bright square on noise; with `boxes`, VOC XML for 2 of each
    class (the square's box, named by its class folder) and one for a box of another class only."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 80, (40, SIZE, 3), dtype=np.uint8)
            x0, y0 = 4 + 8 * i, 6 + 4 * c
            pixels[y0:y0 + 16, x0:x0 + 16, c] = 255
            Image.fromarray(pixels).save(root / name / f"img{i}.png")
            if boxes and i < 2:
                _xml(root / name / f"img{i}.xml", f"img{i}.png", SIZE, 40,
                     [(name, x0, y0, x0 + 16, y0 + 16), ("person", 20, 20, 30, 30)])
        if boxes:  # the third image's box names another class: no target box, so it is dropped
            _xml(root / name / "img2.xml", "img2.png", SIZE, 40, [(CLASSES[(c + 1) % 3], 0, 0, 10, 10)])
    return root


@pytest.fixture(scope="module")
def fixture(tmp_path_factory, random_weights):
    root = tmp_path_factory.mktemp("byo")
    return {"boxes": _folder(root / "with_boxes", True), "plain": _folder(root / "plain", False),
            "weights": random_weights(root / "resnet18.pt"), "root": root}


def _run(folder, weights, out, cache):
    env = {**os.environ, "STUDY_CACHE_DIR": str(cache), "STUDY_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "study", "run", "02_coherence_of_evaluation", "-p", "profile", "smoke",
                           "-p", "dataset", "folder", "-p", "data_root", str(folder), "-p", "model", "resnet18",
                           "-p", "weights_path", str(weights), "-p", "image_size", "64", "--output-dir", str(out)],
                          capture_output=True, text=True, cwd=config.ROOT, env=env, timeout=900)


def _executed_text(out) -> str:
    import nbformat

    notebook = nbformat.read(next(out.rglob("02_coherence_of_evaluation*.ipynb")), as_version=4)
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", "") or str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(texts)


def test_notebook_02_runs_on_your_own_folder_and_model(fixture, tmp_path):
    out = tmp_path / "runs"
    done = _run(fixture["boxes"], fixture["weights"], out, tmp_path / "cache")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    findings = list(out.rglob("findings.csv"))
    assert len(findings) == 1
    table = pd.read_csv(findings[0])
    assert len(table) == 9 and table["verdict"].isin(["reproduced", "partly reproduced", "not reproduced",
                                                      "inconclusive"]).all()  # boxes: every claim tested
    text = _executed_text(out)
    assert "images dropped because no target-class box lies inside the crop: 3" in text
    assert "resnet18" in text


def test_notebook_02_without_boxes_skips_localisation_and_says_so(fixture, tmp_path):
    out = tmp_path / "runs"
    done = _run(fixture["plain"], fixture["weights"], out, tmp_path / "cache")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = pd.read_csv(next(out.rglob("findings.csv")))
    skipped = table[table["verdict"] == "not tested"]
    assert len(skipped) == 2 and skipped["claim"].str.contains("pointing game").all()
    assert skipped["this_run"].str.contains("no bounding boxes").all()
    assert (table["verdict"] != "not tested").sum() == 7
    text = _executed_text(out)
    assert "no bounding boxes" in text and "skipped" in text


def test_folder_loader_boxes_geometry_and_selection(fixture):
    geometry = imagenet.input_settings("resnet18", 64)
    assert geometry == {"resize": 73, "crop": 64, "mean": imagenet.IMAGENET_MEAN, "std": imagenet.IMAGENET_STD}
    assert imagenet.input_settings("inception_v3")["crop"] == 299
    out = imagenet.load_image_folder(fixture["boxes"], resize=73, crop=64)
    assert out["classes"] == list(CLASSES) and out["localisation"]
    assert out["images"].shape == (6, 3, 64, 64) and out["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    assert out["dropped_no_target_box"] == 3 and all(f.endswith("img2.png") for f in out["dropped_files"])
    # the square's box follows Resize(73) → CenterCrop(64): r = 73/40, shift ((48·r − 64)/2, (40·r − 64)/2)
    r = 73 / 40
    x0 = 12 * r - (SIZE * r - 64) / 2  # cat/img1.png: the square starts at x = 12
    target = out["boxes"][1][out["boxes"][1][:, 0] == 0][0]
    assert target[1] == int(np.floor(x0)) and out["masks"][1, 0].sum() > 0
    assert (out["boxes"][1][:, 0] == -1).sum() == 1  # "person" is no class folder: kept as class −1
    plain = imagenet.load_image_folder(fixture["plain"], n_images=4, resize=73, crop=64)
    assert not plain["localisation"] and plain["masks"] is None and len(plain["labels"]) == 6  # 2 per class
    prepared = V.prepare_folder("smoke", 0, fixture["plain"], "resnet18", image_size=64)
    evaluation = V.evaluation_set(prepared, 5)
    assert evaluation["masks"] is None and len(evaluation["labels"]) == 5


def test_model_loads_with_its_gradcam_layer(fixture, tmp_path, random_weights):
    net = imagenet.torchvision_model("resnet18", fixture["weights"], 3, image_size=64)
    assert net.gradcam_layer == "layer4" and not any(getattr(m, "inplace", False) for m in net.modules())
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
    # the ImageNet path's layers are unchanged: the ReLU after VGG16's last conv, ResNet50's layer4
    from torchvision import models

    assert imagenet.gradcam_layer(models.vgg16(weights=None)) == "features.29"
    assert imagenet.gradcam_layer(models.resnet50(weights=None), 64) == "layer4"
    small = imagenet.torchvision_model("squeezenet1_1", random_weights(tmp_path / "sq.pt", "squeezenet1_1"), 3,
                                       image_size=64)
    with torch.no_grad():
        assert small(torch.zeros(1, 3, 64, 64)).shape == (1, 3) and small.gradcam_layer is not None


def test_bad_input_names_the_parameter(fixture, tmp_path, random_weights):
    weights = fixture["weights"]

    def setup(**kwargs):
        args = {"dataset": "folder", "data_root": fixture["plain"], "model": "resnet18", "weights_path": weights,
                "image_size": 32, "device": "cpu", **kwargs}
        return V.setup("smoke", 0, **args)

    with pytest.raises(ValueError, match="data_root"):
        setup(data_root=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="data_root"):
        setup(data_root=tmp_path / "empty")
    with pytest.raises(ValueError, match="model='resnet_18' is not a torchvision"):
        setup(model="resnet_18")
    with pytest.raises(ValueError, match="needs model"):
        setup(model=None)
    with pytest.raises(ValueError, match="weights_path"):
        setup(weights_path=tmp_path / "none.pt")
    # 4 class folders, a model with 3 outputs
    extra = tmp_path / "four"
    _folder(extra, False)
    (extra / "owl").mkdir()
    Image.fromarray(np.zeros((40, SIZE, 3), np.uint8)).save(extra / "owl" / "a.png")
    with pytest.raises(ValueError, match=r"data_root has 4 class folders.*3 outputs.*model='resnet18'.*weights_path"):
        setup(data_root=extra)
    # a weights file of another architecture
    with pytest.raises(ValueError, match=r"weights_path .* is not a torchvision resnet34 state dict"):
        setup(model="resnet34")
    other = random_weights(tmp_path / "squeezenet.pt", "squeezenet1_1")
    with pytest.raises(ValueError, match=r"weights_path .* is not a torchvision resnet18 state dict"):
        setup(weights_path=other)
    junk = tmp_path / "junk.pt"
    torch.save([1, 2, 3], junk)
    with pytest.raises(ValueError, match="weights_path"):
        setup(weights_path=junk)
    with pytest.raises(ValueError, match="image_size"):
        setup(image_size=0)
    with pytest.raises(ValueError, match="std"):
        setup(std=(0.2, 0.2))
    with pytest.raises(ValueError, match="model and weights_path apply"):
        V.setup("smoke", 0, "synth_objects_64", model="resnet18")
    with pytest.raises(ValueError, match="former name"):
        setup(imagenet_arch="vgg16")


def test_a_box_xml_whose_size_disagrees_with_the_image_is_refused(tmp_path):
    root = _folder(tmp_path / "f", True)
    _xml(root / "cat" / "img0.xml", "img0.png", 100, 100, [("cat", 0, 0, 50, 50)])
    with pytest.raises(ValueError, match="data_root.*size 100×100"):
        imagenet.load_image_folder(root, resize=73, crop=64)
