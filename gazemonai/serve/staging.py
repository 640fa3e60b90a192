"""A trained bundle made servable: its configs plus a checkpoint, staged as one bundle folder.

Training writes checkpoints under its ``--bundle_root`` (``models/model.pt``) while the configs stay
in ``bundles/<name>/configs``; MONAI Label's ``BundleInferTask`` and the MLflow registry both want
one folder holding ``configs/`` and ``models/model.pt``. :func:`stage_bundle` makes it, writing the
values the checkpoint was trained with (``image_size``, ``features``, ...) into ``inference.json``.

This module needs only the standard library (and :mod:`gazemonai.errors`, which does too), so it
also runs in MONAI Label's own environment.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import InvalidInputError, MissingInputError

__all__ = ["locate_bundle", "stage_bundle"]


def locate_bundle(
    bundle_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """``(bundle_dir, checkpoint)`` as paths, checked: the configs and the weights must exist.

    Args:
        bundle_dir: a bundle folder with ``configs/inference.json`` (e.g. ``bundles/kvasir_gaze``).
        checkpoint: the weights; default ``bundle_dir/models/model.pt``.

    Raises:
        MissingInputError: naming every missing file (a ``FileNotFoundError``).
    """
    bundle = Path(bundle_dir)
    ckpt = Path(checkpoint) if checkpoint is not None else bundle / "models" / "model.pt"
    missing = [str(f) for f in (bundle / "configs" / "inference.json", ckpt) if not f.is_file()]
    if missing:
        raise MissingInputError(
            f"missing {', '.join(missing)} (a bundle folder needs configs/inference.json; "
            "the checkpoint is a training's <bundle_root>/models/model.pt)"
        )
    return bundle, ckpt


def stage_bundle(
    bundle_dir: str | os.PathLike,
    dest: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    overrides: dict | None = None,
) -> Path:
    """Write ``dest`` = ``bundle_dir``'s ``configs/`` + ``checkpoint`` as ``models/model.pt``.

    Args:
        bundle_dir: the bundle folder (configs).
        dest: the folder to write (replaced if it exists).
        checkpoint: the weights; default ``bundle_dir/models/model.pt``.
        overrides: top-level ``inference.json`` values to set, e.g. ``{"image_size": [96, 96]}``.

    Returns:
        ``dest`` as a path.
    """
    bundle, ckpt = locate_bundle(bundle_dir, checkpoint)
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(bundle / "configs", dest / "configs")
    for extra in ("LICENSE", "docs"):
        src = bundle / extra
        if src.is_file():
            shutil.copy2(src, dest / extra)
        elif src.is_dir():
            shutil.copytree(src, dest / extra)
    (dest / "models").mkdir(parents=True)
    shutil.copy2(ckpt, dest / "models" / "model.pt")
    if overrides:
        path = dest / "configs" / "inference.json"
        config = json.loads(path.read_text())
        unknown = sorted(set(overrides) - set(config))
        if unknown:
            raise InvalidInputError(f"overrides {unknown} are not keys of {bundle}/configs/inference.json")
        config.update(overrides)
        path.write_text(json.dumps(config, indent=4) + "\n")
    return dest
