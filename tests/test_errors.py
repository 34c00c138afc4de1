"""User mistakes at the command line (`python -m e2_jax.main`): each one `error:` paragraph with
its suggestion, exit 2, at most 5 lines of output, no traceback, and nothing written; a resume
with another model leaves the workdir's files byte for byte as they were."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from e2_jax import config as recipes
from e2_jax import spec, workdir
from e2_jax.errors import ConfigError
from tests.processes import xla_flags
from tests.test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]
SYNTH = "configs/e2_synth.py:runlocal"


def _start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    env = os.environ | {"XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "e2_jax.main", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _files(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_each_mistake_is_one_error_paragraph_with_its_way_out(synth_tiny, trained_tiny, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    resumed = tmp_path / "resumed"
    shutil.copytree(trained_tiny[0], resumed)
    data = f"--config.data.data_dir={synth_tiny}"
    cases = {  # name: (arguments, what the error must say)
        "unknown field": ([data, "--config.batch_sise=32"],
                          "no config field 'batch_sise' (did you mean 'batch_size'?)"),
        "wrong type": ([data, "--config.batch_size=abc"], "--config.batch_size=abc: invalid literal for int()"),
        "missing config file": (["--config", "configs/e2_synht.py"], "--config: no config file configs/e2_synht.py"),
        "config argument typo": (["--config", "configs/e2_synth.py:runlocal,methd=clip_ft"],
                                 "unknown config argument 'methd' (did you mean 'method'?)"),
        "unknown dataset": (["--config.data.dataset=fashon_gen"],
                            "no dataset 'fashon_gen' (did you mean 'fashion_gen'?)"),
        "unknown variant": (["--config.data.dataset=synth_fashion/huge"],
                            "dataset synth_fashion has no variant 'huge'; its variants are default, medium, small"),
        "bad mesh": ([data, "--config.mesh=(('data', 3),)"], "mesh {'data': 3} has 3 devices, but there are 1"),
        "unwritable workdir": ([data, "--workdir", str(afile / "run")],
                               f"cannot write to the workdir {afile / 'run'}: {afile} is not a folder"),
        "another model on resume": (
            ["--config", f"configs/workdir.py:{resumed}", "--config.model.preset=ViT-B-32",
             "--config.e2.gumbel_tau=0.5", "--workdir", str(resumed)],
            f"{resumed} holds a run started with another config (its config.json), and resuming it would change "
            "e2.gumbel_tau: 1.0 -> 0.5; model.preset: \"tiny\" -> \"ViT-B-32\"; model (model.json)"),
    }
    before = _files(resumed)
    processes = {}
    for name, (args, _) in cases.items():
        if "--config" not in args:
            args = ["--config", SYNTH, *args]
        if "--workdir" not in args:
            args = [*args, "--workdir", str(tmp_path / name.replace(" ", "_"))]
        processes[name] = _start(args)
    for name, process in processes.items():
        output = process.communicate(timeout=300)[0]
        lines = output.strip().splitlines()
        assert process.returncode == 2 and len(lines) <= 5 and "Traceback" not in output, (name, output[-3000:])
        assert lines[-1].startswith("error: ") and cases[name][1] in lines[-1], (name, output[-3000:])
        assert not (tmp_path / name.replace(" ", "_")).exists(), name  # nothing written
    assert "Run with that workdir's config (--config configs/workdir.py:" in output
    assert _files(resumed) == before


@pytest.mark.slow
def test_the_traceback_is_there_when_asked_for(synth_tiny, tmp_path):
    process = _start(["--config", SYNTH, "--config.data.dataset=fashon_gen", "--workdir", str(tmp_path / "w")],
                     env={"E2_TRACEBACK": "1"})
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 2 and "Traceback (most recent call last)" in output and "error: no dataset" in output


def test_a_resume_may_change_only_where_and_how_often(synth_tiny, trained_tiny):
    directory = trained_tiny[0]
    same = tiny_config(synth_tiny, **{"optim.grad_clip": 1.0})
    assert workdir.config_changes(directory, same) == {}
    longer = tiny_config(synth_tiny, **{"optim.grad_clip": 1.0, "finetune.steps": 9, "eval.every_steps": 2,
                                        "checkpoint.keep": 5, "mesh": (("data", 1),), "accum_steps": 2})
    assert workdir.config_changes(directory, longer) == {}
    assert workdir.config_changes(directory, tiny_config(synth_tiny, **{"finetune.lr": 1e-6, "optim.grad_clip": 1.0}
                                                         )) == {}  # after a divergence
    one_more = tiny_config(synth_tiny, **{"optim.grad_clip": 1.0}, stages=("warmup", "finetune", "polish"))
    with one_more.unlocked():
        one_more.polish = recipes.stage(steps=2, lr=1e-6)
    assert workdir.config_changes(directory, one_more) == {}  # a stage after the last
    assert "stages" in workdir.config_changes(directory, tiny_config(synth_tiny, stages=("finetune",)))
    other = tiny_config(synth_tiny, **{"optim.grad_clip": 0.5, "warmup.steps": 4})
    assert workdir.config_changes(directory, other) == {"optim.grad_clip": (1.0, 0.5), "warmup.steps": (3, 4)}
    with pytest.raises(ValueError, match=r"resuming it would change optim.grad_clip: 1.0 -> 0.5; warmup.steps: 3 -> 4"):
        workdir.check_start(directory, other, *workdir.model_configs(directory))


def test_the_decap_and_cirevl_configs_are_locked_and_checked_as_the_trainers_is(tmp_path):
    """One config mechanism: the three schemas are locked, a choice field's mistake is the same
    `error:` line from each checker, and the commands print it (and a typo'd field) as the
    trainer does, before any work."""
    configs = {name: recipes.config_module(f"configs/{name}.py").get_config(arg)
               for name, arg in (("e2_synth", None), ("decap", "encoder=w"), ("cirevl", "encoder=w,captions=c.json"))}
    for c in configs.values():
        with pytest.raises(AttributeError, match="cannot be added since the config is locked"):
            c.batch_sise = 32
    mistakes = [(spec.check, configs["e2_synth"], "data.region_texts", "packd",
                 "data.region_texts must be one of ('packed', 'per_item'), got 'packd' (did you mean 'packed'?)"),
                (spec.check_decap, configs["decap"], "decoder.vocabulary", "corpse",
                 "decoder.vocabulary must be one of ('clip', 'corpus'), got 'corpse' (did you mean 'corpus'?)"),
                (spec.check_cirevl, configs["cirevl"], "recomposer.kind", "chatt",
                 "recomposer.kind must be one of ('template', 'chat', 'hf'), got 'chatt' (did you mean 'chat'?)")]
    for check, c, field, value, message in mistakes:
        check(c)  # as the config file gives it
        bad = c.copy_and_resolve_references()
        bad[field.split(".")[0]][field.split(".")[1]] = value
        with pytest.raises(ConfigError) as raised:
            check(bad)
        assert str(raised.value) == message
    chat = configs["cirevl"].copy_and_resolve_references()
    chat.recomposer.kind = "chat"
    with pytest.raises(ConfigError, match=r"the chat recomposer needs url= and model= \(recomposer.url: the API root"):
        spec.check_cirevl(chat)
    # The command lines: a bad choice and a typo'd field, each one error line, exit 2, nothing written.
    env = os.environ | {"XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu"}
    commands = {
        "decoder.vocabulary must be one of ('clip', 'corpus'), got 'corpse'": [
            "e2_jax.captioning", "--config", "configs/decap.py:encoder=w", "--config.decoder.vocabulary=corpse"],
        "no config field 'timeuot' (did you mean 'timeout'?)": [
            "e2_jax.composed_retrieval", "--config", "configs/cirevl.py:encoder=w", "--config.recomposer.timeuot=9"]}
    out = {"e2_jax.captioning": "--workdir", "e2_jax.composed_retrieval": "--out"}
    started = {message: subprocess.Popen([sys.executable, "-m", *args, out[args[0]], str(tmp_path / "w")], cwd=ROOT,
                                         env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for message, args in commands.items()}
    for message, process in started.items():
        output = process.communicate(timeout=300)[0]
        lines = output.strip().splitlines()
        assert process.returncode == 2 and "Traceback" not in output, output[-3000:]
        assert lines[-1].startswith("error: ") and message in lines[-1], output[-3000:]
    assert not (tmp_path / "w").exists()
