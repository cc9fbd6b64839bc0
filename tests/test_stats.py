from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import AlignmentInputError, InputError
from app.stats import MomentAccumulator, accumulate, start_drift
from tests.reference import four_pass, gapped_world, unit


def test_single_pass_matches_reference() -> None:
    texts, images = gapped_world(3000, 2000, 48)
    ref = four_pass(texts, images)
    t = accumulate([texts])
    i = accumulate([images])
    drift = start_drift(t, i).update(texts)
    assert np.allclose(t.mean, ref["mu_txt"], atol=1e-12)
    assert np.allclose(i.mean, ref["mu_img"], atol=1e-12)
    assert t.trace == pytest.approx(ref["trace_txt"], rel=1e-12)
    assert i.trace == pytest.approx(ref["trace_img"], rel=1e-12)
    assert drift.scale == pytest.approx(ref["scale"], rel=1e-12)
    assert np.allclose(drift.mu_hat, ref["mu_hat"], atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=399), max_size=6, unique=True),
    seed=st.integers(0, 2**16),
)
def test_any_chunking_and_merging_equals_one_pass(cuts: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, 16)) * np.linspace(0.1, 3, 16) + rng.normal(size=16)
    one = accumulate([x])
    bounds = [0, *sorted(cuts), 400]
    parts = [x[a:b] for a, b in itertools.pairwise(bounds)]
    # chunked stream
    chunked = accumulate(parts)
    # shards merged in a different order
    merged = MomentAccumulator()
    for part in reversed(parts):
        merged = merged.merge(accumulate([part]))
    for acc in (chunked, merged):
        assert acc.count == one.count
        np.testing.assert_allclose(acc.mean, one.mean, rtol=1e-12, atol=1e-15)
        assert acc.trace == pytest.approx(one.trace, rel=1e-12)
    # mu_hat shards too
    d_one = start_drift(one, one).update(x)
    d_merged = start_drift(one, one)
    for part in parts:
        d_merged = d_merged.merge(start_drift(one, one).update(part))
    np.testing.assert_allclose(d_merged.mu_hat, d_one.mu_hat, rtol=1e-12, atol=1e-15)


def test_trace_is_numerically_sound_for_tight_far_cloud() -> None:
    """A tight cloud far from the origin: the naive E||x||^2 - ||Ex||^2 loses every digit."""
    rng = np.random.default_rng(1)
    d = 32
    centre = np.zeros(d)
    centre[0] = 1.0
    x = centre + 1e-6 * rng.normal(size=(200_000, d))
    xn = unit(x)
    exact = float(np.mean(np.sum((xn - xn.mean(0)) ** 2, axis=1)))
    acc = MomentAccumulator()
    for k in range(0, x.shape[0], 777):
        acc.update(x[k : k + 777])
    naive = float(np.mean(np.sum(xn**2, axis=1)) - np.sum(xn.mean(0) ** 2))
    assert acc.trace == pytest.approx(exact, rel=1e-9)
    assert abs(naive - exact) / exact > 1e-3  # the failure mode we avoid is real


def test_bad_rows_are_named() -> None:
    x = np.ones((10, 4))
    x[3] = 0
    x[7, 1] = np.nan
    acc = MomentAccumulator().update(np.ones((5, 4)))
    with pytest.raises(AlignmentInputError) as info:
        acc.update(x)
    assert info.value.rows == [8, 12]  # counted across chunks
    assert "rows 8, 12" in info.value.message


def test_shape_and_dim_errors() -> None:
    with pytest.raises(InputError, match="2-D"):
        MomentAccumulator().update(np.ones(4))
    acc = MomentAccumulator().update(np.ones((3, 4)))
    with pytest.raises(InputError, match="dimension mismatch"):
        acc.update(np.ones((3, 5)))
    with pytest.raises(InputError, match="no vectors"):
        accumulate([])
