"""Image-level labels: folders and CSVs of users' data, crops and slices derived from masks."""

import csv

import numpy as np
import pytest
from helpers import cli
from PIL import Image

from gazemonai.errors import InvalidInputError, MissingInputError
from gazemonai.prep.image_labels import derive_crop_labels, derive_slice_labels, read_image_labels
from gazemonai.prep.slices import VolumeCase
from gazemonai.train.datalists import image_label_datalist

CLASSES = ["normal", "lesion"]


def png(path, value=0, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def write_csv(path, rows, header=("image", "label", "group")):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_folder_of_classes(tmp_path):
    for name in ("a.png", "b.jpg"):
        png(tmp_path / "lesion" / name)
    png(tmp_path / "normal" / "c.png")
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    items = read_image_labels(tmp_path, CLASSES)
    assert [(i.image.split("/")[-1], i.label) for i in items] == [("c.png", 0), ("a.png", 1), ("b.jpg", 1)]


@pytest.mark.parametrize(
    "make, error, words",
    [
        (
            lambda r: png(r / "lesion" / "a.png") and png(r / "loose.png"),
            InvalidInputError,
            "beside the class folders",
        ),
        (
            lambda r: png(r / "lesion" / "a.png") and png(r / "tumour" / "b.png"),
            InvalidInputError,
            "['tumour']",
        ),
        (lambda r: png(r / "lesion" / "a.png"), InvalidInputError, "no image of class ['normal']"),
        (lambda r: (r / "lesion").mkdir(), InvalidInputError, "hold no images"),
    ],
)
def test_bad_folders_are_named(tmp_path, make, error, words):
    make(tmp_path)
    with pytest.raises(error) as err:
        read_image_labels(tmp_path, CLASSES)
    assert words in str(err.value)


def test_csv_with_names_indices_groups_and_relative_paths(tmp_path):
    png(tmp_path / "img" / "a.png")
    png(tmp_path / "img" / "b.png")
    png(tmp_path / "other" / "c.png")  # absolute paths are refused (issue #26): another sub-folder
    path = write_csv(
        tmp_path / "labels.csv",
        [("img/a.png", "lesion", "p1"), ("img/b.png", "0", ""), ("other/c.png", 1, "p2")],
    )
    items = read_image_labels(path, CLASSES)
    assert [(i.label, i.group) for i in items] == [(1, "p1"), (0, "img/b.png"), (1, "p2")]
    assert items[0].image == str(tmp_path / "img" / "a.png")


@pytest.mark.parametrize(
    "rows, header, error, words",
    [
        (
            [("a.png", "tumour")],
            ("image", "label"),
            InvalidInputError,
            "row 2: label 'tumour' is none of the classes",
        ),
        (
            [("a.png", "1"), ("gone.png", "0")],
            ("image", "label"),
            MissingInputError,
            "row 3: image 'gone.png' not found",
        ),
        (
            [("a.png", "1"), ("a.png", "0")],
            ("image", "label"),
            InvalidInputError,
            "row 3: image 'a.png' is listed again (first at row 2)",
        ),
        ([("a.png", "1"), ("", "0")], ("image", "label"), InvalidInputError, "row 3: empty image"),
        ([("a.png", "2")], ("image", "label"), InvalidInputError, "label '2'"),
        ([("a.png",)], ("image",), InvalidInputError, "no column label"),
    ],
)
def test_bad_csv_rows_are_named(tmp_path, rows, header, error, words):
    png(tmp_path / "a.png")
    path = write_csv(tmp_path / "labels.csv", rows, header)
    with pytest.raises(error) as err:
        read_image_labels(path, CLASSES)
    assert words in str(err.value) and "labels.csv" in str(err.value)


def test_classes_and_source_are_checked(tmp_path):
    with pytest.raises(InvalidInputError, match="two different names"):
        read_image_labels(tmp_path, ["a", "b", "c"])
    with pytest.raises(MissingInputError, match="no such folder or CSV"):
        read_image_labels(tmp_path / "absent", CLASSES)


def test_datalist_split_keeps_groups_together(tmp_path):
    rows = []
    for g in range(10):
        for k, label in enumerate(("normal", "lesion")):
            rows.append((png(tmp_path / f"{g}_{k}.png").name, label, f"patient{g}"))
    path = write_csv(tmp_path / "labels.csv", rows)
    train = image_label_datalist(path, "train", CLASSES, val_fraction=0.3, seed=0)
    val = image_label_datalist(path, "val", CLASSES, val_fraction=0.3, seed=0)
    assert len(train) == 14 and len(val) == 6
    assert not {i["id"] for i in train} & {i["id"] for i in val}  # a patient on one side only
    assert len(image_label_datalist(path, "all", CLASSES)) == 20
    assert image_label_datalist(path, "val", CLASSES, 0.3, seed=0) == val  # seeded
    assert image_label_datalist(path, "val", CLASSES, 0.3, seed=1) != val
    with pytest.raises(InvalidInputError, match="fewer than the batch size 8"):
        image_label_datalist(path, "val", CLASSES, 0.3, seed=0, min_items=8)


def test_crops_are_chosen_with_the_masks(tmp_path):
    """Red marks the polyp: a polyp crop shows most of it, a polyp-free crop none of it."""
    data = tmp_path / "data"
    masks = {}
    for i, (y, x, s) in enumerate([(10, 10, 20), (60, 70, 30), (5, 5, 90)]):  # the last fills the image
        mask = np.zeros((100, 120), bool)
        mask[y : y + s, x : x + s] = True
        image = np.zeros((100, 120, 3), np.uint8)
        image[..., 1] = 80
        image[mask, 0] = 255
        Image.fromarray(image).save(png(data / "images" / f"im{i}.png"))
        Image.fromarray(mask.astype(np.uint8) * 255).save(png(data / "masks" / f"im{i}.png"))
        masks[f"im{i}"] = mask
    summary = derive_crop_labels(
        data, ["im0", "im1", "im2"], tmp_path / "out", crop_fraction=0.5, size=50, seed=3
    )
    assert summary["counts"] == {"no_polyp": 2, "polyp": 3}
    assert summary["no_polyp_free_crop"] == ["im2"] and summary["no_covering_crop"] == []
    rows = list(csv.DictReader((tmp_path / "out" / "labels.csv").open()))
    assert {(r["label"], r["group"]) for r in rows} == {
        ("polyp", "im0"),
        ("polyp", "im1"),
        ("polyp", "im2"),
        ("no_polyp", "im0"),
        ("no_polyp", "im1"),
    }
    for r in rows:
        crop = np.asarray(Image.open(tmp_path / "out" / r["image"]))
        assert crop.shape == (50, 50, 3)  # side 0.5 x 100 = 50 pixels, written at size 50
        red = (crop[..., 0] > 128).sum()
        polyp = int(masks[r["group"]].sum())
        if r["label"] == "no_polyp":
            assert red == 0
        else:
            assert red >= 0.5 * min(polyp, 50 * 50)
    again = tmp_path / "again"
    derive_crop_labels(data, ["im0", "im1", "im2"], again, crop_fraction=0.5, size=50, seed=3)
    for r in rows:  # seeded: the same crops again
        assert np.array_equal(
            np.asarray(Image.open(again / r["image"])), np.asarray(Image.open(tmp_path / "out" / r["image"]))
        )


def test_slices_label_every_slice(tmp_path):
    import nibabel as nib

    image = np.random.default_rng(0).normal(100, 20, (40, 30, 6)).astype(np.float32)
    mask = np.zeros(image.shape, np.uint8)
    mask[10:20, 10:20, 2:4] = 1  # gland on two of six slices
    for name, a in (("img.nii.gz", image), ("seg.nii.gz", mask)):
        nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / name)
    summary = derive_slice_labels(
        [VolumeCase("007", tmp_path / "img.nii.gz", tmp_path / "seg.nii.gz")], tmp_path / "out"
    )
    assert summary["counts"] == {"no_gland": 4, "gland": 2}
    rows = list(csv.DictReader((tmp_path / "out" / "labels.csv").open()))
    assert len(rows) == 6 and {r["group"] for r in rows} == {"007"}
    assert sorted(r["image"] for r in rows if r["label"] == "gland") == ["gland/007_3.png", "gland/007_4.png"]


