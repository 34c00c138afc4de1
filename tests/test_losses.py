"""E²'s loss against a plain NumPy transcription of E2_METHOD.md section 3: symmetric InfoNCE,
0.5 * global + 0.5 * mean over groups; and its known values."""

import jax.numpy as jnp
import numpy as np
import pytest

from e2_jax import losses


def _info_nce(a, b, scale):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = scale * a @ b.T
    total = 0.0
    for i in range(len(a)):
        total += np.log(np.exp(logits[i]).sum()) - logits[i, i]  # image i -> its text
        total += np.log(np.exp(logits[:, i]).sum()) - logits[i, i]  # text i -> its image
    return total / (2 * len(a))


def test_e2_loss_is_half_global_plus_half_mean_region():
    rng = np.random.default_rng(0)
    n, g, d = 12, 5, 16
    image, text = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    region_image, region_text = rng.standard_normal((n, g, d)), rng.standard_normal((n, g, d))
    logit_scale = np.log(14.3)
    loss, metrics = losses.e2_loss(*map(jnp.asarray, (image, text, region_image, region_text)),
                                   jnp.asarray(logit_scale))
    glob = _info_nce(image, text, 14.3)
    regions = [_info_nce(region_image[:, k], region_text[:, k], 14.3) for k in range(g)]
    assert float(metrics["loss_global"]) == pytest.approx(glob, rel=1e-5)
    np.testing.assert_allclose(metrics["loss_region"], regions, rtol=1e-5)
    assert float(loss) == pytest.approx(0.5 * glob + 0.5 * np.mean(regions), rel=1e-5)
    # Known values: embeddings that say nothing give ln n; matched distinct ones at a large
    # scale give 0.
    same = jnp.ones((n, d))
    assert float(losses.contrastive_loss(same, same, jnp.asarray(0.0))) == pytest.approx(np.log(n), rel=1e-6)
    eye = jnp.eye(n, d)
    assert float(losses.contrastive_loss(eye, eye, jnp.asarray(np.log(100.0)))) < 1e-6


def test_the_pick_term_is_off_by_default_and_adds_each_blocks_picks_against_the_tags():
    """`pick_weight` (a variant beyond the paper): 0 or no picks gives E²'s loss bit for bit;
    on, each fusion block's picked-patch embedding of each group is contrasted with the group's
    tag text, and `pick_weight` times their mean is added."""
    rng = np.random.default_rng(1)
    n, g, d = 10, 3, 8
    image, text = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    region_image, region_text = rng.standard_normal((n, g, d)), rng.standard_normal((n, g, d))
    pick_image = rng.standard_normal((n, 2, g, d))
    args = [jnp.asarray(x) for x in (image, text, region_image, region_text)]
    scale = jnp.asarray(np.log(14.3))
    paper, _ = losses.e2_loss(*args, scale)
    for off in (dict(pick_image=jnp.asarray(pick_image)), dict(pick_weight=0.25)):
        assert np.array_equal(losses.e2_loss(*args, scale, **off)[0], paper)
    loss, metrics = losses.e2_loss(*args, scale, pick_image=jnp.asarray(pick_image), pick_weight=0.25)
    picks = [[_info_nce(pick_image[:, b, k], region_text[:, k], 14.3) for k in range(g)] for b in range(2)]
    np.testing.assert_allclose(metrics["loss_pick"], picks, rtol=1e-5)
    assert float(loss) == pytest.approx(float(paper) + 0.25 * np.mean(picks), rel=1e-5)
