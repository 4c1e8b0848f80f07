import pytest
import torch

import bnkit


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def calibrate():
    """``bnkit.calibrate``, for the tests of tools built on it (doctor, the demo)."""
    return bnkit.calibrate
