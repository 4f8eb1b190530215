"Metrics: exact agreement with sklearn (ties included), brute-force best DICE, edge cases, speed at 12M voxels."
import json, warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn import metrics as skm

from uad_study.core import UADInputError
from uad_study.metrics import curve_counts, dice, per_subject_dice, pixel_metrics, pr_curve, roc_curve

TOL = 1e-9


def brute_best_dice(s, y):
    "Best DICE over every distinct score value, pred = s >= t (highest t on ties)."
    best, best_t = -1.0, None
    for t in np.unique(s)[::-1]:
        p = s >= t
        d = 2 * np.sum(p & y) / (p.sum() + y.sum())
        if d > best: best, best_t = d, t
    return best, best_t


# scores drawn from a few values (heavy ties, many exact zeros) or from floats
tied = st.lists(st.sampled_from([0.0, 0.0, 0.0, 0.1, 0.25, 0.5, 1.0, 3.0]), min_size=1, max_size=60)
free = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), scores=st.one_of(tied, free))
def test_matches_sklearn_and_brute_force(data, scores):
    s = np.array(scores, np.float64)
    y = np.array(data.draw(st.lists(st.booleans(), min_size=len(s), max_size=len(s))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = pixel_metrics(s, y)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    assert (m["n_voxels"], m["n_positive"]) == (len(s), n_pos)
    assert m["prevalence"] == n_pos / len(s)
    if n_pos and n_neg:
        assert abs(m["auroc"] - skm.roc_auc_score(y, s)) < TOL
        fpr, tpr, thr = roc_curve(s, y)
        sk = skm.roc_curve(y, s, drop_intermediate=False)
        np.testing.assert_allclose(fpr, sk[0], atol=1e-12); np.testing.assert_allclose(tpr, sk[1], atol=1e-12)
        np.testing.assert_array_equal(thr, sk[2])
    else:
        assert np.isnan(m["auroc"])
    if n_pos:
        assert abs(m["auprc"] - skm.average_precision_score(y, s)) < TOL
        best, best_t = brute_best_dice(s, y)
        assert abs(m["best_dice"] - best) < TOL
        assert m["best_threshold"] == best_t
        assert abs(dice(s >= m["best_threshold"], y) - m["best_dice"]) < TOL
        p, r, t = pr_curve(s, y)
        skp, skr, skt = skm.precision_recall_curve(y, s)
        np.testing.assert_allclose(p[1:], skp[:-1][::-1], atol=1e-12)
        np.testing.assert_allclose(r[1:], skr[:-1][::-1], atol=1e-12)
        np.testing.assert_array_equal(t[1:], skt[::-1])
        assert abs(np.sum(np.diff(r) * p[1:]) - m["auprc"]) < TOL     # AP is the step sum over the returned curve
    else:
        assert np.isnan(m["auprc"]) and np.isnan(m["best_dice"]) and np.isnan(m["best_threshold"])


@settings(max_examples=100, deadline=None)
@given(data=st.data(), scores=st.one_of(tied, free))
def test_curve_counts_definition(data, scores):
    s = np.array(scores, np.float32)
    y = np.array(data.draw(st.lists(st.booleans(), min_size=len(s), max_size=len(s))))
    thr, tp, fp, n_pos, n_neg = curve_counts(s, y)
    np.testing.assert_array_equal(thr, np.unique(s)[::-1].astype(np.float64))
    for t, a, b in zip(thr, tp, fp):
        assert a == np.sum((s >= t) & y) and b == np.sum((s >= t) & ~y)
    assert (n_pos, n_neg) == (y.sum(), (~y).sum())
    assert thr.dtype == np.float64 and tp.dtype == fp.dtype == np.int64


def test_one_class_absent():
    s = np.array([0.0, 0.2, 0.2, 0.9])
    with pytest.warns(UserWarning, match="no positive"):
        m = pixel_metrics(s, np.zeros(4, bool))
    assert np.isnan(m["auroc"]) and np.isnan(m["auprc"]) and np.isnan(m["best_dice"])
    assert m["n_positive"] == 0 and m["prevalence"] == 0
    with pytest.warns(UserWarning, match="no negative"):
        m = pixel_metrics(s, np.ones(4, bool))
    assert np.isnan(m["auroc"])
    assert m["auprc"] == skm.average_precision_score(np.ones(4), s) == 1.0
    assert m["best_dice"] == 1.0 and m["best_threshold"] == 0.0
    fpr, tpr, _ = roc_curve(s, np.ones(4, bool))
    assert np.isnan(fpr).all() and not np.isnan(tpr).any()


def test_empty_prediction_all_zero_map():
    y = np.zeros((5, 5, 5), bool); y[2, 2, 2:4] = True
    m = pixel_metrics(np.zeros(y.shape, np.float32), y)
    assert m["auroc"] == 0.5 == skm.roc_auc_score(y.ravel(), np.zeros(y.size))
    assert abs(m["auprc"] - skm.average_precision_score(y.ravel(), np.zeros(y.size))) < TOL
    assert m["auprc"] == m["prevalence"] == 2 / 125
    assert m["best_threshold"] == 0.0 and m["best_dice"] == 2 * 2 / (125 + 2)  # score >= 0: every voxel


def test_negative_zero_and_dtypes():
    s = np.array([-0.0, 0.0, 0.5, 1.0]); y = np.array([1, 0, 1, 0])
    thr, *_ = curve_counts(s, y)
    assert list(thr) == [1.0, 0.5, 0.0] and not np.signbit(thr[-1])
    a = pixel_metrics(s.astype(np.float32), y.astype(np.uint8))
    b = pixel_metrics(s, y.astype(bool))
    c = pixel_metrics((s * 2).astype(int), y.astype(float))
    assert a == b and c["auroc"] == b["auroc"] and c["auprc"] == b["auprc"]


def test_pooled_lists_equal_concatenation():
    rng = np.random.default_rng(0)
    maps = [rng.random((4, 5, 3)), rng.random((6, 2, 2))]
    labs = [rng.random(m.shape) < 0.3 for m in maps]
    pooled = pixel_metrics(maps, labs)
    flat = pixel_metrics(np.concatenate([m.ravel() for m in maps]), np.concatenate([l.ravel() for l in labs]))
    assert pooled == flat
    with pytest.raises(UADInputError, match="same shape"):
        pixel_metrics(maps, labs[::-1])


def test_bad_inputs():
    with pytest.raises(UADInputError, match="must be finite"): pixel_metrics([0.1, np.nan], [0, 1])
    with pytest.raises(UADInputError, match="must be finite"): pixel_metrics([0.1, np.inf], [0, 1])
    with pytest.raises(UADInputError, match=r"must be binary.*\[2, 4\]"): pixel_metrics([0.1, 0.2, 0.3, 0.4], [0, 1, 2, 4])
    with pytest.raises(UADInputError, match="same shape"): pixel_metrics(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(UADInputError, match="same shape"): pixel_metrics(np.zeros(3), np.zeros(4))
    with pytest.raises(UADInputError, match="empty"): pixel_metrics([], [])
    with pytest.raises(UADInputError, match="real numbers"): pixel_metrics(np.array(["a", "b"]), [0, 1])
    with pytest.raises(UADInputError, match="real numbers"): pixel_metrics(np.ones(2, complex), [0, 1])


def test_dice():
    assert dice([1, 1, 0, 0], [1, 0, 0, 0]) == 2 / 3
    assert dice(np.ones((2, 2), bool), np.ones((2, 2), bool)) == 1.0
    assert dice([1, 0], [0, 0]) == 0.0
    assert np.isnan(dice([0, 0], [0, 0]))
    with pytest.raises(UADInputError, match="same shape"): dice(np.zeros(3), np.zeros(4))
    with pytest.raises(UADInputError, match="must be binary"): dice([0, 0.5], [0, 1])


def test_per_subject_dice():
    maps = [np.array([[0.2, 0.9], [0.6, 0.0]]), np.zeros((2, 2)), np.array([[0.8, 0.0], [0.0, 0.0]])]
    labs = [np.array([[0, 1], [1, 1]]), np.zeros((2, 2)), np.zeros((2, 2))]
    d = per_subject_dice(maps, labs, 0.6)              # map >= 0.6: 0.6 itself is predicted
    assert d[0] == 2 * 2 / (2 + 3) and np.isnan(d[1]) and d[2] == 0.0
    assert np.nanmean(d) == (0.8 + 0.0) / 2
    with pytest.raises(UADInputError, match="one entry per subject"): per_subject_dice(maps, labs[:2], 0.5)
    with pytest.raises(UADInputError, match="finite number"): per_subject_dice(maps, labs, float("nan"))
    with pytest.raises(UADInputError, match="maps\\[1\\]"): per_subject_dice([maps[0], np.full((2, 2), np.nan)], labs[:2], 0.5)
    with pytest.raises(UADInputError, match="same shape"): per_subject_dice([np.zeros(3)], [np.zeros(4)], 0.5)


# --- streaming accumulator ----------------------------------------------------------------------

def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]) or (np.isnan(a[k]) and np.isnan(b[k])), (k, a[k], b[k])


volume = st.integers(1, 40).flatmap(lambda n: st.tuples(
    st.one_of(st.lists(st.sampled_from([0.0, 0.0, 0.0, -0.0, 0.1, 0.25, 0.5, 1.0, -1.0]), min_size=n, max_size=n),
              st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=n, max_size=n)),
    st.lists(st.booleans(), min_size=n, max_size=n)))


