"""launch/colab_tpu.ipynb, executed headless (nbclient) in its smoke mode on the CPU: every
cell runs, the same commands as on a TPU with smaller settings (the B/32 config under
`:runlocal`, bfloat16, a converted checkpoint), and it trains, evaluates and renders selection
maps."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.processes import xla_flags

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_colab_notebook_runs_in_smoke_mode(synth_tiny, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    for name, value in {"E2_NOTEBOOK_SMOKE": "1", "E2_NOTEBOOK_WORKDIR": str(workdir),
                        "E2_NOTEBOOK_DATA_DIR": synth_tiny, "JAX_PLATFORMS": "cpu"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("XLA_FLAGS", xla_flags())
    notebook = nbformat.read(ROOT / "launch" / "colab_tpu.ipynb", as_version=4)
    # Run from launch/, as a user who opens it from a checkout would: the notebook moves to the root.
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "launch")}}).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]

    def text(cell) -> str:
        return "".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "") for o in cell.outputs)

    assert "smoke mode: True" in text(code[0])
    assert "JAX backend: cpu" in text(code[1])
    assert f"initial weights: {workdir}_weights/converted" in text(code[2])  # converted by the real converter
    assert "configs/e2_b32.py:runlocal --config.model.compute_dtype=bfloat16 --config.model.pretrained=" in text(
        code[3])
    assert "validation: I2T R@1/5/10" in text(code[4]) and (workdir / "metrics.jsonl").is_file()
    assert "full_candidate" in text(code[5]).replace("-", "_") and (workdir / "eval" / "report.json").is_file()
    images = [o for o in code[6].outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3 and "16 selection maps" in text(code[6])
    # The Colab runtime it asks for is one Colab offers now (a v5e chip), not the retired v2-8.
    assert notebook.metadata["accelerator"] == "TPU" and notebook.metadata["colab"]["gpuType"] == "V5E1"
