"""benchmarks/guidance_quality.py (docs/guidance.md's numbers): its measure is the project's metric,
checked on the held-out digits themselves, and a rerun resumes instead of redoing cells."""
import json
import sys

import pytest
import torch

from fastddim import metrics


@pytest.fixture(scope="module")
def gq(benchmark_script):
    return benchmark_script("guidance_quality")


def test_quality_of_the_heldout_digits_is_the_metric_itself(gq):
    x, y = metrics.heldout_digits()
    q = gq.quality(x, y)
    assert q["fd"] < 1e-6  # the same set as the reference
    assert q["accuracy"] == pytest.approx(metrics.heldout_accuracy())
    assert q["asked_per_digit"] == torch.bincount(y, minlength=10).tolist()
    assert sum(q["correct_per_digit"]) == round(q["accuracy"] * len(y))
    assert q["predicted_hist"] == metrics.class_histogram(x).tolist()
    spreads = [float(torch.cov(metrics.heldout_features()[y == d].double().T).trace().sqrt()) for d in range(10)]
    assert q["spread"] == pytest.approx(sum(spreads) / 10, rel=1e-9)
    wrong = gq.quality(x, (y + 1) % 10)  # every label wrong: the classifier agrees with almost none
    assert wrong["accuracy"] < 0.05 and wrong["fd"] == q["fd"]


def test_a_rerun_skips_the_cells_it_holds(gq, tmp_path, monkeypatch):
    calls = []

    def fake_measure(model, n, steps, backend, guide, seed):
        calls.append((steps, guide, seed))
        return {"accuracy": 1.0, "fd": 0.0, "spread": 0.0, "seconds": 0.0, "ran": {"model_calls_per_sample": steps}}

    monkeypatch.setattr(gq, "measure", fake_measure)
    monkeypatch.setattr(gq.torch, "set_num_threads", lambda k: None)  # keep the test session's threads
    out = tmp_path / "g.json"
    argv = ["guidance_quality.py", "--n", "20", "--out", str(out), "--only", "w=2 S="]
    monkeypatch.setattr(sys, "argv", argv)
    assert gq.main() == 0
    assert calls == [(10, {"guidance_scale": 2.0}, 0), (20, {"guidance_scale": 2.0}, 0)]
    res = json.loads(out.read_text())
    assert list(res["cells"]) == ["cfg w=2 S=10", "cfg w=2 S=20"] and len(res["sessions"]) == 1
    before = out.read_bytes()
    assert gq.main() == 0
    assert len(calls) == 2 and out.read_bytes() == before  # nothing measured again, nothing rewritten
    monkeypatch.setattr(sys, "argv", argv + ["--seed", "1"])  # another seed: cells of its own
    assert gq.main() == 0
    assert calls[2:] == [(10, {"guidance_scale": 2.0}, 1), (20, {"guidance_scale": 2.0}, 1)]
    assert list(json.loads(out.read_text())["cells"])[2:] == ["cfg w=2 S=10 seed 1", "cfg w=2 S=20 seed 1"]
    monkeypatch.setattr(sys, "argv", argv[:2] + ["30"] + argv[3:])
    with pytest.raises(SystemExit, match="holds cells of n = 20"):
        gq.main()
