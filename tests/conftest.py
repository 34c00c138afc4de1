"""Test set-up: no hub access, quiet logs, and shared fixtures."""

import collections
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Nothing may wait on a model hub: transformers and open_clip must fail fast if asked.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Before JAX starts, here and in every process the tests start (they inherit the environment):
# with libtpu and the CUDA plugin installed (requirements-test.txt) and no TPU or GPU, e2_jax
# tells JAX to use the CPU (e2_jax/__init__.py).
import e2_jax  # noqa: F401

# One XLA compilation cache for the session, inherited by every process it starts (pytest-xdist's
# workers, the trainer's processes): a program one test compiled loads from the cache in the next
# test or process, and a cached executable is the same program, so results are unchanged
# (bitwise). The cache's requests and hits are counted in each process (tests/site) and summed
# at the end of the run. The folder is removed at the end by the process that made it.
_SITE = str(Path(__file__).resolve().parent / "site")
_MADE_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _MADE_CACHE:
    _session = tempfile.mkdtemp(prefix="e2_jax_test_session_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_session, "xla")
    os.environ["E2_TEST_CACHE_STATS"] = os.path.join(_session, "cache_stats.jsonl")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SITE, os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, _SITE)
import compile_counts  # noqa: E402

from tests.processes import xla_flags  # noqa: E402

compile_counts.install(write_at_exit=False)
# XLA's CPU compiler tuned for short test runs (tests/processes.py), here and in every process
# that inherits the environment; the fake device count a process asks for is kept.
os.environ["XLA_FLAGS"] = xla_flags(existing=os.environ.get("XLA_FLAGS", ""))

# torchvision and open_clip import triton, whose native library segfaults when it loads after
# TensorFlow's (checked with tensorflow-cpu 2.21 and triton 3.8: `import tensorflow, triton`
# crashes, `import triton, tensorflow` does not). The data tests load TensorFlow and the parity
# tests torchvision in the same process, so triton goes first.
try:
    import triton  # noqa: F401
except ImportError:
    pass


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


def _once(request, tmp_path_factory, name: str, make) -> Path:
    """A folder `make(folder)` fills once per test session: in a pytest-xdist worker, in the
    workers' common temporary folder, by the first worker to ask (the others wait on its lock,
    then read it); otherwise in this session's. Those who share it only read it."""
    import filelock

    root = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # this session's workers share its parent
        root = root.parent
    folder, done = root / name, root / f"{name}.done"
    with filelock.FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed first try left
            folder.mkdir(parents=True)
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def synth_tiny(request, tmp_path_factory) -> str:
    """SynthFashion/tiny (64 + 16 products, 32 px) built as the pipeline reads it; its data_dir."""
    from e2_jax.data.build import build

    def make(data_dir: Path) -> None:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("E2_SYNTH_WORKERS", "1")  # a worker pool costs more than 80 tiny products
            build("synth_fashion/tiny", str(data_dir))

    return str(_once(request, tmp_path_factory, "tfds", make))


@pytest.fixture(scope="session")
def trained_tiny(request, synth_tiny, tmp_path_factory):
    """One two-stage run of `tests.test_train.tiny_config` (3 + 3 steps, gradient clipping on):
    (its workdir, its step and last validation), trained once per session. Shared by the
    training and inference tests, which read it (a test that writes copies it first)."""
    from e2_jax.training import train
    from tests.test_train import tiny_config

    def make(workdir: Path) -> None:
        result = train.run(tiny_config(synth_tiny, **{"optim.grad_clip": 1.0}), workdir / "run")
        (workdir / "result.json").write_text(json.dumps({"step": int(result["step"]), "eval": result["eval"]}))

    shared = _once(request, tmp_path_factory, "trained_tiny", make)
    return shared / "run", json.loads((shared / "result.json").read_text())


def pytest_collection_modifyitems(config, items):
    """A test on the session's trained model is `slow`: `-m "not slow"` skips its training. Then
    the files whose tests are most often slow first (each in its own order), so that the two
    pytest-xdist workers, which take a file at a time in this order (pyproject.toml), start on
    the long ones and end together."""
    for item in items:
        if "trained_tiny" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    tests = collections.Counter(item.path for item in items)
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: (-slow[item.path] / tests[item.path], -slow[item.path]))


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: its counts to the file
        compile_counts._write()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The compilation cache's hits and misses over the run, and the processes the tests started
    with their CPU time, every process counted (except those that ended by a signal or
    os._exit, which write nothing)."""
    if hasattr(config, "workerinput") or not os.environ.get("E2_TEST_CACHE_STATS"):
        return
    rows = [dict(compile_counts.counts, pid=os.getpid(), argv="pytest", cpu_s=compile_counts.cpu_seconds())]
    stats = Path(os.environ["E2_TEST_CACHE_STATS"])
    if stats.is_file():
        rows += [json.loads(line) for line in stats.read_text().splitlines() if line.strip()]
    total = {key: sum(r[key] for r in rows) for key in ("compiled", "compile_s", "hits", "saved_s", "cpu_s")}
    write = terminalreporter.write_line
    if total["compiled"] + total["hits"]:
        write(f"XLA compilation cache (programs of {compile_counts.MIN_SECONDS:g} s or more): {total['hits']} loaded "
              f"(hit rate {total['hits'] / (total['hits'] + total['compiled']):.0%}, saving about "
              f"{total['saved_s']:.0f} s), {total['compiled']} compiled ({total['compile_s']:.0f} s), in "
              f"{sum(1 for r in rows if r['compiled'] or r['hits'])} processes")
    write(f"CPU time: {total['cpu_s']:.0f} s in {len(rows)} Python processes (the test session and those it "
          f"started), {rows[0]['cpu_s']:.0f} s of it in the session's; the costliest started ones:")
    for row in sorted(rows[1:], key=lambda r: -r["cpu_s"])[:8]:
        write(f"  {row['cpu_s']:6.1f} s  {row['argv'][:150]}")


def pytest_unconfigure(config):
    if _MADE_CACHE and not hasattr(config, "workerinput") and not os.environ.get("E2_TEST_KEEP_CACHE"):
        shutil.rmtree(os.path.dirname(os.environ["JAX_COMPILATION_CACHE_DIR"]), ignore_errors=True)
