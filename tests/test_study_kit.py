"""The study kit: data sources for every role, evaluation options, refusal before any work, and the items found
when the project was tried as a new user would (issue 10)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from uad_study.benchmark import benchmark_subjects, ensure_benchmark
from uad_study.cli import main
from uad_study.core import UADInputError
from uad_study.preprocess import build_slices, get_recipe
from uad_study.study import (EVAL_SPACES, config_parts, make_config, parameters_cell, parse_source, run_study,
                             select_subjects, validate_config)
from uad_study.study_quickstart import SPEC as QUICK
from uad_study.study_trivae import SPEC as TRIVAE
from uad_study.study_reversed import SPEC as REVERSED
from uad_study.study_thesis import SPEC as THESIS
from uad_study.study_ssae import SPEC as SSAE_SPEC
from uad_study.study_arch import SPEC as ARCH_SPEC

ROOT = Path(__file__).resolve().parents[1]
CHAPTER_SPECS = [("20_study_quickstart", QUICK), ("21_study_trivae", TRIVAE), ("22_study_reversed", REVERSED), ("23_study_thesis", THESIS),
                 ("24_study_ssae", SSAE_SPEC), ("25_study_arch", ARCH_SPEC)]
FAST = dict(epochs=1, models=("ae",), n_example_subjects=1)


@pytest.fixture(scope="module")
def bench():
    return ensure_benchmark("smoke", progress=False)


@pytest.fixture(scope="module")
def nifti_folder(bench, tmp_path_factory):
    "A user's own NIfTI folder: the benchmark's glioma test subjects under other names, multi-class labels {0,1,2,4}."
    d = tmp_path_factory.mktemp("mine")
    for i, r in enumerate(benchmark_subjects(bench, "glioma", "test")):
        shutil.copy(r["t2"], d / f"sub-{i:02d}_T2w.nii.gz")
        shutil.copy(r["label"], d / f"sub-{i:02d}_lesion.nii.gz")
    return d


def _quick(tmp_path, **kw):
    return make_config(QUICK, "smoke", out_dir=str(tmp_path / "run"), **{**FAST, **kw})


def test_sources_parse_and_refuse(tmp_path):
    assert str(parse_source("nifti:/tmp,images=*_t2.nii.gz,labels=*_seg.nii.gz")).startswith("nifti:/tmp")
    for bad, rule in (("benchmark:nope", "preset must be one of"), ("mri:/x", "kind must be one of"),
                      ("ixi", "needs a folder"), (f"ixi:{tmp_path}/none", "does not exist"),
                      (f"nifti:{tmp_path},color=red", "KEY=VALUE"), (f"ixi:{tmp_path},split=nope", "no split definition")):
        with pytest.raises(UADInputError, match=rule): parse_source(bad)


def test_benchmark_split_and_classes(bench, tmp_path):
    cfg = _quick(tmp_path, test="benchmark:smoke:ms+infarct", val_anomalous="benchmark:smoke:glioma")
    d = select_subjects(cfg, validate_config(QUICK, cfg), progress=False)
    ids = lambda cls, split: {r["layout_id"].split("-")[0] if cls == "healthy" else r["layout_id"]
                              for r in benchmark_subjects(bench, cls, split)}
    assert {s.id for s in d["train"]} == ids("healthy", "train") and {s.id for s in d["val"]} == ids("healthy", "val")
    assert {s.id for s in d["test"]} == ids("ms", "test") | ids("infarct", "test")
    assert {s.id for s in d["val_anomalous"]} == ids("glioma", "val")      # anomalous validation: the class's val split


def test_sources_joined_by_semicolon_pool_their_subjects(bench, tmp_path):
    "Several sources for one role ('a;b') give the subjects of each, once; repeated ids are refused."
    one = _quick(tmp_path, test="benchmark:smoke:ms+infarct")
    two = _quick(tmp_path, test="benchmark:smoke:ms;benchmark:smoke:infarct")
    a = select_subjects(one, validate_config(QUICK, one), progress=False)
    b = select_subjects(two, validate_config(QUICK, two), progress=False)
    assert sorted(s.id for s in b["test"]) == sorted(s.id for s in a["test"]) and len(b["test"]) == 4
    assert " + " in b["info"]["roles"]["test"]["source"] and len(b["info"]["roles"]["test"]["parts"]) == 2
    assert b["info"]["roles"]["test"]["spec"] == "benchmark:smoke:ms;benchmark:smoke:infarct"
    bad = _quick(tmp_path, test="benchmark:smoke:ms;benchmark:smoke:ms")
    with pytest.raises(UADInputError, match="must not share subject ids"):
        select_subjects(bad, validate_config(QUICK, bad), progress=False)


def test_nifti_glob_folder_as_test_source(nifti_folder, tmp_path):
    "Every study accepts a user's NIfTI folder by globs as its test source; maps come back on each input's grid."
    src = f"nifti:{nifti_folder},images=*_T2w.nii.gz,labels=*_lesion.nii.gz"
    r = run_study(QUICK, _quick(tmp_path, test=src), progress=False)
    t = r["table"]
    assert len(t) and t["auroc"].between(0, 1).all() and (t["space"] == "brain").all()
    maps = sorted((r["out_dir"] / "maps" / "ae").glob("*_anomaly.nii.gz"))
    assert [m.name for m in maps] == ["sub-00_anomaly.nii.gz", "sub-01_anomaly.nii.gz"]
    a, b = nib.load(maps[0]), nib.load(nifti_folder / "sub-00_T2w.nii.gz")
    assert a.shape == b.shape and np.allclose(a.affine, b.affine)
    assert json.loads((r["out_dir"] / "config.json").read_text())["sources"]["test"] == str(parse_source(src))
    c = make_config(TRIVAE, "smoke", out_dir=str(tmp_path / "tri"), test=src, models=("dae-coarse",), epochs=1,
                    n_example_subjects=1)
    rt = run_study(TRIVAE, c, progress=False)
    assert len(rt["table"]) and (rt["out_dir"] / "table1.csv").is_file()


def test_unlabelled_test_folder_gets_maps_and_scores(nifti_folder, tmp_path, capsys):
    src = f"nifti:{nifti_folder},images=*_T2w.nii.gz"
    r = run_study(QUICK, _quick(tmp_path, test=src), progress=False)
    assert "no lesion labels" in capsys.readouterr().out
    assert r["table"].empty
    assert len(list((r["out_dir"] / "maps" / "ae").glob("*.nii.gz"))) == 2
    s = pd.read_csv(r["out_dir"] / "subject_scores.csv")
    assert len(s) == 2 and (s["score_mean"] >= 0).all()


def test_evaluation_space_is_named_and_changes_the_pool(tmp_path):
    rb = run_study(QUICK, _quick(tmp_path / "b"), progress=False)
    rs = run_study(QUICK, _quick(tmp_path / "s", space="slices"), progress=False)
    nb_, ns = rb["table"]["n_voxels"].iloc[0], rs["table"]["n_voxels"].iloc[0]
    assert nb_ < 0.6 * ns                                   # most pixels of a slice are background
    cfg = json.loads((rb["out_dir"] / "config.json").read_text())
    assert cfg["eval"]["space"] == "brain" and cfg["protocols"]["evaluation_space_rule"] == EVAL_SPACES["brain"]
    assert (rs["table"]["space"] == "slices").all()


def test_val_greedy_and_fixed_protocols(tmp_path):
    r = run_study(QUICK, _quick(tmp_path, val_anomalous="benchmark:smoke:glioma",
                                protocols=("test_best", "val_greedy", "fixed"), fixed_threshold=0.2), progress=False)
    t = r["table"]
    assert set(t["protocol"]) == {"test_best", "val_greedy", "fixed"}
    assert (t[t["protocol"] == "fixed"]["threshold"] == 0.2).all()
    m = json.loads((r["out_dir"] / "metrics.json").read_text())
    assert "anomalous validation" in m["protocols"]["val_greedy"]["validation_scans"]
    with pytest.raises(UADInputError, match="val_greedy protocol needs"):
        validate_config(QUICK, _quick(tmp_path, protocols=("val_greedy",)))


def test_tables_have_four_decimals(tmp_path):
    r = run_study(QUICK, _quick(tmp_path), progress=False)
    text = (r["out_dir"] / "metrics.csv").read_text()
    assert not re.search(r"\d\.\d{5,}", text), "metrics.csv must print 4 decimals"


def test_data_order_independent_of_worker_count(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("UAD_STUDY_DATA", str(tmp_path))     # separate caches for the two runs
    from uad_study.datasets import find_subjects
    subs = find_subjects(bench / "BraTS2020", "brats", modalities=("t2",))[1]
    a = build_slices(subs, get_recipe("quickstart-v1", resolution=32), n_jobs=1, progress=False, cache=tmp_path / "a")
    b = build_slices(subs, get_recipe("quickstart-v1", resolution=32), n_jobs=2, progress=False, cache=tmp_path / "b")
    assert np.array_equal(np.asarray(a.slices), np.asarray(b.slices)) and np.array_equal(np.asarray(a.labels), np.asarray(b.labels))


# ---- found when the project was tried as a new user would --------------------------------------------------------

def test_false_provenance_fails_loudly(bench, tmp_path):
    "A data source given is used (recorded, and the subjects come from it) or refused; never silently replaced."
    out = tmp_path / "run"
    assert main(["demo", "--profile", "smoke", "--ixi-root", str(bench / "IXI"), "--epochs", "1", "--models", "ae",
                 "--out", str(out), "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sources"]["train"] == f"ixi:{bench / 'IXI'}" and cfg["data"]["train"] == f"ixi:{bench / 'IXI'}"
    split = pd.read_csv(out / "split.csv")
    assert split[split["split"] == "train"]["image"].str.startswith(str(bench / "IXI")).all()
    assert main(["demo", "--profile", "smoke", "--ixi-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2")]) == 2
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("args,rule", [(["--epochs", "0"], "epochs must be >= 1"), (["--epochs", "-1"], "epochs must be >= 1"),
                                       (["--resolution", "30"], "divisible"), (["--lr", "0"], "lr must be > 0")])
def test_bad_options_refused_before_any_work(tmp_path, capsys, args, rule):
    out = tmp_path / "run"
    assert main(["demo", "--profile", "smoke", "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and rule in err[0]
    assert not out.exists()                                     # nothing left behind


def test_trivae_resolution_refused_before_any_work(tmp_path, capsys):
    assert main(["trivae", "--resolution", "48", "--out", str(tmp_path / "t"), "--no-progress"]) == 2
    assert "multiple of 32" in capsys.readouterr().err and not (tmp_path / "t").exists()


def test_ctrl_c_says_how_to_continue(tmp_path, capsys, monkeypatch):
    import uad_study.study as study
    def interrupted(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(study, "run_study", interrupted)
    assert main(["demo", "--profile", "smoke", "--out", str(tmp_path / "r"), "--overwrite"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and "--resume" in err[0] and "--overwrite" not in err[0]


def test_make_smoke_keeps_finished_work():
    smoke = next(l for l in (ROOT / "Makefile").read_text().splitlines() if "--profile smoke" in l)
    assert "--overwrite" not in smoke and "--resume" in smoke


def test_resume_with_another_config_names_keys_and_values(tmp_path):
    cfg = _quick(tmp_path)
    run_study(QUICK, cfg, progress=False)
    with pytest.raises(UADInputError) as e:
        run_study(QUICK, _quick(tmp_path, lr=2e-3), resume=True, progress=False)
    assert "train.lr: 0.001 -> 0.002" in str(e.value)


@pytest.mark.parametrize("nb,spec", CHAPTER_SPECS)
def test_chapter_parameters_are_generated_from_the_config(nb, spec):
    cells = json.loads((ROOT / "nbs" / f"{nb}.ipynb").read_text())["cells"]
    cell = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    assert "".join(cell["source"]).strip() == parameters_cell(spec).strip()


@pytest.mark.parametrize("nb,spec", CHAPTER_SPECS)
def test_parameter_shadowed_by_an_import_is_named(nb, spec):
    "A chapter that imports a function under a parameter's name gets a clear error, not a TypeError deep in a run."
    from uad_study.study import config_from_parameters
    name = [f.name for f in __import__("dataclasses").fields(spec.config_cls)][3]
    with pytest.raises(UADInputError, match="shadowed") as e: config_from_parameters(spec, {"profile": "smoke", name: print})
    assert name in str(e.value)


@pytest.mark.parametrize("nb,spec", CHAPTER_SPECS)
def test_papermill_help_shows_every_parameter(nb, spec):
    import dataclasses
    p = subprocess.run([str(Path(sys.executable).parent / "papermill"), "--help-notebook", str(ROOT / "nbs" / f"{nb}.ipynb")],
                       capture_output=True, text=True)
    out = p.stdout + p.stderr
    assert "Unable to parse" not in out
    for f in dataclasses.fields(spec.config_cls): assert f"  {f.name}:" in out, f.name


def test_config_json_is_composed_of_parts(tmp_path):
    cfg = _quick(tmp_path)
    assert set(config_parts(cfg)) == {"run", "data", "train", "eval", "model"}
    r = run_study(QUICK, cfg, progress=False)
    c = json.loads((r["out_dir"] / "config.json").read_text())
    assert c["train"]["epochs"] == 1 and c["data"]["test"] == "benchmark:smoke:glioma" and c["model"]["models"] == ["ae"]
    assert c["training_detail"]["ae"]["epochs"] == 1


def test_cli_options_generated_with_help():
    out = subprocess.run([str(Path(sys.executable).parent / "uad-study"), "trivae", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for opt in ("--train", "--test", "--val-anomalous", "--space", "--protocols", "--postprocess", "--trivae-channels",
                "--tsne-perplexity", "--early-stop-patience", "--resume", "--ixi-root"):
        assert opt in out, opt
    assert "paper: 64 128 256 512 512" in " ".join(out.split())        # each option lists the profiles' values


def test_no_matplotlib_use_in_the_library():
    for f in (ROOT / "uad_study").rglob("*.py"):
        assert "matplotlib.use(" not in f.read_text(), f


def test_registry_maps_may_use_the_model(monkeypatch):
    "An ANOMALY_MAPS entry that takes `model` is given the trained model by the runner's scoring (pyramids, likelihood masks)."
    import torch
    from uad_study import scores
    from uad_study.models.baselines import build_model
    from uad_study.study import score_slices
    seen = {}
    def uses_model(x, x_hat, model=None, **kw):
        seen["model"] = model
        return np.abs(np.asarray(x) - np.asarray(x_hat))
    monkeypatch.setitem(scores.ANOMALY_MAPS, "toy_model_map", uses_model)
    torch.manual_seed(0)
    m = build_model("ae", in_size=16, channels=(8, 16), latent_dim=4)
    x = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    x_hat, maps = score_slices(m, x, "toy_model_map", device="cpu")
    assert seen["model"] is m and maps.shape == (3, 16, 16) and np.allclose(maps, np.abs(x - x_hat))
    assert scores.describe_map("toy_model_map", model=m)["params"] == {}


def test_example_figures_name_model_postprocessing_and_protocol(tmp_path, monkeypatch):
    import uad_study.study as kit
    titles, real = [], kit.plot_panels
    def spy(rows, path, **kw):
        titles.append(kw.get("title", "")); return real(rows, path, **kw)
    monkeypatch.setattr(kit, "plot_panels", spy)
    run_study(QUICK, _quick(tmp_path), progress=False)
    assert titles and all(t.startswith("ae: map absolute, post-processing trivae, threshold test_best (") for t in titles), titles


def test_map_ablation_needs_its_weights_first_and_its_own_map():
    "A model that reuses another's weights (ModelSpec.weights_of) must come after it; each model's map is its own."
    from uad_study.study import map_name
    from uad_study.study_reversed import SPEC, reversed_config
    with pytest.raises(UADInputError, match="list that model before it"):
        validate_config(SPEC, reversed_config("smoke", models=("ra-no-pl", "ra")))
    cfg = reversed_config("smoke", models=("ra", "ra-no-pl"))
    validate_config(SPEC, cfg)
    assert [map_name(SPEC.models[m], cfg) for m in ("ra", "ra-no-pl", "si-vae")] == ["reversed_ae", "clahe_absolute", "absolute"]
