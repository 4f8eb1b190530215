"""ASC-Net (Dey & Hong 2021): the disjointness Dice by hand (zeros counted as 1, as the paper's code), the label convention
of both steps (the healthy set -1 in each of its three readings, the input's cut +1; the generator pushes its cut to
-1) with the discriminator frozen in the generator step, the data pairing (every unknown slice kept, the reference
cycled in a seeded order), the study-kit fit on the `val_anomalous` role (and its refusal without one) with the spec's
healthy set reaching the objective, one engine epoch, the model protocol and both map sources."""
import contextlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import blob_slices
from uad_study.core import UADInputError
from uad_study.models.ascnet import ASCNet, ASCNetObjective, ascnet_data, ascnet_spec, disjoint_dice
from uad_study.models.base import check_model
from uad_study.training import TrainConfig, train_model


def test_disjoint_dice_by_hand():
    a = torch.tensor([0.2, 0.0, 0.6, 1e-20]).view(1, 1, 2, 2); b = torch.tensor([0.5, 0.5, 0.0, 0.3]).view(1, 1, 2, 2)
    a1, b1 = torch.tensor([0.2, 1.0, 0.6, 1.0]), torch.tensor([0.5, 0.5, 1.0, 0.3])   # below 1e-16 -> 1
    want = (2 * (a1 * b1).sum() + 1) / (a1.sum() + b1.sum() + 1)
    assert disjoint_dice(a, b).item() == pytest.approx(want.item(), rel=1e-6)
    c = torch.full((2, 1, 4, 4), 0.5)
    assert disjoint_dice(c, c).item() > disjoint_dice(c, 1e-3 * c).item()           # overlap costs more


class _Step:
    "A StepContext stand-in: records each optimised loss and whether the discriminator was trainable then."
    world_size, global_step = 1, 0
    def __init__(self, m): self.m, self.seen = m, []
    def autocast(self): return contextlib.nullcontext()
    def optimise(self, name, loss):
        self.seen.append((name, loss.item(), all(p.requires_grad for p in self.m.discriminator.parameters())))


def test_step_labels_and_frozen_discriminator():
    torch.manual_seed(0); m = ASCNet(16, (4, 8, 8), dropout=0.0).eval()
    x, r = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16)
    o = m(x); d_ref, d_cut = m.discriminator(r), m.discriminator(o["cut_normal"])
    d_ref_cut = m.discriminator(m(r)["cut_normal"])
    st = _Step(m); out = ASCNetObjective().train_step(m, {"image": x, "reference": r}, st)
    (n1, ld, t1), (n2, lg, t2) = st.seen
    assert (n1, n2) == ("discriminator", "generator") and t1 and not t2                  # D frozen during the G step
    # default healthy set: the reference images (the paper's text), label -1; the input's cut +1
    assert ld == pytest.approx(0.5 * ((d_ref + 1).abs().mean() + (d_cut - 1).abs().mean()).item(), rel=1e-5)
    assert out["d_ref"].item() == pytest.approx(d_ref.mean().item(), rel=1e-5) and "d_ref_cut" not in out
    other = {"cuts": 0.5 * ((d_ref_cut + 1).abs().mean() + (d_cut - 1).abs().mean()),             # the references' cuts alone
             "images+cuts": ((d_ref + 1).abs().mean() + (d_ref_cut + 1).abs().mean() + (d_cut - 1).abs().mean()) / 3}
    for hs, want_d in other.items():
        st_hs = _Step(m); ASCNetObjective(healthy_set=hs).train_step(m, {"image": x, "reference": r}, st_hs)
        assert st_hs.seen[0][1] == pytest.approx(want_d.item(), rel=1e-5), hs
    with pytest.raises(UADInputError, match="healthy_set"): ASCNetObjective(healthy_set="reference")
    with pytest.raises(UADInputError, match="healthy_set"): ascnet_spec(healthy_set="reference", train_fn=None, train_config=None)
    want = (d_cut + 1).abs().mean() + (o["recon"] - x).square().mean() + disjoint_dice(o["cut_normal"], o["cut_anomaly"])
    assert lg == pytest.approx(want.item(), rel=1e-5)                                    # the generator's cut aims at -1
    assert all(p.requires_grad for p in m.discriminator.parameters())
    with pytest.raises(UADInputError, match="'reference'"): ASCNetObjective().train_step(m, {"image": x}, _Step(m))


