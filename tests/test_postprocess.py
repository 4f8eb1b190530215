"Post-processing: each step on hand-made volumes, exactness of the cropped median, bad inputs."
import dataclasses, json

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label as sk_label

from uad_study.core import UADInputError
from uad_study.postprocess import (PRESETS, TRIVAE_PAPER_SPACING, PostprocessConfig, median_kernel_voxels, median_volume,
                                   min_component_voxels, postprocess_steps, postprocess_volume, remove_small_components)

OFF = PostprocessConfig(mask=False, threshold=None, median_size=0, min_component_size=0)


def only(**kw) -> PostprocessConfig:
    "A config with every step off except those given."
    return dataclasses.replace(OFF, **kw)


def cube(shape=(20, 20, 20)):
    return np.zeros(shape, np.float32), np.ones(shape, bool)


# --- the pipeline on hand-made volumes ------------------------------------------------------------

@pytest.mark.parametrize("dims", [2, 3])
def test_hot_voxel_removed_by_median(dims):
    r, _ = cube(); r[7, 8, 9] = 5.0
    assert postprocess_volume(r, None, only(median_size=5, median_dims=dims)).max() == 0


def test_trivae_keeps_5cube_core_drops_3cube_and_speck():
    r, brain = cube((24, 24, 24))
    r[2:7, 2:7, 2:7] = 0.6          # 5x5x5 lesion: its core survives the 5^3 median
    r[14:17, 14:17, 14:17] = 0.8    # 3x3x3 lesion: 27 < 63 of 125 voxels, erased by the 5^3 median
    out = postprocess_volume(r, brain, PRESETS["trivae"])
    assert out[4, 4, 4] == np.float32(0.6)
    assert out[15, 15, 15] == 0
    # a 3x3x3 cube survives a 3^3 median (centre window is all lesion)
    out3 = postprocess_volume(r, brain, only(median_size=3))
    assert out3[15, 15, 15] == np.float32(0.8)


def test_component_step_removes_2_voxel_blob_keeps_cube():
    r, brain = cube()
    r[3, 3, 3:5] = 0.5              # 2-voxel blob
    r[10:13, 10:13, 10:13] = 0.5    # 3x3x3 cube = 27 voxels
    out = postprocess_volume(r, brain, dataclasses.replace(PRESETS["trivae"], median_size=0))
    assert out[3, 3, 3:5].sum() == 0
    assert (out[10:13, 10:13, 10:13] == np.float32(0.5)).all()
    assert (out > 0).sum() == 27


def test_threshold_and_mask():
    r = np.array([0.05, 0.1, 0.2, 0.9], np.float32).reshape(1, 1, 4)
    np.testing.assert_array_equal(postprocess_volume(r, None, only(threshold=0.1)).ravel(), np.float32([0, 0.1, 0.2, 0.9]))
    brain = np.array([1, 1, 1, 0], bool).reshape(1, 1, 4)
    np.testing.assert_array_equal(postprocess_volume(r, brain, only(mask=True)).ravel(), np.float32([0.05, 0.1, 0.2, 0]))
    np.testing.assert_array_equal(postprocess_volume(r, brain.astype(np.uint8), only(mask=True, threshold=0.1)).ravel(),
                                  np.float32([0, 0.1, 0.2, 0]))


def test_mask_erosion_2d_vs_3d():
    r = np.ones((9, 9, 5), np.float32)
    brain = np.zeros_like(r, bool); brain[1:8, 1:8, :] = True   # brain touches the top and bottom slices
    out2 = postprocess_volume(r, brain, only(mask=True, mask_erosion=1, mask_erosion_dims=2))
    np.testing.assert_array_equal(out2 > 0, ndi.binary_erosion(brain, structure=np.stack(
        [np.zeros((3, 3)), ndi.generate_binary_structure(2, 1), np.zeros((3, 3))], -1)))
    assert (out2[..., 0] > 0).sum() == 25                       # 7x7 -> 5x5 on every slice, the end slices kept
    out3 = postprocess_volume(r, brain, only(mask=True, mask_erosion=1, mask_erosion_dims=3))
    assert (out3[..., 0] > 0).sum() == 0                        # 3D erosion eats the end slices


