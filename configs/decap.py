"""DeCap captioning with an encoder of this project (`python -m e2_jax.captioning`).

    --config configs/decap.py:encoder=workdirs/e2                        FashionGen, DeCap's decoder
    --config configs/decap.py:pretrained=models/clip_b32                 a converted CLIP
    --config configs/decap.py:encoder=W,dataset=synth_fashion/medium     SynthFashion (smaller decoder)
    --config.temperature=0.02 --config.train.steps=20000                 any field by flag

DeCap's settings (Li et al., 2023): a 4-layer, 4-head, width-768 decoder over CLIP's BPE,
projection temperature 0.01. FashionGen's captions are the products' descriptions (the text
the paper's FashionGen captioning numbers score against).
"""

import ml_collections

from e2_jax import config as recipes


def get_config(arg=None):
    options = recipes.parse_arg(arg, encoder="", pretrained="", dataset="fashion_gen", runlocal=False)
    c = ml_collections.ConfigDict()
    c.encoder = options.encoder  # a training workdir (CLIP-FT or E²)
    c.pretrained = options.pretrained  # or a converted CLIP
    c.encode_batch_size = 256
    c.dataset = options.dataset
    c.data_dir = ""
    c.train_split, c.eval_split = "train", "validation"
    c.text_field = "description"
    c.max_captions = 0  # 0: every distinct caption of the training split
    c.max_eval = 0  # 0: every evaluation product
    c.temperature = 0.01
    c.beam_size = 5
    # vocabulary "clip": an output over CLIP's whole BPE, as DeCap; "corpus": only the ids the
    # training captions use (the same captions, a far smaller output layer).
    c.decoder = ml_collections.ConfigDict({"width": 768, "layers": 4, "heads": 4, "max_length": 77,
                                           "vocabulary": "clip"})
    c.train = ml_collections.ConfigDict({"steps": 20_000, "batch_size": 64, "lr": 1e-4, "warmup_steps": 500,
                                         "weight_decay": 0.01, "noise_std": 0.0, "decap_mask": False, "seed": 0,
                                         "log_every": 100})
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