def test_data_pairing():
    ref, unk = np.arange(3)[:, None, None] * np.ones((3, 2, 2)), 10 + np.arange(7)[:, None, None] * np.ones((7, 2, 2))
    d = ascnet_data(ref, unk, seed=1)
    assert d["image"].shape == d["reference"].shape == (7, 2, 2)
    assert np.array_equal(d["image"], unk)                                              # every unknown slice, in order
    assert set(d["reference"][:, 0, 0]) == {0.0, 1.0, 2.0}                              # the reference cycled
    assert np.array_equal(d["reference"], ascnet_data(ref, unk, seed=1)["reference"])


def _tc(cfg, **fixed): return TrainConfig(**{"epochs": 1, "batch_size": 4, "device": "cpu", **fixed})


@pytest.mark.parametrize("healthy_set", ["images", "cuts"])
def test_fit_on_val_anomalous_and_protocol(tmp_path, healthy_set):
    spec = ascnet_spec("smoke", healthy_set=healthy_set, train_fn=train_model, train_config=_tc)
    cfg = SimpleNamespace(resolution=32, seed=0)
    torch.manual_seed(0); m = spec["build"](cfg)
    healthy, unknown = blob_slices(8, 32, seed=1), blob_slices(6, 32, seed=2)
    class _Set(SimpleNamespace):
        def __len__(self): return len(self.slices)
    sets = {"train": _Set(slices=healthy), "val": _Set(slices=healthy[:4]), "val_anomalous": _Set(slices=unknown)}
    g0, d0 = [p.detach().clone() for p in m.generator_parameters()], [p.detach().clone() for p in m.discriminator.parameters()]
    hist = spec["fit"](m, sets, cfg, tmp_path / "ascnet", False, False)
    r = hist[0]
    assert all(math.isfinite(r[k]) for k in ("train_loss", "train_d_loss", "train_adv", "train_rec", "train_disjoint", "val_loss"))
    assert any(not torch.equal(a, b) for a, b in zip(g0, m.generator_parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, m.discriminator.parameters()))
    x = torch.from_numpy(unknown[:2])[:, None]
    assert check_model(m.eval(), x)["recon"] == (2, 1, 32, 32)
    assert "val_anomalous" in spec["describe"](cfg)["training_data"]
    # the spec's healthy set reaches the training objective (its D outputs are logged) and the config record
    assert ("train_d_ref_cut" in r, "train_d_ref" in r) == ((True, False) if healthy_set == "cuts" else (False, True))
    assert spec["describe"](cfg)["discriminator_healthy_set"] == healthy_set
    with pytest.raises(UADInputError, match="val_anomalous"): spec["fit"](m, {"train": sets["train"], "val": sets["val"]}, cfg, tmp_path / "x", False, False)


def test_map_sources():
    torch.manual_seed(3); x = torch.rand(2, 1, 16, 16)
    a = ASCNet(16, (4, 8, 8), dropout=0.0, map_source="cut").eval()
    b = ASCNet(16, (4, 8, 8), dropout=0.0, map_source="recon").eval(); b.load_state_dict(a.state_dict())
    o = a(x)
    assert torch.allclose(x - a.reconstruct(x), o["cut_anomaly"], atol=1e-6)
    assert torch.allclose(x - b.reconstruct(x), o["recon"], atol=1e-6)
    with pytest.raises(UADInputError, match="map_source"): ASCNet(16, (4, 8, 8), map_source="diff")
