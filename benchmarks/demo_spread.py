"""Mean and sd over seeds of the demo's metrics: `python benchmarks/demo_spread.py runs/demo runs/demo-seed1 runs/demo-seed2`.

Writes `<first run>/../demo_spread.csv` and prints a Markdown table (model, post-processing, protocol; each metric as
mean ± sd over the runs), the table the README shows. Every run must come from the same config except the seed."""
import json
import sys
from pathlib import Path

import pandas as pd

KEYS = ["model", "postprocess", "protocol"]
METRICS = ["auroc", "auprc", "prevalence", "dice", "dice_subject_mean"]


def main(runs: list[str]) -> pd.DataFrame:
    frames, seeds = [], []
    for r in runs:
        cfg = json.loads((Path(r) / "config.json").read_text())
        seeds.append(cfg["run"]["seed"])
        frames.append(pd.read_csv(Path(r) / "metrics.csv").assign(seed=cfg["run"]["seed"]))
    if len(set(seeds)) != len(seeds): sys.exit(f"runs must have different seeds, got {seeds}")
    df = pd.concat(frames)
    g = df.groupby(KEYS, sort=False)[METRICS]
    out = g.mean().round(4).merge(g.std(ddof=1).round(4), left_index=True, right_index=True, suffixes=("", "_sd")).reset_index()
    out.insert(len(KEYS), "n_seeds", len(runs))
    path = Path(runs[0]).parent / "demo_spread.csv"
    out.to_csv(path, index=False)
    print(f"| {' | '.join(KEYS + METRICS)} |\n|{'---|' * (len(KEYS) + len(METRICS))}")
    for _, r in out.iterrows():
        print("| " + " | ".join([str(r[k]) for k in KEYS] + [f"{r[m]:.4f} ± {r[m + '_sd']:.4f}" for m in METRICS]) + " |")
    print(f"\nseeds {seeds}; written {path}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
