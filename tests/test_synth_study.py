"""The seed study's config (configs/synth_study.py) and its runner's tables: equal budgets,
one initial model, the ablations as the paper defines them."""

import json
from pathlib import Path

import pytest

from e2_jax import config as recipes
from e2_jax.training import train

ROOT = Path(__file__).resolve().parent.parent


study = recipes.config_module(ROOT / "configs" / "synth_study.py")


def _steps(c):
    return {name: c[name].steps for name in c.stages}


def test_every_variant_has_the_same_budget_and_initial_weights():
    configs = {v: study.get_config(f"variant={v},seed=2,init=/models/synth_clip") for v in study.VARIANTS}
    for variant, c in configs.items():
        assert sum(_steps(c).values()) == study.STEPS, variant
        assert c.model.pretrained == "/models/synth_clip" and c.seed == 2 and c.batch_size == 64
        assert dict(c.model.overrides) == study.MODEL and c.data.dataset == "synth_fashion/medium"
    assert configs["clip_ft"].stages == ("finetune",) and not configs["clip_ft"].e2.enabled
    e2 = configs["e2"]
    assert e2.stages == ("warmup", "finetune") and e2.warmup.trainable == "e2_new" and e2.finetune.trainable == "all"
    assert _steps(e2) == {"warmup": study.STEPS // 5, "finetune": study.STEPS - study.STEPS // 5}
    assert not configs["no_fusion"].e2.fusion and configs["no_region_loss"].loss.region_weight == 0
    assert not configs["masked_selection"].e2.selection_sees_patches
    assert (configs["annealed_tau"].e2.gumbel_tau, configs["annealed_tau"].e2.gumbel_tau_end) == (4.0, 0.5)
    assert configs["pick_loss"].loss.pick_weight == 0.25 and e2.loss.pick_weight == 0
    assert configs["soft_pick"].e2.soft_pick_until == 0.5 and e2.e2.soft_pick_until == 0
    assert not configs["keep_patches"].e2.drop_patches and e2.e2.drop_patches
    names = [g["name"] for g in e2.e2.groups]
    for group in names:
        kept = [g["name"] for g in configs[f"without_{group}"].e2.groups]
        assert kept == [n for n in names if n != group]
    # Apart from what each ablation changes, every E² variant is the E² config.
    for variant in study.VARIANTS[2:]:
        c = configs[variant]
        assert (c.optim.to_dict(), c.data.to_dict(), _steps(c)) == (e2.optim.to_dict(), e2.data.to_dict(), _steps(e2))


def test_pretraining_sees_only_the_generic_captions():
    c = study.get_config("variant=pretrain")
    assert c.data.text_format == "{caption}" and not c.e2.enabled and not c.model.pretrained
    assert _steps(c) == {"pretrain": study.PRETRAIN_STEPS}


def test_fusion_blocks_sit_where_the_papers_do_for_the_depth():
    from e2_jax.models.e2 import fusion_layers_for

    assert fusion_layers_for(study.MODEL["vision_layers"]) == (3, 4)  # as (8, 11) of 12


def test_mistakes_are_named():
    with pytest.raises(ValueError, match="init=DIR"):
        study.get_config("variant=e2")
    with pytest.raises(ValueError, match="variant must be"):
        study.get_config("variant=no_logo,init=x")
    with pytest.raises(ValueError, match="unknown config argument 'sed'"):
        study.get_config("variant=e2,init=x,sed=1")


def test_every_variant_passes_the_trainers_checks(synth_tiny, tmp_path):
    """runlocal shrinks a variant to SynthFashion/tiny; `train.prepare` checks every field and
    opens the data (what a run does before compiling anything)."""
    for variant in ("pretrain", *study.VARIANTS):
        c = study.get_config(f"variant={variant},init=unused,runlocal")
        c.data.data_dir = synth_tiny
        spec, _ = train.prepare(c)
        assert [s.name for s in spec.stages] == list(c.stages)


def test_summary_is_mean_and_spread_over_seeds():
    from benchmarks import synth_study as runner

    def result(variant, seed, sumr):
        retrieval = {f"{p}/{t}/{m}": sumr for p in ("full_candidate", "sample_100") for t in ("tags", "description")
                     for m in ("sumr", "i2t_r1", "t2i_r1")}
        return {"variant": variant, "seed": seed, "retrieval": retrieval, "seconds": {"train": 10.0},
                "probe": dict.fromkeys(runner.PROBE_FIELDS, 50.0) | {"composition_back": 30.0 + seed}}

    table, data = runner.summary([result("e2", 0, 100.0), result("e2", 1, 110.0), result("e2", 2, 120.0),
                                  result("clip_ft", 0, 90.0)])
    assert data["e2"]["full-cand. SumR, tags"] == [100.0, 110.0, 120.0]
    rows = table.splitlines()
    assert rows[2].startswith("| clip_ft | 1 | 90.0 |") and rows[3].startswith("| e2 | 3 | 110.0 ± 10.0 |")
    assert data["e2"]["probe composition (back view)"] == [30.0, 31.0, 32.0]
    assert "probe composition (back view)" in table
    old = result("no_fusion", 0, 80.0)
    del old["probe"]["composition_back"]  # a result from before the back-view probe
    table, data = runner.summary([old, result("no_fusion", 1, 80.0)])
    assert data["no_fusion"]["probe composition (back view)"] == [None, 31.0]
    assert "| 31.0 (1 of 2) |" in table


def test_summary_has_where_the_selection_tokens_look():
    from benchmarks import synth_study as runner

    def result(variant, seed, picks):
        retrieval = {f"{p}/{t}/{m}": 1.0 for p in ("full_candidate", "sample_100") for t in ("tags", "description")
                     for m in ("sumr", "i2t_r1", "t2i_r1")}
        return {"variant": variant, "seed": seed, "retrieval": retrieval, "seconds": {"train": 1.0},
                "probe": dict.fromkeys(runner.PROBE_FIELDS, 1.0) | {"composition_back": 1.0}, "picks": picks}

    def picks(on_own):
        block = {"on_own": on_own, "chance": 5.0, "images": 10, "on_any": 20.0, "chance_any": 12.0}
        return {"subcategory": {"detail": None, "blocks": [{"on_own": None, "on_any": 1.0}] * 2},
                "brand": {"detail": "brand", "blocks": [block, block | {"on_own": on_own / 2}]}}

    table, data = runner.summary([result("e2", 0, picks(40.0)), result("e2", 1, picks(60.0)),
                                  result("no_fusion", 0, None), result("clip_ft", 0, None)])
    assert "| e2 | 2 | brand | 1 | 50.0 ± 14.1 | 5.0 ± 0.0 | 20.0 ± 0.0 | 12.0 ± 0.0 |" in table
    assert "| e2 | 2 | brand | 2 | 25.0 ± 7.1 |" in table
    assert "| e2 | 2 | subcategory |" not in table and "| no_fusion | 1 | brand" not in table  # no detail; no picks
    assert data["e2"]["picks"]["brand block 1"]["on_own"] == [40.0, 60.0] and "picks" not in data["no_fusion"]


def test_the_rule_is_judged_run_by_run_and_a_variant_meets_it_only_in_every_seed():
    """The selection study's rule (docs/results.md): description SumR at least E²'s mean minus one
    standard deviation, and every detail's picks above twice chance in one block or the other."""
    from benchmarks import synth_study as runner

    def result(variant, seed, description, brand=(40.0, 1.0), season=(1.0, 20.0)):
        retrieval = {f"{p}/{t}/{m}": 1.0 for p in ("full_candidate", "sample_100") for t in ("tags", "description")
                     for m in ("sumr", "i2t_r1", "t2i_r1")} | {"full_candidate/description/sumr": description}
        blocks = lambda on_own, chance: [{"on_own": x, "chance": chance, "on_any": 1.0, "chance_any": 1.0}
                                         for x in on_own]
        picks = {"subcategory": {"detail": None, "blocks": [{"on_own": None, "on_any": 1.0}] * 2},
                 "brand": {"detail": "brand", "blocks": blocks(brand, 15.0)},
                 "season": {"detail": "season", "blocks": blocks(season, 5.0)}}
        return {"variant": variant, "seed": seed, "retrieval": retrieval, "seconds": {"train": 1.0},
                "probe": dict.fromkeys(runner.PROBE_FIELDS, 1.0) | {"composition_back": 1.0}, "picks": picks}

    e2 = [result("e2", 0, 140.0), result("e2", 1, 142.0, season=(1.0, 10.0)), result("e2", 2, 144.0)]
    threshold = 142.0 - 2.0  # mean 142, standard deviation 2
    runs = e2 + [result("keep_patches", s, 140.0) for s in (2, 0, 1)]  # at the threshold: passes
    runs += [result("soft_pick", 1, 139.9)]  # below it
    runs += [result("pick_loss", 1, 150.0, brand=(30.0, 29.0))]  # the logo at twice chance, not above
    runs += [result("annealed_tau", s, 150.0) for s in (1, 2)]  # passing, seed 0 not run
    table, data = runner.summary(runs)
    rule = data["rule"]
    assert rule["threshold"] == threshold
    verdicts = {v: d["verdict"] for v, d in rule["variants"].items()}
    assert verdicts == {"e2": "fails", "keep_patches": "meets the rule", "soft_pick": "fails",
                        "pick_loss": "fails", "annealed_tau": "open (seeds 0 not run)"}
    assert rule["variants"]["e2"]["passes"] == {0: True, 1: False, 2: True}  # season 10.0 is twice chance, not above
    assert "| keep_patches | 0 | 140.0 | **40.0** / 1.0 (30.0) | 1.0 / **20.0** (10.0) | yes |" in table
    assert "| pick_loss | 1 | 150.0 | 30.0 / 29.0 (30.0) |" in table and "subcategory picks" not in table
    assert f"at least {threshold:.1f}" in table


def test_loss_curves_are_window_means(tmp_path):
    from benchmarks import synth_study as runner

    rows = [{"step": 10 * (i + 1), "loss": 9.0, "loss_global": float(i), "loss_region/brand": 4.0 - i / 100}
            for i in range(40)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = runner.loss_curves(tmp_path / "metrics.jsonl", points=4)
    assert set(curves) == {"global", "brand"}
    assert curves["global"] == [[100, 4.5], [200, 14.5], [300, 24.5], [400, 34.5]]
    assert curves["brand"][0] == [100, pytest.approx(4.0 - 0.045)]


def test_the_summary_names_runs_from_other_initial_weights():
    """The same pre-training gives other weights on another CPU: the summary's header names the
    runs that started from weights other than OUT's pre-training, and where they ran."""
    from benchmarks import synth_study as runner

    here = {"params_sha256": "2b538af8" + "0" * 56}
    runs = [{"variant": "e2", "seed": 0},  # from before runs named their weights
            {"variant": "e2", "seed": 1, "init_sha256": here["params_sha256"], "machine": "x86_64, 2 CPUs, Intel"},
            {"variant": "pick_loss", "seed": 1, "init_sha256": "1eb966cf" + "1" * 56, "machine": "x86_64, 2 CPUs, AMD"}]
    assert runner._other_inits(runs[:2], here) == ""
    assert runner._other_inits(runs, here) == "; pick_loss seed 1 from 1eb966cf11111111... (x86_64, 2 CPUs, AMD)"
