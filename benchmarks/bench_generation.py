"""Time the generation of the embedded benchmark v2 (uad_study.benchmark) on this machine, and check it.

    .venv/bin/python benchmarks/bench_generation.py [--preset standard] [--n-jobs 2] [--keep]

Generates the preset into a temporary folder (never the cache), reports wall time, subjects, files, bytes,
seconds per subject, then verifies every checksum. Target (issue 6): the standard preset in <= 5 minutes
on 2 cores.
"""
import argparse, os, resource, shutil, tempfile, time
from pathlib import Path

from uad_study.benchmark import benchmark_config, bench_templates, generate_benchmark, read_manifest, verify_benchmark


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--keep", help="move the generated folder here instead of deleting it")
    a = ap.parse_args()
    cfg = benchmark_config(a.preset)
    t0 = time.time(); bench_templates(float(cfg.spacing_mm)); t_tpl = time.time() - t0
    tmp = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    try:
        t0 = time.time()
        root = generate_benchmark(cfg, tmp / "b", progress=False, n_jobs=a.n_jobs)
        wall = time.time() - t0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN); cpu = ru.ru_utime + ru.ru_stime   # the workers' CPU time
        man = read_manifest(root)
        t0 = time.time(); verify_benchmark(root); t_ver = time.time() - t0
        n, size = man["n_subjects"], sum(f["bytes"] for f in man["files"])
        print(f"preset {a.preset}: {n} subjects, {len(man['files'])} files, {size / 2**20:.0f} MiB; "
              f"templates {t_tpl:.1f} s (once per process), generation {wall:.1f} s with n_jobs={a.n_jobs} "
              f"({wall / n:.2f} s/subject), verify {t_ver:.1f} s; target <= 300 s: {'OK' if wall + t_tpl <= 300 else 'MISSED'}; "
              f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; workers' CPU time {cpu:.0f} s "
              f"(= {cpu / a.n_jobs + t_tpl:.0f} s wall on {a.n_jobs} idle cores, with the templates)")
        if a.keep: shutil.move(str(root), a.keep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
