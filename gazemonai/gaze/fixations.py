"""Step 1 of the data flow: read eye-tracker fixation CSVs into per-image fixation tables.

The schema is the one of the GazeMedSeg release (Zhong et al., MICCAI 2024), one row per fixation::

    IMAGE, CURRENT_FIX_INDEX, CURRENT_FIX_X, CURRENT_FIX_Y, CURRENT_FIX_DURATION,
    CURRENT_FIX_PUPIL, CURRENT_FIX_START, IMAGE_HEIGHT, IMAGE_WIDTH

X and Y are normalised to [0, 1] (x by the image width, y by its height, origin top-left) and the
duration is in milliseconds. Every row is validated; a bad row raises :class:`FixationFormatError`
naming the file, the line number and what is wrong, so nothing is silently dropped.

Extra columns are accepted and ignored, except ``ANNOTATOR`` (written by ``gazemonai annotate``): the
fixations of two annotators on one image are never merged. Reading such a file needs ``annotator=``
(``--annotator`` on the command line) to pick one; without it, an image looked at by more than one
annotator is an error naming them, while a file whose images each have a single annotator reads as is.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FixationFormatError, MissingInputError
from ..prep.io import validate_image_name

__all__ = [
    "REQUIRED_COLUMNS",
    "ALL_COLUMNS",
    "FixationFormatError",
    "ImageFixations",
    "read_fixation_csv",
    "write_fixation_csv",
    "validate_image_name",
]

#: Columns the pipeline needs. ``CURRENT_FIX_PUPIL``/``CURRENT_FIX_START`` are optional.
REQUIRED_COLUMNS = (
    "IMAGE",
    "CURRENT_FIX_INDEX",
    "CURRENT_FIX_X",
    "CURRENT_FIX_Y",
    "CURRENT_FIX_DURATION",
    "IMAGE_HEIGHT",
    "IMAGE_WIDTH",
)
#: The full GazeMedSeg schema, in file order (what :func:`write_fixation_csv` writes).
ALL_COLUMNS = (
    "IMAGE",
    "CURRENT_FIX_INDEX",
    "CURRENT_FIX_X",
    "CURRENT_FIX_Y",
    "CURRENT_FIX_DURATION",
    "CURRENT_FIX_PUPIL",
    "CURRENT_FIX_START",
    "IMAGE_HEIGHT",
    "IMAGE_WIDTH",
)


@dataclass
class ImageFixations:
    """The fixations recorded on one image, in viewing order.

    Args:
        image: the ``IMAGE`` value of the CSV (a file name such as ``cju0qkwl35piu0993l0dewei2.jpg``).
        xy: (N, 2) float array of normalised (x, y) positions, origin top-left.
        duration: (N,) float array of durations in milliseconds.
        height: image height recorded with the gaze (``IMAGE_HEIGHT``).
        width: image width recorded with the gaze (``IMAGE_WIDTH``).
        index: (N,) ``CURRENT_FIX_INDEX`` values.
        start: (N,) ``CURRENT_FIX_START`` values (ms), NaN where absent.
        pupil: (N,) ``CURRENT_FIX_PUPIL`` values, NaN where absent.
        rows: (N,) line numbers in the source file (1-based, header = line 1), for error messages.
    """

    image: str
    xy: np.ndarray
    duration: np.ndarray
    height: int
    width: int
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    start: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pupil: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.duration.shape[0])

    @property
    def stem(self) -> str:
        """The image id: ``IMAGE`` without its extension."""
        return os.path.splitext(self.image)[0]

    def as_array(self) -> np.ndarray:
        """(N, 3) float64 array of (x, y, duration): the form the heatmap transforms take."""
        return np.concatenate([self.xy, self.duration[:, None]], axis=1)


def _number(value: str | None, column: str, where: str) -> float:
    if value is None or value.strip() == "":
        raise FixationFormatError(f"{where}: {column} is empty")
    try:
        out = float(value)
    except ValueError:
        raise FixationFormatError(f"{where}: {column}={value!r} is not a number") from None
    if math.isnan(out) or math.isinf(out):
        raise FixationFormatError(f"{where}: {column}={value!r} is not a finite number")
    return out


def _optional_number(value: str | None, column: str, where: str) -> float:
    if value is None or value.strip() == "":
        return float("nan")
    return _number(value, column, where)


def _decode_error(path: Path, error: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8 text: its line (the decoder reads ahead, so find it in the bytes)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        offset = error.start
    except UnicodeDecodeError as e:
        offset = e.start
    line = data[:offset].count(b"\n") + 1
    byte = f"0x{data[offset]:02x}" if offset < len(data) else "the end"
    return f"{path}, line {line}: not UTF-8 text (byte {byte} at offset {offset}); save the CSV as UTF-8"


def _rows(reader: csv.DictReader):
    """The reader's rows; a CSV error names the line where the broken record starts."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise csv.Error(f"line {reader.line_num + 1}: {e}") from e  # the record that starts there