def test_positive_only():
    r = np.array([-0.5, -0.01, 0.0, 0.3], np.float32).reshape(1, 1, 4)
    np.testing.assert_array_equal(postprocess_volume(r, None, only(positive_only=True)).ravel(), np.float32([0, 0, 0, 0.3]))
    a = np.abs(r)
    np.testing.assert_array_equal(postprocess_volume(a, None, only(positive_only=True)), a)


def test_none_is_identity_and_input_untouched():
    rng = np.random.default_rng(1)
    r = rng.random((6, 7, 8)).astype(np.float64)
    keep = r.copy()
    out = postprocess_volume(r, None, PRESETS["none"])
    assert out.dtype == np.float32 and out.shape == r.shape
    np.testing.assert_array_equal(out, r.astype(np.float32))
    postprocess_volume(r, np.ones(r.shape, bool), PRESETS["trivae"])
    np.testing.assert_array_equal(r, keep)


# --- median and components against the libraries -------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("size,dims", [(3, 3), (5, 3), (7, 3), (5, 2), (3, 2)])
def test_median_volume_equals_scipy(seed, size, dims):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(3, 16, 3))
    v = np.zeros(shape, np.float32)
    # a random box of values, sometimes touching the borders, mostly zeros elsewhere
    lo = [rng.integers(0, s) for s in shape]; hi = [rng.integers(l + 1, s + 1) for l, s in zip(lo, shape)]
    box = tuple(slice(l, h) for l, h in zip(lo, hi))
    v[box] = rng.random(v[box].shape) * (rng.random(v[box].shape) < 0.7)
    if seed % 2: v[0, 0, 0] = 3.0        # a lone value in a corner
    kernel = (size,) * 3 if dims == 3 else (size, size, 1)
    np.testing.assert_array_equal(median_volume(v, size, dims), ndi.median_filter(v, size=kernel, mode="reflect"))
    if dims == 2:   # and each slice on its own
        got = median_volume(v, size, dims)
        for k in range(shape[2]):
            np.testing.assert_array_equal(got[..., k], ndi.median_filter(v[..., k], size=size, mode="reflect"))


def test_median_all_zero_and_signed():
    z = np.zeros((5, 5, 5), np.float32)
    np.testing.assert_array_equal(median_volume(z, 5, 3), z)
    rng = np.random.default_rng(0)
    v = (rng.random((9, 8, 7)) - 0.5).astype(np.float32); v[:, :4] = 0
    np.testing.assert_array_equal(median_volume(v, 5, 3), ndi.median_filter(v, size=5, mode="reflect"))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("connectivity,sk_conn", [("full", None), ("face", 1)])
@pytest.mark.parametrize("dims", [2, 3])
def test_components_match_skimage(seed, connectivity, sk_conn, dims):
    rng = np.random.default_rng(seed)
    v = (rng.random((10, 11, 6)) < 0.15) * rng.random((10, 11, 6)).astype(np.float32)
    min_size = int(rng.integers(2, 6))
    got = remove_small_components(v, min_size, dims, connectivity)

    def ref(x):
        lab = sk_label(x != 0, connectivity=sk_conn or x.ndim)
        sizes = np.bincount(lab.ravel())
        out = x.copy(); out[(sizes < min_size)[lab] & (lab > 0)] = 0
        return out
    want = ref(v) if dims == 3 else np.stack([ref(v[..., k]) for k in range(v.shape[2])], -1)
    np.testing.assert_array_equal(got, want)


# --- steps and config -------------------------------------------------------------------------

def test_steps_order_and_json():
    cfg = PostprocessConfig(positive_only=True, mask_erosion=2, median_dims=2, component_dims=2, connectivity="face")
    steps = postprocess_steps(cfg)
    assert [s["step"] for s in steps] == ["positive_only", "mask", "threshold", "median", "remove_small_components"]
    assert steps[1]["erosion_voxels"] == 2 and steps[1]["erosion_dims"] == 2
    assert steps[3]["kernel"] == [5, 5, 1] and steps[4]["neighbours"] == 4
    assert json.loads(json.dumps(steps)) == steps
    t = postprocess_steps(PRESETS["trivae"])
    assert t == [
        {"step": "mask", "rule": "values outside the brain mask set to 0", "erosion_voxels": 0},
        {"step": "threshold", "rule": "values < threshold set to 0", "threshold": 0.1},
        {"step": "median", "size": 5, "dims": 3, "kernel": [5, 5, 5], "mode": "reflect"},
        {"step": "remove_small_components", "rule": "components of (map != 0) with fewer voxels than min_size set to 0",
         "min_size": 8, "dims": 3, "connectivity": "full", "neighbours": 26}]
    assert postprocess_steps(PRESETS["none"]) == []
    assert [s["step"] for s in postprocess_steps(PRESETS["mask_only"])] == ["mask"]


