"Post-processing: each step on hand-made volumes, exactness of the cropped median, bad inputs."
import dataclasses, json

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label as sk_label

from uad_study.core import UADInputError
from uad_study.postprocess import (PRESETS, PostprocessConfig, median_volume, postprocess_steps, postprocess_volume,
                                   remove_small_components)

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
