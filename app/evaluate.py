"""Modality-gap metrics and plots for ``realign eval``.

Which alignment is best depends on the encoder and the data (DESIGN.md §4), so users measure on
their own embeddings and choose. Each metric is a small function on numpy arrays whose rows are
embeddings; every one L2-normalises its inputs first, so callers may pass raw encoder outputs.

Memory stays bounded for 10^5 x 1024 inputs:

- linear metrics (centroid gap, covariance spectrum, paired cosine) stream over row chunks and
  use every row;
- quadratic ones (k-NN mixing, neighbourhood overlap, retrieval recall) run chunked on a seeded
  subsample of rows; the JS divergence uses a seeded sample of pairs.

``evaluate`` records in ``meta`` which metrics were subsampled (``subsampled``) and to how many
rows or pairs (``sample_sizes``). This module is
pure numpy; matplotlib is imported lazily inside the plotting functions, so importing
``app.evaluate`` never pulls it in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.errors import InputError

FloatArray = NDArray[np.floating[Any]]

K_MIXING = 20
K_OVERLAP = 10
RECALL_KS = (1, 5)
JS_PAIRS = 20_000
JS_GRID = 1024
PLOT_POINTS = 2000
RESERVED_NAMES = ("images", "meta")
# Elements in one temporary block (e.g. a chunk of similarities): 1 Mi, i.e. 4-8 MiB per copy.
_BLOCK = 1 << 20


# ---------------------------------------------------------------- helpers


def normalise(x: FloatArray) -> FloatArray:
    """Rows scaled to unit norm (float64 stays float64, anything else becomes float32).

    Zero rows stay zero instead of becoming NaN, so one bad row cannot poison a whole metric.
    """
    x = np.asarray(x)
    x = x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(x.dtype).tiny)


def _chunks(n: int, width: int) -> Iterator[slice]:
    """Row slices whose blocks of ``width`` columns hold about ``_BLOCK`` elements."""
    step = max(1, _BLOCK // max(width, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _centroid(x: FloatArray) -> NDArray[np.float64]:
    """Mean of the normalised rows, streamed, accumulated in float64."""
    total = np.zeros(x.shape[1])
    for sl in _chunks(len(x), x.shape[1]):
        total += normalise(x[sl]).sum(axis=0, dtype=np.float64)
    return total / len(x)


def _subsample(n: int, size: int, rng: np.random.Generator) -> NDArray[np.intp]:
    """A uniform random subset of ``size`` row indices in random order (a prefix is again one)."""
    return rng.permutation(n)[: min(n, size)]


# ---------------------------------------------------------------- metrics


def centroid_gap(images: FloatArray, texts: FloatArray) -> float:
    """Euclidean distance between the image and text centroids (means of normalised rows).

    The first-order part of the modality gap; anchor and realign alignment should drive it to ~0.
    """
    return float(np.linalg.norm(_centroid(images) - _centroid(texts)))


def pair_indices(n: int, pairs: int, seed: int) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Index pairs ``(i, j)``, ``i != j``: all of them when there are at most ``pairs``, else a
    seeded uniform sample of ``pairs`` (with replacement; the KDE does not mind duplicates)."""
    if n * (n - 1) // 2 <= pairs:
        i, j = np.triu_indices(n, 1)
        return i, j
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, pairs)
    j = (i + rng.integers(1, n, pairs)) % n  # uniform over j != i
    return i, j


def pair_cosines(x: FloatArray, i: NDArray[np.intp], j: NDArray[np.intp]) -> NDArray[np.float64]:
    """Cosine similarity of rows ``i[p]`` and ``j[p]`` for each pair ``p``, chunked."""
    out = np.empty(len(i))
    for sl in _chunks(len(i), x.shape[1]):
        out[sl] = np.einsum("ij,ij->i", normalise(x[i[sl]]), normalise(x[j[sl]]))
    return out


