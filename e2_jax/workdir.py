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
import os
from typing import TYPE_CHECKING, Any

import jax

from e2_jax import config as recipes
from e2_jax import pretrained, sharding, spec, storage
from e2_jax.checkpoints import Checkpoints
from e2_jax.models.clip import CLIPConfig
from e2_jax.models.e2 import E2Config

if TYPE_CHECKING:
    import ml_collections

CONFIG_FILE = "config.json"
EVAL_DIR = "eval"


def write_start(workdir: str | os.PathLike, config: ml_collections.ConfigDict, clip: CLIPConfig,
                e2: E2Config) -> None:
    """The config and the model's description, written when a run starts (by process 0), so that
    the workdir is usable without the weights the run started from."""
    directory = storage.path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (directory / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2) + "\n")
        pretrained.write_description(directory, clip, e2)


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    config_file = storage.path(workdir) / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"no {config_file}: {workdir} is not a training workdir (python -m e2_jax.main "
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
                return params, f"the best {stage} parameters in {where}"
    step = checkpoints.latest_step() if checkpoint in ("best", "latest") else int(checkpoint)
    if step is None or not (checkpoints.path(step) / "state").is_dir():
        raise FileNotFoundError(f"no checkpoint {checkpoint!r} in {where} (train first)")
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
