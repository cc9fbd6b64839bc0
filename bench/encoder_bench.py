"""Our encoder path (context trimming) vs naive ``model.encode_text(tokenizer(texts))``.

Batch 64 of caption-length texts (~10-20 tokens), fp32 on the CPU, same process, same weights.
Both sides include tokenisation and L2 normalisation. Prints texts/s, the speed-up and the max
abs difference between the two outputs (target: >= 2.5x with <= 1e-5)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/encoder_bench.py [--batches 3] [--threads 2]

Models: the ViT-B-32 text tower with random weights (same compute as any pretrained ViT-B-32)
and the demo model in ``models/demo``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import DEFAULT_MODELS_DIR, Settings
from app.encoder import TextEncoder, load_encoder

BATCH = 64
_SUBJECTS = ("a small dog", "two children", "an old red car", "a wooden table", "a bird", "a man")
_ACTIONS = ("sitting", "playing", "parked", "standing", "resting", "waiting")
_PLACES = (
    "on a sunny beach",
    "next to a tall building in the city",
    "in a kitchen with white walls",
    "under a tree in the park",
    "at the end of a long road",
)


def captions(n: int, seed: int = 0) -> list[str]:
    """Caption-like texts of roughly 10-20 tokens."""
    rng = random.Random(seed)
    return [
        f"a photo of {rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)} {rng.choice(_PLACES)}"
        for _ in range(n)
    ]


def _rates(
    ours: Callable[[list[str]], torch.Tensor],
    naive: Callable[[list[str]], torch.Tensor],
    batches: list[list[str]],
) -> tuple[float, float]:
    """texts/s of both sides, timed batch by batch in alternation, so that load from other
    processes on a shared machine hits both sides alike."""
    ours(batches[0])  # warm-up
    naive(batches[0])
    spent = {"ours": 0.0, "naive": 0.0}
    for batch in batches:
        for name, fn in (("ours", ours), ("naive", naive)):
            start = time.perf_counter()
            fn(batch)
            spent[name] += time.perf_counter() - start
    n = sum(len(b) for b in batches)
    return n / spent["ours"], n / spent["naive"]


def compare(
    name: str, encoder: TextEncoder, model: torch.nn.Module, tokenizer: object, n: int
) -> None:
    texts = captions(n * BATCH)
    batches = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]

    def naive(batch: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            return F.normalize(model.encode_text(tokenizer(batch)), dim=-1)  # type: ignore[operator]

    lengths = [t.n_tokens for t in encoder.tokenize(texts)]
    diff = float((encoder.encode_texts(batches[0]) - naive(batches[0])).abs().max())
    ours_rate, naive_rate = _rates(encoder.encode_texts, naive, batches)
    print(
        f"{name:10s} tokens/text {min(lengths)}-{max(lengths)}  trimming={encoder.trimming}  "
        f"naive {naive_rate:7.1f} texts/s  ours {ours_rate:7.1f} texts/s  "
        f"speed-up {ours_rate / naive_rate:5.2f}x  max abs diff {diff:.1e}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=3, help="timed batches of 64 per side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--demo", type=Path, default=DEFAULT_MODELS_DIR / "demo")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    vit = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    encoder = TextEncoder.from_model(vit, "ViT-B-32", "random-init")
    compare("ViT-B-32", encoder, vit, open_clip.get_tokenizer("ViT-B-32"), args.batches)

    demo_name = f"local-dir:{args.demo}"
    demo = load_encoder(Settings(model=demo_name, device="cpu", precision="fp32"))
    reference = open_clip.create_model(demo_name).eval()
    compare("demo", demo, reference, open_clip.get_tokenizer(demo_name), args.batches * 4)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
