"""Faults injected into a real training run from outside the trainer (e2_jax.training.train.Hooks):

    nan_at(step)                 the loss and the parameters become NaN at that step
    kill_during_save_at(step)    SIGKILL while that step's checkpoint is being written
    sigterm_at(step)             a preemption notice (SIGTERM to this process) once it is done
    notice_at(step, signal, pid_file)   once it is done, process 0 sends `signal` to the process
                                 whose pid the file holds (a Slurm job's batch shell, as Slurm's
                                 `--signal=B:...` would), and every process waits for its notice

`python -m tests.faults --kill_during_save_at_step=5 [flags of e2_jax.main]` is the trainer's
command with the faults its flags ask for (tests/test_train_processes.py runs it); it installs
the preemption handlers first, as `python -m e2_jax.main` does.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from e2_jax.training import preemption
from e2_jax.training.train import Hooks


def nan_at(index: int) -> tuple:
    """(step wrapper, batch map): the step numbered `index` (0-based) yields a NaN loss and NaN
    parameters, as a diverging step does. The index travels in the batch, a runtime input: every
    index runs the same compiled program (one compile, then the compilation cache)."""

    def wrap(step):
        def poisoned(state, batch):
            batch = dict(batch)
            bad = state["step"] == batch.pop("fault_nan_at")
            new, metrics = step(state, batch)
            new = {**new, "params": jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new["params"])}
            return new, {**metrics, "loss": jnp.where(bad, jnp.nan, metrics["loss"])}

        return poisoned

    def add_index(batch: dict) -> dict:
        mesh = jax.tree.leaves(batch)[0].sharding.mesh
        return {**batch, "fault_nan_at": jax.device_put(np.int32(index), NamedSharding(mesh, P()))}

    return wrap, add_index


def _notice(signal_name: str, pid_file: str) -> None:
    """Process 0 signals the process in `pid_file`; every process waits until its notice came."""
    if jax.process_index() == 0:
        os.kill(int(Path(pid_file).read_text()), signal.Signals[f"SIG{signal_name}"])
    deadline = time.monotonic() + 120
    while not preemption.requested() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not preemption.requested():
        raise RuntimeError(f"no preemption notice reached process {jax.process_index()} within 120 s")


def _after(kill_during_save_at: int, sigterm_at: int, notice_at: int, notice: tuple[str, str], done: int, state,
           checkpoints) -> None:
    if done == kill_during_save_at:
        checkpoints.save(done, state)
        os.kill(os.getpid(), signal.SIGKILL)  # killed while the save is being written
    if done == sigterm_at:
        os.kill(os.getpid(), signal.SIGTERM)  # the notice lands after this step
    if done == notice_at:
        _notice(*notice)


def hooks(nan_at_step: int = -1, kill_during_save_at_step: int = -1, sigterm_at_step: int = -1,
          notice_at_step: int = -1, notice_signal: str = "USR1", notice_pid_file: str = "") -> Hooks:
    wrap, map_batch = nan_at(nan_at_step) if nan_at_step >= 0 else (None, None)
    return Hooks(wrap_step=wrap, map_batch=map_batch,
                 after_step=functools.partial(_after, kill_during_save_at_step, sigterm_at_step, notice_at_step,
                                              (notice_signal, notice_pid_file)))


if __name__ == "__main__":
    from absl import app, flags

    from e2_jax import main

    preemption.install()  # as `python -m e2_jax.main` does before its imports
    _NAN = flags.DEFINE_integer("nan_at_step", -1, "a NaN loss at this step")
    _KILL = flags.DEFINE_integer("kill_during_save_at_step", -1, "SIGKILL while this step's checkpoint is written")
    _TERM = flags.DEFINE_integer("sigterm_at_step", -1, "SIGTERM once this step is done")
    _NOTICE = flags.DEFINE_integer("notice_at_step", -1, "once this step is done, the notice below")
    _SIGNAL = flags.DEFINE_string("notice_signal", "USR1", "the notice's signal")
    _PID_FILE = flags.DEFINE_string("notice_pid_file", "", "a file holding the pid process 0 signals")
    app.run(lambda argv: main.main(argv, hooks(_NAN.value, _KILL.value, _TERM.value, _NOTICE.value, _SIGNAL.value,
                                               _PID_FILE.value)))
