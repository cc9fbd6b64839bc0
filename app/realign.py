"""The alignments of DESIGN.md §1 on batched torch tensors.

Given a profile the transform is stateless and O(d) per vector, so it runs on whatever device
the encoder uses, in float32 (float64 inputs stay float64). Inputs need not be normalised:
every alignment starts from the unit text embedding ``e = x / |x|``.

- ``none``:    e
- ``anchor``:  normalise(e - mu_t + mu_i)
- ``realign``: y' = normalise(mu_i + s (e - mu_t));  normalise(y' - mu_hat + mu_i)

Why the code does not read like the formulas: every step is "scale the row, add a fixed
vector, normalise", so the output is always ``alpha_r * x + beta_r * c1 + gamma_r * c2`` with
per-row scalars that follow from ``|x|^2``, ``x . c1`` and ``x . c2`` alone (the norms of the
intermediate vectors expand into those dot products because ``e`` and ``y'`` are unit
vectors). That is one norm pass, one thin (n, d) x (d, 2) matmul and one fused write instead of
a dozen full passes over the batch: the transform is memory-bound, so passes are the cost.
The per-row scalars are computed in float64. ``tests/test_realign.py`` checks the result
against a literal float64 NumPy transcription of the authors' procedure.

No web, Redis or model code here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from app.errors import AlignmentInputError, InputError

Alignment = Literal["realign", "anchor", "none"]
ALIGNMENTS: tuple[str, ...] = get_args(Alignment)


@dataclass(frozen=True)
class AlignmentTensors:
    """A profile's statistics on one device, pre-combined for the closed form.

    ``anchor_shift = mu_i - mu_t``; ``trace_shift = mu_i - s mu_t`` (so ``y = s e +
    trace_shift``); ``centroid_shift = mu_i - mu_hat``. Kept in float64: they are d-sized.
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
    ) -> AlignmentTensors:
        t, i, h = (v.to(dtype=torch.float64, device=device) for v in (mu_txt, mu_img, mu_hat))
        return cls(
            dim=int(t.shape[0]),
            scale=float(scale),
            anchor_shift=i - t,
            trace_shift=i - scale * t,
            centroid_shift=i - h,
        )


def _bad_rows(sq_norms: torch.Tensor) -> list[int]:
    bad = ~torch.isfinite(sq_norms) | (sq_norms == 0)
    return torch.nonzero(bad).flatten().tolist() if bool(bad.any()) else []


def bad_rows_error(rows: list[int]) -> AlignmentInputError:
    """The error naming every zero or non-finite row (``rows`` as the caller counts them)."""
    shown = ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")
    return AlignmentInputError(
        f"{len(rows)} embedding row(s) are zero or contain NaN/inf: rows {shown}", rows
    )


def align(
    embeddings: torch.Tensor,
    stats: AlignmentTensors | None,
    alignment: str = "realign",
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply ``alignment`` to a (n, d) batch; returns unit vectors (float32, or float64 input).

    ``stats`` may be ``None`` only for ``none``. The input is never modified. ``out`` (same
    shape, the result dtype) receives the result without another allocation, e.g. a slice of
    a memory-mapped output file.
    """
    if alignment not in ALIGNMENTS:
        raise InputError(f"unknown alignment {alignment!r}; choose one of {', '.join(ALIGNMENTS)}")
    if embeddings.ndim != 2:
        raise InputError(f"expected a (n, d) batch, got shape {tuple(embeddings.shape)}")
    if alignment != "none":
        if stats is None:
            raise InputError(f"alignment {alignment!r} needs a profile")
        if stats.dim != embeddings.shape[1]:
            raise InputError(
                f"embedding dimension {embeddings.shape[1]} does not match the profile's {stats.dim}"
            )
    work = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    x = embeddings if embeddings.dtype == work else embeddings.to(work)

    norms = torch.linalg.vector_norm(x, dim=1).to(torch.float64)  # float32 pass: 15x faster
    bad = _bad_rows(norms)
    if bad and work == torch.float32:
        # a finite row whose float32 norm overflows is legal: redo this rare batch in float64
        exact = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
        if not _bad_rows(exact):
            return align(x.to(torch.float64), stats, alignment).to(torch.float32)
        bad = _bad_rows(exact)
    if bad:
        raise bad_rows_error(bad)
    r = norms.reciprocal()  # e = r * x

    if alignment == "none":
        return torch.mul(x, r.to(work).unsqueeze(1), out=out)
    assert stats is not None
    if alignment == "anchor":
        c = stats.anchor_shift.to(x.device)
        p = torch.mv(x, c.to(work)).to(torch.float64)  # x . c
        rz = (1.0 + 2.0 * r * p + c @ c).rsqrt()  # 1 / |e + c|
        return _combine(x, rz * r, rz, None, c, None, out)

    s = stats.scale
    c1 = stats.trace_shift.to(x.device)
    c2 = stats.centroid_shift.to(x.device)
    # (n, 2): x . c1, x . c2; F.linear with a contiguous (2, d) weight is the fast thin matmul
    p = torch.nn.functional.linear(x, torch.stack([c1, c2]).to(work)).to(torch.float64)
    ry = (s * s + 2.0 * s * r * p[:, 0] + c1 @ c1).rsqrt()  # 1 / |s e + c1|
    yc2 = ry * (s * r * p[:, 1] + c1 @ c2)  # y' . c2
    rz = (1.0 + 2.0 * yc2 + c2 @ c2).rsqrt()  # 1 / |y' + c2|
    return _combine(x, rz * ry * s * r, rz * ry, rz, c1, c2, out)


def _combine(
    x: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor | None,
    c1: torch.Tensor,
    c2: torch.Tensor | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """``alpha[:, None] * x + beta[:, None] * c1 + gamma[:, None] * c2`` in two passes."""
    dt = x.dtype
    if gamma is None or c2 is None:
        coef, basis = beta.unsqueeze(1), c1.unsqueeze(0)
    else:
        coef, basis = torch.stack([beta, gamma], dim=1), torch.stack([c1, c2], dim=0)
    result = torch.mul(x, alpha.to(dt).unsqueeze(1), out=out)
    return result.addmm_(coef.to(dt), basis.to(dt))
