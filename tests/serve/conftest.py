"""Fixtures for the serve tests (the builders live in ``helpers``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve.helpers import build_vllm_tiny_llama


@pytest.fixture(scope="session")
def vllm_tiny_model_path(tmp_path_factory, default_model_path) -> Path:
    """A 2-layer random Llama (hidden 64, head_dim 32) that vLLM's CPU backend serves."""
    return build_vllm_tiny_llama(tmp_path_factory.mktemp("vllm-tiny-llama"), default_model_path)


@pytest.fixture(scope="session")
def other_tiny_model_path(tmp_path_factory, default_model_path) -> Path:
    """Like ``vllm_tiny_model_path`` but hidden 96: adapters made on it have the wrong shapes."""
    return build_vllm_tiny_llama(tmp_path_factory.mktemp("other-tiny-llama"), default_model_path, seed=1, hidden=96)
