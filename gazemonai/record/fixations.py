"""Record step 3: raw samples -> fixations on the displayed image.

Samples are cut into segments by the :class:`~gazemonai.record.geometry.ViewGeometry` in force (a zoom,
pan or resize ends a segment, so a fixation never spans two placements of the image), converted to
degrees of visual angle on the screen, and classified by pymovements' I-VT or I-DT (Salvucci &
Goldberg 2000). Each fixation's centre is the mean of its valid samples mapped into image pixels,
normalised by the image size: the ``CURRENT_FIX_X/Y`` of the GazeMedSeg CSV.

Defaults and why:

- I-VT, velocity threshold **30 deg/s**, minimum duration **60 ms**: the Tobii I-VT fixation filter's
  defaults (Olsen 2012), tuned on screen-based trackers at 60-300 Hz, the rates this module serves.
  Velocities are pymovements' ``pos2vel`` ``"smooth"`` method (Engbert & Kliegl 2003: the mean of the
  next two samples minus the mean of the previous two), which damps the sample noise of 60 Hz trackers.
- I-DT, dispersion threshold **1.0 deg**, minimum duration **100 ms**: Salvucci & Goldberg (2000) and
  pymovements' defaults (Blignaut 2009 found 1 deg to match human coders best).
- Degrees need the screen's physical size and the eye distance; unknown, a 24-inch 16:9 monitor
  (53 cm wide) at 60 cm is assumed (``screen_width_cm``, ``distance_cm``), which makes the thresholds
  about 31 CSS px/deg on a 1920-px-wide screen.

Invalid samples (the tracker's flag off: blinks, a lost eye; or a NaN position) become gaps: no
fixation spans them, and they are counted. Samples before the first geometry are counted and skipped.
A fixation's ``duration_ms`` is its last sample's time minus its first's plus one sample interval (the
segment's median), i.e. the time its samples cover; the minimum duration is tested as pymovements
does, on last minus first.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import GazemonaiError, InvalidInputError
from .geometry import ViewGeometry, screen_to_image
from .samples import GazeSample

# Imported with the module, not on first use: pymovements (with polars) takes seconds to import, which
# would land on the annotator's first key press. It is the optional extra `gazemonai[record]` (MIT, but
# it requires pyreadr, AGPL-3.0), so a plain install imports this module and says what is missing on use.
try:
    from pymovements.events.detection import idt, ivt
    from pymovements.transforms.numpy import pix2deg, pos2vel
except ImportError as e:  # pragma: no cover - the test environment installs it
    _MISSING = e
else:
    _MISSING = None

#: what a user without pymovements is told
INSTALL_HINT = (
    "fixation detection needs pymovements: pip install 'gazemonai[record]' (pymovements is MIT; it "
    "installs pyreadr, AGPL-3.0)"
)


class DetectorUnavailableError(GazemonaiError, ImportError):
    """The fixation detector's library (pymovements) is not installed."""


def require_pymovements() -> None:
    """Raise :class:`DetectorUnavailableError` with the install command when pymovements is absent."""
    if _MISSING is not None:
        raise DetectorUnavailableError(f"{INSTALL_HINT} ({_MISSING})")


__all__ = [
    "Fixation",
    "Fixations",
    "detect_fixations",
    "DEFAULTS",
    "DetectorUnavailableError",
    "require_pymovements",
]

#: A time step longer than this many median sample intervals is a hole in the stream (see ``gaps``).
GAP_FACTOR = 2.5

#: Default thresholds per method (see the module docstring for the reasons).
DEFAULTS = {
    "ivt": {"velocity_threshold": 30.0, "minimum_duration_ms": 60.0},
    "idt": {"dispersion_threshold": 1.0, "minimum_duration_ms": 100.0},
}


@dataclass(frozen=True)
class Fixation:
    """One fixation on the displayed image.

    Args:
        start: onset in seconds on the samples' clock.
        duration_ms: duration in milliseconds.
        x: centre, normalised to the image width, origin left.
        y: centre, normalised to the image height, origin top.
    """

    start: float
    duration_ms: float
    x: float
    y: float


