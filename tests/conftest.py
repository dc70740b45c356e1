"""Fixtures shared by several test modules."""
import os

import pytest
import torch

# no progress bars in test logs, nor in the kernels nbval starts (they inherit the environment)
os.environ.setdefault("STUDY_PROGRESS", "0")
os.environ.setdefault("STUDY_HEADLESS", "1")  # nbval's kernels: no widgets (study.explore.headless)


@pytest.fixture(scope="session")
def random_weights():
    """save(path, arch="resnet18", num_classes=3): a randomly initialised torchvision classifier's
    state dict written to `path` (a user's `weights_path`); returns the path."""
    def save(path, arch="resnet18", num_classes=3):
        from torchvision import models

        torch.manual_seed(0)
        torch.save(models.get_model(arch, weights=None, num_classes=num_classes).state_dict(), path)
        return path

    return save


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    barriers under contention cost far more than the work: run a module single-threaded and
    restore the setting afterwards. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def cli(capsys):
    """cli(*args) -> (exit code, stderr): `python -m study ARGS` in this process, for usage errors
    that stop before anything runs (a subprocess would spend its seconds importing torch)."""
    from study.__main__ import main

    def run(*args: str) -> tuple[int, str]:
        try:
            code = main(list(args))
        except SystemExit as stop:  # argparse's own usage errors
            code = stop.code
        return code, capsys.readouterr().err

    return run
