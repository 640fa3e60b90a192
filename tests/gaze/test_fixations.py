import numpy as np
import pytest
from helpers import KVASIR_CSV, NCI_CSV, need

from gazemonai.gaze.fixations import (
    ALL_COLUMNS,
    FixationFormatError,
    ImageFixations,
    read_fixation_csv,
    write_fixation_csv,
)

HEADER = ",".join(ALL_COLUMNS)


def write(tmp_path, text, name="gaze.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_reads_and_groups_in_fixation_order(tmp_path):
    p = write(
        tmp_path,
        HEADER
        + "\n"
        + "a.jpg,2,0.5,0.25,200,1000,300,10.0,20.0\n"
        + "b.jpg,1,0.1,0.9,100,,,5,5\n"
        + "a.jpg,1,0.75,0.5,300,1000,7,10.0,20.0\n",
    )
    fx = read_fixation_csv(p)
    assert list(fx) == ["a.jpg", "b.jpg"]
    a = fx["a.jpg"]
    assert (a.height, a.width) == (10, 20)
    np.testing.assert_allclose(a.xy, [[0.75, 0.5], [0.5, 0.25]])
    np.testing.assert_allclose(a.duration, [300, 200])
    np.testing.assert_array_equal(a.rows, [4, 2])
    assert a.stem == "a"
    np.testing.assert_allclose(a.as_array(), [[0.75, 0.5, 300], [0.5, 0.25, 200]])
    assert np.isnan(fx["b.jpg"].start[0])


def test_subset_keeps_only_requested_images(tmp_path):
    p = write(tmp_path, HEADER + "\na.jpg,1,0.5,0.5,1,,,4,4\nb.jpg,1,0.5,0.5,1,,,4,4\n")
    assert list(read_fixation_csv(p, images=["b"])) == ["b.jpg"]


@pytest.mark.parametrize(
    "row, message",
    [
        ("a.jpg,1,abc,0.5,100,,,4,4", "line 2: CURRENT_FIX_X='abc' is not a number"),
        ("a.jpg,1,nan,0.5,100,,,4,4", "line 2: CURRENT_FIX_X='nan' is not a finite number"),
        ("a.jpg,1,0.5,,100,,,4,4", "line 2: CURRENT_FIX_Y is empty"),
        ("a.jpg,1,1.2,0.5,100,,,4,4", "line 2: CURRENT_FIX_X=1.2 is outside [0, 1] (image a.jpg)"),
        ("a.jpg,1,0.5,-0.1,100,,,4,4", "CURRENT_FIX_Y=-0.1 is outside [0, 1]"),
        ("a.jpg,1,0.5,0.5,0,,,4,4", "line 2: CURRENT_FIX_DURATION=0.0 must be positive"),
        ("a.jpg,1,0.5,0.5,-5,,,4,4", "CURRENT_FIX_DURATION=-5.0 must be positive"),
        ("a.jpg,1,0.5,0.5,5,,,0,4", "IMAGE_HEIGHT/IMAGE_WIDTH=0.0/4.0 must be positive integers"),
        ("../a.jpg,1,0.5,0.5,5,,,4,4", "refers outside the dataset folder"),
        ("..,1,0.5,0.5,5,,,4,4", "refers outside the dataset folder"),
        ("sub/a.jpg,1,0.5,0.5,5,,,4,4", "contains a path separator"),
        ("sub\\a.jpg,1,0.5,0.5,5,,,4,4", "contains a path separator"),
        (",1,0.5,0.5,5,,,4,4", "IMAGE is empty"),
        ("a.jpg,1,0.5,0.5,5,,,4,4,extra", "more fields than the header"),
    ],
)
def test_bad_rows_name_file_line_and_problem(tmp_path, row, message):
    p = write(tmp_path, HEADER + "\n" + row + "\n")
    with pytest.raises(FixationFormatError) as e:
        read_fixation_csv(p)
    assert str(p) in str(e.value)
    assert message in str(e.value)


def test_bad_row_deep_in_file_is_reported_with_its_line(tmp_path):
    rows = [f"a.jpg,{i},0.5,0.5,100,,,4,4" for i in range(1, 6)] + ["a.jpg,6,0.5,0.5,oops,,,4,4"]
    p = write(tmp_path, HEADER + "\n" + "\n".join(rows) + "\n")
    with pytest.raises(FixationFormatError, match="line 7: CURRENT_FIX_DURATION='oops'"):
        read_fixation_csv(p)


def test_missing_columns(tmp_path):
    p = write(tmp_path, "IMAGE,CURRENT_FIX_X,CURRENT_FIX_Y\na.jpg,0.5,0.5\n")
    with pytest.raises(
        FixationFormatError, match="missing column\\(s\\) CURRENT_FIX_INDEX, CURRENT_FIX_DURATION"
    ):
        read_fixation_csv(p)


def test_empty_file_and_header_only(tmp_path):
    with pytest.raises(FixationFormatError, match="the file is empty"):
        read_fixation_csv(write(tmp_path, "", "empty.csv"))
    with pytest.raises(FixationFormatError, match="header but no fixation rows"):
        read_fixation_csv(write(tmp_path, HEADER + "\n", "header.csv"))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="fixation CSV not found"):
        read_fixation_csv("/nonexistent/gaze.csv")


