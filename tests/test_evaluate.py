"""The evaluation run: every protocol through the real pipeline and model, on 1 and 2
processes (tests/multiprocess/eval_worker.py), and the report it writes."""

from pathlib import Path

import jax
import numpy as np
import pytest

from e2_jax import config as recipes
from e2_jax import spec
from e2_jax.data import pipeline
from e2_jax.evaluation import evaluate, retrieval, selection
from e2_jax.evaluation.protocols import REGISTRY
from e2_jax.evaluation.report import markdown_table
from e2_jax.training import step
from tests.processes import run_workers

WORKER = Path(__file__).parent / "multiprocess" / "eval_worker.py"


def eval_config(data_dir: str):
    """A random tiny model on SynthFashion/tiny (16 validation products, 3 views each); an
    evaluation batch of 40 divides neither the 16 texts nor the 48 images."""
    c = recipes.base()
    recipes.runlocal(c)
    c.data.data_dir, c.data.build_if_missing = data_dir, False
    c.eval.batch_size = 40
    return c


@pytest.mark.slow
def test_every_protocol_on_one_and_two_processes(synth_tiny, tmp_path):
    (alone,) = run_workers(WORKER, 1, synth_tiny, tmp_path)
    first, second = run_workers(WORKER, 2, synth_tiny, tmp_path)
    assert alone["devices"] == 1 and first["devices"] == second["devices"] == 2
    report = alone["report"]
    # The report says what ran: 16 queries (of 1,000 asked), and how many had to be topped up
    # (those whose sub-category has fewer than 8 other products).
    subcategory = pipeline.Source("synth_fashion/tiny", "validation", synth_tiny).scan(["subcategory"])["subcategory"]
    sizes = {c: int(np.sum(subcategory == c)) for c in subcategory}
    short = sum(sizes[c] - 1 < 8 for c in subcategory)
    assert short > 0  # SynthFashion/tiny: every sub-category is small
    assert report["counts"] == {"products": 16, "images": 48, "sample_100_queries": 16,
                                "sample_100_topped_up": short, "sample_100_short": 0}
    assert report["protocols"]["sample_100"].startswith(
        f"16 query products (of 1,000 asked: the split has 16 products), each against 8 negatives of the same "
        f"subcategory; {short} of them topped up")
    keys = {f"{p}/{t}/{m}" for p in REGISTRY for t in ("tags", "description")
            for m in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "sumr")}
    assert set(report["metrics"]) == keys
    # Two processes: the same embeddings on both, equal to one process's, and the same numbers.
    for other in (first, second):
        assert {k: v for k, v in other["report"].items() if k != "examples"} == \
            {k: v for k, v in report.items() if k != "examples"}
        # The page's examples: the same products and ranks; their scores to float32 rounding.
        for part in ("queries", "misses"):
            for got, want in zip(other["report"]["examples"][part], report["examples"][part], strict=True):
                assert (got["product"], got["rank"]) == (want["product"], want["rank"])
                assert [j for j, _ in got["top"]] == [j for j, _ in want["top"]]
                assert [s for _, s in got["top"]] == pytest.approx([s for _, s in want["top"]], abs=1e-5)
        for name in ("image", "text"):
            np.testing.assert_allclose(np.array(other["embeddings"][name]), np.array(alone["embeddings"][name]),
                                       rtol=1e-5, atol=1e-6)
    # The plumbing: images are every view of every product in order (3 each), texts the two
    # formats one after the other; the report's numbers are the metrics of those rows.
    image, text = np.array(alone["embeddings"]["image"]), np.array(alone["embeddings"]["text"])
    assert image.shape[0] == 48 and text.shape[0] == 32
    tags, description = text[:16], text[16:]
    product = np.repeat(np.arange(16), 3)
    for name, t in (("tags", tags), ("description", description)):
        want = retrieval.full_candidate(image[::3], t)
        assert {k: report["metrics"][f"full_candidate/{name}/{k}"] for k in want} == want
        want = retrieval.full_gallery(image, product, t)
        assert {k: report["metrics"][f"full_gallery/{name}/{k}"] for k in want} == want
    assert not np.allclose(tags, description)  # two texts really were encoded


def test_picks_on_details_counts_by_hand():
    # A 2 x 2 grid; two images; details: brand (the logo) and season (the tag).
    boxes = np.array([[[0.1, 0.1, 0.4, 0.4], [0.6, 0.6, 0.9, 0.9]],   # logo in patch 0, tag in patch 3
                      [[0.4, 0.4, 0.6, 0.6], [-1, -1, -1, -1]]],       # logo on all four patches, no tag
                     np.float32)
    groups = [("brand", "brand", 2), ("description", "description", 1)]
    # picks [blocks, images, tokens]: brand's two tokens, then description's one
    picks = np.array([[[0, 1, 3], [2, 0, 1]],
                      [[3, 3, 0], [1, 1, 1]]])
    report = selection.picks_on_details(picks, boxes, 2, groups, ("brand", "season"))
    first, second = report["brand"]["blocks"]
    assert report["brand"]["detail"] == "brand" and report["description"]["detail"] is None
    # block 1: image 0 picks 0 (on) and 1 (off), image 1 picks 2 and 0 (both on): 3 of 4
    assert first["on_own"] == 75.0 and first["images"] == 2
    assert first["chance"] == 100 * (1 + 4) / 8  # 1 of 4 patches, then 4 of 4
    # any detail: image 0's patches 0 and 3, image 1's all four; brand's picks 0, 1, 2, 0
    assert first["on_any"] == 75.0 and first["chance_any"] == 100 * 6 / 8
    # block 2: image 0 picks 3 twice (the tag, not the logo), image 1 picks 1 twice (the logo)
    assert second["on_own"] == 50.0 and second["on_any"] == 100.0
    description = report["description"]["blocks"]
    assert description[0]["on_own"] is None and description[0]["on_any"] == 100.0  # picks 3 (tag), 1 (logo)
    assert description[1]["on_any"] == 100.0  # picks 0 (logo), 1 (logo)
    table = markdown_table(*selection.table(report))
    assert "| description | 1 | no visual detail |" in table and "| brand | 2 | 50.0 | 62.5 | 2 |" in table
    with pytest.raises(ValueError, match="3 tokens"):
        selection.picks_on_details(picks[..., :2], boxes, 2, groups, ("brand", "season"))


