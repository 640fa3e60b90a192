"""MR volumes -> 2-D axial slices with their masks, the images that gaze was recorded on.

GazeMedSeg's NCI-ISBI fixations name each image ``<PatientID>_<slice>`` (``Prostate3T-01-0027_14``:
patient ``Prostate3T-01-0027``, axial slice 14, 1-based). This step writes slices of that form from
two layouts, read with ITK:

* NCI-ISBI 2013: one DICOM series per patient (``DICOM_ROOT/<PatientID>/.../*.dcm``) and one NRRD
  label volume per patient (``LABELS_ROOT/<PatientID>[_suffix].nrrd``; 1 = central gland,
  2 = peripheral zone);
* NIfTI image/label pairs (Prostate158 / MSD style: ``images/001_t2.nii.gz`` with
  ``masks/001_t2_anatomy_reader1.nii.gz``; zonal labels).

The gland is ``label > 0``. Only slices containing gland are kept. Slice ``k`` is the ``k``-th along
the volume's third index axis as ITK orders it (a DICOM series sorted by position along its normal).
Images are written as 8-bit PNG, each volume's intensities clipped to its 0.5-99.5 percentiles and
scaled to 0-255 (the images gaze was recorded on were 8-bit JPEG renderings); masks as 0/255 PNG.
Patients are split into train/test (``train.txt``/``test.txt``, slice names) so that no patient
spans both.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError, MissingInputError
from .io import exclusive_folder, write_png

__all__ = [
    "VolumeCase",
    "nci_isbi_cases",
    "nifti_cases",
    "read_volume",
    "read_volume_image",
    "parse_slice_name",
    "slice_name",
    "patient_of",
    "scale_to_uint8",
    "prepare_slices",
    "patient_split",
]

logger = logging.getLogger(__name__)

#: ``<PatientID>_<slice>``: a patient id without "_" and a 1-based slice number.
SLICE_NAME = re.compile(r"^(?P<patient>[^_/\\]+)_(?P<slice>[1-9][0-9]*)$")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class VolumeCase:
    """One patient's image volume and label volume (a DICOM series folder or a file each)."""

    patient: str
    image: Path
    label: Path
    meta: dict = field(default_factory=dict)


def slice_name(patient: str, index0: int) -> str:
    """The slice name for 0-based index ``index0``: ``<patient>_<index0 + 1>``."""
    name = f"{patient}_{index0 + 1}"
    if not SLICE_NAME.match(name):
        raise InvalidInputError(
            f"patient id {patient!r} cannot form a slice name (no '_', '/' or '\\' allowed)"
        )
    return name


