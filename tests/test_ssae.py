"""The Scale-Space Autoencoder (Baur et al. 2020): the Laplacian pyramid (exact reconstruction, reflect borders,
bilinear up-sampling, the kernel's 99 % coverage), eq. 3 read literally (M_k sees the band H_k; the loss is on I_k),
one-hot training (only level k moves, not even batch-norm statistics elsewhere), the complexity match, train_ssae
through the engine (every level's validation loss falls; a resumed run reloads finished levels and ends where an
uninterrupted one does), the study kit's fit adapter, and residuals for scale_space_aggregate."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import blob_slices

from uad_study.core import UADInputError, seed_everything
from uad_study.models.base import check_model
from uad_study.models.baselines import DenseAE, DenseVAE, SpatialAE
from uad_study.models.ssae import (MATCHES, PLAIN_MODELS, SSAE, LaplacianPyramid, SSAEObjective, count_params,
                                   gaussian_kernel, gaussian_sigma, level_kwargs, match_width, ssae_fit, train_ssae)
from uad_study.scores import scale_space_aggregate
from uad_study.training import TrainConfig, train_model

TINY = {"dense": {"channels": (4, 8, 8, 8), "latent_dim": 8}, "vae": {"channels": (4, 8, 8, 8), "latent_dim": 8},
        "spatial": {"widths": (4, 8, 8, 8)}}


def _phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _tiny(kind="dense", levels=2, size=32, seed=0, **kw):
    seed_everything(seed)
    return SSAE(levels, kind, size, TINY[kind], **kw)


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ---------------------------------------------------------------- the kernel and the pyramid

def test_kernel_sigma_is_the_largest_with_99_percent_on_the_five_pixels():
    s = gaussian_sigma(5, 0.99)
    assert s == pytest.approx(2.5 / 2.5758293035489004, rel=1e-12)     # Phi^-1(0.995) = 2.5758293...
    mass = lambda sig: 2 * _phi(2.5 / sig) - 1                          # N(0, sig^2) on [-2.5, 2.5]
    assert mass(s) == pytest.approx(0.99, abs=1e-12)
    assert mass(s * (1 - 1e-6)) > 0.99 > mass(s * (1 + 1e-6))           # smaller sigmas cover more: s is the largest
    assert gaussian_sigma(5, 0.95) > s                                  # less coverage asked: a wider Gaussian


def test_kernel_taps_are_pixel_masses_by_hand():
    s, k = gaussian_sigma(), gaussian_kernel()
    cells = [_phi((i + 0.5) / s) - _phi((i - 0.5) / s) for i in range(-2, 3)]
    assert sum(cells) == pytest.approx(0.99, abs=1e-12)                 # the unnormalised taps are the coverage
    assert torch.allclose(k, torch.tensor(cells, dtype=torch.float32) / 0.99, atol=1e-7)
    assert torch.allclose(k, torch.tensor([0.056680, 0.244551, 0.397538, 0.244551, 0.056680]), atol=1e-6)
    assert k.sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("shape,levels", [((2, 1, 32, 48), 3), ((3, 1, 64, 64), 2), ((1, 2, 16, 16), 1)])
def test_pyramid_reconstructs_its_input_exactly(shape, levels):
    torch.manual_seed(0)
    p, x = LaplacianPyramid(levels), torch.rand(shape)
    I, H = p.decompose(x)
    assert len(I) == levels + 1 and len(H) == levels and I[0] is x
    assert [tuple(i.shape[-2:]) for i in I] == [(shape[2] >> k, shape[3] >> k) for k in range(levels + 1)]
    for k in range(levels):                                             # eq. 1, by definition
        assert torch.equal(I[k + 1], p.blur(I[k])[..., ::2, ::2])
        assert torch.equal(H[k], I[k] - F.interpolate(I[k + 1], size=I[k].shape[-2:], mode="bilinear", align_corners=False))
    assert torch.allclose(p.reconstruct(I[-1], H), x, atol=1e-6)       # every band kept: x back to float precision


def test_pyramid_reflect_border_and_bilinear_up_by_hand():
    p = LaplacianPyramid(2)
    k = p.taps
    d = torch.zeros(1, 1, 8, 8); d[0, 0, 1, 1] = 1.0
    out = p.blur(d)[0, 0]
    assert out[0, 0].item() == pytest.approx((2 * k[1].item()) ** 2, abs=1e-7)   # reflect: the pixel at +1 and mirrored -1
    assert out[1, 1].item() == pytest.approx((k[0] + k[2]).item() ** 2, abs=1e-7)  # at (1, 1) the mirrored -1 is the pixel again
    # zero or edge padding would give k1^2 at (0, 0) and k2^2 at (1, 1)
    c = torch.full((1, 1, 16, 16), 0.7)                                          # a constant image: no bands
    I, H = p.decompose(c)
    assert torch.allclose(I[-1], torch.full((1, 1, 4, 4), 0.7), atol=1e-6) and all(h.abs().max() < 1e-6 for h in H)
    up = p.up(torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]]), (4, 4))[0, 0, 0]
    assert torch.allclose(up, torch.tensor([0.0, 0.25, 0.75, 1.0]))             # bilinear, align_corners=False
    assert list(p.state_dict()) == [] and not list(p.parameters())


def test_pyramid_refuses_bad_sizes():
    p = LaplacianPyramid(3)
    with pytest.raises(UADInputError, match=r"divisible by 2\*\*levels = 8"): p.decompose(torch.rand(1, 1, 24, 20))
    with pytest.raises(UADInputError, match="H, W >= 16"): p.decompose(torch.rand(1, 1, 8, 16))
    with pytest.raises(UADInputError, match=r"\(B, C, H, W\)"): p.decompose(torch.rand(16, 16))
    with pytest.raises(UADInputError, match="odd"): LaplacianPyramid(2, size=4)


# ---------------------------------------------------------------- the model

@pytest.mark.parametrize("kind", ["dense", "spatial", "vae"])
@pytest.mark.parametrize("size,levels", [(32, 2), (32, 3), (64, 2), (64, 3)])
def test_ssae_follows_the_model_protocol(kind, size, levels):
    m, x = _tiny(kind, levels, size), torch.rand(2, 1, size, size)
    assert check_model(m, x)["recon"] == (2, 1, size, size)
    o = m.eval()(x)
    assert [tuple(r.shape) for r in o["recons"]] == [(2, 1, size >> k, size >> k) for k in range(levels + 1)]
    assert [tuple(i.shape) for i in o["images"]] == [tuple(r.shape) for r in o["recons"]]
    assert len(m.nets) == levels + 1 and all(type(n) is PLAIN_MODELS[kind] for n in m.nets)
    if kind == "vae":
        assert len(o["mu"]) == len(o["logvar"]) == levels + 1 and m.variational
    else:
        assert "mu" not in o and not m.variational


def test_m_k_sees_the_band_and_the_image_is_built_coarsest_first():
    m, x, seen = _tiny("dense", 2).eval(), torch.rand(2, 1, 32, 32), {}
    hooks = [n.register_forward_hook(lambda mod, i, o, k=k: seen.update({k: (i[0], o["recon"])})) for k, n in enumerate(m.nets)]
    o = m(x)
    for h in hooks: h.remove()
    I, H = m.pyramid.decompose(x)
    assert torch.allclose(seen[2][0], I[2])                             # M_K: the coarse image
    for k in (0, 1):                                                    # M_k, k < K: the band H_k (mapped to [0, 1]), not I_k
        assert torch.allclose(seen[k][0], (H[k] + 1) / 2)
        assert not torch.allclose(seen[k][0], I[k], atol=1e-3)
    assert torch.allclose(o["recons"][2], seen[2][1])
    for k in (1, 0):                                                    # eq. 5: I^_k = u(I^_{k+1}) + H^_k
        assert torch.allclose(o["recons"][k], m.pyramid.up(o["recons"][k + 1], I[k].shape[-2:]) + 2 * seen[k][1] - 1, atol=1e-6)
    assert torch.equal(o["recon"], o["recons"][0].clamp(0, 1)) and torch.equal(m.reconstruct(x), o["recon"])


def test_upto_stops_at_a_level_and_frozen_levels_run_in_eval_mode():
    m, x = _tiny("vae", 2).train(), torch.rand(2, 1, 32, 32)
    o = m(x, upto=1, frozen_above=1)
    assert [tuple(r.shape[-2:]) for r in o["recons"]] == [(16, 16), (8, 8)] and o["recon"].shape == (2, 1, 16, 16)
    assert not o["recons"][1].requires_grad and o["recons"][0].requires_grad  # the frozen level carries no gradient
    assert all(n.training for n in m.nets)                              # the frozen level's mode was put back ...
    with torch.no_grad(): ref = m.nets[2].eval()(o["images"][1])["mu"]
    assert torch.equal(o["mu"][1], ref)                                 # ... after it ran in eval mode (no batch statistics)
    with pytest.raises(UADInputError, match=r"upto must lie in \[0, 2\]"): m(x, upto=3)


def test_the_pyramid_stays_full_precision_under_autocast():
    m, x = _tiny("dense", 2).eval(), torch.rand(2, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = m(x)
        assert m.pyramid.decompose(x)[0][1].dtype == torch.bfloat16     # the bare pyramid would follow autocast
    I = m.pyramid.decompose(x)[0]
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(o["images"], I))
    assert torch.isfinite(o["recon"]).all() and o["recon"].shape == x.shape


# ---------------------------------------------------------------- the loss and one-hot training

class _Const(nn.Module):
    "A stand-in M_k whose sigmoid output is the constant v."
    def __init__(self, v):
        super().__init__(); self.v = v; self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return {"recon": torch.full_like(x, self.v) + 0 * self.w}


def test_loss_is_on_the_image_not_on_the_band_by_hand():
    # x = 0: I_0 = I_1 = 0, H_0 = 0. M_1 outputs 0.5 -> I^_1 = 0.5; M_0 outputs 0.5 -> H^_0 = 0, so I^_0 = u(0.5) + 0 = 0.5.
    # L_0 = l2(I_0, I^_0) = 0.25; on the band it would be l2(H_0, H^_0) = 0.
    m = SSAE(1, "dense", 16, {"channels": (4, 8)})
    m.nets[0], m.nets[1] = _Const(0.5), _Const(0.5)
    x = torch.zeros(3, 1, 16, 16)
    assert SSAEObjective(0)(m, x)[0].item() == pytest.approx(0.25)
    assert SSAEObjective(0, "l1")(m, x)[0].item() == pytest.approx(0.5)
    assert SSAEObjective(1)(m, x)[0].item() == pytest.approx(0.25)      # level K: l2(I_1, M_1(I_1))
    m.nets[1] = _Const(0.0)                                             # a perfect coarse level: the two readings agree
    assert SSAEObjective(0)(m, x)[0].item() == pytest.approx(0.0)


def test_loss_matches_eq3_on_a_real_network_and_differs_from_the_band_loss():
    m, x = _tiny("dense", 2).eval(), torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        o, (I, H) = m(x), m.pyramid.decompose(x)
        loss = SSAEObjective(1)(m, x)[0]
        hhat = o["recons"][1] - m.pyramid.up(o["recons"][2], (16, 16))
    assert loss.item() == pytest.approx(((I[1] - o["recons"][1]) ** 2).mean().item(), rel=1e-6)
    assert abs(loss.item() - ((H[1] - hhat) ** 2).mean().item()) > 1e-4


def test_vae_loss_adds_the_kl_per_pixel_of_the_level():
    m, x = _tiny("vae", 2).eval(), torch.rand(2, 1, 32, 32)
    obj = SSAEObjective(1, beta_kl=0.5)
    with torch.no_grad():
        loss, parts = obj(m, x)
        o = m(x, upto=1)
        kl = (-0.5 * (1 + o["logvar"][0] - o["mu"][0] ** 2 - o["logvar"][0].exp())).sum(1).mean() / (16 * 16)
    assert sorted(parts) == ["kl", "recon"]
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert loss.item() == pytest.approx(parts["recon"].item() + 0.5 * kl.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["dense", "vae"])
def test_one_hot_lambda_trains_only_its_level(kind, tmp_path):
    m = _tiny(kind, 2)
    before = _state(m)
    obj = SSAEObjective(1)
    opt = obj.optimizers(m, TrainConfig(lr=1e-2))["model"]
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in m.nets[1].parameters()]
    train_model(m, blob_slices(8, 32), None, TrainConfig(epochs=2, batch_size=4, lr=1e-2, device="cpu"), tmp_path,
                progress=False, objective=obj)
    after = _state(m)
    for k, v in before.items():                                         # weights and batch-norm statistics
        if not k.startswith("nets.1."): assert torch.equal(v, after[k]), k
    moved = [k for k in before if k.startswith("nets.1.") and not torch.equal(before[k], after[k])]
    assert any(k.endswith("running_mean") for k in moved) and any(k.endswith("weight") for k in moved)


# ---------------------------------------------------------------- complexity

@pytest.mark.parametrize("kind", ["dense", "spatial", "vae"])
def test_same_complexity_as_the_plain_model_at_the_papers_size(kind):
    with torch.device("meta"):                                          # counts only: nothing allocated
        m, plain = SSAE(3, kind, 128), PLAIN_MODELS[kind](in_size=128)
    c = m.complexity()
    n_plain = sum(p.numel() for p in plain.parameters())
    assert c["plain"] == n_plain and c["ssae"] == sum(p.numel() for p in m.parameters())
    assert abs(c["ssae"] / n_plain - 1) < 0.02                          # same total parameter count, within 2 %
    name = "widths" if kind == "spatial" else "channels"
    full = getattr(plain, name)
    for k, cfg in enumerate(m.level_configs):                           # the plain stages at resolutions <= 128/2^k, x alpha
        assert cfg["in_size"] == 128 >> k
        assert cfg[name] == tuple(max(1, round(c["alpha"] * w)) for w in full[k:])


def test_complexity_match_at_tiny_sizes_and_without_matching():
    for kind in ("dense", "spatial", "vae"):
        for size, levels in ((32, 2), (64, 3)):
            c = _tiny(kind, levels, size).complexity()
            assert abs(c["ratio"] - 1) < 0.10 and 0 < c["alpha"] < 1, (kind, size, c)
    m = _tiny("dense", 2, match="none")                                 # every level with the plain widths: larger
    assert [cfg["channels"] for cfg in m.level_configs] == [(4, 8, 8, 8), (8, 8, 8), (8, 8)]
    assert m.alpha == 1.0 and m.complexity()["ratio"] > 2
    m0 = _tiny("spatial", 0)                                            # no pyramid level: the plain model itself
    assert m0.complexity()["ssae"] == count_params("spatial", {"in_size": 32, **TINY["spatial"]}) and m0.alpha == 1.0


def test_bad_models_are_refused():
    with pytest.raises(UADInputError, match="kind must be one of"): SSAE(2, "gan", 32)
    with pytest.raises(UADInputError, match="match must be one of"): SSAE(2, "dense", 32, TINY["dense"], match="flops")
    with pytest.raises(UADInputError, match=r"levels must lie in \[0, 2\]"): SSAE(3, "dense", 32, {"channels": (4, 8, 8)})
    with pytest.raises(UADInputError, match="divisible by 2"): SSAE(2, "dense", 40, TINY["dense"])
    with pytest.raises(UADInputError, match="not in `plain`"): SSAE(2, "dense", 32, {"in_size": 32})
    m = _tiny("dense", 2)
    with pytest.raises(UADInputError, match=r"level must lie in \[0, 2\]"): m.level_parameters(3)
    with pytest.raises(UADInputError, match="at least 3 levels"): SSAEObjective(3).optimizers(m, TrainConfig())
    with pytest.raises(UADInputError, match="needs an SSAE"): SSAEObjective(0)(DenseAE(in_size=32, channels=(4, 8)), torch.rand(1, 1, 32, 32))
    with pytest.raises(UADInputError, match="int >= 0"): SSAEObjective(-1)
    with pytest.raises(UADInputError, match="trains an SSAE"):
        train_ssae(DenseAE(), None, None, TrainConfig(), "x", train_fn=train_model)


# ---------------------------------------------------------------- training all levels, resume, the study kit

CFG = dict(epochs=4, batch_size=8, lr=3e-3, device="cpu")


def _train(tmp_path, kind="dense", resume=False, seed=0, **kw):
    m = _tiny(kind, 2, seed=seed)
    h = train_ssae(m, blob_slices(16, 32), blob_slices(8, 32, seed=9), TrainConfig(**{**CFG, **kw}), tmp_path / "ssae",
                   resume=resume, progress=False, train_fn=train_model)
    return m, h


@pytest.mark.parametrize("kind", ["dense", "spatial"])
def test_train_ssae_goes_coarsest_first_and_lowers_every_levels_val_loss(kind, tmp_path):
    m, h = _train(tmp_path, kind)
    assert [r["level"] for r in h] == [2] * 4 + [1] * 4 + [0] * 4
    assert [r["epoch"] for r in h] == list(range(1, 13)) and [r["level_epoch"] for r in h] == [1, 2, 3, 4] * 3
    for k in (2, 1, 0):
        v = [r["val_loss"] for r in h if r["level"] == k]
        assert v[-1] < v[0], (k, v)
    for k in (0, 1, 2): assert (tmp_path / "ssae" / f"level{k}" / "last.pt").is_file()
    log = (tmp_path / "ssae" / "train_log.csv").read_text().splitlines()
    assert len(log) == 13 and log[0].split(",")[-2:] == ["level", "level_epoch"]
    assert not m.training


def test_train_ssae_resume_reloads_finished_levels(tmp_path):
    m, h = _train(tmp_path)
    done = _state(m)
    m2, h2 = _train(tmp_path, resume=True, seed=1)                      # another initialisation: everything comes from the checkpoints
    assert h2 == h                                                      # the same rows, "seconds" included: nothing retrained
    assert all(torch.equal(done[k], v) for k, v in _state(m2).items())
    mtime = (tmp_path / "ssae" / "level2" / "last.pt").stat().st_mtime_ns
    # interrupted after level 1: level 0 runs again, from where level 1 left the model, and ends where the first run did
    import shutil; shutil.rmtree(tmp_path / "ssae" / "level0")
    m3, h3 = _train(tmp_path, resume=True, seed=2)
    assert h3[:8] == h[:8] and [r["level"] for r in h3[8:]] == [0] * 4
    assert [r["val_loss"] for r in h3[8:]] == pytest.approx([r["val_loss"] for r in h[8:]], rel=1e-5)
    assert all(torch.allclose(done[k], v, atol=1e-6) for k, v in _state(m3).items())
    assert (tmp_path / "ssae" / "level2" / "last.pt").stat().st_mtime_ns == mtime
    m4, h4 = _train(tmp_path, resume=False, seed=0, epochs=1)           # resume=False trains every level afresh
    assert [r["level"] for r in h4] == [2, 1, 0]


def test_ssae_fit_builds_the_study_kits_train_config(tmp_path):
    from uad_study.study import ModelSpec, make_config, train_config
    from uad_study.study_quickstart import SPEC as QUICK
    cfg = make_config(QUICK, "smoke", out_dir=str(tmp_path / "run"), epochs=2, batch_size=8, lr=2e-3, early_stop_patience=0)
    seen = []
    def engine(*a, **kw):
        seen.append(a[3]); return train_model(*a, **kw)
    fit = ssae_fit("l1", train_fn=engine, train_config=train_config, drop_last=True)
    ModelSpec(build=lambda c: _tiny("dense", 2), objective=lambda c: SSAEObjective(0), fit=fit)   # the kit's slot takes it
    sets = {"train": SimpleNamespace(slices=blob_slices(16, 32)), "val": SimpleNamespace(slices=blob_slices(8, 32, seed=9))}
    h = fit(_tiny("dense", 2), sets, cfg, tmp_path / "models" / "ssae-dense", True, False)
    assert len(seen) == 3 and all(c == train_config(cfg, drop_last=True) for c in seen)
    assert seen[0].early_stop_patience is None and seen[0].lr == 2e-3 and seen[0].device == cfg.device
    assert [r["level"] for r in h] == [2, 2, 1, 1, 0, 0]
    assert (tmp_path / "models" / "ssae-dense" / "level0" / "last.pt").is_file()
    with pytest.raises(UADInputError, match="'l1' or 'l2'"): ssae_fit("huber", train_fn=engine, train_config=train_config)


# ---------------------------------------------------------------- residuals

def test_residuals_feed_scale_space_aggregate_finest_first():
    m, x = _tiny("spatial", 3, 64).eval(), torch.rand(3, 1, 64, 64)
    r = m.residuals(x)
    assert [tuple(t.shape) for t in r] == [(3, 64, 64), (3, 32, 32), (3, 16, 16), (3, 8, 8)]
    assert torch.equal(r[0], (x - m.reconstruct(x)).abs()[:, 0])
    I = m.pyramid.decompose(x)[0]
    o = m(x)
    for k in range(4): assert torch.equal(r[k], (I[k] - o["recons"][k].clamp(0, 1)).abs()[:, 0])
    agg = scale_space_aggregate([t.numpy() for t in r])
    acc = r[3][:, None]
    for t in reversed(r[:3]): acc = F.interpolate(acc, size=t.shape[-2:], mode="bilinear", align_corners=False) + t[:, None]
    assert agg.shape == (3, 64, 64) and np.allclose(agg, acc[:, 0].numpy(), atol=1e-6)
