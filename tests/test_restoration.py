"""VAE and GMVAE restoration (You et al. 2019): total variation by hand, the restoration objective lowered monotonically
on toy priors (a quadratic prior in closed form; tiny VAE and GMVAE priors with backtracking), the descent direction and
the TV term's effect, the map's sign on a bright blob, -ELBO = n x the training loss, the GMVAE's one-cluster reduction,
batch independence, restoration under no_grad (the inference path), and one training step through the engine."""
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
from uad_study.models.baselines import BaselineObjective, DenseVAE
from uad_study.models.restoration import (GMVAE, GMVAEObjective, Restoration, restoration_energy, restoration_spec, restore,
                                          total_variation, vae_neg_elbo)
from uad_study.training import TrainConfig, train_model


def test_total_variation_by_hand():
    d = torch.zeros(3, 1, 5, 5)
    d[0, 0, 1:3, 1:3] = 2.0                               # 2 x 2 square of height 2: perimeter 8 x 2
    d[1, 0, :, 2:] = 1.0                                  # a vertical edge of length 5
    assert total_variation(d).tolist() == pytest.approx([16.0, 5.0, 0.0])
    assert total_variation(d + 7).tolist() == pytest.approx([16.0, 5.0, 0.0])
    assert total_variation(-d).tolist() == pytest.approx([16.0, 5.0, 0.0])


def _quad(c): return lambda x: (x - c).square().flatten(1).sum(1)


def test_plain_steps_closed_form_and_direction():
    c, y = torch.full((2, 1, 6, 6), 0.4), torch.rand(2, 1, 6, 6)
    for k in (1, 7):
        x, tr = restore(_quad(c), y, steps=k, step_size=0.05, lam=0.0, backtrack=False)
        assert torch.allclose(x, c + 0.9 ** k * (y - c), atol=1e-6)   # towards the prior's mode, not away (descent on -ELBO)
    assert (tr[-1] < tr[0]).all()


@pytest.mark.parametrize("lam", [0.0, 1.8, 50.0])
def test_backtracking_is_monotone_even_with_large_steps(lam):
    c, y = torch.full((3, 1, 8, 8), 0.4), torch.rand(3, 1, 8, 8)
    x, tr = restore(_quad(c), y, steps=30, step_size=2.0, lam=lam)      # step 2 would diverge without backtracking
    assert (tr[1:] <= tr[:-1]).all() and (tr[-1] <= tr[0]).all()
    assert torch.allclose(tr[-1], restoration_energy(_quad(c), x, y, lam), rtol=1e-5, atol=1e-5)
    xp, trp = restore(_quad(c), y, steps=30, step_size=2.0, lam=lam, backtrack=False)
    assert (trp[-1] > trp[0]).all()                                      # the plain rule with that step rises


