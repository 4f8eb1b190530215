"""The Reversed-Autoencoders paper's baselines: AE-S (no dense layer, spatial code), the VAE's ELBO (KL enters with
its sign and scale), and MKD (frozen teacher, student-only training, hand-computed loss and map, labelled random
teacher, weights files), trained through the engine, deterministic under a seed."""
import copy
import math
import warnings

import numpy as np
import pytest
from conftest import blob_slices
import torch
import torch.nn as nn

from uad_study.core import UADInputError, seed_everything
from uad_study.models.base import check_model
from uad_study.models.baselines import BaselineObjective, DenseVAE
from uad_study.models.ra_baselines import (MKD, MKD_STUDENT, VAE512, VGG16_POOLS, VGG16_WEIGHTS_FILE, MKDObjective,
                                           SpatialAE, VAEObjective, mkd_loss, mkd_student, vgg16_teacher,
                                           vgg16_weights_path, zimmerer_vae)
from uad_study.models.reversed_ae import SoftIntroVAE
from uad_study.training import StepContext, TrainConfig, train_model


def _blobs(n=8, s=32):
    return blob_slices(n, s)


@pytest.fixture
def hub(tmp_path):
    "An empty torch hub cache (no VGG-16 weights there), restored afterwards."
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def _mkd(**kw):
    seed_everything(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MKD(**{"allow_random_teacher": True, **kw})


# ---------------------------------------------------------------- AE-S

def test_spatial_ae_paper_layout_has_no_dense_layer():
    m = SpatialAE()  # 128 x 128, 32-64-128-128, 5x5 stride-2, the iml-dl port of Baur et al.
    assert not any(isinstance(l, nn.Linear) for l in m.modules())
    convs = [b[0] for b in m.encoder]
    assert [c.out_channels for c in convs] == [32, 64, 128, 128]
    assert all(c.kernel_size == (5, 5) and c.stride == (2, 2) for c in convs)
    assert [b[0].out_channels for b in m.decoder[:-1]] == [128, 64, 32, 32]
    assert isinstance(m.decoder[-1], nn.Conv2d) and m.decoder[-1].kernel_size == (1, 1)
    assert m.encoder[0][2].negative_slope == pytest.approx(0.3)
    z = m.eval().encode(torch.zeros(2, 1, 128, 128))
    assert tuple(z.shape) == (2, 128, 8, 8)  # the bottleneck is a feature map, not a vector
    with pytest.raises(UADInputError, match="divisible"):
        SpatialAE(in_size=100)
    with pytest.raises(UADInputError, match="odd"):
        SpatialAE(kernel=4)


def test_spatial_ae_protocol_shapes_and_range():
    seed_everything(0)
    m = SpatialAE(in_size=64, widths=(4, 8, 16, 16)).eval()
    x = torch.rand(3, 1, 64, 64)
    info = check_model(m, x)
    assert info["outputs"] == ["recon", "z"] and info["encode"] == (3, 16, 4, 4)
    assert info["feature_layers"] == ["enc0", "enc1", "enc2", "enc3"]
    r = m.reconstruct(x)
    assert r.shape == x.shape and 0 <= r.min() and r.max() <= 1
    assert torch.equal(m(x)["recon"], r) and SpatialAE.variational is False


# ---------------------------------------------------------------- VAE

class _Fixed(nn.Module):
    "recon = x; mu a parameter (ones), logvar 0: SSE 0 and KL = 0.5 per latent unit."
    def __init__(self, d=4):
        super().__init__()
        self.mu = nn.Parameter(torch.ones(d))
    def forward(self, x):
        return {"recon": x, "mu": self.mu.expand(len(x), -1), "logvar": torch.zeros(len(x), len(self.mu))}


def test_vae_objective_kl_enters_with_its_sign_and_scale():
    x = torch.rand(3, 1, 8, 8); n = 64
    m = _Fixed()
    loss, parts = VAEObjective(beta_kl=1.0)(m, x)
    assert loss.item() == pytest.approx(0.5 * 4 / n)  # dropped KL: 0; flipped: negative
    assert parts["kl"].item() == pytest.approx(2.0) and parts["rec"].item() == pytest.approx(0.0)
    loss.backward()
    assert torch.allclose(m.mu.grad, torch.full((4,), 1.0 / n))  # d KL / d mu = +mu, scaled by 1/(C H W)
    assert VAEObjective(beta_kl=0.0)(m, x)[0].item() == pytest.approx(0.0)
    # the reconstruction term: SSE / (C H W) with beta_rec
    y = torch.zeros(2, 1, 4, 4)
    class _Rec(nn.Module):
        def forward(self, x): return {"recon": x + 0.5, "mu": torch.zeros(len(x), 2), "logvar": torch.zeros(len(x), 2)}
    l2, p2 = VAEObjective(beta_rec=2.0)(_Rec(), y)
    assert p2["rec"].item() == pytest.approx(16 * 0.25) and l2.item() == pytest.approx(2.0 * 0.25)
    with pytest.raises(UADInputError, match=">= 0"):
        VAEObjective(beta_rec=-1)


def test_vae512_configs():
    assert VAE512 == dict(widths=(64, 128, 256, 512, 512), latent=512)
    seed_everything(0)
    m = SoftIntroVAE(in_size=32, **{**VAE512, "widths": (4, 8, 8, 16, 16)})
    assert m.latent == 512 and m.fc_enc.out_features == 1024
    z = zimmerer_vae()
    assert isinstance(z, DenseVAE) and z.channels == (16, 32, 64, 256, 256) and z.latent_dim == 512
    small = zimmerer_vae(in_size=32, widths=(4, 8, 8, 16, 16), latent=8).eval()
    assert check_model(small, torch.rand(2, 1, 32, 32))["outputs"] == ["logvar", "mu", "recon", "z"]


def test_vae_trains_through_the_engine(tmp_path):
    seed_everything(0)
    m = SoftIntroVAE(in_size=32, widths=(4, 8, 8, 16, 16), latent=8)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=5e-4, device="cpu")
    h = train_model(m, _blobs(8), _blobs(4), cfg, tmp_path, progress=False, objective=VAEObjective())
    assert len(h) == 2 and all(np.isfinite(h[-1][k]) for k in ["train_loss", "train_rec", "train_kl", "val_loss"])
    assert h[-1]["train_loss"] == pytest.approx((h[-1]["train_rec"] + h[-1]["train_kl"]) / (32 * 32), rel=1e-5)
    assert VAEObjective().optimizers(m, cfg)["model"].param_groups[0]["lr"] == 5e-4
    assert VAEObjective(lr=1e-4).optimizers(m, cfg)["model"].param_groups[0]["lr"] == 1e-4


