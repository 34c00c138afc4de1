"""The parameter layout: PyTorch CLIP keys (OpenAI's, which open_clip shares; Hugging Face's
and the E² authors' renamed into them) <-> the Flax parameter tree. Pure tables and the
functions that apply them; expected shapes come from the Flax model's own `param_shapes`."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from e2_jax.errors import UserError
from e2_jax.models.clip import CLIPConfig, param_shapes
from e2_jax.models.e2 import E2Config, init_e2_params

Shape = tuple[int, ...]


class ConversionError(UserError, ValueError):
    """A checkpoint that cannot be converted; the message names the keys and shapes involved."""


# ---------------------------------------------------------------------------------------------
# The OpenAI key layout <-> Flax parameter tree.

# (OpenAI key pattern, Flax path pattern, kind). `{i}` is a block index; `{tower}` is
# `visual.transformer` <-> `visual/transformer` or `transformer` <-> `text/transformer`.
# kinds: "copy"; "linear" (torch [out, in] <-> flax [in, out]); "conv" (torch [out, in, kh, kw]
# <-> flax [kh, kw, in, out]).
_TOP = [
    ("logit_scale", "logit_scale", "copy"),
    ("visual.class_embedding", "visual/class_embedding", "copy"),
    ("visual.positional_embedding", "visual/positional_embedding", "copy"),
    ("visual.conv1.weight", "visual/conv1", "conv"),
    ("visual.ln_pre.weight", "visual/ln_pre/scale", "copy"),
    ("visual.ln_pre.bias", "visual/ln_pre/bias", "copy"),
    ("visual.ln_post.weight", "visual/ln_post/scale", "copy"),
    ("visual.ln_post.bias", "visual/ln_post/bias", "copy"),
    ("visual.proj", "visual/proj", "copy"),
    ("token_embedding.weight", "text/token_embedding/embedding", "copy"),
    ("positional_embedding", "text/positional_embedding", "copy"),
    ("ln_final.weight", "text/ln_final/scale", "copy"),
    ("ln_final.bias", "text/ln_final/bias", "copy"),
    ("text_projection", "text/text_projection", "copy"),
]
_BLOCK = [
    ("ln_1.weight", "ln_1/scale", "copy"),
    ("ln_1.bias", "ln_1/bias", "copy"),
    ("attn.in_proj_weight", "attn/in_proj/kernel", "linear"),
    ("attn.in_proj_bias", "attn/in_proj/bias", "copy"),
    ("attn.out_proj.weight", "attn/out_proj/kernel", "linear"),
    ("attn.out_proj.bias", "attn/out_proj/bias", "copy"),
    ("ln_2.weight", "ln_2/scale", "copy"),
    ("ln_2.bias", "ln_2/bias", "copy"),
    ("mlp.c_fc.weight", "mlp/c_fc/kernel", "linear"),
    ("mlp.c_fc.bias", "mlp/c_fc/bias", "copy"),
    ("mlp.c_proj.weight", "mlp/c_proj/kernel", "linear"),
    ("mlp.c_proj.bias", "mlp/c_proj/bias", "copy"),
]
_TOWERS = {"visual.transformer": "visual/transformer", "transformer": "text/transformer"}

_TO_FLAX: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 3, 1, 0),
}
_TO_TORCH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(3, 2, 0, 1),
}

# Entries that OpenAI's TorchScript archives carry beside the weights.
OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")


def layout(config: CLIPConfig) -> list[tuple[str, str, str]]:
    """Every (OpenAI key, Flax path, kind) of a CLIP with this config."""
    entries = list(_TOP)
    layers = {"visual.transformer": config.vision_layers, "transformer": config.text_layers}
    for torch_tower, flax_tower in _TOWERS.items():
        for i in range(layers[torch_tower]):
            for torch_key, flax_key, kind in _BLOCK:
                entries.append((f"{torch_tower}.resblocks.{i}.{torch_key}",
                                f"{flax_tower}/resblocks_{i}/{flax_key}", kind))
    return entries


def _torch_shape(shape: Shape, kind: str) -> Shape:
    """A Flax parameter's shape in PyTorch's layout (the inverse of `_TO_FLAX`'s transpose)."""
    if kind == "linear":
        return shape[::-1]
    if kind == "conv":
        return shape[3], shape[2], shape[0], shape[1]
    return shape


def _flax_shapes(abstract: Mapping) -> dict[str, Shape]:
    return {"/".join(str(k.key) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}


def expected_shapes(config: CLIPConfig) -> dict[str, Shape]:
    """OpenAI-layout key -> torch shape, for this config: the Flax model's own parameter shapes
    (`models.clip.param_shapes`) through `layout`."""
    flax = _flax_shapes(param_shapes(config))
    return {key: _torch_shape(flax[path], kind) for key, path, kind in layout(config)}


def _set_path(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _get_path(tree: Mapping, path: str) -> Any:
    for name in path.split("/"):
        tree = tree[name]
    return tree


def check_keys(shapes: Mapping[str, Shape], config: CLIPConfig, source: str,
               extra: Mapping[str, Shape] | None = None) -> None:
    """Raises ConversionError listing every missing, unexpected and mis-shaped key.

    `extra`: further expected keys beyond CLIP's (E²'s new parameters)."""
    expected = {**expected_shapes(config), **(extra or {})}
    # In layout order (embeddings and heads before blocks), so the first lines tell the story.
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [k for k in expected if k in shapes and tuple(shapes[k]) != expected[k]]
    if not (missing or unexpected or wrong):
        return
    what = "an E² model" if extra else "a CLIP"
    lines = [f"{source} does not match {what} with {describe(config)}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}):")
        lines += [f"    {k} expected shape {expected[k]}" + _closest(k, unexpected) for k in missing[:20]]
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}):")
        lines += [f"    {k} shape {tuple(shapes[k])}" for k in unexpected[:20]]
    if wrong:
        lines.append(f"  shape mismatches ({len(wrong)}):")
        lines += [f"    {k}: checkpoint {tuple(shapes[k])}, expected {expected[k]}" for k in wrong[:20]]
    if len(missing) > 20 or len(unexpected) > 20 or len(wrong) > 20:
        lines.append("  (lists cut at 20 entries)")
    raise ConversionError("\n".join(lines))


def _closest(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.8)
    return f" (found {match[0]!r} instead?)" if match else ""


def describe(config: CLIPConfig) -> str:
    c = config
    return (f"vision width {c.vision_width}, {c.vision_layers} layers, patch {c.patch_size}, "
            f"image {c.image_size}; text width {c.text_width}, {c.text_layers} layers, context "
            f"{c.context_length}, vocab {c.vocab_size}; embed dim {c.embed_dim}")


def openai_to_flax(state: Mapping[str, np.ndarray], config: CLIPConfig, source: str = "checkpoint") -> dict:
    """OpenAI-layout arrays -> Flax params (float32 unless config.param_dtype says otherwise)."""
    check_keys({k: np.shape(v) for k, v in state.items()}, config, source)
    dtype = np.dtype(config.param_dtype) if config.param_dtype != "bfloat16" else None
    params: dict = {}
    for torch_key, flax_path, kind in layout(config):
        value = _TO_FLAX[kind](np.asarray(state[torch_key], dtype=np.float32))
        _set_path(params, flax_path, np.array(value, dtype=dtype or np.float32, order="C"))
    return params


def flax_to_openai(params: Mapping, config: CLIPConfig) -> dict[str, np.ndarray]:
    """Flax params -> OpenAI-layout float32 arrays (open_clip's state-dict keys)."""
    return {torch_key: np.array(_TO_TORCH[kind](np.asarray(_get_path(params, flax_path), np.float32)),
                                order="C")
            for torch_key, flax_path, kind in layout(config)}


def _count_blocks(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def infer_config(shapes: Mapping[str, Shape], source: str = "checkpoint", **fields: Any) -> CLIPConfig:
    """The architecture of an OpenAI-layout checkpoint, from its tensor shapes alone.

    Head counts are not visible in shapes: OpenAI's rule width // 64 is used unless given in
    `fields` (as HF configs do). The activation must be given (weights don't show it).
    """
    needed = ["visual.conv1.weight", "visual.positional_embedding", "text_projection",
              "positional_embedding", "token_embedding.weight", "ln_final.weight",
              "visual.transformer.resblocks.0.mlp.c_fc.weight"]
    missing = [k for k in needed if k not in shapes]
    if missing:
        keys = sorted(shapes)
        hint = "".join(f"\n    {k}" + _closest(k, keys) for k in missing)
        raise ConversionError(
            f"{source} is not a CLIP checkpoint in OpenAI/open_clip or Hugging Face layout: "
            f"missing keys needed to infer the architecture:{hint}\n  it has {len(keys)} keys, "
            f"e.g. {keys[:5]}")
    width, _, patch, _ = shapes["visual.conv1.weight"]
    positions = shapes["visual.positional_embedding"][0] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise ConversionError(f"{source}: visual.positional_embedding has {positions + 1} rows, "
                              "not 1 + a square number of patches")
    text_width = shapes["ln_final.weight"][0]
    arch = dict(
        embed_dim=shapes["text_projection"][1],
        image_size=grid * patch, patch_size=patch, vision_width=width,
        vision_layers=_count_blocks(shapes, "visual.transformer.resblocks"),
        vision_heads=max(width // 64, 1),
        context_length=shapes["positional_embedding"][0],
        vocab_size=shapes["token_embedding.weight"][0],
        text_width=text_width, text_layers=_count_blocks(shapes, "transformer.resblocks"),
        text_heads=max(text_width // 64, 1),
        mlp_ratio=shapes["visual.transformer.resblocks.0.mlp.c_fc.weight"][0] / width,
    )
    arch.update(fields)
    try:
        return CLIPConfig(**arch)
    except ValueError as e:
        raise ConversionError(f"{source}: inferred an impossible architecture {arch}: {e}") from e


# ---------------------------------------------------------------------------------------------
# The authors' PyTorch E² (`rclip/rclip_v2_5.py`) <-> the Flax E² model.

AUTHORS_TOKEN = re.compile(r"^visual\.token_(\d+)_embedding$")
# Modules their model defines but never uses: dropped on import, written back on export.
AUTHORS_UNUSED = ("visual.ln_selection.weight", "visual.ln_selection.bias", "visual.proj_cls_mid")


def is_authors_e2(keys) -> bool:
    return any(AUTHORS_TOKEN.match(k) for k in keys)


def authors_e2_layout(e2: E2Config) -> list[tuple[str, str, str]]:
    """(authors' key, Flax path, kind) of E²'s new parameters, except the selection tokens.

    Their `proj_*` matrices are applied as `x @ W`, as ours: no transposes."""
    entries = [(f"visual.proj_{n}{suffix}", f"visual/fusion_{block}/proj_{n}", "copy")
               for block, suffix in ((1, ""), (2, "2")) for n in "qkv"]
    entries.append(("visual.proj_cls", "visual/proj_cls", "copy"))
    for g, group in enumerate(e2.groups, start=1):
        entries += [(f"visual.ln_s{g}.weight", f"visual/region_{group.name}/ln/scale", "copy"),
                    (f"visual.ln_s{g}.bias", f"visual/region_{group.name}/ln/bias", "copy"),
                    (f"visual.proj_s{g}", f"visual/region_{group.name}/proj", "copy")]
    return entries


def authors_e2_shapes(config: CLIPConfig, e2: E2Config) -> dict[str, Shape]:
    """The authors' keys of E²'s new parameters -> torch shape, from the Flax E² model's own
    parameter shapes (`models.e2.init_e2_params`) through `authors_e2_layout`."""
    flax = _flax_shapes(jax.eval_shape(lambda rng: init_e2_params(config, e2, rng), jax.random.key(0)))
    width = flax["visual/selection_tokens"][1]
    shapes = {f"visual.token_{i}_embedding": (width,) for i in range(1, e2.num_tokens + 1)}
    shapes.update({key: _torch_shape(flax[path], kind) for key, path, kind in authors_e2_layout(e2)})
    return shapes


def authors_e2_to_flax(state: Mapping[str, np.ndarray], config: CLIPConfig, e2: E2Config,
                       source: str = "checkpoint") -> dict:
    """The authors' state dict -> Flax E² params. Their sequence starts with `token_K` (each
    token is prepended in turn, `token_1` first), so our row j is their `token_{K-j}`."""
    state = {k: v for k, v in state.items() if k not in AUTHORS_UNUSED}
    check_keys({k: np.shape(v) for k, v in state.items()}, config, source, authors_e2_shapes(config, e2))
    clip_keys = expected_shapes(config)
    params = openai_to_flax({k: state[k] for k in clip_keys}, config, source)
    k = e2.num_tokens
    tokens = np.stack([np.asarray(state[f"visual.token_{k - j}_embedding"], np.float32) for j in range(k)])
    _set_path(params, "visual/selection_tokens", tokens)
    for key, path, kind in authors_e2_layout(e2):
        _set_path(params, path, np.array(_TO_FLAX[kind](np.asarray(state[key], np.float32)), order="C"))
    return params


def flax_to_authors_e2(params: Mapping, config: CLIPConfig, e2: E2Config) -> dict[str, np.ndarray]:
    """Flax E² params -> the authors' state dict, unused modules included (LayerNorm at 1 and
    0, `proj_cls_mid` at 0), so that their model loads it with `strict=True`."""
    state = flax_to_openai(params, config)
    tokens = np.asarray(_get_path(params, "visual/selection_tokens"), np.float32)
    k = e2.num_tokens
    state.update({f"visual.token_{k - j}_embedding": np.array(tokens[j]) for j in range(k)})
    for key, path, kind in authors_e2_layout(e2):
        state[key] = np.array(_TO_TORCH[kind](np.asarray(_get_path(params, path), np.float32)), order="C")
    w, d = config.vision_width, config.embed_dim
    state["visual.ln_selection.weight"] = np.ones((w,), np.float32)
    state["visual.ln_selection.bias"] = np.zeros((w,), np.float32)
    state["visual.proj_cls_mid"] = np.zeros((w, d), np.float32)
    return state


# ---------------------------------------------------------------------------------------------
# Hugging Face `CLIPModel` <-> OpenAI layout.

_HF_TOP = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_HF_PROJ = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_HF_BLOCK = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}
_HF_TOWERS = {"vision_model.encoder.layers": "visual.transformer.resblocks",
              "text_model.encoder.layers": "transformer.resblocks"}
# Buffers some HF checkpoints carry; not parameters.
_HF_IGNORED = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")
_HF_BLOCK_KEY = re.compile(
    r"^(vision_model\.encoder\.layers|text_model\.encoder\.layers)\.(\d+)\.(.+)\.(weight|bias)$")


def _hf_rename(key: str) -> tuple[str, str]:
    """HF key -> (OpenAI key, how): "copy", "transpose", or "q"/"k"/"v" (a third of in_proj).

    Keys it does not know keep their name, so that `check_keys` reports them.
    """
    if key in _HF_TOP:
        return _HF_TOP[key], "copy"
    if key in _HF_PROJ:
        return _HF_PROJ[key], "transpose"
    if m := _HF_BLOCK_KEY.match(key):
        tower, index, module, kind = m.groups()
        prefix = f"{_HF_TOWERS[tower]}.{index}"
        if module in _HF_BLOCK:
            return f"{prefix}.{_HF_BLOCK[module]}.{kind}", "copy"
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            return f"{prefix}.attn.in_proj_{kind}", module[len("self_attn.")]
    return key, "copy"


def _hf_convert(items: Mapping[str, Any], transpose: Callable, join: Callable) -> dict[str, Any]:
    out: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {}
    for key, value in items.items():
        if key in _HF_IGNORED:
            continue
        new, how = _hf_rename(key)
        if how in ("q", "k", "v"):
            parts.setdefault(new, {})[how] = value
        else:
            out[new] = transpose(value) if how == "transpose" else value
    for key, qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise ConversionError(f"{key}: the checkpoint has only {sorted(qkv)} of q, k, v")
        out[key] = join([qkv[p] for p in "qkv"])
    return out


def hf_to_openai(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames a HF `CLIPModel` state dict to OpenAI keys, joining q/k/v into `in_proj`."""
    return _hf_convert(state, lambda a: np.asarray(a).T, lambda a: np.concatenate(a, axis=0))


def hf_shapes_to_openai(shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """`hf_to_openai` on shapes only (to infer the architecture before reading any data)."""
    return _hf_convert(shapes, lambda s: tuple(reversed(s)),
                       lambda s: (sum(p[0] for p in s), *s[0][1:]))


def openai_to_hf(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenAI-layout arrays -> HF `CLIPModel` state dict (q/k/v split out of `in_proj`)."""
    inverse_top = {v: k for k, v in _HF_TOP.items()}
    inverse_proj = {v: k for k, v in _HF_PROJ.items()}
    inverse_block = {v: k for k, v in _HF_BLOCK.items()}
    inverse_tower = {v: k for k, v in _HF_TOWERS.items()}
    block_key = re.compile(r"^(visual\.transformer\.resblocks|transformer\.resblocks)\.(\d+)\.(.+)$")
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if key in inverse_top:
            out[inverse_top[key]] = value
        elif key in inverse_proj:
            out[inverse_proj[key]] = np.array(np.asarray(value).T, order="C")
        elif m := block_key.match(key):
            tower, index, rest = m.groups()
            prefix = f"{inverse_tower[tower]}.{index}"
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                for name, part in zip("qkv", np.split(np.asarray(value), 3, axis=0), strict=True):
                    out[f"{prefix}.self_attn.{name}_proj.{kind}"] = np.array(part, order="C")
            else:
                module, kind = rest.rsplit(".", 1)
                out[f"{prefix}.{inverse_block[module]}.{kind}"] = value
        else:
            raise ConversionError(f"no Hugging Face name for key {key!r}")
    return out


def hf_config_fields(hf_config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """What a HF `config.json` adds to the shapes: head counts and the activation."""
    vision, text = hf_config.get("vision_config", {}), hf_config.get("text_config", {})
    acts = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise ConversionError(f"{source}: hidden_act {sorted(acts)} is not supported (quick_gelu or gelu, "
                              "the same in both towers)")
    for tower in (vision, text):
        eps = tower.get("layer_norm_eps", 1e-5)
        if abs(eps - 1e-5) > 1e-12:
            raise ConversionError(f"{source}: layer_norm_eps {eps} differs from CLIP's 1e-5")
    eos, vocab = text.get("eos_token_id", 2), text.get("vocab_size", 49408)
    if eos not in (2, vocab - 1):
        # HF pools at the first eos_token_id (argmax when it is 2); e2_jax pools at argmax(ids).
        raise ConversionError(f"{source}: text pooling at eos_token_id {eos} differs from CLIP's argmax "
                              f"pooling (supported: eos_token_id = vocab_size - 1 = {vocab - 1})")
    fields: dict[str, Any] = {"activation": acts.pop()}
    if "num_attention_heads" in vision:
        fields["vision_heads"] = vision["num_attention_heads"]
    if "num_attention_heads" in text:
        fields["text_heads"] = text["num_attention_heads"]
    return fields


def hf_config_dict(config: CLIPConfig, logit_scale: float) -> dict[str, Any]:
    """A `transformers.CLIPConfig` (as a dict) for this architecture."""
    from transformers import CLIPConfig as HFCLIPConfig

    c = config
    hf = HFCLIPConfig(
        projection_dim=c.embed_dim,
        logit_scale_init_value=float(logit_scale),
        text_config=dict(
            vocab_size=c.vocab_size, hidden_size=c.text_width, num_hidden_layers=c.text_layers,
            num_attention_heads=c.text_heads, intermediate_size=int(c.text_width * c.mlp_ratio),
            max_position_embeddings=c.context_length, hidden_act=c.activation,
            projection_dim=c.embed_dim, bos_token_id=c.vocab_size - 2, eos_token_id=c.vocab_size - 1,
            pad_token_id=c.vocab_size - 1),
        vision_config=dict(
            hidden_size=c.vision_width, num_hidden_layers=c.vision_layers,
            num_attention_heads=c.vision_heads, intermediate_size=int(c.vision_width * c.mlp_ratio),
            image_size=c.image_size, patch_size=c.patch_size, hidden_act=c.activation,
            projection_dim=c.embed_dim),
    )
    hf.architectures = ["CLIPModel"]
    return hf.to_dict()


