"""One image through the chain: parameters (presets, digest) and nested levels."""

import numpy as np

from gazemonai.gaze.pseudo_masks import PRESETS, PseudoMaskConfig, make_pseudo_masks
from gazemonai.gaze.simulate import GazeSimulator
from gazemonai.prep.synthetic import synthetic_polyp


def test_config_digest_and_presets():
    a = PseudoMaskConfig()
    assert a.digest() == PseudoMaskConfig().digest()
    assert a.digest() != a.replace(max_side=128).digest()
    assert PRESETS["prostate"].sigma == 50 and PRESETS["prostate"].thresholds == (0.2, 0.4)
    assert PRESETS["kvasir"].thresholds == (0.5, 0.3)


def test_make_pseudo_masks_levels_are_nested():
    img, mask = synthetic_polyp((120, 160), seed=9, n_polyps=1)
    fix = GazeSimulator(seed=9)(mask, "case.png").as_array()
    res = make_pseudo_masks(img, fix, PRESETS["kvasir"])
    assert res.levels.shape == (2, 120, 160)
    # threshold 0.3 (level 2) contains threshold 0.5 (level 1)
    assert np.all(res.levels[1] >= res.levels[0])
    assert res.levels[0].sum() < res.levels[1].sum()
