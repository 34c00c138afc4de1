"""Training and evaluation of E² (and CLIP-FT) on any mesh: one jitted step over global arrays.

A run is a list of stages (E2_METHOD.md section 4: a warm-up that trains only E²'s new
parameters, then everything), each with its own optimizer over its own trainable parameters.
Everything a step depends on is a function of the step number: the batch (the input
pipeline), the Gumbel noise (drawn from `fold_in(seed, step)` for the whole global batch) and
the learning rate; so resuming from a checkpoint of (step, parameters, optimizer state)
continues exactly as an uninterrupted run would.

Order of a run (the resume order, big_vision style): the latest checkpoint in the workdir;
else the stage's start: the previous stage's best parameters (by validation SumR), or for the
first stage converted CLIP weights (`model.pretrained`) with E²'s new parameters drawn, or a
random initialisation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import string
import threading
import time
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from e2_jax import evaluate, losses, optim, pretrained, sharding, storage
from e2_jax.checkpoints import Checkpoints
from e2_jax.data import region_texts
from e2_jax.data.preprocessing import Preprocessing
from e2_jax.metrics import Progress, Writer, peak_flops, step_flops
from e2_jax.models.clip import CLIPConfig, get_config
from e2_jax.models.e2 import E2Config, E2Model, Group, gumbel_noise_shape, init_e2_params

# The step builds without TensorFlow or ml_collections (benchmarks/device.py runs it on a machine
# without them, on synthetic batches): the input pipeline is imported where data is read.
if TYPE_CHECKING:
    import ml_collections

    from e2_jax.data import pipeline

MODES = ("train", "evaluate", "train_and_evaluate")


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


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss); the message says where and what is left."""


# --- Everything that can be checked before compiling ----------------------------------------------


@dataclasses.dataclass
class Setup:
    config: ml_collections.ConfigDict
    workdir: epath.Path  # local or a bucket (storage.path)
    mesh: jax.sharding.Mesh
    clip: CLIPConfig
    e2: E2Config
    model: E2Model
    pre: Preprocessing
    train_source: pipeline.Source | None  # None: prepared without data (synthetic batches)
    eval_source: pipeline.Source | None
    stages: list[Stage]
    steps_per_epoch: float


def model_configs(config: ml_collections.ConfigDict) -> tuple[CLIPConfig, E2Config]:
    overrides = dict(config.model.overrides)
    if config.model.pretrained:
        clip = pretrained.load_config(_pretrained_path(config)).replace(**overrides)
    else:
        clip = get_config(config.model.preset, **overrides)
    clip = clip.replace(compute_dtype=config.model.compute_dtype, remat=config.model.remat,
                        attention=config.model.attention)
    e = config.e2
    groups = tuple(Group(name.strip(), e.tokens_per_group) for name in e.groups.split(",") if name.strip())
    fusion_layers = tuple(int(x) for x in e.fusion_layers.split(",")) if e.fusion_layers else None
    e2 = E2Config(groups=groups, fusion_layers=fusion_layers, gumbel_tau=e.gumbel_tau, fusion=e.fusion,
                  selection_tokens=e.enabled, eval_gumbel_noise=e.eval_gumbel_noise,
                  reference_quirks=e.reference_quirks, proj_cls_from_clip=e.proj_cls_from_clip)
    return clip, e2


def _pretrained_path(config: ml_collections.ConfigDict) -> epath.Path:
    path = storage.path(config.model.pretrained)
    if not (path / pretrained.CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"model.pretrained: no converted CLIP at {path}. Make one from OpenAI's archive with "
            f"`python -m e2_jax.convert to-flax ViT-B-32.pt {path} --trust-pickle` (or from open_clip or Hugging "
            "Face weights, see docs/convert.md), or set --config.model.pretrained='' to start from random weights.")
    return path


def _tag_lengths(spec: str) -> dict[str, int]:
    out = {}
    for item in filter(None, spec.split(",")):
        name, _, length = item.partition(":")
        out[name.strip()] = int(length)
    return out