@settings(max_examples=300, deadline=None)
@given(vols=st.lists(volume, min_size=1, max_size=8), f64=st.booleans(), per_volume=st.booleans(),
       buffer=st.sampled_from([1, 7, 50, 1 << 26]))
def test_streaming_equals_one_shot(vols, f64, per_volume, buffer):
    from uad_study.metrics import PixelMetricsAccumulator
    dt = np.float64 if f64 else np.float32
    maps = [np.array(s, dt) for s, _ in vols]; labs = [np.array(y, bool) for _, y in vols]
    acc = PixelMetricsAccumulator(per_volume=per_volume, buffer_voxels=buffer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m, l in zip(maps, labs): acc.update(m, l)
        got, want = acc.aggregate(), pixel_metrics(maps, labs)
        assert got.pop("n_volumes") == len(maps)
        _same(got, want)
        thr, tp, fp, n_pos, n_neg = acc.counts()
        w = curve_counts(maps, labs)
        np.testing.assert_array_equal(thr, w[0]); np.testing.assert_array_equal(tp, w[1])
        np.testing.assert_array_equal(fp, w[2]); assert (n_pos, n_neg) == w[3:]
        if per_volume:
            assert len(acc.volumes) == len(maps)
            for v, m, l in zip(acc.volumes, maps, labs): _same(v, pixel_metrics(m, l))
    acc.reset()
    with pytest.raises(UADInputError, match="no volume"): acc.aggregate()


def test_streaming_mixed_dtypes_and_edge_volumes():
    from uad_study.metrics import PixelMetricsAccumulator
    rng = np.random.default_rng(3)
    maps = [np.zeros((4, 4, 4), np.float32),                         # empty prediction
            np.where(rng.random((5, 4, 3)) < 0.7, 0, rng.random((5, 4, 3))),   # float64
            np.ones((2, 2, 2), np.float32)]                          # all one value
    labs = [np.zeros((4, 4, 4), bool), rng.random((5, 4, 3)) < 0.3, np.ones((2, 2, 2), np.uint8)]
    acc = PixelMetricsAccumulator(buffer_voxels=30)      # float32 folded, then float64 merged in
    for m, l in zip(maps, labs): acc.update(m, l)
    got = acc.aggregate(); got.pop("n_volumes")
    _same(got, pixel_metrics(maps, labs))
    s = np.concatenate([m.ravel() for m in maps]); y = np.concatenate([np.asarray(l, bool).ravel() for l in labs])
    assert abs(got["auroc"] - skm.roc_auc_score(y, s)) < TOL
    assert abs(got["auprc"] - skm.average_precision_score(y, s)) < TOL
    with pytest.raises(UADInputError, match="same shape"): acc.update(np.zeros(3), np.zeros(4))
    with pytest.raises(UADInputError, match="must be finite"): acc.update(np.array([np.nan]), np.array([1]))


def test_blocked_arithmetic_and_int64_counts(monkeypatch):
    "Small blocks (as on 4M+ curve points) and the int64 count path give the same numbers."
    import uad_study.metrics as M
    rng = np.random.default_rng(5)
    maps = [np.where(rng.random((7, 6, 5)) < 0.6, 0, rng.random((7, 6, 5)).round(2)).astype(np.float32) for _ in range(4)]
    labs = [rng.random(m.shape) < 0.25 for m in maps]
    want = pixel_metrics(maps, labs)
    monkeypatch.setattr(M, "_CHUNK", 3)
    got = pixel_metrics(maps, labs)
    s = np.concatenate([m.ravel() for m in maps]); y = np.concatenate([l.ravel() for l in labs])
    assert abs(got["auroc"] - skm.roc_auc_score(y, s)) < TOL and got["auroc"] == want["auroc"]
    assert abs(got["auprc"] - skm.average_precision_score(y, s)) < TOL
    assert (got["best_dice"], got["best_threshold"]) == (want["best_dice"], want["best_threshold"])
    acc = M.PixelMetricsAccumulator(buffer_voxels=100)
    monkeypatch.setattr(acc, "_UINT32_VOXELS", 300)        # switch to int64 counts after ~2 volumes
    for m, l in zip(maps, labs): acc.update(m, l)
    assert acc._tab[1].dtype == np.int64
    out = acc.aggregate(); out.pop("n_volumes")
    _same(out, got)


# --- thresholds, protocols, DICE_T / DICE_S, detection, boxes ----------------------------------------

from uad_study.metrics import (EvalProtocol, PixelMetricsAccumulator, bbox_localisation, choose_threshold, dice_summary,
                               greedy_threshold, protocol_description, sample_detection, slice_detection,
                               threshold_at_fpr, threshold_metrics)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), scores=st.one_of(tied, free), t=st.floats(-11, 11, allow_nan=False))
