"""Inference cost of every comparator per volume, at the `cpu` and `paper` sizes of the study profiles.

Each comparator of `uad_study.study.COMPARATORS` is built at a profile's size (randomly initialised with seed 0, not
trained: the cost is the same) and maps a batch of slices the way a study does: `uad_study.inference.reconstruct`
(batched, `inference_mode`, or `no_grad` for the models whose test-time output takes gradients), then the absolute
residual. A volume is `--slices` axial slices (155: a BraTS volume at 1 mm). The seconds per slice are the best of
`--repeat` timings of one batch; seconds per volume = per slice x slices.

Where a method's cost is a loop of identical passes (AnoDDPM's reverse steps, the restoration models' gradient steps),
sizes whose full run would take minutes per batch are timed with fewer passes and scaled to the profile's count; the
`timed` column says which (`full`, or `scaled from k of n passes`). The scaling is linear in the passes, the one cost
that grows with them; the fixed part (data to and from the device, the residual) is then counted n/k times, so a
scaled figure is an upper bound.

    .venv/bin/python benchmarks/bench_comparators.py [--profiles cpu paper] [--slices 155] [--repeat 2] [--device auto]
                                                     [--out benchmarks/results/comparators_cost.csv]
"""
import argparse
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

SIZES = {"cpu": (64, 128), "paper": (256,)}   # resolutions of the chapters' profiles: Tri-VAE cpu 64, scale-space cpu 128; paper 256
BATCH = {64: 32, 128: 16, 256: 4}
LOOPS = {"anoddpm": ("cfg", "t_test"), "restoration-vae": (None, "steps"), "restoration-gmvae": (None, "steps")}


def _set_loop(model, name, k):
    "Set the model's loop count to k (returns the profile's count)."
    where, attr = LOOPS[name]
    obj = model.cfg if where == "cfg" else model
    n = getattr(obj, attr)
    if where == "cfg":
        import dataclasses
        model.cfg = dataclasses.replace(model.cfg, **{attr: k})
    else: setattr(obj, attr, k)
    return n


def time_one(name, profile, R, slices, repeat, device, max_batch_s):
    import torch
    from uad_study.inference import reconstruct
    from uad_study.scores import anomaly_map
    from uad_study.study import comparator_spec
    cfg = SimpleNamespace(profile=profile, resolution=R, seed=0)
    torch.manual_seed(0)
    model = comparator_spec(name).build(cfg).eval()
    n_par = sum(p.numel() for p in model.parameters())
    B = BATCH[R]
    x = np.random.default_rng(0).random((B, R, R), dtype=np.float32)
    run = lambda: anomaly_map("absolute", x, reconstruct(model, x, batch_size=B, device=device, progress=False))
    scale, timed = 1.0, "full"
    if name in LOOPS:
        n = _set_loop(model, name, 1)
        t0 = time.perf_counter(); run(); t1 = time.perf_counter() - t0           # one pass (and a warm-up)
        if t1 * n > max_batch_s:
            k = max(1, min(n, int(max_batch_s / max(t1, 1e-6))))
            _set_loop(model, name, k); scale, timed = n / k, f"scaled from {k} of {n} passes"
        else: _set_loop(model, name, n)
    run()                                                                           # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter(); run(); best = min(best, time.perf_counter() - t0)
    per_slice = best * scale / B
    return {"method": name, "profile": profile, "resolution": R, "parameters": n_par, "batch": B, "s_per_slice": per_slice,
            "s_per_volume": per_slice * slices, "slices_per_volume": slices, "timed": timed}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", nargs="+", default=["cpu", "paper"], choices=list(SIZES))
    ap.add_argument("--methods", nargs="+", default=None, help="comparators to time (default: all)")
    ap.add_argument("--slices", type=int, default=155, help="axial slices of a volume (155: BraTS at 1 mm)")
    ap.add_argument("--repeat", type=int, default=2, help="timings per batch; the best counts")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")
    ap.add_argument("--max-batch-s", type=float, default=20.0, help="longest timing of one batch before passes are scaled")
    ap.add_argument("--out", default="benchmarks/results/comparators_cost.csv")
    a = ap.parse_args()
    import pandas as pd
    import torch
    from uad_study.study import COMPARATORS
    dev = "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    rows = []
    for p in a.profiles:
        for R in SIZES[p]:
            for m in a.methods or list(COMPARATORS):
                r = time_one(m, p, R, a.slices, a.repeat, dev, a.max_batch_s)
                rows.append(r)
                print(f"{m:18s} {p:5s} {R:3d}px  {r['s_per_volume']:10.2f} s/volume  ({r['s_per_slice'] * 1e3:9.2f} ms/slice, {r['timed']})", flush=True)
    df = pd.DataFrame(rows)
    df["device"], df["threads"] = dev, torch.get_num_threads()
    df["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp"); df.round(6).to_csv(tmp, index=False); tmp.replace(out)
    print(f"\n{out}\n" + df[["method", "profile", "resolution", "parameters", "s_per_volume", "timed"]].to_string(index=False))


if __name__ == "__main__":
    main()
