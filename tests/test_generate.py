"""``fastddim generate``: sharded, resumable, identical for any world size / batch size / interruption.

The multi-process test runs the real thing, ``python -m torch.distributed.run --standalone
--nproc_per_node=2 -m fastddim generate ...`` on gloo; the others call ``fastddim.generate``
in this process or the CLI in a subprocess. The model is a tiny conv net whose output for one
row does not depend on the rest of its batch, so byte identity is exact.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

TINY_MODEL = '''
import os

import torch
from fastddim import Schedule

CALLS = [0]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.sample_shape = (3, 6, 6)
        self.schedule = Schedule.linear()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.temb = torch.nn.Linear(1, 3)

    def forward(self, x, t):
        CALLS[0] += 1  # Ctrl-C at call k when TINY_CTRL_C_AT=k (the weights, hence the run's config, are unchanged)
        if CALLS[0] == int(os.environ.get("TINY_CTRL_C_AT", "0")):
            raise KeyboardInterrupt
        h = self.temb((t.float() / 1000)[:, None])[:, :, None, None]
        return 0.5 * torch.tanh(self.conv(x) + h)


class Sensitive(Tiny):
    """Tiny plus a term whose float32 rounding depends on torch's intra-op thread count, as many
    CPU kernels' reductions do: a sum over 540,000 numbers per image, which torch splits across
    threads; the sin makes a last-bit difference visible in the uint8 output. Per image, so
    batch-invariant."""

    def forward(self, x, t):
        s = torch.stack([row.repeat(5000).sum() for row in x.reshape(x.shape[0], -1)])
        return super().forward(x, t) + 0.2 * torch.sin(1000 * s)[:, None, None, None]


class Cond(Tiny):
    """Class-conditional: model(x, t, class_labels) with one label per row of the batch."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(4, 3)

    def forward(self, x, t, class_labels):
        if class_labels.shape != (x.shape[0],):
            raise ValueError(f"{tuple(class_labels.shape)} labels for a batch of {x.shape[0]}")
        return super().forward(x, t) + self.emb(class_labels)[:, :, None, None]


def sensitive():
    torch.manual_seed(0)
    return Sensitive()


def cond():
    torch.manual_seed(0)
    return Cond()


def make():
    torch.manual_seed(0)
    return Tiny()


def other():
    torch.manual_seed(1)
    return Tiny()
