import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from gazemonai.gaze.heatmap import gaze_heatmap
from gazemonai.gaze.levels import pseudo_mask_levels
from gazemonai.gaze.refine import crf_refine
from gazemonai.gaze.transforms import CRFRefined, GazeHeatmapd, PseudoMaskLevelsd
from gazemonai.prep.io import read_image


def chain(xy_transposed=False, **kw):
    return [
        GazeHeatmapd(keys="fixations", image_key="image", sigma=70, xy_transposed=xy_transposed),
        CRFRefined(keys="heatmap", image_key="image", max_side=None),
        PseudoMaskLevelsd(keys="refined", thresholds=(0.5, 0.3)),
    ]


def test_chain_matches_the_functions(synthetic_root):
    from gazemonai.gaze.fixations import read_fixation_csv

    fx = read_fixation_csv(synthetic_root / "gaze.csv")["synth_000.png"]
    path = synthetic_root / "images" / "synth_000.png"
    load = [LoadImaged("image", reader="PILReader", reverse_indexing=False), EnsureChannelFirstd("image")]
    d = Compose(load + chain())({"image": str(path), "fixations": fx.as_array()})
    img = read_image(path)
    hm = gaze_heatmap(fx.as_array(), img.shape[:2], sigma=70)
    ref = crf_refine(img, hm, max_side=None)
    assert isinstance(d["heatmap"], MetaTensor) and d["heatmap"].shape == (1, 96, 128)
    np.testing.assert_allclose(d["heatmap"][0].numpy(), hm, atol=1e-6)
    np.testing.assert_allclose(d["refined"][0].numpy(), ref, atol=1e-6)
    assert d["pseudo_label"].shape == (2, 96, 128)
    np.testing.assert_array_equal(d["pseudo_label"].numpy(), pseudo_mask_levels(ref, (0.5, 0.3)))
    # metadata (affine) follows the image so later spatial transforms treat the maps alike
    assert torch.equal(d["pseudo_label"].affine, d["image"].affine)


def test_monai_default_reader_orientation(synthetic_root):
    """MONAI's default PILReader gives (C, W, H): xy_transposed=True, said once, gives the maps transposed."""
    from gazemonai.gaze.fixations import read_fixation_csv

    fx = read_fixation_csv(synthetic_root / "gaze.csv")["synth_001.png"]
    path = str(synthetic_root / "images" / "synth_001.png")
    base = [EnsureChannelFirstd("image")]
    hw = Compose([LoadImaged("image", reader="PILReader", reverse_indexing=False)] + base + chain())
    wh = Compose([LoadImaged("image", reader="PILReader")] + base + chain(xy_transposed=True))
    a = hw({"image": path, "fixations": fx.as_array()})
    b = wh({"image": path, "fixations": fx.as_array()})
    assert b["image"].shape == (3, 128, 96) and b["heatmap"].shape == (1, 128, 96)
    np.testing.assert_allclose(a["heatmap"][0].numpy(), b["heatmap"][0].numpy().T, atol=1e-6)
    np.testing.assert_allclose(a["refined"][0].numpy(), b["refined"][0].numpy().T, atol=1e-6)
    np.testing.assert_array_equal(a["pseudo_label"].numpy(), b["pseudo_label"].numpy().transpose(0, 2, 1))
    # the axis order is said once, to GazeHeatmapd, and travels with the maps' metadata
    assert [b[k].meta["spatial_axes"] for k in ("heatmap", "refined", "pseudo_label")] == ["xy"] * 3
    assert a["refined"].meta["spatial_axes"] == "yx"
    # forgetting xy_transposed with the default reader is caught (the file says which axis is x)
    loaded = Compose([LoadImaged("image", reader="PILReader")] + base)(
        {"image": path, "fixations": fx.as_array()}
    )
    with pytest.raises(ValueError, match="128 wide and 96 high .* i.e. \\(x, y\\) .* set xy_transposed=True"):
        GazeHeatmapd()(loaded)
    loaded = Compose(hw.transforms[:2])({"image": path, "fixations": fx.as_array()})
    with pytest.raises(ValueError, match="i.e. \\(y, x\\) .* set xy_transposed=False"):
        GazeHeatmapd(xy_transposed=True)(loaded)


