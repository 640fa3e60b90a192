"""Image-level labels for the image-label prompt (stage 1 of :mod:`gazemonai.train.prompt`).

Users' data comes as either

* a **folder** with one sub-folder per class, ``ROOT/<class>/<image>`` (every sub-folder must be one
  of the classes, and no image may lie beside them), or
* a **CSV** with columns ``image,label`` and optionally ``group``: ``image`` a path (relative to
  the CSV's folder, or absolute), ``label`` a class name or its index, ``group`` what must stay on
  one side of the validation split (the source image of several crops, the patient of several
  slices; default: the image itself).

For our data sets the labels are derived with the masks (:func:`derive_crop_labels` for Kvasir-SEG,
:func:`derive_slice_labels` for prostate volumes), from the training images only: the validation
and test images of the segmentation split are never read.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InvalidInputError, MissingInputError
from .io import IMAGE_EXTENSIONS, exclusive_folder, read_image, read_mask, resolve_in_folder, write_png

__all__ = [
    "LabelledImage",
    "read_image_labels",
    "derive_crop_labels",
    "derive_slice_labels",
    "CROP_CLASSES",
    "SLICE_CLASSES",
]

logger = logging.getLogger(__name__)

#: class names of the derived Kvasir-SEG crops (index 0 negative, 1 positive)
CROP_CLASSES = ("no_polyp", "polyp")
#: class names of the derived prostate slices
SLICE_CLASSES = ("no_gland", "gland")


@dataclass(frozen=True)
class LabelledImage:
    """One image with its class index and its split group."""

    image: str
    label: int
    group: str


def _class_index(value: str, classes: Sequence[str], where: str) -> int:
    value = value.strip()
    if value in classes:
        return list(classes).index(value)
    if value.isdigit() and int(value) < len(classes):
        return int(value)
    raise InvalidInputError(
        f"{where}: label {value!r} is none of the classes {list(classes)} (or their index)"
    )


def _read_csv(path: Path, classes: Sequence[str]) -> list[LabelledImage]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"{path} is not a UTF-8 text CSV: {e}") from None
    missing = [c for c in ("image", "label") if c not in header]
    if missing:
        raise InvalidInputError(
            f"{path}: no column {' or '.join(missing)} (columns: {', '.join(header) or 'none'})"
        )
    items, seen = [], {}
    for n, row in enumerate(rows, start=2):  # row 1 is the header
        where = f"{path} row {n}"
        name = (row.get("image") or "").strip()
        if not name:
            raise InvalidInputError(f"{where}: empty image")
        if Path(name).is_absolute() or ".." in Path(name.replace("\\", "/")).parts:
            raise InvalidInputError(
                f"{where}: image {name!r} must be a path inside {path.parent} (no absolute path, no '..'), "
                "as the fixation CSV's IMAGE"
            )
        image = path.parent / name
        if not image.is_file():
            raise MissingInputError(f"{where}: image {name!r} not found (looked for {image})")
        if not image.resolve().is_relative_to(path.parent.resolve()):
            raise InvalidInputError(
                f"{where}: image {name!r} resolves to {image.resolve()}, outside {path.parent}"
            )
        key = os.path.realpath(image)
        if key in seen:
            raise InvalidInputError(f"{where}: image {name!r} is listed again (first at row {seen[key]})")
        seen[key] = n
        label = _class_index(row.get("label") or "", classes, where)
        group = (row.get("group") or "").strip() or name
        items.append(LabelledImage(str(image), label, group))
    return items


def _read_folder(root: Path, classes: Sequence[str]) -> list[LabelledImage]:
    entries = sorted(root.iterdir())
    folders = [e.name for e in entries if e.is_dir()]
    loose = [e.name for e in entries if e.is_file() and e.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        raise InvalidInputError(
            f"{root}: {len(loose)} image(s) lie beside the class folders (e.g. {loose[0]}): "
            f"put each in its class folder ({', '.join(classes)})"
        )
    unknown = [f for f in folders if f not in classes]
    if unknown:
        raise InvalidInputError(
            f"{root}: sub-folder(s) {unknown} are not among the classes {list(classes)} "
            "(set image_label_classes, or move them out)"
        )
    items = []
    for index, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                items.append(LabelledImage(str(f), index, f"{name}/{f.name}"))
    return items


def read_image_labels(source: str | os.PathLike, classes: Sequence[str]) -> list[LabelledImage]:
    """The labelled images of a class folder or an ``image,label[,group]`` CSV (see the module).

    Args:
        source: the folder or the CSV file.
        classes: class names in index order (two: negative, positive).

    Raises:
        MissingInputError: no such folder or file; a CSV row's image missing (row named).
        InvalidInputError: an unknown label or sub-folder, a repeated image, images beside the class
            folders, no images, or only one class present (a classifier needs both).
    """
    classes = [str(c) for c in classes]
    if len(classes) != 2 or len(set(classes)) != 2:
        raise InvalidInputError(
            f"image_label_classes must be two different names (negative, positive), got {classes}; "
            "more classes are not supported yet"
        )
    path = Path(source)
    if path.is_dir():
        items = _read_folder(path, classes)
    elif path.is_file():
        items = _read_csv(path, classes)
    else:
        raise MissingInputError(f"image labels {os.fspath(source)!r}: no such folder or CSV file")
    if not items:
        raise InvalidInputError(f"image labels {os.fspath(source)!r} hold no images")
    counts = np.bincount([i.label for i in items], minlength=len(classes))
    if (counts == 0).any():
        absent = [c for c, n in zip(classes, counts) if n == 0]
        raise InvalidInputError(
            f"image labels {os.fspath(source)!r} have no image of class {absent}: a classifier needs both"
        )
    logger.info(
        "image labels %s: %s", source, ", ".join(f"{c} {n}" for c, n in zip(classes, counts.tolist()))
    )
    return items


def _window_sums(mask: np.ndarray, side: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Foreground counts of every ``side`` x ``side`` window at ``stride`` (integral image)."""
    ii = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    ys = np.arange(0, mask.shape[0] - side + 1, stride)
    xs = np.arange(0, mask.shape[1] - side + 1, stride)
    y0, x0 = ys[:, None], xs[None, :]
    sums = ii[y0 + side, x0 + side] - ii[y0, x0 + side] - ii[y0 + side, x0] + ii[y0, x0]
    return sums, ys, xs


