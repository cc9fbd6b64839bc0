"""The ``realign`` command: serve, build/inspect/import profiles, apply offline, evaluate.

Thin on purpose: argument parsing and progress bars here, the work in ``offline``,
``profiles`` and ``evaluate``. Every expected failure prints one ``error:`` line and exits 2;
no traceback reaches the user for bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from app.errors import RealignError

if TYPE_CHECKING:
    from app.embedding_io import EmbeddingSource

EXIT_USAGE = 2


def _bar(label: str, total: int | None) -> Callable[[int], None]:
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="vec", unit_scale=True, disable=None, leave=False)
    return bar.update


# --- serve -----------------------------------------------------------------------------------
def _cmd_serve(args: argparse.Namespace) -> int:
    from app.config import get_settings
    from app.server import run

    settings = get_settings(
        host=args.host,
        port=args.port,
        model=args.model,
        pretrained=args.pretrained,
        profiles_dir=args.profiles_dir,
        device=args.device,
        precision=args.precision,
        redis_url=args.redis_url,
        log_level=args.log_level,
    )
    run(settings)
    return 0


# --- profile build / inspect / import --------------------------------------------------------
def _embedding_source(args: argparse.Namespace, kind: str, tmpdir: Path) -> EmbeddingSource:
    """An EmbeddingSource for texts or images, encoding with a model where needed."""
    from app.embedding_io import EmbeddingSource

    emb = getattr(args, f"{kind}_embeddings")
    if emb is not None:
        return EmbeddingSource(emb, chunk_rows=args.chunk_rows)
    from app.batch_encode import encode_images_to_npy, encode_texts_to_npy

    out = tmpdir / f"{kind}.npy"
    if kind == "text":
        encode_texts_to_npy(
            args.texts, out, model=args.model, pretrained=args.pretrained, progress=_bar
        )
    else:
        encode_images_to_npy(
            args.images, out, model=args.model, pretrained=args.pretrained, progress=_bar
        )
    return EmbeddingSource(out, chunk_rows=args.chunk_rows)


def _cmd_profile_build(args: argparse.Namespace) -> int:
    import tempfile

    from app.errors import InputError
    from app.offline import build_profile_from_sources

    if args.text_embeddings is None and args.texts is None:
        raise InputError("give --text-embeddings T.npy or --texts FILE")
    if args.image_embeddings is None and args.images is None:
        raise InputError("give --image-embeddings I.npy or --images DIR")
    needs_model = args.texts is not None or args.images is not None
    model_id = args.model_id
    with tempfile.TemporaryDirectory(prefix="realign-build-") as tmp:
        texts = _embedding_source(args, "text", Path(tmp))
        images = _embedding_source(args, "image", Path(tmp))
        if needs_model and model_id is None:
            from app.batch_encode import model_id_for

            model_id = model_id_for(args.model, args.pretrained)
        name = args.name or Path(args.out).stem
        profile = build_profile_from_sources(
            texts,
            images,
            name=name,
            model=model_id or "unknown",
            source=f"texts={args.texts or args.text_embeddings} images={args.images or args.image_embeddings}",
            progress=_bar,
        )
    path = profile.save(args.out)
    print(json.dumps({"saved": str(path), **profile.summary()}, indent=2))
    return 0


def _cmd_profile_inspect(args: argparse.Namespace) -> int:
    from app.profiles import Profile

    summary = Profile.load(args.path).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        width = max(map(len, summary))
        for key, value in summary.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _cmd_profile_import(args: argparse.Namespace) -> int:
    from app.profiles import import_authors_stats

    name = args.name or Path(args.out).stem
    profile = import_authors_stats(args.stats, name=name, model=args.model_id)
    path = profile.save(args.out)
    print(json.dumps({"saved": str(path), **profile.summary()}, indent=2))
    return 0


# --- apply -----------------------------------------------------------------------------------
def _cmd_apply(args: argparse.Namespace) -> int:
    import tempfile

    from app.embedding_io import EmbeddingSource
    from app.errors import InputError
    from app.offline import apply_to_file
    from app.profiles import Profile

    if (args.embeddings is None) == (args.texts is None):
        raise InputError("give exactly one of --embeddings or --texts")
    profile = None
    if args.profile is not None:
        profile = Profile.load(args.profile)
    elif args.alignment != "none":
        raise InputError(f"--alignment {args.alignment} needs --profile")
    with tempfile.TemporaryDirectory(prefix="realign-apply-") as tmp:
        if args.texts is not None:
            from app.batch_encode import encode_texts_to_npy, model_id_for

            if profile is not None:
                model_id = model_id_for(args.model, args.pretrained)
                if profile.model != model_id:
                    raise InputError(
                        f"profile {profile.name!r} was built for {profile.model}, not {model_id}"
                    )
            encoded = Path(tmp) / "texts.npy"
            encode_texts_to_npy(
                args.texts, encoded, model=args.model, pretrained=args.pretrained, progress=_bar
            )
            source = EmbeddingSource(encoded, chunk_rows=args.chunk_rows)
        else:
            source = EmbeddingSource(args.embeddings, chunk_rows=args.chunk_rows)
        result = apply_to_file(
            profile,
            source,
            args.out,
            alignment=args.alignment,
            device=args.device,
            progress=_bar("aligning", source.rows),
        )
    report = {"out": str(result.out), "rows": result.rows, "dim": result.dim}
    if result.ids_out:
        report["ids"] = str(result.ids_out)
    print(json.dumps(report))
    return 0


# --- eval ------------------------------------------------------------------------------------
def _cmd_eval(args: argparse.Namespace) -> int:
    from app.offline import run_evaluation

    result = run_evaluation(
        images=args.image_embeddings,
        texts=args.text_embeddings,
        profile=args.profile,
        out_dir=args.out_dir,
        paired=args.paired,
        sample=args.sample,
        seed=args.seed,
    )
    print(result)
    return 0


# --- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service (flags override REALIGN_* env)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model", help="architecture name or local-dir:PATH")
    serve.add_argument("--pretrained", help="pretrained tag or checkpoint path")
    serve.add_argument("--profiles-dir")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    serve.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"])
    serve.add_argument("--redis-url")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_cmd_serve)

    profile = sub.add_parser("profile", help="build, inspect or import ReAlign profiles")
    psub = profile.add_subparsers(dest="profile_command", required=True)

    build = psub.add_parser("build", help="compute a profile from unpaired texts and images")
    build.add_argument("--out", required=True, help="output .safetensors path")
    build.add_argument("--name", help="profile name (default: the output file's stem)")
    timg = build.add_mutually_exclusive_group()
    timg.add_argument("--image-embeddings", help=".npy (n, d) or a directory of .pkl chunks")
    timg.add_argument("--images", help="a directory of images (encoded with --model)")
    ttxt = build.add_mutually_exclusive_group()
    ttxt.add_argument("--text-embeddings", help=".npy (n, d) or a directory of .pkl chunks")
    ttxt.add_argument("--texts", help="a text file, one text per line, or JSONL with 'text'")
    _model_args(build)
    build.add_argument("--model-id", help="encoder id to record (default: the model's fingerprint)")
    build.add_argument("--chunk-rows", type=int, default=65536)
    build.set_defaults(func=_cmd_profile_build)

    inspect = psub.add_parser("inspect", help="print a profile's statistics and metadata")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=_cmd_profile_inspect)

    imp = psub.add_parser("import", help="convert the authors' trace_stats.pkl to a profile")
    imp.add_argument("stats", help="the statistics pickle")
    imp.add_argument("--out", required=True)
    imp.add_argument("--name")
    imp.add_argument("--model-id", default="unknown", help="the encoder the stats belong to")
    imp.set_defaults(func=_cmd_profile_import)

    apply = sub.add_parser("apply", help="align embeddings offline (same maths as the service)")
    apply.add_argument("--profile", help="profile .safetensors (not needed for --alignment none)")
    apply.add_argument("--embeddings", help=".npy (n, d) or a directory of .pkl chunks")
    apply.add_argument("--texts", help="a text file to encode with --model first")
    apply.add_argument("--out", required=True, help="output .npy (float32)")
    apply.add_argument("--alignment", choices=["realign", "anchor", "none"], default="realign")
    apply.add_argument("--device", default="cpu")
    apply.add_argument("--chunk-rows", type=int, default=65536)
    _model_args(apply)
    apply.set_defaults(func=_cmd_apply)

    ev = sub.add_parser("eval", help="modality-gap metrics and plots for each alignment")
    ev.add_argument("--image-embeddings", required=True)
    ev.add_argument("--text-embeddings", required=True)
    ev.add_argument("--profile", help="profile to apply (default: built from these inputs)")
    ev.add_argument("--paired", action="store_true", help="row i of each input is a pair")
    ev.add_argument("--out-dir", required=True)
    ev.add_argument("--sample", type=int, default=5000, help="rows for quadratic metrics")
    ev.add_argument("--seed", type=int, default=0)
    ev.set_defaults(func=_cmd_eval)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="architecture name or local-dir:PATH (default: REALIGN_MODEL)")
    p.add_argument("--pretrained", help="pretrained tag or checkpoint path")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except RealignError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
