"""The README's demo: synthetic data, simulated gaze, pseudo-masks (training is the bundle tests' job)."""

import json

from helpers import run_module


def test_demo_up_to_the_pseudo_masks(tmp_path):
    out = tmp_path / "demo"
    p = run_module("gazemonai.demo", "--out", out, "--images", 6, "--no-train")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    summary = result["pseudo_masks"]
    assert summary["done"] == 6 and summary["failed"] == 0
    assert set(summary["dice_vs_gt"]) == {"level_1", "level_2"}
    assert all(0.5 < v["mean_dice"] <= 1.0 for v in summary["dice_vs_gt"].values())
    assert len(list((out / "pseudo_masks" / "level_2").glob("*.png"))) == 6
    assert "simulated gaze" in p.stdout and "[2/3]" in p.stdout
    # the annotate step: a recorded stream replayed through the recording path into a fixation CSV
    assert result["annotate"]["images"] == 4 and result["annotate"]["fixations"] >= 4 * 5
    assert result["annotate"]["seconds_mean"] > 1.0
    assert (out / "annotate" / "gaze.csv").is_file() and "[annotate]" in p.stdout