'''

N, STEPS, SHARD = 37, 3, 8  # 5 shards, the last one short
ARGS = ["-n", N, "--steps", STEPS, "--shard-size", SHARD, "--eta", "0.5", "--seed", 7, "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    (d / "tiny.py").write_text(TINY_MODEL)
    return str(d / "tiny.py")


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """One process, batch size 8: the run the others must equal byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "run"
    p = run_cli("generate", *ARGS, "-b", 8, "--model", f"{tiny}:make", "--out", out)
    assert p.returncode == 0, p.stderr
    return out


def _env(extra=None):
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e.pop("FASTDDIM_DEBUG", None)
    e.update(extra or {})
    return e


def run_cli(*args, env=None, launcher=()):
    cmd = [sys.executable, *launcher, "-m", "fastddim", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(env), timeout=240)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def visible_tmp(run_dir):
    return [f for d in (run_dir, run_dir / "shards") for f in os.listdir(d) if ".tmp" in f]


@pytest.fixture
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_tiny(tiny, name="make"):
    from fastddim.cli import load_model

    return load_model(f"{tiny}:{name}", "cpu")


# --------------------------------------------------------------------------------- layout
def test_layout_and_manifest(reference):
    with np.load(reference / "samples.npz") as z:
        assert z.files == ["arr_0"]
        a = z["arr_0"]
    assert a.dtype == np.uint8 and a.shape == (N, 6, 6, 3) and a.min() < a.max()
    shards = sorted(os.listdir(reference / "shards"))
    assert shards == [f"shard-{k:05d}.npz" for k in range(5)]
    with np.load(reference / "shards" / shards[-1]) as z:
        assert (int(z["start"]), int(z["stop"])) == (32, 37)
        np.testing.assert_array_equal(z["arr_0"], a[32:37])
    m = json.loads((reference / "manifest.json").read_text())
    assert m["complete"] and m["n"] == N and m["steps"] == STEPS and m["eta"] == 0.5 and m["seed"] == 7
    assert m["shard_size"] == SHARD and m["spacing"] == "uniform" and m["device_type"] == "cpu"
    assert {"name", "alphas_cumprod_sha256"} <= set(m["schedule"]) and m["torch"] and m["fastddim"]
    assert visible_tmp(reference) == []


def test_matches_fastddim_sample(reference, tiny, one_thread):
    """Image i of the run is fastddim.sample's image i (seed, i), converted to uint8."""
    import fastddim
    from fastddim.images import to_uint8

    x = fastddim.sample(load_tiny(tiny), n=5, steps=STEPS, eta=0.5, seed=7, first_index=20,
                        backend=json.loads((reference / "manifest.json").read_text())["backend"])
    with np.load(reference / "samples.npz") as z:
        np.testing.assert_array_equal(to_uint8(x), z["arr_0"][20:25])


# ----------------------------------------------------------------------- world size, batch
def test_torchrun_two_processes_identical(reference, tiny, tmp_path):
    out = tmp_path / "run"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    p = run_cli("generate", *ARGS, "-b", 3, "--model", f"{tiny}:make", "--out", out, launcher=launcher)
    assert p.returncode == 0, p.stderr
    assert "2 process(es)" in p.stdout
    assert read(out / "samples.npz") == read(reference / "samples.npz")
    m = json.loads((out / "manifest.json").read_text())
    assert m["world_size"] == 2 and m["last_run"]["images_made"] == N
    assert visible_tmp(out) == []


def test_batch_size_and_shard_order_do_not_matter(reference, tiny, tmp_path, one_thread):
    from fastddim.generate import generate

    model = load_tiny(tiny)
    out = tmp_path / "run"
    for bs in (5, 1):  # the second call finds a complete run and changes nothing
        m = generate(model, N, STEPS, out, eta=0.5, seed=7, batch_size=bs, shard_size=SHARD, device="cpu",
                     model_name="tiny", log=lambda s: None)
    assert m["complete"]
    assert read(out / "samples.npz") == read(reference / "samples.npz")
    # Rebuild shards 3, 1 and the samples file from scratch in another order: same bytes.
    for k in (3, 1):
        os.remove(out / "shards" / f"shard-{k:05d}.npz")
    os.remove(out / "samples.npz")
    generate(model, N, STEPS, out, eta=0.5, seed=7, batch_size=32, shard_size=SHARD, device="cpu",
             model_name="tiny", log=lambda s: None)
    assert read(out / "samples.npz") == read(reference / "samples.npz")


# ---------------------------------------------------------------------------- interruption
def test_interrupted_run_resumes_to_same_file(reference, tiny, tmp_path):
    out = tmp_path / "run"
    p = run_cli("generate", *ARGS, "-b", 4, "--model", f"{tiny}:make", "--out", out,
                env={"FASTDDIM_GENERATE_STOP_AFTER_SHARDS": "1"})
    assert p.returncode == 3, p.stderr
    assert os.listdir(out / "shards") == ["shard-00000.npz"]  # exactly one finished shard, nothing partial
    assert not (out / "samples.npz").exists()
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    # what a kill during a write leaves behind: a hidden temporary, which the resume removes
    (out / "shards" / ".shard-00001.npz.tmp-99999-deadbeef").write_bytes(b"partial")
    p = run_cli("generate", *ARGS, "-b", 6, "--model", f"{tiny}:make", "--out", out)
    assert p.returncode == 0, p.stderr
    assert "keeps 1 of its 5 shards" in p.stderr
    assert read(out / "samples.npz") == read(reference / "samples.npz")
    assert visible_tmp(out) == []


def test_damaged_shard_is_remade(reference, tiny, tmp_path, one_thread):
    import shutil

    from fastddim.generate import generate

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    os.remove(out / "samples.npz")
    (out / "shards" / "shard-00002.npz").write_bytes(b"PK\x03\x04 not really a zip")
    logs = []
    generate(load_tiny(tiny), N, STEPS, out, eta=0.5, seed=7, shard_size=SHARD, device="cpu", model_name="t",
             log=logs.append)
    assert any("remaking damaged shard" in s for s in logs)
    assert read(out / "samples.npz") == read(reference / "samples.npz")


# -------------------------------------------------------------------------- other configs
@pytest.mark.parametrize(
    "change",
    [dict(seed=8), dict(n=40), dict(steps=4), dict(eta=0.0), dict(shard_size=9), dict(spacing="quad"),
     dict(model="other"), dict(threads=2), dict(classes=3), dict(class_label=0)],
)
def test_other_configuration_is_refused(reference, tiny, tmp_path, one_thread, change):
    import shutil

    from fastddim.generate import ConfigMismatch, generate

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = {f: read(out / "shards" / f) for f in os.listdir(out / "shards")}
    kw = dict(n=N, steps=STEPS, eta=0.5, seed=7, shard_size=SHARD, spacing="uniform", model="make")
    kw.update(change)
    model, n, steps = load_tiny(tiny, kw.pop("model")), kw.pop("n"), kw.pop("steps")
    manifest = read(out / "manifest.json")
    with pytest.raises(ConfigMismatch, match="different configuration"):
        generate(model, n, steps, out, device="cpu", log=lambda s: None, **kw)
    assert read(out / "manifest.json") == manifest
    # no manifest but a samples.npz: not overwritten
    os.remove(out / "manifest.json")
    with pytest.raises(ValueError, match="unknown origin"):
        generate(model, n, steps, out, device="cpu", log=lambda s: None, **kw)
    # only the shards left: still refused, nothing written
    os.remove(out / "samples.npz")
    with pytest.raises(ConfigMismatch, match="shard"):
        generate(model, n, steps, out, device="cpu", log=lambda s: None, **kw)
    assert not (out / "manifest.json").exists()
    assert {f: read(out / "shards" / f) for f in os.listdir(out / "shards")} == before


def test_other_configuration_cli_one_line(reference, tiny, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    p = run_cli("generate", *ARGS[:-6], "--seed", 8, "--eta", "0.5", "--device", "cpu", "--model", f"{tiny}:make",
                "--out", out)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastddim: error: ") and "seed: 7 there, 8 now" in lines[0]


# --------------------------------------------------------------------------------- threads
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_threads_fixed_so_process_count_does_not_matter(tiny, tmp_path):
    """torchrun sets OMP_NUM_THREADS=1; one process on a bigger machine runs more threads, and the
    model rounds differently with the thread count. generate fixes the count (--threads, default 1),
    so one process and two make the same bytes; the count is recorded in the manifest."""
    args = ["-n", 10, "--steps", 2, "--shard-size", 4, "--device", "cpu", "--model", f"{tiny}:sensitive"]
    one, two = tmp_path / "one", tmp_path / "two"
    p = run_cli("generate", *args, "--out", one, env={"OMP_NUM_THREADS": "4"})
    assert p.returncode == 0, p.stderr
    p = run_cli("generate", *args, "--out", two, launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr
    assert "2 process(es)" in p.stdout and "nothing to do" not in p.stderr  # 3 shards: both ranks work
    assert read(one / "samples.npz") == read(two / "samples.npz")
    m = json.loads((one / "manifest.json").read_text())
    assert m["threads"] == 1 and m["config"]["threads"] == 1


def test_rank_without_a_shard_says_so(tiny, tmp_path):
    out = tmp_path / "run"
    p = run_cli("generate", "-n", 3, "--steps", 2, "--shard-size", 8, "--device", "cpu", "--model", f"{tiny}:make",
                "--out", out, launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr
    assert "rank 1 of 2: nothing to do" in p.stderr
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (3, 6, 6, 3)


# ---------------------------------------------------------------------------- class labels
def test_class_labels(tiny, tmp_path, one_thread):
    """--classes C: image i gets label i % C, recorded in the manifest and part of the configuration;
    the model gets each batch's own labels (shards of 4, batches of 3)."""
    import torch

    import fastddim
    from fastddim.generate import ConfigMismatch, generate
    from fastddim.images import to_uint8

    out = tmp_path / "run"
    p = run_cli("generate", "-n", 10, "--steps", 2, "--shard-size", 4, "-b", 3, "--classes", 3, "--device", "cpu",
                "--model", f"{tiny}:cond", "--out", out)
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["class_labels"] == {"classes": 3, "rule": "image i has label i % 3"}
    model = load_tiny(tiny, "cond")
    with np.load(out / "samples.npz") as z:
        a = z["arr_0"]
    labels = torch.arange(10) % 3
    x = fastddim.sample(model, n=10, steps=2, batch_size=10, model_kwargs={"class_labels": labels})
    np.testing.assert_array_equal(to_uint8(x), a)
    with pytest.raises(ConfigMismatch, match="class_labels"):
        generate(model, 10, 2, out, shard_size=4, classes=4, device="cpu", log=lambda s: None)
    k = generate(model, 10, 2, tmp_path / "k", shard_size=4, class_label=1, device="cpu", model_name="c",
                 log=lambda s: None)
    assert k["class_labels"] == {"class_label": 1, "rule": "every image has label 1"}
    with np.load(tmp_path / "k" / "samples.npz") as z:
        x = fastddim.sample(model, n=10, steps=2, batch_size=10, model_kwargs={"class_labels": torch.ones(10).long()})
        np.testing.assert_array_equal(to_uint8(x), z["arr_0"])


# ------------------------------------------------------------------------ re-runs, Ctrl-C
def test_rerun_of_a_finished_run_prints_no_timing(reference, tiny, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    p = run_cli("generate", *ARGS, "-b", 8, "--model", f"{tiny}:make", "--out", out)
    assert p.returncode == 0, p.stderr
    assert "already complete" in p.stderr and "images/s" not in p.stdout and "made" not in p.stdout
    assert read(out / "samples.npz") == read(reference / "samples.npz")


def test_ctrl_c_says_rerun_resumes(reference, tiny, tmp_path):
    out = tmp_path / "run"
    # batches of 8 = one shard, 3 model calls each: Ctrl-C in the third shard's first call
    p = run_cli("generate", *ARGS, "-b", 8, "--model", f"{tiny}:make", "--out", out, env={"TINY_CTRL_C_AT": "7"})
    assert p.returncode == 130, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "run the same command again to resume" in lines[0], p.stderr
    p = run_cli("generate", *ARGS, "-b", 8, "--model", f"{tiny}:make", "--out", out)
    assert p.returncode == 0, p.stderr
    assert "keeps 2 of its 5 shards" in p.stderr
    assert read(out / "samples.npz") == read(reference / "samples.npz")


def test_manifest_model_sha256_is_full(reference, tiny):
    from fastddim.shards import model_digest

    m = json.loads((reference / "manifest.json").read_text())
    assert len(m["model_sha256"]) == 64 and m["model_sha256"] == model_digest(load_tiny(tiny))
    assert m["config"]["model"] == m["model_sha256"]


def test_output_folder_refused_before_the_model(tmp_path):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        p = run_cli("generate", "-n", 2, "--model", "no_such_module_xyz:make", "--out", out)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and "--out" in lines[0] and "afile" in lines[0], p.stderr


def test_auto_layout_never_probes(tiny, tmp_path, one_thread, monkeypatch):
    """A job's bytes must not depend on a timing: generate's "auto" layout is the model as given,
    where sample() would time both layouts (and another process, or a resume, could decide
    otherwise). The run is large enough that sample() would probe."""
    import torch

    import fastddim
    from fastddim import copies

    def no_probe(*a, **k):
        raise AssertionError("generate ran the timed layout probe")

    model = load_tiny(tiny)
    monkeypatch.setattr(copies, "probe_ms", no_probe)
    with pytest.raises(AssertionError, match="probe"):  # the guard itself: sample() does probe this run
        fastddim.sample(model, n=64, steps=40, batch_size=8, device="cpu", progress=False)
    from fastddim.generate import generate

    m = generate(model, 64, 40, str(tmp_path / "run"), batch_size=8, shard_size=64, progress=False)
    assert m["memory_format"] == "contiguous_format" and m["config"]["memory_format"] == "contiguous_format"
    m2 = generate(model, 8, 2, str(tmp_path / "cl"), memory_format=torch.channels_last, progress=False)
    assert m2["memory_format"] == "channels_last"


# ------------------------------------------------------------------------------- guidance
# The tiny Cond model's 4th label (3) serves as the null label; images get labels i % 3. Three
# uniform steps visit t = 666, 333, 0: the interval guides the first two, the last runs unguided.
GUIDED = dict(classes=3, guidance_scale=3.0, guidance_rescale=0.5, guidance_interval=(300, 1000), eta=0.5, seed=7)


def _guided(model, out, **kw):
    import torch

    from fastddim.generate import generate

    kw = {**GUIDED, "uncond_kwargs": {"class_labels": torch.tensor([3])}, "shard_size": 4, "device": "cpu",
          "progress": False, "log": lambda s: None, **kw}
    return generate(model, 10, 3, str(out), **kw)


def test_guided_generate_same_bytes_in_any_batches_shards_and_calls(tiny, tmp_path, one_thread):
    """A guided job is fastddim.sample's guided images, whatever the batch size, the order the
    shards are made in and one doubled call or two split ones (the model is row-independent)."""
    import torch

    import fastddim
    from fastddim.images import to_uint8

    model = load_tiny(tiny, "cond")
    a = _guided(model, tmp_path / "a", batch_size=4)
    _guided(model, tmp_path / "b", batch_size=3, guidance_split=True)
    assert read(tmp_path / "a" / "samples.npz") == read(tmp_path / "b" / "samples.npz")
    os.remove(tmp_path / "b" / "shards" / "shard-00001.npz")  # remade alone, in a batch of 1
    os.remove(tmp_path / "b" / "samples.npz")
    _guided(model, tmp_path / "b", batch_size=1)
    assert read(tmp_path / "a" / "samples.npz") == read(tmp_path / "b" / "samples.npz")
    x = fastddim.sample(model, n=10, steps=3, eta=0.5, seed=7, batch_size=10, backend=a["backend"],
                        model_kwargs={"class_labels": torch.arange(10) % 3},
                        uncond_kwargs={"class_labels": torch.tensor([3])},
                        **{k: GUIDED[k] for k in ("guidance_scale", "guidance_rescale", "guidance_interval")})
    unguided = fastddim.sample(model, n=10, steps=3, eta=0.5, seed=7, model_kwargs={"class_labels": torch.arange(10) % 3})
    with np.load(tmp_path / "a" / "samples.npz") as z:
        np.testing.assert_array_equal(to_uint8(x), z["arr_0"])
        assert not np.array_equal(to_uint8(unguided), z["arr_0"])  # the guidance is really applied
    assert a["guidance"]["guided_steps"] == 2 and a["guidance"]["guidance_interval"] == [300.0, 1000.0]
    assert a["config"]["guidance_scale"] == 3.0 and a["config"]["uncond_kwargs"]["class_labels"].startswith("int64 [1]")


@pytest.mark.parametrize("change, named", [
    (dict(guidance_scale=2.0), "guidance_scale: 3.0 there, 2.0 now"),
    (dict(guidance_rescale=0.0), "guidance_rescale: 0.5 there, 0.0 now"),
    (dict(guidance_interval=None), "guidance_interval"),
    (dict(guidance="cfg++", guidance_scale=0.5, guidance_rescale=0.0), "guidance: 'cfg' there, 'cfg++' now"),
    (dict(uncond_kwargs="other null label"), "uncond_kwargs.class_labels"),
    (dict(guidance_scale=1.0), "guidance: 'cfg' there, None now"),
])
def test_guided_resume_with_other_guidance_is_refused_naming_it(tiny, tmp_path, one_thread, change, named):
    import torch

    from fastddim.generate import ConfigMismatch

    model = load_tiny(tiny, "cond")
    _guided(model, tmp_path / "run", batch_size=4)
    os.remove(tmp_path / "run" / "shards" / "shard-00002.npz")
    os.remove(tmp_path / "run" / "samples.npz")
    before = read(tmp_path / "run" / "manifest.json")
    if change.get("uncond_kwargs") == "other null label":
        change = {"uncond_kwargs": {"class_labels": torch.tensor([2])}}
    with pytest.raises(ConfigMismatch, match="different configuration") as e:
        _guided(model, tmp_path / "run", batch_size=4, **change)
    assert named in str(e.value)
    assert read(tmp_path / "run" / "manifest.json") == before
    # split calls are how the model is called, like the batch size: the same job, resumed
    m = _guided(model, tmp_path / "run", batch_size=2, guidance_split=True)
    assert m["complete"] and m["this_call"]["images_made"] == 2


def test_unguided_configuration_has_no_guidance_keys(tiny, tmp_path, one_thread):
    """Jobs made before guidance existed keep their configuration hash: unguided runs, w = 1 with
    uncond_kwargs given included, add nothing to it."""
    model = load_tiny(tiny, "cond")
    a = _guided(model, tmp_path / "a", guidance_scale=1.0, guidance_rescale=0.0, guidance_interval=None)
    b = _guided(model, tmp_path / "b", guidance_scale=1.0, guidance_rescale=0.0, guidance_interval=None,
                uncond_kwargs=None)
    assert a["guidance"] is None and not any(k.startswith(("guidance", "uncond")) for k in a["config"])
    assert a["config_hash"] == b["config_hash"]
    assert read(tmp_path / "a" / "samples.npz") == read(tmp_path / "b" / "samples.npz")
    with pytest.raises(ValueError, match="uncond_kwargs"):  # refused before any work, naming it
        _guided(model, tmp_path / "c", uncond_kwargs=None)
    assert not (tmp_path / "c" / "manifest.json").exists()
