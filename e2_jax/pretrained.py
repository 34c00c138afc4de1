"""A model on disk: `model.json` (its description: {"clip": the CLIP config, "e2": E²'s config
or null for a CLIP}) and `params/` (an Orbax checkpoint of the Flax parameters).

This is what `python -m e2_jax.convert` writes and what training and evaluation start from; a
training workdir describes its model with the same `model.json` (e2_jax/workdir.py).
Models converted before `model.json` (`config.json` with the CLIP config, plus `e2.json` for
E²) are still read. Directories are written atomically: into a hidden sibling first, renamed
into place only once complete, so an interrupted write never leaves a half-written model behind.
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

from e2_jax import checkpoints, storage
from e2_jax.errors import ExistsError, MissingError
from e2_jax.models.clip import CLIPConfig, param_shapes
from e2_jax.models.e2 import E2Config, init_e2_params

MODEL_FILE = "model.json"
PARAMS_DIR = "params"
# The layout before model.json: a CLIP config and, for E² models, E²'s.
LEGACY_CONFIG_FILE, LEGACY_E2_FILE = "config.json", "e2.json"


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory that becomes `path` only if the block completes.

    On any error the temporary directory is removed and `path` is left as it was.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise ExistsError(f"{path} already exists; choose another output or pass --overwrite")
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


def describe(clip: CLIPConfig, e2: E2Config | None) -> str:
    """The text of `model.json`."""
    return json.dumps({"clip": json.loads(clip.to_json()), "e2": None if e2 is None else e2.to_dict()},
                      indent=2, sort_keys=True) + "\n"


def write_description(directory: str | os.PathLike, clip: CLIPConfig, e2: E2Config | None) -> None:
    storage.write_text(storage.path(directory) / MODEL_FILE, describe(clip, e2))


def read_description(directory: str | os.PathLike) -> tuple[CLIPConfig, E2Config | None] | None:
    """(CLIP config, E² config or None) from `model.json`, or from the legacy `config.json` (+
    `e2.json`) of an older converted model; None where neither is."""
    directory = storage.path(directory)
    if (directory / MODEL_FILE).is_file():
        data = json.loads((directory / MODEL_FILE).read_text())
        return (CLIPConfig.from_json(json.dumps(data["clip"])),
                None if data.get("e2") is None else E2Config.from_dict(data["e2"]))
    legacy = directory / LEGACY_CONFIG_FILE
    if legacy.is_file() and "vision_width" in (data := json.loads(legacy.read_text())):  # not a training config
        e2_file = directory / LEGACY_E2_FILE
        return (CLIPConfig.from_json(json.dumps(data)),
                E2Config.from_dict(json.loads(e2_file.read_text())) if e2_file.is_file() else None)
    return None


def is_model(path: str | os.PathLike) -> bool:
    return read_description(path) is not None


def save(path: str | os.PathLike, config: CLIPConfig, params: dict, overwrite: bool = False,
         e2: E2Config | None = None) -> Path:
    """Writes `model.json` and the Orbax checkpoint of `params` to `path`."""
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_description(tmp, config, e2)
        checkpoints.write_tree(tmp / PARAMS_DIR, params)
    return Path(path)


def _description(path: str | os.PathLike) -> tuple[CLIPConfig, E2Config | None]:
    found = read_description(path)
    if found is None:
        raise MissingError(
            f"no {storage.path(path) / MODEL_FILE}: {path} is not a converted e2_jax model. Make one with "
            "`python -m e2_jax.convert to-flax CHECKPOINT OUT_DIR` (see docs/convert.md).")
    return found


def load_config(path: str | os.PathLike) -> CLIPConfig:
    return _description(path)[0]


def load_e2_config(path: str | os.PathLike) -> E2Config | None:
    """E²'s config of a saved E² model, None for a CLIP."""
    return _description(path)[1]


def abstract_params(clip: CLIPConfig, e2: E2Config | None) -> dict:
    """The shapes and dtypes of a model's parameters (a CLIP's where `e2` is None)."""
    if e2 is None:
        return param_shapes(clip)
    return jax.eval_shape(lambda rng: init_e2_params(clip, e2, rng), jax.random.key(0))


def load(path: str | os.PathLike, **config_overrides) -> tuple[CLIPConfig, dict]:
    """Reads a model written by `save` (CLIP or E²; `load_e2_config` tells which). Overrides
    change computation only (e.g. compute_dtype)."""
    clip, e2 = _description(path)
    clip = clip.replace(**config_overrides)
    params = checkpoints.read_tree(storage.path(path) / PARAMS_DIR, abstract_params(clip, e2))
    return clip, params


def to_numpy(params: dict) -> dict:
    return jax.tree.map(np.asarray, params)
