"""Training engine: determinism, resume equals an uninterrupted run, clear stop on NaN; objectives with several
optimisers (a toy adversarial autoencoder) and a second stage on a frozen first one (a toy code prior); dict batches.

`TinyAdvAE` and `AdvObjective` are also trained under torchrun by tests/test_ddp.py."""
import ast
import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from uad_study.core import UADInputError, seed_everything
from uad_study.models.baselines import BaselineObjective, build_model
from uad_study.training import Objective, StepContext, TrainConfig, load_checkpoint, train_model


def _data(n=48, s=32):
    rng = np.random.default_rng(1)
    x = np.zeros((n, s, s), np.float32)
    yy, xx = np.mgrid[:s, :s]
    for i in range(n):
        r = rng.uniform(s / 5, s / 2.7)
        x[i] = (((yy - s / 2) ** 2 + (xx - s / 2) ** 2) < r * r) * rng.uniform(0.5, 1.0)
    return x


def _model(name):
    seed_everything(0)
    return build_model(name, in_size=32, channels=(8, 16, 32), latent_dim=8)


B = BaselineObjective  # the baselines' objective: L2 (+ KL for the VAE)


def _same(a, b, where=""):
    "Bit-identical nested state (tensors, dicts, lists, numbers)."
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a: _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (p, q) in enumerate(zip(a, b)): _same(p, q, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _drop_seconds(h):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in h]


@pytest.mark.parametrize("name", ["ae", "vae"])
def test_resume_matches_uninterrupted(tmp_path, name):
    x = _data()
    full = _model(name)
    train_model(full, x, x[:8], TrainConfig(epochs=3, batch_size=8, device="cpu"), tmp_path / "full", progress=False, objective=B())
    part = _model(name)
    train_model(part, x, x[:8], TrainConfig(epochs=2, batch_size=8, device="cpu"), tmp_path / "part", progress=False, objective=B())
    del part  # the "interruption": a new process would start from the checkpoint only
    torch.manual_seed(12345)  # whatever the RNG state is now, resume restores the saved one
    resumed = _model(name)
    hist = train_model(resumed, x, x[:8], TrainConfig(epochs=3, batch_size=8, device="cpu"), tmp_path / "part", progress=False,
                       objective=B())
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name}: parameter {k} differs after resume"
    ck = load_checkpoint(tmp_path / "part" / "last.pt")
    assert ck["epoch"] == 3 and list(ck["optimizers"]) == ["model"]
    _same(ck["optimizers"], load_checkpoint(tmp_path / "full" / "last.pt")["optimizers"])


def test_same_seed_same_weights_and_different_seed_differs(tmp_path):
    x = _data()
    a, b, c = _model("vae"), _model("vae"), _model("vae")
    train_model(a, x, None, TrainConfig(epochs=1, batch_size=8, device="cpu", seed=0), tmp_path / "a", progress=False, objective=B())
    train_model(b, x, None, TrainConfig(epochs=1, batch_size=8, device="cpu", seed=0), tmp_path / "b", progress=False, objective=B())
    train_model(c, x, None, TrainConfig(epochs=1, batch_size=8, device="cpu", seed=1), tmp_path / "c", progress=False, objective=B())
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


def test_training_reduces_loss(tmp_path):
    x = _data()
    m = _model("ae")
    h = train_model(m, x, x[:8], TrainConfig(epochs=6, batch_size=8, device="cpu", lr=3e-3), tmp_path, progress=False, objective=B())
    assert h[-1]["train_loss"] < 0.5 * h[0]["train_loss"]


def test_nan_loss_stops_with_message(tmp_path):
    x = _data(); x[3, 0, 0] = np.inf
    with pytest.raises(FloatingPointError, match=r"training loss became .* at epoch 1, step 1 \(optimiser 'model'"):
        train_model(_model("ae"), x, None, TrainConfig(epochs=1, batch_size=48, device="cpu"), tmp_path, progress=False, objective=B())


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="last.pt: unreadable checkpoint"):
        train_model(_model("ae"), _data(), None, TrainConfig(epochs=1, device="cpu"), tmp_path, progress=False, objective=B())


def test_objective_is_required_and_must_be_an_objective(tmp_path):
    with pytest.raises(TypeError, match="objective"):
        train_model(_model("ae"), _data(n=8), None, TrainConfig(epochs=1, device="cpu"), tmp_path / "a", progress=False)
    with pytest.raises(UADInputError, match="objective must be a uad_study.training.Objective"):
        train_model(_model("ae"), _data(n=8), None, TrainConfig(epochs=1, device="cpu"), tmp_path / "b", progress=False,
                     objective=lambda model, x: model(x))
    assert not (tmp_path / "b").exists()


def test_training_imports_no_model():
    "The engine (and the objective protocol under the models) import no model module."
    import uad_study.objective, uad_study.training
    for mod in (uad_study.training, uad_study.objective):
        tree = ast.parse(Path(mod.__file__).read_text())
        names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.module for a in n.names]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert "torch" in names, "is the import parsing broken?"
        assert not [m for m in names if "models" in m.split(".")], f"{mod.__name__} imports a model: {names}"