def test_cli_derives_only_from_training_images(synthetic_root, tmp_path):
    out = tmp_path / "labels"
    done = cli(
        "derive-image-labels",
        "--dataset-dir",
        synthetic_root,
        "--out",
        out,
        "--val-fraction",
        "0.25",
        "--size",
        "32",
    )
    assert done.returncode == 0, done.stderr
    groups = {r["group"] for r in csv.DictReader((out / "labels.csv").open())}
    train = (synthetic_root / "train.txt").read_text().split()
    assert len(groups) == 3 and groups < set(train)  # 4 training images, 1 held out for validation
    again = cli("derive-image-labels", "--dataset-dir", synthetic_root, "--out", out)
    assert again.returncode == 2 and "is not an empty folder" in again.stderr  # stale crops would count
    bad = cli(
        "derive-image-labels", "--dataset-dir", synthetic_root, "--out", tmp_path / "x", "--kind", "boxes"
    )
    assert bad.returncode == 2 and "--kind must be 'crops' or 'slices'" in bad.stderr
    no_manifest = cli(
        "derive-image-labels", "--dataset-dir", synthetic_root, "--out", tmp_path / "y", "--kind", "slices"
    )
    assert no_manifest.returncode == 2 and "manifest.json not found" in no_manifest.stderr


