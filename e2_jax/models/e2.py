"""E²: CLIP with selection tokens, fusion blocks and region heads (E2_METHOD.md section 2).

The image sequence is `[K selection tokens | CLS | patches]`. After visual layer `f1` a fusion
block lets every selection token pick one patch (hard, straight-through Gumbel attention) and
average its value with itself; after layer `f2` a second one does the same and drops the
patches, so the remaining layers see K + 1 tokens. The global embedding is `ln_post(CLS) @
proj_cls`; each group's region embedding is the mean of its tokens after the group's
LayerNorm, times the group's `proj`.

Parameter names: the CLIP ones are unchanged (`visual/transformer/resblocks_N/...`); the new
ones are `visual/selection_tokens` [K, width], `visual/fusion_{1,2}/proj_{q,k,v}`,
`visual/proj_cls`, and `visual/region_<group>/{ln,proj}`. CLIP's `visual/proj` stays in
the tree (unused by E²), so that CLIP weights and the authors' checkpoints map one to one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from e2_jax.models.clip import (
    _DTYPES,
    CLIPConfig,
    LayerNorm,
    TextTransformer,
    VisionTransformer,
    count_params,
    get_config,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Group:
    """A tag entity: `tokens` selection tokens, contrasted with the item's `text_field` tag."""

    name: str
    tokens: int = 2
    text_field: str = ""

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"group {self.name!r} needs at least one token, got {self.tokens}")
        if not self.text_field:
            object.__setattr__(self, "text_field", self.name)


# The authors' final code: five groups of two tokens, in this order (E2_METHOD.md section 2).
AUTHORS_GROUPS = (Group("subcategory"), Group("brand"), Group("description"), Group("season"),
                  Group("composition"))
# The paper's ablation and linear probes: four entities.
PAPER_GROUPS = (Group("brand"), Group("season"), Group("subcategory"), Group("composition"))


@dataclasses.dataclass(frozen=True)
class E2Config:
    """What E² adds to a CLIP. The defaults are the authors' method with sound choices where
    their code has quirks (each quirk has a flag; docs/model.md lists them)."""

    groups: tuple[Group, ...] = AUTHORS_GROUPS
    # 1-based visual layers after which fusion blocks 1 and 2 run; None scales the paper's
    # (8, 11) of 12 with the depth (see `fusion_layers_for`).
    fusion_layers: tuple[int, int] | None = None
    gumbel_tau: float = 1.0
    # Beyond the paper (docs/model.md): > 0 anneals the temperature geometrically from
    # `gumbel_tau` at the run's first step to this at its last (the trainer passes each step's);
    # 0 keeps it at `gumbel_tau`. The pick is argmax(logits + noise) at any temperature: only
    # the gradient through the soft weights changes.
    gumbel_tau_end: float = 0.0
    # Ablations (the paper's table): no fusion blocks (the tokens go through every layer); no
    # selection tokens at all (plain CLIP, our CLIP-FT baseline).
    fusion: bool = True
    selection_tokens: bool = True
    # Quirk 4: the authors add Gumbel noise at evaluation too (random test embeddings).
    eval_gumbel_noise: bool = False
    # Quirks 2 and 3 and the literal sqrt(768): the last group pools only its first token and
    # uses the previous group's LayerNorm; attention logits are divided by sqrt(768) whatever
    # the width. With the authors' token order on import, this reproduces their forward.
    reference_quirks: bool = False
    # Initialise `proj_cls` from CLIP's `visual.proj` rather than at random (authors: random).
    proj_cls_from_clip: bool = False
    # Beyond the paper (docs/model.md): False masks the patches from the selection tokens in
    # the transformer's self-attention (they see the class token and each other), so what they
    # know of the patches comes only through their fusion-block picks.
    selection_sees_patches: bool = True
    # Beyond the paper: True also returns `pick_embeddings`, each group's picked patch values
    # (pooled over its tokens, per fusion block) through the group's region head, for the loss
    # term that contrasts them with the tag text (`loss.pick_weight`, docs/model.md).
    pick_embeddings: bool = False
    # Beyond the paper (docs/model.md): > 0 makes the fusion blocks' picks soft at the run's
    # start, the Gumbel-softmax weights over every patch, and hard by this fraction of the run
    # (linearly in between; the trainer passes each step's share of the soft weights). 0 keeps
    # them hard throughout, as E². Evaluation always picks hard.
    soft_pick_until: float = 0.0
    # Beyond the paper (docs/model.md): False keeps the patches after the second fusion block,
    # so the layers after it still see them (E² drops them there: the last layers see only the
    # selection tokens and the class token).
    drop_patches: bool = True

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique, got {names}")
        if self.selection_tokens and not self.groups:
            raise ValueError("E² with selection tokens needs at least one group")
        if self.gumbel_tau <= 0:
            raise ValueError(f"gumbel_tau must be positive, got {self.gumbel_tau}")
        if self.gumbel_tau_end < 0:
            raise ValueError(f"gumbel_tau_end must be positive (annealed) or 0 (constant), got {self.gumbel_tau_end}")
        if not 0 <= self.soft_pick_until <= 1:
            raise ValueError(f"soft_pick_until is a fraction of the run in [0, 1], got {self.soft_pick_until}")
        if self.soft_pick_until and not (self.fusion and self.selection_tokens):
            raise ValueError("soft_pick_until > 0 softens the fusion blocks' picks: it needs the fusion blocks")
        if not self.selection_sees_patches and not self.fusion:
            raise ValueError("selection_sees_patches=False needs the fusion blocks (the tokens would see no patch)")
        if self.pick_embeddings and not (self.fusion and self.selection_tokens):
            raise ValueError("pick embeddings need the fusion blocks (there is no pick without them)")
        if self.reference_quirks and (len(self.groups) < 2 or self.groups[-1].tokens < 2):
            raise ValueError("reference_quirks needs at least two groups, the last with >= 2 tokens")

    @property
    def num_tokens(self) -> int:
        return sum(g.tokens for g in self.groups) if self.selection_tokens else 0

    def replace(self, **changes: Any) -> E2Config:
        return dataclasses.replace(self, **changes)

    def without_group(self, name: str) -> E2Config:
        """The ablation that removes one entity (its tokens and its loss)."""
        if name not in [g.name for g in self.groups]:
            raise ValueError(f"no group {name!r} in {[g.name for g in self.groups]}")
        return self.replace(groups=tuple(g for g in self.groups if g.name != name))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> E2Config:
        data = dict(data)
        data["groups"] = tuple(Group(**g) if isinstance(g, dict) else Group(*g) for g in data.get("groups", ()))
        if data.get("fusion_layers") is not None:
            data["fusion_layers"] = tuple(data["fusion_layers"])
        return cls(**data)


