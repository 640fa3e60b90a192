import numpy as np
import pytest

from gazemonai.gaze.heatmap import gaze_heatmap
from gazemonai.gaze.refine import crf_refine, to_rgb_uint8
from gazemonai.gaze.simulate import GazeSimulator
from gazemonai.metrics import dice_score
from gazemonai.prep.synthetic import synthetic_polyp


def test_to_rgb_uint8_scales_mr_slices():
    mr = np.array([[100.0, 300.0], [200.0, 300.0]])
    rgb = to_rgb_uint8(mr)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], [[0, 255], [128, 255]])
    assert rgb.flags.writeable and rgb.flags.c_contiguous
    ro = np.zeros((4, 4, 3), np.uint8)
    ro.flags.writeable = False
    assert to_rgb_uint8(ro).flags.writeable
    with pytest.raises(ValueError, match="NaN"):
        to_rgb_uint8(np.array([[np.nan, 1.0]]))


def _polyp_case(seed):
    img, mask = synthetic_polyp((120, 160), seed=seed, n_polyps=1)
    fix = GazeSimulator(seed=seed)(mask, "case.png").as_array()
    return img, mask, gaze_heatmap(fix, mask.shape, sigma=70)


@pytest.mark.parametrize("seed", [3, 5, 7, 9, 11])
def test_crf_snaps_the_heatmap_to_the_object(seed):
    img, mask, hm = _polyp_case(seed)
    refined = crf_refine(img, hm, max_side=None)
    assert refined.shape == mask.shape and refined.dtype == np.float32
    assert 0.0 <= refined.min() and refined.max() <= 1.0
    for t in (0.3, 0.5):  # measured gains on these cases: +0.016 .. +0.16
        assert dice_score(refined >= t, mask) > dice_score(hm >= t, mask) + 0.01


def test_low_resolution_crf_agrees_with_full_resolution():
    img, mask, hm = _polyp_case(5)
    full = crf_refine(img, hm, max_side=None)
    low = crf_refine(img, hm, max_side=64)
    assert dice_score(full >= 0.5, low >= 0.5) > 0.95
    assert abs(dice_score(full >= 0.5, mask) - dice_score(low >= 0.5, mask)) < 0.02


def test_crf_on_single_channel_mr_slice():
    img, mask, hm = _polyp_case(9)
    mr = img.mean(axis=2).astype(np.float32) * 3.7 + 12.0  # arbitrary float intensities
    refined = crf_refine(mr, hm, max_side=None)
    assert dice_score(refined >= 0.5, mask) > dice_score(hm >= 0.5, mask) + 0.02


def test_crf_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differs from the image"):
        crf_refine(np.zeros((10, 12, 3), np.uint8), np.zeros((10, 10)))


def test_to_rgb_uint8_colour_ranges():
    u8 = np.array([[[10, 20, 30], [200, 100, 0]]], np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(u8.astype(np.float32)), u8)  # float photo in 0-255
    np.testing.assert_array_equal(to_rgb_uint8(u8 / 255.0), u8)  # normalised to [0, 1]
    stretched = to_rgb_uint8(u8.astype(np.float32) * 10 - 500)  # any other range: min-max
    assert stretched.min() == 0 and stretched.max() == 255
    grey = to_rgb_uint8(np.array([[50, 60]], np.uint8))  # single channel: min-max, as the recipe
    np.testing.assert_array_equal(grey[..., 1], [[0, 255]])
