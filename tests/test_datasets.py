"Dataset adapters: real layouts and names, and a one-line error (file, rule, value) for each kind of bad input."
import gzip

import nibabel as nib
import numpy as np
import pytest

from uad_study.cli import main
from uad_study.core import UADInputError
from uad_study.datasets import (MODALITIES, canonical_modality, check_dataset, check_subject, detect_dataset, find_atlas,
                                find_brats, find_fastmri_brain, find_ixi_subjects, find_mslub, find_nifti, label_volume,
                                load_subjects, modality_aliases)

BRAIN = np.zeros((8, 8, 8), np.int16); BRAIN[2:6, 2:6, 2:6] = 100
SEG = np.zeros((8, 8, 8), np.uint8); SEG[3:5, 3:5, 3:5] = 1; SEG[3, 3, 3] = 4; SEG[4, 4, 4] = 2


def _nii(path, arr=BRAIN, aff=np.eye(4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, aff), str(path))
    return path


def _brats20(root, n=2, mods=("t1", "t1ce", "t2", "flair"), seg=True):
    for i in range(1, n + 1):
        sid = f"BraTS20_Training_{i:03d}"
        for m in mods: _nii(root / sid / f"{sid}_{m}.nii.gz")
        if seg: _nii(root / sid / f"{sid}_seg.nii.gz", SEG)
    return root


def _sid(i=1): return f"BraTS20_Training_{i:03d}"


# --- named layouts ---------------------------------------------------------------------------------

def test_ixi_layout_sites_and_demographics(tmp_path):
    for n in ["IXI-T2/IXI002-Guys-0828-T2.nii.gz", "IXI-T2/IXI035-IOP-0873-T2.nii.gz", "IXI-PD/IXI035-IOP-0873-PD.nii.gz"]:
        _nii(tmp_path / n)
    (tmp_path / "IXI.csv").write_text("IXI_ID,SEX_ID,AGE\n2,2,35.8\n35,1,\n")
    subs = find_ixi_subjects(tmp_path, ("T2",))
    assert [(s.id, s.meta["site"]) for s in subs] == [("IXI002", "Guys"), ("IXI035", "IOP")]
    assert subs[0].meta["age"] == 35.8 and "age" not in subs[1].meta
    assert detect_dataset(tmp_path) == "ixi" and check_dataset(tmp_path).ok


def test_brats_2020_2021_and_2023_names(tmp_path):
    _brats20(tmp_path / "b20", 2)
    subs = find_brats(tmp_path / "b20")
    assert [s.id for s in subs] == [_sid(1), _sid(2)] and sorted(subs[0].images) == ["flair", "t1", "t1ce", "t2"]
    for m in ("t1", "t1ce", "t2", "flair", "seg"):
        _nii(tmp_path / "b21" / "BraTS2021_00000" / f"BraTS2021_00000_{m}.nii.gz", SEG if m == "seg" else BRAIN)
    assert find_brats(tmp_path / "b21")[0].id == "BraTS2021_00000"
    seg23 = SEG.copy(); seg23[SEG == 4] = 3
    for m in ("t1c", "t1n", "t2f", "t2w", "seg"):
        _nii(tmp_path / "b23" / "BraTS-GLI-00002-000" / f"BraTS-GLI-00002-000-{m}.nii.gz", seg23 if m == "seg" else BRAIN)
    s = find_brats(tmp_path / "b23", ("t2w",))[0]
    assert s.meta["labels_convention"] == "brats2023"
    r = check_dataset(tmp_path / "b23")
    assert r.ok and r.rows[0]["label_values"] == [0, 1, 2, 3]
    # merge sub-regions into one anomaly label, or keep them / pick a region
    assert label_volume(s).sum() == (seg23 > 0).sum()
    assert set(np.unique(label_volume(s, None))) == {0, 1, 2, 3}
    assert label_volume(s, "enhancing").sum() == 1
    s20 = subs[0]
    assert label_volume(s20, "enhancing").sum() == 1 and label_volume(s20, "tumour_core").sum() == (np.isin(SEG, (1, 4))).sum()


