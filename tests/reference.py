"""An independent, plain float64 NumPy implementation of the authors' ReAlign procedure.

Written from the method description (four passes: means, traces and scale, mu_hat, apply),
deliberately naive: whole arrays, no streaming, no torch. Tests compare ``app`` against it.
"""

from __future__ import annotations

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def four_pass(texts: np.ndarray, images: np.ndarray) -> dict[str, np.ndarray | float]:
    e = unit(texts)
    x = unit(images)
    mu_txt = e.mean(axis=0)  # pass 1
    mu_img = x.mean(axis=0)
    trace_txt = float(np.mean(np.sum((e - mu_txt) ** 2, axis=1)))  # pass 2
    trace_img = float(np.mean(np.sum((x - mu_img) ** 2, axis=1)))
    scale = float(np.sqrt(trace_img / (trace_txt + 1e-10)))
    y = mu_img + scale * (e - mu_txt)  # pass 3
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    mu_hat = y.mean(axis=0)
    return {
        "mu_txt": mu_txt,
        "mu_img": mu_img,
        "mu_hat": mu_hat,
        "scale": scale,
        "trace_txt": trace_txt,
        "trace_img": trace_img,
    }


def apply(stats: dict, texts: np.ndarray, alignment: str = "realign") -> np.ndarray:
    """Pass 4."""
    e = unit(texts)
    if alignment == "none":
        return e
    if alignment == "anchor":
        return unit(e - stats["mu_txt"] + stats["mu_img"])
    y = unit(stats["mu_img"] + stats["scale"] * (e - stats["mu_txt"]))
    return unit(y - stats["mu_hat"] + stats["mu_img"])


def gapped_world(n_txt: int, n_img: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Anisotropic text and image clouds with a real offset and different spreads."""
    rng = np.random.default_rng(seed)
    spectrum = 1.0 / np.arange(1, dim + 1) ** 0.7
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    shared = basis * np.sqrt(spectrum)
    c_txt = rng.normal(size=dim)
    c_img = rng.normal(size=dim)
    texts = 1.2 * c_txt / np.linalg.norm(c_txt) + 0.6 * rng.normal(size=(n_txt, dim)) @ shared.T
    images = 1.2 * c_img / np.linalg.norm(c_img) + 0.35 * rng.normal(size=(n_img, dim)) @ shared.T
    return texts, images
