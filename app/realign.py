"""The alignments of DESIGN.md §1 on batched torch tensors.

Given a profile the transform is stateless and O(d) per vector, so it runs on whatever device
the encoder uses, in float32 (float64 inputs stay float64). Inputs need not be normalised:
every alignment starts from the unit text embedding ``e``.

- ``none``:    e
- ``anchor``:  normalise(e - mu_t + mu_i)
- ``realign``: y' = normalise(mu_i + s (e - mu_t));  normalise(y' - mu_hat + mu_i)

No web, Redis or model code here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from app.errors import AlignmentInputError, InputError

Alignment = Literal["realign", "anchor", "none"]
ALIGNMENTS: tuple[str, ...] = get_args(Alignment)

#: Norms below this are treated as zero when re-projecting (never reached for sane profiles).
_NORM_EPS = 1e-12


@dataclass(frozen=True)
class AlignmentTensors:
    """A profile's statistics as tensors on one device, pre-combined for the hot path.

    ``anchor_shift = mu_i - mu_t``; ``trace_shift = mu_i - s * mu_t`` (so trace alignment is
    one fused multiply-add); ``centroid_shift = mu_i - mu_hat``.
    """

    dim: int
    scale: float
    anchor_shift: torch.Tensor
    trace_shift: torch.Tensor
    centroid_shift: torch.Tensor

    @classmethod
    def from_statistics(
        cls,
        mu_txt: torch.Tensor,
        mu_img: torch.Tensor,
        mu_hat: torch.Tensor,
        scale: float,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> AlignmentTensors:
        """Combine in float64 and keep float64 (d-sized vectors cost nothing), so float64
        inputs are aligned exactly and float32 inputs get correctly rounded shifts."""
        t, i, h = (v.to(torch.float64) for v in (mu_txt, mu_img, mu_hat))
        as_target = {"device": device, "dtype": dtype}
        return cls(
            dim=int(t.shape[0]),
            scale=float(scale),
            anchor_shift=(i - t).to(**as_target),
            trace_shift=(i - scale * t).to(**as_target),
            centroid_shift=(i - h).to(**as_target),
        )


def check_rows(e: torch.Tensor) -> None:
    """Raise :class:`AlignmentInputError` naming every zero or non-finite row."""
    finite = torch.isfinite(e).all(dim=1)
    nonzero = (e != 0).any(dim=1)
    bad = ~(finite & nonzero)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten().tolist()
        shown = ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")
        raise AlignmentInputError(
            f"{len(rows)} embedding row(s) are zero or contain NaN/inf: rows {shown}", rows
        )


def _normalize_(x: torch.Tensor) -> torch.Tensor:
    """In-place row normalisation (the batch is ours: saves one (n, d) allocation per step)."""
    return x.div_(torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(_NORM_EPS))


def align(
    embeddings: torch.Tensor,
    stats: AlignmentTensors | None,
    alignment: str = "realign",
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Apply ``alignment`` to a (n, d) batch; returns unit vectors (float32, or float64 input).

    ``stats`` may be ``None`` only for ``none``. The input is never modified.
    """
    if alignment not in ALIGNMENTS:
        raise InputError(f"unknown alignment {alignment!r}; choose one of {', '.join(ALIGNMENTS)}")
    if embeddings.ndim != 2:
        raise InputError(f"expected a (n, d) batch, got shape {tuple(embeddings.shape)}")
    if validate:
        check_rows(embeddings)
    work_dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    e = embeddings.to(work_dtype, copy=True)
    _normalize_(e)
    if alignment == "none":
        return e
    if stats is None:
        raise InputError(f"alignment {alignment!r} needs a profile")
    if stats.dim != e.shape[1]:
        raise InputError(
            f"embedding dimension {e.shape[1]} does not match the profile's {stats.dim}"
        )

    def shift(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=e.device, dtype=work_dtype)

    if alignment == "anchor":
        return _normalize_(e.add_(shift(stats.anchor_shift)))
    # realign: trace alignment (fused multiply-add), projection, centroid correction, projection
    y = e.mul_(stats.scale).add_(shift(stats.trace_shift))
    _normalize_(y)
    return _normalize_(y.add_(shift(stats.centroid_shift)))
