"""Dice and IoU of binary masks: MONAI's ``compute_dice``/``compute_iou``, our empty-mask convention.

Pseudo-mask quality (``gazemonai pseudo-masks``, ``gaze_realism``), the report's figures and, through
MONAI's ``DiceMetric``/``MeanIoU`` in :mod:`gazemonai.train.handlers`, validation and evaluation
(``metrics_*.json``) all score masks with MONAI's metrics and ``ignore_empty=False``.

Empty masks: when the prediction and the ground truth are both empty, Dice and IoU are **1.0** (a
correct "nothing there"); with only one of them empty they are 0.0. GazeSup's research code returns
0.0 for the empty/empty case, so on data sets with empty ground-truth masks our means are higher by
(number of correctly empty images) / (number of images). Kvasir-SEG and the gland slices of the
prostate bundle have no empty ground-truth masks, so there the two conventions agree.

This module adds what MONAI's functions lack for masks of any shape: numpy arrays and booleans in,
non-zero = foreground, one score per item out. It imports nothing of the package.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou

__all__ = ["dice_iou", "dice_score", "EMPTY_CONVENTION"]

#: How the project scores empty masks, written next to the figures it reports.
EMPTY_CONVENTION = "Dice = IoU = 1.0 where prediction and ground truth are both empty (GazeSup's code: 0.0)"


def _binary(x, device=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return (t.to(device) if device is not None else t) != 0


def dice_iou(pred, target, batch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU of binary maps (non-zero = foreground) by MONAI's metrics, ``ignore_empty=False``.

    Args:
        pred: binary prediction, tensor or array of any shape.
        target: binary ground truth of the same shape.
        batch: the first axis is a batch: one Dice and IoU per item, shape (B,); otherwise the
            whole arrays are compared and both results are 0-d.

    Returns:
        ``(dice, iou)`` as float tensors on ``pred``'s device; 1.0 for both where prediction and
        ground truth are both empty (see the module's note on this convention).

    Raises:
        ValueError: the shapes differ.
    """
    p = _binary(pred)
    t = _binary(target, p.device)
    if p.shape != t.shape:
        raise ValueError(
            f"prediction shape {tuple(p.shape)} differs from the ground truth's {tuple(t.shape)}"
        )
    items = p.shape[0] if batch else 1
    # (items, one channel, pixels): MONAI's layout for one foreground class
    p, t = p.reshape(items, 1, -1).to(torch.uint8), t.reshape(items, 1, -1).to(torch.uint8)
    dice = compute_dice(p, t, include_background=True, ignore_empty=False)[:, 0]
    iou = compute_iou(p, t, include_background=True, ignore_empty=False)[:, 0]
    return (dice, iou) if batch else (dice[0], iou[0])


def dice_score(pred, target) -> float:
    """Dice of one prediction against its ground truth as a Python float (1.0 when both are empty)."""
    return float(dice_iou(pred, target)[0])
