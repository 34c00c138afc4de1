"""The baseline on ViT-B/32: plain CLIP fine-tuning, same data and budget (E2_METHOD.md section 4).

    python -m e2_jax.main --config configs/clip_ft_b32.py --workdir workdirs/clip_ft_b32
    --config configs/clip_ft_b32.py:dataset=amazon_fashion            AmazonFashion
    --config configs/clip_ft_b32.py:runlocal                          a CPU smoke run of the same code

Needs converted OpenAI weights in models/clip_b32 (`python -m e2_jax.convert to-flax
ViT-B-32.pt models/clip_b32 --trust-pickle`, see docs/convert.md) and the dataset built
(`python -m e2_jax.data.build fashion_gen --manual-dir ...`, see docs/data.md).
"""

from e2_jax import config as recipes


def get_config(arg=None):
    return recipes.fashion_recipe("ViT-B-32", "clip_ft", arg)
