"""The CUDA-graph layer (fastddim/graph.py): graph == eager, replay with a new seed, partial
batches, compile + graph, no host sync in the loop. GPU only: skipped without CUDA."""
import pytest
import torch

import fastddim
from fastddim import engine, graph

pytestmark = pytest.mark.gpu

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


@pytest.fixture
def model():
    torch.backends.cudnn.allow_tf32 = False  # tight parity: no TF32 convolutions (FACTS.md section 6)
    torch.backends.cuda.matmul.allow_tf32 = False
    fastddim.clear_cache()
    return ConvModel().cuda().eval()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_graph_equals_eager(model, eta):
    kw = dict(n=8, steps=6, eta=eta, batch_size=8, seed=3, progress=False)
    eager = fastddim.sample(model, graph=False, **kw)
    g = fastddim.sample(model, graph=True, **kw)
    assert fastddim.info()["last_run"]["graph"] is True
    assert torch.equal(g, eager)


def test_replay_with_a_new_seed_is_right_and_batch_invariant(model):
    kw = dict(n=8, steps=6, eta=1.0, batch_size=8, progress=False)
    fastddim.sample(model, seed=1, graph=True, **kw)  # captures
    replayed = fastddim.sample(model, seed=2, graph=True, **kw)
    assert len(graph._CACHE) == 1  # one capture served both seeds
    assert torch.equal(replayed, fastddim.sample(model, seed=2, graph=False, **kw))
    # sample 5 alone (first_index=5) in a batch of its own equals row 5
    alone = fastddim.sample(model, n=1, steps=6, eta=1.0, seed=2, first_index=5, graph=False, progress=False)
    torch.testing.assert_close(replayed[5:6], alone, atol=1e-5, rtol=1e-5)


def test_partial_batch_is_padded_not_recaptured(model):
    kw = dict(steps=5, eta=1.0, batch_size=8, seed=4, progress=False)
    g = fastddim.sample(model, n=13, graph=True, **kw)
    assert len(graph._CACHE) == 1
    eager = fastddim.sample(model, n=13, graph=False, **kw)
    torch.testing.assert_close(g, eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(g[:8], eager[:8])


def test_x_T_given_and_kwargs_copied_per_replay(model):
    x_T = torch.randn(6, *SHAPE, device="cuda")
    kw = dict(steps=4, batch_size=4, progress=False)
    assert torch.equal(fastddim.sample(model, x_T=x_T, graph=True, **kw), fastddim.sample(model, x_T=x_T, graph=False, **kw))


def test_compile_plus_graph_within_bf16_tolerance(model):
    kw = dict(n=8, steps=6, eta=0.0, batch_size=8, progress=False)
    ref = fastddim.sample(model, graph=False, **kw)
    fast = fastddim.sample(model, graph=True, compile="max-autotune-no-cudagraphs", dtype=torch.bfloat16, **kw)
    torch.testing.assert_close(fast, ref, atol=5e-2, rtol=5e-2)


def test_no_host_sync_in_the_loop(model):
    run = engine.prepare(model, 16, 8, eta=1.0, batch_size=8, check_finite=False)
    run.sample(graph=True)  # capture (and its warm-up) happen here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run.sample(graph=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (16, *SHAPE)


def test_capture_failure_falls_back_with_a_warning(model):
    class Syncing(ConvModel):
        def forward(self, x, t):
            if float(x.abs().max()) > 1e9:  # a host sync: illegal inside capture
                raise RuntimeError("unreachable")
            return super().forward(x, t)

    m = Syncing().cuda().eval()
    with pytest.warns(RuntimeWarning, match="capture failed"):
        out = fastddim.sample(m, n=4, steps=3, graph=True, progress=False)
    assert torch.equal(out, fastddim.sample(m, n=4, steps=3, graph=False, progress=False))


def test_a_model_error_raises_as_without_a_graph(model):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "capture failed" warning: the error is the model's
        with pytest.raises(ValueError, match="model output has shape"):
            fastddim.sample(lambda x, t: x[:, :1], n=2, steps=3, shape=SHAPE, schedule=SCHED, device="cuda",
                            graph=True, progress=False)


def test_cache_is_bounded_and_clearable(model):
    for s in range(graph.MAX_GRAPHS + 2):
        fastddim.sample(model, n=2, steps=2 + s, graph=True, progress=False)
    assert len(graph._CACHE) == graph.MAX_GRAPHS
    fastddim.clear_cache()
    assert len(graph._CACHE) == 0


def test_sample_end_to_end_on_cuda_with_the_cli(tmp_path):
    from fastddim import cli

    out = tmp_path / "s.npz"
    assert cli.main(["sample", "-n", "8", "--steps", "5", "--device", "cuda", "-o", str(out)]) == 0
    assert out.exists()
