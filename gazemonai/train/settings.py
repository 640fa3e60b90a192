"""The bundles' settings, checked before any work starts: one message naming the setting and the value.

``train.json`` (and ``inference.json``) run :func:`exit_on_bad_settings` first in ``initialize``,
so a bad ``--image_size``, ``--thresholds`` or ``--dataset_dir`` stops the run at once, before the
datalist is read or a single pseudo-mask is cached, with one line such as
``error: image_size must be 2 integers >= 1 (height, width), got [0, 64]`` and exit status 2, as the
``gazemonai`` command does, instead of a traceback from deep inside MONAI (which wraps every error
of a config component in its own). :func:`check_settings` is the same check, raising.
``None`` means "not given here" and is not checked.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from numbers import Integral, Real
from pathlib import Path

from ..errors import InvalidInputError, MissingInputError
from ..gaze.heatmap import check_sigma
from ..gaze.pseudo_masks import MIN_MAX_SIDE
from ..prep.limits import available_memory, check_memory, check_workers

#: MONAI's config id separator (``monai.bundle.utils.ID_SEP_KEY``); its parser rewrites every ``#`` in a
#: config value to it, paths included
ID_SEP = "::"

__all__ = ["check_settings", "check_acceleration", "exit_on_bad_settings"]

_CHOICES = {
    "supervision": ("gaze", "full", "hybrid"),
    "consistency": ("prop", "pure", "none"),
    "compute_dtype": ("bfloat16", "float16", "float32", None),
    "train_step": ("joint", "levelwise"),
    "level_init": ("independent", "copy"),
    "dcr_loss": ("prop", "pure", "label"),
    "image_normalization": ("unit", "imagenet", "zscore"),
    "pseudo_mask_resize": ("nearest", "bilinear"),
    "prompt_stage1_arch": ("unet", "encoder"),
}


_BOOLEANS = (
    "step_in_backward",
    "release_memory",
    "cudnn_benchmark",
    "strong_only",
    "dii",
    "dii_normalize",
    "dcr",
    "freeze_prompt",
    "amp",
    "compile",
    "channels_last",
    "pin_memory",
    "non_blocking",
    "mlflow_iteration_log",
)


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _is_list(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _ints(name: str, value, length: int | None = None, minimum: int = 1) -> None:
    ok = (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(_is_int(v) and v >= minimum for v in value)
    )
    if ok and length is not None:
        ok = len(value) == length
    if not ok or not value:
        count = f"{length} " if length else ""
        raise InvalidInputError(f"{name} must be {count}integers >= {minimum}, got {value!r}")


def _int(name: str, value, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _number(name: str, value, condition: str, ok) -> None:
    """``value`` must be a finite number for which ``ok`` holds; ``condition`` says which, for the message."""
    if not (_is_number(value) and ok(float(value))):
        raise InvalidInputError(f"{name} must be a number {condition}, got {value!r}")


def device_memory() -> int:
    """The most memory one step may use here: the host's free memory, or a GPU's whole, whichever is more."""
    import torch

    memory = available_memory()
    if torch.cuda.is_available():
        gpus = range(torch.cuda.device_count())
        memory = max(memory, *(torch.cuda.get_device_properties(i).total_memory for i in gpus))
    return memory


def _fits_memory(image_size, batch_size, features, in_channels) -> None:
    """Refuse an ``image_size`` whose first network layer alone cannot fit this machine's memory.

    A lower bound of what one step needs: the batch of inputs and the two ``features[0]``-channel
    float32 maps of the network's first block (kept for the backward pass in training; produced one
    after the other in inference), at full resolution. Anything bigger does not fit either, so only
    sizes that certainly cannot run are refused, at once, instead of after the kernel kills the run.
    """
    batch = batch_size if _is_int(batch_size) else 1
    width = features[0] if _is_list(features) and features and _is_int(features[0]) else 1
    channels = in_channels if _is_int(in_channels) else 3
    per_pixel = 4 * batch * (channels + 2 * width)
    available = device_memory()
    side = int(math.isqrt(max(available // per_pixel, 1)))
    check_memory(
        "image_size",
        list(image_size),
        float(image_size[0]) * float(image_size[1]) * per_pixel,
        f"the first layer of one step (batch_size {batch}, features[0] {width})",
        largest=f"[{side}, {side}]",
        available=available,
    )


def config_path(name: str, path: str | os.PathLike) -> str:
    """``path`` as a value to hand MONAI's config parser: absolute, so a leading ``$``, ``@`` or ``%``
    (an expression, a reference or a macro to the parser) is a plain path, and refused with ``#``.

    Args:
        name: the option or setting that gave ``path``, for the message.
        path: the path.

    Raises:
        InvalidInputError: ``path`` holds ``#`` or ``::`` (MONAI reads both as its id separator in every
            config value; no escape exists).
    """
    text = os.fspath(path)
    if "#" in text or ID_SEP in text:
        raise InvalidInputError(
            f"{name} {text!r}: MONAI's config parser reads '#' (and '::') in any value as its id "
            "separator, so files would go to another folder; rename the folder, or link it (ln -s) under "
            "a name without '#'"
        )
    return os.path.abspath(text)


def check_settings(
    image_size=None,
    batch_size=None,
    epochs=None,
    learning_rate=None,
    weight_decay=None,
    val_fraction=None,
    val_interval=None,
    num_workers=None,
    cache_workers=None,
    thresholds=None,
    gaze_sigma=None,
    crf_max_side=None,
    features=None,
    in_channels=None,
    num_levels=None,
    consistency_weight=None,
    limit=None,
    iterations=None,
    seed=None,
    dataset_dir=None,
    gaze_csv=None,
    hybrid_config=None,
    strong_fraction=None,
    train_fraction=None,
    image_labels=None,
    image_label_classes=None,
    prompt_checkpoint=None,
    rotate90=None,
    eval_split=None,
    dii_lr=None,
    dii_interval=None,
    dcr_weight=None,
    dcr_ramp_epochs=None,
    checkpoint_interval=None,
    device=None,
    bundle_root=None,
    output_dir=None,
    ckpt_dir=None,
    **choices,
) -> None:
    """Check a bundle's settings; raise on the first bad one, naming it.

    Args:
        image_size: the network's input size, 2 positive integers (height, width).
        batch_size, epochs, iterations, val_interval, in_channels, num_levels: integers >= 1.
        num_workers, cache_workers, seed: integers >= 0.
        learning_rate: > 0. weight_decay, consistency_weight: >= 0.
        val_fraction: in (0, 1).
        thresholds: one per pseudo-mask level, each in (0, 1].
        gaze_sigma: > 0. crf_max_side: an integer >= 16, or ``None`` (full resolution).
        features: six BasicUNet widths, integers >= 1.
        limit: an integer >= 1, or ``None``.
        dataset_dir: an existing folder. gaze_csv: an existing file (gaze and hybrid supervision).
        bundle_root, output_dir, ckpt_dir: where the run writes. Every path setting is refused when it
            holds ``::``: MONAI's parser has already turned a ``#`` in it into that, so the path is not
            the one given (a ``monai.bundle run --bundle_root 'a#b'`` would write into ``a::b``).
        hybrid_config: true where ``hybrid.json`` is in the config list (``supervision`` ``hybrid``
            needs it). strong_fraction: in (0, 1], or ``None`` (``strong_ids`` given instead).
        train_fraction: in (0, 1], or ``None`` (all training images).
        image_labels: the stage-1 image labels, an existing folder or CSV file.
        image_label_classes: two different class names (negative, positive).
        prompt_checkpoint: the stage-1 checkpoint stage 2 loads, an existing file.
        rotate90: true where training rotates by random multiples of 90 degrees: ``image_size`` must
            then be square (a rotation swaps height and width, and the batch cannot be stacked).
        eval_split: ``test``, ``val``, ``train`` or a split file name under ``dataset_dir`` (it must exist).
        dii_lr: > 0. dii_interval: an integer >= 1. dcr_weight: >= 0. dcr_ramp_epochs: an integer >= 0
            (hybrid supervision; NaN is refused like any other non-number).
        checkpoint_interval: iterations between two ``latest.pt`` saves (an integer >= 1), or ``None``.
        device: the training device; with ``amp``, ``compile``, ``compute_dtype`` and the step
            settings it is checked by :func:`check_acceleration`.
        choices: ``supervision``, ``consistency``, ``compute_dtype``, ``train_step``, ``level_init``,
            ``image_normalization``, ``pseudo_mask_resize``, ``prompt_stage1_arch`` (one of their values),
            ``step_in_backward``, ``release_memory``, ``cudnn_benchmark``, ``strong_only``,
            ``dii``, ``dcr`` (booleans: ``True``/``False`` on the command line; ``false`` is a string).

    Raises:
        InvalidInputError: a setting with a bad value (a ``ValueError``).
        MissingInputError: ``dataset_dir`` or ``gaze_csv`` does not exist.
    """
    if image_size is not None:
        ok = _is_list(image_size) and len(image_size) == 2  # the bundles are 2-D
        if not ok or not all(_is_int(v) and v >= 1 for v in image_size):
            raise InvalidInputError(f"image_size must be 2 integers >= 1 (height, width), got {image_size!r}")
    for name, value in (
        ("batch_size", batch_size),
        ("epochs", epochs),
        ("val_interval", val_interval),
        ("iterations", iterations),
    ):
        if value is not None:
            _int(name, value, 1)
    for name, value in (("in_channels", in_channels), ("num_levels", num_levels)):
        if value is not None:
            _int(name, value, 1)
    for name, value in (("num_workers", num_workers), ("cache_workers", cache_workers), ("seed", seed)):
        if value is not None:
            _int(name, value, 0)
    if learning_rate is not None:
        _number("learning_rate", learning_rate, "> 0", lambda x: x > 0)
    for name, value in (("weight_decay", weight_decay), ("consistency_weight", consistency_weight)):
        if value is not None:
            _number(name, value, ">= 0", lambda x: x >= 0)
    if val_fraction is not None:
        _number("val_fraction", val_fraction, "in (0, 1)", lambda x: 0 < x < 1)
    if thresholds is not None:
        ok = _is_list(thresholds) and len(thresholds) > 0
        if not ok or not all(_is_number(t) and 0 < t <= 1 for t in thresholds):
            raise InvalidInputError(
                f"thresholds must be a list of numbers in (0, 1], one per level, got {thresholds!r}"
            )
    if gaze_sigma is not None:
        _number("gaze_sigma", gaze_sigma, "> 0", lambda x: x > 0)
        check_sigma("gaze_sigma", gaze_sigma)
    if crf_max_side is not None:
        _int("crf_max_side", crf_max_side, MIN_MAX_SIDE)
    if features is not None:
        _ints("features", features, length=6)
    if limit is not None:
        _int("limit", limit, 1)
    for name, value in (("num_workers", num_workers), ("cache_workers", cache_workers)):
        check_workers(name, value)
    if image_size is not None:
        _fits_memory(image_size, batch_size, features, in_channels)
        if rotate90 is True and image_size[0] != image_size[1]:
            raise InvalidInputError(
                f"image_size must be square for training, got {list(image_size)}: the random 90-degree "
                "rotations swap height and width (train square; inference takes any size)"
            )
    if dii_lr is not None:
        _number("dii_lr", dii_lr, "> 0", lambda x: x > 0)
    if dii_interval is not None:
        _int("dii_interval", dii_interval, 1)
    if dcr_weight is not None:
        _number("dcr_weight", dcr_weight, ">= 0", lambda x: x >= 0)
    if dcr_ramp_epochs is not None:
        _int("dcr_ramp_epochs", dcr_ramp_epochs, 0)
    if checkpoint_interval is not None:
        _int("checkpoint_interval", checkpoint_interval, 1)
    for name, value in choices.items():
        if name in _CHOICES:
            if value not in _CHOICES[name]:
                allowed = ", ".join(repr(c) for c in _CHOICES[name] if c is not None)
                raise InvalidInputError(f"{name} must be one of {allowed}, got {value!r}")
        elif name in _BOOLEANS:
            if not isinstance(value, bool):  # `--dii false` arrives as the string 'false', which is truthy
                hint = f"on the command line: --{name} True or False"
                raise InvalidInputError(f"{name} must be true or false ({hint}), got {value!r}")
        else:
            raise TypeError(f"check_settings() got an unexpected setting {name!r}")
    paths = {
        "bundle_root": bundle_root,
        "output_dir": output_dir,
        "ckpt_dir": ckpt_dir,
        "dataset_dir": dataset_dir,
        "gaze_csv": gaze_csv,
        "image_labels": image_labels,
        "prompt_checkpoint": prompt_checkpoint,
    }
    for name, path in paths.items():
        if path is not None and ID_SEP in os.fspath(path):  # MONAI turned a '#' in it into '::'
            config_path(name, path)
    if dataset_dir is not None and not Path(dataset_dir).is_dir():
        raise MissingInputError(f"dataset_dir {os.fspath(dataset_dir)!r} is not a folder")
    if eval_split is not None:
        if not isinstance(eval_split, str) or not eval_split.strip():
            raise InvalidInputError(
                f"eval_split must be test, val, train or a split file name, got {eval_split!r}"
            )
        if dataset_dir is not None:
            name = {"test": "test.txt", "val": "train.txt", "train": "train.txt"}.get(eval_split, eval_split)
            if not (Path(dataset_dir) / name).is_file():
                raise MissingInputError(
                    f"eval_split {eval_split!r}: split file not found: {Path(dataset_dir) / name} "
                    "(give test, val, train or the name of a split file in dataset_dir)"
                )
    if strong_fraction is not None:
        _number("strong_fraction", strong_fraction, "in (0, 1]", lambda x: 0 < x <= 1)
    if train_fraction is not None:
        _number("train_fraction", train_fraction, "in (0, 1]", lambda x: 0 < x <= 1)
    if image_label_classes is not None:
        if not (
            _is_list(image_label_classes)
            and len(image_label_classes) == 2
            and all(isinstance(c, str) and c for c in image_label_classes)
            and image_label_classes[0] != image_label_classes[1]
        ):
            raise InvalidInputError(
                f"image_label_classes must be two different class names (negative, positive), "
                f"got {image_label_classes!r}"
            )
    if image_labels is not None and not Path(image_labels).exists():
        raise MissingInputError(
            f"image_labels {os.fspath(image_labels)!r} does not exist (a class folder or an image,label CSV; "
            "`gazemonai derive-image-labels` makes one from masks)"
        )
    if prompt_checkpoint is not None and not Path(prompt_checkpoint).is_file():
        raise MissingInputError(
            f"prompt_checkpoint {os.fspath(prompt_checkpoint)!r} not found: train stage 1 first "
            "(configs/prompt_stage1.json writes models/prompt_stage1/model.pt) or pass --prompt_checkpoint"
        )
    check_acceleration(device, **{k: choices[k] for k in _ACCELERATION if k in choices})
    supervision = choices.get("supervision", "gaze")
    if supervision == "hybrid" and not hybrid_config:
        raise InvalidInputError(
            "supervision 'hybrid' needs configs/hybrid.json in the config list "
            "(it sets the full-mask images, the loss and the instance weights)"
        )
    if gaze_csv is not None and supervision in ("gaze", "hybrid") and not Path(gaze_csv).is_file():
        raise MissingInputError(
            f"gaze_csv {os.fspath(gaze_csv)!r} does not exist ({supervision} supervision reads it)"
        )


_ACCELERATION = ("compute_dtype", "amp", "compile", "train_step", "step_in_backward", "release_memory")


def check_acceleration(
    device=None,
    compute_dtype=None,
    amp=False,
    compile=False,
    train_step="joint",
    step_in_backward=False,
    release_memory=False,
) -> None:
    """Refuse the precision and compilation settings that cannot work together, with the reason.

    * ``compute_dtype`` ``float16`` needs ``amp`` true: float16 gradients underflow without a loss
      scale, and ``amp`` is MONAI's ``SupervisedTrainer(amp=True)``, which scales the loss with a
      ``GradScaler`` (bfloat16 has float32's range and needs none).
    * ``amp`` autocasts with ``torch.autocast("cuda")`` (MONAI): CUDA only, a float16 or bfloat16
      ``compute_dtype``, and MONAI's joint iteration (the levelwise step runs its own backward passes,
      which the scaler does not see).
    * ``compile`` is MONAI's ``SupervisedTrainer(compile=True)``: only its joint iteration calls the
      compiled network (the levelwise step and its memory hooks run the level networks themselves), and
      not on CPU, where ``torch.compile`` fails on BasicUNet's replicate padding in the backward pass
      (``aten.replication_pad2d_backward``, torch 2.13).

    Args:
        device: the training device (``torch.device`` or string); ``None``: not checked against.
        compute_dtype, amp, compile, train_step, step_in_backward, release_memory: the bundle's settings.

    Raises:
        InvalidInputError: the first combination that cannot work.
    """
    kind = None if device is None else str(getattr(device, "type", device)).split(":")[0]
    if compute_dtype == "float16" and not amp:
        raise InvalidInputError(
            "compute_dtype 'float16' needs a GradScaler: set amp true (--amp True, MONAI's SupervisedTrainer "
            "scales the loss; CUDA only) or use compute_dtype 'bfloat16', which needs no scaling"
        )
    low_memory = train_step == "levelwise" or step_in_backward or release_memory
    if amp:
        if compute_dtype not in ("float16", "bfloat16"):
            raise InvalidInputError(f"amp needs compute_dtype 'float16' or 'bfloat16', got {compute_dtype!r}")
        if kind is not None and kind != "cuda":
            raise InvalidInputError(
                f"amp runs MONAI's torch.autocast('cuda'): it needs a CUDA device, got {kind!r} "
                "(on CPU: compute_dtype 'bfloat16' with amp false autocasts the network)"
            )
        if low_memory:
            raise InvalidInputError(
                "amp (GradScaler) needs train_step 'joint' without step_in_backward/release_memory: the "
                "levelwise step runs its own backward passes, which the scaler does not see"
            )
    if compile:
        if low_memory:
            raise InvalidInputError(
                "compile needs train_step 'joint' without step_in_backward/release_memory (the low-memory "
                "step): only MONAI's joint iteration calls the compiled network"
            )
        if kind == "cpu":
            raise InvalidInputError(
                "compile does not work on CPU: torch.compile fails on BasicUNet's replicate padding in the "
                "backward pass (aten.replication_pad2d_backward); use it on CUDA"
            )


def exit_on_bad_settings(**settings) -> None:
    """:func:`check_settings` for bundle configs: a bad setting prints one line and exits with status 2.

    ``SystemExit`` is not an ``Exception``, so MONAI's config parser does not wrap it.
    """
    import sys

    from ..errors import GazemonaiError

    try:
        check_settings(**settings)
    except GazemonaiError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
