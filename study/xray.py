"""The X-ray settings of Viviano et al. 2021 (card §2 E2/E3, §6) through torchxrayvision.

| setting       | site 0                         | site 1                          | ratio r | mask                      |
|---------------|--------------------------------|---------------------------------|---------|---------------------------|
| xray_spc      | NIH ChestX-ray14, all views    | PadChest, PA views              | 0.9     | fixed central ellipse     |
| xray_no_spc   | (same)                         | (same)                          | 0.5     | (same)                    |
| rsna_vpc      | RSNA Pneumonia, PA views       | RSNA Pneumonia, AP views        | 0.9     | the pneumonia boxes       |
| rsna_no_vpc   | (same)                         | (same)                          | 0.5     | (same)                    |

NIH/PadChest label: cardiomegaly (other findings allowed) = 1 vs "No Finding" / "normal" = 0.
RSNA label: the pneumonia target. The split is torchxrayvision's `CovariateDataset` (the paper's
split logic, Q5: train at ratio r, validation and test at 1 − r), after drawing `n_per_cell`
images per (site × label) cell **before** the ratio is applied (Q7: the class's own `nsamples`
truncation would balance the cells and remove the shift).

torchxrayvision is an optional extra (`pip install -e ".[xray]"`); it is imported only when a
function here needs it. Images are never downloaded: put them under `data_root` (default
`data/`) in the layouts below (the folders torchxrayvision's classes read). CSVs found at the
listed places are used; otherwise the metadata shipped with torchxrayvision is.

    data_root/rsna/stage_2_train_images_jpg/<patientId>.jpg
    data_root/rsna/stage_2_train_labels.csv                       (optional)
    data_root/rsna/stage_2_train_images_dicom_headers.csv         (optional; PatientID, ViewPosition)
    data_root/nih/images-224/<Image Index>.png
    data_root/nih/Data_Entry_2017_v2020.csv                       (optional)
    data_root/nih/BBox_List_2017.csv                              (optional)
    data_root/padchest/images-224/<ImageID>.png
    data_root/padchest/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv  (optional, .csv or .csv.gz)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from study import cache, config, data

INSTALL_HINT = 'pip install -e ".[xray]"  (torchxrayvision==1.5.7)'
SETTINGS = {"xray_spc": ("xray", 0.9), "xray_no_spc": ("xray", 0.5), "rsna_vpc": ("rsna", 0.9), "rsna_no_vpc": ("rsna", 0.5)}
SPLITS = ("train", "valid", "test")
CELLS = (("site0", 0), ("site0", 1), ("site1", 0), ("site1", 1))
ELLIPSE_DIVISOR = 2.5  # radii = size / 2.5 (card E2, Q10)
LAYOUT = {
    "rsna": {"images": "rsna/stage_2_train_images_jpg", "csv": ["rsna/stage_2_train_labels.csv"],
             "dicom_csv": ["rsna/stage_2_train_images_dicom_headers.csv"]},
    "nih": {"images": "nih/images-224", "csv": ["nih/Data_Entry_2017_v2020.csv"], "bbox_csv": ["nih/BBox_List_2017.csv"]},
    "padchest": {"images": "padchest/images-224",
                 "csv": ["padchest/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",
                         "padchest/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"]},
}


def import_xrv():
    """torchxrayvision, imported lazily (after `study`'s torchvision shim), or a clear error."""
    try:
        import torchxrayvision
    except ImportError as error:
        raise ImportError(f"the X-ray settings need torchxrayvision, an optional extra: {INSTALL_HINT}") from error
    return torchxrayvision


# ----------------------------------------------------------------------------- split arithmetic

def expected_counts(n_per_cell: int, ratio: float, splits=(0.5, 0.25, 0.25)) -> pd.DataFrame:
    """Images per (split × site × label) cell under CovariateDataset's rule (card §2 split logic).

    train: n·r·2s₀ for (site 0, neg) and (site 1, pos), n·(1 − r)·2s₀ for the other two;
    valid: the same with r and 1 − r swapped and s₁; test: the remainder. int() truncation as
    the class does. With s = (.5, .25, .25): train n·r / n·(1 − r), valid n·(1 − r)/2 / n·r/2.
    """
    if isinstance(n_per_cell, bool) or not isinstance(n_per_cell, (int, np.integer)) or n_per_cell < 1:
        raise ValueError(f"n_per_cell must be a positive int, got {n_per_cell!r}")
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    if len(splits) != 3 or abs(sum(splits) - 1) > 1e-9:
        raise ValueError(f"splits must be three fractions summing to 1, got {splits!r}")
    major = {("site0", 0): True, ("site0", 1): False, ("site1", 0): False, ("site1", 1): True}
    rows = []
    for site, label in CELLS:
        share = ratio if major[(site, label)] else 1 - ratio
        train = int(n_per_cell * share * splits[0] * 2)
        valid = int(n_per_cell * (1 - share) * splits[1] * 2)
        rows.append({"site": site, "label": label, "train": train, "valid": valid, "test": n_per_cell - train - valid})
    return pd.DataFrame(rows)


def split_counts(datasets: dict) -> pd.DataFrame:
    """The (site × label) counts of built CovariateDataset splits, in `expected_counts`' layout."""
    rows = []
    for site, label in CELLS:
        row = {"site": site, "label": label}
        for split, dataset in datasets.items():
            sites = np.asarray(dataset.site)
            labels = np.asarray(dataset.labels).reshape(-1)
            row[split] = int(((sites == int(site[-1])) & (labels == label)).sum())
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------- sites

def _root(data_root) -> Path:
    return Path(data_root) if data_root is not None else config.DATA_DIR


def _optional_csv(root: Path, candidates: list[str]) -> str | None:
    for candidate in candidates:
        if (root / candidate).exists():
            return str(root / candidate)
    return None


def _image_folder(root: Path, dataset: str) -> str:
    folder = root / LAYOUT[dataset]["images"]
    if not folder.is_dir():
        raise FileNotFoundError(f"no {dataset} images at {folder}; put them there (see study/xray.py for the layout) "
                                f"or pass data_root")
    return str(folder)


def _transform(size: int):
    xrv = import_xrv()
    from torchvision import transforms
    return transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(size)])


