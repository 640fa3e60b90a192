"""Screen -> image mapping under letterboxing, zoom, pan, a window not at the screen's corner and DPR 2."""

from __future__ import annotations

import pytest

from gazemonai.errors import InvalidInputError
from gazemonai.record.geometry import (
    ViewGeometry,
    geometry_from_dict,
    image_to_screen,
    screen_to_image,
    viewport_to_screen,
)

# A 1280x720 CSS-px screen at DPR 2 (2560x1440 device px); the browser's viewport starts 10 px right and
# 80 px down; a 622x528 image (Kvasir-like) letterboxed in a 1270x640 viewport: scale 640/528, left
# (1270 - 622 * 640 / 528) / 2, top 0.
S = 640 / 528
FIT = ViewGeometry(
    t=0,
    screen_w=1280,
    screen_h=720,
    view_x=10,
    view_y=80,
    dpr=2.0,
    left=(1270 - 622 * S) / 2,
    top=0.0,
    scale=S,
    image_w=622,
    image_h=528,
)


def test_letterboxed_image_corners_and_centre():
    left = (1270 - 622 * S) / 2
    # the image's top-left corner is at screen CSS px (10 + left, 80 + 0)
    assert screen_to_image((10 + left) / 1280, 80 / 720, FIT) == (pytest.approx(0.0, abs=1e-9), 0.0)
    # its centre pixel edge (311, 264) at (10 + left + 311 S, 80 + 264 S)
    u, v = screen_to_image((10 + left + 311 * S) / 1280, (80 + 264 * S) / 720, FIT)
    assert (u, v) == (pytest.approx(311.0), pytest.approx(264.0))
    # a look in the letterbox band maps outside the image
    assert screen_to_image(20 / 1280, 0.5, FIT)[0] < 0


def test_zoom_and_pan():
    # zoom 4x about image pixel (100, 50), then pan 30 px left: scale 4 S; (100, 50) stays at its old
    # viewport place minus the pan.
    left, top = FIT.left, FIT.top
    cx, cy = left + 100 * S, top + 50 * S
    z = ViewGeometry(
        **{**FIT.__dict__, "scale": 4 * S, "left": cx - 100 * 4 * S - 30, "top": cy - 50 * 4 * S}
    )
    x, y = (10 + cx - 30) / 1280, (80 + cy) / 720
    assert screen_to_image(x, y, z) == (pytest.approx(100.0), pytest.approx(50.0))
    # one CSS px to the right is a quarter of what it was in image pixels
    assert screen_to_image(x + 1 / 1280, y, z)[0] - 100 == pytest.approx(1 / (4 * S))


def test_the_device_pixel_ratio_does_not_move_the_mapping():
    dpr1 = ViewGeometry(**{**FIT.__dict__, "dpr": 1.0})
    assert screen_to_image(0.4, 0.6, dpr1) == screen_to_image(0.4, 0.6, FIT)


def test_inverse_and_viewport():
    for u, v in [(0, 0), (621.5, 527.5), (311.2, 17.9)]:
        x, y = image_to_screen(u, v, FIT)
        assert screen_to_image(x, y, FIT) == (pytest.approx(u), pytest.approx(v))
    # a mouse event's clientX/Y (viewport px) -> screen fraction: add the viewport's screen offset
    assert viewport_to_screen(630, 280, FIT) == (640 / 1280, 360 / 720)


def test_from_dict_and_bad_values():
    d = {k: v for k, v in FIT.__dict__.items()}
    assert geometry_from_dict(d) == FIT
    with pytest.raises(InvalidInputError, match="missing field\\(s\\) scale"):
        geometry_from_dict({k: v for k, v in d.items() if k != "scale"})
    with pytest.raises(InvalidInputError, match="scale=0"):
        geometry_from_dict({**d, "scale": 0})
    with pytest.raises(InvalidInputError, match="not a number"):
        geometry_from_dict({**d, "left": "abc"})
    with pytest.raises(InvalidInputError, match="image_w=10.5 must be a positive integer"):
        geometry_from_dict({**d, "image_w": 10.5})
    with pytest.raises(InvalidInputError, match="left=nan is not a finite number"):
        ViewGeometry(**{**d, "left": float("nan")})
