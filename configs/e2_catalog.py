"""E² on your own catalog (docs/catalog.md): the paper's recipe on a table you built.

    python -m e2_jax.data.build catalog/mystore --manual-dir ~/data/mystore
    python -m e2_jax.main --workdir workdirs/mystore \\
        --config 'configs/e2_catalog.py:name=mystore,text={title}. {description},groups=brand+material+category'

Arguments (comma-separated; a text format that needs a comma goes in `--config.data.text_format`):
- `name`: the catalog (`catalog/NAME`, as built); `data_dir`: where it was built ("" = TFDS's).
- `text`: the global text, a format of the catalog's fields (default `{title}`).
- `groups`: the region groups, fields joined by `+`: each gets E²'s two selection tokens and a
  region loss against the CLIP embedding of its value. Pick fields whose values show on the
  image (a brand's logo, a material's label, a category's shape); "" trains without groups.
- `description`: a second text format for evaluation (retrieval with it as the query), or "".
- `sample_field`: sample-100's negatives share this field ("" = any product).
- `preset`, `pretrained`: the CLIP to start from, converted with `python -m e2_jax.convert`
  (default `models/clip_<preset>`, e.g. `models/clip_b16`).
- `method`: `e2` or `clip_ft` (the fine-tuning baseline; also what no groups train);
  `ablation`: one of the paper's E² ablations (`no_fusion`, `no_region_loss`, ...);
  `eval_split`: the held-out split.
- `runlocal`: the same catalog with a tiny random model for a few steps (a CPU smoke run).

The paper's recipe (`e2_jax.config.paper_recipe`): E² trains its new parameters for 5 epochs,
then everything for 20; CLIP-FT everything for 25; batch 64, Adam with L2 weight decay 1e-4
(the authors' `adam_l2`), bfloat16 matmuls.
"""

from e2_jax import config as recipes
from e2_jax.errors import ConfigError


def get_config(arg=None):
    options = recipes.parse_arg(arg, name="", data_dir="", text="{title}", groups="", description="",
                                sample_field="", preset="ViT-B-16", pretrained="", method="e2", ablation="none",
                                eval_split="validation", runlocal=False)
    if not options.name:
        raise ConfigError("configs/e2_catalog.py needs name=NAME, the catalog built as catalog/NAME (docs/catalog.md)")
    if options.method == "e2" and not options.groups:
        options.method = "clip_ft"  # no groups: nothing for selection tokens to learn
    c = recipes.paper_recipe(options.preset, options.method)
    c.model.pretrained = options.pretrained or c.model.pretrained
    c.data.dataset, c.data.data_dir, c.data.eval_split = f"catalog/{options.name}", options.data_dir, options.eval_split
    c.data.text_format = options.text
    # Tag lengths of 0 (the model's context): region texts are trimmed to their tokens anyway.
    c.e2.groups = tuple(recipes.group(field) for field in filter(None, options.groups.split("+")))
    c.eval.texts = ("tags", "description") if options.description else ("tags",)
    c.eval.description_format = options.description or options.text
    c.eval.sample_field = options.sample_field
    if options.method == "e2":
        recipes.apply_ablation(c, options.ablation)
    elif options.ablation != "none":
        raise ConfigError(f"ablation={options.ablation} is an ablation of E², not of CLIP-FT (method=clip_ft, or no "
                          "groups)")
    if options.runlocal:
        catalog_data = c.data.to_dict(), c.eval.to_dict(), c.e2.groups
        recipes.runlocal(c)  # a tiny model, a few steps; then the catalog again
        c.data.update(catalog_data[0])
        c.eval.update({k: catalog_data[1][k] for k in ("texts", "description_format", "sample_field")})
        c.e2.groups = catalog_data[2]
    return c
