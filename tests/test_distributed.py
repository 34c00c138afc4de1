"""`distributed.plan`: how a process joins the others, from the whole environment a real job
gives it. The Slurm environments are those `srun` sets in a task of a batch job (Slurm 23.x's
output variables, as `srun env` prints them on a GPU cluster, with site-specific paths kept);
the TPU ones those of a Cloud TPU VM's ssh session and of a GKE TPU pod."""

import os
import subprocess
import sys

import pytest

from e2_jax import distributed

BASE = {  # what any login shell has
    "HOME": "/home/ada", "USER": "ada", "LOGNAME": "ada", "SHELL": "/bin/bash", "LANG": "C.UTF-8",
    "PATH": "/home/ada/venv/bin:/usr/local/bin:/usr/bin:/bin", "PWD": "/home/ada/e2_jax", "TERM": "xterm-256color",
}


def slurm_task(*, nodes: int, tasks_per_node: int, node: int, local: int, job: int = 4711,
               cuda_visible: str | None = None, gpus_on_node: int = 8) -> dict:
    """The environment of one srun task of `sbatch --nodes=N --ntasks-per-node=T --gpus-per-node=8`."""
    tasks = nodes * tasks_per_node
    nodelist = f"gpu[017-{16 + nodes:03d}]" if nodes > 1 else "gpu017"
    gpus = ",".join(map(str, range(gpus_on_node)))
    env = BASE | {
        "SLURM_CLUSTER_NAME": "hpc", "SLURM_CONF": "/etc/slurm/slurm.conf", "SLURM_CPUS_ON_NODE": "96",
        "SLURM_CPUS_PER_TASK": str(96 // tasks_per_node), "SLURM_DISTRIBUTION": "cyclic",
        "SLURM_GPUS_ON_NODE": str(gpus_on_node), "SLURM_GTIDS": ",".join(
            str(node * tasks_per_node + i) for i in range(tasks_per_node)),
        "SLURM_JOBID": str(job), "SLURM_JOB_ID": str(job), "SLURM_JOB_ACCOUNT": "vision", "SLURM_JOB_CPUS_PER_NODE":
            f"96(x{nodes})", "SLURM_JOB_GID": "1000", "SLURM_JOB_GPUS": gpus, "SLURM_JOB_NAME": "e2_jax",
        "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_JOB_PARTITION": "gpu",
        "SLURM_JOB_QOS": "normal", "SLURM_JOB_UID": "1000", "SLURM_JOB_USER": "ada", "SLURM_LAUNCH_NODE_IPADDR":
            "10.1.0.17", "SLURM_LOCALID": str(local), "SLURM_MEM_PER_NODE": "1024000", "SLURM_NNODES": str(nodes),
        "SLURM_NODEID": str(node), "SLURM_NODELIST": nodelist, "SLURM_NPROCS": str(tasks), "SLURM_NTASKS": str(tasks),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node), "SLURM_PRIO_PROCESS": "0",
        "SLURM_PROCID": str(node * tasks_per_node + local), "SLURM_SRUN_COMM_HOST": "10.1.0.17",
        "SLURM_SRUN_COMM_PORT": "40123", "SLURM_STEPID": "0", "SLURM_STEP_GPUS": gpus, "SLURM_STEP_ID": "0",
        "SLURM_STEP_LAUNCHER_PORT": "40123", "SLURM_STEP_NODELIST": nodelist, "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_STEP_NUM_TASKS": str(tasks), "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})",
        "SLURM_SUBMIT_DIR": "/home/ada/e2_jax", "SLURM_SUBMIT_HOST": "login1", "SLURM_TASKS_PER_NODE":
            f"{tasks_per_node}(x{nodes})", "SLURM_TASK_PID": "81234", "SLURM_TOPOLOGY_ADDR": f"gpu{17 + node:03d}",
        "SLURM_TOPOLOGY_ADDR_PATTERN": "node", "SLURM_UMASK": "0022", "SLURM_WORKING_CLUSTER":
            "hpc:slurmctld:6817:9984:109", "SLURMD_NODENAME": f"gpu{17 + node:03d}", "GPU_DEVICE_ORDINAL": gpus,
    }
    env["CUDA_VISIBLE_DEVICES"] = gpus if cuda_visible is None else cuda_visible
    return env


def test_one_process_with_nothing_set():
    assert distributed.plan(BASE, tpu_device_files=()).arguments is None
    assert distributed.plan(BASE, "off", tpu_device_files=()).arguments is None


def test_slurm_one_process_per_node_drives_all_its_gpus():
    env = slurm_task(nodes=4, tasks_per_node=1, node=2, local=0, job=91234)
    p = distributed.plan(env, tpu_device_files=())
    assert p.how == "slurm"
    assert p.arguments == dict(coordinator_address=f"gpu017:{61440 + 91234 % 4096}", num_processes=4, process_id=2,
                               local_device_ids=None, cluster_detection_method="deactivate")


def test_slurm_one_process_per_gpu_with_all_gpus_visible():
    # --ntasks-per-node=8 --gpus-per-node=8: every task sees the node's 8 GPUs; task k takes GPU k.
    env = slurm_task(nodes=2, tasks_per_node=8, node=1, local=3)
    p = distributed.plan(env, tpu_device_files=())
    assert p.arguments["process_id"] == 11 and p.arguments["num_processes"] == 16
    assert p.arguments["local_device_ids"] == [3]
    assert p.arguments["coordinator_address"].startswith("gpu017:")


