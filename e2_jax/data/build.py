"""Builds one of the project's TFDS datasets, in the array_record format the pipeline reads.

    python -m e2_jax.data.build synth_fashion/small                  # no download
    python -m e2_jax.data.build fashion_gen --manual-dir ~/data/fashiongen
    python -m e2_jax.data.build amazon_fashion --manual-dir ~/data/amazon_fashion

`--data-dir` defaults to TFDS's (`$TFDS_DATA_DIR` or ~/tensorflow_datasets). Prints where the
dataset went, its split sizes and what was skipped (also kept in the dataset's metadata.json).
"""

from __future__ import annotations

import argparse

import tensorflow_datasets as tfds

from e2_jax import errors
from e2_jax.data import builders  # (importing it registers the builders)
from e2_jax.data.builders.skipped import describe


def build(name: str, data_dir: str | None = None, manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
    builder = builders.builder(name, data_dir=data_dir, file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(download_config=config)
    return builder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m e2_jax.data.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="fashion_gen[/utf8], amazon_fashion, synth_fashion[/small|/tiny]")
    parser.add_argument("--data-dir", help="where built datasets live (default: TFDS's)")
    parser.add_argument("--manual-dir", help="where the downloaded source files are (FashionGen, AmazonFashion)")
    args = parser.parse_args(argv)
    builder = build(args.name, args.data_dir, args.manual_dir)
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
