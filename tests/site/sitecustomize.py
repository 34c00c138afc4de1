"""Imported at start-up by every Python process the test session starts (tests/conftest.py puts
this folder on PYTHONPATH): counts its use of the compilation cache (compile_counts.py)."""

import compile_counts

compile_counts.install()
