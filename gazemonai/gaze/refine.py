"""Step 3 of the data flow: heatmap + image -> refined probability map (fully connected CRF).

The heatmap says *where* the clinician looked; the image says where the object's edges are. A
two-label fully connected CRF (Krähenbühl & Koltun, "Efficient inference in fully connected CRFs
with Gaussian edge potentials", NeurIPS 2011) with the unary ``-log [1 - p, p]`` and one bilateral
(appearance) kernel snaps the heatmap to those edges. GazeSup's recipe: ``sxy = 80``, ``srgb = 13``,
``compat = 1``, 10 mean-field iterations, output = the marginal of label 1. For MR slices the slice is
min-max scaled to 0-255 and replicated to three channels first.

The CRF's cost grows with the number of pixels, while its spatial kernel (80 px) is far wider than a
pixel. ``max_side`` runs it on a copy of the image whose longer side is at most that many pixels,
with ``sxy`` scaled by the same factor, and resizes the marginal back to full size; ``max_side=None``
runs it at full resolution as the recipe does.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidInputError

__all__ = ["crf_refine", "to_rgb_uint8", "CRF_DEFAULTS"]

#: The GazeSup recipe's parameters.
CRF_DEFAULTS = {"sxy": 80.0, "srgb": 13.0, "compat": 1.0, "iterations": 10}
_EPS = 1e-5  # probability floor of the unary, as pydensecrf.utils.unary_from_softmax


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 C-contiguous RGB image for the CRF's appearance kernel.

    Args:
        image: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array.

            * one channel (an MR slice): min-max scaled to 0-255 and replicated to RGB, as the recipe;
            * three channels: uint8 is used as is; other dtypes are taken as 0-255 intensities when
              they lie in [0, 255] (an RGB photo loaded as float, e.g. by MONAI's ``LoadImage``),
              scaled by 255 when they lie in [0, 1], and min-max scaled otherwise;
            * an alpha channel is dropped.
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise InvalidInputError(
            f"image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {a.shape}"
        )
    if a.ndim == 2 or a.dtype != np.uint8:
        a = a.astype(np.float64)
        if not np.all(np.isfinite(a)):
            raise InvalidInputError("image contains NaN or infinite values")
        lo, hi = a.min(), a.max()
        if a.ndim == 3 and lo >= 0.0 and hi <= 1.0:
            a = a * 255.0
        elif a.ndim == 2 or lo < 0.0 or hi > 255.0:
            a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if not (a.flags.c_contiguous and a.flags.writeable):  # pydensecrf takes a writable C buffer
        a = np.array(a, order="C", copy=True)
    return a


def _resize(a: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    t = t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]
    out = torch.nn.functional.interpolate(t, size=tuple(size), mode=mode, align_corners=False)[0]
    return out.permute(1, 2, 0).numpy() if a.ndim == 3 else out[0].numpy()


def crf_refine(
    image: np.ndarray,
    prob: np.ndarray,
    sxy: float = CRF_DEFAULTS["sxy"],
    srgb: float = CRF_DEFAULTS["srgb"],
    compat: float = CRF_DEFAULTS["compat"],
    iterations: int = CRF_DEFAULTS["iterations"],
    max_side: int | None = 160,
) -> np.ndarray:
    """Refine a foreground probability map with a two-label dense CRF on the image.

    Args:
        image: (H, W[, C]) image; see :func:`to_rgb_uint8` for accepted forms (MR slices included).
        prob: (H, W) foreground probabilities in [0, 1] (the normalised gaze heatmap).
        sxy: spatial standard deviation of the bilateral kernel, in full-resolution pixels.
        srgb: colour standard deviation of the bilateral kernel, in 0-255 intensity units.
        compat: Potts compatibility weight of the bilateral kernel.
        iterations: mean-field iterations.
        max_side: run the CRF on a copy whose longer side is at most this many pixels (``sxy`` scaled
            accordingly) and resize the result back; ``None`` runs at full resolution.

    Returns:
        float32 (H, W) map: the CRF marginal probability of the foreground label.
    """
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ImportError("crf_refine needs pydensecrf2 (pip install pydensecrf2)") from e

    rgb = to_rgb_uint8(image)
    p = np.asarray(prob, dtype=np.float32)
    if p.ndim == 3 and p.shape[0] == 1:
        p = p[0]
    if p.shape != rgb.shape[:2]:
        raise InvalidInputError(f"probability map shape {p.shape} differs from the image's {rgb.shape[:2]}")
    if not np.all(np.isfinite(p)):
        raise InvalidInputError("probability map contains NaN or infinite values")
    if iterations < 1:
        raise InvalidInputError(f"iterations must be >= 1, got {iterations}")
    h, w = p.shape
    scale = 1.0
    if max_side is not None and max(h, w) > max_side:
        scale = max_side / max(h, w)
        small = (max(1, round(h * scale)), max(1, round(w * scale)))
        rgb = np.ascontiguousarray(np.clip(np.rint(_resize(rgb, small, "bilinear")), 0, 255).astype(np.uint8))
        p = _resize(p, small, "bilinear")
    sh, sw = p.shape
    p = np.clip(p, 0.0, 1.0)
    unary = -np.log(np.clip(np.stack([1.0 - p, p]).reshape(2, -1), _EPS, None)).astype(np.float32)
    crf = dcrf.DenseCRF2D(sw, sh, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseBilateral(sxy=sxy * scale, srgb=srgb, rgbim=rgb, compat=compat)
    q = np.asarray(crf.inference(int(iterations)), dtype=np.float32)[1].reshape(sh, sw)
    if (sh, sw) != (h, w):
        q = np.clip(_resize(q, (h, w), "bilinear"), 0.0, 1.0)
    return q.astype(np.float32)
