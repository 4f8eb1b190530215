"Training: determinism, resume equals an uninterrupted run, clear stop on NaN."
import numpy as np
import pytest
import torch

from uad_study.core import seed_everything
from uad_study.models.baselines import build_model
from uad_study.training import TrainConfig, load_checkpoint, train_model


def _data(n=48, s=32):
    rng = np.random.default_rng(1)
    x = np.zeros((n, s, s), np.float32)
    yy, xx = np.mgrid[:s, :s]
    for i in range(n):
        r = rng.uniform(6, 12)
        x[i] = (((yy - s / 2) ** 2 + (xx - s / 2) ** 2) < r * r) * rng.uniform(0.5, 1.0)
    return x


def _model(name):
    seed_everything(0)
    return build_model(name, in_size=32, channels=(8, 16, 32), latent_dim=8)


@pytest.mark.parametrize("name", ["ae", "vae"])
def test_resume_matches_uninterrupted(tmp_path, name):
    x = _data()
    full = _model(name)
    train_model(full, x, x[:8], TrainConfig(epochs=3, batch_size=8, device="cpu"), tmp_path / "full", progress=False)
    part = _model(name)
    train_model(part, x, x[:8], TrainConfig(epochs=2, batch_size=8, device="cpu"), tmp_path / "part", progress=False)
    del part  # the "interruption": a new process would start from the checkpoint only
    torch.manual_seed(12345)  # whatever the RNG state is now, resume restores the saved one
    resumed = _model(name)
    hist = train_model(resumed, x, x[:8], TrainConfig(epochs=3, batch_size=8, device="cpu"), tmp_path / "part", progress=False)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name}: parameter {k} differs after resume"
    assert load_checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 3


def test_same_seed_same_weights_and_different_seed_differs(tmp_path):
    x = _data()
    a, b, c = _model("vae"), _model("vae"), _model("vae")
    train_model(a, x, None, TrainConfig(epochs=1, batch_size=8, device="cpu", seed=0), tmp_path / "a", progress=False)
    train_model(b, x, None, TrainConfig(epochs=1, batch_size=8, device="cpu", seed=0), tmp_path / "b", progress=False)
    train_model(c, x, None, TrainConfig(epochs=1, batch_size=8, device="cpu", seed=1), tmp_path / "c", progress=False)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


def test_training_reduces_loss(tmp_path):
    x = _data()
    m = _model("ae")
    h = train_model(m, x, x[:8], TrainConfig(epochs=6, batch_size=8, device="cpu", lr=3e-3), tmp_path, progress=False)
    assert h[-1]["train_loss"] < 0.5 * h[0]["train_loss"]


def test_nan_loss_stops_with_message(tmp_path):
    x = _data(); x[3, 0, 0] = np.inf
    with pytest.raises(FloatingPointError, match=r"training loss became .* at epoch 1"):
        train_model(_model("ae"), x, None, TrainConfig(epochs=1, batch_size=48, device="cpu"), tmp_path, progress=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="last.pt: unreadable checkpoint"):
        train_model(_model("ae"), _data(), None, TrainConfig(epochs=1, device="cpu"), tmp_path, progress=False)


class _Interrupt(Exception):
    pass


def _noisy(calls=None, stop_at=None):
    "A denoising objective drawing torch noise; raises after `stop_at` calls (a simulated crash mid-epoch)."
    n = [0]
    def objective(model, x):
        n[0] += 1
        if stop_at is not None and n[0] > stop_at: raise _Interrupt
        if calls is not None: calls.append(len(x))
        out = model(x + 0.05 * torch.randn_like(x))
        loss = ((out["recon"] - x) ** 2).mean()
        return loss, {"mse": loss.detach(), "loss": loss.detach()}  # a part named "loss" does not replace train_loss
    return objective


