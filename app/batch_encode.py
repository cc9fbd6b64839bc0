"""Encoding corpora to ``.npy`` files for the offline CLI (profile build, apply --texts).

Texts are encoded once into a memory-mapped file, so the two passes of profile building read
embeddings back instead of running the encoder twice.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from pathlib import Path

import numpy as np

from app.config import Settings, get_settings
from app.corpus import count_texts, read_texts
from app.errors import InputError

ENCODE_CHUNK = 1024


def _settings(model: str | None, pretrained: str | None) -> Settings:
    return get_settings(model=model, pretrained=pretrained)


def model_id_for(model: str | None, pretrained: str | None) -> str:
    """The fingerprint a profile records, computed without running the model."""
    from app.encoder import fingerprint_for

    return fingerprint_for(_settings(model, pretrained)).model_id


def encode_texts_to_npy(
    path: str | Path,
    out: Path,
    *,
    model: str | None,
    pretrained: str | None,
    progress: Callable[[str, int | None], Callable[[int], None]] | None = None,
) -> int:
    from app.encoder import load_encoder

    n = count_texts(path)
    if n == 0:
        raise InputError(f"{path} holds no texts")
    encoder = load_encoder(_settings(model, pretrained))
    arr = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n, encoder.dim))
    bar = progress("encoding texts", n) if progress else None
    texts = read_texts(path)
    offset = 0
    while chunk := list(islice(texts, ENCODE_CHUNK)):
        arr[offset : offset + len(chunk)] = encoder.encode_texts(chunk).numpy()
        offset += len(chunk)
        if bar:
            bar(len(chunk))
    arr.flush()
    del arr
    return n


def encode_images_to_npy(
    directory: str | Path,
    out: Path,
    *,
    model: str | None,
    pretrained: str | None,
    progress: Callable[[str, int | None], Callable[[int], None]] | None = None,
) -> int:
    from app.encoder import encode_image_files, image_files

    files = image_files(directory)
    if not files:
        raise InputError(f"{directory} holds no images (.png, .jpg, .jpeg, .webp, .bmp)")
    bar = progress("encoding images", len(files)) if progress else None
    arr: np.memmap | None = None
    for offset, rows in encode_image_files(_settings(model, pretrained), files):
        if arr is None:
            arr = np.lib.format.open_memmap(
                out, mode="w+", dtype=np.float32, shape=(len(files), rows.shape[1])
            )
        arr[offset : offset + rows.shape[0]] = rows
        if bar:
            bar(rows.shape[0])
    assert arr is not None
    arr.flush()
    return len(files)