def _included(value: str | None, xrv) -> str:
    return value if value is not None else xrv.datasets.USE_INCLUDED_FILE


def rsna_sites(data_root=None, size: int = 64):
    """(PA dataset, its targets), (AP dataset, its targets): RSNA Pneumonia with box masks."""
    xrv = import_xrv()
    root = _root(data_root)
    images = _image_folder(root, "rsna")
    sites = []
    for view in ("PA", "AP"):
        dataset = xrv.datasets.RSNA_Pneumonia_Dataset(
            images, csvpath=_included(_optional_csv(root, LAYOUT["rsna"]["csv"]), xrv),
            dicomcsvpath=_included(_optional_csv(root, LAYOUT["rsna"]["dicom_csv"]), xrv),
            views=[view], pathology_masks=True, transform=_transform(size))
        targets = dataset.labels[:, dataset.pathologies.index("Pneumonia")].astype(int)
        sites.append((dataset, targets))
    return sites


def xray_sites(data_root=None, size: int = 64):
    """(NIH all views, cardiomegaly vs No Finding), (PadChest PA, cardiomegaly vs normal).

    NIH is read without the one-image-per-patient reduction: that reproduces the card's
    2,776 / 60,361 cell counts. PadChest keeps torchxrayvision's defaults.
    """
    xrv = import_xrv()
    root = _root(data_root)
    nih = xrv.datasets.NIH_Dataset(
        _image_folder(root, "nih"), csvpath=_included(_optional_csv(root, LAYOUT["nih"]["csv"]), xrv),
        bbox_list_path=_included(_optional_csv(root, LAYOUT["nih"]["bbox_csv"]), xrv),
        views=["*"], unique_patients=False, transform=_transform(size))
    findings = nih.csv["Finding Labels"].astype(str)
    nih_keep = np.flatnonzero(findings.str.contains("Cardiomegaly") | (findings == "No Finding"))
    nih_site = xrv.datasets.SubsetDataset(nih, nih_keep)
    nih_targets = findings.iloc[nih_keep].str.contains("Cardiomegaly").to_numpy().astype(int)
    padchest = xrv.datasets.PC_Dataset(
        _image_folder(root, "padchest"), csvpath=_included(_optional_csv(root, LAYOUT["padchest"]["csv"]), xrv),
        views=["PA"], transform=_transform(size))
    labels = padchest.csv["Labels"].astype(str)
    cardiomegaly = labels.str.contains("cardiomegaly")
    normal = labels.str.replace(r"[\[\]' ]", "", regex=True) == "normal"
    pc_keep = np.flatnonzero(cardiomegaly | normal)
    pc_site = xrv.datasets.SubsetDataset(padchest, pc_keep)
    pc_targets = cardiomegaly.iloc[pc_keep].to_numpy().astype(int)
    return [(nih_site, nih_targets), (pc_site, pc_targets)]


def subsample_cells(dataset, targets: np.ndarray, n_per_cell: int, rng: np.random.Generator):
    """A SubsetDataset with exactly `n_per_cell` images of each label (Q7: before the ratio)."""
    xrv = import_xrv()
    targets = np.asarray(targets)
    chosen = []
    for label in (0, 1):
        pool = np.flatnonzero(targets == label)
        if len(pool) < n_per_cell:
            raise ValueError(f"only {len(pool)} images with label {label} in {type(dataset).__name__}; "
                             f"n_per_cell={n_per_cell} is too many")
        chosen.append(rng.choice(pool, size=n_per_cell, replace=False))
    keep = np.sort(np.concatenate(chosen))
    return xrv.datasets.SubsetDataset(dataset, keep), targets[keep]


