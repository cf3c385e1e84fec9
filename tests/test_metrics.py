"""The offline quality metric: the Frechet distance formula and the committed MNIST classifier."""
import math

import numpy as np
import pytest
import torch

from fastddim import metrics


# ------------------------------------------------------------------ frechet_distance, closed forms
def test_identical_sets_give_zero():
    f = np.random.default_rng(0).normal(size=(500, 16))
    assert metrics.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-9)
    assert metrics.frechet_distance(torch.tensor(f), torch.tensor(f)) == pytest.approx(0.0, abs=1e-9)


def test_shifted_identity_gaussians():
    # N(0, I) vs N(m, I): ||m||^2.
    m = np.array([1.0, -2.0, 0.5])
    assert metrics.frechet_from_stats(np.zeros(3), np.eye(3), m, np.eye(3)) == pytest.approx(float(m @ m), rel=1e-12)


def test_diagonal_covariances():
    a = np.array([1.0, 4.0, 0.25, 9.0])
    b = np.array([2.0, 1.0, 0.25, 0.0])  # a zero variance: a singular covariance must still work
    mu_a, mu_b = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    want = float(((mu_a - mu_b) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    got = metrics.frechet_from_stats(mu_a, np.diag(a), mu_b, np.diag(b))
    assert got == pytest.approx(want, rel=1e-10)


def test_general_covariances_match_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    ca, cb = A @ A.T, B @ B.T
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    covmean = scipy_linalg.sqrtm(ca @ cb).real
    want = float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))
    assert metrics.frechet_from_stats(mu_a, ca, mu_b, cb) == pytest.approx(want, rel=1e-8)
    assert metrics.frechet_from_stats(mu_a, ca, mu_b, cb) == pytest.approx(metrics.frechet_from_stats(mu_b, cb, mu_a, ca), rel=1e-9)


def test_samples_from_known_gaussians():
    # Large samples from N(0, I) and N(m, diag(s^2)) approach the closed form.
    rng = np.random.default_rng(2)
    d, n = 4, 200_000
    m, s = np.array([0.5, 0.0, -1.0, 2.0]), np.array([1.0, 2.0, 0.5, 1.0])
    fa = rng.normal(size=(n, d))
    fb = m + s * rng.normal(size=(n, d))
    want = float(m @ m + ((1 - s) ** 2).sum())
    assert metrics.frechet_distance(fa, fb) == pytest.approx(want, abs=0.02)


def test_rank_deficient_features_are_real_and_finite():
    rng = np.random.default_rng(3)
    fa = np.concatenate([rng.normal(size=(50, 3)), np.zeros((50, 5))], 1)  # dead units, n < D style
    fb = np.concatenate([rng.normal(size=(50, 3)) + 1, np.zeros((50, 5))], 1)
    v = metrics.frechet_distance(fa, fb)
    assert isinstance(v, float) and math.isfinite(v) and v > 0


def test_bad_shapes():
    with pytest.raises(ValueError):
        metrics.frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError):
        metrics.frechet_distance(np.zeros((1, 3)), np.zeros((10, 3)))


# ------------------------------------------------------------------ the committed classifier
def test_classifier_is_small_and_in_eval_mode():
    c = metrics.classifier()
    assert not c.training
    assert sum(p.numel() for p in c.parameters()) < 300_000
    assert metrics.WEIGHTS.stat().st_size < 1_000_000


def test_heldout_accuracy():
    assert metrics.heldout_accuracy() > 0.95


def test_features_shape():
    x = metrics.heldout_digits()[0][:7]
    f = metrics.features(x)
    assert f.shape == (7, metrics.FEATURE_DIM) and f.dtype == torch.float32
    assert torch.equal(metrics.features(x[:, 0]), f)  # (N, 32, 32) accepted too
    with pytest.raises(ValueError):
        metrics.features(torch.zeros(2, 3, 32, 32))


def test_real_halves_close_noise_far():
    x, _ = metrics.heldout_digits()
    even, odd = x[0::2], x[1::2]  # both halves hold every class (the split is sorted by label)
    real = metrics.frechet_distance(metrics.features(even), metrics.features(odd))
    noise = torch.randn(500, 1, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    fake = metrics.frechet_distance(metrics.features(even), metrics.features(noise))
    assert real * 20 < fake, (real, fake)
    assert metrics.fd_to_heldout(noise) > 20 * metrics.fd_to_heldout(even)


def test_class_histogram():
    x, y = metrics.heldout_digits()
    h = metrics.class_histogram(x[::7])
    assert h.shape == (10,) and h.dtype == torch.int64 and int(h.sum()) == len(x[::7])
    noise = torch.rand(33, 1, 32, 32) * 2 - 1
    assert int(metrics.class_histogram(noise).sum()) == 33


def test_one_pass_helpers_agree():
    x = metrics.heldout_digits()[0][3::50]
    fd, h = metrics.fd_and_histogram(x)
    assert fd == pytest.approx(metrics.fd_to_heldout(x), rel=1e-9)
    assert torch.equal(h, metrics.class_histogram(x))


def test_memorisation_check_tells_copies_from_new_digits():
    """Training digits are at distance 0 from the training set; a 'model' that returns copies of
    them has ratios 0, the held-out digits themselves ratio 1 (the check can fail both ways)."""
    from fastddim.data import mnist

    train = mnist("train")[0]
    assert torch.equal(metrics.nearest_training_distance(train[:5]), torch.zeros(5))
    copies = metrics.memorisation(train[:200] + 0.01)
    assert copies["median_ratio"] < 0.1 and copies["p5_ratio"] < 0.1  # 0.01 * sqrt(1024) = 0.32 against ~4-10
    held = metrics.memorisation(metrics.heldout_digits()[0])
    assert held["median_ratio"] == pytest.approx(1.0) and held["heldout"]["median"] > 5.0