class _Interrupt(Exception):
    pass


class _Noisy(Objective):
    "A denoising objective drawing torch noise; raises after `stop_at` loss calls (a simulated crash mid-epoch)."
    def __init__(self, calls=None, stop_at=None): self.calls, self.stop_at, self.n = calls, stop_at, 0

    def loss(self, model, batch):
        x = batch["image"]; self.n += 1
        if self.stop_at is not None and self.n > self.stop_at: raise _Interrupt
        if self.calls is not None: self.calls.append(len(x))
        out = model(x + 0.05 * torch.randn_like(x))
        loss = ((out["recon"] - x) ** 2).mean()
        return loss, {"mse": loss.detach(), "loss": loss.detach()}  # a part named "loss" does not replace train_loss


class _Stopping(BaselineObjective):
    "The baselines' objective, raising after `stop_at` loss calls (training and validation)."
    def __init__(self, stop_at): super().__init__(); self.stop_at, self.n = stop_at, 0

    def loss(self, model, batch):
        self.n += 1
        if self.n > self.stop_at: raise _Interrupt
        return super().loss(model, batch)


@pytest.mark.parametrize("name", ["ae", "vae"])
def test_resume_after_crash_with_schedule_and_early_stopping(tmp_path, name):
    "Cosine schedule + warm-up + early stopping + a noisy objective: a crash mid-epoch, then resume, gives the uninterrupted weights."
    x = _data()
    cfg = TrainConfig(epochs=4, batch_size=8, device="cpu", schedule="cosine", warmup_epochs=0.5, min_lr=1e-5,
                      early_stop_patience=3, early_stop_min_delta=0.0)
    full = _model(name)
    h_full = train_model(full, x, x[:8], cfg, tmp_path / "full", progress=False, objective=_Noisy())
    crashed = _model(name)
    with pytest.raises(_Interrupt):  # 6 steps per epoch: dies in the middle of epoch 3
        train_model(crashed, x, x[:8], cfg, tmp_path / "part", progress=False, objective=_Noisy(stop_at=15))
    assert load_checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 2
    torch.manual_seed(999)
    resumed = _model(name)
    h_res = train_model(resumed, x, x[:8], cfg, tmp_path / "part", progress=False, objective=_Noisy())
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name}: parameter {k} differs after resume"
    assert _drop_seconds(h_full) == _drop_seconds(h_res)
    assert h_full[-1]["lr"] < 1e-4 and "train_mse" in h_full[0]
    assert (tmp_path / "full" / "best.pt").exists()


def test_early_stop_resumed_stops_where_uninterrupted_does(tmp_path):
    x = _data()
    cfg = TrainConfig(epochs=6, batch_size=8, device="cpu", early_stop_patience=2, early_stop_min_delta=10.0)
    full = _model("ae")
    h = train_model(full, x, x[:8], cfg, tmp_path / "full", progress=False, objective=B())
    assert [r["epoch"] for r in h] == [1, 2, 3]  # epoch 1 sets the best; 2 and 3 do not improve by 10
    ck = load_checkpoint(tmp_path / "full" / "last.pt")
    assert ck["early_stop"]["stopped"] and ck["early_stop"]["best_epoch"] == 1
    best = load_checkpoint(tmp_path / "full" / "best.pt")
    for a, b in zip(best["model"].values(), full.state_dict().values()): assert torch.equal(a, b)
    part = _model("ae")
    with pytest.raises(_Interrupt):
        train_model(part, x, x[:8], cfg, tmp_path / "part", progress=False, objective=_Stopping(stop_at=8))
    resumed = _model("ae")
    h2 = train_model(resumed, x, x[:8], cfg, tmp_path / "part", progress=False, objective=B())
    assert [r["epoch"] for r in h2] == [1, 2, 3]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()): assert torch.equal(a, b)


def test_drop_last_keeps_batches_full(tmp_path):
    x = _data(n=43)
    seen = []
    h = train_model(_model("ae"), x, None, TrainConfig(epochs=2, batch_size=8, device="cpu", drop_last=True), tmp_path,
                    progress=False, objective=_Noisy(calls=seen))
    assert seen == [8] * 10 and len(h) == 2
    with pytest.raises(UADInputError, match="leaves no batch"):
        train_model(_model("ae"), x[:5], None, TrainConfig(epochs=1, batch_size=8, device="cpu", drop_last=True), tmp_path / "e",
                    objective=B())


def test_bf16_autocast_on_cpu_trains(tmp_path):
    x = _data()
    h = train_model(_model("vae"), x, x[:8], TrainConfig(epochs=2, batch_size=16, device="cpu", amp="bf16", lr=3e-3), tmp_path,
                    progress=False, objective=B())
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in h)
    with pytest.raises(UADInputError, match="needs a CUDA device"):
        train_model(_model("ae"), x, None, TrainConfig(epochs=1, device="cpu", amp="fp16"), tmp_path / "fp16", progress=False,
                    objective=B())


