"Shared losses: Gaussian window and blur against scipy, SSIM against skimage (map and scalar), gradients, KL and L1/L2 by hand."
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

from uad_study.core import UADInputError
from uad_study.losses import gaussian_blur, gaussian_window, kl_divergence, l1, l2, recon_loss, ssim, ssim_map


def _pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random(shape)
    return x, np.clip(x + 0.2 * rng.standard_normal(shape), 0, 1)


@pytest.mark.parametrize("sigma,truncate", [(1.5, 3.5), (1.0, 4.0), (2.0, 3.5), (3.0, 4.0)])
def test_gaussian_window_and_blur_match_scipy(sigma, truncate):
    g = gaussian_window(sigma, truncate, dtype=torch.float64)
    assert len(g) == 2 * int(truncate * sigma + 0.5) + 1 and g.sum().item() == pytest.approx(1.0, abs=1e-12)
    for shape in [(17, 23), (5, 6)]:          # (5, 6): the window is wider than the image, the border mirrors repeatedly
        a = np.random.default_rng(1).random(shape)
        got = gaussian_blur(torch.from_numpy(a)[None, None], sigma, truncate)[0, 0].numpy()
        np.testing.assert_allclose(got, gaussian_filter(a, sigma, mode="reflect", truncate=truncate), atol=1e-12)


@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("shape", [(33, 40), (24, 24)])
def test_ssim_map_and_scalar_match_skimage(sigma, shape):
    x, y = _pair(shape)
    s, m = structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=sigma, use_sample_covariance=False,
                                 full=True)
    X, Y = torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None]
    np.testing.assert_allclose(ssim_map(X, Y, sigma=sigma)[0, 0].numpy(), m, atol=1e-10)
    assert ssim(X, Y, sigma=sigma).item() == pytest.approx(s, abs=1e-10)               # mean over the valid region
    assert ssim(X.float(), Y.float(), sigma=sigma).item() == pytest.approx(s, abs=1e-5)  # float32 too


def test_ssim_channels_are_independent_and_data_range_scales():
    x, y = _pair((2, 2, 20, 20))
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    both = ssim_map(X, Y)
    for c in range(2):
        torch.testing.assert_close(both[:, c:c + 1], ssim_map(X[:, c:c + 1], Y[:, c:c + 1]))
    torch.testing.assert_close(ssim_map(X * 255, Y * 255, data_range=255.0), both)


def test_ssim_gradcheck():
    x, y = _pair((1, 1, 12, 12), seed=3)
    X = torch.from_numpy(x).requires_grad_(); Y = torch.from_numpy(y)
    assert torch.autograd.gradcheck(lambda a: ssim(a, Y, sigma=1.0), (X,))
    assert torch.autograd.gradcheck(lambda a: ssim_map(a, Y, sigma=1.0).sum(), (X,))


def test_ssim_bad_input():
    u = torch.rand(1, 1, 16, 16)
    with pytest.raises(UADInputError, match="same shape"): ssim(u, u[..., :8])
    with pytest.raises(UADInputError, match=r"\(N, C, H, W\)"): ssim(u[0], u[0])
    with pytest.raises(UADInputError, match="SSIM window \\(11 pixels\\)"): ssim(u[..., :10, :10], u[..., :10, :10])
    with pytest.raises(UADInputError, match="window radius 5"): ssim_map(u[..., :5, :5], u[..., :5, :5])
    with pytest.raises(UADInputError, match="`border` must be one of"): ssim(u, u, border="reflect")


def test_kl_by_hand_and_reductions():
    mu, lv = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    k = torch.tensor([0.5 + 0.5 * (2 - math.log(2) - 1), 0.5 * 4])    # sum over units of (mu^2 + s^2 - log s^2 - 1) / 2
    torch.testing.assert_close(kl_divergence(mu, lv, "none"), k)
    assert kl_divergence(mu, lv).item() == pytest.approx(k.mean().item())          # "batchmean": per-sample sums, averaged
    assert kl_divergence(mu, lv, "sum").item() == pytest.approx(k.sum().item())
    assert kl_divergence(mu, lv).item() != pytest.approx((k / 2).mean().item())    # not a mean over latent units
    spatial = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)                     # every axis after the first is a unit
    torch.testing.assert_close(kl_divergence(*spatial, "none"), kl_divergence(spatial[0].flatten(1), spatial[1].flatten(1), "none"))
    with pytest.raises(UADInputError, match="KL reduction"): kl_divergence(mu, lv, "mean")
    with pytest.raises(UADInputError, match="same shape"): kl_divergence(mu[0], lv[0])


def test_reconstruction_losses_by_hand():
    x, y = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, -1.0], [0.5, 0.5]]]])
    assert l1(x, y).item() == pytest.approx(0.75) and l2(x, y).item() == pytest.approx(0.625)
    assert recon_loss(x, y, "l1").item() == pytest.approx(0.75) and recon_loss(x, y).item() == pytest.approx(0.625)
    with pytest.raises(UADInputError, match="recon loss"): recon_loss(x, y, "l3")
    with pytest.raises(UADInputError, match="same shape"): l1(x, y[0])        # no silent broadcasting
