"""The best checkpoint of a stage with several processes: process 0 decides for all
(tests/multiprocess/best_worker.py)."""

from pathlib import Path

from tests.processes import run_workers

WORKER = Path(__file__).parent / "multiprocess" / "best_worker.py"


def test_processes_that_disagree_on_sumr_all_follow_process_0(tmp_path):
    workdir = tmp_path / "run"
    first, second = run_workers(WORKER, 2, str(workdir), tmp_path, timeout=300)
    assert first == second == {"first": True, "second": True, "best": [20, 120.5]}
    assert sorted(p.name for p in (workdir / "best" / "warmup").iterdir() if p.name.isdigit()) == ["20"]
