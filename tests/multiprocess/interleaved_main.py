"""`python -m e2_jax.main FLAGS`, with the mesh's devices ordered process by process in turn
(0, 1, 0, 1, ... along the batch), as `jax.make_mesh` orders a TPU pod slice's chips: each
process's devices hold rows of the batch far apart. The CPU devices of local processes are
otherwise numbered process by process, which never shows that case.

    python tests/multiprocess/interleaved_main.py --config ... --workdir ...
"""

import jax
from absl import app

from e2_jax import main, sharding

_make_mesh = sharding.make_mesh


def interleaved_mesh(axes, devices=None):
    devices = list(devices if devices is not None else jax.devices())
    by_process = [[d for d in devices if d.process_index == p] for p in sorted({d.process_index for d in devices})]
    return _make_mesh(axes, [d for turn in zip(*by_process, strict=True) for d in turn])


sharding.make_mesh = interleaved_mesh

if __name__ == "__main__":
    app.run(main.main)