def gaussian_kde(values: NDArray[np.float64], grid: NDArray[np.float64]) -> NDArray[np.float64]:
    """Gaussian KDE of ``values`` evaluated on ``grid`` (Scott's bandwidth, as scipy's default).

    The bandwidth is floored at the grid spacing so a degenerate sample (all cosines equal)
    still gives a finite density that the grid can see, instead of scipy's singular-matrix error.
    """
    values = np.asarray(values, dtype=np.float64)
    spacing = float(grid[1] - grid[0]) if grid.size > 1 else 1.0
    h = max(float(values.std(ddof=1)) * values.size ** (-0.2), spacing)
    density = np.zeros(grid.size)
    for sl in _chunks(values.size, grid.size):
        z = np.subtract.outer(values[sl], grid)  # one temporary, updated in place
        z /= h
        np.square(z, out=z)
        z *= -0.5
        np.exp(z, out=z)
        density += z.sum(axis=0)
    return density / (values.size * h * math.sqrt(2 * math.pi))


def js_from_densities(p: NDArray[np.float64], q: NDArray[np.float64]) -> float:
    """Jensen-Shannon divergence (base-2 logs, so in [0, 1]) of two densities on one grid."""
    p = p / p.sum()
    q = q / q.sum()
    both = p + q  # a / m is written 2a / (p + q): 0.5 * a underflows to 0 for subnormal a

    def kl(a: NDArray[np.float64]) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(2.0 * a[nz] / both[nz])))

    return min(1.0, max(0.0, 0.5 * kl(p) + 0.5 * kl(q)))


def js_divergence(
    images: FloatArray, texts: FloatArray, *, pairs: int = JS_PAIRS, seed: int = 0
) -> float:
    """JS divergence between the image-image and text-text pairwise-cosine distributions.

    Compares the *shape* of the two clouds (how spread or clumped each is), which a mean shift
    alone does not fix. Each distribution is a Gaussian KDE on a common grid over [-1, 1] built
    from at most ``pairs`` seeded pairs.
    """
    grid = np.linspace(-1.0, 1.0, JS_GRID)
    dens = []
    for x in (images, texts):
        i, j = pair_indices(len(x), pairs, seed)
        dens.append(gaussian_kde(pair_cosines(x, i, j), grid))
    return js_from_densities(dens[0], dens[1])


def _topk(
    queries: FloatArray, pool: FloatArray, k: int, self_offset: int | None
) -> Iterator[NDArray[np.intp]]:
    """Per chunk of (normalised) query rows, the pool indices of each row's ``k`` most cosine-
    similar pool rows, unordered. Query ``q`` is pool row ``self_offset + q`` when given, and is
    then excluded from its own neighbours."""
    for sl in _chunks(len(queries), len(pool)):
        sims = queries[sl] @ pool.T
        if self_offset is not None:
            rows = np.arange(sl.stop - sl.start)
            sims[rows, self_offset + sl.start + rows] = -np.inf
        top = np.argpartition(sims, -k, axis=1)[:, -k:].copy()  # a copy frees the full block
        del sims
        yield top


def knn_mixing_rate(images: FloatArray, texts: FloatArray, k: int = K_MIXING) -> float:
    """Mean over texts of the share of images among its ``k`` nearest neighbours (cosine) in the
    joint pool of images and texts, itself excluded.

    Two identical clouds with equal counts give ~0.5, disjoint clouds 0. Quadratic in rows (the
    work is chunked, so memory is not): pass a subsample for large inputs, as ``evaluate`` does.
    """
    xi, xt = normalise(images), normalise(texts)
    pool = np.concatenate([xi, xt.astype(xi.dtype)])
    k = min(k, len(pool) - 1)
    hits = 0
    for idx in _topk(xt, pool, k, self_offset=len(xi)):
        hits += int(np.count_nonzero(idx < len(xi)))
    return hits / (k * len(xt))


