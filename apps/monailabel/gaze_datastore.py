"""Gaze as a MONAI Label label: fixations stored per image under the tag ``gaze``, validated on upload.

``PUT /datastore/label?image=<id>&tag=gaze`` (MONAI Label's own endpoint) with a CSV file in the
GazeMedSeg columns (``IMAGE, CURRENT_FIX_INDEX, CURRENT_FIX_X, CURRENT_FIX_Y, CURRENT_FIX_DURATION,
IMAGE_HEIGHT, IMAGE_WIDTH``; ``CURRENT_FIX_PUPIL``, ``CURRENT_FIX_START`` and extra columns such as
``gazemonai annotate``'s are kept) saves one annotator's fixations on one image. The upload is read by
the same reader as ``gazemonai pseudo-masks`` (:func:`gazemonai.gaze.fixations.read_fixation_csv`)
and must also name only that image, at that image's size, and one annotator (an ``ANNOTATOR``
column, or ``{"annotator": NAME}`` in the request's ``params``). A bad upload is answered with HTTP
422 and a one-line message naming the line and what is wrong; nothing is stored.

Annotators are kept apart: the stored ``labels/gaze/<id>.csv`` holds every annotator's rows with
their ``ANNOTATOR``; a new upload by one annotator replaces that annotator's rows only.
Masks saved with the ordinary tag (``final``, from 3D Slicer / OHIF) are untouched: strong labels.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
from pathlib import Path

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import LocalDatastore
from PIL import Image

from gazemonai.errors import GazemonaiError
from gazemonai.gaze.fixations import read_fixation_csv

logger = logging.getLogger(__name__)

GAZE_TAG = "gaze"
ANNOTATOR = "ANNOTATOR"


class GazeUploadError(ValueError):
    """A gaze upload that cannot be stored; the message says what is wrong."""


def image_size(path: str) -> tuple[int, int]:
    """``(height, width)`` of a 2-D image file."""
    with Image.open(path) as im:
        return im.height, im.width


def validate_gaze_upload(
    path: str, image_id: str, size: tuple[int, int], annotator: str | None
) -> list[dict]:
    """The upload's rows, each with its ``ANNOTATOR``, once every check has passed.

    Args:
        path: the uploaded CSV.
        image_id: the datastore image the label is saved for.
        size: that image's ``(height, width)``.
        annotator: the annotator named in the request (``None``: the file's ``ANNOTATOR`` column).

    Raises:
        GazeUploadError: naming the line and the problem (the reader's checks, then: rows of another
            image, an image size other than the image's, no annotator or several).
    """
    where = f"gaze upload for image {image_id}"
    try:
        per_image = read_fixation_csv(path)
    except (GazemonaiError, OSError, csv.Error) as e:
        raise GazeUploadError(str(e).replace(str(path), where)) from None
    others = [name for name in per_image if os.path.splitext(name)[0] != image_id]
    if others:
        raise GazeUploadError(f"{where}: rows for other image(s) {', '.join(sorted(others))}")
    if not per_image:
        raise GazeUploadError(f"{where}: no fixation rows")
    (fixations,) = per_image.values()
    if (fixations.height, fixations.width) != tuple(size):
        raise GazeUploadError(
            f"{where}: IMAGE_HEIGHT/IMAGE_WIDTH {fixations.height}x{fixations.width} (line "
            f"{int(fixations.rows[0])}) differ from the image's {size[0]}x{size[1]}"
        )
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
        rows = [dict(r) for r in reader]
    named = {(r.get(ANNOTATOR) or "").strip() for r in rows} - {""}
    if annotator is not None:
        annotator = str(annotator).strip()
        if not annotator:
            raise GazeUploadError(f"{where}: params annotator is empty")
        if named - {annotator}:
            raise GazeUploadError(
                f"{where}: params name annotator {annotator!r} but the ANNOTATOR column has {sorted(named)}"
            )
    elif len(named) != 1:
        raise GazeUploadError(
            f'{where}: name one annotator (an ANNOTATOR column or params {{"annotator": ...}}); '
            f"found {sorted(named) or 'none'}"
        )
    else:
        (annotator,) = named
    for r in rows:
        r[ANNOTATOR] = annotator
    return rows


def merge_rows(stored: str | None, rows: list[dict]) -> tuple[list[str], list[dict]]:
    """``(columns, rows)``: ``stored``'s rows of other annotators, then ``rows`` (one annotator's)."""
    annotator = rows[0][ANNOTATOR]
    kept: list[dict] = []
    columns: list[str] = []
    if stored and os.path.isfile(stored):
        with open(stored, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            kept = [r for r in reader if r.get(ANNOTATOR) != annotator]
    for r in rows:
        columns += [c for c in r if c not in columns]
    return columns, kept + rows


class GazeDatastore(LocalDatastore):
    """MONAI Label's ``LocalDatastore`` that validates and merges ``gaze`` labels (see the module)."""

    def gaze_lock(self) -> FileLock:
        """Held while a gaze label is written or read whole (saves by several annotators, training)."""
        return FileLock(os.path.join(self._datastore.label_path(None), ".gaze.lock"))

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        if label_tag != GAZE_TAG:
            return super().save_label(image_id, label_filename, label_tag, label_info)
        label_info = dict(label_info or {})
        try:
            if image_id not in self._datastore.objects:
                raise GazeUploadError(f"gaze upload: no image {image_id!r} in the datastore")
            if Path(label_filename).suffix.lower() != ".csv":
                raise GazeUploadError(
                    f"gaze upload for image {image_id}: a .csv file in the GazeMedSeg columns is "
                    f"expected, got {Path(label_filename).name!r}"
                )
            size = image_size(self.get_image_uri(image_id))
            rows = validate_gaze_upload(label_filename, image_id, size, label_info.pop("annotator", None))
        except GazeUploadError as e:
            logger.warning("refused: %s", e)
            raise HTTPException(status_code=422, detail=str(e)) from None
        annotator = rows[0][ANNOTATOR]
        os.makedirs(self._datastore.label_path(None), exist_ok=True)
        with self.gaze_lock():
            stored = self.gaze_path(image_id)
            columns, merged = merge_rows(stored, rows)
            with tempfile.TemporaryDirectory() as folder:
                tmp = os.path.join(folder, "gaze.csv")  # the stored label's extension: .csv
                with open(tmp, "w", newline="", encoding="utf-8") as f:
                    writer = csv.DictWriter(f, fieldnames=columns, restval="")
                    writer.writeheader()
                    writer.writerows(merged)
                annotators = sorted({r[ANNOTATOR] for r in merged})
                label_info.update({"annotators": annotators, "fixations": len(merged)})
                label_id = super().save_label(image_id, tmp, GAZE_TAG, label_info)
        logger.info(
            "gaze of %s on %s saved (%d fixations; annotators %s)", annotator, image_id, len(rows), annotators
        )
        return label_id

    def gaze_path(self, image_id: str) -> str | None:
        """The stored gaze CSV of ``image_id``, or ``None``."""
        obj = self._datastore.objects.get(image_id)
        label = obj.labels.get(GAZE_TAG) if obj else None
        if not label:
            return None
        path = os.path.join(self._datastore.label_path(GAZE_TAG), self._filename(image_id, label.ext))
        return path if os.path.isfile(path) else None
