"""The model as a run calls it (fastddim/copies.py): copies and compiled modules freed with the
user's model, conditioning tensors in the run's dtype, the evidence-based memory format."""
import gc
import logging
import weakref

import pytest
import torch

import fastddim
from fastddim import copies, engine
from fastddim.kwargs import split_model_kwargs

SHAPE = (3, 8, 8)
SCHED = fastddim.Schedule.linear()


class ConvNet(torch.nn.Module):
    """The smallest conv model: eps = conv(x) (a 4-D weight, so channels_last needs a copy)."""

    def __init__(self):
        super().__init__()
        self.sample_shape, self.schedule = SHAPE, SCHED
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x)


def _freed(make_and_sample) -> bool:
    """Sample with a fresh model, delete it, collect: were it, the module the run called (a copy, a
    compiled module) and what that wraps all freed, and its cache entry with them?"""
    net = ConvNet()
    called = make_and_sample(net)
    assert called is not net
    refs = [weakref.ref(m) for m in (net, called, getattr(called, "_orig_mod", called))]
    del net, called
    gc.collect()
    return all(r() is None for r in refs) and len(copies._MODELS) == 0


# ------------------------------------------------------------------- the caches let go (item 2)
@pytest.mark.parametrize("kw", [dict(dtype=torch.bfloat16), dict(memory_format=torch.channels_last)])
def test_a_deleted_model_frees_its_copies(kw):
    fastddim.clear_cache()
    assert _freed(lambda net: engine.prepare(net, 2, 2, **kw).model)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])  # a compiled copy / the model
def test_a_deleted_model_frees_its_compiled_module(fmt):
    fastddim.clear_cache()

    def compiled_twice(net):
        run = engine.prepare(net, 2, 2, compile=True, memory_format=fmt)
        run.sample()
        # cached while the model lives: the same compiled module (graph.py keys its graphs on it)
        assert engine.prepare(net, 2, 2, compile=True, memory_format=fmt).model is run.model
        return run.model

    assert _freed(compiled_twice)


def test_a_compiled_shell_follows_the_models_weights():
    net = ConvNet()
    shell = copies._shell(net)
    assert shell is not net and shell.conv is net.conv
    with torch.no_grad():
        net.conv.weight.mul_(2)
        net.conv = torch.nn.Conv2d(3, 3, 1)  # a replaced submodule is seen too
    assert shell.conv is net.conv


# --------------------------------------------------------- conditioning in the run's dtype (item 3)
def tiny_cond_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.slow
def test_bf16_run_casts_fp32_conditioning_and_diffusers_stays_quiet(recwarn):
    net = tiny_cond_unet()
    ehs = torch.randn(3, 5, 8)  # fp32, one row per sample
    records = _Records()
    logging.getLogger("diffusers").addHandler(records)  # diffusers' loggers do not propagate to the root
    try:
        low = fastddim.sample(net, n=3, steps=3, schedule=SCHED, dtype=torch.bfloat16,
                              model_kwargs={"encoder_hidden_states": ehs}, progress=False)
    finally:
        logging.getLogger("diffusers").removeHandler(records)
    assert not [m for m in records.messages if "should be kept in float32" in m], records.messages
    assert not [w for w in recwarn if "float32" in str(w.message)]
    cast = fastddim.sample(net, n=3, steps=3, schedule=SCHED, dtype=torch.bfloat16,
                           model_kwargs={"encoder_hidden_states": ehs.bfloat16()}, progress=False)
    assert torch.equal(low, cast)  # exactly what casting them by hand gave
    assert ehs.dtype == torch.float32 and all(p.dtype == torch.float32 for p in net.parameters())


