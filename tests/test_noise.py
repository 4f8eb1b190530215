"Coarse and simplex noise: shapes, masks, statistics, determinism, pinned reference values; forward diffusion."
import numpy as np
import pytest
import torch

from uad_study.core import UADInputError
from uad_study.noise import (ANODDPM_GAIN, ANODDPM_STRETCH, NoiseConfig, _simplex2d, add_coarse_noise, add_noise,
                             alpha_bar, coarse_noise, forward_diffuse, linear_betas, simplex_noise)


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


@pytest.fixture(scope="module")
def field256():
    return simplex_noise(16, 256, 256, generator=_g(0))


def test_simplex_shape_bounds_mean(field):
    assert field.shape == (32, 1, 128, 128) and field.dtype == torch.float32
    # unnormalised: the bound is gain * sum_o persistence**o (simplex2d is within [-1, 1]); typical fields exceed 1
    assert 1.0 < field.abs().max() <= ANODDPM_GAIN * sum(0.8 ** o for o in range(6))
    assert abs(field.mean().item()) < 0.03
    assert field.std().item() > 0.3


def test_simplex_smoothness(field):
    a = field[:, 0]
    def corr(d):
        return torch.corrcoef(torch.stack([a[:, :, :-d].flatten(), a[:, :, d:].flatten()]))[0, 1].item()
    c1, c8, c64 = corr(1), corr(8), corr(64)
    assert c1 > 0.9 and c1 > c8 > c64 and abs(c64) < 0.15


def test_simplex_samples_differ_and_determinism(field):
    assert not torch.allclose(field[0], field[1], atol=1e-3)
    assert torch.equal(field, simplex_noise(32, 128, 128, generator=_g(0)))
    assert not torch.equal(field, simplex_noise(32, 128, 128, generator=_g(1)))


def _octave_sum_reference(n, h, w, seed, frequency, octaves, persistence, lacunarity, gain, stretch):
    "AnoDDPM's rand_*_octaves formula written out term by term on our 2D simplex, same permutations and offsets."
    g = _g(seed)
    p = torch.argsort(torch.rand((n, 256), generator=g), dim=1)            # the draws simplex_noise makes, in order
    perm = torch.cat([p, p], dim=1)
    off = torch.rand((n, 2, 1), generator=g, dtype=torch.float64) * 256
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    x, y = xx.reshape(1, -1) + off[:, 0], yy.reshape(1, -1) + off[:, 1]
    total, amplitude, freq = torch.zeros(n, h * w, dtype=torch.float64), 1.0, frequency
    for _ in range(octaves):                      # AnoDDPM: noise += amplitude * noise(x * f); f *= 2; amplitude *= p
        total += amplitude * _simplex2d(x * stretch * freq, y * stretch * freq, perm)
        freq *= lacunarity; amplitude *= persistence
    return (gain * total).reshape(n, 1, h, w)     # no division by the sum of amplitudes


@pytest.mark.parametrize("kw", [
    dict(),                                                     # the defaults: AnoDDPM's parameters, calibrated
    dict(gain=1.0, stretch=1.0),                                # the octave formula on the raw 2D simplex
    dict(frequency=1 / 16, octaves=3, persistence=0.5, lacunarity=3.0, gain=0.9, stretch=0.7),
])
def test_simplex_matches_anoddpm_octave_formula(kw):
    "The amplitude is AnoDDPM's: sum_o persistence**o * noise(frequency * lacunarity**o * coords), unnormalised."
    p = dict(frequency=2 ** -6, octaves=6, persistence=0.8, lacunarity=2.0, gain=ANODDPM_GAIN, stretch=ANODDPM_STRETCH) | kw
    got = simplex_noise(3, 48, 40, generator=_g(7), **p)
    ref = _octave_sum_reference(3, 48, 40, 7, **p)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-6)
    # the old normalised reading (divided by sum_o persistence**o) is a different field
    norm = sum(p["persistence"] ** o for o in range(p["octaves"]))
    assert not np.allclose(got.numpy(), (ref / norm).numpy(), atol=1e-3)


def test_simplex_calibration_constants():
    assert (ANODDPM_GAIN, ANODDPM_STRETCH) == (0.71, 0.45)
    a = simplex_noise(2, 32, 32, generator=_g(3))
    b = simplex_noise(2, 32, 32, generator=_g(3), gain=1.0)
    np.testing.assert_allclose(a.numpy(), 0.71 * b.numpy(), atol=1e-6)    # gain scales the field linearly


def test_simplex_field_sd_at_256(field256):
    "Pinned statistics at the paper's 256x256 (measured here: 0.5005; AnoDDPM's own code: 0.501; the old normalised field: 0.192)."
    assert abs(field256.std().item() - 0.5005) < 0.01
    raw = simplex_noise(16, 256, 256, generator=_g(0), gain=1.0, stretch=1.0)
    assert abs(raw.std().item() - 0.7097) < 0.01                          # the octave formula on the raw 2D simplex
    assert abs(raw.std().item() / sum(0.8 ** o for o in range(6)) - 0.192) < 0.005   # what the normalisation gave