@pytest.mark.parametrize("name", ["ae", "vae"])
def test_resume_after_crash_with_schedule_and_early_stopping(tmp_path, name):
    "Cosine schedule + warm-up + early stopping + a noisy objective: a crash mid-epoch, then resume, gives the uninterrupted weights."
    x = _data()
    cfg = TrainConfig(epochs=4, batch_size=8, device="cpu", schedule="cosine", warmup_epochs=0.5, min_lr=1e-5,
                      early_stop_patience=3, early_stop_min_delta=0.0)
    full = _model(name)
    h_full = train_model(full, x, x[:8], cfg, tmp_path / "full", progress=False, objective=_noisy())
    crashed = _model(name)
    with pytest.raises(_Interrupt):  # 6 steps per epoch: dies in the middle of epoch 3
        train_model(crashed, x, x[:8], cfg, tmp_path / "part", progress=False, objective=_noisy(stop_at=15))
    assert load_checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 2
    torch.manual_seed(999)
    resumed = _model(name)
    h_res = train_model(resumed, x, x[:8], cfg, tmp_path / "part", progress=False, objective=_noisy())
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name}: parameter {k} differs after resume"
    drop = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    assert drop(h_full) == drop(h_res)
    assert h_full[-1]["lr"] < 1e-4 and "train_mse" in h_full[0]
    assert (tmp_path / "full" / "best.pt").exists()


def test_early_stop_resumed_stops_where_uninterrupted_does(tmp_path):
    x = _data()
    cfg = TrainConfig(epochs=6, batch_size=8, device="cpu", early_stop_patience=2, early_stop_min_delta=10.0)
    full = _model("ae")
    h = train_model(full, x, x[:8], cfg, tmp_path / "full", progress=False)
    assert [r["epoch"] for r in h] == [1, 2, 3]  # epoch 1 sets the best; 2 and 3 do not improve by 10
    ck = load_checkpoint(tmp_path / "full" / "last.pt")
    assert ck["early_stop"]["stopped"] and ck["early_stop"]["best_epoch"] == 1
    best = load_checkpoint(tmp_path / "full" / "best.pt")
    for a, b in zip(best["model"].values(), full.state_dict().values()): assert torch.equal(a, b)
    part = _model("ae")
    with pytest.raises(_Interrupt):
        train_model(part, x, x[:8], cfg, tmp_path / "part", progress=False, objective=_wrap_default(cfg, stop_at=8))
    resumed = _model("ae")
    h2 = train_model(resumed, x, x[:8], cfg, tmp_path / "part", progress=False)
    assert [r["epoch"] for r in h2] == [1, 2, 3]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()): assert torch.equal(a, b)


def _wrap_default(cfg, stop_at):
    from uad_study.training import default_objective
    f, n = default_objective(cfg), [0]
    def objective(model, x):
        n[0] += 1
        if n[0] > stop_at: raise _Interrupt
        return f(model, x)
    return objective


def test_explicit_default_objective_is_bit_identical(tmp_path):
    from uad_study.training import default_objective
    x = _data()
    cfg = TrainConfig(epochs=2, batch_size=8, device="cpu")
    a, b = _model("vae"), _model("vae")
    train_model(a, x, x[:8], cfg, tmp_path / "a", progress=False)
    train_model(b, x, x[:8], cfg, tmp_path / "b", progress=False, objective=default_objective(cfg))
    for p, q in zip(a.state_dict().values(), b.state_dict().values()): assert torch.equal(p, q)


def test_drop_last_keeps_batches_full(tmp_path):
    x = _data(n=43)
    seen = []
    h = train_model(_model("ae"), x, None, TrainConfig(epochs=2, batch_size=8, device="cpu", drop_last=True), tmp_path,
                    progress=False, objective=_noisy(calls=seen))
    assert seen == [8] * 10 and len(h) == 2
    from uad_study.core import UADInputError
    with pytest.raises(UADInputError, match="leaves no batch"):
        train_model(_model("ae"), x[:5], None, TrainConfig(epochs=1, batch_size=8, device="cpu", drop_last=True), tmp_path / "e")


def test_bf16_autocast_on_cpu_trains(tmp_path):
    x = _data()
    h = train_model(_model("vae"), x, x[:8], TrainConfig(epochs=2, batch_size=16, device="cpu", amp="bf16", lr=3e-3), tmp_path,
                    progress=False)
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in h)
    from uad_study.core import UADInputError
    with pytest.raises(UADInputError, match="needs a CUDA device"):
        train_model(_model("ae"), x, None, TrainConfig(epochs=1, device="cpu", amp="fp16"), tmp_path / "fp16", progress=False)


