"""Pseudo-masks for a whole dataset folder: parallel, resumable, with a manifest and a summary.

Layout read::

    DATA_ROOT/images/<IMAGE>     (or the same stem with another image extension)
    DATA_ROOT/masks/<IMAGE>      optional ground truth, for the Dice summary

Layout written::

    OUT/heatmap/<id>.png         16-bit PNG, heatmap in [0, 1]
    OUT/refined/<id>.png         16-bit PNG, CRF-refined map in [0, 1]
    OUT/level_<k>/<id>.png       8-bit 0/255 pseudo-mask of level k (k = 1..N, thresholds in order)
    OUT/records.jsonl            one line per processed image, appended as each finishes
    OUT/manifest.json            parameters, per-level folders, summary, skipped/failed images

What happens to bad input (all counted and listed in the summary and the manifest):

* a fixation CSV that breaks the schema stops the run before any work, naming file, line and problem;
* an image listed in the CSV but absent from ``images/`` is *skipped* (``missing``), as is an image in
  ``images/`` that has no fixations (``no_gaze``) — e.g. a held-out test set; ``strict=True`` makes
  both errors;
* an unreadable/corrupt image, or a mask whose size differs from its image, *fails* that image with
  its reason; the others go on; the CLI exits non-zero when any image failed.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError, MissingInputError
from ..metrics import EMPTY_CONVENTION, dice_score
from ..prep.io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    exclusive_folder,
    read_image,
    read_mask,
    resolve_in_folder,
    validate_image_name,
    write_png,
)
from .fixations import ImageFixations, read_fixation_csv
from .pseudo_masks import PseudoMaskConfig, make_pseudo_masks

__all__ = ["PseudoMaskJob", "run_pseudo_masks", "level_dirs"]

logger = logging.getLogger(__name__)


def level_dirs(n_levels: int) -> list[str]:
    return [f"level_{k + 1}" for k in range(n_levels)]


@dataclass
class PseudoMaskJob:
    image_path: str
    mask_path: str | None
    fixations: ImageFixations
    out_dir: str
    config: PseudoMaskConfig
    save_maps: bool = True


def _output_files(out_dir: Path, stem: str, n_levels: int, save_maps: bool) -> list[Path]:
    files = [out_dir / d / f"{stem}.png" for d in level_dirs(n_levels)]
    if save_maps:
        files += [out_dir / "heatmap" / f"{stem}.png", out_dir / "refined" / f"{stem}.png"]
    return files


def _process(job: PseudoMaskJob) -> dict:
    """Worker: one image -> files; returns its record (never raises for per-image problems)."""
    stem = job.fixations.stem
    rec: dict = {"image": job.fixations.image, "id": stem, "digest": job.config.digest()}
    rec["inputs"] = _inputs_digest(job)
    t0 = time.perf_counter()
    try:
        img = read_image(job.image_path)
        size = img.shape[:2]
        gt = read_mask(job.mask_path, size) if job.mask_path else None
        if (job.fixations.height, job.fixations.width) != tuple(size):
            rec["gaze_size"] = [job.fixations.height, job.fixations.width]
        res = make_pseudo_masks(img, job.fixations.as_array(), job.config)
        out = Path(job.out_dir)
        written = []
        if job.save_maps:
            written.append(write_png(out / "heatmap" / f"{stem}.png", res.heatmap))
            written.append(write_png(out / "refined" / f"{stem}.png", res.refined))
        for d, lvl in zip(level_dirs(len(res.levels)), res.levels):
            written.append(write_png(out / d / f"{stem}.png", lvl.astype(bool)))
        # what a resumed run checks before it trusts these files: each one's content, as written
        rec["files"] = {p.relative_to(out).as_posix(): _sha256(p) for p in written}
        rec["status"] = "done"
        rec["size"] = list(size)
        rec["fixations"] = len(job.fixations)
        if gt is not None:
            rec["dice"] = [dice_score(lvl, gt) for lvl in res.levels]
    except (ImageReadError, ValueError, OSError) as e:
        rec["status"] = "failed"
        rec["error"] = str(e)
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    return rec


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _inputs_digest(job: PseudoMaskJob) -> str | None:
    """What an image's outputs were made from: the image file, its fixations and its mask (for the Dice)."""
    h = hashlib.sha256(job.fixations.as_array().tobytes())
    for path in (job.image_path, job.mask_path):
        try:
            h.update(Path(path).read_bytes() if path else b"-")
        except OSError:
            return None  # unreadable: the job itself will say so
    return h.hexdigest()


