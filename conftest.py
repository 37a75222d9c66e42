"""Shared fixtures and markers for tests/ and benchmarks/. GPU cases stay in every parametrisation and are skipped
with a reason when no CUDA build or GPU is present, so they show up in the report."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import neuroadda_rt
from neuroadda_rt._device import cuda_unavailable_reason

# One variable for the data root, the one the dataset manifests read (neuroadda_rt.datasets.DATA_ENV).
EM_DATA = Path(os.environ.get("NEUROADDA_DATA", Path(__file__).resolve().parent.parent / "shared" / "em_data"))


def pytest_collection_modifyitems(config, items):
    reason = cuda_unavailable_reason()
    for item in items:
        if "cuda" in item.keywords and reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"cuda: {reason}"))
        if "realdata" in item.keywords and not EM_DATA.is_dir():
            item.add_marker(pytest.mark.skip(reason=f"real EM data not found at {EM_DATA} (set NEUROADDA_DATA)"))


# Parametrise device-aware tests with this so the CUDA case is listed (and skipped) everywhere.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture
def em_data() -> Path:
    """Root of ../shared/em_data (tests using it must carry the ``realdata`` marker)."""
    return EM_DATA


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def pytest_report_header(config):
    info = neuroadda_rt.build_info()
    return (f"neuroadda_rt {info['version']}: simd={info['simd_active']} openmp={info['openmp']} "
            f"cuda_built={info['cuda']} cuda_devices={info['cuda_devices']}; em_data={EM_DATA} "
            f"({'present' if EM_DATA.is_dir() else 'absent'})")
