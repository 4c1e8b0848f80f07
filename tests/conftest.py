import os

# Triton reads TRITON_INTERPRET when it is first imported, and collecting some test modules imports it
# (torch's testing internals do): so the interpreter mode is set before any of them, for the session.
# CPU tensors never take Triton under the default backend, so nothing else changes.
os.environ.setdefault("TRITON_INTERPRET", "1")

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
