"""One of two processes of tests/test_checkpoints_processes.py: `Checkpoints.save_best` when the
processes' SumR disagree (process 0: better than the best so far; process 1: worse). Process 0
decides for both, so both take part in the collective save instead of one hanging in it.

    python tests/multiprocess/best_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT_JSON
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.processes
process_id, num_processes, port, workdir, out = sys.argv[1:6]
from tests.processes import xla_flags  # noqa: E402

os.environ["XLA_FLAGS"] = xla_flags()
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=int(num_processes), process_id=int(process_id))

import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from e2_jax.checkpoints import Checkpoints  # noqa: E402
from e2_jax.sharding import make_mesh  # noqa: E402

mesh = make_mesh((("fsdp", -1),))
params = jax.jit(lambda: {"w": jnp.arange(8.0)}, out_shardings={"w": NamedSharding(mesh, P("fsdp"))})()
checkpoints = Checkpoints(workdir)
first = checkpoints.save_best("warmup", 10, params, 100.0)  # the first: best on both
# Process 0 saw 120.5 (better), process 1 saw 99.0 (worse): process 0's decision and value count.
second = checkpoints.save_best("warmup", 20, params, 120.5 if jax.process_index() == 0 else 99.0)
checkpoints.wait()
best = checkpoints.best("warmup")
checkpoints.close()
with open(out, "w") as f:
    json.dump({"first": first, "second": second, "best": list(best)}, f)
jax.distributed.shutdown()
