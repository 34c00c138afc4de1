"""Counts JAX's persistent compilation cache use in a test process: requests (programs that went
to the cache) and hits. `install()` registers a listener as soon as jax's monitoring module is
loaded (at once if it is); the counts go to the JSON-lines file $E2_TEST_CACHE_STATS at exit.
The test session installs it in its own process (tests/conftest.py) and, through the
sitecustomize.py beside this file (on PYTHONPATH), in every Python process it starts."""

import atexit
import importlib.abc
import importlib.machinery
import json
import os
import sys

counts = {"requests": 0, "hits": 0}
_REQUESTS = "/jax/compilation_cache/compile_requests_use_cache"
_HITS = "/jax/compilation_cache/cache_hits"


def _listener(event: str, **kwargs) -> None:
    if event == _REQUESTS:
        counts["requests"] += 1
    elif event == _HITS:
        counts["hits"] += 1


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
            module.register_event_listener(_listener)

        spec.loader.exec_module = exec_module
        return spec


def _write() -> None:
    out = os.environ.get("E2_TEST_CACHE_STATS")
    if out and counts["requests"]:
        with open(out, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "argv": " ".join(sys.argv)[:200], **counts}) + "\n")


def install(write_at_exit: bool = True) -> None:
    if "jax._src.monitoring" in sys.modules:
        sys.modules["jax._src.monitoring"].register_event_listener(_listener)
    else:
        sys.meta_path.insert(0, _AfterMonitoring())
    if write_at_exit:
        atexit.register(_write)
