"""Context-encoding VAE (Zimmerer et al. 2018/2019): context masks (1-3 squares of the stated side inside the foreground
box, seeded), the CE term's target is the unmasked image (not the masked one), the combi score against an independent
autograd computation, reconstruct = x - s under no_grad (the inference path), the plain-reconstruction option, one engine step."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import blob_slices
from uad_study.core import UADInputError
from uad_study.inference import reconstruct, residual
from uad_study.losses import kl_divergence
from uad_study.models.base import check_model
from uad_study.models.cevae import CEVAE, CEVAEObjective, cevae_spec, context_masks
from uad_study.training import TrainConfig, train_model


def test_context_masks():
    x = torch.zeros(20, 1, 64, 64); x[:, :, 10:50, 20:60] = 0.5
    m = context_masks(x, 10 / 64, 3, torch.Generator().manual_seed(1))
    assert torch.equal(m, context_masks(x, 10 / 64, 3, torch.Generator().manual_seed(1)))
    assert set(m.unique().tolist()) == {0.0, 1.0}
    holes = (m == 0)[:, 0]
    assert not holes[:, :10].any() and not holes[:, 50:].any() and not holes[:, :, :20].any() and not holes[:, :, 60:].any()
    n = holes.flatten(1).sum(1)
    assert (n >= 100).all() and (n <= 300).all()                      # 1-3 squares of side 10 (overlaps allowed)
    assert (n > 100).any()                                            # more than one square sometimes
    empty = context_masks(torch.zeros(2, 1, 16, 16), 0.25, 1, torch.Generator().manual_seed(0))
    assert ((empty == 0).flatten(1).sum(1) == 16).all()               # no foreground: anywhere in the image
    with pytest.raises(UADInputError, match="mask_frac"): context_masks(x, 1.5)


def test_ce_target_is_the_unmasked_image():
    torch.manual_seed(0); v = CEVAE(32, (4, 8), 4).eval()
    x = torch.from_numpy(blob_slices(4, 32))[:, None]
    torch.manual_seed(5); loss, parts = CEVAEObjective()(v, x)
    torch.manual_seed(5); keep = context_masks(x)
    xh_ce = v.ce_reconstruct(x * keep)
    assert parts["ce"].item() == pytest.approx(((x - xh_ce).abs().flatten(1).sum(1).mean() / 1024).item(), rel=1e-5)
    assert parts["ce"].item() != pytest.approx(((x * keep - xh_ce).abs().flatten(1).sum(1).mean() / 1024).item(), rel=1e-3)
    mu, lv = v.encode(x).chunk(2, 1)
    assert parts["kl"].item() == pytest.approx((kl_divergence(mu, lv) / 1024).item(), rel=1e-5)
    assert loss.item() == pytest.approx(sum(p.item() for p in parts.values()), rel=1e-5)


def test_combi_score_by_autograd():
    torch.manual_seed(1); v = CEVAE(32, (4, 8), 4).eval(); x = torch.rand(2, 1, 32, 32)
    xi = x.clone().requires_grad_(True)
    mu, lv = v.encode(xi).chunk(2, 1); xh = v.decode(mu)
    L = (xi - xh).abs().flatten(1).sum(1) + kl_divergence(mu, lv.clamp(-20, 10), "none")
    g, = torch.autograd.grad(L.sum(), xi)
    want = (x - xh.detach()).abs() * g.abs()
    assert torch.allclose(v.anomaly_map(x), want, atol=1e-6)
    with torch.no_grad(): r = v.reconstruct(x)                       # works under no_grad
    assert torch.allclose(r, x - want, atol=1e-6)
    out = reconstruct(v, x[:, 0].numpy(), batch_size=1, device="cpu", progress=False)
    assert np.allclose(residual(x[:, 0].numpy(), out), want[:, 0].numpy(), atol=1e-6)   # the study's absolute map = combi
    v.train(); v.anomaly_map(x); assert v.training                   # the mode is restored


def test_rec_score_and_protocol():
    torch.manual_seed(2); v = CEVAE(32, (4, 8), 4, score="rec").eval(); x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(v.reconstruct(x), v.decode(v.encode(x).chunk(2, 1)[0]))
    assert check_model(v, x)["recon"] == (2, 1, 32, 32)
    assert check_model(CEVAE(32, (4, 8), 4).eval(), x)["recon"] == (2, 1, 32, 32)


def test_smoke_spec_one_engine_step(tmp_path):
    spec = cevae_spec("smoke"); cfg = SimpleNamespace(resolution=32, seed=0)
    torch.manual_seed(0); m = spec["build"](cfg)
    w0 = [p.detach().clone() for p in m.parameters()]
    data = blob_slices(8, 32)
    hist = train_model(m, data, data[:4], TrainConfig(epochs=1, batch_size=4, device="cpu"), tmp_path, progress=False,
                       objective=spec["objective"](cfg))
    r = hist[0]
    assert all(math.isfinite(r[k]) for k in ("train_loss", "train_rec", "train_kl", "train_ce", "val_loss"))
    assert any(not torch.equal(a, b) for a, b in zip(w0, m.parameters()))
    assert spec["describe"](cfg)["parameters"] == sum(p.numel() for p in m.parameters())
