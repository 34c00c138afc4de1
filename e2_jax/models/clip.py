"""OpenAI CLIP in Flax: a vision transformer, a text transformer and a shared logit scale.

Numerically the same model as OpenAI's `clip/model.py` and open_clip's `CLIP` (pre-LN
residual blocks, LayerNorm eps 1e-5 computed in float32, QuickGELU or exact GELU). Module and
parameter names follow PyTorch's (`visual/transformer/resblocks_0/attn/in_proj`, `ln_1`,
`mlp/c_fc` ...), so that `e2_jax.convert` is a short table of renames and transposes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from e2_jax.numerics import l2_normalize

Array = jax.Array

# Input statistics of OpenAI's image preprocessing (E2_METHOD.md section 1).

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


ATTENTION = ("auto", "xla", "cudnn")  # CLIPConfig.attention, see attention_implementation


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Architecture of a CLIP model, plus how to compute it (dtypes, rematerialisation).

    Head counts default to width // 64, as in every OpenAI model.
    """

    embed_dim: int = 512
    # Vision tower.
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    # Text tower.
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    mlp_ratio: float = 4.0
    # "quick_gelu" for OpenAI's weights, "gelu" for open_clip's own trainings.
    activation: str = "quick_gelu"
    # Computation, not architecture: parameters stay in `param_dtype`, matmuls run in
    # `compute_dtype`; LayerNorm and softmax always run in float32.
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    # Attention kernel: "auto" (cuDNN's fused attention where it applies, see
    # `attention_implementation`), "xla" or "cudnn".
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads:
                raise ValueError(f"{tower}_width {width} is not divisible by {tower}_heads {heads}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, not {self.activation!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, not {self.attention!r}")
        for field in ("compute_dtype", "param_dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ValueError(f"{field} must be one of {sorted(_DTYPES)}, not {getattr(self, field)!r}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def replace(self, **changes: Any) -> CLIPConfig:
        return dataclasses.replace(self, **changes)

    def architecture(self) -> dict[str, Any]:
        """The fields that determine parameter shapes (and the activation)."""
        skip = {"compute_dtype", "param_dtype", "remat", "attention"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CLIPConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CLIPConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)


def _preset(width: int, layers: int, patch: int, image: int, embed: int, text_width: int,
            text_layers: int = 12) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed, image_size=image, patch_size=patch, vision_width=width,
        vision_layers=layers, vision_heads=width // 64, text_width=text_width,
        text_layers=text_layers, text_heads=text_width // 64,
    )


PRESETS: dict[str, CLIPConfig] = {
    "ViT-B-32": _preset(768, 12, 32, 224, 512, 512),
    "ViT-B-16": _preset(768, 12, 16, 224, 512, 512),
    "ViT-L-14": _preset(1024, 24, 14, 224, 768, 768),
    "ViT-L-14-336": _preset(1024, 24, 14, 336, 768, 768),
    # Small sizes for tests and CPU smoke runs (not pretrained anywhere).
    "tiny": CLIPConfig(embed_dim=64, image_size=32, patch_size=8, vision_width=64,
                       vision_layers=2, vision_heads=2, context_length=77, vocab_size=49408,
                       text_width=64, text_layers=2, text_heads=2),
    "small": CLIPConfig(embed_dim=256, image_size=128, patch_size=16, vision_width=256,
                        vision_layers=6, vision_heads=4, text_width=256, text_layers=6,
                        text_heads=4),
}


def get_config(name: str, **overrides: Any) -> CLIPConfig:
    """A named preset; OpenAI's spelling ("ViT-B/32", "ViT-L/14@336px") is accepted too."""
    key = name.replace("/", "-").replace("@336px", "-336").replace("@336", "-336")
    if key not in PRESETS:
        raise ValueError(f"unknown CLIP preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[key].replace(**overrides)


class LayerNorm(nn.Module):
    """LayerNorm (eps 1e-5) computed in float32 and cast back, as OpenAI's `LayerNorm` does."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        width = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (width,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (width,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + 1e-5) * scale.astype(jnp.float32)
        return (y + bias.astype(jnp.float32)).astype(x.dtype)


class Linear(nn.Module):
    """`nn.Dense` (same `kernel`/`bias` names), able to compute only some output columns."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, columns: slice = slice(None)) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        kernel, bias = kernel[:, columns].astype(self.dtype), bias[columns].astype(self.dtype)
        return x.astype(self.dtype) @ kernel + bias


def attention_implementation(choice: str, platform: str, dtype: Any, head_dim: int, masked: bool) -> str:
    """The kernel `jax.nn.dot_product_attention` gets. "auto": cuDNN's fused (flash) attention
    on an NVIDIA GPU when the call is one it takes (bfloat16 or float16, head dim a multiple of
    8 up to 128, no explicit mask: the full-sequence calls, causal or not), else XLA's, which
    is also what JAX's own default (`implementation=None`) uses everywhere today."""
    if choice != "auto":
        return choice
    if (platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128 and not masked):
        return "cudnn"
    return "xla"


def _attend(q: Array, k: Array, v: Array, choice: str, causal: bool = False, mask: Array | None = None) -> Array:
    implementation = attention_implementation(choice, jax.default_backend(), q.dtype, q.shape[-1], mask is not None)
    if implementation == "cudnn" and choice == "auto":
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
        except (RuntimeError, ValueError, NotImplementedError):  # an old cuDNN, a shape it lacks
            implementation = "xla"
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=implementation)


