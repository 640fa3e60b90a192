"""Step 2 of the data flow: fixations -> duration-weighted Gaussian heatmap.

The GazeSup recipe (Zhong et al., "Weakly-supervised medical image segmentation with gaze
annotations", MICCAI 2024) draws each fixation's duration at pixel
``(round(y * 768) - 1, round(x * 768) - 1)`` of a 768x768 canvas, blurs the canvas with a Gaussian
of standard deviation ``sigma`` (70 for Kvasir-SEG, 50 for NCI-ISBI; ``scipy.ndimage`` defaults:
reflecting border, kernel truncated at 4 sigma), min-max normalises it and resizes it to the image
with bicubic interpolation.

A sum of blurred impulses is separable: the blurred canvas is ``Gy^T diag(d) Gx`` where the columns
of ``Gy``/``Gx`` are the (reflected, truncated) 1-D Gaussian profiles of each fixation. Both modes use
this, so neither convolves a 768x768 image with a 561-tap kernel:

* ``mode="reference"`` builds the exact blurred canvas this way, then bicubically resizes it like the
  recipe (matches a literal implementation to < 1e-3 on the [0, 1] map);
* ``mode="fast"`` (default) evaluates the same profiles directly at the output pixels' positions on
  the canvas, which skips the canvas and the resize (the map is so smooth that the two agree to
  ~1e-3).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidInputError

__all__ = [
    "gaze_heatmap",
    "fixation_canvas_indices",
    "check_sigma",
    "KVASIR_SIGMA",
    "NCI_ISBI_SIGMA",
    "DEFAULT_CANVAS",
    "MAX_SIGMA_PER_SIDE",
]

KVASIR_SIGMA = 70.0
NCI_ISBI_SIGMA = 50.0
DEFAULT_CANVAS = (768, 768)
_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default
#: the largest sigma, in multiples of the canvas's longer side: across the canvas a wider Gaussian
#: changes by under 0.5 %, and the cost of its reflected images grows with sigma (1e12 ran for hours)
MAX_SIGMA_PER_SIDE = 10


def check_sigma(name: str, sigma, canvas=DEFAULT_CANVAS) -> float:
    """``sigma`` (setting ``name``) as a float in (0, MAX_SIGMA_PER_SIDE x the canvas's longer side]."""
    bound = MAX_SIGMA_PER_SIDE * max(int(c) for c in canvas)
    ok = isinstance(sigma, (int, float, np.number)) and not isinstance(sigma, bool) and np.isfinite(sigma)
    if not ok or sigma <= 0:
        raise InvalidInputError(f"{name} must be a number > 0, got {sigma!r}")
    if sigma > bound:
        raise InvalidInputError(
            f"{name} must be <= {bound} ({MAX_SIGMA_PER_SIDE} x the canvas's longer side, "
            f"{max(canvas)} pixels: a wider Gaussian is flat on it), got {sigma!r}"
        )
    return float(sigma)


def fixation_canvas_indices(xy: np.ndarray, canvas: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Canvas pixel (row, col) of each normalised (x, y) fixation, as the recipe places them.

    ``round(v * size) - 1`` with Python's round-half-to-even, clipped to the canvas (the recipe would
    wrap a fixation at exactly 0 to the far edge through numpy's negative indexing; we clip instead).
    """
    xy = np.asarray(xy, dtype=np.float64)
    ch, cw = canvas
    rows = np.rint(xy[:, 1] * ch).astype(np.int64) - 1  # np.rint rounds half to even, like round()
    cols = np.rint(xy[:, 0] * cw).astype(np.int64) - 1
    return np.clip(rows, 0, ch - 1), np.clip(cols, 0, cw - 1)


def _profiles(centres: np.ndarray, positions: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """(len(positions), len(centres)) matrix of reflected, truncated Gaussian profiles.

    ``positions`` are (possibly fractional) canvas coordinates at which each impulse's blurred profile
    is evaluated; ``centres`` are the impulses' integer canvas coordinates on an axis of ``size``
    pixels. Reflection follows scipy's ``mode="reflect"`` (``d c b a | a b c d | d c b a``).
    """
    radius = int(_TRUNCATE * sigma + 0.5)
    c = centres.astype(np.float64)[None, :]
    p = positions.astype(np.float64)[:, None]
    out = np.zeros((positions.shape[0], centres.shape[0]), dtype=np.float64)
    # the impulse itself and its mirror images about both borders; more images are needed only when
    # the kernel is wider than the canvas
    n_images = 1 + 2 * (radius // max(size, 1) + 1)
    for k in range(-(n_images // 2), n_images // 2 + 1):
        # the k-th image of c under half-sample reflection: c + 2k*size or (2k*size - 1 - c)
        for image in (c + 2 * k * size, 2 * k * size - 1 - c):
            d = p - image
            w = np.exp(-0.5 * (d / sigma) ** 2)
            w[np.abs(d) > radius] = 0.0
            out += w
    return out


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if not hi > lo:
        raise InvalidInputError(
            "the heatmap is constant (no fixation landed on the canvas); cannot normalise it"
        )
    return (a - lo) / (hi - lo)


def _bicubic_resize(canvas: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic (a = -0.75, half-pixel centres, replicated border) resize, as OpenCV's INTER_CUBIC."""
    if tuple(canvas.shape) == tuple(size):
        return canvas.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(canvas, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(t, size=tuple(size), mode="bicubic", align_corners=False)
    return out[0, 0].numpy()


def gaze_heatmap(
    fixations: np.ndarray,
    size: tuple[int, int],
    sigma: float = KVASIR_SIGMA,
    canvas: tuple[int, int] = DEFAULT_CANVAS,
    weight: str = "duration",
    mode: str = "fast",
) -> np.ndarray:
    """Duration-weighted Gaussian heatmap of one image's fixations, min-max normalised to [0, 1].

    Args:
        fixations: (N, 3) array of (x, y, duration), x/y normalised to [0, 1] with origin top-left;
            (N, 2) is accepted when ``weight="count"``.
        size: output (height, width), normally the image's.
        sigma: Gaussian standard deviation in canvas pixels (70 for Kvasir-SEG, 50 for NCI-ISBI).
        canvas: (height, width) of the canvas the fixations are drawn on (the recipe's 768x768).
        weight: ``"duration"`` (each fixation adds its duration) or ``"count"`` (each adds 1).
        mode: ``"fast"`` evaluates the blurred canvas at the output pixels directly;
            ``"reference"`` builds the 768x768 canvas exactly and resizes it bicubically.

    Returns:
        float32 array of shape ``size`` in [0, 1].

    Raises:
        ValueError: no fixations, bad shapes, unknown mode/weight, or a non-positive duration.
    """
    fixations = np.asarray(fixations, dtype=np.float64)
    if fixations.ndim != 2 or fixations.shape[1] not in (2, 3):
        raise InvalidInputError(
            f"fixations must be an (N, 3) array of (x, y, duration), got shape {fixations.shape}"
        )
    if fixations.shape[0] == 0:
        raise InvalidInputError("no fixations: a heatmap needs at least one")
    if weight == "duration":
        if fixations.shape[1] != 3:
            raise InvalidInputError("weight='duration' needs (N, 3) fixations with durations")
        w = fixations[:, 2]
        if np.any(~np.isfinite(w)) or np.any(w <= 0):
            raise InvalidInputError("fixation durations must be positive and finite")
    elif weight == "count":
        w = np.ones(fixations.shape[0])
    else:
        raise InvalidInputError(f"weight must be 'duration' or 'count', got {weight!r}")
    if not np.all(np.isfinite(fixations[:, :2])) or fixations[:, :2].min() < 0 or fixations[:, :2].max() > 1:
        raise InvalidInputError("fixation coordinates must be finite and within [0, 1]")
    h, w_out = int(size[0]), int(size[1])
    if h <= 0 or w_out <= 0:
        raise InvalidInputError(f"size must be positive, got {size}")
    ch, cw = int(canvas[0]), int(canvas[1])
    sigma = check_sigma("sigma", sigma, (ch, cw))
    rows, cols = fixation_canvas_indices(fixations[:, :2], (ch, cw))

    if mode == "reference":
        gy = _profiles(rows, np.arange(ch), ch, sigma)
        gx = _profiles(cols, np.arange(cw), cw, sigma)
        blurred = (gy * w[None, :]) @ gx.T
        return _bicubic_resize(_minmax(blurred), (h, w_out)).astype(np.float32)
    if mode == "fast":
        # canvas coordinate of each output pixel centre (the mapping a half-pixel resize uses)
        ys = (np.arange(h) + 0.5) * (ch / h) - 0.5
        xs = (np.arange(w_out) + 0.5) * (cw / w_out) - 0.5
        gy = _profiles(rows, ys, ch, sigma)
        gx = _profiles(cols, xs, cw, sigma)
        return _minmax((gy * w[None, :]) @ gx.T).astype(np.float32)
    raise InvalidInputError(f"mode must be 'fast' or 'reference', got {mode!r}")
