"""Steps 2-4 chained: one image and its fixations -> heatmap, refined map and per-level pseudo-masks.

:class:`PseudoMaskConfig` holds every parameter of the chain; its :meth:`~PseudoMaskConfig.digest`
identifies outputs made with the same parameters (the CLI resumes on it).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import numpy as np

from ..errors import InvalidInputError
from .heatmap import DEFAULT_CANVAS, KVASIR_SIGMA, NCI_ISBI_SIGMA, check_sigma, gaze_heatmap
from .levels import KVASIR_THRESHOLDS, PROSTATE_THRESHOLDS, pseudo_mask_levels
from .refine import CRF_DEFAULTS, crf_refine

__all__ = ["PseudoMaskConfig", "PseudoMasks", "PRESETS", "make_pseudo_masks", "MIN_MAX_SIDE"]

#: The smallest CRF working resolution accepted (its kernel is sxy / scale pixels wide).
MIN_MAX_SIDE = 16


def _positive(value) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def _numbers(name: str, values) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be numbers, got {values!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise InvalidInputError(f"{name} must be finite numbers, got {values!r}")
    return out


@dataclass(frozen=True)
class PseudoMaskConfig:
    """Parameters of the gaze -> pseudo-mask chain (GazeSup's Kvasir-SEG recipe by default).

    Args:
        sigma: heatmap Gaussian sigma in canvas pixels (Kvasir 70, NCI-ISBI 50).
        canvas: heatmap canvas (height, width).
        weight: ``"duration"`` or ``"count"`` per fixation.
        heatmap_mode: ``"fast"`` or ``"reference"`` (see :func:`~gazemonai.gaze.heatmap.gaze_heatmap`).
        refine: run the dense CRF; ``False`` thresholds the heatmap itself.
        sxy: CRF bilateral spatial sigma (full-resolution pixels).
        srgb: CRF bilateral colour sigma.
        compat: CRF Potts weight.
        iterations: CRF mean-field iterations.
        max_side: CRF working resolution (longer side); ``None`` = full resolution.
        thresholds: one threshold per pseudo-mask level.
    """

    sigma: float = KVASIR_SIGMA
    canvas: tuple[int, int] = DEFAULT_CANVAS
    weight: str = "duration"
    heatmap_mode: str = "fast"
    refine: bool = True
    sxy: float = CRF_DEFAULTS["sxy"]
    srgb: float = CRF_DEFAULTS["srgb"]
    compat: float = CRF_DEFAULTS["compat"]
    iterations: int = CRF_DEFAULTS["iterations"]
    max_side: int | None = 160
    thresholds: tuple[float, ...] = field(default=KVASIR_THRESHOLDS)

    def __post_init__(self):
        """Check every parameter, so that a bad one stops a run before any image is processed."""
        canvas, thresholds = _numbers("canvas", self.canvas), _numbers("thresholds", self.thresholds)
        if len(canvas) != 2 or not all(c == int(c) and c >= 1 for c in canvas):
            raise InvalidInputError(f"canvas must be two integers >= 1 (height, width), got {self.canvas!r}")
        if not thresholds or not all(0.0 < t <= 1.0 for t in thresholds):
            raise InvalidInputError(
                f"thresholds must be one or more numbers in (0, 1], got {list(self.thresholds)}"
            )
        object.__setattr__(self, "canvas", tuple(int(c) for c in canvas))
        object.__setattr__(self, "thresholds", thresholds)
        for name in ("sigma", "sxy", "srgb"):
            if not _positive(getattr(self, name)):
                raise InvalidInputError(f"{name} must be a number > 0, got {getattr(self, name)!r}")
        check_sigma("sigma", self.sigma, self.canvas)
        if not _positive(self.compat) and self.compat != 0:
            raise InvalidInputError(f"compat must be a number >= 0, got {self.compat!r}")
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) or self.iterations < 1:
            raise InvalidInputError(f"iterations must be an integer >= 1, got {self.iterations!r}")
        if self.max_side is not None and (
            not isinstance(self.max_side, int)
            or isinstance(self.max_side, bool)
            or self.max_side < MIN_MAX_SIDE
        ):
            raise InvalidInputError(
                f"max_side must be an integer >= {MIN_MAX_SIDE} (the CRF's working resolution, longer side), "
                f"got {self.max_side!r}"
            )
        if self.weight not in ("duration", "count"):
            raise InvalidInputError(f"weight must be 'duration' or 'count', got {self.weight!r}")
        if self.heatmap_mode not in ("fast", "reference"):
            raise InvalidInputError(f"heatmap_mode must be 'fast' or 'reference', got {self.heatmap_mode!r}")
        if not isinstance(self.refine, bool):
            raise InvalidInputError(f"refine must be true or false, got {self.refine!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["canvas"] = list(self.canvas)
        d["thresholds"] = list(self.thresholds)
        return d

    def digest(self) -> str:
        """Short hash of the parameters: equal digests mean interchangeable outputs."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes) -> PseudoMaskConfig:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


#: Named parameter sets: the paper's Kvasir-SEG and NCI-ISBI prostate recipes.
PRESETS = {
    "kvasir": PseudoMaskConfig(),
    "prostate": PseudoMaskConfig(sigma=NCI_ISBI_SIGMA, thresholds=PROSTATE_THRESHOLDS),
}
PRESETS["nci-isbi"] = PRESETS["prostate"]


class PseudoMasks(NamedTuple):
    heatmap: np.ndarray  #: (H, W) float32 in [0, 1]
    refined: np.ndarray  #: (H, W) float32 in [0, 1]
    levels: np.ndarray  #: (N, H, W) uint8 0/1


def make_pseudo_masks(image: np.ndarray, fixations: np.ndarray, config: PseudoMaskConfig = PRESETS["kvasir"]):
    """Heatmap, CRF-refined map and pseudo-masks of one image.

    Args:
        image: (H, W[, C]) image, RGB or a single-channel slice.
        fixations: (N, 3) array of normalised (x, y) and duration.
        config: the chain's parameters.
    """
    size = np.asarray(image).shape[:2]
    heat = gaze_heatmap(
        fixations,
        size,
        sigma=config.sigma,
        canvas=config.canvas,
        weight=config.weight,
        mode=config.heatmap_mode,
    )
    if config.refine:
        refined = crf_refine(
            image,
            heat,
            sxy=config.sxy,
            srgb=config.srgb,
            compat=config.compat,
            iterations=config.iterations,
            max_side=config.max_side,
        )
    else:
        refined = heat
    return PseudoMasks(heat, refined, pseudo_mask_levels(refined, config.thresholds))
