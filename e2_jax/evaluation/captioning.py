"""Zero-shot captioning with a trained DeCap decoder (Li et al., ICLR 2023): an image
embedding projected into the text-embedding space as a softmax-weighted combination of the
memory (the training captions' embeddings), then decoded greedily or by beam search; the
decoder on disk; the evaluation (`--mode evaluate`: the evaluation split's first views
captioned both ways and scored with BLEU@1-4, METEOR, ROUGE-L and CIDEr) and captioning a
folder (`--mode caption`). The command is `python -m e2_jax.captioning`; the decoder's
training is `e2_jax.training.decap`."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from e2_jax import checkpoints, images, inference, spec, storage
from e2_jax.data import pipeline
from e2_jax.errors import ConfigError, DataError
from e2_jax.evaluation import caption_metrics
from e2_jax.evaluation import report as report_lib
from e2_jax.models.caption_decoder import CaptionDecoder, DecoderConfig, init_cache, init_params
from e2_jax.numerics import l2_normalize
from e2_jax.pretrained import atomic_directory

DECODER_DIR = "decoder"  # config.json + params (Orbax), written atomically at the end of training
MEMORY_FILE = "memory.npz"  # the memory's texts and embeddings
SETTINGS_FILE = "captioning.json"  # the config this workdir was trained with


# --- the memory projection --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("chunk",))
def project_to_memory(queries: jax.Array, memory: jax.Array, temperature: float, chunk: int = 1024) -> jax.Array:
    """DeCap's projection: each query (normalised) becomes `normalise(sum_i softmax(q . m_i / T) m_i)`
    over the memory rows m_i (normalised). Queries go `chunk` at a time, so that the
    [queries, memory] weights are never all in memory at once."""
    q, m = l2_normalize(queries.astype(jnp.float32)), l2_normalize(memory.astype(jnp.float32))
    n = q.shape[0]
    pad = -n % chunk
    q = jnp.pad(q, ((0, pad), (0, 0))).reshape(-1, min(chunk, n + pad), q.shape[1])
    out = jax.lax.map(lambda block: jax.nn.softmax(block @ m.T / temperature, axis=-1) @ m, q)
    out = out.reshape(-1, m.shape[1])[:n]
    return l2_normalize(out)


# --- decoding ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config", "beam_size", "eot_id"))
def generate(params: dict, config: DecoderConfig, prefix: jax.Array, beam_size: int, eot_id: int) -> jax.Array:
    """Ids [B, max_length] of the best caption for each prefix [B, D] (normalised by the
    caller): beam search keeping `beam_size` sequences (1: greedy), a finished sequence padded
    with 0, the best chosen by mean log-probability per id (its length counts the end token)."""
    b, k, v, length = prefix.shape[0], beam_size, config.vocab_size, config.max_length
    model = CaptionDecoder(config, decode=True)
    prefix_k = jnp.repeat(prefix, k, axis=0)
    pad_row = jnp.full((v,), -jnp.inf).at[0].set(0.0)  # a finished sequence continues with padding, free
    batch_index = jnp.arange(b)[:, None] * k

    def body(t, carry):
        cache, ids, scores, finished, lengths, last = carry
        logits, changed = model.apply({"params": params, "cache": cache}, prefix_k, last, t,
                                      method=CaptionDecoder.step, mutable=["cache"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, k, v)
        logp = jnp.where(finished[..., None], pad_row, logp)
        best, flat = jax.lax.top_k((scores[..., None] + logp).reshape(b, k * v), k)
        origin, token = flat // v, (flat % v).astype(jnp.int32)
        pick = lambda x: jnp.take_along_axis(x, origin.reshape(b, k, *([1] * (x.ndim - 2))), axis=1)
        was_finished = pick(finished)
        ids = pick(ids).at[:, :, t].set(token)
        lengths = pick(lengths) + (~was_finished)
        rows = (batch_index + origin).reshape(-1)
        cache = jax.tree.map(lambda c: c[rows] if c.ndim else c, changed["cache"])
        return cache, ids, best, was_finished | (token == eot_id), lengths, token.reshape(-1)

    scores = jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), (b, k))  # one live beam at first
    carry = (init_cache(config, b * k), jnp.zeros((b, k, length), jnp.int32), scores,
             jnp.zeros((b, k), bool), jnp.zeros((b, k), jnp.int32), jnp.zeros((b * k,), jnp.int32))
    _, ids, scores, _, lengths, _ = jax.lax.fori_loop(0, length, body, carry)
    best = jnp.argmax(scores / jnp.maximum(lengths, 1), axis=1)
    return jnp.take_along_axis(ids, best[:, None, None], axis=1)[:, 0]


def detokenize(text: str) -> str:
    """Undoes the spaces CLIP's BPE puts around punctuation ("slim - fit coat , 1 0 0 % wool ." ->
    "slim-fit coat, 100% wool."). It matters for the scores, not only for reading: the COCO
    tokenizer keeps "slim-fit" one word but drops a lone "-", so "slim - fit" would lose it."""
    text = re.sub(r"(?<=\d) (?=\d)", "", text)  # CLIP's BPE splits numbers into digits
    text = re.sub(r"\s*([-'/])\s*", r"\1", text)
    text = re.sub(r"\s+([.,!?;:%)])", r"\1", text)
    return re.sub(r"([(])\s+", r"\1", text).strip()


def decode_texts(ids: np.ndarray, tokenizer) -> list[str]:
    """Captions from `generate`'s ids (CLIP ids): up to the first end token, special ids
    dropped, punctuation re-attached."""
    out = []
    for row in np.asarray(ids):
        ends = np.flatnonzero(row == tokenizer.eot_id)
        out.append(detokenize(tokenizer.decode(row[: ends[0]] if len(ends) else row)))
    return out


def caption_embeddings(params: dict, config: DecoderConfig, embeddings: np.ndarray, tokenizer,
                       vocab: np.ndarray, *, beam_size: int = 1, batch_size: int = 64) -> list[str]:
    """Captions for CLIP-space embeddings [N, D] (already projected, for images), in batches.
    `vocab`: the CLIP id of each decoder id (sorted, padding first)."""
    if len(vocab) != config.vocab_size or vocab[0] != 0:
        raise ValueError(f"vocabulary of {len(vocab)} ids (first {vocab[0]}) for a decoder of {config.vocab_size}")
    eot = int(np.searchsorted(vocab, tokenizer.eot_id))
    out: list[str] = []
    for start in range(0, len(embeddings), batch_size):
        chunk = np.asarray(embeddings[start : start + batch_size], np.float32)
        padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), 0)]) if len(chunk) < batch_size \
            else chunk
        prefix = l2_normalize(padded)
        ids = generate(params, config, jnp.asarray(prefix), beam_size, eot)
        out += decode_texts(vocab[np.asarray(ids)[: len(chunk)]], tokenizer)
    return out


# --- a trained captioner on disk --------------------------------------------------------------------


@dataclasses.dataclass
class Captioner:
    """A trained decoder with its memory and its encoder: images in, captions out."""

    config: DecoderConfig
    params: dict
    vocab: np.ndarray  # the CLIP id of each decoder id
    memory: np.ndarray  # [M, D] normalised text embeddings of the training captions
    encoder: object
    temperature: float

    def project(self, image_embeddings: np.ndarray) -> np.ndarray:
        return np.asarray(project_to_memory(jnp.asarray(image_embeddings), jnp.asarray(self.memory),
                                            self.temperature))

    def caption_image_embeddings(self, image_embeddings: np.ndarray, beam_size: int = 1) -> list[str]:
        return caption_embeddings(self.params, self.config, self.project(image_embeddings), self.encoder.tokenizer,
                                  self.vocab, beam_size=beam_size)

    def caption_images(self, images: Sequence, beam_size: int = 1) -> list[str]:
        return self.caption_image_embeddings(self.encoder.encode_images(images), beam_size)


def save_decoder(directory: epath.Path, config: DecoderConfig, params: dict, vocab: np.ndarray) -> None:
    """The decoder in `directory`: its parameters (Orbax), vocabulary, and last its config.json,
    which marks it complete. A local directory is replaced atomically (the old decoder stays
    until the new one is whole); in a bucket, where nothing renames atomically, it is replaced
    in place."""
    if not storage.is_remote(directory):
        with atomic_directory(directory, overwrite=True) as tmp:
            _write_decoder(epath.Path(tmp), config, params, vocab)
        return
    if directory.exists():
        directory.rmtree()
    _write_decoder(directory, config, params, vocab)


def _write_decoder(directory: epath.Path, config: DecoderConfig, params: dict, vocab: np.ndarray) -> None:
    checkpoints.write_tree(directory / "params", jax.device_get(params))
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(vocab, np.int32))
    (directory / "vocab.npy").write_bytes(buffer.getvalue())
    (directory / "config.json").write_text(config.to_json() + "\n")


def load_decoder(directory: epath.Path) -> tuple[DecoderConfig, dict, np.ndarray]:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no {config_file}: train the decoder first (python -m e2_jax.captioning "
                                "--mode train with the same --workdir)")
    config = DecoderConfig.from_json(config_file.read_text())
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    params = checkpoints.read_tree(directory / "params", abstract)
    return config, params, np.load(io.BytesIO((directory / "vocab.npy").read_bytes()))


def load_encoder(settings):
    spec.check_decap(settings)
    return inference.load_encoder(settings.encoder, settings.pretrained, batch_size=settings.encode_batch_size)


def load_captioner(settings, workdir: str | os.PathLike) -> Captioner:
    workdir = storage.path(workdir)
    config, params, vocab = load_decoder(workdir / DECODER_DIR)
    memory_file = workdir / MEMORY_FILE
    if not memory_file.is_file():
        raise FileNotFoundError(f"no {memory_file}: train first (--mode train with this --workdir)")
    with np.load(io.BytesIO(memory_file.read_bytes())) as data:
        memory = data["embeddings"]
    encoder = load_encoder(settings)
    if memory.shape[1] != encoder.clip.embed_dim:
        raise ValueError(f"{memory_file} holds {memory.shape[1]}-d embeddings but the encoder's are "
                         f"{encoder.clip.embed_dim}-d: the decoder was trained for another encoder")
    return Captioner(config, params, vocab, memory, encoder, settings.temperature)


def captioner_from_workdir(workdir: str | os.PathLike) -> Captioner:
    """The captioner a DeCap workdir holds, with the settings it was trained with (its
    `captioning.json`): for tools that caption without this command's config."""
    workdir = storage.path(workdir)
    settings_file = workdir / SETTINGS_FILE
    if not settings_file.is_file():
        raise ConfigError(f"{workdir}: no {SETTINGS_FILE}; train a DeCap decoder there first "
                          "(python -m e2_jax.captioning --mode train, docs/captioning.md)")
    return load_captioner(ml_collections.ConfigDict(json.loads(settings_file.read_text())), workdir)


