"""A converted model on disk: `config.json` (the CLIP config), `e2.json` (E²'s config, for E²
models only) and `params/` (an Orbax checkpoint of the Flax parameters).

This is what `python -m e2_jax.convert` writes and what training and evaluation start from.
Directories are written atomically: into a hidden sibling first, renamed into place only once
complete, so an interrupted write never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from e2_jax import storage
from e2_jax.models.clip import CLIPConfig, param_shapes
from e2_jax.models.e2 import E2Config, init_e2_params

CONFIG_FILE = "config.json"
E2_FILE = "e2.json"
PARAMS_DIR = "params"


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory that becomes `path` only if the block completes.

    On any error the temporary directory is removed and `path` is left as it was.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another output or pass --overwrite")
    tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def save(path: str | os.PathLike, config: CLIPConfig, params: dict, overwrite: bool = False,
         e2: E2Config | None = None) -> Path:
    """Writes `config.json` (+ `e2.json`) and the Orbax checkpoint of `params` to `path`."""
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(config.to_json() + "\n")
        if e2 is not None:
            (tmp / E2_FILE).write_text(json.dumps(e2.to_dict(), indent=2, sort_keys=True) + "\n")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
        checkpointer.close()
    return Path(path)


def load_config(path: str | os.PathLike) -> CLIPConfig:
    config_file = storage.path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} not found: {path} is not a converted e2_jax model. Make one with "
            "`python -m e2_jax.convert to-flax CHECKPOINT OUT_DIR` (see docs/convert.md)."
        )
    return CLIPConfig.from_json(config_file.read_text())


def load_e2_config(path: str | os.PathLike) -> E2Config | None:
    """E²'s config of a saved E² model, None for a CLIP."""
    e2_file = storage.path(path) / E2_FILE
    return E2Config.from_dict(json.loads(e2_file.read_text())) if e2_file.is_file() else None


def load(path: str | os.PathLike, **config_overrides) -> tuple[CLIPConfig, dict]:
    """Reads a model written by `save` (CLIP or E²; `load_e2_config` tells which). Overrides
    change computation only (e.g. compute_dtype)."""
    config = load_config(path).replace(**config_overrides)
    e2 = load_e2_config(path)
    if e2 is None:
        abstract = param_shapes(config)
    else:
        abstract = jax.eval_shape(lambda rng: init_e2_params(config, e2, rng), jax.random.key(0))
    params = ocp.StandardCheckpointer().restore(storage.path(path) / PARAMS_DIR, abstract)
    return config, params


def to_numpy(params: dict) -> dict:
    return jax.tree.map(np.asarray, params)