def test_step_schedule_is_logged(tmp_path):
    x = _data()
    h = train_model(_model("ae"), x, None, TrainConfig(epochs=3, batch_size=16, device="cpu", lr=1e-2, schedule="step",
                                                      step_size=1, gamma=0.5), tmp_path, progress=False, objective=B())
    assert [r["lr"] for r in h] == [1e-2, 5e-3, 2.5e-3]
    assert (tmp_path / "train_log.csv").read_text().splitlines()[0].split(",")[:5] == ["epoch", "train_loss", "val_loss", "seconds", "lr"]


def test_tensorboard_optional(tmp_path):
    x = _data(n=16)
    cfg = TrainConfig(epochs=1, batch_size=8, device="cpu", tensorboard=True)
    try:
        import torch.utils.tensorboard  # noqa: F401
        have_tb = True
    except Exception:
        have_tb = False
    if have_tb:
        train_model(_model("ae"), x, x[:4], cfg, tmp_path, progress=False, objective=B())
        assert any((tmp_path / "tb").iterdir())
    else:
        with pytest.warns(UserWarning, match="TensorBoard cannot be imported"):
            train_model(_model("ae"), x, x[:4], cfg, tmp_path, progress=False, objective=B())
        assert (tmp_path / "train_log.csv").exists() and not (tmp_path / "tb").exists()


def test_bad_config_is_a_clear_error():
    with pytest.raises(UADInputError, match="amp must be one of"): TrainConfig(amp="half")
    with pytest.raises(UADInputError, match="early_stop_patience must be"): TrainConfig(early_stop_patience=0)


def test_resume_with_changed_settings_warns(tmp_path):
    x = _data(n=16)
    train_model(_model("ae"), x, None, TrainConfig(epochs=1, batch_size=8, device="cpu"), tmp_path, progress=False, objective=B())
    with pytest.warns(UserWarning, match=r"lr: 0.001 -> 0.002"):
        train_model(_model("ae"), x, None, TrainConfig(epochs=2, batch_size=8, device="cpu", lr=2e-3), tmp_path, progress=False,
                    objective=B())
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # more epochs of a constant schedule: no warning
        train_model(_model("ae"), x, None, TrainConfig(epochs=3, batch_size=8, device="cpu", lr=2e-3), tmp_path, progress=False,
                    objective=B())
    with pytest.warns(UserWarning, match="no validation slices: early stopping is off"):
        train_model(_model("ae"), x, None, TrainConfig(epochs=1, batch_size=8, device="cpu", early_stop_patience=2), tmp_path / "n",
                    progress=False, objective=B())


def test_fp16_loss_scaler_is_checkpointed(tmp_path, monkeypatch):
    "The fp16 path (GradScaler: scale, unscale before clipping, skip inf steps) on CPU, and its state across a resume."
    import uad_study.training as T
    monkeypatch.setattr(T, "amp_dtype", lambda amp, device: torch.float16)  # fp16 is CUDA-only in the config; CPU autocast can run it
    x = _data(n=24)
    cfg = TrainConfig(epochs=3, batch_size=8, device="cpu")
    full = _model("vae")
    T.train_model(full, x, x[:4], cfg, tmp_path / "full", progress=False, objective=B())
    ck = load_checkpoint(tmp_path / "full" / "last.pt")
    assert ck["scalers"]["model"]["scale"] < 65536.0  # the first steps overflowed: the scale was lowered, those steps skipped
    with pytest.raises(_Interrupt):
        T.train_model(_model("vae"), x, x[:4], cfg, tmp_path / "part", progress=False, objective=_Stopping(stop_at=8))
    resumed = _model("vae")
    T.train_model(resumed, x, x[:4], cfg, tmp_path / "part", progress=False, objective=B())
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()): assert torch.equal(a, b)
    assert load_checkpoint(tmp_path / "part" / "last.pt")["scalers"] == ck["scalers"]


def test_tensorboard_scalars_written(tmp_path, monkeypatch):
    "With tensorboard importable, every logged number goes to ckpt_dir/tb (a stand-in SummaryWriter records the calls)."
    import sys, types
    calls = []
    class Writer:
        def __init__(self, logdir): calls.append(("init", logdir))
        def add_scalar(self, tag, value, step): calls.append((tag, step))
        def flush(self): pass
        def close(self): calls.append(("close",))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    x = _data(n=16)
    train_model(_model("ae"), x, x[:4], TrainConfig(epochs=2, batch_size=8, device="cpu", tensorboard=True), tmp_path, progress=False,
                objective=B())
    assert calls[0] == ("init", str(tmp_path / "tb")) and calls[-1] == ("close",)
    assert {c for c in calls[1:-1]} == {(t, e) for e in (1, 2) for t in ("train_loss", "val_loss", "seconds", "lr", "train_recon")}


