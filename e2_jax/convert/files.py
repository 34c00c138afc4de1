"""Reading and writing checkpoint files: PyTorch (OpenAI TorchScript archives, open_clip state
dicts as .pt/.bin/.safetensors, Hugging Face folders, the E² authors') into the Flax tree
(`e2_jax.convert.layout`), and e2_jax model directories back out to them."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from e2_jax import pretrained
from e2_jax.convert.layout import (
    AUTHORS_TOKEN,
    AUTHORS_UNUSED,
    OPENAI_METADATA,
    ConversionError,
    Shape,
    authors_e2_shapes,
    authors_e2_to_flax,
    check_keys,
    describe,
    flax_to_authors_e2,
    flax_to_openai,
    hf_config_dict,
    hf_config_fields,
    hf_shapes_to_openai,
    hf_to_openai,
    infer_config,
    is_authors_e2,
    openai_to_flax,
    openai_to_hf,
)
from e2_jax.models.clip import CLIPConfig, get_config
from e2_jax.models.e2 import E2Config


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
        if key in OPENAI_METADATA or not isinstance(value, torch.Tensor):
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
        found = sum(1 for k in shapes if AUTHORS_TOKEN.match(k))
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
        k not in AUTHORS_UNUSED and not k.startswith(("visual.token_", "visual.proj_", "visual.ln_s")))}
    config = infer_config(clip_shapes, str(path), **fields).replace(**config_overrides)
    if model is not None:
        preset = get_config(model, activation=config.activation)
        try:
            check_keys(clip_shapes, preset, f"{path} (forced to preset {model})")
        except ConversionError as e:
            raise ConversionError(f"{e}\n  the checkpoint itself looks like: {describe(config)}") from None
        if preset.architecture() != config.architecture():
            diff = {k: (v, preset.architecture()[k]) for k, v in config.architecture().items()
                    if preset.architecture()[k] != v}
            raise ConversionError(f"{path} differs from preset {model}: (checkpoint, preset) {diff}")
    if authors:
        check_keys({k: v for k, v in shapes.items() if k not in AUTHORS_UNUSED}, config, str(path),
                   authors_e2_shapes(config, e2))
    else:
        check_keys(shapes, config, str(path))
    for key in OPENAI_METADATA:
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


