"""Dynamic thresholding's quantile (dispatch.row_quantile): torch.quantile's numbers bit for bit,
and traceable by torch.compile(fullgraph=True) (torch.quantile is not on torch 2.11, CPU)."""
import math
import random

import numpy as np
import pytest
import torch

from fastddim import reference
from fastddim.dispatch import _float32, row_quantile, threshold_scale
from fastddim.plan import make_plan
from fastddim.schedule import Schedule

RATIOS = [0.0, 1e-7, 0.5, 0.9, 0.995, 0.9999999, 1.0]
WIDTHS = [1, 2, 3, 7, 16, 17, 768, 3 * 37 * 37]


def rows(kind: str, b: int, n: int, g: torch.Generator) -> torch.Tensor:
    """(b, n) non-negative float32 rows of one kind (what |x0| looks like, and the awkward cases)."""
    if kind == "ties":
        return torch.randint(0, 4, (b, n), generator=g).float()
    x = torch.randn(b, n, generator=g).abs()
    if kind == "wide":
        x = x * torch.logspace(-6, 6, b).unsqueeze(1)
    if kind == "nan" and n > 1:
        x[b // 2, n // 3] = float("nan")
    if kind == "inf":
        x[0, 0] = float("inf")
    return x


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert torch.equal(got.isnan(), want.isnan()), what
    ok = torch.equal(got.nan_to_num(-1.0), want.nan_to_num(-1.0))
    if not ok:
        i = int((got.nan_to_num(-1.0) != want.nan_to_num(-1.0)).nonzero()[0, 0])
        pytest.fail(f"{what}: row {i}: {got[i].item()!r} != torch.quantile {want[i].item()!r}")


@pytest.mark.parametrize("kind", ["normal", "wide", "ties", "nan", "inf"])
def test_row_quantile_is_torch_quantile_bit_for_bit(kind):
    g = torch.Generator().manual_seed(len(kind))
    rng = random.Random(kind)
    for n in WIDTHS:
        for q in RATIOS + [rng.random() for _ in range(4)]:
            b = rng.randint(1, 40)  # across the lerp's vector width and its scalar tail
            x = rows(kind, b, n, g)
            assert_same_bits(row_quantile(x, q), torch.quantile(x, q, dim=1), f"{kind} b={b} n={n} q={q!r}")


def test_float32_rounding_is_numpy_s():
    rng = random.Random(0)
    for _ in range(20000):
        x = rng.random() * 10 ** rng.uniform(-44, 8)
        if rng.random() < 0.3:  # exactly half way between two float32s: ties go to even
            x = float(np.float32(x)) + math.ldexp(rng.choice((1, -1)), math.frexp(x)[1] - 25)
        assert _float32(x) == float(np.float32(x)), x


def test_row_quantile_compiles_fullgraph():
    x = rows("normal", 4, 3 * 8 * 8, torch.Generator().manual_seed(1))
    compiled = torch.compile(lambda t: row_quantile(t, 0.995), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), torch.quantile(x, 0.995, dim=1))


def test_threshold_scale_is_the_reference_s():
    plan = make_plan(Schedule.linear(), 10, thresholding=True, sample_max_value=2.5, dynamic_thresholding_ratio=0.9)
    g = torch.Generator().manual_seed(2)
    x, out = torch.randn(5, 3, 8, 8, generator=g) * 3, torch.randn(5, 3, 8, 8, generator=g)
    for j in range(plan.steps):
        s = threshold_scale(x, out, plan.table, j, plan)
        x0, _ = reference.predict_x0_eps(x, out, plan.table[j, 0], plan.table[j, 1], plan.prediction_type)
        want = torch.quantile(x0.reshape(5, -1).abs(), 0.9, dim=1).clamp(min=1, max=2.5)
        assert torch.equal(s, want), j


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["normal", "ties", "nan"])
def test_gpu_row_quantile_is_torch_quantile_bit_for_bit(kind):
    g = torch.Generator().manual_seed(3)
    for n in WIDTHS + [3 * 64 * 64]:
        for q in RATIOS:
            x = rows(kind, 33, n, g).cuda()
            assert_same_bits(row_quantile(x, q).cpu(), torch.quantile(x, q, dim=1).cpu(), f"cuda {kind} n={n} q={q!r}")
