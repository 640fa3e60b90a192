"""The GazeMedSeg CSV writer: values, append, annotators kept apart, redo, crash, and pseudo-masks from it."""

from __future__ import annotations

import csv
import multiprocessing
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import ROOT

from gazemonai.errors import FixationFormatError, InvalidInputError
from gazemonai.gaze.fixations import ImageFixations, read_fixation_csv, write_fixation_csv
from gazemonai.prep.io import read_map_png
from gazemonai.record.fixations import Fixation
from gazemonai.record.geometry import ViewGeometry
from gazemonai.record.samples import GazeSample, read_raw_samples
from gazemonai.record.writer import COLUMNS, GazeCsvWriter, recording_summary

F1 = [Fixation(10.25, 300.0, 0.5, 0.25), Fixation(10.6, 212.5, 0.125, 1.0)]
F2 = [Fixation(20.0, 150.0, 0.75, 0.5)]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_rows_hold_the_gazemedseg_columns_and_the_recording(tmp_path):
    w = GazeCsvWriter(tmp_path / "gaze.csv")
    n = w.append_image(
        "a.jpg",
        F1,
        528,
        622,
        annotator="dr-a",
        recording="r1",
        accuracy_px=21.5,
        accuracy_deg=0.61234,
        seconds=3.2,
        shown_at=10.0,
    )
    assert n == 2
    r = rows(tmp_path / "gaze.csv")
    assert r[0] == list(COLUMNS)
    assert r[1] == [
        "a.jpg",
        "1",
        "0.5",
        "0.25",
        "300.000",
        "",
        "250.000",
        "528.0",
        "622.0",
        "dr-a",
        "r1",
        "21.500",
        "0.6123",
        "3.200",
    ]
    assert r[2][:7] == ["a.jpg", "2", "0.125", "1.0", "212.500", "", "600.000"]
    fx = read_fixation_csv(tmp_path / "gaze.csv")["a.jpg"]  # extra columns accepted
    assert fx.xy.tolist() == [[0.5, 0.25], [0.125, 1.0]] and fx.duration.tolist() == [300.0, 212.5]
    assert (fx.height, fx.width) == (528, 622) and fx.start.tolist() == [250.0, 600.0]


def test_append_never_overwrites_and_two_annotators_are_kept_apart(tmp_path):
    path = tmp_path / "gaze.csv"
    w = GazeCsvWriter(path)
    w.append_image("a.jpg", F1, 100, 200, annotator="dr-a", recording="r1")
    before = path.read_bytes()
    w2 = GazeCsvWriter(path)  # another session on the same file
    w2.append_image("b.jpg", F2, 100, 200, annotator="dr-a", recording="r2")
    w2.append_image("a.jpg", F2, 100, 200, annotator="dr-b", recording="r2")
    assert path.read_bytes().startswith(before)
    assert [(r[0], r[9]) for r in rows(path)[1:]] == [
        ("a.jpg", "dr-a"),
        ("a.jpg", "dr-a"),
        ("b.jpg", "dr-a"),
        ("a.jpg", "dr-b"),
    ]
    # never merged: without a choice, the image with two annotators is an error naming them
    with pytest.raises(
        FixationFormatError, match="image a.jpg has fixations of 2 annotators \\(dr-a, dr-b\\)"
    ):
        read_fixation_csv(path)
    a = read_fixation_csv(path, annotator="dr-a")
    b = read_fixation_csv(path, annotator="dr-b")
    assert sorted(a) == ["a.jpg", "b.jpg"] and list(b) == ["a.jpg"]
    assert a["a.jpg"].xy.tolist() == [[0.5, 0.25], [0.125, 1.0]] and b["a.jpg"].xy.tolist() == [[0.75, 0.5]]
    with pytest.raises(FixationFormatError, match="no fixation rows of annotator 'dr-c'"):
        read_fixation_csv(path, annotator="dr-c")
    plain = write_fixation_csv(tmp_path / "plain.csv", b)
    with pytest.raises(FixationFormatError, match="has no ANNOTATOR column"):
        read_fixation_csv(plain, annotator="dr-a")