def test_presets_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["trivae"].threshold = 0.2


@pytest.mark.parametrize("kw,msg", [
    (dict(median_size=4), "must be odd"), (dict(median_size=-3), "int >= 0"), (dict(median_size=5.0), "int >= 0"),
    (dict(median_dims=1), "must be 2 or 3"), (dict(component_dims=4), "must be 2 or 3"),
    (dict(connectivity="diag"), "must be one of"), (dict(threshold=float("inf")), "finite number"),
    (dict(threshold="0.1"), "finite number"), (dict(min_component_size=-1), "int >= 0"),
    (dict(mask_erosion=-1), "int >= 0"), (dict(mask="yes"), "True or False"),
])
def test_bad_config(kw, msg):
    with pytest.raises(UADInputError, match=msg): PostprocessConfig(**kw)


def test_bad_inputs():
    r, brain = cube((4, 4, 4))
    cfg = PRESETS["trivae"]
    with pytest.raises(UADInputError, match="must be 3D"): postprocess_volume(r[0], brain[0], cfg)
    with pytest.raises(UADInputError, match="must be 3D"): postprocess_volume(r[None], brain[None], cfg)
    with pytest.raises(UADInputError, match="residual's shape"): postprocess_volume(r, brain[:, :, :3], cfg)
    with pytest.raises(UADInputError, match="no `brain_mask`"): postprocess_volume(r, None, cfg)
    bad = r.copy(); bad[1, 1, 1] = np.nan
    with pytest.raises(UADInputError, match="must be finite"): postprocess_volume(bad, brain, cfg)
    with pytest.raises(UADInputError, match="must be binary"): postprocess_volume(r, brain.astype(float) * 0.5, cfg)
    with pytest.raises(UADInputError, match="real numbers"): postprocess_volume(r.astype(complex), brain, cfg)
    with pytest.raises(UADInputError, match="PostprocessConfig"): postprocess_volume(r, brain, {"mask": True})
    assert isinstance(UADInputError("x"), ValueError)


# --- the fast (non-negative, sparse) median path ------------------------------------------------------

@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("size,dims", [(5, 3), (3, 3), (5, 2), (9, 2), (7, 3)])
def test_fast_median_sparse_ties_negatives(seed, size, dims):
    "Sparse maps with ties (few distinct values), dense blobs, tiny shapes, and signed maps (scipy fallback)."
    rng = np.random.default_rng(100 + seed)
    shape = tuple(int(v) for v in rng.integers(2, 22, 3))
    v = np.where(rng.random(shape) < rng.uniform(0.05, 0.9), rng.choice([0.1, 0.5, 0.5, 1.0], shape), 0).astype(np.float32)
    if seed % 3 == 0: v[rng.random(shape) < 0.1] *= -1        # negatives: must still equal scipy
    if seed % 3 == 1: v = np.where(v > 0, rng.random(shape).astype(np.float32) + 0.1, 0)   # continuous values
    kernel = (size,) * 3 if dims == 3 else (size, size, 1)
    np.testing.assert_array_equal(median_volume(v, size, dims), ndi.median_filter(v, size=kernel, mode="reflect"))


def test_fast_median_helpers():
    from uad_study.postprocess import _box_sums
    rng = np.random.default_rng(0)
    a = rng.random((9, 7, 11)) < 0.4
    for kernel in [(5, 5, 5), (9, 9, 1), (3, 5, 7)]:
        want = np.rint(ndi.uniform_filter(a.astype(np.float64), size=kernel, mode="reflect") * np.prod(kernel))
        np.testing.assert_array_equal(_box_sums(a, kernel), want)