def _reference_loop(model, train, val, cfg):
    "The training loop as it was before issue 5 (commit c5b95c3), minus files and progress: the defaults must equal it bit for bit."
    from uad_study.models.baselines import model_loss
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    torch.manual_seed(cfg.seed); hist = []
    for epoch in range(cfg.epochs):
        model.train(); tot, seen = 0.0, 0
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        perm = torch.randperm(len(train), generator=g).numpy()
        for idx in [np.sort(perm[i:i + cfg.batch_size]) for i in range(0, len(train), cfg.batch_size)]:
            x = torch.from_numpy(np.array(train[idx], np.float32))[:, None]
            loss, _ = model_loss(model, x, model(x), cfg.recon, cfg.kl_weight)
            opt.zero_grad(set_to_none=True); loss.backward()
            if cfg.grad_clip: torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step(); tot += loss.item() * len(x); seen += len(x)
        rng = torch.get_rng_state(); model.eval(); vt, vn = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(val), cfg.batch_size):
                x = torch.from_numpy(np.array(val[i:i + cfg.batch_size], np.float32))[:, None]
                vt += model_loss(model, x, model(x), cfg.recon, cfg.kl_weight)[0].item() * len(x); vn += len(x)
        torch.set_rng_state(rng); hist.append((tot / seen, vt / vn))
    return hist


@pytest.mark.parametrize("name", ["ae", "vae"])
def test_baseline_objective_equals_the_pre_issue5_loop(tmp_path, name):
    "BaselineObjective through the engine (default optimiser and step) = the old loop with model_loss, bit for bit."
    x = _data(n=43)
    cfg = TrainConfig(epochs=2, batch_size=8, device="cpu", seed=5)
    a, b = _model(name), _model(name)
    h = train_model(a, x, x[:9], cfg, tmp_path, progress=False, objective=BaselineObjective(cfg.recon, cfg.kl_weight))
    ref = _reference_loop(b, x, x[:9], cfg)
    assert [(r["train_loss"], r["val_loss"]) for r in h] == ref
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()): assert torch.equal(p, q), k


def test_distributed_settings_without_a_process_group(monkeypatch):
    "torchrun's variables are read before any process group exists; a pinned GPU index is refused under torchrun."
    from uad_study.training import DistInfo, _restore_rng, dist_info, init_distributed
    monkeypatch.setenv("RANK", "3"); monkeypatch.setenv("WORLD_SIZE", "4"); monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_info() == DistInfo(3, 4, 1, False)
    with pytest.raises(UADInputError, match="cuda:LOCAL_RANK"):
        init_distributed("cuda:1")
    # a checkpoint of one process resumed by several: the random streams are re-seeded per process, with a warning
    ck = {"torch_rng": torch.get_rng_state()}
    with pytest.warns(UserWarning, match="re-seeded"):
        _restore_rng(ck, DistInfo(0, 2, 0, True), torch.device("cpu"), seed=0, epoch=1)
    a = torch.rand(1)
    _restore_rng(ck, DistInfo(1, 2, 1, False), torch.device("cpu"), seed=0, epoch=1)  # only process 0 warns
    assert not torch.equal(a, torch.rand(1))


def test_evaluate_loss_ignores_torchrun_variables_without_a_group(monkeypatch):
    from uad_study.training import evaluate_loss
    x, m, cfg = _data(n=12), _model("ae"), TrainConfig(batch_size=4, device="cpu")
    whole = evaluate_loss(m, x, cfg, "cpu", B())
    monkeypatch.setenv("RANK", "1"); monkeypatch.setenv("WORLD_SIZE", "2")
    assert evaluate_loss(m, x, cfg, "cpu", B()) == whole


# ---------------------------------------------------------------- two optimisers: a toy adversarial autoencoder

class TinyAdvAE(nn.Module):
    "A toy adversarial autoencoder for 16x16 slices: a generator (conv autoencoder, GroupNorm) and a discriminator."
    def __init__(self):
        super().__init__()
        self.gen = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.GroupNorm(2, 4), nn.LeakyReLU(0.2), nn.ConvTranspose2d(4, 1, 4, 2, 1))
        self.disc = nn.Sequential(nn.Conv2d(1, 4, 4, 4), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(64, 1))

    def forward(self, x, fake=None, adversarial=False):
        "Generator pass (with the discriminator's logit on the reconstruction if `adversarial`), or the discriminator on x and fake."
        if fake is not None: return {"d_real": self.disc(x), "d_fake": self.disc(fake)}
        out = {"recon": torch.sigmoid(self.gen(x))}
        if adversarial: out["d_fake"] = self.disc(out["recon"])
        return out


