"""TensorFlow for the input pipeline only: import it from here (`from e2_jax.data.tensorflow_cpu
import tf`) and it sees no GPU or TPU. A GPU build of TensorFlow, if one is installed, would
otherwise take most of every GPU's memory at its first operation, and on a TPU VM try to open
the chips JAX holds. Hiding them works only before TensorFlow has initialised its devices, so
every module of e2_jax that uses TensorFlow reads it through `tf` or `load()` here, and every
TFDS builder e2_jax makes is made after `load()` (TFDS imports TensorFlow itself).

TensorFlow's C++ start-up writes informational lines straight to the process's stderr (oneDNN
is on, the CPU instructions it was built for, absl's "before InitializeLog" warning) whatever
TF_CPP_MIN_LOG_LEVEL says; they are dropped here, and anything else it writes while importing is
passed on. `TF_CPP_MIN_LOG_LEVEL=0` keeps them all.

TensorFlow is imported at the first use of `tf` (or `load()`), not at the import of this module,
so a command that stops before reading data (a mistake in its flags, `--help`) does not spend
the 3 s TensorFlow takes to import. The places that make TFDS builders
(`e2_jax.data.builders.builder`, `builders.catalog.for_table`) call `load()` first.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

_NOISE = re.compile(r"^(I\d{4} .*|WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
                    r"STDERR|To enable the following instructions: .*)$")


def _import_quietly():
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0" or "tensorflow" in sys.modules:
        import tensorflow

        return tensorflow
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines() if not _NOISE.match(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)
    return tensorflow


_loaded = None


def load():
    """TensorFlow, imported once, without its GPUs and TPUs."""
    global _loaded
    if _loaded is None:
        module = _import_quietly()
        try:
            module.config.set_visible_devices([], "GPU")
            module.config.set_visible_devices([], "TPU")
        except RuntimeError:  # TensorFlow ran an operation before this import: too late, leave it
            pass
        _loaded = module
    return _loaded


class _TensorFlow:
    """`tf`: TensorFlow's attributes, read through `load()`."""

    def __getattr__(self, name: str):
        return getattr(load(), name)


tf = _TensorFlow()

__all__ = ["load", "tf"]
