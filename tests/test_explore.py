"""The explorer widget: driven through its controls, its outputs follow."""
import numpy as np
import pytest
import torch

import study  # noqa: F401
from study import data
from study.explore import explain_and_score, explorer, parse_options
from study.models import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def interactive(monkeypatch):
    """The suite runs headless (conftest sets STUDY_HEADLESS=1 for nbval's kernels); these tests
    drive the widgets, as in JupyterLab."""
    monkeypatch.delenv("STUDY_HEADLESS", raising=False)


@pytest.fixture(scope="module")
def setup():
    arrays = data.make_shapes(4, 0, "synth_objects_64")
    images = torch.as_tensor(arrays["images"])[:, :, ::2, ::2].contiguous()  # 32 px keeps it fast
    masks = torch.as_tensor(arrays["masks"])[:, :, ::2, ::2].contiguous()
    torch.manual_seed(0)
    model = SmallCNN(in_channels=3, num_classes=6, width=4, image_size=32).eval()
    return model, images, torch.as_tensor(arrays["labels"]), masks


def test_controls_drive_the_map_the_curve_and_the_scores(setup):
    model, images, labels, masks = setup
    box = explorer(model, images, labels, masks=masks, steps=8)
    first = box.result
    assert set(first["scores"]) == {"deletion AUC", "insertion AUC", "AOPC (MoRF)", "Average Drop %",
                                    "pointing game", "EPG"}
    assert len(first["curve"]) == 9 and box.progress.value == 0  # idle
    box.controls["method"].value = "sobel"
    assert not torch.equal(box.result["map"], first["map"])
    box.controls["image"].value = 2
    assert box.result["scores"] != first["scores"]
    box.controls["curve"].value = "insertion (MoRF)"
    assert box.result["curve_name"] == "insertion (MoRF)"
    box.controls["method"].value = "integrated_gradients"
    box.controls["options"].value = "{'steps': 4}"
    assert box.status.value == "" and box.result["map"].shape == (1, 32, 32)
    box.controls["options"].value = "steps=4"  # not a dict: shown as a message, nothing raised
    assert "dict literal" in box.status.value and box.result is None  # no stale scores
    box.controls["options"].value = "{'steps': 4}"
    box.controls["method"].value = "gradient"  # IG's options are cleared, not reported as unknown
    assert box.controls["options"].value == "" and box.status.value == "" and box.result["map"].shape == (1, 32, 32)
    assert box.controls["image"].continuous_update is False  # dragging does not queue one computation per step


def test_ground_truth_map_is_offered_only_with_masks_or_boxes_and_points_at_the_object(setup):
    model, images, labels, masks = setup
    assert "ground_truth" not in explorer(model, images, labels, steps=4).controls["method"].options
    result = explain_and_score(model, images[0], int(labels[0]), "ground_truth", mask=masks[0], steps=4)
    assert result["scores"]["pointing game"] == 1.0 and result["scores"]["EPG"] == pytest.approx(1.0)
    boxes = np.array([[0, 0, 0, 8, 8]])
    from_boxes = explain_and_score(model, images[0], 0, "gradient", boxes=boxes, steps=4)
    assert from_boxes["region"].sum() == 64


def test_a_mask_still_attached_to_a_graph_or_a_device_is_read_on_the_cpu(setup):
    # the masks are converted to numpy for the pointing game: a CUDA mask (or, here on the CPU, one
    # that requires grad) must be detached and moved first, not fail in .numpy()
    model, images, labels, masks = setup
    plain = explain_and_score(model, images[0], int(labels[0]), "gradient", mask=masks[0], steps=4)
    tracked = explain_and_score(model, images[0], int(labels[0]), "gradient",
                                mask=masks[0].float().requires_grad_(), steps=4)
    assert tracked["scores"] == plain["scores"]


def test_bad_input_is_a_clear_value_error(setup):
    model, images, labels, _ = setup
    with pytest.raises(ValueError, match="one class per image"):
        explorer(model, images, labels[:2])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        explorer(model, images[0], labels)
    with pytest.raises(ValueError, match="unknown post-processing"):
        explain_and_score(model, images[0], 0, "gradient", postprocessing="sharpen")
    with pytest.raises(ValueError, match="dict"):
        parse_options("[1, 2]")
    assert parse_options("") == {} and parse_options("{'steps': 3}") == {"steps": 3}


def test_headless_kernels_get_the_first_views_scores_and_no_widget(setup, monkeypatch, capsys):
    """Under papermill / nbval (STUDY_HEADLESS=1) no widget is opened (nbclient can hang on them)."""
    model, images, labels, masks = setup
    widget = explorer(model, images, labels, masks=masks, steps=8)
    monkeypatch.setenv("STUDY_HEADLESS", "1")
    table = explorer(model, images, labels, masks=masks, steps=8)
    assert "interactive" in capsys.readouterr().out
    assert table["score"].to_dict() == pytest.approx({k: round(v, 3) for k, v in widget.result["scores"].items()})
    with pytest.raises(ValueError, match="unknown method|method"):
        explorer(model, images, labels, methods=["magic"])
