"""fastddim eval (fastddim.evaluate) on a tiny stand-in model: the report's rows, the figures, bad input."""
import argparse
import json

import pytest
import torch

import fastddim
from fastddim import evaluate as ev


class TinyDigitModel(torch.nn.Module):
    """The exact eps-predictor for data ~ N(mu, s^2 I) with mu the mean held-out-like digit: cheap,
    deterministic, and its samples look like a blurry digit, so every code path runs in seconds."""

    def __init__(self, s=0.3):
        super().__init__()
        self.schedule = fastddim.Schedule.linear()
        self.sample_shape = (1, 32, 32)
        yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        ring = ((yy - 16) ** 2 / 100 + (xx - 16) ** 2 / 36 - 1).abs() < 0.3  # a "0"
        self.register_buffer("mu", torch.where(ring, 0.8, -1.0).view(1, 32, 32))
        self.s2 = s * s

    def forward(self, x, t):
        a = self.schedule.alphas_cumprod.to(x.device)[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s2 + 1 - a)


def _args(argv):
    p = argparse.ArgumentParser()
    ev.add_eval_arguments(p)
    return p.parse_args(argv)


def test_report_rows_and_figures(tmp_path, capsys):
    args = _args(["--table1", "--table2", "--figures", "--n", "6", "--seeds", "2", "--out", str(tmp_path),
                  "--table1-steps", "2,4", "--table1-etas", "0,1,sigma_hat", "--table2-steps", "2,5,20",
                  "--table2-n", "4", "--table2-n-long", "2", "--table2-long-from", "10", "--batch-size", "4",
                  "--table2-variants", "quad:target", "--table2-variant-steps", "2,3"])
    args.model = TinyDigitModel()
    assert ev.run_eval(args) == 0
    md = (tmp_path / "paper_tables.md").read_text()
    assert "not Inception FID" in md
    assert "| eta \\ S | 2 | 4 |" in md
    for eta in ("0", "1", "sigma_hat"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {eta} |"))
        assert row.count("±") == 2 and "not run" not in row  # both S, two seeds each
    assert "| real train digits (n = 6) |" in md
    for s, n in ((2, 4), (5, 4), (20, 2)):
        assert any(line.startswith(f"| {s} | {n} | ") for line in md.splitlines()), s
    assert "| uniform:source (the table above) |" in md
    row = next(line for line in md.splitlines() if line.startswith("| quad:target |"))
    assert row.count("e-") >= 2 and "not run" not in row
    assert "finished after" in md and "## How to remake this" in md
    raw = json.loads(md.split("<!-- raw results (JSON): ", 1)[1].split(" -->", 1)[0])
    assert len(raw["table1"]["cells"]["2/sigma_hat"]["fd"]) == 2 and raw["table2"]["rows"]["20"]["n"] == 2
    for name in ev.FIGURES.values():
        assert (tmp_path / name).stat().st_size > 1000, name
        assert f"]({name})" in md
    assert str(tmp_path / "paper_tables.md") in capsys.readouterr().out


def test_single_setting_python_and_cli(capsys):
    m = TinyDigitModel()
    r = ev.evaluate(m, n=8, steps=3, eta="sigma_hat", seeds=[0, 7])
    s = r["single"]
    assert s["seeds"] == [0, 7] and len(s["fd"]) == 2 and s["fd"][0] != s["fd"][1]
    assert s["mean"] > 0 and sum(s["hist"][0]) == 8 and r["report"] is None
    # Same seed, same numbers; batch size does not matter.
    r2 = ev.evaluate(m, n=8, steps=3, eta="sigma_hat", seeds=[0], batch_size=3)
    assert r2["single"]["fd"][0] == pytest.approx(s["fd"][0], rel=1e-5)
    args = _args(["--n", "5", "--steps", "2", "--eta", "0.5", "--json"])
    args.model = m
    assert ev.run_eval(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2 and out["eta"] == 0.5 and out["spacing"] == "quad"


def test_table2_reconstruction_is_accurate_for_the_exact_model():
    m = TinyDigitModel()
    x0 = m.mu.expand(3, 1, 32, 32) + 0.3 * torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    mse10, _, _ = ev.reconstruction_errors(m, x0, 10)
    mse100, _, _ = ev.reconstruction_errors(m, x0, 100)
    assert mse100.mean() < mse10.mean() < 0.05


def test_heldout_subset_is_balanced_prefix():
    from fastddim import metrics

    x = ev.heldout_subset(40)
    assert x.shape == (40, 1, 32, 32)
    assert torch.equal(ev.heldout_subset(20), x[:20])
    assert metrics.class_histogram(x).max() <= 8  # 4 of each digit, give or take the classifier


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=1), "n must be"),
    (dict(seeds=0), "seeds"),
    (dict(seeds="a,b"), "seeds"),
    (dict(eta="fast"), "eta"),
    (dict(eta=-1), "eta"),
    (dict(steps=0), "steps"),
    (dict(steps=2000), "exceed"),
    (dict(spacing="cubic"), "spacing"),
    (dict(batch_size=0), "batch_size"),
    (dict(table1=True, steps=10), "--steps"),
    (dict(table2=True, table2_n=5000), "table2_n"),
    (dict(table1=True, table1_etas="0,x"), "eta"),
    (dict(table2=True, table2_variants="quad:middle"), "table2_variants"),
])
def test_bad_arguments(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        ev.evaluate(TinyDigitModel(), out=tmp_path, **kwargs)


def test_wrong_model_shape(tmp_path):
    m = TinyDigitModel()
    m.sample_shape = (3, 32, 32)
    with pytest.raises(ValueError, match="1x32x32"):
        ev.evaluate(m, n=4, steps=2)
    with pytest.raises(ValueError, match="unknown|not found|cannot load"):
        ev.evaluate("no-such-model", n=4, steps=2)