def test_atlas_v2_and_v12(tmp_path):
    a = tmp_path / "ATLAS_2/Training/R001/sub-r001s001/ses-1/anat"
    _nii(a / "sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz")
    _nii(a / "sub-r001s001_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz", (SEG > 0).astype(np.uint8))
    r = check_dataset(tmp_path / "ATLAS_2")
    assert r.dataset == "atlas" and r.ok and r.rows[0]["id"] == "sub-r001s001"
    v = tmp_path / "ATLAS_R1.2/Site2/031859/t01"
    _nii(v / "031859_t1w_deface_stx.nii.gz"); _nii(v / "031859_LesionSmooth_stx.nii.gz", (SEG > 0).astype(np.uint8))
    assert [(s.id, s.meta["site"]) for s in find_atlas(tmp_path / "ATLAS_R1.2")] == [("031859_t01", "Site2")]


def test_mslub_variants(tmp_path):
    for n in ["FLAIR", "T1W", "T1WKS", "T2W"]: _nii(tmp_path / "coregistered/patient01" / f"{n}.nii.gz")
    _nii(tmp_path / "coregistered/patient01/consensus_gt.nii.gz", (SEG > 0).astype(np.uint8))
    _nii(tmp_path / "coregistered/patient01/brainmask.nii.gz", (BRAIN > 0).astype(np.uint8))
    s = find_mslub(tmp_path)[0]
    assert (s.id, s.meta["variant"], s.mask.name) == ("patient01", "coregistered", "brainmask.nii.gz")
    assert check_dataset(tmp_path).ok
    # raw images live on their own grids: only the label is checked against FLAIR
    for n in ["FLAIR", "T1W", "T1WKS", "T2W"]: _nii(tmp_path / "raw/patient01" / f"{n}.nii.gz", BRAIN[:, :, :6] if n != "FLAIR" else BRAIN)
    _nii(tmp_path / "raw/patient01/consensus_gt.nii.gz", (SEG > 0).astype(np.uint8))
    with pytest.raises(UADInputError, match="several MSLUB variants"):
        find_mslub(tmp_path)
    assert check_dataset(tmp_path, "mslub", variant="raw").ok


def test_generic_globs_and_ids(tmp_path):
    for sid in ("caseA", "caseB"):
        _nii(tmp_path / sid / f"{sid}_flair.nii.gz"); _nii(tmp_path / sid / f"{sid}_t2.nii")
        _nii(tmp_path / sid / f"{sid}_seg.nii.gz", (SEG > 0).astype(np.uint8))
    subs = find_nifti(tmp_path, {"flair": "*/*_flair.nii.gz", "t2": "*/*_t2.nii"}, labels="*/*_seg.nii.gz")
    assert [s.id for s in subs] == ["caseA", "caseB"] and sorted(subs[0].images) == ["flair", "t2"]
    assert [s.id for s in find_nifti(tmp_path, "*/caseA_flair.nii.gz")] == ["caseA"]  # no wildcard in the name: parent folder


def test_reading_tolerates_dtypes_orientations_negatives(tmp_path):
    v = BRAIN.astype(np.int16).copy(); v[0, 0, 0] = -3          # skull-stripping residue
    for i, (aff, ext, dt) in enumerate([(np.diag([-1.0, -1, 1, 1]), ".nii.gz", np.int16), (np.diag([-1.0, 1, 1, 1]), ".nii", np.float32),
                                        (np.eye(4), ".nii.gz", np.float32)]):
        sid = _sid(i + 1)
        for m in ("t2", "seg"): _nii(tmp_path / sid / f"{sid}_{m}{ext}", (SEG if m == "seg" else v.astype(dt)), aff)
    r = check_dataset(tmp_path, modalities=("t2",))
    assert r.ok, r.errors
    assert sorted(x["orientation"] for x in r.rows) == ["LAS", "LPS", "RAS"]


def test_fastmri_plus_boxes(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "file_brain_AXFLAIR_200_6002462.h5", "w") as f:
        f["reconstruction_rss"] = np.ones((5, 16, 12), np.float32)
    (tmp_path / "brain.csv").write_text("file,slice,study_level,x,y,width,height,label\n"
                                        "file_brain_AXFLAIR_200_6002462,2,No,1,2,3,4,Edema\n")
    r = check_dataset(tmp_path)
    assert r.dataset == "fastmri" and r.ok and r.rows[0]["label_voxels"] == 1
    s = find_fastmri_brain(tmp_path, tmp_path / "brain.csv", slices=[0, 2])[0]
    assert s.meta["boxes"] == {0: [], 2: [[1.0, 2.0, 3.0, 4.0, "Edema"]]}