def neighbourhood_overlap(before: FloatArray, after: FloatArray, k: int = K_OVERLAP) -> float:
    """Structure preservation: mean over rows of ``|N_k(before) ∩ N_k(after)| / k``, where
    ``N_k`` is a row's ``k`` nearest neighbours (cosine) among the other rows of the same set.

    1 means the transform kept every neighbourhood (e.g. any rotation); a scalar-trace alignment
    should stay close to 1, whereas whitening does not. Quadratic: pass a subsample.
    """
    b, a = normalise(before), normalise(after)
    k = min(k, len(b) - 1)
    shared = 0
    for nb, na in zip(_topk(b, b, k, 0), _topk(a, a, k, 0), strict=True):
        shared += int(np.count_nonzero(nb[:, :, None] == na[:, None, :]))
    return shared / (k * len(b))


def covariance_spectrum(x: FloatArray) -> NDArray[np.float64]:
    """Eigenvalues (descending, >= 0) of the covariance of the normalised rows.

    Two streaming passes (centroid, then the centred second moment, accumulated in float64),
    so all rows are used with O(d^2) memory.
    """
    mu = _centroid(x)
    d = x.shape[1]
    acc = np.zeros((d, d))
    for sl in _chunks(len(x), d):
        c = normalise(x[sl])
        c = c - mu.astype(c.dtype)
        acc += c.T @ c
    cov = acc / max(len(x) - 1, 1)
    return np.clip(np.linalg.eigvalsh(cov)[::-1], 0.0, None)


