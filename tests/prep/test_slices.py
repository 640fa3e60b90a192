"""Volumes -> axial gland slices: DICOM + NRRD (NCI-ISBI), NIfTI pairs, names, patient-disjoint splits."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import NCI_CSV, ROOT, SHARED_DATA, need, write_dicom_series
from PIL import Image

from gazemonai.prep.slices import (
    nci_isbi_cases,
    nifti_cases,
    parse_slice_name,
    patient_split,
    prepare_slices,
    read_volume,
    scale_to_uint8,
    slice_name,
)

PROSTATE158 = SHARED_DATA / "prostate-prostate158"


def volume(seed: int, shape=(6, 12, 10)):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 1200, size=shape).astype(np.int16)  # (slices, rows, columns)
    label = np.zeros(shape, np.uint8)
    label[2, 3:7, 2:6] = 1  # central gland on slices 3 and 4 (1-based), peripheral zone on 5
    label[3, 4:9, 3:8] = 1
    label[4, 5:8, 1:4] = 2
    return image, label


def write_nrrd(path, label):
    import itk

    path.parent.mkdir(parents=True, exist_ok=True)
    itk.imwrite(itk.image_from_array(label), str(path))


@pytest.fixture
def nci_layout(tmp_path):
    """Two patients as NCI-ISBI ships them: DICOM series under nested folders, NRRD labels."""
    vols = {}
    for seed, patient in enumerate(["Prostate3T-01-0001", "ProstateDx-01-0006"]):
        image, label = volume(seed)
        write_dicom_series(tmp_path / "dicom" / patient / "1.3.6.1" / "series", image)
        suffix = "_truth" if seed else ""
        write_nrrd(tmp_path / "labels" / f"{patient}{suffix}.nrrd", label)
        vols[patient] = (image, label)
    return tmp_path, vols


def test_slice_names_round_trip():
    assert slice_name("Prostate3T-01-0027", 13) == "Prostate3T-01-0027_14"
    assert parse_slice_name("Prostate3T-01-0027_14.jpg") == ("Prostate3T-01-0027", 14)
    for bad in ("Prostate3T-01-0027_0", "Prostate3T_01_14x", "no-slice", "P1_3.5"):
        with pytest.raises(ValueError):
            parse_slice_name(bad)
    with pytest.raises(ValueError, match="cannot form a slice name"):
        slice_name("001_t2", 0)


def test_scale_to_uint8_by_hand():
    v = np.arange(201, dtype=np.float32).reshape(1, 1, 201)  # percentiles 0.5 / 99.5 -> 1 and 199
    out = scale_to_uint8(v)
    assert out.dtype == np.uint8 and out[0, 0, 0] == 0 and out[0, 0, 1] == 0 and out[0, 0, 199] == 255
    assert out[0, 0, 100] == round((100 - 1) / 198 * 255)
    assert not scale_to_uint8(np.full((2, 2, 2), 7.0)).any()


def test_patient_split_is_seeded_and_disjoint():
    patients = [f"P{i}" for i in range(10)]
    train, test = patient_split(patients, 0.3, seed=1)
    assert len(test) == 3 and not set(train) & set(test) and sorted(train + test) == sorted(patients)
    assert patient_split(patients, 0.3, seed=1) == (train, test)
    assert patient_split(["a", "b"], 0.1) [1] and patient_split(["a", "b"], 0.1)[0]  # fmt: skip


def test_dicom_nrrd_layout_to_slices(nci_layout):
    root, vols = nci_layout
    cases = nci_isbi_cases(root / "dicom", root / "labels")
    assert [c.patient for c in cases] == sorted(vols)
    image0 = read_volume(cases[0].image)
    assert np.array_equal(image0, vols[cases[0].patient][0])  # the series, in slice order
    summary = prepare_slices(cases, root / "out", test_patients=["ProstateDx-01-0006"])
    assert summary["slices"] == 6 and summary["train_slices"] == 3 and summary["test_slices"] == 3
    train = (root / "out" / "train.txt").read_text().split()
    test = (root / "out" / "test.txt").read_text().split()
    assert train == ["Prostate3T-01-0001_3", "Prostate3T-01-0001_4", "Prostate3T-01-0001_5"]
    assert {parse_slice_name(n)[0] for n in test} == {"ProstateDx-01-0006"}
    image, label = vols["Prostate3T-01-0001"]
    scaled = scale_to_uint8(image)
    for k in (3, 4, 5):
        name = f"Prostate3T-01-0001_{k}"
        png = np.asarray(Image.open(root / "out" / "images" / f"{name}.png"))
        mask = np.asarray(Image.open(root / "out" / "masks" / f"{name}.png"))
        assert np.array_equal(png, scaled[k - 1])
        assert np.array_equal(mask > 0, label[k - 1] > 0) and set(np.unique(mask)) <= {0, 255}
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    assert manifest["cases"]["Prostate3T-01-0001"]["slices_total"] == 6


def test_nifti_pairs_to_slices(tmp_path):
    import nibabel as nib

    for seed, case in enumerate(["001", "020"]):
        image, label = volume(seed)
        # NIfTI voxel order is (x, y, z); ITK reads it back as (z, y, x)
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(image.transpose(2, 1, 0).astype(np.float32), np.eye(4)),
                 tmp_path / "images" / f"{case}_t2.nii.gz")  # fmt: skip
        nib.save(nib.Nifti1Image(label.transpose(2, 1, 0), np.eye(4)),
                 tmp_path / "masks" / f"{case}_t2_anatomy_reader1.nii.gz")  # fmt: skip
    cases = nifti_cases(tmp_path / "images", tmp_path / "masks")
    assert [(c.patient, c.label.name) for c in cases] == [
        ("001", "001_t2_anatomy_reader1.nii.gz"),
        ("020", "020_t2_anatomy_reader1.nii.gz"),
    ]
    summary = prepare_slices(cases, tmp_path / "out", test_fraction=0.5, seed=0)
    assert summary["patients"] == 2 and summary["slices"] == 6
    assert len(summary["test_patients"]) == 1 and set(summary["train_patients"]).isdisjoint(
        summary["test_patients"]
    )
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "001_5.png"))
    assert np.array_equal(mask > 0, volume(0)[1][4] > 0)  # zonal label 2 counts as gland


def test_bad_layouts_name_what_is_wrong(nci_layout, tmp_path):
    root, vols = nci_layout
    write_nrrd(root / "labels" / "Prostate3T-01-0099.nrrd", volume(5)[1])  # no DICOM for it
    with pytest.raises(FileNotFoundError, match="Prostate3T-01-0099"):
        nci_isbi_cases(root / "dicom", root / "labels")
    (root / "labels" / "Prostate3T-01-0099.nrrd").unlink()
    write_nrrd(root / "labels" / "Prostate3T-01-0001.nrrd", volume(0, shape=(6, 12, 11))[1])
    cases = nci_isbi_cases(root / "dicom", root / "labels")
    with pytest.raises(ValueError, match=r"Prostate3T-01-0001.*shape \(6, 12, 11\)"):
        prepare_slices(cases, tmp_path / "out")
    p = subprocess.run([sys.executable, "-m", "gazemonai", "prepare-slices", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert p.returncode == 2 and "either --nifti-images" in p.stderr


def test_real_prostate158_through_the_cli(tmp_path):
    need(PROSTATE158 / "images")
    p = subprocess.run(
        [sys.executable, "-m", "gazemonai", "prepare-slices", "--out", str(tmp_path / "p158"),
         "--nifti-images", str(PROSTATE158 / "images"), "--nifti-masks", str(PROSTATE158 / "masks")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["patients"] == 4 and summary["slices"] == 72  # SOURCE.md: 72 gland slices
    assert set(summary["train_patients"]).isdisjoint(summary["test_patients"])
    assert len(list((tmp_path / "p158" / "images").glob("*.png"))) == 72


def test_every_real_nci_isbi_gaze_image_is_a_slice_name():
    need(NCI_CSV)
    with open(NCI_CSV, newline="") as f:
        images = {row["IMAGE"] for row in csv.DictReader(f)}
    assert len(images) == 789
    patients = set()
    for image in images:
        patient, k = parse_slice_name(image)
        assert patient.startswith(("Prostate3T-01-", "ProstateDx-01-")) and k >= 1
        assert slice_name(patient, k - 1) + ".jpg" == image
        patients.add(patient)
    assert len(patients) > 10


def _nifti_pair(root, case, image, label, image_dtype=np.float32):
    import nibabel as nib

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    nib.save(
        nib.Nifti1Image(image.transpose(2, 1, 0).astype(image_dtype), np.eye(4)),
        root / "images" / f"{case}_t2.nii.gz",
    )
    nib.save(nib.Nifti1Image(label.transpose(2, 1, 0), np.eye(4)), root / "masks" / f"{case}_t2_seg.nii.gz")


def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _nifti_2d(path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.arange(120, dtype=np.float32).reshape(10, 12), np.eye(4)), path)


def _nan(image):
    out = image.astype(np.float32)
    out[3, 2, 2] = np.nan
    return out


# (what is wrong, how to make it from a good layout, the file the message must name, its words)
BAD_VOLUMES = {
    "truncated .nii.gz image": (lambda r: _cut(r / "images" / "020_t2.nii.gz"), "020_t2.nii.gz", "in full"),
    "truncated .nii.gz label": (
        lambda r: _cut(r / "masks" / "020_t2_seg.nii.gz", 0.7),
        "020_t2_seg.nii.gz",
        "in full",
    ),
    "all-NaN image": (
        lambda r: _nifti_pair(r, "020", np.full((6, 12, 10), np.nan), volume(1)[1]),
        "020_t2.nii.gz",
        "NaN or infinite",
    ),
    "one NaN voxel": (
        lambda r: _nifti_pair(r, "020", _nan(volume(1)[0]), volume(1)[1]),
        "020_t2.nii.gz",
        "1 NaN",
    ),
    "constant image": (
        lambda r: _nifti_pair(r, "020", np.full((6, 12, 10), 5.0), volume(1)[1]),
        "020_t2.nii.gz",
        "is constant",
    ),
    "label without gland": (
        lambda r: _nifti_pair(r, "020", volume(1)[0], np.zeros((6, 12, 10), np.uint8)),
        "020_t2_seg",
        "no gland",
    ),
    "label of another shape": (
        lambda r: _nifti_pair(r, "020", volume(1)[0], volume(1, shape=(6, 12, 11))[1]),
        "020_t2_seg",
        "shape",
    ),
    "not a volume at all": (
        lambda r: (r / "images" / "020_t2.nii.gz").write_text("hello"),
        "020_t2.nii.gz",
        "cannot read",
    ),
    "a 2-D image": (
        lambda r: _nifti_2d(r / "images" / "020_t2.nii.gz"),
        "020_t2.nii.gz",
        "3-D single-channel",
    ),
}


@pytest.mark.parametrize("problem", sorted(BAD_VOLUMES))
def test_a_volume_not_read_in_full_stops_everything_with_its_name(tmp_path, problem):
    make_bad, name, words = BAD_VOLUMES[problem]
    for seed, case in enumerate(["001", "020"]):
        _nifti_pair(tmp_path, case, *volume(seed))
    make_bad(tmp_path)
    p = subprocess.run([sys.executable, "-m", "gazemonai", "prepare-slices", "--out", str(tmp_path / "out"),
                        "--nifti-images", str(tmp_path / "images"), "--nifti-masks", str(tmp_path / "masks")],
                       capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert p.returncode == 2, p.stderr[-2000:]
    assert name in p.stderr and words in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # not even the good patient's slices: nothing half-made


@pytest.mark.parametrize("problem", ["truncated file", "missing slice", "truncated NRRD label"])
def test_a_dicom_series_or_nrrd_label_not_read_in_full_is_named(nci_layout, problem):
    root, _ = nci_layout
    series = root / "dicom" / "ProstateDx-01-0006" / "1.3.6.1" / "series"
    if problem == "truncated file":
        _cut(series / "IM0003.dcm", 0.8)
        name, words = "IM0003.dcm", "cannot read DICOM file"
    elif problem == "missing slice":
        (series / "IM0002.dcm").unlink()
        name, words = "between IM0001.dcm and IM0003.dcm", "a slice is missing"
    else:
        write_nrrd(root / "labels" / "ProstateDx-01-0006_truth.nrrd", volume(1)[1])
        _cut(root / "labels" / "ProstateDx-01-0006_truth.nrrd", 0.9)
        name, words = "ProstateDx-01-0006_truth.nrrd", "cannot read volume"
    p = subprocess.run([sys.executable, "-m", "gazemonai", "prepare-slices", "--out", str(root / "out"),
                        "--dicom-root", str(root / "dicom"), "--labels-root", str(root / "labels")],
                       capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert p.returncode == 2 and name in p.stderr and words in p.stderr, p.stderr[-2000:]
    assert not (root / "out").exists()
