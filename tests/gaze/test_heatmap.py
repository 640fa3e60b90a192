import numpy as np
import pytest
from helpers import KVASIR_CSV, need
from scipy import ndimage

from gazemonai.gaze.heatmap import fixation_canvas_indices, gaze_heatmap
from gazemonai.gaze.reference import reference_heatmap


def literal_heatmap(fix, size, sigma, canvas=768):
    """The recipe written out directly, independent of the package (torch bicubic for the resize)."""
    import torch

    m = np.zeros((canvas, canvas), np.float32)
    for x, y, d in fix:
        m[max(round(y * canvas) - 1, 0), max(round(x * canvas) - 1, 0)] += d
    m = ndimage.gaussian_filter(m, sigma)
    m = (m - m.min()) / (m.max() - m.min())
    t = torch.nn.functional.interpolate(
        torch.from_numpy(m)[None, None], size=size, mode="bicubic", align_corners=False
    )
    return t[0, 0].numpy()


def random_fixations(rng, n):
    return np.column_stack([rng.uniform(0.05, 0.95, n), rng.uniform(0.05, 0.95, n), rng.uniform(50, 900, n)])


def test_canvas_indices_follow_the_recipe():
    # round(0.5*768)-1 = 383; round(0.0013*768)= round(0.998)=1 -> 0; 1.0 -> 767; x=0 clips to 0
    r, c = fixation_canvas_indices(np.array([[0.5, 0.5], [0.0013, 1.0], [0.0, 0.25]]), (768, 768))
    np.testing.assert_array_equal(c, [383, 0, 0])
    np.testing.assert_array_equal(r, [383, 767, 191])


def test_single_fixation_peaks_at_its_pixel_and_is_normalised():
    # a fixation at canvas pixel (383, 191) of a 768 canvas drawn at canvas size: the peak is there
    hm = gaze_heatmap(np.array([[0.25, 0.5, 100.0]]), (768, 768), sigma=20, mode="reference")
    assert hm.max() == pytest.approx(1.0, abs=1e-6) and hm.min() == pytest.approx(0.0, abs=1e-6)
    assert np.unravel_index(hm.argmax(), hm.shape) == (383, 191)
    # Gaussian profile: at 20 px (one sigma) the value is exp(-1/2) of the peak, minus the min-max floor
    assert hm[383, 211] == pytest.approx(np.exp(-0.5), abs=1e-3)


def test_duration_weighting():
    fix = np.array([[0.25, 0.5, 300.0], [0.75, 0.5, 100.0]])
    hm = gaze_heatmap(fix, (64, 64), sigma=30)
    assert hm[:, :32].max() == pytest.approx(1.0) and hm[:, 32:].max() < 0.5  # the longer fixation dominates
    counted = gaze_heatmap(fix, (64, 64), sigma=30, weight="count")
    assert counted[:, :32].max() == pytest.approx(counted[:, 32:].max(), abs=1e-3)  # equal peaks when counted


@pytest.mark.parametrize(
    "sigma, size", [(70, (529, 621)), (50, (320, 320)), (70, (1072, 1350)), (70, (37, 300))]
)
def test_reference_mode_matches_literal_recipe(sigma, size):
    rng = np.random.default_rng(sigma + size[0])
    fix = random_fixations(rng, 27)
    lit = literal_heatmap(fix, size, sigma)
    assert np.abs(gaze_heatmap(fix, size, sigma, mode="reference") - lit).max() <= 1e-3
    assert np.abs(gaze_heatmap(fix, size, sigma, mode="fast") - lit).max() <= 2e-3
    assert np.abs(reference_heatmap(fix, size, sigma) - lit).max() <= 1e-3


def test_reflection_at_borders_matches_scipy():
    # fixations hugging the corners exercise the mirrored images of each impulse
    fix = np.array([[0.001, 0.002, 200.0], [0.999, 0.998, 300.0], [0.02, 0.97, 50.0]])
    lit = literal_heatmap(fix, (768, 768), 70)
    assert np.abs(gaze_heatmap(fix, (768, 768), 70, mode="reference") - lit).max() <= 1e-5


def test_real_kvasir_heatmaps_match_literal_recipe():
    from gazemonai.gaze.fixations import read_fixation_csv

    fx = read_fixation_csv(need(KVASIR_CSV))
    for name in list(fx)[:8]:
        f = fx[name]
        size = (f.height, f.width)
        lit = literal_heatmap(f.as_array(), size, 70)
        assert np.abs(gaze_heatmap(f.as_array(), size, mode="reference") - lit).max() <= 1e-3, name
        assert np.abs(gaze_heatmap(f.as_array(), size) - lit).max() <= 1e-3, name


@pytest.mark.parametrize(
    "fix, match",
    [
        (np.zeros((0, 3)), "no fixations"),
        (np.array([[0.5, 1.5, 10.0]]), "within \\[0, 1\\]"),
        (np.array([[0.5, 0.5, 0.0]]), "durations must be positive"),
        (np.array([[0.5, 0.5]]), "needs \\(N, 3\\)"),
        (np.zeros((2, 4)), "must be an \\(N, 3\\) array"),
    ],
)
def test_bad_fixations(fix, match):
    with pytest.raises(ValueError, match=match):
        gaze_heatmap(fix, (10, 10))


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be"):
        gaze_heatmap(np.array([[0.5, 0.5, 1.0]]), (10, 10), mode="slow")
