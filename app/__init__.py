"""realign-serve: text in, pseudo-image embeddings out (OpenCLIP text encoder + ReAlign)."""

from __future__ import annotations

__version__ = "0.1.0"