def parse_slice_name(name: str) -> tuple[str, int]:
    """``(patient, 1-based slice)`` of ``<PatientID>_<slice>`` (a file extension is ignored).

    Raises:
        InvalidInputError: the name is not of that form.
    """
    stem = Path(name).name
    for ext in (".jpg", ".jpeg", ".png", ".tif", ".tiff"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    m = SLICE_NAME.match(stem)
    if not m:
        raise InvalidInputError(
            f"{name!r} is not a slice name <PatientID>_<slice> with a 1-based slice number"
        )
    return m["patient"], int(m["slice"])


def patient_of(name: str) -> str:
    """The patient id of a slice name."""
    return parse_slice_name(name)[0]


def _strip_nifti(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _dicom_series_dir(root: Path) -> Path | None:
    """The one folder under ``root`` (itself included) holding DICOM files."""
    found = sorted({p.parent for p in root.rglob("*") if p.is_file() and _looks_dicom(p)})
    if not found:
        return None
    if len(found) > 1:
        raise InvalidInputError(
            f"{root} holds DICOM files in {len(found)} folders ({', '.join(map(str, found[:4]))}); "
            "expected one series per patient"
        )
    return found[0]


def _looks_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".ima"):
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return head[128:132] == b"DICM"
    except OSError:
        return False


def nci_isbi_cases(dicom_root: str | os.PathLike, labels_root: str | os.PathLike) -> list[VolumeCase]:
    """NCI-ISBI 2013 cases: each ``LABELS_ROOT/<PatientID>[_x].nrrd`` with ``DICOM_ROOT/<PatientID>/``.

    Raises:
        MissingInputError: no label volumes, or labels whose DICOM series is missing (named).
        InvalidInputError: a patient with two label files, or a folder with several DICOM series.
    """
    dicom_root, labels_root = Path(dicom_root), Path(labels_root)
    labels = sorted(labels_root.glob("*.nrrd"))
    if not labels:
        raise MissingInputError(f"no .nrrd label volumes in {labels_root}")
    cases, missing, seen = [], [], {}
    for label in labels:
        patient = label.stem.split("_")[0]
        if patient in seen:
            raise InvalidInputError(
                f"two label volumes for patient {patient}: {seen[patient].name} and {label.name}"
            )
        seen[patient] = label
        folder = dicom_root / patient
        series = _dicom_series_dir(folder) if folder.is_dir() else None
        if series is None:
            missing.append(f"{folder} (for {label.name})")
            continue
        cases.append(VolumeCase(patient, series, label, {"layout": "nci-isbi"}))
    if missing:
        raise MissingInputError(f"no DICOM series for {len(missing)} label volume(s): {'; '.join(missing)}")
    return cases


def nifti_cases(images_dir: str | os.PathLike, masks_dir: str | os.PathLike) -> list[VolumeCase]:
    """NIfTI pairs: ``IMAGES/<stem>.nii[.gz]`` with the mask in ``MASKS`` named ``<stem>.nii[.gz]`` or
    ``<stem>_<anything>.nii[.gz]`` (``001_t2`` -> ``001_t2_anatomy_reader1``, ``Case00`` ->
    ``Case00_segmentation``). The patient id is the stem up to its first ``_`` (``001_t2`` -> ``001``).

    Raises:
        MissingInputError: no images, or images without a mask (named).
        InvalidInputError: an image matching several masks, or two images of one patient.
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    images = sorted(p for p in images_dir.iterdir() if p.is_file() and _strip_nifti(p.name))
    if not images:
        raise MissingInputError(f"no NIfTI images (.nii, .nii.gz) in {images_dir}")
    masks = {_strip_nifti(p.name): p for p in masks_dir.iterdir() if p.is_file() and _strip_nifti(p.name)}
    cases, missing, seen = [], [], {}
    for image in images:
        stem = _strip_nifti(image.name)
        match = (
            [masks[stem]]
            if stem in masks
            else [p for m, p in sorted(masks.items()) if m.startswith(stem + "_")]
        )
        if not match:
            missing.append(image.name)
            continue
        if len(match) > 1:
            raise InvalidInputError(
                f"{image} matches {len(match)} masks in {masks_dir}: {', '.join(p.name for p in match)}"
            )
        patient = stem.split("_")[0]
        if patient in seen:
            raise InvalidInputError(
                f"two images for patient {patient}: {seen[patient].name} and {image.name}"
            )
        seen[patient] = image
        cases.append(VolumeCase(patient, image, match[0], {"layout": "nifti"}))
    if missing:
        raise MissingInputError(f"no mask in {masks_dir} for {len(missing)} image(s): {', '.join(missing)}")
    return cases


def _check_nifti(path: Path) -> None:
    """Read a NIfTI file's data in full with nibabel: ITK fills a truncated file's missing voxels
    with zeros and turns NaN into 0 without a word."""
    import nibabel as nib

    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as e:  # EOFError (cut-short .gz), OSError (cut-short .nii), ImageFileError, zlib.error
        raise InvalidInputError(f"cannot read volume {path} in full: {_first_line(e)}") from e
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise InvalidInputError(f"volume {path} has {bad} NaN or infinite voxel(s) of {data.size}")


def _check_dicom_series(folder: Path) -> int:
    """Every DICOM file of ``folder`` readable in full, and no slice missing; returns the slice count.

    ITK's series reader leaves out a file it cannot read, and a series with a slice missing reads as
    a shorter volume: both silently shift every later slice's number.
    """
    import itk

    files = sorted(p for p in folder.iterdir() if p.is_file() and _looks_dicom(p))
    positions = []
    for f in files:
        try:
            image = itk.imread(str(f))
        except Exception as e:
            raise InvalidInputError(f"cannot read DICOM file {f} in full: {_first_line(e)}") from e
        normal = np.asarray(itk.array_from_matrix(image.GetDirection()))[:, -1]
        positions.append((float(np.dot(np.asarray(image.GetOrigin()), normal)), f))
    positions.sort()
    gaps = np.diff([p for p, _ in positions])
    if len(gaps) >= 2 and np.ptp([p for p, _ in positions]) > 0:  # without positions, no gap can be seen
        step = float(np.median(gaps))
        for (_, fa), (_, fb), gap in zip(positions, positions[1:], gaps):
            if step > 0 and gap > 1.5 * step:
                raise InvalidInputError(
                    f"DICOM series {folder} has a gap of {gap:g} between {fa.name} and {fb.name} "
                    f"(slices are {step:g} apart): a slice is missing"
                )
            if gap < 1e-6:
                raise InvalidInputError(
                    f"DICOM series {folder}: {fa.name} and {fb.name} are at the same position"
                )
    return len(files)


def _first_line(error: BaseException) -> str:
    """An exception's message on one line (ITK's carry a trace: its last line says what is wrong)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = " ".join(lines)
    return (text if len(text) <= 300 else lines[-1]) or type(error).__name__


