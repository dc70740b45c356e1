"""ImageNet (ILSVRC2012) validation images with their XML bounding boxes, and torchvision models.

The real-data path of the Vandersmissen card (§6), shared with notebook 03:

* **Images**: `ILSVRC2012_val_XXXXXXXX.JPEG` files anywhere under `root`, either flat (the
  original `val/` folder) or in WordNet-id class folders (`val/n01440764/...`, the layout of
  torchvision's `ImageFolder` and of the common `valprep.sh` script). Decoded with PIL.
* **Annotations**: one VOC-style XML file per image with the same stem (the ILSVRC2012
  `bbox_val_v3` release): `<size><width/><height/></size>` and one or more
  `<object><name>n01751748</name><bndbox><xmin/><ymin/><xmax/><ymax/></bndbox></object>`.
  They are found under `annotations` (a folder) or, by default, anywhere under `root`.
* **Labels**: the WordNet id of the class folder, else of the first `<object>`. The class index
  is the position of that id in the sorted list of the 1,000 ids (what pretrained torchvision
  heads expect). That list is read from `wnids` (a sequence or a text file whose lines start with
  the id, e.g. `LOC_synset_mapping.txt`), else from one of `SYNSET_FILES` in `root`, else the
  class folders are used when there are exactly 1,000 of them; otherwise ValueError.
* **Transform**: Resize(256) then CenterCrop(224), done as one continuous affine map so that the
  image and its boxes move exactly alike: scale r = 256 / min(W, H), shift
  s = ((W·r − 224)/2, (H·r − 224)/2), x' = x·r − s_x, clipped to [0, 224) (card §6). PIL's
  antialiased bilinear resampling reads the source window [s/r, (s + 224)/r).

The "bring your own classifier and images" path reuses all of it:

* `load_image_folder`: an ImageFolder tree (`torchvision.datasets.ImageFolder`: one sub-folder of
  images per class, classes in sorted order), optional Pascal-VOC XML boxes beside the images
  (same stem, `.xml`), decoded and cropped exactly as above.
* `torchvision_model`: any torchvision classification architecture (`torchvision.models.list_models`)
  with a state-dict file, its class count checked against the data's; `input_settings`: the
  architecture's own resize / crop / mean / std (from its torchvision weights entry), or parameters.
"""

from __future__ import annotations

import inspect
import math
import re
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from study import cache
from study.metrics.localisation import rasterise_boxes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNSET_FILES = ("LOC_synset_mapping.txt", "synsets.txt", "wnids.txt", "synset_words.txt")
IMAGE_SUFFIXES = (".jpeg", ".jpg")
WNID = re.compile(r"n\d{8}")
ARCHITECTURES = ("vgg16", "resnet50")


def parse_annotation(path: str | Path) -> dict:
    """One VOC-style XML file → {"filename", "width", "height", "objects": [(wnid, xmin, ymin, xmax, ymax)]}."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as error:
        raise ValueError(f"cannot read annotation {path}: {error}") from error
    size = root.find("size")
    if size is None or size.findtext("width") is None or size.findtext("height") is None:
        raise ValueError(f"annotation {path} has no <size><width/><height/></size>")
    width, height = int(float(size.findtext("width"))), int(float(size.findtext("height")))
    if width <= 0 or height <= 0:
        raise ValueError(f"annotation {path} has a non-positive size {width}×{height}")
    objects = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        name = (obj.findtext("name") or "").strip()
        if box is None or not name:
            raise ValueError(f"annotation {path}: every <object> needs a <name> and a <bndbox>")
        try:
            coords = [float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax")]
        except TypeError as error:
            raise ValueError(f"annotation {path}: <bndbox> needs xmin, ymin, xmax and ymax") from error
        objects.append((name, *coords))
    return {"filename": (root.findtext("filename") or path.stem).strip(), "width": width, "height": height,
            "objects": objects}


def crop_geometry(width: int, height: int, resize: int = 256, crop: int = 224) -> tuple[float, float, float]:
    """(r, s_x, s_y) of Resize(resize) → CenterCrop(crop) for a width × height image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}×{height}")
    if crop > resize:
        raise ValueError(f"crop {crop} must not exceed resize {resize}")
    r = resize / min(width, height)
    return r, (width * r - crop) / 2, (height * r - crop) / 2


