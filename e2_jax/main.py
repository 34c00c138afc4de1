"""`python -m e2_jax.main --config configs/e2_b16.py --workdir DIR`: train and evaluate E².

    --config configs/e2_b32.py:dataset=amazon_fashion,ablation=no_fusion   variants by argument
    --config.batch_size=32 --config.finetune.lr=1e-5                        any field by flag
    --mode train | evaluate | train_and_evaluate (default)

The same command on a laptop CPU, one GPU, a GPU cluster (one process per host, see
launch/) and a TPU pod (`--worker=all`). A run resumes from the latest checkpoint in
`--workdir`; the resolved config is written there as config.json. Compiled programs are kept
in a per-user cache (`--compilation_cache`, see e2_jax/training/compilation.py).
"""

from __future__ import annotations

if __name__ == "__main__":  # first: a preemption notice during the imports below exits cleanly
    from e2_jax.training import preemption

    preemption.install()

import logging as logging_std
import os
import sys
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from e2_jax import distributed, errors, visualize
from e2_jax.evaluation import evaluate
from e2_jax.training import compilation, preemption, train

MODES = ("train", "evaluate", "train_and_evaluate")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the config go.")
_MODE = flags.DEFINE_enum("mode", "train_and_evaluate", list(MODES), "What to do.")
_CACHE = flags.DEFINE_string("compilation_cache", None,
                             "JAX's persistent compilation cache folder (default: JAX_COMPILATION_CACHE_DIR, else "
                             "~/.cache/e2_jax/xla); '' turns it off.")
flags.mark_flags_as_required(["config", "workdir"])


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, mode: str = "train_and_evaluate",
        hooks: train.Hooks | None = None) -> dict[str, Any]:
    """Trains (validating as it goes unless `mode` is "train") and, with "evaluate" or once a
    "train_and_evaluate" run is complete, evaluates its best parameters under every protocol
    and draws selection maps."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "evaluate":
        result = train.run(config, workdir, validate=mode == "train_and_evaluate", hooks=hooks)
        if mode == "train" or not result.get("complete"):
            return result
        logging.info("training in %s is complete; evaluating its best parameters", workdir)
    with preemption.nothing_to_save("evaluation"):  # run again, it writes the same reports
        evaluated = evaluate.evaluate_run(config, workdir)
        visualize.run_selection_maps(workdir, evaluated.source, evaluated.spec.clip, evaluated.spec.e2,
                                     evaluated.params, evaluated.where, config.eval.selection_maps)
        start = time.perf_counter()
        page = visualize.write_report_page(workdir, evaluated.result["report"], evaluated.source, evaluated.spec.clip,
                                           evaluated.spec.e2, evaluated.params, evaluated.where)
        if page is not None:
            print(f"report with pictures: {page} ({time.perf_counter() - start:.1f} s)", flush=True)
    return evaluated.result


class _QuietOrbax(logging_std.Filter):
    """Orbax logs every step of every save at INFO; keep its warnings and errors."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno > logging_std.INFO or "/orbax/" not in record.pathname


def main(argv: list[str], hooks: train.Hooks | None = None) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietOrbax())
    config = _CONFIG.value
    distributed.initialize(config.distributed)  # multi-host start-up before anything touches a device
    if jax.process_count() > 1:
        preemption.share_with_jax()  # the processes agree on a step through JAX's preemption sync point
    cache = compilation.setup(compilation.default_cache_dir() if _CACHE.value is None else _CACHE.value)
    logging.info("XLA compilation cache: %s", cache or "off")
    try:
        result = run(config, _WORKDIR.value, _MODE.value, hooks)
    except train.TrainingError as error:
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if jax.process_count() > 1:
            jax.distributed.shutdown()  # every process leaves together, now rather than at exit
    if line := summary(result):
        print(line, flush=True)


def summary(result: dict[str, Any]) -> str | None:
    """The run's last line: the last validation of a run that stopped before its evaluation; none
    after an evaluation, whose report is already printed (once)."""
    if "eval" in result and "report" not in result:
        return f"validation: {evaluate.format_retrieval(result['eval'])}"
    return None


if __name__ == "__main__":
    errors.run(main)
