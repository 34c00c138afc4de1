"""One process of an evaluation run (tests/test_evaluate.py): the report of a random tiny model
on SynthFashion/tiny's validation split, every protocol, from 1 or 2 processes.

    python tests/multiprocess/eval_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_DIR OUT_JSON

One CPU device per process. Writes the metrics and the embeddings every process gathered.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.test_evaluate
process_id, num_processes, port, data_dir, out = sys.argv[1:6]
from tests.processes import xla_flags  # noqa: E402

os.environ["XLA_FLAGS"] = xla_flags()
import jax  # noqa: E402

if int(num_processes) > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=int(num_processes), process_id=int(process_id))

import numpy as np  # noqa: E402

from e2_jax import spec  # noqa: E402
from e2_jax.evaluation import evaluate  # noqa: E402
from e2_jax.sharding import batch_sharding, host_array  # noqa: E402
from e2_jax.training import step  # noqa: E402
from tests.test_evaluate import eval_config  # noqa: E402

run = spec.resolve(eval_config(data_dir), stages=False)
source = evaluate.open_source(run.config, run.protocols)
params = step.initial_params(run)
images, texts = evaluate.make_embed(run)
seen = {}


def keep(name, fn):
    def run(batch):
        x = fn(params, batch)
        seen.setdefault(name, []).append(host_array(x)[host_array(batch["valid"])])
        return x
    return run


report = evaluate.retrieval_report(source, run.pre, run.protocols,
                                   embed_images=keep("image", images), embed_texts=keep("text", texts),
                                   global_batch=run.config.eval.batch_size, sharding=batch_sharding(run.mesh))
embeddings = {k: np.concatenate(v).tolist() for k, v in seen.items()}
with open(out, "w") as f:
    json.dump({"report": report, "embeddings": embeddings, "devices": jax.device_count()}, f)
if int(num_processes) > 1:
    jax.distributed.shutdown()
