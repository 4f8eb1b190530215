"Clear errors for bad input files: each names the file, the rule and the value."
import gzip

import nibabel as nib
import numpy as np
import pytest

from uad_study.core import UADInputError
from uad_study.io import Subject, check_same_grid, load_volume, save_like
from uad_study.preprocess import SliceRecipe, build_slices


def _save(path, arr, aff=np.eye(4)):
    nib.save(nib.Nifti1Image(arr, aff), str(path))
    return path


def test_missing_file(tmp_path):
    with pytest.raises(UADInputError, match="file does not exist") as e:
        load_volume(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(e.value)


def test_corrupt_gzip(tmp_path):
    p = tmp_path / "bad.nii.gz"
    p.write_bytes(b"\x1f\x8b\x08garbage that is not deflate")
    with pytest.raises(UADInputError, match="bad.nii.gz") as e:
        load_volume(p)
    assert "not a readable NIfTI" in str(e.value) or "truncated or corrupt" in str(e.value)


def test_truncated_file(tmp_path):
    p = _save(tmp_path / "t.nii.gz", np.random.rand(30, 30, 30).astype(np.float32))
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(UADInputError, match="truncated or corrupt") as e:
        load_volume(p)
    assert "t.nii.gz" in str(e.value)


def test_non_3d(tmp_path):
    p = _save(tmp_path / "four.nii.gz", np.zeros((4, 4, 4, 2), np.float32))
    with pytest.raises(UADInputError, match=r"image must be 3D .*got \(4, 4, 4, 2\)"):
        load_volume(p)
    p2 = _save(tmp_path / "two.nii.gz", np.zeros((4, 4), np.float32))
    with pytest.raises(UADInputError, match="image must be 3D"):
        load_volume(p2)


def test_singleton_4th_axis_is_accepted(tmp_path):
    p = _save(tmp_path / "s.nii.gz", np.ones((3, 4, 5, 1), np.float32))
    assert load_volume(p)[0].shape == (3, 4, 5)


def test_nan_voxels(tmp_path):
    a = np.ones((4, 4, 4), np.float32); a[1, 1, 1] = np.nan
    with pytest.raises(UADInputError, match="voxel values must be finite .*1 NaN/Inf"):
        load_volume(_save(tmp_path / "n.nii.gz", a))


def test_label_shape_and_affine_mismatch(tmp_path):
    img = _save(tmp_path / "img.nii.gz", np.ones((8, 8, 8), np.float32))
    bad_shape = _save(tmp_path / "seg1.nii.gz", np.zeros((8, 8, 7), np.uint8))
    bad_aff = _save(tmp_path / "seg2.nii.gz", np.zeros((8, 8, 8), np.uint8), np.diag([2.0, 1, 1, 1]))
    with pytest.raises(UADInputError, match=r"seg1.nii.gz: label/mask shape must equal its image's shape \(8, 8, 8\) \(got \(8, 8, 7\)\)"):
        check_same_grid(img, bad_shape)
    with pytest.raises(UADInputError, match="seg2.nii.gz: label/mask affine must equal"):
        check_same_grid(img, bad_aff)
    # the same error surfaces from preprocessing, and nothing is written to the cache
    s = Subject("s", {"t2": img}, label=bad_shape)
    with pytest.raises(UADInputError, match="shape must equal"):
        build_slices([s], SliceRecipe(resolution=8), cache=tmp_path / "cache", n_jobs=1, progress=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_all_zero_volume(tmp_path):
    img = _save(tmp_path / "zero.nii.gz", np.zeros((8, 8, 8), np.float32))
    with pytest.raises(UADInputError, match="zero.nii.gz: brain mask is empty"):
        build_slices([Subject("z", {"t2": img})], SliceRecipe(resolution=8), cache=tmp_path / "c", n_jobs=1, progress=False)


def test_duplicate_subject_ids(tmp_path):
    img = _save(tmp_path / "a.nii.gz", np.ones((8, 8, 8), np.float32))
    with pytest.raises(UADInputError, match=r"subject ids must be unique \(got \['a'\]\)"):
        build_slices([Subject("a", {"t2": img})] * 2, SliceRecipe(resolution=8), cache=tmp_path / "c", n_jobs=1)


def test_orientation_round_trip(tmp_path):
    "A map computed in RAS+ is written back on the input's own grid, for LPS, LAS and RAS inputs."
    arr = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    for name, aff in {"ras": np.eye(4), "las": np.diag([-1.0, 1, 1, 1]), "lps": np.diag([-1.0, -1, 1, 1])}.items():
        p = _save(tmp_path / f"{name}.nii.gz", arr, aff)
        v, _ = load_volume(p)
        out = save_like(v, p, tmp_path / f"{name}_map.nii.gz")
        back = nib.load(out)
        np.testing.assert_array_equal(np.asarray(back.dataobj), arr)
        np.testing.assert_array_equal(back.affine, aff)


def test_real_glioma_volume_reads_in_ras(realdata):
    "Real BraTS-preprocessed data (LPS, int16 with small negative values) loads in RAS+ and its label agrees."
    d = realdata / "glioma-tcga" / "TCGA-DU-7294"
    img, seg = d / "TCGA-DU-7294_t2_bet.nii.gz", d / "TCGA-DU-7294_seg_fusion_mav.nii.gz"
    check_same_grid(img, seg)
    v, im = load_volume(img)
    assert nib.aff2axcodes(im.affine) == ("R", "A", "S")
    assert v.shape == (240, 240, 155) and v.dtype == np.float32
    labels = set(np.unique(load_volume(seg)[0]).astype(int))
    assert labels <= {0, 1, 2, 4} and len(labels) > 1
