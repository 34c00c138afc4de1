"""Evaluation on 8 devices equals evaluation on 1: embeddings of every (product, view) once,
with a batch that divides neither the product nor the image count, and blocked ranks with the
rows split over 8 devices equal to the one-device ranks."""

import jax
import numpy as np
from jax.sharding import Mesh

from e2_jax import spec
from e2_jax.evaluation import evaluate, retrieval
from e2_jax.sharding import batch_sharding
from e2_jax.training import step
from tests.test_evaluate import eval_config


def test_ranks_on_8_devices_equal_1_device():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1000, 32), dtype=np.float32)
    text = image + rng.standard_normal((1000, 32), dtype=np.float32)
    product = np.sort(rng.integers(0, 300, size=1000))
    eight = Mesh(np.array(jax.devices()), ("rows",))
    one = Mesh(np.array(jax.devices()[:1]), ("rows",))
    for kw in ({}, {"image_product": product}):
        t = text if not kw else text[:300]
        a = retrieval.ranks(image, t, tile=256, mesh=eight, **kw)
        b = retrieval.ranks(image, t, tile=256, mesh=one, **kw)
        for d in ("i2t", "t2i"):
            np.testing.assert_array_equal(a[d], b[d])


def test_report_on_8_devices_equals_1_device(synth_tiny):
    run = spec.resolve(eval_config(synth_tiny), stages=False)
    assert run.mesh.size == 8
    source = evaluate.open_source(run.config, run.protocols)
    params = step.initial_params(run)
    images, texts = evaluate.make_embed(run)
    protocols = run.protocols
    reports = {}
    for name, devices in (("8", jax.devices()), ("1", jax.devices()[:1])):
        mesh = Mesh(np.array(devices), ("data",))
        p = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        reports[name] = evaluate.retrieval_report(
            source, run.pre, protocols, embed_images=lambda b, p=p: images(p, b),
            embed_texts=lambda b, p=p: texts(p, b), global_batch=40, sharding=batch_sharding(mesh, ("data",)))
    assert reports["8"]["counts"] == reports["1"]["counts"]
    assert {k: reports["8"]["counts"][k] for k in ("products", "images", "sample_100_queries")} == {
        "products": 16, "images": 48, "sample_100_queries": 16}
    assert reports["8"]["metrics"] == reports["1"]["metrics"]
