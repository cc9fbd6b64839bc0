"""Text-only training, in miniature: train on captions through the service, test on images.

The mission of realign-serve on the demo world of coloured shapes (examples/demo_world.py):

1. start the service with the demo model in this process (or use one at ``--url``);
2. fetch pseudo-image embeddings for *captions only*, with the Python client, for the
   alignments ``none``, ``anchor`` and ``realign``;
3. train small heads on those text embeddings alone: colour and shape classifiers (a linear
   probe and a one-hidden-layer MLP, trained on the captions that name the attribute), and a
   caption decoder (embedding -> the bag of content words of its caption);
4. test every head on real *image* embeddings from the demo model's vision tower, next to the
   same heads trained on real paired image embeddings (the upper bound);
5. measure the modality gap on held-out image/caption pairs (``app.evaluate``), save plots.

Usage (a few minutes on 2 CPU cores; ``--quick`` is a smoke run in well under a minute)::

    HF_HUB_OFFLINE=1 .venv/bin/python examples/text_only_training.py
    HF_HUB_OFFLINE=1 .venv/bin/python examples/text_only_training.py --quick \\
        --results /tmp/r --report /tmp/r/results.md
    .venv/bin/python examples/text_only_training.py --url http://localhost:8000

Writes ``RESULTS/metrics.json``, ``RESULTS/*.png``, ``RESULTS/tables.json`` and the report
(default ``docs/results.md``); prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import demo_world as world

from app.client import Alignment, RealignClient
from app.loader import CaptionDataset, PseudoImageCollate

REPO = Path(__file__).resolve().parent.parent
ALIGNMENTS: tuple[Alignment, ...] = ("none", "anchor", "realign")
UPPER = "images (paired)"
POSITION_WORDS = ("top", "bottom", "left", "right", "center", "corner")
VOCAB = (*world.COLOR_NAMES, *world.SHAPES, *world.SIZES, *POSITION_WORDS)
TRAIN_SEED, TEST_SEED = 100, 200


@dataclasses.dataclass(frozen=True)
class Plan:
    n_train: int
    n_test: int
    steps: int


FULL = Plan(n_train=5000, n_test=2000, steps=300)
QUICK = Plan(n_train=1000, n_test=400, steps=150)


# ---------------------------------------------------------------- the service


@contextmanager
def local_service(models: Path) -> Iterator[str]:
    """The service with the demo model, in a thread of this process, on a free loopback port."""
    import uvicorn

    from app.api import create_app
    from app.config import Settings
    from app.server import uvicorn_config

    settings = Settings(
        model=f"local-dir:{models / 'demo'}",
        profiles_dir=models / "profiles",
        device="cpu",
        precision="fp32",
        redis_url=None,
        host="127.0.0.1",
        port=0,
        log_level="warning",
    )
    server = uvicorn.Server(uvicorn_config(settings, create_app(settings)))
    thread = threading.Thread(target=server.run, name="realign-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the service did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


# ---------------------------------------------------------------- data


@dataclasses.dataclass
class Split:
    scenes: list[world.Scene]
    captions: list[str]
    color: np.ndarray  # true labels (images know every attribute)
    shape: np.ndarray
    words: np.ndarray  # (n, |VOCAB|) bag of the caption's content words


def make_split(n: int, seed: int) -> Split:
    scenes = world.sample_world(n, seed)
    rng = random.Random(seed)
    captions = [world.caption(s, rng) for s in scenes]
    return Split(
        scenes=scenes,
        captions=captions,
        color=np.array([s.color_index for s in scenes]),
        shape=np.array([s.shape_index for s in scenes]),
        words=bag_of_words(captions),
    )


def bag_of_words(captions: list[str]) -> np.ndarray:
    index = {w: i for i, w in enumerate(VOCAB)}
    out = np.zeros((len(captions), len(VOCAB)), dtype=np.float32)
    for row, text in enumerate(captions):
        for word in text.split():
            if word in index:
                out[row, index[word]] = 1.0
    return out


def named(split: Split, attribute: str) -> np.ndarray:
    """Rows whose caption names ``attribute``: the only ones a text-only job can label."""
    names = world.COLOR_NAMES if attribute == "color" else world.SHAPES
    labels = getattr(split, attribute)
    return np.array(
        [i for i, text in enumerate(split.captions) if names[labels[i]] in text.split()]
    )


@torch.inference_mode()
def encode_images(model_dir: Path, scenes: list[world.Scene]) -> np.ndarray:
    """Image embeddings from the demo model's vision tower (L2-normalised, float32)."""
    import open_clip

    model = open_clip.create_model(f"local-dir:{model_dir}").eval()
    chunks = [
        model.encode_image(world.normalize_images(world.render_batch(scenes[i : i + 256])))
        for i in range(0, len(scenes), 256)
    ]
    return F.normalize(torch.cat(chunks).float(), dim=-1).numpy()


