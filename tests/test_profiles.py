from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from app.errors import NotFoundError, ProfileError
from app.profiles import Profile, ProfileRegistry, build_profile_from_arrays, import_authors_stats
from app.safe_pickle import UnsafePickleError
from tests.reference import four_pass, gapped_world


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return gapped_world(4000, 3000, 32, seed=7)


@pytest.fixture()
def profile(data) -> Profile:  # type: ignore[no-untyped-def]
    texts, images = data
    return build_profile_from_arrays(texts, images, name="demo", model="arch:sha256-x", source="t")


def test_build_matches_reference(data, profile: Profile) -> None:  # type: ignore[no-untyped-def]
    ref = four_pass(*data)
    for key in ("mu_txt", "mu_img", "mu_hat"):
        np.testing.assert_allclose(getattr(profile, key), ref[key], atol=1e-12)
    for key in ("scale", "trace_txt", "trace_img"):
        assert getattr(profile, key) == pytest.approx(ref[key], rel=1e-12)
    assert (profile.n_txt, profile.n_img) == (4000, 3000)


def test_roundtrip_file_format(tmp_path: Path, profile: Profile) -> None:
    path = profile.save(tmp_path / "p.safetensors")
    raw = load_file(str(path))
    assert set(raw) == {
        "mu_txt",
        "mu_img",
        "mu_hat",
        "scale",
        "trace_txt",
        "trace_img",
        "n_txt",
        "n_img",
    }
    assert raw["mu_txt"].shape == (32,) and raw["scale"].shape == ()
    back = Profile.load(path)
    assert back.name == "demo" and back.model == "arch:sha256-x" and back.dim == 32
    np.testing.assert_array_equal(back.mu_hat, profile.mu_hat)
    assert back.scale == profile.scale and back.n_img == 3000


def _write(path: Path, profile: Profile, **changes: object) -> Path:
    """Write a profile file with some fields replaced (tensors or metadata)."""
    profile.save(path)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        meta = dict(fh.metadata())
    for key, value in changes.items():
        if key in tensors:
            if value is None:
                del tensors[key]
            else:
                tensors[key] = np.asarray(value)
        else:
            meta[key] = str(value)
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format_version": "99"}, "unknown format_version '99'"),
        ({"mu_hat": np.full(32, np.nan)}, "mu_hat contains NaN"),
        ({"mu_img": np.zeros(16)}, "mu_img has dimension 16"),
        ({"scale": np.array(-1.0)}, "scale must be > 0"),
        ({"scale": np.array(0.0)}, "scale must be > 0"),
        ({"dim": "64"}, "metadata dim 64"),
        ({"trace_img": None}, "missing field(s) trace_img"),
    ],
)
def test_invalid_files_rejected_naming_the_file(
    tmp_path: Path, profile: Profile, changes: dict, message: str
) -> None:
    path = _write(tmp_path / "bad.safetensors", profile, **changes)
    with pytest.raises(ProfileError) as info:
        Profile.load(path)
    assert str(path) in info.value.message
    assert message in info.value.message


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ProfileError, match="not a readable safetensors"):
        Profile.load(junk)
    with pytest.raises(ProfileError, match="no such profile"):
        Profile.load(tmp_path / "missing.safetensors")


def test_registry_skips_bad_files_and_serves_the_rest(tmp_path: Path, profile: Profile) -> None:
    profile.save(tmp_path / "a.safetensors")
    other = build_profile_from_arrays(*gapped_world(500, 500, 32, seed=1), name="other", model="m")
    other.save(tmp_path / "b.safetensors")
    (tmp_path / "c.safetensors").write_bytes(b"tampered")
    reg = ProfileRegistry.from_dir(tmp_path)
    assert reg.names() == ["demo", "other"]
    assert list(reg.errors) == [str(tmp_path / "c.safetensors")]
    assert reg.get(None).name == "demo"
    assert reg.get("other").name == "other"
    with pytest.raises(NotFoundError, match="unknown profile 'nope'"):
        reg.get("nope")
    with pytest.raises(ProfileError):
        ProfileRegistry.from_dir(tmp_path, default="nope")


def _authors_stats(data) -> dict:  # type: ignore[no-untyped-def]
    ref = four_pass(*data)
    return {
        k: (np.float64(v) if isinstance(v, float) else v.astype(np.float32)) for k, v in ref.items()
    }


def test_import_authors_pickle(tmp_path: Path, data) -> None:  # type: ignore[no-untyped-def]
    stats = _authors_stats(data)
    pkl = tmp_path / "trace_stats.pkl"
    pkl.write_bytes(pickle.dumps(stats))
    prof = import_authors_stats(pkl, name="imp", model="ViT-B-32:openai")
    np.testing.assert_allclose(prof.mu_hat, stats["mu_hat"], rtol=0, atol=0)
    assert prof.scale == pytest.approx(float(stats["scale"]))


class Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, ("echo pwned > /tmp/realign_pwned",))


def test_import_refuses_forbidden_globals(tmp_path: Path, data) -> None:  # type: ignore[no-untyped-def]
    stats = _authors_stats(data)
    stats["scale"] = Evil()
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps(stats))
    marker = Path("/tmp/realign_pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(UnsafePickleError, match=r"refusing to unpickle global (posix|os)\.system"):
        import_authors_stats(pkl, name="x", model="m")
    assert not marker.exists()
