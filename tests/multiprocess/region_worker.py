"""One of two processes of tests/test_multiprocess.py: packed region texts across hosts.

    python tests/multiprocess/region_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_DIR OUT_JSON

Each process has 1 CPU device and packs the tags of its own rows; the processes agree on the
calls' shapes (e2_jax.distributed.agree_max), and the trainer's step gives the per-item
encoding's loss and gradients (checked here, on the whole parameter tree). Writes this
process's own needs, the agreed calls and the losses.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.*
process_id, num_processes, port, data_dir, out = sys.argv[1:6]
from tests.processes import xla_flags  # noqa: E402

os.environ["XLA_FLAGS"] = xla_flags(1)
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=int(num_processes), process_id=int(process_id))

from e2_jax.data import pipeline, region_texts  # noqa: E402
from e2_jax.sharding import batch_sharding  # noqa: E402
from e2_jax.training import train  # noqa: E402
from tests import region_equality  # noqa: E402

c = region_equality.config(data_dir)
packed = region_equality.one_step(c, "packed")
per_item = region_equality.one_step(c, "per_item")
region_equality.assert_equal_steps(packed, per_item)

spec, data = train.prepare(c, validate=False)
rows = pipeline.process_rows(batch_sharding(spec.mesh), c.batch_size)
local = next(pipeline.local_train_batches(data.train, spec.pre, global_batch=c.batch_size, rows=rows, seed=c.seed))
needs = region_texts.Packing("packed", len(rows)).needs([local["tags"][g] for g, _, _ in spec.pre.tags])
Path(out).write_text(json.dumps({"needs": needs.tolist(), "calls": packed["calls"], "loss": packed["loss"],
                                 "per_item_loss": per_item["loss"]}))
