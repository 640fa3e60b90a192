"""Record step 1: raw gaze samples, as a tracker (or the page's pointer) delivers them, and their file.

A sample is one time-stamped screen position with the tracker's validity flag. Positions are normalised
to the screen, origin top-left (the convention of the Gazepoint Open Gaze API and the Tobii Pro SDK), so a
recording does not depend on the screen's pixel count. The raw file of a recording is a plain CSV::

    t,x,y,valid
    0.000000,0.512300,0.498100,1

``t`` in seconds on the source's clock; invalid samples (blinks, a lost eye) keep whatever position the
tracker sent (often 0, or NaN written as an empty field) and ``valid = 0``. Nothing is dropped on
writing: the raw file is the full record of a session, from which fixations can be re-detected.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInputError, MissingInputError

__all__ = ["GazeSample", "RAW_COLUMNS", "read_raw_samples", "write_raw_samples"]

#: The header of a raw sample file.
RAW_COLUMNS = ("t", "x", "y", "valid")


@dataclass(frozen=True)
class GazeSample:
    """One gaze sample.

    Args:
        t: seconds on the source's clock (non-decreasing within one recording).
        x: horizontal screen position normalised to [0, 1], origin left (NaN allowed when invalid).
        y: vertical screen position normalised to [0, 1], origin top (NaN allowed when invalid).
        valid: False for tracker-flagged invalid samples (blink, lost eye).
    """

    t: float
    x: float
    y: float
    valid: bool = True


def _fmt(v: float) -> str:
    return "" if math.isnan(v) else repr(float(v))


def write_raw_samples(path: str | os.PathLike, samples: Iterable[GazeSample]) -> Path:
    """Write a recording's raw samples to ``path`` atomically (a temporary file, fsync'd, then renamed).

    Args:
        path: the raw sample CSV (one file per recording); parent folders are created.
        samples: the samples, in recording order.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(RAW_COLUMNS)
            for s in samples:
                w.writerow([repr(float(s.t)), _fmt(s.x), _fmt(s.y), 1 if s.valid else 0])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _float(value: str | None, column: str, where: str, *, allow_empty: bool) -> float:
    value = (value or "").strip()
    if value == "":
        if allow_empty:
            return float("nan")
        raise InvalidInputError(f"{where}: {column} is empty")
    try:
        out = float(value)
    except ValueError:
        raise InvalidInputError(f"{where}: {column}={value!r} is not a number") from None
    if math.isinf(out) or (math.isnan(out) and not allow_empty):
        raise InvalidInputError(f"{where}: {column}={value!r} is not a finite number")
    return out


def read_raw_samples(path: str | os.PathLike) -> list[GazeSample]:
    """Read a raw sample file written by :func:`write_raw_samples` (or by hand in the same format).

    Raises:
        MissingInputError: the file does not exist.
        InvalidInputError: a missing column, a non-numeric value, a valid sample without a position, a
            validity flag other than 0/1, or a time that goes backwards; the message names file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"raw gaze sample file not found: {path}")
    out: list[GazeSample] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in RAW_COLUMNS if c not in header]
        if missing:
            raise InvalidInputError(
                f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(header)}"
            )
        reader.fieldnames = header
        last = -math.inf
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            flag = (row["valid"] or "").strip()
            if flag not in ("0", "1"):
                raise InvalidInputError(f"{where}: valid={flag!r} must be 0 or 1")
            valid = flag == "1"
            t = _float(row["t"], "t", where, allow_empty=False)
            x = _float(row["x"], "x", where, allow_empty=not valid)
            y = _float(row["y"], "y", where, allow_empty=not valid)
            if t < last:
                raise InvalidInputError(f"{where}: t={t} goes back in time (previous {last})")
            last = t
            out.append(GazeSample(t, x, y, valid))
    return out
