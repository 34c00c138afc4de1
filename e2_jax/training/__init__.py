"""Training: a run's stages and loop (`train`), one stage as a jitted program (`step`) and the
persistent compilation cache (`compilation`). The optimizers, checkpoints and metrics they use
are the package's shared parts (`e2_jax.optim`, `e2_jax.checkpoints`, `e2_jax.metrics`), used
by captioning too."""