# --- modality names, multi-class labels -------------------------------------------------------------

def test_canonical_modality_names():
    assert [canonical_modality(m) for m in ("T1", "t1n", "T1w", "T1ce", "t1c", "T1POST", "T1WKS", "T2", "t2w", "FLAIR", "t2f",
                                            "T2-FLAIR", "PD")] == \
        ["t1", "t1", "t1", "t1ce", "t1ce", "t1ce", "t1ce", "t2", "t2", "flair", "flair", "flair", "pd"]
    assert MODALITIES == ("t1", "t1ce", "t2", "flair", "pd") and canonical_modality("ADC") == "adc"
    with pytest.raises(UADInputError, match="modality must be one of"): canonical_modality("ADC", strict=True)
    with pytest.raises(UADInputError, match="modality must be one of"): canonical_modality(" ")
    assert modality_aliases("brats") == {"t1": ("t1", "t1n"), "t1ce": ("t1ce", "t1c"), "t2": ("t2", "t2w"), "flair": ("flair", "t2f")}
    assert set(modality_aliases("mslub")) == {"flair", "t1", "t1ce", "t2"} and modality_aliases("nifti") == {}
    # every canonical key an adapter lists is what canonical_modality makes of the names in its files
    for ds in ("ixi", "brats", "atlas", "mslub"):
        for key, names in modality_aliases(ds).items():
            assert {canonical_modality(n.replace("_deface", "")) for n in names} == {key}, (ds, key)


def test_modalities_any_case_every_adapter(tmp_path):
    for n in ["IXI-T2/IXI002-Guys-0828-T2.nii.gz", "IXI-PD/IXI002-Guys-0828-PD.nii.gz"]: _nii(tmp_path / "ixi" / n)
    for mods in (("T2",), ("t2",), ("T2w",)):
        (s,) = find_ixi_subjects(tmp_path / "ixi", mods)
        assert list(s.images) == ["t2"] and s.images["t2"].name == "IXI002-Guys-0828-T2.nii.gz"
    assert list(find_ixi_subjects(tmp_path / "ixi", ("pd", "T2"))[0].images) == ["pd", "t2"]
    _brats20(tmp_path / "b20", 1)
    for mods in (("T2",), ("t2",)):
        (s,) = find_brats(tmp_path / "b20", mods)
        assert list(s.images) == ["t2"] and s.images["t2"].name == f"{_sid()}_t2.nii.gz"
    assert list(find_brats(tmp_path / "b20", ("FLAIR", "T1CE"))[0].images) == ["flair", "t1ce"]
    for n in ["FLAIR", "T1W", "T1WKS", "T2W"]: _nii(tmp_path / "mslub/coregistered/patient01" / f"{n}.nii.gz")
    _nii(tmp_path / "mslub/coregistered/patient01/consensus_gt.nii.gz", (SEG > 0).astype(np.uint8))
    s = find_mslub(tmp_path / "mslub", ("FLAIR", "t1post", "T2"))[0]
    assert list(s.images) == ["flair", "t1ce", "t2"] and s.images["t1ce"].name == "T1WKS.nii.gz"
    assert s.meta["file_modalities"] == {"flair": "FLAIR", "t1ce": "T1WKS", "t2": "T2W"}
    # one canonical key per modality everywhere (also for the CLI's --modalities)
    assert check_dataset(tmp_path / "ixi", modalities=("T2",)).rows[0]["modalities"] == "t2"
    assert check_dataset(tmp_path / "b20", modalities=("T2", "Flair")).rows[0]["modalities"] == "t2,flair"


