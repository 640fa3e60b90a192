"""Simulated against real gaze, on real Kvasir-SEG images that have both."""

from helpers import KVASIR, KVASIR_CSV, need

from gazemonai.gaze.realism import gaze_realism


def test_realism_against_real_kvasir_gaze():
    """The issue's criterion, on 40 training images (benchmarks/gaze_realism.py runs it at scale)."""
    need(KVASIR / "images")
    need(KVASIR_CSV)

    res = gaze_realism(KVASIR, KVASIR_CSV, "train.txt", limit=40)
    assert res["images"] == 40
    assert res["abs_diff"]["inside"] <= 0.05, res
    for t, diff in res["abs_diff"]["dice"].items():
        assert diff <= 0.05, (t, res)