class AdvObjective(Objective):
    "Generator: L2 (+ 0.1 x non-saturating GAN loss once the discriminator runs); discriminator: own Adam at `d_lr`, from step `d_start`."
    ddp_kwargs = {"find_unused_parameters": True}  # the discriminator sits out the first steps, the generator every D step

    def __init__(self, d_start=2, d_lr=2e-2, noise=0.05, stop_at=None, crash=_Interrupt):
        self.d_start, self.d_lr, self.noise, self.stop_at, self.crash = d_start, d_lr, noise, stop_at, crash
        self.calls, self.d_steps = 0, 0  # d_steps is state: checkpointed, restored on resume

    def optimizers(self, model, cfg):
        return {"gen": torch.optim.Adam(model.gen.parameters(), lr=cfg.lr),
                "disc": torch.optim.Adam(model.disc.parameters(), lr=self.d_lr, betas=(0.5, 0.9))}

    def loss(self, model, batch):  # validation: the reconstruction error
        x = batch["image"]; rec = F.mse_loss(model(x)["recon"], x)
        return rec, {"recon": rec.detach()}

    def train_step(self, model, batch, step):
        self.calls += 1
        if self.stop_at is not None and self.calls > self.stop_at: raise self.crash
        x, adv = batch["image"], step.global_step >= self.d_start
        with step.autocast():
            xin = x + self.noise * torch.randn_like(x) if self.noise else x  # torch noise: a resume must restore the stream
            o = model(xin, adversarial=adv)
            rec = F.mse_loss(o["recon"], x)
            g = rec + 0.1 * F.softplus(-o["d_fake"]).mean() if adv else rec
        step.optimise("gen", g)
        out = {"loss": g, "recon": rec}
        if adv:
            with step.autocast():
                d = model(x, fake=o["recon"].detach())
                dl = F.softplus(-d["d_real"]).mean() + F.softplus(d["d_fake"]).mean()
            step.optimise("disc", dl)
            out["disc"] = dl; self.d_steps += 1
        return out

    def state_dict(self): return {"d_steps": self.d_steps}
    def load_state_dict(self, state): self.d_steps = state["d_steps"]


def _adv(seed=0):
    torch.manual_seed(seed); return TinyAdvAE()


ADV_CFG = dict(epochs=3, batch_size=8, device="cpu", lr=1e-2, schedule="cosine", warmup_epochs=0.5, min_lr=1e-4)


def test_two_optimisers_resume_bit_exact(tmp_path):
    "Generator and discriminator with their own Adam, rates and losses; the discriminator from step 4: crash, resume, same run."
    x = _data(n=21, s=16)  # batches of 8, 8, 5: 3 steps per epoch
    cfg = TrainConfig(**ADV_CFG)
    full, obj = _adv(), AdvObjective(d_start=4)
    h_full = train_model(full, x, x[:6], cfg, tmp_path / "full", progress=False, objective=obj)
    with pytest.raises(_Interrupt):  # dies in epoch 3's first step
        train_model(_adv(), x, x[:6], cfg, tmp_path / "part", progress=False, objective=AdvObjective(d_start=4, stop_at=6))
    assert load_checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 2
    torch.manual_seed(999)
    resumed, obj_res = _adv(), AdvObjective(d_start=4)
    h_res = train_model(resumed, x, x[:6], cfg, tmp_path / "part", progress=False, objective=obj_res)
    _same(full.state_dict(), resumed.state_dict(), "weights")
    ck_full, ck_res = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "part" / "last.pt")
    _same(ck_full["optimizers"], ck_res["optimizers"], "optimizers")
    assert sorted(ck_full["optimizers"]) == ["disc", "gen"]
    assert ck_full["objective"] == ck_res["objective"] == {"d_steps": 5} and obj_res.d_steps == 5  # steps 4..8
    assert _drop_seconds(h_full) == _drop_seconds(h_res)
    assert "train_disc" not in h_full[0] and "train_disc" in h_full[1]  # the discriminator starts in epoch 2
    for r in h_full:  # the schedule is a factor of each optimiser's own base rate
        assert r["lr_gen"] == pytest.approx(r["lr"]) and r["lr_disc"] == pytest.approx(r["lr"] * 2e-2 / 1e-2)


def test_delayed_discriminator_is_untouched_before_its_start(tmp_path):
    x = _data(n=21, s=16)
    m = _adv(); d0 = copy.deepcopy(m.disc.state_dict()); g0 = copy.deepcopy(m.gen.state_dict())
    train_model(m, x, None, TrainConfig(**{**ADV_CFG, "epochs": 1}), tmp_path, progress=False, objective=AdvObjective(d_start=3))
    _same(d0, m.disc.state_dict(), "discriminator")  # its gradients from generator steps were never stepped
    assert not all(torch.equal(a, b) for a, b in zip(g0.values(), m.gen.state_dict().values()))
    assert load_checkpoint(tmp_path / "last.pt")["optimizers"]["disc"]["state"] == {}


class _NaNSecond(Objective):
    "Two optimisers; the second one's loss is NaN at global step 0."
    def optimizers(self, model, cfg):
        return {"a": torch.optim.SGD(model[0].parameters(), lr=0.1), "b": torch.optim.SGD(model[1].parameters(), lr=0.1)}

    def train_step(self, model, batch, step):
        x = batch["image"].flatten(1)
        step.optimise("a", model(x).pow(2).mean())
        bad = model(x).mean() * (float("nan") if step.global_step == 0 else 1.0)
        step.optimise("b", bad)
        return {"loss": bad}


