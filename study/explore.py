"""The interactive explorer: image × attribution method × post-processing × metric, live in JupyterLab.

`explorer(model, images, targets, masks=None, boxes=None)` returns an ipywidgets box. Pick an image,
a method from `study.attribution.METHODS` and its options (a Python dict literal), a post-processing
chain and the perturbation curve to draw; the map is recomputed on every change and shown over the
image (with the mask outline and the boxes), next to the deletion/insertion curve and the scores:
deletion and insertion AUC, AOPC (MoRF), Average Drop %, and, with masks or boxes, the pointing
game and the energy-based pointing game (EPG). The scoring is `explain_and_score`, usable without
widgets.
"""

from __future__ import annotations

import ast
import os

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import display

from study import attribution, metrics, plots

POSTPROCESSING = {
    "none": [],
    "absolute": ["absolute"],
    "positive part": ["positive_part"],
    "absolute, blur σ=1": ["absolute", ("gaussian_blur", {"sigma": 1.0})],
    "positive part, min–max": ["positive_part", "normalise_minmax"],
    "absolute, top 10% binarised": ["absolute", ("binarise_top_k", {"fraction": 0.1})],
}
CURVES = {"deletion (MoRF)": ("morf", "deletion"), "insertion (MoRF)": ("morf", "insertion"),
          "deletion (LeRF)": ("lerf", "deletion")}
DEFAULT_METHODS = ("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "gradcam", "occlusion",
                   "random", "sobel", "centre_gaussian", "ground_truth")


def parse_options(text: str) -> dict:
    """'{"steps": 16}' → {'steps': 16}; an empty text is no options."""
    if not text.strip():
        return {}
    try:
        options = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"options must be a Python dict literal such as {{'steps': 16}}, got {text!r}") from None
    if not isinstance(options, dict):
        raise ValueError(f"options must be a dict, got {type(options).__name__}")
    return options


def explain_and_score(model: torch.nn.Module, image: torch.Tensor, target: int, method: str, options: dict | None = None,
                      postprocessing: str = "none", curve: str = "deletion (MoRF)", mask: torch.Tensor | None = None,
                      boxes: np.ndarray | None = None, steps: int = 20) -> dict:
    """The map of one (C, H, W) image for `target`, its perturbation curve and its scores."""
    if postprocessing not in POSTPROCESSING:
        raise ValueError(f"unknown post-processing {postprocessing!r}; choose one of {list(POSTPROCESSING)}")
    if curve not in CURVES:
        raise ValueError(f"unknown curve {curve!r}; choose one of {list(CURVES)}")
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise ValueError(f"image must be a (C, H, W) tensor, got {getattr(image, 'shape', type(image).__name__)}")
    options = dict(options or {})
    images, targets = image[None], torch.tensor([int(target)])
    masks = None if mask is None else torch.as_tensor(mask).detach().cpu().reshape(1, 1, *image.shape[-2:]).float()
    if method == "ground_truth":
        if masks is None and boxes is None:
            raise ValueError("the ground_truth map needs masks or boxes")
        options.setdefault("masks" if masks is not None else "boxes", masks if masks is not None else [boxes])
    maps = attribution.explain(model, images, targets, method, **options)
    maps = attribution.postprocess(maps, POSTPROCESSING[postprocessing]) if POSTPROCESSING[postprocessing] else maps
    order, mode = CURVES[curve]
    curves = {name: metrics.perturbation_curve(model, images, maps, targets, order=o, mode=m, steps=steps)[0]
              for name, (o, m) in CURVES.items()}
    scores = {"deletion AUC": float(metrics.auc(curves["deletion (MoRF)"][None])[0]),
              "insertion AUC": float(metrics.auc(curves["insertion (MoRF)"][None])[0]),
              "AOPC (MoRF)": float(metrics.aopc(curves["deletion (MoRF)"][None])[0]),
              "Average Drop %": float(metrics.average_drop_increase(model, images, maps, targets)["average_drop"][0])}
    region = masks if masks is not None else (
        torch.as_tensor(metrics.boxes_to_mask([np.asarray(boxes)[:, 1:]], *image.shape[-2:]))[:, None]
        if boxes is not None and len(boxes) else None)
    if region is not None and region.any():
        magnitude = maps.abs().detach().cpu().numpy()
        scores["pointing game"] = float(metrics.pointing_game(magnitude, region.numpy())[0])
        scores["EPG"] = float(metrics.energy_pointing_game(magnitude, region.numpy())[0])
    return {"map": maps[0].detach().cpu(), "curve": curves[curve].numpy(), "curve_name": curve, "scores": scores,
            "region": None if region is None else region[0, 0].numpy()}


