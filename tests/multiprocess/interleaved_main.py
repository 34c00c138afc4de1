"""`python -m e2_jax.main FLAGS`, with the mesh's devices ordered process by process in turn
(0, 1, 0, 1, ... along the batch: `tests.processes.interleaved`), as `jax.make_mesh` orders a
TPU pod slice's chips: each process's devices hold rows of the batch far apart.

    python tests/multiprocess/interleaved_main.py --config ... --workdir ...
"""

import sys
from pathlib import Path

import jax
from absl import app

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.processes
from e2_jax import main, sharding
from tests.processes import interleaved

_make_mesh = sharding.make_mesh


def interleaved_mesh(axes, devices=None, *args):
    return _make_mesh(axes, interleaved(list(devices if devices is not None else jax.devices())), *args)


sharding.make_mesh = interleaved_mesh

if __name__ == "__main__":
    app.run(main.main)