def _forced_to_pick(params: dict, patches: list[int]) -> dict:
    """`params` changed so that selection token t picks patch `patches[t]` in both fusion
    blocks, whatever the image: every layer's residual branch is zero (the transformer is the
    identity), the patch embedding is zero, patch `patches[t]`'s position embedding is the
    one-hot e_t, which is also token t's value, and the fusion projections are the identity; so
    after ln_pre token t is e_t normalised, and its score is largest at that patch."""
    visual = jax.tree.map(np.array, params["visual"])
    width = visual["class_embedding"].shape[0]
    for block in visual["transformer"].values():
        for layer in (block["attn"]["out_proj"], block["mlp"]["c_proj"]):
            layer["kernel"][:], layer["bias"][:] = 0, 0
    for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre/bias"):
        *path, last = name.split("/")
        target = visual
        for key in path:
            target = target[key]
        target[last][:] = 0
    visual["ln_pre"]["scale"][:] = 1
    one_hot = np.eye(width, dtype=np.float32)[: len(patches)]
    visual["selection_tokens"][:] = one_hot
    visual["positional_embedding"][1 + np.array(patches)] = one_hot
    for block in ("fusion_1", "fusion_2"):
        for projection in ("proj_q", "proj_k", "proj_v"):
            visual[block][projection][:] = np.eye(width)
    return {**params, "visual": visual}


def test_picks_on_details_of_a_model_forced_to_pick_known_patches(synth_tiny):
    run = spec.resolve(eval_config(synth_tiny), stages=False)
    source = evaluate.open_source(run.config, run.protocols)
    grid = run.clip.image_size // run.clip.patch_size  # 4 x 4 patches
    # Token order: subcategory, brand, description, season, composition (two each). On tiny's
    # front view the logo is about patch 6, the tag 13; the back's label about 1, 2, 5, 6.
    patches = [1, 2, 6, 7, 3, 4, 13, 15, 5, 0]
    report = evaluate.picks_report(run, source, _forced_to_pick(step.initial_params(run), patches))
    # What the forced picks must score, counted here from the dataset's boxes.
    boxes = source.scan([evaluate.DETAIL_BOXES])[evaluate.DETAIL_BOXES].reshape(-1, 3, 4)  # every view

    def overlaps(box, patch):
        r, c = divmod(patch, grid)
        return box[0] >= 0 and box[0] < (r + 1) / grid and box[2] > r / grid and box[1] < (c + 1) / grid \
            and box[3] > c / grid

    for g, (name, detail) in enumerate((("subcategory", None), ("brand", 0), ("description", None),
                                        ("season", 2), ("composition", 1))):
        mine = patches[2 * g : 2 * g + 2]
        on_any = 100 * np.mean([any(overlaps(b, p) for b in view) for view in boxes for p in mine])
        for block in report[name]["blocks"]:
            assert block["on_any"] == pytest.approx(on_any)
            if detail is None:
                assert block["on_own"] is None
                continue
            shown = [view[detail] for view in boxes if view[detail][0] >= 0]
            assert block["images"] == len(shown) == 32  # two of the three views show each detail
            assert block["on_own"] == pytest.approx(100 * np.mean([overlaps(b, p) for b in shown for p in mine]))
    assert 0 < report["brand"]["blocks"][0]["on_own"] < 100  # patch 6 is on the logo in some views, 7 in fewer
    assert report["brand"]["blocks"][0]["on_own"] > report["brand"]["blocks"][0]["chance"]


def test_a_protocol_registered_in_one_place_is_chosen_by_name_and_run(synth_tiny, monkeypatch):
    """A protocol is one `register` in e2_jax/evaluation/protocols.py: the config names it, the
    report runs it on what it asks for (first views only here) and says what it does."""
    from e2_jax.errors import ConfigError
    from e2_jax.evaluation import protocols

    monkeypatch.setitem(protocols.REGISTRY, "first_views", None)  # restored after the test
    protocols.register("first_views", every_view=False, describe=lambda p: f"first views, seed {p.seed}")(
        lambda split, text, p: (retrieval.full_candidate(split.image, text), {"first_views_rows": len(split.image)}))
    c = eval_config(synth_tiny)
    c.eval.protocols = ("first_views",)
    run = spec.resolve(c, stages=False)
    source = evaluate.open_source(run.config, run.protocols)
    # Each product's image and its texts embed to the product's own axis: every query finds itself.
    def one_hot(batch):
        return jax.nn.one_hot(batch["index"], 16)

    report = evaluate.retrieval_report(source, run.pre, run.protocols, embed_images=one_hot, embed_texts=one_hot,
                                       global_batch=40, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    assert report["counts"] == {"products": 16, "images": 16, "first_views_rows": 16}  # no view beyond the first
    assert report["protocols"] == {"first_views": "first views, seed 0"}
    assert {k: v for k, v in report["metrics"].items() if k.endswith("sumr")} == {
        "first_views/tags/sumr": 600.0, "first_views/description/sumr": 600.0}
    with pytest.raises(ConfigError, match=r"unknown evaluation protocols \['first_view'\]; known: .*'first_views'"):
        c.eval.protocols = ("first_view",)
        spec.resolve(c, stages=False)
