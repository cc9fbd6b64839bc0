"""The OpenCLIP text encoder: loading, tokenising, context trimming, encoding, fingerprint.

This is the only module that imports ``open_clip``. It keeps only the text tower in memory and
exposes the small protocol the batcher needs (:class:`TextEncoder`: ``tokenize`` once at
admission, ``encode`` a batch of tokenised texts).

**Context trimming** (DESIGN.md §4). Captions are ~10-20 tokens but open_clip's ``encode_text``
always runs all 77 positions. For causal text towers that pool at the end-of-text token, the
positions after the longest text in a batch cannot influence any earlier position, so we run the
tower's own modules on the batch cut to its longest sequence (positional embedding and causal
mask sliced to that length). The result is the same to float rounding; a start-up probe checks
that against ``encode_text`` and switches trimming off (with a log line) if it is not.

**Fingerprint.** ``model_id`` (architecture and weights) is what profiles are bound to;
``cache_id`` adds the dtype, since raw outputs differ by precision and the cache stores raw
outputs.
"""

from __future__ import annotations

import copy
import functools
import gc
import hashlib
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import text_global_pool
from torch import nn

from app.config import Settings
from app.errors import EncoderError, InputError

log = logging.getLogger(__name__)

LOCAL_DIR_PREFIX = "local-dir:"
#: open_clip's own preference when a local dir holds several weight files (factory.py).
_WEIGHT_FILE_ORDER = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
#: Max abs difference (fp32, normalised rows) tolerated between trimmed and full-length outputs.
TRIM_TOLERANCE = 1e-5
#: Batch size of :meth:`TextEncoder.encode_texts` (the service batches through the batcher).
ENCODE_TEXTS_BATCH = 64
_PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {dtype: name for name, dtype in _PRECISION_DTYPES.items()}
#: Varied lengths (1 word to past the context length), so the probe exercises the slicing.
PROBE_TEXTS = (
    "a",
    "a red circle",
    "a photo of a small blue square in the top left corner",
    "two dogs playing in the snow next to a wooden fence on a cold winter morning",
    "A diagram; with punctuation, numbers (42) and CAPITALS!",
    " ".join(["long"] * 100),
)
_HOW_TO_PROVIDE_WEIGHTS = (
    "Provide weights locally: pretrained=/path/to/checkpoint (REALIGN_PRETRAINED), or "
    "model=local-dir:/path/to/dir holding open_clip_config.json and a weights file "
    "(REALIGN_MODEL); or let open_clip download them with REALIGN_ALLOW_DOWNLOADS=1."
)


@dataclass(frozen=True)
class EncoderFingerprint:
    """What produced an embedding: architecture, weights and dtype."""

    arch: str
    weights: str
    dtype: str

    @property
    def model_id(self) -> str:
        """Architecture and weights; profiles store this (a profile is valid across dtypes)."""
        return f"{self.arch}:{self.weights}"

    @property
    def cache_id(self) -> str:
        """``model_id`` plus dtype: the cache namespace (raw outputs differ by dtype)."""
        return f"{self.arch}:{self.weights}:{self.dtype}"


@dataclass(frozen=True)
class TokenizedText:
    """One text, tokenised once at admission time."""

    ids: torch.Tensor  # 1-D int64, real tokens incl. SOT/EOT, no padding
    truncated: bool  # cut at the context length

    @property
    def n_tokens(self) -> int:
        """Real (unpadded) tokens, for the ``tokens`` metric and token-budgeted batching."""
        return int(self.ids.shape[0])


# --- resolving what to load --------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """A model resolved to local files before anything heavy happens."""

    model_name: str  # passed to open_clip.create_model
    checkpoint: str | None  # local weights file (None: local-dir, open_clip finds it)
    arch: str
    weights: str  # fingerprint weights id


def _sha256_id(path: Path) -> str:
    """The weights id; remembered per (file, size, mtime), since one CLI run resolves the
    model several times (fingerprint, text encoding, image encoding)."""
    st = path.stat()
    return _sha256_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"sha256-{digest.hexdigest()[:16]}"


