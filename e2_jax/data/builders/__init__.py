"""TFDS builders of the project's datasets; importing this package registers all six.

`fashion_gen` (official h5 files), `amazon_fashion` (the authors' layout), `synth_fashion`
(procedural, no download), `catalog` (your own product table: `catalog/NAME`, one name per
table), `fashion_iq` (composed retrieval: `fashion_iq/images`, `fashion_iq/triplets`) and
`synth_fashion_cir` (the same layout made from SynthFashion, no download).
Build any of them with `python -m e2_jax.data.build NAME`; `builder(name)` is how
e2_jax opens one.
"""

import tensorflow_datasets as tfds
from etils import epath

from e2_jax.data import tensorflow_cpu
from e2_jax.data.builders import amazon_fashion, catalog, fashion_gen, fashion_iq, synth_fashion
from e2_jax.errors import MissingError, suggest

__all__ = ["amazon_fashion", "builder", "catalog", "fashion_gen", "fashion_iq", "synth_fashion"]


def builder(name: str, data_dir: str | None = None, **kwargs) -> tfds.core.DatasetBuilder:
    """`tfds.builder(name, ...)` with errors that say what exists: a dataset or variant that is
    not registered names e2_jax's (and the closest one), not TFDS's list of hundreds."""
    base, _, variant = name.partition("/")
    modules = (amazon_fashion, catalog, fashion_gen, fashion_iq, synth_fashion)
    ours = {module.__name__.rsplit(".", 1)[-1] for module in modules} | {"synth_fashion_cir"}
    try:
        cls = tfds.builder_cls(base)
    except tfds.core.registered.DatasetNotFoundError:
        raise MissingError(f"no dataset {base!r}{suggest(base, ours)}; e2_jax builds {', '.join(sorted(ours))} "
                           "(see docs/data.md)") from None
    tensorflow_cpu.load()  # before TFDS starts TensorFlow, which must not see GPUs
    if cls is catalog.Catalog:
        return _catalog(variant, data_dir, **kwargs)
    variants = [config.name for config in (cls.BUILDER_CONFIGS or ())]
    if variant and variant not in variants:
        known = f"its variants are {', '.join(variants)}" if variants else "it has no variants"
        raise MissingError(f"dataset {base} has no variant {variant!r}{suggest(variant, variants)}; {known}")
    return tfds.builder(name, data_dir=data_dir, **kwargs)


def _catalog(name: str, data_dir: str | None, **kwargs) -> tfds.core.DatasetBuilder:
    """A built catalog, read from its files (its table is not needed once it is built)."""
    how = (f"build it with `python -m e2_jax.data.build catalog/{name or 'NAME'} --manual-dir DIR"
           + (f" --data-dir {data_dir}" if data_dir else "") + "` (docs/catalog.md)")
    if not name:
        raise MissingError(f"a catalog is named: catalog/NAME, the name it was built under; {how}")
    try:
        return tfds.builder(f"catalog/{name}", data_dir=data_dir, **kwargs)
    except (tfds.core.registered.DatasetNotFoundError, ValueError):  # not built: TFDS tries the (empty) code
        root = epath.Path(data_dir or tfds.core.constants.DATA_DIR)
        built = sorted(p.name for p in (root / "catalog").glob("*") if p.is_dir()) if (root / "catalog").exists() \
            else []
        raise MissingError(f"no catalog {name!r} built in {root}{suggest(name, built)}"
                           + (f" (built there: {', '.join(built)})" if built else "") + f"; {how}") from None
