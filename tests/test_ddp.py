"""DistributedDataParallel: two CPU processes (gloo, launched by torchrun) train to the same weights as one process.

Same model, data, seed and global batches. Not bit-for-bit: the gradients are summed across processes in
another order than one process sums them over its batch (floating-point addition is not associative), and
Adam carries the last-bit differences forward, so the check is `torch.allclose` with a tight tolerance,
with a guard that training moved the weights by far more than that tolerance.
The model uses GroupNorm: SyncBatchNorm works on GPUs only, and CPU DDP of a BatchNorm model normalises
each process's shard with its own statistics (documented in the training chapter).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

CASE = r'''
import json, sys
from pathlib import Path
import numpy as np, torch, torch.nn as nn
import uad_study.training as T

class TinyAE(nn.Module):
    "A BatchNorm-free autoencoder (GroupNorm), so per-process batches normalise like the whole batch."
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.GroupNorm(2, 4), nn.LeakyReLU(0.2))
        self.dec = nn.ConvTranspose2d(4, 1, 4, 2, 1)
    def forward(self, x): return {"recon": torch.sigmoid(self.dec(self.enc(x)))}

# (case, n training slices): 21 = 8 + 8 + 5 (the last batch splits 3/2), 17 = 8 + 8 + 1 (process 1 has no sample)
CASES = (("uneven", 21), ("tiny_last", 17))
CFG = dict(epochs=2, batch_size=8, lr=1e-2, seed=3, device="cpu", schedule="cosine")

def run(out):
    out = Path(out); rank = T.dist_info().rank
    x = np.load(out / "data.npy", mmap_mode="r")
    calls = {"save_checkpoint": 0, "write_log": 0}
    save, log = T.save_checkpoint, T._write_log
    def counted(name, f):
        def g(*a, **k): calls[name] += 1; return f(*a, **k)
        return g
    T.save_checkpoint, T._write_log = counted("save_checkpoint", save), counted("write_log", log)
    try:
        res = {}
        for case, n in CASES:
            torch.manual_seed(rank)  # a different start on each process: DDP must broadcast process 0's weights
            m = TinyAE()
            hist = T.train_model(m, x[:n], x[-6:], T.TrainConfig(**CFG), out / f"ckpt_{case}", progress=False, name=case,
                                 ddp_kwargs={"broadcast_buffers": True})  # passed through to DistributedDataParallel
            res[case] = {"history": [{k: v for k, v in h.items() if k != "seconds"} for h in hist],
                         "state": {k: v.tolist() for k, v in m.state_dict().items()}}
        # resume under DDP: a crash in epoch 2 (every process at the same step), then resume; a noisy objective
        # (its own random stream per process) must continue bit-for-bit
        for case in ("noisy_full", "noisy_resumed"):
            torch.manual_seed(rank); m = TinyAE(); n_calls = [0]
            def noisy(model, xb, crash=case != "noisy_full"):
                n_calls[0] += 1  # 3 steps and 1 validation batch per epoch: call 5 is epoch 2's first step
                if crash and n_calls[0] == 5: raise KeyboardInterrupt
                out = model(xb + 0.1 * torch.randn_like(xb))
                return ((out["recon"] - xb) ** 2).mean(), {}
            cfg = T.TrainConfig(**CFG)
            try: T.train_model(m, x[:21], x[-6:], cfg, out / f"ckpt_{case}", progress=False, objective=noisy)
            except KeyboardInterrupt: T.train_model(m, x[:21], x[-6:], cfg, out / f"ckpt_{case}", progress=False, objective=noisy)
            res[case] = {"state": {k: v.tolist() for k, v in m.state_dict().items()}}
    finally:
        T.save_checkpoint, T._write_log = save, log
    return {"rank": rank, "world_size": T.dist_info().world_size, "calls": calls, "cases": res}

if __name__ == "__main__":
    r = run(sys.argv[1])
    (Path(sys.argv[1]) / f"rank{r['rank']}.json").write_text(json.dumps(r))
'''


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "data.npy", rng.random((27, 16, 16), dtype=np.float32))
    script = tmp_path / "ddp_case.py"; script.write_text(CASE)
    ddp = tmp_path / "ddp"; ddp.mkdir(); (ddp / "data.npy").write_bytes((tmp_path / "data.npy").read_bytes())
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(ddp)], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"torchrun failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    ranks = [json.loads((ddp / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    # the single-process reference: the same module, in this process (no torchrun variables here)
    spec = importlib.util.spec_from_file_location("ddp_case", script); case = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(case)
    single_dir = tmp_path / "single"; single_dir.mkdir(); (single_dir / "data.npy").write_bytes((tmp_path / "data.npy").read_bytes())
    single = case.run(single_dir)
    assert single["world_size"] == 1

    # only process 0 wrote checkpoints and logs (4 runs x 2 epochs of last.pt and the log; best.pt when val improved)
    assert ranks[1]["calls"] == {"save_checkpoint": 0, "write_log": 0}
    assert ranks[0]["calls"]["write_log"] == 4 * 2 and ranks[0]["calls"]["save_checkpoint"] >= 4
    for name, _ in case.CASES:
        d = ddp / f"ckpt_{name}"
        assert (d / "last.pt").exists() and (d / "train_log.csv").exists()
        assert not [f.name for f in d.iterdir() if f.name.startswith(".")], "temporary files left behind"
        ref = {k: torch.tensor(v) for k, v in single["cases"][name]["state"].items()}
        torch.manual_seed(0); start = case.TinyAE().state_dict()
        saved = torch.load(d / "last.pt", weights_only=False)["model"]
        for r in ranks:
            got = {k: torch.tensor(v) for k, v in r["cases"][name]["state"].items()}
            for k in ref:
                assert torch.allclose(got[k], ref[k], rtol=1e-4, atol=1e-6), \
                    f"{name}, rank {r['rank']}: {k} differs by {(got[k] - ref[k]).abs().max():.3g}"
                assert torch.equal(got[k], saved[k]), f"{name}: rank {r['rank']} holds other weights than last.pt"
        for k in ref:  # the tolerance is far below what training changed
            if ref[k].is_floating_point(): assert (ref[k] - start[k]).abs().max() > 1e-3, k
        # the logged losses are reduced across processes: the same as one process, up to rounding
        for hd, hs in zip(ranks[0]["cases"][name]["history"], single["cases"][name]["history"]):
            assert hd["lr"] == hs["lr"]
            assert abs(hd["train_loss"] - hs["train_loss"]) < 1e-5 * hs["train_loss"]
            assert abs(hd["val_loss"] - hs["val_loss"]) < 1e-5 * hs["val_loss"]
        assert ranks[0]["cases"][name]["history"] == ranks[1]["cases"][name]["history"]
    for r in ranks + [single]:  # a crash and a resume continue bit-for-bit, on one process and on two
        assert r["cases"]["noisy_full"] == r["cases"]["noisy_resumed"], f"rank {r['rank']} of {r['world_size']}: resume differs"
