"Synthetic anomalies of the Reversed-AE paper (Table 1): fill statistics, copy-paste, labels in the brain, sizes, determinism, bad inputs."
import json

import numpy as np
import pytest

from uad_study.core import UADInputError
from uad_study.synthetic import (ELLIPSE_PERCENTILES, SYNTHETIC_KINDS, apply_synthetic, draw_synthetic, ellipse_mask,
                                 synthetic_set)

ELLIPSE_KINDS = ("hypo", "mean", "hyper")


def toy(n=3, size=128, seed=0):
    "Healthy-like slices: Gaussian brain intensities (mean 0.5, sd 0.1) in an elliptical brain, background 0."
    rng = np.random.default_rng(seed)
    brain = ellipse_mask((size, size), (size / 2, size / 2), (0.41 * size, 0.34 * size), 0)
    x = np.clip(rng.normal(0.5, 0.1, (n, size, size)), 0, 1).astype(np.float32) * brain
    return x, np.broadcast_to(brain, x.shape).copy()


@pytest.fixture(scope="module")
def full():
    x, m = toy()
    return x, m, synthetic_set(x, m, SYNTHETIC_KINDS, seed=0, per_slice=2)


def test_set_layout(full):
    x, m, s = full
    n = len(SYNTHETIC_KINDS) * 3 * 2
    assert s["images"].shape == s["labels"].shape == s["clean"].shape == s["masks"].shape == (n, 128, 128)
    assert s["images"].dtype == np.float32 and s["labels"].dtype == bool
    assert s["kinds"] == [k for k in SYNTHETIC_KINDS for _ in range(6)]
    assert s["index"].tolist() == [0, 0, 1, 1, 2, 2] * len(SYNTHETIC_KINDS)
    np.testing.assert_array_equal(s["clean"], x[s["index"]])
    json.dumps(s["params"])   # JSON-able records


def test_labels_nonempty_inside_brain_and_exactly_the_change(full):
    _, _, s = full
    for img, lab, clean, brain, k in zip(s["images"], s["labels"], s["clean"], s["masks"], s["kinds"]):
        assert lab.sum() >= 20, k
        assert not (lab & ~brain).any(), k
        np.testing.assert_array_equal(img[~lab], clean[~lab])          # nothing changes outside the label
        assert (img[lab] != clean[lab]).mean() > 0.95, k                 # and (nearly) everything inside does


def test_ellipse_fill_statistics(full):
    "hyper >= brain p95, hypo <= p5, mean between p30 and p70 (~ the brain mean); the value is the recorded percentile."
    _, _, s = full
    seen = {k: 0 for k in ELLIPSE_KINDS}
    for img, lab, clean, brain, p in zip(s["images"], s["labels"], s["clean"], s["masks"], s["params"]):
        if p["kind"] == "copy_paste": continue
        v = clean[brain]
        for e, a in zip(p["ellipses"], p["applied"]["ellipses"]):
            lo, hi = ELLIPSE_PERCENTILES[e["kind"]]
            assert lo <= e["percentile"] <= hi
            assert a["value"] == np.float32(np.percentile(v, e["percentile"]))
            r = ellipse_mask(img.shape, e["centre"], e["axes"], e["angle"]) & brain
            assert (img[r] == np.float32(a["value"])).all() and a["pixels"] == r.sum() > 0
            if e["kind"] == "hyper": assert a["value"] >= np.percentile(v, 95)
            if e["kind"] == "hypo": assert a["value"] <= np.percentile(v, 5)
            if e["kind"] == "mean":
                assert np.percentile(v, 30) <= a["value"] <= np.percentile(v, 70)
                assert abs(a["value"] - v.mean()) < 0.6 * v.std()
            seen[e["kind"]] += 1
    assert seen == {"hypo": 12, "mean": 12, "hyper": 12}   # 6 single-kind slices + 6 "intensity" slices each


