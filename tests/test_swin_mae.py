"""Swin MAE (models.swin_mae): window masking in whole r x r groups with exact counts, the mask token, patchify round trip,
Xu's layer layout (widths, windows, drop-path rates, initialisation), complementary test masks and a deterministic
reconstruction that is their masked-pixel mean, the objective's masked mean (L1 / L2 by hand), AdamW, and the engine."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import blob_slices

from uad_study.core import UADInputError, seed_everything
from uad_study.models.base import check_model
from uad_study.models.swin_mae import (SWIN_MAE_PAPER, PatchExpanding, SwinMAE, SwinMAEObjective, complementary_masks,
                                       n_kept, patchify, swin_mae_windows, unpatchify, window_mask)
from uad_study.training import TrainConfig, train_model

SMALL = dict(embed_dim=16, heads=(1, 2, 4, 8))


def _small(size=64, **kw):
    seed_everything(0)
    return SwinMAE(size, **{**SMALL, **kw})


def _whole_groups(m, r):
    "True when every r x r group of the patch masks (N, gh, gw) is all masked or all visible."
    return torch.equal(m, m[:, ::r, ::r].repeat_interleave(r, 1).repeat_interleave(r, 2))


# ---------------------------------------------------------------- masks

@pytest.mark.parametrize("ratio,kept", [(0.75, 16), (0.5, 32), (0.9, 6)])
def test_window_mask_keeps_exactly_floor_groups_in_whole_groups(ratio, kept):
    m = window_mask(8, (32, 32), 4, ratio, torch.Generator().manual_seed(0))
    assert m.shape == (8, 32, 32) and m.dtype == torch.bool
    assert (~m).sum((1, 2)).tolist() == [kept * 16] * 8          # G = 64 groups of 16 patches
    assert _whole_groups(m, 4)
    assert len({tuple(s.flatten().tolist()) for s in m}) == 8     # the samples differ
    per_patch = torch.rand(1, 32, 32) < ratio                     # what the check rejects: masking patch by patch
    assert not _whole_groups(per_patch, 4)


def test_window_mask_is_seeded_by_generator_or_global_rng():
    g = lambda: torch.Generator().manual_seed(7)
    assert torch.equal(window_mask(4, (16, 16), generator=g()), window_mask(4, (16, 16), generator=g()))
    assert not torch.equal(window_mask(4, (16, 16), generator=g()), window_mask(4, (16, 16), generator=torch.Generator().manual_seed(8)))
    torch.manual_seed(3); a = window_mask(4, (16, 16))
    torch.manual_seed(3); b = window_mask(4, (16, 16))
    assert torch.equal(a, b)
    # group numbering is row-major over the (gh/r, gw/r) group grid, aligned to multiples of r
    m = window_mask(1, (8, 12), 4, 0.75, g())[0]
    assert m.shape == (8, 12) and (~m).sum() == 16 and (~m)[::4, ::4].sum() == 1


def test_n_kept_guards_float_round_off():
    assert int(100 * (1 - 0.9)) == 9                                # the plain floor is off by one here
    assert n_kept(100, 0.9) == 10 and n_kept(64, 0.75) == 16 and n_kept(64, 0.7) == 19


@pytest.mark.parametrize("k", [2, 4, 5])
def test_complementary_masks_partition_the_groups(k):
    c = complementary_masks((16, 16), 4, k)
    assert c.shape == (k, 16, 16) and _whole_groups(c, 4)
    assert c.sum(0).unique().tolist() == [k - 1]                    # every group masked in K - 1 masks
    assert (~c).sum(0).unique().tolist() == [1]                     # and kept in exactly one
    sizes = sorted((~c[:, ::4, ::4]).sum((1, 2)).tolist())
    assert sum(sizes) == 16 and sizes[-1] - sizes[0] <= 1           # near-equal parts
    assert torch.equal(c, complementary_masks((16, 16), 4, k)) and not torch.equal(c, complementary_masks((16, 16), 4, k, seed=1))


def test_model_test_masks_follow_the_mask_ratio():
    assert _small().test_masks().shape[0] == 4                      # round(1 / (1 - 0.75))
    m = _small(mask_ratio=0.5)
    assert m.test_masks().shape[0] == 2 and m.test_masks().float().mean().item() == 0.5


# ---------------------------------------------------------------- patches and the mask token

def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 16, 12)
    t = patchify(x, 4)
    assert t.shape == (2, 4, 3, 48) and torch.equal(unpatchify(t, 4), x)
    assert torch.equal(t[1, 2, 1].view(4, 4, 3), x[1, :, 8:12, 4:8].permute(1, 2, 0))   # (row, column, channel)


def test_masked_embeddings_are_the_mask_token_and_reach_the_encoder():
    m = _small().eval()
    x = torch.rand(2, 1, 64, 64)
    seen = {}
    hook = m.layers[0].register_forward_pre_hook(lambda mod, args: seen.update(h=args[0].detach()))
    pm = m.window_mask(2, torch.Generator().manual_seed(0))
    m.predict(x, pm); hook.remove()
    h, t = seen["h"].permute(0, 2, 3, 1), m.embed(x).detach()       # the first stage's input, channels last
    assert h.shape == (2, 16, 16, 16)
    assert torch.equal(h[pm], m.mask_token.detach().expand(int(pm.sum()), -1))
    assert torch.equal(h[~pm], t[~pm]) and not torch.equal(t[pm], h[pm])
    assert torch.equal(m.mask_tokens(t, torch.zeros(2, 16, 16, dtype=torch.bool)), t)
    with pytest.raises(UADInputError, match="bool tensor"):
        m.mask_tokens(t, pm.float())


# ---------------------------------------------------------------- architecture

def test_layers_follow_xu():
    m = SwinMAE()                                                    # 128 px, width 96, depths (2, 2, 2, 2), heads (3, 6, 12, 24)
    assert m.widths == [96, 192, 384, 768] and m.windows == [8, 8, 8, 4] and m.grid == 32
    assert [type(l.downsample).__name__ for l in m.layers] == ["PatchMerging"] * 3 + ["NoneType"]
    assert [l.blocks[0].attn.num_heads for l in m.layers] == [3, 6, 12, 24]
    assert [l.blocks[0].attn.relative_position_bias_table.shape[0] for l in m.layers] == [225, 225, 225, 49]
    assert all(l.blocks[0].attn.qkv.bias is not None for l in m.layers)
    assert m.first_expand.expand.in_features == 768 and m.first_expand.norm.normalized_shape == (384,)
    assert [l.blocks[0].norm1.normalized_shape[0] for l in m.layers_up] == [384, 192, 96]
    assert [type(e).__name__ for e in m.expands] == ["PatchExpanding", "PatchExpanding", "Identity"]
    assert (m.head.in_features, m.head.out_features) == (96, 16) and m.norm_up.eps == 1e-6
    dpr = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for l in m.layers for b in l.blocks]
    assert dpr == pytest.approx(np.linspace(0, 0.1, 8).tolist())
    up = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for l in m.layers_up for b in l.blocks]
    assert up == pytest.approx(dpr[4:6] + dpr[2:4] + dpr[0:2])      # an up stage reuses its width's encoder rates
    assert sum(p.numel() for p in m.parameters()) == 26_628_628


def test_xu_initialisation():
    m = _small()
    lin = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert all(mod.bias is None or not mod.bias.any() for mod in lin)
    w = m.layers[1].blocks[0].attn.qkv.weight                        # xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= (6 / (32 + 96)) ** 0.5 and w.abs().max() > 0.9 * (6 / (32 + 96)) ** 0.5
    lns = [mod for mod in m.modules() if isinstance(mod, nn.LayerNorm)]
    assert all(torch.all(l.weight == 1) and not l.bias.any() and l.eps == 1e-6 for l in lns)
    assert 0.005 < m.mask_token.std().item() < 0.05


@pytest.mark.parametrize("size", [64, 128])
def test_shapes_and_model_protocol(size):
    m = _small(size)
    x = torch.rand(2, 1, size, size)
    info = check_model(m, x)
    assert info["recon"] == (2, 1, size, size) and info["encode"] == (2, 128) and info["outputs"] == ["mask", "recon"]
    o = m(x)
    assert o["recon"].shape == (2, 1, size, size) and o["mask"].shape == (2, 1, size, size) and o["mask"].dtype == x.dtype
    assert o["mask"].mean((1, 2, 3)).tolist() == [0.75, 0.75] and set(o["mask"].unique().tolist()) == {0.0, 1.0}
    g = size // 4
    assert m.predict(x, torch.zeros(2, g, g, dtype=torch.bool)).shape == (2, 1, size, size)
    assert m.reconstruct(x).shape == (2, 1, size, size)


def test_bad_sizes_and_inputs():
    with pytest.raises(UADInputError, match="tile every stage's map"):
        SwinMAE(128, window_size=7)
    with pytest.raises(UADInputError, match="patch_size \\* mask_group"):
        SwinMAE(72, **SMALL)
    with pytest.raises(UADInputError, match="divisible by its heads"):
        SwinMAE(64, embed_dim=32)                                   # 32 % 3
    with pytest.raises(UADInputError, match="test_masking"):
        SwinMAE(64, test_masking="random", **SMALL)
    with pytest.raises(UADInputError, match="in_ch"):
        SwinMAE(64, in_ch=0, **SMALL)
    with pytest.raises(UADInputError, match=r"SwinMAE needs images \(B, 1, 64, 64\)"):
        _small()(torch.rand(1, 1, 32, 32))
    assert swin_mae_windows(224, 4, (2, 2, 2, 2), (3, 6, 12, 24), 96, 7, 4, 0.75, "none") == [7, 7, 7, 7]


def test_patch_expanding_layout():
    pe = PatchExpanding(4, lambda c: nn.Identity())
    with torch.no_grad():
        pe.expand.weight.zero_(); pe.expand.weight[:, 0] = torch.arange(8.)
    y = pe(torch.tensor([2., 0., 0., 0.]).view(1, 4, 1, 1))
    assert y[0].permute(1, 2, 0).reshape(-1).tolist() == [2. * k for k in range(8)]   # (row, column, channel)
    with pytest.raises(UADInputError, match="even"):
        PatchExpanding(5)


# ---------------------------------------------------------------- test-time reconstruction

def test_complementary_reconstruction_is_the_masked_mean():
    m = _small().eval()
    x = torch.rand(2, 1, 64, 64)
    masks = m.test_masks()
    with torch.no_grad():
        preds = [m.predict(x, k.expand(2, -1, -1)) for k in masks]
    pix = [m.pixel_mask(k[None]) for k in masks]
    want = sum(p * q for p, q in zip(pix, preds)) / 3                 # each pixel hidden in K - 1 = 3 masks
    r = m.reconstruct(x)
    assert torch.allclose(r, want, atol=1e-6)
    kept0 = masks[0].logical_not().nonzero()[0] * 4                   # a pixel visible in mask 0 ...
    i, j = kept0.tolist()
    assert torch.allclose(r[:, :, i, j], (preds[1] + preds[2] + preds[3])[:, :, i, j] / 3, atol=1e-6)  # ... not from mask 0
    assert not torch.allclose(r, sum(preds) / 4, atol=1e-4)          # the plain mean over all masks differs
    none = _small(test_masking="none").eval()
    with torch.no_grad():
        assert torch.equal(none.reconstruct(x), none.predict(x, torch.zeros(2, 16, 16, dtype=torch.bool)))


@pytest.mark.parametrize("training", [True, False])
def test_reconstruct_is_deterministic_and_leaves_mode_and_rng(training):
    m = _small(drop_path=0.5).train(training)
    x = torch.rand(2, 1, 64, 64)
    state = torch.get_rng_state()
    r1, r2 = m.reconstruct(x), m.reconstruct(x)
    e1 = m.encode(x)
    assert torch.equal(r1, r2) and m.training == training and torch.equal(torch.get_rng_state(), state)
    assert not r1.requires_grad and e1.shape == (2, 128) and torch.equal(e1, m.encode(x))
    m.train()
    a, b = m(x)["recon"], m(x)["recon"]
    assert not torch.equal(a, b)                                       # training passes draw masks (and drop paths)


# ---------------------------------------------------------------- the objective

class Fixed(nn.Module):
    "A stand-in model: a fixed prediction and pixel mask (top row masked)."
    def __init__(self, recon): super().__init__(); self.recon = recon
    def forward(self, x, generator=None):
        return {"recon": self.recon, "mask": torch.tensor([[1., 1.], [0., 0.]]).view(1, 1, 2, 2)}


R = torch.tensor([[0.5, -1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
Z = torch.zeros(1, 1, 2, 2)


def test_objective_l1_l2_by_hand():
    loss, parts = SwinMAEObjective("l1")(Fixed(R), Z)
    assert loss.item() == pytest.approx(0.75) and sorted(parts) == ["rec_masked", "rec_visible"]
    assert parts["rec_masked"].item() == pytest.approx(0.75) and parts["rec_visible"].item() == pytest.approx(2.5)
    loss, parts = SwinMAEObjective("l2")(Fixed(R), Z)
    assert loss.item() == pytest.approx(0.625) and parts["rec_visible"].item() == pytest.approx(6.5)
    assert SwinMAEObjective("l1", on="all")(Fixed(R), Z)[0].item() == pytest.approx(1.625)
    assert SwinMAEObjective("l2", on="all")(Fixed(R), Z)[0].item() == pytest.approx((0.25 + 1 + 4 + 9) / 4)


def test_objective_on_masked_ignores_visible_pixels():
    target = torch.rand(1, 1, 2, 2)
    for visible in (torch.zeros(2), torch.tensor([5.0, -7.0])):
        pred = target.clone(); pred[0, 0, 1] = visible                 # exact on the masked row, anything below
        assert SwinMAEObjective("l1")(Fixed(pred), target)[0].item() == 0.0
        assert SwinMAEObjective("l2")(Fixed(pred), target)[0].item() == 0.0
    assert SwinMAEObjective("l1", on="all")(Fixed(pred), target)[0].item() > 0


def test_objective_with_the_model_and_seeded_validation():
    m = _small()
    x = torch.rand(4, 1, 64, 64)
    obj = SwinMAEObjective()
    m.eval()
    a, pa = obj.val_loss(m, {"image": x})
    torch.manual_seed(123)
    b, pb = obj.val_loss(m, {"image": x})
    assert a.item() == b.item() and pa["rec_visible"].item() == pb["rec_visible"].item()   # global RNG does not matter
    loss, parts = obj(m, x)
    assert loss.item() == parts["rec_masked"].item()
    loss.backward()
    assert m.mask_token.grad is not None and m.mask_token.grad.abs().sum() > 0
    with pytest.raises(UADInputError, match="rec must be one of"):
        SwinMAEObjective("l3")
    with pytest.raises(UADInputError, match="on must be one of"):
        SwinMAEObjective(on="visible")


def test_adamw_settings():
    m = _small()
    opt = SwinMAEObjective().optimizers(m, TrainConfig(lr=3e-4, weight_decay=0.0))["model"]
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1
    g = opt.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["betas"]) == (3e-4, 0.05, (0.9, 0.95))
    assert sum(p.numel() for p in g["params"]) == sum(p.numel() for p in m.parameters())   # decay on every parameter (Xu)
    assert SWIN_MAE_PAPER["xu"]["weight_decay"] == 0.05 and SWIN_MAE_PAPER["xu"]["betas"] == (0.9, 0.95)


def test_trains_through_the_engine(tmp_path):
    seed_everything(0)
    m = _small()
    rng = np.random.default_rng(0)
    h = train_model(m, rng.random((16, 64, 64), dtype=np.float32), blob_slices(4, 64), TrainConfig(epochs=1, batch_size=8, lr=1e-3, device="cpu"),
                    tmp_path, progress=False, objective=SwinMAEObjective())
    last = h[-1]
    assert all(np.isfinite(last[k]) for k in ["train_loss", "train_rec_masked", "train_rec_visible", "val_loss"])
    assert last["train_loss"] == pytest.approx(last["train_rec_masked"])
    assert m.training is False
