import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data in ../shared/data; skipped on a user's clone without it, required under CI."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {SHARED_DATA} is missing: CI must run every test")
        pytest.skip(f"real data not found at {SHARED_DATA} (only present on the project's machines)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # Under pytest-xdist each worker is a process of its own: one torch thread each, so that two workers on
    # two cores do not wait on each other's thread barriers (each slows far more than 2x otherwise).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
