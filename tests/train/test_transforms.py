"""Mask and image transforms: binarising ground truth, reading and normalising images."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from gazemonai.train.transforms import BinarizeMaskd


def test_binarize_mask():
    rgb = np.zeros((3, 4, 5), np.uint8)
    rgb[:, 1, 2] = 200  # JPEG-like 0/255 RGB mask
    rgb[0, 3, 4] = 100  # below 127: background
    d = BinarizeMaskd("label")({"label": MetaTensor(torch.as_tensor(rgb), meta={"filename_or_obj": "m.jpg"})})
    lab = d["label"]
    assert lab.shape == (1, 4, 5) and lab.sum() == 1 and lab[0, 1, 2] == 1
    ones = BinarizeMaskd("label")({"label": torch.tensor([[[0, 1], [1, 0]]])})["label"]
    assert ones.sum() == 2  # 0/1 label maps: foreground > 0
    assert lab.meta["filename_or_obj"] == "m.jpg"


def test_binarize_thresholds_per_key():
    m = torch.tensor([[[100, 200]]], dtype=torch.uint8)
    d = BinarizeMaskd(["a", "b"], threshold=[50, 150])({"a": m, "b": m})
    assert d["a"].tolist() == [[[1.0, 1.0]]] and d["b"].tolist() == [[[0.0, 1.0]]]


def _load(path, channels):
    """The image as the bundles read it: MONAI's LoadImaged + PILReader with the converter."""
    from monai.transforms import LoadImage

    from gazemonai.train.transforms import CheckedPILReader

    reader = CheckedPILReader(channels, reverse_indexing=False)
    return np.asarray(LoadImage(reader=reader, image_only=True)(str(path)))


GRAY = np.array([[0, 60], [120, 250]], np.uint8)


@pytest.mark.parametrize(
    "mode, save",
    [
        ("L", lambda p: Image.fromarray(GRAY).save(p)),
        ("LA", lambda p: Image.fromarray(GRAY).convert("LA").save(p)),
        ("RGBA", lambda p: Image.fromarray(GRAY).convert("RGBA").save(p)),
        ("P", lambda p: Image.fromarray(GRAY).convert("RGB").convert("P", palette=Image.ADAPTIVE).save(p)),
        ("I;16", lambda p: Image.fromarray(GRAY.astype(np.uint16) * 257).save(p)),
        ("RGB", lambda p: Image.fromarray(GRAY).convert("RGB").save(p)),
    ],
)
def test_every_image_mode_becomes_8_bit_rgb_as_pseudo_masks_reads_it(tmp_path, mode, save):
    path = tmp_path / "x.png"
    save(path)
    assert Image.open(path).mode == mode
    rgb = _load(path, 3)
    assert rgb.shape == (2, 2, 3)  # float32, as LoadImaged gives the bundles
    for c in range(3):  # gray replicated; 16-bit 0..64250 min-max scaled to 0..255 (250 * 257 = 64250)
        expected = np.rint((GRAY - 0.0) / 250.0 * 255.0) if mode == "I;16" else GRAY
        assert np.array_equal(rgb[..., c], expected), (mode, rgb[..., c])
    gray = _load(path, 1)
    assert gray.shape == (2, 2) and gray.max() <= 255


def test_a_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "x.jpg"
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    rgb = _load(path, 3)
    assert rgb.shape == (6, 8, 3) and abs(int(rgb[0, 0, 0]) - 255) <= 2 and rgb[0, 0, 1] <= 2


def test_a_truncated_jpeg_is_named(tmp_path):
    from gazemonai.errors import ImageReadError
    from gazemonai.train.transforms import ImageConverter

    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:800])
    with pytest.raises(ImageReadError, match=f"cannot read image {path}: image file is truncated"):
        ImageConverter(3)(Image.open(path))
    with pytest.raises(ImageReadError, match=f"cannot read image {path}"):  # not lost among MONAI's readers
        _load(path, 3)


def test_normalize_image_schemes_against_hand_computed_values():
    """unit: x/255; imagenet: (x/255 - mean)/std per channel (GazeSup's Kvasir input); zscore: whole image."""
    from gazemonai.train.transforms import NormalizeImaged

    img = torch.tensor([[[0.0, 255.0]], [[51.0, 102.0]], [[255.0, 0.0]]])  # (3, 1, 2)
    unit = NormalizeImaged("image", "unit")({"image": img.clone()})["image"]
    assert torch.allclose(unit, torch.tensor([[[0.0, 1.0]], [[0.2, 0.4]], [[1.0, 0.0]]]))
    net = NormalizeImaged("image", "imagenet")({"image": img.clone()})["image"]
    expected = [
        [(0.0 - 0.485) / 0.229, (1.0 - 0.485) / 0.229],  # red: -2.1179, 2.2489
        [(0.2 - 0.456) / 0.224, (0.4 - 0.456) / 0.224],  # green: -1.1429, -0.25
        [(1.0 - 0.406) / 0.225, (0.0 - 0.406) / 0.225],  # blue: 2.64, -1.8044
    ]
    assert torch.allclose(net[:, 0], torch.tensor(expected), atol=1e-5)
    assert abs(float(net[0, 0, 0]) + 2.117904) < 1e-5 and abs(float(net[2, 0, 0]) - 2.64) < 1e-5
    mr = torch.tensor([[[1.0, 3.0], [5.0, 7.0]]])  # mean 4, population std sqrt(5)
    z = NormalizeImaged("image", "zscore")({"image": mr})["image"]
    assert torch.allclose(z, (mr - 4.0) / 5.0**0.5)
    meta = NormalizeImaged("image", "imagenet")(
        {"image": MetaTensor(img.clone(), meta={"filename_or_obj": "a.jpg"})}
    )
    assert meta["image"].meta["filename_or_obj"] == "a.jpg"  # Invertd and SaveImaged still find the source
    with pytest.raises(ValueError, match="image_normalization 'imagenet' needs 3 \\(RGB\\) channels, got 1"):
        NormalizeImaged("image", "imagenet")({"image": mr})
    with pytest.raises(ValueError, match="image_normalization must be one of"):
        NormalizeImaged("image", "minmax")


def test_save_maskd_of_an_earlier_registered_inference_json_is_monai_s_saveimaged(tmp_path):
    """A model registered with gazemonai 0.4.1 stored an inference.json naming SaveMaskd: the entry still
    parses, to the SaveImaged the registry and MONAI Label leave out, writing <stem>.png 0/255, rows = y."""
    from monai.bundle import ConfigParser
    from monai.transforms import SaveImaged

    entry = {"_target_": "gazemonai.train.transforms.SaveMaskd", "keys": "pred", "output_dir": str(tmp_path)}
    save = ConfigParser({"save": {**entry, "source_key": "image"}}).get_parsed_content("save")
    assert isinstance(save, SaveImaged)
    mask = torch.zeros(1, 2, 3)
    mask[0, 1, 2] = 1
    save({"pred": MetaTensor(mask, meta={"filename_or_obj": "/data/case_1.jpg"})})
    assert [p.name for p in tmp_path.iterdir()] == ["case_1.png"]
    written = np.asarray(Image.open(tmp_path / "case_1.png"))
    assert written.shape == (2, 3) and written[1, 2] == 255 and written.sum() == 255
