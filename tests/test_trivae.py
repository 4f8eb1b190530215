"Tri-VAE and DAE: shapes at the paper's size, GCS behaviour, loss values on fixed inputs, objective wiring."
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uad_study.core import UADInputError
from uad_study.losses import kl_divergence, l1, ssim
from uad_study.models.base import check_model
from uad_study.models.dae import DenoisingObjective, UNet, UNetConfig
from uad_study.models.trivae import (ABLATIONS, GatedCrossSkip, TriVAE, TriVAEConfig, TriVAELossConfig, TriVAEObjective,
                                     ablation_config, capture_features, latent_codes, triplet_loss)
from uad_study.noise import NoiseConfig, add_noise

SMALL = dict(in_size=64, channels=(8, 8, 16, 16, 16), embed_dim=32, latent_dim=16)


def _batch(n=6, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size)
    b = size // 5
    x[:, :, b:size - b, b:size - b] = torch.rand(n, 1, size - 2 * b, size - 2 * b, generator=g)
    return x


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
    # d(a,p) = 1, 0.25; d(a,n) = 1, 9: max(1 - 1 + 1, 0) = 1; max(0.25 - 9 + 1, 0) = 0 -> mean 0.5
    assert triplet_loss(a, p, n, margin=1.0).item() == pytest.approx(0.5)
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
    assert got == pytest.approx(PINNED, abs=2e-4), got


# eq. 8's terms for SMALL, torch.manual_seed(0) weights, _batch(), torch.manual_seed(123) noise (torch 2.14.1, CPU)
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
