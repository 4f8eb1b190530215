"""DistributedDataParallel: two CPU processes (gloo, launched by torchrun) train to the same weights as one process.

Two objectives: the baselines' single loss, and a two-optimiser adversarial autoencoder (tests/test_training.py's
`AdvObjective`: generator and discriminator with their own Adam, the discriminator from step 2). Same model, data,
seed and global batches. Not bit-for-bit: the gradients are summed across processes in
another order than one process sums them over its batch (floating-point addition is not associative), and
Adam carries the last-bit differences forward, so the check is `torch.allclose` with a tight tolerance,
with a guard that training moved the weights by far more than that tolerance.
The model uses GroupNorm: SyncBatchNorm works on GPUs only, and CPU DDP of a BatchNorm model normalises
each process's shard with its own statistics (documented in the training chapter).
The loss weighting (`world_size x share / batch`) is checked by a run with the weight replaced by 1 (plain DDP
averaging): on the uneven last batch it must end far outside the tolerance, so the test fails on a wrong weighting.
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
from uad_study.models.baselines import BaselineObjective
from test_training import AdvObjective, TinyAdvAE

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

class Noisy(T.Objective):
    "A denoising objective with its own random stream per process; raises KeyboardInterrupt at loss call `crash_at`."
    def __init__(self, crash_at=None): self.crash_at, self.n = crash_at, 0
    def loss(self, model, batch):
        self.n += 1  # 3 steps and 1 validation batch per epoch: call 5 is epoch 2's first step
        if self.n == self.crash_at: raise KeyboardInterrupt
        x = batch["image"]; out = model(x + 0.1 * torch.randn_like(x))
        return ((out["recon"] - x) ** 2).mean(), {}

def state(m): return {k: v.tolist() for k, v in m.state_dict().items()}

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
                                 objective=BaselineObjective(), ddp_kwargs={"broadcast_buffers": True})  # passed on to DDP
            res[case] = {"history": [{k: v for k, v in h.items() if k != "seconds"} for h in hist], "state": state(m)}
        # resume under DDP: a crash in epoch 2 (every process at the same step), then resume; a noisy objective
        # (its own random stream per process) must continue bit-for-bit
        for case in ("noisy_full", "noisy_resumed"):
            torch.manual_seed(rank); m = TinyAE(); d = out / f"ckpt_{case}"; cfg = T.TrainConfig(**CFG)
            try: T.train_model(m, x[:21], x[-6:], cfg, d, progress=False, objective=Noisy(5 if case == "noisy_resumed" else None))
            except KeyboardInterrupt: T.train_model(m, x[:21], x[-6:], cfg, d, progress=False, objective=Noisy())
            res[case] = {"state": state(m)}
        # two optimisers: the generator and a discriminator that starts at step 2, with its own rate (no input noise:
        # comparable with one process); the same with the DDP loss weight replaced by 1 (it must differ)
        for case in ("gan", "gan_wrong_weight"):
            torch.manual_seed(rank); m = TinyAdvAE(); weight = T._loss_weight
            if case == "gan_wrong_weight": T._loss_weight = lambda world, n_local, n_batch: 1.0
            try:
                hist = T.train_model(m, x[:21], x[-6:], T.TrainConfig(**CFG), out / f"ckpt_{case}", progress=False, name=case,
                                     objective=AdvObjective(d_start=2, noise=0.0))
            finally: T._loss_weight = weight
            res[case] = {"history": [{k: v for k, v in h.items() if k != "seconds"} for h in hist], "state": state(m)}
        # two optimisers, input noise from each process's stream, a crash in epoch 2 and a resume: bit-for-bit the same
        for case in ("gan_noisy_full", "gan_noisy_resumed"):
            torch.manual_seed(rank); m = TinyAdvAE(); d = out / f"ckpt_{case}"; cfg = T.TrainConfig(**CFG)
            crash = AdvObjective(stop_at=3 if case == "gan_noisy_resumed" else None, crash=KeyboardInterrupt)
            try: T.train_model(m, x[:21], x[-6:], cfg, d, progress=False, objective=crash)
            except KeyboardInterrupt: T.train_model(m, x[:21], x[-6:], cfg, d, progress=False, objective=AdvObjective())
            res[case] = {"state": state(m), "objective": torch.load(d / "last.pt", weights_only=False)["objective"]}
    finally:
        T.save_checkpoint, T._write_log = save, log
    return {"rank": rank, "world_size": T.dist_info().world_size, "calls": calls, "cases": res}

if __name__ == "__main__":
    r = run(sys.argv[1])
    (Path(sys.argv[1]) / f"rank{r['rank']}.json").write_text(json.dumps(r))
'''


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
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

    # only process 0 wrote checkpoints and logs (8 runs x 2 epochs of last.pt and the log; best.pt when val improved)
    assert ranks[1]["calls"] == {"save_checkpoint": 0, "write_log": 0}
    assert ranks[0]["calls"]["write_log"] == 8 * 2 and ranks[0]["calls"]["save_checkpoint"] >= 16
    for name in [c for c, _ in case.CASES] + ["gan"]:
        d = ddp / f"ckpt_{name}"
        assert (d / "last.pt").exists() and (d / "train_log.csv").exists()
        assert not [f.name for f in d.iterdir() if f.name.startswith(".")], "temporary files left behind"
        ref = {k: torch.tensor(v) for k, v in single["cases"][name]["state"].items()}
        torch.manual_seed(0); start = (case.TinyAdvAE() if name == "gan" else case.TinyAE()).state_dict()
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
            assert hd["lr"] == hs["lr"] and hd.keys() == hs.keys()
            assert abs(hd["train_loss"] - hs["train_loss"]) < 1e-5 * hs["train_loss"]
            assert abs(hd["val_loss"] - hs["val_loss"]) < 1e-5 * hs["val_loss"]
        assert ranks[0]["cases"][name]["history"] == ranks[1]["cases"][name]["history"]
    assert "train_disc" in single["cases"]["gan"]["history"][0] and "lr_disc" in single["cases"]["gan"]["history"][0]
    # plain averaging (weight 1) on the uneven last batch (3 + 2 samples) ends far outside the tolerance: the check can fail
    ref = {k: torch.tensor(v) for k, v in single["cases"]["gan"]["state"].items()}
    wrong = {k: torch.tensor(v) for k, v in ranks[0]["cases"]["gan_wrong_weight"]["state"].items()}
    assert max(float(((wrong[k] - ref[k]).abs() - 1e-4 * ref[k].abs()).max()) for k in ref if ref[k].is_floating_point()) > 1e-4
    assert single["cases"]["gan_wrong_weight"] == single["cases"]["gan"]  # one process: no weight at all
    for r in ranks + [single]:  # a crash and a resume continue bit-for-bit, on one process and on two
        for a, b in (("noisy_full", "noisy_resumed"), ("gan_noisy_full", "gan_noisy_resumed")):
            assert r["cases"][a] == r["cases"][b], f"{b}, rank {r['rank']} of {r['world_size']}: resume differs"
        assert r["cases"]["gan_noisy_resumed"]["objective"] == {"d_steps": 4}  # steps 2..5: its state across the resume


TRIVAE_CASE = r'''
import json, sys, warnings
from pathlib import Path
import numpy as np, torch
import uad_study.training as T
from uad_study.models.trivae import TriVAE, TriVAEConfig, TriVAELossConfig, TriVAEObjective
from test_trivae import QUIET, TINY, _SpyNet, _role_counts, _subject_slices

DATA, VAL = (16, 6), (5, 7)   # training: 16 subjects x 6 slices, stored subject after subject; validation: 5 x 7
CFG = dict(epochs=2, batch_size=24, lr=1e-2, seed=3, device="cpu")

def run(out):
    out = Path(out); rank = T.dist_info().rank
    data, val, cfg = _subject_slices(*DATA), _subject_slices(*VAL), T.TrainConfig(**CFG)
    torch.manual_seed(0); net = _SpyNet()    # records the subjects of the triplets this process forms
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        T.train_model(net, data, val, cfg, out / "ckpt_spy", progress=False, objective=TriVAEObjective(TriVAELossConfig(noise=QUIET)))
    counts, same = _role_counts(net.seen, DATA[0])
    vcounts, vsame = _role_counts(net.seen, DATA[0], training=False)
    res = {"spy": {"counts": counts.tolist(), "same": same, "val_same": vsame, "val_slices": int(vcounts.sum()),
                   "warnings": [str(w.message) for w in rec if "TriVAEObjective" in str(w.message)]}}
    torch.manual_seed(0); m = TriVAE(TriVAEConfig(**TINY))
    h = T.train_model(m, data, val, cfg, out / "ckpt_trivae", progress=False, objective=TriVAEObjective())
    res["trivae"] = {"val_loss": [r["val_loss"] for r in h], "train_kl": [r["train_kl"] for r in h]}
    return {"rank": rank, "world_size": T.dist_info().world_size, "cases": res}

if __name__ == "__main__":
    r = run(sys.argv[1])
    (Path(sys.argv[1]) / f"rank{r['rank']}.json").write_text(json.dumps(r))
'''


@pytest.mark.slow
def test_two_process_trivae_triplets_and_validation(tmp_path):
    """Tri-VAE under DDP (issue 11): each process forms triplets of three distinct subjects from its piece of every batch; the
    validation batches (the objective's `val_batches`, each mixing the subjects) are shared out whole, and the reduced val_loss is
    the single-process value on the same weights."""
    script = tmp_path / "trivae_case.py"; script.write_text(TRIVAE_CASE)
    ddp = tmp_path / "ddp"; ddp.mkdir()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(ddp)], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"torchrun failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    ranks = [json.loads((ddp / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for r in ranks:
        spy = r["cases"]["spy"]
        assert spy["same"] == 0 and spy["val_same"] == 0 and spy["warnings"] == [], spy
        assert np.asarray(spy["counts"]).sum() > 0.9 * 2 * 96 / 2          # 2 epochs, half of each batch, nearly every slice
    # validation: 35 slices -> 2 mixed batches (18 + 17 rows: 6 + 5 triplets), one per process, at each of the 2 validations
    assert sorted(r["cases"]["spy"]["val_slices"] for r in ranks) == [2 * 15, 2 * 18]
    assert ranks[0]["cases"]["trivae"] == ranks[1]["cases"]["trivae"]
    spec = importlib.util.spec_from_file_location("trivae_case", script); case = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "tests"))
    try: spec.loader.exec_module(case)
    finally: sys.path.remove(str(ROOT / "tests"))
    m = case.TriVAE(case.TriVAEConfig(**case.TINY))
    m.load_state_dict(torch.load(ddp / "ckpt_trivae" / "last.pt", weights_only=False)["model"])
    single = case.T.evaluate_loss(m, case._subject_slices(*case.VAL), case.T.TrainConfig(**case.CFG), "cpu", case.TriVAEObjective())
    assert ranks[0]["cases"]["trivae"]["val_loss"][-1] == pytest.approx(single, rel=1e-6)
