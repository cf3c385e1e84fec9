"""benchmarks/inversion_steps.py (the Table 2 notes' step-by-step error): it follows the same Euler
path as fastddim.invert (checked inside), and its miss is the decoder's, measured independently."""
import pytest
import torch

import fastddim
from fastddim.paper.measure import heldout_subset


@pytest.fixture(scope="module")
def inv(benchmark_script):
    return benchmark_script("inversion_steps")


def test_step_misses_are_the_decoders_misses(inv):
    torch.set_num_threads(1)
    model = fastddim.pretrained("mnist")
    x0 = heldout_subset(10)
    rows = inv.step_misses(model, x0, 2)  # uniform S = 2: clean -> t 0 -> t 500
    assert [(r["t_eval"], r["t_dst"]) for r in rows] == [(0, 0), (0, 500)]
    assert set(rows[1]["miss_mse"]) == {"all", *map(str, range(10))}
    # the second step by hand: the Euler point at t = 500, then the decoder's eta = 0 step back to t = 0
    a0 = model.schedule.alphas_cumprod[0]
    x_0 = fastddim.invert(model, x0, 1, spacing=[0])  # clean -> t = 0, the path's first point
    x_1 = fastddim.invert(model, x0, 2, spacing="uniform")
    back = fastddim.sample(model, x_T=x_1, steps=1, spacing=[500], set_alpha_to_one=False, progress=False)
    decoder_miss = ((back - x_0) / a0.sqrt()).square().flatten(1).mean(1)  # in clean-image units
    assert rows[1]["miss_mse"]["all"] == pytest.approx(float(decoder_miss.mean()), rel=1e-3)
    assert rows[1]["miss_mse"]["3"] == pytest.approx(float(decoder_miss[3]), rel=1e-3)
    assert rows[0]["miss_mse"]["all"] < 1e-3 * rows[1]["miss_mse"]["all"]