def test_thesis_presets():
    t, t5 = PRESETS["thesis"], PRESETS["thesis_median5"]
    assert [s["step"] for s in postprocess_steps(t)] == ["positive_only", "mask", "median", "remove_small_components"]
    st = {s["step"]: s for s in postprocess_steps(t)}
    assert st["median"]["kernel"] == [9, 9, 1] and st["remove_small_components"]["min_size"] == 7
    assert st["remove_small_components"]["dims"] == 2 and st["remove_small_components"]["neighbours"] == 8
    assert st["mask"]["erosion_voxels"] >= 1 and st["mask"]["erosion_dims"] == 2
    assert dataclasses.replace(t, median_size=5) == t5
    # signed residual: negatives dropped, a 6-pixel speck removed, a big blob kept (its core)
    r = np.zeros((30, 30, 3), np.float32); r[5:17, 5:17, 1] = 0.8; r[:, :, 2] = -1.0
    r[22:24, 22:25, 1] = 0.9
    out = postprocess_volume(r, np.ones(r.shape, bool), t)
    assert out[..., 2].max() == 0 and out[11, 11, 1] == np.float32(0.8) and out[22:24, 22:25, 1].max() == 0


# --- sizes in millimetres ----------------------------------------------------------------------

def test_existing_presets_unchanged():
    "Every voxel preset keeps its numbers (the mm fields are off)."
    t = PRESETS["trivae"]
    assert (t.mask, t.threshold, t.median_size, t.median_dims, t.min_component_size, t.component_dims, t.connectivity) == \
        (True, 0.1, 5, 3, 8, 3, "full")
    for name in ("trivae", "mask_only", "none", "thesis", "thesis_median5"):
        assert PRESETS[name].median_size_mm is None and PRESETS[name].min_component_mm3 is None, name
    assert postprocess_steps(t, spacing=(3.6, 3.6, 1.0)) == postprocess_steps(t)    # a spacing changes nothing in voxels


def test_trivae_mm_preset_is_the_paper_in_mm():
    "Paper: BraTS 240x240 at 1 mm resized to 256x256 -> 0.9375 mm pixels; 5 px = 4.6875 mm, 5 slices = 5 mm; 8 voxels = 7.03125 mm^3."
    assert TRIVAE_PAPER_SPACING == (0.9375, 0.9375, 1.0)
    c = PRESETS["trivae_mm"]
    assert (c.median_size, c.median_size_mm, c.min_component_size, c.min_component_mm3) == (None, (4.6875, 4.6875, 5.0), None, 7.03125)
    assert (c.mask, c.threshold, c.median_dims, c.component_dims, c.connectivity) == (True, 0.1, 3, 3, "full")
    st = {s["step"]: s for s in postprocess_steps(c, TRIVAE_PAPER_SPACING)}
    assert st["median"]["kernel"] == [5, 5, 5] and st["remove_small_components"]["min_size"] == 8
    assert st["remove_small_components"]["voxel_mm3"] == 0.87890625


@pytest.mark.parametrize("size_mm,spacing,dims,want", [
    (5.0, (1, 1, 1), 3, (5, 5, 5)),                 # isotropic 1 mm: mm = voxels
    (5.0, (0.5, 0.5, 0.5), 3, (11, 11, 11)),        # 10 voxels -> odd 11 (tie up)
    (4.6875, (0.9375, 0.9375, 1.0), 3, (5, 5, 5)),  # the paper's grid
    ((4.6875, 4.6875, 5.0), (233 / 64, 233 / 64, 1.0), 3, (1, 1, 5)),   # 64x64 from 233 mm: anisotropic
    ((4.6875, 4.6875, 5.0), (233 / 128, 233 / 128, 1.0), 3, (3, 3, 5)),
    (9.0, (1.0, 2.0, 4.0), 3, (9, 5, 3)),           # 9, 4.5, 2.25 voxels -> 9, 5, 3
    (9.0, (1.0, 2.0, 4.0), 2, (9, 5, 1)),           # per slice: the slice axis gets 1
    (0.2, (1, 1, 1), 3, (1, 1, 1)),                 # smaller than a voxel: no median
])
def test_median_mm_to_voxels(size_mm, spacing, dims, want):
    assert median_kernel_voxels(size_mm, spacing, dims) == want


