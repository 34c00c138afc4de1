"""DeCap's caption decoder (Li et al., ICLR 2023): a small GPT-2-style transformer that writes a
caption from one CLIP-space embedding used as a prefix token.

As in DeCap's code: the embedding (L2-normalised, [B, D]) goes through one linear layer to a
single prefix token; the caption's CLIP-BPE ids (start token, words, end token) follow; the
model is trained from scratch, text only, to predict every id from the ones before it (the
prefix predicts the start token). Pre-LN blocks, tanh-approximated GELU (GPT-2's `gelu_new`),
learned positions, the output head tied to the token embedding. DeCap's size is 4 layers,
4 heads, width 768 over CLIP's 49,408-id vocabulary.

Decoding keeps a key/value cache (Flax attention's `decode` mode): one position per call.
"""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    prefix_dim: int = 512  # the CLIP embedding size of the encoder it decodes
    width: int = 768
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    max_length: int = 64  # caption ids after the prefix, start and end tokens included
    vocab_size: int = 49408

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.max_length < 3:
            raise ValueError(f"max_length must be >= 3 (start, one word, end), got {self.max_length}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DecoderConfig:
        data = json.loads(text)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown decoder config keys {sorted(unknown)}")
        return cls(**data)


class Block(nn.Module):
    width: int
    heads: int
    mlp_ratio: float
    decode: bool = False

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        y = nn.LayerNorm(epsilon=1e-5, name="ln_1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, decode=self.decode, name="attn")(
            y, y, mask=mask)
        y = nn.LayerNorm(epsilon=1e-5, name="ln_2")(x)
        y = nn.Dense(int(self.width * self.mlp_ratio), name="c_fc")(y)
        y = nn.Dense(self.width, name="c_proj")(jax.nn.gelu(y, approximate=True))
        return x + y


class CaptionDecoder(nn.Module):
    """`__call__(prefix, tokens)`: logits [B, 1 + L, V] for the sequence (prefix, tokens); the
    logits at position i predict token i. With `decode=True`, `step(x, position)` runs one
    position through the cache (initialise it with `init_cache`)."""

    config: DecoderConfig
    decode: bool = False

    def setup(self) -> None:
        c = self.config
        self.prefix_proj = nn.Dense(c.width, name="prefix_proj")
        self.token_embedding = nn.Embed(c.vocab_size, c.width, embedding_init=nn.initializers.normal(0.02))
        self.positional_embedding = self.param("positional_embedding", nn.initializers.normal(0.01),
                                               (c.max_length + 1, c.width))
        self.blocks = [Block(c.width, c.heads, c.mlp_ratio, self.decode, name=f"blocks_{i}")
                       for i in range(c.layers)]
        self.ln_f = nn.LayerNorm(epsilon=1e-5)

    def _logits(self, x: Array, mask: Array | None) -> Array:
        for block in self.blocks:
            x = block(x, mask)
        return self.token_embedding.attend(self.ln_f(x))

    def __call__(self, prefix: Array, tokens: Array) -> Array:
        x = jnp.concatenate([self.prefix_proj(prefix)[:, None], self.token_embedding(tokens)], axis=1)
        length = x.shape[1]
        if length > self.config.max_length + 1:
            raise ValueError(f"{length - 1} tokens after the prefix, more than max_length {self.config.max_length}")
        x = x + self.positional_embedding[:length]
        return self._logits(x, nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32)))

    def embed_step(self, prefix: Array, token: Array, position: Array) -> Array:
        """The input of one decoding position: the projected prefix at position 0, else the
        token's embedding; plus the position's embedding. [B, 1, width]."""
        x = jnp.where(position == 0, self.prefix_proj(prefix), self.token_embedding(token))
        return (x + self.positional_embedding[position])[:, None]

    def step(self, prefix: Array, token: Array, position: Array) -> Array:
        """Logits [B, V] of the next id after `position` (a scalar; the cache holds the
        positions before it): the input at `position` is `prefix` if it is 0, else `token`."""
        return self._logits(self.embed_step(prefix, token, position), None)[:, 0]


def init_params(config: DecoderConfig, rng: Array) -> dict:
    model = CaptionDecoder(config)
    return model.init(rng, jnp.zeros((1, config.prefix_dim)), jnp.zeros((1, 2), jnp.int32))["params"]


def init_cache(config: DecoderConfig, batch: int) -> dict:
    """An empty key/value cache for `batch` sequences of up to 1 + max_length positions."""
    model = CaptionDecoder(config, decode=True)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, config.prefix_dim)),
                                               jnp.zeros((batch, config.max_length), jnp.int32)))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
