"""Reading embedding files in chunks: ``.npy`` (memory-mapped) or the authors' ``.pkl`` chunks.

Both the offline CLI and profile building stream through these readers, so a file larger than
memory works: ``.npy`` is opened with ``mmap_mode="r"`` and read one slice at a time, and a
directory of ``.pkl`` chunks is read one file at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import InputError
from app.safe_pickle import load_restricted

DEFAULT_CHUNK_ROWS = 65536


@dataclass(frozen=True)
class Chunk:
    """A slice of an embedding source: rows, and their ids when the source carries ids."""

    rows: np.ndarray
    ids: list[Any] | None = None


class EmbeddingSource:
    """A re-iterable source of embedding chunks (profile building reads texts twice)."""

    def __init__(self, path: str | Path, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        self.path = Path(path)
        self.chunk_rows = chunk_rows
        if not self.path.exists():
            raise InputError(f"{self.path} does not exist")
        if self.path.is_dir():
            self._files = sorted(self.path.glob("*.pkl"))
            if not self._files:
                raise InputError(f"{self.path} holds no .pkl embedding chunks")
            self._array: np.ndarray | None = None
        else:
            self._files = []
            self._array = _open_npy(self.path)

    @property
    def rows(self) -> int | None:
        """Total row count when known without reading (``.npy``), else ``None``."""
        return None if self._array is None else int(self._array.shape[0])

    @property
    def dim(self) -> int | None:
        return None if self._array is None else int(self._array.shape[1])

    def __iter__(self) -> Iterator[Chunk]:
        """Chunks as fresh arrays (safe to keep)."""
        if self._array is not None:
            arr = self._array
            for start in range(0, arr.shape[0], self.chunk_rows):
                yield Chunk(np.array(arr[start : start + self.chunk_rows]))
            return
        for f in self._files:
            yield _read_pkl_chunk(f)

    def arrays(self) -> Iterator[np.ndarray]:
        for chunk in self:
            yield chunk.rows

    def reused_chunks(self) -> Iterator[Chunk]:
        """Chunks read into one reusable buffer: each is overwritten by the next.

        For a little-endian float32 ``.npy`` this reads the file sequentially with
        ``readinto``, no page faults and no allocation per chunk: the fastest way through a
        file larger than memory. Other sources fall back to :meth:`__iter__`.
        """
        arr = self._array
        if not (
            isinstance(arr, np.memmap) and arr.dtype == np.dtype("<f4") and arr.flags.c_contiguous
        ):
            yield from self
            return
        n, d = arr.shape
        buf = np.empty((min(self.chunk_rows, n), d), dtype=np.float32)
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(int(arr.offset))
            for start in range(0, n, self.chunk_rows):
                view = buf[: min(self.chunk_rows, n - start)]
                want = view.nbytes
                got = fh.readinto(view.data)
                if got != want:
                    raise InputError(f"{self.path} is truncated at row {start}")
                yield Chunk(view)


def _open_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path} is not a readable .npy array: {exc}") from exc
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{path} holds no array")
    if arr.ndim != 2:
        raise InputError(f"{path}: expected a 2-D array (n, d), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{path} is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{path}: expected a float array, got dtype {arr.dtype}")
    return arr


def _read_pkl_chunk(path: Path) -> Chunk:
    """One authors' chunk: a list of ``{"id": ..., "embed": vector}``."""
    data = load_restricted(path)
    if not isinstance(data, list) or not data:
        raise InputError(f"{path}: expected a non-empty list of {{'id', 'embed'}} records")
    ids: list[Any] = []
    vectors: list[np.ndarray] = []
    for k, rec in enumerate(data):
        if not isinstance(rec, dict) or "embed" not in rec:
            raise InputError(f"{path}: record {k} is not a dict with an 'embed' key")
        vec = np.asarray(rec["embed"])
        if vec.ndim != 1 or not np.issubdtype(vec.dtype, np.number):
            raise InputError(f"{path}: record {k}: 'embed' must be a 1-D numeric vector")
        ids.append(_plain_id(rec.get("id", k)))
        vectors.append(vec)
    dims = {v.shape[0] for v in vectors}
    if len(dims) != 1:
        raise InputError(f"{path}: records have different dimensions {sorted(dims)}")
    return Chunk(np.stack(vectors).astype(np.float32, copy=False), ids)


def _plain_id(value: Any) -> Any:
    """Ids go to JSON: NumPy scalars become Python scalars."""
    return value.item() if isinstance(value, np.generic) else value
