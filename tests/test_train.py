"""Training end to end on one CPU device: the two-stage recipe, artefacts, stage-1 freezing,
GradCache accumulation, NaN stop, and the errors raised before anything compiles."""

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
from flax import traverse_util
from jax import monitoring

from e2_jax import config as recipes
from e2_jax import main, optim
from e2_jax.data import pipeline
from e2_jax.sharding import batch_sharding
from e2_jax.training import step, train
from tests import faults, region_equality


def tiny_config(data_dir: str, **changes):
    """Two stages of 3 steps on SynthFashion/tiny, a tiny CLIP with two E² groups."""
    c = recipes.base()
    c.model.preset, c.model.pretrained = "tiny", ""
    c.data.dataset, c.data.data_dir = "synth_fashion/tiny", data_dir
    c.e2.groups = (recipes.group("brand", tag_length=8), recipes.group("season", tag_length=8))
    c.warmup.steps, c.finetune.steps = 3, 3
    c.batch_size, c.eval.batch_size, c.log_every_steps, c.optim.warmup_steps = 16, 16, 1, 1
    c.checkpoint.every_steps = 2
    for key, value in changes.items():
        *path, last = key.split(".")
        node = c
        for part in path:
            node = node[part]
        node[last] = value
    return c


def saved_state(workdir: Path, step: int) -> dict:
    return ocp.StandardCheckpointer().restore((workdir / "checkpoints" / str(step) / "state").absolute())


