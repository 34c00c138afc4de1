"""Configs: the schemas every config starts from (training, DeCap, CIReVL), and the paper's recipe.

Config files (`configs/*.py`) define `get_config(arg=None)` and return `base()` with fields
changed. `base()` is locked: setting a field it does not have raises at once, naming the field,
as does a dotted flag for one (`--config.batch_sise=32`). Lists are tuples, never comma strings:
`stages` names the stage sub-configs, run in order; each trains for `epochs` (or `steps`, if
set) at peak `lr` with the parameters `trainable` selects ("all", "e2_new", or a regex),
starting from the best parameters of the stage before it (by validation SumR), as the authors
do. A tag entity of E² is one entry of `e2.groups` (`group(name, tokens, tag_length, field)`):
`AUTHORS_GROUPS` and `PAPER_GROUPS` are the presets, `without(groups, name)` the ablation.

Config arguments (`--config configs/e2_b32.py:dataset=amazon_fashion,ablation=no_fusion`) are
comma-separated `key=value` or bare flags, read by `parse_arg` against typed defaults (an
unknown or mistyped argument is an error); `fashion_recipe` reads `dataset`, `ablation` and
`runlocal` (shrinks any config to a CPU smoke run: tiny model, SynthFashion/tiny, a few steps).
`decap()` and `cirevl()` are the schemas of `python -m e2_jax.captioning` and `python -m
e2_jax.composed_retrieval` (configs/decap.py, configs/cirevl.py), locked the same way; their
values are checked by `spec.check_decap` and `spec.check_cirevl`, as the trainer's by
`spec.check`, before any work. This module reads nothing else: `e2_jax.spec` resolves a config
into the typed objects the rest of the code takes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import types
from collections.abc import Iterable
from typing import Any

import ml_collections

from e2_jax.data.preprocessing import AMAZON_TEXT, FASHIONGEN_TEXT
from e2_jax.errors import ConfigError, MissingError, suggest


def group(name: str, tokens: int = 2, tag_length: int = 0, field: str = "") -> dict[str, Any]:
    """One tag entity of E²: `tokens` selection tokens, contrasted with the CLIP embedding of
    the item's `field` tag (default: the group's name) tokenized at `tag_length` tokens, end
    token included (0: the model's context length; longer tags are cut, keeping the end)."""
    return {"name": name, "tokens": int(tokens), "tag_length": int(tag_length), "field": field}


# The authors' five entities, in their order (E2_METHOD.md section 2), at tag lengths that
# cover FashionGen's tags; the paper's four (its ablation and linear probes).
AUTHORS_GROUPS = (group("subcategory", tag_length=16), group("brand", tag_length=24), group("description"),
                  group("season", tag_length=8), group("composition", tag_length=32))
PAPER_GROUPS = tuple(next(g for g in AUTHORS_GROUPS if g["name"] == name)
                     for name in ("brand", "season", "subcategory", "composition"))
ABLATIONS = ("none", "no_fusion", "no_selection_tokens", "no_region_loss", "paper_groups", "no_warmup",
             *(f"without_{g['name']}" for g in AUTHORS_GROUPS))


def without(groups: Iterable[dict], name: str) -> tuple[dict, ...]:
    """`groups` less the entity `name` (the paper's per-entity ablation)."""
    groups = tuple(groups)
    if name not in [g["name"] for g in groups]:
        raise ConfigError(f"no group {name!r} in {[g['name'] for g in groups]}")
    return tuple(g for g in groups if g["name"] != name)


def with_tag_lengths(groups: Iterable[dict], **lengths: int) -> tuple[dict, ...]:
    """`groups` with the tag lengths given by name changed (e.g. shorter tags for a small model)."""
    return tuple({**g, "tag_length": lengths.get(g["name"], g["tag_length"])} for g in groups)


def stage(epochs: float = 0.0, lr: float = 5e-5, trainable: str = "all", steps: int = 0) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"epochs": float(epochs), "steps": int(steps), "lr": float(lr),
                                      "trainable": trainable})