def _write_crop(image: np.ndarray, y: int, x: int, side: int, size: int, path: Path) -> None:
    crop = image[y : y + side, x : x + side]
    pil = Image.fromarray(crop)
    if side != size:
        pil = pil.resize((size, size), Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC)
    write_png(path, np.asarray(pil))


def _write_labels(out: Path, rows: list[tuple[str, str, str]], manifest: dict) -> None:
    with (out / "labels.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "group"])
        w.writerows(rows)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _fresh_folder(out: Path) -> None:
    """``out`` must be new or empty: a crop left by an earlier run would be read as a label."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(
            f"--out {out} is not an empty folder: image labels are written into a new one "
            "(a file left there by another run would count as a label)"
        )


def derive_crop_labels(
    dataset_dir: str | os.PathLike,
    ids: Sequence[str],
    out: str | os.PathLike,
    crop_fraction: float = 0.5,
    min_cover: float = 0.5,
    size: int = 128,
    seed: int = 0,
) -> dict:
    """Polyp / polyp-free crops of Kvasir-SEG-style images, chosen with their masks.

    Every Kvasir-SEG image shows a polyp, so image-level labels are made from crops: for each image,
    a square of side ``crop_fraction`` x its shorter side is placed (seeded, on a grid of 1/16 of
    that side) once where it covers at least ``min_cover`` of the polyp's pixels, or for a polyp
    larger than the square, where polyp fills at least ``min_cover`` of it (class ``polyp``), and
    once where it holds no polyp pixel at all (class ``no_polyp``). The labels come from the
    masks, so they are exact; say so when reporting what they bought. Images whose polyp leaves no
    polyp-free square (or no square covering ``min_cover`` of it) give one crop only: counted and
    logged, and listed in the manifest.

    Writes ``OUT/polyp/<id>.png``, ``OUT/no_polyp/<id>.png`` (``size`` x ``size``), ``OUT/labels.csv``
    (``image,label,group``, group = the source image) and ``OUT/manifest.json``.

    Args:
        dataset_dir: folder with ``images/`` and ``masks/``.
        ids: the images to crop (the training split only).
        out: output folder (new or empty).
        crop_fraction: crop side as a fraction of the image's shorter side, in (0, 1).
        min_cover: the share of the polyp a positive crop must cover, in (0, 1].
        size: side of the written crops, pixels.
        seed: placement seed.
    """
    if not 0.0 < crop_fraction < 1.0:
        raise InvalidInputError(f"crop_fraction must be in (0, 1), got {crop_fraction}")
    if not 0.0 < min_cover <= 1.0:
        raise InvalidInputError(f"min_cover must be in (0, 1], got {min_cover}")
    if int(size) < 8:
        raise InvalidInputError(f"size must be >= 8 pixels, got {size}")
    root, out = Path(dataset_dir), Path(out)
    if not ids:
        raise InvalidInputError(f"no images to crop under {root}")
    _fresh_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, no_negative, no_positive, empty = [], [], [], []
    with exclusive_folder(out, "`gazemonai derive-image-labels`", "--out"):
        for k, i in enumerate(ids):
            image_path = resolve_in_folder(root / "images", i)
            mask_path = resolve_in_folder(root / "masks", i)
            image = read_image(image_path)
            mask = read_mask(mask_path, image.shape[:2])
            stem = image_path.stem
            total = int(mask.sum())
            if total == 0:
                empty.append(stem)
            side = max(8, int(round(crop_fraction * min(mask.shape))))
            sums, ys, xs = _window_sums(mask, side, max(1, side // 16))
            rng = np.random.default_rng([seed, k])
            for name, ok, short in (
                (CROP_CLASSES[1], sums >= max(1, min_cover * min(total, side * side)), no_positive),
                (CROP_CLASSES[0], sums == 0, no_negative),
            ):
                where = np.argwhere(ok)
                if where.size == 0:
                    short.append(stem)
                    continue
                r, c = where[rng.integers(len(where))]
                rel = f"{name}/{stem}.png"
                _write_crop(image, int(ys[r]), int(xs[c]), side, int(size), out / rel)
                rows.append((rel, name, stem))
        manifest = {
            "kind": "crops",
            "dataset_dir": str(root),
            "images": len(ids),
            "classes": list(CROP_CLASSES),
            "counts": {c: sum(r[1] == c for r in rows) for c in CROP_CLASSES},
            "crop_fraction": crop_fraction,
            "min_cover": min_cover,
            "size": int(size),
            "seed": seed,
            "labels_from": "the masks (exact): polyp = covers >= min_cover of the polyp (or, for a polyp "
            "larger than the crop, is >= min_cover polyp), no_polyp = no polyp pixel",
            "no_polyp_free_crop": no_negative,
            "no_covering_crop": no_positive,
            "empty_masks": empty,
        }
        _write_labels(out, rows, manifest)
    if no_negative or no_positive:
        logger.warning(
            "%d image(s) have no polyp-free crop, %d no crop covering %.0f%% of the polyp: one crop each "
            "(listed in %s)",
            len(no_negative),
            len(no_positive),
            100 * min_cover,
            out / "manifest.json",
        )
    return manifest


def derive_slice_labels(cases: Sequence, out: str | os.PathLike, min_pixels: int = 1) -> dict:
    """Every axial slice of MR volumes, labelled ``gland`` (any mask voxel) or ``no_gland``.

    Unlike ``prepare-slices`` (gland slices only), all slices are written, 8-bit scaled per volume
    the same way (0.5-99.5 percentiles), as ``OUT/<class>/<PatientID>_<k>.png``, with
    ``OUT/labels.csv`` (group = patient) and ``OUT/manifest.json``.

    Args:
        cases: :class:`~gazemonai.prep.slices.VolumeCase` s (the training patients only).
        out: output folder (new or empty).
        min_pixels: gland voxels a slice needs to count as ``gland``.
    """
    from .slices import _gland_slices, scale_to_uint8, slice_name

    if not cases:
        raise InvalidInputError("no volumes to slice")
    out = Path(out)
    _fresh_folder(out)
    for case in cases:  # every volume read in full and checked before anything is written
        _gland_slices(case)
    out.mkdir(parents=True, exist_ok=True)
    rows, per_patient = [], {}
    with exclusive_folder(out, "`gazemonai derive-image-labels`", "--out"):
        for case in cases:
            image, gland, _ = _gland_slices(case)
            pixels = scale_to_uint8(image)
            counts = gland.reshape(gland.shape[0], -1).sum(1)
            for k in range(image.shape[0]):
                name = slice_name(case.patient, k)
                label = SLICE_CLASSES[int(counts[k] >= min_pixels)]
                rel = f"{label}/{name}.png"
                write_png(out / rel, pixels[k])
                rows.append((rel, label, case.patient))
            per_patient[case.patient] = {
                "slices": int(image.shape[0]),
                "gland": int((counts >= min_pixels).sum()),
            }
        manifest = {
            "kind": "slices",
            "patients": per_patient,
            "classes": list(SLICE_CLASSES),
            "counts": {c: sum(r[1] == c for r in rows) for c in SLICE_CLASSES},
            "min_pixels": min_pixels,
            "labels_from": "the gland masks: gland = at least min_pixels mask voxels on the slice",
        }
        _write_labels(out, rows, manifest)
    return manifest
