"""Both branches of the torchvision import shim, each in a fresh interpreter."""

import subprocess
import sys

import pytest

PROBE = """
import importlib.util, pathlib, torch
spec = importlib.util.find_spec("torchvision")
library = pathlib.Path(spec.origin).parent / "_C.so"
try:
    torch.ops.load_library(str(library)); print("native")
except (OSError, RuntimeError):
    print("broken")
"""


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def extension_state() -> str:
    return _python(PROBE)


def test_import_works_and_patches_only_when_extension_is_missing(extension_state):
    out = _python(
        "import study, torchvision, study._torchvision_compat as c;"
        "print(c.patched, torchvision.extension._has_ops(), torchvision.models.resnet18 is not None)"
    )
    patched, has_ops, _ = out.split()
    assert patched == str(extension_state == "broken")
    assert has_ops == str(extension_state == "native")


def test_shim_does_nothing_when_torchvision_imports(extension_state):
    if extension_state == "native":
        out = _python("import study._torchvision_compat as c; c.import_torchvision(); print(c.patched, c._schema_library)")
    else:
        # Stand in for a working extension: the operators exist before torchvision is imported.
        out = _python(
            "import torch; lib = torch.library.Library('torchvision', 'DEF');"
            "lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor');"
            "lib.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor');"
            "import study._torchvision_compat as c; c.import_torchvision(); print(c.patched, c._schema_library)"
        )
    assert out == "False None"