def fusion_layers_for(depth: int, explicit: tuple[int, int] | None = None) -> tuple[int, int]:
    """Layers after which the two fusion blocks run: (8, 11) for 12 layers, (16, 22) for 24,
    scaled likewise for other depths, always leaving at least one layer after block 2."""
    if depth < 2:
        raise ValueError(f"E² needs a vision tower of at least 2 layers, got {depth}")
    if explicit is not None:
        first, second = explicit
        if not 1 <= first <= second < depth:
            raise ValueError(f"fusion_layers {explicit} must satisfy 1 <= first <= second < {depth}")
        return first, second
    second = depth - max(1, round(depth / 12))
    first = max(1, min(round(depth * 8 / 12), second))
    return first, second


def group_slices(e2: E2Config) -> list[tuple[int, int]]:
    """[start, stop) of each group's tokens in the sequence; with reference_quirks the last
    group keeps only its first token (the authors' slice `x[:, 0:K-1]`)."""
    slices, start = [], 0
    for g in e2.groups:
        slices.append((start, start + g.tokens))
        start += g.tokens
    if e2.reference_quirks:
        first, _ = slices[-1]
        slices[-1] = (first, e2.num_tokens - 1)
    return slices


def straight_through_gumbel(logits: Array, tau: float, noise: Array | None,
                            softness: Array | None = None) -> tuple[Array, Array]:
    """Hard attention over the last axis: one-hot forward, Gumbel-softmax gradient.

    `noise`: Gumbel(0, 1) samples of the logits' shape, or None for no noise (plain argmax).
    Returns (weights, picked indices). The forward value is exactly one-hot:
    `hard + (soft - stop_gradient(soft))`, where the bracket is 0. `softness` (a scalar in
    [0, 1], the soft-pick variant) mixes in the soft weights: `(1 - softness) * that + softness
    * soft`, whose gradient is still the soft weights'; None is E²'s pick.
    """
    z = logits.astype(jnp.float32)
    if noise is not None:
        z = z + noise.astype(jnp.float32)
    soft = jax.nn.softmax(z / tau, axis=-1)
    index = jnp.argmax(soft, axis=-1)  # of the soft weights, as the authors' code
    hard = jax.nn.one_hot(index, z.shape[-1], dtype=jnp.float32)
    weights = hard + (soft - jax.lax.stop_gradient(soft))
    if softness is not None:
        weights = (1 - softness) * weights + softness * soft
    return weights, index


