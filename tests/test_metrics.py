"""Dice and IoU: the one implementation, by hand, on the tensors' device, and the empty convention."""

import numpy as np
import pytest
import torch

from gazemonai.metrics import EMPTY_CONVENTION, dice_iou, dice_score


def test_dice_by_hand():
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 1, 0], bool)
    assert dice_score(a, b) == pytest.approx(0.5)
    assert dice_score(np.zeros(3), np.zeros(3)) == 1.0


def test_dice_and_iou_by_hand_per_item_of_a_batch():
    pred = torch.zeros(4, 2, 3, dtype=torch.bool)
    target = torch.zeros(4, 2, 3, dtype=torch.bool)
    pred[0, 0, :2] = True  # 2 pixels, 1 of them in the 1-pixel truth: Dice 2/3, IoU 1/2
    target[0, 0, 0] = True
    # item 1: both empty -> 1.0 (our convention); item 2: empty prediction, 3-pixel truth -> 0.0
    target[2, 1, :] = True
    pred[3] = True  # item 3: prediction everywhere (6), truth 3 pixels: Dice 6/9, IoU 3/6
    target[3, 0, :] = True
    dice, iou = dice_iou(pred, target, batch=True)
    assert dice.shape == (4,) and dice.dtype == torch.float64
    assert dice.tolist() == pytest.approx([2 / 3, 1.0, 0.0, 2 / 3])
    assert iou.tolist() == pytest.approx([1 / 2, 1.0, 0.0, 1 / 2])
    # without batch the whole arrays are one comparison: 2+6 predicted, 1+3+3 true, 1+3 shared
    d, j = dice_iou(pred, target)
    assert d.dim() == 0 and d.item() == pytest.approx(2 * 4 / (8 + 7)) and j.item() == pytest.approx(4 / 11)
    assert "1.0" in EMPTY_CONVENTION and "0.0" in EMPTY_CONVENTION


def test_non_zero_is_foreground_and_numpy_works_too():
    logits_like = np.array([[0.0, 0.7], [2.0, 0.0]])  # any non-zero value counts
    assert dice_iou(logits_like, np.array([[0, 1], [1, 0]]))[0].item() == 1.0
    with pytest.raises(ValueError, match="differs from the ground truth"):
        dice_iou(np.zeros((2, 2)), np.zeros((2, 3)))


def test_results_stay_on_the_tensors_device():
    meta = torch.ones(2, 3, device="meta")  # a device nothing can be read back from
    dice, iou = dice_iou(meta, meta, batch=True)
    assert dice.device.type == "meta" and iou.device.type == "meta" and dice.shape == (2,)
