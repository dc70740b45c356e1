"""Fixtures shared by several test modules."""
import os

import pytest
import torch

# no progress bars in test logs, nor in the kernels nbval starts (they inherit the environment)
os.environ.setdefault("STUDY_PROGRESS", "0")
os.environ.setdefault("STUDY_HEADLESS", "1")  # nbval's kernels: no widgets (study.explore.headless)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    barriers under contention cost far more than the work: run a module single-threaded and
    restore the setting afterwards. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