def transform_boxes(boxes, width: int, height: int, resize: int = 256, crop: int = 224, clip: bool = True) -> np.ndarray:
    """(n, 4) boxes [x0, y0, x1, y1] in original pixels → float boxes in crop coordinates, clipped to
    [0, crop] unless `clip` is False (Phang's IoU uses the unclamped box, card Q5)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    r, sx, sy = crop_geometry(width, height, resize, crop)
    out = boxes * r - np.array([sx, sy, sx, sy])
    return np.clip(out, 0.0, crop) if clip else out


def load_image(path: str | Path, resize: int = 256, crop: int = 224) -> np.ndarray:
    """Decode with PIL, convert to RGB, Resize(resize) + CenterCrop(crop) → float32 (3, crop, crop) in [0,1]."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        r, sx, sy = crop_geometry(image.width, image.height, resize, crop)
        window = (sx / r, sy / r, (sx + crop) / r, (sy + crop) / r)
        out = image.resize((crop, crop), Image.BILINEAR, box=window)
    return np.asarray(out, np.float32).transpose(2, 0, 1) / 255.0


def read_wnids(source) -> list[str]:
    """The sorted list of WordNet ids from a sequence or a text file (first token of every line)."""
    if isinstance(source, (str, Path)):
        lines = Path(source).read_text().splitlines()
        ids = [line.split()[0].strip(",") for line in lines if line.strip()]
    else:
        ids = [str(w) for w in source]
    bad = [w for w in ids if not WNID.fullmatch(w)]
    if bad or not ids:
        raise ValueError(f"WordNet ids look like n01440764; got {bad[:3] or 'an empty list'}")
    return sorted(set(ids))


def _find_wnids(root: Path, wnids, folder_ids: set[str]) -> list[str]:
    if wnids is not None:
        return read_wnids(wnids)
    for name in SYNSET_FILES:
        if (root / name).is_file():
            return read_wnids(root / name)
    if len(folder_ids) == 1000:
        return sorted(folder_ids)
    raise ValueError(f"cannot map WordNet ids to class indices: pass wnids= (the 1,000 ids or a file such as "
                     f"LOC_synset_mapping.txt), put one of {SYNSET_FILES} in {root}, or use all 1,000 class folders")


def _index_files(root: Path, annotations) -> tuple[list[Path], dict[str, Path]]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    xml_root = Path(annotations) if annotations is not None else root
    if not xml_root.is_dir():
        raise ValueError(f"annotation folder {xml_root} does not exist")
    xmls = {p.stem: p for p in sorted(xml_root.rglob("*.xml"))}
    return images, xmls


def _select(entries: list[dict], class_list, n_classes, per_class, seed: int) -> tuple[list[dict], list[str]]:
    present = sorted({e["wnid"] for e in entries})
    if class_list is not None:
        chosen = [str(c) for c in class_list]
        missing = sorted(set(chosen) - set(present))
        if missing:
            raise ValueError(f"class_list names classes without annotated images: {missing[:5]}")
    elif n_classes is not None:
        if not isinstance(n_classes, int) or not 0 < n_classes <= len(present):
            raise ValueError(f"n_classes must be an int in [1, {len(present)}] (classes found), got {n_classes!r}")
        chosen = list(np.random.default_rng(seed).choice(present, n_classes, replace=False))
    else:
        chosen = present
    chosen = sorted(chosen)
    if per_class is not None and (not isinstance(per_class, int) or per_class <= 0):
        raise ValueError(f"per_class must be a positive int or None, got {per_class!r}")
    picked = []
    for wnid in chosen:
        members = [e for e in entries if e["wnid"] == wnid]
        picked += members[:per_class] if per_class is not None else members
    return picked, chosen


