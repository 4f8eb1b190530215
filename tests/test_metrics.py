"Metrics: exact agreement with sklearn (ties included), brute-force best DICE, edge cases, speed at 12M voxels."
import warnings

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