def test_spatial_ae_trains_with_l1_and_is_deterministic(tmp_path):
    def run(d):
        seed_everything(0)
        m = SpatialAE(in_size=32, widths=(4, 8, 8))
        h = train_model(m, _blobs(8), _blobs(4), TrainConfig(epochs=2, batch_size=4, lr=5e-4, device="cpu"), tmp_path / d,
                        progress=False, objective=BaselineObjective(recon="l1"))
        return m, h
    (a, ha), (b, hb) = run("a"), run("b")
    assert ha[-1]["train_loss"] == hb[-1]["train_loss"] and np.isfinite(ha[-1]["val_loss"])
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k


# ---------------------------------------------------------------- MKD: the loss

def test_mkd_loss_hand_computed_per_sample_cosine():
    # sample 1: (1,0) vs (0,1): 1 - 0; sample 2: (3,4) vs (3,4): 0 -> dir 0.5; MSE (1 + 1 + 0 + 0)/4 = 0.5
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0]], requires_grad=True)
    b = torch.tensor([[0.0, 1.0], [3.0, 4.0]], requires_grad=True)
    # a second layer (1, 2, 1, 2): every position parallel (per-position cosine 1), but the flattened sample is not:
    # s = (1, 0, 0, 1), t = (1, 0, 0, 2): cosine 3 / sqrt(10); MSE (0 + 0 + 0 + 1)/4
    c = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], requires_grad=True)
    d = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])
    loss, parts = mkd_loss([a, c], [b, d], val_weight=0.1, dir_weight=2.0)
    dirn = 0.5 + (1 - 3 / math.sqrt(10))
    assert parts["dir"].item() == pytest.approx(dirn, abs=1e-6) and parts["val"].item() == pytest.approx(0.75)
    assert loss.item() == pytest.approx(0.1 * 0.75 + 2.0 * dirn, abs=1e-6)
    loss.backward()
    assert b.grad is None and a.grad.abs().sum() > 0 and c.grad.abs().sum() > 0  # the teacher is a fixed target


