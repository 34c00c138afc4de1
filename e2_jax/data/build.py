"""Builds one of the project's TFDS datasets, in the array_record format the pipeline reads.

    python -m e2_jax.data.build synth_fashion/small                  # no download
    python -m e2_jax.data.build fashion_gen --manual-dir ~/data/fashiongen
    python -m e2_jax.data.build amazon_fashion --manual-dir ~/data/amazon_fashion
    python -m e2_jax.data.build catalog/mystore --manual-dir ~/data/mystore   # your table (docs/catalog.md)
    python -m e2_jax.data.build fashion_iq/triplets --manual-dir ~/data/fashion_iq   # and fashion_iq/images

`--data-dir` defaults to TFDS's (`$TFDS_DATA_DIR` or ~/tensorflow_datasets). Prints where the
dataset went, its split sizes and what was skipped (also kept in the dataset's metadata.json).
"""

from __future__ import annotations

import argparse

import tensorflow_datasets as tfds

from e2_jax import errors
from e2_jax.data import builders, catalog  # (importing builders registers them)
from e2_jax.data.builders.skipped import describe
from e2_jax.errors import ConfigError


def build(name: str, data_dir: str | None = None, manual_dir: str | None = None,
          table_options: catalog.TableOptions | None = None) -> tfds.core.DatasetBuilder:
    """Builds dataset `name`; a catalog (`catalog/NAME`) from the table in `manual_dir`, read
    with `table_options`."""
    base, _, variant = name.partition("/")
    if base == "catalog":
        if not variant or not manual_dir:
            raise ConfigError("a catalog is built as catalog/NAME --manual-dir DIR, DIR the folder of the product "
                              "table (docs/catalog.md)")
        builder = builders.catalog.for_table(variant, manual_dir, table_options, data_dir=data_dir,
                                             file_format="array_record")
    else:
        builder = builders.builder(name, data_dir=data_dir, file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(download_config=config)
    return builder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m e2_jax.data.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="fashion_gen[/utf8], amazon_fashion, synth_fashion[/small|/tiny], catalog/NAME, "
                        "fashion_iq/images, fashion_iq/triplets")
    parser.add_argument("--data-dir", help="where built datasets live (default: TFDS's)")
    parser.add_argument("--manual-dir", help="where the downloaded source files are (FashionGen, AmazonFashion), or "
                        "the folder of a catalog's product table")
    table = parser.add_argument_group("catalog tables (docs/catalog.md)")
    default = catalog.TableOptions()
    table.add_argument("--id-column", default=default.id_column, help="the product id's column (default: %(default)s)")
    table.add_argument("--image-column", default=default.image_column,
                       help="the images' column: a path, a list of paths, or image bytes (default: %(default)s)")
    table.add_argument("--split-column", default=default.split_column,
                       help="the split's column, if the table has it (default: %(default)s)")
    table.add_argument("--splits", default=",".join(f"{n}={f:g}" for n, f in default.fractions),
                       help="without a split column: name=fraction pairs, assigned by a hash of the id "
                       "(default: %(default)s)")
    table.add_argument("--optional", default="", help="comma-separated text fields that may be empty (any other "
                       "empty text field leaves its product out)")
    table.add_argument("--outside-images", action="store_true", help="read relative image paths that leave the "
                       "table's folder (../x.jpg); without it they are refused, and counted as missing views")
    args = parser.parse_args(argv)
    options = catalog.TableOptions(args.id_column, args.image_column, args.split_column,
                                   catalog.parse_fractions(args.splits),
                                   tuple(filter(None, (f.strip() for f in args.optional.split(",")))),
                                   args.outside_images)
    builder = build(args.name, args.data_dir, args.manual_dir, options)
    info = builder.info
    print(f"{args.name}: {builder.data_dir}")
    for split, split_info in info.splits.items():
        print(f"  {split}: {split_info.num_examples} examples")
    skipped = (info.metadata or {}).get("skipped", {})
    for split, summary in skipped.items():
        if summary["products"] or summary["views"]:
            print(f"  {split}: {describe(summary)} (product ids in {builder.data_dir}/metadata.json)")


if __name__ == "__main__":
    errors.main(main)
