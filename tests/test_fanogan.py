"""f-AnoGAN (Schlegl et al. 2019): the WGAN-GP gradient penalty on hand cases (linear critic: (||w|| - 1)^2 per sample, not
of the batch; a quadratic critic at alpha = 0 and 1; its gradient through create_graph), the critic/generator step schedule
through the engine, the izi_f terms (pixel MSE in [-1, 1], feature MSE averaged), stage 2 leaving the generator, its
batch-norm statistics and the critic untouched, the study-kit fit, the model protocol."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import blob_slices
from uad_study.core import UADInputError
from uad_study.models.base import check_model
from uad_study.models.fanogan import (FANOGAN_PROFILES, FAnoGAN, FAnoGANConfig, IzifObjective, WGANGPObjective, fanogan_spec,
                                      gradient_penalty, izif_terms, train_fanogan)
from uad_study.training import TrainConfig, train_model

TINY = FAnoGANConfig(in_size=16, dim=4, z_dim=8)


def _linear_critic(w):
    lin = nn.Linear(w.numel(), 1)
    with torch.no_grad(): lin.weight.copy_(w.view(1, -1)); lin.bias.fill_(-3.0)
    return lin, (lambda x: lin(x.flatten(1))[:, 0])


def test_gp_linear_critic_is_norm_minus_one_squared():
    _, crit = _linear_critic(torch.tensor([3.0, 0.0, 0.0, 4.0]))           # ||w|| = 5
    real, fake = torch.rand(6, 1, 2, 2), torch.rand(6, 1, 2, 2)
    gp = gradient_penalty(crit, real, fake)
    assert gp.item() == pytest.approx(16.0, abs=1e-5)                       # (5 - 1)^2
    assert gp.item() != pytest.approx((25 - 1) ** 2)                        # not the squared norm
    assert gp.item() != pytest.approx((math.sqrt(6) * 5 - 1) ** 2)          # not the norm over the whole batch


def test_gp_quadratic_critic_interpolates_per_sample():
    crit = lambda x: 0.5 * x.flatten(1).square().sum(1)                     # grad = x_hat
    real, fake = torch.rand(3, 1, 2, 2), torch.rand(3, 1, 2, 2)
    for a, pts in ((0.0, real), (1.0, fake)):
        want = (pts.flatten(1).norm(dim=1) - 1).square().mean()
        assert gradient_penalty(crit, real, fake, torch.full((3,), a)).item() == pytest.approx(want.item(), rel=1e-6)
    a = torch.tensor([0.0, 0.5, 1.0])
    mid = real + a.view(-1, 1, 1, 1) * (fake - real)
    assert gradient_penalty(crit, real, fake, a).item() == pytest.approx((mid.flatten(1).norm(dim=1) - 1).square().mean().item(), rel=1e-6)
    with pytest.raises(UADInputError, match="same shape"): gradient_penalty(crit, real, fake[:2])


def test_gp_gradient_reaches_the_critic():
    lin, crit = _linear_critic(torch.tensor([3.0, 0.0, 0.0, 4.0]))
    gradient_penalty(crit, torch.rand(2, 1, 2, 2), torch.rand(2, 1, 2, 2)).backward()
    w = lin.weight.detach()
    assert torch.allclose(lin.weight.grad, 2 * (5 - 1) * w / 5, atol=1e-5)  # d/dw (||w|| - 1)^2


def _copy(mod): return [p.detach().clone() for p in mod.parameters()]
def _same(a, mod): return all(torch.equal(x, y) for x, y in zip(a, mod.parameters()))


@pytest.mark.parametrize("steps,gen_moves", [(4, False), (5, True)])
def test_generator_steps_every_n_critic(tmp_path, steps, gen_moves):
    torch.manual_seed(0); m = FAnoGAN(TINY)
    g0, d0, e0 = _copy(m.generator), _copy(m.critic), _copy(m.encoder)
    data = blob_slices(2 * steps, 16)
    hist = train_model(m, data, data[:4], TrainConfig(epochs=1, batch_size=2, device="cpu", grad_clip=None), tmp_path,
                       progress=False, objective=WGANGPObjective(n_critic=5))
    assert not _same(d0, m.critic) and _same(e0, m.encoder)
    assert _same(g0, m.generator) != gen_moves
    r = hist[0]
    assert math.isfinite(r["train_gp"]) and math.isfinite(r["val_loss"]) and ("train_g_loss" in r) == gen_moves


def test_izif_terms_by_hand():
    torch.manual_seed(1); m = FAnoGAN(TINY).eval(); x = torch.rand(3, 1, 16, 16)
    t = izif_terms(m, x)
    xh = m.generator(m.encoder(x))
    assert torch.allclose(t["a_r"], ((2 * x - 1) - (2 * xh - 1)).square().mean((1, 2, 3)), atol=1e-6)
    fx, fh = m.critic(x)[1], m.critic(xh)[1]
    assert torch.allclose(t["a_d"], (fx - fh).square().mean(1), atol=1e-6)   # averaged over features, not summed
    loss, parts = IzifObjective(kappa=0.0)(m, x)
    assert loss.item() == pytest.approx(t["a_r"].mean().item(), rel=1e-6)
    loss, _ = IzifObjective(kappa=2.0)(m, x)
    assert loss.item() == pytest.approx((t["a_r"] + 2 * t["a_d"]).mean().item(), rel=1e-5)
    assert torch.allclose(m.anomaly_score(x), t["a_r"] + t["a_d"], atol=1e-6)


def test_two_stages_freeze_the_gan(tmp_path):
    torch.manual_seed(0); m = FAnoGAN(TINY); data = blob_slices(8, 16)
    cfg = lambda: TrainConfig(epochs=1, batch_size=4, device="cpu", grad_clip=None)
    seen = {}
    def train_fn(model, *a, objective, **kw):
        if isinstance(objective, IzifObjective):                            # the start of stage 2: remember stage 1's end
            seen.update(g=_copy(model.generator), d=_copy(model.critic), e=_copy(model.encoder),
                        bn=[b.clone() for b in model.generator.buffers()])
        return train_model(model, *a, objective=objective, **kw)
    hist = train_fanogan(m, data, data[:4], cfg(), cfg(), tmp_path, progress=False, train_fn=train_fn)
    assert [h["stage"] for h in hist] == [1, 2]
    assert _same(seen["g"], m.generator) and _same(seen["d"], m.critic) and not _same(seen["e"], m.encoder)
    assert all(torch.equal(a, b) for a, b in zip(seen["bn"], m.generator.buffers()))   # G ran in eval mode
    assert (tmp_path / "wgan" / "best.pt").is_file() and (tmp_path / "encoder" / "best.pt").is_file()
    assert (tmp_path / "train_log.csv").is_file() and not m.training


def test_smoke_spec_fit_and_protocol(tmp_path):
    tc = lambda cfg, **fixed: TrainConfig(**{"epochs": 1, "batch_size": 4, "device": "cpu", **fixed})
    spec = fanogan_spec("smoke", train_fn=train_model, train_config=tc)
    cfg = SimpleNamespace(resolution=32, seed=0)
    torch.manual_seed(0); m = spec["build"](cfg)
    assert m.cfg.dim == FANOGAN_PROFILES["smoke"]["dim"] and m.cfg.in_size == 32
    data = blob_slices(8, 32)
    x = torch.from_numpy(data[:3])[:, None]
    o = m(x); assert o["recon"].shape == x.shape and o["z"].shape == (3, m.cfg.z_dim)
    sets = {"train": SimpleNamespace(slices=data), "val": SimpleNamespace(slices=data[:4])}
    hist = spec["fit"](m, sets, cfg, tmp_path / "fanogan", False, False)
    assert {h["stage"] for h in hist} == {1, 2} and all(math.isfinite(h["train_loss"]) for h in hist)
    info = check_model(m, x)
    assert info["recon"] == (3, 1, 32, 32) and info["encode"] == (3, m.cfg.z_dim)
    assert spec["describe"](cfg)["parameters"] == sum(p.numel() for p in m.parameters())
    assert isinstance(spec["objective"](cfg), IzifObjective)


def test_bad_inputs():
    with pytest.raises(UADInputError, match="4 \\* 2\\*\\*n"): FAnoGANConfig(in_size=24)
    with pytest.raises(UADInputError, match="FAnoGAN needs images"): FAnoGAN(TINY)(torch.rand(2, 1, 32, 32))
    with pytest.raises(UADInputError, match="needs a model of class FAnoGAN"): IzifObjective()(nn.Linear(2, 2), torch.rand(2, 1, 16, 16))
    with pytest.raises(UADInputError, match="kappa"): FAnoGAN(TINY, kappa=-1)


def test_optimisers_own_their_networks():
    m = FAnoGAN(TINY); cfg = SimpleNamespace(lr=1e-3, weight_decay=0.0)
    opts = WGANGPObjective().optimizers(m, cfg)
    assert list(opts) == ["critic", "generator"] and opts["critic"].defaults["betas"] == (0.0, 0.9)
    ids = lambda o: {id(p) for g in o.param_groups for p in g["params"]}
    assert ids(opts["critic"]) == {id(p) for p in m.critic.parameters()}
    assert ids(opts["generator"]) == {id(p) for p in m.generator.parameters()}
    assert ids(IzifObjective().optimizers(m, cfg)["encoder"]) == {id(p) for p in m.encoder.parameters()}
