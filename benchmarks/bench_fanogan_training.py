"""f-AnoGAN's training cost at the chapters' `cpu` sizes: seconds per training slice of each stage, and the hours a profile's
run would take on this machine.

f-AnoGAN is the one comparator whose `cpu` row the scale-space chapter cannot get on 2 CPU cores: stage 1 (WGAN-GP) takes
a critic step with a gradient penalty (a gradient of a gradient) on every batch and a generator step every `n_critic`-th,
at 128 px. This script times both stages the way `WGANGPObjective.train_step` and `IzifObjective` run them (Adam, the
profile's model sizes from `FANOGAN_PROFILES`, random weights: the cost is the same), on a batch of the chapter's batch
size, and scales by the chapter's training slices and epochs:

    hours = (s per slice, stage 1 + stage 2) x training slices x epochs / 3600

The training-slice counts default to what the chapters' `cpu` profiles load from benchmark v2 (Tri-VAE: 1867 slices at
64 px, batch 48; scale-space: 1722 slices at 128 px, batch 8, both 12 and 20 epochs per stage).

    .venv/bin/python benchmarks/bench_fanogan_training.py [--repeat 3] [--out benchmarks/results/fanogan_training.csv]
"""
import argparse
import os
import platform
import time
from pathlib import Path

CHAPTERS = {  # chapter: (resolution, training slices, batch size, epochs per stage) of its cpu profile on benchmark v2
    "trivae-cpu": (64, 1867, 48, 12),
    "ssae-cpu": (128, 1722, 8, 20),
}


def time_stages(R: int, B: int, repeat: int) -> tuple[float, float]:
    "Best seconds of one stage-1 step (critic + generator / n_critic) and one stage-2 step, each per slice."
    import torch
    from uad_study.models.fanogan import FANOGAN_PROFILES, FAnoGAN, FAnoGANConfig, IzifObjective, gradient_penalty
    p = FANOGAN_PROFILES["cpu"]
    torch.manual_seed(0)
    m = FAnoGAN(FAnoGANConfig(in_size=R, dim=p["dim"], z_dim=p["z_dim"]))
    oc = torch.optim.Adam(m.critic.parameters(), 1e-3, betas=(0.0, 0.9))
    og = torch.optim.Adam(m.generator.parameters(), 1e-3, betas=(0.0, 0.9))
    oe = torch.optim.Adam(m.encoder.parameters(), 1e-3)
    x = torch.rand(B, 1, R, R)

    def critic_step():
        fake = m.sample(B).detach()
        ld = m.critic(fake)[0].mean() - m.critic(x)[0].mean() + 10.0 * gradient_penalty(m.critic, x, fake)
        oc.zero_grad(); ld.backward(); oc.step()

    def generator_step():
        m.critic.requires_grad_(False)
        lg = -m.critic(m.sample(B))[0].mean(); og.zero_grad(); lg.backward(); og.step()
        m.critic.requires_grad_(True)

    izif = IzifObjective()
    def encoder_step():
        loss, _ = izif.loss(m, {"image": x}); oe.zero_grad(); loss.backward(); oe.step()

    def best(f):
        f()                                                     # warm-up
        t = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter(); f(); t = min(t, time.perf_counter() - t0)
        return t
    c, g = best(critic_step), best(generator_step)
    m.generator.requires_grad_(False); m.critic.requires_grad_(False)
    e = best(encoder_step)
    return (c + g / p["n_critic"]) / B, e / B


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chapters", nargs="+", default=list(CHAPTERS), choices=list(CHAPTERS))
    ap.add_argument("--repeat", type=int, default=3, help="timings per step; the best counts")
    ap.add_argument("--out", default="benchmarks/results/fanogan_training.csv")
    a = ap.parse_args()
    import pandas as pd
    import torch
    rows = []
    for ch in a.chapters:
        R, n, B, ep = CHAPTERS[ch]
        s1, s2 = time_stages(R, B, a.repeat)
        r = {"chapter": ch, "resolution": R, "batch": B, "train_slices": n, "epochs_per_stage": ep,
             "s_per_slice_stage1": s1, "s_per_slice_stage2": s2,
             "stage1_min_per_epoch": s1 * n / 60, "stage2_min_per_epoch": s2 * n / 60,
             "profile_hours": (s1 + s2) * n * ep / 3600}
        rows.append(r)
        print(f"{ch:11s} {R:3d}px  stage 1 {r['stage1_min_per_epoch']:6.1f} min/epoch, stage 2 {r['stage2_min_per_epoch']:5.1f} "
              f"min/epoch -> {r['profile_hours']:5.2f} h for {ep}+{ep} epochs", flush=True)
    df = pd.DataFrame(rows)
    df["threads"] = torch.get_num_threads()
    df["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp"); df.round(6).to_csv(tmp, index=False); tmp.replace(out)
    print(f"\n{out}")


if __name__ == "__main__":
    main()
