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


def write_slice_set(folder, subjects):
    "A SliceSet on disk from per-subject (slices, masks, labels) arrays of shape (n, R, R)."
    import json
    import numpy as np
    from uad_study.preprocess import SliceSet
    sl, ms, lb, subs, start = [], [], [], [], 0
    for k, (x, m, y) in enumerate(subjects):
        n = len(x)
        subs.append({"id": f"s{k}", "image": f"s{k}.nii.gz", "start": start, "stop": start + n, "z": list(range(n)),
                     "shape": [x.shape[1], x.shape[2], n], "label_voxels_total": int(y.sum()), "label_voxels_in_slices": int(y.sum())})
        sl.append(x.astype(np.float32)); ms.append(m.astype(bool)); lb.append(y.astype(bool)); start += n
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "slices.npy", np.concatenate(sl)); np.save(folder / "masks.npy", np.concatenate(ms))
    np.save(folder / "labels.npy", np.concatenate(lb))
    (folder / "index.json").write_text(json.dumps({"recipe": {}, "steps": [], "subjects": subs}))
    return SliceSet(folder)
