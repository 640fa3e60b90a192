"""Record step 5: the annotation page and its local server (``gazemonai annotate``).

One :class:`AnnotationSession` is the recording path: it takes the page's events (an image shown
with its view geometry, a zoom / pan / resize, the key press that ends the image, a calibration)
and the gaze source's samples, detects the fixations of each image
(:func:`~gazemonai.record.fixations.detect_fixations`), appends them to the GazeMedSeg CSV with
:class:`~gazemonai.record.writer.GazeCsvWriter` and returns the image's heatmap and pseudo-mask
levels, made by :func:`~gazemonai.gaze.pseudo_masks.make_pseudo_masks` exactly as
``gazemonai pseudo-masks`` makes them from the written rows, for the page to show over the image.

:func:`make_app` wraps a session in a Starlette application that serves the page
(``record/static``: plain HTML, CSS and JavaScript) and a small JSON API; :func:`serve` runs it with
uvicorn on loopback. Every event the page sends is also appended to
``<raw_dir>/<recording>.events.jsonl`` and the raw samples go to ``<raw_dir>/<recording>.csv``, so
:func:`replay_recording` can make the same CSV again from them with no browser (the demo does).

Clocks: samples carry their source's clock; the page stamps its events with its own
(``performance.timeOrigin + performance.now()``, seconds). The pointer source's samples come from the
page, so the two clocks are one. For another source, both clocks are tied to the server's by the
smallest observed ``arrival - stamp`` (:class:`ClockLink`: network and queue delays are never
negative, so the minimum is the closest estimate of the offset).
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import GazemonaiError, ImageReadError, InvalidInputError, MissingInputError
from ..gaze.pseudo_masks import PRESETS, PseudoMaskConfig, make_pseudo_masks
from ..prep.io import IMAGE_EXTENSIONS, read_image, validate_image_name
from .fixations import detect_fixations
from .geometry import ViewGeometry, geometry_from_dict, viewport_to_screen
from .samples import GazeSample

__all__ = [
    "AnnotationSession",
    "ClockLink",
    "image_order",
    "make_app",
    "overlay_rgba",
    "replay_recording",
    "serve",
]

logger = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
#: how long ``finish_image`` waits for the source's samples to pass the key press (tracker latency)
SAMPLE_WAIT_S = 0.1
#: level outline colours of the overlay (RGB), level 1 first
LEVEL_COLOURS = ((255, 255, 255), (0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 255, 0))


class ClockLink:
    """Offset from a remote clock to the local one: the smallest ``local - remote`` seen so far."""

    def __init__(self):
        self.offset: float | None = None

    def observe(self, remote_t: float, local_t: float | None = None) -> None:
        d = (time.time() if local_t is None else local_t) - remote_t
        if self.offset is None or d < self.offset:
            self.offset = d

    def to_local(self, remote_t: float) -> float:
        return remote_t + (self.offset or 0.0)

    def to_remote(self, local_t: float) -> float:
        return local_t - (self.offset or 0.0)


def image_order(images_dir: str | os.PathLike, order: str = "name", seed: int = 0) -> list[str]:
    """The image file names of ``images_dir`` in the order they are shown.

    Args:
        images_dir: folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.tif``, ``.tiff``).
        order: ``"name"`` (sorted), ``"random"`` (shuffled with ``seed``) or the path of a text file
            of image names or ids, one a line (e.g. what an active-learning strategy picked).
        seed: the shuffle's seed for ``"random"``.
    """
    folder = Path(images_dir)
    if not folder.is_dir():
        raise MissingInputError(f"--images {folder}: not a folder")
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not names:
        raise InvalidInputError(f"--images {folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    if order == "name":
        return names
    if order == "random":
        random.Random(seed).shuffle(names)
        return names
    path = Path(order)
    if not path.is_file():
        raise InvalidInputError(f"--order must be 'name', 'random' or a file of image names, got {order!r}")
    by_stem = {os.path.splitext(n)[0]: n for n in names}
    out = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        validate_image_name(name, f"{path}, line {line_no}")
        found = name if name in names else by_stem.get(name)
        if found is None:
            raise InvalidInputError(f"--order {path}, line {line_no}: no image {name!r} in {folder}")
        if found not in out:
            out.append(found)
    if not out:
        raise InvalidInputError(f"--order {path}: the file lists no image")
    return out


def _recorded_images(csv_path: Path, annotator: str) -> set[str]:
    """``IMAGE`` values that ``csv_path`` already holds for ``annotator`` (no ANNOTATOR column: none)."""
    if not csv_path.is_file() or csv_path.stat().st_size == 0:
        return set()
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "IMAGE" not in reader.fieldnames:
            raise InvalidInputError(f"--out {csv_path}: exists but is not a fixation CSV (no IMAGE column)")
        if "ANNOTATOR" not in reader.fieldnames:
            return set()
        return {row["IMAGE"] for row in reader if row.get("ANNOTATOR") == annotator}


def overlay_rgba(heatmap: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """The page's feedback layer: the heatmap in warm colours, each level's outline in its colour.

    Args:
        heatmap: (H, W) in [0, 1].
        levels: (N, H, W) 0/1 pseudo-masks.

    Returns:
        (H, W, 4) uint8 RGBA.
    """
    h = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    out = np.zeros(h.shape + (4,), dtype=np.uint8)
    out[..., 0] = 255
    out[..., 1] = (255 * np.clip(2 * h - 1, 0, 1)).astype(np.uint8)
    out[..., 3] = (150 * h).astype(np.uint8)
    for k, lvl in enumerate(np.asarray(levels, dtype=bool)):
        inner = lvl.copy()
        inner[1:, :] &= lvl[:-1, :]
        inner[:-1, :] &= lvl[1:, :]
        inner[:, 1:] &= lvl[:, :-1]
        inner[:, :-1] &= lvl[:, 1:]
        edge = lvl & ~inner
        out[edge, :3] = LEVEL_COLOURS[k % len(LEVEL_COLOURS)]
        out[edge, 3] = 255
    return out


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class AnnotationSession:
    """One recording: the images shown in order, the gaze samples, the fixations written.

    Args:
        images_dir: the folder of images to annotate.
        out_csv: the GazeMedSeg CSV to append to (created if absent; rows already there are kept).
        source: the :class:`~gazemonai.record.sources.GazeSource` (``None``: samples are given with
            :meth:`add_samples`, as :func:`replay_recording` does).
        annotator: the ``ANNOTATOR`` of every row; images this annotator already has in ``out_csv``
            are left out of the order (resumed) unless ``again``.
        recording: the ``RECORDING`` id (default ``<annotator>-<UTC time>``).
        order: see :func:`image_order`.
        seed: shuffle seed for ``order="random"``.
        again: show images this annotator already recorded too (their new rows are added by the writer).
        config: the pseudo-mask chain of the feedback overlay (the ``pseudo-masks`` default: Kvasir).
        raw_dir: where the raw samples and the page's events go (default ``<out_csv stem>_raw`` beside it).
        method: fixation detection method (``"ivt"`` or ``"idt"``), with ``thresholds`` passed on to
            :func:`~gazemonai.record.fixations.detect_fixations`.
        calibration_point_s: seconds of samples taken at each calibration point after the key press.
        screen_width_cm: the screen's physical width (validation accuracy in degrees; ``None``: unknown).
        distance_cm: eye-to-screen distance for degrees.
        label_server: a :class:`~gazemonai.record.labelserver.LabelServer` (``--server``): the images
            come from its datastore, one at a time in its strategy's order (:meth:`next_image`;
            ``images_dir`` is then its cache folder), and each image's rows are also saved there
            (refused or unreachable: kept in ``out_csv``, listed in ``pending`` and retried).
    """

    def __init__(
        self,
        images_dir,
        out_csv,
        source=None,
        *,
        annotator: str = "annotator",
        recording: str | None = None,
        order: str = "name",
        seed: int = 0,
        again: bool = False,
        config: PseudoMaskConfig | None = None,
        raw_dir=None,
        method: str = "ivt",
        thresholds: dict | None = None,
        calibration_point_s: float = 0.8,
        screen_width_cm: float | None = None,
        distance_cm: float = 60.0,
        label_server=None,
    ):
        from .writer import GazeCsvWriter

        self.images_dir = Path(images_dir)
        self.out_csv = Path(out_csv)
        self.source = source
        self.annotator = str(annotator)
        if not self.annotator or any(c in self.annotator for c in ",\n\r\"'"):
            raise InvalidInputError(
                f"--annotator must be a non-empty name without commas or quotes, got {annotator!r}"
            )
        self.recording = recording or f"{self.annotator}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        self.label_server = label_server
        self.pending: dict[str, str] = {}  # image -> why its upload to the label server failed
        self.uploaded: list[str] = []
        done = _recorded_images(self.out_csv, self.annotator)
        if label_server is None:
            all_images = image_order(images_dir, order, seed)
            self.already = [n for n in all_images if n in done]
            self.images = all_images if again else [n for n in all_images if n not in done]
        else:  # the images come one at a time from the server's strategy (next_image)
            if order != "name":
                raise InvalidInputError("--order goes without --server (its --strategy orders the images)")
            self.images_dir.mkdir(parents=True, exist_ok=True)
            self.already = sorted(done)
            self._exclude = set() if again else {os.path.splitext(n)[0] for n in done}
            self.images = []
        self.config = config or PRESETS["kvasir"]
        self.raw_dir = Path(raw_dir) if raw_dir else self.out_csv.with_name(self.out_csv.stem + "_raw")
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        self.writer = GazeCsvWriter(self.out_csv, raw_dir=self.raw_dir)
        self.method, self.thresholds = method, dict(thresholds or {})
        self.calibration_point_s = float(calibration_point_s)
        self.screen_width_cm, self.distance_cm = screen_width_cm, distance_cm
        self.pointer = getattr(source, "name", None) == "pointer"
        self.page_clock, self.source_clock = ClockLink(), ClockLink()
        self._lock = threading.RLock()
        self.samples: list[GazeSample] = []
        self._sample_t: list[float] = []
        self.unordered = 0  # samples that arrived out of time order (kept, sorted in)
        self.current: dict | None = None  # the image on screen
        self.results: dict[int, dict] = {}
        self.skipped: dict[str, list[str]] = {"failed_to_load": [], "no_fixations": []}
        self.accuracy: dict | None = None
        self.events_path = self.raw_dir / f"{self.recording}.events.jsonl"
        self.raw_path = self.writer.raw_path(self.recording)
        self._raw_queue = ThreadPoolExecutor(max_workers=1, thread_name_prefix="annotate-raw")
        self._overlay_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="annotate-overlay")
        self._disconnected_since: float | None = None
        self.disconnects = 0
        self.closed = False
        self.ready = threading.Event()  # set when the warm-up is done

    # ---------------------------------------------------------------- samples and clocks
    def start(self) -> None:
        """Start the gaze source streaming into this session (and warm the overlay's code path up)."""
        threading.Thread(target=self._warm_up, daemon=True, name="annotate-warm-up").start()
        if self.source is not None:
            self.source.start(self.on_sample)

    def _warm_up(self) -> None:
        """Run fixation detection and the pseudo-mask chain once on a tiny made-up image.

        Their first call imports and initialises libraries (pymovements/polars, the dense CRF) for
        seconds; done here, while the annotator calibrates, the first image's overlay is as quick as
        the others.
        """
        try:
            g = ViewGeometry(0.0, 100.0, 100.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 64, 48)
            trace = [GazeSample(k / 60, 0.3, 0.3, True) for k in range(12)]
            detect_fixations(trace, [g], method=self.method, **self.thresholds)
            make_pseudo_masks(np.full((48, 64, 3), 128, np.uint8), np.array([[0.5, 0.5, 200.0]]), self.config)
            _png(overlay_rgba(np.zeros((8, 8), np.float32), np.zeros((1, 8, 8), np.uint8)))
        except Exception:  # only a warm-up: the real call reports any problem
            logger.debug("warm-up failed", exc_info=True)
        self.ready.set()

    def add_samples(self, samples) -> int:
        """Store samples (the source's callback, or the page's pointer batches); returns how many."""
        n = 0
        with self._lock:
            for s in samples:
                if self._sample_t and s.t < self._sample_t[-1]:
                    i = bisect.bisect_right(self._sample_t, s.t)
                    self.samples.insert(i, s)
                    self._sample_t.insert(i, s.t)
                    self.unordered += 1
                else:
                    self.samples.append(s)
                    self._sample_t.append(s.t)
                n += 1
        return n

    def add_samples_one(self, sample: GazeSample) -> None:
        self.add_samples([sample])

    def on_sample(self, sample: GazeSample) -> None:
        """The gaze source's callback (its own thread)."""
        self.source_clock.observe(sample.t)
        self.add_samples([sample])

    def page_to_source(self, t_page: float) -> float:
        """A page time stamp on the samples' clock."""
        if self.pointer or self.source is None:
            return t_page
        return self.source_clock.to_remote(self.page_clock.to_local(t_page))

    def _event(self, record: dict) -> None:
        """Append one page event to the events log (flushed: a crash keeps every event before it)."""
        with open(self.events_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _rows_written(self, name: str) -> np.ndarray:
        """This annotator's fixations of image ``name`` as the CSV now holds them: (N, 3) x, y, duration.

        The overlay is made from these, parsed as ``gazemonai pseudo-masks`` parses them, so the two
        give the same pseudo-masks to the bit.
        """
        with open(self.out_csv, newline="", encoding="utf-8") as f:
            rows = [
                (
                    float(r["CURRENT_FIX_INDEX"]),
                    float(r["CURRENT_FIX_X"]),
                    float(r["CURRENT_FIX_Y"]),
                    float(r["CURRENT_FIX_DURATION"]),
                )
                for r in csv.DictReader(f)
                if r["IMAGE"] == name and r.get("ANNOTATOR") == self.annotator
            ]
        rows.sort(key=lambda r: r[0])
        return np.array([r[1:] for r in rows], dtype=np.float64).reshape(-1, 3)

    # ---------------------------------------------------------------- the label server
    def next_image(self) -> dict:
        """``--server``: ask the strategy for the next image, download it, append it to the order.

        Returns:
            ``{"index", "image", "strategy", "score"?, "reason"?}``, or ``{"done": True}`` when the
            server has no image left for this session.
        """
        from .labelserver import LabelServerError

        ls = self.label_server
        if ls is None:
            raise InvalidInputError("no --server: the images are the folder's, all known at the start")
        with self._lock:
            exclude = self._exclude | {os.path.splitext(n)[0] for n in self.images}
            try:
                pick = ls.next_image(self.annotator, exclude)
                if not pick:
                    return {"done": True, "server": ls.url}
                name = ls.file_name(pick["id"], pick.pop("objects", None))
                ls.download(pick["id"], name)
            except LabelServerError as e:
                return {"error": str(e), "server": ls.url}
            self.images.append(name)
            index = len(self.images) - 1
        self._event({"event": "next", "index": index, "image": name, **pick})
        return {"index": index, "image": name, **{k: v for k, v in pick.items() if k != "id"}}

    def _image_rows_csv(self, name: str) -> bytes:
        """This annotator's rows of image ``name`` as ``out_csv`` holds them, as one CSV (its columns)."""
        with open(self.out_csv, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if r["IMAGE"] == name and r.get("ANNOTATOR") == self.annotator]
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=reader.fieldnames, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        return out.getvalue().encode("utf-8")

    def upload(self, name: str) -> dict:
        """Save image ``name``'s rows to the label server as its ``gaze`` label (``saved`` or ``error``)."""
        from .labelserver import LabelServerError

        try:
            self.label_server.put_gaze(os.path.splitext(name)[0], self._image_rows_csv(name))
        except LabelServerError as e:
            with self._lock:
                self.pending[name] = str(e)
            logger.warning("%s (the rows are kept in %s; retried at the next image)", e, self.out_csv)
            return {"error": str(e), "kept": str(self.out_csv)}
        with self._lock:
            self.pending.pop(name, None)
            if name not in self.uploaded:
                self.uploaded.append(name)
        return {"saved": True, "server": self.label_server.url}

    def retry_uploads(self) -> dict:
        """Upload again every image whose upload failed; returns ``{"saved": [...], "pending": {...}}``."""
        saved = []
        for name in list(self.pending):
            if "saved" in self.upload(name):
                saved.append(name)
        return {"saved": saved, "pending": dict(self.pending)}

    # ---------------------------------------------------------------- the page's events
    def _geometry(self, d: dict, t_source: float) -> ViewGeometry:
        g = dict(d)
        g["t"] = t_source
        return geometry_from_dict(g)

    def _check_index(self, index) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.images):
            raise InvalidInputError(f"image index {index!r} is not one of 0..{len(self.images) - 1}")
        return index

    def begin_image(self, index: int, t: float, geometry: dict) -> dict:
        """Image ``index`` is on screen from page time ``t`` with ``geometry`` (the page's dict)."""
        index = self._check_index(index)
        ts = self.page_to_source(t)
        g = self._geometry(geometry, ts)
        name = self.images[index]
        with self._lock:
            self.current = {"index": index, "image": name, "t0": ts, "geometries": [g], "resized": 0}
            # read (decode) the image now, for its overlay at the key press
            self.current["image_job"] = self._overlay_pool.submit(read_image, self.images_dir / name)
        self._event({"event": "begin", "index": index, "image": name, "t": ts, "geometry": asdict(g)})
        return {"image": name, "index": index}

    def change_geometry(self, index: int, t: float, geometry: dict, reason: str = "zoom") -> dict:
        """Zoom, pan or a resized window: the new placement holds from page time ``t``."""
        index = self._check_index(index)
        with self._lock:
            cur = self.current
            if cur is None or cur["index"] != index:
                raise InvalidInputError(f"image {index} is not on screen (a geometry for it came late)")
            g = self._geometry(geometry, self.page_to_source(t))
            if (g.image_w, g.image_h) != (cur["geometries"][0].image_w, cur["geometries"][0].image_h):
                raise InvalidInputError(f"image {cur['image']}: the reported image size changed mid-image")
            cur["geometries"].append(g)
            if reason == "resize":
                cur["resized"] += 1
        self._event({"event": "geometry", "index": index, "reason": reason, "t": g.t, "geometry": asdict(g)})
        return {"geometries": len(cur["geometries"])}

    def skip_image(self, index: int, reason: str) -> dict:
        """The page could not show image ``index`` (it failed to load): counted, logged, skipped."""
        index = self._check_index(index)
        name = self.images[index]
        with self._lock:
            if name not in self.skipped["failed_to_load"]:
                self.skipped["failed_to_load"].append(name)
            if self.current and self.current["index"] == index:
                self.current = None
        logger.warning("image %s failed to load in the page (%s): skipped", name, reason)
        self._event({"event": "skip", "index": index, "image": name, "reason": str(reason)[:200]})
        return {"skipped": len(self.skipped["failed_to_load"]), "image": name}

    def _wait_for_samples(self, t_end: float) -> None:
        if self.source is None or self.pointer:
            return
        deadline = time.monotonic() + SAMPLE_WAIT_S
        while time.monotonic() < deadline:
            with self._lock:
                if self._sample_t and self._sample_t[-1] >= t_end:
                    return
            if not self.connected:
                return
            time.sleep(0.005)

    @property
    def connected(self) -> bool:
        return True if self.source is None else bool(self.source.connected)

    def finish_image(self, index: int, t: float, *, event: bool = True) -> dict:
        """The key press that ends image ``index`` at page time ``t``: fixations -> CSV -> overlay.

        Returns a JSON-able dict: the fixations (normalised x, y, duration), the counts of
        :func:`~gazemonai.record.fixations.detect_fixations`, ``seconds`` on the image, ``rows``
        written; ``self.results[index]`` keeps the heatmap and levels for :meth:`overlay_png`.
        """
        index = self._check_index(index)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        ts = self.page_to_source(t)
        self._wait_for_samples(ts)
        with self._lock:
            cur = self.current
            if cur is None or cur["index"] != index:
                raise InvalidInputError(f"image {index} is not on screen")
            lo = bisect.bisect_left(self._sample_t, cur["t0"])
            hi = bisect.bisect_left(self._sample_t, ts)
            samples = self.samples[lo:hi]
            self.current = None
        if event:
            self._event({"event": "finish", "index": index, "image": cur["image"], "t": ts})
        seconds = max(0.0, ts - cur["t0"])
        fixations = detect_fixations(samples, cur["geometries"], method=self.method, **self.thresholds)
        g0 = cur["geometries"][0]
        name = cur["image"]
        result = {
            "index": index,
            "image": name,
            "seconds": round(seconds, 3),
            "stats": dict(fixations.stats),
            "geometry_changes": len(cur["geometries"]) - 1,
            "resized": cur["resized"],
            "fixations": [{"x": f.x, "y": f.y, "duration_ms": f.duration_ms} for f in fixations],
            "rows": 0,
        }
        if not self.connected:
            result["disconnected"] = True
        if not fixations:
            with self._lock:
                if name not in self.skipped["no_fixations"]:
                    self.skipped["no_fixations"].append(name)
            result["message"] = (
                f"no fixation on {name} ({len(samples)} samples, "
                f"{fixations.stats.get('invalid', 0)} invalid): "
                "nothing written; press R to look again"
            )
            self.results[index] = result
            return result
        with self._lock:
            if name in self.skipped["no_fixations"]:
                self.skipped["no_fixations"].remove(name)
        # The overlay is computed while the rows are written (fsync-bound): from the fixations as the
        # CSV will hold them (x, y by repr, the duration to the writer's 3 decimals). The rows read back
        # afterwards are what `gazemonai pseudo-masks` reads; should they differ, it is made again from them.
        guess = np.array([[f.x, f.y, float(f"{f.duration_ms:.3f}")] for f in fixations], dtype=np.float64)
        image_job = cur.get("image_job")
        overlay_job = self._overlay_pool.submit(self._pseudo_masks, image_job, guess)
        acc = self.accuracy or {}
        result["rows"] = self.writer.append_image(
            name,
            list(fixations),
            g0.image_h,
            g0.image_w,
            annotator=self.annotator,
            recording=self.recording,
            accuracy_px=acc.get("px"),
            accuracy_deg=acc.get("deg"),
            seconds=seconds,
            shown_at=cur["t0"],
        )
        # the raw samples follow off the key press's path, in order (one worker); close() waits for them
        self._raw_queue.submit(self.writer.append_raw, self.recording, name, samples, cur["geometries"])
        if self.label_server is not None:
            result["server"] = self.upload(name)
            if self.pending.keys() - {name}:
                result["server"]["retried"] = self.retry_uploads()
        written = self._rows_written(name)
        try:
            image, pm, png = overlay_job.result()
            if not np.array_equal(written, guess):
                pm = make_pseudo_masks(image, written, self.config)
                png = _png(overlay_rgba(pm.heatmap, pm.levels))
        except ImageReadError as e:
            result["message"] = f"fixations written, but no overlay: {e}"
            self.results[index] = result
            return result
        if image.shape[:2] != (g0.image_h, g0.image_w):
            result["message"] = (
                f"the page showed {name} as {g0.image_w}x{g0.image_h}, the file is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        result["levels"] = [
            {"threshold": th, "fraction": round(float(lv.mean()), 4)}
            for th, lv in zip(self.config.thresholds, pm.levels)
        ]
        # what the key press cost here: wall time, and the process's CPU time (all threads), which does
        # not grow when other programs compete for the cores
        result["server_s"] = round(time.perf_counter() - wall0, 4)
        result["server_cpu_s"] = round(time.process_time() - cpu0, 4)
        with self._lock:
            self.results[index] = {**result, "_heatmap": pm.heatmap, "_levels": pm.levels, "_png": png}
        return result

    def _pseudo_masks(self, image_job, fixations: np.ndarray):
        image = image_job.result()
        pm = make_pseudo_masks(image, fixations, self.config)
        return image, pm, _png(overlay_rgba(pm.heatmap, pm.levels))

    def overlay_png(self, index: int) -> bytes:
        res = self.results.get(index)
        if not res or "_png" not in res:
            raise MissingInputError(f"no overlay for image {index} yet")
        return res["_png"]

    def level_png(self, index: int, level: int) -> bytes:
        res = self.results.get(index)
        if not res or "_levels" not in res or not 1 <= level <= len(res["_levels"]):
            raise MissingInputError(f"no level {level} for image {index}")
        return _png((res["_levels"][level - 1] * 255).astype(np.uint8))

    # ---------------------------------------------------------------- calibration / validation
    def calibrate(self, targets: list[dict], geometry: dict) -> dict:
        """Validation accuracy from the samples taken at each target.

        Args:
            targets: ``{"cx", "cy", "t0", "t1"}`` per point: its viewport CSS px and the page-time window
                in which the annotator looked at it.
            geometry: the page's view geometry (the screen fields matter; the image fields may be a stub).
        """
        from .validation import validation_accuracy

        if len(targets) < 1:
            raise InvalidInputError("calibration: no target")
        g = self._geometry(geometry, self.page_to_source(float(targets[0]["t0"])))
        points, per_target = [], []
        with self._lock:
            for tg in targets:
                t0, t1 = self.page_to_source(float(tg["t0"])), self.page_to_source(float(tg["t1"]))
                lo, hi = bisect.bisect_left(self._sample_t, t0), bisect.bisect_left(self._sample_t, t1)
                points.append(viewport_to_screen(float(tg["cx"]), float(tg["cy"]), g))
                per_target.append(self.samples[lo:hi])
        acc = validation_accuracy(
            points, per_target, g, screen_cm=self.screen_width_cm, distance_cm=self.distance_cm
        )
        self.accuracy = {"px": acc.get("px"), "deg": acc.get("deg")}
        self._event(
            {"event": "calibration", "targets": targets, "geometry": asdict(g), "accuracy": self.accuracy}
        )
        return {k: v for k, v in acc.items() if k in ("px", "deg", "per_target")}

    def tracker_calibration(self) -> dict:
        """Run the tracker's own calibration (before the page's validation), where the source has one.

        Returns:
            ``{"supported": False}`` (pointer, replay), the tracker's result (Gazepoint: its points and
            ``ave_error_px``), or ``{"error": ...}`` when it failed (the validation still measures).
        """
        if self.source is None or self.pointer:
            return {"supported": False}
        try:
            result = self.source.calibrate()
        except GazemonaiError as e:
            return {"supported": True, "error": f"the tracker's calibration failed: {e}"}
        if result is None:
            return {"supported": False}
        result = json.loads(json.dumps(result).replace("NaN", "null"))  # JSON has no NaN
        self._event({"event": "tracker_calibration", "result": result})
        return {"supported": True, **result}

    # ---------------------------------------------------------------- session
    def info(self) -> dict:
        return {
            "annotator": self.annotator,
            "recording": self.recording,
            "source": getattr(self.source, "name", "none"),
            "images": self.images,
            "already": self.already,
            "csv": str(self.out_csv),
            "calibration_point_s": self.calibration_point_s,
            "thresholds": list(self.config.thresholds),
            "server": None if self.label_server is None else self.label_server.url,
            "strategy": None if self.label_server is None else self.label_server.strategy,
        }

    def status(self) -> dict:
        connected = self.connected
        with self._lock:
            if not connected and self._disconnected_since is None:
                self._disconnected_since = time.time()
                self.disconnects += 1
            elif connected:
                self._disconnected_since = None
            return {
                "connected": connected,
                "samples": len(self.samples),
                "disconnects": self.disconnects,
                "skipped": {k: len(v) for k, v in self.skipped.items()},
                "done": sum(1 for r in self.results.values() if r.get("rows")),
            }

    def summary(self) -> dict:
        """Images recorded, time per image (from the CSV), the counted skips, the raw files."""
        from .writer import recording_summary

        out = {"recording": self.recording, "annotator": self.annotator, "csv": str(self.out_csv)}
        try:
            out.update(recording_summary(self.out_csv, self.recording))
        except (MissingInputError, InvalidInputError, FileNotFoundError) as e:
            out["images"] = 0
            out["note"] = str(e)
        out["skipped"] = {k: list(v) for k, v in self.skipped.items()}
        out["already_recorded"] = len(self.already)
        out["accuracy"] = self.accuracy
        out["raw"] = str(self.raw_path)
        out["events"] = str(self.events_path)
        if self.label_server is not None:
            out["server"] = self.label_server.url
            out["uploaded"] = len(self.uploaded)
            out["upload_pending"] = dict(self.pending)
        return out

    def flush(self) -> None:
        """Wait until every image's raw samples are on disk."""
        self._raw_queue.submit(lambda: None).result()

    def close(self) -> dict:
        if self.label_server is not None and self.pending and not self.closed:
            self.retry_uploads()  # a last try; what still fails is listed in the summary
        if self.source is not None and not self.closed:
            try:
                self.source.stop()
            except Exception:  # a source that died already: its samples are in, nothing more to stop
                logger.debug("source stop", exc_info=True)
        self.closed = True
        self._raw_queue.shutdown(wait=True)
        return self.summary()


def replay_recording(images_dir, out_csv, raw_csv, events, **session_options) -> dict:
    """Make the CSV of a recording again from its raw samples and its page events, with no browser.

    Args:
        images_dir: the recording's images.
        out_csv: the CSV to append to.
        raw_csv: the raw samples (``<recording>.csv``, the replay source's file).
        events: the page's events (``<recording>.events.jsonl``); times are on the samples' clock.
        session_options: passed to :class:`AnnotationSession` (``annotator``, ``recording``, ``again``...).

    Returns:
        the session's :meth:`~AnnotationSession.summary` and ``results`` (per image, without arrays).
    """
    from .sources import ReplaySource

    session_options.setdefault("again", True)
    source = ReplaySource(raw_csv, speed=float("inf"))
    session = AnnotationSession(images_dir, out_csv, None, **session_options)
    source.start(session.add_samples_one)
    source.wait()
    source.stop()
    lines = Path(events).read_text().splitlines()
    by_name = {n: i for i, n in enumerate(session.images)}
    results = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{events}, line {line_no}: not JSON ({e.msg})") from None
        kind = ev.get("event")
        if (
            kind in ("begin", "geometry", "finish", "skip")
            and ev.get("image") not in by_name
            and kind != "geometry"
        ):
            raise InvalidInputError(
                f"{events}, line {line_no}: image {ev.get('image')!r} is not in {images_dir}"
            )
        if kind == "begin":
            i = by_name[ev["image"]]
            session.begin_image(i, float(ev["t"]), ev["geometry"])
        elif kind == "geometry" and session.current is not None:
            session.change_geometry(
                session.current["index"], float(ev["t"]), ev["geometry"], ev.get("reason", "zoom")
            )
        elif kind == "finish":
            res = session.finish_image(by_name[ev["image"]], float(ev["t"]))
            results.append({k: v for k, v in res.items() if not k.startswith("_")})
        elif kind == "skip":
            session.skip_image(by_name[ev["image"]], ev.get("reason", ""))
        elif kind == "calibration":
            session.accuracy = ev.get("accuracy")
    summary = session.close()
    summary["results"] = results
    return summary


# -------------------------------------------------------------------- HTTP
def make_app(session: AnnotationSession):
    """A Starlette application serving the page and the session's JSON API."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    async def body(request: Request) -> dict:
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidInputError("the request body is not JSON") from None
        if not isinstance(data, dict):
            raise InvalidInputError("the request body must be a JSON object")
        if "now" in data:  # every page request carries its clock: ties the page's clock to ours
            session.page_clock.observe(float(data["now"]))
        return data

    def handled(fn):
        async def endpoint(request: Request):
            try:
                return await fn(request)
            except (GazemonaiError, KeyError, TypeError, ValueError) as e:
                return JSONResponse({"error": str(e) if not isinstance(e, KeyError) else f"missing {e}"}, 400)

        return endpoint

    async def index(request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def info(request):
        return JSONResponse(session.info())

    async def status(request):
        return JSONResponse(session.status())

    async def image(request):
        i = session._check_index(int(request.path_params["index"]))
        return FileResponse(session.images_dir / session.images[i], headers={"Cache-Control": "no-store"})

    async def samples(request):
        data = await body(request)
        if not session.pointer:
            raise InvalidInputError(
                f"the page sends samples only for --source pointer (this is {session.info()['source']})"
            )
        scr = data["screen"]  # the page's screen and viewport placement when it took these samples
        g = ViewGeometry(
            0.0,
            float(scr["screen_w"]),
            float(scr["screen_h"]),
            float(scr["view_x"]),
            float(scr["view_y"]),
            float(scr.get("dpr", 1.0)),
            0.0,
            0.0,
            1.0,
            1,
            1,
        )
        n = 0
        for s in data["samples"]:
            x, y = viewport_to_screen(float(s["cx"]), float(s["cy"]), g)
            session.source.push(GazeSample(float(s["t"]), x, y, bool(s.get("valid", True))))
            n += 1
        return JSONResponse({"received": n})

    async def begin(request):
        d = await body(request)
        return JSONResponse(session.begin_image(d["index"], float(d["t"]), d["geometry"]))

    async def geometry(request):
        d = await body(request)
        return JSONResponse(
            session.change_geometry(d["index"], float(d["t"]), d["geometry"], d.get("reason", "zoom"))
        )

    async def finish(request):
        d = await body(request)
        from starlette.concurrency import run_in_threadpool

        res = await run_in_threadpool(session.finish_image, d["index"], float(d["t"]))
        return JSONResponse({k: v for k, v in res.items() if not k.startswith("_")})

    async def skip(request):
        d = await body(request)
        return JSONResponse(session.skip_image(d["index"], d.get("reason", "failed to load")))

    async def calibration(request):
        d = await body(request)
        from starlette.concurrency import run_in_threadpool

        return JSONResponse(await run_in_threadpool(session.calibrate, d["targets"], d["geometry"]))

    async def tracker_calibration(request):
        await body(request)
        from starlette.concurrency import run_in_threadpool

        return JSONResponse(await run_in_threadpool(session.tracker_calibration))

    async def overlay(request):
        return Response(
            session.overlay_png(int(request.path_params["index"])),
            media_type="image/png",
            headers={"Cache-Control": "no-store"},
        )

    async def level(request):
        p = request.path_params
        return Response(session.level_png(int(p["index"]), int(p["level"])), media_type="image/png")

    async def next_image(request):
        await body(request)
        from starlette.concurrency import run_in_threadpool

        return JSONResponse(await run_in_threadpool(session.next_image))

    async def retry(request):
        await body(request)
        from starlette.concurrency import run_in_threadpool

        return JSONResponse(await run_in_threadpool(session.retry_uploads))

    async def end(request):
        await body(request)
        from starlette.concurrency import run_in_threadpool

        return JSONResponse(await run_in_threadpool(session.close))

    routes = [
        Route("/", index),
        Route("/api/session", handled(info)),
        Route("/api/status", handled(status)),
        Route("/api/image/{index:int}", handled(image)),
        Route("/api/samples", handled(samples), methods=["POST"]),
        Route("/api/begin", handled(begin), methods=["POST"]),
        Route("/api/geometry", handled(geometry), methods=["POST"]),
        Route("/api/finish", handled(finish), methods=["POST"]),
        Route("/api/skip", handled(skip), methods=["POST"]),
        Route("/api/calibration", handled(calibration), methods=["POST"]),
        Route("/api/tracker-calibration", handled(tracker_calibration), methods=["POST"]),
        Route("/api/overlay/{index:int}.png", handled(overlay)),
        Route("/api/level/{index:int}/{level:int}.png", handled(level)),
        Route("/api/end", handled(end), methods=["POST"]),
        Route("/api/next", handled(next_image), methods=["POST"]),
        Route("/api/retry", handled(retry), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes)


class ServerThread(threading.Thread):
    """uvicorn serving ``app`` on ``host:port`` in a thread (tests, benchmarks); ``stop()`` ends it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        super().__init__(daemon=True)
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(self.config)

    def run(self):
        self.server.run()

    def start_and_wait(self, seconds: float = 20.0) -> int:
        self.start()
        deadline = time.monotonic() + seconds
        while not self.server.started:
            if time.monotonic() > deadline or not self.is_alive():
                raise RuntimeError("the annotation server did not start")
            time.sleep(0.02)
        return self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self):
        self.server.should_exit = True
        self.join(10)


def serve(session: AnnotationSession, host: str = "127.0.0.1", port: int = 8765) -> dict:
    """Serve the page until Ctrl-C (or the page's end); returns the session's summary."""
    import uvicorn

    session.start()
    app = make_app(session)
    print(
        f"annotation page: http://{host}:{port}/  ({len(session.images)} images; Ctrl-C to stop)", flush=True
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        summary = session.close()
    return summary