def test_step_schedule_is_logged(tmp_path):
    x = _data()
    h = train_model(_model("ae"), x, None, TrainConfig(epochs=3, batch_size=16, device="cpu", lr=1e-2, schedule="step",
                                                      step_size=1, gamma=0.5), tmp_path, progress=False)
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
        train_model(_model("ae"), x, x[:4], cfg, tmp_path, progress=False)
        assert any((tmp_path / "tb").iterdir())
    else:
        with pytest.warns(UserWarning, match="TensorBoard cannot be imported"):
            train_model(_model("ae"), x, x[:4], cfg, tmp_path, progress=False)
        assert (tmp_path / "train_log.csv").exists() and not (tmp_path / "tb").exists()


def test_bad_config_is_a_clear_error():
    from uad_study.core import UADInputError
    with pytest.raises(UADInputError, match="amp must be one of"): TrainConfig(amp="half")
    with pytest.raises(UADInputError, match="early_stop_patience must be"): TrainConfig(early_stop_patience=0)


def test_resume_with_changed_settings_warns(tmp_path):
    x = _data(n=16)
    train_model(_model("ae"), x, None, TrainConfig(epochs=1, batch_size=8, device="cpu"), tmp_path, progress=False)
    with pytest.warns(UserWarning, match=r"lr: 0.001 -> 0.002"):
        train_model(_model("ae"), x, None, TrainConfig(epochs=2, batch_size=8, device="cpu", lr=2e-3), tmp_path, progress=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # more epochs of a constant schedule: no warning
        train_model(_model("ae"), x, None, TrainConfig(epochs=3, batch_size=8, device="cpu", lr=2e-3), tmp_path, progress=False)
    with pytest.warns(UserWarning, match="no validation slices: early stopping is off"):
        train_model(_model("ae"), x, None, TrainConfig(epochs=1, batch_size=8, device="cpu", early_stop_patience=2), tmp_path / "n",
                    progress=False)


def test_fp16_loss_scaler_is_checkpointed(tmp_path, monkeypatch):
    "The fp16 path (GradScaler: scale, unscale before clipping, skip inf steps) on CPU, and its state across a resume."
    import uad_study.training as T
    monkeypatch.setattr(T, "amp_dtype", lambda amp, device: torch.float16)  # fp16 is CUDA-only in the config; CPU autocast can run it
    x = _data(n=24)
    cfg = TrainConfig(epochs=3, batch_size=8, device="cpu")
    full = _model("vae")
    T.train_model(full, x, x[:4], cfg, tmp_path / "full", progress=False)
    ck = load_checkpoint(tmp_path / "full" / "last.pt")
    assert ck["scaler"]["scale"] < 65536.0  # the first steps overflowed: the scale was lowered, those steps skipped
    with pytest.raises(_Interrupt):
        T.train_model(_model("vae"), x, x[:4], cfg, tmp_path / "part", progress=False, objective=_wrap_default(cfg, stop_at=8))
    resumed = _model("vae")
    T.train_model(resumed, x, x[:4], cfg, tmp_path / "part", progress=False)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()): assert torch.equal(a, b)
    assert load_checkpoint(tmp_path / "part" / "last.pt")["scaler"] == ck["scaler"]


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
    train_model(_model("ae"), x, x[:4], TrainConfig(epochs=2, batch_size=8, device="cpu", tensorboard=True), tmp_path, progress=False)
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
def test_defaults_equal_the_pre_issue5_loop(tmp_path, name):
    x = _data(n=43)
    cfg = TrainConfig(epochs=2, batch_size=8, device="cpu", seed=5)
    a, b = _model(name), _model(name)
    h = train_model(a, x, x[:9], cfg, tmp_path, progress=False)
    ref = _reference_loop(b, x, x[:9], cfg)
    assert [(r["train_loss"], r["val_loss"]) for r in h] == ref
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()): assert torch.equal(p, q), k


def test_distributed_settings_without_a_process_group(monkeypatch):
    "torchrun's variables are read before any process group exists; a pinned GPU index is refused under torchrun."
    from uad_study.core import UADInputError
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
    whole = evaluate_loss(m, x, cfg, "cpu")
    monkeypatch.setenv("RANK", "1"); monkeypatch.setenv("WORLD_SIZE", "2")
    assert evaluate_loss(m, x, cfg, "cpu") == whole
