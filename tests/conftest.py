import sys

import pytest


@pytest.fixture
def calibrate(monkeypatch):
    """The real ``bnkit.calibrate`` when it is importable, else the clearly marked stand-in (see calibrate_standin.py)."""
    try:
        from bnkit.calibrate import calibrate as real
        return real
    except ImportError:
        from tests import calibrate_standin
        monkeypatch.setitem(sys.modules, "bnkit.calibrate", calibrate_standin)
        return calibrate_standin.calibrate
