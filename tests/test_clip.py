"""The Flax CLIP itself: presets, dtypes, rematerialisation, variable text length."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2_jax.data.tokenizer import CLIPTokenizer
from e2_jax.models.clip import CLIP, CLIPConfig, count_params, get_config, init_params


@pytest.mark.parametrize("name, expected", [
    # Parameter counts of OpenAI's released models (and of open_clip's ViT-B-16).
    ("ViT-B/32", 151_277_313), ("ViT-B/16", 149_620_737), ("ViT-L/14", 427_616_513),
    ("ViT-L/14@336px", 427_944_193),
])
def test_presets_have_openai_parameter_counts(name, expected):
    assert count_params(get_config(name)) == expected


def test_unknown_preset_and_bad_config_are_clear():
    with pytest.raises(ValueError, match="unknown CLIP preset 'ViT-X'"):
        get_config("ViT-X")
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        CLIPConfig(image_size=100, patch_size=32)
    with pytest.raises(ValueError, match="activation"):
        CLIPConfig(activation="relu")


def test_config_json_round_trip():
    config = get_config("ViT-B-16", compute_dtype="bfloat16", remat=True)
    assert CLIPConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown CLIPConfig fields"):
        CLIPConfig.from_json('{"widht": 3}')


@pytest.fixture(scope="module")
def tiny():
    config = get_config("tiny")
    params = init_params(config, jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    tokens = CLIPTokenizer()(["Raf Simons", "96% cotton, 4% polyurethane.", "long sleeve shirt in black"])
    return config, params, images, tokens


def test_text_length_is_not_hard_wired(tiny):
    # Causal attention + EOT pooling: trailing padding cannot change the embedding.
    config, params, _, tokens = tiny
    model = CLIP(config)
    full = model.apply({"params": params}, tokens, method=CLIP.encode_text)
    assert np.argmax(tokens, axis=1).max() < 16
    short = model.apply({"params": params}, tokens[:, :16], method=CLIP.encode_text)
    # Equal up to float32 rounding: XLA's CPU kernels sum in an order that depends on the
    # sequence length and on the CPU (1.3e-6 apart on an AMD EPYC without AVX-512, for values of
    # order 1).
    np.testing.assert_allclose(short, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="L <= 77"):
        model.apply({"params": params}, np.zeros((1, 78), np.int32), method=CLIP.encode_text)


def test_wrong_image_shape_names_the_expected_shape(tiny):
    config, params, _, _ = tiny
    with pytest.raises(ValueError, match=r"images must be \[B, 32, 32, 3\]"):
        CLIP(config).apply({"params": params}, np.zeros((1, 64, 64, 3)), method=CLIP.encode_image)


def test_bfloat16_compute_keeps_float32_params_and_is_close(tiny):
    config, params, images, tokens = tiny
    f32 = CLIP(config).apply({"params": params}, images, tokens)
    bf16 = CLIP(config.replace(compute_dtype="bfloat16")).apply({"params": params}, images, tokens)
    assert bf16[0].dtype == jnp.bfloat16 and bf16[1].dtype == jnp.bfloat16
    for a, b in zip(f32[:2], bf16[:2], strict=True):
        np.testing.assert_allclose(np.asarray(b, np.float32), a, atol=3e-2)
    # Parameters created under a bf16 compute config are still float32.
    shapes = jax.eval_shape(lambda r: init_params(config.replace(compute_dtype="bfloat16"), r),
                            jax.random.key(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {np.dtype(np.float32)}


def test_remat_changes_nothing_but_memory(tiny):
    config, params, images, tokens = tiny

    def loss(p, cfg):
        img, txt, scale = CLIP(cfg).apply({"params": p}, images, tokens)
        logits = scale * img @ txt.T
        return -jnp.mean(jnp.diag(jax.nn.log_softmax(logits)))

    plain = jax.jit(jax.value_and_grad(lambda p: loss(p, config)))(params)
    remat = jax.jit(jax.value_and_grad(lambda p: loss(p, config.replace(remat=True))))(params)
    np.testing.assert_allclose(remat[0], plain[0], rtol=1e-6)
    # Recomputing the forward pass is a differently scheduled program: float32 rounding (a few
    # 1e-7 on gradients of order 1e-2 under the suite's -O0 CPU compiler), nothing more.
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(remat[1]), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(plain[1]))
    assert np.abs(plain[1]["visual"]["conv1"]).max() > 0


def test_forward_normalises_and_returns_scale(tiny):
    config, params, images, tokens = tiny
    img, txt, scale = CLIP(config).apply({"params": params}, images, tokens)
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=-1), 1, rtol=1e-5)
    np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)


def test_attention_kernel_choice():
    """cuDNN's fused attention only where it takes the call: an NVIDIA GPU, 16-bit inputs, a head
    dim that is a multiple of 8 up to 128, no explicit mask (the pooled row's causal mask)."""
    from e2_jax.models.clip import attention_implementation

    bf16, f32 = jnp.bfloat16, jnp.float32
    assert attention_implementation("auto", "gpu", bf16, 64, masked=False) == "cudnn"
    assert attention_implementation("auto", "cuda", jnp.float16, 128, masked=False) == "cudnn"
    for platform, dtype, head_dim, masked in (("gpu", f32, 64, False), ("gpu", bf16, 64, True),
                                              ("gpu", bf16, 160, False), ("gpu", bf16, 60, False),
                                              ("tpu", bf16, 64, False), ("cpu", bf16, 64, False)):
        assert attention_implementation("auto", platform, dtype, head_dim, masked) == "xla"
    assert attention_implementation("xla", "gpu", bf16, 64, False) == "xla"
    assert attention_implementation("cudnn", "cpu", f32, 64, False) == "cudnn"  # asked for: JAX says if it cannot
    with pytest.raises(ValueError, match="attention must be one of"):
        get_config("tiny", attention="flash")