def _find_weights_file(directory: Path) -> Path | None:
    """The file open_clip would load from a local dir (same preference order)."""
    found = sorted(
        [p for ext in ("*.safetensors", "*.bin", "*.pth") for p in directory.glob(ext)],
        key=lambda p: (p.suffix != ".safetensors", p.name),
    )
    preferred = [p for p in found if p.name in _WEIGHT_FILE_ORDER]
    if preferred:
        return min(preferred, key=lambda p: _WEIGHT_FILE_ORDER.index(p.name))
    return found[0] if found else None


def _resolve_local_dir(path_text: str) -> _Source:
    directory = Path(path_text).expanduser()
    if not (directory / "open_clip_config.json").is_file():
        raise EncoderError(
            f"local-dir model {directory} has no open_clip_config.json. {_HOW_TO_PROVIDE_WEIGHTS}"
        )
    weights = _find_weights_file(directory)
    if weights is None:
        raise EncoderError(
            f"local-dir model {directory} has no weights file (*.safetensors, *.bin, *.pth)."
        )
    return _Source(
        model_name=f"{LOCAL_DIR_PREFIX}{directory}",
        checkpoint=None,
        arch=directory.resolve().name,
        weights=_sha256_id(weights),
    )


def _force_offline() -> None:
    """Make hub look-ups fail at once instead of retrying a network we may not have."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hf_constants
    except ImportError:  # pragma: no cover - huggingface_hub is an open_clip dependency
        return
    hf_constants.HF_HUB_OFFLINE = True  # read at import time, so set the module constant too


def _download_tag(arch: str, tag: str, cfg: dict[str, Any], allow_downloads: bool) -> str:
    """Local path of a pretrained tag's weights; downloads only when allowed."""
    if not allow_downloads:
        _force_offline()
        url = cfg.get("url", "")
        if url and not cfg.get("hf_hub"):  # plain URL download: open_clip would not check
            cached = Path("~/.cache/clip").expanduser() / os.path.basename(url)
            if not cached.is_file():
                raise EncoderError(
                    f"weights for {arch} pretrained={tag!r} are not cached and downloads are "
                    f"off. {_HOW_TO_PROVIDE_WEIGHTS}"
                )
    try:
        return str(open_clip.download_pretrained(cfg))
    except Exception as exc:
        mode = "downloads are off" if not allow_downloads else "the download failed"
        raise EncoderError(
            f"weights for {arch} pretrained={tag!r} are not available locally and {mode}. "
            f"{_HOW_TO_PROVIDE_WEIGHTS}"
        ) from exc


def _resolve_named(arch: str, pretrained: str | None, allow_downloads: bool) -> _Source:
    if arch not in open_clip.list_models():
        raise EncoderError(f"unknown open_clip architecture {arch!r}")
    if not pretrained:
        raise EncoderError(
            f"model {arch} needs weights (pretrained is not set). {_HOW_TO_PROVIDE_WEIGHTS}"
        )
    if os.path.isfile(pretrained):
        path = Path(pretrained)
        return _Source(arch, str(path), arch, _sha256_id(path))
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise EncoderError(
            f"pretrained={pretrained!r} is neither a file nor a known tag for {arch} "
            f"(known tags: {', '.join(tags) or 'none'}). {_HOW_TO_PROVIDE_WEIGHTS}"
        )
    return _Source(arch, _download_tag(arch, pretrained, cfg, allow_downloads), arch, pretrained)


def _resolve_source(settings: Settings) -> _Source:
    name = settings.model
    if name.startswith(LOCAL_DIR_PREFIX):
        return _resolve_local_dir(name[len(LOCAL_DIR_PREFIX) :])
    if name.startswith("hf-hub:"):
        raise EncoderError(
            "hf-hub: models are not loaded directly; download the repository (it is in "
            "open_clip's local-dir format) and use REALIGN_MODEL=local-dir:/path/to/it."
        )
    return _resolve_named(name, settings.pretrained, settings.allow_downloads)


def _resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise EncoderError("device=cuda requested but CUDA is not available")
    return torch.device(setting)