def base() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with defaults (the authors' where they have one)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict({
        "preset": "ViT-B-16",  # a preset of e2_jax.models.clip
        "pretrained": "",  # a converted CLIP (python -m e2_jax.convert to-flax ...); "" = random init
        "overrides": ml_collections.ConfigDict(),  # CLIPConfig fields, e.g. image_size=64
        "compute_dtype": "float32",  # "bfloat16": mixed precision (float32 parameters and loss)
        "remat": False,
        "attention": "auto",  # "auto" (cuDNN's fused attention on a GPU where it applies), "xla", "cudnn"
    })
    c.e2 = ml_collections.ConfigDict({
        "enabled": True,  # False: plain CLIP fine-tuning (CLIP-FT), no selection tokens
        "groups": AUTHORS_GROUPS,  # tag entities, each a `group(...)`
        "fusion": True,
        "fusion_layers": (),  # (8, 11); () scales the paper's (8, 11) of 12 layers with the depth
        "gumbel_tau": 1.0,
        "gumbel_tau_end": 0.0,  # > 0: annealed from gumbel_tau to this over the run (docs/model.md)
        "eval_gumbel_noise": False,  # the authors' quirk 4
        "reference_quirks": False,  # the authors' quirks 2, 3 and sqrt(768)
        "proj_cls_from_clip": False,
        "selection_sees_patches": True,  # False: the masked-selection variant (docs/model.md)
        "drop_patches": True,  # False: the keep-patches variant, the last layers see the patches (docs/model.md)
        "soft_pick_until": 0.0,  # > 0: the soft-pick variant, soft picks until this fraction of the run (docs/model.md)
    })
    c.data = ml_collections.ConfigDict({
        "dataset": "fashion_gen",  # a TFDS name, built with python -m e2_jax.data.build
        "data_dir": "",  # "" = TFDS's default
        "train_split": "train",
        "eval_split": "validation",
        "text_format": FASHIONGEN_TEXT,
        # "packed": each distinct tag of a process's batch encoded once, trimmed, in at most two
        # text-tower calls; "per_item": the authors' way, one row per item and group at its tag
        # length (same loss and gradients, more work). See e2_jax/data/region_texts.py.
        "region_texts": "packed",
        "build_if_missing": False,  # build the dataset first if it is not (SynthFashion only)
    })
    # pick_weight > 0: a variant beyond the paper (docs/model.md), each fusion block's picked
    # patches contrasted with their group's tag text too
    c.loss = ml_collections.ConfigDict({"global_weight": 0.5, "region_weight": 0.5, "pick_weight": 0.0})
    c.optim = ml_collections.ConfigDict({"name": "adam_l2", "b1": 0.9, "b2": 0.999, "eps": 1e-8,
                                         "weight_decay": 1e-4, "grad_clip": 0.0, "warmup_steps": 100})
    c.stages = ("warmup", "finetune")
    c.warmup = stage(epochs=5, lr=5e-4, trainable="e2_new")
    c.finetune = stage(epochs=20, lr=5e-5, trainable="all")
    c.batch_size = 64  # the global batch, the contrastive batch too
    c.accum_steps = 1  # micro-batches per step (GradCache: the loss still sees the whole batch)
    c.mesh = (("data", -1), ("fsdp", 1))
    # Several TPU slices (multi-slice): the mesh axes that run across them over the data-center
    # network, -1 = every slice; `mesh` gives each axis's whole size (docs/multihost.md).
    c.mesh_dcn = (("data", -1),)
    c.sharding_rules = ((".*", "fsdp"),)
    c.eval = ml_collections.ConfigDict({
        "every_steps": 0,  # validation during training (full-candidate, global text); 0: once per epoch
        "batch_size": 256,
        # --mode=evaluate (and after training): the protocols and texts of e2_jax/evaluation/evaluate.py.
        "protocols": ("full_candidate", "full_gallery", "sample_100"),
        "texts": ("tags", "description"),  # tags = data.text_format; description = description_format
        "description_format": "{description}",
        "sample_field": "subcategory",  # sample-100's negatives share it; "" = any product
        "sample_queries": 1000,
        "sample_negatives": 100,
        "sample_draw": "ours",  # "authors": every product a query, no top-up (their code; docs/evaluation.md)
        "seed": 0,
        "selection_maps": 16,  # --mode=evaluate draws this many validation products' selection maps (E²)
    })
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 1000, "keep": 3})
    c.log_every_steps = 10
    c.distributed = "auto"
    c.peak_flops = 0.0  # per device, for MFU; 0: from the device kind (TPU, NVIDIA)
    c.lock()
    return c