def test_simplex_perturbation_sd_after_87_steps():
    "What a negative receives: sqrt(1 - alpha_bar_87) * field (sd 0.1415 here; 0.0544 before the fix; coarse noise 0.139)."
    x = torch.full((8, 1, 256, 256), 0.5)
    torch.manual_seed(0)
    xn = add_noise(x, NoiseConfig("simplex"))
    ab = alpha_bar(87)
    pert = xn - np.sqrt(ab) * x                                           # the noise term of the forward diffusion
    assert abs(np.sqrt(1 - ab) - 0.28266) < 1e-4
    assert abs(pert.std().item() - 0.1415) < 0.01
    torch.manual_seed(0)
    eps = simplex_noise(8, 256, 256)
    assert torch.allclose(pert, np.sqrt(1 - ab) * eps, atol=1e-5)


def _corr_length(f):
    "Lag (pixels, linearly interpolated) at which the mean autocorrelation along rows and columns falls to 0.5."
    f = f - f.mean(axis=(1, 2), keepdims=True); v = (f * f).mean()
    c = [1.0] + [((f[:, :, :-d] * f[:, :, d:]).mean() + (f[:, :-d] * f[:, d:]).mean()) / 2 / v for d in range(1, f.shape[-1] // 2)]
    i = next(i for i, ci in enumerate(c) if ci < 0.5)
    return i - 1 + (c[i - 1] - 0.5) / (c[i - 1] - c[i])


def test_simplex_frequency_in_256_pixel_units(field256):
    "A 64x64 field shows the structures of a 256x256 one, coarser: the same correlation length in image widths."
    cfg = NoiseConfig("simplex")
    assert (cfg.simplex_frequency_at(256), cfg.simplex_frequency_at(64), cfg.simplex_frequency_at(128)) == (2 ** -6, 2 ** -4, 2 ** -5)
    l256 = _corr_length(field256[:, 0].numpy().astype(np.float64)) / 256
    f64 = simplex_noise(64, 64, 64, cfg.simplex_frequency_at(64), generator=_g(0))
    l64 = _corr_length(f64[:, 0].numpy().astype(np.float64)) / 64
    assert abs(l64 / l256 - 1) < 0.1                                      # measured: 0.0528 vs 0.0526
    assert abs(l256 - 0.0515) < 0.005                                     # AnoDDPM's field: 13.2 px of 256 (measured)
    assert abs(f64.std().item() - field256.std().item()) < 0.02           # same amplitude at both sizes
    # at a fixed frequency per pixel (the old behaviour) the 64x64 structures would be 4x larger in image widths
    fixed = simplex_noise(64, 64, 64, 2 ** -6, generator=_g(0))
    assert _corr_length(fixed[:, 0].numpy().astype(np.float64)) / 64 > 2.5 * l256


def test_simplex_reference_values():
    # These pin this implementation (seed 0, default parameters) against regressions; they are not a published number.
    r = simplex_noise(2, 16, 16, generator=_g(0))
    np.testing.assert_allclose(r[0, 0, 0, :4].numpy(),
                               [-0.15132729709148407, -0.21478529274463654, -0.3809139132499695, -0.4477500021457672],
                               atol=1e-6)
    np.testing.assert_allclose(r[1, 0, 5, 5].item(), -0.20896239578723907, atol=1e-6)


def test_simplex_single_octave_and_bad_inputs():
    # one octave of the raw primitive: the factor 70 keeps it within [-1, 1]; calibrated, within [-0.71, 0.71]
    one = simplex_noise(8, 64, 64, frequency=1 / 8, octaves=1, generator=_g(3), gain=1.0, stretch=1.0)
    assert 0.5 < one.abs().max() <= 1.0
    assert simplex_noise(8, 64, 64, frequency=1 / 8, octaves=1, generator=_g(3)).abs().max() <= ANODDPM_GAIN
    with pytest.raises(UADInputError, match="octaves"):
        simplex_noise(1, 8, 8, octaves=0)
    for k, v in (("gain", 0.0), ("stretch", -1.0), ("frequency", float("nan"))):
        with pytest.raises(UADInputError, match=f"`{k}` must be > 0"):
            simplex_noise(1, 8, 8, **{k: v})
    with pytest.raises(UADInputError, match="`width` must be >= 1"):
        NoiseConfig().simplex_frequency_at(0)


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
    torch.manual_seed(5); eps = simplex_noise(3, 64, 64, 2 ** -4, 6, 0.8, 2.0, gain=0.71, stretch=0.45)  # 2^-6 at 256 = 2^-4 at 64
    assert torch.equal(got, torch.where(x > 0, forward_diffuse(x, eps, 87), x))
    assert torch.equal(got[x == 0], x[x == 0])


def test_noise_config_defaults_and_bad_kind():
    c = NoiseConfig()
    assert (c.kind, c.coarse_res, c.coarse_sd, c.simplex_octaves, c.simplex_t) == ("coarse", 16, 0.2, 6, 87)
    assert (c.simplex_frequency, c.simplex_ref_size, c.simplex_persistence, c.simplex_lacunarity) == (2 ** -6, 256, 0.8, 2.0)
    assert (c.simplex_gain, c.simplex_stretch) == (ANODDPM_GAIN, ANODDPM_STRETCH)
    with pytest.raises(UADInputError, match="noise kind must be"):
        add_noise(_brain(1), NoiseConfig("gaussian"))
