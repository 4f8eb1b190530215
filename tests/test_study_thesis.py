"The thesis runner's own rules: the model grid, per-lesion-set detection and pixel rows, the claims, and maps written back through the recipe's padding and rescaling."
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import write_slice_set
from uad_study.core import UADInputError
from uad_study.io import Subject
from uad_study.models.base import check_model
from uad_study.preprocess import SliceRecipe, build_slices
from uad_study.study import subject_volumes, validate_config, write_maps
from uad_study.study_thesis import (MODEL_SPECS, PAPER_ROWS, SPEC, detection_rows, lesion_names, model_name, paper_claims,
                                    pixel_rows, study_model, thesis_config)

R = 16


def _subject(lesion_slices=(), n=3):
    "n 16x16 slices, brain everywhere; a 4x4 lesion on each slice of `lesion_slices`."
    x, m, y = np.zeros((n, R, R)), np.ones((n, R, R), bool), np.zeros((n, R, R), bool)
    for k in lesion_slices: y[k, 4:8, 4:8] = True
    return x, m, y


def test_grid_names_and_the_thesis_rows():
    assert model_name("vae", 128) == "vae-128" and model_name("vqgan", 64, 128) == "vqgan-d64-k128"
    assert set(PAPER_ROWS) <= set(MODEL_SPECS) and len(MODEL_SPECS) == 4 + 16 + 9
    assert MODEL_SPECS["vqvae-d256-k64"] == ("vqvae", 256, 64)           # dimension 256, 64 codes (the thesis' "256 64")
    assert lesion_names(thesis_config("cpu")) == {"glioma": "BraTS19", "infarct": "ATLAS"}
    with pytest.raises(UADInputError, match="GROUP=DATASET"):
        validate_config(SPEC, thesis_config("smoke", lesion_names=("glioma=BraTS",)))     # BraTS is not a thesis dataset name


@pytest.mark.parametrize("profile", ["smoke", "cpu"])
def test_profile_models_follow_the_model_protocol(profile):
    cfg = thesis_config(profile)
    x = torch.rand(2, 1, cfg.resolution, cfg.resolution)
    for m in cfg.models:
        torch.manual_seed(0)
        assert check_model(study_model(m, cfg), x)["recon"] == tuple(x.shape), m


def test_detection_rows_per_lesion_set_by_hand(tmp_path):
    "Sample scores are the mean of slice errors; each lesion set is compared with the healthy subjects only."
    subs = [_subject(), _subject(), _subject([0]), _subject([1]), _subject([2])]
    ss = write_slice_set(tmp_path / "ss", subs)
    per_slice = [(.1, .1, .1), (.2, .2, .2), (.5, .1, .1), (.15, .15, .15), (.05, .05, .05)]
    err = np.concatenate([np.ones((3, R, R)) * np.asarray(e)[:, None, None] for e in per_slice]).astype(np.float32)
    groups = ["healthy", "healthy", "glioma", "glioma", "infarct"]
    rows = {(r["level"], r["lesion_set"]): r for r in detection_rows(ss, err, groups)}
    # samples: healthy .1, .2; glioma .2333, .15 -> 3 of 4 pairs ordered; infarct .05 below both
    assert rows["sample", "glioma"]["auroc"] == pytest.approx(0.75) and rows["sample", "glioma"]["n"] == 4
    assert rows["sample", "infarct"]["auroc"] == pytest.approx(0.0)
    # glioma slices: positives .5 and .15, negatives .1 .1 .15 .15 -> (4 + 2 + 2 x 0.5) / 8
    assert rows["slice", "glioma"]["auroc"] == pytest.approx(7 / 8) and rows["slice", "glioma"]["n_anomalous"] == 2
    assert rows["slice", "infarct"]["auroc"] == pytest.approx(0.5)      # all slices tie


