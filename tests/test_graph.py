"""The CUDA-graph layer (fastddim/graph.py).

CPU: graph= argument checks, what info() reports, and the cache's logic (strict/auto, cached
failures, count and memory bounds, shared pools, letting go of a deleted model) with a stand-in
for the CUDA graph. GPU (strict mode, asserting a graph was captured and replayed): graph ==
eager for both fused backends (DDIM and DPM-Solver++(2M)), thresholding, per-sample model_kwargs, a new seed, partial batches,
compile + graph, no host sync, capture failure, a deleted model's graph freed."""
import gc
import warnings
import weakref
from types import SimpleNamespace

import pytest
import torch

import fastddim
from fastddim import engine, graph, sampler

gpu = pytest.mark.gpu

SHAPE = (3, 16, 16)
SCHED = fastddim.Schedule.linear()


class ConvModel(torch.nn.Module):
    """A small conv eps-model whose rows do not interact (batch invariant up to kernel choice)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.sample_shape, self.schedule = SHAPE, SCHED
        self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.b = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x, t):
        h = torch.nn.functional.silu(self.a(x) + (t.to(x.dtype) / 1000).view(-1, 1, 1, 1))
        return self.b(h)


class ClassModel(ConvModel):
    """ConvModel plus a learned per-class bias: the output depends on each row's label."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 3)

    def forward(self, x, t, y):
        return super().forward(x, t) + self.emb(y).view(-1, 3, 1, 1)


class Tiny(torch.nn.Module):
    """A CPU stand-in model for the cache logic (no convolution: no channels_last copy)."""

    def __init__(self):
        super().__init__()
        self.sample_shape, self.schedule = (4,), SCHED
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, t):
        return self.lin(x)


# ------------------------------------------------------------------------ CPU: argument checks
@pytest.mark.parametrize("bad", ["yes", "True", 1, 0, None, "AUTO"])
def test_graph_argument_is_checked_before_the_model_runs(bad):
    calls = []
    with pytest.raises(ValueError, match=r"graph must be 'auto', True or False"):
        fastddim.sample(lambda x, t: calls.append(1) or x, n=1, steps=2, shape=(4,), schedule=SCHED, graph=bad)
    assert not calls


@pytest.mark.parametrize("kw,match", [
    (dict(), "needs a CUDA device, not cpu"),
    (dict(backend="torch"), "needs a fused backend"),
])
def test_graph_true_is_refused_where_it_cannot_capture(kw, match):
    with pytest.raises(ValueError, match=match):
        fastddim.sample(Tiny(), n=1, steps=2, graph=True, **kw)


def test_auto_on_the_cpu_runs_eagerly_and_says_so():
    fastddim.sample(Tiny(), n=3, steps=2)
    last = fastddim.info()["last_run"]
    assert last["graph"] is False and last["graph_replays"] == 0


# ------------------------------------------------- CPU: the cache's logic, with a stand-in graph
class FakeGraph:
    """graph._Graph's interface without CUDA: counts captures and replays, fails when told to.

    Like the real one it lets go of the run (and so of the model) once captured."""

    fail: Exception | None = None
    bytes_each = 0
    made: list = []

    def __init__(self, run):
        self.run, self.device, self.shape = run, run.device, run.shape
        self.bytes, self.replays, self.pool_given = 0, 0, "unset"
        FakeGraph.made.append(weakref.ref(self))

    def warm_up(self):
        pass

    def capture(self, pool):
        if FakeGraph.fail is not None:
            raise FakeGraph.fail
        self.pool_given, self.bytes = pool, FakeGraph.bytes_each
        self.run = SimpleNamespace(compile_seconds=0.0)  # no model held, as graph._Graph after capture

    def pool(self):
        return ("pool", id(self))

    def replay(self, x, b, first_index, kwargs, uncond, seed):
        self.replays += 1
        return torch.zeros((b, *self.shape))


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(graph, "_Graph", FakeGraph)
    monkeypatch.setattr(FakeGraph, "fail", None)
    monkeypatch.setattr(FakeGraph, "bytes_each", 0)
    monkeypatch.setattr(FakeGraph, "made", [])
    fastddim.clear_cache()
    yield FakeGraph
    fastddim.clear_cache()


def cpu_run(model, steps=2, n=5, batch_size=2):
    return engine.prepare(model, n, steps, batch_size=batch_size, device="cpu")


