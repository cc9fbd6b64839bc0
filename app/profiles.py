"""Profiles: ReAlign statistics plus metadata, one ``.safetensors`` file each (DESIGN.md §3).

A profile belongs to one encoder checkpoint and one domain; ``model`` records the encoder
fingerprint it was built with so the service can refuse a profile built for another model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from app.errors import InputError, NotFoundError, ProfileError, RealignError
from app.realign import AlignmentTensors
from app.safe_pickle import load_restricted
from app.stats import (
    ReAlignStatistics,
    accumulate,
    finish_statistics,
    start_drift,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
KNOWN_FORMAT_VERSIONS = frozenset({"1"})
_VECTORS = ("mu_txt", "mu_img", "mu_hat")
_SCALARS = ("scale", "trace_txt", "trace_img")
_COUNTS = ("n_txt", "n_img")
_METADATA = ("name", "model", "dim", "created", "source", "format_version")


@dataclass(frozen=True)
class Profile:
    """ReAlign statistics for one encoder and one domain, plus where they came from."""

    name: str
    model: str
    mu_txt: np.ndarray
    mu_img: np.ndarray
    mu_hat: np.ndarray
    scale: float
    trace_txt: float
    trace_img: float
    n_txt: int
    n_img: int
    created: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )
    source: str = ""
    format_version: str = FORMAT_VERSION
    _device_cache: dict[str, AlignmentTensors] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def dim(self) -> int:
        return int(self.mu_txt.shape[0])

    @classmethod
    def from_statistics(
        cls, stats: ReAlignStatistics, *, name: str, model: str, source: str = ""
    ) -> Profile:
        profile = cls(
            name=name,
            model=model,
            mu_txt=stats.mu_txt,
            mu_img=stats.mu_img,
            mu_hat=stats.mu_hat,
            scale=stats.scale,
            trace_txt=stats.trace_txt,
            trace_img=stats.trace_img,
            n_txt=stats.n_txt,
            n_img=stats.n_img,
            source=source,
        )
        profile.validate()
        return profile

    # --- validation ------------------------------------------------------------------------
    def validate(self, origin: str | None = None) -> None:
        """Check the invariants the transform relies on; errors name ``origin`` (the file)."""
        where = f"{origin}: " if origin else f"profile {self.name!r}: "
        if self.format_version not in KNOWN_FORMAT_VERSIONS:
            raise ProfileError(
                f"{where}unknown format_version {self.format_version!r} "
                f"(this version reads {', '.join(sorted(KNOWN_FORMAT_VERSIONS))})"
            )
        if not self.name:
            raise ProfileError(f"{where}empty name")
        for key in _VECTORS:
            v = getattr(self, key)
            if v.ndim != 1 or v.shape[0] == 0:
                raise ProfileError(f"{where}{key} must be a non-empty vector, got shape {v.shape}")
            if v.shape[0] != self.dim:
                raise ProfileError(
                    f"{where}{key} has dimension {v.shape[0]}, mu_txt has {self.dim}"
                )
            if not np.isfinite(v).all():
                raise ProfileError(f"{where}{key} contains NaN or inf")
        for key in _SCALARS:
            value = getattr(self, key)
            if not math.isfinite(value):
                raise ProfileError(f"{where}{key} is not finite")
        if self.scale <= 0:
            raise ProfileError(f"{where}scale must be > 0, got {self.scale}")
        if self.trace_txt < 0 or self.trace_img < 0:
            raise ProfileError(f"{where}traces must be >= 0")
        if self.n_txt < 0 or self.n_img < 0:
            raise ProfileError(f"{where}sample counts must be >= 0")

    # --- file format -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, np.ndarray] = {
            k: np.ascontiguousarray(getattr(self, k), np.float64) for k in _VECTORS
        }
        tensors.update({k: np.array(getattr(self, k), dtype=np.float64) for k in _SCALARS})
        tensors.update({k: np.array(getattr(self, k), dtype=np.int64) for k in _COUNTS})
        metadata = {
            "name": self.name,
            "model": self.model,
            "dim": str(self.dim),
            "created": self.created,
            "source": self.source,
            "format_version": self.format_version,
        }
        save_file(tensors, str(p), metadata=metadata)
        p.chmod(0o644)  # safetensors writes 0600; a profile is read by the (non-root) service
        return p

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Load and validate; every failure is a :class:`ProfileError` naming the file."""
        p = Path(path)
        try:
            tensors = load_file(str(p))
            with safe_open(str(p), framework="numpy") as fh:
                metadata: Mapping[str, str] = fh.metadata() or {}
        except FileNotFoundError as exc:
            raise ProfileError(f"{p}: no such profile file") from exc
        except (SafetensorError, OSError, ValueError) as exc:
            raise ProfileError(f"{p}: not a readable safetensors profile ({exc})") from exc
        missing = [k for k in (*_VECTORS, *_SCALARS, *_COUNTS) if k not in tensors]
        missing += [k for k in _METADATA if k not in metadata]
        if missing:
            raise ProfileError(f"{p}: missing field(s) {', '.join(missing)}")
        try:
            profile = cls(
                name=metadata["name"],
                model=metadata["model"],
                mu_txt=tensors["mu_txt"].astype(np.float64),
                mu_img=tensors["mu_img"].astype(np.float64),
                mu_hat=tensors["mu_hat"].astype(np.float64),
                scale=_scalar(tensors["scale"]),
                trace_txt=_scalar(tensors["trace_txt"]),
                trace_img=_scalar(tensors["trace_img"]),
                n_txt=int(_scalar(tensors["n_txt"])),
                n_img=int(_scalar(tensors["n_img"])),
                created=metadata["created"],
                source=metadata["source"],
                format_version=metadata["format_version"],
            )
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"{p}: malformed field ({exc})") from exc
        profile.validate(origin=str(p))
        if metadata["dim"] != str(profile.dim):
            raise ProfileError(
                f"{p}: metadata dim {metadata['dim']} != vector dimension {profile.dim}"
            )
        return profile

    # --- the transform's view --------------------------------------------------------------
    def tensors(self, device: torch.device | str = "cpu") -> AlignmentTensors:
        """Statistics pre-combined on ``device`` (cached: the hot path calls this per batch)."""
        key = str(device)
        cached = self._device_cache.get(key)
        if cached is None:
            cached = AlignmentTensors.from_statistics(
                torch.from_numpy(self.mu_txt),
                torch.from_numpy(self.mu_img),
                torch.from_numpy(self.mu_hat),
                self.scale,
                device=device,
            )
            self._device_cache[key] = cached
        return cached

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description (API and ``profile inspect``)."""
        return {
            "name": self.name,
            "model": self.model,
            "dim": self.dim,
            "scale": self.scale,
            "trace_txt": self.trace_txt,
            "trace_img": self.trace_img,
            "n_txt": self.n_txt,
            "n_img": self.n_img,
            "centroid_gap": float(np.linalg.norm(self.mu_img - self.mu_txt)),
            "created": self.created,
            "source": self.source,
            "format_version": self.format_version,
        }


def _scalar(value: np.ndarray) -> float:
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"expected a scalar, got shape {arr.shape}")
    return float(arr.reshape(()))


# --- building ------------------------------------------------------------------------------
#: Called with the pass number (1 or 2): texts are read twice, images once (pass 1).
ChunkFactory = Callable[[int], Iterable[np.ndarray]]


def build_profile(
    texts: ChunkFactory,
    images: ChunkFactory,
    *,
    name: str,
    model: str,
    source: str = "",
) -> Profile:
    """The authors' procedure as streaming passes: text and image moments, then ``mu_hat``.

    ``texts`` is a factory because the texts are read twice: ``mu_hat`` needs the scale,
    which needs the first pass to be complete.
    """
    text_acc = accumulate(texts(1))
    image_acc = accumulate(images(1))
    drift = start_drift(text_acc, image_acc)
    for chunk in texts(2):
        drift.update(chunk)
    if drift.acc.count != text_acc.count:
        raise InputError("the text source changed between passes")
    return Profile.from_statistics(
        finish_statistics(text_acc, image_acc, drift), name=name, model=model, source=source
    )


def build_profile_from_arrays(
    text: np.ndarray,
    image: np.ndarray,
    *,
    name: str,
    model: str,
    source: str = "",
    chunk_rows: int = 65536,
) -> Profile:
    """Convenience for in-memory (n, d) arrays (normalised inside)."""

    def chunks(arr: np.ndarray) -> ChunkFactory:
        return lambda _pass: (arr[i : i + chunk_rows] for i in range(0, arr.shape[0], chunk_rows))

    for label, arr in (("text", text), ("image", image)):
        if np.ndim(arr) != 2:
            raise InputError(f"{label} embeddings must be a 2-D array, got shape {np.shape(arr)}")
    return build_profile(chunks(text), chunks(image), name=name, model=model, source=source)


def import_authors_stats(path: str | Path, *, name: str, model: str) -> Profile:
    """Convert the authors' ``trace_stats.pkl`` (restricted unpickling) into a Profile."""
    p = Path(path)
    data = load_restricted(p)
    if not isinstance(data, dict):
        raise InputError(f"{p}: expected a dict of statistics, got {type(data).__name__}")
    need = ("mu_txt", "mu_img", "mu_hat", "scale", "trace_txt", "trace_img")
    missing = [k for k in need if k not in data]
    if missing:
        raise InputError(f"{p}: missing key(s) {', '.join(missing)}")
    try:
        vectors = {k: np.asarray(data[k], dtype=np.float64).reshape(-1) for k in _VECTORS}
        scalars = {k: float(np.asarray(data[k]).reshape(())) for k in _SCALARS}
    except (TypeError, ValueError) as exc:
        raise InputError(f"{p}: malformed statistics ({exc})") from exc
    profile = Profile(
        name=name,
        model=model,
        n_txt=int(data.get("n_txt", 0)),
        n_img=int(data.get("n_img", 0)),
        source=f"imported from {p.name}",
        **vectors,  # type: ignore[arg-type]
        **scalars,  # type: ignore[arg-type]
    )
    profile.validate(origin=str(p))
    return profile


