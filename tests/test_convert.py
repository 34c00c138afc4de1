"""Conversion in and out: OpenAI TorchScript, open_clip state dicts, HF folders, and bad input."""

from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from e2_jax import convert, pretrained
from e2_jax.data.tokenizer import CLIPTokenizer
from e2_jax.models.clip import get_config, init_params
from tests.reference import (
    assert_parity,
    flax_outputs,
    max_relative_error,
    open_clip_outputs,
    small_open_clip,
    state_dict_numpy,
)

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def inputs():
    images = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
    tokens = CLIPTokenizer()(["Maison Margiela", "Long sleeve cotton shirt in black. 100% cotton."])
    return images, tokens


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)


def _no_leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".partial" in p.name or ".old" in p.name]


# --- OpenAI TorchScript archives --------------------------------------------------------------


class _OpenAIArchive(torch.nn.Module):
    """A module whose state dict looks like OpenAI's released archives: OpenAI key names,
    fp16 weights, and the three metadata entries beside them."""

    def __init__(self, clip: torch.nn.Module, image_size: int) -> None:
        super().__init__()
        for name, child in clip.named_children():
            setattr(self, name, child)
        for name, param in clip.named_parameters(recurse=False):
            setattr(self, name, param)
        self.register_buffer("input_resolution", torch.tensor(image_size))
        self.register_buffer("context_length", torch.tensor(77))
        self.register_buffer("vocab_size", torch.tensor(49408))

    def forward(self, x):
        return x


def _write_openai_archive(path: Path) -> torch.nn.Module:
    model = small_open_clip()
    archive = torch.jit.trace(_OpenAIArchive(model, 64).half(), torch.zeros(1))
    archive.save(str(path))
    return model.half().float()  # the reference sees the same fp16-rounded weights


