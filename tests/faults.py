"""Faults injected into a real training run from outside the trainer (e2_jax.training.train.Hooks):

    nan_at(step)                 the loss and the parameters become NaN at that step
    kill_during_save_at(step)    SIGKILL while that step's checkpoint is being written
    sigterm_at(step)             a preemption notice (SIGTERM to this process) once it is done

`python -m tests.faults --kill_during_save_at_step=5 [flags of e2_jax.main]` is the trainer's
command with the faults its flags ask for (tests/test_train_processes.py runs it).
"""

from __future__ import annotations

import functools
import os
import signal

import jax
import jax.numpy as jnp

from e2_jax.training.train import Hooks


def nan_at(index: int):
    """A step wrapper: the step numbered `index` (0-based) yields a NaN loss and NaN parameters,
    as a diverging step does."""

    def wrap(step):
        def poisoned(state, batch):
            new, metrics = step(state, batch)
            bad = state["step"] == index
            new = {**new, "params": jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new["params"])}
            return new, {**metrics, "loss": jnp.where(bad, jnp.nan, metrics["loss"])}

        return poisoned

    return wrap


def _after(kill_during_save_at: int, sigterm_at: int, done: int, state, checkpoints) -> None:
    if done == kill_during_save_at:
        checkpoints.save(done, state)
        os.kill(os.getpid(), signal.SIGKILL)  # killed while the save is being written
    if done == sigterm_at:
        os.kill(os.getpid(), signal.SIGTERM)  # the notice lands after this step


def hooks(nan_at_step: int = -1, kill_during_save_at_step: int = -1, sigterm_at_step: int = -1) -> Hooks:
    return Hooks(wrap_step=nan_at(nan_at_step) if nan_at_step >= 0 else None,
                 after_step=functools.partial(_after, kill_during_save_at_step, sigterm_at_step))


if __name__ == "__main__":
    from absl import app, flags

    from e2_jax import main

    _NAN = flags.DEFINE_integer("nan_at_step", -1, "a NaN loss at this step")
    _KILL = flags.DEFINE_integer("kill_during_save_at_step", -1, "SIGKILL while this step's checkpoint is written")
    _TERM = flags.DEFINE_integer("sigterm_at_step", -1, "SIGTERM once this step is done")
    app.run(lambda argv: main.main(argv, hooks(_NAN.value, _KILL.value, _TERM.value)))
