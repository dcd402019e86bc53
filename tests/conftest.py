"""Shared fixtures: the warm-started tiny model (built once, cached on disk) and environment."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub: fail fast instead of retrying


@pytest.fixture(scope="session")
def tiny_model_dir():
    from async_vapo.tasks.tiny_model import ensure_tiny_model

    return ensure_tiny_model(progress=False)
