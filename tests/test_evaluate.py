"""fastddim eval (fastddim.paper) on a tiny stand-in model: the report's rows, the figures, the raw
results, bad input."""
import glob
import json
import os

import pytest
import torch

import fastddim
import fastddim.paper as ev
from fastddim import cli
from fastddim.paper import figures, report, results


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


TINY = f"{__file__}:TinyDigitModel"  # the CLI's --model file.py:attr form


def run_eval(argv) -> int:
    """``fastddim eval ...`` in this process, with the tiny model."""
    return cli.main(["eval", "--model", TINY, *argv])


def test_report_rows_and_figures(tmp_path, capsys):
    assert run_eval(["--table1", "--table2", "--figures", "--n", "6", "--seeds", "2", "--out", str(tmp_path),
                     "--table1-steps", "2,4", "--table1-etas", "0,1,sigma_hat", "--table2-steps", "2,5,20",
                     "--table2-n", "4", "--table2-n-long", "2", "--table2-long-from", "10", "--batch-size", "4",
                     "--table2-variants", "quad:target", "--table2-variant-steps", "2,3"]) == 0
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
    raw = json.loads((tmp_path / "paper_tables.json").read_text())  # the raw results, beside the report
    assert "<!-- raw results" not in md and "[paper_tables.json](paper_tables.json)" in md
    assert report.render(raw) == md  # the report is rendered from them
    assert len(raw["table1"]["cells"]["2/sigma_hat"]["fd"]) == 2 and raw["table2"]["rows"]["20"]["n"] == 2
    # the refined encoder inverts the exact model's decoder much better than the Euler one
    rows = raw["table2"]["rows"]
    assert rows["5"]["refined"]["mse"] < rows["5"]["mse"] and rows["20"]["refined"]["mse"] < rows["20"]["mse"] / 5
    for name in figures.FIGURES.values():
        assert (tmp_path / name).stat().st_size > 1000, name
        assert f"]({name})" in md
    assert str(tmp_path / "paper_tables.md") in capsys.readouterr().out


def test_table1_from_an_earlier_run(tmp_path):
    """A long Table 1 run combined with a later Table 2: the numbers are carried over from the earlier
    run's raw results (its paper_tables.json), not remeasured."""
    m = TinyDigitModel()
    first = ev.evaluate(m, table1=True, n=5, seeds=2, table1_steps=(2, 3), table1_etas=(0.0, 1.0), out=tmp_path / "a")
    calls = []
    later = ev.evaluate(m, table2=True, table1_from=tmp_path / "a" / "paper_tables.json", table2_steps=(2,),
                        table2_n=2, table2_refine=0, out=tmp_path / "b", log=calls.append)
    assert later["table1"]["cells"] == json.loads(json.dumps(first["table1"]["cells"]))
    md = (tmp_path / "b" / "paper_tables.md").read_text()
    a_md = (tmp_path / "a" / "paper_tables.md").read_text()
    rows = [ln for ln in a_md.splitlines() if ln.startswith(("| 0 |", "| 1 |"))]
    assert len(rows) == 4 and all(r in md for r in rows)  # FD and class-balance rows
    assert "--table1-from" in md and "Table 2" in md and "refine=" not in md.split("## Table 2", 1)[1].split("##")[0]
    assert not any(c.startswith("table1 S=") for c in calls)  # nothing of Table 1 was sampled again
    b_raw = json.loads((tmp_path / "b" / "paper_tables.json").read_text())
    assert b_raw["table1_from"]["path"] == str(tmp_path / "a" / "paper_tables.json")

    class OtherModel(TinyDigitModel):
        pass

    with pytest.raises(ValueError, match="table1_from.*made with the model"):
        ev.evaluate(OtherModel(), table2=True, table1_from=tmp_path / "a" / "paper_tables.json", out=tmp_path / "c")
    # b's own raw results carry Table 1 too, so it can be reused in turn, and d names the whole chain
    ev.evaluate(m, table1_from=tmp_path / "b" / "paper_tables.json", out=tmp_path / "d")
    d_from = json.loads((tmp_path / "d" / "paper_tables.json").read_text())["table1_from"]
    assert d_from["path"] == str(tmp_path / "b" / "paper_tables.json")
    assert d_from["earlier"]["path"] == str(tmp_path / "a" / "paper_tables.json")
    assert d_from["earlier"]["earlier"] is None
    a_command = json.loads((tmp_path / "a" / "paper_tables.json").read_text())["command"]
    assert f"That run had the table from `{a_command}`" in (tmp_path / "d" / "paper_tables.md").read_text()