def test_threshold_metrics_brute_force(data, scores, t):
    s = np.array(scores, np.float32)
    y = np.array(data.draw(st.lists(st.booleans(), min_size=len(s), max_size=len(s))))
    m = threshold_metrics(curve_counts(s, y), t)
    p = s.astype(np.float64) >= t
    tp, fp = int(np.sum(p & y)), int(np.sum(p & ~y))
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (tp, fp, int(y.sum()) - tp, int((~y).sum()) - fp)
    d = dice(p, y)
    assert (np.isnan(d) and np.isnan(m["dice"])) or abs(d - m["dice"]) < TOL


@settings(max_examples=200, deadline=None)
@given(scores=st.one_of(tied, free), alpha=st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.5, 1.0]))
def test_threshold_at_fpr_brute_force(scores, alpha):
    s = np.array(scores, np.float32)
    t = threshold_at_fpr(curve_counts(s, np.zeros(len(s), bool)), alpha)
    rate = lambda t: np.mean(s.astype(np.float64) >= t)
    assert rate(t) <= alpha
    lower = [u for u in np.unique(s).astype(np.float64) if u < t]
    if lower: assert rate(max(lower)) > alpha                # the lowest threshold that satisfies the FPR
    if np.isinf(t): assert rate(float(s.max())) > alpha


