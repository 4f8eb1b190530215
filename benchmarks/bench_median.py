"""3D median filter (5x5x5, `reflect`) on BraTS-sized post-processed residual volumes (155x240x240 as
(H, W, D) = (240, 240, 155)): uad_study.postprocess.median_volume against scipy.ndimage.median_filter on
the whole volume, at three densities (about 5%, 16% and 29% of the volume non-zero), measured in the same run,
interleaved (ours, scipy, ours, scipy, ...) and best-of-N; the outputs must be identical.

    .venv/bin/python benchmarks/bench_median.py [--size 5] [--dims 3] [--scales 0.07 0.15 1.0] [--repeat 3]

The synthetic residual: smooth noise inside an ellipsoidal brain, a few blob lesions, thresholded at 0.1
like the Tri-VAE recipe (mostly exact zeros, the rest float32 >= 0.1). The first call in the process is timed
apart ("cold": it imports numba and loads the compiled kernels from numba's on-disk cache; the very first call
after an install compiles them, a few seconds once).
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
    r = np.abs(r) * np.float32(scale / r.std())   # |residual|: scale 0.07 -> about 5% of the volume above 0.1
    for _ in range(4):   # lesions: blobs of raised residual
        c = [rng.integers(int(0.3 * s), int(0.7 * s)) for s in shape]; rad = rng.integers(6, 18)
        r[sum((a - ci) ** 2 for a, ci in zip(g, c)) < rad ** 2] += 0.3
    r[~brain] = 0; r[r < 0.1] = 0
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=5); ap.add_argument("--dims", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0); ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scales", type=float, nargs="+", default=[0.07, 0.15, 1.0],
                    help="residual noise levels (0.07: ~5%% of the volume non-zero, 0.15: ~16%%, 1.0: ~29%%)")
    ap.add_argument("--engine", default="auto", help="median_volume's engine (auto, numba, numpy, scipy)")
    a = ap.parse_args()
    from uad_study.postprocess import median_volume
    kernel = (a.size,) * 3 if a.dims == 3 else (a.size, a.size, 1)
    ratios = {}
    for i, scale in enumerate(a.scales):
        x = residual_volume(a.seed, scale=scale)
        nz = np.count_nonzero(x) / x.size
        t_ours, t_ref = [], []
        for r in range(a.repeat):
            t0 = time.perf_counter(); ours = median_volume(x, a.size, a.dims, engine=a.engine); t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); ref = ndi.median_filter(x, size=kernel, mode="reflect"); t_ref.append(time.perf_counter() - t0)
            if not np.array_equal(ours, ref): raise SystemExit(f"outputs differ at {nz:.1%} non-zero")
        cold = f", first call in the process {t_ours[0]:.2f} s (numba import + kernels from its cache, compiled once per install)" if i == 0 else ""
        ratios[nz] = min(t_ref) / min(t_ours)
        print(f"{x.shape} float32, {nz:5.1%} non-zero, kernel {kernel}: uad_study {min(t_ours):.2f} s, scipy {min(t_ref):.2f} s "
              f"(best of {a.repeat}, interleaved) -> {ratios[nz]:.1f}x, identical output{cold}", flush=True)
    print("median speed-up vs scipy: " + ", ".join(f"{r:.1f}x at {nz:.0%}" for nz, r in ratios.items()))


if __name__ == "__main__":
    main()
