"""The sampling engine: prepared runs, static buffers, per-sample model_kwargs, learned variance,
default batching, the model as called (low precision, channels_last, torch.compile)."""
import pytest
import torch

import fastddim
from fastddim import engine
from fastddim.models.unet import UNet, UNetConfig

SHAPE = (3, 8, 8)
SCHED = fastddim.Schedule.linear()


class CondModel(torch.nn.Module):
    """A class-conditional toy model: eps = 0.1 x + 0.01 * label (per row)."""

    def __init__(self):
        super().__init__()
        self.sample_shape, self.schedule = SHAPE, SCHED
        self.batches = []

    def forward(self, x, t, class_labels=None, scale=None):
        self.batches.append(x.shape[0])
        if class_labels is not None and class_labels.shape[0] != x.shape[0]:
            raise RuntimeError(f"size of tensor a ({x.shape[0]}) must match ({class_labels.shape[0]})")
        out = 0.1 * x
        if class_labels is not None:
            out = out + 0.01 * class_labels.to(x.dtype).view(-1, 1, 1, 1)
        if scale is not None:
            out = out * scale.view(-1, 1, 1, 1)
        return out


def tiny_unet(head: str = "eps") -> UNet:
    cfg = UNetConfig(in_channels=3, out_channels=3, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                     dropout=0.0, resolution=8, groups=8, head=head)
    torch.manual_seed(0)
    net = UNet(cfg, SCHED).eval()
    with torch.no_grad():  # DDPM zero-initialises the output conv: give every weight a say
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net


# ------------------------------------------------------------------------ per-sample model_kwargs
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_per_sample_kwargs_are_sliced_per_batch(eta):
    labels = torch.arange(16) % 10
    m = CondModel()
    got = fastddim.sample(m, n=16, steps=4, eta=eta, batch_size=4, model_kwargs={"class_labels": labels}, progress=False)
    assert set(m.batches) == {4}
    whole = fastddim.sample(m, n=16, steps=4, eta=eta, batch_size=16, model_kwargs={"class_labels": labels}, progress=False)
    assert torch.equal(got, whole)
    one = fastddim.sample(m, n=1, steps=4, eta=eta, first_index=7, model_kwargs={"class_labels": labels[7:8]},
                          progress=False)
    assert torch.equal(got[7:8], one)


def test_shared_kwargs_pass_as_given():
    m = CondModel()
    scale = torch.full((1,), 2.0)
    a = fastddim.sample(m, n=6, steps=3, batch_size=4, model_kwargs={"scale": scale}, progress=False)
    b = fastddim.sample(m, n=6, steps=3, batch_size=4, model_kwargs={"scale": scale.expand(6)}, progress=False)
    assert torch.equal(a, b)


def test_kwargs_with_a_wrong_leading_dimension_refused_before_any_call():
    m = CondModel()
    with pytest.raises(ValueError, match=r"model_kwargs\['class_labels'\] has leading dimension 5"):
        fastddim.sample(m, n=16, steps=3, batch_size=4, model_kwargs={"class_labels": torch.zeros(5)}, progress=False)
    assert m.batches == []


def test_prepared_run_samples_a_subrange_of_its_kwargs():
    labels = torch.arange(12)
    m = CondModel()
    run = engine.prepare(m, 12, 4, model_kwargs={"class_labels": labels}, batch_size=5)
    full = run.sample()
    assert torch.equal(run.sample(4, first_index=6), full[6:10])
    with pytest.raises(ValueError, match="outside"):
        run.sample(4, first_index=10)


# ------------------------------------------------------------------------------ learned variance
def test_learned_variance_takes_the_eps_half():
    m = CondModel()

    def two_c(x, t):
        return torch.cat([m(x, t), torch.full_like(x, 123.0)], dim=1)

    kw = dict(n=3, steps=4, shape=SHAPE, schedule=SCHED, progress=False)
    assert torch.equal(fastddim.sample(two_c, learned_variance=True, **kw), fastddim.sample(m, **kw))
    with pytest.raises(ValueError, match="learned_variance=True"):
        fastddim.sample(two_c, **kw)
    with pytest.raises(ValueError, match="2C channels"):
        fastddim.sample(m, learned_variance=True, **kw)


# ------------------------------------------------------------------------------ default batching
def test_default_batch_is_bounded_and_invisible():
    m = CondModel()
    x = fastddim.sample(m, n=1100, steps=2, progress=False)
    assert max(m.batches) == engine.CPU_BATCH * 16  # 3x8x8 samples: 16 times 3x32x32's batch
    assert torch.equal(x, fastddim.sample(m, n=1100, steps=2, batch_size=1100, progress=False))
    assert fastddim.info()["last_run"]["batch_size"] == 1100
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert engine.default_batch_size(cpu, 10, (3, 32, 32)) == 10
    assert engine.default_batch_size(cpu, 10**6, (1, 32, 32)) == 192  # same bytes, fewer channels
    assert engine.default_batch_size(cuda, 10**6, (3, 32, 32)) == 1024
    assert engine.default_batch_size(cuda, 10**6, (3, 256, 256)) == 16
    assert engine.default_batch_size(cpu, 10**6, (3, 512, 512)) == 1


# -------------------------------------------------------------------------- static device buffers
def test_rng_buffer_is_updated_in_place_not_recreated():
    run = engine.prepare(CondModel(), 10, 3, eta=1.0, batch_size=4)
    ptr = run.step.rng.data_ptr()
    x = run.sample()
    assert run.step.rng.data_ptr() == ptr and int(run.step.rng[1]) == 8  # the last batch's first index
    assert torch.equal(x, fastddim.sample(CondModel(), n=10, steps=3, eta=1.0, batch_size=10, progress=False))


