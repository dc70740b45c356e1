"""One parallel map for independent jobs (trainings that only fill the disk cache, sweep points), on Dask.

`map_jobs(function, jobs)` calls `function(*job)` for every job and returns the results in the
order of `jobs`:
* in this process, one job after the other, with one worker (or one job) and no scheduler;
* otherwise as Dask tasks: on a `distributed.LocalCluster` of `workers` single-threaded worker
  processes started for the call, or on the running scheduler at `scheduler` (default: the
  environment variable STUDY_DASK_SCHEDULER, e.g. a Slurm cluster started with dask-jobqueue).

Every job runs with this process's cache folder (`config.CACHE_DIR`) and `threads` torch threads
(small convolutions gain little from a second intra-op thread, so two single-thread processes use
two cores best). Jobs seed themselves, so their results do not depend on the number of workers.
Several jobs may share one GPU: a worker only sees the device its job is given.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from study import config

SCHEDULER_ENV = "STUDY_DASK_SCHEDULER"


def default_scheduler() -> str | None:
    """The Dask scheduler address from STUDY_DASK_SCHEDULER, or None (a LocalCluster per call)."""
    return os.environ.get(SCHEDULER_ENV) or None


def _run_job(function: Callable, job: tuple, cache_dir: str, threads: int | None):
    config.CACHE_DIR = Path(cache_dir)
    config.exact_cuda_arithmetic()
    if threads:
        torch.set_num_threads(int(threads))
    return function(*job)


def map_jobs(function: Callable, jobs: Sequence[tuple], *, workers: int = 2, threads: int | None = 1,
             scheduler: str | None = None) -> list:
    """[function(*job) for job in jobs], in parallel on Dask when there is more than one worker
    (or a scheduler); see the module docstring. `function` must be importable (module level)."""
    if not callable(function):
        raise ValueError(f"function must be callable, got {type(function).__name__}")
    jobs = [tuple(job) for job in jobs]
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    scheduler = scheduler or default_scheduler()
    if not jobs:
        return []
    if scheduler is None and (workers == 1 or len(jobs) == 1):
        previous = torch.get_num_threads()
        try:
            if threads:
                torch.set_num_threads(threads)
            return [function(*job) for job in jobs]
        finally:
            torch.set_num_threads(previous)
    import dask
    from distributed import Client, LocalCluster

    # Dask's nanny writes `distributed.nanny.pre-spawn-environ` into *this* process's os.environ
    # before spawning a worker (MALLOC_TRIM_THRESHOLD_=65536, OMP/MKL/OPENBLAS_NUM_THREADS=1), so
    # every process started later inherits them: under `make test`, the notebooks nbval ran after
    # a sweep test trained 2× slower (glibc returning freed memory at once: a page fault per torch
    # allocation). Nothing is written here; the workers get the thread limits as their own env,
    # and keep glibc's default trimming (a training ran 4× slower with it in a worker).
    single_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cluster = None
    if scheduler is None:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}):
            # silence_logs: a worker whose scheduler closes first logs a heartbeat ERROR into the
            # notebook; a job's own failure still reaches the caller through gather
            cluster = LocalCluster(n_workers=min(workers, len(jobs)), threads_per_worker=1, processes=True,
                                   dashboard_address=None, env=single_thread, silence_logs=logging.CRITICAL)
    try:
        with Client(scheduler or cluster) as client:
            # earlier jobs first (callers put the longest first so that the workers finish together)
            futures = [client.submit(_run_job, function, job, str(config.CACHE_DIR), threads, pure=False,
                                     priority=len(jobs) - index) for index, job in enumerate(jobs)]
            return client.gather(futures)
    finally:
        if cluster is not None:
            cluster.close()
