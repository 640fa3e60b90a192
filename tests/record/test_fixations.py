"""Samples -> fixations: hand-made traces with hand-computed answers, and pymovements' own output.

The trace: 100 Hz (10 ms), a 1920x1080 CSS-px screen 53 cm wide at 60 cm (the defaults), so near the
traces' positions one CSS px is 0.023-0.0264 deg. The image (200 x 100 px) is drawn at scale 2 with
its top-left at viewport (100, 50): image pixel (u, v) = ((X - 100) / 2, (Y - 50) / 2) for screen CSS
px (X, Y).

    samples 0..29   fixation A at screen px (300, 150)  -> image (100, 50)  -> (0.5, 0.5)
    samples 30..32  saccade, steps of d/4, d = (120, 80) (36 px a step: 3600 px/s, ~87-95 deg/s)
    samples 33..52  fixation B at screen px (420, 230)  -> image (160, 90)  -> (0.8, 0.9)
"""

from __future__ import annotations

import numpy as np
import pytest

from gazemonai.errors import InvalidInputError
from gazemonai.record.fixations import Fixation, detect_fixations
from gazemonai.record.geometry import ViewGeometry
from gazemonai.record.samples import GazeSample

SCREEN = (1920.0, 1080.0)
GEOM = ViewGeometry(
    t=0.0,
    screen_w=1920,
    screen_h=1080,
    view_x=0,
    view_y=0,
    dpr=2.0,
    left=100,
    top=50,
    scale=2.0,
    image_w=200,
    image_h=100,
)
A, B = np.array([300.0, 150.0]), np.array([420.0, 230.0])


def trace_px(noise: float = 0.0, seed: int = 0) -> np.ndarray:
    d = B - A
    p = np.array([A] * 30 + [A + d / 4, A + d / 2, A + 3 * d / 4] + [B] * 20)
    if noise:
        p = p + np.random.default_rng(seed).normal(0, noise, p.shape)
    return p


def as_samples(px: np.ndarray, invalid=(), t0: float = 0.0) -> list[GazeSample]:
    out = []
    for i, (x, y) in enumerate(px):
        if i in invalid:
            out.append(GazeSample(t0 + i * 0.01, 0.0, 0.0, False))  # what a tracker sends in a blink
        else:
            out.append(GazeSample(t0 + i * 0.01, x / SCREEN[0], y / SCREEN[1], True))
    return out


def check(got, expected):
    assert len(got) == len(expected), got
    for f, (start, dur, x, y) in zip(got, expected):
        assert f.start == pytest.approx(start, abs=1e-9)
        assert f.duration_ms == pytest.approx(dur, abs=1e-6)
        assert (f.x, f.y) == (pytest.approx(x, abs=1e-9), pytest.approx(y, abs=1e-9))


def test_a_fixation_a_saccade_a_fixation_preceding_velocity():
    # "preceding": v[i] = (p[i] - p[i-1]) * 100 Hz. A: v = 0 on 0..29 (v[0] = 0 by definition),
    # v[30..33] = 3600 px/s > 30 deg/s, B: v = 0 on 34..52. Duration = last - first + 10 ms.
    got = detect_fixations(as_samples(trace_px()), [GEOM], velocity_method="preceding")
    check(got, [(0.0, 300.0, 0.5, 0.5), (0.34, 190.0, 0.8, 0.9)])
    assert got.stats == {
        "gaps": 0,
        "samples": 53,
        "invalid": 0,
        "no_geometry": 0,
        "segments": 1,
        "detected": 2,
        "outside": 0,
        "fixations": 2,
    }


def test_the_default_smooth_velocity_ends_and_starts_where_the_hand_count_says():
    # "smooth": v[i] = (p[i+2] + p[i+1] - p[i-1] - p[i-2]) * 100 / 6.
    # v[28] = (d/4) * 100/6 = 601 px/s ~ 15 deg/s < 30 -> still A; v[29] = (3d/4) -> 1803 px/s ~ 44 deg/s.
    # v[33] = 3d/4 -> ~44 deg/s; v[34] = d/4 -> ~15 deg/s: B starts at 34.
    got = detect_fixations(as_samples(trace_px()), GEOM)
    check(got, [(0.0, 290.0, 0.5, 0.5), (0.34, 190.0, 0.8, 0.9)])


def test_noise_leaves_the_fixations_and_averages_out():
    # sd 0.5 CSS px: sample-to-sample velocity noise ~ 70 px/s ~ 2 deg/s, far under 30; the centre of
    # 29 samples has a standard error of 0.09 CSS px = 0.05 image px.
    got = detect_fixations(as_samples(trace_px(noise=0.5, seed=3)), GEOM)
    assert [round(f.start, 2) for f in got] == [0.0, 0.34]
    assert [f.duration_ms for f in got] == pytest.approx([290.0, 190.0])
    for f, (x, y) in zip(got, [(0.5, 0.5), (0.8, 0.9)]):
        assert abs(f.x * 200 - x * 200) < 0.5 and abs(f.y * 100 - y * 100) < 0.5


