"""Record step 0: where the samples come from, behind one interface (``--source``).

- ``gazepoint``: a Gazepoint tracker through its Open Gaze API (XML over TCP; :mod:`.gazepoint`).
- ``pointer``: the mouse pointer as a stand-in for gaze; the page posts the samples
  (:meth:`PointerSource.push`).
- ``replay``: a raw sample file (:func:`~.samples.write_raw_samples`) streamed at its recorded rate.

A source calls ``on_sample`` from its own thread for every sample, in order. Faults are messages, not
exceptions on that thread: a tracker that drops the connection sets :attr:`GazeSource.connected` to
False, appends a line to :attr:`GazeSource.messages` (and calls ``on_status``), discards the half-read
line it was parsing, and reconnects every ``reconnect_s``; the samples already delivered are untouched.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable

from ..errors import GazemonaiError, InvalidInputError
from .gazepoint import DEFAULT_PORT, format_message, parse_message
from .samples import GazeSample, read_raw_samples

__all__ = [
    "GazeSource",
    "PointerSource",
    "ReplaySource",
    "GazepointSource",
    "TrackerError",
    "SOURCES",
    "make_source",
]

log = logging.getLogger(__name__)


class TrackerError(GazemonaiError, ConnectionError):
    """The eye tracker cannot be reached or does not answer as its protocol says."""


class GazeSource:
    """The interface every gaze source implements.

    Args:
        on_status: optional ``f(message)`` called on connection changes and faults (also kept in
            :attr:`messages`).
    """

    name = "base"

    def __init__(self, on_status: Callable[[str], None] | None = None):
        self.messages: list[str] = []
        self.callback_errors = 0
        self.on_status = on_status
        self._on_sample: Callable[[GazeSample], None] | None = None

    def _deliver(self, sample: GazeSample) -> None:
        """Hand ``sample`` to ``on_sample``; an error there is logged and counted, never ends the stream."""
        callback = self._on_sample
        if callback is None:
            return
        try:
            callback(sample)
        except Exception:
            self.callback_errors += 1
            log.exception("%s source: the sample callback failed on %s", self.name, sample)
            if self.callback_errors == 1:
                self._status("the sample callback failed (logged); the stream goes on")

    def _status(self, message: str) -> None:
        self.messages.append(message)
        log.info("%s source: %s", self.name, message)
        if self.on_status is not None:
            self.on_status(message)

    def start(self, on_sample: Callable[[GazeSample], None]) -> None:
        """Begin streaming; ``on_sample`` is called (from the source's thread) for every sample."""
        self._on_sample = on_sample

    def stop(self) -> None:
        """Stop streaming and release the connection; safe to call twice."""
        self._on_sample = None

    @property
    def connected(self) -> bool:
        return self._on_sample is not None

    def calibrate(self) -> dict | None:
        """Run the tracker's own calibration; its result, or None when the source has none."""
        return None


class PointerSource(GazeSource):
    """The mouse pointer as gaze: the page posts samples (normalised screen positions) to :meth:`push`."""

    name = "pointer"

    def push(self, sample: GazeSample) -> None:
        callback = self._on_sample
        if callback is None:
            raise InvalidInputError("pointer source: a sample arrived before start() (or after stop())")
        callback(sample)


class ReplaySource(GazeSource):
    """A recorded raw sample file, streamed at its recorded rate.

    Args:
        path: a raw sample CSV (:func:`~gazemonai.record.samples.read_raw_samples`).
        speed: playback speed (2 = twice as fast; ``float("inf")`` = as fast as possible).
        rebase: when True, sample times are shifted to start at the moment :meth:`start` is called
            (``time.monotonic()``), so they share the clock of a live page; when False they keep the
            file's clock.
    """

    name = "replay"

    def __init__(self, path, speed: float = 1.0, rebase: bool = False, on_status=None):
        super().__init__(on_status)
        if not speed > 0:
            raise InvalidInputError(f"replay source: speed={speed!r} must be positive")
        self.path, self.speed, self.rebase = path, float(speed), rebase
        self.samples = read_raw_samples(path)  # read now: a broken file is an error before the page opens
        self.delivered = 0
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, on_sample):
        super().start(on_sample)
        self._stop.clear()
        self._done.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="replay-source")
        self._thread.start()

    def _run(self):
        if not self.samples:
            self._status(f"{self.path}: no samples to replay")
            self._done.set()
            return
        t_file0 = self.samples[0].t
        t_wall0 = time.monotonic()
        shift = t_wall0 - t_file0 if self.rebase else 0.0
        for s in self.samples:
            if self._stop.is_set():
                break
            if self.speed != float("inf"):
                wait = t_wall0 + (s.t - t_file0) / self.speed - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    break
            if self._on_sample is None:
                break
            self._deliver(GazeSample(s.t + shift, s.x, s.y, s.valid) if shift else s)
            self.delivered += 1
        self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the whole file has been streamed (True) or ``timeout`` passes (False)."""
        return self._done.wait(timeout)

    def stop(self):
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        super().stop()

    @property
    def connected(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class GazepointSource(GazeSource):
    """A Gazepoint eye tracker through the Open Gaze API (XML over TCP; see :mod:`.gazepoint`).

    On connecting it enables ``ENABLE_SEND_TIME``, ``ENABLE_SEND_COUNTER``, ``ENABLE_SEND_POG_BEST`` and
    ``ENABLE_SEND_DATA`` and turns every ``<REC>`` into a :class:`GazeSample` (``TIME``, ``BPOGX``,
    ``BPOGY``, ``BPOGV``). When the connection drops it reports it, discards the partial line and
    reconnects every ``reconnect_s`` until :meth:`stop`.

    Args:
        host: the Gazepoint Control server's address.
        port: its port (4242 by default).
        reconnect_s: pause between connection attempts.
        timeout_s: connect timeout, and how long :meth:`calibrate` waits for an answer per point.
        on_status: optional ``f(message)`` for connection changes.

    Counters: ``received`` (samples delivered), ``skipped`` (lines that were not records: ACKs, CAL,
    or unparsable, the latter also logged), ``reconnects``; ``gaps`` counts jumps in ``CNT`` (records the
    tracker sent that never arrived, e.g. while disconnected).
    """

    name = "gazepoint"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        reconnect_s: float = 0.5,
        timeout_s: float = 5.0,
        on_status=None,
    ):
        super().__init__(on_status)
        self.host, self.port = host, int(port)
        self.reconnect_s, self.timeout_s = reconnect_s, timeout_s
        self.received = self.skipped = self.reconnects = self.gaps = 0
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._replies: queue.Queue = queue.Queue()
        self._last_cnt: int | None = None

    # -- connection -----------------------------------------------------------------------------------
    def start(self, on_sample=None):
        """Connect (in the background) and stream; ``on_sample`` may be None to connect only."""
        self._on_sample = on_sample
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True, name="gazepoint-source")
            self._thread.start()

    def stop(self):
        self._stop.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.timeout_s + 1)
        self._thread = None
        self._on_sample = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def send(self, tag: str, **attributes) -> None:
        """Send one API command (``SET``/``GET``); :class:`TrackerError` when not connected."""
        sock = self._sock
        if sock is None or not self.connected:
            raise TrackerError(f"Gazepoint tracker at {self.host}:{self.port} is not connected")
        with self._send_lock:
            sock.sendall(format_message(tag, **attributes))

    def _run(self):
        first = True
        while not self._stop.is_set():
            try:
                sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            except OSError as e:
                if first:
                    self._status(
                        f"cannot reach the Gazepoint tracker at {self.host}:{self.port} ({e}); retrying"
                    )
                    first = False
                self._stop.wait(self.reconnect_s)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)
            self._sock = sock
            self._connected.set()
            first = True
            self._status(f"connected to the Gazepoint tracker at {self.host}:{self.port}")
            try:
                for ident in (
                    "ENABLE_SEND_TIME",
                    "ENABLE_SEND_COUNTER",
                    "ENABLE_SEND_POG_BEST",
                    "ENABLE_SEND_DATA",
                ):
                    self.send("SET", ID=ident, STATE=1)
                self._read(sock)
            except OSError:
                pass
            self._connected.clear()
            self._sock = None
            sock.close()
            if self._stop.is_set():
                break
            self.reconnects += 1
            self._status(
                f"the Gazepoint tracker at {self.host}:{self.port} disconnected after "
                f"{self.received} samples (kept); reconnecting"
            )
            self._stop.wait(self.reconnect_s)

    def _read(self, sock: socket.socket):
        buf = b""
        while not self._stop.is_set():
            chunk = sock.recv(65536)
            if not chunk:
                return  # the partial line in buf is discarded with it: it can never be completed
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.strip():
                    self._line(line)

    def _line(self, line: bytes):
        try:
            tag, a = parse_message(line)
        except ValueError as e:
            self.skipped += 1
            log.warning("gazepoint source: %s", e)
            return
        if tag != "REC":
            self.skipped += 1
            self._replies.put((tag, a))
            return
        try:
            t = float(a["TIME"])
            x, y = float(a["BPOGX"]), float(a["BPOGY"])
            valid = a.get("BPOGV", "0") == "1"
        except (KeyError, ValueError):
            self.skipped += 1
            log.warning("gazepoint source: a record without TIME/BPOGX/BPOGY: %r", line[:120])
            return
        if "CNT" in a:
            cnt = int(a["CNT"])
            if self._last_cnt is not None and cnt > self._last_cnt + 1:
                self.gaps += cnt - self._last_cnt - 1
            self._last_cnt = cnt
        self.received += 1
        self._deliver(GazeSample(t, x, y, valid))

    # -- calibration ------------------------------------------------------------------------------------
    def _await(self, tag: str, ident: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrackerError(
                    f"Gazepoint tracker at {self.host}:{self.port}: no {tag} {ident} within {timeout} s"
                )
            try:
                got, a = self._replies.get(timeout=left)
            except queue.Empty:
                continue
            if got == tag and a.get("ID") == ident:
                return a

    def calibrate(self, points: int = 9, show: bool = True) -> dict:
        """Run the tracker's 9-point calibration and return its result.

        Returns:
            ``{"points": [{"x", "y", "left": (x, y, valid), "right": (x, y, valid)}], "ave_error_px": float,
            "valid_points": int}`` (positions as fractions of the screen).
        """
        if not self.connected:
            if self._thread is None:
                self.start(self._on_sample)
            if not self.wait_connected(self.timeout_s):
                raise TrackerError(
                    f"Gazepoint tracker at {self.host}:{self.port} is not connected; cannot calibrate"
                )
        while not self._replies.empty():
            self._replies.get_nowait()
        if show:
            self.send("SET", ID="CALIBRATE_SHOW", STATE=1)
        self.send("SET", ID="CALIBRATE_START", STATE=1)
        res = self._await("CAL", "CALIB_RESULT", self.timeout_s * (points + 1))
        if show:
            self.send("SET", ID="CALIBRATE_SHOW", STATE=0)
        self.send("GET", ID="CALIBRATE_RESULT_SUMMARY")
        summary = self._await("ACK", "CALIBRATE_RESULT_SUMMARY", self.timeout_s)
        out = []
        i = 1
        while f"CALX{i}" in res:

            def eye(e, i=i):
                return float(res[f"{e}X{i}"]), float(res[f"{e}Y{i}"]), res.get(f"{e}V{i}") == "1"

            out.append(
                {
                    "x": float(res[f"CALX{i}"]),
                    "y": float(res[f"CALY{i}"]),
                    "left": eye("L"),
                    "right": eye("R"),
                }
            )
            i += 1
        return {
            "points": out,
            "ave_error_px": float(summary.get("AVE_ERROR", "nan")),
            "valid_points": int(summary.get("VALID_POINTS", "0")),
        }


SOURCES = {"gazepoint": GazepointSource, "pointer": PointerSource, "replay": ReplaySource}


def make_source(name: str, **options) -> GazeSource:
    """The source ``name`` (``gazepoint``, ``pointer``, ``replay``) built with ``options``.

    Raises:
        InvalidInputError: an unknown name, or options that source does not take.
    """
    cls = SOURCES.get(name)
    if cls is None:
        raise InvalidInputError(f"--source {name!r} is not one of {', '.join(SOURCES)}")
    try:
        return cls(**options)
    except TypeError as e:
        raise InvalidInputError(f"--source {name}: {e}") from None
