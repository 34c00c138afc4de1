"""DeCap captioning with an encoder of this project (`python -m e2_jax.captioning`).

    --config configs/decap.py:encoder=workdirs/e2                        FashionGen, DeCap's decoder
    --config configs/decap.py:pretrained=models/clip_b32                 a converted CLIP
    --config configs/decap.py:encoder=W,dataset=synth_fashion/medium     SynthFashion (smaller decoder)
    --config.temperature=0.02 --config.train.steps=20000                 any field by flag

DeCap's settings (Li et al., 2023): a 4-layer, 4-head, width-768 decoder over CLIP's BPE,
projection temperature 0.01. FashionGen's captions are the products' descriptions (the text
the paper's FashionGen captioning numbers score against).
"""

from e2_jax import config as recipes


def get_config(arg=None):
    options = recipes.parse_arg(arg, encoder="", pretrained="", dataset="fashion_gen", runlocal=False)
    c = recipes.decap()
    c.encoder, c.pretrained, c.dataset = options.encoder, options.pretrained, options.dataset
    if c.dataset.startswith("synth_fashion"):
        # SynthFashion's descriptions are short and drawn from a small vocabulary: a smaller
        # decoder and budget that fit a CPU.
        c.decoder.update(width=128, layers=3, heads=4, max_length=40, vocabulary="corpus")
        c.train.update(steps=1500, lr=1e-3, warmup_steps=100)
    if options.runlocal:
        c.decoder.update(width=64, layers=2, heads=2, max_length=40)
        c.train.update(steps=50, batch_size=16, warmup_steps=5, log_every=10)
        c.max_eval, c.beam_size = 32, 2
    return c