def prepare(config: ml_collections.ConfigDict, workdir: str | os.PathLike, open_data: bool = True) -> Setup:
    """Checks the config and opens the data: every error a user can make is raised here, before
    anything is compiled. `open_data=False`: no dataset (and no TensorFlow); stages need
    `steps`, and batches come from elsewhere (benchmarks/device.py)."""
    stage_names = [s.strip() for s in config.stages.split(",") if s.strip()]
    missing = [s for s in stage_names if s not in config]
    if missing:
        raise ValueError(f"stages {missing} are listed in `stages` but not defined in the config")
    for name in stage_names:
        trainable = config[name].trainable
        if trainable == "e2_new" and not config.e2.enabled:
            raise ValueError(f"stage {name} trains only E²'s new parameters, but E² is disabled (e2.enabled=False)")
    if config.data.region_texts not in region_texts.MODES:
        raise ValueError(f"data.region_texts must be one of {region_texts.MODES}, got {config.data.region_texts!r}")
    if config.optim.name not in optim.OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {optim.OPTIMIZERS}, got {config.optim.name!r}")
    mesh = sharding.make_mesh(config.mesh)
    shards = sharding.num_batch_shards(mesh)
    if config.batch_size % (shards * config.accum_steps):
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {shards} batch shards of the mesh "
                         f"{dict(mesh.shape)} times accum_steps {config.accum_steps}")
    if config.eval.batch_size % shards:
        raise ValueError(f"eval.batch_size {config.eval.batch_size} must be divisible by the {shards} batch shards")
    clip, e2 = model_configs(config)
    lengths = _tag_lengths(config.data.tag_lengths)
    tags = tuple((g.name, g.text_field, lengths.get(g.name, clip.context_length)) for g in e2.groups) \
        if e2.selection_tokens and config.loss.region_weight > 0 else ()
    pre = Preprocessing(image_size=clip.image_size, text_format=config.data.text_format, tags=tags,
                        context_length=clip.context_length, region_texts=config.data.region_texts)
    train_source = eval_source = None
    steps_per_epoch = float("nan")
    if open_data:
        train_source, eval_source = _open_data(config, pre, shards)
        steps_per_epoch = len(train_source) / config.batch_size
    stages, start = [], 0
    for name in stage_names:
        s = config[name]
        steps = s.steps or (math.ceil(s.epochs * steps_per_epoch) if open_data else 0)
        if steps <= 0:
            raise ValueError(f"stage {name} has no steps: set {name}.epochs or {name}.steps")
        stages.append(Stage(name, start, steps, s.lr, s.trainable))
        start += steps
    return Setup(config, storage.path(workdir), mesh, clip, e2, E2Model(clip, e2), pre, train_source, eval_source,
                 stages, steps_per_epoch)


def _open_data(config: ml_collections.ConfigDict, pre: Preprocessing, shards: int):
    """(train source, eval source or None), checked against what the config reads."""
    from e2_jax.data import pipeline

    data_dir = config.data.data_dir or None
    if config.data.build_if_missing:
        _build_if_missing(config.data.dataset, data_dir)
    train_source = pipeline.Source(config.data.dataset, config.data.train_split, data_dir)
    eval_source = pipeline.Source(config.data.dataset, config.data.eval_split, data_dir) \
        if config.data.eval_split else None
    # Open the pipeline once: a text field the format or a tag names and the data lacks fails here.
    pipeline.local_train_batches(train_source, pre, global_batch=shards, rows=range(1)).close()
    protocols = eval_protocols(config)  # unknown protocols or texts fail here
    if eval_source is not None:
        fields = [name for f in protocols.texts.values() for _, name, _, _ in string.Formatter().parse(f) if name]
        if "sample_100" in protocols.protocols and protocols.sample_field:
            fields.append(protocols.sample_field)
        lacking = sorted({f for f in fields if f not in eval_source.features.keys()})
        if lacking:
            have = sorted(eval_source.features.keys())
            raise ValueError(f"{config.data.dataset}/{config.data.eval_split} has no field {lacking} that the "
                             f"evaluation texts or eval.sample_field name; it has {have}")
    return train_source, eval_source


def _build_if_missing(dataset: str, data_dir: str | None) -> None:
    import tensorflow_datasets as tfds

    import e2_jax.data.builders  # noqa: F401

    if not dataset.startswith("synth_fashion"):
        return  # the others need files only the user can provide: Source says how
    if jax.process_index() == 0 and not tfds.builder(dataset, data_dir=data_dir).is_prepared():
        from e2_jax.data.build import build

        logging.info("building %s (no download)", dataset)
        build(dataset, data_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"built {dataset}")


# --- The step ----------------------------------------------------------------------------------


