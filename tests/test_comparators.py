"""The comparators of the papers' tables as study-kit models: their rows in the Tri-VAE and scale-space chapters' Table 1,
ASC-Net's extra training data named, the inference cost of every run, and scoring new scans with a staged comparator."""
import csv
import json

import pandas as pd
import pytest
import torch

from uad_study.core import UADInputError
from uad_study.runs import score_scans
from uad_study.study import COMPARATORS, comparator_spec, inference_cost_table
from uad_study.study_ssae import ssae_config, run_ssae_study
from uad_study.study_trivae import TABLE1, _validate, run_trivae_study, trivae_config

TRIVAE = ("fanogan", "ascnet", "restoration-vae")


@pytest.fixture(scope="module")
def trivae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "trivae"
    run_trivae_study(trivae_config("smoke", out_dir=str(out), models=TRIVAE, epochs=1), progress=False)
    return out


def test_trivae_table1_has_a_row_of_ours_per_comparator_beside_the_papers(trivae_run):
    t1 = pd.read_csv(trivae_run / "table1.csv")
    ours, paper = t1[t1["source"].str.startswith("uad_study smoke")], t1[t1["source"].str.startswith("paper:")]
    want = {TABLE1[m][0] for m in TRIVAE}
    assert want <= set(paper["method"]) and set(ours["method"]) == want
    assert ours.groupby("method").size().min() == 2                              # one row per post-processing preset
    asc = ours[ours["method"] == "ASC-Net"]["source"]
    assert asc.str.contains("val_anomalous slices").all()                         # what else ASC-Net trained on
    assert not ours[ours["method"] != "ASC-Net"]["source"].str.contains("val_anomalous").any()
    m = pd.read_csv(trivae_run / "metrics.csv")
    assert set(m["paper_row"].dropna()) == want and (m["comparator_profile"].dropna() == "smoke").all()


def test_config_records_each_comparator_and_its_map(trivae_run):
    c = json.loads((trivae_run / "config.json").read_text())
    for m in TRIVAE:
        d = c["models_detail"][m]
        assert d["comparator"] == m and d["comparator_profile"] == "smoke" and d["anomaly_map"]["map"] == "absolute"
    assert c["models_detail"]["fanogan"]["stages"]["wgan_gp"]["n_critic"] == 5
    assert "val_anomalous" in c["models_detail"]["ascnet"]["training_data"]


def test_every_run_times_its_models_inference(trivae_run):
    cost = pd.read_csv(trivae_run / "inference_cost.csv")
    assert list(cost["model"]) == list(TRIVAE)
    assert (cost["seconds"] > 0).all() and (cost["test_volumes"] == 2).all()
    assert ((cost["s_per_volume"] * cost["test_volumes"] - cost["seconds"]).abs() < 1e-3).all()


def test_score_reloads_fanogans_second_stage_and_reproduces_the_run(trivae_run, tmp_path):
    "f-AnoGAN keeps its evaluated weights in models/fanogan/encoder: uad-study score must load those, not stage 1's."
    assert (trivae_run / "models/fanogan/wgan/last.pt").is_file() and (trivae_run / "models/fanogan/encoder/last.pt").is_file()
    test = json.loads((trivae_run / "config.json").read_text())["data"]["test"]
    score_scans(trivae_run, "fanogan", test, tmp_path / "s", progress=False)
    got = {r["subject"]: float(r["score_mean"]) for r in csv.DictReader(open(tmp_path / "s" / "scans.csv"))}
    want = {r["subject"]: float(r["score_mean"]) for r in csv.DictReader(open(trivae_run / "subject_scores.csv"))
            if r["model"] == "fanogan"}
    assert got.keys() == want.keys() and len(got) >= 2
    assert all(abs(got[k] - want[k]) <= 5e-5 for k in got), (got, want)


def test_ascnet_without_unknown_images_is_refused_before_training():
    with pytest.raises(UADInputError, match="val_anomalous"):
        _validate(trivae_config("smoke", val_anomalous="", models=("ascnet",)))
    _validate(trivae_config("smoke", val_anomalous="", models=("fanogan",)))   # the others learn from healthy scans alone


def test_comparator_profiles_follow_the_run_and_unknown_ones_are_named():
    from types import SimpleNamespace
    s = comparator_spec("anoddpm")
    small, cpu = (s.describe(SimpleNamespace(profile=p, resolution=64, seed=0)) for p in ("smoke", "cpu"))
    assert small["model"]["T"] < cpu["model"]["T"] and small["parameters"] < cpu["parameters"]
    with pytest.raises(UADInputError, match="comparator_profile"):
        s.build(SimpleNamespace(profile="demo", resolution=32, seed=0))
    with pytest.raises(UADInputError, match="comparators are"):
        comparator_spec("gan")
    assert set(COMPARATORS) == {"anoddpm", "fanogan", "restoration-vae", "restoration-gmvae", "cevae", "ascnet"}


@pytest.mark.slow
def test_ssae_table1_has_the_comparators_per_dataset(tmp_path):
    out = tmp_path / "ssae"
    run_ssae_study(ssae_config("smoke", out_dir=str(out), models=("cevae", "restoration-gmvae"), epochs=1), progress=False)
    t1 = pd.read_csv(out / "table1.csv")
    ours = t1[t1["status"] == "this run"]
    assert set(ours["approach"]) == {"Context VAE", "GMVAE (You et al.)"}
    assert ours[["ms_auprc", "gb_auprc", "ms_dice", "gb_dice"]].notna().all().all()
    t2 = pd.read_csv(out / "table2.csv")
    assert not (t2["status"] == "this run").any()                                 # comparators are Table 1's only
    m = pd.read_csv(out / "metrics.csv")
    assert set(m["scale"].astype(str)) == {"64"}
    gm = m[(m["model"] == "restoration-gmvae") & (m["postprocess"] == "mask_only")]
    assert (gm["auroc"] != 0.5).all()                                            # the restored image moved: not an all-zero map
