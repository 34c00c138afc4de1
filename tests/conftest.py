"""Test set-up: no hub access, quiet logs, and shared fixtures."""

import os

# Nothing may wait on a model hub: transformers and open_clip must fail fast if asked.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest


@pytest.fixture(scope="session")
def fashion_corpus() -> list[str]:
    from tests.fashion_texts import corpus

    return corpus()


def pytest_ignore_collect(collection_path, config):
    """tests/multidevice needs 8 devices, set before JAX starts: tests/test_multidevice.py runs
    it in its own process (which sets E2_MULTIDEVICE=1)."""
    if os.environ.get("E2_MULTIDEVICE") != "1" and "multidevice" in collection_path.parts:
        return True
    return None
