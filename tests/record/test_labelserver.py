"""The annotation page's ``--server`` mode against a real MONAI Label server on loopback.

The app starts with no model (no training here); its ``first`` strategy then gives the first image
by name with neither gaze nor a mask, so the order is known. The page's requests go over HTTP to a
real annotation server (``record.server.make_app``) as the page sends them; its pointer samples
look at hand-placed image points.
"""

from __future__ import annotations

import csv
import http.server
import io
import json
import threading

import numpy as np
import pytest
from apps.test_monailabel_loop import MLBIN, Server, gaze_csv, put_label, request
from helpers import cli, free_port
from PIL import Image

IMAGES = [f"img_{i}" for i in range(6)]
H, W = 40, 56
SCREEN = {"screen_w": 800, "screen_h": 600, "view_x": 0, "view_y": 0, "dpr": 1}
GEO = {**SCREEN, "left": 100, "top": 50, "scale": 5, "image_w": W, "image_h": H}


@pytest.fixture(scope="module")
def label_server(tmp_path_factory):
    if not (MLBIN / "monailabel").exists():
        pytest.skip("MONAI Label environment absent: run `make monailabel-env` (make test builds it)")
    base = tmp_path_factory.mktemp("page")
    studies = base / "studies"
    studies.mkdir()
    ramp = np.linspace(90, 150, W)[None, :, None] + np.zeros((H, 1, 3))
    for name in IMAGES:
        Image.fromarray(ramp.astype(np.uint8)).save(studies / f"{name}.png")
    server = Server(studies, base / "work", base)
    server.start()
    try:
        yield server
    finally:
        server.kill()