class MultiHeadAttention(nn.Module):
    """`torch.nn.MultiheadAttention` with a packed `in_proj`, through the fused XLA/cuDNN op.

    With `pool` ([B] row indices), only those rows are queried: the output is [B, 1, width],
    the same numbers as the full attention's rows, for a fraction of the work. `mask` ([1, 1,
    L, L] or broadcastable, True where a query may see a key) restricts the full attention.
    """

    width: int
    heads: int
    causal: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: Array, pool: Array | None = None, mask: Array | None = None) -> Array:
        batch, length, _ = x.shape
        head_dim, w = self.width // self.heads, self.width
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        in_proj = Linear(3 * w, name="in_proj", **kw)
        if pool is None:
            q, k, v = jnp.split(in_proj(x).reshape(batch, length, 3 * self.heads, head_dim), 3, axis=2)
            y = _attend(q, k, v, self.attention, causal=self.causal, mask=mask)
        else:
            assert mask is None, "a mask with pool is not supported"
            rows = jnp.take_along_axis(x, pool[:, None, None], axis=1)
            q = in_proj(rows, slice(0, w)).reshape(batch, 1, self.heads, head_dim)
            k, v = jnp.split(in_proj(x, slice(w, 3 * w)).reshape(batch, length, 2 * self.heads, head_dim),
                             2, axis=2)
            mask = None
            if self.causal:  # the pooled row sees keys up to its own position
                mask = (jnp.arange(length)[None, :] <= pool[:, None])[:, None, None, :]
            y = _attend(q, k, v, self.attention, mask=mask)
        return Linear(w, name="out_proj", **kw)(y.reshape(batch, -1, w))


