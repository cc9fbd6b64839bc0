"""Data-loader helpers for training jobs: captions in, pseudo-image embedding tensors out.

Kept apart from :mod:`app.client` so that the HTTP client stays free of torch; torch is
imported only when a batch is collated (inside the worker process that needs it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from app.client import Alignment, RealignClient

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

    _DatasetBase = Dataset[dict[str, Any]]
else:  # torch's Dataset is a plain base class; DataLoader needs only __getitem__ and __len__
    _DatasetBase = object

__all__ = ["CaptionDataset", "PseudoImageCollate"]


class CaptionDataset(_DatasetBase):
    """A map-style dataset of captions (plus any per-item fields), for ``DataLoader``.

    Items are ``{"caption": text, **fields}``: ``CaptionDataset(texts, label=labels)``. It
    imports no torch (a ``DataLoader`` needs only ``__len__`` and ``__getitem__``); type
    checkers see a ``torch.utils.data.Dataset``.
    """

    def __init__(self, captions: Sequence[str], **fields: Sequence[Any]) -> None:
        for name, values in fields.items():
            if len(values) != len(captions):
                raise ValueError(f"{name}: {len(values)} values for {len(captions)} captions")
        self.captions = captions
        self.fields = fields

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"caption": self.captions[i], **{k: v[i] for k, v in self.fields.items()}}


class PseudoImageCollate:
    """``collate_fn`` turning a batch of captions into a tensor of pseudo-image embeddings.

    Items are strings (the batch becomes an (n, d) float32 tensor) or mappings with a
    ``caption_key`` field (the batch becomes a dict: the other fields collated by torch's
    ``default_collate``, the captions as a list, and the embeddings under ``output_key``).
    Picklable and safe with ``DataLoader(num_workers>0)``: each process creates its own
    :class:`RealignClient` on first use (tracked by pid), and the client is never pickled.
    Usage::

        collate = PseudoImageCollate("http://localhost:8000", alignment="realign")
        loader = DataLoader(CaptionDataset(texts, label=y), batch_size=256,
                            num_workers=4, collate_fn=collate)
        for batch in loader:
            loss = head(batch["pseudo_image"]), batch["label"] ...

    Parameters: ``base_url``, ``profile``, ``alignment``; ``caption_key`` (default
    ``"caption"``), ``output_key`` (default ``"pseudo_image"``); any other keyword goes to
    :class:`RealignClient` (``api_key``, ``dtype``, ``transport``, ``timeout``, ``retry``...).
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        profile: str | None = None,
        alignment: Alignment = "realign",
        caption_key: str = "caption",
        output_key: str = "pseudo_image",
        **client_kwargs: Any,
    ) -> None:
        self.base_url = base_url
        self.profile = profile
        self.alignment: Alignment = alignment
        self.caption_key = caption_key
        self.output_key = output_key
        self.client_kwargs = client_kwargs
        self._client: RealignClient | None = None
        self._pid: int | None = None

    @property
    def client(self) -> RealignClient:
        """This process's client, created on first use (a forked worker makes its own)."""
        if self._client is None or self._pid != os.getpid():
            self._client = RealignClient(self.base_url, **self.client_kwargs)
            self._pid = os.getpid()
        return self._client

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        import torch

        return torch.from_numpy(
            self.client.embed(texts, profile=self.profile, alignment=self.alignment)
        )

    def __call__(self, batch: Sequence[Any]) -> Any:
        """Strings -> an (n, d) float32 tensor; mappings -> a dict (see the class docstring)."""
        if all(isinstance(item, str) for item in batch):
            return self.embed(list(batch))
        if not all(isinstance(item, Mapping) for item in batch):
            raise TypeError("batch items must all be strings or all be mappings")
        from torch.utils.data import default_collate

        texts = [item[self.caption_key] for item in batch]
        rest = [{k: v for k, v in item.items() if k != self.caption_key} for item in batch]
        out: dict[str, Any] = dict(default_collate(rest)) if rest[0] else {}
        out[self.caption_key] = texts
        out[self.output_key] = self.embed(texts)
        return out

    def close(self) -> None:
        """Close this process's client (if it created one)."""
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_pid"] = None
        return state
