"""Checkpoints of a training run, with Orbax, in the workdir:

    checkpoints/<step>/   the whole training state (step, parameters, optimizer state): every N
                          steps, at the end of each stage and on preemption; the latest K kept
    best/<stage>/<step>/  the parameters with the best validation SumR of each stage (one kept)

Orbax writes each checkpoint into a temporary directory and renames it into place only when it
is complete (in a bucket, where nothing renames atomically, it marks it complete with a
commit file instead), and this manager removes temporary directories left by a killed save
when it starts: a kill at any moment leaves the last complete checkpoint usable. The workdir
may be local or a bucket (storage.path). Restoring takes an
abstract target carrying the current run's shardings, so a run may resume on another number of
devices or another mesh than it was saved from.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from e2_jax import storage


def _manager(directory: epath.Path, keep: int, best_metric: str | None = None) -> ocp.CheckpointManager:
    # With a best_fn Orbax also stores each checkpoint's metrics (it does not without one).
    best_fn = (lambda metrics: metrics[best_metric]) if best_metric else None
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=True, best_fn=best_fn, best_mode="max")
    return ocp.CheckpointManager(directory, options=options)


class Checkpoints:
    def __init__(self, workdir: str | os.PathLike, keep: int = 3) -> None:
        self.workdir = storage.path(workdir)
        self._latest = _manager(self.workdir / "checkpoints", keep)
        self._best: dict[str, ocp.CheckpointManager] = {}

    # --- the training state -------------------------------------------------------------------

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def path(self, step: int) -> epath.Path:
        return self.workdir / "checkpoints" / str(step)

    def save(self, step: int, state: Any) -> None:
        """Starts saving `state` as `step` (asynchronously: training goes on while it writes)."""
        self._latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)

    def restore(self, step: int, abstract_state: Any) -> Any:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self._latest.restore(step, args=args)["state"]

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters of the state saved at `step` (its optimizer state is not read)."""
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                                   dtype=a.dtype), abstract_params)
        args = ocp.args.PyTreeRestore(item={"params": abstract_params}, restore_args={"params": restore_args},
                                      partial_restore=True)
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(self.path(step) / "state", args=args)["params"]

    # --- the best parameters of each stage ----------------------------------------------------

    def _best_manager(self, stage: str) -> ocp.CheckpointManager:
        if stage not in self._best:
            self._best[stage] = _manager(self.workdir / "best" / stage, keep=1, best_metric="sumr")
        return self._best[stage]

    def best(self, stage: str) -> tuple[int, float] | None:
        """(step, SumR) of the stage's best parameters so far, or None."""
        manager = self._best_manager(stage)
        step = manager.latest_step()
        if step is None:
            return None
        return step, float(manager.metrics(step)["sumr"])

    def save_best(self, stage: str, step: int, params: Any, sumr: float) -> bool:
        """Saves `params` as the stage's best if their SumR beats the best so far. With several
        processes, process 0 decides (on its SumR) and every process follows: the save is a
        collective, and processes that disagreed (a SumR rounded differently) would hang it."""
        best = self.best(stage)
        improved = best is None or sumr > best[1]
        if jax.process_count() > 1:
            decided = multihost_utils.broadcast_one_to_all(np.array([float(improved), sumr], np.float32))
            improved, sumr = bool(decided[0]), float(decided[1])
        if not improved:
            return False
        manager = self._best_manager(stage)
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                     metrics={"sumr": float(sumr)}, force=True)
        manager.wait_until_finished()  # rare (an evaluation that improved), and `best` reads it back
        return True

    def restore_best(self, stage: str, abstract_params: Any) -> Any | None:
        best = self.best(stage)
        if best is None:
            return None
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        return self._best_manager(stage).restore(best[0], args=args)["params"]

    def best_path(self, stage: str) -> epath.Path | None:
        best = self.best(stage)
        return None if best is None else self.workdir / "best" / stage / str(best[0])

    def wait(self) -> None:
        self._latest.wait_until_finished()
        for manager in self._best.values():
            manager.wait_until_finished()

    def close(self) -> None:
        self._latest.close()
        for manager in self._best.values():
            manager.close()


# --- a tree of arrays on its own (a model's parameters, a caption decoder's) ------------------------


def write_tree(directory: str | os.PathLike, tree: Any) -> None:
    """`tree` as one Orbax checkpoint in `directory` (local or a bucket), complete when this
    returns (Orbax's own commit: a killed write leaves no checkpoint that looks whole)."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(storage.path(directory), tree)
        checkpointer.wait_until_finished()


def read_tree(directory: str | os.PathLike, abstract: Any) -> Any:
    """A tree written by `write_tree`, restored into `abstract`'s shapes, dtypes (and shardings)."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(storage.path(directory), abstract)
