"""Input rows on real TPU pod topologies, mocked as JAX's own mesh tests do: devices carry the
kind, torus coordinates and host (process) of real slices, so `jax.make_mesh` orders them as it
would on the hardware (along the torus: a host's chips end up far apart in the mesh).

For each slice and mesh the trainer uses, every process must read exactly the rows its devices
hold (by JAX's own `devices_indices_map`), the processes together must read each row once, and
laying each process's rows out as `jax.make_array_from_process_local_data` does (its shards in
increasing order) must give the global batch. The real assembly across processes, with a mesh
that interleaves them, runs in tests/test_train_processes.py."""

import dataclasses

import numpy as np
import pytest

from e2_jax import sharding
from e2_jax.data import pipeline


@dataclasses.dataclass(frozen=True)
class MockTpu:
    """What `jax.make_mesh` reads of a TPU device."""

    id: int
    process_index: int
    coords: tuple[int, int, int]
    core_on_chip: int
    device_kind: str
    platform: str = "tpu"
    slice_index: int = 0


def mock_slice(kind: str, topology: tuple[int, int, int], host: tuple[int, int, int] = (2, 2, 1)) -> list[MockTpu]:
    """A slice's devices in `jax.devices()` order (host by host, each host's chips x fastest):
    one device per chip (megacore on v4 and v5p), `host` chips per host (2x2x1 on v4, v5p,
    v5e and v6e hosts of multi-host slices)."""
    hosts = tuple(t // h for t, h in zip(topology, host, strict=True))
    devices = []
    for hz in range(hosts[2]):
        for hy in range(hosts[1]):
            for hx in range(hosts[0]):
                process = hx + hosts[0] * (hy + hosts[1] * hz)
                for z in range(host[2]):
                    for y in range(host[1]):
                        for x in range(host[0]):
                            coords = (hx * host[0] + x, hy * host[1] + y, hz * host[2] + z)
                            devices.append(MockTpu(len(devices), process, coords, 0, kind))
    return devices


SLICES = {
    "v4-32": ("TPU v4", (2, 2, 4)),
    "v4-64": ("TPU v4", (2, 4, 4)),
    "v4-128": ("TPU v4", (4, 4, 4)),
    "v5p-32": ("TPU v5", (2, 2, 4)),  # what libtpu calls a v5p chip
    "v5e-16": ("TPU v5 lite", (4, 4, 1)),
    "v5e-32": ("TPU v5 lite", (4, 8, 1)),
    "v6e-16": ("TPU v6 lite", (4, 4, 1)),
}
MESHES = {
    "default": (("data", -1), ("fsdp", 1)),  # the configs' default
    "fsdp": (("data", -1), ("fsdp", 4)),
    "fsdp_only": (("fsdp", -1),),
    "with_model": (("data", -1), ("fsdp", 2), ("model", 2)),  # the batch replicated over `model`
}


def check_rows(devices, mesh_axes, name: str) -> None:
    """Every process of the slice `devices` reads exactly the rows its devices hold, each row
    once per replica, and the rows laid out as JAX assembles them give the global batch."""
    processes = sorted({d.process_index for d in devices})
    mesh = sharding.make_mesh(mesh_axes, devices)
    batch_sharding = sharding.batch_sharding(mesh)
    global_batch = 4 * sharding.num_batch_shards(mesh)
    index_map = batch_sharding.devices_indices_map((global_batch,))
    if dict(mesh_axes) == dict(MESHES["default"]) and len(processes) > 1 and devices[0].platform == "tpu":
        # The trap this guards against: hosts interleaved along the batch (a TPU torus does it).
        owners = [d.process_index for d in mesh.devices.flat]
        assert owners != sorted(owners), f"{name}: the mesh keeps hosts together; the mock is too kind"

    # The global batch of a training step, as the example indices of its rows.
    step, seed, n = 7, 3, 1000
    want, _ = pipeline.train_indices(n, global_batch, step, range(global_batch), seed)
    assembled = np.full(global_batch, -1)
    read_by = np.zeros(global_batch, int)
    for process in processes:
        rows = pipeline.process_rows(batch_sharding, global_batch, process)
        held = sorted({r for d, index in index_map.items() if d.process_index == process
                       for r in range(global_batch)[index[0]]})
        assert rows.tolist() == held
        read_by[rows] += 1
        local, _ = pipeline.train_indices(n, global_batch, step, rows, seed)  # what this process reads
        # make_array_from_process_local_data: each device's shard is the slice of the local data
        # at the rank of its start among the process's shard starts.
        starts = sorted({index[0].start or 0 for d, index in index_map.items() if d.process_index == process})
        for device, index in index_map.items():
            if device.process_index != process:
                continue
            shard = range(global_batch)[index[0]]
            at = starts.index(shard.start) * len(shard)
            piece = local[at: at + len(shard)]
            assert np.all((assembled[shard.start: shard.stop] == -1) | (assembled[shard.start: shard.stop] == piece))
            assembled[shard.start: shard.stop] = piece
    replicas = len(processes) // len({tuple(pipeline.process_rows(batch_sharding, global_batch, p))
                                      for p in processes})
    np.testing.assert_array_equal(read_by, replicas)  # each row read once (or once per replica group)
    np.testing.assert_array_equal(assembled, want)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("slice_name", sorted(SLICES))
