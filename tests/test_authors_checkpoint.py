"""Import and export of the E² authors' PyTorch checkpoints (their key names and quirks)."""

import jax
import numpy as np
import pytest
import torch

from e2_jax import convert, pretrained
from e2_jax.models.e2 import AUTHORS_GROUPS, E2Model
from tests.reference import authors_e2_forward, authors_e2_state_dict, max_relative_error

pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("authors")
    model, state = authors_e2_state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp / "e2.pt")
    assert convert.main(["to-flax", str(tmp / "e2.pt"), str(tmp / "flax")]) == 0
    config, params = pretrained.load(tmp / "flax")
    return tmp, model, state, config, params, pretrained.load_e2_config(tmp / "flax")


def _close(got, want, what):
    err = max_relative_error(np.asarray(got), want)
    assert err <= 1e-5, f"{what}: max relative error {err:.2e}"


def test_import_reproduces_their_forward(converted):
    _, model, state, config, params, e2 = converted
    assert e2.reference_quirks and e2.groups == AUTHORS_GROUPS
    assert config.vision_layers == 12 and config.vision_width == 128
    images = np.random.default_rng(0).standard_normal((3, 64, 64, 3)).astype(np.float32)
    flax_model = E2Model(config, e2)

    # Evaluation, no noise: both take the argmax patch.
    ours = flax_model.apply({"params": params}, images, method=E2Model.encode_image)
    glob, regions, picks = authors_e2_forward(model, state, images)
    np.testing.assert_array_equal(ours.picks, picks)
    _close(ours.global_embedding, glob, "global")
    _close(ours.region_embeddings, regions, "regions")

    # Training, with Gumbel noise: the same picks given to the reference, the same numbers.
    noisy = flax_model.apply({"params": params}, images, True, method=E2Model.encode_image,
                             rngs={"gumbel": jax.random.key(0)})
    assert not np.array_equal(noisy.picks, ours.picks)
    glob, regions, _ = authors_e2_forward(model, state, images, picks=noisy.picks)
    _close(noisy.global_embedding, glob, "global (noisy)")
    _close(noisy.region_embeddings, regions, "regions (noisy)")


def test_without_quirks_the_last_group_changes(converted):
    _, _, _, config, params, e2 = converted
    images = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
    quirky = E2Model(config, e2).apply({"params": params}, images, method=E2Model.encode_image)
    sound = E2Model(config, e2.replace(reference_quirks=False)).apply({"params": params}, images,
                                                                       method=E2Model.encode_image)
    assert not np.allclose(quirky.region_embeddings[:, 4], sound.region_embeddings[:, 4])


def test_export_back_to_their_format_is_exact(converted):
    tmp, _, state, *_ = converted
    assert convert.main(["from-flax", str(tmp / "flax"), str(tmp / "back.pt"), "--format", "e2_authors"]) == 0
    back = torch.load(tmp / "back.pt")
    assert set(back) == set(state)
    for key, value in state.items():
        if key not in ("visual.ln_selection.weight", "visual.ln_selection.bias", "visual.proj_cls_mid"):
            assert torch.equal(back[key], value.float()), key
    # An E² model is not exported as a plain CLIP by mistake.
    assert convert.main(["from-flax", str(tmp / "flax"), str(tmp / "clip.pt"), "--format", "open_clip"]) == 2


def test_wrong_token_count_is_named(tmp_path, capsys):
    _, state = authors_e2_state_dict()
    del state["visual.token_10_embedding"]
    torch.save(state, tmp_path / "e2.pt")
    assert convert.main(["to-flax", str(tmp_path / "e2.pt"), str(tmp_path / "out")]) == 2
    assert "has 9 selection tokens" in capsys.readouterr().err and not (tmp_path / "out").exists()
