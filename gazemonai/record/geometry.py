"""Record step 2: where the image was on the screen, and the screen -> image mapping.

The page reports a :class:`ViewGeometry` every time the displayed image moves (load, zoom, pan, window
resize). All lengths are CSS pixels; the device pixel ratio is recorded but does not enter the mapping,
because a tracker's normalised screen position is the same fraction of the screen in CSS and in device
pixels (``screen.width`` CSS px = ``screen.width * dpr`` device px). The chain is::

    normalised screen (x, y)  --*screen_w/h-->  screen CSS px  --minus view_x/y-->  viewport CSS px
        --minus left/top, / scale-->  image pixels (u, v)

where the image's pixel edge ``(u, v)`` is drawn at viewport CSS px ``(left + u*scale, top + v*scale)``;
letterboxing is in ``left``/``top``, zoom in ``scale`` and pan in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InvalidInputError

__all__ = ["ViewGeometry", "screen_to_image", "viewport_to_screen", "image_to_screen", "geometry_from_dict"]


@dataclass(frozen=True)
class ViewGeometry:
    """The displayed image's placement, from time ``t`` on.

    Args:
        t: seconds, on the samples' clock, from when this placement holds.
        screen_w: screen width in CSS px (``window.screen.width``).
        screen_h: screen height in CSS px (``window.screen.height``).
        view_x: viewport left edge on the screen in CSS px (0 when full-screen).
        view_y: viewport top edge on the screen in CSS px (0 when full-screen).
        dpr: ``window.devicePixelRatio`` (recorded only; see the module docstring).
        left: viewport CSS px x of the image's left edge.
        top: viewport CSS px y of the image's top edge.
        scale: CSS px per image pixel (fit-to-screen times zoom).
        image_w: image width in pixels.
        image_h: image height in pixels.
    """

    t: float
    screen_w: float
    screen_h: float
    view_x: float
    view_y: float
    dpr: float
    left: float
    top: float
    scale: float
    image_w: int
    image_h: int

    def __post_init__(self):
        for name in ("t", "screen_w", "screen_h", "view_x", "view_y", "dpr", "left", "top", "scale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InvalidInputError(f"view geometry: {name}={v!r} is not a finite number")
        for name in ("screen_w", "screen_h", "dpr", "scale"):
            if getattr(self, name) <= 0:
                raise InvalidInputError(f"view geometry: {name}={getattr(self, name)!r} must be positive")
        for name in ("image_w", "image_h"):
            v = getattr(self, name)
            if int(v) != v or v <= 0:
                raise InvalidInputError(f"view geometry: {name}={v!r} must be a positive integer")


def geometry_from_dict(d: dict) -> ViewGeometry:
    """A :class:`ViewGeometry` from the page's JSON (keys = field names); a clear error for a missing one."""
    names = list(ViewGeometry.__dataclass_fields__)
    missing = [n for n in names if n not in d]
    if missing:
        raise InvalidInputError(f"view geometry: missing field(s) {', '.join(missing)}")
    try:
        values = {n: float(d[n]) for n in names}
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"view geometry: a field is not a number ({e})") from None
    values["image_w"] = int(values["image_w"]) if values["image_w"].is_integer() else values["image_w"]
    values["image_h"] = int(values["image_h"]) if values["image_h"].is_integer() else values["image_h"]
    return ViewGeometry(**values)


def screen_to_image(x: float, y: float, geometry: ViewGeometry) -> tuple[float, float]:
    """Normalised screen position -> image pixel coordinates (float; pixel ``k`` spans [k, k+1)).

    The result may lie outside ``[0, image_w] x [0, image_h]`` (a look beside the image).
    """
    g = geometry
    cx = x * g.screen_w - g.view_x
    cy = y * g.screen_h - g.view_y
    return (cx - g.left) / g.scale, (cy - g.top) / g.scale


def image_to_screen(u: float, v: float, geometry: ViewGeometry) -> tuple[float, float]:
    """The inverse of :func:`screen_to_image`: image pixels -> normalised screen position."""
    g = geometry
    return (g.left + u * g.scale + g.view_x) / g.screen_w, (g.top + v * g.scale + g.view_y) / g.screen_h


def viewport_to_screen(cx: float, cy: float, geometry: ViewGeometry) -> tuple[float, float]:
    """Viewport (CSS client) px, as a mouse event gives them -> normalised screen (the pointer source)."""
    g = geometry
    return (cx + g.view_x) / g.screen_w, (cy + g.view_y) / g.screen_h