# ---------------------------------------------------------------- heads


def train_head(
    x: np.ndarray, y: np.ndarray, out_dim: int, *, hidden: int, multilabel: bool, steps: int
) -> torch.nn.Module:
    """A linear probe (``hidden=0``) or a one-hidden-layer MLP, full-batch AdamW."""
    torch.manual_seed(0)
    dim = x.shape[1]
    head: torch.nn.Module = (
        torch.nn.Linear(dim, out_dim)
        if hidden == 0
        else torch.nn.Sequential(
            torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, out_dim)
        )
    )
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2 if hidden == 0 else 3e-3, weight_decay=1e-4)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(y).float() if multilabel else torch.from_numpy(y).long()
    for _ in range(steps):
        logits = head(xt)
        loss = (
            F.binary_cross_entropy_with_logits(logits, yt)
            if multilabel
            else F.cross_entropy(logits, yt)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


@torch.inference_mode()
def predict(head: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    return head(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over words (with at least one positive) of the average precision of the ranking."""
    aps = []
    for j in range(targets.shape[1]):
        t = targets[np.argsort(-scores[:, j], kind="stable"), j]
        if t.sum() == 0:
            continue
        precision = np.cumsum(t) / np.arange(1, len(t) + 1)
        aps.append(float((precision * t).sum() / t.sum()))
    return float(np.mean(aps))


def micro_f1(scores: np.ndarray, targets: np.ndarray) -> float:
    pred = scores > 0.0  # logit 0 = probability 0.5
    tp = float((pred & (targets > 0)).sum())
    return 2 * tp / max(1.0, float(pred.sum() + (targets > 0).sum()))


def classification_table(
    train: dict[str, np.ndarray], test_images: np.ndarray, tr: Split, te: Split, steps: int
) -> dict[str, dict[str, float]]:
    """Accuracy on real images of colour and shape heads trained on each embedding set."""
    table: dict[str, dict[str, float]] = {}
    for name, x in train.items():
        row = {}
        for attribute, classes in (("color", world.COLOR_NAMES), ("shape", world.SHAPES)):
            rows = np.arange(len(x)) if name == UPPER else named(tr, attribute)
            labels = getattr(tr, attribute)[rows]
            for kind, hidden in (("linear", 0), ("mlp", 256)):
                head = train_head(
                    x[rows], labels, len(classes), hidden=hidden, multilabel=False, steps=steps
                )
                pred = predict(head, test_images).argmax(1)
                row[f"{attribute}_{kind}"] = float((pred == getattr(te, attribute)).mean())
        table[name] = row
    return table


def decoder_table(
    train: dict[str, np.ndarray], test_images: np.ndarray, tr: Split, te: Split, steps: int
) -> dict[str, dict[str, float]]:
    """Caption decoder (embedding -> content words), tested on images with their own captions."""
    table: dict[str, dict[str, float]] = {}
    for name, x in train.items():
        head = train_head(x, tr.words, len(VOCAB), hidden=256, multilabel=True, steps=steps)
        scores = predict(head, test_images)
        table[name] = {
            "mAP": average_precision(scores, te.words),
            "micro_F1": micro_f1(scores, te.words),
        }
    return table


# ---------------------------------------------------------------- diagnostics


def spread_diagnostics(images: np.ndarray, texts: np.ndarray) -> dict[str, float]:
    """Where the image spread lives, relative to the text's own principal directions.

    ``trace_scale`` is realign's ``s = sqrt(T_i / T_t)``; ``subspace_scale`` is the ratio of
    image to text spread inside the text's top principal subspace (90% of text variance);
    ``image_share_in_text_subspace`` is the share of image variance inside that subspace.
    """
    ci, ct = images - images.mean(0), texts - texts.mean(0)
    t_i, t_t = float((ci**2).sum(1).mean()), float((ct**2).sum(1).mean())
    _, sv, vt = np.linalg.svd(ct, full_matrices=False)
    k = int(np.searchsorted(np.cumsum(sv**2) / np.sum(sv**2), 0.9)) + 1
    img_in = float(((ci @ vt[:k].T) ** 2).sum(1).mean())
    txt_in = float(((ct @ vt[:k].T) ** 2).sum(1).mean())
    return {
        "trace_scale": (t_i / t_t) ** 0.5,
        "subspace_scale": (img_in / txt_in) ** 0.5,
        "image_share_in_text_subspace": img_in / t_i,
        "text_subspace_dims": float(k),
    }


def class_offsets(
    train: dict[str, np.ndarray], images: np.ndarray, tr: Split
) -> dict[str, dict[str, float]]:
    """Per class, how far its centroid sits from the global one, text vs image (ratio).

    1 means text class offsets are as large as image class offsets (what a classifier trained
    on text expects to see); > 1 means the text set exaggerates class differences. Also the
    share of classes whose text centroid is nearest to the same class's image centroid.
    """
    out: dict[str, dict[str, float]] = {}
    for name, x in train.items():
        row = {}
        for attribute, n_cls in (("color", len(world.COLOR_NAMES)), ("shape", len(world.SHAPES))):
            rows = named(tr, attribute)
            labels = getattr(tr, attribute)
            t_cent = np.stack([x[rows][labels[rows] == c].mean(0) for c in range(n_cls)])
            i_cent = np.stack([images[labels == c].mean(0) for c in range(n_cls)])
            t_off = np.linalg.norm(t_cent - x[rows].mean(0), axis=1)
            i_off = np.linalg.norm(i_cent - images.mean(0), axis=1)
            row[f"{attribute}_offset_ratio"] = float(np.mean(t_off / i_off))
            dist = np.linalg.norm(t_cent[:, None] - i_cent[None], axis=2)
            row[f"{attribute}_centroid_match"] = float(np.mean(dist.argmin(1) == np.arange(n_cls)))
        out[name] = row
    return out


# ---------------------------------------------------------------- report


def markdown_table(table: dict[str, dict[str, float]], columns: dict[str, str]) -> str:
    head = "| trained on | " + " | ".join(columns.values()) + " |"
    sep = "|---|" + "---:|" * len(columns)
    rows = [
        f"| {name} | " + " | ".join(f"{vals[k]:.3f}" for k in columns) + " |"
        for name, vals in table.items()
    ]
    return "\n".join([head, sep, *rows])


CLS_COLUMNS = {
    "color_linear": "colour, linear",
    "shape_linear": "shape, linear",
    "color_mlp": "colour, MLP",
    "shape_mlp": "shape, MLP",
}
DEC_COLUMNS = {"mAP": "mAP", "micro_F1": "micro-F1"}


def findings(
    cls: dict[str, dict[str, float]], dec: dict[str, dict[str, float]], n_test: int
) -> list[str]:
    """Plain sentences read off the tables; gaps under two standard errors count as ties."""
    tie = 2 * 0.5 / n_test**0.5
    lines = []
    for key, title in [*CLS_COLUMNS.items(), *DEC_COLUMNS.items()]:
        table = cls if key in CLS_COLUMNS else dec
        scores = {a: table[a][key] for a in ALIGNMENTS}
        top = max(scores.values())
        leaders = [a for a in ALIGNMENTS if top - scores[a] < tie]
        verdict = (
            "no clear difference between alignments"
            if len(leaders) == len(ALIGNMENTS)
            else "best text-only: **" + " ≈ ".join(leaders) + "**"
        )
        ordered = ", ".join(f"{a} {scores[a]:.3f}" for a in ALIGNMENTS)
        lines.append(f"- {title}: {verdict} ({ordered}; paired images {table[UPPER][key]:.3f}).")
    return lines


def plot_transfer(
    cls: dict[str, dict[str, float]], dec: dict[str, dict[str, float]], path: Path
) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    metrics = [(k, t, cls) for k, t in CLS_COLUMNS.items()]
    metrics += [(k, f"decoder {t}", dec) for k, t in DEC_COLUMNS.items()]
    names = [*ALIGNMENTS, UPPER]
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs = np.arange(len(metrics)) + (j - (len(names) - 1) / 2) * width
        ax.bar(xs, [table[name][k] for k, _, table in metrics], width, label=name)
    ax.set_xticks(np.arange(len(metrics)), [t for _, t, _ in metrics], rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score on real images")
    ax.set_title("Heads trained on text embeddings only, tested on image embeddings")
    ax.legend(ncols=4, fontsize=8)
    fig.savefig(path, dpi=120)
    return path


OFFSET_COLUMNS = {
    "color_offset_ratio": "colour offset ratio",
    "shape_offset_ratio": "shape offset ratio",
    "color_centroid_match": "colour centroid match",
    "shape_centroid_match": "shape centroid match",
}


def write_report(
    path: Path,
    results: Path,
    tables: dict[str, Any],
    gap_table: str,
    plan: Plan,
    seconds: float,
) -> None:
    cls, dec, gap, spread = (
        tables["classification"],
        tables["decoder"],
        tables["gap"],
        tables["spread"],
    )
    rel = Path(os.path.relpath(results.resolve(), path.resolve().parent))
    realign, none = gap["realign"], gap["none"]
    text = f"""# Text-only training on the demo world

Generated by `examples/text_only_training.py` ({plan.n_train} training scenes,
{plan.n_test} test scenes, {seconds:.0f} s). Heads are trained on **text embeddings only**
(captions through the service, three alignments) and tested on **image embeddings** of rendered
scenes from the demo model's vision tower. `{UPPER}` is the same head trained on real image
embeddings of the training scenes: the upper bound. Colour and shape heads train on the
captions that name the attribute (a text-only job can label only those); the caption decoder
predicts the content words of a caption ({len(VOCAB)} words: colours, shapes, sizes, positions)
and is scored against each test image's own caption.

## Classification accuracy on real images

{markdown_table(cls, CLS_COLUMNS)}

Chance: colour {1 / len(world.COLOR_NAMES):.3f}, shape {1 / len(world.SHAPES):.3f}. The
standard error of an accuracy on {plan.n_test} test images is at most
{0.5 / plan.n_test**0.5:.3f}; differences below about twice that are noise.

## Caption decoder on real images

{markdown_table(dec, DEC_COLUMNS)}

mAP: mean over words of the average precision of ranking test images by the word's score;
micro-F1 at probability 0.5. A caption names only some attributes, so even a perfect image
model cannot reach 1.

## What the numbers say

{chr(10).join(findings(cls, dec, plan.n_test))}

(Ties: within {2 * 0.5 / plan.n_test**0.5:.3f}, two standard errors of an accuracy.)

## Modality gap on held-out pairs ({plan.n_test} images with their own captions)

{gap_table}

realign moves the text centroid onto the image centroid (gap {none["centroid_gap"]:.3f} ->
{realign["centroid_gap"]:.3f}) and raises the mean cosine of a caption to its own image from
{none["paired_cosine_mean"]:.3f} to {realign["paired_cosine_mean"]:.3f}.

## Diagnostics: class structure and spread

Per alignment, on the training captions that name the attribute and the training images:

{markdown_table(tables["class_offsets"], OFFSET_COLUMNS)}

*Offset ratio*: mean over classes of |text class centroid - text centroid| divided by
|image class centroid - image centroid| (1 = text class differences as large as in images;
> 1 = exaggerated). *Centroid match*: share of classes whose text centroid is nearest to the
same class's image centroid.

Spread: the profile's trace scale s = {spread["profile_scale"]:.3f} (this sample:
{spread["trace_scale"]:.3f}); inside the text's own top {spread["text_subspace_dims"]:.0f}
principal directions (90% of text variance) images spread {spread["subspace_scale"]:.3f} times
as much as text, and only {spread["image_share_in_text_subspace"]:.1%} of the image variance
lies in those directions.

![PCA]({rel / "pca.png"})
![paired cosine]({rel / "paired_cosine.png"})
![spectra]({rel / "spectra.png"})
![transfer]({rel / "transfer.png"})

{DISCUSSION_MARKER}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    keep = old.split(DISCUSSION_MARKER, 1)[1] if DISCUSSION_MARKER in old else ""
    path.write_text(text + keep)


#: Everything after this line in the report is hand-written and kept across reruns.
DISCUSSION_MARKER = "<!-- discussion: written by hand, kept when the tables are regenerated -->"


# ---------------------------------------------------------------- main


def fetch(client: RealignClient, texts: list[str]) -> dict[str, np.ndarray]:
    return {a: client.embed(texts, alignment=a) for a in ALIGNMENTS}


def fetch_with_loader(url: str, api_key: str | None, texts: list[str]) -> dict[str, np.ndarray]:
    """As a training job would: a DataLoader whose workers call the service in collate."""
    from torch.utils.data import DataLoader

    out: dict[str, np.ndarray] = {}
    alignment: Alignment
    for alignment in ALIGNMENTS:
        collate = PseudoImageCollate(url, alignment=alignment, api_key=api_key)
        loader = DataLoader(
            CaptionDataset(texts), batch_size=256, num_workers=2, collate_fn=collate
        )
        out[alignment] = torch.cat([batch["pseudo_image"] for batch in loader]).numpy()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from app import evaluate

    start = time.perf_counter()
    plan = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    tr, te = make_split(plan.n_train, TRAIN_SEED), make_split(plan.n_test, TEST_SEED)

    with (
        local_service(args.models) if args.url is None else _given(args.url) as url,
        RealignClient(url, api_key=args.api_key) as client,
    ):
        model, profiles = client.models()[0], client.profiles()
        print(f"service {url}: model {model['id']}, profile {profiles['default']}", flush=True)
        profile = next(p for p in profiles["data"] if p["name"] == profiles["default"])
        train_text = fetch_with_loader(url, args.api_key, tr.captions)
        test_text = fetch(client, te.captions)
    print(f"fetched {3 * (plan.n_train + plan.n_test)} pseudo-image embeddings", flush=True)
    train_img = encode_images(args.models / "demo", tr.scenes)
    test_img = encode_images(args.models / "demo", te.scenes)
    print(f"encoded {plan.n_train + plan.n_test} images", flush=True)

    train_sets = {**train_text, UPPER: train_img}
    cls = classification_table(train_sets, test_img, tr, te, plan.steps)
    dec = decoder_table(train_sets, test_img, tr, te, plan.steps)
    offsets = class_offsets(train_text, train_img, tr)
    spread = {"profile_scale": float(profile["scale"])}
    spread.update(spread_diagnostics(train_img, train_text["none"]))

    gap = evaluate.evaluate(test_img, test_text["none"], test_text, paired=True, seed=0)
    args.results.mkdir(parents=True, exist_ok=True)
    evaluate.write_report(gap, test_img, test_text["none"], test_text, args.results, paired=True)
    plot_transfer(cls, dec, args.results / "transfer.png")
    gap_table = evaluate.format_table(gap)
    tables = {
        "classification": cls,
        "decoder": dec,
        "gap": {a: gap[a] for a in ALIGNMENTS},
        "class_offsets": offsets,
        "spread": spread,
    }
    (args.results / "tables.json").write_text(json.dumps(tables, indent=2) + "\n")
    seconds = time.perf_counter() - start
    write_report(args.report, args.results, tables, gap_table, plan, seconds)

    print("\nClassification accuracy on real images (heads trained on the row's embeddings)")
    print(markdown_table(cls, CLS_COLUMNS))
    print("\nCaption decoder on real images")
    print(markdown_table(dec, DEC_COLUMNS))
    print("\nModality gap, held-out pairs")
    print(gap_table)
    print("\nClass offsets, text vs images (training set)")
    print(markdown_table(offsets, OFFSET_COLUMNS))
    print("\n" + "  ".join(f"{k} {v:.3f}" for k, v in spread.items()))
    print(f"\nreport: {args.report}  plots: {args.results}  ({seconds:.0f} s)")
    return tables


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="use this running service instead")
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--models", type=Path, default=REPO / "models", help="holds demo/, profiles/"
    )
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--quick", action="store_true", help="small sizes, < 60 s")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (small heads: 1 is fastest)"
    )
    args = parser.parse_args(argv)
    if not (args.models / "demo").is_dir():
        parser.error(f"no demo model in {args.models / 'demo'}: run examples/make_demo_model.py")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
