"""Make `import torchvision` work when its compiled extension does not load.

The PyPI build of torchvision 0.28.0 targets CUDA; next to the CPU build of torch 2.13.0 its
C++ extension fails to load, and the import then dies in `torchvision._meta_registrations`,
which registers fake kernels for `torchvision::nms` and `torchvision::qnms` without checking
that those operators exist. We try the plain import first; only if it fails for that reason
do we declare the two operator schemas (no kernels: `study` never calls torchvision's compiled
ops) and import again. Where the extension loads, nothing here runs.
"""

from __future__ import annotations

import importlib
import sys

import torch

_MISSING_OPERATOR_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_schema_library: torch.library.Library | None = None
patched = False


def _forget_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def _declare_missing_schemas() -> None:
    global _schema_library
    if _schema_library is None:
        _schema_library = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _MISSING_OPERATOR_SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            _schema_library.define(schema)


def import_torchvision():
    """Import and return torchvision, declaring the missing operator schemas only if needed."""
    global patched
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    _forget_partial_import()
    _declare_missing_schemas()
    patched = True
    return importlib.import_module("torchvision")