class MLP(nn.Module):
    width: int
    hidden: int
    activation: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = Linear(self.hidden, self.dtype, self.param_dtype, name="c_fc")(x)
        return Linear(self.width, self.dtype, self.param_dtype, name="c_proj")(
            _ACTIVATIONS[self.activation](x))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.

    With `pool` ([B] row indices) it returns only those rows, [B, 1, width]: the last block
    of a tower pooled at one token needs nothing else.
    """

    width: int
    heads: int
    mlp_ratio: float
    activation: str
    causal: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: Array, pool: Array | None = None, mask: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = MultiHeadAttention(self.width, self.heads, self.causal, name="attn", attention=self.attention, **kw)(
            LayerNorm(self.param_dtype, name="ln_1")(x), pool, mask)
        if pool is not None:
            x = jnp.take_along_axis(x, pool[:, None, None], axis=1)
        x = x + y
        x = x + MLP(self.width, int(self.width * self.mlp_ratio), self.activation, name="mlp", **kw)(
            LayerNorm(self.param_dtype, name="ln_2")(x))
        return x


class Transformer(nn.Module):
    """A stack of `layers` residual blocks named `resblocks_0 ...`.

    `start`/`stop` run a slice of the stack, so that an encoder can insert its own blocks
    between layers (E²'s fusion blocks) while keeping one parameter tree. `pool` ([B] row
    indices) makes the last block of the slice return only those rows, [B, width]; `mask`
    (see MultiHeadAttention) is every block's attention mask.
    """

    width: int
    layers: int
    heads: int
    mlp_ratio: float
    activation: str
    causal: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"

    def setup(self) -> None:
        block = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
        self.resblocks = [
            block(self.width, self.heads, self.mlp_ratio, self.activation, self.causal,
                  self.dtype, self.param_dtype, self.attention, name=f"resblocks_{i}")
            for i in range(self.layers)
        ]

    def __call__(self, x: Array, start: int = 0, stop: int | None = None,
                 pool: Array | None = None, mask: Array | None = None) -> Array:
        blocks = self.resblocks[start:stop]
        for block in blocks[:-1] if pool is not None else blocks:
            x = block(x, None, mask)
        return blocks[-1](x, pool)[:, 0] if pool is not None else x


def _dtypes(config: CLIPConfig) -> dict[str, Any]:
    return dict(dtype=_DTYPES[config.compute_dtype], param_dtype=_DTYPES[config.param_dtype])


def _init_normal(std: float):
    return nn.initializers.normal(stddev=std)


class VisionTransformer(nn.Module):
    """CLIP's image tower. Input: NHWC images normalised with CLIP's mean and std (data.preprocessing)."""

    config: CLIPConfig

    def setup(self) -> None:
        c, kw = self.config, _dtypes(self.config)
        scale = c.vision_width**-0.5
        # Patch embedding = Conv2d(kernel=stride=patch, no bias); kept as a conv-shaped kernel
        # (patch, patch, 3, width) but applied as one matmul over flattened patches.
        self.conv1 = self.param("conv1", nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                                (c.patch_size, c.patch_size, 3, c.vision_width), kw["param_dtype"])
        self.class_embedding = self.param("class_embedding", _init_normal(scale),
                                          (c.vision_width,), kw["param_dtype"])
        self.positional_embedding = self.param("positional_embedding", _init_normal(scale),
                                               (c.num_patches + 1, c.vision_width), kw["param_dtype"])
        self.ln_pre = LayerNorm(kw["param_dtype"])
        self.transformer = Transformer(c.vision_width, c.vision_layers, c.vision_heads,
                                       c.mlp_ratio, c.activation, remat=c.remat,
                                       attention=c.attention, **kw)
        self.ln_post = LayerNorm(kw["param_dtype"])
        self.proj = self.param("proj", _init_normal(scale), (c.vision_width, c.embed_dim),
                               kw["param_dtype"])

    def embed(self, images: Array) -> Array:
        """Patches + class token + positions: [B, H, W, 3] -> [B, 1 + num_patches, width]."""
        c = self.config
        dtype = _DTYPES[c.compute_dtype]
        b, h, w, ch = images.shape
        if (h, w, ch) != (c.image_size, c.image_size, 3):
            raise ValueError(f"images must be [B, {c.image_size}, {c.image_size}, 3], got {images.shape}")
        p, g = c.patch_size, c.grid_size
        patches = images.astype(dtype).reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
        x = jnp.einsum("bxyijc,ijcd->bxyd", patches, self.conv1.astype(dtype)).reshape(b, g * g, -1)
        cls = jnp.broadcast_to(self.class_embedding.astype(dtype), (b, 1, c.vision_width))
        return jnp.concatenate([cls, x], axis=1) + self.positional_embedding.astype(dtype)

    def __call__(self, images: Array) -> Array:
        """Image embeddings [B, embed_dim] (not normalised), as `CLIP.encode_image`."""
        x = self.ln_pre(self.embed(images))
        x = self.ln_post(self.transformer(x, pool=jnp.zeros(x.shape[0], jnp.int32)))  # class token
        return x @ self.proj.astype(x.dtype)


class TextTransformer(nn.Module):
    """CLIP's text tower: causal transformer pooled at the EOT token (= argmax of the ids)."""

    config: CLIPConfig

    def setup(self) -> None:
        c, kw = self.config, _dtypes(self.config)
        self.token_embedding = nn.Embed(c.vocab_size, c.text_width, embedding_init=_init_normal(0.02),
                                        **kw)
        self.positional_embedding = self.param("positional_embedding", _init_normal(0.01),
                                               (c.context_length, c.text_width), kw["param_dtype"])
        self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads, c.mlp_ratio,
                                       c.activation, causal=True, remat=c.remat,
                                       attention=c.attention, **kw)
        self.ln_final = LayerNorm(kw["param_dtype"])
        self.text_projection = self.param("text_projection", _init_normal(c.text_width**-0.5),
                                          (c.text_width, c.embed_dim), kw["param_dtype"])

    def __call__(self, tokens: Array) -> Array:
        """Text embeddings [B, embed_dim] (not normalised) of int tokens [B, L], L <= context."""
        c = self.config
        length = tokens.shape[-1]
        if tokens.ndim != 2 or length > c.context_length:
            raise ValueError(f"tokens must be [B, L] with L <= {c.context_length}, got {tokens.shape}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length].astype(
            _DTYPES[c.compute_dtype])
        # Pooled at the end token, the largest id (OpenAI's `text.argmax(dim=-1)`).
        x = self.ln_final(self.transformer(x, pool=jnp.argmax(tokens, axis=-1)))
        return x @ self.text_projection.astype(x.dtype)


class CLIP(nn.Module):
    """The two towers and `logit_scale`, the log inverse temperature (OpenAI init: ln(1/0.07))."""

    config: CLIPConfig

    def setup(self) -> None:
        self.visual = VisionTransformer(self.config)
        self.text = TextTransformer(self.config)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(jnp.log(1 / 0.07)), (),
                                      _DTYPES[self.config.param_dtype])

    def encode_image(self, images: Array, normalize: bool = False) -> Array:
        x = self.visual(images)
        return l2_normalize(x) if normalize else x

    def encode_text(self, tokens: Array, normalize: bool = False) -> Array:
        x = self.text(tokens)
        return l2_normalize(x) if normalize else x

    def __call__(self, images: Array, tokens: Array) -> tuple[Array, Array, Array]:
        """Normalised image and text embeddings and exp(logit_scale), as open_clip's forward."""
        return (self.encode_image(images, normalize=True), self.encode_text(tokens, normalize=True),
                jnp.exp(self.logit_scale))


def init_params(config: CLIPConfig, rng: Array) -> dict:
    """Random parameters of `config` (OpenAI's initialisation scales for the embeddings)."""
    model = CLIP(config)
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    tokens = jnp.zeros((1, config.context_length), jnp.int32)
    return model.init(rng, images, tokens)["params"]


def param_shapes(config: CLIPConfig) -> dict:
    """The parameter tree of `config` as `jax.ShapeDtypeStruct`s, without allocating it."""
    return jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))


def count_params(config: CLIPConfig) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(param_shapes(config)))
