"""Offline batch work for the CLI: building profiles from files and applying them to files.

Streaming throughout: inputs are read in chunks (``embedding_io``), outputs written into a
memory-mapped ``.npy``, so files larger than memory work. The transform is the service's own
:func:`app.realign.align`, so offline and online results are the same numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.embedding_io import EmbeddingSource
from app.errors import AlignmentInputError, InputError
from app.profiles import Profile, build_profile, build_profile_from_arrays
from app.realign import align, bad_rows_error

Progress = Callable[[int], None]


@dataclass(frozen=True)
class ApplyResult:
    rows: int
    dim: int
    out: Path
    ids_out: Path | None


def _counted(chunks: Iterable[np.ndarray], progress: Progress | None) -> Iterator[np.ndarray]:
    for chunk in chunks:
        yield chunk
        if progress:
            progress(int(chunk.shape[0]))


def build_profile_from_sources(
    texts: EmbeddingSource,
    images: EmbeddingSource,
    *,
    name: str,
    model: str,
    source: str,
    progress: Callable[[str, int | None], Progress] | None = None,
) -> Profile:
    """Two text passes and one image pass over files; ``progress(label, total)`` makes bars."""

    def factory(src: EmbeddingSource, label: str) -> Callable[[int], Iterable[np.ndarray]]:
        def make(pass_no: int) -> Iterable[np.ndarray]:
            title = label if label == "images" else f"{label} (pass {pass_no}/2)"
            bar = progress(title, src.rows) if progress else None
            return _counted(src.arrays(), bar)

        return make

    return build_profile(
        factory(texts, "texts"), factory(images, "images"), name=name, model=model, source=source
    )


def apply_to_file(
    profile: Profile | None,
    source: EmbeddingSource,
    out: str | Path,
    *,
    alignment: str = "realign",
    device: str = "cpu",
    progress: Progress | None = None,
) -> ApplyResult:
    """Align every row of ``source`` into ``out`` (.npy, float32), chunk by chunk.

    For sources with ids (the authors' ``.pkl`` chunks), the ids are written beside the array
    as ``<out>.ids.json`` in row order.
    """
    out_path = Path(out)
    if out_path.suffix != ".npy":
        raise InputError(f"--out must end in .npy, got {out_path.name}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stats = profile.tensors(device) if profile is not None else None

    def transform(rows: np.ndarray, offset: int, out: np.ndarray | None = None) -> np.ndarray:
        with warnings.catch_warnings():
            # chunks may be read-only memory maps; align() never writes to its input
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            batch = torch.from_numpy(rows)
        if batch.dtype != torch.float32:
            batch = batch.to(torch.float32)
        target = torch.from_numpy(out) if out is not None and device == "cpu" else None
        try:
            result = align(batch.to(device), stats, alignment, out=target)
        except AlignmentInputError as exc:  # name rows in whole-file coordinates
            raise bad_rows_error([r + offset for r in exc.rows]) from exc
        if target is None:
            host = result.cpu().numpy()
            if out is not None:
                out[...] = host
            return host
        return out  # type: ignore[return-value]

    if source.rows is not None:
        return _apply_known_length(source, out_path, transform, progress)
    return _apply_unknown_length(source, out_path, transform, progress)


def _apply_known_length(
    source: EmbeddingSource,
    out_path: Path,
    transform: Callable[..., np.ndarray],
    progress: Progress | None,
) -> ApplyResult:
    """``.npy`` in, ``.npy`` out: two reusable buffers and sequential reads and writes."""
    n, d = source.rows or 0, source.dim or 0
    out_buf = np.empty((min(source.chunk_rows, n), d), dtype="<f4")
    try:
        with open(out_path, "wb") as fh:
            header = {"descr": "<f4", "fortran_order": False, "shape": (n, d)}
            np.lib.format.write_array_header_1_0(fh, header)
            offset = 0
            for chunk in source.reused_chunks():
                k = chunk.rows.shape[0]
                fh.write(transform(chunk.rows, offset, out=out_buf[:k]).data)
                offset += k
                if progress:
                    progress(k)
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    return ApplyResult(rows=n, dim=d, out=out_path, ids_out=None)


def _apply_unknown_length(
    source: EmbeddingSource,
    out_path: Path,
    transform: Callable[[np.ndarray, int], np.ndarray],
    progress: Progress | None,
) -> ApplyResult:
    """Row count unknown up front (pkl chunks): stream raw rows to a temp file, then add the
    ``.npy`` header and copy; ids are streamed to JSON as they come."""
    ids_path = out_path.with_suffix(".ids.json")
    fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, suffix=".raw")
    rows, dim = 0, None
    try:
        with os.fdopen(fd, "wb") as raw, open(ids_path, "w") as ids_fh:
            ids_fh.write("[")
            for chunk in source:
                aligned = transform(chunk.rows, rows)
                if dim is None:
                    dim = aligned.shape[1]
                elif aligned.shape[1] != dim:
                    raise InputError(f"chunk dimension {aligned.shape[1]} differs from {dim}")
                raw.write(np.ascontiguousarray(aligned, dtype="<f4").tobytes())
                for k, ident in enumerate(chunk.ids or []):
                    ids_fh.write(("," if rows + k else "") + json.dumps(ident))
                rows += aligned.shape[0]
                if progress:
                    progress(aligned.shape[0])
            ids_fh.write("]\n")
        with open(out_path, "wb") as fh, open(tmp_name, "rb") as raw_in:
            header = {"descr": "<f4", "fortran_order": False, "shape": (rows, dim or 0)}
            np.lib.format.write_array_header_1_0(fh, header)
            shutil.copyfileobj(raw_in, fh, length=16 * 1024 * 1024)
    except BaseException:
        out_path.unlink(missing_ok=True)
        ids_path.unlink(missing_ok=True)
        raise
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return ApplyResult(rows=rows, dim=dim or 0, out=out_path, ids_out=ids_path)


def run_evaluation(
    *,
    images: str | Path,
    texts: str | Path,
    profile: str | Path | None,
    out_dir: str | Path,
    paired: bool,
    sample: int = 5000,
    seed: int = 0,
) -> str:
    """``realign eval``: align the texts every way, measure the gap, write JSON + plots.

    Returns the printable table. Without a profile, statistics are built from these very
    inputs (treated as unpaired), which is what a user does before committing to a profile.
    """
    from app import evaluate

    img = _load_small(images)
    txt = _load_small(texts)
    if img.shape[1] != txt.shape[1]:
        raise InputError(f"image dimension {img.shape[1]} != text dimension {txt.shape[1]}")
    if paired and img.shape[0] != txt.shape[0]:
        raise InputError(f"--paired needs equal row counts, got {img.shape[0]} and {txt.shape[0]}")
    prof = (
        Profile.load(profile)
        if profile is not None
        else build_profile_from_arrays(txt, img, name="eval", model="eval", source="eval")
    )
    stats = prof.tensors("cpu")
    batch = torch.from_numpy(txt)
    aligned = {name: align(batch, stats, name).numpy() for name in ("none", "anchor", "realign")}
    result = evaluate.evaluate(img, txt, aligned, paired=paired, sample=sample, seed=seed)
    result.setdefault("meta", {})["profile"] = prof.summary()
    evaluate.write_report(
        result, img, txt, aligned, Path(out_dir), paired=paired, sample=sample, seed=seed
    )
    return evaluate.format_table(result)


def _load_small(path: str | Path) -> np.ndarray:
    """Evaluation loads its inputs (metrics subsample internally; 10^5 x 1024 f32 = 400 MB)."""
    src = EmbeddingSource(path)
    return np.concatenate([np.asarray(c, dtype=np.float32) for c in src.arrays()])