def test_floating_kwargs_follow_the_dtype_integers_do_not():
    kw = {"ehs": torch.randn(4, 2), "shared": torch.ones(1), "labels": torch.arange(4), "mask": torch.ones(4).bool(),
          "scale": 2.0}
    shared, per = split_model_kwargs(kw, 4, torch.device("cpu"), torch.bfloat16)
    assert per["ehs"].dtype == torch.bfloat16 and shared["shared"].dtype == torch.bfloat16
    assert per["labels"].dtype == torch.int64 and per["mask"].dtype == torch.bool and shared["scale"] == 2.0


# --------------------------------------------------------------- memory_format="auto" (item 5)
def _probe_says(monkeypatch, ms):
    calls = []
    monkeypatch.setattr(copies, "probe_ms", lambda *a: calls.append(a) or ms)
    return calls


@pytest.mark.parametrize("ms, want", [((10.0, 5.0), "channels_last"), ((10.0, 9.9), "contiguous_format")])
def test_auto_takes_the_probes_decision_once_per_batch_shape(monkeypatch, ms, want):
    calls = _probe_says(monkeypatch, ms)
    net = ConvNet()
    big = copies.PROBE_AMORTIZE * copies.PROBE_FORWARDS  # model calls a run needs to be probed
    fastddim.sample(net, n=2, steps=big, progress=False)
    last = fastddim.info()["last_run"]
    assert (last["memory_format"], last["memory_format_reason"], last["probe_ms"]) == (want, "probe", list(ms))
    assert (last["copy_bytes"] > 0) == (want == "channels_last")
    fastddim.sample(net, n=2, steps=2, progress=False)  # small, but the evidence exists
    assert fastddim.info()["last_run"]["memory_format_reason"] == "cached probe"
    fastddim.sample(net, n=3, steps=big, progress=False)  # another batch shape: probed again
    assert len(calls) == 2 and calls[1][2].shape == (3, *SHAPE)


def test_auto_without_evidence_keeps_the_model(monkeypatch):
    calls = _probe_says(monkeypatch, (10.0, 1.0))
    net = ConvNet()
    fastddim.sample(net, n=2, steps=2, progress=False)
    last = fastddim.info()["last_run"]
    assert (last["memory_format"], last["memory_format_reason"], last["copy_bytes"]) == (
        "contiguous_format", "run too small to probe", 0)
    fastddim.sample(net, n=2, steps=50, backend="torch", progress=False)
    assert fastddim.info()["last_run"]["memory_format_reason"] == "torch backend"
    fastddim.sample(net, n=2, steps=50, memory_format=torch.channels_last, progress=False)
    assert fastddim.info()["last_run"]["memory_format_reason"] == "given"
    assert calls == []


def test_probe_times_both_layouts_and_keeps_neither_copy_nor_rng():
    net = ConvNet()
    state = torch.get_rng_state()
    run = engine.prepare(net, 2, 2)
    x, t, kw = engine._probe_inputs(2, SHAPE, torch.float32, torch.device("cpu"), 999, run.shared_kwargs, None)
    ms = copies.probe_ms(net, torch.float32, x, t, kw)
    assert len(ms) == 2 and all(m > 0 for m in ms)
    assert torch.equal(torch.get_rng_state(), state)
    assert copies._MODELS[net].copies == {}  # the losing channels_last copy is not kept
    assert net.conv.weight.is_contiguous()


def test_memory_format_checked_before_any_model_call():
    net = ConvNet()
    with pytest.raises(ValueError, match="memory_format must be"):
        fastddim.sample(net, n=1, steps=2, memory_format="channels_last", progress=False)


def test_probe_of_a_doubled_guided_call_times_the_call_the_run_makes():
    """A guided run calls the model on 2b rows with [uncond; cond] kwargs: the probe times that."""
    kw, uncond = {"class_labels": torch.tensor([1, 2])}, {"class_labels": torch.tensor([9])}
    x, t, probe_kw = engine._probe_inputs(2, SHAPE, torch.float32, torch.device("cpu"), 999, kw, uncond)
    assert x.shape == (4, *SHAPE) and t.shape == (4,)
    assert probe_kw["class_labels"].tolist() == [9, 9, 1, 2]
