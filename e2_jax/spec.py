"""A run, resolved: the ConfigDict read once, at start, into the typed objects the rest of the
code takes (the CLIP and E² configs, the preprocessing, the stages, the evaluation protocols
and the mesh). Every error a user can make in a config is raised here, before anything is
compiled or any data is read; nothing downstream parses a config string.

    spec = resolve(config)                           # stages in steps; epochs need the data:
    spec = resolve(config, train_examples=len(src))  # the trainer knows the training split's size
    spec = resolve(config, stages=False).with_train_examples(len(src))  # the same, in two steps

No TensorFlow here (benchmarks/device.py resolves configs on a machine without it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax

from e2_jax import config as recipes
from e2_jax import optim, pretrained, sharding, storage
from e2_jax.data import region_texts
from e2_jax.data.preprocessing import Preprocessing
from e2_jax.errors import ConfigError, MissingError, suggest
from e2_jax.evaluation.protocols import Protocols
from e2_jax.models.clip import CLIPConfig, get_config
from e2_jax.models.e2 import E2Config, E2Model, Group

if TYPE_CHECKING:
    import ml_collections

GROUP_KEYS = ("name", "tokens", "tag_length", "field")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    start: int  # global step at which it starts
    steps: int
    lr: float
    trainable: str

    @property
    def end(self) -> int:
        return self.start + self.steps


# --- The run --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSpec:
    config: ml_collections.ConfigDict  # for plain values (batch size, optimizer, intervals)
    clip: CLIPConfig
    e2: E2Config
    pre: Preprocessing  # training batches
    stages: tuple[Stage, ...]
    protocols: Protocols  # --mode=evaluate, and after training
    validation: Protocols  # during training: full-candidate, the training's global text
    mesh: jax.sharding.Mesh
    steps_per_epoch: float  # nan: resolved without the data

    @property
    def model(self) -> E2Model:
        return E2Model(self.clip, self.e2)

    @property
    def region_loss(self) -> bool:
        """Whether the loss has its region term (E² with selection tokens and a region weight)."""
        return _region_loss(self.config, self.e2)

    def shardings(self, abstract: Any) -> Any:
        """The shardings `config.sharding_rules` give the leaves of `abstract` on the mesh."""
        return sharding.tree_shardings(abstract, self.mesh, self.config.sharding_rules)

    def abstract_params(self) -> Any:
        """The parameters' shapes, dtypes and shardings on the mesh: what restoring them takes."""
        abstract = pretrained.abstract_params(self.clip, self.e2)
        return sharding.with_shardings(abstract, self.shardings(abstract))

    def with_train_examples(self, count: int) -> RunSpec:
        """This spec with its stages in steps, given the training split's size (stages given in
        epochs need it; the rest of the spec does not, so nothing else is resolved again)."""
        steps_per_epoch = count / self.config.batch_size
        return dataclasses.replace(self, stages=_stages(self.config, steps_per_epoch), steps_per_epoch=steps_per_epoch)

    def stage_at(self, step: int) -> int:
        """Index of the stage that step `step` (the next one to run) belongs to."""
        return next((i for i, s in enumerate(self.stages) if step < s.end), len(self.stages))


def _region_loss(config: ml_collections.ConfigDict, e2: E2Config) -> bool:
    return e2.selection_tokens and config.loss.region_weight > 0


def groups(config: ml_collections.ConfigDict, context_length: int) -> tuple[tuple[Group, int], ...]:
    """((model group, tag length), ...) of `e2.groups`, each a `config.group(...)` entry."""
    out = []
    for i, entry in enumerate(config.e2.groups):
        entry = dict(entry)
        unknown = sorted(set(entry) - set(GROUP_KEYS))
        if unknown or "name" not in entry:
            raise ConfigError(f"e2.groups[{i}] = {entry}: a group has the keys {GROUP_KEYS} (name required; "
                             f"unknown: {unknown}); write it with e2_jax.config.group(name, tokens, tag_length, field)")
        length = int(entry.get("tag_length", 0)) or context_length
        if not 2 <= length <= context_length:
            raise ConfigError(f"e2.groups[{i}] ({entry['name']}): tag_length {length} must be from 2 to the model's "
                             f"context length {context_length}")
        out.append((Group(entry["name"], int(entry.get("tokens", 2)), entry.get("field", "")), length))
    return tuple(out)


