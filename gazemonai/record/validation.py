"""Record step 5: how well the gaze lands where the annotator looks (9-point validation).

After calibration the page shows 9 targets; the annotator looks at each while samples are taken. The
accuracy of a target is the mean distance between its valid samples and the target (Holmqvist et al.
2012's "accuracy": the average offset), in CSS pixels and, when the screen's physical size is known,
in degrees of visual angle (pymovements ``pix2deg``, eye at ``distance_cm`` in front of the screen
centre). The recording's accuracy is the mean over targets that had valid samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import InvalidInputError
from .fixations import require_pymovements
from .geometry import ViewGeometry
from .samples import GazeSample

__all__ = ["validation_accuracy", "validation_targets"]


def validation_targets(margin: float = 0.1) -> list[tuple[float, float]]:
    """The 9 targets (fractions of the screen): a 3x3 grid ``margin`` in from the edges, row by row."""
    ticks = (margin, 0.5, 1.0 - margin)
    return [(x, y) for y in ticks for x in ticks]


def _degrees(px: np.ndarray, geometry: ViewGeometry, screen_cm, distance_cm: float) -> np.ndarray:
    require_pymovements()
    from pymovements.transforms.numpy import pix2deg

    if isinstance(screen_cm, (int, float)):
        screen_cm = (float(screen_cm), float(screen_cm) * geometry.screen_h / geometry.screen_w)
    return pix2deg(px, (geometry.screen_w, geometry.screen_h), tuple(screen_cm), distance_cm, "upper left")


def validation_accuracy(
    targets: Sequence[tuple[float, float]],
    samples_per_target: Sequence[Sequence[GazeSample]],
    geometry: ViewGeometry,
    *,
    screen_cm: float | tuple[float, float] | None = None,
    distance_cm: float = 60.0,
) -> dict:
    """Accuracy of a 9-point (or any) validation.

    Args:
        targets: target positions, normalised to the screen.
        samples_per_target: the samples taken while each target was shown.
        geometry: the view geometry (its screen size converts fractions to CSS px).
        screen_cm: physical screen width in cm, or (width, height); None = degrees unknown.
        distance_cm: eye-to-screen distance in cm.

    Returns:
        ``{"px": float | None, "deg": float | None, "targets": int, "missing": int, "per_target":
        [{"x", "y", "n", "px", "deg"}]}``; ``missing`` counts targets without a valid sample (they do
        not enter the means).
    """
    if len(targets) != len(samples_per_target):
        raise InvalidInputError(
            f"validation: {len(targets)} targets but {len(samples_per_target)} sample lists"
        )
    if screen_cm is not None and not distance_cm > 0:
        raise InvalidInputError(f"validation: distance_cm={distance_cm!r} must be positive")
    size = np.array([geometry.screen_w, geometry.screen_h])
    per_target = []
    for (tx, ty), samples in zip(targets, samples_per_target):
        xy = np.array([(s.x, s.y) for s in samples if s.valid], dtype=np.float64).reshape(-1, 2)
        xy = xy[np.isfinite(xy).all(axis=1)]
        entry = {"x": float(tx), "y": float(ty), "n": int(len(xy)), "px": None, "deg": None}
        if len(xy):
            gaze_px = xy * size
            target_px = np.array([[tx, ty]]) * size
            entry["px"] = float(np.linalg.norm(gaze_px - target_px, axis=1).mean())
            if screen_cm is not None:
                g = _degrees(gaze_px, geometry, screen_cm, distance_cm)
                t = _degrees(target_px, geometry, screen_cm, distance_cm)
                entry["deg"] = float(np.linalg.norm(g - t, axis=1).mean())
        per_target.append(entry)
    measured = [e for e in per_target if e["px"] is not None]
    px = float(np.mean([e["px"] for e in measured])) if measured else None
    deg = float(np.mean([e["deg"] for e in measured])) if measured and screen_cm is not None else None
    if deg is not None and math.isnan(deg):
        deg = None
    return {
        "px": px,
        "deg": deg,
        "targets": len(targets),
        "missing": len(targets) - len(measured),
        "per_target": per_target,
    }
