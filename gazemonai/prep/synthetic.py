"""Small synthetic polyp-like datasets, for the demo and the tests (no real data needed).

Each image is a smooth, shaded pinkish mucosa texture with one or two brighter, redder elliptical
"polyps" whose boundary is soft; the masks are the ellipses. Layout written (Kvasir-SEG's)::

    ROOT/images/<id>.png   RGB
    ROOT/masks/<id>.png    0/255
    ROOT/train.txt, ROOT/test.txt
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["synthetic_polyp", "make_synthetic_dataset"]


def synthetic_polyp(size: tuple[int, int] = (192, 224), seed: int = 0, n_polyps: int | None = None):
    """One (image, mask) pair: (H, W, 3) uint8 RGB and (H, W) bool."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    texture = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=max(h, w) / 25)
    texture /= np.abs(texture).max() + 1e-9
    vignette = 1.0 - 0.5 * (((yy - h / 2) / h) ** 2 + ((xx - w / 2) / w) ** 2) * 2
    base = np.stack([0.75 + 0.08 * texture, 0.42 + 0.06 * texture, 0.40 + 0.05 * texture], axis=-1)
    img = base * vignette[..., None]
    mask = np.zeros((h, w), dtype=bool)
    n = n_polyps or (1 if rng.random() < 0.8 else 2)
    for _ in range(n):
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        ry, rx = rng.uniform(0.12, 0.25) * h, rng.uniform(0.12, 0.25) * w
        angle = rng.uniform(0, np.pi)
        ca, sa = np.cos(angle), np.sin(angle)
        u = ((yy - cy) * ca + (xx - cx) * sa) / ry
        v = (-(yy - cy) * sa + (xx - cx) * ca) / rx
        r = np.sqrt(u**2 + v**2)
        blob = r <= 1.0
        mask |= blob
        shade = np.clip(1.0 - r, 0, 1) ** 0.5
        polyp = np.stack([0.92 + 0.05 * shade, 0.55 + 0.15 * shade, 0.45 + 0.1 * shade], axis=-1)
        edge = np.clip((1.05 - r) / 0.1, 0, 1)[..., None]  # soft, slightly blurred boundary
        img = img * (1 - edge) + polyp * vignette[..., None] * edge
    img += rng.normal(0, 0.015, img.shape)
    return np.clip(img * 255, 0, 255).astype(np.uint8), mask


def make_synthetic_dataset(
    root: str | os.PathLike,
    n_images: int = 12,
    size: tuple[int, int] = (192, 224),
    seed: int = 0,
    n_test: int = 2,
) -> Path:
    """Write ``n_images`` synthetic pairs in the Kvasir-SEG layout; the last ``n_test`` form test.txt."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    ids = [f"synth_{i:03d}" for i in range(n_images)]
    for i, name in enumerate(ids):
        img, mask = synthetic_polyp(size, seed=seed * 100003 + i)
        Image.fromarray(img).save(root / "images" / f"{name}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{name}.png")
    n_test = min(n_test, max(0, n_images - 1))
    (root / "train.txt").write_text("\n".join(ids[: n_images - n_test]) + "\n")
    (root / "test.txt").write_text("\n".join(ids[n_images - n_test :]) + ("\n" if n_test else ""))
    return root