def test_an_unfinished_table1_is_continued_to_what_one_run_makes(tmp_path):
    """A Table 1 spread over runs (issue 20: n >= 1,024 x 3 seeds does not fit one session): the
    continued table measures only the (cell, seed) pairs it lacks, in the source's own settings, and
    equals the table made in one run."""
    m = TinyDigitModel()
    kw = dict(table1=True, n=4, seeds=2, table1_steps=(2, 3), table1_etas=(0.0, 1.0))
    whole = ev.evaluate(m, **kw, out=tmp_path / "a")["table1"]
    raw = json.loads((tmp_path / "a" / "paper_tables.json").read_text())
    cells = raw["table1"]["cells"]
    cells["3/1"] = {"fd": [], "hist": []}  # as an interrupted run leaves it: a cell not begun,
    cells["3/0"] = {k: v[:1] for k, v in cells["3/0"].items()}  # one with its first seed only
    raw["table1"]["real"] = []
    (tmp_path / "unfinished.json").write_text(json.dumps(raw))
    calls = []
    done = ev.evaluate(m, table1_from=tmp_path / "unfinished.json", out=tmp_path / "b", log=calls.append)["table1"]
    sampled = [c.split(":")[0] for c in calls if c.startswith("table1 S=")]
    assert sampled == ["table1 S=3 eta=0 seed=1", "table1 S=3 eta=1 seed=0", "table1 S=3 eta=1 seed=1"]
    assert json.loads(json.dumps(done["cells"])) == json.loads(json.dumps(whole["cells"]))
    assert done["real"] == whole["real"]
    md = (tmp_path / "b" / "paper_tables.md").read_text()
    assert "begun by an earlier run" in md and "measured the cells it lacked" in md


def _without_seconds(d):
    """A table's numbers without its timings, which differ between runs."""
    if isinstance(d, dict):
        return {k: _without_seconds(v) for k, v in d.items() if k != "seconds"}
    return d


def test_an_unfinished_table2_is_continued_to_what_one_run_makes(tmp_path):
    """Table 2 at 256 digits per row does not fit one session either: the continued table measures
    only the rows, refined rows and diagnostic cells it lacks, in the source's own settings, equals
    the table made in one run, and still draws the reconstruction figure for the rows it took over."""
    m = TinyDigitModel()
    kw = dict(table2=True, table2_steps=(2, 3, 5), table2_n=8, table2_refine=1, table2_variants="quad:target",
              table2_variant_steps=(2, 3))
    whole = ev.evaluate(m, **kw, out=tmp_path / "a")["table2"]
    raw = json.loads((tmp_path / "a" / "paper_tables.json").read_text())
    rows = raw["table2"]["rows"]
    del rows["5"], rows["3"]["refined"], raw["table2"]["variants"]["quad:target"]["3"]  # as an interrupted run
    lacking = 8 * 3 * 3 + 8 * 5 * 2 + 8 * 5 * 3 + 8 * 3 * 2  # network evaluations of what was deleted
    raw["table2"]["evals"] -= lacking  # an interrupted run has not counted them
    (tmp_path / "unfinished.json").write_text(json.dumps(raw))
    calls = []
    res = ev.evaluate(m, table2_from=tmp_path / "unfinished.json", figures=True, out=tmp_path / "b",
                      log=calls.append)
    sampled = [c.split(": MSE")[0] for c in calls if c.startswith("table2 ")]
    assert sampled == ["table2 S=3 n=8 refine=1", "table2 S=5 n=8", "table2 S=5 n=8 refine=1",
                       "table2 variant quad:target S=3 n=8"]
    assert calls[0] == (f"plan: {lacking:,} network evaluations for the tables; "
                        f"report -> {tmp_path / 'b' / 'paper_tables.md'}")
    done = json.loads(json.dumps(res["table2"]))
    assert _without_seconds(done) == _without_seconds(json.loads(json.dumps(whole)))
    assert len(done["rows"]["5"]["per_image"]) == 8  # each image's MSE, to say which digits fail
    assert (tmp_path / "b" / figures.FIGURES["reconstructions"]).stat().st_size > 1000
    md = (tmp_path / "b" / "paper_tables.md").read_text()
    t2_md = md.split("## Table 2", 1)[1]
    assert "`--table2-from " in t2_md and "this run measured the cells it lacked" in t2_md
    assert "## Table 1" not in md


