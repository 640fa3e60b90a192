"""A literal implementation of the GazeSup pseudo-mask recipe, kept to validate and benchmark ours.

It does exactly what the recipe says, the slow way: a float32 768x768 canvas with each fixation's
duration added at ``(round(y*768)-1, round(x*768)-1)``, ``scipy.ndimage.gaussian_filter``, min-max
normalisation, OpenCV's bicubic resize (torch's equivalent when OpenCV is absent), and the dense CRF
at full resolution. Not used by the pipeline itself.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .levels import KVASIR_THRESHOLDS, pseudo_mask_levels
from .refine import CRF_DEFAULTS, crf_refine

__all__ = ["reference_heatmap", "reference_pseudo_masks"]


def reference_heatmap(fixations: np.ndarray, size: tuple[int, int], sigma: float = 70.0, canvas: int = 768):
    canvas_map = np.zeros((canvas, canvas), dtype=np.float32)
    for x, y, d in np.asarray(fixations, dtype=np.float64):
        r = max(round(y * canvas) - 1, 0)  # the recipe wraps -1 to the far edge; we clip (see heatmap.py)
        c = max(round(x * canvas) - 1, 0)
        canvas_map[r, c] += d
    canvas_map = ndimage.gaussian_filter(canvas_map, sigma)
    canvas_map = (canvas_map - canvas_map.min()) / (canvas_map.max() - canvas_map.min())
    h, w = int(size[0]), int(size[1])
    try:
        import cv2

        return cv2.resize(canvas_map, dsize=(w, h), interpolation=cv2.INTER_CUBIC)
    except ImportError:
        from .heatmap import _bicubic_resize

        return _bicubic_resize(canvas_map, (h, w))


def reference_pseudo_masks(image, fixations, sigma: float = 70.0, thresholds=KVASIR_THRESHOLDS):
    """(heatmap, refined, levels) by the literal recipe, CRF at full resolution."""
    heat = reference_heatmap(fixations, np.asarray(image).shape[:2], sigma)
    refined = crf_refine(image, heat, max_side=None, **CRF_DEFAULTS)
    return heat, refined, pseudo_mask_levels(refined, thresholds)