def test_a_redo_replaces_only_that_annotators_rows_and_keeps_the_old_ones_aside(tmp_path):
    path = tmp_path / "gaze.csv"
    w = GazeCsvWriter(path)
    w.append_image("a.jpg", F1, 100, 200, annotator="dr-a", recording="r1")
    w.append_image("a.jpg", F1, 100, 200, annotator="dr-b", recording="r1")
    w.append_image("a.jpg", F2, 100, 200, annotator="dr-a", recording="r1")  # the redo
    assert [(r[9], r[2]) for r in rows(path)[1:]] == [("dr-b", "0.5"), ("dr-b", "0.125"), ("dr-a", "0.75")]
    old = rows(tmp_path / "gaze.replaced.csv")
    assert old[0] == list(COLUMNS) and [(r[9], r[2]) for r in old[1:]] == [("dr-a", "0.5"), ("dr-a", "0.125")]


def test_nothing_is_written_for_no_fixations_or_bad_input(tmp_path):
    path = tmp_path / "gaze.csv"
    w = GazeCsvWriter(path)
    assert w.append_image("a.jpg", [], 100, 200, annotator="dr-a", recording="r1") == 0
    assert not path.exists()
    with pytest.raises(FixationFormatError, match="path separator"):
        w.append_image("sub/a.jpg", F1, 100, 200, annotator="dr-a", recording="r1")
    with pytest.raises(InvalidInputError, match="annotator must be a non-empty text"):
        w.append_image("a.jpg", F1, 100, 200, annotator=" ", recording="r1")
    with pytest.raises(InvalidInputError, match="fixation 1 at \\(1.5, 0.5\\)"):
        w.append_image("a.jpg", [Fixation(0, 100, 1.5, 0.5)], 100, 200, annotator="a", recording="r1")
    foreign = tmp_path / "other.csv"
    foreign.write_text("IMAGE,X\na.jpg,1\n")
    with pytest.raises(InvalidInputError, match="not those gazemonai annotate writes"):
        GazeCsvWriter(foreign)
    assert foreign.read_text() == "IMAGE,X\na.jpg,1\n"


def test_a_crash_mid_write_loses_only_the_image_being_written(tmp_path):
    """A process writes image a, then dies (os._exit) inside the write of image b, before the rename."""
    path = tmp_path / "gaze.csv"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from gazemonai.record import writer
        from gazemonai.record.fixations import Fixation
        w = writer.GazeCsvWriter({str(path)!r})
        w.append_image("a.jpg", [Fixation(0, 100, 0.5, 0.5)], 10, 10, annotator="x", recording="r")
        writer.os.replace = lambda *a: os._exit(9)
        w.append_image("b.jpg", [Fixation(0, 100, 0.5, 0.5)], 10, 10, annotator="x", recording="r")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert list(read_fixation_csv(path)) == ["a.jpg"]  # the file is whole, with a's rows
    GazeCsvWriter(path).append_image("c.jpg", F2, 10, 10, annotator="x", recording="r2")
    assert list(read_fixation_csv(path)) == ["a.jpg", "c.jpg"]


def _write_many(args):
    path, who = args
    w = GazeCsvWriter(path)
    for i in range(8):
        w.append_image(f"{who}-{i}.jpg", F1, 10, 10, annotator=who, recording=who)


def test_two_processes_appending_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "gaze.csv")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_write_many, [(path, "p"), (path, "q")])
    assert len(read_fixation_csv(path)) == 16 and len(rows(path)) == 1 + 32


