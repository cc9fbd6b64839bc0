"""Service throughput and latency vs the in-process encoder ceiling, and the batching gain.

For each model (the ViT-B-32 text tower with random weights: same compute as pretrained; and
the demo model), in one run:

  ceiling   the encoder alone in this process: tokenize + encode batches of 64 (texts/s)
  service   ``realign serve`` as a separate process on loopback, one text per request,
            at concurrency 1, 16 and 64 (texts/s, p50/p99 latency), cache off
  batch=1   the same service with ``max_batch_size=1`` at concurrency 64 (the batching gain)

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_bench.py [--models demo vit-b-32] [--seconds 8]

The load generator (``bench/loadgen.py``, raw asyncio HTTP/1.1 keep-alive) shares the 2 cores
with the server; its CPU share is printed (a few percent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import DEFAULT_MODELS_DIR, Settings
from app.encoder import load_encoder
from bench.encoder_bench import captions
from bench.loadgen import post_load
from tests.servers import ServerProcess
from tests.tiny_models import write_profile_for


def random_local_dir(root: Path, arch: str = "ViT-B-32") -> Path:
    """A random-init open_clip architecture in local-dir format (same compute as pretrained)."""
    import open_clip
    from safetensors.torch import save_file

    d = root / f"{arch}-random"
    d.mkdir(parents=True)
    cfg = open_clip.get_model_config(arch)
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    return d


def ceiling(model_dir: Path, texts: list[str], seconds: float) -> float:
    enc = load_encoder(Settings(model=f"local-dir:{model_dir}"))
    enc.warmup()
    done, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        batch = texts[i : i + 64] or texts[:64]
        i = (i + 64) % len(texts)
        enc.encode(enc.tokenize(batch))
        done += len(batch)
    rate = done / (time.perf_counter() - start)
    del enc
    return rate


def _load(url: str, texts: list[str], concurrency: int, seconds: float) -> dict[str, float]:
    """One distinct text per request (base64 float32), ``concurrency`` keep-alive connections."""
    result = asyncio.run(
        post_load(url, lambda i: {"input": texts[i % len(texts)], "encoding_format": "base64"}, concurrency, seconds)
    )
    result["texts_s"] = result["requests_s"]
    return result


def bench_model(name: str, model_dir: Path, seconds: float) -> dict[str, object]:
    # unique texts: every request is a real encode (and the cache is off anyway)
    texts = [f"{c} #{i}" for i, c in enumerate(captions(20000, seed=1))]
    result: dict[str, object] = {"model": name}
    result["ceiling_texts_s"] = ceiling(model_dir, texts, seconds)
    profiles = model_dir.parent / f"{model_dir.name}-profiles"
    if name == "demo":
        profiles = DEFAULT_MODELS_DIR / "profiles"
    elif not profiles.exists():
        write_profile_for(model_dir, profiles, name="bench")  # so requests run the full realign path
    env = {"REALIGN_MODEL": f"local-dir:{model_dir}", "REALIGN_CACHE_ENABLED": "false",
           "REALIGN_PROFILES_DIR": str(profiles), "REALIGN_LOG_LEVEL": "warning"}
    with ServerProcess(env) as server:
        for conc in (1, 16, 64):
            result[f"c{conc}"] = _load(server.url, texts, conc, seconds)
    with ServerProcess({**env, "REALIGN_MAX_BATCH_SIZE": "1"}) as server:
        result["batch1_c64"] = _load(server.url, texts, 64, seconds)
    return result


def report(r: dict) -> None:  # type: ignore[type-arg]
    ceil = r["ceiling_texts_s"]
    print(f"\n== {r['model']}: in-process encoder ceiling {ceil:,.1f} texts/s (batches of 64)")
    print(f"{'setting':<22}{'texts/s':>10}{'of ceiling':>12}{'p50 ms':>10}{'p99 ms':>10}{'client CPU':>12}")
    for key, label in (("c1", "service, conc 1"), ("c16", "service, conc 16"), ("c64", "service, conc 64"),
                       ("batch1_c64", "max_batch_size=1, c64")):
        m = r[key]
        print(f"{label:<22}{m['texts_s']:>10,.1f}{m['texts_s'] / ceil:>12.2f}{m['p50_ms']:>10.1f}{m['p99_ms']:>10.1f}"
              f"{m['client_cpu_share']:>12.0%}")
    print(f"batching gain at concurrency 64: {r['c64']['texts_s'] / r['batch1_c64']['texts_s']:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["demo", "vit-b-32"], choices=["demo", "vit-b-32"])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        for name in args.models:
            model_dir = DEFAULT_MODELS_DIR / "demo" if name == "demo" else random_local_dir(Path(tmp))
            results.append(bench_model(name, model_dir, args.seconds))
            report(results[-1])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