def _split(x: jax.Array, parts: int) -> jax.Array:
    """[B, ...] -> [parts, B / parts, ...], part m = rows m, m + parts, ...: every device's rows
    are spread evenly over the parts, so each part stays split over all devices."""
    return x.reshape(x.shape[0] // parts, parts, *x.shape[1:]).swapaxes(0, 1)


def _unsplit(x: jax.Array) -> jax.Array:
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def make_train_step(setup: Setup, stage: Stage, tx: optax.GradientTransformation, schedule: optax.Schedule):
    """`step(state, batch) -> (state, metrics)`, not yet jitted."""
    config, model, e2, mesh = setup.config, setup.model, setup.e2, setup.mesh
    pattern = optim.trainable_pattern(stage.trainable)
    axes = sharding.batch_axes(mesh)
    batch_spec = sharding.batch_sharding(mesh)
    regions = e2.selection_tokens and config.loss.region_weight > 0
    weights = dict(global_weight=config.loss.global_weight, region_weight=config.loss.region_weight)
    if regions:
        sharded_loss = losses.sharded(functools.partial(losses.e2_loss, **weights), mesh, axes, num_batch_args=4)
    else:  # CLIP-FT, or E² without its region loss: the global InfoNCE alone
        global_only = lambda image, text, scale, axis_name: losses.e2_loss(image, text, None, None, scale,
                                                                          axis_name=axis_name, **weights)
        sharded_loss = losses.sharded(global_only, mesh, axes, num_batch_args=2)
    noisy = e2.selection_tokens and e2.fusion
    accum = config.accum_steps

    def embeddings(params: dict, batch: dict, noise: jax.Array | None) -> dict[str, jax.Array]:
        """The per-item embeddings (the region texts' are `region_text`'s)."""
        out = model.apply({"params": params}, batch["images"], True, noise, method=E2Model.encode_image)
        emb = {"image": out.global_embedding,
               "text": model.apply({"params": params}, batch["text"], method=E2Model.encode_text)}
        if regions:
            emb["region_image"] = out.region_embeddings
        return emb

    def region_text(params: dict, batch: dict) -> jax.Array:
        """[B, groups, embed]: each text-tower call of the packed region texts encoded once,
        then each item's tag gathered (e2_jax.data.region_texts)."""
        encoded = [model.apply({"params": params}, tokens, method=E2Model.encode_text)
                   for tokens in batch["region_tokens"]]
        return jnp.concatenate(encoded)[batch["region_index"]]

    def loss_of(emb: dict, logit_scale: jax.Array):
        if regions:
            return sharded_loss(emb["image"], emb["text"], emb["region_image"], emb["region_text"], logit_scale)
        return sharded_loss(emb["image"], emb["text"], logit_scale)

    def step(state: dict, batch: dict) -> tuple[dict, dict]:
        trainable, frozen = optim.partition(state["params"], pattern)
        key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
        inputs = {k: batch[k] for k in ("images", "text")}
        noise = None
        if noisy:
            noise = jax.random.gumbel(key, gumbel_noise_shape(setup.clip, e2, batch["images"].shape[0]))
            noise = jax.lax.with_sharding_constraint(noise, batch_spec)
        poison = jnp.where(state["step"] == config.debug.nan_at_step, jnp.nan, 1.0)  # a test's NaN
        whole = (lambda params: region_text(params, batch)) if regions else None

        def total(t, emb):
            loss, metrics = loss_of(emb, optim.merge(t, frozen)["logit_scale"])
            return loss * poison, metrics

        def one_pass(t):
            params = optim.merge(t, frozen)
            emb = embeddings(params, inputs, noise)
            if whole is not None:
                emb["region_text"] = whole(params)
            return total(t, emb)

        if accum == 1:
            (loss, metrics), grads = jax.value_and_grad(one_pass, has_aux=True)(trainable)
        else:
            loss, metrics, grads = _gradcache(trainable, frozen, inputs, noise, accum, embeddings, whole, total,
                                              batch_spec)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state["step"] - stage.start)}
        return {"step": state["step"] + 1, "params": optim.merge(trainable, frozen), "opt_state": opt_state}, metrics

    return step