class Explorer(widgets.VBox):
    """The explorer widget; `controls` holds its inputs and `result` the last computation."""

    def __init__(self, model, images, targets, masks=None, boxes=None, methods=None, display_images=None, steps=20):
        images = torch.as_tensor(images).detach().cpu()
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"images must be a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
        self.model, self.images, self.steps = model, images, steps
        self.targets = [int(t) for t in torch.as_tensor(targets).reshape(-1).tolist()]
        if len(self.targets) != len(images):
            raise ValueError(f"targets must hold one class per image ({len(images)}), got {len(self.targets)}")
        self.masks = None if masks is None else torch.as_tensor(masks).detach().cpu()
        self.boxes = boxes
        self.display_images = images if display_images is None else torch.as_tensor(display_images).cpu()
        methods = [m for m in (methods or DEFAULT_METHODS) if m in attribution.METHODS]
        if masks is None and boxes is None:
            methods = [m for m in methods if m != "ground_truth"]
        unknown = set(methods or []) - set(attribution.METHODS)
        if not methods or unknown:
            raise ValueError(f"methods must be names from study.attribution.METHODS, got {methods}")
        self.controls = {
            "image": widgets.IntSlider(0, 0, len(images) - 1, description="image", continuous_update=False),
            "method": widgets.Dropdown(options=methods, value=methods[0], description="method"),
            "options": widgets.Text("", description="options", placeholder="{'steps': 16}", continuous_update=False),
            "postprocessing": widgets.Dropdown(options=list(POSTPROCESSING), value="absolute", description="post-proc."),
            "curve": widgets.Dropdown(options=list(CURVES), description="curve"),
        }
        self.progress = widgets.IntProgress(0, 0, 3, description="computing")
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.result: dict | None = None
        super().__init__([widgets.HBox(list(self.controls.values())[:3]), widgets.HBox(list(self.controls.values())[3:]),
                          widgets.HBox([self.progress, self.status]), self.output])
        self._resetting = False
        for control in self.controls.values():
            control.observe(self._changed, names="value")
        self.update()

    def _changed(self, change) -> None:
        if self._resetting:
            return
        if change["owner"] is self.controls["method"] and self.controls["options"].value:
            self._resetting = True  # one method's options rarely fit another: clear them, compute once
            self.controls["options"].value = ""
            self._resetting = False
        self.update()

    def update(self) -> None:
        index = self.controls["image"].value
        self.progress.value = 1
        try:
            options = parse_options(self.controls["options"].value)
            box = None if self.boxes is None else np.asarray(self.boxes[index]).reshape(-1, 5)
            self.result = explain_and_score(
                self.model, self.images[index], self.targets[index], self.controls["method"].value, options,
                self.controls["postprocessing"].value, self.controls["curve"].value,
                None if self.masks is None else self.masks[index], box, self.steps)
        except ValueError as error:
            self.status.value = f"<span style='color:#b00'>{error}</span>"
            self.progress.value, self.result = 0, None
            self.output.clear_output()  # the last figure no longer matches the controls
            return
        self.progress.value = 2
        self.status.value = ""
        self._draw(index, box)
        self.progress.value = 0  # empty again: idle

    def _draw(self, index: int, box) -> None:
        result = self.result
        fig, axes = plt.subplots(1, 3, figsize=(9, 3))
        plots.show_image(axes[0], self.display_images[index].numpy())
        plots.outline_mask_and_boxes(axes[0], result["region"] if self.masks is not None else None, box)
        axes[0].set_title(f"image {index}, class {self.targets[index]}", fontsize=9)
        plots.show_image(axes[1], self.display_images[index].numpy())
        axes[1].imshow(result["map"].abs().sum(0).numpy(), cmap="magma", alpha=0.6)
        axes[1].set_title(self.controls["method"].value, fontsize=9)
        fraction = np.linspace(0, 1, len(result["curve"]))
        axes[2].plot(fraction, result["curve"])
        axes[2].fill_between(fraction, result["curve"], alpha=0.2)
        axes[2].set(xlabel="fraction perturbed", ylabel="class probability", title=result["curve_name"])
        fig.tight_layout()
        with self.output:
            self.output.clear_output(wait=True)
            display(fig, pd.Series(result["scores"], name="score").round(3).to_frame())
        plt.close(fig)


HEADLESS_ENV = "STUDY_HEADLESS"


def headless() -> bool:
    """True in kernels that no one looks at: the runner (papermill) and the test suite (nbval) set
    STUDY_HEADLESS=1 for the kernels they start."""
    return os.environ.get(HEADLESS_ENV) == "1"


def explorer(model, images, targets, masks=None, boxes=None, methods=None, display_images=None, steps: int = 20):
    """An ipywidgets explorer over `images` ((N, C, H, W), as the model sees them) and `targets` (N,);
    `masks` (N, 1, H, W) or `boxes` (per image, rows [cls, x0, y0, x1, y1]) add the localisation scores;
    `display_images` (in [0, 1]) are shown instead of `images` when those are normalised.

    In a headless kernel (`headless()`), no widget is built: nbclient, which papermill and nbval
    drive, sometimes never returns from a cell that opens widgets (jupyter/nbclient#312; it hung a
    test run here). There the explorer's first view is computed and its scores are returned as a
    table, with a note that the explorer itself is interactive."""
    if not headless():
        return Explorer(model, images, targets, masks, boxes, methods, display_images, steps)
    images = torch.as_tensor(images)
    known = [m for m in (methods or DEFAULT_METHODS) if m in attribution.METHODS]
    if not known:
        raise ValueError(f"methods must be names from study.attribution.METHODS, got {methods}")
    method = known[0]
    box = None if boxes is None else np.asarray(boxes[0]).reshape(-1, 5)
    result = explain_and_score(model, images[0], int(torch.as_tensor(targets).reshape(-1)[0]), method, {}, "absolute",
                               next(iter(CURVES)), None if masks is None else torch.as_tensor(masks)[0], box, steps)
    print(f"The explorer is interactive: run this cell in JupyterLab. Headless run ({HEADLESS_ENV}=1): "
          f"the scores of its first view (image 0, {method}, absolute, {next(iter(CURVES))}).")
    return pd.Series(result["scores"], name="score").round(3).to_frame()
