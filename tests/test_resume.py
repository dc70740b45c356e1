"""Kill `reproduce` part-way, run it again: it resumes from the cache and ends with the same tables."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd

from study import config


def _reproduce(out, cache, env_extra=None, kill_after=None):
    env = {**os.environ, "STUDY_CACHE_DIR": str(cache), **(env_extra or {})}
    command = [sys.executable, "-m", "study", "reproduce", "--profile", "smoke", "--only", "00_tour",
               "--output-dir", str(out)]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=config.ROOT, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None, time.monotonic() - started
    assert process.returncode == 0, stderr[-2000:]
    return process.returncode, time.monotonic() - started


def _tables(out):
    folder = out / "figures" / "00_tour"
    return {csv.name: pd.read_csv(csv) for csv in sorted(folder.glob("*.csv"))}


def test_killed_reproduce_resumes_with_identical_tables(tmp_path):
    _, full_time = _reproduce(tmp_path / "a", tmp_path / "cache_a")
    expected = _tables(tmp_path / "a")
    assert {"datasets.csv", "attribution_maps.csv", "findings.csv"} <= set(expected)

    killed, _ = _reproduce(tmp_path / "b", tmp_path / "cache_b", kill_after=0.6 * full_time)
    assert killed is None, "the run finished before it could be killed"

    _reproduce(tmp_path / "b", tmp_path / "cache_b")
    resumed = _tables(tmp_path / "b")
    assert resumed.keys() == expected.keys()
    for name in expected:
        pd.testing.assert_frame_equal(resumed[name], expected[name], obj=name)
