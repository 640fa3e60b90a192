"""The Gazepoint Open Gaze API: the messages, and a simulated device that speaks it on loopback.

The Open Gaze API (Gazepoint, "Open Gaze API by Gazepoint", v2) is XML over TCP, one element per line
ending in CR LF, served by the tracker's control software (port 4242 by default). The client switches
data fields on with ``<SET ID="ENABLE_SEND_..." STATE="1" />`` and the server answers every SET/GET with
``<ACK ID=".." .../>``; once ``ENABLE_SEND_DATA`` is on, it streams one record per sample::

    <REC CNT="12" TIME="3.05100" BPOGX="0.51230" BPOGY="0.49810" BPOGV="1" />

``TIME`` is seconds since the server started, ``BPOGX/Y`` the "best" point of gaze (the average of the
eyes when both are valid) as fractions of the screen, origin top-left, and ``BPOGV`` its validity flag.
Calibration: ``CALIBRATE_SHOW`` / ``CALIBRATE_START`` start the tracker's own 9-point routine; the
server reports ``<CAL ID="CALIB_START_PT" PT=".." CALX=".." CALY=".." />`` and
``<CAL ID="CALIB_RESULT_PT" .../>`` per point and ends with ``<CAL ID="CALIB_RESULT" CALX1=".." CALY1=".."
LX1=".." LY1=".." LV1=".." RX1=".." RY1=".." RV1=".." ... />``; ``<GET ID="CALIBRATE_RESULT_SUMMARY" />``
answers ``AVE_ERROR`` (pixels) and ``VALID_POINTS``.

:class:`GazepointSimulator` is a small server with that behaviour (the fields above, ``CNT``, the
calibration sequence, and a switch to drop its clients as a pulled cable would), for the tests, the
benchmark, the demo and users without hardware. :func:`parse_message` is the client side's parser.
"""

from __future__ import annotations

import math
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable

__all__ = [
    "DEFAULT_PORT",
    "CALIBRATION_POINTS",
    "GazepointSimulator",
    "format_message",
    "parse_message",
    "fixation_trajectory",
]

DEFAULT_PORT = 4242
#: The 9 calibration targets (fractions of the screen), in the order the simulator shows them.
CALIBRATION_POINTS = tuple((x, y) for y in (0.1, 0.5, 0.9) for x in (0.1, 0.5, 0.9))


def format_message(tag: str, **attributes) -> bytes:
    """One Open Gaze API line: ``<TAG A="v" ... />\\r\\n``."""
    attrs = " ".join(f'{k}="{v}"' for k, v in attributes.items())
    return f"<{tag} {attrs} />\r\n".encode("ascii")


def parse_message(line: bytes | str) -> tuple[str, dict[str, str]]:
    """``(tag, attributes)`` of one API line; ``ValueError`` naming the line when it is not XML."""
    text = line.decode("ascii", "replace") if isinstance(line, bytes) else line
    text = text.strip()
    try:
        el = ET.fromstring(text)
    except ET.ParseError as e:
        raise ValueError(f"not an Open Gaze API message: {text[:80]!r} ({e})") from None
    return el.tag, dict(el.attrib)


def fixation_trajectory(
    points=((0.5, 0.5), (0.3, 0.4), (0.7, 0.6)),
    fixation_s: float = 0.4,
    saccade_s: float = 0.04,
    blink_every_s: float | None = None,
    blink_s: float = 0.12,
) -> Callable[[float], tuple[float, float, bool]]:
    """A gaze path for the simulator: fixations on ``points`` in turn, linear saccades between them.

    Args:
        points: fixation targets (fractions of the screen).
        fixation_s: how long each fixation lasts.
        saccade_s: how long each saccade takes.
        blink_every_s: when set, a blink (invalid samples) of ``blink_s`` starts every that many seconds.
        blink_s: blink length.
    """
    period = fixation_s + saccade_s

    def position(t: float) -> tuple[float, float, bool]:
        if blink_every_s and (t % blink_every_s) >= blink_every_s - blink_s:
            return 0.0, 0.0, False
        k = int(t // period)
        phase = t - k * period
        a = points[k % len(points)]
        if phase < fixation_s:
            return a[0], a[1], True
        b = points[(k + 1) % len(points)]
        f = (phase - fixation_s) / saccade_s
        return a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]), True

    return position


