"""Record step 4: fixations -> the GazeMedSeg CSV, one image at a time, never losing what is written.

The CSV has the GazeMedSeg columns that ``gazemonai pseudo-masks`` reads
(:data:`gazemonai.gaze.fixations.ALL_COLUMNS`) plus five of the recording::

    ANNOTATOR     who looked (kept apart: two annotators on one image are two sets of rows)
    RECORDING     the session id (the raw sample file is <raw_dir>/<RECORDING>.csv)
    ACCURACY_PX   the session's validation accuracy in CSS px (empty when not measured)
    ACCURACY_DEG  the same in degrees of visual angle (empty when the screen size is unknown)
    SECONDS       time the image was on screen (the paper's claim: gaze is faster than masks)

Writing an image is atomic: under a file lock (``filelock``), the file's current rows plus the image's
new rows go to a temporary file in the same folder, which is fsync'd and renamed over the CSV; a
crash leaves either the old or the new file, so it loses at most the image on screen. Rows are only
ever added, except for a redo: the same annotator writing the same image again replaces their earlier
rows for that image, and the replaced rows are appended to ``<csv stem>.replaced.csv`` beside it (so even
a redo loses nothing). Other annotators' rows, other images and other recordings are never touched.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import statistics
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from filelock import FileLock

from ..errors import InvalidInputError
from ..gaze.fixations import ALL_COLUMNS
from ..prep.io import validate_image_name
from .fixations import Fixation
from .geometry import ViewGeometry
from .samples import RAW_COLUMNS, GazeSample

__all__ = ["RECORD_COLUMNS", "COLUMNS", "GazeCsvWriter", "recording_summary"]

log = logging.getLogger(__name__)

#: The recording's own columns, after the GazeMedSeg ones.
RECORD_COLUMNS = ("ANNOTATOR", "RECORDING", "ACCURACY_PX", "ACCURACY_DEG", "SECONDS")
#: Every column of the CSV, in file order.
COLUMNS = tuple(ALL_COLUMNS) + RECORD_COLUMNS


def _num(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{float(v):.{digits}f}"


def _label(value: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"{what} must be a non-empty text")
    if any(c in value for c in "\r\n\x00"):
        raise InvalidInputError(f"{what} {value!r} must be one line of text")
    return value.strip()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_rows(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _append_rows(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Append ``rows`` with an fsync; a header first when the file is new; a torn last line is cut off."""
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, "rb+") as f:  # a crash mid-append leaves a partial last line: drop it
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 1))
            if f.read(1) != b"\n":
                f.seek(0)
                data = f.read()
                keep = data.rfind(b"\n") + 1
                log.warning(
                    "%s: cut off a partial last line (%d bytes) left by an interrupted write",
                    path,
                    size - keep,
                )
                f.truncate(keep)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(header)
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def _read_rows(path: Path, expected: Sequence[str]) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return []
        if [c.strip() for c in header] != list(expected):
            raise InvalidInputError(
                f"{path}: its columns ({', '.join(header)}) are not those gazemonai annotate writes "
                f"({', '.join(expected)}); choose another output file (nothing was written)"
            )
        return [row for row in reader if row]


