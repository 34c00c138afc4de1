"""Weight conversion between PyTorch CLIP checkpoints and e2_jax, both ways.

Reads: an OpenAI TorchScript archive (`ViT-B-32.pt`; a pickle that runs code, so only with
`--trust-pickle`), an open_clip state dict (`.pt`/`.bin`/`.safetensors`) and a Hugging Face
`CLIPModel` folder (`config.json` + `model.safetensors`). Writes an e2_jax model directory
(see `e2_jax.pretrained`), and exports it back to an open_clip state dict or a HF folder.
The E² authors' PyTorch checkpoints (`rclip_v2_5.py`: CLIP's keys plus `visual.token_N_embedding`,
`visual.proj_{q,k,v}[2]`, `visual.ln_sN`, `visual.proj_cls`, `visual.proj_sN`) convert both ways.

Everything goes through one intermediate: a flat `{key: array}` dict in OpenAI's key layout
(which open_clip shares). Hugging Face keys are renamed into it (splitting / joining q, k, v),
and `LAYOUT` maps it onto the Flax tree. The architecture is inferred from tensor shapes.

    python -m e2_jax.convert to-flax ViT-B-32.pt out/clip_b32 --trust-pickle
    python -m e2_jax.convert to-flax open_clip_model.safetensors out/m --activation gelu
    python -m e2_jax.convert to-flax hf_clip_folder/ out/m
    python -m e2_jax.convert from-flax out/m exported.safetensors --format open_clip
    python -m e2_jax.convert from-flax out/m hf_folder/ --format hf
    python -m e2_jax.convert to-flax authors_e2.pt out/e2 --trust-pickle
    python -m e2_jax.convert from-flax out/e2 authors_format.pt --format e2_authors
    python -m e2_jax.convert from-workdir TRAINING_WORKDIR out/m      # a trained run's best parameters
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from e2_jax import pretrained, workdir
from e2_jax.models.clip import CLIPConfig, get_config
from e2_jax.models.e2 import E2Config

Shape = tuple[int, ...]


class ConversionError(ValueError):
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
_OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")


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


def expected_shapes(config: CLIPConfig) -> dict[str, Shape]:
    """OpenAI-layout key -> torch shape, for this config."""
    c = config
    hidden_v, hidden_t = int(c.vision_width * c.mlp_ratio), int(c.text_width * c.mlp_ratio)
    top: dict[str, Shape] = {
        "logit_scale": (),
        "visual.class_embedding": (c.vision_width,),
        "visual.positional_embedding": (c.num_patches + 1, c.vision_width),
        "visual.conv1.weight": (c.vision_width, 3, c.patch_size, c.patch_size),
        "visual.ln_pre.weight": (c.vision_width,), "visual.ln_pre.bias": (c.vision_width,),
        "visual.ln_post.weight": (c.vision_width,), "visual.ln_post.bias": (c.vision_width,),
        "visual.proj": (c.vision_width, c.embed_dim),
        "token_embedding.weight": (c.vocab_size, c.text_width),
        "positional_embedding": (c.context_length, c.text_width),
        "ln_final.weight": (c.text_width,), "ln_final.bias": (c.text_width,),
        "text_projection": (c.text_width, c.embed_dim),
    }
    shapes = dict(top)
    for tower, width, hidden, layers in (("visual.transformer", c.vision_width, hidden_v, c.vision_layers),
                                         ("transformer", c.text_width, hidden_t, c.text_layers)):
        block = {
            "ln_1.weight": (width,), "ln_1.bias": (width,),
            "attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
            "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
            "ln_2.weight": (width,), "ln_2.bias": (width,),
            "mlp.c_fc.weight": (hidden, width), "mlp.c_fc.bias": (hidden,),
            "mlp.c_proj.weight": (width, hidden), "mlp.c_proj.bias": (width,),
        }
        for i in range(layers):
            shapes.update({f"{tower}.resblocks.{i}.{k}": v for k, v in block.items()})
    return shapes


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
    lines = [f"{source} does not match {what} with {_describe(config)}:"]
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


def _describe(config: CLIPConfig) -> str:
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

_AUTHORS_TOKEN = re.compile(r"^visual\.token_(\d+)_embedding$")
# Modules their model defines but never uses: dropped on import, written back on export.
_AUTHORS_UNUSED = ("visual.ln_selection.weight", "visual.ln_selection.bias", "visual.proj_cls_mid")


def is_authors_e2(keys) -> bool:
    return any(_AUTHORS_TOKEN.match(k) for k in keys)


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
    w, d = config.vision_width, config.embed_dim
    shapes = {f"visual.token_{i}_embedding": (w,) for i in range(1, e2.num_tokens + 1)}
    shapes.update({f"visual.proj_{n}{suffix}": (w, w) for suffix in ("", "2") for n in "qkv"})
    shapes["visual.proj_cls"] = (w, d)
    for g in range(1, len(e2.groups) + 1):
        shapes.update({f"visual.ln_s{g}.weight": (w,), f"visual.ln_s{g}.bias": (w,), f"visual.proj_s{g}": (w, d)})
    return shapes


def authors_e2_to_flax(state: Mapping[str, np.ndarray], config: CLIPConfig, e2: E2Config,
                       source: str = "checkpoint") -> dict:
    """The authors' state dict -> Flax E² params. Their sequence starts with `token_K` (each
    token is prepended in turn, `token_1` first), so our row j is their `token_{K-j}`."""
    state = {k: v for k, v in state.items() if k not in _AUTHORS_UNUSED}
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


# ---------------------------------------------------------------------------------------------
# Reading checkpoint files.

class TensorFile:
    """Lazy access to the tensors of a checkpoint: names and shapes first, data on demand."""

    def __init__(self, shapes: dict[str, Shape], get: Callable[[str], np.ndarray],
                 metadata: dict[str, Any] | None = None) -> None:
        self.shapes, self._get, self.metadata = shapes, get, metadata or {}

    def arrays(self, keys=None) -> dict[str, np.ndarray]:
        return {k: self._get(k) for k in (self.shapes if keys is None else keys)}


def _unreadable(path: Path, error: Exception, what: str) -> ConversionError:
    return ConversionError(f"cannot read {path} as {what}: {type(error).__name__}: {error}. "
                           "The file may be truncated or corrupt: download or copy it again.")


def _read_safetensors(path: Path) -> TensorFile:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="numpy")
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise _unreadable(path, e, "safetensors") from e

    def get(key: str) -> np.ndarray:
        try:
            return handle.get_tensor(key)
        except Exception as e:
            raise _unreadable(path, e, "safetensors") from e

    return TensorFile(shapes, get)


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())
    except zipfile.BadZipFile:
        return False


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ConversionError("reading .pt/.bin checkpoints needs PyTorch: `pip install torch` "
                              "(or convert the checkpoint to .safetensors first)") from e
    return torch


def _torch_tensors(state: Mapping[str, Any], path: Path) -> TensorFile:
    torch = _import_torch()
    tensors, metadata = {}, {}
    for key, value in state.items():
        if key in _OPENAI_METADATA or not isinstance(value, torch.Tensor):
            metadata[key] = value.item() if isinstance(value, torch.Tensor) else value
        else:
            tensors[key] = value
    return TensorFile({k: tuple(v.shape) for k, v in tensors.items()},
                      lambda k: tensors[k].detach().float().cpu().numpy(), metadata)


def _unwrap_state(obj: Any, path: Path) -> Mapping[str, Any]:
    """open_clip training checkpoints nest the weights in `state_dict`, prefixed `module.`."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for prefix in ("module.", "_orig_mod."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> tuple[TensorFile, str]:
    """Opens a checkpoint file or HF folder: (tensors, format) with format openai/open_clip/hf."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist. Pass an OpenAI .pt archive, an open_clip .pt/.bin/.safetensors "
            "state dict, or a Hugging Face CLIPModel folder (config.json + model.safetensors).")
    if path.is_dir():
        weights = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()]
        if not (path / "config.json").exists() or not weights:
            raise ConversionError(f"{path} is a folder but not a Hugging Face CLIPModel: it needs "
                                  "config.json and model.safetensors (or pytorch_model.bin)")
        tensors, _ = read_checkpoint(weights[0], trust_pickle)
        try:
            tensors.metadata["hf_config"] = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise _unreadable(path / "config.json", e, "JSON") from e
        return tensors, "hf"
    if path.suffix == ".safetensors":
        tensors = _read_safetensors(path)
        return tensors, "hf" if any(k.startswith("vision_model.") for k in tensors.shapes) else "open_clip"
    torch = _import_torch()
    if _is_torchscript(path):
        if not trust_pickle:
            raise ConversionError(
                f"{path} is a TorchScript archive (OpenAI's format). Loading it runs code from the "
                "file: pass --trust-pickle if you trust its source.")
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise _unreadable(path, e, "a TorchScript archive") from e
        return _torch_tensors(module.state_dict(), path), "openai"
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle, mmap=True)
    except Exception as e:
        if "weights_only" in str(e) and not trust_pickle:
            raise ConversionError(f"{path} holds Python objects beyond tensors; pass --trust-pickle "
                                  f"if you trust its source ({e.__class__.__name__})") from e
        raise _unreadable(path, e, "a PyTorch checkpoint") from e
    state = _unwrap_state(state, path)
    tensors = _torch_tensors(state, path)
    return tensors, "hf" if any(k.startswith("vision_model.") for k in tensors.shapes) else "open_clip"


class Converted(NamedTuple):
    config: CLIPConfig
    params: dict
    e2: E2Config | None  # set for the authors' E² checkpoints


def load_torch(path: str | Path, *, trust_pickle: bool = False, activation: str | None = None,
               model: str | None = None, e2: E2Config | None = None, **config_overrides: Any) -> Converted:
    """Any supported PyTorch checkpoint -> (config, Flax params as NumPy arrays, E² config).

    `activation` is needed for open_clip state dicts (weights don't show it); OpenAI archives
    are QuickGELU and HF folders say it in config.json. `model` names a preset that the
    checkpoint must match (an error lists the differences otherwise). The authors' E²
    checkpoints are recognised by their `visual.token_N_embedding` keys; `e2` says how to run
    them (default: their five groups with `reference_quirks=True`, as they were trained).
    """
    path = Path(path)
    tensors, fmt = read_checkpoint(path, trust_pickle)
    fields: dict[str, Any] = {}
    shapes = dict(tensors.shapes)
    if fmt == "hf":
        if "hf_config" in tensors.metadata:
            fields.update(hf_config_fields(tensors.metadata["hf_config"], str(path)))
        shapes = hf_shapes_to_openai(shapes)
    if fmt == "openai":
        fields["activation"] = "quick_gelu"
    authors = is_authors_e2(shapes)
    if authors:
        fields.setdefault("activation", "quick_gelu")  # the authors fine-tune OpenAI's CLIP
        e2 = e2 or E2Config(reference_quirks=True)
        found = sum(1 for k in shapes if _AUTHORS_TOKEN.match(k))
        if found != e2.num_tokens:
            raise ConversionError(f"{path} has {found} selection tokens; the groups "
                                  f"{[g.name for g in e2.groups]} need {e2.num_tokens}")
    if activation is not None:
        if fields.get("activation", activation) != activation and not authors:
            raise ConversionError(f"{path} is {fields['activation']} but --activation {activation} was given")
        fields["activation"] = activation
    if "activation" not in fields:
        raise ConversionError(
            f"{path}: the activation cannot be read from an open_clip state dict; pass --activation "
            "quick_gelu (OpenAI-trained weights, open_clip's *-quickgelu models) or gelu (open_clip's "
            "own models such as ViT-B-16)")
    clip_shapes = {k: v for k, v in shapes.items() if not authors or (
        k not in _AUTHORS_UNUSED and not k.startswith(("visual.token_", "visual.proj_", "visual.ln_s")))}
    config = infer_config(clip_shapes, str(path), **fields).replace(**config_overrides)
    if model is not None:
        preset = get_config(model, activation=config.activation)
        try:
            check_keys(clip_shapes, preset, f"{path} (forced to preset {model})")
        except ConversionError as e:
            raise ConversionError(f"{e}\n  the checkpoint itself looks like: {_describe(config)}") from None
        if preset.architecture() != config.architecture():
            diff = {k: (v, preset.architecture()[k]) for k, v in config.architecture().items()
                    if preset.architecture()[k] != v}
            raise ConversionError(f"{path} differs from preset {model}: (checkpoint, preset) {diff}")
    if authors:
        check_keys({k: v for k, v in shapes.items() if k not in _AUTHORS_UNUSED}, config, str(path),
                   authors_e2_shapes(config, e2))
    else:
        check_keys(shapes, config, str(path))
    for key in _OPENAI_METADATA:
        if key in tensors.metadata:
            found = int(tensors.metadata[key])
            want = {"input_resolution": config.image_size, "context_length": config.context_length,
                    "vocab_size": config.vocab_size}[key]
            if found != want:
                raise ConversionError(f"{path}: entry {key}={found} disagrees with the weights ({want})")
    state = tensors.arrays()
    if fmt == "hf":
        state = hf_to_openai(state)
    if authors:
        return Converted(config, authors_e2_to_flax(state, config, e2, str(path)), e2)
    return Converted(config, openai_to_flax(state, config, str(path)), None)


def load_torch_clip(path: str | Path, **kwargs: Any) -> tuple[CLIPConfig, dict]:
    """`load_torch` for CLIP checkpoints: (config, params)."""
    converted = load_torch(path, **kwargs)
    if converted.e2 is not None:
        raise ConversionError(f"{path} is an E² checkpoint, not a CLIP: use load_torch")
    return converted.config, converted.params


# ---------------------------------------------------------------------------------------------
# Writing.

def to_flax(src: str | Path, out: str | Path, *, overwrite: bool = False, **kwargs: Any) -> Converted:
    """Converts a PyTorch checkpoint into an e2_jax model directory (config.json + params/)."""
    converted = load_torch(src, **kwargs)
    pretrained.save(out, converted.config, converted.params, overwrite=overwrite, e2=converted.e2)
    return converted


def write_state_dict(state: Mapping[str, np.ndarray], out: str | Path, *, overwrite: bool = False) -> Path:
    """A PyTorch-style state dict: `.safetensors`, or `.pt`/`.bin` via torch; written atomically."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output or pass --overwrite")
    if out.suffix not in (".safetensors", ".pt", ".bin", ".pth"):
        raise ConversionError(f"{out}: use a .safetensors, .pt or .bin file name")
    tmp = out.parent / f".{out.name}.partial"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if out.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file(dict(state), str(tmp), metadata={"format": "pt"})
        else:
            torch = _import_torch()
            torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, str(tmp))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def export_open_clip(config: CLIPConfig, params: Mapping, out: str | Path, *,
                     overwrite: bool = False) -> Path:
    """Writes an open_clip/OpenAI-layout state dict (`.safetensors`, `.pt`, `.bin`)."""
    return write_state_dict(flax_to_openai(params, config), out, overwrite=overwrite)


