"""Volumes per minute: a quickstart model (the `demo` profile's dense AE at 64x64; randomly initialised with seed 0,
not trained: the speed is the same) scores whole BraTS-sized scans (240x240x155, 1 mm) with `uad_study.runs.score_scans`,
the path of `uad-study score`: reading and preprocessing per the run's recipe (slicing, resampling), batched inference
in `torch.inference_mode`, the residual map, post-processing (`trivae`: mask, threshold, 5^3 median, components), and
writing each map back on its scan's grid as NIfTI. Each stage is timed (its share of the total), and the batched
inference is compared, in the same run, with a plain PyTorch loop on the same model and slices (one slice at a time
under `torch.no_grad()`, as a first script would do it): the ratio.

    .venv/bin/python benchmarks/bench_volumes.py [--scans 4] [--model ae] [--repeat 2] [--device auto]

The scans are synthetic (an ellipsoidal brain with smooth texture and two bright blobs, int16), written to a temporary
folder with a run folder beside them; nothing is kept.
"""
import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

SHAPE = (240, 240, 155)


def write_scans(folder: Path, n: int, seed=0):
    import nibabel as nib
    from scipy import ndimage as ndi
    rng = np.random.default_rng(seed)
    g = np.ogrid[tuple(slice(0, s) for s in SHAPE)]
    brain = sum(((a - s / 2) / (0.4 * s)) ** 2 for a, s in zip(g, SHAPE)) < 1
    for i in range(n):
        v = ndi.gaussian_filter(rng.standard_normal(SHAPE).astype(np.float32), 3.0) * 600 + 500
        for _ in range(2):
            c = [rng.integers(int(0.35 * s), int(0.65 * s)) for s in SHAPE]
            v[sum((a - ci) ** 2 for a, ci in zip(g, c)) < rng.integers(8, 20) ** 2] += 400
        v[~brain] = 0
        nib.save(nib.Nifti1Image(np.rint(v).clip(0, 32767).astype(np.int16), np.diag([-1.0, -1.0, 1.0, 1.0])), folder / f"scan{i:02d}.nii.gz")


def make_run(folder: Path, model: str):
    "A quickstart run folder (demo profile) whose model has seed-0 initial weights."
    import torch
    from uad_study.study import config_parts
    from uad_study.study_quickstart import SPEC, quickstart_config
    cfg = quickstart_config("demo", models=(model,), out_dir=str(folder))
    (folder / "models" / model).mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"study": "quickstart", **config_parts(cfg)}, default=list))
    torch.manual_seed(0)
    torch.save({"model": SPEC.models[model].build(cfg).state_dict()}, folder / "models" / model / "best.pt")
    return cfg


class Stages:
    "Wall time of named library functions while score_scans runs (wrapped where score_scans looks them up)."
    def __init__(self):
        self.t = defaultdict(float)
    def wrap(self, module, name, label):
        f = getattr(module, name)
        def timed(*a, **k):
            t0 = time.perf_counter()
            try: return f(*a, **k)
            finally: self.t[label] += time.perf_counter() - t0
        setattr(module, name, timed)


