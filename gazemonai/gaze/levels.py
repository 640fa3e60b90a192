"""Step 4 of the data flow: refined probability map -> hierarchical pseudo-masks, one per level.

GazeSup (Zhong et al., MICCAI 2024) thresholds the CRF-refined gaze map at several levels; each
level supervises its own network. Level ``i`` is ``refined >= thresholds[i]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InvalidInputError

__all__ = ["pseudo_mask_levels", "LEVEL_THRESHOLDS", "KVASIR_THRESHOLDS", "PROSTATE_THRESHOLDS"]

KVASIR_THRESHOLDS = (0.5, 0.3)
PROSTATE_THRESHOLDS = (0.2, 0.4)
#: The paper's Kvasir-SEG thresholds for 2 to 5 levels.
LEVEL_THRESHOLDS = {
    2: (0.5, 0.3),
    3: (0.5, 0.3, 0.4),
    4: (0.5, 0.3, 0.367, 0.433),
    5: (0.5, 0.3, 0.35, 0.4, 0.45),
}


def pseudo_mask_levels(prob: np.ndarray, thresholds: Sequence[float] = KVASIR_THRESHOLDS) -> np.ndarray:
    """Binary pseudo-masks of a probability map, one per threshold.

    Args:
        prob: (H, W) map in [0, 1] (or (1, H, W)).
        thresholds: one threshold per level, each in (0, 1].

    Returns:
        (N, H, W) uint8 array of 0/1, level ``i`` = ``prob >= thresholds[i]``.
    """
    p = np.asarray(prob)
    if p.ndim == 3 and p.shape[0] == 1:
        p = p[0]
    if p.ndim != 2:
        raise InvalidInputError(f"prob must be (H, W), got shape {p.shape}")
    ts = [float(t) for t in thresholds]
    if not ts:
        raise InvalidInputError("at least one threshold is needed")
    for t in ts:
        if not 0.0 < t <= 1.0:
            raise InvalidInputError(f"thresholds must be in (0, 1], got {t}")
    return np.stack([(p >= t) for t in ts]).astype(np.uint8)
