"""A training run on disk: what a workdir holds, and the model it trained.

    config.json              the resolved training config (e2_jax.config.from_json reads it)
    model.json               the model's description, as a converted model's (e2_jax.pretrained)
    checkpoints/<step>/      training states (e2_jax.checkpoints)
    best/<stage>/<step>/     each stage's best parameters by validation SumR
    metrics.jsonl, tensorboard/   step and validation metrics (e2_jax.metrics)
    eval/                    --mode=evaluate's report and selection maps

`trained_params` is the one "best, else latest" lookup; `load` gives a run's model and
parameters to inference, conversion, probes, tagging and captioning.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from e2_jax import config as recipes
from e2_jax import pretrained, sharding, spec, storage
from e2_jax.checkpoints import Checkpoints
from e2_jax.errors import ConfigError, MissingError, UserError
from e2_jax.models.clip import CLIPConfig
from e2_jax.models.e2 import E2Config

if TYPE_CHECKING:
    import ml_collections

CONFIG_FILE = "config.json"
EVAL_DIR = "eval"


# What a resumed run may change (docs/training.md, "What happens when..."): where and on what it
# runs, how often it reports and saves, how long its last stage is (the learning-rate schedule
# follows the new length), new stages after its last, and each stage's learning rate (to go on
# from the last good checkpoint after a divergence). Anything else would continue one run's
# state as another's.
RESUMABLE = ("eval", "checkpoint", "log_every_steps", "peak_flops", "distributed", "mesh", "mesh_dcn", "sharding_rules",
             "accum_steps", "model.remat", "model.attention", "model.pretrained", "data.data_dir",
             "data.build_if_missing", "data.region_texts")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def config_changes(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """{field: (the workdir's value, `config`'s)} for every field a resume may not change, or
    {} for a workdir that holds no config yet."""
    if not (storage.path(workdir) / CONFIG_FILE).is_file():
        return {}
    before = _flat(json.loads(read_config(workdir).to_json_best_effort()))
    now = _flat(json.loads(config.to_json_best_effort()))
    last = f"{config.stages[-1]}." if config.stages else None
    stages_before = tuple(before.get("stages") or ())
    appended = tuple(config.stages[: len(stages_before)]) == stages_before  # new stages at the end
    added = set(config.stages[len(stages_before):])
    may_change = lambda field: (any(field == r or field.startswith(r + ".") for r in RESUMABLE)
                                or (last and field in (last + "steps", last + "epochs"))
                                or field in {f"{stage}.lr" for stage in config.stages}
                                or (appended and (field == "stages" or field.split(".")[0] in added)))
    return {field: (before.get(field), now.get(field)) for field in sorted(set(before) | set(now))
            if before.get(field) != now.get(field) and not may_change(field)}


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_start(workdir: str | os.PathLike, config: ml_collections.ConfigDict, clip: CLIPConfig,
                e2: E2Config) -> None:
    """Before a run writes anything: the workdir is writable and, if it holds a run, this config
    continues that run (`config_changes`, and the same model as its model.json); else a
    `UserError` naming the fields that differ and the two ways out. Nothing is written."""
    directory = storage.path(workdir)
    changes = config_changes(directory, config)
    described = pretrained.read_description(directory) if (directory / pretrained.MODEL_FILE).exists() else None
    if described is not None and described != (clip, e2):
        changes["model (model.json)"] = ("the workdir's", "this config's (another model.pretrained?)")
    if changes:
        fields = "; ".join(f"{field}: {_short(a)} -> {_short(b)}" for field, (a, b) in changes.items())
        raise ConfigError(f"{workdir} holds a run started with another config (its {CONFIG_FILE}), and resuming "
                          f"it would change {fields}. Run with that workdir's config (--config "
                          f"configs/workdir.py:{workdir}), or give a new --workdir. "
                          f"(A resume may change only: {', '.join(RESUMABLE)}, the stages' lr, the last stage's steps, "
                          "and add stages after the last.)")
    if not storage.is_remote(workdir):  # a bucket's permissions show at the first write
        existing = Path(os.path.abspath(workdir))
        while not existing.exists():
            existing = existing.parent
        problem = ("is not a folder" if not existing.is_dir() else
                   "is not writable by this user" if not os.access(existing, os.W_OK | os.X_OK) else None)
        if problem:
            raise UserError(f"cannot write to the workdir {workdir}: {existing} {problem}; choose another --workdir")


def write_start(workdir: str | os.PathLike, config: ml_collections.ConfigDict, clip: CLIPConfig,
                e2: E2Config) -> None:
    """The config and the model's description, written when a run starts (by process 0), so that
    the workdir is usable without the weights the run started from. Call `check_start` first."""
    directory = storage.path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:  # whole or not at all: a run may be stopped at any moment of its start-up
        storage.write_text(directory / CONFIG_FILE, config.to_json_best_effort(indent=2) + "\n")
        pretrained.write_description(directory, clip, e2)


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    config_file = storage.path(workdir) / CONFIG_FILE
    if not config_file.is_file():
        raise MissingError(f"no {config_file}: {workdir} is not a training workdir (python -m e2_jax.main "
                                "writes config.json there)")
    return recipes.from_json(config_file.read_text())


def model_configs(workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None
                  ) -> tuple[CLIPConfig, E2Config]:
    """The model a run trained: its `model.json`, else (a workdir written before it) its config."""
    described = pretrained.read_description(storage.path(workdir))
    if described is not None and described[1] is not None:
        return described  # type: ignore[return-value]
    return spec.model_configs(config if config is not None else read_config(workdir))


def trained_params(checkpoints: Checkpoints, stages: tuple[str, ...], abstract_params: Any,
                   checkpoint: str = "best") -> tuple[Any, str]:
    """(parameters, where from) of a run. `checkpoint`: "best" (the best parameters of the last
    stage that kept any, else the latest step), "latest", or a step number. `abstract_params`
    carry the shardings to restore onto."""
    where = checkpoints.workdir
    if checkpoint == "best":
        for stage in reversed(stages):
            params = checkpoints.restore_best(stage, abstract_params)
            if params is not None:
                step, sumr = checkpoints.best(stage)
                return params, f"the best {stage} parameters (step {step}, validation SumR {sumr:.1f}) in {where}"
    step = checkpoints.latest_step() if checkpoint in ("best", "latest") else int(checkpoint)
    if step is None or not (checkpoints.path(step) / "state").is_dir():
        raise MissingError(f"no checkpoint {checkpoint!r} in {where} (train first)")
    return checkpoints.restore_params(step, abstract_params), f"step {step} of {where}"


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    clip: CLIPConfig
    e2: E2Config
    params: dict
    where: str  # which parameters, for reports


def load(workdir: str | os.PathLike, checkpoint: str = "best") -> TrainedModel:
    """A run's model and parameters (see `trained_params`), on this process's first device."""
    config = read_config(workdir)
    clip, e2 = model_configs(workdir, config)
    abstract = pretrained.abstract_params(clip, e2)
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = sharding.with_shardings(abstract, jax.tree.map(lambda _: here, abstract))
    checkpoints = Checkpoints(storage.path(workdir), config.checkpoint.keep)
    try:
        params, where = trained_params(checkpoints, tuple(config.stages), abstract, checkpoint)
    finally:
        checkpoints.close()
    return TrainedModel(clip, e2, params, where)
