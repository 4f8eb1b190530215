"The model protocol: every model passes check_model unchanged; broken models are refused with what is wrong; blocks keep their sizes."
import pytest
import torch
import torch.nn as nn

from uad_study.core import UADInputError
from uad_study.models.base import ConvBlock, UADModel, check_model, down_block, up_block
from uad_study.models.baselines import DenseAE, DenseVAE
from uad_study.models.dae import UNet, UNetConfig
from uad_study.models.trivae import TriVAE, TriVAEConfig

MODELS = {
    "ae": lambda: DenseAE(in_size=32, channels=(8, 16), latent_dim=4),
    "vae": lambda: DenseVAE(in_size=32, channels=(8, 16), latent_dim=4),
    "trivae": lambda: TriVAE(TriVAEConfig(in_size=32, channels=(4, 4, 8, 8, 8), embed_dim=8, latent_dim=4)),
    "unet": lambda: UNet(UNetConfig(in_size=32, depth=3, width=4)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_models_pass_and_are_left_unchanged(name):
    torch.manual_seed(0)
    m = MODELS[name]().train()
    x = torch.rand(2, 1, 32, 32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.random.get_rng_state()
    got = check_model(m, x)
    assert isinstance(m, UADModel) and got["recon"] == (2, 1, 32, 32) and "recon" in got["outputs"]
    assert m.training and torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())   # batch-norm statistics untouched


class _Toy(nn.Module):
    def __init__(self, out):
        super().__init__(); self.conv = nn.Conv2d(1, 1, 1); self.out = out
    def forward(self, x): return self.out(torch.sigmoid(self.conv(x)))
    def reconstruct(self, x): return self.forward(x)["recon"]


@pytest.mark.parametrize("out,msg", [
    (lambda r: r, "must return a dict"),
    (lambda r: {"image": r}, "returned no 'recon'"),
    (lambda r: {"recon": r[:, :, :-1]}, "input's shape"),
    (lambda r: {"recon": r - 1}, r"must lie in \[0.0, 1.0\]"),
    (lambda r: {"recon": r / 0 - r / 0}, "must be finite"),
])
def test_broken_models_are_refused(out, msg):
    with pytest.raises(UADInputError, match=msg): check_model(_Toy(out), torch.rand(2, 1, 8, 8))


def test_missing_reconstruct_and_random_reconstruct():
    class NoRec(nn.Module):
        def forward(self, x): return {"recon": x}
    with pytest.raises(UADInputError, match=r"NoRec lacks \['reconstruct'\]"): check_model(NoRec(), torch.rand(1, 1, 4, 4))
    class Noisy(_Toy):
        def reconstruct(self, x): return torch.rand_like(x)
    with pytest.raises(UADInputError, match="deterministic"): check_model(Noisy(lambda r: {"recon": r}), torch.rand(1, 1, 4, 4))


def test_block_parameter_counts():
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(ConvBlock(1, 8)) == 1 * 8 * 9 + 8 * 8 * 9 + 2 * 2 * 8
    assert n(down_block(8, 16, "batch")) == 8 * 16 * 16 + 2 * 16
    assert n(up_block(16, 8)) == 16 * 8 * 9 + 2 * 8 and n(up_block(16, 8, upsample="transposed")) == 16 * 8 * 16 + 2 * 8
