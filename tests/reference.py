"""The real PyTorch reference models (random weights), and both sides run the same way."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import open_clip
import torch

from e2_jax.models.clip import CLIP, CLIPConfig, l2_normalize

# A small open_clip CLIP with the real vocabulary (so real tokenized texts run through it) and
# OpenAI's head width of 64 (head counts are not visible in weights; 64 is OpenAI's rule).
SMALL_OPEN_CLIP = dict(
    embed_dim=48,
    vision_cfg=dict(image_size=64, patch_size=16, width=128, layers=2, head_width=64, mlp_ratio=4.0),
    text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2),
)


def small_open_clip(quick_gelu: bool = True, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.CLIP(**SMALL_OPEN_CLIP, quick_gelu=quick_gelu).eval()


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


@torch.no_grad()
def open_clip_outputs(model: torch.nn.Module, images: np.ndarray, tokens: np.ndarray):
    """(image embeddings, text embeddings, image->text logits), unnormalised embeddings."""
    img = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2))
    txt = model.encode_text(torch.from_numpy(tokens).long())
    logits = model.logit_scale.exp() * torch.nn.functional.normalize(img, dim=-1) @ \
        torch.nn.functional.normalize(txt, dim=-1).T
    return img.numpy(), txt.numpy(), logits.numpy()


def max_relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|: one scale-aware number per tensor."""
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def flax_outputs(config: CLIPConfig, params: dict, images: np.ndarray, tokens: np.ndarray):
    """(image embeddings, text embeddings, image->text logits), as `open_clip_outputs`."""
    model = CLIP(config)

    @jax.jit
    def run(params, images, tokens):
        img = model.apply({"params": params}, images, method=CLIP.encode_image)
        txt = model.apply({"params": params}, tokens, method=CLIP.encode_text)
        logits = jnp.exp(params["logit_scale"]) * l2_normalize(img) @ l2_normalize(txt).T
        return img, txt, logits

    return tuple(np.asarray(x) for x in run(params, images, tokens))


def assert_parity(got, want, tolerance: float = 1e-4) -> None:
    """Embeddings and logits agree to `tolerance` max relative error, shapes equal."""
    for name, g, w in zip(("image embeddings", "text embeddings", "logits"), got, want, strict=True):
        assert g.shape == w.shape, name
        err = max_relative_error(g, w)
        assert err <= tolerance, f"{name}: max relative error {err:.2e}"
