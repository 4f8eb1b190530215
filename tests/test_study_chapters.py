"Every study chapter runs headless under papermill with its smoke profile, and its run folder is complete."
import json, os
from pathlib import Path

import pytest

from uad_study.docsite import executed_meta, execute_study_nb, notebook_key

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "nbs").glob("2[0-9]_study_*.ipynb"))


def test_there_are_study_chapters():
    assert CHAPTERS, "no study chapter found in nbs/"


@pytest.mark.slow
@pytest.mark.parametrize("nb", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_smoke(nb, tmp_path):
    # the executed notebook and its run folder go where the docs site reads them when `make test` says so
    # (UAD_DOCS_EXECUTED=docs/_build/executed): the site's study pages show this very run
    where = Path(os.environ.get("UAD_DOCS_EXECUTED") or tmp_path)
    executed, out_dir = where / nb.name, where / "runs" / nb.stem
    execute_study_nb(nb, executed, profile="smoke")
    assert executed_meta(executed)["key"] == notebook_key(nb, extra="smoke ")
    for f in ("config.json", "metrics.json", "metrics.csv"):
        assert (out_dir / f).is_file(), f"{nb.name}: {f} missing from the run folder"
    assert list((out_dir / "figures").glob("*.png")), f"{nb.name}: no figures written"
    m = json.loads((out_dir / "metrics.json").read_text())
    assert m["protocols"] and m["results"]
    assert all(r["protocol"] in m["protocols"] for r in m["results"]), "every number names its protocol"
    done = json.loads(executed.read_text())
    streams = [o for c in done["cells"] for o in c.get("outputs", []) if o["output_type"] == "stream"]
    assert not any("it/s]" in "".join(o["text"]) or "TqdmWarning" in "".join(o["text"]) for o in streams), "progress noise"
    assert len(streams) <= 5, [("".join(o["text"]))[:200] for o in streams]
    curves = [c for c in done["cells"] if "plot_training_curves(" in "".join(c["source"])]
    assert curves and any("image/png" in o.get("data", {}) for o in curves[0]["outputs"]), "training curves not shown"


def test_quickstart_smoke_outputs(tmp_path):
    "The quickstart run folder: maps on the input grid, metrics with prevalence, and detection above chance."
    import nibabel as nib
    import numpy as np
    from uad_study.study_quickstart import quickstart_config, run_quickstart
    r = run_quickstart(quickstart_config("smoke", out_dir=str(tmp_path / "q")), progress=False)
    out = r["out_dir"]
    res = json.loads((out / "metrics.json").read_text())["results"]
    for row in res:
        assert 0 < row["prevalence"] < 0.1 and row["space"] == "brain"
        assert row["auprc"] > 1.1 * row["prevalence"], row   # no row at chance (a model that learned nothing scores near prevalence)
        assert row["protocol"] in ("test_best", "healthy_fpr")
    # every model clearly above chance with at least one post-processing: after 8 smoke epochs the dense AE's map is
    # weak, and the Tri-VAE post-processing (median filter) can cost it a third of its AUPRC; how much depends on the
    # CPU's float kernels (1.43x prevalence on an AMD EPYC without AVX-512, above 1.5x on the AVX-512 Xeon)
    for model in {r["model"] for r in res}:
        assert max(r["auprc"] / r["prevalence"] for r in res if r["model"] == model) > 1.5, (model, res)
    assert max(r["auprc"] / r["prevalence"] for r in res) > 4   # the better model clearly above chance after 8 epochs
    fpr = [r for r in res if r["protocol"] == "healthy_fpr"]
    assert fpr and all(r["fpr"] < 0.2 for r in fpr)   # calibrated at 5% on healthy scans: test FPR stays low
    cfg = json.loads((out / "config.json").read_text())
    assert [s["step"] for s in cfg["postprocessing"]["trivae"]][:2] == ["mask", "threshold"]
    assert cfg["preprocessing"][2]["step"] == "normalise"
    for model in ("ae", "vae"):
        maps = sorted((out / "maps" / model).glob("*_anomaly.nii.gz"))
        assert len(maps) == r["summary"]["data"]["n_test_subjects"]
        sub = maps[0].name.replace("_anomaly.nii.gz", "")
        img = next(Path(r["summary"]["data"]["roles"]["test"]["root"]).rglob(f"{sub}_t2.nii.gz"))
        a, b = nib.load(maps[0]), nib.load(img)
        assert a.shape == b.shape and np.allclose(a.affine, b.affine)
        assert np.asarray(a.dataobj).max() > 0
    for f in ("pr_curves.png", "pr_curves.csv", "examples_vae.png", "examples_vae.npz", "training_curves.png", "training_curves.csv"):
        assert (out / "figures" / f).is_file()