def test_openai_torchscript_archive_needs_trust_and_converts(tmp_path, inputs, capsys):
    model = _write_openai_archive(tmp_path / "ViT-tiny.pt")
    assert torch.jit.load(str(tmp_path / "ViT-tiny.pt")).state_dict()["visual.proj"].dtype == torch.float16

    out = tmp_path / "converted"
    assert convert.main(["to-flax", str(tmp_path / "ViT-tiny.pt"), str(out)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err and not out.exists()

    assert convert.main(["to-flax", str(tmp_path / "ViT-tiny.pt"), str(out), "--trust-pickle"]) == 0
    config, params = pretrained.load(out)
    assert config.activation == "quick_gelu" and config.image_size == 64 and config.vision_heads == 2
    assert params["visual"]["proj"].dtype == np.float32
    assert_parity(flax_outputs(config, params, *inputs), open_clip_outputs(model, *inputs))


def test_openai_metadata_must_agree_with_weights(tmp_path):
    model = small_open_clip()
    archive = _OpenAIArchive(model, 64)
    archive.input_resolution.fill_(224)
    torch.jit.trace(archive, torch.zeros(1)).save(str(tmp_path / "bad.pt"))
    with pytest.raises(convert.ConversionError, match="input_resolution=224 disagrees"):
        convert.load_torch_clip(tmp_path / "bad.pt", trust_pickle=True)


# --- open_clip state dicts --------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_open_clip_state_dict_needs_activation_and_converts(tmp_path, inputs, suffix):
    model = small_open_clip(quick_gelu=False)
    path = tmp_path / f"model{suffix}"
    if suffix == ".pt":
        # An open_clip training checkpoint: weights under state_dict, prefixed by DDP.
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
                   path)
    else:
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    with pytest.raises(convert.ConversionError, match="pass --activation"):
        convert.load_torch_clip(path)
    config, params = convert.load_torch_clip(path, activation="gelu")
    assert_parity(flax_outputs(config, params, *inputs), open_clip_outputs(model, *inputs))


@pytest.mark.slow
def test_round_trip_flax_open_clip_flax_is_exact(tmp_path, inputs):
    config = get_config("tiny", image_size=64, patch_size=16, vision_width=96, vision_heads=3)
    params = pretrained.to_numpy(init_params(config, jax.random.key(3)))
    pretrained.save(tmp_path / "flax", config, params)
    assert convert.main(["from-flax", str(tmp_path / "flax"), str(tmp_path / "oc.pt"), "--format",
                         "open_clip"]) == 0
    assert convert.main(["from-flax", str(tmp_path / "flax"), str(tmp_path / "oc.safetensors"),
                         "--format", "open_clip"]) == 0
    for name in ("oc.pt", "oc.safetensors"):
        _, back = convert.load_torch_clip(tmp_path / name, activation="quick_gelu",
                                          vision_heads=3)  # not width // 64: must be given
        _assert_trees_equal(back, params)

    # The exported file loads strictly into the real open_clip model and computes the same.
    model = open_clip.CLIP(
        embed_dim=64, quick_gelu=True,
        vision_cfg=dict(image_size=64, patch_size=16, width=96, layers=2, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)).eval()
    model.load_state_dict(torch.load(tmp_path / "oc.pt"), strict=True)
    assert_parity(flax_outputs(config, params, *inputs), open_clip_outputs(model, *inputs))


def test_round_trip_flax_hf_flax_is_exact(tmp_path, inputs):
    config = get_config("tiny", image_size=64, patch_size=16, vision_width=96, vision_heads=3)
    params = pretrained.to_numpy(init_params(config, jax.random.key(4)))
    pretrained.save(tmp_path / "flax", config, params)
    assert convert.main(["from-flax", str(tmp_path / "flax"), str(tmp_path / "hf"), "--format", "hf"]) == 0
    back_config, back = convert.load_torch_clip(tmp_path / "hf")
    assert back_config == config
    _assert_trees_equal(back, params)

    model, info = transformers.CLIPModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    images, tokens = inputs
    with torch.no_grad():
        out = model.eval()(input_ids=torch.from_numpy(tokens).long(),
                           pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
    got = flax_outputs(config, params, images, tokens)
    assert max_relative_error(got[2], out.logits_per_image.numpy()) <= 1e-4


def test_cli_writes_model_directory_and_refuses_to_overwrite(tmp_path, capsys):
    model = small_open_clip()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    out = tmp_path / "out"
    argv = ["to-flax", str(tmp_path / "m.pt"), str(out), "--activation", "quick_gelu"]
    assert convert.main(argv) == 0
    assert (out / "model.json").is_file() and (out / "params").is_dir()
    assert convert.main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert convert.main([*argv, "--overwrite"]) == 0
    _, params = pretrained.load(out)
    np.testing.assert_array_equal(params["visual"]["proj"], state_dict_numpy(model)["visual.proj"])
    assert _no_leftovers(tmp_path) == []


# --- bad input: a clear error and no output -----------------------------------------------------


def _convert_fails(tmp_path, capsys, *args) -> str:
    out = tmp_path / "out"
    assert convert.main(["to-flax", *map(str, args), str(out)]) == 2
    assert not out.exists() and _no_leftovers(tmp_path) == []
    return capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path, capsys, suffix):
    model = small_open_clip()
    path = tmp_path / f"m{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    err = _convert_fails(tmp_path, capsys, path, "--activation", "quick_gelu")
    assert str(path) in err and "truncated or corrupt" in err


def test_renamed_key(tmp_path, capsys):
    state = small_open_clip().state_dict()
    state["visual.ln_post.gamma"] = state.pop("visual.ln_post.weight")
    torch.save(state, tmp_path / "m.pt")
    err = _convert_fails(tmp_path, capsys, tmp_path / "m.pt", "--activation", "quick_gelu")
    assert "missing keys (1)" in err and "visual.ln_post.weight expected shape (128,)" in err
    assert "unexpected keys (1)" in err and "visual.ln_post.gamma shape (128,)" in err


def test_key_needed_for_inference_renamed(tmp_path, capsys):
    state = small_open_clip().state_dict()
    state["visual.conv.weight"] = state.pop("visual.conv1.weight")
    torch.save(state, tmp_path / "m.pt")
    err = _convert_fails(tmp_path, capsys, tmp_path / "m.pt", "--activation", "quick_gelu")
    assert "visual.conv1.weight (found 'visual.conv.weight' instead?)" in err


@pytest.mark.slow
def test_vit_l_forced_into_b16(tmp_path, capsys):
    # The real ViT-L/14 key set and shapes; zero-stride tensors keep the file a few KB.
    meta = open_clip.create_model("ViT-L-14", pretrained=None, device="meta").state_dict()
    torch.save({k: torch.zeros(()).expand(v.shape) for k, v in meta.items()}, tmp_path / "l14.pt")
    err = _convert_fails(tmp_path, capsys, tmp_path / "l14.pt", "--activation", "quick_gelu",
                         "--model", "ViT-B-16")
    assert "forced to preset ViT-B-16" in err
    assert "visual.conv1.weight: checkpoint (1024, 3, 14, 14), expected (768, 3, 16, 16)" in err
    assert "unexpected keys (144)" in err and "visual.transformer.resblocks.12.attn.in_proj_bias" in err
    assert "looks like: vision width 1024, 24 layers, patch 14, image 224" in err


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("hello")
    assert "truncated or corrupt" in _convert_fails(tmp_path, capsys, tmp_path / "notes.pt", "--activation",
                                                    "gelu")
    assert "does not exist" in _convert_fails(tmp_path, capsys, tmp_path / "missing.pt")


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    config = get_config("tiny")
    params = pretrained.to_numpy(init_params(config, jax.random.key(0)))

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pretrained.checkpoints, "write_tree", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pretrained.save(tmp_path / "m", config, params)
    assert list(tmp_path.iterdir()) == []
