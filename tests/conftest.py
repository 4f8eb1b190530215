import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"


@pytest.fixture
def tmp_data(tmp_path, monkeypatch):
    "A private data cache for a test, so tests never share or pollute data/."
    d = tmp_path / "data"
    monkeypatch.setenv("UAD_STUDY_DATA", str(d))
    return d


@pytest.fixture
def realdata():
    "../shared/realdata when present; the test is skipped otherwise (users will not have it)."
    if not REALDATA.is_dir():
        pytest.skip("../shared/realdata is absent")
    return REALDATA