def test_several_keys_with_per_key_outputs(synthetic_root):
    """Two readers' fixations on one image: one heatmap, refined map and pseudo-mask stack each."""
    from gazemonai.gaze.fixations import read_fixation_csv

    fx = read_fixation_csv(synthetic_root / "gaze.csv")
    a, b = fx["synth_002.png"].as_array(), fx["synth_003.png"].as_array()
    img = torch.as_tensor(np.moveaxis(read_image(synthetic_root / "images" / "synth_002.png"), -1, 0))
    pipeline = Compose(
        [
            GazeHeatmapd(keys=["fx_a", "fx_b"], image_key="image", heatmap_key=["hm_a", "hm_b"]),
            CRFRefined(keys=["hm_a", "hm_b"], refined_key=["ref_a", "ref_b"]),
            PseudoMaskLevelsd(keys=["ref_a", "ref_b"], label_key=["pl_a", "pl_b"], thresholds=(0.5,)),
        ]
    )
    d = pipeline({"image": img, "fx_a": a, "fx_b": b})
    single = Compose(chain())({"image": img, "fixations": b})
    np.testing.assert_allclose(d["hm_b"].numpy(), single["heatmap"].numpy(), atol=1e-6)
    np.testing.assert_array_equal(d["pl_b"].numpy(), single["pseudo_label"].numpy()[:1])
    assert not np.array_equal(d["hm_a"].numpy(), d["hm_b"].numpy())
    with pytest.raises(ValueError, match="2 keys .* need distinct heatmap_key values"):
        GazeHeatmapd(keys=["fx_a", "fx_b"])
    with pytest.raises(ValueError, match="distinct label_key"):
        PseudoMaskLevelsd(keys=["r1", "r2"], label_key="same")
    # missing keys are skipped only when allowed
    with pytest.raises(KeyError, match="fx_b"):
        GazeHeatmapd(keys=["fx_a", "fx_b"], heatmap_key=["h1", "h2"])({"image": img, "fx_a": a})
    out = GazeHeatmapd(keys=["fx_a", "fx_b"], heatmap_key=["h1", "h2"], allow_missing_keys=True)(
        {"image": img, "fx_a": a}
    )
    assert "h1" in out and "h2" not in out


def test_single_channel_image_and_plain_arrays():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 1000, (1, 40, 50)).astype(np.float32)  # an MR slice, channel-first
    d = Compose(chain())({"image": img, "fixations": np.array([[0.5, 0.5, 300.0], [0.4, 0.6, 200.0]])})
    assert d["refined"].shape == (1, 40, 50)
    assert set(np.unique(d["pseudo_label"].numpy())) <= {0.0, 1.0}


def test_bad_image_shape():
    with pytest.raises(ValueError, match="channel-first"):
        GazeHeatmapd()({"image": np.zeros((4, 4)), "fixations": np.array([[0.5, 0.5, 1.0]])})


def test_pseudo_masks_resized_bilinear_then_thresholded_as_gazesup():
    """spatial_size: the refined map is resized (bilinear) first and thresholded after.

    Halving a 4x4 map with bilinear interpolation (align_corners False, no anti-aliasing: MONAI's
    ``Resize`` as GazeSup calls it) samples the centre of each 2x2 block, i.e. its mean. The top-left
    block [[0.6, 0.2], [0.2, 0.2]] has mean 0.3: level 0.3 keeps it, level 0.5 does not; thresholding
    first and picking pixels with nearest neighbour (the default order) keeps its 0.6 in both levels.
    """
    from monai.transforms import Resized

    from gazemonai.gaze.transforms import PseudoMaskLevelsd

    prob = torch.tensor(
        [[0.6, 0.2, 0.9, 0.9], [0.2, 0.2, 0.9, 0.5], [0.0, 0.0, 0.1, 0.1], [0.0, 0.4, 0.1, 0.1]]
    )[None]
    # block means: [[0.3, 0.8], [0.1, 0.1]]
    after = PseudoMaskLevelsd("refined", thresholds=(0.5, 0.3), spatial_size=(2, 2))({"refined": prob})
    assert after["pseudo_label"].tolist() == [[[0, 1], [0, 0]], [[1, 1], [0, 0]]]
    first = PseudoMaskLevelsd("refined", thresholds=(0.5, 0.3))({"refined": prob})
    before = Resized("pseudo_label", (2, 2), mode="nearest")(first)["pseudo_label"]
    assert before.tolist() == [[[1, 1], [0, 0]], [[1, 1], [0, 0]]]  # the top-left pixel of each block
    # upsampling too: a 2x1 map [0.2, 0.6] to 4x1, bilinear: 0.2, 0.3, 0.5, 0.6 -> level 0.5 = [0, 0, 1, 1]
    up = PseudoMaskLevelsd("refined", thresholds=(0.5,), spatial_size=(4, 1))(
        {"refined": torch.tensor([[[0.2], [0.6]]])}
    )
    assert up["pseudo_label"][0, :, 0].tolist() == [0, 0, 1, 1]
    assert up["pseudo_label"].shape == (1, 4, 1) and up["pseudo_label"].dtype == torch.float32
    with pytest.raises(ValueError, match="spatial_size must be positive"):
        PseudoMaskLevelsd("refined", spatial_size=(0, 2))
