"""One disk cache for every stored result: generated data (`data.cached`), trained models
(`train.cached_fit`), maskers (`masking.cached_train_masker`), notebook 05's runs and notebook 02's
score tables.

A result is stored under `<CACHE_DIR>/<section>/<name>-<key>.<suffix>`, where the key is the
sha256 of the canonical JSON of (name, every parameter the step reads, the torch version). Each
caller puts its own version number into the parameters and raises it when its code changes what
it stores; models trained through `train.cached_fit` also carry the engine's and the data
generators' versions (`train.model_key`), and data read from disk is named by `file_key`. Files
are written to a temporary name in the same folder and renamed, so a killed run never leaves a
half-written result under the final name and simply recomputes it on resume.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from study import config

KEY_LENGTH = 24


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise ValueError(f"cache parameters must be JSON-like (numbers, strings, lists, dicts, dataclasses), got {value!r}")


def canonical(name: str, params: dict) -> str:
    """The text a key hashes: JSON of name, params and the torch version, keys sorted. Anything that
    is not JSON-like (numbers, strings, lists, dicts, dataclasses, numpy values, paths) raises
    ValueError rather than being stringified, since a repr may hold a memory address."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict, got {type(params).__name__}")
    try:
        return json.dumps({"name": name, "params": params, "torch": torch.__version__.split("+")[0]},
                          sort_keys=True, separators=(",", ":"), default=_jsonable, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"cannot build a cache key from params: {error}") from error


def key(name: str, params: dict) -> str:
    """The hex sha256 (first `KEY_LENGTH` digits) of `canonical(name, params)`."""
    return hashlib.sha256(canonical(name, params).encode()).hexdigest()[:KEY_LENGTH]


def file_key(paths) -> str:
    """A digest of files' resolved names, sizes and modification times: the key of data read from
    disk (reading every byte of a dataset would cost more than the step it keys)."""
    digest = hashlib.sha256()
    for file in paths:
        stat = Path(file).stat()
        digest.update(f"{Path(file).resolve()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def code_key(notebook) -> str:
    """A digest of the code a notebook run executes: its code cells' sources and every module of the
    `study` package (contents, not times). Outputs and narrative do not count, so refreshing a
    notebook changes nothing here; editing an experiment step or a profile does."""
    digest = hashlib.sha256()
    for cell in json.loads(Path(notebook).read_text())["cells"]:
        if cell["cell_type"] == "code":
            source = cell["source"]
            digest.update(("".join(source) if isinstance(source, list) else source).encode() + b"\0")
    package = Path(__file__).resolve().parent
    for module in sorted(package.rglob("*.py")):
        digest.update(f"{module.relative_to(package).as_posix()}\0".encode() + module.read_bytes() + b"\0")
    return digest.hexdigest()[:KEY_LENGTH]


def path(section: str, name: str, params: dict, suffix: str, cache_dir=None) -> Path:
    """Where the result of (name, params) lives: `<cache_dir or CACHE_DIR>/<section>/<name>-<key><suffix>`."""
    return Path(config.CACHE_DIR if cache_dir is None else cache_dir) / section / f"{name}-{key(name, params)}{suffix}"


def atomic_write(target: Path, write: Callable[[str], None]) -> None:
    """Call `write(temporary_path)`, then rename the file to `target` (same folder, so the rename
    is atomic): readers never see a partial file, and a failed write leaves nothing behind."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_torch(obj, target: Path) -> None:
    """`torch.save(obj)` to `target`, atomically."""
    atomic_write(target, lambda tmp: torch.save(obj, tmp))
