"""Real-data loaders for notebook 05 (Rao et al. 2023): PASCAL VOC2007 and Waterbirds.

Both return the study's array dict: `images` float32 (N,3,S,S) in [0,1] (resized to S×S, no crop,
decoded with PIL), `labels` float32 multi-hot (N,K), `boxes` list of int64 (n_obj,5) rows
[cls, x0, y0, x1, y1] in pixels of the resized image (end-exclusive, clipped to the image),
`masks` bool (N,1,S,S) (the union of the boxes), `object_masks` (segmentation, when available)
and `group` int64 (N,), plus `ids` (file stems) and `skipped` (ids that could not be used).

* VOC2007 (card §6.1): torchvision's `VOCDetection(root, year="2007", image_set=..., download=False)`
  reads `<root>/VOCdevkit/VOC2007/` and parses the XML; its images are opened with PIL. The
  20 classes in the usual alphabetical order; "difficult" objects are kept by default (unverified
  choice of the authors). With `segmentation=True` only the images listed in
  `ImageSets/Segmentation/<image_set>.txt` are read, and the instance masks of
  `SegmentationObject/<id>.png` (index j = the j-th object of the XML; 255 = void) are returned.
* Waterbirds (card §6.2): `<root>/metadata.csv` (img_id, img_filename, y, split, place,
  place_filename) and the images at the listed paths; boxes from CUB-200-2011's `images.txt` and
  `bounding_boxes.txt` (x, y, width, height in pixels), joined on img_filename = CUB's relative
  path (`cub_root` defaults to a CUB_200_2011 folder inside or beside the Waterbirds folder).
  Images without a matching box are skipped. When the CUB image itself is present under
  `<cub_root>/images/`, the box is rescaled from its size to the Waterbirds image's size (the card
  leaves open whether they are equal); otherwise equal sizes are assumed.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

import study  # noqa: F401  (makes `import torchvision` work, see study._torchvision_compat)
from torchvision.datasets import VOCDetection

from study.metrics.localisation import rasterise_boxes

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
VOC_SPLITS = ("train", "val", "trainval", "test")
WATERBIRDS_SPLITS = {"train": 0, "val": 1, "test": 2}
WATERBIRDS_COLUMNS = ("img_id", "img_filename", "y", "split", "place", "place_filename")


def _check_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    return image_size


def _check_limit(n_max):
    if n_max is not None and (isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 1):
        raise ValueError(f"n_max must be None or a positive int, got {n_max!r}")
    return n_max


def _resize(image: Image.Image, size: int) -> np.ndarray:
    """(3,S,S) float32 in [0,1], bilinear resize of the whole image (no crop)."""
    return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 255.0


def scale_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """A box [x0, x1) × [y0, y1) in pixels of a width×height image, rescaled to size×size, rounded,
    clipped to the image and at least one pixel wide and high."""
    sx, sy = size / width, size / height
    bx0 = int(np.clip(round(x0 * sx), 0, size - 1))
    by0 = int(np.clip(round(y0 * sy), 0, size - 1))
    bx1 = int(np.clip(round(x1 * sx), bx0 + 1, size))
    by1 = int(np.clip(round(y1 * sy), by0 + 1, size))
    return bx0, by0, bx1, by1


def _box_union(boxes: np.ndarray, size: int) -> np.ndarray:
    return rasterise_boxes(np.asarray(boxes)[:, 1:], size, size)[None]


def _objects(annotation: dict) -> list[dict]:
    objects = annotation.get("object", [])
    return objects if isinstance(objects, list) else [objects]


def load_voc2007(root, image_set: str = "train", image_size: int = 224, n_max: int | None = None,
                 keep_difficult: bool = True, segmentation: bool = False) -> dict:
    """VOC2007 `image_set` (train | val | trainval | test) at image_size×image_size (see the module doc)."""
    if image_set not in VOC_SPLITS:
        raise ValueError(f"unknown VOC2007 image_set {image_set!r}; choose one of {list(VOC_SPLITS)}")
    size, n_max = _check_size(image_size), _check_limit(n_max)
    root = Path(root)
    base = root / "VOCdevkit" / "VOC2007"
    if not (base / "Annotations").is_dir():
        raise ValueError(f"no VOC2007 under {root}: expected {base}/Annotations, JPEGImages and ImageSets "
                         "(torchvision VOCDetection layout; the test archive extracted into the same folder)")
    dataset = VOCDetection(str(root), year="2007", image_set=image_set, download=False)
    ids = [Path(p).stem for p in dataset.images]
    keep = list(range(len(ids)))
    if segmentation:
        listed = base / "ImageSets" / "Segmentation" / f"{image_set}.txt"
        if not listed.is_file():
            raise ValueError(f"segmentation=True needs {listed}")
        wanted = set(listed.read_text().split())
        keep = [i for i in keep if ids[i] in wanted and (base / "SegmentationObject" / f"{ids[i]}.png").is_file()]
    if n_max is not None:
        keep = keep[:n_max]
    images, labels, boxes, object_masks, used, skipped = [], [], [], [], [], []
    for index in keep:
        image, target = dataset[index]
        annotation = target["annotation"]
        width, height = image.size
        rows, instance = [], []
        for j, obj in enumerate(_objects(annotation)):
            if obj["name"] not in VOC_CLASSES:
                raise ValueError(f"{ids[index]}: unknown VOC class {obj['name']!r}")
            if not keep_difficult and str(obj.get("difficult", "0")) == "1":
                continue
            box = obj["bndbox"]
            # VOC boxes are 1-based and inclusive: pixels xmin..xmax -> [xmin - 1, xmax)
            x0, y0 = float(box["xmin"]) - 1, float(box["ymin"]) - 1
            x1, y1 = float(box["xmax"]), float(box["ymax"])
            rows.append((VOC_CLASSES.index(obj["name"]), *scale_box(x0, y0, x1, y1, width, height, size)))
            instance.append(j + 1)
        if not rows:
            skipped.append(ids[index])
            continue
        rows = np.array(rows, np.int64)
        label = np.zeros(len(VOC_CLASSES), np.float32)
        label[rows[:, 0]] = 1.0
        images.append(_resize(image, size))
        labels.append(label)
        boxes.append(rows)
        used.append(ids[index])
        if segmentation:
            objects = np.asarray(Image.open(base / "SegmentationObject" / f"{ids[index]}.png"))
            resized = np.asarray(Image.fromarray(objects.astype(np.uint8)).resize((size, size), Image.NEAREST))
            object_masks.append(np.stack([resized == j for j in instance]))
    if not images:
        raise ValueError(f"no usable VOC2007 images in {image_set!r} under {root}")
    result = {"images": np.stack(images), "labels": np.stack(labels), "boxes": boxes,
              "masks": np.stack([_box_union(b, size) for b in boxes]), "group": np.zeros(len(images), np.int64),
              "ids": used, "skipped": skipped, "classes": VOC_CLASSES}
    if segmentation:
        result["object_masks"] = object_masks
    return result


def _read_cub_boxes(cub_root: Path) -> dict[str, tuple[float, float, float, float]]:
    images_txt, boxes_txt = cub_root / "images.txt", cub_root / "bounding_boxes.txt"
    if not images_txt.is_file() or not boxes_txt.is_file():
        raise ValueError(f"CUB boxes need {images_txt} and {boxes_txt} (CUB-200-2011 layout)")
    paths = dict(line.split(maxsplit=1) for line in images_txt.read_text().splitlines() if line.strip())
    boxes = {}
    for line in boxes_txt.read_text().splitlines():
        if line.strip():
            image_id, x, y, w, h = line.split()
            if image_id in paths:
                boxes[paths[image_id].strip()] = (float(x), float(y), float(w), float(h))
    return boxes


def read_waterbirds_metadata(root) -> list[dict]:
    """The rows of `<root>/metadata.csv` with integer y, split and place."""
    path = Path(root) / "metadata.csv"
    if not path.is_file():
        raise ValueError(f"no Waterbirds metadata at {path}")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(WATERBIRDS_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} lacks the columns {sorted(missing)}; expected {list(WATERBIRDS_COLUMNS)}")
        rows = list(reader)
    for row in rows:
        for key in ("y", "split", "place"):
            row[key] = int(float(row[key]))
    return rows


def load_waterbirds(root, split: str = "train", image_size: int = 224, cub_root=None, n_max: int | None = None) -> dict:
    """Waterbirds `split` (train | val | test). Labels are the 2-way multi-hot bird label [landbird,
    waterbird]; `place` (0 land, 1 water); group = 2·y + place (worst group 2 = waterbird on land)."""
    if split not in WATERBIRDS_SPLITS:
        raise ValueError(f"unknown Waterbirds split {split!r}; choose one of {list(WATERBIRDS_SPLITS)}")
    size, n_max = _check_size(image_size), _check_limit(n_max)
    root = Path(root)
    if cub_root is None:  # CUB_200_2011 inside the Waterbirds folder, else beside it
        cub_root = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root.parent / "CUB_200_2011"
    cub_root = Path(cub_root)
    boxes_by_path = _read_cub_boxes(cub_root)
    rows = [r for r in read_waterbirds_metadata(root) if r["split"] == WATERBIRDS_SPLITS[split]]
    images, ys, places, boxes, used, skipped = [], [], [], [], [], []
    for row in rows:
        if n_max is not None and len(images) >= n_max:
            break
        name = row["img_filename"]
        if name not in boxes_by_path or not (root / name).is_file():
            skipped.append(name)
            continue
        image = Image.open(root / name)
        width, height = image.size
        x, y, w, h = boxes_by_path[name]
        cub_image = cub_root / "images" / name
        if cub_image.is_file():  # rescale from the CUB image's size when it is known
            with Image.open(cub_image) as original:
                ow, oh = original.size
            x, w, y, h = x * width / ow, w * width / ow, y * height / oh, h * height / oh
        label = row["y"]
        boxes.append(np.array([(label, *scale_box(x, y, x + w, y + h, width, height, size))], np.int64))
        images.append(_resize(image, size))
        ys.append(label)
        places.append(row["place"])
        used.append(name)
    if not images:
        raise ValueError(f"no Waterbirds image of split {split!r} under {root} has a matching CUB box")
    ys, places = np.array(ys, np.int64), np.array(places, np.int64)
    return {"images": np.stack(images), "labels": np.eye(2, dtype=np.float32)[ys], "y": ys, "place": places,
            "boxes": boxes, "masks": np.stack([_box_union(b, size) for b in boxes]), "group": 2 * ys + places,
            "ids": used, "skipped": skipped}
