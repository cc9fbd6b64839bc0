"""All configuration, from ``REALIGN_*`` environment variables.

Settings are built by :func:`get_settings` and handed to ``create_app(settings)``; nothing reads
the environment at import time, so tests construct ``Settings(...)`` directly instead of
patching globals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Repository root when running from a checkout; the demo artifacts live under it.
_REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS_DIR = _REPO_ROOT / "models"

Device = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
CacheDtype = Literal["float16", "float32"]


class Settings(BaseSettings):
    """Every knob of the service. Field names map to ``REALIGN_<NAME>`` variables."""

    model_config = SettingsConfigDict(env_prefix="REALIGN_", extra="ignore")

    # --- model -------------------------------------------------------------------------------
    model: str = Field(
        default=f"local-dir:{DEFAULT_MODELS_DIR / 'demo'}",
        description="open_clip architecture name (e.g. ViT-B-32), or 'local-dir:PATH'.",
    )
    pretrained: str | None = Field(
        default=None,
        description="Pretrained tag (e.g. laion2b_s34b_b79k) or a local checkpoint file path.",
    )
    device: Device = "auto"
    precision: Precision = "auto"
    allow_downloads: bool = Field(
        default=False, description="Let open_clip fetch weights from the hub (off: fail fast)."
    )
    context_trimming: bool = True

    # --- profiles ----------------------------------------------------------------------------
    profiles_dir: Path = DEFAULT_MODELS_DIR / "profiles"
    default_profile: str | None = Field(
        default=None,
        description="Profile used when a request names none (else the only/first one).",
    )

    # --- batching and admission -------------------------------------------------------------
    max_batch_size: int = Field(default=64, ge=1)
    max_batch_tokens: int = Field(default=16384, ge=77)
    max_wait_ms: float = Field(default=0.0, ge=0.0)
    max_queue_texts: int = Field(default=4096, ge=1)
    retry_after_s: int = Field(default=1, ge=1)

    # --- request limits ----------------------------------------------------------------------
    max_inputs_per_request: int = Field(default=2048, ge=1)
    max_text_chars: int = Field(default=10_000, ge=1)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)

    # --- security ----------------------------------------------------------------------------
    # NoDecode: the env source must not JSON-decode this list itself (``a,b`` is not JSON);
    # ``_split_keys`` reads both forms.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)

    # --- cache --------------------------------------------------------------------------------
    redis_url: SecretStr | None = None
    cache_enabled: bool = True
    cache_prefix: str = "realign:"
    cache_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    cache_dtype: CacheDtype = "float32"
    cache_memory_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    redis_timeout_ms: float = Field(default=50.0, gt=0)
    redis_breaker_cooldown_s: float = Field(default=5.0, gt=0)
    redis_pool_size: int = Field(default=32, ge=1)

    # --- server ------------------------------------------------------------------------------
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    graceful_timeout_s: float = Field(default=30.0, ge=0)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """Accept ``REALIGN_API_KEYS=a,b`` as well as a JSON list."""
        if isinstance(value, str):
            stripped = value.strip()
            if stripped.startswith("["):
                return json.loads(stripped)
            return [k.strip() for k in stripped.split(",") if k.strip()]
        return value

    @field_validator("redis_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value in ("", None) else value

    @model_validator(mode="after")
    def _check_batch_fits_queue(self) -> Settings:
        if self.max_queue_texts < self.max_batch_size:
            raise ValueError("max_queue_texts must be >= max_batch_size")
        return self


def get_settings(**overrides: object) -> Settings:
    """Build settings from the environment, with explicit overrides (e.g. CLI flags) on top."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean)  # type: ignore[arg-type]
