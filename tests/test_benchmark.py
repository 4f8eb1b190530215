"Embedded benchmark v2: determinism (checksums across runs), layouts read by the real adapters, each class's label geometry and intensity, the MRI artefact classes, annotations, presets, caching and bad inputs (tiny preset, 2 mm)."
import csv, json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uad_study import benchmark as B
from uad_study.benchmark import (ARTEFACTS, CLASSES, PATHOLOGIES, apply_artefact, benchmark_config, benchmark_dir,
                                 benchmark_subjects, bench_templates, draw_benchmark_subject, ensure_benchmark,
                                 generate_benchmark, plan_benchmark, read_manifest, render_benchmark_subject, verify_benchmark)
from uad_study.core import UADInputError
from uad_study.datasets import (box_mask, check_subjects, detect_dataset, fastmri_slice, find_atlas, find_brats,
                                find_fastmri_brain, find_ixi_subjects, find_mslub, find_nifti)

ROOT = Path(__file__).resolve().parents[1]
TINY = benchmark_config("tiny")
S = TINY.spacing_mm


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return generate_benchmark(TINY, tmp_path_factory.mktemp("bench") / "tiny", progress=False, n_jobs=2)


def load(p): return np.asanyarray(nib.load(p).dataobj)


def vols(root, cls):
    "Images, label and record of the first subject of `cls`."
    r = benchmark_subjects(root, cls=cls)[0]
    return {c: load(r[c]) for c in B.CONTRASTS}, (load(r["label"]) if r["label"] else None), r


def tissue_medians(img, thr=0.9):
    "Median intensity in template GM/WM (probability > thr) and in the eroded ventricles (CSF)."
    from scipy import ndimage
    tpl = bench_templates(S)
    reg = dict(csf=ndimage.binary_erosion(tpl["vent"]), gm=tpl["gm"] > thr, wm=tpl["wm"] > thr)
    return {t: float(np.median(img[r & (img > 0)])) for t, r in reg.items()}


def test_checksums_identical_across_runs_and_n_jobs(bench, tmp_path):
    again = generate_benchmark(TINY, tmp_path / "again", progress=False, n_jobs=1)
    a, b = read_manifest(bench), read_manifest(again)
    assert [(f["path"], f["sha256"], f["bytes"]) for f in a["files"]] == [(f["path"], f["sha256"], f["bytes"]) for f in b["files"]]
    assert a["version"] == "2" and a["seed"] == 0 and a["preset"] == "tiny" and a["n_subjects"] == 5 + len(PATHOLOGIES)
    assert verify_benchmark(bench) == []


def test_other_seed_other_bytes(tmp_path):
    cfg = benchmark_config("tiny", classes=("ms",), n_healthy=dict(train=1, val=0, test=0))
    a = read_manifest(generate_benchmark(cfg, tmp_path / "a", progress=False, n_jobs=1))
    b = read_manifest(generate_benchmark(benchmark_config(cfg, seed=1), tmp_path / "b", progress=False, n_jobs=1))
    sa = {f["sha256"] for f in a["files"] if f["path"].endswith(".nii.gz")}
    sb = {f["sha256"] for f in b["files"] if f["path"].endswith(".nii.gz")}
    assert sa and not sa & sb


def test_verify_names_the_file(bench, tmp_path):
    import shutil
    root = tmp_path / "copy"; shutil.copytree(bench, root)
    rel = benchmark_subjects(root, cls="ms")[0]["flair"].relative_to(root)
    data = bytearray((root / rel).read_bytes()); data[-5] ^= 1; (root / rel).write_bytes(bytes(data))
    (root / "extra.txt").write_text("x")
    errs = verify_benchmark(root, raise_on_error=False)
    assert len(errs) == 2 and str(rel) in str(errs[0]) and "differs" in str(errs[0]) and "not listed" in str(errs[1])
    with pytest.raises(UADInputError, match="differs from manifest.json"): verify_benchmark(root)