class GazeCsvWriter:
    """Appends one image's fixations at a time to a GazeMedSeg CSV, atomically.

    Args:
        csv_path: the fixation CSV (created with its header when absent; an existing file must have
            :data:`COLUMNS`).
        raw_dir: folder for the raw samples, one file per recording (``<recording>.csv``, the format of
            :func:`~gazemonai.record.samples.read_raw_samples` plus an ``image`` column) and the view
            geometries beside it (``<recording>.geometry.jsonl``); None = keep no raw samples.
    """

    def __init__(self, csv_path: str | os.PathLike, raw_dir: str | os.PathLike | None = None):
        self.csv_path = Path(csv_path)
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        self.raw_dir = Path(raw_dir) if raw_dir is not None else None
        if self.raw_dir is not None:
            self.raw_dir.mkdir(parents=True, exist_ok=True)
        self.replaced_path = self.csv_path.with_name(f"{self.csv_path.stem}.replaced.csv")
        self._lock = FileLock(str(self.csv_path) + ".lock")
        if self.csv_path.exists():  # fail now, not after the first image was looked at
            with self._lock:
                _read_rows(self.csv_path, COLUMNS)

    def append_image(
        self,
        image: str,
        fixations: Sequence[Fixation],
        height: int,
        width: int,
        *,
        annotator: str,
        recording: str,
        accuracy_px: float | None = None,
        accuracy_deg: float | None = None,
        seconds: float | None = None,
        shown_at: float | None = None,
    ) -> int:
        """Write one image's fixations; returns the number of rows written.

        Args:
            image: the ``IMAGE`` value (a file name).
            fixations: the image's fixations (:func:`~gazemonai.record.fixations.detect_fixations`).
            height: image height in pixels (``IMAGE_HEIGHT``).
            width: image width in pixels (``IMAGE_WIDTH``).
            annotator: annotator id; rows of different annotators are kept apart.
            recording: recording (session) id.
            accuracy_px: the recording's validation accuracy in CSS px.
            accuracy_deg: the same in degrees.
            seconds: how long the image was on screen.
            shown_at: when the image appeared (samples' clock, s); ``CURRENT_FIX_START`` is in ms from
                it (default: from the first fixation).

        An image with no fixation writes nothing (and returns 0): earlier rows stay as they were. A
        redo (same image and annotator) replaces that annotator's rows of the image; the old rows go
        to :attr:`replaced_path`.
        """
        image = validate_image_name(image, f"{self.csv_path}: image")
        annotator = _label(annotator, "annotator")
        recording = _label(recording, "recording")
        for name, v in (("height", height), ("width", width)):
            if int(v) != v or v <= 0:
                raise InvalidInputError(f"{image}: image {name}={v!r} must be a positive integer")
        fixations = list(fixations)
        for i, f in enumerate(fixations):
            if not (0.0 <= f.x <= 1.0 and 0.0 <= f.y <= 1.0) or not f.duration_ms > 0:
                raise InvalidInputError(
                    f"{image}: fixation {i + 1} at ({f.x}, {f.y}) for {f.duration_ms} ms is outside "
                    "the image or has no duration"
                )
        if not fixations:
            log.warning("%s: no fixation on %s by %s; nothing written", self.csv_path, image, annotator)
            return 0
        t0 = shown_at if shown_at is not None else fixations[0].start
        new_rows = [
            [
                image,
                str(i),
                repr(float(f.x)),
                repr(float(f.y)),
                f"{f.duration_ms:.3f}",
                "",
                f"{(f.start - t0) * 1000.0:.3f}",
                f"{float(height):.1f}",
                f"{float(width):.1f}",
                annotator,
                recording,
                _num(accuracy_px, 3),
                _num(accuracy_deg, 4),
                _num(seconds, 3),
            ]
            for i, f in enumerate(fixations, start=1)
        ]
        with self._lock:
            rows = _read_rows(self.csv_path, COLUMNS) if self.csv_path.exists() else []
            a = COLUMNS.index("ANNOTATOR")
            replaced = [r for r in rows if r[0] == image and len(r) > a and r[a] == annotator]
            if replaced:
                _append_rows(self.replaced_path, COLUMNS, replaced)  # first, so a crash keeps them somewhere
                rows = [r for r in rows if not (r[0] == image and len(r) > a and r[a] == annotator)]
                log.info(
                    "%s: %s redid %s; %d earlier rows moved to %s",
                    self.csv_path,
                    annotator,
                    image,
                    len(replaced),
                    self.replaced_path,
                )
            _atomic_write_rows(self.csv_path, COLUMNS, rows + new_rows)
        return len(new_rows)

    def raw_path(self, recording: str) -> Path:
        if self.raw_dir is None:
            raise InvalidInputError("no raw_dir was given: raw samples are not kept")
        return self.raw_dir / f"{_label(recording, 'recording')}.csv"

    def append_raw(
        self,
        recording: str,
        image: str,
        samples: Sequence[GazeSample],
        geometries: Sequence[ViewGeometry] = (),
    ) -> Path:
        """Append one image's raw samples (and its view geometries) to the recording's raw files.

        Each append is fsync'd; a line torn by a crash is cut off at the next append.
        """
        path = self.raw_path(recording)
        image = validate_image_name(image, f"{path}: image")
        rows = [
            [
                repr(float(s.t)),
                "" if math.isnan(s.x) else repr(float(s.x)),
                "" if math.isnan(s.y) else repr(float(s.y)),
                1 if s.valid else 0,
                image,
            ]
            for s in samples
        ]
        with FileLock(str(path) + ".lock"):
            _append_rows(path, (*RAW_COLUMNS, "image"), rows)
            if geometries:
                gpath = path.with_name(f"{path.stem}.geometry.jsonl")
                with open(gpath, "a") as f:
                    for g in geometries:
                        f.write(json.dumps({"image": image, **g.__dict__}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        return path


def recording_summary(csv_path: str | os.PathLike, recording: str) -> dict:
    """Time per image of one recording: the paper's selling point (gaze is faster than drawing masks).

    Returns:
        ``{"recording", "images", "fixations", "annotators", "seconds_total", "seconds_mean",
        "seconds_median", "accuracy_px", "accuracy_deg"}``; the seconds fields are None when no image
        has ``SECONDS``.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise InvalidInputError(f"gaze CSV not found: {path}")
    rows = _read_rows(path, COLUMNS)
    col = {c: i for i, c in enumerate(COLUMNS)}
    mine = [r for r in rows if r[col["RECORDING"]] == recording]
    per_image: dict[tuple[str, str], str] = {}
    for r in mine:
        per_image.setdefault((r[col["IMAGE"]], r[col["ANNOTATOR"]]), r[col["SECONDS"]])
    seconds = [float(s) for s in per_image.values() if s.strip()]
    acc_px = {r[col["ACCURACY_PX"]] for r in mine if r[col["ACCURACY_PX"]].strip()}
    acc_deg = {r[col["ACCURACY_DEG"]] for r in mine if r[col["ACCURACY_DEG"]].strip()}
    return {
        "recording": recording,
        "images": len(per_image),
        "fixations": len(mine),
        "annotators": sorted({r[col["ANNOTATOR"]] for r in mine}),
        "seconds_total": float(sum(seconds)) if seconds else None,
        "seconds_mean": float(statistics.fmean(seconds)) if seconds else None,
        "seconds_median": float(statistics.median(seconds)) if seconds else None,
        "accuracy_px": float(next(iter(acc_px))) if len(acc_px) == 1 else None,
        "accuracy_deg": float(next(iter(acc_deg))) if len(acc_deg) == 1 else None,
    }
