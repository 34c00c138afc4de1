"""A training stage as one jitted program over the mesh: its optimizer, the layout of its state
(parameters and optimizer state, created sharded) and its step (E2_METHOD.md section 4: the
encoders, the global and region InfoNCE over the global batch, gradients, the optimizer).

`build_stage(spec, stage)` is the one place a stage is set up: the trainer, its tests and the
benchmarks all call it. Everything a step depends on is a function of the step number (the
batch, the Gumbel noise drawn from `fold_in(seed, step)`, the learning rate), so a run resumed
from a checkpoint continues exactly. No TensorFlow here: batches come from outside
(e2_jax/data/pipeline.py for training, synthetic ones in benchmarks/device.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from e2_jax import losses, optim, pretrained, sharding
from e2_jax.models.e2 import E2Model, annealed_tau, gumbel_noise_shape, init_e2_params, pick_softness
from e2_jax.spec import RunSpec, Stage, pretrained_path

StepFn = Callable[[dict, dict], tuple[dict, dict]]


def _split(x: jax.Array, parts: int) -> jax.Array:
    """[B, ...] -> [parts, B / parts, ...], part m = rows m, m + parts, ...: every device's rows
    are spread evenly over the parts, so each part stays split over all devices."""
    return x.reshape(x.shape[0] // parts, parts, *x.shape[1:]).swapaxes(0, 1)


def _unsplit(x: jax.Array) -> jax.Array:
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def make_train_step(spec: RunSpec, stage: Stage, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> StepFn:
    """`step(state, batch) -> (state, metrics)`, not yet jitted."""
    config, model, e2, mesh = spec.config, spec.model, spec.e2, spec.mesh
    pattern = optim.trainable_pattern(stage.trainable)
    axes = sharding.batch_axes(mesh)
    batch_spec = sharding.batch_sharding(mesh)
    regions = spec.region_loss
    weights = dict(global_weight=config.loss.global_weight, region_weight=config.loss.region_weight)
    picks = regions and config.loss.pick_weight > 0  # a variant beyond the paper (docs/model.md)
    if picks:
        with_picks = lambda image, text, region_image, region_text, pick_image, scale, axis_name: losses.e2_loss(
            image, text, region_image, region_text, scale, pick_image=pick_image, pick_weight=config.loss.pick_weight,
            axis_name=axis_name, **weights)
        sharded_loss = losses.sharded(with_picks, mesh, axes, num_batch_args=5)
    elif regions:
        sharded_loss = losses.sharded(functools.partial(losses.e2_loss, **weights), mesh, axes, num_batch_args=4)
    else:  # CLIP-FT, or E² without its region loss: the global InfoNCE alone
        global_only = lambda image, text, scale, axis_name: losses.e2_loss(image, text, None, None, scale,
                                                                          axis_name=axis_name, **weights)
        sharded_loss = losses.sharded(global_only, mesh, axes, num_batch_args=2)
    noisy = e2.selection_tokens and e2.fusion
    accum = config.accum_steps

    run_steps = max(s.end for s in spec.stages)

    def embeddings(params: dict, batch: dict, noise: jax.Array | None,
                   tau: jax.Array | None = None, softness: jax.Array | None = None) -> dict[str, jax.Array]:
        """The per-item embeddings (the region texts' are `region_text`'s)."""
        out = model.apply({"params": params}, batch["images"], True, noise, tau, softness,
                          method=E2Model.encode_image)
        emb = {"image": out.global_embedding,
               "text": model.apply({"params": params}, batch["text"], method=E2Model.encode_text)}
        if regions:
            emb["region_image"] = out.region_embeddings
        if picks:
            emb["pick_image"] = out.pick_embeddings
        return emb

    def region_text(params: dict, batch: dict) -> jax.Array:
        """[B, groups, embed]: each text-tower call of the packed region texts encoded once,
        then each item's tag gathered (e2_jax.data.region_texts)."""
        encoded = [model.apply({"params": params}, tokens, method=E2Model.encode_text)
                   for tokens in batch["region_tokens"]]
        return jnp.concatenate(encoded)[batch["region_index"]]

    def loss_of(emb: dict, logit_scale: jax.Array):
        if picks:
            return sharded_loss(emb["image"], emb["text"], emb["region_image"], emb["region_text"], emb["pick_image"],
                                logit_scale)
        if regions:
            return sharded_loss(emb["image"], emb["text"], emb["region_image"], emb["region_text"], logit_scale)
        return sharded_loss(emb["image"], emb["text"], logit_scale)

    def step(state: dict, batch: dict) -> tuple[dict, dict]:
        trainable, frozen = optim.partition(state["params"], pattern)
        key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
        inputs = {k: batch[k] for k in ("images", "text")}
        noise, tau, softness = None, None, None
        if noisy:
            noise = jax.random.gumbel(key, gumbel_noise_shape(spec.clip, e2, batch["images"].shape[0]))
            noise = jax.lax.with_sharding_constraint(noise, batch_spec)
            tau = annealed_tau(e2, state["step"], run_steps)
            softness = pick_softness(e2, state["step"], run_steps)
        embed = functools.partial(embeddings, tau=tau, softness=softness)
        whole = (lambda params: region_text(params, batch)) if regions else None

        def total(t, emb):
            return loss_of(emb, optim.merge(t, frozen)["logit_scale"])

        def one_pass(t):
            params = optim.merge(t, frozen)
            emb = embed(params, inputs, noise)
            if whole is not None:
                emb["region_text"] = whole(params)
            return total(t, emb)

        if accum == 1:
            (loss, metrics), grads = jax.value_and_grad(one_pass, has_aux=True)(trainable)
        else:
            loss, metrics, grads = _gradcache(trainable, frozen, inputs, noise, accum, embed, whole, total,
                                              batch_spec)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state["step"] - stage.start)}
        if tau is not None:
            metrics["gumbel_tau"] = tau
        if softness is not None:
            metrics["pick_softness"] = softness
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


