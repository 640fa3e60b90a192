"""Refined map -> hierarchical pseudo-masks, one per threshold."""

import numpy as np
import pytest

from gazemonai.gaze.levels import LEVEL_THRESHOLDS, pseudo_mask_levels


def test_levels_by_hand():
    p = np.array([[0.1, 0.3], [0.35, 0.9]])
    lv = pseudo_mask_levels(p, (0.5, 0.3))
    np.testing.assert_array_equal(lv[0], [[0, 0], [0, 1]])
    np.testing.assert_array_equal(lv[1], [[0, 1], [1, 1]])  # >= threshold
    assert lv.dtype == np.uint8 and lv.shape == (2, 2, 2)
    assert LEVEL_THRESHOLDS[5] == (0.5, 0.3, 0.35, 0.4, 0.45)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        pseudo_mask_levels(p, (0.0,))
    with pytest.raises(ValueError, match="at least one"):
        pseudo_mask_levels(p, ())