def test_slurm_one_process_per_gpu_each_seeing_its_own():
    # --gpus-per-task=1 (Slurm binds one GPU to each task): CUDA_VISIBLE_DEVICES=3
    # leaves one GPU, device 0 of this process. JAX's own Slurm detection would ask for [3].
    env = slurm_task(nodes=2, tasks_per_node=8, node=1, local=3, cuda_visible="3")
    assert distributed.plan(env, tpu_device_files=()).arguments["local_device_ids"] is None


def test_slurm_two_tasks_per_node_share_the_gpus():
    env = slurm_task(nodes=2, tasks_per_node=2, node=0, local=1)
    assert distributed.plan(env, tpu_device_files=()).arguments["local_device_ids"] == [4, 5, 6, 7]
    with pytest.raises(distributed.StartupError, match="cannot be shared out evenly"):
        distributed.plan(slurm_task(nodes=1, tasks_per_node=3, node=0, local=0), tpu_device_files=())


def test_slurm_port_is_per_job_and_overridable():
    a = distributed.plan(slurm_task(nodes=2, tasks_per_node=1, node=0, local=0, job=100), tpu_device_files=())
    b = distributed.plan(slurm_task(nodes=2, tasks_per_node=1, node=0, local=0, job=101), tpu_device_files=())
    assert a.arguments["coordinator_address"] != b.arguments["coordinator_address"]
    env = slurm_task(nodes=2, tasks_per_node=1, node=0, local=0) | {"JAX_COORDINATOR_PORT": "23456"}
    assert distributed.plan(env, tpu_device_files=()).arguments["coordinator_address"] == "gpu017:23456"


def test_slurm_batch_shell_without_srun_is_named():
    env = {k: v for k, v in slurm_task(nodes=2, tasks_per_node=1, node=0, local=0).items()
           if not k.startswith(("SLURM_STEP", "SLURM_PROCID", "SLURM_LOCALID"))}
    with pytest.raises(distributed.StartupError, match="not started by srun"):
        distributed.plan(env, tpu_device_files=())


def test_slurm_single_task_step_is_one_process():
    env = slurm_task(nodes=1, tasks_per_node=1, node=0, local=0)
    assert distributed.plan(env, tpu_device_files=()).arguments is None


def test_hostlists():
    assert distributed._hostnames("gpu[001-003,007],login2") == ["gpu001", "gpu002", "gpu003", "gpu007", "login2"]
    assert distributed._hostnames("node7") == ["node7"]
    assert distributed._hostnames("a[9-11]-ib,b1") == ["a9-ib", "a10-ib", "a11-ib", "b1"]
    assert distributed._hostnames("rack[1-2]-node[01-02,04],x") == [
        "rack1-node01", "rack1-node02", "rack1-node04", "rack2-node01", "rack2-node02", "rack2-node04", "x"]


def test_plain_multinode_environment():
    # launch/gpu_multinode.sh on node 1 of 2, one process per node.
    env = BASE | {"JAX_COORDINATOR_ADDRESS": "node0:29500", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
                  "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    p = distributed.plan(env, tpu_device_files=())
    assert p.how == "env" and p.arguments == dict(
        coordinator_address="node0:29500", num_processes=2, process_id=1, local_device_ids=None,
        cluster_detection_method="deactivate")
    # The explicit variables win over a Slurm allocation around them.
    inside = slurm_task(nodes=2, tasks_per_node=8, node=0, local=5) | env
    assert distributed.plan(inside, tpu_device_files=()).arguments["local_device_ids"] is None
    with pytest.raises(distributed.StartupError, match="JAX_PROCESS_ID"):
        distributed.plan(BASE | {"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "a:1"}, tpu_device_files=())


def test_tpu_vm_asks_the_tpu_runtime(tmp_path):
    # A TPU VM's ssh session: nothing in the environment; the chips are /dev/accel*.
    accel = tmp_path / "accel0"
    accel.touch()
    env = BASE | {"SSH_CONNECTION": "35.1.2.3 51234 10.128.0.5 22", "SSH_CLIENT": "35.1.2.3 51234 22",
                  "XDG_SESSION_ID": "3", "HOSTNAME": "t1v-n-0a1b2c3d-w-0"}
    p = distributed.plan(env, tpu_device_files=(str(accel),))
    assert p.how == "tpu" and p.arguments == {}
    gke = BASE | {"TPU_WORKER_ID": "1", "TPU_WORKER_HOSTNAMES": "e2-0.e2,e2-1.e2", "TPU_ACCELERATOR_TYPE": "v5p-16",
                  "TPU_TOPOLOGY": "2x2x2", "TPU_SKIP_MDS_QUERY": "true", "TPU_HOST_BOUNDS": "1,1,2"}
    assert distributed.plan(gke, tpu_device_files=()).how == "tpu"


def test_single_host_tools_refuse_to_run_as_one_of_several_processes(tmp_path):
    """Started by a multi-host launcher, a one-process tool says so instead of every process
    doing the whole job (and writing the same files)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
    env = clean | {"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    result = subprocess.run([sys.executable, "-m", "e2_jax.search", "index", "--images", str(tmp_path), "--out",
                             str(tmp_path / "index")], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: python -m e2_jax.search runs as one process on one host")
    assert "Traceback" not in result.stderr and not (tmp_path / "index").exists()
    # The batch shell of a many-task Slurm job is one process: the tool runs there.
    batch_shell = {k: v for k, v in slurm_task(nodes=2, tasks_per_node=1, node=0, local=0).items()
                   if not k.startswith(("SLURM_STEP", "SLURM_PROCID", "SLURM_LOCALID"))}
    result = subprocess.run([sys.executable, "-c", "from e2_jax import distributed; "
                             "distributed.single_host_only('x'); print('ran')"], env=clean | batch_shell,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ran", result.stderr