def _complete(record: dict | None, out_dir: Path, files: list[Path], digest: str, job: PseudoMaskJob) -> bool:
    """A record a resumed run may trust: done with these parameters from these very inputs (image,
    fixations, mask), and every file still as it was written."""
    if record is None or record.get("status") != "done" or record.get("digest") != digest:
        return False
    if record.get("inputs") is None or record.get("inputs") != _inputs_digest(job):
        return False
    hashes = record.get("files") or {}
    for path in files:
        rel = path.relative_to(out_dir).as_posix()
        if rel not in hashes or not path.is_file() or _sha256(path) != hashes[rel]:
            return False
    return True


def _init_worker(parent: int) -> None:
    """A pool worker: one thread for torch, and it ends when the process that started the run dies."""
    import torch

    torch.set_num_threads(1)
    if os.getppid() == parent:  # forked by the run itself (not by a forkserver)
        try:  # Linux: the kernel kills this worker when its parent dies, even by kill -9
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="watch-parent").start()


def _watch_parent(parent: int) -> None:
    """Everywhere else (and as a second line): exit once the run's process is gone."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:  # the pid was reused by another user's process: the run is gone
            os._exit(1)


def _load_records(path: Path) -> dict[str, dict]:
    records: dict[str, dict] = {}
    if path.is_file():
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash: that image is simply redone
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                    logger.warning("%s: a line that is not a record of this command: skipped", path)
                    continue
                records[rec["id"]] = rec
    return records


def run_pseudo_masks(
    data_root: str | os.PathLike,
    gaze_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: PseudoMaskConfig | None = None,
    images_dir: str = "images",
    masks_dir: str | None = "masks",
    ids: Iterable[str] | None = None,
    limit: int | None = None,
    workers: int | None = None,
    strict: bool = False,
    save_maps: bool = True,
    progress: bool = True,
    annotator: str | None = None,
) -> dict:
    """Make pseudo-masks for every image of ``gaze_csv`` (or of ``ids``) under ``data_root``.

    Args:
        data_root: dataset folder holding ``images_dir`` and optionally ``masks_dir``.
        gaze_csv: fixation CSV (GazeMedSeg schema).
        out_dir: where maps, pseudo-masks, records and the manifest go.
        config: the chain's parameters (default: the Kvasir-SEG recipe).
        images_dir: image sub-folder of ``data_root``.
        masks_dir: ground-truth sub-folder (``None`` or absent: no Dice).
        ids: image ids or names to process (default: every image of the CSV), e.g. a split file's lines.
        limit: process at most this many images (after ordering), for trials.
        workers: processes (default: all cores).
        strict: raise on missing images / images without gaze instead of skipping them.
        save_maps: also write the heatmap and refined map (not only the pseudo-masks).
        progress: show a progress bar.
        annotator: use only this ``ANNOTATOR``'s fixations (CSVs written by ``gazemonai annotate``).

    Returns:
        the summary: counts of done/skipped/failed images, mean Dice per level, output folders.
    """
    config = config or PseudoMaskConfig()
    data_root, out_dir = Path(data_root), Path(out_dir)
    img_folder = data_root / images_dir
    if not img_folder.is_dir():
        raise MissingInputError(f"image folder not found: {img_folder}")
    mask_folder = data_root / masks_dir if masks_dir else None
    if mask_folder is not None and not mask_folder.is_dir():
        mask_folder = None
    fixations = read_fixation_csv(gaze_csv, annotator=annotator)
    by_stem = {fx.stem: fx for fx in fixations.values()}

    if ids is None:
        wanted = list(by_stem)
    else:
        wanted = []
        for raw in ids:
            raw = raw.strip()
            if raw:
                validate_image_name(raw, "ids")
                wanted.append(os.path.splitext(raw)[0] if raw.lower().endswith(IMAGE_EXTENSIONS) else raw)
    if limit is not None:
        wanted = wanted[: int(limit)]

    out_dir.mkdir(parents=True, exist_ok=True)
    n_levels = len(config.thresholds)
    with exclusive_folder(out_dir, "`gazemonai pseudo-masks`", "--out"):
        skipped: dict[str, list[str]] = {"missing": [], "no_gaze": [], "resumed": []}
        records_path = out_dir / "records.jsonl"
        if records_path.is_symlink():  # appending would write wherever it points
            raise InvalidInputError(f"{records_path} is a symlink (to {records_path.resolve()}): refused")
        previous = _load_records(records_path)
        digest = config.digest()
        jobs: list[PseudoMaskJob] = []
        for stem in wanted:
            fx = by_stem.get(stem)
            if fx is None:
                if strict:
                    raise InvalidInputError(f"{gaze_csv}: no fixations for image {stem!r}")
                skipped["no_gaze"].append(stem)
                continue
            try:
                image_path = resolve_in_folder(img_folder, fx.image)
            except FileNotFoundError as e:
                if strict:
                    raise
                logger.debug("%s", e)
                skipped["missing"].append(stem)
                continue
            mask_path = None
            if mask_folder is not None:
                try:
                    mask_path = str(resolve_in_folder(mask_folder, fx.image))
                except FileNotFoundError:
                    mask_path = None
            job = PseudoMaskJob(str(image_path), mask_path, fx, str(out_dir), config, save_maps)
            if _complete(
                previous.get(stem), out_dir, _output_files(out_dir, stem, n_levels, save_maps), digest, job
            ):
                skipped["resumed"].append(stem)
                continue
            jobs.append(job)

        workers = max(1, int(workers or os.cpu_count() or 1))
        new_records: list[dict] = []
        t0 = time.perf_counter()
        bar = None
        if progress and jobs:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc="pseudo-masks", unit="img")
        with open(records_path, "a") as rec_file:

            def _keep(rec: dict):
                rec["maps"] = save_maps
                rec_file.write(json.dumps(rec) + "\n")
                rec_file.flush()
                new_records.append(rec)
                if rec["status"] == "failed":
                    logger.warning("failed: %s: %s", rec["image"], rec["error"])
                if bar is not None:
                    bar.update(1)

            if workers == 1 or len(jobs) <= 1:
                for job in jobs:
                    _keep(_process(job))
            else:
                with ProcessPoolExecutor(
                    max_workers=min(workers, len(jobs)), initializer=_init_worker, initargs=(os.getpid(),)
                ) as pool:
                    for rec in pool.map(_process, jobs, chunksize=1):
                        _keep(rec)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0

        # the summary covers every image of this run, including those done by an earlier, resumed run
        all_records = _load_records(records_path)
        considered = [
            all_records[s] for s in wanted if s in all_records and all_records[s].get("digest") == digest
        ]
        done = [r for r in considered if r["status"] == "done"]
        failed = [r for r in new_records if r["status"] == "failed"]
        dice = {}
        with_gt = [r for r in done if "dice" in r]
        if with_gt:
            for k, t in enumerate(config.thresholds):
                dice[f"level_{k + 1}"] = {
                    "threshold": t,
                    "mean_dice": float(np.mean([r["dice"][k] for r in with_gt])),
                }
        summary = {
            "images_requested": len(wanted),
            "done": len(new_records) - len(failed),
            "resumed": len(skipped["resumed"]),
            "skipped_missing": len(skipped["missing"]),
            "skipped_no_gaze": len(skipped["no_gaze"]),
            "failed": len(failed),
            "images_with_gt": len(with_gt),
            "dice_vs_gt": dice,
            "dice_convention": EMPTY_CONVENTION if dice else None,
            "gaze_size_mismatch": sum(1 for r in done if "gaze_size" in r),
            "seconds": round(elapsed, 2),
            "s_per_image": round(elapsed / max(1, len(new_records)), 4),
            "workers": workers,
        }
        manifest = {
            "tool": "gazemonai pseudo-masks",
            "data_root": str(data_root),
            "gaze_csv": str(gaze_csv),
            "annotator": annotator,
            "config": config.to_dict(),
            "digest": digest,
            "outputs": {
                "heatmap": "heatmap" if save_maps else None,
                "refined": "refined" if save_maps else None,
                "levels": dict(zip(level_dirs(n_levels), config.thresholds)),
            },
            "summary": summary,
            "skipped": {k: v for k, v in skipped.items() if k != "resumed"},
            "failed": {r["id"]: r["error"] for r in failed},
            "completed": sorted(r["id"] for r in done),
        }
        tmp = out_dir / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, out_dir / "manifest.json")
    return summary
