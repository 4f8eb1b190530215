"""VQ-VAE + Transformer (Pinaya et al.; Malé et al.'s setup): raster order, causality of the code transformer with the BOS
shift, likelihood-based resampling on hand-set priors (improbable codes replaced, probable ones kept exactly, a threshold
of 0 changes nothing, draws follow the conditional, only flagged positions cost a pass, batch-independent), the pixel mask
and the masked residual, the stage-2 cross-entropy, both stages through the real engine (resume trains nothing new; a
finished VQ-VAE in stage1_dir is reloaded, not retrained), the study kit's fit, the model protocol and determinism."""
import csv
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from uad_study.core import UADInputError, seed_everything
from uad_study.models.base import check_model
from uad_study.models.vq import VQVAE, VQObjective
from uad_study.models.vq_transformer import (PAPER_SETTINGS, CodeTransformer, TransformerObjective, VQTransformer,
                                             code_log_likelihood, code_sequences, gaussian_taps, raster_codes,
                                             train_vq_transformer, unraster_codes, vq_transformer_fit)
from uad_study.training import TrainConfig, train_model


def _vqvae(n_codes=16, seed=0):
    seed_everything(seed)
    return VQVAE(n_codes, 4, channels=(4, 8), res_hidden=4, n_res=1)


def _model(n_codes=16, size=32, seed=0, **kw):
    "A tiny VQTransformer at `size` px: 32 px -> a 7 x 7 code map."
    v = _vqvae(n_codes, seed)
    return VQTransformer(v, (size, size), **{"dim": 16, "depth": 1, "heads": 2, **kw}).eval()


class _Stub(nn.Module):
    "Stand-in prior with the CodeTransformer interface: row i of the logits is `fn(prefix c_<i)` (log-probabilities)."
    def __init__(self, k, fn):
        super().__init__(); self.k, self.fn, self.calls = k, fn, 0
    def forward(self, seq):
        self.calls += 1
        prev = torch.cat([torch.full_like(seq[:, :1], -1), seq[:, :-1]], 1)   # -1 stands for BOS
        return self.fn(prev).log()


def _always(k, code, eps=1e-4):
    "p(code) = 1 - (k - 1) eps everywhere, eps for every other code."
    return lambda prev: torch.full((*prev.shape, k), eps).index_fill(-1, torch.tensor([code]), 1 - (k - 1) * eps)


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ---------------------------------------------------------------- raster order and the transformer

