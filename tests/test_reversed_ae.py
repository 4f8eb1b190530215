"""Soft-Intro VAE and RA (issue 12): the model protocol, the reversed embedding loss on hand-made features, the signs of
the Soft-Intro encoder and decoder steps, and training through the engine with a bit-exact resume."""
import copy

import numpy as np
import pytest
from conftest import blob_slices
import torch

from uad_study.core import UADInputError, seed_everything
from uad_study.models.base import check_model
from uad_study.models.reversed_ae import (SoftIntroObjective, SoftIntroVAE, kl_normal, reversed_embedding_loss,
                                          soft_intro_decoder_loss, soft_intro_encoder_loss)
from uad_study.training import StepContext, TrainConfig, load_checkpoint, train_model

SMALL = dict(in_size=32, widths=(4, 8, 8, 16, 16), latent=8)


def _small(**kw):
    seed_everything(0)
    return SoftIntroVAE(**{**SMALL, **kw})


def _blobs(n=16, s=32):
    return blob_slices(n, s)


def test_paper_architecture_widths_and_latent():
    m = SoftIntroVAE()  # the appendix: 128 x 128, five levels 64-128-256-512-512, latent 256
    assert [lv[-1].body[0].out_channels for lv in m.levels[1:]] == [128, 256, 512, 512]
    assert m.levels[0][0].out_channels == 64 and m.fc_enc.out_features == 2 * 256 and m.s == 4
    assert isinstance(m.decoder[-1], torch.nn.Conv2d)
    with pytest.raises(UADInputError, match="divisible"):
        SoftIntroVAE(in_size=100)


def test_shapes_and_protocol():
    m = _small().eval()
    x = torch.rand(3, 1, 32, 32)
    info = check_model(m, x)
    assert info["outputs"] == ["logvar", "mu", "recon", "z"] and info["encode"] == (3, 8)
    assert info["feature_layers"] == [f"enc{l}" for l in range(5)]
    feats = m.encoder_features(x)
    # RA's taps: after each level's 2x2 average pooling (in/2 ... in/32), not before it
    assert [tuple(f.shape) for f in feats] == [(3, 4, 16, 16), (3, 8, 8, 8), (3, 8, 4, 4), (3, 16, 2, 2), (3, 16, 1, 1)]
    o = m(x)
    assert torch.equal(o["z"], o["mu"]) and torch.equal(o["recon"], m.reconstruct(x))  # eval: the posterior mean
    m.train()
    assert not torch.equal(m(x)["z"], m(x)["z"])  # training: sampled


def test_reversed_loss_hand_computed_and_zero():
    # two samples: (1,0) vs (0,1): 1 - 0 ; (3,4) vs (3,4): 1 - 1 -> cosine part mean 0.5; MSE (1+1+0+0)/4 = 0.5 -> 0.25
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0]], requires_grad=True)
    b = torch.tensor([[0.0, 1.0], [3.0, 4.0]], requires_grad=True)
    # level 2 (4-d maps): (1,1,1,1) vs (2,2,2,2): cosine 1, MSE 1 -> 0.5
    c = torch.ones(1, 1, 2, 2, requires_grad=True)
    d = torch.full((1, 1, 2, 2), 2.0, requires_grad=True)
    loss = reversed_embedding_loss([a, c], [b, d])
    assert loss.item() == pytest.approx(0.5 + 0.25 + 0.5, abs=1e-6)
    loss.backward()
    # RA's code (RA_Trainer.py: encode(rec.detach())): the embeddings of both sides receive a gradient
    assert b.grad.abs().sum() > 0 and d.grad.abs().sum() > 0
    assert a.grad.abs().sum() > 0 and c.grad.abs().sum() > 0
    for t in (a, b, c, d): t.grad = None
    # the fixed-target reading: only the input's embedding is pulled
    reversed_embedding_loss([a, c], [b, d], detach_target=True).backward()
    assert b.grad is None and d.grad is None and a.grad.abs().sum() > 0
    assert reversed_embedding_loss([a, c], [a, c]).item() == pytest.approx(0.0, abs=1e-6)


def _kl_fake(m, z_p):
    "Mean KL of the posteriors of the generated samples D(z_p)."
    with torch.no_grad():
        e = m.encoder_outputs(m.decode(z_p))
        return kl_normal(e["mu"], e["logvar"]).mean().item()