def test_duplicate_index_and_changing_size(tmp_path):
    p = write(tmp_path, HEADER + "\na.jpg,1,0.5,0.5,5,,,4,4\na.jpg,1,0.2,0.5,5,,,4,4\n")
    with pytest.raises(FixationFormatError, match="line 3: image a.jpg repeats CURRENT_FIX_INDEX=1"):
        read_fixation_csv(p)
    p = write(tmp_path, HEADER + "\na.jpg,1,0.5,0.5,5,,,4,4\na.jpg,2,0.2,0.5,5,,,4,5\n", "b.csv")
    with pytest.raises(FixationFormatError, match="line 3: image a.jpg has size 4x5 here but 4x4 at line 2"):
        read_fixation_csv(p)


def test_write_read_round_trip(tmp_path):
    fx = ImageFixations(
        image="x.png",
        xy=np.array([[0.1, 0.2], [0.3, 0.123456789012345]]),
        duration=np.array([120.0, 305.0]),
        height=30,
        width=40,
        index=np.array([1, 2]),
        start=np.array([7.0, 160.0]),
        pupil=np.array([np.nan, 2000.0]),
    )
    p = write_fixation_csv(tmp_path / "out" / "g.csv", [fx])
    back = read_fixation_csv(p)["x.png"]
    np.testing.assert_array_equal(back.xy, fx.xy)
    np.testing.assert_array_equal(back.duration, fx.duration)
    np.testing.assert_array_equal(back.start, fx.start)
    assert np.isnan(back.pupil[0]) and back.pupil[1] == 2000.0
    assert (back.height, back.width) == (30, 40)


def test_real_kvasir_csv_parses():
    fx = read_fixation_csv(need(KVASIR_CSV))
    assert len(fx) == 1000
    assert sum(len(f) for f in fx.values()) == 26832
    f = fx["cju88y1mwoln50871emyfny1g.jpg"]
    assert (f.height, f.width) == (529, 621)
    np.testing.assert_allclose(f.xy[0], [0.4825520833333334, 0.4541666666666666])
    assert f.duration[0] == 455


def test_real_nci_isbi_csv_parses():
    fx = read_fixation_csv(need(NCI_CSV))
    assert len(fx) == 789
    assert sum(len(f) for f in fx.values()) == 17397
    sizes = {}
    for f in fx.values():
        sizes[(f.height, f.width)] = sizes.get((f.height, f.width), 0) + 1
    assert sizes == {(320, 320): 404, (400, 400): 351, (432, 432): 17, (256, 256): 17}
    f = fx["Prostate3T-01-0027_14.jpg"]
    assert len(f) == 35 and f.duration[0] == 770
    np.testing.assert_allclose(f.xy[0], [0.4846041666666668, 0.4931510416666668])