def test_layouts_read_by_the_real_adapters(bench):
    n_h = sum(TINY.n_healthy.values())
    ixi = find_ixi_subjects(bench / "IXI", ("T1", "T2", "PD"))
    brats = find_brats(bench / "BraTS2020", ("t1", "t2", "flair"), label="required")
    atlas = find_atlas(bench / "ATLAS_2", label="required")
    mslub = find_mslub(bench / "MSLUB", modalities=("FLAIR", "T1", "T2"))
    own = find_nifti(bench / "UADBench" / "haemorrhage", images={c: f"*/*_{c}.nii.gz" for c in B.CONTRASTS}, labels="*/*_label.nii.gz",
                     label_values=(0, 1, 2))
    fm = find_fastmri_brain(bench / "fastMRI+", bench / "fastMRI+" / "brain.csv")
    assert (len(ixi), len(brats), len(atlas), len(mslub), len(own)) == (n_h, 1, 1, 1, 1)
    assert len(fm) == len(PATHOLOGIES) * len(TINY.fastmri_contrasts)
    assert [detect_dataset(bench / d) for d in ("IXI", "BraTS2020", "ATLAS_2", "MSLUB", "fastMRI+")] == ["ixi", "brats", "atlas", "mslub", "fastmri"]
    errs = []
    check_subjects(ixi + brats + atlas + mslub + own + fm, errors=errs)
    assert errs == []
    assert {s.meta["site"] for s in ixi} <= {"Guys", "HH", "IOP"}


def test_fastmri_boxes_cover_labels(bench):
    fm = find_fastmri_brain(bench / "fastMRI+", bench / "fastMRI+" / "brain.csv")
    s = next(x for x in fm if x.id.endswith("infarct-000") and "FLAIR" in x.id)
    _, lab, r = vols(bench, "infarct")
    flair = load(r["flair"])
    for z in s.meta["slices"]:
        np.testing.assert_array_equal(fastmri_slice(s.images["rss"], z), flair[:, :, z].T.astype(np.float32))
        m = box_mask(flair[:, :, z].T.shape, s.meta["boxes"][z])
        assert m[lab[:, :, z].T > 0].all() and {b[4] for b in s.meta["boxes"][z]} == {"infarct"}
    assert sorted(s.meta["slices"]) == sorted(np.flatnonzero(lab.any((0, 1))).tolist())


def test_slice_and_subject_labels(bench):
    rows = list(csv.DictReader(open(bench / "slices.csv")))
    subs = benchmark_subjects(bench)
    assert {r["cls"] for r in subs} == {"healthy", *PATHOLOGIES}
    for s in subs:
        mine = [r for r in rows if r["id"] == s["id"]]
        assert sum(int(r["label_voxels"]) for r in mine) == s["label_voxels"]
        assert s["anomalous"] == (s["cls"] != "healthy") == any(r["anomalous"] == "1" for r in mine)
        if s["label"] is not None:
            lab = load(s["label"]); zs = {int(r["slice"]) for r in mine if r["anomalous"] == "1"}
            assert zs == set(np.flatnonzero(lab.any((0, 1))).tolist())
    split = list(csv.DictReader(open(bench / "split.csv")))
    assert [r["split"] for r in split if r["cls"] == "healthy"] == ["train"] * 3 + ["val", "test"]
    assert {r["split"] for r in split if r["cls"] != "healthy"} == {"test"}


@pytest.mark.parametrize("index", range(3))
def test_healthy_tissue_order(index):
    "Without deformation the template's tissue masks are exact: the tissue order of each contrast at every site."
    cfg = benchmark_config("tiny", deformation_mm=0.0)
    p = draw_benchmark_subject(cfg, "healthy", index, "train")
    v = render_benchmark_subject(cfg, p)
    m = {c: tissue_medians(v[c]) for c in B.CONTRASTS}
    assert m["t1"]["wm"] > m["t1"]["gm"] > m["t1"]["csf"], (p["site"], m["t1"])
    assert m["t2"]["csf"] > m["t2"]["gm"] > m["t2"]["wm"], (p["site"], m["t2"])
    assert m["flair"]["gm"] > m["flair"]["wm"] > 2 * m["flair"]["csf"], (p["site"], m["flair"])


