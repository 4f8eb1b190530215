"Anomaly maps and scores: SSIM and CLAHE against skimage, offline LPIPS loading, eq. 5 and eq. 6 on hand-made inputs, slice/subject scores."
import socket
import urllib.request
import warnings

import numpy as np
import pytest
from uad_study.models.ssae import SSAE
import torch
import torchvision
from skimage import exposure
from skimage.metrics import structural_similarity

from uad_study.core import UADInputError
from uad_study.losses import kl_divergence
from uad_study.scores import (ANOMALY_MAPS, LPIPS_BACKBONE_FILES, anomaly_map, clahe, describe_map, is_real_lpips,
                              latent_kl, load_lpips, lpips_backbone_path, lpips_map, reconstruction_error,
                              residual_lpips_map, reversed_ae_map, scale_space_aggregate, slice_scores, ssim_map,
                              subject_scores, clahe_absolute_map, model_map)


def brainish(n=3, size=40, seed=0):
    "Smooth blob-like slices in [0, 1] and a reconstruction with a square 'lesion' removed."
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    x = np.stack([np.clip(0.6 * np.exp(-((yy - .5) ** 2 + (xx - .5) ** 2) * 6) + 0.1 * rng.random((size, size)), 0, 1)
                  for _ in range(n)]).astype(np.float32)
    x_hat = x.copy(); x[:, 10:18, 12:20] = 0.95   # the input has a bright lesion the reconstruction lacks
    return x, x_hat


@pytest.fixture
def offline(monkeypatch, tmp_path):
    "No network: every download path raises; the torch hub cache is an empty folder."
    def boom(*a, **k): raise AssertionError(f"network access attempted: {a[:1]}")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", boom)
    monkeypatch.setattr(torch.hub, "download_url_to_file", boom)
    monkeypatch.setattr(urllib.request, "urlopen", boom)
    monkeypatch.setattr(socket.socket, "connect", boom)
    hub = tmp_path / "hub"; hub.mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


@pytest.fixture
def rand_net(offline):
    with pytest.warns(UserWarning, match="RANDOM backbone"):
        return load_lpips("alex", allow_random_backbone=True)


# --- SSIM --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("shape", [(33, 40), (24, 24)])
def test_ssim_map_matches_skimage(sigma, shape):
    rng = np.random.default_rng(1)
    x = rng.random((2, *shape)).astype(np.float32)
    y = np.clip(x + 0.15 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    got = ssim_map(x, y, sigma=sigma)
    for i in range(2):
        _, s = structural_similarity(x[i], y[i], data_range=1.0, gaussian_weights=True, sigma=sigma,
                                     use_sample_covariance=False, full=True)
        np.testing.assert_allclose(got[i], np.clip(1 - s, 0, 1), atol=1e-5)
    assert got.dtype == np.float32 and got.min() >= 0 and got.max() <= 1


def test_ssim_map_zero_for_identical_and_high_at_lesion():
    x, x_hat = brainish()
    assert ssim_map(x_hat, x_hat).max() == 0
    m = ssim_map(x, x_hat)
    assert m[:, 10:18, 12:20].mean() > 5 * m[:, 30:, 30:].mean()


def test_ssim_map_rejects_bad_input():
    with pytest.raises(UADInputError, match="shapes differ"): ssim_map(np.zeros((1, 20, 20)), np.zeros((1, 20, 21)))
    with pytest.raises(UADInputError, match="window radius"): ssim_map(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))


# --- CLAHE -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"kernel_size": 8, "clip_limit": 0.03, "nbins": 128}])
def test_clahe_matches_skimage(kw):
    x, _ = brainish(n=2)
    got = clahe(x, **kw)
    for i in range(2):
        np.testing.assert_allclose(got[i], exposure.equalize_adapthist(x[i], **kw), atol=1e-6)
    assert not np.allclose(got, x)   # it really equalises


def test_clahe_constant_slice_and_clipping():
    out = clahe(np.stack([np.full((16, 16), 0.4), np.full((16, 16), 1.7)]))
    np.testing.assert_array_equal(out[0], np.float32(0.4)); np.testing.assert_array_equal(out[1], 1.0)


# --- LPIPS, offline ----------------------------------------------------------------------------------

def test_load_lpips_without_weights_raises_and_stays_offline(offline):
    with pytest.raises(UADInputError) as e:
        load_lpips("alex")
    msg = str(e.value)
    assert LPIPS_BACKBONE_FILES["alex"] in msg and str(offline) in msg and "allow_random_backbone" in msg
    with pytest.raises(UADInputError, match="vgg16-397923af.pth"):
        load_lpips("vgg")


def test_load_lpips_missing_explicit_file(offline, tmp_path):
    with pytest.raises(UADInputError, match="weights file not found"):
        load_lpips("alex", backbone_weights=tmp_path / "nope.pth", allow_random_backbone=True)


