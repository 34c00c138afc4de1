"""Runs tests/multidevice in a fresh process with 8 fake CPU devices (one count per process)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import xla_flags

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_on_8_fake_cpu_devices():
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), E2_MULTIDEVICE="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                             "tests/multidevice"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
