"""Tests for app/evaluate.py: each metric on constructed cases with known answers, checked against
brute-force references written here (full sorts, scipy), plus the report and memory bounds."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import gaussian_kde as scipy_kde
from scipy.stats import ortho_group

from app import evaluate as ev
from app.errors import InputError


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cloud(rng: np.random.Generator, n: int, d: int, centre: float = 0.0) -> np.ndarray:
    """Gaussian cloud around ``centre * e_0`` (unnormalised; the metrics normalise)."""
    x = rng.standard_normal((n, d))
    x[:, 0] += centre
    return x


def brute_knn(queries: np.ndarray, pool: np.ndarray, k: int, self_offset: int | None) -> list:
    """Neighbour sets by a full argsort of float64 cosines."""
    sims = unit(queries) @ unit(pool).T
    out = []
    for q in range(len(queries)):
        order = [j for j in np.argsort(-sims[q]) if self_offset is None or j != self_offset + q]
        out.append(set(order[:k]))
    return out


def gap_world(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Paired images and texts sharing content, with a modality offset and a narrower text cloud."""
    content = rng.standard_normal((n, d))
    offset = np.zeros(d)
    offset[0] = 3.0
    images = content + 0.5 * rng.standard_normal((n, d)) + offset
    texts = 0.6 * content + 0.3 * rng.standard_normal((n, d)) - offset
    return unit(images), unit(texts)


def anchor(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    return unit(texts - texts.mean(0) + images.mean(0))


# ---------------------------------------------------------------- centroid gap


def test_centroid_gap_identical_and_disjoint() -> None:
    rng = np.random.default_rng(0)
    a, b = cloud(rng, 4000, 16), cloud(rng, 4000, 16)
    assert ev.centroid_gap(a, a) == 0.0
    assert ev.centroid_gap(a, b) < 0.05
    far_a, far_b = cloud(rng, 500, 16, centre=40.0), cloud(rng, 500, 16, centre=-40.0)
    assert ev.centroid_gap(far_a, far_b) > 1.9
    expected = np.linalg.norm(unit(far_a).mean(0) - unit(far_b).mean(0))
    assert ev.centroid_gap(far_a, far_b) == pytest.approx(expected, rel=1e-12)


def test_centroid_is_chunk_independent(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    x, y = cloud(rng, 1000, 8, 1.0), cloud(rng, 700, 8, -1.0)
    whole = ev.centroid_gap(x, y)
    monkeypatch.setattr(ev, "_BLOCK", 8 * 7)  # 7 rows per chunk
    assert ev.centroid_gap(x, y) == pytest.approx(whole, rel=1e-12)


# ---------------------------------------------------------------- JS divergence


def test_kde_and_js_match_scipy() -> None:
    rng = np.random.default_rng(2)
    v = np.tanh(rng.standard_normal(3000) * 0.4)
    grid = np.linspace(-1, 1, 201)
    np.testing.assert_allclose(ev.gaussian_kde(v, grid), scipy_kde(v)(grid), rtol=1e-9, atol=1e-12)
    p, q = rng.random(50), rng.random(50)
    expected = jensenshannon(p, q, base=2) ** 2
    assert ev.js_from_densities(p, q) == pytest.approx(expected, rel=1e-9)
    assert ev.js_from_densities(p, p) == pytest.approx(0.0, abs=1e-12)
    disjoint = ev.js_from_densities(np.r_[1.0, 0.0], np.r_[0.0, 1.0])
    assert disjoint == pytest.approx(1.0)
    subnormal = np.r_[0.5, 0.5, 5e-324]  # 0.5 * 5e-324 underflows to 0: must not give inf
    assert ev.js_from_densities(subnormal, np.r_[0.5, 0.5, 0.0]) == pytest.approx(0.0, abs=1e-12)


def test_js_divergence_identical_vs_different_shapes() -> None:
    rng = np.random.default_rng(3)
    a, b = cloud(rng, 3000, 32), cloud(rng, 3000, 32)
    assert ev.js_divergence(a, b, pairs=5000) < 0.01
    tight = cloud(rng, 3000, 32, centre=30.0)  # pairwise cosines near 1
    assert ev.js_divergence(a, tight, pairs=5000) > 0.9
    degenerate = np.ones((50, 4))  # every cosine is exactly 1: must not crash
    assert 0.0 <= ev.js_divergence(degenerate, a[:50, :4]) <= 1.0


def test_pair_indices_are_valid_and_seeded() -> None:
    i, j = ev.pair_indices(1000, 400, seed=5)
    assert len(i) == 400 and np.all(i != j) and j.max() < 1000
    i2, j2 = ev.pair_indices(1000, 400, seed=5)
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_array_equal(j, j2)
    i, j = ev.pair_indices(10, 400, seed=5)  # few rows: every pair, once
    assert len(i) == 45 and np.all(i < j)


# ---------------------------------------------------------------- k-NN mixing


def test_knn_mixing_matches_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    images, texts = cloud(rng, 70, 6, 0.8), cloud(rng, 50, 6, -0.3)
    k = 7
    neighbours = brute_knn(texts, np.concatenate([images, texts]), k, self_offset=len(images))
    expected = np.mean([sum(j < len(images) for j in s) / k for s in neighbours])
    assert ev.knn_mixing_rate(images, texts, k) == pytest.approx(expected)
    monkeypatch.setattr(ev, "_BLOCK", 120 * 3)  # 3 query rows per chunk
    assert ev.knn_mixing_rate(images, texts, k) == pytest.approx(expected)


def test_knn_mixing_identical_and_disjoint() -> None:
    rng = np.random.default_rng(5)
    a, b = cloud(rng, 1500, 8), cloud(rng, 1500, 8)
    assert ev.knn_mixing_rate(a, b) == pytest.approx(0.5, abs=0.03)
    far_a, far_b = cloud(rng, 300, 8, centre=50.0), cloud(rng, 300, 8, centre=-50.0)
    assert ev.knn_mixing_rate(far_a, far_b) == 0.0


# ---------------------------------------------------------------- spectrum


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5])
def test_power_law_exact_spectrum(alpha: float) -> None:
    lam = np.arange(1, 257, dtype=np.float64) ** -alpha
    assert ev.power_law_exponent(lam) == pytest.approx(alpha, abs=1e-9)
    assert ev.power_law_exponent(np.zeros(10)) is None


