"""Linear probes: how much of an attribute a frozen image embedding holds.

    python -m e2_jax.probe --model workdirs/clip_ft --model workdirs/e2 --pretrained models/clip_b32 \
        --dataset fashion_gen --fields brand,season,subcategory,composition --out probes.json

For each model (a training workdir's best parameters, or a converted CLIP) and each field, a
multinomial logistic regression is fitted on the L2-normalised global image embeddings of the
training split (first views, or `--view`; `--max-train` products drawn at random from `--seed`)
and scored on the evaluation split (the same view): top-1 accuracy in percent. `--view V` embeds
each product's view V (modulo its number of views): the detail a field is read from may be on
another view than the first, as SynthFashion's care label (composition) is on the back. The L2 penalty is picked
from a small grid by accuracy on a held-out tenth of the training products, then the probe is
refitted on all of them (full-batch L-BFGS, as CLIP's linear-probe evaluation does).

Classes with fewer than `--min-count` training products are dropped (too few to learn); the
evaluation products of dropped or unseen classes are left out of that field's accuracy, and
the report says how many classes and products each field kept and dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from e2_jax import distributed, errors
from e2_jax.data import pipeline
from e2_jax.evaluation import report as report_lib
from e2_jax.inference import Encoder

PENALTIES = (1e-5, 1e-4, 1e-3, 1e-2)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    accuracy: float  # percent, on the kept evaluation products
    classes: int  # kept
    dropped_classes: int
    train_examples: int
    eval_examples: int  # scored
    eval_left_out: int  # of dropped or unseen classes
    penalty: float


@functools.partial(jax.jit, static_argnames=("steps",))
def _lbfgs(x: jax.Array, y: jax.Array, w: jax.Array, penalty: jax.Array, steps: int) -> jax.Array:
    def loss(w):
        return optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean() + penalty * jnp.sum(w[:-1] ** 2)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        w, state = carry
        value, grad = value_and_grad(w, state=state)
        updates, state = solver.update(grad, state, w, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(w, updates), state), None

    (w, _), _ = jax.lax.scan(step, (w, solver.init(w)), None, length=steps)
    return w


def fit_logistic(x: np.ndarray, y: np.ndarray, classes: int, penalty: float, steps: int = 200) -> np.ndarray:
    """Weights [D + 1, C] of a multinomial logistic regression (with bias) minimising the mean
    cross-entropy + penalty * |W|^2, by full-batch L-BFGS (one compile per data shape)."""
    x = jnp.asarray(np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1), jnp.float32)
    w = jnp.zeros((x.shape[1], classes), jnp.float32)
    return np.asarray(_lbfgs(x, jnp.asarray(y), w, jnp.float32(penalty), steps))


def _predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.argmax(np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1) @ w, axis=1)


def linear_probe(train_x: np.ndarray, train_labels: Sequence[str], eval_x: np.ndarray, eval_labels: Sequence[str],
                 *, min_count: int = 5, seed: int = 0, penalties: Sequence[float] = PENALTIES) -> ProbeResult:
    """Fits on (train_x, train_labels), scores on (eval_x, eval_labels); see the module doc."""
    train_labels, eval_labels = np.asarray(train_labels), np.asarray(eval_labels)
    names, counts = np.unique(train_labels, return_counts=True)
    kept = names[counts >= min_count]
    if len(kept) < 2:
        raise ValueError(f"fewer than 2 classes with {min_count}+ training examples ({len(names)} classes in all)")
    index = {name: i for i, name in enumerate(kept)}
    train_keep = np.isin(train_labels, kept)
    eval_keep = np.isin(eval_labels, kept)
    tx, ty = train_x[train_keep], np.array([index[v] for v in train_labels[train_keep]])
    ex, ey = eval_x[eval_keep], np.array([index[v] for v in eval_labels[eval_keep]], np.int64)
    if len(ex) == 0:
        raise ValueError("no evaluation example belongs to a kept class")
    rng = np.random.default_rng(seed)
    held = rng.random(len(tx)) < 0.1
    best = max(penalties, key=lambda p: (np.mean(_predict(fit_logistic(tx[~held], ty[~held], len(kept), p),
                                                          tx[held]) == ty[held]), -p)) if held.any() else penalties[0]
    w = fit_logistic(tx, ty, len(kept), best)
    accuracy = 100.0 * float(np.mean(_predict(w, ex) == ey))
    return ProbeResult(accuracy, len(kept), len(names) - len(kept), len(tx), len(ex), int((~eval_keep).sum()), best)


def view_embeddings(encoder, source, index: np.ndarray, view: int = 0, batch_size: int = 256) -> np.ndarray:
    """Global image embeddings [len(index), D] of products `index`, view `view` of each
    (modulo its number of views)."""
    if view < 0:
        raise ValueError(f"view must be >= 0, got {view}")
    items = np.stack([index, np.full_like(index, view)], axis=1)
    return encoder.split_outputs(source, items, batch_size)["global"]


def probe_models(encoders: dict, dataset: str, fields: Sequence[str], *, data_dir: str | None = None,
                 train_split: str = "train", eval_split: str = "validation", max_train: int = 0,
                 min_count: int = 5, seed: int = 0, batch_size: int = 256, view: int = 0) -> dict:
    """{model: {field: ProbeResult as a dict}} for every encoder and field, on each product's
    view `view` (modulo its number of views) in both splits."""
    train_source = pipeline.Source(dataset, train_split, data_dir)
    eval_source = pipeline.Source(dataset, eval_split, data_dir)
    train_labels = train_source.scan(fields)
    eval_labels = eval_source.scan(fields)
    train_index = np.arange(len(train_source))
    if max_train and max_train < len(train_index):
        train_index = np.sort(np.random.default_rng(seed).choice(train_index, max_train, replace=False))
    report = {}
    for name, encoder in encoders.items():
        tx = view_embeddings(encoder, train_source, train_index, view, batch_size)
        ex = view_embeddings(encoder, eval_source, np.arange(len(eval_source)), view, batch_size)
        report[name] = {f: dataclasses.asdict(linear_probe(tx, train_labels[f][train_index], ex, eval_labels[f],
                                                           min_count=min_count, seed=seed)) for f in fields}
    return report


def table(report: dict, fields: Sequence[str]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """(header, rows): one row per model, one column per field: accuracy (classes)."""
    return (("model", *fields), [
        (name, *(f"{results[f]['accuracy']:.1f} ({results[f]['classes']} classes)" for f in fields))
        for name, results in report.items()])


def main(argv: list[str] | None = None) -> None:
    distributed.single_host_only("python -m e2_jax.probe")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="a training workdir (repeatable)")
    parser.add_argument("--pretrained", action="append", default=[], help="a converted CLIP (repeatable)")
    parser.add_argument("--dataset", default="fashion_gen")
    parser.add_argument("--data-dir")
    parser.add_argument("--fields", default="brand,season,subcategory,composition")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--eval-split", default="validation")
    parser.add_argument("--max-train", type=int, default=0, help="0: every training product")
    parser.add_argument("--min-count", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--view", type=int, default=0, help="which view of each product to embed (0: the first)")
    parser.add_argument("--out", help="a folder for the report: report.json, report.md and report.html")
    args = parser.parse_args(argv)

    if not args.model and not args.pretrained:
        raise SystemExit("name at least one --model WORKDIR or --pretrained PATH")
    encoders = {str(w): Encoder.from_workdir(w) for w in args.model}
    encoders |= {str(p): Encoder.from_pretrained(p) for p in args.pretrained}
    fields = [f.strip() for f in args.fields.split(",") if f.strip()]
    report = probe_models(encoders, args.dataset, fields, data_dir=args.data_dir, train_split=args.train_split,
                          eval_split=args.eval_split, max_train=args.max_train, min_count=args.min_count,
                          seed=args.seed, view=args.view)
    header, rows = table(report, fields)
    markdown = report_lib.markdown_table(header, rows)
    print(markdown)
    if args.out:
        report_lib.write(args.out, report, markdown, page=("Linear probes", [
            report_lib.Text(f"Accuracy (%) of a linear probe of the frozen image embedding (view {args.view}) on "
                            f"{args.dataset}/{args.eval_split}, fitted on {args.train_split}."),
            report_lib.Table(header, tuple(tuple(r) for r in rows))]))


if __name__ == "__main__":
    errors.main(main)