def test_cli_slices_of_the_training_patients(tmp_path):
    import nibabel as nib

    for k, case in enumerate(["001", "002", "003", "004"]):
        image = (
            np.random.default_rng(k).normal(100, 20, (5, 16, 16)).astype(np.float32)
        )  # (slices, rows, cols)
        label = np.zeros(image.shape, np.uint8)
        label[1 : 3 + k % 2, 4:9, 4:9] = 1
        for folder, a in (("images", image), ("masks", label)):
            (tmp_path / folder).mkdir(exist_ok=True)
            nib.save(
                nib.Nifti1Image(a.transpose(2, 1, 0), np.eye(4)),
                tmp_path / folder / f"{case}_t2{'_seg' if folder == 'masks' else ''}.nii.gz",
            )
    volumes = ["--nifti-images", tmp_path / "images", "--nifti-masks", tmp_path / "masks"]
    prepared = cli("prepare-slices", *volumes, "--out", tmp_path / "slices", "--test-patients", "004")
    assert prepared.returncode == 0, prepared.stderr
    done = cli(
        "derive-image-labels",
        "--kind",
        "slices",
        "--dataset-dir",
        tmp_path / "slices",
        "--out",
        tmp_path / "labels",
    )
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((tmp_path / "labels" / "labels.csv").open()))
    patients = {r["group"] for r in rows}
    assert len(patients) == 2 and "004" not in patients  # 3 training patients, 1 held out for validation
    assert len(rows) == 10  # every slice, not only the gland slices
    gland = {p: sum(r["label"] == "gland" for r in rows if r["group"] == p) for p in patients}
    assert gland == {p: 2 + (int(p) - 1) % 2 for p in patients}


@pytest.mark.parametrize(
    "name, words",
    [
        ("../outside.png", "must be a path inside"),
        ("sub/../../outside.png", "must be a path inside"),
        ("{outside}", "must be a path inside"),  # absolute
        ("link.png", "resolves to"),  # a link leaving the CSV's folder
    ],
)
def test_image_label_paths_stay_inside_the_csv_folder_as_fixation_names_do(tmp_path, name, words):
    data = tmp_path / "labels"
    png(data / "a.png")
    png(data / "b.png", 255)
    outside = png(tmp_path / "outside.png")
    (data / "sub").mkdir()
    (data / "link.png").symlink_to(outside)
    rows = [("a.png", "0"), ("b.png", "1"), (name.format(outside=outside), "1")]
    path = write_csv(data / "labels.csv", rows, ("image", "label"))
    with pytest.raises(InvalidInputError) as err:
        read_image_labels(path, CLASSES)
    assert "labels.csv row 4" in str(err.value) and words in str(err.value), str(err.value)