class FusionBlock(nn.Module):
    """Each selection token picks one patch and becomes the mean of its value and itself.

    Single head, no bias, no MLP, no LayerNorm (E2_METHOD.md, "Fusion block"). The class token
    is never a candidate and is not changed. Returns the new sequence (without the patches if
    `drop_patches`), the picked patch index of every token, [B, K], and the picked values
    [B, K, width] (one-hot weights times the patches' values; the straight-through gradient).
    """

    num_tokens: int
    width: int
    tau: float = 1.0
    drop_patches: bool = False
    literal_768_scale: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, noise: Array | None, tau: Array | None = None,
                 softness: Array | None = None) -> tuple[Array, Array, Array]:
        """`tau`: the temperature of this call (a traced scalar), else the module's `tau`;
        `softness`: the soft weights' share of the pick (`straight_through_gumbel`)."""
        k_tokens = self.num_tokens
        init = nn.initializers.normal(stddev=self.width**-0.5)
        w = {name: self.param(name, init, (self.width, self.width), self.param_dtype).astype(self.dtype)
             for name in ("proj_q", "proj_k", "proj_v")}
        selection, cls, patches = x[:, :k_tokens], x[:, k_tokens : k_tokens + 1], x[:, k_tokens + 1 :]
        q, k, v = selection @ w["proj_q"], patches @ w["proj_k"], patches @ w["proj_v"]
        scale = math.sqrt(768 if self.literal_768_scale else self.width)
        logits = jnp.einsum("bkd,bpd->bkp", q, k) / scale
        weights, picked = straight_through_gumbel(logits, self.tau if tau is None else tau, noise, softness)
        chosen = jnp.einsum("bkp,bpd->bkd", weights.astype(self.dtype), v)
        selection = (chosen + selection) / 2
        parts = [selection, cls] if self.drop_patches else [selection, cls, patches]
        return jnp.concatenate(parts, axis=1), picked, chosen


class RegionHead(nn.Module):
    """`mean over tokens (ln(token)) @ proj` for one group (E2_METHOD.md section 2, step 10)."""

    width: int
    embed_dim: int
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.ln = LayerNorm(self.param_dtype)
        self.proj = self.param("proj", nn.initializers.normal(stddev=self.width**-0.5),
                               (self.width, self.embed_dim), self.param_dtype)

    def __call__(self, pooled: Array) -> Array:
        return pooled @ self.proj.astype(pooled.dtype)


class E2ImageOutput(NamedTuple):
    """`global_embedding` [B, D]; `region_embeddings` [B, G, D] (None without selection
    tokens); `picks` [fusion blocks, B, K] patch indices (None without fusion);
    `pick_embeddings` [B, fusion blocks, G, D] (only with `E2Config.pick_embeddings`)."""

    global_embedding: Array
    region_embeddings: Array | None
    picks: Array | None
    pick_embeddings: Array | None = None