def test_nan_in_a_second_optimiser_stops_before_its_step(tmp_path):
    torch.manual_seed(0); m = nn.Sequential(nn.Linear(64, 4), nn.Linear(4, 1)); w1 = m[1].weight.clone()
    with pytest.raises(FloatingPointError, match=r"training loss became nan at epoch 1, step 1 \(optimiser 'b'"):
        train_model(m, _data(n=8, s=8), None, TrainConfig(epochs=1, batch_size=8, device="cpu"), tmp_path, progress=False,
                    objective=_NaNSecond())
    assert torch.equal(m[1].weight, w1)
    with pytest.raises(UADInputError, match="no optimiser of that name"):
        StepContext({}, {}, TrainConfig(), 0, 0, 1, torch.device("cpu")).optimise("gen", torch.tensor(1.0))


def test_fp16_two_optimisers_have_their_own_scalers(tmp_path, monkeypatch):
    import uad_study.training as T
    monkeypatch.setattr(T, "amp_dtype", lambda amp, device: torch.float16)
    x = _data(n=16, s=16)
    T.train_model(_adv(), x, None, TrainConfig(**{**ADV_CFG, "epochs": 1}), tmp_path, progress=False, objective=AdvObjective(d_start=0))
    sc = load_checkpoint(tmp_path / "last.pt")["scalers"]
    assert sorted(sc) == ["disc", "gen"] and all(s["scale"] > 0 for s in sc.values())


def test_old_single_optimizer_checkpoint(tmp_path):
    "A checkpoint of the single-optimiser engine resumes the default optimiser bit for bit; a two-optimiser objective refuses it."
    x = _data(n=24)
    cfg = TrainConfig(epochs=3, batch_size=8, device="cpu")
    full = _model("vae"); train_model(full, x, x[:8], cfg, tmp_path / "full", progress=False, objective=B())
    train_model(_model("vae"), x, x[:8], TrainConfig(epochs=2, batch_size=8, device="cpu"), tmp_path / "old", progress=False, objective=B())
    ck = load_checkpoint(tmp_path / "old" / "last.pt")
    ck["optimizer"] = ck.pop("optimizers")["model"]; del ck["scalers"], ck["objective"]  # the layout before issue 10
    torch.save(ck, tmp_path / "old" / "last.pt")
    resumed = _model("vae"); train_model(resumed, x, x[:8], cfg, tmp_path / "old", progress=False, objective=B())
    _same(full.state_dict(), resumed.state_dict(), "weights")
    x16 = _data(n=16, s=16)
    train_model(_adv(), x16, None, TrainConfig(**{**ADV_CFG, "epochs": 1}), tmp_path / "adv", progress=False, objective=AdvObjective())
    with pytest.raises(UADInputError, match=r"optimisers must be the objective's \['model'\] \(got \['disc', 'gen'\]\)"):
        train_model(_adv(), x16, None, TrainConfig(**ADV_CFG), tmp_path / "adv", progress=False, objective=B())
    ck = load_checkpoint(tmp_path / "adv" / "last.pt"); ck["optimizer"] = ck.pop("optimizers")["gen"]
    torch.save(ck, tmp_path / "adv" / "last.pt")
    with pytest.raises(UADInputError, match=r"single-optimiser engine .* \['disc', 'gen'\]: train afresh"):
        train_model(_adv(), x16, None, TrainConfig(**ADV_CFG), tmp_path / "adv", progress=False, objective=AdvObjective())


# ---------------------------------------------------------------- two stages: a code prior on a frozen first stage

class TinyCoder(nn.Module):
    "Stage 1, a toy VQ-style autoencoder: 4x4 codes out of K=6 (argmax of the encoder's logits, BatchNorm), decoded softly in training."
    def __init__(self, k=6):
        super().__init__()
        self.enc, self.dec = nn.Sequential(nn.Conv2d(1, k, 4, 4), nn.BatchNorm2d(k)), nn.ConvTranspose2d(k, 1, 4, 4)

    def forward(self, x): return {"recon": torch.sigmoid(self.dec(torch.softmax(self.enc(x), 1)))}

    @torch.no_grad()
    def codes(self, x): return self.enc(x).argmax(1)


class _Recon(Objective):
    def loss(self, model, batch):
        x = batch["image"]; rec = F.mse_loss(model(x)["recon"], x)
        return rec, {}


class CodePrior(nn.Module):
    "Stage 2: predicts masked codes from the visible ones (the shape of a masked-token transformer prior)."
    def __init__(self, k=6):
        super().__init__()
        self.k, self.emb = k, nn.Embedding(k + 1, 8)
        self.net = nn.Sequential(nn.Conv2d(8, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, k, 1))

    def forward(self, codes): return self.net(self.emb(codes).permute(0, 3, 1, 2))


