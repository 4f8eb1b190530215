"Embedded phantom cohort: determinism, layout, labels, contrast, caching and atomic writes (coarse grids, fast)."
import json, os, re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uad_study import phantom
from uad_study.core import UADInputError, to_json
from uad_study.phantom import (PhantomConfig, ensure_phantom, generate_phantom, mni_tissue_maps, phantom_dir,
                               phantom_files, render_subject)

IXI = re.compile(r"IXI/(T1|T2)/IXI(\d{3})-(Guys|HH|IOP)-(\d{4})-(T1|T2)\.nii\.gz")
BRATS = re.compile(r"BraTS2020/MICCAI_BraTS2020_TrainingData/BraTS20_Training_(\d{3})/BraTS20_Training_(\d{3})_(t1|t2|seg)\.nii\.gz")

SMALL = dict(spacing_mm=4.0, n_healthy=2, n_tumour=2)


def arrays(root: Path) -> dict:
    "Every NIfTI under `root`: relative path -> voxel array."
    return {str(p.relative_to(root)): np.asanyarray(nib.load(p).dataobj) for p in sorted(root.rglob("*.nii.gz"))}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    "A small coarse cohort: 2 healthy + 4 tumour subjects at 3 mm."
    cfg = PhantomConfig(spacing_mm=3.0, n_healthy=2, n_tumour=4, seed=1)
    root = generate_phantom(cfg, tmp_path_factory.mktemp("ph") / "cohort", progress=False, n_jobs=2)
    return cfg, root


def test_same_seed_same_voxels_any_n_jobs(tmp_path):
    a = arrays(generate_phantom(PhantomConfig(**SMALL), tmp_path / "a", progress=False, n_jobs=1))
    b = arrays(generate_phantom(PhantomConfig(**SMALL), tmp_path / "b", progress=False, n_jobs=2))
    assert len(a) == 2 * 2 + 2 * 3 and a.keys() == b.keys()
    for k in a: np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_different_seed_different_voxels(tmp_path):
    a = arrays(generate_phantom(PhantomConfig(**SMALL), tmp_path / "a", progress=False, n_jobs=1))
    c = arrays(generate_phantom(PhantomConfig(**SMALL, seed=1), tmp_path / "c", progress=False, n_jobs=1))
    a, c = list(a.values()), list(c.values())   # names differ with the seed; compare in file order
    assert all(x.shape == y.shape and not np.array_equal(x, y) for x, y in zip(a, c))


def test_layout_names_and_generation_json(cohort):
    cfg, root = cohort
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert "generation.json" in files
    nii = [f for f in files if f != "generation.json"]
    ixi = [IXI.fullmatch(f) for f in nii if f.startswith("IXI/")]
    brats = [BRATS.fullmatch(f) for f in nii if f.startswith("BraTS2020/")]
    assert len(ixi) == 2 * 2 and all(ixi) and len(brats) == 4 * 3 and all(brats) and len(nii) == len(ixi) + len(brats)
    assert all(m[1] == m[5] for m in ixi) and all(m[1] == m[2] for m in brats)
    assert sorted({m[1] for m in brats}) == ["001", "002", "003", "004"]
    gen = json.loads((root / "generation.json").read_text())
    assert gen["complete"] is True and gen["phantom_version"] == "1"
    assert "ynthetic" in gen["notice"] and "MNI152" in gen["notice"] and "2009a" in gen["notice"]
    assert gen["config"] == json.loads(to_json(cfg))
    assert sorted(gen["files"]) == nii
    assert [s["kind"] for s in gen["subjects"]] == ["healthy"] * 2 + ["tumour"] * 4
    for s in gen["subjects"]:
        assert {"id", "kind", "index", "params", "files", "stats"} <= set(s)
        assert isinstance(s["params"]["field_seed"], int) and set(s["params"]["contrasts"]) == {"t1", "t2"}
        assert ("tumour" in s["params"]) == (s["kind"] == "tumour")
    assert 0 < gen["lesion_fraction_of_voxels"] < gen["lesion_fraction_of_brain"] < 0.2
    pf = phantom_files(root)
    assert [sorted(d) for d in pf["healthy"]] == [["id", "t1", "t2"]] * 2
    assert [sorted(d) for d in pf["tumour"]] == [["id", "seg", "t1", "t2"]] * 4
    assert all(Path(p).is_file() for d in pf["healthy"] + pf["tumour"] for k, p in d.items() if k != "id")


def test_headers_dtypes_affine(cohort):
    cfg, root = cohort
    ref = np.array([[1.0, 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1]])  # MNI152 2009a, 1 mm (nilearn)
    for d in phantom_files(root)["tumour"]:
        for k in ("t1", "t2", "seg"):
            img = nib.load(d[k])
            assert img.get_data_dtype() == (np.uint8 if k == "seg" else np.int16)
            np.testing.assert_allclose(img.affine, ref @ np.diag([3.0, 3.0, 3.0, 1.0]))
            assert img.shape == (66, 78, 63)


