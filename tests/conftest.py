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


def blob_slices(n: int = 16, s: int = 32, seed: int = 3):
    "n (s, s) float32 slices, each a centred disc of random radius and brightness: a tiny healthy-looking training set."
    import numpy as np
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:s, :s]
    x = np.zeros((n, s, s), np.float32)
    for i in range(n):
        r = rng.uniform(s / 5, s / 2.7)
        x[i] = (((yy - s / 2) ** 2 + (xx - s / 2) ** 2) < r * r) * rng.uniform(0.5, 1.0)
    return x
