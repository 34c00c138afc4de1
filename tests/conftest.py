"""Test set-up: no hub access, quiet logs, and shared fixtures."""

import os

# Nothing may wait on a model hub: transformers and open_clip must fail fast if asked.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One XLA compilation cache for the session, inherited by the processes tests start: the
# training-process tests compile the same tiny step in several processes (resume, kill, SIGTERM),
# and a cached executable is the same program, so results are unchanged (bitwise).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="e2_jax_test_xla_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# torchvision and open_clip import triton, whose native library segfaults when it loads after
# TensorFlow's (checked with tensorflow-cpu 2.21 and triton 3.8: `import tensorflow, triton`
# crashes, `import triton, tensorflow` does not). The data tests load TensorFlow and the parity
# tests torchvision in the same process, so triton goes first.
try:
    import triton  # noqa: F401
except ImportError:
    pass

import pytest


@pytest.fixture(scope="session")
def fashion_corpus() -> list[str]:
    from e2_jax.data.fashion_texts import corpus

    return corpus()


def pytest_ignore_collect(collection_path, config):
    """tests/multidevice needs 8 devices, set before JAX starts: tests/test_multidevice.py runs
    it in its own process (which sets E2_MULTIDEVICE=1)."""
    if os.environ.get("E2_MULTIDEVICE") != "1" and "multidevice" in collection_path.parts:
        return True
    return None


@pytest.fixture(scope="session")
def synth_tiny(tmp_path_factory) -> str:
    """SynthFashion/tiny (64 + 16 products, 32 px) built as the pipeline reads it; its data_dir."""
    from e2_jax.data.build import build

    data_dir = tmp_path_factory.mktemp("tfds")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("E2_SYNTH_WORKERS", "1")  # a worker pool costs more than 80 tiny products
        build("synth_fashion/tiny", str(data_dir))
    return str(data_dir)


@pytest.fixture(scope="session")
def trained_tiny(synth_tiny, tmp_path_factory):
    """One two-stage run of `tests.test_train.tiny_config` (3 + 3 steps, gradient clipping on):
    (its workdir, what `train.run` returned). Shared by the training and inference tests."""
    from e2_jax.training import train
    from tests.test_train import tiny_config

    workdir = tmp_path_factory.mktemp("trained_tiny")
    return workdir, train.run(tiny_config(synth_tiny, **{"optim.grad_clip": 1.0}), workdir)
