"""The SynthFashion study: E² against CLIP fine-tuning, with the paper's ablations, on equal budgets.

`benchmarks/synth_study.py` runs it (every variant, three seeds) and writes the tables of
docs/results.md; each run is also a plain command:

    python -m e2_jax.main --config configs/synth_study.py:variant=pretrain --workdir W0
    python -m e2_jax.convert from-workdir W0 models/synth_clip          # the shared initial weights
    python -m e2_jax.main --config configs/synth_study.py:variant=e2,seed=1,init=models/synth_clip --workdir W1 \
        --mode train                                                   # then --mode evaluate

`variant`: `pretrain` (CLIP-style training from random weights on SynthFashion's generic
captions, "a red coat": colour and sub-category only, standing in for OpenAI's pre-training),
`clip_ft`, `e2`, or an ablation of E²: `no_fusion`, `no_region_loss`, `without_<group>`.
Everything below is fixed before the study runs; the difficulty of the data is SynthFashion's
`medium` config (64 px, details 14% of the image side, 24 brands, clutter 0.25).

Budget: every fine-tuning variant trains `steps` steps of batch 64 from the same initial
weights. E² variants spend the first fifth on E²'s new parameters only (the paper's warm-up
stage: 5 of 25 epochs) and the rest on all parameters; CLIP-FT trains all parameters
throughout, as in the paper. The study trains with `--mode train`: no checkpoint is chosen on
the validation split it reports on (and stage 2 starts from the end of stage 1), so every
variant is judged by its final parameters.
"""

from e2_jax import config as recipes

VARIANTS = ("clip_ft", "e2", "no_fusion", "no_region_loss", "without_subcategory", "without_brand",
            "without_description", "without_season", "without_composition",
            # Beyond the paper, each E² with one field changed (docs/results.md, "Selection tokens
            # that find their detail"): the patches masked from the selection tokens' attention; the
            # Gumbel temperature annealed from 4 to 0.5 over the run; the picks contrasted with the
            # tag texts too; the picks soft at first, hard from half-way through the run; the
            # patches kept after the second fusion block.
            "masked_selection", "annealed_tau", "pick_loss", "soft_pick", "keep_patches")
# A small CLIP: 64 px in 8 px patches (the logo, label and tag are 5-9 px), a 5-layer vision
# tower (fusion blocks after layers 3 and 4, as after 8 and 11 of 12), a 3-layer text tower.
# Sized so that the 28 runs of the study take about two hours on a 2-core CPU.
MODEL = {"image_size": 64, "patch_size": 8, "vision_width": 96, "vision_heads": 2, "vision_layers": 5,
         "text_width": 64, "text_heads": 2, "text_layers": 3, "embed_dim": 64, "context_length": 48}
# SynthFashion's tags are short: the authors' five entities at shorter tag lengths.
SYNTH_GROUPS = recipes.with_tag_lengths(recipes.AUTHORS_GROUPS, subcategory=8, brand=8, description=32, season=8,
                                        composition=16)
PRETRAIN_STEPS = 500
STEPS = 160
# The study at the budget where the details are learnt (issue 22, `--study details` of the runner):
# E², CLIP-FT and the two ablations of E²'s mechanism. First fixed at the 3,000 steps at which,
# on SynthFashion 1.0.0, both models learnt to read the logo, with a rule fixed before any result:
# if E² seed 0's region loss of a group with a detail has not left chance by step 3,000 (a
# 150-step window mean under 4.0), the study runs at 6,000. On 2.0.0 the season's stayed at 4.14
# (docs/results.md), so the study runs at 6,000; the 3,000-step runs are kept and reported.
DETAILS_STEPS = 6000
DETAILS_VARIANTS = ("clip_ft", "e2", "no_region_loss", "no_fusion")


def get_config(arg=None):
    options = recipes.parse_arg(arg, variant="e2", seed=0, init="", steps=0, runlocal=False)
    variant = options.variant
    if variant not in ("pretrain", *VARIANTS):
        raise ValueError(f"variant must be pretrain or one of {VARIANTS}, got {variant!r}")
    c = recipes.base()
    c.seed = options.seed
    c.model.preset, c.model.pretrained, c.model.overrides = "tiny", "", dict(MODEL)
    c.data.dataset, c.data.build_if_missing = "synth_fashion/medium", True
    c.e2.groups = SYNTH_GROUPS
    c.optim.name, c.optim.weight_decay, c.optim.warmup_steps = "adamw", 0.05, 20
    c.batch_size = 64
    c.eval.batch_size, c.eval.selection_maps = 256, 8
    c.checkpoint.every_steps, c.checkpoint.keep = 50, 1
    steps = options.steps or (PRETRAIN_STEPS if variant == "pretrain" else STEPS)
    with c.unlocked():
        if variant == "pretrain":
            c.data.text_format = "{caption}"
            c.e2.enabled, c.stages = False, ("pretrain",)
            c.pretrain = recipes.stage(steps=steps, lr=1e-3, trainable="all")
            c.optim.warmup_steps = 50
            c.eval.protocols, c.eval.texts, c.eval.every_steps = ("full_candidate",), ("tags",), steps // 4
        else:
            if not options.init:
                raise ValueError("fine-tuning variants start from the pre-trained CLIP: give init=DIR (made by "
                                 "variant=pretrain and `python -m e2_jax.convert from-workdir`)")
            c.model.pretrained = options.init
            warmup = max(1, steps // 5)
            c.warmup = recipes.stage(steps=warmup, lr=1e-3, trainable="e2_new")
            c.finetune = recipes.stage(steps=steps - warmup, lr=2e-4, trainable="all")
            # with --mode train_and_evaluate: every 40 steps at the study's 160, eight times in a longer
            # run (`steps=`); the study's runner uses --mode train and evaluates the final parameters
            c.eval.protocols, c.eval.every_steps = ("full_candidate", "sample_100"), max(40, steps // 8)
            if variant == "clip_ft":
                c.e2.enabled, c.stages = False, ("finetune",)
                c.finetune.steps = steps
            elif variant == "masked_selection":
                recipes.apply_ablation(c, "none")
                c.e2.selection_sees_patches = False
            elif variant == "annealed_tau":
                recipes.apply_ablation(c, "none")
                c.e2.gumbel_tau, c.e2.gumbel_tau_end = 4.0, 0.5
            elif variant == "pick_loss":
                recipes.apply_ablation(c, "none")
                c.loss.pick_weight = 0.25
            elif variant == "soft_pick":
                recipes.apply_ablation(c, "none")
                c.e2.soft_pick_until = 0.5
            elif variant == "keep_patches":
                recipes.apply_ablation(c, "none")
                c.e2.drop_patches = False
            else:
                recipes.apply_ablation(c, "none" if variant == "e2" else variant)
    if options.runlocal:
        recipes.runlocal(c)
    return c