def fit_ranks(rank: int) -> tuple[int, int]:
    """The robust rank range ``[lo, hi]`` (1-based) for the power-law fit of ``rank`` eigenvalues.

    The top eigenvalue is skipped (often one dominant direction) and so is everything below the
    middle rank, where finite-sample noise and the numerical floor flatten or bend the spectrum.
    """
    lo = max(2, rank // 100)
    return lo, max(lo, rank // 2)


def power_law_exponent(eigenvalues: NDArray[np.float64]) -> float | None:
    """``alpha`` of the least-squares fit ``log(lambda_k) = -alpha log(k) + c``.

    Fitted over ranks ``fit_ranks(r)`` of the ``r`` numerically non-zero eigenvalues, at ranks
    spaced evenly in log k, so the many tail ranks do not outweigh the head. ``None`` when the
    spectrum has too few non-zero eigenvalues for a fit (fewer than three ranks in range).
    """
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    if lam.size == 0 or lam[0] <= 0:
        return None
    lam = lam[lam > lam[0] * 1e-10]
    lo, hi = fit_ranks(lam.size)
    ranks = np.unique(np.round(np.geomspace(lo, hi, 64)).astype(np.intp))
    if ranks.size < 3:
        return None
    design = np.column_stack([np.log(ranks), np.ones(ranks.size)])
    (slope, _), *_ = np.linalg.lstsq(design, np.log(lam[ranks - 1]), rcond=None)
    return float(-slope)


def paired_cosines(images: FloatArray, texts: FloatArray) -> NDArray[np.float64]:
    """Cosine of each text to its paired image (row ``i`` with row ``i``), chunked over rows."""
    out = np.empty(len(texts))
    for sl in _chunks(len(texts), texts.shape[1]):
        out[sl] = np.einsum("ij,ij->i", normalise(images[sl]), normalise(texts[sl]))
    return out


def retrieval_recall(
    images: FloatArray, texts: FloatArray, ks: tuple[int, ...] = RECALL_KS
) -> dict[int, float]:
    """Text-to-image recall@k: the share of texts whose paired image is among the ``k`` images
    most cosine-similar to it. Ties count in the text's favour (only strictly more similar
    images rank above the pair). Chance level is ``k / n``. Quadratic: pass a subsample."""
    xi, xt = normalise(images), normalise(texts)
    ranks = np.empty(len(xt), dtype=np.intp)
    for sl in _chunks(len(xt), len(xi)):
        sims = xt[sl] @ xi.T
        rows = np.arange(sl.stop - sl.start)
        own = sims[rows, sl.start + rows]
        ranks[sl] = np.count_nonzero(sims > own[:, None], axis=1)
    return {k: float(np.mean(ranks < k)) for k in ks}


# ---------------------------------------------------------------- the evaluation


def _validate(
    images: FloatArray,
    texts: FloatArray,
    aligned: Mapping[str, FloatArray],
    paired: bool,
    sample: int,
) -> None:
    """Fail early with one clear message instead of a numpy error deep inside a metric."""
    for label, x in [("images", images), ("texts", texts), *aligned.items()]:
        if x.ndim != 2 or len(x) < 2:
            raise InputError(f"{label}: expected an (n >= 2, d) array, got shape {x.shape}")
        if x.shape[1] != images.shape[1]:
            raise InputError(f"{label}: dimension {x.shape[1]} != images' {images.shape[1]}")
        for sl in _chunks(len(x), x.shape[1]):
            if not np.isfinite(x[sl]).all():
                raise InputError(f"{label}: contains NaN or infinite values")
    for name, z in aligned.items():
        if name in RESERVED_NAMES:
            raise InputError(f"alignment name {name!r} is reserved")
        if z.shape != texts.shape:
            raise InputError(f"aligned {name!r}: shape {z.shape} != texts' {texts.shape}")
    if paired and len(images) != len(texts):
        raise InputError(f"paired needs as many images as texts ({len(images)} != {len(texts)})")
    if sample < 2:
        raise InputError(f"sample must be >= 2, got {sample}")


def evaluate(
    images: np.ndarray,
    texts: np.ndarray,
    aligned: dict[str, np.ndarray],
    *,
    paired: bool,
    sample: int = 5000,
    seed: int = 0,
) -> dict:
    """Modality-gap metrics of each aligned text set against the images.

    ``aligned`` maps an alignment name (``none``, ``anchor``, ``realign``, ...) to the transformed
    texts, rows in the order of ``texts``. ``paired`` means row ``i`` of images pairs with row
    ``i`` of texts. Returns a JSON-serialisable dict: per alignment name its metrics, an
    ``images`` entry (the image spectrum's power-law exponent) and ``meta`` (sizes, ``k``s and
    which metrics ran on a subsample of how many rows or pairs). Undefined values are ``None``.
    """
    _validate(images, texts, aligned, paired, sample)
    n_i, n_t, d = len(images), len(texts), images.shape[1]
    rng = np.random.default_rng(seed)
    idx_t = _subsample(n_t, sample, rng)
    idx_i = idx_t if paired else _subsample(n_i, sample, rng)
    m = min(len(idx_i), len(idx_t))  # balanced, so perfect mixing always reads 0.5
    img_sub = normalise(images[idx_i])
    txt_sub = normalise(texts[idx_t])
    k_mix = min(K_MIXING, 2 * m - 1)
    k_ov = min(K_OVERLAP, len(idx_t) - 1)

    grid = np.linspace(-1.0, 1.0, JS_GRID)
    pi, pj = pair_indices(n_i, JS_PAIRS, seed)
    ti, tj = pair_indices(n_t, JS_PAIRS, seed)
    img_density = gaussian_kde(pair_cosines(images, pi, pj), grid)
    mu_i = _centroid(images)
    spectrum = covariance_spectrum(images)
    rank = int(np.count_nonzero(spectrum > spectrum[0] * 1e-10)) if spectrum[0] > 0 else 0

    sizes: dict[str, dict[str, int]] = {
        "js_divergence": {"image_pairs": len(pi), "text_pairs": len(ti)},
        "knn_mixing": {"images": m, "texts": m},
        "neighbourhood_overlap": {"texts": len(idx_t)},
    }
    if paired:
        sizes["retrieval_recall"] = {"pairs": len(idx_t)}
    result: dict[str, Any] = {
        "meta": {
            "n_images": n_i,
            "n_texts": n_t,
            "dim": d,
            "paired": paired,
            "sample": sample,
            "seed": seed,
            "k": {"knn_mixing": k_mix, "neighbourhood_overlap": k_ov},
            "neighbourhood_overlap_measure": "mean |intersection| / k",
            "power_law_fit_ranks": list(fit_ranks(rank)),
            "full_data": ["centroid_gap", "power_law_alpha"]
            + (["paired_cosine_mean"] if paired else []),
            "sample_sizes": sizes,
            "subsampled": [
                name
                for name, used, total in [
                    ("js_divergence", len(pi) + len(ti), (n_i * (n_i - 1) + n_t * (n_t - 1)) // 2),
                    ("knn_mixing", 2 * m, n_i + n_t),
                    ("neighbourhood_overlap", len(idx_t), n_t),
                    ("retrieval_recall", len(idx_t) if paired else n_t, n_t),
                ]
                if used < total
            ],
        },
        "images": {"power_law_alpha": power_law_exponent(spectrum)},
    }
    for name, z in aligned.items():
        z_sub = normalise(z[idx_t])
        metrics: dict[str, float | None] = {
            "centroid_gap": float(np.linalg.norm(mu_i - _centroid(z))),
            "js_divergence": js_from_densities(
                img_density, gaussian_kde(pair_cosines(z, ti, tj), grid)
            ),
            "knn_mixing": knn_mixing_rate(img_sub[:m], z_sub[:m], k_mix),
            "power_law_alpha": power_law_exponent(covariance_spectrum(z)),
            "neighbourhood_overlap": neighbourhood_overlap(txt_sub, z_sub, k_ov),
        }
        if paired:
            metrics["paired_cosine_mean"] = float(paired_cosines(images, z).mean())
            recall = retrieval_recall(img_sub, z_sub)
            metrics.update({f"recall_at_{k}": v for k, v in recall.items()})
        result[name] = metrics
    return result


_COLUMNS = [
    ("centroid_gap", "centroid gap"),
    ("js_divergence", "JS div"),
    ("knn_mixing", "kNN mixing"),
    ("power_law_alpha", "alpha"),
    ("neighbourhood_overlap", "nbr overlap"),
    ("paired_cosine_mean", "paired cos"),
    ("recall_at_1", "R@1"),
    ("recall_at_5", "R@5"),
]


def format_table(result: dict) -> str:
    """A Markdown table of the metrics, one row per alignment, plus a line of context."""
    names = [n for n in result if n not in RESERVED_NAMES]
    cols = [(key, title) for key, title in _COLUMNS if any(key in result[n] for n in names)]

    def cell(value: object) -> str:
        return (
            "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        )

    rows = [["alignment", *(t for _, t in cols)]]
    rows += [[n, *(cell(result[n].get(key)) for key, _ in cols)] for n in names]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |"

    meta = result.get("meta", {})
    alpha = cell(result.get("images", {}).get("power_law_alpha"))
    notes = (
        f"images: n={meta.get('n_images')}, alpha={alpha}; texts: n={meta.get('n_texts')}; "
        "lower gap/JS is better, kNN mixing 0.5 is perfect, overlap 1 keeps neighbourhoods"
    )
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), sep, *(line(r) for r in rows[1:]), "", notes])


# ---------------------------------------------------------------- plots


def _same(a: FloatArray, b: FloatArray) -> bool:
    """Whether two arrays hold the same values, compared in chunks (no full-size mask)."""
    if a is b:
        return True
    if a.shape != b.shape:
        return False
    return all(np.array_equal(a[sl], b[sl]) for sl in _chunks(len(a), a.shape[1]))


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on an Agg canvas, without pyplot's global state or backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_pca(
    images: FloatArray,
    texts: FloatArray,
    aligned: Mapping[str, FloatArray],
    path: Path,
    rng: np.random.Generator,
) -> Path:
    """2-D PCA scatter of images, raw texts and each aligned set (same text rows in each)."""
    idx_i = _subsample(len(images), PLOT_POINTS, rng)
    idx_t = _subsample(len(texts), PLOT_POINTS, rng)
    raw = normalise(texts[idx_t]).astype(np.float64)
    sets = [("images", normalise(images[idx_i]).astype(np.float64)), ("texts (raw)", raw)]
    for name, z in aligned.items():
        zs = normalise(z[idx_t]).astype(np.float64)
        if not _same(zs, raw):  # "none" would only hide the raw texts
            sets.append((f"texts: {name}", zs))
    union = np.concatenate([x for _, x in sets])
    mean = union.mean(axis=0)
    _, s, vt = np.linalg.svd(union - mean, full_matrices=False)
    var = s**2 / np.sum(s**2)
    fig = _figure(7, 6)
    ax = fig.subplots()
    for label, x in sets:
        p = (x - mean) @ vt[:2].T
        ax.scatter(p[:, 0], p[:, 1], s=4, alpha=0.4, label=f"{label} (n={len(x)})")
    ax.set_xlabel(f"PC1 ({var[0]:.1%} of variance)")
    ax.set_ylabel(f"PC2 ({var[1]:.1%} of variance)" if var.size > 1 else "PC2")
    ax.set_title("Image and text embeddings, 2-D PCA of their union")
    ax.legend(markerscale=3)
    fig.savefig(path, dpi=120)
    return path


