"The reversed-AE runner's own rules: box slices, box localisation, subject detection AUROC and RA's training augmentation."
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import write_slice_set
from uad_study.study_reversed import (GROUPS, MODEL_SPECS, PAPER_LR, RAObjective, bootstrap_auroc, box_slice,
                                      detection_rows, localisation, model_lr, reversed_config, subject_detection_scores)


R = 16

def _subject(lesions=()):
    "Three 16x16 slices, brain everywhere; `lesions`: (slice, r0, c0, r1, c1) rectangles set in the label."
    x, m, y = np.zeros((3, R, R)), np.ones((3, R, R), bool), np.zeros((3, R, R), bool)
    for k, r0, c0, r1, c1 in lesions: y[k, r0:r1, c0:c1] = True
    return x, m, y


@pytest.fixture
def ss(tmp_path):
    return write_slice_set(tmp_path / "ss", [
        _subject(),                                                 # 0: healthy
        _subject([(0, 1, 1, 4, 4),                                  # 1: 9 px on slice 0
                  (2, 2, 2, 6, 7), (2, 10, 10, 12, 13), (2, 14, 0, 15, 1)]),  # slice 2: 20 + 6 + 1 px (the 1-px speck is no box)
        _subject([(1, 8, 8, 12, 12)]),                              # 2: one 4x4 lesion on slice 1
    ])


def test_box_slice_is_the_largest_lesion_slice_and_drops_specks(ss):
    assert box_slice(ss, 0) is None                                 # no lesion: no box slice
    k, boxes = box_slice(ss, 1)
    assert k == 2 and sorted(boxes) == [(2, 2, 6, 7), (10, 10, 12, 13)]   # half-open (r0, c0, r1, c1); the speck is < 4 px
    assert box_slice(ss, 1, min_pixels=1)[1] == [(2, 2, 6, 7), (10, 10, 12, 13), (14, 0, 15, 1)]
    assert box_slice(ss, 2) == (1, [(8, 8, 12, 12)])


def _vol(flag_boxes, k=None):
    "A (R, R, 3) map of zeros with ones in the given (slice, r0, c0, r1, c1) rectangles."
    v = np.zeros((R, R, 3))
    for s, r0, c0, r1, c1 in flag_boxes: v[r0:r1, c0:c1, s] = 1.0
    return v


def test_localisation_counts_a_box_only_above_ten_percent(ss):
    # subject 1, slice 2: box A (4x5 = 20 px) gets 3 flagged px (15% > 10%); box B (2x3 = 6 px) none.
    # subject 2, slice 1: box C (4x4 = 16 px) gets 1 flagged px (6.25%): not detected.
    vols = [_vol([(0, 0, 0, 16, 16)]),                              # the healthy subject is flagged everywhere: never scored
            _vol([(2, 2, 2, 3, 5), (0, 1, 1, 4, 4)]),                # slice 0's flags are not on the box slice
            _vol([(1, 8, 8, 9, 9)])]
    loc = localisation(ss, vols, ["healthy", "glioma", "ms"], threshold=0.5, min_fraction=0.1)
    assert loc["subjects"] == [(1, 2), (2, 1)]
    det = {(b["scan"], b["cls"], round(b["fraction"], 4)): b["detected"] for b in loc["boxes"]}
    assert det == {(0, "glioma", 0.15): True, (0, "glioma", 0.0): False, (1, "ms", 0.0625): False}
    assert loc["per_class"]["glioma"]["detected"] == 1 and loc["per_class"]["glioma"]["total"] == 2
    assert loc["overall"] == {"detected": 1, "total": 3, "f1": pytest.approx(1 / 3)}   # A: F1 1 (no flag outside boxes); B, C: 0
    # the rule is strict: 2 of 20 pixels (exactly 10%) is not a detection
    vols[1] = _vol([(2, 2, 2, 3, 4)])
    loc = localisation(ss, vols, ["healthy", "glioma", "ms"], threshold=0.5, min_fraction=0.1)
    assert [b["detected"] for b in loc["boxes"]] == [False, False, False]
    # a higher threshold flags nothing; no anomalous subject: an empty, well-formed result
    assert localisation(ss, vols, ["healthy", "glioma", "ms"], threshold=2.0)["overall"]["detected"] == 0
    empty = localisation(ss, vols, ["healthy"] * 3, threshold=0.5)
    assert empty["overall"]["total"] == 0 and np.isnan(empty["overall"]["f1"])


def test_localisation_f1_uses_the_false_positives_outside_the_boxes(ss):
    "Same flagged box pixels, more flagged healthy tissue on the box slice: a lower F1 (RA's FP ratio)."
    base = [_vol([]), _vol([(2, 2, 2, 6, 7)]), _vol([])]
    noisy = [_vol([]), _vol([(2, 2, 2, 6, 7), (2, 0, 8, 8, 16)]), _vol([])]
    f = lambda v: localisation(ss, v, ["healthy", "glioma", "ms"], 0.5)["per_class"]["glioma"]["f1"]
    assert f(base) == pytest.approx(0.5)        # box A: 1 TP with no FP -> F1 1; box B: missed -> 0
    assert f(noisy) < f(base)