def _gradcache(trainable, frozen, inputs, noise, accum, embeddings, whole, total, batch_spec):
    """Gradient accumulation that keeps the contrastive batch whole (GradCache, Gao et al. 2021):
    embed every micro-batch without gradients, take the loss and its gradient with respect to
    the embeddings on the whole batch, then back-propagate each micro-batch's share of that
    gradient through its own forward pass. Same loss and gradients as one big batch; activation
    memory of one micro-batch. `whole(params)`: embeddings not split into micro-batches (the
    packed region texts, a few short rows), back-propagated in one piece."""
    micro = jax.tree.map(lambda x: _split(x, accum), inputs)
    micro_noise = None if noise is None else _split(noise, accum)
    constrain = lambda tree: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_spec), tree)

    def embed(t, part, part_noise):
        return embeddings(optim.merge(t, frozen), constrain(part), part_noise)

    parts = jax.lax.map(lambda xs: embed(trainable, *xs), (micro, micro_noise))
    emb = jax.tree.map(_unsplit, parts)
    if whole is not None:
        emb["region_text"], whole_vjp = jax.vjp(lambda t: whole(optim.merge(t, frozen)), trainable)
    (loss, metrics), (emb_grads, direct) = jax.value_and_grad(
        lambda emb, t: total(t, emb), argnums=(0, 1), has_aux=True)(emb, trainable)
    if whole is not None:
        direct = jax.tree.map(jnp.add, direct, whole_vjp(emb_grads.pop("region_text"))[0])
    emb_grads = jax.tree.map(lambda g: _split(g, accum), emb_grads)

    def backward(acc, xs):
        part, part_noise, part_grads = xs
        _, vjp = jax.vjp(lambda t: embed(t, part, part_noise), trainable)
        return jax.tree.map(jnp.add, acc, vjp(part_grads)[0]), None

    grads, _ = jax.lax.scan(backward, direct, (micro, micro_noise, emb_grads))
    return loss, metrics, grads


# --- Parameters and state ----------------------------------------------------------------------


def _abstract_params(setup: Setup) -> Any:
    return jax.eval_shape(lambda r: init_e2_params(setup.clip, setup.e2, r), jax.random.key(0))


def _shardings(setup: Setup, abstract: Any) -> Any:
    return sharding.tree_shardings(abstract, setup.mesh, setup.config.sharding_rules)


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _sharded_abstract_params(setup: Setup) -> Any:
    abstract = _abstract_params(setup)
    return _with_shardings(abstract, _shardings(setup, abstract))


def initial_params(setup: Setup) -> dict:
    """The first stage's starting point: converted CLIP weights plus E²'s new parameters, or a
    random initialisation; created sharded."""
    abstract = _abstract_params(setup)
    out = _shardings(setup, abstract)
    clip_params = None
    if setup.config.model.pretrained:
        _, clip_params = pretrained.load(_pretrained_path(setup.config))
        clip_params = jax.tree.map(np.asarray, clip_params)
    init = jax.jit(lambda r, c: init_e2_params(setup.clip, setup.e2, r, c), out_shardings=out)
    return init(jax.random.key(setup.config.seed), clip_params)


def stage_optimizer(setup: Setup, stage: Stage) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = setup.config.optim
    schedule = optim.schedule(stage.lr, o.warmup_steps, stage.steps)
    tx = optim.optimizer(o.name, schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                         grad_clip=o.grad_clip or None)
    return tx, schedule


def state_shardings(setup: Setup, stage: Stage, tx: optax.GradientTransformation) -> tuple[Any, Any]:
    """(abstract state with shardings, shardings) of the stage's training state."""
    pattern = optim.trainable_pattern(stage.trainable)
    params = _abstract_params(setup)

    def make(p):
        return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(optim.partition(p, pattern)[0])}

    abstract = jax.eval_shape(make, params)
    shardings = _shardings(setup, abstract)
    return _with_shardings(abstract, shardings), shardings


@dataclasses.dataclass(frozen=True)
class StageProgram:
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: Any  # with shardings: what a checkpoint restores into
    shardings: Any
    step: Any  # jax.jit(step(state, batch) -> (state, metrics)), the state donated


def build_stage(setup: Setup, stage: Stage, tx: optax.GradientTransformation | None = None,
                schedule: optax.Schedule | None = None) -> StageProgram:
    """A stage's optimizer (the config's, unless `tx`/`schedule` are given), state layout and
    jitted step: what the trainer runs, and what its tests and the benchmarks run too."""
    if tx is None:
        tx, schedule = stage_optimizer(setup, stage)
    abstract_state, shardings = state_shardings(setup, stage, tx)
    step = jax.jit(make_train_step(setup, stage, tx, schedule), donate_argnums=0, out_shardings=(shardings, None))
    return StageProgram(tx, schedule, abstract_state, shardings, step)