def ref_greedy(s, y, n_iter):
    "Straight transcription of the thesis text on raw arrays."
    lo, hi = float(s.min()), float(s.max()); best = (-1, None)
    for _ in range(n_iter):
        q1, q3 = lo + (hi - lo) / 4, lo + 3 * (hi - lo) / 4
        d1, d3 = dice(s >= np.float64(q1), y), dice(s >= np.float64(q3), y)
        for t, d in ((q1, d1), (q3, d3)):
            if d > best[0]: best = (d, t)
        if d1 >= d3: hi = (lo + hi) / 2
        else: lo = (lo + hi) / 2
    return best


@pytest.mark.parametrize("seed", range(10))
def test_greedy_threshold_matches_transcription(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(3000) < 0.05
    s = np.where(rng.random(3000) < 0.7, 0, rng.random(3000) + 0.8 * y).astype(np.float32)
    g = greedy_threshold(curve_counts(s, y), 10)
    d, t = ref_greedy(s, y, 10)
    assert g["threshold"] == t and abs(g["dice"] - d) < TOL and len(g["trace"]) == 10
    assert g["dice"] <= pixel_metrics(s, y)["best_dice"] + TOL          # never beats the exact best
    with pytest.raises(UADInputError, match="needs lesion voxels"): greedy_threshold(curve_counts(s, np.zeros(3000)), 3)


def test_float64_threshold_on_float32_maps():
    x = np.float32(0.3); t = float(x) + 1e-12                  # between two float32 values; float32(t) == x
    assert np.float32(t) == x
    c = curve_counts(np.array([x], np.float32), np.array([True]))
    assert threshold_metrics(c, t)["tp"] == 0
    assert np.isnan(per_subject_dice([np.array([x], np.float32)], [np.array([0])], t)[0])   # nothing predicted, empty label


def test_dice_summary_and_protocols():
    rng = np.random.default_rng(2)
    maps = [np.where(rng.random((8, 8, 5)) < 0.6, 0, rng.random((8, 8, 5))).astype(np.float32) for _ in range(5)]
    labs = [rng.random(m.shape) < 0.2 for m in maps]; labs[3][:] = False; maps[3][:] = 0   # an empty-empty subject
    acc = PixelMetricsAccumulator(per_volume=True)
    for m, l in zip(maps, labs): acc.update(m, l)
    t = acc.aggregate()["best_threshold"]
    ds = dice_summary(acc, t)
    per = per_subject_dice(maps, labs, t)
    np.testing.assert_allclose(ds["dice_per_subject"], per, atol=TOL)
    assert ds["n_subjects_scored"] == 4 and abs(ds["dice_S_mean"] - np.nanmean(per)) < TOL
    assert abs(ds["dice_S_sd"] - np.nanstd(per, ddof=1)) < TOL
    s = np.concatenate([m.ravel() for m in maps]); y = np.concatenate([l.ravel() for l in labs])
    assert abs(ds["dice_T"] - dice(s >= t, y)) < TOL and abs(ds["dice_T"] - acc.aggregate()["best_dice"]) < TOL
    with pytest.raises(UADInputError, match="per_volume=True"): dice_summary(PixelMetricsAccumulator(), t)
    # protocols
    healthy = PixelMetricsAccumulator()
    for m in maps[:2]: healthy.update(m, np.zeros(m.shape, bool))
    assert choose_threshold(EvalProtocol(), test=acc.counts())["threshold"] == t
    r = choose_threshold(EvalProtocol("healthy_fpr", fpr=0.1), healthy=healthy.counts())
    hs = np.concatenate([m.ravel() for m in maps[:2]])
    assert np.mean(hs >= r["threshold"]) <= 0.1 and r["source"] == "healthy"
    assert choose_threshold(EvalProtocol("val_greedy"), val=acc.counts())["threshold"] == greedy_threshold(acc.counts())["threshold"]
    assert choose_threshold(EvalProtocol("fixed", fixed_threshold=0.3))["threshold"] == 0.3
    for p in [EvalProtocol(), EvalProtocol("healthy_fpr", fpr=0.01), EvalProtocol("fixed", fixed_threshold=0.2)]:
        d = protocol_description(p)
        assert json.loads(json.dumps(d)) == d and d["threshold"] == p.threshold
    for kw, msg in [(dict(threshold="x"), "must be one of"), (dict(fpr=1.5), r"in \[0, 1\]"),
                    (dict(greedy_iterations=0), ">= 1"), (dict(threshold="fixed"), "fixed_threshold")]:
        with pytest.raises(UADInputError, match=msg): EvalProtocol(**kw)
    with pytest.raises(UADInputError, match="needs the `healthy`"): choose_threshold(EvalProtocol("healthy_fpr"))


def test_slice_and_sample_detection_vs_sklearn():
    rng = np.random.default_rng(4)
    maps = [rng.random((6, 6, int(rng.integers(3, 9)))) for _ in range(6)]
    labs = [rng.random(m.shape) < 0.01 for m in maps]
    masks = [rng.random(m.shape) < 0.8 for m in maps]
    r = slice_detection(maps, labs, masks)
    sc = np.concatenate([[m[..., k][k_[..., k]].mean() if k_[..., k].any() else 0 for k in range(m.shape[-1])]
                         for m, k_ in zip(maps, masks)])
    lab = np.concatenate([l.any((0, 1)) for l in labs])
    assert abs(r["auroc"] - skm.roc_auc_score(lab, sc)) < TOL and abs(r["auprc"] - skm.average_precision_score(lab, sc)) < TOL
    an = [True, False, True, False, False, True]
    r = sample_detection(maps, an, reduce="max")
    sc = [np.mean([m[..., k].max() for k in range(m.shape[-1])]) for m in maps]
    assert abs(r["auroc"] - skm.roc_auc_score(an, sc)) < TOL and r["n"] == 6 and r["n_anomalous"] == 3


def test_bbox_localisation_by_hand():
    m = np.zeros((20, 20)); brain = np.zeros((20, 20), bool); brain[1:19, 1:19] = True
    m[2:6, 2:6] = 2.0          # 16 flagged pixels inside box A (5x5 = 25 px: 64% > 10%)
    m[12, 12] = 1.0            # 1 flagged pixel in box B (4x4 = 16 px: 6.25%, not detected)
    m[17, 2:6] = 1.0           # 4 flagged healthy pixels
    m[0, 0] = 5.0              # outside the brain: ignored
    boxes = [[{"cls": "tumour", "box": (2, 2, 7, 7)}, {"cls": "edema", "box": (10, 10, 14, 14)}]]
    r = bbox_localisation([m], boxes, 0.5, [brain])
    a, b = r["boxes"]
    assert a["detected"] and not b["detected"] and a["fraction"] == 16 / 25 and b["fraction"] == 1 / 16
    assert a["fp"] == 4 / 16 and a["precision"] == 1 / (1 + 0.25) and abs(a["f1"] - 2 * 0.8 / 1.8) < TOL
    assert b["f1"] == 0 and r["overall"] == {"detected": 1, "total": 2, "f1": a["f1"] / 2}
    assert r["per_class"]["tumour"]["detected"] == 1 and r["per_class"]["edema"]["detected"] == 0
    rs = bbox_localisation([m], boxes, 0.5, [brain], weight="score")
    assert rs["boxes"][0]["fp"] == 4.0 / 32.0
    m2 = m.copy(); m2[12:14, 12:14] = 1.0        # 4 of 16 = 25%: now detected (> 10%)
    assert bbox_localisation([m2], boxes, 0.5, [brain])["boxes"][1]["detected"]
    with pytest.raises(UADInputError, match="lo < hi"): bbox_localisation([m], [[{"cls": "x", "box": (5, 5, 5, 9)}]], 0.5)
    with pytest.raises(UADInputError, match="weight"): bbox_localisation([m], boxes, 0.5, weight="area")


def test_evaluate_protocol():
    from uad_study.metrics import evaluate_protocol
    rng = np.random.default_rng(7)
    mk = lambda: np.where(rng.random((6, 6, 4)) < 0.5, 0, rng.random((6, 6, 4))).astype(np.float32)
    test, val, healthy = PixelMetricsAccumulator(per_volume=True), PixelMetricsAccumulator(), PixelMetricsAccumulator()
    for _ in range(3):
        m = mk(); test.update(m, m > 0.7); m = mk(); val.update(m, m > 0.6); healthy.update(mk(), np.zeros((6, 6, 4)))
    r = evaluate_protocol(EvalProtocol("val_greedy"), test, val=val)
    t = greedy_threshold(val.counts())["threshold"]
    assert r["threshold"]["threshold"] == t and r["threshold"]["source"] == "validation"
    assert r["at_threshold"]["dice_T"] == threshold_metrics(test.counts(), t)["dice"] == r["at_threshold"]["dice"]
    assert len(r["at_threshold"]["dice_per_subject"]) == 3 and r["protocol"]["threshold"] == "val_greedy"
    r = evaluate_protocol(EvalProtocol("healthy_fpr", fpr=0.01), test, healthy=healthy)
    assert r["at_threshold"]["threshold"] == threshold_at_fpr(healthy.counts(), 0.01)
    json.dumps(r)


def test_reconstruction_fidelity_against_references():
    "MSE against NumPy, SSIM against skimage's SSIM map, regions split by mask and label, LPIPS labelled."
    from skimage.metrics import structural_similarity
    from uad_study.metrics import reconstruction_fidelity
    from uad_study.scores import load_lpips
    rng = np.random.default_rng(0)
    x = rng.random((3, 40, 40)).astype(np.float32)
    xh = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    mask = np.zeros(x.shape, bool); mask[:, 5:35, 5:35] = True
    lab = np.zeros(x.shape, bool); lab[1, 10:20, 12:22] = True
    f = reconstruction_fidelity(x, xh, mask, lab)
    healthy, anom = mask & ~lab, lab
    np.testing.assert_allclose(f["healthy"]["mse"], ((x - xh) ** 2)[healthy].mean(), rtol=1e-6)
    np.testing.assert_allclose(f["anomalous"]["mse"], ((x - xh) ** 2)[anom].mean(), rtol=1e-6)
    S = np.stack([structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, full=True)[1] for a, b in zip(x, xh)])
    np.testing.assert_allclose(f["healthy"]["ssim"], S[healthy].mean(), atol=1e-5)
    np.testing.assert_allclose(f["anomalous"]["ssim"], S[anom].mean(), atol=1e-5)
    assert f["healthy"]["n_pixels"] == healthy.sum() and f["anomalous"]["n_pixels"] == 100
    assert f["lpips_network"] is None and "lpips" not in f["healthy"]
    with pytest.warns(UserWarning):
        net = load_lpips("alex", allow_random_backbone=True)
    g = reconstruction_fidelity(x, xh, mask, lab, lpips_net=net)
    assert g["lpips_network"].startswith("not-LPIPS")
    assert g["healthy"]["lpips"] >= 0 and np.isfinite(g["anomalous"]["lpips"])
    same = reconstruction_fidelity(x, x, mask, lab, lpips_net=net)
    assert same["healthy"]["mse"] == 0 and abs(same["healthy"]["ssim"] - 1) < 1e-6 and same["healthy"]["lpips"] < 1e-6