def model_configs(config: ml_collections.ConfigDict) -> tuple[CLIPConfig, E2Config]:
    overrides = dict(config.model.overrides)
    if config.model.pretrained:
        clip = pretrained.load_config(pretrained_path(config)).replace(**overrides)
    else:
        clip = get_config(config.model.preset, **overrides)
    clip = clip.replace(compute_dtype=config.model.compute_dtype, remat=config.model.remat,
                        attention=config.model.attention)
    e = config.e2
    fusion_layers = tuple(int(x) for x in e.fusion_layers) or None
    e2 = E2Config(groups=tuple(g for g, _ in groups(config, clip.context_length)), fusion_layers=fusion_layers,
                  gumbel_tau=e.gumbel_tau, gumbel_tau_end=e.gumbel_tau_end, fusion=e.fusion, selection_tokens=e.enabled,
                  eval_gumbel_noise=e.eval_gumbel_noise, reference_quirks=e.reference_quirks,
                  proj_cls_from_clip=e.proj_cls_from_clip, selection_sees_patches=e.selection_sees_patches,
                  soft_pick_until=e.soft_pick_until, drop_patches=e.drop_patches,
                  pick_embeddings=config.loss.pick_weight > 0)
    return clip, e2


def pretrained_path(config: ml_collections.ConfigDict) -> Any:
    path = storage.path(config.model.pretrained)
    if not pretrained.is_model(path):
        raise MissingError(
            f"model.pretrained: no converted CLIP at {path}. Make one from OpenAI's archive with "
            f"`python -m e2_jax.convert to-flax ViT-B-32.pt {path} --trust-pickle` (or from open_clip or Hugging "
            "Face weights, see docs/convert.md), or set --config.model.pretrained='' to start from random weights.")
    return path


def protocols(config: ml_collections.ConfigDict, validation: bool = False) -> Protocols:
    """What `config.eval` asks for; `validation`: the check during training (full-candidate,
    the training's global text)."""
    formats = {"tags": config.data.text_format, "description": config.eval.description_format}
    if validation:
        return Protocols(("full_candidate",), {"tags": formats["tags"]})
    unknown = [t for t in config.eval.texts if t not in formats]
    if unknown:
        raise ConfigError(f"eval.texts: unknown {unknown}; known: {sorted(formats)}")
    return Protocols(tuple(config.eval.protocols), {t: formats[t] for t in config.eval.texts}, config.eval.sample_field,
                     config.eval.sample_queries, config.eval.sample_negatives, config.eval.seed,
                     config.eval.sample_draw)


def _stages(config: ml_collections.ConfigDict, steps_per_epoch: float) -> tuple[Stage, ...]:
    names = tuple(config.stages)
    missing = [s for s in names if s not in config]
    if missing:
        hint = "" if not any("," in s for s in names) else \
            " (a list is a tuple: --config.stages=\"('warmup', 'finetune')\")"
        raise ConfigError(f"stages {missing} are listed in `stages` but not defined in the config{hint}")
    out, start = [], 0
    for name in names:
        s = config[name]
        if s.trainable == "e2_new" and not config.e2.enabled:
            raise ConfigError(f"stage {name} trains only E²'s new parameters, but E² is disabled (e2.enabled=False)")
        if s.steps:
            steps = s.steps
        elif math.isnan(steps_per_epoch):
            raise ConfigError(f"stage {name} is given in epochs; resolving it needs the training split's size")
        else:
            steps = math.ceil(s.epochs * steps_per_epoch)
        if steps <= 0:
            raise ConfigError(f"stage {name} has no steps: set {name}.epochs or {name}.steps")
        out.append(Stage(name, start, steps, s.lr, s.trainable))
        start += steps
    return tuple(out)


def choice(config: ml_collections.ConfigDict, name: str, known: Sequence[str]) -> None:
    """A field that takes one of `known`: the same error line for every config."""
    value = config[name.split(".")[0]][name.split(".")[1]] if "." in name else config[name]
    if value not in known:
        raise ConfigError(f"{name} must be one of {tuple(known)}, got {value!r}{suggest(str(value), known)}")


