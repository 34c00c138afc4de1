"""Numerical parity of the Flax CLIP with the PyTorch originals, through the real converter.

Random weights, random images, real tokenized fashion texts; float32 throughout.
"""

import numpy as np
import pytest
import torch

from e2_jax import convert
from e2_jax.data.tokenizer import CLIPTokenizer
from tests.reference import assert_parity, flax_outputs, open_clip_outputs

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

@pytest.fixture(scope="module")
def texts(fashion_corpus):
    # Short tags, a long description (truncated), an E² global text and an empty string.
    picks = [fashion_corpus[i] for i in (3, 4, 7, 39, 46, 85, 100, 101, 150, 0)]
    return CLIPTokenizer()(picks)


def _images(size: int, n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, size, size, 3)).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name, activation", [("ViT-B-32-quickgelu", "quick_gelu"), ("ViT-B-16", "gelu")])
def test_full_size_open_clip(name, activation, texts, tmp_path):
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    config, params = convert.load_torch_clip(path, activation=activation)
    assert config.activation == activation
    assert config.patch_size == int(name[6:8]) and config.vision_width == 768
    images = _images(224, n=3)
    assert_parity(flax_outputs(config, params, images, texts), open_clip_outputs(model, images, texts))


def test_hugging_face_clip_model(texts, tmp_path):
    # A small CLIPConfig; head counts deliberately not width // 64, so they must come from
    # config.json.
    hf_config = transformers.CLIPConfig(
        projection_dim=40,
        text_config=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=3, max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=72, intermediate_size=144, num_hidden_layers=3,
                           num_attention_heads=6, image_size=48, patch_size=12),
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(hf_config).eval()
    model.save_pretrained(tmp_path / "hf")
    config, params = convert.load_torch_clip(tmp_path / "hf")
    assert (config.vision_heads, config.text_heads, config.mlp_ratio) == (6, 3, 2.0)
    images = _images(48)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(texts).long(),
                    pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
        img = model.get_image_features(torch.from_numpy(images).permute(0, 3, 1, 2)).pooler_output
        txt = model.get_text_features(torch.from_numpy(texts).long()).pooler_output
    want = (img.numpy(), txt.numpy(), out.logits_per_image.numpy())
    assert_parity(flax_outputs(config, params, images, texts), want)
