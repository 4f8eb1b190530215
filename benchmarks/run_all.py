"""Run every benchmark in this folder, one after the other, each in its own process; prints their reports, then
the headline figures of this run together (metrics, median and inference against their references, volumes per
minute).

    .venv/bin/python benchmarks/run_all.py [--skip-generation]
"""
import argparse
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [["bench_metrics.py"], ["bench_median.py"], ["bench_median.py", "--size", "9", "--dims", "2", "--scales", "0.07", "1.0"],
        ["bench_volumes.py"], ["bench_stream.py"], ["bench_generation.py", "--preset", "standard"]]
HEADLINES = ("metrics speed-up", "median speed-up", "inference speed-up", "volumes per minute")


def cpu_name() -> str:
    try: return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration): return platform.processor() or "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-generation", action="store_true", help="leave out bench_generation.py (about five minutes)")
    a = ap.parse_args()
    failed, head = [], []
    for r in RUNS:
        if a.skip_generation and r[0] == "bench_generation.py": continue
        print(f"== {' '.join(r)}", flush=True)
        p = subprocess.Popen([sys.executable, str(HERE / r[0]), *r[1:]], stdout=subprocess.PIPE, text=True)
        for line in p.stdout:
            print(line, end="", flush=True)
            if line.startswith(HEADLINES): head.append(f"{line.strip()}   [{' '.join(r)}]")
        if p.wait(): failed.append(r[0])
    try: load = " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError: load = "unknown"
    print(f"\n== headline figures of this run (machine: {cpu_name()}, {sys.platform}; load average at the end: {load})")
    print("\n".join(head))
    if failed: raise SystemExit(f"failed: {failed}")


if __name__ == "__main__":
    main()
