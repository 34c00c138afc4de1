"""Training through `python -m e2_jax.main` in separate processes: a run killed during a save
(SIGKILL), resumed, preempted (SIGTERM: it saves and exits cleanly) and resumed again ends
bitwise equal to an uninterrupted one; a notice before anything is unsaved exits at once; 8
devices, a checkpoint moved from 1 device to 8, 2 processes over localhost (started by the Slurm
launch script, preempted and resumed) and 2 processes whose devices interleave along the batch
all give the 1-device losses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from e2_jax import config as recipes
from tests.processes import xla_flags

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
pytestmark = pytest.mark.slow


# One E² group, the season (6 distinct tags in SynthFashion/tiny): its tags fill one bucket of the
# packed region texts (e2_jax/data/region_texts.py), so each run compiles one step variant, not two
# (runs with several groups are tested in-process: tests/test_train.py, tests/region_equality.py).
GROUPS = "--config.e2.groups=" + repr((recipes.group("season", tag_length=8),))


def _command(workdir: Path, data_dir: str, *extra: str, program: str = "e2_jax.main") -> list[str]:
    """The trainer's command; `program="tests.faults"` with fault flags in `extra`."""
    return [sys.executable, "-m", program, "--config", "configs/e2_synth.py:runlocal", "--workdir", str(workdir),
            f"--config.data.data_dir={data_dir}", f"--config.train.steps={STEPS}", "--config.checkpoint.every_steps=2",
            GROUPS, "--mode=train", *extra]


def _env(devices: int = 1, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "E2_MULTIDEVICE"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), **extra)
    return env


def _run(workdir: Path, data_dir: str, *extra: str, devices: int = 1, expect: int = 0,
         program: str = "e2_jax.main") -> str:
    result = subprocess.run(_command(workdir, data_dir, *extra, program=program), cwd=ROOT, env=_env(devices),
                            capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


def _losses(workdir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def _state(workdir: Path, step: int = STEPS) -> dict:
    """A saved training state, on this process's one device whatever mesh saved it."""
    path = (workdir / "checkpoints" / str(step) / "state").absolute()
    checkpointer = ocp.StandardCheckpointer()
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                          checkpointer.metadata(path).item_metadata.tree)
    return checkpointer.restore(path, target)


def _complete_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def reference(synth_tiny, tmp_path_factory) -> Path:
    """The uninterrupted run: 12 steps on 1 device."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _run(workdir, synth_tiny)
    return workdir


def test_killed_during_a_save_and_preempted_runs_resume_bitwise_exact(reference, synth_tiny, tmp_path):
    # 1. SIGKILL while the checkpoint of step 5 is being written.
    _run(tmp_path, synth_tiny, "--kill_during_save_at_step=5", expect=-signal.SIGKILL, program="tests.faults")
    assert max(_complete_steps(tmp_path)) in (4, 5)  # 5 only if its write won the race against the kill
    # 2. Resume; a preemption notice (SIGTERM) once step 8 is done: it saves that step and exits 0.
    output = _run(tmp_path, synth_tiny, "--sigterm_at_step=8", program="tests.faults")
    assert "resumed from" in output
    saved = [line for line in output.splitlines() if "preempted: saved step" in line]
    assert saved, output[-4000:]
    step = int(saved[0].split("saved step ")[1].split()[0])
    assert step == 8 and max(_complete_steps(tmp_path)) == 8 < STEPS  # stopped mid-run, not after it
    # 3. Resume to the end: the same parameters and optimizer state, bit for bit.
    output = _run(tmp_path, synth_tiny)
    assert "resumed from" in output
    _assert_bitwise_equal(_state(tmp_path), _state(reference))
    # Each step's metrics once, although steps after the first checkpoint were run twice.
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == list(range(1, STEPS + 1))
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]  # leftovers cleaned up


def _output_until(process: subprocess.Popen, text: str, lines: list[str]) -> None:
    """Reads the process's output into `lines` until a line holds `text` (or it ends)."""
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return


@pytest.mark.parametrize("when", ["imports", "compiling"])
def test_sigterm_where_nothing_is_unsaved_exits_at_once(synth_tiny, tmp_path, when):
    """A notice during the imports, or while the first step compiles (cold: no cache), exits 0
    saying so, without waiting for the compile and without writing a checkpoint."""
    process = subprocess.Popen(_command(tmp_path, synth_tiny, "--compilation_cache="), cwd=ROOT, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    if when == "imports":
        time.sleep(1.0)
    else:
        _output_until(process, "stage train: steps 0-", lines)  # written just before the step compiles
    process.send_signal(signal.SIGTERM)
    lines += process.communicate(timeout=300)[0].splitlines(keepends=True)
    output = "".join(lines)
    where = "start-up" if when == "imports" else "the start of stage train (compiling its step)"
    assert process.returncode == 0 and f"preempted (SIGTERM) during {where}: nothing new to save" in output, output
    assert "step variant" not in output and not _complete_steps(tmp_path), output


def test_eight_devices_give_the_one_device_losses(reference, synth_tiny, tmp_path):
    _run(tmp_path, synth_tiny, "--config.mesh=(('data', 4), ('fsdp', 2))", devices=8)
    want, got = _losses(reference), _losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=1e-5)


def test_a_one_device_checkpoint_resumes_on_eight_devices(reference, synth_tiny, tmp_path):
    start = min(_complete_steps(reference))  # the oldest checkpoint kept (the latest 3 are)
    assert start < STEPS
    (tmp_path / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(reference / "checkpoints" / str(start)), str(tmp_path / "checkpoints")], check=True)
    output = _run(tmp_path, synth_tiny, "--config.mesh=(('data', 2), ('fsdp', 4))", devices=8)
    assert "resumed from" in output
    want, got = _losses(reference), _losses(tmp_path)
    assert sorted(got) == list(range(start + 1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=1e-5)


def test_two_processes_started_by_the_slurm_script_save_on_its_notice_and_give_the_one_process_losses(
        reference, synth_tiny, tmp_path):
    """launch/gpu_slurm.sbatch as Slurm would run it, with tests/slurm's stand-ins for `srun`
    (which, like srun, SIGKILLs its tasks on SIGTERM and forwards SIGUSR1 unchanged) and
    `scontrol`: 2 tasks on localhost, each working out its coordinator and process id from
    Slurm's variables (e2_jax.distributed). After step 5, the notice the script's `#SBATCH
    --signal` asks for goes to the batch shell, as Slurm sends it before the time limit; the
    script passes it to srun, srun to both tasks; JAX's preemption sync point makes them save the
    same step and exit 0; the script requeues; the same job run again resumes and ends with the
    1-process losses."""
    from tests.processes import free_port
    from tests.test_launch import sbatch_signal, slurm_env

    signum, batch_only = sbatch_signal()
    assert batch_only  # Slurm signals the batch shell, which the test stands in for
    # One CPU device per process: with several, XLA's CPU collectives over gloo crawl on a
    # 2-core machine (about 37 s a step, measured); on GPUs and TPUs each process has several.
    port = free_port()
    env = _env(1, JAX_COORDINATOR_PORT=str(port), E2_PYTHON=sys.executable, **slurm_env(tmp_path, 2))
    workdir = tmp_path / "run"
    pid_file = tmp_path / "batch_shell.pid"
    # The first job's Python: the script's `python -m e2_jax.main ARGS` becomes `python -m
    # tests.faults --notice_at_step=5 ... ARGS`: after step 5, process 0 signals the batch shell.
    notice = tmp_path / "python_with_notice"
    notice.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} -m tests.faults --notice_at_step=5 '
                      f'--notice_signal={signum.name[3:]} --notice_pid_file={pid_file} "$@"\n')
    notice.chmod(0o755)

    def job(python: str = sys.executable) -> str:
        main_args = _command(workdir, synth_tiny)[3:]  # what follows python -m e2_jax.main
        process = subprocess.Popen(["bash", str(ROOT / "launch" / "gpu_slurm.sbatch"), *main_args], cwd=ROOT,
                                   env={**env, "E2_PYTHON": python}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        pid_file.write_text(str(process.pid))
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, output[-12000:]
        return output

    log = job(str(notice))
    assert "multi-host start-up (slurm: Slurm job 4711" in log and f"coordinator_address='localhost:{port}'" in log
    assert "process 1 of 2" in log and "2 devices" in log
    assert "SIGUSR1: passing it to the tasks" in log and "requeueing job 4711" in log
    assert (tmp_path / "shim_log" / "requeued").read_text().split() == ["4711"]
    saved = [int(log.split(f"preemption: process {i} saved step ")[1].split()[0]) for i in range(2)]
    assert saved[0] == saved[1] and 5 <= saved[0] < STEPS, saved
    assert max(_complete_steps(workdir)) == saved[0]
    assert "resumed from" in job()
    want, got = _losses(reference), _losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=1e-5)
    # One readable checkpoint. (Not every parameter is compared: the attention key biases have a
    # zero gradient up to rounding, which Adam scales to full steps, so they follow the summation
    # order of each device layout.)
    np.testing.assert_allclose(_state(workdir)["params"]["logit_scale"], _state(reference)["params"]["logit_scale"],
                               rtol=1e-5)


