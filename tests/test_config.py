"""Configs as structured values: a group is one entry (name, tokens, tag length, field), config
arguments are typed, `e2_jax.spec.resolve` is the one reader, and workdirs and converted models
written before these formats are still read."""

import json

import jax
import numpy as np
import optax
import pytest

from e2_jax import config as recipes
from e2_jax import pretrained, spec
from e2_jax.data import pipeline
from e2_jax.models.clip import get_config, init_params
from e2_jax.models.e2 import E2Config
from e2_jax.sharding import batch_sharding
from e2_jax.training import step, train
from tests.test_train import tiny_config


@pytest.mark.slow
def test_a_group_of_three_tokens_with_its_own_tag_length_trains_and_an_ablation_removes_it(synth_tiny):
    c = tiny_config(synth_tiny, stages=("finetune",))
    c.e2.groups = (recipes.group("brand", tokens=3, tag_length=6), recipes.group("season", tag_length=5))
    run, data = train.prepare(c, validate=False)
    assert [(g.name, g.tokens) for g in run.e2.groups] == [("brand", 3), ("season", 2)] and run.e2.num_tokens == 5
    assert run.pre.tags == (("brand", "brand", 6), ("season", "season", 5))
    # The trainer's pipeline and step: tags at their own lengths, a region loss per group.
    local = next(pipeline.local_train_batches(data.train, run.pre, global_batch=16, rows=range(16)))
    assert local["tags"]["brand"].shape == (16, 6) and local["tags"]["season"].shape == (16, 5)
    program = step.build_stage(run, run.stages[0], optax.sgd(0.0), optax.constant_schedule(0.0))
    state = program.new_state(step.initial_params(run))
    assert state["params"]["visual"]["selection_tokens"].shape[0] == 5
    batch = next(pipeline.train_batches(data.train, run.pre, global_batch=16, sharding=batch_sharding(run.mesh)))
    _, metrics = program.step(state, batch)
    assert np.asarray(metrics["loss_region"]).shape == (2,) and np.isfinite(float(metrics["loss"]))
    # The ablation: one line.
    c.e2.groups = recipes.without(c.e2.groups, "brand")
    ablated = spec.resolve(c, stages=False)
    assert [g.name for g in ablated.e2.groups] == ["season"] and ablated.e2.num_tokens == 2
    assert ablated.pre.tags == (("season", "season", 5),)


def test_group_entries_are_checked():
    c = recipes.base()
    c.model.preset = "tiny"
    c.e2.groups = ({"name": "brand", "tokenz": 3},)
    with pytest.raises(ValueError, match=r"e2.groups\[0\].*unknown: \['tokenz'\]"):
        spec.resolve(c, stages=False)
    c.e2.groups = (recipes.group("brand", tag_length=1),)
    with pytest.raises(ValueError, match="tag_length 1 must be from 2"):
        spec.resolve(c, stages=False)
    c.e2.groups = recipes.AUTHORS_GROUPS
    c.stages = ("warmup,finetune",)  # what --config.stages=warmup,finetune gives
    with pytest.raises(ValueError, match="a list is a tuple"):
        spec.resolve(c)
    with pytest.raises(ValueError, match="no group 'logo'"):
        recipes.without(recipes.AUTHORS_GROUPS, "logo")
    c.stages = ("finetune",)
    c.loss.pick_weight = 0.25  # the pick term (a variant) contrasts picks: none without fusion blocks
    for field, value in (("e2.fusion", False), ("loss.region_weight", 0.0), ("e2.enabled", False)):
        bad = c.copy_and_resolve_references()
        bad[field.split(".")[0]][field.split(".")[1]] = value
        with pytest.raises(ValueError, match=r"loss\.pick_weight > 0 contrasts the fusion blocks' picks"):
            spec.resolve(bad)
    assert spec.resolve(c, stages=False).e2.pick_embeddings


def test_config_arguments_are_typed():
    got = recipes.parse_arg("variant=e2,seed=3,runlocal", variant="none", seed=0, runlocal=False, init="")
    assert got.to_dict() == {"variant": "e2", "seed": 3, "runlocal": True, "init": ""}
    with pytest.raises(ValueError, match=r"unknown config argument 'sed' \(did you mean 'seed'\?\); known: init, "
                                         "runlocal, seed, variant"):
        recipes.parse_arg("sed=3", variant="none", seed=0, runlocal=False, init="")
    with pytest.raises(ValueError, match="seed='x' is not a int"):
        recipes.parse_arg("seed=x", seed=0)
    with pytest.raises(ValueError, match="is a flag"):
        recipes.parse_arg("runlocal=maybe", runlocal=False)
    with pytest.raises(ValueError, match="unknown config argument 'datset'"):
        recipes.fashion_recipe("ViT-B-32", "e2", "datset=amazon_fashion")
    c = recipes.fashion_recipe("ViT-B-32", "e2", "dataset=amazon_fashion,ablation=no_warmup")
    assert c.stages == ("finetune",) and [g["name"] for g in c.e2.groups] == ["brand"]


def test_a_workdir_config_written_with_comma_strings_is_read():
    """config.json of runs before tuples: stages, protocols, texts and fusion layers as comma
    strings, groups as names with `e2.tokens_per_group` and `data.tag_lengths`."""
    old = json.loads(recipes.base().to_json_best_effort())
    old["stages"], old["eval"]["protocols"], old["eval"]["texts"] = "warmup,finetune", "full_candidate", "tags"
    old["e2"]["groups"], old["e2"]["tokens_per_group"], old["e2"]["fusion_layers"] = "brand,season", 3, "8,11"
    old["data"]["tag_lengths"] = "brand:24"
    c = recipes.from_json(json.dumps(old))
    assert c.stages == ("warmup", "finetune") and c.eval.protocols == ("full_candidate",) and c.eval.texts == ("tags",)
    assert c.e2.fusion_layers == (8, 11)
    assert [(g["name"], g["tokens"], g["tag_length"]) for g in c.e2.groups] == [("brand", 3, 24), ("season", 3, 0)]
    assert recipes.from_json(c.to_json_best_effort()).to_dict() == c.to_dict()  # and today's round-trips


def test_a_model_converted_before_model_json_is_read(tmp_path):
    """One description (model.json) for converted models and workdirs; the older layout
    (config.json with the CLIP config, e2.json for E²) still loads."""
    clip = get_config("tiny")
    params = init_params(clip, jax.random.key(0))
    pretrained.save(tmp_path / "new", clip, params)
    assert (tmp_path / "new" / "model.json").is_file() and pretrained.load_e2_config(tmp_path / "new") is None
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (tmp_path / "new" / "params").rename(legacy / "params")
    (legacy / "config.json").write_text(clip.to_json())
    got_clip, got_params = pretrained.load(legacy)
    assert got_clip == clip and pretrained.load_e2_config(legacy) is None
    np.testing.assert_array_equal(got_params["visual"]["proj"], params["visual"]["proj"])
    (legacy / "e2.json").write_text(json.dumps(E2Config(fusion=False).to_dict()))  # an exported E² model's
    assert pretrained.read_description(legacy) == (clip, E2Config(fusion=False))
    with pytest.raises(FileNotFoundError, match="not a converted e2_jax model"):
        pretrained.load(tmp_path / "nothing")
