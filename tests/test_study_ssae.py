"""The scale-space runner's own rules: the model grid and its levels, the plain models at several resolutions, the map of one
level or of all levels from the model's per-level residuals, per-dataset rows, the claims, the validators and the extra test set."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from conftest import blob_slices, write_slice_set
import uad_study.study_ssae as S
from uad_study.core import UADInputError
from uad_study.io import Subject
from uad_study.models.base import check_model
from uad_study.models.ssae import SSAE, LaplacianPyramid
from uad_study.scores import scale_space_aggregate
from uad_study.study import score_slices, threshold_protocols, validate_config
from uad_study.study_ssae import (MODEL_SPECS, SPEC, MultiResolutionAE, entry_level, extra_test_source, level_errors,
                                  paper_claims, scale_space_map, set_rows, ssae_config, subject_groups, wide_rows)

R = 16


class Levels(nn.Module):
    "A stand-in with per-level outputs: recon_k = I_k - err[k] everywhere (a block of `spot` extra error at level 0)."
    def __init__(self, err=(0.0, 0.25), spot=0.0):
        super().__init__()
        self.p, self.err, self.spot, self.w = LaplacianPyramid(len(err) - 1), err, spot, nn.Parameter(torch.zeros(()))

    def forward(self, x):
        I, _ = self.p.decompose(x)
        rec = [i - e for i, e in zip(I, self.err)]
        rec[0] = rec[0].clone(); rec[0][..., 4:8, 4:8] -= self.spot
        return {"recon": rec[0], "recons": rec, "images": I}


def test_grid_names_levels_and_weights():
    cpu, paper = ssae_config("cpu"), ssae_config("paper")
    assert len(MODEL_SPECS) == 30 and MODEL_SPECS["ssvae-dense-aggr"] == ("ssae", "vae", "aggr")
    assert [entry_level(m, cpu) for m in cpu.models] == [0, 1, -1, 0, 1, 2, -1]
    assert {entry_level(m, paper) for m in paper.models} == {0, 1, 2, -1}
    assert all(SPEC.models[m].weights_of == "" for m in ("ae-dense", "ssae-spatial", "vae-dense", "ssvae-dense"))
    assert SPEC.models["ae-spatial-64"].weights_of == "ae-spatial" and SPEC.models["ssvae-dense-aggr"].weights_of == "ssvae-dense"
    assert SPEC.models["ssae-dense-32"].map_kwargs(cpu) == {"level": 2, "kind": "absolute"}
    with pytest.raises(UADInputError, match="1 <= k <= 1"): entry_level("ae-dense-32", cpu)   # the plain stack stops at 64 px


@pytest.mark.parametrize("profile", ["smoke", "cpu"])
def test_profile_models_follow_the_model_protocol_at_the_same_complexity(profile):
    cfg = ssae_config(profile)
    x = torch.rand(2, 1, cfg.resolution, cfg.resolution)
    for m in [m for m in cfg.models if m in MODEL_SPECS and MODEL_SPECS[m][2] is None]:   # the comparators: tests/test_comparators.py
        torch.manual_seed(0)
        model = S.study_model(m, cfg)
        assert check_model(model, x)["recon"] == tuple(x.shape), m
        o = model.eval()(x)
        assert [i.shape[-1] for i in o["images"]] == [cfg.resolution >> k for k in range(S.model_levels(m, cfg) + 1)]
    d = S.describe_model("ssae-dense", cfg)
    assert abs(d["ssae"] / d["plain"] - 1) < 0.01 and d["plain"] == S.describe_model("ae-dense", cfg)["plain"]


def test_plain_levels_train_alone_on_their_pyramid_images(tmp_path, monkeypatch):
    "Each plain network gets its own level's images I_k (not the slices, not a band); one history numbers the epochs on."
    calls = []

    def engine(net, train, val, cfg, ckpt, resume, progress, name, objective):
        calls.append((net, np.array(train), np.array(val), ckpt.name, type(objective).__name__))
        return [{"epoch": e, "train_loss": 0.1, "val_loss": 0.2} for e in (1, 2)]
    monkeypatch.setattr(S, "train_model", engine)
    model = MultiResolutionAE(1, "dense", 32, {"channels": (4, 8), "latent_dim": 4})
    sets = {"train": SimpleNamespace(slices=blob_slices(6, 32)), "val": SimpleNamespace(slices=blob_slices(3, 32, seed=5))}
    hist = S.fit_plain_levels(model, sets, ssae_config("smoke"), tmp_path / "ae-dense", True, False)
    assert [c[0] for c in calls] == [model.nets[0], model.nets[1]] and [c[3] for c in calls] == ["level0", "level1"]
    assert calls[0][1].shape == (6, 32, 32) and np.array_equal(calls[0][1], sets["train"].slices)
    I1 = model.pyramid.down(torch.from_numpy(sets["train"].slices)[:, None])[:, 0].numpy()
    assert calls[1][1].shape == (6, 16, 16) and np.allclose(calls[1][1], I1, atol=1e-6) and calls[1][2].shape == (3, 16, 16)
    assert {c[4] for c in calls} == {"BaselineObjective"}
    assert [(h["epoch"], h["level"], h["level_epoch"]) for h in hist] == [(1, 0, 1), (2, 0, 2), (3, 1, 1), (4, 1, 2)]
    assert (tmp_path / "ae-dense" / "train_log.csv").read_text().splitlines()[0] == "epoch,train_loss,val_loss,level,level_epoch"


def test_map_uses_the_per_level_residuals_by_hand():
    "Level 1 is 0.25 off everywhere, level 0 exact except a 4x4 block 0.5 off: level maps and eq. 6 by hand."
    x = np.full((2, R, R), 0.5, np.float32)
    m = Levels((0.0, 0.25), spot=0.5)
    block = np.zeros((2, R, R), np.float32); block[:, 4:8, 4:8] = 0.5
    np.testing.assert_allclose(scale_space_map(x, None, model=m, level=0), block, atol=1e-6)
    np.testing.assert_allclose(scale_space_map(x, None, model=m, level=1), np.full((2, R, R), 0.25), atol=1e-6)
    np.testing.assert_allclose(scale_space_map(x, None, model=m), block + 0.25, atol=1e-6)
    np.testing.assert_allclose(scale_space_map(x, None, model=Levels((-0.1, 0.0)), kind="positive"), 0, atol=1e-7)  # recon brighter
    np.testing.assert_allclose(scale_space_map(x, None, model=Levels((0.0, 0.2)), kind="squared"), 0.04, atol=1e-6)
    with pytest.raises(UADInputError, match=r"lie in \[0, 1\]"): scale_space_map(x, None, model=m, level=2)


def test_map_of_a_real_ssae_is_eq6_of_its_residuals_and_not_the_upsampled_image_residual():
    torch.manual_seed(0)
    model = SSAE(2, "dense", 32, {"channels": (4, 8, 8), "latent_dim": 4}).eval()
    x = blob_slices(3, 32)
    r = [t.numpy() for t in model.residuals(torch.from_numpy(x)[:, None])]
    np.testing.assert_allclose(scale_space_map(x, None, model=model), scale_space_aggregate(r), atol=1e-6)
    lvl1 = scale_space_map(x, None, model=model, level=1)
    np.testing.assert_allclose(lvl1, scale_space_aggregate([np.zeros_like(r[0]), r[1], np.zeros_like(r[2])]), atol=1e-6)
    # the plausible wrong reading, |x - u(I^_1)|, keeps the band H_0 that level 1 never sees: far larger at the disc's edge
    rec1 = torch.nn.functional.interpolate(model(torch.from_numpy(x)[:, None])["recons"][1].clamp(0, 1), size=(32, 32),
                                           mode="bilinear", align_corners=False)[:, 0].detach().numpy()
    assert np.abs(np.abs(x - rec1) - lvl1).mean() > 0.01
    # through the study kit's registry: score_slices passes the model to the map
    _, maps = score_slices(model, x, "scale_space", "cpu", level=1, kind="absolute")
    np.testing.assert_allclose(maps, lvl1, atol=1e-6)


def test_level_errors_are_normalised_l1_per_level():
    e = level_errors(Levels((0.0, 0.25), spot=0.5), np.full((2, R, R), 0.5, np.float32))
    np.testing.assert_allclose(e, [[0.5 * 16 / 256, 0.25]] * 2, atol=1e-6)      # a 4x4 block of 0.5 over 16x16 pixels


def _subject(lesion_slices=(), n=2):
    x, m, y = np.zeros((n, R, R)), np.ones((n, R, R), bool), np.zeros((n, R, R), bool)
    for k in lesion_slices: y[k, 4:8, 4:8] = True
    return x, m, y


def test_set_rows_per_group_and_protocol_by_hand(tmp_path):
    "ms: lesions 0.6 on 0.2; glioma: lesions 0.25 on 0; healthy validation maps 0.1 with 10 of 1024 voxels at 0.3 (under 5 %)."
    test = write_slice_set(tmp_path / "t", [_subject([0]), _subject([1]), _subject([0])])
    val = write_slice_set(tmp_path / "v", [_subject(), _subject()])
    groups, level = ["ms", "glioma", "ms"], {"ms": (0.2, 0.6), "glioma": (0.0, 0.25)}
    y = np.asarray(test.labels, np.float32); maps = np.zeros_like(y)
    for i, g in enumerate(groups):
        r = test.subject_range(i); maps[r] = level[g][0] + (level[g][1] - level[g][0]) * y[r]
    protos = threshold_protocols(ssae_config("smoke"))
    hmaps = np.full((len(val), R, R), 0.1, np.float32); hmaps[0, 0, :10] = 0.3
    rows = {(r["lesion_set"], r["protocol"]): r for r in
            set_rows(test, maps, groups, "mask_only", protos, (val, hmaps))}
    assert set(rows) == {(g, p) for g in ("ms", "glioma") for p in ("test_best", "healthy_fpr")}
    assert rows["ms", "test_best"]["n_subjects"] == 2 and rows["glioma", "test_best"]["n_subjects"] == 1
    for g in ("ms", "glioma"):
        assert rows[g, "test_best"]["dice"] == pytest.approx(1.0) and rows[g, "test_best"]["auprc"] == pytest.approx(1.0)
    assert rows["ms", "healthy_fpr"]["threshold"] == pytest.approx(0.3)    # the lowest healthy score with FPR <= 5 %
    assert rows["ms", "healthy_fpr"]["dice"] == pytest.approx(1.0)          # the 0.6 lesions stay, the 0.2 background goes
    assert rows["glioma", "healthy_fpr"]["dice"] == pytest.approx(0.0)      # the 0.25 lesions are lost
    no_healthy = set_rows(test, maps, groups, "mask_only", protos, None)
    assert {r["protocol"] for r in no_healthy} == {"test_best"}


def test_subject_groups_and_wide_rows():
    subs = [Subject("a", {}, meta={"cls": "ms"}), Subject("b", {}, meta={"dataset": "MSLUB"}), Subject("c", {}, meta={"cls": "glioma"})]
    recs = [{"label_voxels_total": 3}, {"label_voxels_total": 5}, {"label_voxels_total": 0}]
    assert subject_groups(subs, recs) == ["ms", "MSLUB", "healthy"]
    ps = pd.DataFrame([{"run_model": "ssae-dense", "approach": "SSAE (dense)", "scale": "128", "protocol": "test_best",
                        "postprocess": "pp", "dataset": d, "auprc": a, "dice": b}
                       for d, a, b in (("D_MS", .5, .6), ("D_GB", .3, .4), ("", .9, .9))])
    (row,) = wide_rows(ps, "pp")
    assert (row["ms_auprc"], row["ms_dice"], row["gb_auprc"], row["gb_dice"]) == (.5, .6, .3, .4) and "mslub_auprc" not in row
    assert wide_rows(ps, "other") == []


def test_claims_by_hand():
    rows = [("ssae", "128", "D_MS", .30), ("ae", "128", "D_MS", .35), ("ssae", "aggr", "D_MS", .40), ("ae", "64", "D_MS", .50),
            ("ae", "aggr", "D_MS", .45), ("ssae", "128", "D_GB", .20), ("ae", "128", "D_GB", .10), ("ssae", "aggr", "D_GB", .25)]
    ps = pd.DataFrame([{"family": f, "variant": "dense", "scale": s, "dataset": d, "postprocess": "pp", "protocol": "test_best",
                        "auprc": a} for f, s, d, a in rows])
    c = paper_claims(ps, 128, "pp").set_index(["claim", "family", "dataset"])["holds"]
    assert c["SSAE beats its plain AE at the highest resolution", "ssae", "D_MS"] is False   # 0.30 < 0.35
    assert c["SSAE beats its plain AE at the highest resolution", "ssae", "D_GB"] is True
    assert c["SSAE's gain is larger on small lesions", "ssae", "D_MS/D_MSLUB vs D_GB"] is False   # -0.05 against +0.10
    assert c["aggregation helps on MS-like lesions", "ssae", "D_MS"] is True    # 0.40 above its only single scale 0.30
    assert c["aggregation helps on MS-like lesions", "ae", "D_MS"] is False     # 0.45 below its 64 px 0.50, not its 128 px
    assert c["aggregation does not help on glioma", "ssae", "D_GB"] is False    # 0.25 above 0.20
    assert c["aggregation does not help on glioma", "ae", "D_GB"] is None       # no AE aggregate on glioma
    assert paper_claims(ps.iloc[:0], 128, "pp").empty


@pytest.mark.parametrize("over,rule", [
    (dict(lesion_names=("ms=MS",)), "GROUP=DATASET"),
    (dict(resolution=128), "use scale-space-128-v1"),
    (dict(models=("ssae-dense", "ssae-dense-16")), "models must be some of"),
    (dict(models=("ssae-dense", "ssae-dense-64")), r"R / 2\*\*k"),
    (dict(protocols=("val_greedy",), val_anomalous="benchmark:smoke:ms"), "supports the protocols"),
    (dict(anomaly_map="ssim"), "residual kind"),
    (dict(match="flops"), "match must be"),
    (dict(extra_test="mslub"), "needs a folder"),
])
def test_validators(over, rule):
    with pytest.raises(UADInputError, match=rule): validate_config(SPEC, ssae_config("smoke", **over))


def test_paper_profile_needs_real_data_and_extra_test_may_be_absent(tmp_path):
    with pytest.raises(UADInputError, match="real data"):
        validate_config(SPEC, ssae_config("paper", train="benchmark:smoke", test="benchmark:smoke:ms"))
    assert extra_test_source(f"mslub:{tmp_path}/none") == (None, f"skipped: the folder {tmp_path}/none does not exist")
    validate_config(SPEC, ssae_config("smoke", extra_test=f"mslub:{tmp_path}/none"))          # not an error: skipped at run time
    assert extra_test_source("benchmark:smoke:ms")[0].classes == ("ms",)


def test_absent_extra_test_is_said_once_and_skipped(tmp_path, capsys):
    ctx = SimpleNamespace(sets={}, data={"info": {}}, cfg=SimpleNamespace(extra_test=f"mslub:{tmp_path}/none"), progress=False)
    assert S.load_extra_test(ctx) is None and S.load_extra_test(ctx) is None
    assert capsys.readouterr().out.count("domain-shift check is not run") == 1
    assert ctx.data["info"]["extra_test"]["status"].startswith("skipped") and "extra_test" not in ctx.sets


@pytest.mark.realdata
def test_mslub_extra_test_source_finds_the_three_flair_patients(realdata):
    cfg = ssae_config("cpu")
    src, status = extra_test_source(cfg.extra_test)
    assert status == "scored"
    subs, info = S.source_subjects(src, "test", cfg, progress=False)
    assert len(subs) == 3 and all("flair" in s.images and s.label is not None for s in subs) and info["dataset"] == "mslub"


@pytest.mark.slow
def test_staged_models_score_new_scans_as_the_run_did(tmp_path):
    "uad-study score loads the SSAE and the plain per-level stack from their level folders: the run's own test scans score as in subject_scores.csv."
    import csv
    from uad_study.runs import load_run_model, score_scans
    cfg = S.ssae_config("smoke", models=("ae-dense", "ssae-dense", "ssae-dense-aggr"), epochs=1, out_dir=str(tmp_path / "run"))
    r = S.run_ssae_study(cfg, progress=False)
    for name in ("ae-dense", "ssae-dense"):
        got, want = load_run_model(tmp_path / "run", name)[0].state_dict(), r["context"].models[name].state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k].cpu(), want[k].cpu()) for k in want)
    score_scans(tmp_path / "run", "ssae-dense-aggr", cfg.test, tmp_path / "scored", progress=False)
    got = {x["subject"]: float(x["score_mean"]) for x in csv.DictReader(open(tmp_path / "scored" / "scans.csv"))}
    want = {x["subject"]: float(x["score_mean"]) for x in csv.DictReader(open(tmp_path / "run" / "subject_scores.csv"))
            if x["model"] == "ssae-dense-aggr"}
    assert got.keys() == want.keys() and all(abs(got[k] - want[k]) <= 5e-5 for k in got), (got, want)
