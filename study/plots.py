"""Figure helpers: every figure is saved as PNG next to the CSV table behind it."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

sns.set_theme(context="notebook", style="whitegrid")


def save_figure(fig: plt.Figure, table: pd.DataFrame, directory: str | Path, name: str) -> Path:
    """Write `<directory>/<name>.png` and `<directory>/<name>.csv`; return the PNG path."""
    if table is None or not isinstance(table, pd.DataFrame):
        raise ValueError(f"save_figure needs the DataFrame behind figure {name!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    png = directory / f"{name}.png"
    fig.savefig(png, dpi=110, bbox_inches="tight", metadata={"Software": None})
    table.to_csv(directory / f"{name}.csv", index=False)
    return png


def show_image(ax: plt.Axes, image: np.ndarray) -> None:
    """Show a (C,H,W) image in [0,1] (grey for one channel) without ticks."""
    image = np.asarray(image)
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.clip(image.transpose(1, 2, 0), 0, 1))
    ax.set_xticks([])
    ax.set_yticks([])


def outline_mask_and_boxes(ax: plt.Axes, mask: np.ndarray | None, boxes: np.ndarray | None) -> None:
    """Draw a mask contour (yellow) and boxes [cls, x0, y0, x1, y1] (red, end-exclusive)."""
    if mask is not None and np.asarray(mask).any():
        ax.contour(np.asarray(mask).reshape(mask.shape[-2:]).astype(float), levels=[0.5], colors="yellow", linewidths=0.8)
    for _cls, x0, y0, x1, y1 in np.asarray(boxes if boxes is not None else []).reshape(-1, 5):
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="red", linewidth=1))


def show_map(ax: plt.Axes, saliency: np.ndarray, signed: bool = False) -> None:
    """Show a (1,H,W) or (H,W) saliency map; signed maps use a diverging colour map centred at 0."""
    saliency = np.asarray(saliency).reshape(np.asarray(saliency).shape[-2:])
    if signed:
        bound = float(np.abs(saliency).max()) or 1.0
        ax.imshow(saliency, cmap="coolwarm", vmin=-bound, vmax=bound)
    else:
        ax.imshow(saliency, cmap="magma")
    ax.set_xticks([])
    ax.set_yticks([])