def evaluate(settings, workdir: str | os.PathLike, log=print) -> dict:
    """Mode `evaluate`: caption the evaluation split's first views, greedy and beam; score."""
    workdir = storage.path(workdir)
    captioner = load_captioner(settings, workdir)
    source = pipeline.Source(settings.dataset, settings.eval_split, settings.data_dir or None)
    references = [str(t) for t in source.scan([settings.text_field])[settings.text_field]]
    count = min(len(references), settings.max_eval or len(references))
    items = np.stack([np.arange(count), np.zeros(count, np.int64)], axis=1)
    start = time.perf_counter()
    images = captioner.encoder.split_outputs(source, items)["global"]
    projected = captioner.project(images)
    decode = functools.partial(caption_embeddings, captioner.params, captioner.config, projected,
                               captioner.encoder.tokenizer, captioner.vocab)
    captions = {"greedy": decode(beam_size=1)}
    if settings.beam_size > 1:
        captions[f"beam{settings.beam_size}"] = decode(beam_size=settings.beam_size)
    seconds = time.perf_counter() - start
    refs = references[:count]
    scores = {name: caption_metrics.score(refs, caps) for name, caps in captions.items()}
    (workdir / "captions.jsonl").write_text("".join(
        json.dumps({"index": i, "reference": refs[i], **{n: c[i] for n, c in captions.items()}}) + "\n"
        for i in range(count)))
    report = {"dataset": settings.dataset, "split": settings.eval_split, "products": count,
              "text_field": settings.text_field, "temperature": settings.temperature, "seconds": seconds,
              "metrics": scores}
    header, rows = caption_metrics.table(scores)
    markdown = report_lib.markdown_table(header, rows)
    start = time.perf_counter()
    page = report_page(report, source, refs, captions, header, rows)
    report["page_seconds"] = time.perf_counter() - start
    report_lib.write(workdir, report, markdown, page=page)
    log(markdown)
    return report


