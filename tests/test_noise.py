"Coarse and simplex noise: shapes, masks, statistics, determinism, pinned reference values; forward diffusion."
import numpy as np
import pytest
import torch

from uad_study.core import UADInputError
from uad_study.noise import (NoiseConfig, add_coarse_noise, add_noise, alpha_bar, coarse_noise, forward_diffuse,
                             linear_betas, simplex_noise)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _brain(n=8, h=64, w=64):
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    disk = (((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (h / 3) ** 2).float()
    return disk.expand(n, 1, h, w).clone() * 0.5


# ---- coarse noise ---------------------------------------------------------------------------

def test_coarse_shape_and_dtype():
    x = _brain()
    n = coarse_noise(x, generator=_g(0))
    assert n.shape == x.shape and n.dtype == x.dtype
    assert coarse_noise(x[:, 0], generator=_g(0)).shape == x[:, 0].shape


def test_coarse_zero_outside_default_foreground_and_explicit_mask():
    x = _brain()
    n = coarse_noise(x, generator=_g(0))
    assert n[x == 0].abs().max() == 0 and n[x > 0].abs().max() > 0
    mask = torch.zeros_like(x); mask[:, :, :32] = 1
    n = coarse_noise(torch.ones_like(x), mask=mask, generator=_g(0))
    assert n[mask == 0].abs().max() == 0 and n[mask == 1].abs().max() > 0


def test_coarse_lowres_field_sd():
    # with res equal to the image size there is no upsampling: the noise is the coarse field itself
    n = coarse_noise(torch.ones(256, 1, 16, 16), res=16, sd=0.2, generator=_g(1))
    assert abs(n.std().item() - 0.2) < 0.005 and abs(n.mean().item()) < 0.005
    # upsampled: bilinear interpolation only averages, so the sd cannot exceed 0.2, and stays close to it
    n = coarse_noise(torch.ones(256, 1, 64, 64), generator=_g(1))
    assert 0.12 < n.std().item() <= 0.2


def test_coarse_is_smooth_and_shifted_per_sample():
    n = coarse_noise(torch.ones(64, 1, 128, 128), generator=_g(2))[:, 0]
    c1 = torch.corrcoef(torch.stack([n[:, :, :-1].flatten(), n[:, :, 1:].flatten()]))[0, 1]
    assert c1 > 0.95  # 16x16 noise upsampled to 128x128 is smooth at the pixel scale
    assert not torch.allclose(n[0], n[1])


def test_coarse_determinism():
    x = _brain()
    assert torch.equal(coarse_noise(x, generator=_g(5)), coarse_noise(x, generator=_g(5)))
    assert not torch.equal(coarse_noise(x, generator=_g(5)), coarse_noise(x, generator=_g(6)))
    assert torch.equal(add_coarse_noise(x, generator=_g(5)), x + coarse_noise(x, generator=_g(5)))


def test_coarse_bad_inputs():
    with pytest.raises(UADInputError, match="N,1,H,W"):
        coarse_noise(torch.ones(2, 3, 8, 8))
    with pytest.raises(UADInputError, match="shape of `x`"):
        coarse_noise(torch.ones(2, 1, 8, 8), mask=torch.ones(2, 1, 4, 4))


# ---- simplex noise --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def field():
    return simplex_noise(32, 128, 128, generator=_g(0))


def test_simplex_shape_bounds_mean(field):
    assert field.shape == (32, 1, 128, 128) and field.dtype == torch.float32
    assert field.abs().max() <= 1.0
    assert abs(field.mean().item()) < 0.02
    assert field.std().item() > 0.05


def test_simplex_smoothness(field):
    a = field[:, 0]
    def corr(d):
        return torch.corrcoef(torch.stack([a[:, :, :-d].flatten(), a[:, :, d:].flatten()]))[0, 1].item()
    c1, c8, c64 = corr(1), corr(8), corr(64)
    assert c1 > 0.8 and c1 > c8 > c64 and abs(c64) < 0.15


def test_simplex_samples_differ_and_determinism(field):
    assert not torch.allclose(field[0], field[1], atol=1e-3)
    assert torch.equal(field, simplex_noise(32, 128, 128, generator=_g(0)))
    assert not torch.equal(field, simplex_noise(32, 128, 128, generator=_g(1)))


def test_simplex_reference_values():
    # These pin this implementation (seed 0, default parameters) against regressions; they are not a published number.
    r = simplex_noise(2, 16, 16, generator=_g(0))
    np.testing.assert_allclose(r[0, 0, 0, :4].numpy(),
                               [-0.26782071590423584, -0.18083053827285767, -0.08974455296993256, -0.0384623147547245],
                               atol=1e-6)
    np.testing.assert_allclose(r[1, 0, 5, 5].item(), 0.018063751980662346, atol=1e-6)


def test_simplex_octave_normalisation():
    # one octave: the raw simplex field; the factor 70 keeps it within [-1, 1]
    one = simplex_noise(8, 64, 64, frequency=1 / 8, octaves=1, generator=_g(3))
    assert 0.5 < one.abs().max() <= 1.0
    with pytest.raises(UADInputError, match="octaves"):
        simplex_noise(1, 8, 8, octaves=0)


# ---- forward diffusion ----------------------------------------------------------------------

def test_alpha_bar_matches_numpy_product():
    betas = np.linspace(1e-4, 0.02, 1000)
    for t in (0, 1, 87, 1000):
        assert abs(alpha_bar(t) - np.prod(1 - betas[:t])) < 1e-12
    assert torch.allclose(linear_betas(), torch.from_numpy(betas))


def test_forward_diffuse():
    x, e = torch.randn(2, 1, 8, 8, generator=_g(0)), simplex_noise(2, 8, 8, generator=_g(1))
    ab = np.prod(1 - np.linspace(1e-4, 0.02, 1000)[:87])
    assert torch.allclose(forward_diffuse(x, e), np.sqrt(ab) * x + np.sqrt(1 - ab) * e, atol=1e-6)
    with pytest.raises(UADInputError, match="shape of `x`"):
        forward_diffuse(x, e[:1])
    with pytest.raises(UADInputError, match="`t`"):
        forward_diffuse(x, e, t=1001)


# ---- noise settings (NoiseConfig, add_noise) -------------------------------------------------

def test_add_noise_is_the_configured_noise_inside_the_foreground():
    "add_noise replays coarse_noise / simplex + forward diffusion with the config's numbers, from the global RNG."
    x = _brain(3)
    torch.manual_seed(4); got = add_noise(x, NoiseConfig("coarse"))
    torch.manual_seed(4); assert torch.equal(got, x + coarse_noise(x, 16, 0.2, x > 0))
    torch.manual_seed(5); got = add_noise(x, NoiseConfig("simplex"))
    torch.manual_seed(5); eps = simplex_noise(3, 64, 64, 2 ** -6, 6, 0.8, 2.0)
    assert torch.equal(got, torch.where(x > 0, forward_diffuse(x, eps, 87), x))
    assert torch.equal(got[x == 0], x[x == 0])


def test_noise_config_defaults_and_bad_kind():
    c = NoiseConfig()
    assert (c.kind, c.coarse_res, c.coarse_sd, c.simplex_octaves, c.simplex_t) == ("coarse", 16, 0.2, 6, 87)
    with pytest.raises(UADInputError, match="noise kind must be"):
        add_noise(_brain(1), NoiseConfig("gaussian"))
