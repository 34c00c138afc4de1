"""The real PyTorch reference models (random weights), and both sides run the same way."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import open_clip
import torch

from e2_jax.models.clip import CLIP, CLIPConfig
from e2_jax.numerics import l2_normalize

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


# --- The E² authors' PyTorch model, written from E2_METHOD.md sections 2 (with their quirks) ----

# Their code hard-wires 12 visual layers and 10 tokens; a narrow width keeps it cheap.
AUTHORS_OPEN_CLIP = dict(
    embed_dim=48,
    vision_cfg=dict(image_size=64, patch_size=16, width=128, layers=12, head_width=64),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
)


def authors_e2_state_dict(seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A random open_clip CLIP plus E²'s parameters under the authors' key names."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**AUTHORS_OPEN_CLIP, quick_gelu=True).eval()
    state = dict(model.state_dict())
    w, d = 128, 48
    scale = w**-0.5
    for i in range(1, 11):
        state[f"visual.token_{i}_embedding"] = scale * torch.randn(w)
    for suffix in ("", "2"):
        for n in "qkv":
            state[f"visual.proj_{n}{suffix}"] = scale * torch.randn(w, w)
    for name in ("proj_cls", "proj_cls_mid", *(f"proj_s{g}" for g in range(1, 6))):
        state[f"visual.{name}"] = scale * torch.randn(w, d)
    for name in ("ln_selection", *(f"ln_s{g}" for g in range(1, 6))):
        # Not the init values, so that a LayerNorm mapped to the wrong group shows.
        state[f"visual.{name}.weight"] = 1 + 0.1 * torch.randn(w)
        state[f"visual.{name}.bias"] = 0.1 * torch.randn(w)
    return model, state


def _authors_select(x, state, suffix: str, drop_patches: bool, picks):
    k = 10
    selection, cls, patches = x[:, :k], x[:, k : k + 1], x[:, k + 1 :]
    q = selection @ state[f"visual.proj_q{suffix}"]
    keys = patches @ state[f"visual.proj_k{suffix}"]
    values = patches @ state[f"visual.proj_v{suffix}"]
    logits = q @ keys.transpose(1, 2) / 768**0.5  # their literal sqrt(768)
    index = logits.argmax(-1) if picks is None else torch.from_numpy(np.array(picks)).long()
    attention = torch.nn.functional.one_hot(index, patches.shape[1]).to(x.dtype)
    selection = (attention @ values + selection) / 2
    parts = [selection, cls] if drop_patches else [selection, cls, patches]
    return torch.cat(parts, dim=1), index


@torch.no_grad()
def authors_e2_forward(model: torch.nn.Module, state: dict[str, torch.Tensor], images: np.ndarray,
                       picks: np.ndarray | None = None):
    """(global [B, D], regions [B, 5, D], picks [2, B, 10]) of the authors' forward pass.

    Without `picks`, each token takes the argmax patch (no noise); with them, the given ones.
    """
    visual = model.visual
    x = visual.conv1(torch.from_numpy(images).permute(0, 3, 1, 2))
    b, w = x.shape[:2]
    x = x.reshape(b, w, -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(b, 1, w), x], dim=1) + visual.positional_embedding
    for i in range(1, 11):  # each prepended in turn: token_10 ends up first
        x = torch.cat([state[f"visual.token_{i}_embedding"] + torch.zeros(b, 1, w), x], dim=1)
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    for block in blocks[:8]:
        x = block(x)
    x, picks_1 = _authors_select(x, state, "", False, None if picks is None else picks[0])
    for block in blocks[8:11]:
        x = block(x)
    x, picks_2 = _authors_select(x, state, "2", True, None if picks is None else picks[1])
    x = blocks[11](x)
    global_embedding = visual.ln_post(x[:, 10]) @ state["visual.proj_cls"]
    tokens = x[:, 0:9]  # their slice drops index 9
    regions = []
    for g in range(1, 6):
        ln = "ln_s4" if g == 5 else f"ln_s{g}"  # their last group uses ln_s4
        group = tokens[:, 2 * (g - 1) : 2 * g]
        normed = torch.nn.functional.layer_norm(group, (w,), state[f"visual.{ln}.weight"],
                                                state[f"visual.{ln}.bias"], eps=1e-5)
        regions.append(normed.mean(dim=1) @ state[f"visual.proj_s{g}"])
    return global_embedding.numpy(), torch.stack(regions, dim=1).numpy(), torch.stack([picks_1, picks_2]).numpy()
