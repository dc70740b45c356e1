"""study.cache: one key rule and one atomic write for every stored result."""
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import study  # noqa: F401  (makes torchvision importable; must come first)
from study import cache


@dataclass
class _Settings:
    width: int
    lr: float


def test_key_is_stable_and_reads_every_setting():
    a = cache.key("run", {"b": 1, "a": [1, 2], "s": _Settings(8, 1e-3)})
    assert a == cache.key("run", {"s": _Settings(8, 1e-3), "a": [1, 2], "b": 1})   # order of keys is irrelevant
    assert len(a) == cache.KEY_LENGTH and int(a, 16) >= 0
    assert a != cache.key("run", {"b": 1, "a": [1, 2], "s": _Settings(8, 1e-4)})   # a nested setting counts
    assert a != cache.key("other", {"b": 1, "a": [1, 2], "s": _Settings(8, 1e-3)})  # so does the name
    assert cache.key("run", {"x": np.int64(3), "p": Path("a/b")}) == cache.key("run", {"x": 3, "p": "a/b"})
    assert torch.__version__.split("+")[0] in cache.canonical("run", {})


def test_path_puts_results_under_their_section(tmp_path):
    target = cache.path("models", "toy", {"a": 1}, ".pt", tmp_path)
    assert target.parent == tmp_path / "models"
    assert target.name == f"toy-{cache.key('toy', {'a': 1})}.pt"


@pytest.mark.parametrize("name, params, message", [
    ("run", {"x": object()}, "cache key"),                 # a repr may hold a memory address: refuse it
    ("run", {"x": float("nan")}, "cache key"),
    ("", {}, "name"),
    ("run", [1, 2], "params must be a dict"),
])
def test_bad_keys_raise(name, params, message):
    with pytest.raises(ValueError, match=message):
        cache.key(name, params)


def test_interrupted_write_leaves_no_readable_partial_file(tmp_path, monkeypatch):
    def dying_save(obj, path):
        with open(path, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    target = tmp_path / "models" / "x.pt"
    with pytest.raises(KeyboardInterrupt):
        cache.save_torch({"w": torch.zeros(1)}, target)
    assert not target.exists()
    assert os.listdir(target.parent) == []


def test_save_torch_round_trip(tmp_path):
    target = tmp_path / "runs" / "x.pt"
    cache.save_torch({"w": torch.arange(3.0)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(3.0))
    assert os.listdir(target.parent) == ["x.pt"]


def test_file_key_follows_names_sizes_and_dates_of_the_files(tmp_path):
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("x\n1\n")
    second.write_text("y\n")
    key = cache.file_key([first, second])
    assert key == cache.file_key([str(first), str(second)]) and len(key) == 20
    assert key != cache.file_key([second, first]) and key != cache.file_key([first])
    stat = first.stat()
    first.write_text("x\n2\n")                                   # same size, edited
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache.file_key([first, second]) != key
    assert cache.file_key([]) == cache.file_key(())
    with pytest.raises(FileNotFoundError):
        cache.file_key([tmp_path / "missing.csv"])