def test_two_stage_run_writes_everything(synth_tiny, trained_tiny, tmp_path):
    workdir, result = trained_tiny
    assert set(result["eval"]) >= {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "sumr"}
    assert json.loads((workdir / "config.json").read_text())["stages"] == ["warmup", "finetune"]
    assert (workdir / "checkpoints" / "6").is_dir()
    assert (workdir / "best" / "warmup").is_dir() and (workdir / "best" / "finetune").is_dir()
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert [line["step"] for line in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("loss_global", "loss_region/brand", "loss_region/season", "logit_scale", "learning_rate",
                "grad_norm", "examples_per_second"):
        assert all(np.isfinite(line[key]) for line in steps), key
    assert steps[0]["learning_rate"] == 0 and steps[1]["learning_rate"] == pytest.approx(5e-4)  # warm-up of 1 step
    assert any("eval/sumr" in line for line in lines)
    # TensorBoard event files, readable without the tensorboard package.
    events = [str(p) for p in (workdir / "tensorboard").iterdir()]
    tags = {value.tag for path in events for event in tf.compat.v1.train.summary_iterator(path)
            for value in event.summary.value}
    assert {"loss", "loss_region/brand", "eval/sumr"} <= tags
    # Stage 2 started from stage 1's best parameters: every parameter trains in stage 2.
    assert result["step"] == 6
    # Evaluation mode: every protocol on the best parameters, written as JSON and Markdown; its
    # full-candidate numbers with the training's text are the validation of the best step.
    # (Into a copy: the session's trained workdir is read by tests on the other worker.)
    workdir = shutil.copytree(workdir, tmp_path / "run")
    evaluated = main.run(tiny_config(synth_tiny, **{"eval.sample_negatives": 8}), workdir, mode="evaluate")
    report = json.loads((workdir / "eval" / "report.json").read_text())
    assert report["metrics"] == evaluated["report"]["metrics"] and len(report["metrics"]) == 3 * 2 * 7
    assert re.fullmatch(r"the best finetune parameters \(step [456], validation SumR [\d.]+\) in .*",
                        report["checkpoint"])
    table = (workdir / "eval" / "report.md").read_text()
    assert table.count("| full_gallery | ") == 2 and "| sample_100 | description |" in table
    assert len(list((workdir / "eval" / "selection_maps").glob("validation_*_selection.png"))) == 16
    best = max((line for line in lines if "eval/sumr" in line and line["step"] > 3), key=lambda x: x["eval/sumr"])
    assert evaluated["eval"]["sumr"] == pytest.approx(best["eval/sumr"], abs=1e-4)


@pytest.mark.slow
def test_stage_one_leaves_every_clip_parameter_bit_identical(synth_tiny, tmp_path):
    # With bfloat16 compute and rematerialisation: parameters stay float32, frozen ones untouched.
    config = tiny_config(synth_tiny, stages=("warmup",), **{"model.compute_dtype": "bfloat16", "model.remat": True})
    spec, _ = train.prepare(config, validate=False)
    initial = traverse_util.flatten_dict(jax.device_get(step.initial_params(spec)), sep="/")
    train.run(config, tmp_path, validate=False)
    state = saved_state(tmp_path, 3)
    after = traverse_util.flatten_dict(state["params"], sep="/")
    new = optim.trainable_pattern("e2_new")
    changed = {k for k in initial if not np.array_equal(initial[k], after[k])}
    assert changed and all(new.search(k) for k in changed), sorted(changed)[:5]
    assert {k for k in initial if new.search(k)} == changed  # and every new parameter moved
    assert np.array_equal(initial["logit_scale"], after["logit_scale"])
    # No optimizer state is spent on frozen parameters.
    state_size = sum(np.size(x) for x in jax.tree.leaves(state["opt_state"]))
    new_size = sum(v.size for k, v in initial.items() if new.search(k))
    assert state_size <= 2 * new_size + 8


def _one_step(synth_tiny: str, accum: int):
    """Parameters after one SGD step of learning rate 1 (= params - gradients)."""
    spec, data = train.prepare(tiny_config(synth_tiny, stages=("finetune",), accum_steps=accum), validate=False)
    program = step.build_stage(spec, spec.stages[0], optax.sgd(1.0), optax.constant_schedule(1.0))
    state = program.new_state(step.initial_params(spec))
    batch = next(pipeline.train_batches(data.train, spec.pre, global_batch=spec.config.batch_size,
                                        sharding=batch_sharding(spec.mesh)))
    new_state, metrics = program.step(state, batch)
    return jax.device_get(new_state["params"]), jax.device_get(metrics)


@pytest.mark.slow
def test_gradient_accumulation_keeps_the_contrastive_batch_whole(synth_tiny):
    """GradCache with 4 micro-batches: the same loss and gradients as the whole batch at once
    (not the mean of 4 small-batch losses, whose negatives would be 4 times fewer)."""
    whole, whole_metrics = _one_step(synth_tiny, 1)
    micro, micro_metrics = _one_step(synth_tiny, 4)
    np.testing.assert_allclose(micro_metrics["loss"], whole_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(micro_metrics["loss_region"], whole_metrics["loss_region"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(micro), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("nan_at", [2, 3, 4])
def test_a_nan_stops_the_run_at_a_finite_checkpoint_and_the_restart_finishes(synth_tiny, tmp_path, nan_at):
    """Checkpoints every 4 steps; the step numbered `nan_at` (0-based) makes the state NaN, so
    the state saved as step 4 is poisoned when nan_at is 3 (just before the save), and not for
    2 or 4. The loss is read one step late, but a save waits for its own step's check: the run
    stops naming the newest checkpoint whose steps were all finite, and no NaN is kept."""
    config = tiny_config(synth_tiny, stages=("finetune",), **{"finetune.steps": 6, "checkpoint.every_steps": 4})
    good = 4 if nan_at == 4 else None  # done = nan_at + 1 is the first poisoned state
    where = r"the last good checkpoint is .*checkpoints/4 \(step 4\)" if good else "no checkpoint was saved before it"
    with pytest.raises(train.TrainingError, match=rf"loss is nan at step {nan_at}; stopping\. {where}"):
        train.run(config, tmp_path, validate=False, hooks=faults.hooks(nan_at_step=nan_at))
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == ([good] if good else [])
    for saved in kept:
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(saved_state(tmp_path, saved)["params"]))
    if nan_at == 2:
        return  # its restart starts afresh, as nan_at=3's does
    result = train.run(config, tmp_path, validate=False)  # the same command without the fault
    assert result["step"] == 6 and all(np.isfinite(leaf).all()
                                       for leaf in jax.tree.leaves(saved_state(tmp_path, 6)["params"]))


def test_a_preemption_notice_on_a_stage_last_step_saves_there_and_resumes_exactly(synth_tiny, trained_tiny,
                                                                                    tmp_path):
    """SIGTERM lands right after step 3, the warm-up's last: the run saves step 3 and exits
    there (it used to run on into the next stage before looking), and the resumed run ends where
    the uninterrupted one does."""
    config = tiny_config(synth_tiny, **{"optim.grad_clip": 1.0})
    first = train.run(config, tmp_path, hooks=faults.hooks(sigterm_at_step=3))
    assert first["preempted"] and first["step"] == 3
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
    resumed = train.run(tiny_config(synth_tiny, **{"optim.grad_clip": 1.0}), tmp_path)
    assert resumed["step"] == 6 and not resumed.get("preempted")
    reference, _ = trained_tiny
    want, got = saved_state(reference, 6), saved_state(tmp_path, 6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _compiles_during(fn) -> int:
    count = []
    monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: count.append(1) if name == "/jax/core/compile/backend_compile_duration" else None)
    try:
        fn()
    except Exception as error:
        return len(count), error
    return len(count), None


def test_config_errors_come_before_any_compile(synth_tiny, tmp_path):
    config = tiny_config(synth_tiny)
    with pytest.raises(AttributeError, match='Did you mean "batch_size"'):
        config.batch_sise = 32
    cases = {
        "divisible": tiny_config(synth_tiny, batch_size=16, accum_steps=3),
        "converted CLIP": tiny_config(synth_tiny, **{"model.pretrained": str(tmp_path / "no_such_model")}),
        "not defined": tiny_config(synth_tiny, stages=("warmup", "polish")),
        "no text field": tiny_config(synth_tiny, **{"data.text_format": pipeline.AMAZON_TEXT}),
        "not built": tiny_config(str(tmp_path / "empty")),
    }
    for expected, config in cases.items():
        compiles, error = _compiles_during(lambda config=config: train.prepare(config))
        assert error is not None and compiles == 0, (expected, error, compiles)
        assert expected in str(error), (expected, str(error))
    _, error = _compiles_during(lambda: train.prepare(cases["converted CLIP"]))
    assert "python -m e2_jax.convert to-flax" in str(error)


@pytest.mark.slow
def test_packed_region_texts_give_the_per_item_loss_and_gradients(synth_tiny, tmp_path):
    """The trainer's step with each distinct tag encoded once, trimmed, in two text-tower calls
    equals the step that encodes every item's tag of every group (the authors' way)."""
    c = region_equality.config(synth_tiny)
    packed = region_equality.one_step(c, "packed")
    per_item = region_equality.one_step(c, "per_item")
    region_equality.assert_equal_steps(packed, per_item)
