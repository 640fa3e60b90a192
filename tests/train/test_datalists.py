"""Datalists: seeded (and patient-disjoint) validation splits, items, missing files named."""

import pytest

from gazemonai.errors import InvalidInputError, MissingInputError
from gazemonai.prep.slices import patient_of
from gazemonai.train.datalists import gaze_datalist, read_split, split_datalist, validation_split


def test_validation_split_is_seeded_disjoint_and_complete():
    ids = [f"id{i:03d}" for i in range(50)]
    tr, va = validation_split(ids, 0.1, seed=3)
    assert len(va) == 5 and len(tr) == 45 and not set(tr) & set(va) and set(tr) | set(va) == set(ids)
    assert validation_split(list(reversed(ids)), 0.1, seed=3) == (tr, va)  # order of the file is irrelevant
    assert validation_split(ids, 0.1, seed=4)[1] != va
    with pytest.raises(ValueError, match="val_fraction"):
        validation_split(ids, 1.0)


def test_datalists(synthetic_root):
    items = split_datalist(synthetic_root, "train", synthetic_root / "gaze.csv", val_fraction=0.25)
    val = split_datalist(synthetic_root, "val", synthetic_root / "gaze.csv", val_fraction=0.25)
    test = split_datalist(synthetic_root, "test")
    assert len(items) == 3 and len(val) == 1 and len(test) == 2
    assert {i["id"] for i in items} | {i["id"] for i in val} == set(read_split(synthetic_root, "train.txt"))
    assert items[0]["fixations"].shape[1] == 3 and "fixations" not in test[0]
    with pytest.raises(FileNotFoundError, match="1 file\\(s\\) missing under .*images/ghost"):
        gaze_datalist(synthetic_root, ["synth_000", "ghost"])
    with pytest.raises(FileNotFoundError, match="split file not found"):
        split_datalist(synthetic_root, "nope.txt")


def test_full_supervision_reads_no_fixations(synthetic_root, tmp_path):
    """A run on the masks needs no gaze CSV: the (default, absent) one is not read."""
    items = split_datalist(synthetic_root, "train", tmp_path / "absent.csv", 0.25, supervision="full")
    gaze = split_datalist(synthetic_root, "train", synthetic_root / "gaze.csv", 0.25)
    assert [i["id"] for i in items] == [i["id"] for i in gaze] and len(items) == 3
    assert all("fixations" not in i for i in items) and all("fixations" in i for i in gaze)
    with pytest.raises(MissingInputError, match="absent.csv"):
        split_datalist(synthetic_root, "train", tmp_path / "absent.csv", 0.25)


def test_patient_disjoint_validation_split():
    ids = [f"P{p}_{k}" for p in range(5) for k in range(1, 4)]
    train, val = validation_split(ids, 0.4, seed=0, group="patient")
    assert {patient_of(i) for i in train}.isdisjoint({patient_of(i) for i in val})
    assert len({patient_of(i) for i in val}) == 2 and sorted(train + val) == sorted(ids)
    with pytest.raises(ValueError, match="2 or more patients"):
        validation_split(["P1_1", "P1_2"], 0.5, group="patient")


def test_train_fraction_is_a_seeded_subset(synthetic_root):
    full = split_datalist(synthetic_root, "train", val_fraction=0.25, seed=0, supervision="full")
    half = split_datalist(
        synthetic_root, "train", val_fraction=0.25, seed=0, supervision="full", train_fraction=0.5
    )
    assert len(full) == 3 and len(half) == 2  # round(3 x 0.5) = 2
    assert {i["id"] for i in half} < {i["id"] for i in full}
    again = split_datalist(
        synthetic_root, "train", val_fraction=0.25, seed=0, supervision="full", train_fraction=0.5
    )
    assert again == half
    val = split_datalist(
        synthetic_root, "val", val_fraction=0.25, seed=0, supervision="full", train_fraction=0.5
    )
    assert len(val) == 1  # validation is never thinned
    with pytest.raises(InvalidInputError, match="train_fraction must be in"):
        split_datalist(synthetic_root, "train", val_fraction=0.25, supervision="full", train_fraction=0)


def test_a_training_part_smaller_than_a_batch_is_refused(synthetic_root):
    """The trainer drops incomplete batches: 3 images at batch size 4 would train nothing, silently."""
    with pytest.raises(
        InvalidInputError, match="has 3 image.*fewer than the batch size 4.*lower --batch_size"
    ):
        split_datalist(synthetic_root, "train", val_fraction=0.25, supervision="full", min_items=4)
    assert (
        len(split_datalist(synthetic_root, "train", val_fraction=0.25, supervision="full", min_items=3)) == 3
    )


@pytest.mark.parametrize("second", ["synth_001", "synth_001.png"])
def test_an_id_listed_twice_is_refused_not_put_in_training_and_validation(synthetic_root, tmp_path, second):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    (data / "train.txt").write_text("synth_000\nsynth_001\nsynth_002\nsynth_003\n" + second + "\n")
    with pytest.raises(
        InvalidInputError, match=f"train.txt: '{second}' is listed twice \\(entries 2 and 5\\)"
    ):
        read_split(data, "train.txt")
    with pytest.raises(InvalidInputError, match="is listed twice"):
        split_datalist(data, "val", data / "gaze.csv", 0.5, 0)
