"""The config a training workdir was started with (its config.json), to resume it as it was:

    python -m e2_jax.main --config configs/workdir.py:/tmp/e2_synth --workdir /tmp/e2_synth

Overrides a resume may change (`--config.finetune.steps=...`, `--config.eval.every_steps=...`;
the list is e2_jax.workdir.RESUMABLE) go on the command line as usual.
"""

from e2_jax import workdir


def get_config(arg=None):
    if not arg:
        raise ValueError("name the workdir: --config configs/workdir.py:DIR")
    return workdir.read_config(arg)
