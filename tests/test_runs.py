"Run folders as a registry and scoring new scans with a trained model (`uad-study runs`, `uad-study score`)."
import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uad_study.benchmark import ensure_benchmark
from uad_study.cli import main
from uad_study.runs import load_run, run_record, score_scans
from uad_study.study_quickstart import quickstart_config, run_quickstart


@pytest.fixture(scope="module")
def bench() -> Path:
    return ensure_benchmark("smoke", progress=False)


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory) -> Path:
    "The quickstart at its smoke size, trained from NIfTI glob folders (no adapter layout)."
    out = tmp_path_factory.mktemp("run") / "glob-run"
    cfg = quickstart_config("smoke", out_dir=str(out), models=("vae",),
                            train=f"nifti:{bench / 'IXI'},images=T2/*-T2.nii.gz",
                            test=f"nifti:{bench / 'BraTS2020/MICCAI_BraTS2020_TrainingData'},images=*/*_t2.nii.gz,labels=*/*_seg.nii.gz")
    run_quickstart(cfg, progress=False)
    return out


def test_a_study_trains_from_glob_folders(run):
    r = run_record(run)
    assert r["state"] == "complete" and r["trained"] == ["vae"] and r["train"].startswith("nifti:")
    spec, cfg, rec = load_run(run)              # the config comes back as the run used it
    assert (spec.name, cfg.profile, cfg.train, cfg.models) == ("quickstart", "smoke", rec["data"]["train"], ("vae",))


