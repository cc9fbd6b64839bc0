"""Restricted unpickling for the method authors' files (statistics and embedding chunks).

``pickle.load`` executes arbitrary code. The authors' files only ever hold dicts, lists,
strings, numbers and NumPy arrays, so we allow exactly the globals that NumPy needs to rebuild
arrays and scalars, and refuse everything else with a clear error before anything runs.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from app.errors import InputError

_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("collections", "OrderedDict"),
        ("builtins", "complex"),
    }
)


class UnsafePickleError(InputError):
    code = "unsafe_pickle"


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to unpickle global {module}.{name}: only NumPy arrays, scalars and plain "
            "containers are allowed"
        )


def load_restricted(path: str | Path) -> Any:
    """Unpickle ``path`` allowing only NumPy arrays, scalars and built-in containers."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {p}: {exc.strerror or exc}") from exc
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{p}: {exc.message}") from exc
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
    ) as exc:
        raise InputError(f"{p} is not a valid pickle file: {exc}") from exc
