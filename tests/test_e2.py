"""The E² image encoder: shapes, hard attention, modes, token flow, group pooling."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2_jax import losses
from e2_jax.data.tokenizer import CLIPTokenizer
from e2_jax.models.clip import ResidualAttentionBlock, get_config
from e2_jax.models.e2 import (
    AUTHORS_GROUPS,
    PAPER_GROUPS,
    E2Config,
    E2Model,
    FusionBlock,
    annealed_tau,
    count_new_params,
    fusion_layers_for,
    gumbel_noise_shape,
    init_e2_params,
    pick_softness,
    straight_through_gumbel,
)

TINY = get_config("tiny", vision_layers=4)


@pytest.mark.parametrize("preset", ["ViT-B-32", "ViT-B-16", "ViT-L-14", "tiny"])
def test_output_shapes_for_every_preset(preset):
    config = get_config(preset)
    e2 = E2Config()
    shapes = jax.eval_shape(
        lambda r: E2Model(config, e2).apply(
            {"params": init_e2_params(config, e2, r)},
            jnp.zeros((3, config.image_size, config.image_size, 3)), True,
            method=E2Model.encode_image, rngs={"gumbel": r}),
        jax.random.key(0))
    assert shapes.global_embedding.shape == (3, config.embed_dim)
    assert shapes.region_embeddings.shape == (3, 5, config.embed_dim)
    assert shapes.picks.shape == (2, 3, 10)


def test_fusion_layers_scale_with_depth():
    assert fusion_layers_for(12) == (8, 11)
    assert fusion_layers_for(24) == (16, 22)
    assert fusion_layers_for(6) == (4, 5)
    assert fusion_layers_for(2) == (1, 1)
    assert fusion_layers_for(12, (3, 7)) == (3, 7)
    with pytest.raises(ValueError, match="fusion_layers"):
        fusion_layers_for(12, (8, 12))


def test_groups_are_config():
    assert [g.name for g in AUTHORS_GROUPS] == ["subcategory", "brand", "description", "season", "composition"]
    e2 = E2Config(groups=PAPER_GROUPS)
    assert [g.name for g in e2.groups] == ["brand", "season", "subcategory", "composition"] and e2.num_tokens == 8
    assert [g.name for g in E2Config().without_group("brand").groups] == [
        "subcategory", "description", "season", "composition"]


def test_straight_through_forward_is_exactly_one_hot_and_gradient_is_soft():
    logits = jax.random.normal(jax.random.key(0), (4, 10, 49))
    noise = jax.random.gumbel(jax.random.key(1), logits.shape)
    weights, picked = straight_through_gumbel(logits, 1.0, noise)
    assert set(np.unique(np.asarray(weights)).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(np.asarray(weights).argmax(-1), picked)
    np.testing.assert_array_equal(np.asarray(weights).sum(-1), 1.0)
    values = jax.random.normal(jax.random.key(2), (49,))
    grad = jax.grad(lambda z: jnp.sum(straight_through_gumbel(z, 1.0, noise)[0] * values))(logits)
    assert np.count_nonzero(np.asarray(grad)) > logits.size // 2  # flows to every logit, not just the pick


@pytest.fixture(scope="module")
def tiny_batch():
    images = jax.random.normal(jax.random.key(5), (4, 32, 32, 3))
    tokens = CLIPTokenizer()(["Raf Simons shirt", "black wool coat", "Kenzo tiger sweater", "silk dress"])
    tags = CLIPTokenizer()(["SHIRTS", "COATS", "SWEATERS", "DRESSES"] * 5, context_length=8)
    return images, tokens, tags


def _loss(params, model, images, tokens, tags, key):
    out = model.apply({"params": params}, images, True, method=E2Model.encode_image, rngs={"gumbel": key})
    text = model.apply({"params": params}, tokens, method=E2Model.encode_text)
    tag_emb = model.apply({"params": params}, tags, method=E2Model.encode_text).reshape(5, 4, -1)
    loss, _ = losses.e2_loss(out.global_embedding, text, out.region_embeddings, tag_emb.transpose(1, 0, 2),
                             params["logit_scale"])
    return loss


@pytest.mark.slow
def test_gradient_reaches_fusion_projections(tiny_batch):
    model = E2Model(TINY, E2Config())
    params = init_e2_params(TINY, E2Config(), jax.random.key(0))
    grads = jax.jit(lambda p, *batch: jax.grad(_loss)(p, model, *batch, jax.random.key(3)))(params, *tiny_batch)
    for block in ("fusion_1", "fusion_2"):
        for name in ("proj_q", "proj_k", "proj_v"):
            assert np.abs(grads["visual"][block][name]).max() > 0, (block, name)
    for name in ("selection_tokens", "proj_cls", "region_brand"):
        assert jax.tree.reduce(lambda a, g: a + float(np.abs(g).sum()), grads["visual"][name], 0.0) > 0
    # CLIP's own projection is kept for conversion but unused by E².
    assert np.abs(grads["visual"]["proj"]).max() == 0


def test_evaluation_is_deterministic_unless_noise_is_asked_for(tiny_batch):
    images = tiny_batch[0]
    params = init_e2_params(TINY, E2Config(), jax.random.key(0))

    def run(e2, key, train=False):
        return E2Model(TINY, e2).apply({"params": params}, images, train, method=E2Model.encode_image,
                                       rngs={"gumbel": key})

    a, b = run(E2Config(), jax.random.key(1)), run(E2Config(), jax.random.key(2))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    # No RNG at all is needed at evaluation.
    out = E2Model(TINY, E2Config()).apply({"params": params}, images, method=E2Model.encode_image)
    np.testing.assert_array_equal(out.global_embedding, a.global_embedding)
    # The authors' noisy evaluation, and training, draw noise: picks change with the key.
    noisy = E2Config(eval_gumbel_noise=True)
    assert not np.array_equal(run(noisy, jax.random.key(1)).picks, run(noisy, jax.random.key(2)).picks)
    assert not np.array_equal(run(E2Config(), jax.random.key(1), True).picks, a.picks)


def _tokens_per_block(e2, images, params):
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, ResidualAttentionBlock) and context.method_name == "__call__":
            seen.append(args[0].shape[1])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        E2Model(TINY, e2).apply({"params": params}, images, method=E2Model.encode_image)
    return seen


def test_second_fusion_block_drops_the_patches(tiny_batch):
    images = tiny_batch[0]
    e2 = E2Config()
    params = init_e2_params(TINY, e2, jax.random.key(0))
    k, patches = e2.num_tokens, TINY.num_patches  # 10 tokens, 16 patches, 4 layers: fusion after 3, 3
    assert fusion_layers_for(4) == (3, 3)
    assert _tokens_per_block(e2, images, params) == [k + 1 + patches] * 3 + [k + 1]
    # Without fusion blocks the tokens go through every layer with the patches.
    no_fusion = e2.replace(fusion=False)
    params = init_e2_params(TINY, no_fusion, jax.random.key(0))
    assert _tokens_per_block(no_fusion, images, params) == [k + 1 + patches] * 4


def _np_layernorm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


@pytest.mark.parametrize("quirks", [False, True])
def test_group_pooling_matches_numpy(quirks):
    # The encoder's final tokens, captured, then the method file's step 9-10 in numpy.
    e2 = E2Config(reference_quirks=quirks)
    params = init_e2_params(TINY, e2, jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    model = E2Model(TINY, e2)
    out, state = model.apply({"params": params}, images, method=E2Model.encode_image,
                             capture_intermediates=lambda m, name: m.name == "resblocks_3")
    final = np.asarray(state["intermediates"]["visual"]["transformer"]["resblocks_3"]["__call__"][0], np.float64)
    v = jax.tree.map(lambda a: np.asarray(a, np.float64), params["visual"])
    np.testing.assert_allclose(
        out.global_embedding, _np_layernorm(final[:, 10], v["ln_post"]["scale"], v["ln_post"]["bias"])
        @ v["proj_cls"], rtol=1e-5, atol=1e-6)
    names = [g.name for g in e2.groups]
    for g, name in enumerate(names):
        tokens = list(range(2 * g, 2 * g + 2))
        ln = v[f"region_{name}"]["ln"]
        if quirks and g == 4:  # the authors: only index 8, and group 4's LayerNorm
            tokens, ln = [8], v[f"region_{names[3]}"]["ln"]
        want = _np_layernorm(final[:, tokens], ln["scale"], ln["bias"]).mean(1) @ v[f"region_{name}"]["proj"]
        np.testing.assert_allclose(out.region_embeddings[:, g], want, rtol=1e-5, atol=1e-6)


def test_clip_ft_ablation_is_plain_clip(tiny_batch):
    images = tiny_batch[0]
    e2 = E2Config(selection_tokens=False)
    params = init_e2_params(TINY, e2, jax.random.key(0))
    assert set(params["visual"]) == {"conv1", "class_embedding", "positional_embedding", "ln_pre",
                                     "transformer", "ln_post", "proj"}
    out = E2Model(TINY, e2).apply({"params": params}, images, method=E2Model.encode_image)
    assert out.region_embeddings is None and out.picks is None


def test_initialisation_from_clip_keeps_clip_weights():
    from e2_jax.models.clip import init_params

    clip = init_params(TINY, jax.random.key(7))
    params = init_e2_params(TINY, E2Config(), jax.random.key(0), clip_params=clip)
    np.testing.assert_array_equal(params["visual"]["transformer"]["resblocks_2"]["mlp"]["c_fc"]["kernel"],
                                  clip["visual"]["transformer"]["resblocks_2"]["mlp"]["c_fc"]["kernel"])
    assert not np.array_equal(params["visual"]["proj_cls"], clip["visual"]["proj"])  # authors: random
    std = float(np.std(params["visual"]["selection_tokens"]))
    assert abs(std - TINY.vision_width**-0.5) < 0.3 * TINY.vision_width**-0.5
    improved = init_e2_params(TINY, E2Config(proj_cls_from_clip=True), jax.random.key(0), clip_params=clip)
    np.testing.assert_array_equal(improved["visual"]["proj_cls"], clip["visual"]["proj"])


def test_new_parameter_count_matches_the_authors_code():
    # E2_METHOD.md: 5,913,600 new parameters without the two unused modules, for B/32.
    assert count_new_params(get_config("ViT-B-32"), E2Config()) == (5_913_600, 151_277_313)
    assert count_new_params(get_config("ViT-B-16"), E2Config()) == (5_913_600, 149_620_737)


@pytest.fixture
def training_forward(tiny_batch):
    """(E² parameters, `forward(e2, params=those, tau=None, softness=None)`): a training forward
    of the tiny batch's images with fixed Gumbel noise, for the variants' tests."""
    images = tiny_batch[0]
    initial = init_e2_params(TINY, E2Config(), jax.random.key(0))
    noise = jax.random.gumbel(jax.random.key(1), gumbel_noise_shape(TINY, E2Config(), images.shape[0]))

    def forward(e2, params=initial, tau=None, softness=None):
        return E2Model(TINY, e2).apply({"params": params}, images, True, noise, tau, softness,
                                       method=E2Model.encode_image)

    return initial, forward


def test_masked_selection_variant_is_off_by_default_and_hides_the_patches_when_on(training_forward):
    """`selection_sees_patches` (a variant beyond the paper): at its default the forward is E²'s,
    bit for bit; off, a block's selection-token rows do not depend on the patch rows."""
    _, forward = training_forward
    paper, default_off, masked = forward(E2Config()), forward(E2Config(selection_sees_patches=True)), \
        forward(E2Config(selection_sees_patches=False))
    for a, b in zip(jax.tree.leaves(paper), jax.tree.leaves(default_off), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(paper.region_embeddings, masked.region_embeddings)
    assert np.isfinite(masked.region_embeddings).all()
    # One block with the mask the variant uses: 3 selection rows, CLS, then patches.
    k, length, width = 3, 9, TINY.vision_width
    block = ResidualAttentionBlock(width, TINY.vision_heads, 4.0, "quick_gelu")
    x = jax.random.normal(jax.random.key(2), (2, length, width))
    other = x.at[:, k + 1:].set(jax.random.normal(jax.random.key(3), (2, length - k - 1, width)))
    mask = ~((jnp.arange(length)[:, None] < k) & (jnp.arange(length)[None, :] >= k + 1))[None, None]
    block_params = block.init(jax.random.key(4), x)
    hidden, moved = (block.apply(block_params, y, None, mask) for y in (x, other))
    np.testing.assert_array_equal(hidden[:, :k], moved[:, :k])  # selection rows: the patches are hidden
    assert not np.allclose(hidden[:, k:], moved[:, k:])
    unmasked = [block.apply(block_params, y) for y in (x, other)]
    assert not np.allclose(unmasked[0][:, :k], unmasked[1][:, :k])  # without it they are seen
    with pytest.raises(ValueError, match="needs the fusion blocks"):
        E2Config(selection_sees_patches=False, fusion=False)


def test_annealed_temperature_variant_is_off_by_default_and_changes_only_the_gradient(training_forward):
    """`gumbel_tau_end` (a variant beyond the paper): at its default (0) the trainer passes no
    temperature and the forward is E²'s, bit for bit; annealed, the temperature goes
    geometrically from `gumbel_tau` to `gumbel_tau_end` over the run, the picks and embeddings
    are the same at every temperature (the pick is argmax(logits + noise)), and the gradient is
    not."""
    params, forward = training_forward
    assert annealed_tau(E2Config(), jnp.int32(5), 100) is None  # the trainer passes none at the default
    # and without a temperature passed, the field changes nothing in the model
    paper, default_off = forward(E2Config()), forward(E2Config(gumbel_tau_end=0.5))
    for a, b in zip(jax.tree.leaves(paper), jax.tree.leaves(default_off), strict=True):
        np.testing.assert_array_equal(a, b)
    annealed = E2Config(gumbel_tau=4.0, gumbel_tau_end=0.5)
    taus = [float(annealed_tau(annealed, jnp.int32(s), 101)) for s in (0, 50, 100, 150)]
    np.testing.assert_allclose(taus, [4.0, 2**0.5, 0.5, 0.5], rtol=1e-6)
    hot, cold = forward(annealed, tau=jnp.float32(4.0)), forward(annealed, tau=jnp.float32(0.5))
    for a, b in zip(jax.tree.leaves(hot), jax.tree.leaves(cold), strict=True):
        np.testing.assert_array_equal(a, b)

    def grad(tau):
        loss = lambda p: jnp.sum(forward(annealed, p, tau).region_embeddings ** 2)
        return jax.grad(loss)(params)["visual"]["fusion_1"]["proj_q"]

    assert not np.allclose(grad(jnp.float32(4.0)), grad(jnp.float32(0.5)))
    with pytest.raises(ValueError, match="gumbel_tau_end"):
        E2Config(gumbel_tau_end=-1.0)


def test_soft_pick_variant_is_off_by_default_and_mixes_the_soft_weights_in_when_on(training_forward):
    """`soft_pick_until` (a variant beyond the paper): at its default (0) the trainer passes no
    softness and the forward is E²'s, bit for bit; on, the softness goes linearly from 1 at the
    run's first step to 0 at that fraction of it; a softness of 0 is E²'s hard pick, 1 the
    Gumbel-softmax weights over every patch, and the gradient through the weights is the soft
    weights' at every softness."""
    _, forward = training_forward
    assert pick_softness(E2Config(), jnp.int32(5), 100) is None  # the trainer passes none at the default
    soft_e2 = E2Config(soft_pick_until=0.5)
    paper = forward(E2Config())
    for other in (forward(soft_e2), forward(soft_e2, softness=jnp.float32(0.0))):
        for a, b in zip(jax.tree.leaves(paper), jax.tree.leaves(other), strict=True):
            np.testing.assert_array_equal(a, b)
    shares = [float(pick_softness(soft_e2, jnp.int32(s), 101)) for s in (0, 25, 50, 100)]
    np.testing.assert_allclose(shares, [1.0, 0.5, 0.0, 0.0], atol=1e-7)
    soft = forward(soft_e2, softness=jnp.float32(1.0))
    # the first block's reported pick is still the argmax (the second's sees other inputs)
    np.testing.assert_array_equal(paper.picks[0], soft.picks[0])
    assert not np.allclose(paper.region_embeddings, soft.region_embeddings)
    # The weights themselves: softness s gives (1 - s) * one-hot + s * softmax((logits + noise) / tau).
    logits = jax.random.normal(jax.random.key(2), (2, 3, 7))
    g = jax.random.gumbel(jax.random.key(3), logits.shape)
    hard, index = straight_through_gumbel(logits, 1.0, g)
    expected_soft = jax.nn.softmax(logits + g, axis=-1)
    for s in (0.0, 0.3, 1.0):
        weights, same = straight_through_gumbel(logits, 1.0, g, jnp.float32(s))
        np.testing.assert_array_equal(index, same)
        np.testing.assert_allclose(weights, (1 - s) * hard + s * expected_soft, atol=1e-6)
    probe = jax.random.normal(jax.random.key(4), logits.shape)
    grads = [jax.grad(lambda x, s=s: jnp.sum(probe * straight_through_gumbel(x, 1.0, g, s)[0]))(logits)
             for s in (None, jnp.float32(0.3), jnp.float32(1.0))]
    for other in grads[1:]:
        np.testing.assert_allclose(grads[0], other, atol=1e-6)
    for bad in (dict(soft_pick_until=1.5), dict(soft_pick_until=0.5, fusion=False)):
        with pytest.raises(ValueError, match="soft_pick_until"):
            E2Config(**bad)


def test_keep_patches_variant_is_off_by_default_and_lets_the_last_layers_see_the_patches(training_forward):
    """`drop_patches` (a variant beyond the paper): at its default the forward is E²'s, bit for
    bit; off, the second fusion block keeps the patches, so the layers after it see them: the
    picks are E²'s (they are made before), the embeddings are not, and the region embeddings
    then depend on the patches through those layers."""
    _, forward = training_forward
    paper, default_on, kept = forward(E2Config()), forward(E2Config(drop_patches=True)), \
        forward(E2Config(drop_patches=False))
    for a, b in zip(jax.tree.leaves(paper), jax.tree.leaves(default_on), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(paper.picks, kept.picks)
    assert not np.allclose(paper.region_embeddings, kept.region_embeddings)
    assert not np.allclose(paper.global_embedding, kept.global_embedding)
    # The second block's output: K + 1 rows when it drops the patches, all of them when it keeps them.
    x = jax.random.normal(jax.random.key(2), (2, 3 + 1 + 4, TINY.vision_width))
    for drop, rows in ((True, 4), (False, 8)):
        block = FusionBlock(num_tokens=3, width=TINY.vision_width, drop_patches=drop)
        out, _, _ = block.apply(block.init(jax.random.key(3), x, None), x, None)
        assert out.shape == (2, rows, TINY.vision_width)
        np.testing.assert_array_equal(out[:, 3:], x[:, 3:rows])  # the class token (and patches) unchanged


def test_pick_embeddings_are_off_by_default_and_carry_the_picks_gradient(tiny_batch):
    """`pick_embeddings` (for `loss.pick_weight`, a variant beyond the paper): off, the output has
    none and the forward is E²'s; on, the other outputs are unchanged, each block's picked values
    go through each group's region head, and a loss on them reaches the selection logits (the
    straight-through gradient of the hard pick)."""
    images = tiny_batch[0]
    params = init_e2_params(TINY, E2Config(), jax.random.key(0))
    noise = jax.random.gumbel(jax.random.key(1), gumbel_noise_shape(TINY, E2Config(), images.shape[0]))

    def forward(params, e2):
        return E2Model(TINY, e2).apply({"params": params}, images, True, noise, method=E2Model.encode_image)

    paper, picking = forward(params, E2Config()), forward(params, E2Config(pick_embeddings=True))
    assert paper.pick_embeddings is None
    for name in ("global_embedding", "region_embeddings", "picks"):
        np.testing.assert_array_equal(getattr(paper, name), getattr(picking, name))
    groups = len(E2Config().groups)
    assert picking.pick_embeddings.shape == (images.shape[0], 2, groups, TINY.embed_dim)
    # Each token's picked value is the patch value (by the block's own projection) at its pick...
    x = jax.random.normal(jax.random.key(2), (2, 3 + 1 + 4, TINY.vision_width))
    block = FusionBlock(num_tokens=3, width=TINY.vision_width)
    block_params = block.init(jax.random.key(3), x, None)
    _, picked, chosen = block.apply(block_params, x, None)
    values = x[:, 4:] @ block_params["params"]["proj_v"]
    np.testing.assert_allclose(chosen, np.take_along_axis(values, picked[..., None], axis=1), rtol=1e-6, atol=1e-6)
    # ... and block 2's values of the first group, pooled through its region head, are its pick embedding.
    _, caught = E2Model(TINY, E2Config(pick_embeddings=True)).apply(
        {"params": params}, images, True, noise, method=E2Model.encode_image, capture_intermediates=True)
    chosen_2 = caught["intermediates"]["visual"]["fusion_2"]["__call__"][0][2]
    head = params["visual"]["region_" + E2Config().groups[0].name]
    pooled = chosen_2[:, : E2Config().groups[0].tokens]
    normed = (pooled - pooled.mean(-1, keepdims=True)) / np.sqrt(pooled.var(-1, keepdims=True) + 1e-5)
    want = (normed * head["ln"]["scale"] + head["ln"]["bias"]).mean(axis=1) @ head["proj"]
    np.testing.assert_allclose(picking.pick_embeddings[:, 1, 0], want, rtol=1e-4, atol=1e-5)

    def pick_loss(p):
        return jnp.sum(forward(p, E2Config(pick_embeddings=True)).pick_embeddings ** 2)

    grads = jax.grad(pick_loss)(params)["visual"]
    assert np.abs(grads["fusion_1"]["proj_q"]).max() > 0 and np.abs(grads["fusion_2"]["proj_k"]).max() > 0
    with pytest.raises(ValueError, match="pick embeddings need the fusion blocks"):
        E2Config(pick_embeddings=True, fusion=False)