def test_table2_from_refuses_another_model_or_what_is_not_a_table2(tmp_path):
    m = TinyDigitModel()
    ev.evaluate(m, table1=True, n=4, table1_steps=(2,), table1_etas=(0.0,), out=tmp_path / "a")
    with pytest.raises(ValueError, match="table2_from: .*holds no Table 2"):
        ev.evaluate(m, table2_from=tmp_path / "a" / "paper_tables.json", out=tmp_path / "c")
    ev.evaluate(m, table2=True, table2_steps=(2,), table2_n=2, table2_refine=0, out=tmp_path / "b")

    class OtherModel(TinyDigitModel):
        pass

    with pytest.raises(ValueError, match="table2_from: .*made with the model"):
        ev.evaluate(OtherModel(), table2_from=tmp_path / "b" / "paper_tables.json", out=tmp_path / "c")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_table1_from_refuses_what_is_not_a_table1(tmp_path):
    m = TinyDigitModel()
    ev.evaluate(m, table1=True, n=4, table1_steps=(2,), table1_etas=(0.0,), out=tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "paper_tables.json").read_text())
    (tmp_path / "t2only.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "table1"}))
    (tmp_path / "other.json").write_text('{"a": 1}')
    (tmp_path / "garbage.json").write_bytes(b"\x00\xff not json")
    for bad, match in ((tmp_path / "missing.json", "cannot read"),
                       (tmp_path / "a" / "paper_tables.md", "is a markdown report; pass the raw results written "
                                                            "beside it \\(paper_tables.json\\)"),
                       (tmp_path / "other.json", "not a raw-results file"),
                       (tmp_path / "garbage.json", "not a raw-results file"),
                       (tmp_path / "t2only.json", "holds no Table 1")):
        with pytest.raises(ValueError, match=f"table1_from: .*{match}"):
            ev.evaluate(m, table1_from=bad, out=tmp_path / "d")
    assert not (tmp_path / "d").exists()  # refused before anything was made


def test_cli_table1_from_a_markdown_report_is_one_line(tmp_path, capsys):
    ev.evaluate(TinyDigitModel(), table1=True, n=4, table1_steps=(2,), table1_etas=(0.0,), out=tmp_path / "a")
    capsys.readouterr()
    assert run_eval(["--table2", "--table1-from", str(tmp_path / "a" / "paper_tables.md"), "--out",
                     str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastddim: error: table1_from:") and "paper_tables.json" in err


def test_single_setting_python_and_cli(capsys):
    m = TinyDigitModel()
    r = ev.evaluate(m, n=8, steps=3, eta="sigma_hat", seeds=[0, 7])
    s = r["single"]
    assert s["seeds"] == [0, 7] and len(s["fd"]) == 2 and s["fd"][0] != s["fd"][1]
    assert s["mean"] > 0 and sum(s["hist"][0]) == 8 and r["report"] is None
    # Same seed, same numbers; batch size does not matter.
    r2 = ev.evaluate(m, n=8, steps=3, eta="sigma_hat", seeds=[0], batch_size=3)
    assert r2["single"]["fd"][0] == pytest.approx(s["fd"][0], rel=1e-5)
    capsys.readouterr()
    assert run_eval(["--n", "5", "--steps", "2", "--eta", "0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2 and out["eta"] == 0.5 and out["spacing"] == "quad"
    assert run_eval(["-n", "5", "--steps", "2", "--eta", "0.5", "--json"]) == 0  # -n as well as --n
    assert json.loads(capsys.readouterr().out)["fd"] == out["fd"]
    assert run_eval(["-n", "5", "--steps", "2"]) == 0
    assert "FD to held-out MNIST" in capsys.readouterr().out


def test_single_setting_with_the_dpm_solver(capsys):
    """--solver reaches the sampler: the FD is the one of fastddim.sample(solver='dpm++2m') samples."""
    from fastddim import metrics

    assert run_eval(["-n", "6", "--steps", "4", "--solver", "dpm++2m", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["solver"], out["spacing"]) == ("dpm++2m", "linspace")
    x = fastddim.sample(TinyDigitModel(), 6, 4, solver="dpm++2m", spacing="linspace", seed=0, progress=False)
    assert out["fd"][0] == pytest.approx(metrics.fd_and_histogram(x)[0], rel=1e-5)
    ddim = ev.evaluate(TinyDigitModel(), n=6, steps=4, spacing="linspace")["single"]
    assert ddim["solver"] == "ddim" and ddim["fd"][0] != out["fd"][0]


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
    (dict(solver="dpm"), "solver must be one of"),
    (dict(solver="dpm++2m", eta=1), "eta=1.0: eta is a DDIM option"),
    (dict(solver="dpm++2m", spacing="quad"), "spacing must be one of .* for solver 'dpm\\+\\+2m'"),
    (dict(solver="dpm++2m", table1=True), "measure the solver as a single setting"),
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


def test_cli_out_defaults_to_a_folder_named_for_the_job(tmp_path, monkeypatch, capsys):
    """Not ./docs wherever it is run: ./paper_eval/ (report, raw results, figures)."""
    monkeypatch.chdir(tmp_path)
    assert run_eval(["--table1", "-n", "4", "--table1-steps", "2", "--table1-etas", "0"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["paper_eval"]
    assert sorted(os.listdir(tmp_path / "paper_eval")) == ["paper_tables.json", "paper_tables.md"]
    assert capsys.readouterr().out.strip() == os.path.join("paper_eval", "paper_tables.md")


class CountingModel(TinyDigitModel):
    calls = 0

    def forward(self, x, t):
        CountingModel.calls += 1
        return super().forward(x, t)


def test_output_folder_checked_before_any_model_call(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for out, match in ((tmp_path / "afile", f"out {tmp_path / 'afile'}: is a file"),
                       (tmp_path / "afile" / "sub", f"out .*: {tmp_path / 'afile'} is a file, not a folder")):
        with pytest.raises(ValueError, match=match):
            ev.evaluate(CountingModel(), table1=True, n=4, table1_steps=(2,), table1_etas=(0.0,), out=out)
    assert CountingModel.calls == 0
    capsys.readouterr()
    assert run_eval(["--table2", "--out", str(tmp_path / "afile" / "sub")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "afile is a file, not a folder" in err and "Traceback" not in err
    # missing folders are made, parents included
    ev.evaluate(CountingModel(), table1=True, n=4, table1_steps=(2,), table1_etas=(0.0,), out=tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b" / "paper_tables.md").is_file() and CountingModel.calls > 0


def test_cli_eval_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: fastddim eval") and "examples:" in out
    assert "-n N, --n N" in out and "paper_eval" in out and "--table1-from JSON" in out


def test_imports_point_one_way():
    """cli -> paper -> library: importing the package loads neither the CLI nor matplotlib."""
    import subprocess
    import sys

    code = ("import sys, fastddim.paper; bad = [m for m in ('fastddim.cli', 'matplotlib', 'fastddim.evaluate') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_report_renders_from_raw_results_alone(tmp_path):
    """The report is a function of the JSON: re-rendering an interrupted run's raw results gives its report."""
    ev.evaluate(TinyDigitModel(), table2=True, table2_steps=(2, 3), table2_n=2, table2_refine=1, out=tmp_path)
    st = results.load(tmp_path / "paper_tables.json")
    assert report.render(st) == (tmp_path / "paper_tables.md").read_text()
    del st["table2"]["rows"]["3"]
    st["done"] = False
    md = report.render(st)
    assert "STILL RUNNING" in md and "| 3 | 2 |  | not run |" in md


def test_table1_claims_are_checked_seed_by_seed():
    """The paper's claims on Table 1 per seed (a seed's cells share x_T), and by how much each is missed."""
    from fastddim.paper import tables

    fd = {"10/0": [10, 12], "10/1": [11, 11], "10/sigma_hat": [20, 9],
          "20/0": [8, 9], "20/1": [7, 10.5], "20/sigma_hat": [9.5, 9.5]}
    t1 = {"steps": [10, 20], "etas": [0.0, 1.0, "sigma_hat"], "seeds": [0, 1], "n": 4, "spacing": "quad",
          "cells": {k: {"fd": v} for k, v in fd.items()}, "real": [5.0, 5.0]}
    assert tables.table1_claims(t1) == [
        "eta = 0 best at S = 10: under 1 of 2 seed(s) (eta = sigma_hat lower where it loses; eta = 0 is 1.50 "
        "above each seed's best cell on average).",
        "eta = 0 best at S = 20: under 1 of 2 seed(s) (eta = 1 lower where it loses; eta = 0 is 0.50 above each "
        "seed's best cell on average).",
        "sigma_hat worst at S = 10: under 1 of 2 seed(s).",
        "best cell S = 20, eta = 0: FD 8.50, 1.70x the real-data floor 5.00 (the paper's goal: within 2x, i.e. "
        "FD <= 10.00).",
    ]
    t1["cells"]["20/1"]["fd"] = [7]  # a seed that not every eta of a row has is left out of that row
    assert tables.table1_claims(t1)[1].startswith("eta = 0 best at S = 20: under 0 of 1 seed(s) (eta = 1 lower")


def test_table1_class_balance_adds_the_seeds():
    """The rarest and commonest class of a cell over all its seeds, against the balanced data."""
    from fastddim import metrics
    from fastddim.paper import tables

    h0 = [10, 5, 10, 10, 10, 10, 10, 10, 10, 15]
    h1 = [10, 7, 10, 10, 10, 10, 10, 13, 11, 9]
    t1 = {"steps": [10, 20], "etas": [0.0], "seeds": [0, 1], "n": 100, "spacing": "quad",
          "cells": {"10/0": {"fd": [1.0, 2.0], "hist": [h0, h1]}, "20/0": {"fd": [], "hist": []}},
          "seconds": 1.0, "evals": 2}
    assert tables.table1_class_balance(t1) == {"10/0": (1, 0.06, 9, 0.12)}
    assert "| 0 | 1: 6.0%, 9: 12.0% | not run |" in report._table1(t1, None)
    for split in ("train", "held_out"):  # what the report's "10% each" rests on
        assert torch.bincount(metrics._digits(split)[1], minlength=10).unique().numel() == 1


def test_table2_says_which_digits_fail():
    """Per-class mean MSE from the rows' per-image MSEs (image i is a digit i % 10), in the report."""
    from fastddim.paper import tables

    per = [0.1 * (i % 10) + (1.0 if i == 13 else 0.0) for i in range(20)]  # class 3's second image fails
    t2 = tables.new_table2([10, 20], {"10": 20, "20": 8}, 0, [], [], 20)
    t2["rows"]["10"] = {"n": 20, "common": 0.0, **tables.mse_stats(torch.tensor(per), 1.0)}
    t2["rows"]["20"] = {"n": 8, "common": 0.0, **tables.mse_stats(torch.tensor(per[:8]), 1.0)}
    by = tables.table2_by_digit(t2)
    want = [0.1 * c for c in range(10)]
    want[3] = (0.3 + 1.3) / 2
    assert list(by) == [10] and by[10] == pytest.approx(want)
    md = report._table2_rows(t2)
    assert "Which digits fail" in md and "| 10 | 0.00e+00 |" in md and "**9.00e-01**" in md


def test_check_int_list():
    from fastddim.checks import check_int_list

    assert check_int_list("steps", (10, 20), 1, 1000) == [10, 20]
    for bad, err in (("10,20", TypeError), ([], ValueError), ([1.5], TypeError), ([True], TypeError),
                     ([0], ValueError), ([1001], ValueError)):
        with pytest.raises(err, match="steps"):
            check_int_list("steps", bad, 1, 1000)
    with pytest.raises(ValueError, match="repeat"):
        check_int_list("seeds", [3, 3], 0, unique=True)


DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs")
COMMITTED_REPORTS = sorted(glob.glob(os.path.join(DOCS, "paper_tables.json"))
                           + glob.glob(os.path.join(DOCS, "runs", "*", "paper_tables.json")))


@pytest.mark.parametrize("raw", COMMITTED_REPORTS, ids=lambda p: os.path.relpath(os.path.dirname(p), DOCS))
def test_committed_report_is_rendered_from_its_raw_results(raw):
    """Each committed paper_tables.md (above its hand-written notes, if any) is exactly what the
    paper_tables.json beside it renders to."""
    with open(os.path.join(os.path.dirname(raw), "paper_tables.md")) as f:
        md = f.read()
    rendered = report.render(results.load(raw))
    assert md == rendered or md.startswith(rendered + "\n## Notes written after the run")


def test_committed_reports_are_the_runs_the_docs_name():
    """The reports the README cites hold the tables at the sizes it states, on the model it names,
    and can be reused with --table1-from / --table2-from."""
    assert len(COMMITTED_REPORTS) >= 2
    v1 = results.load_table(os.path.join(DOCS, "runs", "mnist-v1", "paper_tables.json"), "table1")
    assert v1["table1"]["n"] == 512 and "sha256 f263f4189d18" in v1["model_desc"]
    t1 = results.load_table(os.path.join(DOCS, "runs", "table1_n1024", "paper_tables.json"), "table1")
    assert t1["table1"]["n"] == 1024 and len(t1["table1"]["seeds"]) == 3
    assert t1["model_desc"].startswith("`mnist` (686,769 parameters, T = 1000)")
    final = os.path.join(DOCS, "paper_tables.json")  # the report the README cites: both tables at issue 20's sizes
    for key in ("table1", "table2"):
        assert "sha256 3dbf0aa5f05d" in results.load_table(final, key)["model_desc"]
    assert results.load_table(final, "table1")["table1"] == t1["table1"]
    t2 = results.load_table(final, "table2")
    assert t2["finished"] and t2["table2"]["steps"] == [10, 20, 50, 100, 200, 500, 1000]
    assert all(t2["table2"]["rows"][str(s)]["n"] == 256 for s in t2["table2"]["steps"])