def covariate_splits(site0, site1, ratio: float, n_per_cell: int, seed: int) -> dict:
    """{"train", "valid", "test"}: torchxrayvision CovariateDataset at `ratio` (valid/test at
    1 − ratio), on sites subsampled to `n_per_cell` per label first."""
    xrv = import_xrv()
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    rng = np.random.default_rng(seed)
    (d0, t0), (d1, t1) = (subsample_cells(d, t, n_per_cell, rng) for d, t in (site0, site1))
    return {split: xrv.datasets.CovariateDataset(d1=d0, d1_target=t0, d2=d1, d2_target=t1, ratio=ratio, mode=split,
                                                 seed=seed) for split in SPLITS}


# ------------------------------------------------------------------------------------ arrays

def ellipse_mask(size: int, divisor: float = ELLIPSE_DIVISOR) -> np.ndarray:
    """The fixed central ellipse of the NIH/PadChest setting: radii = size / divisor; (1, size, size) bool."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    centre = (size - 1) / 2
    radius = size / divisor
    rows, cols = np.mgrid[:size, :size]
    return (((rows - centre) / radius) ** 2 + ((cols - centre) / radius) ** 2 <= 1)[None]


def materialise(dataset, kind: str, size: int) -> dict:
    """Read every image of a CovariateDataset into arrays: images float32 (N,1,S,S) in [−1024, 1024]
    (torchxrayvision's scale, as the paper), labels, masks (ellipse or RSNA boxes), group = site."""
    if kind not in ("xray", "rsna"):
        raise ValueError(f"kind must be 'xray' or 'rsna', got {kind!r}")
    images, masks = [], []
    for index in range(len(dataset)):
        with warnings.catch_warnings():  # torchxrayvision casts the NaN boxes of RSNA negatives to int
            warnings.simplefilter("ignore", RuntimeWarning)
            sample = dataset[index]
        images.append(np.asarray(sample["img"], np.float32).reshape(1, size, size))
        if kind == "rsna":
            pathology = dataset.d1.pathologies.index("Pneumonia") if hasattr(dataset.d1, "pathologies") else 1
            box = np.asarray(sample["pathology_masks"][pathology]).reshape(1, size, size)
            masks.append(box >= 0.5)
        else:
            masks.append(ellipse_mask(size))
    labels = np.asarray(dataset.labels).reshape(-1).astype(np.int64)
    return {"images": np.stack(images), "labels": labels, "masks": np.stack(masks).astype(bool),
            "group": np.asarray(dataset.site, np.int64)}


def load_setting(name: str, data_root=None, size: int = 64, n_per_cell: int = 200, seed: int = 0) -> dict[str, dict]:
    """{"train", "valid", "test"} array dicts of an X-ray setting, cached under data/cache."""
    if name not in SETTINGS:
        raise ValueError(f"unknown X-ray setting {name!r}; known: {list(SETTINGS)}")
    kind, ratio = SETTINGS[name]
    root = _root(data_root)

    def build() -> dict:
        site0, site1 = (rsna_sites if kind == "rsna" else xray_sites)(root, size)
        datasets = covariate_splits(site0, site1, ratio, n_per_cell, seed)
        return {split: materialise(datasets[split], kind, size) for split in SPLITS}

    return data.cached(f"viviano_{name}", _setting_params(name, data_root, size, n_per_cell, seed), build)


def _setting_params(name: str, data_root, size: int, n_per_cell: int, seed: int) -> dict:
    root = _root(data_root)
    return {"root": str(root.resolve()), "size": size, "n_per_cell": n_per_cell, "seed": seed, "version": 1,
            "metadata": metadata_key(root, SETTINGS[name][0])}


def setting_key(name: str, data_root=None, size: int = 64, n_per_cell: int = 200, seed: int = 0) -> str:
    """The cache key of `load_setting(name, data_root, size, n_per_cell, seed)`'s arrays, without
    reading them: models trained on them put it into their own keys."""
    if name not in SETTINGS:
        raise ValueError(f"unknown X-ray setting {name!r}; known: {list(SETTINGS)}")
    return cache.key(f"viviano_{name}", _setting_params(name, data_root, size, n_per_cell, seed))


def metadata_key(root: Path, kind: str) -> str:
    """Which metadata files a setting reads (yours under `root`, named, sized and dated, or the ones
    bundled with torchxrayvision, by its version): adding or editing a CSV makes new data."""
    datasets = ("rsna",) if kind == "rsna" else ("nih", "padchest")
    chosen = [_optional_csv(root, LAYOUT[d][k]) for d in datasets for k in LAYOUT[d] if k != "images"]
    mine = [path for path in chosen if path is not None]
    bundled = f"torchxrayvision {import_xrv().__version__}" if None in chosen else ""
    return f"{cache.file_key(mine)}:{bundled}"


def split_summary(setting: str, n_per_cell: int) -> pd.DataFrame:
    """The counts each split gets for `setting` at `n_per_cell` (without reading any image)."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown X-ray setting {setting!r}; known: {list(SETTINGS)}")
    table = expected_counts(n_per_cell, SETTINGS[setting][1])
    table.insert(0, "setting", setting)
    return table
