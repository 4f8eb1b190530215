"The Tri-VAE study runner: run folder, tables beside the paper's, figures with their data, resume without retraining."
import json

import pandas as pd
import pytest

from uad_study.core import UADInputError
from uad_study.study import select_subjects, validate_config
from uad_study.study_trivae import SPEC, TABLE1, TABLE2, run_trivae_study, trivae_config

MODELS = ("vae", "abl-gcs", "trivae-coarse", "dae-coarse")   # enough for every figure (4, 5, 6, 7)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import warnings
    out = tmp_path_factory.mktemp("trivae") / "run"
    cfg = trivae_config("smoke", out_dir=str(out), models=MODELS, epochs=1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = run_trivae_study(cfg, progress=False)
    return cfg, r, [str(x.message) for x in w]


def test_run_folder(run):
    cfg, r, *_ = run
    out = r["out_dir"]
    for f in ("config.json", "metrics.json", "metrics.csv", "table1.csv", "table2.csv", "split.csv"):
        assert (out / f).is_file(), f
    n_test = r["summary"]["data"]["n_test_subjects"]
    for m in MODELS:
        assert (out / "models" / m / "last.pt").is_file() and (out / "models" / m / "train_log.csv").is_file()
        assert len(list((out / "maps" / m).glob("*_anomaly.nii.gz"))) == n_test   # NIfTI maps on the inputs' grids
    c = json.loads((out / "config.json").read_text())
    assert set(c["models_detail"]) == set(MODELS)
    assert c["models_detail"]["abl-gcs"]["model"]["gcs"] and not c["models_detail"]["abl-gcs"]["model"]["coarse_loss"]
    assert c["models_detail"]["dae-coarse"]["objective"]["noise"]["kind"] == "coarse"
    assert [s["step"] for s in c["postprocessing"]["trivae"]][:2] == ["mask", "threshold"]
    assert list(c["postprocessing"]) == ["mask_only", "trivae"]        # raw maps beside the paper's post-processing
    assert all(c["training_detail"][m]["drop_last"] is True for m in MODELS)   # Tri-VAE batches split into thirds


def test_every_number_names_its_protocol_and_data(run):
    cfg, r, *_ = run
    t = r["table"]
    assert set(t["protocol"]) == {"test_best", "healthy_fpr"}
    assert t[["profile", "data", "resolution", "postprocess", "space"]].notna().all().all() and (t["space"] == "brain").all()
    assert set(t["postprocess"]) == {"mask_only", "trivae"}
    assert ((t["prevalence"] > 0) & (t["prevalence"] < 0.1)).all()
    assert "dice_per_subject" not in t and all(len(x["dice_per_subject"]) == r["summary"]["data"]["n_test_subjects"]
                                               for x in r["summary"]["results"])
    assert t[["auroc", "auprc"]].apply(lambda c: c.between(0, 1)).all().all()


def test_tables_beside_the_paper(run):
    cfg, r, *_ = run
    t1 = pd.read_csv(r["out_dir"] / "table1.csv")
    assert r["tables"]["table1"].shape == t1.shape
    paper = t1[t1["source"].str.startswith("paper")]
    ours = t1[~t1["source"].str.startswith("paper")]
    assert len(paper) == 9 and paper["protocol"].str.contains("not stated").all()
    assert set(ours["method"]) == {TABLE1[m][0] for m in MODELS if m in TABLE1}
    assert ours["source"].str.contains("smoke").all() and ours["protocol"].str.contains("test_best").all()
    assert ours["protocol"].str.contains("mask_only").any() and ours["protocol"].str.contains("brain voxels").all()
    t2 = pd.read_csv(r["out_dir"] / "table2.csv")
    from uad_study.core import paper_table
    assert list(t2[t2["source"].str.startswith("paper")]["row"]) == list(paper_table("tri-vae_table2")["row"])
    assert set(t2[~t2["source"].str.startswith("paper")]["row"]) == {TABLE2[m] for m in MODELS if m in TABLE2}
    # the paper's numbers are read from the package's paper tables (uad_study/paper_tables), not typed here
    assert t2[t2["row"] == "+SSIM loss (Tri-VAE)"]["dice"].iloc[0] == pytest.approx(0.6058)


def test_figures_with_their_data(run):
    cfg, r, *_ = run
    fig = r["out_dir"] / "figures"
    for f in ("pr_curves", "fig4_segmentations", "fig5_tsne", "fig6_coarse_loss", "fig7_trivae_vs_unet"):
        assert (fig / f"{f}.png").is_file(), f
        assert (fig / f"{f}.csv").is_file() or (fig / f"{f}.npz").is_file(), f
    ts = pd.read_csv(fig / "fig5_tsne.csv")
    assert set(ts["model"]) == {"vae", "trivae-coarse"} and set(ts["code"]) == {"embedding", "resampled"}
    assert ts["anomalous"].any() and (~ts["anomalous"]).any()


def test_resume_finished_run_does_not_retrain(run):
    "Resuming a finished run trains nothing: logs and checkpoints are untouched, the numbers are the same (no timing)."
    import torch
    cfg, r, *_ = run
    out = r["out_dir"]
    before = {m: ((out / "models" / m / "train_log.csv").read_text(), (out / "models" / m / "last.pt").stat().st_mtime_ns)
              for m in MODELS}
    r2 = run_trivae_study(cfg, resume=True, progress=False)
    for m in MODELS:
        assert (out / "models" / m / "train_log.csv").read_text() == before[m][0]
        assert (out / "models" / m / "last.pt").stat().st_mtime_ns == before[m][1]
        assert torch.load(out / "models" / m / "last.pt", weights_only=False)["epoch"] == cfg.epochs
    pd.testing.assert_frame_equal(r["table"], r2["table"])   # same weights, same numbers


def test_existing_run_is_not_overwritten(run):
    cfg, r, *_ = run
    with pytest.raises(UADInputError, match="run folder exists"):
        run_trivae_study(cfg, progress=False)


def test_data_selection_is_seeded_and_checked(tmp_path):
    cfg = trivae_config("smoke", n_train_subjects=4)
    src = validate_config(SPEC, cfg)
    a, b = select_subjects(cfg, src, progress=False), select_subjects(cfg, src, progress=False)
    assert [s.id for s in a["train"]] == [s.id for s in b["train"]] and len(a["train"]) == 4
    assert not {s.id for s in a["train"]} & {s.id for s in a["val"]}
    c = trivae_config("smoke", n_train_subjects=4, seed=1)
    assert {s.id for s in select_subjects(c, src, progress=False)["train"]} != {s.id for s in a["train"]}
    big = trivae_config("smoke", n_train_subjects=50)
    with pytest.raises(UADInputError, match="asked for 50 train"):
        select_subjects(big, validate_config(SPEC, big), progress=False)


@pytest.mark.slow
def test_study_under_torchrun(tmp_path):
    "`torchrun -m uad_study.cli trivae`: two gloo processes train, process 0 alone evaluates and writes."
    import os, subprocess, sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "ddp"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "uad_study.cli", "trivae", "--models", "vae", "--epochs", "1", "--out", str(out),
                        "--no-progress", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("trivae (smoke) on") == 1                 # one report: process 0's
    log = pd.read_csv(out / "models" / "vae" / "train_log.csv")
    assert len(log) == 1 and log["train_loss"].notna().all()
    assert (out / "table1.csv").is_file() and (out / "figures" / "fig4_segmentations.png").is_file()


def test_triplets_of_distinct_subjects_in_the_study(run):
    "The runner gives the Tri-VAE objective each slice's subject: no 'roles follow batch order' warning in training."
    cfg, r, warned = run
    assert not any("has no 'subject'" in w for w in warned), warned
    c = json.loads((r["out_dir"] / "config.json").read_text())
    assert c["models_detail"]["vae"]["objective"]["variant"] == "literal"
    assert c["models_detail"]["trivae-coarse"]["objective"]["triplet_reduction"] == "sum"   # eq. 5 as written


def test_both_readings_of_eq8(tmp_path):
    "vae (eq. 8 as written) and vae-balanced (ours) both run, are named in Table 2 and log the KL every epoch."
    cfg = trivae_config("smoke", out_dir=str(tmp_path / "r"), models=("vae", "vae-balanced"), epochs=2)
    r = run_trivae_study(cfg, progress=False)
    t2 = r["tables"]["table2"]
    assert {"baseline VAE (eq. 8 as written)", "baseline VAE (balanced, ours)"} <= set(t2["row"])
    assert set(r["table"]["loss_variant"]) == {"literal", "balanced"}
    for m in ("vae", "vae-balanced"):
        log = pd.read_csv(r["out_dir"] / "models" / m / "train_log.csv")
        assert "train_kl" in log and log["train_kl"].notna().all() and len(log) == 2
