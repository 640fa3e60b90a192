"""A trained bundle made servable: its configs plus a checkpoint, staged as one bundle folder.

Training writes checkpoints under its ``--bundle_root`` (``models/model.pt``) while the configs stay
in ``bundles/<name>/configs``; MONAI Label's ``BundleInferTask`` and the MLflow registry both want
one folder holding ``configs/`` and ``models/model.pt``. :func:`stage_bundle` makes it, writing the
values the checkpoint was trained with (``image_size``, ``features``, ...) into ``inference.json``.

The run record and the settings in it are read as checked data (:mod:`gazemonai.train.run_record`),
and every value written into ``inference.json`` is plain data: nothing read from a file a user was
handed reaches MONAI's config parser as an expression. This module needs only the standard library
and the light parts of the package, so it also runs in MONAI Label's own environment.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import InvalidInputError, MissingInputError
from ..train.run_record import (
    MODEL_SETTINGS,
    RUN_RECORD,
    SPLIT_SETTINGS,
    check_plain_data,
    check_trained_settings,
    read_run_record,
    trained_settings,
)

__all__ = [
    "MODEL_SETTINGS",
    "RUN_RECORD",
    "check_staged_bundle",
    "SPLIT_SETTINGS",
    "evaluation_overrides",
    "locate_bundle",
    "read_run_record",
    "stage_bundle",
    "trained_settings",
]

#: the training's resolved settings, kept in a staged bundle's ``configs/``
TRAINING_SETTINGS = "training_settings.json"

#: the bundle's own values of :data:`MODEL_SETTINGS` in ``inference.json``
MODEL_DEFAULTS = "model_defaults"


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

    ``inference.json`` gets the values of :data:`MODEL_SETTINGS` as plain literals: the bundle's
    ``model_defaults``, updated with those the checkpoint's recorded training used
    (:func:`~gazemonai.train.run_record.trained_settings`, checked), updated with ``overrides``.

    Args:
        bundle_dir: the bundle folder (configs).
        dest: the folder to write (replaced if it exists).
        checkpoint: the weights; default ``bundle_dir/models/model.pt``.
        overrides: top-level ``inference.json`` values to set, e.g. ``{"image_size": [96, 96]}``: plain
            data only (:func:`~gazemonai.train.run_record.check_plain_data`), model settings checked
            as the bundle checks them.
        training_settings: the settings the checkpoint's training resolved; their model and
            validation-split values (checked) are written to ``configs/training_settings.json``
            (evaluating the staged bundle reuses them: :func:`evaluation_overrides`).

    Returns:
        ``dest`` as a path.

    Raises:
        InvalidInputError: an override that is not a key of ``inference.json`` or not plain data, a
            bad model setting, or a bad run record beside the checkpoint.
    """
    bundle, ckpt = locate_bundle(bundle_dir, checkpoint)
    overrides = dict(overrides or {})
    for key, value in overrides.items():
        check_plain_data(value, f"override {key}")
    check_trained_settings({k: v for k, v in overrides.items() if k in MODEL_SETTINGS}, "overrides")
    trained = trained_settings(ckpt)
    config = json.loads((bundle / "configs" / "inference.json").read_text(encoding="utf-8"))
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise InvalidInputError(f"overrides {unknown} are not keys of {bundle}/configs/inference.json")
    defaults = config.get(MODEL_DEFAULTS) or {k: config[k] for k in MODEL_SETTINGS if k in config}
    model = {k: v for k, v in {**defaults, **trained}.items() if k in MODEL_SETTINGS and k in config}
    config.update({**model, **overrides})
    check_trained_settings({k: config[k] for k in MODEL_SETTINGS if k in config}, "the staged inference.json")
    if training_settings is not None:
        training_settings = check_trained_settings(training_settings, "training settings")
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
    (dest / "configs" / "inference.json").write_text(json.dumps(config, indent=4) + "\n")
    if training_settings:
        (dest / "configs" / TRAINING_SETTINGS).write_text(json.dumps(training_settings, indent=2) + "\n")
    return dest


def check_staged_bundle(staged: str | os.PathLike) -> None:
    """Refuse a staged or downloaded bundle whose model or split settings are not plain, valid data.

    What :func:`stage_bundle` writes always passes; a registered model staged from a crafted run
    record by an older version, or edited in the store, does not reach MONAI's config parser.

    Raises:
        InvalidInputError: naming the file and the setting.
    """
    configs = Path(staged) / "configs"
    path = configs / "inference.json"
    inference = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(inference, dict):
        raise InvalidInputError(f"{path}: not a JSON object")
    check_trained_settings({k: inference[k] for k in MODEL_SETTINGS if k in inference}, str(path))
    settings = configs / TRAINING_SETTINGS
    if settings.exists():
        check_trained_settings(json.loads(settings.read_text(encoding="utf-8")), str(settings))


def evaluation_overrides(staged: str | os.PathLike) -> dict:
    """``train.json`` + ``evaluate.json`` overrides that evaluate a staged bundle as it was trained.

    The model settings come from the staged ``inference.json`` (what the checkpoint loads with), the
    validation split's from ``configs/training_settings.json`` when the training was recorded; both
    checked (:func:`check_staged_bundle`), as they become overrides MONAI's parser reads.
    """
    check_staged_bundle(staged)
    configs = Path(staged) / "configs"
    inference = json.loads((configs / "inference.json").read_text(encoding="utf-8"))
    overrides = {k: inference[k] for k in MODEL_SETTINGS if k in inference}
    train = json.loads((configs / "train.json").read_text(encoding="utf-8"))
    path = configs / TRAINING_SETTINGS
    if path.is_file():
        settings = json.loads(path.read_text(encoding="utf-8"))
        overrides.update({k: settings[k] for k in SPLIT_SETTINGS if k in settings and k in train})
    return overrides