def _plot_paired(images: FloatArray, aligned: Mapping[str, FloatArray], path: Path) -> Path:
    """Histograms of each text's cosine to its paired image, one outline per alignment."""
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    cosines = {name: paired_cosines(images, z) for name, z in aligned.items()}
    lo = min(float(c.min()) for c in cosines.values())
    hi = max(float(c.max()) for c in cosines.values())
    bins = np.linspace(lo, max(hi, lo + 1e-6), 61)
    for name, c in cosines.items():
        ax.hist(
            c,
            bins=bins,
            density=True,
            histtype="step",
            lw=1.5,
            label=f"{name} (mean {c.mean():.3f})",
        )
    ax.set_xlabel("cosine(text, paired image)")
    ax.set_ylabel("density")
    ax.set_title("Cosine of each text to its paired image")
    ax.legend()
    fig.savefig(path, dpi=120)
    return path


def _plot_spectra(
    images: FloatArray, texts: FloatArray, aligned: Mapping[str, FloatArray], path: Path
) -> Path:
    """Covariance eigen-spectra on log-log axes, images vs raw and each aligned text set."""
    fig = _figure(7, 5)
    ax = fig.subplots()
    sets = [("images", images), ("texts (raw)", texts)]
    sets += [(f"texts: {name}", z) for name, z in aligned.items() if not _same(z, texts)]
    image_rank = 0
    for label, x in sets:
        lam = covariance_spectrum(x)
        lam = lam[lam > lam[0] * 1e-10] if lam[0] > 0 else lam[:0]
        image_rank = image_rank or lam.size
        if lam.size == 0:
            continue
        alpha = power_law_exponent(lam)
        tag = "n/a" if alpha is None else f"{alpha:.2f}"
        ax.loglog(np.arange(1, lam.size + 1), lam, lw=1.2, label=f"{label} (alpha {tag})")
    lo, hi = fit_ranks(image_rank)
    ax.axvspan(lo, max(hi, lo + 1), color="grey", alpha=0.12, label="fit range (images)")
    ax.set_xlabel("rank k")
    ax.set_ylabel("covariance eigenvalue lambda_k")
    ax.set_title("Eigen-spectra of normalised embeddings (log-log)")
    ax.legend()
    fig.savefig(path, dpi=120)
    return path


def write_report(
    result: dict,
    images: np.ndarray,
    texts: np.ndarray,
    aligned: dict[str, np.ndarray],
    out_dir: Path,
    *,
    paired: bool,
    sample: int = 5000,
    seed: int = 0,
) -> list[Path]:
    """Write ``metrics.json`` and the PNG plots into ``out_dir``; return the written paths.

    Plots: ``pca.png`` (scatter of at most ``min(sample, PLOT_POINTS)`` seeded rows per set),
    ``paired_cosine.png`` (only when ``paired``) and ``spectra.png``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = out_dir / "metrics.json"
    metrics.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    rng = np.random.default_rng(seed)
    sub_i = images[_subsample(len(images), sample, rng)]
    idx_t = _subsample(len(texts), sample, rng)
    sub_aligned = {name: z[idx_t] for name, z in aligned.items()}
    paths = [metrics, _plot_pca(sub_i, texts[idx_t], sub_aligned, out_dir / "pca.png", rng)]
    if paired:
        paths.append(_plot_paired(images, aligned, out_dir / "paired_cosine.png"))
    paths.append(_plot_spectra(images, texts, aligned, out_dir / "spectra.png"))
    return paths
