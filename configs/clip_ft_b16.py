"""The baseline on ViT-B/16: plain CLIP fine-tuning, same data and budget (E2_METHOD.md section 4).

    python -m e2_jax.main --config configs/clip_ft_b16.py --workdir workdirs/clip_ft_b16
    --config configs/clip_ft_b16.py:dataset=amazon_fashion            AmazonFashion
    --config configs/clip_ft_b16.py:runlocal                          a CPU smoke run of the same code

Needs converted OpenAI weights in models/clip_b16 (`python -m e2_jax.convert to-flax
ViT-B-16.pt models/clip_b16 --trust-pickle`, see docs/convert.md) and the dataset built
(`python -m e2_jax.data.build fashion_gen --manual-dir ...`, see docs/data.md).
"""

from e2_jax import config as recipes


def get_config(arg=None):
    return recipes.fashion_recipe("ViT-B-16", "clip_ft", arg)
