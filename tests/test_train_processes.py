"""Training through `python -m e2_jax.main` in separate processes: killed (SIGKILL, in the
middle and during a save) and resumed runs end bitwise equal to an uninterrupted one; SIGTERM
saves and exits cleanly; 8 devices, a checkpoint moved from 1 device to 8, and 2 processes over
localhost (started by the Slurm launch script) all give the 1-device losses."""

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

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
pytestmark = pytest.mark.slow


def _command(workdir: Path, data_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "e2_jax.main", "--config", "configs/e2_synth.py:runlocal", "--workdir", str(workdir),
            f"--config.data.data_dir={data_dir}", f"--config.train.steps={STEPS}", "--config.checkpoint.every_steps=2",
            "--config.e2.groups=brand,season", "--config.data.tag_lengths=brand:8,season:8", "--mode=train", *extra]


def _env(devices: int = 1, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "E2_MULTIDEVICE")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    return env


def _run(workdir: Path, data_dir: str, *extra: str, devices: int = 1, expect: int = 0) -> str:
    result = subprocess.run(_command(workdir, data_dir, *extra), cwd=ROOT, env=_env(devices), capture_output=True,
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


def test_runs_killed_during_a_save_and_mid_run_resume_bitwise_exact(reference, synth_tiny, tmp_path):
    # 1. SIGKILL while the checkpoint of step 5 is being written.
    _run(tmp_path, synth_tiny, "--config.debug.kill_during_save_at_step=5", expect=-signal.SIGKILL)
    assert max(_complete_steps(tmp_path)) in (4, 5)  # 5 only if its write won the race against the kill
    # 2. Resume, and SIGKILL it from outside once it has saved step 8.
    process = subprocess.Popen(_command(tmp_path, synth_tiny), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while max(_complete_steps(tmp_path)) < 8 and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert max(_complete_steps(tmp_path)) < STEPS  # killed mid-run, not after it
    # 3. Resume to the end: the same parameters and optimizer state, bit for bit.
    output = _run(tmp_path, synth_tiny)
    assert "resumed from" in output
    _assert_bitwise_equal(_state(tmp_path), _state(reference))
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]  # leftovers cleaned up


def test_sigterm_saves_and_exits_cleanly(reference, synth_tiny, tmp_path):
    process = subprocess.Popen(_command(tmp_path, synth_tiny, f"--config.train.steps={STEPS * 50}"), cwd=ROOT,
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    metrics = tmp_path / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text()) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # training has begun
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    saved = [line for line in output.splitlines() if "preempted: saved step" in line]
    assert saved, output[-4000:]
    step = int(saved[0].split("saved step ")[1].split()[0])
    assert 0 < step < STEPS * 50 and step in _complete_steps(tmp_path)


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


def test_two_processes_started_by_the_slurm_script_give_the_one_process_losses(reference, synth_tiny, tmp_path):
    """launch/gpu_slurm.sbatch as Slurm would run it (its `srun` and `scontrol` stood in for by
    tests/test_launch.py's shims): 2 tasks on localhost, each given its process id by the
    script's environment, train together to the 1-process losses."""
    from tests.processes import free_port
    from tests.test_launch import slurm_env

    # One CPU device per process: with several, XLA's CPU collectives over gloo crawl on a
    # 2-core machine (about 37 s a step, measured); on GPUs and TPUs each process has several.
    port = free_port()
    env = _env(1, E2_PORT=str(port), E2_PYTHON=sys.executable, **slurm_env(tmp_path, 2))
    main_args = _command(tmp_path / "run", synth_tiny)[3:]  # what follows python -m e2_jax.main
    result = subprocess.run(["bash", str(ROOT / "launch" / "gpu_slurm.sbatch"), *main_args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert f"JAX_COORDINATOR_ADDRESS=localhost:{port} JAX_NUM_PROCESSES=2" in result.stdout
    assert "process 1 of 2" in result.stderr and "2 devices" in result.stdout + result.stderr
    want, got = _losses(reference), _losses(tmp_path / "run")
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=1e-5)
    np.testing.assert_allclose(_state(tmp_path / "run")["params"]["logit_scale"],
                               _state(reference)["params"]["logit_scale"], rtol=1e-5)  # one readable checkpoint