def test_intensity_kind_paints_three_disjoint_ellipses(full):
    _, _, s = full
    for p in (p for p in s["params"] if p["kind"] == "intensity"):
        assert [e["kind"] for e in p["ellipses"]] == list(ELLIPSE_KINDS)
        r = [ellipse_mask(p["shape"], e["centre"], e["axes"], e["angle"]) for e in p["ellipses"]]
        assert not (r[0] & r[1]).any() and not (r[0] & r[2]).any() and not (r[1] & r[2]).any()
        vals = [a["value"] for a in p["applied"]["ellipses"]]
        assert vals[0] < vals[1] < vals[2]


def test_copy_paste_moves_source_pixels(full):
    _, _, s = full
    n = 0
    for img, lab, clean, brain, p in zip(s["images"], s["labels"], s["clean"], s["masks"], s["params"]):
        if p["kind"] != "copy_paste": continue
        (r0, c0), (r1, c1), (h, w) = p["source"], p["dest"], p["size"]
        assert abs(r0 - r1) >= h or abs(c0 - c1) >= w                    # source and destination boxes disjoint
        src, dst = (slice(r0, r0 + h), slice(c0, c0 + w)), (slice(r1, r1 + h), slice(c1, c1 + w))
        ok = brain[src] & brain[dst]
        np.testing.assert_array_equal(lab[dst], ok)
        assert lab.sum() == ok.sum() == p["applied"]["pixels"] >= 0.5 * h * w
        np.testing.assert_array_equal(img[dst][ok], clean[src][ok])      # pasted pixels are the source's
        assert not np.array_equal(img[dst], clean[dst])
        n += 1
    assert n == 6


def test_sizes_follow_appendix_c1_scaled_to_the_slice():
    "128 px: ellipse semi-axes 8-12, centres 32-96, boxes 25-50 with corners 25..128-size; 64 px: halved."
    for size in (128, 64):
        x, m = toy(2, size, seed=1)
        s = synthetic_set(x, m, SYNTHETIC_KINDS, seed=3, per_slice=5)
        f = size / 128
        for p in s["params"]:
            if p["kind"] == "copy_paste":
                assert all(round(25 * f) <= t <= round(50 * f) for t in p["size"])
                for k in ("source", "dest"):
                    assert all(round(25 * f) <= a <= size - t for a, t in zip(p[k], p["size"]))
            else:
                for e in p["ellipses"]:
                    assert all(8 * f <= a <= 12 * f for a in e["axes"]) and all(32 * f <= c <= 96 * f for c in e["centre"])
                    assert 0 <= e["angle"] < 360


def test_hand_made_records():
    x = np.zeros((16, 16), np.float32); m = np.zeros((16, 16), bool); m[3:13, 3:13] = True
    x[m] = np.arange(100); x0 = x.copy()
    rec = dict(kind="hyper", shape=[16, 16], ellipses=[dict(kind="hyper", centre=[3, 8], axes=[3, 2], angle=0, percentile=97)])
    y, lab, info = apply_synthetic(x, m, rec, return_info=True)
    assert info["ellipses"][0]["value"] == pytest.approx(96.03, abs=1e-4)   # numpy's linear percentile of 0..99
    assert lab.sum() == 13 and lab[3, 5:12].all() and lab[4, 6:11].all() and lab[5, 8] and lab[5].sum() == 1
    np.testing.assert_array_equal(x, x0)                                      # the input is not modified
    cp = dict(kind="copy_paste", shape=[16, 16], size=[2, 3], source=[4, 4], dest=[9, 8])
    y, lab = apply_synthetic(x, m, cp)
    np.testing.assert_array_equal(y[9:11, 8:11], x[4:6, 4:7]); assert lab.sum() == 6
    cp_edge = {**cp, "source": [2, 2]}                  # only the source's pixels (3, 3) and (3, 4) are brain
    y, lab = apply_synthetic(x, m, cp_edge)
    assert lab.sum() == 2 and lab[10, 9] and lab[10, 10] and (y[10, 9], y[10, 10]) == (x[3, 3], x[3, 4])