class E2VisionTransformer(VisionTransformer):
    """CLIP's image tower with E²'s selection tokens, fusion blocks and region heads."""

    e2: E2Config = E2Config()

    def setup(self) -> None:
        super().setup()
        c, e2 = self.config, self.e2
        pdtype, dtype = _DTYPES[c.param_dtype], _DTYPES[c.compute_dtype]
        init = nn.initializers.normal(stddev=c.vision_width**-0.5)
        self.selection_tokens = self.param("selection_tokens", init, (e2.num_tokens, c.vision_width), pdtype)
        self.proj_cls = self.param("proj_cls", init, (c.vision_width, c.embed_dim), pdtype)
        kw = dict(num_tokens=e2.num_tokens, width=c.vision_width, tau=e2.gumbel_tau,
                  literal_768_scale=e2.reference_quirks, dtype=dtype, param_dtype=pdtype)
        if e2.fusion:
            self.fusion_1 = FusionBlock(drop_patches=False, **kw)
            self.fusion_2 = FusionBlock(drop_patches=e2.drop_patches, **kw)
        # A list with explicit names: group order matters (quirk 3), dict order is not kept.
        self.region_heads = [RegionHead(c.vision_width, c.embed_dim, pdtype, name=f"region_{g.name}")
                             for g in e2.groups]

    def __call__(self, images: Array, train: bool = False,  # type: ignore[override]
                 gumbel_noise: Array | None = None, gumbel_tau: Array | None = None,
                 pick_softness: Array | None = None) -> E2ImageOutput:
        c, e2 = self.config, self.e2
        x = self.embed(images)  # CLS + patches, with positions
        tokens = jnp.broadcast_to(self.selection_tokens.astype(x.dtype), (x.shape[0], *self.selection_tokens.shape))
        x = self.ln_pre(jnp.concatenate([tokens, x], axis=1))  # selection tokens get no position
        picks = None
        if e2.fusion:
            first, second = fusion_layers_for(c.vision_layers, e2.fusion_layers)
            noise = (None, None)
            if train or e2.eval_gumbel_noise:
                if gumbel_noise is None:
                    gumbel_noise = jax.random.gumbel(self.make_rng("gumbel"), gumbel_noise_shape(c, e2, x.shape[0]))
                noise = (gumbel_noise[:, 0], gumbel_noise[:, 1])
            mask = None
            if not e2.selection_sees_patches:  # selection-token queries see CLS and the tokens only
                length, seen = x.shape[1], e2.num_tokens + 1
                mask = ~((jnp.arange(length)[:, None] < e2.num_tokens) & (jnp.arange(length)[None, :] >= seen))
                mask = mask[None, None]
            x = self.transformer(x, 0, first, mask=mask)
            x, picks_1, chosen_1 = self.fusion_1(x, noise[0], gumbel_tau, pick_softness)
            x = self.transformer(x, first, second, mask=mask)
            # the patches dropped (unless e2.drop_patches is off): K + 1 tokens remain
            x, picks_2, chosen_2 = self.fusion_2(x, noise[1], gumbel_tau, pick_softness)
            x = self.transformer(x, second, None)
            picks = jnp.stack([picks_1, picks_2])
        else:
            x = self.transformer(x)
        k = e2.num_tokens
        global_embedding = self.ln_post(x[:, k]) @ self.proj_cls.astype(x.dtype)
        heads = self.region_heads
        regions = []
        for g, (start, stop) in enumerate(group_slices(e2)):
            # Quirk 3: the authors' last group uses the previous group's LayerNorm.
            ln_head = heads[g - 1] if e2.reference_quirks and g == len(heads) - 1 else heads[g]
            if ln_head is not heads[g] and self.is_initializing():
                heads[g].ln(x[:, start:stop])  # create the unused LayerNorm, as the authors' ln_s5
            regions.append(heads[g](ln_head.ln(x[:, start:stop]).mean(axis=1)))
        pick_embeddings = None
        if e2.pick_embeddings:  # each block's picked values, per group, through the group's head
            pick_embeddings = jnp.stack([jnp.stack([heads[g](heads[g].ln(chosen[:, start:stop]).mean(axis=1))
                                                    for g, (start, stop) in enumerate(group_slices(e2))], axis=1)
                                         for chosen in (chosen_1, chosen_2)], axis=1)
        return E2ImageOutput(global_embedding, jnp.stack(regions, axis=1), picks, pick_embeddings)


class E2Model(nn.Module):
    """E² (or, with `e2.selection_tokens=False`, plain CLIP for the CLIP-FT baseline).

    `encode_image(images, train, gumbel_noise=None, gumbel_tau=None, pick_softness=None)` ->
    E2ImageOutput;
    `encode_text(tokens)` -> [B, D]. Training draws the fusion blocks' Gumbel noise from the
    "gumbel" RNG stream, or takes it as `gumbel_noise` [B, 2, K, patches] (`gumbel_noise_shape`):
    the trainer draws it for the whole global batch, so that splitting the batch (devices,
    accumulation) changes nothing. `gumbel_tau`, a scalar, replaces `e2.gumbel_tau` for this
    call (the annealed-temperature variant: the trainer passes it at each step); likewise
    `pick_softness`, the soft weights' share of the fusion blocks' picks (the soft-pick variant).
    """

    config: CLIPConfig
    e2: E2Config = E2Config()

    def setup(self) -> None:
        if self.e2.selection_tokens:
            self.visual = E2VisionTransformer(self.config, self.e2)
        else:
            self.visual = VisionTransformer(self.config)
        self.text = TextTransformer(self.config)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)), (),
                                      _DTYPES[self.config.param_dtype])

    def encode_image(self, images: Array, train: bool = False, gumbel_noise: Array | None = None,
                     gumbel_tau: Array | None = None, pick_softness: Array | None = None) -> E2ImageOutput:
        if not self.e2.selection_tokens:
            return E2ImageOutput(self.visual(images), None, None)
        return self.visual(images, train, gumbel_noise, gumbel_tau, pick_softness)

    def encode_text(self, tokens: Array) -> Array:
        return self.text(tokens)

    def __call__(self, images: Array, tokens: Array, train: bool = False) -> tuple[E2ImageOutput, Array]:
        return self.encode_image(images, train), self.encode_text(tokens)