def test_tv_keeps_the_change_piecewise_constant():
    c = torch.full((1, 1, 12, 12), 0.3)
    y = c.clone(); y[..., 3:7, 3:7] += 0.5; y = y + 0.05 * torch.randn(1, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    x0, _ = restore(_quad(c), y, steps=200, step_size=0.05, lam=0.0)
    x1, _ = restore(_quad(c), y, steps=200, step_size=0.05, lam=0.2)
    assert total_variation(x1 - y) < total_variation(x0 - y)


@pytest.mark.parametrize("prior", ["vae", "gmvae"])
def test_restoration_lowers_its_objective_monotonically_on_a_toy_vae(prior):
    torch.manual_seed(0)
    net = (DenseVAE(16, (4, 8), 4) if prior == "vae" else GMVAE(16, (4, 8), 4, 2, 3)).eval()
    m = Restoration(net, steps=25, step_size=1e-3, lam=1.8)
    y = torch.from_numpy(blob_slices(4, 16))[:, None]
    x, tr = m.restore(y)
    assert tr.shape == (26, 4)
    assert (tr[1:] <= tr[:-1]).all() and (tr[-1] < tr[0]).all()
    assert torch.allclose(tr[0], m.neg_elbo(y).detach(), rtol=1e-5)       # x_0 = y: no TV cost yet
    assert not net.training                                                # the prior's mode restored


def test_map_sign_on_a_bright_blob():
    c = torch.full((1, 1, 10, 10), 0.3)
    y = c.clone(); y[..., 4:7, 4:7] = 0.9
    x, _ = restore(_quad(c), y, steps=100, step_size=0.05, lam=0.05)
    m = residual(y[:, 0].numpy(), x[:, 0].numpy(), "positive")            # y - x_hat
    assert m[0, 4:7, 4:7].mean() > 0.3 and m[0, :3, :3].max() < 0.05


def test_neg_elbo_is_n_times_the_training_loss():
    torch.manual_seed(1); v = DenseVAE(16, (4, 8), 4).eval(); x = torch.rand(5, 1, 16, 16)
    assert (vae_neg_elbo(v, x).mean() / 256).item() == pytest.approx(BaselineObjective("l2", 1.0)(v, x)[0].item(), rel=1e-5)
    g = GMVAE(16, (4, 8), 4, 2, 3).eval()
    loss, parts = GMVAEObjective()(g, x)
    assert loss.item() == pytest.approx((g.neg_elbo(x).mean() / 256).item(), rel=1e-5)


def test_gmvae_one_standard_cluster_is_a_vae_plus_kl_w():
    torch.manual_seed(2); g = GMVAE(16, (4, 8), 4, 3, n_clusters=1).eval()
    with torch.no_grad():
        for p in g.prior.parameters(): p.zero_()                          # p(z | w, c) = N(0, I)
    x = torch.rand(2, 1, 16, 16)
    mz, lz, mw, lw = g.heads(x)
    want = (x - g.decode(mz)).square().flatten(1).sum(1) + kl_divergence(mz, lz, "none") + kl_divergence(mw, lw, "none")
    assert torch.allclose(g.neg_elbo(x), want, rtol=1e-5)
    g2 = GMVAE(16, (4, 8), 4, 3, n_clusters=4).eval()
    assert torch.allclose(g2.terms(x)["p_c"].sum(1), torch.ones(2)) and (g2.terms(x)["kl_c"] >= -1e-6).all()


def test_batch_independent_and_works_under_no_grad():
    torch.manual_seed(3)
    m = Restoration(DenseVAE(16, (4, 8), 4), steps=10, step_size=0.05, lam=1.8).eval()
    y = torch.from_numpy(blob_slices(4, 16))[:, None]
    with torch.no_grad(): both = m.reconstruct(y)
    assert torch.allclose(both[1:2], m.reconstruct(y[1:2]), atol=1e-6)
    out = reconstruct(m, blob_slices(4, 16), batch_size=2, device="cpu", progress=False)   # inference.reconstruct: no_grad
    assert np.allclose(out, both[:, 0].numpy(), atol=1e-6)


@pytest.mark.parametrize("prior", ["vae", "gmvae"])
def test_smoke_spec_protocol_and_one_engine_step(tmp_path, prior):
    spec = restoration_spec(prior, "smoke")
    cfg = SimpleNamespace(resolution=32, seed=0)
    torch.manual_seed(0); m = spec["build"](cfg)
    data = blob_slices(8, 32)
    w0 = [p.detach().clone() for p in m.parameters()]
    hist = train_model(m, data, data[:4], TrainConfig(epochs=1, batch_size=4, device="cpu"), tmp_path, progress=False,
                       objective=spec["objective"](cfg))
    assert len(hist) == 1 and math.isfinite(hist[0]["train_loss"]) and math.isfinite(hist[0]["val_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(w0, m.parameters()))
    info = check_model(m.eval(), torch.from_numpy(data[:2])[:, None])
    assert info["recon"] == (2, 1, 32, 32)
    assert spec["describe"](cfg)["parameters"] == sum(p.numel() for p in m.parameters())


def test_bad_settings():
    with pytest.raises(UADInputError, match="step_size > 0"): restore(_quad(0.0), torch.rand(1, 1, 4, 4), step_size=0.0)
    with pytest.raises(UADInputError, match="profile must be"): restoration_spec("vae", "huge")
    with pytest.raises(UADInputError, match="n_clusters >= 1"): GMVAE(16, (4, 8), 4, 2, 0)