def load_imagenet_boxes(root, *, n_classes: int | None = None, per_class: int | None = None,
                        class_list: Sequence[str] | None = None, seed: int = 0, wnids=None, annotations=None,
                        resize: int = 256, crop: int = 224, require_target_box: bool = False) -> dict:
    """ImageNet validation images with their boxes, in the dataset dict of `study.data`.

    Classes: `class_list` (WordNet ids), else `n_classes` drawn without replacement by
    numpy.random.default_rng(seed) from the annotated classes present (card Q1), else all; then the
    first `per_class` images of each class by file name (all when None). Images without an XML
    file are skipped. Returns `images` float32 (N, 3, crop, crop) in [0, 1] (not normalised; see
    IMAGENET_MEAN / IMAGENET_STD); `labels` int64 (N,); `boxes` list of int64 (n, 5)
    [class index, x0, y0, x1, y1] end-exclusive in crop pixels (floor of starts, ceil of ends; a
    box of an id outside `wnids` gets class −1; boxes cropped away are dropped); `boxes_unclipped`
    the same rows before clipping to the crop (may extend past it; card Q5 of Phang); `masks` bool
    (N, 1, crop, crop), the union of the boxes of the image's own class; `group` zeros; `files`,
    `wnid` per image; `class_list` the chosen ids; `wnids` the full sorted id list.

    `require_target_box=True` drops every picked image none of whose target-class boxes survives
    the crop (its mask would be empty, and the pointing game is undefined on it);
    `dropped_no_target_box` counts them (always 0 when False) and `dropped_files` names them.
    """
    if not isinstance(require_target_box, (bool, np.bool_)):
        raise ValueError(f"require_target_box must be True or False, got {require_target_box!r}")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"ImageNet root {root} is not a folder")
    images, xmls = _index_files(root, annotations)
    entries = []
    for path in images:
        if path.stem not in xmls:
            continue
        note = parse_annotation(xmls[path.stem])
        folder = path.parent.name
        wnid = folder if WNID.fullmatch(folder) else (note["objects"][0][0] if note["objects"] else None)
        if wnid is not None:
            entries.append({"path": path, "note": note, "wnid": wnid})
    if not entries:
        raise ValueError(f"no JPEG image under {root} has an XML annotation with the same stem")
    all_ids = _find_wnids(root, wnids, {e["wnid"] for e in entries if WNID.fullmatch(e["path"].parent.name)})
    index = {w: i for i, w in enumerate(all_ids)}
    unknown = sorted({e["wnid"] for e in entries} - set(index))
    if unknown:
        raise ValueError(f"image classes {unknown[:5]} are not in the WordNet id list of {len(all_ids)} ids")
    picked, chosen = _select(entries, class_list, n_classes, per_class, seed)
    labels = [index[entry["wnid"]] for entry in picked]
    boxes, unclipped = zip(*[_crop_boxes(entry["note"], index, resize, crop) for entry in picked])
    boxes, unclipped = list(boxes), list(unclipped)
    masks = np.zeros((len(picked), 1, crop, crop), bool)
    for i, (label, image_boxes) in enumerate(zip(labels, boxes)):
        masks[i, 0] = rasterise_boxes(image_boxes[image_boxes[:, 0] == label, 1:], crop, crop)
    keep = masks.any(axis=(1, 2, 3)) if require_target_box else np.ones(len(picked), bool)
    dropped = [str(e["path"].relative_to(root)) for e, k in zip(picked, keep) if not k]
    if not keep.any():
        raise ValueError(f"none of the {len(picked)} picked images has a target-class box inside the "
                         f"{crop}-px crop")
    picked = [e for e, k in zip(picked, keep) if k]
    labels = [label for label, k in zip(labels, keep) if k]
    boxes = [b for b, k in zip(boxes, keep) if k]
    unclipped = [b for b, k in zip(unclipped, keep) if k]
    masks = masks[keep]
    return {"images": np.stack([load_image(entry["path"], resize, crop) for entry in picked]),
            "labels": np.array(labels, np.int64), "boxes": boxes, "boxes_unclipped": unclipped, "masks": masks,
            "group": np.zeros(len(picked), np.int64), "files": [str(e["path"].relative_to(root)) for e in picked],
            "wnid": [e["wnid"] for e in picked], "class_list": chosen, "wnids": all_ids,
            "dropped_no_target_box": len(dropped), "dropped_files": dropped}


