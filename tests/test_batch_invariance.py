"""What "results do not depend on batch_size" means exactly: the noise and the step are
batch-invariant on every backend; the model's own arithmetic is the model's (README)."""
import pytest
import torch

import fastddim
from fastddim.dispatch import available_backends

SHAPE = (2, 4, 4)  # small: the Triton kernel runs interpreted on the CPU
SCHED = fastddim.Schedule.linear()


def rowwise(x, t):
    """A model whose forward is batch-invariant (each row alone, elementwise)."""
    return 0.1 * x + 1e-4 * t.view(-1, 1, 1, 1).to(x.dtype)


CPU_BACKENDS = [b for b, why in available_backends(torch.device("cpu")).items() if why is None]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_samples_do_not_depend_on_the_batch_they_are_drawn_in(backend, eta):
    kw = dict(steps=4, eta=eta, shape=SHAPE, schedule=SCHED, backend=backend, progress=False)
    alone = fastddim.sample(rowwise, n=3, first_index=2, **kw)
    in_one = fastddim.sample(rowwise, n=8, batch_size=8, **kw)[2:5]
    in_many = fastddim.sample(rowwise, n=8, batch_size=3, **kw)[2:5]  # 2..4 split across 2 batches
    assert torch.equal(alone, in_one) and torch.equal(alone, in_many)