def read_volume(path: str | os.PathLike) -> np.ndarray:
    """A volume as a (slices, rows, columns) array: a NIfTI/NRRD/... file or a DICOM series folder.

    The file is read in full or not at all: a truncated file, a DICOM file that cannot be read, a
    missing slice or NaN/infinite voxels are errors naming the file.

    Raises:
        InvalidInputError: the volume cannot be read in full, or is not a 3-D single-channel volume.
    """
    return read_volume_image(path)[1]


def read_volume_image(path: str | os.PathLike):
    """``(itk image, (slices, rows, columns) array)`` of a volume, checked as :func:`read_volume` does.

    The ITK image carries the geometry (spacing, origin, direction) a mask written for the volume
    needs. A folder is the one folder under it (itself included) holding a DICOM series, e.g. a
    patient's folder as the scanner exports it.
    """
    import itk

    path = Path(path)
    slices = None
    if path.is_dir():
        series = _dicom_series_dir(path)
        if series is None:
            raise MissingInputError(f"no DICOM files (*.dcm, *.ima or with a DICM preamble) under {path}")
        path = series
        slices = _check_dicom_series(path)
    elif _strip_nifti(path.name):
        _check_nifti(path)
    try:
        image = itk.imread(str(path))
    except Exception as e:  # ITK raises RuntimeError with its own trace
        raise InvalidInputError(f"cannot read volume {path}: {_first_line(e)}") from e
    array = np.asarray(itk.array_from_image(image))
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InvalidInputError(f"{path} is not a 3-D single-channel volume (array shape {array.shape})")
    if slices is not None and array.shape[0] != slices:
        raise InvalidInputError(
            f"DICOM series {path} has {slices} files but ITK read {array.shape[0]} slices"
        )
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise InvalidInputError(f"volume {path} has NaN or infinite voxels")
    return image, array