def test_mkd_loss_is_zero_for_equal_features_even_all_zero():
    f = [torch.rand(2, 3, 4, 4), torch.zeros(2, 5, 2, 2), torch.rand(2, 1, 1, 1)]
    loss, parts = mkd_loss([t.clone() for t in f], f)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and parts["dir"].item() == pytest.approx(0.0, abs=1e-6)  # not 1 for the zeros
    one_zero = mkd_loss([torch.zeros(1, 2)], [torch.ones(1, 2)], val_weight=0.0)[0]
    assert one_zero.item() == pytest.approx(1.0)  # a zero student vector is orthogonal, not identical
    with pytest.raises(UADInputError, match="same layers and shapes"):
        mkd_loss([torch.zeros(1, 2)], [torch.zeros(1, 3)])


# ---------------------------------------------------------------- MKD: the teacher

def test_random_teacher_is_labelled_and_warned(hub):
    with pytest.raises(UADInputError, match="never downloads"):
        MKD()
    seed_everything(0)
    with pytest.warns(UserWarning, match="RANDOM VGG-16"):
        m = MKD(allow_random_teacher=True)
    assert m.uad_label == "MKD teacher: random VGG-16 (NOT ImageNet)" and m.uad_teacher_weights is None
    assert m.teacher.uad_label == m.uad_label


def test_bad_weights_path_names_the_path(hub):
    p = hub / "elsewhere" / VGG16_WEIGHTS_FILE
    with pytest.raises(UADInputError) as e:
        MKD(teacher_weights=p, allow_random_teacher=True)  # a given path that is missing is an error, never a random teacher
    assert e.value.path == str(p) and str(p) in str(e.value)


