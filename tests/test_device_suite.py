"""The one-shot device suite (benchmarks/device.py) runs on this CPU with a tiny model, as it
must on the device machine: without TensorFlow, TFDS or an installed ml_collections (which it
takes from a wheel), writing its Markdown report with both methods and a profile."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_collections
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Imported first in the suite's process: TensorFlow and TFDS cannot be imported, nor the
# installed ml_collections; ml_collections comes only from the wheels on sys.path.
SITECUSTOMIZE = '''
import importlib.machinery, sys
class _DeviceMachine:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ("tensorflow", "tensorflow_datasets"):
            raise ImportError(f"{name} is not on the device machine")
        if top == "ml_collections" and path is None:
            wheels = [p for p in sys.path if p.endswith(".whl")]
            spec = importlib.machinery.PathFinder.find_spec(name, wheels) if wheels else None
            if spec is None:
                raise ImportError("ml_collections is not on the device machine")
            return spec
        return None
sys.meta_path.insert(0, _DeviceMachine())
'''


@pytest.mark.slow
def test_device_suite_runs_without_tensorflow_and_writes_its_report(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    package = Path(ml_collections.__file__).parent
    with zipfile.ZipFile(wheels / "ml_collections-1.1.0-py3-none-any.whl", "w") as whl:
        for path in package.rglob("*.py"):
            whl.write(path, path.relative_to(package.parent))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}", "E2_DEVICE_WHEELS": str(wheels)}
    out = tmp_path / "report.md"
    result = subprocess.run([sys.executable, "-m", "benchmarks.device", "--models", "tiny", "--batches", "8",
                             "--steps", "2", "--budget-s", "300", "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    text = out.read_text()
    assert "| tiny | CLIP-FT | 8 | none |" in text
    assert "| tiny | E² | 8 | " in text and "E² against CLIP-FT" in text
    assert "Profile of tiny E² batch 8" in text and "fusion" in text  # XLA's ops, by time
    assert "Skipped" not in text and "Failed" not in text