def test_a_blink_splits_a_fixation_and_is_counted():
    # samples 10..14 invalid. preceding: v[10..15] NaN -> A1 = 0..9 (90 ms >= 60: kept, 100 ms long),
    # A2 = 16..29 (140 ms). smooth: v[8..16] NaN -> 0..7 (80 ms) and 17..28 (120 ms).
    samples = as_samples(trace_px(), invalid=range(10, 15))
    got = detect_fixations(samples, GEOM, velocity_method="preceding")
    check(got, [(0.0, 100.0, 0.5, 0.5), (0.16, 140.0, 0.5, 0.5), (0.34, 190.0, 0.8, 0.9)])
    assert got.stats["invalid"] == 5
    got = detect_fixations(samples, GEOM)
    check(got, [(0.0, 80.0, 0.5, 0.5), (0.17, 120.0, 0.5, 0.5), (0.34, 190.0, 0.8, 0.9)])


def test_a_nan_position_flagged_valid_counts_as_invalid():
    samples = as_samples(trace_px())
    samples[40] = GazeSample(0.40, float("nan"), float("nan"), True)
    got = detect_fixations(samples, GEOM, velocity_method="preceding")
    assert got.stats["invalid"] == 1
    check(got, [(0.0, 300.0, 0.5, 0.5), (0.42, 110.0, 0.8, 0.9)])  # 34..39 is 50 ms < 60: dropped


def test_a_hole_in_the_stream_ends_a_fixation():
    # samples 10..19 never arrived (a tracker reconnecting): 0..9 and 20..29 are two fixations of 100 ms,
    # not one of 300 ms across 100 ms without data
    samples = [s for i, s in enumerate(as_samples(trace_px())) if not 10 <= i < 20]
    got = detect_fixations(samples, GEOM, velocity_method="preceding")
    check(got, [(0.0, 100.0, 0.5, 0.5), (0.2, 100.0, 0.5, 0.5), (0.34, 190.0, 0.8, 0.9)])
    assert got.stats["gaps"] == 1 and got.stats["invalid"] == 0


def test_short_fixations_are_dropped_and_the_minimum_is_settable():
    got = detect_fixations(as_samples(trace_px()), GEOM, velocity_method="preceding", minimum_duration_ms=200)
    check(got, [(0.0, 300.0, 0.5, 0.5)])  # B spans 180 ms (first to last sample) < 200


def test_a_pan_splits_a_fixation_and_each_part_is_mapped_through_its_own_geometry():
    # at t = 0.15 s the image is panned 40 CSS px right: A (screen 300) is now image u = (300-140)/2 = 80.
    panned = ViewGeometry(**{**GEOM.__dict__, "t": 0.15, "left": 140.0})
    got = detect_fixations(as_samples(trace_px()), [panned, GEOM], velocity_method="preceding")
    check(got, [(0.0, 150.0, 0.5, 0.5), (0.15, 150.0, 0.4, 0.5), (0.34, 190.0, 0.7, 0.9)])  # B: 280/2
    assert got.stats["segments"] == 2


def test_a_segment_too_short_for_the_smooth_velocity_is_skipped():
    # The page reports every wheel step and drag move, so a segment may hold five samples; pymovements'
    # "smooth" velocity needs six. Such a segment holds no fixation; the rest are found as without it.
    samples = as_samples(trace_px())
    later = ViewGeometry(**{**GEOM.__dict__, "t": 0.045})  # the same placement, reported again
    got = detect_fixations(samples, [GEOM, later])
    alone = detect_fixations(samples[5:], [later])
    assert got == alone and len(got) == 2 and got.stats["segments"] == 2


def test_zoom_and_letterbox_map_to_image_pixels():
    # zoom 3x about the image: scale 6, the image's left edge at viewport -200, top at -100.
    zoomed = ViewGeometry(**{**GEOM.__dict__, "scale": 6.0, "left": -200.0, "top": -100.0})
    got = detect_fixations(as_samples(trace_px()), zoomed, velocity_method="preceding")
    # A: u = (300 + 200) / 6 = 83.33 -> 0.41667, v = (150 + 100) / 6 = 41.667 -> 0.41667
    # B: u = 620 / 6 = 103.33 -> 0.51667, v = 330 / 6 = 55 -> 0.55
    check(got, [(0.0, 300.0, 500 / 6 / 200, 250 / 6 / 100), (0.34, 190.0, 620 / 6 / 200, 0.55)])