class Page:
    """The annotation server in ``--server`` mode on loopback, driven as the page drives it."""

    def __init__(self, url, out, strategy="first", annotator="pg"):
        from gazemonai.record.labelserver import LabelServer
        from gazemonai.record.server import AnnotationSession, ServerThread, make_app
        from gazemonai.record.sources import PointerSource

        self.ls = LabelServer(url, strategy, out.with_name(out.stem + "_images"))
        self.ls.connect()
        self.session = AnnotationSession(
            self.ls.cache_dir, out, PointerSource(), annotator=annotator, label_server=self.ls
        )
        self.session.start()
        self.thread = ServerThread(make_app(self.session))
        self.base = f"http://127.0.0.1:{self.thread.start_and_wait()}"
        self.t = 1000.0

    def post(self, path, body):
        status, data = request(
            self.base + path, "POST", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        assert status == 200, data
        return json.loads(data)

    def look(self, index, points, geometry=GEO):
        """Show image ``index``, fixate image pixel-edge ``points`` 0.3 s each, press the key."""
        self.post("/api/begin", {"index": index, "t": self.t, "geometry": geometry, "now": self.t})
        samples = []
        for u, v in points:
            for _ in range(18):
                self.t += 1 / 60
                samples.append(
                    {"t": self.t, "cx": GEO["left"] + u * GEO["scale"], "cy": GEO["top"] + v * GEO["scale"]}
                )
        self.post("/api/samples", {"samples": samples, "screen": SCREEN})
        self.t += 0.01
        return self.post("/api/finish", {"index": index, "t": self.t})

    def close(self):
        self.thread.stop()
        return self.session.close()


def rows_of(data: bytes, image: str, annotator: str):
    return [
        r
        for r in csv.DictReader(io.StringIO(data.decode()))
        if r["IMAGE"] == image and r["ANNOTATOR"] == annotator
    ]


def test_images_come_in_the_strategy_order_and_the_gaze_lands_in_the_datastore(label_server, tmp_path):
    url = label_server.url
    # another annotator's gaze on img_1: the `first` strategy passes it over
    first_rows = [{"IMAGE": "img_1.png", "CURRENT_FIX_INDEX": 1, "CURRENT_FIX_X": 0.5, "CURRENT_FIX_Y": 0.5,
                   "CURRENT_FIX_DURATION": 300, "IMAGE_HEIGHT": H, "IMAGE_WIDTH": W}]  # fmt: skip
    assert put_label(url, "img_1", "gaze", "img_1.csv", gaze_csv(first_rows, "other"))[0] == 200
    out = tmp_path / "gaze.csv"
    page = Page(url, out)
    try:
        info = json.loads(request(page.base + "/api/session")[1])
        assert info["server"] == url and info["strategy"] == "first" and info["images"] == []
        shown = []
        for k in range(2):
            nxt = page.post("/api/next", {})
            assert nxt["index"] == k and nxt["strategy"] == "first"
            shown.append(nxt["image"])
            assert (page.ls.cache_dir / nxt["image"]).read_bytes() == (
                label_server.studies / nxt["image"]
            ).read_bytes()
            status, body = request(page.base + f"/api/image/{k}")
            assert status == 200 and body[:4] == b"\x89PNG"
            res = page.look(k, [(10.5, 12.5), (40.5, 30.5)])
            assert res["rows"] == 2 and res["server"] == {"saved": True, "server": url}, res
        assert shown == ["img_0.png", "img_2.png"]
        local = out.read_bytes()
        for name in shown:
            stored = page.ls.get_gaze(name[:-4])
            assert stored is not None
            mine, expected = rows_of(stored, name, "pg"), rows_of(local, name, "pg")
            assert len(mine) == 2 and [{k: r[k] for k in expected[0]} for r in mine] == expected, (
                mine,
                expected,
            )
            assert float(mine[1]["CURRENT_FIX_X"]) == pytest.approx(40.5 / W)
        objects = page.ls.datastore()
        assert objects["img_0"]["labels"]["gaze"]["info"]["annotators"] == ["pg"]
        assert page.post("/api/next", {})["image"] == "img_3.png"
        from gazemonai.record.labelserver import LabelServer

        listing = LabelServer(url, "listing", tmp_path / "listing")  # the datastore's own order
        assert listing.next_image("pg", set())["id"] == "img_3"  # img_0..2 have gaze
        assert listing.next_image("pg", {"img_3"})["id"] == "img_4"
        default = LabelServer(url, "disagreement", tmp_path / "d")  # the default, before any model
        default.connect()
        pick = default.next_image("pg", set())
        assert pick["id"] == "img_3" and "no model trained yet" in pick["reason"], pick
    finally:
        summary = page.close()
    assert summary["uploaded"] == 2 and summary["upload_pending"] == {}


def test_a_refused_or_unreachable_upload_keeps_the_local_rows_and_is_retried(label_server, tmp_path):
    url = label_server.url
    out = tmp_path / "gaze.csv"
    page = Page(url, out, strategy="first", annotator="pr")
    try:
        # the page reports a size other than the image's: the server's 422 names it, nothing stored there
        nxt = page.post("/api/next", {})
        name = nxt["image"]
        res = page.look(nxt["index"], [(5.5, 5.5)], {**GEO, "image_w": W + 1})
        assert res["rows"] == 1 and "error" in res["server"]
        assert (
            f"gaze of {name[:-4]}" in res["server"]["error"]
            and f"differ from the image's {H}x{W}" in res["server"]["error"]
        )
        assert len(rows_of(out.read_bytes(), name, "pr")) == 1  # the local copy is kept
        stored = page.ls.get_gaze(name[:-4])
        assert stored is None or not rows_of(stored, name, "pr")
        assert page.post("/api/retry", {})["pending"].keys() == {name}  # refused again: still listed

        # the server unreachable while the next image is saved: kept, then uploaded by the retry
        nxt2 = page.post("/api/next", {})
        # `first` names the refused image again (no gaze there): the page goes on with the listing's next
        assert nxt2["image"] != name and "already shown here" in nxt2["reason"], nxt2
        page.ls.url = f"http://127.0.0.1:{free_port()}"
        res2 = page.look(nxt2["index"], [(20.5, 20.5)])
        assert res2["rows"] == 1 and "not reachable" in res2["server"]["error"]
        page.ls.url = url
        retried = page.post("/api/retry", {})
        assert retried["saved"] == [nxt2["image"]] and set(retried["pending"]) == {name}
        stored = page.ls.get_gaze(nxt2["image"][:-4])
        assert rows_of(stored, nxt2["image"], "pr") == rows_of(out.read_bytes(), nxt2["image"], "pr")
    finally:
        summary = page.close()
    assert set(summary["upload_pending"]) == {name} and summary["uploaded"] == 1


def test_a_bad_server_is_a_one_line_error_before_the_session(label_server, tmp_path):
    out = tmp_path / "g.csv"
    silent = f"http://127.0.0.1:{free_port()}"
    res = cli("annotate", "--server", silent, "--out", out)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gazemonai: error:") and "not reachable" in err[0], err

    handler = http.server.SimpleHTTPRequestHandler  # an HTTP server that is not MONAI Label
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        res = cli("annotate", "--server", f"http://127.0.0.1:{other.server_port}", "--out", out)
    finally:
        other.shutdown()
    assert res.returncode == 2 and "not a MONAI Label server" in res.stderr, res.stderr

    res = cli("annotate", "--server", label_server.url, "--out", out, "--strategy", "bogus")
    assert res.returncode == 2 and "--strategy must be one of" in res.stderr, res.stderr
    res = cli("annotate", "--server", label_server.url, "--out", out, "--images", tmp_path)
    assert res.returncode == 2 and "--images goes without --server" in res.stderr, res.stderr
    assert not out.exists()


def test_the_command_serves_the_page_on_the_server_until_stopped(label_server, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from helpers import ROOT, wait_http

    port, out = free_port(), tmp_path / "cmd" / "gaze.csv"
    out.parent.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gazemonai", "annotate", "--server", label_server.url, "--strategy", "first",
         "--out", str(out), "--port", str(port), "--annotator", "cmd"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/api/session", proc, seconds=120)
        status, body = request(f"http://127.0.0.1:{port}/api/session")
        info = json.loads(body)
        assert (info["server"], info["strategy"], info["images"]) == (label_server.url, "first", [])
        status, body = request(
            f"http://127.0.0.1:{port}/api/next", "POST", b"{}", {"Content-Type": "application/json"}
        )
        name = json.loads(body)["image"]
        assert (tmp_path / "cmd" / "gaze_images" / name).is_file()  # the cache beside --out
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    assert f"images from {label_server.url} (strategy first)" in stdout
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["server"] == label_server.url and summary["uploaded"] == 0


def test_the_page_in_a_browser_shows_the_server_and_saves_there(label_server, tmp_path):
    import os
    import shutil
    from pathlib import Path

    chromium = os.environ.get("GAZEMONAI_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if not Path(chromium).is_file():
        pytest.skip(f"no chromium at {chromium} (`make test` installs it with apt as root)")
    out = tmp_path / "gaze.csv"
    page_server = Page(label_server.url, out, strategy="first", annotator="br")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_context(viewport={"width": 800, "height": 600}).new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_server.base + "/")
            page.wait_for_function("window.gazemonai && window.gazemonai.phase === 'start'", timeout=20000)
            text = page.inner_text("#text")
            assert label_server.url in text and "first" in text, text
            page.keyboard.press("s")  # no calibration: the first image, asked from the server
            page.wait_for_function("window.gazemonai.phase === 'image'", timeout=20000)
            name = page.evaluate("window.gazemonai.images[0]")
            progress = page.inner_text("#progress")
            assert name in progress and "first" in progress and label_server.url in progress, progress
            g = page.evaluate("window.gazemonai.geometry")
            for u, v in ((20.5, 15.5), (40.5, 25.5)):
                page.mouse.move(g["left"] + u * g["scale"], g["top"] + v * g["scale"])
                page.wait_for_timeout(450)
            page.keyboard.press("Space")
            page.wait_for_function("window.gazemonai.phase === 'result'", timeout=20000)
            assert "Saved to the MONAI Label server" in page.inner_text("#text"), page.inner_text("#text")
            page.keyboard.press("Space")  # the next image, asked from the server again
            page.wait_for_function("window.gazemonai.phase === 'image' && window.gazemonai.index === 1")
            assert page.evaluate("window.gazemonai.images[1]") != name
            browser.close()
        assert not errors, errors
        stored = page_server.ls.get_gaze(name[:-4])
        local = rows_of(out.read_bytes(), name, "br")
        assert len(local) >= 2 and [{k: r[k] for k in local[0]} for r in rows_of(stored, name, "br")] == local
    finally:
        page_server.close()
