"""Train the tiny demo CLIP on the synthetic shapes world and build its demo profile.

Reproducible (fixed seeds, CPU), a few minutes on 2 cores::

    HF_HUB_OFFLINE=1 .venv/bin/python examples/make_demo_model.py            # -> models/
    HF_HUB_OFFLINE=1 .venv/bin/python examples/make_demo_model.py --quick --out /tmp/m

Writes ``OUT/demo/`` in open_clip's ``local-dir:`` format (``open_clip_config.json`` and
``open_clip_model.safetensors`` in fp16) and ``OUT/profiles/demo.safetensors``.

Why the training looks the way it does (DESIGN.md §4): the logit scale is frozen at 100 (CLIP's
cap) and images hold content captions never name; with a learned temperature and exhaustive
captions the two modalities collapse onto each other and there is no gap for ReAlign to close.
The profile is built from *unpaired* data: images from one sample of the world, captions from an
independent one.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import demo_world as world

from app.config import Settings
from app.encoder import TextEncoder, load_encoder

REPO_ROOT = Path(__file__).resolve().parent.parent
LOGIT_SCALE = 100.0
#: Text width 96 keeps the 49408-row token table (which dominates) under ~10 MB in fp16.
MODEL_CFG = {
    "embed_dim": 128,
    "vision_cfg": {
        "image_size": world.IMAGE_SIZE,
        "patch_size": 8,
        "width": 128,
        "head_width": 32,
        "layers": 3,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 96, "heads": 4, "layers": 3},
}
PREPROCESS_CFG = {"size": world.IMAGE_SIZE, "mean": list(world.MEAN), "std": list(world.STD)}
TRAIN_SEED, EVAL_SEED, PROFILE_IMAGE_SEED, PROFILE_TEXT_SEED = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run; ``--quick`` shrinks everything for a smoke test."""

    steps: int
    batch: int
    lr: float
    pool: int  # pre-rendered training images
    eval_n: int
    profile_n: int
    log_every: int = 100


FULL = Plan(steps=1200, batch=256, lr=5e-4, pool=20_000, eval_n=2000, profile_n=10_000)
QUICK = Plan(steps=20, batch=64, lr=5e-4, pool=512, eval_n=256, profile_n=512, log_every=10)