def new_state(params: dict, stage: Stage, tx: optax.GradientTransformation, shardings: Any) -> dict:
    pattern = optim.trainable_pattern(stage.trainable)

    def make(p):
        return {"step": jnp.asarray(stage.start, jnp.int32), "params": p,
                "opt_state": tx.init(optim.partition(p, pattern)[0])}

    return jax.jit(make, out_shardings=shardings)(params)


# --- Evaluation --------------------------------------------------------------------------------


def make_embed(setup: Setup):
    """(images, texts): jitted (params, batch) -> the global image / text embeddings."""
    model, seed = setup.model, setup.config.seed

    @jax.jit
    def images(params: dict, batch: dict) -> jax.Array:
        rngs = {"gumbel": jax.random.key(seed)}  # used only with the authors' noisy evaluation
        return model.apply({"params": params}, batch["images"], False, method=E2Model.encode_image,
                           rngs=rngs).global_embedding

    @jax.jit
    def texts(params: dict, batch: dict) -> jax.Array:
        return model.apply({"params": params}, batch["text"], method=E2Model.encode_text)

    return images, texts


def eval_protocols(config: ml_collections.ConfigDict, validation: bool = False) -> evaluate.Protocols:
    """What `config.eval` asks for; `validation`: the check during training (full-candidate,
    the training's global text)."""
    formats = {"tags": config.data.text_format, "description": config.eval.description_format}
    if validation:
        return evaluate.Protocols(("full_candidate",), {"tags": formats["tags"]})
    names = [t.strip() for t in config.eval.texts.split(",") if t.strip()]
    unknown = [t for t in names if t not in formats]
    if unknown:
        raise ValueError(f"eval.texts: unknown {unknown}; known: {sorted(formats)}")
    return evaluate.Protocols(tuple(p.strip() for p in config.eval.protocols.split(",") if p.strip()),
                              {t: formats[t] for t in names}, config.eval.sample_field, config.eval.sample_queries,
                              config.eval.sample_negatives, config.eval.seed)


def evaluation_report(setup: Setup, params: dict, protocols: evaluate.Protocols, embed=None) -> dict[str, Any]:
    images, texts = embed or make_embed(setup)
    return evaluate.retrieval_report(setup.eval_source, setup.pre, protocols,
                                     embed_images=lambda b: images(params, b), embed_texts=lambda b: texts(params, b),
                                     global_batch=setup.config.eval.batch_size,
                                     sharding=sharding.batch_sharding(setup.mesh))


def run_evaluation(setup: Setup, params: dict, embed=None) -> dict[str, float]:
    """Validation during training: full-candidate retrieval (first views, the global text),
    as `i2t_r1` ... `sumr`."""
    report = evaluation_report(setup, params, eval_protocols(setup.config, validation=True), embed)
    return {k.rsplit("/", 1)[-1]: v for k, v in report["metrics"].items()}


def format_retrieval(metrics: dict[str, float]) -> str:
    both = " | ".join(f"{d.upper()} R@1/5/10 " + "/".join(f"{metrics[f'{d}_r{k}']:.1f}" for k in evaluate.KS)
                      for d in ("i2t", "t2i"))
    return f"{both} | SumR {metrics['sumr']:.1f}"


# --- Preemption --------------------------------------------------------------------------------


class _Preemption:
    """SIGTERM sets a flag (one process); several processes agree on the step through JAX's
    preemption sync point (jax.distributed's own SIGTERM notifier). `reached` must be asked
    after every step, by every process, stage ends included: the sync point is a collective
    decision, and a notice that lands on a step where it is not asked is acted on late."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# --- The run -----------------------------------------------------------------------------------


def _stage_at(stages: list[Stage], step: int) -> int:
    """Index of the stage that step `step` (the next one to run) belongs to."""
    for i, s in enumerate(stages):
        if step < s.end:
            return i
    return len(stages)


def _host_metrics(metrics: dict, groups: tuple[Group, ...]) -> dict[str, float]:
    out = {}
    for name, value in jax.device_get(metrics).items():
        if name == "loss_region":
            out.update({f"loss_region/{g.name}": float(v) for g, v in zip(groups, np.asarray(value), strict=True)})
        else:
            out[name] = float(value)
    return out


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
        mode: str = "train_and_evaluate") -> dict[str, Any]:
    """Trains (and evaluates) as `config` says, resuming from `workdir`. Returns the last
    evaluation's metrics and where things are."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    preemption = _Preemption()  # first: a SIGTERM from now on ends the run with a checkpoint
    try:
        return _run(config, workdir, mode, preemption)
    finally:
        preemption.close()