def _read_rows(path: Path, per_image: dict, annotator: str | None = None) -> int:
    """Validate every row of ``path`` into ``per_image``; returns the number of rows.

    With ``annotator``, rows of other annotators are validated but not kept. Each image's record holds
    the set of annotators whose rows it has (``"annotators"``; ``None`` when the file has no such column).
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise FixationFormatError(f"{path}: the file is empty (no header, no rows)")
        header = [c.strip() for c in reader.fieldnames]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise FixationFormatError(
                f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(header)}"
            )
        if annotator is not None and "ANNOTATOR" not in header:
            raise FixationFormatError(
                f"{path}: an annotator ({annotator!r}) was asked for but the file has no ANNOTATOR column"
            )
        has_annotator = "ANNOTATOR" in header
        sizes: dict[str, tuple[tuple[int, int], int]] = {}
        reader.fieldnames = header
        n_rows = 0
        for row in _rows(reader):
            n_rows += 1
            line = reader.line_num
            where = f"{path}, line {line}"
            if None in row:
                raise FixationFormatError(f"{where}: more fields than the header has")
            name = validate_image_name((row["IMAGE"] or "").strip(), where)
            x = _number(row["CURRENT_FIX_X"], "CURRENT_FIX_X", where)
            y = _number(row["CURRENT_FIX_Y"], "CURRENT_FIX_Y", where)
            dur = _number(row["CURRENT_FIX_DURATION"], "CURRENT_FIX_DURATION", where)
            idx = _number(row["CURRENT_FIX_INDEX"], "CURRENT_FIX_INDEX", where)
            h = _number(row["IMAGE_HEIGHT"], "IMAGE_HEIGHT", where)
            w = _number(row["IMAGE_WIDTH"], "IMAGE_WIDTH", where)
            start = _optional_number(row.get("CURRENT_FIX_START"), "CURRENT_FIX_START", where)
            pupil = _optional_number(row.get("CURRENT_FIX_PUPIL"), "CURRENT_FIX_PUPIL", where)
            if not 0.0 <= x <= 1.0:
                raise FixationFormatError(f"{where}: CURRENT_FIX_X={x} is outside [0, 1] (image {name})")
            if not 0.0 <= y <= 1.0:
                raise FixationFormatError(f"{where}: CURRENT_FIX_Y={y} is outside [0, 1] (image {name})")
            if dur <= 0:
                raise FixationFormatError(
                    f"{where}: CURRENT_FIX_DURATION={dur} must be positive (image {name})"
                )
            if h <= 0 or w <= 0 or h != int(h) or w != int(w):
                raise FixationFormatError(
                    f"{where}: IMAGE_HEIGHT/IMAGE_WIDTH={h}/{w} must be positive integers (image {name})"
                )
            hw, first_line = sizes.setdefault(name, ((int(h), int(w)), line))
            if hw != (int(h), int(w)):
                raise FixationFormatError(
                    f"{where}: image {name} has size {int(h)}x{int(w)} here but "
                    f"{hw[0]}x{hw[1]} at line {first_line}"
                )
            who = None
            if has_annotator:
                who = (row["ANNOTATOR"] or "").strip()
                if not who:
                    raise FixationFormatError(f"{where}: ANNOTATOR is empty (image {name})")
                if annotator is not None and who != annotator:
                    continue
            rec = per_image.get(name)
            if rec is None:
                rec = per_image[name] = {"hw": hw, "first_line": line, "cols": [], "annotators": set()}
            rec["annotators"].add(who)
            rec["cols"].append((idx, x, y, dur, start, pupil, line))
    return n_rows


def read_fixation_csv(
    path: str | os.PathLike,
    images: Iterable[str] | None = None,
    annotator: str | None = None,
) -> dict[str, ImageFixations]:
    """Read and validate a GazeMedSeg-style fixation CSV.

    Args:
        path: the CSV file.
        images: optional subset of ``IMAGE`` values (or their stems) to keep; rows of other images are
            still validated, so a broken file is never half-read.
        annotator: keep only this ``ANNOTATOR``'s rows (files written by ``gazemonai annotate``).

    Returns:
        ``{IMAGE: ImageFixations}``, in order of first appearance, fixations sorted by
        ``CURRENT_FIX_INDEX``.

    Raises:
        MissingInputError: when the file does not exist (a ``FileNotFoundError``).
        FixationFormatError: for an empty file, missing columns, a non-numeric/NaN/infinite value, a
            coordinate outside [0, 1], a non-positive duration or image size, an IMAGE with a path
            separator or ``..``, duplicated fixation indices, or image sizes that change between
            rows of one image, an ``annotator`` asked of a file without that column or without rows
            of that annotator, or (without ``annotator``) an image with rows of several annotators.
            The message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"fixation CSV not found: {path}")
    wanted = None
    if images is not None:
        wanted = set()
        for name in images:
            wanted.add(name)
            wanted.add(os.path.splitext(name)[0])

    per_image: dict[str, dict[str, list]] = {}
    try:
        n_rows = _read_rows(path, per_image, annotator)
    except UnicodeDecodeError as e:
        raise FixationFormatError(_decode_error(path, e)) from e
    except csv.Error as e:  # e.g. an unclosed quote swallowing the rest of the file into one field
        raise FixationFormatError(f"{path}, {e}; an unclosed quote?") from e
    if n_rows == 0:
        raise FixationFormatError(f"{path}: the file has a header but no fixation rows")
    if annotator is not None and not per_image:
        raise FixationFormatError(f"{path}: no fixation rows of annotator {annotator!r}")

    out: dict[str, ImageFixations] = {}
    for name, rec in per_image.items():
        if wanted is not None and name not in wanted and os.path.splitext(name)[0] not in wanted:
            continue
        if len(rec["annotators"]) > 1:
            raise FixationFormatError(
                f"{path}, line {rec['first_line']}: image {name} has fixations of "
                f"{len(rec['annotators'])} annotators ({', '.join(sorted(rec['annotators']))}); they are "
                "never merged: choose one with --annotator"
            )
        arr = np.asarray(rec["cols"], dtype=np.float64)
        order = np.argsort(arr[:, 0], kind="stable")
        arr = arr[order]
        dup = np.nonzero(np.diff(arr[:, 0]) == 0)[0]
        if dup.size:
            raise FixationFormatError(
                f"{path}, line {int(arr[dup[0] + 1, 6])}: image {name} repeats "
                f"CURRENT_FIX_INDEX={int(arr[dup[0], 0])}"
            )
        out[name] = ImageFixations(
            image=name,
            xy=arr[:, 1:3].copy(),
            duration=arr[:, 3].copy(),
            height=rec["hw"][0],
            width=rec["hw"][1],
            index=arr[:, 0].astype(np.int64),
            start=arr[:, 4].copy(),
            pupil=arr[:, 5].copy(),
            rows=arr[:, 6].astype(np.int64),
        )
    return out