def test_raster_order_round_trip_and_position_i_is_row_i_div_w_col_i_mod_w():
    c = torch.randint(0, 100, (3, 5, 7))
    s = raster_codes(c)
    assert s.shape == (3, 35) and torch.equal(unraster_codes(s, (5, 7)), c)
    for i in range(35):
        assert torch.equal(s[:, i], c[:, i // 7, i % 7])
    with pytest.raises(UADInputError, match=r"\(B, 49\)"): unraster_codes(s, (7, 7))


def test_transformer_is_causal_with_the_bos_shift():
    seed_everything(0)
    t = CodeTransformer(6, 10, dim=16, depth=2, heads=2).eval()
    s = torch.randint(0, 6, (2, 10))
    with torch.no_grad():
        base = t(s)
        assert base.shape == (2, 10, 6) and t.bos == 6
        for j in range(10):
            s2 = s.clone(); s2[:, j] = (s[:, j] + 1) % 6
            out = t(s2)
            assert torch.equal(out[:, :j + 1], base[:, :j + 1]), f"row <= {j} changed with code {j}: not causal/shifted"
            if j < 9: assert not torch.allclose(out[:, j + 1], base[:, j + 1]), f"row {j + 1} ignores code {j}"
        ll = t.log_likelihood(s)
    assert torch.allclose(ll, torch.log_softmax(base, -1).gather(-1, s[..., None])[..., 0], atol=1e-6)
    assert (ll < 0).all()


def test_transformer_sizes_and_bad_inputs():
    t = CodeTransformer(128, 256)                                            # the defaults: MONAI tutorial sizes
    assert (t.net.attn_layers_dim, t.net.attn_layers_depth, t.net.attn_layers_heads, t.net.num_tokens) == (96, 12, 8, 129)
    with pytest.raises(UADInputError, match="divisible"): CodeTransformer(8, 4, dim=10, heads=4)
    with pytest.raises(UADInputError, match=r"\[0, 128\)"): t(torch.full((1, 3), 128))
    with pytest.raises(UADInputError, match="int64"): t(torch.zeros(1, 3))


# ---------------------------------------------------------------- healing

def test_planted_improbable_code_is_resampled_and_probable_codes_kept_exactly():
    m = _model(8); m.transformer = _Stub(8, _always(8, 1))
    c = torch.ones(2, 3, 4, dtype=torch.long); c[0, 1, 2] = 5; c[1, 2, 3] = 0   # planted: p = 1e-4 < 0.005
    healed, mask = m.heal(c)
    want = torch.zeros_like(mask); want[0, 1, 2] = want[1, 2, 3] = True
    assert torch.equal(mask, want)
    assert torch.equal(healed, torch.ones_like(c))                            # replaced by the probable code
    m.transformer.calls = 0; m.heal(c)
    assert m.transformer.calls == 1 + 2                                       # likelihood + one pass per flagged position
    m.threshold = 0.0
    h0, m0 = m.heal(c)
    assert torch.equal(h0, c) and not m0.any()


def test_resampling_follows_the_healed_prefix():
    "Prior 'repeat the previous code': a flagged code is drawn given the codes healed before it, unflagged ones stay."
    def prev_code(prev, k=8, eps=1e-4):
        p = torch.full((*prev.shape, k), eps)
        return p.scatter(-1, torch.where(prev < 0, 1, prev)[..., None], 1 - (k - 1) * eps)  # after BOS: code 1
    m = _model(8); m.transformer = _Stub(8, prev_code)
    c = torch.tensor([1, 1, 5, 5, 5, 2, 2, 7]).view(1, 2, 4)
    healed, mask = m.heal(c)
    assert mask.flatten().tolist() == [False, False, True, False, False, True, False, True]
    assert healed.flatten().tolist() == [1, 1, 1, 5, 5, 5, 2, 2]


def test_draws_follow_the_conditional_and_never_take_a_zero_probability_code():
    p = torch.tensor([0.6, 0.3, 0.1, 0.0])
    m = _model(4, threshold=1.0); m.transformer = _Stub(4, lambda prev: p.expand(*prev.shape, 4).clamp_min(1e-30))
    c = torch.full((1, 40, 50), 3)                                             # every code flagged (p < 1): 2000 draws
    healed, mask = m.heal(c)
    assert mask.all()
    freq = torch.bincount(healed.flatten(), minlength=4).float() / healed.numel()
    assert torch.allclose(freq, p, atol=0.04) and freq[3] == 0


def test_heal_is_batch_independent_and_seeded():
    m = _model(8); m.transformer = _Stub(8, _always(8, 2, eps=0.001))
    c = torch.randint(0, 8, (6, 3, 5), generator=torch.Generator().manual_seed(0))
    h, _ = m.heal(c)
    assert torch.equal(torch.cat([m.heal(c[i:i + 1])[0] for i in range(6)]), h)
    m.transformer = _Stub(8, lambda prev: torch.full((*prev.shape, 8), 1 / 8)); m.threshold = 1.0
    a, b = m.heal(c)[0], m.heal(c)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, m.heal(c, torch.Generator().manual_seed(1))[0])  # another seed, other draws


def test_likelihood_of_images_is_that_of_their_codes():
    m = _model(16)
    x = torch.rand(2, 1, 32, 32)
    lk = m.likelihood(x)
    assert lk.shape == (2, 7, 7) and torch.equal(lk, m.likelihood(m.codes(x)))
    assert (lk > 0).all() and (lk <= 1).all()
    with torch.no_grad(): ll = m.transformer.log_likelihood(raster_codes(m.codes(x)))
    assert torch.allclose(raster_codes(lk), ll.exp(), atol=1e-6)


# ---------------------------------------------------------------- pixel mask and masked residual

def test_pixel_mask_shapes_range_and_smoothing():
    m = _model(16, mask_sigma=0.0)
    mk = torch.zeros(2, 7, 7, dtype=torch.bool); mk[0, 3, 3] = mk[0, 0, 6] = True
    p0 = m.pixel_mask(mk, (32, 32))
    assert p0.shape == (2, 1, 32, 32) and p0.dtype == torch.float32
    assert torch.equal(p0, F.interpolate(mk[:, None].float(), size=(32, 32), mode="nearest"))
    assert set(p0.unique().tolist()) == {0.0, 1.0}
    m.mask_sigma = 2.0
    p = m.pixel_mask(mk, (32, 32))
    assert p.min() >= 0 and p.max() <= 1 and p[1].max() == 0
    ref = gaussian_filter(p0[0, 0].numpy().astype(np.float64), 2.0, mode="nearest", truncate=4.0)
    assert np.allclose(p[0, 0].numpy(), ref, atol=1e-6)
    assert 0 < p[0, 0, 0, 27] < 1 and p[0, 0, 15, 15] < 1 and p[0, 0, 0, 0] == 0    # smoothed edges, not a box
    assert torch.allclose(m.pixel_mask(torch.ones(1, 7, 7), (32, 32)), torch.ones(1, 1, 32, 32), atol=1e-6)
    assert gaussian_taps(2.0).sum().item() == pytest.approx(1.0, abs=1e-6) and len(gaussian_taps(2.0)) == 17


def test_reconstruct_residual_is_the_masked_residual():
    m = _model(16, mask_sigma=1.5)
    x = torch.rand(2, 1, 32, 32)
    hand = torch.zeros(2, 7, 7, dtype=torch.bool); hand[0, 2, 4] = True; hand[1, 6, 0] = True
    m.heal = lambda codes, generator=None: ((codes + 1) % 16, hand)          # a healed map differing everywhere
    o = m.restore(x)
    mpx = m.pixel_mask(hand, (32, 32))
    assert torch.equal(o["pixel_mask"], mpx)
    r = (x - m.reconstruct(x)).abs()
    assert torch.allclose(r, mpx * (x - o["healed"]).abs(), atol=1e-6)
    assert (r[mpx == 0] == 0).all() and (mpx == 0).sum() > 0
    assert (r[mpx > 0.5] > 0).all()
    assert torch.equal(m.anomaly_map(x), mpx * (x - o["healed"]).abs())
    assert torch.equal(o["healed"], m.vqvae.decode(m.vqvae.quantizer.lookup((m.codes(x) + 1) % 16), (32, 32)))
    m.blend = False
    assert torch.equal(m.reconstruct(x), m.healed(x))


def test_check_model_and_reconstruct_is_deterministic_and_leaves_the_global_rng():
    m = _model(16, threshold=0.2)                                            # untrained prior: many codes resampled
    x = torch.rand(3, 1, 32, 32)
    assert check_model(m, x)["recon"] == (3, 1, 32, 32)
    assert m.restore(x)["mask"].any()
    st = torch.get_rng_state()
    a = m.reconstruct(x)
    assert torch.equal(torch.get_rng_state(), st)
    assert torch.equal(a, m.reconstruct(x))
    assert torch.equal(m(x)["recon"], m.vqvae(x)["recon"])                   # forward is stage 1's


def test_bad_settings():
    with pytest.raises(UADInputError, match="threshold"): _model(16, threshold=1.5)
    with pytest.raises(UADInputError, match="mask_sigma"): _model(16, mask_sigma=-1.0)
    with pytest.raises(UADInputError, match="model.transformer"):
        TransformerObjective().loss(_model(16), {"codes": torch.zeros(1, 49, dtype=torch.long)})


# ---------------------------------------------------------------- stage 2's objective

def test_cross_entropy_by_hand_and_against_torch():
    class Fixed(nn.Module):
        def __init__(self): super().__init__(); self.w = nn.Parameter(torch.tensor([0.5, 0.25, 0.25]).log())
        def forward(self, seq): return self.w.expand(*seq.shape, 3)
    loss, parts = TransformerObjective().loss(Fixed(), {"codes": torch.tensor([[0, 1], [2, 0]])})
    assert loss.item() == pytest.approx((math.log(2) + math.log(4) + math.log(4) + math.log(2)) / 4, abs=1e-6)
    assert parts["bits_per_code"].item() == pytest.approx(1.5, abs=1e-6)
    seed_everything(0)
    t = CodeTransformer(5, 9, dim=16, depth=1, heads=2)
    s = torch.randint(0, 5, (3, 9))
    loss, parts = TransformerObjective().loss(t, {"codes": s})
    assert torch.allclose(loss, F.cross_entropy(t(s).reshape(-1, 5), s.reshape(-1)), atol=1e-6)
    assert torch.allclose(loss, -code_log_likelihood(t(s), s).mean(), atol=1e-6)


def test_engine_lowers_the_cross_entropy_of_periodic_sequences(tmp_path):
    L, K = 12, 4
    codes = np.array([[(i + ph) % 3 for i in range(L)] for ph in range(3)] * 8, np.int64)   # 24 sequences, period 3
    seed_everything(0)
    t = CodeTransformer(K, L, dim=32, depth=1, heads=2)
    obj = TransformerObjective()
    with torch.no_grad(): before = obj.loss(t.eval(), {"codes": torch.from_numpy(codes)})[0].item()
    h = train_model(t, {"codes": codes}, {"codes": codes}, TrainConfig(epochs=15, batch_size=8, lr=3e-3, device="cpu"),
                    tmp_path, resume=False, progress=False, objective=obj)
    floor = math.log(3) / L                          # only the first code is uncertain (3 phases): the entropy per code
    assert before > 1.0 and floor - 1e-3 < h[-1]["val_loss"] < 2 * floor   # learnt, and no peek at the code predicted
    assert "train_ce" in h[-1] and "train_bits_per_code" in h[-1]


# ---------------------------------------------------------------- both stages through the engine

def _slices(n=16, s=32, seed=0):
    return np.random.default_rng(seed).random((n, s, s), dtype=np.float32)


def test_train_vq_transformer_resume_and_stage1_reuse(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3, device="cpu")
    x, v = _slices(16), _slices(4, seed=1)
    m = _model(16)
    h = train_vq_transformer(m, x, v, cfg, cfg, tmp_path / "tr", progress=False, train_fn=train_model,
                             vq_objective=VQObjective(rec="l1"), batch_size=5)
    assert [(r["stage"], r["stage_epoch"], r["epoch"]) for r in h] == [(1, 1, 1), (2, 1, 2)]
    assert "train_rec" in h[0] and "train_ce" in h[1] and math.isfinite(h[1]["val_loss"])
    assert (tmp_path / "tr" / "vqvae" / "last.pt").is_file() and (tmp_path / "tr" / "transformer" / "last.pt").is_file()
    rows = list(csv.DictReader(open(tmp_path / "tr" / "train_log.csv")))
    assert [r["stage"] for r in rows] == ["1", "2"]
    assert not any(p.requires_grad for p in m.vqvae.parameters()) and not m.training
    seqs = code_sequences(m, x, batch_size=5)
    assert seqs.dtype == np.int64 and seqs.shape == (16, 49)
    assert np.array_equal(seqs, raster_codes(m.codes(torch.from_numpy(x)[:, None])).numpy())
    trained = _state(m)
    h2 = train_vq_transformer(m, x, v, cfg, cfg, tmp_path / "tr", resume=True, progress=False, train_fn=train_model,
                              vq_objective=VQObjective(rec="l1"))
    assert len(h2) == len(h) and [r["train_loss"] for r in h2] == [r["train_loss"] for r in h]
    assert all(torch.equal(trained[k], v2) for k, v2 in _state(m).items())     # nothing trained again
    plain = _vqvae(16, seed=5)                                                  # the plain VQ-VAE row, trained first
    ph = train_model(plain, x, v, cfg, tmp_path / "models" / "vqvae", resume=True, progress=False, objective=VQObjective(rec="l1"))
    m3 = _model(16, seed=9)
    h3 = train_vq_transformer(m3, x, v, cfg, cfg, tmp_path / "models" / "vq_tr", resume=True, progress=False,
                              train_fn=train_model, vq_objective=VQObjective(rec="l1"), stage1_dir=tmp_path / "models" / "vqvae")
    assert h3[0]["train_loss"] == ph[0]["train_loss"]                           # stage 1 reloaded, not retrained
    assert all(torch.equal(a, b) for a, b in zip(_state(plain).values(), _state(m3.vqvae).values()))
    assert not (tmp_path / "models" / "vq_tr" / "vqvae").exists()


def test_fit_builds_both_configs_and_the_sibling_stage1_folder(tmp_path):
    calls = []
    def engine(model, train, val, cfg, ckpt, resume, progress, name, objective):
        calls.append((ckpt, cfg, type(objective).__name__, resume)); return [{"epoch": 1, "train_loss": 0.0}]
    fit = vq_transformer_fit(train_fn=engine, train_config=lambda cfg, **kw: (cfg, kw), vq_objective=VQObjective(rec="l1"),
                             stage1_fixed={"batch_size": 32, "lr": 5e-4}, stage2_fixed={"batch_size": 4, "lr": 1e-4})
    sets = {"train": SimpleNamespace(slices=_slices(3)), "val": SimpleNamespace(slices=None)}
    h = fit(_model(16), sets, "CFG", tmp_path / "models" / "vq_tr", True, False)
    assert calls == [(tmp_path / "models" / "vqvae", ("CFG", {"batch_size": 32, "lr": 5e-4}), "VQObjective", True),
                     (tmp_path / "models" / "vq_tr" / "transformer", ("CFG", {"batch_size": 4, "lr": 1e-4}), "TransformerObjective", True)]
    assert [r["stage"] for r in h] == [1, 2]
    calls.clear()
    vq_transformer_fit(train_fn=engine, train_config=lambda cfg, **kw: cfg, vq_objective=VQObjective(),
                       stage1_dir_name=None)(_model(16), sets, "CFG", tmp_path / "m" / "x", True, False)
    assert calls[0][0] == tmp_path / "m" / "x" / "vqvae"
    assert PAPER_SETTINGS["transformer"]["batch_size"] == 4 and PAPER_SETTINGS["vqvae"]["loss"] == "L1"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_heal_matches_cpu():
    m = _model(16, threshold=0.2)
    x = torch.rand(2, 1, 32, 32)
    cpu = m.restore(x)
    gpu = m.cuda().restore(x.cuda())
    assert torch.equal(cpu["mask"], gpu["mask"].cpu())
    assert torch.allclose(cpu["recon"], gpu["recon"].cpu(), atol=1e-4)