def _resolve_precision(setting: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA when supported, else fp16; fp32 elsewhere (CPU half is slow)."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


# --- building the text-only model ---------------------------------------------------------------


def _drop_vision_tower(model: nn.Module) -> None:
    """Delete the image tower: the service never uses it, and it is often half the weights."""
    if getattr(model, "visual", None) is not None:
        del model.visual
        model.visual = None  # type: ignore[assignment]  # keep the attribute open_clip checks
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _create_text_model(source: _Source, precision: str, device: torch.device) -> nn.Module:
    """Build on the CPU, drop the vision tower, then move only the text tower to ``device``."""
    try:
        model = open_clip.create_model(
            source.model_name, pretrained=source.checkpoint, precision=precision, device="cpu"
        )
    except Exception as exc:
        raise EncoderError(f"could not load model {source.model_name}: {exc}") from exc
    _drop_vision_tower(model)
    try:
        model.to(device)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        raise EncoderError(f"could not move the text tower to {device}: {exc}") from exc
    return model.eval()


def _weight_dtype(model: nn.Module) -> torch.dtype:
    """The compute dtype: the transformer's, since open_clip's fp16/bf16 modes keep the token
    embedding and LayerNorms in fp32; otherwise the dtype holding most parameters."""
    transformer = getattr(model, "transformer", None)
    if transformer is not None and hasattr(transformer, "get_cast_dtype"):
        return transformer.get_cast_dtype()  # type: ignore[no-any-return]
    counts: Counter[torch.dtype] = Counter()
    for param in model.parameters():
        counts[param.dtype] += param.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def _trim_blocker(model: nn.Module) -> str | None:
    """Why the tower cannot run at a shorter length, or None if it can (structurally)."""
    if not hasattr(model, "token_embedding") or not hasattr(model, "positional_embedding"):
        return "text tower is not open_clip's built-in causal transformer (e.g. an HF tower)"
    if getattr(model, "attn_mask", None) is None:
        return "text tower has no causal mask: later (padding) tokens affect the pooled one"
    pool = getattr(model, "text_pool_type", None)
    if pool not in ("argmax", "eos"):
        return f"text tower pools with {pool!r}, not at the end-of-text token"
    return None


def _pad_id(tokenizer: Any) -> int:
    hf = getattr(tokenizer, "tokenizer", None)
    pad = getattr(hf, "pad_token_id", None)
    return int(pad) if pad is not None else 0


# --- the encoder --------------------------------------------------------------------------------


class TextEncoder:
    """An OpenCLIP text tower behind the batcher's protocol.

    Build one with :func:`load_encoder` (from settings) or :meth:`from_model` (an in-memory
    open_clip model, for benchmarks and tests). ``encode`` returns float32 CPU rows, L2
    normalised, in input order.

    Example::

        enc = load_encoder(Settings(model="local-dir:models/demo"))
        enc.warmup()
        emb = enc.encode(enc.tokenize(["a red circle", "a blue square"]))  # (2, enc.dim)
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        fingerprint: EncoderFingerprint,
        *,
        trimming: bool = True,
    ) -> None:
        self.model: Any = model.eval()  # open_clip's attributes are dynamic for mypy
        self._tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.device: torch.device = next(model.parameters()).device
        self.dtype: torch.dtype = _weight_dtype(model)
        self.context_length: int = int(
            getattr(model, "context_length", None) or tokenizer.context_length
        )
        self._pad_id = _pad_id(tokenizer)
        self._fast_tokenizer = (
            isinstance(tokenizer, SimpleTokenizer) and tokenizer.reduction_fn is None
        )
        self.trimming = False
        self.dim: int = int(self.encode(self.tokenize(PROBE_TEXTS[:1])).shape[1])
        if trimming:
            self.trimming = self._probe_trimming()

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        arch: str,
        weights: str,
        *,
        tokenizer: Any = None,
        trimming: bool = True,
    ) -> TextEncoder:
        """Wrap an already created open_clip model (its vision tower is deleted in place)."""
        _drop_vision_tower(model)
        if tokenizer is None:
            context = int(getattr(model, "context_length", 77))
            known = arch in open_clip.list_models()
            tokenizer = (
                open_clip.get_tokenizer(arch) if known else SimpleTokenizer(context_length=context)
            )
        dtype = _DTYPE_NAMES.get(_weight_dtype(model), str(_weight_dtype(model)))
        return cls(model, tokenizer, EncoderFingerprint(arch, weights, dtype), trimming=trimming)

    # --- tokenising ---------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedText]:
        """Tokenise without padding; flag texts cut at the context length."""
        if self._fast_tokenizer:
            return [self._tokenize_simple(text) for text in texts]
        rows = self._tokenizer(list(texts))
        return [self._strip_padding(row) for row in rows]

    def _tokenize_simple(self, text: str) -> TokenizedText:
        """open_clip's SimpleTokenizer.__call__ for one text, minus the padding."""
        tok = self._tokenizer
        ids = [tok.sot_token_id, *tok.encode(text), tok.eot_token_id]
        truncated = len(ids) > self.context_length
        if truncated:
            ids = ids[: self.context_length]
            ids[-1] = tok.eot_token_id
        return TokenizedText(torch.tensor(ids, dtype=torch.long), truncated)

    def _strip_padding(self, row: torch.Tensor) -> TokenizedText:
        """Generic tokenisers: drop trailing pad ids; a full row counts as truncated."""
        nonpad = (row != self._pad_id).nonzero()
        length = int(nonpad[-1]) + 1 if len(nonpad) else 1
        return TokenizedText(row[:length].clone().long(), length >= self.context_length)

    # --- encoding -----------------------------------------------------------------------------

    def encode(self, batch: Sequence[TokenizedText]) -> torch.Tensor:
        """Encode tokenised texts: (n, dim) float32 on the CPU, L2-normalised, input order.

        Pads to the batch's longest text when trimming is on, else to the context length.
        """
        if not batch:
            return torch.empty(0, getattr(self, "dim", 0))
        length = max(t.n_tokens for t in batch) if self.trimming else self.context_length
        tokens = self._pad(batch, length)
        try:
            with torch.inference_mode():
                features = self._forward(tokens.to(self.device), trimmed=self.trimming)
                features = F.normalize(features.float(), dim=-1).cpu()
        except (RuntimeError, ValueError, IndexError) as exc:
            raise EncoderError(f"text encoder failed on a batch of {len(batch)}: {exc}") from exc
        return features.clone()  # a normal tensor: callers may modify it outside inference mode

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenise and encode, ``ENCODE_TEXTS_BATCH`` texts at a time (offline jobs, tests)."""
        chunks = [
            self.encode(self.tokenize(texts[i : i + ENCODE_TEXTS_BATCH]))
            for i in range(0, len(texts), ENCODE_TEXTS_BATCH)
        ]
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim)

    def warmup(self) -> None:
        """Run a few batches so the first request does not pay for lazy init / autotuning."""
        self.encode_texts(list(PROBE_TEXTS))
        self.encode(self.tokenize(PROBE_TEXTS[1:2]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pad(self, batch: Sequence[TokenizedText], length: int) -> torch.Tensor:
        """(n, length) int64 ids, each row padded with the tokenizer's pad id."""
        tokens = torch.full((len(batch), length), self._pad_id, dtype=torch.long)
        for row, text in enumerate(batch):
            tokens[row, : text.n_tokens] = text.ids
        return tokens

    def _forward(self, tokens: torch.Tensor, *, trimmed: bool) -> torch.Tensor:
        return _forward_trimmed(self.model, tokens) if trimmed else self.model.encode_text(tokens)

    # --- trimming probe -----------------------------------------------------------------------

    def _probe_trimming(self) -> bool:
        """Check trimmed == full-length ``encode_text`` in fp32 on varied lengths."""
        blocker = _trim_blocker(self.model)
        if blocker is not None:
            log.info("context trimming off: %s", blocker)
            return False
        reference = self.model if self.dtype == torch.float32 else copy.deepcopy(self.model).float()
        batch = self.tokenize(PROBE_TEXTS)
        length = max(t.n_tokens for t in batch)
        tokens = self._pad(batch, self.context_length).to(self.device)
        try:
            with torch.inference_mode():
                full = F.normalize(reference.encode_text(tokens).float(), dim=-1)
                cut = F.normalize(_forward_trimmed(reference, tokens[:, :length]).float(), dim=-1)
        except (RuntimeError, ValueError, IndexError) as exc:
            log.warning("context trimming off: the trimmed forward failed (%s)", exc)
            return False
        diff = float((full - cut).abs().max())
        if diff > TRIM_TOLERANCE:
            log.warning(
                "context trimming off: trimmed outputs differ from encode_text by %.2e (> %.0e)",
                diff,
                TRIM_TOLERANCE,
            )
            return False
        log.info("context trimming on (probe max abs diff %.1e)", diff)
        return True


def _forward_trimmed(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip ``CLIP.encode_text`` with positions and causal mask sliced to ``tokens``' length."""
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=model.text_eos_id)
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def _get_tokenizer(model_name: str) -> Any:
    try:
        return open_clip.get_tokenizer(model_name)
    except Exception as exc:
        raise EncoderError(f"could not load the tokenizer of {model_name}: {exc}") from exc


def _resolve(settings: Settings) -> tuple[_Source, torch.device, str]:
    """What to load, where and in which precision; offline unless downloads are allowed."""
    source = _resolve_source(settings)
    device = _resolve_device(settings.device)
    precision = _resolve_precision(settings.precision, device)
    if not settings.allow_downloads:
        _force_offline()  # the config/tokenizer may also try the hub
    return source, device, precision


def load_encoder(settings: Settings) -> TextEncoder:
    """Load the text encoder described by ``settings`` (model, pretrained, device, precision)."""
    source, device, precision = _resolve(settings)
    model = _create_text_model(source, precision, device)
    tokenizer = _get_tokenizer(source.model_name)
    fingerprint = EncoderFingerprint(source.arch, source.weights, precision)
    encoder = TextEncoder(model, tokenizer, fingerprint, trimming=settings.context_trimming)
    log.info(
        "encoder %s on %s (%s), dim %d, trimming %s",
        fingerprint.model_id,
        encoder.device,
        precision,
        encoder.dim,
        encoder.trimming,
    )
    return encoder


# --- offline helpers: fingerprints without a forward pass, and image encoding for profiles -----

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


def fingerprint_for(settings: Settings) -> EncoderFingerprint:
    """The fingerprint :func:`load_encoder` would give, without building the model."""
    source = _resolve_source(settings)
    precision = _resolve_precision(settings.precision, _resolve_device(settings.device))
    return EncoderFingerprint(source.arch, source.weights, precision)


def image_files(directory: str | Path) -> list[Path]:
    """Every image below ``directory``, in a stable order."""
    root = Path(directory)
    if not root.is_dir():
        raise InputError(f"{root} is not a directory of images")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def encode_image_files(
    settings: Settings, files: Sequence[Path], batch_size: int = 64
) -> Iterator[tuple[int, np.ndarray]]:
    """Encode images with the model's own vision tower and preprocessing, for profile building.

    Yields ``(offset, rows)`` with L2-normalised float32 rows. This is the one place the vision
    tower is loaded; the service itself never keeps it.
    """
    from PIL import Image, UnidentifiedImageError

    source, device, precision = _resolve(settings)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            source.model_name, pretrained=source.checkpoint, precision=precision, device=device
        )
    except Exception as exc:
        raise EncoderError(f"could not load model {source.model_name}: {exc}") from exc
    model.eval()
    for offset in range(0, len(files), batch_size):
        pixels = []
        for path in files[offset : offset + batch_size]:
            try:
                with Image.open(path) as img:
                    pixels.append(preprocess(img.convert("RGB")))
            except (OSError, UnidentifiedImageError) as exc:
                raise InputError(f"cannot read image {path}: {exc}") from exc
        batch = torch.stack(pixels).to(device)
        try:
            with torch.inference_mode():
                features = model.encode_image(batch)
        except RuntimeError as exc:
            raise EncoderError(f"image encoder failed: {exc}") from exc
        yield offset, F.normalize(features.float(), dim=-1).cpu().numpy()
