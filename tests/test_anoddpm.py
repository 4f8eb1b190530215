"""AnoDDPM (Wyatt et al. 2022): the scaled linear schedule's alpha-bars by hand and against `noise.alpha_bar`, the forward
draw's moments, one reverse step against MONAI's DDPMScheduler, an oracle denoiser that the reverse chain must follow to its
target, partial diffusion starting at t_test (not T) with one batched U-Net pass per step, determinism, the study-kit spec,
and one training step through the engine."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import blob_slices
from uad_study.core import UADInputError
from uad_study.models.anoddpm import (ANODDPM_PROFILES, AnoDDPM, AnoDDPMConfig, DDPMObjective, DDPMSchedule, anoddpm_spec,
                                      matched_t)
from uad_study.models.base import check_model
from uad_study.noise import alpha_bar, linear_betas
from uad_study.training import TrainConfig, train_model

TINY = dict(in_size=16, ch=8, ch_mult=(1, 2), n_res=1, attn_res=(8,), T=30, t_test=5)


def test_alpha_bars_by_hand():
    s = DDPMSchedule(1000)
    b1, b2, b3 = 1e-4, 1e-4 + 0.0199 / 999, 1e-4 + 2 * 0.0199 / 999
    assert s.alpha_bars[0].item() == pytest.approx(1 - b1, abs=1e-15)             # index 0 is t = 1, not t = 0
    assert s.alpha_bars[2].item() == pytest.approx((1 - b1) * (1 - b2) * (1 - b3), abs=1e-15)   # a product, not a sum
    assert s.betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    for t in (1, 250, 1000): assert s.alpha_bars[t - 1].item() == pytest.approx(alpha_bar(t, linear_betas()), abs=1e-12)
    assert 0.5 < s.alpha_bars[249].item() < 0.55 and s.alpha_bars[-1].item() < 1e-4


def test_short_schedule_is_scaled():
    s = DDPMSchedule(40)                                  # betas x 1000 / 40 = 25
    assert s.betas[0].item() == pytest.approx(25e-4) and s.betas[-1].item() == pytest.approx(0.5)
    assert s.alpha_bars[-1].item() < 1e-3                 # ends near pure noise, unlike the unscaled 40 steps
    assert DDPMSchedule(40, scale=False).alpha_bars[-1].item() > 0.6
    with pytest.raises(UADInputError, match="T must exceed 20"): DDPMSchedule(20)
    assert matched_t(1000) == 250
    t = matched_t(200)
    assert abs(DDPMSchedule(200).alpha_bars[t - 1] - DDPMSchedule(1000).alpha_bars[249]) < 5e-3


def test_forward_draw_moments():
    s, t = DDPMSchedule(50), 20
    x0 = torch.full((4000, 1, 2, 2), 0.6, dtype=torch.float64)
    xt = s.q_sample(x0, torch.full((4000,), t), torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    ab = s.alpha_bars[t].item()
    assert xt.shape == x0.shape
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.6, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.05)
    with pytest.raises(UADInputError, match="noise must have"): s.q_sample(x0, torch.zeros(4000, dtype=torch.long), torch.zeros(1))


@pytest.mark.parametrize("T", [50, 1000])
def test_reverse_step_matches_monai(T):
    from monai.networks.schedulers import DDPMScheduler
    mon = DDPMScheduler(T, "linear_beta", variance_type="fixed_large", clip_sample=False, beta_start=1e-4 * 1000 / T,
                        beta_end=0.02 * 1000 / T)
    s, g = DDPMSchedule(T), torch.Generator().manual_seed(5)
    assert torch.allclose(mon.alphas_cumprod.double(), s.alpha_bars, atol=1e-5)     # the same schedule (MONAI in float32)
    mon.betas = s.betas.clone(); mon.alphas = 1 - mon.betas; mon.alphas_cumprod = torch.cumprod(mon.alphas, 0)  # float64: compare the step
    xt = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1         # x_t in [-1, 1]: AnoDDPM's clamp is inert
    eps = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    for i in (T - 1, T // 2, 1, 0):
        want, want_x0 = mon.step(eps, i, xt, generator=torch.Generator().manual_seed(9))
        z = torch.randn(eps.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        got, got_x0 = s.p_step(xt, torch.full((3,), i), eps, z)
        assert got.shape == xt.shape
        assert torch.allclose(got, want, atol=1e-10) and torch.allclose(got_x0, want_x0, atol=1e-10), i


class _Oracle(nn.Module):
    "A denoiser that knows the clean image y: eps such that x0_hat(clamped x_t) = y exactly."
    def __init__(self, sched, y):
        super().__init__(); self.s, self.y, self.calls = sched, y, []
    def forward(self, x_t, t):
        self.calls.append((len(x_t), int(t[0])))
        ab = self.s.alpha_bars[t].to(x_t.dtype).view(-1, 1, 1, 1)
        return (x_t.clamp(-1, 1) - ab.sqrt() * self.y) / (1 - ab).sqrt()


def test_reverse_chain_starts_at_t_test_and_reaches_the_oracle_target():
    m = AnoDDPM(AnoDDPMConfig(**TINY)).eval()
    y = torch.rand(3, 1, 16, 16) * 2 - 1
    m.unet = _Oracle(m.schedule, y)
    out = m.reconstruct(torch.rand(3, 1, 16, 16))
    assert m.unet.calls == [(3, i) for i in range(4, -1, -1)]   # t_test = 5: indices 4..0, the whole batch per pass
    assert torch.allclose(out, (y + 1) / 2, atol=1e-5)           # x_{t-1} from x0_hat = y: the chain lands on y
    m.unet.calls.clear(); m.reconstruct(torch.rand(3, 1, 16, 16), t_start=2)
    assert [c[1] for c in m.unet.calls] == [1, 0]


def test_reconstruct_deterministic_and_seeded():
    x = torch.rand(2, 1, 16, 16)
    a, b = AnoDDPM(AnoDDPMConfig(**TINY)).eval(), AnoDDPM(AnoDDPMConfig(**TINY, seed=1)).eval()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.reconstruct(x), a.reconstruct(x))
    assert not torch.equal(a.reconstruct(x), b.reconstruct(x))     # the seed drives the test-time noise
    r = a.reconstruct(x); assert r.min() >= 0 and r.max() <= 1


def test_noise_kinds():
    m = AnoDDPM(AnoDDPMConfig(**TINY))
    g = lambda: torch.Generator().manual_seed(2)
    z = m.draw_noise((2, 1, 16, 16), g())
    assert z.shape == (2, 1, 16, 16) and torch.equal(z, m.draw_noise((2, 1, 16, 16), g()))
    assert not torch.equal(z[0], z[1])                               # a field per sample
    zg = AnoDDPM(AnoDDPMConfig(**TINY, noise="gaussian")).draw_noise((2, 1, 16, 16), g())
    assert torch.equal(zg, torch.randn((2, 1, 16, 16), generator=g()))
    with pytest.raises(UADInputError, match="noise must be one of"): AnoDDPMConfig(noise="perlin")
    with pytest.raises(UADInputError, match="t_test must lie"): AnoDDPMConfig(T=50, t_test=51)


def test_smoke_spec_forward_and_protocol():
    spec = anoddpm_spec("smoke")
    cfg = type("Cfg", (), {"resolution": 32, "seed": 0})()
    m = spec["build"](cfg)
    assert (m.cfg.T, m.cfg.t_test) == (ANODDPM_PROFILES["smoke"]["T"], matched_t(ANODDPM_PROFILES["smoke"]["T"]))
    x = torch.from_numpy(blob_slices(3, 32))[:, None]
    assert check_model(m, x)["recon"] == (3, 1, 32, 32)
    o = m(x)
    assert o["eps_hat"].shape == x.shape and o["noise"].shape == x.shape and o["t"].shape == (3,)
    assert spec["describe"](cfg)["parameters"] == sum(p.numel() for p in m.parameters())
    assert set(spec) == {"build", "objective", "describe", "row"}


def test_objective_is_the_noise_mse():
    m = AnoDDPM(AnoDDPMConfig(**TINY))
    x = torch.rand(2, 1, 16, 16)
    torch.manual_seed(4); loss, parts = DDPMObjective()(m, x)
    torch.manual_seed(4); o = m(x)
    assert loss.item() == pytest.approx((o["eps_hat"] - o["noise"]).square().mean().item(), rel=1e-6)
    torch.manual_seed(4); l1, _ = DDPMObjective("l1")(m, x)
    assert l1.item() == pytest.approx((o["eps_hat"] - o["noise"]).abs().mean().item(), rel=1e-6)
    before = torch.random.get_rng_state()
    v1, v2 = DDPMObjective().val_loss(m, {"image": x}), DDPMObjective().val_loss(m, {"image": x})
    assert v1[0].item() == v2[0].item() and torch.equal(before, torch.random.get_rng_state())


def test_one_training_step_through_the_engine(tmp_path):
    spec = anoddpm_spec("smoke")
    cfg = type("Cfg", (), {"resolution": 32, "seed": 0})()
    torch.manual_seed(0); m = spec["build"](cfg)
    w0 = [p.detach().clone() for p in m.parameters()]
    data = blob_slices(4, 32)
    hist = train_model(m, data, data[:2], TrainConfig(epochs=1, batch_size=4, device="cpu"), tmp_path, progress=False,
                       name="anoddpm", objective=spec["objective"](cfg))
    assert len(hist) == 1 and math.isfinite(hist[0]["train_noise_mse"]) and math.isfinite(hist[0]["val_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(w0, m.parameters()))
    assert (tmp_path / "best.pt").is_file()
