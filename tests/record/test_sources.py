"""Gaze sources: the Gazepoint bridge against its simulated device on loopback, pointer, replay."""

from __future__ import annotations

import threading
import time

import pytest
from helpers import free_port

from gazemonai.errors import InvalidInputError
from gazemonai.record.fixations import detect_fixations
from gazemonai.record.gazepoint import GazepointSimulator, fixation_trajectory
from gazemonai.record.geometry import ViewGeometry
from gazemonai.record.samples import GazeSample, read_raw_samples, write_raw_samples
from gazemonai.record.sources import (
    GazepointSource,
    PointerSource,
    ReplaySource,
    TrackerError,
    make_source,
)

PATH = fixation_trajectory(
    points=((0.5, 0.5), (0.3, 0.4), (0.7, 0.6)),
    fixation_s=0.3,
    saccade_s=0.03,
    blink_every_s=0.7,
    blink_s=0.05,
)


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


class Collector:
    def __init__(self):
        self.samples: list[GazeSample] = []
        self.lock = threading.Lock()

    def __call__(self, s):
        with self.lock:
            self.samples.append(s)

    def __len__(self):
        with self.lock:
            return len(self.samples)


def test_gazepoint_connect_calibrate_stream_disconnect_reconnect():
    got = Collector()
    with GazepointSimulator(rate_hz=150, trajectory=PATH, calibration_error=(0.01, 0.0)) as sim:
        src = make_source("gazepoint", port=sim.port, reconnect_s=0.05)
        assert isinstance(src, GazepointSource)
        src.start(got)
        assert src.wait_connected(5) and src.connected
        # calibrate: the tracker's own 9 points; each gaze lands 0.01 screen widths right of its target
        cal = src.calibrate()
        assert len(cal["points"]) == 9 and cal["valid_points"] == 9
        assert cal["ave_error_px"] == pytest.approx(19.2)  # 0.01 * 1920
        assert all(p["left"][0] - p["x"] == pytest.approx(0.01) and p["left"][2] for p in cal["points"])
        # stream: every record becomes a sample equal to the trajectory at its TIME
        assert wait_for(lambda: len(got) >= 60)
        first = list(got.samples[:60])
        for s in first:
            x, y, valid = PATH(s.t)
            assert s.valid == valid
            if valid:
                # 5 decimals on the wire; TIME rounded to 10 us moves a saccade sample by < 1e-4
                assert (s.x, s.y) == (pytest.approx(x, abs=1e-4), pytest.approx(y, abs=1e-4))
        assert any(not s.valid for s in got.samples) or len(got) < 110  # blinks arrive flagged
        # disconnect mid-image, with half a record on the wire
        n_before = len(got)
        kept = list(got.samples)
        sim.drop_clients(partial=b'<REC CNT="9" TIME="3.')
        assert wait_for(lambda: src.reconnects == 1 and src.connected)
        assert wait_for(lambda: len(got) >= n_before + 60)
        src.stop()
    assert got.samples[: len(kept)] == kept  # nothing received before the fault was lost
    assert any("disconnected after" in m and "(kept); reconnecting" in m for m in src.messages)
    assert sum("connected to the Gazepoint tracker" in m for m in src.messages) == 2
    assert sim.connections == 2
    times = [s.t for s in got.samples]
    assert times == sorted(times) and len(set(times)) == len(times)  # the half record made no sample
    assert src.skipped >= 9 * 2 + 1  # CAL lines and ACKs are not samples
    assert not src.connected
    assert src.gaps >= 1  # the tracker's CNT jumped over the records sent while we were away
    # detection across the fault: the hole ends whatever fixation was under way, and is counted
    g = ViewGeometry(0.0, 1920, 1080, 0, 0, 1.0, 420, 0, 1.8, 600, 600)
    fx = detect_fixations(got.samples, g)
    assert fx.stats["gaps"] == 1 and fx.stats["samples"] == len(got.samples) and len(fx) >= 2
    hole = max(zip(times, times[1:]), key=lambda p: p[1] - p[0])
    last_sample = [f.start + f.duration_ms / 1000 - 1 / 150 for f in fx]  # duration = last - first + 1/rate
    assert not any(f.start <= hole[0] and end >= hole[1] - 1e-6 for f, end in zip(fx, last_sample))