def write_fixation_csv(path: str | os.PathLike, fixations: Mapping[str, ImageFixations] | Iterable) -> Path:
    """Write fixation tables in the GazeMedSeg schema (the inverse of :func:`read_fixation_csv`).

    Args:
        path: output CSV path; parent folders are created.
        fixations: a mapping or an iterable of :class:`ImageFixations`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = fixations.values() if isinstance(fixations, Mapping) else fixations
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(ALL_COLUMNS)
        for fx in items:
            validate_image_name(fx.image)
            n = len(fx)
            index = fx.index if len(fx.index) == n else np.arange(1, n + 1)
            start = fx.start if len(fx.start) == n else np.full(n, np.nan)
            pupil = fx.pupil if len(fx.pupil) == n else np.full(n, np.nan)
            for i in range(n):
                writer.writerow(
                    [
                        fx.image,
                        int(index[i]),
                        repr(float(fx.xy[i, 0])),
                        repr(float(fx.xy[i, 1])),
                        _fmt(fx.duration[i]),
                        "" if np.isnan(pupil[i]) else _fmt(pupil[i]),
                        "" if np.isnan(start[i]) else _fmt(start[i]),
                        f"{float(fx.height):.1f}",
                        f"{float(fx.width):.1f}",
                    ]
                )
    return path


def _fmt(v: float) -> str:
    v = float(v)
    return str(int(v)) if v == int(v) else repr(v)
