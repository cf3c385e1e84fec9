"""The DDPM U-Net: shapes, presets, timestep dtypes, batch invariance, config round trip."""
import json

import pytest
import torch

from fastddim.models import PRESETS, UNet, UNetConfig
from fastddim.schedule import Schedule

SMALL = [
    UNetConfig(in_channels=1, out_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), groups=4, resolution=16),
    UNetConfig(in_channels=3, out_channels=3, ch=8, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(4, 8), groups=4, resolution=16),
    UNetConfig(in_channels=3, out_channels=6, ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), groups=8, resolution=8),
]


def _randomized(cfg, seed=0):
    """A model with every weight random: the zero-initialised output convs would make any
    freshly built U-Net return exactly 0, which hides shape and batch mixing bugs."""
    torch.manual_seed(seed)
    m = UNet(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


@pytest.mark.parametrize("cfg", SMALL, ids=lambda c: f"ch{c.ch}x{len(c.ch_mult)}r{c.resolution}")
def test_output_shape(cfg):
    m = _randomized(cfg)
    x = torch.randn(3, cfg.in_channels, cfg.resolution, cfg.resolution)
    out = m(x, torch.tensor([0, 500, 999]))
    assert out.shape == (3, cfg.out_channels, cfg.resolution, cfg.resolution)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert m.sample_shape == (cfg.in_channels, cfg.resolution, cfg.resolution)


def test_cifar10_preset_is_the_ddpm_model():
    m = UNet("cifar10")
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - 35.7e6) < 0.1e6, n
    assert m.sample_shape == (3, 32, 32)
    assert m.schedule == Schedule.linear()


def test_mnist_preset_shape():
    m = UNet("mnist")
    assert m.sample_shape == (1, 32, 32)
    assert sum(p.numel() for p in m.parameters()) < 2e6  # must stay trainable on a CPU


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32])
def test_timestep_dtypes_agree(dtype):
    m = _randomized(SMALL[0])
    x = torch.randn(2, 1, 16, 16)
    ref = m(x, torch.tensor([3, 700], dtype=torch.int64))
    torch.testing.assert_close(m(x, torch.tensor([3, 700], dtype=dtype)), ref)


def test_scalar_timestep_broadcasts():
    m = _randomized(SMALL[0])
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(m(x, torch.tensor(250)), m(x, torch.tensor([250, 250])))


def test_timestep_matters():
    m = _randomized(SMALL[0])
    x = torch.randn(1, 1, 16, 16)
    assert not torch.allclose(m(x, torch.tensor([10])), m(x, torch.tensor([900])))


@pytest.mark.parametrize("cfg", SMALL[:2], ids=["attn8", "attn4-8"])
def test_batch_invariance_eval(cfg):
    m = _randomized(cfg)
    x = torch.randn(5, cfg.in_channels, cfg.resolution, cfg.resolution)
    t = torch.tensor([1, 250, 500, 750, 999])
    with torch.no_grad():
        full, part = m(x, t)[:2], m(x[:2], t[:2])
    torch.testing.assert_close(full, part, atol=1e-5, rtol=1e-4)


def test_dropout_only_in_train_mode():
    cfg = UNetConfig(**{**SMALL[0].to_dict(), "dropout": 0.5})
    m = _randomized(cfg)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 5])
    assert torch.equal(m(x, t), m(x, t))
    m.train()
    assert not torch.equal(m(x, t), m(x, t))


def test_config_json_round_trip():
    for cfg in [*SMALL, *PRESETS.values()]:
        assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_bad_configs():
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(resolution=30)
    with pytest.raises(ValueError, match="groups"):
        UNetConfig(ch=12)
    with pytest.raises(ValueError, match="unknown UNetConfig keys"):
        UNetConfig.from_dict({"chanels": 3})
    with pytest.raises(ValueError, match="known"):
        UNet("imagenet")


def test_v_head_returns_eps():
    """head='v': eps = sqrt(1 - a_t) x_t + sqrt(a_t) F(x_t, t), with the training schedule's a_t."""
    cfg = UNetConfig(**{**SMALL[0].to_dict(), "head": "v"})
    m = UNet(cfg, schedule=Schedule.linear(T=1000))
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 500, 999])
    a = m.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    # A fresh body outputs F = 0 (zero-initialised conv_out), leaving only the skip term.
    torch.testing.assert_close(m(x, t), (1 - a).sqrt() * x)
    with torch.no_grad():
        m.conv_out.bias.fill_(0.5)
    torch.testing.assert_close(m(x, t), (1 - a).sqrt() * x + a.sqrt() * 0.5)
    torch.testing.assert_close(m(x, t.float()), m(x, t))
    with pytest.raises(ValueError, match="head"):
        UNetConfig(head="x0")
    with pytest.raises(ValueError, match="out_channels"):
        UNet(UNetConfig(**{**cfg.to_dict(), "out_channels": 2}))