def test_glioma(bench):
    img, lab, _ = vols(bench, "glioma")
    assert {2, 4} <= set(np.unique(lab)) <= {0, 1, 2, 4}
    wm = tissue_medians(img["flair"])["wm"]
    assert np.median(img["flair"][lab == 2]) > 1.3 * wm and np.median(img["t2"][lab == 2]) > tissue_medians(img["t2"])["gm"]


def test_ms_periventricular_white_matter_bright_on_flair(bench):
    img, lab, _ = vols(bench, "ms")
    tpl = bench_templates(S); les = lab == 1
    assert les.sum() > 0 and np.median(tpl["wm"][les]) > 0.5           # in WM (template, before a few mm of deformation)
    assert np.median(tpl["vdist"][les]) < 15                             # near the ventricles
    for c in ("flair", "t2"): assert np.median(img[c][les]) > 1.2 * tissue_medians(img[c])["wm"], c
    assert np.median(img["t1"][les]) < tissue_medians(img["t1"])["wm"]


def test_infarct_wedge_dark_on_t1(bench):
    img, lab, _ = vols(bench, "infarct")
    les = lab == 1
    from scipy import ndimage
    assert ndimage.label(les)[1] >= 1 and les.sum() * S ** 3 > 2000      # a territory, several cm3
    assert np.median(img["t1"][les]) < tissue_medians(img["t1"])["gm"]
    assert np.median(img["flair"][les]) > 1.3 * tissue_medians(img["flair"])["wm"]
    assert bench_templates(S)["depth"][les].min() < 6                  # reaches the cortex


def test_resection_fluid(bench):
    img, lab, _ = vols(bench, "resection")
    les = lab == 1
    assert les.sum() > 0
    assert np.median(img["flair"][les]) < tissue_medians(img["flair"])["wm"]
    assert np.median(img["t2"][les]) > tissue_medians(img["t2"])["gm"]


def test_ventricles_structural(bench):
    img, lab, r = vols(bench, "ventricles")
    les = lab == 1; tpl = bench_templates(S)
    assert les.sum() > 0 and np.percentile(tpl["vdist"][les], 90) < 12     # a shell around the ventricles
    assert np.median(img["t2"][les]) > tissue_medians(img["t2"])["gm"] and np.median(img["t1"][les]) < tissue_medians(img["t1"])["gm"]


def test_haemorrhage_dark_on_t2(bench):
    img, lab, _ = vols(bench, "haemorrhage")
    assert set(np.unique(lab)) == {0, 1, 2}
    wm = tissue_medians(img["t2"])["wm"]
    for v in (1, 2): assert np.median(img["t2"][lab == v]) < wm


def test_intensity_ellipses_match_percentiles(bench):
    img, lab, r = vols(bench, "intensity_ellipses")
    gen = json.loads((bench / "generation.json").read_text())
    sub = next(s for s in gen["subjects"] if s["id"] == r["id"])
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    for c in B.CONTRASTS:
        scale = TINY.scale * sub["params"]["scanner"][c]["gain"]
        med = [np.median(img[c][lab == v]) for v in (1, 2, 3)]
        assert med[0] < med[1] < med[2], (c, med)
        for e, m in zip(sub["resolved"]["ellipses"], med):
            assert abs(m - e["value"][c] * scale) < 0.08 * scale, (c, e["kind"], m, e["value"][c] * scale)


