"""TFDS builders of the project's datasets; importing this package registers all three.

`fashion_gen` (official h5 files), `amazon_fashion` (the authors' layout) and `synth_fashion`
(procedural, no download). Build any of them with `python -m e2_jax.data.build NAME`.
"""

import e2_jax.data.tensorflow_cpu  # noqa: F401  (first: TFDS starts TensorFlow, which must not see GPUs)
from e2_jax.data.builders import amazon_fashion, fashion_gen, synth_fashion

__all__ = ["amazon_fashion", "fashion_gen", "synth_fashion"]
