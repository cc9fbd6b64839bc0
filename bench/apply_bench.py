"""`realign apply` throughput vs a naive float64 NumPy implementation of the authors' procedure.

Both run in this process on the same 1,000,000 x 512 float32 file (written to a temp dir).
Ours is the CLI's own code path (``app.offline.apply_to_file``: mmap'd chunks, float32 torch,
fused in-place ops, memory-mapped output). The baseline reads the same chunks and applies the
four-step formula in float64 with NumPy temporaries, as the authors' offline script does per
embedding chunk. Prints vectors/s for both, the ratio, max abs difference and peak RSS.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/apply_bench.py [--rows 1000000] [--dim 512]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.embedding_io import EmbeddingSource
from app.offline import apply_to_file
from app.profiles import build_profile_from_arrays


def anon_rss_mb() -> float:
    """Anonymous resident memory: what the process itself allocated. (Pages of the memory-
    mapped input and output files are page cache the kernel can drop, so they are excluded.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakSampler:
    """Samples anonymous RSS every 20 ms in a thread; ``peak`` is the maximum seen."""

    def __init__(self) -> None:
        self.peak = anon_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, anon_rss_mb())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss_mb())


def naive_apply(profile, src: Path, chunk: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The authors' formula in float64 NumPy, per chunk, results kept in memory (as they do)."""
    arr = np.load(src, mmap_mode="r")
    out = []
    mu_t, mu_i, mu_h, s = profile.mu_txt, profile.mu_img, profile.mu_hat, profile.scale
    for start in range(0, arr.shape[0], chunk):
        e = np.asarray(arr[start : start + chunk], dtype=np.float64)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        y = mu_i + s * (e - mu_t)
        y = y / np.linalg.norm(y, axis=1, keepdims=True)
        z = y - mu_h + mu_i
        out.append((z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32))
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=65536)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="apply-bench-") as tmp:
        src = Path(tmp) / "texts.npy"
        data = np.lib.format.open_memmap(src, mode="w+", dtype=np.float32, shape=(args.rows, args.dim))
        offset = rng.normal(size=args.dim).astype(np.float32)
        for start in range(0, args.rows, 100_000):
            n = min(100_000, args.rows - start)
            data[start : start + n] = rng.standard_normal((n, args.dim), dtype=np.float32) + offset
        data.flush()
        del data
        sample = np.load(src, mmap_mode="r")[:20_000]
        images = rng.normal(size=(20_000, args.dim)) * 0.5 - offset
        profile = build_profile_from_arrays(np.array(sample), images, name="bench", model="bench")
        del sample
        base = anon_rss_mb()
        print(f"input: {args.rows:,} x {args.dim} float32 ({src.stat().st_size / 2**30:.2f} GiB); anon RSS before: {base:.0f} MB")

        out = Path(tmp) / "aligned.npy"
        with PeakSampler() as mem_ours:
            t0 = time.perf_counter()
            apply_to_file(profile, EmbeddingSource(src, chunk_rows=args.chunk), out)
            t_ours = time.perf_counter() - t0
        print(f"ours  (realign apply): {args.rows / t_ours:>10,.0f} vectors/s  ({t_ours:.2f} s)  peak anon RSS +{mem_ours.peak - base:.0f} MB")

        with PeakSampler() as mem_naive:
            t0 = time.perf_counter()
            ref = naive_apply(profile, src, args.chunk)
            t_naive = time.perf_counter() - t0
        print(f"naive (float64 NumPy): {args.rows / t_naive:>10,.0f} vectors/s  ({t_naive:.2f} s)  peak anon RSS +{mem_naive.peak - base:.0f} MB")

        ours = np.load(out, mmap_mode="r")
        diff = max(float(np.max(np.abs(ours[a : a + 100_000] - ref[a : a + 100_000]))) for a in range(0, args.rows, 100_000))
        print(f"speed-up: {t_naive / t_ours:.2f}x   max abs diff: {diff:.2e}")
        print(f"ours: memory bounded by the chunk ({args.chunk} rows); input and output are memory-mapped")


if __name__ == "__main__":
    main()
