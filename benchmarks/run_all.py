"""Run every benchmark in this folder, one after the other, each in its own process; prints their reports.

    .venv/bin/python benchmarks/run_all.py
"""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [["bench_metrics.py"], ["bench_stream.py"], ["bench_median.py", "--size", "5", "--dims", "3"],
        ["bench_median.py", "--size", "5", "--dims", "3", "--scale", "0.15"],
        ["bench_median.py", "--size", "9", "--dims", "2"], ["bench_generation.py", "--preset", "standard"]]


def main():
    failed = []
    for r in RUNS:
        print(f"== {' '.join(r)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / r[0]), *r[1:]]).returncode: failed.append(r[0])
    if failed: raise SystemExit(f"failed: {failed}")


if __name__ == "__main__":
    main()
