"""Streaming, mergeable moment statistics for ReAlign, in float64.

ReAlign needs, per modality, the mean of the L2-normalised embeddings and the trace of their
covariance, and for texts a second pass: the mean after trace alignment and re-projection onto
the sphere (``mu_hat``). Corpora are large (10^7 vectors) and sharded, so every accumulator
here takes chunks in any order and merges with another accumulator exactly: the trace uses
Chan et al.'s pairwise update of the sum of squared deviations (each chunk is centred on its
own mean first), which avoids the catastrophic cancellation of ``E||x||^2 - ||E x||^2``.

No torch, no I/O: plain NumPy so that the maths is testable alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from app.errors import AlignmentInputError, InputError

#: DESIGN.md §1: s = sqrt(T_i / (T_t + eps)).
SCALE_EPS = 1e-10


def normalize_rows(chunk: np.ndarray, *, row_offset: int = 0) -> np.ndarray:
    """Return ``chunk`` as float64 with unit-norm rows; refuse rows that cannot be normalised.

    ``row_offset`` is the index of the chunk's first row in the whole input, so that the error
    names rows as the user counts them.
    """
    x = np.asarray(chunk)
    if x.ndim != 2:
        raise InputError(f"expected a 2-D array of embeddings (n, d), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"expected floating-point embeddings, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=True)
    norms = np.linalg.norm(x, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0.0)
    if bad.any():
        rows = (np.flatnonzero(bad) + row_offset).tolist()
        shown = ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")
        raise AlignmentInputError(
            f"{len(rows)} row(s) are zero or contain NaN/inf and cannot be normalised: rows {shown}",
            rows,
        )
    x /= norms[:, None]
    return x


@dataclass
class MomentAccumulator:
    """Count, mean and covariance trace of a stream of vectors (normalised on the way in).

    ``m2`` is the total sum of squared deviations from the running mean, so the trace of the
    (population) covariance is ``m2 / count``: the mean of ``||x - mu||^2`` as DESIGN.md defines.
    """

    dim: int | None = None
    count: int = 0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    m2: float = 0.0

    def update(self, chunk: np.ndarray, *, normalize: bool = True) -> MomentAccumulator:
        """Add a chunk of row vectors; returns ``self`` so calls chain."""
        x = (
            normalize_rows(chunk, row_offset=self.count)
            if normalize
            else np.asarray(chunk, np.float64)
        )
        if x.shape[0] == 0:
            return self
        part = MomentAccumulator(dim=x.shape[1], count=x.shape[0], mean=x.mean(axis=0))
        centred = x - part.mean
        part.m2 = float(np.einsum("ij,ij->", centred, centred))
        self._absorb(part)
        return self

    def merge(self, other: MomentAccumulator) -> MomentAccumulator:
        """Return a new accumulator equal to one pass over both inputs."""
        out = MomentAccumulator(dim=self.dim, count=self.count, mean=self.mean.copy(), m2=self.m2)
        out._absorb(other)
        return out

    def _absorb(self, other: MomentAccumulator) -> None:
        if other.count == 0:
            return
        if self.dim is not None and other.dim is not None and self.dim != other.dim:
            raise InputError(f"dimension mismatch: {self.dim} vs {other.dim}")
        if self.count == 0:
            self.dim, self.count, self.mean, self.m2 = (
                other.dim,
                other.count,
                other.mean.copy(),
                other.m2,
            )
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.m2 = self.m2 + other.m2 + float(delta @ delta) * self.count * other.count / n
        self.mean = self.mean + delta * (other.count / n)
        self.count = n

    @property
    def trace(self) -> float:
        """Trace of the covariance = mean squared distance to the mean."""
        if self.count == 0:
            raise InputError("no vectors were accumulated")
        return self.m2 / self.count


@dataclass
class MeanAccumulator:
    """Mergeable mean of a stream of vectors (float64, count-weighted pairwise updates)."""

    count: int = 0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def add(self, x: np.ndarray) -> None:
        if x.shape[0] == 0:
            return
        self._absorb(MeanAccumulator(count=x.shape[0], mean=x.mean(axis=0)))

    def merge(self, other: MeanAccumulator) -> MeanAccumulator:
        out = MeanAccumulator(count=self.count, mean=self.mean.copy())
        out._absorb(other)
        return out

    def _absorb(self, other: MeanAccumulator) -> None:
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean = other.count, other.mean.copy()
            return
        if self.mean.shape != other.mean.shape:
            raise InputError(f"dimension mismatch: {self.mean.shape[0]} vs {other.mean.shape[0]}")
        n = self.count + other.count
        self.mean = self.mean + (other.mean - self.mean) * (other.count / n)
        self.count = n


def trace_scale(trace_txt: float, trace_img: float) -> float:
    """The scalar that matches the text residual energy to the image residual energy."""
    return float(np.sqrt(trace_img / (trace_txt + SCALE_EPS)))


@dataclass
class DriftAccumulator:
    """Second pass over the texts: the mean ``mu_hat`` of trace-aligned, re-projected texts.

    Projection onto the sphere moves the centroid again ("phantom drift"); ``mu_hat`` is what
    the centroid step subtracts. It depends on ``mu_txt``, ``mu_img`` and ``scale``, hence a
    separate pass after the first one has finished.
    """

    mu_txt: np.ndarray
    mu_img: np.ndarray
    scale: float
    acc: MeanAccumulator = field(default_factory=MeanAccumulator)

    def update(self, chunk: np.ndarray, *, row_offset: int | None = None) -> DriftAccumulator:
        offset = self.acc.count if row_offset is None else row_offset
        e = normalize_rows(chunk, row_offset=offset)
        if e.shape[1] != self.mu_txt.shape[0]:
            raise InputError(f"dimension mismatch: {e.shape[1]} vs {self.mu_txt.shape[0]}")
        y = self.mu_img + self.scale * (e - self.mu_txt)
        norms = np.linalg.norm(y, axis=1, keepdims=True)
        np.maximum(norms, 1e-300, out=norms)
        self.acc.add(y / norms)
        return self

    def merge(self, other: DriftAccumulator) -> DriftAccumulator:
        return DriftAccumulator(self.mu_txt, self.mu_img, self.scale, self.acc.merge(other.acc))

    @property
    def mu_hat(self) -> np.ndarray:
        if self.acc.count == 0:
            raise InputError("no vectors were accumulated")
        return self.acc.mean


@dataclass(frozen=True)
class ReAlignStatistics:
    """Everything a profile needs, as computed from unpaired texts and images."""

    mu_txt: np.ndarray
    mu_img: np.ndarray
    mu_hat: np.ndarray
    scale: float
    trace_txt: float
    trace_img: float
    n_txt: int
    n_img: int


def accumulate(chunks: Iterable[np.ndarray]) -> MomentAccumulator:
    """One pass of :class:`MomentAccumulator` over an iterable of chunks."""
    acc = MomentAccumulator()
    for chunk in chunks:
        acc.update(chunk)
    if acc.count == 0:
        raise InputError("no vectors in input")
    return acc


def finish_statistics(
    text: MomentAccumulator, image: MomentAccumulator, drift: DriftAccumulator
) -> ReAlignStatistics:
    """Combine the three accumulators into final statistics."""
    return ReAlignStatistics(
        mu_txt=text.mean,
        mu_img=image.mean,
        mu_hat=drift.mu_hat,
        scale=drift.scale,
        trace_txt=text.trace,
        trace_img=image.trace,
        n_txt=text.count,
        n_img=image.count,
    )


def start_drift(text: MomentAccumulator, image: MomentAccumulator) -> DriftAccumulator:
    """Begin the second text pass once both first-pass accumulators are complete."""
    if text.dim != image.dim:
        raise InputError(f"text and image dimensions differ: {text.dim} vs {image.dim}")
    return DriftAccumulator(text.mean, image.mean, trace_scale(text.trace, image.trace))