def _run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, mode: str,
         preemption: _Preemption) -> dict[str, Any]:
    setup = prepare(config, workdir)
    setup.workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (setup.workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        # The model itself, so that the workdir is usable without the weights it started from.
        model = {"clip": json.loads(setup.clip.to_json()), "e2": setup.e2.to_dict()}
        (setup.workdir / "model.json").write_text(json.dumps(model, indent=2) + "\n")
    checkpoints = Checkpoints(setup.workdir, config.checkpoint.keep)
    try:
        finished = checkpoints.latest_step() == setup.stages[-1].end
        if mode == "evaluate" or (finished and mode == "train_and_evaluate"):
            if finished and mode != "evaluate":
                logging.info("training in %s is complete; evaluating its best parameters", setup.workdir)
            return _evaluate_only(setup, checkpoints)
        return _train(setup, checkpoints, preemption, evaluate_too=mode == "train_and_evaluate")
    finally:
        checkpoints.wait()
        checkpoints.close()


def _evaluate_only(setup: Setup, checkpoints: Checkpoints) -> dict[str, Any]:
    abstract = _sharded_abstract_params(setup)
    params = None
    for stage in reversed(setup.stages):
        params = checkpoints.restore_best(stage.name, abstract)
        if params is not None:
            where = f"the best {stage.name} parameters in {setup.workdir}"
            break
    if params is None:
        step = checkpoints.latest_step()
        if step is None:
            raise FileNotFoundError(f"nothing to evaluate in {setup.workdir}: no checkpoint (train first)")
        stage = setup.stages[min(_stage_at(setup.stages, step - 1), len(setup.stages) - 1)]
        abstract_state, _ = state_shardings(setup, stage, stage_optimizer(setup, stage)[0])
        params = checkpoints.restore(step, abstract_state)["params"]
        where = f"step {step} of {setup.workdir}"
    report = evaluation_report(setup, params, eval_protocols(setup.config))
    report.update(checkpoint=str(where), dataset=setup.config.data.dataset, split=setup.config.data.eval_split)
    json_path, md_path = evaluate.write_report(report, setup.workdir / "eval")
    _selection_maps(setup, params, where)
    table = evaluate.markdown_table(report["metrics"])
    logging.info("evaluation of %s:\n%s", where, table)
    print(f"evaluation of {where} ({report['counts']}):\n{table}report: {json_path}, {md_path}", flush=True)
    first = next(iter(report["texts"]))
    validation = {k.rsplit("/", 1)[-1]: v for k, v in report["metrics"].items()
                  if k.startswith(f"full_candidate/{first}/")}
    return {"report": report, **({"eval": validation} if validation else {})}


def _selection_maps(setup: Setup, params: dict, where: str) -> None:
    """Selection maps of the first `eval.selection_maps` validation products (E² with fusion
    blocks; one process: with several, draw them afterwards with `python -m e2_jax.visualize`)."""
    count = setup.config.eval.selection_maps
    if not count or not setup.e2.selection_tokens or not setup.e2.fusion or setup.eval_source is None:
        return
    if jax.process_count() > 1:
        logging.info("selection maps are drawn by one process: run python -m e2_jax.visualize --workdir %s "
                     "--split %s", setup.workdir, setup.config.data.eval_split)
        return
    from e2_jax import visualize
    from e2_jax.inference import Encoder

    encoder = Encoder(setup.clip, setup.e2, params, source=where)
    images, names = visualize.split_images(setup.workdir, count)
    written = visualize.write_selection_maps(encoder, images, names, setup.workdir / "eval" / "selection_maps")
    logging.info("%d selection maps in %s", len(written), written[0].parent)


def _train(setup: Setup, checkpoints: Checkpoints, preemption: _Preemption, evaluate_too: bool) -> dict[str, Any]:
    config, stages = setup.config, setup.stages
    total = stages[-1].end
    latest = checkpoints.latest_step()
    start = latest or 0
    writer, progress = Writer(setup.workdir), Progress(total, start)
    embed = make_embed(setup) if evaluate_too and setup.eval_source is not None else None
    eval_every = config.eval.every_steps or max(1, round(setup.steps_per_epoch))
    result: dict[str, Any] = {"workdir": str(setup.workdir)}
    params = None
    try:
        for index in range(_stage_at(stages, start), len(stages)):
            stage = stages[index]
            program = build_stage(setup, stage)
            if latest is not None and stage.start < latest:
                state = checkpoints.restore(latest, program.abstract_state)
                logging.info("resumed from %s (step %d, stage %s)", checkpoints.path(latest), latest, stage.name)
            else:
                params = _stage_start_params(setup, checkpoints, index, params, latest)
                state = new_state(params, stage, program.tx, program.shardings)
            outcome = _train_stage(setup, stage, state, program.step, checkpoints, writer, progress, preemption,
                                   embed, eval_every, final=index == len(stages) - 1)
            result.update(outcome)
            if outcome.get("preempted"):
                return result
            params, latest = outcome.pop("params"), None
        if embed is not None:
            final_stage = stages[-1].name
            result["best"] = str(checkpoints.best_path(final_stage))
            best = checkpoints.best(final_stage)
            if best is not None:
                progress.write(f"best {final_stage}: step {best[0]}, SumR {best[1]:.1f} ({result['best']})")
        return result
    finally:
        progress.close()
        writer.close()


def _stage_start_params(setup: Setup, checkpoints: Checkpoints, index: int, params: dict | None,
                        latest: int | None) -> dict:
    """The parameters a stage starts from: the previous stage's best, else its last."""
    if index == 0:
        return initial_params(setup)
    previous = setup.stages[index - 1]
    best = checkpoints.restore_best(previous.name, _sharded_abstract_params(setup))
    if best is not None:
        logging.info("stage %s starts from the best of %s: %s", setup.stages[index].name, previous.name,
                     checkpoints.best_path(previous.name))
        return best
    if params is not None:
        return params
    tx, _ = stage_optimizer(setup, previous)  # the run stopped right at the end of the previous stage
    abstract_state, _ = state_shardings(setup, previous, tx)
    return checkpoints.restore(latest, abstract_state)["params"]


class _Reporter:
    """Step metrics, read one step late (never stalling the device): throughput and MFU over
    the steps since the last write, NaN/Inf detection, console, TensorBoard and JSON lines."""

    def __init__(self, setup: Setup, writer: Writer, progress: Progress, checkpoints: Checkpoints) -> None:
        self.setup, self.writer, self.progress, self.checkpoints = setup, writer, progress, checkpoints
        self.peak = peak_flops(jax.devices()[0], setup.config.peak_flops)
        self.pending: tuple[int, dict, float | None] | None = None
        self._flops = 0.0
        self._since, self._steps = time.perf_counter(), 0

    def push(self, step: int, metrics: dict, flops: float | None) -> None:
        """Step `step` (of `flops` per device) was dispatched: report the one before it, then keep this one."""
        self.flush()
        self.pending = (step, metrics, flops)

    def flush(self) -> None:
        if self.pending is None:
            return
        (step, metrics, flops), self.pending = self.pending, None
        values = _host_metrics(metrics, self.setup.e2.groups)  # waits for that step only
        if not math.isfinite(values["loss"]):
            self.checkpoints.wait()
            good = self.checkpoints.latest_step()
            where = (f"the last good checkpoint is {self.checkpoints.path(good)} (step {good})" if good is not None
                     else "no checkpoint was saved before it")
            raise TrainingError(f"loss is {values['loss']} at step {step}; stopping. {where}.")
        self._steps += 1
        self._flops += flops or 0.0
        seconds = (time.perf_counter() - self._since) / self._steps
        values["examples_per_second"] = self.setup.config.batch_size / seconds
        if self._flops and self.peak:
            values["mfu"] = self._flops / self._steps / seconds / self.peak
        self.progress.update(1, loss=f"{values['loss']:.3f}", ex_s=f"{values['examples_per_second']:.1f}")
        if (step + 1) % self.setup.config.log_every_steps == 0:
            self.writer.write(step + 1, values)
            self._since, self._steps, self._flops = time.perf_counter(), 0, 0.0


class _StepVariants:
    """A stage's jitted step, compiled once per shape of its batch: the packed region texts come
    in a few shapes (e2_jax/data/region_texts.py), each a variant, compiled when first met and
    named in the log."""

    def __init__(self, step_fn, stage: Stage, progress: Progress) -> None:
        self.step_fn, self.stage, self.progress = step_fn, stage, progress
        self.variants: dict[Any, tuple[Any, float | None]] = {}

    def get(self, state: dict, batch: dict) -> tuple[Any, float | None]:
        """(compiled step, its FLOPs per device) for this batch's shapes."""
        key = (jax.tree.structure(batch), tuple(x.shape for x in jax.tree.leaves(batch)))
        if key not in self.variants:
            start = time.perf_counter()
            compiled = self.step_fn.lower(state, batch).compile()
            flops = step_flops(compiled)
            regions = region_texts.describe([t.shape for t in batch.get("region_tokens", ())])
            self.variants[key] = (compiled, flops)
            self.progress.write(
                f"stage {self.stage.name}: step variant {len(self.variants)} (region texts {regions}, global rows x "
                f"tokens per call) compiled in {time.perf_counter() - start:.1f} s, "
                f"{flops / 1e9 if flops else float('nan'):.1f} GFLOPs per step per device")
        return self.variants[key]


def _train_stage(setup: Setup, stage: Stage, state: dict, step_fn, checkpoints: Checkpoints, writer: Writer,
                 progress: Progress, preemption: _Preemption, embed, eval_every: int,
                 final: bool) -> dict[str, Any]:
    config = setup.config
    first = int(jax.device_get(state["step"]))
    from e2_jax.data import pipeline

    batches = pipeline.train_batches(setup.train_source, setup.pre, global_batch=config.batch_size,
                                     sharding=sharding.batch_sharding(setup.mesh), seed=config.seed, start_step=first)
    try:
        trainable = optim.count(optim.partition(state["params"], optim.trainable_pattern(stage.trainable))[0])
        progress.write(f"stage {stage.name}: steps {stage.start}-{stage.end}, {trainable:,} trainable parameters, "
                       f"{jax.device_count()} devices, mesh {dict(setup.mesh.shape)}")
        steps = _StepVariants(step_fn, stage, progress)
        batch = next(batches)
        compiled, flops = steps.get(state, batch)
        reporter, outcome, saved = _Reporter(setup, writer, progress, checkpoints), {}, None
        for step in range(first, stage.end):
            if step > first:
                batch = next(batches)  # the batch's own (explicit) transfers happen here
                compiled, flops = steps.get(state, batch)
            # An accidental host copy into the step (an implicit transfer) fails loudly here.
            with jax.transfer_guard("disallow"):
                state, metrics = compiled(state, batch)
            reporter.push(step, metrics, flops)
            done = step + 1
            if done == config.debug.kill_during_save_at_step:
                checkpoints.save(done, state)
                os.kill(os.getpid(), signal.SIGKILL)  # a test: killed while the save is being written
            if done % config.checkpoint.every_steps == 0 or done == stage.end:
                checkpoints.save(done, state)
                saved = done
            if embed is not None and (done % eval_every == 0 or done == stage.end):
                reporter.flush()
                metrics = run_evaluation(setup, state["params"], embed)
                writer.write(done, {f"eval/{k}": v for k, v in metrics.items()})
                improved = checkpoints.save_best(stage.name, done, state["params"], metrics["sumr"])
                progress.write(f"step {done} ({stage.name}) validation: {format_retrieval(metrics)}"
                               + (" (best so far)" if improved else ""))
                outcome["eval"] = metrics
            if done == config.debug.sigterm_at_step:
                os.kill(os.getpid(), signal.SIGTERM)  # a test: the notice lands after this step
            # Asked at every step by every process (a collective); after the run's last step there
            # is nothing left to save for.
            if preemption.reached(done) and not (final and done == stage.end):
                reporter.flush()
                if saved != done:
                    checkpoints.save(done, state)
                checkpoints.wait()
                logging.info("preemption: process %d saved step %d", jax.process_index(), done)
                progress.write(f"preempted: saved step {done} to {checkpoints.path(done)}; exiting")
                return {**outcome, "preempted": True, "step": done}
        reporter.flush()
        checkpoints.wait()
        return {**outcome, "params": state["params"], "step": stage.end}
    finally:  # stop the input pipeline before it is dropped (pipeline.TrainBatches)
        batches.close()
