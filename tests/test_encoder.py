"""The open_clip text encoder, with real (tiny) open_clip models: no mocks.

Models are tiny configs with random weights saved by the tests, plus the shipped demo model.
References are computed here with open_clip's own ``encode_text`` on full-length tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from app import encoder as encoder_module
from app.config import DEFAULT_MODELS_DIR, Settings
from app.encoder import (
    EncoderFingerprint,
    TextEncoder,
    TokenizedText,
    load_encoder,
)
from app.errors import EncoderError
from tests.tiny_models import TINY_CFG, write_local_dir

TINY_ARCH = "realign-test-tiny"
DEMO_DIR = DEFAULT_MODELS_DIR / "demo"
TEXTS = [
    "a red circle",
    "x",
    "a photo of a small blue square in the top left corner of the picture",
    "",
    "Punctuation, numbers (1234) and CAPITALS!",
    "a dog",
]
LONG_TEXT = " ".join(["word"] * 120)


def _write_local_dir(
    directory: Path, seed: int, text_overrides: dict[str, object] | None = None
) -> Path:
    return write_local_dir(directory, seed, text_overrides)


def _settings(model: str, **kwargs: object) -> Settings:
    return Settings(model=model, device="cpu", **kwargs)  # type: ignore[arg-type]


def _naive(model_name: str, texts: list[str]) -> torch.Tensor:
    """Reference: open_clip's own full-length encode_text, normalised."""
    model = open_clip.create_model(model_name).eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer(texts)), dim=-1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_local_dir(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> TextEncoder:
    return load_encoder(_settings(f"local-dir:{tiny_dir}"))


# --- loading paths -------------------------------------------------------------------------------


def test_local_dir_loads_text_tower_only(tiny: TextEncoder, tiny_dir: Path) -> None:
    assert tiny.fingerprint.arch == "tiny"
    assert tiny.fingerprint.weights.startswith("sha256-")
    assert len(tiny.fingerprint.weights) == len("sha256-") + 16
    assert tiny.fingerprint.dtype == "fp32"
    assert (tiny.dim, tiny.context_length) == (24, 77)
    assert tiny.device == torch.device("cpu") and tiny.dtype == torch.float32
    assert tiny.trimming
    assert getattr(tiny.model, "visual", None) is None
    assert not [name for name, _ in tiny.model.named_parameters() if name.startswith("visual")]


def test_name_plus_local_checkpoint_file(tmp_path: Path, tiny_dir: Path) -> None:
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(config_dir)
    checkpoint = tiny_dir / "open_clip_model.safetensors"

    enc = load_encoder(_settings(TINY_ARCH, pretrained=str(checkpoint)))

    assert enc.fingerprint.arch == TINY_ARCH
    # Same file, same weights id, whichever way it was named.
    tiny_weights = load_encoder(_settings(f"local-dir:{tiny_dir}")).fingerprint.weights
    assert enc.fingerprint.weights == tiny_weights
    assert enc.model.visual is None
    torch.testing.assert_close(
        enc.encode_texts(TEXTS), _naive(f"local-dir:{tiny_dir}", TEXTS), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("tag", ["laion2b_s34b_b79k", "no-such-tag"])
def test_missing_pretrained_offline_fails_fast_with_help(tag: str) -> None:
    start = time.perf_counter()
    with pytest.raises(EncoderError) as info:
        load_encoder(_settings("ViT-B-32", pretrained=tag, allow_downloads=False))
    assert time.perf_counter() - start < 10
    message = info.value.message
    assert "pretrained=/path/to/" in message
    assert "local-dir:" in message and "REALIGN_ALLOW_DOWNLOADS=1" in message


def test_bad_local_dirs_raise_encoder_error(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(EncoderError, match=r"open_clip_config\.json"):
        load_encoder(_settings(f"local-dir:{tmp_path}"))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "open_clip_config.json").write_text(
        (tiny_dir / "open_clip_config.json").read_text()
    )
    with pytest.raises(EncoderError, match="no weights"):
        load_encoder(_settings(f"local-dir:{no_weights}"))
    with pytest.raises(EncoderError, match="needs weights"):
        load_encoder(_settings("ViT-B-32"))


# --- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_ids() -> None:
    fp = EncoderFingerprint("ViT-B-32", "laion2b_s34b_b79k", "fp16")
    assert fp.model_id == "ViT-B-32:laion2b_s34b_b79k"
    assert fp.cache_id == "ViT-B-32:laion2b_s34b_b79k:fp16"


def test_fingerprint_stable_and_sensitive(
    tmp_path: Path, tiny: TextEncoder, tiny_dir: Path
) -> None:
    again = load_encoder(_settings(f"local-dir:{tiny_dir}"))
    assert again.fingerprint == tiny.fingerprint

    other = load_encoder(_settings(f"local-dir:{_write_local_dir(tmp_path / 'tiny', seed=1)}"))
    assert other.fingerprint.arch == tiny.fingerprint.arch
    assert other.fingerprint.model_id != tiny.fingerprint.model_id

    half = load_encoder(_settings(f"local-dir:{tiny_dir}", precision="bf16"))
    assert half.dtype == torch.bfloat16
    assert half.fingerprint.model_id == tiny.fingerprint.model_id  # profiles stay valid
    assert half.fingerprint.cache_id != tiny.fingerprint.cache_id  # cached outputs do not
    out = half.encode_texts(TEXTS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, tiny.encode_texts(TEXTS), atol=0.05, rtol=0)


# --- tokenising and encoding ---------------------------------------------------------------------


def test_tokenize_matches_open_clip_and_reports_truncation(
    tiny: TextEncoder, tiny_dir: Path
) -> None:
    texts = [*TEXTS, LONG_TEXT]
    reference = open_clip.get_tokenizer(f"local-dir:{tiny_dir}")(texts)
    tokens = tiny.tokenize(texts)
    for row, tok in zip(reference, tokens, strict=True):
        assert isinstance(tok, TokenizedText) and tok.ids.dtype == torch.int64 and tok.ids.ndim == 1
        assert torch.equal(tok.ids, row[: tok.n_tokens])
        assert not row[tok.n_tokens :].any()  # nothing but padding was dropped
    assert [t.truncated for t in tokens] == [False] * len(TEXTS) + [True]
    assert tokens[-1].n_tokens == 77
    assert tokens[TEXTS.index("")].n_tokens == 2  # SOT + EOT


def test_trimmed_encoding_equals_naive_encode_text(tiny: TextEncoder, tiny_dir: Path) -> None:
    texts = [*TEXTS, LONG_TEXT]
    expected = _naive(f"local-dir:{tiny_dir}", texts)
    short = tiny.encode(tiny.tokenize(TEXTS))  # longest text ~16 tokens: a cut batch
    assert (short - expected[: len(TEXTS)]).abs().max() <= 1e-5
    full = tiny.encode_texts(texts)
    assert (full - expected).abs().max() <= 1e-5
    assert full.dtype == torch.float32 and full.device == torch.device("cpu")
    torch.testing.assert_close(full.norm(dim=1), torch.ones(len(texts)))
    full.mul_(2)  # a normal tensor, not an inference tensor: callers may modify it


def test_rows_keep_input_order(tiny: TextEncoder) -> None:
    singles = torch.cat([tiny.encode(tiny.tokenize([t])) for t in TEXTS])
    batch = tiny.encode(tiny.tokenize(TEXTS))
    assert (batch - singles).abs().max() <= 1e-5
    order = [3, 0, 5, 2, 1, 4]
    shuffled = tiny.encode(tiny.tokenize([TEXTS[i] for i in order]))
    assert (shuffled - singles[order]).abs().max() <= 1e-5
    assert tiny.encode([]).shape == (0, tiny.dim)
    assert tiny.encode_texts([]).shape == (0, tiny.dim)


# --- trimming fallbacks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{"pool_type": "last"}, {"no_causal_mask": True}],
    ids=["last-token-pooling", "bidirectional"],
)
def test_towers_that_cannot_trim_fall_back_to_full_length(
    tmp_path: Path, overrides: dict[str, object]
) -> None:
    directory = _write_local_dir(tmp_path / "untrimmable", seed=2, text_overrides=overrides)
    enc = load_encoder(_settings(f"local-dir:{directory}"))
    assert not enc.trimming
    expected = _naive(f"local-dir:{directory}", TEXTS)
    assert (enc.encode_texts(TEXTS) - expected).abs().max() <= 1e-5


def test_failed_probe_disables_trimming(
    monkeypatch: pytest.MonkeyPatch, tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(encoder_module, "TRIM_TOLERANCE", -1.0)  # no difference passes
    enc = load_encoder(_settings(f"local-dir:{tiny_dir}"))
    assert not enc.trimming
    assert "context trimming off" in caplog.text
    expected = _naive(f"local-dir:{tiny_dir}", TEXTS)
    assert (enc.encode_texts(TEXTS) - expected).abs().max() <= 1e-5


def test_trimming_can_be_switched_off(tiny_dir: Path) -> None:
    enc = load_encoder(_settings(f"local-dir:{tiny_dir}", context_trimming=False))
    assert not enc.trimming


# --- the demo model ------------------------------------------------------------------------------


def test_demo_model_loads_trims_and_matches_encode_text() -> None:
    enc = load_encoder(_settings(f"local-dir:{DEMO_DIR}"))
    enc.warmup()
    assert enc.fingerprint.arch == "demo" and enc.trimming and enc.dim == 128
    texts = ["a red circle", "a photo of a large blue square in the top left corner", "a ring"]
    expected = _naive(f"local-dir:{DEMO_DIR}", texts)
    assert (enc.encode_texts(texts) - expected).abs().max() <= 1e-5


def test_from_model_wraps_an_in_memory_model() -> None:
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CFG).eval()
    enc = TextEncoder.from_model(model, "tiny", "random-seed-0")
    assert enc.fingerprint == EncoderFingerprint("tiny", "random-seed-0", "fp32")
    assert enc.trimming and model.visual is None
    tokenizer = open_clip.SimpleTokenizer()
    with torch.no_grad():
        expected = F.normalize(model.encode_text(tokenizer(TEXTS)), dim=-1)
    assert (enc.encode_texts(TEXTS) - expected).abs().max() <= 1e-5


# --- the demo model's training script --------------------------------------------------------------


@pytest.mark.slow
def test_make_demo_model_quick_runs_end_to_end(tmp_path: Path) -> None:
    from app.profiles import Profile

    script = Path(__file__).resolve().parent.parent / "examples" / "make_demo_model.py"
    subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=180,
    )
    enc = load_encoder(_settings(f"local-dir:{tmp_path / 'demo'}"))
    assert enc.fingerprint.arch == "demo" and enc.dim == 128
    profile = Profile.load(tmp_path / "profiles" / "demo.safetensors")
    assert profile.model == enc.fingerprint.model_id
    assert profile.dim == enc.dim
    weights = tmp_path / "demo" / "open_clip_model.safetensors"
    assert weights.stat().st_size <= 15 * 1024 * 1024
