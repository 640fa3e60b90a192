"""Dice and IoU: MONAI's metrics with ignore_empty=False against values by hand; the empty convention."""

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
    assert dice.shape == (4,) and dice.dtype.is_floating_point
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


def test_a_prediction_where_the_truth_is_empty_scores_zero():
    pred, empty = np.zeros((2, 3)), np.zeros((2, 3))
    pred[0, 1] = 1
    assert [v.item() for v in dice_iou(pred, empty)] == [0.0, 0.0]
    assert [v.item() for v in dice_iou(empty, empty)] == [1.0, 1.0]


def test_monai_metrics_with_ignore_empty_false_give_the_convention():
    """What the metric handlers use: DiceMetric / MeanIoU(ignore_empty=False), one image per row, by hand."""
    from monai.metrics import DiceMetric, MeanIoU

    pred = torch.zeros(6, 1, 2, 2)
    truth = torch.zeros(6, 1, 2, 2)
    # 0: both empty -> 1; 1: prediction, empty truth -> 0; 2: empty prediction, truth -> 0;
    # 3: 2 predicted, 1 true, 1 shared -> Dice 2/3, IoU 1/2; 4: identical -> 1; 5: disjoint -> 0
    pred[1, 0, 0, 0] = 1
    truth[2, 0, 1, 1] = 1
    pred[3, 0, 0, :] = 1
    truth[3, 0, 0, 0] = 1
    pred[4, 0, 1, :] = truth[4, 0, 1, :] = 1
    pred[5, 0, 0, 0], truth[5, 0, 1, 1] = 1, 1
    dice, iou = DiceMetric(ignore_empty=False), MeanIoU(ignore_empty=False)
    dice(pred, truth)
    iou(pred, truth)
    assert dice.get_buffer()[:, 0].tolist() == pytest.approx([1.0, 0.0, 0.0, 2 / 3, 1.0, 0.0])
    assert iou.get_buffer()[:, 0].tolist() == pytest.approx([1.0, 0.0, 0.0, 1 / 2, 1.0, 0.0])
    assert dice.aggregate().item() == pytest.approx((1 + 2 / 3 + 1) / 6)
    d, j = dice_iou(pred, truth, batch=True)  # the package's helper agrees image by image
    assert d.tolist() == pytest.approx(dice.get_buffer()[:, 0].tolist())
    assert j.tolist() == pytest.approx(iou.get_buffer()[:, 0].tolist())