def test_random_backbone_is_labelled_and_maps_are_right(rand_net):
    assert rand_net.uad_label == "not-LPIPS (random AlexNet backbone)" and not is_real_lpips(rand_net)
    x, x_hat = brainish(n=3, size=40)
    m = lpips_map(x, x_hat, rand_net, batch_size=2)
    assert m.shape == (3, 40, 40) and m.dtype == np.float32 and m.min() >= 0 and m.max() > 0
    assert lpips_map(x, x, rand_net).max() == 0
    _, info = anomaly_map("lpips", x, x_hat, net=rand_net, return_info=True)
    assert "not-LPIPS" in info["map"] and info["perceptual"] == rand_net.uad_label and info["lpips_backbone"] is None


def test_random_backbone_is_seeded(offline):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b, c = load_lpips(allow_random_backbone=True), load_lpips(allow_random_backbone=True), load_lpips(allow_random_backbone=True, seed=1)
    x, x_hat = brainish(n=1, size=32)
    np.testing.assert_array_equal(lpips_map(x, x_hat, a), lpips_map(x, x_hat, b))
    assert not np.allclose(lpips_map(x, x_hat, a), lpips_map(x, x_hat, c))


def test_lpips_rejects_too_small_slices(rand_net):
    with pytest.raises(UADInputError, match="too small"):
        lpips_map(np.zeros((1, 16, 16)), np.zeros((1, 16, 16)), rand_net)


