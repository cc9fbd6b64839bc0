"""One short, prepared device check: precision, throughput and memory of the encoder path,
and the ReAlign transform on the device. Run it when a GPU is available (minutes, not more):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/gpu_check.py --device cuda --out gpu.json
    HF_HUB_OFFLINE=1 .venv/bin/python bench/gpu_check.py --device cpu --quick   # dry run here

Per architecture (random init: same compute as pretrained) and per precision (fp32, fp16, and
bf16 where supported): texts/s of our trimmed path at batch 64 and 256 vs naive
``encode_text`` at batch 64 in the same precision, max abs difference to the fp32 outputs,
whether the start-up probe kept trimming on, and peak device memory. Then the realign
transform on 1M x 512 float32 rows on the device vs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import Settings
from app.encoder import load_encoder
from app.realign import AlignmentTensors, align
from bench.encoder_bench import captions
from bench.serve_bench import random_local_dir


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn: Any, batches: list[list[str]], device: torch.device) -> float:
    fn(batches[0])
    _sync(device)
    start = time.perf_counter()
    for b in batches:
        fn(b)
    _sync(device)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def check_arch(arch: str, root: Path, device: str, quick: bool) -> list[dict[str, Any]]:
    model_dir = random_local_dir(root, arch)
    texts = captions(2048 if not quick else 256, seed=3)
    precisions = ["fp32"]
    if device == "cuda":
        precisions += ["fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    rows, reference = [], None
    for precision in precisions:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        enc = load_encoder(Settings(model=f"local-dir:{model_dir}", device=device, precision=precision))  # type: ignore[arg-type]
        dev = enc.device
        out = enc.encode_texts(texts[:256])
        reference = out if reference is None else reference
        tok = enc._tokenizer

        def naive(batch: list[str], enc: Any = enc, tok: Any = tok, dev: torch.device = dev) -> torch.Tensor:
            with torch.inference_mode():
                return F.normalize(enc.model.encode_text(tok(batch).to(dev)).float(), dim=-1)

        def ours(batch: list[str], enc: Any = enc) -> torch.Tensor:
            return enc.encode(enc.tokenize(batch))

        n64 = [texts[i : i + 64] for i in range(0, len(texts), 64)][: 4 if quick else 16]
        n256 = [texts[i : i + 256] for i in range(0, len(texts), 256)][: 1 if quick else 8]
        row = {
            "arch": arch,
            "precision": precision,
            "trimming": enc.trimming,
            "naive_b64_texts_s": _rate(naive, n64, dev),
            "ours_b64_texts_s": _rate(ours, n64, dev),
            "ours_b256_texts_s": _rate(ours, n256, dev),
            "max_abs_diff_vs_fp32": float((out - reference).abs().max()),
            "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        }
        row["speedup_b64"] = row["ours_b64_texts_s"] / row["naive_b64_texts_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del enc
    return rows


def check_align(device: str, quick: bool) -> dict[str, float]:
    n, d, chunk = (200_000 if quick else 1_000_000), 512, 65536
    gen = torch.Generator().manual_seed(0)
    stats = [torch.randn(d, generator=gen) * 0.1 for _ in range(3)]
    x = torch.randn(n, d, generator=gen)
    result = {}
    for where in ["cpu", device] if device != "cpu" else ["cpu"]:
        tensors = AlignmentTensors.from_statistics(*stats, 0.8, device=where)
        xs = x.to(where)
        align(xs[:chunk], tensors, "realign")
        _sync(torch.device(where))
        start = time.perf_counter()
        for i in range(0, n, chunk):
            align(xs[i : i + chunk], tensors, "realign")
        _sync(torch.device(where))
        result[f"align_{where}_vectors_s"] = n / (time.perf_counter() - start)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--archs", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        report["encoder"] = [r for a in args.archs for r in check_arch(a, Path(tmp), args.device, args.quick)]
    report["align"] = check_align(args.device, args.quick)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
