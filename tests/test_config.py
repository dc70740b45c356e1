import contextlib
import os

import pytest
import torch

from study import config


def test_profiles_share_sections_and_grow():
    sections = {name: set(sections) for name, sections in config.PROFILES.items()}
    assert sections["smoke"] == sections["quick"] == sections["paper"]
    for section in sections["quick"]:
        smoke, quick, paper = (config.PROFILES[p][section] for p in ("smoke", "quick", "paper"))
        assert smoke.keys() == quick.keys() == paper.keys()
        for key, value in quick.items():
            numbers = [v for v in (smoke[key], value, paper[key]) if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if len(numbers) == 3 and key.startswith("n_"):
                assert smoke[key] <= value <= paper[key], (section, key)


def test_settings_apply_overrides_but_not_none():
    values = config.settings("smoke", "tour", epochs=None, width=4)
    assert values["epochs"] == config.PROFILES["smoke"]["tour"]["epochs"]
    assert values["width"] == 4


@pytest.mark.parametrize("call, message", [
    (lambda: config.settings("huge", "tour"), "unknown profile"),
    (lambda: config.settings("smoke", "nope"), "no section"),
    (lambda: config.settings("smoke", "tour", nope=1), "unknown setting"),
    (lambda: config.seed_everything(-1), "non-negative"),
])
def test_bad_requests_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_device_auto_and_explicit():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert config.get_device("auto").type == expected
    assert config.get_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            config.get_device("cuda")


def test_seed_everything_is_deterministic():
    first = torch.rand(3, generator=config.seed_everything(5))
    again = torch.rand(3, generator=config.seed_everything(5))
    assert torch.equal(first, again)
    assert torch.are_deterministic_algorithms_enabled()


def test_cuda_arithmetic_is_deterministic_full_float32(monkeypatch):
    # no TF32 (cuDNN's default for convolutions) and no autotuned cuDNN algorithms; flags only, so
    # this holds on a CPU-only build as well
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    torch.backends.cudnn.allow_tf32 = True
    config.seed_everything(0)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_seeded_block_is_reproducible_and_leaves_the_global_generator_alone():
    torch.manual_seed(11)
    expected_after = torch.rand(2)
    torch.manual_seed(11)
    with config.seeded(3):
        inside = torch.rand(4)
    after = torch.rand(2)
    with config.seeded(3):
        again = torch.rand(4)
    assert torch.equal(inside, again)
    assert torch.equal(after, expected_after)  # as if the block had not run
    with config.seeded(4):
        assert not torch.equal(torch.rand(4), inside)


def test_seeded_forks_every_cuda_device_manual_seed_touches(monkeypatch):
    # torch.manual_seed seeds every CUDA device, so all of them must be restored, not only the one in use
    forked = []

    @contextlib.contextmanager
    def record(devices):
        forked.append(list(devices))
        yield

    monkeypatch.setattr(torch.random, "fork_rng", record)
    monkeypatch.setattr(torch, "manual_seed", lambda seed: None)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with config.seeded(0):
        torch.rand(1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    with config.seeded(0):
        torch.rand(1)
    assert forked == [[0, 1], []]


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3", None])
def test_seeded_refuses_a_bad_seed(seed):
    with pytest.raises(ValueError, match="non-negative int"):
        with config.seeded(seed):
            torch.rand(1)