def _two_processes(workdir: Path, data_dir: str, *extra: str, devices: int = 1,
                   program: tuple[str, ...] = ("-m", "e2_jax.main")) -> list[str]:
    """Runs the trainer as 2 local processes (JAX_* variables, as launch/gpu_multinode.sh sets
    them); both must exit 0; returns their logs."""
    from tests.processes import free_port

    port = free_port()
    args = _command(workdir, data_dir, *extra)[3:]
    processes = [subprocess.Popen([sys.executable, *program, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env=_env(devices, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                                           JAX_PROCESS_ID=str(i)))
                 for i in range(2)]
    logs = []
    try:
        logs = [p.communicate(timeout=900)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, log in zip(processes, logs, strict=True):
        assert p.returncode == 0, log[-6000:]
    return logs


def test_a_mesh_that_interleaves_processes_trains_to_the_one_process_losses(reference, synth_tiny, tmp_path):
    """2 processes x 2 devices, the mesh (data 2 x fsdp 2) ordered 0, 1, 0, 1 by process (a TPU
    pod slice's torus order does this to hosts): each process reads rows 0-3 and 8-11, or 4-7
    and 12-15, of every batch of 16, and the run gives the one-process losses. (FSDP, not plain
    data parallelism: on this CPU, with gloo and 2 devices per process, the data-parallel step's
    one gradient all-reduce of 152 arrays took 35 s, the same all-reduce alone 0.3 s, the FSDP
    step 0.9 s; not diagnosed.)"""
    steps = 3
    logs = _two_processes(tmp_path, synth_tiny, f"--config.train.steps={steps}",
                          "--config.mesh=(('data', 2), ('fsdp', 2))", devices=2,
                          program=(str(ROOT / "tests" / "multiprocess" / "interleaved_main.py"),))
    assert "process 0 reads rows 0-3, 8-11 of each global batch of 16" in logs[0]
    assert "process 1 reads rows 4-7, 12-15 of each global batch of 16" in logs[1]
    want, got = _losses(reference), _losses(tmp_path)
    assert sorted(got) == list(range(1, steps + 1))
    # The learning rate of steps 1-3 does not depend on the run's length (warm-up of 2, then the
    # cosine's start), so these are the 12-step reference's first three losses.
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=1e-5)
