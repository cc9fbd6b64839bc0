"""Shared fixtures. Tests never download: the hub is offline for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from app.config import DEFAULT_MODELS_DIR

DEMO_DIR = DEFAULT_MODELS_DIR / "demo"
DEMO_PROFILES = DEFAULT_MODELS_DIR / "profiles"


@pytest.fixture(scope="session")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(model dir, profiles dir): the shipped demo model, else a tiny one made here."""
    if (DEMO_DIR / "open_clip_config.json").exists() and any(DEMO_PROFILES.glob("*.safetensors")):
        yield DEMO_DIR, DEMO_PROFILES
        return
    from tests.tiny_models import write_local_dir, write_profile_for

    root = tmp_path_factory.mktemp("served")
    model = write_local_dir(root / "tiny", seed=0)
    write_profile_for(model, root / "profiles")
    yield model, root / "profiles"
