"""Shared fixtures: the tiny SDXL is built once per test session into a private cache folder."""

import os
import tempfile

import pytest
import torch


def pytest_configure(config):
    # Never touch the user's ~/.cache from tests: `tiny` builds into a per-session folder.
    os.environ.setdefault("SDXL_LORA_CACHE", tempfile.mkdtemp(prefix="sdxl-lora-test-cache-"))
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir():
    """Path of the tiny SDXL in diffusers layout (what `--pretrained_model tiny` uses)."""
    from sdxl.tiny import tiny_model_path

    return tiny_model_path()
