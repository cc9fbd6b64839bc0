from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from app.profiles import Profile
from tests.reference import apply, four_pass, gapped_world


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    texts, images = gapped_world(5000, 4000, 48, seed=11)
    # inputs need not be normalised, and may be float16/float64
    np.save(d / "texts.npy", (texts * 3.0).astype(np.float32))
    np.save(d / "images.npy", images.astype(np.float64))
    return {"dir": d, "texts": d / "texts.npy", "images": d / "images.npy"}


def _build(files: dict[str, Path], name: str = "p") -> Path:
    out = files["dir"] / f"{name}.safetensors"
    rc = main(
        [
            "profile",
            "build",
            "--out",
            str(out),
            "--chunk-rows",
            "999",
            "--text-embeddings",
            str(files["texts"]),
            "--image-embeddings",
            str(files["images"]),
            "--model-id",
            "toy:v1",
        ]
    )
    assert rc == 0
    return out


def test_build_inspect_apply_roundtrip(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = _build(files)
    capsys.readouterr()
    assert main(["profile", "inspect", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["name"] == "p" and summary["model"] == "toy:v1" and summary["n_txt"] == 5000

    texts = np.load(files["texts"])
    ref = four_pass(texts, np.load(files["images"]))
    for alignment in ("realign", "anchor", "none"):
        out = files["dir"] / f"aligned-{alignment}.npy"
        rc = main(
            [
                "apply",
                "--profile",
                str(path),
                "--embeddings",
                str(files["texts"]),
                "--out",
                str(out),
                "--alignment",
                alignment,
                "--chunk-rows",
                "777",
            ]
        )
        assert rc == 0
        got = np.load(out)
        assert got.dtype == np.float32 and got.shape == texts.shape
        assert np.max(np.abs(got - apply(ref, texts, alignment))) <= 1e-6


def test_authors_pkl_chunks_for_build_and_apply(files: dict[str, Path]) -> None:
    texts = np.load(files["texts"])
    chunk_dir = files["dir"] / "chunks"
    chunk_dir.mkdir()
    for k, start in enumerate(range(0, 5000, 1300)):
        records = [
            {"id": f"cap-{i}", "embed": texts[i]} for i in range(start, min(start + 1300, 5000))
        ]
        (chunk_dir / f"part{k:03d}.pkl").write_bytes(pickle.dumps(records))
    out = files["dir"] / "from_pkl.safetensors"
    rc = main(
        [
            "profile",
            "build",
            "--out",
            str(out),
            "--text-embeddings",
            str(chunk_dir),
            "--image-embeddings",
            str(files["images"]),
        ]
    )
    assert rc == 0
    from_npy = Profile.load(_build(files, "same"))
    from_pkl = Profile.load(out)
    np.testing.assert_allclose(from_pkl.mu_hat, from_npy.mu_hat, atol=1e-12)

    aligned = files["dir"] / "pkl_aligned.npy"
    assert (
        main(
            ["apply", "--profile", str(out), "--embeddings", str(chunk_dir), "--out", str(aligned)]
        )
        == 0
    )
    ids = json.loads(aligned.with_suffix(".ids.json").read_text())
    assert ids == [f"cap-{i}" for i in range(5000)]
    expected = (
        np.load(files["dir"] / "aligned-realign.npy")
        if (files["dir"] / "aligned-realign.npy").exists()
        else None
    )
    got = np.load(aligned)
    assert got.shape == (5000, 48)
    if expected is not None:
        assert np.max(np.abs(got - expected)) <= 1e-6


def test_import_then_apply_equals_reference(files: dict[str, Path]) -> None:
    texts = np.load(files["texts"])
    ref = four_pass(texts, np.load(files["images"]))
    pkl = files["dir"] / "trace_stats.pkl"
    pkl.write_bytes(
        pickle.dumps(
            {k: (np.asarray(v) if not isinstance(v, float) else v) for k, v in ref.items()}
        )
    )
    prof = files["dir"] / "imported.safetensors"
    assert main(["profile", "import", str(pkl), "--out", str(prof)]) == 0
    out = files["dir"] / "imported.npy"
    assert (
        main(
            [
                "apply",
                "--profile",
                str(prof),
                "--embeddings",
                str(files["texts"]),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert np.max(np.abs(np.load(out) - apply(ref, texts))) <= 1e-6


def _bad_inputs(d: Path, files: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    nan = np.load(files["texts"]).copy()
    nan[17, 3] = np.nan
    np.save(d / "nan.npy", nan)
    np.save(d / "dim.npy", np.ones((10, 12), np.float32))
    np.save(d / "oned.npy", np.ones(48, np.float32))
    np.save(d / "empty.npy", np.ones((0, 48), np.float32))
    (d / "empty_file.npy").write_bytes(b"")
    (d / "evil.pkl").write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")
    prof = _build(files, "good")
    from tests.test_profiles import _write

    _write(d / "v99.safetensors", Profile.load(prof), format_version="99")
    emb = ["--image-embeddings", str(files["images"])]
    return {
        "nan": (
            [
                "profile",
                "build",
                "--out",
                str(d / "x.safetensors"),
                "--text-embeddings",
                str(d / "nan.npy"),
                *emb,
            ],
            "rows 17",
        ),
        "dim": (
            [
                "profile",
                "build",
                "--out",
                str(d / "x.safetensors"),
                "--text-embeddings",
                str(d / "dim.npy"),
                *emb,
            ],
            "dimensions differ",
        ),
        "oned": (
            [
                "apply",
                "--profile",
                str(prof),
                "--embeddings",
                str(d / "oned.npy"),
                "--out",
                str(d / "o.npy"),
            ],
            "2-D array",
        ),
        "empty": (
            [
                "apply",
                "--profile",
                str(prof),
                "--embeddings",
                str(d / "empty.npy"),
                "--out",
                str(d / "o.npy"),
            ],
            "is empty",
        ),
        "empty_file": (
            [
                "apply",
                "--profile",
                str(prof),
                "--embeddings",
                str(d / "empty_file.npy"),
                "--out",
                str(d / "o.npy"),
            ],
            "not a readable .npy",
        ),
        "apply_dim": (
            [
                "apply",
                "--profile",
                str(prof),
                "--embeddings",
                str(d / "dim.npy"),
                "--out",
                str(d / "o.npy"),
            ],
            "dimension 12",
        ),
        "version": (["profile", "inspect", str(d / "v99.safetensors")], "unknown format_version"),
        "pickle": (
            ["profile", "import", str(d / "evil.pkl"), "--out", str(d / "x.safetensors")],
            "refusing to unpickle global",
        ),
        "missing": (["profile", "inspect", str(d / "nope.safetensors")], "no such profile"),
        "apply_nan": (
            [
                "apply",
                "--profile",
                str(prof),
                "--embeddings",
                str(d / "nan.npy"),
                "--out",
                str(d / "o.npy"),
            ],
            "rows 17",
        ),
    }


def test_bad_inputs_exit_nonzero_with_one_clear_line(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    d = files["dir"] / "bad"
    d.mkdir()
    cases = _bad_inputs(d, files)
    for name, (argv, message) in cases.items():
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, name
        assert message in err, (name, err)
        assert "Traceback" not in err
        assert not (d / "o.npy").exists(), f"{name}: partial output left behind"


def test_cli_process_has_no_traceback(files: dict[str, Path]) -> None:
    """The console entry point, as a user runs it: exit status and stderr of a real process."""
    d = files["dir"] / "proc"
    d.mkdir()
    (d / "evil.pkl").write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "profile",
            "import",
            str(d / "evil.pkl"),
            "--out",
            str(d / "x.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "os.system" in proc.stderr or "posix.system" in proc.stderr


def test_build_from_images_and_texts_with_the_demo_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--images DIR and --texts FILE: both towers of the demo model, the profile bound to it."""
    from PIL import Image

    from app.config import DEFAULT_MODELS_DIR, Settings
    from app.encoder import fingerprint_for, load_encoder
    from examples.demo_world import caption, render_batch, sample_world

    demo = f"local-dir:{DEFAULT_MODELS_DIR / 'demo'}"
    images = render_batch(sample_world(24, seed=5))
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i, img in enumerate(images):
        arr = (img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(arr).save(img_dir / f"{i:03d}.png")
    rng = __import__("random").Random(1)
    texts = tmp_path / "captions.txt"
    texts.write_text("\n".join(caption(s, rng) for s in sample_world(30, seed=6)) + "\n\n")
    out = tmp_path / "demo_built.safetensors"
    rc = main(["profile", "build", "--out", str(out), "--images", str(img_dir), "--texts", str(texts), "--model", demo])
    assert rc == 0, capsys.readouterr().err
    prof = Profile.load(out)
    assert prof.model == fingerprint_for(Settings(model=demo)).model_id
    assert (prof.n_img, prof.n_txt, prof.dim) == (24, 30, 128)
    # the text side equals encoding the captions directly
    enc = load_encoder(Settings(model=demo))
    lines = [t for t in texts.read_text().splitlines() if t]
    np.testing.assert_allclose(prof.mu_txt, four_pass(enc.encode_texts(lines).numpy(), np.ones((2, 128)))["mu_txt"], atol=1e-6)

    aligned = tmp_path / "aligned.npy"
    assert main(["apply", "--profile", str(out), "--texts", str(texts), "--model", demo, "--out", str(aligned)]) == 0
    expected = apply(four_pass(enc.encode_texts(lines).numpy(), np.ones((2, 128))) | {
        k: getattr(prof, k) for k in ("mu_txt", "mu_img", "mu_hat", "scale")}, enc.encode_texts(lines).numpy())
    assert np.max(np.abs(np.load(aligned) - expected)) <= 1e-5
    wrong = tmp_path / "tiny_model"
    from tests.tiny_models import write_local_dir

    write_local_dir(wrong, seed=3)
    capsys.readouterr()
    assert main(["apply", "--profile", str(out), "--texts", str(texts), "--model", f"local-dir:{wrong}", "--out", str(aligned)]) == 2
    assert "was built for" in capsys.readouterr().err


def test_eval_writes_metrics_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``realign eval`` on paired data with a real gap: JSON, PNGs, and the gap closes."""
    rng = np.random.default_rng(4)
    images, _ = gapped_world(1500, 10, 32, seed=4)
    texts = images + 0.8 * rng.normal(size=images.shape) + 2.0 * rng.normal(size=32)  # paired + offset
    np.save(tmp_path / "i.npy", images.astype(np.float32))
    np.save(tmp_path / "t.npy", texts.astype(np.float32))
    out = tmp_path / "report"
    rc = main(["eval", "--image-embeddings", str(tmp_path / "i.npy"), "--text-embeddings", str(tmp_path / "t.npy"),
               "--paired", "--out-dir", str(out), "--sample", "500"])
    assert rc == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    assert "realign" in table and "anchor" in table
    result = json.loads((out / "metrics.json").read_text())
    assert result["realign"]["centroid_gap"] < 1e-2 < result["none"]["centroid_gap"]
    assert result["realign"]["paired_cosine_mean"] > result["none"]["paired_cosine_mean"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"pca.png", "paired_cosine.png", "spectra.png"} <= set(pngs)
    assert all((out / p).stat().st_size > 1000 for p in pngs)
