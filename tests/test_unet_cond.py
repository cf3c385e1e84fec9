"""The built-in U-Net's class conditioning: config and weights of unconditional models unchanged,
emb = temb + class_emb(y) with a null label, the label checks, and what the CLI reads from it."""
import argparse
import json

import pytest
import torch

from fastddim.models import PRESETS, UNet, UNetConfig
from test_unet import _randomized  # every weight random (tests/ is on sys.path: pytest's rootdir insertion)

COND = UNetConfig(in_channels=1, out_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                  groups=4, resolution=16, num_classes=3)


def test_config_default_is_unconditional_and_old_configs_load():
    assert UNetConfig().num_classes == 0 and PRESETS["mnist"].num_classes == 0
    old = {k: v for k, v in PRESETS["mnist"].to_dict().items() if k != "num_classes"}  # a config saved before
    assert UNetConfig.from_dict(old) == PRESETS["mnist"]
    for cfg in (COND, PRESETS["mnist-cond"]):
        assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in (-1, 2.0, True, "10"):
        with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
            UNetConfig(num_classes=bad)


def test_mnist_cond_preset_is_mnist_with_ten_classes():
    assert PRESETS["mnist-cond"] == UNetConfig(**{**PRESETS["mnist"].to_dict(), "num_classes": 10})
    m, base = UNet("mnist-cond"), UNet("mnist")
    assert (m.num_classes, m.null_class_label) == (10, 10)
    extra = sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in base.parameters())
    assert extra == 11 * m.temb_ch  # only the class embedding: 10 digits and the null label


def test_unconditional_weights_are_unchanged():
    """No new parameter in an unconditional model: the packaged weights load strictly."""
    from fastddim.pretrained import _WEIGHTS_DIR, load_checkpoint

    m = UNet("mnist")
    assert m.num_classes == 0 and m.null_class_label is None
    assert not any(k.startswith("class_emb") for k in m.state_dict())
    ck = load_checkpoint(_WEIGHTS_DIR / "mnist.safetensors")
    assert ck.config == PRESETS["mnist"]
    m.load_state_dict(ck.ema)  # strict


def test_class_embedding_is_added_to_the_time_embedding():
    """emb = temb + class_emb(y): with label y's row zeroed the model is the unconditional one."""
    cond = _randomized(COND)
    uncond = UNet(UNetConfig(**{**COND.to_dict(), "num_classes": 0})).eval()
    uncond.load_state_dict({k: v for k, v in cond.state_dict().items() if not k.startswith("class_emb")})
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 990])
    with torch.no_grad():
        cond.class_emb.weight[1] = 0
        torch.testing.assert_close(cond(x, t, class_labels=torch.tensor([1, 1, 1])), uncond(x, t))
        assert not torch.allclose(cond(x, t, class_labels=torch.tensor([0, 0, 0])), uncond(x, t))


def test_labels_none_scalar_and_per_row():
    m = _randomized(COND)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 990])
    with torch.no_grad():
        out = {y: m(x, t, class_labels=torch.full((3,), y)) for y in range(4)}
        assert m.null_class_label == 3
        assert torch.equal(m(x, t), out[3])  # None is the null label
        assert torch.equal(m(x, t, class_labels=torch.tensor(2)), out[2])  # a 0-dim label for the whole batch
        mixed = m(x, t, class_labels=torch.tensor([0, 1, 2], dtype=torch.int32))
        for i in range(3):  # each row gets its own label
            torch.testing.assert_close(mixed[i], out[i][i], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(out[0], out[1])


def test_bad_labels_are_refused():
    m = _randomized(COND)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 20])
    with pytest.raises(TypeError, match="class_labels must be an integer tensor, got torch.float32"):
        m(x, t, class_labels=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="class_labels must be an integer tensor, got list"):
        m(x, t, class_labels=[1, 2])
    with pytest.raises(ValueError, match=r"class_labels must have shape \(2,\)"):
        m(x, t, class_labels=torch.tensor([1, 2, 0]))
    with pytest.raises(IndexError):  # beyond the null label: the embedding refuses it
        m(x, t, class_labels=torch.tensor([4, 0]))
    with pytest.raises(ValueError, match="class_labels: this U-Net is unconditional"):
        _randomized(UNetConfig(**{**COND.to_dict(), "num_classes": 0}))(x, t, class_labels=torch.tensor([0, 1]))


def test_cli_reads_the_classes_from_the_model():
    from fastddim.cli.common import CliError, check_labels, model_classes

    cond, uncond = UNet("mnist-cond"), UNet("mnist")
    assert model_classes(cond) == 10 and model_classes(uncond) is False

    def args(label=None, classes=None):
        return argparse.Namespace(class_label=label, classes=classes)

    check_labels(cond, args(9))
    check_labels(cond, args(classes=10))
    with pytest.raises(CliError, match=r"--class-label 10: the model has 10 classes, labels 0..9"):
        check_labels(cond, args(10))  # the null label is not a class to ask for
    with pytest.raises(CliError, match="the model is unconditional"):
        check_labels(uncond, args(3))


def test_pretrained_mnist_cond_draws_the_digit_asked_for():
    """The packaged conditional model (docs/training.md): conditioned on digit k, the project's
    MNIST classifier reads k. At w = 1 (no guidance) and S = 10 it read 97.0% of 1,000 samples
    (2026-12-02); 90% of 100 here leaves room for seeds, not for a broken model or label path."""
    import fastddim
    from fastddim import metrics
    from fastddim.pretrained import pretrained

    m = pretrained("mnist-cond")
    assert (m.num_classes, m.null_class_label, m.config) == (10, 10, PRESETS["mnist-cond"])
    labels = torch.arange(100) % 10
    x = fastddim.sample(m, n=100, steps=10, seed=1, model_kwargs={"class_labels": labels}, progress=False)
    acc = (metrics.predict(x) == labels).float().mean().item()
    assert acc >= 0.9, f"the classifier read the requested digit in {acc:.0%} of the samples"


def test_packaged_model_without_its_weights_is_a_clear_error(monkeypatch):
    import importlib

    pre = importlib.import_module("fastddim.pretrained")  # the module (fastddim.pretrained is the function)
    monkeypatch.setitem(pre.KNOWN, "mnist-cond", "missing.safetensors")
    with pytest.raises(ValueError, match=r"'mnist-cond' has no weights .*fastddim train --model mnist-cond"):
        pre.pretrained("mnist-cond")