def _crop_boxes(note: dict, index: dict[str, int], resize: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """An annotation's boxes as int64 (n, 5) [class index or −1, x0, y0, x1, y1] in the crop, clipped
    to it and unclipped (same rows); boxes that the crop cuts away entirely are dropped."""
    clipped, unclipped = [], []
    for name, *coords in note["objects"]:
        for clip, rows in ((True, clipped), (False, unclipped)):
            x0, y0, x1, y1 = transform_boxes(coords, note["width"], note["height"], resize, crop, clip)[0]
            rows.append([index.get(name, -1), math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)])
        if not (clipped[-1][3] > clipped[-1][1] and clipped[-1][4] > clipped[-1][2]):
            clipped.pop(), unclipped.pop()
    return tuple(np.array(rows, np.int64).reshape(-1, 5) for rows in (clipped, unclipped))


def imagenet_model(arch: str, weights_path, device: str | torch.device = "cpu") -> nn.Module:
    """torchvision's `vgg16` or `resnet50` with a 1,000-class state-dict file from disk (no
    download): `torchvision_model` restricted to the two ImageNet architectures of the papers.

    VGG16 is returned as an nn.Sequential (features, avgpool, flatten, classifier) sharing the
    loaded parameters, with non-inplace ReLUs, so captum's LRP applies; its `gradcam_layer` is
    "features.29" (the ReLU after the last conv). ResNet50's is "layer4".
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown ImageNet architecture {arch!r}; choose one of {ARCHITECTURES}")
    return torchvision_model(arch, weights_path, 1000, device, classes_from="the 1,000 ImageNet classes")


def classification_architectures() -> list[str]:
    """The names of torchvision's image classification models (`torchvision.models.list_models`)."""
    from torchvision import models

    return list(models.list_models(module=models))


def check_architecture(model) -> str:
    """`model` if it names a torchvision classification architecture, else ValueError naming `model`."""
    names = classification_architectures()
    if not isinstance(model, str) or model not in names:
        close = [n for n in names if isinstance(model, str) and model.lower()[:4] in n][:6]
        raise ValueError(f"model={model!r} is not a torchvision classification architecture; choose one of "
                         f"torchvision.models.list_models(module=torchvision.models)"
                         f"{' such as ' + ', '.join(close) if close else ' (resnet18, vgg11_bn, densenet121, ...)'}")
    return model


def check_folder_inputs(data_root, model) -> str:
    """The two parameters that `dataset="folder"` cannot do without (notebooks 01 and 02): ValueError
    naming the one that is None; returns `model` checked by `check_architecture`. Whether `data_root`
    is an ImageFolder tree is checked by `load_image_folder`, the weights by `torchvision_model`."""
    if model is None:
        raise ValueError("dataset='folder' needs model: the name of your torchvision classification "
                         "architecture (e.g. 'resnet18', 'vgg11_bn'), and weights_path: its state-dict file")
    if data_root is None:
        raise ValueError("dataset='folder' needs data_root: a folder with one sub-folder of images per class "
                         "(an ImageFolder tree)")
    return check_architecture(model)