@pytest.mark.parametrize("alpha", [0.6, 1.2])
def test_power_law_recovered_from_samples(alpha: float) -> None:
    """Rows ``Q diag(sqrt(lambda)) s`` with random signs ``s`` all have the same norm, so
    normalising only rescales: the covariance eigenvalues of the normalised rows are ∝ k^-alpha."""
    rng = np.random.default_rng(6)
    d, n = 96, 20000
    lam = np.arange(1, d + 1, dtype=np.float64) ** -alpha
    signs = rng.choice([-1.0, 1.0], size=(n, d))
    x = (signs * np.sqrt(lam)) @ ortho_group.rvs(d, random_state=7).T
    spectrum = ev.covariance_spectrum(x)
    np.testing.assert_allclose(spectrum[:5] / spectrum[0], lam[:5], rtol=0.1)
    assert ev.power_law_exponent(spectrum) == pytest.approx(alpha, abs=0.05)


def test_covariance_spectrum_matches_numpy() -> None:
    rng = np.random.default_rng(8)
    x = cloud(rng, 500, 12, 2.0)
    expected = np.sort(np.linalg.eigvalsh(np.cov(unit(x), rowvar=False)))[::-1]
    np.testing.assert_allclose(ev.covariance_spectrum(x), expected, atol=1e-12)


# ---------------------------------------------------------------- neighbourhood overlap


def test_neighbourhood_overlap() -> None:
    rng = np.random.default_rng(9)
    x = cloud(rng, 400, 16)
    assert ev.neighbourhood_overlap(x, x) == 1.0
    rotated = x @ ortho_group.rvs(16, random_state=1)
    assert ev.neighbourhood_overlap(x, rotated) == pytest.approx(1.0)
    mixed = x @ rng.standard_normal((16, 16))  # a random non-orthogonal map
    noisy = x + rng.standard_normal(x.shape)
    assert ev.neighbourhood_overlap(x, mixed) < 0.7
    assert ev.neighbourhood_overlap(x, noisy) < 0.7
    small, small_noisy = x[:60], noisy[:60]
    before, after = brute_knn(small, small, 5, 0), brute_knn(small_noisy, small_noisy, 5, 0)
    expected = np.mean([len(b & a) / 5 for b, a in zip(before, after, strict=True)])
    assert ev.neighbourhood_overlap(small, small_noisy, 5) == pytest.approx(expected)


# ---------------------------------------------------------------- paired metrics


def test_paired_recall_and_cosine() -> None:
    rng = np.random.default_rng(10)
    images = cloud(rng, 1000, 32)
    assert ev.retrieval_recall(images, images) == {1: 1.0, 5: 1.0}
    np.testing.assert_allclose(ev.paired_cosines(images, 3.0 * images), 1.0)
    random_texts = cloud(rng, 1000, 32)
    recall = ev.retrieval_recall(images, random_texts)
    assert recall[1] < 0.01 and recall[5] < 0.02  # chance: 0.001 and 0.005
    noisy = images + 1.5 * rng.standard_normal(images.shape)
    sims = unit(noisy) @ unit(images).T
    ranks = (sims > np.diag(sims)[:, None]).sum(1)
    assert ev.retrieval_recall(images, noisy) == {1: np.mean(ranks < 1), 5: np.mean(ranks < 5)}
    expected_cos = np.einsum("ij,ij->i", unit(images), unit(noisy))
    np.testing.assert_allclose(ev.paired_cosines(images, noisy), expected_cos, rtol=1e-12)