def test_strict_capture_replays_every_batch_and_info_says_so(fake, monkeypatch):
    monkeypatch.setattr(sampler, "_use_graph", lambda graph, run, callback: graph)  # pretend CUDA
    m = Tiny()
    fastddim.sample(m, n=5, steps=2, batch_size=2, graph=True)
    last = fastddim.info()["last_run"]
    assert last["graph"] is True and last["graph_replays"] == 3  # batches of 2, 2, 1 (padded)
    (g,) = graph._CACHE.values()
    assert g.replays == 3


def test_strict_capture_failure_raises_with_the_cause(fake):
    fake.fail = RuntimeError("operation not permitted when stream is capturing")
    run = cpu_run(Tiny())
    with pytest.raises(graph.CaptureError, match="graph=True.*operation not permitted") as err:
        run.sample(graph=True)
    assert err.value.__cause__ is fake.fail
    assert not graph._CACHE and not graph._MODELS  # nothing left behind by a strict failure


def test_auto_capture_failure_warns_runs_eagerly_and_is_cached(fake, monkeypatch):
    monkeypatch.setattr(sampler, "_use_graph", lambda graph, run, callback: graph)
    fake.fail = RuntimeError("cudaErrorStreamCaptureUnsupported")
    m = Tiny()
    eager = fastddim.sample(m, n=3, steps=2, graph=False)
    with pytest.warns(RuntimeWarning, match="capture failed, running eagerly.*StreamCaptureUnsupported"):
        out = fastddim.sample(m, n=3, steps=2, graph="auto")
    assert torch.equal(out, eager)
    assert fastddim.info()["last_run"]["graph"] is False  # asked for, not replayed
    assert len(fake.made) == 1
    with pytest.warns(RuntimeWarning, match="capture failed"):  # the cached failure: no second warm-up
        fastddim.sample(m, n=3, steps=2, graph="auto")
    assert len(fake.made) == 1
    with pytest.raises(graph.CaptureError, match="cached from an earlier attempt"):
        fastddim.sample(m, n=3, steps=2, graph=True)


def test_cache_is_bounded_by_count(fake):
    m = Tiny()
    for s in range(graph.MAX_GRAPHS + 2):
        cpu_run(m, steps=2 + s).sample(graph=True)
    assert len(graph._CACHE) == graph.MAX_GRAPHS
    assert [k[4] for k in graph._CACHE][0] == tuple(cpu_run(m, steps=4).plan.timesteps)  # the oldest two went


def test_cache_is_bounded_by_memory_and_keeps_the_newest(fake, monkeypatch):
    monkeypatch.setattr(graph, "MAX_GRAPH_BYTES", 250)
    fake.bytes_each = 100
    m = Tiny()
    runs = [cpu_run(m, steps=s) for s in (2, 3, 4)]
    for r in runs:
        r.sample(graph=True)
    assert len(graph._CACHE) == 2  # 300 > 250 bytes: the least recently used went
    runs[1].sample(graph=True)  # a hit makes it the most recent
    cpu_run(m, steps=5).sample(graph=True)
    assert [len(k[4]) for k in graph._CACHE] == [3, 5]
    fake.bytes_each = 1000  # bigger than the budget alone: kept all the same (it was just captured)
    cpu_run(m, steps=6).sample(graph=True)
    assert [len(k[4]) for k in graph._CACHE] == [6]


def test_graphs_of_one_model_share_one_pool(fake):
    m1, m2 = Tiny(), Tiny()
    cpu_run(m1, steps=2).sample(graph=True)
    cpu_run(m1, steps=3).sample(graph=True)
    cpu_run(m2, steps=2).sample(graph=True)
    g1, g2, g3 = graph._CACHE.values()
    assert g1.pool_given is None and g2.pool_given == g1.pool()  # the model's first graph's pool
    assert g3.pool_given is None  # another model: a pool of its own


def test_a_deleted_model_lets_go_of_its_graphs(fake):
    m, other = Tiny(), Tiny()
    cpu_run(m).sample(graph=True)
    cpu_run(other).sample(graph=True)
    ref, g = weakref.ref(m), fake.made[0]
    assert len(graph._CACHE) == 2
    del m
    gc.collect()
    assert ref() is None and g() is None  # the model and its graph are gone
    assert len(graph._CACHE) == 1 and list(graph._MODELS) == [id(other)]


def test_a_model_that_dies_while_the_cache_is_walked_is_dropped_after(fake):
    m = Tiny()
    cpu_run(m).sample(graph=True)
    mid = id(m)
    graph._WALKING[0] = True
    try:
        del m
        gc.collect()
        assert any(k[0] == mid for k in graph._CACHE)  # not while walking
    finally:
        graph._WALKING[0] = False
    graph._forget_dead()
    assert not graph._CACHE


