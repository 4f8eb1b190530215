"""Pooled pixel metrics (AUROC, AUPRC, best DICE) on a large synthetic map: time and peak memory of
uad_study.metrics.pixel_metrics against scikit-learn's exact functions, measured in the same run.

    .venv/bin/python benchmarks/bench_metrics.py [--n 12000000] [--zeros 0.85]

Prints one line per implementation and the ratio; results are recorded by hand in benchmarks/README.md.
"""
import argparse
import time
import tracemalloc

import numpy as np


def measure(f, *a):
    tracemalloc.start(); t0 = time.perf_counter()
    out = f(*a)
    dt = time.perf_counter() - t0; peak = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
    return out, dt, peak / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=12_000_000, help="number of voxels")
    ap.add_argument("--zeros", type=float, default=0.85, help="fraction of exact-zero scores (post-processed maps)")
    ap.add_argument("--prevalence", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from sklearn.metrics import average_precision_score, roc_auc_score
    from uad_study.metrics import pixel_metrics
    rng = np.random.default_rng(a.seed)
    y = rng.random(a.n) < a.prevalence
    s = (rng.random(a.n, dtype=np.float32) + 0.3 * y).astype(np.float32); s[rng.random(a.n) < a.zeros] = 0
    m, t_ours, mem_ours = measure(pixel_metrics, s, y)
    (auc, ap_), t_sk, mem_sk = measure(lambda s, y: (roc_auc_score(y, s), average_precision_score(y, s)), s, y)
    print(f"n={a.n:,} zeros={a.zeros} prevalence={a.prevalence}")
    print(f"uad_study pixel_metrics (AUROC+AUPRC+best DICE): {t_ours:6.2f} s  peak {mem_ours:7.0f} MiB (traced)")
    print(f"scikit-learn roc_auc + average_precision:       {t_sk:6.2f} s  peak {mem_sk:7.0f} MiB (traced)")
    print(f"speed-up {t_sk / t_ours:.1f}x; |dAUROC| {abs(m['auroc'] - auc):.2e}, |dAUPRC| {abs(m['auprc'] - ap_):.2e}")


if __name__ == "__main__":
    main()
