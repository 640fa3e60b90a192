import json
import os
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


# -- every bad input: exit 2 with one line naming the option, file or line; nothing valid lost --------

GOOD_CSV = (
    "IMAGE,CURRENT_FIX_INDEX,CURRENT_FIX_X,CURRENT_FIX_Y,CURRENT_FIX_DURATION,IMAGE_HEIGHT,IMAGE_WIDTH\n"
)


def _write(path, text, binary=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text) if binary else path.write_text(text)
    return path


def _csv(name, rows, header=GOOD_CSV):
    """``--gaze-csv`` with a file ``name`` of ``header`` and ``rows``, made in the data folder."""
    return lambda d, o: ["--gaze-csv", _write(d / name, header + rows)]


BAD_PSEUDO_MASKS = {
    # what is wrong: (extra arguments or a function of the folders giving them, words the message holds)
    "max-side 0": (["--max-side", "0"], "--max-side must be an integer >= 1, got 0"),
    "max-side below the CRF's minimum": (["--max-side", "8"], "max_side must be an integer >= 16"),
    "max-side negative": (["--max-side", "-5"], "--max-side must be an integer >= 1, got -5"),
    "max-side not a number": (["--max-side", "abc"], "--max-side must be an integer"),
    "sigma negative": (["--sigma", "-3"], "--sigma must be > 0, got -3"),
    "sigma zero": (["--sigma", "0"], "--sigma must be > 0"),
    "sigma not a number": (["--sigma", "wide"], "--sigma must be a number"),
    "threshold above 1": (["--thresholds", "0.5,1.5"], "thresholds must be one or more numbers in (0, 1]"),
    "threshold 0": (["--thresholds", "0"], "thresholds must be one or more numbers in (0, 1]"),
    "threshold not a number": (["--thresholds", "0.5,abc"], "--thresholds must be numbers"),
    "unknown heatmap mode": (["--heatmap-mode", "fancy"], "heatmap_mode must be 'fast' or 'reference'"),
    "unknown preset": (["--preset", "liver"], "unknown preset 'liver'"),
    "no workers": (["--workers", "0"], "--workers must be an integer >= 1"),
    "negative workers": (["--workers", "-2"], "--workers must be an integer >= 1"),
    "limit 0": (["--limit", "0"], "--limit must be an integer >= 1"),
    "a flag with a value": (["--full-resolution=5"], "--full-resolution takes no value"),
    "misspelled option": (["--max-sid", "5"], "unknown option --max-sid (did you mean --max-side?)"),
    "misspelled option name": (["--gaze-cvs", "x.csv"], "unknown option --gaze-cvs"),
    "a short option": (["-w", "2"], "unknown option -w; options are written --name"),
    "a stray argument (read as the preset, the first one not given by name)": (
        ["extra"],
        "unknown preset 'extra'",
    ),
    "an option without its value": (["--split"], "--split needs a value"),
    "thresholds without a value": (["--thresholds", "--quiet"], "--thresholds needs a value"),
    "sigma beyond a float (1e400 is inf)": (["--sigma", "1e400"], "--sigma must be a number, got"),
    "limit not an integer": (["--limit", "1e3"], "--limit must be an integer >= 1, got"),
    "a switch with a word": (["--quiet=yes"], "--quiet takes no value, got 'yes'"),
    "split not UTF-8": (
        lambda d, o: ["--split", _write(d / "l.txt", b"synth_000\nsynth_\xff\n", True)],
        "l.txt, line 2: not UTF-8",
    ),
    "csv with an unclosed quote": (
        _csv("q.csv", '"synth_000.png,1,0.5,0.5,300,96,128\n' + "x" * 140000 + "\n"),
        "q.csv, line 2: field larger than field limit",
    ),
    "out is a file": (lambda d, o: ["--out", d / "gaze.csv"], "gaze.csv is a file, not a folder"),
    "out inside a file": (lambda d, o: ["--out", d / "gaze.csv" / "sub"], "gaze.csv is a file, not a folder"),
    "csv missing": (lambda d, o: ["--gaze-csv", d / "none.csv"], "fixation CSV not found"),
    "csv not UTF-8": (
        lambda d, o: [
            "--gaze-csv",
            _write(d / "latin.csv", GOOD_CSV.encode() + b"synth_0\xe9.png,1,0.5,0.5,300,96,128\n", True),
        ],
        "latin.csv, line 2: not UTF-8 text (byte 0xe9",
    ),
    "csv empty": (lambda d, o: ["--gaze-csv", _write(d / "empty.csv", "")], "empty.csv: the file is empty"),
    "csv header only": (_csv("h.csv", ""), "h.csv: the file has a header but no"),
    "csv column missing": (
        _csv("c.csv", "a.png,0.5\n", "IMAGE,CURRENT_FIX_X\n"),
        "missing column(s) CURRENT_FIX_INDEX",
    ),
    "csv x outside [0, 1]": (
        _csv("x.csv", "synth_000.png,1,1.5,0.5,300,96,128\n"),
        "x.csv, line 2: CURRENT_FIX_X=1.5 is outside [0, 1]",
    ),
    "csv duration NaN": (
        _csv("n.csv", "synth_000.png,1,0.5,0.5,nan,96,128\n"),
        "n.csv, line 2: CURRENT_FIX_DURATION='nan' is not a finite number",
    ),
    "csv repeated fixation": (
        _csv("r.csv", "synth_000.png,1,0.5,0.5,300,96,128\n" * 2),
        "r.csv, line 3: image synth_000.png repeats CURRENT_FIX_INDEX=1",
    ),
    "csv image size changes": (
        _csv("s.csv", "a.png,1,0.5,0.5,300,96,128\na.png,2,0.5,0.5,300,90,128\n"),
        "s.csv, line 3: image a.png has size 90x128 here but 96x128 at line 2",
    ),
    "csv image with a path": (
        _csv("p.csv", "sub/a.png,1,0.5,0.5,300,96,128\n"),
        "p.csv, line 2: IMAGE 'sub/a.png' contains a path separator",
    ),
    "csv size not an integer": (
        _csv("z.csv", "a.png,1,0.5,0.5,300,96.5,128\n"),
        "z.csv, line 2: IMAGE_HEIGHT/IMAGE_WIDTH=96.5/128.0 must be positive integers",
    ),
    "split file missing": (lambda d, o: ["--split", d / "nope.txt"], "split file not found"),
    "split leaves the folder": (
        lambda d, o: ["--split", _write(d / "bad.txt", "../secret\n")],
        "refers outside",
    ),
    "data root missing": (lambda d, o: ["--data-root", d / "nowhere"], "image folder not found"),
    "images dir missing": (["--images-dir", "pictures"], "image folder not found"),
    "strict and an image without fixations": (
        lambda d, o: ["--strict", "--split", _write(d / "ids.txt", "synth_000\nnot_there\n")],
        "no fixations for image 'not_there'",
    ),
}


