"""Preemption notices (SIGTERM) in a single-process run.

A notice is acted on where nothing is lost by it. In the training loop, after the step in
flight: the run saves that step and exits 0 (`train._Loop`). Where no step has run since the
last checkpoint (the start-up: imports, data checks, restoring, compiling a stage's step; the
start of each later stage; the evaluation after training), at once: the process says so and
exits 0, instead of finishing a compile of tens of seconds first. The launch scripts requeue a
job that exits 0 after a notice; the run resumes from its workdir.

Python runs a signal handler only between bytecodes, so a notice that lands during a compile
would wait for it; the handler's wake-up byte (`signal.set_wakeup_fd`) is read by a thread
instead, which exits the process while `nothing_to_save` says it may. Everything written in
those windows is written atomically (the workdir's config, metrics.jsonl trimmed on resume).
`python -m e2_jax.main` installs this before its imports; several processes agree on a step
through JAX's preemption sync point instead (`uninstall` after `jax.distributed.initialize`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_installed = False
_requested = False
_safe_where: str | None = None  # where the run is while stopping loses nothing, else None
_previous = None
_pipe: tuple[int, int] | None = None


def _exit_now(where: str) -> None:
    os.write(2, f"preempted (SIGTERM) during {where}: nothing new to save since the last checkpoint; "
                "exiting\n".encode())
    os._exit(0)


def _handle(signum, frame) -> None:
    global _requested
    _requested = True


def _watch(read_fd: int) -> None:
    global _requested
    try:
        while data := os.read(read_fd, 64):  # b"": uninstalled (the write end is closed)
            if signal.SIGTERM in data:
                with _lock:
                    _requested = True
                    if _safe_where is not None:
                        _exit_now(_safe_where)
    finally:
        os.close(read_fd)  # here, not in uninstall: the number is never read after it is reused


def install() -> bool:
    """SIGTERM from now on is a notice (see above). Returns False (and does nothing) where it
    was installed already or this is not the main thread."""
    global _installed, _previous, _pipe, _requested
    if _installed or threading.current_thread() is not threading.main_thread():
        return False
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    _previous = signal.signal(signal.SIGTERM, _handle)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _pipe, _installed, _requested = (read_fd, write_fd), True, False
    threading.Thread(target=_watch, args=(read_fd,), name="preemption", daemon=True).start()
    return True


def uninstall() -> None:
    """The previous SIGTERM handler back (and no notice pending)."""
    global _installed, _pipe, _requested
    if not _installed:
        return
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, _previous)
    if _pipe is not None:
        os.close(_pipe[1])  # the watcher reads the end of the pipe and closes its read end
    _pipe, _installed, _requested = None, False, False


def requested() -> bool:
    return _requested


@contextlib.contextmanager
def nothing_to_save(where: str) -> Iterator[None]:
    """Within this block a notice exits the process at once (single process only): nothing
    since the last checkpoint would be lost. A notice that came before it exits on entry."""
    global _safe_where
    with _lock:
        if _installed and _requested:
            sys.stderr.flush()
            _exit_now(where)
        previous, _safe_where = _safe_where, where if _installed else None
    try:
        yield
    finally:
        with _lock:
            _safe_where = previous