def input_settings(model: str, image_size: int | None = None, mean=None, std=None) -> dict:
    """Resize / crop / normalisation for `model`: the preset of its torchvision weights entry
    (`ImageClassification`: crop 224, resize 256, ImageNet mean and std for most; e.g. 299 / 342
    for inception_v3), with `image_size` replacing the crop (the resize keeps the preset's ratio,
    e.g. 64 → 73) and `mean` / `std` (three numbers) replacing the normalisation.
    Returns {"resize", "crop", "mean", "std"}."""
    from torchvision import models

    preset = models.get_model_weights(check_architecture(model)).DEFAULT.transforms
    defaults = {name: p.default for name, p in inspect.signature(preset.func).parameters.items()
                if p.default is not inspect.Parameter.empty}
    defaults.update(preset.keywords)
    crop, resize = int(defaults["crop_size"]), int(defaults.get("resize_size", 256))
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not 8 <= image_size <= 2048:
            raise ValueError(f"image_size must be an int in [8, 2048] (the side of the centre crop), "
                             f"got {image_size!r}")
        resize, crop = max(int(image_size), round(int(image_size) * resize / crop)), int(image_size)
    out = {"resize": resize, "crop": crop}
    for name, value, default in (("mean", mean, defaults["mean"]), ("std", std, defaults["std"])):
        value = default if value is None else value
        try:
            array = np.asarray(value, np.float64).reshape(-1)
        except (TypeError, ValueError):
            array = np.array([])
        if array.shape != (3,) or not np.isfinite(array).all() or (name == "std" and (array <= 0).any()):
            positive = ", positive" if name == "std" else ""
            raise ValueError(f"{name} must be three finite numbers (one per RGB channel{positive}), got {value!r}")
        out[name] = tuple(float(v) for v in array)
    return out


def _state_dict(path: Path) -> Mapping:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "not a state-dict file"
        raise ValueError(f"weights_path {path} cannot be read by torch.load(..., weights_only=True) as a state dict: "
                         f"{error}") from error
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights_path {path} holds a {type(state).__name__}, not a state dict (names → tensors, as "
                         "model.state_dict() returns)")
    if all(str(k).startswith("module.") for k in state):  # saved from nn.DataParallel
        state = {str(k)[len("module."):]: v for k, v in state.items()}
    return state


def _head_keys(net: nn.Module, num_classes: int) -> set[str]:
    """The parameter names of the layers with `num_classes` outputs (the classifier heads)."""
    keys = set()
    for name, module in net.named_modules():
        outputs = getattr(module, "out_features", getattr(module, "out_channels", None))
        if isinstance(module, (nn.Linear, nn.Conv2d)) and outputs == num_classes:
            keys |= {f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)}
    return keys


def gradcam_layer(net: nn.Module, image_size: int = 224) -> str | None:
    """The layer Grad-CAM reads: for a VGG-style `features` stack, the ReLU after its last conv;
    otherwise the last module (holding a conv) called once in the forward pass whose output is a
    spatial map larger than 1 × 1 (found with forward hooks on a blank image): `layer4` of a ResNet,
    `features` of DenseNet / EfficientNet / MobileNet. None when there is none (the attribution
    registry then uses the last nn.Conv2d)."""
    features = getattr(net, "features", None)
    if isinstance(features, nn.Sequential) and isinstance(getattr(net, "classifier", None), nn.Sequential):
        relus = [i for i, m in enumerate(features) if isinstance(m, nn.ReLU)]
        convs = [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]
        if convs and relus and relus[-1] > convs[-1]:
            return f"features.{relus[-1]}"
    records, handles = [], []
    for name, module in net.named_modules():
        if name and any(isinstance(m, nn.Conv2d) for m in module.modules()):
            handles.append(module.register_forward_hook(lambda _m, _i, out, name=name: records.append((name, out))))
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, image_size, image_size, device=next(net.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    calls = {}
    for name, _ in records:
        calls[name] = calls.get(name, 0) + 1
    spatial = [name for name, out in records if isinstance(out, torch.Tensor) and out.ndim == 4
               and out.shape[-1] > 1 and out.shape[-2] > 1 and calls[name] == 1]
    return spatial[-1] if spatial else None


def torchvision_model(arch: str, weights_path, num_classes: int, device: str | torch.device = "cpu", *,
                      image_size: int = 224, classes_from: str | None = None) -> nn.Module:
    """A torchvision classification model `arch` (any name of `torchvision.models.list_models`)
    with `num_classes` outputs and the state dict in `weights_path` (loaded with
    `torch.load(..., weights_only=True)`; a {"state_dict": ...} wrapper and DataParallel's
    "module." prefixes are accepted), in eval mode on `device`, with non-inplace ReLUs and
    `gradcam_layer` set (see `gradcam_layer`). A VGG is returned as an nn.Sequential (features,
    avgpool, flatten, classifier) sharing the parameters, so that captum's LRP applies to it.

    ValueError naming the parameter: an unknown `model` name; a missing or unreadable
    `weights_path`; weights whose classifier has another number of outputs than `num_classes`
    (`classes_from` says where that number came from, e.g. "data_root has 3 class folders");
    weights of another architecture."""
    from torchvision import models

    arch = check_architecture(arch)
    path = Path(weights_path).expanduser() if weights_path is not None else None
    if path is None or not path.is_file():
        raise ValueError(f"weights_path must be a state-dict file of a torchvision {arch} "
                         f"(torch.save(model.state_dict(), path)), got {weights_path!r}")
    state = _state_dict(path)
    try:
        net = models.get_model(arch, weights=None, num_classes=int(num_classes))
    except (TypeError, ValueError) as error:
        raise ValueError(f"model={arch!r} cannot be built with num_classes={num_classes}: {error}") from error
    expected = net.state_dict()
    heads = _head_keys(net, int(num_classes))
    mismatched = {k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)}
    if set(state) == set(expected) and mismatched and mismatched <= heads:
        outputs = sorted({int(state[k].shape[0]) for k in mismatched})
        raise ValueError(f"{classes_from or f'the data have {num_classes} classes'}, but the {arch} in weights_path "
                         f"{path} has {' / '.join(map(str, outputs))} outputs: the model's outputs must match the "
                         f"classes (check model={arch!r}, weights_path and the class folders of data_root)")
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        detail = detail[:400] + ("…" if len(detail) > 400 else "")
        raise ValueError(f"weights_path {path} is not a torchvision {arch} state dict (weights of another "
                         f"architecture? model={arch!r}): {detail}") from error
    for module in net.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    if isinstance(net, models.VGG):
        net = nn.Sequential(OrderedDict(features=net.features, avgpool=net.avgpool, flatten=nn.Flatten(),
                                        classifier=net.classifier))
    net = net.to(device).eval()
    net.gradcam_layer = gradcam_layer(net, int(image_size))
    return net