def test_copy_paste_copies(bench):
    img, lab, r = vols(bench, "copy_paste")
    gen = json.loads((bench / "generation.json").read_text())
    g = next(s for s in gen["subjects"] if s["id"] == r["id"])["resolved"]
    sb = tuple(slice(a - 0, a + n) for a, n in zip(g["source_vox"], g["size_vox"]))
    db = tuple(slice(a, a + n) for a, n in zip(g["dest_vox"], g["size_vox"]))
    ok = lab[db] == 1
    assert ok.sum() == g["voxels"] > 0
    for c in B.CONTRASTS:
        x, y = img[c][sb][ok].astype(float), img[c][db][ok].astype(float)
        assert np.corrcoef(x, y)[0, 1] > (0.5 if c == "pd" else 0.8), c   # PD: flat contrast, noise-limited


@pytest.mark.parametrize("index", [0, 1])
def test_shapes_size_20_to_30(index):
    p = draw_benchmark_subject(TINY, "shapes", index)
    v = render_benchmark_subject(TINY, p)
    lab = v["label"]; code = 1 if index % 2 == 0 else 2
    assert p["pathology"]["shape"] == ("rectangle", "ellipse")[index % 2] and set(np.unique(lab)) == {0, code}
    idx = np.argwhere(lab > 0); ext = (idx.max(0) - idx.min(0) + 1) * S
    want = np.asarray(p["pathology"]["size_mm"])
    assert np.all(ext[:2] <= 30 + S) and np.all(np.abs(ext[:2] - want[:2]) <= 2 * S), (ext, want)
    fill = (lab > 0).sum() / np.prod(idx.max(0) - idx.min(0) + 1)
    assert fill > 0.85 if code == 1 else 0.4 < fill < 0.7


def test_replay_from_generation_json(bench):
    gen = json.loads((bench / "generation.json").read_text())
    s = next(x for x in gen["subjects"] if x["cls"] == "glioma")
    v = render_benchmark_subject(TINY, s["params"])
    for k, rel in s["files"].items(): np.testing.assert_array_equal(load(bench / rel), v[k])


def test_presets_and_split_definition():
    hard, std, easy = (benchmark_config(p) for p in ("hard", "standard", "easy"))
    assert easy.lesion_scale > std.lesion_scale > hard.lesion_scale and hard.test_shift > 0 == std.test_shift
    tr, te = draw_benchmark_subject(hard, "healthy", 0, "train"), draw_benchmark_subject(hard, "healthy", 0, "test")
    assert te["scanner"]["t2"]["noise_sd"] > tr["scanner"]["t2"]["noise_sd"] and te["scanner"]["flair"]["slice_mm"] > tr["scanner"]["flair"]["slice_mm"]
    plan = plan_benchmark(std)
    committed = list(csv.DictReader(open(ROOT / "data" / "splits" / "uad-bench-v2-standard.csv")))
    assert [(r["id"], r["cls"], r["split"]) for r in committed] == [(p["id"], p["cls"], p["split"]) for p in plan]
    d = json.loads((ROOT / "data" / "splits" / "uad-bench-v2-standard.json").read_text())
    assert d["sizes"]["healthy"] == std.n_healthy and d["sizes"]["per_class"] == std.n_per_class


def test_ensure_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("UAD_STUDY_DATA", str(tmp_path))
    kw = dict(classes=("shapes",), n_healthy=dict(train=1, val=0, test=0))
    root = ensure_benchmark("tiny", progress=False, **kw)
    assert root == benchmark_dir(benchmark_config("tiny", **kw)) and root.parent == tmp_path / "benchmark"
    monkeypatch.setattr(B, "generate_benchmark", lambda *a, **k: pytest.fail("regenerated"))
    assert ensure_benchmark("tiny", progress=False, **kw) == root


