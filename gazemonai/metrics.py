"""Dice and IoU of binary masks: the one implementation every figure of the project comes from.

Pseudo-mask quality (``gazemonai pseudo-masks``, ``gaze_realism``), validation and evaluation
metrics (:class:`~gazemonai.train.handlers.ChannelDice`, ``metrics_*.json``) all call
:func:`dice_iou`. It runs on the tensors' device and returns tensors, so an evaluator on a GPU reads
nothing back to the host until a metric is reported.

Empty masks: when the prediction and the ground truth are both empty, Dice and IoU are **1.0** (a
correct "nothing there"); with only one of them empty they are 0.0. GazeSup's research code returns
0.0 for the empty/empty case, so on data sets with empty ground-truth masks our means are higher by
(number of correctly empty images) / (number of images). Kvasir-SEG and the gland slices of the
prostate bundle have no empty ground-truth masks, so there the two conventions agree.

Numpy arrays are accepted and computed on the CPU. This module imports nothing of the package.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["dice_iou", "dice_score", "EMPTY_CONVENTION"]

#: How :func:`dice_iou` scores empty masks, written next to the figures the project reports.
EMPTY_CONVENTION = "Dice = IoU = 1.0 where prediction and ground truth are both empty (GazeSup's code: 0.0)"


def _bool_tensor(x, device=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if device is not None:
        t = t.to(device)
    return t.bool()


def dice_iou(pred, target, batch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU of binary maps (non-zero = foreground), on the tensors' device.

    Args:
        pred: binary prediction, tensor or array of any shape.
        target: binary ground truth of the same shape.
        batch: the first axis is a batch: one Dice and IoU per item, shape (B,); otherwise the
            whole arrays are compared and both results are 0-d.

    Returns:
        ``(dice, iou)`` as float64 tensors (float32 on Apple MPS) on ``pred``'s device; 1.0 for both
        where prediction and ground truth are both empty (see the module's note on this convention).

    Raises:
        ValueError: the shapes differ.
    """
    p = _bool_tensor(pred)
    t = _bool_tensor(target, p.device)
    if p.shape != t.shape:
        raise ValueError(
            f"prediction shape {tuple(p.shape)} differs from the ground truth's {tuple(t.shape)}"
        )
    dims = tuple(range(1 if batch else 0, p.dim()))
    dtype = torch.float32 if p.device.type == "mps" else torch.float64  # MPS has no float64
    inter = (p & t).sum(dims, dtype=dtype)
    total = p.sum(dims, dtype=dtype) + t.sum(dims, dtype=dtype)
    empty = total == 0
    one = torch.ones_like(total)
    dice = torch.where(empty, one, 2.0 * inter / torch.where(empty, one, total))
    union = total - inter
    iou = torch.where(empty, one, inter / torch.where(empty, one, union))
    return dice, iou


def dice_score(pred, target) -> float:
    """Dice of one prediction against its ground truth as a Python float (1.0 when both are empty)."""
    return float(dice_iou(pred, target)[0])