class _Tokens:
    """Tokenise with a cache (captions repeat a lot), cut to the batch's longest text: the
    causal tower gives the same output as at full length (context trimming)."""

    def __init__(self) -> None:
        self.tokenizer = open_clip.SimpleTokenizer(context_length=77)
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        for text in texts:
            if text not in self.cache:
                self.cache[text] = self.tokenizer([text])[0]
        ids = torch.stack([self.cache[text] for text in texts])
        return ids[:, : int((ids != 0).sum(dim=1).max())]


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only).

    The trimmed text batches change shape every step, and glibc's heap fragments under that
    pattern: without this the process grew by ~9 MB per step (9 GB over a full run) although
    nothing is retained.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def logit_scale_at(step: int, plan: Plan) -> float:
    """A fixed schedule, never learned: 10 -> 100 over the first tenth of training, then 100.

    Starting at 100 from random init leaves the model stuck at the collapsed solution (loss
    ln(batch)); a short ramp from a CLIP-like 10 avoids that and still ends at CLIP's cap.
    """
    ramp = max(1, plan.steps // 10)
    return min(LOGIT_SCALE, 10.0 * 10.0 ** (step / ramp))


def _encode_text(model: open_clip.CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP.encode_text on a trimmed batch (positions and causal mask sliced to its length)."""
    length = tokens.shape[1]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    return x @ model.text_projection


def train(plan: Plan) -> open_clip.CLIP:
    """Contrastive training with a fixed logit-scale schedule ending at 100 (not learned).

    Images come from a pre-rendered pool (rendering is the slow part on a CPU); captions are
    drawn afresh each time a scene is used, so the model sees many phrasings per image.
    """
    torch.manual_seed(TRAIN_SEED)
    model = open_clip.CLIP(**MODEL_CFG)
    model.logit_scale.data.fill_(math.log(LOGIT_SCALE))
    model.logit_scale.requires_grad_(False)
    tokenize = _Tokens()
    scenes = world.sample_world(plan.pool, TRAIN_SEED)
    images = world.normalize_images(world.render_batch(scenes)).half()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.1)
    warmup = max(1, plan.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, plan.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    rng = random.Random(TRAIN_SEED)
    generator = torch.Generator().manual_seed(TRAIN_SEED)
    labels = torch.arange(plan.batch)
    start = time.perf_counter()
    model.train()
    for step in range(plan.steps):
        index = torch.randperm(plan.pool, generator=generator)[: plan.batch]
        tokens = tokenize([world.caption(scenes[i], rng) for i in index.tolist()])
        img = F.normalize(model.encode_image(images[index].float()), dim=-1)
        txt = F.normalize(_encode_text(model, tokens), dim=-1)
        logits = logit_scale_at(step, plan) * img @ txt.T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 20 == 0:
            _release_freed_memory()
        if step % plan.log_every == 0 or step == plan.steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - start:6.1f}s",
                flush=True,
            )
    return model.eval()


def save_local_dir(model: open_clip.CLIP, out: Path) -> Path:
    """open_clip's local-dir format: config JSON plus fp16 safetensors weights."""
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    weights = out / "open_clip_model.safetensors"
    save_file(state, str(weights))
    weights.chmod(0o644)  # safetensors writes 0600; containers read it as another user
    return out


@torch.inference_mode()
def encode_images(model: open_clip.CLIP, scenes: list[world.Scene]) -> torch.Tensor:
    chunks = [
        model.encode_image(world.normalize_images(world.render_batch(scenes[i : i + 256])))
        for i in range(0, len(scenes), 256)
    ]
    return F.normalize(torch.cat(chunks).float(), dim=-1)


def gap_measures(image: torch.Tensor, text: torch.Tensor) -> dict[str, float]:
    """Centroid distance, paired cosine and retrieval on paired, normalised embeddings."""
    n = image.shape[0]
    sims = text @ image.T
    ranks = (sims > sims.diagonal().unsqueeze(1)).sum(dim=1)
    return {
        "centroid_distance": float((image.mean(0) - text.mean(0)).norm()),
        "paired_cosine": float(sims.diagonal().mean()),
        "text_to_image_r@1": float((ranks < 1).float().mean()),
        "text_to_image_r@10": float((ranks < 10).float().mean()),
        "chance_r@10": 10 / n,
    }


def evaluate(model: open_clip.CLIP, encoder: TextEncoder, n: int) -> dict[str, float]:
    """Gap measures of the *saved* weights on a held-out paired sample."""
    scenes = world.sample_world(n, EVAL_SEED)
    rng = random.Random(EVAL_SEED)
    text = encoder.encode_texts([world.caption(s, rng) for s in scenes])
    return gap_measures(encode_images(model, scenes), text)


def build_profile(model: open_clip.CLIP, encoder: TextEncoder, n: int, path: Path) -> None:
    """The demo profile from unpaired data: images and captions from independent samples."""
    from app.profiles import build_profile_from_arrays

    images = encode_images(model, world.sample_world(n, PROFILE_IMAGE_SEED))
    rng = random.Random(PROFILE_TEXT_SEED)
    texts = [world.caption(s, rng) for s in world.sample_world(n, PROFILE_TEXT_SEED)]
    text = encoder.encode_texts(texts)
    profile = build_profile_from_arrays(
        text=text.double().numpy(),
        image=images.double().numpy(),
        name="demo",
        model=encoder.fingerprint.model_id,
        source="examples/make_demo_model.py (unpaired synthetic world)",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    profile.save(path)
    print(f"profile {path} for {encoder.fingerprint.model_id}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models", help="models directory")
    parser.add_argument("--quick", action="store_true", help="a few steps, small samples")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="override the training steps")
    parser.add_argument("--lr", type=float, default=None, help="override the learning rate")
    parser.add_argument("--no-profile", action="store_true", help="skip the profile")
    parser.add_argument(
        "--profile-only",
        action="store_true",
        help="reuse OUT/demo; only evaluate and build the profile",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    if args.steps is not None:
        plan = dataclasses.replace(plan, steps=args.steps)
    if args.lr is not None:
        plan = dataclasses.replace(plan, lr=args.lr)

    model_dir = args.out / "demo"
    if not args.profile_only:
        save_local_dir(train(plan), model_dir)
    saved = open_clip.create_model(f"local-dir:{model_dir}").eval()  # evaluate what we ship
    encoder = load_encoder(Settings(model=f"local-dir:{model_dir}", device="cpu", precision="fp32"))
    measures = evaluate(saved, encoder, plan.eval_n)
    print("gap measures (held-out pairs):")
    for key, value in measures.items():
        print(f"  {key:22s} {value:.4f}")
    if not args.no_profile:
        build_profile(saved, encoder, plan.profile_n, args.out / "profiles" / "demo.safetensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
