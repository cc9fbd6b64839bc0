"""The HTTP layer: the only package that imports FastAPI."""

from __future__ import annotations

from app.api.app import create_app

__all__ = ["create_app"]
