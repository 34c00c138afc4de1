"""Counts JAX's persistent compilation cache use in a test process: programs compiled (those
that take long enough for the cache to keep them) and programs loaded from the cache, and the
process's own CPU time. `install()` registers a listener as soon as jax's monitoring module is
loaded (at once if it is); the counts go to the JSON-lines file $E2_TEST_CACHE_STATS at exit. The test session
installs it in its own process (tests/conftest.py) and, through the sitecustomize.py beside
this file (on PYTHONPATH), in every Python process it starts."""

import atexit
import importlib.abc
import importlib.machinery
import json
import os
import sys

# Programs compiled (taking at least MIN_SECONDS, what the session's cache keeps) and loaded from
# the cache instead, with the seconds each side took or saved.
MIN_SECONDS = float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5"))
counts = {"compiled": 0, "compile_s": 0.0, "hits": 0, "saved_s": 0.0}
_COMPILE = "/jax/core/compile/backend_compile_duration"
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"


def _duration(event: str, duration: float, **kwargs) -> None:
    if event == _COMPILE and duration >= MIN_SECONDS:
        counts["compiled"] += 1
        counts["compile_s"] += duration
    elif event == _SAVED:
        counts["hits"] += 1
        counts["saved_s"] += max(duration, 0.0)


class _AfterMonitoring(importlib.abc.MetaPathFinder):
    """Registers the listener right after `jax._src.monitoring` executes."""

    def find_spec(self, name, path=None, target=None):
        if name != "jax._src.monitoring":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            module.register_event_duration_secs_listener(_duration)

        spec.loader.exec_module = exec_module
        return spec


def cpu_seconds() -> float:
    """This process's CPU time so far (user and system, not its children's)."""
    times = os.times()
    return times.user + times.system


def _name() -> str:
    """The process as the summary names it: its command line, or the pytest-xdist worker it is."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and sys.argv[:1] == ["-c"] and "xdist" in sys.modules:  # not a pytest it started
        return f"pytest worker {worker}"
    return " ".join(sys.argv)[:200]


_written = False


def _write() -> None:
    """This process's row, once (a pytest-xdist worker writes it at its session's end, before exit)."""
    global _written
    out = os.environ.get("E2_TEST_CACHE_STATS")
    if out and not _written:
        _written = True
        with open(out, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "argv": _name(), "cpu_s": cpu_seconds(),
                                **counts}) + "\n")


def install(write_at_exit: bool = True) -> None:
    if "jax._src.monitoring" in sys.modules:
        sys.modules["jax._src.monitoring"].register_event_duration_secs_listener(_duration)
    else:
        sys.meta_path.insert(0, _AfterMonitoring())
    if write_at_exit:
        atexit.register(_write)
