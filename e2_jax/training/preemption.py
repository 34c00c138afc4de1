"""Preemption notices: SIGTERM, SIGUSR1 or SIGUSR2 asks the run to save and exit 0.

SIGUSR1 and SIGUSR2 are the notices a Slurm job should use (`#SBATCH --signal=B:USR1@300`,
launch/gpu_slurm.sbatch): srun forwards them to its tasks unchanged, while it answers SIGTERM
by killing every task (docs/multihost.md). SIGTERM is the notice of TPU VMs, Kubernetes and
plain process managers.

One process: a notice is acted on where nothing is lost by it. In the training loop, after
the step in flight: the run saves that step and exits 0 (`train._Loop`). Where no step has run
since the last checkpoint (the start-up: imports, data checks, restoring, compiling a stage's
step; the start of each later stage; the evaluation after training), at once: the process says
so and exits 0, instead of finishing a compile of tens of seconds first. Python runs a signal
handler only between bytecodes, so a notice that lands during a compile would wait for it; the
handler's wake-up byte (`signal.set_wakeup_fd`) is read by a thread instead, which exits the
process while `nothing_to_save` says it may. Everything written in those windows is written
atomically (the workdir's config, metrics.jsonl trimmed on resume).

Several processes agree on the step to save through JAX's preemption sync point, whose notifier
listens for SIGTERM only: `jax.distributed.initialize` puts its own SIGTERM handler in place of
ours. `share_with_jax` (after that call) leaves it there and forwards SIGUSR1 and SIGUSR2 to it
as a SIGTERM to this process. `python -m e2_jax.main` installs the handlers before its imports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

NOTICES = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

_lock = threading.Lock()
_installed: tuple[int, ...] = ()  # the signals whose handlers are ours
_shared = False  # several processes: SIGTERM is JAX's notifier's, ours are forwarded to it
_requested: str | None = None  # the notice's signal name, once one came
_safe_where: str | None = None  # where the run is while stopping loses nothing, else None
_previous: dict[int, object] = {}
_pipe: tuple[int, int] | None = None


def _exit_now(where: str) -> None:
    os.write(2, f"preempted ({_requested}) during {where}: nothing new to save since the last checkpoint; "
                "exiting\n".encode())
    os._exit(0)


def _handle(signum, frame) -> None:
    global _requested
    _requested = _requested or signal.Signals(signum).name


def _watch(read_fd: int) -> None:
    global _requested
    try:
        while data := os.read(read_fd, 64):  # b"": uninstalled (the write end is closed)
            for number in data:
                if number not in _installed:
                    continue
                with _lock:
                    _requested = _requested or signal.Signals(number).name
                    if _shared:
                        if number != signal.SIGTERM:  # (ours only if JAX's preemption service is off)
                            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier
                    elif _safe_where is not None:
                        _exit_now(_safe_where)
    finally:
        os.close(read_fd)  # here, not in uninstall: the number is never read after it is reused


def install(signals: tuple[int, ...] = NOTICES) -> bool:
    """`signals` are notices from now on (see above). Returns False (and does nothing) where
    notices were installed already or this is not the main thread."""
    global _installed, _pipe, _requested
    if _installed or threading.current_thread() is not threading.main_thread():
        return False
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    for signum in signals:
        _previous[signum] = signal.signal(signum, _handle)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _pipe, _installed, _requested = (read_fd, write_fd), tuple(signals), None
    threading.Thread(target=_watch, args=(read_fd,), name="preemption", daemon=True).start()
    return True


def share_with_jax() -> None:
    """After `jax.distributed.initialize` in a run of several processes: SIGTERM stays with JAX's
    preemption notifier (never given back to ours or the default, which would kill the process);
    SIGUSR1 and SIGUSR2 become a SIGTERM to this process, and nothing exits at once (the
    processes must agree on a step). A notice that came before is forwarded now."""
    global _shared
    if not _installed:
        install((signal.SIGUSR1, signal.SIGUSR2))
    with _lock:
        _shared = True
        if _requested:
            os.kill(os.getpid(), signal.SIGTERM)


def uninstall() -> None:
    """The previous handlers back (SIGTERM stays JAX's after `share_with_jax`), no notice pending."""
    global _installed, _pipe, _requested, _shared
    if not _installed:
        return
    signal.set_wakeup_fd(-1)
    for signum in _installed:
        if not (_shared and signum == signal.SIGTERM):
            signal.signal(signum, _previous.pop(signum))
    if _pipe is not None:
        os.close(_pipe[1])  # the watcher reads the end of the pipe and closes its read end
    _pipe, _installed, _requested, _shared = None, (), None, False


def requested() -> bool:
    return _requested is not None


@contextlib.contextmanager
def nothing_to_save(where: str) -> Iterator[None]:
    """Within this block a notice exits the process at once (one process only): nothing since
    the last checkpoint would be lost. A notice that came before it exits on entry."""
    global _safe_where
    alone = bool(_installed) and not _shared
    with _lock:
        if alone and _requested:
            sys.stderr.flush()
            _exit_now(where)
        previous, _safe_where = _safe_where, where if alone else None
    try:
        yield
    finally:
        with _lock:
            _safe_where = previous