def test_reconstruction_fidelity_empty_regions_and_bad_shapes():
    from uad_study.metrics import reconstruction_fidelity
    x = np.zeros((1, 16, 16), np.float32)
    f = reconstruction_fidelity(x, x)
    assert np.isnan(f["anomalous"]["mse"]) and f["anomalous"]["n_pixels"] == 0
    with pytest.raises(UADInputError, match="must both be"):
        reconstruction_fidelity(x, x[0])


# --- narrowed dtypes and in-place sorting (issue 19): same numbers, the caller's arrays untouched --------------

@pytest.mark.parametrize("kind", ["float32", "float64_exact", "float64", "int16", "uint8", "list"])
def test_dtypes_give_the_same_metrics_and_leave_inputs_alone(kind):
    rng = np.random.default_rng(7)
    base = np.rint(rng.normal(300, 120, 20000)).clip(0, 1000)          # int16-like intensities: heavy ties
    y = rng.random(base.size) < 0.1
    base[y] += 80
    ref = pixel_metrics(base.astype(np.float64), y)
    s = {"float32": base.astype(np.float32), "float64_exact": base.astype(np.float64), "int16": base.astype(np.int16),
         "float64": base + rng.random(base.size) * 1e-9, "uint8": (base // 4).clip(0, 255).astype(np.uint8),
         "list": [base[:5000].astype(np.float32), base[5000:].astype(np.float32)]}[kind]
    before = [a.copy() for a in s] if kind == "list" else s.copy()
    m = pixel_metrics(s, y)
    if kind in ("float32", "float64_exact", "int16", "list"):
        assert (m["auroc"], m["auprc"], m["best_dice"], m["best_threshold"]) == (ref["auroc"], ref["auprc"], ref["best_dice"], ref["best_threshold"])
    flat = np.concatenate([a.ravel() for a in s]) if kind == "list" else s
    assert abs(m["auroc"] - skm.roc_auc_score(y, flat)) < 1e-12 and abs(m["auprc"] - skm.average_precision_score(y, flat)) < 1e-12
    if kind == "list": assert all(np.array_equal(a, b) for a, b in zip(s, before))
    else: assert np.array_equal(s, before) and s.dtype == before.dtype


def test_narrow_keeps_values():
    from uad_study.metrics import _narrow
    assert _narrow(np.array([1, -3], np.int16)).dtype == np.float32
    assert _narrow(np.array([0.5, 2.0])).dtype == np.float32                 # float64 that float32 holds exactly
    assert _narrow(np.array([0.1, 2.0])).dtype == np.float64                 # 0.1 is not a float32
    assert _narrow(np.array([2**30 + 1], np.int64)).dtype == np.float64


# --- the torch path (the GPU engine, checked here with torch on the CPU) ------------------------------------------

def _maps(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    kind = seed % 4
    s = {0: rng.random(n), 1: np.rint(rng.normal(0, 3, n)), 2: np.where(rng.random(n) < 0.8, 0.0, rng.random(n)),
         3: rng.choice([-0.0, 0.0, 0.5, 1.0], n)}[kind]
    s = s.astype(np.float32 if seed % 2 else np.float64)
    y = rng.random(n) < (0.0 if seed % 7 == 6 else 0.2)
    return s, y


@pytest.mark.parametrize("seed", range(14))
def test_torch_counts_equal_numpy(seed):
    s, y = _maps(seed)
    a, b = curve_counts(s, y, engine="numpy"), curve_counts(s, y, engine="torch")
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
        assert np.asarray(u).dtype == np.asarray(v).dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m1, m2 = pixel_metrics(s, y, engine="numpy"), pixel_metrics(s, y, engine="torch")
    assert json.dumps(m1) == json.dumps(m2)          # bit for bit, nan included


def test_engine_choice():
    import torch
    from uad_study.metrics import TORCH_MIN_VOXELS, _use_torch
    assert _use_torch("auto", TORCH_MIN_VOXELS) == torch.cuda.is_available()
    assert not _use_torch("auto", 10) and _use_torch("torch", 10) and not _use_torch("numpy", 10**9)
    with pytest.raises(UADInputError, match="engine"): curve_counts([0.1], [1], engine="jax")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_counts_equal_numpy():
    s, y = _maps(2)
    s = np.tile(s, 300); y = np.tile(y, 300)     # large enough for engine="auto" to pick the GPU
    for u, v in zip(curve_counts(s, y, engine="numpy"), curve_counts(s, y)): np.testing.assert_array_equal(u, v)
