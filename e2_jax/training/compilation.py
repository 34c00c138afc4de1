"""XLA compilation: JAX's persistent cache on by default, and every compile's time in the log.

A run compiles a few programs (the parameter initialiser, the step, the evaluation encoders);
the persistent cache keeps them on disk, keyed by the program, the devices and the JAX
version, so a second run of the same config skips XLA (on a 2-core CPU the README demo's step
compiles in about 17-30 s cold and loads in about 2 s, plus the trace, which is not cached).
The default folder is per user: `$XDG_CACHE_HOME/e2_jax/xla` (else `~/.cache/e2_jax/xla`);
`JAX_COMPILATION_CACHE_DIR` or `--compilation_cache DIR` choose another, `--compilation_cache ''` turns it off. A cached
executable is the program XLA would build again, so results are unchanged (bitwise).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from absl import logging

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_listening = False


def default_cache_dir() -> str:
    """The per-user default: `JAX_COMPILATION_CACHE_DIR` if set, else the XDG cache folder."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "e2_jax" / "xla")


def _log_compile(event: str, duration: float, **kwargs) -> None:
    if event == _BACKEND_COMPILE and duration >= 0.1:
        logging.info("compiled %s in %.1f s", kwargs.get("fun_name", "a program"), duration)


def setup(cache_dir: str | None) -> str | None:
    """Persistent compilation cache in `cache_dir` ('' or None: off), and a log line per compile
    (`compiled jit(step) in 31.2 s`; a cache hit shows as a short one). Returns the folder used."""
    global _listening
    if not _listening:
        jax.monitoring.register_event_duration_secs_listener(_log_compile)
        _listening = True
    if not cache_dir:
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    cache_dir = os.path.expanduser(cache_dir)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Cache every program that took measurable time: the small ones (the initialiser, the
    # optimizer state) add up on a CPU.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir
