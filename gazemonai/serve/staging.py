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

__all__ = [
    "MODEL_SETTINGS",
    "SPLIT_SETTINGS",
    "evaluation_overrides",
    "locate_bundle",
    "read_run_record",
    "stage_bundle",
    "trained_settings",
]

#: the ``inference.json`` values that must match the training for its weights to load and predict
MODEL_SETTINGS = (
    "num_levels", "features", "in_channels", "image_size", "prompt_features", "image_normalization",
    "prompt_stage1_arch",
)  # fmt: skip

#: the ``train.json`` values that define the validation split (evaluating ``val`` needs the same)
SPLIT_SETTINGS = ("val_fraction", "seed", "val_group")

#: the training's resolved settings, kept in a staged bundle's ``configs/``
TRAINING_SETTINGS = "training_settings.json"

#: written by the training next to ``model.pt`` (``MLflowTracking(run_record=...)``)
RUN_RECORD = "mlflow_run.json"


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
    from ..train.checkpoints import check_checkpoint_file

    bundle = Path(bundle_dir)
    ckpt = Path(checkpoint) if checkpoint is not None else bundle / "models" / "model.pt"
    missing = [str(f) for f in (bundle / "configs" / "inference.json", ckpt) if not f.is_file()]
    if missing:
        raise MissingInputError(
            f"missing {', '.join(missing)} (a bundle folder needs configs/inference.json; "
            "the checkpoint is a training's <bundle_root>/models/model.pt)"
        )
    return bundle, check_checkpoint_file(ckpt)  # the user's file named, not the staged copy


def stage_bundle(
    bundle_dir: str | os.PathLike,
    dest: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    overrides: dict | None = None,
    training_settings: dict | None = None,
) -> Path:
    """Write ``dest`` = ``bundle_dir``'s ``configs/`` + ``checkpoint`` as ``models/model.pt``.

    Args:
        bundle_dir: the bundle folder (configs).
        dest: the folder to write (replaced if it exists).
        checkpoint: the weights; default ``bundle_dir/models/model.pt``.
        overrides: top-level ``inference.json`` values to set, e.g. ``{"image_size": [96, 96]}``.
        training_settings: the settings the checkpoint's training resolved, written to
            ``configs/training_settings.json`` (evaluating the staged bundle reuses its model and
            validation-split settings: :func:`evaluation_overrides`).

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
    if training_settings:
        (dest / "configs" / TRAINING_SETTINGS).write_text(json.dumps(training_settings, indent=2) + "\n")
    return dest


def evaluation_overrides(staged: str | os.PathLike) -> dict:
    """``train.json`` + ``evaluate.json`` overrides that evaluate a staged bundle as it was trained.

    The model settings come from the staged ``inference.json`` (what the checkpoint loads with), the
    validation split's from ``configs/training_settings.json`` when the training was recorded.
    """
    configs = Path(staged) / "configs"
    inference = json.loads((configs / "inference.json").read_text(encoding="utf-8"))
    overrides = {k: inference[k] for k in MODEL_SETTINGS if k in inference}
    train = json.loads((configs / "train.json").read_text(encoding="utf-8"))
    path = configs / TRAINING_SETTINGS
    if path.is_file():
        settings = json.loads(path.read_text(encoding="utf-8"))
        overrides.update({k: settings[k] for k in SPLIT_SETTINGS if k in settings and k in train})
    return overrides


def read_run_record(checkpoint: str | os.PathLike) -> dict | None:
    """The MLflow run that trained ``checkpoint``: ``models/mlflow_run.json`` beside it, if any.

    Returns:
        ``{"tracking_uri", "experiment_name", "run_name", "run_id", "config_dir"}`` or ``None`` for a
        checkpoint trained without one (older versions, other tools).

    Raises:
        InvalidInputError: the record exists but is not such a JSON object.
    """
    path = Path(checkpoint).parent / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"{path}: not a JSON run record ({e})") from e
    missing = [k for k in ("tracking_uri", "run_id") if not isinstance(record, dict) or not record.get(k)]
    if missing:
        raise InvalidInputError(f"{path}: run record without {', '.join(missing)}")
    return record


def trained_settings(record: dict | None) -> dict:
    """Every setting the recorded training resolved (``{}`` when not recorded)."""
    if not record or not record.get("config_dir"):
        return {}
    path = Path(record["config_dir"]) / "resolved_settings.json"
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return settings if isinstance(settings, dict) else {}
