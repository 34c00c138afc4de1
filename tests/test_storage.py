"""A workdir in a bucket: training, resuming, evaluating and loading through gs:// paths, against
a local Google Cloud Storage emulator that speaks the JSON API (tests/gcs_emulator.py).

The run is a separate process (tests/multiprocess/bucket_worker.py) with the bucket's environment
set from its start: epath reaches the emulator through fsspec/gcsfs (EPATH_USE_TF=false,
STORAGE_EMULATOR_HOST) and Orbax's tensorstore through TENSORSTORE_GCS_HTTP_URL. On a TPU VM
the same code reaches real GCS through TensorFlow's file system instead (epath's default when
TF is installed), which cannot be pointed at an emulator: that backend is not exercised here.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from e2_jax import storage
from e2_jax.inference import Encoder
from tests.processes import ROOT, free_port, xla_flags

BUCKET = "e2-test"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulator's URL, with the bucket `BUCKET` in memory."""
    port, log_path = free_port(), tmp_path_factory.mktemp("gcs") / "emulator.log"
    log = log_path.open("w")
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gcs_emulator.py"), str(port), BUCKET],
                               stdout=log, stderr=subprocess.STDOUT)  # a pipe nobody reads would fill and block it
    url = f"http://localhost:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=2).read()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the GCS emulator did not start: {log_path.read_text()[-3000:]}")
            time.sleep(0.2)
    yield url
    process.kill()
    process.wait()
    log.close()


def test_storage_paths():
    assert storage.is_remote("gs://b/run") and storage.is_remote("s3://b/run")
    assert not storage.is_remote("runs/e2") and not storage.is_remote("/abs/gs:/x")
    assert str(storage.path("gs://b/run") / "checkpoints") == "gs://b/run/checkpoints"  # not made absolute
    assert storage.path("runs/e2").is_absolute()


def test_a_run_in_a_bucket_trains_resumes_and_evaluates_as_a_local_run(synth_tiny, trained_tiny, emulator, tmp_path):
    workdir, out = f"gs://{BUCKET}/runs/e2", tmp_path / "bucket.json"
    env = os.environ | {"XLA_FLAGS": xla_flags()} | {
        "JAX_PLATFORMS": "cpu", "STORAGE_EMULATOR_HOST": emulator, "TENSORSTORE_GCS_HTTP_URL": emulator,
        "EPATH_USE_TF": "false"}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "multiprocess" / "bucket_worker.py"), synth_tiny,
                          workdir, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    got = json.loads(out.read_text())
    assert "3" in got["checkpoints_after_first_run"] and got["step"] == 6

    # Stage 2 resumed from the bucket: the same losses as the uninterrupted local run of the
    # same config (trained_tiny), in one metrics.jsonl continued across the two runs.
    def losses(text: str) -> dict[int, float]:
        return {row["step"]: row["loss"] for row in map(json.loads, text.splitlines()) if "loss" in row}

    local_dir, _ = trained_tiny
    here, there = losses((local_dir / "metrics.jsonl").read_text()), losses(got["metrics_jsonl"])
    assert list(there) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([there[s] for s in there], [here[s] for s in there], rtol=1e-5)
    assert got["tensorboard_files"]  # event files of both runs, uploaded

    # Evaluation mode wrote its report (of the best parameters) and selection maps into the bucket.
    assert got["report"]["metrics"] == got["evaluated_metrics"] and got["selection_maps"] == 16
    assert "best finetune parameters" in got["report"]["checkpoint"]
    # The embedding API loaded the best parameters from the bucket: those of the local run.
    assert got["encoder"]["origin"]["workdir"] == workdir and "best finetune" in got["encoder"]["source"]
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(got["embeddings"], Encoder.from_workdir(local_dir).encode_images(list(images)),
                               atol=1e-5)
