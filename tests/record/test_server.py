"""The annotation server without a browser: its HTTP API on loopback, the recording path, faults.

The page's requests are sent as the page sends them (JSON over HTTP to a real uvicorn server); the
tracker is A1's simulated Gazepoint device speaking the Open Gaze API on loopback. Positions are
hand-computed: a screen point maps to image pixel ((x*screen_w - view_x - left) / scale, ...).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from helpers import ROOT, cli, free_port, wait_http
from PIL import Image

SCREEN = {"screen_w": 800, "screen_h": 600, "view_x": 0, "view_y": 0, "dpr": 2}
#: image 64x48 drawn at scale 10 from viewport (80, 60): pixel edge u at 80 + 10 u
GEO = {**SCREEN, "left": 80, "top": 60, "scale": 10, "image_w": 64, "image_h": 48}


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    ramp = np.linspace(90, 150, 64)[None, :, None] + np.zeros((48, 1, 3))  # smooth: the CRF follows the gaze
    for name in ("a.png", "b.png", "c.jpg"):
        Image.fromarray(ramp.astype(np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def _client(u, v):
    """Viewport CSS px of image pixel-edge point (u, v) under GEO."""
    return GEO["left"] + u * GEO["scale"], GEO["top"] + v * GEO["scale"]


def _look(t0, points, hold=0.3, rate=60.0, valid=True):
    """Pointer samples (viewport px) fixating image points for ``hold`` s each, jumping between them."""
    out, t = [], t0
    for u, v in points:
        cx, cy = _client(u, v)
        for _ in range(int(hold * rate)):
            t += 1 / rate
            out.append({"t": t, "cx": cx, "cy": cy, "valid": valid})
    return out, t


class Api:
    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path):
        with urllib.request.urlopen(self.base + path) as r:
            return r.read()

    def post(self, path, body, status=200):
        req = urllib.request.Request(
            self.base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req) as r:
                assert r.status == status
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            assert e.code == status, e.read()
            return json.loads(e.read())


@pytest.fixture
def served(images, tmp_path):
    from gazemonai.record.server import AnnotationSession, ServerThread, make_app
    from gazemonai.record.sources import PointerSource

    def start(annotator="r1", **options):
        session = AnnotationSession(
            images, tmp_path / "gaze.csv", PointerSource(), annotator=annotator, **options
        )
        session.start()
        server = ServerThread(make_app(session))
        started.append((server, session))
        return session, Api(server.start_and_wait())

    started = []
    yield start
    for server, session in started:
        server.stop()
        session.close()


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_image_order_by_name_random_and_list(images, tmp_path):
    from gazemonai.errors import InvalidInputError
    from gazemonai.record.server import image_order

    assert image_order(images) == ["a.png", "b.png", "c.jpg"]
    shuffled = image_order(images, "random", seed=3)
    assert sorted(shuffled) == ["a.png", "b.png", "c.jpg"] and shuffled == image_order(
        images, "random", seed=3
    )
    listing = tmp_path / "order.txt"
    listing.write_text("c\n# picked by the strategy\nb.png\n\nc.jpg\n")
    assert image_order(images, str(listing)) == ["c.jpg", "b.png"]
    listing.write_text("a\nzzz\n")
    with pytest.raises(InvalidInputError, match=r"order.txt, line 2: no image 'zzz'"):
        image_order(images, str(listing))
    with pytest.raises(InvalidInputError, match="--order must be"):
        image_order(images, "by-size")


def test_the_page_api_records_fixations_and_overlay(served, tmp_path):
    session, api = served()
    info = json.loads(api.get("/api/session"))
    assert info["images"] == ["a.png", "b.png", "c.jpg"] and info["source"] == "pointer"
    assert b"annotate.js" in api.get("/")

    t0 = 1000.0
    api.post("/api/begin", {"index": 0, "t": t0, "geometry": GEO, "now": t0})
    samples, t = _look(t0, [(10.5, 12.5), (50.5, 30.5)])
    samples[5]["valid"] = False  # a blink sample: left out, counted
    for i in range(0, len(samples), 6):  # batches, as the page sends them every 100 ms
        assert api.post("/api/samples", {"samples": samples[i : i + 6], "screen": SCREEN})["received"] > 0
    res = api.post("/api/finish", {"index": 0, "t": t + 0.01})
    assert res["rows"] == 2 and res["stats"]["invalid"] == 1
    assert res["seconds"] == pytest.approx(t + 0.01 - t0, abs=1e-3)
    xy = [(f["x"] * 64, f["y"] * 48) for f in res["fixations"]]
    np.testing.assert_allclose(xy, [(10.5, 12.5), (50.5, 30.5)], atol=1e-6)

    rows = _rows(tmp_path / "gaze.csv")
    assert [r["IMAGE"] for r in rows] == ["a.png", "a.png"] and rows[0]["ANNOTATOR"] == "r1"
    assert float(rows[0]["CURRENT_FIX_X"]) == pytest.approx(10.5 / 64)
    overlay = np.asarray(Image.open(io.BytesIO(api.get("/api/overlay/0.png"))))
    assert overlay.shape == (48, 64, 4) and overlay[..., 3].max() == 255  # level outlines drawn opaque
    level1 = np.asarray(Image.open(io.BytesIO(api.get("/api/level/0/1.png")))) > 0
    assert level1[30, 50] and not level1[47, 0]  # the longer fixation is in level 1, a corner is not

    # the raw samples and the events of the recording are kept
    session.flush()
    raw = _rows(session.raw_path)
    assert len(raw) == len(samples) and raw[0]["image"] == "a.png"
    events = [json.loads(x)["event"] for x in session.events_path.read_text().splitlines()]
    assert events == ["begin", "finish"]


def test_bad_requests_get_a_clear_message(served):
    session, api = served()
    assert "JSON object" in api.post("/api/begin", "x", status=400)["error"]
    req = urllib.request.Request(api.base + "/api/begin", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "not JSON" in json.loads(e.value.read())["error"]
    assert "not on screen" in api.post("/api/finish", {"index": 1, "t": 1.0}, status=400)["error"]
    assert "0..2" in api.post("/api/begin", {"index": 7, "t": 1.0, "geometry": GEO}, status=400)["error"]
    bad = {**GEO, "scale": 0}
    assert "scale" in api.post("/api/begin", {"index": 0, "t": 1.0, "geometry": bad}, status=400)["error"]
    missing = {k: v for k, v in GEO.items() if k != "left"}
    assert "left" in api.post("/api/begin", {"index": 0, "t": 1.0, "geometry": missing}, status=400)["error"]


def test_a_failed_image_is_skipped_and_counted(served):
    session, api = served()
    res = api.post("/api/skip", {"index": 1, "reason": "the browser could not decode it"})
    assert res == {"skipped": 1, "image": "b.png"}
    assert session.status()["skipped"]["failed_to_load"] == 1
    assert session.summary()["skipped"]["failed_to_load"] == ["b.png"]


def test_no_fixation_writes_nothing_and_says_so(served, tmp_path):
    session, api = served()
    api.post("/api/begin", {"index": 0, "t": 10.0, "geometry": GEO})
    samples, t = _look(10.0, [(10.5, 12.5)], valid=False)
    api.post("/api/samples", {"samples": samples, "screen": SCREEN})
    res = api.post("/api/finish", {"index": 0, "t": t + 0.01})
    assert res["rows"] == 0 and "press R" in res["message"] and res["stats"]["invalid"] == len(samples)
    assert not (tmp_path / "gaze.csv").exists() or not _rows(tmp_path / "gaze.csv")


def test_a_resized_window_splits_the_mapping(served):
    session, api = served()
    api.post("/api/begin", {"index": 0, "t": 0.0, "geometry": GEO})
    first, t = _look(0.0, [(10.5, 12.5)])
    api.post("/api/samples", {"samples": first, "screen": SCREEN})
    # the window shrinks: the image is now drawn at scale 5 from (40, 30); the same screen spot is
    # another image pixel, and the next look is mapped through the new placement
    small = {**GEO, "left": 40, "top": 30, "scale": 5}
    api.post("/api/geometry", {"index": 0, "t": t, "geometry": small, "reason": "resize"})
    second = [
        {"t": t + (k + 1) / 60, "cx": 40 + 50.5 * 5, "cy": 30 + 30.5 * 5, "valid": True} for k in range(18)
    ]
    api.post("/api/samples", {"samples": second, "screen": SCREEN})
    res = api.post("/api/finish", {"index": 0, "t": second[-1]["t"] + 0.01})
    assert res["resized"] == 1 and res["geometry_changes"] == 1
    xy = [(f["x"] * 64, f["y"] * 48) for f in res["fixations"]]
    np.testing.assert_allclose(xy, [(10.5, 12.5), (50.5, 30.5)], atol=1e-6)


def test_images_already_in_the_csv_are_kept_and_left_out(served, tmp_path):
    session, api = served("r1")
    api.post("/api/begin", {"index": 0, "t": 0.0, "geometry": GEO})
    samples, t = _look(0.0, [(10.5, 12.5)])
    api.post("/api/samples", {"samples": samples, "screen": SCREEN})
    api.post("/api/finish", {"index": 0, "t": t})
    before = _rows(tmp_path / "gaze.csv")

    again, _ = served("r1")  # the same annotator comes back: a.png is left out, its rows stay
    assert again.already == ["a.png"] and again.images == ["b.png", "c.jpg"]
    other, api2 = served("r2")  # another annotator sees every image; both sets of rows are kept
    assert other.images[0] == "a.png"
    api2.post("/api/begin", {"index": 0, "t": 0.0, "geometry": GEO})
    samples, t = _look(0.0, [(50.5, 30.5)])
    api2.post("/api/samples", {"samples": samples, "screen": SCREEN})
    api2.post("/api/finish", {"index": 0, "t": t})
    after = _rows(tmp_path / "gaze.csv")
    assert after[: len(before)] == before
    assert [r["ANNOTATOR"] for r in after] == ["r1", "r2"]


def test_replay_makes_the_same_rows_without_a_page(served, images, tmp_path):
    from gazemonai.record.server import replay_recording

    session, api = served()
    for i, points in ((0, [(10.5, 12.5), (30.5, 20.5)]), (2, [(50.5, 30.5)])):
        t0 = 100.0 * (i + 1)
        api.post("/api/begin", {"index": i, "t": t0, "geometry": GEO})
        samples, t = _look(t0, points)
        api.post("/api/samples", {"samples": samples, "screen": SCREEN})
        api.post("/api/finish", {"index": i, "t": t})
    session.close()
    out = tmp_path / "replayed.csv"
    summary = replay_recording(images, out, session.raw_path, session.events_path, annotator="r1")
    assert summary["images"] == 2 and len(summary["results"]) == 2
    key = ("IMAGE", "CURRENT_FIX_X", "CURRENT_FIX_Y", "CURRENT_FIX_DURATION", "SECONDS")
    assert [[r[k] for k in key] for r in _rows(out)] == [
        [r[k] for k in key] for r in _rows(tmp_path / "gaze.csv")
    ]

    # the same through the command line
    replay = ["--source", "replay", "--replay", session.raw_path, "--events", session.events_path]
    proc = cli("annotate", "--images", images, "--out", tmp_path / "cli.csv", *replay, "--annotator", "r1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1])["images"] == 2
    assert [[r[k] for k in key] for r in _rows(tmp_path / "cli.csv")] == [
        [r[k] for k in key] for r in _rows(out)
    ]


def test_a_tracker_that_disconnects_mid_image_loses_nothing(images, tmp_path):
    from gazemonai.record.gazepoint import GazepointSimulator
    from gazemonai.record.server import AnnotationSession
    from gazemonai.record.sources import GazepointSource

    # the simulated eye fixates the screen point that is image pixel (30.5, 20.5) under GEO
    x, y = (GEO["left"] + 30.5 * 10) / 800, (GEO["top"] + 20.5 * 10) / 600
    sim = GazepointSimulator(rate_hz=60, trajectory=lambda t: (x, y, True)).start()
    source = GazepointSource(port=sim.port, reconnect_s=0.1)
    session = AnnotationSession(images, tmp_path / "gaze.csv", source, annotator="r1")
    try:
        session.start()
        assert source.wait_connected(10)
        calibration = session.tracker_calibration()  # the tracker's own, before the page's validation
        assert calibration["supported"] and calibration["valid_points"] == 9
        assert calibration["ave_error_px"] == pytest.approx(np.hypot(0.01 * 1920, 0.005 * 1080), abs=0.5)
        while not session.samples:
            time.sleep(0.01)
        session.begin_image(0, time.time(), GEO)
        time.sleep(0.5)
        sim.stop()  # the tracker goes away mid-image
        deadline = time.monotonic() + 10
        while session.status()["connected"] and time.monotonic() < deadline:
            time.sleep(0.02)
        status = session.status()
        assert not status["connected"] and status["disconnects"] == 1
        res = session.finish_image(0, time.time())
    finally:
        session.close()
        sim.stop()
    assert res["disconnected"] and res["rows"] == 1
    assert (res["fixations"][0]["x"] * 64, res["fixations"][0]["y"] * 48) == pytest.approx(
        (30.5, 20.5), abs=0.01
    )
    assert len(_rows(session.raw_path)) == res["stats"]["samples"] > 20


def test_the_command_refuses_bad_options(images, tmp_path, capsys):
    import socket

    from gazemonai.cli import main

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    for args, message in (
        (["--images", images, "--out", tmp_path / "g.csv", "--port", busy.getsockname()[1]], "cannot listen"),
        (["--images", tmp_path / "none", "--out", tmp_path / "g.csv"], "--images"),
        (["--images", images, "--out", tmp_path / "g.csv", "--source", "webcam"], "--source must be"),
        (["--images", images, "--out", tmp_path / "g.csv", "--source", "replay"], "needs --replay"),
        (["--images", images, "--out", tmp_path, "--source", "pointer"], "is a folder"),
        (["--images", images, "--out", tmp_path / "g.csv", "--port", "0"], "--port"),
        (["--images", images, "--out", tmp_path / "g.csv", "--order", "nope"], "--order must be"),
        (["--images", images, "--out", tmp_path / "g.csv", "--annotator", "a,b"], "--annotator"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["annotate", *map(str, args)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("gazemonai: error:") and message in err, (args, err)
    busy.close()


def test_the_command_serves_the_page_until_stopped(images, tmp_path):
    port = free_port()
    out = tmp_path / "gaze.csv"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gazemonai",
            "annotate",
            "--images",
            str(images),
            "--out",
            str(out),
            "--port",
            str(port),
            "--annotator",
            "r1",
        ],  # fmt: skip
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/session", proc, seconds=120)
        api = Api(port)
        assert json.loads(api.get("/api/session"))["images"] == ["a.png", "b.png", "c.jpg"]
        api.post("/api/begin", {"index": 2, "t": 5.0, "geometry": GEO})
        samples, t = _look(5.0, [(20.5, 20.5)])
        api.post("/api/samples", {"samples": samples, "screen": SCREEN})
        assert api.post("/api/finish", {"index": 2, "t": t + 0.01})["rows"] == 1
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    assert f"http://127.0.0.1:{port}/" in stdout
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["images"] == 1 and summary["annotator"] == "r1" and summary["seconds_mean"] > 0
    assert [r["IMAGE"] for r in _rows(out)] == ["c.jpg"]
