"""Pooled pixel metrics (AUROC, AUPRC, best DICE) of uad_study.metrics.pixel_metrics against scikit-learn's exact
roc_auc_score + average_precision_score on a real-like score map, measured in the same run: the first call in a
fresh process ("cold", what a user who evaluates once pays) and the best of later calls ("warm"), both against
scikit-learn's time in the same process (interleaved, best of N).

    .venv/bin/python benchmarks/bench_metrics.py [--volumes 2] [--repeat 2]
    .venv/bin/python benchmarks/bench_metrics.py --nifti SCORE.nii.gz LABEL.nii.gz [SCORE LABEL ...]
    .venv/bin/python benchmarks/bench_metrics.py --map uniform [--n 12000000] [--zeros 0.85]

The real-like map: BraTS-sized volumes (240x240x155) of int16 intensities as a FLAIR would give them (smooth
brain texture, brighter lesions, exact zeros outside an ellipsoidal brain: a few hundred distinct values, heavy
ties), read as float64 like nibabel's get_fdata; labels are the lesions. `--nifti` scores real scans the same way
(label > 0 is the lesion). Each measurement runs in a child process, so the cold figure is a real first call.
"""
import argparse
import json
import subprocess
import sys
import time

import numpy as np

SHAPE = (240, 240, 155)


def real_like(n_vol=2, seed=0):
    "(scores float64 as get_fdata gives them, labels bool): int16 FLAIR-like volumes with lesions, raveled and pooled."
    from scipy import ndimage as ndi
    rng = np.random.default_rng(seed)
    g = np.ogrid[tuple(slice(0, s) for s in SHAPE)]
    brain = sum(((a - s / 2) / (0.42 * s)) ** 2 for a, s in zip(g, SHAPE)) < 1
    ss, yy = [], []
    for _ in range(n_vol):
        f = ndi.gaussian_filter(rng.standard_normal(SHAPE).astype(np.float32), 2.0) * 300 + 400
        y = np.zeros(SHAPE, bool)
        for _ in range(3):
            c = [rng.integers(int(0.3 * s), int(0.7 * s)) for s in SHAPE]; rad = rng.integers(8, 25)
            m = sum((a - ci) ** 2 for a, ci in zip(g, c)) < rad ** 2
            y |= m & brain; f[m] += 250
        f[~brain] = 0
        ss.append(np.rint(f).clip(-32768, 32767).astype(np.int16)); yy.append(y)
    return np.concatenate([s.ravel() for s in ss]).astype(np.float64), np.concatenate([y.ravel() for y in yy])


def uniform(n, zeros, prevalence=0.02, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < prevalence
    s = (rng.random(n, dtype=np.float32) + 0.3 * y).astype(np.float32); s[rng.random(n) < zeros] = 0
    return s, y


def nifti(paths):
    import nibabel as nib
    ss = [np.asarray(nib.load(p).get_fdata()).ravel() for p in paths[0::2]]
    yy = [np.asarray(nib.load(p).dataobj).ravel() > 0 for p in paths[1::2]]
    return np.concatenate(ss), np.concatenate(yy)


def child(a):
    s, y = nifti(a.nifti) if a.nifti else real_like(a.volumes) if a.map == "real-like" else uniform(a.n, a.zeros)
    from sklearn.metrics import average_precision_score, roc_auc_score
    from uad_study.metrics import pixel_metrics
    t0 = time.perf_counter(); m = pixel_metrics(s, y); cold = time.perf_counter() - t0   # the process's first call
    warm, sk = [], []
    for _ in range(a.repeat):
        t0 = time.perf_counter(); m = pixel_metrics(s, y); warm.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); auc, ap = roc_auc_score(y, s), average_precision_score(y, s); sk.append(time.perf_counter() - t0)
    from uad_study.metrics import _use_torch
    engine = "torch on CUDA" if _use_torch("auto", s.size) else "numpy"
    print(json.dumps({"engine": engine, "n": int(s.size), "dtype": str(s.dtype), "zeros": float(np.mean(s == 0)), "distinct": int(np.unique(s).size),
                      "cold": cold, "warm": min(warm), "sk": min(sk), "d_auroc": abs(m["auroc"] - auc), "d_auprc": abs(m["auprc"] - ap)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--map", choices=["real-like", "uniform"], default="real-like")
    ap.add_argument("--volumes", type=int, default=2, help="real-like: BraTS-sized volumes pooled (2: 17.9M voxels)")
    ap.add_argument("--n", type=int, default=12_000_000, help="uniform: number of voxels")
    ap.add_argument("--zeros", type=float, default=0.85, help="uniform: fraction of exact-zero scores")
    ap.add_argument("--nifti", nargs="+", help="pairs SCORE LABEL of NIfTI files (score: get_fdata; lesion: label > 0)")
    ap.add_argument("--repeat", type=int, default=2, help="warm calls and scikit-learn calls, interleaved (best of)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child: return child(a)
    out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    what = "NIfTI " + " ".join(a.nifti[0::2]) if a.nifti else a.map
    print(f"{what}: {r['n']:,} voxels ({r['dtype']}), {r['zeros']:.0%} exact zeros, {r['distinct']:,} distinct scores")
    print(f"uad_study pixel_metrics ({r['engine']}): first call in the process {r['cold']:.3f} s, later calls {r['warm']:.3f} s (best of {a.repeat})")
    print(f"scikit-learn roc_auc_score + average_precision_score: {r['sk']:.2f} s (best of {a.repeat}, same process)")
    print(f"metrics speed-up vs scikit-learn: cold {r['sk'] / r['cold']:.1f}x, warm {r['sk'] / r['warm']:.1f}x; "
          f"|dAUROC| {r['d_auroc']:.1e}, |dAUPRC| {r['d_auprc']:.1e}")


if __name__ == "__main__":
    main()
