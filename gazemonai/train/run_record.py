"""What a training left beside its checkpoint, read back as checked data, never as code.

A training writes ``models/mlflow_run.json`` beside ``model.pt`` (:class:`~gazemonai.train.tracking.
MLflowTracking`'s ``run_record``): the MLflow run, and the settings inference needs to rebuild the
network (``num_levels``, ``features``, ``in_channels``, ``image_size``, ``prompt_features``,
``image_normalization``, ``prompt_stage1_arch``) and to
evaluate on the same validation split (``val_fraction``, ``seed``, ``val_group``). ``register``,
``export``, ``segment-volume``, MONAI Label and ``inference.json`` itself read it.

A run folder is often handed from one person to another, so everything read here is treated as
data a stranger wrote. MONAI's config parser evaluates a string starting with ``$`` as Python,
resolves ``@`` references and ``%`` macros, and builds any dict with a ``_target_``: a value
copied from such a file into a config would run. So:

* only the settings named in :data:`MODEL_SETTINGS` and :data:`SPLIT_SETTINGS` are read, each
  checked as the bundles' own settings are (:func:`~gazemonai.train.settings.check_settings`:
  integers, lists of integers, ranges); the only strings are ``image_normalization`` and
  ``prompt_stage1_arch`` (one of their fixed choices) and ``val_group`` (``"patient"``);
* files are read only inside the run's own folder: a symlink or a ``config_dir`` leading out of it
  is refused, as is a file larger than :data:`MAX_RECORD_BYTES`;
* :func:`check_plain_data` is the rule for any other value that goes into a config (a user's
  ``--override``): JSON data with no string starting with ``$``, ``@`` or ``%`` and no
  ``_target_``-like key.

``inference.json`` calls :func:`inference_model_settings` (an expression of the bundle's own config,
given only the checkpoint folder): the values it returns are Python objects, never parsed again.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from ..errors import GazemonaiError, InvalidInputError
from .settings import check_settings

__all__ = [
    "MODEL_SETTINGS",
    "RUN_RECORD",
    "SPLIT_SETTINGS",
    "check_plain_data",
    "check_trained_settings",
    "inference_model_settings",
    "inside",
    "read_json_inside",
    "read_run_record",
    "trained_settings",
]

#: the ``inference.json`` values that must match the training for its weights to load and predict
MODEL_SETTINGS = (
    "num_levels", "features", "in_channels", "image_size", "prompt_features", "image_normalization",
    "prompt_stage1_arch",
)  # fmt: skip

#: the ``train.json`` values that define the validation split (evaluating ``val`` needs the same)
SPLIT_SETTINGS = ("val_fraction", "seed", "val_group")

#: written by the training next to ``model.pt`` (``MLflowTracking(run_record=...)``)
RUN_RECORD = "mlflow_run.json"

#: a run record or a resolved-settings file is a few kB; anything much larger is not one
MAX_RECORD_BYTES = 1 << 20

#: characters that make MONAI's config parser read a string as an expression, reference or macro
CONFIG_SIGILS = ("$", "@", "%")

_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

#: generous upper bounds of what a run record may describe (the paper's widths end at 1024, its images
#: are 224 pixels): a record beyond them is refused before a network is built from it
MODEL_LIMITS = {
    "num_levels": 16,
    "in_channels": 64,
    "features": 8192,
    "image_size": 8192,
    "prompt_features": 8192,
}


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path``, symlinks followed, lies in ``folder`` (symlinks of ``folder`` followed too)."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
    except ValueError:
        return False
    return True


def read_json_inside(path: str | os.PathLike, folder: str | os.PathLike, what: str = "file") -> Any:
    """The JSON in ``path``, which must be a regular file in ``folder`` (no symlink out of it).

    Args:
        path: the file to read.
        folder: the folder it must lie in once symlinks are followed.
        what: what the file is, for messages.

    Raises:
        InvalidInputError: a path leading out of ``folder``, not a regular file, larger than
            :data:`MAX_RECORD_BYTES`, not UTF-8 JSON, or holding ``NaN``/``Infinity``.
    """
    path = Path(path)
    if not inside(path, folder):
        raise InvalidInputError(
            f"{what} {path} leads out of {folder} (to {path.resolve()}): refused, a run's files are "
            "read only inside its own folder"
        )
    if not path.resolve().is_file():
        raise InvalidInputError(f"{what} {path} is not a regular file")
    size = path.stat().st_size
    if size > MAX_RECORD_BYTES:
        raise InvalidInputError(f"{what} {path} has {size} bytes; at most {MAX_RECORD_BYTES} are read")

    def no_constants(name):
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidInputError(f"{what} {path} is not JSON ({type(e).__name__}: {e})") from e


def check_plain_data(value: Any, name: str) -> None:
    """Refuse ``value`` unless it is plain JSON data that MONAI's config parser keeps as it is.

    Allowed: ``None``, booleans, finite numbers, strings not starting with ``$``, ``@`` or ``%``,
    and lists and string-keyed dicts of these whose keys are not MONAI's reserved ``_name_`` keys.

    Raises:
        InvalidInputError: naming ``name`` (and the part of it) and what is wrong.
    """
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInputError(f"{name} must be a finite number, got {value!r}")
        return
    if isinstance(value, str):
        if value.lstrip().startswith(CONFIG_SIGILS):
            raise InvalidInputError(
                f"{name} {value!r} starts with {value.lstrip()[0]!r}, which MONAI's config parser would "
                "run as an expression, reference or macro: only plain values are accepted here"
            )
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain_data(item, f"{name}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInputError(f"{name} has a key {key!r} that is not a string")
            if re.fullmatch(r"_\w+_", key):
                raise InvalidInputError(
                    f"{name} has the key {key!r}, which MONAI's config parser would act on "
                    "(_target_ builds any object): only plain values are accepted here"
                )
            check_plain_data(item, f"{name}[{key!r}]")
        return
    raise InvalidInputError(f"{name} must be plain JSON data, got a {type(value).__name__}")


def check_trained_settings(settings: Any, source: str) -> dict:
    """The model and validation-split settings of ``settings``, checked; every other key is ignored.

    Args:
        settings: a dict as a training resolved it (``resolved_settings.json``, a run record's
            ``settings``, a staged ``training_settings.json``).
        source: the file it came from, for messages.

    Returns:
        ``{name: value}`` for the names of :data:`MODEL_SETTINGS` and :data:`SPLIT_SETTINGS` it holds,
        as plain ``int``/``float``/``list``/``None``/``"patient"`` values.

    Raises:
        InvalidInputError: ``settings`` is not a dict, or a value is of the wrong type or range,
            naming ``source`` and the setting.
    """
    if not isinstance(settings, dict):
        kind = type(settings).__name__
        raise InvalidInputError(f"{source}: expected a JSON object of settings, got {kind}")
    found = {k: settings[k] for k in (*MODEL_SETTINGS, *SPLIT_SETTINGS) if k in settings}
    try:
        for key, value in found.items():
            check_plain_data(value, key)
        prompt = found.get("prompt_features")
        if prompt is not None:
            ok = isinstance(prompt, list) and len(prompt) in (5, 6)
            if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in prompt):
                raise InvalidInputError(
                    f"prompt_features must be null or 5 or 6 integers >= 1, got {prompt!r}"
                )
        group = found.get("val_group")
        if group not in (None, "patient"):
            raise InvalidInputError(f"val_group must be null or 'patient', got {group!r}")
        check_settings(**{k: found[k] for k in found if k not in ("prompt_features", "val_group")})
        for key, limit in MODEL_LIMITS.items():
            values = found.get(key)
            values = values if isinstance(values, list) else [] if values is None else [values]
            if any(v > limit for v in values):
                raise InvalidInputError(f"{key} must be at most {limit}, got {found[key]!r}")
        if "image_size" in found and not isinstance(found["image_size"], list):
            raise InvalidInputError(f"image_size must be a list of 2 integers, got {found['image_size']!r}")
    except (InvalidInputError, TypeError) as e:
        raise InvalidInputError(f"{source}: {e}") from e
    return found


def read_run_record(checkpoint: str | os.PathLike) -> dict | None:
    """The run that trained ``checkpoint``: ``mlflow_run.json`` beside it, checked, or ``None`` if absent.

    Returns:
        ``{"tracking_uri", "run_id", "experiment_name", "run_name", "config_dir", "settings"}``, each a
        string (or ``None`` where optional); ``settings`` checked by :func:`check_trained_settings`.

    Raises:
        InvalidInputError: the record exists but is not such a JSON object, is a symlink out of the
            checkpoint's folder, or holds a bad value.
    """
    folder = Path(checkpoint).parent
    path = folder / RUN_RECORD
    if not path.is_file() and not path.is_symlink():
        return None
    record = read_json_inside(path, folder, "run record")
    if not isinstance(record, dict):
        raise InvalidInputError(f"{path}: not a JSON run record (an object)")
    missing = [k for k in ("tracking_uri", "run_id") if not record.get(k)]
    if missing:
        raise InvalidInputError(f"{path}: run record without {', '.join(missing)}")
    checked: dict[str, Any] = {}
    for key in ("tracking_uri", "run_id", "experiment_name", "run_name", "config_dir"):
        value = record.get(key)
        if value is not None and (not isinstance(value, str) or any(c in value for c in "\n\r\0")):
            raise InvalidInputError(f"{path}: {key} must be a one-line string, got {value!r}")
        checked[key] = value
    if not _RUN_ID.fullmatch(checked["run_id"]):
        run_id = checked["run_id"]
        raise InvalidInputError(f"{path}: run_id must be letters, digits, '-' or '_', got {run_id!r}")
    settings = record.get("settings")
    checked["settings"] = None if settings is None else check_trained_settings(settings, f"{path} (settings)")
    return checked


def trained_settings(checkpoint: str | os.PathLike, record: dict | None = None) -> dict:
    """The checked model and split settings of the training that wrote ``checkpoint`` (``{}`` if unknown).

    Taken from the run record's ``settings``, or, for records written before they held them, from
    ``<config_dir>/resolved_settings.json`` when ``config_dir`` lies in the run folder (the
    checkpoint's folder's parent, the training's ``bundle_root``).

    Args:
        checkpoint: the weights (``<bundle_root>/models/model.pt``).
        record: its run record if already read (:func:`read_run_record`).

    Raises:
        InvalidInputError: a bad record, a ``config_dir`` outside the run folder, or a bad value.
    """
    if record is None:
        record = read_run_record(checkpoint)
    if not record:
        return {}
    if record.get("settings") is not None:
        return dict(record["settings"])
    if not record.get("config_dir"):
        return {}
    run_folder = Path(checkpoint).resolve().parent.parent
    config_dir = Path(record["config_dir"])
    record_path = Path(checkpoint).parent / RUN_RECORD
    if not inside(config_dir, run_folder):
        raise InvalidInputError(
            f"{record_path}: config_dir {config_dir} is outside the run folder {run_folder}: refused "
            "(give the model settings with --override instead)"
        )
    path = config_dir / "resolved_settings.json"
    if not path.is_file() and not path.is_symlink():
        return {}
    return check_trained_settings(read_json_inside(path, run_folder, "resolved settings"), str(path))


def inference_model_settings(ckpt_dir: str | os.PathLike, defaults: dict) -> dict:
    """For ``inference.json``: ``defaults`` updated with the model settings the checkpoint was trained with.

    The checkpoint is ``ckpt_dir/model.pt``; its run record is read and checked
    (:func:`trained_settings`). A bad record stops the run with one line naming it and exit status 2,
    as :func:`~gazemonai.train.settings.exit_on_bad_settings` does.

    Args:
        ckpt_dir: the folder of ``model.pt`` (``@ckpt_dir``).
        defaults: the bundle's own values of :data:`MODEL_SETTINGS` (``@model_defaults``).
    """
    import sys

    try:
        trained = trained_settings(Path(ckpt_dir) / "model.pt")
    except GazemonaiError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    return {**dict(defaults), **{k: v for k, v in trained.items() if k in MODEL_SETTINGS}}