def test_bad_inputs_raise_before_writing(tmp_path, monkeypatch):
    monkeypatch.setenv("UAD_STUDY_DATA", str(tmp_path))
    for kw, msg in [(dict(preset="nope"), "`preset`"), (dict(preset="tiny", contrasts=("t1", "dwi")), "`contrasts`"),
                    (dict(preset="tiny", lesion_scale=5.0), "`lesion_scale`"), (dict(preset="tiny", n_per_class=dict(test=1)), "`n_per_class`")]:
        with pytest.raises(UADInputError, match=msg): ensure_benchmark(progress=False, **kw)
    with pytest.raises(UADInputError, match="`n_jobs`"): generate_benchmark(TINY, tmp_path / "x", n_jobs=0)
    assert not (tmp_path / "benchmark").exists() and not (tmp_path / "x").exists()


# ---- MRI artefact classes (global, subject-level labels) ----
ART = benchmark_config("tiny", classes=ARTEFACTS)
PINNED = {"easy": "v2-easy-seed0-6bdcdc4b3d0c", "standard": "v2-standard-seed0-667b880da11c", "hard": "v2-hard-seed0-5467ca64b40c",
          "smoke": "v2-smoke-seed0-0e89be7e9e8b", "tiny": "v2-tiny-seed0-414e20e7f01a"}   # before the artefact classes existed


def without_artefact(p): return {k: v for k, v in p.items() if k != "artefact"}


@pytest.fixture(scope="module")
def artefacts():
    "Artefact subject 0 of each class (tiny, 2 mm): params, render, and the same subject rendered without its artefact."
    out = {}
    for cls in ARTEFACTS:
        p = draw_benchmark_subject(ART, cls, 0)
        out[cls] = (p, render_benchmark_subject(ART, p), render_benchmark_subject(ART, without_artefact(p)))
    return out


def test_artefact_classes_leave_pathology_presets_unchanged(bench):
    assert PATHOLOGIES == ("glioma", "ms", "infarct", "resection", "ventricles", "haemorrhage", "intensity_ellipses", "copy_paste", "shapes")
    assert ARTEFACTS == ("motion", "spike", "ghosting", "gibbs", "wrap", "bias") and B.BenchmarkConfig().classes == PATHOLOGIES
    assert [CLASSES[a]["id"] for a in ARTEFACTS] == list(range(10, 16))
    assert all(CLASSES[a]["layout"] == "UADBench" and CLASSES[a]["labels"] == {} for a in ARTEFACTS)
    assert {p: benchmark_dir(benchmark_config(p)).name for p in PINNED} == PINNED
    for base in ("standard", "smoke"):
        a = benchmark_config(f"{base}-artefacts")
        assert a.classes == PATHOLOGIES + ARTEFACTS and a == replace(benchmark_config(base), preset=a.preset, classes=a.classes)
    assert set(B.PRESET_NAMES) == set(B.PRESETS) >= {"standard-artefacts", "smoke-artefacts"}
    sha = {f["path"]: f["sha256"] for f in read_manifest(bench)["files"]}     # the tiny preset's files, as before
    assert sha["labels.json"] == "1ab742ec83ac1ad8a89ae086ae98014d65e228e86a0d1240ae3c3415fdb995af"
    assert sha["split.csv"] == "0769edfc206fe32dc8d9b4f5045eb916a6feb95ef44b1606e8ad53d8d8c137be"
    with pytest.raises(UADInputError, match="`classes` must be distinct names"): benchmark_config("tiny", classes=("motion", "flu"))


def test_artefact_presets_keep_the_other_subjects():
    std, art = benchmark_config("standard"), benchmark_config("standard-artefacts")
    for cls, i, split in (("healthy", 0, "train"), ("glioma", 2, "test")):
        assert draw_benchmark_subject(std, cls, i, split) == draw_benchmark_subject(art, cls, i, split)
    ps, pa = plan_benchmark(std), plan_benchmark(art)
    assert pa[:len(ps)] == ps and [p["cls"] for p in pa[len(ps):]] == [a for a in ARTEFACTS for _ in range(5)]