def _scans(bench: Path, folder: Path) -> dict:
    "A folder of scans to score: another orientation and spacing, a 4D file, a file named FLAIR, a plain copy."
    folder.mkdir()
    src = sorted((bench / "BraTS2020/MICCAI_BraTS2020_TrainingData").glob("*/*_t2.nii.gz"))
    a = nib.load(str(src[0]))
    lps = a.as_reoriented(nib.orientations.axcodes2ornt(("L", "P", "S")))
    aff = lps.affine.copy(); aff[:3, :3] *= 1.5                       # another voxel size in the header (50 % larger)
    other = nib.Nifti1Image(np.asarray(lps.dataobj, np.float32), aff)
    nib.save(other, folder / "sub-a_t2.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([np.asarray(a.dataobj)] * 2, -1), a.affine), folder / "sub-b_t2.nii.gz")
    nib.save(a, folder / "sub-c_flair.nii.gz")
    nib.save(nib.load(str(src[1])), folder / "sub-d_t2.nii.gz")
    return {"other": other}


def test_score_writes_maps_on_each_input_grid_and_refuses_bad_scans(run, bench, tmp_path, capsys):
    made = _scans(bench, tmp_path / "scans")
    out = tmp_path / "scored"
    rc = main(["score", str(run), str(tmp_path / "scans"), "--images", "*.nii.gz", "--model", "vae", "--out", str(out), "--no-progress",
               "--report"])
    assert rc == 1                                                     # some scans were refused
    text = capsys.readouterr().out
    assert "refused: " in text and "sub-b_t2.nii.gz: a scan must be a 3D volume" in text
    assert "sub-c_flair.nii.gz: the file name states another contrast" in text
    warned = [line for line in text.splitlines() if "sub-a_t2.nii.gz: warning: voxel size 3x3x3 mm" in line]
    assert len(warned) == 1 and "sub-a_t2.nii.gz: note: oriented LPS" in text and "sub-d_t2.nii.gz: warning" not in text
    rows = {r["subject"]: r for r in csv.DictReader(open(out / "scans.csv"))}   # ids: the file names' stems
    assert len(rows) == 4 and rows["sub-b_t2"]["status"].startswith("refused") and rows["sub-c_flair"]["status"].startswith("refused")
    assert rows["sub-a_t2"]["status"] == rows["sub-d_t2"]["status"] == "scored" and 0 <= float(rows["sub-a_t2"]["flagged_fraction"]) <= 1
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["sub-a_t2_anomaly.nii.gz", "sub-d_t2_anomaly.nii.gz"]
    m = nib.load(str(out / "maps" / "sub-a_t2_anomaly.nii.gz"))
    assert m.shape == made["other"].shape and np.allclose(m.affine, made["other"].affine)   # its own grid and affine
    assert np.asarray(m.dataobj).max() > 0
    k = nib.load(str(out / "masks" / "sub-a_t2_mask.nii.gz"))
    assert k.shape == m.shape and set(np.unique(np.asarray(k.dataobj))) <= {0, 1}
    assert not (out / "metrics.json").exists()                        # no labels given: no metrics
    assert "voxel size" in rows["sub-a_t2"]["warnings"] and rows["sub-d_t2"]["warnings"] == ""
    assert int(rows["sub-a_t2"]["healthy_n"]) >= 1 and 0 <= float(rows["sub-a_t2"]["healthy_percentile"]) <= 100
    reports = sorted(p.name for p in (out / "reports").iterdir())
    assert reports == ["index.html", "sub-a_t2.html", "sub-a_t2.npz", "sub-a_t2.png", "sub-d_t2.html", "sub-d_t2.npz", "sub-d_t2.png"]
    index = (out / "reports" / "index.html").read_text()
    assert "sub-a_t2.html" in index and "refused: " in index and "not a diagnosis" in index
    assert main(["score", str(run), str(tmp_path / "scans"), "--images", "*_t2.nii.gz", "--model", "vae", "--out", str(out)]) == 2


def test_score_with_labels_writes_metrics(run, bench, tmp_path):
    root = bench / "BraTS2020/MICCAI_BraTS2020_TrainingData"
    r = score_scans(run, "vae", f"nifti:{root},images=*/*_t2.nii.gz,labels=*/*_seg.nii.gz", tmp_path / "s", progress=False)
    assert r["n_scored"] == len(list(root.glob("*/*_t2.nii.gz"))) and r["threshold"] is not None
    import json
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert 0 < m["prevalence"] < 0.2 and m["auroc"] > 0.5


def test_score_refuses_unknown_models_and_single_files_work(run, bench, tmp_path, capsys):
    f = next((bench / "BraTS2020/MICCAI_BraTS2020_TrainingData").glob("*/*_t2.nii.gz"))
    assert main(["score", str(run), str(f), "--model", "ae", "--out", str(tmp_path / "x")]) == 2
    assert "model must be one of the run's models" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["score", str(run), str(f), "--model", "vae", "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    assert len(list((tmp_path / "one" / "maps").iterdir())) == 1
    assert main(["score", str(run), str(f), "--model", "vae", "--out", str(tmp_path / "one"), "--no-progress", "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []   # no temporary or old folder left


def test_runs_lists_the_run(run, capsys):
    assert main(["runs", str(run.parent)]) == 0
    out = capsys.readouterr().out
    assert "quickstart" in out and "vae" in out and "complete" in out


def test_scoring_the_runs_own_test_scans_gives_the_runs_subject_scores(run, bench, tmp_path):
    "The weights, recipe, map and post-processing are the run's: its own test scans score as in subject_scores.csv."
    import json, shutil, torch
    copy = tmp_path / "run"; shutil.copytree(run, copy)
    last = torch.load(copy / "models/vae/last.pt", weights_only=False)
    assert not last["early_stop"]["stopped"]                          # the run ran to the end: it evaluated last.pt's weights
    best = dict(last); best["model"] = {k: torch.zeros_like(v) for k, v in last["model"].items()}
    torch.save(best, copy / "models/vae/best.pt")                     # a best.pt that differs: loading it would change every score
    test = json.loads((run / "config.json").read_text())["data"]["test"]
    score_scans(copy, "vae", test, tmp_path / "s", progress=False)
    got = {r["subject"]: float(r["score_mean"]) for r in csv.DictReader(open(tmp_path / "s" / "scans.csv"))}
    want = {r["subject"]: float(r["score_mean"]) for r in csv.DictReader(open(run / "subject_scores.csv"))}
    assert got.keys() == want.keys() and len(got) >= 2
    assert all(abs(got[k] - want[k]) <= 5e-5 for k in got), (got, want)   # subject_scores.csv has 4 decimals


def test_a_run_records_its_training_grid_and_healthy_scores(run):
    import json
    grid = json.loads((run / "metrics.json").read_text())["data"]["train_grid"]
    assert grid["orientations"] and grid["voxel_mm_min"] == grid["voxel_mm_max"] == [2.0, 2.0, 2.0]   # the smoke benchmark: 2 mm
    h = list(csv.DictReader(open(run / "healthy_scores.csv")))
    assert h and {r["model"] for r in h} == {"vae"} and all(float(r["score_mean"]) >= 0 for r in h)
