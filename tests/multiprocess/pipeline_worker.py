"""One of two processes of tests/test_multiprocess.py: the input pipeline across hosts.

    python tests/multiprocess/pipeline_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_DIR OUT_JSON

Each process has 4 CPU devices; the mesh spans all 8, with the processes interleaved (devices of
process 0, 1, 0, 1, ... along the batch, as a TPU pod slice's torus order gives): each process
holds rows far apart. Writes what this process read (its rows of each batch) and the whole
global batch as every process sees it (gathered over gloo).
"""

import itertools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.processes
process_id, num_processes, port, data_dir, out = sys.argv[1:6]
from tests.processes import xla_flags  # noqa: E402

os.environ["XLA_FLAGS"] = xla_flags(4)
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=int(num_processes), process_id=int(process_id))

from jax.experimental import multihost_utils  # noqa: E402

from e2_jax.data import pipeline as pl  # noqa: E402
from e2_jax.sharding import batch_sharding, make_mesh  # noqa: E402
from tests.processes import interleaved  # noqa: E402

GLOBAL_BATCH, STEPS, RESUME_AT, SEED = 24, 8, 5, 5
PRE = pl.Preprocessing(image_size=16, tags=(("brand", "brand", 8),))
mesh = make_mesh((("data", 8),), interleaved(jax.devices()))
sharding = batch_sharding(mesh, ("data",))
row_sums = jax.jit(lambda x: x.sum(axis=(1, 2, 3)))


def local_rows(array: jax.Array) -> list:
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
    return [x for s in shards for x in s.data.tolist()]


def everywhere(array: jax.Array) -> list:
    return multihost_utils.process_allgather(array, tiled=True).tolist()


def run(start_step: int, steps: int) -> dict:
    source = pl.Source("synth_fashion/tiny", "train", data_dir)
    out = {"local": [], "global": [], "image_sums": [], "text": []}
    batches = pl.train_batches(source, PRE, global_batch=GLOBAL_BATCH, sharding=sharding, seed=SEED,
                               start_step=start_step)
    for batch in itertools.islice(batches, steps):
        out["local"].append(local_rows(batch["index"]))
        out["global"].append(everywhere(batch["index"]))
        out["image_sums"].append(everywhere(row_sums(batch["images"])))
        out["text"].append(everywhere(batch["text"]))
    return out


result = {"rows": pl.process_rows(sharding, GLOBAL_BATCH).tolist(),
          "train": run(0, STEPS), "resumed": run(RESUME_AT, STEPS - RESUME_AT)}
validation = pl.Source("synth_fashion/tiny", "validation", data_dir)
result["eval"] = [{"index": local_rows(b["index"]), "valid": local_rows(b["valid"])}
                  for b in pl.eval_batches(validation, PRE, global_batch=GLOBAL_BATCH, sharding=sharding)]
with open(out, "w") as f:
    json.dump(result, f)
jax.distributed.shutdown()
