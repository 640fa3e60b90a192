"""Datalists for the bundles: which images, masks and fixations a run reads, and how splits are made.

A Kvasir-SEG-style folder::

    DATASET_DIR/images/<id>.jpg   DATASET_DIR/masks/<id>.jpg   DATASET_DIR/train.txt   DATASET_DIR/test.txt

Training uses ``train.txt`` minus a seeded validation split (``val_fraction``); model selection uses
the validation part only; ``test.txt`` is for the final evaluation. Each datalist item is
``{"image": path, "label": mask path, "fixations": (N, 3) array, "id": id}``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError, MissingInputError
from ..gaze.fixations import read_fixation_csv
from ..prep.io import IMAGE_EXTENSIONS, read_ids, resolve_in_folder, validate_image_name
from ..prep.slices import patient_of
from .hybrid import strong_ids_of

__all__ = ["read_split", "validation_split", "gaze_datalist", "split_datalist", "image_label_datalist"]

logger = logging.getLogger(__name__)


def read_split(dataset_dir: str | os.PathLike, split: str) -> list[str]:
    """Ids listed in ``DATASET_DIR/<split>`` (a file such as ``train.txt``), one per line."""
    path = Path(dataset_dir) / split
    if not path.is_file():
        raise MissingInputError(f"split file not found: {path}")
    ids = read_ids(path)
    seen = {}
    for n, i in enumerate(ids, start=1):
        validate_image_name(i, str(path))
        stem, ext = os.path.splitext(i)
        key = stem if ext.lower() in IMAGE_EXTENSIONS else i  # x and x.jpg name one image
        if key in seen:  # listed twice, one image could land in both training and validation
            raise InvalidInputError(f"split file {path}: {i!r} is listed twice (entries {seen[key]} and {n})")
        seen[key] = n
    if not ids:
        raise InvalidInputError(f"split file {path} lists no ids")
    return ids


def validation_split(
    ids: Sequence[str], fraction: float = 0.1, seed: int = 0, group: str | None = None
) -> tuple[list[str], list[str]]:
    """Seeded split of ``ids`` into (train, validation); the same seed gives the same split.

    Args:
        ids: image ids.
        fraction: share held out for validation (of the ids, or of the groups).
        seed: split seed.
        group: ``"patient"`` keeps each patient's slices (``<PatientID>_<slice>`` ids) on one side,
            ``fraction`` then counting patients; ``None`` splits images.
    """
    if not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"val_fraction must be in (0, 1), got {fraction}")
    if group is not None:
        if group != "patient":
            raise InvalidInputError(f"group must be None or 'patient', got {group!r}")
        by_patient: dict[str, list[str]] = {}
        for i in ids:
            by_patient.setdefault(patient_of(i), []).append(i)
        if len(by_patient) < 2:
            raise InvalidInputError(
                f"a patient-disjoint validation split needs 2 or more patients, got {sorted(by_patient)}"
            )
        train_p, val_p = validation_split(sorted(by_patient), fraction, seed)
        return sorted(i for p in train_p for i in by_patient[p]), sorted(
            i for p in val_p for i in by_patient[p]
        )
    ids = sorted(ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = max(1, int(round(len(ids) * fraction)))
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val


def gaze_datalist(
    dataset_dir: str | os.PathLike,
    ids: Sequence[str],
    gaze_csv: str | os.PathLike | None = None,
    images_dir: str = "images",
    masks_dir: str = "masks",
    require_masks: bool = True,
) -> list[dict]:
    """Items for ``ids``: image path, mask path and (with ``gaze_csv``) the (N, 3) fixations.

    Raises:
        MissingInputError: images (or required masks) missing on disk; the message names them.
        InvalidInputError: with ``gaze_csv``, ids that have no fixations (named).
    """
    root = Path(dataset_dir)
    fixations = None
    if gaze_csv is not None:
        fixations = {fx.stem: fx for fx in read_fixation_csv(gaze_csv).values()}
    items, missing, no_gaze = [], [], []
    for i in ids:
        try:
            image = resolve_in_folder(root / images_dir, i)
        except FileNotFoundError:
            missing.append(f"{images_dir}/{i}")
            continue
        item = {"image": str(image), "id": Path(image).stem}
        try:
            item["label"] = str(resolve_in_folder(root / masks_dir, i))
        except FileNotFoundError:
            if require_masks:
                missing.append(f"{masks_dir}/{i}")
                continue
        if fixations is not None:
            fx = fixations.get(item["id"])
            if fx is None:
                no_gaze.append(item["id"])
                continue
            item["fixations"] = fx.as_array().astype(np.float32)
        items.append(item)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MissingInputError(f"{len(missing)} file(s) missing under {root}: {shown}")
    if no_gaze:
        shown = ", ".join(no_gaze[:5]) + (f" and {len(no_gaze) - 5} more" if len(no_gaze) > 5 else "")
        raise InvalidInputError(f"{len(no_gaze)} image(s) have no fixations in {gaze_csv}: {shown}")
    return items


def split_datalist(
    dataset_dir: str | os.PathLike,
    part: str = "train",
    gaze_csv: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_split: str = "train.txt",
    test_split: str = "test.txt",
    limit: int | None = None,
    group: str | None = None,
    supervision: str = "gaze",
    strong_fraction: float | None = None,
    strong_ids: Sequence[str] | None = None,
    strong_only: bool = False,
    train_fraction: float | None = None,
    min_items: int | None = None,
) -> list[dict]:
    """The datalist of one part: ``"train"`` / ``"val"`` (seeded split of ``train_split``), ``"test"``.

    Args:
        dataset_dir: dataset folder.
        part: ``"train"``, ``"val"``, ``"test"`` or any split file name under ``dataset_dir``.
        gaze_csv: fixation CSV (needed for gaze supervision; optional for evaluation).
        val_fraction: fraction of ``train_split`` held out for validation.
        seed: validation split seed.
        train_split: file of training ids.
        test_split: file of test ids.
        limit: keep the first ``limit`` items (quick trials, tests).
        group: ``"patient"`` for a patient-disjoint validation split (slice ids ``<PatientID>_<k>``).
        supervision: ``"full"`` trains on the masks: ``gaze_csv`` is not read (a full run needs none).
        strong_fraction, strong_ids: hybrid supervision (:mod:`gazemonai.train.hybrid`): the
            training images with full masks, a seeded fraction (``seed``) or named; the training
            items get ``strong`` (1 or 0) and ``index`` (their position, the instance weights' key).
        strong_only: train on the full-mask images only (the "full masks on 10 %" baseline).
        train_fraction: train on a seeded share (``seed``) of the training images, in (0, 1]
            (label-efficiency studies: the same seed gives the same images).
        min_items: the least number of items the part may have: the trainer drops incomplete
            batches, so a training part smaller than ``batch_size`` would train nothing (refused).
    """
    if supervision == "full":
        gaze_csv = None
    if part in ("train", "val"):
        train_ids, val_ids = validation_split(read_split(dataset_dir, train_split), val_fraction, seed, group)
        ids = train_ids if part == "train" else val_ids
    elif part == "test":
        ids = read_split(dataset_dir, test_split)
    else:
        ids = read_split(dataset_dir, part)
    if limit is not None:
        ids = ids[: int(limit)]
    if train_fraction is not None and part == "train":
        if not 0.0 < float(train_fraction) <= 1.0:
            raise InvalidInputError(f"train_fraction must be in (0, 1], got {train_fraction}")
        order = np.random.default_rng([seed, 1]).permutation(len(ids))
        keep = max(1, int(round(len(ids) * float(train_fraction))))
        ids = sorted(ids[i] for i in order[:keep])
        logger.info("train: %d of the training images (train_fraction %s)", len(ids), train_fraction)
    strong = None
    if part == "train" and (strong_fraction is not None or strong_ids is not None):
        strong = {Path(i).stem for i in strong_ids_of(ids, strong_fraction, seed, strong_ids)}
        if strong_only:
            ids = [i for i in ids if Path(i).stem in strong]
    elif strong_only:
        raise InvalidInputError("strong_only needs strong_fraction or strong_ids")
    items = gaze_datalist(dataset_dir, ids, gaze_csv)
    if strong is not None:
        for index, item in enumerate(items):
            item["strong"], item["index"] = int(item["id"] in strong), index
        logger.info("%s: %d of %d images with full masks", part, sum(i["strong"] for i in items), len(items))
    if min_items is not None and len(items) < int(min_items):
        raise InvalidInputError(
            f"the {part} part of {dataset_dir} has {len(items)} image(s), fewer than the batch size "
            f"{min_items}: the trainer drops incomplete batches, so nothing would train; lower --batch_size"
        )
    logger.info("%s: %d items from %s", part, len(items), dataset_dir)
    return items


def image_label_datalist(
    source: str | os.PathLike,
    part: str = "train",
    classes: Sequence[str] = ("negative", "positive"),
    val_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    min_items: int | None = None,
) -> list[dict]:
    """Stage-1 items ``{"image": path, "label": class index, "id": group}`` of image-level labels.

    ``source`` is a class folder or an ``image,label[,group]`` CSV
    (:func:`gazemonai.prep.image_labels.read_image_labels`). ``"train"`` and ``"val"`` are a seeded
    split by group (``val_fraction`` of the groups: the crops of one image, the slices of one
    patient stay on one side); ``"all"`` is everything. ``min_items`` as :func:`split_datalist`'s.
    """
    from ..prep.image_labels import read_image_labels

    items = read_image_labels(source, classes)
    if part != "all":
        if part not in ("train", "val"):
            raise InvalidInputError(f"part must be 'train', 'val' or 'all', got {part!r}")
        groups = sorted({i.group for i in items})
        if len(groups) < 2:
            raise InvalidInputError(
                f"image labels {os.fspath(source)!r}: a validation split needs 2 or more groups"
            )
        train, val = validation_split(groups, val_fraction, seed)
        keep = set(train if part == "train" else val)
        items = [i for i in items if i.group in keep]
    if limit is not None:
        items = items[: int(limit)]
    if min_items is not None and len(items) < int(min_items):
        raise InvalidInputError(
            f"the {part} part of image labels {os.fspath(source)!r} has {len(items)} image(s), fewer than "
            f"the batch size {min_items}: the trainer drops incomplete batches; lower --batch_size"
        )
    logger.info("image labels %s: %d items", part, len(items))
    return [{"image": i.image, "label": i.label, "id": i.group} for i in items]