def test_generic_layout_modalities_any_case(tmp_path, capsys):
    for sid in ("caseA", "caseB"):
        _nii(tmp_path / sid / f"{sid}_t2.nii.gz"); _nii(tmp_path / sid / f"{sid}_FLAIR.nii.gz"); _nii(tmp_path / sid / f"{sid}_seg.nii.gz", SEG)
    subs = find_nifti(tmp_path, "*/*_{modality}.nii.gz", labels="*/*_seg.nii.gz", modalities=("T2", "flair"))
    assert [(s.id, list(s.images)) for s in subs] == [("caseA", ["t2", "flair"]), ("caseB", ["t2", "flair"])]
    assert subs[0].images["t2"].name == "caseA_t2.nii.gz" and subs[0].images["flair"].name == "caseA_FLAIR.nii.gz"
    assert subs[0].meta["file_modalities"] == {"t2": "T2", "flair": "flair"}
    # a dict's keys are canonicalised, and modalities picks among them in any case
    subs = find_nifti(tmp_path, {"T2": "*/*_t2.nii.gz", "FLAIR": "*/*_FLAIR.nii.gz"}, modalities=("t2",))
    assert list(subs[0].images) == ["t2"]
    with pytest.raises(UADInputError, match=r"modalities \['pd'\] have no images glob"):
        find_nifti(tmp_path, {"T2": "*/*_t2.nii.gz"}, modalities=("PD",))
    with pytest.raises(UADInputError, match="two images globs name the modality 't2'"):
        find_nifti(tmp_path, {"T2": "*/*_t2.nii.gz", "t2w": "*/*_t2.nii.gz"})
    with pytest.raises(UADInputError, match="needs modalities"):
        find_nifti(tmp_path, "*/*_{modality}.nii.gz")
    r = check_dataset(tmp_path, images="*/*_{modality}.nii.gz", modalities=("PD",))
    assert not r.ok and "no file matches the images (PD) glob" in str(r.errors[0]) and "*/*_PD.nii.gz" in str(r.errors[0])
    assert main(["data", "check", str(tmp_path), "--images", "*/*_{modality}.nii.gz", "--modalities", "T2", "FLAIR",
                 "--labels", "*/*_seg.nii.gz"]) == 0
    assert "t2,flair (x2)" in capsys.readouterr().out


def _multiclass(root, seg, n=2):
    for i in range(n):
        sid = f"case{i}"
        _nii(root / sid / f"{sid}_t2.nii.gz"); _nii(root / sid / f"{sid}_lesion.nii.gz", seg)
    return root, {"images": "*/*_t2.nii.gz", "labels": "*/*_lesion.nii.gz"}


def test_generic_multiclass_labels_pass_and_print_values(tmp_path, capsys):
    root, kw = _multiclass(tmp_path / "brats2020like", SEG)           # {0, 1, 2, 4}
    r = check_dataset(root, **kw)
    assert r.ok, r.errors
    assert [x["label_values"] for x in r.rows] == [[0, 1, 2, 4]] * 2
    assert "labels: 2 subject(s), values [0, 1, 2, 4] (non-zero = anomalous; allowed: any non-negative integer)" in str(r)
    s = find_nifti(root, **kw)[0]
    assert label_volume(s).sum() == (SEG > 0).sum()                    # non-zero = anomalous
    seg15 = SEG.copy(); seg15[5, 5, 5] = 3                             # BraTS 2015: {0, 1, 2, 3, 4}
    root15, kw15 = _multiclass(tmp_path / "brats2015like", seg15)
    assert check_dataset(root15, **kw15).ok
    assert main(["data", "check", str(root15), "--images", kw["images"], "--labels", kw["labels"]]) == 0
    assert "values [0, 1, 2, 3, 4]" in capsys.readouterr().out


def test_label_values_restrict_and_name_the_option(tmp_path, capsys):
    root, kw = _multiclass(tmp_path / "ds", SEG, n=1)
    r = check_dataset(root, label_values=(0, 1), **kw)
    assert not r.ok and len(r.errors) == 1
    assert str(r.errors[0]) == (f"{root / 'case0' / 'case0_lesion.nii.gz'}: label values must be in [0, 1] "
                                "(set --label-values to change the allowed values) (got [0, 1, 2, 4])")
    assert "values [0, 1, 2, 4]" in str(r) and "allowed: [0, 1]" in str(r)
    assert check_dataset(root, label_values=(0, 1, 2, 4), **kw).ok
    # the same restriction given to the adapter
    assert not check_dataset(root, **(kw | {"label_values": (0, 1)})).ok
    assert main(["data", "check", str(root), "--images", kw["images"], "--labels", kw["labels"], "--label-values", "0", "1"]) == 1
    out = capsys.readouterr().out
    assert "case0_lesion.nii.gz: label values must be in [0, 1] (set --label-values" in out
    # negative values are never labels
    neg = SEG.astype(np.int16); neg[0, 0, 0] = -1
    rn, kwn = _multiclass(tmp_path / "neg", neg, n=1)
    e = check_dataset(rn, **kwn).errors
    assert len(e) == 1 and "label values must be non-negative integers" in str(e[0]) and "--label-values" in str(e[0])
    # a named layout keeps its own set, and the message names the option too
    _brats20(tmp_path / "b20", 1)
    e = []; check_subject(find_brats(tmp_path / "b20")[0], (0, 1), e)
    assert len(e) == 1 and "must be in [0, 1] (set --label-values" in str(e[0]) and "(got [0, 1, 2, 4])" in str(e[0])