def scale_to_uint8(volume: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip a volume to its ``low``-``high`` percentiles and scale to 0-255 ``uint8``."""
    v = volume.astype(np.float64)
    lo, hi = np.percentile(v, [low, high])
    if hi <= lo:
        return np.zeros(v.shape, np.uint8)
    return np.rint(np.clip((v - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def patient_split(patients, test_fraction: float = 0.25, seed: int = 0) -> tuple[list[str], list[str]]:
    """Seeded split of patient ids into (train, test); at least one of each when there are two."""
    patients = sorted(set(patients))
    if not 0.0 <= test_fraction < 1.0:
        raise InvalidInputError(f"test_fraction must be in [0, 1), got {test_fraction}")
    order = list(np.random.default_rng(seed).permutation(len(patients)))
    n_test = int(round(test_fraction * len(patients)))
    if test_fraction > 0 and len(patients) >= 2:
        n_test = min(max(n_test, 1), len(patients) - 1)
    test = sorted(patients[i] for i in order[:n_test])
    return [p for p in patients if p not in test], test


def _gland_slices(case: VolumeCase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image, gland mask, indices of the slices with gland)`` of one case, read in full and checked."""
    image = read_volume(case.image)
    label = read_volume(case.label)
    if image.shape != label.shape:
        raise InvalidInputError(
            f"patient {case.patient}: label {case.label} has shape {label.shape}, "
            f"image {case.image} {image.shape}"
        )
    gland = label > 0
    keep = np.flatnonzero(gland.reshape(gland.shape[0], -1).any(axis=1))
    if keep.size == 0:
        raise InvalidInputError(f"patient {case.patient}: label {case.label} contains no gland (all zero)")
    if image.min() == image.max():
        raise InvalidInputError(
            f"patient {case.patient}: image {case.image} is constant (every voxel {image.flat[0]}): "
            "nothing to see on its slices"
        )
    return image, gland, keep


def prepare_slices(
    cases: list[VolumeCase],
    out: str | os.PathLike,
    test_fraction: float = 0.25,
    seed: int = 0,
    test_patients=None,
) -> dict:
    """Write the gland-containing axial slices of ``cases`` and patient-disjoint split files.

    Writes ``OUT/images/<PatientID>_<k>.png`` (8-bit), ``OUT/masks/<PatientID>_<k>.png`` (0/255),
    ``OUT/train.txt``, ``OUT/test.txt`` (slice names) and ``OUT/manifest.json``.

    Args:
        cases: from :func:`nci_isbi_cases` or :func:`nifti_cases`.
        out: output folder.
        test_fraction: share of patients in test.txt (seeded by ``seed``).
        seed: split seed.
        test_patients: explicit test patient ids instead of a seeded split.

    Every volume is read in full and checked before anything is written: a file that cannot be
    read in full, NaN voxels, a constant image, a label of another shape or without gland stop the
    run with the file named, and no slice is written.

    Raises:
        InvalidInputError: the problem and the file, as above.
    """
    out = Path(out)
    if not 0.0 <= test_fraction < 1.0:
        raise InvalidInputError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if test_patients is not None:
        known = sorted(c.patient for c in cases)
        unknown = sorted(set(test_patients) - set(known))
        if unknown:
            raise InvalidInputError(f"test patients {unknown} are not among the cases ({', '.join(known)})")
        if set(known) <= set(test_patients):
            raise InvalidInputError(
                f"test patients {sorted(set(test_patients))} are every patient: train.txt would be empty; "
                "leave at least one patient for training"
            )
    # every volume is read in full and checked before a single slice is written
    for case in cases:
        _gland_slices(case)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_folder(out, "`gazemonai prepare-slices`", "--out"):
        return _write_slices(cases, out, test_fraction, seed, test_patients)


def _write_slices(cases, out: Path, test_fraction, seed, test_patients) -> dict:
    patients, slices = {}, {}
    for case in cases:
        image, gland, keep = _gland_slices(case)
        pixels = scale_to_uint8(image)
        names = []
        for k in keep:
            name = slice_name(case.patient, int(k))
            write_png(out / "images" / f"{name}.png", pixels[k])
            write_png(out / "masks" / f"{name}.png", gland[k])
            names.append(name)
        slices[case.patient] = names
        patients[case.patient] = {
            "image": str(case.image),
            "label": str(case.label),
            "shape": list(image.shape),
            "slices_total": int(image.shape[0]),
            "slices_kept": len(names),
            **case.meta,
        }
        logger.info("%s: %d of %d slices contain gland", case.patient, len(names), image.shape[0])
    if test_patients is not None:
        test = sorted(set(test_patients))  # checked against the cases before anything was written
        train = [p for p in sorted(slices) if p not in test]
    else:
        train, test = patient_split(slices, test_fraction, seed)
    for split, members in (("train", train), ("test", test)):
        lines = [n for p in members for n in slices[p]]
        (out / f"{split}.txt").write_text("".join(f"{n}\n" for n in lines))
    summary = {
        "patients": len(slices),
        "slices": sum(len(v) for v in slices.values()),
        "train_patients": train,
        "test_patients": test,
        "train_slices": sum(len(slices[p]) for p in train),
        "test_slices": sum(len(slices[p]) for p in test),
        "intensity": "per volume: clip to 0.5-99.5 percentiles, scale to 0-255 (8-bit PNG)",
        "mask": "label > 0 (whole gland), 0/255 PNG",
        "slice_numbering": "1-based index along the volume's third axis (ITK order)",
    }
    (out / "manifest.json").write_text(json.dumps({**summary, "cases": patients}, indent=2) + "\n")
    return summary
