"""The examples run end to end (quick mode) and produce what their docs promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo"

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (DEMO / "open_clip_config.json").exists(), reason="no models/demo yet")
def test_text_only_training_quick(tmp_path: Path) -> None:
    results, report = tmp_path / "results", tmp_path / "results.md"
    proc = subprocess.run(
        [
            sys.executable,
            "examples/text_only_training.py",
            "--quick",
            "--results",
            str(results),
            "--report",
            str(report),
        ],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Classification accuracy on real images" in proc.stdout
    assert "Caption decoder on real images" in proc.stdout

    tables = json.loads((results / "tables.json").read_text())
    rows = {"none", "anchor", "realign", "images (paired)"}
    assert set(tables["classification"]) == rows and set(tables["decoder"]) == rows
    for row in tables["classification"].values():
        assert all(0.0 <= v <= 1.0 for v in row.values())
    gap = tables["gap"]
    # 400 held-out pairs: the centroid gap of two equal clouds is ~0.02 by sampling alone
    assert gap["realign"]["centroid_gap"] < min(0.1, gap["none"]["centroid_gap"] / 10)
    assert gap["realign"]["paired_cosine_mean"] > gap["none"]["paired_cosine_mean"] + 0.1

    text = report.read_text()
    for section in ("## Classification accuracy", "## Caption decoder", "## Modality gap"):
        assert section in text
    for png in ("pca.png", "paired_cosine.png", "spectra.png", "transfer.png"):
        assert (results / png).stat().st_size > 1000
        assert f"({png})" in text or f"/{png})" in text
