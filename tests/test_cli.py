import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import KVASIR, KVASIR_CSV, need
from PIL import Image

from gazemonai.prep.io import read_map_png


def run(*args, check_rc=0):
    proc = subprocess.run(
        [sys.executable, "-m", "gazemonai", *map(str, args)], capture_output=True, text=True
    )
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


def pseudo_masks(dataset, out, *extra, check_rc=0):
    """``gazemonai pseudo-masks`` on a data set folder with its gaze.csv."""
    args = ["--data-root", dataset, "--gaze-csv", dataset / "gaze.csv", "--out", out, *extra]
    return run("pseudo-masks", *args, check_rc=check_rc)


def last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def dataset(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    return root


def test_pseudo_masks_end_to_end_and_resume(dataset, tmp_path):
    out = tmp_path / "out"
    # a fixation row for an image that is not on disk, and an image on disk without fixations
    with open(dataset / "gaze.csv", "a") as f:
        f.write("ghost.png,1,0.5,0.5,300,,,96.0,128.0\n")
    shutil.copy(dataset / "images" / "synth_000.png", dataset / "images" / "nogaze.png")
    ids = dataset / "ids.txt"
    ids.write_text("\n".join([f"synth_{i:03d}" for i in range(6)] + ["ghost", "nogaze"]) + "\n")

    p = run(
        "pseudo-masks",
        "--data-root",
        dataset,
        "--gaze-csv",
        dataset / "gaze.csv",
        "--out",
        out,
        "--split",
        ids,
        "--quiet",
    )
    s = last_json(p)
    assert (s["done"], s["resumed"], s["skipped_missing"], s["skipped_no_gaze"], s["failed"]) == (
        6,
        0,
        1,
        1,
        0,
    )
    assert set(s["dice_vs_gt"]) == {"level_1", "level_2"} and s["images_with_gt"] == 6
    assert s["dice_vs_gt"]["level_2"]["mean_dice"] > 0.7
    assert "1 skipped (image not on disk), 1 skipped (no fixations)" in p.stdout
    for sub in ("heatmap", "refined", "level_1", "level_2"):
        assert len(list((out / sub).glob("*.png"))) == 6
    lvl = np.asarray(Image.open(out / "level_1" / "synth_000.png"))
    assert lvl.dtype == np.uint8 and set(np.unique(lvl)) <= {0, 255}
    refined = read_map_png(out / "refined" / "synth_000.png")
    assert ((refined >= 0.5) == (lvl > 0)).mean() > 0.999  # the 16-bit map reproduces the level
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["thresholds"] == [0.5, 0.3] and manifest["config"]["sigma"] == 70.0
    assert manifest["skipped"] == {"missing": ["ghost"], "no_gaze": ["nogaze"]}
    assert len(manifest["completed"]) == 6

    # same parameters: everything is resumed, nothing recomputed
    stamp = (out / "level_1" / "synth_000.png").stat().st_mtime_ns
    s2 = last_json(run("pseudo-masks", dataset, dataset / "gaze.csv", out, "--split", ids, "--quiet"))
    assert (s2["done"], s2["resumed"]) == (0, 6)
    assert (out / "level_1" / "synth_000.png").stat().st_mtime_ns == stamp
    assert s2["dice_vs_gt"] == s["dice_vs_gt"]

    # a lost output file is redone; other parameters redo everything
    (out / "level_2" / "synth_003.png").unlink()
    s3 = last_json(run("pseudo-masks", dataset, dataset / "gaze.csv", out, "--split", ids, "--quiet"))
    assert (s3["done"], s3["resumed"]) == (1, 5)
    s4 = last_json(
        run(
            "pseudo-masks",
            dataset,
            dataset / "gaze.csv",
            out,
            "--split",
            ids,
            "--thresholds",
            "0.4,0.2,0.3",
            "--quiet",
        )
    )
    assert (s4["done"], s4["resumed"]) == (6, 0)
    assert set(s4["dice_vs_gt"]) == {"level_1", "level_2", "level_3"}


def test_corrupt_image_and_mismatched_mask_fail_only_themselves(dataset, tmp_path):
    (dataset / "images" / "synth_002.png").write_bytes(b"not a png at all")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(dataset / "masks" / "synth_004.png")
    p = run("pseudo-masks", dataset, dataset / "gaze.csv", tmp_path / "out", "--quiet", check_rc=1)
    s = last_json(p)
    assert (s["done"], s["failed"]) == (4, 2)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "cannot read image" in manifest["failed"]["synth_002"]
    assert "synth_002.png" in manifest["failed"]["synth_002"]
    assert (
        "mask" in manifest["failed"]["synth_004"]
        and "is 10x10 but its image is 96x128" in manifest["failed"]["synth_004"]
    )
    assert "failed: synth_002.png" in p.stderr


@pytest.mark.parametrize(
    "row, message",
    [
        (
            "../../etc/passwd,1,0.5,0.5,300,,,96,128",
            "line 2: IMAGE '../../etc/passwd' refers outside the dataset folder",
        ),
        ("synth_000.png,1,0.5,0.5,-3,,,96,128", "line 2: CURRENT_FIX_DURATION=-3.0 must be positive"),
    ],
)
def test_bad_csv_stops_with_a_clear_error(dataset, tmp_path, row, message):
    csv = tmp_path / "bad.csv"
    csv.write_text((dataset / "gaze.csv").read_text().splitlines()[0] + "\n" + row + "\n")
    p = run("pseudo-masks", dataset, csv, tmp_path / "out", "--quiet", check_rc=2)
    assert message in p.stderr and "Traceback" not in p.stderr


def test_strict_makes_missing_images_an_error(dataset, tmp_path):
    (dataset / "images" / "synth_001.png").unlink()
    p = run(
        "pseudo-masks", dataset, dataset / "gaze.csv", tmp_path / "out", "--strict", "--quiet", check_rc=2
    )
    assert "no file for 'synth_001.png'" in p.stderr


def test_simulate_gaze_cli(dataset, tmp_path):
    p = run("simulate-gaze", "--masks", dataset / "masks", "--out", tmp_path / "sim.csv", "--seed", 5)
    s = last_json(p)
    assert s["images"] == 6
    from gazemonai.gaze.fixations import read_fixation_csv

    assert len(read_fixation_csv(tmp_path / "sim.csv")) == 6
    again = run("simulate-gaze", dataset / "masks", tmp_path / "sim2.csv", "--seed", 5)
    assert last_json(again)["fixations"] == s["fixations"]
    assert (tmp_path / "sim.csv").read_bytes() == (tmp_path / "sim2.csv").read_bytes()


def test_pseudo_masks_on_real_kvasir(tmp_path):
    need(KVASIR / "images")
    need(KVASIR_CSV)
    split = tmp_path / "ids.txt"
    split.write_text("\n".join((KVASIR / "train.txt").read_text().split()[:6]) + "\n")
    p = run("pseudo-masks", KVASIR, KVASIR_CSV, tmp_path / "out", "--split", split, "--quiet", "--workers", 2)
    s = last_json(p)
    assert s["done"] == 6 and s["failed"] == 0
    assert all(v["mean_dice"] > 0.6 for v in s["dice_vs_gt"].values())


def test_held_out_test_images_are_counted_skips(tmp_path):
    need(KVASIR / "images")
    need(KVASIR_CSV)
    p = run(
        "pseudo-masks",
        KVASIR,
        KVASIR_CSV,
        tmp_path / "out",
        "--split",
        KVASIR / "test.txt",
        "--quiet",
        "--no-maps",
    )
    s = last_json(p)
    assert s["done"] == 0 and s["skipped_missing"] == 100


def test_only_the_projects_own_errors_become_exit_2(monkeypatch, capsys):
    """A user's bad input: one line, exit 2, the cause kept. Anything else is a bug: its traceback."""
    from gazemonai import cli
    from gazemonai.errors import InvalidInputError

    def bad_input():
        try:
            int("x")
        except ValueError as e:
            raise InvalidInputError("--size: 'x' is not a number") from e

    def bug():
        raise ValueError("an internal invariant broke")

    monkeypatch.setitem(cli.COMMANDS, "bad-input", bad_input)
    monkeypatch.setitem(cli.COMMANDS, "bug", bug)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bad-input"])
    assert exit_info.value.code == 2
    assert isinstance(exit_info.value.__cause__, InvalidInputError)
    assert isinstance(exit_info.value.__cause__.__cause__, ValueError)  # the cause is kept
    assert capsys.readouterr().err.strip() == "gazemonai: error: --size: 'x' is not a number"
    with pytest.raises(ValueError, match="internal invariant"):  # not turned into "bad input"
        cli.main(["bug"])


def test_a_bad_threshold_list_is_a_clear_error(dataset, tmp_path):
    p = pseudo_masks(dataset, tmp_path / "o", "--thresholds", "0.5,abc", check_rc=2)
    assert "--thresholds must be numbers" in p.stderr and "Traceback" not in p.stderr
    p = pseudo_masks(dataset, tmp_path / "o", "--split", tmp_path / "no_such_split.txt", check_rc=2)
    assert "split file not found" in p.stderr and "no_such_split.txt" in p.stderr