class PriorObjective(Objective):
    "Cross-entropy of the prior on the frozen stage-1 model's codes (batch['codes'] if given, else computed here), half of them masked."
    def __init__(self, stage1, stop_at=None):
        self.stage1, self.stop_at, self.calls = stage1.eval().requires_grad_(False), stop_at, 0

    def codes(self, batch):
        if "codes" in batch: return batch["codes"]
        return self.stage1.to(batch["image"].device).codes(batch["image"])

    def loss(self, model, batch):
        codes = self.codes(batch)
        assert codes.dtype == torch.int64
        masked = torch.rand(codes.shape, device=codes.device) < 0.5
        ce = F.cross_entropy(model(codes.masked_fill(masked, getattr(model, "module", model).k)), codes)
        return ce, {"ce": ce.detach()}

    def train_step(self, model, batch, step):
        self.calls += 1
        if self.stop_at is not None and self.calls > self.stop_at: raise _Interrupt
        return super().train_step(model, batch, step)


def test_two_stage_resume_bit_exact_and_first_stage_frozen(tmp_path):
    x = _data(n=20, s=16)
    torch.manual_seed(0); s1 = TinyCoder()
    train_model(s1, x, None, TrainConfig(epochs=2, batch_size=8, device="cpu", lr=1e-2), tmp_path / "s1", progress=False, objective=_Recon())
    frozen = copy.deepcopy(s1.state_dict())
    codes = s1.codes(torch.from_numpy(x)[:, None]).numpy()
    assert codes.dtype == np.int64 and codes.shape == (20, 4, 4) and len(np.unique(codes)) > 1
    cfg = TrainConfig(epochs=3, batch_size=8, device="cpu", lr=1e-2)
    def prior():
        torch.manual_seed(1); return CodePrior()
    full = prior()
    h_full = train_model(full, x, x[:6], cfg, tmp_path / "full", progress=False, objective=PriorObjective(s1))
    with pytest.raises(_Interrupt):  # 3 steps per epoch: dies in epoch 2
        train_model(prior(), x, x[:6], cfg, tmp_path / "part", progress=False, objective=PriorObjective(s1, stop_at=4))
    resumed = prior(); torch.manual_seed(7)  # whatever the RNG state is now, resume restores the saved one
    h_res = train_model(resumed, x, x[:6], cfg, tmp_path / "part", progress=False, objective=PriorObjective(s1))
    _same(full.state_dict(), resumed.state_dict(), "prior weights")
    _same(load_checkpoint(tmp_path / "full" / "last.pt")["optimizers"], load_checkpoint(tmp_path / "part" / "last.pt")["optimizers"])
    assert _drop_seconds(h_full) == _drop_seconds(h_res) and h_full[-1]["train_ce"] < h_full[0]["train_ce"]
    # the codes given as int64 data instead of computed: the same run
    given = prior()
    train_model(given, {"image": x, "codes": codes}, {"image": x[:6], "codes": codes[:6]}, cfg, tmp_path / "given", progress=False,
                objective=PriorObjective(s1))
    _same(full.state_dict(), given.state_dict(), "prior trained on given codes")
    _same(frozen, s1.state_dict(), "stage 1")  # weights and BatchNorm statistics unchanged by stage 2
    assert not s1.training and not any(p.requires_grad for p in s1.parameters())


# ---------------------------------------------------------------- dict batches

class _Gen(nn.Module):
    def __init__(self):
        super().__init__(); self.conv = nn.Conv2d(1, 1, 3, 1, 1)
    def forward(self, x): return {"recon": self.conv(x)}


class _Recorder(Objective):
    "Records what each batch holds."
    def __init__(self): self.train, self.val = [], []

    def loss(self, model, batch):
        (self.train if model.training else self.val).append({k: v.clone() for k, v in batch.items()})
        x = batch["image"]; rec = F.mse_loss(model(x)["recon"], x)
        return rec, {}


def test_dict_batches(tmp_path):
    n = 10; x = _data(n=n, s=8); rng = np.random.default_rng(0)
    data = {"image": x, "mask": x > 0.3, "subject": np.arange(n, dtype=np.int32) + 100,
            "codes": rng.integers(0, 6, (n, 2, 2)), "age": np.linspace(20, 60, n)}
    obj = _Recorder()
    train_model(_Gen(), data, {k: v[:3] for k, v in data.items()}, TrainConfig(epochs=1, batch_size=4, device="cpu"), tmp_path,
                progress=False, objective=obj)
    assert [len(b["image"]) for b in obj.train] == [4, 4, 2] and [len(b["image"]) for b in obj.val] == [3]
    rows = torch.cat([b["subject"] for b in obj.train]) - 100
    assert sorted(rows.tolist()) == list(range(n))
    for b in obj.train + obj.val:
        r = (b["subject"] - 100).numpy()
        assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (1, 8, 8)
        assert b["mask"].dtype == torch.float32 and b["mask"].shape[1:] == (1, 8, 8)       # bool (N, H, W) -> float (B, 1, H, W)
        assert torch.equal(b["mask"][:, 0], torch.from_numpy(data["mask"][r]).float())
        assert b["subject"].dtype == torch.int64 and b["subject"].shape == (len(r),)        # integers keep their shape, as int64
        assert b["codes"].dtype == torch.int64 and torch.equal(b["codes"], torch.from_numpy(data["codes"][r]))
        assert b["age"].dtype == torch.float32 and b["age"].shape == (len(r),)
        assert torch.equal(b["image"][:, 0], torch.from_numpy(x[r]))
    with pytest.raises(UADInputError, match=r"train: every array must have the same first dimension N \(got \{'image': 10, 'mask': 9\}"):
        train_model(_Gen(), {"image": x, "mask": data["mask"][:9]}, None, TrainConfig(device="cpu"), tmp_path / "bad", objective=obj)
    with pytest.raises(UADInputError, match=r"val\['name'\] must be a numpy array of numbers or bools"):
        train_model(_Gen(), data, {"image": x, "name": np.array(["a"] * n)}, TrainConfig(device="cpu"), tmp_path / "bad", objective=obj)
    assert not (tmp_path / "bad").exists()  # refused before anything was written


