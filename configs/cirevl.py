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
  `e2_jax/evaluation/recompose_prompt.txt`).
- `max_queries`: the first N triplets of each category's caption file (0: all).
- `exact` (`true`, `false`; default: true on FashionIQ, false on SynthFashion-CIR): CIReVL's
  released behaviour where it changes the numbers, each also a field of its own: images padded
  to a 1.25 ratio before resizing (`image_pad`; 0: resize and centre-crop, as the encoders
  train), an empty caption kept in the join (`keep_empty_caption`), the prompt file byte for
  byte, CIReVL's parsing (`recomposer.exact`) and chat settings (`recomposer.max_tokens` 700,
  `recomposer.stop`, `recomposer.retries` 59). docs/composed_retrieval.md lists them.
"""

from e2_jax import config as recipes


def get_config(arg=None):
    o = recipes.parse_arg(arg, encoder="", pretrained="", dataset="fashion_iq", data_dir="", split="val",
                          captioner="file", captions="", decap="", recomposer="template", url="", model="",
                          hf_model="", prompt_file="", max_queries=0, exact="auto")
    if o.exact not in ("auto", "true", "false"):
        raise recipes.ConfigError(f"config argument exact is true, false or auto (true on fashion_iq), not {o.exact!r}")
    exact = o.dataset == "fashion_iq" if o.exact == "auto" else o.exact == "true"
    c = recipes.cirevl(exact)
    c.encoder, c.pretrained = o.encoder, o.pretrained
    c.dataset, c.data_dir, c.split = o.dataset, o.data_dir, o.split
    c.captioner.update(kind=o.captioner, captions=o.captions, decap=o.decap)
    c.recomposer.update(kind=o.recomposer, url=o.url, model=o.model, hf_model=o.hf_model, prompt_file=o.prompt_file)
    c.max_queries = o.max_queries
    return c
