"""The device mesh, and where each array of the training state lives on it.

The mesh comes from config as (axis name, size) pairs; one size may be -1, "all the devices
left". The batch is split over the data-parallel axes (`data` and `fsdp`); parameters and
optimizer state are placed by a short table of rules (big_vision style), first match wins,
each a regex searched in the leaf's path ("visual/transformer/resblocks_3/mlp/c_fc/kernel";
optimizer state leaves carry the same path after their own prefix, "1/mu/visual/...") and one of:

- "fsdp": split the leaf's largest dimension that the `fsdp` axis divides over that axis
  (ZeRO-3 / FSDP); leaves smaller than `min_size` elements, or with no such dimension, are
  replicated;
- "replicated";
- an explicit spec, one entry per dimension: "fsdp,None" or "None,model".

Everything is resolved on abstract shapes (`jax.eval_shape`), so state is created already
sharded by `jax.jit(init, out_shardings=...)`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from e2_jax.errors import ConfigError

DEFAULT_RULES = ((".*", "fsdp"),)
BATCH_AXES = ("data", "fsdp")


def mesh_shape(axes: Sequence[tuple[str, int]], num_devices: int) -> tuple[int, ...]:
    """Sizes of the mesh axes, the -1 one (if any) taking the devices left. Raises with the
    arithmetic spelled out if they do not multiply to `num_devices`."""
    names = [name for name, _ in axes]
    sizes = [int(size) for _, size in axes]
    if len(set(names)) != len(names):
        raise ConfigError(f"mesh axis names must be unique, got {names}")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes must be positive, with at most one -1, got {dict(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh {dict(axes)}: {num_devices} devices are not a multiple of {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh {dict(axes)} has {math.prod(sizes)} devices, but there are {num_devices}")
    return tuple(sizes)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None,
              dcn_axes: Sequence[tuple[str, int]] = (("data", -1),)) -> Mesh:
    """A mesh over `devices` (default: all), classic GSPMD axes. `jax.make_mesh` orders them for
    the interconnect (on TPU, along the torus; on GPU, by device id), not by process: a host's
    devices may sit anywhere in the mesh, and the input pipeline reads whatever rows of the
    batch they hold (`pipeline.process_rows`).

    Devices of several TPU slices (multi-slice: slices joined by the data-center network, DCN):
    `dcn_axes` says which axes run across slices and over how many (-1: all of them); each of
    `axes` is then that many slices times its size within a slice, and the mesh is JAX's hybrid
    mesh (each slice laid out along its torus, slices outermost)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(axes, len(devices))
    names = tuple(name for name, _ in axes)
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        return _multi_slice_mesh(names, shape, devices, slices, dcn_axes)
    try:
        return jax.make_mesh(shape, names, axis_types=auto, devices=devices)
    except NotImplementedError as error:
        # Axis sizes that are no product of the torus's own (e.g. 16 x 2 x 2 on a 4x4x4 v4-128):
        # split physical axes rather than refuse; collectives over a split axis are slower.
        logging.warning("mesh %s does not follow the device topology (%s); splitting physical axes",
                        dict(zip(names, shape, strict=True)), str(error).split(".")[0])
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, names, axis_types=auto)
    except AssertionError as error:  # JAX's own checks of the devices, e.g. two per v4 chip
        raise ConfigError(
            f"cannot lay the mesh {dict(zip(names, shape, strict=True))} over these "
            f"{len(devices)} {devices[0].device_kind} devices: {error} On v4 and v5p chips, run "
            "with one device per chip (megacore, the default of their TPU VM images; a topology "
            "description needs chip_config_name='megacore').") from None


def _multi_slice_mesh(names: tuple[str, ...], shape: tuple[int, ...], devices: list, slices: int,
                      dcn_axes: Sequence[tuple[str, int]]) -> Mesh:
    unknown = [name for name, _ in dcn_axes if name not in names]
    if unknown:
        raise ConfigError(f"mesh_dcn names {unknown}, which the mesh {dict(zip(names, shape, strict=True))} lacks")
    across = dict(zip((n for n, _ in dcn_axes), mesh_shape(dcn_axes, slices), strict=True))
    dcn = tuple(across.get(name, 1) for name in names)
    if any(size % d for size, d in zip(shape, dcn, strict=True)):
        raise ConfigError(f"the mesh {dict(zip(names, shape, strict=True))} cannot run {across} across {slices} "
                          "slices: each axis of mesh_dcn must be a multiple of its slices")
    ici = tuple(size // d for size, d in zip(shape, dcn, strict=True))
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    return Mesh(grid, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def batch_axes(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> tuple[str, ...]:
    """The data-parallel axes of `mesh` that the batch is split over (those of `axes` it has)."""
    present = tuple(a for a in axes if a in mesh.axis_names)
    if not present:
        raise ConfigError(f"none of the batch axes {tuple(axes)} is an axis of the mesh {mesh.axis_names}")
    return present


def batch_sharding(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    return NamedSharding(mesh, P(batch_axes(mesh, axes)))


def num_batch_shards(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, axes))


def path_name(path: tuple) -> str:
    """'visual/transformer/resblocks_0/attn/in_proj/kernel' from a tree path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def _spec(rule: str, shape: tuple[int, ...], mesh: Mesh, min_size: int) -> P:
    if rule == "replicated":
        return P()
    if rule == "fsdp":
        size = mesh.shape.get("fsdp", 1)
        if size == 1 or math.prod(shape) < min_size:
            return P()
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % size == 0:
                return P(*(["fsdp" if d == dim else None for d in range(len(shape))]))
        return P()
    entries = [None if e.strip() in ("None", "") else e.strip() for e in rule.split(",")]
    if len(entries) != len(shape):
        raise ConfigError(f"sharding rule {rule!r} has {len(entries)} entries for an array of shape {shape}")
    for entry, dim in zip(entries, shape, strict=True):
        if entry is not None and dim % mesh.shape[entry]:
            raise ConfigError(f"sharding rule {rule!r}: dimension {dim} is not divisible by mesh axis {entry}")
    return P(*entries)


def tree_shardings(abstract: Any, mesh: Mesh, rules: Sequence[tuple[str, str]] = DEFAULT_RULES,
                   min_size: int = 2**14) -> Any:
    """NamedShardings for every leaf of `abstract` (arrays or ShapeDtypeStructs) by `rules`."""
    compiled = [(re.compile(pattern), rule) for pattern, rule in rules]

    def place(path, leaf):
        name = path_name(path)
        for pattern, rule in compiled:
            if pattern.search(name):
                return NamedSharding(mesh, _spec(rule, tuple(leaf.shape), mesh, min_size))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(place, abstract)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """`abstract` (shapes and dtypes) carrying `shardings`: what restoring onto them takes."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def host_array(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly sharded, multi-process) array, as numpy on this host."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
