"""Training E² (and CLIP-FT) on any mesh: the stages of a run, resumed from its workdir.

A run is a list of stages (E2_METHOD.md section 4: a warm-up that trains only E²'s new
parameters, then everything), each one jitted program (`e2_jax.training.step.build_stage`). Order of a
run (the resume order, big_vision style): the latest checkpoint in the workdir; else the
stage's start: the previous stage's best parameters (by validation SumR), or for the first
stage converted CLIP weights (`model.pretrained`) with E²'s new parameters drawn, or a random
initialisation. Batches, Gumbel noise and the learning rate are functions of the step number,
so a resumed run continues exactly as an uninterrupted one would. Metrics are read one step
late (never stalling the device); a NaN loss stops the run naming the last good checkpoint; a
preemption notice (SIGTERM, SIGUSR1 or SIGUSR2) saves and exits.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from e2_jax import optim, sharding, storage, workdir
from e2_jax.checkpoints import Checkpoints
from e2_jax.data import builders, pipeline, region_texts
from e2_jax.data.build import build
from e2_jax.evaluation import evaluate
from e2_jax.metrics import Progress, Writer, peak_flops, step_flops
from e2_jax.models.e2 import Group
from e2_jax.spec import RunSpec, Stage, resolve
from e2_jax.training import preemption, step

if TYPE_CHECKING:
    import ml_collections


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss); the message says where and what is left."""


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Ways into a run from outside: `wrap_step` changes each stage's step function before it is
    jitted; `map_batch(batch)` changes each batch (on the mesh) before the step takes it, so a
    wrapped step can read runtime values (one compiled program for any of them);
    `after_step(done, state, checkpoints)` runs on the host after each step is dispatched,
    before its checkpoint. The tests inject faults (a NaN, a kill during a save, a preemption
    notice) through them (tests/faults.py)."""

    wrap_step: Callable[[step.StepFn], step.StepFn] | None = None
    map_batch: Callable[[dict], dict] | None = None
    after_step: Callable[[int, dict, Checkpoints], None] | None = None


@dataclasses.dataclass(frozen=True)
class Data:
    train: pipeline.Source
    eval: pipeline.Source | None


def open_data(config: ml_collections.ConfigDict, spec: RunSpec, validate: bool) -> Data:
    """The training split (and the evaluation split if `validate`), checked against what the
    config reads: a text field the format or a tag names and the data lacks fails here."""
    data_dir = config.data.data_dir or None
    if config.data.build_if_missing:
        _build_if_missing(config.data.dataset, data_dir)
    train_source = pipeline.Source(config.data.dataset, config.data.train_split, data_dir)
    shards = sharding.num_batch_shards(spec.mesh)
    pipeline.local_train_batches(train_source, spec.pre, global_batch=shards, rows=range(1)).close()
    return Data(train_source, evaluate.open_source(config, spec.validation) if validate else None)


def _build_if_missing(dataset: str, data_dir: str | None) -> None:
    if not dataset.startswith("synth_fashion"):
        return  # the others need files only the user can provide: Source says how
    if jax.process_index() == 0 and not builders.builder(dataset, data_dir=data_dir).is_prepared():
        logging.info("building %s (no download)", dataset)
        build(dataset, data_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"built {dataset}")


def prepare(config: ml_collections.ConfigDict, validate: bool = True,
            directory: str | os.PathLike | None = None) -> tuple[RunSpec, Data]:
    """The run `config` describes, with its data: every error a user can make is raised here,
    before anything is compiled or written (with `directory`: also a workdir that is not
    writable, or holds a run this config does not continue)."""
    spec = resolve(config, stages=False)  # the config's errors first, then the workdir's, then the data's
    if directory is not None:
        workdir.check_start(directory, config, spec.clip, spec.e2)
    data = open_data(config, spec, validate)
    return spec.with_train_examples(len(data.train)), data


def run(config: ml_collections.ConfigDict, directory: str | os.PathLike, validate: bool = True,
        hooks: Hooks | None = None) -> dict[str, Any]:
    """Trains as `config` says, resuming from `directory` (`validate`: full-candidate
    retrieval on the evaluation split every `eval.every_steps`, keeping each stage's best).
    Returns where things are, the last validation and `complete=True` if the run had already
    finished (nothing trained)."""
    notices = _Preemption()  # first: a notice from now on ends the run with a checkpoint
    try:
        with preemption.nothing_to_save("start-up"):
            spec, data = prepare(config, validate, directory)
            workdir.write_start(directory, config, spec.clip, spec.e2)
            checkpoints = Checkpoints(storage.path(directory), config.checkpoint.keep)
        try:
            if checkpoints.latest_step() == spec.stages[-1].end:
                logging.info("training in %s is complete", directory)
                return {"workdir": str(directory), "complete": True}
            return _train(spec, data, checkpoints, notices, hooks or Hooks())
        finally:
            checkpoints.wait()
            checkpoints.close()
    finally:
        notices.close()


def _train(spec: RunSpec, data: Data, checkpoints: Checkpoints, notices: _Preemption,
           hooks: Hooks) -> dict[str, Any]:
    stages = spec.stages
    latest = checkpoints.latest_step()
    start = latest or 0
    writer, progress = Writer(checkpoints.workdir, resume_step=start), Progress(stages[-1].end, start)
    result: dict[str, Any] = {"workdir": str(checkpoints.workdir)}
    params = None
    embed = evaluate.make_embed(spec) if data.eval is not None else None  # compiled once for every stage
    try:
        for index in range(spec.stage_at(start), len(stages)):
            with preemption.nothing_to_save(f"the start of stage {stages[index].name}"):
                program = step.build_stage(spec, stages[index], wrap=hooks.wrap_step)
                if latest is not None and program.stage.start < latest:
                    state = checkpoints.restore(latest, program.abstract_state)
                    logging.info("resumed from %s (step %d, stage %s)", checkpoints.path(latest), latest,
                                 program.stage.name)
                else:
                    state = program.new_state(_stage_start_params(spec, checkpoints, index, params, latest))
            outcome = _Loop(spec, data, program, checkpoints, writer, progress, notices, hooks, embed).run(
                state, final=index == len(stages) - 1)
            result.update(outcome)
            if outcome.get("preempted"):
                return result
            params, latest = outcome.pop("params"), None
        if data.eval is not None:
            final_stage = stages[-1].name
            result["best"] = str(checkpoints.best_path(final_stage))
            best = checkpoints.best(final_stage)
            if best is not None:
                progress.write(f"best {final_stage}: step {best[0]}, SumR {best[1]:.1f} ({result['best']})")
        return result
    finally:
        progress.close()
        writer.close()


def _stage_start_params(spec: RunSpec, checkpoints: Checkpoints, index: int, params: dict | None,
                        latest: int | None) -> dict:
    """The parameters a stage starts from: the previous stage's best, else its last."""
    if index == 0:
        return step.initial_params(spec)
    previous = spec.stages[index - 1]
    best = checkpoints.restore_best(previous.name, spec.abstract_params())
    if best is not None:
        logging.info("stage %s starts from the best of %s: %s", spec.stages[index].name, previous.name,
                     checkpoints.best_path(previous.name))
        return best
    if params is not None:
        return params
    return checkpoints.restore_params(latest, spec.abstract_params())  # stopped at the stage's end


def _host_metrics(metrics: dict, groups: tuple[Group, ...]) -> dict[str, float]:
    out = {}
    for name, value in jax.device_get(metrics).items():
        if name == "loss_region":
            out.update({f"loss_region/{g.name}": float(v) for g, v in zip(groups, np.asarray(value), strict=True)})
        elif name == "loss_pick":  # [fusion blocks, groups]
            out.update({f"loss_pick/block{b + 1}/{g.name}": float(v) for b, row in enumerate(np.asarray(value))
                        for g, v in zip(groups, row, strict=True)})
        else:
            out[name] = float(value)
    return out


class _Reporter:
    """Step metrics, read one step late (never stalling the device): throughput and MFU over
    the steps since the last write, NaN/Inf detection, console, TensorBoard and JSON lines."""

    def __init__(self, spec: RunSpec, writer: Writer, progress: Progress, checkpoints: Checkpoints) -> None:
        self.spec, self.writer, self.progress, self.checkpoints = spec, writer, progress, checkpoints
        self.peak = peak_flops(jax.devices()[0], spec.config.peak_flops)
        self.pending: tuple[int, dict, float | None] | None = None
        self._flops = 0.0
        self._since, self._steps = time.perf_counter(), 0

    def push(self, step: int, metrics: dict, flops: float | None) -> None:
        """Step `step` (of `flops` per device) was dispatched: report the one before it, then keep this one."""
        self.flush()
        self.pending = (step, metrics, flops)

    def flush(self) -> None:
        if self.pending is None:
            return
        (step, metrics, flops), self.pending = self.pending, None
        values = _host_metrics(metrics, self.spec.e2.groups)  # waits for that step only
        bad = [name for name in ("loss", "grad_norm") if name in values and not math.isfinite(values[name])]
        if bad:  # every saved step was checked before its save began (_Loop.run): the latest is good
            self.checkpoints.wait()
            good = self.checkpoints.latest_step()
            where = (f"the last good checkpoint is {self.checkpoints.path(good)} (step {good}); run the same command "
                     "again to resume from it (if it diverges again, lower the stage's --config.<stage>.lr)"
                     if good is not None else "no checkpoint was saved before it")
            found = "; ".join(f"{name} is {values[name]}" for name in bad)
            raise TrainingError(f"{found} at step {step}; stopping. {where}.")
        self._steps += 1
        self._flops += flops or 0.0
        seconds = (time.perf_counter() - self._since) / self._steps
        values["examples_per_second"] = self.spec.config.batch_size / seconds
        if self._flops and self.peak:
            values["mfu"] = self._flops / self._steps / seconds / self.peak
        self.progress.update(1, loss=f"{values['loss']:.3f}", ex_s=f"{values['examples_per_second']:.1f}")
        if (step + 1) % self.spec.config.log_every_steps == 0:
            self.writer.write(step + 1, values)
            self._since, self._steps, self._flops = time.perf_counter(), 0, 0.0


class _StepVariants:
    """A stage's jitted step, compiled once per shape of its batch: the packed region texts come
    in a few shapes (e2_jax/data/region_texts.py), each a variant, compiled when first met and
    named in the log."""

    def __init__(self, step_fn, stage: Stage, progress: Progress) -> None:
        self.step_fn, self.stage, self.progress = step_fn, stage, progress
        self.variants: dict[Any, tuple[Any, float | None]] = {}

    def get(self, state: dict, batch: dict) -> tuple[Any, float | None]:
        """(compiled step, its FLOPs per device) for this batch's shapes."""
        key = (jax.tree.structure(batch), tuple(x.shape for x in jax.tree.leaves(batch)))
        if key not in self.variants:
            start = time.perf_counter()
            lowered = self.step_fn.lower(state, batch)
            compiled = lowered.compile()
            flops = step_flops(lowered, jax.device_count(), compiled)
            regions = region_texts.describe([t.shape for t in batch.get("region_tokens", ())])
            self.variants[key] = (compiled, flops)
            self.progress.write(
                f"stage {self.stage.name}: step variant {len(self.variants)} (region texts {regions}, global rows x "
                f"tokens per call) compiled in {time.perf_counter() - start:.1f} s, "
                f"{flops / 1e9 if flops else float('nan'):.1f} GFLOPs per step per device")
        return self.variants[key]


class _Loop:
    """One stage's steps: batches in, the compiled step, metrics, checkpoints, validation."""

    def __init__(self, spec: RunSpec, data: Data, program: step.StageProgram, checkpoints: Checkpoints,
                 writer: Writer, progress: Progress, notices: _Preemption, hooks: Hooks, embed) -> None:
        self.spec, self.data, self.program, self.checkpoints = spec, data, program, checkpoints
        self.writer, self.progress, self.notices, self.hooks = writer, progress, notices, hooks
        self.embed = embed  # evaluate.make_embed's jitted functions, or None: no validation
        self.eval_every = spec.config.eval.every_steps or max(1, round(spec.steps_per_epoch))

    def run(self, state: dict, final: bool) -> dict[str, Any]:
        config, stage, progress, checkpoints = self.spec.config, self.program.stage, self.progress, self.checkpoints
        first = int(jax.device_get(state["step"]))
        batches = pipeline.train_batches(self.data.train, self.spec.pre, global_batch=config.batch_size,
                                         sharding=sharding.batch_sharding(self.spec.mesh), seed=config.seed,
                                         start_step=first)
        map_batch = self.hooks.map_batch or (lambda batch: batch)
        try:
            trainable = optim.count(optim.partition(state["params"], optim.trainable_pattern(stage.trainable))[0])
            progress.write(f"stage {stage.name}: steps {stage.start}-{stage.end}, {trainable:,} trainable parameters, "
                           f"{jax.device_count()} devices, mesh {dict(self.spec.mesh.shape)}")
            steps = _StepVariants(self.program.step, stage, progress)
            with preemption.nothing_to_save(f"the start of stage {stage.name} (compiling its step)"):
                batch = map_batch(next(batches))
                compiled, flops = steps.get(state, batch)
            reporter, outcome, saved = _Reporter(self.spec, self.writer, progress, checkpoints), {}, None
            for index in range(first, stage.end):
                if index > first:
                    batch = map_batch(next(batches))  # the batch's own (explicit) transfers happen here
                    compiled, flops = steps.get(state, batch)
                # An accidental host copy into the step (an implicit transfer) fails loudly here.
                with jax.transfer_guard("disallow"):
                    state, metrics = compiled(state, batch)
                reporter.push(index, metrics, flops)
                done = index + 1
                if self.hooks.after_step is not None:
                    self.hooks.after_step(done, state, checkpoints)
                if done % config.checkpoint.every_steps == 0 or done == stage.end:
                    # The steps a checkpoint covers are checked before it is written: a saved state
                    # with a NaN would be resumed from, and stop the run again, forever. (Saving
                    # copies the state to the host, so waiting for this step here costs nothing.)
                    reporter.flush()
                    checkpoints.save(done, state)
                    saved = done
                if self.embed is not None and (done % self.eval_every == 0 or done == stage.end):
                    reporter.flush()
                    outcome["eval"] = self.validate(done, state)
                # Asked at every step by every process (a collective); after the run's last step
                # there is nothing left to save for.
                if self.notices.reached(done) and not (final and done == stage.end):
                    reporter.flush()
                    if saved != done:
                        checkpoints.save(done, state)
                    checkpoints.wait()
                    logging.info("preemption: process %d saved step %d", jax.process_index(), done)
                    progress.write(f"preempted: saved step {done} to {checkpoints.path(done)}; exiting")
                    return {**outcome, "preempted": True, "step": done}
            reporter.flush()
            checkpoints.wait()
            return {**outcome, "params": state["params"], "step": stage.end}
        finally:  # stop the input pipeline before it is dropped (pipeline.TrainBatches)
            batches.close()

    def validate(self, done: int, state: dict) -> dict[str, float]:
        metrics = evaluate.validate(self.spec, self.data.eval, state["params"], self.embed)
        self.writer.write(done, {f"eval/{k}": v for k, v in metrics.items()})
        stage = self.program.stage.name
        improved = self.checkpoints.save_best(stage, done, state["params"], metrics["sumr"])
        self.progress.write(f"step {done} ({stage}) validation: {evaluate.format_retrieval(metrics)}"
                            + (" (best so far)" if improved else ""))
        return metrics


class _Preemption:
    """Whether a preemption notice asks the run to stop after `step`. One process: a SIGTERM,
    SIGUSR1 or SIGUSR2 (e2_jax.training.preemption; where nothing would be lost it exits at once).
    Several processes agree on the step through JAX's preemption sync point (jax.distributed's
    own SIGTERM notifier, which SIGUSR1/2 are forwarded to). `reached` must be asked after every
    step, by every process, stage ends
    included: the sync point is a collective decision, and a notice that lands on a step where
    it is not asked is acted on late."""

    def __init__(self) -> None:
        self._installed = jax.process_count() == 1 and preemption.install()

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return preemption.requested()

    def close(self) -> None:
        if self._installed:
            preemption.uninstall()
