"""The embedded default: E² trained from scratch on SynthFashion/small, on a CPU, in minutes.

    python -m e2_jax.main --config configs/e2_synth.py --workdir /tmp/e2_synth

No download: the dataset is built on first use (about 10 s). The model is a small CLIP
(random weights: there is nothing to convert offline) at 64 px, trained in one stage on
everything; it then reports full-candidate retrieval on SynthFashion's validation products.
`configs/e2_synth.py:method=clip_ft` trains the CLIP-FT baseline the same way.
"""

from e2_jax import config as recipes


def get_config(arg=None):
    options = recipes.parse_arg(arg, method="e2", runlocal=False)
    if options.method not in ("e2", "clip_ft"):
        raise ValueError(f"method must be e2 or clip_ft, got {options.method!r}")
    c = recipes.base()
    c.model.preset, c.model.pretrained = "tiny", ""
    # A small CLIP: 64 px in 8 px patches (the details are 5-9 px), texts of at most 48 tokens
    # (SynthFashion's global texts are about 40).
    c.model.overrides = {"image_size": 64, "patch_size": 8, "vision_width": 96, "vision_heads": 2, "vision_layers": 4,
                         "text_width": 96, "text_heads": 2, "text_layers": 4, "embed_dim": 96, "context_length": 48}
    c.data.dataset, c.data.build_if_missing = "synth_fashion/small", True
    # SynthFashion's tags are short: the authors' five entities at shorter tag lengths.
    c.e2.groups = recipes.with_tag_lengths(recipes.AUTHORS_GROUPS, subcategory=8, brand=8, description=32, season=8,
                                           composition=16)
    c.e2.enabled = options.method == "e2"
    c.stages = ("train",)
    with c.unlocked():
        c.train = recipes.stage(epochs=25, lr=1e-3, trainable="all")  # 400 steps
    c.optim.name, c.optim.weight_decay, c.optim.warmup_steps = "adamw", 0.05, 50
    c.batch_size = 64
    c.eval.every_steps, c.eval.batch_size = 100, 256
    c.checkpoint.every_steps = 100
    if options.runlocal:
        recipes.runlocal(c)
    return c