# ------------------------------------------------------------------------------------ GPU
@pytest.fixture
def model():
    torch.backends.cudnn.allow_tf32 = False  # tight parity: no TF32 convolutions (FACTS.md section 6)
    torch.backends.cuda.matmul.allow_tf32 = False
    fastddim.clear_cache()
    return ConvModel().cuda().eval()


def strict(m, **kw):
    """sample with graph=True; asserts that a captured graph (a real CUDAGraph) served every batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = fastddim.sample(m, graph=True, progress=False, **kw)
    last = fastddim.info()["last_run"]
    n = kw.get("n", out.shape[0])
    assert last["graph"] is True and last["graph_replays"] == -(-n // last["batch_size"])
    graphs = [g for g in graph._CACHE.values() if isinstance(g, graph._Graph)]
    assert graphs and all(isinstance(g.graph, torch.cuda.CUDAGraph) for g in graphs)
    assert sum(g.replays for g in graphs) >= last["graph_replays"]
    return out


def eager(m, **kw):
    out = fastddim.sample(m, graph=False, progress=False, **kw)
    assert fastddim.info()["last_run"]["graph"] is False
    return out


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_graph_equals_eager(model, eta, backend):
    kw = dict(n=8, steps=6, eta=eta, batch_size=8, seed=3, backend=backend)
    assert torch.equal(strict(model, **kw), eager(model, **kw))
    assert fastddim.info()["last_run"]["backend"] == backend


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("extra", [dict(), dict(use_karras_sigmas=True), dict(thresholding=True, sample_max_value=1.5)])
def test_dpm_solver_graph_equals_eager(model, backend, extra):
    """DPM-Solver++(2M): each step's x0 (the next one's x0_prev) is made and read inside the graph."""
    kw = dict(n=10, steps=10, batch_size=4, seed=5, backend=backend, solver="dpm++2m", **extra)
    assert torch.equal(strict(model, **kw), eager(model, **kw))
    assert fastddim.info()["last_run"]["solver"] == "dpm++2m"


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_dpm_solver_graph_within_1e4_of_the_torch_reference(model, backend):
    kw = dict(n=4, steps=10, seed=1, solver="dpm++2m")
    got, want = strict(model, backend=backend, **kw), eager(model, backend="torch", **kw)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-4, f"{backend}: relative error {err:.3g}"


@gpu
def test_default_on_cuda_is_the_graph(model):
    fastddim.sample(model, n=4, steps=3, progress=False)
    assert fastddim.info()["last_run"]["graph"] is True


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_graph_with_thresholding_equals_eager(model, backend):
    kw = dict(n=8, steps=6, eta=1.0, batch_size=8, seed=5, backend=backend, thresholding=True,
              dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    assert torch.equal(strict(model, **kw), eager(model, **kw))


@gpu
def test_graph_with_per_sample_model_kwargs(model):
    m = ClassModel().cuda().eval()
    y = (torch.arange(13) % 10).cuda()  # one label per sample, 2 batches of 8 (the last padded)
    kw = dict(n=13, steps=5, eta=1.0, batch_size=8, seed=6)
    g = strict(m, model_kwargs={"y": y}, **kw)
    e = eager(m, model_kwargs={"y": y}, **kw)
    assert torch.equal(g[:8], e[:8])
    torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    shifted = strict(m, model_kwargs={"y": (y + 1) % 10}, **kw)  # same graph, other rows copied in
    assert len(graph._CACHE) == 1
    assert torch.equal(shifted[:8], eager(m, model_kwargs={"y": (y + 1) % 10}, **kw)[:8])
    assert not torch.allclose(shifted, g)  # the labels reach the model


@gpu
def test_replay_with_a_new_seed_is_right_and_batch_invariant(model):
    kw = dict(n=8, steps=6, eta=1.0, batch_size=8)
    strict(model, seed=1, **kw)  # captures
    replayed = strict(model, seed=2, **kw)
    assert len(graph._CACHE) == 1  # one capture served both seeds
    assert torch.equal(replayed, eager(model, seed=2, **kw))
    # sample 5 alone (first_index=5) in a batch of its own equals row 5
    alone = eager(model, n=1, steps=6, eta=1.0, seed=2, first_index=5)
    torch.testing.assert_close(replayed[5:6], alone, atol=1e-5, rtol=1e-5)


@gpu
def test_partial_batch_is_padded_not_recaptured(model):
    kw = dict(steps=5, eta=1.0, batch_size=8, seed=4)
    g = strict(model, n=13, **kw)
    assert len(graph._CACHE) == 1
    e = eager(model, n=13, **kw)
    torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    assert torch.equal(g[:8], e[:8])


@gpu
def test_x_T_given(model):
    x_T = torch.randn(6, *SHAPE, device="cuda")
    kw = dict(steps=4, batch_size=4)
    assert torch.equal(strict(model, x_T=x_T, **kw), eager(model, x_T=x_T, **kw))


@gpu
def test_compile_plus_graph_within_bf16_tolerance(model):
    kw = dict(n=8, steps=6, eta=0.0, batch_size=8)
    ref = eager(model, **kw)
    fast = strict(model, compile="max-autotune-no-cudagraphs", dtype=torch.bfloat16, **kw)
    torch.testing.assert_close(fast, ref, atol=5e-2, rtol=5e-2)


@gpu
@pytest.mark.parametrize("how", [dict(eta=1.0), dict(solver="dpm++2m")])
def test_no_host_sync_in_the_loop(model, how):
    run = engine.prepare(model, 16, 8, batch_size=8, check_finite=False, **how)
    run.sample(graph=True)  # capture (and its warm-up) happen here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run.sample(graph=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (16, *SHAPE) and run.graph_replays == 4


class Syncing(ConvModel):
    def forward(self, x, t):
        if float(x.abs().max()) > 1e9:  # a host sync: illegal inside capture
            raise RuntimeError("unreachable")
        return super().forward(x, t)


@gpu
def test_capture_failure_raises_in_strict_mode(model):
    with pytest.raises(graph.CaptureError, match="capture failed") as err:
        fastddim.sample(Syncing().cuda().eval(), n=4, steps=3, graph=True, progress=False)
    assert err.value.__cause__ is not None


@gpu
def test_capture_failure_falls_back_with_a_warning_in_auto_mode(model):
    m = Syncing().cuda().eval()
    with pytest.warns(RuntimeWarning, match="capture failed"):
        out = fastddim.sample(m, n=4, steps=3, graph="auto", progress=False)
    assert fastddim.info()["last_run"]["graph"] is False
    assert torch.equal(out, eager(m, n=4, steps=3))


@gpu
def test_a_model_error_raises_as_without_a_graph(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "capture failed" warning: the error is the model's
        with pytest.raises(ValueError, match="model output has shape"):
            fastddim.sample(lambda x, t: x[:, :1], n=2, steps=3, shape=SHAPE, schedule=SCHED, device="cuda",
                            graph=True, progress=False)


@gpu
def test_cache_is_bounded_and_clearable(model):
    for s in range(graph.MAX_GRAPHS + 2):
        strict(model, n=2, steps=2 + s)
    assert len(graph._CACHE) == graph.MAX_GRAPHS
    fastddim.clear_cache()
    assert len(graph._CACHE) == 0


@gpu
def test_graphs_sharing_a_pool_replay_right_in_any_order(model):
    a, b = dict(n=8, steps=4, eta=1.0, batch_size=8, seed=7), dict(n=8, steps=6, eta=1.0, batch_size=8, seed=8)
    strict(model, **a)
    strict(model, **b)
    g1, g2 = graph._CACHE.values()
    assert g1.pool() == g2.pool()
    # b's capture may reuse a's temporaries: replaying a then b then a must still be right
    assert torch.equal(strict(model, **a), eager(model, **a))
    assert torch.equal(strict(model, **b), eager(model, **b))
    assert torch.equal(strict(model, **a), eager(model, **a))


@gpu
def test_a_deleted_model_frees_its_graph():
    fastddim.clear_cache()
    m = ConvModel().cuda().eval()
    strict(m, n=8, steps=4, batch_size=8)
    (g,) = graph._CACHE.values()
    ref, gref = weakref.ref(m), weakref.ref(g)
    del m, g
    gc.collect()
    assert ref() is None and gref() is None
    assert not graph._CACHE and not graph._MODELS


@gpu
def test_sample_end_to_end_on_cuda_with_the_cli(tmp_path):
    from fastddim import cli

    out = tmp_path / "s.npz"
    assert cli.main(["sample", "-n", "8", "--steps", "5", "--device", "cuda", "-o", str(out)]) == 0
    assert out.exists()
