"""Steps of notebooks/00_tour.ipynb: the datasets, a trained small CNN, three attribution methods."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from scipy import stats

from study import attribution, config, data, metrics, plots, train
from study.findings import describe_interval, interval_verdict, mean_interval
from study.models import SmallCNN

GALLERY_DATASETS = ("synth_cifar", "synth_objects_64", "synth_parts_64", "synth_voc_64", "synth_birds_100")
TOUR_METHODS = {"gradient": {}, "integrated_gradients": {"steps": 32}, "gradcam": {"layer": "conv3"}}
# the settings the training reads: the model's cache key holds these, so that a larger test split
# or more scored images retrain nothing
TRAINING_SETTINGS = ("n_train", "image_size", "width", "epochs")


def dataset_gallery(seed: int, per_dataset: int = 4) -> tuple[plt.Figure, pd.DataFrame]:
    """A few samples of every generator with masks (yellow) and boxes (red), and a summary table."""
    samples = {name: data.make_shapes(per_dataset, seed, name) for name in GALLERY_DATASETS}
    samples["crosses (synth_hard)"] = data.make_crosses(per_dataset, seed, flip_prob=0.5)
    digits = data.load_digits_split(seed)["test"]
    samples["digits"] = {key: value[:per_dataset] for key, value in digits.items()}
    fig, axes = plt.subplots(len(samples), per_dataset, figsize=(1.6 * per_dataset, 1.6 * len(samples)))
    rows = []
    for row, (name, arrays) in enumerate(samples.items()):
        for col in range(per_dataset):
            ax = axes[row, col]
            plots.show_image(ax, arrays["images"][col])
            plots.outline_mask_and_boxes(ax, arrays["masks"][col], arrays["boxes"][col])
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", fontsize=8)
        images = np.asarray(arrays["images"])
        rows.append({
            "dataset": name,
            "image_shape": "×".join(map(str, images.shape[1:])),
            "mean_mask_fraction": float(np.asarray(arrays["masks"]).mean()),
            "objects_per_image": float(np.mean([len(b) for b in arrays["boxes"]])),
        })
    fig.tight_layout()
    return fig, pd.DataFrame(rows)


def train_tour_model(profile: str, seed: int, dataset: str = "synth_objects_64", device: str = "auto", **overrides) -> dict:
    """Generate a shapes dataset at the profile's size and train the small CNN on it (cached)."""
    s = config.settings(profile, "tour", **overrides)
    splits = {
        split: data.shapes(n, seed + offset, dataset, image_size=s["image_size"])
        for split, n, offset in (("train", s["n_train"], 0), ("test", s["n_test"], 1000))
    }
    num_classes = int(splits["train"]["labels"].max()) + 1

    def build():
        config.seed_everything(seed)
        return SmallCNN(in_channels=3, num_classes=num_classes, width=s["width"], image_size=s["image_size"])

    def fit(model):
        config.seed_everything(seed)
        loader = data.make_loader(splits["train"], batch_size=64, shuffle=True, seed=seed)
        return train.fit(model, loader, epochs=s["epochs"], lr=1e-3, device=device)

    params = {"training": {k: s[k] for k in TRAINING_SETTINGS}, "seed": seed, "dataset": dataset, "version": 2}
    result = train.cached_fit("tour_small_cnn", params, build, fit, device=device)
    test_loader = data.make_loader(splits["test"], batch_size=256, shuffle=False, seed=seed)
    scores = train.evaluate(result.model, test_loader, device)
    return {"model": result.model, "splits": splits, "settings": s, "test": scores,
            "history": pd.DataFrame(result.history), "from_cache": result.from_cache}


def attribution_gallery(model: torch.nn.Module, arrays: dict, n_images: int, device: str = "auto",
                        n_scored: int | None = None):
    """Maps of three methods for the first `n_images` test images (the figure), and how much |attribution|
    lies on the object for the first `n_scored` (default `n_images`) test images (the table)."""
    device = config.get_device(device)
    n_scored = max(n_images, n_scored or n_images)
    images = torch.as_tensor(arrays["images"][:n_scored], device=device)
    masks = torch.as_tensor(arrays["masks"][:n_scored], device=device)
    with torch.no_grad():
        predicted = model.to(device)(images).argmax(1)
    maps = {name: attribution.explain(model, images, predicted, name, **options) for name, options in TOUR_METHODS.items()}
    fig, axes = plt.subplots(n_images, 1 + len(maps), figsize=(1.8 * (1 + len(maps)), 1.8 * n_images))
    rows = []
    for i in range(n_images):
        plots.show_image(axes[i, 0], arrays["images"][i])
        plots.outline_mask_and_boxes(axes[i, 0], arrays["masks"][i], None)
        for j, (name, m) in enumerate(maps.items(), start=1):
            plots.show_map(axes[i, j], m[i].abs().cpu().numpy())
            axes[0, j].set_title(name, fontsize=8)
    energy = {name: metrics.energy_pointing_game(m.abs(), masks) for name, m in maps.items()}
    for name, values in energy.items():
        for i, value in enumerate(values.tolist()[:n_scored]):
            rows.append({"method": name, "image": i, "label": int(arrays["labels"][i]),
                         "predicted": int(predicted[i]), "energy_in_mask": value,
                         "mask_fraction": float(masks[i].float().mean())})
    fig.tight_layout()
    return fig, pd.DataFrame(rows)


def findings(run: dict, maps_table: pd.DataFrame) -> list[dict]:
    """The tour's two checks, each decided from an interval.

    Accuracy: the Clopper-Pearson 95% interval of test accuracy must lie above twice chance.
    On-object energy: per method, the t interval over images of (energy in the mask − mask area)
    must lie above 0; reproduced when it does for every method, not reproduced when some method's
    interval lies at or below 0, inconclusive otherwise.
    """
    labels = run["splits"]["train"]["labels"]
    chance = 1 / len(set(np.asarray(labels).tolist()))
    n_test = len(run["splits"]["test"]["labels"])
    correct = int(round(run["test"]["accuracy"] * n_test))
    ci = stats.binomtest(correct, n_test).proportion_ci(confidence_level=0.95, method="exact")
    rows = [{"claim": "The small CNN learns the shapes task (accuracy above 2 × chance)",
             "paper": "n/a (tour)", "this_run": f"test accuracy {correct / n_test:.2f} vs 2 × chance {2 * chance:.2f}",
             "verdict": interval_verdict(ci.low, ci.high, 2 * chance), "n": f"{n_test} test images",
             "uncertainty": f"{correct / n_test:.2f} [{ci.low:.2f}, {ci.high:.2f}], 95% Clopper-Pearson CI"}]
    verdicts, texts, uncertainty = [], [], []
    for method, group in maps_table.groupby("method", sort=False):
        mean, low, high = mean_interval(group["energy_in_mask"] - group["mask_fraction"])
        verdicts.append(interval_verdict(low, high, 0.0))
        texts.append(f"{method} {group['energy_in_mask'].mean():.2f}")
        uncertainty.append(f"{method}: " + describe_interval(mean, low, high, len(group), "images"))
    combined = ("reproduced" if all(v == "reproduced" for v in verdicts)
                else "not reproduced" if "not reproduced" in verdicts else "inconclusive")
    rows.append({"claim": "Every method puts more |attribution| on the object than its area",
                 "paper": "n/a (tour)",
                 "this_run": "energy in mask: " + "; ".join(texts) + f" vs area {maps_table['mask_fraction'].mean():.2f}",
                 "verdict": combined, "n": f"{maps_table['image'].nunique()} images",
                 "uncertainty": "energy − area per image: " + "; ".join(uncertainty)})
    return rows
