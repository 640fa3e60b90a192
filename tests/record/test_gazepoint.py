"""The simulated Gazepoint tracker speaks the Open Gaze API: checked with a bare socket, line by line."""

from __future__ import annotations

import socket
import time

import pytest

from gazemonai.record.gazepoint import (
    CALIBRATION_POINTS,
    GazepointSimulator,
    fixation_trajectory,
    format_message,
    parse_message,
)


class Line:
    """A bare Open Gaze API client: send a line, read lines."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""

    def send(self, tag, **a):
        self.sock.sendall(format_message(tag, **a))

    def read(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            assert chunk, "the simulator closed the connection"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return parse_message(line)

    def until(self, tag, ident=None, limit=10000):
        for _ in range(limit):
            t, a = self.read()
            if t == tag and (ident is None or a.get("ID") == ident):
                return a
        raise AssertionError(f"no {tag} {ident}")


def test_messages_format_and_parse():
    assert (
        format_message("SET", ID="ENABLE_SEND_DATA", STATE=1)
        == b'<SET ID="ENABLE_SEND_DATA" STATE="1" />\r\n'
    )
    assert parse_message(b'<REC TIME="1.5" BPOGX="0.25" BPOGV="1" />\r\n') == (
        "REC",
        {"TIME": "1.5", "BPOGX": "0.25", "BPOGV": "1"},
    )
    with pytest.raises(ValueError, match="not an Open Gaze API message"):
        parse_message(b'<REC TIME="1.5')


def test_set_is_acked_and_records_carry_only_the_enabled_fields():
    path = fixation_trajectory(points=((0.25, 0.75),), fixation_s=10.0)
    with GazepointSimulator(rate_hz=200, trajectory=path) as sim:
        c = Line(sim.port)
        c.send("SET", ID="ENABLE_SEND_POG_BEST", STATE=1)
        assert c.read() == ("ACK", {"ID": "ENABLE_SEND_POG_BEST", "STATE": "1"})
        c.send("GET", ID="ENABLE_SEND_TIME")
        assert c.read() == ("ACK", {"ID": "ENABLE_SEND_TIME", "STATE": "0"})
        c.send("SET", ID="NO_SUCH_THING", STATE=1)
        assert c.read() == ("NACK", {"ID": "NO_SUCH_THING"})
        c.send("SET", ID="ENABLE_SEND_DATA", STATE=1)
        assert c.read() == ("ACK", {"ID": "ENABLE_SEND_DATA", "STATE": "1"})
        tag, rec = c.read()
        assert tag == "REC" and rec == {"BPOGX": "0.25000", "BPOGY": "0.75000", "BPOGV": "1"}
        c.send("SET", ID="ENABLE_SEND_TIME", STATE=1)
        c.send("SET", ID="ENABLE_SEND_COUNTER", STATE=1)
        c.until("ACK", "ENABLE_SEND_COUNTER")
        recs = [c.until("REC") for _ in range(50)]
        assert all(set(r) == {"CNT", "TIME", "BPOGX", "BPOGY", "BPOGV"} for r in recs)
        cnt = [int(r["CNT"]) for r in recs]
        assert cnt == list(range(cnt[0], cnt[0] + 50))  # no record skipped
        times = [float(r["TIME"]) for r in recs]
        assert all(b - a == pytest.approx(0.005, abs=1e-5) for a, b in zip(times, times[1:]))  # 200 Hz clock
        c.sock.close()


def test_calibration_sequence_and_summary():
    with GazepointSimulator(calibration_error=(0.01, -0.02), screen=(1000, 500)) as sim:
        c = Line(sim.port)
        c.send("SET", ID="CALIBRATE_SHOW", STATE=1)
        assert c.read() == ("ACK", {"ID": "CALIBRATE_SHOW", "STATE": "1"})
        c.send("SET", ID="CALIBRATE_START", STATE=1)
        assert c.read() == ("ACK", {"ID": "CALIBRATE_START", "STATE": "1"})
        for i, (x, y) in enumerate(CALIBRATION_POINTS, start=1):
            assert c.read() == (
                "CAL",
                {"ID": "CALIB_START_PT", "PT": str(i), "CALX": f"{x:.5f}", "CALY": f"{y:.5f}"},
            )
            assert c.read()[1]["ID"] == "CALIB_RESULT_PT"
        tag, res = c.read()
        assert tag == "CAL" and res["ID"] == "CALIB_RESULT"
        assert float(res["LX5"]) == pytest.approx(0.51) and float(res["RY5"]) == pytest.approx(0.48)
        assert res["LV9"] == "1" and "CALX10" not in res
        c.send("GET", ID="CALIBRATE_RESULT_SUMMARY")
        a = c.until("ACK", "CALIBRATE_RESULT_SUMMARY")
        # offset (0.01 * 1000, 0.02 * 500) px = (10, 10) -> 14.14 px
        assert float(a["AVE_ERROR"]) == pytest.approx(14.14, abs=0.01) and a["VALID_POINTS"] == "9"
        c.sock.close()


def test_drop_clients_closes_the_stream_and_the_server_keeps_listening():
    with GazepointSimulator(rate_hz=100) as sim:
        c = Line(sim.port)
        c.send("SET", ID="ENABLE_SEND_DATA", STATE=1)
        c.until("ACK")
        assert sim.drop_clients(partial=b'<REC TIME="1.') == 1
        deadline = time.monotonic() + 5
        data = b""
        while time.monotonic() < deadline:
            chunk = c.sock.recv(4096)
            if not chunk:
                break
            data += chunk
        assert data.endswith(b'<REC TIME="1.')  # the half line, then end of stream
        c2 = Line(sim.port)
        c2.send("GET", ID="ENABLE_SEND_DATA")
        assert c2.read() == ("ACK", {"ID": "ENABLE_SEND_DATA", "STATE": "0"})  # a new client starts clean
        assert sim.connections == 2
        c2.sock.close()


def test_fixation_trajectory_blinks():
    path = fixation_trajectory(
        points=((0.1, 0.2), (0.3, 0.4)), fixation_s=0.3, saccade_s=0.1, blink_every_s=1.0, blink_s=0.1
    )
    assert path(0.1) == (0.1, 0.2, True)
    assert path(0.35) == (pytest.approx(0.2), pytest.approx(0.3), True)  # half way through the saccade
    assert path(0.5) == (0.3, 0.4, True)
    assert path(0.95)[2] is False
