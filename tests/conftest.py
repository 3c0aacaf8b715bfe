"""Shared fixtures: tiny random models from configs (see rowsft_nb.testing)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from rowsft_nb import testing

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_llama():
    return testing.tiny_llama()


@pytest.fixture
def tiny_bert():
    return testing.tiny_bert()


@pytest.fixture
def tiny_gpt2():
    return testing.tiny_gpt2()


@pytest.fixture
def tiny_vit():
    return testing.tiny_vit()


@pytest.fixture(params=["llama", "bert", "gpt2", "vit"])
def any_tiny_model(request):
    """Each tiny architecture in turn."""
    return getattr(testing, f"tiny_{request.param}")()


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty ROWSFT_CACHE for tests that build caches."""
    monkeypatch.setenv("ROWSFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