# ---------------------------------------------------------------- evaluate and report


def test_evaluate_on_a_gap_world() -> None:
    rng = np.random.default_rng(11)
    images, texts = gap_world(rng, 1200, 24)
    aligned = {"none": texts, "anchor": anchor(images, texts)}
    result = ev.evaluate(images, texts, aligned, paired=True, sample=500, seed=0)
    json.dumps(result, allow_nan=False)
    assert set(result) == {"meta", "images", "none", "anchor"}
    meta = result["meta"]
    assert (meta["n_images"], meta["n_texts"], meta["dim"], meta["paired"]) == (
        1200,
        1200,
        24,
        True,
    )
    assert meta["sample_sizes"]["knn_mixing"] == {"images": 500, "texts": 500}
    assert meta["sample_sizes"]["retrieval_recall"] == {"pairs": 500}
    assert set(meta["subsampled"]) == {
        "js_divergence",
        "knn_mixing",
        "neighbourhood_overlap",
        "retrieval_recall",
    }
    none, anc = result["none"], result["anchor"]
    assert none["centroid_gap"] > 0.8 and anc["centroid_gap"] < 0.15
    assert none["knn_mixing"] < 0.01 < anc["knn_mixing"]
    assert anc["paired_cosine_mean"] > none["paired_cosine_mean"]
    assert none["neighbourhood_overlap"] == 1.0
    assert none["centroid_gap"] == pytest.approx(ev.centroid_gap(images, texts))
    assert isinstance(result["images"]["power_law_alpha"], float)
    assert none["recall_at_5"] >= none["recall_at_1"] > 0.2
    again = ev.evaluate(images, texts, aligned, paired=True, sample=500, seed=0)
    assert again == result
    table = ev.format_table(result)
    assert "anchor" in table and "R@1" in table and "n/a" not in table


def test_evaluate_unpaired_and_bad_input() -> None:
    rng = np.random.default_rng(12)
    images, texts = unit(cloud(rng, 300, 8, 1.0)), unit(cloud(rng, 200, 8, -1.0))
    result = ev.evaluate(images, texts, {"none": texts}, paired=False, sample=100)
    assert "recall_at_1" not in result["none"] and "R@1" not in ev.format_table(result)
    assert result["meta"]["sample_sizes"]["neighbourhood_overlap"] == {"texts": 100}
    assert result["meta"]["subsampled"] == ["js_divergence", "knn_mixing", "neighbourhood_overlap"]
    with pytest.raises(InputError, match="reserved"):
        ev.evaluate(images, texts, {"meta": texts}, paired=False)
    with pytest.raises(InputError, match="paired"):
        ev.evaluate(images, texts, {"none": texts}, paired=True)
    with pytest.raises(InputError, match="dimension"):
        ev.evaluate(images, texts[:, :4], {}, paired=False)
    bad = texts.copy()
    bad[3, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        ev.evaluate(images, texts, {"none": bad}, paired=False)


def test_write_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    images, texts = gap_world(rng, 600, 16)
    aligned = {"none": texts, "anchor": anchor(images, texts)}
    result = ev.evaluate(images, texts, aligned, paired=True, sample=300)
    paths = ev.write_report(
        result, images, texts, aligned, tmp_path / "out", paired=True, sample=300
    )
    names = {p.name for p in paths}
    assert names == {"metrics.json", "pca.png", "paired_cosine.png", "spectra.png"}
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == result
    for p in paths:
        assert p.stat().st_size > 1000
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    unpaired = ev.write_report(result, images, texts, aligned, tmp_path / "u", paired=False)
    assert {p.name for p in unpaired} == {"metrics.json", "pca.png", "spectra.png"}


def test_import_does_not_load_matplotlib() -> None:
    code = "import sys, app.evaluate; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_memory_stays_bounded() -> None:
    """20k x 256 inputs (20 MiB each): extra numpy memory stays well under one input's size per
    alignment, because quadratic work runs on a subsample in chunks."""
    rng = np.random.default_rng(14)
    images = rng.standard_normal((20000, 256), dtype=np.float32)
    texts = rng.standard_normal((20000, 256), dtype=np.float32)
    aligned = {"none": texts, "shifted": texts + np.float32(0.1)}
    tracemalloc.start()
    try:
        ev.evaluate(images, texts, aligned, paired=True, sample=2000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.1f} MiB"
