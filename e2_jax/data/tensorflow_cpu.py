"""TensorFlow for the input pipeline only: import it from here (`from e2_jax.data.tensorflow_cpu
import tf`) and it sees no GPU or TPU. A GPU build of TensorFlow, if one is installed, would
otherwise take most of every GPU's memory at its first operation, and on a TPU VM try to open
the chips JAX holds. Hiding them works only before TensorFlow has initialised its devices, so
every module of e2_jax that uses TensorFlow (or TFDS, which imports it) imports this first."""

from __future__ import annotations

import tensorflow as tf

try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
except RuntimeError:  # TensorFlow ran an operation before this import: too late, leave it
    pass

__all__ = ["tf"]
