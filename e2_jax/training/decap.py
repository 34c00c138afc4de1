"""DeCap's decoder training (Li et al., ICLR 2023): a small decoder learns to write each caption
of a text corpus from that caption's own (normalised) text embedding, the encoder frozen. It
uses the trainer's parts: its AdamW and schedule (`optim`), a data-parallel mesh over the local
devices (`sharding`). `python -m e2_jax.captioning --mode train` runs it; the trained
captioner (memory projection, decoding, evaluation) is `e2_jax.evaluation.captioning`."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from e2_jax import optim, sharding
from e2_jax.models.caption_decoder import CaptionDecoder, DecoderConfig, init_params
from e2_jax.numerics import l2_normalize


def target_mask(tokens: jax.Array, eot_id: int, nonzero: bool = False) -> jax.Array:
    """Which ids are predicted: every one up to and including the first end token. DeCap's code
    instead ignores every id 0 (`nonzero=True`, kept to reproduce it): 0 is the padding but also
    the BPE id of "!", so a caption's "!" goes unlearnt there."""
    if nonzero:
        return tokens != 0
    ended_before = jnp.cumsum(tokens == eot_id, axis=1) - (tokens == eot_id)
    return ended_before == 0


def caption_loss(params: dict, config: DecoderConfig, prefix: jax.Array, tokens: jax.Array, eot_id: int,
                 nonzero_mask: bool = False) -> jax.Array:
    """Mean next-id cross-entropy of the captions `tokens` [B, L] from their prefixes [B, D]:
    the prefix predicts the start token, each id the next."""
    logits = CaptionDecoder(config).apply({"params": params}, prefix, tokens[:, :-1])
    mask = target_mask(tokens, eot_id, nonzero_mask)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1)


@dataclasses.dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    noise_std: float = 0.0  # CapDec's Gaussian noise on the text embeddings (DeCap: none)
    decap_mask: bool = False  # DeCap's loss mask (every id 0 ignored, "!" included), see target_mask
    seed: int = 0
    log_every: int = 100


def train_decoder(config: DecoderConfig, embeddings: np.ndarray, tokens: np.ndarray, settings: TrainSettings,
                  eot_id: int, log=print) -> tuple[dict, list[float]]:
    """Trains a decoder to write `tokens[i]` from `embeddings[i]` (normalised here). Batches
    are drawn with replacement-free epochs from `settings.seed`, sharded over every local
    device; returns the parameters and the loss at each step."""
    if len(embeddings) != len(tokens):
        raise ValueError(f"{len(embeddings)} embeddings but {len(tokens)} token rows")
    if tokens.shape[1] > config.max_length:
        raise ValueError(f"captions of {tokens.shape[1]} ids, more than the decoder's max_length {config.max_length}")
    devices = jax.local_devices()
    mesh = sharding.make_mesh((("data", -1),), devices)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch = -(-settings.batch_size // len(devices)) * len(devices)
    warmup = min(settings.warmup_steps, settings.steps // 2)  # a short run still decays
    # The trainer's AdamW (decoupled decay on matrices) and schedule (linear warm-up, cosine to 0).
    optimizer = optim.optimizer("adamw", optim.schedule(settings.lr, warmup, settings.steps),
                                weight_decay=settings.weight_decay)
    rng = jax.random.key(settings.seed)
    params = jax.device_put(init_params(config, rng), replicated)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, prefix, tokens, key):
        prefix = l2_normalize(prefix + settings.noise_std * jax.random.normal(key, prefix.shape)) \
            if settings.noise_std else prefix
        loss, grads = jax.value_and_grad(caption_loss)(params, config, prefix, tokens, eot_id, settings.decap_mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    embeddings = np.asarray(embeddings, np.float32)
    embeddings = l2_normalize(embeddings)
    order_rng = np.random.default_rng(settings.seed)
    order, at = order_rng.permutation(len(tokens)), 0
    losses, start = [], time.perf_counter()
    for i in range(settings.steps):
        while at + batch > len(order):  # next epoch (several, for a corpus smaller than a batch)
            order, at = np.concatenate([order[at:], order_rng.permutation(len(tokens))]), 0
        idx, at = order[at : at + batch], at + batch
        prefix = jax.device_put(embeddings[idx], rows)
        ids = jax.device_put(tokens[idx].astype(np.int32), rows)
        params, opt_state, loss = step(params, opt_state, prefix, ids, jax.random.fold_in(rng, i))
        losses.append(loss)
        if (i + 1) % settings.log_every == 0 or i + 1 == settings.steps:
            log(f"step {i + 1}/{settings.steps}: caption loss {float(loss):.4f} ({time.perf_counter() - start:.0f} s)")
    return params, [float(v) for v in losses]


def corpus_vocabulary(tokens: np.ndarray, tokenizer) -> np.ndarray:
    """The CLIP ids the captions `tokens` use, with padding (0) and the start and end ids: the
    output vocabulary of a decoder that only ever writes what it was trained on (a text-only
    decoder never learns to write other ids anyway), and a far smaller output layer."""
    return np.unique(np.concatenate([np.asarray(tokens).ravel(), [0, tokenizer.sot_id, tokenizer.eot_id]]))
