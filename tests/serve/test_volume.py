"""An MR volume in, a NIfTI mask out on the volume's grid: the prostate model slice by slice."""

import json

import numpy as np
import pytest
import torch
from helpers import PROSTATE158, ROOT, bundle, cli, need, write_dicom_series
from PIL import Image

PROSTATE = ROOT / "bundles" / "prostate_gaze"
SPACING, ORIGIN = (0.7, 0.6, 3.0), (10.0, -20.0, 5.0)  # ITK order: x, y, z
# a rotation about z by 30 degrees: direction cosines a viewer must keep
DIRECTION = np.array([[0.8660254, -0.5, 0.0], [0.5, 0.8660254, 0.0], [0.0, 0.0, 1.0]])


def _write(array: np.ndarray, path, like=None):
    import itk

    image = itk.image_from_array(np.ascontiguousarray(array))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(itk.matrix_from_array(DIRECTION))
    itk.imwrite(image, str(path))


@pytest.fixture(scope="module")
def volume_case(tmp_path_factory):
    """A 6 x 40 x 48 MR-like volume (slices, rows, columns) with a bright gland on slices 1-4, its
    label, and seeded prostate_gaze weights whose masks are not constant on it."""
    root = tmp_path_factory.mktemp("volume")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:6, :40, :48]
    gland = ((y - 22) / 9.0) ** 2 + ((x - 20) / 12.0) ** 2 < 1.0
    gland &= (z >= 1) & (z <= 4)
    image = (200 + 40 * rng.standard_normal(gland.shape) + 500 * gland + 3 * x).astype(np.float32)
    _write(image, root / "images" / "007_t2.nii.gz")
    _write(gland.astype(np.uint8), root / "masks" / "007_t2_gland.nii.gz")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(PROSTATE / "configs" / "inference.json"))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    with torch.no_grad():  # shift the logits so that about half the pixels are foreground
        for level in net.levels:
            level.classifier.bias.fill_(0.0)
        probe = torch.randn(1, 1, 96, 96)
        net.levels[0].classifier.bias.fill_(-2 * float(net(probe).median()))
    (root / "models").mkdir()
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def test_a_volume_gives_the_slices_masks_on_its_own_grid(volume_case, tmp_path):
    import itk

    root = volume_case
    out = tmp_path / "mask.nii.gz"
    p = cli("segment-volume", "--volume", root / "images" / "007_t2.nii.gz", "--out", out,
            "--bundle-dir", PROSTATE, "--checkpoint", root / "models" / "model.pt")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["shape"] == [6, 40, 48]
    mask = itk.imread(str(out))
    assert np.allclose(mask.GetSpacing(), SPACING) and np.allclose(mask.GetOrigin(), ORIGIN)
    assert np.allclose(itk.array_from_matrix(mask.GetDirection()), DIRECTION, atol=1e-6)
    volume = itk.array_from_image(mask)
    assert volume.dtype == np.uint8 and set(np.unique(volume)) == {0, 1}  # not constant: a real test

    # the reference: the slices prepare-slices writes for training, through the bundle's inference.json
    slices = tmp_path / "slices"
    p = cli("prepare-slices", "--nifti-images", root / "images", "--nifti-masks", root / "masks",
            "--out", slices, "--test-fraction", 0)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    bundle("--config_file", PROSTATE / "configs" / "inference.json", "--bundle_root", root,
           "--dataset_dir", slices / "images", "--output_dir", tmp_path / "pred")  # fmt: skip
    written = sorted((tmp_path / "pred").glob("*.png"))
    assert [p.stem for p in written] == [f"007_{k}" for k in range(2, 6)]  # gland slices 1-4, 1-based names
    for png in written:
        k = int(png.stem.split("_")[1]) - 1
        assert np.array_equal(np.asarray(Image.open(png)) > 0, volume[k] > 0), png.name


def test_a_real_prostate158_volume_keeps_its_geometry(volume_case, tmp_path):
    import itk

    need(PROSTATE158 / "images")
    source = sorted((PROSTATE158 / "images").glob("*.nii.gz"))[0]
    out = tmp_path / "mask.nii.gz"
    p = cli("segment-volume", "--volume", source, "--out", out, "--bundle-dir", PROSTATE,
            "--checkpoint", volume_case / "models" / "model.pt")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    image, mask = itk.imread(str(source)), itk.imread(str(out))
    assert itk.size(mask) == itk.size(image)
    assert np.allclose(mask.GetSpacing(), image.GetSpacing()) and np.allclose(
        mask.GetOrigin(), image.GetOrigin()
    )
    assert np.allclose(
        itk.array_from_matrix(mask.GetDirection()), itk.array_from_matrix(image.GetDirection())
    )


def test_a_dicom_series_gives_the_same_masks_as_its_nifti(volume_case, tmp_path):
    """The scanner's DICOM series and a NIfTI of the same voxels: the same mask, each on its own grid."""
    import itk

    image = itk.array_from_image(itk.imread(str(volume_case / "images" / "007_t2.nii.gz")))
    voxels = np.round(image).astype(np.int16)
    write_dicom_series(tmp_path / "dicom" / "series", voxels, spacing=2.5)
    nifti = tmp_path / "same.nii.gz"
    itk.imwrite(itk.image_from_array(voxels), str(nifti))
    masks = {}
    for name, source in (("dicom", tmp_path / "dicom"), ("nifti", nifti)):
        out = tmp_path / f"{name}_mask.nii.gz"
        p = cli("segment-volume", "--volume", source, "--out", out, "--bundle-dir", PROSTATE,
                "--checkpoint", volume_case / "models" / "model.pt")  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        masks[name] = itk.imread(str(out))
    assert np.allclose(masks["dicom"].GetSpacing()[2], 2.5)  # from the slices' positions
    assert np.allclose(masks["dicom"].GetOrigin(), (0.0, 0.0, 0.0))
    dicom, ref = itk.array_from_image(masks["dicom"]), itk.array_from_image(masks["nifti"])
    assert dicom.shape == (6, 40, 48) and 0 < dicom.sum() < dicom.size
    assert np.array_equal(dicom, ref)


def test_segment_volume_names_what_is_wrong(volume_case, tmp_path):
    p = cli("segment-volume", "--volume", tmp_path / "none.nii.gz", "--out", tmp_path / "m.nii.gz",
            "--bundle-dir", PROSTATE, "--checkpoint", volume_case / "models" / "model.pt")  # fmt: skip
    assert p.returncode == 2 and "none.nii.gz" in p.stderr
    (tmp_path / "cut.nii.gz").write_bytes((volume_case / "images" / "007_t2.nii.gz").read_bytes()[:300])
    p = cli("segment-volume", "--volume", tmp_path / "cut.nii.gz", "--out", tmp_path / "m.nii.gz",
            "--bundle-dir", PROSTATE, "--checkpoint", volume_case / "models" / "model.pt")  # fmt: skip
    assert p.returncode == 2 and "cut.nii.gz" in p.stderr
    (tmp_path / "empty").mkdir()
    p = cli("segment-volume", "--volume", tmp_path / "empty", "--out", tmp_path / "m.nii.gz",
            "--bundle-dir", PROSTATE, "--checkpoint", volume_case / "models" / "model.pt")  # fmt: skip
    assert p.returncode == 2 and "no DICOM files" in p.stderr and "empty" in p.stderr
    p = cli(
        "segment-volume", "--volume", volume_case / "images" / "007_t2.nii.gz", "--out", tmp_path / "m.nii.gz"
    )
    assert p.returncode == 2 and "--checkpoint" in p.stderr
    assert not (tmp_path / "m.nii.gz").exists()
