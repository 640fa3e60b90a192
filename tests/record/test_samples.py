"""The raw sample file: a round trip that keeps invalid samples, and errors that name the line."""

from __future__ import annotations

import math

import pytest

from gazemonai.errors import InvalidInputError, MissingInputError
from gazemonai.record.samples import GazeSample, read_raw_samples, write_raw_samples


def test_round_trip_keeps_every_sample_including_invalid_ones(tmp_path):
    samples = [
        GazeSample(0.0, 0.5, 0.25),
        GazeSample(1 / 60, 0.0, 0.0, False),
        GazeSample(2 / 60, float("nan"), float("nan"), False),
        GazeSample(0.05, 1.0, 0.1 + 0.2),
    ]
    path = write_raw_samples(tmp_path / "sub" / "rec.csv", samples)
    back = read_raw_samples(path)
    assert back[:2] == samples[:2] and back[3] == samples[3]  # floats exactly (repr)
    assert back[2].t == 2 / 60 and math.isnan(back[2].x) and not back[2].valid
    assert path.read_text().splitlines()[0] == "t,x,y,valid"
    assert path.read_text().splitlines()[3] == f"{2 / 60!r},,,0"
    assert [p.name for p in path.parent.iterdir()] == ["rec.csv"]  # no temporary file left


def test_an_existing_file_is_replaced_whole(tmp_path):
    path = write_raw_samples(tmp_path / "rec.csv", [GazeSample(0, 0.1, 0.1)] * 5)
    write_raw_samples(path, [GazeSample(1, 0.2, 0.2)])
    assert read_raw_samples(path) == [GazeSample(1, 0.2, 0.2)]


@pytest.mark.parametrize(
    "body, message",
    [
        ("t,x,valid\n0,0.1,1\n", "missing column\\(s\\) y"),
        ("t,x,y,valid\n0,0.1,0.2,yes\n", "line 2: valid='yes' must be 0 or 1"),
        ("t,x,y,valid\n0,0.1,0.2,1\n0.1,abc,0.2,1\n", "line 3: x='abc' is not a number"),
        ("t,x,y,valid\n0,,0.2,1\n", "line 2: x is empty"),
        ("t,x,y,valid\n1,0.1,0.2,1\n0.5,0.1,0.2,1\n", "line 3: t=0.5 goes back in time"),
        ("t,x,y,valid\ninf,0.1,0.2,1\n", "line 2: t='inf' is not a finite number"),
    ],
)
def test_bad_files_name_the_line(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(InvalidInputError, match=message):
        read_raw_samples(path)


def test_missing_file(tmp_path):
    with pytest.raises(MissingInputError, match="raw gaze sample file not found"):
        read_raw_samples(tmp_path / "nope.csv")


def test_extra_columns_are_accepted(tmp_path):
    path = tmp_path / "rec.csv"
    path.write_text("t,x,y,valid,image\n0,0.1,0.2,1,a.jpg\n")
    assert read_raw_samples(path) == [GazeSample(0.0, 0.1, 0.2, True)]
