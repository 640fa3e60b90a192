"""Mask transforms: binarising ground truth, writing predictions (one file per key)."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from gazemonai.train.transforms import BinarizeMaskd, SaveMaskd


def test_binarize_and_save_mask(tmp_path):
    rgb = np.zeros((3, 4, 5), np.uint8)
    rgb[:, 1, 2] = 200  # JPEG-like 0/255 RGB mask
    rgb[0, 3, 4] = 100  # below 127: background
    d = BinarizeMaskd("label")({"label": MetaTensor(torch.as_tensor(rgb), meta={"filename_or_obj": "m.jpg"})})
    lab = d["label"]
    assert lab.shape == (1, 4, 5) and lab.sum() == 1 and lab[0, 1, 2] == 1
    ones = BinarizeMaskd("label")({"label": torch.tensor([[[0, 1], [1, 0]]])})["label"]
    assert ones.sum() == 2  # 0/1 label maps: foreground > 0
    img = MetaTensor(torch.zeros(3, 4, 5), meta={"filename_or_obj": "/x/case_7.jpg"})
    SaveMaskd("pred", output_dir=str(tmp_path))({"pred": lab, "image": img})
    saved = np.asarray(Image.open(tmp_path / "case_7.png"))
    assert saved.shape == (4, 5) and saved[1, 2] == 255 and saved.sum() == 255


def test_save_mask_writes_one_file_per_key(tmp_path):
    img = MetaTensor(torch.zeros(3, 2, 3), meta={"filename_or_obj": "/data/case_1.jpg"})
    a, b = torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)
    a[0, 0, 0], b[0, 1, 2] = 1, 1
    SaveMaskd(["pred", "level_1"], output_dir=str(tmp_path))({"pred": a, "level_1": b, "image": img})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_1_level_1.png", "case_1_pred.png"]
    assert np.asarray(Image.open(tmp_path / "case_1_level_1.png"))[1, 2] == 255
    assert np.asarray(Image.open(tmp_path / "case_1_pred.png"))[1, 2] == 0
    SaveMaskd(["pred", "level_1"], output_dir=str(tmp_path / "p"), output_postfix=["", "l1"])(
        {"pred": a, "level_1": b, "image": img}
    )
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["case_1.png", "case_1_l1.png"]
    with pytest.raises(ValueError, match="would write to the same files"):
        SaveMaskd(["pred", "level_1"], output_postfix="")
    with pytest.raises(ValueError, match="no filename_or_obj"):
        SaveMaskd("pred", output_dir=str(tmp_path))({"pred": a, "image": torch.zeros(3, 2, 3)})


def test_binarize_thresholds_per_key():
    m = torch.tensor([[[100, 200]]], dtype=torch.uint8)
    d = BinarizeMaskd(["a", "b"], threshold=[50, 150])({"a": m, "b": m})
    assert d["a"].tolist() == [[[1.0, 1.0]]] and d["b"].tolist() == [[[0.0, 1.0]]]


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
    assert meta["image"].meta["filename_or_obj"] == "a.jpg"  # Invertd and SaveMaskd still find the source
    with pytest.raises(ValueError, match="image_normalization 'imagenet' needs 3 \\(RGB\\) channels, got 1"):
        NormalizeImaged("image", "imagenet")({"image": mr})
    with pytest.raises(ValueError, match="image_normalization must be one of"):
        NormalizeImaged("image", "minmax")
