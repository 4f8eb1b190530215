"""Tri-VAE and DAE: shapes at the paper's size, GCS behaviour, loss values on fixed inputs, objective wiring; triplets of distinct
subjects, KL balancing and the posterior-collapse warning (issue 11)."""
import contextlib
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from uad_study.core import UADInputError
from uad_study.losses import kl_divergence, l1, ssim
from uad_study.models.base import check_model
from uad_study.models.dae import DenoisingObjective, UNet, UNetConfig
from uad_study.models.trivae import (ABLATIONS, LOSS_VARIANTS, GatedCrossSkip, TriVAE, TriVAEConfig, TriVAELossConfig,
                                     TriVAEObjective, ablation_config, capture_features, distinct_triplets, kl_warmup, latent_codes,
                                     loss_config, loss_variant, triplet_loss)
from uad_study.noise import NoiseConfig, add_noise
from uad_study.training import TrainConfig, evaluate_loss, train_model

SMALL = dict(in_size=64, channels=(8, 8, 16, 16, 16), embed_dim=32, latent_dim=16)


def _batch(n=6, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size)
    b = size // 5
    x[:, :, b:size - b, b:size - b] = torch.rand(n, 1, size - 2 * b, size - 2 * b, generator=g)
    return x


@pytest.fixture(autouse=True)
def _fresh_warnings():
    "TriVAEObjective shows a given warning text once per process: each test starts afresh."
    from uad_study.models import trivae as _t
    _t._WARNED_TEXTS.clear()
    yield


def test_paper_size_shapes():
    "At 256x256: coarse output 32x32 (sec. 3.4) and decoder features 64x64 (Fig. 7); skips at 256, 128, 64."
    m = TriVAE(TriVAEConfig(in_size=256, channels=(4, 4, 8, 8, 8), embed_dim=16, latent_dim=8)).eval()
    x = torch.rand(2, 1, 256, 256)
    o = m(x)
    assert o["recon"].shape == (2, 1, 256, 256) and o["coarse"].shape == (2, 1, 32, 32)
    assert {k: tuple(v.shape[-2:]) for k, v in o["attention"].items()} == {0: (256, 256), 1: (128, 128), 2: (64, 64)}
    f = capture_features(m, x)
    assert f["decoder_mid"].shape == (2, 64, 64) and f["decoder_coarse"].shape == (2, 32, 32)
    assert 0 <= o["recon"].min() and o["recon"].max() <= 1


def test_paper_width_models():
    "The paper-size networks build and have the expected number of weights (pinned)."
    assert sum(p.numel() for p in UNet(UNetConfig()).parameters()) == 7_699_009
    # the dense layers around the 512x8x8 bottleneck hold most of the Tri-VAE's 84M weights
    assert sum(p.numel() for p in TriVAE(TriVAEConfig()).parameters()) == 84_191_736


@pytest.mark.parametrize("row", list(ABLATIONS))
def test_ablation_rows_differ_by_one_component(row):
    cfg = ablation_config(row, **SMALL)
    m = TriVAE(cfg)
    assert (len(m.gcs) == 3) == cfg.gcs
    assert (m.coarse_head is not None) == cfg.coarse_loss
    skip_in = m.dec[0][0].in_channels
    assert skip_in == (2 * SMALL["channels"][0] if cfg.skips else SMALL["channels"][0])
    assert m.from_latent.in_features == SMALL["latent_dim"] + (SMALL["embed_dim"] if cfg.triplet else 0)


def test_ablation_rows_are_cumulative():
    rows = list(ABLATIONS.values())
    for a, b in zip(rows, rows[1:]):
        assert sum(a[k] != b[k] for k in a) == 1 and all(b[k] >= a[k] for k in a)


def test_gcs_attention():
    torch.manual_seed(0)
    g = GatedCrossSkip(16, reduction=4)
    assert g.proj.out_channels == 4
    e = torch.randn(3, 16, 5, 7)
    out, a = g(e, e)
    assert torch.allclose(a, torch.ones_like(a), atol=1e-5)                      # identical features: attention 1
    assert torch.allclose(out[:, :16], torch.tanh(e), atol=1e-6) and torch.equal(out[:, 16:], e)
    d = torch.randn(3, 16, 5, 7)
    _, a2 = g(e, d)
    assert a2.abs().max() <= 1 + 1e-6 and a2.mean() < 0.9
    # alpha and beta are learnable and scale the two halves
    out.sum().backward()
    assert g.alpha.grad is not None and g.beta.grad is not None
    with pytest.raises(UADInputError, match="reduction"):
        GatedCrossSkip(2, reduction=4)


