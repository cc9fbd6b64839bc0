"""Small real open_clip models that the tests create themselves (random init, local-dir format)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import torch
from safetensors.torch import save_file

TINY_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "head_width": 16, "layers": 1},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_local_dir(
    directory: Path, seed: int, text_overrides: dict[str, object] | None = None
) -> Path:
    """A local-dir model with random weights (open_clip's format: config JSON + safetensors)."""
    cfg = json.loads(json.dumps(TINY_CFG))
    cfg["text_cfg"].update(text_overrides or {})
    directory.mkdir(parents=True)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
    return directory


def write_profile_for(
    model_dir: Path, profiles_dir: Path, name: str = "tiny", seed: int = 0
) -> Path:
    """A profile for a tiny model: its text embeddings of some captions vs a shifted 'image' cloud."""
    from app.config import Settings
    from app.encoder import load_encoder
    from app.profiles import build_profile_from_arrays

    enc = load_encoder(Settings(model=f"local-dir:{model_dir}", profiles_dir=profiles_dir))
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "circle", "square", "big", "small", "left", "right", "top"]
    captions = [" ".join(rng.choice(words, size=rng.integers(1, 6))) for _ in range(300)]
    texts = enc.encode_texts(captions).numpy()
    images = rng.normal(size=(400, enc.dim)) * 0.3 + rng.normal(size=enc.dim)
    prof = build_profile_from_arrays(
        texts, images, name=name, model=enc.fingerprint.model_id, source="tests"
    )
    return prof.save(profiles_dir / f"{name}.safetensors")