def test_brats_2023_names_map_to_canonical_keys(tmp_path):
    seg23 = SEG.copy(); seg23[SEG == 4] = 3
    for sid in ("BraTS-GLI-00000-000", "BraTS-MEN-00004-000"):
        for m in ("t1n", "t1c", "t2w", "t2f", "seg"): _nii(tmp_path / sid / f"{sid}-{m}.nii.gz", seg23 if m == "seg" else BRAIN)
    subs = find_brats(tmp_path)
    assert [s.id for s in subs] == ["BraTS-GLI-00000-000", "BraTS-MEN-00004-000"]
    s = subs[0]
    assert list(s.images) == ["t1", "t1ce", "t2", "flair"]
    assert {k: p.name for k, p in s.images.items()} == {"t1": "BraTS-GLI-00000-000-t1n.nii.gz", "t1ce": "BraTS-GLI-00000-000-t1c.nii.gz",
                                                        "t2": "BraTS-GLI-00000-000-t2w.nii.gz", "flair": "BraTS-GLI-00000-000-t2f.nii.gz"}
    assert s.meta["file_modalities"] == {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
    assert s.label.name == "BraTS-GLI-00000-000-seg.nii.gz" and s.meta["labels_convention"] == "brats2023"
    for mods in (("t2w",), ("T2",), ("t2",)): assert list(find_brats(tmp_path, mods)[0].images) == ["t2"]
    for mods in (("t2f",), ("FLAIR",)): assert find_brats(tmp_path, mods)[0].images["flair"].name.endswith("-t2f.nii.gz")
    r = check_dataset(tmp_path, modalities=("T2", "FLAIR"))
    assert r.dataset == "brats" and r.ok, r.errors
    assert r.rows[0]["modalities"] == "t2,flair" and r.rows[0]["label_values"] == [0, 1, 2, 3]
    (tmp_path / "BraTS-MEN-00004-000" / "BraTS-MEN-00004-000-t2f.nii.gz").unlink()
    with pytest.raises(UADInputError, match=r"BraTS subject BraTS-MEN-00004-000 is missing modalities \['flair'\]"):
        find_brats(tmp_path)


# --- bad input: one line naming the file, the rule and the value; nothing cached ----------------------

def _case_empty(root):
    root.mkdir(); return root, {}, "folder is empty", root.name, None

def _case_unmatched_label(root):
    _nii(root / "a/a_flair.nii.gz"); _nii(root / "b/b_seg.nii.gz", SEG)
    return root, {"images": "*/*_flair.nii.gz", "labels": "*/*_seg.nii.gz"}, "label has no matching image", "b_seg.nii.gz", "'b'"

def _case_label_values(root):
    _brats20(root, 1); bad = SEG.copy(); bad[0, 0, 0] = 3
    _nii(root / _sid() / f"{_sid()}_seg.nii.gz", bad)
    return root, {}, "label values must be in [0, 1, 2, 4] (set --label-values to change the allowed values)", f"{_sid()}_seg.nii.gz", \
        "(got [0, 1, 2, 3, 4])"

def _case_shape(root):
    _brats20(root, 1); _nii(root / _sid() / f"{_sid()}_seg.nii.gz", SEG[:, :, :7])
    return root, {}, "label shape must equal the shape of", f"{_sid()}_seg.nii.gz", "(8, 8, 7)"

def _case_affine(root):
    _brats20(root, 1); _nii(root / _sid() / f"{_sid()}_t2.nii.gz", BRAIN, np.diag([2.0, 1, 1, 1]))
    return root, {}, "image (t2) affine must equal the affine of BraTS20_Training_001_t1.nii.gz", f"{_sid()}_t2.nii.gz", "2.0"

def _case_4d(root):
    _brats20(root, 1); _nii(root / _sid() / f"{_sid()}_t2.nii.gz", np.stack([BRAIN] * 2, -1))
    return root, {}, "image must be 3D", f"{_sid()}_t2.nii.gz", "(8, 8, 8, 2)"

def _case_nan(root):
    _brats20(root, 1); a = BRAIN.astype(np.float32); a[1, 1, 1] = np.inf
    _nii(root / _sid() / f"{_sid()}_flair.nii.gz", a)
    return root, {}, "voxel values must be finite", f"{_sid()}_flair.nii.gz", "1 NaN/Inf"

def _case_all_zero(root):
    _brats20(root, 1); _nii(root / _sid() / f"{_sid()}_t2.nii.gz", np.zeros((8, 8, 8), np.int16))
    return root, {}, "image is all zero", f"{_sid()}_t2.nii.gz", "t2"

def _case_duplicate_id(root):
    _brats20(root / "HGG", 1); _brats20(root / "LGG", 1)
    return root, {}, "duplicate subject id", f"{_sid()}_", _sid()

def _case_missing_modality(root):
    _brats20(root, 2); (root / _sid(2) / f"{_sid(2)}_flair.nii.gz").unlink()
    return root, {}, "is missing modalities ['flair']", _sid(2), "t1ce"

def _case_missing_label(root):
    _brats20(root, 2); (root / _sid(2) / f"{_sid(2)}_seg.nii.gz").rename(root / _sid(2) / "W39_1998.09.19_Segm.nii.gz")
    return root, {}, "has no _seg label (other subjects have one); unrecognised NIfTI files here", _sid(2), "t1ce"

def _case_bad_gzip(root):
    _brats20(root, 1); (root / _sid() / f"{_sid()}_t2.nii.gz").write_bytes(b"\x1f\x8bnot really gzip")
    return root, {}, "not a readable NIfTI", f"{_sid()}_t2.nii.gz", "Error"

def _case_truncated(root):
    _brats20(root, 1); p = root / _sid() / f"{_sid()}_t2.nii.gz"
    raw = gzip.decompress(p.read_bytes()); p.write_bytes(gzip.compress(raw[: len(raw) - 200]))
    return root, {}, "truncated or corrupt", f"{_sid()}_t2.nii.gz", "Error"

def _case_wrong_glob(root):
    _brats20(root, 1)
    return root, {"images": "*/*_FLAIR.nii.gz"}, "no file matches the images (image) glob", root.name, "*/*_FLAIR.nii.gz"

def _case_non_integer_label(root):
    _brats20(root, 1); _nii(root / _sid() / f"{_sid()}_seg.nii.gz", SEG.astype(np.float32) * 0.5)
    return root, {}, "label values must be integers", f"{_sid()}_seg.nii.gz", "0.5"

def _case_unknown_layout(root):
    _nii(root / "x" / "scan.nii.gz")
    return root, {}, "no known layout", root.name, None

def _case_fastmri_box(root):
    h5py = pytest.importorskip("h5py")
    root.mkdir()
    with h5py.File(root / "file_brain_AXT2_200_1.h5", "w") as f: f["reconstruction_rss"] = np.ones((3, 8, 8), np.float32)
    (root / "brain.csv").write_text("file,slice,study_level,x,y,width,height,label\nfile_brain_AXT2_200_1,1,No,6,6,5,5,Mass\n")
    return root, {}, "box must lie inside the (8, 8) slice 1", "file_brain_AXT2_200_1.h5", "[6.0, 6.0, 5.0, 5.0]"

def _case_several_layouts(root):
    _brats20(root / "BraTS", 1); _nii(root / "IXI-T2" / "IXI002-Guys-0828-T2.nii.gz")
    return root, {}, "folder holds several dataset layouts", root.name, "['brats', 'ixi']"

CASES = [_case_several_layouts, _case_empty, _case_unmatched_label, _case_label_values, _case_shape, _case_affine, _case_4d, _case_nan,
         _case_all_zero, _case_duplicate_id, _case_missing_modality, _case_missing_label, _case_bad_gzip, _case_truncated,
         _case_wrong_glob, _case_non_integer_label, _case_unknown_layout, _case_fastmri_box]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[6:] for c in CASES])
