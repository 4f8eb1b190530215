"""VQ-GAN (thesis Sec. 3.3 eqs. 3.13-3.14, Sec. 4.2, Tables 4.2-4.3): block and attention reference values, shapes on
square, non-square and padded inputs, Table 4.3's parameter counts, Table 4.2's discriminator, eq. 3.14 by hand, the hinge
losses, the discriminator's start step, the sign of the adversarial term, the perceptual label, and training."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import blob_slices

from uad_study.core import UADInputError, seed_everything
from uad_study.models.base import check_model
from uad_study.models.vqgan import (VQGAN, NonLocalBlock, PatchDiscriminator, ResBlock, VQGANObjective, adaptive_weight,
                                    hinge_d_loss, perceptual_distance, vqgan_generator_loss)
from uad_study.training import StepContext, TrainConfig, load_checkpoint, train_model

NARROW = dict(n_codes=16, dim=8, ch=8, ch_mult=(1, 2, 2), n_res=1, ndf=8)


def _small(**kw):
    seed_everything(0)
    return VQGAN(**{**NARROW, **kw})


def _ctx(obj, m, gstep, world_size=1, lr=1e-3):
    "A StepContext at global step `gstep` (epoch 0, 100 steps per epoch) with the objective's optimisers."
    opts = obj.optimizers(m, TrainConfig(device="cpu", lr=lr))
    scalers = {k: torch.amp.GradScaler("cpu", enabled=False) for k in opts}
    return StepContext(opts, scalers, TrainConfig(device="cpu"), 0, gstep, 100, torch.device("cpu"), world_size=world_size)


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


class _Stub(nn.Module):
    "A perceptual stand-in that records its inputs: mean absolute difference per pixel, as a map."
    def forward(self, a, b):
        self.seen = (a.detach().clone(), b.detach().clone())
        return (a - b).abs().mean(1, keepdim=True)


def test_blocks_groups_skip_and_attention_reference():
    assert isinstance(ResBlock(8, 8).skip, nn.Identity) and isinstance(ResBlock(8, 16).skip, nn.Conv2d)
    assert ResBlock(8, 16).skip.kernel_size == (1, 1)
    norms = [m for m in ResBlock(8, 96).modules() if isinstance(m, nn.GroupNorm)]
    assert [(g.num_groups, g.eps) for g in norms] == [(8, 1e-6), (32, 1e-6)]  # gcd(32, c) groups, taming's eps
    torch.manual_seed(0)
    nl = NonLocalBlock(4)
    x = torch.randn(2, 4, 3, 2)
    with torch.no_grad():
        h = nl.norm(x)
        q, k, v = (m(h).flatten(2) for m in (nl.q, nl.k, nl.v))        # (B, c, HW)
        w = torch.softmax(q.transpose(1, 2) @ k / 2.0, dim=-1)         # sqrt(c) = 2, softmax over attended positions
        want = x + nl.proj_out((v @ w.transpose(1, 2)).reshape(2, 4, 3, 2))
        wrong = x + nl.proj_out((v @ torch.softmax(q.transpose(1, 2) @ k / 2.0, dim=1).transpose(1, 2)).reshape(2, 4, 3, 2))
        got = nl(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, wrong, atol=1e-3)  # softmax over the querying positions would be another block
    assert sum(p.numel() for p in nl.parameters()) == 2 * 4 + 4 * (4 * 4 + 4)  # GroupNorm + four 1x1 convolutions


@pytest.mark.parametrize("size", [(32, 32), (32, 48), (30, 26)])
def test_shapes_square_nonsquare_padded_and_protocol(size):
    m = _small().eval()
    x = torch.rand(2, 1, *size)
    info = check_model(m, x)
    h, w = -(-size[0] // 4), -(-size[1] // 4)  # three levels: factor 4; 30 x 26 is zero-padded to 32 x 28
    assert info["recon"] == (2, 1, *size) and info["encode"] == (2, 8 * h * w)
    o = m(x)
    assert o["codes"].shape == (2, h, w) and o["z_q"].shape == (2, 8, h, w)
    assert {"vq_loss", "codebook_loss", "commitment_loss", "perplexity"} <= set(o)
    assert 0.0 <= o["recon"].min() and o["recon"].max() <= 1.0
    if size == (30, 26):  # the padding is zeros at the bottom and right, the crop the top-left corner
        xp = torch.zeros(2, 1, 32, 28); xp[..., :30, :26] = x
        assert torch.equal(m(xp)["recon"][..., :30, :26], o["recon"])
    assert m.last_layer() is m.decoder[-1].weight and m.last_layer().shape == (1, 8, 3, 3)


def test_linear_output_declares_no_range_and_bad_inputs_raise():
    m = _small(output="linear").eval()
    assert m.recon_range is None and VQGAN.recon_range == (0.0, 1.0)
    check_model(m, torch.rand(2, 1, 32, 32))
    with pytest.raises(UADInputError, match="VQGAN needs images"):
        m(torch.rand(2, 3, 32, 32))
    with pytest.raises(UADInputError, match="attn_levels"):
        VQGAN(**{**NARROW, "attn_levels": (3,)})
    with pytest.raises(UADInputError, match="output must be"):
        VQGAN(**{**NARROW, "output": "tanh"})
    assert VQGAN(**{**NARROW, "attn_levels": (-1, 0)}).attn_levels == (0, 2)


def _count(make):
    with torch.device("meta"):
        m = make()
    return (sum(p.numel() for p in m.generator_parameters()), sum(p.numel() for p in m.discriminator.parameters()),
            sum(p.numel() for p in m.parameters()))


def test_paper_parameter_counts_table_4_3():
    g, d, total = _count(lambda: VQGAN.paper(128, 128))
    assert (g, d, total) == (70_612_993, 2_763_585, 73_376_578)
    assert abs(total - 73_445_826) / 73_445_826 < 1e-3     # Table 4.3 counts the discriminator: within 0.1 %
    assert abs(g - 73_445_826) > 2_000_000                 # without it, 2.8 M short
    g2, _, total2 = _count(lambda: VQGAN.paper(256, 128))
    assert total2 - total == 73_462_210 - 73_445_826 == 128 * 128  # 128 more codes of dimension 128
    assert _count(lambda: VQGAN(128, 128, ch=32, ch_mult=(1, 2, 2))) == (1_560_929, 2_763_585, 4_324_514)
    with torch.device("meta"):
        m = VQGAN.paper()
    assert m.attn_levels == (4,) and m.factor == 16
    assert sum(isinstance(b, NonLocalBlock) for b in m.encoder) == 2 + 1   # level 4's two blocks and the middle one
    assert sum(isinstance(b, NonLocalBlock) for b in m.decoder) == 1 + 3   # the middle one and level 4's three
    assert sum(isinstance(b, ResBlock) for b in m.encoder) == 5 * 2 + 2 and sum(isinstance(b, ResBlock) for b in m.decoder) == 2 + 5 * 3


def test_discriminator_matches_table_4_2():
    seed_everything(0)
    d = PatchDiscriminator()
    # edge // 8 - 2: 64 -> 32 -> 16 -> 8 -> 7 -> 6 and 128 -> 64 -> 32 -> 16 -> 15 -> 14
    assert d(torch.zeros(2, 1, 64, 64)).shape == (2, 1, 6, 6)
    assert d(torch.zeros(1, 1, 128, 128)).shape == (1, 1, 14, 14)
    assert d(torch.zeros(1, 1, 80, 64)).shape == (1, 1, 8, 6)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == [((4, 4), (2, 2), (1, 1))] * 3 + [((4, 4), (1, 1), (1, 1))] * 2
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    kinds = [type(m).__name__ for m in d.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU))]
    assert kinds == ["Conv2d", "LeakyReLU"] + ["Conv2d", "BatchNorm2d", "LeakyReLU"] * 3 + ["Conv2d"]
    assert all(m.negative_slope == 0.2 for m in d.modules() if isinstance(m, nn.LeakyReLU))
    with pytest.raises(UADInputError, match="H, W >= 24"):
        d(torch.zeros(1, 1, 16, 64))


def test_adaptive_weight_by_hand_and_not_the_inverse():
    w = torch.zeros(2, requires_grad=True)
    rec = (w * torch.tensor([3.0, 4.0])).sum() + 100.0      # gradient norm 5; the loss's value plays no part
    gan = (w * torch.tensor([0.6, 0.8])).sum() - 7.0        # gradient norm 1
    lam = adaptive_weight(rec, gan, w)
    assert lam.item() == pytest.approx(5.0 / (1.0 + 1e-4), rel=1e-6) and not lam.requires_grad
    (rec + lam * gan).backward()                            # the graph was kept for the backward pass
    assert torch.allclose(w.grad, torch.tensor([3.0, 4.0]) + lam * torch.tensor([0.6, 0.8]))
    assert adaptive_weight((w * 3).sum(), (w * 0).sum(), w).item() == 1e4               # clamped
    assert adaptive_weight((w * 3).sum(), (w * 0).sum(), w, max_weight=50.0).item() == 50.0
    assert adaptive_weight((w * 0).sum(), (w * 2).sum(), w).item() == 0.0


def test_hinge_loss_on_fixed_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(11 / 12)          # (mean(0, .5, 2) + mean(0, 1, 2)) / 2
    assert hinge_d_loss(fake, real).item() == pytest.approx(0.5 * (2 + 5 / 6))  # real and fake are not interchangeable
    assert hinge_d_loss(torch.full((2, 1, 3, 3), 1.5), torch.full((2, 1, 3, 3), -1.0)).item() == 0.0


def test_generator_adversarial_term_sign_and_lambda_scale():
    x = torch.from_numpy(blob_slices(4, 32))[:, None]
    parts, losses = {}, {}
    for key, dw, adv in (("off", 1.0, False), ("on", 1.0, True), ("half", 0.5, True)):
        m = _small().train()
        losses[key], parts[key], xh = vqgan_generator_loss(VQGANObjective(perceptual_weight=0, disc_weight=dw), m, x, adv)
        if adv:
            assert parts[key]["g_adv"].item() == pytest.approx(-m.discriminator(xh).mean().item(), abs=1e-6)  # L_GAN = -mean D
    assert parts["off"]["lambda"].item() == 0.0 and parts["off"]["g_adv"].item() == 0.0
    lam, g = parts["on"]["lambda"].item(), parts["on"]["g_adv"].item()
    assert lam > 0 and losses["on"].item() == pytest.approx(losses["off"].item() + lam * g, abs=1e-5)
    assert parts["half"]["lambda"].item() == pytest.approx(0.5 * lam, rel=1e-5)
    assert parts["on"]["rec"].item() == pytest.approx((x - xh).abs().mean().item(), rel=1e-5)  # L1 by default


def test_discriminator_waits_for_disc_start_then_learns():
    x = torch.from_numpy(blob_slices(4, 32))[:, None]
    m = _small().train()
    obj = VQGANObjective(perceptual_weight=0, disc_start=5)
    d0, g0 = _params(m.discriminator), [p.detach().clone() for p in m.generator_parameters()]
    bn0 = [b.clone() for b in m.discriminator.buffers()]
    out = obj.train_step(m, {"image": x}, _ctx(obj, m, 4))
    assert _same(d0, _params(m.discriminator)) and _same(bn0, list(m.discriminator.buffers()))  # D not even run
    assert not _same(g0, [p.detach() for p in m.generator_parameters()])                      # the generator learnt
    assert out["lambda"].item() == 0.0 and out["g_adv"].item() == 0.0 and out["disc_factor"] == 0.0
    assert (out["d_loss"], out["d_real"], out["d_fake"]) == (0.0, 0.0, 0.0)
    out = obj.train_step(m, {"image": x}, _ctx(obj, m, 5))
    assert out["disc_factor"] == 1.0 and out["lambda"].item() > 0
    assert not _same(d0, _params(m.discriminator))
    assert out["d_loss"].item() > 0 and out["loss"].item() == pytest.approx((out["rec"] + out["vq"]).item())
    for k in ("rec", "perceptual", "vq", "g_adv", "lambda", "d_loss", "d_real", "d_fake", "perplexity", "generator"):
        assert k in out, k
    assert all(p.requires_grad for p in m.discriminator.parameters())  # restored after the generator step


def test_generator_steps_lower_the_reconstruction_loss():
    x = torch.from_numpy(blob_slices(8, 32))[:, None]
    m = _small().train()
    obj = VQGANObjective(perceptual_weight=0, disc_start=10**9)
    ctx = _ctx(obj, m, 0, lr=2e-3)
    with torch.no_grad():
        before = obj.loss(m.eval(), {"image": x})[1]["rec"].item()
    m.train()
    for _ in range(15):
        obj.train_step(m, {"image": x}, ctx)
    with torch.no_grad():
        after = obj.loss(m.eval(), {"image": x})[1]["rec"].item()
    assert after < 0.7 * before, (before, after)


def test_objective_vq_beta_validation_loss_and_refusals():
    m = _small().eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        o = m(x)
        loss, parts = VQGANObjective(perceptual_weight=0).loss(m, {"image": x})
        assert loss.item() == pytest.approx(((x - o["recon"]).abs().mean() + o["vq_loss"]).item(), rel=1e-5)
        assert sorted(parts) == ["perplexity", "rec", "vq"]
        vq1 = VQGANObjective(perceptual_weight=0, beta=1.0).vq_loss(o)
        assert vq1.item() == pytest.approx((o["codebook_loss"] + o["commitment_loss"]).item(), rel=1e-6)
        l2 = VQGANObjective(perceptual_weight=0, rec="l2").loss(m, {"image": x})[1]["rec"]
        assert l2.item() == pytest.approx((x - o["recon"]).pow(2).mean().item(), rel=1e-5)
    opts = VQGANObjective(perceptual_weight=0).optimizers(m, TrainConfig(device="cpu", lr=3e-4))
    assert sorted(opts) == ["discriminator", "generator"] and opts["generator"].defaults["betas"] == (0.5, 0.9)
    gen, disc = ({id(p) for g in opts[k].param_groups for p in g["params"]} for k in ("generator", "discriminator"))
    assert not gen & disc and len(gen) + len(disc) == len(list(m.parameters()))
    assert id(m.quantizer.codebook) in gen
    obj = VQGANObjective(perceptual_weight=0)
    with pytest.raises(UADInputError, match="DDP"):
        obj.train_step(m, {"image": x}, _ctx(obj, m, 0, world_size=2))
    with pytest.raises(UADInputError, match="needs a perceptual network"):
        VQGANObjective()
    with pytest.raises(UADInputError, match="rec must be one of"):
        VQGANObjective(perceptual_weight=0, rec="huber")
    with pytest.raises(UADInputError, match=">= 0"):
        VQGANObjective(perceptual_weight=0, disc_start=-1)


def test_perceptual_label_warning_and_inputs():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert VQGANObjective(perceptual_weight=0).perceptual_label == "none (perceptual_weight=0)"  # no warning
    with pytest.warns(UserWarning, match="NOT LPIPS"):
        stub = VQGANObjective(perceptual=_Stub())
    assert stub.perceptual_label == "not-LPIPS (_Stub, unlabelled)"
    real = _Stub(); real.uad_label, real.uad_backbone = "LPIPS (alex, ImageNet backbone)", "/weights.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert VQGANObjective(perceptual=real).perceptual_label == "LPIPS (alex, ImageNet backbone)"
    x, y = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    net = _Stub()
    assert perceptual_distance(net, x, y).item() == pytest.approx(2.0)   # |(-1) - 1| on every channel
    a, b = net.seen
    assert a.shape == (2, 3, 8, 8) and a.min() == -1 and b.max() == 1   # grey to RGB, [0, 1] to [-1, 1]
    m = _small().train()
    xb = torch.from_numpy(blob_slices(2, 32))[:, None]
    with pytest.warns(UserWarning):
        obj = VQGANObjective(perceptual=_Stub(), perceptual_weight=2.0)
    loss, parts, xh = vqgan_generator_loss(obj, m, xb, False)
    l1 = (xb - xh).abs().mean().item()
    assert parts["perceptual"].item() == pytest.approx(2 * l1, rel=1e-5)   # the stub's |a - b| on [-1, 1]: 2 x L1
    assert loss.item() == pytest.approx(l1 + 2.0 * 2 * l1 + parts["vq"].item(), rel=1e-5)   # L1 + w_p x perceptual + L_VQ


def test_load_lpips_random_backbone_is_labelled():
    from uad_study.scores import load_lpips
    with pytest.warns(UserWarning):
        net = load_lpips(allow_random_backbone=True)
    with pytest.warns(UserWarning, match="NOT LPIPS"):
        obj = VQGANObjective(perceptual=net)
    assert obj.perceptual_label.startswith("not-LPIPS (random")
    x = torch.rand(2, 1, 32, 32)
    assert perceptual_distance(net, x, x).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UADInputError, match="too small"):
        perceptual_distance(net, torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16))


def test_train_model_logs_parts_starts_the_discriminator_and_resumes(tmp_path):
    data = {"image": blob_slices(16, 32)}
    val = {"image": blob_slices(4, 32, seed=9)}
    obj = lambda: VQGANObjective(perceptual_weight=0, disc_start=2)   # 2 steps per epoch: the discriminator from epoch 2
    cfg = lambda e: TrainConfig(epochs=e, batch_size=8, device="cpu", lr=1e-3)
    full = _small()
    h = train_model(full, data, val, cfg(3), tmp_path / "full", progress=False, objective=obj())
    assert [r["train_disc_factor"] for r in h] == [0.0, 1.0, 1.0]
    assert h[0]["train_lambda"] == 0.0 and h[1]["train_lambda"] > 0 and h[1]["train_d_loss"] > 0
    for k in ("train_rec", "train_vq", "train_perplexity", "train_generator", "lr_generator", "lr_discriminator"):
        assert np.isfinite(h[-1][k]), k
    assert np.isfinite(h[-1]["val_loss"])
    part = _small()
    train_model(part, data, val, cfg(2), tmp_path / "part", progress=False, objective=obj())
    torch.manual_seed(123)
    resumed = _small()
    h2 = train_model(resumed, data, val, cfg(3), tmp_path / "part", progress=False, objective=obj())
    assert [r["epoch"] for r in h2] == [1, 2, 3]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs after resume"
    assert sorted(load_checkpoint(tmp_path / "part" / "last.pt")["optimizers"]) == ["discriminator", "generator"]
