"""A training run whose workdir is in a bucket (tests/test_storage.py), in its own process so that
the bucket's environment (emulator endpoints, epath's backend) is set before anything reads it.

    python tests/multiprocess/bucket_worker.py DATA_DIR WORKDIR OUT_JSON

Stage 1 in one run, stage 2 in a second run that resumes from the bucket (and starts from stage
1's best parameters, saved there), then evaluation mode and the embedding API on the bucket;
writes what the test compares with a local run.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.test_train
data_dir, workdir, out = sys.argv[1:4]

import numpy as np  # noqa: E402

from e2_jax import main, storage  # noqa: E402
from e2_jax.inference import Encoder  # noqa: E402
from e2_jax.training import train  # noqa: E402
from tests.test_train import tiny_config  # noqa: E402

remote = storage.path(workdir)
train.run(tiny_config(data_dir, stages=("warmup",), **{"optim.grad_clip": 1.0}), workdir)
after_first = sorted(p.name for p in (remote / "checkpoints").iterdir())
config = tiny_config(data_dir, **{"optim.grad_clip": 1.0})
result = train.run(config, workdir)
evaluated = main.run(tiny_config(data_dir, **{"optim.grad_clip": 1.0, "eval.sample_negatives": 8}), workdir,
                     mode="evaluate")
encoder = Encoder.from_workdir(workdir)
images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
Path(out).write_text(json.dumps({
    "checkpoints_after_first_run": after_first,
    "step": result["step"],
    "metrics_jsonl": (remote / "metrics.jsonl").read_text(),
    "tensorboard_files": [p.name for p in (remote / "tensorboard").iterdir()],
    "report": json.loads((remote / "eval" / "report.json").read_text()),
    "evaluated_metrics": evaluated["report"]["metrics"],
    "selection_maps": len(list((remote / "eval" / "selection_maps").glob("*_selection.png"))),
    "encoder": {"origin": encoder.origin, "source": encoder.source},
    "embeddings": encoder.encode_images(list(images)).tolist(),
}))
