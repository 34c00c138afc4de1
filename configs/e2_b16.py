"""Our main config: the paper's recipe on ViT-B/16 (E2_METHOD.md section 4).

    python -m e2_jax.main --config configs/e2_b16.py --workdir workdirs/e2_b16
    --config configs/e2_b16.py:dataset=amazon_fashion            AmazonFashion (brand as the region entity)
    --config configs/e2_b16.py:ablation=no_fusion                the paper's ablations (see e2_jax/config.py)
    --config configs/e2_b16.py:runlocal                          a CPU smoke run of the same code

Needs converted OpenAI weights in models/clip_b16 (`python -m e2_jax.convert to-flax
ViT-B-16.pt models/clip_b16 --trust-pickle`, see docs/convert.md) and the dataset built
(`python -m e2_jax.data.build fashion_gen --manual-dir ...`, see docs/data.md).
"""

from e2_jax import config as recipes


def get_config(arg=None):
    return recipes.fashion_recipe("ViT-B-16", "e2", arg)