def test_gcs_suppresses_disagreeing_regions():
    "Where decoder features disagree with the encoder's, the gated skip is weaker than where they agree."
    torch.manual_seed(1)
    g = GatedCrossSkip(8, reduction=1)
    with torch.no_grad(): g.proj.weight.copy_(torch.eye(8)[:, :, None, None]); g.proj.bias.zero_()
    e = torch.rand(1, 8, 4, 4) + 0.5
    d = e.clone(); d[..., :2, :] = -e[..., :2, :]                                 # top half disagrees
    out, a = g(e, d)
    assert torch.allclose(a[..., 2:, :], torch.ones(1, 1, 2, 4)) and torch.allclose(a[..., :2, :], -torch.ones(1, 1, 2, 4))
    gated = out[:, :8]
    assert (gated[..., :2, :] < 0).all() and (gated[..., 2:, :] > 0).all()


def test_loss_reference_values():
    assert l1(torch.zeros(4), torch.tensor([1.0, -1.0, 0.5, 0.5])).item() == pytest.approx(0.75)
    mu, lv = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    assert kl_divergence(mu, lv).item() == pytest.approx(0.5 * (1 + 1 - 0 - 1) + 0.5 * (0 + 2 - math.log(2) - 1))
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0]]); p = torch.tensor([[1.0, 0.0], [0.0, 0.5]]); n = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    # d(a,p) = 1, 0.25; d(a,n) = 1, 9: max(1 - 1 + 1, 0) = 1; max(0.25 - 9 + 1, 0) = 0 -> sum 1 (eq. 5), mean 0.5
    assert triplet_loss(a, p, n, margin=1.0).item() == pytest.approx(1.0)
    assert triplet_loss(a, p, n, margin=1.0, reduction="mean").item() == pytest.approx(0.5)
    x = _batch(2, 32)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    c = torch.full_like(x, 0.5)
    assert ssim(c, c * 0 + 0.25).item() == pytest.approx((2 * 0.5 * 0.25 + 1e-4) / (0.25 + 0.0625 + 1e-4), abs=1e-5)
    with pytest.raises(UADInputError, match="SSIM window"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
    # eq. 7's loss averages the valid region only: the full-size (symmetric-border) map's mean is another number
    u = _batch(2, 32)
    assert ssim(u, u * 0.5).item() != pytest.approx(ssim(u, u * 0.5, border="symmetric").item(), abs=1e-4)


def test_objective_pinned_values():
    "Eq. 8 on a fixed batch with a fixed model and fixed noise: pinned (CPU, torch as in constraints.txt)."
    torch.manual_seed(0)
    m = TriVAE(TriVAEConfig(**SMALL))
    x = _batch()
    torch.manual_seed(123)
    loss, parts = TriVAEObjective()(m, x)
    got = {k: round(float(v), 4) for k, v in parts.items()}
    assert set(got) == {"l1_full_neg", "kl", "triplet", "l1_coarse", "ssim"}
    assert loss.item() == pytest.approx(sum(float(v) for v in parts.values()), rel=1e-5)   # eq. 8: unweighted sum
    assert got == pytest.approx({**PINNED, "triplet": 1.1557}, abs=2e-4), got   # eq. 5: the sum over the 2 triplets
    # triplet_reduction="mean" is the objective as it was before issue 11, bit for bit: the old pinned values
    torch.manual_seed(123)
    loss_m, parts_m = TriVAEObjective(TriVAELossConfig(triplet_reduction="mean"))(m, x)
    assert {k: round(float(v), 4) for k, v in parts_m.items()} == pytest.approx(PINNED, abs=2e-4)
    assert all(torch.equal(parts_m[k], parts[k]) for k in parts if k != "triplet")


# eq. 8's terms for SMALL, torch.manual_seed(0) weights, _batch(), torch.manual_seed(123) noise (torch 2.14.1, CPU), with
# triplet_reduction="mean" (the default before issue 11; eq. 5 sums, so the default's triplet term is now 1.1557, the sum)
PINNED = {"l1_full_neg": 0.447, "kl": 1.3689, "triplet": 0.5779, "l1_coarse": 0.8541, "ssim": 1.0192}


def test_objective_wiring():
    "The objective's terms are the paper's: recompute them with the same noise."
    torch.manual_seed(0)
    m = TriVAE(TriVAEConfig(**SMALL)).train()
    x = _batch()
    torch.manual_seed(7)
    loss, parts = TriVAEObjective()(m, x)
    # replay: the same RNG state gives the same noise and the same latent samples
    torch.manual_seed(7)
    xa, xp, xn = x[:2], x[2:4], x[4:6]
    xn_noisy = add_noise(xn, NoiseConfig("coarse"))
    assert not torch.equal(xn_noisy, xn) and torch.equal(xn_noisy[xn == 0], xn[xn == 0])
    with torch.no_grad(): o = m(torch.cat([xa, xp, xn_noisy]))
    assert float(parts["l1_full_neg"]) == pytest.approx(float(l1(o["recon"][4:], xn)), rel=1e-6)
    tgt = F.adaptive_avg_pool2d(torch.cat([xa, xp, xn]), (8, 8))
    coarse = sum(float(l1(o["coarse"][i:i + 2], tgt[i:i + 2])) for i in (0, 2, 4))
    assert float(parts["l1_coarse"]) == pytest.approx(coarse, rel=1e-6)
    kl = float(kl_divergence(o["mu"][:2], o["logvar"][:2]) + kl_divergence(o["mu"][2:4], o["logvar"][2:4]))
    assert float(parts["kl"]) == pytest.approx(kl, rel=1e-6)                     # anchor + positive only (eq. 4)
    e = o["embedding"]
    assert float(parts["triplet"]) == pytest.approx(float(triplet_loss(e[:2], e[2:4], e[4:])), rel=1e-6)
    assert float(parts["ssim"]) == pytest.approx(1 - float(ssim(o["recon"][4:], xn)), rel=1e-6)


def test_baseline_vae_objective_is_l1_plus_kl():
    torch.manual_seed(0)
    m = TriVAE(ablation_config("baseline VAE", **SMALL)).eval()   # eval: no sampling, so the recomputation matches
    x = _batch(4)
    with torch.no_grad(): loss, parts = TriVAEObjective()(m, x); o = m(x)
    assert set(parts) == {"l1", "kl"}
    assert float(loss) == pytest.approx(float(l1(o["recon"], x) + kl_divergence(o["mu"], o["logvar"])), rel=1e-6)


def test_objective_needs_three_slices():
    with pytest.raises(UADInputError, match="at least 3 slices"):
        TriVAEObjective()(TriVAE(TriVAEConfig(**SMALL)), _batch(2))


def test_objective_gradients_reach_every_used_parameter():
    torch.manual_seed(0)
    m = TriVAE(TriVAEConfig(**SMALL))
    loss, _ = TriVAEObjective()(m, _batch())
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_simplex_negatives():
    torch.manual_seed(0)
    x = _batch(3)
    xn = add_noise(x, NoiseConfig("simplex"))
    d = (xn - x)[x > 0]
    assert torch.equal(xn[x == 0], x[x == 0]) and d.std() > 0.01 and d.abs().max() < 1.0


def test_dae_denoising_objective():
    torch.manual_seed(0)
    u = UNet(UNetConfig(in_size=64, width=4))
    x = _batch(2)
    torch.manual_seed(3)
    loss, parts = DenoisingObjective(NoiseConfig("coarse"))(u, x)
    torch.manual_seed(3)
    ref = F.mse_loss(u(add_noise(x, NoiseConfig("coarse")))["recon"], x)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert capture_features(u, x)["decoder_mid"].shape == (2, 16, 16)


def test_latent_codes_seeded():
    torch.manual_seed(0)
    m = TriVAE(TriVAEConfig(**SMALL))
    s = np.asarray(_batch(5)[:, 0])
    a, b, c = latent_codes(m, s, 2, seed=1), latent_codes(m, s, 2, seed=1), latent_codes(m, s, 2, seed=2)
    assert np.array_equal(a["resampled"], b["resampled"]) and not np.array_equal(a["resampled"], c["resampled"])
    assert np.array_equal(a["embedding"], c["embedding"])


def test_models_follow_the_protocol():
    "Tri-VAE (every Table 2 row) and the DAE's U-Net pass `check_model`; the U-Net declares its unbounded output."
    for row in ABLATIONS:
        got = check_model(TriVAE(ablation_config(row, **SMALL)), _batch(2))
        assert got["recon"] == (2, 1, 64, 64) and got["encode"] == (2, 32) and got["feature_layers"] == ["decoder_coarse", "decoder_mid"]
    u = UNet(UNetConfig(in_size=64, width=4))
    assert UNet.recon_range is None and check_model(u, _batch(2))["encode"] is None


def test_state_dict_keys_unchanged():
    "Checkpoints keep loading: the blocks moved to models.base keep their parameter names."
    keys = list(TriVAE(TriVAEConfig(**SMALL)).state_dict())
    assert keys[:8] == ["enc.0.0.weight", "enc.0.1.weight", "enc.0.1.bias", "enc.0.3.weight", "enc.0.4.weight", "enc.0.4.bias",
                        "enc.1.0.weight", "enc.1.1.weight"]
    assert "down.0.0.weight" in keys and "up.0.1.weight" in keys and "up.0.2.bias" in keys
    assert list(UNet(UNetConfig(in_size=64, width=4)).state_dict())[:3] == ["enc.0.0.weight", "enc.0.1.weight", "enc.0.1.bias"]


# ---- issue 11: random triplets of three distinct subjects, eq. 5's sum, KL balancing, posterior collapse ----

TINY = dict(in_size=32, channels=(4, 4, 4, 4, 4), embed_dim=8, latent_dim=4)
QUIET = NoiseConfig(coarse_sd=0.0)   # no noise: negatives reach the model unchanged, so their values still name their subject


class _SpyNet(nn.Module):
    "A fast stand-in for a TriVAE (the '+triplet' row: no coarse output, no SSIM) that records the subject code of its inputs."
    cfg = ablation_config("+triplet", **TINY)

    def __init__(self):
        super().__init__()
        self.conv, self.head, self.seen = nn.Conv2d(1, 1, 1), nn.Linear(1, 16), []

    def forward(self, x):
        self.seen.append((torch.round(x[:, 0, 0, 0] * 16).long() - 1, self.training))
        h = self.head(x.mean((1, 2, 3))[:, None])
        return {"recon": torch.sigmoid(self.conv(x)), "coarse": None, "embedding": h[:, 8:], "mu": h[:, :4], "logvar": h[:, 4:8],
                "z": h[:, :4], "attention": {}}


def _subject_slices(n_subjects, n_per, size=32):
    "A subject-ordered slice cache; every pixel of a slice of subject s is (s + 1) / 16, so the model's input names its subject."
    subj = np.repeat(np.arange(n_subjects), n_per)
    img = np.broadcast_to(((subj + 1) / 16).astype(np.float32)[:, None, None], (len(subj), size, size)).copy()
    return {"image": img, "subject": subj.astype(np.int64)}


def _role_counts(seen, n_subjects, training=True):
    "Per subject, how often it was anchor, positive, negative; and whether any triplet held two slices of one subject."
    counts, same = np.zeros((n_subjects, 3), int), 0
    for s, tr in seen:
        if tr != training: continue
        k = len(s) // 3; a, p, n = s[:k], s[k:2 * k], s[2 * k:3 * k]
        same += int(((a == p) | (p == n) | (a == n)).sum())
        for r, t in enumerate((a, p, n)): np.add.at(counts[:, r], t.numpy(), 1)
    return counts, same


def test_triplet_roles_are_random_and_of_distinct_subjects_over_an_epoch(tmp_path):
    "One epoch of the engine's (sorted) batches on 13 subjects x 140 slices: every subject takes every role about 1/3 of the time."
    net = _SpyNet()
    train_model(net, _subject_slices(13, 140), None, TrainConfig(epochs=1, batch_size=48, device="cpu"), tmp_path, progress=False,
                objective=TriVAEObjective(TriVAELossConfig(noise=QUIET)))
    counts, same = _role_counts(net.seen, 13)
    assert same == 0, "a triplet holds two slices of one subject"
    assert counts.sum() == 3 * (1820 // 3)                      # every slice of every batch took part
    expected = 140 / 3                                           # binomial sd ~5.6
    assert (counts > 0.5 * expected).all() and (counts < 1.5 * expected).all(), counts


def test_without_subject_roles_follow_batch_order_and_warn(tmp_path):
    "The old rule (thirds of a sorted batch of a subject-ordered cache), kept for data without subjects: it warns, once."
    net = _SpyNet()
    with pytest.warns(RuntimeWarning, match="roles follow the data's order") as rec:
        train_model(net, _subject_slices(13, 140)["image"], None, TrainConfig(epochs=1, batch_size=48, device="cpu"), tmp_path,
                    progress=False, objective=TriVAEObjective(TriVAELossConfig(noise=QUIET)))
    assert sum("roles follow" in str(w.message) for w in rec) == 1
    counts, _ = _role_counts(net.seen, 13)
    assert (counts[:5, 2] == 0).all() and (counts[-2:, 2] > 0.9 * 140).all(), counts   # what the test above rules out


def _max_triplets(subject):
    "The most triplets of three distinct subjects a batch allows: the largest t with sum_i min(c_i, t) >= 3 t."
    c = np.bincount(np.asarray(subject))
    return max(t for t in range(len(subject) // 3 + 1) if np.minimum(c, t).sum() >= 3 * t)


def test_distinct_triplets_are_distinct_and_as_many_as_possible():
    rng = np.random.default_rng(0)
    for trial in range(200):
        b = int(rng.integers(3, 40)); s = torch.from_numpy(rng.integers(0, int(rng.integers(1, 8)), b))
        t = distinct_triplets(s, torch.Generator().manual_seed(trial))
        st = s[t]
        assert t.shape[1] == 3 and len(set(t.flatten().tolist())) == t.numel()     # each slice at most once
        assert bool(((st[:, 0] != st[:, 1]) & (st[:, 1] != st[:, 2]) & (st[:, 0] != st[:, 2])).all())
        assert len(t) == _max_triplets(s.numpy()), (s.tolist(), t.tolist())


def test_fewer_than_three_subjects_fall_back_with_one_warning():
    net, obj = _SpyNet(), TriVAEObjective(TriVAELossConfig(noise=QUIET))
    b = {"image": torch.full((6, 1, 32, 32), 1 / 16), "subject": torch.tensor([0, 0, 0, 1, 1, 1])}
    with pytest.warns(RuntimeWarning, match=r"6 slices from 2 subject\(s\) cannot form a triplet of three distinct subjects"):
        loss, _ = obj(net, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error"); obj(net, b)              # once per objective
    assert torch.isfinite(loss) and len(net.seen[-1][0]) == 6


def test_validation_batches_mix_subjects_and_are_deterministic():
    "Validation of a subject-ordered set: every batch forms triplets of distinct subjects; triplets and noise are fixed."
    val = _subject_slices(4, 30)
    net, obj, cfg = _SpyNet(), TriVAEObjective(TriVAELossConfig(noise=QUIET)), TrainConfig(batch_size=24, device="cpu")
    evaluate_loss(net, val, cfg, "cpu", obj)
    counts, same = _role_counts(net.seen, 4, training=False)
    assert same == 0 and counts.sum() == 120 and len(net.seen) == 5   # 5 batches of 24, every slice in a triplet
    # a real Tri-VAE with coarse noise: the same value whatever the global RNG state, and the RNG left as found
    torch.manual_seed(0); m = TriVAE(TriVAEConfig(**TINY)); obj = TriVAEObjective()
    v1 = evaluate_loss(m, val, cfg, "cpu", obj)
    torch.manual_seed(5); state = torch.get_rng_state()
    assert evaluate_loss(m, val, cfg, "cpu", obj) == v1 and torch.equal(torch.get_rng_state(), state)


def test_subject_triplets_resume_bit_exact(tmp_path):
    "The triplets are drawn from the checkpointed global RNG: one run of 2 epochs equals 1 epoch, a stop, and a resumed one."
    data, val = _subject_slices(6, 10), _subject_slices(3, 8)

    def run(epochs, d):
        torch.manual_seed(0); m = TriVAE(TriVAEConfig(**TINY))
        h = train_model(m, data, val, TrainConfig(epochs=epochs, batch_size=12, device="cpu"), d, progress=False, objective=TriVAEObjective())
        return m, h
    full, hf = run(2, tmp_path / "full")
    run(1, tmp_path / "half"); resumed, hr = run(2, tmp_path / "half")
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
    assert [r["val_loss"] for r in hf] == [r["val_loss"] for r in hr]


class _Step:
    "What TriVAEObjective.train_step uses of the engine's StepContext."
    def __init__(self, global_step, n_steps, n_batch): self.global_step, self.n_steps, self.n_batch = global_step, n_steps, n_batch
    def autocast(self): return contextlib.nullcontext()
    def optimise(self, name, loss): self.loss = loss


def _subject_batch(n=6):
    return {"image": _batch(n, 32), "subject": torch.arange(n)}


def test_kl_balancing_options():
    "kl_reduction, kl_weight and the warm-up act on the loss only: the logged `kl` is eq. 4's KL in nats per sample, unweighted."
    torch.manual_seed(0); m = TriVAE(TriVAEConfig(**TINY)).eval()   # eval: no sampling, so every call sees the same latents
    b = _subject_batch()

    def step(cfg, global_step=0, n_steps=4, n_batch=6):
        torch.manual_seed(1); st = _Step(global_step, n_steps, n_batch)
        parts = TriVAEObjective(cfg).train_step(m, b, st)
        return float(st.loss.detach()), {k: float(v) for k, v in parts.items() if k != "loss"}
    lit, p = step(TriVAELossConfig())
    assert lit == pytest.approx(sum(p.values()), rel=1e-6)
    pp, q = step(loss_config("balanced"))                                       # KL per pixel: / (32 x 32)
    assert q == pytest.approx(p, rel=1e-6) and pp == pytest.approx(lit - p["kl"] + p["kl"] / 1024, rel=1e-6)
    half, q = step(TriVAELossConfig(kl_warmup_epochs=2), global_step=3)        # step 4 of 8: factor 0.5
    assert q == pytest.approx(p, rel=1e-6) and half == pytest.approx(lit - 0.5 * p["kl"], rel=1e-6)
    full, _ = step(TriVAELossConfig(kl_warmup_epochs=2), global_step=8)
    assert full == pytest.approx(lit, rel=1e-6)
    w, _ = step(TriVAELossConfig(kl_weight=0.1))
    assert w == pytest.approx(lit - 0.9 * p["kl"], rel=1e-6)
    # validation: full weight, whatever the warm-up
    with torch.no_grad():
        v, _ = TriVAEObjective(TriVAELossConfig(kl_warmup_epochs=2)).val_loss(m, b)
        ref, _ = TriVAEObjective().val_loss(m, b)
    assert float(v) == pytest.approx(float(ref), rel=1e-6)
    assert loss_variant(TriVAELossConfig()) == "literal" and loss_variant(loss_config("balanced")) == "balanced"
    assert set(LOSS_VARIANTS) == {"literal", "balanced"}
    with pytest.raises(UADInputError, match="kl_reduction"):
        TriVAELossConfig(kl_reduction="batchmean")
    assert [kl_warmup(s, 10, 1.5) for s in (0, 14, 20)] == pytest.approx([1 / 15, 1.0, 1.0])


def test_triplet_sum_counts_the_global_batch():
    "Eq. 5's sum under DDP: a process's piece (6 slices) of a global batch of 24 scales its mean by 24 // 3 = 8 triplets."
    torch.manual_seed(0); m = TriVAE(TriVAEConfig(**TINY)).eval(); b = _subject_batch()
    parts = {}
    for red, n_batch in (("mean", 6), ("sum", 6), ("sum", 24)):
        torch.manual_seed(1); st = _Step(0, 4, n_batch)
        parts[red, n_batch] = float(TriVAEObjective(TriVAELossConfig(triplet_reduction=red)).train_step(m, b, st)["triplet"])
    assert parts["sum", 6] == pytest.approx(2 * parts["mean", 6], rel=1e-6)
    assert parts["sum", 24] == pytest.approx(8 * parts["mean", 6], rel=1e-6)


def test_posterior_collapse_warning(tmp_path):
    "The baseline VAE with eq. 8 as written collapses (KL -> 0) and the engine warns once; balanced (KL per pixel) it does not."
    x = _batch(40, 32, seed=1)[:, 0].numpy()

    def run(cfg, d):
        torch.manual_seed(0); m = TriVAE(ablation_config("baseline VAE", **TINY))
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            h = train_model(m, x, None, TrainConfig(epochs=6, batch_size=8, device="cpu", lr=1e-2), d, progress=False,
                            objective=TriVAEObjective(cfg))
        return h, [str(w.message) for w in rec if "posterior collapse" in str(w.message)]
    h, msgs = run(loss_config("literal"), tmp_path / "literal")
    assert len(msgs) == 1 and min(r["train_kl"] for r in h) < TriVAEObjective.collapse_kl_floor, h
    e = next(r["epoch"] for r in h if r["train_kl"] < 1e-2)
    assert msgs[0].startswith(f"model: posterior collapse: KL per sample ") and f"below 0.01 at epoch {e} (train_kl)" in msgs[0]
    assert "balance the KL term" in msgs[0]
    h, msgs = run(loss_config("balanced"), tmp_path / "balanced")
    assert msgs == [] and min(r["train_kl"] for r in h) > 0.05, h
    for d in ("literal", "balanced"):                                          # KL per epoch in the log
        head = (tmp_path / d / "train_log.csv").read_text().splitlines()
        assert "train_kl" in head[0].split(",") and len(head) == 7
