"""Shared fixtures: the tiny built-in pipelines (a few thousand parameters, CPU, seconds)."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# fluxtune.diskcache writes under $XDG_CACHE_HOME: one fresh folder per test session, not the user's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="fluxtune-test-cache-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    # The tiny models are launch-bound: one thread avoids oversubscribing the 2-core CI machine.
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def tiny_flux():
    from fluxtune.pipelines import load

    return load("tiny-flux", dtype="float32")


@pytest.fixture
def tiny_dit():
    from fluxtune.pipelines import load

    return load("tiny-dit", dtype="float32")


def gen(seed: int = 0):
    import torch

    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _fake_gpus_have_triton(monkeypatch):
    """Tests that describe a GPU with a made-up HardwareInfo mean a Linux CUDA torch, which brings Triton;
    this CPU machine has none. A test of the Triton-less case patches it back to False."""
    from fluxtune import hardware

    monkeypatch.setattr(hardware, "triton_available", lambda: True)