def test_artefact_draws_are_json_per_contrast():
    for cls in ARTEFACTS:
        p = draw_benchmark_subject(ART, cls, 0)
        assert json.loads(json.dumps(p)) == p and "pathology" not in p and set(p["artefact"]) == set(B.CONTRASTS)
        shared = all(p["artefact"][c] == p["artefact"]["t1"] for c in B.CONTRASTS)
        assert shared == (cls in ("wrap", "bias")), cls          # one coil, one FOV; else one acquisition per contrast
    with pytest.raises(UADInputError, match="artefact must be one of"): B.draw_artefact("flu", np.random.default_rng(0))


def test_artefact_volumes_label_mask_determinism(artefacts):
    for cls, (p, a, c) in artefacts.items():
        assert a["label"].max() == 0 and c["label"].max() == 0, cls
        for k in B.CONTRASTS: assert np.array_equal(a[k] > 0, a["mask"]), (cls, k)
        if cls != "wrap": assert np.array_equal(a["mask"], c["mask"]), cls
        for k in B.CONTRASTS:                                     # every contrast changes measurably
            m = a["mask"]; rel = np.sqrt(((a[k].astype(float) - c[k]) ** 2)[m].mean()) / np.median(c[k][m])
            assert rel > 0.02, (cls, k, rel)
    for cls in ("motion", "bias"):                                # torch/SimpleITK path and the cached bias field
        p, a, _ = artefacts[cls]
        again = render_benchmark_subject(ART, p)
        for k in (*B.CONTRASTS, "label", "mask"): np.testing.assert_array_equal(again[k], a[k])


def _t1(artefacts, cls):
    "T1 with and without the artefact (float), the brain mask and the T1 parameters."
    p, a, c = artefacts[cls]
    return a["t1"].astype(np.float64), c["t1"].astype(np.float64), c["mask"], p["artefact"]["t1"]


def test_motion_and_ghosting_move_signal_out_of_the_brain(artefacts):
    "Before skull-stripping both put signal where the clean image has none; after it the brain stays in place."
    for cls in ("motion", "ghosting"):
        A, C, m, P = _t1(artefacts, cls)
        out, imaged, res = apply_artefact(C.astype(np.float32), m, cls, P, S)
        assert imaged.all() and res == {}
        assert np.abs(out[~m]).sum() > 0.02 * C[m].sum(), cls          # C is exactly 0 outside the brain
        assert abs(A[m].mean() / C[m].mean() - 1) < 0.1, cls           # k-space centre kept: the mean level stays


def test_spike_adds_a_kspace_peak(artefacts):
    A, C, m, P = _t1(artefacts, "spike")
    fa, fc = (np.abs(np.fft.fftshift(np.fft.fftn(x))) for x in (A, C))
    idx = [tuple(i) for i in np.floor(np.asarray(P["spikes_positions"]) * np.array(A.shape)).astype(int)]
    ratio = [fa[i] / fc[i] for i in idx]
    assert min(ratio) > 2 and max(ratio) > 10, ratio                  # stripes: energy at the spike's frequency
    off = np.ones(A.shape, bool); off[tuple(np.array(idx).T)] = False
    assert np.median(fa[off] / np.maximum(fc[off], 1e-9)) < 1.2       # not a global change of every frequency


def test_gibbs_truncates_kspace_and_rings_at_edges(artefacts):
    from scipy import ndimage
    A, C, m, P = _t1(artefacts, "gibbs")
    out, _, _ = apply_artefact(C.astype(np.float32), m, "gibbs", P, S)
    k = np.abs(np.fft.fftshift(np.fft.fftn(out)))
    g = np.indices(out.shape); cen = (np.array(out.shape) - 1) / 2
    dist = np.sqrt(sum((g[i] - cen[i]) ** 2 for i in range(3)))
    assert k[dist > (1 - P["alpha"]) * max(out.shape) * np.sqrt(2) / 2 + 1].max() < 1e-6 * k.max()   # MONAI's sphere
    shell = ndimage.binary_dilation(m, iterations=3) & ~m              # where the clean image is exactly 0
    med = np.median(C[m])
    assert (out[shell] < -0.02 * med).mean() > 0.1 and (out[shell] > 0.02 * med).mean() > 0.1   # oscillates about 0