class _Client:
    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.lock = threading.Lock()
        self.enabled: dict[str, bool] = {}
        self.alive = True

    def send(self, data: bytes) -> bool:
        try:
            with self.lock:
                self.conn.sendall(data)
            return True
        except OSError:
            self.alive = False
            return False


class GazepointSimulator:
    """A simulated Gazepoint tracker serving the Open Gaze API on loopback.

    Args:
        host: address to listen on.
        port: TCP port (0 = any free port; see :attr:`port` after :meth:`start`).
        rate_hz: sample rate (Gazepoint GP3: 60 Hz, GP3 HD: 150 Hz; the benchmark also runs 250 Hz).
        trajectory: ``f(seconds since the server started) -> (x, y, valid)``; default
            :func:`fixation_trajectory`.
        screen: screen size in pixels, for ``CALIBRATE_RESULT_SUMMARY``'s ``AVE_ERROR``.
        calibration_error: the simulated eye's offset from each calibration target (fractions of the
            screen), so a calibration has a known error.
        calibration_point_s: how long each calibration point takes (the real routine: about 1 s).

    Use as a context manager, or :meth:`start` / :meth:`stop`. :meth:`drop_clients` closes every
    connection at once (a pulled cable, a crashed server); the server keeps listening.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        rate_hz: float = 60.0,
        trajectory: Callable[[float], tuple[float, float, bool]] | None = None,
        screen: tuple[int, int] = (1920, 1080),
        calibration_error: tuple[float, float] = (0.01, -0.005),
        calibration_point_s: float = 0.02,
    ):
        if not rate_hz > 0:
            raise ValueError(f"rate_hz={rate_hz!r} must be positive")
        self.host, self.port, self.rate_hz = host, port, float(rate_hz)
        self.trajectory = trajectory or fixation_trajectory()
        self.screen = screen
        self.calibration_error = calibration_error
        self.calibration_point_s = calibration_point_s
        self.sent = 0  # REC records sent, all clients together
        self.connections = 0  # connections accepted so far
        self._clients: list[_Client] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._t0 = time.monotonic()

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> GazepointSimulator:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((self.host, self.port))
        srv.listen(4)
        srv.settimeout(0.1)
        self._server = srv
        self.port = srv.getsockname()[1]
        self._stop.clear()
        self._spawn(self._accept_loop)
        self._spawn(self._stream_loop)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.drop_clients()
        if self._server is not None:
            self._server.close()
            self._server = None
        for t in self._threads:
            t.join(timeout=2)
        self._threads = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def drop_clients(self, partial: bytes = b"") -> int:
        """Close every client connection (a disconnect mid-stream); returns how many were closed.

        Args:
            partial: bytes sent just before closing, e.g. half a record (a cable pulled mid-line).
        """
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            if partial:
                c.send(partial)
            c.alive = False
            try:
                c.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.conn.close()
        return len(clients)

    def _spawn(self, target, *args):
        t = threading.Thread(target=target, args=args, daemon=True, name=f"gazepoint-sim-{target.__name__}")
        t.start()
        self._threads.append(t)

    def now(self) -> float:
        """The tracker's clock: seconds since the simulator was made (``TIME``)."""
        return time.monotonic() - self._t0

    # -- server -------------------------------------------------------------------------------------
    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = _Client(conn)
            with self._lock:
                self._clients.append(client)
                self.connections += 1
            self._spawn(self._command_loop, client)

    def _command_loop(self, client: _Client):
        buf = b""
        while client.alive and not self._stop.is_set():
            try:
                chunk = client.conn.recv(4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    self._handle(client, line)
        client.alive = False

    def _handle(self, client: _Client, line: bytes):
        try:
            tag, a = parse_message(line)
        except ValueError:
            client.send(format_message("ERROR", MSG="unparsable command"))
            return
        ident = a.get("ID", "")
        if tag == "SET":
            state = a.get("STATE", "0") == "1"
            if ident.startswith("ENABLE_SEND_") or ident == "CALIBRATE_SHOW":
                client.enabled[ident] = state
                client.send(format_message("ACK", ID=ident, STATE=int(state)))
            elif ident == "CALIBRATE_START":
                client.send(format_message("ACK", ID=ident, STATE=int(state)))
                if state:
                    self._spawn(self._calibrate, client)
            else:
                client.send(format_message("NACK", ID=ident))
        elif tag == "GET":
            if ident == "CALIBRATE_RESULT_SUMMARY":
                ex, ey = self.calibration_error
                err = math.hypot(ex * self.screen[0], ey * self.screen[1])
                client.send(format_message("ACK", ID=ident, AVE_ERROR=f"{err:.2f}", VALID_POINTS=9))
            elif ident == "SCREEN_SIZE":
                client.send(
                    format_message("ACK", ID=ident, X=0, Y=0, WIDTH=self.screen[0], HEIGHT=self.screen[1])
                )
            elif ident.startswith("ENABLE_SEND_"):
                client.send(format_message("ACK", ID=ident, STATE=int(client.enabled.get(ident, False))))
            else:
                client.send(format_message("NACK", ID=ident))
        else:
            client.send(format_message("NACK", ID=ident))

    def _calibrate(self, client: _Client):
        ex, ey = self.calibration_error
        result = {}
        for i, (x, y) in enumerate(CALIBRATION_POINTS, start=1):
            client.send(format_message("CAL", ID="CALIB_START_PT", PT=i, CALX=f"{x:.5f}", CALY=f"{y:.5f}"))
            time.sleep(self.calibration_point_s)
            client.send(format_message("CAL", ID="CALIB_RESULT_PT", PT=i, CALX=f"{x:.5f}", CALY=f"{y:.5f}"))
            gx, gy = f"{x + ex:.5f}", f"{y + ey:.5f}"
            result.update(
                {
                    f"CALX{i}": f"{x:.5f}",
                    f"CALY{i}": f"{y:.5f}",
                    f"LX{i}": gx,
                    f"LY{i}": gy,
                    f"LV{i}": 1,
                    f"RX{i}": gx,
                    f"RY{i}": gy,
                    f"RV{i}": 1,
                }
            )
        client.send(format_message("CAL", ID="CALIB_RESULT", **result))

    def _stream_loop(self):
        period = 1.0 / self.rate_hz
        k = int(self.now() / period) + 1
        while not self._stop.is_set():
            due = k * period
            wait = due - self.now()
            if wait > 0:
                time.sleep(min(wait, 0.05))
                continue
            with self._lock:
                clients = [c for c in self._clients if c.alive and c.enabled.get("ENABLE_SEND_DATA")]
            if clients:
                x, y, valid = self.trajectory(due)
                for c in clients:
                    if c.send(self._record(c, k, due, x, y, valid)):
                        self.sent += 1
            k += 1  # behind schedule: the next records go out at once, none is skipped

    @staticmethod
    def _record(c: _Client, k: int, t: float, x: float, y: float, valid: bool) -> bytes:
        fields = {}
        if c.enabled.get("ENABLE_SEND_COUNTER"):
            fields["CNT"] = k
        if c.enabled.get("ENABLE_SEND_TIME"):
            fields["TIME"] = f"{t:.5f}"
        if c.enabled.get("ENABLE_SEND_POG_BEST"):
            fields.update(BPOGX=f"{x:.5f}", BPOGY=f"{y:.5f}", BPOGV=int(bool(valid)))
        return format_message("REC", **fields)