DECAP_VOCABULARIES = ("clip", "corpus")
CIREVL_DATASETS = ("fashion_iq", "synth_fashion_cir")
CIREVL_METHODS = ("cirevl", "image", "late_fusion", "instruction")
CAPTIONERS = ("file", "decap")
RECOMPOSERS = ("template", "chat", "hf")


def decap() -> ml_collections.ConfigDict:
    """DeCap captioning's schema with DeCap's settings (Li et al., 2023): a 4-layer, 4-head,
    width-768 decoder over CLIP's BPE, projection temperature 0.01; locked."""
    c = ml_collections.ConfigDict()
    c.encoder = ""  # a training workdir (CLIP-FT or E²)
    c.pretrained = ""  # or a converted CLIP
    c.encode_batch_size = 256
    c.dataset = "fashion_gen"
    c.data_dir = ""
    c.train_split, c.eval_split = "train", "validation"
    c.text_field = "description"
    c.max_captions = 0  # 0: every distinct caption of the training split
    c.max_eval = 0  # 0: every evaluation product
    c.temperature = 0.01
    c.beam_size = 5
    # vocabulary "clip": an output over CLIP's whole BPE, as DeCap; "corpus": only the ids the
    # training captions use (the same captions, a far smaller output layer).
    c.decoder = ml_collections.ConfigDict({"width": 768, "layers": 4, "heads": 4, "max_length": 77,
                                           "vocabulary": "clip"})
    c.train = ml_collections.ConfigDict({"steps": 20_000, "batch_size": 64, "lr": 1e-4, "warmup_steps": 500,
                                         "weight_decay": 0.01, "noise_std": 0.0, "decap_mask": False, "seed": 0,
                                         "log_every": 100})
    c.lock()
    return c


def cirevl(exact: bool) -> ml_collections.ConfigDict:
    """CIReVL composed retrieval's schema; `exact`: CIReVL's released behaviour where it changes
    the numbers (configs/cirevl.py lists the fields it sets); locked."""
    c = ml_collections.ConfigDict()
    c.encoder, c.pretrained = "", ""
    c.dataset, c.data_dir, c.split = "fashion_iq", "", "val"
    c.batch_size = 256
    c.captioner = ml_collections.ConfigDict({"kind": "file", "captions": "", "decap": "", "beam_size": 1})
    c.recomposer = ml_collections.ConfigDict({
        "kind": "template", "url": "", "model": "", "api_key_env": "OPENAI_API_KEY", "hf_model": "",
        "prompt_file": "", "strict": False, "timeout": 60.0, "exact": exact, "retries": 59 if exact else 3,
        "max_tokens": 700 if exact else 128, "stop": ("\n\n", "<|endoftext|>") if exact else ()})
    c.exact = exact  # (what the fields below were set from; they can be set one by one)
    c.image_pad = 1.25 if exact else 0.0
    c.keep_empty_caption = exact
    # What each query's embedding is: `cirevl` the recomposed description's text embedding;
    # `image` the reference image's; `late_fusion` the sum of the reference image's and the
    # modification text's (both normalised); `instruction` the modification text's alone.
    c.methods = CIREVL_METHODS
    c.max_queries = 0
    c.lock()
    return c


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """A config argument read against typed defaults (big_vision's `parse_arg`):
    `parse_arg("dataset=amazon_fashion,runlocal", dataset="fashion_gen", runlocal=False)` ->
    {dataset: "amazon_fashion", runlocal: True}. Each value takes its default's type (a bare
    key sets a bool); a key without a default, or a value of the wrong type, is an error."""
    out = ml_collections.ConfigDict(dict(defaults))
    for item in filter(None, (arg or "").split(",")):
        key, has_value, value = (part.strip() for part in item.partition("="))
        if key not in defaults:
            raise ConfigError(f"unknown config argument {key!r}{suggest(key, defaults)}; known: "
                              f"{', '.join(sorted(defaults)) or 'none'}")
        kind = type(defaults[key])
        if kind is bool:
            if has_value and value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"config argument {key} is a flag: write {key} or {key}=false, not {key}={value}")
            out[key] = not has_value or value.lower() in ("true", "1")
        else:
            try:
                out[key] = kind(value)
            except ValueError:
                raise ConfigError(f"config argument {key}={value!r} is not a {kind.__name__}") from None
    return out