def test_wrap_folds_into_the_fov(artefacts):
    A, C, m, P = _t1(artefacts, "wrap")
    _, a, _ = artefacts["wrap"]
    r = a["resolved"]["artefact"]["t1"]; lo, hi = r["fov_vox"]; ax = r["axis"]
    assert ax == P["axis"] and hi - lo == round(P["fov_frac"] * r["brain_extent_vox"])
    ext = np.flatnonzero(m.any(tuple(i for i in range(3) if i != ax)))
    assert r["brain_extent_vox"] == ext[-1] + 1 - ext[0] and lo > ext[0] and hi < ext[-1] + 1   # the FOV cuts the brain
    fov = np.zeros(m.shape, bool); fov[(slice(None),) * ax + (slice(lo, hi),)] = True
    assert np.array_equal(a["mask"], m & fov)                          # outside the FOV: not imaged
    d = (A - C)[a["mask"]]
    assert d.min() >= 0 and (d > 0.1 * np.median(C[m])).sum() > 1000   # folding only adds signal, and a lot of it


def test_bias_field_strength(artefacts):
    from scipy import ndimage
    A, C, m, P = _t1(artefacts, "bias")
    assert abs(np.log(A[m] / C[m]).std() - P["log_sd"]) < 0.02        # scaled to the drawn log-field sd in the brain
    core = ndimage.binary_erosion(m, iterations=3)
    lo = lambda x: np.log(ndimage.gaussian_filter(x, 3)[core]).std()   # low-frequency intensity spread
    assert lo(A) > 1.5 * lo(C) and P["log_sd"] > 0.18                  # stronger than any site's normal bias
    _, a, _ = artefacts["bias"]
    assert a["resolved"]["artefact"]["t1"] == a["resolved"]["artefact"]["flair"]   # one coil for all contrasts


def test_artefact_benchmark_annotations(tmp_path, artefacts):
    "Generated over 2 forked workers after the parent ran torch: subject/slice labels, fastMRI+ study rows, replay."
    cfg = benchmark_config("tiny", classes=("ghosting", "wrap"), n_healthy=dict(train=1, val=0, test=0))
    root = generate_benchmark(cfg, tmp_path / "art", progress=False, n_jobs=2)
    assert verify_benchmark(root) == []
    subs = benchmark_subjects(root)
    assert [(s["cls"], s["anomalous"], s["label_voxels"]) for s in subs] == [("healthy", 0, 0), ("ghosting", 1, 0), ("wrap", 1, 0)]
    rows = list(csv.DictReader(open(root / "slices.csv")))
    assert all(r["anomalous"] == ("0" if r["cls"] == "healthy" else "1") for r in rows)
    assert all(load(s["label"]).max() == 0 for s in subs[1:])
    fm = find_fastmri_brain(root / "fastMRI+", root / "fastMRI+" / "brain.csv")
    assert sorted((s.id, tuple(s.meta["study_labels"]), s.meta["slices"]) for s in fm) == sorted(
        (f"file_brain_AX{c.upper()}_{k}-000", (k,), []) for k in ("ghosting", "wrap") for c in cfg.fastmri_contrasts)
    assert set(json.loads((root / "labels.json").read_text())["classes"]) == {"healthy", *PATHOLOGIES, "ghosting", "wrap"}
    gen = json.loads((root / "generation.json").read_text())
    s = next(x for x in gen["subjects"] if x["cls"] == "wrap")
    v = render_benchmark_subject(cfg, s["params"])
    assert s["resolved"]["artefact"]["t1"]["fov_vox"] == v["resolved"]["artefact"]["t1"]["fov_vox"]
    for k, rel in s["files"].items(): np.testing.assert_array_equal(load(root / rel), v[k])
