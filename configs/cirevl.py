"""Zero-shot composed image retrieval, CIReVL with an e2_jax encoder (`python -m e2_jax.composed_retrieval`).

    --config 'configs/cirevl.py:encoder=workdirs/e2_b32,data_dir=~/tfds,captions=fiq_blip2_val.json,recomposer=chat,url=http://127.0.0.1:8000/v1,model=Qwen/Qwen2.5-7B-Instruct'
    --config 'configs/cirevl.py:encoder=W,dataset=synth_fashion_cir,captioner=decap,decap=runs/decap_e2'   (offline)

Arguments (comma-separated; any field also by flag, `--config.recomposer.timeout=120`):
- `encoder` (a training workdir) or `pretrained` (a converted CLIP): the retrieval encoder.
- `dataset`: `fashion_iq` (built from its files, docs/data.md) or `synth_fashion_cir` (made
  from SynthFashion, no download); `data_dir`; `split` (`val`).
- `captioner`: `file` (captions by image id from `captions=`, a JSON object or JSON lines;
  CIReVL's BLIP-2 captions converted so) or `decap` (a DeCap run of `python -m
  e2_jax.captioning`, `decap=` its workdir, on the same or another encoder).
- `recomposer`: `chat` (an OpenAI-compatible endpoint: `url=`, `model=`, the key from
  `$OPENAI_API_KEY` if set), `hf` (a local Hugging Face causal LM: `hf_model=`) or `template`
  (rules, offline; not CIReVL). `prompt_file=`: CIReVL's prompt saved to a file (default: ours,
  `e2_jax/recompose_prompt.txt`).
- `max_queries`: the first N triplets of each category (0: all).
"""

import ml_collections

from e2_jax import config as recipes


def get_config(arg=None):
    o = recipes.parse_arg(arg, encoder="", pretrained="", dataset="fashion_iq", data_dir="", split="val",
                          captioner="file", captions="", decap="", recomposer="template", url="", model="",
                          hf_model="", prompt_file="", max_queries=0)
    c = ml_collections.ConfigDict()
    c.encoder, c.pretrained = o.encoder, o.pretrained
    c.dataset, c.data_dir, c.split = o.dataset, o.data_dir, o.split
    c.batch_size = 256
    c.captioner = ml_collections.ConfigDict({"kind": o.captioner, "captions": o.captions, "decap": o.decap,
                                             "beam_size": 1})
    c.recomposer = ml_collections.ConfigDict({
        "kind": o.recomposer, "url": o.url, "model": o.model, "api_key_env": "OPENAI_API_KEY",
        "hf_model": o.hf_model, "prompt_file": o.prompt_file, "strict": False, "timeout": 60.0, "retries": 3,
        "max_tokens": 128})
    # What each query's embedding is: `cirevl` the recomposed description's text embedding;
    # `image` the reference image's; `late_fusion` the sum of the reference image's and the
    # modification text's (both normalised); `instruction` the modification text's alone.
    c.methods = ("cirevl", "image", "late_fusion", "instruction")
    c.max_queries = o.max_queries
    return c