class Fixations(list):
    """A list of :class:`Fixation` with ``stats``: what was counted on the way.

    ``stats`` keys: ``samples`` (in), ``invalid`` (flagged or NaN), ``no_geometry`` (before the first
    geometry), ``segments``, ``gaps`` (holes in the stream longer than :data:`GAP_FACTOR` sample
    intervals, e.g. a tracker reconnecting; no fixation spans one), ``detected``, ``outside`` (centre
    outside the image, dropped), ``fixations`` (kept).
    """

    def __init__(self, items=(), stats: dict | None = None):
        super().__init__(items)
        self.stats = dict(stats or {})


def _segments(samples: Sequence[GazeSample], geometries: Sequence[ViewGeometry], stats: dict):
    """Consecutive runs of samples under the same geometry: ``[(geometry, [samples])]``."""
    geoms = sorted(geometries, key=lambda g: g.t)
    starts = [g.t for g in geoms]
    out: list[tuple[ViewGeometry, list[GazeSample]]] = []
    current = -1
    for s in samples:
        i = bisect.bisect_right(starts, s.t) - 1
        if i < 0:
            stats["no_geometry"] += 1
            continue
        if i != current:
            out.append((geoms[i], []))
            current = i
        out[-1][1].append(s)
    return out


def _to_degrees(px: np.ndarray, g: ViewGeometry, screen_width_cm: float, distance_cm: float) -> np.ndarray:
    screen_cm = (screen_width_cm, screen_width_cm * g.screen_h / g.screen_w)
    return pix2deg(px, (g.screen_w, g.screen_h), screen_cm, distance_cm, "upper left")


def _events(
    deg: np.ndarray, t_ms: np.ndarray, dt_ms: float, method: str, params: dict
) -> list[tuple[int, int]]:
    """(first, last) sample indices of each fixation pymovements finds in one segment."""
    n = len(t_ms)
    if method == "ivt":
        # pymovements' pos2vel needs 6 samples for "smooth", 3 for "neighbors", 2 for "preceding"; a
        # shorter segment (e.g. between two wheel steps of a zoom) holds no fixation
        if n < {"smooth": 6, "neighbors": 3}.get(params["velocity_method"], 2):
            return []
        vel = pos2vel(deg, sampling_rate=1000.0 / dt_ms, method=params["velocity_method"])
        ev = ivt(
            vel,
            timesteps=t_ms,
            minimum_duration=params["minimum_duration_ms"],
            velocity_threshold=params["velocity_threshold"],
        ).frame
        on = np.searchsorted(t_ms, ev["onset"].to_numpy())
        off = np.searchsorted(t_ms, ev["offset"].to_numpy())
        return list(zip(on.tolist(), off.tolist()))
    # I-DT: pymovements needs evenly spaced time steps, so it runs on sample indices with the minimum
    # duration converted to samples at the segment's median rate.
    min_samples = max(2, int(math.ceil(params["minimum_duration_ms"] / dt_ms - 1e-9)))
    if n < min_samples:
        return []
    thr = params["dispersion_threshold"]
    ev = idt(deg, minimum_duration=min_samples, dispersion_threshold=thr).frame
    out = []
    for first, last in zip(ev["onset"].to_list(), ev["offset"].to_list()):
        # pymovements' I-DT offset is the sample whose addition broke the threshold (the first one after
        # the fixation; its issue #527 on offsets) except at the end of the data: keep only samples within.
        window = deg[first : last + 1]
        if last > first and np.nanmax(window, 0).sum() - np.nanmin(window, 0).sum() > thr:
            last -= 1
        out.append((first, last))
    return out