def initial_params(spec: RunSpec) -> dict:
    """The first stage's starting point: converted CLIP weights plus E²'s new parameters, or a
    random initialisation; created sharded."""
    out = spec.shardings(pretrained.abstract_params(spec.clip, spec.e2))
    clip_params = None
    if spec.config.model.pretrained:
        _, clip_params = pretrained.load(pretrained_path(spec.config))
        clip_params = jax.tree.map(np.asarray, clip_params)
    init = jax.jit(lambda r, c: init_e2_params(spec.clip, spec.e2, r, c), out_shardings=out)
    return init(jax.random.key(spec.config.seed), clip_params)


def stage_optimizer(spec: RunSpec, stage: Stage) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = spec.config.optim
    schedule = optim.schedule(stage.lr, o.warmup_steps, stage.steps)
    tx = optim.optimizer(o.name, schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                         grad_clip=o.grad_clip or None)
    return tx, schedule


@dataclasses.dataclass(frozen=True)
class StageProgram:
    stage: Stage
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: Any  # with shardings: what a checkpoint restores into
    shardings: Any
    step: Any  # jax.jit(step(state, batch) -> (state, metrics)), the state donated

    def new_state(self, params: dict) -> dict:
        """The stage's first state: `params`, a fresh optimizer state, the stage's first step."""
        pattern = optim.trainable_pattern(self.stage.trainable)

        def make(p):
            return {"step": jnp.asarray(self.stage.start, jnp.int32), "params": p,
                    "opt_state": self.tx.init(optim.partition(p, pattern)[0])}

        return jax.jit(make, out_shardings=self.shardings)(params)


def build_stage(spec: RunSpec, stage: Stage, tx: optax.GradientTransformation | None = None,
                schedule: optax.Schedule | None = None,
                wrap: Callable[[StepFn], StepFn] | None = None) -> StageProgram:
    """A stage's optimizer (the config's, unless `tx`/`schedule` are given), state layout and
    jitted step: what the trainer runs, and what its tests and the benchmarks run too. `wrap`
    changes the step function before it is jitted (the tests inject faults with it)."""
    if tx is None:
        tx, schedule = stage_optimizer(spec, stage)
    pattern = optim.trainable_pattern(stage.trainable)

    def make(p):
        return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(optim.partition(p, pattern)[0])}

    abstract = jax.eval_shape(make, pretrained.abstract_params(spec.clip, spec.e2))
    shardings = spec.shardings(abstract)
    step = make_train_step(spec, stage, tx, schedule)
    step = jax.jit(step if wrap is None else wrap(step), donate_argnums=0, out_shardings=(shardings, None))
    return StageProgram(stage, tx, schedule, sharding.with_shardings(abstract, shardings), shardings, step)