def load_image_folder(root, *, n_images: int | None = None, resize: int = 256, crop: int = 224,
                      boxes: bool = True) -> dict:
    """Your own images: an ImageFolder tree under `root` (`torchvision.datasets.ImageFolder`: one
    sub-folder per class; class index = position of the folder name in sorted order), decoded with
    PIL, Resize(resize) → CenterCrop(crop) as `load_image`.

    Boxes (optional): a Pascal-VOC XML file beside an image (same stem, `.xml`; `parse_annotation`)
    gives its boxes; an `<object>` whose `<name>` is a class folder's name is a box of that class,
    any other name gets class −1 (kept, never a target). When at least one XML file exists, the
    localisation metrics are computed, so only images with a box of their own class inside the crop
    are kept; the others are dropped and counted (`dropped_no_target_box`, `dropped_files`). With no
    XML file at all, or with `boxes=False` (a caller that needs no boxes, e.g. notebook 01), the XML
    files are ignored: `localisation` is False, `masks` is None and every image is kept.

    `n_images`: the first ceil(n_images / classes) images of each class (by file name), all when
    None. Returns the dataset dict of `load_imagenet_boxes` (`images` float32 (N, 3, crop, crop) in
    [0, 1], `labels`, `boxes`, `boxes_unclipped`, `masks`, `group`, `files`) plus `classes` (the
    folder names), `localisation` and `data_key` (a digest of the files used and the geometry)."""
    from torchvision.datasets import ImageFolder

    root = Path(root).expanduser() if root is not None else None
    if root is None or not root.is_dir():
        raise ValueError(f"data_root must be a folder of class sub-folders of images (an ImageFolder tree), "
                         f"got {str(root) if root is not None else None!r}, which is not a folder")
    try:
        folder = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as error:
        raise ValueError(f"data_root {root} is not an ImageFolder tree (one sub-folder of images per class): "
                         f"{error}") from error
    if n_images is not None and (isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer))
                                 or n_images <= 0):
        raise ValueError(f"n_images must be a positive int or None, got {n_images!r}")
    if crop > resize:
        raise ValueError(f"crop {crop} must not exceed resize {resize}")
    samples = [(Path(p), int(label)) for p, label in folder.samples]
    localisation = bool(boxes) and any(p.with_suffix(".xml").is_file() for p, _ in samples)
    kept, dropped = [], []
    for path, label in samples:
        entry = {"path": path, "label": label, "note": None, "xml": None}
        if localisation:
            xml = path.with_suffix(".xml")
            if not xml.is_file():
                dropped.append(str(path.relative_to(root)))
                continue
            note = parse_annotation(xml)
            boxes, unclipped = _crop_boxes(note, folder.class_to_idx, resize, crop)
            if not (boxes[:, 0] == label).any():
                dropped.append(str(path.relative_to(root)))
                continue
            entry.update(note=note, xml=xml, boxes=boxes, unclipped=unclipped)
        kept.append(entry)
    if not kept:
        raise ValueError(f"data_root {root}: XML boxes were found, but no image has a box of its own class inside "
                         f"the {crop}-px crop; an <object>'s <name> must be the name of the image's class folder "
                         f"({', '.join(folder.classes[:5])}{', ...' if len(folder.classes) > 5 else ''})")
    per_class = math.ceil(n_images / len(folder.classes)) if n_images is not None else None
    picked = []
    for label in range(len(folder.classes)):
        members = [e for e in kept if e["label"] == label]
        picked += members[:per_class] if per_class is not None else members
    images = []
    for entry in picked:
        if entry["note"] is not None:
            with Image.open(entry["path"]) as image:
                size = image.size
            if size != (entry["note"]["width"], entry["note"]["height"]):
                note = entry["note"]
                raise ValueError(f"data_root: {entry['xml']} gives the size {note['width']}×{note['height']} but "
                                 f"the image {entry['path'].name} is {size[0]}×{size[1]}")
        images.append(load_image(entry["path"], resize, crop))
    labels = np.array([e["label"] for e in picked], np.int64)
    if localisation:
        boxes = [e["boxes"] for e in picked]
        unclipped = [e["unclipped"] for e in picked]
        masks = np.zeros((len(picked), 1, crop, crop), bool)
        for i, (label, image_boxes) in enumerate(zip(labels, boxes)):
            masks[i, 0] = rasterise_boxes(image_boxes[image_boxes[:, 0] == label, 1:], crop, crop)
    else:
        boxes = [np.zeros((0, 5), np.int64) for _ in picked]
        unclipped, masks = [b.copy() for b in boxes], None
    files = [e["path"] for e in picked] + [e["xml"] for e in picked if e["xml"] is not None]
    return {"images": np.stack(images), "labels": labels, "boxes": boxes, "boxes_unclipped": unclipped,
            "masks": masks, "group": np.zeros(len(picked), np.int64),
            "files": [str(e["path"].relative_to(root)) for e in picked], "classes": list(folder.classes),
            "localisation": localisation, "dropped_no_target_box": len(dropped), "dropped_files": dropped,
            "data_key": f"{cache.file_key(files)}:{resize}:{crop}"}