def paper_recipe(preset: str, method: str) -> ml_collections.ConfigDict:
    """The paper's training setting (E2_METHOD.md section 4) on `preset`, for E² or CLIP-FT
    (plain CLIP fine-tuning: the same data and the same 25 epochs, all parameters, no selection
    tokens), starting from the converted CLIP `models/clip_<preset>`, on FashionGen."""
    if method not in ("e2", "clip_ft"):
        raise ConfigError(f"method must be e2 or clip_ft, got {method!r}")
    c = base()
    c.model.preset = preset
    # An accelerator recipe: bfloat16 matmuls (parameters, LayerNorm, softmax and the loss stay
    # float32). `runlocal` goes back to float32, which a CPU computes faster.
    c.model.compute_dtype = "bfloat16"
    c.model.pretrained = "models/clip_" + preset.lower().replace("vit-", "").replace("-", "")  # models/clip_b32
    if method == "clip_ft":
        c.e2.enabled = False
        c.stages = ("finetune",)
        c.finetune.epochs = 25
    return c


def fashion_recipe(preset: str, method: str, arg: str | None) -> ml_collections.ConfigDict:
    """`paper_recipe` on FashionGen or AmazonFashion (`dataset=`), with one of the paper's
    ablations (`ablation=`), or shrunk to a CPU smoke run (`runlocal`)."""
    options = parse_arg(arg, dataset="fashion_gen", ablation="none", runlocal=False)
    c = paper_recipe(preset, method)
    if options.dataset == "amazon_fashion":
        c.data.dataset, c.data.eval_split = "amazon_fashion", "test"
        c.data.text_format, c.e2.groups = AMAZON_TEXT, (group("brand", tag_length=24),)
        c.eval.description_format, c.eval.sample_field = "{title}", ""  # no sub-category in AmazonFashion
    elif options.dataset != "fashion_gen":
        raise ConfigError(f"dataset must be fashion_gen or amazon_fashion, got {options.dataset!r}")
    apply_ablation(c, options.ablation)
    if options.runlocal:
        runlocal(c)
    return c


def apply_ablation(c: ml_collections.ConfigDict, ablation: str) -> None:
    """One of the paper's ablations (`ABLATIONS`) applied to an E² config whose stages are
    `warmup` (E²'s new parameters) then `finetune` (all parameters)."""
    if ablation not in ABLATIONS:
        raise ConfigError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    if ablation == "no_fusion":
        c.e2.fusion = False
    elif ablation == "no_selection_tokens":
        c.e2.enabled, c.stages = False, ("finetune",)
    elif ablation == "no_region_loss":
        c.loss.region_weight = 0.0
    elif ablation == "paper_groups":
        c.e2.groups = PAPER_GROUPS
    elif ablation == "no_warmup":
        c.stages = ("finetune",)
    elif ablation.startswith("without_"):
        c.e2.groups = without(c.e2.groups, ablation[len("without_"):])