def annealed_tau(e2: E2Config, step: Array, total_steps: int) -> Array | None:
    """The Gumbel temperature at global `step` of a run of `total_steps`: geometric from
    `e2.gumbel_tau` to `e2.gumbel_tau_end`; None where it is not annealed (the model's own)."""
    if not e2.gumbel_tau_end:
        return None
    return e2.gumbel_tau * (e2.gumbel_tau_end / e2.gumbel_tau) ** _run_progress(step, total_steps)


def pick_softness(e2: E2Config, step: Array, total_steps: int) -> Array | None:
    """The soft weights' share of the fusion blocks' picks at global `step` of a run of
    `total_steps`: 1 at the first step, 0 from `e2.soft_pick_until` of the run on, linear in
    between; None where the picks are hard throughout (E²)."""
    if not e2.soft_pick_until:
        return None
    return jnp.clip(1.0 - _run_progress(step, total_steps) / e2.soft_pick_until, 0.0, 1.0)


def _run_progress(step: Array, total_steps: int) -> Array:
    """How far through a run of `total_steps` global `step` is: 0 at the first, 1 at the last and after."""
    return jnp.clip(step / max(total_steps - 1, 1), 0.0, 1.0)


def gumbel_noise_shape(config: CLIPConfig, e2: E2Config, batch: int) -> tuple[int, int, int, int]:
    """[batch, fusion blocks, selection tokens, patches]: the Gumbel noise of one forward pass."""
    patches = (config.image_size // config.patch_size) ** 2
    return (batch, 2, e2.num_tokens, patches)


def init_e2_params(config: CLIPConfig, e2: E2Config, rng: Array, clip_params: dict | None = None) -> dict:
    """E² parameters: `clip_params` (converted CLIP weights) where they exist, new ones drawn
    as in E2_METHOD.md section 2 (`width**-0.5 * N(0, 1)`, LayerNorms at 1 and 0)."""
    model = E2Model(config, e2)
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    tokens = jnp.zeros((1, config.context_length), jnp.int32)
    params_rng, gumbel_rng = jax.random.split(rng)
    params = model.init({"params": params_rng, "gumbel": gumbel_rng}, images, tokens)["params"]
    if clip_params is None:
        return params
    params = jax.tree.map(lambda x: x, params)  # a mutable copy of the nested dicts
    _merge_clip(params, clip_params, path=())
    if e2.selection_tokens and e2.proj_cls_from_clip:
        params["visual"]["proj_cls"] = jnp.asarray(clip_params["visual"]["proj"])
    return params


def _merge_clip(params: dict, clip_params: dict, path: tuple[str, ...]) -> None:
    for name, value in clip_params.items():
        if name not in params:
            raise ValueError(f"CLIP parameter {'/'.join((*path, name))} has no place in the E² model")
        if isinstance(value, dict):
            _merge_clip(params[name], value, (*path, name))
        else:
            if params[name].shape != value.shape:
                raise ValueError(f"CLIP parameter {'/'.join((*path, name))} has shape {value.shape}, "
                                 f"the E² model {params[name].shape}")
            params[name] = jnp.asarray(value, params[name].dtype)


def count_new_params(config: CLIPConfig, e2: E2Config) -> tuple[int, int]:
    """(parameters E² adds to CLIP, parameters of CLIP)."""
    shapes = jax.eval_shape(lambda r: init_e2_params(config, e2, r), jax.random.key(0))
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    clip = count_params(config)
    return total - clip, clip


def main() -> None:
    """`python -m e2_jax.models.e2`: the parameters E² adds to each CLIP preset."""
    print("| CLIP | groups | selection tokens | CLIP parameters | E² adds | share of CLIP |")
    print("|---|---|---|---|---|---|")
    for preset in ("ViT-B-32", "ViT-B-16", "ViT-L-14"):
        for label, groups in (("authors' five", AUTHORS_GROUPS), ("paper's four", PAPER_GROUPS)):
            e2 = E2Config(groups=groups)
            new, clip = count_new_params(get_config(preset), e2)
            print(f"| {preset} | {label} | {e2.num_tokens} | {clip:,} | {new:,} | {new / clip:.2%} |")


if __name__ == "__main__":
    main()
