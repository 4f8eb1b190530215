"""3D median filter (5x5x5, `reflect`) on a BraTS-sized post-processed residual volume (155x240x240 as
(H, W, D) = (240, 240, 155)): uad_study.postprocess.median_volume against scipy.ndimage.median_filter on
the whole volume, measured in the same run; the outputs must be identical.

    .venv/bin/python benchmarks/bench_median.py [--size 5] [--dims 3] [--scale 0.07]

The synthetic residual: smooth noise inside an ellipsoidal brain, a few blob lesions, thresholded at 0.1
like the Tri-VAE recipe (mostly exact zeros, the rest float32 >= 0.1).
"""
import argparse
import time

import numpy as np
from scipy import ndimage as ndi


def residual_volume(seed=0, shape=(240, 240, 155), scale=0.07):
    rng = np.random.default_rng(seed)
    g = np.ogrid[tuple(slice(0, s) for s in shape)]
    brain = sum(((a - s / 2) / (0.42 * s)) ** 2 for a, s in zip(g, shape)) < 1
    r = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.0)
    r = np.abs(r) * np.float32(scale / r.std())   # |residual|: scale 0.07 -> about 15% of brain voxels above 0.1
    for _ in range(4):   # lesions: blobs of raised residual
        c = [rng.integers(int(0.3 * s), int(0.7 * s)) for s in shape]; rad = rng.integers(6, 18)
        r[sum((a - ci) ** 2 for a, ci in zip(g, c)) < rad ** 2] += 0.3
    r[~brain] = 0; r[r < 0.1] = 0
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=5); ap.add_argument("--dims", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=0.07, help="residual noise level (0.07: ~5%% of the volume non-zero, 0.15: ~20%%)")
    a = ap.parse_args()
    from uad_study.postprocess import median_volume
    x = residual_volume(a.seed, scale=a.scale)
    kernel = (a.size,) * 3 if a.dims == 3 else (a.size, a.size, 1)
    t0 = time.perf_counter(); ours = median_volume(x, a.size, a.dims); t_ours = time.perf_counter() - t0
    t0 = time.perf_counter(); ref = ndi.median_filter(x, size=kernel, mode="reflect"); t_ref = time.perf_counter() - t0
    same = bool(np.array_equal(ours, ref))
    print(f"volume {x.shape} float32, non-zero {np.count_nonzero(x) / x.size:.1%}, kernel {kernel}")
    print(f"uad_study median_volume:      {t_ours:6.2f} s")
    print(f"scipy.ndimage.median_filter:  {t_ref:6.2f} s")
    print(f"speed-up {t_ref / t_ours:.1f}x; identical output: {same}")
    if not same: raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
