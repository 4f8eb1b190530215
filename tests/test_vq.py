"""The vector quantiser (nearest code by Euclidean distance, straight-through gradient, hand-computed codebook and
commitment losses and their gradients, an EMA step by hand), the thesis' VQ-VAE and VAE (Table 4.3 parameter
counts, any input size), the VQ objective, and a short seeded overfit."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import blob_slices

from uad_study.core import UADInputError, seed_everything
from uad_study.models.base import check_model
from uad_study.models.ra_baselines import VAEObjective
from uad_study.models.quantizer import VectorQuantizer
from uad_study.models.vq import (THESIS_PARAM_COUNTS, ResidualStack, ThesisVAE, VQObjective, VQVAE,
                                 conv_sizes, n_params, param_table)
from uad_study.training import TrainConfig, train_model

# codebook e0 = (0, 0), e1 = (1, 0), e2 = (0, 2); four vectors at the positions of a 2x2 map, row-major
CODES = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
VECS = [[0.9, 0.1], [0.1, 1.6], [-0.2, 0.3], [0.4, 0.0]]   # nearest: e1, e2, e0, e0


def _vq(codes=CODES, **kw):
    vq = VectorQuantizer(len(codes), len(codes[0]), **kw)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor(codes))
        if vq.ema: vq.ema_sum.copy_(vq.codebook)
    return vq


def _map(vecs=VECS, h=2, w=2):
    "Vectors (h*w, D), row-major, as a map (1, D, h, w) that requires grad."
    return torch.tensor(vecs).t().reshape(1, -1, h, w).clone().requires_grad_()


# ---------------------------------------------------------------- the quantiser

def test_nearest_code_by_euclidean_distance():
    o = _vq()(_map())
    assert o["codes"].dtype == torch.long and o["codes"].tolist() == [[[1, 2], [0, 0]]]
    assert torch.equal(o["z_q"].detach()[0].flatten(1).t(), torch.tensor(CODES)[[1, 2, 0, 0]])
    # the largest dot product would pick e1 = (3, 0) for (1.1, 0); the nearest code is e0 = (1, 0)
    assert _vq([[1.0, 0.0], [3.0, 0.0]])(_map([[1.1, 0.0]], 1, 1))["codes"].item() == 0
    # a tie goes to the lowest index
    assert _vq([[1.0, 0.0], [-1.0, 0.0]])(_map([[0.0, 0.0]], 1, 1))["codes"].item() == 0


def test_straight_through_gradient_is_identity():
    z = _map()
    o = _vq()(z)
    o["z_q"].sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_codebook_and_commitment_losses_by_hand():
    # squared distances to the chosen codes: 0.02, 0.17, 0.13, 0.16 -> sum 0.48 over 8 elements
    o = _vq(beta=0.25)(_map())
    assert o["codebook_loss"].item() == pytest.approx(0.06)
    assert o["commitment_loss"].item() == pytest.approx(0.06)
    assert o["vq_loss"].item() == pytest.approx(0.06 + 0.25 * 0.06)
    assert _vq(beta=2.0)(_map())["vq_loss"].item() == pytest.approx(0.06 + 2.0 * 0.06)


def test_beta_weighs_the_commitment_not_the_codebook_term():
    # both terms have the same value, so beta's place shows only in the gradients of vq_loss
    vq, z = _vq(beta=2.0), _map()
    vq(z)["vq_loss"].backward()
    q = torch.tensor(CODES)[[1, 2, 0, 0]]
    assert torch.allclose(z.grad[0].flatten(1).t(), 2.0 * 2 * (torch.tensor(VECS) - q) / 8)      # beta * commitment
    want = 0.25 * torch.tensor([[0.2 - 0.4, -0.3 - 0.0], [1 - 0.9, 0 - 0.1], [0 - 0.1, 2 - 1.6]])  # codebook, unweighted
    assert torch.allclose(vq.codebook.grad, want)


def test_commitment_moves_only_the_encoder_codebook_loss_only_the_codebook():
    vq, z = _vq(), _map()
    vq(z)["commitment_loss"].backward()
    assert vq.codebook.grad is None or not vq.codebook.grad.any()
    q = torch.tensor(CODES)[[1, 2, 0, 0]]
    assert torch.allclose(z.grad[0].flatten(1).t(), 2 * (torch.tensor(VECS) - q) / 8)
    vq, z = _vq(), _map()
    vq(z)["codebook_loss"].backward()
    assert z.grad is None
    # d/de_i of mean (e_k - z)^2: 2/8 * sum over the vectors assigned to i of (e_i - z)
    want = 0.25 * torch.tensor([[0.2 - 0.4, -0.3 - 0.0], [1 - 0.9, 0 - 0.1], [0 - 0.1, 2 - 1.6]])
    assert torch.allclose(vq.codebook.grad, want)


def test_perplexity_counts_code_use():
    p = torch.tensor([0.5, 0.25, 0.25])
    assert _vq()(_map())["perplexity"].item() == pytest.approx(torch.exp(-(p * p.log()).sum()).item())
    assert _vq()(_map([[0.0, 0.0]] * 4))["perplexity"].item() == pytest.approx(1.0)  # one code used: collapse


def test_ema_step_by_hand():
    vq = _vq([[0.0, 0.0], [1.0, 1.0]], ema=True, decay=0.5, eps=0.1)
    assert not isinstance(vq.codebook, nn.Parameter) and n_params(vq) == 0
    z = _map([[0.2, 0.0], [0.4, 0.2], [0.8, 1.2]], 1, 3)
    o = vq(z)
    assert o["codes"].tolist() == [[[0, 0, 1]]] and o["codebook_loss"].item() == 0.0
    assert o["vq_loss"].item() == pytest.approx(0.25 * o["commitment_loss"].item())
    assert torch.equal(o["z_q"].detach()[0, :, 0, 2], torch.tensor([1.0, 1.0]))  # z_q from the codebook before the step
    N = torch.tensor([0.5 * 2, 0.5 * 1])                       # counts (2, 1)
    m = torch.tensor([[0.5 * 0.6, 0.5 * 0.2], [0.5 * 1 + 0.5 * 0.8, 0.5 * 1 + 0.5 * 1.2]])
    smoothed = (N + 0.1) / (N.sum() + 2 * 0.1) * N.sum()
    assert torch.allclose(vq.ema_count, N) and torch.allclose(vq.ema_sum, m)
    assert torch.allclose(vq.codebook, m / smoothed[:, None])
    assert vq.codebook[0].tolist() == pytest.approx([0.3 / (1.1 / 1.7 * 1.5), 0.1 / (1.1 / 1.7 * 1.5)])
    vq.eval(); before = vq.codebook.clone(); vq(z)
    assert torch.equal(vq.codebook, before)  # no EMA step in eval mode


def test_quantiser_rejects_bad_inputs():
    with pytest.raises(UADInputError, match=r"z_e must be \(B, 2, H, W\)"):
        _vq()(torch.zeros(1, 3, 2, 2))
    with pytest.raises(UADInputError, match="decay"):
        VectorQuantizer(4, 2, ema=True, decay=1.0)
    with pytest.raises(UADInputError, match="codes must be"):
        _vq().lookup(torch.zeros(2, 2, dtype=torch.long))
    w = VectorQuantizer(64, 3).codebook
    assert w.abs().max() <= 1 / 64 and w.std() > 0   # uniform(-1/K, 1/K)


# ---------------------------------------------------------------- VQ-VAE

def test_vqvae_matches_table_4_3_and_the_layout():
    assert n_params(VQVAE(n_codes=128, dim=128)) == 1_005_825
    assert n_params(VQVAE(n_codes=256, dim=128)) == 1_022_209
    assert n_params(VQVAE(ema=True)) == 1_005_825 - 128 * 128
    m = VQVAE()
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in m.down] == \
        [(1, 32, (5, 5), (2, 2), (1, 1)), (32, 64, (5, 5), (2, 2), (1, 1)), (64, 128, (5, 5), (2, 2), (1, 1))]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in m.up] == [(128, 64, (5, 5)), (64, 32, (5, 5)), (32, 1, (5, 5))]
    assert m.pre_vq.kernel_size == (1, 1) and m.post_vq.kernel_size == (1, 1) and m.enc_conv.kernel_size == (3, 3)
    res = [c for c in m.enc_res.modules() if isinstance(c, nn.Conv2d)]
    assert len(res) == 4 and all(c.bias is None and c.kernel_size == (3, 3) for c in res)


@pytest.mark.parametrize("hw", [(64, 64), (95, 79), (33, 50)])
def test_vqvae_protocol_at_any_size(hw):
    seed_everything(0)
    m = VQVAE(n_codes=16, dim=8, channels=(4, 8, 8), res_hidden=4).eval()
    x = torch.rand(2, 1, *hw)
    info = check_model(m, x)
    h, w = conv_sizes(hw, 3, 5, 1)[-1]
    assert info["recon"] == (2, 1, *hw) and info["encode"] == (2, 8 * h * w)
    assert {"recon", "z_q", "z_e", "codes", "vq_loss", "perplexity"} <= set(info["outputs"])
    assert torch.allclose(m(x)["recon"], m.reconstruct(x), atol=1e-6)  # z_e + (q - z_e) is q up to rounding
    assert VQVAE.recon_range is None


def test_vqvae_reconstruct_does_not_step_the_ema():
    m = VQVAE(n_codes=8, dim=4, channels=(4, 4, 4), res_hidden=2, ema=True).train()
    before = m.quantizer.codebook.clone()
    m.reconstruct(torch.rand(2, 1, 32, 32)); m.encode(torch.rand(2, 1, 32, 32))
    assert torch.equal(m.quantizer.codebook, before)
    m(torch.rand(2, 1, 32, 32))
    assert not torch.equal(m.quantizer.codebook, before)


def test_sizes_and_bad_inputs():
    assert conv_sizes((95, 79), 3, 5, 1) == [(95, 79), (47, 39), (23, 19), (11, 9)]
    assert conv_sizes((95, 79), 3, 5, 2)[-1] == (12, 10)
    m = VQVAE(n_codes=8, dim=4, channels=(4, 4, 4), res_hidden=2)
    with pytest.raises(UADInputError, match="too small"):
        m(torch.rand(1, 1, 8, 8))
    with pytest.raises(UADInputError, match=r"VQVAE needs images \(B, 1, H, W\)"):
        m(torch.rand(1, 3, 32, 32))
    with pytest.raises(UADInputError, match="does not decode to"):
        m.decode(torch.rand(1, 4, 3, 3), (64, 64))


# ---------------------------------------------------------------- the objective

def test_vq_objective_parts_on_a_tiny_batch():
    seed_everything(0)
    m = VQVAE(n_codes=8, dim=4, channels=(4, 4, 4), res_hidden=2, beta=0.25)
    x = torch.rand(2, 1, 32, 32)
    loss, parts = VQObjective()(m, x)
    assert sorted(parts) == ["codebook", "commitment", "perplexity", "rec"]
    assert parts["rec"].item() == pytest.approx(((m(x)["recon"] - x) ** 2).mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx((parts["rec"] + parts["codebook"] + 0.25 * parts["commitment"]).item(), rel=1e-6)
    loss2, p2 = VQObjective(beta=1.0, rec="l1")(m, x)
    assert p2["rec"].item() == pytest.approx((m(x)["recon"] - x).abs().mean().item(), rel=1e-5)
    assert loss2.item() == pytest.approx((p2["rec"] + p2["codebook"] + p2["commitment"]).item(), rel=1e-6)
    class Fixed(nn.Module):  # recon = x + 0.5; the quantiser terms with different values
        quantizer = VectorQuantizer(2, 1, beta=0.5)
        def forward(self, x):
            return {"recon": x + 0.5, "codebook_loss": torch.tensor(0.2), "commitment_loss": torch.tensor(0.4), "perplexity": torch.tensor(1.0)}
    assert VQObjective()(Fixed(), x)[0].item() == pytest.approx(0.25 + 0.2 + 0.5 * 0.4)        # the model's beta
    assert VQObjective(beta=0.1)(Fixed(), x)[0].item() == pytest.approx(0.25 + 0.2 + 0.1 * 0.4)  # overridden
    with pytest.raises(UADInputError, match="rec must be one of"):
        VQObjective(rec="l2")
    with pytest.raises(UADInputError, match=">= 0"):
        VQObjective(beta=-1)


def _overfit(ema, steps=30):
    seed_everything(0)
    m = VQVAE(n_codes=16, dim=8, channels=(8, 16, 16), res_hidden=8, ema=ema)
    x = torch.from_numpy(blob_slices(4, 32))[:, None]
    opt, obj, losses = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=2e-3), VQObjective(), []
    for _ in range(steps):
        loss, _ = obj(m, x); opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    return losses, m


@pytest.mark.parametrize("ema", [False, True])
def test_overfit_four_images_lowers_the_loss(ema):
    losses, m = _overfit(ema)
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
    again, m2 = _overfit(ema)
    assert again == losses and torch.equal(m.quantizer.codebook, m2.quantizer.codebook)  # seeded: bit-identical


def test_vqvae_trains_through_the_engine(tmp_path):
    seed_everything(0)
    m = VQVAE(n_codes=8, dim=4, channels=(4, 8, 8), res_hidden=4)
    h = train_model(m, blob_slices(8, 32), blob_slices(4, 32, seed=4), TrainConfig(epochs=2, batch_size=4, lr=1e-3, device="cpu"),
                    tmp_path, progress=False, objective=VQObjective())
    last = h[-1]
    assert all(np.isfinite(last[k]) for k in ["train_loss", "train_rec", "train_codebook", "train_commitment", "val_loss"])
    assert 1.0 <= last["train_perplexity"] <= 8.0
    assert last["train_loss"] == pytest.approx(last["train_rec"] + last["train_codebook"] + 0.25 * last["train_commitment"], rel=1e-5)


# ---------------------------------------------------------------- the thesis VAE and Table 4.3

def test_thesis_vae_counts_and_protocol():
    assert n_params(ThesisVAE(64)) == 1_425_841 and n_params(ThesisVAE(128)) == 1_917_489   # Table 4.3 + 2,448
    assert n_params(ThesisVAE(128)) - n_params(ThesisVAE(64)) == 1_915_041 - 1_423_393       # per latent unit: exact
    seed_everything(0)
    m = ThesisVAE().eval()
    x = torch.rand(2, 1, 95, 79)
    info = check_model(m, x)
    assert info["outputs"] == ["logvar", "mu", "recon", "z"] and info["encode"] == (2, 128)
    assert m.fc_mu.in_features == 16 * 12 * 10 and m.fc_dec.out_features == 32 * 12 * 10
    assert torch.equal(m(x)["z"], m(x)["mu"]) and torch.equal(m.encode(x), m(x)["mu"])
    m.train()
    assert not torch.equal(m(x)["z"], m(x)["mu"])  # sampled in training
    with pytest.raises(UADInputError, match=r"ThesisVAE needs images \(B, 1, 95, 79\)"):
        m(torch.rand(1, 1, 64, 64))


def test_thesis_vae_pairs_with_vae_objective():
    seed_everything(0)
    m = ThesisVAE(8, input_hw=(32, 32))
    x = torch.rand(4, 1, 32, 32)
    loss, parts = VAEObjective()(m, x)
    assert sorted(parts) == ["kl", "rec"] and loss.item() == pytest.approx(((parts["rec"] + parts["kl"]) / (32 * 32)).item(), rel=1e-5)
    loss.backward()
    assert m.fc_mu.weight.grad is not None and m.fc_logvar.weight.grad.abs().sum() > 0


def test_param_table():
    rows = {("VAE", 64, None): ThesisVAE(64), ("VQVAE", 128, 128): VQVAE(128, 128), ("VQVAE", 128, 256): VQVAE(256, 128)}
    t = param_table(rows)
    assert list(t.columns) == ["model", "latent_size", "latent_vector", "thesis", "ours", "difference"]
    assert t["thesis"].tolist() == [r["params"] for r in THESIS_PARAM_COUNTS] and len(t) == 6
    assert t["difference"].tolist()[0] == 2448 and t["difference"].tolist()[2:4] == [0, 0]
    assert t["ours"].isna().tolist() == [False, True, False, False, True, True]
    with pytest.raises(UADInputError, match="keyed by Table 4.3 rows"):
        param_table({("VQVAE", 64, 128): VQVAE()})


def test_residual_stack_is_a_residual():
    s = ResidualStack(3, 2, 1)
    with torch.no_grad():
        for c in s.modules():
            if isinstance(c, nn.Conv2d): c.weight.zero_()
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(s(x), torch.relu(x))  # zero convolutions: identity skip, then the stack's ReLU