def test_x_T_comes_from_the_backends_kernel_and_matches_the_reference():
    run = engine.prepare(CondModel(), 4, 3)
    ref = fastddim.noise.normal(0, 3, 4, 0, SHAPE)
    torch.testing.assert_close(run.x_T(4, 3), ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ the model as it is called
def test_bf16_with_fp32_weights_just_works_and_leaves_the_module_alone():
    net = tiny_unet()
    x = fastddim.sample(net, n=4, steps=5, dtype=torch.bfloat16, progress=False)
    ref = fastddim.sample(net, n=4, steps=5, progress=False)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert x.dtype == torch.float32
    # bf16 has 8 mantissa bits: ~4e-3 relative per op; after 5 steps the samples agree to a few 1e-2.
    torch.testing.assert_close(x, ref, atol=5e-2, rtol=5e-2)


def test_channels_last_copy_leaves_the_module_alone():  # "auto" and its probe: tests/test_copies.py
    net = tiny_unet()
    x = fastddim.sample(net, n=4, steps=5, memory_format=torch.channels_last, progress=False)
    assert fastddim.info()["last_run"]["memory_format"] == "channels_last"
    assert all(p.is_contiguous() for p in net.parameters())
    plain = fastddim.sample(net, n=4, steps=5, memory_format=torch.contiguous_format, progress=False)
    torch.testing.assert_close(x, plain, atol=1e-5, rtol=1e-5)  # fp32 sums reordered, nothing more
    fastddim.sample(net, n=4, steps=5, backend="torch", progress=False)
    assert fastddim.info()["last_run"]["memory_format"] == "contiguous_format"  # the bit-exact path keeps it


def test_cached_copy_follows_weight_updates():
    net = tiny_unet()
    kw = dict(n=2, steps=3, dtype=torch.bfloat16, progress=False)
    before = fastddim.sample(net, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    after = fastddim.sample(net, **kw)
    fresh = tiny_unet()
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(1.5)
    assert not torch.equal(before, after)
    assert torch.equal(after, fastddim.sample(fresh, **kw))


def test_compile_modes_checked():
    with pytest.raises(ValueError, match="compile must be"):
        fastddim.sample(CondModel(), n=1, steps=2, compile="fast")
    with pytest.raises(ValueError, match="CUDA graphs of its own"):
        engine._check_compile("reduce-overhead", torch.device("cuda", 0))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        fastddim.sample(CondModel(), n=1, steps=2, graph=True)


@pytest.mark.slow
def test_compiled_equals_eager_and_does_not_recompile():
    from torch._dynamo.utils import counters

    net = tiny_unet()
    cases = [dict(eta=0.0), dict(eta=1.0), dict(eta=1.0, thresholding=True, dynamic_thresholding_ratio=0.9),
             dict(eta=0.0, prediction_type="v_prediction"), dict(eta=1.0, prediction_type="v_prediction")]
    for kw in cases:  # one compiled model serves every plan: the plan is the step's, not the model's
        kw = dict(n=5, steps=4, batch_size=4, progress=False, **kw)
        eager = fastddim.sample(net, **kw)
        compiled = fastddim.sample(net, compile=True, **kw)
        assert fastddim.info()["last_run"]["compile"] == "default"
        torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    stats = dict(counters["stats"])
    fastddim.sample(net, compile=True, n=5, steps=4, batch_size=4, progress=False)
    assert dict(counters["stats"]) == stats  # no new compilation on a second call
    low = fastddim.sample(net, compile=True, dtype=torch.bfloat16, n=5, steps=4, batch_size=4, progress=False)
    torch.testing.assert_close(low, fastddim.sample(net, n=5, steps=4, progress=False), atol=5e-2, rtol=5e-2)


def test_v_prediction_model_through_the_engine_matches_reference_backend():
    net = tiny_unet()
    kw = dict(n=3, steps=4, prediction_type="v_prediction", memory_format=torch.contiguous_format, progress=False)
    torch.testing.assert_close(fastddim.sample(net, **kw), fastddim.sample(net, backend="torch", **kw), atol=1e-5,
                               rtol=1e-5)


def test_generate_prepares_once_per_job(tmp_path, monkeypatch):
    from fastddim import generate as gen

    calls = []
    real = gen.prepare
    monkeypatch.setattr(gen, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    labels_model = CondModel()
    manifest = gen.generate(labels_model, 10, 3, str(tmp_path / "run"), shard_size=4, batch_size=3, classes=3,
                            progress=False, log=lambda s: None)
    assert len(calls) == 1 and manifest["num_shards"] == 3
    assert set(labels_model.batches) <= {3, 1, 2} and max(labels_model.batches) == 3  # a batch never spans shards


def test_plans_are_cached_per_schedule_and_options():
    s = fastddim.Schedule.linear()
    a = engine.plan_for(s, 10, 0.0, "uniform", {})
    assert engine.plan_for(s, 10, 0.0, "uniform", {}) is a
    assert engine.plan_for(s, 10, 1.0, "uniform", {}) is not a
    assert engine.plan_for(s, 10, 0.0, "uniform", {"clip_sample": True}).clip_sample
    assert engine.plan_for(s, 3, 0.0, [900, 500, 0], {}).timesteps == (900, 500, 0)
    with torch.no_grad():
        s.alphas_cumprod.mul_(1.0)  # changed in place: the cached plan is not reused
    assert engine.plan_for(s, 10, 0.0, "uniform", {}) is not a


def test_a_module_built_under_inference_mode_samples():
    with torch.inference_mode():
        net = tiny_unet()
    x = fastddim.sample(net, n=2, steps=3, dtype=torch.bfloat16, progress=False)
    assert x.shape == (2, *SHAPE)
