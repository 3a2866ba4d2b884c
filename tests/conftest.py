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


@pytest.fixture(scope="session")
def tiny_random_dir(tmp_path_factory):
    """The tiny SDXL with freshly initialised weights (`python -m sdxl.tiny OUT --random`): for tests that use
    the UNet as a generic function, whose outputs should not depend on what the pretrained model learned."""
    from sdxl.tiny import build

    return build(tmp_path_factory.mktemp("tiny-random"), weights=None)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    """diffusers' StableDiffusionXLPipeline on the tiny model (the real client), fresh per test module."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and on a busy machine far faster (no spinning workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