def _one_step(m, obj, which, x, z_p):
    "One encoder step or one decoder step of the Soft-Intro objective on a copy of `m`."
    m = copy.deepcopy(m)
    opts = obj.optimizers(m, TrainConfig(device="cpu"))
    scalers = {k: torch.amp.GradScaler("cpu", enabled=False) for k in opts}
    ctx = StepContext(opts, scalers, TrainConfig(device="cpu"), 0, 0, 1, torch.device("cpu"))
    torch.manual_seed(5)
    if which == "encoder":
        loss, _, _ = soft_intro_encoder_loss(obj, m, x, z_p)
    else:
        with torch.no_grad():
            e = m.encoder_outputs(x)
            z = e["mu"] + torch.randn_like(e["mu"]) * (0.5 * e["logvar"]).exp()
        loss, _ = soft_intro_decoder_loss(obj, m, x, z, z_p)
    before = {k: [p.clone() for p in o.param_groups[0]["params"]] for k, o in opts.items()}
    ctx.optimise(which, loss)
    other = "decoder" if which == "encoder" else "encoder"
    assert all(torch.equal(p, q) for p, q in zip(before[other], opts[other].param_groups[0]["params"])), f"{which} step moved the {other}"
    return m


@pytest.mark.parametrize("reversed_weight", [0.0, 5e-3])
def test_signs_encoder_pushes_fakes_away_decoder_pulls_them_in(reversed_weight):
    m = _small()
    x = torch.from_numpy(_blobs(8))[:, None]
    torch.manual_seed(1); z_p = torch.randn(8, 8)
    obj = SoftIntroObjective(reversed_weight=reversed_weight, lr=1e-3)
    k0 = _kl_fake(m, z_p)
    k_enc = _kl_fake(_one_step(m, obj, "encoder", x, z_p), z_p)
    k_dec = _kl_fake(_one_step(m, obj, "decoder", x, z_p), z_p)
    assert k_enc > k0, f"the encoder step must raise the generated samples' KL: {k0} -> {k_enc}"
    assert k_dec < k0, f"the decoder step must lower the generated samples' KL: {k0} -> {k_dec}"


def test_train_model_logs_both_parts_and_resumes_bit_exactly(tmp_path):
    data = {"image": _blobs(16)}
    obj = lambda: SoftIntroObjective(reversed_weight=5e-3, lr=1e-4)
    cfg = lambda e: TrainConfig(epochs=e, batch_size=8, device="cpu")
    full = _small()
    h = train_model(full, data, {"image": _blobs(16)[:4]}, cfg(3), tmp_path / "full", progress=False, objective=obj())
    for k in ["train_encoder", "train_decoder", "train_kl_real", "train_kl_fake", "train_kl_rec", "train_reversed",
              "train_exp_elbo_fake", "lr_encoder", "lr_decoder"]:
        assert k in h[0] and np.isfinite(h[-1][k]), k
    assert h[0]["lr_encoder"] == pytest.approx(1e-4)
    part = _small()
    train_model(part, data, {"image": _blobs(16)[:4]}, cfg(2), tmp_path / "part", progress=False, objective=obj())
    del part
    torch.manual_seed(999)
    resumed = _small()
    h2 = train_model(resumed, data, {"image": _blobs(16)[:4]}, cfg(3), tmp_path / "part", progress=False, objective=obj())
    assert [r["epoch"] for r in h2] == [1, 2, 3]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"parameter {k} differs after resume"
    assert sorted(load_checkpoint(tmp_path / "part" / "last.pt")["optimizers"]) == ["decoder", "encoder"]


def test_plain_objective_logs_no_reversed_part_and_rejects_bad_weights():
    m = _small()
    x = torch.from_numpy(_blobs(4))[:, None]
    _, parts, _ = soft_intro_encoder_loss(SoftIntroObjective(), m, x, torch.randn(4, 8))
    assert "reversed" not in parts and "exp_elbo_fake" in parts
    with pytest.raises(UADInputError, match=">= 0"):
        SoftIntroObjective(reversed_weight=-1)


def test_inference_encode_keeps_the_whole_posterior_mean():
    "SoftIntroVAE.encode gives the mean alone: `inference.encode` must not halve it (as it does for DenseVAE's mean+logvar)."
    from uad_study.inference import encode
    from uad_study.models.baselines import DenseVAE
    x = np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)
    m = _small().eval()
    z = encode(m, x, device="cpu")
    with torch.no_grad(): mu = m.encode(torch.from_numpy(x)[:, None])
    assert z.shape == (3, m.latent) and np.allclose(z, mu.numpy())
    v = DenseVAE(in_size=32, channels=(4, 8), latent_dim=5).eval()
    assert encode(v, x, device="cpu").shape == (3, 5)