def export_authors_e2(config: CLIPConfig, e2: E2Config, params: Mapping, out: str | Path, *,
                      overwrite: bool = False) -> Path:
    """Writes an E² model in the authors' state-dict format (`.pt` or `.safetensors`)."""
    return write_state_dict(flax_to_authors_e2(params, config, e2), out, overwrite=overwrite)


def export_hf(config: CLIPConfig, params: Mapping, out: str | Path, *, overwrite: bool = False) -> Path:
    """Writes a Hugging Face `CLIPModel` folder (config.json + model.safetensors)."""
    from safetensors.numpy import save_file

    state = openai_to_hf(flax_to_openai(params, config))
    with pretrained.atomic_directory(out, overwrite=overwrite) as tmp:
        hf_config = hf_config_dict(config, float(np.exp(state["logit_scale"])))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("to-flax", help="PyTorch checkpoint -> e2_jax model directory")
    imp.add_argument("src", help="OpenAI .pt, open_clip .pt/.bin/.safetensors, or HF folder")
    imp.add_argument("out", help="output directory (written atomically)")
    imp.add_argument("--trust-pickle", action="store_true",
                     help="allow loading TorchScript / pickled objects (runs code from the file)")
    imp.add_argument("--activation", choices=["quick_gelu", "gelu"],
                     help="needed for open_clip state dicts")
    imp.add_argument("--model", help="preset the checkpoint must match, e.g. ViT-B-16")
    imp.add_argument("--vision-heads", type=int, help="default: width // 64 (OpenAI's rule)")
    imp.add_argument("--text-heads", type=int, help="default: width // 64 (OpenAI's rule)")
    imp.add_argument("--no-reference-quirks", action="store_true",
                     help="authors' E² checkpoints: run them without their code's quirks")
    imp.add_argument("--overwrite", action="store_true")
    exp = sub.add_parser("from-flax", help="e2_jax model directory -> open_clip, HF or E² authors' checkpoint")
    exp.add_argument("src", help="e2_jax model directory")
    exp.add_argument("out", help="file (.safetensors/.pt) for open_clip and e2_authors, folder for hf")
    exp.add_argument("--format", choices=["open_clip", "hf", "e2_authors"], required=True)
    exp.add_argument("--overwrite", action="store_true")
    wk = sub.add_parser("from-workdir", help="training workdir -> e2_jax model directory (CLIP or E²)")
    wk.add_argument("workdir", help="a directory python -m e2_jax.main trained in")
    wk.add_argument("out", help="output directory (written atomically)")
    wk.add_argument("--checkpoint", default="best",
                    help='"best" (by validation SumR, else the latest), "latest", or a step number')
    wk.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "from-workdir":
            trained = workdir.load(args.workdir, checkpoint=args.checkpoint)
            e2 = trained.e2 if trained.e2.selection_tokens else None
            pretrained.save(args.out, trained.clip, pretrained.to_numpy(trained.params), overwrite=args.overwrite,
                            e2=e2)
            print(f"wrote {args.out}: {'E² model' if e2 else 'CLIP'} from {trained.where}")
        elif args.command == "to-flax":
            heads = {k: v for k, v in (("vision_heads", args.vision_heads),
                                       ("text_heads", args.text_heads)) if v is not None}
            e2 = E2Config(reference_quirks=False) if args.no_reference_quirks else None
            converted = to_flax(args.src, args.out, trust_pickle=args.trust_pickle, activation=args.activation,
                                model=args.model, overwrite=args.overwrite, e2=e2, **heads)
            kind = "E² model" if converted.e2 else "CLIP"
            print(f"wrote {args.out}: {kind}, {_describe(converted.config)}, "
                  f"activation {converted.config.activation}")
        else:
            config, params = pretrained.load(args.src)
            e2 = pretrained.load_e2_config(args.src)
            if (args.format == "e2_authors") != (e2 is not None):
                raise ConversionError(f"{args.src} is {'an E² model' if e2 else 'a CLIP'}: "
                                      f"--format {args.format} does not fit it")
            if args.format == "e2_authors":
                export_authors_e2(config, e2, params, args.out, overwrite=args.overwrite)
            else:
                export = export_open_clip if args.format == "open_clip" else export_hf
                export(config, params, args.out, overwrite=args.overwrite)
            print(f"wrote {args.out} ({args.format})")
    except (ConversionError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