EXAMPLES = 8  # products shown on the report page


def report_page(report: dict, source: pipeline.Source, references: list[str], captions: dict[str, list[str]],
                header: Sequence[str], rows: Sequence[Sequence]) -> tuple[str, list]:
    """`report.html`'s blocks: the scores, then the first products' images, each with its
    reference and its generated captions."""
    shown = range(min(EXAMPLES, len(references)))
    figures = tuple(report_lib.Figure(report_lib.png(image, 256), "\n".join(
        [f"reference: {references[i]}", *(f"{name}: {caps[i]}" for name, caps in captions.items())]))
        for i, (image, _) in zip(shown, source.first_views(shown), strict=True))
    return (f"Captioning on {report['dataset']}/{report['split']}", [
        report_lib.Text(f"{report['products']} products (their first views) captioned from the memory of "
                        f"training captions (temperature {report['temperature']}), scored against their "
                        f"{report['text_field']!r} text."),
        report_lib.Table(tuple(header), tuple(tuple(r) for r in rows)),
        report_lib.Gallery(f"The first {len(figures)} products: image, reference and generated captions", figures,
                           width=224)])


def caption_folder(settings, workdir: str | os.PathLike, folder: str, out: str | None, log=print) -> list[dict]:
    """Mode `caption`: every image of a folder, captioned; JSON lines to `out` (or stdout)."""
    captioner = load_captioner(settings, workdir)
    loaded = images.read(images.find(folder))
    if not loaded.images:
        raise DataError(f"no readable image under {folder}: " + "; ".join(loaded.skipped[:3]))
    captions = captioner.caption_images(loaded.images, beam_size=settings.beam_size)
    rows = [{"image": str(p), "caption": c} for p, c in zip(loaded.paths, captions, strict=True)]
    images.report(f"captioned {len(rows)} images", loaded.skipped)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if out:
        Path(out).write_text(text)
        log(f"{len(rows)} captions written to {out}")
    else:
        sys.stdout.write(text)
    return rows
