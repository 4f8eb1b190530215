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