def check(config: ml_collections.ConfigDict) -> None:
    """The training config's own consistency (no devices, no data)."""
    choice(config, "data.region_texts", region_texts.MODES)
    choice(config, "optim.name", optim.OPTIMIZERS)
    for name in ("stages", "e2.groups", "e2.fusion_layers", "eval.protocols", "eval.texts"):
        node, key = (config, name) if "." not in name else (config[name.split(".")[0]], name.split(".")[1])
        if isinstance(node[key], str):
            raise ConfigError(f"{name} is a tuple, not a comma string: got {node[key]!r}")
    if config.loss.pick_weight > 0 and not (config.e2.enabled and config.e2.fusion and config.loss.region_weight > 0):
        raise ConfigError("loss.pick_weight > 0 contrasts the fusion blocks' picks with the tag texts: it needs "
                          "e2.enabled, e2.fusion and loss.region_weight > 0")


def _one_encoder(config: ml_collections.ConfigDict) -> None:
    if bool(config.encoder) == bool(config.pretrained):
        raise ConfigError("set exactly one of encoder= (a training workdir) or pretrained= (a converted CLIP), "
                          f"got encoder={config.encoder!r}, pretrained={config.pretrained!r}")


def check_decap(config: ml_collections.ConfigDict) -> None:
    """A DeCap config (`e2_jax.config.decap`), as `check` a training config's."""
    _one_encoder(config)
    choice(config, "decoder.vocabulary", recipes.DECAP_VOCABULARIES)


def check_cirevl(config: ml_collections.ConfigDict) -> None:
    """A CIReVL config (`e2_jax.config.cirevl`), as `check` a training config's."""
    _one_encoder(config)
    choice(config, "dataset", recipes.CIREVL_DATASETS)
    choice(config, "captioner.kind", recipes.CAPTIONERS)
    choice(config, "recomposer.kind", recipes.RECOMPOSERS)
    unknown = [m for m in config.methods if m not in recipes.CIREVL_METHODS]
    if isinstance(config.methods, str) or unknown:
        raise ConfigError(f"methods is a tuple of {recipes.CIREVL_METHODS}, got {config.methods!r}")
    needs = {"chat": {"url": "the API root, e.g. http://127.0.0.1:8000/v1", "model": "the name the server serves"},
             "hf": {"hf_model": "a local model folder or a cached hub name"}}.get(config.recomposer.kind, {})
    if missing := [n for n in needs if not config.recomposer[n]]:
        raise ConfigError(f"the {config.recomposer.kind} recomposer needs {' and '.join(f'{n}=' for n in needs)} ("
                          + "; ".join(f"recomposer.{n}: {why}" for n, why in needs.items()) + f"); empty: {missing}")
    field = {"file": "captions", "decap": "decap"}[config.captioner.kind]
    if not config.captioner[field]:
        raise ConfigError(f"the {config.captioner.kind} captioner needs captioner.{field} (config argument {field}=)")


def resolve(config: ml_collections.ConfigDict, train_examples: int | None = None,
            stages: bool = True, devices: Sequence[Any] | None = None) -> RunSpec:
    """The run `config` describes. `train_examples`: the training split's size, which stages
    given in epochs need (or later: `RunSpec.with_train_examples`); `stages=False`: no stages
    (evaluation only); `devices`: the mesh's (default: all of this run's; e2_jax.compile_check
    gives a TPU slice's description)."""
    check(config)
    mesh = sharding.make_mesh(config.mesh, devices, config.get("mesh_dcn", (("data", -1),)))
    shards = sharding.num_batch_shards(mesh)
    if config.batch_size % (shards * config.accum_steps):
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by the {shards} batch shards of the mesh "
                         f"{dict(mesh.shape)} times accum_steps {config.accum_steps}")
    if config.eval.batch_size % shards:
        raise ConfigError(f"eval.batch_size {config.eval.batch_size} must be divisible by the {shards} batch shards")
    clip, e2 = model_configs(config)
    tags = tuple((g.name, g.text_field, length) for g, length in groups(config, clip.context_length)) \
        if _region_loss(config, e2) else ()
    pre = Preprocessing(image_size=clip.image_size, text_format=config.data.text_format, tags=tags,
                        context_length=clip.context_length, region_texts=config.data.region_texts)
    steps_per_epoch = train_examples / config.batch_size if train_examples is not None else float("nan")
    return RunSpec(config, clip, e2, pre, _stages(config, steps_per_epoch) if stages else (), protocols(config),
                   protocols(config, validation=True), mesh, steps_per_epoch)
