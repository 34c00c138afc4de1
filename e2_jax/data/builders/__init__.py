"""TFDS builders of the project's datasets; importing this package registers all three.

`fashion_gen` (official h5 files), `amazon_fashion` (the authors' layout) and `synth_fashion`
(procedural, no download). Build any of them with `python -m e2_jax.data.build NAME`;
`builder(name)` is how e2_jax opens one.
"""

import tensorflow_datasets as tfds

import e2_jax.data.tensorflow_cpu  # noqa: F401  (first: TFDS starts TensorFlow, which must not see GPUs)
from e2_jax.data.builders import amazon_fashion, fashion_gen, synth_fashion
from e2_jax.errors import MissingError, suggest

__all__ = ["amazon_fashion", "builder", "fashion_gen", "synth_fashion"]


def builder(name: str, data_dir: str | None = None, **kwargs) -> tfds.core.DatasetBuilder:
    """`tfds.builder(name, ...)` with errors that say what exists: a dataset or variant that is
    not registered names e2_jax's (and the closest one), not TFDS's list of hundreds."""
    base, _, variant = name.partition("/")
    ours = {module.__name__.rsplit(".", 1)[-1] for module in (amazon_fashion, fashion_gen, synth_fashion)}
    try:
        cls = tfds.builder_cls(base)
    except tfds.core.registered.DatasetNotFoundError:
        raise MissingError(f"no dataset {base!r}{suggest(base, ours)}; e2_jax builds {', '.join(sorted(ours))} "
                           "(see docs/data.md)") from None
    variants = [config.name for config in (cls.BUILDER_CONFIGS or ())]
    if variant and variant not in variants:
        known = f"its variants are {', '.join(variants)}" if variants else "it has no variants"
        raise MissingError(f"dataset {base} has no variant {variant!r}{suggest(variant, variants)}; {known}")
    return tfds.builder(name, data_dir=data_dir, **kwargs)