def test_labels(cohort):
    cfg, root = cohort
    for d in phantom_files(root)["tumour"]:
        seg = np.asanyarray(nib.load(d["seg"]).dataobj)
        t1, t2 = (np.asanyarray(nib.load(d[c]).dataobj) for c in ("t1", "t2"))
        assert set(np.unique(seg)) == {0, 1, 2, 4}, d["id"]
        assert np.array_equal(t1 > 0, t2 > 0)                 # one brain mask for all contrasts
        assert seg[t1 == 0].max() == 0                         # labels only inside the brain
        assert t1.min() >= 0 and t1.max() < 3000


def _pure_medians(img, spacing, thr=0.9):
    tpl = mni_tissue_maps(spacing)
    return {t: float(np.median(img[(tpl[t] > thr) & (img > 0)])) for t in ("csf", "gm", "wm")}


def test_tissue_order_and_tumour_contrast(cohort):
    cfg, root = cohort
    pf = phantom_files(root)
    for d in pf["healthy"] + pf["tumour"]:
        t1, t2 = (np.asanyarray(nib.load(d[c]).dataobj) for c in ("t1", "t2"))
        m1, m2 = _pure_medians(t1, 3.0), _pure_medians(t2, 3.0)
        assert m2["csf"] > m2["gm"] > m2["wm"], (d["id"], m2)
        assert m1["wm"] > m1["gm"] > m1["csf"], (d["id"], m1)
        if "seg" in d:
            seg = np.asanyarray(nib.load(d["seg"]).dataobj)
            assert np.median(t2[seg == 2]) > m2["gm"] > m2["wm"]        # oedema bright on T2
            assert np.median(t2[seg == 1]) > np.median(t2[seg == 2])    # necrosis fluid-like
            assert np.median(t1[seg == 1]) < m1["gm"] < m1["wm"]        # necrosis dark on T1


def test_order_follows_config(tmp_path):
    "The order check has teeth: swap GM and WM on T2 and it flips."
    it2 = dict(PhantomConfig().intensity_t2, gm=0.40, wm=0.55)
    cfg = PhantomConfig(spacing_mm=4.0, n_healthy=1, n_tumour=0, intensity_t2=it2)
    vol = render_subject(cfg, phantom.draw_subject(cfg, "healthy", 0))
    m2 = _pure_medians(vol["t2"], 4.0)
    assert m2["wm"] > m2["gm"]


def test_replay_from_generation_json(cohort):
    cfg, root = cohort
    gen = json.loads((root / "generation.json").read_text())
    s = gen["subjects"][-1]
    vol = render_subject(PhantomConfig(**{**gen["config"], "contrasts": tuple(gen["config"]["contrasts"])}), s["params"])
    for k, rel in s["files"].items():
        np.testing.assert_array_equal(np.asanyarray(nib.load(root / rel).dataobj), vol[k])
    assert {str(l): int((vol["seg"] == l).sum()) for l in (1, 2, 4)} == s["stats"]["label_voxels"]


def test_ensure_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("UAD_STUDY_DATA", str(tmp_path))
    cfg = PhantomConfig(spacing_mm=4.0, n_healthy=1, n_tumour=1)
    root = ensure_phantom(cfg, progress=False)
    assert root == phantom_dir(cfg) and root.parent == tmp_path / "phantom"
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert len(stamps) == 2 + 3 + 1
    monkeypatch.setattr(phantom, "generate_phantom", lambda *a, **k: pytest.fail("regenerated"))
    assert ensure_phantom(cfg, progress=False) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps


def test_ensure_refuses_incomplete_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("UAD_STUDY_DATA", str(tmp_path))
    cfg = PhantomConfig(spacing_mm=4.0, n_healthy=1, n_tumour=0)
    phantom_dir(cfg).mkdir(parents=True)
    with pytest.raises(UADInputError, match="no complete generation"): ensure_phantom(cfg, progress=False)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_aborted_generation_leaves_nothing(tmp_path, monkeypatch, n_jobs):
    monkeypatch.setenv("UAD_STUDY_DATA", str(tmp_path))
    cfg = PhantomConfig(spacing_mm=4.0, n_healthy=2, n_tumour=1)
    real = phantom._render_and_write
    def boom(cfg, subject, out):
        if subject["kind"] == "tumour": raise RuntimeError("disk full")
        return real(cfg, subject, out)
    monkeypatch.setattr(phantom, "_render_and_write", boom)
    with pytest.raises(RuntimeError, match="disk full"): ensure_phantom(cfg, progress=False, n_jobs=n_jobs)
    assert not phantom_dir(cfg).exists()
    assert list((tmp_path / "phantom").iterdir()) == []       # no temporary folder left either


def test_bad_config_raises_before_writing(tmp_path, monkeypatch):
    monkeypatch.setenv("UAD_STUDY_DATA", str(tmp_path))
    for bad, msg in [(dict(contrasts=("t1", "flair")), "`contrasts`"), (dict(n_healthy=0, n_tumour=0), "at least one"),
                     (dict(tumour_radius_mm=(30.0, 12.0)), "`tumour_radius_mm`"), (dict(version="2"), "`version`")]:
        with pytest.raises(UADInputError, match=msg): ensure_phantom(PhantomConfig(spacing_mm=4.0, **bad), progress=False)
    with pytest.raises(UADInputError, match="`n_jobs`"): generate_phantom(PhantomConfig(spacing_mm=4.0), tmp_path / "x", n_jobs=0)
    assert not (tmp_path / "phantom").exists() and not (tmp_path / "x").exists()
