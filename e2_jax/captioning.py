"""Zero-shot captioning with any encoder of this project inside DeCap (Li et al., ICLR 2023).

    python -m e2_jax.captioning --config configs/decap.py:encoder=workdirs/e2 --workdir runs/decap_e2 --mode train
    python -m e2_jax.captioning --config configs/decap.py:encoder=workdirs/e2 --workdir runs/decap_e2 --mode evaluate
    python -m e2_jax.captioning --config ... --workdir runs/decap_e2 --mode caption --images ~/catalog

DeCap's recipe, the encoder frozen throughout:
1. *train* (text only): the captions of the training split (`config.text_field`, FashionGen's
   description by default) are embedded by the encoder's text tower (L2-normalised); a small
   decoder (`models/caption_decoder.py`) learns to write each caption from its own embedding.
   The same embeddings are kept as the *memory*.
2. *caption*: an image embedding v (the encoder's global one, normalised) is projected into the
   text-embedding space as a softmax-weighted combination of the memory,
   `sum_i softmax(v . m_i / T) m_i` (T = `config.temperature`, DeCap's 0.01), normalised, and
   decoded greedily or by beam search.
3. *evaluate*: the evaluation split's images (first views) captioned both ways and scored
   against that product's text with BLEU@1-4, METEOR, ROUGE-L and CIDEr (`caption_metrics`);
   captions to `captions.jsonl`, scores to `report.json` and `report.md` in the workdir.

The encoder is a training workdir of this project (CLIP-FT or E²: `encoder=...`) or a
converted CLIP (`pretrained=...`). For E², the global image embedding is projected: the
decoder and memory live in the global text-embedding space.

This module is the command and mode `train`'s orchestration; the decoder's training is
`e2_jax.training.decap`, the captioner (projection, decoding, the decoder on disk) and modes
`evaluate` and `caption` are `e2_jax.evaluation.captioning`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from e2_jax import distributed, errors, spec, storage
from e2_jax.data import pipeline
from e2_jax.data.tokenizer import CLIPTokenizer
from e2_jax.evaluation.captioning import (
    DECODER_DIR,
    MEMORY_FILE,
    SETTINGS_FILE,
    caption_folder,
    evaluate,
    load_encoder,
    save_decoder,
)
from e2_jax.metrics import Writer
from e2_jax.models.caption_decoder import DecoderConfig
from e2_jax.training.decap import TrainSettings, corpus_vocabulary, train_decoder

MODES = ("train", "evaluate", "caption")


def training_captions(settings) -> list[str]:
    """The distinct captions of the training split, in order of first appearance."""
    texts = pipeline.Source(settings.dataset, settings.train_split, settings.data_dir or None).scan(
        [settings.text_field])[settings.text_field]
    texts = list(dict.fromkeys(str(t) for t in texts if str(t).strip()))
    if settings.max_captions:
        texts = texts[: settings.max_captions]
    if not texts:
        raise ValueError(f"no {settings.text_field!r} text in {settings.dataset}/{settings.train_split}")
    return texts


def train(settings, workdir: str | os.PathLike, log=print) -> dict:
    """Mode `train`: the memory and the decoder, written to `workdir`."""
    encoder = load_encoder(settings)
    texts = training_captions(settings)
    start = time.perf_counter()
    memory = encoder.encode_texts(texts)
    log(f"memory: {len(texts)} captions of {settings.dataset}/{settings.train_split} embedded in "
        f"{time.perf_counter() - start:.0f} s")
    tokenizer = CLIPTokenizer(settings.decoder.max_length)
    tokens = tokenizer(texts)  # longer captions are cut, their end token kept
    vocab = np.arange(tokenizer.vocab_size) if settings.decoder.vocabulary == "clip" else corpus_vocabulary(
        tokens, tokenizer)
    decoder = DecoderConfig(prefix_dim=memory.shape[1], width=settings.decoder.width, layers=settings.decoder.layers,
                            heads=settings.decoder.heads, max_length=settings.decoder.max_length,
                            vocab_size=len(vocab))
    train_settings = TrainSettings(**{f.name: settings.train[f.name] for f in dataclasses.fields(TrainSettings)})
    start = time.perf_counter()
    params, losses = train_decoder(decoder, memory, np.searchsorted(vocab, tokens), train_settings,
                                   int(np.searchsorted(vocab, tokenizer.eot_id)), log=log)
    seconds = time.perf_counter() - start
    workdir = storage.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    save_decoder(workdir / DECODER_DIR, decoder, params, vocab)
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=memory.astype(np.float32), texts=np.array(texts))
    (workdir / MEMORY_FILE).write_bytes(buffer.getvalue())
    (workdir / SETTINGS_FILE).write_text(settings.to_json_best_effort(indent=2) + "\n")
    writer = Writer(workdir)  # the trainer's metrics: metrics.jsonl and TensorBoard
    try:
        for i, loss in enumerate(losses):
            writer.write(i + 1, {"caption_loss": loss})
    finally:
        writer.close()
    return {"captions": len(texts), "final_loss": losses[-1] if losses else None, "train_seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    distributed.single_host_only("python -m e2_jax.captioning")
    config_flag = config_flags.DEFINE_config_file("config", None, "configs/decap.py[:arg]", lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", None, "where the decoder, its memory and the reports go")
    mode_flag = flags.DEFINE_enum("mode", "train", list(MODES), "what to do")
    images_flag = flags.DEFINE_string("images", None, "--mode caption: a folder of images")
    out_flag = flags.DEFINE_string("out", None, "--mode caption: write the captions (JSON lines) here")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(args: list[str]) -> None:
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        settings, workdir = config_flag.value, storage.path(workdir_flag.value)
        spec.check_decap(settings)
        log = lambda message: print(message, flush=True)
        if mode_flag.value == "train":
            log(json.dumps(train(settings, workdir, log)))
        elif mode_flag.value == "evaluate":
            evaluate(settings, workdir, log)
        else:
            if not images_flag.value:
                raise app.UsageError("--mode caption needs --images FOLDER")
            caption_folder(settings, workdir, images_flag.value, out_flag.value, log)

    errors.run(run, argv=argv or sys.argv)


if __name__ == "__main__":
    main()