def _snapshot(folder):
    """Every file under ``folder`` (but the lock) with its content."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def done_output(tmp_path_factory, synthetic_root):
    """A data set and a finished pseudo-masks run into OUT, which bad runs must leave as it is."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    shutil.copytree(synthetic_root, data)
    out = root / "out"
    from gazemonai.cli import main

    main(["pseudo-masks", "--data-root", str(data), "--gaze-csv", str(data / "gaze.csv"), "--out", str(out),
          "--quiet", "--workers", "1"])  # fmt: skip
    assert (out / "manifest.json").is_file()
    return data, out, _snapshot(out)


@pytest.mark.parametrize("problem", list(BAD_PSEUDO_MASKS))
def test_pseudo_masks_refuses_bad_input_before_any_work(done_output, problem, capsys):
    from gazemonai.cli import main

    data, out, before = done_output
    extra, words = BAD_PSEUDO_MASKS[problem]
    extra = [str(a) for a in (extra(data, out) if callable(extra) else extra)]
    args = [
        "--data-root",
        str(data),
        "--gaze-csv",
        str(data / "gaze.csv"),
        "--out",
        str(out),
        "--quiet",
        "--workers",
        "1",
    ]
    names = {a for a in extra if a.startswith("--")}
    args = [a for i, a in enumerate(args) if not (a in names or (i and args[i - 1] in names))] + extra
    with pytest.raises(SystemExit) as exit_info:
        main(["pseudo-masks", *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert err.startswith("gazemonai: error: ") and words in err and "\n" not in err, err
    assert _snapshot(out) == before  # the finished run's files, records and manifest are untouched


BAD_SIMULATE = {
    "masks folder missing": (
        lambda d: ["--masks", d / "nowhere", "--out", d / "g.csv"],
        "mask folder not found",
    ),
    "out is a folder": (lambda d: ["--masks", d / "masks", "--out", d], "is a folder; give a file name"),
    "out inside a file": (
        lambda d: ["--masks", d / "masks", "--out", d / "gaze.csv" / "g.csv"],
        "is a file, not a folder",
    ),
    "negative seed": (
        lambda d: ["--masks", d / "masks", "--out", d / "g.csv", "--seed", "-1"],
        "--seed must be an integer >= 0",
    ),
    "seed not a number": (
        lambda d: ["--masks", d / "masks", "--out", d / "g.csv", "--seed", "x"],
        "--seed must be an integer",
    ),
    "suffix without a dot": (
        lambda d: ["--masks", d / "masks", "--out", d / "g.csv", "--image-suffix", "jpg"],
        "--image-suffix must be an extension such as .jpg",
    ),
    "split names a missing mask": (
        lambda d: ["--masks", d / "masks", "--out", d / "g.csv", "--split", _write(d / "s.txt", "ghost\n")],
        "no file for 'ghost'",
    ),
    "unreadable mask": (
        lambda d: [
            "--masks",
            _write(d / "bad_masks" / "m.png", b"\x89PNG garbage", True).parent,
            "--out",
            d / "g.csv",
        ],
        "cannot read image",
    ),
    "misspelled option": (
        lambda d: ["--mask", d / "masks", "--out", d / "g.csv"],
        "unknown option --mask (did you mean --masks?)",
    ),
}


@pytest.mark.parametrize("problem", list(BAD_SIMULATE))
def test_simulate_gaze_refuses_bad_input(done_output, problem, capsys):
    from gazemonai.cli import main

    data, _, _ = done_output
    make, words = BAD_SIMULATE[problem]
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate-gaze", *map(str, make(data))])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and words in err and err.count("\n") == 0, err
    assert not (data / "g.csv").exists()


BAD_PREPARE = {
    "both layouts": (["--dicom-root", "x", "--labels-root", "y"], "give either --nifti-images"),
    "images without masks": (
        ["--nifti-images", "{d}/images"],
        "--nifti-images and --nifti-masks go together",
    ),
    "test fraction 1": (["--test-fraction", "1.0"], "--test-fraction must be in [0, 1)"),
    "test fraction not a number": (["--test-fraction", "most"], "--test-fraction must be a number"),
    "negative seed": (["--seed", "-3"], "--seed must be an integer >= 0"),
    "unknown test patient": (["--test-patients", "999"], "test patients ['999'] are not among the cases"),
    "every patient in test": (["--test-patients", "001,020"], "are every patient: train.txt would be empty"),
    "out is a file": (["--out", "{d}/images/001_t2.nii.gz"], "is a file, not a folder"),
    "no NIfTI images": (["--nifti-images", "{d}/masks/none"], "no NIfTI images"),
    "misspelled option": (
        ["--test-patient", "001"],
        "unknown option --test-patient (did you mean --test-patients?)",
    ),
}


@pytest.mark.parametrize("problem", list(BAD_PREPARE))
def test_prepare_slices_refuses_bad_options(tmp_path, problem, capsys):
    import nibabel as nib

    from gazemonai.cli import main

    for case in ("001", "020"):
        for folder, name in (("images", f"{case}_t2"), ("masks", f"{case}_t2_seg")):
            (tmp_path / folder).mkdir(exist_ok=True)
            nib.save(
                nib.Nifti1Image(np.ones((8, 8, 3), np.float32), np.eye(4)),
                tmp_path / folder / f"{name}.nii.gz",
            )
    (tmp_path / "masks" / "none").mkdir()
    extra, words = BAD_PREPARE[problem]
    extra = [a.format(d=tmp_path) for a in extra]
    args = {
        "--out": str(tmp_path / "out"),
        "--nifti-images": str(tmp_path / "images"),
        "--nifti-masks": str(tmp_path / "masks"),
    }
    if problem == "images without masks":
        args = {"--out": args["--out"]}
    for key, value in zip(extra[::2], extra[1::2]):
        args[key] = value
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare-slices", *[x for kv in args.items() for x in kv]])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and words in err and err.count("\n") == 0, err
    assert not (tmp_path / "out").exists()


def test_a_second_run_into_the_same_out_is_refused_while_the_first_writes(done_output, tmp_path):
    from gazemonai.prep.io import exclusive_folder

    data, out, before = done_output
    with exclusive_folder(out, "x", "--out"):  # as a running `gazemonai pseudo-masks` holds it
        p = run(
            "pseudo-masks", "--data-root", data, "--gaze-csv", data / "gaze.csv", "--out", out, check_rc=2
        )
    assert f"{out} is being written by another `gazemonai pseudo-masks` (pid {os.getpid()})" in p.stderr
    assert _snapshot(out) == before


def test_resume_trusts_only_files_as_they_were_written(dataset, tmp_path):
    out = tmp_path / "out"
    pseudo_masks(dataset, out, "--quiet", "--workers", "1")
    level = out / "level_1" / "synth_001.png"
    original = level.read_bytes()
    Image.fromarray(np.zeros((96, 128), np.uint8)).save(level)  # another run's (or a half-finished) file
    (out / "heatmap" / "synth_002.png").unlink()
    summary = last_json(pseudo_masks(dataset, out, "--quiet", "--workers", "1"))
    assert summary["done"] == 2 and summary["resumed"] == 4  # the two touched images are made again
    assert level.read_bytes() == original


def test_a_decompression_bomb_fails_only_itself(dataset, tmp_path):
    Image.new("1", (20000, 12000)).save(dataset / "images" / "synth_003.png")  # 240 M pixels claimed
    p = pseudo_masks(dataset, tmp_path / "out", "--quiet", "--workers", "1", check_rc=1)
    summary = last_json(p)
    assert summary["failed"] == 1 and summary["done"] == 5
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "too large to be read safely" in manifest["failed"]["synth_003"]


def test_resume_redoes_images_whose_fixations_or_image_changed(dataset, tmp_path):
    out = tmp_path / "out"
    pseudo_masks(dataset, out, "--quiet", "--workers", "1")
    other = dataset / "other.csv"  # the same images, other gaze: the outputs must follow it
    from gazemonai.gaze.fixations import read_fixation_csv, write_fixation_csv

    tables = list(read_fixation_csv(dataset / "gaze.csv").values())
    tables[0].xy = tables[0].xy[::-1].copy()  # synth_000's fixations in another order... and place
    tables[0].xy[:, 0] = 1.0 - tables[0].xy[:, 0]
    write_fixation_csv(other, tables)

    def again():
        args = ["--data-root", dataset, "--gaze-csv", other, "--out", out, "--quiet", "--workers", 1]
        return last_json(run("pseudo-masks", *args))

    summary = again()
    assert summary["done"] == 1 and summary["resumed"] == 5
    new_image = np.full((96, 128, 3), 90, np.uint8)  # synth_004 replaced by another picture
    Image.fromarray(new_image).save(dataset / "images" / "synth_004.png")
    summary = again()
    assert summary["done"] == 1 and summary["resumed"] == 5


def test_a_second_prepare_slices_into_the_same_out_is_refused(tmp_path):
    import nibabel as nib

    from gazemonai.prep.io import exclusive_folder

    for case in ("001", "020"):
        for folder, name, value in (
            ("images", f"{case}_t2", np.arange(192.0)),
            ("masks", f"{case}_t2_seg", np.ones(192)),
        ):
            (tmp_path / folder).mkdir(exist_ok=True)
            nib.save(
                nib.Nifti1Image(value.reshape(8, 8, 3).astype(np.float32), np.eye(4)),
                tmp_path / folder / f"{name}.nii.gz",
            )
    (tmp_path / "out").mkdir()
    with exclusive_folder(tmp_path / "out", "test", "--out"):
        p = run("prepare-slices", "--out", tmp_path / "out", "--nifti-images", tmp_path / "images",
                "--nifti-masks", tmp_path / "masks", check_rc=2)  # fmt: skip
    assert "is being written by another `gazemonai prepare-slices`" in p.stderr
    assert not (tmp_path / "out" / "images").exists()


# -- option types are declared (fire.decorators.SetParseFns), never guessed from the text (#25) --------


@pytest.mark.parametrize("name", ["1e3", "0x10", "1_000", "a#b", "(5)", "True", "0123"])
def test_a_path_is_the_text_as_typed_never_a_number_or_a_literal(synthetic_root, tmp_path, monkeypatch, name):
    """fire read `--out 1e3` as the float 1000.0 and wrote "1000.0", `a#b` as `a` (a comment), `(5)` as 5."""
    from gazemonai.cli import main

    monkeypatch.chdir(tmp_path)
    main(["simulate-gaze", "--masks", str(synthetic_root / "masks"), "--out", name])
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_an_empty_out_is_refused_not_taken_as_the_current_folder(dataset, tmp_path, monkeypatch, capsys):
    """`--out ''` was Path(''), the current folder: pseudo-masks wrote its folders there."""
    from gazemonai.cli import main

    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(SystemExit) as exit_info:
        main(["pseudo-masks", "--data-root", str(dataset), "--gaze-csv", str(dataset / "gaze.csv"),
              "--out", "", "--quiet", "--no-crf"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err == "gazemonai: error: --out needs a value such as a path or a name"
    assert not any((tmp_path / "here").iterdir())


def test_a_switch_takes_true_or_false_as_its_word_too(dataset, tmp_path):
    """`--quiet true` passed the option check as the switch's word, then was refused ("takes no value")."""
    p = pseudo_masks(dataset, tmp_path / "out", "--quiet", "true", "--no-crf", "True", "--no-maps=False",
                     "--limit", 1)  # fmt: skip
    summary = last_json(p)
    assert summary["done"] == 1 and "%|" not in p.stderr  # quiet: no progress bar
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["refine"] is False and (tmp_path / "out" / "heatmap").is_dir()


def test_test_patients_are_names_as_typed(tmp_path):
    """020,021 stays the two names "020" and "021" (fire's guess gave a tuple or a number to undo)."""
    import nibabel as nib

    for case in ("001", "020", "021"):
        for folder, name in (("images", f"{case}_t2"), ("masks", f"{case}_t2_seg")):
            (tmp_path / folder).mkdir(exist_ok=True)
            volume = np.arange(192.0).reshape(8, 8, 3) if folder == "images" else np.ones((8, 8, 3))
            path = tmp_path / folder / f"{name}.nii.gz"
            nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), path)
    p = run("prepare-slices", "--out", tmp_path / "out", "--nifti-images", tmp_path / "images",
            "--nifti-masks", tmp_path / "masks", "--test-patients", "020,021")  # fmt: skip
    assert last_json(p)["test_patients"] == ["020", "021"] and last_json(p)["train_patients"] == ["001"]


def test_every_option_of_every_command_has_a_declared_type():
    """No option is left to fire's guessing: each has its parse function (fire.decorators.SetParseFns)."""
    import inspect

    from fire.decorators import GetParseFns

    from gazemonai.cli import COMMANDS

    for name, command in COMMANDS.items():
        declared = GetParseFns(command)["named"]
        assert set(declared) == set(inspect.signature(command).parameters), name