def test_pixel_rows_take_each_sets_own_validation_threshold(tmp_path):
    "Glioma maps: lesions 0.6 on a 0.35 background; infarct maps: lesions 0.3 on 0. No one threshold segments both sets."
    test = write_slice_set(tmp_path / "t", [_subject(), _subject([1]), _subject([0]), _subject([2])])
    val = write_slice_set(tmp_path / "v", [_subject([1]), _subject([1])])
    tg, vg = ["healthy", "glioma", "glioma", "infarct"], ["infarct", "glioma"]
    level = {"healthy": (0, 0), "glioma": (.35, .6), "infarct": (0, .3)}          # (background, lesion)

    def maps(ss, groups):
        y = np.asarray(ss.labels, np.float32); out = np.zeros_like(y)
        for i, g in enumerate(groups):
            r = ss.subject_range(i); out[r] = level[g][0] + (level[g][1] - level[g][0]) * y[r]
        return out
    rows = pixel_rows(test, maps(test, tg), tg, val, maps(val, vg), vg, "mask_only")
    r = {(x["lesion_set"], x["protocol"]): x for x in rows}
    assert set(r) == {("glioma", "val_greedy"), ("glioma", "test_best"), ("infarct", "val_greedy"), ("infarct", "test_best")}
    for c in ("glioma", "infarct"):
        assert r[c, "val_greedy"]["dice_t"] == pytest.approx(1.0) and r[c, "val_greedy"]["n_val"] == 1
        assert r[c, "test_best"]["dice_t"] == pytest.approx(1.0)
    assert r["glioma", "val_greedy"]["n_test"] == 2 and r["infarct", "val_greedy"]["n_test"] == 1
    assert 0.35 < r["glioma", "val_greedy"]["threshold"] <= 0.6 and 0 < r["infarct", "val_greedy"]["threshold"] <= 0.3
    no_val = pixel_rows(test, maps(test, tg), tg, None, None, [], "mask_only")
    assert {x["protocol"] for x in no_val} == {"test_best"}              # no validation subjects: no val_greedy row


def test_claims_by_hand():
    det = pd.DataFrame([{"run_model": m, "lesion_set": "glioma", "level": "sample", "auroc": a}
                        for m, a in (("vae-128", .6), ("vqvae-d256-k64", .7), ("vqgan-d64-k64", .8))])
    pix = pd.DataFrame([{"run_model": m, "lesion_set": "glioma", "protocol": "val_greedy", "postprocess": "thesis", "dice_t": d}
                        for m, d in (("vae-128", .3), ("vae-256", .2), ("vqvae-d256-k64", .25), ("vqgan-d64-k64", .4))])
    c = {r["claim"]: r for _, r in paper_claims(det, pix).iterrows()}
    assert c["VQ-VAE lowest pixel-wise DICE_T"]["holds"] is False        # 0.25 is above the VAE-256's 0.2
    assert (c["VQ-VAE lowest pixel-wise DICE_T"]["value"], c["VQ-VAE lowest pixel-wise DICE_T"]["others"]) == (.25, .2)
    assert c["VQ-GAN best sample-wise AUROC"]["holds"] is True
    assert c["larger VAE latent, higher DICE_T"]["holds"] is False        # 256 -> 0.2 < 128 -> 0.3
    one_vae = paper_claims(det, pix[pix["run_model"] != "vae-256"])
    assert one_vae.set_index("claim").loc["larger VAE latent, higher DICE_T", "holds"] is None


def test_maps_go_back_through_padding_and_rescaling(tmp_path, tmp_data):
    "thesis-v1 pads and halves the volume: the written map has the input's grid and its bright box where the input's is."
    v = np.zeros((30, 36, 20), np.float32); v[8:20, 10:26, 5:15] = 100
    img = tmp_path / "s0_t1.nii.gz"
    nib.save(nib.Nifti1Image(v, np.diag([2.0, 2.0, 2.0, 1.0])), str(img))
    recipe = SliceRecipe(name="t", modality="t1", resolution=32, norm="minmax", pad_to=(40, 40, 24), volume_scale=0.5)
    ss = build_slices([Subject("s0", {"t1": img})], recipe, n_jobs=1, progress=False)
    assert tuple(ss.subjects[0]["shape"]) == (20, 20, 12)
    out = write_maps(ss, [subject_volumes(ss, 0)["image"]], tmp_path / "maps", progress=False)[0]
    m = np.asarray(nib.load(out).dataobj)
    assert m.shape == v.shape
    inside, outside = m[v > 0].mean(), m[v == 0].mean()
    assert inside > 0.5 and outside < 0.1 * inside