def runlocal(c: ml_collections.ConfigDict) -> None:
    """Any config, shrunk to a run of a few steps on a CPU (tiny random model, SynthFashion/tiny)."""
    c.model.preset, c.model.pretrained, c.model.overrides = "tiny", "", {}
    c.model.compute_dtype = "float32"
    c.data.dataset, c.data.eval_split, c.data.build_if_missing = "synth_fashion/tiny", "validation", True
    if c.data.text_format == AMAZON_TEXT:  # SynthFashion has FashionGen's fields
        c.data.text_format, c.e2.groups = FASHIONGEN_TEXT, (group("brand", tag_length=24),)
        c.eval.description_format, c.eval.sample_field = "{description}", "subcategory"
    for name in c.stages:
        c[name].epochs, c[name].steps = 0.0, 4
    c.batch_size, c.eval.batch_size, c.log_every_steps = 16, 16, 1
    c.eval.sample_negatives = 8  # SynthFashion/tiny has 16 validation products
    c.optim.warmup_steps = 2


def config_module(path: str | os.PathLike) -> types.ModuleType:
    """A config file (`configs/*.py`) as a module, as `--config` loads it, for code that needs
    its constants too (benchmarks/synth_study.py needs the study's variants)."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or spec.loader is None:
        raise MissingError(f"no config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _upgrade(data: dict) -> dict:
    """A config.json written before lists became tuples (e2_jax of 2026-11): comma strings
    split, `e2.tokens_per_group` and `data.tag_lengths` folded into the groups."""
    data = json.loads(json.dumps(data))
    split = lambda text: tuple(part.strip() for part in text.split(",") if part.strip())
    for path in (("stages",), ("eval", "protocols"), ("eval", "texts"), ("e2", "fusion_layers")):
        *parents, key = path
        node = data
        for part in parents:
            node = node.get(part, {})
        if isinstance(node.get(key), str):
            node[key] = split(node[key])
            if key == "fusion_layers":
                node[key] = tuple(int(x) for x in node[key])
    e2, data_config = data.get("e2", {}), data.get("data", {})
    if isinstance(e2.get("groups"), str):
        lengths = {name: int(length) for name, _, length in
                   (item.partition(":") for item in split(data_config.pop("tag_lengths", "")))}
        tokens = e2.pop("tokens_per_group", 2)
        e2["groups"] = tuple(group(name, tokens, lengths.get(name, 0)) for name in split(e2["groups"]))
    return data


def from_json(text: str) -> ml_collections.ConfigDict:
    """The config a run wrote to its workdir (`config.json`), checked against `base()`: a field
    the schema lacks (other than a stage listed in `stages`) is an error. Workdirs written
    before lists became tuples are read too."""
    data = _upgrade(json.loads(text))
    c = base()
    stages = tuple(data.get("stages", c.stages))

    def assign(node: ml_collections.ConfigDict, values: dict, path: str) -> None:
        for key, value in values.items():
            where = f"{path}{key}"
            if key not in node:
                if path == "" and key in stages and isinstance(value, dict):
                    with node.unlocked():
                        node[key] = stage(**value)
                    continue
                raise KeyError(f"config field {where} is not in e2_jax.config.base(); was this workdir written by "
                               "another version of e2_jax?")
            if key == "overrides":
                with node.unlocked():
                    node[key] = ml_collections.ConfigDict(value)
            elif isinstance(node[key], ml_collections.ConfigDict):
                assign(node[key], value, where + ".")
            elif isinstance(node[key], tuple):
                node[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            else:
                node[key] = value

    assign(c, data, "")
    return c