def _fake_weights(path, seed=7, drop=None):
    "A file in torchvision's format: `features.*` (a seeded random VGG-16) and a classifier key."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = vgg16_teacher(allow_random=True, seed=seed)
    sd = {f"features.{k}": v for k, v in net.state_dict().items() if k != drop}
    sd["classifier.0.weight"] = torch.zeros(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return net


def test_weights_file_is_loaded_from_a_path_or_the_hub_cache(hub, recwarn):
    src = _fake_weights(hub / "w" / VGG16_WEIGHTS_FILE)
    m = _mkd(teacher_weights=hub / "w" / VGG16_WEIGHTS_FILE, allow_random_teacher=False)
    assert "ImageNet" in m.uad_label and m.uad_teacher_weights == str(hub / "w" / VGG16_WEIGHTS_FILE)
    for (k, p), q in zip(m.teacher.state_dict().items(), src.state_dict().values()):
        assert torch.equal(p, q), k
    assert vgg16_weights_path() == hub / "checkpoints" / VGG16_WEIGHTS_FILE
    _fake_weights(vgg16_weights_path(), seed=8)
    recwarn.clear()
    d = MKD(stages=(2, 3), map_stages=(3,))  # found in the hub cache: no flag needed, no warning
    assert d.uad_teacher_weights == str(vgg16_weights_path()) and not [w for w in recwarn if "RANDOM" in str(w.message)]
    assert len(d.teacher) == VGG16_POOLS[2] + 1  # only the layers up to the last distilled pool
    bad = hub / "bad.pth"
    _fake_weights(bad, drop="28.weight")
    with pytest.raises(UADInputError, match="features") as e:
        MKD(teacher_weights=bad)
    assert e.value.path == str(bad)


# ---------------------------------------------------------------- MKD: the model

def test_mkd_protocol_input_and_shapes():
    m = _mkd().eval()
    x = torch.rand(2, 1, 32, 32)
    assert check_model(m, x)["outputs"] == ["recon", "student", "teacher"]
    assert torch.equal(m.reconstruct(x), x) and torch.equal(m(x)["recon"], x)
    assert [tuple(f.shape[1:]) for f in m(x)["student"]] == [(128, 8, 8), (256, 4, 4), (512, 2, 2), (512, 1, 1)]
    h = m.prep(torch.full((1, 1, 32, 32), 0.5))  # grey -> 3 channels, ImageNet mean/std
    want = [(0.5 - mu) / sd for mu, sd in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    assert h.shape == (1, 3, 32, 32) and torch.allclose(h[0, :, 0, 0], torch.tensor(want))
    assert torch.equal(_mkd(imagenet_norm=False).prep(x), x.expand(-1, 3, -1, -1))
    am = m.anomaly_map(x)
    assert am.shape == (2, 32, 32) and (am >= 0).all() and m.anomaly_score(x).shape == (2,)
    with pytest.raises(UADInputError, match="H, W >= 32"):
        m(torch.rand(1, 1, 16, 16))
    with pytest.raises(UADInputError, match="teacher's widths"):
        _mkd(stages=(1, 2), map_stages=(2,))
    with pytest.raises(UADInputError, match="subset of stages"):
        _mkd(stages=(2, 3), map_stages=(4,))
    with pytest.raises(UADInputError, match="pools in 1..5"):
        _mkd(stages=(6,), map_stages=(6,))
    assert MKD_STUDENT.count("M") == 5 and sum(isinstance(l, nn.BatchNorm2d) for l in mkd_student()) == 8


def test_mkd_map_and_score_hand_computed():
    m = _mkd(stages=(4, 5), map_stages=(5,), val_weight=0.01, dir_weight=1.0).eval()
    x = torch.rand(2, 1, 32, 32)
    s4, t4 = torch.rand(2, 512, 2, 2), torch.rand(2, 512, 2, 2)  # stage 4 is not in map_stages: ignored
    s5 = torch.tensor([[1.0, 0.0], [2.0, 2.0]]).view(2, 2, 1, 1)
    t5 = torch.tensor([[0.0, 1.0], [2.0, 2.0]]).view(2, 2, 1, 1)
    m.features = lambda x: ([s4, s5], [t4, t5])
    am = m.anomaly_map(x)
    # sample 0: 1 - cos 0 + 0.01 * (1 + 1) / 2 = 1.01 everywhere (a 1x1 layer upsampled); sample 1: identical -> 0
    assert torch.allclose(am[0], torch.full((32, 32), 1.01)) and torch.allclose(am[1], torch.zeros(32, 32), atol=1e-6)
    assert torch.allclose(m.anomaly_score(x), torch.tensor([1.01, 0.0]), atol=1e-6)


def test_mkd_teacher_frozen_student_learns_one_step():
    m = _mkd(stages=(2, 3), map_stages=(3,))
    obj = MKDObjective(lr=1e-2)
    cfg = TrainConfig(device="cpu")
    opts = obj.optimizers(m, cfg)
    assert list(opts) == ["student"]
    ctx = StepContext(opts, {"student": torch.amp.GradScaler("cpu", enabled=False)}, cfg, 0, 0, 1, torch.device("cpu"))
    teacher0, student0 = copy.deepcopy(m.teacher.state_dict()), copy.deepcopy(m.student.state_dict())
    m.train()
    assert m.student.training and not m.teacher.training
    out = obj.train_step(m, {"image": torch.from_numpy(_blobs(4))[:, None]}, ctx)
    assert sorted(out) == ["dir", "loss", "val"] and np.isfinite(float(out["loss"]))
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    for k, v in m.teacher.state_dict().items():
        assert torch.equal(v, teacher0[k]), f"teacher {k} changed"
    assert any(not torch.equal(v, student0[k]) for k, v in m.student.state_dict().items()), "the student did not move"


def test_mkd_trains_through_the_engine_deterministically(tmp_path):
    def run(d):
        m = _mkd(stages=(2, 3), map_stages=(3,))
        teacher0 = copy.deepcopy(m.teacher.state_dict())
        h = train_model(m, _blobs(8), _blobs(4), TrainConfig(epochs=2, batch_size=4, device="cpu"), tmp_path / d,
                        progress=False, objective=MKDObjective())
        assert all(torch.equal(v, teacher0[k]) for k, v in m.teacher.state_dict().items())
        return m, h
    (a, ha), (b, hb) = run("a"), run("b")
    assert len(ha) == 2 and all(np.isfinite(ha[-1][k]) for k in ["train_loss", "train_val", "train_dir", "val_loss"])
    assert ha[0]["lr_student"] == pytest.approx(1e-3)
    assert [r["train_loss"] for r in ha] == [r["train_loss"] for r in hb]
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k
    assert not a.teacher.training  # train_model leaves the model in eval mode; the teacher was never in train mode