def test_same_seed_same_bits_and_kinds_are_independent():
    x, m = toy(2, 64)
    a = synthetic_set(x, m, ["hyper", "copy_paste"], seed=7)
    b = synthetic_set(x, m, ["hyper", "copy_paste"], seed=7)
    assert a["images"].tobytes() == b["images"].tobytes() and a["params"] == b["params"]
    c = synthetic_set(x, m, ["hyper", "copy_paste"], seed=8)
    assert a["images"].tobytes() != c["images"].tobytes()
    d = synthetic_set(x, m, ["copy_paste"], seed=7)                          # another kind list: same copy-paste draws
    assert d["params"] == a["params"][2:] and d["images"].tobytes() == a["images"][2:].tobytes()
    e = synthetic_set(x, m, ["hypo", "hyper"], seed=7)["params"]              # each kind its own stream: other places
    assert e[0]["ellipses"][0]["centre"] != e[2]["ellipses"][0]["centre"]
    for img, p, i in zip(a["images"], a["params"], a["index"]):              # a record replays from its JSON
        y, _ = apply_synthetic(x[i], m[i], json.loads(json.dumps(p)))
        assert y.tobytes() == img.tobytes()
    g1, g2 = np.random.default_rng(4), np.random.default_rng(4)
    assert draw_synthetic("intensity", m[0], g1) == draw_synthetic("intensity", m[0], g2)


def test_bad_inputs_name_the_value():
    x, m = toy(2, 64)
    with pytest.raises(UADInputError, match="one of .*'blob'"): synthetic_set(x, m, ["hyper", "blob"])
    with pytest.raises(UADInputError, match="'blob'"): draw_synthetic("blob", m[0], 0)
    with pytest.raises(UADInputError, match="'blob'"): apply_synthetic(x[0], m[0], {"kind": "blob", "shape": [64, 64]})
    with pytest.raises(UADInputError, match=r"\(N, H, W\).*\(64, 64\)"): synthetic_set(x[0], m[0], "hypo")
    with pytest.raises(UADInputError, match=r"slices' shape.*\(2, 64, 32\)"): synthetic_set(x, m[:, :, :32], "hypo")
    with pytest.raises(UADInputError, match="at least one kind"): synthetic_set(x, m, [])
    with pytest.raises(UADInputError, match="per_slice"): synthetic_set(x, m, "hypo", per_slice=0)
    with pytest.raises(UADInputError, match="bool or 0/1"): draw_synthetic("hypo", m[0] * 0.5, 0)
    with pytest.raises(UADInputError, match=r"2D mask.*\(2, 64, 64\)"): draw_synthetic("hypo", m, 0)
    with pytest.raises(UADInputError, match="min_inside"): draw_synthetic("hypo", m[0], 0, min_inside=0)
    bad = x[0].copy(); bad[0, 0] = np.nan
    p = draw_synthetic("hyper", m[0], 0)
    with pytest.raises(UADInputError, match="finite"): apply_synthetic(bad, m[0], p)
    with pytest.raises(UADInputError, match=r"another slice shape.*\[64, 64\]"): apply_synthetic(x[0, :32, :32], m[0, :32, :32], p)
    with pytest.raises(UADInputError, match="does not touch the brain"):
        apply_synthetic(x[0], m[0], {**p, "ellipses": [{**p["ellipses"][0], "centre": [1, 1], "axes": [1, 1]}]})
    with pytest.raises(UADInputError, match="inside the slice"):
        apply_synthetic(x[0], m[0], dict(kind="copy_paste", shape=[64, 64], size=[10, 10], source=[5, 5], dest=[60, 20]))


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_too_small_brain_raises_clearly(kind):
    m = np.zeros((64, 64), bool); m[30:33, 30:33] = True
    with pytest.raises(UADInputError, match=r"too small.*\(got 9\)"): draw_synthetic(kind, m, 0, max_tries=30)
    with pytest.raises(UADInputError, match="too small"): draw_synthetic(kind, np.zeros((64, 64), bool), 0, max_tries=5)