def test_subject_detection_scores_reduce_over_the_brain(ss):
    vols = [np.full((R, R, 3), 2.0), _vol([(0, 0, 0, 8, 16)]), np.zeros((R, R, 3))]
    assert subject_detection_scores(ss, vols).tolist() == [2.0, pytest.approx(1 / 6), 0.0]
    assert subject_detection_scores(ss, vols, "p99")[1] == 1.0


def test_bootstrap_auroc_hand_computed_and_seeded():
    neg = np.array([0.0, 1.0, 2.0])
    assert bootstrap_auroc(neg, np.array([3.0, 4.0]), n=50) == (1.0, 0.0)    # separable in every resample
    a, sd = bootstrap_auroc(neg, np.array([0.5, -1.0]), n=200, seed=1)
    assert a == pytest.approx(1 / 6) and sd > 0
    assert bootstrap_auroc(neg, np.array([0.5, -1.0]), n=200, seed=1) == (a, sd)
    assert bootstrap_auroc(neg, np.array([0.5, -1.0]), n=200, seed=2)[1] != sd
    assert all(np.isnan(bootstrap_auroc(neg, np.array([]))))


def test_detection_rows_per_class_groups_and_average():
    classes = ["healthy"] * 3 + ["glioma"] * 2 + ["ms"] * 2 + ["motion"] * 2
    scores = np.array([0, 1, 2, 3, 4, 0.5, -1, 1.5, 2.5])
    rows = {r["comparison"]: r for r in detection_rows(scores, classes, n_boot=20)}
    assert rows["glioma"]["auroc"] == 1.0 and rows["glioma"]["group"] == "pathology"
    assert rows["ms"]["auroc"] == pytest.approx(1 / 6) and rows["motion"]["group"] == "artefact"
    assert rows["pathology"]["auroc"] == pytest.approx(7 / 12) and rows["pathology"]["n_anomalous"] == 4
    assert rows["artefact"]["auroc"] == pytest.approx(5 / 6)          # 1.5 beats 2 of 3, 2.5 all 3
    assert rows["average"]["auroc"] == pytest.approx((7 / 12 + 5 / 6) / 2)
    assert "synthetic" not in rows                                     # no synthetic subjects: no group row
    assert "average" not in {r["comparison"] for r in detection_rows(scores[:5], classes[:5], n_boot=5)}
    assert set(GROUPS["artefact"]) == {"motion", "spike", "ghosting", "gibbs", "wrap", "bias"}


class _Recorder:
    "An inner objective that records what it is given."
    def __init__(self): self.seen, self.cfgs = [], []
    def train_step(self, model, batch, step): self.seen.append(batch["image"].clone()); return {"loss": 0.0}
    def loss(self, model, batch): self.seen.append(batch["image"].clone()); return torch.zeros(())
    def optimizers(self, model, cfg): self.cfgs.append(cfg); return []
    collapse_kl_floor = 0.25


@dataclass
class _Cfg:
    lr: float = 1.0


def test_ra_objective_augments_training_batches_only_and_replays_per_step():
    x = torch.rand(4, 1, 16, 16)
    inner = _Recorder(); obj = RAObjective(inner, lr=3e-4, seed=7)
    for g in (5, 5, 6):
        obj.train_step(None, {"image": x}, SimpleNamespace(global_step=g))
    a, b, c = inner.seen
    assert not torch.equal(a, x) and torch.equal(a, b) and not torch.equal(a, c)    # seeded by (seed, global step)
    obj.loss(None, {"image": x})
    assert torch.equal(inner.seen[-1], x)                                           # validation loss: no augmentation
    plain = _Recorder(); RAObjective(plain, 3e-4, augment=None).train_step(None, {"image": x}, SimpleNamespace(global_step=5))
    assert torch.equal(plain.seen[0], x)
    obj.optimizers(None, _Cfg())
    assert inner.cfgs[-1].lr == 3e-4                                                # its own learning rate
    # the engine's per-objective settings are the wrapped objective's (Objective's class defaults must not hide them)
    assert obj.collapse_kl_floor == 0.25 and obj.ddp_kwargs == {}
    from uad_study.models.ra_baselines import VAEObjective
    from uad_study.models.reversed_ae import SoftIntroObjective
    assert RAObjective(VAEObjective(), 1e-3).collapse_kl_floor == VAEObjective.collapse_kl_floor == 1e-2
    assert RAObjective(SoftIntroObjective(), 1e-3).collapse_kl_floor is None    # its kl_fake may be small by design


def test_model_lr_is_the_papers_times_the_profile_scale():
    cfg = reversed_config("smoke")
    for name, (fam, *_rest) in MODEL_SPECS.items():
        assert model_lr(name, cfg) == pytest.approx(PAPER_LR[fam] * cfg.lr_scale)
    assert PAPER_LR["soft-intro"] == 5e-5 and reversed_config("paper").lr_scale == 1.0
