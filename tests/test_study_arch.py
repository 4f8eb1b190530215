"The architecture-comparison chapter's declarations: Table 1 settings per model, rules, claims, the shared VQ-VAE stage."
import numpy as np
import pandas as pd
import pytest
import torch

from uad_study.core import UADInputError
from uad_study.study import model_train_overrides, train_config, validate_config
from uad_study.study_arch import (MODELS, PAPER_TRAIN, SPEC, arch_config, code_grid, healthy_sets, model_training,
                                  paper_claims, run_arch_study, study_model, tr_epochs)


def test_table1_settings_per_model():
    c = arch_config("cpu")
    ra, swin, vq, tr = (train_config(c, **model_training(f, c)) for f in ("ra", "swin-mae", "vqvae", "vqvae-tr"))
    assert (ra.batch_size, swin.batch_size, vq.batch_size, tr.batch_size) == (8, 32, 32, 4)
    assert ra.lr == pytest.approx(2e-4 * c.lr_scale) and ra.schedule == "cosine" and ra.min_lr == pytest.approx(1e-6 * c.lr_scale)
    assert swin.lr == pytest.approx(1e-3) and swin.schedule == "cosine" and swin.warmup_epochs == pytest.approx(0.01 * c.epochs)
    assert vq.schedule == "constant" and vq.lr == pytest.approx(5e-4) and tr.lr == pytest.approx(1e-4)
    assert tr.epochs == c.epochs // 2 == tr_epochs(c) and vq.epochs == c.epochs          # Table 1: 500 vs 1000 epochs
    assert train_config(arch_config("cpu", tr_epochs=3), **model_training("vqvae-tr", c)).epochs == c.epochs // 2
    assert tr_epochs(arch_config("cpu", tr_epochs=3)) == 3
    # the recorded training of each row is what it trains with (config.json's training_detail)
    assert model_train_overrides(MODELS["ra"], c) == model_training("ra", c)
    assert model_train_overrides(MODELS["ra-l1"], c) == model_training("ra", c)
    assert {f: p["batch_size"] for f, p in PAPER_TRAIN.items()} == {"vqvae": 32, "swin-mae": 32, "ra": 8, "vqvae-tr": 4}


def test_rows_and_stages():
    assert MODELS["vqvae-l1"].weights_of == "vqvae" and MODELS["vqvae"].weights_of == ""
    assert MODELS["vqvae-tr"].fit is not None and MODELS["vqvae-tr-l1"].fit is None
    c = arch_config("smoke")
    m = study_model("vqvae-tr", c)
    assert m.transformer.seq_len == np.prod(code_grid(c))


def test_rules():
    assert healthy_sets(arch_config("cpu")) == {"shifted": "benchmark:hard:healthy"}
    for bad, msg in [(dict(healthy_sets=("shifted",)), "NAME=SOURCE"), (dict(resolution=40), "Swin-MAE"),
                     (dict(swin_test_masking="some"), "swin_test_masking"), (dict(tr_threshold=1.5), "tr_threshold"),
                     (dict(lr_scale=0.0), "lr_scale")]:
        with pytest.raises(UADInputError, match=msg): validate_config(SPEC, arch_config("smoke", **bad))
    with pytest.raises(UADInputError, match="real data"):
        validate_config(SPEC, arch_config("paper", train="benchmark:smoke", test="benchmark:smoke:shapes"))


def _t2(ssim, auroc, auprc):
    names = ["VQ-VAE", "Swin-MAE", "Reverse AE", "VQ-VAE + Transformers"]
    paper = [{"source": "paper: x", "method": n} for n in names]
    ours = [{"source": "uad_study cpu", "method": n, "ssim_val": s, "synthetic_auroc": a, "synthetic_auprc": p}
            for n, s, a, p in zip(names, ssim, auroc, auprc)]
    return pd.DataFrame(paper + ours)


def test_claims_follow_the_numbers():
    ok = paper_claims(_t2([0.96, 0.84, 0.63, 0.93], [0.80, 0.88, 0.95, 0.94], [0.28, 0.38, 0.67, 0.74])).set_index("claim")
    assert ok["holds"].all()
    bad = paper_claims(_t2([0.90, 0.95, 0.97, 0.93], [0.99, 0.88, 0.95, 0.94], [0.28, 0.38, 0.80, 0.74])).set_index("claim")
    assert not bad["holds"].any()
    assert bad.loc["VQ-VAE: best healthy SSIM", "value"] == pytest.approx(0.90)
    assert bad.loc["VQ-VAE: best healthy SSIM", "compared_with"] == pytest.approx(0.97)
    assert paper_claims(_t2([0.9] * 4, [0.5] * 4, [0.1] * 4).iloc[:6]).empty          # a missing row: no verdict


@pytest.mark.slow
def test_transformer_reuses_the_vqvae_row(tmp_path):
    "vqvae-tr trains no VQ-VAE of its own: its stage 1 is the vqvae row's checkpoint, weights identical."
    cfg = arch_config("smoke", models=("vqvae", "vqvae-tr"), epochs=1, tr_epochs=1, out_dir=str(tmp_path / "run"))
    r = run_arch_study(cfg, progress=False)
    models = tmp_path / "run" / "models"
    assert (models / "vqvae" / "last.pt").is_file() and not (models / "vqvae-tr" / "vqvae").exists()
    a, b = r["context"].models["vqvae"].state_dict(), r["context"].models["vqvae-tr"].vqvae.state_dict()
    assert all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
    h = r["histories"]["vqvae-tr"]
    assert [row["stage"] for row in h] == [1, 2]
    # uad-study score loads the two-stage model from its own layout (ModelSpec.load): the weights the run evaluated
    from uad_study.runs import load_run_model, score_scans
    model = load_run_model(tmp_path / "run", "vqvae-tr")[0]
    got, want = model.state_dict(), r["context"].models["vqvae-tr"].state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k].cpu(), want[k].cpu()) for k in want)
    s = score_scans(tmp_path / "run", "vqvae-tr", cfg.test, tmp_path / "scored", progress=False)
    assert s["n_scored"] == len(r["context"].data["test"]) and len(list((tmp_path / "scored" / "maps").iterdir())) == s["n_scored"]