def detect_fixations(
    samples: Sequence[GazeSample],
    geometries: Sequence[ViewGeometry] | ViewGeometry,
    *,
    method: str = "ivt",
    velocity_threshold: float | None = None,
    dispersion_threshold: float | None = None,
    minimum_duration_ms: float | None = None,
    velocity_method: str = "smooth",
    screen_width_cm: float = 53.0,
    distance_cm: float = 60.0,
) -> Fixations:
    """Detect fixations in raw samples and place them on the image.

    Args:
        samples: raw samples in time order (one image's, or a whole recording's).
        geometries: the view geometries reported while the samples were taken (or just one).
        method: ``"ivt"`` (velocity threshold) or ``"idt"`` (dispersion threshold).
        velocity_threshold: I-VT threshold in deg/s (default 30).
        dispersion_threshold: I-DT threshold in deg, (max x - min x) + (max y - min y) (default 1.0).
        minimum_duration_ms: shortest fixation kept (default 60 for I-VT, 100 for I-DT).
        velocity_method: pymovements ``pos2vel`` method for I-VT (``"smooth"``, ``"neighbors"``,
            ``"preceding"``).
        screen_width_cm: the screen's physical width, for degrees (default 53: a 24-inch 16:9 monitor).
        distance_cm: eye-to-screen distance (default 60).

    Returns:
        :class:`Fixations`, in time order, with the counts in ``.stats``.
    """
    require_pymovements()
    if method not in DEFAULTS:
        raise InvalidInputError(f"fixation method {method!r} is not one of {', '.join(DEFAULTS)}")
    params = dict(DEFAULTS[method])
    for name, value in (
        ("velocity_threshold", velocity_threshold),
        ("dispersion_threshold", dispersion_threshold),
        ("minimum_duration_ms", minimum_duration_ms),
    ):
        if value is not None:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InvalidInputError(f"fixation detection: {name}={value!r} must be a positive number")
            params[name] = float(value)
    params["velocity_method"] = velocity_method
    if isinstance(geometries, ViewGeometry):
        geometries = [geometries]

    stats = {
        "gaps": 0,
        "samples": len(samples),
        "invalid": 0,
        "no_geometry": 0,
        "segments": 0,
        "detected": 0,
        "outside": 0,
        "fixations": 0,
    }
    out: list[Fixation] = []
    for g, seg in _segments(samples, geometries, stats):
        stats["segments"] += 1
        t = np.array([s.t for s in seg], dtype=np.float64)
        xy = np.array([(s.x, s.y) for s in seg], dtype=np.float64)
        bad = ~np.array([s.valid for s in seg]) | ~np.isfinite(xy).all(axis=1)
        stats["invalid"] += int(bad.sum())
        xy[bad] = np.nan
        if len(seg) < 2:
            continue
        t_ms = t * 1000.0
        dt_ms = float(np.median(np.diff(t_ms)))
        if not dt_ms > 0:
            raise InvalidInputError(f"gaze samples from t={t[0]}: time stamps do not advance")
        px = xy * np.array([g.screen_w, g.screen_h])
        deg = _to_degrees(px, g, screen_width_cm, distance_cm)
        # a hole in the stream (a tracker that reconnected, samples lost on the way) ends a run: the
        # velocity across it would be made up, and no fixation may span time without samples
        cuts = np.nonzero(np.diff(t_ms) > GAP_FACTOR * dt_ms)[0] + 1
        stats["gaps"] += len(cuts)
        events = []
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(t_ms)]):
            events += [(lo + a, lo + b) for a, b in _events(deg[lo:hi], t_ms[lo:hi], dt_ms, method, params)]
        for first, last in events:
            stats["detected"] += 1
            keep = ~bad[first : last + 1]
            if not keep.any():
                continue
            mx, my = np.nanmean(xy[first : last + 1][keep], axis=0)
            u, v = screen_to_image(float(mx), float(my), g)
            x, y = u / g.image_w, v / g.image_h
            if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
                stats["outside"] += 1
                continue
            out.append(Fixation(float(t[first]), float(t_ms[last] - t_ms[first] + dt_ms), x, y))
    stats["fixations"] = len(out)
    return Fixations(out, stats)