@pytest.mark.parametrize("mm3,spacing,want", [
    (8.0, (1, 1, 1), 8), (7.03125, (0.9375, 0.9375, 1.0), 8), (7.5, (1, 1, 1), 8), (8.01, (1, 1, 1), 9),
    (8.0, (0.5, 1.0, 2.0), 8), (8.0, (1.0, 1.0, 3.0), 3),        # 3 voxels = 9 mm^3 >= 8 kept, 2 = 6 removed
    (7.03125, (233 / 64, 233 / 64, 1.0), 1),                     # one voxel is 13.3 mm^3: nothing removed
])
def test_min_component_mm3_to_voxels(mm3, spacing, want):
    assert min_component_voxels(mm3, spacing) == want


def test_anisotropic_kernel_is_applied():
    "A mm kernel on an anisotropic grid runs the anisotropic median, equal to scipy's."
    rng = np.random.default_rng(3)
    r = np.where(rng.random((14, 13, 12)) < 0.5, rng.random((14, 13, 12)), 0).astype(np.float32)
    cfg = only(median_size=None, median_size_mm=(3.0, 3.0, 5.0))
    sp = (1.0, 3.0, 1.0)                                          # kernel (3, 1, 5)
    assert postprocess_steps(cfg, sp)[0]["kernel"] == [3, 1, 5]
    np.testing.assert_array_equal(postprocess_volume(r, None, cfg, spacing=sp), ndi.median_filter(r, size=(3, 1, 5), mode="reflect"))


@pytest.mark.parametrize("seed", range(4))
def test_mm_preset_equals_voxel_preset_at_1mm(seed):
    "At 1 mm isotropic, trivae_mm (5 mm, 7.03 mm^3) gives exactly trivae (5 voxels, 8 voxels)."
    rng = np.random.default_rng(seed)
    r = np.zeros((24, 22, 20), np.float32)
    for _ in range(6):                                           # blobs of several sizes, some below 8 voxels
        c = rng.integers(2, 18, 3); e = rng.integers(1, 7, 3)
        r[c[0]:c[0] + e[0], c[1]:c[1] + e[1], c[2]:c[2] + e[2]] = rng.uniform(0.05, 1.0)
    r[10:16, 4:10, 8:14] = 0.7                                   # one lesion whose core survives the 5^3 median
    r += (rng.random(r.shape) < 0.02) * rng.random(r.shape).astype(np.float32)
    brain = np.ones(r.shape, bool); brain[:2] = False
    a = postprocess_volume(r, brain, PRESETS["trivae"])
    b = postprocess_volume(r, brain, PRESETS["trivae_mm"], spacing=(1.0, 1.0, 1.0))
    assert a.any() and np.array_equal(a, b)
    c = postprocess_volume(r, brain, PRESETS["trivae_mm"], spacing=TRIVAE_PAPER_SPACING)  # the paper's grid: also 5^3 and 8
    assert np.array_equal(a, c)


def test_component_step_in_mm_equals_voxels():
    "Components of 7 voxels go and of 8 stay, in voxels (< 8) and in mm^3 (< 8 mm^3 at 1 mm; < 7.03 mm^3 at the paper's grid)."
    r = np.zeros((12, 12, 12), np.float32); r[1, 1, 1:8] = 0.5; r[5, 5, 1:9] = 0.5; r[9, 1:10, 9] = 0.5
    vox = only(min_component_size=8)
    mm = only(min_component_size=None, min_component_mm3=8.0)
    want = r.copy(); want[1, 1, 1:8] = 0
    np.testing.assert_array_equal(postprocess_volume(r, None, vox), want)
    np.testing.assert_array_equal(postprocess_volume(r, None, mm, spacing=(1, 1, 1)), want)
    np.testing.assert_array_equal(postprocess_volume(r, None, only(min_component_size=None, min_component_mm3=7.03125),
                                                     spacing=TRIVAE_PAPER_SPACING), want)
    assert postprocess_volume(r, None, mm, spacing=(1, 1, 0.5)).max() == 0     # 0.5 mm^3 voxels: 16 needed, all removed