def test_bad_input_is_one_clear_line(case, tmp_path, tmp_data):
    root, kw, rule, fname, value = case(tmp_path / "ds")
    r = check_dataset(root, **kw)
    assert not r.ok
    msgs = [str(e) for e in r.errors]
    hit = [m for m in msgs if rule in m]
    assert hit, msgs
    assert "\n" not in hit[0] and fname in hit[0]
    if value is not None: assert value in hit[0], hit[0]
    with pytest.raises(UADInputError):      # the strict loader raises before anything could be cached
        load_subjects(root, **kw)
    assert not tmp_data.exists()


def test_cli_data_check(tmp_path, capsys):
    _brats20(tmp_path / "ok", 2)
    assert main(["data", "check", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    assert "brats" in out and "2 subject(s)" in out and "(8, 8, 8)" in out and "values [0, 1, 2, 4]" in out
    _brats20(tmp_path / "bad", 1); _nii(tmp_path / "bad" / _sid() / f"{_sid()}_seg.nii.gz", SEG[:, :, :7])
    assert main(["data", "check", str(tmp_path / "bad"), "--dataset", "brats"]) == 1
    assert f"{_sid()}_seg.nii.gz: label shape must equal" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "ok"), "--images", "flair=*/*_flair.nii.gz", "--images", "t2=*/*_t2.nii.gz",
                 "--labels", "*/*_seg.nii.gz", "--label-values", "0", "1", "2", "4"]) == 0
    assert "flair,t2 (x2)" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "ok"), "--dataset", "atlas", "--modalities", "T1"]) == 1
    assert "options ['modalities'] do not apply to the 'atlas' layout" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "ok"), "--dataset", "brats", "--images", "*/*_t2.nii.gz"]) == 2
    assert "go with the generic layout" in capsys.readouterr().err