# --- the registry --------------------------------------------------------------------------
@dataclass
class ProfileRegistry:
    """All profiles the service can serve, keyed by name; bad files are reported, not fatal."""

    profiles: dict[str, Profile] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    default: str | None = None

    @classmethod
    def from_dir(cls, directory: str | Path, *, default: str | None = None) -> ProfileRegistry:
        reg = cls()
        d = Path(directory)
        files = sorted(d.glob("*.safetensors")) if d.is_dir() else []
        for f in files:
            try:
                prof = Profile.load(f)
            except RealignError as exc:
                log.error("skipping profile %s: %s", f, exc.message)
                reg.errors[str(f)] = exc.message
                continue
            if prof.name in reg.profiles:
                msg = f"duplicate profile name {prof.name!r} (already loaded from another file)"
                log.error("skipping profile %s: %s", f, msg)
                reg.errors[str(f)] = msg
                continue
            reg.profiles[prof.name] = prof
        reg.default = default if default is not None else (next(iter(reg.profiles), None))
        if reg.default is not None and reg.default not in reg.profiles:
            raise ProfileError(f"default profile {reg.default!r} is not among the loaded profiles")
        return reg

    def add(self, profile: Profile) -> None:
        self.profiles[profile.name] = profile
        if self.default is None:
            self.default = profile.name

    def get(self, name: str | None) -> Profile:
        key = name if name is not None else self.default
        if key is None:
            raise NotFoundError("no profile is loaded; build one with `realign profile build`")
        try:
            return self.profiles[key]
        except KeyError:
            raise NotFoundError(
                f"unknown profile {key!r}; available: {', '.join(sorted(self.profiles)) or 'none'}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self.profiles)
