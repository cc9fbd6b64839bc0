from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from app.errors import AlignmentInputError, InputError
from app.profiles import build_profile_from_arrays
from app.realign import ALIGNMENTS, align
from tests.reference import apply, four_pass, gapped_world, unit


@pytest.fixture(scope="module")
def world() -> tuple[np.ndarray, np.ndarray]:
    return gapped_world(20_000, 20_000, 64, seed=3)


@pytest.fixture(scope="module")
def profile(world: tuple[np.ndarray, np.ndarray]):  # type: ignore[no-untyped-def]
    texts, images = world
    return build_profile_from_arrays(texts, images, name="t", model="m", chunk_rows=3001)


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_parity_with_authors_procedure(world, profile, alignment: str) -> None:  # type: ignore[no-untyped-def]
    texts, images = world
    ref_stats = four_pass(texts, images)
    expected = apply(ref_stats, texts, alignment)
    got = align(torch.from_numpy(texts).float(), profile.tensors(), alignment).numpy()
    assert np.max(np.abs(got - expected)) <= 1e-6
    got64 = align(torch.from_numpy(texts), profile.tensors(), alignment).numpy()
    assert got64.dtype == np.float64
    assert np.max(np.abs(got64 - expected)) <= 1e-10


def test_centroid_gap_closes(world, profile) -> None:  # type: ignore[no-untyped-def]
    texts, images = world
    img_centroid = unit(images).mean(0)
    gaps = {}
    for name in ALIGNMENTS:
        out = align(torch.from_numpy(texts).float(), profile.tensors(), name).double().numpy()
        gaps[name] = float(np.linalg.norm(out.mean(0) - img_centroid))
    assert gaps["realign"] < 1e-3
    assert gaps["none"] > 0.5
    assert gaps["anchor"] > gaps["realign"]  # anchor's projection drifts: what mu_hat fixes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_inputs_computed_in_float32(world, profile, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    texts, _ = world
    x = torch.from_numpy(texts[:256]).to(dtype)
    out = align(x, profile.tensors(), "realign")
    assert out.dtype == torch.float32
    expected = align(x.float(), profile.tensors(), "realign")
    torch.testing.assert_close(out, expected)
    assert x.dtype == dtype  # input untouched


@settings(max_examples=50, deadline=None)
@given(
    batch=arrays(
        np.float32,
        st.tuples(st.integers(1, 8), st.just(64)),
        elements=st.floats(-1e3, 1e3, width=32),
    ),
    alignment=st.sampled_from(ALIGNMENTS),
)
def test_outputs_are_unit_norm(profile, batch: np.ndarray, alignment: str) -> None:  # type: ignore[no-untyped-def]
    batch[:, 0] = np.abs(batch[:, 0]) + 1e-2  # no zero rows: those are an error, tested below
    out = align(torch.from_numpy(batch), profile.tensors(), alignment)
    norms = torch.linalg.vector_norm(out, dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_bad_rows_named(profile) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(6, 64)
    x[1] = 0
    x[4, 10] = float("inf")
    x[5, 0] = float("nan")
    with pytest.raises(AlignmentInputError) as info:
        align(x, profile.tensors(), "realign")
    assert info.value.rows == [1, 4, 5]


def test_input_errors(profile) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match="unknown alignment"):
        align(torch.randn(2, 64), profile.tensors(), "whiten")
    with pytest.raises(InputError, match="dimension"):
        align(torch.randn(2, 32), profile.tensors(), "realign")
    with pytest.raises(InputError, match="needs a profile"):
        align(torch.randn(2, 32), None, "anchor")
    with pytest.raises(InputError, match="shape"):
        align(torch.randn(64), profile.tensors(), "realign")
    assert align(torch.randn(2, 32), None, "none").shape == (2, 32)
