"""study.parallel.map_jobs: in process, and on a Dask LocalCluster (results in job order, the
caller's cache folder and thread count in every worker)."""

import os

import pytest
import torch

from study import config, parallel


def _facts(index: int, scale: float) -> dict:
    return {"index": index, "value": index * scale, "cache": str(config.CACHE_DIR), "threads": torch.get_num_threads(),
            "pid": os.getpid()}


def _cuda_flags() -> dict:
    return {"tf32": torch.backends.cudnn.allow_tf32, "deterministic": torch.backends.cudnn.deterministic}


def _environment(key: str) -> str | None:
    return os.environ.get(key)


def test_one_worker_runs_here_in_order_and_restores_the_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    previous = torch.get_num_threads()
    out = parallel.map_jobs(_facts, [(i, 0.5) for i in range(3)], workers=1, threads=1)
    assert [o["value"] for o in out] == [0.0, 0.5, 1.0]
    assert {o["pid"] for o in out} == {os.getpid()} and {o["threads"] for o in out} == {1}
    assert torch.get_num_threads() == previous
    assert parallel.map_jobs(_facts, [], workers=2) == []


def test_dask_workers_return_in_job_order_with_the_callers_cache_and_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.delenv(parallel.SCHEDULER_ENV, raising=False)
    jobs = [(i, 2.0) for i in range(5)]
    out = parallel.map_jobs(_facts, jobs, workers=2, threads=1)
    assert [o["index"] for o in out] == list(range(5)) and [o["value"] for o in out] == [0, 2, 4, 6, 8]
    assert os.getpid() not in {o["pid"] for o in out}
    assert {o["cache"] for o in out} == {str(tmp_path / "cache")} and {o["threads"] for o in out} == {1}


def test_dask_leaves_this_process_environment_alone(monkeypatch):
    """Dask's nanny would write MALLOC_TRIM_THRESHOLD_ and OMP_NUM_THREADS=1 into the caller's
    environment, and every process started afterwards (nbval's kernels) would inherit them."""
    for key in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv(parallel.SCHEDULER_ENV, raising=False)
    before = dict(os.environ)
    out = parallel.map_jobs(_environment, [("OMP_NUM_THREADS",), ("MALLOC_TRIM_THRESHOLD_",)], workers=2, threads=None)
    assert out == ["1", None]  # the workers run single-threaded, with glibc's default trimming
    assert dict(os.environ) == before


def test_scheduler_address_from_the_environment(monkeypatch):
    monkeypatch.delenv(parallel.SCHEDULER_ENV, raising=False)
    assert parallel.default_scheduler() is None
    monkeypatch.setenv(parallel.SCHEDULER_ENV, "tcp://10.0.0.1:8786")
    assert parallel.default_scheduler() == "tcp://10.0.0.1:8786"


@pytest.mark.parametrize("kwargs, message", [({"workers": 0}, "workers"), ({"workers": 1.5}, "workers"),
                                             ({"threads": 0}, "threads"), ({"function": 3}, "callable")])
def test_bad_arguments_raise(kwargs, message):
    arguments = {"function": _facts, "jobs": [(0, 1.0)], **kwargs}
    function, jobs = arguments.pop("function"), arguments.pop("jobs")
    with pytest.raises(ValueError, match=message):
        parallel.map_jobs(function, jobs, **arguments)


def test_jobs_get_the_notebooks_cuda_arithmetic(tmp_path, monkeypatch):
    # a worker process never calls seed_everything: each job sets full-float32, deterministic CUDA itself
    monkeypatch.setattr(config, "CACHE_DIR", config.CACHE_DIR)  # _run_job sets it; here it runs in this process
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    torch.backends.cudnn.allow_tf32 = True
    assert parallel._run_job(_cuda_flags, (), str(tmp_path), None) == {"tf32": False, "deterministic": True}