def test_recording_summary_time_per_image(tmp_path):
    path = tmp_path / "gaze.csv"
    w = GazeCsvWriter(path)
    for name, s in [("a.jpg", 2.0), ("b.jpg", 4.5), ("c.jpg", 3.0)]:
        w.append_image(name, F1, 10, 10, annotator="x", recording="r1", seconds=s, accuracy_px=20.0)
    w.append_image("d.jpg", F2, 10, 10, annotator="x", recording="r2", seconds=99)
    s = recording_summary(path, "r1")
    assert s == {
        "recording": "r1",
        "images": 3,
        "fixations": 6,
        "annotators": ["x"],
        "seconds_total": 9.5,
        "seconds_mean": pytest.approx(9.5 / 3),
        "seconds_median": 3.0,
        "accuracy_px": 20.0,
        "accuracy_deg": None,
    }


def test_raw_samples_one_file_per_recording_appended_per_image(tmp_path):
    w = GazeCsvWriter(tmp_path / "gaze.csv", raw_dir=tmp_path / "raw")
    g = ViewGeometry(0, 100, 100, 0, 0, 1, 0, 0, 1, 10, 10)
    a = [GazeSample(0.0, 0.1, 0.2), GazeSample(0.01, float("nan"), float("nan"), False)]
    b = [GazeSample(0.5, 0.3, 0.4)]
    p = w.append_raw("r1", "a.jpg", a, [g])
    with open(p, "a") as f:
        f.write("0.49,0.3")  # a line torn by a crash
    w.append_raw("r1", "b.jpg", b)
    back = read_raw_samples(p)
    assert back[0] == a[0] and back[2] == b[0] and not back[1].valid and len(back) == 3
    assert [r[4] for r in rows(p)[1:]] == ["a.jpg", "a.jpg", "b.jpg"]
    assert '"image": "a.jpg"' in (tmp_path / "raw" / "r1.geometry.jsonl").read_text()


def test_pseudo_masks_read_the_recorded_csv(synthetic_root, tmp_path):
    """`gazemonai pseudo-masks --annotator` on the writer's CSV = on a plain GazeMedSeg CSV of those rows."""
    names = sorted(p.name for p in (synthetic_root / "images").iterdir())[:2]
    size = read_map_png(synthetic_root / "images" / names[0]).shape[:2]
    path = tmp_path / "gaze.csv"
    w = GazeCsvWriter(path)
    mine = {names[0]: F1, names[1]: F2}
    for name, fx in mine.items():
        w.append_image(name, fx, *size, annotator="dr-a", recording="r1", seconds=2.0)
        w.append_image(name, [Fixation(0, 50, 0.1, 0.1)], *size, annotator="dr-b", recording="r2")
    plain = write_fixation_csv(
        tmp_path / "plain.csv",
        [
            ImageFixations(
                n, np.array([[f.x, f.y] for f in fx]), np.array([f.duration_ms for f in fx]), *size
            )
            for n, fx in mine.items()
        ],
    )

    def run(csv_path, out, *extra):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "gazemonai",
                "pseudo-masks",
                "--data-root",
                synthetic_root,
                "--gaze-csv",
                csv_path,
                "--out",
                out,
                "--no-maps",
                "--quiet",
                "--workers",
                "1",
                *extra,
            ],
            capture_output=True,
            text=True,
        )

    bad = run(path, tmp_path / "none")
    assert bad.returncode == 2 and "2 annotators (dr-a, dr-b)" in bad.stderr and "--annotator" in bad.stderr
    ok = run(path, tmp_path / "rec", "--annotator", "dr-a")
    ref = run(plain, tmp_path / "ref")
    assert ok.returncode == 0 and ref.returncode == 0, ok.stderr + ref.stderr
    made = sorted(p.relative_to(tmp_path / "rec") for p in (tmp_path / "rec").rglob("*.png"))
    assert len(made) == 4  # 2 images x 2 levels
    for rel in made:
        assert np.array_equal(read_map_png(tmp_path / "rec" / rel), read_map_png(tmp_path / "ref" / rel)), rel