def test_every_process_reads_the_rows_its_devices_hold(slice_name, mesh_name):
    kind, topology = SLICES[slice_name]
    check_rows(mock_slice(kind, topology), MESHES[mesh_name], slice_name)


# libtpu's own descriptions of real slices (jax.experimental.topologies): the devices JAX sees
# on the hardware, with their ids, torus coordinates and hosts. libtpu is installed with the
# test requirements (`pip install -e .[tpu]` elsewhere).
REAL_SLICES = ("v4-32", "v5e-16", "v5e-256", "v5p-32", "v6e-16", "v6e-256")


@pytest.fixture(scope="module")
def described():
    pytest.importorskip("libtpu")
    from e2_jax import compile_check

    return lambda name, slices=1: compile_check.topology_devices(compile_check.parse_slice(name), slices)


@pytest.mark.parametrize("mesh_name", ["default", "fsdp", "with_model"])
@pytest.mark.parametrize("slice_name", REAL_SLICES)
def test_every_process_reads_the_rows_its_devices_hold_on_libtpus_slices(described, slice_name, mesh_name):
    check_rows(described(slice_name), MESHES[mesh_name], slice_name)


@pytest.mark.parametrize("mesh_name", ["default", "fsdp"])
@pytest.mark.parametrize(("slice_name", "slices"), [("v5e-16", 2), ("v6e-64", 4)])
def test_several_slices_run_the_data_axis_across_them(described, slice_name, slices, mesh_name):
    """Multi-slice: `data` spans the slices (config.mesh_dcn's default), each slice a block of it
    laid out along its own torus; the rows are right as on one slice."""
    devices = described(slice_name, slices)
    assert sorted({d.slice_index for d in devices}) == list(range(slices))
    check_rows(devices, MESHES[mesh_name], f"{slices} x {slice_name}")
    mesh = sharding.make_mesh(MESHES[mesh_name], devices)
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    block = mesh.shape["data"] // slices
    for s in range(slices):
        assert (slice_of[s * block:(s + 1) * block] == s).all(), slice_of


def test_a_dcn_axis_the_mesh_lacks_is_a_config_error(described):
    devices = described("v5e-16", 2)
    with pytest.raises(sharding.ConfigError, match=r"mesh_dcn names \['model'\]"):
        sharding.make_mesh(MESHES["default"], devices, (("model", -1),))
    with pytest.raises(sharding.ConfigError, match="multiple of its slices"):
        sharding.make_mesh((("data", 1), ("fsdp", -1)), devices)


@pytest.mark.parametrize("slice_name", sorted(set(SLICES) & set(REAL_SLICES)))
def test_the_mocks_are_libtpus_slices(described, slice_name):
    """The hand-made slices above place chips on hosts as libtpu does (their ids may differ)."""
    kind, topology = SLICES[slice_name]
    place = lambda devices: sorted((tuple(d.coords), d.process_index, d.device_kind) for d in devices)
    assert place(described(slice_name)) == place(mock_slice(kind, topology))


def test_rows_that_are_one_block_on_gpu_hosts():
    """GPU hosts (devices numbered host by host) keep one block of rows each, as before."""

    @dataclasses.dataclass(frozen=True)
    class MockGpu:
        id: int
        process_index: int
        device_kind: str = "NVIDIA H100 80GB HBM3"
        platform: str = "gpu"

    devices = [MockGpu(i, i // 8) for i in range(32)]
    mesh = sharding.make_mesh(MESHES["fsdp"], devices)
    batch_sharding = sharding.batch_sharding(mesh)
    for process in range(4):
        rows = pipeline.process_rows(batch_sharding, 64, process)
        assert rows.tolist() == list(range(16 * process, 16 * (process + 1)))


def test_a_v4_slice_without_megacore_is_a_config_error():
    """Two devices per v4 chip (a slice seen without megacore): JAX's mesh check fails with a
    bare AssertionError; make_mesh names the devices and the way out."""
    chips = mock_slice("TPU v4", (2, 2, 4))
    devices = [dataclasses.replace(d, id=2 * d.id + core, core_on_chip=core) for d in chips for core in (0, 1)]
    with pytest.raises(sharding.ConfigError, match=r"32 TPU v4 devices.*megacore"):
        sharding.make_mesh(MESHES["default"], devices)
