"""Fixtures for the bench tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve.helpers import build_vllm_tiny_llama


@pytest.fixture(scope="session")
def vllm_tiny_model(tmp_path_factory, default_model_path) -> Path:
    """A 2-layer random Llama that vLLM's CPU backend serves (head_dim 32; see tests/serve/helpers.py)."""
    return build_vllm_tiny_llama(tmp_path_factory.mktemp("bench-vllm-tiny"), default_model_path)
