"""e2_jax: E² (Easy Regional Contrastive Learning of Expressive Fashion Representations) in JAX."""

import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

__version__ = "0.1.0"

_GOOGLE_PCI_VENDOR = "0x1ae0"  # what a TPU chip's /sys/bus/pci/devices/*/vendor reads


def _tpu_on_this_machine() -> bool:
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def _gpu_on_this_machine() -> bool:
    """An NVIDIA GPU's device files (a driver and a GPU; containers get them when given a GPU),
    or AMD's kernel driver."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")


def _gpu_plugin_installed() -> bool:
    """Whether JAX would find a PJRT plugin (jax-cuda*-plugin, ROCm): its entry points or its
    `jax_plugins` namespace package, as JAX discovers them."""
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    spec = importlib.util.find_spec("jax_plugins")
    return spec is not None and any(pkgutil.iter_modules(spec.submodule_search_locations or []))


def _skip_absent_accelerators() -> None:
    """libtpu or JAX's CUDA plugin installed on a machine with neither a TPU nor a GPU (the
    `[tpu]` extra, or the test requirements, which let `e2_jax.compile_check` compile for TPU
    slices and GPUs on a CPU): JAX would try to start those backends in every process, which
    fails after most of a second and prints their start-up warnings. There, and only there (no
    TPU chip on the PCI bus, no GPU device, JAX_PLATFORMS unset), JAX is told to use the CPU,
    where it would end up anyway. Describing and compiling for a TPU slice or a GPU
    (jax.experimental.topologies) needs no backend of theirs."""
    if "JAX_PLATFORMS" in os.environ:
        return
    if importlib.util.find_spec("libtpu") is None and not _gpu_plugin_installed():
        return
    if _tpu_on_this_machine() or _gpu_on_this_machine():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"  # and the processes this one starts
    if "jax" in sys.modules:  # imported before e2_jax: its config read the environment already
        sys.modules["jax"].config.update("jax_platforms", "cpu")


_skip_absent_accelerators()