# ---------------------------------------------------------------- validation batches of the objective's choosing (issue 11)

class _OwnValBatches(_Recorder):
    "Validation in batches that the objective chooses (here: the rows in reverse, in batches of 3, plus an empty one)."
    def val_batches(self, data, batch_size):
        rows = np.arange(len(data["image"]))[::-1]
        return [rows[:3], rows[3:6], np.array([], int), rows[6:]]


def test_val_batches_hook(tmp_path):
    "The engine validates in the objective's batches (skipping empty ones), weighting by rows; the default keeps the stored order."
    from uad_study.training import evaluate_loss
    n = 8; x = _data(n=n, s=8); data = {"image": x, "subject": np.arange(n, dtype=np.int64)}
    torch.manual_seed(0); m = _Gen()
    own, plain = _OwnValBatches(), _Recorder()
    v_own = evaluate_loss(m, data, TrainConfig(batch_size=5, device="cpu"), "cpu", own)
    v_plain = evaluate_loss(m, data, TrainConfig(batch_size=5, device="cpu"), "cpu", plain)
    assert [b["subject"].tolist() for b in own.val] == [[7, 6, 5], [4, 3, 2], [1, 0]]
    assert [b["subject"].tolist() for b in plain.val] == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert v_own == pytest.approx(v_plain, rel=1e-6)                           # per-sample losses: the same mean
    with torch.no_grad():
        per_row = [float(F.mse_loss(m(torch.from_numpy(x[i:i + 1])[:, None])["recon"], torch.from_numpy(x[i:i + 1])[:, None])) for i in range(n)]
    assert v_own == pytest.approx(np.mean(per_row), rel=1e-6)
    hist = train_model(_Gen(), data, data, TrainConfig(epochs=1, batch_size=4, device="cpu"), tmp_path, progress=False, objective=_OwnValBatches())
    assert np.isfinite(hist[0]["val_loss"])


# ---------------------------------------------------------------- the posterior-collapse warning (issue 11)

class _KLParts(Objective):
    "A toy objective that logs given KL values per epoch (part `name`), so the collapse check is driven exactly."
    def __init__(self, kls, name="kl", floor=0.01): self.kls, self.name, self.collapse_kl_floor = kls, name, floor

    def loss(self, model, batch):
        x = batch["image"]; return F.mse_loss(model(x)["recon"], x), {}

    def train_step(self, model, batch, step):
        out = super().train_step(model, batch, step)
        return {**out, self.name: self.kls[step.epoch]}


def _collapse_warnings(tmp_path, obj, epochs=4):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        train_model(_Gen(), _data(n=8, s=8), None, TrainConfig(epochs=epochs, batch_size=4, device="cpu"), tmp_path, progress=False,
                    name="toy", objective=obj)
    return [str(w.message) for w in rec if "posterior collapse" in str(w.message)]


def test_posterior_collapse_warning_once(tmp_path):
    msgs = _collapse_warnings(tmp_path / "a", _KLParts([1.0, 0.005, 0.001, 0.0]))
    assert msgs == ["toy: posterior collapse: KL per sample 0.005 below 0.01 at epoch 2 (train_kl): the decoder ignores the input; "
                    "balance the KL term (a KL weight below 1, the KL per pixel, or a KL warm-up)"]
    assert len(_collapse_warnings(tmp_path / "b", _KLParts([0.5, 0.2, 1e-3, 1e-4], name="kl_z"))) == 1   # any part named kl...
    assert "at epoch 3 (train_kl_z)" in _collapse_warnings(tmp_path / "c", _KLParts([0.5, 0.2, 1e-3, 1e-4], name="kl_z"))[0]
    assert _collapse_warnings(tmp_path / "d", _KLParts([1.0, 0.5, 0.2, 0.1])) == []                     # healthy
    assert _collapse_warnings(tmp_path / "e", _KLParts([0.0] * 4, floor=None)) == []                   # no floor: no check
    assert _collapse_warnings(tmp_path / "f", _KLParts([0.0] * 4, name="recon")) == []                 # not a KL part