@pytest.mark.parametrize("net,arch", [("alex", torchvision.models.alexnet), ("squeeze", torchvision.models.squeezenet1_1)])
@pytest.mark.parametrize("where", ["path", "hub"])
def test_backbone_weights_are_loaded(offline, tmp_path, net, arch, where):
    "A torchvision-format weights file (here random, saved locally) is loaded into the LPIPS backbone."
    torch.manual_seed(123)
    sd = {k: v for k, v in arch(weights=None).state_dict().items() if k.startswith("features.")}
    f = lpips_backbone_path(net) if where == "hub" else tmp_path / "w.pth"
    f.parent.mkdir(parents=True, exist_ok=True); torch.save(sd, f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a real backbone must not warn
        m = load_lpips(net, backbone_weights=f if where == "path" else None)
    assert is_real_lpips(m) and m.uad_label.startswith("LPIPS (") and m.uad_backbone == str(f)
    msd = m.net.state_dict()
    for k, v in msd.items():
        np.testing.assert_array_equal(v.numpy(), sd["features." + k.split(".", 1)[1]].numpy())
    assert "not-LPIPS" not in describe_map("reversed_ae", net=m)["map"]


def test_backbone_file_of_wrong_architecture_is_rejected(offline, tmp_path):
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(UADInputError, match="lack `features."):
        load_lpips("alex", backbone_weights=tmp_path / "w.pth")


# --- eq. 5 and the residual x perceptual map -----------------------------------------------------------

def test_reversed_ae_map_is_eq5(rand_net):
    x, x_hat = brainish(n=2, size=40)
    got = reversed_ae_map(x, x_hat, rand_net)
    ex = np.stack([exposure.equalize_adapthist(s) for s in x])       # independent of the library's clahe
    eh = np.stack([exposure.equalize_adapthist(s) for s in x_hat])
    want = np.abs(eh - ex) * lpips_map(x_hat, x, rand_net) * lpips_map(eh, ex, rand_net)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    assert got.shape == (2, 40, 40) and got.dtype == np.float32
    assert reversed_ae_map(x, x, rand_net).max() == 0
    assert got[:, 10:18, 12:20].mean() > got[:, 30:, 30:].mean()
    # smoothing is a recorded parameter and changes the numbers
    assert not np.allclose(reversed_ae_map(x, x_hat, rand_net, smooth_sigma=1.2), got)
    assert describe_map("reversed_ae", net=rand_net, smooth_sigma=1.2)["params"]["smooth_sigma"] == 1.2


def test_residual_lpips_map(rand_net):
    x, x_hat = brainish(n=2, size=32)
    np.testing.assert_allclose(residual_lpips_map(x, x_hat, rand_net),
                               np.abs(x - x_hat) * lpips_map(x, x_hat, rand_net), rtol=1e-6)
    pos = residual_lpips_map(x_hat, x, rand_net, kind="positive")   # lesion is darker in this "input": no positive residual there
    assert pos[:, 10:18, 12:20].max() == 0


# --- registry ------------------------------------------------------------------------------------------

def test_every_registered_map_runs_on_a_batch(rand_net):
    x, x_hat = brainish(n=2, size=32)
    for name in ANOMALY_MAPS:
        kw = {"net": rand_net} if name in {"lpips", "residual_lpips", "reversed_ae"} else {}
        if name == "mkd": kw = {"model": MapModel()}
        if name == "scale_space": kw = {"model": SSAE(levels=1, kind="dense", in_size=32)}   # a model with per-level outputs
        m, info = anomaly_map(name, x, x_hat, return_info=True, **kw)
        assert m.shape == (2, 32, 32) and m.dtype == np.float32, name
        assert info["map"].startswith(name) and isinstance(info["params"], dict)


def test_registry_records_parameters_and_rejects_unknown():
    assert describe_map("absolute") == {"map": "absolute", "params": {}}
    assert describe_map("ssim", sigma=2.0)["params"]["sigma"] == 2.0
    with pytest.raises(UADInputError, match="must be one of"): anomaly_map("l7", np.zeros((1, 8, 8)), np.zeros((1, 8, 8)))
    with pytest.raises(UADInputError, match="unknown parameters"): describe_map("reversed_ae", net=object(), clip=3)
    with pytest.raises(UADInputError, match="needs `net`"): describe_map("residual_lpips")


# --- Reversed-AE ablation (Table 3) and model-made maps -------------------------------------------------

def test_clahe_absolute_is_the_equalised_residual():
    "Zero for identical inputs; |clahe(x_hat) - clahe(x)| with the given CLAHE parameters."
    a = np.tile(np.linspace(0, 1, 24, dtype=np.float32), (24, 1))[None]
    b = a.copy(); b[0, 6:12, 6:12] = 1.0
    assert clahe_absolute_map(a, a).max() == 0
    for kw in ({}, {"kernel_size": 8, "clip_limit": 0.03, "nbins": 64}):
        want = np.abs(exposure.equalize_adapthist(b[0], **kw) - exposure.equalize_adapthist(a[0], **kw))
        got = anomaly_map("clahe_absolute", a, b, **kw)
        np.testing.assert_allclose(got[0], want, atol=1e-6)
        assert got.dtype == np.float32 and got[0, 6:12, 6:12].min() > 0.05
    assert describe_map("clahe_absolute", clip_limit=0.03)["params"] == {"kernel_size": None, "clip_limit": 0.03, "nbins": 256}
    with pytest.raises(UADInputError, match="shapes differ"): clahe_absolute_map(a, a[:, :8])


class MapModel(torch.nn.Module):
    "A dummy model whose anomaly map is 1 - x (shape (B, 1, H, W)), counting its calls and their batch sizes."
    def __init__(self, squeeze=False):
        super().__init__(); self.scale = torch.nn.Parameter(torch.ones(())); self.batches, self.squeeze = [], squeeze
    def anomaly_map(self, x):
        assert x.ndim == 4 and x.shape[1] == 1 and not torch.is_grad_enabled() and not self.training
        self.batches.append(len(x))
        m = (1 - x) * self.scale
        return m[:, 0] if self.squeeze else m


@pytest.mark.parametrize("squeeze", [False, True])
def test_model_map_calls_the_models_anomaly_map_in_batches(squeeze):
    x = np.random.default_rng(0).random((5, 8, 8)).astype(np.float32)
    m = MapModel(squeeze).train()
    got = model_map(x, np.zeros_like(x), m, batch_size=2)   # x_hat is unused
    np.testing.assert_array_equal(got, 1 - x)
    assert got.dtype == np.float32 and m.batches == [2, 2, 1] and m.training   # train mode restored
    assert describe_map("mkd", model=m) == {"map": "mkd", "params": {}}
    np.testing.assert_array_equal(anomaly_map("mkd", x, x, model=m), 1 - x)


def test_study_scoring_gives_mkd_the_trained_model():
    "study.score_slices passes `model=` to the 'mkd' map (its signature has `model`)."
    from uad_study.study import score_slices
    class Recon(MapModel):
        def reconstruct(self, x): return 0.5 * x
    x = np.random.default_rng(1).random((3, 8, 8)).astype(np.float32)
    x_hat, maps = score_slices(Recon(), x, "mkd", device="cpu")
    np.testing.assert_allclose(x_hat, 0.5 * x, atol=1e-7); np.testing.assert_array_equal(maps, 1 - x)


def test_model_map_rejects_models_without_a_map():
    x = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(UADInputError, match="anomaly_map.*Linear"): model_map(x, x, torch.nn.Linear(2, 2))
    with pytest.raises(UADInputError, match="needs the trained `model`"): anomaly_map("mkd", x, x)
    class Bad(MapModel):
        def anomaly_map(self, x): return x[:, :, :4]
    with pytest.raises(UADInputError, match="must return"): model_map(x, x, Bad())


# --- eq. 6 ---------------------------------------------------------------------------------------------

def test_scale_space_constant_levels_add_up():
    r = [np.full((2, 8, 8), 1.0), np.full((2, 4, 4), 10.0), np.full((2, 2, 2), 100.0)]
    np.testing.assert_array_equal(scale_space_aggregate(r), 111.0)


def test_scale_space_nearest_by_hand():
    r0 = np.zeros((4, 4)); r1 = np.array([[1., 2.], [3., 4.]]); r2 = np.array([[10.]])
    want = np.array([[11, 11, 12, 12], [11, 11, 12, 12], [13, 13, 14, 14], [13, 13, 14, 14]], np.float32)
    np.testing.assert_array_equal(scale_space_aggregate([r0, r1, r2], mode="nearest")[0], want)


def test_scale_space_bilinear_by_hand():
    r1 = np.array([[0., 1.], [0., 1.]])
    r0 = np.zeros((4, 4)); r0[0, 0] = 5
    got = scale_space_aggregate([r0, r1])[0]
    np.testing.assert_allclose(got[1], [0, .25, .75, 1])     # half-pixel bilinear upsampling
    assert got[0, 0] == 5                                     # finest residual added at full resolution


def test_scale_space_is_recursive_not_a_mean():
    "A fine-level spike survives at full strength; a coarse one is spread, not averaged away."
    r = [np.zeros((8, 8)), np.zeros((4, 4)), np.zeros((2, 2))]
    r[2][0, 0] = 4.0
    out = scale_space_aggregate(r)[0]
    assert out.max() == pytest.approx(4.0) and out[-1, -1] == 0


def test_scale_space_bad_inputs():
    with pytest.raises(UADInputError, match="finest first"): scale_space_aggregate([np.zeros((2, 2)), np.zeros((4, 4))])
    with pytest.raises(UADInputError, match="finest first"): scale_space_aggregate([np.zeros((2, 4, 4)), np.zeros((3, 2, 2))])
    with pytest.raises(UADInputError, match="at least one"): scale_space_aggregate([])
    with pytest.raises(UADInputError, match="mode"): scale_space_aggregate([np.zeros((2, 2))], mode="cubic")


# --- slice and subject scores ----------------------------------------------------------------------------

MAPS = np.array([[[0, 1], [2, 3]], [[4, 4], [4, 9]], [[7, 0], [0, 0]]], np.float32)
MASKS = np.array([[[1, 1], [1, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 1]]], bool)


@pytest.mark.parametrize("reduce,masked,want", [
    ("mean", False, [1.5, 5.25, 1.75]), ("max", False, [3, 9, 7]), ("p50", False, [1.5, 4, 0]),
    ("mean", True, [1.0, 0.0, 3.5]), ("max", True, [2, 0, 7]), ("p100", True, [2, 0, 7]), ("p0", True, [0, 0, 0]),
])
def test_slice_scores_by_hand(reduce, masked, want):
    np.testing.assert_allclose(slice_scores(MAPS, MASKS if masked else None, reduce), want)


def test_slice_scores_empty_mask_value_and_errors():
    assert np.isnan(slice_scores(MAPS, MASKS, empty=np.nan)[1])
    with pytest.raises(UADInputError, match="reduce must be"): slice_scores(MAPS, reduce="p101")
    with pytest.raises(UADInputError, match="masks must have"): slice_scores(MAPS, np.ones((3, 3, 3), bool))


def test_reconstruction_error_and_kl():
    x = np.zeros((2, 2, 2)); xh = np.array([[[1, 1], [0, 0]], [[0.5, 0.5], [0.5, 0.5]]])
    np.testing.assert_allclose(reconstruction_error(x, xh), [0.5, 0.25])
    np.testing.assert_allclose(reconstruction_error(x, xh, kind="absolute"), [0.5, 0.5])
    np.testing.assert_allclose(reconstruction_error(x, xh, MASKS[:2] | True), [0.5, 0.25])
    mu, lv = np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[0.0, 0.0], [np.log(2), 0.0]])
    np.testing.assert_allclose(latent_kl(mu, lv), [0.5, 0.5 * (2 - 1 - np.log(2))])
    tm, tl = torch.randn(4, 6), torch.randn(4, 6)
    assert latent_kl(tm.numpy(), tl.numpy()).mean() == pytest.approx(kl_divergence(tm, tl).item(), rel=1e-5)


def test_subject_scores_by_hand():
    s, ids = [1, 3, 10, 0, 5], ["s2", "s2", "s1", "s2", "s1"]
    assert subject_scores(s, ids) == {"s2": pytest.approx(4 / 3), "s1": 7.5}
    assert list(subject_scores(s, ids)) == ["s2", "s1"]
    assert subject_scores(s, ids, "max") == {"s2": 3.0, "s1": 10.0}
    with pytest.raises(UADInputError, match="same length"): subject_scores(s, ids[:-1])