# --- real data (skipped when ../shared/realdata is absent) -----------------------------------------

def test_real_mslub(realdata):
    r = check_dataset(realdata / "mslub")
    assert r.dataset == "mslub" and r.ok, r.errors
    assert [x["id"] for x in r.rows] == ["patient07", "patient19", "patient26"]
    assert {x["shape"] for x in r.rows} == {(182, 218, 182)} and all(x["label_values"] == [0, 1] for x in r.rows)


def test_real_brats_layouts(realdata):
    r = check_dataset(realdata / "brats-2023-gli")
    assert r.dataset == "brats" and r.ok and r.rows[0]["id"] == "BraTS-GLI-00001-000" and r.rows[0]["orientation"] == "LPS"
    assert r.rows[0]["modalities"] == "t1,t1ce,t2,flair"
    for mods in (("t2",), ("T2",), ("t2w",)):
        s = find_brats(realdata / "brats-2023-gli", mods)[0]
        assert list(s.images) == ["t2"] and s.images["t2"].name == "BraTS-GLI-00001-000-t2w.nii.gz" and s.label is None
    # BraTS-preprocessed TCGA gliomas through the generic globs, labels in the BraTS 2020 set
    r = check_dataset(realdata / "glioma-tcga", images={"t2": "*/*_t2_bet.nii.gz", "flair": "*/*_fla_bet.nii.gz"},
                      labels="*/*_seg_fusion_mav.nii.gz", label_values=(0, 1, 2, 4))
    assert r.ok, r.errors
    assert [x["id"] for x in r.rows] == ["TCGA-DU-7294", "TCGA-FG-6692"]


def test_real_glioma_multiclass_labels_by_default(realdata):
    "Multi-class lesion maps pass the generic layout without --label-values; {modality} globs in any case."
    kw = dict(images="*/*_{modality}_bet.nii.gz", modalities=("T2", "FLA"), labels="*/*_seg_fusion_mav.nii.gz")
    r = check_dataset(realdata / "glioma-tcga", **kw)
    assert r.ok, r.errors
    assert all(x["modalities"] == "t2,flair" for x in r.rows)
    assert all(set(x["label_values"]) <= {0, 1, 2, 4} and len(x["label_values"]) > 2 for x in r.rows)
    assert "values [0, 1, 2, 4]" in str(r)
    r = check_dataset(realdata / "glioma-tcga", label_values=(0, 1), **kw)
    assert not r.ok and all("(set --label-values to change the allowed values)" in str(e) for e in r.errors)
