"""The embedding export (`search index --dataset`) on 8 devices equals it on 1: every
(product, view) once, in order, with a batch (12, rounded to 16) that divides neither the 16
products nor their 48 views."""

import jax
import numpy as np

from e2_jax import search, spec
from e2_jax.inference import Encoder
from e2_jax.training import step
from tests.test_evaluate import eval_config


def test_index_on_8_devices_equals_1_device(synth_tiny, tmp_path):
    run = spec.resolve(eval_config(synth_tiny), stages=False)
    params = step.initial_params(run)
    got = {}
    for name, devices in (("8", jax.devices()), ("1", jax.devices()[:1])):
        encoder = Encoder(run.clip, run.e2, params, devices=devices)
        assert encoder.mesh.size == int(name)
        search.index_split(encoder, "synth_fashion/tiny", "validation", tmp_path / f"{name}.npz", data_dir=synth_tiny,
                           views="all", regions=True, batch_size=12)
        with np.load(tmp_path / f"{name}.npz") as data:
            got[name] = {k: data[k] for k in ("ids", "views", "embeddings", "regions")}
    assert len(got["8"]["ids"]) == 48 and len(set(zip(got["8"]["ids"], got["8"]["views"], strict=True))) == 48
    np.testing.assert_array_equal(got["8"]["ids"], got["1"]["ids"])
    np.testing.assert_array_equal(got["8"]["views"], got["1"]["views"])
    np.testing.assert_allclose(got["8"]["embeddings"], got["1"]["embeddings"], atol=1e-6)
    np.testing.assert_allclose(got["8"]["regions"], got["1"]["regions"], atol=1e-6)