def test_a_failing_callback_does_not_end_the_stream():
    got = []

    def on_sample(s):
        if not got:
            got.append(None)
            raise RuntimeError("the consumer broke once")
        got.append(s)

    with GazepointSimulator(rate_hz=200) as sim:
        src = GazepointSource(port=sim.port)
        src.start(on_sample)
        assert wait_for(lambda: len(got) >= 20)
        src.stop()
    assert src.callback_errors == 1 and src.reconnects == 0
    assert any("callback failed" in m for m in src.messages)


def test_gazepoint_waits_for_a_tracker_that_is_not_there_yet():
    port = free_port()
    status = []
    src = GazepointSource(port=port, reconnect_s=0.05, timeout_s=1.0, on_status=status.append)
    got = Collector()
    src.start(got)
    assert wait_for(lambda: any("cannot reach" in m for m in status))
    with pytest.raises(TrackerError, match="not connected"):
        src.send("GET", ID="ENABLE_SEND_DATA")
    with GazepointSimulator(port=port, rate_hz=60):
        assert src.wait_connected(5)
        assert wait_for(lambda: len(got) >= 5)
        src.stop()
    assert status[-1].startswith("connected")


def test_calibrate_without_a_tracker_is_a_clear_error():
    src = GazepointSource(port=free_port(), reconnect_s=0.05, timeout_s=0.3)
    with pytest.raises(TrackerError, match="not connected; cannot calibrate"):
        src.calibrate()
    src.stop()


def test_pointer_source_passes_pushed_samples_on():
    src = make_source("pointer")
    assert src.calibrate() is None and not src.connected
    with pytest.raises(InvalidInputError, match="before start"):
        src.push(GazeSample(0, 0.5, 0.5))
    got = []
    src.start(got.append)
    src.push(GazeSample(0.0, 0.5, 0.5))
    src.push(GazeSample(0.016, 0.1, 0.2, False))
    assert got == [GazeSample(0.0, 0.5, 0.5), GazeSample(0.016, 0.1, 0.2, False)]
    src.stop()
    assert not src.connected


def test_replay_round_trip_gives_the_same_samples_and_fixations(tmp_path):
    samples = [GazeSample(10 + k / 120, *PATH(k / 120)) for k in range(240)]
    raw = write_raw_samples(tmp_path / "rec.csv", samples)
    assert read_raw_samples(raw) == samples
    src = make_source("replay", path=raw, speed=float("inf"))
    got = Collector()
    src.start(got)
    assert src.wait(10)
    src.stop()
    assert got.samples == samples and src.delivered == 240
    g = ViewGeometry(0.0, 1920, 1080, 0, 0, 1.0, 420, 0, 1.8, 600, 600)
    assert detect_fixations(got.samples, g) == detect_fixations(samples, g)
    assert len(detect_fixations(samples, g)) >= 4


def test_replay_keeps_the_recorded_rate_and_can_rebase(tmp_path):
    samples = [GazeSample(5 + k / 50, 0.5, 0.5) for k in range(26)]  # 0.5 s at 50 Hz
    raw = write_raw_samples(tmp_path / "rec.csv", samples)
    src = ReplaySource(raw, speed=2.0, rebase=True)
    got = Collector()
    t0 = time.monotonic()
    src.start(got)
    assert src.wait(10)
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.25 - 0.02  # played at twice the recorded rate: not faster
    assert got.samples[0].t == pytest.approx(t0, abs=0.5)  # on the monotonic clock now
    assert [round(s.t - got.samples[0].t, 9) for s in got.samples] == [round(k / 50, 9) for k in range(26)]


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(InvalidInputError, match="--source 'tobii' is not one of gazepoint, pointer, replay"):
        make_source("tobii")
    with pytest.raises(InvalidInputError, match="--source pointer"):
        make_source("pointer", port=1)
    with pytest.raises(InvalidInputError, match="speed=0"):
        ReplaySource(write_raw_samples(tmp_path / "r.csv", []), speed=0)
    assert isinstance(PointerSource(), PointerSource)
