"The uad-study console script: help texts and clear errors."
import subprocess
import sys
from pathlib import Path

import pytest

from uad_study.cli import build_parser, main

BIN = Path(sys.executable).parent / "uad-study"


def test_console_script_help():
    out = subprocess.run([str(BIN), "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out and "phantom" in out and "Examples" in out
    out = subprocess.run([str(BIN), "demo", "--help"], capture_output=True, text=True, check=True).stdout
    for opt in ("--profile", "--out", "--epochs", "--resolution", "--seed", "--resume", "--overwrite", "--ixi-root",
                "--train", "--val", "--test", "--modality", "--space", "--protocols"):
        assert opt in out


def test_resume_and_overwrite_are_exclusive():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--resume", "--overwrite"])


def test_bad_data_root_is_a_one_line_error(tmp_path, capsys):
    rc = main(["demo", "--profile", "smoke", "--ixi-root", str(tmp_path / "nowhere"), "--brats-root", str(tmp_path),
               "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "train source: dataset folder does not exist" in err and "nowhere" in err
    assert not (tmp_path / "run").exists()


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"; run.mkdir(); (run / "keep.txt").write_text("mine")
    rc = main(["demo", "--profile", "smoke", "--out", str(run), "--no-progress"])
    assert rc == 2 and "pass resume=True" in capsys.readouterr().err
    assert (run / "keep.txt").read_text() == "mine"


def test_data_check_help():
    out = subprocess.run([str(BIN), "data", "check", "--help"], capture_output=True, text=True, check=True).stdout
    for opt in ("--dataset", "--images", "--labels", "--masks", "--modalities", "--label-values", "--annotations", "Examples"):
        assert opt in out


def test_data_check_missing_folder_exits_nonzero(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: dataset root must be a folder" in capsys.readouterr().out


def test_benchmark_presets_match_the_generator():
    "--preset offers exactly the generator's presets (the list is kept in the CLI so --help stays light)."
    from uad_study.benchmark import PRESET_NAMES
    from uad_study.cli import BENCHMARK_PRESETS
    assert tuple(BENCHMARK_PRESETS) == tuple(PRESET_NAMES)
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    preset = next(a for a in sub.choices["benchmark"]._actions if a.dest == "preset")
    assert list(preset.choices) == list(PRESET_NAMES)


def _run_folder(d: Path, study: str, models: tuple, results: list | None) -> Path:
    "A hand-made run folder: config.json, weights for each model, metrics.json when `results` is given."
    import json
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"study": study, "run": {"profile": "cpu"}, "model": {"models": list(models)},
                                               "data": {"train": "ixi:/data/IXI", "test": "brats:/data/BraTS"}}))
    for m in models: (d / "models" / m).mkdir(parents=True); (d / "models" / m / "last.pt").write_bytes(b"")
    if results is not None: (d / "metrics.json").write_text(json.dumps({"results": results}))
    return d


def test_runs_lists_runs_with_their_key_metrics(tmp_path, capsys, monkeypatch):
    res = [dict(model="ae", postprocess="mask_only", protocol="healthy_fpr", auroc=0.75, auprc=0.125, dice=0.25)]
    _run_folder(tmp_path / "runs" / "trivae-cpu", "trivae", ("ae",), res)
    _run_folder(tmp_path / "runs" / "old" / "arch-cpu", "arch", ("vqvae", "ra"), None)   # still training
    monkeypatch.chdir(tmp_path)
    assert main(["runs"]) == 0
    out = capsys.readouterr().out
    assert "trivae" in out and "0.7500" in out and "0.1250" in out and "healthy_fpr" in out and "runs/trivae-cpu" in out
    assert "training (2/2 models have weights)" in out and sum(" arch " in l for l in out.splitlines()) == 2  # a row per model
    assert main(["runs", "--csv", "t.csv"]) == 0 and (tmp_path / "t.csv").read_text().count("\n") == 4
    assert main(["runs", "--csv", "t.csv"]) == 2                                    # an existing file is not replaced
    assert "overwrite" in capsys.readouterr().err
    assert main(["runs", "--csv", "t.csv", "--overwrite"]) == 0


def test_runs_on_an_empty_folder(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 0 and "no run folders" in capsys.readouterr().out
