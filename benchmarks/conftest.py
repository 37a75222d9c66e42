"""Benchmarks reuse the test fixtures and markers."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import DEVICES, EM_DATA, em_data, pytest_collection_modifyitems, rng  # noqa: E402,F401