def test_fixations_outside_the_image_and_samples_before_any_geometry_are_counted():
    late = ViewGeometry(**{**GEOM.__dict__, "t": 0.05, "left": 400.0})  # A (300) left of the image
    got = detect_fixations(as_samples(trace_px()), late, velocity_method="preceding")
    assert got.stats["no_geometry"] == 5 and got.stats["outside"] == 1
    check(got, [(0.34, 190.0, 0.05, 0.9)])  # B: u = (420 - 400) / 2 = 10 px of 200


def test_idt_hand_trace():
    # I-DT, 1 deg, 100 ms = 10 samples. The window over A grows until it takes in sample 30 (the
    # first saccade sample breaks the 1 deg dispersion): A = 0..29. B: windows starting at 30..32
    # span the saccade; from 33 on the dispersion is 0 to the end: B = 33..52.
    got = detect_fixations(as_samples(trace_px()), GEOM, method="idt")
    check(got, [(0.0, 300.0, 0.5, 0.5), (0.33, 200.0, 0.8, 0.9)])


def test_against_pymovements_own_gaze_pipeline():
    """The same noisy trace with a blink through pymovements' Gaze API (pix2deg, pos2vel, detect).

    pymovements' Gaze API leaves the velocity of the first and last two samples empty (its smoothing
    window does not fit), so its first fixation starts 2 samples later and its last ends 2 earlier;
    inside the trace, onsets and offsets must be equal. Its I-DT offset is the first sample after the
    fixation (pymovements issue #527 on offsets); ours is the last sample in it.
    """
    pm = pytest.importorskip("pymovements")
    px = trace_px(noise=0.3, seed=7)
    blink = range(12, 16)
    samples = as_samples(px, invalid=blink)
    pos = px.copy()
    pos[list(blink)] = np.nan
    t_ms = np.arange(len(px)) * 10.0
    exp = pm.Experiment(
        screen_width_px=1920,
        screen_height_px=1080,
        screen_width_cm=53.0,
        screen_height_cm=53.0 * 1080 / 1920,
        distance_cm=60,
        origin="upper left",
        sampling_rate=100,
    )
    gaze = pm.gaze.from_numpy(time=t_ms, pixel=pos.T, experiment=exp)
    gaze.pix2deg()
    gaze.pos2vel(method="smooth")
    gaze.detect("ivt", velocity_threshold=30.0, minimum_duration=60)
    ref = gaze.events.frame.select("onset", "offset").to_numpy().tolist()
    ours = detect_fixations(samples, GEOM)
    got = [[round(f.start * 1000), round(f.start * 1000 + f.duration_ms - 10)] for f in ours]
    assert len(got) == len(ref) == 3
    assert got[0][0] == 0 and ref[0][0] == 20  # the edge: ours starts at the first sample
    assert got[0][1] == ref[0][1]
    assert got[1] == ref[1]
    assert got[2][0] == ref[2][0] and got[2][1] == 520 and ref[2][1] == 500

    gaze.detect("idt", dispersion_threshold=1.0, minimum_duration=100, name="idt")
    ref = gaze.events.frame.filter(name="idt").select("onset", "offset").to_numpy().tolist()
    ours = detect_fixations(as_samples(px), GEOM, method="idt")
    got = [[round(f.start * 1000), round(f.start * 1000 + f.duration_ms - 10)] for f in ours]
    gaze = pm.gaze.from_numpy(time=t_ms, pixel=px.T, experiment=exp)
    gaze.pix2deg()
    gaze.detect("idt", dispersion_threshold=1.0, minimum_duration=100)
    ref = gaze.events.frame.select("onset", "offset").to_numpy().tolist()
    assert [r[0] for r in ref] == [g[0] for g in got]
    assert ref[0][1] == got[0][1] + 10 and ref[-1][1] == got[-1][1] == 520  # exclusive vs inclusive, end


def test_bad_settings_are_clear_errors():
    with pytest.raises(InvalidInputError, match="method 'hmm'"):
        detect_fixations([], GEOM, method="hmm")
    with pytest.raises(InvalidInputError, match="velocity_threshold=-1"):
        detect_fixations([], GEOM, velocity_threshold=-1)
    assert detect_fixations([], GEOM) == [] and Fixation(0, 1, 0, 0).x == 0


def test_without_pymovements_the_module_imports_and_use_names_the_install(tmp_path):
    """pymovements is the optional extra gazemonai[record]: without it, an error on use, not on import."""
    import subprocess
    import sys

    from helpers import ROOT

    script = (
        "import sys; sys.modules['pymovements'] = None; "  # an import of it now fails
        f"sys.path.insert(0, {str(ROOT)!r}); "
        "from gazemonai.record import fixations as f; from gazemonai.record.geometry import ViewGeometry\n"
        "try:\n    f.detect_fixations([], ViewGeometry(0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1))\n"
        "except f.DetectorUnavailableError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ERR fixation detection needs pymovements: pip install 'gazemonai[record]'" in out.stdout
