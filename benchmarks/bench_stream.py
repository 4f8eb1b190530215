"""Streaming pooled pixel metrics over a BraTS-sized test set: 30 volumes of 240x240x155 (268 million voxels)
fed volume by volume to uad_study.metrics.PixelMetricsAccumulator; wall time of the updates + aggregate and
peak RSS of the whole process (measured in a child process with resource.getrusage). Exactness and speed
against scikit-learn's exact roc_auc_score + average_precision_score on a 20-million-voxel subset, in the same run.

    .venv/bin/python benchmarks/bench_stream.py [--volumes 30] [--subset 20000000]

Synthetic post-processed maps: 85-95% exact zeros per volume, the rest float32 >= 0.1 (continuous, so
mostly distinct values), lesion voxels (2%) shifted up by 0.3.
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

SHAPE = (240, 240, 155)


def volume(i, seed=0):
    rng = np.random.default_rng([seed, i])
    n = int(np.prod(SHAPE))
    y = rng.random(n, dtype=np.float32) < 0.02
    s = np.float32(0.1) + rng.standard_exponential(n, dtype=np.float32) * np.float32(0.2) + np.float32(0.3) * y
    zero_frac = 0.85 + 0.10 * rng.random()
    s[rng.random(n, dtype=np.float32) < zero_frac] = 0
    return s.reshape(SHAPE), y.reshape(SHAPE)


def child_stream(n_vol, seed):
    from uad_study.metrics import PixelMetricsAccumulator
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10   # after imports (uad_study.core imports torch)
    acc = PixelMetricsAccumulator()
    t = 0.0; zeros = 0; n = 0
    for i in range(n_vol):
        s, y = volume(i, seed)          # generation is not timed
        zeros += int(s.size - np.count_nonzero(s)); n += s.size
        t0 = time.perf_counter(); acc.update(s, y); t += time.perf_counter() - t0
        del s, y
    t0 = time.perf_counter(); m = acc.aggregate(); t += time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10   # KiB -> MiB on Linux
    print(json.dumps({"time_s": t, "peak_rss_mib": rss, "import_rss_mib": base, "n": n, "zeros": zeros / n, "distinct": len(acc.counts()[0]),
                      **{k: m[k] for k in ("auroc", "auprc", "best_dice")}}))


def child_subset(n_sub, seed):
    from sklearn.metrics import average_precision_score, roc_auc_score
    from uad_study.metrics import PixelMetricsAccumulator
    vols, got = [], 0
    while got < n_sub:
        s, y = volume(len(vols), seed); k = min(s.size, n_sub - got)
        vols.append((s.ravel()[:k].copy(), y.ravel()[:k].copy())); got += k
    t0 = time.perf_counter()
    acc = PixelMetricsAccumulator()
    for s, y in vols: acc.update(s, y)
    m = acc.aggregate(); t_ours = time.perf_counter() - t0
    s = np.concatenate([v[0] for v in vols]); y = np.concatenate([v[1] for v in vols])
    t0 = time.perf_counter(); auc = roc_auc_score(y, s); ap = average_precision_score(y, s); t_sk = time.perf_counter() - t0
    print(json.dumps({"n": int(s.size), "t_ours": t_ours, "t_sk": t_sk, "d_auroc": abs(m["auroc"] - auc),
                      "d_auprc": abs(m["auprc"] - ap)}))


def run_child(*args):
    out = subprocess.run([sys.executable, __file__, *map(str, args)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", type=int, default=30); ap.add_argument("--subset", type=int, default=20_000_000)
    ap.add_argument("--seed", type=int, default=0); ap.add_argument("--child", choices=["stream", "subset"])
    a = ap.parse_args()
    if a.child == "stream": return child_stream(a.volumes, a.seed)
    if a.child == "subset": return child_subset(a.subset, a.seed)
    r = run_child("--child", "subset", "--subset", a.subset, "--seed", a.seed)
    print(f"subset {r['n']:,} voxels: uad_study {r['t_ours']:.2f} s, scikit-learn {r['t_sk']:.2f} s, "
          f"speed-up {r['t_sk'] / r['t_ours']:.1f}x; |dAUROC| {r['d_auroc']:.1e}, |dAUPRC| {r['d_auprc']:.1e}")
    r = run_child("--child", "stream", "--volumes", a.volumes, "--seed", a.seed)
    print(f"stream {a.volumes} volumes {SHAPE}, {r['n']:,} voxels ({r['zeros']:.1%} zeros, {r['distinct']:,} distinct scores): "
          f"{r['time_s']:.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB (whole process, data generation included; "
          f"{r['import_rss_mib']:.0f} MiB of it after the imports alone); "
          f"AUROC {r['auroc']:.6f} AUPRC {r['auprc']:.6f} best DICE {r['best_dice']:.6f}")


if __name__ == "__main__":
    main()