def test_mm_preset_at_64_keeps_small_lesion():
    "On the 64x64 grid (3.64 mm pixels) the voxel preset erases a 2x2x6 lesion; the mm preset keeps it."
    r = np.zeros((16, 16, 12), np.float32); r[6:8, 6:8, 3:9] = 0.5
    brain = np.ones(r.shape, bool)
    assert postprocess_volume(r, brain, PRESETS["trivae"]).max() == 0
    out = postprocess_volume(r, brain, PRESETS["trivae_mm"], spacing=(233 / 64, 233 / 64, 1.0))
    np.testing.assert_array_equal(out, r)


def test_mm_steps_record_request_and_voxels():
    sp = (233 / 64, 233 / 64, 1.0)
    steps = postprocess_steps(PRESETS["trivae_mm"], sp)
    assert json.loads(json.dumps(steps)) == steps
    med, comp = steps[2], steps[3]
    assert med["size_mm"] == [4.6875, 4.6875, 5.0] and med["spacing_mm"] == list(sp) and med["kernel"] == [1, 1, 5]
    assert med["dims"] == 3 and med["mode"] == "reflect"
    assert comp["min_mm3"] == 7.03125 and comp["spacing_mm"] == list(sp) and comp["min_size"] == 1
    assert comp["voxel_mm3"] == pytest.approx((233 / 64) ** 2)
    bare = postprocess_steps(PRESETS["trivae_mm"])                 # no spacing: the request, voxels set per volume
    assert bare[2]["kernel"] is None and bare[2]["spacing_mm"] is None and bare[3]["min_size"] is None
    iso = postprocess_steps(PostprocessConfig(median_size=None, median_size_mm=3.0), (1, 1, 1))
    assert iso[2]["size_mm"] == [3.0, 3.0, 3.0] and iso[2]["kernel"] == [3, 3, 3]


def test_mm_refused_without_spacing():
    r, brain = cube((6, 6, 6))
    for cfg in (PRESETS["trivae_mm"], dataclasses.replace(PRESETS["trivae"], median_size=None, median_size_mm=5.0),
                dataclasses.replace(PRESETS["trivae"], min_component_size=None, min_component_mm3=8.0)):
        with pytest.raises(UADInputError, match=r"pass `spacing=\(sx, sy, sz\)`"):
            postprocess_volume(r, brain, cfg)
    for bad in [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -1.0, 1.0), (1.0, float("nan"), 1.0), "1mm", 1.0]:
        with pytest.raises(UADInputError, match="three numbers > 0"):
            postprocess_volume(r, brain, PRESETS["trivae_mm"], spacing=bad)


@pytest.mark.parametrize("kw,msg", [
    (dict(median_size_mm=5.0), "not both: set median_size=None"),
    (dict(min_component_mm3=8.0), "not both: set min_component_size=None"),
    (dict(median_size=None), "no `median_size_mm` was given"),
    (dict(min_component_size=None), "no `min_component_mm3` was given"),
    (dict(median_size=None, median_size_mm=0.0), "`median_size_mm` must be a number > 0"),
    (dict(median_size=None, median_size_mm=(5.0, 5.0)), "three numbers > 0"),
    (dict(median_size=None, median_size_mm=(5.0, -1.0, 5.0)), "three numbers > 0"),
    (dict(min_component_size=None, min_component_mm3=float("inf")), "`min_component_mm3` must be a number > 0"),
])
def test_bad_mm_config(kw, msg):
    with pytest.raises(UADInputError, match=msg): PostprocessConfig(**kw)


def test_mm_config_json_round_trip():
    d = json.loads(json.dumps(dataclasses.asdict(PRESETS["trivae_mm"])))
    assert PostprocessConfig(**d) == PRESETS["trivae_mm"]          # lists from JSON become the preset's tuple