def plain_loop(model, slices):
    "The reference: one slice at a time through the same model, torch.no_grad()."
    import torch
    out = np.empty(slices.shape, np.float32)
    model.eval()
    with torch.no_grad():
        for i, s in enumerate(slices):
            out[i] = model.reconstruct(torch.from_numpy(np.array(s, np.float32))[None, None])[0, 0].numpy()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=4); ap.add_argument("--model", default="ae", choices=["ae", "vae"])
    ap.add_argument("--repeat", type=int, default=2, help="score_scans runs and inference comparisons (best of)")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    import torch
    import uad_study.preprocess, uad_study.runs, uad_study.study
    from uad_study.inference import reconstruct
    from uad_study.runs import load_run_model, score_scans
    with tempfile.TemporaryDirectory() as d:
        d = Path(d); (d / "scans").mkdir()
        write_scans(d / "scans", a.scans)
        make_run(d / "run", a.model)
        st = Stages()
        st.wrap(uad_study.preprocess, "build_slices", "read + preprocess (slicing, resampling)")
        st.wrap(uad_study.study, "reconstruct", "batched inference")
        st.wrap(uad_study.study, "anomaly_map", "residual map")
        st.wrap(uad_study.study, "postprocess_volume", "post-processing (trivae)")
        st.wrap(uad_study.runs, "_write_scan", "back on the scan grid + NIfTI write")
        best, best_t = None, None
        for r in range(a.repeat):
            st.t.clear()
            os.environ["UAD_STUDY_DATA"] = str(d / f"data{r}")   # a fresh slice cache: every run preprocesses, as new scans do
            t0 = time.perf_counter()
            rec = score_scans(d / "run", a.model, f"nifti:{d / 'scans'},images=*.nii.gz", d / f"out{r}", device=a.device, progress=False)
            total = time.perf_counter() - t0
            if best is None or total < best: best, best_t = total, dict(st.t)
        n_slices = int(sum(1 for _ in (d / "out0" / "maps").iterdir())) and None
        model = load_run_model(d / "run", a.model)[0]
        # the same slices for both inference paths: the preprocessed stack of the scans
        from uad_study.study import parse_source, source_subjects, study_recipe
        from uad_study.runs import load_run
        _, cfg, _ = load_run(d / "run")
        subs, _ = source_subjects(parse_source(f"nifti:{d / 'scans'},images=*.nii.gz", "test"), "test", cfg, False)
        ss = uad_study.preprocess.build_slices(subs, study_recipe(cfg), n_jobs=1, progress=False)   # from the last run's cache
        slices = np.asarray(ss.slices, np.float32); n_slices = len(slices)
        t_ours, t_plain, t_cl = [], [], []
        for _ in range(a.repeat):
            t0 = time.perf_counter(); ours = reconstruct(model, slices, device=a.device, progress=False); t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); ref = plain_loop(model.cpu(), slices); t_plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); cl = reconstruct(model, slices, device=a.device, progress=False, channels_last=True); t_cl.append(time.perf_counter() - t0)
        diff, diff_cl = float(np.abs(ours - ref).max()), float(np.abs(cl - ours).max())
    dev = "cuda" if (a.device == "auto" and torch.cuda.is_available()) or a.device.startswith("cuda") else "cpu"
    print(f"{a.scans} scans of {SHAPE} int16 -> {n_slices} slices of {slices.shape[1]}x{slices.shape[2]} (quickstart demo recipe), "
          f"model: quickstart {a.model}, random seed-0 weights, device {dev}, torch threads {torch.get_num_threads()}")
    print(f"score_scans: {best:.2f} s for {a.scans} scans (best of {a.repeat}); stages:")
    for k, v in sorted(best_t.items(), key=lambda kv: -kv[1]): print(f"  {k:40s} {v:6.2f} s  {v / best:5.1%}")
    rest = best - sum(best_t.values()); print(f"  {'other (checks, folders, metrics files)':40s} {rest:6.2f} s  {rest / best:5.1%}")
    print(f"inference: batched {min(t_ours):.2f} s vs plain loop {min(t_plain):.2f} s on {n_slices} slices "
          f"(best of {a.repeat}, interleaved; max |difference| {diff:.1e})")
    print(f"inference speed-up vs a plain PyTorch loop: {min(t_plain) / min(t_ours):.1f}x; "
          f"{n_slices / min(t_ours):.0f} slices/s batched vs {n_slices / min(t_plain):.0f} slices/s plain")
    print(f"channels-last (not the default): batched {min(t_cl):.2f} s, {min(t_ours) / min(t_cl):.2f}x the default layout "
          f"(max |difference| {diff_cl:.1e})")
    print(f"volumes per minute (score_scans, whole pipeline): {60 * a.scans / best:.1f} ({best / a.scans:.2f} s per volume)")


if __name__ == "__main__":
    main()
