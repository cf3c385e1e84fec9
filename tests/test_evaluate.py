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
        row = next(line for line in md.splitlines() if line.startswith(f"| {s} | {n} | "))
        assert row.count("±") == 2 and "not run" not in row, row  # Euler and refine=1 encoders
    assert "| refine=1: MSE |" in md and "the refine=1 encoder is at or below" in md
    assert "| uniform:source (the table above) |" in md
    row = next(line for line in md.splitlines() if line.startswith("| quad:target |"))
    assert row.count("e-") >= 2 and "not run" not in row
    assert "finished after" in md and "## How to remake this" in md
    raw = json.loads(md.split("<!-- raw results (JSON): ", 1)[1].split(" -->", 1)[0])
    assert len(raw["table1"]["cells"]["2/sigma_hat"]["fd"]) == 2 and raw["table2"]["rows"]["20"]["n"] == 2
    # the refined encoder inverts the exact model's decoder much better than the Euler one
    rows = raw["table2"]["rows"]
    assert rows["5"]["refined"]["mse"] < rows["5"]["mse"] and rows["20"]["refined"]["mse"] < rows["20"]["mse"] / 5
    for name in ev.FIGURES.values():
        assert (tmp_path / name).stat().st_size > 1000, name
        assert f"]({name})" in md
    assert str(tmp_path / "paper_tables.md") in capsys.readouterr().out


def test_table1_from_an_earlier_report(tmp_path):
    """A long Table 1 run combined with a later Table 2: the numbers are carried over, not remeasured."""
    m = TinyDigitModel()
    first = ev.evaluate(m, table1=True, n=5, seeds=2, table1_steps=(2, 3), table1_etas=(0.0, 1.0), out=tmp_path / "a")
    calls = []
    later = ev.evaluate(m, table2=True, table1_from=tmp_path / "a" / "paper_tables.md", table2_steps=(2,),
                        table2_n=2, table2_refine=0, out=tmp_path / "b", log=calls.append)
    assert later["table1"]["cells"] == json.loads(json.dumps(first["table1"]["cells"]))
    md = (tmp_path / "b" / "paper_tables.md").read_text()
    a_md = (tmp_path / "a" / "paper_tables.md").read_text()
    rows = [ln for ln in a_md.splitlines() if ln.startswith(("| 0 |", "| 1 |"))]
    assert len(rows) == 2 and all(r in md for r in rows)
    assert "--table1-from" in md and "Table 2" in md and "refine=" not in md.split("## Table 2", 1)[1].split("##")[0]
    assert not any(c.startswith("table1 S=") for c in calls)  # nothing of Table 1 was sampled again

    class OtherModel(TinyDigitModel):
        pass

    with pytest.raises(ValueError, match="table1_from.*made with the model"):
        ev.evaluate(OtherModel(), table2=True, table1_from=tmp_path / "a" / "paper_tables.md", out=tmp_path / "c")
    (tmp_path / "plain.md").write_text("# not a report\n")
    for bad, match in ((tmp_path / "missing.md", "cannot read"), (tmp_path / "plain.md", "no raw results"),
                       (tmp_path / "b" / "paper_tables.md", None)):
        if match is None:  # b's own raw results carry Table 1 too, so it can be reused in turn
            ev.evaluate(m, table1_from=bad, out=tmp_path / "d")
            continue
        with pytest.raises(ValueError, match=f"table1_from: .*{match}"):
            ev.evaluate(m, table1_from=bad, out=tmp_path / "d")


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
    (dict(table2=True, table2_refine=-1), "table2_refine"),
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
