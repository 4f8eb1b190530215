"""Training throughput of the Tri-VAE study's models (slices per second through objective + backward + Adam step)
and the share of a step spent generating the negatives' noise (target: coarse and simplex noise each under
10% of a Tri-VAE training step, i.e. the noise does not slow training).

    .venv/bin/python benchmarks/bench_trivae.py [--resolution 64] [--profile cpu] [--batch 48] [--steps 5]

`--profile` takes the network widths of a study profile (uad_study.study_trivae.PROFILES: smoke, cpu, paper).
"""
import argparse
import time

import torch


def step_rate(model, objective, x, steps):
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    for i in range(steps + 1):
        if i == 1: t0 = time.perf_counter()
        loss, _ = objective(model, x); opt.zero_grad(); loss.backward(); opt.step()
    return steps * len(x) / (time.perf_counter() - t0)


def noise_time(x, cfg, reps):
    from uad_study.noise import add_noise
    add_noise(x, cfg)
    t0 = time.perf_counter()
    for _ in range(reps): add_noise(x, cfg)
    return (time.perf_counter() - t0) / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "paper"])
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=["vae", "trivae-coarse", "trivae-simplex", "dae-coarse"])
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    from uad_study.core import get_device
    from uad_study.noise import NoiseConfig
    from uad_study.study_trivae import study_model, study_objective, trivae_config
    dev = get_device(a.device)
    cfg = trivae_config(a.profile, resolution=a.resolution)   # only the network sizes are read (no data)
    torch.manual_seed(0)
    x = torch.rand(a.batch, 1, a.resolution, a.resolution, device=dev)
    x[:, :, : a.resolution // 8] = 0                                  # some background
    print(f"device {dev}, {torch.get_num_threads()} threads, {a.resolution}x{a.resolution}, batch {a.batch}, "
          f"profile {a.profile} widths: Tri-VAE {cfg.trivae_channels}, DAE width {cfg.dae_width}")
    rates = {}
    for name in a.models:
        model, objective = study_model(name, cfg), study_objective(name, cfg)
        model.to(dev).train()
        rates[name] = step_rate(model, objective, x, a.steps)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:16s} {rates[name]:8.1f} slices/s  ({n / 1e6:.2f}M weights)")
    if "trivae-coarse" in rates:
        step = a.batch / rates["trivae-coarse"]
        for kind in ("coarse", "simplex"):
            t = noise_time(x[: a.batch // 3], NoiseConfig(kind), max(3, a.steps))
            print(f"noise {kind:8s} {t * 1e3:8.1f} ms per batch of {a.batch // 3} negatives = {100 * t / step:.1f}% "
                  f"of a Tri-VAE step (target < 10%)")


if __name__ == "__main__":
    main()