def test_spacing_from_a_preprocessed_subject(tmp_path):
    "The caller's path: slice_spacing(record, recipe) -> postprocess_volume(..., spacing=...) on the stacked slices."
    import nibabel as nib
    from uad_study.io import Subject
    from uad_study.preprocess import SliceRecipe, preprocess_subject, slice_spacing
    vol = np.zeros((24, 20, 12), np.int16); vol[2:22, 3:17, :] = 100               # 1 mm, 24x20 slices
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "s.nii.gz")
    recipe = SliceRecipe(resolution=12)
    rec = preprocess_subject(Subject("s", {"T2": tmp_path / "s.nii.gz"}), recipe)
    sp = slice_spacing(rec, recipe)
    assert sp == (2.0, 2.0, 1.0)                                                   # 24 px square -> 12: 2 mm pixels
    st = {s["step"]: s for s in postprocess_steps(PRESETS["trivae_mm"], sp)}
    assert st["median"]["kernel"] == [3, 3, 5] and st["remove_small_components"]["min_size"] == 2
    stacked = np.moveaxis(rec["slices"], 0, -1)                                    # (R, R, n), as the study stacks them
    out = postprocess_volume(stacked, np.moveaxis(rec["masks"], 0, -1), PRESETS["trivae_mm"], spacing=sp)
    assert out.shape == stacked.shape


# --- the compiled (numba) engine, and every engine against scipy at the densities of real residual maps -----------

def _residual_map(density, shape=(48, 44, 40), seed=0):
    "|smooth noise| in an ellipsoidal brain, thresholded so that `density` of the volume is non-zero (float32)."
    rng = np.random.default_rng(seed)
    g = np.ogrid[tuple(slice(0, s) for s in shape)]
    brain = sum(((a - s / 2) / (0.46 * s)) ** 2 for a, s in zip(g, shape)) < 1
    r = np.abs(ndi.gaussian_filter(rng.standard_normal(shape), 1.0)).astype(np.float32)
    r[~brain] = 0
    r[r < np.quantile(r, 1 - density)] = 0
    return r


@pytest.mark.parametrize("density", [0.05, 0.16, 0.29])
@pytest.mark.parametrize("engine", ["numba", "numpy", "auto"])
def test_median_engines_equal_scipy_at_densities(density, engine):
    v = _residual_map(density)
    assert abs(np.count_nonzero(v) / v.size - density) < 0.005
    for kernel in [(5, 5, 5), (9, 9, 1)]:
        np.testing.assert_array_equal(median_volume(v, kernel=kernel, engine=engine), ndi.median_filter(v, size=kernel, mode="reflect"))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kernel", [(5, 5, 5), (3, 3, 3), (9, 9, 1), (3, 1, 5), (7, 5, 3)])
def test_numba_median_ties_negatives_borders(seed, kernel):
    "Few distinct values (ties), signed maps, -0.0, shapes barely larger than the kernel."
    from uad_study.median_jit import median_ranked
    rng = np.random.default_rng(200 + seed)
    shape = tuple(int(s) for s in rng.integers(4, 19, 3))
    v = np.where(rng.random(shape) < rng.uniform(0.1, 0.9), rng.choice([0.1, 0.5, 0.5, 1.0, 2.0], shape), 0).astype(np.float32)
    if seed % 2: v[rng.random(shape) < 0.3] *= -1
    if seed % 3 == 2: v[v == 0] = -0.0
    want = ndi.median_filter(v, size=kernel, mode="reflect")
    np.testing.assert_array_equal(median_volume(v, kernel=kernel, engine="numba"), want)
    for sparse in (0, 16):   # every tile gathered, or slid (where dense)
        np.testing.assert_array_equal(median_ranked(v, kernel, sparse=sparse, tile=3 + seed), want)


def test_median_engine_choice():
    from uad_study.postprocess import JIT_MIN_VOXELS, _median_engine
    v = _residual_map(0.16)
    assert _median_engine(v, (5, 5, 5), "auto") == "numpy"                # small: nothing compiled
    assert _median_engine(v, (5, 5, 5), "numba") == "numba"
    assert _median_engine(v, (5, 5, 4), "numba") == "scipy"               # even kernel
    assert _median_engine(v.astype(np.float64), (5, 5, 5), "numba") == "numpy"   # compiled path is float32 only
    w = v.copy(); w[0, 0, 0] = np.nan
    assert _median_engine(w, (5, 5, 5), "numba") == "scipy"
    assert _median_engine(np.zeros((128, 128, JIT_MIN_VOXELS // (128 * 128)), np.float32), (5, 5, 5), "auto") == "numba"
    with pytest.raises(UADInputError, match="engine"): median_volume(v, engine="fast")
