"""Reading text corpora for the CLI: one text per line, or JSONL records with a ``text`` field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from app.errors import InputError


def read_texts(path: str | Path) -> Iterator[str]:
    """Yield the texts of ``path``; ``.jsonl`` files (or lines starting with ``{``) are JSON.

    Blank lines are skipped; a JSON line without a string ``text`` is an error naming the line.
    """
    p = Path(path)
    try:
        fh = p.open(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {p}: {exc.strerror or exc}") from exc
    jsonl = p.suffix == ".jsonl"
    with fh:
        try:
            for lineno, line in enumerate(fh, start=1):
                stripped = line.strip()
                if not stripped:
                    continue
                if jsonl or stripped.startswith("{"):
                    yield _json_text(stripped, p, lineno)
                else:
                    yield stripped
        except UnicodeDecodeError as exc:
            raise InputError(f"{p} is not valid UTF-8 text: {exc}") from exc


def _json_text(line: str, path: Path, lineno: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str) or not text:
        raise InputError(f"{path}:{lineno}: expected a record with a non-empty string 'text'")
    return text


def count_texts(path: str | Path) -> int:
    return sum(1 for _ in read_texts(path))
